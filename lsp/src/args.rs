//! The command line, parsed: every flag of every command in one place, so the commands' modules
//! (`cli`, `bench`, `memory`, `quantize`) take their arguments from here and none imports another.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::ModelSpec;

#[derive(Parser, Debug)]
#[command(
    name = "phi-lsp",
    version,
    about = "Phi-1 code completions over the Language Server Protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serve on stdio (the default; accepted because editors pass it).
    #[arg(long, global = true)]
    pub stdio: bool,
    /// Threads for the model's CPU work (default: the physical cores). On a busy machine fewer can
    /// be faster: candle's workers wait for each other by spinning.
    #[arg(long, global = true, env = "PHI_LSP_THREADS")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model folder (config.json, tokenizer.json, model.safetensors), a .gguf file, or a Hugging
    /// Face id (owner/name[@revision]) found in the HF cache or downloaded into it.
    #[arg(long, global = true, env = "PHI_LSP_MODEL", default_value = "microsoft/phi-1")]
    pub model: String,
    /// tokenizer.json to use instead of the model folder's.
    #[arg(long, global = true)]
    pub tokenizer: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N or metal (GPUs need a build with the cuda or metal feature; auto
    /// takes one when the build has it and the machine too, else the CPU).
    #[arg(long, global = true, env = "PHI_LSP_DEVICE", default_value = "auto")]
    pub device: String,
    /// auto, f32, f16, bf16, q8_0, q4k or q4_k_m (the quantized ones quantize 2-D weights while
    /// loading; q4_k_m is llama.cpp's Q4_K_M mix of q4k and q6k; auto is q8_0 on CPU and f16 on a
    /// GPU).
    #[arg(long, global = true, env = "PHI_LSP_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// `local`, or the URL of an OpenAI-compatible server (vLLM, TGI, llama.cpp) that generates
    /// instead, e.g. http://127.0.0.1:8000/v1; --model is then the name it serves and the key, if
    /// any, is read from PHI_LSP_API_KEY.
    #[arg(long, global = true, env = "PHI_LSP_BACKEND", default_value = "local")]
    pub backend: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The suggestion the server would give at a position of a file.
    Complete(CompleteArgs),
    /// Raw greedy continuation of a prompt, no post-processing.
    Generate(GenerateArgs),
    /// Prefill, decode, keystroke and memory figures for a model or synthetic Phi-1 weights.
    Bench(BenchArgs),
    /// Weights plus KV cache memory per dtype and context size.
    Memory(MemoryArgs),
    /// Write a quantized GGUF file that phi-lsp and llama.cpp load.
    Quantize(QuantizeArgs),
}

#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CompleteArgs {
    pub file: PathBuf,
    /// 0-based line (LSP).
    #[arg(long)]
    pub line: u32,
    /// 0-based character in UTF-16 code units (LSP's default encoding).
    #[arg(long)]
    pub character: u32,
    #[command(flatten)]
    pub options: CompletionOptions,
    /// Print {"text": "...", ...} on one line.
    #[arg(long)]
    pub json: bool,
}

/// The server's completion settings, as flags (defaults are the server's).
#[derive(Args, Debug, Clone)]
pub struct CompletionOptions {
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    #[arg(long)]
    pub context_tokens: Option<usize>,
    /// Heal the prompt's last token inside a word or after a dot (`tokenHealing`): `true` or `false`.
    #[arg(long)]
    pub token_healing: Option<bool>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompt-lookup drafts verified per decode pass (0: one token per pass); the tokens are the same.
    #[arg(long, default_value_t = phi_engine::DEFAULT_DRAFT)]
    pub draft: usize,
    /// Print {"prompt_tokens":[..],"tokens":[..],"text":".."} on one line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The GGUF file to write; its type is the global --dtype (q4k, q8_0, f16, bf16 or f32).
    #[arg(short = 'o', long = "output", value_name = "OUT.gguf")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Random weights of this model's exact shape (only `phi-1`) instead of --model; the global
    /// --dtype takes a comma-separated list here (f32,q8_0,q4k).
    #[arg(long, value_name = "SHAPE")]
    pub synthetic: Option<String>,
    /// Runs of each measurement; the median and the spread (min..max) are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// One JSON object per dtype per line.
    #[arg(long)]
    pub json: bool,
    /// Skip the keystroke through the real server.
    #[arg(long)]
    pub skip_server: bool,
    /// Keystrokes sent to the server (each a didChange and an inlineCompletion).
    #[arg(long, default_value_t = 8)]
    pub keystrokes: usize,
    /// Tokens generated per decode run.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Size of the buffer the read-bandwidth loop streams (must be far larger than the caches).
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Also time the pieces of a forward pass (matmuls by kind, attention, RoPE, cache append)
    /// on a separate synthetic weight set, against the measured decode and prefill.
    #[arg(long)]
    pub profile: bool,
    /// Prompt-lookup drafts per decode pass in the keystroke runs, the drafted decode run and the
    /// replay (0: one token per pass); the decode figure itself is always plain decoding.
    #[arg(long, default_value_t = phi_engine::DEFAULT_DRAFT)]
    pub draft: usize,
    /// Also replay a problem set through the server's completion code, each next token scripted
    /// to its canonical body (only `humaneval`: the built-in HumanEval), with and without drafts.
    #[arg(long, value_name = "SET")]
    pub replay: Option<String>,
    /// Replay only the first N problems.
    #[arg(long, value_name = "N")]
    pub replay_limit: Option<usize>,
    /// Also run a scripted editing session through the server at 5 characters a second (two long
    /// modules made of HumanEval's problems; type deep in one, 600 lines up, in the other, back):
    /// how long each pause waits for its answer, and how much of that was prefill.
    #[arg(long)]
    pub session: bool,
}

impl ModelArgs {
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model: self.model.clone(),
            tokenizer: self.tokenizer.as_ref().map(|p| p.display().to_string()),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            backend: self.backend.clone(),
        }
    }
}
