//! The completion policy, in plain types (no LSP): what to answer at a cursor. In order, a request
//! is served by typing through the suggestion last shown, by the speculation computed for it while
//! the user was idle, by the generation still running for the same place, or by a fresh generation
//! from the [`Backend`]. A generation answers as soon as its first line is complete (or at the
//! deadline, with what it has) and goes on growing in the background until the block ends; once it
//! ends, the suggestion for the text as it will be once this one is accepted is speculated.
//!
//! Its state (what was shown, the speculation, the last completion's cost) sits behind one lock,
//! never held across an `await`.
//!
//! - [`prompt`]: the prompt window and its fitting to the context.
//! - [`structure`]: the imports and enclosing headers above the window.
//! - [`neighbours`]: what this file imports from the other open documents, as [`stubs`].
//! - [`prepared`]: one completion's window, generation request and post-processing.
//! - [`postprocess`]: the Python stop rules and trimming.
//! - [`backend`]: the one trait local and remote generation sit behind.
//! - [`growth`]: a suggestion whose generation goes on after its first answer.

pub mod backend;
pub mod growth;
pub mod lines;
pub mod neighbours;
pub mod postprocess;
pub mod prepared;
pub mod prompt;
pub mod structure;
pub mod stubs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ropey::Rope;
use serde::Serialize;

use tokio::sync::mpsc;

use crate::settings::Settings;
use backend::{Backend, BackendError, Cancel, Generated, Pending};
use growth::{Finished, Grew, Growth, Place};
pub use neighbours::{OpenDocument, Workspace};
use prepared::Prepared;
use prompt::PromptWindow;

/// How long the user must be idle after a suggestion before the next one is computed: a keystroke
/// arriving while the model thread works on a speculation waits for the token in progress.
const SPECULATE_AFTER_IDLE: Duration = Duration::from_millis(250);

/// What the last completion cost, for `phi-lsp/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LastCompletion {
    pub uri: String,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt-lookup drafts verified while decoding, and how many of them greedy chose.
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    /// Served by typing through the previous suggestion, by the speculation or by the generation
    /// still running for this place: no new model work.
    pub from_cache: bool,
    /// Why the generation stopped (`EndOfText`, `Predicate`, ...), or what served the answer
    /// instead: `typed-through`, `speculated`, `running-generation`; `growing` when the answer went
    /// out while the generation goes on. When no suggestion came: `not-ready` (no model loaded
    /// yet), `no-prompt` (nothing before the cursor), `empty` (post-processing left nothing),
    /// `cancelled` (a newer request cut it short), `failed` (the model or the remote server
    /// failed), `manual` (an automatic request with automatic suggestions off).
    pub stop: String,
    /// The text token healing dropped from the end of the prompt and the model wrote again
    /// (`None`: not healed, or no model work).
    pub healed: Option<String>,
    /// The prompt exactly as the model got it: the text before the cursor from the window's start,
    /// fitted to `contextTokens`, without `healed` (`None`: no model work for this request).
    pub prompt: Option<String>,
    /// Suggestions offered to this explicit request, the greedy one among them (0: not an
    /// explicit request with `alternatives` above 1, or nothing to suggest).
    pub alternatives: usize,
}

/// The temperature and nucleus (top-p) the alternatives are sampled with: varied enough to write
/// something else, close enough to the model's choice to stay plausible code.
pub const ALTERNATIVE_SAMPLING: (f64, f64) = (0.8, 0.95);

/// Why the client asked (LSP's `triggerKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// The user asked explicitly (a trigger key, a command).
    Invoked,
    /// The client asked by itself, as the user typed or paused.
    #[default]
    Automatic,
}

/// A completion request at `cursor` (a char index) of `rope`, the text of the document `key`.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub key: &'a str,
    pub rope: &'a Rope,
    pub cursor: usize,
    /// The cursor as the client named it, for the growth notifications.
    pub place: Place,
    /// With `settings.automatic` off, an automatic request runs no model: it is answered only by
    /// typing through the suggestion shown.
    pub trigger: Trigger,
    pub settings: &'a Settings,
    /// The open documents (a snapshot: no lock is held) and the workspace roots.
    pub workspace: &'a Workspace,
}

/// The suggestion last shown for a document, for typing through it.
struct Shown {
    start_char: usize,
    before: String,
    after: String,
    suggestion: String,
    /// The suggestion's generation when it may still grow: typing through serves its latest text.
    growth: Option<Growth>,
    /// The other suggestions offered with it (an explicit request's alternatives): typing through
    /// one of them is served too.
    alternatives: Vec<String>,
}

impl Shown {
    fn suggestion(&self) -> String {
        self.growth
            .as_ref()
            .and_then(Growth::suggestion)
            .unwrap_or_else(|| self.suggestion.clone())
    }
}

/// The generation of the last fresh answer, kept running after that answer. At most one at a time:
/// a fresh generation anywhere, or an edit that does not type through it, cancels it (dropping the
/// guard).
struct Growing {
    key: String,
    window: PromptWindow,
    /// The document and cursor it was asked for, to tell typing through it from other edits.
    rope: Rope,
    cursor: usize,
    growth: Growth,
    cancel: Box<dyn Cancel>,
}

/// The suggestion for the text as it will be once the one just shown is accepted, computed while
/// the user is idle. Any other request cancels it (dropping the pending generation).
struct Speculation {
    key: String,
    window: PromptWindow,
    pending: Pending,
}

#[derive(Default)]
struct State {
    shown: HashMap<String, Shown>,
    /// Completion requests so far: a speculation starts only if none came while it waited.
    requests: u64,
    speculation: Option<Speculation>,
    /// By document. Progressive answers keep one at a time: each fresh generation cancels the rest.
    growing: HashMap<String, Growing>,
    last: Option<LastCompletion>,
    /// Counts [`Completions::forget_all`]: what a request started before one computes is not kept.
    epoch: u64,
}

#[derive(Default)]
pub struct Completions {
    state: Arc<Mutex<State>>,
    /// Where growth notifications go (the server sends them to clients that declared support).
    events: Option<mpsc::UnboundedSender<Grew>>,
}

/// Locks a mutex whose data stays valid even if a holder panicked (every critical section here
/// leaves the data consistent).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Completions {
    /// `events` receives a [`Grew`] each time a suggestion that has been answered grows.
    pub fn new(events: Option<mpsc::UnboundedSender<Grew>>) -> Self {
        Completions {
            state: Arc::default(),
            events,
        }
    }

    /// The suggestion for `request`: typed through from the last one, speculated, or generated by
    /// `backend`; `None` when there is nothing to suggest or no backend is ready.
    pub async fn suggest(
        &self,
        request: Request<'_>,
        backend: Option<Arc<dyn Backend>>,
    ) -> Result<Option<String>, BackendError> {
        let started = Instant::now();
        let Request {
            key,
            rope,
            cursor,
            place,
            trigger,
            settings,
            workspace,
        } = request;
        // An explicit request that will offer alternatives answers with the whole greedy
        // suggestion (cut at `deadlineMs`), not its first line: the alternatives are sampled on
        // the same slot once it has ended, and a client that asked explicitly waits for them.
        let whole;
        let settings = if trigger == Trigger::Invoked && settings.alternatives > 1 && settings.progressive {
            whole = Settings {
                progressive: false,
                ..settings.clone()
            };
            &whole
        } else {
            settings
        };
        let prepared = prepared::prepare(key, rope, cursor, workspace, settings);
        let epoch = lock(&self.state).epoch;

        if let Some((rest, stop)) = self.type_through(key, &prepared) {
            self.record(LastCompletion {
                uri: key.to_string(),
                total_ms: elapsed_ms(started),
                from_cache: true,
                stop: stop.into(),
                ..Default::default()
            });
            return Ok(Some(rest));
        }
        let nothing = |stop: &str| LastCompletion {
            uri: key.to_string(),
            total_ms: elapsed_ms(started),
            stop: stop.into(),
            ..Default::default()
        };
        // Manual-only: what the client asks by itself gets no model work. The suggestion shown is
        // kept, so that typing through it (or accepting part of it) is still served above.
        if trigger == Trigger::Automatic && !settings.automatic {
            self.record(nothing("manual"));
            return Ok(None);
        }
        let speculated = self.speculated(key, &prepared).await;
        let Some(backend) = backend else {
            self.record(nothing("not-ready"));
            return Ok(None);
        };
        if prepared.window.text.is_empty() {
            self.record(nothing("no-prompt"));
            return Ok(None);
        }
        if let Some(speculated) = speculated {
            let Some(generated) = speculated else {
                self.record(nothing("cancelled"));
                return Ok(None);
            };
            let suggestion = prepared.suggestion(&generated.text);
            let mut last = last_of(key, &generated.stats, started);
            last.from_cache = true;
            last.stop = match suggestion {
                Some(_) => "speculated".into(),
                None => "empty".into(),
            };
            last.healed = generated.healed.clone();
            last.prompt = generated.prompt.clone();
            self.record(last);
            self.show(epoch, key, &prepared, &suggestion, None);
            if let (Some(text), true) = (&suggestion, speculates(settings, &backend)) {
                let at = At {
                    key,
                    rope,
                    cursor,
                    workspace,
                };
                speculate(&self.state, backend, at, text, settings);
            }
            return Ok(suggestion);
        }

        let deadline = Instant::now() + Duration::from_millis(settings.deadline_ms);
        let (growth, from_cache) = match self.running_generation(key, &prepared) {
            Some(growth) => (growth, true),
            None => {
                let at = At {
                    key,
                    rope,
                    cursor,
                    workspace,
                };
                (
                    self.generate(epoch, backend, at, place, &prepared, settings),
                    false,
                )
            }
        };
        // Without progressive answers, a request given up (cancelled by the client) takes its
        // generation with it, as before; a progressive one keeps going for the next request there.
        let abandon = (!settings.progressive && !from_cache).then(|| Abandon {
            state: self.state.clone(),
            growth: growth.clone(),
        });
        let snapshot = growth.first_answer(deadline, !settings.progressive).await;
        std::mem::forget(abandon);
        let mut last = last_of(key, &snapshot.stats, started);
        last.from_cache = from_cache;
        last.healed = snapshot.healed.clone();
        last.prompt = snapshot.prompt.clone();
        let empty = snapshot.suggestion.is_none();
        last.stop = match &snapshot.finished {
            Some(Finished::Failed(e)) => {
                last.stop = "failed".into();
                self.record(last);
                return Err(e.clone());
            }
            // Cut short by a newer request: that request's answer is the one that counts.
            Some(Finished::CutShort) => {
                last.stop = "cancelled".into();
                self.record(last);
                return Ok(None);
            }
            Some(Finished::Ended { .. }) if empty => "empty".into(),
            _ if from_cache => "running-generation".into(),
            None => "growing".into(),
            Some(Finished::Ended { reason }) => reason.clone(),
        };
        self.record(last);
        let suggestion = snapshot.suggestion;
        let growth = (!growth.is_finished()).then_some(growth);
        self.show(epoch, key, &prepared, &suggestion, growth);
        Ok(suggestion)
    }

    /// The generation running (or ended by itself) for exactly this place, if it is still kept. One
    /// that failed or was cut short is not served again: the request computes afresh.
    fn running_generation(&self, key: &str, prepared: &Prepared) -> Option<Growth> {
        let state = lock(&self.state);
        let growing = state.growing.get(key)?;
        let usable = matches!(growing.growth.finished(), None | Some(Finished::Ended { .. }));
        (usable && growing.key == key && growing.window == prepared.window).then(|| growing.growth.clone())
    }

    /// Starts a fresh generation for `prepared`, which replaces (cancels) any other one, and keeps
    /// it growing until it ends (unless everything was forgotten since `epoch`). Once it ends
    /// without being cut short, the next suggestion is speculated.
    fn generate(
        &self,
        epoch: u64,
        backend: Arc<dyn Backend>,
        at: At<'_>,
        place: Place,
        prepared: &Prepared,
        settings: &Settings,
    ) -> Growth {
        let At {
            key,
            rope,
            cursor,
            workspace,
        } = at;
        let growth = Growth::new(prepared.context.clone(), key, place, self.events.clone());
        let mut request = prepared.request(key, settings);
        // Progressive: the deadline bounds the first answer (`Growth::first_answer`), not the
        // growth. Otherwise it bounds the generation, whose end is the answer.
        if settings.progressive {
            request.deadline = None;
        }
        let mut stop_rule = request.stop;
        let publisher = growth.clone();
        request.stop = Box::new(move |text: &str| {
            publisher.publish(text);
            stop_rule(text)
        });
        let reporter = growth.clone();
        request.progress = Some(Box::new(move |stats| reporter.progress(stats)));
        let pending = backend.start(request);
        growth.started(pending.healed(), pending.prompt());
        let (result, cancel) = pending.into_parts();
        {
            let mut state = lock(&self.state);
            if state.epoch != epoch {
                drop(state);
                drop(cancel);
                return growth;
            }
            state.speculation = None;
            if settings.progressive {
                state.growing.clear();
            }
            state.growing.insert(
                key.to_string(),
                Growing {
                    key: key.to_string(),
                    window: prepared.window.clone(),
                    rope: rope.clone(),
                    cursor,
                    growth: growth.clone(),
                    cancel,
                },
            );
        }
        let (state, finisher, context) = (self.state.clone(), growth.clone(), prepared.context.clone());
        let (key, rope, settings) = (key.to_string(), rope.clone(), settings.clone());
        let workspace = workspace.clone();
        tokio::spawn(async move {
            let outcome = result.await.unwrap_or(Err(BackendError::Stopped));
            let ended = matches!(&outcome, Ok(Some(_)));
            finisher.finish(outcome, |text| prepared::suggestion(&context, text));
            if !ended {
                return;
            }
            let final_text = finisher.suggestion();
            {
                let mut state = lock(&state);
                if let Some(shown) = state.shown.get_mut(&key) {
                    if shown.growth.as_ref().is_some_and(|g| g.same(&finisher)) {
                        shown.suggestion = final_text.clone().unwrap_or_default();
                        shown.growth = None;
                    }
                }
            }
            if let (Some(text), true) = (final_text, speculates(&settings, &backend)) {
                let at = At {
                    key: &key,
                    rope: &rope,
                    cursor,
                    workspace: &workspace,
                };
                speculate(&state, backend, at, &text, &settings);
            }
        });
        growth
    }

    /// For an explicit request that [`Completions::suggest`] answered with `first`: up to
    /// `settings.alternatives` distinct suggestions, to cycle through. The greedy one comes first:
    /// once the generation behind it (which shares the document's KV-cache slot) has ended, as it
    /// is then, grown. Then sampled ones ([`ALTERNATIVE_SAMPLING`], seeds 1, 2, ...: the same
    /// request gets the same alternatives), on the same slot, so the prompt is already computed
    /// and each costs only its decode; each is post-processed as the greedy one is and cut to as
    /// many lines as it has (and stopped at about twice its length), and one that says nothing new
    /// is dropped ([`postprocess::distinct`]). All of them share one `deadlineMs` after the greedy
    /// answer; one cut by it is what it has, as a greedy one would be. At most `2 × (alternatives − 1)` are sampled. An automatic request, `alternatives`
    /// 1, a greedy generation still running at that deadline, or a newer request (any of them
    /// supersedes the sampling) leaves what there is, at least `first`. The speculation for
    /// `first` is then started again. Asked again at the same place, or typing through one of
    /// them, the alternatives already offered are served again, without model work.
    pub async fn alternatives(
        &self,
        request: Request<'_>,
        backend: Option<Arc<dyn Backend>>,
        first: String,
    ) -> Vec<String> {
        let Request {
            key,
            rope,
            cursor,
            trigger,
            settings,
            workspace,
            ..
        } = request;
        let wanted = settings.alternatives;
        let Some(backend) = backend.filter(|_| wanted > 1 && trigger == Trigger::Invoked) else {
            return vec![first];
        };
        let deadline = Instant::now() + Duration::from_millis(settings.deadline_ms);
        let prepared = prepared::prepare(key, rope, cursor, workspace, settings);
        let epoch = lock(&self.state).epoch;
        let growing = lock(&self.state).growing.get(key).map(|g| g.growth.clone());
        if let Some(growth) = growing {
            if !growth.ended_by(deadline).await {
                return vec![first];
            }
        }
        // What is shown now, grown to its end.
        let first = self
            .type_through(key, &prepared)
            .map(|(rest, _)| rest)
            .unwrap_or(first);
        // Asked again where they were offered (or typing through them): the same ones, no new work.
        if let Some(rests) = self.shown_alternatives(key, &prepared) {
            let offered = postprocess::distinct(std::iter::once(first).chain(rests), wanted);
            if let Some(last) = lock(&self.state).last.as_mut() {
                last.alternatives = offered.len();
            }
            return offered;
        }
        let lines = first.lines().count().max(1);
        // Sampled text may run on where the greedy one stopped (no line break, no dedent): about
        // twice the greedy one's length is enough for another way to write it.
        let longest = 2 * first.len() + 32;
        let (temperature, top_p) = ALTERNATIVE_SAMPLING;
        let mut candidates = vec![first.clone()];
        for seed in 1..=2 * (wanted as u64 - 1) {
            if Instant::now() >= deadline {
                break;
            }
            {
                let mut state = lock(&self.state);
                if state.epoch != epoch {
                    break;
                }
                // Counts as a request: no speculation starts (or goes on) on the slot meanwhile.
                state.requests += 1;
                state.speculation = None;
            }
            let mut request = prepared.request(key, settings);
            request.deadline = Some(deadline);
            request.sampling = Some(phi_engine::Sampling {
                temperature,
                top_p,
                seed,
            });
            let (mut rule, context, mut seen) = (request.stop, prepared.context.clone(), 0);
            request.stop = Box::new(move |text: &str| {
                if rule(text) || text.len() > longest {
                    return true;
                }
                let newlines = text.matches('\n').count();
                if newlines == seen {
                    return false;
                }
                seen = newlines;
                let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
                postprocess::finish(&context, complete).is_some_and(|s| s.lines().count() >= lines)
            });
            let generated = match backend.start(request).wait().await {
                Ok(Some(generated)) => generated,
                // Superseded by a newer request, or failed: what there is.
                _ => break,
            };
            if let Some(suggestion) = prepared.suggestion(&generated.text) {
                candidates.push(postprocess::first_lines(&suggestion, lines).to_string());
            }
            if postprocess::distinct(candidates.clone(), wanted).len() == wanted {
                break;
            }
        }
        let offered = postprocess::distinct(candidates, wanted);
        {
            let mut state = lock(&self.state);
            if state.epoch == epoch {
                // Kept as the text after the suggestion's own place, as typing through sees it.
                if let Some(shown) = state.shown.get_mut(key) {
                    let window = &prepared.window;
                    let typed = (window.start_char == shown.start_char && window.after == shown.after)
                        .then(|| window.text.strip_prefix(shown.before.as_str()))
                        .flatten();
                    if let Some(typed) = typed {
                        shown.alternatives = offered.iter().skip(1).map(|a| format!("{typed}{a}")).collect();
                    }
                }
                if let Some(last) = state.last.as_mut() {
                    last.alternatives = offered.len();
                }
            }
        }
        if speculates(settings, &backend) && !first.trim().is_empty() {
            let at = At {
                key,
                rope,
                cursor,
                workspace,
            };
            speculate(&self.state, backend, at, &first, settings);
        }
        if offered.is_empty() {
            vec![first]
        } else {
            offered
        }
    }

    /// The rests of the alternatives offered with the suggestion shown, when the cursor is still
    /// at its place or typed through part of them; `None` when none were offered there.
    fn shown_alternatives(&self, key: &str, prepared: &Prepared) -> Option<Vec<String>> {
        let state = lock(&self.state);
        let shown = state.shown.get(key)?;
        let window = &prepared.window;
        if shown.alternatives.is_empty()
            || window.start_char != shown.start_char
            || window.after != shown.after
        {
            return None;
        }
        let typed = window.text.strip_prefix(shown.before.as_str())?;
        Some(
            shown
                .alternatives
                .iter()
                .filter_map(|a| a.strip_prefix(typed))
                .filter(|rest| !rest.trim().is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    fn record(&self, last: LastCompletion) {
        lock(&self.state).last = Some(last);
    }

    /// Records `suggestion` as the one shown in `key`, for typing through it, unless everything
    /// was forgotten since the request started at `epoch`.
    fn show(
        &self,
        epoch: u64,
        key: &str,
        prepared: &Prepared,
        suggestion: &Option<String>,
        growth: Option<Growth>,
    ) {
        let mut state = lock(&self.state);
        if state.epoch != epoch {
            return;
        }
        // With nothing yet (the deadline came first) a growing suggestion is still kept: typing
        // through it starts once it has text.
        if suggestion.is_none() && growth.is_none() {
            state.shown.remove(key);
            return;
        }
        let shown = Shown {
            start_char: prepared.window.start_char,
            before: prepared.window.text.clone(),
            after: prepared.window.after.clone(),
            suggestion: suggestion.clone().unwrap_or_default(),
            growth,
            alternatives: Vec::new(),
        };
        state.shown.insert(key.to_string(), shown);
    }

    /// Document `key` is now `rope`. A growing generation for it survives only an edit that types
    /// through it: its own text, inserted at its cursor; any other edit cancels it.
    pub fn changed(&self, key: &str, rope: &Rope) {
        let mut state = lock(&self.state);
        let Some(growing) = state.growing.get(key) else {
            return;
        };
        if !types_through(growing, rope) {
            // The next request is most likely at the same place: the prompt's prefill may serve it.
            if let Some(growing) = state.growing.remove(key) {
                growing.cancel.release();
            }
        }
    }

    /// The document `key` closed: nothing of it may be served again.
    pub fn forget(&self, key: &str) {
        let mut state = lock(&self.state);
        state.shown.remove(key);
        state.speculation.take_if(|s| s.key == key);
        state.growing.remove(key);
    }

    /// After a new model, backend or settings, no earlier suggestion may be served from memory.
    pub fn forget_all(&self) {
        let mut state = lock(&self.state);
        state.epoch += 1;
        // Counts as a request: a speculation waiting to start is called off.
        state.requests += 1;
        state.shown.clear();
        state.speculation = None;
        state.growing.clear();
    }

    /// `none`, `running` or `ready`, for `phi-lsp/status`.
    pub fn speculation_state(&self) -> &'static str {
        match &lock(&self.state).speculation {
            None => "none",
            Some(s) if s.pending.is_done() => "ready",
            Some(_) => "running",
        }
    }

    pub fn last(&self) -> Option<LastCompletion> {
        lock(&self.state).last.clone()
    }

    /// When the text typed since the last suggestion is a prefix of it, the rest is the answer,
    /// with what served it: `typed-through`, or `running-generation` when nothing was typed and the
    /// suggestion is still growing (the client asking again at the same place).
    fn type_through(&self, key: &str, prepared: &Prepared) -> Option<(String, &'static str)> {
        let state = lock(&self.state);
        let last = state.shown.get(key)?;
        let window = &prepared.window;
        if window.start_char != last.start_char || window.after != last.after {
            return None;
        }
        let typed = window.text.strip_prefix(last.before.as_str())?;
        let suggestion = last.suggestion();
        let rest = std::iter::once(&suggestion)
            .chain(&last.alternatives)
            .find_map(|s| s.strip_prefix(typed).filter(|rest| !rest.trim().is_empty()))?;
        // Nothing typed (the client asking again at the same place) serves the same suggestion.
        let served_by = if typed.is_empty() && last.growth.is_some() {
            "running-generation"
        } else {
            "typed-through"
        };
        (!rest.trim().is_empty()).then(|| (rest.to_string(), served_by))
    }

    /// `Some` when `prepared` is where the speculation was computed for: its generation (waiting for
    /// it if it is still running), or `None` when it failed or a newer request superseded it
    /// meanwhile. Any speculation is used up or cancelled here.
    async fn speculated(&self, key: &str, prepared: &Prepared) -> Option<Option<Generated>> {
        let speculation = {
            let mut state = lock(&self.state);
            state.requests += 1;
            state.speculation.take()?
        };
        if speculation.key != key || speculation.window != prepared.window {
            return None;
        }
        Some(speculation.pending.wait().await.unwrap_or(None))
    }
}

/// Whether to compute the next suggestion while the user is idle: asked for, possible with this
/// backend, and not in manual-only mode (nobody asked for that work).
fn speculates(settings: &Settings, backend: &Arc<dyn Backend>) -> bool {
    settings.speculate && settings.automatic && backend.speculates()
}

/// Where a completion was asked for: document `key`, its text, the cursor and the other documents.
#[derive(Clone, Copy)]
struct At<'a> {
    key: &'a str,
    rope: &'a Rope,
    cursor: usize,
    workspace: &'a Workspace,
}

/// Once the user has been idle for [`SPECULATE_AFTER_IDLE`], starts computing the suggestion for
/// the text as it will be when `suggestion` (at `at`'s cursor) is accepted: the same request a
/// completion there will make, without a deadline (any other request cancels it instead), so its
/// answer is the one a fresh request would compute. Not while a generation still grows.
fn speculate(
    state: &Arc<Mutex<State>>,
    backend: Arc<dyn Backend>,
    at: At<'_>,
    suggestion: &str,
    settings: &Settings,
) {
    let At {
        key,
        rope,
        cursor,
        workspace,
    } = at;
    let workspace = workspace.clone();
    let mut accepted = rope.clone();
    accepted.insert(cursor, suggestion);
    let accepted_cursor = cursor + suggestion.chars().count();
    let (state, key, settings) = (state.clone(), key.to_string(), settings.clone());
    let requests = lock(&state).requests;
    tokio::spawn(async move {
        tokio::time::sleep(SPECULATE_AFTER_IDLE).await;
        // Checked and set under the lock that requests take first, so a request either sees this
        // speculation or stops it from starting (it would supersede the request's job).
        let mut state = lock(&state);
        let growing = state.growing.values().any(|g| !g.growth.is_finished());
        if state.requests != requests || growing {
            return;
        }
        let prepared = prepared::prepare(&key, &accepted, accepted_cursor, &workspace, &settings);
        let mut request = prepared.request(&key, &settings);
        request.deadline = None;
        let pending = backend.start(request);
        state.speculation = Some(Speculation {
            key,
            window: prepared.window,
            pending,
        });
    });
}

/// Cancels a growing generation when dropped, if it is still the one kept.
struct Abandon {
    state: Arc<Mutex<State>>,
    growth: Growth,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.growing.retain(|_, g| !g.growth.same(&self.growth));
    }
}

/// Whether `rope` is the growing generation's document with a prefix of its suggestion typed at
/// its cursor.
fn types_through(growing: &Growing, rope: &Rope) -> bool {
    let (before, cursor) = (&growing.rope, growing.cursor);
    let Some(n_typed) = rope.len_chars().checked_sub(before.len_chars()) else {
        return false;
    };
    let suggestion = growing.growth.suggestion().unwrap_or_default();
    let typed = rope.slice(cursor..cursor + n_typed);
    n_typed <= suggestion.chars().count()
        && typed.chars().eq(suggestion.chars().take(n_typed))
        && rope.slice(..cursor) == before.slice(..cursor)
        && rope.slice(cursor + n_typed..) == before.slice(cursor..)
}

/// `last` for a completion of `key` with `stats`, asked for at `started`.
fn last_of(key: &str, stats: &phi_engine::GenerationStats, started: Instant) -> LastCompletion {
    LastCompletion {
        uri: key.to_string(),
        prompt_tokens: stats.prompt_tokens,
        reused_tokens: stats.reused_tokens,
        prefilled_tokens: stats.prefilled_tokens,
        generated_tokens: stats.generated_tokens,
        drafted_tokens: stats.drafted_tokens,
        accepted_tokens: stats.accepted_tokens,
        prefill_ms: stats.prefill_ms,
        decode_ms: stats.decode_ms,
        total_ms: elapsed_ms(started),
        ..Default::default()
    }
}

fn elapsed_ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests;
