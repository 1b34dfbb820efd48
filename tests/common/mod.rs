//! Shared by the end-to-end tests: the binary under test, the committed reference fixture and an
//! LSP client.

#![allow(dead_code)]

pub mod lsp_client;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

/// The server's and `phi-lsp complete`'s default context size.
pub const DEFAULT_CONTEXT_TOKENS: usize = 1024;

/// The binary, on one thread: the tests run several servers at once on a small machine, where
/// candle's spinning workers would wait for each other's time slices (the tiny model gains
/// nothing from more threads).
pub fn phi_lsp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phi-lsp"));
    command.env("PHI_LSP_THREADS", "1");
    command
}

/// Runs `command` (a `phi-lsp … --json` invocation), requires success (else fails with its stderr)
/// and returns the JSON object it printed.
pub fn json_output(command: &mut Command) -> Value {
    let output = command.output().expect("phi-lsp runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// The stderr of a command that must fail as phi-lsp fails: exit code 2, nothing on stdout, one
/// line, no panic.
pub fn expect_one_line_error(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(output.stdout.is_empty());
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The token ids under `key` of a `generate --json` answer.
pub fn ids(json: &Value, key: &str) -> Vec<u32> {
    serde_json::from_value(json[key].clone()).expect("ids")
}

/// What a freshly started `phi-lsp complete` process suggests at (line, UTF-16 character) of `text`
/// with the fixture model: the independent computation (no server, no cache) that server answers
/// are compared with.
pub fn complete_fresh(
    text: &str,
    line: u32,
    character: u32,
    max_new_tokens: usize,
    context_tokens: usize,
) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("file.py");
    std::fs::write(&file, text).expect("writes");
    let json = json_output(
        phi_lsp()
            .arg("complete")
            .arg(&file)
            .args(["--line", &line.to_string(), "--character", &character.to_string()])
            .args([
                "--max-new-tokens",
                &max_new_tokens.to_string(),
                "--deadline-ms",
                "60000",
            ])
            .args([
                "--context-tokens",
                &context_tokens.to_string(),
                "--json",
                "--model",
            ])
            .arg(fixture_dir()),
    );
    Some(json["text"].as_str().expect("text").to_string()).filter(|t| !t.is_empty())
}

/// The position at the end of `text`: (line, character), the character in UTF-16 code units (VS
/// Code's, and `phi-lsp complete`'s) or in bytes (Neovim's UTF-8). Lines break at `\n`.
pub fn end_of(text: &str, utf16: bool) -> (u32, u32) {
    let line = text.matches('\n').count() as u32;
    let last = &text[text.rfind('\n').map_or(0, |i| i + 1)..];
    let character = if utf16 {
        last.encode_utf16().count()
    } else {
        last.len()
    };
    (line, character as u32)
}

/// The `insertText` of the first item of an inlineCompletion answer (a list or `{items}`).
pub fn inline_text(result: &Value) -> Option<String> {
    let items = result.as_array().or_else(|| result["items"].as_array())?;
    items
        .first()
        .and_then(|item| item["insertText"].as_str())
        .map(String::from)
}

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-phi")
}

#[derive(Deserialize)]
pub struct Reference {
    pub eos_token_id: u32,
    pub tokenizer_size: usize,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    /// transformers' logits at every prompt position.
    pub logits: Vec<Vec<f32>>,
}

impl Reference {
    /// A case's greedy tokens as `phi-lsp generate` prints them: without a final end-of-text.
    pub fn expected_tokens(&self, case: &Case) -> Vec<u32> {
        let mut expected = case.greedy_tokens.clone();
        if expected.last() == Some(&self.eos_token_id) {
            expected.pop();
        }
        expected
    }

    pub fn load() -> Self {
        let text = std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
        serde_json::from_str(&text).expect("reference parses")
    }
}
