//! The seeded replay: a server, the documents as the client has them, every answer and the
//! independent checks it is compared with.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::lsp_client::{LspClient, TIMEOUT};
use crate::common::{complete_fresh, inline_text};
use crate::doc::{after_window, ceil_boundary, floor_boundary, position, Doc, Rng, Shown};
use crate::{neovim_capabilities, server, MAX_NEW_TOKENS, SOAK_CONTEXT_TOKENS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Computed by the model: must equal the fresh computation.
    Model,
    /// Served by typing through an earlier suggestion.
    TypedThrough,
    /// Superseded by the next keystroke's request, or cancelled: nothing, or a correct answer.
    MayBeDropped,
    /// The request after a superseded one: the model's answer or a typed-through one.
    Either,
}

pub(crate) struct Answer {
    pub(crate) keystroke: usize,
    pub(crate) uri: String,
    pub(crate) cursor: (u32, u32),
    pub(crate) kind: Kind,
    pub(crate) got: Option<String>,
    /// For answers that may be typed through: whether it is the rest of a shown suggestion.
    pub(crate) typed_through_ok: bool,
}

/// One answer to check independently: its text and cursor in both encodings.
pub(crate) struct Check {
    pub(crate) idx: usize,
    pub(crate) text: String,
    pub(crate) line: u32,
    utf16_col: u32,
    utf8_col: u32,
}

pub(crate) fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// RSS may grow by at most this much between the end of warm-up and the end of the replay.
pub(crate) const RSS_GROWTH_BOUND_KIB: u64 = 16 * 1024;

/// Every this many answers, one is also checked against a fresh `phi-lsp complete` process.
pub(crate) const FRESH_PROCESS_EVERY: usize = 50;

/// Documents are kept below this size by cutting instead of typing.
pub(crate) const MAX_DOC_BYTES: usize = 6_000;

pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `phi-lsp/status` once every slot is freed (the model thread frees a document's slot when it
/// reaches the close in its queue), or after 5 s.
pub(crate) fn status_without_slots(client: &mut LspClient) -> Value {
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
pub(crate) fn reference_server(checks: mpsc::Receiver<Check>) -> Vec<(usize, Option<String>)> {
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
pub(crate) fn fresh_processes(checks: mpsc::Receiver<Check>) -> Vec<(usize, Option<String>)> {
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
pub(crate) struct Counts {
    pub(crate) edits: usize,
    pub(crate) moves: usize,
    pub(crate) switches: usize,
    pub(crate) reopens: usize,
    pub(crate) stale_changes: usize,
    pub(crate) requests: usize,
    pub(crate) superseded: usize,
    pub(crate) cancelled: usize,
    pub(crate) typed_through: usize,
    pub(crate) max_slots_seen: u64,
}

/// The replay's state: the server, the documents as the client has them, and what was answered.
pub(crate) struct Session {
    pub(crate) rng: Rng,
    pub(crate) client: LspClient,
    pub(crate) docs: Vec<Doc>,
    pub(crate) current: usize,
    pub(crate) keystroke: usize,
    pub(crate) answers: Vec<Answer>,
    pub(crate) reference: mpsc::Sender<Check>,
    pub(crate) fresh: mpsc::Sender<Check>,
    pub(crate) counts: Counts,
    pub(crate) max_slots: u64,
}

impl Session {
    pub(crate) fn doc(&mut self) -> &mut Doc {
        &mut self.docs[self.current]
    }

    pub(crate) fn text_len(&self) -> usize {
        self.docs[self.current].text.len()
    }

    pub(crate) fn n_open(&self) -> usize {
        self.docs.iter().filter(|d| d.open).count()
    }

    pub(crate) fn send_changes(&mut self, changes: Vec<Value>) {
        let doc = &mut self.docs[self.current];
        doc.version += 1;
        let (uri, version) = (doc.uri.clone(), doc.version);
        doc.remember();
        self.client.change(&uri, version, Value::Array(changes));
        self.counts.edits += 1;
    }

    /// One keystroke on the current document: an edit, a cursor move, a switch, or close/reopen.
    /// Returns whether a request after it must also be checked by a fresh process.
    pub(crate) fn keystroke(&mut self) -> bool {
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

    pub(crate) fn type_char(&mut self) {
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

    pub(crate) fn backspace(&mut self) {
        let doc = self.doc();
        if doc.cursor == 0 {
            return self.type_char();
        }
        let start = floor_boundary(&doc.text, doc.cursor - 1);
        let cursor = doc.cursor;
        let change = doc.edit(start, cursor, "");
        self.send_changes(vec![change]);
    }

    pub(crate) fn delete_forward(&mut self) {
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

    pub(crate) fn paste(&mut self) {
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

    pub(crate) fn cut(&mut self) {
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
    pub(crate) fn jump_back(&mut self) {
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
    pub(crate) fn two_changes_at_once(&mut self) {
        let doc = self.doc();
        let line_start = doc.text[..doc.cursor].rfind('\n').map_or(0, |i| i + 1);
        let cursor = doc.cursor;
        let first = doc.edit(line_start, line_start, "# é\n");
        let cursor = cursor + "# é\n".len();
        let ch = doc.corpus_chunk(1);
        let second = doc.edit(cursor, cursor, &ch);
        self.send_changes(vec![first, second]);
    }

    pub(crate) fn move_cursor(&mut self) {
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

    pub(crate) fn switch(&mut self) {
        self.counts.switches += 1;
        self.current = (self.current + 1 + self.rng.below(self.docs.len() - 1)) % self.docs.len();
    }

    /// Closes the current document, checks the server forgot it, and reopens it with its text (or,
    /// as after a revert on disk, an earlier one). The next answer is checked by a fresh process.
    pub(crate) fn close_and_reopen(&mut self) -> bool {
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
    pub(crate) fn response(&mut self, id: i64) -> Value {
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

    pub(crate) fn check_status(&mut self) -> Value {
        let status = self.client.status();
        let slots = status["worker"]["slots"].as_u64().expect("slots");
        // Several places of one document may each keep a slot; closed documents keep none.
        assert!(
            slots <= self.max_slots && (self.n_open() > 0 || slots == 0),
            "{slots} slots with {} documents open and a limit of {}: {status}",
            self.n_open(),
            self.max_slots
        );
        self.counts.max_slots_seen = self.counts.max_slots_seen.max(slots);
        status
    }

    /// Records an answer for the current document and queues its independent checks.
    pub(crate) fn record(&mut self, cursor: usize, text: &str, kind: Kind, got: Option<String>, fresh: bool) {
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
    pub(crate) fn remember_shown(&mut self, text: &str, cursor: usize, got: &Option<String>) {
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

    pub(crate) fn request_here(&mut self) -> i64 {
        self.counts.requests += 1;
        let doc = &self.docs[self.current];
        let (line, character) = position(&doc.text, doc.cursor, true);
        let uri = doc.uri.clone();
        self.client.inline_async(&uri, line, character)
    }

    /// One request, answered before the next keystroke.
    pub(crate) fn ask(&mut self, fresh: bool) {
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
    pub(crate) fn ask_superseded(&mut self) {
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
    pub(crate) fn ask_cancelled(&mut self) {
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
