//! GGUF files: loading llama.cpp's `phi2` layout (with metadata) or the mixformer layout of the
//! Phi-1 files published for candle (no metadata: shapes decide), and writing the `phi2` layout with
//! the tokenizer embedded, as llama.cpp's `convert_hf_to_gguf.py` does (`phi-lsp quantize`).
//!
//! candle's reader trusts what the file says: every tensor's offset and size is checked against the
//! file length here before a byte of it is read, so a truncated or hostile file is a one-line error.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};
use crate::model::{PhiModel, WeightSource};
use crate::tokenizer::PhiTokenizer;
use crate::weights::Engine;

mod write;
use write::type_name;
pub use write::{write, WriteSummary};

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
