//! `allowsync teardown`: remove the table, sets and rules allowsync created; refused (exit 1)
//! while `run` or `once` holds the state lock.

use allowsync::backend;
use allowsync::cli::Cli;
use allowsync::state::StateFile;

use super::{CmdResult, load};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    // The lock `run` and `once` hold: a running daemon would recreate everything at its next
    // cycle. Held, it is an error naming the holder's pid (exit 1).
    let _lock = StateFile::new(&cfg.state_file).lock()?;
    let mut b = backend::from_config(&cfg.backend)?;
    b.teardown()?;
    println!("removed what allowsync created for backend {}", cfg.backend.kind());
    Ok(())
}
