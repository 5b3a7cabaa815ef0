//! allowsync keeps a firewall allowlist in step with the webhook egress addresses that Tencent
//! Cloud Chat publishes through its `GetIPList` REST API.
//!
//! The flow of one sync, module by module:
//!
//! ```text
//! source/ (GetIPList per app and nettype, static entries)
//!   -> prefixes (validate, both families, aggregate)      -> the desired set
//!      admission (refuse what must never be allowed)
//!   -> backend/ (read the live set, diff, apply in one transaction)
//!   -> state (last good list, written atomically)
//! ```
//!
//! [`engine`] takes every decision of a sync without I/O; [`syncer`] runs one cycle with its I/O
//! (fetch, backend, state file, the log line) and [`daemon`] runs cycles on a schedule.
//! [`usersig`] mints the TLSSigAPIv2 usersig that authenticates GetIPList calls.
//!
//! [`config`] reads the YAML file, [`cli`] defines the command line; the binary (`main.rs`,
//! `commands/`) runs the commands and owns their output and exit codes. Test support lives in
//! its own crate, `testkit/`, never in this one.
//!
//! The daemon ([`daemon`]) runs cycles through [`syncer`], and between them keeps allowsync's
//! objects in place: [`repair`] puts back from memory what someone else deleted, [`coalesce`]
//! turns bursts of signals and notifications into single, rate-limited runs.
//!
//! Observability: [`health`] tells a healthy allowlist from a degraded one (for `status`,
//! `/healthz` and `STATUS=`), [`metrics`] exports Prometheus metrics fed from each cycle.
//!
//! Errors: every error type's message includes its cause (`lock file …: Read-only file system
//! (os error 30)`), and none returns it again as [`std::error::Error::source`]. Logs print an
//! error with `%e` (its message only) and the binary with `{e:#}` (the message and its source
//! chain): either way each cause appears once.

#![deny(unsafe_code)]

pub mod admission;
pub mod backend;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod ownership;
pub mod prefixes;
pub mod published;
pub mod repair;
pub mod source;
pub mod state;
pub mod syncer;
pub mod usersig;

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use crate::backend::BackendError;
    use crate::config::ConfigError;
    use crate::daemon::DaemonError;
    use crate::source::SourceError;
    use crate::state::StateError;
    use crate::syncer::SyncerError;

    /// Each error with an I/O cause, alone and wrapped, printed as the binary prints errors.
    #[test]
    fn every_cause_is_printed_once() {
        let erofs = || io::Error::from_raw_os_error(libc::EROFS);
        let path = || PathBuf::from("/var/lib/allowsync/state.json");
        let kernel =
            || BackendError::Kernel { op: "commit", object: "table inet allowsync".into(), cause: erofs() };
        let lock = || StateError::Lock { path: path(), cause: erofs() };
        let state = || StateError::Io { path: path(), op: "write", cause: erofs() };
        let errors: Vec<anyhow::Error> = vec![
            ConfigError::Read { path: path(), cause: erofs() }.into(),
            state().into(),
            SyncerError::State(state()).into(),
            lock().into(),
            SyncerError::State(lock()).into(),
            DaemonError::Syncer(SyncerError::State(lock())).into(),
            DaemonError::Signals(erofs()).into(),
            SourceError::CaFileRead { path: path(), cause: erofs() }.into(),
            kernel().into(),
            SyncerError::Backend(kernel()).into(),
        ];
        let cause = erofs().to_string();
        for e in errors {
            let shown = format!("{e:#}");
            assert_eq!(shown.matches(&cause).count(), 1, "{shown}");
            assert_eq!(e.chain().count(), 1, "no source() behind the message: {shown}");
        }
    }
}
