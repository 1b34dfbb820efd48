//! The completion policy on a scripted backend, without a model: what a forget leaves, the
//! speculation waiting for a generation, alternatives and manual-only mode.

use super::*;
use crate::settings::ModelSpec;
use phi_engine::{GenerationStats, StopReason};
use tokio::sync::oneshot;

/// A backend that answers every request with `text` once the test opens its gate, and
/// remembers the prompts it was asked for.
struct Scripted {
    text: String,
    gates: Mutex<Vec<oneshot::Sender<()>>>,
    prompts: Mutex<Vec<String>>,
}

impl Scripted {
    fn new(text: &str) -> Arc<Self> {
        Arc::new(Scripted {
            text: text.into(),
            gates: Mutex::default(),
            prompts: Mutex::default(),
        })
    }

    fn open_gates(&self) {
        for gate in lock(&self.gates).drain(..) {
            let _ = gate.send(());
        }
    }

    fn prompts(&self) -> Vec<String> {
        lock(&self.prompts).clone()
    }
}

impl Backend for Scripted {
    fn start(&self, mut request: GenerationRequest) -> Pending {
        let (tx, rx) = oneshot::channel();
        let (gate, opened) = oneshot::channel();
        lock(&self.gates).push(gate);
        lock(&self.prompts).push(request.prompt.clone());
        let text = self.text.clone();
        tokio::spawn(async move {
            if opened.await.is_ok() {
                (request.stop)(&text);
                let _ = tx.send(Ok(Some(Generated {
                    healed: None,
                    prompt: Some(request.prompt.clone()),
                    text,
                    stop: StopReason::EndOfText,
                    stats: GenerationStats::default(),
                })));
            }
        });
        Pending::new(rx, ())
    }

    fn speculates(&self) -> bool {
        true
    }
}

use backend::GenerationRequest;

fn settings() -> Settings {
    Settings::new(ModelSpec {
        model: "scripted".into(),
        tokenizer: None,
        device: "cpu".into(),
        dtype: "f32".into(),
        backend: "local".into(),
    })
}

const KEY: &str = "file:///a.py";

async fn ask(completions: &Completions, rope: &Rope, backend: &Arc<Scripted>) -> Option<String> {
    ask_with(completions, rope, backend, Trigger::Automatic, &settings()).await
}

async fn ask_with(
    completions: &Completions,
    rope: &Rope,
    backend: &Arc<Scripted>,
    trigger: Trigger,
    settings: &Settings,
) -> Option<String> {
    let request = Request {
        key: KEY,
        rope,
        cursor: rope.len_chars(),
        place: Place::default(),
        trigger,
        settings,
        workspace: &Workspace::default(),
    };
    let backend: Arc<dyn Backend> = backend.clone();
    completions
        .suggest(request, Some(backend))
        .await
        .expect("answers")
}

/// What a request computed while everything was forgotten (a new model loaded meanwhile) is
/// answered but not kept: typing through it asks the backend again.
#[tokio::test(start_paused = true)]
async fn an_answer_from_before_forget_all_is_not_typed_through() {
    let completions = Arc::new(Completions::new(None));
    let backend = Scripted::new("total = 0\n");
    let rope = Rope::from_str("def f(xs):\n    ");
    let asking = {
        let (completions, rope, backend) = (completions.clone(), rope.clone(), backend.clone());
        tokio::spawn(async move { ask(&completions, &rope, &backend).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(backend.prompts().len(), 1);
    completions.forget_all();
    backend.open_gates();
    assert_eq!(asking.await.expect("joins").as_deref(), Some("total = 0"));

    let typed = Rope::from_str("def f(xs):\n    tot");
    let answering = {
        let (completions, backend) = (completions.clone(), backend.clone());
        tokio::spawn(async move { ask(&completions, &typed, &backend).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(backend.prompts().len(), 2, "computed afresh, not typed through");
    backend.open_gates();
    answering.await.expect("joins");
}

/// A request that comes after an answer keeps the speculation for the old place from starting
/// while its own generation runs (it would supersede it); once its answer is out and the user
/// is idle, the speculation for the new place starts.
#[tokio::test(start_paused = true)]
async fn the_speculation_waits_for_the_generation_in_progress() {
    let completions = Arc::new(Completions::new(None));
    let backend = Scripted::new("total = 0\n");
    let first = Rope::from_str("def f(xs):\n    ");
    let asking = {
        let (completions, first, backend) = (completions.clone(), first.clone(), backend.clone());
        tokio::spawn(async move { ask(&completions, &first, &backend).await })
    };
    tokio::task::yield_now().await;
    backend.open_gates();
    assert_eq!(asking.await.expect("joins").as_deref(), Some("total = 0"));
    // The next request, elsewhere, while the model works on it.
    let second = Rope::from_str("def g(ys):\n    ");
    let answering = {
        let (completions, backend) = (completions.clone(), backend.clone());
        tokio::spawn(async move { ask(&completions, &second, &backend).await })
    };
    tokio::time::sleep(SPECULATE_AFTER_IDLE * 4).await;
    let prompts = backend.prompts();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
    assert!(prompts[1].starts_with("def g"), "{prompts:?}");
    backend.open_gates();
    answering.await.expect("joins");
    // Once that answer is out and the user is idle, its speculation starts.
    tokio::time::sleep(SPECULATE_AFTER_IDLE * 4).await;
    let prompts = backend.prompts();
    assert_eq!(prompts.len(), 3, "{prompts:?}");
    assert_eq!(prompts[2], "def g(ys):\n    total = 0");
}

/// Alternatives that say nothing new are dropped, and sampling gives up after
/// `2 × (alternatives − 1)` tries: a backend whose every sample is the greedy text offers that
/// one alone, after four samples for the default of three. Each sample is the same prompt on
/// the same key, with seeds 1, 2, ...; an automatic request samples nothing.
#[tokio::test(start_paused = true)]
async fn alternatives_that_repeat_the_greedy_one_are_dropped_after_bounded_tries() {
    let completions = Arc::new(Completions::new(None));
    let backend = Scripted::new("total = 0\n");
    let rope = Rope::from_str("def f(xs):\n    ");
    let settings = settings();
    assert_eq!(settings.alternatives, 3);
    let asking = {
        let (completions, rope, backend, settings) = (
            completions.clone(),
            rope.clone(),
            backend.clone(),
            settings.clone(),
        );
        tokio::spawn(async move {
            let first = ask_with(&completions, &rope, &backend, Trigger::Invoked, &settings)
                .await
                .expect("a suggestion");
            let request = Request {
                key: KEY,
                rope: &rope,
                cursor: rope.len_chars(),
                place: Place::default(),
                trigger: Trigger::Invoked,
                settings: &settings,
                workspace: &Workspace::default(),
            };
            let dyn_backend: Arc<dyn Backend> = backend.clone();
            completions.alternatives(request, Some(dyn_backend), first).await
        })
    };
    while !asking.is_finished() {
        tokio::task::yield_now().await;
        backend.open_gates();
    }
    let offered = asking.await.expect("joins");
    assert_eq!(offered, ["total = 0"]);
    let prompts = backend.prompts();
    assert_eq!(prompts.len(), 1 + 4, "{prompts:?}");
    assert!(
        prompts.iter().all(|p| p == &prompts[0]),
        "the same prompt each time"
    );
    assert_eq!(completions.last().expect("recorded").alternatives, 1);

    // An automatic request: the greedy one alone, nothing sampled.
    let request = Request {
        key: KEY,
        rope: &rope,
        cursor: rope.len_chars(),
        place: Place::default(),
        trigger: Trigger::Automatic,
        settings: &settings,
        workspace: &Workspace::default(),
    };
    let dyn_backend: Arc<dyn Backend> = backend.clone();
    let single = completions
        .alternatives(request, Some(dyn_backend), "total = 0".into())
        .await;
    assert_eq!(single, ["total = 0"]);
    assert_eq!(backend.prompts().len(), 5);
}

/// Manual-only (`automatic` off): an automatic request runs no model and answers nothing; an
/// invoked one generates; typing through its answer is still served (automatic requests, no
/// model work), and nothing is speculated while the user is idle.
#[tokio::test(start_paused = true)]
async fn manual_only_mode_runs_the_model_for_invoked_requests_alone() {
    let completions = Arc::new(Completions::new(None));
    let backend = Scripted::new("total = 0\n");
    let mut manual = settings();
    manual.automatic = false;
    let rope = Rope::from_str("def f(xs):\n    ");
    let automatic = ask_with(&completions, &rope, &backend, Trigger::Automatic, &manual).await;
    assert_eq!(automatic, None);
    assert!(
        backend.prompts().is_empty(),
        "no generation for an automatic request"
    );
    assert_eq!(completions.last().expect("recorded").stop, "manual");

    let asking = {
        let (completions, rope, backend, manual) =
            (completions.clone(), rope.clone(), backend.clone(), manual.clone());
        tokio::spawn(async move { ask_with(&completions, &rope, &backend, Trigger::Invoked, &manual).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(backend.prompts().len(), 1, "an invoked request generates");
    backend.open_gates();
    assert_eq!(asking.await.expect("joins").as_deref(), Some("total = 0"));

    // Typing through it, as the client asks by itself: served from the suggestion shown.
    let typed = Rope::from_str("def f(xs):\n    tot");
    let rest = ask_with(&completions, &typed, &backend, Trigger::Automatic, &manual).await;
    assert_eq!(rest.as_deref(), Some("al = 0"));
    assert_eq!(completions.last().expect("recorded").stop, "typed-through");
    // Idle: no speculation starts.
    tokio::time::sleep(SPECULATE_AFTER_IDLE * 4).await;
    assert_eq!(backend.prompts().len(), 1, "{:?}", backend.prompts());
    assert_eq!(completions.speculation_state(), "none");
}
