//! What generates a suggestion, behind one trait: the model thread in this process
//! ([`LocalBackend`]) or a remote OpenAI-compatible server (`crate::remote::Remote`). Both take the
//! same [`GenerationRequest`] and answer with the same [`Generated`]; the policy in
//! [`super::Completions`] does not know which one it talks to.

use std::sync::Arc;
use std::time::Instant;

use phi_engine::{
    GenerateParams, GenerationStats, Job, JobOutcome, ProgressFn, Prompt, Sampling, StopReason, Ticket,
    Worker, WorkerStats,
};
use tokio::sync::oneshot;

use super::prompt::fit;
use crate::faults::TestPanic;

/// Says, after each token, whether the text generated so far is a whole suggestion.
pub type StopRule = Box<dyn FnMut(&str) -> bool + Send>;

/// One generation to run: the prompt text and when to stop.
pub struct GenerationRequest {
    /// Which KV-cache slot (the document URI); a newer request with the same key supersedes this one.
    pub key: String,
    /// The text before the cursor that the model continues (the window).
    pub prompt: String,
    /// The file's structure that goes before `prompt` (empty when the window starts the file).
    pub header: super::structure::Header,
    /// The definitions imported from the other open documents, which go before `header`.
    pub neighbours: super::neighbours::Neighbours,
    /// Heal the prompt's last token (see [`heal`]); local backends only: a remote one sends the
    /// whole prompt and is not constrained.
    pub heal: bool,
    pub max_new_tokens: usize,
    /// The generation stops here with what it has; `None` runs until a stop rule or the cap.
    pub deadline: Option<Instant>,
    pub stop: StopRule,
    /// Sees the figures so far after the prefill and after each token (local backends only).
    pub progress: Option<ProgressFn>,
    /// Sampled instead of greedy (the alternatives of an explicit request); `None`: greedy, as
    /// every other suggestion is.
    pub sampling: Option<Sampling>,
}

/// What a backend generated: the raw continuation, why it ended, and what it cost.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The continuation after the cursor: with token healing, without the dropped text.
    pub text: String,
    /// The prompt's last token, dropped and written again by the model (token healing).
    pub healed: Option<String>,
    /// The prompt exactly as the model got it: fitted to the context and, when healed, without the
    /// dropped text (`None` where it is not known).
    pub prompt: Option<String>,
    /// Never `Cancelled`: a cancelled generation is no answer (`Ok(None)`).
    pub stop: StopReason,
    pub stats: GenerationStats,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BackendError {
    /// The model thread is gone (a panic outside its per-job guard): the model must be loaded again.
    Stopped,
    /// The model failed on this request; the next one may work.
    Failed(String),
    /// The remote server failed or could not be reached; `new` when this is not the failure the
    /// last request had (it is worth telling the user).
    Remote { message: String, new: bool },
}

pub type Outcome = Result<Option<Generated>, BackendError>;

/// What a generation's [`Pending`] holds to stop it. Dropped, it cancels the work; released, the
/// work may still finish the prompt's prefill for the next request at the same place (the model
/// thread's [`Ticket::release`]), and generates nothing more.
pub trait Cancel: Send + Sync {
    fn release(self: Box<Self>) {}
}

impl Cancel for () {}

impl Cancel for Ticket {
    fn release(self: Box<Self>) {
        Ticket::release(*self);
    }
}

/// A generation in progress. Dropping it cancels the work (the model thread stops within a token,
/// the remote request at its next chunk).
pub struct Pending {
    result: oneshot::Receiver<Outcome>,
    _cancel: Box<dyn Cancel>,
    healed: Option<String>,
    prompt: Option<String>,
}

impl Pending {
    pub fn new(result: oneshot::Receiver<Outcome>, cancel: impl Cancel + 'static) -> Self {
        Pending {
            result,
            _cancel: Box::new(cancel),
            healed: None,
            prompt: None,
        }
    }

    /// The generation heals the prompt's last token, whose text this is.
    pub fn with_healed(mut self, healed: Option<String>) -> Self {
        self.healed = healed;
        self
    }

    /// The prompt as the model gets it (see [`Generated::prompt`]).
    pub fn with_prompt(mut self, prompt: Option<String>) -> Self {
        self.prompt = prompt;
        self
    }

    /// The prompt as the model gets it, known as soon as the generation started.
    pub fn prompt(&self) -> Option<&str> {
        self.prompt.as_deref()
    }

    /// The text token healing dropped from the prompt, known as soon as the generation started.
    pub fn healed(&self) -> Option<&str> {
        self.healed.as_deref()
    }

    /// The answer is there (nothing has waited for it yet).
    pub fn is_done(&self) -> bool {
        !self.result.is_empty()
    }

    /// The answer: `Ok(None)` when the generation was dropped or cut short by a newer request.
    pub async fn wait(self) -> Outcome {
        let Pending { result, _cancel, .. } = self;
        result.await.unwrap_or(Err(BackendError::Stopped))
    }

    /// The answer's receiver and the guard that cancels the work when dropped, apart: the answer
    /// can then be awaited in one place while the guard is kept (or dropped) in another. A
    /// dropped sender means the model thread is gone ([`BackendError::Stopped`]).
    pub fn into_parts(self) -> (oneshot::Receiver<Outcome>, Box<dyn Cancel>) {
        (self.result, self._cancel)
    }
}

pub trait Backend: Send + Sync {
    /// Starts `request` at once (from within the async runtime); its answer comes through the
    /// returned [`Pending`].
    fn start(&self, request: GenerationRequest) -> Pending;

    /// Whether a suggestion may be computed ahead of time while the user is idle: cheap to start
    /// and to cancel, and it does not leave a network request behind.
    fn speculates(&self) -> bool {
        false
    }

    /// The document `key` is closed: its cache may go.
    fn forget(&self, _key: &str) {}

    /// The last failure, until a request succeeds again (remote backends only), for `phi-lsp/status`.
    fn last_error(&self) -> Option<String> {
        None
    }

    /// The model thread's counts, for `phi-lsp/status` (local backends only).
    fn worker_stats(&self) -> Option<WorkerStats> {
        None
    }
}

/// The model thread in this process. Prompts are tokenized here and fitted to the slot's capacity
/// by [`fit`], the one place that fits a prompt.
pub struct LocalBackend {
    worker: Arc<Worker>,
    slot_capacity: usize,
    test_panic: Option<TestPanic>,
    test_token_delay: Option<std::time::Duration>,
}

impl LocalBackend {
    pub fn new(worker: Worker, slot_capacity: usize, test_panic: Option<TestPanic>) -> Self {
        LocalBackend {
            worker: Arc::new(worker),
            slot_capacity,
            test_panic,
            test_token_delay: crate::faults::test_token_delay(),
        }
    }

    /// The engine job for `request`: the fitted token ids of its prompt.
    pub fn job(&self, request: GenerationRequest) -> phi_engine::Result<LocalJob> {
        job(&self.worker, self.slot_capacity, request)
    }
}

/// An engine job, the text token healing dropped from its prompt, and the prompt the model gets.
pub struct LocalJob {
    pub job: Job,
    pub healed: Option<String>,
    /// The text of the job's ids: the request's prompt fitted to the slot, without `healed`.
    pub prompt: String,
}

/// The engine job for `request` on `worker`, whose slots hold `slot_capacity` positions (also used by
/// the one-shot `phi-lsp complete`). With `request.heal`, the fitted prompt's last token is
/// dropped and the job writes it again ([`heal`]); the stop rule then sees only the text after
/// the cursor.
pub fn job(
    worker: &Worker,
    slot_capacity: usize,
    request: GenerationRequest,
) -> phi_engine::Result<LocalJob> {
    let ids = fit(
        worker.tokenizer(),
        &request.neighbours,
        &request.header,
        &request.prompt,
        slot_capacity,
        request.max_new_tokens,
    )?;
    let (ids, healed) = match request.heal {
        true => heal(worker.tokenizer(), ids),
        false => (ids, None),
    };
    let prompt = ids_text(worker.tokenizer(), &ids);
    let mut stop = request.stop;
    let stop: StopRule = match healed.clone() {
        // Nothing is after the cursor until the dropped text is written again.
        Some(dropped) => {
            Box::new(move |text: &str| text.strip_prefix(dropped.as_str()).is_some_and(&mut stop))
        }
        None => stop,
    };
    let progress = request.progress;
    let job = Job {
        key: request.key,
        prompt: Prompt::Ids(ids),
        params: GenerateParams {
            max_new_tokens: request.max_new_tokens,
            sampling: request.sampling.unwrap_or_default(),
            deadline: request.deadline,
            prefix: healed
                .as_deref()
                .map(|t| t.as_bytes().to_vec())
                .unwrap_or_default(),
            ..Default::default()
        },
        stop: Some(stop),
        progress,
    };
    Ok(LocalJob { job, healed, prompt })
}

/// The text of `ids`, byte for byte what the tokenizer encoded (a char cut at the start of a fitted
/// prompt shows as U+FFFD).
fn ids_text(tokenizer: &phi_engine::PhiTokenizer, ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .filter_map(|&id| tokenizer.token_bytes(id))
        .flatten()
        .copied()
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Token healing: a prompt that ends inside a word ends in a token the model rarely saw there
/// (`ret`, not `return`), so its last token is dropped and the generation must write its text
/// again, token by token, among the tokens that agree with it (the engine's
/// `GenerateParams::prefix`). Returns the prompt to run and the dropped text; nothing is dropped
/// from a one-token prompt, nor a token that is whitespace or not whole characters on its own.
pub fn heal(tokenizer: &phi_engine::PhiTokenizer, mut ids: Vec<u32>) -> (Vec<u32>, Option<String>) {
    let dropped = match ids.as_slice() {
        [_, .., last] => tokenizer
            .token_bytes(*last)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .filter(|text| !text.trim().is_empty())
            .map(str::to_string),
        _ => None,
    };
    if dropped.is_some() {
        ids.pop();
    }
    (ids, dropped)
}

/// An engine outcome as an answer: a cancelled (superseded) generation is cut short, not the
/// suggestion, and must not be shown or typed through. With `healed` text, the answer is what
/// follows it (nothing, if the generation ended before writing all of it). `prompt` is what the
/// model got ([`LocalJob::prompt`]).
pub fn answer(outcome: phi_engine::Result<JobOutcome>, healed: Option<&str>, prompt: &str) -> Outcome {
    match outcome {
        Ok(JobOutcome::Finished(generation)) if generation.stop == StopReason::Cancelled => Ok(None),
        Ok(JobOutcome::Finished(generation)) => {
            let text = match healed {
                Some(dropped) => generation
                    .text
                    .strip_prefix(dropped)
                    .unwrap_or_default()
                    .to_string(),
                None => generation.text,
            };
            Ok(Some(Generated {
                text,
                healed: healed.map(str::to_string),
                prompt: Some(prompt.to_string()),
                stop: generation.stop,
                stats: generation.stats,
            }))
        }
        Ok(JobOutcome::Dropped) => Ok(None),
        Err(e) => Err(BackendError::Failed(e.to_string())),
    }
}

impl LocalBackend {
    /// [`Backend::start`], with `adjust` applied to the engine job before it is submitted: how
    /// `phi-lsp bench --replay` scripts the token choice and sets the drafts, through the same path
    /// as every request. The server passes nothing.
    pub fn start_with(&self, mut request: GenerationRequest, adjust: impl FnOnce(&mut Job)) -> Pending {
        let (tx, rx) = oneshot::channel();
        let test_panic = self
            .test_panic
            .filter(|_| request.prompt.contains(crate::faults::TEST_PANIC_MARKER));
        if test_panic == Some(TestPanic::Request) {
            TestPanic::Request.fire();
        }
        if let Some(delay) = self.test_token_delay {
            let mut stop = request.stop;
            request.stop = Box::new(move |text: &str| {
                std::thread::sleep(delay);
                stop(text)
            });
        }
        let LocalJob {
            mut job,
            healed,
            prompt,
        } = match self.job(request) {
            Ok(job) => job,
            Err(e) => {
                let _ = tx.send(Err(BackendError::Failed(e.to_string())));
                return Pending::new(rx, ());
            }
        };
        adjust(&mut job);
        if test_panic == Some(TestPanic::Worker) {
            job.stop = Some(Box::new(|_: &str| TestPanic::Worker.fire()));
        }
        let exit_worker = test_panic == Some(TestPanic::WorkerExit);
        let (pending_healed, pending_prompt) = (healed.clone(), prompt.clone());
        let reply = Box::new(move |outcome| {
            if exit_worker {
                TestPanic::WorkerExit.fire();
            }
            let _ = tx.send(answer(outcome, healed.as_deref(), &prompt));
        });
        // Every job's reply is called unless the model thread dies with the job queued or in hand;
        // then the sender is dropped and `wait` says `Stopped`.
        let ticket = self.worker.submit(job, reply);
        Pending::new(rx, ticket)
            .with_healed(pending_healed)
            .with_prompt(Some(pending_prompt))
    }
}

impl Backend for LocalBackend {
    fn start(&self, request: GenerationRequest) -> Pending {
        self.start_with(request, |_| {})
    }

    fn speculates(&self) -> bool {
        true
    }

    fn forget(&self, key: &str) {
        self.worker.forget(key);
    }

    fn worker_stats(&self) -> Option<WorkerStats> {
        Some(self.worker.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::heal;
    use phi_engine::PhiTokenizer;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    }

    /// The token dropped from a prompt is its last Phi-1 token, as the Python tokenizers library
    /// encodes it (`tests/fixtures/phi-1-healing.json`).
    #[test]
    fn heal_drops_the_last_phi_1_token() {
        let tokenizer = PhiTokenizer::from_file(&root().join("assets/phi-1/tokenizer.json")).expect("loads");
        let text = std::fs::read_to_string(root().join("tests/fixtures/phi-1-healing.json")).expect("reads");
        let reference: serde_json::Value = serde_json::from_str(&text).expect("parses");
        let prompts = reference["prompts"].as_array().expect("prompts");
        assert!(prompts.len() >= 4);
        for case in prompts {
            let prompt = case["prompt"].as_str().expect("prompt");
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
            let encoded = tokenizer.encode(prompt).expect("encodes");
            assert_eq!(encoded, ids);
            let (kept, dropped) = heal(&tokenizer, encoded);
            assert_eq!(kept, ids[..ids.len() - 1], "{prompt:?}");
            assert_eq!(dropped.as_deref(), case["last_text"].as_str(), "{prompt:?}");
        }
        // Whitespace is not healed, nor a prompt of one token.
        let spaces = tokenizer.encode("def f():\n    ").expect("encodes");
        let (kept, dropped) = heal(&tokenizer, spaces.clone());
        assert_eq!((kept, dropped), (spaces, None));
        let one = tokenizer.encode("return").expect("encodes");
        assert_eq!(heal(&tokenizer, one.clone()), (one, None));
    }
}
