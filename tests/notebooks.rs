//! Jupyter notebooks over stdio, as VS Code syncs them (LSP 3.17 `notebookDocument/*`): the
//! server asks for the Python cells, a completion in a cell reads the notebook's earlier code
//! cells first, and what it suggests is what a fresh `phi-lsp complete` suggests at the same place
//! of one file holding those cells in order, each followed by a blank line — after edits in an
//! earlier cell, cells added and removed, and a cell turned into markdown. Bad notebook messages
//! are logged and change nothing, and a closed notebook's cells are gone.

mod common;

use common::lsp_client::LspClient;
use common::{complete_fresh, end_of, fixture_dir, inline_text, phi_lsp, DEFAULT_CONTEXT_TOKENS};
use serde_json::{json, Value};

const MAX_NEW_TOKENS: usize = 16;
const NOTEBOOK: &str = "file:///work/areas.ipynb";
const IMPORTS: &str = "vscode-notebook-cell:/work/areas.ipynb#W0sZmlsZQ%3D%3D";
const NOTES: &str = "vscode-notebook-cell:/work/areas.ipynb#W1sZmlsZQ%3D%3D";
const AREA: &str = "vscode-notebook-cell:/work/areas.ipynb#W2sZmlsZQ%3D%3D";
const SCALE: &str = "vscode-notebook-cell:/work/areas.ipynb#W3sZmlsZQ%3D%3D";

const AREA_TEXT: &str = "def area(r):\n    \"\"\"Area of a circle of radius r.\"\"\"\n    return ";

fn cell(kind: u32, uri: &str) -> Value {
    json!({"kind": kind, "document": uri})
}

fn item(uri: &str, language: &str, text: &str) -> Value {
    json!({"uri": uri, "languageId": language, "version": 1, "text": text})
}

fn server() -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn_capturing_stderr(command);
    let init = client.initialize(
        json!({"textDocument": {"inlineCompletion": {}},
               "notebookDocument": {"synchronization": {}}}),
        json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "progressive": false,
               "speculate": false}),
    );
    let selector = &init["capabilities"]["notebookDocumentSync"]["notebookSelector"][0];
    assert_eq!(selector["notebook"], "*", "{init}");
    assert_eq!(selector["cells"], json!([{"language": "python"}]), "{init}");
    client.wait_ready();
    client
}

/// The server's suggestion at the end of the AREA cell (whose text is `cell_text`), and the prompt
/// the model saw with the healed text put back.
fn suggest_at_end_of_area(client: &mut LspClient, cell_text: &str) -> (Option<String>, String) {
    let (line, character) = end_of(cell_text, true);
    let text = inline_text(&client.inline(AREA, line, character));
    let last = client.status()["last"].clone();
    let prompt = last["prompt"].as_str().expect("prompt").to_string();
    let healed = last["healed"].as_str().unwrap_or_default();
    (text, format!("{prompt}{healed}"))
}

/// What a fresh `phi-lsp complete` suggests at the end of `file`.
fn fresh(file: &str) -> Option<String> {
    let (line, character) = end_of(file, true);
    complete_fresh(file, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS)
}

#[test]
fn a_cell_is_completed_after_the_earlier_cells() {
    let mut client = server();
    client.notify(
        "notebookDocument/didOpen",
        json!({
            "notebookDocument": {"uri": NOTEBOOK, "notebookType": "jupyter-notebook", "version": 1,
                "cells": [cell(2, IMPORTS), cell(1, NOTES), cell(2, AREA)]},
            "cellTextDocuments": [
                item(IMPORTS, "python", "import math\n\nPI = math.pi"),
                item(NOTES, "markdown", "# Areas of shapes\n"),
                item(AREA, "python", AREA_TEXT),
            ]
        }),
    );
    // The markdown cell is left out; each code cell ends its line and is followed by a blank one.
    let file = format!("import math\n\nPI = math.pi\n\n{AREA_TEXT}");
    let (text, prompt) = suggest_at_end_of_area(&mut client, AREA_TEXT);
    assert_eq!(prompt, file, "the prompt is the earlier cells, then the cell");
    let want = fresh(&file);
    assert!(want.is_some(), "the fixture suggests something here");
    assert_eq!(text, want);

    // An edit in the first cell, and a new cell before the one asked in.
    client.notify(
        "notebookDocument/didChange",
        json!({
            "notebookDocument": {"uri": NOTEBOOK, "version": 2},
            "change": {"cells": {
                "structure": {"array": {"start": 2, "deleteCount": 0, "cells": [cell(2, SCALE)]},
                              "didOpen": [item(SCALE, "python", "SCALE = 3\n")]},
                "textContent": [{"document": {"uri": IMPORTS, "version": 2},
                    "changes": [{"range": {"start": {"line": 0, "character": 0},
                                           "end": {"line": 0, "character": 0}},
                                 "text": "import os\n"}]}]
            }}
        }),
    );
    let file = format!("import os\nimport math\n\nPI = math.pi\n\nSCALE = 3\n\n{AREA_TEXT}");
    let (text, prompt) = suggest_at_end_of_area(&mut client, AREA_TEXT);
    assert_eq!(prompt, file);
    assert_eq!(text, fresh(&file));

    // The first cell turned into markdown, the new one deleted.
    client.notify(
        "notebookDocument/didChange",
        json!({
            "notebookDocument": {"uri": NOTEBOOK, "version": 3},
            "change": {"cells": {
                "structure": {"array": {"start": 2, "deleteCount": 1},
                              "didClose": [{"uri": SCALE}]},
                "data": [cell(1, IMPORTS)]
            }}
        }),
    );
    let (text, prompt) = suggest_at_end_of_area(&mut client, AREA_TEXT);
    assert_eq!(prompt, AREA_TEXT, "no code cell is left before it");
    assert_eq!(text, fresh(AREA_TEXT));
    assert!(client.shutdown().success());
}

#[test]
fn bad_notebook_messages_change_nothing_and_closing_forgets_the_cells() {
    let mut client = server();
    client.notify(
        "notebookDocument/didOpen",
        json!({
            "notebookDocument": {"uri": NOTEBOOK, "notebookType": "jupyter-notebook", "version": 1,
                "cells": [cell(2, IMPORTS), cell(2, AREA)]},
            "cellTextDocuments": [item(IMPORTS, "python", "import math\n"),
                                  item(AREA, "python", AREA_TEXT)]
        }),
    );
    let file = format!("import math\n\n{AREA_TEXT}");
    // A structure change past the last cell, and an edit past the end of a cell.
    client.notify(
        "notebookDocument/didChange",
        json!({
            "notebookDocument": {"uri": NOTEBOOK, "version": 2},
            "change": {"cells": {
                "structure": {"array": {"start": 1, "deleteCount": 5}},
                "textContent": [{"document": {"uri": IMPORTS, "version": 2},
                    "changes": [{"range": {"start": {"line": 9, "character": 0},
                                           "end": {"line": 9, "character": 0}},
                                 "text": "import os\n"}]}]
            }}
        }),
    );
    client.wait_log("has 2 cells: a change that deletes 5 from cell 1 on does not fit");
    client.wait_log("notebook change ignored in part");
    // A change to a notebook that is not open, and a malformed one.
    client.notify(
        "notebookDocument/didChange",
        json!({"notebookDocument": {"uri": "file:///other.ipynb", "version": 2},
               "change": {"cells": {"data": [cell(1, AREA)]}}}),
    );
    client.wait_log("notebook file:///other.ipynb is not open");
    client.notify("notebookDocument/didChange", json!({"notebookDocument": 7}));
    let (text, prompt) = suggest_at_end_of_area(&mut client, AREA_TEXT);
    assert_eq!(prompt, file, "the notebook is as it was");
    assert_eq!(text, fresh(&file));

    client.notify(
        "notebookDocument/didClose",
        json!({"notebookDocument": {"uri": NOTEBOOK},
               "cellTextDocuments": [{"uri": IMPORTS}, {"uri": AREA}]}),
    );
    let (line, character) = end_of(AREA_TEXT, true);
    let id = client.inline_async(AREA, line, character);
    let answer = client.response(id);
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown document"), "{answer}");
    assert_eq!(client.status()["documents"], 0);
    assert!(client.shutdown().success());
}
