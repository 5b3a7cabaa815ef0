//! One sync, from fetched source lists to one committed kernel transaction, with the safety
//! guards in between. No I/O of its own: the caller fetches, the [`Backend`] touches the kernel,
//! the caller saves the [`State`]. That keeps every decision here testable in memory.
//!
//! 1. [`Desired::build`]: each source's fresh list, or its last good list from the state file
//!    when the fetch failed or looks suspicious (an empty list where there was one). A failure
//!    never removes anything: when a source has failed and has no last good list, the sync only
//!    adds ([`Desired::additive_only`]).
//! 2. [`plan`]: diff the desired set against what the kernel holds *now*, and judge it: an
//!    empty allowlist is refused unless `allow_empty`; a sync that takes away more than
//!    `max_removal_percent` of the current entries, or adds more than `max_added_addresses_v4`
//!    IPv4 addresses or `max_added_addresses_v6` IPv6 /64 networks ([`Widening`]), is refused
//!    unless forced. Widening counts only what neither the kernel holds nor allowsync last
//!    applied ([`Desired::approved`]): putting back a list someone wiped restores what the guards
//!    already let through, which no guard should stop (the daemon's repair does exactly that,
//!    and so does a cycle after a wipe). (What no entry may ever be, forced or not, was settled before: see
//!    [`crate::admission`].)
//! 3. [`sync`]: apply the diff; when the set changed under us (EEXIST/ENOENT), read again, plan
//!    again, retry once.

use std::collections::BTreeMap;
use std::fmt;

use tracing::{error, warn};

use crate::backend::{Backend, BackendError};
use crate::config::Safety;
use crate::prefixes::{AllowSet, Diff, Range};
use crate::source::{ErrorClass, FetchError, Fetched};
use crate::state::{LastError, Published, SourceState, State};

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

/// What became of a source this cycle, with what its fetch said: the two halves of a source's
/// story are what was fetched ([`Fetched`]) and this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub name: String,
    pub status: SourceStatus,
    /// The class of the fetch error, when the fetch failed (for backoff).
    pub error_class: Option<ErrorClass>,
    /// Invalid entries the fetch skipped.
    pub skipped: usize,
}

impl SourceReport {
    /// Fetched now: not standing in with a last good list, not missing.
    pub fn is_fresh(&self) -> bool {
        matches!(self.status, SourceStatus::Fresh { .. })
    }
}

impl fmt::Display for SourceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            SourceStatus::Fresh { ranges } => write!(f, "{}: ok, {ranges} ranges", self.name),
            SourceStatus::Stale { reason, since, ranges } => write!(
                f,
                "{}: {reason}; keeping its last good list ({ranges} ranges, fetched {})",
                self.name,
                crate::clock::rfc3339(*since)
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
    /// What the fresh lists of `url` sources were published as, kept with them.
    published: BTreeMap<String, Published>,
    /// What allowsync last applied (the state's `applied`): already let through by the guards,
    /// so putting it back is not widening.
    pub approved: Option<AllowSet>,
}

impl Desired {
    /// Combines what every source answered this cycle with the last good lists in `state`.
    pub fn build(fetched: Vec<Fetched>, state: &State) -> Desired {
        let mut parts = Vec::with_capacity(fetched.len());
        let mut sources = Vec::with_capacity(fetched.len());
        let mut fresh = BTreeMap::new();
        let mut published = BTreeMap::new();
        let mut additive_only = false;
        for f in fetched {
            let last = state.sources.get(&f.name);
            let report = |status| SourceReport {
                name: f.name.clone(),
                status,
                error_class: f.result.as_ref().err().map(FetchError::class),
                skipped: f.skipped,
            };
            let failure = match &f.result {
                // An empty answer where there used to be a list is far more likely an API
                // accident than Chat closing every egress address: treat it as a failure.
                Ok(list) if list.is_empty() && last.is_some_and(|l| !l.list.is_empty()) => {
                    "returned an empty list (suspicious)".to_string()
                }
                Ok(list) => {
                    sources.push(report(SourceStatus::Fresh { ranges: list.len() }));
                    parts.push(list.clone());
                    fresh.insert(f.name.clone(), list.clone());
                    if let Some(p) = &f.published {
                        published.insert(f.name.clone(), p.clone());
                    }
                    continue;
                }
                Err(e) => e.to_string(),
            };
            match last {
                Some(l) => {
                    let status =
                        SourceStatus::Stale { reason: failure, since: l.fetched_at, ranges: l.list.len() };
                    sources.push(report(status));
                    parts.push(l.list.clone());
                }
                None => {
                    additive_only = true;
                    sources.push(report(SourceStatus::Missing { reason: failure }));
                }
            }
        }
        Desired {
            set: AllowSet::union(&parts),
            sources,
            additive_only,
            fresh,
            published,
            approved: state.applied.clone(),
        }
    }

    /// The allowlist allowsync last applied, wanted again as it is (a repair from memory): no
    /// source, nothing fresh to record.
    pub fn restore(applied: AllowSet) -> Desired {
        Desired {
            set: applied.clone(),
            sources: Vec::new(),
            additive_only: false,
            fresh: BTreeMap::new(),
            published: BTreeMap::new(),
            approved: Some(applied),
        }
    }

    /// True when every source was fetched fresh.
    pub fn all_fresh(&self) -> bool {
        self.sources.iter().all(SourceReport::is_fresh)
    }
}

/// What a sync adds to the allowlist, in the widening guard's units. Only addresses the kernel
/// does not hold already count (widening a /25 to its /24 adds 128), nor those allowsync last
/// applied (see [`plan`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Widening {
    /// IPv4 addresses added.
    pub v4_addresses: u128,
    /// IPv6 /64 networks that gain at least one address: an added /128 counts as its /64, a
    /// /64 the kernel holds part of counts when the rest of it is added, and several added
    /// ranges in one /64 count it once.
    pub v6_nets: u128,
}

impl Widening {
    /// From `current` (what the kernel holds) to `target`, with the added ranges per family.
    pub fn between(current: &AllowSet, target: &AllowSet) -> (Widening, Added) {
        let added = Added { v4: target.v4.difference(&current.v4), v6: target.v6.difference(&current.v6) };
        let widening = Widening {
            v4_addresses: added.v4.iter().map(Range::size).sum(),
            v6_nets: count_v6_nets(&added.v6),
        };
        (widening, added)
    }

    fn over_v4(&self, safety: &Safety) -> bool {
        self.v4_addresses > u128::from(safety.max_added_addresses_v4)
    }

    fn over_v6(&self, safety: &Safety) -> bool {
        self.v6_nets > u128::from(safety.max_added_addresses_v6)
    }
}

/// The ranges a sync adds, per family.
#[derive(Debug, Clone, Default)]
pub struct Added {
    pub v4: Vec<Range<u32>>,
    pub v6: Vec<Range<u128>>,
}

/// The /64 networks that sorted, disjoint ranges touch, each counted once.
fn count_v6_nets(ranges: &[Range<u128>]) -> u128 {
    let mut count = 0;
    // The highest /64 counted so far: the next range may start in it.
    let mut counted: Option<u128> = None;
    for r in ranges {
        let (first, last) = (r.start >> 64, r.end >> 64);
        let first = match counted {
            Some(c) if c >= first => c + 1,
            _ => first,
        };
        if last >= first {
            count += last - first + 1;
            counted = Some(last);
        }
    }
    count
}

/// Why a sync was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The desired allowlist is empty and `allow_empty` is false.
    Empty { current: usize },
    /// More than `max_percent` of the current entries would go.
    MassRemoval { lost: usize, current: usize, max_percent: u8, sample: Vec<String> },
    /// More would be added than `max_added_addresses_v4` / `_v6` allow.
    MassWidening { added: Widening, max_v4: u64, max_v6: u64, sample: Vec<String> },
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
            Refusal::MassWidening { added, max_v4, max_v6, sample } => {
                let mut over = Vec::new();
                if added.v4_addresses > u128::from(*max_v4) {
                    over.push(format!(
                        "{} IPv4 addresses (more than safety.max_added_addresses_v4 {max_v4})",
                        added.v4_addresses
                    ));
                }
                if added.v6_nets > u128::from(*max_v6) {
                    over.push(format!(
                        "{} IPv6 /64 networks (more than safety.max_added_addresses_v6 {max_v6})",
                        added.v6_nets
                    ));
                }
                write!(
                    f,
                    "refusing to add {} to the allowlist at once, e.g. {}; \
                     use `allowsync once --force` if this is expected",
                    over.join(" and "),
                    sample.join(", ")
                )
            }
        }
    }
}

impl Refusal {
    /// The guard, as `allowsync_guard_refusals_total{guard}` names it.
    pub fn guard(&self) -> &'static str {
        match self {
            Refusal::Empty { .. } => "empty",
            Refusal::MassRemoval { .. } => "removal",
            Refusal::MassWidening { .. } => "widening",
        }
    }
}

/// How many removed or added entries a refusal names.
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
    /// What the diff adds to the allowlist, as the widening guard counts it.
    pub widening: Widening,
    pub verdict: Verdict,
}

/// Diffs `desired` against `current` and applies the safety guards. `force` overrides the
/// removal and widening guards; only `allow_empty` lets the allowlist become empty.
pub fn plan(current: AllowSet, desired: &Desired, safety: &Safety, force: bool) -> Plan {
    let target =
        if desired.additive_only { AllowSet::union([&current, &desired.set]) } else { desired.set.clone() };
    let diff = current.diff_to(&target);
    // Against the kernel and what allowsync last applied: after a wipe the kernel holds nothing,
    // and the whole approved list would otherwise count as new.
    let held = match &desired.approved {
        Some(approved) => AllowSet::union([&current, approved]),
        None => current.clone(),
    };
    let (widening, added) = Widening::between(&held, &target);
    let verdict = if diff.is_empty() {
        Verdict::InSync
    } else if target.is_empty() && !safety.allow_empty {
        Verdict::Refused(Refusal::Empty { current: current.len() })
    } else if force {
        Verdict::Apply
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
        } else if widening.over_v4(safety) || widening.over_v6(safety) {
            // Named: the additions of the family (or families) over its limit.
            let v4 = added.v4.iter().filter(|_| widening.over_v4(safety)).map(ToString::to_string);
            let v6 = added.v6.iter().filter(|_| widening.over_v6(safety)).map(ToString::to_string);
            Verdict::Refused(Refusal::MassWidening {
                added: widening,
                max_v4: safety.max_added_addresses_v4,
                max_v6: safety.max_added_addresses_v6,
                sample: v4.chain(v6).take(SAMPLE).collect(),
            })
        } else {
            Verdict::Apply
        }
    };
    Plan { current, target, diff, widening, verdict }
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InSync,
    Applied { added: usize, removed: usize },
    Refused(Refusal),
}

/// Reads the live set, plans, and applies; on a conflict (the set changed under us) reads,
/// plans and applies once more. Returns the outcome and the plan it acted on.
pub fn sync(
    backend: &mut dyn Backend,
    desired: &Desired,
    safety: &Safety,
    force: bool,
) -> Result<(Outcome, Plan), BackendError> {
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
                Err(e) => return Err(e),
            },
        };
        return Ok((outcome, p));
    }
}

/// Records a sync's result in the state: after a sync that reached the desired set, the fresh
/// lists become the sources' last good lists; a refusal or failure only sets `last_error`
/// (the last good lists stay those of the last applied sync).
pub fn record(
    state: &mut State,
    desired: &Desired,
    result: &Result<(Outcome, Plan), BackendError>,
    now: u64,
) {
    match result {
        Ok((Outcome::InSync | Outcome::Applied { .. }, plan)) => {
            for (name, list) in &desired.fresh {
                let published = desired.published.get(name).cloned();
                state
                    .sources
                    .insert(name.clone(), SourceState { list: list.clone(), fetched_at: now, published });
            }
            state.applied = Some(plan.target.clone());
            state.last_sync = Some(now);
            let failed: Vec<String> =
                desired.sources.iter().filter(|s| !s.is_fresh()).map(ToString::to_string).collect();
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
    use allowsync_testkit::set;

    use crate::backend::memory::MemoryBackend;

    fn fetched(name: &str, result: Result<AllowSet, FetchError>) -> Fetched {
        Fetched { name: name.into(), result, entries: 0, skipped: 0, nettypes: Vec::new(), published: None }
    }
    fn ok(name: &str, v: &[&str]) -> Fetched {
        fetched(name, Ok(set(v)))
    }
    fn failed(name: &str) -> Fetched {
        let e =
            FetchError::Connect { url: "https://chat.example".into(), message: "connection refused".into() };
        fetched(name, Err(e))
    }
    fn safety() -> Safety {
        Safety::default()
    }
    fn state_with(name: &str, v: &[&str]) -> State {
        let mut s = State::default();
        s.sources.insert(name.into(), SourceState { list: set(v), fetched_at: 100, published: None });
        s
    }

    #[test]
    fn a_failed_source_contributes_its_last_good_list() {
        let st = state_with("chat", &["10.0.0.0/24"]);
        let d = Desired::build(vec![failed("chat"), ok("office", &["192.0.2.1"])], &st);
        assert_eq!(d.set, set(["10.0.0.0/24", "192.0.2.1"]));
        assert!(!d.additive_only);
        assert!(matches!(d.sources[0].status, SourceStatus::Stale { since: 100, ranges: 1, .. }));
        assert!(!d.all_fresh());
    }

    #[test]
    fn a_suspicious_empty_list_is_a_failure() {
        let st = state_with("chat", &["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &[])], &st);
        assert_eq!(d.set, set(["10.0.0.0/24"]));
        assert!(
            matches!(&d.sources[0].status, SourceStatus::Stale { reason, .. } if reason.contains("empty"))
        );
    }

    #[test]
    fn a_failure_without_fallback_never_removes() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(["10.0.0.0/24", "10.9.0.0/16"]);
        let d = Desired::build(vec![failed("chat"), ok("office", &["192.0.2.1"])], &State::default());
        assert!(d.additive_only);
        let (out, p) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 0 });
        assert_eq!(*be.shared().lock().unwrap(), set(["10.0.0.0/24", "10.9.0.0/16", "192.0.2.1"]));
        assert_eq!(p.target, *be.shared().lock().unwrap());
    }

    #[test]
    fn empty_allowlist_is_refused_unless_allowed() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(["10.0.0.1"]);
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
        *be.shared().lock().unwrap() = set(["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/23"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 1 });
        assert_eq!(*be.shared().lock().unwrap(), set(["10.0.0.0/23"]));
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
                *self.inner.shared().lock().unwrap() = set(["10.0.0.0/24", "10.5.0.7"]);
            }
            self.inner.apply(diff)
        }
        fn teardown(&mut self) -> Result<crate::ownership::Teardown, BackendError> {
            Ok(Default::default())
        }
    }

    #[test]
    fn a_conflict_rereads_and_retries_once() {
        let mut be = Racy { inner: MemoryBackend::new(), raced: false };
        *be.inner.shared().lock().unwrap() = set(["10.0.0.0/24"]);
        // Our first diff adds 10.5.0.0/16, which now overlaps the stray 10.5.0.7: EEXIST.
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24", "10.5.0.0/16"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 1 });
        assert_eq!(*be.inner.shared().lock().unwrap(), set(["10.0.0.0/24", "10.5.0.0/16"]));
    }

    #[test]
    fn a_failed_apply_leaves_the_set_and_records_the_error() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(["10.0.0.0/24"]);
        be.fail_next_applies(1);
        let mut st = State::default();
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24", "10.2.0.0/24"])], &st);
        let r = sync(&mut be, &d, &safety(), false);
        assert!(r.is_err(), "{r:?}");
        assert_eq!(*be.shared().lock().unwrap(), set(["10.0.0.0/24"]));
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
        assert_eq!(st.applied, Some(set(["10.0.0.0/24", "10.1.0.0/24"])));
        assert_eq!(st.last_sync, Some(900));
        assert!(
            st.last_error.as_ref().unwrap().message.contains("old: cannot connect to https://chat.example"),
            "{:?}",
            st.last_error
        );
        // A refused sync changes no last good list.
        let before = st.sources.clone();
        let d = Desired::build(vec![ok("chat", &[]), ok("old", &[])], &State::default());
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 1000);
        assert_eq!(st.sources, before);
        assert!(st.last_error.unwrap().message.contains("refusing"));
    }

    #[test]
    fn a_url_sources_etag_is_kept_with_its_list_only_once_applied() {
        let published = |etag: &str| Published {
            url: "https://relay.example/chat.json".into(),
            etag: Some(etag.into()),
            generated_at: 800,
        };
        let with = |v: &[&str], etag: &str| Fetched { published: Some(published(etag)), ..ok("relay", v) };
        let mut be = MemoryBackend::new();
        let mut st = State::default();
        let d = Desired::build(vec![with(&["10.1.0.0/24"], "\"a\"")], &st);
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 900);
        assert_eq!(st.sources["relay"].published, Some(published("\"a\"")));
        // A list the guards refuse keeps the old ETag: the new list is asked for again in full.
        let d = Desired::build(vec![with(&[], "\"b\"")], &st);
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 1000);
        assert_eq!(st.sources["relay"].published, Some(published("\"a\"")));
        // A failure too.
        let d = Desired::build(vec![failed("relay")], &st);
        let r = sync(&mut be, &d, &safety(), false);
        record(&mut st, &d, &r, 1100);
        assert_eq!(
            (st.sources["relay"].published.clone(), st.sources["relay"].fetched_at),
            (Some(published("\"a\"")), 900)
        );
    }

    fn widening_verdict(current: &[&str], desired: &[&str], safety: &Safety, force: bool) -> Plan {
        plan(set(current), &Desired::build(vec![ok("chat", desired)], &State::default()), safety, force)
    }
    fn refused_widening(p: &Plan) -> bool {
        matches!(p.verdict, Verdict::Refused(Refusal::MassWidening { .. }))
    }

    #[test]
    fn widening_is_counted_in_addresses_not_already_held() {
        // Merging a /25 into its /24 adds 128 addresses.
        let p = widening_verdict(&["10.0.0.0/25"], &["10.0.0.0/24"], &safety(), false);
        assert_eq!(p.widening, Widening { v4_addresses: 128, v6_nets: 0 });
        // The first sync into an empty set counts too.
        let p = widening_verdict(&[], &["10.0.0.0/24", "10.0.1.0/25"], &safety(), false);
        assert_eq!(p.widening.v4_addresses, 384);
        // A realistic GetIPList answer passes the defaults: tens of /24s and /25s.
        let answer: Vec<String> = (0..40)
            .map(|i| format!("203.{i}.113.0/24"))
            .chain((0..40).map(|i| format!("198.{i}.100.128/25")))
            .collect();
        let answer: Vec<&str> = answer.iter().map(String::as_str).collect();
        let p = widening_verdict(&[], &answer, &safety(), false);
        assert_eq!(p.widening.v4_addresses, 40 * 256 + 40 * 128);
        assert_eq!(p.verdict, Verdict::Apply);
    }

    #[test]
    fn ipv6_widening_is_counted_in_64s() {
        let v6 = |current: &[&str], desired: &[&str]| {
            widening_verdict(current, desired, &safety(), false).widening.v6_nets
        };
        assert_eq!(v6(&[], &["2001:db8::1"]), 1, "a /128 counts as its /64");
        assert_eq!(v6(&[], &["2001:db8::1", "2001:db8::ffff:0:0:1"]), 1, "one /64, counted once");
        assert_eq!(v6(&[], &["2001:db8::/63"]), 2);
        assert_eq!(v6(&[], &["2001:db8::/48"]), 65536);
        assert_eq!(v6(&["2001:db8::1"], &["2001:db8::/64"]), 1, "the rest of a /64 held in part");
        assert_eq!(v6(&["2001:db8::/64"], &["2001:db8::1"]), 0, "already held");
        assert_eq!(v6(&["2001:db8::/64"], &["2001:db8::/63"]), 1);
        // A range across a /64 boundary touches both.
        assert_eq!(v6(&[], &["2001:db8:0:0:ffff:ffff:ffff:ffff", "2001:db8:0:1::"]), 2);
        assert_eq!(v6(&[], &["::/0"]), 1 << 64);
    }

    #[test]
    fn widening_past_the_limit_is_refused_at_the_edge_and_force_overrides() {
        let s = safety();
        // IPv4: exactly 65536 (a /16) passes, one more address is refused.
        let p = widening_verdict(&[], &["10.1.0.0/16"], &s, false);
        assert_eq!((p.widening.v4_addresses, &p.verdict), (65536, &Verdict::Apply));
        let p = widening_verdict(&[], &["10.1.0.0/16", "10.3.0.1"], &s, false);
        assert_eq!(p.widening.v4_addresses, 65537);
        assert!(refused_widening(&p), "{:?}", p.verdict);
        let Verdict::Refused(r) = &p.verdict else { unreachable!() };
        assert_eq!(
            r.to_string(),
            "refusing to add 65537 IPv4 addresses (more than safety.max_added_addresses_v4 65536) to the \
             allowlist at once, e.g. 10.1.0.0/16, 10.3.0.1; use `allowsync once --force` if this is expected"
        );
        // Already held addresses do not count: the same list on top of a /17 of it passes.
        assert_eq!(
            widening_verdict(&["10.1.0.0/17"], &["10.1.0.0/16", "10.3.0.1"], &s, false).verdict,
            Verdict::Apply
        );
        // IPv6: exactly 65536 /64s (a /48) passes, one /64 more is refused.
        assert_eq!(widening_verdict(&[], &["2001:db8::/48"], &s, false).verdict, Verdict::Apply);
        let p = widening_verdict(&[], &["2001:db8::/48", "2001:db8:1::1"], &s, false);
        assert_eq!(p.widening.v6_nets, 65537);
        assert!(refused_widening(&p));
        let Verdict::Refused(r) = &p.verdict else { unreachable!() };
        assert!(
            r.to_string().contains("65537 IPv6 /64 networks (more than safety.max_added_addresses_v6 65536)"),
            "{r}"
        );
        // The limits are the operator's.
        let strict = Safety { max_added_addresses_v4: 255, max_added_addresses_v6: 0, ..safety() };
        assert!(refused_widening(&widening_verdict(&[], &["10.0.0.0/24"], &strict, false)));
        assert!(refused_widening(&widening_verdict(&[], &["2001:db8::1"], &strict, false)));
        assert_eq!(
            widening_verdict(&[], &["10.0.0.0/25", "10.0.1.0/26"], &strict, false).verdict,
            Verdict::Apply
        );
        // The refusal names the additions of the family over its limit.
        let p = widening_verdict(&[], &["2001:db8::1", "10.0.0.0/8"], &s, false);
        let Verdict::Refused(Refusal::MassWidening { sample, .. }) = &p.verdict else {
            panic!("{:?}", p.verdict)
        };
        assert_eq!(sample, &["10.0.0.0/8"]);
        // --force overrides it.
        assert_eq!(widening_verdict(&[], &["10.0.0.0/8"], &s, true).verdict, Verdict::Apply);
    }

    /// A wipe (`nft flush set`) leaves the kernel empty: putting the approved list back is no
    /// widening, however large, but anything beyond it still is.
    #[test]
    fn what_allowsync_last_applied_is_not_counted_as_widening() {
        let big = ["10.0.0.0/12"];
        let st = State { applied: Some(set(big)), ..State::default() };
        let p = plan(AllowSet::default(), &Desired::build(vec![ok("chat", &big)], &st), &safety(), false);
        assert_eq!((p.widening.v4_addresses, &p.verdict), (0, &Verdict::Apply));
        let p = plan(AllowSet::default(), &Desired::restore(set(big)), &safety(), false);
        assert_eq!(p.verdict, Verdict::Apply, "a repair from memory");
        let more = ["10.0.0.0/12", "10.32.0.0/12"];
        let p = plan(AllowSet::default(), &Desired::build(vec![ok("chat", &more)], &st), &safety(), false);
        assert_eq!(p.widening.v4_addresses, 1 << 20);
        assert!(refused_widening(&p), "{:?}", p.verdict);
        // Without a state, the same empty kernel counts everything (the first sync).
        let p = plan(
            AllowSet::default(),
            &Desired::build(vec![ok("chat", &big)], &State::default()),
            &safety(),
            false,
        );
        assert!(refused_widening(&p));
    }

    #[test]
    fn a_pure_widening_is_refused_and_leaves_the_set() {
        let mut be = MemoryBackend::new();
        let two = ["203.0.113.0/25", "198.51.100.128/25"];
        *be.shared().lock().unwrap() = set(two);
        let d = Desired::build(vec![ok("chat", &[two[0], two[1], "10.0.0.0/8"])], &State::default());
        let (out, p) = sync(&mut be, &d, &safety(), false).unwrap();
        assert!(matches!(out, Outcome::Refused(Refusal::MassWidening { .. })), "{out:?}");
        assert_eq!(p.widening.v4_addresses, 1 << 24);
        assert_eq!(be.writes(), 0);
        assert_eq!(*be.shared().lock().unwrap(), set(two));
        let mut st = State::default();
        record(&mut st, &d, &Ok((out, p)), 7);
        assert!(st.sources.is_empty(), "a refused list is not 'last good'");
        assert!(st.last_error.unwrap().message.contains("refusing to add 16777216 IPv4 addresses"));
        let (out, _) = sync(&mut be, &d, &safety(), true).unwrap();
        assert_eq!(out, Outcome::Applied { added: 1, removed: 0 });
    }

    #[test]
    fn force_never_empties_the_allowlist() {
        let d = Desired::build(vec![ok("office", &[])], &State::default());
        let p = plan(set(["10.0.0.1"]), &d, &safety(), true);
        assert!(matches!(p.verdict, Verdict::Refused(Refusal::Empty { current: 1 })), "{:?}", p.verdict);
    }

    #[test]
    fn nothing_to_do_writes_nothing() {
        let mut be = MemoryBackend::new();
        *be.shared().lock().unwrap() = set(["10.0.0.0/24"]);
        let d = Desired::build(vec![ok("chat", &["10.0.0.0/24"])], &State::default());
        let (out, _) = sync(&mut be, &d, &safety(), false).unwrap();
        assert_eq!(out, Outcome::InSync);
        assert_eq!(be.writes(), 0);
    }

    mod widening {
        use super::*;
        use crate::prefixes::Ranges;
        use proptest::prelude::*;

        /// Ranges in a small corner of each space, so that they overlap and touch often: IPv4 in
        /// 0..256, IPv6 over the first eight /64s.
        fn v4() -> impl Strategy<Value = Vec<Range<u32>>> {
            prop::collection::vec(
                (0u32..256, 0u32..40).prop_map(|(s, l)| Range { start: s, end: (s + l).min(255) }),
                0..8,
            )
        }
        fn v6() -> impl Strategy<Value = Vec<Range<u128>>> {
            let at = (0u128..8, prop_oneof![Just(0u128), Just(u64::MAX as u128), 0u128..16]);
            prop::collection::vec((at, 0u128..(3 << 64)), 0..8).prop_map(|v| {
                v.into_iter()
                    .map(|((b, o), l)| {
                        let s = (b << 64) + o;
                        Range { start: s, end: s + l }
                    })
                    .collect()
            })
        }
        fn allow(v4: Vec<Range<u32>>, v6: Vec<Range<u128>>) -> AllowSet {
            AllowSet { v4: Ranges::aggregate(v4), v6: Ranges::aggregate(v6) }
        }

        proptest! {
            /// Against brute force: every IPv4 address of the corner, and for IPv6 every /64 of
            /// it probed where an added stretch can begin (a range's start, the address after a
            /// range, the /64's first address).
            #[test]
            fn counts_exactly_what_is_added(c4 in v4(), t4 in v4(), c6 in v6(), t6 in v6()) {
                let (cur, target) = (allow(c4, c6), allow(t4, t6));
                let (w, _) = Widening::between(&cur, &target);
                let added4 = (0u32..256).filter(|&a| target.v4.contains(a) && !cur.v4.contains(a)).count();
                prop_assert_eq!(w.v4_addresses, added4 as u128);
                let mut probes: Vec<u128> = (0..12).map(|b| b << 64).collect();
                for r in cur.v6.iter().chain(target.v6.iter()) {
                    probes.extend([r.start, r.end + 1]);
                }
                let added_in = |b: u128| probes.iter().any(|&p| p >> 64 == b && target.v6.contains(p) && !cur.v6.contains(p));
                prop_assert_eq!(w.v6_nets, (0..12).filter(|&b| added_in(b)).count() as u128);
            }
        }
    }
}
