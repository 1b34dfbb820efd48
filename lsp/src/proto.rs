//! Every conversion between LSP types and the plain ones below the server: what the client declared
//! (encoding, inline completion, progress), the capabilities offered, positions and edits in, and
//! the inline item and the menu item out.

use ropey::Rope;
use tower_lsp_server::ls_types::*;

use crate::completion::growth::Grew;
use crate::completion::Trigger;
use crate::convert::{self, PositionEncoding};
use crate::documents::{CellText, Edit, NotebookChange};
use crate::notebooks::Cell;
use crate::settings::CompletionMode;

/// What the client declared at `initialize` that the server acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFacts {
    pub encoding: PositionEncoding,
    /// It declares `textDocument/inlineCompletion`.
    pub inline: bool,
    /// It takes `window/workDoneProgress`.
    pub work_done_progress: bool,
    /// It declared `experimental.phiLsp.suggestionGrowth`: it wants [`SuggestionGrew`].
    pub growth: bool,
    /// It shows a completion item's `labelDetails` (`completionItem.labelDetailsSupport`).
    pub label_details: bool,
}

impl ClientFacts {
    pub fn of(capabilities: &ClientCapabilities) -> Self {
        ClientFacts {
            encoding: negotiate_encoding(capabilities),
            inline: capabilities
                .text_document
                .as_ref()
                .and_then(|t| t.inline_completion.as_ref())
                .is_some(),
            work_done_progress: capabilities
                .window
                .as_ref()
                .and_then(|w| w.work_done_progress)
                .unwrap_or(false),
            growth: capabilities
                .experimental
                .as_ref()
                .and_then(|e| e.pointer("/phiLsp/suggestionGrowth"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            label_details: capabilities
                .text_document
                .as_ref()
                .and_then(|t| t.completion.as_ref())
                .and_then(|c| c.completion_item.as_ref())
                .and_then(|i| i.label_details_support)
                .unwrap_or(false),
        }
    }
}

/// `phi-lsp/suggestionGrew`, server to client: the suggestion answered at `position` of the
/// document at `version` grew to `text` (the whole suggestion so far, exactly what a new request
/// there would answer now); `done`: the generation ended, no more will come for it. Sent only to
/// clients that declared `experimental.phiLsp.suggestionGrowth`.
pub enum SuggestionGrew {}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuggestionGrewParams {
    pub text_document: VersionedTextDocumentIdentifier,
    pub position: Position,
    pub text: String,
    pub done: bool,
}

impl notification::Notification for SuggestionGrew {
    type Params = SuggestionGrewParams;
    const METHOD: &'static str = "phi-lsp/suggestionGrew";
}

/// The notification for `grew`, or `None` when its key is not a URI.
pub fn suggestion_grew(grew: &Grew) -> Option<SuggestionGrewParams> {
    let uri = grew.key.parse::<Uri>().ok()?;
    Some(SuggestionGrewParams {
        text_document: VersionedTextDocumentIdentifier {
            uri,
            version: grew.place.version,
        },
        position: Position::new(grew.place.line, grew.place.character),
        text: grew.text.clone(),
        done: grew.done,
    })
}

/// Incremental sync, and inline completion and/or the menu as `mode` says for this client.
/// The workspace roots the client named at `initialize`, as URI strings: its workspace folders,
/// else its `rootUri`; none when it named neither.
pub fn roots(params: &InitializeParams) -> Vec<String> {
    if let Some(folders) = &params.workspace_folders {
        return folders.iter().map(|f| f.uri.as_str().to_string()).collect();
    }
    #[allow(deprecated)]
    let root = params.root_uri.as_ref();
    root.map(|uri| uri.as_str().to_string()).into_iter().collect()
}

pub fn capabilities(facts: ClientFacts, mode: CompletionMode) -> ServerCapabilities {
    let (inline, menu) = mode.providers(facts.inline);
    ServerCapabilities {
        position_encoding: Some(lsp_encoding(facts.encoding)),
        text_document_sync: Some(TextDocumentSyncCapability::Options(TextDocumentSyncOptions {
            open_close: Some(true),
            change: Some(TextDocumentSyncKind::INCREMENTAL),
            ..Default::default()
        })),
        // Jupyter notebooks (VS Code): their Python cells, in order, so a cell's prompt can start
        // with the earlier cells (`notebooks.rs`).
        notebook_document_sync: Some(OneOf::Left(NotebookDocumentSyncOptions {
            notebook_selector: vec![NotebookSelector::ByNotebook {
                notebook: Notebook::String("*".into()),
                cells: Some(vec![NotebookCellSelector {
                    language: "python".into(),
                }]),
            }],
            save: None,
        })),
        inline_completion_provider: inline.then_some(OneOf::Left(true)),
        completion_provider: menu.then(|| CompletionOptions {
            trigger_characters: Some([".", "(", "[", ",", ":", "="].map(String::from).to_vec()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn lsp_encoding(encoding: PositionEncoding) -> PositionEncodingKind {
    match encoding {
        PositionEncoding::Utf8 => PositionEncodingKind::UTF8,
        PositionEncoding::Utf16 => PositionEncodingKind::UTF16,
        PositionEncoding::Utf32 => PositionEncodingKind::UTF32,
    }
}

/// utf-8 where the client offers it (no conversion cost), else utf-16, which every client supports.
fn negotiate_encoding(capabilities: &ClientCapabilities) -> PositionEncoding {
    let offered = capabilities
        .general
        .as_ref()
        .and_then(|g| g.position_encodings.clone())
        .unwrap_or_default();
    if offered.contains(&PositionEncodingKind::UTF8) {
        PositionEncoding::Utf8
    } else if offered.is_empty() || offered.contains(&PositionEncodingKind::UTF16) {
        PositionEncoding::Utf16
    } else if offered.contains(&PositionEncodingKind::UTF32) {
        PositionEncoding::Utf32
    } else {
        PositionEncoding::Utf16
    }
}

pub fn pos(position: Position) -> convert::Pos {
    convert::Pos::new(position.line, position.character)
}

pub fn edits(changes: Vec<TextDocumentContentChangeEvent>) -> Vec<Edit> {
    changes
        .into_iter()
        .map(|change| Edit {
            range: change.range.map(|r| (pos(r.start), pos(r.end))),
            text: change.text,
        })
        .collect()
}

/// A notebook's cells as `notebooks.rs` keeps them.
pub fn cells(cells: &[NotebookCell]) -> Vec<Cell> {
    (cells.iter())
        .map(|cell| Cell {
            uri: cell.document.as_str().to_string(),
            code: cell.kind == NotebookCellKind::CODE,
        })
        .collect()
}

pub fn cell_texts(items: Vec<TextDocumentItem>) -> Vec<CellText> {
    (items.into_iter())
        .map(|item| CellText {
            uri: item.uri.as_str().to_string(),
            text: item.text,
            version: item.version,
            language_id: item.language_id,
        })
        .collect()
}

/// A `notebookDocument/didChange`'s cell changes in plain types (its metadata is not read).
pub fn notebook_change(change: NotebookDocumentChangeEvent) -> NotebookChange {
    let Some(cells) = change.cells else {
        return NotebookChange::default();
    };
    let mut out = NotebookChange::default();
    if let Some(structure) = cells.structure {
        let array = structure.array;
        out.splice = Some((
            array.start as usize,
            array.delete_count as usize,
            self::cells(&array.cells.unwrap_or_default()),
        ));
        out.opened = cell_texts(structure.did_open.unwrap_or_default());
        out.closed = (structure.did_close.unwrap_or_default().into_iter())
            .map(|doc| doc.uri.as_str().to_string())
            .collect();
    }
    out.kinds = self::cells(&cells.data.unwrap_or_default());
    out.text = (cells.text_content.unwrap_or_default().into_iter())
        .map(|content| {
            let doc = content.document;
            (doc.uri.as_str().to_string(), doc.version, edits(content.changes))
        })
        .collect();
    out
}

/// A suggestion and where it goes: `text` is inserted at char `cursor` of `rope`, the document as
/// the request saw it.
pub struct Suggestion {
    pub rope: Rope,
    pub cursor: usize,
    pub text: String,
    /// The alternatives offered after `text` (an explicit inline request's), in order.
    pub more: Vec<String>,
}

/// The suggestion as ghost text at `position`.
/// How an inline request was made: `Invoked` (1) is the user asking, `Automatic` (2) the client.
pub fn inline_trigger(context: &InlineCompletionContext) -> Trigger {
    if context.trigger_kind == InlineCompletionTriggerKind::INVOKED {
        Trigger::Invoked
    } else {
        Trigger::Automatic
    }
}

/// How a menu request was made: `Invoked` (1, or no context) is the user asking; a trigger
/// character (2) or re-asking for an incomplete list as the user types (3) is the client.
pub fn menu_trigger(context: Option<&CompletionContext>) -> Trigger {
    match context.map(|c| c.trigger_kind) {
        None | Some(CompletionTriggerKind::INVOKED) => Trigger::Invoked,
        Some(_) => Trigger::Automatic,
    }
}

pub fn inline_response(suggestion: Option<Suggestion>, position: Position) -> InlineCompletionResponse {
    let texts: Vec<String> = suggestion
        .map(|suggestion| std::iter::once(suggestion.text).chain(suggestion.more).collect())
        .unwrap_or_default();
    let items = texts.into_iter().map(|text| InlineCompletionItem {
        insert_text: text,
        filter_text: None,
        range: Some(Range::new(position, position)),
        command: None,
        insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
    });
    InlineCompletionResponse::Array(items.collect())
}

/// The suggestion as one menu item at the client's `position`. It replaces from the start of the
/// word being typed, so the client's filter keeps the item.
pub fn completion_response(
    suggestion: Option<Suggestion>,
    position: Position,
    client: ClientFacts,
) -> CompletionResponse {
    let items = suggestion.map(|s| menu_item(&s.rope, s.cursor, &s.text, position, client));
    CompletionResponse::List(CompletionList {
        is_incomplete: true,
        items: items.into_iter().collect(),
    })
}

/// The longest label of a menu item, in characters (then `…`): menus are as wide as their longest
/// label, and on a long first line the marker and the kind column fell off the screen.
pub const MENU_LABEL_CHARS: usize = 40;

/// What marks the item as phi-lsp's: its `labelDetails.description`, or the start of its label for
/// clients that do not show `labelDetails` (Helix).
pub const MENU_MARKER: &str = "(phi-1)";

/// A menu item's label: the first non-blank line of `text`, trimmed, cut at [`MENU_LABEL_CHARS`].
pub fn menu_label(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    match line.char_indices().nth(MENU_LABEL_CHARS) {
        Some((cut, _)) => format!("{}…", line[..cut].trim_end()),
        None => line.to_string(),
    }
}

fn menu_item(
    rope: &Rope,
    cursor: usize,
    text: &str,
    position: Position,
    client: ClientFacts,
) -> CompletionItem {
    let encoding = client.encoding;
    let line_start = rope.line_to_char(rope.char_to_line(cursor));
    let prefix: String = rope.slice(line_start..cursor).chars().collect();
    let range_start = line_start + word_start(&prefix);
    let word = rope.slice(range_start..cursor).to_string();
    let start = convert::char_to_pos(rope, range_start, encoding);
    let new_text = format!("{word}{text}");
    let short = menu_label(&new_text);
    let (label, label_details) = if client.label_details {
        let details = CompletionItemLabelDetails {
            detail: None,
            description: Some(MENU_MARKER.into()),
        };
        (short, Some(details))
    } else {
        (format!("{MENU_MARKER} {short}"), None)
    };
    CompletionItem {
        label,
        label_details,
        kind: Some(CompletionItemKind::TEXT),
        detail: Some("Phi-1 suggestion".into()),
        documentation: Some(Documentation::MarkupContent(MarkupContent {
            kind: MarkupKind::Markdown,
            value: format!("```python\n{new_text}\n```"),
        })),
        filter_text: Some(new_text.clone()),
        sort_text: Some("0".into()),
        preselect: Some(true),
        insert_text_format: Some(InsertTextFormat::PLAIN_TEXT),
        text_edit: Some(CompletionTextEdit::Edit(TextEdit {
            range: Range::new(Position::new(start.line, start.character), position),
            new_text,
        })),
        ..Default::default()
    }
}

/// The identifier characters just before the cursor: a completion item's range starts there so that
/// menu clients (which filter by the word being typed) keep the item.
fn word_start(line_prefix: &str) -> usize {
    let word_chars = line_prefix
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .count();
    line_prefix.chars().count() - word_chars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_labels_are_the_first_line_trimmed_and_cut() {
        assert_eq!(menu_label("\n    return a + b\n"), "return a + b");
        let long = format!("    total = {}\n", "value + ".repeat(20));
        let label = menu_label(&long);
        assert!(label.chars().count() <= MENU_LABEL_CHARS + 1, "{label}");
        assert!(
            label.starts_with("total = value + ") && label.ends_with('…'),
            "{label}"
        );
        // Cut at a character, not a byte, and without a space before the ellipsis.
        let accents = "é".repeat(MENU_LABEL_CHARS + 5);
        assert_eq!(menu_label(&accents), format!("{}…", "é".repeat(MENU_LABEL_CHARS)));
        assert_eq!(
            menu_label(&format!("{} b", "a".repeat(MENU_LABEL_CHARS - 1))),
            format!("{}…", "a".repeat(MENU_LABEL_CHARS - 1))
        );
        assert_eq!(menu_label(""), "");
    }

    #[test]
    fn the_marker_goes_in_label_details_or_first() {
        let rope = Rope::from_str("def f():\n    ret");
        let cursor = rope.len_chars();
        let facts = |label_details| ClientFacts {
            encoding: PositionEncoding::Utf8,
            inline: false,
            work_done_progress: false,
            growth: false,
            label_details,
        };
        let at = Position::new(1, 7);
        let item = menu_item(&rope, cursor, "urn 1", at, facts(false));
        assert_eq!(item.label, "(phi-1) return 1");
        assert_eq!(item.label_details, None);
        let item = menu_item(&rope, cursor, "urn 1", at, facts(true));
        assert_eq!(item.label, "return 1");
        assert_eq!(
            item.label_details.and_then(|d| d.description).as_deref(),
            Some("(phi-1)")
        );
    }

    #[test]
    fn word_start_finds_the_identifier_being_typed() {
        assert_eq!(word_start("    return fo"), 11);
        assert_eq!(word_start("x = "), 4);
        assert_eq!(word_start(""), 0);
        assert_eq!(word_start("é_1"), 0);
    }

    #[test]
    fn encoding_prefers_utf8_then_utf16() {
        let offer = |kinds: Vec<PositionEncodingKind>| ClientCapabilities {
            general: Some(GeneralClientCapabilities {
                position_encodings: Some(kinds),
                ..Default::default()
            }),
            ..Default::default()
        };
        use PositionEncodingKind as K;
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF16, K::UTF8])),
            PositionEncoding::Utf8
        );
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF32, K::UTF16])),
            PositionEncoding::Utf16
        );
        assert_eq!(
            negotiate_encoding(&offer(vec![K::UTF32])),
            PositionEncoding::Utf32
        );
        assert_eq!(
            negotiate_encoding(&ClientCapabilities::default()),
            PositionEncoding::Utf16
        );
    }

    #[test]
    fn growth_is_what_the_client_declared() {
        let declared = |experimental: Option<serde_json::Value>| {
            ClientFacts::of(&ClientCapabilities {
                experimental,
                ..Default::default()
            })
            .growth
        };
        assert!(declared(Some(
            serde_json::json!({"phiLsp": {"suggestionGrowth": true}})
        )));
        assert!(!declared(Some(
            serde_json::json!({"phiLsp": {"suggestionGrowth": false}})
        )));
        assert!(!declared(Some(serde_json::json!({"phiLsp": true}))));
        assert!(!declared(None));
    }

    #[test]
    fn capabilities_follow_the_mode_and_the_client() {
        let facts = |inline| ClientFacts {
            encoding: PositionEncoding::Utf8,
            inline,
            work_done_progress: false,
            growth: false,
            label_details: false,
        };
        let offered = |caps: ServerCapabilities| {
            (
                caps.inline_completion_provider.is_some(),
                caps.completion_provider.is_some(),
            )
        };
        assert_eq!(
            offered(capabilities(facts(true), CompletionMode::Auto)),
            (true, false)
        );
        assert_eq!(
            offered(capabilities(facts(false), CompletionMode::Auto)),
            (false, true)
        );
        assert_eq!(
            offered(capabilities(facts(false), CompletionMode::Both)),
            (true, true)
        );
        assert_eq!(
            offered(capabilities(facts(true), CompletionMode::Menu)),
            (false, true)
        );
    }
}
