//! What another module defines, as Python the model reads without its bodies: the top-level
//! `class`/`def` statements of a document with their decorators, their signatures (multi-line ones
//! whole) and their docstrings; a class keeps its methods (and nested classes) the same way and its
//! one-line attributes (`x: int = 0`); a body that has no docstring becomes `...`. One-line
//! top-level assignments (`PI = 3.14`) are kept as written.
//!
//! [`definitions`] reads them; `neighbours.rs` picks the ones a file imports.

use super::lines::{first_code, indent_width, split_lines, Line};

/// The columns a tab counts for, as Python's tokenizer counts them.
const TAB_WIDTH: usize = 8;
/// A one-line assignment longer than this is a data table, not a signature: it is left out.
const MAX_ASSIGNMENT_CHARS: usize = 120;
/// A "signature" longer than this is a bracket left open while editing: the definition is left out.
const MAX_SIGNATURE_LINES: usize = 40;
/// A docstring longer than this keeps its first lines and is closed after them.
const MAX_DOCSTRING_LINES: usize = 12;

/// One top-level definition of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub name: String,
    /// Its stub: Python text, each line ending in `\n`.
    pub stub: String,
}

/// The top-level definitions of `text`, in file order.
pub fn definitions(text: &str) -> Vec<Definition> {
    let lines = split_lines(text);
    let mut found = Vec::new();
    let mut idx = 0;
    let mut decorators: Option<usize> = None;
    while idx < lines.len() {
        let Some(code) = statement_code(&lines[idx]) else {
            idx += 1;
            continue;
        };
        if indent_width(lines[idx].text, TAB_WIDTH) > 0 {
            idx += 1;
            continue;
        }
        if code.starts_with('@') {
            decorators.get_or_insert(idx);
            idx = statement_end(&lines, idx) + 1;
            continue;
        }
        let first = decorators.take().unwrap_or(idx);
        if let Some(name) = defined_name(code) {
            let mut stub = String::new();
            idx = definition_stub(&lines, first, idx, &mut stub);
            if !stub.is_empty() {
                found.push(Definition { name, stub });
            }
            continue;
        }
        let end = statement_end(&lines, idx);
        if let Some(name) = assigned_name(code).filter(|_| end == idx && lines[idx].terminated) {
            if lines[idx].text.chars().count() <= MAX_ASSIGNMENT_CHARS {
                found.push(Definition {
                    name,
                    stub: format!("{}\n", lines[idx].text),
                });
            }
        }
        idx = end + 1;
    }
    found
}

/// The line's code when a statement starts on it (not a blank line, a comment or a continuation).
fn statement_code<'a>(line: &Line<'a>) -> Option<&'a str> {
    first_code(line.text).filter(|code| line.starts_statement && !code.starts_with('#'))
}

/// The line where the statement starting at `from` ends (the last line, if it never does).
fn statement_end(lines: &[Line<'_>], from: usize) -> usize {
    (from..lines.len())
        .find(|&idx| lines[idx].ends_statement)
        .unwrap_or(lines.len().saturating_sub(1))
}

/// The name a `def`, `async def` or `class` statement defines.
fn defined_name(code: &str) -> Option<String> {
    let rest = ["def ", "async def ", "class "]
        .iter()
        .find_map(|keyword| code.strip_prefix(keyword))?;
    let name = identifier(rest.trim_start());
    (!name.is_empty()).then(|| name.to_string())
}

/// The name a simple assignment or annotation (`NAME = …`, `NAME: T = …`) binds.
fn assigned_name(code: &str) -> Option<String> {
    let name = identifier(code);
    let rest = code[name.len()..].trim_start();
    let assigns = (rest.starts_with('=') && !rest.starts_with("==")) || rest.starts_with(':');
    (!name.is_empty() && assigns).then(|| name.to_string())
}

/// The identifier `text` starts with (empty if none).
pub fn identifier(text: &str) -> &str {
    let starts = text.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_');
    if !starts {
        return "";
    }
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// Writes the stub of the definition whose statement is at `def_idx` (its decorators from `first`)
/// to `out` (nothing for a signature that never ends); returns the index of the first line after
/// its block.
fn definition_stub(lines: &[Line<'_>], first: usize, def_idx: usize, out: &mut String) -> usize {
    let indent = indent_width(lines[def_idx].text, TAB_WIDTH);
    let end = statement_end(lines, def_idx);
    if end - def_idx > MAX_SIGNATURE_LINES {
        return end + 1;
    }
    push_lines(&lines[first..=end], out);
    // A one-line definition (`def f(): return 1`) is kept as written: its body is its line.
    if !lines[end].opens_block {
        return end + 1;
    }
    let is_class = statement_code(&lines[def_idx]).is_some_and(|code| code.starts_with("class "));
    let block_end = (end + 1..lines.len())
        .find(|&idx| {
            statement_code(&lines[idx]).is_some() && indent_width(lines[idx].text, TAB_WIDTH) <= indent
        })
        .unwrap_or(lines.len());
    let Some(body_first) = (end + 1..block_end).find(|&idx| statement_code(&lines[idx]).is_some()) else {
        out.push_str(&format!("{}    ...\n", leading(lines[def_idx].text)));
        return block_end;
    };
    let body_indent = indent_width(lines[body_first].text, TAB_WIDTH);
    let mut wrote_body = false;
    let mut decorators: Option<usize> = None;
    let mut idx = body_first;
    while idx < block_end {
        let Some(code) = statement_code(&lines[idx]) else {
            idx += 1;
            continue;
        };
        if indent_width(lines[idx].text, TAB_WIDTH) != body_indent {
            idx += 1;
            continue;
        }
        let statement_last = statement_end(lines, idx).min(block_end - 1);
        if idx == body_first && is_string(code) {
            docstring_stub(&lines[idx..=statement_last], code, out);
            wrote_body = true;
            idx = statement_last + 1;
            continue;
        }
        if !is_class {
            // A function's body is dropped: only its docstring is kept.
            break;
        }
        if code.starts_with('@') {
            decorators.get_or_insert(idx);
            idx = statement_last + 1;
            continue;
        }
        let member_first = decorators.take().unwrap_or(idx);
        if defined_name(code).is_some() {
            let mut member = String::new();
            idx = definition_stub(lines, member_first, idx, &mut member).min(block_end);
            if !member.is_empty() {
                out.push('\n');
                out.push_str(&member);
                wrote_body = true;
            }
            continue;
        }
        let one_line = statement_last == idx && lines[idx].text.chars().count() <= MAX_ASSIGNMENT_CHARS;
        if one_line && assigned_name(code).is_some() {
            push_lines(&lines[idx..=idx], out);
            wrote_body = true;
        }
        idx = statement_last + 1;
    }
    if !wrote_body {
        out.push_str(&format!("{}...\n", leading(lines[body_first].text)));
    }
    block_end
}

fn push_lines(lines: &[Line<'_>], out: &mut String) {
    for line in lines {
        out.push_str(line.text);
        out.push('\n');
    }
}

/// The whitespace `line` starts with.
fn leading(line: &str) -> &str {
    &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
}

/// Writes a docstring (`lines`, its statement starting with `code`); a long one is cut to its first
/// lines and closed with its own quotes.
fn docstring_stub(lines: &[Line<'_>], code: &str, out: &mut String) {
    let unprefixed = code.trim_start_matches(['r', 'R', 'u', 'U', 'b', 'B']);
    let quote = ["\"\"\"", "'''"].into_iter().find(|q| unprefixed.starts_with(q));
    match quote {
        Some(quote) if lines.len() > MAX_DOCSTRING_LINES => {
            push_lines(&lines[..MAX_DOCSTRING_LINES - 1], out);
            out.push_str(&format!("{}{quote}\n", leading(lines[0].text)));
        }
        _ => push_lines(lines, out),
    }
}

/// Whether a statement starts with a string literal (a docstring, when it is a body's first).
fn is_string(code: &str) -> bool {
    let unprefixed = code.trim_start_matches(['r', 'R', 'u', 'U', 'b', 'B']);
    unprefixed.len() + 2 >= code.len() && unprefixed.starts_with(['"', '\''])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stubs(text: &str) -> Vec<(String, String)> {
        definitions(text).into_iter().map(|d| (d.name, d.stub)).collect()
    }

    const SHAPES: &str = r#""""Shapes."""
import math

PI = 3.14159
_TABLE = [1, 2, 3]


@dataclass(frozen=True)
class Circle(Shape):
    """A circle of radius r."""

    r: float = 1.0
    kind = "circle"

    def __init__(self, r):
        self.r = r

    @property
    def area(
        self,
        scale: float = 1.0,
    ) -> float:
        """The area, scaled.

        Long text.
        """
        if scale < 0:
            raise ValueError("negative")
        return math.pi * self.r ** 2 * scale

    class Unit:
        '''A unit circle.'''
        def make(cls):
            return Circle(1)


def area_of(shape):  # the area
    # a comment first
    """Any shape's area."""
    return shape.area


async def fetch(url):
    return await get(url)


def square(x): return x * x
if __name__ == "__main__":
    print(area_of(Circle(2)))
"#;

    #[test]
    fn classes_keep_method_signatures_and_docstrings_not_bodies() {
        let found = stubs(SHAPES);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["PI", "_TABLE", "Circle", "area_of", "fetch", "square"]);
        assert_eq!(found[0].1, "PI = 3.14159\n");
        let circle = &found[2].1;
        assert_eq!(
            circle,
            concat!(
                "@dataclass(frozen=True)\n",
                "class Circle(Shape):\n",
                "    \"\"\"A circle of radius r.\"\"\"\n",
                "    r: float = 1.0\n",
                "    kind = \"circle\"\n",
                "\n",
                "    def __init__(self, r):\n",
                "        ...\n",
                "\n",
                "    @property\n",
                "    def area(\n",
                "        self,\n",
                "        scale: float = 1.0,\n",
                "    ) -> float:\n",
                "        \"\"\"The area, scaled.\n",
                "\n",
                "        Long text.\n",
                "        \"\"\"\n",
                "\n",
                "    class Unit:\n",
                "        '''A unit circle.'''\n",
                "\n",
                "        def make(cls):\n",
                "            ...\n",
            )
        );
        assert!(!circle.contains("raise") && !circle.contains("self.r = r"));
        assert_eq!(
            found[3].1,
            "def area_of(shape):  # the area\n    \"\"\"Any shape's area.\"\"\"\n"
        );
        assert_eq!(found[4].1, "async def fetch(url):\n    ...\n");
        assert_eq!(found[5].1, "def square(x): return x * x\n");
    }

    #[test]
    fn odd_documents_give_what_is_whole() {
        // A definition at the end of an unterminated document, an empty body, tabs.
        assert_eq!(stubs("def f(x):"), [("f".into(), "def f(x):\n    ...\n".into())]);
        assert_eq!(
            stubs("class A:\n\tdef g(self):\n\t\treturn 1\n"),
            [("A".into(), "class A:\n\n\tdef g(self):\n\t\t...\n".into())]
        );
        assert!(stubs("").is_empty());
        assert!(stubs("x == 1\nprint(2)\n    y = 1\n").is_empty());
        // A signature never closed is kept as far as it goes.
        let open = stubs("def f(\n    a,\n");
        assert_eq!(open[0].0, "f");
        assert!(open[0].1.starts_with("def f(\n    a,\n"));
        let open = format!("def f(\n{}\ndef g():\n    pass\n", "    a,\n".repeat(50));
        assert!(stubs(&open).is_empty());
    }

    #[test]
    fn a_long_docstring_is_cut_and_closed() {
        let body: String = (0..30).map(|i| format!("    line {i}\n")).collect();
        let text = format!("def f():\n    \"\"\"Title.\n{body}    \"\"\"\n    return 1\n");
        let stub = &stubs(&text)[0].1;
        assert_eq!(stub.lines().count(), 1 + MAX_DOCSTRING_LINES);
        assert!(stub.ends_with("    line 9\n    \"\"\"\n"), "{stub}");
    }
}
