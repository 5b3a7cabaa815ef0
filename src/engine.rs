//! One sync, from fetched source lists to one committed kernel transaction, with the safety
//! guards in between. No I/O of its own: the caller fetches, the [`Backend`] touches the kernel,
//! the caller saves the [`State`]. That keeps every decision here testable in memory.
//!
//! 1. [`Desired::build`]: each source's fresh list, or its last good list from the state file
//!    when the fetch failed or looks suspicious (an empty list where there was one). A failure
//!    never removes anything: when a source has failed and has no last good list, the sync only
//!    adds ([`Desired::additive_only`]).
//! 2. [`plan`]: diff the desired set against what the kernel holds *now*, and judge it: an
//!    empty allowlist is refused unless `allow_empty`, a sync that takes away more than
//!    `max_removal_percent` of the current entries is refused unless forced.
//! 3. [`sync`]: apply the diff; when the set changed under us (EEXIST/ENOENT), read again, plan
//!    again, retry once.

use std::collections::BTreeMap;
use std::fmt;

use tracing::{error, warn};

use crate::backend::{Backend, BackendError};
use crate::config::Safety;
use crate::prefixes::{AllowSet, Diff};
use crate::state::{LastError, SourceState, State};

/// What one source gave this cycle.
#[derive(Debug, Clone)]
pub struct SourceResult {
    pub name: String,
    /// The normalized list, or why there is none (already free of secrets).
    pub list: Result<AllowSet, String>,
}

/// What became of a source in the desired set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStatus {
    /// Fetched now: this many ranges.
    Fresh { ranges: usize },
    /// Failed or suspicious: its last good list (fetched at `since`) stands in.
    Stale { reason: String, since: u64, ranges: usize },
    /// Failed with no last good list to fall back on: nothing is removed this cycle.
    Missing { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub name: String,
    pub status: SourceStatus,
}

impl fmt::Display for SourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            SourceStatus::Fresh { ranges } => write!(f, "{}: ok, {ranges} ranges", self.name),
            SourceStatus::Stale { reason, since, ranges } => write!(
                f,
                "{}: {reason}; keeping its last good list ({ranges} ranges, fetched {})",
                self.name,
                crate::state::fmt_time(*since)
            ),
            SourceStatus::Missing { reason } => {
                write!(f, "{}: {reason}; no last good list, so nothing is removed this cycle", self.name)
            }
        }
    }
}

/// The allowlist this cycle wants, and how each source contributed.
#[derive(Debug, Clone)]
pub struct Desired {
    pub set: AllowSet,
    pub sources: Vec<SourceReport>,
    /// Set when a source failed without a fallback: the kernel's current entries are kept
    /// (the sync only adds), because some of them may be that source's.
    pub additive_only: bool,
    /// The fresh lists, to become the sources' last good lists once applied.
    fresh: BTreeMap<String, AllowSet>,
}

impl Desired {
    /// Combines this cycle's results with the last good lists in `state`.
    pub fn build(results: Vec<SourceResult>, state: &State) -> Desired {
        let mut parts = Vec::with_capacity(results.len());
        let mut sources = Vec::with_capacity(results.len());
        let mut fresh = BTreeMap::new();
        let mut additive_only = false;
        for r in results {
            let last = state.sources.get(&r.name);
            let failure = match r.list {
                // An empty answer where there used to be a list is far more likely an API
                // accident than Chat closing every egress address: treat it as a failure.
                Ok(list) if list.is_empty() && last.is_some_and(|l| !l.list.is_empty()) => {
                    "returned an empty list (suspicious)".to_string()
                }
                Ok(list) => {
                    sources.push(SourceReport {
                        name: r.name.clone(),
                        status: SourceStatus::Fresh { ranges: list.len() },
                    });
                    parts.push(list.clone());
                    fresh.insert(r.name, list);
                    continue;
                }
                Err(e) => e,
            };
            match last {
                Some(l) => {
                    let status =
                        SourceStatus::Stale { reason: failure, since: l.fetched_at, ranges: l.list.len() };
                    sources.push(SourceReport { name: r.name, status });
                    parts.push(l.list.clone());
                }
                None => {
                    additive_only = true;
                    sources.push(SourceReport {
                        name: r.name,
                        status: SourceStatus::Missing { reason: failure },
                    });
                }
            }
        }
        Desired { set: AllowSet::union(&parts), sources, additive_only, fresh }
    }

    /// True when every source was fetched fresh.
    pub fn all_fresh(&self) -> bool {
        self.sources.iter().all(|s| matches!(s.status, SourceStatus::Fresh { .. }))
    }
}

/// Why a sync was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The desired allowlist is empty and `allow_empty` is false.
    Empty { current: usize },
    /// More than `max_percent` of the current entries would go.
    MassRemoval { lost: usize, current: usize, max_percent: u8, sample: Vec<String> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Empty { current } => write!(
                f,
                "refusing to empty the allowlist ({current} entries now): set safety.allow_empty: true if that is really wanted"
            ),
            Refusal::MassRemoval { lost, current, max_percent, sample } => write!(
                f,
                "refusing to remove {lost} of {current} entries (more than max_removal_percent {max_percent}%), e.g. {}; \
                 use `allowsync once --force` if this is expected",
                sample.join(", ")
            ),
        }
    }
}

/// How many removed entries a refusal names.
const SAMPLE: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The kernel already holds the desired set.
    InSync,
    /// Apply the diff.
    Apply,
    Refused(Refusal),
}

/// A diff and the guards' verdict on it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What the kernel holds.
    pub current: AllowSet,
    /// What it will hold after the diff (the desired set, plus the current one when additive).
    pub target: AllowSet,
    pub diff: Diff,
    pub verdict: Verdict,
}

/// Diffs `desired` against `current` and applies the safety guards (`force` overrides them).
pub fn plan(current: AllowSet, desired: &Desired, safety: &Safety, force: bool) -> Plan {
    let target =
        if desired.additive_only { AllowSet::union([&current, &desired.set]) } else { desired.set.clone() };
    let diff = current.diff_to(&target);
    let verdict = if diff.is_empty() {
        Verdict::InSync
    } else if force {
        Verdict::Apply
    } else if target.is_empty() && !safety.allow_empty {
        Verdict::Refused(Refusal::Empty { current: current.len() })
    } else {
        let lost = current.lost_in(&target);
        // lost / current > max / 100, in integers.
        if lost.len() * 100 > usize::from(safety.max_removal_percent) * current.len() {
            Verdict::Refused(Refusal::MassRemoval {
                lost: lost.len(),
                current: current.len(),
                max_percent: safety.max_removal_percent,
                sample: lost.into_iter().take(SAMPLE).collect(),
            })
        } else {
            Verdict::Apply
        }
    };
    Plan { current, target, diff, verdict }
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InSync,
    Applied { added: usize, removed: usize },
    Refused(Refusal),
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Reads the live set, plans, and applies; on a conflict (the set changed under us) reads,
/// plans and applies once more. Returns the outcome and the plan it acted on.
pub fn sync(
    backend: &mut dyn Backend,
    desired: &Desired,
    safety: &Safety,
    force: bool,
) -> Result<(Outcome, Plan), SyncError> {
    let mut retried = false;
    loop {
        let current = backend.read()?;
        let p = plan(current, desired, safety, force);
        let outcome = match &p.verdict {
            Verdict::InSync => Outcome::InSync,
            Verdict::Refused(r) => {
                error!(reason = %r, "sync refused by a safety guard");
                Outcome::Refused(r.clone())
            }
            Verdict::Apply => match backend.apply(&p.diff) {
                Ok(()) => Outcome::Applied { added: p.diff.added(), removed: p.diff.removed() },
                Err(e) if e.is_conflict() && !retried => {
                    warn!(error = %e, "the set changed while we applied: reading it again and retrying once");
                    retried = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        return Ok((outcome, p));
    }
}

/// Records a sync's result in the state: after a sync that reached the desired set, the fresh
/// lists become the sources' last good lists; a refusal or failure only sets `last_error`
/// (the last good lists stay those of the last applied sync).
pub fn record(state: &mut State, desired: &Desired, result: &Result<(Outcome, Plan), SyncError>, now: u64) {
    match result {
        Ok((Outcome::InSync | Outcome::Applied { .. }, plan)) => {
            for (name, list) in &desired.fresh {
                state.sources.insert(name.clone(), SourceState { list: list.clone(), fetched_at: now });
            }
            state.applied = Some(plan.target.clone());
            state.last_sync = Some(now);
            let failed: Vec<String> = desired
                .sources
                .iter()
                .filter(|s| !matches!(s.status, SourceStatus::Fresh { .. }))
                .map(ToString::to_string)
                .collect();
            state.last_error =
                (!failed.is_empty()).then(|| LastError { at: now, message: failed.join("; ") });
        }
        Ok((Outcome::Refused(r), _)) => {
            state.last_error = Some(LastError { at: now, message: r.to_string() })
        }
        Err(e) => state.last_error = Some(LastError { at: now, message: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::prefixes::parse_entry;

    fn set(v: &[&str]) -> AllowSet {
        AllowSet::from_nets(v.iter().map(|s| parse_entry(s).unwrap().net))
    }
    fn ok(name: &str, v: &[&str]) -> SourceResult {
        SourceResult { name: name.into(), list: Ok(set(v)) }
    }
    fn failed(name: &str) -> SourceResult {
        SourceResult { name: name.into(), list: Err("network: connection refused".into()) }
    }
    fn safety() -> Safety {
        Safety::default()
    }
    fn state_with(name: &str, v: &[&str]) -> State {
        let mut s = State::default();
        s.sources.insert(name.into(), SourceState { list: set(v), fetched_at: 100 });
        s
    }

    #[test]
    fn a_failed_source_contributes_its_last_good_list() {
        let st = state_with("chat", &["10.0.0.0/24"]);
        let d = Desired::build(vec![failed("chat"), ok("office", &["192.0.2.1"])], &st);
        assert_eq!(d.set, set(&["10.0.0.0/24", "192.0.2.1"]));
        assert!(!d.additive_only);
        assert!(matches!(d.sources[0].status, SourceStatus::Stale { since: 100, ranges: 1, .. }));
        assert!(!d.all_fresh());
    }

    #[test]
    fn a_suspicious_empty_list_is_a_failure() {
        let st = state_with("chat", &["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &[])], &st);
        assert_eq!(d.set, set(&["10.0.0.0/24"]));
        assert!(
            matches!(&d.sources[0].status, SourceStatus::Stale { reason, .. } if reason.contains("empty"))
        );
    }

    #[test]
    fn a_failure_without_fallback_never_removes() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(&["10.0.0.0/24", "10.9.0.0/16"]);
        let d = Desired::build(vec![failed("chat"), ok("office", &["192.0.2.1"])], &State::default());
        assert!(d.additive_only);
        let (out, p) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 0 });
        assert_eq!(*be.shared().lock().unwrap(), set(&["10.0.0.0/24", "10.9.0.0/16", "192.0.2.1"]));
        assert_eq!(p.target, *be.shared().lock().unwrap());
    }

    #[test]
    fn empty_allowlist_is_refused_unless_allowed() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(&["10.0.0.1"]);
        let d = Desired::build(vec![ok("office", &[])], &State::default());
        let allow = |allow_empty| Safety { allow_empty, max_removal_percent: 100, ..Safety::default() };
        let (out, _) = sync(&mut be, &d, &allow(false), false).unwrap();
        assert!(matches!(out, Outcome::Refused(Refusal::Empty { current: 1 })));
        assert_eq!(be.writes(), 0);
        let (out, _) = sync(&mut be, &d, &allow(true), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 0, removed: 1 });
        assert!(be.shared().lock().unwrap().is_empty());
    }

    #[test]
    fn mass_removal_is_refused_with_a_sample_and_force_overrides() {
        let mut be = MemoryBackend::new();
        let many: Vec<String> = (0..10).map(|i| format!("10.0.{}.0/24", i * 2)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        *be.shared().lock().unwrap() = set(&many);
        // Keep 4 of 10: 60% removed > 50%.
        let d = Desired::build(vec![ok("chat", &many[..4])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        let Outcome::Refused(Refusal::MassRemoval { lost, current, max_percent, sample }) = &out else {
            panic!("{out:?}")
        };
        assert_eq!((*lost, *current, *max_percent), (6, 10, 50));
        assert_eq!(sample.len(), SAMPLE);
        assert_eq!(sample[0], "10.0.8.0/24");
        assert!(out_text(&out).contains("refusing to remove 6 of 10"));
        assert_eq!(be.writes(), 0, "nothing written");
        // Keep 5 of 10: exactly 50% is allowed.
        let d5 = Desired::build(vec![ok("chat", &many[..5])], &State::default());
        assert_eq!(plan(be.read().unwrap(), &d5, &safety(), false).verdict, Verdict::Apply);
        let (out, _) = sync(&mut be, &d, &safety(), true).unwrap();
        assert_eq!(out, Outcome::Applied { added: 0, removed: 6 });
    }

    fn out_text(o: &Outcome) -> String {
        match o {
            Outcome::Refused(r) => r.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn merging_into_a_wider_prefix_is_not_a_removal() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(&["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/23"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 1 });
        assert_eq!(*be.shared().lock().unwrap(), set(&["10.0.0.0/23"]));
    }

    /// A backend that changes the set just before our first apply, as another process would.
    struct Racy {
        inner: MemoryBackend,
        raced: bool,
    }
    impl Backend for Racy {
        fn name(&self) -> &'static str {
            "racy"
        }
        fn ensure(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
        fn read(&mut self) -> Result<AllowSet, BackendError> {
            self.inner.read()
        }
        fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
            if !self.raced {
                self.raced = true;
                *self.inner.shared().lock().unwrap() = set(&["10.0.0.0/24", "10.5.0.7"]);
            }
            self.inner.apply(diff)
        }
        fn teardown(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[test]
    fn a_conflict_rereads_and_retries_once() {
        let mut be = Racy { inner: MemoryBackend::new(), raced: false };
        *be.inner.shared().lock().unwrap() = set(&["10.0.0.0/24"]);
        // Our first diff adds 10.5.0.0/16, which now overlaps the stray 10.5.0.7: EEXIST.
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24", "10.5.0.0/16"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 1 });
        assert_eq!(*be.inner.shared().lock().unwrap(), set(&["10.0.0.0/24", "10.5.0.0/16"]));
    }

    #[test]
    fn a_failed_apply_leaves_the_set_and_records_the_error() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(&["10.0.0.0/24"]);
        be.fail_next_applies(1);
        let mut st = State::default();
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24", "10.2.0.0/24"])], &st);
        let r = sync(&mut be, &d, &safety(), false);
        assert!(r.is_err(), "{r:?}");
        assert_eq!(*be.shared().lock().unwrap(), set(&["10.0.0.0/24"]));
        record(&mut st, &d, &r, 500);
        assert!(st.sources.is_empty(), "a list that was not applied is not 'last good'");
        assert_eq!(st.last_error.as_ref().unwrap().at, 500);
    }

    #[test]
    fn recording_a_success_updates_last_good_lists() {
        let mut be = MemoryBackend::new();
        let mut st = state_with("old", &["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &["10.1.0.0/24"]), failed("old")], &st);
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 900);
        assert_eq!(st.sources["chat"].fetched_at, 900);
        assert_eq!(st.sources["old"].fetched_at, 100, "the failed source keeps its old list");
        assert_eq!(st.applied, Some(set(&["10.0.0.0/24", "10.1.0.0/24"])));
        assert_eq!(st.last_sync, Some(900));
        assert!(st.last_error.as_ref().unwrap().message.contains("old: network"));
        // A refused sync changes no last good list.
        let before = st.sources.clone();
        let d = Desired::build(vec![ok("chat", &[]), ok("old", &[])], &State::default());
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 1000);
        assert_eq!(st.sources, before);
        assert!(st.last_error.unwrap().message.contains("refusing"));
    }

    #[test]
    fn nothing_to_do_writes_nothing() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(&["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::InSync);
        assert_eq!(be.writes(), 0);
    }
}
