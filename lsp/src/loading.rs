//! From what the user named (`--model`, `--device`, `--dtype`) to a loaded [`Engine`]. Names are
//! parsed here, so a typo fails before any file is read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use phi_engine::{Device, Engine, ModelFiles, WeightDType};

use crate::hub;
use crate::settings::ModelSpec;

pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "auto" => {
            if candle_core_cuda_available() {
                Device::new_cuda(0)?
            } else if candle_core_metal_available() {
                Device::new_metal(0)?
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

fn candle_core_metal_available() -> bool {
    cfg!(feature = "metal") && Device::new_metal(0).is_ok()
}

fn gpu_error(name: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "device {name} is not available ({e}): build with `cargo build --release --features {}` on a machine that has one, or use --device cpu",
        name.split(':').next().unwrap_or(name)
    )
}

/// A `--dtype` name: `Some` type, or `None` for `auto` (see [`default_dtype`]).
pub fn parse_dtype(name: &str) -> Result<Option<WeightDType>> {
    if name.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    match WeightDType::parse(name) {
        Some(dtype) => Ok(Some(dtype)),
        None => bail!("unknown dtype {name:?}: use auto, {}", WeightDType::NAMES),
    }
}

/// What `--dtype auto` loads. On a GPU, f16: half the bytes of f32, computed in f16 there. On
/// CPU, q8_0: decoding reads every weight once per token, so 8-bit weights run faster than f32
/// (and than f16, twice the bytes, which CPUs widen to f32), and its outputs stay close to f32's
/// (`engine/tests/quant_accuracy.rs`); q4k is faster still but strays much further from f32, so
/// it is offered, not chosen.
pub fn default_dtype(device: &Device) -> WeightDType {
    if device.is_cpu() {
        WeightDType::Q8_0
    } else {
        WeightDType::F16
    }
}

/// A `--dtype` name resolved for `device`.
pub fn resolve_dtype(name: &str, device: &Device) -> Result<WeightDType> {
    Ok(parse_dtype(name)?.unwrap_or_else(|| default_dtype(device)))
}

pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Finds the model's files (a leading `~` is the home folder): a model folder that exists, else a
/// Hub id resolved through the Hugging Face cache (downloaded when missing unless `HF_HUB_OFFLINE`
/// is set).
pub fn resolve(spec: &ModelSpec, progress: Option<hub::ProgressFn>) -> Result<ModelFiles> {
    let spec = &spec.with_home_expanded();
    let tokenizer = spec.tokenizer.as_deref().map(Path::new);
    let path = PathBuf::from(&spec.model);
    if path.exists() || spec.model.starts_with('/') || spec.model.starts_with('.') {
        return Ok(ModelFiles::from_dir(&path, tokenizer)?);
    }
    let Some(model) = hub::HubModel::parse(&spec.model) else {
        bail!(
            "model {:?} is neither a folder nor a Hugging Face id: pass a model folder (config.json, \
             tokenizer.json, model.safetensors), a .gguf file or an id such as microsoft/phi-1",
            spec.model
        );
    };
    let dir = match progress {
        Some(progress) => hub::resolve(&hub::HubEnv::from_env(false), &model, progress)?,
        None => hub::resolve(&hub::HubEnv::from_env(true), &model, &mut |_, _, _| {})?,
    };
    Ok(ModelFiles::from_dir(&dir, tokenizer)?)
}

/// `synthetic:phi-1`: random weights of Phi-1's exact shape (for benchmarks), with the tokenizer
/// given by `--tokenizer`, else Phi-1's own.
pub const SYNTHETIC_PHI_1: &str = "synthetic:phi-1";

/// Phi-1's tokenizer (`assets/phi-1/`, MIT, see its README), built in so that synthetic weights
/// tokenize real Python without a download.
const PHI_1_TOKENIZER: &[u8] = include_bytes!("../../assets/phi-1/tokenizer.json");

/// Loads what `spec` names. `progress` receives download progress (the server turns it into
/// `$/progress`); without it a download draws a progress bar on stderr.
pub fn load(spec: &ModelSpec, progress: Option<hub::ProgressFn>) -> Result<Engine> {
    let spec = &spec.with_home_expanded();
    let device = parse_device(&spec.device)?;
    let dtype = resolve_dtype(&spec.dtype, &device)?;
    if spec.model == SYNTHETIC_PHI_1 {
        let tokenizer = match &spec.tokenizer {
            Some(path) => phi_engine::PhiTokenizer::from_file(Path::new(path))?,
            None => phi_engine::PhiTokenizer::from_bytes(PHI_1_TOKENIZER)?,
        };
        let model = phi_engine::synthetic::model(&phi_engine::PhiConfig::phi_1(), dtype, &device, 0)?;
        return Ok(Engine {
            model,
            tokenizer: std::sync::Arc::new(tokenizer),
            name: SYNTHETIC_PHI_1.into(),
            dtype: dtype.name().into(),
        });
    }
    if spec.model.ends_with(".gguf") {
        let path = PathBuf::from(&spec.model);
        let tokenizer = match &spec.tokenizer {
            Some(t) => PathBuf::from(t),
            None => path.with_file_name("tokenizer.json"),
        };
        return Ok(phi_engine::gguf::load(&path, &tokenizer, &device)?);
    }
    let files = resolve(spec, progress)?;
    Ok(Engine::load(&files, &device, dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in tokenizer is Phi-1's: its vocabulary and the ids it gives real Python match the
    /// tokenizer file in assets/ read the ordinary way.
    #[test]
    fn the_built_in_tokenizer_is_phi_1s() {
        let built_in =
            phi_engine::PhiTokenizer::from_bytes(PHI_1_TOKENIZER).expect("the built-in tokenizer parses");
        let from_file = phi_engine::PhiTokenizer::from_file(Path::new("../assets/phi-1/tokenizer.json"))
            .expect("assets/phi-1/tokenizer.json parses");
        let code = "def area(r):\n    return 3.14159 * r ** 2\n";
        assert_eq!(built_in.size(), from_file.size());
        let encode = |t: &phi_engine::PhiTokenizer| t.encode(code).expect("encodes");
        assert_eq!(encode(&built_in), encode(&from_file));
        assert_eq!(built_in.eos_id(), Some(50256));
    }
}
