//! CPU kernels for the parts of a forward pass where candle's general ops cost more than the work:
//! attention of one new token over the cache (candle runs two batched matmuls, a scale and a softmax
//! per layer, each its own pass over memory and its own dispatch, for a few values per head) and
//! `gelu_new` (candle calls libm's `tanhf` per element, which does not vectorise). Both are f32 and
//! CPU only; callers keep candle's ops for other devices and dtypes. Each has an AVX2 and a
//! portable implementation, taken from the one CPU probe ([`crate::cpu`]). Work is split over
//! candle's own thread pool, so `--threads` governs it too.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape};

use crate::cpu::{Implementation, Kernel};
#[cfg(target_arch = "x86_64")]
use crate::{cpu::Isa, simd::sum8};

type Result<T> = candle_core::Result<T>;

/// The implementation of `kernel` this CPU runs first (every kernel here has a portable one).
fn chosen(kernel: Kernel) -> Implementation {
    crate::cpu::chosen(kernel).expect("every kernel of kernels.rs has a portable implementation")
}

fn f32_slice<'a>(storage: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(values) => Ok(values),
        other => candle_core::bail!("{what}: f32 expected, got {:?}", other.dtype()),
    }
}

/// Attention of the `n` newest positions (a decode step, a keystroke's few tokens) per head over
/// the `total` cached ones, causal: query `i` sees keys `0..total - n + i + 1`.
/// `softmax(q·Kᵀ · scale) · V` per head, the softmax in f32 as transformers computes it.
/// Inputs `q` `[1, heads, n, head_dim]` f32 (rows contiguous), `k`/`v` `[1, heads, total,
/// head_dim]` f32 or f16 (views of the cache: rows contiguous, heads at any stride; f16 is widened
/// to f32 as it is read); output `[1, n, heads·head_dim]` f32, the layout the dense layer takes.
pub(crate) struct DecodeAttention {
    pub scale: f32,
}

impl DecodeAttention {
    /// Most new positions the model sends here over an f32 cache: each query reads its head's
    /// cache again, which suits a few (a keystroke's tokens), while candle's matmuls serve an f32
    /// prefill chunk. An f16 cache sends any number (see `model::attention_core`).
    pub const MAX_QUERIES: usize = 31;
}

/// The implementations [`DecodeAttention`] runs: of [`Kernel::Attention`] over an f32 cache and of
/// [`Kernel::AttentionF16`] over an f16 one.
#[derive(Debug, Clone, Copy)]
struct AttentionKernels {
    f32: Implementation,
    f16: Implementation,
}

impl AttentionKernels {
    /// The ones this CPU runs first.
    fn chosen() -> AttentionKernels {
        AttentionKernels {
            f32: chosen(Kernel::Attention),
            f16: chosen(Kernel::AttentionF16),
        }
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            (q_storage, q_layout),
            (k_storage, k_layout),
            (v_storage, v_layout),
        );
        self.forward_through(AttentionKernels::chosen(), q, k, v)
    }
}

impl DecodeAttention {
    /// [`CustomOp3::cpu_fwd`] through `kernels`: what the tests call to force each kernel this CPU
    /// runs.
    fn forward_through(
        &self,
        kernels: AttentionKernels,
        (q_storage, q_layout): (&CpuStorage, &Layout),
        (k_storage, k_layout): (&CpuStorage, &Layout),
        (v_storage, v_layout): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_slice(q_storage, "query")?;
        let cache = match (k_storage, v_storage) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => Cache::F32(k, v),
            (CpuStorage::F16(k), CpuStorage::F16(v)) => Cache::F16(k, v),
            (k, v) => candle_core::bail!(
                "decode attention: keys {:?} and values {:?}, f32 or f16 both expected",
                k.dtype(),
                v.dtype()
            ),
        };
        let (heads, n, head_dim) = match q_layout.dims() {
            &[1, heads, n, head_dim] if q_layout.stride()[3] == 1 && q_layout.stride()[2] == head_dim => {
                (heads, n, head_dim)
            }
            dims => candle_core::bail!(
                "decode attention: query {dims:?} / {:?} is not [1, heads, n, head_dim] with rows contiguous",
                q_layout.stride()
            ),
        };
        let total = k_layout.dims()[2];
        if n == 0 || n > total {
            candle_core::bail!("decode attention: {n} queries over {total} positions");
        }
        for (name, layout) in [("keys", k_layout), ("values", v_layout)] {
            let stride = layout.stride();
            if layout.dims() != [1, heads, total, head_dim] || stride[3] != 1 || stride[2] != head_dim {
                candle_core::bail!(
                    "decode attention: {name} {:?} / {stride:?} do not fit the query",
                    layout.dims()
                );
            }
        }
        let hidden = heads * head_dim;
        let mut out = vec![0f32; n * hidden];
        let out_ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(heads, |range| {
            let mut scores = vec![0f32; total];
            for h in range {
                let (k_start, v_start) = (
                    k_layout.start_offset() + h * k_layout.stride()[1],
                    v_layout.start_offset() + h * v_layout.stride()[1],
                );
                for i in 0..n {
                    // SAFETY: each (query, head) writes only its own `head_dim` outputs.
                    let out_row = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptr as *mut f32).add(i * hidden + h * head_dim),
                            head_dim,
                        )
                    };
                    let q_row =
                        &q[q_layout.start_offset() + h * q_layout.stride()[1] + i * head_dim..][..head_dim];
                    let seen = total - n + i + 1;
                    let (len, scores) = (seen * head_dim, &mut scores[..seen]);
                    match cache {
                        Cache::F32(k, v) => {
                            let (k, v) = (&k[k_start..][..len], &v[v_start..][..len]);
                            attend(kernels.f32, q_row, k, v, self.scale, scores, out_row)
                        }
                        Cache::F16(k, v) => {
                            let (k, v) = (&k[k_start..][..len], &v[v_start..][..len]);
                            attend_f16(kernels.f16, q_row, k, v, self.scale, scores, out_row)
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((1, n, hidden))))
    }
}

/// The cache's storage, as [`DecodeAttention`] takes it.
#[derive(Clone, Copy)]
enum Cache<'a> {
    /// Keys, values.
    F32(&'a [f32], &'a [f32]),
    F16(&'a [half::f16], &'a [half::f16]),
}

/// [`attend`] over an f16 cache through `kernel`, an implementation of [`Kernel::AttentionF16`]:
/// AVX2 with F16C widens 8 values per instruction as it reads (where `head_dim` is whole
/// registers); the portable code widens each head into a buffer first.
fn attend_f16(
    kernel: Implementation,
    q: &[f32],
    k: &[half::f16],
    v: &[half::f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    assert_eq!(
        kernel.kernel(),
        Kernel::AttentionF16,
        "{kernel} is no f16 attention"
    );
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(8) && kernel.isa() == Isa::Avx2 {
        // SAFETY: `kernel` came from the probe, which lists AVX2 for this kernel only where the
        // CPU has AVX2, FMA and F16C.
        return unsafe { attend_f16_avx2(q, k, v, scale, scores, out) };
    }
    let widen = |xs: &[half::f16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    attend_generic(q, &widen(k), &widen(v), scale, scores, out)
}

/// Scores four keys at a time (four independent sums hide the FMA latency and share each query
/// load), exponentiates them in one vectorised pass, and sums the values with the output held in
/// registers, normalising once at the end.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_f16_avx2(
    q: &[f32],
    k: &[half::f16],
    v: &[half::f16],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let head_dim = q.len();
    let lanes = head_dim / 8;
    let seen = scores.len();
    assert!(k.len() >= seen * head_dim && v.len() >= seen * head_dim && out.len() == head_dim);
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract). Every load reads `q` at
    // `8c < 8·lanes ≤ head_dim`, key or value `t < seen` (asserted to lie in `k` and `v`), or
    // `scores[t..t + 4]` with `t + 4 ≤ seen`, and the stores write those same scores.
    unsafe {
        let mut max = _mm_set1_ps(f32::NEG_INFINITY);
        let mut t = 0;
        while t + 4 <= seen {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..lanes {
                let qv = _mm256_loadu_ps(q.as_ptr().add(8 * c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(qv, widen8(k, (t + j) * head_dim + 8 * c), *acc);
                }
            }
            // Lane j of each 128-bit half: the sum of key j's half; the halves added give the dots.
            let sums = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            let dots = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps::<1>(sums));
            let four = _mm_mul_ps(dots, _mm_set1_ps(scale));
            _mm_storeu_ps(scores.as_mut_ptr().add(t), four);
            max = _mm_max_ps(max, four);
            t += 4;
        }
        let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
        let mut max = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps::<1>(max, max)));
        // The last `seen % 4` keys, one at a time.
        for (t, score) in scores.iter_mut().enumerate().skip(t) {
            let mut acc = _mm256_setzero_ps();
            for c in 0..lanes {
                acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(q.as_ptr().add(8 * c)),
                    widen8(k, t * head_dim + 8 * c),
                    acc,
                );
            }
            *score = sum8(acc) * scale;
            max = max.max(*score);
        }
        for score in scores.iter_mut() {
            *score = exp(*score - max);
        }
        let mut partial = [0f32; 8];
        for chunk in scores.chunks(8) {
            for (p, s) in partial.iter_mut().zip(chunk) {
                *p += s;
            }
        }
        let inv = 1.0 / partial.iter().sum::<f32>();
        let mut c = 0;
        while c < lanes {
            let (v, out) = (&v[8 * c..], &mut out[8 * c..]);
            c += match lanes - c {
                8.. => weighted_f16::<8>(scores, v, head_dim, inv, out),
                4.. => weighted_f16::<4>(scores, v, head_dim, inv, out),
                2.. => weighted_f16::<2>(scores, v, head_dim, inv, out),
                _ => weighted_f16::<1>(scores, v, head_dim, inv, out),
            };
        }
    }
}

/// `out[..8L] = inv · Σ_t probs[t] · v[t·head_dim..][..8L]` with the `L` output registers held
/// across the keys; returns `L`.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn weighted_f16<const L: usize>(
    probs: &[f32],
    v: &[half::f16],
    head_dim: usize,
    inv: f32,
    out: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    assert!(out.len() >= 8 * L && (probs.is_empty() || v.len() >= (probs.len() - 1) * head_dim + 8 * L));
    // SAFETY: the caller's CPU has AVX2, FMA and F16C (this fn's contract); the `8L` values read
    // from each of the `probs.len()` value rows and the `8L` outputs written lie in `v` and `out`
    // (asserted).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); L];
        for (t, &p) in probs.iter().enumerate() {
            let p = _mm256_set1_ps(p);
            for (l, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(p, widen8(v, t * head_dim + 8 * l), *acc);
            }
        }
        for (l, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8 * l),
                _mm256_mul_ps(*acc, _mm256_set1_ps(inv)),
            );
        }
        L
    }
}

/// Eight f16 values from `at`, widened.
///
/// # Safety
///
/// The CPU has AVX2 and F16C, and `xs` holds eight values from `at`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen8(xs: &[half::f16], at: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: eight values from `at` lie in `xs` (this fn's contract).
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(xs.as_ptr().add(at) as *const __m128i)) }
}

/// `softmax(q·Kᵀ · scale) · V` of one query over `scores.len()` keys through `kernel`, an
/// implementation of [`Kernel::Attention`]: the portable code compiled for AVX2 and FMA, or as is.
fn attend(
    kernel: Implementation,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    assert_eq!(kernel.kernel(), Kernel::Attention, "{kernel} is no attention");
    #[cfg(target_arch = "x86_64")]
    if kernel.isa() == Isa::Avx2 {
        // SAFETY: `kernel` came from the probe, which lists AVX2 for this kernel only where the
        // CPU has AVX2 and FMA.
        return unsafe { attend_avx2(q, k, v, scale, scores, out) };
    }
    attend_generic(q, k, v, scale, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    attend_generic(q, k, v, scale, scores, out)
}

/// Written so that the compiler vectorises it (eight independent partial sums per dot product).
#[inline(always)]
fn attend_generic(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let head_dim = q.len();
    let mut max = f32::NEG_INFINITY;
    for (score, key) in scores.iter_mut().zip(k.chunks_exact(head_dim)) {
        *score = dot(q, key) * scale;
        max = max.max(*score);
    }
    let mut sum = 0f32;
    for score in scores.iter_mut() {
        *score = exp(*score - max);
        sum += *score;
    }
    out.fill(0.0);
    for (score, value) in scores.iter().zip(v.chunks_exact(head_dim)) {
        let p = score / sum;
        for (o, x) in out.iter_mut().zip(value) {
            *o += p * x;
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `gelu_new` (the tanh approximation), element-wise on a contiguous f32 tensor:
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, with tanh from a vectorisable `exp`.
pub(crate) struct GeluNew;

/// Elements per work item of the thread pool (smaller tensors run on the calling thread).
const GELU_CHUNK: usize = 16 * 1024;

impl CustomOp1 for GeluNew {
    fn name(&self) -> &'static str {
        "gelu-new"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu: the input must be contiguous");
        };
        let xs = &f32_slice(storage, "gelu input")?[start..end];
        let mut out = vec![0f32; xs.len()];
        let kernel = chosen(Kernel::Gelu);
        if xs.len() <= GELU_CHUNK {
            gelu_slice(kernel, xs, &mut out);
        } else {
            let out_ptr = out.as_mut_ptr() as usize;
            candle_core::utils::barrier_pool().execute_chunked(xs.len().div_ceil(GELU_CHUNK), |range| {
                let from = range.start * GELU_CHUNK;
                let to = (range.end * GELU_CHUNK).min(xs.len());
                // SAFETY: work items cover disjoint element ranges.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(from), to - from) };
                gelu_slice(kernel, &xs[from..to], dst);
            });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `gelu_new` of every value of `xs` into `out` through `kernel`, an implementation of
/// [`Kernel::Gelu`]: the portable code compiled for AVX2 and FMA, or as is.
fn gelu_slice(kernel: Implementation, xs: &[f32], out: &mut [f32]) {
    assert_eq!(kernel.kernel(), Kernel::Gelu, "{kernel} is no gelu");
    #[cfg(target_arch = "x86_64")]
    if kernel.isa() == Isa::Avx2 {
        // SAFETY: `kernel` came from the probe, which lists AVX2 for this kernel only where the
        // CPU has AVX2 and FMA.
        return unsafe { gelu_avx2(xs, out) };
    }
    gelu_generic(xs, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_generic(xs, out)
}

#[inline(always)]
fn gelu_generic(xs: &[f32], out: &mut [f32]) {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    for (o, &x) in out.iter_mut().zip(xs) {
        let u = SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x);
        *o = 0.5 * x * (1.0 + tanh(u));
    }
}

/// `tanh(u) = 1 - 2 / (e^{2u} + 1)`; exact to a few ulp of 1 (gelu adds it to 1, so relative error
/// near 0 does not matter).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// Cephes' `expf`: 2^n · p(r) with `r = x - n·ln 2`, `|r| ≤ ln 2 / 2`, a degree-7 polynomial;
/// within 2 ulp of libm over the range that does not overflow. Branch-free so it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, D};

    /// `exp` against libm, and `gelu_new` through each implementation this CPU runs against
    /// candle's `gelu`.
    #[test]
    fn exp_and_gelu_match_libm() {
        let mut worst_exp = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst_exp = worst_exp.max(rel);
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 / 100.0).collect();
        let candle = Tensor::new(xs.as_slice(), &Device::Cpu)
            .and_then(|t| t.gelu())
            .and_then(|t| t.to_vec1::<f32>());
        let candle = candle.expect("candle's gelu");
        for kernel in crate::cpu::features().implementations(Kernel::Gelu) {
            let mut ours = vec![0f32; xs.len()];
            gelu_slice(kernel, &xs, &mut ours);
            let worst = ours
                .iter()
                .zip(&candle)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-6, "{kernel}: gelu differs from candle's by {worst}");
        }
    }

    /// [`DecodeAttention`] through the given kernels instead of the ones this CPU runs first.
    struct Forced(DecodeAttention, AttentionKernels);

    impl CustomOp3 for Forced {
        fn name(&self) -> &'static str {
            "decode-attention-forced"
        }

        fn cpu_fwd(
            &self,
            q_storage: &CpuStorage,
            q_layout: &Layout,
            k_storage: &CpuStorage,
            k_layout: &Layout,
            v_storage: &CpuStorage,
            v_layout: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let (q, k, v) = (
                (q_storage, q_layout),
                (k_storage, k_layout),
                (v_storage, v_layout),
            );
            self.0.forward_through(self.1, q, k, v)
        }
    }

    #[test]
    fn gelu_op_splits_large_tensors_and_keeps_the_shape() {
        let xs = Tensor::randn(0f32, 3.0, (3, GELU_CHUNK + 7), &Device::Cpu).expect("randn");
        let ours = xs.apply_op1_no_bwd(&GeluNew).expect("gelu op");
        assert_eq!(ours.dims(), xs.dims());
        let diff = (ours - xs.gelu().expect("gelu"))
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all());
        let diff: f32 = diff.and_then(|d| d.to_scalar()).expect("diff");
        assert!(diff < 1e-5, "{diff}");
    }

    /// Against candle's matmul/softmax on a cache-like view: heads strided by a larger capacity;
    /// through the kernels this CPU runs first, and through each one it runs, forced.
    #[test]
    fn decode_attention_matches_candle_on_a_cache_view() {
        let (heads, capacity, total) = (4, 48, 40);
        let dev = Device::Cpu;
        // An f32 cache, and an f16 one (a quantized or 16-bit model's), against candle's masked
        // attention in f32 on the same values, for one new position and for three, and over f16
        // for prefill chunks (more than MAX_QUERIES, and a whole prompt); a head_dim that is not a
        // multiple of 8 takes the portable f16 path.
        for (dtype, head_dim, n) in [
            (DType::F32, 16, 1),
            (DType::F32, 16, 3),
            (DType::F16, 16, 1),
            (DType::F16, 16, 3),
            (DType::F16, 12, 3),
            (DType::F16, 64, 3),
            (DType::F16, 104, 1),
            (DType::F16, 16, DecodeAttention::MAX_QUERIES + 4),
            (DType::F16, 16, total),
        ] {
            let q = Tensor::randn(0f32, 1.0, (1, heads, n, head_dim), &dev).expect("q");
            let cache = || {
                Tensor::randn(0f32, 1.0, (1, heads, capacity, head_dim), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .expect("cache")
            };
            let (k_cache, v_cache) = (cache(), cache());
            let (k, v) = (
                k_cache.narrow(2, 0, total).expect("k view"),
                v_cache.narrow(2, 0, total).expect("v view"),
            );
            let scale = 1.0 / (head_dim as f32).sqrt();
            let ours = q
                .apply_op3_no_bwd(&k, &v, &DecodeAttention { scale })
                .expect("op");
            // The same through each implementation this CPU runs for the cache's dtype.
            let kernel = if dtype == DType::F32 {
                Kernel::Attention
            } else {
                Kernel::AttentionF16
            };
            let forced: Vec<(Implementation, Tensor)> = crate::cpu::features()
                .implementations(kernel)
                .map(|imp| {
                    let mut kernels = AttentionKernels::chosen();
                    match dtype {
                        DType::F32 => kernels.f32 = imp,
                        _ => kernels.f16 = imp,
                    }
                    let op = Forced(DecodeAttention { scale }, kernels);
                    (imp, q.apply_op3_no_bwd(&k, &v, &op).expect("forced op"))
                })
                .collect();
            let (k, v) = (
                k.to_dtype(DType::F32).expect("k f32"),
                v.to_dtype(DType::F32).expect("v f32"),
            );
            let mask = crate::model::causal_mask(n, total - n, &dev).expect("mask");
            let scores = (q.matmul(&k.t().expect("kt")).expect("qk") * scale as f64)
                .and_then(|s| s.broadcast_add(&mask))
                .expect("scores");
            let probs = candle_nn::ops::softmax(&scores, D::Minus1).expect("softmax");
            let expected = probs
                .matmul(&v.contiguous().expect("v"))
                .and_then(|o| o.transpose(1, 2))
                .and_then(|o| o.reshape((1, n, heads * head_dim)))
                .expect("pv");
            let paths = std::iter::once(("chosen".to_string(), ours));
            for (path, ours) in paths.chain(forced.into_iter().map(|(imp, t)| (imp.to_string(), t))) {
                assert_eq!(ours.dims(), expected.dims());
                let diff: f32 = (ours - &expected)
                    .and_then(|d| d.abs())
                    .and_then(|d| d.max_all())
                    .and_then(|d| d.to_scalar())
                    .expect("diff");
                assert!(
                    diff < 1e-5,
                    "{path}: {dtype:?}, head_dim {head_dim}, {n} queries: {diff}"
                );
            }
        }
    }
}
