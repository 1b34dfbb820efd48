//! The dense kernels against f64 sums over the same stored values: through [`linear`] as the
//! engine calls it, and each row and panel kernel this CPU runs, forced, the portable ones too.

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::*;
use crate::qmatmul::tests::random;

/// `out` (`[m, n]`) against f64 sums of `w` (`[n, k]`) times `x` (`[m, k]`) plus `bias`.
fn check(out: &[f32], w: &[f32], x: &[f32], bias: &[f32], (m, n, k): (usize, usize, usize), what: &str) {
    for i in 0..m {
        for row in 0..n {
            let dot: f64 = (0..k).map(|t| w[row * k + t] as f64 * x[i * k + t] as f64).sum();
            let expected = dot + bias[row] as f64;
            let got = out[i * n + row] as f64;
            assert!(
                (got - expected).abs() <= 1e-5 * (k as f64).sqrt(),
                "{what} ({i}, {row}): {got} vs {expected}"
            );
        }
    }
}

/// Every path against f64 sums over the same stored values, for f32, f16 and bf16 weights, two
/// weights sharing the input, row counts that leave remainders, and a `k` no SIMD row kernel
/// takes: the one [`linear`] picks, then each row kernel this CPU runs that fits `k` (up to
/// [`MAX_ROWS`] rows) and each implementation of the panels (AVX-512, AVX2 and the widened
/// matmul), forced.
#[test]
fn matches_sums_over_the_stored_values() -> Result<()> {
    let dev = Device::Cpu;
    let features = cpu::features();
    for k in [64, 72, 2051] {
        let (n1, n2) = (13, 8);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let w1 = Tensor::from_vec(random(n1 * k, 1), (n1, k), &dev)?.to_dtype(dtype)?;
            let w2 = Tensor::from_vec(random(n2 * k, 2), (n2, k), &dev)?.to_dtype(dtype)?;
            let b1 = Tensor::from_vec(random(n1, 3), n1, &dev)?;
            let b2 = Tensor::from_vec(random(n2, 4), n2, &dev)?.to_dtype(dtype)?;
            let linears = [(&w1, &b1), (&w2, &b2)];
            for m in [1, 2, 3, 4, 5, 9, MAX_ROWS, 40] {
                let xs = Tensor::from_vec(random(m * k, 5 + m as u64), (1, m, k), &dev)?;
                let x = xs.flatten_all()?.to_vec1::<f32>()?;
                let rows = features.implementations(Kernel::DenseRows);
                let rows = rows.filter(|&imp| m <= MAX_ROWS && rows::fits(imp, k));
                let forced = rows.chain(features.implementations(Kernel::DensePanels));
                let chosen = linear(&linears, &xs, xs.dims())?;
                if chosen.is_none() {
                    assert!(dtype == DType::F32 && m > MAX_ROWS, "{dtype:?}, m={m}: not taken");
                }
                let paths = chosen.map(|outs| ("linear".to_string(), outs)).into_iter();
                let forced = forced.map(|imp| -> Result<(String, Vec<Tensor>)> {
                    let outs = linear_through(imp, &linears, &xs, xs.dims())?;
                    Ok((imp.to_string(), outs.expect("a forced kernel takes CPU tensors")))
                });
                for path in paths.map(Ok).chain(forced) {
                    let (path, outs) = path?;
                    for ((w, b), out) in linears.into_iter().zip(&outs) {
                        let (n, _) = w.dims2()?;
                        assert_eq!(out.dims(), &[1, m, n]);
                        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let b = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        let out = out.flatten_all()?.to_vec1::<f32>()?;
                        check(
                            &out,
                            &w,
                            &x,
                            &b,
                            (m, n, k),
                            &format!("{path}, {dtype:?} k={k} m={m}"),
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Each row kernel this CPU runs, not only the one [`rows::chosen`] picks, on one and four
/// weight rows against the portable one.
#[test]
fn row_kernels_agree_with_the_portable_one() {
    let (k, m) = (96, 7);
    let w: Vec<f16> = random(8 * k, 7).into_iter().map(f16::from_f32).collect();
    let x = random(m * k, 8);
    let features = cpu::features();
    let portable = features
        .implementation(Kernel::DenseRows, cpu::Isa::Portable)
        .expect("the dense row kernel has a portable implementation");
    let mut expected = [0f32; 4 * MAX_ROWS];
    for imp in features.implementations(Kernel::DenseRows) {
        let kernel = rows::row_kernel(imp);
        for (first, rows) in [(0, 4), (4, 4), (7, 1)] {
            // SAFETY: the portable kernel needs no feature; `k` fits every kernel.
            unsafe { rows::row_kernel(portable)(Values::F16(&w), first, rows, k, &x, m, &mut expected) };
            let mut got = [0f32; 4 * MAX_ROWS];
            // SAFETY: the probe listed `imp`, so the CPU has its features; `k` fits it.
            unsafe { kernel(Values::F16(&w), first, rows, k, &x, m, &mut got) };
            for (g, e) in got[..rows * m].iter().zip(&expected[..rows * m]) {
                assert!((g - e).abs() <= 1e-4, "{imp}, rows {first}+{rows}: {g} vs {e}");
            }
        }
    }
}

/// Each panel tile kernel this CPU runs, not only the one [`kernel_for`] picks, on a weight with
/// a remainder row and a `k` past one block, against f64 sums.
#[cfg(target_arch = "x86_64")]
#[test]
fn every_tile_kernel_matches_sums() {
    let (n, m, k) = (13, 37, 300);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 104729) % 199) as f32 / 99.0 - 1.0)
        .collect();
    let bias: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
    let part = DenseLinear {
        values: Values::F32(&w),
        bias: &bias,
        n,
    };
    for imp in cpu::features().implementations(Kernel::DensePanels) {
        let Some(tiles) = panels::TileKernel::of(imp) else {
            continue;
        };
        let mut out = vec![0f32; m * n];
        panels::multiply(&part, &panels::Input::pack(&x, m, k, tiles), &mut out);
        for i in 0..m {
            for row in 0..n {
                let dot: f64 = (0..k).map(|t| w[row * k + t] as f64 * x[i * k + t] as f64).sum();
                let expected = dot + bias[row] as f64;
                let got = out[i * n + row] as f64;
                assert!(
                    (got - expected).abs() <= 1e-3,
                    "{imp} ({i}, {row}): {got} vs {expected}"
                );
            }
        }
    }
}
