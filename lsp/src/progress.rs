//! The model host's load progress as LSP work-done progress (`$/progress`): one bounded progress
//! per load, its percentage never going down.

use tokio::sync::mpsc::UnboundedReceiver;
use tower_lsp_server::ls_types::ProgressToken;
use tower_lsp_server::{Bounded, Client, NotCancellable, OngoingProgress};

use crate::host::LoadProgress;

/// Forwards `events` until the host drops its sender (the load is over). Where the client does not
/// take work-done progress (`supported` false) the events are drained and nothing is sent.
pub async fn forward(client: &Client, mut events: UnboundedReceiver<LoadProgress>, supported: bool) {
    let mut progress = None;
    // $/progress percentages must not go down (a sharded download restarts per file).
    let mut shown_percentage = 0;
    while let Some(event) = events.recv().await {
        match event {
            LoadProgress::Begin { seq, description } if supported => {
                progress = begin(client, seq, description).await;
            }
            LoadProgress::Begin { .. } => {}
            LoadProgress::Report { message, percentage } => {
                shown_percentage = percentage.clamp(shown_percentage, 100);
                if let Some(progress) = &progress {
                    progress.report_with_message(message, shown_percentage).await;
                }
            }
            LoadProgress::End(message) => {
                if let Some(progress) = progress.take() {
                    progress.finish_with_message(message).await;
                }
            }
        }
    }
}

async fn begin(
    client: &Client,
    seq: u64,
    description: String,
) -> Option<OngoingProgress<Bounded, NotCancellable>> {
    let token = ProgressToken::String(format!("phi-lsp/load/{seq}"));
    match client.create_work_done_progress(token.clone()).await {
        Ok(()) => Some(
            client
                .progress(token, "phi-lsp: loading Phi-1")
                .with_percentage(0)
                .with_message(description)
                .begin()
                .await,
        ),
        Err(e) => {
            tracing::warn!("the client refused work-done progress: {e}");
            None
        }
    }
}
