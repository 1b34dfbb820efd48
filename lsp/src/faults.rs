//! Faults kept from the user: [`catch_panic`] turns a panic in a handler into an error answer. And
//! test-only fault injection to prove it: when the server starts with `PHI_LSP_TEST_PANIC` set, a
//! completion whose prompt contains [`TEST_PANIC_MARKER`] panics: `request` in the request handler, `worker`
//! inside the job on the model thread, `worker-exit` on the model thread outside its per-job guard
//! (the thread dies, as it would on a bug in the worker itself). The fault tests
//! (`tests/faults.rs`) use it to show that no panic takes the server down; without the variable,
//! or for any other text, nothing changes.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Poll;

pub const TEST_PANIC_ENV: &str = "PHI_LSP_TEST_PANIC";
pub const TEST_PANIC_MARKER: &str = "PHI_LSP_TEST_PANIC";

/// Tests only: sleep this many milliseconds after each generated token, so that a suggestion grows
/// slowly enough for a test (or a real editor) to watch it grow.
pub const TEST_TOKEN_DELAY_ENV: &str = "PHI_LSP_TEST_TOKEN_DELAY_MS";

/// The delay [`TEST_TOKEN_DELAY_ENV`] asks for, if any (read when the model is loaded).
pub fn test_token_delay() -> Option<std::time::Duration> {
    let value = std::env::var(TEST_TOKEN_DELAY_ENV).ok()?;
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => {
            tracing::warn!("{TEST_TOKEN_DELAY_ENV}={ms}: every token waits {ms} ms (tests only)");
            Some(std::time::Duration::from_millis(ms))
        }
        _ => {
            tracing::warn!("{TEST_TOKEN_DELAY_ENV}={value:?} ignored: use a number of milliseconds");
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestPanic {
    Request,
    Worker,
    WorkerExit,
}

impl TestPanic {
    /// The site the environment asks for, if any (read once, when the server starts).
    pub fn from_env() -> Option<Self> {
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

    /// Panics, naming the site.
    pub fn fire(self) -> ! {
        let site = match self {
            TestPanic::Request => "request",
            TestPanic::Worker => "worker",
            TestPanic::WorkerExit => "worker-exit",
        };
        panic!("{TEST_PANIC_ENV}={site}")
    }
}

/// Polls `future`, turning a panic inside it into `Err` with the panic's message. tower-lsp-server
/// polls every handler on the task that serves stdio, so a panic that escaped a handler would end
/// the server.
pub async fn catch_panic<F: Future>(future: F) -> std::result::Result<F::Output, String> {
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

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
