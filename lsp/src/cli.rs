//! Command-line parsing and the one-shot commands. The contract is DESIGN.md's CLI section.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use phi_engine::{
    DType, Device, Engine, GenerateParams, Job, JobOutcome, ModelFiles, Prompt, Worker, WorkerOptions,
};

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
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, tokenizer.json, model.safetensors).
    #[arg(long, global = true, env = "PHI_LSP_MODEL", default_value = "microsoft/phi-1")]
    pub model: String,
    /// tokenizer.json to use instead of the model folder's.
    #[arg(long, global = true)]
    pub tokenizer: Option<PathBuf>,
    /// cpu (the default build has no GPU backend).
    #[arg(long, global = true, env = "PHI_LSP_DEVICE", default_value = "cpu")]
    pub device: String,
    /// f32 (weights are converted to it on load).
    #[arg(long, global = true, env = "PHI_LSP_DTYPE", default_value = "f32")]
    pub dtype: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Raw greedy continuation of a prompt, no post-processing.
    Generate(GenerateArgs),
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
    match cli.command {
        Some(Command::Generate(args)) => generate(&cli.model, args),
        None => bail!("serving is not built yet: use `phi-lsp generate`"),
    }
}

pub fn load_engine(args: &ModelArgs) -> Result<Engine> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        other => bail!("unknown device {other:?}: use cpu"),
    };
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        other => bail!("unknown dtype {other:?}: use f32"),
    };
    let dir = PathBuf::from(&args.model);
    let files = ModelFiles::from_dir(&dir, args.tokenizer.as_deref())?;
    Ok(Engine::load(&files, &device, dtype)?)
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
    let worker = Worker::spawn(
        engine,
        WorkerOptions {
            max_slots: 1,
            slot_capacity: capacity,
        },
    )?;
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
fn print_line(text: &str) {
    println!("{text}");
}
