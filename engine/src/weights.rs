//! Finding and loading a checkpoint: a Hugging Face model folder (config.json, tokenizer.json,
//! model.safetensors or a sharded index), checked file by file so a bad folder fails with a message
//! that names the file and the fix.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};
use crate::model::{PhiModel, WeightSource};
use crate::tokenizer::PhiTokenizer;

/// How the weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    F16,
    BF16,
    /// 2-D weights quantized to 8 bits (blocks of 32) while loading; the rest stays f32.
    Q8_0,
    /// 2-D weights quantized to 4-bit k-quants (blocks of 256) while loading; the rest stays f32.
    Q4K,
    /// llama.cpp's Q4_K_M mix: q4k, but 6-bit k-quants (q6k) for `lm_head` and for `v_proj` and
    /// `fc2` of the layers llama.cpp gives more bits ([`WeightDType::matrix_type`]).
    Q4KM,
}

impl WeightDType {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4k or q4_k_m";

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => WeightDType::F32,
            "f16" => WeightDType::F16,
            "bf16" => WeightDType::BF16,
            "q8_0" | "q8" => WeightDType::Q8_0,
            "q4k" | "q4_k" => WeightDType::Q4K,
            "q4_k_m" | "q4km" => WeightDType::Q4KM,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::BF16 => "bf16",
            WeightDType::Q8_0 => "q8_0",
            WeightDType::Q4K => "q4k",
            WeightDType::Q4KM => "q4_k_m",
        }
    }

    /// The dtype the weights are held in where they are not quantized.
    pub fn stored_dtype(self) -> DType {
        match self {
            WeightDType::F16 => DType::F16,
            WeightDType::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The dtype of activations, norms and biases on `device`: the stored dtype on a GPU; f32 on
    /// the CPU, which has no fast 16-bit arithmetic (16-bit matmul weights are widened as they
    /// are read, see `qmatmul`).
    pub fn activation_dtype(self, device: &Device) -> DType {
        if device.is_cpu() {
            DType::F32
        } else {
            self.stored_dtype()
        }
    }

    /// The dtype of the KV cache on the CPU: f32 for f32 weights, else f16 (as llama.cpp keeps it;
    /// a decode step reads the whole cache, so half the bytes is speed). A GPU keeps a bf16
    /// model's cache in bf16, the same size.
    pub fn kv_dtype(self) -> DType {
        if self == WeightDType::F32 {
            DType::F32
        } else {
            DType::F16
        }
    }

    /// Bytes of weights a model of `cfg` holds in memory at this dtype, counting what the loader
    /// does: matmul weights and the embedding are quantized where their rows are whole blocks;
    /// norms, biases and narrow matrices stay in the stored dtype (on the CPU a 16-bit model
    /// widens its norms and biases to f32: ~1 MB for Phi-1, not counted).
    pub fn weight_bytes(self, cfg: &PhiConfig) -> u64 {
        let dense = self.stored_dtype().size_in_bytes() as u64;
        let (h, i, v) = (
            cfg.hidden_size as u64,
            cfg.intermediate_size as u64,
            cfg.vocab_size as u64,
        );
        let kv = (cfg.num_kv_heads() * cfg.head_dim()) as u64;
        let n_layers = cfg.num_hidden_layers;
        let matmul = |name: &str, out_dim: u64, in_dim: u64| {
            self.matrix_bytes(self.matrix_type(name, n_layers), out_dim, in_dim)
        };
        let layers: u64 = (0..n_layers)
            .map(|l| {
                let name = |module: &str| format!("model.layers.{l}.{module}.weight");
                matmul(&name("self_attn.q_proj"), h, h)
                    + matmul(&name("self_attn.k_proj"), kv, h)
                    + matmul(&name("self_attn.v_proj"), kv, h)
                    + matmul(&name("self_attn.dense"), h, h)
                    + matmul(&name("mlp.fc1"), i, h)
                    + matmul(&name("mlp.fc2"), h, i)
                    + (h + 2 * kv + h + i + h + 2 * h) * dense
            })
            .sum();
        let embedding = self.embedding_bytes(cfg);
        embedding + layers + 2 * h * dense + matmul("lm_head.weight", v, h) + v * dense
    }

    /// Bytes of the embedding table as the loader holds it.
    fn embedding_bytes(self, cfg: &PhiConfig) -> u64 {
        let (h, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
        let name = "model.embed_tokens.weight";
        self.matrix_bytes(self.matrix_type(name, cfg.num_hidden_layers), v, h)
    }

    /// Bytes of weights one decode step reads: all of [`WeightDType::weight_bytes`] (the quantized
    /// kernels read q4k and q8_0 blocks of the stored size) but the embedding table, of which a
    /// token reads one row.
    pub fn weight_bytes_per_token(self, cfg: &PhiConfig) -> u64 {
        let embedding = self.embedding_bytes(cfg);
        self.weight_bytes(cfg) - embedding + embedding / cfg.vocab_size as u64
    }

    /// Bytes of an `out_dim` x `in_dim` matrix as the loader holds it: quantized where its rows
    /// are whole blocks, else in the stored dtype.
    fn matrix_bytes(self, quantized: Option<GgmlDType>, out_dim: u64, in_dim: u64) -> u64 {
        match quantized {
            Some(q) if in_dim.is_multiple_of(q.block_size() as u64) => {
                out_dim * in_dim / q.block_size() as u64 * q.type_size() as u64
            }
            _ => out_dim * in_dim * self.stored_dtype().size_in_bytes() as u64,
        }
    }

    /// The quantized type of most matrices (q4k for the Q4_K_M mix); `None` for the dense dtypes.
    pub fn quantized(self) -> Option<GgmlDType> {
        match self {
            WeightDType::Q8_0 => Some(GgmlDType::Q8_0),
            WeightDType::Q4K | WeightDType::Q4KM => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// The quantized type of the matrix `name` (a Hugging Face tensor name) of a model of
    /// `n_layers` layers; `None` for the dense dtypes. For the Q4_K_M mix, llama.cpp's
    /// `llama_tensor_get_type`: q6k for `lm_head` (GGUF `output`), and for `v_proj` (`attn_v`)
    /// and `fc2` (`ffn_down`) of layer `i` where `use_more_bits(i, n)` holds: `i < n/8`,
    /// `i >= 7n/8`, or `(i - n/8) % 3 == 2` (12 of Phi-1's 24 layers); q4k for the rest.
    pub fn matrix_type(self, name: &str, n_layers: usize) -> Option<GgmlDType> {
        let more_bits = |layer: usize| {
            let eighth = n_layers / 8;
            layer < eighth || layer >= 7 * n_layers / 8 || (layer as isize - eighth as isize) % 3 == 2
        };
        let q6k = name == "lm_head.weight"
            || name
                .strip_prefix("model.layers.")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(layer, module)| {
                    matches!(module, "self_attn.v_proj.weight" | "mlp.fc2.weight")
                        && layer.parse().is_ok_and(more_bits)
                });
        match self {
            WeightDType::Q4KM if q6k => Some(GgmlDType::Q6K),
            _ => self.quantized(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bytes_of_phi_1() {
        let cfg = PhiConfig::phi_1();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        assert_eq!(WeightDType::F32.weight_bytes(&cfg), cfg.n_params() * 4);
        assert_eq!(WeightDType::F16.weight_bytes(&cfg), cfg.n_params() * 2);
        // q8_0 stores 34 bytes per 32 weights, q4k 144 per 256; with norms and biases in f32,
        // Phi-1 holds 1.41 and 0.74 GiB (the figures `phi-lsp memory` prints).
        let q8 = gib(WeightDType::Q8_0.weight_bytes(&cfg));
        let q4 = gib(WeightDType::Q4K.weight_bytes(&cfg));
        assert!((1.40..1.42).contains(&q8), "{q8}");
        assert!((0.74..0.76).contains(&q4), "{q4}");
    }

    /// llama.cpp's Q4_K_M rule worked by hand for 24 layers: `n/8 = 3`, so layers 0–2, 21–23 and
    /// those with `(i − 3) % 3 == 2` (5, 8, …, 20) keep `attn_v` and `ffn_down` in q6k.
    #[test]
    fn q4_k_m_keeps_llama_cpps_matrices_in_q6k() {
        let q6k_layers = [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23];
        let dtype = WeightDType::Q4KM;
        for layer in 0..24 {
            let expected = if q6k_layers.contains(&layer) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            for module in ["self_attn.v_proj", "mlp.fc2"] {
                let name = format!("model.layers.{layer}.{module}.weight");
                assert_eq!(dtype.matrix_type(&name, 24), Some(expected), "{name}");
            }
            for module in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.dense",
                "mlp.fc1",
            ] {
                let name = format!("model.layers.{layer}.{module}.weight");
                assert_eq!(dtype.matrix_type(&name, 24), Some(GgmlDType::Q4K), "{name}");
            }
        }
        assert_eq!(dtype.matrix_type("lm_head.weight", 24), Some(GgmlDType::Q6K));
        assert_eq!(
            dtype.matrix_type("model.embed_tokens.weight", 24),
            Some(GgmlDType::Q4K)
        );
        assert_eq!(
            WeightDType::Q4K.matrix_type("lm_head.weight", 24),
            Some(GgmlDType::Q4K)
        );
        assert_eq!(WeightDType::F16.matrix_type("lm_head.weight", 24), None);
        // 0.74 GiB of q4k plus 66 more bytes per 256 weights of lm_head (105M weights) and of
        // 12 layers' v_proj (4.2M) and fc2 (16.8M): 92 MB more.
        let q4_k_m = WeightDType::Q4KM.weight_bytes(&PhiConfig::phi_1()) as f64 / (1u64 << 30) as f64;
        assert!((0.82..0.84).contains(&q4_k_m), "{q4_k_m}");
    }

    #[test]
    fn weight_bytes_per_token_of_phi_1() {
        let cfg = PhiConfig::phi_1();
        // f32: 1.313e9 weights read per token (all but the embedding table), 4 bytes each.
        let f32 = WeightDType::F32.weight_bytes_per_token(&cfg);
        assert!((f32 as f64 / 1e9 - 5.25).abs() < 0.02, "{f32}");
        let q8 = WeightDType::Q8_0.weight_bytes_per_token(&cfg);
        assert!((q8 as f64 / 1e9 - 1.40).abs() < 0.02, "{q8}");
        let q4k = WeightDType::Q4K.weight_bytes_per_token(&cfg);
        assert!((q4k as f64 / 1e9 - 0.74).abs() < 0.02, "{q4k}");
    }
}

/// Tensors from safetensors files, matmul weights quantized on the way in when asked.
pub struct SafetensorsSource<'a> {
    vb: VarBuilder<'a>,
    /// Which matrices are quantized to what ([`WeightDType::matrix_type`]), for a model of
    /// `n_layers` layers.
    dtype: WeightDType,
    n_layers: usize,
    /// Of norms, biases and the embedding; matmul weights stay in the `vb`'s dtype.
    activations: DType,
}

impl WeightSource for SafetensorsSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.vb.get(shape, name)?.to_dtype(self.activations)?)
    }

    fn matmul_weight(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<QMatMul> {
        let weight = self.vb.get((out_dim, in_dim), name)?;
        match self.dtype.matrix_type(name, self.n_layers) {
            // Rows must be whole blocks (32 for q8_0, 256 for k-quants); narrower ones stay dense.
            Some(q) if in_dim.is_multiple_of(q.block_size()) => {
                Ok(QMatMul::from_qtensor(QTensor::quantize(&weight, q)?)?)
            }
            _ => Ok(QMatMul::Tensor(weight)),
        }
    }

    fn dtype(&self) -> DType {
        self.activations
    }

    fn device(&self) -> &Device {
        self.vb.device()
    }
}

/// The files of one model, found and checked but not yet loaded.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

fn load_error(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Load {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl ModelFiles {
    /// A folder in Hugging Face layout. `tokenizer` overrides the folder's tokenizer.json.
    pub fn from_dir(dir: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(load_error(
                dir,
                "no such model folder: pass a folder with config.json, tokenizer.json and model.safetensors",
            ));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(load_error(
                &config,
                "missing: a Hugging Face model folder needs config.json",
            ));
        }
        let tokenizer = tokenizer
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        if !tokenizer.is_file() {
            return Err(load_error(
                &tokenizer,
                "missing: pass --tokenizer or use a Hugging Face model folder that has tokenizer.json",
            ));
        }
        let weights = find_safetensors(dir)?;
        Ok(ModelFiles {
            config,
            tokenizer,
            weights,
        })
    }
}

fn find_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shards_from_index(dir, &index);
    }
    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        if dir.join(pickle).exists() {
            return Err(load_error(
                &dir.join(pickle),
                "pickle checkpoints are refused because loading them can run arbitrary code: convert with \
                 `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('DIR', safe_serialization=True)\"`",
            ));
        }
    }
    Err(load_error(
        dir,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

/// Shard names come from a file: they must be plain file names inside `dir`.
fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(index).map_err(|e| load_error(index, format!("cannot read it: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| load_error(index, format!("not valid JSON ({e}): re-download it")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| load_error(index, "no weight_map object: re-download it"))?;
    let mut shards = BTreeSet::new();
    for value in map.values() {
        let name = value
            .as_str()
            .ok_or_else(|| load_error(index, "a weight_map value is not a string"))?;
        let mut components = Path::new(name).components();
        let plain = matches!(
            (components.next(), components.next()),
            (Some(Component::Normal(_)), None)
        );
        if !plain {
            return Err(load_error(
                index,
                format!("shard {name:?} is not a plain file name in the model folder; refusing it"),
            ));
        }
        shards.insert(name.to_string());
    }
    shards
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(load_error(
                    &path,
                    "missing shard named by model.safetensors.index.json: re-download the model",
                ))
            }
        })
        .collect()
}

/// Reads each file's header so a truncated download is reported with its name, before any tensor
/// is touched.
fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| load_error(path, format!("cannot open it: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| load_error(path, e.to_string()))?
        .len();
    let truncated = || load_error(path, "truncated or not a safetensors file: download it again");
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| truncated())?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(truncated());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|_| truncated())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|_| truncated())?;
    let data_len = file_len - 8 - header_len;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|v| v.as_u64())
            .ok_or_else(truncated)?;
        if end > data_len {
            return Err(load_error(
                path,
                format!("truncated: tensor {name} ends at byte {end} but the data has {data_len} bytes; download it again"),
            ));
        }
    }
    Ok(())
}

/// A loaded model: weights on their device and the tokenizer that goes with them.
pub struct Engine {
    pub model: PhiModel,
    pub tokenizer: std::sync::Arc<PhiTokenizer>,
    /// Where it came from, for logs and status.
    pub name: String,
    /// What the weights are held as (`q8_0`, `f32`, ...; for a GGUF file its matmul weights' type).
    pub dtype: String,
}

impl Engine {
    pub fn load(files: &ModelFiles, device: &Device, dtype: WeightDType) -> Result<Self> {
        let cfg = PhiConfig::from_file(&files.config)?;
        let tokenizer = PhiTokenizer::from_file(&files.tokenizer)?;
        if tokenizer.size() > cfg.vocab_size {
            return Err(load_error(
                &files.tokenizer,
                format!(
                    "the tokenizer has {} tokens but the model only {}: use the tokenizer.json of this model",
                    tokenizer.size(),
                    cfg.vocab_size
                ),
            ));
        }
        for path in &files.weights {
            check_safetensors(path)?;
        }
        // SAFETY: the files are memory-mapped read-only; they must not be modified while loaded,
        // as with every mmap-based loader.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype.stored_dtype(), device) }
            .map_err(|e| load_error(&files.weights[0], format!("cannot map the weights: {e}")))?;
        let source = SafetensorsSource {
            vb,
            dtype,
            n_layers: cfg.num_hidden_layers,
            activations: dtype.activation_dtype(device),
        };
        let model = PhiModel::new(&cfg, &source).map_err(|e| {
            let where_ = files
                .weights
                .first()
                .map(|p| p.as_path())
                .unwrap_or(files.config.as_path());
            load_error(
                where_,
                format!("does not match config.json ({e}): use the config.json that came with these weights"),
            )
        })?;
        let name = files
            .config
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Engine {
            model,
            tokenizer: std::sync::Arc::new(tokenizer),
            name,
            dtype: dtype.name().into(),
        })
    }
}
