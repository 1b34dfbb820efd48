//! q8_0 weights (the CPU default dtype) repacked once, at load, into 16-row tiles of the same
//! size as the stored blocks, which are then dropped. candle 0.11 makes such tiles too, but keeps
//! them beside the stored blocks (twice the memory); here they replace them. A tile holds one
//! 32-value block of 16 weight rows, four values of a row together
//! (`qs[(16·kk + r)·4 + t] = w[r][4·kk + t]`, the layout both `vpdpbusd` and AMX's B operand
//! take), then the 16 f16 scales. For AVX-512 VNNI and AMX the values are offset by 128 as
//! unsigned bytes; for AVX2 and NEON they stay signed (the row kernel a weight is packed for is part of
//! [`Packed`]). The activations are quantized as ggml's `quantize_row_q8_0` does (blocks of 32,
//! as llama.cpp and candle's `vec_dot` do; candle's tiled kernel uses blocks of 256), so the sums
//! equal ggml's `q8_0·q8_0`.
//!
//! Which kernel runs: the row kernels the weight is packed for ([`rows`], any number of rows), or
//! from 12 rows AMX tiles where the CPU has them and the weights are packed for AVX-512 VNNI
//! ([`amx`]).

use candle_core::Tensor;

use super::{cpu_f32, outputs, Result, Rows, Weight};
use crate::cpu::{self, Implementation, Isa, Kernel};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod rows;
#[cfg(test)]
mod tests;

pub(super) const QK8_0: usize = 32;
pub(super) const TILE: usize = 16;

/// One block of 16 weight rows (544 bytes, 16 stored blocks' worth).
#[repr(C)]
pub(super) struct Tile {
    pub(super) qs: [u8; QK8_0 * TILE],
    pub(super) d: [u16; TILE],
}
const _: () = assert!(std::mem::size_of::<Tile>() == TILE * 34);

/// A q8_0 weight `[n, k]` as tiles for the row kernel `kernel` (an implementation of
/// [`Kernel::Q8_0Rows`]), tile `t` (rows `16t..16t+16`) block `b` at `t·(k/32) + b`.
pub struct Packed {
    pub(super) tiles: Vec<Tile>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) kernel: Implementation,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q8_0 tiles [{}, {}] for {}", self.n, self.k, self.kernel)
    }
}

impl Packed {
    /// Whether this CPU runs the kernels for packed weights of this shape (else candle keeps the
    /// weight).
    pub(super) fn supported(n: usize, k: usize) -> bool {
        n.is_multiple_of(TILE) && k.is_multiple_of(4 * QK8_0) && cpu::chosen(Kernel::Q8_0Rows).is_some()
    }

    /// The tiles of the stored `block_q8_0`s (`d: f16, qs: [i8; 32]`, 34 bytes each) of `[n, k]`
    /// for the fastest row kernel this CPU runs.
    pub(super) fn new(data: &[u8], n: usize, k: usize) -> Option<Packed> {
        Packed::for_kernel(data, n, k, cpu::chosen(Kernel::Q8_0Rows)?)
    }

    /// [`Packed::new`] for the row kernel `kernel`.
    pub(super) fn for_kernel(data: &[u8], n: usize, k: usize, kernel: Implementation) -> Option<Packed> {
        assert_eq!(kernel.kernel(), Kernel::Q8_0Rows, "{kernel} packs no q8_0 tiles");
        let kb = k / QK8_0;
        if !n.is_multiple_of(TILE) || !k.is_multiple_of(QK8_0) || data.len() != n * kb * 34 {
            return None;
        }
        let offset = if kernel.isa() == Isa::Avx512Vnni { 0x80 } else { 0 };
        let mut tiles = Vec::with_capacity(n / TILE * kb);
        for t in 0..n / TILE {
            for b in 0..kb {
                let mut tile = Tile {
                    qs: [0; QK8_0 * TILE],
                    d: [0; TILE],
                };
                for r in 0..TILE {
                    let block = &data[((t * TILE + r) * kb + b) * 34..][..34];
                    tile.d[r] = u16::from_le_bytes([block[0], block[1]]);
                    for (i, &q) in block[2..].iter().enumerate() {
                        tile.qs[(i / 4 * TILE + r) * 4 + i % 4] = q ^ offset;
                    }
                }
                tiles.push(tile);
            }
        }
        Some(Packed { tiles, n, k, kernel })
    }
}

/// `m` rows of activations quantized as ggml's `quantize_row_q8_0`: per 32 values
/// `d = max|x| / 127` (kept as f16, here widened) and `round(x / d)`; with each block's sum of
/// values, which the weights' +128 offset multiplies.
pub(super) struct Input {
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    // For the +128 offset of the AVX-512 VNNI and AMX tiles only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) sums: Vec<i32>,
}

impl Input {
    /// `xs` (`m` rows) with the rows padded with zeros to `rows`.
    pub(super) fn quantize(xs: &[f32], rows: usize, k: usize) -> Input {
        let mut qs = vec![0i8; rows * k];
        let blocks = rows * k / QK8_0;
        let (mut d, mut sums) = (vec![0f32; blocks], vec![0i32; blocks]);
        for (i, (xs, qs)) in xs.chunks_exact(QK8_0).zip(qs.chunks_exact_mut(QK8_0)).enumerate() {
            let amax = xs.iter().fold(0f32, |a, x| a.max(x.abs()));
            let scale = amax / 127.0;
            let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for (q, &x) in qs.iter_mut().zip(xs) {
                *q = (x * inverse).round() as i8;
            }
            d[i] = half::f16::from_f32(scale).to_f32();
            sums[i] = qs.iter().map(|&q| q as i32).sum();
        }
        Input { qs, d, sums }
    }
}

/// `x · wᵀ + bias` for weights that are all [`Weight::Q8_0`] on one f32 CPU input `xs` (`dims`,
/// rows of `k`): any number of rows, through the row kernels alone where `rows` says so.
pub(super) fn linear(
    linears: &[(&Weight, &Tensor)],
    xs: &Tensor,
    dims: &[usize],
    rows: Rows,
) -> Result<Vec<Tensor>> {
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
    let tiles = match rows {
        Rows::Fastest => tiles_for(&parts, m),
        Rows::Alone => None,
    };
    multiply(tiles, &parts, input, m, &mut outs);
    drop(guard);
    outputs(outs, parts.iter().map(|(w, _)| w.n), dims)
}

/// The AMX implementation of [`Kernel::Q8_0Tiles`] where it takes `m` rows against `parts` (from
/// [`amx::MIN_ROWS`] rows, every weight packed for AVX-512 VNNI); `None` for the row kernels.
fn tiles_for(parts: &[(&Packed, &[f32])], m: usize) -> Option<Implementation> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let vnni = parts.iter().all(|(w, _)| w.kernel.isa() == Isa::Avx512Vnni);
        let amx = cpu::features().implementation(Kernel::Q8_0Tiles, Isa::Amx);
        amx.filter(|_| m >= amx::MIN_ROWS && vnni)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = (parts, m);
        None
    }
}

/// Every weight row of every part against the `m` rows of `input` (`k` each), written with the
/// bias into `outs` (`[m, n]` each): through `tiles` (from [`tiles_for`]), else through the row
/// kernels the weights are packed for.
fn multiply(
    tiles: Option<Implementation>,
    parts: &[(&Packed, &[f32])],
    input: &[f32],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    let k = input.len() / m;
    match tiles {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Some(imp) if imp.isa() == Isa::Amx => {
            let x = Input::quantize(input, m.next_multiple_of(TILE), k);
            amx::multiply(imp, parts, &x, m, outs)
        }
        _ => rows::multiply(parts, &Input::quantize(input, m, k), m, outs),
    }
}
