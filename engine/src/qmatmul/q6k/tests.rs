//! The q6k kernels against the blocks dequantized as ggml does (times the activations as the
//! kernels quantize them, so the comparison is of the arithmetic alone), and against candle's own
//! q6k matmul; and a call that mixes q4k and q6k weights against each weight alone.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::*;
use crate::cpu::{self, Isa, Kernel};
use crate::qmatmul::q8k::{MAX_ROWS, QK_K};
use crate::qmatmul::tests::random;
use crate::qmatmul::{linear_rows, linear_rows_as, Result, Rows, Weight};

fn quantized(n: usize, k: usize, seed: u64, dtype: GgmlDType) -> Result<QMatMul> {
    let w = Tensor::from_vec(random(n * k, seed), (n, k), &Device::Cpu)?;
    QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)
}

fn blocks(w: &QMatMul) -> Result<Vec<u8>> {
    match w {
        QMatMul::QTensor(w) => Ok(w.data()?.into_owned()),
        _ => candle_core::bail!("a quantized weight expected"),
    }
}

/// Stored q6k bytes as blocks.
fn as_blocks(data: &[u8]) -> &[BlockQ6K] {
    // SAFETY: BlockQ6K is plain bytes (`repr(C)`, no padding, any bit pattern valid); the tests
    // fail if the blocks did not line up.
    let (head, blocks, tail) = unsafe { data.align_to::<BlockQ6K>() };
    assert!(head.is_empty() && tail.is_empty(), "q6k blocks line up");
    blocks
}

/// ggml's dequantization of a block, which `BlockQ6K::value` and `scale` restate, agrees with
/// candle's.
#[test]
fn blocks_dequantize_as_candle_does() -> Result<()> {
    let (n, k) = (4, 512);
    let w = quantized(n, k, 11, GgmlDType::Q6K)?;
    let data = blocks(&w)?;
    let ours = dequantized(as_blocks(&data));
    let QMatMul::QTensor(q) = &w else { unreachable!() };
    let theirs = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(ours, theirs);
    Ok(())
}

/// Every row kernel this CPU runs, on one to many rows, against the exact integer arithmetic of
/// the dequantized blocks and the quantized activations.
#[test]
fn row_kernels_compute_the_blocks_dot_products() -> Result<()> {
    let (n, k) = (40, 768);
    let w = quantized(n, k, 12, GgmlDType::Q6K)?;
    let data = blocks(&w)?;
    let blocks = as_blocks(&data);
    let kb = k / QK_K;
    for m in [1, 2, 3, 4, 5, 9] {
        let input = random(m * k, 13 + m as u64);
        let x: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
        let expected: Vec<f64> = (0..n)
            .flat_map(|i| (0..m).map(move |r| (i, r)))
            .map(|(i, r)| {
                let row = &blocks[i * kb..][..kb];
                row.iter()
                    .zip(&x[r * kb..][..kb])
                    .map(|(b, a)| {
                        let d = half::f16::from_bits(b.d).to_f32() as f64;
                        d * a.d as f64 * block_sum(b, a) as f64
                    })
                    .sum()
            })
            .collect();
        let scale = expected.iter().fold(0f64, |s, v| s.max(v.abs()));
        let run = |imp| {
            let mut got = vec![f32::NAN; n * m];
            // SAFETY: the probe listed the implementation, so the CPU has its features.
            unsafe { rows::row_kernel(imp)(blocks, kb, &x, m, &mut got) };
            got
        };
        let features = cpu::features();
        let portable = run(features
            .implementation(Kernel::Q6kRows, Isa::Portable)
            .expect("portable"));
        for imp in features.implementations(Kernel::Q6kRows) {
            let got = run(imp);
            for (g, e) in got.iter().zip(&expected) {
                assert!((*g as f64 - e).abs() <= 1e-5 * scale, "{imp}, m={m}: {g} vs {e}");
            }
            // The NEON kernels sum the same exact integers and do the portable kernel's f32
            // arithmetic on them: bit for bit.
            if matches!(imp.isa(), Isa::Neon | Isa::NeonDotprod) {
                assert_eq!(got, portable, "{imp}, m={m}: not the portable kernel's bits");
            }
        }
    }
    Ok(())
}

/// Through the engine's entry, as the model calls it: against candle's q6k matmul (which
/// quantizes the input the same way), with a q4k weight sharing the input, for rows in one chunk
/// and in several, and computed alone.
#[test]
fn mixed_k_quants_match_candle() -> Result<()> {
    let dev = Device::Cpu;
    let (k, n1, n2) = (512, 48, 80);
    let w1 = quantized(n1, k, 14, GgmlDType::Q4K)?;
    let w2 = quantized(n2, k, 15, GgmlDType::Q6K)?;
    let b1 = Tensor::from_vec(random(n1, 16), n1, &dev)?;
    let b2 = Tensor::from_vec(random(n2, 17), n2, &dev)?;
    let (c1, c2) = (Weight::Candle(w1.clone()), Weight::Candle(w2.clone()));
    for m in [1, 4, 8, MAX_ROWS + 3] {
        let xs = Tensor::from_vec(random(m * k, 18 + m as u64), (1, m, k), &dev)?;
        let outs = linear_rows(&[(&c2, &b2), (&c1, &b1)], &xs)?.expect("q4k and q6k are taken");
        for ((w, b), out) in [(&w2, &b2), (&w1, &b1)].into_iter().zip(&outs) {
            let expected = w.forward(&xs)?.broadcast_add(b)?;
            assert_eq!(out.dims(), expected.dims());
            let diff = (out - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * scale,
                "m={m}: max difference {diff} (outputs up to {scale})"
            );
        }
        if m <= crate::qmatmul::MAX_ALONE {
            let alone = linear_rows_as(&[(&c2, &b2)], &xs, Rows::Alone)?.expect("q6k alone");
            let one = Tensor::from_vec(random(k, 18 + m as u64)[..k].to_vec(), (1, 1, k), &dev)?;
            let single = linear_rows_as(&[(&c2, &b2)], &one, Rows::Alone)?.expect("one row");
            // Row 0 of the many-row call is the one-row call's, bit for bit.
            assert_eq!(
                alone[0].narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?,
                single[0].flatten_all()?.to_vec1::<f32>()?
            );
        }
    }
    Ok(())
}
