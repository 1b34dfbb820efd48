//! The Phi-1 forward pass, equal to transformers' `PhiForCausalLM`. Struct fields carry the weight
//! names of the checkpoint (`model.layers.N.self_attn.q_proj`, ...).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::LayerNorm;

use crate::cache::KvCache;
use crate::config::PhiConfig;
use crate::error::Result;
use crate::kernels::{DecodeAttention, GeluNew};
use crate::qmatmul::{Rows, Weight};

/// A linear layer with bias whose weight is dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Tensor,
}

impl Linear {
    fn load(in_dim: usize, out_dim: usize, vb: &Vb) -> Result<Self> {
        let weight = Weight::new(vb.src.matmul_weight(&vb.name("weight"), out_dim, in_dim)?)?;
        let bias = vb.get(&[out_dim], "bias")?;
        Ok(Linear { weight, bias })
    }

    fn forward(&self, xs: &Tensor, rows: Rows) -> Result<Tensor> {
        let mut outs = linear_as(&[(&self.weight, &self.bias)], xs, rows)?;
        Ok(outs.remove(0))
    }
}

/// `xs · wᵀ + bias` for each `(w, bias)` on one input: quantized weights on the CPU through
/// [`crate::qmatmul`] (several sharing the input in one pass), the rest through candle.
pub(crate) fn linear(layers: &[(&Weight, &Tensor)], xs: &Tensor) -> Result<Vec<Tensor>> {
    linear_as(layers, xs, Rows::Fastest)
}

/// [`linear`] through the kernels `rows` allows (candle's ops, where they serve, take any rows:
/// [`PhiModel::verifies_alone`] says where they never do).
fn linear_as(layers: &[(&Weight, &Tensor)], xs: &Tensor, rows: Rows) -> Result<Vec<Tensor>> {
    if let Some(outs) = crate::qmatmul::linear_rows_as(layers, xs, rows)? {
        return Ok(outs);
    }
    layers
        .iter()
        .map(|(weight, bias)| match weight {
            Weight::Candle(weight) => Ok(weight.forward(xs)?.broadcast_add(bias)?),
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Weight::Q8_0(_) => Err(crate::EngineError::Request(format!(
                "repacked q8_0 weights need f32 activations on the CPU, got {:?} on {:?}",
                xs.dtype(),
                xs.device()
            ))),
        })
        .collect()
}

fn layer_norm(size: usize, eps: f64, vb: &Vb) -> Result<LayerNorm> {
    let weight = vb.get(&[size], "weight")?;
    let bias = vb.get(&[size], "bias")?;
    Ok(LayerNorm::new(weight, bias, eps))
}

/// Where the weights come from, by their Hugging Face names (`model.layers.0.mlp.fc1.weight`):
/// safetensors (dense, or quantized while loading) or a GGUF file (whose names are mapped).
pub trait WeightSource {
    /// A dense tensor of exactly `shape` (embeddings, norms, biases), in the model's dtype.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// A matmul weight of shape `[out_dim, in_dim]`, dense or quantized.
    fn matmul_weight(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<QMatMul>;
    /// The dtype of activations, K/V cache and dense tensors.
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// A name prefix over a [`WeightSource`], as `VarBuilder::pp` is over a checkpoint.
struct Vb<'a> {
    src: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Vb<'a> {
    fn pp(&self, part: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            part.to_string()
        } else {
            format!("{}.{part}", self.prefix)
        };
        Vb {
            src: self.src,
            prefix,
        }
    }

    fn name(&self, leaf: &str) -> String {
        self.pp(leaf).prefix
    }

    fn get(&self, shape: &[usize], leaf: &str) -> Result<Tensor> {
        self.src.tensor(&self.name(leaf), shape)
    }
}

/// cos/sin tables of the rotary embedding for every position the cache can hold.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    dim: usize,
}

impl Rotary {
    fn new(cfg: &PhiConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim();
        let theta = cfg.rope_theta();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / theta.powf(i as f64 / dim as f64)) as f32)
            .collect();
        let n_freq = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n_freq), device)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Rotary {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            dim,
        })
    }

    /// NeoX `rotate_half` RoPE on the first `dim` features of `xs` (`[1, heads, n, head_dim]`).
    fn apply(&self, xs: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, n_tokens, head_dim) = xs.dims4()?;
        let cos = self.cos.narrow(0, start, n_tokens)?;
        let sin = self.sin.narrow(0, start, n_tokens)?;
        let rot = candle_nn::rotary_emb::rope(&xs.narrow(D::Minus1, 0, self.dim)?.contiguous()?, &cos, &sin)?;
        if self.dim == head_dim {
            return Ok(rot);
        }
        let pass = xs.narrow(D::Minus1, self.dim, head_dim - self.dim)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &PhiConfig, vb: &Vb) -> Result<Self> {
        let (h, kv) = (cfg.hidden_size, cfg.num_kv_heads() * cfg.head_dim());
        Ok(Attention {
            q_proj: Linear::load(h, h, &vb.pp("q_proj"))?,
            k_proj: Linear::load(h, kv, &vb.pp("k_proj"))?,
            v_proj: Linear::load(h, kv, &vb.pp("v_proj"))?,
            dense: Linear::load(h, h, &vb.pp("dense"))?,
            n_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// The rest of attention after the projections `q`, `k`, `v` (`[1, n, hidden]`) of its input.
    fn forward(
        &self,
        [q, k, v]: [Tensor; 3],
        rotary: &Rotary,
        cache: &KvCache,
        layer_idx: usize,
        rows: Rows,
    ) -> Result<Tensor> {
        let (b, n_tokens, _) = q.dims3()?;
        let start = cache.len();
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n_tokens, self.n_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotary.apply(&heads(q)?, start)?;
        let k = rotary.apply(&heads(k)?, start)?;
        let v = heads(v)?;
        let (k, v) = cache.append(layer_idx, &k, &v)?;

        let out = attention_core(&q, &k, &v, start)?;
        self.dense.forward(&out, rows)
    }
}

/// `softmax(q·kᵀ/√head_dim + causal mask)·v` for the `n` new positions of `q` (`[1, heads, n,
/// head_dim]`) after `start` cached ones, over `k`/`v` (`[1, heads, start + n, head_dim]`);
/// returns `[1, n, heads·head_dim]` in the dtype of `q`. On the CPU in f32, [`DecodeAttention`]
/// runs up to [`DecodeAttention::MAX_QUERIES`] new positions over an f32 cache (a decode step, a
/// keystroke) and any number over an f16 cache, which candle's ops would first widen to f32
/// whole in every layer, reading and writing the entire cache for each chunk; the rest (f32
/// prefill chunks, the exact-reference path, and other devices) runs candle's ops.
pub(crate) fn attention_core(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
    let (b, heads, n_tokens, head_dim) = q.dims4()?;
    let hidden = heads * head_dim;
    let out_dtype = q.dtype();
    // Scores and softmax in f32, as transformers upcasts them.
    let scale = 1.0 / (head_dim as f64).sqrt();
    let q = q.to_dtype(DType::F32)?;
    let queries_fit = match v.dtype() {
        DType::F32 => n_tokens <= DecodeAttention::MAX_QUERIES,
        DType::F16 => true,
        _ => false,
    };
    if queries_fit && q.device().is_cpu() && out_dtype == DType::F32 {
        let op = DecodeAttention { scale: scale as f32 };
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?);
    }
    let k = k.to_dtype(DType::F32)?;
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if n_tokens > 1 {
        scores = scores.broadcast_add(&causal_mask(n_tokens, start, q.device())?)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    // The CPU multiplies in f32 (its f16 matmul is slow); a GPU in the cache's dtype.
    let (probs, v) = if q.device().is_cpu() {
        (probs, v.to_dtype(DType::F32)?)
    } else {
        (probs.to_dtype(v.dtype())?, v.clone())
    };
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, n_tokens, hidden))?
        .to_dtype(out_dtype)?)
}

/// `gelu_new`, the tanh approximation: [`GeluNew`] on the CPU in f32, else candle's `gelu` (the
/// same formula).
pub(crate) fn gelu_new(xs: &Tensor) -> Result<Tensor> {
    if on_cpu_in_f32(xs) {
        Ok(xs.contiguous()?.apply_op1_no_bwd(&GeluNew)?)
    } else {
        Ok(xs.gelu()?)
    }
}

/// Where the CPU kernels of [`crate::kernels`] apply instead of candle's general ops.
fn on_cpu_in_f32(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32
}

/// `[n_tokens, start + n_tokens]`: query `i` (absolute position `start + i`) sees keys `0..=start + i`.
pub(crate) fn causal_mask(n_tokens: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + n_tokens;
    let mask: Vec<f32> = (0..n_tokens)
        .flat_map(|i| (0..total).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (n_tokens, total), device)?)
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(cfg: &PhiConfig, vb: &Vb) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::load(cfg.hidden_size, cfg.intermediate_size, &vb.pp("fc1"))?,
            fc2: Linear::load(cfg.intermediate_size, cfg.hidden_size, &vb.pp("fc2"))?,
        })
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: LayerNorm,
}

impl DecoderLayer {
    fn new(cfg: &PhiConfig, vb: &Vb) -> Result<Self> {
        Ok(DecoderLayer {
            self_attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, &vb.pp("mlp"))?,
            input_layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, &vb.pp("input_layernorm"))?,
        })
    }

    /// Attention and MLP run in parallel on one LayerNorm and both add to the residual; q, k, v
    /// and fc1 read that one input together.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        cache: &KvCache,
        layer_idx: usize,
        rows: Rows,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(xs)?;
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        let projections = [&attn.q_proj, &attn.k_proj, &attn.v_proj, &mlp.fc1].map(|l| (&l.weight, &l.bias));
        let [q, k, v, up]: [Tensor; 4] = linear_as(&projections, &h, rows)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("one output per projection expected".into()))?;
        let attn = attn.forward([q, k, v], rotary, cache, layer_idx, rows)?;
        let ff = mlp.fc2.forward(&gelu_new(&up)?, rows)?;
        Ok(((attn + ff)? + xs)?)
    }
}

pub struct PhiModel {
    /// Quantized like the matmul weights (rows are gathered and dequantized one at a time).
    embed_tokens: QMatMul,
    layers: Vec<DecoderLayer>,
    final_layernorm: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
    cfg: PhiConfig,
    dtype: DType,
    /// f16 where narrower matmul weights (quantized, or 16-bit on the CPU) run with f32
    /// activations ([`crate::WeightDType::kv_dtype`]).
    kv_dtype: DType,
    device: Device,
}

impl PhiModel {
    pub fn new(cfg: &PhiConfig, src: &dyn WeightSource) -> Result<Self> {
        let vb = Vb {
            src,
            prefix: String::new(),
        };
        let vb_m = vb.pp("model");
        let embed_tokens = src.matmul_weight("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|layer_idx| DecoderLayer::new(cfg, &vb_m.pp("layers").pp(layer_idx)))
            .collect::<Result<Vec<_>>>()?;
        let final_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, &vb_m.pp("final_layernorm"))?;
        let lm_head = Linear::load(cfg.hidden_size, cfg.vocab_size, &vb.pp("lm_head"))?;
        let narrow = !lm_head.weight.is_f32() || layers.iter().any(|l| !l.mlp.fc1.weight.is_f32());
        let model = PhiModel {
            embed_tokens,
            layers,
            final_layernorm,
            lm_head,
            rotary: Rotary::new(cfg, src.dtype(), src.device())?,
            cfg: cfg.clone(),
            dtype: src.dtype(),
            kv_dtype: if narrow && src.dtype() == DType::F32 {
                DType::F16
            } else {
                src.dtype()
            },
            device: src.device().clone(),
        };
        crate::hugepages::advise(model.weight_spans());
        Ok(model)
    }

    /// Where every matmul weight's and the embedding's bytes lie (address, length), for the
    /// huge-page pass after load ([`crate::hugepages`]).
    fn weight_spans(&self) -> Vec<(usize, usize)> {
        let mut spans = Vec::new();
        crate::qmatmul::matmul_spans(&self.embed_tokens, &mut spans);
        for layer in &self.layers {
            let (attn, mlp) = (&layer.self_attn, &layer.mlp);
            for linear in [
                &attn.q_proj,
                &attn.k_proj,
                &attn.v_proj,
                &attn.dense,
                &mlp.fc1,
                &mlp.fc2,
            ] {
                linear.weight.spans(&mut spans);
            }
        }
        self.lm_head.weight.spans(&mut spans);
        spans
    }

    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// A cache for this model holding up to `capacity` positions (at most the model's maximum).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.min(self.cfg.max_position_embeddings);
        KvCache::new(&self.cfg, capacity, self.kv_dtype, &self.device)
    }

    /// One prefill of 32 positions and one decode step on a scratch cache, so the one-time work of
    /// a first forward happens before the user's first keystroke: where [`crate::qmatmul`] does
    /// not take a quantized weight (q8_0 on a CPU without AVX2, FMA and F16C), candle lays it out
    /// again for its kernels on first use, which takes seconds for Phi-1.
    pub fn warm_up(&self) -> Result<()> {
        let n = 32.min(self.cfg.max_position_embeddings.saturating_sub(1));
        if n == 0 {
            return Ok(());
        }
        let mut cache = self.new_cache(n + 1)?;
        self.forward(&vec![0; n], &mut cache, false)?;
        self.forward(&[0], &mut cache, false)?;
        Ok(())
    }

    /// Runs `ids` after what `cache` holds and appends their K/V. Returns f32 logits `[n, vocab]`
    /// for every new position when `all_positions`, else `[1, vocab]` for the last one (the
    /// lm_head over every position is a large part of prefill and rarely needed).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, all_positions: bool) -> Result<Tensor> {
        self.forward_unless_cancelled(ids, cache, all_positions, &|| false)?
            .ok_or_else(|| crate::EngineError::Request("the forward was cancelled".into()))
    }

    /// [`Self::forward`], polling `cancelled` before each layer: `None` when it fired, and then the
    /// cache keeps its old length (the layers' writes past it are never read).
    pub fn forward_unless_cancelled(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        all_positions: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        self.run(ids, cache, all_positions, Rows::Fastest, cancelled)
    }

    /// Most positions one [`Self::forward_alone`] takes.
    pub const MAX_ALONE: usize = if crate::qmatmul::MAX_ALONE < DecodeAttention::MAX_QUERIES {
        crate::qmatmul::MAX_ALONE
    } else {
        DecodeAttention::MAX_QUERIES
    };

    /// Whether [`Self::forward_alone`] computes each position exactly as a one-position forward
    /// would: on the CPU with f32 activations, where every matmul takes the row kernels and
    /// attention runs each query on its own ([`DecodeAttention`]); layer norm, RoPE, GELU and the
    /// residual adds work on each position alone everywhere. Elsewhere (a GPU) its rows may
    /// differ from single steps in the last bits.
    pub fn verifies_alone(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    /// [`Self::forward_unless_cancelled`] over every position, f32 logits `[n, vocab]`, where each
    /// position's arithmetic is the one-position forward's, bit for bit, where
    /// [`Self::verifies_alone`]: what verifies speculative drafts (a decode step and the drafts
    /// after it, in one pass that reads each weight once). At most [`Self::MAX_ALONE`] positions.
    pub fn forward_alone(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        if ids.len() > Self::MAX_ALONE {
            return Err(crate::EngineError::Request(format!(
                "{} positions computed alone, at most {} are",
                ids.len(),
                Self::MAX_ALONE
            )));
        }
        self.run(ids, cache, true, Rows::Alone, cancelled)
    }

    fn run(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        all_positions: bool,
        rows: Rows,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        let n_tokens = ids.len();
        if n_tokens == 0 {
            return Err(crate::EngineError::Request(
                "forward needs at least one token".into(),
            ));
        }
        cache.check_room(n_tokens)?;
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut xs = self.embed_tokens.embedding(&input)?.to_dtype(self.dtype)?;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            if cancelled() {
                return Ok(None);
            }
            xs = layer.forward(&xs, &self.rotary, cache, layer_idx, rows)?;
        }
        cache.advance(n_tokens);
        if !all_positions {
            xs = xs.narrow(1, n_tokens - 1, 1)?;
        }
        let xs = self.final_layernorm.forward(&xs)?;
        Ok(Some(
            self.lm_head
                .forward(&xs, rows)?
                .squeeze(0)?
                .to_dtype(DType::F32)?,
        ))
    }
}
