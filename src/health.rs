//! Is the allowlist healthy? What every cycle leaves in the state file for that question
//! ([`Health`]), and the one judgement that `status`, `/healthz`, the metrics and systemd's
//! `STATUS=` line share ([`judge`], [`summary`]).
//!
//! Two times are kept apart: the last *attempt* (any cycle that reached the kernel half,
//! whatever became of it) and the last *success*: a cycle in which every source answered fresh
//! and the kernel was left equal to the desired set. A cycle on a source's last good list, a
//! refused or a failed one is an attempt, never a success; only the state file write may fail
//! in a success (the kernel holds it all the same).
//!
//! Degraded means any of: no success within `2 × interval` (stale), a source not answering
//! fresh (on its last good list, or failing without one), the last cycle refused by a guard or
//! failed. Whether the daemon runs is told by the state lock ([`lock_holder`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{SourceReport, SourceStatus};
use crate::prefixes::AllowSet;

/// Per family, in CIDR prefixes (a range that is no single prefix counts as the prefixes that
/// make it up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub v4: usize,
    pub v6: usize,
}

impl Counts {
    pub fn of(set: &AllowSet) -> Counts {
        Counts { v4: set.v4.to_prefixes().len(), v6: set.v6.to_prefixes().len() }
    }
}

/// How a cycle ended, as `allowsync_syncs_total{outcome}` names it.
pub fn outcome_label(outcome: &Result<crate::engine::Outcome, String>) -> &'static str {
    use crate::engine::Outcome;
    match outcome {
        Ok(Outcome::Applied { .. }) => "applied",
        Ok(Outcome::InSync) => "unchanged",
        Ok(Outcome::Refused(_)) => "refused",
        Err(_) => "failed",
    }
}

/// What the state file keeps for `status` (see the module header).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// When the last cycle ran (unix seconds), whatever its outcome.
    #[serde(default)]
    pub last_attempt: Option<u64>,
    /// That cycle's outcome: `applied`, `unchanged`, `refused` or `failed`.
    #[serde(default)]
    pub last_outcome: Option<String>,
    /// When the last success was (see the module header).
    #[serde(default)]
    pub last_success: Option<u64>,
    /// Per configured source.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceHealth>,
    /// What the kernel held after the last cycle, and what that cycle wanted.
    #[serde(default)]
    pub kernel: Option<Counts>,
    #[serde(default)]
    pub desired: Option<Counts>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceHealth {
    /// `ok`, or why not: the fetch error's class (`network`, `configuration`, …) or
    /// `suspicious_empty` (an empty answer where there was a list).
    pub result: String,
    /// When it last answered fresh.
    #[serde(default)]
    pub last_success: Option<u64>,
    /// Its last good list stands in for it.
    #[serde(default)]
    pub on_last_good: bool,
    /// When the list it contributes was fetched (`None`: it contributes none).
    #[serde(default)]
    pub list_fetched_at: Option<u64>,
}

/// The `result` of a source, as in [`SourceHealth::result`] and the metrics' labels.
pub fn source_result(s: &SourceReport) -> &'static str {
    match (&s.status, s.error_class) {
        (SourceStatus::Fresh { .. }, _) => "ok",
        (_, Some(class)) => class.label(),
        (_, None) => "suspicious_empty",
    }
}

/// What one cycle tells: its sources, whether it was a success, its outcome's label.
pub struct CycleHealth<'a> {
    pub sources: &'a [SourceReport],
    pub success: bool,
    pub outcome: &'static str,
    pub kernel: Option<Counts>,
    pub desired: Counts,
}

impl Health {
    /// Takes in a cycle that ran at `now`. Sources no longer configured are dropped with it.
    pub fn record(&mut self, c: &CycleHealth<'_>, now: u64) {
        self.last_attempt = Some(now);
        self.last_outcome = Some(c.outcome.to_string());
        if c.success {
            self.last_success = Some(now);
        }
        let before = std::mem::take(&mut self.sources);
        for s in c.sources {
            let old = before.get(&s.name);
            let fresh = s.is_fresh();
            let h = SourceHealth {
                result: source_result(s).to_string(),
                last_success: if fresh { Some(now) } else { old.and_then(|o| o.last_success) },
                on_last_good: matches!(s.status, SourceStatus::Stale { .. }),
                list_fetched_at: match &s.status {
                    SourceStatus::Fresh { .. } => Some(now),
                    SourceStatus::Stale { since, .. } => Some(*since),
                    SourceStatus::Missing { .. } => None,
                },
            };
            self.sources.insert(s.name.clone(), h);
        }
        self.kernel = c.kernel.or(self.kernel);
        self.desired = Some(c.desired);
    }
}

/// How old a success may be before the allowlist counts as stale: two intervals.
pub fn stale_after(interval: Duration) -> u64 {
    interval.as_secs().saturating_mul(2)
}

/// Why the last success is too old, if it is (for `/healthz`).
pub fn stale(last_success: Option<u64>, interval: Duration, now: u64) -> Option<String> {
    let limit = stale_after(interval);
    match last_success {
        None => Some("no successful sync yet".into()),
        Some(t) if now.saturating_sub(t) > limit => Some(format!(
            "last successful sync {}s ago, more than 2 x interval ({limit}s)",
            now.saturating_sub(t)
        )),
        Some(_) => None,
    }
}

/// Every reason the allowlist is degraded (empty: healthy).
pub fn judge(h: &Health, interval: Duration, now: u64) -> Vec<String> {
    let mut reasons: Vec<String> = stale(h.last_success, interval, now).into_iter().collect();
    for (name, s) in &h.sources {
        match (s.result.as_str(), s.on_last_good) {
            ("ok", _) => {}
            (why, true) => reasons.push(format!("source {name}: {why}, on its last good list")),
            (why, false) => reasons.push(format!("source {name}: {why}, no last good list")),
        }
    }
    match h.last_outcome.as_deref() {
        Some("refused") => reasons.push("the last sync was refused by a safety guard".into()),
        Some("failed") => reasons.push("the last sync failed".into()),
        _ => {}
    }
    reasons
}

/// A duration in seconds as `1h02m`, `5m03s`, `42s`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The one-line summary of `status`: entries in the kernel, then [`success_summary`] and how
/// the last sync ended.
pub fn summary(h: &Health, interval: Duration, now: u64) -> String {
    let entries = match h.kernel {
        Some(k) => format!("{} IPv4 + {} IPv6 prefixes", k.v4, k.v6),
        None => "kernel unread".into(),
    };
    let mut line = format!("{entries}, {}", success_summary(h, interval, now));
    match h.last_outcome.as_deref() {
        Some("refused") => line.push_str(", last sync refused by a guard"),
        Some("failed") => line.push_str(", last sync failed"),
        _ => {}
    }
    line
}

/// The last success and its age, the sources not answering fresh, and `STALE` past 2 ×
/// interval: what `status` and systemd's `STATUS=` both say.
pub fn success_summary(h: &Health, interval: Duration, now: u64) -> String {
    let mut line = match h.last_success {
        Some(t) => {
            format!("last success {} ({} ago)", &crate::clock::rfc3339(t)[11..19], age(now.saturating_sub(t)))
        }
        None => "no success yet".into(),
    };
    let degraded: Vec<&str> =
        h.sources.iter().filter(|(_, s)| s.result != "ok").map(|(n, _)| n.as_str()).collect();
    if !degraded.is_empty() {
        line.push_str(&format!(", degraded: {}", degraded.join(" ")));
    }
    if h.last_success.is_some() && stale(h.last_success, interval, now).is_some() {
        line.push_str(", STALE");
    }
    line
}

/// Who holds the state lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The pid the lock file names (its last holder's, once released).
    pub recorded_pid: Option<u32>,
    /// The pid holding the lock now, as the kernel tells (`/proc/locks`).
    pub holder: Option<u32>,
    /// Why the lock file cannot be looked at (not as root: the state directory is 0700), when
    /// it cannot: then nobody can tell whether the daemon runs.
    pub unknown: Option<String>,
}

impl LockHolder {
    /// The pid that holds the lock now, or the one the lock file names when the kernel does
    /// not say.
    pub fn pid(&self) -> Option<u32> {
        self.holder.or(self.recorded_pid)
    }

    /// Held by a live process: the daemon runs (or a `once` or `teardown` is under way).
    pub fn running(&self) -> bool {
        self.holder.is_some_and(alive)
    }
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Who holds the lock file at `lock_path`, read from `/proc/locks` without touching the lock:
/// taking it even for a moment could make a daemon that starts at that moment fail.
pub fn lock_holder(lock_path: &Path) -> LockHolder {
    let recorded_pid = std::fs::read_to_string(lock_path)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
    let meta = std::fs::metadata(lock_path);
    let unknown = match &meta {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Some(format!("cannot look at the lock file {}: {e}", lock_path.display()))
        }
        _ => None,
    };
    let holder = meta.ok().and_then(|m| {
        use std::os::unix::fs::MetadataExt;
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        flock_holder(&locks, m.dev(), m.ino(), recorded_pid)
    });
    LockHolder { recorded_pid, holder, unknown }
}

/// The pid of the `FLOCK` on inode `ino` in a `/proc/locks` text (`1: FLOCK ADVISORY WRITE
/// <pid> <major>:<minor>:<inode> 0 EOF`). The device must match too, unless the pid is the one
/// the lock file names (an overlay filesystem shows another device than `stat`).
fn flock_holder(locks: &str, dev: u64, ino: u64, recorded: Option<u32>) -> Option<u32> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // `1: -> FLOCK …` is a waiter, not the holder.
        let [_, "FLOCK", _, _, pid, id, ..] = f.as_slice() else { return None };
        let pid: u32 = pid.parse().ok()?;
        let mut parts = id.split(':');
        let maj = u32::from_str_radix(parts.next()?, 16).ok()?;
        let min = u32::from_str_radix(parts.next()?, 16).ok()?;
        let inode: u64 = parts.next()?.parse().ok()?;
        (inode == ino && ((maj, min) == (major, minor) || Some(pid) == recorded)).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ErrorClass;

    fn report(name: &str, status: SourceStatus, class: Option<ErrorClass>) -> SourceReport {
        SourceReport { name: name.into(), status, error_class: class, skipped: 0 }
    }

    fn cycle<'a>(sources: &'a [SourceReport], success: bool, outcome: &'static str) -> CycleHealth<'a> {
        CycleHealth {
            sources,
            success,
            outcome,
            kernel: Some(Counts { v4: 2, v6: 1 }),
            desired: Counts::default(),
        }
    }

    #[test]
    fn a_source_on_its_last_good_list_is_an_attempt_not_a_success() {
        let interval = Duration::from_secs(60);
        let mut h = Health::default();
        let fresh = [report("chat", SourceStatus::Fresh { ranges: 3 }, None)];
        h.record(&cycle(&fresh, true, "applied"), 1000);
        assert!(judge(&h, interval, 1000).is_empty());
        assert_eq!(h.sources["chat"].last_success, Some(1000));

        let kept = [report(
            "chat",
            SourceStatus::Stale { reason: "x".into(), since: 1000, ranges: 3 },
            Some(ErrorClass::Network),
        )];
        h.record(&cycle(&kept, false, "unchanged"), 1060);
        assert_eq!((h.last_attempt, h.last_success), (Some(1060), Some(1000)));
        let s = &h.sources["chat"];
        assert_eq!(
            (s.result.as_str(), s.on_last_good, s.last_success, s.list_fetched_at),
            ("network", true, Some(1000), Some(1000))
        );
        assert_eq!(judge(&h, interval, 1060), ["source chat: network, on its last good list"]);
        // Past 2 x interval the success is stale too.
        let r = judge(&h, interval, 1121);
        assert!(r[0].contains("121s ago"), "{r:?}");
        assert!(
            summary(&h, interval, 1121).ends_with("degraded: chat, STALE"),
            "{}",
            summary(&h, interval, 1121)
        );
        assert!(stale(h.last_success, interval, 1120).is_none());
    }

    #[test]
    fn refusals_failures_and_sources_gone_are_judged() {
        let mut h = Health::default();
        let a = [
            report("a", SourceStatus::Fresh { ranges: 1 }, None),
            report("b", SourceStatus::Missing { reason: "x".into() }, None),
        ];
        h.record(&cycle(&a, false, "refused"), 10);
        assert_eq!(
            judge(&h, Duration::from_secs(60), 10),
            [
                "no successful sync yet",
                "source b: suspicious_empty, no last good list",
                "the last sync was refused by a safety guard"
            ]
        );
        let only_a = [report("a", SourceStatus::Fresh { ranges: 1 }, None)];
        h.record(&cycle(&only_a, true, "unchanged"), 20);
        assert_eq!(h.sources.keys().collect::<Vec<_>>(), ["a"]);
        assert!(judge(&h, Duration::from_secs(60), 20).is_empty());
    }

    #[test]
    fn the_flock_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 99 08:01:1234 0 EOF\n3: POSIX  ADVISORY  WRITE 7 08:01:1234 0 EOF\n";
        let dev = rustix::fs::makedev(8, 1);
        assert_eq!(flock_holder(locks, dev, 1234, None), Some(4242));
        assert_eq!(flock_holder(locks, dev, 1235, None), None);
        assert_eq!(flock_holder(locks, rustix::fs::makedev(0, 0x2f), 1234, None), None);
        assert_eq!(flock_holder(locks, rustix::fs::makedev(0, 0x2f), 1234, Some(4242)), Some(4242));

        // For real: a lock this process holds.
        let dir = tempfile::tempdir().unwrap();
        let file = crate::state::StateFile::new(dir.path().join("state.json"));
        let lock_path = dir.path().join("state.json.lock");
        let held = file.lock().unwrap();
        let h = lock_holder(&lock_path);
        assert_eq!((h.holder, h.recorded_pid), (Some(std::process::id()), Some(std::process::id())));
        assert!(h.running());
        drop(held);
        let h = lock_holder(&lock_path);
        assert_eq!((h.holder, h.running(), h.unknown), (None, false, None));

        // A lock file that cannot be looked at (as a non-root user in the 0700 state
        // directory; here under a file) says nothing either way.
        let under_a_file = dir.path().join("state.json.lock/x.lock");
        let h = lock_holder(&under_a_file);
        assert!(!h.running() && h.unknown.is_some(), "{h:?}");
        assert_eq!(lock_holder(&dir.path().join("none.lock")).unknown, None, "a missing one is no lock");
    }
}
