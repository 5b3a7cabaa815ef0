//! Firewall backends: where an allowlist lives in the kernel.
//!
//! The engine only ever talks to a [`Backend`]: it reads what the kernel holds, computes a
//! [`Diff`] against the desired set, and hands that diff to [`Backend::apply`], which must
//! commit it as **one** atomic transaction or not at all. Everything else (netlink batches,
//! ipset messages) stays inside the backend.
//!
//! - [`dry_run`]: logs the transaction it would send and keeps nothing;
//! - [`nftables`]: two interval sets (and optionally an enforcement chain) in an nftables table,
//!   over netlink (`netlink.rs`, the transport);
//! - [`ipset`]: two `hash:net` ipsets over the ipset netlink protocol (no `ipset` program), and
//!   optionally an iptables enforcement chain through `iptables-restore`. ipset has no
//!   transactions: that module's docs say how a failed apply still leaves the sets as they were
//!   (swap, or the exact inverse).
//! - [`file`]: the allowlist written to a file (json, plain, nginx, haproxy) for a proxy or a
//!   web server, with an optional reload command;
//! - [`Cached`]: wraps any backend and skips the costly read while the kernel's ruleset
//!   generation says nothing changed since we last looked; [`from_config`] wraps every backend
//!   in it.
//!
//! The engine's unit tests use an in-memory backend with the kernel's rules (`memory.rs`,
//! compiled for tests only).

mod cached;
pub mod dry_run;
pub mod file;
pub mod ipset;
#[cfg(test)]
pub(crate) mod memory;
mod netlink;
pub mod nftables;

pub use cached::Cached;

use crate::config::BackendConfig;
use crate::ownership::{Footprint, Object, Teardown};
use crate::prefixes::{AllowSet, Diff};

/// The two sets of every backend, by address family (each backend adds what it calls them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// A place that holds the allowlist. Calls block (netlink round trips, `ipset` and
/// `iptables` processes): [`crate::syncer::Syncer`] runs each on tokio's blocking pool
/// (`spawn_blocking`), never on a runtime thread. Direct callers (`status`, `teardown`, tests)
/// call them outside any runtime.
pub trait Backend: Send {
    /// What the logs call this backend: `nftables`, `ipset`, `dry-run`, …
    fn name(&self) -> &'static str;

    /// Whether what [`Backend::apply`] writes stays there to be read back. False for dry-run,
    /// which keeps nothing: its set differing from the state file is not drift.
    fn persists(&self) -> bool {
        true
    }

    /// Creates the table, sets and (with `enforce`) rules when missing, and removes the objects
    /// an earlier configuration created that this one no longer uses (see
    /// [`Backend::set_recorded`]). An existing object that is not allowsync's (see
    /// [`crate::ownership`]) is never changed: one of the wrong type or flags, or named like
    /// one allowsync would have to rewrite, is [`BackendError::Foreign`]; an operator's set or
    /// table that does not exist is [`BackendError::Absent`]. Writes nothing when everything is
    /// in place.
    fn ensure(&mut self) -> Result<(), BackendError>;

    /// What [`Backend::ensure`] and [`Backend::enforce`] would put back now, each named for a
    /// log line (`table inet allowsync`, `ipset allowsync_v4`, …); empty when everything is in
    /// place. Reads only, and cheaply: the daemon asks after every foreign change (nftables) or
    /// every `check_interval` (ipset). The ipset backend also names a set that holds another
    /// number of entries than it last wrote (flushed behind its back); set contents are
    /// otherwise the sync's business.
    fn missing(&mut self) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }

    /// The kernel objects this backend writes to: what [`crate::ownership::lock`] keeps a second
    /// allowsync off. None for backends that keep nothing in the kernel.
    fn managed(&self) -> Vec<Object> {
        Vec::new()
    }

    /// What the state file recorded about the kernel objects (an earlier run's
    /// [`Backend::footprint`]): `ensure` removes what was owned and is no longer used, `teardown`
    /// removes it all. Called before either.
    fn set_recorded(&mut self, _recorded: &Footprint) {}

    /// The objects allowsync owns and the sets it fills, as the last `ensure` or `teardown`
    /// left them, for the state file. `None`: nothing to record (dry-run, tests' backends).
    fn footprint(&self) -> Option<Footprint> {
        None
    }

    /// What the kernel holds now: the truth every diff is computed against.
    fn read(&mut self) -> Result<AllowSet, BackendError>;

    /// Applies the diff (all removals, then all additions) as one transaction. On error the
    /// set is as it was before the call.
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError>;

    /// Installs the enforcement that lives apart from the sets (the ipset backend's iptables
    /// rules), or removes it when not configured. Called after every sync, so that a rule that
    /// cannot be installed never keeps the allowlist out of the sets. A backend whose
    /// enforcement is part of [`Backend::ensure`] (nftables: one table) has nothing to do here.
    fn enforce(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Removes exactly what allowsync owns (only on `allowsync teardown`), empties the operator's
    /// sets it filled, and says what it removed and what it left.
    fn teardown(&mut self) -> Result<Teardown, BackendError>;

    /// A number that changes whenever the kernel's copy may have changed (nftables: the ruleset
    /// generation). Equal to the value seen right after our last apply means nothing changed
    /// and the costly [`Backend::read`] can be skipped. `None`: not known, always read.
    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
}

/// A backend failure, with what was being done and to which object.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Someone changed the set under us: an element to delete was gone (ENOENT) or one to add
    /// was already there (EEXIST). The engine reads again, diffs again and retries once.
    #[error("{op} on {object}: {detail} (the set changed under us)")]
    Conflict { op: &'static str, object: String, detail: String },

    /// A table or set allowsync manages does not exist: not created yet, deleted by hand, or
    /// gone with a reboot. Never read as empty; the next sync's `ensure` creates it again.
    #[error("{object} does not exist (allowsync creates it at its next sync)")]
    Missing { object: String },

    /// An object allowsync would have to change but may not (it did not create it), or cannot
    /// use as it is (another type or flags): what is wrong, and the fix. Nothing was changed.
    #[error("{object} {why}: {fix}")]
    Foreign { object: String, why: String, fix: String },

    /// An operator's table or set that the configuration names does not exist. allowsync never
    /// creates it (it creates tables and sets only under its own name).
    #[error("{object} does not exist: {fix}")]
    Absent { object: String, fix: String },

    /// The kernel (or a helper program) refused the operation.
    #[error("{op} on {object} failed: {cause}")]
    Kernel { op: &'static str, object: String, cause: std::io::Error },

    /// The backend cannot work on this host (missing program, module or permission).
    #[error("{0}")]
    Unavailable(String),

    /// What must follow a write failed (the file backend's `on_change`): the write stands, and
    /// the step is retried at the next sync.
    #[error("{object} is written, but {what} failed: {cause}; retrying at the next sync")]
    FollowUp { object: String, what: String, cause: String },
}

impl BackendError {
    /// True for the errors a re-read and a single retry can fix.
    pub fn is_conflict(&self) -> bool {
        matches!(self, BackendError::Conflict { .. })
    }

    /// True when a table or set allowsync manages does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, BackendError::Missing { .. })
    }

    /// The object a refusal of the kernel names, and its errno, for a transaction that may go
    /// on without the step that was refused.
    pub fn refused_object(&self) -> Option<(&str, Option<i32>)> {
        match self {
            BackendError::Conflict { object, .. } => Some((object, Some(libc::ENOENT))),
            BackendError::Kernel { object, cause, .. } => Some((object, cause.raw_os_error())),
            _ => None,
        }
    }
}

/// The backend the configuration asks for, wrapped in [`Cached`].
pub fn from_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    let inner: Box<dyn Backend> = match cfg {
        BackendConfig::Nftables(n) => Box::new(nftables::NftablesBackend::new(n)?),
        BackendConfig::Ipset(i) => Box::new(ipset::IpsetBackend::new(i)?),
        BackendConfig::DryRun => Box::new(dry_run::DryRun),
        BackendConfig::File(f) => Box::new(file::FileBackend::new(f)),
    };
    Ok(Box::new(Cached::new(inner)))
}
