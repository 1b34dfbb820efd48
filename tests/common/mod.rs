//! Shared by the end-to-end tests: the binary under test, the committed reference fixture and an
//! LSP client.

#![allow(dead_code)]

pub mod lsp_client;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// The binary, on one thread: the tests run several servers at once on a small machine, where
/// candle's spinning workers would wait for each other's time slices (the tiny model gains
/// nothing from more threads).
pub fn phi_lsp() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phi-lsp"));
    command.env("PHI_LSP_THREADS", "1");
    command
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
}

impl Reference {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(fixture_dir().join("reference.json")).expect("reference.json");
        serde_json::from_str(&text).expect("reference parses")
    }
}
