//! The k-quant formats ([`q4k`], [`q6k`]) behind one entry: a call may mix them (a Q4_K_M file
//! keeps some layers' `attn_v` and `ffn_down` in q6k beside q4k `q`, `k` and `fc1`, which share
//! their input), the input is quantized once to the q8_K-like blocks both read
//! ([`Q8Block`]), and each weight goes to its format's kernels.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Tensor};

use super::q4k::{self, BlockQ4K};
use super::q6k::{self, BlockQ6K};
use super::q8k::{Part, Q8Block, QK_K};
use super::{cpu_f32, outputs, Result, Rows, Weight};

/// `x · wᵀ + bias` for k-quant `(w, bias)` pairs on one f32 CPU input `xs` (`dims`, rows of `k`),
/// one tensor each. `None` where some weight is neither q4k nor q6k of that `k`, `k` is not whole
/// blocks, or a bias is not f32 of the weight's `n`: the caller uses candle's ops. Only the row
/// kernels where `rows` says so.
pub(super) fn linear(
    linears: &[(&Weight, &Tensor)],
    xs: &Tensor,
    dims: &[usize],
    rows: Rows,
) -> Result<Option<Vec<Tensor>>> {
    let k = dims[dims.len() - 1];
    let m = xs.elem_count() / k;
    if !k.is_multiple_of(QK_K) {
        return Ok(None);
    }
    let mut weights: Vec<(&QTensor, &Tensor)> = Vec::with_capacity(linears.len());
    for &(weight, bias) in linears {
        match weight {
            Weight::Candle(QMatMul::QTensor(w))
                if matches!(w.dtype(), GgmlDType::Q4K | GgmlDType::Q6K) && w.shape().dims2()?.1 == k =>
            {
                if bias.dtype() != DType::F32 || bias.dims1()? != w.shape().dims2()?.0 {
                    return Ok(None);
                }
                weights.push((w, bias))
            }
            _ => return Ok(None),
        }
    }
    let datas = weights
        .iter()
        .map(|(w, _)| w.data())
        .collect::<Result<Vec<Cow<[u8]>>>>()?;
    let biases = weights
        .iter()
        .map(|(_, b)| b.contiguous())
        .collect::<Result<Vec<Tensor>>>()?;
    let bias_guards: Vec<_> = biases.iter().map(|b| b.storage_and_layout()).collect();
    // Each weight's format (q6k or not) and place among that format's parts.
    let (mut q4k_parts, mut q6k_parts) = (Vec::new(), Vec::new());
    let mut order = Vec::with_capacity(weights.len());
    for ((data, (guard, layout)), (w, _)) in datas.iter().zip(&bias_guards).zip(&weights) {
        let n = w.shape().dims2()?.0;
        let Some(bias) = cpu_f32(guard, layout, n)? else {
            return Ok(None);
        };
        let whole = |blocks: usize| blocks == n * k / QK_K;
        if w.dtype() == GgmlDType::Q4K {
            // SAFETY: BlockQ4K is plain bytes (`repr(C)`, no padding, any bit pattern valid).
            let (head, blocks, tail) = unsafe { data.align_to::<BlockQ4K>() };
            if !head.is_empty() || !tail.is_empty() || !whole(blocks.len()) {
                return Ok(None);
            }
            order.push((false, q4k_parts.len()));
            q4k_parts.push(Part { blocks, bias, n });
        } else {
            // SAFETY: BlockQ6K is plain bytes (`repr(C)`, no padding, any bit pattern valid).
            let (head, blocks, tail) = unsafe { data.align_to::<BlockQ6K>() };
            if !head.is_empty() || !tail.is_empty() || !whole(blocks.len()) {
                return Ok(None);
            }
            order.push((true, q6k_parts.len()));
            q6k_parts.push(Part { blocks, bias, n });
        }
    }

    let xs = xs.contiguous()?;
    let (guard, layout) = xs.storage_and_layout();
    let Some(input) = cpu_f32(&guard, layout, m * k)? else {
        return Ok(None);
    };
    let quantized: Vec<Q8Block> = input.chunks_exact(QK_K).map(Q8Block::quantize).collect();
    let mut q4k_outs: Vec<Vec<f32>> = q4k_parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    let mut q6k_outs: Vec<Vec<f32>> = q6k_parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    if !q4k_parts.is_empty() {
        let tiles = match rows {
            Rows::Fastest => q4k::tiles_for(&q4k_parts, m),
            Rows::Alone => None,
        };
        q4k::multiply(tiles, &q4k_parts, &quantized, m, &mut q4k_outs);
    }
    if !q6k_parts.is_empty() {
        q6k::rows::multiply(q6k::rows::chosen(), &q6k_parts, &quantized, m, &mut q6k_outs);
    }
    drop(guard);

    let (outs, ns): (Vec<Vec<f32>>, Vec<usize>) = order
        .iter()
        .map(|&(is_q6k, i)| match is_q6k {
            false => (std::mem::take(&mut q4k_outs[i]), q4k_parts[i].n),
            true => (std::mem::take(&mut q6k_outs[i]), q6k_parts[i].n),
        })
        .unzip();
    outputs(outs, ns.into_iter(), dims).map(Some)
}
