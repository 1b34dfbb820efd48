//! Random weights of an exact shape, made from a seed: a model that costs what the real one costs to
//! run, for benchmarks and tests that have no checkpoint. Also the per-stage timers `phi-lsp bench
//! --profile` uses, since only this crate can run candle ops.

use std::time::Instant;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};

use crate::qmatmul::Weight;
use candle_core::{DType, Device, Module, Tensor};

use crate::config::PhiConfig;
use crate::error::Result;
use crate::model::{PhiModel, WeightSource};
use crate::weights::WeightDType;

/// A model of `cfg`'s exact shape with random weights from `seed`: it costs the same to run as
/// the real one, for benchmarks.
pub fn model(cfg: &PhiConfig, dtype: WeightDType, device: &Device, seed: u64) -> Result<PhiModel> {
    PhiModel::new(
        cfg,
        &SyntheticSource::new(dtype, device, seed).for_layers(cfg.num_hidden_layers),
    )
}

/// Makes every tensor from `(seed, name, element index)` alone, so a tensor does not depend on the
/// order tensors are asked for nor on the number of threads, and the q8_0/q4k weights are exactly
/// the f32 weights of the same seed, quantized.
///
/// Values: matmul weights and embeddings ~N(0, 0.02), biases ~N(0, 0.01), LayerNorm weights
/// ~1 + N(0, 0.02). "Normal" is the sum of four uniforms (Irwin–Hall), scaled to the right standard
/// deviation: bounded at ±3.5σ, which is all a benchmark needs, and one hash per value.
pub struct SyntheticSource {
    dtype: WeightDType,
    device: Device,
    seed: u64,
    /// Of the model whose matrices it makes (which ones the Q4_K_M mix keeps in q6k depends on it).
    n_layers: usize,
}

impl SyntheticSource {
    pub fn new(dtype: WeightDType, device: &Device, seed: u64) -> Self {
        SyntheticSource {
            dtype,
            device: device.clone(),
            seed,
            n_layers: PhiConfig::phi_1().num_hidden_layers,
        }
    }

    /// The source for a model of `n_layers` layers (Phi-1's 24 unless told).
    pub fn for_layers(self, n_layers: usize) -> Self {
        SyntheticSource { n_layers, ..self }
    }

    fn stream(&self, name: &str) -> Stream {
        let spread = if name.ends_with("layernorm.weight") {
            Spread { mean: 1.0, std: 0.02 }
        } else if name.ends_with("bias") {
            Spread { mean: 0.0, std: 0.01 }
        } else {
            Spread { mean: 0.0, std: 0.02 }
        };
        Stream {
            key: splitmix(fnv1a(name.as_bytes()) ^ self.seed.wrapping_mul(GOLDEN)),
            spread,
        }
    }

    /// A dense f32 tensor on the CPU, filled on all of candle's threads.
    fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut values = vec![0f32; n];
        self.stream(name).fill_parallel(&mut values, 0, fill_threads());
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }
}

impl WeightSource for SyntheticSource {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.dense_f32(name, shape)?.to_dtype(self.dtype.stored_dtype())?;
        Ok(t.to_dtype(self.dtype())?.to_device(&self.device)?)
    }

    /// Quantized by the rule `SafetensorsSource` follows (whole blocks per row, else dense). On the
    /// CPU, rows are made and quantized a group at a time on every thread, so no f32 copy of the
    /// whole weight ever exists; the blocks are those `QTensor::quantize` makes of the f32 weight.
    fn matmul_weight(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<QMatMul> {
        match self.dtype.matrix_type(name, self.n_layers) {
            Some(q) if in_dim.is_multiple_of(q.block_size()) => {
                let qtensor = match (q, &self.device) {
                    (GgmlDType::Q4K, Device::Cpu) => self.quantize_rows::<BlockQ4K>(name, out_dim, in_dim)?,
                    (GgmlDType::Q6K, Device::Cpu) => self.quantize_rows::<BlockQ6K>(name, out_dim, in_dim)?,
                    (GgmlDType::Q8_0, Device::Cpu) => {
                        self.quantize_rows::<BlockQ8_0>(name, out_dim, in_dim)?
                    }
                    _ => {
                        let dense = self
                            .dense_f32(name, &[out_dim, in_dim])?
                            .to_device(&self.device)?;
                        QTensor::quantize(&dense, q)?
                    }
                };
                Ok(QMatMul::from_qtensor(qtensor)?)
            }
            _ => Ok(QMatMul::Tensor(
                self.dense_f32(name, &[out_dim, in_dim])?
                    .to_dtype(self.dtype.stored_dtype())?
                    .to_device(&self.device)?,
            )),
        }
    }

    fn dtype(&self) -> DType {
        self.dtype.activation_dtype(&self.device)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

impl SyntheticSource {
    fn quantize_rows<B: GgmlType + 'static>(
        &self,
        name: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<QTensor> {
        let blocks_per_row = in_dim / B::BLCK_SIZE;
        let mut blocks = vec![B::zeros(); out_dim * blocks_per_row];
        let stream = self.stream(name);
        // About 256 KiB of f32 per group: in cache while it is quantized.
        let rows_per_group = (65536 / in_dim).max(1);
        let threads = fill_threads().min(out_dim.div_ceil(rows_per_group)).max(1);
        let rows_per_thread = out_dim.div_ceil(threads);
        std::thread::scope(|scope| {
            for (part_idx, part) in blocks.chunks_mut(rows_per_thread * blocks_per_row).enumerate() {
                let first_row = part_idx * rows_per_thread;
                scope.spawn(move || {
                    let mut values = vec![0f32; rows_per_group * in_dim];
                    for (group_idx, group) in part.chunks_mut(rows_per_group * blocks_per_row).enumerate() {
                        let rows = group.len() / blocks_per_row;
                        let row = first_row + group_idx * rows_per_group;
                        let values = &mut values[..rows * in_dim];
                        stream.fill(values, (row * in_dim) as u64);
                        B::from_float(values, group);
                    }
                });
            }
        });
        Ok(QTensor::new(QStorage::Cpu(Box::new(blocks)), (out_dim, in_dim))?)
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer: the `n`-th output of splitmix64 seeded with `s` is
/// `splitmix(s + n * GOLDEN)`, so any element can be made without the ones before it.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

#[derive(Debug, Clone, Copy)]
struct Spread {
    mean: f32,
    std: f32,
}

/// The values of one tensor: element `i` is a function of `key` and `i` only.
#[derive(Debug, Clone, Copy)]
struct Stream {
    key: u64,
    spread: Spread,
}

impl Stream {
    /// Elements `start..start + out.len()`.
    fn fill(&self, out: &mut [f32], start: u64) {
        // Four 16-bit uniforms summed: mean 2 * 65535 / 2, variance 4 * 65536^2 / 12.
        let scale = self.spread.std * (3f32.sqrt() / 65536.0);
        let center = 2.0 * 65535.0;
        let mut counter = self.key.wrapping_add(start.wrapping_mul(GOLDEN));
        for value in out {
            counter = counter.wrapping_add(GOLDEN);
            let bits = splitmix(counter);
            let sum = (bits & 0xFFFF) + ((bits >> 16) & 0xFFFF) + ((bits >> 32) & 0xFFFF) + (bits >> 48);
            *value = self.spread.mean + (sum as f32 - center) * scale;
        }
    }

    /// The same values as [`Self::fill`], on `threads` threads.
    fn fill_parallel(&self, out: &mut [f32], start: u64, threads: usize) {
        const MIN_PER_THREAD: usize = 1 << 16;
        let threads = threads.min(out.len() / MIN_PER_THREAD).max(1);
        if threads == 1 {
            return self.fill(out, start);
        }
        let per_thread = out.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (part_idx, part) in out.chunks_mut(per_thread).enumerate() {
                scope.spawn(move || self.fill(part, start + (part_idx * per_thread) as u64));
            }
        });
    }
}

/// The threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the physical cores).
pub fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}

fn fill_threads() -> usize {
    candle_threads().max(1)
}

/// What one kind of work in a forward pass costs, timed on its own with synthetic weights.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTiming {
    pub name: String,
    /// Median milliseconds of this stage summed over one forward pass.
    pub ms: f64,
}

/// Times every matmul of one forward pass of `n_tokens` rows, in model order and over a full set
/// of the model's weights (distinct per layer, as in the model, so they stream from memory as they
/// do there and do not sit in a cache), grouped by kind: `qkv`, `dense`, `fc1`, `fc2`, `lm_head`
/// (which the model runs on one row only), with bias adds. Median of `repeats` passes after one
/// warm-up pass (which also makes candle's repacked copies of the weights).
pub fn matmul_timings(
    cfg: &PhiConfig,
    dtype: WeightDType,
    device: &Device,
    seed: u64,
    n_tokens: usize,
    repeats: usize,
) -> Result<Vec<StageTiming>> {
    let src = SyntheticSource::new(dtype, device, seed);
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let linear = |name: String, out_dim: usize, in_dim: usize| -> Result<(Weight, Tensor)> {
        let weight = Weight::new(src.matmul_weight(&format!("{name}.weight"), out_dim, in_dim)?)?;
        let bias = src.tensor(&format!("{name}.bias"), &[out_dim])?;
        Ok((weight, bias))
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for layer_idx in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer_idx}");
        layers.push([
            linear(format!("{p}.self_attn.q_proj"), h, h)?,
            linear(format!("{p}.self_attn.k_proj"), h, h)?,
            linear(format!("{p}.self_attn.v_proj"), h, h)?,
            linear(format!("{p}.self_attn.dense"), h, h)?,
            linear(format!("{p}.mlp.fc1"), i, h)?,
            linear(format!("{p}.mlp.fc2"), h, i)?,
        ]);
    }
    let lm_head = linear("lm_head".into(), v, h)?;
    let x_h = src.tensor("bench.x_h", &[1, n_tokens, h])?;
    let x_i = src.tensor("bench.x_i", &[1, n_tokens, i])?;
    let x_last = x_h.narrow(1, n_tokens - 1, 1)?;
    let run = |(w, b): &(Weight, Tensor), x: &Tensor| -> Result<Tensor> {
        Ok(crate::model::linear(&[(w, b)], x)?.remove(0))
    };
    const NAMES: [&str; 5] = ["qkv", "dense", "fc1", "fc2", "lm_head"];
    let mut samples: Vec<[f64; 5]> = Vec::new();
    for pass in 0..=repeats {
        let mut ms = [0f64; 5];
        for layer in &layers {
            for (linear, x, group) in [
                (&layer[0], &x_h, 0),
                (&layer[1], &x_h, 0),
                (&layer[2], &x_h, 0),
                (&layer[3], &x_h, 1),
                (&layer[4], &x_h, 2),
                (&layer[5], &x_i, 3),
            ] {
                let start = Instant::now();
                let out = run(linear, x)?;
                sync(&out)?;
                ms[group] += start.elapsed().as_secs_f64() * 1000.0;
            }
        }
        let start = Instant::now();
        let out = run(&lm_head, &x_last)?;
        sync(&out)?;
        ms[4] += start.elapsed().as_secs_f64() * 1000.0;
        if pass > 0 {
            samples.push(ms);
        }
    }
    let mut timings = stage_medians(&NAMES, &samples);
    timings.push(StageTiming {
        name: "matmuls".into(),
        ms: median(samples.iter().map(|s| s.iter().sum()).collect()),
    });
    Ok(timings)
}

/// Times the attention core of one forward pass (all layers) for `n_tokens` new positions after
/// `context - n_tokens` cached ones, as the model runs it (`model::attention_core` over a
/// narrowed view of a preallocated cache); plus the partial RoPE of q and k, and the cache append. Median of `repeats` after a warm-up.
pub fn attention_timings(
    cfg: &PhiConfig,
    dtype: WeightDType,
    device: &Device,
    n_tokens: usize,
    context: usize,
    repeats: usize,
) -> Result<Vec<StageTiming>> {
    let src = SyntheticSource::new(dtype, device, 0);
    let act = src.dtype();
    let (heads, head_dim) = (cfg.num_attention_heads, cfg.head_dim());
    let rotary = cfg.rotary_dim();
    let start_pos = context.saturating_sub(n_tokens);
    let capacity = context.max(n_tokens);
    let mut caches = Vec::with_capacity(cfg.num_hidden_layers);
    for layer_idx in 0..cfg.num_hidden_layers {
        // In the cache's dtype, as the model holds it.
        let cache = |name: String| -> Result<Tensor> {
            Ok(src
                .tensor(&name, &[1, heads, capacity, head_dim])?
                .to_dtype(dtype.kv_dtype())?)
        };
        let (k, v) = (
            cache(format!("bench.k.{layer_idx}"))?,
            cache(format!("bench.v.{layer_idx}"))?,
        );
        caches.push((k, v));
    }
    let q_new = src.tensor("bench.q", &[1, heads, n_tokens, head_dim])?;
    let k_new = src.tensor("bench.k_new", &[1, heads, n_tokens, head_dim])?;
    let freqs = src.dense_f32("bench.freqs", &[n_tokens, rotary / 2])?;
    let (cos, sin) = (freqs.cos()?.to_dtype(act)?, freqs.sin()?.to_dtype(act)?);
    let total = start_pos + n_tokens;
    const NAMES: [&str; 3] = ["rope", "cache_append", "attention"];
    let mut samples: Vec<[f64; 3]> = Vec::new();
    for pass in 0..=repeats {
        let mut ms = [0f64; 3];
        for (k_cache, v_cache) in &caches {
            let start = Instant::now();
            let mut rotated = Vec::with_capacity(2);
            for xs in [&q_new, &k_new] {
                let rot = candle_nn::rotary_emb::rope(&xs.narrow(3, 0, rotary)?.contiguous()?, &cos, &sin)?;
                let pass_through = xs.narrow(3, rotary, head_dim - rotary)?;
                rotated.push(Tensor::cat(&[&rot, &pass_through], 3)?);
            }
            sync(&rotated[1])?;
            ms[0] += start.elapsed().as_secs_f64() * 1000.0;

            let start = Instant::now();
            k_cache.slice_set(&rotated[1].to_dtype(k_cache.dtype())?, 2, start_pos)?;
            v_cache.slice_set(&k_new.to_dtype(v_cache.dtype())?, 2, start_pos)?;
            let k = k_cache.narrow(2, 0, total)?;
            let v = v_cache.narrow(2, 0, total)?;
            ms[1] += start.elapsed().as_secs_f64() * 1000.0;

            let start = Instant::now();
            sync(&crate::model::attention_core(&rotated[0], &k, &v, start_pos)?)?;
            ms[2] += start.elapsed().as_secs_f64() * 1000.0;
        }
        if pass > 0 {
            samples.push(ms);
        }
    }
    Ok(stage_medians(&NAMES, &samples))
}

/// Times the rest of one forward pass's per-layer work for `n_tokens` rows (all layers): the
/// LayerNorm, GELU, the head reshapes and copies (`[n, h]` to `[heads, n, head_dim]` for q, k and
/// v, and back), and the residual adds. Median of `repeats` after a warm-up.
pub fn elementwise_timings(
    cfg: &PhiConfig,
    dtype: WeightDType,
    device: &Device,
    n_tokens: usize,
    repeats: usize,
) -> Result<Vec<StageTiming>> {
    let src = SyntheticSource::new(dtype, device, 0);
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (heads, head_dim) = (cfg.num_attention_heads, cfg.head_dim());
    let norm = candle_nn::LayerNorm::new(
        src.tensor("bench.input_layernorm.weight", &[h])?,
        src.tensor("bench.input_layernorm.bias", &[h])?,
        cfg.layer_norm_eps,
    );
    let x_h = src.tensor("bench.x_h", &[1, n_tokens, h])?;
    let x_i = src.tensor("bench.x_i", &[1, n_tokens, i])?;
    let x_heads = src.tensor("bench.x_heads", &[1, heads, n_tokens, head_dim])?;
    const NAMES: [&str; 4] = ["layernorm", "gelu", "head_copies", "residual_adds"];
    let mut samples: Vec<[f64; 4]> = Vec::new();
    for pass in 0..=repeats {
        let mut ms = [0f64; 4];
        for _ in 0..cfg.num_hidden_layers {
            let start = Instant::now();
            sync(&norm.forward(&x_h)?)?;
            ms[0] += start.elapsed().as_secs_f64() * 1000.0;

            let start = Instant::now();
            sync(&crate::model::gelu_new(&x_i)?)?;
            ms[1] += start.elapsed().as_secs_f64() * 1000.0;

            let start = Instant::now();
            for _ in 0..3 {
                let t = x_h
                    .reshape((1, n_tokens, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()?;
                sync(&t)?;
            }
            let back = x_heads.transpose(1, 2)?.reshape((1, n_tokens, h))?;
            sync(&back)?;
            ms[2] += start.elapsed().as_secs_f64() * 1000.0;

            let start = Instant::now();
            sync(&((&x_h + &x_h)? + &x_h)?)?;
            ms[3] += start.elapsed().as_secs_f64() * 1000.0;
        }
        if pass > 0 {
            samples.push(ms);
        }
    }
    Ok(stage_medians(&NAMES, &samples))
}

/// Waits for `t` to be computed (a no-op on the CPU, where ops are synchronous; on a GPU, reading
/// one value back waits for the queue).
fn sync(t: &Tensor) -> Result<()> {
    if !t.device().is_cpu() {
        t.flatten_all()?
            .narrow(0, 0, 1)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
    }
    Ok(())
}

/// One timing per stage: the median over passes of that stage's milliseconds.
fn stage_medians<const N: usize>(names: &[&str; N], samples: &[[f64; N]]) -> Vec<StageTiming> {
    names
        .iter()
        .enumerate()
        .map(|(idx, name)| StageTiming {
            name: (*name).to_string(),
            ms: median(samples.iter().map(|s| s[idx]).collect()),
        })
        .collect()
}

/// The median of `values` (NaN when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small, but with rows of whole q4k blocks (256) in every matmul but one shape.
    fn small_config() -> PhiConfig {
        PhiConfig {
            vocab_size: 320,
            hidden_size: 256,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 64,
            ..PhiConfig::phi_1()
        }
    }

    fn logits(dtype: WeightDType, seed: u64) -> Vec<f32> {
        let cfg = small_config();
        let model = model(&cfg, dtype, &Device::Cpu, seed).expect("synthetic model builds");
        // What `phi-lsp memory` counts for this dtype is what the model allocates.
        assert_eq!(model.kv_dtype(), dtype.kv_dtype());
        let mut cache = model.new_cache(16).expect("cache");
        let out = model
            .forward(&[1, 5, 300, 7, 2], &mut cache, false)
            .expect("forward runs");
        assert_eq!(out.dims(), &[1, cfg.vocab_size]);
        out.flatten_all().expect("flat").to_vec1().expect("to vec")
    }

    #[test]
    fn the_profile_names_every_stage_with_a_time() {
        let cfg = small_config();
        let (dtype, device) = (WeightDType::F32, Device::Cpu);
        let stages = [
            matmul_timings(&cfg, dtype, &device, 1, 4, 1).expect("matmuls"),
            attention_timings(&cfg, dtype, &device, 4, 16, 1).expect("attention"),
            elementwise_timings(&cfg, dtype, &device, 4, 1).expect("elementwise"),
        ]
        .concat();
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "qkv",
                "dense",
                "fc1",
                "fc2",
                "lm_head",
                "matmuls",
                "rope",
                "cache_append",
                "attention",
                "layernorm",
                "gelu",
                "head_copies",
                "residual_adds"
            ]
        );
        assert!(
            stages.iter().all(|s| s.ms.is_finite() && s.ms >= 0.0),
            "{stages:?}"
        );
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn every_dtype_builds_and_runs_and_the_seed_decides() {
        for dtype in [
            WeightDType::F32,
            WeightDType::F16,
            WeightDType::BF16,
            WeightDType::Q8_0,
            WeightDType::Q4K,
        ] {
            let a = logits(dtype, 3);
            assert!(a.iter().all(|x| x.is_finite()), "{dtype:?}: logits are finite");
            assert!(a.iter().any(|&x| x != a[0]), "{dtype:?}: logits vary");
            assert_eq!(a, logits(dtype, 3), "{dtype:?}: same seed, same model");
            assert_ne!(a, logits(dtype, 4), "{dtype:?}: another seed, another model");
        }
    }

    #[test]
    fn values_have_the_intended_spread() {
        let src = SyntheticSource::new(WeightDType::F32, &Device::Cpu, 0);
        let stats = |name: &str| -> (f64, f64) {
            let t = src.tensor(name, &[256, 1024]).expect("tensor");
            let v: Vec<f32> = t.flatten_all().expect("flat").to_vec1().expect("vec");
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / v.len() as f64;
            (mean, var.sqrt())
        };
        let (mean, std) = stats("model.layers.0.mlp.fc1.weight");
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "weight: {mean} {std}"
        );
        let (mean, std) = stats("model.layers.0.input_layernorm.weight");
        assert!(
            (mean - 1.0).abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "norm: {mean} {std}"
        );
        let (mean, std) = stats("model.layers.0.mlp.fc1.bias");
        assert!(
            mean.abs() < 1e-3 && (std - 0.01).abs() < 5e-4,
            "bias: {mean} {std}"
        );
        // Distinct names give unrelated values.
        let a = src.tensor("a.weight", &[64]).expect("a");
        let b = src.tensor("b.weight", &[64]).expect("b");
        let diff: f32 = (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .sum_all()
            .expect("sum")
            .to_scalar()
            .expect("s");
        assert!(diff > 0.1);
    }

    #[test]
    fn threads_do_not_change_the_values() {
        let stream = SyntheticSource::new(WeightDType::F32, &Device::Cpu, 9).stream("x.weight");
        let n = 5 * (1 << 16) + 123;
        let mut one = vec![0f32; n];
        let mut three = vec![0f32; n];
        stream.fill_parallel(&mut one, 0, 1);
        stream.fill_parallel(&mut three, 0, 3);
        assert_eq!(one, three);
        let mut tail = vec![0f32; 1000];
        stream.fill(&mut tail, 4000);
        assert_eq!(&one[4000..5000], &tail[..]);
    }

    /// The synthetic q4k/q8_0 weights are the f32 ones of the same seed, quantized as
    /// `SafetensorsSource` quantizes; rows that are not whole blocks stay dense.
    #[test]
    fn quantized_weights_are_the_dense_ones_quantized() {
        let dense_src = SyntheticSource::new(WeightDType::F32, &Device::Cpu, 5);
        for (dtype, q) in [
            (WeightDType::Q4K, GgmlDType::Q4K),
            (WeightDType::Q8_0, GgmlDType::Q8_0),
        ] {
            let src = SyntheticSource::new(dtype, &Device::Cpu, 5);
            for (out_dim, in_dim) in [(40, 512), (3, 256), (200, 1024)] {
                let name = "model.layers.1.mlp.fc2.weight";
                let QMatMul::QTensor(ours) = src.matmul_weight(name, out_dim, in_dim).expect("weight") else {
                    panic!("{dtype:?} {out_dim}x{in_dim} should be quantized");
                };
                let dense = dense_src.tensor(name, &[out_dim, in_dim]).expect("dense");
                let reference = QTensor::quantize(&dense, q).expect("quantize");
                assert_eq!(ours.dtype(), q);
                assert_eq!(ours.shape().dims(), &[out_dim, in_dim]);
                assert_eq!(
                    ours.data().expect("bytes"),
                    reference.data().expect("bytes"),
                    "{dtype:?} {out_dim}x{in_dim}"
                );
            }
        }
        let src = SyntheticSource::new(WeightDType::Q4K, &Device::Cpu, 5);
        let weight = src.matmul_weight("w.weight", 8, 64).expect("weight");
        assert!(
            matches!(weight, QMatMul::Tensor(_)),
            "64 is not a whole q4k block"
        );
    }

    #[test]
    fn stage_timers_run() {
        let cfg = small_config();
        let matmuls = matmul_timings(&cfg, WeightDType::Q4K, &Device::Cpu, 0, 3, 1).expect("matmuls");
        assert_eq!(matmuls.len(), 6);
        assert!(matmuls.iter().all(|t| t.ms >= 0.0));
        let attention = attention_timings(&cfg, WeightDType::F32, &Device::Cpu, 4, 10, 1).expect("attention");
        assert_eq!(attention.len(), 3);
        let rest = elementwise_timings(&cfg, WeightDType::F16, &Device::Cpu, 2, 1).expect("elementwise");
        assert_eq!(rest.len(), 4);
    }
}
