//! Soak and concurrency, through the real binary.
//!
//! `soak_replay_of_typing_matches_fresh_computations` replays a seeded session of typing over
//! several documents (typing, deleting, pasting, undo-like jumps back, multi-edit changes, cursor
//! moves, switching documents, closing and reopening, stale versions, requests superseded by the
//! next keystroke and cancelled ones) and asks for inline completions along the way. Every answer
//! is checked against a second `phi-lsp` server whose caches are defeated (each request's text is
//! opened as a brand-new document and closed after it), and a deterministic sample (every 50th,
//! and every first answer after a reopen) against fresh `phi-lsp complete` processes. Meanwhile the
//! server's resident memory must stay flat after warm-up and `worker.slots` within the slot limit
//! (none once every document is closed). `SOAK_KEYSTROKES` (default 10000) and `SOAK_SEED` (default 7)
//! change the replay.
//!
//! The other tests are about concurrency: two documents whose prompts share a long prefix never
//! see each other's cache, a request superseded mid-generation answers nothing rather than a cut
//! suggestion, and changes with a version that is not newer are ignored.

#[path = "../common/mod.rs"]
mod common;
mod doc;
mod session;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::lsp_client::{LspClient, TIMEOUT};
use common::{complete_fresh, fixture_dir, inline_text, phi_lsp, DEFAULT_CONTEXT_TOKENS};
use serde_json::{json, Value};

use doc::{after_window, ceil_boundary, lsp_position, position, Doc, Rng, Shown, CORPUS};
use session::{
    env_usize, fresh_processes, reference_server, status_without_slots, vm_rss_kib, Counts, Kind, Session,
    RSS_GROWTH_BOUND_KIB,
};

/// Short suggestions keep 10,000 keystrokes within CI time; the cache is exercised the same way.
const MAX_NEW_TOKENS: usize = 8;

/// The soak's context: prompts of at most ~250 tokens and a window of ~750 characters, so every
/// document outgrows it and its start moves, at half the cost per request of the default 1024.
const SOAK_CONTEXT_TOKENS: usize = 256;

/// Whole suggestions (`progressive` off): every answer is compared with a fresh computation.
fn options(context_tokens: usize) -> Value {
    json!({"maxNewTokens": MAX_NEW_TOKENS, "deadlineMs": 60000, "contextTokens": context_tokens, "progressive": false})
}

/// VS Code's: UTF-16 positions.
fn vscode_capabilities() -> Value {
    json!({"textDocument": {"inlineCompletion": {}}})
}

/// Neovim's: UTF-8 positions, so the reference server converts positions its own way.
fn neovim_capabilities() -> Value {
    json!({"general": {"positionEncodings": ["utf-8", "utf-16"]},
           "textDocument": {"inlineCompletion": {}}})
}

fn server(capabilities: Value, context_tokens: usize) -> LspClient {
    let mut command = phi_lsp();
    command.arg("--stdio").arg("--model").arg(fixture_dir());
    let mut client = LspClient::spawn(command);
    client.initialize(capabilities, options(context_tokens));
    client.wait_ready();
    client
}

#[test]
fn soak_replay_of_typing_matches_fresh_computations() {
    let n_keystrokes = env_usize("SOAK_KEYSTROKES", 10_000);
    let seed = env_usize("SOAK_SEED", 7) as u64;
    let warm_up = (n_keystrokes / 10).max(100);
    let started = Instant::now();

    let (reference_tx, reference_rx) = mpsc::channel();
    let reference_thread = std::thread::spawn(move || reference_server(reference_rx));
    let (fresh_tx, fresh_rx) = mpsc::channel();
    let fresh_thread = std::thread::spawn(move || fresh_processes(fresh_rx));

    let mut client = server(vscode_capabilities(), SOAK_CONTEXT_TOKENS);
    let pid = client.pid();
    let max_slots = client.status()["worker"]["maxSlots"].as_u64().expect("maxSlots");
    let starts = [
        ("file:///soak/alpha.py", &CORPUS[..600]),
        ("file:///soak/beta.py", ""),
        ("file:///soak/gamma%20three.py", CORPUS),
        (
            "file:///soak/%CE%B4elta.py",
            "def f(x):\n    \"\"\"Return x, naïvely ☕.\"\"\"\n",
        ),
    ];
    let mut docs = Vec::new();
    for (idx, (uri, text)) in starts.into_iter().enumerate() {
        client.open(uri, text);
        docs.push(Doc {
            uri: uri.to_string(),
            text: text.to_string(),
            cursor: text.len(),
            version: 1,
            open: true,
            history: vec![text.to_string()],
            corpus_pos: idx * 797,
            shown: Vec::new(),
        });
    }
    let mut session = Session {
        rng: Rng(seed),
        client,
        docs,
        current: 0,
        keystroke: 0,
        answers: Vec::new(),
        reference: reference_tx,
        fresh: fresh_tx,
        counts: Counts::default(),
        max_slots,
    };

    let rss_start = vm_rss_kib(pid);
    let mut rss_warm = None;
    let mut rss_max_after_warm_up = 0;
    while session.keystroke < n_keystrokes {
        let reopened = session.keystroke();
        if reopened || session.rng.chance(0.4) {
            let roll = session.rng.below(100);
            match roll {
                _ if reopened => session.ask(true),
                0..=3 => session.ask_superseded(),
                4..=5 => session.ask_cancelled(),
                _ => session.ask(false),
            }
        }
        if session.keystroke >= warm_up && rss_warm.is_none() {
            rss_warm = Some(vm_rss_kib(pid));
        }
        if rss_warm.is_some() && session.keystroke.is_multiple_of(250) {
            rss_max_after_warm_up = rss_max_after_warm_up.max(vm_rss_kib(pid));
        }
    }
    let rss_end = vm_rss_kib(pid);
    rss_max_after_warm_up = rss_max_after_warm_up.max(rss_end);
    let rss_warm = rss_warm.expect("warmed up");

    // Every slot goes with its document.
    let uris: Vec<String> = session.docs.iter().map(|d| d.uri.clone()).collect();
    for uri in &uris {
        session.client.close(uri);
    }
    let status = status_without_slots(&mut session.client);
    assert_eq!(status["worker"]["slots"], 0, "{status}");
    assert_eq!(status["documents"], 0, "{status}");
    // Each ignored stale change was logged.
    let ignored_logged = session
        .client
        .notifications
        .iter()
        .filter(|m| {
            m["method"] == "window/logMessage"
                && m["params"]["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("change ignored") && s.contains("not newer"))
        })
        .count();
    assert_eq!(ignored_logged, session.counts.stale_changes);

    let Session {
        client,
        answers,
        reference,
        fresh,
        counts,
        ..
    } = session;
    assert!(client.shutdown().success());
    drop((reference, fresh));
    let reference_answers = reference_thread.join().expect("reference server");
    let fresh_answers = fresh_thread.join().expect("fresh processes");
    let mut want = vec![None; answers.len()];
    for (idx, answer) in reference_answers {
        want[idx] = Some(answer);
    }

    let mut failures = Vec::new();
    let mut typed_through_equal_fresh = 0;
    for (idx, answer) in answers.iter().enumerate() {
        let want = want[idx].as_ref().expect("every answer has a reference");
        let ok = match answer.kind {
            Kind::Model => answer.got == *want,
            Kind::TypedThrough => answer.typed_through_ok || answer.got == *want,
            Kind::MayBeDropped => answer.got.is_none() || answer.got == *want || answer.typed_through_ok,
            Kind::Either => answer.got == *want || answer.typed_through_ok,
        };
        if answer.kind == Kind::TypedThrough && answer.got == *want {
            typed_through_equal_fresh += 1;
        }
        if !ok {
            failures.push(format!(
                "answer {idx} after keystroke {} in {} at {:?} ({:?}): got {:?}, fresh {:?}",
                answer.keystroke, answer.uri, answer.cursor, answer.kind, answer.got, want
            ));
        }
    }
    for (idx, fresh) in &fresh_answers {
        let answer = &answers[*idx];
        let reference = want[*idx].as_ref().expect("reference");
        if fresh != reference {
            failures.push(format!(
                "answer {idx}: the reference server {reference:?} and a fresh process {fresh:?} disagree"
            ));
        }
        if answer.kind == Kind::Model && answer.got != *fresh {
            failures.push(format!(
                "answer {idx} after keystroke {} in {} at {:?}: got {:?}, fresh process {fresh:?}",
                answer.keystroke, answer.uri, answer.cursor, answer.got
            ));
        }
    }
    let non_empty = answers.iter().filter(|a| a.got.is_some()).count();
    eprintln!(
        "soak: {n_keystrokes} keystrokes ({} edits, {} moves, {} switches, {} close/reopen, {} stale \
         changes), {} requests ({} superseded, {} cancelled), {} answers compared with the reference \
         server ({non_empty} non-empty, {} typed through, {typed_through_equal_fresh} of those equal \
         to the fresh computation), {} with fresh processes; slots at most {} (limit {max_slots}); RSS \
         start {} MiB, after warm-up {} MiB, max {} MiB, end {} MiB; {:.1} s",
        counts.edits,
        counts.moves,
        counts.switches,
        counts.reopens,
        counts.stale_changes,
        counts.requests,
        counts.superseded,
        counts.cancelled,
        answers.len(),
        counts.typed_through,
        fresh_answers.len(),
        counts.max_slots_seen,
        rss_start / 1024,
        rss_warm / 1024,
        rss_max_after_warm_up / 1024,
        rss_end / 1024,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} answers differ:\n{}",
        failures.len(),
        answers.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert!(
        non_empty * 4 >= answers.len(),
        "most answers should be non-empty: {non_empty} of {}",
        answers.len()
    );
    assert!(
        rss_max_after_warm_up <= rss_warm + RSS_GROWTH_BOUND_KIB,
        "resident memory grew from {rss_warm} KiB after warm-up to {rss_max_after_warm_up} KiB"
    );
}

/// Checks one answer to a request made at (text, cursor) of `doc`: it is the fresh computation on
/// that text, or the rest of a suggestion shown in this same document, typed through; `None` is
fn check_answer(
    client: &mut LspClient,
    doc: &mut Doc,
    request: (i64, String, usize),
    may_be_dropped: bool,
) -> bool {
    let (id, text, cursor) = request;
    let response = client.response_within(id, TIMEOUT).expect("answered");
    assert!(response.get("error").is_none(), "{response}");
    let got = inline_text(&response["result"]);
    let (line, character) = position(&text, cursor, true);
    let want = complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS);
    let typed_through = got
        .as_deref()
        .is_some_and(|g| doc.is_typed_through(&text, cursor, g));
    assert!(
        got == want || typed_through || (may_be_dropped && got.is_none()),
        "{} at {line}:{character}: got {got:?}, the fresh computation on its own text {want:?}",
        doc.uri
    );
    if let Some(suggestion) = &got {
        doc.shown.push(Shown {
            before: text[..cursor].to_string(),
            after: after_window(&text, cursor),
            suggestion: suggestion.clone(),
        });
    }
    got.is_some()
}

/// Two documents whose prompts share a ~1,200-character prefix (hundreds of tokens) and differ
/// only in their last lines, edited and asked in interleavings: requests for both in flight
/// together, an edit to one between the other's request and answer, a large paste whose request
/// the next keystroke supersedes, and each document reopened with the other's text.
#[test]
fn documents_sharing_a_prefix_never_see_each_others_cache() {
    let mut client = server(vscode_capabilities(), DEFAULT_CONTEXT_TOKENS);
    let prefix = &CORPUS[..CORPUS.find("if __name__").expect("a main block")];
    let mut a = Doc::new(
        "file:///shared/a.py",
        &format!("{prefix}\ndef total(values):\n    return sum(values) +"),
    );
    let mut b = Doc::new(
        "file:///shared/b.py",
        &format!("{prefix}\ndef total(values):\n    return max(values) -"),
    );
    client.open(&a.uri, &a.text);
    client.open(&b.uri, &b.text);
    let typed_a = " len(values) * 2 if values else 0";
    let typed_b = " min(values) // 3 or None";
    let (mut n_answers, mut n_non_empty) = (0, 0);
    for round in 0..8 {
        let ch_a = &typed_a[round * 2..round * 2 + 2];
        let ch_b = &typed_b[round * 2..round * 2 + 2];

        // Both in flight together.
        a.type_text(&mut client, &ch_a[..1]);
        b.type_text(&mut client, &ch_b[..1]);
        let request_a = a.request(&mut client);
        let request_b = b.request(&mut client);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;

        // An edit to B between A's request and its answer, then B's own request.
        a.type_text(&mut client, &ch_a[1..]);
        let request_a = a.request(&mut client);
        b.type_text(&mut client, &ch_b[1..]);
        let request_b = b.request(&mut client);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;
        n_answers += 4;

        // A request the next keystroke supersedes while it generates.
        a.type_text(&mut client, "0");
        let superseded = a.request(&mut client);
        a.type_text(&mut client, "_");
        let request_a = a.request(&mut client);
        check_answer(&mut client, &mut a, superseded, true);
        n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
        n_answers += 1;

        if round % 3 == 1 {
            // A large paste (several prefill chunks) whose request the next keystroke supersedes
            // (the paste is undone right after, so the documents keep sharing their prefix).
            let cursor = a.cursor;
            let paste = &CORPUS[..ceil_boundary(CORPUS, 700)];
            a.type_text(&mut client, paste);
            let superseded = a.request(&mut client);
            a.type_text(&mut client, "x");
            let request_a = a.request(&mut client);
            check_answer(&mut client, &mut a, superseded, true);
            n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
            let end = a.cursor;
            let change = a.edit(cursor, end, "");
            a.version += 1;
            client.change(&a.uri, a.version, json!([change]));
            n_answers += 1;
        }
        if round % 4 == 3 {
            // Each URI reopened with the other's text.
            client.close(&a.uri);
            client.close(&b.uri);
            std::mem::swap(&mut a.text, &mut b.text);
            std::mem::swap(&mut a.cursor, &mut b.cursor);
            for doc in [&mut a, &mut b] {
                doc.version = 1;
                doc.shown.clear();
                client.open(&doc.uri, &doc.text);
            }
            let request_a = a.request(&mut client);
            let request_b = b.request(&mut client);
            n_non_empty += check_answer(&mut client, &mut a, request_a, false) as usize;
            n_non_empty += check_answer(&mut client, &mut b, request_b, false) as usize;
            n_answers += 2;
        }
    }
    eprintln!("shared prefix: {n_answers} answers checked, {n_non_empty} non-empty");
    assert!(
        n_non_empty * 2 >= n_answers,
        "{n_non_empty} of {n_answers} non-empty"
    );
    assert!(client.shutdown().success());
}

/// `didChange` with a version that is not newer than the document's (a duplicate, an older one, a
/// full-text one) is ignored with a log line, and the text stays; versions may skip; a reopened
/// document starts its versions again.
#[test]
fn out_of_order_and_duplicate_versions_are_ignored() {
    let mut client = server(vscode_capabilities(), DEFAULT_CONTEXT_TOKENS);
    let uri = "file:///versions.py";
    let mut text = String::from("import os\n\n\ndef f(x):\n    return x\n");
    client.open_version(uri, &text, 3);
    let end = |text: &str| lsp_position(text, text.len());
    let append =
        |text: &str, new: &str| json!([{"range": {"start": end(text), "end": end(text)}, "text": new}]);

    client.change(uri, 4, append(&text, "y = f(1)\n"));
    text.push_str("y = f(1)\n");
    // A duplicate of version 4, an older version and a full-text change at the current version.
    client.change(uri, 4, append(&text, "duplicate = 4\n"));
    client.change(uri, 2, append(&text, "older = 2\n"));
    client.change(uri, 4, json!([{"text": "everything = 'replaced'\n"}]));
    // Versions may skip; then the skipped-to version again is a duplicate.
    client.change(uri, 9, append(&text, "z = f(y)\n"));
    text.push_str("z = f(y)\n");
    client.change(uri, 9, append(&text, "again = 9\n"));

    let ignored = |m: &Value| {
        m["method"] == "window/logMessage"
            && m["params"]["message"]
                .as_str()
                .is_some_and(|s| s.contains("change ignored") && s.contains("not newer"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.notifications.iter().filter(|m| ignored(m)).count() < 4 {
        assert!(Instant::now() < deadline, "{:?}", client.notifications);
        client.status();
    }
    let messages: Vec<&str> = client
        .notifications
        .iter()
        .filter(|m| ignored(m))
        .filter_map(|m| m["params"]["message"].as_str())
        .collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    assert!(messages[0].contains("version 4") && messages[1].contains("version 2"));
    assert!(messages[3].contains("version 9"));

    // The text is the one the accepted changes made.
    client.change(uri, 10, append(&text, "print("));
    text.push_str("print(");
    let (line, character) = position(&text, text.len(), true);
    let id = client.inline_async(uri, line, character);
    let got = inline_text(&client.response(id)["result"]);
    assert_eq!(
        got,
        complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS)
    );

    // A reopened document starts again at any version.
    client.close(uri);
    let text = "def g(y):\n    return y *";
    client.open_version(uri, text, 1);
    client.change(uri, 2, append(text, " 2"));
    let text = format!("{text} 2");
    let (line, character) = position(&text, text.len(), true);
    let id = client.inline_async(uri, line, character);
    let got = inline_text(&client.response(id)["result"]);
    assert_eq!(
        got,
        complete_fresh(&text, line, character, MAX_NEW_TOKENS, DEFAULT_CONTEXT_TOKENS)
    );
    assert_eq!(
        client.notifications.iter().filter(|m| ignored(m)).count(),
        4,
        "nothing more was ignored"
    );
    assert!(client.shutdown().success());
}
