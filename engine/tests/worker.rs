//! The model thread: jobs, replies, superseding by key, cancellation by dropping the ticket, and
//! slots kept per key within the limit.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use phi_engine::{
    Device, Engine, GenerateParams, Job, JobOutcome, ModelFiles, Prompt, StopReason, WeightDType, Worker,
    WorkerOptions,
};

fn worker(max_slots: usize) -> Worker {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi");
    let files = ModelFiles::from_dir(&dir, None).expect("fixture");
    let engine = Engine::load(&files, &Device::Cpu, WeightDType::F32).expect("loads");
    Worker::spawn(
        engine,
        WorkerOptions {
            max_slots,
            slot_capacity: 512,
        },
    )
    .expect("spawns")
}

fn job(key: &str, prompt: &str, max_new_tokens: usize) -> Job {
    Job {
        key: key.into(),
        prompt: Prompt::Text(prompt.into()),
        params: GenerateParams {
            max_new_tokens,
            ..Default::default()
        },
        stop: None,
        progress: None,
    }
}

fn finished(outcome: JobOutcome) -> phi_engine::Generation {
    match outcome {
        JobOutcome::Finished(generation) => generation,
        JobOutcome::Dropped => panic!("job was dropped"),
    }
}

#[test]
fn same_key_reuses_the_cache_and_other_keys_do_not_mix() {
    let worker = worker(2);
    let first = finished(
        worker
            .submit_and_wait(job("a", "def add(a, b):\n    return a", 4))
            .expect("runs"),
    );
    assert_eq!(first.stats.reused_tokens, 0);
    let second = finished(
        worker
            .submit_and_wait(job("a", "def add(a, b):\n    return a +", 4))
            .expect("runs"),
    );
    assert!(second.stats.reused_tokens > 0, "{:?}", second.stats);
    assert!(second.stats.prefilled_tokens <= 3, "{:?}", second.stats);
    // Another key with the same text starts from nothing: caches are per key.
    let other = finished(
        worker
            .submit_and_wait(job("b", "def add(a, b):\n    return a +", 4))
            .expect("runs"),
    );
    assert_eq!(other.stats.reused_tokens, 0);
    assert_eq!(other.tokens, second.tokens);
    // A third key evicts the least recently used slot ("a"), which then starts over.
    finished(worker.submit_and_wait(job("c", "x = 1\n", 2)).expect("runs"));
    assert_eq!(worker.stats().slots, 2);
    let again = finished(
        worker
            .submit_and_wait(job("a", "def add(a, b):\n    return a +", 4))
            .expect("runs"),
    );
    assert_eq!(again.stats.reused_tokens, 0);
    assert_eq!(again.tokens, second.tokens);
}

#[test]
fn a_newer_job_for_the_same_key_supersedes_the_older() {
    let worker = worker(2);
    // Hold the thread in a job on another key until both jobs for "doc" are queued.
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let mut busy_job = job("busy", "import os\n", 4);
    busy_job.stop = Some(Box::new(move |_: &str| {
        let _ = gate_rx.recv_timeout(Duration::from_secs(10));
        false
    }));
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    let busy = worker.submit(busy_job, Box::new(move |r| drop(tx.send(("busy", r)))));
    let older = worker.submit(
        job("doc", "def f(x):\n", 8),
        Box::new(move |r| drop(tx2.send(("older", r)))),
    );
    let (newer_tx, newer_rx) = mpsc::channel();
    let _newer = worker.submit(
        job("doc", "def f(x):\n    ", 8),
        Box::new(move |r| drop(newer_tx.send(r))),
    );
    drop(gate_tx);
    let newer = newer_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replies")
        .expect("no error");
    let newer = finished(newer);
    assert!(!newer.tokens.is_empty());
    let mut outcomes = std::collections::HashMap::new();
    for _ in 0..2 {
        let (name, result) = rx.recv_timeout(Duration::from_secs(30)).expect("replies");
        outcomes.insert(name, result.expect("no error"));
    }
    assert!(
        matches!(outcomes["older"], JobOutcome::Dropped),
        "the superseded job did not run"
    );
    assert!(matches!(outcomes["busy"], JobOutcome::Finished(_)));
    drop((busy, older));
}

#[test]
fn dropping_the_ticket_cancels_within_a_token() {
    let worker = worker(1);
    let (tx, rx) = mpsc::channel();
    let ticket = worker.submit(
        job("doc", "import os\n", 400),
        Box::new(move |r| drop(tx.send(r))),
    );
    std::thread::sleep(Duration::from_millis(20));
    drop(ticket);
    let outcome = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("replies")
        .expect("no error");
    match outcome {
        JobOutcome::Dropped => {}
        JobOutcome::Finished(generation) => {
            assert_eq!(generation.stop, StopReason::Cancelled);
            assert!(generation.tokens.len() < 400);
        }
    }
    // The slot is still usable and exact afterwards.
    let after = finished(
        worker
            .submit_and_wait(job("doc", "import os\n", 6))
            .expect("runs"),
    );
    let fresh_worker = self::worker(1);
    let fresh = finished(
        fresh_worker
            .submit_and_wait(job("doc", "import os\n", 6))
            .expect("runs"),
    );
    assert_eq!(after.tokens, fresh.tokens);
}

#[test]
fn a_stop_predicate_ends_generation() {
    let worker = worker(1);
    let mut job = job("doc", "def add(a, b):\n", 16);
    job.stop = Some(Box::new(|text: &str| text.len() >= 5));
    let generation = finished(worker.submit_and_wait(job).expect("runs"));
    assert_eq!(generation.stop, StopReason::Predicate);
    assert!(generation.text.len() >= 5);
    assert!(generation.tokens.len() < 16);
}

#[test]
fn forget_frees_the_slot() {
    let worker = worker(3);
    finished(worker.submit_and_wait(job("a", "x = 1\n", 2)).expect("runs"));
    finished(worker.submit_and_wait(job("b", "y = 2\n", 2)).expect("runs"));
    assert_eq!(worker.stats().slots, 2);
    worker.forget("a");
    finished(worker.submit_and_wait(job("b", "y = 2\n", 1)).expect("runs"));
    assert_eq!(worker.stats().slots, 1);
    worker.shutdown();
}

/// Two places far apart in one document (key): each keeps its own slot, so coming back to the
/// first one reuses its cache instead of computing its window again; a place that shares its
/// prefix with a slot's window keeps using that slot.
#[test]
fn places_far_apart_in_one_document_keep_their_own_caches() {
    let worker = worker(3);
    let body = |name: &str| -> String {
        (0..12)
            .map(|i| format!("def {name}_{i}(value):\n    return value * {i} + {}\n\n", i * 3))
            .collect()
    };
    let (top, bottom) = (body("top"), body("bottom"));
    let first = finished(worker.submit_and_wait(job("doc", &top, 2)).expect("runs"));
    assert!(first.stats.prompt_tokens >= 64, "{:?}", first.stats);
    // The user jumps to another window of the same document: a second slot.
    let other = finished(worker.submit_and_wait(job("doc", &bottom, 2)).expect("runs"));
    assert_eq!(other.stats.reused_tokens, 0, "{:?}", other.stats);
    assert_eq!(worker.stats().slots, 2);
    // Back at the first place, one character typed: its cache is still there.
    let back = finished(
        worker
            .submit_and_wait(job("doc", &format!("{top}d"), 2))
            .expect("runs"),
    );
    assert!(back.stats.prefilled_tokens <= 3, "{:?}", back.stats);
    assert_eq!(worker.stats().slots, 2);
    // Forgetting the document frees both.
    worker.forget("doc");
    let after = finished(worker.submit_and_wait(job("x", "x = 1\n", 2)).expect("runs"));
    assert_eq!(after.stats.reused_tokens, 0);
    assert_eq!(worker.stats().slots, 1);
}
