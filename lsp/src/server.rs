//! The `LanguageServer`: the handlers. Each takes its LSP types apart with `proto`, hands the plain
//! values to the documents, the completion policy (`completion`) or the model host (`host`), and
//! sends what the user should see. LSP types stop here and in `proto`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::ls_types::*;
use tower_lsp_server::{Client, LanguageServer, LspService};

use crate::completion::growth::Grew;
use crate::completion::{lock, Completions};
use crate::convert::PositionEncoding;
use crate::documents::Documents;
use crate::faults::{catch_panic, TestPanic};
use crate::host::{LoadOutcome, ModelHost};
use crate::proto::{self, ClientFacts};
use crate::settings::Settings;
use crate::status;

mod suggest;

/// Documents larger than this are refused (the prompt window is bounded anyway).
pub const MAX_DOCUMENT_BYTES: usize = 32 << 20;

struct Session {
    settings: Settings,
    client: ClientFacts,
    /// A problem with the initial settings, shown once the client is initialized.
    settings_error: Option<String>,
    /// The workspace roots named at `initialize` (URIs): a file's imports resolve within its root.
    roots: Vec<String>,
}

pub struct Backend {
    client: Client,
    session: Arc<Mutex<Session>>,
    documents: Arc<Mutex<Documents>>,
    completions: Arc<Completions>,
    host: Arc<ModelHost>,
    /// Growth events until `initialized` starts forwarding them.
    grew: Arc<Mutex<Option<mpsc::UnboundedReceiver<Grew>>>>,
}

pub fn service(settings: Settings) -> (LspService<Backend>, tower_lsp_server::ClientSocket) {
    LspService::build(|client| Backend::new(client, settings))
        .custom_method(status::METHOD, Backend::status)
        .custom_method("textDocument/inlineCompletion", Backend::inline_completion)
        .custom_method(crate::framing::MALFORMED_METHOD, Backend::malformed_message)
        .finish()
}

impl Backend {
    fn new(client: Client, settings: Settings) -> Self {
        let session = Session {
            settings,
            client: ClientFacts {
                encoding: PositionEncoding::Utf16,
                inline: false,
                work_done_progress: false,
                growth: false,
                label_details: false,
            },
            settings_error: None,
            roots: Vec::new(),
        };
        let (grew_tx, grew_rx) = mpsc::unbounded_channel();
        Backend {
            client,
            session: Arc::new(Mutex::new(session)),
            documents: Arc::new(Mutex::new(Documents::new(MAX_DOCUMENT_BYTES))),
            completions: Arc::new(Completions::new(Some(grew_tx))),
            host: Arc::new(ModelHost::new(TestPanic::from_env())),
            grew: Arc::new(Mutex::new(Some(grew_rx))),
        }
    }

    /// Sends each growth of a suggestion as `phi-lsp/suggestionGrew`, if the client wants them.
    async fn forward_growth(&self, mut grew: mpsc::UnboundedReceiver<Grew>) {
        while let Some(grew) = grew.recv().await {
            if !lock(&self.session).client.growth {
                continue;
            }
            if let Some(params) = proto::suggestion_grew(&grew) {
                self.client
                    .send_notification::<proto::SuggestionGrew>(params)
                    .await;
            }
        }
    }

    fn handle(&self) -> Backend {
        Backend {
            client: self.client.clone(),
            session: self.session.clone(),
            documents: self.documents.clone(),
            completions: self.completions.clone(),
            host: self.host.clone(),
            grew: self.grew.clone(),
        }
    }

    fn settings(&self) -> Settings {
        lock(&self.session).settings.clone()
    }

    fn encoding(&self) -> PositionEncoding {
        lock(&self.session).client.encoding
    }

    /// Runs one handler at the request boundary: a panic in it is logged once, shown in the client's
    /// log, and answered as an internal error; the server goes on serving.
    async fn guarded<T>(&self, method: &str, handler: impl Future<Output = Result<T>>) -> Result<T> {
        match catch_panic(handler).await {
            Ok(result) => result,
            Err(what) => {
                let message = format!("{method} panicked: {what}");
                self.log_panic(&message).await;
                Err(internal_error(message))
            }
        }
    }

    /// [`Self::guarded`] for notifications, which have no answer to carry the error.
    async fn guarded_notification(&self, method: &str, handler: impl Future<Output = ()>) {
        if let Err(what) = catch_panic(handler).await {
            self.log_panic(&format!("{method} panicked: {what}")).await;
        }
    }

    async fn log_panic(&self, message: &str) {
        tracing::error!("{message}; the server goes on");
        self.client
            .log_message(MessageType::ERROR, format!("phi-lsp: {message}"))
            .await;
    }

    /// Loads the model the settings name, forwarding the host's progress as work-done progress
    /// where the client takes it, and tells the user how it went.
    async fn load_model(&self) {
        let (settings, progress_supported) = {
            let session = lock(&self.session);
            (session.settings.clone(), session.client.work_done_progress)
        };
        // Before the load, not after: once the new backend is installed, requests may already be
        // generating on it. (Until then the host has no backend; what a request that started
        // earlier computes is not kept.)
        self.completions.forget_all();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = crate::progress::forward(&self.client, rx, progress_supported);
        let (outcome, ()) = tokio::join!(self.host.load(&settings, tx), forward);
        match outcome {
            LoadOutcome::Ready(message) => {
                self.client
                    .log_message(MessageType::INFO, format!("phi-lsp: {message}"))
                    .await;
            }
            LoadOutcome::Failed(message) => {
                self.client
                    .show_message(MessageType::ERROR, format!("phi-lsp: {message}"))
                    .await;
            }
            LoadOutcome::Superseded => {}
        }
    }

    async fn malformed_message(&self, params: Value) {
        let reason = params
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        self.client
            .log_message(
                MessageType::WARNING,
                format!("phi-lsp: ignored a malformed message: {reason}"),
            )
            .await;
    }

    async fn status(&self) -> Result<Value> {
        self.guarded("phi-lsp/status", async move { Ok(self.status_value()) })
            .await
    }

    fn status_value(&self) -> Value {
        let (settings, client) = {
            let session = lock(&self.session);
            (session.settings.clone(), session.client)
        };
        let documents = lock(&self.documents).len();
        status::status(&settings, client, documents, &self.host, &self.completions)
    }

    /// Closed documents: nothing of them may be served again, and their KV caches go.
    fn forget(&self, uris: &[String]) {
        let backend = self.host.backend();
        for uri in uris {
            self.completions.forget(uri);
            if let Some(backend) = &backend {
                backend.forget(uri);
            }
        }
    }

    /// Each problem as a warning in the log and the client's.
    async fn warn_all(&self, what: &str, problems: Vec<String>) {
        for problem in problems {
            tracing::warn!("{what}: {problem}");
            self.client
                .log_message(MessageType::WARNING, format!("phi-lsp: {what}: {problem}"))
                .await;
        }
    }

    fn mode_allows(&self, inline: bool) -> bool {
        let session = lock(&self.session);
        session
            .settings
            .completion_mode
            .allows(inline, session.client.inline)
    }

    async fn inline_completion(
        &self,
        params: InlineCompletionParams,
    ) -> Result<Option<InlineCompletionResponse>> {
        self.guarded("textDocument/inlineCompletion", async move {
            if !self.mode_allows(true) {
                return Ok(None);
            }
            let doc = &params.text_document_position;
            let trigger = proto::inline_trigger(&params.context);
            let suggestion = self
                .suggest(&doc.text_document.uri, doc.position, trigger, true)
                .await?;
            Ok(Some(proto::inline_response(suggestion, doc.position)))
        })
        .await
    }
}

fn internal_error(message: String) -> Error {
    Error {
        message: message.into(),
        ..Error::internal_error()
    }
}

impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let facts = ClientFacts::of(&params.capabilities);
        let mode = {
            let mut session = lock(&self.session);
            session.client = facts;
            session.roots = proto::roots(&params);
            if let Some(options) = &params.initialization_options {
                if let Err(e) = session.settings.apply(options) {
                    session.settings_error = Some(e);
                }
            }
            session.settings.completion_mode
        };
        Ok(InitializeResult {
            capabilities: proto::capabilities(facts, mode),
            server_info: Some(ServerInfo {
                name: "phi-lsp".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            offset_encoding: None,
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        let error = lock(&self.session).settings_error.take();
        if let Some(error) = error {
            self.client
                .show_message(MessageType::WARNING, format!("phi-lsp: {error}; using defaults"))
                .await;
        }
        // Loading takes seconds to minutes; the server answers (empty) meanwhile.
        let server = self.handle();
        tokio::spawn(async move { server.load_model().await });
        if let Some(grew) = lock(&self.grew).take() {
            let server = self.handle();
            tokio::spawn(async move { server.forward_growth(grew).await });
        }
    }

    async fn shutdown(&self) -> Result<()> {
        self.host.shutdown();
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        self.guarded_notification("textDocument/didOpen", async move {
            let doc = params.text_document;
            let result =
                lock(&self.documents).open(doc.uri.as_str(), &doc.text, doc.version, &doc.language_id);
            if let Err(e) = result {
                tracing::warn!("didOpen {}: {e}", doc.uri.as_str());
                self.client
                    .log_message(MessageType::WARNING, format!("phi-lsp: {e}"))
                    .await;
            }
        })
        .await
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        self.guarded_notification("textDocument/didChange", async move {
            let uri = params.text_document.uri.as_str().to_string();
            let edits = proto::edits(params.content_changes);
            let encoding = self.encoding();
            let result = {
                let mut documents = lock(&self.documents);
                documents
                    .change(&uri, params.text_document.version, &edits, encoding)
                    .map(|()| documents.prompt_text(&uri).map(|(text, _)| text))
            };
            if let Ok(Some(text)) = &result {
                self.completions.changed(&uri, text);
            }
            if let Err(e) = result {
                tracing::warn!("didChange {uri}: {e}");
                self.client
                    .log_message(MessageType::WARNING, format!("phi-lsp: change ignored: {e}"))
                    .await;
            }
        })
        .await
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        self.guarded_notification("textDocument/didClose", async move {
            let uri = params.text_document.uri.as_str();
            lock(&self.documents).close(uri);
            self.forget(&[uri.to_string()]);
        })
        .await
    }

    async fn notebook_did_open(&self, params: DidOpenNotebookDocumentParams) {
        self.guarded_notification("notebookDocument/didOpen", async move {
            let notebook = params.notebook_document;
            let uri = notebook.uri.as_str();
            let texts = proto::cell_texts(params.cell_text_documents);
            let problems = lock(&self.documents).open_notebook(uri, proto::cells(&notebook.cells), &texts);
            self.warn_all(&format!("notebook {uri}"), problems).await;
        })
        .await
    }

    async fn notebook_did_change(&self, params: DidChangeNotebookDocumentParams) {
        self.guarded_notification("notebookDocument/didChange", async move {
            let uri = params.notebook_document.uri.as_str();
            let change = proto::notebook_change(params.change);
            let encoding = self.encoding();
            let changed = lock(&self.documents).change_notebook(uri, change, encoding);
            // An edit in one cell changes the prompt of every later one.
            for (cell, text) in &changed.prompts {
                self.completions.changed(cell, text);
            }
            self.forget(&changed.closed);
            self.warn_all(
                &format!("notebook change ignored in part: {uri}"),
                changed.problems,
            )
            .await;
        })
        .await
    }

    async fn notebook_did_save(&self, _: DidSaveNotebookDocumentParams) {}

    async fn notebook_did_close(&self, params: DidCloseNotebookDocumentParams) {
        self.guarded_notification("notebookDocument/didClose", async move {
            let also = (params.cell_text_documents.into_iter())
                .map(|doc| doc.uri.as_str().to_string())
                .collect();
            let closed = lock(&self.documents).close_notebook(params.notebook_document.uri.as_str(), also);
            self.forget(&closed);
        })
        .await
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        self.guarded_notification("workspace/didChangeConfiguration", async move {
            let (before, result) = {
                let mut session = lock(&self.session);
                let before = session.settings.clone();
                (before, session.settings.apply(&params.settings))
            };
            if let Err(e) = result {
                self.client
                    .show_message(MessageType::WARNING, format!("phi-lsp: {e}"))
                    .await;
                return;
            }
            let after = self.settings();
            self.completions.forget_all();
            if after.model != before.model || after.context_tokens != before.context_tokens {
                self.load_model().await;
            }
        })
        .await
    }

    async fn completion(&self, params: CompletionParams) -> Result<Option<CompletionResponse>> {
        self.guarded("textDocument/completion", async move {
            if !self.mode_allows(false) {
                return Ok(None);
            }
            let doc = &params.text_document_position;
            let trigger = proto::menu_trigger(params.context.as_ref());
            let suggestion = self
                .suggest(&doc.text_document.uri, doc.position, trigger, false)
                .await?;
            let client = lock(&self.session).client;
            Ok(Some(proto::completion_response(suggestion, doc.position, client)))
        })
        .await
    }
}
