//! The `phi-lsp` command: serve LSP on stdio (the default), or run one job from the command line
//! (`complete`, `generate`, `bench`, `memory`).

#![deny(clippy::print_stdout)]

use std::process::ExitCode;

use clap::Parser;
use phi_lsp::{args, cli};

fn main() -> ExitCode {
    let args = args::Cli::parse();
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, saying what to do: the message chain joined, newlines folded.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("phi-lsp: error: {message}");
            ExitCode::from(2)
        }
    }
}
