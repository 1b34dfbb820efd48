//! The one thread that owns the model and its slots. Jobs arrive on a channel, each with its own
//! reply; a job whose requester has gone (its [`Ticket`] dropped or released) or that a newer job
//! for the same key superseded is dropped, before it starts or within one token — except that its
//! prefill goes on while it computes positions the newest job's prompt starts with (typing at the
//! same place keeps the work of the keystroke before), or, released, while no other job waits.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};
use crate::generate::{common_prefix, generate, GenerateParams, Generation, GenerationStats, Slot, Watch};
use crate::model::PhiModel;
use crate::tokenizer::PhiTokenizer;
use crate::weights::Engine;

#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Slots kept at once (for recently used keys, several places of one key apart); the least
    /// recently used one is reused.
    pub max_slots: usize,
    /// Positions each slot can hold (prompt plus generated tokens).
    pub slot_capacity: usize,
}

impl WorkerOptions {
    /// As many slots of `slot_capacity` positions as fit `budget_bytes` of KV cache, at least one.
    pub fn within_budget(
        cfg: &PhiConfig,
        bytes_per_value: usize,
        slot_capacity: usize,
        budget_bytes: u64,
    ) -> Self {
        let slot_bytes = cfg.kv_bytes_per_token(bytes_per_value) * slot_capacity as u64;
        let max_slots = (budget_bytes / slot_bytes.max(1)).max(1) as usize;
        WorkerOptions {
            max_slots,
            slot_capacity,
        }
    }
}

pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub type StopPredicate = Box<dyn FnMut(&str) -> bool + Send>;

/// Sees a running job's figures after its prefill and after each token.
pub type ProgressFn = Box<dyn FnMut(&GenerationStats) + Send>;

pub struct Job {
    /// Which slot: the same key reuses the same cache (the server uses the document URI).
    pub key: String,
    pub prompt: Prompt,
    pub params: GenerateParams,
    pub stop: Option<StopPredicate>,
    pub progress: Option<ProgressFn>,
}

#[derive(Debug)]
pub enum JobOutcome {
    Finished(Generation),
    /// Not run: cancelled or superseded before it started.
    Dropped,
}

pub type Reply = Box<dyn FnOnce(Result<JobOutcome>) + Send>;

/// Cancels its job when dropped (or on [`Ticket::cancel`]); [`Ticket::release`] lets it finish the
/// prefill a newer job can use instead.
pub struct Ticket {
    flags: Arc<Flags>,
    armed: bool,
}

#[derive(Default)]
struct Flags {
    cancelled: AtomicBool,
    released: AtomicBool,
}

impl Ticket {
    pub fn cancel(&self) {
        self.flags.cancelled.store(true, Ordering::Relaxed);
    }

    /// The requester no longer wants the answer, but the prompt's prefill may still serve the
    /// next job (the user typed at the same place): the job generates nothing more, and goes on
    /// prefilling only while no other job waits or the newest one, of the same key, has a prompt
    /// that starts with the positions in hand.
    pub fn release(mut self) {
        self.flags.released.store(true, Ordering::Relaxed);
        self.armed = false;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.cancel();
        }
    }
}

/// The job submitted last, of any key: a job that is no longer wanted prefills on only for it.
#[derive(Default)]
struct Newest {
    seq: u64,
    key: String,
    /// Its prompt, when it came as ids.
    ids: Option<Vec<u32>>,
}

struct Envelope {
    job: Job,
    seq: u64,
    latest: Arc<AtomicU64>,
    flags: Arc<Flags>,
    reply: Reply,
}

enum Message {
    Run(Box<Envelope>),
    Forget(String),
}

/// Counts kept by the worker, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    pub slots: usize,
    pub jobs_run: u64,
    pub jobs_dropped: u64,
    pub panics: u64,
}

pub struct Worker {
    tx: mpsc::Sender<Message>,
    latest: Mutex<HashMap<String, Arc<AtomicU64>>>,
    newest: Arc<Mutex<Newest>>,
    next_seq: AtomicU64,
    tokenizer: Arc<PhiTokenizer>,
    config: PhiConfig,
    stats: Arc<Mutex<WorkerStats>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(engine: Engine, options: WorkerOptions) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let tokenizer = engine.tokenizer.clone();
        let config = engine.model.config().clone();
        let stats = Arc::new(Mutex::new(WorkerStats::default()));
        let newest = Arc::new(Mutex::new(Newest::default()));
        let mut state = WorkerState {
            engine,
            options,
            slots: Vec::new(),
            stats: stats.clone(),
            newest: newest.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("phi-model".into())
            .spawn(move || {
                while let Ok(message) = rx.recv() {
                    state.handle(message);
                }
            })
            .map_err(|e| EngineError::Worker(format!("cannot start the model thread: {e}")))?;
        Ok(Worker {
            tx,
            latest: Mutex::new(HashMap::new()),
            newest,
            next_seq: AtomicU64::new(1),
            tokenizer,
            config,
            stats,
            thread: Some(thread),
        })
    }

    pub fn tokenizer(&self) -> &Arc<PhiTokenizer> {
        &self.tokenizer
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    pub fn stats(&self) -> WorkerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Queues `job`; `reply` is called once on the model thread. A newer job with the same key
    /// supersedes this one. Dropping the ticket cancels it.
    pub fn submit(&self, job: Job, reply: Reply) -> Ticket {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let latest = {
            let mut map = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(job.key.clone()).or_default().clone()
        };
        latest.store(seq, Ordering::Relaxed);
        *self.newest.lock().unwrap_or_else(|e| e.into_inner()) = Newest {
            seq,
            key: job.key.clone(),
            ids: match &job.prompt {
                Prompt::Ids(ids) => Some(ids.clone()),
                Prompt::Text(_) => None,
            },
        };
        let flags = Arc::new(Flags::default());
        let envelope = Envelope {
            job,
            seq,
            latest,
            flags: flags.clone(),
            reply,
        };
        if let Err(mpsc::SendError(Message::Run(envelope))) = self.tx.send(Message::Run(Box::new(envelope))) {
            (envelope.reply)(Err(EngineError::Worker("the model thread has exited".into())));
        }
        Ticket { flags, armed: true }
    }

    /// Submits `job` and waits for its outcome on this thread (for the CLI and tests).
    pub fn submit_and_wait(&self, job: Job) -> Result<JobOutcome> {
        let (tx, rx) = mpsc::channel();
        let _ticket = self.submit(job, Box::new(move |result| drop(tx.send(result))));
        rx.recv()
            .map_err(|_| EngineError::Worker("the model thread dropped the job".into()))?
    }

    /// Frees the slot of `key` (the server calls this when a document closes).
    pub fn forget(&self, key: &str) {
        if let Ok(mut map) = self.latest.lock() {
            map.remove(key);
        }
        let _ = self.tx.send(Message::Forget(key.to_string()));
    }

    /// Stops the thread after the job in hand and waits for it.
    pub fn shutdown(mut self) {
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct WorkerState {
    engine: Engine,
    options: WorkerOptions,
    /// Least recently used first.
    slots: Vec<(String, Slot)>,
    stats: Arc<Mutex<WorkerStats>>,
    newest: Arc<Mutex<Newest>>,
}

impl WorkerState {
    fn handle(&mut self, message: Message) {
        match message {
            Message::Forget(key) => {
                self.slots.retain(|(k, _)| *k != key);
                self.count_slots();
            }
            Message::Run(envelope) => {
                let Envelope {
                    job,
                    seq,
                    latest,
                    flags,
                    reply,
                } = *envelope;
                let stale = || {
                    flags.cancelled.load(Ordering::Relaxed)
                        || flags.released.load(Ordering::Relaxed)
                        || latest.load(Ordering::Relaxed) != seq
                };
                if stale() {
                    self.count(|s| s.jobs_dropped += 1);
                    reply(Ok(JobOutcome::Dropped));
                    return;
                }
                let key = job.key.clone();
                let newest = self.newest.clone();
                // A job no longer wanted prefills on only for the job after it (see Ticket::release).
                let keep_prefilling = |prefix: &[u32]| {
                    let newest = newest.lock().unwrap_or_else(|e| e.into_inner());
                    if newest.seq == seq {
                        !flags.cancelled.load(Ordering::Relaxed)
                    } else {
                        newest.key == key && newest.ids.as_ref().is_some_and(|ids| ids.starts_with(prefix))
                    }
                };
                let result = catch_unwind(AssertUnwindSafe(|| self.generate(job, &stale, &keep_prefilling)));
                let result = match result {
                    Ok(result) => result,
                    Err(panic) => {
                        // The slot may be half-written: throw it away.
                        self.slots.retain(|(k, _)| *k != key);
                        self.count(|s| s.panics += 1);
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        tracing::error!("the model thread panicked on a job and recovered: {what}");
                        Err(EngineError::Worker(format!("generation panicked: {what}")))
                    }
                };
                self.count(|s| s.jobs_run += 1);
                // Counted before the reply, so a caller that reads the stats after its answer
                // sees this job's effect.
                self.count_slots();
                reply(result.map(JobOutcome::Finished));
            }
        }
    }

    fn count_slots(&self) {
        let n_slots = self.slots.len();
        self.count(|s| s.slots = n_slots);
    }

    fn count(&self, f: impl FnOnce(&mut WorkerStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            f(&mut stats);
        }
    }

    fn generate(
        &mut self,
        job: Job,
        cancelled: &dyn Fn() -> bool,
        keep_prefilling: &dyn Fn(&[u32]) -> bool,
    ) -> Result<Generation> {
        let Job {
            key,
            prompt,
            params,
            stop,
            mut progress,
        } = job;
        let ids = match prompt {
            Prompt::Text(text) => self.engine.tokenizer.encode(&text)?,
            Prompt::Ids(ids) => ids,
        };
        // Fitting the prompt is the caller's policy (phi-lsp's `completion::prompt`); a prompt that
        // leaves no room is refused rather than cut here.
        if ids.len() >= self.options.slot_capacity {
            return Err(EngineError::Request(format!(
                "the prompt has {} tokens; a slot holds {} positions",
                ids.len(),
                self.options.slot_capacity
            )));
        }
        let slot = take_slot(&mut self.slots, self.options, &self.engine.model, &key, &ids)?;
        let mut stop = stop;
        let mut never = |_: &str| false;
        let stop: &mut dyn FnMut(&str) -> bool = match stop.as_mut() {
            Some(f) => f,
            None => &mut never,
        };
        let progress = progress
            .as_mut()
            .map(|f| f.as_mut() as &mut dyn FnMut(&GenerationStats));
        generate(
            &self.engine,
            slot,
            &ids,
            &params,
            Watch {
                stop,
                cancelled,
                keep_prefilling: Some(keep_prefilling),
                progress,
            },
        )
    }
}

/// A slot's window is kept for its place (instead of being overwritten by another place of the same
/// key) only when it holds at least this many positions: fewer cost little to compute again.
const PLACE_POSITIONS: usize = 64;

/// A slot for the prompt `ids` of `key`, moved to the end (most recently used): of the slots `key`
/// has, the one that shares the longest prefix with `ids`, if it shares at least half of them or
/// holds less than [`PLACE_POSITIONS`]. Otherwise this is another place of the document (a jump far
/// up or down, or a window whose start moved): a new slot, so the window left behind stays cached
/// for when the user comes back, or — at the slot limit — the least recently used slot of any key,
/// cleared.
fn take_slot<'a>(
    slots: &'a mut Vec<(String, Slot)>,
    options: WorkerOptions,
    model: &PhiModel,
    key: &str,
    ids: &[u32],
) -> Result<&'a mut Slot> {
    let best = slots
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == key)
        .map(|(idx, (_, slot))| (idx, common_prefix(slot.ids(), ids)))
        .max_by_key(|&(idx, shared)| (shared, idx));
    let entry = match best {
        Some((idx, shared)) if 2 * shared >= ids.len() || slots[idx].1.ids().len() < PLACE_POSITIONS => {
            slots.remove(idx)
        }
        _ if slots.len() < options.max_slots.max(1) => {
            (key.to_string(), Slot::new(model, options.slot_capacity)?)
        }
        _ => {
            let (_, mut slot) = slots.remove(0);
            slot.clear();
            (key.to_string(), slot)
        }
    };
    slots.push(entry);
    let last = slots.len() - 1;
    Ok(&mut slots[last].1)
}
