//! The one place that writes to stdout: the one-shot commands' results. The server never does
//! (its stdout is the LSP transport), which `#![deny(clippy::print_stdout)]` holds everywhere else.

/// One line of a command's result on stdout.
#[allow(clippy::print_stdout)]
pub fn print_line(text: &str) {
    println!("{text}");
}
