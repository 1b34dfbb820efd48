//! The file's structure in the prompt, end to end: for a cursor deep in a long module, the prompt
//! the model gets (`phi-lsp complete --json`'s `prompt`, the status's `last.prompt`) starts with
//! the module's imports and the enclosing `class` and `def` lines, and typing there prefills only
//! a few tokens a keystroke (the header is a prefix the KV cache keeps).

mod common;

use common::lsp_client::LspClient;
use common::{end_of, fixture_dir, json_output, phi_lsp};
use serde_json::json;

const IMPORTS: &str =
    "import os\nimport sys\nfrom collections import (\n    OrderedDict,\n    defaultdict,\n)\n";
/// What the header must be, by hand: the imports, a blank line, the class line, the method line.
const HEADER: &str = "import os\nimport sys\nfrom collections import (\n    OrderedDict,\n    defaultdict,\n)\n\nclass Registry:\n    def lookup(self, key):\n";

/// Imports, 60 functions, then a class whose method has a 200-line body: the file ends inside
/// it, at its indentation, far below the class line.
fn long_module() -> String {
    let mut text = format!("{IMPORTS}\n\n");
    for i in 0..60 {
        text += &format!("def helper_{i}(x):\n    return x + {i}\n\n\n");
    }
    text += "class Registry:\n    \"\"\"Named values.\"\"\"\n\n    def lookup(self, key):\n";
    for i in 0..200 {
        text += &format!("        value_{i} = self.table.get(key, {i})\n");
    }
    text + "        "
}

/// The prompt is the header, then a suffix of the text before the cursor.
fn assert_structured(prompt: &str, text: &str) {
    let rest = prompt.strip_prefix(HEADER).unwrap_or_else(|| {
        panic!(
            "the prompt starts with the header: {:?}",
            &prompt[..200.min(prompt.len())]
        )
    });
    assert!(text.ends_with(rest), "the rest is the text before the cursor");
    assert!(rest.len() > 500, "a real window follows: {} chars", rest.len());
    assert!(
        !rest.contains("class Registry"),
        "the class line is above the window"
    );
}

#[test]
fn complete_shows_the_imports_and_the_enclosing_headers_first() {
    let text = long_module();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("registry.py");
    std::fs::write(&file, &text).expect("writes");
    let (line, character) = end_of(&text, true);
    let out = json_output(
        phi_lsp()
            .arg("complete")
            .arg(&file)
            .args(["--line", &line.to_string(), "--character", &character.to_string()])
            .args([
                "--max-new-tokens",
                "8",
                "--deadline-ms",
                "60000",
                "--json",
                "--model",
            ])
            .arg(fixture_dir()),
    );
    assert_structured(out["prompt"].as_str().expect("prompt"), &text);
    // Near the top there is no header: the prompt is the text before the cursor.
    let out = json_output(
        phi_lsp()
            .arg("complete")
            .arg(&file)
            .args(["--line", "9", "--character", "4"])
            .args([
                "--max-new-tokens",
                "8",
                "--deadline-ms",
                "60000",
                "--json",
                "--model",
            ])
            .arg(fixture_dir()),
    );
    let start: String = text.lines().take(9).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        out["prompt"].as_str(),
        Some(format!("{start}    ").as_str()),
        "{out}"
    );
}

#[test]
fn typing_deep_in_a_long_module_prefills_a_few_tokens() {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.initialize(
        json!({"general": {"positionEncodings": ["utf-16"]},
               "textDocument": {"inlineCompletion": {}}}),
        json!({"maxNewTokens": 8, "deadlineMs": 60000, "speculate": false, "progressive": false}),
    );
    client.wait_ready();
    let uri = "file:///registry.py";
    let mut text = long_module();
    client.open(uri, &text);
    let (line, col) = end_of(&text, true);
    client.inline(uri, line, col);
    let first = client.status()["last"].clone();
    assert_structured(first["prompt"].as_str().expect("prompt"), &text);
    let mut prefilled = Vec::new();
    for (version, ch) in (2..).zip("total = key".chars()) {
        let (line, col) = end_of(&text, true);
        client.insert(uri, version, line, col, &ch.to_string());
        text.push(ch);
        let (line, col) = end_of(&text, true);
        client.inline(uri, line, col);
        let last = client.status()["last"].clone();
        if last["from_cache"] == true {
            continue;
        }
        // With the cursor after a letter the prompt's last token is healed: the model saw the text
        // without it.
        let healed = last["healed"].as_str().unwrap_or_default();
        let seen = text.strip_suffix(healed).expect("the healed text ends the text");
        assert_structured(last["prompt"].as_str().expect("prompt"), seen);
        prefilled.push(last["prefilled_tokens"].as_u64().expect("prefilled"));
    }
    eprintln!("first prefill {}, then {prefilled:?}", first["prefilled_tokens"]);
    assert!(prefilled.len() >= 5, "{prefilled:?}");
    let max = prefilled.iter().max().copied().unwrap_or_default();
    assert!(max < 10, "a keystroke prefilled {max} tokens: {prefilled:?}");
    assert!(
        first["prefilled_tokens"].as_u64().expect("prefilled") > 100,
        "the first request prefilled the whole prompt: {first}"
    );
    assert!(client.shutdown().success());
}
