//! The remote backend: generation by an OpenAI-compatible `/v1/completions` endpoint (vLLM,
//! Hugging Face TGI, the llama.cpp server) instead of the in-process model. The request is greedy
//! and streamed; every chunk goes through the same stop rules as the local model, and the
//! connection is dropped as soon as they say stop, the request is cancelled or the deadline passes.
//! The prompt goes whole, unhealed (a request's `heal` is ignored): the server tokenizes it and no
//! tokenizer is loaded here, so neither its last token nor the ids that agree with it (which
//! `logit_bias` could favour) are known.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phi_engine::{GenerationStats, StopReason};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::completion::backend::{Backend, BackendError, Cancel, Generated, GenerationRequest, Pending};
use crate::completion::lock;

/// The environment variable holding the API key sent as `Authorization: Bearer` (optional).
pub const API_KEY_ENV: &str = "PHI_LSP_API_KEY";

/// Sent with every request so the engine stops where the Python stop rules would (a new top-level
/// statement, two blank lines); the rules still run on the stream for the rest.
pub const STOP_STRINGS: [&str; 4] = ["\ndef ", "\nclass ", "\nif __name__", "\n\n\n"];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a remote generation failed, in words for the status and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError(pub String);

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RemoteError {}

/// Cheap to clone: clones share the connection pool and the last error.
#[derive(Clone)]
pub struct Remote {
    endpoint: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    /// The last failure, until a request succeeds again (for `phi-lsp/status`).
    last_error: Arc<Mutex<Option<String>>>,
}

impl Remote {
    /// `url` is the server (`http://host:port`), its `/v1`, or the full `/v1/completions` URL;
    /// `model` is the name the engine serves (vLLM checks it).
    pub fn new(url: &str, model: &str) -> Result<Self, RemoteError> {
        Ok(Remote {
            endpoint: endpoint(url)?,
            model: model.to_string(),
            api_key: std::env::var(API_KEY_ENV).ok().filter(|k| !k.trim().is_empty()),
            agent: ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).build(),
            last_error: Arc::default(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Greedy completion of the request's prompt, read chunk by chunk. Ends early (and closes the
    /// connection) when its stop rule says so for the text so far, when `cancelled` turns true or at
    /// the deadline, keeping what arrived, as the local model does.
    pub fn generate(
        &self,
        request: GenerationRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generated, RemoteError> {
        let GenerationRequest {
            prompt,
            header,
            neighbours,
            max_new_tokens,
            deadline,
            mut stop,
            sampling,
            ..
        } = request;
        let started = Instant::now();
        let prompt = format!("{}{}{prompt}", neighbours.text(), header.text());
        let mut body = json!({
            "model": self.model,
            "prompt": &prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0.0,
            // Greedy everywhere: the llama-cpp-python server applies a repetition penalty of 1.1
            // unless told otherwise (vLLM and TGI ignore the field, llama.cpp's own server
            // defaults to 1.0).
            "repeat_penalty": 1.0,
            "stream": true,
            "stop": STOP_STRINGS,
        });
        // An alternative of an explicit request: sampled, with its seed (servers that take one
        // repeat it).
        if let Some(sampling) = sampling {
            body["temperature"] = json!(sampling.temperature);
            body["top_p"] = json!(sampling.top_p);
            body["seed"] = json!(sampling.seed);
        }
        let mut request = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", "application/json")
            .set("Accept", "text/event-stream");
        if let Some(key) = &self.api_key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        if let Some(deadline) = deadline {
            // The whole exchange, body included; what arrived by then is kept.
            request = request.timeout(
                deadline
                    .saturating_duration_since(started)
                    .max(Duration::from_millis(1)),
            );
        }
        let response = match request.send_string(&body.to_string()) {
            Ok(response) => response,
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                return Err(self.error(format!("HTTP {code}: {}", error_message(&text))));
            }
            Err(ureq::Error::Transport(e)) => {
                let what = match e.kind() {
                    ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
                        format!("cannot reach it ({e}): is the server running?")
                    }
                    _ => format!("the request failed ({e})"),
                };
                return Err(self.error(what));
            }
        };
        let streamed = response.content_type() == "text/event-stream";
        let mut reader = BufReader::new(response.into_reader());
        let mut out = Streamed::default();
        if !streamed {
            // A server that ignores `stream` answers with one JSON object.
            let mut text = String::new();
            if let Err(e) = reader.read_to_string(&mut text) {
                return Err(self.error(format!("reading the answer failed: {e}")));
            }
            let chunk: Value = serde_json::from_str(&text)
                .map_err(|e| self.error(format!("the answer is not JSON ({e}): {}", snippet(&text))))?;
            out.take(&chunk).map_err(|e| self.error(e))?;
            if stop(&out.text) {
                out.reason = Some(StopReason::Predicate);
            }
        } else {
            let mut line = String::new();
            loop {
                if cancelled() {
                    out.reason = Some(StopReason::Cancelled);
                    break;
                }
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                        ) =>
                    {
                        out.reason = Some(StopReason::Deadline);
                        break;
                    }
                    Err(e) => return Err(self.error(format!("the stream broke off: {e}"))),
                }
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue; // blank separators, comments (`:`), `event:` lines
                };
                let data = data.trim();
                if data == "[DONE]" {
                    break;
                }
                let chunk: Value = serde_json::from_str(data)
                    .map_err(|e| self.error(format!("a malformed event ({e}): {}", snippet(data))))?;
                out.take(&chunk).map_err(|e| self.error(e))?;
                if stop(&out.text) {
                    out.reason = Some(StopReason::Predicate);
                    break;
                }
            }
        }
        // Dropping the reader closes the connection, which ends the engine's work on it.
        drop(reader);
        let reason = out.reason.unwrap_or(match out.finish.as_deref() {
            Some("length") => StopReason::MaxTokens,
            _ => StopReason::EndOfText,
        });
        Ok(Generated {
            healed: None,
            // Sent whole: the server fits it to its own context, which is not known here.
            prompt: Some(prompt),
            stats: GenerationStats {
                prompt_tokens: out.prompt_tokens,
                generated_tokens: out.completion_tokens.unwrap_or(out.chunks),
                decode_ms: started.elapsed().as_secs_f64() * 1000.0,
                ..Default::default()
            },
            text: out.text,
            stop: reason,
        })
    }

    fn error(&self, what: String) -> RemoteError {
        RemoteError(format!("remote backend {}: {what}", self.endpoint))
    }

    /// Keeps `result`'s failure for the status (logged; `new` when it differs from the last one) or
    /// clears it on success.
    fn record(&self, result: Result<Generated, RemoteError>) -> Result<Option<Generated>, BackendError> {
        match result {
            Ok(generated) if generated.stop == StopReason::Cancelled => Ok(None),
            Ok(generated) => {
                *lock(&self.last_error) = None;
                Ok(Some(generated))
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!("{message}");
                let new = lock(&self.last_error).replace(message.clone()).as_ref() != Some(&message);
                Err(BackendError::Remote { message, new })
            }
        }
    }
}

/// Sets its flag when dropped: the request of a generation whose [`Pending`] was dropped
/// (cancelled) stops at its next chunk.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A remote request has no prefill to keep: released is cancelled.
impl Cancel for CancelOnDrop {}

impl Backend for Remote {
    /// Runs the request on a blocking thread (ureq reads the stream synchronously).
    fn start(&self, request: GenerationRequest) -> Pending {
        let (tx, rx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let (remote, flag) = (self.clone(), cancel.clone());
        let prompt = format!(
            "{}{}{}",
            request.neighbours.text(),
            request.header.text(),
            request.prompt
        );
        tokio::task::spawn_blocking(move || {
            let run =
                std::panic::AssertUnwindSafe(|| remote.generate(request, &|| flag.load(Ordering::Relaxed)));
            let result = std::panic::catch_unwind(run)
                .unwrap_or_else(|_| Err(RemoteError("the request thread failed".into())));
            let _ = tx.send(remote.record(result));
        });
        Pending::new(rx, CancelOnDrop(cancel)).with_prompt(Some(prompt))
    }

    fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
}

/// What the chunks said so far.
#[derive(Default)]
struct Streamed {
    text: String,
    chunks: usize,
    finish: Option<String>,
    prompt_tokens: usize,
    completion_tokens: Option<usize>,
    reason: Option<StopReason>,
}

impl Streamed {
    fn take(&mut self, chunk: &Value) -> Result<(), String> {
        if let Some(error) = chunk.get("error") {
            return Err(format!(
                "the server reported an error: {}",
                error_message(&error.to_string())
            ));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).map(|n| n as usize);
            self.prompt_tokens = count("prompt_tokens").unwrap_or(self.prompt_tokens);
            self.completion_tokens = count("completion_tokens").or(self.completion_tokens);
        }
        let choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("an answer without `choices`: {}", snippet(&chunk.to_string())))?;
        // A final usage-only chunk has no choices.
        let Some(choice) = choices.first() else {
            return Ok(());
        };
        let text = choice
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("a choice without `text`: {}", snippet(&choice.to_string())))?;
        self.text.push_str(text);
        self.chunks += 1;
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_string());
        }
        Ok(())
    }
}

/// The completions URL for what the user gave.
pub fn endpoint(url: &str) -> Result<String, RemoteError> {
    let url = url.trim().trim_end_matches('/');
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return Err(RemoteError(format!(
            "backend {url:?}: use `local` or an http(s) URL of an OpenAI-compatible server, \
             e.g. http://127.0.0.1:8000/v1"
        )));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(RemoteError(format!("backend {url:?}: the URL has no host")));
    }
    Ok(if url.ends_with("/completions") {
        url.to_string()
    } else if url.ends_with("/v1") {
        format!("{url}/completions")
    } else {
        format!("{url}/v1/completions")
    })
}

/// The `message` of an OpenAI-style error body, else the body's start.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    message.unwrap_or_else(|| snippet(body))
}

fn snippet(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for (given, want) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/completions"),
            ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/completions"),
            ("https://llm.example/v1", "https://llm.example/v1/completions"),
            ("http://h/v1/completions", "http://h/v1/completions"),
        ] {
            assert_eq!(endpoint(given).as_deref(), Ok(want), "{given}");
        }
        for bad in ["ftp://h", "127.0.0.1:8000", "http://", "local-ish"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chunks_add_text_and_counts() {
        let mut out = Streamed::default();
        out.take(&json!({"choices": [{"text": "ret", "finish_reason": null}]}))
            .expect("chunk");
        out.take(&json!({"choices": [{"text": "urn x", "finish_reason": "length"}]}))
            .expect("chunk");
        out.take(&json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}))
            .expect("usage chunk");
        assert_eq!(out.text, "return x");
        assert_eq!(
            (out.chunks, out.prompt_tokens, out.completion_tokens),
            (2, 7, Some(3))
        );
        assert_eq!(out.finish.as_deref(), Some("length"));
        assert!(out.take(&json!({"error": {"message": "boom"}})).is_err());
        assert!(out.take(&json!({"id": 1})).is_err());
        assert!(out.take(&json!({"choices": [{"index": 0}]})).is_err());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(r#"{"error": {"message": "model not found"}}"#),
            "model not found"
        );
        assert_eq!(error_message(r#"{"message": "bad key"}"#), "bad key");
        assert_eq!(error_message("Internal Server Error"), "Internal Server Error");
    }
}
