//! The `LanguageServer`: capabilities, documents, model life, and routing completion requests to the
//! model thread. LSP types stop here: everything below speaks plain structs.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use phi_engine::{Generation, JobOutcome, StopReason, Ticket, Worker, WorkerOptions};
use ropey::Rope;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::ls_types::*;
use tower_lsp_server::{Client, LanguageServer, LspService};

use crate::complete::{self, Prepared};
use crate::convert::{self, PositionEncoding};
use crate::documents::{Documents, Edit};
use crate::loading;
use crate::prompt::PromptWindow;
use crate::remote::{Remote, RemoteError};
use crate::settings::{CompletionMode, Settings};

/// Documents larger than this are refused (the prompt window is bounded anyway).
pub const MAX_DOCUMENT_BYTES: usize = 32 << 20;
/// KV cache for all slots together; slots hold `context_tokens` positions each.
pub const KV_BUDGET_BYTES: u64 = 1 << 30;

/// Test-only fault injection. When the server starts with `PHI_LSP_TEST_PANIC` set, a completion
/// whose text before the cursor contains [`TEST_PANIC_MARKER`] panics: `request` in the request
/// handler, `worker` inside the job on the model thread, `worker-exit` on the model thread outside
/// its per-job guard (the thread dies, as it would on a bug in the worker itself). The fault tests
/// (`tests/faults.rs`) use it to show that no panic takes the server down; without the variable,
/// or for any other text, nothing changes.
pub const TEST_PANIC_ENV: &str = "PHI_LSP_TEST_PANIC";
pub const TEST_PANIC_MARKER: &str = "PHI_LSP_TEST_PANIC";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TestPanic {
    Request,
    Worker,
    WorkerExit,
}

impl TestPanic {
    fn from_env() -> Option<Self> {
        let value = std::env::var(TEST_PANIC_ENV).ok()?;
        let site = match value.as_str() {
            "request" => TestPanic::Request,
            "worker" => TestPanic::Worker,
            "worker-exit" => TestPanic::WorkerExit,
            other => {
                tracing::warn!("{TEST_PANIC_ENV}={other:?} ignored: use request, worker or worker-exit");
                return None;
            }
        };
        tracing::warn!(
            "{TEST_PANIC_ENV}={value}: completions at {TEST_PANIC_MARKER} will panic (tests only)"
        );
        Some(site)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
enum ModelState {
    Loading {
        message: String,
    },
    Ready {
        message: String,
        /// What `auto` resolved to.
        #[serde(rename = "deviceInUse")]
        device_in_use: String,
        #[serde(rename = "dtypeInUse")]
        dtype_in_use: String,
    },
    Failed {
        message: String,
    },
}

/// What the last completion cost, for `phi-lsp/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LastCompletion {
    pub uri: String,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
    /// Served by typing through the previous suggestion: no model work.
    pub from_cache: bool,
    pub stop: String,
}

/// The suggestion last shown for a document, for typing through it.
struct Shown {
    start_char: usize,
    before: String,
    after: String,
    suggestion: String,
}

/// How long the user must be idle after a suggestion before the next one is computed: a keystroke
/// arriving while the model thread works on a speculation waits for the token in progress.
const SPECULATE_AFTER_IDLE: std::time::Duration = std::time::Duration::from_millis(250);

/// The suggestion for the text as it will be once the one just shown is accepted, computed on the
/// model thread while the user is idle. Any other request cancels it (dropping the ticket).
struct Speculation {
    key: String,
    window: PromptWindow,
    /// Holds the outcome once the job is done (nothing polls it before a request takes it).
    result: oneshot::Receiver<phi_engine::Result<JobOutcome>>,
    _ticket: Ticket,
}

#[derive(Default)]
struct Speculations {
    /// Completion requests so far: a speculation starts only if none came while it waited.
    requests: u64,
    current: Option<Speculation>,
}

struct Session {
    settings: Settings,
    encoding: PositionEncoding,
    client_inline: bool,
    work_done_progress: bool,
    /// A problem with the initial settings, shown once the client is initialized.
    settings_error: Option<String>,
}

struct Shared {
    documents: Mutex<Documents>,
    session: Mutex<Session>,
    model: Mutex<(ModelState, Option<Generator>)>,
    /// The last failure of the remote backend, until a request succeeds again.
    backend_error: Mutex<Option<String>>,
    shown: Mutex<HashMap<String, Shown>>,
    speculation: Mutex<Speculations>,
    last: Mutex<Option<LastCompletion>>,
    /// Only the newest load may install its worker.
    load_seq: AtomicU64,
    /// The slot limit of the current worker (0 before one is loaded), for `phi-lsp/status`.
    max_slots: AtomicUsize,
    test_panic: Option<TestPanic>,
}

/// What generates: the model thread in this process, or a remote OpenAI-compatible server.
#[derive(Clone)]
enum Generator {
    Local(Arc<Worker>),
    Remote(Arc<Remote>),
}

/// Sets its flag when dropped: the remote request of a completion whose future was dropped
/// (cancelled) stops at its next chunk.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (every critical section here
/// leaves the data consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `future`, turning a panic inside it into `Err` with the panic's message. tower-lsp-server
/// polls every handler on the task that serves stdio, so a panic that escaped a handler would end
/// the server.
async fn catch_panic<F: Future>(future: F) -> std::result::Result<F::Output, String> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic_message(panic.as_ref()))),
        },
    )
    .await
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

pub struct Backend {
    client: Client,
    shared: Arc<Shared>,
}

pub fn service(settings: Settings) -> (LspService<Backend>, tower_lsp_server::ClientSocket) {
    LspService::build(|client| Backend::new(client, settings))
        .custom_method("phi-lsp/status", Backend::status)
        .custom_method("textDocument/inlineCompletion", Backend::inline_completion)
        .custom_method(crate::framing::MALFORMED_METHOD, Backend::malformed_message)
        .finish()
}

/// How long requests in flight may still finish once stdin has ended.
const STDIN_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

pub async fn serve_stdio(settings: Settings) {
    serve(tokio::io::stdin(), tokio::io::stdout(), settings).await
}

/// Serves LSP on `input`/`output` until `exit` or the end of `input` (the fuzz target's entry).
pub async fn serve<I, O>(input: I, output: O, settings: Settings)
where
    I: tokio::io::AsyncRead + Unpin + Send + 'static,
    O: tokio::io::AsyncWrite + Unpin,
{
    let (service, socket) = service(settings);
    // Input passes through the framing guard, so one malformed message cannot end the transport.
    let (guarded, server_input) = tokio::io::duplex(1 << 16);
    let input = tokio::io::BufReader::new(input);
    let mut guard = tokio::spawn(async move {
        if let Err(e) = crate::framing::guard(input, guarded).await {
            tracing::warn!("reading stdin failed: {e}");
        }
    });
    let serve = tower_lsp_server::Server::new(server_input, output, socket).serve(service);
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => {}
        _ = &mut guard => {
            // stdin ended without `exit`: the client is gone. tower-lsp-server would wait for every
            // request in flight (a generation can run for seconds); answers already computed get a
            // moment to be written, then dropping `serve` drops the rest, which cancels their jobs.
            let _ = tokio::time::timeout(STDIN_CLOSED_GRACE, &mut serve).await;
        }
    }
    guard.abort();
}

impl Backend {
    fn new(client: Client, settings: Settings) -> Self {
        let session = Session {
            settings,
            encoding: PositionEncoding::Utf16,
            client_inline: false,
            work_done_progress: false,
            settings_error: None,
        };
        let shared = Shared {
            documents: Mutex::new(Documents::new(MAX_DOCUMENT_BYTES)),
            session: Mutex::new(session),
            model: Mutex::new((
                ModelState::Loading {
                    message: "waiting for initialized".into(),
                },
                None,
            )),
            backend_error: Mutex::new(None),
            shown: Mutex::new(HashMap::new()),
            speculation: Mutex::new(Speculations::default()),
            last: Mutex::new(None),
            load_seq: AtomicU64::new(0),
            max_slots: AtomicUsize::new(0),
            test_panic: TestPanic::from_env(),
        };
        Backend {
            client,
            shared: Arc::new(shared),
        }
    }

    fn settings(&self) -> Settings {
        lock(&self.shared.session).settings.clone()
    }

    fn handle(&self) -> Backend {
        Backend {
            client: self.client.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Runs one handler at the request boundary: a panic in it is logged once, shown in the client's
    /// log, and answered as an internal error; the server goes on serving.
    async fn guarded<T>(&self, method: &str, handler: impl Future<Output = Result<T>>) -> Result<T> {
        match catch_panic(handler).await {
            Ok(result) => result,
            Err(what) => {
                let message = format!("{method} panicked: {what}");
                self.log_panic(&message).await;
                Err(Error {
                    message: message.into(),
                    ..Error::internal_error()
                })
            }
        }
    }

    /// [`Self::guarded`] for notifications, which have no answer to carry the error.
    async fn guarded_notification(&self, method: &str, handler: impl Future<Output = ()>) {
        if let Err(what) = catch_panic(handler).await {
            self.log_panic(&format!("{method} panicked: {what}")).await;
        }
    }

    async fn log_panic(&self, message: &str) {
        tracing::error!("{message}; the server goes on");
        self.client
            .log_message(MessageType::ERROR, format!("phi-lsp: {message}"))
            .await;
    }

    /// The model thread of `dead` has exited (a panic outside its per-job guard): the engine went
    /// with it, so the model is loaded again. Only the first request to notice restarts it.
    async fn restart_worker(&self, dead: &Arc<Worker>) {
        let message = "the model thread stopped: loading the model again";
        {
            let mut model = lock(&self.shared.model);
            if !matches!(&model.1, Some(Generator::Local(w)) if Arc::ptr_eq(w, dead)) {
                return;
            }
            *model = (
                ModelState::Loading {
                    message: message.into(),
                },
                None,
            );
        }
        tracing::error!("{message}");
        self.client
            .log_message(MessageType::ERROR, format!("phi-lsp: {message}"))
            .await;
        let backend = self.handle();
        tokio::spawn(async move { backend.load_model().await });
    }

    /// Loads the model on a blocking thread, reporting work-done progress; the newest load wins.
    async fn load_model(&self) {
        let seq = self.shared.load_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let (settings, progress_supported) = {
            let session = lock(&self.shared.session);
            (session.settings.clone(), session.work_done_progress)
        };
        let spec = settings.model.clone();
        if !spec.is_local() {
            self.use_remote(&spec.model, &spec.backend).await;
            return;
        }
        let description = format!("{} ({}, {})", spec.model, spec.device, spec.dtype);
        *lock(&self.shared.model) = (
            ModelState::Loading {
                message: format!("loading {description}"),
            },
            None,
        );
        tracing::info!("loading {description}");

        let progress = if progress_supported {
            let token = ProgressToken::String(format!("phi-lsp/load/{seq}"));
            match self.client.create_work_done_progress(token.clone()).await {
                Ok(()) => Some(
                    self.client
                        .progress(token, "phi-lsp: loading Phi-1")
                        .with_message(description.clone())
                        .begin()
                        .await,
                ),
                Err(e) => {
                    tracing::warn!("the client refused work-done progress: {e}");
                    None
                }
            }
        } else {
            None
        };
        if let Some(progress) = &progress {
            progress
                .report(format!("reading weights of {}", spec.model))
                .await;
        }

        // Download progress from the loading thread, forwarded as $/progress reports.
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u32)>();
        let load = tokio::task::spawn_blocking(move || -> anyhow::Result<(Worker, String, String, usize)> {
            let mut report = |file: &str, done: u64, total: u64| {
                let percent = (done * 100 / total.max(1)) as u32;
                let _ = progress_tx.send((
                    format!("downloading {file}: {} / {} MB", done >> 20, total >> 20),
                    percent,
                ));
            };
            let engine = loading::load(&spec, Some(&mut report))?;
            let _ = progress_tx.send(("preparing the weights (a first forward)".into(), 99));
            let started = std::time::Instant::now();
            engine.model.warm_up()?;
            tracing::info!(
                "first forward (warm-up) took {} ms",
                started.elapsed().as_millis()
            );
            let device = loading::device_name(engine.model.device());
            let dtype = engine.dtype.clone();
            let cfg = engine.model.config().clone();
            let bytes = engine.model.kv_dtype().size_in_bytes();
            let capacity = settings.context_tokens.min(cfg.max_position_embeddings);
            let options = WorkerOptions::within_budget(&cfg, bytes, capacity, KV_BUDGET_BYTES);
            Ok((Worker::spawn(engine, options)?, device, dtype, options.max_slots))
        });
        tokio::pin!(load);
        let load = loop {
            // Reports first: every one sent before the load ended is forwarded before `end`.
            tokio::select! {
                biased;
                Some((message, _percent)) = progress_rx.recv() => {
                    if let Some(progress) = &progress {
                        progress.report(message).await;
                    }
                }
                result = &mut load => break result,
            }
        };
        let result = match load {
            Ok(result) => result,
            Err(join) => Err(anyhow::anyhow!("the loading thread failed: {join}")),
        };
        if self.shared.load_seq.load(Ordering::SeqCst) != seq {
            tracing::info!("a newer model load superseded {description}");
            if let Some(progress) = progress {
                progress.finish_with_message("superseded").await;
            }
            return;
        }
        match result {
            Ok((worker, device_in_use, dtype_in_use, max_slots)) => {
                let message = format!("ready: {description} on {device_in_use}, {dtype_in_use}");
                tracing::info!("{message}");
                let state = ModelState::Ready {
                    message: message.clone(),
                    device_in_use,
                    dtype_in_use,
                };
                *lock(&self.shared.model) = (state, Some(Generator::Local(Arc::new(worker))));
                self.shared.max_slots.store(max_slots, Ordering::Relaxed);
                self.forget_suggestions();
                if let Some(progress) = progress {
                    progress.finish_with_message(message.clone()).await;
                }
                self.client
                    .log_message(MessageType::INFO, format!("phi-lsp: {message}"))
                    .await;
            }
            Err(e) => {
                let message = format!("{e:#}").replace('\n', " ");
                tracing::error!("model load failed: {message}");
                *lock(&self.shared.model) = (
                    ModelState::Failed {
                        message: message.clone(),
                    },
                    None,
                );
                if let Some(progress) = progress {
                    progress.finish_with_message("failed").await;
                }
                self.client
                    .show_message(
                        MessageType::ERROR,
                        format!("phi-lsp could not load the model: {message}"),
                    )
                    .await;
            }
        }
    }

    async fn malformed_message(&self, params: Value) {
        let reason = params
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        self.client
            .log_message(
                MessageType::WARNING,
                format!("phi-lsp: ignored a malformed message: {reason}"),
            )
            .await;
    }

    async fn status(&self) -> Result<Value> {
        self.guarded("phi-lsp/status", async move {
            let (settings, encoding, client_inline) = {
                let session = lock(&self.shared.session);
                (session.settings.clone(), session.encoding, session.client_inline)
            };
            let (state, worker) = lock(&self.shared.model).clone();
            let mut status = serde_json::json!({
                "model": settings.model.model,
                "device": settings.model.device,
                "dtype": settings.model.dtype,
                "positionEncoding": lsp_encoding(encoding).as_str(),
                "completionMode": settings.completion_mode,
                "clientInlineCompletion": client_inline,
                "maxNewTokens": settings.max_new_tokens,
                "deadlineMs": settings.deadline_ms,
                "contextTokens": settings.context_tokens,
                "documents": lock(&self.shared.documents).len(),
                "backend": settings.model.backend,
                "backendError": *lock(&self.shared.backend_error),
                "speculate": settings.speculate,
                "speculation": match &lock(&self.shared.speculation).current {
                    None => "none",
                    Some(s) if !s.result.is_empty() => "ready",
                    Some(_) => "running",
                },
                "last": *lock(&self.shared.last),
            });
            if let (Value::Object(map), Ok(Value::Object(state))) =
                (&mut status, serde_json::to_value(&state))
            {
                map.extend(state);
            }
            if let ModelState::Ready {
                device_in_use,
                dtype_in_use,
                ..
            } = &state
            {
                status["device"] = device_in_use.clone().into();
                status["dtype"] = dtype_in_use.clone().into();
            }
            if let (Value::Object(map), Some(Generator::Local(worker))) = (&mut status, worker) {
                let stats = worker.stats();
                let max_slots = self.shared.max_slots.load(Ordering::Relaxed);
                map.insert(
                    "worker".into(),
                    serde_json::json!({"slots": stats.slots, "maxSlots": max_slots, "jobsRun": stats.jobs_run,
                        "jobsDropped": stats.jobs_dropped, "panics": stats.panics}),
                );
            }
            Ok(status)
        })
        .await
    }

    /// The suggestion at `position` in `uri`: typed through from the last one, or from the model.
    /// Unknown documents and positions out of range are errors; a model that is not ready gives none.
    async fn suggest(&self, uri: &Uri, position: Position) -> Result<Option<(Rope, usize, String)>> {
        let started = Instant::now();
        let key = uri.as_str().to_string();
        let settings = self.settings();
        let encoding = lock(&self.shared.session).encoding;
        let rope = {
            let documents = lock(&self.shared.documents);
            let doc = documents.get(&key).ok_or_else(|| {
                Error::invalid_params(format!("unknown document {key}: send didOpen first"))
            })?;
            doc.rope.clone()
        };
        let pos = convert::Pos {
            line: position.line,
            character: position.character,
        };
        let cursor =
            convert::pos_to_char(&rope, pos, encoding).map_err(|e| Error::invalid_params(e.to_string()))?;
        let prepared = complete::prepare(&rope, cursor, &settings);

        if let Some(rest) = self.type_through(&key, &prepared) {
            *lock(&self.shared.last) = Some(LastCompletion {
                uri: key.clone(),
                total_ms: started.elapsed().as_secs_f64() * 1000.0,
                from_cache: true,
                stop: "typed-through".into(),
                ..Default::default()
            });
            return Ok(Some((rope, cursor, rest)));
        }
        let speculated = self.speculated(&key, &prepared).await;
        let Some(generator) = lock(&self.shared.model).1.clone() else {
            return Ok(None);
        };
        if prepared.window.text.is_empty() {
            return Ok(None);
        }
        let from_cache = speculated.is_some();
        let generation = match (speculated, &generator) {
            (Some(speculated), _) => speculated,
            (None, Generator::Local(worker)) => {
                self.generate_local(worker, &key, &prepared, &settings).await?
            }
            (None, Generator::Remote(remote)) => {
                self.generate_remote(remote.clone(), &prepared, &settings).await
            }
        };
        let Some(generation) = generation else {
            return Ok(None);
        };
        let suggestion = prepared.suggestion(&generation);
        let stats = &generation.stats;
        *lock(&self.shared.last) = Some(LastCompletion {
            uri: key.clone(),
            prompt_tokens: stats.prompt_tokens,
            reused_tokens: stats.reused_tokens,
            prefilled_tokens: stats.prefilled_tokens,
            generated_tokens: stats.generated_tokens,
            prefill_ms: stats.prefill_ms,
            decode_ms: stats.decode_ms,
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
            from_cache,
            stop: if from_cache {
                "speculated".into()
            } else {
                format!("{:?}", generation.stop)
            },
        });
        if let (Some(text), Generator::Local(worker), true) = (&suggestion, &generator, settings.speculate) {
            self.speculate(worker, &key, &rope, cursor, text, &settings);
        }
        let mut shown = lock(&self.shared.shown);
        match &suggestion {
            Some(text) => {
                shown.insert(
                    key,
                    Shown {
                        start_char: prepared.window.start_char,
                        before: prepared.window.text.clone(),
                        after: prepared.window.after.clone(),
                        suggestion: text.clone(),
                    },
                );
            }
            None => {
                shown.remove(&key);
            }
        }
        Ok(suggestion.map(|text| (rope, cursor, text)))
    }

    /// The model thread's generation for `prepared`; `None` when the job was dropped or cut short.
    async fn generate_local(
        &self,
        worker: &Arc<Worker>,
        key: &str,
        prepared: &Prepared,
        settings: &Settings,
    ) -> Result<Option<Generation>> {
        let test_panic = self
            .shared
            .test_panic
            .filter(|_| prepared.window.text.contains(TEST_PANIC_MARKER));
        if test_panic == Some(TestPanic::Request) {
            panic!("{TEST_PANIC_ENV}=request");
        }
        let mut job = prepared.job(key, settings);
        if test_panic == Some(TestPanic::Worker) {
            job.stop = Some(Box::new(|_: &str| panic!("{TEST_PANIC_ENV}=worker")));
        }
        let exit_worker = test_panic == Some(TestPanic::WorkerExit);
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(move |r| {
            if exit_worker {
                panic!("{TEST_PANIC_ENV}=worker-exit");
            }
            drop(tx.send(r))
        });
        // Dropping the ticket (this future dropped by $/cancelRequest) cancels the job.
        let _ticket = worker.submit(job, reply);
        match rx.await {
            Ok(Ok(JobOutcome::Finished(generation))) if generation.stop == StopReason::Cancelled => {
                // Superseded by a newer request for this document while it ran: what it has is
                // cut short, not the suggestion, and must not be shown or typed through.
                Ok(None)
            }
            Ok(Ok(JobOutcome::Finished(generation))) => Ok(Some(generation)),
            Ok(Ok(JobOutcome::Dropped)) => Ok(None),
            Err(_) => {
                // Every job's reply is called, unless the model thread died with the job queued
                // or in hand.
                self.restart_worker(worker).await;
                Err(Error {
                    message: "the model thread stopped; it is being restarted".into(),
                    ..Error::internal_error()
                })
            }
            Ok(Err(e)) => {
                tracing::error!("completion failed: {e}");
                Err(Error {
                    message: format!("completion failed: {e}").into(),
                    ..Error::internal_error()
                })
            }
        }
    }

    /// The remote backend's generation for `prepared`, read on a blocking thread; `None` when
    /// cancelled or failed (the failure goes to the status, the log and, once, a message).
    async fn generate_remote(
        &self,
        remote: Arc<Remote>,
        prepared: &Prepared,
        settings: &Settings,
    ) -> Option<Generation> {
        let job = prepared.job("", settings);
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let result = tokio::task::spawn_blocking(move || remote.run(job, &|| cancel.load(Ordering::Relaxed)))
            .await
            .unwrap_or_else(|e| Err(RemoteError(format!("the request thread failed: {e}"))));
        match result {
            Ok(generation) if generation.stop == StopReason::Cancelled => None,
            Ok(generation) => {
                *lock(&self.shared.backend_error) = None;
                Some(generation)
            }
            Err(e) => {
                self.remote_failed(e).await;
                None
            }
        }
    }

    /// A failed remote request: logged, kept for `phi-lsp/status`, shown when it is new.
    async fn remote_failed(&self, error: RemoteError) {
        let message = error.to_string();
        tracing::warn!("{message}");
        let new = lock(&self.shared.backend_error).replace(message.clone()).as_ref() != Some(&message);
        if new {
            self.client
                .show_message(MessageType::WARNING, format!("phi-lsp: {message}"))
                .await;
        }
    }

    /// Generation by the OpenAI-compatible server at `url`, which serves `model`. Nothing is
    /// loaded; a bad URL is a failed state, an unreachable server shows on the first request.
    async fn use_remote(&self, model: &str, url: &str) {
        self.forget_suggestions();
        *lock(&self.shared.backend_error) = None;
        match Remote::new(url, model) {
            Ok(remote) => {
                let message = format!("ready: {model} served by {}", remote.endpoint());
                tracing::info!("{message}");
                *lock(&self.shared.model) = (
                    ModelState::Ready {
                        message: message.clone(),
                        device_in_use: "remote".into(),
                        dtype_in_use: "remote".into(),
                    },
                    Some(Generator::Remote(Arc::new(remote))),
                );
                self.client
                    .log_message(MessageType::INFO, format!("phi-lsp: {message}"))
                    .await;
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!("{message}");
                *lock(&self.shared.model) = (
                    ModelState::Failed {
                        message: message.clone(),
                    },
                    None,
                );
                self.client
                    .show_message(MessageType::ERROR, format!("phi-lsp: {message}"))
                    .await;
            }
        }
    }

    /// After a new model, backend or settings, no earlier suggestion may be served from memory.
    fn forget_suggestions(&self) {
        lock(&self.shared.shown).clear();
        lock(&self.shared.speculation).current = None;
    }

    /// Once the user has been idle for [`SPECULATE_AFTER_IDLE`], starts computing the suggestion
    /// for the text as it will be when `suggestion` (at `cursor` of `rope`) is accepted: the same
    /// job a request there will make, without a deadline (any other request cancels it instead),
    /// so its answer is the one a fresh request would compute.
    fn speculate(
        &self,
        worker: &Arc<Worker>,
        key: &str,
        rope: &Rope,
        cursor: usize,
        suggestion: &str,
        settings: &Settings,
    ) {
        let mut accepted = rope.clone();
        accepted.insert(cursor, suggestion);
        let accepted_cursor = cursor + suggestion.chars().count();
        let (shared, worker, key, settings) = (
            self.shared.clone(),
            worker.clone(),
            key.to_string(),
            settings.clone(),
        );
        let requests = lock(&shared.speculation).requests;
        tokio::spawn(async move {
            tokio::time::sleep(SPECULATE_AFTER_IDLE).await;
            // Checked and set under the lock that requests take first, so a request either sees
            // this speculation or stops it from starting (it would supersede the request's job).
            let mut speculations = lock(&shared.speculation);
            if speculations.requests != requests {
                return;
            }
            let prepared = complete::prepare(&accepted, accepted_cursor, &settings);
            let mut job = prepared.job(&key, &settings);
            job.params.deadline = None;
            let (tx, rx) = oneshot::channel();
            let ticket = worker.submit(job, Box::new(move |r| drop(tx.send(r))));
            speculations.current = Some(Speculation {
                key,
                window: prepared.window,
                result: rx,
                _ticket: ticket,
            });
        });
    }

    /// `Some` when `prepared` is where the speculation was computed for: its generation (waiting for
    /// it if it is still running), or `None` when a newer request superseded it meanwhile. Any
    /// speculation is used up or cancelled here.
    async fn speculated(&self, key: &str, prepared: &Prepared) -> Option<Option<Generation>> {
        let speculation = {
            let mut speculations = lock(&self.shared.speculation);
            speculations.requests += 1;
            speculations.current.take()?
        };
        if speculation.key != key || speculation.window != prepared.window {
            return None;
        }
        Some(match speculation.result.await {
            Ok(Ok(JobOutcome::Finished(generation))) if generation.stop != StopReason::Cancelled => {
                Some(generation)
            }
            _ => None,
        })
    }

    /// When the text typed since the last suggestion is a prefix of it, the rest is the answer.
    fn type_through(&self, key: &str, prepared: &Prepared) -> Option<String> {
        let shown = lock(&self.shared.shown);
        let last = shown.get(key)?;
        let window = &prepared.window;
        if window.start_char != last.start_char || window.after != last.after {
            return None;
        }
        let typed = window.text.strip_prefix(last.before.as_str())?;
        let rest = last.suggestion.strip_prefix(typed)?;
        // Nothing typed (the client asking again at the same place) serves the same suggestion.
        (!rest.trim().is_empty()).then(|| rest.to_string())
    }

    fn mode_allows(&self, inline: bool) -> bool {
        let session = lock(&self.shared.session);
        match session.settings.completion_mode {
            CompletionMode::Both => true,
            CompletionMode::Inline => inline,
            CompletionMode::Menu => !inline,
            CompletionMode::Auto => inline == session.client_inline,
        }
    }

    async fn inline_completion(
        &self,
        params: InlineCompletionParams,
    ) -> Result<Option<InlineCompletionResponse>> {
        self.guarded("textDocument/inlineCompletion", async move {
            if !self.mode_allows(true) {
                return Ok(None);
            }
            let doc = &params.text_document_position;
            let Some((_, _, text)) = self.suggest(&doc.text_document.uri, doc.position).await? else {
                return Ok(Some(InlineCompletionResponse::Array(Vec::new())));
            };
            let item = InlineCompletionItem {
                insert_text: text,
                filter_text: None,
                range: Some(Range::new(doc.position, doc.position)),
                command: None,
                insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
            };
            Ok(Some(InlineCompletionResponse::Array(vec![item])))
        })
        .await
    }

    fn encoding(&self) -> PositionEncoding {
        lock(&self.shared.session).encoding
    }
}

fn lsp_encoding(encoding: PositionEncoding) -> PositionEncodingKind {
    match encoding {
        PositionEncoding::Utf8 => PositionEncodingKind::UTF8,
        PositionEncoding::Utf16 => PositionEncodingKind::UTF16,
        PositionEncoding::Utf32 => PositionEncodingKind::UTF32,
    }
}

/// utf-8 where the client offers it (no conversion cost), else utf-16, which every client supports.
fn negotiate_encoding(capabilities: &ClientCapabilities) -> PositionEncoding {
    let offered = capabilities
        .general
        .as_ref()
        .and_then(|g| g.position_encodings.clone())
        .unwrap_or_default();
    if offered.contains(&PositionEncodingKind::UTF8) {
        PositionEncoding::Utf8
    } else if offered.is_empty() || offered.contains(&PositionEncodingKind::UTF16) {
        PositionEncoding::Utf16
    } else if offered.contains(&PositionEncodingKind::UTF32) {
        PositionEncoding::Utf32
    } else {
        PositionEncoding::Utf16
    }
}

/// The identifier characters just before the cursor: a completion item's range starts there so that
/// menu clients (which filter by the word being typed) keep the item.
fn word_start(line_prefix: &str) -> usize {
    let word_chars = line_prefix
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .count();
    line_prefix.chars().count() - word_chars
}

impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let encoding = negotiate_encoding(&params.capabilities);
        let client_inline = params
            .capabilities
            .text_document
            .as_ref()
            .and_then(|t| t.inline_completion.as_ref())
            .is_some();
        let work_done_progress = params
            .capabilities
            .window
            .as_ref()
            .and_then(|w| w.work_done_progress)
            .unwrap_or(false);
        let mode = {
            let mut session = lock(&self.shared.session);
            session.encoding = encoding;
            session.client_inline = client_inline;
            session.work_done_progress = work_done_progress;
            if let Some(options) = &params.initialization_options {
                if let Err(e) = session.settings.apply(options) {
                    session.settings_error = Some(e);
                }
            }
            session.settings.completion_mode
        };
        let (inline, menu) = match mode {
            CompletionMode::Auto => (client_inline, !client_inline),
            CompletionMode::Inline => (true, false),
            CompletionMode::Menu => (false, true),
            CompletionMode::Both => (true, true),
        };
        let capabilities = ServerCapabilities {
            position_encoding: Some(lsp_encoding(encoding)),
            text_document_sync: Some(TextDocumentSyncCapability::Options(TextDocumentSyncOptions {
                open_close: Some(true),
                change: Some(TextDocumentSyncKind::INCREMENTAL),
                ..Default::default()
            })),
            inline_completion_provider: inline.then_some(OneOf::Left(true)),
            completion_provider: menu.then(|| CompletionOptions {
                trigger_characters: Some([".", "(", "[", ",", ":", "="].map(String::from).to_vec()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(InitializeResult {
            capabilities,
            server_info: Some(ServerInfo {
                name: "phi-lsp".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            offset_encoding: None,
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        let error = lock(&self.shared.session).settings_error.take();
        if let Some(error) = error {
            self.client
                .show_message(MessageType::WARNING, format!("phi-lsp: {error}; using defaults"))
                .await;
        }
        // Loading takes seconds to minutes; the server answers (empty) meanwhile.
        let backend = self.handle();
        tokio::spawn(async move { backend.load_model().await });
    }

    async fn shutdown(&self) -> Result<()> {
        // Drop the worker: its thread stops after the job in hand (which is cancelled by then).
        lock(&self.shared.model).1 = None;
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        self.guarded_notification("textDocument/didOpen", async move {
            let doc = params.text_document;
            let result =
                lock(&self.shared.documents).open(doc.uri.as_str(), &doc.text, doc.version, &doc.language_id);
            if let Err(e) = result {
                tracing::warn!("didOpen {}: {e}", doc.uri.as_str());
                self.client
                    .log_message(MessageType::WARNING, format!("phi-lsp: {e}"))
                    .await;
            }
        })
        .await
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        self.guarded_notification("textDocument/didChange", async move {
            let uri = params.text_document.uri.as_str().to_string();
            let edits: Vec<Edit> = params
                .content_changes
                .into_iter()
                .map(|change| Edit {
                    range: change.range.map(|r| {
                        (
                            convert::Pos {
                                line: r.start.line,
                                character: r.start.character,
                            },
                            convert::Pos {
                                line: r.end.line,
                                character: r.end.character,
                            },
                        )
                    }),
                    text: change.text,
                })
                .collect();
            let encoding = self.encoding();
            let result =
                lock(&self.shared.documents).change(&uri, params.text_document.version, &edits, encoding);
            if let Err(e) = result {
                tracing::warn!("didChange {uri}: {e}");
                self.client
                    .log_message(MessageType::WARNING, format!("phi-lsp: change ignored: {e}"))
                    .await;
            }
        })
        .await
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        self.guarded_notification("textDocument/didClose", async move {
            let uri = params.text_document.uri.as_str().to_string();
            lock(&self.shared.documents).close(&uri);
            lock(&self.shared.shown).remove(&uri);
            lock(&self.shared.speculation).current.take_if(|s| s.key == uri);
            let generator = lock(&self.shared.model).1.clone();
            if let Some(Generator::Local(worker)) = generator {
                worker.forget(&uri);
            }
        })
        .await
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        self.guarded_notification("workspace/didChangeConfiguration", async move {
            let (before, result) = {
                let mut session = lock(&self.shared.session);
                let before = session.settings.clone();
                (before, session.settings.apply(&params.settings))
            };
            if let Err(e) = result {
                self.client
                    .show_message(MessageType::WARNING, format!("phi-lsp: {e}"))
                    .await;
                return;
            }
            let after = self.settings();
            self.forget_suggestions();
            if after.model != before.model || after.context_tokens != before.context_tokens {
                self.load_model().await;
            }
        })
        .await
    }

    async fn completion(&self, params: CompletionParams) -> Result<Option<CompletionResponse>> {
        self.guarded("textDocument/completion", async move {
            if !self.mode_allows(false) {
                return Ok(None);
            }
            let doc = &params.text_document_position;
            let Some((rope, cursor, text)) = self.suggest(&doc.text_document.uri, doc.position).await? else {
                return Ok(Some(CompletionResponse::List(CompletionList {
                    is_incomplete: true,
                    items: Vec::new(),
                })));
            };
            // Replace from the start of the word being typed, so the client's filter keeps the item.
            let line_start = rope.line_to_char(rope.char_to_line(cursor));
            let prefix: String = rope.slice(line_start..cursor).chars().collect();
            let range_start = line_start + word_start(&prefix);
            let word = rope.slice(range_start..cursor).to_string();
            let start = convert::char_to_pos(&rope, range_start, self.encoding());
            let new_text = format!("{word}{text}");
            let first_line = new_text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
            let item = CompletionItem {
                label: format!("{first_line} (phi-1)"),
                kind: Some(CompletionItemKind::TEXT),
                detail: Some("Phi-1 suggestion".into()),
                documentation: Some(Documentation::MarkupContent(MarkupContent {
                    kind: MarkupKind::Markdown,
                    value: format!("```python\n{new_text}\n```"),
                })),
                filter_text: Some(new_text.clone()),
                sort_text: Some("0".into()),
                preselect: Some(true),
                insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
                text_edit: Some(CompletionTextEdit::Edit(TextEdit {
                    range: Range::new(Position::new(start.line, start.character), doc.position),
                    new_text,
                })),
                ..Default::default()
            };
            Ok(Some(CompletionResponse::List(CompletionList {
                is_incomplete: true,
                items: vec![item],
            })))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_start_finds_the_identifier_being_typed() {
        assert_eq!(word_start("    return fo"), 11);
        assert_eq!(word_start("x = "), 4);
        assert_eq!(word_start(""), 0);
        assert_eq!(word_start("é_1"), 0);
    }

    #[test]
    fn encoding_prefers_utf8_then_utf16() {
        let offer = |kinds: Vec<PositionEncodingKind>| ClientCapabilities {
            general: Some(GeneralClientCapabilities {
                position_encodings: Some(kinds),
                ..Default::default()
            }),
            ..Default::default()
        };
        use PositionEncodingKind as K;
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF16, K::UTF8])),
            PositionEncoding::Utf8
        );
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF32, K::UTF16])),
            PositionEncoding::Utf16
        );
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF32])),
            PositionEncoding::Utf32
        );
        assert_eq!(
            negotiate_encoding(&ClientCapabilities::default()),
            PositionEncoding::Utf16
        );
    }
}
