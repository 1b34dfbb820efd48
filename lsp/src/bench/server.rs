//! The keystroke through the real server: starts this binary as `phi-lsp --stdio`, types into a
//! document over LSP, and reads the server's own figures from `phi-lsp/status`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::keystroke::KeystrokeText;
use super::rss::peak_rss_bytes;
use super::stats::{ms, round, Spread};
use super::{progress, LINE_TOKENS, SLOT_CAPACITY};
use crate::args::BenchArgs;
use crate::settings::ModelSpec;

/// The keystroke through the real server.
pub struct ServerRuns {
    pub load_s: f64,
    pub first_ms: f64,
    pub rtt: Vec<f64>,
    pub p50: f64,
    pub p90: f64,
    pub lasts: Vec<Value>,
    pub typed_through: usize,
    /// Accepting the last suggestion and asking again, once the server has computed the next one
    /// while idle: the round trip, and whether it was served from that speculation.
    pub accept: Option<(f64, bool)>,
    pub peak_rss: Option<u64>,
}

impl ServerRuns {
    pub fn json(&self) -> Value {
        let model_served = || self.lasts.iter().filter(|l| l["from_cache"] == json!(false));
        let field = |key: &str| -> Vec<f64> { model_served().filter_map(|l| l[key].as_f64()).collect() };
        let count = |key: &str| -> Vec<u64> { model_served().filter_map(|l| l[key].as_u64()).collect() };
        json!({
            "load_s": round(self.load_s),
            "first_request_ms": round(self.first_ms),
            "keystrokes": self.rtt.len(),
            "typed_through": self.typed_through,
            "accept_ms": self.accept.map(|(ms, _)| round(ms)),
            "accept_speculated": self.accept.map(|(_, speculated)| speculated),
            "rtt_ms": self.rtt.iter().map(|&x| round(x)).collect::<Vec<_>>(),
            "p50_ms": round(self.p50),
            "p90_ms": round(self.p90),
            "last_prefill_ms_median": round(Spread::of(&field("prefill_ms")).median),
            "last_decode_ms_median": round(Spread::of(&field("decode_ms")).median),
            "last_total_ms_median": round(Spread::of(&field("total_ms")).median),
            "last_prefilled_tokens": count("prefilled_tokens"),
            "last_generated_tokens": count("generated_tokens"),
            "last_reused_tokens": count("reused_tokens"),
            "last": self.lasts,
        })
    }
}

/// `text` is the in-process keystrokes' document (made with the model's own tokenizer); the
/// first `args.keystrokes` of its typed characters are typed.
pub fn server_keystrokes(
    spec: &ModelSpec,
    threads: usize,
    args: &BenchArgs,
    text: &KeystrokeText,
) -> Result<ServerRuns> {
    let name = &spec.dtype;
    let typed = &text.typed[..args.keystrokes.min(text.typed.len())];

    let exe = std::env::current_exe().context("cannot find the phi-lsp executable to start the server")?;
    let mut command = Command::new(exe);
    command
        .args([
            "--stdio",
            "--model",
            &spec.model,
            "--dtype",
            name,
            "--device",
            &spec.device,
        ])
        .args(spec.tokenizer.iter().flat_map(|path| ["--tokenizer", path]))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("PHI_LSP_LOG", "warn");
    progress(&format!("{name}: starting the server"));
    let start = Instant::now();
    let mut client = ServerClient::spawn(command)?;
    let result = (|| -> Result<ServerRuns> {
        client.request(
            "initialize",
            json!({
                "processId": std::process::id(),
                "rootUri": null,
                "capabilities": {
                    "general": {"positionEncodings": ["utf-16"]},
                    "textDocument": {"inlineCompletion": {}, "synchronization": {}},
                },
                "initializationOptions": {
                    "maxNewTokens": LINE_TOKENS,
                    "deadlineMs": 60_000,
                    "contextTokens": SLOT_CAPACITY,
                },
            }),
        )?;
        client.notify("initialized", json!({}))?;
        client.wait_ready(Duration::from_secs(900))?;
        let load_s = start.elapsed().as_secs_f64();
        progress(&format!("{name}: server ready in {load_s:.1} s"));

        let uri = "file:///phi-lsp-bench/keystroke.py";
        let mut document = text.prefix.clone();
        client.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": document}}),
        )?;
        let start = Instant::now();
        client.request("textDocument/inlineCompletion", completion_params(uri, &document))?;
        let first_ms = ms(start.elapsed());
        progress(&format!(
            "{name}: server first completion (full prefill) {first_ms:.0} ms"
        ));

        let (mut rtt, mut lasts, mut typed_through) = (Vec::new(), Vec::new(), 0);
        let mut shown = None;
        for (keystroke, &c) in typed.iter().enumerate() {
            let end = end_position(&document);
            document.push(c);
            let start = Instant::now();
            client.notify(
                "textDocument/didChange",
                json!({
                    "textDocument": {"uri": uri, "version": keystroke + 2},
                    "contentChanges": [{"range": {"start": end, "end": end}, "text": c.to_string()}],
                }),
            )?;
            let answer =
                client.request("textDocument/inlineCompletion", completion_params(uri, &document))?;
            let elapsed = ms(start.elapsed());
            shown = first_insert_text(&answer);
            let last = client.request("phi-lsp/status", Value::Null)?["last"].clone();
            if last["from_cache"] == json!(true) {
                typed_through += 1;
            } else {
                rtt.push(elapsed);
            }
            progress(&format!(
                "{name}: server keystroke {}: {elapsed:.0} ms (prefilled {}, generated {}{})",
                keystroke + 1,
                last["prefilled_tokens"],
                last["generated_tokens"],
                if last["from_cache"] == json!(true) {
                    ", typed through"
                } else {
                    ""
                }
            ));
            lasts.push(last);
        }
        let accept = match shown {
            Some(suggestion) => Some(accept_suggestion(
                &mut client,
                uri,
                &mut document,
                &suggestion,
                typed.len() + 2,
            )?),
            None => None,
        };
        if let Some((accept_ms, speculated)) = accept {
            progress(&format!(
                "{name}: accepting the suggestion and asking again: {accept_ms:.1} ms{}",
                if speculated {
                    " (computed while idle)"
                } else {
                    " (not speculated)"
                }
            ));
        }
        Ok(ServerRuns {
            accept,
            load_s,
            first_ms,
            p50: Spread::percentile(&rtt, 50.0),
            p90: Spread::percentile(&rtt, 90.0),
            rtt,
            lasts,
            typed_through,
            peak_rss: peak_rss_bytes(Some(client.pid())),
        })
    })();
    client.shutdown();
    result
}

/// Waits (idle) until the server has speculated, inserts `suggestion` at the end of `document` as
/// an editor does on accept, and times the request that follows.
fn accept_suggestion(
    client: &mut ServerClient,
    uri: &str,
    document: &mut String,
    suggestion: &str,
    version: usize,
) -> Result<(f64, bool)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while client.request("phi-lsp/status", Value::Null)?["speculation"] != "ready"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let end = end_position(document);
    document.push_str(suggestion);
    let start = Instant::now();
    client.notify(
        "textDocument/didChange",
        json!({
            "textDocument": {"uri": uri, "version": version},
            "contentChanges": [{"range": {"start": end, "end": end}, "text": suggestion}],
        }),
    )?;
    client.request("textDocument/inlineCompletion", completion_params(uri, document))?;
    let elapsed = ms(start.elapsed());
    let last = client.request("phi-lsp/status", Value::Null)?["last"].clone();
    Ok((elapsed, last["stop"] == "speculated"))
}

/// The `insertText` of the first item of an inlineCompletion answer.
fn first_insert_text(answer: &Value) -> Option<String> {
    let items = answer.as_array().or_else(|| answer["items"].as_array())?;
    Some(items.first()?["insertText"].as_str()?.to_string()).filter(|t| !t.is_empty())
}

fn completion_params(uri: &str, document: &str) -> Value {
    json!({
        "textDocument": {"uri": uri},
        "position": end_position(document),
        "context": {"triggerKind": 2},
    })
}

/// The LSP position (utf-16) of the end of `text`.
fn end_position(text: &str) -> Value {
    let line = text.matches('\n').count();
    let last_line = text.rsplit('\n').next().unwrap_or("");
    json!({"line": line, "character": last_line.encode_utf16().count()})
}

/// A minimal LSP client over a child's stdio: frames messages, answers the server's own requests,
/// skips notifications.
struct ServerClient {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: mpsc::Receiver<Value>,
    next_id: i64,
}

impl ServerClient {
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        Ok(ServerClient {
            child,
            stdin,
            messages: rx,
            next_id: 1,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, message: &Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the server's stdin is closed")?;
        let body = message.to_string();
        write!(stdin, "Content-Length: {}\r\n\r\n{body}", body.len())
            .and_then(|_| stdin.flush())
            .context("cannot write to the server: it may have exited (see its log above)")
    }

    fn notify(&mut self, method: &str, params: Value) -> Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    /// Sends a request and waits for its result; an error response is an error.
    fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            message["params"] = params;
        }
        self.send(&message)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self.messages.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "no answer to {method} from the server: it exited or hung (see its log above)"
                )
            })?;
            if message.get("method").is_some() {
                self.answer_server_request(&message)?;
                continue;
            }
            if message.get("id") == Some(&json!(id)) {
                if let Some(error) = message.get("error") {
                    bail!("{method} failed: {error}");
                }
                return Ok(message.get("result").cloned().unwrap_or(Value::Null));
            }
        }
    }

    /// Server-to-client requests (configuration, progress tokens) get an empty answer.
    fn answer_server_request(&mut self, message: &Value) -> Result<()> {
        let (Some(id), Some(method)) = (message.get("id"), message.get("method").and_then(Value::as_str))
        else {
            return Ok(());
        };
        let result = if method == "workspace/configuration" {
            json!([null])
        } else {
            Value::Null
        };
        self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.request("phi-lsp/status", Value::Null)?;
            match status["state"].as_str() {
                Some("ready") => return Ok(()),
                Some("failed") => bail!("the server could not load the model: {}", status["message"]),
                _ if Instant::now() > deadline => bail!("the server was not ready after {timeout:?}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Asks politely, then kills our own child if it does not leave.
    fn shutdown(mut self) {
        let _ = self.request("shutdown", Value::Null);
        let _ = self.notify("exit", Value::Null);
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    std::io::Read::read_exact(reader, &mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_position_counts_utf16() {
        assert_eq!(end_position("ab\ncd"), json!({"line": 1, "character": 2}));
        assert_eq!(end_position("x\n"), json!({"line": 1, "character": 0}));
        assert_eq!(end_position("é😀"), json!({"line": 0, "character": 3}));
    }
}
