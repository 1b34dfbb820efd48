//! The dense panels, for many activation rows (a prefill chunk): a small GEMM whose weight side is
//! widened in L1-sized panels. The input is packed once per call as columns of `mr` activation rows
//! (`x[i][t]` at `t·mr + i` within a group of `mr` rows), shared by every weight that reads it. Per
//! block of [`KC`] inputs, `nr` weight rows at a time are widened to f32 (a copy, no transpose), and
//! an `nr × mr` tile of `wᵀx` accumulates in registers: per input, two activation loads, `nr` weight
//! broadcasts and `2·nr` FMAs. The widening is paid once per weight and block, not once per
//! activation row. A thread takes its weight rows in blocks whose tile sums stay in L2, and writes
//! each block's outputs row by row of activations: tile sums kept for all its rows (megabytes) would
//! leave L2, and outputs written a column at a time would touch a cache line per value.
//! AVX-512 and AVX2; other CPUs take the widened matmul ([`super::widened_matmul`]).

use super::{DenseLinear, Values};
use crate::cpu::{Implementation, Isa, Kernel};
use crate::qmatmul::on_every_thread;

/// Inputs per block: the weight panel (≤ 12 KiB) and the activation panel (≤ 32 KiB) stay in L1.
const KC: usize = 256;

/// Tile sums held per block of weight rows: 128 KiB.
const ACC_FLOATS: usize = 32 << 10;

/// The tile kernel of an implementation of [`Kernel::DensePanels`] this CPU runs: made only from
/// the probe's [`Implementation`], so holding one is the proof that the CPU has its features.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum TileKernel {
    /// 12 weight rows × 32 activation rows in 24 of the 32 512-bit registers (fewer rows load
    /// more per FMA).
    Avx512,
    /// 6 weight rows × 16 activation rows in 12 of the 16 256-bit registers.
    Avx2,
}

impl TileKernel {
    /// The tile kernel of `imp`; `None` for the portable implementation (the widened matmul).
    pub(super) fn of(imp: Implementation) -> Option<TileKernel> {
        assert_eq!(
            imp.kernel(),
            Kernel::DensePanels,
            "{imp} is no dense panel kernel"
        );
        match imp.isa() {
            Isa::Avx512 => Some(TileKernel::Avx512),
            Isa::Avx2 => Some(TileKernel::Avx2),
            _ => None,
        }
    }

    /// Weight rows per tile (a 1-row variant takes the remainder).
    fn nr(self) -> usize {
        match self {
            TileKernel::Avx512 => 12,
            TileKernel::Avx2 => 6,
        }
    }

    /// Activation rows per tile: two registers.
    fn mr(self) -> usize {
        match self {
            TileKernel::Avx512 => 32,
            TileKernel::Avx2 => 16,
        }
    }
}

/// `m` rows of `k` activations, in groups of `mr` rows stored column by column (zeros pad the
/// last group).
pub(super) struct Input {
    packed: Vec<f32>,
    m: usize,
    k: usize,
    tiles: TileKernel,
}

impl Input {
    pub(super) fn pack(x: &[f32], m: usize, k: usize, tiles: TileKernel) -> Input {
        let mr = tiles.mr();
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
        Input { packed, m, k, tiles }
    }
}

/// `out[i·n + row] = Σ_t w[row][t]·x[i][t] + bias[row]` for every weight row of `part` through
/// `x`'s tile kernel, the rows split over candle's thread pool.
pub(super) fn multiply(part: &DenseLinear, x: &Input, out: &mut [f32]) {
    let (n, m, k, tiles) = (part.n, x.m, x.k, x.tiles);
    let (nr, mr) = (tiles.nr(), tiles.mr());
    assert!(out.len() >= m * n && part.bias.len() >= n && part.values.len() >= n * k);
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
                        // SAFETY: `tiles` came from the probe's implementation, so the CPU has
                        // its features; the kernels assert the extents they read and write.
                        unsafe {
                            match (tiles, rows == nr) {
                                (TileKernel::Avx512, true) => tile_avx512::<12>(&panel, kc, xs, tile, stride),
                                (TileKernel::Avx512, false) => tile_avx512::<1>(&panel, kc, xs, tile, stride),
                                (TileKernel::Avx2, true) => tile_avx2::<6>(&panel, kc, xs, tile, stride),
                                (TileKernel::Avx2, false) => tile_avx2::<1>(&panel, kc, xs, tile, stride),
                            }
                        }
                    }
                    row += rows;
                }
            }
            for i in 0..m {
                let sums = acc[i..].iter().step_by(groups * mr);
                // SAFETY: `out` holds `m · n` values (asserted) and every (i, row) is written by
                // exactly one thread.
                let out =
                    unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(i * n + b0), b1 - b0) };
                for ((o, &sum), &bias) in out.iter_mut().zip(sums).zip(&part.bias[b0..b1]) {
                    *o = sum + bias;
                }
            }
        }
    });
}

/// Asks for `kc` values from `t0` of weight `rows`, a cache line at a time.
fn prefetch_panel(values: Values, k: usize, rows: std::ops::Range<usize>, t0: usize, kc: usize) {
    for j in rows {
        let (ptr, size) = values.at(j * k + t0);
        for offset in (0..kc * size).step_by(64) {
            crate::simd::prefetch(ptr.wrapping_add(offset));
        }
    }
}

/// `tile[j·stride + i] += Σ_t panel[j·kc + t]·xs[t·32 + i]` for `R` weight rows and 32
/// activation rows.
///
/// # Safety
///
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize>(panel: &[f32], kc: usize, xs: &[f32], tile: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    const MR: usize = 32;
    assert!(panel.len() >= R * kc && xs.len() >= kc * MR && tile.len() >= (R - 1) * stride + MR);
    let (w, x, c) = (panel.as_ptr(), xs.as_ptr(), tile.as_mut_ptr());
    // SAFETY: row `j < R` of the tile: 32 sums from `j · stride`, inside `tile` (asserted).
    let mut acc: [[__m512; 2]; R] = std::array::from_fn(|j| unsafe {
        [
            _mm512_loadu_ps(c.add(j * stride)),
            _mm512_loadu_ps(c.add(j * stride + 16)),
        ]
    });
    for t in 0..kc {
        // SAFETY: the 32 activations of input `t < kc`, inside `xs` (asserted).
        let (x0, x1) = unsafe {
            (
                _mm512_loadu_ps(x.add(t * MR)),
                _mm512_loadu_ps(x.add(t * MR + 16)),
            )
        };
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: value `t < kc` of panel row `j < R`, inside `panel` (asserted).
            let wv = _mm512_set1_ps(unsafe { *w.add(j * kc + t) });
            acc[0] = _mm512_fmadd_ps(wv, x0, acc[0]);
            acc[1] = _mm512_fmadd_ps(wv, x1, acc[1]);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        // SAFETY: the sums loaded above, stored back in place.
        unsafe {
            _mm512_storeu_ps(c.add(j * stride), acc[0]);
            _mm512_storeu_ps(c.add(j * stride + 16), acc[1]);
        }
    }
}

/// [`tile_avx512`] on 256-bit registers: 16 activation rows.
///
/// # Safety
///
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(panel: &[f32], kc: usize, xs: &[f32], tile: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    const MR: usize = 16;
    assert!(panel.len() >= R * kc && xs.len() >= kc * MR && tile.len() >= (R - 1) * stride + MR);
    let (w, x, c) = (panel.as_ptr(), xs.as_ptr(), tile.as_mut_ptr());
    // SAFETY: row `j < R` of the tile: 16 sums from `j · stride`, inside `tile` (asserted).
    let mut acc: [[__m256; 2]; R] = std::array::from_fn(|j| unsafe {
        [
            _mm256_loadu_ps(c.add(j * stride)),
            _mm256_loadu_ps(c.add(j * stride + 8)),
        ]
    });
    for t in 0..kc {
        // SAFETY: the 16 activations of input `t < kc`, inside `xs` (asserted).
        let (x0, x1) = unsafe { (_mm256_loadu_ps(x.add(t * MR)), _mm256_loadu_ps(x.add(t * MR + 8))) };
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: value `t < kc` of panel row `j < R`, inside `panel` (asserted).
            let wv = _mm256_set1_ps(unsafe { *w.add(j * kc + t) });
            acc[0] = _mm256_fmadd_ps(wv, x0, acc[0]);
            acc[1] = _mm256_fmadd_ps(wv, x1, acc[1]);
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        // SAFETY: the sums loaded above, stored back in place.
        unsafe {
            _mm256_storeu_ps(c.add(j * stride), acc[0]);
            _mm256_storeu_ps(c.add(j * stride + 8), acc[1]);
        }
    }
}
