//! The prompt, fitted in one place: the text before the cursor that Phi-1 (left-to-right, no
//! fill-in-the-middle) sees, plus the text around the cursor that post-processing needs.
//!
//! Two steps, each here: [`window`] bounds how much of the document is read (in characters, so the
//! work is proportional to the window, not the document), and [`fit_tokens`] decides what of it the
//! model gets (in tokens: `contextTokens` less the room for the answer).
//!
//! When the window does not reach the top of the file, [`window_with_structure`] puts the file's
//! structure before it (`structure.rs`: the top-level imports, the enclosing `class`/`def`
//! headers): at most a quarter of the prompt's budget, in characters here and in tokens in
//! [`fit`], which drops its parts in [`Header::drop_one`]'s order (imports first, then the
//! innermost scopes, the outermost `class` last) until it fits. The window gets the rest.
//!
//! Before both go the definitions this file imports from the other open documents
//! (`neighbours.rs`), fitted the same way by [`window_with_context`] and [`fit`]: at most a
//! quarter of `contextTokens`, dropping the stubs of the imports farthest from the cursor first.
//! They come first because they change least: only when an imported document or the file's
//! imports change.
//!
//! Both starts move in large steps only. The engine keeps the KV cache of the longest common token
//! prefix between consecutive prompts, so a start that moved on every keystroke would make every
//! keystroke pay for the whole prompt again.

use phi_engine::{EngineError, PhiTokenizer, Result};
use ropey::Rope;

use super::neighbours::Neighbours;
use super::structure::{self, Header};
use crate::convert::line_content;

/// Characters of text before the cursor to read for a context of `context_tokens`, `max_new_tokens`
/// of which are the answer's: Python runs about 3–4 characters a token, and [`fit_tokens`] trims any
/// excess in large steps.
pub fn window_chars(context_tokens: usize, max_new_tokens: usize) -> usize {
    context_tokens.saturating_sub(max_new_tokens).max(64) * 3
}

/// How much of the cursor line after the cursor `line_suffix` keeps.
pub const LINE_SUFFIX_MAX_CHARS: usize = 1_000;
/// How much text after the cursor `after` keeps.
pub const AFTER_MAX_CHARS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptWindow {
    /// The text before the cursor, from `start_char` on: the prompt.
    pub text: String,
    /// The char index where the window starts: 0, a line start, or (only when the cursor line alone
    /// is longer than the window) a point inside the cursor line.
    pub start_char: usize,
    /// The cursor line before the cursor, at most `max_chars` chars (its end, if the line is huge).
    pub line_prefix: String,
    /// The cursor line after the cursor, without the line terminator, at most `LINE_SUFFIX_MAX_CHARS`.
    pub line_suffix: String,
    /// Up to `AFTER_MAX_CHARS` chars after the cursor, `line_suffix` and its terminator included.
    pub after: String,
    /// The file's structure above the window, which goes before `text` in the prompt (empty from
    /// [`window`]; see [`window_with_structure`]).
    pub header: Header,
    /// The definitions imported from the other open documents, which go first (empty from
    /// [`window`] and [`window_with_structure`]; see [`window_with_context`]).
    pub neighbours: Neighbours,
}

/// The window for a cursor at `cursor_char` (clamped to the rope), at most `max_chars` chars long.
///
/// Work is proportional to the window, not the document: only rope slices around the cursor are read.
pub fn window(rope: &Rope, cursor_char: usize, max_chars: usize) -> PromptWindow {
    let cursor_char = cursor_char.min(rope.len_chars());
    let cursor_line = rope.char_to_line(cursor_char);
    let line_start_char = rope.line_to_char(cursor_line);
    let start_char = window_start(rope, cursor_char, line_start_char, max_chars);

    let prefix_start_char = line_start_char.max(cursor_char.saturating_sub(max_chars));
    let line_end_char = line_start_char + line_content(rope.line(cursor_line)).len_chars();
    let suffix_end_char = line_end_char
        .min(cursor_char + LINE_SUFFIX_MAX_CHARS)
        .max(cursor_char);
    let after_end_char = rope.len_chars().min(cursor_char + AFTER_MAX_CHARS);

    PromptWindow {
        text: rope.slice(start_char..cursor_char).to_string(),
        start_char,
        line_prefix: rope.slice(prefix_start_char..cursor_char).to_string(),
        line_suffix: rope.slice(cursor_char..suffix_end_char).to_string(),
        after: rope.slice(cursor_char..after_end_char).to_string(),
        header: Header::default(),
        neighbours: Neighbours::default(),
    }
}

/// [`window_with_structure`] after `neighbours`, all within `max_chars`: the neighbours take at
/// most a quarter (their farthest imports' stubs dropped first), the structure and the window the
/// rest. The window's length depends on the neighbours' only, so it still starts in large steps.
pub fn window_with_context(
    rope: &Rope,
    cursor_char: usize,
    max_chars: usize,
    neighbours: Neighbours,
) -> PromptWindow {
    let budget = max_chars / 4;
    let neighbours = neighbours.fitted(|text| text.chars().count() <= budget);
    let neighbour_chars = neighbours.text().chars().count();
    let mut window = window_with_structure(rope, cursor_char, max_chars - neighbour_chars);
    window.neighbours = neighbours;
    window
}

/// The window at `cursor_char` with the file's structure above it in `header`, the two together
/// within `max_chars`: the header takes at most a quarter, the window the rest.
///
/// Both stay put while the user types in one scope: the header depends on the text above the
/// window and the scopes the cursor is in, and the window's length on the header's, so the window's
/// start still moves only in quarter-window steps.
pub fn window_with_structure(rope: &Rope, cursor_char: usize, max_chars: usize) -> PromptWindow {
    let whole = window(rope, cursor_char, max_chars);
    // No header at the top of the file, nor before a window that starts inside the cursor's line
    // (a line longer than the window): a fragment of a line after it would not read as Python.
    let at_line_start = |start_char: usize| rope.line_to_char(rope.char_to_line(start_char)) == start_char;
    if whole.start_char == 0 || !at_line_start(whole.start_char) {
        return whole;
    }
    let budget = max_chars / 4;
    let fits = |text: &str| text.chars().count() <= budget;
    let first = structure::header(rope, whole.start_char, cursor_char).fitted(fits);
    let header_chars = first.text().chars().count();
    let mut fitted = window(rope, cursor_char, max_chars - header_chars);
    if !at_line_start(fitted.start_char) {
        return whole;
    }
    fitted.header = structure::header(rope, fitted.start_char, cursor_char).fitted(fits);
    fitted
}

/// The prompt's ids for a slot of `capacity` positions: `neighbours` (see
/// [`window_with_context`]) cut to a quarter of `capacity` with [`Neighbours::drop_one`]'s order,
/// then `header` (see [`window_with_structure`]) cut to a quarter of the room with
/// [`Header::drop_one`]'s order, then `text` fitted by [`fit_tokens`] to what is left. Each part's
/// ids are its own encoding, so the first ones do not change with the window's.
pub fn fit(
    tokenizer: &PhiTokenizer,
    neighbours: &Neighbours,
    header: &Header,
    text: &str,
    capacity: usize,
    max_new_tokens: usize,
) -> Result<Vec<u32>> {
    let room = capacity.saturating_sub(max_new_tokens.min(capacity / 2)).max(1);
    let mut ids = Vec::new();
    let mut neighbours = neighbours.clone();
    while !neighbours.is_empty() {
        let neighbour_ids = tokenizer.encode(&neighbours.text())?;
        if neighbour_ids.len() <= capacity / 4 {
            ids = neighbour_ids;
            break;
        }
        neighbours.drop_one();
    }
    let mut header = header.clone();
    while !header.is_empty() {
        let header_ids = tokenizer.encode(&header.text())?;
        if header_ids.len() <= room / 4 {
            ids.extend(header_ids);
            break;
        }
        header.drop_one();
    }
    let window_ids = tokenizer.encode(text)?;
    ids.extend_from_slice(fit_tokens(&window_ids, capacity - ids.len(), max_new_tokens)?);
    Ok(ids)
}

/// The earliest start allowed is `cursor_char - max_chars`; rounding it up to a multiple of a quarter
/// window keeps the start fixed while the cursor moves through a quarter window, and snapping to the
/// next line start keeps the prompt from opening mid-line.
fn window_start(rope: &Rope, cursor_char: usize, line_start_char: usize, max_chars: usize) -> usize {
    let earliest_char = cursor_char.saturating_sub(max_chars);
    if earliest_char == 0 {
        return 0;
    }
    let step = (max_chars / 4).max(1);
    let candidate_char = earliest_char.div_ceil(step) * step;
    if candidate_char > line_start_char {
        // No line starts between the candidate and the cursor: the cursor line alone is too long.
        return candidate_char.min(cursor_char);
    }
    let candidate_line = rope.char_to_line(candidate_char);
    let candidate_line_start_char = rope.line_to_char(candidate_line);
    if candidate_line_start_char == candidate_char {
        candidate_char
    } else {
        // candidate_line < cursor_line here, since the candidate is at or before the cursor line's start.
        rope.line_to_char(candidate_line + 1)
    }
}

/// Keeps the end of a prompt that does not fit `capacity - max_new_tokens`, cutting from the left
/// in quarters of the capacity so the next keystrokes keep the same start (and the cached prefix).
pub fn fit_tokens(ids: &[u32], capacity: usize, max_new_tokens: usize) -> Result<&[u32]> {
    let room = capacity.saturating_sub(max_new_tokens.min(capacity / 2)).max(1);
    if ids.is_empty() {
        return Err(EngineError::Request("the prompt is empty".into()));
    }
    if ids.len() <= room {
        return Ok(ids);
    }
    let step = (capacity / 4).max(1);
    let excess = ids.len() - room;
    let cut = excess.div_ceil(step) * step;
    Ok(&ids[cut.min(ids.len() - 1)..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_cuts_the_left_in_large_steps() {
        let ids: Vec<u32> = (0..1000).collect();
        assert_eq!(fit_tokens(&ids, 2048, 64).expect("fits").len(), 1000);
        // 1000 + 64 > 512: cut in steps of 128 until 1000 - cut <= 448.
        let kept = fit_tokens(&ids, 512, 64).expect("fits");
        assert_eq!(kept.len(), 360);
        assert_eq!(kept[0], 640);
        // One more token does not move the start.
        let ids: Vec<u32> = (0..1001).collect();
        assert_eq!(fit_tokens(&ids, 512, 64).expect("fits")[0], 640);
        assert!(fit_tokens(&[], 512, 64).is_err());
    }

    /// Splits a fixture at its `$0` cursor marker into the text and the cursor's char index.
    fn fixture(text_with_cursor: &str) -> (Rope, usize) {
        let byte_idx = text_with_cursor.find("$0").expect("fixture has a $0 cursor");
        let text = text_with_cursor.replacen("$0", "", 1);
        let rope = Rope::from_str(&text);
        let char_idx = rope.byte_to_char(byte_idx);
        (rope, char_idx)
    }

    fn is_line_start(rope: &Rope, char_idx: usize) -> bool {
        char_idx == 0 || rope.line_to_char(rope.char_to_line(char_idx)) == char_idx
    }

    fn numbered_lines(n_lines: usize) -> String {
        (0..n_lines)
            .map(|i| format!("value_{i} = compute({i}, {})\n", i * 7))
            .collect()
    }

    #[test]
    fn small_file_is_the_whole_text_before_the_cursor() {
        let (rope, cursor) = fixture("def add(a, b):\n    \"\"\"Add.\"\"\"\n    return a$0 + b\n");
        let w = window(&rope, cursor, 8_000);
        assert_eq!(w.start_char, 0);
        assert_eq!(w.text, "def add(a, b):\n    \"\"\"Add.\"\"\"\n    return a");
        assert_eq!(w.line_prefix, "    return a");
        assert_eq!(w.line_suffix, " + b");
        assert_eq!(w.after, " + b\n");
    }

    #[test]
    fn cursor_at_the_start_and_at_the_end() {
        let (rope, cursor) = fixture("$0import os\nx = 1\n");
        let w = window(&rope, cursor, 100);
        assert_eq!(
            (w.text.as_str(), w.start_char, w.line_prefix.as_str()),
            ("", 0, "")
        );
        assert_eq!(w.line_suffix, "import os");
        assert_eq!(w.after, "import os\nx = 1\n");

        let (rope, cursor) = fixture("import os\nx = 1\n$0");
        let w = window(&rope, cursor, 100);
        assert_eq!(w.text, "import os\nx = 1\n");
        assert_eq!(
            (w.line_prefix.as_str(), w.line_suffix.as_str(), w.after.as_str()),
            ("", "", "")
        );

        let (rope, cursor) = fixture("x = 1$0");
        let w = window(&rope, cursor, 100);
        assert_eq!(
            (w.line_prefix.as_str(), w.line_suffix.as_str(), w.after.as_str()),
            ("x = 1", "", "")
        );

        let empty = Rope::new();
        assert_eq!(window(&empty, 0, 100).text, "");
        // A cursor past the end is clamped rather than trusted.
        assert_eq!(window(&empty, 5, 100).text, "");
    }

    #[test]
    fn crlf_line_prefix_suffix_and_after() {
        let (rope, cursor) = fixture("def f(x, y):\r\n    return x$0 + y\r\nz = 1\r\n");
        let w = window(&rope, cursor, 1_000);
        assert_eq!(w.line_prefix, "    return x");
        assert_eq!(w.line_suffix, " + y");
        assert_eq!(w.after, " + y\r\nz = 1\r\n");
        // At the end of a CRLF line the suffix is empty, not "\r".
        let (rope, cursor) = fixture("a = 1$0\r\nb = 2\r");
        let w = window(&rope, cursor, 1_000);
        assert_eq!((w.line_prefix.as_str(), w.line_suffix.as_str()), ("a = 1", ""));
        let (rope, cursor) = fixture("a = 1\rb$0 = 2\r");
        let w = window(&rope, cursor, 1_000);
        assert_eq!(
            (w.line_prefix.as_str(), w.line_suffix.as_str(), w.after.as_str()),
            ("b", " = 2", " = 2\r")
        );
    }

    #[test]
    fn large_file_is_cut_at_a_line_start() {
        let text = numbered_lines(2_000);
        let rope = Rope::from_str(&text);
        let max_chars = 4_000;
        for cursor in [
            rope.len_chars(),
            rope.len_chars() / 2,
            max_chars + 1,
            max_chars * 3 + 17,
        ] {
            let w = window(&rope, cursor, max_chars);
            assert!(
                w.text.chars().count() <= max_chars,
                "cursor {cursor}: window too long"
            );
            assert!(
                w.text.chars().count() >= max_chars / 2,
                "cursor {cursor}: window needlessly short"
            );
            assert!(
                is_line_start(&rope, w.start_char),
                "cursor {cursor}: starts mid-line"
            );
            assert_eq!(w.text, rope.slice(w.start_char..cursor).to_string());
        }
    }

    #[test]
    fn start_holds_while_typing() {
        let max_chars = 4_000;
        let step = max_chars / 4;
        let mut text = numbered_lines(1_000);
        // Put the cursor just past a step boundary, where the start has the longest to hold.
        while (text.chars().count() - max_chars) % step != 1 {
            text.push('#');
        }
        let mut rope = Rope::from_str(&text);
        let mut cursor = rope.len_chars();
        let first = window(&rope, cursor, max_chars);
        for _ in 0..max_chars / 8 {
            rope.insert_char(cursor, 'x');
            cursor += 1;
            let w = window(&rope, cursor, max_chars);
            assert_eq!(w.start_char, first.start_char, "start moved at cursor {cursor}");
            assert!(w.text.starts_with(&first.text));
        }
    }

    #[test]
    fn start_moves_rarely_over_a_long_session() {
        let max_chars = 2_000;
        let mut rope = Rope::from_str(&numbered_lines(200));
        let mut cursor = rope.len_chars();
        let typed: String = numbered_lines(300)
            .chars()
            .skip(7_000)
            .take(4 * max_chars)
            .collect();
        let mut n_moves = 0;
        let mut start_char = window(&rope, cursor, max_chars).start_char;
        for ch in typed.chars() {
            rope.insert_char(cursor, ch);
            cursor += 1;
            let w = window(&rope, cursor, max_chars);
            assert!(w.text.chars().count() <= max_chars);
            if w.start_char != start_char {
                assert!(
                    w.start_char > start_char,
                    "the start only moves forward when appending"
                );
                n_moves += 1;
                start_char = w.start_char;
            }
        }
        // One move per quarter window typed, at most.
        assert!(n_moves <= 4 * 4 + 1, "start moved {n_moves} times");
    }

    const IMPORTS: [&str; 3] = [
        "from __future__ import annotations\n",
        "import os\n",
        "from typing import (\n    Any,\n    Dict,\n)\n",
    ];
    const CLASS_HEADER: &str = "@register\nclass Store:\n";
    const METHOD_HEADER: &str =
        "    @staticmethod\n    def compute(\n        key: str,\n        value: int,\n    ) -> int:\n";

    /// A long module: imports, 40 functions, then a decorated class with a decorated method whose
    /// multi-line signature opens a 300-line body; it ends inside that body, at its indentation.
    fn long_module() -> String {
        let mut text = format!("{}\n\n", IMPORTS.concat());
        for i in 0..40 {
            text += &format!("def helper_{i}(x):\n    return x + {i}\n\n\n");
        }
        text += CLASS_HEADER;
        text += "    \"\"\"Keeps values.\"\"\"\n\n    def __init__(self):\n        self.values = {}\n\n";
        text += METHOD_HEADER;
        for i in 0..300 {
            text += &format!("        step_{i} = value * {i} + len(key)\n");
        }
        text + "        "
    }

    #[test]
    fn deep_in_a_long_module_the_structure_comes_first() {
        let rope = Rope::from_str(&long_module());
        let max_chars = 3_000;
        let w = window_with_structure(&rope, rope.len_chars(), max_chars);
        assert!(w.start_char > 0);
        assert_eq!(w.header.imports, IMPORTS);
        assert_eq!(w.header.scopes, [CLASS_HEADER, METHOD_HEADER]);
        let header = w.header.text();
        assert_eq!(
            header,
            format!("{}\n{CLASS_HEADER}{METHOD_HEADER}", IMPORTS.concat())
        );
        assert!(header.chars().count() <= max_chars / 4);
        assert!(header.chars().count() + w.text.chars().count() <= max_chars);
        // The window itself is unchanged in kind: the text before the cursor from a line start.
        assert!(w.text.starts_with("        step_"), "{:?}", &w.text[..40]);
        assert!(w.text.ends_with("len(key)\n        "));
    }

    #[test]
    fn the_structure_holds_while_typing_in_one_scope() {
        let mut rope = Rope::from_str(&long_module());
        let max_chars = 3_000;
        let mut cursor = rope.len_chars();
        let first = window_with_structure(&rope, cursor, max_chars);
        let mut n_moves = 0;
        let mut start_char = first.start_char;
        for ch in "total = step_1 + step_2\n        return total * 2".chars() {
            rope.insert_char(cursor, ch);
            cursor += 1;
            let w = window_with_structure(&rope, cursor, max_chars);
            assert_eq!(w.header, first.header, "after {ch:?}");
            if w.start_char != start_char {
                n_moves += 1;
                start_char = w.start_char;
            }
        }
        assert!(n_moves <= 1, "the start moved {n_moves} times");
        // Leaving the method for the class body drops the method's header, not the class's.
        rope.insert(cursor, "\n\n    def other(self):\n        ");
        let w = window_with_structure(&rope, rope.len_chars(), max_chars);
        assert_eq!(w.header.scopes, [CLASS_HEADER]);
        assert_eq!(w.header.imports, IMPORTS);
    }

    #[test]
    fn near_the_top_there_is_no_structure() {
        let rope = Rope::from_str(&long_module());
        for line in [0, 3, 12] {
            let cursor = rope.line_to_char(line);
            let w = window_with_structure(&rope, cursor, 3_000);
            assert_eq!((w.start_char, w.header.is_empty()), (0, true), "line {line}");
            assert_eq!(w, window(&rope, cursor, 3_000));
        }
    }

    #[test]
    fn a_small_budget_keeps_the_outermost_headers() {
        let rope = Rope::from_str(&long_module());
        // A quarter of 400 chars: neither the imports nor the method's header fit with the class's.
        let w = window_with_structure(&rope, rope.len_chars(), 400);
        assert_eq!(w.header.imports, Vec::<String>::new());
        assert_eq!(w.header.scopes, [CLASS_HEADER]);
    }

    #[test]
    fn fit_puts_the_header_ids_first_within_a_quarter() {
        let tokenizer = PhiTokenizer::from_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/phi-1/tokenizer.json"
        )))
        .expect("assets/phi-1/tokenizer.json parses");
        let header = Header {
            imports: IMPORTS.iter().map(|s| s.to_string()).collect(),
            scopes: vec![CLASS_HEADER.into(), METHOD_HEADER.into()],
        };
        let text = "        total = 0\n        ";
        let encode = |t: &str| tokenizer.encode(t).expect("encodes");
        let (whole, window_ids) = (encode(&header.text()), encode(text));
        // Room for all of it: the header's own ids, then the window's.
        let ids = fit(&tokenizer, &Neighbours::default(), &header, text, 1024, 64).expect("fits");
        assert_eq!(ids, [whole.clone(), window_ids.clone()].concat());
        // A quarter of the room below the whole header's size: the imports go first.
        let capacity = whole.len() * 4 - 4 + 64;
        let scopes_only = encode(&format!("{CLASS_HEADER}{METHOD_HEADER}"));
        assert!(scopes_only.len() * 4 <= capacity - 64, "the scopes fit");
        let ids = fit(&tokenizer, &Neighbours::default(), &header, text, capacity, 64).expect("fits");
        assert!(ids.len() < whole.len() + window_ids.len());
        assert!(ids.ends_with(&window_ids));
        let kept = &ids[..ids.len() - window_ids.len()];
        assert!(kept.len() * 4 <= capacity - 64);
        assert!(
            kept.ends_with(&scopes_only[scopes_only.len() - 8..]),
            "the scopes are kept"
        );
    }

    /// Two imported modules' stubs: `shapes` imported first, `colors` nearest the cursor.
    fn two_neighbours() -> Neighbours {
        use crate::completion::neighbours::{Module, Stub};
        let stub = |rank, name: &str| Stub {
            rank,
            text: format!("class {name}:\n    \"\"\"The {name} of it, in words.\"\"\"\n"),
        };
        let module = |label: &str, stubs| Module {
            label: label.into(),
            stubs,
        };
        Neighbours {
            modules: vec![
                module("shapes.py", vec![stub(1, "Circle"), stub(2, "Square")]),
                module("colors.py", vec![stub(0, "Palette")]),
            ],
        }
    }

    #[test]
    fn the_neighbours_take_a_quarter_of_the_window_first() {
        let rope = Rope::from_str(&long_module());
        let neighbours = two_neighbours();
        let chars = neighbours.text().chars().count();
        let w = window_with_context(&rope, rope.len_chars(), 3_000, neighbours.clone());
        assert_eq!(w.neighbours, neighbours);
        let total = chars + w.header.text().chars().count() + w.text.chars().count();
        assert!(total <= 3_000, "{total}");
        // A quarter a little short: the stub of the import farthest from the cursor goes first.
        let w = window_with_context(&rope, rope.len_chars(), (chars - 10) * 4, neighbours.clone());
        let mut fewer = neighbours;
        fewer.drop_one();
        assert_eq!(w.neighbours, fewer);
        assert!(fewer.text().contains("class Circle") && !fewer.text().contains("class Square"));
        // Typing holds it all still.
        let mut rope = rope;
        let first = window_with_context(&rope, rope.len_chars(), 3_000, two_neighbours());
        let cursor = rope.len_chars();
        rope.insert(cursor, "x = 1");
        let w = window_with_context(&rope, rope.len_chars(), 3_000, two_neighbours());
        assert_eq!(
            (w.start_char, &w.header, &w.neighbours),
            (first.start_char, &first.header, &first.neighbours)
        );
    }

    #[test]
    fn fit_puts_the_neighbour_ids_first_within_a_quarter_of_the_capacity() {
        let tokenizer = PhiTokenizer::from_file(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/phi-1/tokenizer.json"
        )))
        .expect("assets/phi-1/tokenizer.json parses");
        let encode = |t: &str| tokenizer.encode(t).expect("encodes");
        let neighbours = two_neighbours();
        let header = Header {
            imports: vec!["import shapes\n".into()],
            scopes: vec![],
        };
        let text = "x = shapes.";
        let whole = encode(&neighbours.text());
        let ids = fit(&tokenizer, &neighbours, &header, text, 1024, 64).expect("fits");
        let expected = [whole.clone(), encode(&header.text()), encode(text)].concat();
        assert_eq!(ids, expected);
        // A capacity whose quarter is one token short: the farthest import's stub goes first.
        let capacity = (whole.len() - 1) * 4;
        let ids = fit(&tokenizer, &neighbours, &header, text, capacity, 16).expect("fits");
        let mut fewer = neighbours.clone();
        fewer.drop_one();
        let kept = encode(&fewer.text());
        assert!(kept.len() <= capacity / 4);
        assert!(
            ids.starts_with(&kept),
            "{}",
            tokenizer.decode(&ids).unwrap_or_default()
        );
        assert!(ids.ends_with(&encode(text)));
        // Too small for any stub: none.
        let ids = fit(&tokenizer, &neighbours, &Header::default(), text, 16, 4).expect("fits");
        assert_eq!(ids, encode(text));
    }

    #[test]
    fn no_structure_before_a_window_inside_a_huge_line() {
        let line = "a".repeat(100_000);
        let rope = Rope::from_str(&format!("import os\n{line}\n"));
        let cursor = 10 + 50_000;
        let w = window_with_structure(&rope, cursor, 4_000);
        assert!(w.start_char > 10);
        assert!(w.header.is_empty());
        assert_eq!(w, window(&rope, cursor, 4_000));
    }

    #[test]
    fn huge_single_line_is_cut_inside_the_line() {
        let line = "a".repeat(1_000_000);
        let rope = Rope::from_str(&format!("import os\n{line}\nprint(1)\n"));
        let cursor = 10 + 500_000;
        let max_chars = 8_000;
        let w = window(&rope, cursor, max_chars);
        assert!(w.text.chars().count() <= max_chars);
        assert!(w.start_char > 10, "the start is inside the huge line");
        assert_eq!(w.start_char % (max_chars / 4), 0);
        assert_eq!(w.line_prefix.chars().count(), max_chars);
        assert_eq!(w.line_suffix.chars().count(), LINE_SUFFIX_MAX_CHARS);
        assert_eq!(w.after.chars().count(), AFTER_MAX_CHARS);
        // The start still holds while typing inside the huge line.
        let mut rope = rope;
        rope.insert_char(cursor, 'b');
        assert_eq!(window(&rope, cursor + 1, max_chars).start_char, w.start_char);
    }

    #[test]
    fn ten_megabyte_document() {
        let rope = Rope::from_str(&numbered_lines(400_000));
        assert!(rope.len_bytes() > 10_000_000);
        let max_chars = 6_000;
        let started = std::time::Instant::now();
        for cursor in (0..rope.len_chars()).step_by(rope.len_chars() / 97) {
            let w = window(&rope, cursor, max_chars);
            assert!(w.text.chars().count() <= max_chars);
            assert!(is_line_start(&rope, w.start_char));
        }
        // Generous: 98 windows over O(window) slices take well under a millisecond each.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
