//! The engine against HF transformers: logits at every position and greedy tokens of the committed
//! random checkpoint (`tests/fixtures/tiny-phi`, made by `scripts/make_fixture.py`), then the KV
//! cache against fresh computations over random edit sequences.
//!
//! On the CPU in f32 by default. `PHI_ENGINE_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`, `metal`) and
//! `PHI_ENGINE_TEST_DTYPE` (a `--dtype` name) run them elsewhere, as `scripts/gpu_check.sh` does
//! (a GPU needs the crate's `cuda` or `metal` feature): the logit tolerance holds for f32 only, the
//! greedy tokens are asked of f16 too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use phi_engine::{
    generate, Device, Engine, GenerateParams, ModelFiles, Slot, StopReason, SyncOutcome, Watch, WeightDType,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    eos_token_id: u32,
    tokenizer_size: usize,
    vocab_size: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_tokens: Vec<u32>,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi")
}

/// The device named by `PHI_ENGINE_TEST_DEVICE`, the CPU without it.
fn device() -> Device {
    let name = std::env::var("PHI_ENGINE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        "metal" => Device::new_metal(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Device::new_cuda(ordinal),
            _ => panic!("PHI_ENGINE_TEST_DEVICE={other:?}: use cpu, cuda, cuda:N or metal"),
        },
    };
    device.unwrap_or_else(|e| panic!("PHI_ENGINE_TEST_DEVICE={name}: {e}"))
}

/// The dtype named by `PHI_ENGINE_TEST_DTYPE`, f32 without it.
fn dtype() -> WeightDType {
    match std::env::var("PHI_ENGINE_TEST_DTYPE") {
        Ok(name) => WeightDType::parse(&name)
            .unwrap_or_else(|| panic!("PHI_ENGINE_TEST_DTYPE={name:?}: use {}", WeightDType::NAMES)),
        Err(_) => WeightDType::F32,
    }
}

fn load() -> (Engine, Reference) {
    let dir = fixture_dir();
    let files = ModelFiles::from_dir(&dir, None).expect("fixture folder is complete");
    let engine = Engine::load(&files, &device(), dtype()).expect("fixture loads");
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let reference: Reference = serde_json::from_str(&text).expect("reference parses");
    (engine, reference)
}

fn max_abs_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn never_cancelled() -> bool {
    false
}

#[test]
fn tokenizer_and_sizes_match_the_reference() {
    let (engine, reference) = load();
    assert_eq!(engine.tokenizer.size(), reference.tokenizer_size);
    assert_eq!(engine.tokenizer.eos_id(), Some(reference.eos_token_id));
    assert_eq!(engine.model.config().vocab_size, reference.vocab_size);
    for case in &reference.cases {
        assert_eq!(
            engine.tokenizer.encode(&case.prompt).expect("encodes"),
            case.input_ids
        );
    }
}

#[test]
fn logits_at_every_position_match_transformers() {
    let (engine, reference) = load();
    let mut worst = 0.0f32;
    for case in &reference.cases {
        let mut cache = engine.model.new_cache(512).expect("cache");
        let logits = engine
            .model
            .forward(&case.input_ids, &mut cache, true)
            .expect("forward");
        let logits: Vec<Vec<f32>> = logits.to_vec2().expect("2-d logits");
        assert_eq!(logits.len(), case.logits.len());
        for (pos, (ours, theirs)) in logits.iter().zip(&case.logits).enumerate() {
            let diff = max_abs_diff(ours, theirs);
            assert!(
                diff < TOLERANCE,
                "{:?} position {pos}: max |diff| {diff}",
                case.prompt
            );
            worst = worst.max(diff);
        }
    }
    eprintln!("max |logit - transformers| over every position: {worst:e}");
}

/// A multi-token forward over a non-empty cache (what candle-transformers' phi cannot do).
#[test]
fn chunked_prefill_matches_transformers() {
    let (engine, reference) = load();
    for case in &reference.cases {
        for split in [1, 3, case.input_ids.len() / 2] {
            let mut cache = engine.model.new_cache(512).expect("cache");
            let mut rows: Vec<Vec<f32>> = Vec::new();
            for chunk in [&case.input_ids[..split], &case.input_ids[split..]] {
                let logits = engine.model.forward(chunk, &mut cache, true).expect("forward");
                rows.extend(logits.to_vec2::<f32>().expect("2-d logits"));
            }
            for (pos, (ours, theirs)) in rows.iter().zip(&case.logits).enumerate() {
                let diff = max_abs_diff(ours, theirs);
                assert!(
                    diff < TOLERANCE,
                    "split {split} position {pos}: max |diff| {diff}"
                );
            }
        }
    }
}

#[test]
fn greedy_tokens_match_transformers_generate() {
    let (engine, reference) = load();
    for case in &reference.cases {
        let mut slot = Slot::new(&engine.model, 512).expect("slot");
        let params = GenerateParams {
            max_new_tokens: 16,
            ..Default::default()
        };
        let generation = generate(
            &engine,
            &mut slot,
            &case.input_ids,
            &params,
            Watch {
                stop: &mut |_| false,
                cancelled: &never_cancelled,
                keep_prefilling: None,
                progress: None,
            },
        )
        .expect("generates");
        // transformers keeps a final end-of-text token in its output; we stop before it.
        let mut expected = case.greedy_tokens.clone();
        if expected.last() == Some(&reference.eos_token_id) {
            expected.pop();
            assert_eq!(generation.stop, StopReason::EndOfText);
        }
        assert_eq!(generation.tokens, expected, "{:?}", case.prompt);
        assert_eq!(
            generation.text,
            engine.tokenizer.decode(&expected).expect("decodes")
        );
        assert!(generation
            .tokens
            .iter()
            .all(|&id| (id as usize) < reference.tokenizer_size));
    }
}

/// Last-position logits of `ids` computed from an empty cache.
fn fresh_logits(engine: &Engine, ids: &[u32]) -> Vec<f32> {
    let mut cache = engine.model.new_cache(512).expect("cache");
    let logits = engine.model.forward(ids, &mut cache, false).expect("forward");
    logits.squeeze(0).expect("one row").to_vec1().expect("1-d")
}

enum Edit {
    AppendOne,
    Paste,
    DeleteBack,
    ReplaceMiddle,
    ReplaceAll,
}

fn apply(edit: &Edit, ids: &[u32], rng: &mut StdRng, vocab: u32) -> Vec<u32> {
    let mut random_ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let mut next = ids.to_vec();
    match edit {
        Edit::AppendOne => next.extend(random_ids(1)),
        Edit::Paste => {
            let n = 2 + (ids.len() % 29);
            next.extend(random_ids(n));
        }
        Edit::DeleteBack => {
            let keep = ids.len().saturating_sub(1 + ids.len() / 3);
            next.truncate(keep.max(1));
        }
        Edit::ReplaceMiddle => {
            let at = ids.len() / 2;
            next.truncate(at);
            next.extend(random_ids(3));
            next.extend_from_slice(&ids[at.saturating_add(2).min(ids.len())..]);
        }
        Edit::ReplaceAll => next = random_ids(5 + ids.len() % 17),
    }
    if next.is_empty() {
        next = random_ids(1);
    }
    next.truncate(400);
    next
}

#[test]
fn cache_reuse_equals_a_fresh_cache_over_random_edits() {
    let (engine, reference) = load();
    let vocab = reference.tokenizer_size as u32;
    let edits = [
        Edit::AppendOne,
        Edit::Paste,
        Edit::DeleteBack,
        Edit::ReplaceMiddle,
        Edit::ReplaceAll,
    ];
    let mut checked = 0;
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut slot = Slot::new(&engine.model, 512).expect("slot");
        let mut ids: Vec<u32> = (0..8).map(|_| rng.random_range(0..vocab)).collect();
        for step in 0..40 {
            // Favour typing, as an editor does, but visit every kind of edit.
            let edit = if step < 5 {
                &edits[step]
            } else {
                &edits[rng.random_range(0..12).min(4)]
            };
            let next = apply(edit, &ids, &mut rng, vocab);
            let common = slot.ids().iter().zip(&next).take_while(|(a, b)| a == b).count();
            let before = slot.positions_run();
            let SyncOutcome::Ready(logits, stats) =
                slot.sync(&engine.model, &next, &never_cancelled).expect("sync")
            else {
                panic!("sync was not cancelled");
            };
            let expected_run = (next.len() - common).max(1);
            assert_eq!(stats.prefilled, expected_run, "seed {seed} step {step}");
            assert_eq!(slot.positions_run() - before, expected_run as u64);
            assert_eq!(stats.reused + stats.prefilled, next.len());
            assert_eq!(slot.ids(), &next[..]);
            let ours: Vec<f32> = logits.to_vec1().expect("1-d");
            let diff = max_abs_diff(&ours, &fresh_logits(&engine, &next));
            assert!(diff < TOLERANCE, "seed {seed} step {step}: max |diff| {diff}");
            ids = next;
            checked += 1;
        }
    }
    assert_eq!(checked, 160);
}

#[test]
fn cancelling_mid_generation_leaves_the_slot_consistent() {
    let (engine, reference) = load();
    let case = &reference.cases[0];
    let mut slot = Slot::new(&engine.model, 512).expect("slot");
    let params = GenerateParams {
        max_new_tokens: 16,
        ..Default::default()
    };
    // Cancel once three tokens are generated.
    let tokens = AtomicUsize::new(0);
    let cancel_soon = || tokens.load(Ordering::Relaxed) >= 3;
    let generation = generate(
        &engine,
        &mut slot,
        &case.input_ids,
        &params,
        Watch {
            stop: &mut |_| {
                tokens.fetch_add(1, Ordering::Relaxed);
                false
            },
            cancelled: &cancel_soon,
            keep_prefilling: None,
            progress: None,
        },
    )
    .expect("generates");
    assert_eq!(generation.stop, StopReason::Cancelled);
    assert_eq!(generation.tokens, case.greedy_tokens[..generation.tokens.len()]);
    assert!(generation.tokens.len() < 16);
    // The slot holds the prompt and the tokens it ran; a new prompt reuses them exactly.
    assert!(slot.ids().starts_with(&case.input_ids));
    let mut next = case.input_ids.clone();
    next.extend_from_slice(&case.greedy_tokens[..6]);
    let SyncOutcome::Ready(logits, _) = slot.sync(&engine.model, &next, &never_cancelled).expect("sync")
    else {
        panic!("sync was not cancelled");
    };
    let diff = max_abs_diff(
        &logits.to_vec1::<f32>().expect("1-d"),
        &fresh_logits(&engine, &next),
    );
    assert!(diff < TOLERANCE, "after cancel: max |diff| {diff}");
    // And a cancel during a long prefill, polled before every layer, stops inside the second
    // chunk: the first is kept, the cut one thrown away, the prefix consistent.
    let long: Vec<u32> = (0..300)
        .map(|i| (i * 7 % reference.tokenizer_size) as u32)
        .collect();
    let mut slot = Slot::new(&engine.model, 512).expect("slot");
    let n_layers = engine.model.config().num_hidden_layers;
    let polls = AtomicUsize::new(0);
    let in_the_second_chunk = || polls.fetch_add(1, Ordering::Relaxed) > n_layers;
    let SyncOutcome::Cancelled(stats) = slot
        .sync(&engine.model, &long, &in_the_second_chunk)
        .expect("sync")
    else {
        panic!("a 300-token prefill must see the cancel");
    };
    assert_eq!(
        polls.load(Ordering::Relaxed),
        n_layers + 2,
        "one poll per layer until the cancel"
    );
    assert_eq!(stats.prefilled, phi_engine::generate::PREFILL_CHUNK);
    assert_eq!(slot.ids(), &long[..stats.prefilled]);
}

#[test]
fn a_cancelled_prefill_goes_on_through_the_chunks_a_newer_prompt_shares() {
    let (engine, reference) = load();
    let long: Vec<u32> = (0..300)
        .map(|i| (i * 11 % reference.tokenizer_size) as u32)
        .collect();
    // Cancelled from the start; the newer job's prompt shares the first 290 positions. The chunks
    // are 128, 128, 28 and the last 16 apart (PREFILL_TAIL): the first three are wanted, the tail
    // is not (it runs past 290), so the prefill stops there.
    let shared = 290;
    let mut slot = Slot::new(&engine.model, 512).expect("slot");
    let asked = std::sync::Mutex::new(Vec::new());
    let keep = |prefix: &[u32]| {
        asked.lock().expect("lock").push(prefix.len());
        prefix.len() <= shared && *prefix == long[..prefix.len()]
    };
    let SyncOutcome::Cancelled(stats) = slot
        .sync_serving(&engine.model, &long, &|| true, Some(&keep))
        .expect("sync")
    else {
        panic!("a cancelled job generates nothing");
    };
    let tail = long.len() - phi_engine::generate::PREFILL_TAIL;
    assert_eq!(stats.prefilled, tail, "{:?}", asked.lock());
    assert_eq!(slot.ids(), &long[..tail]);
    // Asked before every layer of each chunk it kept, and once for the tail, which it dropped.
    let n_layers = engine.model.config().num_hidden_layers;
    assert_eq!(asked.lock().expect("lock").len(), 3 * n_layers + 1);
    // What it kept is the real prefix: the newer prompt, run on it, has the logits of a fresh run.
    let mut next = long[..shared].to_vec();
    next.extend_from_slice(&[5, 6, 7]);
    let SyncOutcome::Ready(logits, stats) = slot.sync(&engine.model, &next, &|| false).expect("sync") else {
        panic!("sync was not cancelled");
    };
    assert_eq!(stats.reused, tail);
    let diff = max_abs_diff(
        &logits.to_vec1::<f32>().expect("1-d"),
        &fresh_logits(&engine, &next),
    );
    assert!(diff < TOLERANCE, "max |diff| {diff}");

    // Without keep_prefilling the same cancel stops before the first layer and keeps nothing.
    let mut slot = Slot::new(&engine.model, 512).expect("slot");
    let SyncOutcome::Cancelled(stats) = slot.sync(&engine.model, &long, &|| true).expect("sync") else {
        panic!("cancelled");
    };
    assert_eq!((stats.prefilled, slot.ids().len()), (0, 0));
}
