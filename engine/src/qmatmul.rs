//! Quantized matmuls on the CPU without candle's copies of the weights. q4k is read straight from
//! the stored GGUF blocks: for a few activation rows (a decode step, a keystroke's new tokens)
//! candle 0.11 lays every q4k weight out again (16-row tiles with the scales widened to f32: 1.33×
//! the bytes, read on every token, and a second copy of the model in memory); decoding is bound by
//! the bytes read per token, so reading the stored 144-byte blocks is leaner, and with the next
//! point faster. Several weights that share one input (a layer's q, k, v and fc1) run in one pass
//! over one quantized input, and the bias is added on the way out. CPU, f32 activations; AVX-512
//! VNNI or AVX2+FMA by runtime detection, with a portable fallback; many rows (prefill) on AMX
//! tiles where the CPU has them ([`amx`]), else on AVX2 tiles unpacked once per block
//! ([`q4k_avx2`]). q8_0 is repacked at load into tiles of the same size that replace the stored
//! blocks ([`q8_0`]). Dense f16, bf16 and f32 weights are widened to f32 as they are read
//! ([`dense`]).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Storage, Tensor};

use crate::cpu::{self, Implementation, Isa, Kernel};

type Result<T> = candle_core::Result<T>;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod dense;
mod q4k_avx2;
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

/// Most activation rows the row kernels take at once; more are run in chunks of this many, each
/// against every weight row (the chunk's quantized activations, ~70 KB at Phi-1's widest, stay in
/// L2). Per row they do more work than candle's tiles (they match them at 1–3 rows, take ~1.3×
/// the time at 8 and ~2× at 31), but candle would first build its tiled copy of every weight (a
/// gigabyte for Phi-1, seconds on first use). Weights of whole 16-row tiles go from 12 rows to
/// AMX where the CPU has it, else from 8 rows to the AVX2 tiles ([`q4k_avx2`]); the chunks serve
/// the rest.
pub(crate) const MAX_ROWS: usize = 31;

const QK_K: usize = 256;

/// How far ahead of the block it works on a kernel prefetches the weights.
const PREFETCH_BYTES: usize = 3072;

/// ggml's `block_q4_K`: 256 weights `d·scale_j·q − dmin·min_j` in 8 sub-blocks of 32, the 6-bit
/// scales and mins packed in 12 bytes, 4-bit `q`: byte `l` of 32-byte group `g` holds weight
/// `64g + l` (low nibble) and `64g + 32 + l` (high nibble).
#[repr(C)]
struct BlockQ4K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// 256 activations as `d·qs` (ggml's q8_K rounding) with the sums of `qs` per 32-value sub-block,
/// which the mins multiply. `qs` holds the 32-value sub-blocks in the order the nibbles of 64 stored
/// bytes come out of a 512-bit register, [`SUB_BLOCK_AT`]: low nibbles of bytes 0..64 are
/// sub-blocks 0 and 2, high nibbles 1 and 3, and so on.
#[repr(C, align(32))]
#[derive(Clone)]
struct Q8Block {
    qs: [i8; QK_K],
    d: f32,
    sums: [i16; 8],
}

impl Q8Block {
    const ZERO: Q8Block = Q8Block {
        qs: [0; QK_K],
        d: 0.0,
        sums: [0; 8],
    };

    fn quantize(xs: &[f32]) -> Q8Block {
        let mut block = Q8Block::ZERO;
        let (mut max, mut amax) = (0f32, 0f32);
        for &x in xs {
            if amax < x.abs() {
                amax = x.abs();
                max = x;
            }
        }
        if amax == 0.0 {
            return block;
        }
        let iscale = -127f32 / max;
        for (j, (xs, sum)) in xs.chunks_exact(32).zip(&mut block.sums).enumerate() {
            let qs = &mut block.qs[32 * SUB_BLOCK_AT[j]..][..32];
            for (q, &x) in qs.iter_mut().zip(xs) {
                *q = (iscale * x).round().clamp(-128.0, 127.0) as i8;
            }
            *sum = qs.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
        block
    }

    /// The 32 quantized activations of sub-block `j`.
    fn sub_block(&self, j: usize) -> &[i8] {
        &self.qs[32 * SUB_BLOCK_AT[j]..][..32]
    }
}

/// Where sub-block `j` of 32 activations sits in [`Q8Block::qs`] (in units of 32; its own inverse).
const SUB_BLOCK_AT: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// The 8 6-bit scales and the 8 mins of a block as the bytes of two `u64`s, unpacked 4 at a time
/// as ggml's AVX2 kernel does (ggml's `get_scale_min_k4` for each).
fn unpacked_scales(s: &[u8; 12]) -> [u64; 2] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let scales = (u0 & KMASK1) as u64 | (((u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)) as u64) << 32;
    let mins = (u1 & KMASK1) as u64 | ((((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4)) as u64) << 32;
    [scales, mins]
}

fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// `out[i·m + r] = Σ_k w_i[k]·x[r][k]` for consecutive weight rows `w_i` (`kb` blocks each; one
/// call takes many, so what a call sets up is shared) and `m` activation rows (`x` row-major).
type RowKernel = unsafe fn(&[BlockQ4K], usize, &[Q8Block], usize, &mut [f32]);

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

/// A [`RowKernel`] body: for each weight row, the `m` activation rows in groups of up to four,
/// each group through `$rows::<M>(w, x, out, $extra)` (which unpacks the weights once for its `M`
/// rows).
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups_of_four {
    ($rows:ident, $w:expr, $kb:expr, $x:expr, $m:expr, $out:expr, $extra:expr) => {{
        let (kb, x, m, extra) = ($kb, $x, $m, $extra);
        for (w, out) in $w.chunks_exact(kb).zip($out.chunks_exact_mut(m)) {
            let mut r = 0;
            while r < m {
                let (x, out) = (&x[r * kb..], &mut out[r..]);
                match m - r {
                    1 => $rows::<1>(w, x, out, extra),
                    2 => $rows::<2>(w, x, out, extra),
                    3 => $rows::<3>(w, x, out, extra),
                    _ => $rows::<4>(w, x, out, extra),
                }
                r += 4;
            }
        }
    }};
}

/// A block's `d` and `dmin`, widened by F16C (`half` calls out of line for each, with a
/// `vzeroupper`: a fifth of the AVX2 row kernel's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn d_and_dmin(block: &BlockQ4K) -> (f32, f32) {
    use std::arch::x86_64::*;
    let both = _mm_cvtph_ps(_mm_cvtsi32_si128(
        (block.d as u32 | (block.dmin as u32) << 16) as i32,
    ));
    (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
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
    let mut acc = [_mm256_setzero_ps(); M];
    let mut acc_min = [_mm_setzero_ps(); M];
    let low = _mm256_set1_epi8(0xF);
    for (b, block) in w.iter().enumerate() {
        let [sc, mn] = unpacked_scales(&block.scales);
        let scales = _mm256_set1_epi64x(sc as i64);
        let mins = _mm_cvtepu8_epi16(_mm_set_epi64x(0, mn as i64));
        let (d, dmin) = d_and_dmin(block);
        let ahead = (block as *const BlockQ4K as *const i8).wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(72));
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn row_avx512(w: &[BlockQ4K], kb: usize, x: &[Q8Block], m: usize, out: &mut [f32]) {
    in_groups_of_four!(rows_avx512, w, kb, x, m, out, ())
}

/// [`rows_avx2`] on 512-bit registers: each holds two sub-blocks (64 stored bytes, one nibble
/// half), whose activations [`Q8Block`] keeps side by side, and the scales are applied with
/// VNNI's `vpdpwssd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn rows_avx512<const M: usize>(w: &[BlockQ4K], x: &[Q8Block], out: &mut [f32], _: ()) {
    use std::arch::x86_64::*;
    let kb = w.len();
    assert!(x.len() >= M * kb && out.len() >= M);
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
        let (d, dmin) = d_and_dmin(block);
        // The blocks stream from memory and the kernel computes for a while on each: ask for the
        // bytes ~21 blocks ahead (measured on an fc1: 0.93 ms without, 0.65 at 1 KiB, 0.42–0.56 at
        // 3 KiB).
        let ahead = (block as *const BlockQ4K as *const i8).wrapping_add(PREFETCH_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(72));
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
                let act = _mm512_load_si512(a.qs.as_ptr().add(64 * i) as *const __m512i);
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

/// The row kernel of `imp`, an implementation of [`Kernel::Q4kRows`] this CPU runs.
fn row_kernel(imp: Implementation) -> RowKernel {
    debug_assert_eq!(imp.kernel(), Kernel::Q4kRows);
    match imp.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => row_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => row_avx2,
        _ => row_generic,
    }
}

/// A q4k weight `[n, k]` as its stored blocks, with the bias added to its outputs.
struct Part<'a> {
    blocks: &'a [BlockQ4K],
    bias: &'a [f32],
    n: usize,
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
    if k % QK_K != 0 {
        return Ok(None);
    }
    let mut weights: Vec<(&QTensor, &Tensor)> = Vec::with_capacity(linears.len());
    for &(weight, bias) in linears {
        match weight {
            Weight::Candle(QMatMul::QTensor(w))
                if w.dtype() == GgmlDType::Q4K && w.shape().dims2()?.1 == k =>
            {
                if bias.dtype() != DType::F32 || bias.dims1()? != w.shape().dims2()?.0 {
                    return Ok(None);
                }
                weights.push((w, bias))
            }
            _ => return Ok(None),
        }
    }
    let datas = weights
        .iter()
        .map(|(w, _)| w.data())
        .collect::<Result<Vec<Cow<[u8]>>>>()?;
    let biases = weights
        .iter()
        .map(|(_, b)| b.contiguous())
        .collect::<Result<Vec<Tensor>>>()?;
    let bias_guards: Vec<_> = biases.iter().map(|b| b.storage_and_layout()).collect();
    let mut parts = Vec::with_capacity(weights.len());
    for ((data, (guard, layout)), (w, _)) in datas.iter().zip(&bias_guards).zip(&weights) {
        let n = w.shape().dims2()?.0;
        // SAFETY: BlockQ4K is plain bytes (`repr(C)`, no padding, any bit pattern valid).
        let (head, blocks, tail) = unsafe { data.align_to::<BlockQ4K>() };
        if !head.is_empty() || !tail.is_empty() || blocks.len() != n * k / QK_K {
            return Ok(None);
        }
        let Some(bias) = cpu_f32(guard, layout, n)? else {
            return Ok(None);
        };
        parts.push(Part { blocks, bias, n });
    }

    let xs = xs.contiguous()?;
    let (guard, layout) = xs.storage_and_layout();
    let Some(input) = cpu_f32(&guard, layout, m * k)? else {
        return Ok(None);
    };
    let quantized: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let amx = m >= amx::MIN_ROWS && amx::available(Kernel::Q4kTiles) && amx::fits(&parts);
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let amx = false;
    if amx {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        amx::run_q4k(&parts, &quantized, m, &mut outs);
    } else if m >= q4k_avx2::MIN_ROWS && q4k_avx2::available() && q4k_avx2::fits(&parts) {
        q4k_avx2::run_q4k(&parts, &quantized, m, &mut outs);
    } else {
        run(&parts, &quantized, m, &mut outs);
    }
    drop(guard);

    outputs(outs, parts.iter().map(|p| p.n), &dims).map(Some)
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
        && amx::available(Kernel::Q8_0Tiles)
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

/// How many weight rows [`run`] hands a row kernel at once.
const SLAB: usize = 64;

/// Every weight row of every part against the `m` rows of `x` (chunks of [`MAX_ROWS`] rows, each
/// against all weight rows), the weight rows split evenly over candle's thread pool in one
/// parallel region.
fn run(parts: &[Part], x: &[Q8Block], m: usize, outs: &mut [Vec<f32>]) {
    static KERNEL: std::sync::OnceLock<RowKernel> = std::sync::OnceLock::new();
    let kernel =
        *KERNEL.get_or_init(|| cpu::chosen(Kernel::Q4kRows).map_or(row_generic as RowKernel, row_kernel));
    let total: usize = parts.iter().map(|p| p.n).sum();
    let kb = x.len() / m;
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    on_every_thread(total, |start, end| {
        let mut slab_out = [0f32; SLAB * MAX_ROWS];
        for r0 in (0..m).step_by(MAX_ROWS) {
            let rows = MAX_ROWS.min(m - r0);
            let x = &x[r0 * kb..];
            let mut first = 0;
            for (part, &out_ptr) in parts.iter().zip(&out_ptrs) {
                let mine = share(start, end, first, part.n);
                for slab in (mine.start..mine.end).step_by(SLAB) {
                    let count = SLAB.min(mine.end - slab);
                    let w = &part.blocks[slab * kb..][..count * kb];
                    // SAFETY: the probe listed the kernel's implementation, so the CPU has its
                    // features.
                    unsafe { kernel(w, kb, x, rows, &mut slab_out[..count * rows]) };
                    for (i, values) in slab_out[..count * rows].chunks_exact(rows).enumerate() {
                        let row = slab + i;
                        for (r, value) in values.iter().enumerate() {
                            // SAFETY: every (r, row) of a part is written by exactly one thread.
                            let at = (r0 + r) * part.n + row;
                            unsafe { *(out_ptr as *mut f32).add(at) = value + part.bias[row] };
                        }
                    }
                }
                first += part.n;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

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

    /// The stored-block kernels against candle's own q4k matmul on the same blocks (which
    /// quantizes the input the same way), for one to many rows and two weights sharing the input.
    #[test]
    fn matches_candles_q4k_matmul() -> Result<()> {
        let (k, n1, n2) = (512, 48, 208);
        let dev = Device::Cpu;
        let w1 = QTensor::quantize(
            &Tensor::from_vec(random(n1 * k, 1), (n1, k), &dev)?,
            GgmlDType::Q4K,
        )?;
        let w2 = QTensor::quantize(
            &Tensor::from_vec(random(n2 * k, 2), (n2, k), &dev)?,
            GgmlDType::Q4K,
        )?;
        let (w1, w2) = (QMatMul::from_qtensor(w1)?, QMatMul::from_qtensor(w2)?);
        let b1 = Tensor::from_vec(random(n1, 3), n1, &dev)?;
        let b2 = Tensor::from_vec(random(n2, 4), n2, &dev)?;
        for m in [1, 3, 8, 16, MAX_ROWS, 40, 128] {
            let xs = Tensor::from_vec(random(m * k, 5 + m as u64), (1, m, k), &dev)?;
            let (c1, c2) = (Weight::Candle(w1.clone()), Weight::Candle(w2.clone()));
            let outs = linear_rows(&[(&c1, &b1), (&c2, &b2)], &xs)?.expect("q4k on the CPU is taken");
            for ((w, b), out) in [(&w1, &b1), (&w2, &b2)].into_iter().zip(&outs) {
                let expected = w.forward(&xs)?.broadcast_add(b)?;
                assert_eq!(out.dims(), expected.dims());
                let diff = (out - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-5 * scale,
                    "m={m}: max difference {diff} (outputs up to {scale})"
                );
            }
            if m >= q4k_avx2::MIN_ROWS && q4k_avx2::available() {
                // The AVX2 tiles too where AMX took the rows above.
                let datas = [&w1, &w2].map(|w| match w {
                    QMatMul::QTensor(w) => w.data(),
                    _ => panic!("quantized above"),
                });
                let [d1, d2] = datas;
                let (d1, d2) = (d1?, d2?);
                fn blocks(data: &[u8]) -> &[BlockQ4K] {
                    // SAFETY: as in `linear_rows`; the comparison fails if they did not line up.
                    unsafe { data.align_to::<BlockQ4K>().1 }
                }
                let (bias1, bias2) = (b1.to_vec1::<f32>()?, b2.to_vec1::<f32>()?);
                let parts = [
                    Part {
                        blocks: blocks(&d1),
                        bias: &bias1,
                        n: n1,
                    },
                    Part {
                        blocks: blocks(&d2),
                        bias: &bias2,
                        n: n2,
                    },
                ];
                let input = xs.flatten_all()?.to_vec1::<f32>()?;
                let quantized: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
                let mut got = vec![vec![0f32; m * n1], vec![0f32; m * n2]];
                q4k_avx2::run_q4k(&parts, &quantized, m, &mut got);
                for (got, expected) in got.iter().zip(&outs) {
                    let expected = expected.flatten_all()?.to_vec1::<f32>()?;
                    let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (g, e) in got.iter().zip(&expected) {
                        assert!((g - e).abs() <= 1e-5 * scale, "AVX2 tiles, m={m}: {g} vs {e}");
                    }
                }
            }
            if m > MAX_ROWS {
                continue;
            }
            // Each row kernel this CPU can run, not only the one `linear_rows` picked.
            let quantized: Vec<Q8Block> = xs
                .flatten_all()?
                .to_vec1::<f32>()?
                .chunks_exact(QK_K)
                .map(Q8Block::quantize)
                .collect();
            let QMatMul::QTensor(w) = &w1 else {
                panic!("w1 is quantized")
            };
            let data = w.data()?;
            // SAFETY: as in `linear_rows`; the test below fails if the blocks did not line up.
            let (_, blocks, _) = unsafe { data.align_to::<BlockQ4K>() };
            let expected = w1.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
            let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
            for imp in cpu::features().implementations(Kernel::Q4kRows) {
                let kernel = row_kernel(imp);
                // All rows in one call, and the first three in a call of their own.
                for n in [n1, 3] {
                    let mut got = vec![f32::NAN; n * m];
                    // SAFETY: the probe listed the implementation, so the CPU has its features.
                    unsafe { kernel(&blocks[..n * k / QK_K], k / QK_K, &quantized, m, &mut got) };
                    for i in 0..n {
                        for r in 0..m {
                            let (g, e) = (got[i * m + r], expected[r * n1 + i]);
                            assert!((g - e).abs() <= 1e-5 * scale, "{imp}, m={m}: {g} vs {e}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Row counts beyond [`MAX_ROWS`] run in chunks through the row kernels where AMX is absent or
    /// the weight is not whole tiles of 16 rows: against candle's matmul.
    #[test]
    fn many_rows_run_in_chunks() -> Result<()> {
        let (k, n) = (512, 24);
        let dev = Device::Cpu;
        let w = QMatMul::from_qtensor(QTensor::quantize(
            &Tensor::from_vec(random(n * k, 7), (n, k), &dev)?,
            GgmlDType::Q4K,
        )?)?;
        let b = Tensor::from_vec(random(n, 8), n, &dev)?;
        for m in [MAX_ROWS + 1, 2 * MAX_ROWS, 2 * MAX_ROWS + 5] {
            let xs = Tensor::from_vec(random(m * k, 9 + m as u64), (m, k), &dev)?;
            let outs = linear_rows(&[(&Weight::Candle(w.clone()), &b)], &xs)?.expect("q4k is taken");
            let expected = w.forward(&xs)?.broadcast_add(&b)?;
            let diff = (&outs[0] - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale,
                "m={m}: max difference {diff} (outputs up to {scale})"
            );
        }
        Ok(())
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
        let long = Tensor::zeros((1, MAX_ROWS + 1, 256), DType::F32, &dev)?;
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
        for m in [1, 3, 4, 5, 16, 28, MAX_ROWS, 40, 128] {
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
