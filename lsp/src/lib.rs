//! phi-lsp: the only crate that knows LSP and JSON. The binary's entry point is `main.rs`; the
//! modules are a library so end-to-end tests and benchmarks can reach them.

#![deny(clippy::print_stdout)]

pub mod args;
pub mod bench;
pub mod cli;
pub mod completion;
pub mod convert;
pub mod documents;
pub mod faults;
pub mod framing;
pub mod host;
pub mod hub;
pub mod loading;
pub mod lsp_client;
pub mod memory;
pub mod notebooks;
pub mod params;
pub mod progress;
pub mod proto;
pub mod quantize;
pub mod remote;
pub mod server;
pub mod settings;
pub mod status;
pub mod stdout;
pub mod transport;
