//! From what the user named (`--model`, `--device`, `--dtype`) to a loaded [`Engine`]. Names are
//! parsed here, so a typo fails before any file is read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use phi_engine::{DType, Device, Engine, ModelFiles};

use crate::settings::ModelSpec;

pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "auto" => {
            if candle_core_cuda_available() {
                Device::new_cuda(0)?
            } else {
                Device::Cpu
            }
        }
        "cuda" => Device::new_cuda(0).map_err(|e| gpu_error("cuda", e))?,
        "metal" => Device::new_metal(0).map_err(|e| gpu_error("metal", e))?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Device::new_cuda(ordinal).map_err(|e| gpu_error(other, e))?,
            _ => bail!("unknown device {other:?}: use auto, cpu, cuda, cuda:N or metal"),
        },
    };
    Ok(device)
}

fn candle_core_cuda_available() -> bool {
    cfg!(feature = "cuda") && Device::new_cuda(0).is_ok()
}

fn gpu_error(name: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "device {name} is not available ({e}): build with `cargo build --release --features {}` on a machine that has one, or use --device cpu",
        name.split(':').next().unwrap_or(name)
    )
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype {other:?}: use f32, f16 or bf16"),
    })
}

pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Finds the model's files. A path that exists is a model folder; anything else is reported with
/// what to pass instead.
pub fn resolve(spec: &ModelSpec) -> Result<ModelFiles> {
    let tokenizer = spec.tokenizer.as_deref().map(Path::new);
    let path = PathBuf::from(&spec.model);
    if path.exists() || spec.model.starts_with('/') || spec.model.starts_with('.') {
        return Ok(ModelFiles::from_dir(&path, tokenizer)?);
    }
    bail!(
        "model {:?} is not a folder here: pass --model with a Hugging Face model folder (config.json, tokenizer.json, model.safetensors)",
        spec.model
    )
}

pub fn load(spec: &ModelSpec) -> Result<Engine> {
    let device = parse_device(&spec.device)?;
    let dtype = parse_dtype(&spec.dtype)?;
    let files = resolve(spec)?;
    Ok(Engine::load(&files, &device, dtype)?)
}
