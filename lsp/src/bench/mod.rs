//! `phi-lsp bench`: prefill, decode, keystroke (in process and through the real server over stdio)
//! and peak memory for one model at one or more dtypes, with the machine and the read bandwidth it
//! measured, so decode speed is shown against its physical ceiling. Progress goes to stderr,
//! results to stdout (a table, or one JSON object per dtype with `--json`).
//!
//! One module per job: [`target`] (what is benchmarked), [`machine`] (the CPU), [`bandwidth`],
//! [`rss`], [`in_process`] and [`server`] (the runs), [`replay`] (HumanEval through the completion
//! code), [`session`] (a scripted editing session through the server), [`profile`], [`stats`] and
//! [`report`].

mod bandwidth;
mod in_process;
mod keystroke;
mod machine;
mod profile;
mod replay;
mod report;
mod rss;
mod server;
mod session;
mod stats;
mod target;

use std::time::Instant;

use anyhow::{bail, Result};
use phi_engine::WeightDType;
use serde_json::Value;

use crate::args::{BenchArgs, ModelArgs};
use crate::loading;
use crate::settings::ModelSpec;
use crate::stdout::print_line;
use bandwidth::{measure_bandwidth, Bandwidth};
use keystroke::{prompt_tokens, KeystrokeText};
use machine::Machine;
use report::Measured;
use target::Target;

/// Prompt length for prefill, decode context and the keystroke document (shorter for models whose
/// context could not hold it and what follows: [`prompt_tokens`]).
const PROMPT_TOKENS: usize = 512;
/// First-token latency prompt.
const SHORT_PROMPT_TOKENS: usize = 16;
/// Tokens of the first suggestion line, in process and through the server.
const LINE_TOKENS: usize = 8;
/// KV positions of the bench's slots.
const SLOT_CAPACITY: usize = 1024;

/// Benchmarks the model `--model` (or `--synthetic`) names at each `--dtype` of the list.
pub fn benchmark(model: &ModelArgs, args: BenchArgs) -> Result<()> {
    // The global --threads has been applied (cli::dispatch) before any candle work.
    let threads = phi_engine::synthetic::candle_threads();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let device = loading::parse_device(&model.device)?;
    let dtypes = model
        .dtype
        .split(',')
        .map(|name| loading::resolve_dtype(name.trim(), &device))
        .collect::<Result<Vec<_>>>()?;
    if args.replay.as_deref().is_some_and(|set| set != "humaneval") {
        bail!("--replay: the only problem set is `humaneval`");
    }
    let target = Target::resolve(model, &args)?;
    let machine = Machine::detect();
    progress(&format!(
        "bench: {} ({}), {threads} threads, {}",
        machine.cpu, machine.features, target.description
    ));

    if !args.json {
        print_line(&format!(
            "phi-lsp bench: {}, {threads} threads ({}); {}; read bandwidth over {} MiB (the best of several methods), measured before and after each dtype's runs",
            machine.cpu, machine.features, target.description, args.bandwidth_mib
        ));
    }

    for dtype in dtypes {
        // The machine's bandwidth moves by a quarter over minutes here (shared hosts): each
        // dtype's ceiling uses what was measured around its own runs. Before the peak-memory
        // reset, so the buffer does not count in the dtype's peak.
        let before = measure_bandwidth(args.bandwidth_mib, threads);
        rss::reset_peak_rss();
        let report = measure_dtype(&target, dtype, &args, threads, &machine, before)?;
        if args.json {
            print_line(&report.to_string());
        } else {
            print_line(&report::table(&report));
        }
    }
    Ok(())
}

/// Loads the model at `dtype` and runs every measurement of it: the dtype's report.
fn measure_dtype(
    target: &Target,
    dtype: WeightDType,
    args: &BenchArgs,
    threads: usize,
    machine: &Machine,
    bandwidth_before: Bandwidth,
) -> Result<Value> {
    let name = dtype.name();
    let spec = ModelSpec {
        dtype: name.into(),
        ..target.spec.clone()
    };
    progress(&format!("{name}: building the model"));
    let start = Instant::now();
    let engine = loading::load(&spec, None)?;
    let build_s = start.elapsed().as_secs_f64();
    progress(&format!("{name}: built in {build_s:.1} s"));
    // A GGUF file holds its own type (`--dtype` does not apply to it): label and count by that.
    let dtype = match WeightDType::parse(&engine.dtype) {
        Some(stored) if spec.model.ends_with(".gguf") => stored,
        _ => dtype,
    };
    let name = dtype.name();
    let cfg = engine.model.config().clone();
    let prompt_tokens = prompt_tokens(&cfg);
    if prompt_tokens < PROMPT_TOKENS {
        progress(&format!(
            "{name}: the model's context is {} positions: prompts of {prompt_tokens} tokens instead of {PROMPT_TOKENS}",
            cfg.max_position_embeddings
        ));
    }

    let text = KeystrokeText::new(
        engine.tokenizer.as_ref(),
        args.repeats.max(args.keystrokes),
        prompt_tokens,
    )?;
    let runs = in_process::measure_in_process(&engine, dtype, args, &text)?;
    let peak_rss = rss::peak_rss_bytes(None);
    // With the model still loaded: how much of it (the weights, mostly) sits in huge pages.
    let anon_huge_pages = phi_engine::hugepages::anon_huge_pages_bytes();
    let replay = match &args.replay {
        Some(_) => {
            let problems = replay::humaneval(args.replay_limit)?;
            progress(&format!(
                "{name}: replaying {} HumanEval problems",
                problems.len()
            ));
            Some(replay::replay(engine, &spec, &problems, args.draft.max(1))?.json())
        }
        None => {
            drop(engine);
            None
        }
    };
    let bandwidth_after = measure_bandwidth(args.bandwidth_mib, threads);

    let profile = if args.profile {
        Some(profile::profile_stages(&cfg, dtype, &spec.device, args, &runs)?)
    } else {
        None
    };

    let server = if args.skip_server {
        None
    } else {
        Some(server::server_keystrokes(&spec, threads, args, &text)?)
    };

    let session = if args.session {
        Some(session::session(&spec, threads, &replay::humaneval(None)?)?.json())
    } else {
        None
    };

    let mut report = Measured {
        dtype,
        threads,
        machine,
        model: &target.description,
        repeats: args.repeats,
        build_s,
        cfg,
        runs,
        peak_rss,
        anon_huge_pages,
        bandwidth_before,
        bandwidth_after,
        profile,
        server,
    }
    .json();
    if let Value::Object(map) = &mut report {
        for extra in [replay, session].into_iter().flatten() {
            if let Value::Object(extra) = extra {
                map.extend(extra);
            }
        }
    }
    Ok(report)
}

/// Progress goes to stderr (stdout holds the results).
fn progress(message: &str) {
    eprintln!("phi-lsp bench: {message}");
}
