//! Python-aware trimming of what the model produced: where a suggestion ends (so generation can stop
//! as soon as it has), and what of it is worth inserting at the cursor.
//!
//! Everything here reads `line_prefix + generated`: the suggestion continues the cursor's line. Lines
//! are judged by a small lexer that knows brackets, strings and comments, so a bracket or a
//! multi-line string's content never looks like a dedent or a new statement.

use super::prompt::PromptWindow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndentStyle {
    Spaces(usize),
    Tabs,
}

impl IndentStyle {
    /// The columns one tab counts for. In a tab-indented file it is also how many of the model's
    /// spaces make one tab: Phi-1 writes PEP 8's four.
    fn tab_width(self) -> usize {
        match self {
            IndentStyle::Spaces(n_spaces) => n_spaces.max(1),
            IndentStyle::Tabs => 4,
        }
    }
}

/// What post-processing needs to know about the document around the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub line_prefix: String,
    pub line_suffix: String,
    pub after: String,
    pub indent: IndentStyle,
}

impl Context {
    pub fn new(window: &PromptWindow, indent: IndentStyle) -> Self {
        Context {
            line_prefix: window.line_prefix.clone(),
            line_suffix: window.line_suffix.clone(),
            after: window.after.clone(),
            indent,
        }
    }
}

/// The file's indentation style, from the indentation steps between its statements (docstring and
/// bracket continuation lines say nothing about it). `Spaces(4)` when nothing is indented.
pub fn detect_indent(text: &str) -> IndentStyle {
    let mut n_tab_lines = 0usize;
    let mut n_space_lines = 0usize;
    let mut n_steps = [0usize; 9];
    let mut prev_width = 0usize;
    for line in split_lines(text) {
        if !line.starts_statement || first_code(line.text).is_none() {
            continue;
        }
        let leading = leading_whitespace(line.text);
        if leading.starts_with('\t') {
            n_tab_lines += 1;
            continue;
        }
        let width = leading.len();
        if width > 0 {
            n_space_lines += 1;
        }
        if let Some(count) = width
            .checked_sub(prev_width)
            .and_then(|step| n_steps.get_mut(step))
        {
            *count += 1;
        }
        prev_width = width;
    }
    if n_tab_lines > n_space_lines {
        return IndentStyle::Tabs;
    }
    // The most frequent step; ties go to 4, then to the smaller step.
    let best = (1..n_steps.len()).max_by_key(|&step| (n_steps[step], step == 4, std::cmp::Reverse(step)));
    match best {
        Some(step) if n_steps[step] > 0 => IndentStyle::Spaces(step),
        _ => IndentStyle::Spaces(4),
    }
}

/// True once `generated` (the raw model text so far) already contains a point where the suggestion
/// ends, so generation can stop. Agrees with `finish`: once this is true, `finish(generated + more)`
/// is `finish(generated)` whatever `more` is. O(len), called after every token.
pub fn should_stop(ctx: &Context, generated: &str) -> bool {
    end_of_suggestion(ctx, generated, false).is_some()
}

/// The suggestion to insert at the cursor, or None when there is nothing worth showing.
pub fn finish(ctx: &Context, generated: &str) -> Option<String> {
    let end = end_of_suggestion(ctx, generated, true).unwrap_or(generated.len());
    let trimmed = trim_lines(&generated[..end]);
    let mut suggestion = reindent(ctx, &trimmed);

    // The model cannot see the text after the cursor and often writes it again ("a, b)" before ")").
    let suffix = ctx.line_suffix.trim();
    if !suffix.is_empty() {
        if let Some(rest) = suggestion.strip_suffix(suffix) {
            suggestion = rest.trim_end().to_string();
        }
    }

    let text = suggestion.trim();
    if text.is_empty() || text == suffix || ctx.after.trim_start().starts_with(text) {
        return None;
    }
    Some(suggestion)
}

/// Where in `generated` the suggestion ends, if that is already decided. `at_eof`: the text is
/// complete, so its last, unterminated line can be judged as it stands.
///
/// A line is judged once what decides it is known: its indentation once its first non-blank char
/// has been seen, its statement end once its newline has, a top-level keyword once it is spelled
/// out (or ruled out). Lines are judged in order and the first cut wins, which is what makes
/// `should_stop` agree with `finish`.
fn end_of_suggestion(ctx: &Context, generated: &str, at_eof: bool) -> Option<usize> {
    let structural = statement_or_block_end(ctx, generated, at_eof);
    let repeated = repeated_line_start(ctx, generated, at_eof);
    match (structural, repeated) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The next line after the cursor's line that has code, without its terminator, when `after` holds
/// it whole (a `\n` follows it, or `after` is the rest of the document).
fn next_code_line(after: &str) -> Option<&str> {
    let (_, below) = after.split_once('\n')?;
    let whole_document = after.chars().count() < super::prompt::AFTER_MAX_CHARS;
    let mut rest = below;
    loop {
        let (raw, terminated, next) = match rest.split_once('\n') {
            Some((line, next)) => (line, true, next),
            None => (rest, false, ""),
        };
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if first_code(line).is_some() {
            return (terminated || whole_document).then_some(line);
        }
        if !terminated {
            return None;
        }
        rest = next;
    }
}

/// Where the suggestion starts repeating text the user already wrote below the cursor: the start of
/// the first suggested line that equals the next line with code after the cursor's line (same
/// indentation width, same text but for trailing whitespace). The cursor's line counts only when
/// its prefix is blank, so the line is all suggestion. A line is judged once it is complete, lines
/// in order, so `should_stop` agrees with `finish`.
fn repeated_line_start(ctx: &Context, generated: &str, at_eof: bool) -> Option<usize> {
    let next = next_code_line(&ctx.after)?;
    let tab_width = ctx.indent.tab_width();
    let next_width = indent_width(next, tab_width);
    let next_code = next.trim();
    let prefix_len = ctx.line_prefix.len();
    let text = format!("{}{generated}", ctx.line_prefix);
    let prefix_blank = first_code(&ctx.line_prefix).is_none();
    for (line_idx, line) in split_lines(&text).iter().enumerate() {
        if !(line.terminated || at_eof) {
            return None;
        }
        if (line_idx == 0 && !prefix_blank) || line.starts_in_string {
            continue;
        }
        if line.text.trim() == next_code && indent_width(line.text, tab_width) == next_width {
            return Some(line.start.saturating_sub(prefix_len));
        }
    }
    None
}

/// Where the statement or block the suggestion continues ends (the Python rules), if decided.
fn statement_or_block_end(ctx: &Context, generated: &str, at_eof: bool) -> Option<usize> {
    if first_code(&ctx.line_suffix).is_some() {
        // Text after the cursor stays on the cursor's line: the suggestion cannot go past that line.
        return generated.find('\n');
    }
    let prefix_len = ctx.line_prefix.len();
    let text = format!("{}{generated}", ctx.line_prefix);
    let lines = split_lines(&text);
    let tab_width = ctx.indent.tab_width();
    // Cuts are at a line start or end after the cursor line's prefix, so this never underflows;
    // saturate anyway rather than trust it.
    let in_generated = |combined_idx: usize| combined_idx.saturating_sub(prefix_len);

    if first_code(&ctx.line_prefix).is_none() {
        // The cursor is on a blank line: the suggestion is the rest of the block its first line is in.
        return block_end(&lines, BlockRule::Body, tab_width, at_eof).map(in_generated);
    }
    // Mid-line: the rest of the statement, up to the first line where the brackets opened since the
    // start of the cursor line are closed (and no string or backslash carries on).
    let mut statement_end = None;
    for (line_idx, line) in lines.iter().enumerate() {
        if !(line.terminated || at_eof) {
            return None;
        }
        if line.ends_statement {
            statement_end = Some(line_idx);
            break;
        }
    }
    let line_idx = statement_end?;
    let line = &lines[line_idx];
    if !line.opens_block {
        return Some(in_generated(line.start + line.text.len()));
    }
    // A block opener (`def f(x):`, `if x:`): its body is what follows, indented deeper than it.
    let rule = BlockRule::DeeperThan(indent_width(lines[0].text, tab_width));
    block_end(&lines[line_idx + 1..], rule, tab_width, at_eof).map(in_generated)
}

#[derive(Debug, Clone, Copy)]
enum BlockRule {
    /// The body of a block opener as deep as this: it ends at a line indented this deep or less.
    DeeperThan(usize),
    /// The block that the first non-blank line starts or continues: it ends at a line indented less
    /// than that first line, or at a new top-level definition.
    Body,
}

/// Where the block ends among `lines` (a byte index into the scanned text), if that is decided.
fn block_end(lines: &[Line<'_>], rule: BlockRule, tab_width: usize, at_eof: bool) -> Option<usize> {
    // Indentation at or above which lines stay in the block, once known.
    let mut min_width = match rule {
        BlockRule::DeeperThan(opener_width) => Some(opener_width + 1),
        BlockRule::Body => None,
    };
    let mut blank_run_start = None;
    // `@decorator` lines then `def`: one definition, when a decorator starts the suggestion.
    let mut in_decorators = false;
    for line in lines {
        if !line.starts_statement {
            continue;
        }
        let Some(code) = first_code(line.text) else {
            if !line.terminated {
                return None;
            }
            // Blank lines before the block's first line do not end it: some bodies start with them.
            if min_width.is_none() {
                continue;
            }
            match blank_run_start {
                Some(run_start) => return Some(run_start),
                None => blank_run_start = Some(line.start),
            }
            continue;
        };
        blank_run_start = None;
        let width = indent_width(line.text, tab_width);
        let Some(min_width) = min_width else {
            min_width = Some(width);
            in_decorators = width == 0 && code.starts_with('@');
            continue;
        };
        if width < min_width {
            return Some(line.start);
        }
        // Top-level definitions only matter to a block at indentation 0, the only one they do not
        // dedent below.
        if width > 0 {
            in_decorators = false;
            continue;
        }
        match top_level_kind(code, line.terminated || at_eof) {
            TopLevel::Undecided => return None,
            TopLevel::Other => in_decorators = false,
            TopLevel::Decorator if in_decorators => {}
            TopLevel::Definition if in_decorators => in_decorators = false,
            TopLevel::Definition | TopLevel::Decorator | TopLevel::Main => return Some(line.start),
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopLevel {
    Definition,
    Decorator,
    Main,
    Other,
    /// A partial line that could still become one of the others.
    Undecided,
}

const TOP_LEVEL_STARTS: [(&str, TopLevel); 5] = [
    ("def ", TopLevel::Definition),
    ("class ", TopLevel::Definition),
    ("async def ", TopLevel::Definition),
    ("@", TopLevel::Decorator),
    ("if __name__", TopLevel::Main),
];

/// What a statement at indentation 0 starts; `code` is the line from its first non-blank char.
fn top_level_kind(code: &str, complete: bool) -> TopLevel {
    if let Some(&(_, kind)) = TOP_LEVEL_STARTS.iter().find(|(start, _)| code.starts_with(start)) {
        return kind;
    }
    if !complete && TOP_LEVEL_STARTS.iter().any(|(start, _)| start.starts_with(code)) {
        return TopLevel::Undecided;
    }
    TopLevel::Other
}

/// Trailing whitespace off every line, and trailing blank lines off the end.
fn trim_lines(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').map(str::trim_end).collect();
    lines.join("\n").trim_end().to_string()
}

/// The suggestion's indentation in the file's style. Only whole leading runs are converted, and
/// never inside a multi-line string, whose content is the user's data.
fn reindent(ctx: &Context, suggestion: &str) -> String {
    let prefix = &ctx.line_prefix;
    // The first line's indentation is the prefix's plus the suggestion's; convert it whole when the
    // prefix is only indentation and the result still starts with what is already typed.
    if first_code(prefix).is_none() {
        let converted = reindent_lines(ctx.indent, &format!("{prefix}{suggestion}"), true);
        if let Some(rest) = converted.strip_prefix(prefix.as_str()) {
            return rest.to_string();
        }
    }
    let converted = reindent_lines(ctx.indent, &format!("{prefix}{suggestion}"), false);
    converted
        .strip_prefix(prefix.as_str())
        .map_or_else(|| suggestion.to_string(), str::to_string)
}

fn reindent_lines(indent: IndentStyle, text: &str, convert_first: bool) -> String {
    let tab_width = indent.tab_width();
    let mut out = String::with_capacity(text.len());
    for (line_idx, line) in split_lines(text).iter().enumerate() {
        if line_idx > 0 {
            out.push('\n');
        }
        let leading = leading_whitespace(line.text);
        let foreign = match indent {
            IndentStyle::Tabs => leading.contains(' '),
            IndentStyle::Spaces(_) => leading.contains('\t'),
        };
        if foreign && !line.starts_in_string && (line_idx > 0 || convert_first) {
            let width = indent_width(leading, tab_width);
            match indent {
                IndentStyle::Tabs => {
                    out.extend(std::iter::repeat_n('\t', width / tab_width));
                    out.extend(std::iter::repeat_n(' ', width % tab_width));
                }
                IndentStyle::Spaces(_) => out.extend(std::iter::repeat_n(' ', width)),
            }
            out.push_str(&line.text[leading.len()..]);
        } else {
            out.push_str(line.text);
        }
    }
    out
}

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

fn leading_whitespace(line: &str) -> &str {
    &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
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

#[cfg(test)]
mod tests {
    use std::io::Read;

    use ropey::Rope;

    use super::*;
    use crate::completion::prompt::window;

    const MAX_CHARS: usize = 6_000;

    fn context(source_with_cursor: &str) -> Context {
        let byte_idx = source_with_cursor.find("$0").expect("fixture has a $0 cursor");
        let rope = Rope::from_str(&source_with_cursor.replacen("$0", "", 1));
        let window = window(&rope, rope.byte_to_char(byte_idx), MAX_CHARS);
        let indent = detect_indent(&window.text);
        Context::new(&window, indent)
    }

    /// `should_stop` never stops where more text would change the suggestion: for every prefix of
    /// `generated` on which it stops, finishing that prefix, the whole text, or the prefix followed
    /// by unrelated text gives the same suggestion.
    fn assert_stop_agrees(ctx: &Context, generated: &str) {
        let whole = finish(ctx, generated);
        for (byte_idx, _) in generated.char_indices().skip(1).chain([(generated.len(), ' ')]) {
            let prefix = &generated[..byte_idx];
            if should_stop(ctx, prefix) {
                assert_eq!(
                    finish(ctx, prefix),
                    whole,
                    "stopped at {prefix:?} of {generated:?}"
                );
                for more in ["x", "\n", "\nzzz = (", " # :"] {
                    let longer = format!("{prefix}{more}");
                    assert_eq!(
                        finish(ctx, &longer),
                        whole,
                        "stopped at {prefix:?}, then {more:?}"
                    );
                }
            }
        }
    }

    /// Rows: (what, source with a `$0` cursor, raw model output, expected suggestion, whether
    /// generation stops on that output).
    #[rustfmt::skip]
    const CASES: &[(&str, &str, &str, Option<&str>, bool)] = &[
        ("body after a docstring, cursor at column 0",
         "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n$0",
         "    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
         Some("    return a + b"), true),
        ("body after a docstring, cursor at column 4 (editor auto-indent)",
         "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    $0",
         "total = a + b\n    return total\ndef sub(a, b):\n",
         Some("total = a + b\n    return total"), true),
        ("the whole body, with an inner blank line and nested blocks",
         "def total(xs):\n    \"\"\"Sum.\"\"\"\n$0\n\nprint(total([1]))\n",
         "    total = 0\n\n    for x in xs:\n        if x:\n            total += x\n    return total\nprint(total)\n",
         Some("    total = 0\n\n    for x in xs:\n        if x:\n            total += x\n    return total"), true),
        ("the body ends at the end of the text",
         "def one():\n    \"\"\"One.\"\"\"\n$0",
         "    return 1   \n   ",
         Some("    return 1"), false),
        ("mid-line: the rest of the statement",
         "def add(a, b):\n    return a$0\n",
         " + b\n\ndef sub(a, b):\n    return a - b\n",
         Some(" + b"), true),
        ("mid-line, still typing",
         "def add(a, b):\n    return a$0",
         " + b",
         Some(" + b"), false),
        ("an open bracket spans lines",
         "def f(xs):\n    result = sorted($0\n",
         "\n        xs,\n        key=len,\n    )\n    return result\n",
         Some("\n        xs,\n        key=len,\n    )"), true),
        ("brackets inside strings and comments do not count",
         "def f():\n    s = g(\"a(\", '#'$0",
         ")  # (\n    return s\n",
         Some(")  # ("), true),
        ("text after the cursor: one line, without the repeated tail",
         "x = foo($0)\n",
         "a, b)\nprint(x)\n",
         Some("a, b"), true),
        ("text after the cursor, not repeated",
         "x = foo($0)\n",
         "1, 2\n",
         Some("1, 2"), true),
        ("block opener at the end of the line",
         "def f(x):\n    if x:$0\n    return 0\n",
         "\n        return 1\n    return 0\n",
         Some("\n        return 1"), true),
        ("def opener at the end of the line",
         "def square(x):$0",
         "\n    return x * x\n\n\nprint(square(2))",
         Some("\n    return x * x"), true),
        ("the generated text completes a block opener",
         "def f(x):\n    if x$0\n",
         " > 0:\n        return 1\n    return 0\n",
         Some(" > 0:\n        return 1"), true),
        ("a block opener with a trailing comment",
         "def f(x):\n    if x:  # check$0\n",
         "\n        return 1\n    return 0\n",
         Some("\n        return 1"), true),
        ("a multi-line opener",
         "def f(a,$0",
         " b):\n    return a + b\n\nf(1, 2)\n",
         Some(" b):\n    return a + b"), true),
        ("a dedent below the block ends it",
         "class A:\n    def f(self):\n        \"\"\"Doc.\"\"\"\n$0",
         "        return 1\n\n    def g(self):\n        return 2\n",
         Some("        return 1"), true),
        ("nested definitions stay",
         "def f(n):\n    \"\"\"Doc.\"\"\"\n$0",
         "    def helper(k):\n        return k * 2\n\n    return helper(n)\n\nclass B:\n",
         Some("    def helper(k):\n        return k * 2\n\n    return helper(n)"), true),
        ("tabs file, model indents with spaces",
         "def f(xs):\n\t\"\"\"Sum.\"\"\"\n\t$0",
         "total = 0\n    for x in xs:\n        total += x\n    return total\ndef g():\n",
         Some("total = 0\n\tfor x in xs:\n\t\ttotal += x\n\treturn total"), true),
        ("tabs file, cursor at column 0",
         "def f(xs):\n\t\"\"\"Sum.\"\"\"\n$0",
         "    return sum(xs)\n\n\n",
         Some("\treturn sum(xs)"), true),
        ("tabs file, model indents with tabs",
         "def f(xs):\n\t\"\"\"Sum.\"\"\"\n$0",
         "\tif xs:\n\t\treturn 1\n\treturn 0\nx = 1",
         Some("\tif xs:\n\t\treturn 1\n\treturn 0"), true),
        ("spaces file, model indents with tabs",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "\tif True:\n\t\treturn 1\n",
         Some("    if True:\n        return 1"), false),
        ("two-space file",
         "def f():\n  \"\"\"Doc.\"\"\"\n  if x:\n    y = 1\n$0",
         "  return y\n\ndef g():\n",
         Some("  return y"), true),
        ("top level: a new def ends it",
         "import os\n$0",
         "x = 1\ny = 2\ndef f():\n    pass\n",
         Some("x = 1\ny = 2"), true),
        ("top level: a new async def ends it",
         "import os\n$0",
         "x = 1\nasync def f():\n    pass\n",
         Some("x = 1"), true),
        ("top level: a new class ends it",
         "import os\n$0",
         "x = 1\nclass A:\n    pass\n",
         Some("x = 1"), true),
        ("top level: if __name__ ends it",
         "import os\n$0",
         "x = 1\nif __name__ == '__main__':\n    main()\n",
         Some("x = 1"), true),
        ("top level: a decorator ends it",
         "import os\n$0",
         "x = 1\n@cache\ndef f():\n",
         Some("x = 1"), true),
        ("top level: the first line may be a def",
         "import os\n\n$0",
         "def f():\n    return 1\ndef g():\n    return 2\n",
         Some("def f():\n    return 1"), true),
        ("top level: a decorated def is one definition",
         "import functools\n\n$0",
         "@functools.cache\n@other\ndef fib(n):\n    return n\n@cache\ndef g():\n",
         Some("@functools.cache\n@other\ndef fib(n):\n    return n"), true),
        ("top level: a partial keyword does not stop",
         "import os\n$0",
         "x = 1\nde",
         Some("x = 1\nde"), false),
        ("top level: a word that starts like a keyword",
         "import os\n$0",
         "x = 1\ndefault = 2\nclassify(x)\n",
         Some("x = 1\ndefault = 2\nclassify(x)"), false),
        ("a run of two blank lines ends it",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "    a = 1\n\n\n    b = 2\n",
         Some("    a = 1"), true),
        ("blank lines with whitespace count as blank",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "    a = 1\n    \n  \n    b = 2\n",
         Some("    a = 1"), true),
        ("blank lines inside a string are content",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "    s = \"\"\"\n\n\nno dedent here\n\"\"\"\n    return s\nprint(1)\n",
         Some("    s = \"\"\"\n\n\nno dedent here\n\"\"\"\n    return s"), true),
        ("a backslash continues the statement",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "    x = 1 + \\\n2\n    return x\nprint(1)\n",
         Some("    x = 1 + \\\n2\n    return x"), true),
        ("a bracket continuation may dedent",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "    x = [\n1,\n]\n    return x\n\n\n",
         Some("    x = [\n1,\n]\n    return x"), true),
        ("whitespace-only output",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "   \n\n  ",
         None, false),
        ("blank lines before the first line of the body are kept",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0",
         "\n   \n    x = 1\n    return x\n\n\n",
         Some("\n\n    x = 1\n    return x"), true),
        ("empty output",
         "def f():\n    $0",
         "",
         None, false),
        ("output that repeats the next line",
         "def f(x):\n    \"\"\"Doc.\"\"\"\n$0    return x\n",
         "    return x\n",
         None, true),
        ("output that repeats the rest of the line",
         "def add(a, b):\n    return a$0 + b\n",
         " + b\n    return 0\n",
         None, true),
        ("the user wrote the next lines already: cut before the first repeated line",
         "def f(xs):\n    \"\"\"Sum.\"\"\"\n    total = 0\n$0\n    return total\n",
         "    for x in xs:\n        total += x\n    return total\n\n\n",
         Some("    for x in xs:\n        total += x"), true),
        ("a repeated line's text at another indentation is not a repeat",
         "def f(x):\n    if x:\n$0\n    return 1\n",
         "        y = 1\n        return 1\n    return 2\n",
         Some("        y = 1\n        return 1"), true),
        ("mid-line: a completed opener whose body the user already wrote",
         "def f(x):\n    if x$0\n        return 1\n    return 0\n",
         " > 0:\n        return 1\n    return 0\n",
         Some(" > 0:"), true),
        ("the next line with code counts, blank lines between are skipped",
         "def f(x):\n    \"\"\"Doc.\"\"\"\n$0\n\n   \n    return y\n",
         "    y = x * 2\n    return y\n",
         Some("    y = x * 2"), true),
        ("repeated lines in a CRLF file",
         "def f(x):\r\n    \"\"\"Doc.\"\"\"\r\n$0\r\n    return y\r\n",
         "    y = x\r\n    return y\r\n",
         Some("    y = x"), true),
        ("tabs file: the model's spaces repeat a tab-indented line",
         "def f(xs):\n\t\"\"\"Sum.\"\"\"\n$0\n\treturn total\n",
         "    total = sum(xs)\n    return total\n",
         Some("\ttotal = sum(xs)"), true),
        ("a line inside a string is content, not a repeat",
         "def f():\n    \"\"\"Doc.\"\"\"\n$0\n    return s\n",
         "    s = \"\"\"\n    return s\n\"\"\"\n    return s\n",
         Some("    s = \"\"\"\n    return s\n\"\"\""), true),
        ("the repeat is judged once its line is complete",
         "def f(x):\n    \"\"\"Doc.\"\"\"\n$0\n    return y\n",
         "    y = x\n    return y",
         Some("    y = x"), false),
        ("output that is only the closing bracket",
         "x = foo($0)\n",
         ")\n",
         None, true),
        ("CRLF output",
         "def f(x):\r\n    \"\"\"Doc.\"\"\"\r\n$0",
         "    y = x\r\n    return y\r\n\r\ndef g():\r\n",
         Some("    y = x\n    return y"), true),
        ("mid-line at the end of a complete statement",
         "x = 1$0\n",
         "\ny = 2\n",
         None, true),
        ("unicode in strings",
         "def greet():\n    \"\"\"Doc.\"\"\"\n$0",
         "    return \"héllo 😀 (\"\nprint(greet())\n",
         Some("    return \"héllo 😀 (\""), true),
    ];

    #[test]
    fn suggestions() {
        for &(what, source, generated, expected, stops) in CASES {
            let ctx = context(source);
            assert_eq!(finish(&ctx, generated).as_deref(), expected, "{what}");
            assert_eq!(should_stop(&ctx, generated), stops, "{what}: should_stop");
            assert_stop_agrees(&ctx, generated);
        }
    }

    #[test]
    fn next_code_line_needs_the_whole_line() {
        assert_eq!(
            next_code_line("x)\n\n  \n    return y\nz\n"),
            Some("    return y")
        );
        assert_eq!(next_code_line("\r\n    a = 1\r\n"), Some("    a = 1"));
        // The cursor's own line does not count, and the end of the document ends the last line.
        assert_eq!(next_code_line("    return y"), None);
        assert_eq!(next_code_line("\nlast"), Some("last"));
        assert_eq!(next_code_line("\n\n   "), None);
        // `after` was cut inside that line: it is not known whole.
        let cut = format!("\n{}", "a".repeat(super::super::prompt::AFTER_MAX_CHARS));
        assert_eq!(next_code_line(&cut), None);
    }

    #[test]
    fn detects_indentation() {
        #[rustfmt::skip]
        let cases = [
            ("", IndentStyle::Spaces(4)),
            ("x = 1\n", IndentStyle::Spaces(4)),
            ("def f():\n    return 1\n", IndentStyle::Spaces(4)),
            ("def f():\n  if x:\n    return 1\n  return 2\n", IndentStyle::Spaces(2)),
            ("def f():\n\tif x:\n\t\treturn 1\n", IndentStyle::Tabs),
            // A docstring's inner lines and bracket continuations are not statements.
            ("def f():\n    \"\"\"Doc.\n      indented text\n    \"\"\"\n    x = f(\n          1)\n", IndentStyle::Spaces(4)),
            // Ties go to 4.
            ("if a:\n  b\nif c:\n    d\n", IndentStyle::Spaces(4)),
        ];
        for (text, expected) in cases {
            assert_eq!(detect_indent(text), expected, "{text:?}");
        }
    }

    #[test]
    fn context_copies_the_window() {
        let ctx = context("def f():\n    return a$0 + b\nx = 1\n");
        assert_eq!(ctx.line_prefix, "    return a");
        assert_eq!(ctx.line_suffix, " + b");
        assert_eq!(ctx.after, " + b\nx = 1\n");
        assert_eq!(ctx.indent, IndentStyle::Spaces(4));
    }

    /// Continuations a model typically writes after a function body.
    const CONTINUATIONS: [&str; 5] = [
        "\n\ndef check(candidate):\n    pass\n",
        "\nprint(f(1))\n",
        "\n\nif __name__ == '__main__':\n    main()\n",
        "\n\n\nx = 1\n",
        "",
    ];

    /// OpenAI's HumanEval: each prompt ends after a docstring and a newline, so the cursor is at
    /// column 0 of an empty line and the suggestion must be the whole canonical body, whatever the
    /// model writes after it.
    #[test]
    fn humaneval_canonical_solutions() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/humaneval/HumanEval.jsonl.gz");
        let file = std::fs::File::open(&path)
            .expect("tests/fixtures/humaneval/HumanEval.jsonl.gz is in the repository");
        let mut jsonl = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut jsonl)
            .expect("gzip");
        let tokenizer =
            phi_engine::PhiTokenizer::from_file(std::path::Path::new("../assets/phi-1/tokenizer.json"))
                .expect("assets/phi-1/tokenizer.json parses");
        let n_tokens = |text: &str| tokenizer.encode(text).expect("encodes").len();
        let mut n_problems = 0;
        let mut longest = (0, String::new());
        let mut failures = Vec::new();
        for line in jsonl.lines().filter(|line| !line.trim().is_empty()) {
            let problem: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
            let task_id = problem["task_id"].as_str().expect("task_id");
            let prompt = problem["prompt"].as_str().expect("prompt");
            let solution = problem["canonical_solution"]
                .as_str()
                .expect("canonical_solution");
            n_problems += 1;

            // The tokens the model writes for the body and the start of the line after it, which
            // the stop rules need to see: all within the default cap, so none is cut.
            let body_tokens = n_tokens(&format!("{prompt}{solution}\n\ndef check")) - n_tokens(prompt);
            if body_tokens > longest.0 {
                longest = (body_tokens, task_id.to_string());
            }
            let ctx = context(&format!("{prompt}$0"));
            let expected = trim_lines(solution);
            for continuation in CONTINUATIONS {
                let generated = format!("{solution}{continuation}");
                let got = finish(&ctx, &generated);
                if got.as_deref() != Some(expected.as_str()) {
                    failures.push(format!("{task_id} + {continuation:?}: got {got:?}"));
                    continue;
                }
                if !continuation.is_empty() {
                    assert!(
                        should_stop(&ctx, &generated),
                        "{task_id} + {continuation:?}: did not stop"
                    );
                }
                assert_stop_agrees(&ctx, &generated);
            }
        }
        assert_eq!(n_problems, 164);
        assert!(
            longest.0 <= crate::settings::DEFAULT_MAX_NEW_TOKENS,
            "{} needs {} tokens, over the default cap",
            longest.1,
            longest.0
        );
        // A real count: the longest body (HumanEval/81) needs 299 with the stop.
        assert!(longest.0 > 250, "{longest:?}");
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
