//! GGUF files (being written).

use std::path::Path;

use crate::error::{EngineError, Result};
use crate::weights::Engine;
use candle_core::Device;

/// Loads a GGUF file: llama.cpp's `phi2` naming (with metadata) or the mixformer naming of the
/// Phi-1 GGUF files published for candle (no metadata: shapes decide).
pub fn load(path: &Path, tokenizer: &Path, device: &Device) -> Result<Engine> {
    let _ = (tokenizer, device);
    Err(EngineError::Load {
        path: path.to_path_buf(),
        message: "GGUF loading is being written".into(),
    })
}
