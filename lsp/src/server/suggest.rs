//! One completion request, from the LSP handler's view: the document's text and cursor in plain
//! values for the completion policy, its answer (and an explicit request's alternatives) as a
//! [`Suggestion`], and what a failed backend means for the user: a remote failure shown once, a
//! stopped model thread restarted, anything else an internal error.

use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::ls_types::{MessageType, Position, Uri};

use super::{internal_error, Backend};
use crate::completion::backend::BackendError;
use crate::completion::growth::Place;
use crate::completion::{lock, Request, Trigger, Workspace};
use crate::convert;
use crate::proto::{self, Suggestion};

impl Backend {
    /// The suggestion at `position` in `uri`, asked for as `trigger` says. Unknown documents and
    /// positions out of range are errors; a model that is not ready gives none.
    /// With `alternatives` (inline requests), an explicit request also gets the alternatives
    /// (`Suggestion::more`).
    pub(super) async fn suggest(
        &self,
        uri: &Uri,
        position: Position,
        trigger: Trigger,
        alternatives: bool,
    ) -> Result<Option<Suggestion>> {
        let key = uri.as_str();
        let settings = self.settings();
        // A notebook cell's prompt reads the notebook's earlier cells first (`text`, with the
        // cell's own from `offset` on); the answer is placed in the cell (`rope`, `cursor`).
        let (rope, version, others, (prompt_text, offset)) = {
            let documents = lock(&self.documents);
            let unknown = || Error::invalid_params(format!("unknown document {key}: send didOpen first"));
            let doc = documents.get(key).ok_or_else(unknown)?;
            let prompt = documents.prompt_text(key).ok_or_else(unknown)?;
            (doc.rope.clone(), doc.version, documents.others(key), prompt)
        };
        let workspace = Workspace {
            roots: lock(&self.session).roots.clone(),
            documents: others,
        };
        let cursor = convert::pos_to_char(&rope, proto::pos(position), self.encoding())
            .map_err(|e| Error::invalid_params(e.to_string()))?;
        let request = Request {
            key,
            rope: &prompt_text,
            cursor: offset + cursor,
            place: Place {
                version,
                line: position.line,
                character: position.character,
            },
            trigger,
            settings: &settings,
            workspace: &workspace,
        };
        let backend = self.host.backend();
        match self.completions.suggest(request, backend.clone()).await {
            Ok(Some(text)) if alternatives && trigger == Trigger::Invoked && settings.alternatives > 1 => {
                let mut offered = self.completions.alternatives(request, backend, text).await;
                let text = offered.remove(0);
                Ok(Some(Suggestion {
                    rope,
                    cursor,
                    text,
                    more: offered,
                }))
            }
            Ok(text) => Ok(text.map(|text| Suggestion {
                rope,
                cursor,
                text,
                more: Vec::new(),
            })),
            Err(BackendError::Remote { message, new }) => {
                if new {
                    self.client
                        .show_message(MessageType::WARNING, format!("phi-lsp: {message}"))
                        .await;
                }
                Ok(None)
            }
            Err(BackendError::Stopped) => {
                let message = "the model thread stopped: loading the model again";
                if let Some(dead) = &backend {
                    if self.host.stopped(dead, message) {
                        tracing::error!("{message}");
                        self.client
                            .log_message(MessageType::ERROR, format!("phi-lsp: {message}"))
                            .await;
                        let server = self.handle();
                        tokio::spawn(async move { server.load_model().await });
                    }
                }
                Err(internal_error(
                    "the model thread stopped; it is being restarted".into(),
                ))
            }
            Err(BackendError::Failed(e)) => {
                tracing::error!("completion failed: {e}");
                Err(internal_error(format!("completion failed: {e}")))
            }
        }
    }
}
