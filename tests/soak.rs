//! Soak and concurrency, through the real binary.
//!
//! `soak_replay_of_typing_matches_fresh_computations` replays a seeded session of typing over
//! several documents (typing, deleting, pasting, undo-like jumps back, multi-edit changes, cursor
//! moves, switching documents, closing and reopening, stale versions, requests superseded by the
//! next keystroke and cancelled ones) and asks for inline completions along the way. Every answer
//! is checked against a second `phi-lsp` server whose caches are defeated (each request's text is
//! opened as a brand-new document and closed after it), and a deterministic sample (every 50th,
//! and every first answer after a reopen) against fresh `phi-lsp complete` processes. Meanwhile the
//! server's resident memory must stay flat after warm-up and `worker.slots` within the open
//! documents and the slot limit. `SOAK_KEYSTROKES` (default 10000) and `SOAK_SEED` (default 7)
//! change the replay.
//!
//! The other tests are about concurrency: two documents whose prompts share a long prefix never
//! see each other's cache, a request superseded mid-generation answers nothing rather than a cut
//! suggestion, and changes with a version that is not newer are ignored.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::lsp_client::{LspClient, TIMEOUT};
use common::{complete_fresh, fixture_dir, inline_text, phi_lsp, DEFAULT_CONTEXT_TOKENS};
use serde_json::{json, Value};

/// Short suggestions keep 10,000 keystrokes within CI time; the cache is exercised the same way.
const MAX_NEW_TOKENS: usize = 8;

/// The soak's context: prompts of at most ~250 tokens and a window of ~750 characters, so every
/// document outgrows it and its start moves, at half the cost per request of the default 1024.
const SOAK_CONTEXT_TOKENS: usize = 256;

fn options(context_tokens: usize) -> Value {
    json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "contextTokens": context_tokens})
}

/// VS Code's: UTF-16 positions.
fn vscode_capabilities() -> Value {
    json!({"textDocument": {"inlineCompletion": {}}})
}

/// Neovim's: UTF-8 positions, so the reference server converts positions its own way.
fn neovim_capabilities() -> Value {
    json!({"general": {"positionEncodings": ["utf-8", "utf-16"]},
           "textDocument": {"inlineCompletion": {}}})
}

fn server(capabilities: Value, context_tokens: usize) -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.initialize(capabilities, options(context_tokens));
    client.wait_ready();
    client
}

/// (line, character) of byte offset `byte_idx`, with the character in UTF-16 code units or bytes.
/// The texts here break lines at `\n` only.
fn position(text: &str, byte_idx: usize, utf16: bool) -> (u32, u32) {
    let before = &text[..byte_idx];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() as u32;
    let character = if utf16 {
        before[line_start..].encode_utf16().count()
    } else {
        byte_idx - line_start
    };
    (line, character as u32)
}

fn lsp_position(text: &str, byte_idx: usize) -> Value {
    let (line, character) = position(text, byte_idx, true);
    json!({"line": line, "character": character})
}

/// splitmix64: a small seeded generator, so the replay is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What gets typed and pasted: Python with docstrings, classes, comprehensions and some non-ASCII
/// text (2-, 3- and 4-byte UTF-8; the emoji is two UTF-16 units).
const CORPUS: &str = r#"import os
import sys
from dataclasses import dataclass


def mean(values):
    """Return the arithmetic mean of values."""
    if not values:
        return 0.0
    return sum(values) / len(values)


def read_lines(path):
    """Yield the stripped lines of the file at path — skipping blanks."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                yield line


@dataclass
class Point:
    x: float
    y: float

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5

    def scale(self, factor):
        """Return a new point, café-style ☕: both coordinates times factor."""
        return Point(self.x * factor, self.y * factor)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack 😀")
        return self.items.pop()


def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def word_counts(text):
    counts = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


if __name__ == "__main__":
    print(mean([1, 2, 3]), fibonacci(10), Point(3, 4).norm())
    print(word_counts("naïve text with naïve words"), file=sys.stderr)
"#;

/// A char boundary of `text` at or before `byte_idx`.
fn floor_boundary(text: &str, byte_idx: usize) -> usize {
    let mut idx = byte_idx.min(text.len());
    while !text.is_char_boundary(idx) {
        idx -= 1;
    }
    idx
}

/// A char boundary of `text` at or after `byte_idx`.
fn ceil_boundary(text: &str, byte_idx: usize) -> usize {
    let mut idx = byte_idx.min(text.len());
    while !text.is_char_boundary(idx) {
        idx += 1;
    }
    idx
}

/// A suggestion the server showed (or typed through), for checking typed-through answers.
struct Shown {
    before: String,
    after: String,
    suggestion: String,
}

/// How much text after the cursor the server compares before typing through.
const AFTER_CHARS: usize = 2_000;

fn after_window(text: &str, cursor: usize) -> String {
    text[cursor..].chars().take(AFTER_CHARS).collect()
}

struct Doc {
    uri: String,
    text: String,
    cursor: usize,
    version: i32,
    open: bool,
    /// Earlier texts, for undo-like jumps back.
    history: Vec<String>,
    corpus_pos: usize,
    shown: Vec<Shown>,
}

impl Doc {
    /// Replaces bytes `start..end` with `new`; the change's range is computed against the text before
    /// it, as LSP applies a notification's changes in order.
    fn edit(&mut self, start: usize, end: usize, new: &str) -> Value {
        let change = json!({"range": {"start": lsp_position(&self.text, start),
                                      "end": lsp_position(&self.text, end)}, "text": new});
        self.text.replace_range(start..end, new);
        self.cursor = start + new.len();
        change
    }

    /// The next `n_bytes` (about) of the corpus, wrapping around.
    fn corpus_chunk(&mut self, n_bytes: usize) -> String {
        let start = ceil_boundary(CORPUS, self.corpus_pos % CORPUS.len());
        let end = ceil_boundary(CORPUS, (start + n_bytes).min(CORPUS.len()));
        self.corpus_pos = end % CORPUS.len();
        CORPUS[start..end].to_string()
    }

    fn remember(&mut self) {
        if self.history.last() != Some(&self.text) {
            self.history.push(self.text.clone());
        }
        if self.history.len() > 40 {
            self.history.remove(0);
        }
    }

    /// The suggestion shown at exactly this text and cursor, if any.
    fn shown_here(&self) -> Option<&str> {
        let before = &self.text[..self.cursor];
        self.shown
            .iter()
            .rev()
            .find(|s| s.before == before && s.after == after_window(&self.text, self.cursor))
            .map(|s| s.suggestion.as_str())
    }

    /// Whether `answer` is the rest of a suggestion shown earlier, typed through up to `cursor` of
    /// `text`.
    fn is_typed_through(&self, text: &str, cursor: usize, answer: &str) -> bool {
        let before = &text[..cursor];
        let after = after_window(text, cursor);
        self.shown.iter().any(|s| {
            s.after == after
                && before
                    .strip_prefix(s.before.as_str())
                    .and_then(|typed| s.suggestion.strip_prefix(typed))
                    .is_some_and(|rest| rest == answer)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Computed by the model: must equal the fresh computation.
    Model,
    /// Served by typing through an earlier suggestion.
    TypedThrough,
    /// Superseded by the next keystroke's request, or cancelled: nothing, or a correct answer.
    MayBeDropped,
    /// The request after a superseded one: the model's answer or a typed-through one.
    Either,
}

struct Answer {
    keystroke: usize,
    uri: String,
    cursor: (u32, u32),
    kind: Kind,
    got: Option<String>,
    /// For answers that may be typed through: whether it is the rest of a shown suggestion.
    typed_through_ok: bool,
}

/// One answer to check independently: its text and cursor in both encodings.
struct Check {
    idx: usize,
    text: String,
    line: u32,
    utf16_col: u32,
    utf8_col: u32,
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// RSS may grow by at most this much between the end of warm-up and the end of the replay.
const RSS_GROWTH_BOUND_KIB: u64 = 16 * 1024;

/// Every this many answers, one is also checked against a fresh `phi-lsp complete` process.
const FRESH_PROCESS_EVERY: usize = 50;

/// Documents are kept below this size by cutting instead of typing.
const MAX_DOC_BYTES: usize = 6_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `phi-lsp/status` once every slot is freed (the model thread frees a document's slot when it
/// reaches the close in its queue), or after 5 s.
fn status_without_slots(client: &mut LspClient) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.status();
        if status["worker"]["slots"] == 0 || Instant::now() > deadline {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The reference: a second server that never sees the same document twice, so no cache, slot or
/// typed-through suggestion of its own can be reused. Returns (answer index, answer).
fn reference_server(checks: mpsc::Receiver<Check>) -> Vec<(usize, Option<String>)> {
    let mut server = server(neovim_capabilities(), SOAK_CONTEXT_TOKENS);
    let mut answers = Vec::new();
    for check in checks {
        let uri = format!("file:///reference/{}.py", check.idx);
        server.open(&uri, &check.text);
        let id = server.inline_async(&uri, check.line, check.utf8_col);
        let response = server.response(id);
        assert!(response.get("error").is_none(), "reference: {response}");
        server.close(&uri);
        answers.push((check.idx, inline_text(&response["result"])));
    }
    let status = status_without_slots(&mut server);
    assert_eq!(status["worker"]["slots"], 0, "reference slots: {status}");
    assert_eq!(status["documents"], 0, "reference documents: {status}");
    assert!(server.shutdown().success());
    answers
}

/// Fresh `phi-lsp complete` processes, one per check. Returns (answer index, answer).
fn fresh_processes(checks: mpsc::Receiver<Check>) -> Vec<(usize, Option<String>)> {
    checks
        .into_iter()
        .map(|check| {
            (
                check.idx,
                complete_fresh(
                    &check.text,
                    check.line,
                    check.utf16_col,
                    MAX_NEW_TOKENS,
                    SOAK_CONTEXT_TOKENS,
                ),
            )
        })
        .collect()
}

#[derive(Default)]
struct Counts {
    edits: usize,
    moves: usize,
    switches: usize,
    reopens: usize,
    stale_changes: usize,
    requests: usize,
    superseded: usize,
    cancelled: usize,
    typed_through: usize,
    max_slots_seen: u64,
}

/// The replay's state: the server, the documents as the client has them, and what was answered.
struct Session {
    rng: Rng,
    client: LspClient,
    docs: Vec<Doc>,
    current: usize,
    keystroke: usize,
    answers: Vec<Answer>,
    reference: mpsc::Sender<Check>,
    fresh: mpsc::Sender<Check>,
    counts: Counts,
    max_slots: u64,
}

impl Session {
    fn doc(&mut self) -> &mut Doc {
        &mut self.docs[self.current]
    }

    fn text_len(&self) -> usize {
        self.docs[self.current].text.len()
    }

    fn n_open(&self) -> usize {
        self.docs.iter().filter(|d| d.open).count()
    }

    fn send_changes(&mut self, changes: Vec<Value>) {
        let doc = &mut self.docs[self.current];
        doc.version += 1;
        let (uri, version) = (doc.uri.clone(), doc.version);
        doc.remember();
        self.client.change(&uri, version, Value::Array(changes));
        self.counts.edits += 1;
    }

    /// One keystroke on the current document: an edit, a cursor move, a switch, or close/reopen.
    /// Returns whether a request after it must also be checked by a fresh process.
    fn keystroke(&mut self) -> bool {
        self.keystroke += 1;
        let roll = self.rng.below(1000);
        let too_big = self.doc().text.len() > MAX_DOC_BYTES;
        match roll {
            _ if too_big && roll < 740 => self.cut(),
            0..=539 => self.type_char(),
            540..=659 => self.backspace(),
            660..=699 => self.delete_forward(),
            700..=739 => self.paste(),
            740..=769 => self.cut(),
            770..=799 => self.jump_back(),
            800..=814 => self.two_changes_at_once(),
            815..=934 => self.move_cursor(),
            935..=984 => self.switch(),
            _ => return self.close_and_reopen(),
        }
        // Now and then an out-of-order duplicate that the server must ignore.
        if self.rng.chance(0.01) {
            let doc = &self.docs[self.current];
            let (uri, version) = (doc.uri.clone(), doc.version - self.rng.below(2) as i32);
            self.client
                .change(&uri, version, json!([{"text": "stale = True\n"}]));
            self.counts.stale_changes += 1;
        }
        false
    }

    fn type_char(&mut self) {
        let accept = self.rng.chance(0.4);
        let doc = self.doc();
        // Typing the suggestion shown here (accepting it a character at a time), or the corpus.
        let ch = match doc.shown_here().and_then(|s| s.chars().next()) {
            Some(ch) if accept => ch.to_string(),
            _ => doc.corpus_chunk(1),
        };
        let cursor = doc.cursor;
        let change = doc.edit(cursor, cursor, &ch);
        self.send_changes(vec![change]);
    }

    fn backspace(&mut self) {
        let doc = self.doc();
        if doc.cursor == 0 {
            return self.type_char();
        }
        let start = floor_boundary(&doc.text, doc.cursor - 1);
        let cursor = doc.cursor;
        let change = doc.edit(start, cursor, "");
        self.send_changes(vec![change]);
    }

    fn delete_forward(&mut self) {
        let doc = self.doc();
        if doc.cursor == doc.text.len() {
            return self.backspace();
        }
        let end = ceil_boundary(&doc.text, doc.cursor + 1);
        let cursor = doc.cursor;
        let change = doc.edit(cursor, end, "");
        doc.cursor = cursor;
        self.send_changes(vec![change]);
    }

    fn paste(&mut self) {
        let n_bytes = 10 + self.rng.below(300);
        let selection = if self.rng.chance(0.3) {
            self.rng.below(60)
        } else {
            0
        };
        let doc = self.doc();
        let chunk = doc.corpus_chunk(n_bytes);
        let start = doc.cursor;
        let end = ceil_boundary(&doc.text, start + selection);
        let change = doc.edit(start, end, &chunk);
        self.send_changes(vec![change]);
    }

    fn cut(&mut self) {
        let n_bytes = if self.doc().text.len() > MAX_DOC_BYTES {
            500 + self.rng.below(2_500)
        } else {
            1 + self.rng.below(200)
        };
        let from = self.rng.below(self.text_len() + 1);
        let doc = self.doc();
        let start = floor_boundary(&doc.text, from);
        let end = ceil_boundary(&doc.text, start + n_bytes);
        if start == end {
            return self.type_char();
        }
        let change = doc.edit(start, end, "");
        self.send_changes(vec![change]);
    }

    /// Back to an earlier text, as undo does: one change of the part that differs, or the whole
    /// text (full sync).
    fn jump_back(&mut self) {
        let n_history = self.docs[self.current].history.len();
        if n_history < 2 {
            return self.type_char();
        }
        // The last entry is (usually) the current text: go back at least one more.
        let back = 2 + self.rng.below(n_history - 1);
        let full = self.rng.chance(0.3);
        let doc = self.doc();
        let target = doc.history[n_history - back].clone();
        let (old, new) = (doc.text.as_bytes(), target.as_bytes());
        let mut prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        while !doc.text.is_char_boundary(prefix) || !target.is_char_boundary(prefix) {
            prefix -= 1;
        }
        let max_suffix = old.len().min(new.len()) - prefix;
        let mut suffix = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take(max_suffix)
            .take_while(|(a, b)| a == b)
            .count();
        while !doc.text.is_char_boundary(old.len() - suffix) || !target.is_char_boundary(new.len() - suffix) {
            suffix -= 1;
        }
        let change = if full {
            doc.text = target.clone();
            doc.cursor = new.len() - suffix;
            json!({"text": target})
        } else {
            let end = old.len() - suffix;
            doc.edit(prefix, end, &target[prefix..new.len() - suffix])
        };
        self.send_changes(vec![change]);
    }

    /// Two edits in one notification: a comment line inserted above, then a character at the cursor
    /// (whose range is computed after the first edit, as LSP orders them).
    fn two_changes_at_once(&mut self) {
        let doc = self.doc();
        let line_start = doc.text[..doc.cursor].rfind('\n').map_or(0, |i| i + 1);
        let cursor = doc.cursor;
        let first = doc.edit(line_start, line_start, "# é\n");
        let cursor = cursor + "# é\n".len();
        let ch = doc.corpus_chunk(1);
        let second = doc.edit(cursor, cursor, &ch);
        self.send_changes(vec![first, second]);
    }

    fn move_cursor(&mut self) {
        self.counts.moves += 1;
        let how = self.rng.below(4);
        let random = self.rng.below(self.text_len() + 1);
        let doc = self.doc();
        let text = &doc.text;
        doc.cursor = match how {
            // Anywhere.
            0 => floor_boundary(text, random),
            // End of the line.
            1 => text[doc.cursor..]
                .find('\n')
                .map_or(text.len(), |i| doc.cursor + i),
            // Start of the line after.
            2 => text[doc.cursor..]
                .find('\n')
                .map_or(text.len(), |i| doc.cursor + i + 1),
            // End of the document.
            _ => text.len(),
        };
    }

    fn switch(&mut self) {
        self.counts.switches += 1;
        self.current = (self.current + 1 + self.rng.below(self.docs.len() - 1)) % self.docs.len();
    }

    /// Closes the current document, checks the server forgot it, and reopens it with its text (or,
    /// as after a revert on disk, an earlier one). The next answer is checked by a fresh process.
    fn close_and_reopen(&mut self) -> bool {
        self.counts.reopens += 1;
        let revert = self.rng.chance(0.3);
        let doc = &mut self.docs[self.current];
        let uri = doc.uri.clone();
        self.client.close(&uri);
        doc.open = false;
        doc.shown.clear();
        let id = self.client.inline_async(&uri, 0, 0);
        let response = self.client.response(id);
        assert_eq!(response["error"]["code"], -32602, "a closed document: {response}");
        if revert {
            if let Some(text) = doc.history.first().cloned() {
                doc.text = text;
            }
        }
        doc.cursor = doc.text.len();
        doc.version = 1;
        self.client.open_version(&uri, &doc.text, doc.version);
        doc.open = true;
        true
    }

    /// The response to `id`; on a timeout, what the server was doing.
    fn response(&mut self, id: i64) -> Value {
        if let Some(response) = self.client.response_within(id, TIMEOUT) {
            return response;
        }
        let pid = self.client.pid();
        let mut threads = String::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let wchan = std::fs::read_to_string(path.join("wchan")).unwrap_or_default();
            threads.push_str(&format!("{stat} wchan={wchan}\n"));
        }
        let last: Vec<&Value> = self.client.notifications.iter().rev().take(5).collect();
        panic!(
            "no response to request {id} at keystroke {} in {TIMEOUT:?}; last notifications \
             {last:?}; threads:\n{threads}",
            self.keystroke
        );
    }

    fn check_status(&mut self) -> Value {
        let status = self.client.status();
        let slots = status["worker"]["slots"].as_u64().expect("slots");
        assert!(
            slots <= self.n_open() as u64 && slots <= self.max_slots,
            "{slots} slots with {} documents open and a limit of {}: {status}",
            self.n_open(),
            self.max_slots
        );
        self.counts.max_slots_seen = self.counts.max_slots_seen.max(slots);
        status
    }

    /// Records an answer for the current document and queues its independent checks.
    fn record(&mut self, cursor: usize, text: &str, kind: Kind, got: Option<String>, fresh: bool) {
        let idx = self.answers.len();
        let (line, utf16_col) = position(text, cursor, true);
        let (_, utf8_col) = position(text, cursor, false);
        let doc = &self.docs[self.current];
        let typed_through_ok = got
            .as_deref()
            .is_some_and(|g| doc.is_typed_through(text, cursor, g));
        if kind == Kind::TypedThrough {
            self.counts.typed_through += 1;
        }
        self.answers.push(Answer {
            keystroke: self.keystroke,
            uri: doc.uri.clone(),
            cursor: (line, utf16_col),
            kind,
            got: got.clone(),
            typed_through_ok,
        });
        let check = || Check {
            idx,
            text: text.to_string(),
            line,
            utf16_col,
            utf8_col,
        };
        self.reference.send(check()).expect("reference running");
        if fresh || idx.is_multiple_of(FRESH_PROCESS_EVERY) {
            self.fresh.send(check()).expect("fresh checks running");
        }
    }

    /// After the answer for (text, cursor): what the server now shows there, for typing through.
    fn remember_shown(&mut self, text: &str, cursor: usize, got: &Option<String>) {
        let doc = &mut self.docs[self.current];
        if let Some(suggestion) = got {
            doc.shown.push(Shown {
                before: text[..cursor].to_string(),
                after: after_window(text, cursor),
                suggestion: suggestion.clone(),
            });
            if doc.shown.len() > 16 {
                doc.shown.remove(0);
            }
        }
    }

    fn request_here(&mut self) -> i64 {
        self.counts.requests += 1;
        let doc = &self.docs[self.current];
        let (line, character) = position(&doc.text, doc.cursor, true);
        let uri = doc.uri.clone();
        self.client.inline_async(&uri, line, character)
    }

    /// One request, answered before the next keystroke.
    fn ask(&mut self, fresh: bool) {
        let (text, cursor) = (self.doc().text.clone(), self.doc().cursor);
        let id = self.request_here();
        let response = self.response(id);
        assert!(response.get("error").is_none(), "{response}");
        let got = inline_text(&response["result"]);
        let status = self.check_status();
        // A speculated answer is the model's own (the same job, computed while idle).
        let kind = if got.is_some() && status["last"]["stop"] == "typed-through" {
            Kind::TypedThrough
        } else {
            Kind::Model
        };
        self.record(cursor, &text, kind, got.clone(), fresh);
        self.remember_shown(&text, cursor, &got);
    }

    /// A request, then the next keystroke (a typed character) and its request before the first is
    /// answered: the first is superseded, or done before the second arrives.
    fn ask_superseded(&mut self) {
        let (text, cursor) = (self.doc().text.clone(), self.doc().cursor);
        let first = self.request_here();
        self.keystroke += 1;
        self.type_char();
        let (next_text, next_cursor) = (self.doc().text.clone(), self.doc().cursor);
        let second = self.request_here();
        let first_response = self.response(first);
        let second_response = self.response(second);
        assert!(first_response.get("error").is_none(), "{first_response}");
        assert!(second_response.get("error").is_none(), "{second_response}");
        self.counts.superseded += 1;
        let got = inline_text(&first_response["result"]);
        self.record(cursor, &text, Kind::MayBeDropped, got.clone(), false);
        self.remember_shown(&text, cursor, &got);
        let got = inline_text(&second_response["result"]);
        self.check_status();
        self.record(next_cursor, &next_text, Kind::Either, got.clone(), false);
        self.remember_shown(&next_text, next_cursor, &got);
    }

    /// A request cancelled at once: a cancellation error or a correct answer.
    fn ask_cancelled(&mut self) {
        let (text, cursor) = (self.doc().text.clone(), self.doc().cursor);
        let id = self.request_here();
        self.client.notify("$/cancelRequest", json!({"id": id}));
        let response = self.response(id);
        self.counts.cancelled += 1;
        if let Some(error) = response.get("error") {
            assert_eq!(error["code"], -32800, "{response}");
            return;
        }
        let got = inline_text(&response["result"]);
        self.record(cursor, &text, Kind::MayBeDropped, got.clone(), false);
        self.remember_shown(&text, cursor, &got);
    }
}

#[test]
fn soak_replay_of_typing_matches_fresh_computations() {
    let n_keystrokes = env_usize("SOAK_KEYSTROKES", 10_000);
    let seed = env_usize("SOAK_SEED", 7) as u64;
    let warm_up = (n_keystrokes / 10).max(100);
    let started = Instant::now();

    let (reference_tx, reference_rx) = mpsc::channel();
    let reference_thread = std::thread::spawn(move || reference_server(reference_rx));
    let (fresh_tx, fresh_rx) = mpsc::channel();
    let fresh_thread = std::thread::spawn(move || fresh_processes(fresh_rx));

    let mut client = server(vscode_capabilities(), SOAK_CONTEXT_TOKENS);
    let pid = client.pid();
    let max_slots = client.status()["worker"]["maxSlots"].as_u64().expect("maxSlots");
    let starts = [
        ("file:///soak/alpha.py", &CORPUS[..600]),
        ("file:///soak/beta.py", ""),
        ("file:///soak/gamma%20three.py", CORPUS),
        (
            "file:///soak/%CE%B4elta.py",
            "def f(x):\n    \"\"\"Return x, naïvely ☕.\"\"\"\n",
        ),
    ];
    let mut docs = Vec::new();
    for (idx, (uri, text)) in starts.into_iter().enumerate() {
        client.open(uri, text);
        docs.push(Doc {
            uri: uri.to_string(),
            text: text.to_string(),
            cursor: text.len(),
            version: 1,
            open: true,
            history: vec![text.to_string()],
            corpus_pos: idx * 797,
            shown: Vec::new(),
        });
    }
    let mut session = Session {
        rng: Rng(seed),
        client,
        docs,
        current: 0,
        keystroke: 0,
        answers: Vec::new(),
        reference: reference_tx,
        fresh: fresh_tx,
        counts: Counts::default(),
        max_slots,
    };

    let rss_start = vm_rss_kib(pid);
    let mut rss_warm = None;
    let mut rss_max_after_warm_up = 0;
    while session.keystroke < n_keystrokes {
        let reopened = session.keystroke();
        if reopened || session.rng.chance(0.4) {
            let roll = session.rng.below(100);
            match roll {
                _ if reopened => session.ask(true),
                0..=3 => session.ask_superseded(),
                4..=5 => session.ask_cancelled(),
                _ => session.ask(false),
            }
        }
        if session.keystroke >= warm_up && rss_warm.is_none() {
            rss_warm = Some(vm_rss_kib(pid));
        }
        if rss_warm.is_some() && session.keystroke.is_multiple_of(250) {
            rss_max_after_warm_up = rss_max_after_warm_up.max(vm_rss_kib(pid));
        }
    }
    let rss_end = vm_rss_kib(pid);
    rss_max_after_warm_up = rss_max_after_warm_up.max(rss_end);
    let rss_warm = rss_warm.expect("warmed up");

    // Every slot goes with its document.
    let uris: Vec<String> = session.docs.iter().map(|d| d.uri.clone()).collect();
    for uri in &uris {
        session.client.close(uri);
    }
    let status = status_without_slots(&mut session.client);
    assert_eq!(status["worker"]["slots"], 0, "{status}");
    assert_eq!(status["documents"], 0, "{status}");
    // Each ignored stale change was logged.
    let ignored_logged = session
        .client
        .notifications
        .iter()
        .filter(|m| {
            m["method"] == "window/logMessage"
                && m["params"]["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("change ignored") && s.contains("not newer"))
        })
        .count();
    assert_eq!(ignored_logged, session.counts.stale_changes);

    let Session {
        client,
        answers,
        reference,
        fresh,
        counts,
        ..
    } = session;
    assert!(client.shutdown().success());
    drop((reference, fresh));
    let reference_answers = reference_thread.join().expect("reference server");
    let fresh_answers = fresh_thread.join().expect("fresh processes");
    let mut want = vec![None; answers.len()];
    for (idx, answer) in reference_answers {
        want[idx] = Some(answer);
    }

    let mut failures = Vec::new();
    let mut typed_through_equal_fresh = 0;
    for (idx, answer) in answers.iter().enumerate() {
        let want = want[idx].as_ref().expect("every answer has a reference");
        let ok = match answer.kind {
            Kind::Model => answer.got == *want,
            Kind::TypedThrough => answer.typed_through_ok || answer.got == *want,
            Kind::MayBeDropped => answer.got.is_none() || answer.got == *want || answer.typed_through_ok,
            Kind::Either => answer.got == *want || answer.typed_through_ok,
        };
        if answer.kind == Kind::TypedThrough && answer.got == *want {
            typed_through_equal_fresh += 1;
        }
        if !ok {
            failures.push(format!(
                "answer {idx} after keystroke {} in {} at {:?} ({:?}): got {:?}, fresh {:?}",
                answer.keystroke, answer.uri, answer.cursor, answer.kind, answer.got, want
            ));
        }
    }
    for (idx, fresh) in &fresh_answers {
        let answer = &answers[*idx];
        let reference = want[*idx].as_ref().expect("reference");
        if fresh != reference {
            failures.push(format!(
                "answer {idx}: the reference server {reference:?} and a fresh process {fresh:?} disagree"
            ));
        }
        if answer.kind == Kind::Model && answer.got != *fresh {
            failures.push(format!(
                "answer {idx} after keystroke {} in {} at {:?}: got {:?}, fresh process {fresh:?}",
                answer.keystroke, answer.uri, answer.cursor, answer.got
            ));
        }
    }
    let non_empty = answers.iter().filter(|a| a.got.is_some()).count();
    eprintln!(
        "soak: {n_keystrokes} keystrokes ({} edits, {} moves, {} switches, {} close/reopen, {} stale \
         changes), {} requests ({} superseded, {} cancelled), {} answers compared with the reference \
         server ({non_empty} non-empty, {} typed through, {typed_through_equal_fresh} of those equal \
         to the fresh computation), {} with fresh processes; slots at most {} (limit {max_slots}); RSS \
         start {} MiB, after warm-up {} MiB, max {} MiB, end {} MiB; {:.1} s",
        counts.edits,
        counts.moves,
        counts.switches,
        counts.reopens,
        counts.stale_changes,
        counts.requests,
        counts.superseded,
        counts.cancelled,
        answers.len(),
        counts.typed_through,
        fresh_answers.len(),
        counts.max_slots_seen,
        rss_start / 1024,
        rss_warm / 1024,
        rss_max_after_warm_up / 1024,
        rss_end / 1024,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} answers differ:\n{}",
        failures.len(),
        answers.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(
        non_empty * 4 >= answers.len(),
        "most answers should be non-empty: {non_empty} of {}",
        answers.len()
    );
    assert!(
        rss_max_after_warm_up <= rss_warm + RSS_GROWTH_BOUND_KIB,
        "resident memory grew from {rss_warm} KiB after warm-up to {rss_max_after_warm_up} KiB"
    );
}

impl Doc {
    fn new(uri: &str, text: &str) -> Self {
        Doc {
            uri: uri.to_string(),
            text: text.to_string(),
            cursor: text.len(),
            version: 1,
            open: true,
            history: Vec::new(),
            corpus_pos: 0,
            shown: Vec::new(),
        }
    }

    /// Inserts `text` at the cursor and sends the change.
    fn type_text(&mut self, client: &mut LspClient, text: &str) {
        let cursor = self.cursor;
        let change = self.edit(cursor, cursor, text);
        self.version += 1;
        client.change(&self.uri, self.version, json!([change]));
    }

    fn request(&self, client: &mut LspClient) -> (i64, String, usize) {
        let (line, character) = position(&self.text, self.cursor, true);
        let id = client.inline_async(&self.uri, line, character);
        (id, self.text.clone(), self.cursor)
    }
}

/// Checks one answer to a request made at (text, cursor) of `doc`: it is the fresh computation on
/// that text, or the rest of a suggestion shown in this same document, typed through; `None` is
/// allowed only where the request may have been superseded.
fn check_answer(
    client: &mut LspClient,
    doc: &mut Doc,
    request: (i64, String, usize),
    may_be_dropped: bool,
) -> bool {
    let (id, text, cursor) = request;
    let response = client.response_within(id, TIMEOUT).expect("answered");
    assert!(response.get("error").is_none(), "{response}");
    let got = inline_text(&response["result"]);
    let (line, character) = position(&text, cursor, true);
    let want = complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    let typed_through = got
        .as_deref()
        .is_some_and(|g| doc.is_typed_through(&text, cursor, g));
    assert!(
        got == want || typed_through || (may_be_dropped && got.is_none()),
        "{} at {line}:{character}: got {got:?}, the fresh computation on its own text {want:?}",
        doc.uri
    );
    if let Some(suggestion) = &got {
        doc.shown.push(Shown {
            before: text[..cursor].to_string(),
            after: after_window(&text, cursor),
            suggestion: suggestion.clone(),
        });
    }
    got.is_some()
}

/// Two documents whose prompts share a ~1,200-character prefix (hundreds of tokens) and differ
/// only in their last lines, edited and asked in interleavings: requests for both in flight
/// together, an edit to one between the other's request and answer, a large paste whose request
/// the next keystroke supersedes, and each document reopened with the other's text.
#[test]
fn documents_sharing_a_prefix_never_see_each_others_cache() {
    let mut client = server(vscode_capabilities(), DEFAULT_CONTEXT_TOKENS);
    let prefix = &CORPUS[..CORPUS.find("if __name__").expect("a main block")];
    let mut a = Doc::new(
        "file:///shared/a.py",
        &format!("{prefix}\ndef total(values):\n    return sum(values) +"),
    );
    let mut b = Doc::new(
        "file:///shared/b.py",
        &format!("{prefix}\ndef total(values):\n    return max(values) -"),
    );
    client.open(&a.uri, &a.text);
    client.open(&b.uri, &b.text);
    let typed_a = " len(values) * 2 if values else 0";
    let typed_b = " min(values) // 3 or None";
    let (mut n_answers, mut n_non_empty) = (0, 0);
    for round in 0..8 {
        let ch_a = &typed_a[round * 2..round * 2 + 2];
        let ch_b = &typed_b[round * 2..round * 2 + 2];

        // Both in flight together.
        a.type_text(&mut client, &ch_a[..1]);
        b.type_text(&mut client, &ch_b[..1]);
        let request_a = a.request(&mut client);
        let request_b = b.request(&mut client);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;

        // An edit to B between A's request and its answer, then B's own request.
        a.type_text(&mut client, &ch_a[1..]);
        let request_a = a.request(&mut client);
        b.type_text(&mut client, &ch_b[1..]);
        let request_b = b.request(&mut client);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;
        n_answers += 4;

        // A request the next keystroke supersedes while it generates.
        a.type_text(&mut client, "0");
        let superseded = a.request(&mut client);
        a.type_text(&mut client, "_");
        let request_a = a.request(&mut client);
        check_answer(&mut client, &mut a, superseded, true);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_answers += 1;

        if round % 3 == 1 {
            // A large paste (several prefill chunks) whose request the next keystroke supersedes
            // (the paste is undone right after, so the documents keep sharing their prefix).
            let cursor = a.cursor;
            let paste = &CORPUS[..ceil_boundary(CORPUS, 700)];
            a.type_text(&mut client, paste);
            let superseded = a.request(&mut client);
            a.type_text(&mut client, "x");
            let request_a = a.request(&mut client);
            check_answer(&mut client, &mut a, superseded, true);
            n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
            let end = a.cursor;
            let change = a.edit(cursor, end, "");
            a.version += 1;
            client.change(&a.uri, a.version, json!([change]));
            n_answers += 1;
        }
        if round % 4 == 3 {
            // Each URI reopened with the other's text.
            client.close(&a.uri);
            client.close(&b.uri);
            std::mem::swap(&mut a.text, &mut b.text);
            std::mem::swap(&mut a.cursor, &mut b.cursor);
            for doc in [&mut a, &mut b] {
                doc.version = 1;
                doc.shown.clear();
                client.open(&doc.uri, &doc.text);
            }
            let request_a = a.request(&mut client);
            let request_b = b.request(&mut client);
            n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
            n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;
            n_answers += 2;
        }
    }
    eprintln!("shared prefix: {n_answers} answers checked, {n_non_empty} non-empty");
    assert!(
        n_non_empty * 2 >= n_answers,
        "{n_non_empty} of {n_answers} non-empty"
    );
    assert!(client.shutdown().success());
}

/// `didChange` with a version that is not newer than the document's (a duplicate, an older one, a
/// full-text one) is ignored with a log line, and the text stays; versions may skip; a reopened
/// document starts its versions again.
#[test]
fn out_of_order_and_duplicate_versions_are_ignored() {
    let mut client = server(vscode_capabilities(), DEFAULT_CONTEXT_TOKENS);
    let uri = "file:///versions.py";
    let mut text = String::from("import os\n\n\ndef f(x):\n    return x\n");
    client.open_version(uri, &text, 3);
    let end = |text: &str| lsp_position(text, text.len());
    let append =
        |text: &str, new: &str| json!([{"range": {"start": end(text), "end": end(text)}, "text": new}]);

    client.change(uri, 4, append(&text, "y = f(1)\n"));
    text.push_str("y = f(1)\n");
    // A duplicate of version 4, an older version and a full-text change at the current version.
    client.change(uri, 4, append(&text, "duplicate = 4\n"));
    client.change(uri, 2, append(&text, "older = 2\n"));
    client.change(uri, 4, json!([{"text": "everything = 'replaced'\n"}]));
    // Versions may skip; then the skipped-to version again is a duplicate.
    client.change(uri, 9, append(&text, "z = f(y)\n"));
    text.push_str("z = f(y)\n");
    client.change(uri, 9, append(&text, "again = 9\n"));

    let ignored = |m: &Value| {
        m["method"] == "window/logMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("change ignored") && s.contains("not newer"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.notifications.iter().filter(|m| ignored(m)).count() < 4 {
        assert!(Instant::now() < deadline, "{:?}", client.notifications);
        client.status();
    }
    let messages: Vec<&str> = client
        .notifications
        .iter()
        .filter(|m| ignored(m))
        .filter_map(|m| m["params"]["message"].as_str())
        .collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert!(messages[0].contains("version 4") && messages[1].contains("version 2"));
    assert!(messages[3].contains("version 9"));

    // The text is the one the accepted changes made.
    client.change(uri, 10, append(&text, "print("));
    text.push_str("print(");
    let (line, character) = position(&text, text.len(), true);
    let id = client.inline_async(uri, line, character);
    let got = inline_text(&client.response(id)["result"]);
    assert_eq!(
        got,
        complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS)
    );

    // A reopened document starts again at any version.
    client.close(uri);
    let text = "def g(y):\n    return y *";
    client.open_version(uri, text, 1);
    client.change(uri, 2, append(text, " 2"));
    let text = format!("{text} 2");
    let (line, character) = position(&text, text.len(), true);
    let id = client.inline_async(uri, line, character);
    let got = inline_text(&client.response(id)["result"]);
    assert_eq!(
        got,
        complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS)
    );
    assert_eq!(
        client.notifications.iter().filter(|m| ignored(m)).count(),
        4,
        "nothing more was ignored"
    );
    assert!(client.shutdown().success());
}
