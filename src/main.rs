//! The `allowsync` binary: parses the command line and hands each command to the library.
//! Errors become messages and exit codes here, and only here.

use std::process::ExitCode;

use allowsync::cli::{Cli, Command};
use allowsync::config::Config;
use allowsync::exit;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::CheckConfig => check_config(&cli),
        Command::Run
        | Command::Once { .. }
        | Command::Plan
        | Command::Fetch
        | Command::Status { .. }
        | Command::Teardown
        | Command::Usersig { .. } => {
            eprintln!("allowsync: not implemented yet");
            exit::FAILURE
        }
    };
    ExitCode::from(code as u8)
}

fn check_config(cli: &Cli) -> i32 {
    match Config::load(&cli.config) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", cfg.summary());
            exit::OK
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            exit::USAGE
        }
    }
}
