use super::*;

const SHAPES: &str = "\"\"\"Shapes.\"\"\"\nimport math\n\n\nclass Circle:\n    \"\"\"A circle.\"\"\"\n\n    def __init__(self, r):\n        self.r = r\n\n    def area(self):\n        \"\"\"Its area.\"\"\"\n        return math.pi * self.r ** 2\n\n\nclass Square:\n    def __init__(self, side):\n        self.side = side\n\n\ndef _private():\n    return 0\n";
const CIRCLE: &str = "class Circle:\n    \"\"\"A circle.\"\"\"\n\n    def __init__(self, r):\n        ...\n\n    def area(self):\n        \"\"\"Its area.\"\"\"\n";
const SQUARE: &str = "class Square:\n\n    def __init__(self, side):\n        ...\n";
const COLORS: &str = "RED = \"#f00\"\n\n\ndef blend(a, b):\n    \"\"\"Mix two colors.\"\"\"\n    return a\n";

fn workspace(roots: &[&str], documents: &[(&str, &str)]) -> Workspace {
    Workspace {
        roots: roots.iter().map(|r| r.to_string()).collect(),
        documents: (documents.iter())
            .map(|(uri, text)| OpenDocument {
                uri: uri.to_string(),
                rope: Rope::from_str(text),
            })
            .collect(),
    }
}

/// The neighbours of `file:///w/main.py` with `text` (the cursor at its end).
fn of(text: &str, workspace: &Workspace) -> Neighbours {
    let rope = Rope::from_str(text);
    collect("file:///w/main.py", &rope, rope.len_lines() - 1, workspace)
}

fn labels_and_stubs(neighbours: &Neighbours) -> Vec<(String, Vec<String>)> {
    (neighbours.modules.iter())
        .map(|m| (m.label.clone(), m.stubs.iter().map(|s| s.text.clone()).collect()))
        .collect()
}

#[test]
fn the_import_forms() {
    let text = "import os, shapes as s\nimport a.b.c as d  # comment\nimport a.b\nfrom . import x\nfrom ..pkg.mod import (\n    A,  # first\n    B as C,\n)\nfrom m import *\nif True:\n    import hidden\n";
    let import = |line, module: &str, names: Option<&[&str]>, alias: &str| Import {
        line,
        module: module.into(),
        names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
        alias: alias.into(),
    };
    assert_eq!(
        parse_imports(text),
        [
            import(0, "os", None, "os"),
            import(0, "shapes", None, "s"),
            import(1, "a.b.c", None, "d"),
            import(2, "a.b", None, "a.b"),
            import(3, ".", Some(&["x"]), ""),
            import(4, "..pkg.mod", Some(&["A", "B"]), ""),
            import(8, "m", Some(&["*"]), ""),
        ]
    );
}

#[test]
fn from_module_import_name() {
    let ws = workspace(
        &[],
        &[("file:///w/shapes.py", SHAPES), ("file:///w/colors.py", COLORS)],
    );
    let found = of("from shapes import Circle\n\nc = Circle(1)\n", &ws);
    assert_eq!(
        labels_and_stubs(&found),
        [("shapes.py".to_string(), vec![CIRCLE.to_string()])]
    );
    assert_eq!(found.text(), format!("# shapes.py\n{CIRCLE}\n\n"));
    // Relative, and from a package's `__init__.py` one level up.
    let ws = workspace(
        &[],
        &[
            ("file:///w/shapes.py", SHAPES),
            ("file:///pkg/__init__.py", COLORS),
        ],
    );
    let rope = Rope::from_str("from .shapes import Circle, Missing\n");
    let found = collect("file:///w/main.py", &rope, 1, &ws);
    assert_eq!(
        labels_and_stubs(&found),
        [("shapes.py".to_string(), vec![CIRCLE.to_string()])]
    );
    let rope = Rope::from_str("from .. import blend, RED\n");
    let found = collect("file:///pkg/sub/main.py", &rope, 2, &ws);
    let colors = definitions(COLORS);
    assert_eq!(
        labels_and_stubs(&found),
        [(
            "pkg/__init__.py".to_string(),
            vec![colors[0].stub.clone(), colors[1].stub.clone()]
        )]
    );
}

#[test]
fn import_module_then_module_dot_name() {
    let ws = workspace(
        &[],
        &[("file:///w/geo/shapes.py", SHAPES), ("file:///shapes.py", COLORS)],
    );
    // The names used come first in rank, the others after; the text keeps the module's order.
    let found = of("import geo.shapes as s\n\nx = s.Square(2)\n", &ws);
    assert_eq!(
        labels_and_stubs(&found),
        [(
            "geo/shapes.py".to_string(),
            vec![CIRCLE.to_string(), SQUARE.to_string()]
        )]
    );
    let ranks: Vec<usize> = found.modules[0].stubs.iter().map(|s| s.rank).collect();
    assert_eq!(ranks, [1, 0]);
    // `from geo import shapes` is the same module; `import geo.shapes` binds `geo.shapes`.
    let found = of("from geo import shapes\nshapes.Circle\n", &ws);
    assert_eq!(found.modules[0].stubs[0].rank, 0);
    assert_eq!(found.modules[0].stubs.len(), 2);
    let found = of("import geo.shapes\n", &ws);
    assert_eq!(found.modules[0].label, "geo/shapes.py");
    // The nearest directory wins: `shapes` next to main.py before the one at the top.
    let ws = workspace(
        &[],
        &[("file:///w/shapes.py", SHAPES), ("file:///shapes.py", COLORS)],
    );
    assert_eq!(of("import shapes\n", &ws).modules[0].stubs.len(), 2);
    let ws = workspace(&[], &[("file:///shapes/__init__.py", COLORS)]);
    assert_eq!(of("import shapes\n", &ws).modules[0].label, "shapes/__init__.py");
}

#[test]
fn only_open_documents_of_the_same_workspace() {
    let docs = [
        ("file:///w/a/main.py", "from shapes import Circle\n"),
        ("file:///w/shapes.py", SHAPES),
        ("file:///other/shapes.py", SHAPES),
    ];
    let text = "from shapes import Circle\nfrom colors import RED\n";
    let rope = Rope::from_str(text);
    // Nothing open that it imports, nothing at all, the document itself.
    assert!(of(text, &workspace(&[], &[("file:///w/colors2.py", COLORS)])).is_empty());
    assert!(of(text, &Workspace::default()).is_empty());
    assert!(collect(
        "file:///w/shapes.py",
        &Rope::from_str("from shapes import Circle\n"),
        1,
        &workspace(&[], &docs)
    )
    .is_empty());
    // Roots: the file's root bounds the search; a file under no root gets nothing.
    let found = collect(
        "file:///w/a/main.py",
        &rope,
        2,
        &workspace(&["file:///w/"], &docs),
    );
    assert_eq!(
        labels_and_stubs(&found),
        [("shapes.py".to_string(), vec![CIRCLE.to_string()])]
    );
    let found = collect(
        "file:///w/a/main.py",
        &rope,
        2,
        &workspace(&["file:///w/a"], &docs),
    );
    assert!(found.is_empty(), "{found:?}");
    let found = collect("file:///x/main.py", &rope, 2, &workspace(&["file:///w"], &docs));
    assert!(found.is_empty());
    // Percent-escapes are compared as sent, decoded in the label.
    let ws = workspace(&["file:///my%20w"], &[("file:///my%20w/lib/shapes.py", SHAPES)]);
    let found = collect(
        "file:///my%20w/main.py",
        &Rope::from_str("from lib.shapes import Circle\n"),
        1,
        &ws,
    );
    assert_eq!(found.modules[0].label, "lib/shapes.py");
    assert_eq!(percent_decoded("a%20b%2"), "a b%2");
    let ws = workspace(
        &["file:///w"],
        &[("file:///w2/shapes.py", SHAPES), ("file:///w/a%0Ab.py", COLORS)],
    );
    assert!(under("file:///w/x.py", "file:///w") && !under("file:///w2/x.py", "file:///w"));
    let found = collect(
        "file:///w/main.py",
        &Rope::from_str(
            "import shapes
import a
",
        ),
        2,
        &ws,
    );
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(
        label("file:///w/a%0Ab.py", "file:///w/main.py", "file:///w"),
        "a?b.py"
    );
}

#[test]
fn stable_order_and_nearest_imports_kept_longest() {
    let ws = workspace(
        &[],
        &[("file:///w/shapes.py", SHAPES), ("file:///w/colors.py", COLORS)],
    );
    // Modules in the order the file imports them, each module's stubs in its own order.
    let found = of(
        "from shapes import Square, Circle\nfrom colors import blend\n\n\nx = 1\n",
        &ws,
    );
    let blend = definitions(COLORS)[1].stub.clone();
    assert_eq!(
        labels_and_stubs(&found),
        [
            (
                "shapes.py".to_string(),
                vec![CIRCLE.to_string(), SQUARE.to_string()]
            ),
            ("colors.py".to_string(), vec![blend.clone()]),
        ]
    );
    assert_eq!(
        found,
        of(
            "from shapes import Square, Circle\nfrom colors import blend\n\n\nx = 12\n",
            &ws
        )
    );
    // The import nearest the cursor (colors, then shapes' names in order) is dropped last.
    let mut texts = Vec::new();
    let mut fitting = found.clone();
    while fitting.drop_one() {
        texts.push(fitting.text());
    }
    assert_eq!(
        texts,
        [
            format!("# shapes.py\n{SQUARE}\n\n# colors.py\n{blend}\n\n"),
            format!("# colors.py\n{blend}\n\n"),
            String::new(),
        ]
    );
    let budget = format!("# colors.py\n{blend}\n\n").len();
    assert_eq!(found.clone().fitted(|t| t.len() <= budget).text().len(), budget);
    assert!(found.fitted(|t| t.len() < 10).is_empty());
}

#[test]
fn editing_a_body_in_the_other_document_changes_nothing() {
    let text = "from shapes import Circle\n";
    let before = of(text, &workspace(&[], &[("file:///w/shapes.py", SHAPES)]));
    let edited = SHAPES.replace("self.r = r", "self.r = abs(r)  # typed");
    assert_eq!(
        before,
        of(text, &workspace(&[], &[("file:///w/shapes.py", &edited)]))
    );
    let renamed = SHAPES.replace("def area(self)", "def area(self, unit)");
    assert_ne!(
        before,
        of(text, &workspace(&[], &[("file:///w/shapes.py", &renamed)]))
    );
}
