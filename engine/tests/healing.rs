//! Token healing against HF transformers: the healed greedy continuations of the committed
//! fixture (`tests/fixtures/tiny-phi/healing.json`) and the ids the rule allows with the real
//! Phi-1 tokenizer (`tests/fixtures/phi-1-healing.json`), both written by
//! `scripts/make_healing_reference.py`, which implements the rule on its own in Python.

use std::path::{Path, PathBuf};

use phi_engine::{
    generate, Device, Engine, GenerateParams, ModelFiles, PhiTokenizer, Slot, Watch, WeightDType,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    max_new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    prompt_ids: Vec<u32>,
    dropped_id: u32,
    dropped_text: String,
    allowed_first: Vec<u32>,
    tokens: Vec<u32>,
    stopped_at_eos: bool,
    text: String,
    unhealed_tokens: Vec<u32>,
}

#[derive(Deserialize)]
struct Phi1 {
    tokenizer_size: usize,
    allowed: Vec<Allowed>,
    prompts: Vec<Phi1Prompt>,
}

#[derive(Deserialize)]
struct Allowed {
    dropped_text: String,
    dropped_hex: String,
    allowed: Vec<u32>,
}

#[derive(Deserialize)]
struct Phi1Prompt {
    prompt: String,
    ids: Vec<u32>,
    last_id: u32,
    last_text: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load() -> (Engine, Reference) {
    let dir = fixtures().join("tiny-phi");
    let files = ModelFiles::from_dir(&dir, None).expect("fixture folder is complete");
    let engine = Engine::load(&files, &Device::Cpu, WeightDType::F32).expect("fixture loads");
    let text = std::fs::read_to_string(dir.join("healing.json")).expect("healing.json");
    (engine, serde_json::from_str(&text).expect("healing.json parses"))
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn healed_generation_equals_the_transformers_reference() {
    let (engine, reference) = load();
    assert!(reference.cases.len() >= 6);
    for case in &reference.cases {
        let tokenizer = engine.tokenizer.as_ref();
        assert_eq!(tokenizer.encode(&case.prompt).expect("encodes"), case.input_ids);
        assert_eq!(
            tokenizer.token_bytes(case.dropped_id),
            Some(case.dropped_text.as_bytes()),
            "{:?}",
            case.prompt
        );
        assert_eq!(
            tokenizer.healing_ids(case.dropped_text.as_bytes()),
            case.allowed_first,
            "{:?}",
            case.prompt
        );
        let mut slot = Slot::new(&engine.model, 512).expect("slot");
        let params = GenerateParams {
            max_new_tokens: reference.max_new_tokens,
            prefix: case.dropped_text.as_bytes().to_vec(),
            ..Default::default()
        };
        let generation = generate(
            &engine,
            &mut slot,
            &case.prompt_ids,
            &params,
            Watch {
                stop: &mut |_| false,
                cancelled: &|| false,
                keep_prefilling: None,
                progress: None,
            },
        )
        .expect("generates");
        assert_eq!(generation.tokens, case.tokens, "{:?}", case.prompt);
        assert_eq!(generation.text, case.text, "{:?}", case.prompt);
        assert_eq!(
            generation.stop == phi_engine::StopReason::EndOfText,
            case.stopped_at_eos
        );
        // Healing changes the answer: the reference's unhealed greedy tokens are another text.
        assert_ne!(case.tokens, case.unhealed_tokens, "{:?}", case.prompt);
    }
    // At least one case writes the dropped text over several tokens (prefix tokens, then one that
    // starts with the rest).
    assert!(reference.cases.iter().any(|case| {
        let tokenizer = engine.tokenizer.as_ref();
        tokenizer.token_bytes(case.tokens[0]).map(<[u8]>::len) < Some(case.dropped_text.len())
    }));
}

#[test]
fn healing_reuses_the_cache_of_the_prompt_without_its_last_token() {
    let (engine, reference) = load();
    let case = &reference.cases[0];
    let mut slot = Slot::new(&engine.model, 512).expect("slot");
    let run = |slot: &mut Slot, prompt: &[u32], prefix: &[u8]| {
        let params = GenerateParams {
            max_new_tokens: reference.max_new_tokens,
            prefix: prefix.to_vec(),
            ..Default::default()
        };
        let watch = Watch {
            stop: &mut |_| false,
            cancelled: &|| false,
            keep_prefilling: None,
            progress: None,
        };
        generate(&engine, slot, prompt, &params, watch).expect("generates")
    };
    let first = run(&mut slot, &case.prompt_ids, case.dropped_text.as_bytes());
    assert_eq!(first.tokens, case.tokens);
    // The same healed prompt again: all but its last position come from the cache.
    let again = run(&mut slot, &case.prompt_ids, case.dropped_text.as_bytes());
    assert_eq!(again.tokens, case.tokens);
    assert_eq!(again.stats.prefilled_tokens, 1);
    assert_eq!(again.stats.reused_tokens, case.prompt_ids.len() - 1);
}

#[test]
fn phi_1_allowed_ids_equal_the_python_rule() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/phi-1/tokenizer.json");
    let tokenizer = PhiTokenizer::from_file(&path).expect("the Phi-1 tokenizer loads");
    let text = std::fs::read_to_string(fixtures().join("phi-1-healing.json")).expect("phi-1-healing.json");
    let phi1: Phi1 = serde_json::from_str(&text).expect("parses");
    assert_eq!(tokenizer.size(), phi1.tokenizer_size);
    for case in &phi1.allowed {
        let dropped = hex(&case.dropped_hex);
        assert_eq!(dropped, case.dropped_text.as_bytes());
        assert_eq!(
            tokenizer.healing_ids(&dropped),
            case.allowed,
            "{:?}",
            case.dropped_text
        );
        // The end of text is special: never allowed.
        assert!(!case.allowed.contains(&50256));
    }
    // "é" is two bytes; a token of its first byte alone is allowed (a prefix of it).
    let e_acute = phi1
        .allowed
        .iter()
        .find(|c| c.dropped_text == "é")
        .expect("é case");
    assert!(e_acute
        .allowed
        .iter()
        .any(|&id| tokenizer.token_bytes(id) == Some(&[0xC3][..])));
    for prompt in &phi1.prompts {
        assert_eq!(tokenizer.encode(&prompt.prompt).expect("encodes"), prompt.ids);
        assert_eq!(
            tokenizer.token_bytes(prompt.last_id),
            Some(prompt.last_text.as_bytes())
        );
    }
}
