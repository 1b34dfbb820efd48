//! q8_0 matmuls for many activation rows (prefill chunks, a pasted line) on Intel AMX tiles: the
//! repacked tiles ([`Tile`]) are B operands as they lie, against the activation rows as A
//! (`tdpbsud`).

use super::{Input, Packed, Tile, QK8_0};
use crate::cpu::{Implementation, Isa};
use crate::qmatmul::{on_every_thread, share};
use crate::simd::{load_amx_tile_config, Aligned64};

/// Fewest activation rows worth a tile product (whose 16 columns are activation rows).
pub(super) const MIN_ROWS: usize = 12;

const TILE: usize = 16;

/// Signed activations against offset q8_0 weights for four blocks in a row: `c[j] = a[j] · b[j]`
/// (`tdpbsud`), `a[j]` 16 activation rows × 32 bytes (`stride` apart, 32 bytes after `a[j − 1]`),
/// `b[j]` the B operand of a [`Tile`] (one tile after `b[j − 1]`).
///
/// # Safety
///
/// The CPU has AMX-INT8 and Linux granted the tile state, [`load_amx_tile_config`] ran on this
/// thread, `a` points to 16 rows (`stride` apart) of four 32-byte blocks, `b` to four [`Tile`]s
/// and `c` to four 1024-byte tiles.
#[inline(always)]
unsafe fn four_q8_0_products(a: *const i8, stride: usize, b: *const u8, c: *mut i32) {
    const _: () = assert!(std::mem::size_of::<Tile>() == 544);
    // SAFETY: the caller's contract: AMX is usable with [`load_amx_tile_config`]'s layout, and the
    // operands and sums lie where they point.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{a} + {stride}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tdpbsud tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {stride}*1 + 32]",
            "tileloadd tmm7, [{b} + {s64}*1 + 544]",
            "tdpbsud tmm1, tmm5, tmm7",
            "tileloadd tmm4, [{a} + {stride}*1 + 64]",
            "tileloadd tmm6, [{b} + {s64}*1 + 1088]",
            "tdpbsud tmm2, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {stride}*1 + 96]",
            "tileloadd tmm7, [{b} + {s64}*1 + 1632]",
            "tdpbsud tmm3, tmm5, tmm7",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            a = in(reg) a,
            stride = in(reg) stride,
            b = in(reg) b,
            c = in(reg) c,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// The q8_0 weight tiles `[start, end)` (counted across `parts`) against every row of `x`
/// (padded to whole groups of 16 rows), written with their bias into `outs`. Here the
/// activations are the A operand (rows as they are) and the tiles the B operand, so C's rows are
/// output rows and its 16 columns the tile's weight rows.
///
/// # Safety
///
/// The CPU has AMX-INT8 (with the tile state granted), AVX-512F/BW, AVX2, FMA and F16C; `x` is
/// padded to whole groups of 16 rows; `outs` point to `[m, n]` outputs of `parts`, whose tiles
/// `[start, end)` no other thread writes.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tiles_q8_0(
    parts: &[(&Packed, &[f32])],
    x: &Input,
    m: usize,
    outs: &[usize],
    start: usize,
    end: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's CPU has AMX (tile state granted), AVX-512F/BW, AVX2, FMA and F16C (this fn's
    // contract). The A operands are 16 rows of `x` (padded to whole groups of 16), the B operands
    // four [`Tile`]s of the weight, the sums two sets of four tiles in `c`; each output (i, row) of
    // `outs` (`[m, n]` each) is written by exactly one thread.
    unsafe {
        load_amx_tile_config();
        let mut c = Aligned64([0i32; 2 * 4 * TILE * TILE]);
        let c = c.0.as_mut_ptr();
        let mut first = 0;
        for (&(packed, bias), &out) in parts.iter().zip(outs) {
            let (n, k) = (packed.n, packed.k);
            let kb = k / QK8_0;
            let count = n / TILE;
            for tile in share(start, end, first, count) {
                let tiles = &packed.tiles[tile * kb..][..kb];
                let bias = _mm512_loadu_ps(bias.as_ptr().add(tile * TILE));
                for group in 0..m.div_ceil(TILE) {
                    let mut acc = [_mm512_setzero_ps(); TILE];
                    // The tile products of four blocks run while the sums of the four before are scaled.
                    let products = |step: usize| {
                        let a = x.qs.as_ptr().add(group * TILE * k + 4 * step * QK8_0);
                        let b = tiles[4 * step].qs.as_ptr();
                        four_q8_0_products(a, k, b, c.add(step % 2 * 4 * TILE * TILE));
                    };
                    let scale = |step: usize, acc: &mut [__m512; TILE]| {
                        let c = c.add(step % 2 * 4 * TILE * TILE);
                        for j in 0..4 {
                            let b = 4 * step + j;
                            let d =
                                _mm512_cvtph_ps(_mm256_loadu_si256(tiles[b].d.as_ptr() as *const __m256i));
                            for (a, acc) in acc.iter_mut().enumerate() {
                                let at = (group * TILE + a) * kb + b;
                                let ints = _mm512_load_si512(c.add((j * TILE + a) * TILE) as *const _);
                                let ints = _mm512_sub_epi32(
                                    ints,
                                    _mm512_set1_epi32(128 * *x.sums.get_unchecked(at)),
                                );
                                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked(at)));
                                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
                            }
                        }
                    };
                    let steps = kb / 4;
                    for step in 0..steps {
                        products(step);
                        if step > 0 {
                            scale(step - 1, &mut acc);
                        }
                    }
                    scale(steps - 1, &mut acc);
                    let out = out as *mut f32;
                    for (a, acc) in acc.iter().enumerate().take(m - group * TILE) {
                        // SAFETY: every (row, column) of a part is written by exactly one thread.
                        _mm512_storeu_ps(
                            out.add((group * TILE + a) * n + tile * TILE),
                            _mm512_add_ps(*acc, bias),
                        );
                    }
                }
            }
            first += count;
        }
    }
}

/// [`super::multiply`] on AMX tiles: every weight of `parts` (packed for AVX-512 VNNI) against
/// the `m` rows of `x` (padded with zeros to whole groups of 16), the 16-row tiles split evenly
/// over candle's thread pool. `imp` is the probe's AMX implementation of
/// [`crate::cpu::Kernel::Q8_0Tiles`].
pub(super) fn multiply(
    imp: Implementation,
    parts: &[(&Packed, &[f32])],
    x: &Input,
    m: usize,
    outs: &mut [Vec<f32>],
) {
    assert_eq!(imp.isa(), Isa::Amx, "{imp} is not AMX");
    assert!(
        parts.iter().all(|(w, _)| w.kernel.isa() == Isa::Avx512Vnni),
        "AMX takes q8_0 tiles packed for AVX-512 VNNI"
    );
    let total: usize = parts.iter().map(|(w, _)| w.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    // SAFETY: the probe lists AMX only where the CPU has AMX, AVX-512F/BW, AVX2, FMA and F16C and
    // Linux granted the tile state; `imp` is AMX and the tiles are offset for it (asserted).
    on_every_thread(total, |start, end| unsafe {
        tiles_q8_0(parts, x, m, &out_ptrs, start, end)
    });
}
