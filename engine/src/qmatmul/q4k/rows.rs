//! The q4k row kernels: a few activation rows (a decode step, a keystroke's tokens) against
//! stored q4k blocks, weight row by weight row. Each weight block is unpacked once for up to four
//! activation rows and every 32-value product reduced horizontally (ggml's `q4_K·q8_K` dot
//! product widened to several rows), on AVX-512 VNNI, AVX2 or NEON (aarch64), with a portable
//! fallback.

use super::{f16_to_f32, unpacked_scales, BlockQ4K, Q4kLinear, Q8Block};
use crate::cpu::{self, Implementation, Kernel};
#[cfg(target_arch = "x86_64")]
use crate::qmatmul::q8k::in_groups_of_four;
use crate::qmatmul::q8k::multiply_rows;
#[cfg(target_arch = "x86_64")]
use crate::qmatmul::q8k::SUB_BLOCK_AT;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::{cpu::Isa, simd::prefetch};
#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;

/// How far ahead of the block it works on a kernel prefetches the weights.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const PREFETCH_BYTES: usize = 3072;

type RowKernel = crate::qmatmul::q8k::RowKernel<BlockQ4K>;

fn row_generic(w: &[BlockQ4K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    for (w, out) in w.chunks_exact(kb).zip(out.chunks_exact_mut(m)) {
        row_generic_one(w, x, m, out);
    }
}

fn row_generic_one(w: &[BlockQ4K], x: &[Q8Block], m: usize, out: &mut [f32]) {
    let kb = w.len();
    out[..m].fill(0.0);
    for (b, block) in w.iter().enumerate() {
        let [sc, mn] = unpacked_scales(&block.scales).map(u64::to_le_bytes);
        let (d, dmin) = (f16_to_f32(block.d), f16_to_f32(block.dmin));
        for (r, acc) in out[..m].iter_mut().enumerate() {
            let a = &x[r * kb + b];
            let mut sumi = 0i32;
            for g in 0..4 {
                let (mut lo, mut hi) = (0i32, 0i32);
                for l in 0..32 {
                    let q = block.qs[32 * g + l];
                    lo += (q & 0xF) as i32 * a.sub_block(2 * g)[l] as i32;
                    hi += (q >> 4) as i32 * a.sub_block(2 * g + 1)[l] as i32;
                }
                sumi += lo * sc[2 * g] as i32 + hi * sc[2 * g + 1] as i32;
            }
            let summ: i32 = (0..8).map(|j| mn[j] as i32 * a.sums[j] as i32).sum();
            *acc += a.d * (d * sumi as f32 - dmin * summ as f32);
        }
    }
}

/// `vpshufb` masks that spread byte `j` of a 64-bit lane to every 16-bit lane, zero-extended.
#[cfg(target_arch = "x86_64")]
static SCALE_PICKS: [[u8; 32]; 8] = {
    let mut masks = [[0x80u8; 32]; 8];
    let mut j = 0;
    while j < 8 {
        let mut l = 0;
        while l < 16 {
            masks[j][2 * l] = j as u8;
            l += 1;
        }
        j += 1;
    }
    masks
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2(w: &[BlockQ4K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    // Opaque to the compiler, which otherwise turns the eight `vpshufb`s of a block into more
    // (and slower) broadcasts and shifts.
    let picks = std::hint::black_box(SCALE_PICKS.as_ptr() as *const std::arch::x86_64::__m256i);
    in_groups_of_four!(rows_avx2, w, kb, x, m, out, picks)
}

/// [`row_avx2`] for `M` activation rows, ggml's `q4_K·q8_K` AVX2 dot product widened to `M` rows
/// so the weights are unpacked once for all of them.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C, and `picks` points to [`SCALE_PICKS`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_avx2<const M: usize>(
    w: &[BlockQ4K],
    x: &[Q8Block],
    out: &mut [f32],
    picks: *const std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    let kb = w.len();
    assert!(x.len() >= M * kb && out.len() >= M);
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract); `x` holds `M` rows of
    // `kb` blocks (asserted), so `r·kb + b` is in bounds; the loads read one block's 128 bytes of
    // `qs`, one aligned sub-block of a [`Q8Block`] (`repr(align(32))`, sub-blocks 32 bytes apart)
    // and its 16 bytes of sums, and `picks`, the eight masks of [`SCALE_PICKS`].
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let mut acc_min = [_mm_setzero_ps(); M];
        let low = _mm256_set1_epi8(0xF);
        for (b, block) in w.iter().enumerate() {
            let [sc, mn] = unpacked_scales(&block.scales);
            let scales = _mm256_set1_epi64x(sc as i64);
            let mins = _mm_cvtepu8_epi16(_mm_set_epi64x(0, mn as i64));
            let (d, dmin) = super::d_and_dmin(block);
            let ahead = (block as *const BlockQ4K as *const u8).wrapping_add(PREFETCH_BYTES);
            prefetch(ahead);
            prefetch(ahead.wrapping_add(72));
            let mut q = [_mm256_setzero_si256(); 8];
            for g in 0..4 {
                let bytes = _mm256_loadu_si256(block.qs.as_ptr().add(32 * g) as *const __m256i);
                q[2 * g] = _mm256_and_si256(bytes, low);
                q[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            }
            for r in 0..M {
                let a = x.get_unchecked(r * kb + b);
                let mut sumi = _mm256_setzero_si256();
                for (j, q) in q.iter().enumerate() {
                    let scale = _mm256_shuffle_epi8(scales, _mm256_loadu_si256(picks.add(j)));
                    let act = _mm256_load_si256(a.sub_block(j).as_ptr() as *const __m256i);
                    let pairs = _mm256_maddubs_epi16(*q, act);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(pairs, scale));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), acc[r]);
                let sums = _mm_loadu_si128(a.sums.as_ptr() as *const __m128i);
                let prod = _mm_cvtepi32_ps(_mm_madd_epi16(mins, sums));
                acc_min[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * a.d), prod, acc_min[r]);
            }
        }
        for r in 0..M {
            let v = acc[r];
            let quad = _mm_sub_ps(
                _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)),
                acc_min[r],
            );
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            out[r] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn row_avx512(w: &[BlockQ4K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    in_groups_of_four!(rows_avx512, w, kb, x, m, out, ())
}

/// [`rows_avx2`] on 512-bit registers: each holds two sub-blocks (64 stored bytes, one nibble
/// half), whose activations [`Q8Block`] keeps side by side, and the scales are applied with
/// VNNI's `vpdpwssd`.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn rows_avx512<const M: usize>(w: &[BlockQ4K], x: &[Q8Block], out: &mut [f32], _: ()) {
    use std::arch::x86_64::*;
    let kb = w.len();
    assert!(x.len() >= M * kb && out.len() >= M);
    // SAFETY: the caller's CPU has AVX-512F/BW/VNNI, FMA and F16C (this fn's contract); `x` holds
    // `M` rows of `kb` blocks (asserted), so `r·kb + b` is in bounds; the loads read one block's
    // 128 bytes of `qs`, a [`Q8Block`]'s 256 bytes of `qs` and its 16 bytes of sums.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); M];
        let mut acc_min = [_mm_setzero_ps(); M];
        let low = _mm512_set1_epi8(0xF);
        // Register i holds sub-blocks SUB_BLOCK_AT[2i] and SUB_BLOCK_AT[2i + 1] (16 i16 lanes each).
        let pick = |i: usize| {
            let (a, b) = (SUB_BLOCK_AT[2 * i] as i16, SUB_BLOCK_AT[2 * i + 1] as i16);
            _mm512_inserti64x4(_mm512_set1_epi16(a), _mm256_set1_epi16(b), 1)
        };
        let picks = [pick(0), pick(1), pick(2), pick(3)];
        for (b, block) in w.iter().enumerate() {
            let [sc, mn] = unpacked_scales(&block.scales);
            let scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(0, sc as i64)));
            let mins = _mm_cvtepu8_epi16(_mm_set_epi64x(0, mn as i64));
            let (d, dmin) = super::d_and_dmin(block);
            // The blocks stream from memory and the kernel computes for a while on each: ask for the
            // bytes [`PREFETCH_BYTES`] (~21 blocks) ahead, far enough for the memory latency.
            let ahead = (block as *const BlockQ4K as *const u8).wrapping_add(PREFETCH_BYTES);
            prefetch(ahead);
            prefetch(ahead.wrapping_add(72));
            let lo = _mm512_loadu_si512(block.qs.as_ptr() as *const __m512i);
            let hi = _mm512_loadu_si512(block.qs.as_ptr().add(64) as *const __m512i);
            let q = [
                _mm512_and_si512(lo, low),
                _mm512_and_si512(_mm512_srli_epi16(lo, 4), low),
                _mm512_and_si512(hi, low),
                _mm512_and_si512(_mm512_srli_epi16(hi, 4), low),
            ];
            let s = picks.map(|p| _mm512_permutexvar_epi16(p, scales));
            for r in 0..M {
                let a = x.get_unchecked(r * kb + b);
                let act = |i: usize| {
                    let act = _mm512_loadu_si512(a.qs.as_ptr().add(64 * i) as *const __m512i);
                    _mm512_maddubs_epi16(q[i], act)
                };
                let even = _mm512_dpwssd_epi32(_mm512_madd_epi16(act(0), s[0]), act(2), s[2]);
                let odd = _mm512_dpwssd_epi32(_mm512_madd_epi16(act(1), s[1]), act(3), s[3]);
                let sumi = _mm512_add_epi32(even, odd);
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), acc[r]);
                let sums = _mm_loadu_si128(a.sums.as_ptr() as *const __m128i);
                let prod = _mm_cvtepi32_ps(_mm_madd_epi16(mins, sums));
                acc_min[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * a.d), prod, acc_min[r]);
            }
        }
        for r in 0..M {
            let min = _mm_add_ps(acc_min[r], _mm_movehl_ps(acc_min[r], acc_min[r]));
            let min = _mm_cvtss_f32(_mm_add_ss(min, _mm_shuffle_ps(min, min, 1)));
            out[r] = _mm512_reduce_add_ps(acc[r]) - min;
        }
    }
}

/// Defines a q4k NEON row kernel `$name` (enabling `$features`) from how it sums one sub-block:
/// `$dot`, the `int32x4_t` of partial sums of the 32 products of nibbles `$q` (two `int8x16_t`)
/// and activations `$a0`, `$a1`, which the sub-block's scale then multiplies.
#[cfg(target_arch = "aarch64")]
macro_rules! q4k_rows_neon {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$q:ident, $a0:ident, $a1:ident| $dot:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[BlockQ4K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
            assert!(x.len() >= m * kb && out.len() >= w.len() / kb * m);
            let low = vdupq_n_u8(0xF);
            for (w, out) in w.chunks_exact(kb).zip(out.chunks_exact_mut(m)) {
                out.fill(0.0);
                for (b, block) in w.iter().enumerate() {
                    // The blocks stream from memory: ask for the bytes [`PREFETCH_BYTES`] ahead.
                    let ahead = (block as *const BlockQ4K as *const u8).wrapping_add(PREFETCH_BYTES);
                    prefetch(ahead);
                    prefetch(ahead.wrapping_add(72));
                    let [sc, mn] = unpacked_scales(&block.scales).map(u64::to_le_bytes);
                    let bits = vcreate_u16(block.d as u64 | (block.dmin as u64) << 16);
                    let both = crate::simd::widen_f16x4(bits);
                    let (d, dmin) = (vgetq_lane_f32::<0>(both), vgetq_lane_f32::<1>(both));
                    let bytes: [uint8x16_t; 8] = std::array::from_fn(|i| {
                        // SAFETY: the block's 128 bytes of nibbles, 16 at a time.
                        unsafe { vld1q_u8(block.qs.as_ptr().add(16 * i)) }
                    });
                    // Sub-block `j`'s 32 weights: the low (even `j`) or high (odd `j`)
                    // nibbles of the 32 bytes of group `j / 2`.
                    let q: [[int8x16_t; 2]; 8] = std::array::from_fn(|j| {
                        std::array::from_fn(|h| {
                            let bytes = bytes[2 * (j / 2) + h];
                            let nibbles = if j % 2 == 0 {
                                vandq_u8(bytes, low)
                            } else {
                                vshrq_n_u8::<4>(bytes)
                            };
                            vreinterpretq_s8_u8(nibbles)
                        })
                    });
                    let mins = vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(u64::from_le_bytes(mn))));
                    for (r, acc) in out.iter_mut().enumerate() {
                        let a = &x[r * kb + b];
                        let mut sum = vdupq_n_s32(0);
                        for (j, q) in q.iter().enumerate() {
                            let act = a.sub_block(j).as_ptr();
                            // SAFETY: a sub-block holds 32 activations.
                            let (a0, a1) = unsafe { (vld1q_s8(act), vld1q_s8(act.add(16))) };
                            let ($q, $a0, $a1) = (q, a0, a1);
                            sum = vmlaq_n_s32(sum, $dot, sc[j] as i32);
                        }
                        let sumi = vaddvq_s32(sum);
                        // SAFETY: the block's 8 sums (16 bytes).
                        let sums = unsafe { vld1q_s16(a.sums.as_ptr()) };
                        let summ = vmull_s16(vget_low_s16(mins), vget_low_s16(sums));
                        let summ = vaddvq_s32(vmlal_high_s16(summ, mins, sums));
                        *acc += a.d * (d * sumi as f32 - dmin * summ as f32);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
q4k_rows_neon!(
    /// [`row_generic`] on NEON: each block's nibbles unpacked once for all `m` activation rows, the 32
    /// products of a sub-block summed in 16 bits (`smull`/`smlal2`, at most 4·15·128 per lane), then
    /// widened and multiplied by the sub-block's scale into 32-bit sums (`saddlp`, `mla`). The integer
    /// sums are exact and the f32 arithmetic on them is [`row_generic_one`]'s, in the same order, so
    /// the outputs equal the portable kernel's bit for bit.
    ///
    /// # Safety
    ///
    /// None beyond [`RowKernel`]'s: NEON is part of aarch64.
    row_neon,
    "neon",
    |q, a0, a1| {
        let p = vmull_s8(vget_low_s8(q[0]), vget_low_s8(a0));
        let p = vmlal_high_s8(p, q[0], a0);
        let p = vmlal_s8(p, vget_low_s8(q[1]), vget_low_s8(a1));
        vpaddlq_s16(vmlal_high_s8(p, q[1], a1))
    }
);

#[cfg(target_arch = "aarch64")]
q4k_rows_neon!(
    /// [`row_neon`] with the dot products: a sub-block is two `sdot`s (16 products each, summed
    /// four at a time into 32-bit lanes), the same exact integer sums, so the outputs equal the
    /// portable kernel's bit for bit too.
    ///
    /// # Safety
    ///
    /// The CPU has FEAT_DotProd ([`RowKernel`]'s contract).
    row_sdot,
    "neon,dotprod",
    |q, a0, a1| crate::simd::sdot!(crate::simd::sdot!(vdupq_n_s32(0), q[0], a0), q[1], a1)
);

/// The row kernel of `imp`, an implementation of [`Kernel::Q4kRows`] this CPU runs.
pub(super) fn row_kernel(imp: Implementation) -> RowKernel {
    debug_assert_eq!(imp.kernel(), Kernel::Q4kRows);
    match imp.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => row_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => row_avx2,
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDotprod => row_sdot,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => row_neon,
        _ => row_generic,
    }
}

/// The row kernel [`multiply`] takes on this CPU (the first the probe lists; the portable one
/// always is).
pub(super) fn chosen() -> Implementation {
    cpu::chosen(Kernel::Q4kRows).expect("the q4k row kernel has a portable implementation")
}

/// Every weight row of every part against the `m` rows of `x` through `imp`'s row kernel
/// ([`multiply_rows`]).
pub(super) fn multiply(
    imp: Implementation,
    parts: &[Q4kLinear],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    // SAFETY: the probe listed `imp`, so the CPU has its row kernel's features.
    unsafe { multiply_rows(row_kernel(imp), parts, x, m, outs) }
}
