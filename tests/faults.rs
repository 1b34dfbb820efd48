//! Faults, through the real binary: a panic in a request handler, inside a job on the model thread
//! or one that kills the model thread is an error answer and a log line, and the server goes on
//! serving; the client vanishing mid-generation ends the process; `shutdown`/`exit` mid-generation
//! are honoured within a second; and a 10 MB document or a 1 MB line costs a keystroke what a
//! small file does. (A model that fails to load is `tests/lsp.rs`'s
//! `a_model_that_fails_to_load_is_shown_and_the_server_stays_up`.)
//!
//! Panics are injected with the server's test-only `PHI_LSP_TEST_PANIC=request|worker|worker-exit`:
//! a completion whose text before the cursor contains `PHI_LSP_TEST_PANIC` panics at that site.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::lsp_client::LspClient;
use common::{complete_fresh, fixture_dir, inline_text, phi_lsp, DEFAULT_CONTEXT_TOKENS};
use serde_json::{json, Value};

const MAX_NEW_TOKENS: usize = 24;

/// Whole suggestions (`progressive` off), so each answer can be compared with `phi-lsp complete`.
fn options() -> Value {
    json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "progressive": false})
}

/// VS Code's: UTF-16 positions, like `phi-lsp complete`'s.
fn capabilities() -> Value {
    json!({"textDocument": {"inlineCompletion": {}}})
}

fn server_for(model: &Path, panic_site: Option<&str>) -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(model);
    if let Some(site) = panic_site {
        // The panics are expected: no backtraces in the test's output.
        command.env("PHI_LSP_TEST_PANIC", site).env("RUST_BACKTRACE", "0");
    }
    LspClient::spawn_capturing_stderr(command)
}

fn ready_server(panic_site: Option<&str>) -> LspClient {
    let mut client = server_for(&fixture_dir(), panic_site);
    client.initialize(capabilities(), options());
    client.wait_ready();
    client
}

fn inline(client: &mut LspClient, uri: &str, line: u32, character: u32) -> Value {
    let id = client.inline_async(uri, line, character);
    client.response(id)
}

const GOOD_URI: &str = "file:///good.py";
const GOOD: &str = "import os\n\n\ndef add(a, b):\n    return a";
const BOOM_URI: &str = "file:///boom.py";
const BOOM: &str = "# PHI_LSP_TEST_PANIC\ndef boom(x):\n    return x";

/// Three rounds of: a completion that panics (an internal-error answer and an error line in the
/// server's log), then one that does not (the fresh computation's answer).
fn panics_are_error_answers(site: &str, log_needle: &str) -> LspClient {
    let mut client = ready_server(Some(site));
    client.open(GOOD_URI, GOOD);
    client.open(BOOM_URI, BOOM);
    let want = complete_fresh(GOOD, 4, 12, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    assert!(
        want.is_some(),
        "the fixture suggests something at the end of GOOD"
    );
    for round in 1..=3 {
        let response = inline(&mut client, BOOM_URI, 2, 12);
        let error = &response["error"];
        assert_eq!(error["code"], -32603, "round {round}: {response}");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains("panicked")),
            "{response}"
        );
        client.wait_log_count(log_needle, round);
        let response = inline(&mut client, GOOD_URI, 4, 12);
        assert_eq!(
            inline_text(&response["result"]),
            want,
            "round {round}: {response}"
        );
        assert_eq!(client.status()["state"], "ready");
    }
    assert_eq!(client.count_log(log_needle), 3);
    client
}

#[test]
fn a_panic_in_a_request_handler_is_an_error_answer_and_the_server_keeps_serving() {
    let client = panics_are_error_answers("request", "textDocument/inlineCompletion panicked");
    // The editor's log shows it too.
    let shown = client
        .notifications
        .iter()
        .filter(|m| {
            m["method"] == "window/logMessage"
                && m["params"]["type"] == 1
                && m["params"]["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("panicked"))
        })
        .count();
    assert_eq!(shown, 3);
    assert!(client.shutdown().success());
}

#[test]
fn a_panic_in_a_job_on_the_model_thread_is_an_error_answer_and_the_server_keeps_serving() {
    let mut client = panics_are_error_answers("worker", "the model thread panicked on a job and recovered");
    assert_eq!(client.status()["worker"]["panics"], 3);
    assert!(client.shutdown().success());
}

/// A panic on the model thread outside its per-job guard ends the thread and takes the engine
/// with it: the request is answered with an error, and the model is loaded again.
#[test]
fn a_model_thread_that_dies_is_restarted() {
    let mut client = ready_server(Some("worker-exit"));
    client.open(GOOD_URI, GOOD);
    client.open(BOOM_URI, BOOM);
    let want = complete_fresh(GOOD, 4, 12, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    for round in 1..=2 {
        let response = inline(&mut client, BOOM_URI, 2, 12);
        assert_eq!(response["error"]["code"], -32603, "round {round}: {response}");
        client.wait_for("the restart's log line in the editor", |m| {
            m["method"] == "window/logMessage"
                && m["params"]["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("model thread stopped"))
        });
        client.wait_log_count("the model thread stopped", round);
        client.wait_ready();
        let response = inline(&mut client, GOOD_URI, 4, 12);
        assert_eq!(
            inline_text(&response["result"]),
            want,
            "round {round}: {response}"
        );
        client.notifications.clear();
    }
    assert!(client.shutdown().success());
}

/// A model folder with the fixture's tokenizer and a larger Phi shape (16 layers of width 512)
/// whose weights are all zero, in a sparse file: every position predicts token 0 (`!`), so a
/// completion at the end of a line runs to its token limit at a few milliseconds a token. The
/// 16 layers are sized so that a 500-token generation is still running at the 300 ms check below
/// even on a fast 2-core machine (with 4 layers it could finish first).
fn slow_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = fixture_dir();
    std::fs::copy(fixture.join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copies");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).expect("config"))
            .expect("config parses");
    let (hidden, layers, intermediate, vocab) = (512usize, 16usize, 2048usize, 1088usize);
    config["hidden_size"] = hidden.into();
    config["num_hidden_layers"] = layers.into();
    config["intermediate_size"] = intermediate.into();
    config["num_attention_heads"] = 8.into();
    config["num_key_value_heads"] = 8.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("writes");

    let mut tensors = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    let mut weight_and_bias = |name: String, weight: Vec<usize>| {
        tensors.push((format!("{name}.bias"), vec![weight[0]]));
        tensors.push((format!("{name}.weight"), weight));
    };
    for layer_idx in 0..layers {
        let prefix = format!("model.layers.{layer_idx}");
        for proj in ["q_proj", "k_proj", "v_proj", "dense"] {
            weight_and_bias(format!("{prefix}.self_attn.{proj}"), vec![hidden, hidden]);
        }
        weight_and_bias(format!("{prefix}.mlp.fc1"), vec![intermediate, hidden]);
        weight_and_bias(format!("{prefix}.mlp.fc2"), vec![hidden, intermediate]);
        weight_and_bias(format!("{prefix}.input_layernorm"), vec![hidden]);
    }
    weight_and_bias("model.final_layernorm".into(), vec![hidden]);
    weight_and_bias("lm_head".into(), vec![vocab, hidden]);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let n_bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n_bytes]}),
        );
        offset += n_bytes;
    }
    let mut header = Value::Object(header).to_string().into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes).expect("writes");
    // The data is all zeros: a sparse extension.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("opens");
    file.set_len((bytes.len() + offset) as u64).expect("extends");
    dir
}

/// A server on the slow model with a 500-token completion under way at the end of `x = `.
fn mid_generation() -> (LspClient, tempfile::TempDir, i64) {
    let model = slow_model();
    let mut client = server_for(model.path(), None);
    client.initialize(capabilities(), json!({"maxNewTokens": 500, "deadlineMs": 60000}));
    client.wait_ready();
    client.open("file:///long.py", "x = ");
    let id = client.inline_async("file:///long.py", 0, 4);
    std::thread::sleep(Duration::from_millis(300));
    let status = client.status();
    assert_eq!(
        status["worker"]["jobsRun"], 0,
        "the generation should still be running: {status}"
    );
    (client, model, id)
}

#[test]
fn shutdown_and_exit_are_honoured_within_a_second_mid_generation() {
    let (mut client, _model, id) = mid_generation();
    let started = Instant::now();
    let shutdown = client.request_async("shutdown", Value::Null);
    let response = client.response(shutdown);
    assert!(response.get("error").is_none(), "{response}");
    client.notify("exit", Value::Null);
    let status = client.wait_exit(Duration::from_secs(1));
    let elapsed = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "phi-lsp did not exit cleanly within a second of shutdown/exit: {status:?} after {elapsed:?}"
    );
    eprintln!("shutdown/exit mid-generation: exited after {elapsed:?} (request {id} in flight)");
}

#[test]
fn stdin_closing_mid_generation_ends_the_process_cleanly() {
    let (mut client, _model, _id) = mid_generation();
    let started = Instant::now();
    client.close_stdin();
    let status = client.wait_exit(Duration::from_secs(1));
    let elapsed = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "phi-lsp did not exit cleanly within a second of stdin closing: {status:?} after {elapsed:?}"
    );
    eprintln!("stdin closed mid-generation: exited after {elapsed:?}");
}

/// One document's keystroke costs: the model answers' prompt and prefilled tokens and the wall time
/// of a `didChange` plus its completion.
#[derive(Debug)]
struct Costs {
    prompt_tokens: Vec<u64>,
    prefilled_tokens: Vec<u64>,
    millis: Vec<f64>,
}

fn median<T: Copy + PartialOrd>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("ordered"));
    sorted[sorted.len() / 2]
}

const KEYSTROKES: usize = 24;

/// Opens `text` under `uri` and types `KEYSTROKES` characters at (line, character), asking for a
/// completion after each; the last answer is checked against a fresh process on the final text.
fn keystroke_costs(client: &mut LspClient, uri: &str, text: &str, line: u32, character: u32) -> Costs {
    let started = Instant::now();
    client.open(uri, text);
    let first = inline(client, uri, line, character);
    assert!(first.get("error").is_none(), "{first}");
    eprintln!(
        "{uri}: {} bytes opened and first completion in {:?}",
        text.len(),
        started.elapsed()
    );
    let mut costs = Costs {
        prompt_tokens: Vec::new(),
        prefilled_tokens: Vec::new(),
        millis: Vec::new(),
    };
    let typed = "q_z = 7; w_9 .k";
    let mut col = character;
    let mut last = None;
    for (i, ch) in typed.chars().cycle().take(KEYSTROKES).enumerate() {
        let started = Instant::now();
        let at = json!({"line": line, "character": col});
        client.change(
            uri,
            2 + i as i32,
            json!([{"range": {"start": at, "end": at}, "text": ch.to_string()}]),
        );
        col += 1;
        let response = inline(client, uri, line, col);
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        assert!(response.get("error").is_none(), "{response}");
        last = Some(inline_text(&response["result"]));
        let status = client.status();
        let cost = &status["last"];
        if cost["from_cache"] == true {
            continue;
        }
        costs
            .prompt_tokens
            .push(cost["prompt_tokens"].as_u64().expect("prompt_tokens"));
        costs
            .prefilled_tokens
            .push(cost["prefilled_tokens"].as_u64().expect("prefilled"));
        costs.millis.push(elapsed);
    }
    assert!(
        costs.millis.len() >= KEYSTROKES / 2,
        "most keystrokes need the model: {costs:?}"
    );
    // The final text, built the way the edits built it.
    let line_start: usize = text.split_inclusive('\n').take(line as usize).map(str::len).sum();
    let insert_at = line_start + character as usize;
    let typed: String = typed.chars().cycle().take(KEYSTROKES).collect();
    let final_text = format!("{}{typed}{}", &text[..insert_at], &text[insert_at..]);
    assert_eq!(
        last.expect("answered"),
        complete_fresh(&final_text, line, col, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS),
        "{uri}: the last answer"
    );
    client.close(uri);
    costs
}

/// Compares a huge document's keystrokes with a small file's: the prompt stays within the slot,
/// a keystroke prefills a few tokens, and its wall time is within a small factor.
fn check_costs_like_a_small_file(name: &str, uri: &str, text: &str, line: u32, character: u32) {
    let mut client = ready_server(None);
    let small: String = (0..40)
        .map(|i| format!("value_{i} = compute({i}, {})\n", i * 7))
        .collect();
    let small_line = small.lines().count() as u32 - 1;
    let small_costs = keystroke_costs(&mut client, "file:///small.py", &small, small_line, 10);
    let big_costs = keystroke_costs(&mut client, uri, text, line, character);
    let status = client.status();
    let capacity = status["contextTokens"].as_u64().expect("contextTokens").min(512);
    eprintln!(
        "{name}: median prompt tokens {} (small file {}), median prefilled {} (small {}), max prefilled {} \
         (small {}), median keystroke {:.1} ms (small {:.1} ms)",
        median(&big_costs.prompt_tokens),
        median(&small_costs.prompt_tokens),
        median(&big_costs.prefilled_tokens),
        median(&small_costs.prefilled_tokens),
        big_costs.prefilled_tokens.iter().max().expect("some"),
        small_costs.prefilled_tokens.iter().max().expect("some"),
        median(&big_costs.millis),
        median(&small_costs.millis),
    );
    assert!(
        big_costs.prompt_tokens.iter().all(|&n| n <= capacity),
        "{name}: the prompt is bounded by the slot's {capacity} positions: {big_costs:?}"
    );
    assert!(
        median(&big_costs.prefilled_tokens) <= median(&small_costs.prefilled_tokens) + 2,
        "{name}: a keystroke prefills what it does in a small file: {big_costs:?} vs {small_costs:?}"
    );
    assert!(
        median(&big_costs.millis) <= 2.0 * median(&small_costs.millis) + 15.0,
        "{name}: a keystroke takes what it takes in a small file: {big_costs:?} vs {small_costs:?}"
    );
    assert!(client.shutdown().success());
}

#[test]
fn a_ten_megabyte_document_costs_a_keystroke_what_a_small_file_does() {
    let text: String = (0..400_000)
        .map(|i| format!("value_{i} = compute({i}, {})\n", i * 7))
        .collect();
    assert!(text.len() > 10_000_000);
    // In the middle, after `value_200000 = `: text after the cursor, too.
    check_costs_like_a_small_file("10 MB document", "file:///ten_mb.py", &text, 200_000, 15);
}

#[test]
fn a_one_megabyte_line_costs_a_keystroke_what_a_small_file_does() {
    let items: String = (0..200_000).map(|i| format!("{}, ", i % 10_000)).collect();
    let text = format!("import os\n\ndata = [{items}]\nprint(data)\n");
    let long_line = text.lines().nth(2).expect("line 2");
    assert!(long_line.len() > 1_000_000);
    check_costs_like_a_small_file("1 MB line", "file:///long_line.py", &text, 2, 500_001);
}
