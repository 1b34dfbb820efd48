//! SIMD helpers shared by the kernels of several formats: horizontal sums, prefetches and the
//! AMX tile configuration. x86-64 only; each kernel module keeps its own arithmetic.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// The sum of a register's eight lanes.
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
#[inline(always)]
pub(crate) fn prefetch(at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: `prefetcht0` needs only SSE (every x86-64 CPU) and does not dereference `at`.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
}

/// A value aligned to 64 bytes, as AMX tile loads and stores and 512-bit aligned loads want.
#[repr(C, align(64))]
pub(crate) struct Aligned64<T>(pub(crate) T);

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
#[cfg(target_os = "linux")]
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
