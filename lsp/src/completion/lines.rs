//! Python source as lines: a small lexer that knows, for each physical line, whether it starts and
//! ends a statement (brackets, strings and backslash continuations), whether it opens a block, and
//! its indentation. The post-processing rules, the structure header and the stubs of other
//! documents all read code through it.

/// One physical line, with what the lexer knew at its start and end.
#[derive(Debug)]
pub(crate) struct Line<'a> {
    /// Byte index of the line's first char in the scanned text.
    pub(crate) start: usize,
    /// The line without `\n` (and without the `\r` of a `\r\n`).
    pub(crate) text: &'a str,
    /// A `\n` follows: the line is complete.
    pub(crate) terminated: bool,
    /// Not inside brackets, a string or a backslash continuation: a new statement starts here.
    pub(crate) starts_statement: bool,
    pub(crate) starts_in_string: bool,
    /// The statement is complete at the end of this line.
    pub(crate) ends_statement: bool,
    /// The line's code, ignoring a trailing comment, ends with ':'.
    pub(crate) opens_block: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct LexState {
    bracket_depth: u32,
    string: Option<Quote>,
    backslash: bool,
}

#[derive(Debug, Clone, Copy)]
struct Quote {
    byte: u8,
    triple: bool,
}

impl LexState {
    fn between_statements(&self) -> bool {
        self.bracket_depth == 0 && self.string.is_none() && !self.backslash
    }
}

pub(crate) fn split_lines(text: &str) -> Vec<Line<'_>> {
    let mut state = LexState::default();
    let mut lines = Vec::new();
    let mut start = 0;
    loop {
        let (end, terminated) = match text[start..].find('\n') {
            Some(offset) => (start + offset, true),
            None => (text.len(), false),
        };
        let raw = &text[start..end];
        let line_text = raw.strip_suffix('\r').unwrap_or(raw);
        let starts_statement = state.between_statements();
        let starts_in_string = state.string.is_some();
        let opens_block = lex_line(&mut state, line_text);
        lines.push(Line {
            start,
            text: line_text,
            terminated,
            starts_statement,
            starts_in_string,
            ends_statement: state.between_statements(),
            opens_block,
        });
        if !terminated {
            return lines;
        }
        start = end + 1;
    }
}

/// Advances `state` over one line; returns whether its code ends with ':'. Only ASCII bytes matter
/// to Python's syntax here, and no byte of a multi-byte UTF-8 char is ASCII, so bytes are safe.
fn lex_line(state: &mut LexState, line: &str) -> bool {
    let bytes = line.as_bytes();
    let mut ends_with_colon = false;
    let mut escaped_newline = false;
    state.backslash = false;
    let mut byte_idx = 0;
    while byte_idx < bytes.len() {
        let byte = bytes[byte_idx];
        if let Some(quote) = state.string {
            ends_with_colon = false;
            if byte == b'\\' {
                escaped_newline = byte_idx + 1 == bytes.len();
                byte_idx += 2;
                continue;
            }
            if byte == quote.byte && (!quote.triple || bytes[byte_idx..].starts_with(&[byte; 3])) {
                state.string = None;
                byte_idx += if quote.triple { 3 } else { 1 };
                continue;
            }
            byte_idx += 1;
            continue;
        }
        match byte {
            b'#' => break,
            b'"' | b'\'' => {
                let triple = bytes[byte_idx..].starts_with(&[byte; 3]);
                state.string = Some(Quote { byte, triple });
                ends_with_colon = false;
                byte_idx += if triple { 3 } else { 1 };
                continue;
            }
            b'(' | b'[' | b'{' => state.bracket_depth += 1,
            b')' | b']' | b'}' => state.bracket_depth = state.bracket_depth.saturating_sub(1),
            b'\\' if line[byte_idx + 1..].trim().is_empty() => state.backslash = true,
            _ => {}
        }
        if !byte.is_ascii_whitespace() {
            ends_with_colon = byte == b':';
        }
        byte_idx += 1;
    }
    // A quoted (not triple-quoted) string ends with its line unless the newline is escaped; an
    // unterminated one is a syntax error that should not swallow the rest of the text.
    if state.string.is_some_and(|quote| !quote.triple) && !escaped_newline {
        state.string = None;
    }
    ends_with_colon
}

/// The line from its first non-blank char, or None for a blank line.
pub(crate) fn first_code(line: &str) -> Option<&str> {
    let code = line.trim_start();
    (!code.is_empty()).then_some(code)
}

/// Indentation in columns, a tab advancing to the next multiple of `tab_width`.
pub(crate) fn indent_width(line: &str, tab_width: usize) -> usize {
    let mut width = 0;
    for ch in line.chars() {
        match ch {
            ' ' => width += 1,
            '\t' => width += tab_width - width % tab_width,
            _ => break,
        }
    }
    width
}
