//! The open documents: one rope per URI, its version, and incremental edits applied all-or-nothing,
//! so a bad `didChange` leaves the server's copy exactly as it was; and the open notebooks, whose
//! cells are documents here too, so that a cell's prompt starts with the notebook's earlier cells.

use std::collections::HashMap;
use std::fmt;

use ropey::Rope;

use crate::completion::OpenDocument;
use crate::convert::{pos_to_char, Pos, PositionEncoding, PositionError};
use crate::notebooks::{Cell, NotebookError, Notebooks};

#[derive(Debug, Clone)]
pub struct Document {
    pub rope: Rope,
    pub version: i32,
    pub language_id: String,
}

/// One content change. Its range refers to the document as the previous edit of the same change
/// left it (LSP applies a change's edits in order).
#[derive(Debug, Clone)]
pub struct Edit {
    /// `None` replaces the whole text (full sync).
    pub range: Option<(Pos, Pos)>,
    pub text: String,
}

/// A cell's text document as a notebook's `didOpen` or `didChange` opens it.
#[derive(Debug, Clone)]
pub struct CellText {
    pub uri: String,
    pub text: String,
    pub version: i32,
    pub language_id: String,
}

/// One `notebookDocument/didChange` in plain types: the cells replaced (start, how many, the new
/// ones), the cell documents it opens and closes, the cells whose kind changed, and the cells'
/// text edits (URI, version, edits as `textDocument/didChange` carries them).
#[derive(Debug, Default)]
pub struct NotebookChange {
    pub splice: Option<(usize, usize, Vec<Cell>)>,
    pub opened: Vec<CellText>,
    pub closed: Vec<String>,
    pub kinds: Vec<Cell>,
    pub text: Vec<(String, i32, Vec<Edit>)>,
}

/// What a notebook change did: the problems (each already applied part stays), the cells whose
/// documents closed, and every cell of the notebook with the text its prompt now reads.
#[derive(Debug, Default)]
pub struct NotebookChanged {
    pub problems: Vec<String>,
    pub closed: Vec<String>,
    pub prompts: Vec<(String, Rope)>,
}

#[derive(Debug)]
pub enum DocumentError {
    UnknownDocument(String),
    StaleVersion {
        uri: String,
        have: i32,
        got: i32,
    },
    Position(PositionError),
    InvertedRange {
        start: Pos,
        end: Pos,
    },
    TooLarge {
        uri: String,
        n_bytes: usize,
        max_bytes: usize,
    },
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocumentError::UnknownDocument(uri) => {
                write!(
                    f,
                    "{uri} is not open: send textDocument/didOpen before changing or querying it"
                )
            }
            DocumentError::StaleVersion { uri, have, got } => write!(
                f,
                "version {got} of {uri} is not newer than the version {have} the server has: \
                 versions must increase with every change"
            ),
            DocumentError::Position(err) => write!(f, "edit range: {err}"),
            DocumentError::InvertedRange { start, end } => {
                write!(
                    f,
                    "edit range starts at {start}, after its end {end}: the start must come first"
                )
            }
            DocumentError::TooLarge {
                uri,
                n_bytes,
                max_bytes,
            } => write!(
                f,
                "{uri} would be {n_bytes} bytes, over the {max_bytes}-byte limit for documents: \
                 the server ignores it (raise the limit to complete in it)"
            ),
        }
    }
}

impl std::error::Error for DocumentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DocumentError::Position(err) => Some(err),
            _ => None,
        }
    }
}

impl From<PositionError> for DocumentError {
    fn from(err: PositionError) -> Self {
        DocumentError::Position(err)
    }
}

/// The open documents, keyed by the URI string as the client sent it.
pub struct Documents {
    by_uri: HashMap<String, Document>,
    max_bytes: usize,
    /// The open notebooks' cell order (their cells' text is in `by_uri`).
    pub notebooks: Notebooks,
}

impl Documents {
    /// A document larger than `max_bytes`, when opened or after any edit, is refused with `TooLarge`.
    pub fn new(max_bytes: usize) -> Self {
        Documents {
            by_uri: HashMap::new(),
            max_bytes,
            notebooks: Notebooks::default(),
        }
    }

    /// Opens `uri`, replacing any document already open under it (whatever its version).
    pub fn open(
        &mut self,
        uri: &str,
        text: &str,
        version: i32,
        language_id: &str,
    ) -> Result<(), DocumentError> {
        self.check_size(uri, text.len())?;
        let document = Document {
            rope: Rope::from_str(text),
            version,
            language_id: language_id.to_string(),
        };
        self.by_uri.insert(uri.to_string(), document);
        Ok(())
    }

    /// Applies `edits` in order and moves the document to `version`. All or nothing: on any error
    /// the document keeps its text and version.
    pub fn change(
        &mut self,
        uri: &str,
        version: i32,
        edits: &[Edit],
        enc: PositionEncoding,
    ) -> Result<(), DocumentError> {
        let max_bytes = self.max_bytes;
        let document = self
            .by_uri
            .get_mut(uri)
            .ok_or_else(|| DocumentError::UnknownDocument(uri.to_string()))?;
        if version <= document.version {
            return Err(DocumentError::StaleVersion {
                uri: uri.to_string(),
                have: document.version,
                got: version,
            });
        }
        // Cloning a rope is O(1) (its nodes are shared and copied on write), so editing a copy and
        // swapping it in is what makes the change all-or-nothing.
        let mut rope = document.rope.clone();
        for edit in edits {
            apply(&mut rope, edit, enc)?;
            if rope.len_bytes() > max_bytes {
                return Err(DocumentError::TooLarge {
                    uri: uri.to_string(),
                    n_bytes: rope.len_bytes(),
                    max_bytes,
                });
            }
        }
        document.rope = rope;
        document.version = version;
        Ok(())
    }

    /// Forgets `uri`; false if it was not open.
    pub fn close(&mut self, uri: &str) -> bool {
        self.by_uri.remove(uri).is_some()
    }

    pub fn get(&self, uri: &str) -> Option<&Document> {
        self.by_uri.get(uri)
    }

    /// Opens notebook `uri` with `cells` in order and the cells' documents; the problems of cells
    /// that could not be opened (too large), each named.
    pub fn open_notebook(&mut self, uri: &str, cells: Vec<Cell>, texts: &[CellText]) -> Vec<String> {
        let problems = (texts.iter())
            .filter_map(|cell| {
                let opened = self.open(&cell.uri, &cell.text, cell.version, &cell.language_id);
                opened.err().map(|e| e.to_string())
            })
            .collect();
        self.notebooks.open(uri, cells);
        problems
    }

    /// Applies one notebook change in LSP's order: cell documents opened, the cells replaced, cell
    /// documents closed, kinds, then text edits. Each part is all-or-nothing on its own (a
    /// structure change past the end leaves the cells, an edit out of range its cell), and a
    /// problem in one does not stop the others.
    pub fn change_notebook(
        &mut self,
        uri: &str,
        change: NotebookChange,
        enc: PositionEncoding,
    ) -> NotebookChanged {
        let mut out = NotebookChanged::default();
        if !self.notebooks.contains(uri) {
            out.problems
                .push(NotebookError::Unknown(uri.to_string()).to_string());
            return out;
        }
        for cell in &change.opened {
            if let Err(e) = self.open(&cell.uri, &cell.text, cell.version, &cell.language_id) {
                out.problems.push(e.to_string());
            }
        }
        if let Some((start, delete, cells)) = change.splice {
            if let Err(e) = self.notebooks.splice(uri, start, delete, cells) {
                out.problems.push(e.to_string());
            }
        }
        for cell in change.closed {
            self.close(&cell);
            out.closed.push(cell);
        }
        if !change.kinds.is_empty() {
            if let Err(e) = self.notebooks.set_kinds(uri, &change.kinds) {
                out.problems.push(e.to_string());
            }
        }
        for (cell, version, edits) in &change.text {
            if let Err(e) = self.change(cell, *version, edits, enc) {
                out.problems.push(e.to_string());
            }
        }
        let cells: Vec<String> = (self.notebooks.cells(uri).iter())
            .map(|cell| cell.uri.clone())
            .collect();
        out.prompts = (cells.into_iter())
            .filter_map(|cell| Some((cell.clone(), self.prompt_text(&cell)?.0)))
            .collect();
        out
    }

    /// Closes notebook `uri` and its cells' documents (those it has and `also`, the ones the client
    /// names); the cells closed. An unknown notebook closes only `also`, as closing an unknown
    /// document does nothing.
    pub fn close_notebook(&mut self, uri: &str, also: Vec<String>) -> Vec<String> {
        let mut closed: Vec<String> = (self.notebooks.close(uri).unwrap_or_default().into_iter())
            .map(|cell| cell.uri)
            .collect();
        for cell in also {
            if !closed.contains(&cell) {
                closed.push(cell);
            }
        }
        for cell in &closed {
            self.close(cell);
        }
        closed
    }

    /// The text a completion in `uri` reads, and the char where `uri`'s own text starts in it: the
    /// document itself (at 0), or for a notebook cell the notebook's earlier code cells first, each
    /// followed by one blank line (cells not open as documents are skipped). Joining shares the
    /// cells' ropes (O(cells · log size)), so the earlier cells cost nothing per keystroke.
    pub fn prompt_text(&self, uri: &str) -> Option<(Rope, usize)> {
        let own = self.by_uri.get(uri)?.rope.clone();
        let Some(earlier) = self.notebooks.preceding(uri) else {
            return Some((own, 0));
        };
        let mut text = Rope::new();
        for cell in earlier.iter().filter_map(|cell| self.by_uri.get(*cell)) {
            if cell.rope.len_chars() == 0 {
                continue;
            }
            text.append(cell.rope.clone());
            let ends_line = cell.rope.char(cell.rope.len_chars() - 1) == '\n';
            text.append(Rope::from_str(if ends_line { "\n" } else { "\n\n" }));
        }
        let offset = text.len_chars();
        text.append(own);
        Some((text, offset))
    }

    /// The open documents other than `uri`, for a completion in `uri` to read what they define
    /// without holding the store's lock (a rope's clone shares its text: O(1)).
    pub fn others(&self, uri: &str) -> Vec<OpenDocument> {
        (self.by_uri.iter())
            .filter(|(other, _)| *other != uri)
            .map(|(other, doc)| OpenDocument {
                uri: other.clone(),
                rope: doc.rope.clone(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_uri.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uri.is_empty()
    }

    fn check_size(&self, uri: &str, n_bytes: usize) -> Result<(), DocumentError> {
        if n_bytes > self.max_bytes {
            return Err(DocumentError::TooLarge {
                uri: uri.to_string(),
                n_bytes,
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }
}

fn apply(rope: &mut Rope, edit: &Edit, enc: PositionEncoding) -> Result<(), DocumentError> {
    let Some((start, end)) = edit.range else {
        *rope = Rope::from_str(&edit.text);
        return Ok(());
    };
    if start > end {
        return Err(DocumentError::InvertedRange { start, end });
    }
    // Conversion is monotonic, so start <= end as positions gives start_char <= end_char.
    let start_char = pos_to_char(rope, start, enc)?;
    let end_char = pos_to_char(rope, end, enc)?;
    rope.remove(start_char..end_char);
    rope.insert(start_char, &edit.text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::PositionEncoding::{Utf16, Utf32, Utf8};

    const URI: &str = "file:///t.py";

    fn docs_with(text: &str) -> Documents {
        let mut docs = Documents::new(1 << 20);
        docs.open(URI, text, 1, "python").expect("open");
        docs
    }

    fn text(docs: &Documents) -> String {
        docs.get(URI).expect("document is open").rope.to_string()
    }

    fn version(docs: &Documents) -> i32 {
        docs.get(URI).expect("document is open").version
    }

    fn edit(start: (u32, u32), end: (u32, u32), text: &str) -> Edit {
        Edit {
            range: Some((Pos::new(start.0, start.1), Pos::new(end.0, end.1))),
            text: text.to_string(),
        }
    }

    fn full(text: &str) -> Edit {
        Edit {
            range: None,
            text: text.to_string(),
        }
    }

    #[test]
    fn open_get_close() {
        let mut docs = Documents::new(100);
        assert!(docs.is_empty());
        docs.open(URI, "x = 1\n", 3, "python").expect("open");
        assert_eq!(docs.len(), 1);
        let doc = docs.get(URI).expect("open");
        assert_eq!(
            (
                doc.rope.to_string().as_str(),
                doc.version,
                doc.language_id.as_str()
            ),
            ("x = 1\n", 3, "python")
        );
        // Re-opening replaces, even with a lower version.
        docs.open(URI, "y", 1, "python").expect("reopen");
        assert_eq!((text(&docs).as_str(), version(&docs)), ("y", 1));
        docs.open("file:///u.py", "import t\n", 1, "python")
            .expect("open");
        let others = docs.others(URI);
        assert_eq!(others.len(), 1);
        assert_eq!(
            (others[0].uri.as_str(), others[0].rope.to_string().as_str()),
            ("file:///u.py", "import t\n")
        );
        assert!(docs.close(URI));
        assert!(!docs.close(URI));
        assert!(docs.get(URI).is_none());
    }

    #[test]
    fn a_cell_reads_the_earlier_code_cells_first() {
        use crate::notebooks::Cell;
        let mut docs = Documents::new(1 << 20);
        let cell = |uri: &str, code| Cell {
            uri: uri.to_string(),
            code,
        };
        for (uri, text) in [
            ("c0", "import math"),
            ("m1", "# Areas"),
            ("c2", "R = 2\n"),
            ("c3", ""),
            ("c4", "def area(r):\n    "),
        ] {
            docs.open(uri, text, 1, "python").expect("open");
        }
        let cells = vec![
            cell("c0", true),
            cell("m1", false),
            cell("c2", true),
            cell("c3", true),
            cell("gone", true),
            cell("c4", true),
        ];
        docs.notebooks.open("file:///n.ipynb", cells);
        let (text, offset) = docs.prompt_text("c4").expect("open");
        // The markup cell, the empty cell and the cell that is not open are left out; each cell
        // ends its line and is followed by one blank line.
        let joined = "import math\n\nR = 2\n\n";
        assert_eq!(text.to_string(), format!("{joined}def area(r):\n    "));
        assert_eq!(offset, joined.chars().count());
        let (text, offset) = docs.prompt_text("c0").expect("open");
        assert_eq!((text.to_string().as_str(), offset), ("import math", 0));
        // A plain document is itself.
        docs.open(URI, "x = 1\n", 1, "python").expect("open");
        let (text, offset) = docs.prompt_text(URI).expect("open");
        assert_eq!((text.to_string().as_str(), offset), ("x = 1\n", 0));
        assert!(docs.prompt_text("file:///unknown.py").is_none());
    }

    #[test]
    fn typing_char_by_char() {
        let mut docs = docs_with("def f():\n    \n");
        let typed = "return 42";
        for (i, ch) in typed.chars().enumerate() {
            let col = 4 + i as u32;
            docs.change(
                URI,
                2 + i as i32,
                &[edit((1, col), (1, col), &ch.to_string())],
                Utf16,
            )
            .expect("type");
        }
        assert_eq!(text(&docs), "def f():\n    return 42\n");
        assert_eq!(version(&docs), 1 + typed.len() as i32);
    }

    #[test]
    fn typing_a_newline_then_more() {
        let mut docs = docs_with("x = 1");
        docs.change(URI, 2, &[edit((0, 5), (0, 5), "\n")], Utf16)
            .expect("newline");
        docs.change(URI, 3, &[edit((1, 0), (1, 0), "y")], Utf16)
            .expect("type on the new line");
        assert_eq!(text(&docs), "x = 1\ny");
    }

    #[test]
    fn deleting() {
        let mut docs = docs_with("abc\ndef\nghi");
        docs.change(URI, 2, &[edit((0, 2), (0, 3), "")], Utf8)
            .expect("backspace");
        assert_eq!(text(&docs), "ab\ndef\nghi");
        docs.change(URI, 3, &[edit((0, 2), (1, 0), "")], Utf8)
            .expect("join lines");
        assert_eq!(text(&docs), "abdef\nghi");
        docs.change(URI, 4, &[edit((0, 0), (1, 3), "")], Utf8)
            .expect("delete to the end");
        assert_eq!(text(&docs), "");
    }

    #[test]
    fn multi_edit_change_applies_in_order() {
        let mut docs = docs_with("one\ntwo\nthree\n");
        // The second range refers to the text after the first edit (line 0 is now "1\n2").
        let edits = [
            edit((0, 0), (0, 3), "1\n2"),
            edit((2, 0), (2, 3), "II"),
            edit((4, 0), (4, 0), "end"),
        ];
        docs.change(URI, 2, &edits, Utf16).expect("change");
        assert_eq!(text(&docs), "1\n2\nII\nthree\nend");
    }

    #[test]
    fn crlf_document() {
        let mut docs = docs_with("a = 1\r\nb = 2\r\n");
        // Characters past the line end clamp before the \r\n, so this appends to line 0.
        docs.change(URI, 2, &[edit((0, 99), (0, 99), "0")], Utf16)
            .expect("append");
        assert_eq!(text(&docs), "a = 10\r\nb = 2\r\n");
        docs.change(URI, 3, &[edit((1, 0), (2, 0), "")], Utf16)
            .expect("delete line 1 with its CRLF");
        assert_eq!(text(&docs), "a = 10\r\n");
        docs.change(URI, 4, &[edit((1, 0), (1, 0), "c = 3")], Utf16)
            .expect("type on the last line");
        assert_eq!(text(&docs), "a = 10\r\nc = 3");
    }

    #[test]
    fn emoji_with_utf16_positions() {
        let mut docs = docs_with("s = '😀😀'\n");
        // The second emoji starts at UTF-16 column 7 (each emoji is two units).
        docs.change(URI, 2, &[edit((0, 7), (0, 9), "🎉")], Utf16)
            .expect("replace the second emoji");
        assert_eq!(text(&docs), "s = '😀🎉'\n");
        docs.change(URI, 3, &[edit((0, 5), (0, 5), "x")], Utf16)
            .expect("insert before the emoji");
        assert_eq!(text(&docs), "s = 'x😀🎉'\n");
        // The same in UTF-8 (4 bytes per emoji) and UTF-32.
        docs.change(URI, 4, &[edit((0, 6), (0, 10), "")], Utf8)
            .expect("delete the first emoji by bytes");
        assert_eq!(text(&docs), "s = 'x🎉'\n");
        docs.change(URI, 5, &[edit((0, 6), (0, 7), "!")], Utf32)
            .expect("replace by chars");
        assert_eq!(text(&docs), "s = 'x!'\n");
    }

    #[test]
    fn edit_at_the_very_end() {
        let mut docs = docs_with("x\n");
        docs.change(URI, 2, &[edit((1, 0), (1, 0), "y")], Utf16)
            .expect("after the trailing newline");
        assert_eq!(text(&docs), "x\ny");
        docs.change(URI, 3, &[edit((1, 1), (1, 1), "z\n")], Utf16)
            .expect("at the end of the last line");
        assert_eq!(text(&docs), "x\nyz\n");
        let mut empty = docs_with("");
        empty
            .change(URI, 2, &[edit((0, 0), (0, 0), "hello")], Utf8)
            .expect("into an empty document");
        assert_eq!(text(&empty), "hello");
    }

    #[test]
    fn full_replacement() {
        let mut docs = docs_with("old");
        docs.change(URI, 2, &[full("new\ntext")], Utf16)
            .expect("full sync");
        assert_eq!(text(&docs), "new\ntext");
        // A full replacement followed by a range edit on the new text.
        docs.change(URI, 3, &[full("abc"), edit((0, 1), (0, 2), "B")], Utf16)
            .expect("mixed");
        assert_eq!(text(&docs), "aBc");
    }

    #[test]
    fn errors_leave_the_document_unchanged() {
        let original = "a = 1\nb = 2\n";
        type IsExpected = fn(&DocumentError) -> bool;
        let cases: Vec<(&str, i32, Vec<Edit>, IsExpected)> = vec![
            ("stale version", 1, vec![edit((0, 0), (0, 0), "x")], |e| {
                matches!(e, DocumentError::StaleVersion { have: 1, got: 1, .. })
            }),
            ("older version", 0, vec![full("x")], |e| {
                matches!(e, DocumentError::StaleVersion { .. })
            }),
            ("line past the end", 2, vec![edit((3, 0), (3, 0), "x")], |e| {
                matches!(
                    e,
                    DocumentError::Position(PositionError::LineOutOfRange { line: 3, n_lines: 3 })
                )
            }),
            ("inverted range", 2, vec![edit((1, 2), (0, 4), "x")], |e| {
                matches!(e, DocumentError::InvertedRange { .. })
            }),
            ("inverted on one line", 2, vec![edit((0, 3), (0, 1), "")], |e| {
                matches!(e, DocumentError::InvertedRange { .. })
            }),
            (
                "a later edit fails",
                2,
                vec![edit((0, 0), (0, 0), "ok "), edit((9, 0), (9, 0), "x")],
                |e| matches!(e, DocumentError::Position(_)),
            ),
            ("too large", 2, vec![edit((0, 0), (0, 0), &"x".repeat(64))], |e| {
                matches!(e, DocumentError::TooLarge { max_bytes: 64, .. })
            }),
            (
                "too large after a full replacement",
                2,
                vec![full(&"y".repeat(65))],
                |e| matches!(e, DocumentError::TooLarge { n_bytes: 65, .. }),
            ),
        ];
        for (name, new_version, edits, is_expected) in cases {
            let mut docs = Documents::new(64);
            docs.open(URI, original, 1, "python").expect("open");
            let err = docs.change(URI, new_version, &edits, Utf16).expect_err(name);
            assert!(is_expected(&err), "{name}: unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
            assert_eq!(text(&docs), original, "{name}: text changed");
            assert_eq!(version(&docs), 1, "{name}: version changed");
        }
    }

    #[test]
    fn unknown_document_and_too_large_open() {
        let mut docs = Documents::new(4);
        let err = docs
            .change("file:///nope.py", 2, &[full("x")], Utf16)
            .expect_err("not open");
        assert!(matches!(&err, DocumentError::UnknownDocument(uri) if uri == "file:///nope.py"));
        assert_eq!(
            err.to_string(),
            "file:///nope.py is not open: send textDocument/didOpen before changing or querying it"
        );
        let err = docs.open(URI, "12345", 1, "python").expect_err("over the limit");
        assert!(matches!(
            err,
            DocumentError::TooLarge {
                n_bytes: 5,
                max_bytes: 4,
                ..
            }
        ));
        assert!(docs.is_empty());
        docs.open(URI, "1234", 1, "python").expect("exactly at the limit");
    }
}
