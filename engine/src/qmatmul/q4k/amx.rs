//! q4k matmuls for many activation rows (prefill chunks, a pasted line) on Intel AMX tiles,
//! without copies of the weights. candle 0.11 has a q4k AMX kernel too, but it first lays every
//! q4k weight out again (scales widened to f32, nibbles spread to bytes: 2.2× the stored size,
//! 1.6 GB more for Phi-1); this one unpacks 16 weight rows of one block at a time into a small
//! buffer as it goes. One tile product `tdpbusd` takes 16 weight rows × 32 values (one q4k
//! sub-block, unsigned nibbles) against 16 activation rows × 32 values (signed q8), so every
//! sub-block's integer sums come out separately and are scaled in f32 with their 6-bit scale and
//! min on the way.

use super::{f16_to_f32, unpacked_scales, Q4kLinear, Q8Block, QK_K};
use crate::cpu::Implementation;
use crate::qmatmul::{on_every_thread, share};
use crate::simd::{load_amx_tile_config, Aligned64};

/// Fewest activation rows worth a tile product (whose 16 columns are activation rows).
pub(super) const MIN_ROWS: usize = 12;

const TILE: usize = 16;
const SUB_BLOCKS: usize = QK_K / 32;
/// Bytes of one A (weights) or B (activations) tile: 16 × 32 and 8 × 64.
const OPERAND_BYTES: usize = 512;

/// The activations as B tiles: for each group of 16 rows (the last padded with zeros), block `b`
/// and sub-block `j`, 8 rows of 64 bytes holding values `4kk..4kk+4` of row `a` at `[kk][4a..]`,
/// with each row's scale and sub-block sums as f32 across the 16 rows.
struct Activations {
    tiles: Vec<i8>,
    d: Vec<[f32; TILE]>,
    sums: Vec<[[f32; TILE]; SUB_BLOCKS]>,
    groups: usize,
    kb: usize,
}

impl Activations {
    fn new(x: &[Q8Block], m: usize) -> Activations {
        let kb = x.len() / m;
        let groups = m.div_ceil(TILE);
        let mut tiles = vec![0i8; groups * kb * SUB_BLOCKS * OPERAND_BYTES];
        let mut d = vec![[0f32; TILE]; groups * kb];
        let mut sums = vec![[[0f32; TILE]; SUB_BLOCKS]; groups * kb];
        for (row, blocks) in x.chunks_exact(kb).enumerate() {
            let (g, a) = (row / TILE, row % TILE);
            for (b, block) in blocks.iter().enumerate() {
                let at = g * kb + b;
                d[at][a] = block.d;
                for j in 0..SUB_BLOCKS {
                    sums[at][j][a] = block.sums[j] as f32;
                    let tile = &mut tiles[(at * SUB_BLOCKS + j) * OPERAND_BYTES..][..OPERAND_BYTES];
                    for (kk, four) in block.sub_block(j).chunks_exact(4).enumerate() {
                        tile[64 * kk + 4 * a..][..4].copy_from_slice(four);
                    }
                }
            }
        }
        Activations {
            tiles,
            d,
            sums,
            groups,
            kb,
        }
    }
}

/// Integer sums of four sub-blocks: `c[j] = a[j] · b[j]` for 16 × 16 tiles, `a`, `b` and `c` each
/// four operands in a row (512, 512 and 1024 bytes apart).
///
/// # Safety
///
/// The CPU has AMX-INT8 and Linux granted the tile state, [`load_amx_tile_config`] ran on this
/// thread, `a` and `b` point to four 512-byte operands each and `c` to four 1024-byte tiles.
#[inline(always)]
unsafe fn four_q4k_products(a: *const u8, b: *const i8, c: *mut i32) {
    // SAFETY: the caller's contract: AMX is usable with [`load_amx_tile_config`]'s layout, and the
    // operands and sums lie where they point.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{a} + {s32}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s32}*1 + 512]",
            "tileloadd tmm7, [{b} + {s64}*1 + 512]",
            "tdpbusd tmm1, tmm5, tmm7",
            "tileloadd tmm4, [{a} + {s32}*1 + 1024]",
            "tileloadd tmm6, [{b} + {s64}*1 + 1024]",
            "tdpbusd tmm2, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s32}*1 + 1536]",
            "tileloadd tmm7, [{b} + {s64}*1 + 1536]",
            "tdpbusd tmm3, tmm5, tmm7",
            "tilestored [{c} + {s64}*1], tmm0",
            "tilestored [{c} + {s64}*1 + 1024], tmm1",
            "tilestored [{c} + {s64}*1 + 2048], tmm2",
            "tilestored [{c} + {s64}*1 + 3072], tmm3",
            a = in(reg) a,
            b = in(reg) b,
            c = in(reg) c,
            s32 = in(reg) 32usize,
            s64 = in(reg) 64usize,
            options(nostack),
        );
    }
}

/// The weight tiles `[start, end)` (16 rows each, counted across `parts`) against every row of
/// `acts`, written with their bias into `outs` (`[m, n]` each).
///
/// # Safety
///
/// The CPU has AMX-INT8 (with the tile state granted), AVX-512F/BW, AVX2 and FMA; `outs` point
/// to `[m, n]` outputs of `parts`, whose tiles `[start, end)` no other thread writes.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn tiles_q4k(
    parts: &[Q4kLinear],
    acts: &Activations,
    m: usize,
    outs: &[usize],
    start: usize,
    end: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's CPU has AMX (tile state granted), AVX-512F/BW, AVX2 and FMA (this fn's
    // contract). The A operands are stored in `a` (8 sub-blocks × 16 rows × 32 bytes, 32-byte
    // aligned), the B operands read from `acts.tiles` (8 operands per group and block), the tile
    // sums in `c` (two sets of 8 aligned 16 × 16 tiles), `acc` holds 16 rows of `lanes`; each
    // output (i, row) of `outs` (`[m, n]` each) is written by exactly one thread.
    unsafe {
        load_amx_tile_config();
        let kb = acts.kb;
        let lanes = acts.groups * TILE;
        let mut a = Aligned64([0u8; SUB_BLOCKS * OPERAND_BYTES]);
        let mut c = Aligned64([0i32; 2 * SUB_BLOCKS * TILE * TILE]);
        let c = c.0.as_mut_ptr();
        let mut acc = vec![0f32; TILE * lanes];
        let mut scales = [[0f32; SUB_BLOCKS]; TILE];
        let mut mins = [[0f32; SUB_BLOCKS]; TILE];
        let low = _mm256_set1_epi8(0xF);
        let mut first = 0;
        for (part, &out) in parts.iter().zip(outs) {
            let count = part.n / TILE;
            for tile in share(start, end, first, count) {
                acc.fill(0.0);
                let rows = &part.blocks[tile * TILE * kb..][..TILE * kb];
                for b in 0..kb {
                    // A tiles: sub-block j of the 16 rows at [j][row][32], and their f32 scales.
                    let base = a.0.as_mut_ptr();
                    for r in 0..TILE {
                        let block = &rows[r * kb + b];
                        for g in 0..4 {
                            let bytes = _mm256_loadu_si256(block.qs.as_ptr().add(32 * g) as *const __m256i);
                            let lo = _mm256_and_si256(bytes, low);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
                            let at = |j: usize| base.add(j * OPERAND_BYTES + 32 * r) as *mut __m256i;
                            _mm256_store_si256(at(2 * g), lo);
                            _mm256_store_si256(at(2 * g + 1), hi);
                        }
                        let [sc, mn] = unpacked_scales(&block.scales).map(u64::to_le_bytes);
                        let (d, dmin) = (f16_to_f32(block.d), f16_to_f32(block.dmin));
                        for j in 0..SUB_BLOCKS {
                            scales[r][j] = d * sc[j] as f32;
                            mins[r][j] = dmin * mn[j] as f32;
                        }
                    }
                    // The tile products of group g run while the sums of group g − 1 are scaled.
                    let products = |group: usize| {
                        let operands = acts
                            .tiles
                            .as_ptr()
                            .add((group * kb + b) * SUB_BLOCKS * OPERAND_BYTES);
                        let c = c.add(group % 2 * SUB_BLOCKS * TILE * TILE);
                        four_q4k_products(a.0.as_ptr(), operands, c);
                        four_q4k_products(
                            a.0.as_ptr().add(4 * OPERAND_BYTES),
                            operands.add(4 * OPERAND_BYTES),
                            c.add(4 * TILE * TILE),
                        );
                    };
                    let scale = |group: usize, acc: &mut [f32]| {
                        let at = group * kb + b;
                        let c = c.add(group % 2 * SUB_BLOCKS * TILE * TILE);
                        let sums = acts.sums[at].map(|s| _mm512_loadu_ps(s.as_ptr()));
                        let d = _mm512_loadu_ps(acts.d[at].as_ptr());
                        for r in 0..TILE {
                            // Four short chains rather than one long one: the rows overlap better.
                            let mut t = [_mm512_setzero_ps(); 4];
                            for j in 0..SUB_BLOCKS {
                                let ints = _mm512_load_si512(c.add((j * TILE + r) * TILE) as *const _);
                                let sums = _mm512_fmadd_ps(sums[j], _mm512_set1_ps(mins[r][j]), t[2 + j % 2]);
                                t[j % 2] = _mm512_fmadd_ps(
                                    _mm512_cvtepi32_ps(ints),
                                    _mm512_set1_ps(scales[r][j]),
                                    t[j % 2],
                                );
                                t[2 + j % 2] = sums;
                            }
                            let t = _mm512_sub_ps(_mm512_add_ps(t[0], t[1]), _mm512_add_ps(t[2], t[3]));
                            let acc = acc.as_mut_ptr().add(r * lanes + group * TILE);
                            _mm512_storeu_ps(acc, _mm512_fmadd_ps(t, d, _mm512_loadu_ps(acc)));
                        }
                    };
                    for group in 0..acts.groups {
                        products(group);
                        if group > 0 {
                            scale(group - 1, &mut acc);
                        }
                    }
                    scale(acts.groups - 1, &mut acc);
                }
                // Rows of the output are activation rows: write 16 neighbouring values at a time.
                let (out, row0) = (out as *mut f32, tile * TILE);
                let bias = &part.bias[row0..][..TILE];
                for i in 0..m {
                    for (r, bias) in bias.iter().enumerate() {
                        // SAFETY: every (i, row) of a part is written by exactly one thread.
                        *out.add(i * part.n + row0 + r) = acc[r * lanes + i] + bias;
                    }
                }
            }
            first += count;
        }
    }
}

/// [`super::multiply`] on AMX tiles: every weight row of every part (each a multiple of 16 rows)
/// against the `m` rows of `x`, the 16-row weight tiles split evenly over candle's thread pool.
/// `imp` is the probe's AMX implementation of [`crate::cpu::Kernel::Q4kTiles`].
pub(super) fn multiply(
    imp: Implementation,
    parts: &[Q4kLinear],
    x: &[Q8Block],
    m: usize,
    outs: &mut [Vec<f32>],
) {
    assert_eq!(imp.isa(), crate::cpu::Isa::Amx, "{imp} is not AMX");
    let acts = Activations::new(x, m);
    let total: usize = parts.iter().map(|p| p.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    // SAFETY: the probe lists AMX only where the CPU has AMX, AVX-512F/BW, AVX2 and FMA and Linux
    // granted the tile state; `imp` is AMX (asserted).
    on_every_thread(total, |start, end| unsafe {
        tiles_q4k(parts, &acts, m, &out_ptrs, start, end)
    });
}
