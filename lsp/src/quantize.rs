//! `phi-lsp quantize` (being written).

use anyhow::{bail, Result};
use clap::Args;

use crate::cli::ModelArgs;

#[derive(Args, Debug)]
pub struct QuantizeArgs {}

pub fn run(_model: &ModelArgs, _args: QuantizeArgs) -> Result<()> {
    bail!("quantize is being written")
}
