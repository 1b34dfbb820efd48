//! `phi-lsp memory`: weights plus KV cache per dtype and context size, computed from the model's
//! config the way the loader holds them (so a measured peak RSS can be checked against it).

use std::path::{Path, PathBuf};

use anyhow::Result;
use phi_engine::{PhiConfig, WeightDType};

use crate::args::{MemoryArgs, ModelArgs};
use crate::hub;
use crate::loading::SYNTHETIC_PHI_1;
use crate::stdout::print_line;

pub const CONTEXTS: [usize; 3] = [512, 1024, 2048];
const DTYPES: [WeightDType; 6] = [
    WeightDType::F32,
    WeightDType::F16,
    WeightDType::BF16,
    WeightDType::Q8_0,
    WeightDType::Q4K,
    WeightDType::Q4KM,
];

/// The config of the model named by `--model`, without loading weights. microsoft/phi-1 that is
/// not in the cache uses its published config.
fn config(model: &str) -> Result<(PhiConfig, String)> {
    let path = PathBuf::from(crate::settings::expand_home(model));
    if path.is_dir() {
        let file = path.join("config.json");
        return Ok((PhiConfig::from_file(&file)?, file.display().to_string()));
    }
    if let Some(hub_model) = hub::HubModel::parse(model) {
        if let Some(snapshot) = hub::cached_snapshot(&hub::HubEnv::from_env(false), &hub_model) {
            let file = snapshot.join("config.json");
            return Ok((PhiConfig::from_file(&file)?, file.display().to_string()));
        }
    }
    if model == SYNTHETIC_PHI_1 || model == "microsoft/phi-1" {
        return Ok((
            PhiConfig::phi_1(),
            "the published microsoft/phi-1 config.json".into(),
        ));
    }
    anyhow::bail!(
        "{}: no config.json found for this model: pass --model with a model folder",
        Path::new(model).display()
    )
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Prints the table (or `--json` object) of weights plus KV cache per dtype and context size.
pub fn print_memory_table(model: &ModelArgs, args: MemoryArgs) -> Result<()> {
    let (cfg, source) = config(&model.model)?;
    let rows: Vec<serde_json::Value> = DTYPES
        .iter()
        .map(|&dtype| {
            let weights = dtype.weight_bytes(&cfg);
            let kv = cfg.kv_bytes_per_token(dtype.kv_dtype().size_in_bytes());
            let totals: serde_json::Map<String, serde_json::Value> = CONTEXTS
                .iter()
                .map(|&ctx| (ctx.to_string(), (weights + kv * ctx as u64).into()))
                .collect();
            serde_json::json!({"dtype": dtype.name(), "weights_bytes": weights, "kv_bytes_per_token": kv,
                               "total_bytes_by_context": totals})
        })
        .collect();
    if args.json {
        let out = serde_json::json!({"model": model.model, "config": source, "parameters": cfg.n_params(), "rows": rows});
        print_line(&out.to_string());
        return Ok(());
    }
    let mut out = format!(
        "{} ({} parameters; from {source})\nweights + the KV cache of one slot; quantized dtypes keep norms and biases in f32, the KV cache in f16\n\n{:<6} {:>10} {:>10} {:>12} {:>12} {:>12}\n",
        model.model,
        cfg.n_params(),
        "dtype",
        "weights",
        "KV/token",
        "ctx 512",
        "ctx 1024",
        "ctx 2048"
    );
    for row in &rows {
        let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let totals = &row["total_bytes_by_context"];
        out.push_str(&format!(
            "{:<6} {:>10} {:>10} {:>12} {:>12} {:>12}\n",
            row["dtype"].as_str().unwrap_or(""),
            gib(num(&row["weights_bytes"])),
            format!("{} KiB", num(&row["kv_bytes_per_token"]) >> 10),
            gib(num(&totals["512"])),
            gib(num(&totals["1024"])),
            gib(num(&totals["2048"])),
        ));
    }
    print_line(out.trim_end());
    Ok(())
}
