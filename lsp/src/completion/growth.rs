//! A suggestion that grows: the generation behind it goes on after its first answer, until the
//! block ends by the stop rules or the token cap. The model thread publishes the raw text after
//! each token; each time a line completes, the post-processed suggestion is brought up to date,
//! whoever waits for the first answer is woken, and (once that answer has gone out) the client is
//! told the suggestion grew.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use phi_engine::GenerationStats;
use tokio::sync::{mpsc, Notify};

use super::backend::{BackendError, Outcome};
use super::lock;
use super::postprocess::{self, Context};

/// Where a completion was asked for, as the client named it: the growth notifications name it
/// back, so the client can tell whether its cursor is still there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place {
    pub version: i32,
    pub line: u32,
    pub character: u32,
}

/// The suggestion at `place` of document `key` grew to `text`; `done`: it will not grow again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grew {
    pub key: String,
    pub place: Place,
    pub text: String,
    pub done: bool,
}

/// What a growing suggestion is now.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The suggestion made of the complete lines so far (of all the text, once finished).
    pub suggestion: Option<String>,
    /// The figures so far (prompt and prefill once the prefill is done).
    pub stats: GenerationStats,
    /// How the generation ended; `None` while it runs.
    pub finished: Option<Finished>,
    /// The text token healing dropped from the prompt.
    pub healed: Option<String>,
    /// The prompt as the model got it.
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// It ended by itself (`reason` is the engine's stop reason, as text).
    Ended {
        reason: String,
    },
    /// A newer request superseded it, or it was cancelled: what it had is all there is.
    CutShort,
    Failed(BackendError),
}

#[derive(Clone)]
pub struct Growth {
    shared: Arc<Shared>,
}

struct Shared {
    context: Context,
    key: String,
    place: Place,
    events: Option<mpsc::UnboundedSender<Grew>>,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Complete lines in the raw text published so far.
    lines: usize,
    suggestion: Option<String>,
    stats: GenerationStats,
    finished: Option<Finished>,
    /// The first answer has gone out: from now on every change is sent as a [`Grew`].
    answered: bool,
    healed: Option<String>,
    prompt: Option<String>,
}

impl Growth {
    pub fn new(
        context: Context,
        key: &str,
        place: Place,
        events: Option<mpsc::UnboundedSender<Grew>>,
    ) -> Self {
        Growth {
            shared: Arc::new(Shared {
                context,
                key: key.to_string(),
                place,
                events,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// The raw model text so far (called after each token, on the model thread). Only complete
    /// lines count: a line being written may still be cut by the stop rules.
    pub fn publish(&self, raw: &str) {
        let lines = raw.matches('\n').count();
        let mut state = lock(&self.shared.state);
        if lines <= state.lines || state.finished.is_some() {
            return;
        }
        state.lines = lines;
        let complete = &raw[..raw.rfind('\n').map_or(0, |i| i + 1)];
        let suggestion = postprocess::finish(&self.shared.context, complete);
        self.update(state, suggestion, false);
    }

    /// The generation heals the prompt's last token, whose text this is, and the model gets
    /// `prompt` (for the status).
    pub fn started(&self, healed: Option<&str>, prompt: Option<&str>) {
        let mut state = lock(&self.shared.state);
        state.healed = healed.map(str::to_string);
        state.prompt = prompt.map(str::to_string);
    }

    /// The figures so far (called after the prefill and after each token).
    pub fn progress(&self, stats: &GenerationStats) {
        lock(&self.shared.state).stats = stats.clone();
    }

    /// The generation ended with `outcome`: the suggestion is now made of all its text.
    pub fn finish(&self, outcome: Outcome, suggestion_of: impl FnOnce(&str) -> Option<String>) {
        let mut state = lock(&self.shared.state);
        let (suggestion, finished) = match outcome {
            Ok(Some(generated)) => {
                state.stats = generated.stats.clone();
                (
                    suggestion_of(&generated.text),
                    Finished::Ended {
                        reason: format!("{:?}", generated.stop),
                    },
                )
            }
            Ok(None) => (state.suggestion.clone(), Finished::CutShort),
            Err(e) => (state.suggestion.clone(), Finished::Failed(e)),
        };
        state.finished = Some(finished);
        self.update(state, suggestion, true);
    }

    fn update(&self, mut state: std::sync::MutexGuard<'_, State>, suggestion: Option<String>, done: bool) {
        let changed = suggestion != state.suggestion;
        state.suggestion = suggestion;
        let event = (state.answered && (changed || done)).then(|| Grew {
            key: self.shared.key.clone(),
            place: self.shared.place,
            text: state.suggestion.clone().unwrap_or_default(),
            done,
        });
        drop(state);
        self.shared.changed.notify_waiters();
        if let (Some(event), Some(events)) = (event, &self.shared.events) {
            let _ = events.send(event);
        }
    }

    /// Waits until there is a first answer (a suggestion with a complete line, or the end of the
    /// generation; only the end when `whole`) or `deadline` passes, then marks the answer as given
    /// and returns it: every later change is sent as a [`Grew`]. With `whole`, the generation's own
    /// deadline ends it, so only the end is waited for.
    pub async fn first_answer(&self, deadline: Instant, whole: bool) -> Snapshot {
        let deadline = if whole {
            tokio::time::Instant::now() + std::time::Duration::from_secs(24 * 3600)
        } else {
            tokio::time::Instant::from_std(deadline)
        };
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = lock(&self.shared.state);
                if (state.suggestion.is_some() && !whole) || state.finished.is_some() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let mut state = lock(&self.shared.state);
        state.answered = true;
        Snapshot {
            suggestion: state.suggestion.clone(),
            stats: state.stats.clone(),
            finished: state.finished.clone(),
            healed: state.healed.clone(),
            prompt: state.prompt.clone(),
        }
    }

    /// Waits until the generation ends or `deadline` passes; whether it ended.
    pub async fn ended_by(&self, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_finished() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_finished();
            }
        }
    }

    /// The suggestion as it is now.
    pub fn suggestion(&self) -> Option<String> {
        lock(&self.shared.state).suggestion.clone()
    }

    /// Whether `other` is this same growth (a clone of it).
    pub fn same(&self, other: &Growth) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.shared.state).finished.is_some()
    }

    /// How it ended; `None` while it runs.
    pub fn finished(&self) -> Option<Finished> {
        lock(&self.shared.state).finished.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::backend::Generated;
    use crate::completion::postprocess::IndentStyle;
    use phi_engine::StopReason;
    use std::time::Duration;

    fn body_context() -> Context {
        Context {
            line_prefix: "    ".into(),
            line_suffix: String::new(),
            after: String::new(),
            indent: IndentStyle::Spaces(4),
        }
    }

    #[tokio::test]
    async fn the_first_answer_waits_for_a_complete_line_and_later_lines_are_sent() {
        let growth = Growth::new(body_context(), "file:///a.py", Place::default(), None);
        growth.publish("total = 0");
        // No complete line yet: the first answer waits until the deadline.
        let snapshot = growth
            .first_answer(Instant::now() + Duration::from_millis(20), false)
            .await;
        assert_eq!(snapshot.suggestion, None);
        assert!(snapshot.finished.is_none());

        let (tx, mut rx) = mpsc::unbounded_channel();
        let growth = Growth::new(body_context(), "file:///a.py", Place::default(), Some(tx));
        let publisher = growth.clone();
        let waiter = tokio::spawn(async move {
            publisher
                .first_answer(Instant::now() + Duration::from_secs(5), false)
                .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        growth.publish("total = 0\n    for x in xs");
        let first = waiter.await.expect("joins");
        assert_eq!(first.suggestion.as_deref(), Some("total = 0"));
        growth.publish("total = 0\n    for x in xs:\n        total += x\n");
        growth.finish(
            Ok(Some(Generated {
                healed: None,
                prompt: None,
                text: "total = 0\n    for x in xs:\n        total += x\n    return total\n\ndef g():".into(),
                stop: StopReason::Predicate,
                stats: GenerationStats::default(),
            })),
            |text| postprocess::finish(&body_context(), text),
        );
        let events: Vec<Grew> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let texts: Vec<(&str, bool)> = events.iter().map(|e| (e.text.as_str(), e.done)).collect();
        assert_eq!(
            texts,
            [
                ("total = 0\n    for x in xs:\n        total += x", false),
                (
                    "total = 0\n    for x in xs:\n        total += x\n    return total",
                    true
                ),
            ]
        );
    }
}
