//! The engine's error type: one variant per cause. Cancellation is an outcome, not an error.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model file is missing, unreadable or does not match what it should hold.
    #[error("{}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model thread is gone (it panicked or was shut down).
    #[error("the model worker has stopped: {0}")]
    Worker(String),
}
