//! What each command does: serve LSP on stdio (the default), or run one command (`complete` and
//! `generate` here; `bench`, `memory` and `quantize` in their own modules). The flags are `args`.

use anyhow::{bail, Context, Result};
use phi_engine::{Engine, GenerateParams, Job, JobOutcome, Prompt, Worker, WorkerOptions};
use ropey::Rope;

use crate::args::{Cli, Command, CompleteArgs, GenerateArgs, ModelArgs};
use crate::completion::{backend, prepared, Workspace};
use crate::convert::{self, PositionEncoding};
use crate::remote::Remote;
use crate::settings::Settings;
use crate::stdout::print_line;
use crate::{bench, loading, memory, quantize, transport};

/// Runs the command `cli` names (the server when it names none).
pub fn dispatch(cli: Cli) -> Result<()> {
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
        Some(Command::Bench(args)) => bench::benchmark(&cli.model, args),
        Some(Command::Memory(args)) => memory::print_memory_table(&cli.model, args),
        Some(Command::Quantize(args)) => quantize::write_gguf(&cli.model, args),
        None => serve(&cli.model),
    }
}

/// The server's log level unless `PHI_LSP_LOG` or `RUST_LOG` says otherwise. Editors show
/// everything a server writes to stderr as errors (Neovim's lsp.log, Helix's log), so the default
/// is warnings and errors only; what users should see anyway goes to `window/logMessage`.
pub const DEFAULT_LOG_FILTER: &str = "warn";

/// Logs go to stderr (stdout is the LSP transport), filtered by `PHI_LSP_LOG` or `RUST_LOG`.
fn init_logging() {
    let filter = std::env::var("PHI_LSP_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.to_string());
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
    runtime.block_on(transport::serve_stdio(Settings::new(model.spec())));
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
    let backend::LocalJob { job, healed, prompt } =
        backend::job(&worker, capacity, prepared.request("cli", settings))?;
    match backend::answer(worker.submit_and_wait(job), healed.as_deref(), &prompt) {
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
        "tokenHealing": options.token_healing,
    });
    settings.apply(&update).map_err(anyhow::Error::msg)?;
    // One file, no other open documents: nothing is imported from them.
    let prepared = prepared::prepare("cli", &rope, cursor, &Workspace::default(), &settings);
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
            "prompt": generation.as_ref().and_then(|g| g.prompt.as_deref()),
            "healed": generation.as_ref().and_then(|g| g.healed.as_deref()),
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
        draft: args.draft,
        ..Default::default()
    };
    let job = Job {
        key: "cli".into(),
        prompt: Prompt::Text(prompt),
        params,
        stop: None,
        progress: None,
    };
    let generation = match worker.submit_and_wait(job)? {
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
