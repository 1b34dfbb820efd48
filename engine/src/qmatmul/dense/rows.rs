//! The dense row kernels, for a few activation rows (a decode step, a keystroke's tokens): weight
//! rows widened to f32 as they stream from memory, four at a time against up to four activation
//! rows held in registers, on AVX-512, AVX2, NEON (aarch64) or portable code.

use super::{DenseLinear, Values, MAX_ROWS};
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::{BF16, F16, F32};
use crate::cpu::{Implementation, Isa, Kernel};
use crate::qmatmul::{on_every_thread, share};

/// A row kernel: `(weight, first row, rows (1 or 4), k, x, m, out)`, `out[j·m + i]` for weight
/// row `first + j` and activation row `i`, `m` at most [`MAX_ROWS`].
///
/// # Safety
///
/// The CPU has the features of the implementation the kernel was taken for ([`row_kernel`]), and
/// `k` is a multiple of its vector width ([`fits`]).
type RowKernel = unsafe fn(Values, usize, usize, usize, &[f32], usize, &mut [f32]);

/// Whether `imp` (an implementation of [`Kernel::DenseRows`]) takes rows of `k` values: the SIMD
/// kernels take whole registers of them.
pub(super) fn fits(imp: Implementation, k: usize) -> bool {
    match imp.isa() {
        Isa::Avx512 => k.is_multiple_of(16),
        Isa::Avx2 | Isa::Neon => k.is_multiple_of(8),
        _ => true,
    }
}

/// The fastest row kernel this CPU runs that [`fits`] `k` (the portable one takes any `k`).
pub(super) fn chosen(k: usize) -> Implementation {
    crate::cpu::features()
        .implementations(Kernel::DenseRows)
        .find(|&imp| fits(imp, k))
        .expect("the dense row kernel has a portable implementation")
}

/// The row kernel written for `imp` (an implementation of [`Kernel::DenseRows`]).
pub(super) fn row_kernel(imp: Implementation) -> RowKernel {
    assert_eq!(imp.kernel(), Kernel::DenseRows, "{imp} is no dense row kernel");
    match imp.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => rows_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => rows_avx2,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => rows_neon,
        _ => rows_portable,
    }
}

/// Every weight row of every part against the `m` rows (at most [`MAX_ROWS`]) of `x` (`k` each)
/// through `imp`'s row kernel, written with the bias into `outs` (`[m, n]` each), the weight rows
/// split evenly over candle's thread pool in one parallel region.
pub(super) fn multiply(
    imp: Implementation,
    parts: &[DenseLinear],
    x: &[f32],
    m: usize,
    k: usize,
    outs: &mut [Vec<f32>],
) {
    assert!(fits(imp, k), "{imp} does not take rows of {k}");
    assert!(
        m <= MAX_ROWS && x.len() >= m * k,
        "{m} rows of {k} for the row kernels"
    );
    let kernel = row_kernel(imp);
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
                // SAFETY: `imp` came from the probe, so the CPU has its features, and it fits `k`
                // (asserted above).
                unsafe { kernel(part.values, row, rows, k, x, m, &mut block) };
                for j in 0..rows {
                    for i in 0..m {
                        let value = block[j * m + i] + part.bias[row + j];
                        // SAFETY: `outs[p]` holds `m · n` values and every (i, row) of a part is
                        // written by exactly one thread.
                        unsafe { *(out_ptr as *mut f32).add(i * part.n + row + j) = value };
                    }
                }
                row += rows;
            }
            first += part.n;
        }
    });
}

/// The portable row kernel (safe; `unsafe` only to share [`RowKernel`]'s type).
unsafe fn rows_portable(
    w: Values,
    first: usize,
    rows: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    for j in 0..rows {
        let base = (first + j) * k;
        for i in 0..m {
            let x = &x[i * k..][..k];
            out[j * m + i] = x.iter().enumerate().map(|(t, &x)| w.get(base + t) * x).sum();
        }
    }
}

/// Calls `$kernel::<E, R, M>` for the element kind of `$w`, `$rows` (1 or 4) and `M` activation
/// rows at a time (groups of at most `$group`), `$width` values per step.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! dispatch {
    (
        $kernel:ident, $group:expr, $width:expr,
        $w:expr, $first:expr, $rows:expr, $k:expr, $x:expr, $m:expr, $out:expr
    ) => {{
        let (w, first, rows, k, x, m, out) = ($w, $first, $rows, $k, $x, $m, $out);
        let (ptr, size) = w.at(first * k);
        assert!(w.len() >= (first + rows) * k && x.len() >= m * k && out.len() >= rows * m);
        assert!(k.is_multiple_of($width) && (rows == 1 || rows == 4));
        let mut block = [0f32; 4 * 4];
        let mut i = 0;
        while i < m {
            let group = (m - i).min($group);
            let x = x[i * k..].as_ptr();
            macro_rules! call {
                ($e:expr) => {
                    // SAFETY: the caller's CPU has the kernel's features (the row kernel's
                    // contract); `w` holds `rows` rows of `k` from `first`, `x` `group` rows of `k`
                    // from `i`, and `k` is whole steps (asserted above).
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

/// The AVX-512 row kernel ([`RowKernel`]: the CPU has AVX-512F, FMA and F16C).
#[cfg(target_arch = "x86_64")]
unsafe fn rows_avx512(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    dispatch!(block_avx512, 4, 16, w, first, rows, k, x, m, out)
}

/// The AVX2 row kernel ([`RowKernel`]: the CPU has AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
unsafe fn rows_avx2(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    // 16 registers: 2 activation rows × 4 weight rows of accumulators, 4 weights, 2 activations.
    dispatch!(block_avx2, 2, 8, w, first, rows, k, x, m, out)
}

/// `out[j·M + i] = Σ w[j][t]·x[i][t]` for `R` weight rows of element kind `E` (`row_bytes` apart)
/// and `M` activation rows (`k` apart), 16 values per step.
///
/// # Safety
///
/// The CPU has AVX-512F, FMA and F16C; `w` points to `R` rows of `k` values of kind `E` and `x`
/// to `M` rows of `k` f32s; `k` is a multiple of 16.
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
            // SAFETY: 16 f16 values (32 bytes) at `p`, in a row the caller vouched for.
            F16 => _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) }),
            // SAFETY: 16 bf16 values, as above.
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(unsafe {
                _mm256_loadu_si256(p as *const __m256i)
            }))),
            // SAFETY: 16 f32 values (64 bytes) at `p`, as above.
            _ => unsafe { _mm512_loadu_ps(p as *const f32) },
        }
    };
    let step = if E == F32 { 64 } else { 32 };
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut t = 0;
    while t < k {
        let offset = t / 16 * step;
        // SAFETY: row `j < R` of the weight, `t / 16` steps in (`t < k`).
        let wv: [__m512; R] = std::array::from_fn(|j| load(unsafe { w.add(j * row_bytes + offset) }));
        // SAFETY: row `i < M` of the activations, 16 values from `t < k`.
        let xv: [__m512; M] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(x.add(i * k + t)) });
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

/// [`block_avx512`] on 256-bit registers, 8 values per step.
///
/// # Safety
///
/// The CPU has AVX2, FMA and F16C; `w` points to `R` rows of `k` values of kind `E` and `x` to
/// `M` rows of `k` f32s; `k` is a multiple of 8.
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
            // SAFETY: 8 f16 values (16 bytes) at `p`, in a row the caller vouched for.
            F16 => _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) }),
            // SAFETY: 8 bf16 values, as above.
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(unsafe {
                _mm_loadu_si128(p as *const __m128i)
            }))),
            // SAFETY: 8 f32 values (32 bytes) at `p`, as above.
            _ => unsafe { _mm256_loadu_ps(p as *const f32) },
        }
    };
    let step = if E == F32 { 32 } else { 16 };
    let mut acc = [[_mm256_setzero_ps(); M]; R];
    let mut t = 0;
    while t < k {
        let offset = t / 8 * step;
        // SAFETY: row `j < R` of the weight, `t / 8` steps in (`t < k`).
        let wv: [__m256; R] = std::array::from_fn(|j| load(unsafe { w.add(j * row_bytes + offset) }));
        // SAFETY: row `i < M` of the activations, 8 values from `t < k`.
        let xv: [__m256; M] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.add(i * k + t)) });
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

/// The NEON row kernel ([`RowKernel`]; NEON is part of aarch64).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn rows_neon(w: Values, first: usize, rows: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    // 32 registers: 4 activation rows × 4 weight rows of accumulators, 8 weights, 2 activations.
    dispatch!(block_neon, 4, 8, w, first, rows, k, x, m, out)
}

/// `block_avx2` on NEON: 8 values per step as two 128-bit halves, f16 widened by `fcvtl`/`fcvtl2`
/// and bf16 by `shll` (a shift into the high half of each 32-bit lane).
///
/// # Safety
///
/// `w` points to `R` rows of `k` values of kind `E` and `x` to `M` rows of `k` f32s; `k` is a
/// multiple of 8 (NEON is part of aarch64).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn block_neon<const E: u8, const R: usize, const M: usize>(
    w: *const u8,
    row_bytes: usize,
    k: usize,
    x: *const f32,
    out: &mut [f32; 16],
) {
    use std::arch::aarch64::*;
    let load = |p: *const u8| -> [float32x4_t; 2] {
        match E {
            F16 => {
                // SAFETY: 8 f16 values (16 bytes) at `p`, in a row the caller vouched for.
                let (lo, hi) = crate::simd::widen_f16x8(unsafe { vld1q_u16(p as *const u16) });
                [lo, hi]
            }
            BF16 => {
                // SAFETY: 8 bf16 values, as above.
                let bits = unsafe { vld1q_u16(p as *const u16) };
                [
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(bits))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(bits)),
                ]
            }
            // SAFETY: 8 f32 values (32 bytes) at `p`, as above.
            _ => unsafe { [vld1q_f32(p as *const f32), vld1q_f32((p as *const f32).add(4))] },
        }
    };
    let step = if E == F32 { 32 } else { 16 };
    let mut acc = [[vdupq_n_f32(0.0); M]; R];
    let mut t = 0;
    while t < k {
        let offset = t / 8 * step;
        // SAFETY: row `j < R` of the weight, `t / 8` steps in (`t < k`).
        let wv: [[float32x4_t; 2]; R] =
            std::array::from_fn(|j| load(unsafe { w.add(j * row_bytes + offset) }));
        // SAFETY: row `i < M` of the activations, 8 values from `t < k`.
        let xv: [[float32x4_t; 2]; M] = std::array::from_fn(|i| unsafe {
            let at = x.add(i * k + t);
            [vld1q_f32(at), vld1q_f32(at.add(4))]
        });
        for (row, wj) in acc.iter_mut().zip(&wv) {
            for (a, xi) in row.iter_mut().zip(&xv) {
                *a = vfmaq_f32(vfmaq_f32(*a, wj[0], xi[0]), wj[1], xi[1]);
            }
        }
        t += 8;
    }
    for (o, a) in out.iter_mut().zip(acc.iter().flatten()) {
        *o = vaddvq_f32(*a);
    }
}
