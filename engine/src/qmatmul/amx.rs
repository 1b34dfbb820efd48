//! Matmuls for many activation rows (prefill chunks, a pasted line) on Intel AMX tiles, without
//! copies of the weights. candle 0.11 has a q4k AMX kernel too, but it first lays every q4k weight
//! out again (scales widened to f32, nibbles spread to bytes: 2.2× the stored size, 1.6 GB more for
//! Phi-1); this one unpacks 16 weight rows of one block at a time into a small buffer as it goes.
//!
//! q4k: one tile product `tdpbusd` takes 16 weight rows × 32 values (one q4k sub-block, unsigned
//! nibbles) against 16 activation rows × 32 values (signed q8), so every sub-block's integer sums
//! come out separately and are scaled in f32 with their 6-bit scale and min on the way. q8_0: the
//! repacked tiles ([`q8_0::Tile`]) are B operands as they lie, against the activation rows as A
//! (`tdpbsud`).

use crate::cpu::{Isa, Kernel};

use super::q8_0::{self, Packed};
use super::{f16_to_f32, on_every_thread, share, unpacked_scales, Part, Q8Block, QK_K};

/// Fewest activation rows worth a tile product (whose 16 columns are activation rows).
pub(super) const MIN_ROWS: usize = 12;

const TILE: usize = 16;
const SUB_BLOCKS: usize = QK_K / 32;
/// Bytes of one A (weights) or B (activations) tile: 16 × 32 and 8 × 64.
const OPERAND_BYTES: usize = 512;

/// Whether this CPU runs `kernel` (q4k or q8_0 tiles) on AMX; the probe asked Linux for the
/// tile state.
pub(super) fn available(kernel: Kernel) -> bool {
    crate::cpu::features().implementation(kernel, Isa::Amx).is_some()
}

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

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// tmm0–3: C, 16 × 16 i32; tmm4–5: A, 16 × 32 u8; tmm6–7: B, 8 × 64 i8 — the layout candle's own
/// q4k AMX kernel loads, so either finds its tiles as it expects on a thread the other used.
unsafe fn load_tile_config() {
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
    std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
}

/// Integer sums of four sub-blocks: `c[j] = a[j] · b[j]` for 16 × 16 tiles, `a`, `b` and `c` each
/// four operands in a row (512, 512 and 1024 bytes apart).
#[inline(always)]
unsafe fn four_q4k_products(a: *const u8, b: *const i8, c: *mut i32) {
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

#[repr(C, align(64))]
struct Aligned<T>(T);

/// The weight tiles `[start, end)` (16 rows each, counted across `parts`) against every row of
/// `acts`, written with their bias into `outs` (`[m, n]` each).
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn tiles_q4k(parts: &[Part], acts: &Activations, m: usize, outs: &[usize], start: usize, end: usize) {
    use std::arch::x86_64::*;
    load_tile_config();
    let kb = acts.kb;
    let lanes = acts.groups * TILE;
    let mut a = Aligned([0u8; SUB_BLOCKS * OPERAND_BYTES]);
    let mut c = Aligned([0i32; 2 * SUB_BLOCKS * TILE * TILE]);
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

/// [`super::run`] on AMX tiles: every weight row of every part (each a multiple of 16 rows)
/// against the `m` rows of `x`, the 16-row weight tiles split evenly over candle's thread pool.
pub(super) fn run_q4k(parts: &[Part], x: &[Q8Block], m: usize, outs: &mut [Vec<f32>]) {
    let acts = Activations::new(x, m);
    let total: usize = parts.iter().map(|p| p.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    // SAFETY: `available` checked the CPU and the tile permission.
    on_every_thread(total, |start, end| unsafe {
        tiles_q4k(parts, &acts, m, &out_ptrs, start, end)
    });
}

/// Whether [`run_q4k`] takes these weights: every part a whole number of tiles.
pub(super) fn fits(parts: &[Part]) -> bool {
    parts.iter().all(|p| p.n % TILE == 0)
}

/// Signed activations against offset q8_0 weights for four blocks in a row: `c[j] = a[j] · b[j]`
/// (`tdpbsud`), `a[j]` 16 activation rows × 32 bytes (`stride` apart, 32 bytes after `a[j − 1]`),
/// `b[j]` the B operand of a [`q8_0::Tile`] (one tile after `b[j − 1]`).
#[inline(always)]
unsafe fn four_q8_0_products(a: *const i8, stride: usize, b: *const u8, c: *mut i32) {
    const _: () = assert!(std::mem::size_of::<q8_0::Tile>() == 544);
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tileloadd tmm4, [{a} + {stride}*1]",
        "tileloadd tmm6, [{b} + {s64}*1]",
        "tdpbsud tmm0, tmm4, tmm6",
        "tileloadd tmm5, [{a} + {stride}*1 + 32]",
        "tileloadd tmm7, [{b} + {s64}*1 + 544]",
        "tdpbsud tmm1, tmm5, tmm7",
        "tileloadd tmm4, [{a} + {stride}*1 + 64]",
        "tileloadd tmm6, [{b} + {s64}*1 + 1088]",
        "tdpbsud tmm2, tmm4, tmm6",
        "tileloadd tmm5, [{a} + {stride}*1 + 96]",
        "tileloadd tmm7, [{b} + {s64}*1 + 1632]",
        "tdpbsud tmm3, tmm5, tmm7",
        "tilestored [{c} + {s64}*1], tmm0",
        "tilestored [{c} + {s64}*1 + 1024], tmm1",
        "tilestored [{c} + {s64}*1 + 2048], tmm2",
        "tilestored [{c} + {s64}*1 + 3072], tmm3",
        a = in(reg) a,
        stride = in(reg) stride,
        b = in(reg) b,
        c = in(reg) c,
        s64 = in(reg) 64usize,
        options(nostack),
    );
}

/// The q8_0 weight tiles `[start, end)` (counted across `parts`) against every row of `x`
/// (padded to whole groups of 16 rows), written with their bias into `outs`. Here the
/// activations are the A operand (rows as they are) and the tiles the B operand, so C's rows are
/// output rows and its 16 columns the tile's weight rows.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tiles_q8_0(
    parts: &[(&Packed, &[f32])],
    x: &q8_0::Input,
    m: usize,
    outs: &[usize],
    start: usize,
    end: usize,
) {
    use std::arch::x86_64::*;
    load_tile_config();
    let mut c = Aligned([0i32; 2 * 4 * TILE * TILE]);
    let c = c.0.as_mut_ptr();
    let mut first = 0;
    for (&(packed, bias), &out) in parts.iter().zip(outs) {
        let (n, k) = (packed.n, packed.k);
        let kb = k / q8_0::QK8_0;
        let count = n / TILE;
        for tile in share(start, end, first, count) {
            let tiles = &packed.tiles[tile * kb..][..kb];
            let bias = _mm512_loadu_ps(bias.as_ptr().add(tile * TILE));
            for group in 0..m.div_ceil(TILE) {
                let mut acc = [_mm512_setzero_ps(); TILE];
                // The tile products of four blocks run while the sums of the four before are scaled.
                let products = |step: usize| {
                    let a = x.qs.as_ptr().add(group * TILE * k + 4 * step * q8_0::QK8_0);
                    let b = tiles[4 * step].qs.as_ptr();
                    four_q8_0_products(a, k, b, c.add(step % 2 * 4 * TILE * TILE));
                };
                let scale = |step: usize, acc: &mut [__m512; TILE]| {
                    let c = c.add(step % 2 * 4 * TILE * TILE);
                    for j in 0..4 {
                        let b = 4 * step + j;
                        let d = _mm512_cvtph_ps(_mm256_loadu_si256(tiles[b].d.as_ptr() as *const __m256i));
                        for (a, acc) in acc.iter_mut().enumerate() {
                            let at = (group * TILE + a) * kb + b;
                            let ints = _mm512_load_si512(c.add((j * TILE + a) * TILE) as *const _);
                            let ints =
                                _mm512_sub_epi32(ints, _mm512_set1_epi32(128 * *x.sums.get_unchecked(at)));
                            let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked(at)));
                            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
                        }
                    }
                };
                let steps = kb / 4;
                for step in 0..steps {
                    products(step);
                    if step > 0 {
                        scale(step - 1, &mut acc);
                    }
                }
                scale(steps - 1, &mut acc);
                let out = out as *mut f32;
                for (a, acc) in acc.iter().enumerate().take(m - group * TILE) {
                    // SAFETY: every (row, column) of a part is written by exactly one thread.
                    _mm512_storeu_ps(
                        out.add((group * TILE + a) * n + tile * TILE),
                        _mm512_add_ps(*acc, bias),
                    );
                }
            }
        }
        first += count;
    }
}

/// [`run_q4k`] for q8_0 tiles; `x` holds `m` rows padded with zeros to whole groups of 16.
pub(super) fn run_q8_0(parts: &[(&Packed, &[f32])], x: &q8_0::Input, m: usize, outs: &mut [Vec<f32>]) {
    let total: usize = parts.iter().map(|(w, _)| w.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    // SAFETY: `available` checked the CPU and the tile permission.
    on_every_thread(total, |start, end| unsafe {
        tiles_q8_0(parts, x, m, &out_ptrs, start, end)
    });
}
