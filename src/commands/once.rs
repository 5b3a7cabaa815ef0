//! `allowsync once [--force]`: one sync cycle. Exit 3 when a safety guard refused it, 1 when it
//! failed or a source failed (its last good list stood in), 0 otherwise.

use allowsync::cli::Cli;
use allowsync::engine::{Outcome, SourceReport};
use allowsync::syncer::{CycleReport, Syncer};

use super::{CmdResult, exit, exit_with, load, runtime};

pub fn run(cli: &Cli, force: bool) -> CmdResult {
    let cfg = load(cli)?;
    let mut syncer = Syncer::new(cfg, true)?;
    let report = runtime()?.block_on(syncer.cycle(force));
    exit_with(code(&report))
}

/// `once`'s exit code for a cycle (the cycle logged what happened).
fn code(report: &CycleReport) -> u8 {
    match &report.outcome {
        Ok(Outcome::Refused(_)) => exit::REFUSED,
        Err(_) => exit::FAILURE,
        Ok(_) if !report.sources.iter().all(SourceReport::is_fresh) => exit::FAILURE,
        Ok(_) => 0,
    }
}
