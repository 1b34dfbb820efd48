//! One completion, the same for the server and `phi-lsp complete`: the prompt window at the cursor,
//! the generation request with the Python stop rules plugged in, and the post-processed suggestion.

use std::time::{Duration, Instant};

use ropey::Rope;

use super::backend::GenerationRequest;
use super::neighbours::{self, Workspace};
use super::postprocess::{self, Context};
use super::prompt::{self, PromptWindow};
use crate::settings::Settings;

/// Everything needed to ask the model and to post-process its answer.
pub struct Prepared {
    pub window: PromptWindow,
    pub context: Context,
}

/// The completion at `cursor_char` of `rope`, the text of the document `key` in `workspace` (whose
/// other open documents may define what it imports).
pub fn prepare(
    key: &str,
    rope: &Rope,
    cursor_char: usize,
    workspace: &Workspace,
    settings: &Settings,
) -> Prepared {
    let max_chars = prompt::window_chars(settings.context_tokens, settings.max_new_tokens);
    let cursor_char = cursor_char.min(rope.len_chars());
    let neighbours = neighbours::collect(key, rope, rope.char_to_line(cursor_char), workspace);
    let window = prompt::window_with_context(rope, cursor_char, max_chars, neighbours);
    let indent = postprocess::detect_indent(&window.text);
    let context = Context::new(&window, indent);
    Prepared { window, context }
}

impl Prepared {
    /// The generation to run; `key` picks the KV-cache slot (the document URI in the server).
    pub fn request(&self, key: &str, settings: &Settings) -> GenerationRequest {
        let context = self.context.clone();
        GenerationRequest {
            key: key.to_string(),
            prompt: self.window.text.clone(),
            header: self.window.header.clone(),
            neighbours: self.window.neighbours.clone(),
            heal: settings.token_healing && heals_at(&self.window.text),
            max_new_tokens: settings.max_new_tokens,
            deadline: Some(Instant::now() + Duration::from_millis(settings.deadline_ms)),
            stop: Box::new(move |text: &str| postprocess::should_stop(&context, text)),
            progress: None,
            sampling: None,
        }
    }

    /// What of `generated` goes in at the cursor.
    pub fn suggestion(&self, generated: &str) -> Option<String> {
        suggestion(&self.context, generated)
    }
}

/// Whether a prompt ending in `text` is worth healing: the cursor is inside or at the end of a
/// word (`ret|`, `os.pa|`) or just after a dot (`os.|`), where the prompt's last token is most
/// likely one the model would not have written there. After whitespace, brackets and operators it
/// is not healed.
pub fn heals_at(text: &str) -> bool {
    text.chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
}

/// What of `generated` goes in at a cursor with `context`. A character whose bytes were cut off by
/// the token limit decodes as U+FFFD: it is dropped.
pub fn suggestion(context: &Context, generated: &str) -> Option<String> {
    postprocess::finish(context, generated.trim_end_matches('\u{FFFD}'))
}

#[cfg(test)]
mod tests {
    use super::heals_at;

    #[test]
    fn healing_inside_a_word_and_after_a_dot_only() {
        for text in ["    ret", "os.pa", "os.", "x_1", "é", "print(are"] {
            assert!(heals_at(text), "{text:?}");
        }
        for text in ["", "return ", "f(", "x = ", "    \n", "a + b)", "def f():"] {
            assert!(!heals_at(text), "{text:?}");
        }
    }
}
