//! Firewall backends: where an allowlist lives in the kernel.
//!
//! The engine only ever talks to a [`Backend`]: it reads what the kernel holds, computes a
//! [`Diff`] against the desired set, and hands that diff to [`Backend::apply`], which must
//! commit it as **one** atomic transaction or not at all. Everything else (netlink batches,
//! `ipset restore` scripts) stays inside the backend.
//!
//! - [`dry_run`]: logs the transaction it would send and keeps nothing;
//! - [`nftables`]: two interval sets (and optionally an enforcement chain) in an nftables table,
//!   over netlink.
//! - [`ipset`]: two `hash:net` ipsets (and optionally an iptables enforcement chain), through
//!   the `ipset` and `iptables-restore` programs. `ipset restore` is not atomic: that module's
//!   docs say how a failed apply still leaves the sets as they were (swap, or roll back).
//! - [`Cached`]: wraps any backend and skips the costly read while the kernel's ruleset
//!   generation says nothing changed since we last looked; [`from_config`] wraps every backend
//!   in it.
//!
//! The engine's unit tests use an in-memory backend with the kernel's rules (`memory.rs`,
//! compiled for tests only).

mod cached;
pub mod dry_run;
pub mod ipset;
#[cfg(test)]
pub(crate) mod memory;
mod netlink;
pub mod nftables;

pub use cached::Cached;

use crate::config::BackendConfig;
use crate::prefixes::{AllowSet, Diff};

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

    /// Creates the table, sets and (with `enforce`) rules when missing. An existing object of
    /// the same name but another type or flags is [`BackendError::Foreign`]: never changed.
    fn ensure(&mut self) -> Result<(), BackendError>;

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

    /// Removes everything allowsync created (only on `allowsync teardown`).
    fn teardown(&mut self) -> Result<(), BackendError>;

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

    /// An object with our name that allowsync did not create, or of another type or flags.
    #[error(
        "{object} already exists and is not what allowsync manages: {why}; rename it or configure another name"
    )]
    Foreign { object: String, why: String },

    /// The kernel (or a helper program) refused the operation.
    #[error("{op} on {object} failed: {cause}")]
    Kernel { op: &'static str, object: String, cause: std::io::Error },

    /// The backend cannot work on this host (missing program, module or permission).
    #[error("{0}")]
    Unavailable(String),
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
}

/// The backend the configuration asks for, wrapped in [`Cached`].
pub fn from_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    let inner: Box<dyn Backend> = match cfg {
        BackendConfig::Nftables(n) => Box::new(nftables::NftablesBackend::new(n)?),
        BackendConfig::Ipset(i) => Box::new(ipset::IpsetBackend::new(i)?),
        BackendConfig::DryRun => Box::new(dry_run::DryRun),
    };
    Ok(Box::new(Cached::new(inner)))
}
