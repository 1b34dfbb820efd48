//! The keystroke document both keystroke runs use (in process and through the server): a prefix
//! of real Python and the characters the user types next.

use anyhow::{bail, Result};
use phi_engine::{PhiConfig, PhiTokenizer};

use super::PROMPT_TOKENS;

/// About 4 KB of ordinary Python (HumanEval-style functions with docstrings): its first 512 Phi-1
/// tokens are the keystroke document, and the characters after them are what gets typed.
const PYTHON_SOURCE: &str = include_str!("keystroke_source.py");

/// Python source for the keystroke: a prefix of ~512 tokens, and what the user types next.
pub struct KeystrokeText {
    pub prefix: String,
    pub prefix_ids: Vec<u32>,
    pub typed: Vec<char>,
}

/// [`PROMPT_TOKENS`], or half the model's context where that is less (a small test model), so the
/// decode runs and the keystrokes after the prompt fit.
pub fn prompt_tokens(cfg: &PhiConfig) -> usize {
    PROMPT_TOKENS.min(cfg.max_position_embeddings / 2)
}

impl KeystrokeText {
    pub fn new(tokenizer: &PhiTokenizer, n_typed: usize, prompt_tokens: usize) -> Result<Self> {
        let ids = tokenizer.encode(PYTHON_SOURCE)?;
        if ids.len() < prompt_tokens + 8 {
            bail!(
                "the built-in Python source has only {} tokens with this tokenizer",
                ids.len()
            );
        }
        let prefix = tokenizer.decode(&ids[..prompt_tokens])?;
        let Some(rest) = PYTHON_SOURCE.strip_prefix(prefix.as_str()) else {
            bail!("this tokenizer does not round-trip the built-in Python source");
        };
        let typed: Vec<char> = rest.chars().cycle().take(n_typed).collect();
        let prefix_ids = tokenizer.encode(&prefix)?;
        Ok(KeystrokeText {
            prefix,
            prefix_ids,
            typed,
        })
    }

    /// The document after `n` keystrokes.
    pub fn after(&self, n: usize) -> String {
        let mut text = self.prefix.clone();
        text.extend(&self.typed[..n]);
        text
    }
}
