//! The transport: LSP over stdin/stdout (or any byte streams, for the fuzz target), with the
//! framing guard in front of tower-lsp-server and a prompt end when the client goes away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::server::service;
use crate::settings::Settings;

/// How long requests in flight may still finish once stdin has ended.
const STDIN_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

pub async fn serve_stdio(settings: Settings) {
    serve(tokio::io::stdin(), tokio::io::stdout(), settings).await
}

/// Serves LSP on `input`/`output` until `exit` or the end of `input` (the fuzz target's entry).
pub async fn serve<I, O>(input: I, output: O, settings: Settings)
where
    I: tokio::io::AsyncRead + Unpin + Send + 'static,
    O: tokio::io::AsyncWrite + Unpin,
{
    let (service, socket) = service(settings);
    // Input passes through the framing guard, so one malformed message cannot end the transport.
    let (guarded, server_input) = tokio::io::duplex(1 << 16);
    let input = tokio::io::BufReader::new(input);
    // Once the session is over (`exit`), a read that fails as the runtime stops (tokio's stdin
    // reads on a blocking thread: "task was cancelled") is the normal end, not a warning, which
    // editors would file as an error in their logs.
    let ended = Arc::new(AtomicBool::new(false));
    let ended_seen = ended.clone();
    let mut guard = tokio::spawn(async move {
        if let Err(e) = crate::framing::guard(input, guarded).await {
            if ended_seen.load(Ordering::SeqCst) {
                tracing::debug!("reading stdin after the session ended: {e}");
            } else {
                tracing::warn!("reading stdin failed: {e}");
            }
        }
    });
    // Custom methods take `{}`, `[]`, `null` or nothing alike where they have no parameters.
    let service = crate::params::LenientParams(service);
    let serve = tower_lsp_server::Server::new(server_input, output, socket).serve(service);
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => {}
        _ = &mut guard => {
            // stdin ended without `exit`: the client is gone. tower-lsp-server would wait for every
            // request in flight (a generation can run for seconds); answers already computed get a
            // moment to be written, then dropping `serve` drops the rest, which cancels their jobs.
            let _ = tokio::time::timeout(STDIN_CLOSED_GRACE, &mut serve).await;
        }
    }
    ended.store(true, Ordering::SeqCst);
    guard.abort();
}
