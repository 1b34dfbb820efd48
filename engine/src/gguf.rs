//! GGUF files: loading llama.cpp's `phi2` layout (with metadata) or the mixformer layout of the
//! Phi-1 files published for candle (no metadata: shapes decide), and writing the `phi2` layout with
//! the tokenizer embedded, as llama.cpp's `convert_hf_to_gguf.py` does (`phi-lsp quantize`).
//!
//! candle's reader trusts what the file says: every tensor's offset and size is checked against the
//! file length here before a byte of it is read, so a truncated or hostile file is a one-line error.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};
use crate::model::{PhiModel, WeightSource};
use crate::tokenizer::{PhiTokenizer, END_OF_TEXT};
use crate::weights::{Engine, ModelFiles, WeightDType};

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// What llama.cpp and candle assume when `general.alignment` is absent; the writer uses it too.
const ALIGNMENT: u64 = 32;
/// Phi models have 2048 positions; this leaves room for long-context variants.
const MAX_CONTEXT: usize = 1 << 17;
/// Phi-1 and Phi-1.5 (the models the mixformer files hold) rotate the first 32 dims of each head.
const MIXFORMER_ROTARY_DIM: usize = 32;

fn load_error(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Load {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Loads a GGUF file: llama.cpp's `phi2` naming (with metadata) or the mixformer naming of the
/// Phi-1 GGUF files published for candle (no metadata: shapes decide).
pub fn load(path: &Path, tokenizer: &Path, device: &Device) -> Result<Engine> {
    let file = GgufFile::open(path)?;
    let (cfg, naming) = model_config(&file)?;
    let tokenizer = PhiTokenizer::from_file(tokenizer)?;
    if tokenizer.size() > cfg.vocab_size {
        return Err(load_error(
            path,
            format!(
                "the tokenizer has {} tokens but this model only {}: pass the --tokenizer of this model",
                tokenizer.size(),
                cfg.vocab_size
            ),
        ));
    }
    let source = GgufSource {
        file: &file,
        naming,
        cfg: &cfg,
        device: device.clone(),
    };
    let model = PhiModel::new(&cfg, &source).map_err(|e| match e {
        EngineError::Load { .. } => e,
        other => load_error(path, format!("cannot build the model from it ({other})")),
    })?;
    Ok(Engine {
        model,
        tokenizer: Arc::new(tokenizer),
        name: path.display().to_string(),
        dtype: file.matmul_type(),
    })
}

/// A GGUF file whose header has been read and whose tensor ranges all lie inside the file.
struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Absolute byte range of each tensor's data, checked against the file length.
    ranges: HashMap<String, (u64, usize)>,
    file: RefCell<File>,
}

impl GgufFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| load_error(path, format!("cannot open it: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| load_error(path, format!("cannot read it: {e}")))?
            .len();
        let mut reader = BufReader::new(file);
        check_header(&mut reader, file_len).map_err(|e| load_error(path, e))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| load_error(path, format!("cannot read it: {e}")))?;
        let content = Content::read(&mut reader).map_err(|e| {
            load_error(
                path,
                format!("truncated or not a GGUF file ({e}): download or convert it again"),
            )
        })?;
        let mut ranges = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let range = tensor_range(
                info.ggml_dtype,
                info.shape.dims(),
                content.tensor_data_offset,
                info.offset,
            )
            .map_err(|e| load_error(path, format!("tensor {name}: {e}; the file is damaged")))?;
            let end = range.0 + range.1 as u64;
            if end > file_len {
                return Err(load_error(
                    path,
                    format!(
                        "truncated: tensor {name} ends at byte {end} but the file has {file_len} bytes; download it again"
                    ),
                ));
            }
            ranges.insert(name.clone(), range);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            ranges,
            file: RefCell::new(reader.into_inner()),
        })
    }

    /// The type most 2-D tensors have (the matmul weights'), named as `--dtype` names types.
    fn matmul_type(&self) -> String {
        let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
        for info in self.content.tensor_infos.values().filter(|i| i.shape.rank() == 2) {
            match counts.iter_mut().find(|(t, _)| *t == info.ggml_dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((info.ggml_dtype, 1)),
            }
        }
        match counts.into_iter().max_by_key(|(_, n)| *n) {
            Some((dtype, _)) => match type_name(dtype) {
                "other" => format!("{dtype:?}").to_ascii_lowercase(),
                name => name.to_string(),
            },
            None => "unknown".into(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    fn missing(&self, name: &str) -> EngineError {
        load_error(
            &self.path,
            format!("tensor {name} is missing: the file is incomplete or not a Phi model"),
        )
    }

    /// Rows `first..first + n_rows` of a tensor (all of it for `None`), read straight onto `device`.
    /// Blocks run along a row, so any row range of a quantized tensor is whole blocks.
    fn read(&self, name: &str, rows: Option<(usize, usize)>, device: &Device) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.missing(name))?;
        let &(start, len) = self.ranges.get(name).ok_or_else(|| self.missing(name))?;
        let mut dims = info.shape.dims().to_vec();
        let (start, len) = match rows {
            None => (start, len),
            Some((first, n_rows)) => match dims.first_mut() {
                Some(total_rows) if first + n_rows <= *total_rows => {
                    let row_bytes = len / *total_rows;
                    *total_rows = n_rows;
                    (start + (first * row_bytes) as u64, n_rows * row_bytes)
                }
                _ => {
                    return Err(load_error(
                        &self.path,
                        format!(
                            "tensor {name} has shape {dims:?}, without rows {first}..{}",
                            first + n_rows
                        ),
                    ))
                }
            },
        };
        let mut bytes = vec![0u8; len];
        {
            let mut file = self.file.borrow_mut();
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| {
                    load_error(
                        &self.path,
                        format!("truncated: cannot read tensor {name} ({e}); download it again"),
                    )
                })?;
        }
        ggml_file::qtensor_from_ggml(info.ggml_dtype, &bytes, dims, device)
            .map_err(|e| load_error(&self.path, format!("tensor {name}: {e}")))
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(value) = self.meta(key) else {
            return Ok(None);
        };
        let number = match *value {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        };
        match number.and_then(|n| usize::try_from(n).ok()) {
            Some(n) => Ok(Some(n)),
            None => Err(load_error(
                &self.path,
                format!("metadata {key} is {value:?}, not a count"),
            )),
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v as f64)),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(load_error(
                &self.path,
                format!("metadata {key} is {other:?}, not a number"),
            )),
        }
    }
}

/// `(absolute start, byte length)` of a tensor's data, with every product checked: a hostile
/// header must not overflow or make the reader allocate more than the file holds.
fn tensor_range(
    dtype: GgmlDType,
    dims: &[usize],
    data_offset: u64,
    offset: u64,
) -> std::result::Result<(u64, usize), String> {
    let elems = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {dims:?} is impossibly large"))?;
    let block = dtype.block_size();
    if dims.last().is_some_and(|&row| row % block != 0) {
        return Err(format!(
            "rows of {:?} are not whole blocks of {block} for {dtype:?}",
            dims
        ));
    }
    let bytes = (elems / block)
        .checked_mul(dtype.type_size())
        .ok_or_else(|| format!("shape {dims:?} is impossibly large"))?;
    let start = data_offset
        .checked_add(offset)
        .ok_or_else(|| format!("offset {offset} is impossibly large"))?;
    start
        .checked_add(bytes as u64)
        .ok_or_else(|| format!("offset {offset} is impossibly large"))?;
    Ok((start, bytes))
}

/// A reader that knows how many bytes are left, so no length read from the file is trusted.
struct Bounded<'a> {
    reader: &'a mut BufReader<File>,
    pos: u64,
    len: u64,
}

impl Bounded<'_> {
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.reader
            .read_exact(&mut buf)
            .map_err(|_| "truncated: the header is cut short; download it again".to_string())?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn skip(&mut self, n: u64) -> std::result::Result<(), String> {
        if n > self.len.saturating_sub(self.pos) {
            return Err("truncated: the header runs past the end of the file; download it again".into());
        }
        let step = i64::try_from(n).map_err(|_| "a header length is impossibly large".to_string())?;
        self.reader
            .seek_relative(step)
            .map_err(|e| format!("cannot read it: {e}"))?;
        self.pos += n;
        Ok(())
    }
}

/// Walks the key-value section once before candle reads it: candle divides by
/// `general.alignment` unchecked, so a 0 there would panic it.
fn check_header(reader: &mut BufReader<File>, file_len: u64) -> std::result::Result<(), String> {
    let mut r = Bounded {
        reader,
        pos: 0,
        len: file_len,
    };
    let not_gguf = "truncated or not a GGUF file: download or convert it again";
    if r.u32().map_err(|_| not_gguf.to_string())? != GGUF_MAGIC {
        return Err(format!("not a GGUF file (wrong magic bytes): {not_gguf}"));
    }
    let wide = match r.u32()? {
        1 => false,
        2 | 3 => true,
        v => return Err(format!("GGUF version {v} is not supported (1 to 3 are)")),
    };
    let read_len = |r: &mut Bounded| if wide { r.u64() } else { r.u32().map(u64::from) };
    let _n_tensors = read_len(&mut r)?;
    let n_kv = read_len(&mut r)?;
    for _ in 0..n_kv {
        let key_len = read_len(&mut r)?;
        let is_alignment = if key_len == b"general.alignment".len() as u64 {
            let key: [u8; 17] = r.bytes()?;
            &key == b"general.alignment"
        } else {
            r.skip(key_len)?;
            false
        };
        let value_type = r.u32()?;
        // candle honours the 8-, 16- and 32-bit integer types here and ignores the rest.
        let alignment = match value_type {
            0 | 1 if is_alignment => u8::from_le_bytes(r.bytes()?) as u64,
            2 | 3 if is_alignment => u16::from_le_bytes(r.bytes()?) as u64,
            4 | 5 if is_alignment => r.u32()? as u64,
            _ => {
                skip_value(&mut r, value_type, wide, 0)?;
                continue;
            }
        };
        if !alignment.is_power_of_two() {
            return Err(format!(
                "general.alignment is {alignment}, not a power of two: the file is damaged"
            ));
        }
    }
    Ok(())
}

fn skip_value(r: &mut Bounded, value_type: u32, wide: bool, depth: usize) -> std::result::Result<(), String> {
    let read_len = |r: &mut Bounded| if wide { r.u64() } else { r.u32().map(u64::from) };
    match fixed_size(value_type) {
        Some(size) => r.skip(size),
        None if value_type == 8 => {
            let len = read_len(r)?;
            r.skip(len)
        }
        None if value_type == 9 => {
            if depth > 8 {
                return Err("metadata arrays nest too deeply: the file is damaged".into());
            }
            let element_type = r.u32()?;
            let len = read_len(r)?;
            match fixed_size(element_type) {
                Some(size) => r.skip(
                    len.checked_mul(size)
                        .ok_or_else(|| "a metadata array is impossibly large".to_string())?,
                ),
                // Each element reads at least its length prefix, so a lying count ends at EOF.
                None => (0..len).try_for_each(|_| skip_value(r, element_type, wide, depth + 1)),
            }
        }
        None => Err(format!(
            "metadata value type {value_type} is unknown: the file is damaged"
        )),
    }
}

fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Which names the file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// llama.cpp: `token_embd`, `blk.N.*`, `output_norm`, `output`; Q, K, V fused or split.
    Phi2 { fused_qkv: bool },
    /// candle's Phi-1 files: `layers.0.wte`, `layers.{N+1}.*`, head at `layers.{L+1}`.
    Mixformer { n_layers: usize },
}

/// The config a file describes: from its `phi2.*` metadata, or from the shapes of a mixformer file.
fn model_config(file: &GgufFile) -> Result<(PhiConfig, Naming)> {
    let path = &file.path;
    if let Some(arch) = file.meta("general.architecture") {
        if !matches!(arch, Value::String(s) if s == "phi2") {
            return Err(load_error(
                path,
                format!("general.architecture is {arch:?}, not \"phi2\": phi-lsp runs Phi-1 and Phi-2 only"),
            ));
        }
    }
    let base = PhiConfig::phi_1();
    let (cfg, naming) = if file.has("token_embd.weight") {
        let [vocab, hidden] = dims2(file, "token_embd.weight")?;
        let key = |k: &str| format!("phi2.{k}");
        let metadata_hidden = file.meta_usize(&key("embedding_length"))?.unwrap_or(hidden);
        if metadata_hidden != hidden {
            return Err(load_error(
                path,
                format!(
                    "phi2.embedding_length is {metadata_hidden} but token_embd.weight has {hidden} columns: the file is damaged"
                ),
            ));
        }
        let n_layers = match file.meta_usize(&key("block_count"))? {
            Some(n) => n,
            None => (0..)
                .take_while(|i| file.has(&format!("blk.{i}.attn_norm.weight")))
                .count(),
        };
        let heads = file.meta_usize(&key("attention.head_count"))?.ok_or_else(|| {
            load_error(
                path,
                "metadata phi2.attention.head_count is missing: convert the model again with phi-lsp quantize",
            )
        })?;
        let intermediate = match file.meta_usize(&key("feed_forward_length"))? {
            Some(n) => n,
            None => dims2(file, "blk.0.ffn_up.weight")?[0],
        };
        let head_dim = hidden.checked_div(heads).unwrap_or(0);
        // The rotary tables are allocated for every position: a context length from a hostile file
        // must not make that terabytes.
        let context = file
            .meta_usize(&key("context_length"))?
            .unwrap_or(base.max_position_embeddings);
        if context > MAX_CONTEXT {
            return Err(load_error(
                path,
                format!("phi2.context_length is {context}, more than {MAX_CONTEXT}: the file is damaged"),
            ));
        }
        // llama.cpp rotates the whole head when rope.dimension_count is absent.
        let rotary = file.meta_usize(&key("rope.dimension_count"))?.unwrap_or(head_dim);
        let cfg = PhiConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: n_layers,
            num_attention_heads: heads,
            num_key_value_heads: file.meta_usize(&key("attention.head_count_kv"))?,
            max_position_embeddings: context,
            // llama.cpp's key is `layer_norm_epsilon`; the other spelling is accepted as well.
            layer_norm_eps: match file.meta_f64(&key("attention.layer_norm_epsilon"))? {
                Some(eps) => eps,
                None => file
                    .meta_f64(&key("attention.layernorm_epsilon"))?
                    .unwrap_or(base.layer_norm_eps),
            },
            rope_theta: Some(file.meta_f64(&key("rope.freq_base"))?.unwrap_or(10000.0)),
            partial_rotary_factor: Some(if head_dim == 0 {
                0.0
            } else {
                rotary as f64 / head_dim as f64
            }),
            ..base
        };
        let fused_qkv = file.has("blk.0.attn_qkv.weight");
        (cfg, Naming::Phi2 { fused_qkv })
    } else if file.has("layers.0.wte.weight") {
        let [vocab, hidden] = dims2(file, "layers.0.wte.weight")?;
        let n_layers = (1..)
            .take_while(|i| file.has(&format!("layers.{i}.mixer.Wqkv.weight")))
            .count();
        let heads = match hidden {
            2048 => 32,
            h if h % 64 == 0 && h > 0 => h / 64,
            h => {
                return Err(load_error(
                    path,
                    format!(
                        "mixformer file with hidden size {h}: without metadata the heads cannot be known (Phi-1 has 2048 and 32 heads of 64)"
                    ),
                ))
            }
        };
        let head_dim = hidden / heads;
        tracing::info!(
            "{}: mixformer names without metadata; assuming Phi-1's shape rules: {heads} heads of {head_dim}, \
             rotary dim {MIXFORMER_ROTARY_DIM}, theta 10000, layer norm eps 1e-5, context 2048",
            path.display()
        );
        let cfg = PhiConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: dims2(file, "layers.1.mlp.fc1.weight")?[0],
            num_hidden_layers: n_layers,
            num_attention_heads: heads,
            num_key_value_heads: None,
            partial_rotary_factor: Some(MIXFORMER_ROTARY_DIM.min(head_dim) as f64 / head_dim as f64),
            rope_theta: Some(10000.0),
            ..base
        };
        (cfg, Naming::Mixformer { n_layers })
    } else {
        let mut some: Vec<&str> = file.content.tensor_infos.keys().map(String::as_str).collect();
        some.sort_unstable();
        some.truncate(3);
        return Err(load_error(
            path,
            format!(
                "neither llama.cpp phi2 names (token_embd.weight) nor mixformer names (layers.0.wte.weight); it has {some:?}: not a Phi model"
            ),
        ));
    };
    cfg.validate()
        .map_err(|e| load_error(path, format!("its metadata is not a usable Phi config: {e}")))?;
    Ok((cfg, naming))
}

fn dims2(file: &GgufFile, name: &str) -> Result<[usize; 2]> {
    match file.dims(name) {
        Some(&[rows, cols]) => Ok([rows, cols]),
        Some(dims) => Err(load_error(
            &file.path,
            format!("tensor {name} has shape {dims:?}, not 2-D: the file is damaged"),
        )),
        None => Err(file.missing(name)),
    }
}

/// Where a Hugging Face name lives in the file.
struct Mapped {
    name: String,
    /// For a fused Q,K,V tensor: the first row of this part, and the fused tensor's row count.
    part: Option<(usize, usize)>,
}

/// The file's tensors under Hugging Face names, so the model code is the same for every format.
struct GgufSource<'a> {
    file: &'a GgufFile,
    naming: Naming,
    cfg: &'a PhiConfig,
    device: Device,
}

impl GgufSource<'_> {
    fn map(&self, hf: &str) -> Result<Mapped> {
        self.try_map(hf).ok_or_else(|| {
            load_error(
                &self.file.path,
                format!("the model asked for {hf}, which has no GGUF name"),
            )
        })
    }

    fn try_map(&self, hf: &str) -> Option<Mapped> {
        let (module, kind) = hf.rsplit_once('.')?;
        let plain = |name: String| Mapped { name, part: None };
        let hidden = self.cfg.hidden_size;
        let kv = self.cfg.num_kv_heads() * self.cfg.head_dim();
        let fused = |name: String, part: usize| {
            let first = [0, hidden, hidden + kv][part];
            Mapped {
                name,
                part: Some((first, hidden + 2 * kv)),
            }
        };
        let mapped = match (self.naming, module) {
            (Naming::Phi2 { .. }, "model.embed_tokens") => plain(format!("token_embd.{kind}")),
            (Naming::Phi2 { .. }, "model.final_layernorm") => plain(format!("output_norm.{kind}")),
            (Naming::Phi2 { .. }, "lm_head") => plain(format!("output.{kind}")),
            (Naming::Mixformer { .. }, "model.embed_tokens") => plain(format!("layers.0.wte.{kind}")),
            (Naming::Mixformer { n_layers }, "model.final_layernorm") => {
                plain(format!("layers.{}.ln.{kind}", n_layers + 1))
            }
            (Naming::Mixformer { n_layers }, "lm_head") => {
                plain(format!("layers.{}.linear.{kind}", n_layers + 1))
            }
            (naming, _) => {
                let (layer, part) = module.strip_prefix("model.layers.")?.split_once('.')?;
                let layer: usize = layer.parse().ok()?;
                let qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
                    .iter()
                    .position(|p| *p == part);
                match naming {
                    Naming::Phi2 { fused_qkv } => match (qkv, part) {
                        (Some(i), _) if fused_qkv => fused(format!("blk.{layer}.attn_qkv.{kind}"), i),
                        (Some(i), _) => plain(format!(
                            "blk.{layer}.{}.{kind}",
                            ["attn_q", "attn_k", "attn_v"][i]
                        )),
                        (None, "input_layernorm") => plain(format!("blk.{layer}.attn_norm.{kind}")),
                        (None, "self_attn.dense") => plain(format!("blk.{layer}.attn_output.{kind}")),
                        (None, "mlp.fc1") => plain(format!("blk.{layer}.ffn_up.{kind}")),
                        (None, "mlp.fc2") => plain(format!("blk.{layer}.ffn_down.{kind}")),
                        _ => return None,
                    },
                    Naming::Mixformer { .. } => {
                        let block = layer + 1;
                        match (qkv, part) {
                            (Some(i), _) => fused(format!("layers.{block}.mixer.Wqkv.{kind}"), i),
                            (None, "input_layernorm") => plain(format!("layers.{block}.ln.{kind}")),
                            (None, "self_attn.dense") => {
                                plain(format!("layers.{block}.mixer.out_proj.{kind}"))
                            }
                            (None, "mlp.fc1") => plain(format!("layers.{block}.mlp.fc1.{kind}")),
                            (None, "mlp.fc2") => plain(format!("layers.{block}.mlp.fc2.{kind}")),
                            _ => return None,
                        }
                    }
                }
            }
        };
        Some(mapped)
    }

    /// Checks the file's shape of `mapped` (the whole fused tensor for a Q/K/V part) before reading.
    fn check_shape(&self, mapped: &Mapped, shape: &[usize]) -> Result<()> {
        let dims = self
            .file
            .dims(&mapped.name)
            .ok_or_else(|| self.file.missing(&mapped.name))?;
        let mut expected = shape.to_vec();
        if let (Some((_, fused_rows)), Some(first)) = (mapped.part, expected.first_mut()) {
            *first = fused_rows;
        }
        if dims != expected.as_slice() {
            return Err(load_error(
                &self.file.path,
                format!(
                    "tensor {} has shape {dims:?} but the model it describes needs {expected:?}: the file is damaged or its metadata is wrong",
                    mapped.name
                ),
            ));
        }
        Ok(())
    }
}

impl WeightSource for GgufSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let mapped = self.map(name)?;
        self.check_shape(&mapped, shape)?;
        // Norms, biases and the embedding are small or gathered row by row: kept dense in f32.
        let mut tensor = self
            .file
            .read(&mapped.name, None, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        if let (Some((first, _)), Some(&n)) = (mapped.part, shape.first()) {
            tensor = tensor.narrow(0, first, n)?;
        }
        Ok(tensor.to_dtype(DType::F32)?.to_device(&self.device)?)
    }

    fn matmul_weight(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<QMatMul> {
        let mapped = self.map(name)?;
        self.check_shape(&mapped, &[out_dim, in_dim])?;
        let rows = mapped.part.map(|(first, _)| (first, out_dim));
        let qtensor = self.file.read(&mapped.name, rows, &self.device)?;
        // candle widens 16-bit weights to f32 (twice the memory); the CPU reads them as stored.
        let sixteen_bit = match qtensor.dtype() {
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let (Some(dtype), true) = (sixteen_bit, self.device.is_cpu()) {
            let data = qtensor.data()?;
            let weight = Tensor::from_raw_buffer(&data, dtype, &[out_dim, in_dim], &self.device)?;
            return Ok(QMatMul::Tensor(weight));
        }
        Ok(QMatMul::from_arc(Arc::new(qtensor))?)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

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

fn type_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4K => "q4k",
        _ => "other",
    }
}

/// The tensors in llama.cpp's order, with their GGUF types and sizes.
fn plan(cfg: &PhiConfig, dtype: WeightDType) -> Vec<Planned> {
    let (hidden, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let weight_type = |in_dim: usize| match dtype {
        WeightDType::F32 => GgmlDType::F32,
        WeightDType::F16 => GgmlDType::F16,
        WeightDType::BF16 => GgmlDType::BF16,
        WeightDType::Q8_0 | WeightDType::Q4K => match dtype.quantized() {
            Some(q) if in_dim.is_multiple_of(q.block_size()) => q,
            _ => GgmlDType::F32,
        },
    };
    let mut plan = Vec::new();
    let mut add = |gguf: String, hf: String, shape: Vec<usize>| {
        let dtype = match shape[..] {
            [_, in_dim] => weight_type(in_dim),
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
