//! What `phi-lsp/status` answers: the settings in force, what the client negotiated, the model's
//! state and what it runs on, the model thread's counts, and what the last completion cost.

use serde_json::Value;

use crate::completion::Completions;
use crate::host::{ModelHost, ModelState};
use crate::proto::{self, ClientFacts};
use crate::settings::Settings;

/// The request's method.
pub const METHOD: &str = "phi-lsp/status";

pub fn status(
    settings: &Settings,
    client: ClientFacts,
    documents: usize,
    host: &ModelHost,
    completions: &Completions,
) -> Value {
    let state = host.state();
    let backend = host.backend();
    let mut status = serde_json::json!({
        "model": settings.model.model,
        "device": settings.model.device,
        "dtype": settings.model.dtype,
        "positionEncoding": proto::lsp_encoding(client.encoding).as_str(),
        "completionMode": settings.completion_mode,
        "clientInlineCompletion": client.inline,
        "maxNewTokens": settings.max_new_tokens,
        "deadlineMs": settings.deadline_ms,
        "contextTokens": settings.context_tokens,
        "documents": documents,
        "backend": settings.model.backend,
        "backendError": backend.as_ref().and_then(|b| b.last_error()),
        "speculate": settings.speculate,
        "tokenHealing": settings.token_healing,
        "automatic": settings.automatic,
        "alternatives": settings.alternatives,
        "speculation": completions.speculation_state(),
        "last": completions.last(),
    });
    if let (Value::Object(map), Ok(Value::Object(state))) = (&mut status, serde_json::to_value(&state)) {
        map.extend(state);
    }
    if let ModelState::Ready {
        device_in_use,
        dtype_in_use,
        ..
    } = &state
    {
        status["device"] = device_in_use.clone().into();
        status["dtype"] = dtype_in_use.clone().into();
    }
    if let Some(stats) = backend.as_ref().and_then(|b| b.worker_stats()) {
        status["worker"] = serde_json::json!({"slots": stats.slots, "maxSlots": host.max_slots(),
            "jobsRun": stats.jobs_run, "jobsDropped": stats.jobs_dropped, "panics": stats.panics});
    }
    status
}
