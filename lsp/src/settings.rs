//! What a user can configure, from the command line, `initializationOptions` or
//! `workspace/didChangeConfiguration`; parsed once into types that cannot be wrong.

use serde::{Deserialize, Serialize};

/// Where suggestions go. `Auto`: inline for clients that declare inline completion, the completion
/// menu otherwise (Helix), so VS Code and Neovim do not get the same text twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompletionMode {
    #[default]
    Auto,
    Inline,
    Menu,
    Both,
}

impl CompletionMode {
    /// Whether the server offers (inline completion, the completion menu) to a client that does or
    /// does not declare inline completion.
    pub fn providers(self, client_inline: bool) -> (bool, bool) {
        match self {
            CompletionMode::Auto => (client_inline, !client_inline),
            CompletionMode::Inline => (true, false),
            CompletionMode::Menu => (false, true),
            CompletionMode::Both => (true, true),
        }
    }

    /// Whether an inline (`inline`) or menu request is answered.
    pub fn allows(self, inline: bool, client_inline: bool) -> bool {
        let (inline_on, menu_on) = self.providers(client_inline);
        if inline {
            inline_on
        } else {
            menu_on
        }
    }
}

/// Which model to load; changing any of these reloads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    /// A model folder, a `.gguf` file or a Hub repo id.
    pub model: String,
    pub tokenizer: Option<String>,
    pub device: String,
    pub dtype: String,
    /// `local` (the model in this process) or the URL of an OpenAI-compatible server that
    /// generates instead (`model` is then the name it serves).
    pub backend: String,
}

impl ModelSpec {
    pub fn is_local(&self) -> bool {
        self.backend.trim().eq_ignore_ascii_case("local")
    }

    /// The spec with a leading `~` of the model and tokenizer paths expanded (see
    /// [`expand_home`]), for loading them in this process. Editors pass settings without a shell,
    /// so `~/models/phi-1` arrives as written.
    pub fn with_home_expanded(&self) -> ModelSpec {
        ModelSpec {
            model: expand_home(&self.model),
            tokenizer: self.tokenizer.as_deref().map(expand_home),
            ..self.clone()
        }
    }
}

/// `path` with a leading `~` (alone, or before a separator) replaced by the home folder: `$HOME`,
/// else `%USERPROFILE%`. Anything else, `~user/...` included, and any path when neither variable
/// is set, is returned unchanged.
pub fn expand_home(path: &str) -> String {
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .filter(|h| !h.is_empty());
    expand_home_in(path, home.as_deref().map(std::path::Path::new))
}

fn expand_home_in(path: &str, home: Option<&std::path::Path>) -> String {
    let (Some(rest), Some(home)) = (path.strip_prefix('~'), home) else {
        return path.to_string();
    };
    match rest.chars().next() {
        None => home.display().to_string(),
        Some(c) if std::path::is_separator(c) => home
            .join(rest.trim_start_matches(std::path::is_separator))
            .display()
            .to_string(),
        Some(_) => path.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub model: ModelSpec,
    pub max_new_tokens: usize,
    pub deadline_ms: u64,
    /// Tokens of context: the prompt window plus `max_new_tokens`.
    pub context_tokens: usize,
    pub completion_mode: CompletionMode,
    /// After a suggestion is shown, compute the next one (for the text as it will be once the
    /// suggestion is accepted) while the user is idle.
    pub speculate: bool,
    /// Answer as soon as the first line is complete and let the suggestion grow in the background
    /// (clients that declared `experimental.phiLsp.suggestionGrowth` are told when it grows); the
    /// default. Off: the answer is the whole suggestion, cut at `deadlineMs`.
    pub progressive: bool,
    /// Token healing: with the cursor inside a word or after a dot, the prompt's last token is
    /// dropped and the model writes it again, constrained to agree with it (local model only).
    pub token_healing: bool,
    /// Suggestions as the user types (the client's `Automatic` requests); the default. Off: only
    /// an explicit request (`Invoked`: a trigger key) runs the model; an automatic one is answered
    /// from the suggestion already shown (typing through it) or empty, and nothing is speculated.
    pub automatic: bool,
    /// Suggestions offered to an explicit request (`Invoked`), the greedy one first and then
    /// sampled ones, distinct after post-processing, for the client to cycle through; 1: the
    /// greedy one alone. Automatic requests always get one.
    pub alternatives: usize,
}

/// The default cap on a suggestion's tokens: a suggestion ends where the code says (the end of the
/// statement or of the block), and this only bounds a runaway one. HumanEval's longest canonical
/// body is 297 Phi-1 tokens.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 384;

/// Hard bounds on what a client controls.
pub const MAX_NEW_TOKENS_LIMIT: usize = 512;
pub const MAX_CONTEXT_TOKENS: usize = 2048;
pub const MAX_DEADLINE_MS: u64 = 60_000;
pub const MAX_ALTERNATIVES: usize = 5;

impl Settings {
    pub fn new(model: ModelSpec) -> Self {
        Settings {
            model,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            deadline_ms: 4000,
            context_tokens: 1536,
            completion_mode: CompletionMode::Auto,
            speculate: true,
            progressive: true,
            token_healing: true,
            automatic: true,
            alternatives: 3,
        }
    }

    /// Applies a settings object from the client: either the options themselves or wrapped as
    /// `{"phi-lsp": {...}}`. Unknown keys are ignored; a value of the wrong type is an error that
    /// names the key, and leaves the settings unchanged.
    pub fn apply(&mut self, value: &serde_json::Value) -> Result<(), String> {
        let value = value
            .get("phi-lsp")
            .or_else(|| value.get("phi_lsp"))
            .unwrap_or(value);
        if value.is_null() {
            return Ok(());
        }
        let update: Update = serde_json::from_value(value.clone()).map_err(|e| format!("settings: {e}"))?;
        let mut next = self.clone();
        if let Some(model) = update.model {
            next.model.model = model;
        }
        if let Some(tokenizer) = update.tokenizer {
            next.model.tokenizer = Some(tokenizer).filter(|t| !t.is_empty());
        }
        if let Some(device) = update.device {
            next.model.device = device;
        }
        if let Some(dtype) = update.dtype {
            next.model.dtype = dtype;
        }
        if let Some(backend) = update.backend {
            next.model.backend = backend;
        }
        if let Some(n) = update.max_new_tokens {
            if n == 0 || n > MAX_NEW_TOKENS_LIMIT {
                return Err(format!(
                    "settings: maxNewTokens must be 1..={MAX_NEW_TOKENS_LIMIT}, got {n}"
                ));
            }
            next.max_new_tokens = n;
        }
        if let Some(ms) = update.deadline_ms {
            next.deadline_ms = ms.clamp(1, MAX_DEADLINE_MS);
        }
        if let Some(n) = update.context_tokens {
            if !(128..=MAX_CONTEXT_TOKENS).contains(&n) {
                return Err(format!(
                    "settings: contextTokens must be 128..={MAX_CONTEXT_TOKENS}, got {n}"
                ));
            }
            next.context_tokens = n;
        }
        if let Some(mode) = update.completion_mode {
            next.completion_mode = mode;
        }
        if let Some(progressive) = update.progressive {
            next.progressive = progressive;
        }
        if let Some(speculate) = update.speculate {
            next.speculate = speculate;
        }
        if let Some(token_healing) = update.token_healing {
            next.token_healing = token_healing;
        }
        if let Some(automatic) = update.automatic {
            next.automatic = automatic;
        }
        if let Some(n) = update.alternatives {
            if !(1..=MAX_ALTERNATIVES).contains(&n) {
                return Err(format!(
                    "settings: alternatives must be 1..={MAX_ALTERNATIVES}, got {n}"
                ));
            }
            next.alternatives = n;
        }
        *self = next;
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Update {
    model: Option<String>,
    tokenizer: Option<String>,
    device: Option<String>,
    dtype: Option<String>,
    backend: Option<String>,
    max_new_tokens: Option<usize>,
    deadline_ms: Option<u64>,
    context_tokens: Option<usize>,
    completion_mode: Option<CompletionMode>,
    speculate: Option<bool>,
    progressive: Option<bool>,
    token_healing: Option<bool>,
    automatic: Option<bool>,
    alternatives: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> Settings {
        Settings::new(ModelSpec {
            model: "m".into(),
            tokenizer: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            backend: "local".into(),
        })
    }

    #[test]
    fn applies_plain_and_wrapped_objects() {
        let mut s = settings();
        assert!(s.token_healing, "on by default");
        s.apply(
            &json!({"maxNewTokens": 32, "completionMode": "menu", "speculate": false, "tokenHealing": false}),
        )
        .expect("valid");
        assert_eq!(
            (s.max_new_tokens, s.completion_mode, s.speculate, s.token_healing),
            (32, CompletionMode::Menu, false, false)
        );
        s.apply(&json!({"phi-lsp": {"model": "/models/phi-1", "deadlineMs": 900, "unknown": 1}}))
            .expect("valid");
        assert_eq!((s.model.model.as_str(), s.deadline_ms), ("/models/phi-1", 900));
        s.apply(&serde_json::Value::Null).expect("null is no change");
    }

    #[test]
    fn automatic_suggestions_are_on_by_default_and_can_be_turned_off() {
        let mut s = settings();
        assert!(s.automatic, "on by default");
        s.apply(&json!({"phi-lsp": {"automatic": false}})).expect("valid");
        assert!(!s.automatic);
        // Another change leaves it as it was; a wrong type is refused and changes nothing.
        s.apply(&json!({"maxNewTokens": 16})).expect("valid");
        assert!(!s.automatic);
        let err = s.apply(&json!({"automatic": "no"})).expect_err("not a boolean");
        assert!(err.contains("invalid type"), "{err}");
        assert!(!s.automatic);
        s.apply(&json!({"automatic": true})).expect("valid");
        assert!(s.automatic);
    }

    #[test]
    fn alternatives_default_to_three_and_stay_within_bounds() {
        let mut s = settings();
        assert_eq!(s.alternatives, 3);
        s.apply(&json!({"alternatives": 1})).expect("valid");
        assert_eq!(s.alternatives, 1);
        for bad in [json!(0), json!(MAX_ALTERNATIVES + 1), json!("3")] {
            assert!(s.apply(&json!({"alternatives": bad})).is_err(), "{bad}");
        }
        assert_eq!(s.alternatives, 1);
    }

    #[test]
    fn a_leading_tilde_is_the_home_folder() {
        let home = Some(std::path::Path::new("/home/ada"));
        assert_eq!(expand_home_in("~/models/phi-1", home), "/home/ada/models/phi-1");
        assert_eq!(expand_home_in("~", home), "/home/ada");
        assert_eq!(expand_home_in("~/", home), "/home/ada/");
        // Not a home folder of ours, or no tilde at the start: as written.
        assert_eq!(expand_home_in("~bob/phi-1", home), "~bob/phi-1");
        assert_eq!(expand_home_in("/models/~/phi-1", home), "/models/~/phi-1");
        assert_eq!(expand_home_in("microsoft/phi-1", home), "microsoft/phi-1");
        assert_eq!(expand_home_in("~/phi-1", None), "~/phi-1");
    }

    #[test]
    fn the_model_and_tokenizer_paths_expand_and_the_rest_stays() {
        let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) else {
            return; // expand_home_in above covers the logic
        };
        let home = std::path::PathBuf::from(home);
        let spec = ModelSpec {
            model: "~/models/phi-1".into(),
            tokenizer: Some("~/tok/tokenizer.json".into()),
            device: "cpu".into(),
            dtype: "auto".into(),
            backend: "local".into(),
        };
        let expanded = spec.with_home_expanded();
        assert_eq!(expanded.model, home.join("models/phi-1").display().to_string());
        assert_eq!(
            expanded.tokenizer,
            Some(home.join("tok/tokenizer.json").display().to_string())
        );
        assert_eq!(
            (expanded.device, expanded.dtype, expanded.backend),
            (spec.device, spec.dtype, spec.backend)
        );
    }

    #[test]
    fn bad_values_name_the_key_and_change_nothing() {
        let mut s = settings();
        let before = s.clone();
        let err = s
            .apply(&json!({"maxNewTokens": 100000, "dtype": "f16"}))
            .expect_err("too many");
        assert!(err.contains("maxNewTokens"), "{err}");
        let err = s.apply(&json!({"contextTokens": "big"})).expect_err("wrong type");
        assert!(
            err.contains("contextTokens") || err.contains("invalid type"),
            "{err}"
        );
        let err = s
            .apply(&json!({"completionMode": "popup"}))
            .expect_err("unknown mode");
        assert!(err.contains("popup"), "{err}");
        assert_eq!(s, before);
    }
}
