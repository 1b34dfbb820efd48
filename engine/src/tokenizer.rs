//! The `tokenizers` wrapper: plain-text encoding (no special tokens added), the end-of-text id, the
//! size of the real vocabulary (the model's embedding may be larger), and streaming decoding.

use std::path::Path;

use crate::error::{EngineError, Result};

pub const END_OF_TEXT: &str = "<|endoftext|>";

pub struct PhiTokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: Option<u32>,
    size: usize,
}

impl PhiTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::Load {
                path: path.to_path_buf(),
                message: "no tokenizer.json here: pass --tokenizer or use a Hugging Face model folder".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| EngineError::Load {
            path: path.to_path_buf(),
            message: format!("not a usable tokenizer.json ({e}): re-download it from the model repository"),
        })?;
        Ok(Self::new(inner))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Self::new(inner))
    }

    fn new(inner: tokenizers::Tokenizer) -> Self {
        let eos_id = inner.token_to_id(END_OF_TEXT);
        let size = inner.get_vocab_size(true);
        PhiTokenizer { inner, eos_id, size }
    }

    /// `<|endoftext|>` (50256 for Phi-1), where the vocabulary has it.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids `size..` exist in the model's embedding but not in the vocabulary; they are never sampled.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
}

/// Turns generated ids into text deltas that never end in half a UTF-8 character: byte-level BPE
/// can split one character over several tokens, which decode to U+FFFD until the last one arrives.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    text: String,
}

impl TextStream {
    /// Adds one id and returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &PhiTokenizer, id: u32) -> Result<&str> {
        self.ids.push(id);
        let full = tokenizer.decode(&self.ids)?;
        let start = self.text.len();
        if full.ends_with('\u{FFFD}') || !full.starts_with(self.text.as_str()) {
            return Ok("");
        }
        self.text = full;
        Ok(&self.text[start..])
    }

    /// All complete text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The final text, including a trailing incomplete character as U+FFFD if generation ended there.
    pub fn finish(self, tokenizer: &PhiTokenizer) -> Result<String> {
        tokenizer.decode(&self.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn real_tokenizer() -> PhiTokenizer {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/phi-1/tokenizer.json");
        PhiTokenizer::from_file(&path).expect("the repository's copy of the Phi-1 tokenizer loads")
    }

    #[test]
    fn real_phi_1_ids() {
        let tok = real_tokenizer();
        assert_eq!(
            tok.encode("\n    return x").expect("encodes"),
            vec![198, 50284, 7783, 2124]
        );
        assert_eq!(tok.encode("retur").expect("encodes"), vec![1186, 333]);
        assert_eq!(tok.encode("return").expect("encodes"), vec![7783]);
        assert_eq!(tok.eos_id(), Some(50256));
        assert_eq!(tok.size(), 50295);
    }

    #[test]
    fn stream_never_emits_half_a_character() {
        let tok = real_tokenizer();
        let text = "def f():\n    return \"héllo 😀 世界 — ünïcödé\"  # 🐍🐍\n";
        let ids = tok.encode(text).expect("encodes");
        // The emoji and CJK characters take several byte-level tokens each.
        assert!(ids.len() > text.chars().count() / 2);
        let mut stream = TextStream::default();
        let mut joined = String::new();
        for id in ids {
            let delta = stream.push(&tok, id).expect("decodes").to_string();
            assert!(!delta.contains('\u{FFFD}'), "half a character emitted: {delta:?}");
            joined.push_str(&delta);
        }
        assert_eq!(joined, text);
        assert_eq!(stream.finish(&tok).expect("decodes"), text);
    }
}
