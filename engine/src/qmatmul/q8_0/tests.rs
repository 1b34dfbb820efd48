//! The q8_0 kernels against ggml's q8_0·q8_0 dot product as candle implements it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use super::*;
use crate::qmatmul::tests::random;

/// q8_0 weights repacked into tiles against ggml's q8_0·q8_0 dot product as candle implements
/// it (`k_quants::BlockQ8_0::vec_dot`, the input quantized by its `from_float`): through
/// `linear_rows` as the engine calls it, and forced through each row kernel this CPU runs (the
/// weights packed for it) and the AMX tiles where it has them, for every row count, two weights
/// sharing the input.
#[test]
fn q8_0_tiles_match_candles_dot_product() -> Result<()> {
    use candle_core::quantized::k_quants::{self, GgmlType};
    // k = 384: whole q8_0 tiles of four blocks, not whole q4k blocks.
    let (k, n1, n2) = (384, 48, 80);
    let dev = Device::Cpu;
    let quantized = |n: usize, seed: u64| -> Result<QTensor> {
        QTensor::quantize(
            &Tensor::from_vec(random(n * k, seed), (n, k), &dev)?,
            GgmlDType::Q8_0,
        )
    };
    let (q1, q2) = (quantized(n1, 1)?, quantized(n2, 2)?);
    let (w1, w2) = (
        Weight::new(QMatMul::from_qtensor(quantized(n1, 1)?)?)?,
        Weight::new(QMatMul::from_qtensor(quantized(n2, 2)?)?)?,
    );
    if !matches!((&w1, &w2), (Weight::Q8_0(_), Weight::Q8_0(_))) {
        assert!(
            !Packed::supported(n1, k),
            "q8_0 weights are packed where the kernel runs"
        );
        eprintln!("this CPU has none of AVX-512 VNNI, AVX2 and NEON: q8_0 weights stay with candle");
        return Ok(());
    }
    // Every layout this CPU has kernels for, not only the one `Weight::new` picks.
    let mut packed = Vec::new();
    for kernel in cpu::features().implementations(Kernel::Q8_0Rows) {
        let pack = |q: &QTensor, n| -> Result<Packed> {
            Packed::for_kernel(&q.data()?, n, k, kernel).ok_or(candle_core::Error::Msg("not packed".into()))
        };
        packed.push([pack(&q1, n1)?, pack(&q2, n2)?]);
    }
    let b1 = random(n1, 3);
    let b2 = random(n2, 4);
    let (t1, t2) = (
        Tensor::from_vec(b1.clone(), n1, &dev)?,
        Tensor::from_vec(b2.clone(), n2, &dev)?,
    );
    for m in [1, 3, 4, 5, 16, 28, 31, 40, 128] {
        let input = random(m * k, 5 + m as u64);
        let mut acts = vec![k_quants::BlockQ8_0::zeros(); m * k / 32];
        k_quants::BlockQ8_0::from_float(&input, &mut acts);
        let expected = |q: &QTensor, bias: &[f32], n: usize| -> Result<Vec<f32>> {
            let data = q.data()?;
            // SAFETY: k_quants::BlockQ8_0 is repr(C) plain data; the length is checked.
            let (_, blocks, _) = unsafe { data.align_to::<k_quants::BlockQ8_0>() };
            assert_eq!(blocks.len(), n * k / 32);
            Ok((0..m * n)
                .map(|i| {
                    let (r, row) = (i / n, i % n);
                    let w = &blocks[row * k / 32..][..k / 32];
                    k_quants::BlockQ8_0::vec_dot(k, w, &acts[r * k / 32..][..k / 32]) + bias[row]
                })
                .collect())
        };
        let expected = [expected(&q1, &b1, n1)?, expected(&q2, &b2, n2)?];
        let check = |got: &[f32], expected: &[f32], path: &str| {
            let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() <= 1e-5 * scale, "{path}, m={m}: {g} vs {e}");
            }
        };
        let xs = Tensor::from_vec(input.clone(), (1, m, k), &dev)?;
        let outs =
            crate::qmatmul::linear_rows(&[(&w1, &t1), (&w2, &t2)], &xs)?.expect("packed q8_0 runs here");
        for (out, expected) in outs.iter().zip(&expected) {
            assert_eq!(out.dims(), &[1, m, expected.len() / m]);
            check(&out.flatten_all()?.to_vec1::<f32>()?, expected, "linear_rows");
        }
        for [p1, p2] in &packed {
            let parts = [(p1, &b1[..]), (p2, &b2[..])];
            for tiles in tiles_for(&parts, m).map(Some).into_iter().chain([None]) {
                let mut outs = vec![vec![f32::NAN; m * n1], vec![f32::NAN; m * n2]];
                multiply(tiles, &parts, &input, m, &mut outs);
                let path = tiles.unwrap_or(p1.kernel);
                for (out, expected) in outs.iter().zip(&expected) {
                    check(out, expected, &path.to_string());
                }
            }
        }
    }
    Ok(())
}
