//! Dense weights stored as f16, bf16 or f32, times f32 activations, on the CPU. A 16-bit model
//! computes in f32 there (a CPU has no fast 16-bit arithmetic: candle's f16 matmul converts both
//! operands on every call) while its weights stay 16-bit in memory, as llama.cpp runs f16 files.
//! A decode step is bound by the bytes of weights it reads, so for a few activation rows the weight
//! rows are widened to f32 as they stream from memory ([`rows`]). For more rows (a prefill chunk),
//! a small GEMM ([`panels`]) widens L1-sized panels of weight rows once per block of inputs, on
//! AVX-512 or AVX2; other CPUs (aarch64 among them) widen blocks of rows for candle's f32 matmul
//! ([`widened_matmul`]).
//!
//! Which kernel runs ([`kernel_for`]): up to [`MAX_ROWS`] rows the fastest row kernel whose vector
//! width divides `k`; beyond, the fastest implementation of the panels (f32 weights beyond
//! [`MAX_ROWS`] rows are left to candle's matmul, which reads them as they are).

use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16};

use super::{cpu_f32, on_every_thread, outputs, Result};
use crate::cpu::{self, Implementation, Kernel};

#[cfg(target_arch = "x86_64")]
mod panels;
mod rows;
#[cfg(test)]
mod tests;

/// Most activation rows the row kernels take; more go through [`panels`] or [`widened_matmul`].
pub(crate) const MAX_ROWS: usize = 31;

/// Weight rows widened at a time for candle's matmul: ~8 MiB of f32.
const WIDENED_BYTES: usize = 8 << 20;

/// A weight's values as stored, row-major `[n, k]`.
#[derive(Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Values<'_> {
    /// Element kind, the const parameter of the SIMD kernels.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn kind(self) -> u8 {
        match self {
            Values::F32(_) => F32,
            Values::F16(_) => F16,
            Values::BF16(_) => BF16,
        }
    }

    /// Address of element `i` and the size of one element.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn at(self, i: usize) -> (*const u8, usize) {
        match self {
            Values::F32(v) => (v[i..].as_ptr() as *const u8, 4),
            Values::F16(v) => (v[i..].as_ptr() as *const u8, 2),
            Values::BF16(v) => (v[i..].as_ptr() as *const u8, 2),
        }
    }

    fn widen(self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let range = start..start + out.len();
        match self {
            Values::F32(v) => out.copy_from_slice(&v[range]),
            Values::F16(v) => v[range].convert_to_f32_slice(out),
            Values::BF16(v) => v[range].convert_to_f32_slice(out),
        }
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn len(self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::BF16(v) => v.len(),
        }
    }

    fn get(self, i: usize) -> f32 {
        match self {
            Values::F32(v) => v[i],
            Values::F16(v) => v[i].to_f32(),
            Values::BF16(v) => v[i].to_f32(),
        }
    }
}

// The element kinds of [`Values::kind`].
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const F32: u8 = 0;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const F16: u8 = 1;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BF16: u8 = 2;

/// A dense linear layer: its weight `[n, k]` as stored, and the bias added to its outputs.
struct DenseLinear<'a> {
    values: Values<'a>,
    bias: &'a [f32],
    n: usize,
}

/// The stored values of a contiguous CPU tensor `[n, k]`; `None` for other dtypes or layouts.
fn values<'a>(storage: &'a Storage, layout: &candle_core::Layout, len: usize) -> Option<Values<'a>> {
    if !layout.is_contiguous() {
        return None;
    }
    let start = layout.start_offset();
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.get(start..start + len).map(Values::F32),
        Storage::Cpu(CpuStorage::F16(v)) => v.get(start..start + len).map(Values::F16),
        Storage::Cpu(CpuStorage::BF16(v)) => v.get(start..start + len).map(Values::BF16),
        _ => None,
    }
}

/// `x · wᵀ + bias` for dense `(w, bias)` pairs on one f32 CPU input `xs` (`dims`, `m` rows of
/// `k`). `None` where candle's matmul serves as well: f32 weights beyond [`MAX_ROWS`] rows, or
/// weights that are not contiguous CPU tensors `[n, k]` of f32, f16 or bf16.
pub(super) fn linear(
    linears: &[(&Tensor, &Tensor)],
    xs: &Tensor,
    dims: &[usize],
) -> Result<Option<Vec<Tensor>>> {
    let k = dims[dims.len() - 1];
    let m = xs.elem_count() / k;
    let sixteen_bit = linears.iter().any(|(w, _)| w.dtype().size_in_bytes() == 2);
    if m > MAX_ROWS && !sixteen_bit {
        return Ok(None);
    }
    linear_through(kernel_for(m, k), linears, xs, dims)
}

/// [`linear`] through `kernel` ([`multiply`]), whichever it is: what the tests call to force each
/// kernel this CPU runs.
fn linear_through(
    kernel: Implementation,
    linears: &[(&Tensor, &Tensor)],
    xs: &Tensor,
    dims: &[usize],
) -> Result<Option<Vec<Tensor>>> {
    let k = dims[dims.len() - 1];
    let biases = linears
        .iter()
        .map(|(_, b)| b.to_dtype(candle_core::DType::F32)?.contiguous())
        .collect::<Result<Vec<Tensor>>>()?;
    let guards: Vec<_> = linears.iter().map(|(w, _)| w.storage_and_layout()).collect();
    let bias_guards: Vec<_> = biases.iter().map(|b| b.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(linears.len());
    for (((w, _), (guard, layout)), (bias_guard, bias_layout)) in
        linears.iter().zip(&guards).zip(&bias_guards)
    {
        let Ok((n, wk)) = w.dims2() else {
            return Ok(None);
        };
        let (Some(values), Some(bias)) = (values(guard, layout, n * k), cpu_f32(bias_guard, bias_layout, n)?)
        else {
            return Ok(None);
        };
        if wk != k {
            return Ok(None);
        }
        parts.push(DenseLinear { values, bias, n });
    }
    multiply(kernel, &parts, &xs.contiguous()?, dims)
}

/// The kernel that takes `m` rows of `k`: up to [`MAX_ROWS`] rows the fastest implementation of
/// [`Kernel::DenseRows`] that fits `k`, beyond the fastest of [`Kernel::DensePanels`].
fn kernel_for(m: usize, k: usize) -> Implementation {
    if m <= MAX_ROWS {
        rows::chosen(k)
    } else {
        cpu::chosen(Kernel::DensePanels).expect("the dense panels have a portable implementation")
    }
}

/// Every weight row of every part against the rows of `xs` (contiguous, `dims`, rows of `k`),
/// with the bias, one tensor each: through `kernel`, an implementation of [`Kernel::DenseRows`]
/// (at most [`MAX_ROWS`] rows) or of [`Kernel::DensePanels`] (the portable one is
/// [`widened_matmul`]). `None` where the input is not on the CPU.
fn multiply(
    kernel: Implementation,
    parts: &[DenseLinear],
    xs: &Tensor,
    dims: &[usize],
) -> Result<Option<Vec<Tensor>>> {
    let k = dims[dims.len() - 1];
    let m = xs.elem_count() / k;
    #[cfg(target_arch = "x86_64")]
    let tiles = panels::TileKernel::of;
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = |_: Implementation| -> Option<()> { None };
    let panels = match kernel.kernel() {
        Kernel::DensePanels => match tiles(kernel) {
            Some(tiles) => Some(tiles),
            None => {
                let xs2 = xs.reshape((m, k))?;
                let mut outs = Vec::with_capacity(parts.len());
                for part in parts {
                    let mut shape = dims.to_vec();
                    shape[dims.len() - 1] = part.n;
                    outs.push(widened_matmul(part, &xs2, k)?.reshape(shape)?);
                }
                return Ok(Some(outs));
            }
        },
        _ => None,
    };
    let (guard, layout) = xs.storage_and_layout();
    let Some(input) = cpu_f32(&guard, layout, m * k)? else {
        return Ok(None);
    };
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    match panels {
        #[cfg(target_arch = "x86_64")]
        Some(tiles) => {
            let x = panels::Input::pack(input, m, k, tiles);
            for (part, out) in parts.iter().zip(&mut outs) {
                panels::multiply(part, &x, out);
            }
        }
        _ => rows::multiply(kernel, parts, input, m, k, &mut outs),
    }
    drop(guard);
    outputs(outs, parts.iter().map(|p| p.n), dims).map(Some)
}

/// `xs · wᵀ + bias` (`xs` `[m, k]`) through candle's f32 matmul on blocks of weight rows widened
/// to f32 on every thread.
fn widened_matmul(part: &DenseLinear, xs: &Tensor, k: usize) -> Result<Tensor> {
    let block_rows = (WIDENED_BYTES / (4 * k)).max(16);
    let mut pieces = Vec::with_capacity(part.n.div_ceil(block_rows));
    for first in (0..part.n).step_by(block_rows) {
        let rows = block_rows.min(part.n - first);
        let mut widened = vec![0f32; rows * k];
        let out = widened.as_mut_ptr() as usize;
        on_every_thread(rows * k, |start, end| {
            // SAFETY: the threads write disjoint ranges of `widened`, which outlives the region.
            let out = unsafe { std::slice::from_raw_parts_mut((out as *mut f32).add(start), end - start) };
            part.values.widen(first * k + start, out);
        });
        let w = Tensor::from_vec(widened, (rows, k), xs.device())?;
        pieces.push(xs.matmul(&w.t()?)?);
    }
    let bias = Tensor::from_slice(part.bias, part.n, xs.device())?;
    Tensor::cat(&pieces, 1)?.broadcast_add(&bias)
}
