//! The `tokenizers` wrapper: plain-text encoding (no special tokens added), the end-of-text id, the
//! size of the real vocabulary (the model's embedding may be larger), every token's bytes (for
//! token healing), and streaming decoding.

use std::path::Path;

use crate::error::{EngineError, Result};

pub const END_OF_TEXT: &str = "<|endoftext|>";

pub struct PhiTokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: Option<u32>,
    size: usize,
    /// Each id's bytes as decoding writes them; `None` for special tokens and ids without a token.
    bytes: Vec<Option<Box<[u8]>>>,
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
        let bytes = token_bytes_table(&inner, size);
        PhiTokenizer {
            inner,
            eos_id,
            size,
            bytes,
        }
    }

    /// `<|endoftext|>` (50256 for Phi-1), where the vocabulary has it.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids `size..` exist in the model's embedding but not in the vocabulary; they are never sampled.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The bytes token `id` decodes to: for a byte-level BPE, a token may be part of a UTF-8
    /// character. `None` for special tokens (`<|endoftext|>`) and ids the tokenizer lacks.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// The ids a token-healed generation may produce next while `remaining` of the healed text is
    /// not yet written: those whose bytes [`heals`] it, in increasing order.
    pub fn healing_ids(&self, remaining: &[u8]) -> Vec<u32> {
        self.bytes
            .iter()
            .enumerate()
            .filter(|(_, bytes)| bytes.as_deref().is_some_and(|b| heals(b, remaining)))
            .map(|(id, _)| id as u32)
            .collect()
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

/// Whether a token of `token` bytes may come next while `remaining` bytes of the healed text are
/// still to be written: it starts with all of them (and goes on), or it is a non-empty prefix of
/// them (and uses that much up).
pub fn heals(token: &[u8], remaining: &[u8]) -> bool {
    !token.is_empty() && (token.starts_with(remaining) || remaining.starts_with(token))
}

/// Every id's bytes. Added tokens decode to their content, except special ones, which are never
/// text the user typed. Model tokens of a byte-level BPE are strings of the GPT-2 byte alphabet,
/// mapped back byte for byte; with any other decoder a token is its decoded text, and a token that
/// does not decode to whole characters on its own is left out.
fn token_bytes_table(inner: &tokenizers::Tokenizer, size: usize) -> Vec<Option<Box<[u8]>>> {
    let added = inner.get_added_tokens_decoder();
    let byte_level = matches!(
        inner.get_decoder(),
        Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
    );
    let unicode_to_byte = gpt2_unicode_to_byte();
    (0..size as u32)
        .map(|id| {
            if let Some(token) = added.get(&id) {
                return (!token.special).then(|| token.content.as_bytes().into());
            }
            let token = inner.id_to_token(id)?;
            if byte_level {
                token
                    .chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .map(Vec::into_boxed_slice)
            } else {
                let text = inner.decode(&[id], false).ok()?;
                (!text.contains('\u{FFFD}')).then(|| text.into_bytes().into_boxed_slice())
            }
        })
        .collect()
}

/// The inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes for U+0100 onwards, in byte order.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
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
    fn the_healing_rule() {
        // Starts with what is left, or is a non-empty prefix of it.
        assert!(heals(b"return", b"ret"));
        assert!(heals(b"ret", b"ret"));
        assert!(heals(b"re", b"ret"));
        assert!(!heals(b"rex", b"ret"));
        assert!(!heals(b" ret", b"ret"));
        assert!(!heals(b"", b"ret"));
    }

    #[test]
    fn token_bytes_of_the_real_tokenizer() {
        let tok = real_tokenizer();
        // Decoding each id alone writes exactly its bytes, wherever that is whole characters.
        for id in (0..tok.size() as u32).step_by(97) {
            let Some(bytes) = tok.token_bytes(id) else {
                assert_eq!(Some(id), tok.eos_id(), "only the special token has no bytes");
                continue;
            };
            if let Ok(text) = std::str::from_utf8(bytes) {
                assert_eq!(tok.decode(&[id]).expect("decodes"), text, "id {id}");
            }
        }
        assert_eq!(tok.token_bytes(50256), None);
        assert_eq!(tok.token_bytes(7783), Some(&b"return"[..]));
        // An added run of spaces is its content.
        assert_eq!(tok.token_bytes(50284), Some(&b"    "[..]));
        // Ids past the tokenizer (the model has 51,200 rows) have none.
        assert_eq!(tok.token_bytes(51_000), None);
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
