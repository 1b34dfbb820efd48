//! The model's life in the server: loading it (the newest load wins), choosing the local model
//! thread or a remote backend, budgeting the KV cache, and loading again when the model thread
//! dies. Plain types: what the user should see comes back as [`LoadOutcome`] and [`LoadProgress`]
//! for the server to send.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use phi_engine::{Worker, WorkerOptions};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::completion::backend::{Backend, LocalBackend};
use crate::completion::lock;
use crate::faults::TestPanic;
use crate::loading;
use crate::remote::Remote;
use crate::settings::{ModelSpec, Settings};

/// KV cache for all slots together; slots hold `context_tokens` positions each.
pub const KV_BUDGET_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ModelState {
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

/// How a load went, for the user.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadOutcome {
    /// The backend is installed; the message says what runs where.
    Ready(String),
    /// Nothing is installed; the message says why.
    Failed(String),
    /// A newer load started meanwhile and decides.
    Superseded,
}

/// Progress of a local load, in order: `Begin`, any `Report`s, `End`.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProgress {
    /// `seq` numbers the loads of this server; `description` names model, device and dtype.
    Begin {
        seq: u64,
        description: String,
    },
    /// A step, and how far the load is (percent, for `$/progress`; see [`load_percent`]).
    Report {
        message: String,
        percentage: u32,
    },
    End(String),
}

/// How far a load is, in percent. Downloading the weights (when they are not in the cache) is
/// most of a first load, then the first forward; a cached model goes from reading its weights
/// straight to the first forward.
pub mod load_percent {
    /// Reading the weights (from the cache or a folder), and small files being downloaded.
    pub const READING: u32 = 5;
    /// The end of a weights download: between `READING` and this, by the file's bytes.
    pub const DOWNLOADED: u32 = 80;
    /// The first forward (warm-up).
    pub const WARM_UP: u32 = 85;
    const _RISING: () = assert!(READING < DOWNLOADED && DOWNLOADED < WARM_UP && WARM_UP < 100);
    /// Files smaller than this (config, tokenizer, index) do not move the percentage.
    const WEIGHTS_FILE_BYTES: u64 = 16 << 20;

    /// While downloading a file: `done` of `total` bytes.
    pub fn downloading(done: u64, total: u64) -> u32 {
        if total < WEIGHTS_FILE_BYTES {
            return READING;
        }
        let span = u64::from(DOWNLOADED - READING);
        READING + (span * done.min(total) / total) as u32
    }
}

struct Installed {
    state: ModelState,
    backend: Option<Arc<dyn Backend>>,
    /// The slot limit of the current worker (0 before one is loaded).
    max_slots: usize,
}

pub struct ModelHost {
    installed: Mutex<Installed>,
    /// Only the newest load may install its backend.
    load_seq: AtomicU64,
    test_panic: Option<TestPanic>,
}

impl ModelHost {
    pub fn new(test_panic: Option<TestPanic>) -> Self {
        ModelHost {
            installed: Mutex::new(Installed {
                state: ModelState::Loading {
                    message: "waiting for initialized".into(),
                },
                backend: None,
                max_slots: 0,
            }),
            load_seq: AtomicU64::new(0),
            test_panic,
        }
    }

    /// What generates now; `None` while loading or after a failure.
    pub fn backend(&self) -> Option<Arc<dyn Backend>> {
        lock(&self.installed).backend.clone()
    }

    pub fn state(&self) -> ModelState {
        lock(&self.installed).state.clone()
    }

    pub fn max_slots(&self) -> usize {
        lock(&self.installed).max_slots
    }

    /// Drops the backend: the model thread stops after the job in hand (cancelled by then).
    pub fn shutdown(&self) {
        lock(&self.installed).backend = None;
    }

    /// `dead`'s model thread has exited (a panic outside its per-job guard): the engine went with
    /// it. True for the first caller to notice, who must [`Self::load`] again.
    pub fn stopped(&self, dead: &Arc<dyn Backend>, message: &str) -> bool {
        let mut installed = lock(&self.installed);
        let current = installed.backend.as_ref();
        if !current.is_some_and(|b| std::ptr::addr_eq(Arc::as_ptr(b), Arc::as_ptr(dead))) {
            return false;
        }
        installed.set(loading_state(message), None);
        true
    }

    /// Loads what `settings` name: the model on a blocking thread (reporting on `progress`), or a
    /// remote backend. The newest load wins.
    pub async fn load(&self, settings: &Settings, progress: UnboundedSender<LoadProgress>) -> LoadOutcome {
        let seq = self.load_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let spec = settings.model.clone();
        if !spec.is_local() {
            return self.use_remote(&spec);
        }
        let description = format!("{} ({}, {})", spec.model, spec.device, spec.dtype);
        lock(&self.installed).set(loading_state(&format!("loading {description}")), None);
        tracing::info!("loading {description}");
        let _ = progress.send(LoadProgress::Begin {
            seq,
            description: description.clone(),
        });
        let _ = progress.send(LoadProgress::Report {
            message: format!("reading weights of {}", spec.model),
            percentage: load_percent::READING,
        });

        let context_tokens = settings.context_tokens;
        let test_panic = self.test_panic;
        let reports = progress.clone();
        let load =
            tokio::task::spawn_blocking(move || load_local(&spec, context_tokens, test_panic, &reports));
        let result = match load.await {
            Ok(result) => result,
            Err(join) => Err(anyhow::anyhow!("the loading thread failed: {join}")),
        };
        if self.load_seq.load(Ordering::SeqCst) != seq {
            tracing::info!("a newer model load superseded {description}");
            let _ = progress.send(LoadProgress::End("superseded".into()));
            return LoadOutcome::Superseded;
        }
        match result {
            Ok(local) => {
                let message = format!("ready: {description} on {}, {}", local.device, local.dtype);
                tracing::info!("{message}");
                let state = ModelState::Ready {
                    message: message.clone(),
                    device_in_use: local.device,
                    dtype_in_use: local.dtype,
                };
                let mut installed = lock(&self.installed);
                installed.max_slots = local.max_slots;
                installed.set(state, Some(Arc::new(local.backend)));
                drop(installed);
                let _ = progress.send(LoadProgress::End(message.clone()));
                LoadOutcome::Ready(message)
            }
            Err(e) => {
                let message = format!("{e:#}").replace('\n', " ");
                tracing::error!("model load failed: {message}");
                lock(&self.installed).set(
                    ModelState::Failed {
                        message: message.clone(),
                    },
                    None,
                );
                let _ = progress.send(LoadProgress::End("failed".into()));
                LoadOutcome::Failed(format!("could not load the model: {message}"))
            }
        }
    }

    /// Generation by the OpenAI-compatible server at `spec.backend`, which serves `spec.model`.
    /// Nothing is loaded; a bad URL is a failed state, an unreachable server shows on the first
    /// request.
    fn use_remote(&self, spec: &ModelSpec) -> LoadOutcome {
        let mut installed = lock(&self.installed);
        match Remote::new(&spec.backend, &spec.model) {
            Ok(remote) => {
                let message = format!("ready: {} served by {}", spec.model, remote.endpoint());
                tracing::info!("{message}");
                let state = ModelState::Ready {
                    message: message.clone(),
                    device_in_use: "remote".into(),
                    dtype_in_use: "remote".into(),
                };
                installed.set(state, Some(Arc::new(remote)));
                LoadOutcome::Ready(message)
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!("{message}");
                installed.set(
                    ModelState::Failed {
                        message: message.clone(),
                    },
                    None,
                );
                LoadOutcome::Failed(message)
            }
        }
    }
}

impl Installed {
    fn set(&mut self, state: ModelState, backend: Option<Arc<dyn Backend>>) {
        self.state = state;
        self.backend = backend;
    }
}

fn loading_state(message: &str) -> ModelState {
    ModelState::Loading {
        message: message.into(),
    }
}

/// A loaded model thread and what it runs on.
struct LocalModel {
    backend: LocalBackend,
    device: String,
    dtype: String,
    max_slots: usize,
}

/// Loads (downloading if need be) and warms up the model, then starts its thread with as many
/// slots of `context_tokens` positions as fit [`KV_BUDGET_BYTES`].
fn load_local(
    spec: &ModelSpec,
    context_tokens: usize,
    test_panic: Option<TestPanic>,
    progress: &UnboundedSender<LoadProgress>,
) -> anyhow::Result<LocalModel> {
    let mut report = |file: &str, done: u64, total: u64| {
        let _ = progress.send(LoadProgress::Report {
            message: format!("downloading {file}: {} / {} MB", done >> 20, total >> 20),
            percentage: load_percent::downloading(done, total),
        });
    };
    let engine = loading::load(spec, Some(&mut report))?;
    let _ = progress.send(LoadProgress::Report {
        message: "preparing the weights (a first forward)".into(),
        percentage: load_percent::WARM_UP,
    });
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
    let capacity = context_tokens.min(cfg.max_position_embeddings);
    let options = WorkerOptions::within_budget(&cfg, bytes, capacity, KV_BUDGET_BYTES);
    let worker = Worker::spawn(engine, options)?;
    Ok(LocalModel {
        backend: LocalBackend::new(worker, capacity, test_panic),
        device,
        dtype,
        max_slots: options.max_slots,
    })
}

#[cfg(test)]
mod tests {
    use super::load_percent::*;

    #[test]
    fn a_weights_download_moves_the_percentage_from_reading_to_downloaded() {
        let total = 2_800 << 20; // model.safetensors of Phi-1, about 2.8 GB
        assert_eq!(downloading(0, total), READING);
        assert_eq!(downloading(total / 2, total), (READING + DOWNLOADED) / 2);
        assert_eq!(downloading(total, total), DOWNLOADED);
        assert_eq!(downloading(total + 1, total), DOWNLOADED, "never past the end");
    }

    #[test]
    fn small_files_do_not_move_the_percentage() {
        // config.json and tokenizer.json: done at once, so 100 % of them would jump ahead.
        assert_eq!(downloading(2_100_000, 2_100_000), READING);
        assert_eq!(downloading(0, 0), READING);
    }
}
