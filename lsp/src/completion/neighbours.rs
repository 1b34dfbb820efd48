//! Definitions from the other open documents: for the names this file imports (`from .shapes
//! import Circle`, `from shapes import Circle`, `import shapes` then `shapes.Circle`) that another
//! open document of the same workspace defines, their stubs (`stubs.rs`: signatures and docstrings,
//! no bodies), each module's after a `# shapes.py` comment. Only open documents: no file is read.
//!
//! [`collect`] finds them; `prompt.rs` puts them first in the prompt and fits them (at most a
//! quarter of `contextTokens`). They depend only on this file's top-level imports and the other
//! documents' text, so they are a prefix the KV cache keeps while the user types. Modules map to
//! documents by URI path: `a.b` is `D/a/b.py` or `D/a/b/__init__.py` for the nearest directory `D`
//! from this file's up (within its workspace root when the client named roots); `.b` is `b` in
//! this file's directory, `..b` one up.

use std::collections::HashMap;

use ropey::Rope;

use super::lines::split_lines;
use super::structure::import_statements;
use super::stubs::{definitions, identifier, Definition};

/// At most this many chars from the top of the file are read for its imports, and of an imported
/// document for its definitions: this runs on every keystroke, in documents of any size.
pub const IMPORTS_SCAN_CHARS: usize = 100_000;
pub const DEFINITIONS_SCAN_CHARS: usize = 200_000;

/// An open document other than the one completed in, as the completion module sees it.
#[derive(Debug, Clone)]
pub struct OpenDocument {
    pub uri: String,
    pub rope: Rope,
}

/// The open documents and the workspace roots the client named (URIs; none: any directory).
#[derive(Debug, Clone, Default)]
pub struct Workspace {
    pub roots: Vec<String>,
    pub documents: Vec<OpenDocument>,
}

/// One imported definition's stub; `rank` orders what is dropped for the budget (the highest
/// first): the import nearest the cursor is kept longest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stub {
    pub rank: usize,
    pub text: String,
}

/// One module's stubs, in the order its document defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The comment line's path: relative to the workspace root or this file's directory.
    pub label: String,
    pub stubs: Vec<Stub>,
}

/// What goes first in the prompt: the modules in the order this file first imports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Neighbours {
    pub modules: Vec<Module>,
}

impl Neighbours {
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Each module as `# label`, its stubs a blank line apart, then two blank lines.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for module in &self.modules {
            text.push_str(&format!("# {}\n", module.label));
            let stubs: Vec<&str> = module.stubs.iter().map(|s| s.text.as_str()).collect();
            text.push_str(&stubs.join("\n"));
            text.push_str("\n\n");
        }
        text
    }

    /// Drops the stub of the highest rank (a module left empty goes too). False if none was left.
    pub fn drop_one(&mut self) -> bool {
        let mut worst = None;
        for (m, module) in self.modules.iter().enumerate() {
            for (s, stub) in module.stubs.iter().enumerate() {
                worst = worst.max(Some((stub.rank, m, s)));
            }
        }
        let Some((_, m, s)) = worst else {
            return false;
        };
        self.modules[m].stubs.remove(s);
        if self.modules[m].stubs.is_empty() {
            self.modules.remove(m);
        }
        true
    }

    /// These stubs, less the ones [`Neighbours::drop_one`] drops first, until `fits` their text.
    pub fn fitted(mut self, mut fits: impl FnMut(&str) -> bool) -> Neighbours {
        while !self.is_empty() && !fits(&self.text()) {
            self.drop_one();
        }
        self
    }
}

/// One top-level import: the module as written (leading dots for relative ones) and what it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// Line of the statement in the document.
    pub line: usize,
    pub module: String,
    /// `None`: `import module [as alias]`, the module's names used as `alias.name`; else the
    /// names of `from module import …` (`*` for all its public ones).
    pub names: Option<Vec<String>>,
    /// The name the module is bound to (`import a.b` binds `a.b` as far as `a.b.X` goes).
    pub alias: String,
}

/// The top-level imports of `text`, in file order.
pub fn parse_imports(text: &str) -> Vec<Import> {
    let mut found = Vec::new();
    for (line, statement) in import_statements(&split_lines(text)) {
        // The statement as one line: no comments, continuations or brackets.
        let flat: String = statement
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default().trim_end_matches('\\'))
            .collect::<Vec<_>>()
            .join(" ")
            .replace(['(', ')'], " ");
        let words: Vec<&str> = flat.split_whitespace().collect();
        match words.as_slice() {
            ["import", rest @ ..] => {
                for item in rest.join(" ").split(',') {
                    let parts: Vec<&str> = item.split_whitespace().collect();
                    let (module, alias) = match parts.as_slice() {
                        [module] => (*module, *module),
                        [module, "as", alias] => (*module, *alias),
                        _ => continue,
                    };
                    found.push(Import {
                        line,
                        module: module.to_string(),
                        names: None,
                        alias: alias.to_string(),
                    });
                }
            }
            ["from", module, "import", rest @ ..] => {
                let names = rest
                    .join(" ")
                    .split(',')
                    .filter_map(|item| item.split_whitespace().next().map(str::to_string))
                    .collect();
                found.push(Import {
                    line,
                    module: module.to_string(),
                    names: Some(names),
                    alias: String::new(),
                });
            }
            _ => {}
        }
    }
    found
}

/// The stubs for what `uri` (with `rope`, the cursor on `cursor_line`) imports from the other open
/// documents of `workspace`.
pub fn collect(uri: &str, rope: &Rope, cursor_line: usize, workspace: &Workspace) -> Neighbours {
    if workspace.documents.iter().all(|doc| doc.uri == uri) {
        return Neighbours::default();
    }
    let text = rope.slice(..rope.len_chars().min(IMPORTS_SCAN_CHARS)).to_string();
    let imports = parse_imports(&text);
    let Some(root) = root_of(uri, &workspace.roots).filter(|_| !imports.is_empty()) else {
        return Neighbours::default();
    };
    let documents: HashMap<&str, &Rope> = (workspace.documents.iter())
        .filter(|doc| doc.uri != uri && under(&doc.uri, root))
        .map(|doc| (doc.uri.as_str(), &doc.rope))
        .collect();
    let mut defined: HashMap<String, Vec<Definition>> = HashMap::new();
    // (import, module document, name), nearest the cursor first: the index is the rank.
    let mut picks: Vec<(usize, String, String)> = Vec::new();
    let mut order: Vec<usize> = (0..imports.len()).collect();
    order.sort_by_key(|&i| (imports[i].line.abs_diff(cursor_line), std::cmp::Reverse(i)));
    for i in order {
        let import = &imports[i];
        let mut wanted = |module_uri: &str, names: Vec<String>| {
            for name in names {
                if !picks.iter().any(|(_, m, n)| m == module_uri && *n == name) {
                    picks.push((i, module_uri.to_string(), name));
                }
            }
        };
        let module_uri = resolve(uri, root, &import.module, &documents);
        let Some(names) = &import.names else {
            if let Some(module_uri) = module_uri {
                let defs = definitions_of(&mut defined, &documents, &module_uri);
                wanted(&module_uri, module_names(&defs, &text, &import.alias));
            }
            continue;
        };
        for name in names {
            let defs = (module_uri.as_deref())
                .map_or_else(Vec::new, |m| definitions_of(&mut defined, &documents, m));
            match &module_uri {
                // All its public names (none is used as `*.X`), in its order.
                Some(module_uri) if name == "*" => wanted(module_uri, module_names(&defs, "", name)),
                Some(module_uri) if defs.iter().any(|d| d.name == *name) => {
                    wanted(module_uri, vec![name.clone()]);
                }
                // `from pkg import shapes`: a module, whose names this file uses as `shapes.X`.
                _ => {
                    let dot = if import.module.ends_with('.') { "" } else { "." };
                    let submodule = format!("{}{dot}{name}", import.module);
                    if let Some(sub_uri) = resolve(uri, root, &submodule, &documents) {
                        let defs = definitions_of(&mut defined, &documents, &sub_uri);
                        wanted(&sub_uri, module_names(&defs, &text, name));
                    }
                }
            }
        }
    }
    // The text's order: modules by their first import in the file, stubs as their module has them.
    let mut modules: Vec<(usize, String)> = Vec::new();
    for (i, module_uri, _) in &picks {
        match modules.iter_mut().find(|(_, m)| m == module_uri) {
            Some(module) => module.0 = module.0.min(*i),
            None => modules.push((*i, module_uri.clone())),
        }
    }
    modules.sort();
    let modules = (modules.into_iter())
        .map(|(_, module_uri)| {
            let stubs = (defined.get(&module_uri).into_iter().flatten())
                .filter_map(|d| {
                    let rank = picks
                        .iter()
                        .position(|(_, m, n)| *m == module_uri && *n == d.name)?;
                    Some(Stub {
                        rank,
                        text: d.stub.clone(),
                    })
                })
                .collect();
            Module {
                label: label(&module_uri, uri, root),
                stubs,
            }
        })
        .collect();
    Neighbours { modules }
}

/// The definitions of the open document `module_uri` (read once per request, at most
/// [`DEFINITIONS_SCAN_CHARS`] of it).
fn definitions_of(
    defined: &mut HashMap<String, Vec<Definition>>,
    documents: &HashMap<&str, &Rope>,
    module_uri: &str,
) -> Vec<Definition> {
    let parse = || {
        (documents.get(module_uri))
            .map(|rope| {
                rope.slice(..rope.len_chars().min(DEFINITIONS_SCAN_CHARS))
                    .to_string()
            })
            .map(|text| definitions(&text))
            .unwrap_or_default()
    };
    defined
        .entry(module_uri.to_string())
        .or_insert_with(parse)
        .clone()
}

/// The names a module bound to `alias` gives `text`: its public ones used as `alias.NAME` first,
/// then its other public ones, each group in the module's order.
fn module_names(defs: &[Definition], text: &str, alias: &str) -> Vec<String> {
    let used = uses(text, alias);
    let (mut first, rest): (Vec<String>, Vec<String>) = (defs.iter())
        .map(|d| d.name.clone())
        .filter(|name| !name.starts_with('_'))
        .partition(|name| used.contains(name));
    first.extend(rest);
    first
}

/// The names used as `alias.NAME` in `text`.
fn uses(text: &str, alias: &str) -> Vec<String> {
    let needle = format!("{alias}.");
    let mut names = Vec::new();
    for (at, _) in text.match_indices(&needle) {
        if text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let name = identifier(&text[at + needle.len()..]);
        if !name.is_empty() && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// The root of `uri`'s workspace: the longest root it is under (without a final `/`), or `""`
/// when the client named none; `None` when `uri` is under none of them.
fn root_of<'a>(uri: &str, roots: &'a [String]) -> Option<&'a str> {
    if roots.is_empty() {
        return Some("");
    }
    (roots.iter())
        .map(|root| root.trim_end_matches('/'))
        .filter(|root| under(uri, root))
        .max_by_key(|root| root.len())
}

/// `uri` is inside the folder `root` (`""`: anywhere).
fn under(uri: &str, root: &str) -> bool {
    root.is_empty() || uri.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
}

/// The open document that is `module` for a file at `uri`: for `a.b`, `D/a/b.py` or
/// `D/a/b/__init__.py`, `D` this file's directory or the nearest above it that has one (not above
/// `root`); for `.b`, `..b`, from this file's directory or the ones above it.
fn resolve(uri: &str, root: &str, module: &str, documents: &HashMap<&str, &Rope>) -> Option<String> {
    let dir = &uri[..uri.rfind('/')?];
    let dots = module.len() - module.trim_start_matches('.').len();
    let parts: Vec<&str> = module[dots..].split('.').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| identifier(p) != *p) {
        return None;
    }
    let path = parts.join("/");
    let up = |dir: &str, levels: usize| -> Option<String> {
        let mut dir = dir.to_string();
        for _ in 0..levels {
            dir.truncate(dir.rfind('/')?);
        }
        (dir.len() >= root.trim_end_matches('/').len() && dir.contains('/')).then_some(dir)
    };
    let candidates = |dir: &str| {
        let base = format!("{dir}/{path}");
        let base = base.trim_end_matches('/');
        let file = (!path.is_empty()).then(|| format!("{base}.py"));
        file.into_iter().chain([format!("{base}/__init__.py")])
    };
    let find = |dir: &str| candidates(dir).find(|c| documents.contains_key(c.as_str()));
    if dots > 0 {
        return find(&up(dir, dots - 1)?);
    }
    (0..)
        .map_while(|levels| up(dir, levels))
        .find_map(|dir| find(&dir))
}

/// How the comment names `module_uri`: its path from the directory it shares with `uri` (or the
/// root), a package's `__init__.py` with its folder; percent-escapes decoded.
fn label(module_uri: &str, uri: &str, root: &str) -> String {
    let mut common = (module_uri.bytes().zip(uri.bytes()))
        .take_while(|(a, b)| a == b)
        .count();
    while !module_uri.is_char_boundary(common) {
        common -= 1;
    }
    let mut start = module_uri[..common].rfind('/').map_or(0, |at| at + 1);
    let root = root.trim_end_matches('/');
    if !root.is_empty() && module_uri.starts_with(root) {
        start = start.max(root.len() + 1);
    }
    if module_uri[start..].starts_with("__init__.py") {
        start = module_uri[..start.saturating_sub(1)]
            .rfind('/')
            .map_or(start, |at| at + 1);
    }
    // A comment line stays one line, whatever the URI escaped.
    let decoded = percent_decoded(&module_uri[start..]);
    decoded
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%').then(|| text.get(i + 1..i + 3)).flatten();
        let (byte, len) = hex
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .map_or((bytes[i], 1), |byte| (byte, 3));
        out.push(byte);
        i += len;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
