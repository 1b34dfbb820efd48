//! The open notebooks (LSP 3.17 notebook sync, as VS Code sends it for Jupyter notebooks): each
//! notebook's cells in order and which of them are code, so that a completion in a cell reads the
//! notebook's earlier code cells before the cell's own text. The cells' text is kept by
//! `Documents` like any open document's; this is only the order. Plain types, no LSP.

use std::collections::HashMap;
use std::fmt;

/// One cell of a notebook: the URI of its text document and whether it is code (markup cells
/// are never part of a prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub uri: String,
    pub code: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum NotebookError {
    Unknown(String),
    CellsOutOfRange {
        uri: String,
        start: usize,
        delete: usize,
        cells: usize,
    },
}

impl fmt::Display for NotebookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotebookError::Unknown(uri) => write!(
                f,
                "notebook {uri} is not open: send notebookDocument/didOpen before changing it"
            ),
            NotebookError::CellsOutOfRange {
                uri,
                start,
                delete,
                cells,
            } => write!(
                f,
                "notebook {uri} has {cells} cells: a change that deletes {delete} from cell \
                 {start} on does not fit (the server keeps the cells as they were)"
            ),
        }
    }
}

impl std::error::Error for NotebookError {}

/// The open notebooks, keyed by the notebook's URI as the client sent it.
#[derive(Debug, Default)]
pub struct Notebooks {
    by_uri: HashMap<String, Vec<Cell>>,
}

impl Notebooks {
    /// Opens `uri` with `cells` in order, replacing any notebook open under it.
    pub fn open(&mut self, uri: &str, cells: Vec<Cell>) {
        self.by_uri.insert(uri.to_string(), cells);
    }

    /// Replaces `delete` cells from `start` on with `cells` (LSP's `NotebookCellArrayChange`). All
    /// or nothing: a range past the end changes nothing.
    pub fn splice(
        &mut self,
        uri: &str,
        start: usize,
        delete: usize,
        cells: Vec<Cell>,
    ) -> Result<(), NotebookError> {
        let have = self
            .by_uri
            .get_mut(uri)
            .ok_or_else(|| NotebookError::Unknown(uri.to_string()))?;
        let end = start.checked_add(delete).filter(|&end| end <= have.len());
        let Some(end) = end else {
            return Err(NotebookError::CellsOutOfRange {
                uri: uri.to_string(),
                start,
                delete,
                cells: have.len(),
            });
        };
        have.splice(start..end, cells);
        Ok(())
    }

    /// Sets whether the cells of `uri` named in `cells` are code (LSP's cell `data` change); cells
    /// it does not have are skipped.
    pub fn set_kinds(&mut self, uri: &str, cells: &[Cell]) -> Result<(), NotebookError> {
        let have = self
            .by_uri
            .get_mut(uri)
            .ok_or_else(|| NotebookError::Unknown(uri.to_string()))?;
        for changed in cells {
            if let Some(cell) = have.iter_mut().find(|cell| cell.uri == changed.uri) {
                cell.code = changed.code;
            }
        }
        Ok(())
    }

    /// Forgets `uri` and gives back its cells; `None` if it was not open.
    pub fn close(&mut self, uri: &str) -> Option<Vec<Cell>> {
        self.by_uri.remove(uri)
    }

    pub fn contains(&self, uri: &str) -> bool {
        self.by_uri.contains_key(uri)
    }

    /// The cells of `uri`, in order (empty when it is not open).
    pub fn cells(&self, uri: &str) -> &[Cell] {
        self.by_uri.get(uri).map_or(&[], Vec::as_slice)
    }

    /// The URIs of the code cells before `cell_uri` in the notebook that has it, in order; `None`
    /// when no open notebook has it (a plain document).
    pub fn preceding(&self, cell_uri: &str) -> Option<Vec<&str>> {
        self.by_uri.values().find_map(|cells| {
            let at = cells.iter().position(|cell| cell.uri == cell_uri)?;
            Some(
                (cells[..at].iter())
                    .filter(|cell| cell.code)
                    .map(|cell| cell.uri.as_str())
                    .collect(),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.by_uri.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uri.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NB: &str = "file:///n.ipynb";

    fn code(uri: &str) -> Cell {
        Cell {
            uri: uri.to_string(),
            code: true,
        }
    }

    fn markup(uri: &str) -> Cell {
        Cell {
            uri: uri.to_string(),
            code: false,
        }
    }

    fn opened() -> Notebooks {
        let mut notebooks = Notebooks::default();
        notebooks.open(NB, vec![code("c0"), markup("m1"), code("c2"), code("c3")]);
        notebooks
    }

    #[test]
    fn a_cell_follows_the_earlier_code_cells() {
        let notebooks = opened();
        assert_eq!(notebooks.preceding("c0"), Some(vec![]));
        assert_eq!(notebooks.preceding("c2"), Some(vec!["c0"]));
        assert_eq!(notebooks.preceding("c3"), Some(vec!["c0", "c2"]));
        assert_eq!(notebooks.preceding("m1"), Some(vec!["c0"]));
        assert_eq!(notebooks.preceding("file:///plain.py"), None);
    }

    #[test]
    fn structure_changes_move_cells() {
        let mut notebooks = opened();
        // A new cell at the top, and c2 deleted.
        notebooks.splice(NB, 0, 0, vec![code("new")]).expect("fits");
        notebooks.splice(NB, 3, 1, vec![]).expect("fits");
        assert_eq!(notebooks.preceding("c3"), Some(vec!["new", "c0"]));
        // Appending at the end is in range; past it is not, and changes nothing.
        notebooks.splice(NB, 4, 0, vec![code("last")]).expect("fits");
        let err = notebooks.splice(NB, 4, 2, vec![]).expect_err("past the end");
        assert_eq!(
            err,
            NotebookError::CellsOutOfRange {
                uri: NB.into(),
                start: 4,
                delete: 2,
                cells: 5
            }
        );
        assert!(notebooks.splice(NB, usize::MAX, 1, vec![]).is_err());
        assert_eq!(notebooks.preceding("last"), Some(vec!["new", "c0", "c3"]));
    }

    #[test]
    fn a_cell_that_becomes_markup_leaves_the_prompt() {
        let mut notebooks = opened();
        notebooks
            .set_kinds(NB, &[markup("c0"), code("m1"), code("elsewhere")])
            .expect("open");
        assert_eq!(notebooks.preceding("c3"), Some(vec!["m1", "c2"]));
    }

    #[test]
    fn unknown_and_closed_notebooks() {
        let mut notebooks = opened();
        assert_eq!(
            notebooks.splice("file:///other.ipynb", 0, 0, vec![]),
            Err(NotebookError::Unknown("file:///other.ipynb".into()))
        );
        assert!(notebooks.set_kinds("file:///other.ipynb", &[]).is_err());
        assert_eq!(notebooks.len(), 1);
        assert_eq!(notebooks.close(NB).map(|cells| cells.len()), Some(4));
        assert!(notebooks.is_empty());
        assert_eq!(notebooks.preceding("c2"), None);
        assert_eq!(notebooks.close(NB), None);
    }
}
