//! Every conversion between LSP positions (line, character in code units of the negotiated encoding)
//! and char indexes into a document's rope lives here, so no other module ever reads `character`.

use std::fmt;

use ropey::{Rope, RopeSlice};

/// The unit an LSP `Position.character` counts in, as negotiated through `positionEncoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionEncoding {
    Utf8,
    Utf16,
    Utf32,
}

/// An LSP position: 0-based line, `character` in code units of the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub character: u32,
}

impl Pos {
    pub fn new(line: u32, character: u32) -> Self {
        Pos { line, character }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.character)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PositionError {
    /// The line does not exist. A document always has `n_lines >= 1`: the position just after a
    /// final line terminator is on an (empty) line of its own.
    LineOutOfRange { line: u32, n_lines: usize },
}

impl fmt::Display for PositionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PositionError::LineOutOfRange { line, n_lines } => write!(
                f,
                "line {line} is past the end of the document, which has {n_lines} line(s) \
                 (0 to {}): the client's copy is out of sync",
                n_lines.saturating_sub(1)
            ),
        }
    }
}

impl std::error::Error for PositionError {}

/// The char index in `rope` that `pos` designates.
///
/// A character past the end of its line is clamped to the line's end, as the spec says: "If the
/// character value is greater than the line length it defaults back to the line length." The line
/// length excludes the terminator, so the result never lands between `\r` and `\n`. A character in
/// the middle of a UTF-16 surrogate pair or a multi-byte UTF-8 sequence rounds down to the start of
/// that char.
pub fn pos_to_char(rope: &Rope, pos: Pos, enc: PositionEncoding) -> Result<usize, PositionError> {
    let line_idx = pos.line as usize;
    let n_lines = rope.len_lines();
    if line_idx >= n_lines {
        return Err(PositionError::LineOutOfRange {
            line: pos.line,
            n_lines,
        });
    }
    let line_start_char = rope.line_to_char(line_idx);
    let content = line_content(rope.line(line_idx));
    let character = pos.character as usize;
    let col_char = match enc {
        PositionEncoding::Utf32 => character.min(content.len_chars()),
        // ropey maps a unit inside a char to the char it belongs to, which is the rounding down we want.
        PositionEncoding::Utf16 => content.utf16_cu_to_char(character.min(content.len_utf16_cu())),
        PositionEncoding::Utf8 => content.byte_to_char(character.min(content.len_bytes())),
    };
    Ok(line_start_char + col_char)
}

/// The LSP position of `char_idx` (clamped to the end of the rope).
pub fn char_to_pos(rope: &Rope, char_idx: usize, enc: PositionEncoding) -> Pos {
    let char_idx = char_idx.min(rope.len_chars());
    let line_idx = rope.char_to_line(char_idx);
    let line_start_char = rope.line_to_char(line_idx);
    let col = match enc {
        PositionEncoding::Utf32 => char_idx - line_start_char,
        PositionEncoding::Utf16 => rope.char_to_utf16_cu(char_idx) - rope.char_to_utf16_cu(line_start_char),
        PositionEncoding::Utf8 => rope.char_to_byte(char_idx) - rope.char_to_byte(line_start_char),
    };
    Pos {
        line: saturating_u32(line_idx),
        character: saturating_u32(col),
    }
}

/// The end of the document as an LSP position (where an append goes).
pub fn end_pos(rope: &Rope, enc: PositionEncoding) -> Pos {
    char_to_pos(rope, rope.len_chars(), enc)
}

/// A line without its terminator (`\n`, `\r\n` or `\r`).
pub fn line_content(line: RopeSlice<'_>) -> RopeSlice<'_> {
    let n_chars = line.len_chars();
    let char_at = |char_idx: Option<usize>| char_idx.map(|char_idx| line.char(char_idx));
    let terminator_chars = match (char_at(n_chars.checked_sub(2)), char_at(n_chars.checked_sub(1))) {
        (Some('\r'), Some('\n')) => 2,
        (_, Some('\n' | '\r')) => 1,
        _ => 0,
    };
    line.slice(..n_chars - terminator_chars)
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::PositionEncoding::{Utf16, Utf32, Utf8};
    use super::*;

    /// (text, (line, character), encoding, expected char_idx or None for an error)
    type PosToCharRow = (&'static str, (u32, u32), PositionEncoding, Option<usize>);

    #[rustfmt::skip]
    const POS_TO_CHAR: &[PosToCharRow] = &[
        // ASCII
        ("hello\nworld", (0, 0), Utf16, Some(0)),
        ("hello\nworld", (0, 5), Utf16, Some(5)),
        ("hello\nworld", (1, 0), Utf8, Some(6)),
        ("hello\nworld", (1, 3), Utf32, Some(9)),
        // the very end of the file
        ("hello\nworld", (1, 5), Utf16, Some(11)),
        ("hello\nworld", (1, 5), Utf8, Some(11)),
        // past the line end: clamped to the line length, before the terminator
        ("hello\nworld", (0, 99), Utf16, Some(5)),
        ("hello\nworld", (1, 99), Utf8, Some(11)),
        ("hello\nworld", (0, u32::MAX), Utf32, Some(5)),
        // out-of-range lines
        ("hello\nworld", (2, 0), Utf16, None),
        ("hello\nworld", (u32::MAX, 0), Utf8, None),
        // after a trailing newline there is one more, empty, line
        ("hello\n", (1, 0), Utf16, Some(6)),
        ("hello\n", (1, 7), Utf16, Some(6)),
        ("hello\n", (2, 0), Utf16, None),
        // empty file: only (0, 0), and characters clamp to it
        ("", (0, 0), Utf16, Some(0)),
        ("", (0, 0), Utf8, Some(0)),
        ("", (0, 3), Utf32, Some(0)),
        ("", (1, 0), Utf16, None),
        // tabs are one unit in every encoding
        ("\tx = 1", (0, 1), Utf16, Some(1)),
        ("\tx = 1", (0, 2), Utf8, Some(2)),
        // CRLF: the terminator is two chars, never split
        ("a\r\nbc\r\n", (0, 1), Utf16, Some(1)),
        ("a\r\nbc\r\n", (0, 2), Utf16, Some(1)),
        ("a\r\nbc\r\n", (1, 0), Utf16, Some(3)),
        ("a\r\nbc\r\n", (1, 2), Utf8, Some(5)),
        ("a\r\nbc\r\n", (1, 9), Utf32, Some(5)),
        ("a\r\nbc\r\n", (2, 0), Utf16, Some(7)),
        ("a\r\nbc\r\n", (3, 0), Utf16, None),
        // a lone CR ends a line too
        ("a\rb", (1, 0), Utf16, Some(2)),
        ("a\rb", (0, 5), Utf16, Some(1)),
        ("a\r", (1, 0), Utf8, Some(2)),
        ("a\r\rb", (1, 0), Utf32, Some(2)),
        ("a\r\rb", (2, 1), Utf32, Some(4)),
        // CJK: one UTF-16 unit, three UTF-8 bytes
        ("中文x", (0, 1), Utf16, Some(1)),
        ("中文x", (0, 2), Utf32, Some(2)),
        ("中文x", (0, 3), Utf8, Some(1)),
        ("中文x", (0, 6), Utf8, Some(2)),
        ("中文x", (0, 7), Utf8, Some(3)),
        ("中文x", (0, 4), Utf8, Some(1)), // mid-char rounds down
        ("中文x", (0, 5), Utf8, Some(1)),
        // emoji: a surrogate pair in UTF-16, four bytes in UTF-8
        ("a😀b", (0, 1), Utf16, Some(1)),
        ("a😀b", (0, 2), Utf16, Some(1)), // inside the surrogate pair
        ("a😀b", (0, 3), Utf16, Some(2)),
        ("a😀b", (0, 4), Utf16, Some(3)),
        ("a😀b", (0, 9), Utf16, Some(3)),
        ("a😀b", (0, 2), Utf32, Some(2)),
        ("a😀b", (0, 3), Utf8, Some(1)),
        ("a😀b", (0, 4), Utf8, Some(1)),
        ("a😀b", (0, 5), Utf8, Some(2)),
        ("a😀b", (0, 6), Utf8, Some(3)),
        ("😀\n😀", (1, 2), Utf16, Some(3)),
        ("😀\r\n😀", (0, 2), Utf16, Some(1)),
        ("😀\r\n😀", (0, 1), Utf16, Some(0)),
    ];

    #[test]
    fn pos_to_char_table() {
        for &(text, (line, character), enc, expected) in POS_TO_CHAR {
            let rope = Rope::from_str(text);
            let got = pos_to_char(&rope, Pos::new(line, character), enc).ok();
            assert_eq!(got, expected, "{text:?} at ({line}, {character}) in {enc:?}");
        }
    }

    #[test]
    fn out_of_range_error_says_what_is_wrong() {
        let rope = Rope::from_str("a\nb");
        let err = pos_to_char(&rope, Pos::new(5, 0), Utf16).expect_err("line 5 does not exist");
        assert_eq!(err, PositionError::LineOutOfRange { line: 5, n_lines: 2 });
        assert_eq!(
            err.to_string(),
            "line 5 is past the end of the document, which has 2 line(s) (0 to 1): \
             the client's copy is out of sync"
        );
    }

    /// Rows of (text, char_idx, encoding, expected (line, character)).
    #[rustfmt::skip]
    const CHAR_TO_POS: &[(&str, usize, PositionEncoding, (u32, u32))] = &[
        ("hello\nworld", 0, Utf16, (0, 0)),
        ("hello\nworld", 5, Utf16, (0, 5)),
        ("hello\nworld", 6, Utf16, (1, 0)),
        ("hello\nworld", 11, Utf8, (1, 5)),
        ("hello\nworld", 99, Utf8, (1, 5)), // clamped to the end
        ("hello\n", 6, Utf16, (1, 0)),
        ("", 0, Utf32, (0, 0)),
        ("a\r\nb", 3, Utf16, (1, 0)),
        ("a\rb", 2, Utf16, (1, 0)),
        ("中文x", 2, Utf8, (0, 6)),
        ("中文x", 2, Utf16, (0, 2)),
        ("a😀b", 2, Utf16, (0, 3)),
        ("a😀b", 2, Utf8, (0, 5)),
        ("a😀b", 2, Utf32, (0, 2)),
        ("x\n😀😀", 4, Utf16, (1, 4)),
    ];

    #[test]
    fn char_to_pos_table() {
        for &(text, char_idx, enc, (line, character)) in CHAR_TO_POS {
            let rope = Rope::from_str(text);
            assert_eq!(
                char_to_pos(&rope, char_idx, enc),
                Pos::new(line, character),
                "{text:?} @{char_idx} {enc:?}"
            );
        }
    }

    /// Every char index that is not inside a line terminator survives a round trip in every encoding.
    #[test]
    fn round_trips() {
        let texts = [
            "",
            "x",
            "hello\nworld\n",
            "\tdef f(x):\r\n\t\treturn x\r\n",
            "a\rb\r\rc",
            "中文 😀 é\n🎉🎉\r\n\n",
            "😀",
        ];
        for text in texts {
            let rope = Rope::from_str(text);
            for char_idx in 0..=rope.len_chars() {
                let inside_crlf = char_idx > 0
                    && rope.char(char_idx - 1) == '\r'
                    && char_idx < rope.len_chars()
                    && rope.char(char_idx) == '\n';
                if inside_crlf {
                    continue;
                }
                for enc in [Utf8, Utf16, Utf32] {
                    let pos = char_to_pos(&rope, char_idx, enc);
                    assert_eq!(
                        pos_to_char(&rope, pos, enc),
                        Ok(char_idx),
                        "{text:?} @{char_idx} {enc:?} {pos}"
                    );
                }
            }
            let end = end_pos(&rope, Utf16);
            assert_eq!(pos_to_char(&rope, end, Utf16), Ok(rope.len_chars()));
            assert!(pos_to_char(&rope, Pos::new(end.line + 1, 0), Utf16).is_err());
        }
    }

    #[test]
    fn line_content_strips_only_the_terminator() {
        for (line, content) in [
            ("ab\r\n", "ab"),
            ("ab\n", "ab"),
            ("ab\r", "ab"),
            ("ab", "ab"),
            ("", ""),
            ("\r\n", ""),
        ] {
            let rope = Rope::from_str(line);
            assert_eq!(line_content(rope.slice(..)).to_string(), content);
        }
    }
}
