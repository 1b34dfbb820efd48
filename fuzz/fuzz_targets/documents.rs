//! The document-edit path against an independent model: open, change (full or ranged edits with
//! positions anywhere, inverted ranges, any encoding, stale versions) and close, applied both to
//! `Documents` and to a plain `String` per document. After every operation the two must agree on
//! the outcome (applied or refused) and on the text and version, so an edit is all or nothing and
//! no input panics.

#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phi_lsp::convert::{Pos, PositionEncoding};
use phi_lsp::documents::{Documents, Edit};

/// Small, so edits also run into the size limit.
const MAX_BYTES: usize = 512;

#[derive(Arbitrary, Debug)]
enum Op {
    Open {
        doc: u8,
        text: String,
        version: i8,
    },
    Change {
        doc: u8,
        version: i8,
        edits: Vec<FuzzEdit>,
    },
    Close {
        doc: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct FuzzEdit {
    /// `None`: full replacement.
    range: Option<((u8, u16), (u8, u16))>,
    text: String,
}

#[derive(Arbitrary, Debug)]
struct Input {
    encoding: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let enc = match input.encoding % 3 {
        0 => PositionEncoding::Utf8,
        1 => PositionEncoding::Utf16,
        _ => PositionEncoding::Utf32,
    };
    let mut docs = Documents::new(MAX_BYTES);
    let mut model: HashMap<String, (String, i32)> = HashMap::new();
    for op in input.ops {
        match op {
            Op::Open { doc, text, version } => {
                let uri = uri(doc);
                let ok = docs.open(&uri, &text, version.into(), "python").is_ok();
                assert_eq!(ok, text.len() <= MAX_BYTES, "open of {} bytes", text.len());
                if ok {
                    model.insert(uri, (text, version.into()));
                }
            }
            Op::Change { doc, version, edits } => {
                let uri = uri(doc);
                let edits: Vec<Edit> = edits
                    .into_iter()
                    .map(|e| Edit {
                        range: e.range.map(|((l0, c0), (l1, c1))| {
                            (Pos::new(l0.into(), c0.into()), Pos::new(l1.into(), c1.into()))
                        }),
                        text: e.text,
                    })
                    .collect();
                let got = docs.change(&uri, version.into(), &edits, enc).is_ok();
                let want = match model.get(&uri) {
                    None => None,
                    Some((text, have)) if i32::from(version) > *have => apply_all(text, &edits, enc),
                    Some(_) => None,
                };
                assert_eq!(
                    got,
                    want.is_some(),
                    "outcome of {edits:?} on {:?}",
                    model.get(&uri)
                );
                if let Some(text) = want {
                    model.insert(uri.clone(), (text, version.into()));
                }
            }
            Op::Close { doc } => {
                let uri = uri(doc);
                assert_eq!(docs.close(&uri), model.remove(&uri).is_some());
            }
        }
        assert_eq!(docs.len(), model.len());
        for (uri, (text, version)) in &model {
            let document = docs.get(uri).expect("open in both");
            assert_eq!(&document.rope.to_string(), text);
            assert_eq!(document.version, *version);
        }
    }
});

fn uri(doc: u8) -> String {
    format!("file:///doc{}.py", doc % 4)
}

/// The edits applied in order, or `None` where the server must refuse the change.
fn apply_all(text: &str, edits: &[Edit], enc: PositionEncoding) -> Option<String> {
    let mut text = text.to_string();
    for edit in edits {
        match edit.range {
            None => text = edit.text.clone(),
            Some((start, end)) => {
                if start > end {
                    return None;
                }
                let a = offset(&text, start, enc)?;
                let b = offset(&text, end, enc)?;
                text.replace_range(a..b, &edit.text);
            }
        }
        if text.len() > MAX_BYTES {
            return None;
        }
    }
    Some(text)
}

/// The byte offset of an LSP position: lines end at `\n`, `\r\n` or `\r`; a character past the
/// line's content clamps to its end; one inside a char rounds down to the char's start.
fn offset(text: &str, pos: Pos, enc: PositionEncoding) -> Option<usize> {
    // (start, end of content) of every line.
    let mut lines = Vec::new();
    let bytes = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                lines.push((start, i));
                start = i + 1;
            }
            b'\r' => {
                lines.push((start, i));
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    lines.push((start, bytes.len()));
    let &(line_start, line_end) = lines.get(pos.line as usize)?;
    let mut units = 0usize;
    let mut at = line_start;
    for c in text[line_start..line_end].chars() {
        let width = match enc {
            PositionEncoding::Utf8 => c.len_utf8(),
            PositionEncoding::Utf16 => c.len_utf16(),
            PositionEncoding::Utf32 => 1,
        };
        if units + width > pos.character as usize {
            break;
        }
        units += width;
        at += c.len_utf8();
    }
    Some(at)
}
