//! An LSP client over a child process's stdio, the one phi-lsp has: `phi-lsp bench` drives the real
//! server with it, and so do the end-to-end tests (`tests/common`). It frames messages, answers the
//! server's own requests (configuration, progress tokens), keeps notifications, and can keep the
//! server's log. Every wait ends after the client's timeout with an error that says what it waited
//! for.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::convert::Pos;

/// How long one answer may take unless [`LspClient::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LspClient {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Value>,
    next_id: i64,
    timeout: Duration,
    /// Notifications, server requests and responses no one has asked for yet, in order.
    pub notifications: Vec<Value>,
    /// The server's log (stderr), when spawned with [`LspClient::spawn_capturing_stderr`].
    log: Option<Arc<Mutex<String>>>,
}

impl LspClient {
    /// Starts `command` (a `phi-lsp --stdio` command line) with its stderr passed through.
    pub fn spawn(mut command: Command) -> Result<Self> {
        command.stderr(Stdio::inherit());
        Self::spawn_piped(command)
    }

    /// Like [`LspClient::spawn`], but keeps the server's stderr (its log) for [`LspClient::log`]
    /// while still passing it through to this process's stderr.
    pub fn spawn_capturing_stderr(mut command: Command) -> Result<Self> {
        command.stderr(Stdio::piped());
        let mut client = Self::spawn_piped(command)?;
        let stderr = client.child.stderr.take().context("the server has no stderr")?;
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        client.log = Some(log);
        Ok(client)
    }

    fn spawn_piped(mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the server")?;
        let stdout = child.stdout.take().context("the server has no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            while let Some(message) = read_message(&mut reader) {
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(LspClient {
            child,
            stdin,
            messages: rx,
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            notifications: Vec::new(),
            log: None,
        })
    }

    /// How long one answer (and each `wait_*` but [`LspClient::wait_ready`]) may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's log so far, when spawned with [`LspClient::spawn_capturing_stderr`].
    pub fn log(&self) -> Option<String> {
        let log = self.log.as_ref()?;
        Some(log.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the server's stdin is closed")?;
        stdin
            .write_all(bytes)
            .and_then(|_| stdin.flush())
            .context("cannot write to the server: it may have exited (see its log above)")
    }

    pub fn send(&mut self, message: &Value) -> Result<()> {
        let body = message.to_string();
        let frame = format!("Content-Length: {}\r\n\r\n{body}", body.len());
        self.send_raw(frame.as_bytes())
    }

    pub fn notify(&mut self, method: &str, params: Value) -> Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    /// Sends a request and returns its id without waiting.
    pub fn request_async(&mut self, method: &str, params: Value) -> Result<i64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            message["params"] = params;
        }
        self.send(&message)?;
        Ok(id)
    }

    /// The whole response (`result` or `error`) to request `id`.
    pub fn response(&mut self, id: i64) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.next_message(deadline).ok_or_else(|| {
                anyhow!("no response to request {id} from the server: it exited or hung (see its log above)")
            })?;
            if is_response_to(&message, id) {
                return Ok(message);
            }
            self.handle_other(message)?;
        }
    }

    /// Sends a request and returns its `result`; an error response is an error.
    pub fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.request_async(method, params)?;
        let response = self
            .response(id)
            .with_context(|| format!("no answer to {method}"))?;
        if let Some(error) = response.get("error") {
            bail!("{method} failed: {error}");
        }
        Ok(response.get("result").cloned().unwrap_or(Value::Null))
    }

    /// The response to request `id` if it has arrived or arrives within `timeout` (None if not).
    /// Unlike [`LspClient::response`] it also finds a response that came while waiting for another
    /// one, so requests in flight together may be answered in any order.
    pub fn response_within(&mut self, id: i64, timeout: Duration) -> Result<Option<Value>> {
        if let Some(idx) = self.notifications.iter().position(|m| is_response_to(m, id)) {
            return Ok(Some(self.notifications.remove(idx)));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Some(message) = self.next_message(deadline) else {
                return Ok(None);
            };
            if is_response_to(&message, id) {
                return Ok(Some(message));
            }
            self.handle_other(message)?;
        }
    }

    fn next_message(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.messages.recv_timeout(left).ok()
    }

    /// Answers server requests (progress creation, configuration) and keeps every message.
    fn handle_other(&mut self, message: Value) -> Result<()> {
        if let (Some(id), Some(method)) = (message.get("id"), message.get("method").and_then(Value::as_str)) {
            let result = if method == "workspace/configuration" {
                json!([null])
            } else {
                Value::Null
            };
            self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}))?;
        }
        self.notifications.push(message);
        Ok(())
    }

    /// Waits until a message satisfying `pred` has arrived (already, or within the timeout).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(found) = self.notifications.iter().find(|m| pred(m)) {
            return Ok(found.clone());
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self
                .next_message(deadline)
                .ok_or_else(|| anyhow!("timed out waiting for {what}"))?;
            let hit = pred(&message);
            self.handle_other(message.clone())?;
            if hit {
                return Ok(message);
            }
        }
    }

    /// `phi-lsp/status`: the model's state, the last completion's figures, the speculation.
    pub fn status(&mut self) -> Result<Value> {
        self.request("phi-lsp/status", Value::Null)
    }

    /// Polls `phi-lsp/status` until `pred` holds for it.
    pub fn wait_status(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let status = self.status()?;
            if pred(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `phi-lsp/status` until the model is ready, for up to `timeout` (loading a model from
    /// disk can take longer than any one answer); an error if it failed to load.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            match status["state"].as_str() {
                Some("ready") => return Ok(status),
                Some("failed") => bail!("the server could not load the model: {status}"),
                _ if Instant::now() > deadline => {
                    bail!("the model was not ready after {timeout:?}: {status}")
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `initialize` with these client capabilities and initialization options, then `initialized`.
    pub fn initialize(&mut self, capabilities: Value, options: Value) -> Result<Value> {
        let result = self.request(
            "initialize",
            json!({"processId": std::process::id(), "rootUri": null, "capabilities": capabilities,
                   "initializationOptions": options}),
        )?;
        self.notify("initialized", json!({}))?;
        Ok(result)
    }

    /// Opens a Python document `uri` at version 1.
    pub fn open(&mut self, uri: &str, text: &str) -> Result<()> {
        self.open_version(uri, text, 1)
    }

    /// Opens a Python document `uri` at `version`.
    pub fn open_version(&mut self, uri: &str, text: &str, version: i32) -> Result<()> {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "python", "version": version, "text": text}}),
        )
    }

    pub fn close(&mut self, uri: &str) -> Result<()> {
        self.notify("textDocument/didClose", json!({"textDocument": {"uri": uri}}))
    }

    /// Sends `textDocument/didChange` with these content changes.
    pub fn change(&mut self, uri: &str, version: i32, changes: Value) -> Result<()> {
        self.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri, "version": version}, "contentChanges": changes}),
        )
    }

    /// Sends `text` inserted at `at` as a `textDocument/didChange`.
    pub fn insert(&mut self, uri: &str, version: i32, at: Pos, text: &str) -> Result<()> {
        let at = position(at);
        self.change(
            uri,
            version,
            json!([{"range": {"start": at, "end": at}, "text": text}]),
        )
    }

    /// Sends `textDocument/inlineCompletion` at `at` without waiting.
    pub fn inline_async(&mut self, uri: &str, at: Pos) -> Result<i64> {
        self.request_async("textDocument/inlineCompletion", inline_params(uri, at))
    }

    /// `textDocument/inlineCompletion` at `at`: its `result`.
    pub fn inline(&mut self, uri: &str, at: Pos) -> Result<Value> {
        self.request("textDocument/inlineCompletion", inline_params(uri, at))
    }

    /// `shutdown`, `exit`, and the exit status once the server has left (within 10 s). Where it
    /// does not leave, dropping the client kills it.
    pub fn shutdown(mut self) -> Result<ExitStatus> {
        self.request("shutdown", Value::Null)?;
        self.notify("exit", Value::Null)?;
        self.close_stdin();
        self.wait_exit(Duration::from_secs(10))?
            .context("phi-lsp did not exit after shutdown/exit")
    }

    /// [`LspClient::shutdown`], then the server's whole log: its stderr read to the end, when
    /// spawned with [`LspClient::spawn_capturing_stderr`] (None otherwise).
    pub fn shutdown_with_log(mut self) -> Result<(ExitStatus, Option<String>)> {
        let log = self.log.take();
        let status = self.shutdown()?;
        let Some(log) = log else {
            return Ok((status, None));
        };
        // The reader thread drops its handle at the end of stderr.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&log) > 1 {
            if Instant::now() >= deadline {
                bail!("the server's stderr did not end after it exited");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok((status, Some(text)))
    }

    /// The server's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited within `timeout` (None if it has not).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("cannot wait for the server")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }
}

/// The server is our own child: it does not outlive the client.
impl Drop for LspClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_response_to(message: &Value, id: i64) -> bool {
    message.get("id") == Some(&json!(id)) && message.get("method").is_none()
}

fn position(pos: Pos) -> Value {
    json!({"line": pos.line, "character": pos.character})
}

/// An automatic (`triggerKind` 2) inline completion request at `at`.
fn inline_params(uri: &str, at: Pos) -> Value {
    json!({"textDocument": {"uri": uri}, "position": position(at), "context": {"triggerKind": 2}})
}

/// One framed message from the server (None once its stdout ends or a frame is unreadable).
/// Blank lines before a header block are skipped; header names are case-insensitive.
fn read_message(reader: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            if length.is_some() {
                break;
            }
            continue;
        }
        if let Some((key, value)) = line.split_once(':') {
            if key.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0u8; length?];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frames_and_skips_blank_lines_between_them() {
        let input = b"Content-Length: 7\r\n\r\n{\"a\":1}\r\n\r\ncontent-length: 2\r\n\r\n[]";
        let mut reader = &input[..];
        assert_eq!(read_message(&mut reader), Some(json!({"a": 1})));
        assert_eq!(read_message(&mut reader), Some(json!([])));
        assert_eq!(read_message(&mut reader), None);
    }
}
