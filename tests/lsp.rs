//! The real `phi-lsp` binary as a language server, driven over stdio the way VS Code, Neovim and
//! Helix drive it. Expected suggestions come from an independent computation: a fresh
//! `phi-lsp generate` process on the same prefix (no cache), passed through the post-processing.

mod common;

use std::time::{Duration, Instant};

use common::lsp_client::LspClient;
use common::{
    complete_fresh, end_of, fixture_dir, inline_text, json_output, phi_lsp, DEFAULT_CONTEXT_TOKENS,
};
use phi_lsp::completion::postprocess::{self, Context};
use phi_lsp::completion::prompt;
use ropey::Rope;
use serde_json::{json, Value};

const MAX_NEW_TOKENS: usize = 24;

/// Whole suggestions (`progressive` off), so each answer can be compared with `phi-lsp complete`.
fn options() -> Value {
    json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "progressive": false})
}

/// For the tests whose expected suggestions come from `phi-lsp generate`, which continues the
/// whole prompt: several of their cursors end inside a word, where the server would heal the
/// last token (`tests/healing.rs` checks that against transformers).
fn unhealed_options() -> Value {
    json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "tokenHealing": false})
}

fn server() -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    LspClient::spawn(command)
}

fn vscode_capabilities() -> Value {
    json!({"textDocument": {"inlineCompletion": {}, "synchronization": {"dynamicRegistration": false}},
           "window": {"workDoneProgress": true}})
}

fn neovim_capabilities() -> Value {
    json!({"general": {"positionEncodings": ["utf-8", "utf-16", "utf-32"]},
           "textDocument": {"inlineCompletion": {"dynamicRegistration": false}},
           "window": {"workDoneProgress": true}})
}

fn helix_capabilities() -> Value {
    json!({"general": {"positionEncodings": ["utf-8", "utf-32", "utf-16"]},
           "textDocument": {"completion": {"completionItem": {"snippetSupport": true}}},
           "window": {"workDoneProgress": true}})
}

/// The suggestion at byte offset `cursor` of `text`, computed without the server: a fresh
/// `generate` process on the text before the cursor, then the post-processing.
fn expected(text: &str, cursor: usize) -> Option<String> {
    let before = &text[..cursor];
    if before.is_empty() {
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let prompt_file = dir.path().join("prompt.py");
    std::fs::write(&prompt_file, before).expect("writes");
    let json = json_output(
        phi_lsp()
            .args(["generate", "--model"])
            .arg(fixture_dir())
            .arg("--prompt-file")
            .arg(&prompt_file)
            .args(["--max-new-tokens", &MAX_NEW_TOKENS.to_string(), "--json"]),
    );
    let raw = json["text"].as_str().expect("text");
    let rope = Rope::from_str(text);
    let window = prompt::window(&rope, rope.byte_to_char(cursor), usize::MAX / 8);
    let context = Context::new(&window, postprocess::detect_indent(before));
    // A character cut off by the token limit decodes as U+FFFD; the server drops it.
    postprocess::finish(&context, raw.trim_end_matches('\u{FFFD}'))
}

const SOURCE: &str = "import os\n\n# café ☕ — 😀 in a comment\ndef add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n";

/// (line, byte column) cursors in SOURCE: mid-line, after a docstring, after a block opener, and
/// after non-ASCII text (where UTF-8 and UTF-16 columns differ).
fn cursors() -> Vec<(u32, usize)> {
    let comment = SOURCE.lines().nth(2).expect("line 2");
    let after_emoji = comment.find('😀').expect("emoji") + '😀'.len_utf8();
    vec![
        (5, 12),
        (5, 0),
        (4, 36),
        (10, 18),
        (9, 29),
        (3, 14),
        (2, comment.len()),
        (2, after_emoji),
    ]
}

fn byte_offset(text: &str, line: u32, byte_col: usize) -> usize {
    text.split_inclusive('\n')
        .take(line as usize)
        .map(str::len)
        .sum::<usize>()
        + byte_col
}

fn utf16_col(text: &str, line: u32, byte_col: usize) -> u32 {
    let start = byte_offset(text, line, 0);
    text[start..start + byte_col].encode_utf16().count() as u32
}

/// Asks for inline completions at every cursor and compares them with the independent computation.
fn check_inline(client: &mut LspClient, uri: &str, utf8: bool) {
    let mut non_empty = 0;
    for (line, byte_col) in cursors() {
        let character = if utf8 {
            byte_col as u32
        } else {
            utf16_col(SOURCE, line, byte_col)
        };
        let result = client.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
                   "context": {"triggerKind": 2}}),
        );
        let got = inline_text(&result);
        let want = expected(SOURCE, byte_offset(SOURCE, line, byte_col));
        assert_eq!(got, want, "at {line}:{byte_col}; status: {}", client.status());
        if let Some(item) = result.as_array().and_then(|a| a.first()) {
            assert_eq!(
                item["range"]["start"],
                json!({"line": line, "character": character})
            );
            assert_eq!(item["range"]["end"], item["range"]["start"]);
            non_empty += 1;
        }
    }
    assert!(
        non_empty >= 2,
        "the fixture should give some non-empty suggestions, got {non_empty}"
    );
}

#[test]
fn vscode_utf16_inline_completion() {
    let mut client = server();
    let init = client.initialize(vscode_capabilities(), unhealed_options());
    let caps = &init["capabilities"];
    assert_eq!(caps["positionEncoding"], "utf-16");
    assert_eq!(caps["textDocumentSync"]["change"], 2, "incremental sync");
    assert_eq!(caps["inlineCompletionProvider"], true);
    assert!(
        caps.get("completionProvider").is_none_or(Value::is_null),
        "no menu for inline clients: {caps}"
    );
    // Loading is reported with work-done progress: create, begin, the warm-up forward, end.
    client.wait_for("progress token creation", |m| {
        m["method"] == "window/workDoneProgress/create"
    });
    client.wait_for("progress begin", |m| {
        m["method"] == "$/progress" && m["params"]["value"]["kind"] == "begin"
    });
    client.wait_for("warm-up report", |m| {
        let value = &m["params"]["value"];
        m["method"] == "$/progress"
            && value["kind"] == "report"
            && value["message"]
                .as_str()
                .is_some_and(|s| s.contains("first forward"))
    });
    client.wait_for("progress end", |m| {
        m["method"] == "$/progress" && m["params"]["value"]["kind"] == "end"
    });
    let status = client.wait_ready();
    assert_eq!(status["positionEncoding"], "utf-16");
    // No device or dtype named: `auto` resolves to q8_0 on the CPU, f16 on a GPU.
    let want = if status["device"] == "cpu" { "q8_0" } else { "f16" };
    assert_eq!(status["dtype"], want, "{status}");
    assert_eq!(status["dtypeInUse"], want, "{status}");
    client.open("file:///vscode.py", SOURCE);
    check_inline(&mut client, "file:///vscode.py", false);
    let status = client.status();
    for key in [
        "prompt_tokens",
        "reused_tokens",
        "prefilled_tokens",
        "generated_tokens",
        "prefill_ms",
        "decode_ms",
        "total_ms",
        "from_cache",
    ] {
        assert!(
            status["last"].get(key).is_some(),
            "status.last lacks {key}: {status}"
        );
    }
    assert!(client.shutdown().success());
}

#[test]
fn neovim_utf8_inline_completion() {
    let mut client = server();
    let init = client.initialize(neovim_capabilities(), unhealed_options());
    assert_eq!(init["capabilities"]["positionEncoding"], "utf-8");
    client.wait_ready();
    client.open("file:///nvim.py", SOURCE);
    check_inline(&mut client, "file:///nvim.py", true);
    assert!(client.shutdown().success());
}

#[test]
fn helix_gets_the_suggestion_in_the_completion_menu() {
    let mut client = server();
    let init = client.initialize(helix_capabilities(), unhealed_options());
    let caps = &init["capabilities"];
    assert_eq!(caps["positionEncoding"], "utf-8");
    assert!(caps["completionProvider"].is_object(), "{caps}");
    assert!(
        caps.get("inlineCompletionProvider").is_none_or(Value::is_null),
        "{caps}"
    );
    client.wait_ready();
    client.open("file:///helix.py", SOURCE);
    let mut non_empty = 0;
    for (line, byte_col) in cursors() {
        let result = client.request(
            "textDocument/completion",
            json!({"textDocument": {"uri": "file:///helix.py"}, "position": {"line": line, "character": byte_col}}),
        );
        assert_eq!(result["isIncomplete"], true);
        let want = expected(SOURCE, byte_offset(SOURCE, line, byte_col));
        let items = result["items"].as_array().expect("items");
        match want {
            None => assert!(items.is_empty(), "{result}"),
            Some(want) => {
                non_empty += 1;
                let item = &items[0];
                // Helix shows no labelDetails: the marker comes first, before a short label.
                let label = item["label"].as_str().expect("label");
                assert!(label.starts_with("(phi-1) "), "{label}");
                assert!(label.chars().count() <= "(phi-1) ".len() + 41, "{label}");
                assert!(item.get("labelDetails").is_none_or(Value::is_null), "{item}");
                // The edit replaces the word being typed with the word plus the suggestion.
                let edit = &item["textEdit"];
                let start = edit["range"]["start"]["character"].as_u64().expect("start") as usize;
                assert_eq!(edit["range"]["end"], json!({"line": line, "character": byte_col}));
                let line_start = byte_offset(SOURCE, line, 0);
                let word = &SOURCE[line_start + start..line_start + byte_col];
                assert_eq!(edit["newText"].as_str(), Some(format!("{word}{want}").as_str()));
                assert!(item["documentation"]["value"]
                    .as_str()
                    .expect("doc")
                    .contains(&want));
            }
        }
    }
    assert!(non_empty >= 2);
    assert!(client.shutdown().success());
}

/// Typing a function character by character: every answer the model computed equals a fresh
/// process's, every typed-through answer is the rest of the suggestion it came from, and a
/// keystroke costs a few prefilled tokens while reused tokens grow.
#[test]
fn typing_reuses_the_cache_and_types_through() {
    let mut client = server();
    client.initialize(neovim_capabilities(), options());
    client.wait_ready();
    let uri = "file:///typing.py";
    let prefix =
        "import os\n\n\ndef scale(values, factor):\n    \"\"\"Multiply every value by factor.\"\"\"\n";
    let typed =
        "    result = []\n    for v in values:\n        result.append(v * factor)\n    return result\n";
    client.open(uri, prefix);
    let mut text = prefix.to_string();
    let mut version = 1;
    let mut previous: Option<String> = None;
    let (mut model_answers, mut typed_through, mut max_prefilled) = (0, 0, 0);
    let mut reused = Vec::new();
    for ch in typed.chars() {
        // Insert the character at the end (an incremental edit), then ask at the new end.
        let (line, col) = end_of(&text, false);
        version += 1;
        client.insert(uri, version, line, col, &ch.to_string());
        text.push(ch);
        let (line, col) = end_of(&text, false);
        let got = inline_text(&client.inline(uri, line, col));
        let last = client.status()["last"].clone();
        if last["stop"] == "typed-through" {
            typed_through += 1;
            let before = previous.as_deref().expect("typed through a suggestion");
            let rest = before
                .strip_prefix(ch)
                .expect("typed the suggestion's first character");
            assert_eq!(got.as_deref(), Some(rest));
        } else {
            model_answers += 1;
            assert_eq!(
                got,
                complete_fresh(&text, line, col, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS),
                "after typing {:?}",
                &text[prefix.len()..]
            );
            // The first request prefills the whole prompt; keystrokes after it only their tokens.
            // (A speculated answer, computed while the test looked elsewhere, has its own stats.)
            if last["from_cache"] == true {
                let want = if got.is_some() { "speculated" } else { "empty" };
                assert_eq!(last["stop"], want, "{last}");
            } else {
                if !reused.is_empty() {
                    max_prefilled = max_prefilled.max(last["prefilled_tokens"].as_u64().expect("prefilled"));
                }
                reused.push(last["reused_tokens"].as_u64().expect("reused"));
            }
        }
        previous = got;
    }
    eprintln!("{model_answers} model answers, {typed_through} typed through, max prefilled {max_prefilled}, reused {reused:?}");
    assert!(model_answers > 10);
    assert!(max_prefilled < 10, "a keystroke prefilled {max_prefilled} tokens");
    assert!(reused.last() > reused.first(), "reused tokens grow: {reused:?}");
    assert!(client.shutdown().success());
}

/// Accept the suggestion (insert it at the cursor), ask again: the answer was computed while the
/// server was idle, and equals a fresh process's answer for the new text. Three times in a row.
#[test]
fn accepting_a_suggestion_is_answered_from_the_speculation() {
    let mut client = server();
    client.initialize(neovim_capabilities(), options());
    client.wait_ready();
    let uri = "file:///accept.py";
    let mut text =
        "import os\n\n\ndef scale(values, factor):\n    \"\"\"Multiply every value by factor.\"\"\"\n"
            .to_string();
    client.open(uri, &text);
    let (mut version, mut speculated) = (1, 0);
    for round in 0..3 {
        let (line, col) = end_of(&text, false);
        let got = inline_text(&client.inline(uri, line, col));
        let last = client.status()["last"].clone();
        assert_eq!(
            got,
            complete_fresh(&text, line, col, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS),
            "round {round}"
        );
        if round > 0 {
            let want = if got.is_some() { "speculated" } else { "empty" };
            assert_eq!(
                (&last["from_cache"], &last["stop"]),
                (&json!(true), &json!(want)),
                "round {round}: {last}"
            );
            speculated += 1;
            eprintln!(
                "round {round}: served from the speculation in {} ms",
                last["total_ms"]
            );
        }
        let Some(suggestion) = got else { break };
        // Idle until the next suggestion is ready, then accept this one.
        client.wait_status("the speculation", |status| status["speculation"] == "ready");
        version += 1;
        client.insert(uri, version, line, col, &suggestion);
        text.push_str(&suggestion);
    }
    assert!(speculated >= 1, "no answer came from a speculation");
    assert!(client.shutdown().success());
}

/// The model jobs the server's model thread has run so far.
fn jobs_run(client: &mut LspClient) -> u64 {
    client.status()["worker"]["jobsRun"]
        .as_u64()
        .expect("worker.jobsRun")
}

/// Manual-only mode (`automatic: false`): an automatic request is answered empty and runs no model
/// job; an invoked one (the trigger key) gets the suggestion; typing through it is still answered
/// to automatic requests, from the cache; turned back on, automatic requests generate again.
#[test]
fn with_automatic_off_only_invoked_requests_run_the_model() {
    let mut client = server();
    let mut manual = options();
    manual["automatic"] = json!(false);
    client.initialize(neovim_capabilities(), manual);
    client.wait_ready();
    assert_eq!(client.status()["automatic"], false);
    let uri = "file:///manual.py";
    let text = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    ";
    client.open(uri, text);
    let (line, col) = end_of(text, false);
    let ask = |client: &mut LspClient, kind: u32, col: u32| {
        client.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": col},
                   "context": {"triggerKind": kind}}),
        )
    };

    let jobs = jobs_run(&mut client);
    let automatic = ask(&mut client, 2, col);
    assert_eq!(automatic, json!([]), "an automatic request is answered empty");
    let status = client.status();
    assert_eq!(status["last"]["stop"], "manual", "{status}");
    assert_eq!(jobs_run(&mut client), jobs, "no model job for it");

    let invoked = inline_text(&ask(&mut client, 1, col));
    let want = complete_fresh(text, line, col, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    assert!(want.is_some(), "the fixture suggests something here");
    assert_eq!(invoked, want, "an invoked request gets the suggestion");
    assert!(jobs_run(&mut client) > jobs, "the invoked request ran the model");

    // Typing its first character, the client asks by itself: the rest, from the cache.
    let suggestion = invoked.expect("a suggestion");
    let first = suggestion.chars().next().expect("not empty");
    client.insert(uri, 2, line, col, &first.to_string());
    let jobs = jobs_run(&mut client);
    let rest = inline_text(&ask(&mut client, 2, col + first.len_utf8() as u32));
    assert_eq!(rest.as_deref(), suggestion.strip_prefix(first));
    assert_eq!(client.status()["last"]["stop"], "typed-through");
    assert_eq!(jobs_run(&mut client), jobs, "typing through runs no model job");

    // Back on: an automatic request (somewhere new) generates.
    client.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"phi-lsp": {"automatic": true}}}),
    );
    client.wait_status("automatic back on", |s| s["automatic"] == true);
    let jobs = jobs_run(&mut client);
    let again = inline_text(&ask(&mut client, 2, 0));
    let status = client.status();
    assert_ne!(status["last"]["stop"], "manual", "{status}");
    assert!(again.is_some() || status["last"]["stop"] == "empty", "{status}");
    assert!(
        jobs_run(&mut client) > jobs,
        "automatic requests run the model again"
    );
    assert!(client.shutdown().success());
}

fn inline_texts(result: &Value) -> Vec<String> {
    result
        .as_array()
        .expect("a list")
        .iter()
        .map(|item| item["insertText"].as_str().expect("insertText").to_string())
        .collect()
}

/// An explicit (invoked) request gets up to `alternatives` distinct suggestions, the greedy one
/// first, exactly `phi-lsp complete`'s (whole: progressive is on here); asked again, the same ones
/// without model work, and in another document with the same text the same ones again (the seeds
/// are fixed); an automatic request gets the greedy one alone; typing the
/// start of an alternative is served by typing through it; with `alternatives: 1`, one item.
#[test]
fn an_invoked_request_offers_distinct_alternatives_the_greedy_one_first() {
    let mut client = server();
    client.initialize(
        neovim_capabilities(),
        json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000}),
    );
    client.wait_ready();
    assert_eq!(client.status()["alternatives"], 3, "the default");
    let uri = "file:///alternatives.py";
    let text = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    ";
    client.open(uri, text);
    let (line, col) = end_of(text, false);
    let ask = |client: &mut LspClient, kind: u32, col: u32| {
        client.request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": col},
                   "context": {"triggerKind": kind}}),
        )
    };

    let invoked = ask(&mut client, 1, col);
    let items = inline_texts(&invoked);
    let want = complete_fresh(text, line, col, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    assert_eq!(items.first(), want.as_ref(), "the greedy one first: {items:?}");
    assert!((2..=3).contains(&items.len()), "alternatives: {items:?}");
    for (i, item) in items.iter().enumerate() {
        assert!(!item.trim().is_empty(), "{items:?}");
        assert!(!items[..i].contains(item), "distinct: {items:?}");
    }
    for item in invoked.as_array().expect("a list") {
        assert_eq!(item["range"]["start"], json!({"line": line, "character": col}));
    }
    let status = client.status();
    assert_eq!(status["last"]["alternatives"], items.len(), "{status}");

    let jobs = jobs_run(&mut client);
    let again = inline_texts(&ask(&mut client, 1, col));
    assert_eq!(again, items, "the same alternatives for the same request");
    assert_eq!(jobs_run(&mut client), jobs, "served again without model work");
    // The same text in another document: sampled afresh, with the same seeds, the same ones.
    let twin = "file:///twin.py";
    client.open(twin, text);
    let sampled = inline_texts(&client.request(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": twin}, "position": {"line": line, "character": col},
               "context": {"triggerKind": 1}}),
    ));
    assert_eq!(sampled, items, "deterministic seeds");
    let automatic = inline_texts(&ask(&mut client, 2, col));
    assert_eq!(
        automatic,
        items[..1],
        "an automatic request gets the greedy one alone"
    );

    // Typing the first character of an alternative that the greedy one does not start with.
    let other = items[1..]
        .iter()
        .find(|a| a.chars().next() != items[0].chars().next())
        .cloned();
    if let Some(other) = other {
        let first = other.chars().next().expect("not empty");
        client.insert(uri, 2, line, col, &first.to_string());
        let jobs = jobs_run(&mut client);
        let rest = inline_text(&ask(&mut client, 2, col + first.len_utf8() as u32));
        assert_eq!(
            rest.as_deref(),
            other.strip_prefix(first),
            "typed through the alternative"
        );
        assert_eq!(client.status()["last"]["stop"], "typed-through");
        assert_eq!(jobs_run(&mut client), jobs, "no model job");
        client.change(uri, 3, json!([{"text": text}]));
    }

    client.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"phi-lsp": {"alternatives": 1}}}),
    );
    client.wait_status("alternatives off", |s| s["alternatives"] == 1);
    let single = inline_texts(&ask(&mut client, 1, col));
    assert_eq!(single, items[..1], "alternatives: 1 is the greedy one alone");
    assert!(client.shutdown().success());
}

#[test]
fn bad_input_gets_errors_and_the_server_keeps_answering() {
    let mut client = server();
    client.initialize(neovim_capabilities(), unhealed_options());
    client.wait_ready();
    client.open("file:///bad.py", "def f(x):\n    return x\n");
    let position = |line: u32, character: u32| {
        json!({"textDocument": {"uri": "file:///bad.py"}, "position": {"line": line, "character": character},
               "context": {"triggerKind": 2}})
    };
    // Malformed JSON in a well-framed message, then an unknown method.
    client.send_raw(b"Content-Length: 12\r\n\r\n{not json!!}");
    let id = client.request_async("phi-lsp/unknown", json!({}));
    assert_eq!(client.response(id)["error"]["code"], -32601);
    // Unknown document and a line past the end: errors, not crashes.
    let id = client.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": "file:///nope.py"}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 2}}),
    );
    let error = client.response(id)["error"].clone();
    assert_eq!(error["code"], -32602, "{error}");
    assert!(error["message"].as_str().expect("message").contains("didOpen"));
    let id = client.request_async("textDocument/inlineCompletion", position(99, 0));
    assert_eq!(client.response(id)["error"]["code"], -32602);
    // Wrong parameter types.
    let id = client.request_async("textDocument/inlineCompletion", json!({"textDocument": 5}));
    assert_eq!(client.response(id)["error"]["code"], -32602);
    // A stale version and an edit past the end are ignored (logged); the text stays as it was.
    client.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": "file:///bad.py", "version": 1},
               "contentChanges": [{"text": "stale = True\n"}]}),
    );
    client.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": "file:///bad.py", "version": 5},
               "contentChanges": [{"range": {"start": {"line": 40, "character": 0}, "end": {"line": 41, "character": 0}}, "text": "x"}]}),
    );
    client.wait_for("a log line for the ignored change", |m| {
        m["method"] == "window/logMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("ignored"))
    });
    let result = client.request("textDocument/inlineCompletion", position(1, 12));
    assert_eq!(inline_text(&result), expected("def f(x):\n    return x\n", 22));
    assert!(client.shutdown().success());
}

#[test]
fn cancel_request_answers_promptly() {
    let mut client = server();
    client.initialize(
        neovim_capabilities(),
        json!({"maxNewTokens": 400, "deadlineMs": 60000}),
    );
    client.wait_ready();
    client.open("file:///cancel.py", "import os\n");
    let id = client.request_async(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": "file:///cancel.py"}, "position": {"line": 1, "character": 0}, "context": {"triggerKind": 2}}),
    );
    let started = Instant::now();
    client.notify("$/cancelRequest", json!({"id": id}));
    let response = client.response(id);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Either cancelled, or it had already finished (the fixture model is fast).
    if let Some(error) = response.get("error") {
        assert_eq!(error["code"], -32800, "{response}");
    }
    assert!(client.status()["state"] == "ready");
    assert!(client.shutdown().success());
}

#[test]
fn a_model_that_fails_to_load_is_shown_and_the_server_stays_up() {
    let mut command = phi_lsp();
    command.args(["--stdio", "--model", "/nonexistent/phi"]);
    let mut client = LspClient::spawn(command);
    client.initialize(vscode_capabilities(), Value::Null);
    let message = client.wait_for("showMessage", |m| m["method"] == "window/showMessage");
    assert_eq!(message["params"]["type"], 1);
    assert!(message["params"]["message"]
        .as_str()
        .expect("text")
        .contains("/nonexistent/phi"));
    let status = client.status();
    assert_eq!(status["state"], "failed");
    client.open("file:///x.py", "def f():\n");
    let result = client.request(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": "file:///x.py"}, "position": {"line": 1, "character": 0}, "context": {"triggerKind": 2}}),
    );
    assert_eq!(inline_text(&result), None);
    // The status says why nothing came, and that no model saw a prompt.
    let last = client.status()["last"].clone();
    assert_eq!(
        (&last["stop"], &last["prompt"], &last["uri"]),
        (&json!("not-ready"), &Value::Null, &json!("file:///x.py")),
        "{last}"
    );
    // A configuration change to a good model loads it.
    client.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"phi-lsp": {"model": fixture_dir().display().to_string()}}}),
    );
    client.wait_ready();
    // Nothing before the cursor: no prompt, said so.
    client.request(
        "textDocument/inlineCompletion",
        json!({"textDocument": {"uri": "file:///x.py"}, "position": {"line": 0, "character": 0}, "context": {"triggerKind": 2}}),
    );
    let last = client.status()["last"].clone();
    assert_eq!(
        (&last["stop"], &last["prompt"]),
        (&json!("no-prompt"), &Value::Null),
        "{last}"
    );
    assert!(client.shutdown().success());
}

#[test]
fn stdin_closing_ends_the_process() {
    let mut client = server();
    client.initialize(neovim_capabilities(), options());
    client.close_stdin();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.child().try_wait().expect("waits").is_none() {
        assert!(
            Instant::now() < deadline,
            "phi-lsp kept running after stdin closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn custom_requests_take_empty_null_or_absent_params() {
    let mut client = server();
    client.initialize(neovim_capabilities(), options());
    client.wait_ready();
    // Ids well above the client's own counter, so the responses cannot be confused.
    let forms = [
        (
            "{}",
            json!({"jsonrpc": "2.0", "id": 9001, "method": "phi-lsp/status", "params": {}}),
        ),
        (
            "[]",
            json!({"jsonrpc": "2.0", "id": 9002, "method": "phi-lsp/status", "params": []}),
        ),
        (
            "null",
            json!({"jsonrpc": "2.0", "id": 9003, "method": "phi-lsp/status", "params": null}),
        ),
        (
            "absent",
            json!({"jsonrpc": "2.0", "id": 9004, "method": "phi-lsp/status"}),
        ),
    ];
    for (what, message) in &forms {
        client.send(message);
        let id = message["id"].as_i64().expect("id");
        let response = client.response(id);
        assert!(response.get("error").is_none(), "params {what}: {response}");
        assert_eq!(response["result"]["state"], "ready", "params {what}: {response}");
    }
    // Parameters it does not take are still refused, and the server's own notification with
    // nothing in it is logged as a malformed message with an unknown reason, not dropped.
    client.send(&json!({"jsonrpc": "2.0", "id": 9005, "method": "phi-lsp/status", "params": {"x": 1}}));
    assert_eq!(client.response(9005)["error"]["code"], -32602);
    client.send(&json!({"jsonrpc": "2.0", "method": "phi-lsp/malformedMessage"}));
    client.wait_for("the log line for a malformed message without params", |m| {
        m["method"] == "window/logMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("malformed message: unknown"))
    });
    assert!(client.shutdown().success());
}

/// The server's whole log (stderr) from a session on a server started with `env` and without the
/// log variables otherwise: initialize, load, open, ask, a malformed message, shutdown and exit.
fn session_log(env: &[(&str, &str)]) -> String {
    let mut command = phi_lsp();
    command
        .args(["--stdio", "--model"])
        .arg(fixture_dir())
        .env_remove("PHI_LSP_LOG")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied());
    let mut client = LspClient::spawn_capturing_stderr(command);
    client.initialize(neovim_capabilities(), options());
    client.wait_ready();
    client.open("file:///log.py", "def add(a, b):\n    return a");
    client.inline("file:///log.py", 1, 12);
    client.send_raw(b"Content-Length: 12\r\n\r\n{not json!!}");
    client.wait_log("malformed message from the client");
    let (status, log) = client.shutdown_with_log();
    assert!(status.success(), "{log}");
    log
}

/// Editors show a server's stderr as errors: by default it has warnings and errors only.
#[test]
fn the_server_logs_warnings_only_unless_asked_for_more() {
    let quiet = session_log(&[]);
    let lines: Vec<&str> = quiet.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("malformed message")),
        "a warning still shows by default:\n{quiet}"
    );
    // Nothing else: no INFO, DEBUG or TRACE line, and no warning for a session that ended normally.
    let others: Vec<&&str> = lines
        .iter()
        .filter(|l| !l.contains("malformed message"))
        .collect();
    assert!(
        others.is_empty(),
        "only the malformed message's warning by default: {others:#?}"
    );
    for (var, value) in [("PHI_LSP_LOG", "info"), ("RUST_LOG", "info")] {
        let log = session_log(&[(var, value)]);
        assert!(
            log.lines().any(|l| l.contains(" INFO ") && l.contains("loading")),
            "{var}={value} shows the INFO lines (the model loading):\n{log}"
        );
    }
}

/// VS Code shows the percentage of `$/progress`: every loading message carries one, from 0 at the
/// begin, never going down, the first forward after reading the weights.
#[test]
fn loading_progress_carries_a_rising_percentage() {
    let mut client = server();
    client.initialize(vscode_capabilities(), options());
    client.wait_for("progress end", |m| {
        m["method"] == "$/progress" && m["params"]["value"]["kind"] == "end"
    });
    let values: Vec<Value> = client
        .notifications
        .iter()
        .filter(|m| m["method"] == "$/progress")
        .map(|m| m["params"]["value"].clone())
        .collect();
    let kinds: Vec<&str> = values.iter().filter_map(|v| v["kind"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"begin"), "{values:#?}");
    assert_eq!(kinds.last(), Some(&"end"), "{values:#?}");
    assert_eq!(values[0]["percentage"], 0, "{values:#?}");
    let reports: Vec<&Value> = values.iter().filter(|v| v["kind"] == "report").collect();
    assert!(
        reports.len() >= 2,
        "reading the weights, then the first forward: {values:#?}"
    );
    let mut previous = 0;
    for report in &reports {
        let percentage = report["percentage"]
            .as_u64()
            .unwrap_or_else(|| panic!("a report without a percentage: {report}"));
        assert!((previous..=100).contains(&percentage), "{values:#?}");
        previous = percentage;
    }
    let warm_up = reports
        .iter()
        .find(|r| r["message"].as_str().is_some_and(|m| m.contains("first forward")))
        .expect("a warm-up report");
    let reading = reports
        .iter()
        .find(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("reading weights"))
        })
        .expect("a reading report");
    assert!(
        warm_up["percentage"].as_u64() > reading["percentage"].as_u64(),
        "{values:#?}"
    );
    client.wait_ready();
    assert!(client.shutdown().success());
}

/// Editors pass settings without a shell: `~/...` in `model` and `tokenizer` is the home folder.
#[cfg(unix)]
#[test]
fn a_leading_tilde_in_model_and_tokenizer_is_the_home_folder() {
    let home = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(fixture_dir(), home.path().join("tiny-phi")).expect("symlink");
    let mut command = phi_lsp();
    command
        .args(["--stdio", "--model", "~/nowhere"])
        .env("HOME", home.path());
    let mut client = LspClient::spawn(command);
    client.initialize(
        helix_capabilities(),
        json!({"model": "~/tiny-phi", "tokenizer": "~/tiny-phi/tokenizer.json",
               "maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000}),
    );
    let status = client.wait_ready();
    assert_eq!(status["state"], "ready", "{status}");
    client.open("file:///tilde.py", SOURCE);
    let (line, byte_col) = cursors()[0];
    let result = client.request(
        "textDocument/completion",
        json!({"textDocument": {"uri": "file:///tilde.py"}, "position": {"line": line, "character": byte_col}}),
    );
    let want = expected(SOURCE, byte_offset(SOURCE, line, byte_col));
    assert_eq!(
        result["items"].as_array().map(Vec::len),
        Some(usize::from(want.is_some())),
        "{result}"
    );
    assert!(client.shutdown().success());
}

/// A client that shows `labelDetails` gets the marker there and a label of the first line alone.
#[test]
fn menu_clients_with_label_details_get_the_marker_there() {
    let mut client = server();
    let mut caps = helix_capabilities();
    caps["textDocument"]["completion"]["completionItem"]["labelDetailsSupport"] = json!(true);
    client.initialize(caps, options());
    client.wait_ready();
    client.open("file:///details.py", SOURCE);
    let mut seen = 0;
    for (line, byte_col) in cursors() {
        let result = client.request(
            "textDocument/completion",
            json!({"textDocument": {"uri": "file:///details.py"}, "position": {"line": line, "character": byte_col}}),
        );
        let Some(item) = result["items"].as_array().and_then(|items| items.first()) else {
            continue;
        };
        seen += 1;
        assert_eq!(item["labelDetails"]["description"], "(phi-1)", "{item}");
        let label = item["label"].as_str().expect("label");
        assert!(!label.contains("(phi-1)"), "{label}");
        let new_text = item["textEdit"]["newText"].as_str().expect("newText");
        let first = new_text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let shown = label.trim_end_matches('…');
        assert!(first.starts_with(shown) && !shown.is_empty(), "{label} / {first}");
    }
    assert!(seen >= 2, "the fixture suggests at two cursors at least");
    assert!(client.shutdown().success());
}
