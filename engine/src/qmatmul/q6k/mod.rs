//! q6k (ggml's `block_q6_K`) weights times f32 activations on the CPU, read straight from the
//! stored GGUF blocks: the other half of every Q4_K_M and Q5_K_M file (llama.cpp keeps `output`,
//! and `attn_v` and `ffn_down` of half the layers, in q6k there). The input is the q8_K-like
//! blocks the q4k kernels read ([`Q8Block`]), quantized once per call by [`super::kquants`] ([`super::q8k`]).
//!
//! Which kernel runs: the row kernels ([`rows`]: AVX-512 VNNI, AVX2 or portable) for any number of activation
//! rows, in chunks of [`super::q8k::MAX_ROWS`].

use super::q8k::{Part, Q8Block};

pub(super) mod rows;
#[cfg(test)]
mod tests;

/// ggml's `block_q6_K`: 256 weights `d·scale_j·(q − 32)` in 16 groups of 16 with 8-bit scales,
/// 6-bit `q` as 4 low bits in `ql` and 2 high bits in `qh`. For half `h` (weights `128h..128h+128`)
/// and `l < 32`: weight `128h + 32t + l` has its low bits in byte `64h + 32(t & 1) + l` of `ql`
/// (the low nibble for `t < 2`, the high one for `t ≥ 2`) and its high bits at bit `2t` of byte
/// `32h + l` of `qh`; its scale is `scales[8h + 2t + l / 16]`.
#[repr(C)]
pub(super) struct BlockQ6K {
    pub(super) ql: [u8; 128],
    pub(super) qh: [u8; 64],
    pub(super) scales: [i8; 16],
    pub(super) d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

impl BlockQ6K {
    /// Weight `i` of the block without `d` and its scale: `q − 32`, in `-32..32`.
    pub(super) fn value(&self, i: usize) -> i32 {
        let (h, t, l) = (i / 128, i % 128 / 32, i % 32);
        let low = self.ql[64 * h + 32 * (t & 1) + l] >> (4 * (t >> 1)) & 0xF;
        let high = self.qh[32 * h + l] >> (2 * t) & 3;
        (low | high << 4) as i32 - 32
    }

    /// The scale of weight `i`.
    pub(super) fn scale(&self, i: usize) -> i32 {
        let (h, t, l) = (i / 128, i % 128 / 32, i % 32);
        self.scales[8 * h + 2 * t + l / 16] as i32
    }
}

/// A q6k linear layer: its weight `[n, k]` as the stored blocks, and the bias added to its outputs.
pub(super) type Q6kLinear<'a> = Part<'a, BlockQ6K>;

/// The weights of `blocks` (one row's), dequantized as ggml does: what the tests hold the kernels
/// to.
#[cfg(test)]
pub(super) fn dequantized(blocks: &[BlockQ6K]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * super::q8k::QK_K);
    for block in blocks {
        let d = half::f16::from_bits(block.d).to_f32();
        out.extend((0..super::q8k::QK_K).map(|i| d * (block.scale(i) * block.value(i)) as f32));
    }
    out
}

/// The integer dot product of one block with one activation block's 256 values, scale by scale.
pub(super) fn block_sum(block: &BlockQ6K, a: &Q8Block) -> i32 {
    let mut sum = 0;
    for j in 0..8 {
        let act = a.sub_block(j);
        for half in 0..2 {
            let group: i32 = (0..16)
                .map(|l| block.value(32 * j + 16 * half + l) * act[16 * half + l] as i32)
                .sum();
            sum += block.scale(32 * j + 16 * half) * group;
        }
    }
    sum
}
