//! `phi-lsp memory` (being written).

use anyhow::{bail, Result};

use crate::cli::{MemoryArgs, ModelArgs};

pub fn run(_model: &ModelArgs, _args: MemoryArgs) -> Result<()> {
    bail!("memory is being written")
}
