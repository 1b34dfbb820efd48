//! The file's structure that the prompt window does not reach: the module's top-level imports and
//! the headers of the `class`/`def` scopes around the cursor that start above the window, so a
//! cursor deep in a long file still tells the model which names exist and where it is.
//!
//! [`header`] reads it from the document; `prompt.rs` puts it before the window and fits it.
//! It is plain Python (the statements as written, a blank line between the imports and the
//! scopes), and it depends only on the text above the window and the scopes the cursor is in, so
//! it stays the same while the user types in one scope: it is a prefix the KV cache keeps.

use ropey::Rope;

use super::lines::{first_code, indent_width, split_lines, Line};

/// At most this many chars above the window are read for the scopes, and at most this many from
/// the top of the file for the imports: work per keystroke stays bounded in huge documents.
pub const SCAN_CHARS: usize = 1_000_000;
/// The columns a tab counts for when comparing indentation, as Python's tokenizer counts them.
const TAB_WIDTH: usize = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The top-level `import` and `from` statements above the window, in file order, each whole
    /// (a parenthesized or backslash-continued one with all its lines), each ending in `\n`.
    pub imports: Vec<String>,
    /// The header of every `class`/`def` that encloses the cursor and starts above the window,
    /// outermost first: its decorators and its statement up to the `:` (a multi-line signature
    /// whole), ending in `\n`.
    pub scopes: Vec<String>,
}

impl Header {
    pub fn is_empty(&self) -> bool {
        self.imports.is_empty() && self.scopes.is_empty()
    }

    /// The text that goes before the window: the imports, a blank line, the scopes.
    pub fn text(&self) -> String {
        let mut text: String = self.imports.concat();
        if !self.imports.is_empty() && !self.scopes.is_empty() {
            text.push('\n');
        }
        text.push_str(&self.scopes.concat());
        text
    }

    /// Drops one part, for a smaller budget: the imports first (in file order), then the scopes,
    /// innermost first, so the outermost `class` line goes last. False when nothing was left.
    pub fn drop_one(&mut self) -> bool {
        if !self.imports.is_empty() {
            self.imports.remove(0);
            return true;
        }
        self.scopes.pop().is_some()
    }

    /// This header, less what [`Header::drop_one`] drops first, until `fits` its text.
    pub fn fitted(mut self, mut fits: impl FnMut(&str) -> bool) -> Header {
        while !self.is_empty() && !fits(&self.text()) {
            self.drop_one();
        }
        self
    }
}

/// The header for a window that starts at `window_start_char`, with the cursor at `cursor_char`.
/// Empty when the window starts at the top of the file.
///
/// The scopes: the `class`/`def` statements whose block is still open at the cursor. A statement
/// closes the blocks indented as deep as it or deeper; so does the cursor's line once there is code
/// before the cursor (while it is blank nothing is decided: typing a new line's indentation one
/// character at a time does not change the header). Only block openers count (`def f(): return 1`
/// encloses nothing), and only those that start above the window.
pub fn header(rope: &Rope, window_start_char: usize, cursor_char: usize) -> Header {
    let cursor_char = cursor_char.min(rope.len_chars());
    let window_start_char = window_start_char.min(cursor_char);
    if window_start_char == 0 {
        return Header::default();
    }
    let imports_end_char = window_start_char.min(SCAN_CHARS);
    let imports_text = rope.slice(..imports_end_char).to_string();
    let imports = import_statements(&split_lines(&imports_text))
        .into_iter()
        .map(|(_, statement)| statement)
        .collect();

    let scan_start_char = rope.line_to_char(rope.char_to_line(window_start_char.saturating_sub(SCAN_CHARS)));
    let text = rope.slice(scan_start_char..cursor_char).to_string();
    let window_byte = rope.char_to_byte(window_start_char) - rope.char_to_byte(scan_start_char);
    let scopes = open_scopes(&split_lines(&text))
        .into_iter()
        .filter(|scope| scope.start < window_byte)
        .map(|scope| scope.text)
        .collect();
    Header { imports, scopes }
}

/// The complete top-level import statements among `lines`, each with the index of its first line.
pub(crate) fn import_statements(lines: &[Line<'_>]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (line_idx, line) in lines.iter().enumerate() {
        let Some(code) = first_code(line.text).filter(|_| line.starts_statement) else {
            continue;
        };
        let top_level = !line.text.starts_with([' ', '\t']);
        if top_level && (keyword(code, "import") || keyword(code, "from")) {
            if let Some(statement) = statement(lines, line_idx, line_idx) {
                found.push((line_idx, statement));
            }
        }
    }
    found
}

/// `code` starts with the keyword `word` (followed by whitespace).
fn keyword(code: &str, word: &str) -> bool {
    code.strip_prefix(word)
        .is_some_and(|rest| rest.starts_with([' ', '\t']))
}

/// The text of the lines from `first` through the end of the statement that starts at `from`,
/// each ending in `\n`; None when that end is not among the terminated lines.
fn statement(lines: &[Line<'_>], first: usize, from: usize) -> Option<String> {
    let end = (from..lines.len()).find(|&idx| lines[idx].ends_statement)?;
    if !lines[end].terminated {
        return None;
    }
    Some(
        lines[first..=end]
            .iter()
            .map(|line| format!("{}\n", line.text))
            .collect(),
    )
}

struct Scope {
    indent: usize,
    /// Byte index of its first line (its first decorator's) in the scanned text.
    start: usize,
    text: String,
}

/// The `class`/`def` blocks still open at the end of `lines` (the cursor), outermost first.
fn open_scopes(lines: &[Line<'_>]) -> Vec<Scope> {
    let mut open: Vec<Scope> = Vec::new();
    // The first line of a run of decorators at this indentation, waiting for their definition.
    let mut decorators: Option<(usize, usize)> = None;
    for (line_idx, line) in lines.iter().enumerate() {
        if !line.starts_statement {
            continue;
        }
        let Some(code) = first_code(line.text) else {
            continue;
        };
        let indent = indent_width(line.text, TAB_WIDTH);
        while open.last().is_some_and(|scope| scope.indent >= indent) {
            open.pop();
        }
        if code.starts_with('@') {
            if decorators.is_none_or(|(at, _)| at != indent) {
                decorators = Some((indent, line_idx));
            }
            continue;
        }
        let first = match decorators.take() {
            Some((at, first)) if at == indent => first,
            _ => line_idx,
        };
        let defines = keyword(code, "def") || keyword(code, "class") || code.starts_with("async def ");
        if !defines {
            continue;
        }
        let Some(end) = (line_idx..lines.len()).find(|&idx| lines[idx].ends_statement) else {
            continue;
        };
        if !lines[end].opens_block {
            continue;
        }
        if let Some(text) = statement(lines, first, line_idx) {
            open.push(Scope {
                indent,
                start: lines[first].start,
                text,
            });
        }
    }
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a fixture at its `$0` cursor marker.
    fn fixture(text_with_cursor: &str) -> (Rope, usize) {
        let byte_idx = text_with_cursor.find("$0").expect("fixture has a $0 cursor");
        let rope = Rope::from_str(&text_with_cursor.replacen("$0", "", 1));
        let char_idx = rope.byte_to_char(byte_idx);
        (rope, char_idx)
    }

    /// The char index where `line` (0-based) starts.
    fn line_start(rope: &Rope, line: usize) -> usize {
        rope.line_to_char(line)
    }

    const MODULE: &str = "\"\"\"A module.\n\nimport not_this  (docstring text)\n\"\"\"\nfrom __future__ import annotations\n\nimport os\nfrom typing import (\n    Any,\n    Optional,\n)\nimport a, \\\n    b\n\nif TYPE_CHECKING:\n    import hidden\n\nCONSTANT = 1\n\n\n@dataclass\nclass Outer:\n    \"\"\"Doc.\"\"\"\n\n    x: int = 0\n\n    def before(self):\n        return 1\n\n    @property\n    @cache\n    def method(\n        self,\n        n: int,\n    ) -> int:\n        def one_liner(): return 2\n        class Inner:\n            def deep(self):\n                a = 1\n                b = 2\n                $0c = 3\n\n\ndef after():\n    pass\n";

    #[test]
    fn imports_and_enclosing_headers_in_file_order() {
        let (rope, cursor) = fixture(MODULE);
        // The window starts at `a = 1`, the line above the cursor's.
        let cursor_line = rope.char_to_line(cursor);
        let header = header(&rope, line_start(&rope, cursor_line - 1), cursor);
        assert_eq!(
            header.imports,
            [
                "from __future__ import annotations\n",
                "import os\n",
                "from typing import (\n    Any,\n    Optional,\n)\n",
                "import a, \\\n    b\n",
            ]
        );
        assert_eq!(
            header.scopes,
            [
                "@dataclass\nclass Outer:\n",
                "    @property\n    @cache\n    def method(\n        self,\n        n: int,\n    ) -> int:\n",
                "        class Inner:\n",
                "            def deep(self):\n",
            ]
        );
        let text = header.text();
        assert!(
            text.starts_with("from __future__ import annotations\nimport os\n"),
            "{text}"
        );
        assert!(text.contains("    b\n\n@dataclass\nclass Outer:\n"), "{text}");
        assert!(text.ends_with("            def deep(self):\n"), "{text}");
    }

    #[test]
    fn only_what_starts_above_the_window() {
        let (rope, cursor) = fixture(MODULE);
        // The window starts at `class Inner:`: the scopes from there on are in the window.
        let inner = MODULE.find("        class Inner").expect("in the module");
        let start = rope.byte_to_char(inner);
        let found = header(&rope, start, cursor);
        assert_eq!(found.scopes.len(), 2, "{:?}", found.scopes);
        assert_eq!(found.imports.len(), 4);
        // A window from the imports on has only the imports above it.
        let os = rope.byte_to_char(MODULE.find("import os").expect("in the module"));
        let header = header(&rope, os, cursor);
        assert_eq!(header.imports, ["from __future__ import annotations\n"]);
        assert!(header.scopes.is_empty());
    }

    #[test]
    fn a_window_at_the_top_has_no_header() {
        let (rope, cursor) = fixture(MODULE);
        assert_eq!(header(&rope, 0, cursor), Header::default());
        assert!(Header::default().text().is_empty());
    }

    #[test]
    fn the_cursor_line_closes_scopes() {
        // After the method, code at the class's body indentation: only the class is open.
        let (rope, cursor) = fixture("import os\n\nclass A:\n    def f(self):\n        return 1\n\n    x$0");
        let found = header(&rope, line_start(&rope, 4), cursor);
        assert_eq!(found.scopes, ["class A:\n"]);
        // A blank cursor line decides nothing, whatever its indentation; code at column 0 closes all.
        for blank in ["", "  ", "    "] {
            let (rope, cursor) = fixture(&format!(
                "import os\n\nclass A:\n    def f(self):\n        return 1\n\n{blank}$0"
            ));
            let scopes = header(&rope, line_start(&rope, 4), cursor).scopes;
            assert_eq!(scopes, ["class A:\n", "    def f(self):\n"], "{blank:?}");
        }
        let (rope, cursor) = fixture("import os\n\nclass A:\n    def f(self):\n        return 1\n\nx$0");
        assert!(header(&rope, line_start(&rope, 4), cursor).scopes.is_empty());
        // A statement at the method's indentation closes it; a dedented one closes the class.
        let (rope, cursor) = fixture("class A:\n    def f(self):\n        x = 1\n    y = 2\n    z$0");
        assert_eq!(header(&rope, line_start(&rope, 3), cursor).scopes, ["class A:\n"]);
        let (rope, cursor) = fixture("class A:\n    def f(self):\n        x = 1\nclass B:\n    pass\ny$0");
        assert!(header(&rope, line_start(&rope, 4), cursor).scopes.is_empty());
    }

    #[test]
    fn dropping_goes_imports_first_then_innermost_scopes() {
        let mut header = Header {
            imports: vec!["import a\n".into(), "import b\n".into()],
            scopes: vec!["class A:\n".into(), "    def f(self):\n".into()],
        };
        assert_eq!(
            header.text(),
            "import a\nimport b\n\nclass A:\n    def f(self):\n"
        );
        let mut texts = vec![];
        while header.drop_one() {
            texts.push(header.text());
        }
        assert_eq!(
            texts,
            [
                "import b\n\nclass A:\n    def f(self):\n",
                "class A:\n    def f(self):\n",
                "class A:\n",
                "",
            ]
        );
        let header = Header {
            imports: vec!["import a\n".into()],
            scopes: vec!["class A:\n".into(), "    def f(self):\n".into()],
        };
        assert_eq!(
            header.clone().fitted(|t| t.len() <= 30).text(),
            "class A:\n    def f(self):\n"
        );
        assert_eq!(header.fitted(|t| t.len() <= 5), Header::default());
    }
}
