//! Token healing end to end: `phi-lsp complete` and the server, on the fixture in f32, against the
//! healed greedy continuations HF transformers computed (`tests/fixtures/tiny-phi/healing.json`,
//! `scripts/make_healing_reference.py`), and the KV cache while typing inside a word.

mod common;

use common::lsp_client::LspClient;
use common::{end_of, fixture_dir, inline_text, json_output, phi_lsp};
use phi_engine::PhiTokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Reference {
    max_new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    prompt_ids: Vec<u32>,
    dropped_text: String,
    tokens: Vec<u32>,
    suggestion: String,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixture_dir().join("healing.json")).expect("healing.json");
    serde_json::from_str(&text).expect("healing.json parses")
}

/// `phi-lsp complete --json` at the end of `text`, f32 like the reference.
fn complete(text: &str, max_new_tokens: usize, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("case.py");
    std::fs::write(&file, text).expect("writes");
    let (line, character) = end_of(text, true);
    json_output(
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
            .args(["--json", "--dtype", "f32", "--model"])
            .arg(fixture_dir())
            .args(extra),
    )
}

#[test]
fn complete_heals_the_last_token_as_transformers_does() {
    let reference = reference();
    let mut whole = 0;
    for case in &reference.cases {
        let out = complete(&case.prompt, reference.max_new_tokens, &[]);
        assert_eq!(out["healed"].as_str(), Some(case.dropped_text.as_str()), "{out}");
        assert_eq!(out["prompt_tokens"], json!(case.prompt_ids.len()), "{out}");
        // The prompt the model saw: the text without what transformers' healing dropped.
        let seen = case
            .prompt
            .strip_suffix(&case.dropped_text)
            .expect("ends with it");
        assert_eq!(out["prompt"].as_str(), Some(seen), "{out}");
        let raw = out["raw"].as_str().expect("raw");
        // The Python stop rules may end the generation early: what it wrote is then the start of
        // transformers' continuation; otherwise all of it.
        if out["stop"] == "Predicate" {
            assert!(
                case.suggestion.starts_with(raw),
                "{:?}: {raw:?} vs {:?}",
                case.prompt,
                case.suggestion
            );
        } else {
            assert_eq!(raw, case.suggestion, "{:?}", case.prompt);
            assert_eq!(out["generated_tokens"], json!(case.tokens.len()));
            whole += 1;
        }
        // Turned off, the whole prompt is continued.
        let plain = complete(
            &case.prompt,
            reference.max_new_tokens,
            &["--token-healing", "false"],
        );
        assert_eq!(plain["healed"], Value::Null);
        assert_eq!(plain["prompt_tokens"], json!(case.input_ids.len()));
        assert_eq!(plain["prompt"].as_str(), Some(case.prompt.as_str()), "{plain}");
    }
    assert!(whole >= 4, "only {whole} cases ran to the token cap");
}

fn server(options: Value, dtype: &str) -> LspClient {
    let mut command = phi_lsp();
    command
        .arg("--stdio")
        .args(["--dtype", dtype, "--model"])
        .arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.initialize(
        json!({"general": {"positionEncodings": ["utf-16"]},
               "textDocument": {"inlineCompletion": {}}}),
        options,
    );
    client.wait_ready();
    client
}

#[test]
fn the_server_suggests_the_healed_continuation() {
    let reference = reference();
    let mut client = server(
        json!({"maxNewTokens": reference.max_new_tokens, "deadlineMs": 60000, "speculate": false}),
        "f32",
    );
    let mut non_empty = 0;
    for (i, case) in reference.cases.iter().enumerate() {
        let uri = format!("file:///heal{i}.py");
        client.open(&uri, &case.prompt);
        let (line, character) = end_of(&case.prompt, true);
        let got = inline_text(&client.inline(&uri, line, character));
        let last = client.status()["last"].clone();
        assert_eq!(last["prompt_tokens"], json!(case.prompt_ids.len()), "{last}");
        let seen = case
            .prompt
            .strip_suffix(&case.dropped_text)
            .expect("ends with it");
        assert_eq!(last["prompt"].as_str(), Some(seen), "{last}");
        assert_eq!(
            last["healed"].as_str(),
            Some(case.dropped_text.as_str()),
            "{last}"
        );
        // What post-processing keeps (the rest of the statement, trailing blanks off) is the
        // start of transformers' healed continuation.
        if let Some(got) = &got {
            assert!(
                case.suggestion.starts_with(got.as_str()),
                "{:?}: {got:?} vs {:?}",
                case.prompt,
                case.suggestion
            );
            non_empty += 1;
        }
    }
    assert!(non_empty >= 4, "{non_empty} non-empty suggestions");
    assert!(client.shutdown().success());
}

/// Typing a line character by character: inside each word the prompt's last token is healed, and
/// the cache still holds everything before it, so a keystroke prefills a few tokens only.
#[test]
fn typing_inside_words_keeps_reusing_the_cache() {
    let tokenizer =
        PhiTokenizer::from_file(&fixture_dir().join("tokenizer.json")).expect("the fixture's tokenizer");
    let mut client = server(json!({"maxNewTokens": 8, "deadlineMs": 60000}), "f32");
    let uri = "file:///typing.py";
    let prefix = "import os\n\n\ndef fib(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n";
    let typed = "    return fib(n - 1) + fib(n - 2)";
    client.open(uri, prefix);
    let mut text = prefix.to_string();
    let (mut version, mut healed, mut prefilled) = (1, 0, Vec::new());
    for ch in typed.chars() {
        let (line, col) = end_of(&text, true);
        version += 1;
        client.insert(uri, version, line, col, &ch.to_string());
        text.push(ch);
        let (line, col) = end_of(&text, true);
        client.inline(uri, line, col);
        let last = client.status()["last"].clone();
        if last["from_cache"] == true {
            continue;
        }
        let n_tokens = tokenizer.encode(&text).expect("encodes").len();
        if ch.is_alphanumeric() {
            assert_eq!(
                last["prompt_tokens"],
                json!(n_tokens - 1),
                "healed after {text:?}: {last}"
            );
            let dropped = last["healed"].as_str().expect("healed text");
            assert!(!dropped.is_empty() && text.ends_with(dropped), "{text:?}: {last}");
            healed += 1;
        } else {
            assert_eq!(
                last["prompt_tokens"],
                json!(n_tokens),
                "not healed after {text:?}: {last}"
            );
            assert_eq!(last["healed"], Value::Null, "{last}");
        }
        prefilled.push(last["prefilled_tokens"].as_u64().expect("prefilled"));
    }
    eprintln!("{healed} healed answers; prefilled per keystroke {prefilled:?}");
    assert!(healed >= 5, "{healed} healed answers");
    // The first answer prefills the whole prompt; every keystroke after it a few tokens.
    let max = prefilled[1..].iter().max().copied().unwrap_or_default();
    assert!(max <= 4, "a keystroke prefilled {max} tokens: {prefilled:?}");
    assert!(client.shutdown().success());
}
