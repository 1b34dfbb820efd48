//! The documents the soak types into: the corpus it types from, edits as LSP changes, and what
//! each document was shown.

use serde_json::{json, Value};

use crate::common::lsp_client::LspClient;

/// (line, character) of byte offset `byte_idx`, with the character in UTF-16 code units or bytes.
/// The texts here break lines at `\n` only.
pub(crate) fn position(text: &str, byte_idx: usize, utf16: bool) -> (u32, u32) {
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

pub(crate) fn lsp_position(text: &str, byte_idx: usize) -> Value {
    let (line, character) = position(text, byte_idx, true);
    json!({"line": line, "character": character})
}

/// splitmix64: a small seeded generator, so the replay is the same on every machine.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What gets typed and pasted: Python with docstrings, classes, comprehensions and some non-ASCII
/// text (2-, 3- and 4-byte UTF-8; the emoji is two UTF-16 units).
pub(crate) const CORPUS: &str = r#"import os
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
pub(crate) fn floor_boundary(text: &str, byte_idx: usize) -> usize {
    let mut idx = byte_idx.min(text.len());
    while !text.is_char_boundary(idx) {
        idx -= 1;
    }
    idx
}

/// A char boundary of `text` at or after `byte_idx`.
pub(crate) fn ceil_boundary(text: &str, byte_idx: usize) -> usize {
    let mut idx = byte_idx.min(text.len());
    while !text.is_char_boundary(idx) {
        idx += 1;
    }
    idx
}

/// A suggestion the server showed (or typed through), for checking typed-through answers.
pub(crate) struct Shown {
    pub(crate) before: String,
    pub(crate) after: String,
    pub(crate) suggestion: String,
}

/// How much text after the cursor the server compares before typing through.
pub(crate) const AFTER_CHARS: usize = 2_000;

pub(crate) fn after_window(text: &str, cursor: usize) -> String {
    text[cursor..].chars().take(AFTER_CHARS).collect()
}

pub(crate) struct Doc {
    pub(crate) uri: String,
    pub(crate) text: String,
    pub(crate) cursor: usize,
    pub(crate) version: i32,
    pub(crate) open: bool,
    /// Earlier texts, for undo-like jumps back.
    pub(crate) history: Vec<String>,
    pub(crate) corpus_pos: usize,
    pub(crate) shown: Vec<Shown>,
}

impl Doc {
    /// Replaces bytes `start..end` with `new`; the change's range is computed against the text before
    /// it, as LSP applies a notification's changes in order.
    pub(crate) fn edit(&mut self, start: usize, end: usize, new: &str) -> Value {
        let change = json!({"range": {"start": lsp_position(&self.text, start),
                                      "end": lsp_position(&self.text, end)}, "text": new});
        self.text.replace_range(start..end, new);
        self.cursor = start + new.len();
        change
    }

    /// The next `n_bytes` (about) of the corpus, wrapping around.
    pub(crate) fn corpus_chunk(&mut self, n_bytes: usize) -> String {
        let start = ceil_boundary(CORPUS, self.corpus_pos % CORPUS.len());
        let end = ceil_boundary(CORPUS, (start + n_bytes).min(CORPUS.len()));
        self.corpus_pos = end % CORPUS.len();
        CORPUS[start..end].to_string()
    }

    pub(crate) fn remember(&mut self) {
        if self.history.last() != Some(&self.text) {
            self.history.push(self.text.clone());
        }
        if self.history.len() > 40 {
            self.history.remove(0);
        }
    }

    /// The suggestion shown at exactly this text and cursor, if any.
    pub(crate) fn shown_here(&self) -> Option<&str> {
        let before = &self.text[..self.cursor];
        self.shown
            .iter()
            .rev()
            .find(|s| s.before == before && s.after == after_window(&self.text, self.cursor))
            .map(|s| s.suggestion.as_str())
    }

    /// Whether `answer` is the rest of a suggestion shown earlier, typed through up to `cursor` of
    /// `text`.
    pub(crate) fn is_typed_through(&self, text: &str, cursor: usize, answer: &str) -> bool {
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

impl Doc {
    pub(crate) fn new(uri: &str, text: &str) -> Self {
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
    pub(crate) fn type_text(&mut self, client: &mut LspClient, text: &str) {
        let cursor = self.cursor;
        let change = self.edit(cursor, cursor, text);
        self.version += 1;
        client.change(&self.uri, self.version, json!([change]));
    }

    pub(crate) fn request(&self, client: &mut LspClient) -> (i64, String, usize) {
        let (line, character) = position(&self.text, self.cursor, true);
        let id = client.inline_async(&self.uri, line, character);
        (id, self.text.clone(), self.cursor)
    }
}
