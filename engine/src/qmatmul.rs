//! Linear layers on the CPU without candle's copies of the weights, one folder per weight format:
//! [`q4k`] reads the stored GGUF blocks, [`q8_0`] repacks its blocks once at load into tiles that
//! replace them, [`dense`] widens f16, bf16 and f32 weights to f32 as they are read. Several
//! weights that share one input (a layer's q, k, v and fc1) run in one pass over one quantized
//! input, and the bias is added on the way out. CPU and f32 activations only; each format's
//! kernels come in AMX, AVX-512, AVX2 and portable variants, chosen by the one CPU probe
//! ([`crate::cpu`]). This file routes a call to its format and holds what the formats share: the
//! output tensors and the split of the work over candle's thread pool.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Storage, Tensor};

type Result<T> = candle_core::Result<T>;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod dense;
mod q4k;
mod q8_0;

/// A linear layer's weight: candle's (dense, or quantized and read by candle or the kernels here),
/// or q8_0 repacked into [`q8_0::Packed`] tiles where this CPU runs their kernels (AVX-512 VNNI or AVX2).
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Candle(QMatMul),
    Q8_0(Arc<q8_0::Packed>),
}

impl Weight {
    pub(crate) fn new(weight: QMatMul) -> Result<Weight> {
        if let QMatMul::QTensor(w) = &weight {
            let (n, k) = w.shape().dims2()?;
            if w.dtype() == GgmlDType::Q8_0 && w.device().is_cpu() && q8_0::Packed::supported(n, k) {
                if let Some(packed) = q8_0::Packed::new(&w.data()?, n, k) {
                    return Ok(Weight::Q8_0(Arc::new(packed)));
                }
            }
        }
        Ok(Weight::Candle(weight))
    }

    /// Whether the weight is held as f32 (not quantized, not 16-bit).
    pub(crate) fn is_f32(&self) -> bool {
        matches!(self, Weight::Candle(QMatMul::Tensor(w)) if w.dtype() == DType::F32)
    }
}

/// `x · wᵀ + bias` for every `(w, bias)` of `linears` on one input `xs` (`[.., k]`), one `[.., n]`
/// tensor each. `None` where this path does not apply (another device or dtype, quantized weights
/// that are neither q4k nor repacked q8_0, f32 weights beyond [`dense::MAX_ROWS`] rows): the
/// caller uses candle's ops.
pub(crate) fn linear_rows(linears: &[(&Weight, &Tensor)], xs: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let dims = xs.dims().to_vec();
    let Some((&k, batch)) = dims.split_last() else {
        return Ok(None);
    };
    let m: usize = batch.iter().product();
    if m == 0 || !xs.device().is_cpu() || xs.dtype() != DType::F32 {
        return Ok(None);
    }
    let dense: Option<Vec<(&Tensor, &Tensor)>> = linears
        .iter()
        .map(|&(weight, bias)| match weight {
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => Some((w, bias)),
            _ => None,
        })
        .collect();
    if let Some(dense) = dense {
        return dense::linear(&dense, xs, &dims);
    }
    if let Some((Weight::Q8_0(_), _)) = linears.first() {
        return linear_q8_0(linears, xs, &dims).map(Some);
    }
    if k % q4k::QK_K != 0 {
        return Ok(None);
    }
    q4k::linear(linears, xs, &dims)
}

/// [`linear_rows`] for weights that are all [`Weight::Q8_0`]: any number of rows.
fn linear_q8_0(linears: &[(&Weight, &Tensor)], xs: &Tensor, dims: &[usize]) -> Result<Vec<Tensor>> {
    let k = dims[dims.len() - 1];
    let m = xs.elem_count() / k;
    let biases = linears
        .iter()
        .map(|(_, b)| b.contiguous())
        .collect::<Result<Vec<Tensor>>>()?;
    let bias_guards: Vec<_> = biases.iter().map(|b| b.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(linears.len());
    for (((weight, _), bias), (guard, layout)) in linears.iter().zip(&biases).zip(&bias_guards) {
        let bias = match weight {
            Weight::Q8_0(w) if w.k == k && bias.dims1()? == w.n => {
                cpu_f32(guard, layout, w.n)?.map(|b| (&**w, b))
            }
            _ => None,
        };
        let Some(part) = bias else {
            candle_core::bail!("q8_0 tiles beside other weights or biases, or shapes that differ")
        };
        parts.push(part);
    }
    let xs = xs.contiguous()?;
    let (guard, layout) = xs.storage_and_layout();
    let Some(input) = cpu_f32(&guard, layout, m * k)? else {
        candle_core::bail!("q8_0 tiles need the input on the CPU")
    };
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|(w, _)| vec![0f32; m * w.n]).collect();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if m >= amx::MIN_ROWS
        && amx::available(crate::cpu::Kernel::Q8_0Tiles)
        && parts.iter().all(|(w, _)| w.isa == q8_0::Isa::Avx512Vnni)
    {
        let x = q8_0::Input::quantize(input, m.next_multiple_of(q8_0::TILE), k);
        amx::run_q8_0(&parts, &x, m, &mut outs);
        return outputs(outs, parts.iter().map(|(w, _)| w.n), dims);
    }
    let x = q8_0::Input::quantize(input, m, k);
    q8_0::run(&parts, &x, m, &mut outs);
    outputs(outs, parts.iter().map(|(w, _)| w.n), dims)
}

/// The first `len` values of a CPU f32 tensor's storage, borrowed; `None` on other devices.
fn cpu_f32<'a>(storage: &'a Storage, layout: &candle_core::Layout, len: usize) -> Result<Option<&'a [f32]>> {
    let Storage::Cpu(cpu) = storage else {
        return Ok(None);
    };
    Ok(cpu
        .as_slice::<f32>()?
        .get(layout.start_offset()..)
        .and_then(|s| s.get(..len)))
}

/// Each `[m·n]` output as a tensor of `dims` with its last dimension `n`.
fn outputs(outs: Vec<Vec<f32>>, ns: impl Iterator<Item = usize>, dims: &[usize]) -> Result<Vec<Tensor>> {
    outs.into_iter()
        .zip(ns)
        .map(|(out, n)| {
            let mut shape = dims.to_vec();
            if let Some(last) = shape.last_mut() {
                *last = n;
            }
            Tensor::from_vec(out, shape, &candle_core::Device::Cpu)
        })
        .collect()
}

/// The units of one thread's share `[start, end)` (counted across parts) that fall in the part
/// whose units are `first..first + count`, counted from the part's own start.
fn share(start: usize, end: usize, first: usize, count: usize) -> std::ops::Range<usize> {
    start.max(first) - first..end.min(first + count).saturating_sub(first)
}

/// `work(start, end)` on every thread of candle's pool, in one parallel region, `[0, total)`
/// split evenly into one contiguous range per thread.
fn on_every_thread(total: usize, work: impl Fn(usize, usize) + Sync) {
    let pool = candle_core::utils::barrier_pool();
    let per_thread = total.div_ceil(pool.n_workers() + 1);
    pool.execute(|tid| {
        let end = total.min((tid + 1) * per_thread);
        work((tid * per_thread).min(end), end)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// `n` values in `[-1, 1)` from a fixed generator, the same for the same seed.
    pub(super) fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn other_dtypes_are_left_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        let w = QTensor::quantize(
            &Tensor::from_vec(random(16 * 256, 1), (16, 256), &dev)?,
            GgmlDType::Q8_0,
        )?;
        let w = QMatMul::from_qtensor(w)?;
        let b = Tensor::zeros(16, DType::F32, &dev)?;
        let xs = Tensor::zeros((1, 1, 256), DType::F32, &dev)?;
        assert!(linear_rows(&[(&Weight::Candle(w.clone()), &b)], &xs)?.is_none());
        let w = QMatMul::from_qtensor(QTensor::quantize(
            &Tensor::from_vec(random(16 * 256, 1), (16, 256), &dev)?,
            GgmlDType::Q4K,
        )?)?;
        let long = Tensor::zeros((1, q4k::rows::MAX_ROWS + 1, 256), DType::F32, &dev)?;
        assert!(linear_rows(&[(&Weight::Candle(w.clone()), &b)], &long)?.is_some());
        assert!(linear_rows(&[(&Weight::Candle(w.clone()), &b)], &xs)?.is_some());
        Ok(())
    }

    /// q8_0 weights repacked into tiles against ggml's q8_0·q8_0 dot product as candle implements
    /// it (`k_quants::BlockQ8_0::vec_dot`, the input quantized by its `from_float`): through
    /// `linear_rows` (AMX from 12 rows where the CPU has it) and through the row kernel for every
    /// row count, two weights sharing the input.
    #[test]
    fn q8_0_tiles_match_candles_dot_product() -> Result<()> {
        use candle_core::quantized::k_quants::{self, GgmlType};
        // k = 384: whole q8_0 tiles of four blocks, not whole q4k blocks.
        let (k, n1, n2) = (384, 48, 80);
        let dev = Device::Cpu;
        let quantized = |n: usize, seed: u64| -> Result<QTensor> {
            QTensor::quantize(
                &Tensor::from_vec(random(n * k, seed), (n, k), &dev)?,
                GgmlDType::Q8_0,
            )
        };
        let (q1, q2) = (quantized(n1, 1)?, quantized(n2, 2)?);
        let (w1, w2) = (
            Weight::new(QMatMul::from_qtensor(quantized(n1, 1)?)?)?,
            Weight::new(QMatMul::from_qtensor(quantized(n2, 2)?)?)?,
        );
        if !matches!((&w1, &w2), (Weight::Q8_0(_), Weight::Q8_0(_))) {
            assert!(
                !q8_0::Packed::supported(n1, k),
                "q8_0 weights are packed where the kernel runs"
            );
            eprintln!("this CPU has neither AVX-512 VNNI nor AVX2: q8_0 weights stay with candle");
            return Ok(());
        }
        // Every layout this CPU has kernels for, not only the one `Weight::new` picks.
        let mut packed = Vec::new();
        for &isa in q8_0::Isa::available() {
            let pack = |q: &QTensor, n| -> Result<q8_0::Packed> {
                q8_0::Packed::for_isa(&q.data()?, n, k, isa)
                    .ok_or(candle_core::Error::Msg("not packed".into()))
            };
            packed.push([pack(&q1, n1)?, pack(&q2, n2)?]);
        }
        let b1 = random(n1, 3);
        let b2 = random(n2, 4);
        let (t1, t2) = (
            Tensor::from_vec(b1.clone(), n1, &dev)?,
            Tensor::from_vec(b2.clone(), n2, &dev)?,
        );
        for m in [1, 3, 4, 5, 16, 28, 31, 40, 128] {
            let input = random(m * k, 5 + m as u64);
            let mut acts = vec![k_quants::BlockQ8_0::zeros(); m * k / 32];
            k_quants::BlockQ8_0::from_float(&input, &mut acts);
            let expected = |q: &QTensor, bias: &[f32], n: usize| -> Result<Vec<f32>> {
                let data = q.data()?;
                // SAFETY: k_quants::BlockQ8_0 is repr(C) plain data; the length is checked.
                let (_, blocks, _) = unsafe { data.align_to::<k_quants::BlockQ8_0>() };
                assert_eq!(blocks.len(), n * k / 32);
                Ok((0..m * n)
                    .map(|i| {
                        let (r, row) = (i / n, i % n);
                        let w = &blocks[row * k / 32..][..k / 32];
                        k_quants::BlockQ8_0::vec_dot(k, w, &acts[r * k / 32..][..k / 32]) + bias[row]
                    })
                    .collect())
            };
            let expected = [expected(&q1, &b1, n1)?, expected(&q2, &b2, n2)?];
            let check = |got: &[f32], expected: &[f32], path: &str| {
                let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (g, e) in got.iter().zip(expected) {
                    assert!((g - e).abs() <= 1e-5 * scale, "{path}, m={m}: {g} vs {e}");
                }
            };
            let xs = Tensor::from_vec(input.clone(), (1, m, k), &dev)?;
            let outs = linear_rows(&[(&w1, &t1), (&w2, &t2)], &xs)?.expect("packed q8_0 runs here");
            for (out, expected) in outs.iter().zip(&expected) {
                assert_eq!(out.dims(), &[1, m, expected.len() / m]);
                check(&out.flatten_all()?.to_vec1::<f32>()?, expected, "linear_rows");
            }
            for [p1, p2] in &packed {
                let mut outs = vec![vec![0f32; m * n1], vec![0f32; m * n2]];
                let parts = [(p1, &b1[..]), (p2, &b2[..])];
                q8_0::run(&parts, &q8_0::Input::quantize(&input, m, k), m, &mut outs);
                for (out, expected) in outs.iter().zip(&expected) {
                    check(out, expected, &format!("{:?} row kernel", p1.isa));
                }
            }
        }
        Ok(())
    }
}
