//! The q6k row kernels: a few activation rows against stored q6k blocks, weight row by weight
//! row. Each weight block is unpacked once (to 6-bit values in bytes, its 16 scales widened) for up
//! to four activation rows; every row is computed as it would be alone. AVX-512 VNNI and AVX2
//! (ggml's `q6_K·q8_K` dot product widened to several rows), NEON with or without `sdot`
//! (aarch64), and a portable fallback.

use super::{block_sum, BlockQ6K, Q6kLinear, Q8Block};
use crate::cpu::{self, Implementation, Kernel};
#[cfg(target_arch = "x86_64")]
use crate::qmatmul::q8k::in_groups_of_four;
use crate::qmatmul::q8k::multiply_rows;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use {crate::cpu::Isa, crate::simd::prefetch};

type RowKernel = crate::qmatmul::q8k::RowKernel<BlockQ6K>;

/// How far ahead of the block it works on a kernel prefetches the weights (~14 blocks).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const PREFETCH_BYTES: usize = 2944;

fn row_generic(w: &[BlockQ6K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    for (w, out) in w.chunks_exact(kb).zip(out.chunks_exact_mut(m)) {
        for (r, acc) in out.iter_mut().enumerate() {
            *acc = 0.0;
            for (b, block) in w.iter().enumerate() {
                let a = &x[r * kb + b];
                let d = half::f16::from_bits(block.d).to_f32();
                *acc += d * a.d * block_sum(block, a) as f32;
            }
        }
    }
}

/// `vpshufb` masks that spread scale `2j` to bytes 0..8 and scale `2j + 1` to bytes 8..16: the
/// scales of sub-block `j`'s two groups of 16, before they are widened to 16 bits.
#[cfg(target_arch = "x86_64")]
static SCALE_PICKS: [[u8; 16]; 8] = {
    let mut masks = [[0u8; 16]; 8];
    let mut j = 0;
    while j < 8 {
        let mut l = 0;
        while l < 16 {
            masks[j][l] = (2 * j + l / 8) as u8;
            l += 1;
        }
        j += 1;
    }
    masks
};

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2(w: &[BlockQ6K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    in_groups_of_four!(rows_avx2, w, kb, x, m, out, ())
}

/// [`row_avx2`] for `M` activation rows: each block's 256 6-bit values are unpacked once into
/// eight registers of bytes (in `0..64`), multiplied with each row's activations by `vpmaddubsw`,
/// less 32 times the activations (the values' offset), then scaled in 16-bit pairs.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn rows_avx2<const M: usize>(w: &[BlockQ6K], x: &[Q8Block], out: &mut [f32], _: ()) {
    use std::arch::x86_64::*;
    let kb = w.len();
    assert!(x.len() >= M * kb && out.len() >= M);
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract); `x` holds `M` rows of
    // `kb` blocks (asserted), so `r·kb + b` is in bounds; the loads read 32 bytes at offsets 0, 32,
    // 64 and 96 of a block's 128-byte `ql`, 0 and 32 of its 64-byte `qh`, its 16 scales, one
    // aligned sub-block of a [`Q8Block`] (`repr(align(32))`, sub-blocks 32 bytes apart) and the
    // 16-byte masks of [`SCALE_PICKS`].
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let (low4, low2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        for (b, block) in w.iter().enumerate() {
            let ahead = (block as *const BlockQ6K as *const u8).wrapping_add(PREFETCH_BYTES);
            for line in 0..4 {
                prefetch(ahead.wrapping_add(64 * line));
            }
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(block.d as i32)));
            let mut q = [_mm256_setzero_si256(); 8];
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(block.ql.as_ptr().add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(block.ql.as_ptr().add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(block.qh.as_ptr().add(32 * h) as *const __m256i);
                let high = |shift: i32| {
                    let bits = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift)), low2);
                    _mm256_slli_epi16(bits, 4)
                };
                q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, low4), high(0));
                q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), high(2));
                q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), high(4));
                q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4), high(6));
            }
            let scales = _mm_loadu_si128(block.scales.as_ptr() as *const __m128i);
            let wide_scales = _mm256_cvtepi8_epi16(scales);
            let s: [__m256i; 8] = std::array::from_fn(|j| {
                let picked =
                    _mm_shuffle_epi8(scales, _mm_loadu_si128(SCALE_PICKS[j].as_ptr() as *const __m128i));
                _mm256_cvtepi8_epi16(picked)
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = x.get_unchecked(r * kb + b);
                let mut sumi = _mm256_setzero_si256();
                for (j, (q, s)) in q.iter().zip(&s).enumerate() {
                    let act = _mm256_load_si256(a.sub_block(j).as_ptr() as *const __m256i);
                    let pairs = _mm256_maddubs_epi16(*q, act);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(pairs, *s));
                }
                // The values' offset: 32 times each scale times its 16 activations' sum.
                let half_sums = _mm256_loadu_si256(a.half_sums.as_ptr() as *const __m256i);
                let offset = _mm256_madd_epi16(half_sums, wide_scales);
                sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offset, 5));
                *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sumi), *acc);
            }
        }
        for (out, acc) in out.iter_mut().zip(acc) {
            *out = crate::simd::sum8(acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn row_avx512(w: &[BlockQ6K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    in_groups_of_four!(rows_avx512, w, kb, x, m, out, ())
}

/// Which of a block's 16 scales each 16-bit lane of register `i` of [`rows_avx512`] takes: the
/// register holds sub-blocks `SUB_BLOCK_AT[2i]` and `SUB_BLOCK_AT[2i + 1]` (32 values each, so 16
/// pair sums each, the first 8 of a sub-block `j` under scale `2j`, the next 8 under `2j + 1`).
#[cfg(target_arch = "x86_64")]
static SCALE_LANES: [[u16; 32]; 4] = {
    let mut lanes = [[0u16; 32]; 4];
    let mut i = 0;
    while i < 4 {
        let mut k = 0;
        while k < 32 {
            let sub_block = crate::qmatmul::q8k::SUB_BLOCK_AT[2 * i + k / 16];
            lanes[i][k] = (2 * sub_block + k % 16 / 8) as u16;
            k += 1;
        }
        i += 1;
    }
    lanes
};

/// [`rows_avx2`] on 512-bit registers, each holding two sub-blocks in the order [`Q8Block`] keeps
/// the activations (sub-blocks 0 and 2, 1 and 3, 4 and 6, 5 and 7: the low and high nibbles of
/// one 32-byte run of `ql`), the scales applied with VNNI's `vpdpwssd`.
///
/// # Safety
///
/// The CPU has AVX-512F/BW/VNNI, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn rows_avx512<const M: usize>(w: &[BlockQ6K], x: &[Q8Block], out: &mut [f32], _: ()) {
    use std::arch::x86_64::*;
    let kb = w.len();
    assert!(x.len() >= M * kb && out.len() >= M);
    // SAFETY: the caller's CPU has AVX-512F/BW/VNNI, FMA and F16C (this fn's contract); `x` holds
    // `M` rows of `kb` blocks (asserted), so `r·kb + b` is in bounds; the loads read 32 bytes at
    // offsets 0, 32, 64 and 96 of a block's 128-byte `ql`, 0 and 32 of its 64-byte `qh`, its 16
    // scales, 64 bytes at offsets 0, 64, 128 and 192 of a [`Q8Block`]'s 256-byte `qs`, and the
    // 64-byte rows of [`SCALE_LANES`].
    unsafe {
        let mut acc = [_mm512_setzero_ps(); M];
        let (low4, low2) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(3));
        let lanes: [__m512i; 4] =
            std::array::from_fn(|i| _mm512_loadu_si512(SCALE_LANES[i].as_ptr() as *const __m512i));
        for (b, block) in w.iter().enumerate() {
            let ahead = (block as *const BlockQ6K as *const u8).wrapping_add(PREFETCH_BYTES);
            for line in 0..4 {
                prefetch(ahead.wrapping_add(64 * line));
            }
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(block.d as i32)));
            // Register 2h + u: the 32 bytes `ql[64h + 32u..]`, low nibbles then high nibbles, with
            // the high bits from `qh[32h..]` at bits 2u (low) and 2u + 4 (high).
            let mut q = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let qh = _mm256_loadu_si256(block.qh.as_ptr().add(32 * h) as *const __m256i);
                for u in 0..2 {
                    let ql = _mm256_loadu_si256(block.ql.as_ptr().add(64 * h + 32 * u) as *const __m256i);
                    let nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(ql), _mm256_srli_epi16(ql, 4), 1);
                    let shift = _mm_cvtsi32_si128(2 * u as i32);
                    let bits = _mm256_srl_epi16(qh, shift);
                    let bits =
                        _mm512_inserti64x4(_mm512_castsi256_si512(bits), _mm256_srli_epi16(bits, 4), 1);
                    let high = _mm512_slli_epi16(_mm512_and_si512(bits, low2), 4);
                    q[2 * h + u] = _mm512_or_si512(_mm512_and_si512(nibbles, low4), high);
                }
            }
            let wide_scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.scales.as_ptr() as *const __m128i));
            let s = lanes.map(|l| _mm512_permutexvar_epi16(l, _mm512_castsi256_si512(wide_scales)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = x.get_unchecked(r * kb + b);
                let mut sumi = _mm512_setzero_si512();
                for (i, (q, s)) in q.iter().zip(&s).enumerate() {
                    let act = _mm512_loadu_si512(a.qs.as_ptr().add(64 * i) as *const __m512i);
                    sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(*q, act), *s);
                }
                // The values' offset: 32 times each scale times its 16 activations' sum.
                let half_sums = _mm256_loadu_si256(a.half_sums.as_ptr() as *const __m256i);
                let offset = _mm512_zextsi256_si512(_mm256_madd_epi16(half_sums, wide_scales));
                sumi = _mm512_sub_epi32(sumi, _mm512_slli_epi32(offset, 5));
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), *acc);
            }
        }
        for (out, acc) in out.iter_mut().zip(acc) {
            *out = _mm512_reduce_add_ps(acc);
        }
    }
}

/// Defines a q6k NEON row kernel `$name` (enabling `$features`) from how it sums one group of 16
/// weights: `$dot`, the `int32x4_t` of partial sums of the 16 products of `$q` (the weights less
/// their offset, `int8x16_t`) and activations `$a`, which the group's scale then multiplies.
#[cfg(target_arch = "aarch64")]
macro_rules! q6k_rows_neon {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$q:ident, $a:ident| $dot:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        unsafe fn $name(w: &[BlockQ6K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
            use std::arch::aarch64::*;
            assert!(x.len() >= m * kb && out.len() >= w.len() / kb * m);
            let (low4, low2, offset) = (vdupq_n_u8(0xF), vdupq_n_u8(3), vdupq_n_s8(32));
            for (w, out) in w.chunks_exact(kb).zip(out.chunks_exact_mut(m)) {
                out.fill(0.0);
                for (b, block) in w.iter().enumerate() {
                    // The blocks stream from memory: ask for the bytes [`PREFETCH_BYTES`] ahead.
                    let ahead = (block as *const BlockQ6K as *const u8).wrapping_add(PREFETCH_BYTES);
                    for line in 0..4 {
                        prefetch(ahead.wrapping_add(64 * line));
                    }
                    let d = half::f16::from_bits(block.d).to_f32();
                    // Group `g` of 16 weights: sub-block `j = g / 2` (half `h`, quarter `t`),
                    // its values `16(g % 2)..` (the layout [`BlockQ6K`] describes), less 32.
                    let q: [int8x16_t; 16] = std::array::from_fn(|g| {
                        let (h, t, l) = (g / 8, g / 2 % 4, 16 * (g % 2));
                        // SAFETY: 16 of the block's 128 bytes of `ql` and 64 of `qh`.
                        let (ql, qh) = unsafe {
                            (
                                vld1q_u8(block.ql.as_ptr().add(64 * h + 32 * (t & 1) + l)),
                                vld1q_u8(block.qh.as_ptr().add(32 * h + l)),
                            )
                        };
                        let low = if t < 2 { vandq_u8(ql, low4) } else { vshrq_n_u8::<4>(ql) };
                        let high = match t {
                            0 => qh,
                            1 => vshrq_n_u8::<2>(qh),
                            2 => vshrq_n_u8::<4>(qh),
                            _ => vshrq_n_u8::<6>(qh),
                        };
                        let value = vorrq_u8(low, vshlq_n_u8::<4>(vandq_u8(high, low2)));
                        vsubq_s8(vreinterpretq_s8_u8(value), offset)
                    });
                    for (r, acc) in out.iter_mut().enumerate() {
                        let a = &x[r * kb + b];
                        let mut sum = vdupq_n_s32(0);
                        for (g, q) in q.iter().enumerate() {
                            // SAFETY: 16 of a sub-block's 32 activations.
                            let act = unsafe { vld1q_s8(a.sub_block(g / 2).as_ptr().add(16 * (g % 2))) };
                            let ($q, $a) = (*q, act);
                            sum = vmlaq_n_s32(sum, $dot, block.scales[g] as i32);
                        }
                        *acc += d * a.d * vaddvq_s32(sum) as f32;
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
q6k_rows_neon!(
    /// [`row_generic`] on NEON: each block's 6-bit values unpacked once (less their offset, as
    /// bytes) for all `m` activation rows, a group's 16 products summed in 16 bits (`smull`,
    /// `smlal2`: at most 2·32·128 per lane) then widened (`saddlp`) and scaled into 32-bit sums.
    /// The integer sums are exact and the f32 arithmetic on them is [`row_generic`]'s, so the
    /// outputs equal the portable kernel's bit for bit.
    ///
    /// # Safety
    ///
    /// None beyond [`RowKernel`]'s: NEON is part of aarch64.
    row_neon,
    "neon",
    |q, a| vpaddlq_s16(vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(a)), q, a))
);

#[cfg(target_arch = "aarch64")]
q6k_rows_neon!(
    /// [`row_neon`] with the dot products: a group is one `sdot`, the same exact integer sums.
    ///
    /// # Safety
    ///
    /// The CPU has FEAT_DotProd ([`RowKernel`]'s contract).
    row_sdot,
    "neon,dotprod",
    |q, a| crate::simd::sdot!(vdupq_n_s32(0), q, a)
);

/// The row kernel of `imp`, an implementation of [`Kernel::Q6kRows`] this CPU runs.
pub(super) fn row_kernel(imp: Implementation) -> RowKernel {
    debug_assert_eq!(imp.kernel(), Kernel::Q6kRows);
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
pub(in crate::qmatmul) fn chosen() -> Implementation {
    cpu::chosen(Kernel::Q6kRows).expect("the q6k row kernel has a portable implementation")
}

/// Every weight row of every part against the `m` rows of `x` through `imp`'s row kernel
/// ([`multiply_rows`]).
pub(in crate::qmatmul) fn multiply(
    imp: Implementation,
    parts: &[Q6kLinear],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    // SAFETY: the probe listed `imp`, so the CPU has its row kernel's features.
    unsafe { multiply_rows(row_kernel(imp), parts, x, m, outs) }
}
