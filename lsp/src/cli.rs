//! Command-line parsing and the one-shot commands `complete` and `generate`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use phi_engine::{Engine, GenerateParams, Job, JobOutcome, Prompt, Worker, WorkerOptions};
use ropey::Rope;

use crate::completion::{backend, prepared};
use crate::convert::{self, PositionEncoding};
use crate::remote::Remote;
use crate::settings::{ModelSpec, Settings};
use crate::{loading, server};

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
    /// auto, f32, f16, bf16, q8_0 or q4k (q8_0/q4k quantize 2-D weights while loading; auto is
    /// q8_0 on CPU and f16 on a GPU).
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
    Bench(crate::bench::BenchArgs),
    /// Weights plus KV cache memory per dtype and context size.
    Memory(MemoryArgs),
    /// Write a quantized GGUF file that phi-lsp and llama.cpp load.
    Quantize(crate::quantize::QuantizeArgs),
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
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Print {"prompt_tokens":[..],"tokens":[..],"text":".."} on one line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    // Before any candle work: rayon's global pool and candle's own pool read these once.
    if let Some(threads) = cli.threads {
        if threads == 0 {
            bail!("--threads {threads}: use 1 or more (threads for the model's CPU work)");
        }
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let local_only = match &cli.command {
        Some(Command::Generate(_)) => Some("generate"),
        Some(Command::Bench(_)) => Some("bench"),
        Some(Command::Memory(_)) => Some("memory"),
        Some(Command::Quantize(_)) => Some("quantize"),
        _ => None,
    };
    if let (Some(command), false) = (local_only, cli.model.spec().is_local()) {
        bail!(
            "phi-lsp {command} works on the model in this process; --backend {} applies to the server and `complete` only",
            cli.model.backend
        );
    }
    match cli.command {
        Some(Command::Complete(args)) => complete(&cli.model, args),
        Some(Command::Generate(args)) => generate(&cli.model, args),
        Some(Command::Bench(args)) => crate::bench::run(&cli.model, args),
        Some(Command::Memory(args)) => crate::memory::run(&cli.model, args),
        Some(Command::Quantize(args)) => crate::quantize::run(&cli.model, args),
        None => serve(&cli.model),
    }
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

/// Logs go to stderr (stdout is the LSP transport), filtered by `PHI_LSP_LOG` or `RUST_LOG`.
fn init_logging() {
    let filter = std::env::var("PHI_LSP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn serve(model: &ModelArgs) -> Result<()> {
    init_logging();
    // Names are checked now so a typo in the editor's command line is reported at once.
    loading::parse_device(&model.device)?;
    loading::parse_dtype(&model.dtype)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(server::serve_stdio(Settings::new(model.spec())));
    // A blocking read of stdin may still be pending; do not wait for it (nor for a generation in
    // flight): the client has said exit or gone away.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}

/// The model thread for a one-shot command: one slot of `capacity` positions.
fn one_slot_worker(engine: Engine, capacity: usize) -> Result<Worker> {
    let options = WorkerOptions {
        max_slots: 1,
        slot_capacity: capacity,
    };
    Ok(Worker::spawn(engine, options)?)
}

/// One completion by the model in this process.
fn generate_local(settings: &Settings, prepared: &prepared::Prepared) -> Result<backend::Generated> {
    let engine = loading::load(&settings.model, None)?;
    let capacity = settings
        .context_tokens
        .min(engine.model.config().max_position_embeddings);
    let worker = one_slot_worker(engine, capacity)?;
    let job = backend::job(&worker, capacity, prepared.request("cli", settings))?;
    match backend::answer(worker.run(job)) {
        Ok(Some(generated)) => Ok(generated),
        Ok(None) => bail!("the completion was dropped"),
        Err(e) => bail!("the completion failed: {e:?}"),
    }
}

fn complete(model: &ModelArgs, args: CompleteArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("{}: cannot read the file", args.file.display()))?;
    let rope = Rope::from_str(&text);
    let pos = convert::Pos {
        line: args.line,
        character: args.character,
    };
    let cursor = convert::pos_to_char(&rope, pos, PositionEncoding::Utf16).with_context(|| {
        format!(
            "{}: position {}:{}",
            args.file.display(),
            args.line,
            args.character
        )
    })?;
    let mut settings = Settings::new(model.spec());
    let options = &args.options;
    let update = serde_json::json!({
        "maxNewTokens": options.max_new_tokens,
        "deadlineMs": options.deadline_ms,
        "contextTokens": options.context_tokens,
    });
    settings.apply(&update).map_err(anyhow::Error::msg)?;
    let prepared = prepared::prepare(&rope, cursor, &settings);
    let generation = if prepared.window.text.is_empty() {
        None
    } else if settings.model.is_local() {
        Some(generate_local(&settings, &prepared)?)
    } else {
        let remote = Remote::new(&settings.model.backend, &settings.model.model)?;
        Some(remote.generate(prepared.request("cli", &settings), &|| false)?)
    };
    let suggestion = generation.as_ref().and_then(|g| prepared.suggestion(&g.text));
    let text = suggestion.unwrap_or_default();
    if args.json {
        let out = serde_json::json!({
            "text": text,
            "raw": generation.as_ref().map(|g| g.text.as_str()),
            "prompt_tokens": generation.as_ref().map(|g| g.stats.prompt_tokens),
            "generated_tokens": generation.as_ref().map(|g| g.stats.generated_tokens),
            "stop": generation.as_ref().map(|g| format!("{:?}", g.stop)),
        });
        print_line(&out.to_string());
    } else {
        print_line(&text);
    }
    Ok(())
}

pub fn load_engine(args: &ModelArgs) -> Result<Engine> {
    loading::load(&args.spec(), None)
}

fn generate(model: &ModelArgs, args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the prompt file", path.display()))?,
        (None, None) => bail!("pass --prompt TEXT or --prompt-file FILE"),
    };
    let engine = load_engine(model)?;
    let capacity = engine.model.config().max_position_embeddings;
    let worker = one_slot_worker(engine, capacity)?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    };
    let job = Job {
        key: "cli".into(),
        prompt: Prompt::Text(prompt),
        params,
        stop: None,
    };
    let generation = match worker.run(job)? {
        JobOutcome::Finished(generation) => generation,
        JobOutcome::Dropped => bail!("the generation was dropped"),
    };
    let out = if args.json {
        #[derive(serde::Serialize)]
        struct Output<'a> {
            prompt_tokens: &'a [u32],
            tokens: &'a [u32],
            text: &'a str,
        }
        let output = Output {
            prompt_tokens: &generation.prompt_tokens,
            tokens: &generation.tokens,
            text: &generation.text,
        };
        serde_json::to_string(&output)?
    } else {
        generation.text
    };
    print_line(&out);
    Ok(())
}

/// The one-shot commands print their result on stdout (the server never does).
#[allow(clippy::print_stdout)]
pub fn print_line(text: &str) {
    println!("{text}");
}
