//! GGUF files, written by `gguf::write` and loaded back: f32 equal to the safetensors model (and so
//! to transformers' greedy tokens), q8_0 and q4k equal to quantizing on load, a mixformer-named file
//! laid out as candle's published Phi-1 files are, and one-line errors for damaged or hostile files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use phi_engine::{generate, gguf, Engine, EngineError, GenerateParams, ModelFiles, Slot, Watch, WeightDType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    eos_token_id: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
    greedy_tokens: Vec<u32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference parses")
}

/// An empty folder of this test's own (tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("gguf-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn files(dir: &Path) -> ModelFiles {
    ModelFiles::from_dir(dir, None).expect("model folder is complete")
}

fn tokenizer() -> PathBuf {
    fixture_dir().join("tokenizer.json")
}

/// Logits at every position of every reference prompt.
fn all_logits(engine: &Engine) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for case in &reference().cases {
        let mut cache = engine.model.new_cache(512).expect("cache");
        let logits = engine
            .model
            .forward(&case.input_ids, &mut cache, true)
            .expect("forward");
        rows.extend(logits.to_vec2::<f32>().expect("2-d logits"));
    }
    rows
}

fn max_abs_diff(a: &Engine, b: &Engine) -> f32 {
    let (a, b) = (all_logits(a), all_logits(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// A random Phi model in HF layout: the fixture's tokenizer, Phi-1's shape rules (heads of 64,
/// rotary dim 32, theta 10000), so a mixformer file of it needs no metadata either.
fn random_model(dir: &Path, hidden: usize, layers: usize, seed: u64) {
    let (inter, vocab, heads) = (4 * hidden, 1088, hidden / 64);
    let config = serde_json::json!({
        "architectures": ["PhiForCausalLM"], "model_type": "phi",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": "gelu_new",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    std::fs::copy(tokenizer(), dir.join("tokenizer.json")).expect("tokenizer.json");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], center: f32, std: f32| {
        let half_width = std * 3f32.sqrt();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + rng.random_range(-half_width..half_width))
            .collect();
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor"));
    };
    add("model.embed_tokens.weight".into(), &[vocab, hidden], 0.0, 0.5);
    for layer in 0..layers {
        let p = format!("model.layers.{layer}");
        for (module, out_dim, in_dim) in [
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", hidden, hidden),
            ("self_attn.v_proj", hidden, hidden),
            ("self_attn.dense", hidden, hidden),
            ("mlp.fc1", inter, hidden),
            ("mlp.fc2", hidden, inter),
        ] {
            add(format!("{p}.{module}.weight"), &[out_dim, in_dim], 0.0, 0.05);
            add(format!("{p}.{module}.bias"), &[out_dim], 0.0, 0.02);
        }
        add(format!("{p}.input_layernorm.weight"), &[hidden], 1.0, 0.1);
        add(format!("{p}.input_layernorm.bias"), &[hidden], 0.0, 0.05);
    }
    add("model.final_layernorm.weight".into(), &[hidden], 1.0, 0.1);
    add("model.final_layernorm.bias".into(), &[hidden], 0.0, 0.05);
    add("lm_head.weight".into(), &[vocab, hidden], 0.0, 0.05);
    add("lm_head.bias".into(), &[vocab], 0.0, 0.02);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("safetensors");
}

/// A copy of `src` whose embedding went through `dtype` and back: GGUF files quantize the
/// embedding (as llama.cpp's do) while quantize-on-load keeps it f32, so this copy loaded with
/// `Engine::load(.., dtype)` is the model the GGUF file must equal.
fn with_quantized_embedding(src: &Path, dst: &Path, dtype: GgmlDType) {
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(name), dst.join(name)).expect("copies");
    }
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("loads");
    let embedding = &tensors["model.embed_tokens.weight"];
    if embedding.dim(1).expect("2-d").is_multiple_of(dtype.block_size()) {
        let round_trip = QTensor::quantize(embedding, dtype)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .expect("quantizes");
        tensors.insert("model.embed_tokens.weight".into(), round_trip);
    }
    candle_core::safetensors::save(&tensors, dst.join("model.safetensors")).expect("saves");
}

fn load_gguf(path: &Path) -> Engine {
    gguf::load(path, &tokenizer(), &Device::Cpu).expect("GGUF loads")
}

fn load_error(path: &Path) -> String {
    match gguf::load(path, &tokenizer(), &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e @ EngineError::Load { .. }) => {
            let message = e.to_string();
            assert!(!message.contains('\n'), "one line: {message}");
            assert!(
                message.contains(&path.display().to_string()),
                "names the file: {message}"
            );
            message
        }
        Err(other) => panic!("not a load error: {other}"),
    }
}

#[test]
fn f32_round_trip_equals_safetensors_and_transformers() {
    let dir = scratch("f32");
    let out = dir.join("tiny-f32.gguf");
    let summary = gguf::write(&files(&fixture_dir()), &out, WeightDType::F32).expect("writes");
    assert_eq!(summary.n_tensors, 1 + 2 * 14 + 4);
    assert_eq!(summary.bytes, std::fs::metadata(&out).expect("exists").len());
    let from_gguf = load_gguf(&out);
    let from_safetensors =
        Engine::load(&files(&fixture_dir()), &Device::Cpu, WeightDType::F32).expect("loads");
    let diff = max_abs_diff(&from_gguf, &from_safetensors);
    eprintln!("f32 GGUF vs safetensors: max |logit diff| {diff:e}");
    assert!(diff <= 1e-5, "{diff}");

    let reference = reference();
    for case in &reference.cases {
        let mut slot = Slot::new(&from_gguf.model, 512).expect("slot");
        let params = GenerateParams {
            max_new_tokens: 16,
            ..Default::default()
        };
        let generation = generate(
            &from_gguf,
            &mut slot,
            &case.input_ids,
            &params,
            Watch {
                stop: &mut |_| false,
                cancelled: &|| false,
                keep_prefilling: None,
                progress: None,
            },
        )
        .expect("generates");
        let mut expected = case.greedy_tokens.clone();
        if expected.last() == Some(&reference.eos_token_id) {
            expected.pop();
        }
        assert_eq!(generation.tokens, expected);
    }
}

#[test]
fn written_file_is_llama_cpp_phi2() {
    let dir = scratch("layout");
    let out = dir.join("tiny-q8_0.gguf");
    gguf::write(&files(&fixture_dir()), &out, WeightDType::Q8_0).expect("writes");
    let mut reader = std::fs::File::open(&out).expect("opens");
    let content = gguf_file::Content::read(&mut reader).expect("candle reads it");
    let meta = |key: &str| content.metadata.get(key).unwrap_or_else(|| panic!("{key}"));
    assert_eq!(meta("general.architecture").to_string().expect("str"), "phi2");
    assert_eq!(meta("phi2.block_count").to_u32().expect("u32"), 2);
    assert_eq!(meta("phi2.embedding_length").to_u32().expect("u32"), 64);
    assert_eq!(meta("phi2.feed_forward_length").to_u32().expect("u32"), 256);
    assert_eq!(meta("phi2.attention.head_count").to_u32().expect("u32"), 4);
    assert_eq!(meta("phi2.rope.dimension_count").to_u32().expect("u32"), 8);
    // llama.cpp's key (LLM_KV_ATTENTION_LAYERNORM_EPS); without it llama.cpp refuses the file.
    let eps = meta("phi2.attention.layer_norm_epsilon").to_f32().expect("f32");
    assert!((eps - 1e-5).abs() < 1e-12, "{eps}");
    assert_eq!(meta("general.file_type").to_u32().expect("u32"), 7);
    assert_eq!(meta("tokenizer.ggml.model").to_string().expect("str"), "gpt2");
    assert_eq!(meta("tokenizer.ggml.pre").to_string().expect("str"), "phi-2");
    for key in ["bos", "eos", "unk"] {
        let id = meta(&format!("tokenizer.ggml.{key}_token_id"))
            .to_u32()
            .expect("u32");
        assert_eq!(id, 999);
    }
    // One token per embedding row; the rows past the tokenizer are unused padding.
    let tokens = meta("tokenizer.ggml.tokens").to_vec().expect("array");
    let types = meta("tokenizer.ggml.token_type").to_vec().expect("array");
    assert_eq!((tokens.len(), types.len()), (1088, 1088));
    assert_eq!(tokens[999].to_string().expect("str"), "<|endoftext|>");
    assert_eq!(types[999].to_i32().expect("i32"), 3);
    assert_eq!(tokens[1000].to_string().expect("str"), "[PAD1000]");
    assert_eq!(types[1000].to_i32().expect("i32"), 5);
    assert_eq!(types[0].to_i32().expect("i32"), 1);
    let merges = meta("tokenizer.ggml.merges").to_vec().expect("array");
    assert_eq!(merges[0].to_string().expect("str"), "Ġ Ġ");
    // Split Q/K/V (what convert_hf_to_gguf.py writes for PhiForCausalLM); 2-D weights quantized
    // where rows are whole blocks (64 = 2 x 32), norms and biases f32.
    let info = |name: &str| content.tensor_infos.get(name).unwrap_or_else(|| panic!("{name}"));
    assert!(!content.tensor_infos.contains_key("blk.0.attn_qkv.weight"));
    for name in [
        "blk.0.attn_q.weight",
        "blk.1.ffn_down.weight",
        "token_embd.weight",
        "output.weight",
    ] {
        assert_eq!(info(name).ggml_dtype, GgmlDType::Q8_0, "{name}");
    }
    for name in [
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.bias",
        "output_norm.bias",
        "output.bias",
    ] {
        assert_eq!(info(name).ggml_dtype, GgmlDType::F32, "{name}");
    }
    assert_eq!(info("blk.0.ffn_up.weight").shape.dims(), [256, 64]);
}

/// Writes `src` as a GGUF of `dtype` and checks it loads to the same logits as quantizing on load.
fn quantized_round_trip(name: &str, src: &Path, dtype: WeightDType) -> Engine {
    let dir = scratch(name);
    let out = dir.join("model.gguf");
    let summary = gguf::write(&files(src), &out, dtype).expect("writes");
    eprintln!(
        "{name}: {:?}, kept f32: {:?}",
        summary.by_type, summary.kept_dense
    );
    let same = dir.join("same-quantization");
    std::fs::create_dir_all(&same).expect("folder");
    let quantized = dtype.quantized().expect("a quantized dtype");
    with_quantized_embedding(src, &same, quantized);
    let on_load = Engine::load(&files(&same), &Device::Cpu, dtype).expect("loads");
    let from_gguf = load_gguf(&out);
    let diff = max_abs_diff(&from_gguf, &on_load);
    eprintln!("{name}: GGUF vs quantize-on-load: max |logit diff| {diff:e}");
    assert!(diff <= 1e-4, "{name}: {diff}");
    from_gguf
}

#[test]
fn q8_0_round_trip_equals_quantize_on_load() {
    quantized_round_trip("q8_0-tiny", &fixture_dir(), WeightDType::Q8_0);
    let h256 = scratch("q8_0-h256-model");
    random_model(&h256, 256, 2, 1);
    quantized_round_trip("q8_0-h256", &h256, WeightDType::Q8_0);
}

#[test]
fn q4k_round_trip_equals_quantize_on_load() {
    let h256 = scratch("q4k-h256-model");
    random_model(&h256, 256, 2, 2);
    let from_gguf = quantized_round_trip("q4k-h256", &h256, WeightDType::Q4K);
    let f32_model = Engine::load(&files(&h256), &Device::Cpu, WeightDType::F32).expect("loads");
    eprintln!(
        "q4k-h256 vs f32: max |logit diff| {:e}",
        max_abs_diff(&from_gguf, &f32_model)
    );
}

/// candle's published Phi-1 files: `layers.0.wte`, `layers.{N+1}.{ln,mixer.Wqkv,mixer.out_proj,
/// mlp.fc1,mlp.fc2}`, the head at `layers.{L+1}.{ln,linear}`, Q,K,V fused by rows, no metadata.
fn write_mixformer(src: &Path, out: &Path, layers: usize, dtype: GgmlDType) {
    let st = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("loads");
    let get = |name: String| st[&name].clone();
    let mut tensors: Vec<(String, Tensor)> = vec![(
        "layers.0.wte.weight".into(),
        get("model.embed_tokens.weight".into()),
    )];
    for layer in 0..layers {
        let (p, block) = (format!("model.layers.{layer}"), format!("layers.{}", layer + 1));
        for kind in ["weight", "bias"] {
            let qkv = ["q_proj", "k_proj", "v_proj"].map(|m| get(format!("{p}.self_attn.{m}.{kind}")));
            tensors.push((
                format!("{block}.mixer.Wqkv.{kind}"),
                Tensor::cat(&qkv, 0).expect("cat"),
            ));
            tensors.push((
                format!("{block}.ln.{kind}"),
                get(format!("{p}.input_layernorm.{kind}")),
            ));
            tensors.push((
                format!("{block}.mixer.out_proj.{kind}"),
                get(format!("{p}.self_attn.dense.{kind}")),
            ));
            tensors.push((
                format!("{block}.mlp.fc1.{kind}"),
                get(format!("{p}.mlp.fc1.{kind}")),
            ));
            tensors.push((
                format!("{block}.mlp.fc2.{kind}"),
                get(format!("{p}.mlp.fc2.{kind}")),
            ));
        }
    }
    let head = format!("layers.{}", layers + 1);
    for kind in ["weight", "bias"] {
        tensors.push((
            format!("{head}.ln.{kind}"),
            get(format!("model.final_layernorm.{kind}")),
        ));
        tensors.push((format!("{head}.linear.{kind}"), get(format!("lm_head.{kind}"))));
    }
    let qtensors: Vec<(String, QTensor)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let dtype = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
            (name, QTensor::quantize(&t, dtype).expect("quantizes"))
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out).expect("creates");
    gguf_file::write(&mut file, &[], &refs).expect("candle writes it");
}

#[test]
fn mixformer_names_load_to_the_same_logits() {
    let dir = scratch("mixformer");
    random_model(&dir, 256, 2, 3);
    let f32_file = dir.join("mixformer-f32.gguf");
    write_mixformer(&dir, &f32_file, 2, GgmlDType::F32);
    let from_safetensors = Engine::load(&files(&dir), &Device::Cpu, WeightDType::F32).expect("loads");
    let diff = max_abs_diff(&load_gguf(&f32_file), &from_safetensors);
    eprintln!("mixformer f32 vs safetensors: max |logit diff| {diff:e}");
    assert!(diff <= 1e-5, "{diff}");

    // A quantized fused Wqkv split by rows is the same as quantizing Q, K and V apart.
    let q8_file = dir.join("mixformer-q8_0.gguf");
    write_mixformer(&dir, &q8_file, 2, GgmlDType::Q8_0);
    let same = scratch("mixformer-same-quantization");
    with_quantized_embedding(&dir, &same, GgmlDType::Q8_0);
    let on_load = Engine::load(&files(&same), &Device::Cpu, WeightDType::Q8_0).expect("loads");
    let diff = max_abs_diff(&load_gguf(&q8_file), &on_load);
    eprintln!("mixformer q8_0 vs quantize-on-load: max |logit diff| {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}

/// Reads `src` with candle, lets `edit` change it, writes it back with candle's writer.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, QTensor)>, &mut Vec<(String, Value)>),
) {
    let mut reader = std::fs::File::open(src).expect("opens");
    let content = gguf_file::Content::read(&mut reader).expect("reads");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut reader, n, &Device::Cpu).expect("tensor"),
            )
        })
        .collect();
    let mut metadata: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    edit(&mut tensors, &mut metadata);
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(dst).expect("creates");
    gguf_file::write(&mut file, &meta_refs, &refs).expect("writes");
}

#[test]
fn damaged_files_give_one_line_errors_naming_the_file() {
    let dir = scratch("damaged");
    let good = dir.join("good.gguf");
    gguf::write(&files(&fixture_dir()), &good, WeightDType::F32).expect("writes");
    let bytes = std::fs::read(&good).expect("reads");

    // Our writer's output survives candle's writer: the edits below are the only difference.
    let copy = dir.join("copy.gguf");
    rewrite(&good, &copy, |_, _| {});
    load_gguf(&copy);

    for (name, len) in [
        ("half.gguf", bytes.len() / 2),
        ("header.gguf", 100),
        ("tiny.gguf", 3),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &bytes[..len]).expect("writes");
        let message = load_error(&path);
        assert!(message.contains("truncated"), "{message}");
    }

    let missing = dir.join("missing.gguf");
    rewrite(&good, &missing, |tensors, _| {
        tensors.retain(|(n, _)| n != "blk.1.ffn_down.weight")
    });
    let message = load_error(&missing);
    assert!(
        message.contains("blk.1.ffn_down.weight") && message.contains("missing"),
        "{message}"
    );

    let wrong_shape = dir.join("wrong-shape.gguf");
    rewrite(&good, &wrong_shape, |tensors, _| {
        let zeros = Tensor::zeros((128, 64), candle_core::DType::F32, &Device::Cpu).expect("zeros");
        for (name, tensor) in tensors.iter_mut() {
            if name == "blk.0.ffn_up.weight" {
                *tensor = QTensor::quantize(&zeros, GgmlDType::F32).expect("tensor");
            }
        }
    });
    let message = load_error(&wrong_shape);
    assert!(
        message.contains("blk.0.ffn_up.weight") && message.contains("shape"),
        "{message}"
    );

    let wrong_metadata = dir.join("wrong-metadata.gguf");
    rewrite(&good, &wrong_metadata, |_, metadata| {
        for (key, value) in metadata.iter_mut() {
            if key == "phi2.feed_forward_length" {
                *value = Value::U32(512);
            }
        }
    });
    let message = load_error(&wrong_metadata);
    assert!(
        message.contains("ffn_up") && message.contains("shape"),
        "{message}"
    );

    let not_phi = dir.join("llama.gguf");
    rewrite(&good, &not_phi, |_, metadata| {
        for (key, value) in metadata.iter_mut() {
            if key == "general.architecture" {
                *value = Value::String("llama".into());
            }
        }
    });
    let message = load_error(&not_phi);
    assert!(message.contains("phi2"), "{message}");
}

/// Files crafted to make a trusting reader panic, divide by zero or allocate terabytes.
#[test]
fn hostile_headers_are_errors_not_panics() {
    let dir = scratch("hostile");
    let good = dir.join("good.gguf");
    gguf::write(&files(&fixture_dir()), &good, WeightDType::F32).expect("writes");

    let zero_alignment = dir.join("alignment-0.gguf");
    rewrite(&good, &zero_alignment, |_, metadata| {
        metadata.push(("general.alignment".into(), Value::U32(0)));
    });
    let message = load_error(&zero_alignment);
    assert!(message.contains("general.alignment"), "{message}");

    // The rotary tables hold every position: a huge context length must not allocate them.
    let huge_context = dir.join("context.gguf");
    rewrite(&good, &huge_context, |_, metadata| {
        for (key, value) in metadata.iter_mut() {
            if key == "phi2.context_length" {
                *value = Value::U64(1 << 40);
            }
        }
    });
    let message = load_error(&huge_context);
    assert!(message.contains("context_length"), "{message}");

    let header = |n_kv: u64, tail: &[u8]| {
        let mut bytes = Vec::new();
        bytes.extend(0x4655_4747u32.to_le_bytes());
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(n_kv.to_le_bytes());
        bytes.extend(tail);
        bytes
    };
    let tensor = |dims: &[u64], offset: u64| {
        let mut bytes = Vec::new();
        bytes.extend(17u64.to_le_bytes());
        bytes.extend(b"token_embd.weight");
        bytes.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            bytes.extend(d.to_le_bytes());
        }
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(offset.to_le_bytes());
        bytes.resize(bytes.len() + 64, 0);
        bytes
    };
    let cases: [(&str, Vec<u8>); 4] = [
        ("huge-dims.gguf", header(0, &tensor(&[1 << 40, 1 << 40], 0))),
        ("overflowing-dims.gguf", header(0, &tensor(&[u64::MAX, 3], 0))),
        ("far-offset.gguf", header(0, &tensor(&[64, 2], u64::MAX - 8))),
        // A string array that claims 2^40 elements in a file of a few bytes.
        ("huge-array.gguf", {
            let mut kv = Vec::new();
            kv.extend(3u64.to_le_bytes());
            kv.extend(b"key");
            kv.extend(9u32.to_le_bytes());
            kv.extend(8u32.to_le_bytes());
            kv.extend((1u64 << 40).to_le_bytes());
            header(1, &kv)
        }),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("writes");
        let message = load_error(&path);
        eprintln!("{name}: {message}");
    }
}
