//! `phi-lsp quantize`: a safetensors model folder to one GGUF file in llama.cpp's `phi2` layout
//! (`--dtype q4k|q8_0|f16|bf16|f32`), which `--model OUT.gguf` and llama.cpp both load.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::args::{ModelArgs, QuantizeArgs};
use crate::loading;

/// Writes the GGUF file `--output` names, of the one type `--dtype` names.
pub fn write_gguf(model: &ModelArgs, args: QuantizeArgs) -> Result<()> {
    let Some(dtype) = loading::parse_dtype(&model.dtype)? else {
        bail!("quantize writes one type: pass --dtype q4k, q8_0, f16, bf16 or f32");
    };
    if model.model.ends_with(".gguf") {
        bail!(
            "{}: quantize reads a safetensors model (a folder with config.json, tokenizer.json and model.safetensors, or a Hub id), not a GGUF file",
            model.model
        );
    }
    if args.output.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!(
            "{}: the output name must end in .gguf (--model picks the GGUF loader by that suffix)",
            args.output.display()
        );
    }
    let files = loading::resolve(&model.spec(), None)?;
    let started = Instant::now();
    let summary = phi_engine::gguf::write(&files, &args.output, dtype)?;
    report(&summary, started.elapsed().as_secs_f64());
    Ok(())
}

/// What was written goes to stderr: stdout stays free for the one-shot commands' results.
fn report(summary: &phi_engine::gguf::WriteSummary, seconds: f64) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "phi-lsp: wrote {}: {} tensors, {} bytes ({:.2} MiB) in {seconds:.1} s",
        summary.path.display(),
        summary.n_tensors,
        summary.bytes,
        mib(summary.bytes)
    );
    for (name, count, bytes) in &summary.by_type {
        eprintln!(
            "  {name:>5}: {count:>4} tensors, {bytes:>12} bytes ({:.2} MiB)",
            mib(*bytes)
        );
    }
    if !summary.kept_dense.is_empty() {
        eprintln!(
            "  kept f32 (rows are not whole quantization blocks): {}",
            summary.kept_dense.join(", ")
        );
    }
}
