//! The q4k kernels against candle's own q4k matmul on the same blocks (which quantizes the input
//! the same way): through [`linear`] as the engine calls it, and each tile and row kernel this
//! CPU runs, forced, for one to many rows and two weights sharing the input.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::rows;
use super::*;
use crate::qmatmul::q8k::MAX_ROWS;
use crate::qmatmul::tests::random;
use crate::qmatmul::{Result, Weight};

/// The stored-block kernels against candle's own q4k matmul on the same blocks (which
/// quantizes the input the same way), for one to many rows and two weights sharing the input.
#[test]
fn matches_candles_q4k_matmul() -> Result<()> {
    let (k, n1, n2) = (512, 48, 208);
    let dev = Device::Cpu;
    let w1 = QTensor::quantize(
        &Tensor::from_vec(random(n1 * k, 1), (n1, k), &dev)?,
        GgmlDType::Q4K,
    )?;
    let w2 = QTensor::quantize(
        &Tensor::from_vec(random(n2 * k, 2), (n2, k), &dev)?,
        GgmlDType::Q4K,
    )?;
    let (w1, w2) = (QMatMul::from_qtensor(w1)?, QMatMul::from_qtensor(w2)?);
    let b1 = Tensor::from_vec(random(n1, 3), n1, &dev)?;
    let b2 = Tensor::from_vec(random(n2, 4), n2, &dev)?;
    for m in [1, 3, 8, 16, MAX_ROWS, 40, 128] {
        let xs = Tensor::from_vec(random(m * k, 5 + m as u64), (1, m, k), &dev)?;
        let (c1, c2) = (Weight::Candle(w1.clone()), Weight::Candle(w2.clone()));
        let outs =
            crate::qmatmul::linear_rows(&[(&c1, &b1), (&c2, &b2)], &xs)?.expect("q4k on the CPU is taken");
        for ((w, b), out) in [(&w1, &b1), (&w2, &b2)].into_iter().zip(&outs) {
            let expected = w.forward(&xs)?.broadcast_add(b)?;
            assert_eq!(out.dims(), expected.dims());
            let diff = (out - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale,
                "m={m}: max difference {diff} (outputs up to {scale})"
            );
        }
        // Each path this CPU runs, forced: every tile kernel that takes `m` rows, then every
        // row kernel (in chunks beyond MAX_ROWS rows).
        let (d1, d2) = (stored(&w1)?, stored(&w2)?);
        let (bias1, bias2) = (b1.to_vec1::<f32>()?, b2.to_vec1::<f32>()?);
        let parts = [
            Q4kLinear {
                blocks: blocks(&d1),
                bias: &bias1,
                n: n1,
            },
            Q4kLinear {
                blocks: blocks(&d2),
                bias: &bias2,
                n: n2,
            },
        ];
        let input = xs.flatten_all()?.to_vec1::<f32>()?;
        let quantized: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
        let features = cpu::features();
        let tiles = features.implementations(Kernel::Q4kTiles);
        let tiles = tiles.filter(|&imp| tiles_fit(imp, &parts, m)).map(Some);
        let expected: Vec<Vec<f32>> = outs
            .iter()
            .map(|o| o.flatten_all()?.to_vec1::<f32>())
            .collect::<Result<_>>()?;
        for tiles in tiles.chain([None]) {
            let row_kernels: Vec<Implementation> = match tiles {
                Some(_) => vec![rows::chosen()],
                None => features.implementations(Kernel::Q4kRows).collect(),
            };
            for row_kernel in row_kernels {
                let mut got = vec![vec![f32::NAN; m * n1], vec![f32::NAN; m * n2]];
                match tiles {
                    Some(_) => multiply(tiles, &parts, &quantized, m, &mut got),
                    None => rows::multiply(row_kernel, &parts, &quantized, m, &mut got),
                }
                let path = tiles.unwrap_or(row_kernel);
                for (got, expected) in got.iter().zip(&expected) {
                    let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for (g, e) in got.iter().zip(expected) {
                        assert!((g - e).abs() <= 1e-5 * scale, "{path}, m={m}: {g} vs {e}");
                    }
                }
            }
        }
        if m > MAX_ROWS {
            continue;
        }
        // Each row kernel called directly, on all rows in one call and on three.
        let blocks = blocks(&d1);
        let expected = w1.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
        for imp in features.implementations(Kernel::Q4kRows) {
            let kernel = rows::row_kernel(imp);
            // All rows in one call, and the first three in a call of their own.
            for n in [n1, 3] {
                let mut got = vec![f32::NAN; n * m];
                // SAFETY: the probe listed the implementation, so the CPU has its features.
                unsafe { kernel(&blocks[..n * k / QK_K], k / QK_K, &quantized, m, &mut got) };
                for i in 0..n {
                    for r in 0..m {
                        let (g, e) = (got[i * m + r], expected[r * n1 + i]);
                        assert!((g - e).abs() <= 1e-5 * scale, "{imp}, m={m}: {g} vs {e}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Row counts beyond [`MAX_ROWS`] run in chunks through the row kernels where AMX is absent or
/// the weight is not whole tiles of 16 rows: against candle's matmul.
#[test]
fn many_rows_run_in_chunks() -> Result<()> {
    let (k, n) = (512, 24);
    let dev = Device::Cpu;
    let w = QMatMul::from_qtensor(QTensor::quantize(
        &Tensor::from_vec(random(n * k, 7), (n, k), &dev)?,
        GgmlDType::Q4K,
    )?)?;
    let b = Tensor::from_vec(random(n, 8), n, &dev)?;
    for m in [MAX_ROWS + 1, 2 * MAX_ROWS, 2 * MAX_ROWS + 5] {
        let xs = Tensor::from_vec(random(m * k, 9 + m as u64), (m, k), &dev)?;
        let outs =
            crate::qmatmul::linear_rows(&[(&Weight::Candle(w.clone()), &b)], &xs)?.expect("q4k is taken");
        let expected = w.forward(&xs)?.broadcast_add(&b)?;
        let diff = (&outs[0] - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= 1e-5 * scale,
            "m={m}: max difference {diff} (outputs up to {scale})"
        );
    }
    Ok(())
}

/// The stored bytes of a quantized weight.
fn stored(w: &QMatMul) -> Result<std::borrow::Cow<'_, [u8]>> {
    match w {
        QMatMul::QTensor(w) => w.data(),
        _ => candle_core::bail!("a quantized weight expected"),
    }
}

/// Stored q4k bytes as blocks.
fn blocks(data: &[u8]) -> &[BlockQ4K] {
    // SAFETY: BlockQ4K is plain bytes (`repr(C)`, no padding, any bit pattern valid); the tests
    // fail if the blocks did not line up.
    unsafe { data.align_to::<BlockQ4K>().1 }
}

/// The NEON row kernels (with and without the dot products) sum exactly as the portable one does
/// (exact integer sums, the same f32 arithmetic in the same order): equal outputs, bit for bit, for
/// one to five rows.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_rows_equal_the_portable_one_bit_for_bit() -> Result<()> {
    let (k, n) = (768, 10);
    let dev = Device::Cpu;
    let w = QMatMul::from_qtensor(QTensor::quantize(
        &Tensor::from_vec(random(n * k, 11), (n, k), &dev)?,
        GgmlDType::Q4K,
    )?)?;
    let data = stored(&w)?;
    let features = cpu::features();
    let portable = features
        .implementation(Kernel::Q4kRows, cpu::Isa::Portable)
        .expect("the q4k row kernel has a portable implementation");
    let simd: Vec<Implementation> = features
        .implementations(Kernel::Q4kRows)
        .filter(|imp| imp.isa() != cpu::Isa::Portable)
        .collect();
    assert!(
        simd.iter().any(|imp| imp.isa() == cpu::Isa::Neon),
        "aarch64 has NEON"
    );
    for m in 1..=5 {
        let input = random(m * k, 12 + m as u64);
        let quantized: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
        let mut expected = vec![f32::NAN; n * m];
        // SAFETY: the portable kernel needs no feature.
        unsafe { rows::row_kernel(portable)(blocks(&data), k / QK_K, &quantized, m, &mut expected) };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for &imp in &simd {
            let mut got = vec![f32::NAN; n * m];
            // SAFETY: the probe listed the implementation, so the CPU has its features.
            unsafe { rows::row_kernel(imp)(blocks(&data), k / QK_K, &quantized, m, &mut got) };
            assert_eq!(bits(&got), bits(&expected), "{imp}, m={m}");
        }
    }
    Ok(())
}
