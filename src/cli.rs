//! The command line, defined once with clap: `main.rs` dispatches on it, and the build
//! generates the man page and shell completions from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the configuration is read from when neither `-c` nor `ALLOWSYNC_CONFIG` is given.
/// Spelled out here rather than imported, so that `build.rs` can compile this file on its own
/// to generate the man page and completions; a test keeps it equal to `config::DEFAULT_PATH`.
pub const DEFAULT_PATH: &str = "/etc/allowsync/config.yaml";

/// Keep nftables sets (or ipsets) in step with Tencent Cloud Chat's webhook egress addresses.
///
/// allowsync polls the Chat REST API GetIPList, merges the lists with static entries, and
/// applies the difference to the firewall in one atomic transaction. A failed or suspicious
/// fetch never shrinks the allowlist.
///
/// Exit codes: 0 success; 1 runtime failure; 2 usage or configuration error; 3 refused by a
/// safety guard.
#[derive(Debug, Parser)]
#[command(name = "allowsync", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long = "config", env = "ALLOWSYNC_CONFIG", default_value = DEFAULT_PATH, global = true, value_name = "FILE")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: restore the last good allowlist, then poll and sync every interval.
    Run,
    /// Sync once (fetch, check the safety guards, apply), then exit.
    Once {
        /// Apply even when the mass removal or mass widening guard would refuse. Never applies an
        /// empty list (see safety.allow_empty), an entry wider than the minimum prefix length or
        /// a special range.
        #[arg(long)]
        force: bool,
    },
    /// Fetch and print what a sync would add and remove, per family; change nothing.
    Plan,
    /// Fetch and print the normalized list of every source; touch no firewall.
    Fetch,
    /// Validate the configuration and print a summary of it.
    CheckConfig,
    /// Show the last sync, the last error, the set sizes and whether the kernel drifted.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove exactly what allowsync created, empty the sets of yours it filled, and say what was
    /// removed and what was left.
    Teardown,
    /// Print a fresh usersig for a Chat source, and when it expires (for use with curl).
    Usersig {
        /// The name of a tencent_chat source in the configuration.
        #[arg(long, value_name = "NAME")]
        source: String,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_path_is_the_configuration_default() {
        assert_eq!(super::DEFAULT_PATH, crate::config::DEFAULT_PATH);
    }
}
