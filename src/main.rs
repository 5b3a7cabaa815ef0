//! The `allowsync` binary: parses the command line and hands each command to
//! [`commands`]. Errors become messages and exit codes here, and only here.

#![deny(unsafe_code)]

mod commands;

use std::process::ExitCode;

use allowsync::cli::Cli;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ExitCode::from(commands::dispatch(&cli))
}
