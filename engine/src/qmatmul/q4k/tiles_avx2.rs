//! q4k matmuls for many activation rows (prefill chunks, a pasted line) on AVX2 CPUs without
//! AMX. The row kernels unpack each weight block once for up to four activation rows and reduce
//! every 32-value product horizontally; here 16 weight rows of one block are unpacked once into
//! a 4 KiB buffer laid out as the q8_0 tiles are (four values of a row together, 16 rows side by
//! side), and each activation row reads it with its four values broadcast: one `vpmaddubsw` is
//! then 32 products for 8 weight rows, nothing is reduced across lanes, and the 16-bit sums of a
//! 32-value sub-block (at most 8 · 2 · 15 · 128 = 30,720) are widened once with their 6-bit scale.

use super::{unpacked_scales, Q4kLinear, Q8Block, QK_K};
use crate::cpu::{Implementation, Isa};
use crate::qmatmul::{on_every_thread, share};

/// Fewest activation rows worth unpacking a tile for; fewer go to the row kernels.
pub(super) const MIN_ROWS: usize = 8;

const TILE: usize = 16;
const SUB_BLOCKS: usize = QK_K / 32;
/// Bytes of one sub-block of a tile: 8 groups of four values × 16 rows.
const SUB_BLOCK_BYTES: usize = 32 * TILE;

/// [`super::multiply`] for many rows on AVX2: every weight row of every part (each a multiple of
/// 16 rows) against the `m` rows of `x`, the 16-row tiles split evenly over candle's thread pool.
/// `imp` is the probe's AVX2 implementation of [`crate::cpu::Kernel::Q4kTiles`].
pub(super) fn multiply(
    imp: Implementation,
    parts: &[Q4kLinear],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    assert_eq!(imp.isa(), Isa::Avx2, "{imp} is not AVX2");
    let total: usize = parts.iter().map(|p| p.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    // SAFETY: the probe lists AVX2 for this kernel only where the CPU has AVX2, FMA and F16C;
    // `imp` is AVX2 (asserted).
    on_every_thread(total, |start, end| unsafe {
        tiles_q4k(parts, x, m, &out_ptrs, start, end)
    });
}

/// The 8×8 transpose of 32-bit lanes: lane `i` of output `j` is lane `j` of input `i`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose8(v: [std::arch::x86_64::__m256i; 8]) -> [std::arch::x86_64::__m256i; 8] {
    use std::arch::x86_64::*;
    let lo = |a, b| _mm256_unpacklo_epi32(a, b);
    let hi = |a, b| _mm256_unpackhi_epi32(a, b);
    // Pairs of rows interleaved: t[2p] holds lanes 0, 1 (and 4, 5) of rows 2p, 2p+1; t[2p+1] 2, 3.
    let t = [lo(v[0], v[1]), hi(v[0], v[1]), lo(v[2], v[3]), hi(v[2], v[3])];
    let t2 = [lo(v[4], v[5]), hi(v[4], v[5]), lo(v[6], v[7]), hi(v[6], v[7])];
    // Four rows: u[c] holds lane c (and c + 4) of rows 0–3, w[c] of rows 4–7.
    let quads = |t: [__m256i; 4]| {
        [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
        ]
    };
    let (u, w) = (quads(t), quads(t2));
    std::array::from_fn(|j| {
        if j < 4 {
            _mm256_permute2x128_si256::<0x20>(u[j], w[j])
        } else {
            _mm256_permute2x128_si256::<0x31>(u[j - 4], w[j - 4])
        }
    })
}

#[repr(C, align(32))]
struct Unpacked {
    /// Sub-block `j`, group `kk` of four values, row `r`: `qs[j][(kk·16 + r)·4 + t]`.
    qs: [[u8; SUB_BLOCK_BYTES]; SUB_BLOCKS],
    /// Each row's 6-bit scale twice (the two 16-bit sums `vpmaddubsw` leaves per row and group):
    /// rows 0–7 then 8–15.
    scales: [[[i16; 16]; 2]; SUB_BLOCKS],
    /// `dmin · min` per row.
    mins: [[f32; TILE]; SUB_BLOCKS],
    d: [f32; TILE],
}

/// The weight tiles `[start, end)` (counted across `parts`) against every row of `x`, written
/// with their bias into `outs` (`[m, n]` each).
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C; `outs` point to `[m, n]` outputs of `parts`, whose tiles
/// `[start, end)` no other thread writes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles_q4k(parts: &[Q4kLinear], x: &[Q8Block], m: usize, outs: &[usize], start: usize, end: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract). The loads read 32 of a
    // block's 128 bytes of `qs`; the stores write `w.qs` (sub-block `2g + h`, 8 × 16 lanes of four
    // bytes); each output (i, row) of `outs` (`[m, n]` each) is written by exactly one thread.
    unsafe {
        let kb = x.len() / m;
        let mut w = Unpacked {
            qs: [[0; SUB_BLOCK_BYTES]; SUB_BLOCKS],
            scales: [[[0; 16]; 2]; SUB_BLOCKS],
            mins: [[0.0; TILE]; SUB_BLOCKS],
            d: [0.0; TILE],
        };
        let mut acc = vec![0f32; m * TILE];
        let low = _mm256_set1_epi8(0xF);
        let mut first = 0;
        for (part, &out) in parts.iter().zip(outs) {
            let count = part.n / TILE;
            for tile in share(start, end, first, count) {
                acc.fill(0.0);
                let rows = &part.blocks[tile * TILE * kb..][..TILE * kb];
                for b in 0..kb {
                    // Eight rows at a time: each row's four-value groups (32-bit lanes) transposed so
                    // that a group's lanes of eight rows are stored together.
                    for r0 in (0..TILE).step_by(8) {
                        for g in 0..4 {
                            let bytes: [__m256i; 8] = std::array::from_fn(|i| {
                                let block = &rows[(r0 + i) * kb + b];
                                _mm256_loadu_si256(block.qs.as_ptr().add(32 * g) as *const __m256i)
                            });
                            for h in 0..2 {
                                let values = bytes.map(|v| {
                                    let v = if h == 0 { v } else { _mm256_srli_epi16(v, 4) };
                                    _mm256_and_si256(v, low)
                                });
                                let qs = w.qs[2 * g + h].as_mut_ptr() as *mut u32;
                                for (kk, lanes) in transpose8(values).into_iter().enumerate() {
                                    _mm256_storeu_si256(qs.add(kk * TILE + r0) as *mut __m256i, lanes);
                                }
                            }
                        }
                    }
                    for r in 0..TILE {
                        let block = &rows[r * kb + b];
                        let [sc, mn] = unpacked_scales(&block.scales).map(u64::to_le_bytes);
                        let (d, dmin) = super::d_and_dmin(block);
                        w.d[r] = d;
                        for j in 0..SUB_BLOCKS {
                            let lanes = &mut w.scales[j][r / 8][2 * (r % 8)..][..2];
                            lanes.fill(sc[j] as i16);
                            w.mins[j][r] = dmin * mn[j] as f32;
                        }
                    }
                    let mut i = 0;
                    while i < m {
                        i += match m - i {
                            1 => rows_of::<1>(&w, x, kb, b, i, &mut acc),
                            2 => rows_of::<2>(&w, x, kb, b, i, &mut acc),
                            _ => rows_of::<3>(&w, x, kb, b, i, &mut acc),
                        };
                    }
                }
                let (out, row0) = (out as *mut f32, tile * TILE);
                let bias = &part.bias[row0..][..TILE];
                for i in 0..m {
                    for (r, bias) in bias.iter().enumerate() {
                        // SAFETY: every (i, row) of a part is written by exactly one thread.
                        *out.add(i * part.n + row0 + r) = acc[i * TILE + r] + bias;
                    }
                }
            }
            first += count;
        }
    }
}

/// Activation rows `first..first + M` (block `b` of each) against the unpacked tile `w`, added to
/// `acc` (`[m][16]`); returns `M`.
///
/// # Safety
///
/// The CPU has AVX2 and FMA; `acc` holds rows `first..first + M` of 16 sums.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rows_of<const M: usize>(
    w: &Unpacked,
    x: &[Q8Block],
    kb: usize,
    b: usize,
    first: usize,
    acc: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    // SAFETY: the caller's CPU has AVX2 and FMA (this fn's contract). The aligned loads read `w`
    // (`repr(align(32))`, its rows of 32 bytes at multiples of 32), four activations of a
    // bounds-checked [`Q8Block`] sub-block, and 8 of `w`'s 16 scales and mins; `acc` holds `m` rows
    // of 16 with `first + M ≤ m` (the caller's loop).
    unsafe {
        let a: [&Q8Block; M] = std::array::from_fn(|r| &x[(first + r) * kb + b]);
        let mut ints = [[_mm256_setzero_si256(); 2]; M];
        for j in 0..SUB_BLOCKS {
            let mut sums = [[_mm256_setzero_si256(); 2]; M];
            let qs = w.qs[j].as_ptr();
            for kk in 0..8 {
                let weights = [
                    _mm256_load_si256(qs.add(64 * kk) as *const __m256i),
                    _mm256_load_si256(qs.add(64 * kk + 32) as *const __m256i),
                ];
                for (sums, a) in sums.iter_mut().zip(&a) {
                    let four = (a.sub_block(j).as_ptr().add(4 * kk) as *const i32).read_unaligned();
                    let four = _mm256_set1_epi32(four);
                    for (sum, &weights) in sums.iter_mut().zip(&weights) {
                        *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(weights, four));
                    }
                }
            }
            let scales = w.scales[j].map(|s| _mm256_load_si256(s.as_ptr() as *const __m256i));
            for (ints, sums) in ints.iter_mut().zip(&sums) {
                for h in 0..2 {
                    ints[h] = _mm256_add_epi32(ints[h], _mm256_madd_epi16(sums[h], scales[h]));
                }
            }
        }
        for (r, (a, ints)) in a.iter().zip(&ints).enumerate() {
            let ad = _mm256_set1_ps(a.d);
            for (h, ints) in ints.iter().enumerate() {
                let d = _mm256_mul_ps(_mm256_loadu_ps(w.d.as_ptr().add(8 * h)), ad);
                let mut mins = _mm256_setzero_ps();
                for j in 0..SUB_BLOCKS {
                    let m = _mm256_loadu_ps(w.mins[j].as_ptr().add(8 * h));
                    mins = _mm256_fmadd_ps(m, _mm256_set1_ps(a.sums[j] as f32), mins);
                }
                let out = acc.as_mut_ptr().add((first + r) * TILE + 8 * h);
                let value = _mm256_fmsub_ps(_mm256_cvtepi32_ps(*ints), d, _mm256_mul_ps(mins, ad));
                _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), value));
            }
        }
        M
    }
}
