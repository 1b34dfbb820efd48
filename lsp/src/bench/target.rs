//! What is benchmarked: `--model`, or `--synthetic phi-1` (random weights of Phi-1's exact shape),
//! as a model spec the in-process runs load and the server is started with.

use std::path::Path;

use anyhow::{bail, Result};
use phi_engine::PhiConfig;

use crate::args::{BenchArgs, ModelArgs};
use crate::loading;
use crate::settings::ModelSpec;

/// What is benchmarked: the model spec (as the server is started with it) and its shape.
pub struct Target {
    pub spec: ModelSpec,
    /// What it is, in words (the report's `model`).
    pub description: String,
}

impl Target {
    /// From `--model` or `--synthetic`, with paths made absolute for the server.
    pub fn resolve(model: &ModelArgs, args: &BenchArgs) -> Result<Self> {
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
