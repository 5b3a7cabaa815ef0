//! Repairs from memory: when someone else deleted or changed allowsync's objects (an nf_tables
//! notification, or the ipset backend's periodic check found something missing), put back the
//! objects and the allowlist allowsync last applied, as it holds it in memory. No fetch, no API
//! call, nothing waits for the next cycle.
//!
//! A repair looks before it writes: [`Backend::missing`] names what is gone, `ensure` puts back
//! only that, and the sets are synced to the last applied list through the same guards as a
//! cycle (widening is counted against that list, so refilling a flushed set passes; see
//! [`crate::engine::plan`]). When a foreign commit left everything in place, a repair writes
//! nothing. Each repair that changed something is logged with what was missing and how long
//! allowsync's objects were not as it left them (the window).

use std::future::Future;
use std::time::Instant;

use tracing::{debug, error, warn};

use crate::backend::{Backend, BackendError};
use crate::config::Safety;
use crate::engine::{self, Desired, Outcome};
use crate::health::Counts;
use crate::prefixes::AllowSet;
use crate::syncer::Syncer;

/// Why a repair runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Foreign commits touched the table (what the notifications said).
    Notified { what: Vec<String>, commits: usize },
    /// Notifications were lost: anything may have changed.
    Lost,
    /// The periodic check found these missing.
    Check { missing: Vec<String> },
    /// A periodic look (nftables without notifications): anything may have changed.
    Poll,
}

impl Trigger {
    fn name(&self) -> &'static str {
        match self {
            Trigger::Notified { .. } => "notification",
            Trigger::Lost => "lost notifications",
            Trigger::Check { .. } => "periodic check",
            Trigger::Poll => "poll",
        }
    }
}

/// What a repair did.
#[derive(Debug)]
pub struct Repaired {
    /// The objects that were missing (as [`Backend::missing`] names them).
    pub missing: Vec<String>,
    /// The sync of the sets to the last applied list (`None`: nothing applied yet to restore).
    pub synced: Option<Outcome>,
    /// Ranges of the last applied list that were missing from the kernel (and put back), and
    /// ranges the kernel held that allowsync had not applied (and took out).
    pub restored: usize,
    pub removed: usize,
    /// What the kernel holds afterwards (for the metrics).
    pub kernel: Option<Counts>,
}

impl Repaired {
    /// True when the repair wrote to the kernel.
    pub fn changed(&self) -> bool {
        !self.missing.is_empty() || self.restored + self.removed > 0
    }
}

/// The repair, on the blocking pool; the future borrows nothing from `syncer`.
pub fn job(syncer: &Syncer) -> impl Future<Output = Result<Repaired, BackendError>> + Send + 'static {
    let applied = syncer.applied().cloned();
    let safety = syncer.config().safety.clone();
    syncer.on_backend(move |b| repair(b, applied, &safety))
}

/// The periodic check (ipset): what is missing, reading only.
pub fn check_job(
    syncer: &Syncer,
) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send + 'static {
    syncer.on_backend(|b| b.missing())
}

fn repair(b: &mut dyn Backend, applied: Option<AllowSet>, safety: &Safety) -> Result<Repaired, BackendError> {
    let missing = b.missing()?;
    b.ensure()?;
    let synced = match applied {
        Some(applied) => Some(engine::sync(b, &Desired::restore(applied), safety, false)?),
        None => None,
    };
    // The ipset backend's rules come after its sets, as in a cycle.
    b.enforce()?;
    let (restored, removed) = match &synced {
        Some((Outcome::Applied { .. }, plan)) => (plan.diff.added(), plan.diff.removed()),
        _ => (0, 0),
    };
    let kernel = b.read().ok().map(|k| Counts::of(&k));
    Ok(Repaired { missing, synced: synced.map(|(o, _)| o), restored, removed, kernel })
}

/// Logs a finished repair: a warning when it put anything back (what, and the window since
/// `since`, the first notification or the last check that found everything in place), an error
/// when it failed or a guard refused it, a debug line when everything was in place.
pub fn log(trigger: &Trigger, since: Instant, result: &Result<Repaired, BackendError>) {
    let window_ms = since.elapsed().as_millis() as u64;
    let noticed = match trigger {
        Trigger::Notified { what, commits } => format!("{commits} foreign commit(s): {}", what.join("; ")),
        Trigger::Lost => "notifications lost (ENOBUFS)".into(),
        Trigger::Check { missing } => missing.join("; "),
        Trigger::Poll => "periodic look (no notifications)".into(),
    };
    match result {
        Err(e) => {
            error!(trigger = trigger.name(), %noticed, error = %e, window_ms, "repair failed; retrying at the next change or cycle")
        }
        Ok(Repaired { synced: Some(Outcome::Refused(reason)), .. }) => error!(
            trigger = trigger.name(),
            %noticed,
            %reason,
            "repair refused by a safety guard: the kernel's sets differ too much from what allowsync last applied"
        ),
        Ok(r) if r.changed() => {
            let missing = if r.missing.is_empty() { "-".to_string() } else { r.missing.join(", ") };
            warn!(
                trigger = trigger.name(),
                %missing,
                restored = r.restored,
                removed = r.removed,
                window_ms,
                %noticed,
                "repaired allowsync's objects from memory (no API call)"
            )
        }
        Ok(_) => debug!(trigger = trigger.name(), %noticed, "checked after a change: everything in place"),
    }
}
