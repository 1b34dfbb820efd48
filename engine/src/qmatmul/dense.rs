//! Dense weights stored as f16, bf16 or f32, times f32 activations, on the CPU. A 16-bit model
//! computes in f32 there (a CPU has no fast 16-bit arithmetic: candle's f16 matmul converts both
//! operands on every call, 1.5 tokens/s for Phi-1) while its weights stay 16-bit in memory, as
//! llama.cpp runs f16 files. A decode step is bound by the bytes of weights it reads, so for a few
//! activation rows the weight rows are widened to f32 as they stream from memory, four at a time
//! against up to four activation rows in registers. For more rows (a prefill chunk), a small GEMM
//! ([`panels`]) widens L1-sized panels of weight rows once per block of inputs, on AVX-512 or
//! AVX2; other CPUs widen blocks of rows for candle's f32 matmul ([`widened_matmul`]).

use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16};

use super::{cpu_f32, on_every_thread, outputs, share, Result};

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
    fn kind(self) -> u8 {
        match self {
            Values::F32(_) => F32,
            Values::F16(_) => F16,
            Values::BF16(_) => BF16,
        }
    }

    /// Address of element `i` and the size of one element.
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

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

struct Part<'a> {
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
        parts.push(Part { values, bias, n });
    }
    let xs = xs.contiguous()?;
    #[cfg(target_arch = "x86_64")]
    let panels = if m > MAX_ROWS { panels::Isa::detect() } else { None };
    #[cfg(not(target_arch = "x86_64"))]
    let panels: Option<()> = None;
    if m > MAX_ROWS && panels.is_none() {
        let xs2 = xs.reshape((m, k))?;
        let mut outs = Vec::with_capacity(parts.len());
        for part in &parts {
            let mut shape = dims.to_vec();
            shape[dims.len() - 1] = part.n;
            outs.push(widened_matmul(part, &xs2, k)?.reshape(shape)?);
        }
        return Ok(Some(outs));
    }
    let (guard, layout) = xs.storage_and_layout();
    let Some(input) = cpu_f32(&guard, layout, m * k)? else {
        return Ok(None);
    };
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    match panels {
        #[cfg(target_arch = "x86_64")]
        Some(isa) => {
            let x = panels::Input::pack(input, m, k, isa);
            for (part, out) in parts.iter().zip(&mut outs) {
                panels::run(part, &x, out);
            }
        }
        _ => run(&parts, input, m, k, &mut outs),
    }
    drop(guard);
    outputs(outs, parts.iter().map(|p| p.n), dims).map(Some)
}

/// `xs · wᵀ + bias` (`xs` `[m, k]`) through candle's f32 matmul on blocks of weight rows widened
/// to f32 on every thread.
fn widened_matmul(part: &Part, xs: &Tensor, k: usize) -> Result<Tensor> {
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

/// The row kernel for this CPU and `k`: `(weight, first row, rows (1 or 4), k, x, m, out)`,
/// `out[j·m + i]` for weight row `first + j` and activation row `i`.
type RowKernel = fn(Values, usize, usize, usize, &[f32], usize, &mut [f32]);

fn row_kernel(k: usize) -> RowKernel {
    use crate::cpu::{features, Isa, Kernel};
    let fits = |imp: &crate::cpu::Implementation| match imp.isa() {
        Isa::Avx512 => k.is_multiple_of(16),
        Isa::Avx2 => k.is_multiple_of(8),
        _ => true,
    };
    let chosen = features().implementations(Kernel::DenseRows).find(fits);
    chosen.map_or(rows_portable as RowKernel, |imp| row_kernel_of(imp.isa()))
}

/// The row kernel written for `isa` (the portable one where there is none).
fn row_kernel_of(isa: crate::cpu::Isa) -> RowKernel {
    match isa {
        #[cfg(target_arch = "x86_64")]
        crate::cpu::Isa::Avx512 => rows_avx512,
        #[cfg(target_arch = "x86_64")]
        crate::cpu::Isa::Avx2 => rows_avx2,
        _ => rows_portable,
    }
}

/// Every weight row of every part against the `m` rows of `x`, the weight rows split evenly over
/// candle's thread pool in one parallel region.
fn run(parts: &[Part], x: &[f32], m: usize, k: usize, outs: &mut [Vec<f32>]) {
    let kernel = row_kernel(k);
    let total: usize = parts.iter().map(|p| p.n).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    on_every_thread(total, |start, end| {
        let mut block = [0f32; 4 * MAX_ROWS];
        let mut first = 0;
        for (part, &out_ptr) in parts.iter().zip(&out_ptrs) {
            let rows_here = share(start, end, first, part.n);
            let (mut row, hi) = (rows_here.start, rows_here.end);
            while row < hi {
                let rows = if hi - row >= 4 { 4 } else { 1 };
                kernel(part.values, row, rows, k, x, m, &mut block);
                for j in 0..rows {
                    for i in 0..m {
                        let value = block[j * m + i] + part.bias[row + j];
                        // SAFETY: every (i, row) of a part is written by exactly one thread.
                        unsafe { *(out_ptr as *mut f32).add(i * part.n + row + j) = value };
                    }
                }
                row += rows;
            }
            first += part.n;
        }
    });
}

fn rows_portable(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    for j in 0..rows {
        let base = (first + j) * k;
        for i in 0..m {
            let x = &x[i * k..][..k];
            out[j * m + i] = x.iter().enumerate().map(|(t, &x)| w.get(base + t) * x).sum();
        }
    }
}

/// Calls `$kernel::<E, R, M>` for the element kind of `$w`, `$rows` (1 or 4) and `M` activation
/// rows at a time (groups of at most `$group`).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch {
    ($kernel:ident, $group:expr, $w:expr, $first:expr, $rows:expr, $k:expr, $x:expr, $m:expr, $out:expr) => {{
        let (w, first, rows, k, x, m, out) = ($w, $first, $rows, $k, $x, $m, $out);
        let (ptr, size) = w.at(first * k);
        assert!(w.len() >= (first + rows) * k && x.len() >= m * k && out.len() >= rows * m);
        let mut block = [0f32; 4 * 4];
        let mut i = 0;
        while i < m {
            let group = (m - i).min($group);
            let x = x[i * k..].as_ptr();
            macro_rules! call {
                ($e:expr) => {
                    // SAFETY: the features were detected in `row_kernel`; `w` holds `rows` rows of
                    // `k` from `first` and `x` `group` rows of `k` from `i` (asserted above).
                    unsafe {
                        match (rows, group) {
                            (4, 1) => $kernel::<$e, 4, 1>(ptr, k * size, k, x, &mut block),
                            (4, 2) => $kernel::<$e, 4, 2>(ptr, k * size, k, x, &mut block),
                            (4, 3) => $kernel::<$e, 4, 3>(ptr, k * size, k, x, &mut block),
                            (4, _) => $kernel::<$e, 4, 4>(ptr, k * size, k, x, &mut block),
                            (_, 1) => $kernel::<$e, 1, 1>(ptr, k * size, k, x, &mut block),
                            (_, 2) => $kernel::<$e, 1, 2>(ptr, k * size, k, x, &mut block),
                            (_, 3) => $kernel::<$e, 1, 3>(ptr, k * size, k, x, &mut block),
                            (_, _) => $kernel::<$e, 1, 4>(ptr, k * size, k, x, &mut block),
                        }
                    }
                };
            }
            match w.kind() {
                F16 => call!(F16),
                BF16 => call!(BF16),
                _ => call!(F32),
            }
            for j in 0..rows {
                for g in 0..group {
                    out[j * m + i + g] = block[j * group + g];
                }
            }
            i += group;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
fn rows_avx512(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    dispatch!(block_avx512, 4, w, first, rows, k, x, m, out)
}

#[cfg(target_arch = "x86_64")]
fn rows_avx2(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    // 16 registers: 2 activation rows × 4 weight rows of accumulators, 4 weights, 2 activations.
    dispatch!(block_avx2, 2, w, first, rows, k, x, m, out)
}

/// `out[j·M + i] = Σ w[j][t]·x[i][t]` for `R` weight rows of element kind `E` (`row_bytes` apart)
/// and `M` activation rows (`k` apart), 16 values per step; `k` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma,f16c")]
unsafe fn block_avx512<const E: u8, const R: usize, const M: usize>(
    w: *const u8,
    row_bytes: usize,
    k: usize,
    x: *const f32,
    out: &mut [f32; 16],
) {
    use std::arch::x86_64::*;
    let load = |p: *const u8| -> __m512 {
        match E {
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            ))),
            _ => _mm512_loadu_ps(p as *const f32),
        }
    };
    let step = if E == F32 { 64 } else { 32 };
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut t = 0;
    while t < k {
        let offset = t / 16 * step;
        let wv: [__m512; R] = std::array::from_fn(|j| load(w.add(j * row_bytes + offset)));
        let xv: [__m512; M] = std::array::from_fn(|i| _mm512_loadu_ps(x.add(i * k + t)));
        for (row, wj) in acc.iter_mut().zip(&wv) {
            for (a, xi) in row.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(*wj, *xi, *a);
            }
        }
        t += 16;
    }
    for (o, a) in out.iter_mut().zip(acc.iter().flatten()) {
        *o = _mm512_reduce_add_ps(*a);
    }
}

/// [`block_avx512`] on 256-bit registers, 8 values per step; `k` a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<const E: u8, const R: usize, const M: usize>(
    w: *const u8,
    row_bytes: usize,
    k: usize,
    x: *const f32,
    out: &mut [f32; 16],
) {
    use std::arch::x86_64::*;
    let load = |p: *const u8| -> __m256 {
        match E {
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            )))),
            _ => _mm256_loadu_ps(p as *const f32),
        }
    };
    let step = if E == F32 { 32 } else { 16 };
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    let mut t = 0;
    while t < k {
        let offset = t / 8 * step;
        let wv: [__m256; R] = std::array::from_fn(|j| load(w.add(j * row_bytes + offset)));
        let xv: [__m256; M] = std::array::from_fn(|i| _mm256_loadu_ps(x.add(i * k + t)));
        for (row, wj) in acc.iter_mut().zip(&wv) {
            for (a, xi) in row.iter_mut().zip(&xv) {
                *a = _mm256_fmadd_ps(*wj, *xi, *a);
            }
        }
        t += 8;
    }
    for (o, &v) in out.iter_mut().zip(acc.iter().flatten()) {
        *o = crate::simd::sum8(v);
    }
}

/// Many activation rows (a prefill chunk): a small GEMM whose weight side is widened in L1-sized
/// panels. The input is packed once per call as columns of `mr` activation rows (`x[i][t]` at
/// `t·mr + i` within a group of `mr` rows), shared by every weight that reads it. Per block of
/// [`KC`] inputs, `nr` weight rows at a time are widened to f32 (a copy, no transpose), and an
/// `nr × mr` tile of `wᵀx` accumulates in registers: per input, two activation loads, `nr` weight
/// broadcasts and `2·nr` FMAs. The widening is paid once per weight and block, not once per
/// activation row. A thread takes its weight rows in blocks whose tile sums stay in L2, and writes
/// each block's outputs row by row of activations: sums kept for all its rows (megabytes) and
/// outputs written a column at a time had held the kernel to ~60% of the FMA peak on a Zen 3,
/// ~77% now (fc1 at 128 rows, 2 threads: 66 → 78 G multiply-adds/s).
#[cfg(target_arch = "x86_64")]
mod panels {
    use super::{on_every_thread, Part, Values};

    /// Inputs per block: the weight panel (≤ 12 KiB) and the activation panel (≤ 32 KiB) stay in L1.
    const KC: usize = 256;

    /// Tile sums held per block of weight rows: 128 KiB.
    const ACC_FLOATS: usize = 32 << 10;

    /// The tile kernel this CPU runs.
    #[derive(Clone, Copy, PartialEq, Debug)]
    pub(super) enum Isa {
        /// 12 weight rows × 32 activation rows in 24 of the 32 512-bit registers (8 rows were
        /// 20% slower: more loads per FMA).
        Avx512,
        /// 6 weight rows × 16 activation rows in 12 of the 16 256-bit registers.
        Avx2,
    }

    impl Isa {
        pub(super) fn detect() -> Option<Isa> {
            let chosen = crate::cpu::chosen(crate::cpu::Kernel::DensePanels)?;
            Isa::of(chosen.isa())
        }

        /// The tile kernel for `isa`; `None` for the portable path.
        pub(super) fn of(isa: crate::cpu::Isa) -> Option<Isa> {
            match isa {
                crate::cpu::Isa::Avx512 => Some(Isa::Avx512),
                crate::cpu::Isa::Avx2 => Some(Isa::Avx2),
                _ => None,
            }
        }

        /// Weight rows per tile (a 1-row variant takes the remainder).
        fn nr(self) -> usize {
            match self {
                Isa::Avx512 => 12,
                Isa::Avx2 => 6,
            }
        }

        /// Activation rows per tile: two registers.
        fn mr(self) -> usize {
            match self {
                Isa::Avx512 => 32,
                Isa::Avx2 => 16,
            }
        }
    }

    /// `m` rows of `k` activations, in groups of `mr` rows stored column by column (zeros pad the
    /// last group).
    pub(super) struct Input {
        packed: Vec<f32>,
        m: usize,
        k: usize,
        isa: Isa,
    }

    impl Input {
        pub(super) fn pack(x: &[f32], m: usize, k: usize, isa: Isa) -> Input {
            let mr = isa.mr();
            let groups = m.div_ceil(mr);
            let mut packed = vec![0f32; groups * k * mr];
            for (g, group) in packed.chunks_exact_mut(k * mr).enumerate() {
                for i in 0..mr.min(m - g * mr) {
                    let row = &x[(g * mr + i) * k..][..k];
                    for (t, &value) in row.iter().enumerate() {
                        group[t * mr + i] = value;
                    }
                }
            }
            Input { packed, m, k, isa }
        }
    }

    /// `out[i·n + row] = Σ_t w[row][t]·x[i][t] + bias[row]` for every weight row of `part`, the
    /// rows split over candle's thread pool.
    pub(super) fn run(part: &Part, x: &Input, out: &mut [f32]) {
        let (n, m, k, isa) = (part.n, x.m, x.k, x.isa);
        let (nr, mr) = (isa.nr(), isa.mr());
        let groups = m.div_ceil(mr);
        let out_ptr = out.as_mut_ptr() as usize;
        // Threads take whole tiles of nr rows.
        on_every_thread(n.div_ceil(nr), |start, end| {
            let (first, last) = (start * nr, (end * nr).min(n));
            if first >= last {
                return;
            }
            // Tile sums for a block of this thread's rows, `[row][group][mr]`, small enough to stay
            // in L2 while every block of inputs passes (the tile kernels load and store them).
            let block_rows = (ACC_FLOATS / (groups * mr)).max(nr) / nr * nr;
            let mut acc = vec![0f32; block_rows.min(last - first) * groups * mr];
            let mut panel = vec![0f32; nr * KC];
            for b0 in (first..last).step_by(block_rows) {
                let b1 = (b0 + block_rows).min(last);
                acc.fill(0.0);
                for t0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - t0);
                    let mut row = b0;
                    while row < b1 {
                        let rows = if b1 - row >= nr { nr } else { 1 };
                        // The panel after this one, asked for now so that widening it does not
                        // wait on memory (its rows are k apart: no hardware prefetcher follows).
                        let (next, next_t0) = if row + rows < b1 {
                            (row + rows, t0)
                        } else {
                            (b0, t0 + KC)
                        };
                        if next_t0 < k {
                            let rows = next..(next + nr).min(b1);
                            prefetch_panel(part.values, k, rows, next_t0, KC.min(k - next_t0));
                        }
                        for j in 0..rows {
                            part.values.widen((row + j) * k + t0, &mut panel[j * kc..][..kc]);
                        }
                        for g in 0..groups {
                            let xs = &x.packed[(g * k + t0) * mr..][..kc * mr];
                            let tile = &mut acc[((row - b0) * groups + g) * mr..];
                            let stride = groups * mr;
                            // SAFETY: the features were detected (`Isa::detect`); the kernels
                            // assert the extents they read and write.
                            unsafe {
                                match (isa, rows == nr) {
                                    (Isa::Avx512, true) => tile_avx512::<12>(&panel, kc, xs, tile, stride),
                                    (Isa::Avx512, false) => tile_avx512::<1>(&panel, kc, xs, tile, stride),
                                    (Isa::Avx2, true) => tile_avx2::<6>(&panel, kc, xs, tile, stride),
                                    (Isa::Avx2, false) => tile_avx2::<1>(&panel, kc, xs, tile, stride),
                                }
                            }
                        }
                        row += rows;
                    }
                }
                for i in 0..m {
                    let sums = acc[i..].iter().step_by(groups * mr);
                    // SAFETY: every (i, row) is written by exactly one thread.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(i * n + b0), b1 - b0)
                    };
                    for ((o, &sum), &bias) in out.iter_mut().zip(sums).zip(&part.bias[b0..b1]) {
                        *o = sum + bias;
                    }
                }
            }
        });
    }

    /// Asks for `kc` values from `t0` of weight `rows`, a cache line at a time.
    fn prefetch_panel(values: Values, k: usize, rows: std::ops::Range<usize>, t0: usize, kc: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for j in rows {
            let (ptr, size) = values.at(j * k + t0);
            for offset in (0..kc * size).step_by(64) {
                // SAFETY: a prefetch does not fault; the addresses lie within row j.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(offset) as *const i8) };
            }
        }
    }

    /// `tile[j·stride + i] += Σ_t panel[j·kc + t]·xs[t·32 + i]` for `R` weight rows and 32
    /// activation rows.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512<const R: usize>(
        panel: &[f32],
        kc: usize,
        xs: &[f32],
        tile: &mut [f32],
        stride: usize,
    ) {
        use std::arch::x86_64::*;
        const MR: usize = 32;
        assert!(panel.len() >= R * kc && xs.len() >= kc * MR && tile.len() >= (R - 1) * stride + MR);
        let (w, x, c) = (panel.as_ptr(), xs.as_ptr(), tile.as_mut_ptr());
        let mut acc: [[__m512; 2]; R] = std::array::from_fn(|j| {
            [
                _mm512_loadu_ps(c.add(j * stride)),
                _mm512_loadu_ps(c.add(j * stride + 16)),
            ]
        });
        for t in 0..kc {
            let (x0, x1) = (
                _mm512_loadu_ps(x.add(t * MR)),
                _mm512_loadu_ps(x.add(t * MR + 16)),
            );
            for (j, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*w.add(j * kc + t));
                acc[0] = _mm512_fmadd_ps(wv, x0, acc[0]);
                acc[1] = _mm512_fmadd_ps(wv, x1, acc[1]);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(j * stride), acc[0]);
            _mm512_storeu_ps(c.add(j * stride + 16), acc[1]);
        }
    }

    /// [`tile_avx512`] on 256-bit registers: 16 activation rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2<const R: usize>(
        panel: &[f32],
        kc: usize,
        xs: &[f32],
        tile: &mut [f32],
        stride: usize,
    ) {
        use std::arch::x86_64::*;
        const MR: usize = 16;
        assert!(panel.len() >= R * kc && xs.len() >= kc * MR && tile.len() >= (R - 1) * stride + MR);
        let (w, x, c) = (panel.as_ptr(), xs.as_ptr(), tile.as_mut_ptr());
        let mut acc: [[__m256; 2]; R] = std::array::from_fn(|j| {
            [
                _mm256_loadu_ps(c.add(j * stride)),
                _mm256_loadu_ps(c.add(j * stride + 8)),
            ]
        });
        for t in 0..kc {
            let (x0, x1) = (_mm256_loadu_ps(x.add(t * MR)), _mm256_loadu_ps(x.add(t * MR + 8)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*w.add(j * kc + t));
                acc[0] = _mm256_fmadd_ps(wv, x0, acc[0]);
                acc[1] = _mm256_fmadd_ps(wv, x1, acc[1]);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(j * stride), acc[0]);
            _mm256_storeu_ps(c.add(j * stride + 8), acc[1]);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{Part, Values};
        use super::*;

        /// Each tile kernel this CPU runs, not only the one `Isa::detect` picks, on a weight with
        /// a remainder row and a `k` past one block, against f64 sums.
        #[test]
        fn every_tile_kernel_matches_sums() {
            let (n, m, k) = (13, 37, 300);
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104729) % 199) as f32 / 99.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
            let part = Part {
                values: Values::F32(&w),
                bias: &bias,
                n,
            };
            let isas = crate::cpu::features()
                .implementations(crate::cpu::Kernel::DensePanels)
                .filter_map(|imp| Isa::of(imp.isa()));
            for isa in isas {
                let mut out = vec![0f32; m * n];
                run(&part, &Input::pack(&x, m, k, isa), &mut out);
                for i in 0..m {
                    for row in 0..n {
                        let dot: f64 = (0..k).map(|t| w[row * k + t] as f64 * x[i * k + t] as f64).sum();
                        let expected = dot + bias[row] as f64;
                        let got = out[i * n + row] as f64;
                        assert!(
                            (got - expected).abs() <= 1e-3,
                            "{isa:?} ({i}, {row}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn random(n: usize, seed: u64) -> Vec<f32> {
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

    /// Every path (each kernel this CPU runs, and the widened matmul beyond [`MAX_ROWS`]) against
    /// f64 sums over the same stored values, for f32, f16 and bf16 weights, two weights sharing
    /// the input, row counts that leave remainders, and a `k` no SIMD kernel takes.
    #[test]
    fn matches_sums_over_the_stored_values() -> Result<()> {
        let dev = Device::Cpu;
        for k in [64, 72, 2051] {
            let (n1, n2) = (13, 8);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let w1 = Tensor::from_vec(random(n1 * k, 1), (n1, k), &dev)?.to_dtype(dtype)?;
                let w2 = Tensor::from_vec(random(n2 * k, 2), (n2, k), &dev)?.to_dtype(dtype)?;
                let b1 = Tensor::from_vec(random(n1, 3), n1, &dev)?;
                let b2 = Tensor::from_vec(random(n2, 4), n2, &dev)?.to_dtype(dtype)?;
                for m in [1, 2, 3, 4, 5, 9, MAX_ROWS, 40] {
                    let xs = Tensor::from_vec(random(m * k, 5 + m as u64), (1, m, k), &dev)?;
                    let outs = linear(&[(&w1, &b1), (&w2, &b2)], &xs, xs.dims())?;
                    let Some(outs) = outs else {
                        assert!(dtype == DType::F32 && m > MAX_ROWS, "{dtype:?}, m={m}: not taken");
                        continue;
                    };
                    let x = xs.flatten_all()?.to_vec1::<f32>()?;
                    for ((w, b), out) in [(&w1, &b1), (&w2, &b2)].into_iter().zip(&outs) {
                        let (n, _) = w.dims2()?;
                        assert_eq!(out.dims(), &[1, m, n]);
                        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        let out = out.flatten_all()?.to_vec1::<f32>()?;
                        for i in 0..m {
                            for row in 0..n {
                                let dot: f64 =
                                    (0..k).map(|t| w[row * k + t] as f64 * x[i * k + t] as f64).sum();
                                let expected = dot + b[row] as f64;
                                let got = out[i * n + row] as f64;
                                assert!(
                                    (got - expected).abs() <= 1e-5 * (k as f64).sqrt(),
                                    "{dtype:?} k={k} m={m} ({i}, {row}): {got} vs {expected}"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Each SIMD kernel this CPU runs, not only the one [`row_kernel`] picks, on one and four
    /// weight rows against the portable one.
    #[test]
    fn kernels_agree_with_the_portable_one() {
        let (k, m) = (96, 7);
        let w: Vec<f16> = random(8 * k, 7).into_iter().map(f16::from_f32).collect();
        let x = random(m * k, 8);
        let mut expected = [0f32; 4 * MAX_ROWS];
        for imp in crate::cpu::features().implementations(crate::cpu::Kernel::DenseRows) {
            let (index, kernel) = (imp, row_kernel_of(imp.isa()));
            for (first, rows) in [(0, 4), (4, 4), (7, 1)] {
                rows_portable(Values::F16(&w), first, rows, k, &x, m, &mut expected);
                let mut got = [0f32; 4 * MAX_ROWS];
                kernel(Values::F16(&w), first, rows, k, &x, m, &mut got);
                for (g, e) in got[..rows * m].iter().zip(&expected[..rows * m]) {
                    assert!(
                        (g - e).abs() <= 1e-4,
                        "kernel {index}, rows {first}+{rows}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
