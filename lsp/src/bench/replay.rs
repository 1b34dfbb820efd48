//! `bench --replay humaneval`: HumanEval's problems through the server's own completion code
//! ([`Completions::suggest`] on a [`LocalBackend`], default settings), with real forward passes,
//! where only the choice of each next token is scripted: it is the canonical body's next token
//! (teacher forcing, [`phi_engine::GenerateParams::script`]), so how long a body is, and which
//! prompt-lookup drafts are accepted, is what code like HumanEval's gives, even on random weights.
//!
//! Per problem and per mode (drafting off, then on): the prompt without its last line is brought
//! into the cache first, untimed, as typing it would have done; then the clock runs from the
//! request at the end of the prompt to the first answer (the first line, with progressive answers)
//! and to the last `phi-lsp/suggestionGrew` (the whole body).

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use phi_engine::{Engine, GenerationStats, Worker, WorkerOptions};
use ropey::Rope;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::progress;
use super::stats::{ms, round, Spread};
use crate::completion::backend::{Backend, GenerationRequest, LocalBackend, Pending};
use crate::completion::growth::{Grew, Place};
use crate::completion::{lock, Completions, Request, Trigger, Workspace};
use crate::settings::{ModelSpec, Settings};

/// OpenAI's HumanEval (MIT, `tests/fixtures/humaneval/LICENSE`): 164 problems, each a signature
/// and docstring (`prompt`) and a `canonical_solution`, one JSON object per line, gzipped.
const HUMANEVAL: &[u8] = include_bytes!("../../../tests/fixtures/humaneval/HumanEval.jsonl.gz");

/// How long a body may take to arrive before the problem counts as not delivered whole.
const BODY_TIMEOUT: Duration = Duration::from_secs(600);

pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub solution: String,
}

/// The first `limit` HumanEval problems (all 164 without one).
pub fn humaneval(limit: Option<usize>) -> Result<Vec<Problem>> {
    let mut jsonl = String::new();
    flate2::read::GzDecoder::new(HUMANEVAL)
        .read_to_string(&mut jsonl)
        .context("the built-in HumanEval data")?;
    let mut problems = Vec::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).context("a HumanEval line")?;
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("HumanEval: no {name}"))
        };
        problems.push(Problem {
            task_id: field("task_id")?,
            prompt: field("prompt")?,
            solution: field("canonical_solution")?,
        });
    }
    problems.truncate(limit.unwrap_or(usize::MAX));
    Ok(problems)
}

/// What the replay measured.
pub struct Replay {
    pub problems: usize,
    /// With drafting (the default), per problem.
    pub first_line_ms: Vec<f64>,
    pub body_ms: Vec<f64>,
    /// Without drafting, per problem.
    pub body_ms_plain: Vec<f64>,
    /// Problems whose last suggestion was the whole canonical body, in both modes.
    pub complete: usize,
    pub tokens: Vec<f64>,
    /// Plain decoding: tokens and decode time summed over the problems.
    pub plain_tokens: usize,
    pub plain_decode_ms: f64,
    pub drafted: usize,
    pub accepted: usize,
}

impl Replay {
    pub fn json(&self) -> Value {
        let p = |values: &[f64], q: f64| round(Spread::percentile(values, q));
        let sum = |values: &[f64]| values.iter().sum::<f64>();
        json!({
            "replay_problems": self.problems,
            "replay_first_line_ms_p50": p(&self.first_line_ms, 50.0),
            "replay_first_line_ms_p90": p(&self.first_line_ms, 90.0),
            "replay_body_ms_p50": p(&self.body_ms, 50.0),
            "replay_body_ms_p90": p(&self.body_ms, 90.0),
            "replay_body_ms_plain_p50": p(&self.body_ms_plain, 50.0),
            "replay_bodies_complete": round(self.complete as f64 / self.problems.max(1) as f64),
            "replay_tokens_p50": p(&self.tokens, 50.0),
            "replay_decode_tok_s": round(self.plain_tokens as f64 * 1000.0 / self.plain_decode_ms),
            // Summed over the problems: long bodies weigh as much as the time they take.
            "replay_speculative_speedup": round(sum(&self.body_ms_plain) / sum(&self.body_ms)),
            "replay_draft_acceptance": round(self.accepted as f64 / self.drafted.max(1) as f64),
        })
    }
}

/// The local backend with the bench's script and drafts put into each job, and the last figures
/// the engine reported kept.
struct Scripted {
    inner: LocalBackend,
    script: Mutex<Option<Arc<[u32]>>>,
    draft: Mutex<usize>,
    stats: Arc<Mutex<GenerationStats>>,
}

impl Backend for Scripted {
    fn start(&self, request: GenerationRequest) -> Pending {
        let script = lock(&self.script).clone();
        let draft = *lock(&self.draft);
        let stats = self.stats.clone();
        self.inner.start_with(request, move |job| {
            job.params.draft = draft;
            job.params.script = script;
            let mut reporter = job.progress.take();
            job.progress = Some(Box::new(move |now: &GenerationStats| {
                *lock(&stats) = now.clone();
                if let Some(report) = reporter.as_mut() {
                    report(now);
                }
            }));
        })
    }

    fn forget(&self, key: &str) {
        self.inner.forget(key);
    }
}

/// The tokens the model writes for `solution` after `prompt`: the ids after the prompt's in the
/// encoding of both, where the prompt's are a prefix of it; else the solution's own encoding.
fn script_of(encode: &dyn Fn(&str) -> Result<Vec<u32>>, prompt: &str, solution: &str) -> Result<Vec<u32>> {
    let prompt_ids = encode(prompt)?;
    let all = encode(&format!("{prompt}{solution}"))?;
    Ok(match all.strip_prefix(prompt_ids.as_slice()) {
        Some(rest) => rest.to_vec(),
        None => encode(solution)?,
    })
}

/// Trailing whitespace off every line and trailing blank lines off the end: how a body and the
/// suggestion for it are compared.
fn trimmed(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').map(str::trim_end).collect();
    lines.join("\n").trim_end().to_string()
}

/// Replays `problems` on `engine` (consumed: it moves to the model thread) with `draft` drafts in
/// the drafting mode.
pub fn replay(engine: Engine, spec: &ModelSpec, problems: &[Problem], draft: usize) -> Result<Replay> {
    if problems.is_empty() {
        bail!("--replay-limit leaves no problem to replay");
    }
    let tokenizer = engine.tokenizer.clone();
    let encode = |text: &str| -> Result<Vec<u32>> { Ok(tokenizer.encode(text)?) };
    let settings = Settings::new(spec.clone());
    let cfg = engine.model.config().clone();
    let capacity = settings.context_tokens.min(cfg.max_position_embeddings);
    let worker = Worker::spawn(
        engine,
        WorkerOptions {
            max_slots: 2,
            slot_capacity: capacity,
        },
    )?;
    let backend = Arc::new(Scripted {
        inner: LocalBackend::new(worker, capacity, None),
        script: Mutex::new(None),
        draft: Mutex::new(0),
        stats: Arc::default(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let (events, mut grew) = mpsc::unbounded_channel::<Grew>();
    let completions = Completions::new(Some(events));
    // The warm-up asks for one token of the prompt without its last line, whole.
    let warm_settings = Settings {
        max_new_tokens: 1,
        progressive: false,
        ..settings.clone()
    };

    let mut out = Replay {
        problems: problems.len(),
        first_line_ms: Vec::new(),
        body_ms: Vec::new(),
        body_ms_plain: Vec::new(),
        complete: 0,
        tokens: Vec::new(),
        plain_tokens: 0,
        plain_decode_ms: 0.0,
        drafted: 0,
        accepted: 0,
    };
    for problem in problems {
        let script: Arc<[u32]> = script_of(&encode, &problem.prompt, &problem.solution)?.into();
        out.tokens.push(script.len() as f64);
        let key = format!("file:///replay/{}.py", problem.task_id.replace('/', "_"));
        let rope = Rope::from_str(&problem.prompt);
        let before_last_line = problem.prompt.trim_end_matches('\n');
        let warm_rope = Rope::from_str(&problem.prompt[..before_last_line.rfind('\n').map_or(0, |i| i + 1)]);
        let want = trimmed(&problem.solution);
        let mut whole = true;
        for mode_draft in [0, draft] {
            *lock(&backend.script) = None;
            *lock(&backend.draft) = mode_draft;
            let warm = Request {
                key: &key,
                rope: &warm_rope,
                cursor: warm_rope.len_chars(),
                place: Place::default(),
                trigger: Trigger::Automatic,
                settings: &warm_settings,
                workspace: &Workspace::default(),
            };
            runtime
                .block_on(completions.suggest(warm, Some(backend.clone() as Arc<dyn Backend>)))
                .map_err(|e| anyhow!("{}: {e:?}", problem.task_id))?;
            completions.forget(&key);
            while grew.try_recv().is_ok() {}

            *lock(&backend.script) = Some(script.clone());
            *lock(&backend.stats) = GenerationStats::default();
            let request = Request {
                key: &key,
                rope: &rope,
                cursor: rope.len_chars(),
                place: Place::default(),
                trigger: Trigger::Automatic,
                settings: &settings,
                workspace: &Workspace::default(),
            };
            let started = Instant::now();
            let first = runtime
                .block_on(completions.suggest(request, Some(backend.clone() as Arc<dyn Backend>)))
                .map_err(|e| anyhow!("{}: {e:?}", problem.task_id))?;
            let first_ms = ms(started.elapsed());
            let growing = completions.last().is_some_and(|last| last.stop == "growing");
            let (body, body_ms) = if growing {
                let done = runtime.block_on(async {
                    tokio::time::timeout(BODY_TIMEOUT, async {
                        while let Some(event) = grew.recv().await {
                            if event.key == key && event.done {
                                return Some(event.text);
                            }
                        }
                        None
                    })
                    .await
                });
                (done.ok().flatten(), ms(started.elapsed()))
            } else {
                (first, first_ms)
            };
            whole &= body.as_deref().map(trimmed) == Some(want.clone());
            let stats = lock(&backend.stats).clone();
            if mode_draft == 0 {
                out.body_ms_plain.push(body_ms);
                out.plain_tokens += stats.generated_tokens;
                out.plain_decode_ms += stats.decode_ms;
            } else {
                out.first_line_ms.push(first_ms);
                out.body_ms.push(body_ms);
                out.drafted += stats.drafted_tokens;
                out.accepted += stats.accepted_tokens;
            }
            completions.forget(&key);
        }
        backend.forget(&key);
        out.complete += usize::from(whole);
        progress(&format!(
            "replay {}: {} tokens, first line {:.0} ms, body {:.0} ms ({:.0} ms without drafts){}",
            problem.task_id,
            script.len(),
            out.first_line_ms.last().copied().unwrap_or_default(),
            out.body_ms.last().copied().unwrap_or_default(),
            out.body_ms_plain.last().copied().unwrap_or_default(),
            if whole { "" } else { ", not delivered whole" }
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_humaneval_has_every_problem() {
        let problems = humaneval(None).expect("parses");
        assert_eq!(problems.len(), 164);
        assert_eq!(problems[0].task_id, "HumanEval/0");
        assert!(
            problems[0].prompt.ends_with("\"\"\"\n"),
            "{:?}",
            problems[0].prompt
        );
        assert_eq!(humaneval(Some(3)).expect("parses").len(), 3);
    }

    #[test]
    fn the_script_is_what_follows_the_prompt() {
        // A tokenizer of single characters: the prompt's ids are always a prefix.
        let chars = |text: &str| -> Result<Vec<u32>> { Ok(text.chars().map(u32::from).collect()) };
        assert_eq!(script_of(&chars, "ab", "cd").expect("encodes"), vec![99, 100]);
        // One that merges across the boundary: the solution is encoded alone.
        let merging = |text: &str| -> Result<Vec<u32>> {
            Ok(match text {
                "ab" => vec![1],
                "abcd" => vec![7, 8],
                "cd" => vec![3, 4],
                _ => vec![],
            })
        };
        assert_eq!(script_of(&merging, "ab", "cd").expect("encodes"), vec![3, 4]);
    }

    #[test]
    fn bodies_compare_without_trailing_whitespace() {
        assert_eq!(
            trimmed("    x = 1  \n    return x\n\n"),
            "    x = 1\n    return x"
        );
    }
}
