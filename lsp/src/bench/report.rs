//! The report of one dtype: everything measured, as one JSON object (`--json` prints it) and as
//! the table made from that object.

use phi_engine::{PhiConfig, WeightDType};
use serde_json::{json, Value};

use super::bandwidth::Bandwidth;
use super::in_process::Runs;
use super::machine::Machine;
use super::server::ServerRuns;
use super::stats::{round, Spread};
use super::PROMPT_TOKENS;

/// Everything measured for one dtype.
pub struct Measured<'a> {
    pub dtype: WeightDType,
    pub threads: usize,
    pub machine: &'a Machine,
    /// What was benchmarked, in words.
    pub model: &'a str,
    pub repeats: usize,
    pub build_s: f64,
    pub cfg: PhiConfig,
    pub runs: Runs,
    /// This process's peak RSS after the in-process runs.
    pub peak_rss: Option<u64>,
    /// `AnonHugePages` of this process with the model loaded.
    pub anon_huge_pages: Option<u64>,
    /// Read bandwidth (GB/s per pass, per method) before and after the dtype's runs.
    pub bandwidth_before: Bandwidth,
    pub bandwidth_after: Bandwidth,
    pub profile: Option<Value>,
    pub server: Option<ServerRuns>,
}

impl Measured<'_> {
    /// The dtype's JSON object: every figure, with the decode speed against its bandwidth ceiling.
    pub fn json(self) -> Value {
        let Measured {
            dtype,
            threads,
            machine,
            model,
            repeats,
            build_s,
            cfg,
            runs,
            peak_rss,
            anon_huge_pages,
            bandwidth_before,
            bandwidth_after,
            profile,
            server,
        } = self;
        let name = dtype.name();
        let (per_token, resident) = (dtype.weight_bytes_per_token(&cfg), dtype.weight_bytes(&cfg));
        // Each method's passes before and after together; the ceiling is the best method's.
        let bandwidth_all = bandwidth_before.merged(&bandwidth_after);
        let (bandwidth_method, bandwidth) = bandwidth_all
            .best()
            .map_or(("none", Spread::of(&[])), |(name, rates)| {
                (name, Spread::of(rates))
            });
        let best_of = |b: &Bandwidth| b.best().map_or(f64::NAN, |(_, rates)| Spread::of(rates).median);
        let methods: serde_json::Map<String, Value> = bandwidth_all
            .figures()
            .into_iter()
            .map(|(name, gb_s)| (name, round(gb_s)))
            .collect();
        let ceiling = bandwidth.median * 1e9 / per_token as f64;
        let kv_read = cfg.kv_bytes_per_token(dtype.kv_dtype().size_in_bytes()) * PROMPT_TOKENS as u64;
        let mut report = json!({
            "dtype": name,
            "threads": threads,
            "cpu": machine.cpu,
            "cpu_features": machine.features,
            "model": model,
            "repeats": repeats,
            "build_s": round(build_s),
            "warmup_prefill_ms": round(runs.warmup_ms),
            "prefill_tokens": runs.prompt_tokens,
            "prefill_tok_s": round(runs.prefill.median),
            "prefill_tok_s_spread": runs.prefill.json(),
            "first_token_ms_16": round(runs.first_token.median),
            "first_token_ms_16_spread": runs.first_token.json(),
            "decode_tok_s": round(runs.decode.median),
            "decode_tok_s_spread": runs.decode.json(),
            "bandwidth_gb_s": round(bandwidth.median),
            "bandwidth_gb_s_spread": bandwidth.json(),
            "bandwidth_gb_s_before": round(best_of(&bandwidth_before)),
            "bandwidth_gb_s_after": round(best_of(&bandwidth_after)),
            "weight_bytes_per_token": per_token,
            "kv_bytes_read_per_token_at_512": kv_read,
            "decode_ceiling_tok_s": round(ceiling),
            "decode_ceiling_ratio": round(runs.decode.median / ceiling),
            "keystroke_ms_cached": round(runs.keystroke_cached.median),
            "keystroke_ms_cached_spread": runs.keystroke_cached.json(),
            "keystroke_ms_uncached": round(runs.keystroke_uncached.median),
            "keystroke_ms_uncached_spread": runs.keystroke_uncached.json(),
            "keystroke_ratio": round(runs.keystroke_cached.median / runs.keystroke_uncached.median),
            "keystroke_prefill_ms_cached": round(runs.keystroke_prefill_cached.median),
            "keystroke_prefill_ms_uncached": round(runs.keystroke_prefill_uncached.median),
            "keystroke_prefill_ratio": round(runs.keystroke_prefill_cached.median / runs.keystroke_prefill_uncached.median),
            "keystroke_prefilled_tokens_cached": runs.keystroke_prefilled_cached,
            "keystroke_generated_tokens": runs.keystroke_generated,
            "server_keystroke_ms_p50": server.as_ref().map(|s| round(s.p50)).unwrap_or(Value::Null),
            "server_keystroke_ms_p90": server.as_ref().map(|s| round(s.p90)).unwrap_or(Value::Null),
            "server_accept_ms": server.as_ref().and_then(|s| s.accept).map(|(ms, _)| round(ms)),
            "weights_bytes_resident_nominal": resident,
            "peak_rss_bytes": peak_rss,
            "verify_rows_ms": runs.verify_rows_ms.iter().map(|(n, v)| (n.to_string(), json!(round(*v)))).collect::<serde_json::Map<_, _>>(),
            "draft_decode_speedup": round(runs.draft_speedup),
            "draft_acceptance": round(runs.draft_acceptance),
        });
        if let Value::Object(map) = &mut report {
            map.insert("decode_drafted_tokens".into(), json!(runs.decode_drafted_tokens));
            map.insert("bandwidth_method".into(), json!(bandwidth_method));
            map.insert("bandwidth_methods".into(), Value::Object(methods));
            map.insert("anon_huge_pages_bytes".into(), json!(anon_huge_pages));
        }
        if let (Some(server), Value::Object(map)) = (&server, &mut report) {
            map.insert("server".into(), server.json());
            map.insert("server_peak_rss_bytes".into(), json!(server.peak_rss));
        }
        if let (Some(profile), Value::Object(map)) = (profile, &mut report) {
            map.insert("profile".into(), profile);
        }
        report
    }
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn spread_text(s: &Value) -> String {
    format!("median of {}, {}..{}", s["n"], s["min"], s["max"])
}

/// The table for one dtype, from its JSON object.
pub fn table(r: &Value) -> String {
    let num = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let bytes = |key: &str| r[key].as_u64().map(gb).unwrap_or_else(|| "?".into());
    let mut lines = vec![
        format!(
            "\n{}  ({} threads; built in {:.1} s; weights read per token {}; warm-up prefill {:.0} ms)",
            r["dtype"].as_str().unwrap_or("?"),
            r["threads"],
            num("build_s"),
            bytes("weight_bytes_per_token"),
            num("warmup_prefill_ms"),
        ),
        format!(
            "  prefill {:>4} tokens      {:>8.1} tok/s   ({})",
            r["prefill_tokens"],
            num("prefill_tok_s"),
            spread_text(&r["prefill_tok_s_spread"])
        ),
        format!(
            "  first token after 16     {:>8.1} ms      ({})",
            num("first_token_ms_16"),
            spread_text(&r["first_token_ms_16_spread"])
        ),
        format!(
            "  decode at context {:<4}   {:>8.2} tok/s   ({}); ceiling {:.1} tok/s at {:.1} GB/s ({}; {:.1} before the runs, {:.1} after): ratio {:.2}",
            r["prefill_tokens"],
            num("decode_tok_s"),
            spread_text(&r["decode_tok_s_spread"]),
            num("decode_ceiling_tok_s"),
            num("bandwidth_gb_s"),
            r["bandwidth_method"].as_str().unwrap_or("?"),
            num("bandwidth_gb_s_before"),
            num("bandwidth_gb_s_after"),
            num("decode_ceiling_ratio"),
        ),
        format!(
            "  keystroke, 8-token line  {:>8.1} ms cached, {:.1} ms uncached: ratio {:.3}; prefill part {:.1} vs {:.1} ms: ratio {:.3} (prefilled {} tokens cached)",
            num("keystroke_ms_cached"),
            num("keystroke_ms_uncached"),
            num("keystroke_ratio"),
            num("keystroke_prefill_ms_cached"),
            num("keystroke_prefill_ms_uncached"),
            num("keystroke_prefill_ratio"),
            r["keystroke_prefilled_tokens_cached"],
        ),
        format!(
            "  verify pass (1 / 4 / 8 rows) {} / {} / {} ms; decode with drafts {:.2}x, {:.0}% of drafts accepted",
            r["verify_rows_ms"]["1"],
            r["verify_rows_ms"]["4"],
            r["verify_rows_ms"]["8"],
            num("draft_decode_speedup"),
            100.0 * num("draft_acceptance"),
        ),
    ];
    if let Some(server) = r.get("server") {
        lines.push(format!(
            "  server keystroke         {:>8.1} ms p50, {:.1} ms p90 over {} ({} typed through); server's own: prefill {} ms, decode {} ms, total {} ms (medians); prefilled {}, generated {}; first request {} ms, load {} s",
            num("server_keystroke_ms_p50"),
            num("server_keystroke_ms_p90"),
            server["rtt_ms"].as_array().map(Vec::len).unwrap_or(0),
            server["typed_through"],
            server["last_prefill_ms_median"],
            server["last_decode_ms_median"],
            server["last_total_ms_median"],
            server["last_prefilled_tokens"],
            server["last_generated_tokens"],
            server["first_request_ms"],
            server["load_s"],
        ));
        lines.push(format!(
            "  accept, then ask again   {} ms (served from the speculation: {})",
            server["accept_ms"], server["accept_speculated"],
        ));
    }
    if r.get("replay_problems").is_some() {
        lines.push(format!(
            "  HumanEval replay ({} problems, {} tokens p50): first line {} / {} ms, body {} / {} ms (p50 / p90); {}% delivered whole; plain decoding {} tok/s; drafts {}x faster, {}% accepted",
            r["replay_problems"],
            r["replay_tokens_p50"],
            r["replay_first_line_ms_p50"],
            r["replay_first_line_ms_p90"],
            r["replay_body_ms_p50"],
            r["replay_body_ms_p90"],
            100.0 * num("replay_bodies_complete"),
            r["replay_decode_tok_s"],
            r["replay_speculative_speedup"],
            100.0 * num("replay_draft_acceptance"),
        ));
    }
    lines.push(format!(
        "  peak RSS                 {} bench{} (weights as stored {}; {} in huge pages with the model loaded)",
        bytes("peak_rss_bytes"),
        r.get("server_peak_rss_bytes")
            .and_then(Value::as_u64)
            .map(|b| format!(", {} server", gb(b)))
            .unwrap_or_default(),
        bytes("weights_bytes_resident_nominal"),
        bytes("anon_huge_pages_bytes"),
    ));
    if let Some(profile) = r.get("profile").and_then(Value::as_object) {
        for (label, stages) in profile {
            let Some(stages) = stages.as_object() else {
                continue;
            };
            let number = |key: &str| stages.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let (measured, timed) = (number("measured_ms"), number("timed_ms"));
            let mut parts: Vec<(&str, f64)> = stages
                .iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "measured_ms" | "timed_ms" | "matmuls_ms" | "other_ms")
                })
                .map(|(k, v)| (k.trim_end_matches("_ms"), v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            parts.sort_by(|a, b| b.1.total_cmp(&a.1));
            let parts: Vec<String> = parts
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} ({:.0}%)", 100.0 * v / timed))
                .collect();
            lines.push(format!(
                "  profile {label}: measured {measured:.1} ms; stages timed alone sum to {timed:.1} ms: {}",
                parts.join(", ")
            ));
        }
    }
    lines.join("\n")
}
