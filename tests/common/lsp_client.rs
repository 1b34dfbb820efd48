//! The end-to-end tests' LSP client: phi-lsp's own [`phi_lsp::lsp_client::LspClient`] (the one
//! `phi-lsp bench` drives the server with), where every failure is a panic that says what went
//! wrong, positions are (line, character), and the server's log can be waited on.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use phi_lsp::convert::Pos;
use phi_lsp::lsp_client;
use serde_json::Value;

/// How long one answer, readiness or a log line may take.
pub const TIMEOUT: Duration = lsp_client::DEFAULT_TIMEOUT;

pub struct LspClient(lsp_client::LspClient);

/// The test fails, with the client's message, where the client fails.
fn ok<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}"))
}

impl Deref for LspClient {
    type Target = lsp_client::LspClient;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for LspClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl LspClient {
    pub fn spawn(command: Command) -> Self {
        LspClient(ok(lsp_client::LspClient::spawn(command)))
    }

    /// Like [`LspClient::spawn`], but keeps the server's stderr (its log) for [`LspClient::wait_log`]
    /// while still passing it through to the test's stderr.
    pub fn spawn_capturing_stderr(command: Command) -> Self {
        LspClient(ok(lsp_client::LspClient::spawn_capturing_stderr(command)))
    }

    fn log_text(&self) -> String {
        self.0.log().expect("spawned with spawn_capturing_stderr")
    }

    /// Waits until the server's log has a line containing `needle`; returns that line.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until `count` lines of the server's log contain `needle`; returns the last of them.
    pub fn wait_log_count(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= count {
                return lines[count - 1].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {count} log lines with {needle:?} in:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many lines of the server's log contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        ok(self.0.send_raw(bytes))
    }

    pub fn send(&mut self, message: &Value) {
        ok(self.0.send(message))
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        ok(self.0.notify(method, params))
    }

    /// Sends a request and returns its id without waiting.
    pub fn request_async(&mut self, method: &str, params: Value) -> i64 {
        ok(self.0.request_async(method, params))
    }

    /// The whole response (`result` or `error`) to request `id`.
    pub fn response(&mut self, id: i64) -> Value {
        ok(self.0.response(id))
    }

    /// Sends a request and returns its `result`, panicking on an error response.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        ok(self.0.request(method, params))
    }

    /// The response to request `id` if it has arrived or arrives within `timeout`, in any order.
    pub fn response_within(&mut self, id: i64, timeout: Duration) -> Option<Value> {
        ok(self.0.response_within(id, timeout))
    }

    /// Waits until a message satisfying `pred` has arrived (already, or within the timeout).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        ok(self.0.wait_for(what, pred))
    }

    pub fn status(&mut self) -> Value {
        ok(self.0.status())
    }

    /// Polls `phi-lsp/status` until `pred` holds for it.
    pub fn wait_status(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        ok(self.0.wait_status(what, pred))
    }

    /// Polls `phi-lsp/status` until the model is ready (panics if it failed).
    pub fn wait_ready(&mut self) -> Value {
        ok(self.0.wait_ready(TIMEOUT))
    }

    pub fn initialize(&mut self, capabilities: Value, options: Value) -> Value {
        ok(self.0.initialize(capabilities, options))
    }

    pub fn open(&mut self, uri: &str, text: &str) {
        ok(self.0.open(uri, text))
    }

    /// Opens `uri` at `version`.
    pub fn open_version(&mut self, uri: &str, text: &str, version: i32) {
        ok(self.0.open_version(uri, text, version))
    }

    pub fn close(&mut self, uri: &str) {
        ok(self.0.close(uri))
    }

    /// Sends `textDocument/didChange` with these content changes.
    pub fn change(&mut self, uri: &str, version: i32, changes: Value) {
        ok(self.0.change(uri, version, changes))
    }

    /// Sends `text` inserted at (line, character) as a `textDocument/didChange`.
    pub fn insert(&mut self, uri: &str, version: i32, line: u32, character: u32, text: &str) {
        ok(self.0.insert(uri, version, Pos::new(line, character), text))
    }

    /// Sends `textDocument/inlineCompletion` at (line, character) without waiting.
    pub fn inline_async(&mut self, uri: &str, line: u32, character: u32) -> i64 {
        ok(self.0.inline_async(uri, Pos::new(line, character)))
    }

    /// `textDocument/inlineCompletion` at (line, character): its `result`.
    pub fn inline(&mut self, uri: &str, line: u32, character: u32) -> Value {
        ok(self.0.inline(uri, Pos::new(line, character)))
    }

    /// `shutdown` and `exit`; panics unless the server exits within 10 s.
    pub fn shutdown(self) -> ExitStatus {
        ok(self.0.shutdown())
    }

    /// `shutdown` and `exit`, then the server's whole log (spawned with `spawn_capturing_stderr`).
    pub fn shutdown_with_log(self) -> (ExitStatus, String) {
        let (status, log) = ok(self.0.shutdown_with_log());
        (status, log.expect("spawned with spawn_capturing_stderr"))
    }

    /// The exit status, once the process has exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        ok(self.0.wait_exit(timeout))
    }
}
