//! `allowsync usersig --source NAME`: a fresh usersig for a Chat source and its expiry (for
//! curl). Exit 2 when there is no such Chat source.

use allowsync::cli::Cli;
use allowsync::clock;
use allowsync::source::chat;
use allowsync::usersig::Minted;

use super::{CmdResult, Failure, load};

pub fn run(cli: &Cli, name: &str) -> CmdResult {
    let cfg = load(cli)?;
    let minted = chat::mint_usersig(&cfg, name, clock::now_unix()).map_err(Failure::usage)?;
    print!("{}", render(&minted));
    Ok(())
}

/// `allowsync usersig` output: the usersig and when it expires. This is the one place a
/// usersig is printed, on purpose, to stdout.
fn render(m: &Minted) -> String {
    format!(
        "usersig: {}\nexpires: {} ({} Unix seconds)\n",
        m.usersig.expose(),
        clock::rfc3339(m.expires_at()),
        m.expires_at()
    )
}
