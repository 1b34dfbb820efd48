//! Progressive suggestions through the real binary: the first answer goes out once a line is
//! complete, the generation goes on, and what it grows into is the whole suggestion a fresh
//! `phi-lsp complete` process computes. Clients that declare `experimental.phiLsp.suggestionGrowth`
//! are told with `phi-lsp/suggestionGrew`; others get the longer text by asking again, served from
//! the running generation. An edit that does not type through the suggestion cancels it.
//!
//! The server waits `PHI_LSP_TEST_TOKEN_DELAY_MS` per token, so one generation lasts long enough
//! to be watched; the text and length are `tests/editors/growing.json`'s (a place where the fixture
//! model writes several lines), shared with the editors' growth proofs.

mod common;

use std::time::{Duration, Instant};

use common::lsp_client::LspClient;
use common::{complete_fresh, end_of, fixture_dir, inline_text, phi_lsp, DEFAULT_CONTEXT_TOKENS};
use serde_json::{json, Value};

const GROWN: &str = "phi-lsp/suggestionGrew";

struct Growing {
    text: String,
    max_new_tokens: usize,
}

fn growing() -> Growing {
    let path = fixture_dir().join("../../editors/growing.json");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("tests/editors/growing.json"))
            .expect("JSON");
    Growing {
        text: json["text"].as_str().expect("text").to_string(),
        max_new_tokens: json["maxNewTokens"].as_u64().expect("maxNewTokens") as usize,
    }
}

fn capabilities(declares_growth: bool) -> Value {
    let mut caps = json!({"general": {"positionEncodings": ["utf-8"]},
                          "textDocument": {"inlineCompletion": {}}});
    if declares_growth {
        caps["experimental"] = json!({"phiLsp": {"suggestionGrowth": true}});
    }
    caps
}

/// A server with the default settings (progressive) whose tokens take `delay_ms` each.
fn server(declares_growth: bool, delay_ms: u64) -> LspClient {
    let mut command = phi_lsp();
    command
        .arg("--stdio")
        .arg("--model")
        .arg(fixture_dir())
        .env("PHI_LSP_TEST_TOKEN_DELAY_MS", delay_ms.to_string());
    let mut client = LspClient::spawn(command);
    // `progressive` is the default.
    let options = json!({"maxNewTokens": growing().max_new_tokens, "deadlineMs": 60000});
    client.initialize(capabilities(declares_growth), options);
    client.wait_ready();
    client
}

/// The whole suggestion at the end of `text`, by a fresh process (no server, no cache).
fn whole(text: &str) -> String {
    let (line, col) = end_of(text, false);
    let whole = complete_fresh(text, line, col, growing().max_new_tokens, DEFAULT_CONTEXT_TOKENS)
        .expect("the fixture suggests something here");
    assert!(
        whole.lines().count() >= 3,
        "growing.json's place gives several lines: {whole:?}"
    );
    whole
}

/// `part` is `whole` cut after one of its lines (or all of it).
fn is_line_prefix(part: &str, whole: &str) -> bool {
    part == whole || whole.starts_with(&format!("{part}\n"))
}

fn grew_texts(client: &LspClient) -> Vec<(String, bool)> {
    client
        .notifications
        .iter()
        .filter(|m| m["method"] == GROWN)
        .map(|m| {
            let p = &m["params"];
            (p["text"].as_str().expect("text").to_string(), p["done"] == true)
        })
        .collect()
}

/// A progressive server (`declares_growth` as its client), `growing.json`'s text open as `uri`,
/// and the first answer at its end.
struct Asked {
    client: LspClient,
    text: String,
    want: String,
    line: u32,
    col: u32,
    first: String,
}

fn ask_at_the_end(declares_growth: bool, uri: &str) -> Asked {
    let Growing { text, .. } = growing();
    let want = whole(&text);
    let mut client = server(declares_growth, 40);
    client.open(uri, &text);
    let (line, col) = end_of(&text, false);
    let first = inline_text(&client.inline(uri, line, col)).expect("a first answer");
    Asked {
        client,
        text,
        want,
        line,
        col,
        first,
    }
}

/// The first answer is some of the suggestion's lines, not all of them: the rest is still growing.
fn assert_first_part(first: &str, want: &str) {
    assert!(
        is_line_prefix(first, want) && first != want,
        "first {first:?} of {want:?}"
    );
}

#[test]
fn a_declaring_client_sees_the_suggestion_grow_line_by_line() {
    let uri = "file:///grow.py";
    let Asked {
        mut client,
        want,
        line,
        col,
        first,
        ..
    } = ask_at_the_end(true, uri);
    assert_first_part(&first, &want);
    assert_eq!(client.status()["last"]["stop"], "growing");

    let done = client.wait_for("the last growth", |m| {
        m["method"] == GROWN && m["params"]["done"] == true
    });
    let params = &done["params"];
    assert_eq!(params["textDocument"], json!({"uri": uri, "version": 1}));
    assert_eq!(params["position"], json!({"line": line, "character": col}));
    let grew = grew_texts(&client);
    assert!(grew.len() >= 2, "grew line by line: {grew:?}");
    let mut previous = first.clone();
    for (text, _) in &grew {
        assert!(is_line_prefix(text, &want), "{text:?} is not a part of {want:?}");
        assert!(
            text.len() > previous.len() || text == &want,
            "{text:?} after {previous:?}"
        );
        previous = text.clone();
    }
    assert_eq!(grew.last(), Some(&(want.clone(), true)));
    assert_eq!(grew.iter().filter(|(_, done)| *done).count(), 1);
    assert!(client.shutdown().success());
}

#[test]
fn a_client_without_the_notification_gets_the_longer_text_by_asking_again() {
    let uri = "file:///ask.py";
    let Asked {
        mut client,
        want,
        line,
        col,
        first,
        ..
    } = ask_at_the_end(false, uri);
    assert_first_part(&first, &want);

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answers = vec![first];
    while answers.last() != Some(&want) {
        assert!(Instant::now() < deadline, "never grew into {want:?}: {answers:?}");
        std::thread::sleep(Duration::from_millis(100));
        let again = inline_text(&client.inline(uri, line, col)).expect("an answer");
        let status = client.status();
        // Once the generation has ended, the suggestion shown here serves the same text.
        if again != want {
            assert_eq!(status["last"]["stop"], "running-generation", "{status}");
        }
        assert_eq!(status["last"]["from_cache"], true);
        let previous = answers.last().expect("one");
        assert!(
            is_line_prefix(&again, &want) && again.len() >= previous.len(),
            "{again:?} after {previous:?}"
        );
        answers.push(again);
    }
    assert!(answers.len() >= 3, "{answers:?}");
    // Served from the one generation: the model ran nothing else for these answers.
    assert_eq!(client.status()["worker"]["jobsRun"], 1);
    assert!(grew_texts(&client).is_empty(), "not declared, not sent");
    assert!(client.shutdown().success());
}

#[test]
fn typing_through_keeps_it_growing_and_an_edit_elsewhere_cancels_it() {
    let uri = "file:///edit.py";
    let Asked {
        mut client,
        text,
        want,
        line,
        col,
        first,
    } = ask_at_the_end(true, uri);

    // Typing its first character: the same generation goes on, and the typed-through answer is the
    // rest of what it has.
    let typed = &first[..first.chars().next().expect("a character").len_utf8()];
    client.insert(uri, 2, line, col, typed);
    let rest = inline_text(&client.inline(uri, line, col + typed.len() as u32)).expect("typed through");
    assert_eq!(client.status()["last"]["stop"], "typed-through");
    assert!(
        want.strip_prefix(typed).is_some_and(|w| is_line_prefix(&rest, w)),
        "{rest:?}"
    );
    client.notifications.clear();
    client.wait_for("growth after typing", |m| m["method"] == GROWN);

    // An edit at the top of the file: the suggestion is cut short there.
    client.insert(uri, 3, 0, 0, "# a comment\n");
    let done = client.wait_for("the end of the growth", |m| {
        m["method"] == GROWN && m["params"]["done"] == true
    });
    let cut = done["params"]["text"].as_str().expect("text").to_string();
    assert_ne!(cut, want, "cancelled before it ended");
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<_> = grew_texts(&client);
    assert_eq!(
        after.last(),
        Some(&(cut, true)),
        "nothing grows after the cancel: {after:?}"
    );
    // Asked again at the moved place, the model computes afresh.
    let moved = format!("# a comment\n{text}{typed}");
    let (line, col) = end_of(&moved, false);
    let _ = client.inline(uri, line, col);
    assert_ne!(client.status()["last"]["stop"], "running-generation");
    assert!(client.shutdown().success());
}
