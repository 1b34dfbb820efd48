//! q4k (ggml's `block_q4_K`) weights times f32 activations on the CPU, read straight from the
//! stored GGUF blocks. For a few activation rows (a decode step, a keystroke's new tokens) candle
//! 0.11 lays every q4k weight out again (16-row tiles with the scales widened to f32: 1.33× the
//! bytes, read on every token, and a second copy of the model in memory); decoding is bound by the
//! bytes read per token, so reading the stored 144-byte blocks is leaner. The input is quantized
//! once to q8_K-like blocks ([`Q8Block`]) and shared by every weight that reads it.
//!
//! Which kernel runs: up to [`super::q8k::MAX_ROWS`] activation rows at a time go through the row kernels
//! ([`rows`]: AVX-512 VNNI, AVX2, NEON with or without `sdot`, or portable); weights of whole
//! 16-row tiles against many rows go to AMX tiles where the CPU has them ([`amx`], from 12 rows),
//! else to AVX2 tiles unpacked once per block ([`tiles_avx2`], from 8 rows); everything else runs
//! through the row kernels in chunks.

use super::q8k::Part;
pub(super) use super::q8k::{Q8Block, QK_K};
#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;
use crate::cpu::{self, Implementation, Kernel};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
pub(super) mod rows;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiles_avx2;

/// ggml's `block_q4_K`: 256 weights `d·scale_j·q − dmin·min_j` in 8 sub-blocks of 32, the 6-bit
/// scales and mins packed in 12 bytes, 4-bit `q`: byte `l` of 32-byte group `g` holds weight
/// `64g + l` (low nibble) and `64g + 32 + l` (high nibble).
#[repr(C)]
pub(super) struct BlockQ4K {
    pub(super) d: u16,
    pub(super) dmin: u16,
    pub(super) scales: [u8; 12],
    pub(super) qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// The 8 6-bit scales and the 8 mins of a block as the bytes of two `u64`s, unpacked 4 at a time
/// as ggml's AVX2 kernel does (ggml's `get_scale_min_k4` for each).
pub(super) fn unpacked_scales(s: &[u8; 12]) -> [u64; 2] {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let scales = (u0 & KMASK1) as u64 | (((u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)) as u64) << 32;
    let mins = (u1 & KMASK1) as u64 | ((((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4)) as u64) << 32;
    [scales, mins]
}

pub(super) fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// A block's `d` and `dmin`, widened together by F16C in registers (`half` calls out of line for
/// each, with a `vzeroupper`, which costs the SIMD kernels more than the conversion).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
pub(super) fn d_and_dmin(block: &BlockQ4K) -> (f32, f32) {
    use std::arch::x86_64::*;
    let both = _mm_cvtph_ps(_mm_cvtsi32_si128(
        (block.d as u32 | (block.dmin as u32) << 16) as i32,
    ));
    (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
}

/// A q4k linear layer: its weight `[n, k]` as the stored blocks, and the bias added to its outputs.
pub(super) type Q4kLinear<'a> = Part<'a, BlockQ4K>;

/// The tile kernel that takes `m` rows against `parts`: the first implementation of
/// [`Kernel::Q4kTiles`] on this CPU whose row count and tile shape fit; `None` for the row kernels.
pub(super) fn tiles_for(parts: &[Q4kLinear], m: usize) -> Option<Implementation> {
    cpu::features()
        .implementations(Kernel::Q4kTiles)
        .find(|imp| tiles_fit(*imp, parts, m))
}

/// Whether `tiles`' kernel takes `m` rows against `parts` (every part whole 16-row tiles).
#[cfg(target_arch = "x86_64")]
fn tiles_fit(tiles: Implementation, parts: &[Q4kLinear], m: usize) -> bool {
    let whole_tiles = parts.iter().all(|p| p.n.is_multiple_of(16));
    match tiles.isa() {
        #[cfg(target_os = "linux")]
        Isa::Amx => m >= amx::MIN_ROWS && whole_tiles,
        Isa::Avx2 => m >= tiles_avx2::MIN_ROWS && whole_tiles,
        _ => false,
    }
}

/// [`tiles_fit`] where there are no tile kernels (not x86-64): the probe lists only the portable
/// implementation, which is the row kernels in chunks.
#[cfg(not(target_arch = "x86_64"))]
fn tiles_fit(_: Implementation, _: &[Q4kLinear], _: usize) -> bool {
    false
}

/// Every weight row of every part against the `m` rows of `x`, written with the bias into `outs`
/// (`[m, n]` each): through `tiles` (an implementation of [`Kernel::Q4kTiles`] that
/// [`tiles_fit`]), else through this CPU's row kernel in chunks of [`super::q8k::MAX_ROWS`].
pub(super) fn multiply(
    tiles: Option<Implementation>,
    parts: &[Q4kLinear],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    match tiles.map(|imp| (imp, imp.isa())) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Some((imp, Isa::Amx)) => amx::multiply(imp, parts, x, m, outs),
        #[cfg(target_arch = "x86_64")]
        Some((imp, Isa::Avx2)) => tiles_avx2::multiply(imp, parts, x, m, outs),
        _ => rows::multiply(rows::chosen(), parts, x, m, outs),
    }
}
