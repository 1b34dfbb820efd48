//! One completion, the same for the server and `phi-lsp complete`: the prompt window at the cursor,
//! the engine job with the Python stop rules plugged in, and the post-processed suggestion.

use std::time::{Duration, Instant};

use phi_engine::{GenerateParams, Generation, Job, Prompt};
use ropey::Rope;

use crate::postprocess::{self, Context};
use crate::prompt::{self, PromptWindow};
use crate::settings::Settings;

/// Everything needed to ask the model and to post-process its answer.
pub struct Prepared {
    pub window: PromptWindow,
    pub context: Context,
}

pub fn prepare(rope: &Rope, cursor_char: usize, settings: &Settings) -> Prepared {
    let window = prompt::window(rope, cursor_char, settings.window_chars());
    let indent = postprocess::detect_indent(&window.text);
    let context = Context::new(&window, indent);
    Prepared { window, context }
}

impl Prepared {
    /// The engine job; `key` picks the KV-cache slot (the document URI in the server).
    pub fn job(&self, key: &str, settings: &Settings) -> Job {
        let context = self.context.clone();
        Job {
            key: key.to_string(),
            prompt: Prompt::Text(self.window.text.clone()),
            params: GenerateParams {
                max_new_tokens: settings.max_new_tokens,
                deadline: Some(Instant::now() + Duration::from_millis(settings.deadline_ms)),
                ..Default::default()
            },
            stop: Some(Box::new(move |text: &str| {
                postprocess::should_stop(&context, text)
            })),
        }
    }

    /// A character whose bytes were cut off by the token limit decodes as U+FFFD: it is dropped.
    pub fn suggestion(&self, generation: &Generation) -> Option<String> {
        postprocess::finish(&self.context, generation.text.trim_end_matches('\u{FFFD}'))
    }
}
