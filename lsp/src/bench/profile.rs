//! `--profile`: per-stage timers (the engine's `profile` module) on a separate synthetic weight set
//! of the same shape and dtype, set against the measured decode step and prefill chunk.

use anyhow::Result;
use phi_engine::{PhiConfig, WeightDType};
use serde_json::Value;

use super::in_process::Runs;
use super::progress;
use super::stats::round;
use crate::args::BenchArgs;
use crate::loading;

/// The stages of a decode step and of a prefill chunk, each timed alone, beside what was measured.
pub fn profile_stages(
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
