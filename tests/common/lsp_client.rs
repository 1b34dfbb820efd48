//! A minimal LSP client over the real binary's stdio, for end-to-end tests: frames messages,
//! answers the server's requests (progress tokens, configuration), and keeps notifications.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct LspClient {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Value>,
    next_id: i64,
    /// Notifications (and server requests) received so far, in order.
    pub notifications: Vec<Value>,
    /// The server's log (stderr), when spawned with [`LspClient::spawn_capturing_stderr`].
    stderr: Option<Arc<Mutex<String>>>,
}

pub const TIMEOUT: Duration = Duration::from_secs(60);

fn read_message(reader: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(value) = line.strip_prefix("Content-Length:") {
            length = value.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0u8; length?];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

impl LspClient {
    pub fn spawn(mut command: Command) -> Self {
        command.stderr(Stdio::inherit());
        Self::spawn_inner(command)
    }

    fn spawn_inner(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("phi-lsp starts");
        let stdout = child.stdout.take().expect("stdout");
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
        LspClient {
            child,
            stdin,
            messages: rx,
            next_id: 1,
            notifications: Vec::new(),
            stderr: None,
        }
    }

    /// Like [`LspClient::spawn`], but keeps the server's stderr (its log) for [`LspClient::wait_log`]
    /// while still passing it through to the test's stderr.
    pub fn spawn_capturing_stderr(mut command: Command) -> Self {
        command.stderr(Stdio::piped());
        let mut client = Self::spawn_inner(command);
        let stderr = client.child.stderr.take().expect("stderr");
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
        client.stderr = Some(log);
        client
    }

    /// Waits until the server's log has a line containing `needle`; returns that line.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until `count` lines of the server's log contain `needle`; returns the last of them.
    pub fn wait_log_count(&self, needle: &str, count: usize) -> String {
        let log = self.stderr.as_ref().expect("spawned with spawn_capturing_stderr");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
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
        let log = self.stderr.as_ref().expect("spawned with spawn_capturing_stderr");
        let text = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        text.lines().filter(|l| l.contains(needle)).count()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("writes");
        stdin.flush().expect("flushes");
    }

    pub fn send(&mut self, message: &Value) {
        let body = message.to_string();
        let frame = format!("Content-Length: {}\r\n\r\n{body}", body.len());
        self.send_raw(frame.as_bytes());
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request and returns its id without waiting.
    pub fn request_async(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            message["params"] = params;
        }
        self.send(&message);
        id
    }

    /// The whole response (`result` or `error`) to request `id`.
    pub fn response(&mut self, id: i64) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self
                .next_message(deadline)
                .unwrap_or_else(|| panic!("no response to request {id}"));
            if message.get("id") == Some(&json!(id)) && message.get("method").is_none() {
                return message;
            }
            self.handle_other(message);
        }
    }

    /// Sends a request and returns its `result`, panicking on an error response.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.request_async(method, params);
        let response = self.response(id);
        if let Some(error) = response.get("error") {
            panic!("{method} failed: {error}");
        }
        response["result"].clone()
    }

    fn next_message(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.messages.recv_timeout(left).ok()
    }

    /// Answers server requests (progress creation, configuration) and keeps notifications.
    fn handle_other(&mut self, message: Value) {
        if let (Some(id), Some(method)) = (message.get("id"), message.get("method").and_then(Value::as_str)) {
            let result = if method == "workspace/configuration" {
                json!([null])
            } else {
                Value::Null
            };
            self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}));
        }
        self.notifications.push(message);
    }

    /// Waits until a message satisfying `pred` has arrived (already, or within the timeout).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.notifications.iter().find(|m| pred(m)) {
            return found.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self
                .next_message(deadline)
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            let hit = pred(&message);
            self.handle_other(message.clone());
            if hit {
                return message;
            }
        }
    }

    pub fn status(&mut self) -> Value {
        self.request("phi-lsp/status", Value::Null)
    }

    /// Polls `phi-lsp/status` until `pred` holds for it.
    pub fn wait_status(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let status = self.status();
            if pred(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `phi-lsp/status` until the model is ready (panics if it failed).
    pub fn wait_ready(&mut self) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let status = self.status();
            match status["state"].as_str() {
                Some("ready") => return status,
                Some("failed") => panic!("model failed to load: {status}"),
                _ if Instant::now() > deadline => panic!("model not ready: {status}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn initialize(&mut self, capabilities: Value, options: Value) -> Value {
        let result = self.request(
            "initialize",
            json!({"processId": null, "rootUri": null, "capabilities": capabilities, "initializationOptions": options}),
        );
        self.notify("initialized", json!({}));
        result
    }

    pub fn open(&mut self, uri: &str, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}}),
        );
    }

    pub fn shutdown(mut self) -> std::process::ExitStatus {
        self.request("shutdown", Value::Null);
        self.notify("exit", Value::Null);
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "phi-lsp did not exit after shutdown/exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Opens `uri` at `version`.
    pub fn open_version(&mut self, uri: &str, text: &str, version: i32) {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "python", "version": version, "text": text}}),
        );
    }

    pub fn close(&mut self, uri: &str) {
        self.notify("textDocument/didClose", json!({"textDocument": {"uri": uri}}));
    }

    /// Sends `textDocument/didChange` with these content changes.
    pub fn change(&mut self, uri: &str, version: i32, changes: Value) {
        self.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri, "version": version}, "contentChanges": changes}),
        );
    }

    /// Sends `text` inserted at (line, character) as a `textDocument/didChange`.
    pub fn insert(&mut self, uri: &str, version: i32, line: u32, character: u32, text: &str) {
        let at = json!({"line": line, "character": character});
        self.change(
            uri,
            version,
            json!([{"range": {"start": at, "end": at}, "text": text}]),
        );
    }

    /// Sends `textDocument/inlineCompletion` at (line, character) without waiting.
    pub fn inline_async(&mut self, uri: &str, line: u32, character: u32) -> i64 {
        self.request_async(
            "textDocument/inlineCompletion",
            inline_params(uri, line, character),
        )
    }

    /// `textDocument/inlineCompletion` at (line, character): its `result`.
    pub fn inline(&mut self, uri: &str, line: u32, character: u32) -> Value {
        self.request(
            "textDocument/inlineCompletion",
            inline_params(uri, line, character),
        )
    }

    /// The response to request `id` if it has arrived or arrives within `timeout`. Unlike
    /// [`LspClient::response`] it also finds a response that came while waiting for another one, so
    /// requests in flight together may be answered in any order.
    pub fn response_within(&mut self, id: i64, timeout: Duration) -> Option<Value> {
        let is_response = |m: &Value| m.get("id") == Some(&json!(id)) && m.get("method").is_none();
        if let Some(idx) = self.notifications.iter().position(is_response) {
            return Some(self.notifications.remove(idx));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.next_message(deadline)?;
            if message.get("id") == Some(&json!(id)) && message.get("method").is_none() {
                return Some(message);
            }
            self.handle_other(message);
        }
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }
}

impl Drop for LspClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An automatic (`triggerKind` 2) inline completion request at (line, character).
fn inline_params(uri: &str, line: u32, character: u32) -> Value {
    json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
           "context": {"triggerKind": 2}})
}
