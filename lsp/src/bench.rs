//! `phi-lsp bench` (being written).

use anyhow::{bail, Result};
use clap::Args;

use crate::cli::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn run(_model: &ModelArgs, _args: BenchArgs) -> Result<()> {
    bail!("bench is being written")
}
