//! `allowsync teardown`: remove the table, sets and rules allowsync created.

use allowsync::backend;
use allowsync::cli::Cli;
use allowsync::syncer;

use super::{CmdResult, load};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    // The lock `run` and `once` hold: a running daemon would recreate everything at its next
    // cycle. Held, it is an error naming the holder's pid (exit 1).
    let _lock = syncer::lock_state(&cfg.state_file)?;
    let mut b = backend::from_config(&cfg.backend)?;
    b.teardown()?;
    println!("removed what allowsync created for backend {}", cfg.backend.kind());
    Ok(())
}
