//! Python-aware trimming of what the model produced: where a suggestion ends (so generation can stop
//! as soon as it has), and what of it is worth inserting at the cursor.
//!
//! Everything here reads `line_prefix + generated`: the suggestion continues the cursor's line. Lines
//! are judged by a small lexer that knows brackets, strings and comments, so a bracket or a
//! multi-line string's content never looks like a dedent or a new statement.

use super::lines::{first_code, indent_width, split_lines, Line};
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

/// The suggestions (already post-processed, the greedy one first) that are worth offering side by
/// side, in order, at most `max`: a blank one, or one that differs from an earlier one only in
/// trailing whitespace (of a line or of the whole), is dropped, since cycling to it would show
/// nothing new.
pub fn distinct(suggestions: impl IntoIterator<Item = String>, max: usize) -> Vec<String> {
    fn key(text: &str) -> String {
        let lines: Vec<&str> = text.trim_end().lines().map(str::trim_end).collect();
        lines.join("\n")
    }
    let mut kept: Vec<(String, String)> = Vec::new();
    for suggestion in suggestions {
        if kept.len() == max {
            break;
        }
        let k = key(&suggestion);
        if k.trim().is_empty() || kept.iter().any(|(seen, _)| *seen == k) {
            continue;
        }
        kept.push((k, suggestion));
    }
    kept.into_iter().map(|(_, s)| s).collect()
}

/// `text` up to the end of its `n`th line (without that newline), or all of it when it has fewer.
pub fn first_lines(text: &str, n: usize) -> &str {
    match text.match_indices('\n').nth(n.saturating_sub(1)) {
        Some((at, _)) if n > 0 => &text[..at],
        _ if n == 0 => "",
        _ => text,
    }
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

fn leading_whitespace(line: &str) -> &str {
    &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
}

#[cfg(test)]
mod tests;
