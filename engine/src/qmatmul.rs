//! Linear layers on the CPU without candle's copies of the weights, one folder per weight format:
//! [`q4k`] and [`q6k`] read the stored GGUF blocks (both behind [`kquants`], so one call may mix
//! them), [`q8_0`] repacks its blocks once at load into tiles that
//! replace them, [`dense`] widens f16, bf16 and f32 weights to f32 as they are read. Several
//! weights that share one input (a layer's q, k, v and fc1) run in one pass over one quantized
//! input, and the bias is added on the way out. CPU and f32 activations only; each format's
//! kernels come in AMX, AVX-512, AVX2, NEON (aarch64) and portable variants, chosen by the one CPU
//! probe ([`crate::cpu`]). This file routes a call to its format and holds what the formats share: the
//! output tensors and the split of the work over candle's thread pool.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use candle_core::quantized::QMatMul;
use candle_core::{DType, Storage, Tensor};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use {candle_core::quantized::GgmlDType, std::sync::Arc};

type Result<T> = candle_core::Result<T>;

mod dense;
mod kquants;
mod q4k;
mod q6k;
mod q8k;
// Its kernels are AVX-512 VNNI, AVX2 and NEON only: elsewhere candle keeps q8_0 weights.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod q8_0;

/// A linear layer's weight: candle's (dense, or quantized and read by candle or the kernels here),
/// or q8_0 repacked into [`q8_0::Packed`] tiles where this CPU runs their kernels (AVX-512 VNNI,
/// AVX2 or NEON).
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Candle(QMatMul),
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Q8_0(Arc<q8_0::Packed>),
}

impl Weight {
    pub(crate) fn new(weight: QMatMul) -> Result<Weight> {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
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

    /// Where the weight's bytes lie, as (address, length) spans pushed onto `spans` (for the
    /// huge-page pass, [`crate::hugepages`]); nothing for weights off the CPU.
    pub(crate) fn spans(&self, spans: &mut Vec<(usize, usize)>) {
        match self {
            Weight::Candle(w) => matmul_spans(w, spans),
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Weight::Q8_0(packed) => spans.push(span(&packed.tiles)),
        }
    }

    /// Whether the weight is held as f32 (not quantized, not 16-bit).
    pub(crate) fn is_f32(&self) -> bool {
        matches!(self, Weight::Candle(QMatMul::Tensor(w)) if w.dtype() == DType::F32)
    }
}

/// [`Weight::spans`] of a weight candle holds: a quantized tensor's blocks, or a dense tensor's
/// storage (f32, f16, bf16).
pub(crate) fn matmul_spans(weight: &QMatMul, spans: &mut Vec<(usize, usize)>) {
    let tensor = match weight {
        QMatMul::QTensor(q) => {
            if q.device().is_cpu() {
                if let Ok(std::borrow::Cow::Borrowed(data)) = q.data() {
                    spans.push(span(data));
                }
            }
            return;
        }
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t,
    };
    let (storage, _) = tensor.storage_and_layout();
    if let Storage::Cpu(cpu) = &*storage {
        match cpu {
            candle_core::CpuStorage::F32(v) => spans.push(span(v)),
            candle_core::CpuStorage::F16(v) => spans.push(span(v)),
            candle_core::CpuStorage::BF16(v) => spans.push(span(v)),
            _ => {}
        }
    }
}

/// The address and byte length of `values`.
fn span<T>(values: &[T]) -> (usize, usize) {
    (values.as_ptr() as usize, std::mem::size_of_val(values))
}

/// Which kernels may take the rows of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    /// The fastest for the row count: tiles (AMX, AVX2 q4k tiles, dense panels) for many rows.
    Fastest,
    /// Every row computed exactly as it is alone (a one-row decode step): the row kernels, which
    /// keep each activation row's sums apart and add them in the same order whatever the row
    /// count, while reading each weight block once for all rows. At most [`MAX_ALONE`] rows
    /// (the dense row kernels' limit): speculative drafts are verified this way, so a verified
    /// row equals the decode step it stands for bit for bit.
    Alone,
}

/// Most rows one [`Rows::Alone`] call takes.
pub(crate) const MAX_ALONE: usize = dense::MAX_ROWS;

/// `x · wᵀ + bias` for every `(w, bias)` of `linears` on one input `xs` (`[.., k]`), one `[.., n]`
/// tensor each. `None` where this path does not apply (another device or dtype, quantized weights
/// that are neither q4k, q6k nor repacked q8_0, f32 weights beyond [`dense::MAX_ROWS`] rows): the
/// caller uses candle's ops. (The model calls [`linear_rows_as`]; the tests call this.)
#[cfg(test)]
pub(crate) fn linear_rows(linears: &[(&Weight, &Tensor)], xs: &Tensor) -> Result<Option<Vec<Tensor>>> {
    linear_rows_as(linears, xs, Rows::Fastest)
}

/// [`linear_rows`] with the kernels `rows` allows.
pub(crate) fn linear_rows_as(
    linears: &[(&Weight, &Tensor)],
    xs: &Tensor,
    rows: Rows,
) -> Result<Option<Vec<Tensor>>> {
    let dims = xs.dims().to_vec();
    let Some((_, batch)) = dims.split_last() else {
        return Ok(None);
    };
    let m: usize = batch.iter().product();
    if m == 0 || !xs.device().is_cpu() || xs.dtype() != DType::F32 {
        return Ok(None);
    }
    if rows == Rows::Alone && m > MAX_ALONE {
        candle_core::bail!("{m} rows computed alone, at most {MAX_ALONE} are");
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
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    if let Some((Weight::Q8_0(_), _)) = linears.first() {
        return q8_0::linear(linears, xs, &dims, rows).map(Some);
    }
    kquants::linear(linears, xs, &dims, rows)
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
    use candle_core::quantized::{GgmlDType, QTensor};
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
        let long = Tensor::zeros((1, q8k::MAX_ROWS + 1, 256), DType::F32, &dev)?;
        assert!(linear_rows(&[(&Weight::Candle(w.clone()), &b)], &long)?.is_some());
        assert!(linear_rows(&[(&Weight::Candle(w.clone()), &b)], &xs)?.is_some());
        Ok(())
    }
}
