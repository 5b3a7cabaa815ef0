//! Firewall backends: where an allowlist lives in the kernel.
//!
//! The engine only ever talks to a [`Backend`]: it reads what the kernel holds, computes a
//! [`Diff`] against the desired set, and hands that diff to [`Backend::apply`], which must
//! commit it as **one** atomic transaction or not at all. Everything else (netlink batches,
//! `ipset restore` scripts) stays inside the backend.
//!
//! - [`memory`]: an in-memory set with the kernel's rules, for the engine's tests;
//! - [`dry_run`]: logs the transaction it would send and keeps nothing;
//! - [`nftables`]: two interval sets (and optionally an enforcement chain) in an nftables table,
//!   over netlink.
//! - [`ipset`]: two `hash:net` ipsets (and optionally an iptables enforcement chain), through
//!   the `ipset` and `iptables-restore` programs. `ipset restore` is not atomic: that module's
//!   docs say how a failed apply still leaves the sets as they were (swap, or roll back).
//! - [`Cached`]: wraps any backend and skips the costly read while the kernel's ruleset
//!   generation says nothing changed since we last looked.

pub mod dry_run;
pub mod ipset;
pub mod memory;
mod netlink;
pub mod nftables;

use crate::config::BackendConfig;
use crate::prefixes::{AllowSet, Diff};

/// A place that holds the allowlist. Calls block (netlink round trips, `ipset` and
/// `iptables` processes): [`crate::syncer::Syncer`] runs each on tokio's blocking pool
/// (`spawn_blocking`), never on a runtime thread. Direct callers (`status`, `teardown`, tests)
/// call them outside any runtime.
pub trait Backend: Send {
    /// What the logs call this backend: `nftables`, `ipset`, `dry-run`, …
    fn name(&self) -> &'static str;

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

/// The backend the configuration asks for.
pub fn from_config(cfg: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    match cfg {
        BackendConfig::Nftables(n) => Ok(Box::new(nftables::NftablesBackend::new(n)?)),
        BackendConfig::Ipset(i) => Ok(Box::new(ipset::IpsetBackend::new(i)?)),
        BackendConfig::DryRun => Ok(Box::new(dry_run::DryRun)),
    }
}

/// Skips [`Backend::read`] when the ruleset generation is the one seen right after our own last
/// read or write: nothing was committed since, by anyone, so the kernel still holds what we
/// know. Dumping a 100k-element set costs over a second; asking for the generation costs one
/// small netlink round trip. Backends without a generation are read every time.
///
/// The same goes for [`Backend::ensure`]: while the generation is the one right after our last
/// ensure (or our own apply since), nobody can have removed our objects, so it is skipped. That
/// matters because ensuring the enforcement chain rewrites its rules: without the skip, every
/// cycle would be a kernel write even when nothing changed.
pub struct Cached {
    inner: Box<dyn Backend>,
    known: Option<(u64, AllowSet)>,
    ensured_at: Option<u64>,
}

impl Cached {
    pub fn new(inner: Box<dyn Backend>) -> Self {
        Cached { inner, known: None, ensured_at: None }
    }
}

impl Backend for Cached {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn ensure(&mut self) -> Result<(), BackendError> {
        let generation = self.inner.generation()?;
        if generation.is_some() && generation == self.ensured_at {
            return Ok(());
        }
        self.ensured_at = None;
        self.inner.ensure()?;
        self.ensured_at = self.inner.generation()?;
        Ok(())
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let generation = self.inner.generation()?;
        if let (Some(g), Some((known_g, set))) = (generation, &self.known) {
            if g == *known_g {
                return Ok(set.clone());
            }
        }
        let set = self.inner.read()?;
        // Trust the copy only if nothing was committed while we dumped.
        let after = self.inner.generation()?;
        self.known = match (generation, after) {
            (Some(a), Some(b)) if a == b => Some((a, set.clone())),
            _ => None,
        };
        Ok(set)
    }

    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        let before = self.inner.generation()?;
        let known = self.known.take();
        let ensured = self.ensured_at.take();
        self.inner.apply(diff)?;
        let after = self.inner.generation()?;
        if let (Some(b), Some(a)) = (before, after) {
            if ensured == Some(b) && a == b.wrapping_add(1) {
                self.ensured_at = Some(a);
            }
        }
        // Our own commit moves the generation by exactly one; anything more means someone else
        // committed too, and the copy is no longer the truth.
        if let (Some(b), Some(a), Some((kg, set))) = (before, after, known) {
            if kg == b && a == b.wrapping_add(1) {
                if let Ok(next) = set.apply(diff) {
                    self.known = Some((a, next));
                }
            }
        }
        Ok(())
    }

    fn enforce(&mut self) -> Result<(), BackendError> {
        self.inner.enforce()
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        self.known = None;
        self.ensured_at = None;
        self.inner.teardown()
    }

    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        self.inner.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryBackend;
    use super::*;
    use crate::prefixes::parse_entry;

    fn set(v: &[&str]) -> AllowSet {
        AllowSet::from_nets(v.iter().map(|s| parse_entry(s).unwrap().net))
    }

    #[test]
    fn an_unchanged_generation_skips_the_dump() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        mem.foreign_write(|s| *s = set(&["10.0.0.0/24"]));
        let mut c = Cached::new(Box::new(mem.clone()));
        assert_eq!(c.read().unwrap(), set(&["10.0.0.0/24"]));
        assert_eq!(c.read().unwrap(), set(&["10.0.0.0/24"]));
        assert_eq!(mem.reads(), 1, "second read served from the copy");

        // Our own write keeps the copy valid, and up to date.
        let want = set(&["10.0.0.0/24", "10.1.0.0/24"]);
        let d = c.read().unwrap().diff_to(&want);
        c.apply(&d).unwrap();
        assert_eq!(c.read().unwrap(), want);
        assert_eq!(mem.reads(), 1);

        // Someone else's write moves the generation: dump again and see it.
        mem.foreign_write(|s| *s = set(&["192.0.2.1"]));
        assert_eq!(c.read().unwrap(), set(&["192.0.2.1"]));
        assert_eq!(mem.reads(), 2);
    }

    /// Counts ensures, and writes one commit per ensure as the enforcement chain does.
    struct Ensures(MemoryBackend, std::sync::Arc<std::sync::Mutex<usize>>);
    impl Backend for Ensures {
        fn name(&self) -> &'static str {
            "ensures"
        }
        fn ensure(&mut self) -> Result<(), BackendError> {
            *self.1.lock().unwrap() += 1;
            self.0.foreign_write(|_| {});
            Ok(())
        }
        fn read(&mut self) -> Result<AllowSet, BackendError> {
            self.0.read()
        }
        fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
            self.0.apply(diff)
        }
        fn teardown(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
        fn generation(&mut self) -> Result<Option<u64>, BackendError> {
            self.0.generation()
        }
    }

    #[test]
    fn ensure_is_skipped_until_someone_else_commits() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        let count = std::sync::Arc::new(std::sync::Mutex::new(0));
        let mut c = Cached::new(Box::new(Ensures(mem.clone(), count.clone())));
        c.ensure().unwrap();
        c.ensure().unwrap();
        assert_eq!(*count.lock().unwrap(), 1);
        // Our own apply does not make the objects suspect...
        let d = c.read().unwrap().diff_to(&set(&["10.0.0.1"]));
        c.apply(&d).unwrap();
        c.ensure().unwrap();
        assert_eq!(*count.lock().unwrap(), 1);
        // ...anyone else's commit does.
        mem.foreign_write(|_| {});
        c.ensure().unwrap();
        assert_eq!(*count.lock().unwrap(), 2);
        // A steady state reads from the copy and writes nothing.
        let (reads, writes) = (mem.reads(), mem.writes());
        c.ensure().unwrap();
        assert_eq!(c.read().unwrap(), set(&["10.0.0.1"]));
        assert_eq!((mem.reads(), mem.writes()), (reads + 1, writes), "one dump after the foreign commit");
        c.ensure().unwrap();
        c.read().unwrap();
        assert_eq!((mem.reads(), mem.writes()), (reads + 1, writes));
    }

    #[test]
    fn without_a_generation_every_read_dumps() {
        let mem = MemoryBackend::new();
        let mut c = Cached::new(Box::new(mem.clone()));
        c.read().unwrap();
        c.read().unwrap();
        assert_eq!(mem.reads(), 2);
    }

    #[test]
    fn a_failed_apply_forgets_the_copy() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        let mut c = Cached::new(Box::new(mem.clone()));
        c.read().unwrap();
        mem.fail_next_applies(1);
        assert!(c.apply(&AllowSet::default().diff_to(&set(&["10.0.0.1"]))).is_err());
        c.read().unwrap();
        assert_eq!(mem.reads(), 2);
    }
}
