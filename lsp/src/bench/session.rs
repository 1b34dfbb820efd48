//! `bench --session`: a scripted editing session through the real server, at a typist's pace, to
//! see where a user waits. Two long modules are made of HumanEval's problems (the first of most of
//! them, the second of the rest), every body in place except where the user will type. The user
//! opens both, then types a body's first line at 5 characters a second deep in the first module
//! and pauses; jumps 600 lines up and does the same; switches to the second module and does the
//! same; comes back to the first place and types the body's second line. Each keystroke is a
//! `didChange` and an automatic `inlineCompletion` request, the one before it cancelled, as VS Code
//! does; the server runs with its default settings.
//!
//! At each pause: `wait_ms`, from the last keystroke to its answer (what the user feels; with
//! random weights the first line ends wherever the noise puts a newline, so this includes up to
//! `deadlineMs` of decoding), and `ready_ms`, that less the answer's own decoding (`last.decode_ms`):
//! how long the prompt's prefill still held the model up once the user stopped typing.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ropey::Rope;
use serde_json::{json, Value};

use super::progress;
use super::replay::Problem;
use super::server::{first_insert_text, server_command};
use super::stats::{ms, round, Spread};
use crate::convert::{self, Pos, PositionEncoding};
use crate::lsp_client::LspClient;
use crate::settings::ModelSpec;

/// The typist's pace.
const CHARS_PER_SECOND: f64 = 5.0;
/// How far up the second place is from the first.
const JUMP_LINES: usize = 600;
/// The first module's problems (HumanEval/0 up to this); the second has the rest.
const FIRST_MODULE_PROBLEMS: usize = 110;
/// How much of the end of each pause's prompt the JSON shows.
const PROMPT_END_CHARS: usize = 200;
/// How long one answer, or the model's load, may take.
const TIMEOUT: Duration = Duration::from_secs(900);

/// One pause of the session.
pub struct Pause {
    pub step: &'static str,
    pub file: String,
    pub line: usize,
    pub typed: String,
    pub wait_ms: f64,
    pub ready_ms: f64,
    pub shown: bool,
    pub last: Value,
}

/// What the session measured.
pub struct SessionRuns {
    pub file_lines: [usize; 2],
    pub pauses: Vec<Pause>,
}

impl SessionRuns {
    pub fn json(&self) -> Value {
        let ready: Vec<f64> = self.pauses.iter().map(|p| p.ready_ms).collect();
        let pauses: Vec<Value> = (self.pauses.iter())
            .map(|p| {
                json!({
                    "step": p.step,
                    "file": p.file,
                    "line": p.line,
                    "typed": p.typed,
                    "prompt_end": prompt_end(&p.last),
                    "wait_ms": round(p.wait_ms),
                    "ready_ms": round(p.ready_ms),
                    "shown": p.shown,
                    "prompt_tokens": p.last["prompt_tokens"],
                    "reused_tokens": p.last["reused_tokens"],
                    "prefilled_tokens": p.last["prefilled_tokens"],
                    "prefill_ms": p.last["prefill_ms"],
                    "generated_tokens": p.last["generated_tokens"],
                    "decode_ms": p.last["decode_ms"],
                    "stop": p.last["stop"],
                })
            })
            .collect();
        json!({
            "session_file_lines": self.file_lines,
            "session_chars_per_s": CHARS_PER_SECOND,
            "session_ready_ms_max": round(ready.iter().copied().fold(0.0, f64::max)),
            "session_ready_ms_p50": round(Spread::percentile(&ready, 50.0)),
            "session_pauses": pauses,
        })
    }
}

/// The last characters of the prompt the model was given (where the session typed, and what the
/// server saw of it).
fn prompt_end(last: &Value) -> Value {
    match last["prompt"].as_str() {
        Some(prompt) => {
            let chars: Vec<char> = prompt.chars().collect();
            json!(chars[chars.len().saturating_sub(PROMPT_END_CHARS)..]
                .iter()
                .collect::<String>())
        }
        None => Value::Null,
    }
}

/// An open document of the session.
struct Module {
    uri: String,
    rope: Rope,
    version: i32,
}

/// Where the user types: the module, the char offset of the body's start, and the body.
struct Place {
    module: usize,
    offset: usize,
    solution: String,
}

/// A module of `problems` with the bodies of `typed` left out: its text, and for each problem the
/// char offset where its body starts (the end of its prompt) and that line.
fn build_module(problems: &[Problem], typed: &[usize]) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    let mut starts = Vec::new();
    for (i, problem) in problems.iter().enumerate() {
        text.push_str(&problem.prompt);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let chars = text.chars().count();
        starts.push((chars, text.lines().count()));
        if !typed.contains(&i) {
            text.push_str(&problem.solution);
        }
        text.push_str("\n\n");
    }
    (text, starts)
}

/// The problem whose body starts nearest `line`, among those `eligible`.
fn nearest(starts: &[(usize, usize)], line: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    (0..starts.len())
        .filter(|&i| eligible(i))
        .min_by_key(|&i| starts[i].1.abs_diff(line))
}

/// Line `skip` of `solution` (blank lines not counted), its newline, and the indentation an editor
/// puts on the line after it (one level more after a `:`): what the user types there.
fn typed_lines(solution: &str, skip: usize) -> String {
    let Some(line) = solution.lines().filter(|l| !l.trim().is_empty()).nth(skip) else {
        return String::new();
    };
    let indent: String = line.chars().take_while(|c| *c == ' ').collect();
    let more = if line.trim_end().ends_with(':') {
        "    "
    } else {
        ""
    };
    format!("{line}\n{indent}{more}")
}

pub fn session(spec: &ModelSpec, threads: usize, problems: &[Problem]) -> Result<SessionRuns> {
    if problems.len() <= FIRST_MODULE_PROBLEMS {
        bail!("the session needs more than {FIRST_MODULE_PROBLEMS} HumanEval problems");
    }
    let (first, second) = problems.split_at(FIRST_MODULE_PROBLEMS);
    let multi_line =
        |set: &[Problem], i: usize| set[i].solution.lines().filter(|l| !l.trim().is_empty()).count() >= 2;
    let (_, starts) = build_module(first, &[]);
    let total = starts.last().map_or(0, |s| s.1);
    let deep = nearest(&starts, total * 3 / 4, |i| multi_line(first, i)).context("no place to type")?;
    let up = nearest(&starts, starts[deep].1.saturating_sub(JUMP_LINES), |i| i != deep)
        .context("no place to type")?;
    let (_, second_starts) = build_module(second, &[]);
    let other = nearest(
        &second_starts,
        second_starts.last().map_or(0, |s| s.1) / 2,
        |_| true,
    )
    .context("no place to type")?;

    let (first_text, first_starts) = build_module(first, &[deep, up]);
    let (second_text, second_starts) = build_module(second, &[other]);
    let mut modules = [
        Module {
            uri: "file:///phi-lsp-bench/session/first.py".into(),
            rope: Rope::from_str(&first_text),
            version: 1,
        },
        Module {
            uri: "file:///phi-lsp-bench/session/second.py".into(),
            rope: Rope::from_str(&second_text),
            version: 1,
        },
    ];
    let file_lines = [modules[0].rope.len_lines(), modules[1].rope.len_lines()];
    let mut places = [
        Place {
            module: 0,
            offset: first_starts[deep].0,
            solution: first[deep].solution.clone(),
        },
        Place {
            module: 0,
            offset: first_starts[up].0,
            solution: first[up].solution.clone(),
        },
        Place {
            module: 1,
            offset: second_starts[other].0,
            solution: second[other].solution.clone(),
        },
    ];

    let command = server_command(spec, threads)?;
    progress(&format!("{}: session: starting the server", spec.dtype));
    let mut client = LspClient::spawn(command)?.with_timeout(TIMEOUT);
    let result = run_session(&mut client, &mut modules, &mut places, &spec.dtype);
    let _ = client.shutdown();
    Ok(SessionRuns {
        file_lines,
        pauses: result?,
    })
}

fn run_session(
    client: &mut LspClient,
    modules: &mut [Module; 2],
    places: &mut [Place; 3],
    name: &str,
) -> Result<Vec<Pause>> {
    client.initialize(
        json!({
            "general": {"positionEncodings": ["utf-16"]},
            "textDocument": {"inlineCompletion": {}, "synchronization": {}},
        }),
        json!({}),
    )?;
    client.wait_ready(TIMEOUT)?;
    for module in modules.iter() {
        client.open(&module.uri, &module.rope.to_string())?;
    }
    let steps: [(&'static str, usize, usize); 4] = [
        ("deep in the first file", 0, 0),
        ("600 lines up", 1, 0),
        ("the second file", 2, 0),
        ("back at the first place", 0, 1),
    ];
    let mut pauses = Vec::new();
    for (step, place, skip) in steps {
        let text = typed_lines(&places[place].solution, skip);
        let (module, start) = (places[place].module, places[place].offset);
        let pause = type_and_pause(client, &mut modules[module], &mut places[place], &text, step)?;
        // What was typed moves the places below it in the same file.
        let typed = places[place].offset - start;
        for (i, other) in places.iter_mut().enumerate() {
            if i != place && other.module == module && other.offset >= start {
                other.offset += typed;
            }
        }
        progress(&format!(
            "{name}: session, {step} (line {}): answer {:.0} ms after the last keystroke, prefill held it {:.0} ms (prefilled {}, reused {})",
            pause.line, pause.wait_ms, pause.ready_ms, pause.last["prefilled_tokens"], pause.last["reused_tokens"]
        ));
        pauses.push(pause);
    }
    Ok(pauses)
}

/// Types `text` at `place` one character a keystroke at the typist's pace (a newline and the
/// indentation after it are one keystroke, as an editor inserts them), then waits for the last
/// keystroke's answer.
fn type_and_pause(
    client: &mut LspClient,
    module: &mut Module,
    place: &mut Place,
    text: &str,
    step: &'static str,
) -> Result<Pause> {
    let enc = PositionEncoding::Utf16;
    let line = module.rope.char_to_line(place.offset) + 1;
    // Indentation comes with the keystroke before it: the editor puts it there.
    let mut keystrokes: Vec<String> = Vec::new();
    for c in text.chars() {
        match keystrokes.last_mut() {
            Some(last) if c == ' ' && last.trim_start_matches([' ', '\n']).is_empty() => last.push(c),
            _ => keystrokes.push(c.to_string()),
        }
    }
    let interval = Duration::from_secs_f64(1.0 / CHARS_PER_SECOND);
    let mut outstanding: Option<i64> = None;
    let mut last_keystroke = Instant::now();
    for (i, keystroke) in keystrokes.iter().enumerate() {
        if i > 0 {
            // Answers to earlier keystrokes arrive meanwhile; the client keeps them, unread.
            let next = last_keystroke + interval;
            let _ = client.response_within(-1, next.saturating_duration_since(Instant::now()))?;
        }
        if let Some(id) = outstanding.take() {
            client.notify("$/cancelRequest", json!({"id": id}))?;
        }
        let at: Pos = convert::char_to_pos(&module.rope, place.offset, enc);
        module.rope.insert(place.offset, keystroke);
        place.offset += keystroke.chars().count();
        module.version += 1;
        last_keystroke = Instant::now();
        client.insert(&module.uri, module.version, at, keystroke)?;
        let cursor = convert::char_to_pos(&module.rope, place.offset, enc);
        outstanding = Some(client.inline_async(&module.uri, cursor)?);
    }
    let id = outstanding.context("nothing was typed")?;
    let answer = client
        .response_within(id, TIMEOUT)?
        .context("no answer to the last keystroke")?;
    let wait_ms = ms(last_keystroke.elapsed());
    let shown = first_insert_text(&answer["result"]).is_some();
    let last = client.status()?["last"].clone();
    let decode_ms = last["decode_ms"].as_f64().unwrap_or(0.0);
    client.notifications.clear();
    Ok(Pause {
        step,
        file: module.uri.rsplit('/').next().unwrap_or_default().to_string(),
        line,
        typed: text.to_string(),
        wait_ms,
        ready_ms: (wait_ms - decode_ms).max(0.0),
        shown,
        last,
    })
}
