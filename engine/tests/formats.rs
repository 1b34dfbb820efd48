//! Checkpoint layouts a user may hold: one safetensors file or shards with an index, stored as
//! f32, f16 or bf16 — all load to the same model (within the storage precision).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use phi_engine::{Device, Engine, ModelFiles, WeightDType};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi")
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &candle_core::Device::Cpu)
        .expect("fixture tensors")
}

/// A model folder with the fixture's config and tokenizer and the given weight files.
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture_dir().join(name), dir.path().join(name)).expect("copies");
    }
    dir
}

fn last_logits(dir: &Path, dtype: WeightDType) -> Vec<f32> {
    let files = ModelFiles::from_dir(dir, None).expect("complete folder");
    let engine = Engine::load(&files, &Device::Cpu, dtype).expect("loads");
    let ids = engine
        .tokenizer
        .encode("def add(a, b):\n    return a + b\n")
        .expect("encodes");
    let mut cache = engine.model.new_cache(64).expect("cache");
    let logits = engine.model.forward(&ids, &mut cache, false).expect("forward");
    logits.squeeze(0).expect("row").to_vec1().expect("1-d")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let expected = last_logits(&fixture_dir(), WeightDType::F32);
    let dir = folder();
    let tensors = fixture_tensors();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|name| ((*name).clone(), tensors[*name].clone()))
            .collect();
        candle_core::safetensors::save(&subset, dir.path().join(shard)).expect("saves shard");
        for name in part {
            weight_map.insert((*name).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).expect("index");
    let files = ModelFiles::from_dir(dir.path(), None).expect("sharded folder");
    assert_eq!(files.weights.len(), 2);
    assert_eq!(
        max_abs_diff(&last_logits(dir.path(), WeightDType::F32), &expected),
        0.0
    );

    // A shard missing, or named outside the folder, is refused with the file named.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("removes");
    let err = ModelFiles::from_dir(dir.path(), None).expect_err("missing shard");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    let escaping = serde_json::json!({"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        escaping.to_string(),
    )
    .expect("index");
    let err = ModelFiles::from_dir(dir.path(), None).expect_err("escaping shard");
    assert!(err.to_string().contains("not a plain file name"), "{err}");
}

#[test]
fn half_precision_checkpoints_load_as_stored_or_widened() {
    let expected = last_logits(&fixture_dir(), WeightDType::F32);
    for (stored, tolerance) in [(DType::F16, 0.05), (DType::BF16, 0.3)] {
        let dir = folder();
        let converted: HashMap<String, Tensor> = fixture_tensors()
            .into_iter()
            .map(|(name, t)| (name, t.to_dtype(stored).expect("converts")))
            .collect();
        candle_core::safetensors::save(&converted, dir.path().join("model.safetensors")).expect("saves");
        // Widened to f32 on load: only the storage rounding differs from the f32 checkpoint.
        let widened = max_abs_diff(&last_logits(dir.path(), WeightDType::F32), &expected);
        assert!(widened < tolerance, "{stored:?} stored, f32 compute: {widened}");
        // Run in the stored precision.
        let native = WeightDType::parse(&format!("{stored:?}").to_lowercase()).expect("dtype");
        let diff = max_abs_diff(&last_logits(dir.path(), native), &expected);
        assert!(diff < tolerance * 2.0, "{stored:?} stored and computed: {diff}");
        eprintln!("{stored:?}: widened {widened:.2e}, native {diff:.2e}");
    }
}
