//! Writing GGUF files in llama.cpp's `phi2` layout (`phi-lsp quantize`): the tensor plan, the
//! metadata `convert_hf_to_gguf.py` writes for Phi-1, the tokenizer as a GPT-2 BPE vocabulary, and
//! the file itself, written under a temporary name first.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use super::{load_error, ALIGNMENT, GGUF_MAGIC};
use crate::config::PhiConfig;
use crate::error::Result;
use crate::tokenizer::END_OF_TEXT;
use crate::weights::{ModelFiles, WeightDType};

/// What [`write`] put in the file.
#[derive(Debug, Clone)]
pub struct WriteSummary {
    pub path: PathBuf,
    /// Size of the whole file.
    pub bytes: u64,
    pub n_tensors: usize,
    /// Per GGUF tensor type (`"q4k"`, `"f32"`, ...): how many tensors and their data bytes.
    pub by_type: Vec<(String, usize, u64)>,
    /// 2-D weights left in f32 because their rows are not whole quantization blocks.
    pub kept_dense: Vec<String>,
}

/// One tensor to write: where it comes from and what it becomes.
struct Planned {
    gguf: String,
    hf: String,
    /// Candle order (`[out, in]`); GGUF stores it reversed.
    shape: Vec<usize>,
    dtype: GgmlDType,
    bytes: usize,
}

/// Writes the safetensors model of `files` as a GGUF file in llama.cpp's `phi2` layout: split
/// `attn_q/attn_k/attn_v` as `convert_hf_to_gguf.py` writes for `PhiForCausalLM`, metadata as its
/// `Phi2Model` writes, the tokenizer as its GPT-2 BPE vocabulary. 2-D weights take `dtype` (rows
/// that are not whole blocks stay f32), norms and biases stay f32. Written to `OUT.partial` first,
/// so a failure leaves no half file under the name.
pub fn write(files: &ModelFiles, out: &Path, dtype: WeightDType) -> Result<WriteSummary> {
    let cfg = PhiConfig::from_file(&files.config)?;
    let weights_path = files
        .weights
        .first()
        .map(PathBuf::as_path)
        .unwrap_or(&files.config);
    // SAFETY: read-only maps of files that must not change while this runs, as every mmap loader.
    let st = unsafe { MmapedSafetensors::multi(&files.weights) }.map_err(|e| {
        load_error(
            weights_path,
            format!("truncated or not a safetensors file ({e}); download it again"),
        )
    })?;
    let plan = plan(&cfg, dtype);
    for planned in &plan {
        let view = st.get(&planned.hf).map_err(|_| {
            load_error(
                weights_path,
                format!(
                    "tensor {} is missing: the weights do not match config.json",
                    planned.hf
                ),
            )
        })?;
        if view.shape() != planned.shape.as_slice() {
            return Err(load_error(
                weights_path,
                format!(
                    "tensor {} has shape {:?} but config.json says {:?}: use the config.json that came with these weights",
                    planned.hf,
                    view.shape(),
                    planned.shape
                ),
            ));
        }
    }
    let metadata = metadata(files, &cfg, dtype)?;
    let header = header(&metadata, &plan);

    let mut partial = OsString::from(out.as_os_str());
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = write_file(&partial, &header, &plan, &st, weights_path);
    let bytes = match written.and_then(|bytes| {
        std::fs::rename(&partial, out)
            .map_err(|e| load_error(out, format!("cannot write it: {e}")))
            .map(|_| bytes)
    }) {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };

    let mut by_type: Vec<(String, usize, u64)> = Vec::new();
    for planned in &plan {
        let name = type_name(planned.dtype).to_string();
        match by_type.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 += planned.bytes as u64;
            }
            None => by_type.push((name, 1, planned.bytes as u64)),
        }
    }
    let kept_dense = match dtype.quantized() {
        Some(_) => plan
            .iter()
            .filter(|p| p.shape.len() == 2 && p.dtype == GgmlDType::F32)
            .map(|p| p.gguf.clone())
            .collect(),
        None => Vec::new(),
    };
    Ok(WriteSummary {
        path: out.to_path_buf(),
        bytes,
        n_tensors: plan.len(),
        by_type,
        kept_dense,
    })
}

pub(super) fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4K => "q4k",
        GgmlDType::Q6K => "q6k",
        _ => "other",
    }
}

/// The tensors in llama.cpp's order, with their GGUF types and sizes.
fn plan(cfg: &PhiConfig, dtype: WeightDType) -> Vec<Planned> {
    let (hidden, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let weight_type = |hf: &str, in_dim: usize| match dtype {
        WeightDType::F32 => GgmlDType::F32,
        WeightDType::F16 => GgmlDType::F16,
        WeightDType::BF16 => GgmlDType::BF16,
        WeightDType::Q8_0 | WeightDType::Q4K | WeightDType::Q4KM => {
            match dtype.matrix_type(hf, cfg.num_hidden_layers) {
                Some(q) if in_dim.is_multiple_of(q.block_size()) => q,
                _ => GgmlDType::F32,
            }
        }
    };
    let mut plan = Vec::new();
    let mut add = |gguf: String, hf: String, shape: Vec<usize>| {
        let dtype = match shape[..] {
            [_, in_dim] => weight_type(&hf, in_dim),
            _ => GgmlDType::F32,
        };
        let elems: usize = shape.iter().product();
        let bytes = elems / dtype.block_size() * dtype.type_size();
        plan.push(Planned {
            gguf,
            hf,
            shape,
            dtype,
            bytes,
        });
    };
    add(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![vocab, hidden],
    );
    for layer in 0..cfg.num_hidden_layers {
        let linears = [
            ("attn_q", "self_attn.q_proj", hidden, hidden),
            ("attn_k", "self_attn.k_proj", kv, hidden),
            ("attn_v", "self_attn.v_proj", kv, hidden),
            ("attn_output", "self_attn.dense", hidden, hidden),
            ("ffn_up", "mlp.fc1", inter, hidden),
            ("ffn_down", "mlp.fc2", hidden, inter),
        ];
        let blk = |name: &str, kind: &str| format!("blk.{layer}.{name}.{kind}");
        let hf = |name: &str, kind: &str| format!("model.layers.{layer}.{name}.{kind}");
        for kind in ["weight", "bias"] {
            add(blk("attn_norm", kind), hf("input_layernorm", kind), vec![hidden]);
        }
        for (gguf, module, out_dim, in_dim) in linears {
            add(blk(gguf, "weight"), hf(module, "weight"), vec![out_dim, in_dim]);
            add(blk(gguf, "bias"), hf(module, "bias"), vec![out_dim]);
        }
    }
    for kind in ["weight", "bias"] {
        add(
            format!("output_norm.{kind}"),
            format!("model.final_layernorm.{kind}"),
            vec![hidden],
        );
    }
    add(
        "output.weight".into(),
        "lm_head.weight".into(),
        vec![vocab, hidden],
    );
    add("output.bias".into(), "lm_head.bias".into(), vec![vocab]);
    plan
}

/// A metadata value, typed as gguf-py types what `convert_hf_to_gguf.py` writes.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

// llama.cpp's token types (llama_token_type).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

fn metadata(files: &ModelFiles, cfg: &PhiConfig, dtype: WeightDType) -> Result<Vec<(String, Meta)>> {
    let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    // llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0, MOSTLY_Q4_K_S.
    let file_type = match dtype {
        WeightDType::F32 => 0,
        WeightDType::F16 => 1,
        WeightDType::BF16 => 32,
        WeightDType::Q8_0 => 7,
        WeightDType::Q4K => 14,
        WeightDType::Q4KM => 15,
    };
    let name = files
        .config
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "phi".into());
    let vocab = tokenizer_vocab(&files.tokenizer, cfg.vocab_size)?;
    let mut meta = vec![
        ("general.architecture".to_string(), Meta::Str("phi2".into())),
        ("general.name".into(), Meta::Str(name)),
        (
            "phi2.context_length".into(),
            Meta::U32(to_u32(cfg.max_position_embeddings)),
        ),
        ("phi2.embedding_length".into(), Meta::U32(to_u32(cfg.hidden_size))),
        (
            "phi2.feed_forward_length".into(),
            Meta::U32(to_u32(cfg.intermediate_size)),
        ),
        (
            "phi2.block_count".into(),
            Meta::U32(to_u32(cfg.num_hidden_layers)),
        ),
        (
            "phi2.attention.head_count".into(),
            Meta::U32(to_u32(cfg.num_attention_heads)),
        ),
        (
            "phi2.attention.head_count_kv".into(),
            Meta::U32(to_u32(cfg.num_kv_heads())),
        ),
        (
            "phi2.attention.layer_norm_epsilon".into(),
            Meta::F32(cfg.layer_norm_eps as f32),
        ),
        (
            "phi2.rope.dimension_count".into(),
            Meta::U32(to_u32(cfg.rotary_dim())),
        ),
        ("phi2.rope.freq_base".into(), Meta::F32(cfg.rope_theta() as f32)),
        ("general.file_type".into(), Meta::U32(file_type)),
        ("general.quantization_version".into(), Meta::U32(2)),
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        // Phi-1's tokenizer is Phi-2's (CodeGen's GPT-2 BPE): llama.cpp's "phi-2" is the GPT-2 split.
        ("tokenizer.ggml.pre".into(), Meta::Str("phi-2".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strs(vocab.tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(vocab.types)),
        ("tokenizer.ggml.merges".into(), Meta::Strs(vocab.merges)),
    ];
    if let Some(eos) = vocab.end_of_text {
        for key in ["bos", "eos", "unk"] {
            meta.push((format!("tokenizer.ggml.{key}_token_id"), Meta::U32(eos)));
        }
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)));
    Ok(meta)
}

struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    end_of_text: Option<u32>,
}

/// The tokenizer as llama.cpp's `gpt2` vocabulary: one token per embedding row (rows the
/// tokenizer lacks are `[PAD{i}]`, unused), added tokens typed control or user-defined.
fn tokenizer_vocab(path: &Path, n_rows: usize) -> Result<Vocab> {
    let bad = |message: String| load_error(path, message);
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e}): re-download it")))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(
            "only byte-level BPE tokenizers (as Phi-1's) can be embedded in a GGUF file".into(),
        ));
    }
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n_rows];
    let mut place = |id: u64, token: &str, kind: i32| -> Result<()> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get_mut(i))
            .ok_or_else(|| {
                bad(format!(
                    "token {token:?} has id {id}, beyond the model's {n_rows} rows"
                ))
            })?;
        *slot = Some((token.to_string(), kind));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object: re-download it".into()))?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token {token:?} has no integer id")))?;
        place(id, token, TOKEN_NORMAL)?;
    }
    let mut end_of_text = None;
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err(bad("an added_tokens entry has no id or content".into()));
        };
        let special = added["special"].as_bool().unwrap_or(false);
        place(
            id,
            content,
            if special {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            },
        )?;
        if content == END_OF_TEXT {
            end_of_text = u32::try_from(id).ok();
        }
    }
    let mut merges = Vec::new();
    for merge in model["merges"].as_array().into_iter().flatten() {
        // Older tokenizer.json files write "a b", newer ones ["a", "b"].
        let pair = match merge {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(parts) => match parts.as_slice() {
                [a, b] => a.as_str().zip(b.as_str()).map(|(a, b)| format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| bad(format!("merge {merge} is not a pair of tokens")))?);
    }
    let (tokens, types) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED)))
        .unzip();
    Ok(Vocab {
        tokens,
        types,
        merges,
        end_of_text,
    })
}

/// Header bytes up to the (aligned) start of the tensor data.
fn header(metadata: &[(String, Meta)], plan: &[Planned]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(GGUF_MAGIC.to_le_bytes());
    out.extend(3u32.to_le_bytes());
    out.extend((plan.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    // gguf_type: UINT32 4, INT32 5, FLOAT32 6, BOOL 7, STRING 8, ARRAY 9.
    for (key, value) in metadata {
        string(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    string(&mut out, item);
                }
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    out.extend(item.to_le_bytes());
                }
            }
        }
    }
    // llama.cpp requires each offset to be the previous one plus its size padded to the alignment.
    let mut offset = 0u64;
    for planned in plan {
        string(&mut out, &planned.gguf);
        out.extend((planned.shape.len() as u32).to_le_bytes());
        for &dim in planned.shape.iter().rev() {
            out.extend((dim as u64).to_le_bytes());
        }
        out.extend(ggml_type_id(planned.dtype).to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += padded(planned.bytes as u64);
    }
    out.resize(padded(out.len() as u64) as usize, 0);
    out
}

fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// ggml_type ids of the types the writer produces.
fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        _ => 0,
    }
}

/// Streams the tensors one at a time (a Phi-1 f32 file is 5.3 GiB; it is never all in memory).
fn write_file(
    path: &Path,
    header: &[u8],
    plan: &[Planned],
    st: &MmapedSafetensors,
    weights_path: &Path,
) -> Result<u64> {
    let io_error = |e: std::io::Error| load_error(path, format!("cannot write it: {e}"));
    let mut out = BufWriter::new(File::create(path).map_err(io_error)?);
    out.write_all(header).map_err(io_error)?;
    let mut total = header.len() as u64;
    for planned in plan {
        let tensor = st
            .load(&planned.hf, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| load_error(weights_path, format!("cannot read tensor {}: {e}", planned.hf)))?;
        let qtensor = QTensor::quantize(&tensor, planned.dtype)?;
        let data = qtensor.data()?;
        if data.len() != planned.bytes {
            return Err(load_error(
                path,
                format!(
                    "internal error: tensor {} is {} bytes, {} planned",
                    planned.gguf,
                    data.len(),
                    planned.bytes
                ),
            ));
        }
        out.write_all(&data).map_err(io_error)?;
        let padding = padded(data.len() as u64) - data.len() as u64;
        out.write_all(&vec![0u8; padding as usize]).map_err(io_error)?;
        total += data.len() as u64 + padding;
    }
    out.into_inner()
        .map_err(|e| io_error(e.into_error()))?
        .sync_all()
        .map_err(io_error)?;
    Ok(total)
}
