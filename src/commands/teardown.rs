//! `allowsync teardown`: remove exactly what allowsync created (the configuration's objects and
//! those the state file records), empty the operator's sets it filled, and print what it
//! removed and what it left.

use allowsync::backend;
use allowsync::cli::Cli;
use allowsync::ownership::lock::ObjectLocks;
use allowsync::state::StateFile;

use super::{CmdResult, load};

pub fn run(cli: &Cli) -> CmdResult {
    let cfg = load(cli)?;
    // The locks `run` and `once` hold: a running daemon would recreate everything at its next
    // cycle. Held, it is an error naming the holder's pid (exit 1): the state file's by any
    // allowsync on this state, an object's by any allowsync on these objects.
    let file = StateFile::new(&cfg.state_file);
    let _lock = file.lock()?;
    let mut b = backend::from_config(&cfg.backend)?;
    let _objects = ObjectLocks::take(&b.managed(), &cfg.path)?;
    let mut state = file.load()?;
    b.set_recorded(&state.objects);
    let report = b.teardown()?;
    print!("{}", report.render());
    // What is gone is no longer allowsync's: an object of that name created later is not.
    if let Some(objects) = b.footprint().filter(|f| *f != state.objects) {
        state.objects = objects;
        file.save(&state)?;
    }
    Ok(())
}
