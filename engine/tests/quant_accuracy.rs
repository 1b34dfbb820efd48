//! Accuracy of each weight dtype against f32, on a random model of Phi-1's full width (hidden 2048,
//! intermediate 8192, 32 heads of 64, so every k-quant block fits) with one layer and a small
//! vocabulary: top-1 agreement and mean KL(f32 || dtype) over a few hundred positions, loaded the
//! way users load (`Engine::load` from a safetensors folder, quantizing while loading).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use phi_engine::{Engine, ModelFiles, WeightDType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 2048;
const INTERMEDIATE: usize = 8192;
const HEADS: usize = 32;
const LAYERS: usize = 1;
const VOCAB: usize = 4096;
const POSITIONS: usize = 256;

/// Uniform noise of standard deviation `std` around `center` (trained Phi-1 weights have std ~0.02).
fn random(rng: &mut StdRng, shape: &[usize], center: f32, std: f32) -> Tensor {
    let half_width = std * 3f32.sqrt();
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| center + rng.random_range(-half_width..half_width))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor")
}

fn write_model(dir: &Path) {
    let config = serde_json::json!({
        "architectures": ["PhiForCausalLM"], "model_type": "phi",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "hidden_act": "gelu_new",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi/tokenizer.json");
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).expect("tokenizer.json");
    let mut rng = StdRng::seed_from_u64(2048);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], center: f32, std: f32| {
        tensors.insert(name, random(&mut rng, shape, center, std));
    };
    add("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], 0.0, 0.02);
    for layer in 0..LAYERS {
        let p = format!("model.layers.{layer}");
        for (module, out_dim, in_dim) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", HIDDEN, HIDDEN),
            ("self_attn.v_proj", HIDDEN, HIDDEN),
            ("self_attn.dense", HIDDEN, HIDDEN),
            ("mlp.fc1", INTERMEDIATE, HIDDEN),
            ("mlp.fc2", HIDDEN, INTERMEDIATE),
        ] {
            add(format!("{p}.{module}.weight"), &[out_dim, in_dim], 0.0, 0.02);
            add(format!("{p}.{module}.bias"), &[out_dim], 0.0, 0.02);
        }
        add(format!("{p}.input_layernorm.weight"), &[HIDDEN], 1.0, 0.1);
        add(format!("{p}.input_layernorm.bias"), &[HIDDEN], 0.0, 0.02);
    }
    add("model.final_layernorm.weight".into(), &[HIDDEN], 1.0, 0.1);
    add("model.final_layernorm.bias".into(), &[HIDDEN], 0.0, 0.02);
    add("lm_head.weight".into(), &[VOCAB, HIDDEN], 0.0, 0.02);
    add("lm_head.bias".into(), &[VOCAB], 0.0, 0.02);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("safetensors");
}

/// Log-probabilities of each row, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&x| x as f64 - log_sum).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |best, (i, &x)| if x > best.1 { (i, x) } else { best },
        )
        .0
}

struct Accuracy {
    top1: f64,
    mean_kl: f64,
    max_kl: f64,
}

fn compare(reference: &[Vec<f32>], other: &[Vec<f32>]) -> Accuracy {
    let (mut agree, mut kl_sum, mut max_kl) = (0usize, 0.0f64, 0.0f64);
    for (p_row, q_row) in reference.iter().zip(other) {
        agree += usize::from(argmax(p_row) == argmax(q_row));
        let (log_p, log_q) = (log_softmax(p_row), log_softmax(q_row));
        let kl: f64 = log_p
            .iter()
            .zip(&log_q)
            .map(|(&lp, &lq)| lp.exp() * (lp - lq))
            .sum();
        kl_sum += kl;
        max_kl = max_kl.max(kl);
    }
    Accuracy {
        top1: agree as f64 / reference.len() as f64,
        mean_kl: kl_sum / reference.len() as f64,
        max_kl,
    }
}

#[test]
fn quantized_dtypes_track_f32_on_a_full_width_model() {
    let started = Instant::now();
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quant-accuracy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("folder");
    write_model(&dir);
    let files = ModelFiles::from_dir(&dir, None).expect("model folder");
    let mut rng = StdRng::seed_from_u64(7);
    let ids: Vec<u32> = (0..POSITIONS)
        .map(|_| rng.random_range(0..VOCAB as u32))
        .collect();
    let logits = |dtype: WeightDType| -> Vec<Vec<f32>> {
        let engine = Engine::load(&files, &Device::Cpu, dtype).expect("loads");
        let mut cache = engine.model.new_cache(POSITIONS).expect("cache");
        let out = engine.model.forward(&ids, &mut cache, true).expect("forward");
        out.to_vec2().expect("2-d logits")
    };
    let reference = logits(WeightDType::F32);
    // A random model's next-token distributions are far flatter than a trained model's: top-1
    // margins are small (top-1 agreement understates) and KL is small (it overstates agreement).
    let (mut top_prob, mut entropy) = (0.0, 0.0);
    for row in &reference {
        let log_p = log_softmax(row);
        top_prob += log_p.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x)).exp();
        entropy -= log_p.iter().map(|&lp| lp.exp() * lp).sum::<f64>();
    }
    let n = reference.len() as f64;
    eprintln!(
        "model: hidden {HIDDEN}, intermediate {INTERMEDIATE}, {HEADS} heads, {LAYERS} layer(s), vocab {VOCAB}; \
         {POSITIONS} positions; f32 mean top-1 probability {:.4}, mean entropy {:.2} nats (uniform {:.2}); \
         built and run in {:.1} s",
        top_prob / n,
        entropy / n,
        (VOCAB as f64).ln(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("dtype  top-1 agreement  mean KL (nats)  max KL (nats)  seconds");
    // Measured (x86-64 CPU): top-1 / mean KL f16 1.000 / 4.7e-7, bf16 0.988 / 2.4e-5,
    // q8_0 0.973 / 9.0e-5, q4k 0.801 / 4.2e-3. The bounds leave room for another CPU's summation
    // order and for the sampling noise of 256 positions, and still catch a broken quantizer (a
    // wrong scale or block order costs orders of magnitude in KL).
    let bounds = [
        (WeightDType::F16, 0.99, 5e-6),
        (WeightDType::BF16, 0.95, 1e-4),
        (WeightDType::Q8_0, 0.94, 4e-4),
        (WeightDType::Q4K, 0.72, 1.5e-2),
        // The Q4_K_M mix keeps lm_head (and, by llama.cpp's rule, layer 0's v_proj and fc2) in
        // q6k: it must be at least as close as q4k.
        (WeightDType::Q4KM, 0.72, 1.5e-2),
    ];
    let mut failures = Vec::new();
    for (dtype, min_top1, max_mean_kl) in bounds {
        let t0 = Instant::now();
        let accuracy = compare(&reference, &logits(dtype));
        eprintln!(
            "{:<6} {:>15.4} {:>15.2e} {:>14.2e} {:>8.1}",
            dtype.name(),
            accuracy.top1,
            accuracy.mean_kl,
            accuracy.max_kl,
            t0.elapsed().as_secs_f64()
        );
        if accuracy.top1 < min_top1 || accuracy.mean_kl > max_mean_kl {
            failures.push(format!(
                "{}: top-1 {:.4} (>= {min_top1}), mean KL {:.2e} (<= {max_mean_kl:e})",
                dtype.name(),
                accuracy.top1,
                accuracy.mean_kl
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{failures:?}");
}
