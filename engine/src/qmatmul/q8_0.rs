//! q8_0 weights (the CPU default dtype) repacked once, at load, into 16-row tiles of the same
//! size as the stored blocks, which are then dropped. candle 0.11 makes such tiles too, but keeps
//! them beside the stored blocks (twice the memory); here they replace them. A tile holds one
//! 32-value block of 16 weight rows, four values of a row together
//! (`qs[(16·kk + r)·4 + t] = w[r][4·kk + t]`, the layout both `vpdpbusd` and AMX's B operand
//! take), then the 16 f16 scales. For AVX-512 VNNI and AMX the values are offset by 128 as
//! unsigned bytes; for AVX2 they stay signed ([`Isa`]). The activations are quantized as ggml's
//! `quantize_row_q8_0` does (blocks of 32, as llama.cpp and candle's `vec_dot` do; candle's tiled
//! kernel uses blocks of 256), so the sums equal ggml's `q8_0·q8_0`.

pub(super) const QK8_0: usize = 32;
pub(super) const TILE: usize = 16;

/// One block of 16 weight rows (544 bytes, 16 stored blocks' worth).
#[repr(C)]
pub(super) struct Tile {
    pub(super) qs: [u8; QK8_0 * TILE],
    pub(super) d: [u16; TILE],
}
const _: () = assert!(std::mem::size_of::<Tile>() == TILE * 34);

/// The instructions a weight's tiles are laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX-512 VNNI (and AMX for many rows): values `+ 128` as unsigned bytes, the form
    /// `vpdpbusd` and `tdpbsud` multiply with signed activations.
    Avx512Vnni,
    /// AVX2: values as stored; `vpmaddubsw` multiplies the activations' magnitudes by the values
    /// with the activations' signs moved onto them (ggml's trick, which cannot saturate).
    Avx2,
}

impl Isa {
    /// The layouts whose kernels this CPU runs, the fastest first.
    pub(super) fn available() -> &'static [Isa] {
        static AVAILABLE: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            crate::cpu::features()
                .implementations(crate::cpu::Kernel::Q8_0Rows)
                .filter_map(|imp| match imp.isa() {
                    crate::cpu::Isa::Avx512Vnni => Some(Isa::Avx512Vnni),
                    crate::cpu::Isa::Avx2 => Some(Isa::Avx2),
                    _ => None,
                })
                .collect()
        })
    }
}

/// A q8_0 weight `[n, k]` as tiles for `isa`, tile `t` (rows `16t..16t+16`) block `b` at
/// `t·(k/32) + b`.
pub struct Packed {
    pub(super) tiles: Vec<Tile>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) isa: Isa,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q8_0 tiles [{}, {}] for {:?}", self.n, self.k, self.isa)
    }
}

impl Packed {
    /// Whether this CPU runs the kernels for packed weights of this shape (else candle keeps the
    /// weight).
    pub(super) fn supported(n: usize, k: usize) -> bool {
        n.is_multiple_of(TILE) && k.is_multiple_of(4 * QK8_0) && !Isa::available().is_empty()
    }

    /// The tiles of the stored `block_q8_0`s (`d: f16, qs: [i8; 32]`, 34 bytes each) of `[n, k]`
    /// for the fastest layout this CPU runs.
    pub(super) fn new(data: &[u8], n: usize, k: usize) -> Option<Packed> {
        Packed::for_isa(data, n, k, *Isa::available().first()?)
    }

    /// [`Packed::new`] for the kernels of `isa`.
    pub(super) fn for_isa(data: &[u8], n: usize, k: usize, isa: Isa) -> Option<Packed> {
        let kb = k / QK8_0;
        if !n.is_multiple_of(TILE) || !k.is_multiple_of(QK8_0) || data.len() != n * kb * 34 {
            return None;
        }
        let offset = if isa == Isa::Avx512Vnni { 0x80 } else { 0 };
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
        Some(Packed { tiles, n, k, isa })
    }
}

/// `m` rows of activations quantized as ggml's `quantize_row_q8_0`: per 32 values
/// `d = max|x| / 127` (kept as f16, here widened) and `round(x / d)`; with each block's sum of
/// values, which the weights' +128 offset multiplies.
pub(super) struct Input {
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
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

/// Every tile of every part against the `m` rows of `x`, the tiles split evenly over candle's
/// thread pool: rows in groups of four through [`tile_rows`] (AVX-512 VNNI) or two through
/// [`tile_rows_avx2`].
pub(super) fn run(parts: &[(&Packed, &[f32])], x: &Input, m: usize, outs: &mut [Vec<f32>]) {
    let total: usize = parts.iter().map(|(w, _)| w.n / TILE).sum();
    let out_ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    super::on_every_thread(total, |start, end| {
        let mut first = 0;
        for (part, &out) in parts.iter().zip(&out_ptrs) {
            let count = part.0.n / TILE;
            let out = out as *mut f32;
            for tile in super::share(start, end, first, count) {
                let mut r = 0;
                while r < m {
                    // SAFETY: `Isa::available` checked the CPU features of the tiles' kernels
                    // before packing, and every (row, column) of a part is written by exactly one
                    // thread.
                    r += unsafe {
                        match (part.0.isa, m - r) {
                            (Isa::Avx512Vnni, 1) => tile_rows::<1>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, 2) => tile_rows::<2>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, 3) => tile_rows::<3>(part, tile, x, r, out),
                            (Isa::Avx512Vnni, _) => tile_rows::<4>(part, tile, x, r, out),
                            (Isa::Avx2, 1) => tile_rows_avx2::<1>(part, tile, x, r, out),
                            (Isa::Avx2, _) => tile_rows_avx2::<2>(part, tile, x, r, out),
                        }
                    };
                }
            }
            first += count;
        }
    });
}

/// Asks for the tile 8 after `block` (measured on an fc1 at one row: 1.0 ms 2 ahead, 0.85–0.9 ms
/// at 4–12, about the bench's read bandwidth); prefetches never fault, so past the end is fine.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(block: &Tile) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let ahead = (block as *const Tile as *const i8).wrapping_add(8 * std::mem::size_of::<Tile>());
    for line in 0..9 {
        // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line)) };
    }
}

/// Rows `first..first + M` of `x` against the 16 weight rows of `tile`, written with the bias to
/// `out` (`[m, n]`). Per block, `vpdpbusd` of the offset weights and the activations, four bytes
/// of one activation row broadcast to all 16 weight rows; the sums start at `−128·Σx` to undo the
/// offset.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn tile_rows<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use std::arch::x86_64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb);
    let mut acc = [_mm512_setzero_ps(); M];
    for (b, block) in tiles.iter().enumerate() {
        prefetch_ahead(block);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(block.d.as_ptr() as *const __m256i));
        let mut sums: [__m512i; M] =
            std::array::from_fn(|r| _mm512_set1_epi32(-128 * *x.sums.get_unchecked((first + r) * kb + b)));
        for kk in 0..QK8_0 / 4 {
            let weights = _mm512_loadu_si512(block.qs.as_ptr().add(64 * kk) as *const __m512i);
            for (r, sums) in sums.iter_mut().enumerate() {
                let at = ((first + r) * kb + b) * QK8_0 + 4 * kk;
                let four = (x.qs.as_ptr().add(at) as *const i32).read_unaligned();
                *sums = _mm512_dpbusd_epi32(*sums, weights, _mm512_set1_epi32(four));
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked((first + r) * kb + b)));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), scale, *acc);
        }
    }
    let bias = _mm512_loadu_ps(bias.as_ptr().add(tile * TILE));
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(
            out.add((first + r) * packed.n + tile * TILE),
            _mm512_add_ps(*acc, bias),
        );
    }
    M
}

/// [`tile_rows`] on AVX2 for tiles of signed values: each 256-bit load holds four values of 8
/// weight rows; `vpmaddubsw` multiplies them by the broadcast activations' magnitudes with the
/// activations' signs applied to the weights (`|x|·sign(w, x) = x·w`, at most 2·127·128 per pair,
/// so the 16-bit sums cannot saturate), `vpmaddwd` widens to one sum per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_rows_avx2<const M: usize>(
    (packed, bias): &(&Packed, &[f32]),
    tile: usize,
    x: &Input,
    first: usize,
    out: *mut f32,
) -> usize {
    use std::arch::x86_64::*;
    let kb = packed.k / QK8_0;
    let tiles = &packed.tiles[tile * kb..][..kb];
    assert!(x.d.len() >= (first + M) * kb);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for (b, block) in tiles.iter().enumerate() {
        prefetch_ahead(block);
        let d = [
            _mm256_cvtph_ps(_mm_loadu_si128(block.d.as_ptr() as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(block.d.as_ptr().add(8) as *const __m128i)),
        ];
        let mut sums = [[_mm256_setzero_si256(); 2]; M];
        for kk in 0..QK8_0 / 4 {
            let weights = [
                _mm256_loadu_si256(block.qs.as_ptr().add(64 * kk) as *const __m256i),
                _mm256_loadu_si256(block.qs.as_ptr().add(64 * kk + 32) as *const __m256i),
            ];
            for (r, sums) in sums.iter_mut().enumerate() {
                let at = ((first + r) * kb + b) * QK8_0 + 4 * kk;
                let four = _mm256_set1_epi32((x.qs.as_ptr().add(at) as *const i32).read_unaligned());
                let magnitude = _mm256_sign_epi8(four, four);
                for (sum, &weights) in sums.iter_mut().zip(&weights) {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(weights, four));
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xd = _mm256_set1_ps(*x.d.get_unchecked((first + r) * kb + b));
            for ((acc, sum), d) in acc.iter_mut().zip(&sums[r]).zip(&d) {
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*sum), _mm256_mul_ps(*d, xd), *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (h, acc) in acc.iter().enumerate() {
            let bias = _mm256_loadu_ps(bias.as_ptr().add(tile * TILE + 8 * h));
            _mm256_storeu_ps(
                out.add((first + r) * packed.n + tile * TILE + 8 * h),
                _mm256_add_ps(*acc, bias),
            );
        }
    }
    M
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_rows<const M: usize>(
    _: &(&Packed, &[f32]),
    _: usize,
    _: &Input,
    _: usize,
    _: *mut f32,
) -> usize {
    unreachable!("q8_0 weights are packed only where the kernel runs")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_rows_avx2<const M: usize>(
    _: &(&Packed, &[f32]),
    _: usize,
    _: &Input,
    _: usize,
    _: *mut f32,
) -> usize {
    unreachable!("q8_0 weights are packed only where the kernel runs")
}
