//! `allowsync teardown`: remove the table, sets and rules allowsync created.

use allowsync::backend;
use allowsync::cli::Cli;

use super::{CmdResult, load};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    let mut b = backend::from_config(&cfg.backend)?;
    b.teardown()?;
    println!("removed what allowsync created for backend {}", cfg.backend.kind());
    Ok(())
}
