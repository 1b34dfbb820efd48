//! Definitions from the other open documents, end to end: with `shapes.py` open, a completion in
//! `main.py`, which imports from it, gets a prompt (the status's `last.prompt`) that starts with
//! `# shapes.py` and Circle's stub (signatures and docstrings, no bodies), then main.py's text;
//! a file that is not open is not read, closing `shapes.py` takes it out, the stubs stay within
//! a quarter of `contextTokens`, and typing in main.py prefills only a few tokens a keystroke.

mod common;

use common::lsp_client::LspClient;
use common::{end_of, fixture_dir, phi_lsp};
use phi_engine::PhiTokenizer;
use serde_json::{json, Value};

/// `shapes.py`: every body has a line that must never reach the prompt.
const SHAPES: &str = "\"\"\"Shapes.\"\"\"\nimport math\n\n\nclass Circle:\n    \"\"\"A circle of radius r.\"\"\"\n\n    def __init__(self, r):\n        self.r = r  # BODY\n\n    def area(self):\n        \"\"\"Its area.\"\"\"\n        return math.pi * self.r ** 2  # BODY\n\n\ndef unused():\n    return 0  # BODY\n";
const CIRCLE_STUB: &str = "# shapes.py\nclass Circle:\n    \"\"\"A circle of radius r.\"\"\"\n\n    def __init__(self, r):\n        ...\n\n    def area(self):\n        \"\"\"Its area.\"\"\"\n\n\n";
/// The budget test's context: a quarter of it is less than 60 classes' stubs.
const CONTEXT_TOKENS: usize = 512;

fn server(context_tokens: usize) -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.initialize(
        json!({"general": {"positionEncodings": ["utf-16"]},
               "textDocument": {"inlineCompletion": {}}}),
        json!({"maxNewTokens": 8, "deadlineMs": 60000, "speculate": false, "progressive": false,
               "contextTokens": context_tokens}),
    );
    client.wait_ready();
    client
}

/// The prompt of a completion at the end of `text`, the document `uri`.
fn prompt_at_end(client: &mut LspClient, uri: &str, text: &str) -> Value {
    let (line, col) = end_of(text, true);
    client.inline(uri, line, col);
    let last = client.status()["last"].clone();
    assert_eq!(last["uri"], uri, "{last}");
    last
}

fn prompt(last: &Value) -> String {
    last["prompt"].as_str().expect("a prompt").to_string()
}

/// What the model saw of `text`: without the token healing dropped.
fn seen<'a>(last: &Value, text: &'a str) -> &'a str {
    let healed = last["healed"].as_str().unwrap_or_default();
    text.strip_suffix(healed).expect("the healed text ends the text")
}

/// A folder on disk whose URIs the documents take: `colors.py` is there, on disk, never opened.
fn folder() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let colors = "RED = '#f00'  # ON DISK\n\n\ndef blend(a, b):\n    return a\n";
    std::fs::write(dir.path().join("colors.py"), colors).expect("writes");
    let base = format!("file://{}", dir.path().display());
    (dir, base)
}

#[test]
fn the_imported_stubs_come_first_for_the_three_import_forms() {
    let (_dir, base) = folder();
    let mut client = server(1024);
    let shapes = format!("{base}/shapes.py");
    client.open(&shapes, SHAPES);
    // `import shapes` gets all its public names (the ones used first, when they do not all fit).
    let whole_module = CIRCLE_STUB.replace("\n\n\n", "\n\ndef unused():\n    ...\n\n\n");
    let forms = [
        "from shapes import Circle\nfrom colors import RED\n\n\ndef ring(r):\n    c = Circle(r)\n    return c.",
        "from .shapes import Circle\n\n\ndef ring(r):\n    return Circle(r).",
        "import shapes\n\n\ndef ring(r):\n    return shapes.Circle(r).",
    ];
    for (i, text) in forms.iter().enumerate() {
        let main = format!("{base}/main{i}.py");
        client.open(&main, text);
        let last = prompt_at_end(&mut client, &main, text);
        let prompt = prompt(&last);
        let stubs = if i == 2 {
            whole_module.as_str()
        } else {
            CIRCLE_STUB
        };
        assert_eq!(
            prompt,
            format!("{stubs}{}", seen(&last, text)),
            "the stubs, then main's text"
        );
        assert!(!prompt.contains("BODY"), "no body reaches the prompt: {prompt:?}");
        assert!(
            !prompt.contains("ON DISK"),
            "the unopened file is not read: {prompt:?}"
        );
    }
    assert!(client.shutdown().success());
}

#[test]
fn closing_the_imported_document_takes_its_stubs_out() {
    let (_dir, base) = folder();
    let mut client = server(1024);
    let (shapes, main) = (format!("{base}/shapes.py"), format!("{base}/main.py"));
    let text = "from shapes import Circle\n\nc = Circle(2)\nprint(c.";
    client.open(&shapes, SHAPES);
    client.open(&main, text);
    assert!(prompt(&prompt_at_end(&mut client, &main, text)).starts_with(CIRCLE_STUB));
    client.close(&shapes);
    // Opened again, so the request is not typed through the suggestion shown before.
    client.close(&main);
    client.open(&main, text);
    let prompt = prompt(&prompt_at_end(&mut client, &main, text));
    assert!(!prompt.contains("class Circle"), "{prompt:?}");
    assert!(text.starts_with(&prompt), "{prompt:?}");
    assert!(client.shutdown().success());
}

#[test]
fn the_stubs_stay_within_a_quarter_of_the_context() {
    let (_dir, base) = folder();
    let mut client = server(CONTEXT_TOKENS);
    let mut big = String::new();
    for i in 0..60 {
        big += &format!("class Shape{i}:\n    \"\"\"Shape number {i}, with a docstring.\"\"\"\n\n    def area(self, scale):\n        return {i} * scale\n\n\n");
    }
    let (shapes, main) = (format!("{base}/shapes.py"), format!("{base}/main.py"));
    let text = "from shapes import *\n\n\ndef total(shapes):\n    return sum(s.";
    client.open(&shapes, &big);
    client.open(&main, text);
    let prompt = prompt(&prompt_at_end(&mut client, &main, text));
    let at = prompt
        .find("from shapes import *")
        .expect("main's text is in the prompt");
    let stubs = &prompt[..at];
    assert!(stubs.starts_with("# shapes.py\nclass Shape0:\n"), "{prompt:?}");
    let tokenizer = PhiTokenizer::from_file(&fixture_dir().join("tokenizer.json")).expect("tokenizer");
    let n_tokens = tokenizer.encode(stubs).expect("encodes").len();
    assert!(n_tokens <= CONTEXT_TOKENS / 4, "{n_tokens} tokens of stubs");
    assert!(
        n_tokens > CONTEXT_TOKENS / 8,
        "the budget is used: {n_tokens} tokens"
    );
    assert!(!stubs.contains("Shape59"), "the last ones did not fit");
    assert!(client.shutdown().success());
}

#[test]
fn typing_under_the_imports_prefills_a_few_tokens() {
    let (_dir, base) = folder();
    let mut client = server(1024);
    let (shapes, main) = (format!("{base}/shapes.py"), format!("{base}/main.py"));
    let mut text = "from shapes import Circle\n\n\ndef ring(r):\n    ".to_string();
    client.open(&shapes, SHAPES);
    client.open(&main, &text);
    let first = prompt_at_end(&mut client, &main, &text);
    assert!(prompt(&first).starts_with(CIRCLE_STUB));
    let mut prefilled = Vec::new();
    for (version, ch) in (2..).zip("total = Circle(r)".chars()) {
        let (line, col) = end_of(&text, true);
        client.insert(&main, version, line, col, &ch.to_string());
        text.push(ch);
        let last = prompt_at_end(&mut client, &main, &text);
        if last["from_cache"] == true {
            continue;
        }
        assert!(prompt(&last).starts_with(CIRCLE_STUB), "{last}");
        prefilled.push(last["prefilled_tokens"].as_u64().expect("prefilled"));
    }
    eprintln!("first prefill {}, then {prefilled:?}", first["prefilled_tokens"]);
    assert!(prefilled.len() >= 5, "{prefilled:?}");
    let max = prefilled.iter().max().copied().unwrap_or_default();
    assert!(max < 10, "a keystroke prefilled {max} tokens: {prefilled:?}");
    assert!(client.shutdown().success());
}

#[test]
fn a_document_outside_the_files_workspace_root_is_not_used() {
    let (dir, base) = folder();
    std::fs::create_dir(dir.path().join("app")).expect("mkdir");
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.request(
        "initialize",
        json!({"processId": null, "rootUri": format!("{base}/app"),
               "workspaceFolders": [{"uri": format!("{base}/app"), "name": "app"}],
               "capabilities": {"textDocument": {"inlineCompletion": {}}},
               "initializationOptions": {"maxNewTokens": 4, "speculate": false, "progressive": false}}),
    );
    client.notify("initialized", json!({}));
    client.wait_ready();
    let text = "from shapes import Circle\n\nc = Circle(";
    // Above the root: not this workspace's. Inside it: used.
    client.open(&format!("{base}/shapes.py"), SHAPES);
    let main = format!("{base}/app/main.py");
    client.open(&main, text);
    assert_eq!(prompt(&prompt_at_end(&mut client, &main, text)), text);
    client.open(&format!("{base}/app/shapes.py"), SHAPES);
    client.close(&main);
    client.open(&main, text);
    assert!(prompt(&prompt_at_end(&mut client, &main, text)).starts_with(CIRCLE_STUB));
    assert!(client.shutdown().success());
}
