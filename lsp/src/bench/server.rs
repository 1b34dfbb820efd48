//! The keystroke through the real server: starts this binary as `phi-lsp --stdio`, types into a
//! document over LSP, and reads the server's own figures from `phi-lsp/status`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ropey::Rope;
use serde_json::{json, Value};

use super::keystroke::KeystrokeText;
use super::rss::peak_rss_bytes;
use super::stats::{ms, round, Spread};
use super::{progress, LINE_TOKENS, SLOT_CAPACITY};
use crate::args::BenchArgs;
use crate::convert::{self, Pos, PositionEncoding};
use crate::lsp_client::LspClient;
use crate::settings::ModelSpec;

/// How long one answer of the server, or its speculation, may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the server may take to load the model.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

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

    let command = server_command(spec, threads)?;
    progress(&format!("{name}: starting the server"));
    let start = Instant::now();
    let mut client = LspClient::spawn(command)?.with_timeout(ANSWER_TIMEOUT);
    let result = type_into(&mut client, start, name, &text.prefix, typed);
    // The figures are in; a server that does not leave is killed when the client is dropped.
    let _ = client.shutdown();
    result
}

/// This binary as `phi-lsp --stdio` for `spec`'s model on `threads` threads.
pub fn server_command(spec: &ModelSpec, threads: usize) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the phi-lsp executable to start the server")?;
    let mut command = Command::new(exe);
    command
        .args([
            "--stdio",
            "--model",
            &spec.model,
            "--dtype",
            &spec.dtype,
            "--device",
            &spec.device,
        ])
        .args(spec.tokenizer.iter().flat_map(|path| ["--tokenizer", path]))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("PHI_LSP_LOG", "warn");
    Ok(command)
}

/// Initializes the server, opens `prefix`, types `typed` one character at a time and accepts the
/// last suggestion; `start` is when the server was started.
fn type_into(
    client: &mut LspClient,
    start: Instant,
    name: &str,
    prefix: &str,
    typed: &[char],
) -> Result<ServerRuns> {
    client.initialize(
        json!({
            "general": {"positionEncodings": ["utf-16"]},
            "textDocument": {"inlineCompletion": {}, "synchronization": {}},
        }),
        json!({
            "maxNewTokens": LINE_TOKENS,
            "deadlineMs": 60_000,
            "contextTokens": SLOT_CAPACITY,
        }),
    )?;
    client.wait_ready(READY_TIMEOUT)?;
    let load_s = start.elapsed().as_secs_f64();
    progress(&format!("{name}: server ready in {load_s:.1} s"));

    let uri = "file:///phi-lsp-bench/keystroke.py";
    client.open(uri, prefix)?;
    let mut document = Rope::from_str(prefix);
    let start = Instant::now();
    client.inline(uri, end_position(&document))?;
    let first_ms = ms(start.elapsed());
    progress(&format!(
        "{name}: server first completion (full prefill) {first_ms:.0} ms"
    ));

    let (mut rtt, mut lasts, mut typed_through) = (Vec::new(), Vec::new(), 0);
    let mut shown = None;
    for (keystroke, &c) in typed.iter().enumerate() {
        let end = end_position(&document);
        document.insert_char(document.len_chars(), c);
        let after = end_position(&document);
        let start = Instant::now();
        client.insert(uri, version(keystroke + 2), end, &c.to_string())?;
        let answer = client.inline(uri, after)?;
        let elapsed = ms(start.elapsed());
        shown = first_insert_text(&answer);
        let last = client.status()?["last"].clone();
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
            client,
            uri,
            &mut document,
            &suggestion,
            version(typed.len() + 2),
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
}

/// Waits (idle) until the server has speculated, inserts `suggestion` at the end of `document` as
/// an editor does on accept, and times the request that follows.
fn accept_suggestion(
    client: &mut LspClient,
    uri: &str,
    document: &mut Rope,
    suggestion: &str,
    version: i32,
) -> Result<(f64, bool)> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while client.status()?["speculation"] != "ready" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let end = end_position(document);
    document.insert(document.len_chars(), suggestion);
    let after = end_position(document);
    let start = Instant::now();
    client.insert(uri, version, end, suggestion)?;
    client.inline(uri, after)?;
    let elapsed = ms(start.elapsed());
    let last = client.status()?["last"].clone();
    Ok((elapsed, last["stop"] == "speculated"))
}

/// A document version (LSP's are i32).
fn version(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The `insertText` of the first item of an inlineCompletion answer.
pub fn first_insert_text(answer: &Value) -> Option<String> {
    let items = answer.as_array().or_else(|| answer["items"].as_array())?;
    Some(items.first()?["insertText"].as_str()?.to_string()).filter(|t| !t.is_empty())
}

/// Where an append to `document` goes, as the server negotiated it (utf-16).
fn end_position(document: &Rope) -> Pos {
    convert::end_pos(document, PositionEncoding::Utf16)
}
