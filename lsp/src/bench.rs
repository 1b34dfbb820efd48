//! `phi-lsp bench`: prefill, decode, keystroke (in process and through the real server over stdio)
//! and peak memory for one model at one or more dtypes, with the machine and the read bandwidth it
//! measured, so decode speed is shown against its physical ceiling. Progress goes to stderr,
//! results to stdout (a table, or one JSON object per dtype with `--json`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use phi_engine::{generate, Engine, GenerateParams, PhiConfig, Slot, SyncOutcome, WeightDType};
use serde_json::{json, Value};

use crate::args::{BenchArgs, ModelArgs};
use crate::loading;
use crate::settings::ModelSpec;
use crate::stdout::print_line;

/// Prompt length for prefill, decode context and the keystroke document (shorter for models whose
/// context could not hold it and what follows: [`prompt_tokens`]).
const PROMPT_TOKENS: usize = 512;
/// First-token latency prompt.
const SHORT_PROMPT_TOKENS: usize = 16;
/// Tokens of the first suggestion line, in process and through the server.
const LINE_TOKENS: usize = 8;
/// KV positions of the bench's slots.
const SLOT_CAPACITY: usize = 1024;
/// Bandwidth passes over the buffer.
const BANDWIDTH_PASSES: usize = 8;

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
    let target = Target::resolve(model, &args)?;
    let machine = Machine::detect();
    progress(&format!(
        "bench: {} ({}), {threads} threads, {}",
        machine.cpu, machine.features, target.description
    ));

    if !args.json {
        print_line(&format!(
            "phi-lsp bench: {}, {threads} threads ({}); {}; read bandwidth over {} MiB, measured before and after each dtype's runs",
            machine.cpu, machine.features, target.description, args.bandwidth_mib
        ));
    }

    for dtype in dtypes {
        // The machine's bandwidth moves by a quarter over minutes here (shared hosts): each
        // dtype's ceiling uses what was measured around its own runs. Before the peak-memory
        // reset, so the buffer does not count in the dtype's peak.
        let before = measure_bandwidth(&args, threads);
        reset_peak_rss();
        let report = bench_dtype(&target, dtype, &args, threads, &machine, before)?;
        if args.json {
            print_line(&report.to_string());
        } else {
            print_line(&human(&report));
        }
    }
    Ok(())
}

/// What is benchmarked: the model spec (as the server is started with it) and its shape.
struct Target {
    spec: ModelSpec,
    description: String,
}

impl Target {
    fn resolve(model: &ModelArgs, args: &BenchArgs) -> Result<Self> {
        let synthetic = match args.synthetic.as_deref() {
            Some("phi-1") => true,
            Some(other) => bail!("unknown synthetic shape {other:?}: only phi-1 is known"),
            None => model.model == loading::SYNTHETIC_PHI_1,
        };
        let mut spec = model.spec();
        // The server runs in another folder's view of relative paths: pass absolute ones.
        let absolute = |p: &str| -> String {
            std::fs::canonicalize(p)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| p.to_string())
        };
        spec.tokenizer = spec.tokenizer.as_deref().map(absolute);
        if synthetic {
            spec.model = loading::SYNTHETIC_PHI_1.into();
            if spec.tokenizer.is_none() {
                let default = Path::new("../shared/phi-1-tokenizer/tokenizer.json");
                if !default.is_file() {
                    bail!("synthetic weights need --tokenizer (the Phi-1 tokenizer.json): the keystroke prompt is real Python");
                }
                progress(&format!("using the tokenizer at {}", default.display()));
                spec.tokenizer = Some(absolute(&default.display().to_string()));
            }
        } else if Path::new(&spec.model).exists() {
            spec.model = absolute(&spec.model);
        }
        let description = if synthetic {
            format!(
                "synthetic phi-1 weights (seed 0, {} parameters)",
                PhiConfig::phi_1().n_params()
            )
        } else {
            format!("model {}", spec.model)
        };
        Ok(Target { spec, description })
    }
}

struct Machine {
    cpu: String,
    features: String,
}

impl Machine {
    fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| -> Option<String> {
            cpuinfo.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown cpu".into());
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let features = [
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512_vnni",
            "avx_vnni",
            "amx_int8",
        ]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect::<Vec<_>>()
        .join(" ");
        Machine { cpu, features }
    }
}

/// Median and range of repeated measurements.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        Spread {
            median: phi_engine::synthetic::median(sorted.clone()),
            min: sorted[0],
            max: sorted[n - 1],
            n,
        }
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    fn percentile(values: &[f64], p: f64) -> f64 {
        let mut sorted: Vec<f64> = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1]
    }

    fn json(&self) -> Value {
        json!({"median": round(self.median), "min": round(self.min), "max": round(self.max), "n": self.n})
    }
}

fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// [`read_bandwidth`] with the bench's buffer size and passes, with progress.
fn measure_bandwidth(args: &BenchArgs, threads: usize) -> Vec<f64> {
    progress(&format!(
        "measuring read bandwidth over {} MiB",
        args.bandwidth_mib
    ));
    let rates = read_bandwidth(args.bandwidth_mib << 20, threads, BANDWIDTH_PASSES);
    progress(&format!("read bandwidth {:.1} GB/s", Spread::of(&rates).median));
    rates
}

/// Streams a buffer of `bytes` on `threads` threads, `passes` times; GB/s (10^9 bytes) per pass.
/// The buffer is written first so its pages are real (not the shared zero page).
fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> Vec<f64> {
    let words = (bytes / 8).max(1 << 16);
    let mut buffer = vec![0u64; words];
    let per_thread = words.div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        for (part_idx, part) in buffer.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                for (i, word) in part.iter_mut().enumerate() {
                    *word = (part_idx * per_thread + i) as u64;
                }
            });
        }
    });
    let mut rates = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(per_thread)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        rates.push((words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    rates
}

/// Eight independent sums, so the loop vectorizes and no add chain limits it; with AVX2 where the
/// CPU has it (a baseline x86-64 build would use SSE2, which streams ~20% slower here).
fn sum_words(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { sum_words_avx2(words) };
    }
    sum_words_portable(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u64]) -> u64 {
    sum_words_portable(words)
}

#[inline(always)]
fn sum_words_portable(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = words.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    for chunk in chunks {
        for (a, &w) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

/// Bytes of weights one decode step reads: every matmul weight as stored (the quantized kernels
/// of a decode step read q4k and q8_0 blocks of the stored size), biases, norms and one embedding
/// row.
struct WeightBytes {
    stored: u64,
    /// Everything the model holds, as stored (before candle's repacked copies).
    resident: u64,
}

fn weight_bytes(cfg: &PhiConfig, dtype: WeightDType) -> WeightBytes {
    let act = dtype.stored_dtype().size_in_bytes() as u64;
    let (h, i, v) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
    );
    let layers = cfg.num_hidden_layers as u64;
    let matmul = |out_dim: u64, in_dim: u64| -> u64 {
        match dtype.quantized() {
            Some(q) if in_dim.is_multiple_of(q.block_size() as u64) => {
                out_dim * in_dim / q.block_size() as u64 * q.type_size() as u64
            }
            _ => out_dim * in_dim * act,
        }
    };
    let stored: u64 = [(h, h, 4 * layers), (i, h, layers), (h, i, layers), (v, h, 1)]
        .into_iter()
        .map(|(out_dim, in_dim, count)| count * matmul(out_dim, in_dim))
        .sum();
    // The embedding table is stored like the matmul weights (model.rs quantizes it too) but a
    // token reads one row of it.
    let embedding = matmul(v, h);
    let small = act * (layers * (4 * h + i + h + 2 * h) + 2 * h + v);
    WeightBytes {
        stored: stored + small + embedding / v,
        resident: stored + small + embedding,
    }
}

/// Resets this process's peak RSS (VmHWM), so each dtype's figure is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Python source for the keystroke: a prefix of ~512 tokens, and what the user types next.
struct KeystrokeText {
    prefix: String,
    prefix_ids: Vec<u32>,
    typed: Vec<char>,
}

/// [`PROMPT_TOKENS`], or half the model's context where that is less (a small test model), so the
/// decode runs and the keystrokes after the prompt fit.
fn prompt_tokens(cfg: &PhiConfig) -> usize {
    PROMPT_TOKENS.min(cfg.max_position_embeddings / 2)
}

impl KeystrokeText {
    fn new(tokenizer: &phi_engine::PhiTokenizer, n_typed: usize, prompt_tokens: usize) -> Result<Self> {
        let ids = tokenizer.encode(PYTHON_SOURCE)?;
        if ids.len() < prompt_tokens + 8 {
            bail!(
                "the built-in Python source has only {} tokens with this tokenizer",
                ids.len()
            );
        }
        let prefix = tokenizer.decode(&ids[..prompt_tokens])?;
        let Some(rest) = PYTHON_SOURCE.strip_prefix(prefix.as_str()) else {
            bail!("this tokenizer does not round-trip the built-in Python source");
        };
        let typed: Vec<char> = rest.chars().cycle().take(n_typed).collect();
        let prefix_ids = tokenizer.encode(&prefix)?;
        Ok(KeystrokeText {
            prefix,
            prefix_ids,
            typed,
        })
    }

    /// The document after `n` keystrokes.
    fn after(&self, n: usize) -> String {
        let mut text = self.prefix.clone();
        text.extend(&self.typed[..n]);
        text
    }
}

fn never() -> bool {
    false
}

fn bench_dtype(
    target: &Target,
    dtype: WeightDType,
    args: &BenchArgs,
    threads: usize,
    machine: &Machine,
    bandwidth_before: Vec<f64>,
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
    let bytes = weight_bytes(&cfg, dtype);
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
    let runs = in_process(&engine, dtype, args, &text)?;
    let peak_rss = peak_rss_bytes(None);
    drop(engine);
    let bandwidth_after = measure_bandwidth(args, threads);
    let bandwidth = Spread::of(&[bandwidth_before.as_slice(), &bandwidth_after].concat());

    let profile = if args.profile {
        Some(profile(&cfg, dtype, &spec.device, args, &runs)?)
    } else {
        None
    };

    let server = if args.skip_server {
        None
    } else {
        Some(server_keystrokes(&spec, threads, args, &text)?)
    };

    let ceiling = bandwidth.median * 1e9 / bytes.stored as f64;
    let kv_read = cfg.kv_bytes_per_token(dtype.kv_dtype().size_in_bytes()) * PROMPT_TOKENS as u64;
    let mut report = json!({
        "dtype": name,
        "threads": threads,
        "cpu": machine.cpu,
        "cpu_features": machine.features,
        "model": target.description,
        "repeats": args.repeats,
        "build_s": round(build_s),
        "warmup_prefill_ms": round(runs.warmup_ms),
        "prefill_tokens": runs.prompt_tokens,
        "prefill_tok_s": round(runs.prefill.median),
        "prefill_tok_s_spread": runs.prefill.json(),
        "first_token_ms_16": round(runs.first_token.median),
        "first_token_ms_16_spread": runs.first_token.json(),
        "decode_tok_s": round(runs.decode.median),
        "decode_tok_s_spread": runs.decode.json(),
        "bandwidth_gb_s": round(bandwidth.median),
        "bandwidth_gb_s_spread": bandwidth.json(),
        "bandwidth_gb_s_before": round(Spread::of(&bandwidth_before).median),
        "bandwidth_gb_s_after": round(Spread::of(&bandwidth_after).median),
        "weight_bytes_per_token": bytes.stored,
        "kv_bytes_read_per_token_at_512": kv_read,
        "decode_ceiling_tok_s": round(ceiling),
        "decode_ceiling_ratio": round(runs.decode.median / ceiling),
        "keystroke_ms_cached": round(runs.keystroke_cached.median),
        "keystroke_ms_cached_spread": runs.keystroke_cached.json(),
        "keystroke_ms_uncached": round(runs.keystroke_uncached.median),
        "keystroke_ms_uncached_spread": runs.keystroke_uncached.json(),
        "keystroke_ratio": round(runs.keystroke_cached.median / runs.keystroke_uncached.median),
        "keystroke_prefill_ms_cached": round(runs.keystroke_prefill_cached.median),
        "keystroke_prefill_ms_uncached": round(runs.keystroke_prefill_uncached.median),
        "keystroke_prefill_ratio": round(runs.keystroke_prefill_cached.median / runs.keystroke_prefill_uncached.median),
        "keystroke_prefilled_tokens_cached": runs.keystroke_prefilled_cached,
        "keystroke_generated_tokens": runs.keystroke_generated,
        "server_keystroke_ms_p50": server.as_ref().map(|s| round(s.p50)).unwrap_or(Value::Null),
        "server_keystroke_ms_p90": server.as_ref().map(|s| round(s.p90)).unwrap_or(Value::Null),
        "server_accept_ms": server.as_ref().and_then(|s| s.accept).map(|(ms, _)| round(ms)),
        "weights_bytes_resident_nominal": bytes.resident,
        "peak_rss_bytes": peak_rss,
    });
    if let (Some(server), Value::Object(map)) = (&server, &mut report) {
        map.insert("server".into(), server.json());
        map.insert("server_peak_rss_bytes".into(), json!(server.peak_rss));
    }
    if let (Some(profile), Value::Object(map)) = (profile, &mut report) {
        map.insert("profile".into(), profile);
    }
    Ok(report)
}

/// The in-process measurements of one dtype.
struct Runs {
    prompt_tokens: usize,
    warmup_ms: f64,
    prefill: Spread,
    first_token: Spread,
    decode: Spread,
    decode_ms_per_token: f64,
    keystroke_cached: Spread,
    keystroke_uncached: Spread,
    keystroke_prefill_cached: Spread,
    keystroke_prefill_uncached: Spread,
    keystroke_prefilled_cached: Vec<usize>,
    keystroke_generated: Vec<usize>,
}

fn in_process(engine: &Engine, dtype: WeightDType, args: &BenchArgs, text: &KeystrokeText) -> Result<Runs> {
    let name = dtype.name();
    let model = &engine.model;
    let tokenizer = engine.tokenizer.as_ref();
    let prompt = &text.prefix_ids;
    let params = |max_new_tokens: usize| GenerateParams {
        max_new_tokens,
        ..Default::default()
    };
    let mut no_stop = |_: &str| false;
    let mut slot = Slot::new(model, SLOT_CAPACITY)?;

    // Warm-up: candle repacks quantized weights on their first use, for one row and for many.
    progress(&format!("{name}: warm-up (prefill {} + 2 tokens)", prompt.len()));
    let start = Instant::now();
    generate(
        model,
        tokenizer,
        &mut slot,
        prompt,
        &params(2),
        &mut no_stop,
        &never,
    )?;
    let warmup_ms = ms(start.elapsed());

    let mut prefill = Vec::new();
    for run in 0..args.repeats {
        slot.clear();
        let start = Instant::now();
        match slot.sync(model, prompt, &never)? {
            SyncOutcome::Ready(..) => {}
            SyncOutcome::Cancelled(_) => bail!("prefill was cancelled"),
        }
        let rate = prompt.len() as f64 / start.elapsed().as_secs_f64();
        progress(&format!(
            "{name}: prefill {} run {}: {rate:.1} tok/s",
            prompt.len(),
            run + 1
        ));
        prefill.push(rate);
    }

    let mut first_token = Vec::new();
    for _ in 0..args.repeats {
        slot.clear();
        let start = Instant::now();
        generate(
            model,
            tokenizer,
            &mut slot,
            &prompt[..SHORT_PROMPT_TOKENS],
            &params(1),
            &mut no_stop,
            &never,
        )?;
        first_token.push(ms(start.elapsed()));
    }
    progress(&format!(
        "{name}: first token after {SHORT_PROMPT_TOKENS}: {:.0} ms",
        Spread::of(&first_token).median
    ));

    // Decode after the 512-token prompt; each run reuses the prompt's cache (one position re-run).
    slot.clear();
    let mut decode = Vec::new();
    let mut decode_ms_per_token = Vec::new();
    for run in 0..args.repeats {
        let generation = generate(
            model,
            tokenizer,
            &mut slot,
            prompt,
            &params(args.decode_tokens + 1),
            &mut no_stop,
            &never,
        )?;
        // The first token comes from the prompt's logits; each later one is one forward.
        let steps = generation.stats.generated_tokens.saturating_sub(1);
        if steps == 0 {
            progress(&format!(
                "{name}: decode run {} ended at once ({:?})",
                run + 1,
                generation.stop
            ));
            continue;
        }
        let rate = steps as f64 / (generation.stats.decode_ms / 1000.0);
        progress(&format!(
            "{name}: decode run {}: {rate:.2} tok/s over {steps} tokens",
            run + 1
        ));
        decode.push(rate);
        decode_ms_per_token.push(generation.stats.decode_ms / steps as f64);
    }

    // Keystrokes: the cached slot holds the previous prompt and its suggestion, as in the editor;
    // the fresh one is emptied each time (a full prefill).
    let mut cached_slot = Slot::new(model, SLOT_CAPACITY)?;
    generate(
        model,
        tokenizer,
        &mut cached_slot,
        prompt,
        &params(LINE_TOKENS),
        &mut no_stop,
        &never,
    )?;
    let (mut cached, mut uncached, mut cached_prefill, mut uncached_prefill) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prefilled, mut generated) = (Vec::new(), Vec::new());
    for keystroke in 1..=args.repeats {
        let document = text.after(keystroke);
        for (use_cache, times, prefill_times) in [
            (true, &mut cached, &mut cached_prefill),
            (false, &mut uncached, &mut uncached_prefill),
        ] {
            let target_slot = if use_cache { &mut cached_slot } else { &mut slot };
            if !use_cache {
                target_slot.clear();
            }
            let start = Instant::now();
            let ids = tokenizer.encode(&document)?;
            let generation = generate(
                model,
                tokenizer,
                target_slot,
                &ids,
                &params(LINE_TOKENS),
                &mut no_stop,
                &never,
            )?;
            times.push(ms(start.elapsed()));
            prefill_times.push(generation.stats.prefill_ms);
            if use_cache {
                prefilled.push(generation.stats.prefilled_tokens);
                generated.push(generation.stats.generated_tokens);
            }
        }
        progress(&format!(
            "{name}: keystroke {keystroke}: cached {:.0} ms, uncached {:.0} ms",
            cached.last().copied().unwrap_or(f64::NAN),
            uncached.last().copied().unwrap_or(f64::NAN)
        ));
    }

    Ok(Runs {
        prompt_tokens: prompt.len(),
        warmup_ms,
        prefill: Spread::of(&prefill),
        first_token: Spread::of(&first_token),
        decode: Spread::of(&decode),
        decode_ms_per_token: Spread::of(&decode_ms_per_token).median,
        keystroke_cached: Spread::of(&cached),
        keystroke_uncached: Spread::of(&uncached),
        keystroke_prefill_cached: Spread::of(&cached_prefill),
        keystroke_prefill_uncached: Spread::of(&uncached_prefill),
        keystroke_prefilled_cached: prefilled,
        keystroke_generated: generated,
    })
}

/// Per-stage timers on a separate synthetic weight set of the same shape and dtype, set against
/// the measured decode step and prefill chunk.
fn profile(
    cfg: &PhiConfig,
    dtype: WeightDType,
    device: &str,
    args: &BenchArgs,
    runs: &Runs,
) -> Result<Value> {
    use phi_engine::synthetic::{attention_timings, elementwise_timings, matmul_timings};
    let device = loading::parse_device(device)?;
    let chunk = phi_engine::generate::PREFILL_CHUNK.min(runs.prompt_tokens);
    let mut out = serde_json::Map::new();
    for (label, n_tokens, measured_ms) in [
        ("decode_step", 1usize, runs.decode_ms_per_token),
        (
            "prefill_chunk",
            chunk,
            chunk as f64 * 1000.0 / runs.prefill.median,
        ),
    ] {
        progress(&format!("{}: profiling {label} ({n_tokens} rows)", dtype.name()));
        let mut stages = matmul_timings(cfg, dtype, &device, 1, n_tokens, args.repeats)?;
        stages.extend(attention_timings(
            cfg,
            dtype,
            &device,
            n_tokens,
            runs.prompt_tokens,
            args.repeats,
        )?);
        stages.extend(elementwise_timings(cfg, dtype, &device, n_tokens, args.repeats)?);
        let timed: f64 = stages.iter().filter(|s| s.name != "matmuls").map(|s| s.ms).sum();
        let mut entry = serde_json::Map::new();
        for stage in &stages {
            entry.insert(format!("{}_ms", stage.name), round(stage.ms));
        }
        entry.insert("timed_ms".into(), round(timed));
        entry.insert("measured_ms".into(), round(measured_ms));
        entry.insert("other_ms".into(), round(measured_ms - timed));
        out.insert(label.into(), Value::Object(entry));
    }
    Ok(Value::Object(out))
}

/// The keystroke through the real server.
struct ServerRuns {
    load_s: f64,
    first_ms: f64,
    rtt: Vec<f64>,
    p50: f64,
    p90: f64,
    lasts: Vec<Value>,
    typed_through: usize,
    /// Accepting the last suggestion and asking again, once the server has computed the next one
    /// while idle: the round trip, and whether it was served from that speculation.
    accept: Option<(f64, bool)>,
    peak_rss: Option<u64>,
}

impl ServerRuns {
    fn json(&self) -> Value {
        let model_served = || self.lasts.iter().filter(|l| l["from_cache"] == json!(false));
        let field = |key: &str| -> Vec<f64> { model_served().filter_map(|l| l[key].as_f64()).collect() };
        let count = |key: &str| -> Vec<u64> { model_served().filter_map(|l| l[key].as_u64()).collect() };
        json!({
            "load_s": round(self.load_s),
            "first_request_ms": round(self.first_ms),
            "keystrokes": self.rtt.len(),
            "typed_through": self.typed_through,
            "accept_ms": self.accept.map(|(ms, _)| round(ms)),
            "accept_speculated": self.accept.map(|(_, speculated)| speculated),
            "rtt_ms": self.rtt.iter().map(|&x| round(x)).collect::<Vec<_>>(),
            "p50_ms": round(self.p50),
            "p90_ms": round(self.p90),
            "last_prefill_ms_median": round(Spread::of(&field("prefill_ms")).median),
            "last_decode_ms_median": round(Spread::of(&field("decode_ms")).median),
            "last_total_ms_median": round(Spread::of(&field("total_ms")).median),
            "last_prefilled_tokens": count("prefilled_tokens"),
            "last_generated_tokens": count("generated_tokens"),
            "last_reused_tokens": count("reused_tokens"),
            "last": self.lasts,
        })
    }
}

/// `text` is the in-process keystrokes' document (made with the model's own tokenizer); the
/// first `args.keystrokes` of its typed characters are typed.
fn server_keystrokes(
    spec: &ModelSpec,
    threads: usize,
    args: &BenchArgs,
    text: &KeystrokeText,
) -> Result<ServerRuns> {
    let name = &spec.dtype;
    let typed = &text.typed[..args.keystrokes.min(text.typed.len())];

    let exe = std::env::current_exe().context("cannot find the phi-lsp executable to start the server")?;
    let mut command = Command::new(exe);
    command
        .args([
            "--stdio",
            "--model",
            &spec.model,
            "--dtype",
            name,
            "--device",
            &spec.device,
        ])
        .args(spec.tokenizer.iter().flat_map(|path| ["--tokenizer", path]))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("PHI_LSP_LOG", "warn");
    progress(&format!("{name}: starting the server"));
    let start = Instant::now();
    let mut client = ServerClient::spawn(command)?;
    let result = (|| -> Result<ServerRuns> {
        client.request(
            "initialize",
            json!({
                "processId": std::process::id(),
                "rootUri": null,
                "capabilities": {
                    "general": {"positionEncodings": ["utf-16"]},
                    "textDocument": {"inlineCompletion": {}, "synchronization": {}},
                },
                "initializationOptions": {
                    "maxNewTokens": LINE_TOKENS,
                    "deadlineMs": 60_000,
                    "contextTokens": SLOT_CAPACITY,
                },
            }),
        )?;
        client.notify("initialized", json!({}))?;
        client.wait_ready(Duration::from_secs(900))?;
        let load_s = start.elapsed().as_secs_f64();
        progress(&format!("{name}: server ready in {load_s:.1} s"));

        let uri = "file:///phi-lsp-bench/keystroke.py";
        let mut document = text.prefix.clone();
        client.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": document}}),
        )?;
        let start = Instant::now();
        client.request("textDocument/inlineCompletion", completion_params(uri, &document))?;
        let first_ms = ms(start.elapsed());
        progress(&format!(
            "{name}: server first completion (full prefill) {first_ms:.0} ms"
        ));

        let (mut rtt, mut lasts, mut typed_through) = (Vec::new(), Vec::new(), 0);
        let mut shown = None;
        for (keystroke, &c) in typed.iter().enumerate() {
            let end = end_position(&document);
            document.push(c);
            let start = Instant::now();
            client.notify(
                "textDocument/didChange",
                json!({
                    "textDocument": {"uri": uri, "version": keystroke + 2},
                    "contentChanges": [{"range": {"start": end, "end": end}, "text": c.to_string()}],
                }),
            )?;
            let answer =
                client.request("textDocument/inlineCompletion", completion_params(uri, &document))?;
            let elapsed = ms(start.elapsed());
            shown = first_insert_text(&answer);
            let last = client.request("phi-lsp/status", Value::Null)?["last"].clone();
            if last["from_cache"] == json!(true) {
                typed_through += 1;
            } else {
                rtt.push(elapsed);
            }
            progress(&format!(
                "{name}: server keystroke {}: {elapsed:.0} ms (prefilled {}, generated {}{})",
                keystroke + 1,
                last["prefilled_tokens"],
                last["generated_tokens"],
                if last["from_cache"] == json!(true) {
                    ", typed through"
                } else {
                    ""
                }
            ));
            lasts.push(last);
        }
        let accept = match shown {
            Some(suggestion) => Some(accept_suggestion(
                &mut client,
                uri,
                &mut document,
                &suggestion,
                typed.len() + 2,
            )?),
            None => None,
        };
        if let Some((accept_ms, speculated)) = accept {
            progress(&format!(
                "{name}: accepting the suggestion and asking again: {accept_ms:.1} ms{}",
                if speculated {
                    " (computed while idle)"
                } else {
                    " (not speculated)"
                }
            ));
        }
        Ok(ServerRuns {
            accept,
            load_s,
            first_ms,
            p50: Spread::percentile(&rtt, 50.0),
            p90: Spread::percentile(&rtt, 90.0),
            rtt,
            lasts,
            typed_through,
            peak_rss: peak_rss_bytes(Some(client.pid())),
        })
    })();
    client.shutdown();
    result
}

/// Waits (idle) until the server has speculated, inserts `suggestion` at the end of `document` as
/// an editor does on accept, and times the request that follows.
fn accept_suggestion(
    client: &mut ServerClient,
    uri: &str,
    document: &mut String,
    suggestion: &str,
    version: usize,
) -> Result<(f64, bool)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while client.request("phi-lsp/status", Value::Null)?["speculation"] != "ready"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let end = end_position(document);
    document.push_str(suggestion);
    let start = Instant::now();
    client.notify(
        "textDocument/didChange",
        json!({
            "textDocument": {"uri": uri, "version": version},
            "contentChanges": [{"range": {"start": end, "end": end}, "text": suggestion}],
        }),
    )?;
    client.request("textDocument/inlineCompletion", completion_params(uri, document))?;
    let elapsed = ms(start.elapsed());
    let last = client.request("phi-lsp/status", Value::Null)?["last"].clone();
    Ok((elapsed, last["stop"] == "speculated"))
}

/// The `insertText` of the first item of an inlineCompletion answer.
fn first_insert_text(answer: &Value) -> Option<String> {
    let items = answer.as_array().or_else(|| answer["items"].as_array())?;
    Some(items.first()?["insertText"].as_str()?.to_string()).filter(|t| !t.is_empty())
}

fn completion_params(uri: &str, document: &str) -> Value {
    json!({
        "textDocument": {"uri": uri},
        "position": end_position(document),
        "context": {"triggerKind": 2},
    })
}

/// The LSP position (utf-16) of the end of `text`.
fn end_position(text: &str) -> Value {
    let line = text.matches('\n').count();
    let last_line = text.rsplit('\n').next().unwrap_or("");
    json!({"line": line, "character": last_line.encode_utf16().count()})
}

/// A minimal LSP client over a child's stdio: frames messages, answers the server's own requests,
/// skips notifications.
struct ServerClient {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: mpsc::Receiver<Value>,
    next_id: i64,
}

impl ServerClient {
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the server")?;
        let stdout = child.stdout.take().context("the server has no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            while let Some(message) = read_message(&mut reader) {
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(ServerClient {
            child,
            stdin,
            messages: rx,
            next_id: 1,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, message: &Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the server's stdin is closed")?;
        let body = message.to_string();
        write!(stdin, "Content-Length: {}\r\n\r\n{body}", body.len())
            .and_then(|_| stdin.flush())
            .context("cannot write to the server: it may have exited (see its log above)")
    }

    fn notify(&mut self, method: &str, params: Value) -> Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    /// Sends a request and waits for its result; an error response is an error.
    fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            message["params"] = params;
        }
        self.send(&message)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.messages.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "no answer to {method} from the server: it exited or hung (see its log above)"
                )
            })?;
            if message.get("method").is_some() {
                self.answer_server_request(&message)?;
                continue;
            }
            if message.get("id") == Some(&json!(id)) {
                if let Some(error) = message.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(message.get("result").cloned().unwrap_or(Value::Null));
            }
        }
    }

    /// Server-to-client requests (configuration, progress tokens) get an empty answer.
    fn answer_server_request(&mut self, message: &Value) -> Result<()> {
        let (Some(id), Some(method)) = (message.get("id"), message.get("method").and_then(Value::as_str))
        else {
            return Ok(());
        };
        let result = if method == "workspace/configuration" {
            json!([null])
        } else {
            Value::Null
        };
        self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.request("phi-lsp/status", Value::Null)?;
            match status["state"].as_str() {
                Some("ready") => return Ok(()),
                Some("failed") => bail!("the server could not load the model: {}", status["message"]),
                _ if Instant::now() > deadline => bail!("the server was not ready after {timeout:?}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Asks politely, then kills our own child if it does not leave.
    fn shutdown(mut self) {
        let _ = self.request("shutdown", Value::Null);
        let _ = self.notify("exit", Value::Null);
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_message(reader: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            if length.is_some() {
                break;
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            if key.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0u8; length?];
    std::io::Read::read_exact(reader, &mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn spread_text(s: &Value) -> String {
    format!("median of {}, {}..{}", s["n"], s["min"], s["max"])
}

/// The human table for one dtype.
fn human(r: &Value) -> String {
    let num = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let bytes = |key: &str| r[key].as_u64().map(gb).unwrap_or_else(|| "?".into());
    let mut lines = vec![
        format!(
            "\n{}  ({} threads; built in {:.1} s; weights read per token {}; warm-up prefill {:.0} ms)",
            r["dtype"].as_str().unwrap_or("?"),
            r["threads"],
            num("build_s"),
            bytes("weight_bytes_per_token"),
            num("warmup_prefill_ms"),
        ),
        format!(
            "  prefill {:>4} tokens      {:>8.1} tok/s   ({})",
            r["prefill_tokens"],
            num("prefill_tok_s"),
            spread_text(&r["prefill_tok_s_spread"])
        ),
        format!(
            "  first token after 16     {:>8.1} ms      ({})",
            num("first_token_ms_16"),
            spread_text(&r["first_token_ms_16_spread"])
        ),
        format!(
            "  decode at context {:<4}   {:>8.2} tok/s   ({}); ceiling {:.1} tok/s at {:.1} GB/s ({:.1} before the runs, {:.1} after): ratio {:.2}",
            r["prefill_tokens"],
            num("decode_tok_s"),
            spread_text(&r["decode_tok_s_spread"]),
            num("decode_ceiling_tok_s"),
            num("bandwidth_gb_s"),
            num("bandwidth_gb_s_before"),
            num("bandwidth_gb_s_after"),
            num("decode_ceiling_ratio"),
        ),
        format!(
            "  keystroke, 8-token line  {:>8.1} ms cached, {:.1} ms uncached: ratio {:.3}; prefill part {:.1} vs {:.1} ms: ratio {:.3} (prefilled {} tokens cached)",
            num("keystroke_ms_cached"),
            num("keystroke_ms_uncached"),
            num("keystroke_ratio"),
            num("keystroke_prefill_ms_cached"),
            num("keystroke_prefill_ms_uncached"),
            num("keystroke_prefill_ratio"),
            r["keystroke_prefilled_tokens_cached"],
        ),
    ];
    if let Some(server) = r.get("server") {
        lines.push(format!(
            "  server keystroke         {:>8.1} ms p50, {:.1} ms p90 over {} ({} typed through); server's own: prefill {} ms, decode {} ms, total {} ms (medians); prefilled {}, generated {}; first request {} ms, load {} s",
            num("server_keystroke_ms_p50"),
            num("server_keystroke_ms_p90"),
            server["rtt_ms"].as_array().map(Vec::len).unwrap_or(0),
            server["typed_through"],
            server["last_prefill_ms_median"],
            server["last_decode_ms_median"],
            server["last_total_ms_median"],
            server["last_prefilled_tokens"],
            server["last_generated_tokens"],
            server["first_request_ms"],
            server["load_s"],
        ));
        lines.push(format!(
            "  accept, then ask again   {} ms (served from the speculation: {})",
            server["accept_ms"], server["accept_speculated"],
        ));
    }
    lines.push(format!(
        "  peak RSS                 {} bench{} (weights as stored {})",
        bytes("peak_rss_bytes"),
        r.get("server_peak_rss_bytes")
            .and_then(Value::as_u64)
            .map(|b| format!(", {} server", gb(b)))
            .unwrap_or_default(),
        bytes("weights_bytes_resident_nominal"),
    ));
    if let Some(profile) = r.get("profile").and_then(Value::as_object) {
        for (label, stages) in profile {
            let Some(stages) = stages.as_object() else {
                continue;
            };
            let number = |key: &str| stages.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let (measured, timed) = (number("measured_ms"), number("timed_ms"));
            let mut parts: Vec<(&str, f64)> = stages
                .iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "measured_ms" | "timed_ms" | "matmuls_ms" | "other_ms")
                })
                .map(|(k, v)| (k.trim_end_matches("_ms"), v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            parts.sort_by(|a, b| b.1.total_cmp(&a.1));
            let parts: Vec<String> = parts
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} ({:.0}%)", 100.0 * v / timed))
                .collect();
            lines.push(format!(
                "  profile {label}: measured {measured:.1} ms; stages timed alone sum to {timed:.1} ms: {}",
                parts.join(", ")
            ));
        }
    }
    lines.join("\n")
}

fn progress(message: &str) {
    eprintln!("phi-lsp bench: {message}");
}

/// About 4 KB of ordinary Python (HumanEval-style functions with docstrings): its first 512 Phi-1
/// tokens are the keystroke document, and the characters after them are what gets typed.
const PYTHON_SOURCE: &str = r#"from typing import List, Optional, Tuple
import math


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True
    return False


def separate_paren_groups(paren_string: str) -> List[str]:
    """Input to this function is a string containing multiple groups of nested parentheses.
    Your goal is to separate those groups into separate strings and return the list of those.
    Separate groups are balanced (each open brace is properly closed) and not nested within
    each other. Ignore any spaces in the input string.
    >>> separate_paren_groups('( ) (( )) (( )( ))')
    ['()', '(())', '(()())']
    """
    result = []
    current_string = []
    current_depth = 0
    for c in paren_string:
        if c == '(':
            current_depth += 1
            current_string.append(c)
        elif c == ')':
            current_depth -= 1
            current_string.append(c)
            if current_depth == 0:
                result.append(''.join(current_string))
                current_string.clear()
    return result


def truncate_number(number: float) -> float:
    """Given a positive floating point number, it can be decomposed into an integer part
    (largest integer smaller than given number) and decimals (leftover part always smaller
    than 1). Return the decimal part of the number.
    >>> truncate_number(3.5)
    0.5
    """
    return number % 1.0


def below_zero(operations: List[int]) -> bool:
    """You're given a list of deposit and withdrawal operations on a bank account that starts
    with zero balance. Your task is to detect if at any point the balance of account falls
    below zero, and at that point function should return True. Otherwise it should return False.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    """
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False


def mean_absolute_deviation(numbers: List[float]) -> float:
    """For a given list of input numbers, calculate Mean Absolute Deviation around the mean
    of this dataset. Mean Absolute Deviation is the average absolute difference between each
    element and a centerpoint (mean in this case): MAD = average | x - x_mean |
    >>> mean_absolute_deviation([1.0, 2.0, 3.0, 4.0])
    1.0
    """
    mean = sum(numbers) / len(numbers)
    return sum(abs(x - mean) for x in numbers) / len(numbers)


def intersperse(numbers: List[int], delimeter: int) -> List[int]:
    """Insert a number 'delimeter' between every two consecutive elements of input list
    `numbers'.
    >>> intersperse([], 4)
    []
    >>> intersperse([1, 2, 3], 4)
    [1, 4, 2, 4, 3]
    """
    if not numbers:
        return []
    result = []
    for n in numbers[:-1]:
        result.append(n)
        result.append(delimeter)
    result.append(numbers[-1])
    return result


def parse_nested_parens(paren_string: str) -> List[int]:
    """Input to this function is a string represented multiple groups for nested parentheses
    separated by spaces. For each of the group, output the deepest level of nesting of
    parentheses. E.g. (()()) has maximum two levels of nesting while ((())) has three.
    >>> parse_nested_parens('(()()) ((())) () ((())()())')
    [2, 3, 1, 3]
    """
    def parse_paren_group(s):
        depth = 0
        max_depth = 0
        for c in s:
            if c == '(':
                depth += 1
                max_depth = max(depth, max_depth)
            else:
                depth -= 1
        return max_depth

    return [parse_paren_group(x) for x in paren_string.split(' ') if x]


def rolling_max(numbers: List[int]) -> List[int]:
    """From a given list of integers, generate a list of rolling maximum element found until
    given moment in the sequence.
    >>> rolling_max([1, 2, 3, 2, 3, 4, 2])
    [1, 2, 3, 3, 3, 4, 4]
    """
    running_max = None
    result = []
    for n in numbers:
        if running_max is None:
            running_max = n
        else:
            running_max = max(running_max, n)
        result.append(running_max)
    return result
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[1.0, 2.0, 3.0, 4.0]).median, 2.5);
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Spread::percentile(&values, 50.0), 5.0);
        assert_eq!(Spread::percentile(&values, 90.0), 9.0);
        assert!(Spread::percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn end_position_counts_utf16() {
        assert_eq!(end_position("ab\ncd"), json!({"line": 1, "character": 2}));
        assert_eq!(end_position("x\n"), json!({"line": 1, "character": 0}));
        assert_eq!(end_position("é😀"), json!({"line": 0, "character": 3}));
    }

    #[test]
    fn phi_1_weight_bytes_match_the_published_sizes() {
        let cfg = PhiConfig::phi_1();
        // f32: 1.313e9 weights read per token (all but the embedding table), 4 bytes each.
        let f32 = weight_bytes(&cfg, WeightDType::F32);
        assert!((f32.stored as f64 / 1e9 - 5.25).abs() < 0.02, "{}", f32.stored);
        let q8 = weight_bytes(&cfg, WeightDType::Q8_0);
        assert!((q8.stored as f64 / 1e9 - 1.40).abs() < 0.02, "{}", q8.stored);
        let q4k = weight_bytes(&cfg, WeightDType::Q4K);
        assert!((q4k.stored as f64 / 1e9 - 0.74).abs() < 0.02, "{}", q4k.stored);
    }

    #[test]
    fn sums_every_word() {
        let words: Vec<u64> = (0..1003).collect();
        assert_eq!(sum_words(&words), 1002 * 1003 / 2);
    }
}
