//! The `phi-lsp` binary's one-shot commands, end to end: `generate` against the tokens HF
//! transformers produced for the committed fixture, and one-line errors (exit code 2) for bad
//! model folders.

mod common;

use std::path::Path;

use common::{expect_one_line_error, fixture_dir, ids, json_output, phi_lsp, Reference};

#[test]
fn generate_json_equals_transformers_greedy_tokens() {
    let reference = Reference::load();
    for case in &reference.cases {
        let json = json_output(
            phi_lsp()
                .args(["generate", "--model"])
                .arg(fixture_dir())
                // f32: the precision transformers computed the reference in (auto is q8_0 on CPU).
                .args([
                    "--dtype",
                    "f32",
                    "--prompt",
                    &case.prompt,
                    "--max-new-tokens",
                    "16",
                    "--json",
                ]),
        );
        assert_eq!(ids(&json, "prompt_tokens"), case.input_ids);
        assert_eq!(
            ids(&json, "tokens"),
            reference.expected_tokens(case),
            "{:?}",
            case.prompt
        );
        assert_eq!(json["text"].as_str().map(str::is_empty), Some(false));
    }
}

#[test]
fn generate_reads_a_prompt_file() {
    let reference = Reference::load();
    let case = &reference.cases[2];
    let dir = tempfile::tempdir().expect("temp dir");
    let prompt_file = dir.path().join("prompt.py");
    std::fs::write(&prompt_file, &case.prompt).expect("writes");
    let json = json_output(
        phi_lsp()
            .args(["generate", "--model"])
            .arg(fixture_dir())
            .args(["--dtype", "f32", "--prompt-file"])
            .arg(&prompt_file)
            .args(["--max-new-tokens", "4", "--json"]),
    );
    let tokens = ids(&json, "tokens");
    assert_eq!(tokens, case.greedy_tokens[..4]);
}

/// A copy of the fixture that a test may break.
fn broken_copy(break_it: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixture_dir().join(name), dir.path().join(name)).expect("copies");
    }
    break_it(dir.path());
    dir
}

/// Runs `generate` on `dir` and returns its stderr, checking exit code 2 and a one-line message.
fn expect_load_error(dir: &Path) -> String {
    let output = phi_lsp()
        .args(["generate", "--model"])
        .arg(dir)
        .args(["--prompt", "def f():", "--max-new-tokens", "2"])
        .output()
        .expect("runs");
    expect_one_line_error(&output)
}

#[test]
fn missing_config_names_the_file() {
    let dir = broken_copy(|d| std::fs::remove_file(d.join("config.json")).expect("removes"));
    let stderr = expect_load_error(dir.path());
    assert!(
        stderr.contains("config.json") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn missing_tokenizer_says_to_pass_one() {
    let dir = broken_copy(|d| std::fs::remove_file(d.join("tokenizer.json")).expect("removes"));
    let stderr = expect_load_error(dir.path());
    assert!(
        stderr.contains("tokenizer.json") && stderr.contains("--tokenizer"),
        "{stderr}"
    );
}

#[test]
fn truncated_safetensors_says_download_again() {
    let dir = broken_copy(|d| {
        let path = d.join("model.safetensors");
        let bytes = std::fs::read(&path).expect("reads");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("writes");
    });
    let stderr = expect_load_error(dir.path());
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn config_that_does_not_match_the_tensors() {
    let dir = broken_copy(|d| {
        let path = d.join("config.json");
        let text = std::fs::read_to_string(&path).expect("reads");
        std::fs::write(
            &path,
            text.replace("\"intermediate_size\": 256", "\"intermediate_size\": 512"),
        )
        .expect("writes");
    });
    let stderr = expect_load_error(dir.path());
    assert!(
        stderr.contains("does not match config.json") && stderr.contains("shape"),
        "{stderr}"
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = broken_copy(|d| {
        std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).expect("renames");
    });
    let stderr = expect_load_error(dir.path());
    assert!(
        stderr.contains("pytorch_model.bin") && stderr.contains("arbitrary code"),
        "{stderr}"
    );
}

#[test]
fn not_a_folder() {
    let stderr = expect_load_error(Path::new("/nonexistent/phi-model"));
    assert!(stderr.contains("/nonexistent/phi-model"), "{stderr}");
}

#[test]
fn unknown_dtype_and_device_are_one_line_errors() {
    for (flag, value) in [("--dtype", "f8"), ("--device", "tpu"), ("--threads", "0")] {
        let output = phi_lsp()
            .args(["generate", "--model"])
            .arg(fixture_dir())
            .args(["--prompt", "x", flag, value])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(value), "{stderr}");
    }
}

/// A Hugging Face cache laid out as the Hub lays it out, holding the fixture as microsoft/phi-1.
fn hub_cache() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = dir.path().join("models--microsoft--phi-1");
    let commit = "4c5d1e0f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d";
    std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
    std::fs::write(repo.join("refs/main"), commit).expect("ref");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("mkdir");
    std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let blob = repo.join("blobs").join(format!("sha-{name}"));
        std::fs::copy(fixture_dir().join(name), &blob).expect("copies");
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(format!("sha-{name}")),
            snapshot.join(name),
        )
        .expect("symlink");
    }
    dir
}

#[test]
fn hub_ids_resolve_through_the_cache_offline() {
    let reference = Reference::load();
    let case = &reference.cases[0];
    let cache = hub_cache();
    let json = json_output(
        phi_lsp()
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate",
                "--model",
                "microsoft/phi-1",
                "--dtype",
                "f32",
                "--prompt",
                &case.prompt,
                "--max-new-tokens",
                "5",
                "--json",
            ]),
    );
    let tokens = ids(&json, "tokens");
    assert_eq!(tokens, case.greedy_tokens[..5]);
    // Another revision is not cached: offline, that is a one-line error and no download.
    let output = phi_lsp()
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["generate", "--model", "microsoft/phi-1@v2", "--prompt", "x"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("microsoft/phi-1@v2"),
        "{stderr}"
    );
    // Ids that try to leave the cache are not ids.
    let output = phi_lsp()
        .args(["generate", "--model", "../../etc/x", "--prompt", "x"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn memory_table_matches_the_published_figures() {
    let json = json_output(
        phi_lsp()
            .args(["memory", "--model", "microsoft/phi-1", "--json"])
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert_eq!(json["parameters"], 1_418_270_720u64);
    let row = |dtype: &str| {
        json["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["dtype"] == dtype)
            .cloned()
            .expect("row")
    };
    let gib = |v: &serde_json::Value| v.as_u64().expect("bytes") as f64 / (1u64 << 30) as f64;
    // Phi-1's 1,418,270,720 parameters at 4 and 2 bytes: 5.28 and 2.64 GiB. K and V of 24
    // layers × 2,048 values per token: 384 KiB in f32, 768 MiB at 2,048 positions.
    assert!((gib(&row("f32")["weights_bytes"]) - 5.28).abs() < 0.01);
    assert!((gib(&row("f16")["weights_bytes"]) - 2.64).abs() < 0.01);
    assert_eq!(row("f32")["kv_bytes_per_token"], 384 * 1024);
    assert_eq!(row("f16")["kv_bytes_per_token"], 192 * 1024);
    // A quantized model keeps its cache in f16 (as the model allocates it: synthetic.rs's tests).
    assert_eq!(row("q4k")["kv_bytes_per_token"], 192 * 1024);
    let f32_2048 = &row("f32")["total_bytes_by_context"]["2048"];
    assert_eq!(
        f32_2048.as_u64().expect("bytes") - row("f32")["weights_bytes"].as_u64().expect("bytes"),
        768 << 20
    );
}

/// `phi-lsp bench --json` on the fixture, through the real server too: one object per dtype with
/// every key the benchmark tables report, and keystrokes that run only their new tokens against
/// the cache (the fixture's 512 positions take prompts of 256 tokens instead of 512).
#[test]
fn bench_reports_every_measurement_and_keystrokes_reuse_the_cache() {
    let output = phi_lsp()
        .args(["bench", "--model"])
        .arg(fixture_dir())
        .args(["--dtype", "f32,q8_0", "--repeats", "2", "--keystrokes", "3"])
        .args(["--decode-tokens", "32", "--bandwidth-mib", "64", "--json"])
        .output()
        .expect("phi-lsp runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(reports.len(), 2, "{stdout}");
    let numbers = |value: &serde_json::Value| -> Vec<u64> {
        serde_json::from_value(value.clone()).expect("a list of counts")
    };
    for (report, dtype) in reports.iter().zip(["f32", "q8_0"]) {
        assert_eq!(report["dtype"], dtype);
        assert_eq!(report["threads"], 1, "phi_lsp() runs on one thread");
        assert!(report["cpu"].as_str().is_some_and(|cpu| !cpu.is_empty()));
        for key in [
            "prefill_tok_s",
            "first_token_ms_16",
            "decode_tok_s",
            "bandwidth_gb_s",
            "decode_ceiling_ratio",
            "keystroke_ms_cached",
            "keystroke_ms_uncached",
            "server_keystroke_ms_p50",
            "peak_rss_bytes",
        ] {
            let value = report[key].as_f64();
            assert!(
                value.is_some_and(|v| v.is_finite() && v > 0.0),
                "{dtype}: {key} = {}",
                report[key]
            );
        }
        assert_eq!(report["prefill_tokens"], 256);
        // The decode figure is plain decoding, whatever --draft says (default 3): it is compared
        // with other engines' and with the bandwidth ceiling.
        assert_eq!(report["decode_drafted_tokens"], 0);
        // In process and through the server, each keystroke (one character) prefills a token or
        // two and reuses the rest of the document's cache. The server heals the prompt's last
        // token (the keystrokes type inside a word): its cache holds the 256-token document less
        // that token.
        assert_eq!(numbers(&report["keystroke_prefilled_tokens_cached"]), [1, 1]);
        let server = &report["server"];
        let reused = numbers(&server["last_reused_tokens"]);
        assert!(!reused.is_empty() && reused.iter().all(|&n| n >= 255), "{server}");
        assert!(
            numbers(&server["last_prefilled_tokens"]).iter().all(|&n| n <= 2),
            "{server}"
        );
        assert_eq!(server["accept_speculated"], true, "{server}");
    }
}

/// `bench` on the fixture at f32 with the in-process runs cut short and no server keystrokes, plus
/// `extra`: its one JSON report, and its stderr.
fn quick_bench(extra: &[&str]) -> (serde_json::Value, String) {
    let output = phi_lsp()
        .args(["bench", "--model"])
        .arg(fixture_dir())
        .args([
            "--dtype",
            "f32",
            "--repeats",
            "1",
            "--keystrokes",
            "1",
            "--skip-server",
        ])
        .args(["--decode-tokens", "4", "--bandwidth-mib", "64", "--json"])
        .args(extra)
        .output()
        .expect("phi-lsp runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let report =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).expect("one JSON object");
    (report, stderr)
}

/// `bench --replay humaneval` on the fixture: the first problems through the server's completion
/// code with each token scripted to the canonical body, so every body arrives whole (the canonical
/// solution is the reference), with and without drafts, and every figure of the replay is there.
#[test]
fn bench_replays_humaneval_bodies_through_the_completion_code() {
    let (report, stderr) = quick_bench(&["--replay", "humaneval", "--replay-limit", "3"]);
    assert_eq!(report["replay_problems"], 3, "{report}");
    assert_eq!(report["replay_bodies_complete"], 1.0, "{stderr}");
    // HumanEval/0..2's canonical bodies are tens of tokens with this tokenizer.
    let tokens = report["replay_tokens_p50"].as_f64().expect("tokens");
    assert!(tokens >= 8.0, "{report}");
    for key in [
        "replay_first_line_ms_p50",
        "replay_first_line_ms_p90",
        "replay_body_ms_p50",
        "replay_body_ms_p90",
        "replay_decode_tok_s",
        "replay_speculative_speedup",
    ] {
        assert!(report[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {report}");
    }
    let acceptance = report["replay_draft_acceptance"].as_f64().expect("acceptance");
    assert!((0.0..=1.0).contains(&acceptance), "{report}");
    assert!(
        report["replay_first_line_ms_p50"].as_f64() <= report["replay_body_ms_p50"].as_f64(),
        "{report}"
    );

    let output = phi_lsp()
        .args(["bench", "--model"])
        .arg(fixture_dir())
        .args(["--replay", "mbpp"])
        .output()
        .expect("phi-lsp runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("humaneval"), "{stderr}");
}

#[test]
fn bench_session_types_at_each_place_and_times_each_pause() {
    let (report, _) = quick_bench(&["--session"]);
    let pauses = report["session_pauses"].as_array().expect("pauses");
    let steps: Vec<&str> = pauses.iter().filter_map(|p| p["step"].as_str()).collect();
    assert_eq!(
        steps,
        [
            "deep in the first file",
            "600 lines up",
            "the second file",
            "back at the first place"
        ],
        "{report}"
    );
    let files: Vec<&str> = pauses.iter().filter_map(|p| p["file"].as_str()).collect();
    assert_eq!(files, ["first.py", "first.py", "second.py", "first.py"]);
    let line = |i: usize| pauses[i]["line"].as_u64().expect("line");
    // The second place is the body start nearest 600 lines up (HumanEval's problems are tens of
    // lines each); coming back, the cursor is two lines further down: the line typed there, and
    // the line typed 600 lines above it.
    assert!(line(0).abs_diff(line(1) + 600) < 60, "{report}");
    assert_eq!(line(3), line(0) + 2, "{report}");
    let text = |i: usize, key: &str| pauses[i][key].as_str().expect(key).to_string();
    for (i, pause) in pauses.iter().enumerate() {
        let typed = text(i, "typed");
        assert!(typed.trim_end().len() > 4 && typed.contains('\n'), "{pause}");
        // What the server's model saw ends with what was typed there: the places are right.
        let expected = if i == 3 { text(0, "typed") + &typed } else { typed };
        assert!(text(i, "prompt_end").ends_with(&expected), "{pause}");
        let (wait, ready) = (pause["wait_ms"].as_f64(), pause["ready_ms"].as_f64());
        assert!(wait.is_some_and(|w| w > 0.0) && ready <= wait, "{pause}");
        let tokens = |key: &str| pause[key].as_u64().expect(key);
        assert_eq!(
            tokens("reused_tokens") + tokens("prefilled_tokens"),
            tokens("prompt_tokens"),
            "{pause}"
        );
    }
    assert!(report["session_ready_ms_max"].as_f64().is_some(), "{report}");
}
