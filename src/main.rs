//! `menshen`: parse the command line, then run the daemon, the demo or a tool (`cli::run`).

#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    menshen::cli::run(menshen::cli::Cli::parse())
}
