//! Post-processing against hand-made cases and HumanEval's canonical bodies.

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
    let file =
        std::fs::File::open(&path).expect("tests/fixtures/humaneval/HumanEval.jsonl.gz is in the repository");
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

#[test]
fn distinct_keeps_the_first_of_each_suggestion_in_order() {
    let got = distinct(
        [
            "total = 0".to_string(),
            "total = 0  ".into(),
            "   ".into(),
            "count = 0\n    for x in xs:".into(),
            "total = 0\n".into(),
            "count = 0  \n    for x in xs:\n".into(),
            "return 0".into(),
        ],
        5,
    );
    assert_eq!(got, ["total = 0", "count = 0\n    for x in xs:", "return 0"]);
    // At most `max`, the greedy one (first) always among them.
    let got = distinct(["a".to_string(), "b".into(), "c".into()], 2);
    assert_eq!(got, ["a", "b"]);
    assert_eq!(distinct(["a".to_string(), "a".into()], 3), ["a"]);
    assert!(distinct(Vec::<String>::new(), 3).is_empty());
}

#[test]
fn first_lines_cuts_before_the_nth_newline() {
    assert_eq!(first_lines("a\nb\nc", 1), "a");
    assert_eq!(first_lines("a\nb\nc", 2), "a\nb");
    assert_eq!(first_lines("a\nb\nc", 3), "a\nb\nc");
    assert_eq!(first_lines("a\nb\n", 2), "a\nb");
    assert_eq!(first_lines("a", 4), "a");
    assert_eq!(first_lines("a\nb", 0), "");
}
