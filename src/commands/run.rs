//! `allowsync run`: the daemon ([`allowsync::daemon`]), until SIGTERM.

use allowsync::cli::Cli;

use super::{CmdResult, load, runtime};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    runtime()?.block_on(allowsync::daemon::run(&cli.config, cfg))?;
    Ok(())
}
