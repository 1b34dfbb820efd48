//! What the k-quant formats ([`super::q4k`], [`super::q6k`]) share: the input quantized once to
//! q8_K-like blocks ([`Q8Block`]) that both formats' kernels read, a weight as its stored blocks
//! with its bias ([`Part`]), and the driver that runs a row kernel over every weight row on
//! candle's threads ([`multiply_rows`]).

use super::{on_every_thread, share};

pub(super) const QK_K: usize = 256;

/// Most activation rows the row kernels take at once; more are run in chunks of this many, each
/// against every weight row (the chunk's quantized activations, ~70 KB at Phi-1's widest, stay in
/// L2). Per row they do more work than candle's tiles, which pay for it by first building their
/// tiled copy of every weight (a gigabyte for Phi-1, built on first use). q4k weights of whole
/// 16-row tiles go to the tile kernels from 12 rows (AMX) or 8 (AVX2); the chunks serve the rest.
pub(crate) const MAX_ROWS: usize = 31;

/// One linear layer in a k-quant format: its weight `[n, k]` as the stored blocks (`k / 256` per
/// row), and the bias added to its outputs.
pub(super) struct Part<'a, B> {
    pub(super) blocks: &'a [B],
    pub(super) bias: &'a [f32],
    pub(super) n: usize,
}

/// `out[i·m + r] = Σ_k w_i[k]·x[r][k]` for consecutive weight rows `w_i` (`kb` blocks each; one
/// call takes many, so what a call sets up is shared) and `m` activation rows (`x` row-major).
///
/// # Safety
///
/// The CPU has the features of the implementation the kernel was taken for.
pub(super) type RowKernel<B> = unsafe fn(&[B], usize, &[Q8Block], usize, &mut [f32]);

/// 256 activations as `d·qs` (ggml's q8_K rounding) with the sums of `qs` per 32-value sub-block,
/// which the mins multiply. `qs` holds the 32-value sub-blocks in the order the nibbles of 64 stored
/// bytes come out of a 512-bit register, [`SUB_BLOCK_AT`]: low nibbles of bytes 0..64 are
/// sub-blocks 0 and 2, high nibbles 1 and 3, and so on.
#[repr(C, align(32))]
#[derive(Clone)]
pub(super) struct Q8Block {
    pub(super) qs: [i8; QK_K],
    pub(super) d: f32,
    pub(super) sums: [i16; 8],
    /// The sums of `qs` per 16 values (sub-block `j`'s halves at `2j`, `2j + 1`): the groups the
    /// q6k scales take, which multiply its offset of 32.
    pub(super) half_sums: [i16; 16],
}

impl Q8Block {
    const ZERO: Q8Block = Q8Block {
        qs: [0; QK_K],
        d: 0.0,
        sums: [0; 8],
        half_sums: [0; 16],
    };

    pub(super) fn quantize(xs: &[f32]) -> Q8Block {
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
            for (half, values) in qs.chunks_exact(16).enumerate() {
                block.half_sums[2 * j + half] = values.iter().map(|&q| q as i16).sum();
            }
        }
        block.d = 1.0 / iscale;
        block
    }

    /// The 32 quantized activations of sub-block `j`.
    pub(super) fn sub_block(&self, j: usize) -> &[i8] {
        &self.qs[32 * SUB_BLOCK_AT[j]..][..32]
    }
}

/// Where sub-block `j` of 32 activations sits in [`Q8Block::qs`] (in units of 32; its own inverse).
pub(super) const SUB_BLOCK_AT: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// How many weight rows [`multiply_rows`] hands a row kernel at once.
const SLAB: usize = 64;

/// Every weight row of every part against the `m` rows of `x` through `kernel` (chunks of
/// [`MAX_ROWS`] rows, each against all weight rows), written with the bias into `outs`; the weight
/// rows split evenly over candle's thread pool in one parallel region.
///
/// # Safety
///
/// The CPU has the features of the implementation `kernel` was taken for.
pub(super) unsafe fn multiply_rows<B: Sync>(
    kernel: RowKernel<B>,
    parts: &[Part<B>],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
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
                    // SAFETY: the CPU has the kernel's features (this fn's contract).
                    unsafe { kernel(w, kb, x, rows, &mut slab_out[..count * rows]) };
                    for (i, values) in slab_out[..count * rows].chunks_exact(rows).enumerate() {
                        let row = slab + i;
                        for (r, value) in values.iter().enumerate() {
                            let at = (r0 + r) * part.n + row;
                            // SAFETY: `outs[p]` holds `m · n` values and every (r, row) of a part
                            // is written by exactly one thread.
                            unsafe { *(out_ptr as *mut f32).add(at) = value + part.bias[row] };
                        }
                    }
                }
                first += part.n;
            }
        }
    });
}

/// A [`RowKernel`] body (for the q4k and q6k kernels): for each weight row, the `m` activation rows in groups of up to four,
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
                // SAFETY: the CPU has the row kernel's features ([`RowKernel`]'s contract), which
                // `$rows` enables; it asserts the rows it reads and writes.
                unsafe {
                    match m - r {
                        1 => $rows::<1>(w, x, out, extra),
                        2 => $rows::<2>(w, x, out, extra),
                        3 => $rows::<3>(w, x, out, extra),
                        _ => $rows::<4>(w, x, out, extra),
                    }
                }
                r += 4;
            }
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use in_groups_of_four;
