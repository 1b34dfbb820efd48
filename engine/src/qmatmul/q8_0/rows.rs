//! The q8_0 row kernels: activation rows against the repacked 16-row tiles, on AVX-512 VNNI
//! (four rows at a time), AVX2 (two) or NEON (two, on aarch64), whichever the weight was packed for.

use super::{Input, Packed, Tile, QK8_0, TILE};
use crate::cpu::Isa;
use crate::qmatmul::{on_every_thread, share};

/// Every tile of every part against the `m` rows of `x`, the tiles split evenly over candle's
/// thread pool: rows in groups of four through `tile_rows` (AVX-512 VNNI) or two through
/// `tile_rows_avx2` or `tile_rows_neon`.
pub(super) fn multiply(parts: &[(&Packed, &[f32])], x: &Input, m: usize, outs: &mut [Vec<f32>]) {
    let total: usize = parts.iter().map(|(w, _)| w.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    on_every_thread(total, |start, end| {
        let mut first = 0;
        for (part, &out) in parts.iter().zip(&out_ptrs) {
            let count = part.0.n / TILE;
            let out = out as *mut f32;
            for tile in share(start, end, first, count) {
                let mut r = 0;
                while r < m {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the weight was packed for `part.0.kernel`, which the probe listed, so
                    // the CPU has its features; every (row, column) of a part is written by
                    // exactly one thread.
                    let done = unsafe {
                        match (part.0.kernel.isa(), m - r) {
                            (Isa::Avx512Vnni, 1) => tile_rows::<1>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, 2) => tile_rows::<2>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, 3) => tile_rows::<3>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, _) => tile_rows::<4>(part, tile, x, r, out),
                            // AVX2, the only other implementation of the q8_0 row kernel.
                            (_, 1) => tile_rows_avx2::<1>(part, tile, x, r, out),
                            (_, _) => tile_rows_avx2::<2>(part, tile, x, r, out),
                        }
                    };
                    #[cfg(target_arch = "aarch64")]
                    // SAFETY: the weight was packed for `part.0.kernel`, which the probe listed, so
                    // the CPU has its features (NEON, which every aarch64 CPU has, and for
                    // `NeonDotprod` the dot products); every (row, column) of a part is written by
                    // exactly one thread.
                    let done = unsafe {
                        match (part.0.kernel.isa(), m - r) {
                            (Isa::NeonDotprod, 1) => tile_rows_sdot::<1>(part, tile, x, r, out),
                            (Isa::NeonDotprod, 2) => tile_rows_sdot::<2>(part, tile, x, r, out),
                            (Isa::NeonDotprod, 3) => tile_rows_sdot::<3>(part, tile, x, r, out),
                            (Isa::NeonDotprod, _) => tile_rows_sdot::<4>(part, tile, x, r, out),
                            // NEON, the only other implementation on aarch64.
                            (_, 1) => tile_rows_neon::<1>(part, tile, x, r, out),
                            (_, _) => tile_rows_neon::<2>(part, tile, x, r, out),
                        }
                    };
                    r += done;
                }
            }
            first += count;
        }
    });
}

/// Asks for the tile 8 after `block`: a one-row decode computes little per tile, so the tiles
/// must be asked for early enough to cover the memory latency, and 8 tiles ahead (4 KiB) does
/// (fewer leave the kernel waiting on memory). Past the end of the weight is fine: a prefetch
/// never faults.
#[inline(always)]
fn prefetch_ahead(block: &Tile) {
    let ahead = (block as *const Tile as *const u8).wrapping_add(8 * std::mem::size_of::<Tile>());
    for line in 0..9 {
        crate::simd::prefetch(ahead.wrapping_add(64 * line));
    }
}

/// Rows `first..first + M` of `x` against the 16 weight rows of `tile`, written with the bias to
/// `out` (`[m, n]`). Per block, `vpdpbusd` of the offset weights and the activations, four bytes
/// of one activation row broadcast to all 16 weight rows; the sums start at `−128·Σx` to undo the
/// offset.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI, FMA and F16C; `out` holds `m` rows of the weight's `n` outputs,
/// whose tile `tile` no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn tile_rows<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use std::arch::x86_64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb);
    // SAFETY: the caller's CPU has AVX-512F/BW/VNNI, FMA and F16C (this fn's contract); `x` holds rows
    // `first..first + M` (asserted: its values, scales and sums), the loads read one [`Tile`] and
    // 16 biases of the tile's rows, and the stores write rows `first..first + M` of `out`.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); M];
        for (b, block) in tiles.iter().enumerate() {
            prefetch_ahead(block);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(block.d.as_ptr() as *const __m256i));
            let mut sums: [__m512i; M] = std::array::from_fn(|r| {
                _mm512_set1_epi32(-128 * *x.sums.get_unchecked((first + r) * kb + b))
            });
            for kk in 0..QK8_0 / 4 {
                let weights = _mm512_loadu_si512(block.qs.as_ptr().add(64 * kk) as *const __m512i);
                for (r, sums) in sums.iter_mut().enumerate() {
                    let at = ((first + r) * kb + b) * QK8_0 + 4 * kk;
                    let four = (x.qs.as_ptr().add(at) as *const i32).read_unaligned();
                    *sums = _mm512_dpbusd_epi32(*sums, weights, _mm512_set1_epi32(four));
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked((first + r) * kb + b)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), scale, *acc);
            }
        }
        let bias = _mm512_loadu_ps(bias.as_ptr().add(tile * TILE));
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(
                out.add((first + r) * packed.n + tile * TILE),
                _mm512_add_ps(*acc, bias),
            );
        }
        M
    }
}

/// [`tile_rows`] on AVX2 for tiles of signed values: each 256-bit load holds four values of 8
/// weight rows; `vpmaddubsw` multiplies them by the broadcast activations' magnitudes with the
/// activations' signs applied to the weights (`|x|·sign(w, x) = x·w`, at most 2·127·128 per pair,
/// so the 16-bit sums cannot saturate), `vpmaddwd` widens to one sum per row.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C; `out` holds `m` rows of the weight's `n` outputs, whose tile
/// `tile` no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_rows_avx2<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use std::arch::x86_64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb);
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract); `x` holds rows
    // `first..first + M` (asserted: its values, scales and sums), the loads read one [`Tile`] and
    // 16 biases of the tile's rows, and the stores write rows `first..first + M` of `out`.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for (b, block) in tiles.iter().enumerate() {
            prefetch_ahead(block);
            let d = [
                _mm256_cvtph_ps(_mm_loadu_si128(block.d.as_ptr() as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(block.d.as_ptr().add(8) as *const __m128i)),
            ];
            let mut sums = [[_mm256_setzero_si256(); 2]; M];
            for kk in 0..QK8_0 / 4 {
                let weights = [
                    _mm256_loadu_si256(block.qs.as_ptr().add(64 * kk) as *const __m256i),
                    _mm256_loadu_si256(block.qs.as_ptr().add(64 * kk + 32) as *const __m256i),
                ];
                for (r, sums) in sums.iter_mut().enumerate() {
                    let at = ((first + r) * kb + b) * QK8_0 + 4 * kk;
                    let four = _mm256_set1_epi32((x.qs.as_ptr().add(at) as *const i32).read_unaligned());
                    let magnitude = _mm256_sign_epi8(four, four);
                    for (sum, &weights) in sums.iter_mut().zip(&weights) {
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(weights, four));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                    }
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xd = _mm256_set1_ps(*x.d.get_unchecked((first + r) * kb + b));
                for ((acc, sum), d) in acc.iter_mut().zip(&sums[r]).zip(&d) {
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*sum), _mm256_mul_ps(*d, xd), *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate() {
                let bias = _mm256_loadu_ps(bias.as_ptr().add(tile * TILE + 8 * h));
                _mm256_storeu_ps(
                    out.add((first + r) * packed.n + tile * TILE + 8 * h),
                    _mm256_add_ps(*acc, bias),
                );
            }
        }
        M
    }
}

/// `tile_rows_avx2` on NEON, for the same tiles of signed values: each 128-bit load holds four
/// values of 4 weight rows; `smull`/`smlal2` multiply them by the broadcast activations, two steps'
/// products summed in 16 bits (at most 2·127·128: the activations never reach −128), `sadalp`
/// widens pairs into 32-bit sums, and `addp` of the two halves' sums leaves one sum per weight row.
///
/// # Safety
///
/// `out` holds `m` rows of the weight's `n` outputs, whose tile `tile` no other thread writes
/// (NEON is part of aarch64).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile_rows_neon<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use std::arch::aarch64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb && x.qs.len() >= (first + M) * kb * QK8_0);
    let bias = &bias[tile * TILE..][..TILE];
    let mut acc = [[vdupq_n_f32(0.0); 4]; M];
    for (b, block) in tiles.iter().enumerate() {
        prefetch_ahead(block);
        // SAFETY: the tile's 16 scales, 8 at a time.
        let bits = unsafe { [vld1q_u16(block.d.as_ptr()), vld1q_u16(block.d.as_ptr().add(8))] };
        let ((d0, d1), (d2, d3)) = (
            crate::simd::widen_f16x8(bits[0]),
            crate::simd::widen_f16x8(bits[1]),
        );
        let d = [d0, d1, d2, d3];
        let mut lo = [[vdupq_n_s32(0); 4]; M];
        let mut hi = [[vdupq_n_s32(0); 4]; M];
        for kk in (0..QK8_0 / 4).step_by(2) {
            // Steps kk and kk + 1: 64 bytes each, 16 per group of 4 weight rows.
            let w: [[int8x16_t; 4]; 2] = std::array::from_fn(|s| {
                std::array::from_fn(|g| {
                    // SAFETY: bytes `64·(kk + s) + 16·g..+16` of the tile's 512.
                    unsafe { vld1q_s8(block.qs.as_ptr().add(64 * (kk + s) + 16 * g) as *const i8) }
                })
            });
            for r in 0..M {
                let at = ((first + r) * kb + b) * QK8_0 + 4 * kk;
                // SAFETY: 8 activations of row `first + r`, block `b`, from value `4·kk < 32`
                // (asserted: `x` holds rows `first..first + M`).
                let pair = vreinterpret_s32_s8(unsafe { vld1_s8(x.qs.as_ptr().add(at)) });
                let x0 = vreinterpretq_s8_s32(vdupq_lane_s32::<0>(pair));
                let x1 = vreinterpretq_s8_s32(vdupq_lane_s32::<1>(pair));
                for g in 0..4 {
                    let (w0, w1) = (w[0][g], w[1][g]);
                    let low = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
                    let low = vmlal_s8(low, vget_low_s8(w1), vget_low_s8(x1));
                    let high = vmlal_high_s8(vmull_high_s8(w0, x0), w1, x1);
                    lo[r][g] = vpadalq_s16(lo[r][g], low);
                    hi[r][g] = vpadalq_s16(hi[r][g], high);
                }
            }
        }
        for r in 0..M {
            let xd = vdupq_n_f32(x.d[(first + r) * kb + b]);
            for g in 0..4 {
                let sums = vcvtq_f32_s32(vpaddq_s32(lo[r][g], hi[r][g]));
                acc[r][g] = vfmaq_f32(acc[r][g], sums, vmulq_f32(d[g], xd));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (g, &acc) in acc.iter().enumerate() {
            // SAFETY: 4 of the tile's 16 biases (a slice of 16), and 4 outputs of row `first + r`
            // in the tile's columns, which the caller gave this call alone.
            unsafe {
                let bias = vld1q_f32(bias.as_ptr().add(4 * g));
                vst1q_f32(
                    out.add((first + r) * packed.n + tile * TILE + 4 * g),
                    vaddq_f32(acc, bias),
                );
            }
        }
    }
    M
}

/// `tile_rows_neon` with the dot products: `sdot` by element takes four values of 4 weight rows
/// and four activations (one lane of a 16-byte load) into one 32-bit sum per row, the layout the
/// tiles already have (it is `vpdpbusd`'s), so a block is 32 `sdot`s per activation row.
///
/// # Safety
///
/// The CPU has FEAT_DotProd; `out` holds `m` rows of the weight's `n` outputs, whose tile `tile`
/// no other thread writes.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn tile_rows_sdot<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use crate::simd::sdot_lane;
    use std::arch::aarch64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb && x.qs.len() >= (first + M) * kb * QK8_0);
    let bias = &bias[tile * TILE..][..TILE];
    let mut acc = [[vdupq_n_f32(0.0); 4]; M];
    for (b, block) in tiles.iter().enumerate() {
        prefetch_ahead(block);
        // SAFETY: the tile's 16 scales, 8 at a time.
        let bits = unsafe { [vld1q_u16(block.d.as_ptr()), vld1q_u16(block.d.as_ptr().add(8))] };
        let ((d0, d1), (d2, d3)) = (
            crate::simd::widen_f16x8(bits[0]),
            crate::simd::widen_f16x8(bits[1]),
        );
        let d = [d0, d1, d2, d3];
        // Each activation row's 32 values of block `b`, 16 (four steps) per register.
        let a: [[int8x16_t; 2]; M] = std::array::from_fn(|r| {
            let at = x.qs[((first + r) * kb + b) * QK8_0..][..QK8_0].as_ptr();
            // SAFETY: 32 values, bounds-checked by the slice.
            unsafe { [vld1q_s8(at), vld1q_s8(at.add(16))] }
        });
        let mut sums = [[vdupq_n_s32(0); 4]; M];
        for (h, steps) in block.qs.chunks_exact(4 * 64).enumerate() {
            for g in 0..4 {
                // Steps 4h..4h + 4 of weight rows 4g..4g + 4: 16 bytes each.
                // SAFETY: bytes `64·s + 16·g..+16` of the 256 in `steps`.
                let w: [int8x16_t; 4] = std::array::from_fn(|s| unsafe {
                    vld1q_s8(steps.as_ptr().add(64 * s + 16 * g) as *const i8)
                });
                for (sums, a) in sums.iter_mut().zip(&a) {
                    let mut sum = sums[g];
                    sum = sdot_lane!(sum, w[0], a[h], 0);
                    sum = sdot_lane!(sum, w[1], a[h], 1);
                    sum = sdot_lane!(sum, w[2], a[h], 2);
                    sum = sdot_lane!(sum, w[3], a[h], 3);
                    sums[g] = sum;
                }
            }
        }
        for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
            let xd = vdupq_n_f32(x.d[(first + r) * kb + b]);
            for g in 0..4 {
                acc[g] = vfmaq_f32(acc[g], vcvtq_f32_s32(sums[g]), vmulq_f32(d[g], xd));
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (g, &acc) in acc.iter().enumerate() {
            // SAFETY: 4 of the tile's 16 biases (a slice of 16), and 4 outputs of row `first + r`
            // in the tile's columns, which the caller gave this call alone.
            unsafe {
                let bias = vld1q_f32(bias.as_ptr().add(4 * g));
                vst1q_f32(
                    out.add((first + r) * packed.n + tile * TILE + 4 * g),
                    vaddq_f32(acc, bias),
                );
            }
        }
    }
    M
}
