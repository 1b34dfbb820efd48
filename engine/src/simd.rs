//! SIMD helpers shared by the kernels of several formats: horizontal sums, prefetches and the
//! AMX tile configuration on x86-64; f16 widening and prefetches on aarch64. Each kernel module
//! keeps its own arithmetic.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// The sum of a register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn sum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
}

/// Asks for the cache line at `at` (into every cache level). Any address will do: a prefetch is a
/// hint, reads nothing the program sees and never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: `prefetcht0` needs only SSE (every x86-64 CPU) and does not dereference `at`.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
}

/// A value aligned to 64 bytes, as AMX tile loads and stores and 512-bit aligned loads want.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
pub(crate) struct Aligned64<T>(pub(crate) T);

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Configures this thread's AMX tiles: tmm0–3 C, 16 × 16 i32; tmm4–5 A, 16 × 32 u8; tmm6–7 B,
/// 8 × 64 i8 — the layout candle's own q4k AMX kernel loads, so either finds its tiles as it
/// expects on a thread the other used.
///
/// # Safety
///
/// The CPU has AMX-TILE and Linux granted this process the tile state ([`crate::cpu::Features::amx`]).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) unsafe fn load_amx_tile_config() {
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        let (colsb, rows) = match t {
            0..4 => (64, 16),
            4..6 => (32, 16),
            _ => (64, 8),
        };
        config.colsb[t] = colsb;
        config.rows[t] = rows;
    }
    // SAFETY: the caller checked AMX; `config` is a valid 64-byte palette-1 configuration that
    // `ldtilecfg` only reads.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
}

/// Asks for the cache line at `at` into L1 (`prfm pldl1keep`). Any address will do: a prefetch is
/// a hint, reads nothing the program sees and never faults.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) fn prefetch(at: *const u8) {
    // SAFETY: `prfm` is base aarch64 and does not dereference `at` (a prefetch never faults).
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) at, options(nostack, preserves_flags, readonly))
    };
}

/// Eight f16 values (as their bits) widened to f32, the low four and the high four: `fcvtl` and
/// `fcvtl2`, base aarch64 (the intrinsics that name them take `float16x4_t`, not stable Rust yet).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) fn widen_f16x8(
    bits: std::arch::aarch64::uint16x8_t,
) -> (std::arch::aarch64::float32x4_t, std::arch::aarch64::float32x4_t) {
    let (lo, hi);
    // SAFETY: `fcvtl`/`fcvtl2` (half to single precision) are part of base aarch64 Advanced SIMD;
    // they only read and write the registers named.
    unsafe {
        std::arch::asm!(
            "fcvtl {lo:v}.4s, {bits:v}.4h",
            "fcvtl2 {hi:v}.4s, {bits:v}.8h",
            bits = in(vreg) bits,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    (lo, hi)
}

/// Four f16 values (as their bits) widened to f32: `fcvtl`, as [`widen_f16x8`].
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) fn widen_f16x4(bits: std::arch::aarch64::uint16x4_t) -> std::arch::aarch64::float32x4_t {
    let wide;
    // SAFETY: as in [`widen_f16x8`].
    unsafe {
        std::arch::asm!(
            "fcvtl {wide:v}.4s, {bits:v}.4h",
            bits = in(vreg) bits,
            wide = out(vreg) wide,
            options(pure, nomem, nostack, preserves_flags),
        )
    };
    wide
}

/// `sdot` by element (FEAT_DotProd): lane `i` of `$acc` (`int32x4_t`) plus the dot product of
/// bytes `4i..4i + 4` of `$w` with bytes `4·$lane..4·$lane + 4` of `$x` (`int8x16_t` both), as
/// inline assembly (the dot-product intrinsics are not stable Rust). Expand it only in a function
/// that enables `dotprod` and is called where the probe found it.
#[cfg(target_arch = "aarch64")]
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $x:expr, $lane:literal) => {{
        let mut acc: std::arch::aarch64::int32x4_t = $acc;
        let (w, x): (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) = ($w, $x);
        // SAFETY: `sdot` needs FEAT_DotProd, which the function this expands in enables and its
        // caller found through the probe; it only reads and writes the registers named.
        unsafe {
            std::arch::asm!(
                concat!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[", $lane, "]"),
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg_low16) x,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
        acc
    }};
}
#[cfg(target_arch = "aarch64")]
pub(crate) use sdot_lane;

/// `sdot` (FEAT_DotProd): lane `i` of `$acc` (`int32x4_t`) plus the dot product of bytes
/// `4i..4i + 4` of `$w` and `$x` (`int8x16_t` both); as [`sdot_lane`].
#[cfg(target_arch = "aarch64")]
macro_rules! sdot {
    ($acc:expr, $w:expr, $x:expr) => {{
        let mut acc: std::arch::aarch64::int32x4_t = $acc;
        let (w, x): (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) = ($w, $x);
        // SAFETY: `sdot` needs FEAT_DotProd, which the function this expands in enables and its
        // caller found through the probe; it only reads and writes the registers named.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
        acc
    }};
}
#[cfg(target_arch = "aarch64")]
pub(crate) use sdot;
