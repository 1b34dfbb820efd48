//! phi-engine: Microsoft's Phi-1 on candle, with a KV cache that keeps the unchanged prefix. The
//! model and nothing else: no LSP, no JSON-RPC, no async runtime.

pub mod cache;
pub mod config;
pub mod cpu;
pub mod draft;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hugepages;
mod kernels;
pub mod model;
mod qmatmul;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod simd;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;
pub mod worker;

pub use candle_core::{DType, Device};
pub use config::PhiConfig;
pub use error::{EngineError, Result};
pub use generate::{
    generate, GenerateParams, Generation, GenerationStats, Sampling, Slot, StopReason, SyncOutcome,
    SyncStats, Watch, DEFAULT_DRAFT,
};
pub use model::PhiModel;
pub use tokenizer::{PhiTokenizer, TextStream};
pub use weights::{Engine, ModelFiles, WeightDType};
pub use worker::{Job, JobOutcome, ProgressFn, Prompt, Ticket, Worker, WorkerOptions, WorkerStats};
