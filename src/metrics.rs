//! Prometheus metrics: a recorder fed from what the daemon already knows (each cycle's
//! [`CycleReport`], each repair, the state's [`Health`] at start), so that the syncer knows
//! nothing of Prometheus. Encoded by the `prometheus` crate in the text format; served by
//! [`http`] (`metrics.listen`) and written as node_exporter's textfile (`metrics.textfile`,
//! [`write_textfile`]).
//!
//! Names and labels are a contract (README, "Metrics"). No label or value carries a secret:
//! labels are source names, nettypes, classes and fixed words; the usersig appears only as its
//! expiry time.

pub mod http;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::health::{self, Health};
use crate::repair::Trigger;
use crate::syncer::CycleReport;

/// `allowsync_syncs_total{outcome}`.
const OUTCOMES: [&str; 4] = ["applied", "unchanged", "refused", "failed"];
/// `allowsync_guard_refusals_total{guard}`.
const GUARDS: [&str; 4] = ["removal", "widening", "empty", "min_prefix"];
/// `allowsync_repairs_total{cause}`: drift found by a cycle's poll of the API, a change
/// notification (or lost notifications), a periodic check.
const CAUSES: [&str; 3] = ["poll", "event", "check"];

/// Cycles fetch over the network (seconds) and may load 100k entries: 5 ms to 2 min.
const DURATION_BUCKETS: [f64; 13] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// The repair cause of a trigger, as `allowsync_repairs_total{cause}` names it.
pub fn cause(trigger: &Trigger) -> &'static str {
    match trigger {
        Trigger::Notified { .. } | Trigger::Lost => "event",
        Trigger::Check { .. } | Trigger::Poll => "check",
    }
}

/// Every metric allowsync exports, in one registry.
pub struct Metrics {
    registry: Registry,
    last_success: IntGauge,
    sync_duration: Histogram,
    syncs: IntCounterVec,
    entries: IntGaugeVec,
    source_last_success: IntGaugeVec,
    source_last_good: IntGaugeVec,
    api_requests: IntCounterVec,
    guard_refusals: IntCounterVec,
    repairs: IntCounterVec,
    usersig_expiry: IntGaugeVec,
    /// For `/healthz`: the last success (0: none) and the interval, in seconds.
    last_success_at: AtomicU64,
    interval_s: AtomicU64,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str], values: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    // Every fixed label value from the start: a rate over a series that appears only with
    // its first event misses that event.
    for v in values {
        c.with_label_values(&[v]);
    }
    c
}

impl Metrics {
    pub fn new(interval: Duration) -> Metrics {
        let r = Registry::new();
        let build = gauge_vec(&r, "allowsync_build_info", "allowsync's version (always 1)", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let last_success = IntGauge::new(
            "allowsync_last_success_timestamp_seconds",
            "When a sync last had every source answer fresh and left the kernel equal to the desired set",
        )
        .expect("a valid metric");
        r.register(Box::new(last_success.clone())).expect("registered once");
        let sync_duration = Histogram::with_opts(
            HistogramOpts::new(
                "allowsync_sync_duration_seconds",
                "How long a sync cycle took, fetch included",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )
        .expect("a valid metric");
        r.register(Box::new(sync_duration.clone())).expect("registered once");
        Metrics {
            last_success,
            sync_duration,
            syncs: counter_vec(
                &r,
                "allowsync_syncs_total",
                "Sync cycles by outcome",
                &["outcome"],
                &OUTCOMES,
            ),
            entries: gauge_vec(
                &r,
                "allowsync_entries",
                "CIDR prefixes per family in the kernel set and in the desired set",
                &["family", "where"],
            ),
            source_last_success: gauge_vec(
                &r,
                "allowsync_source_last_success_timestamp_seconds",
                "When the source last answered fresh",
                &["source"],
            ),
            source_last_good: gauge_vec(
                &r,
                "allowsync_source_using_last_good",
                "1 while the source's last good list stands in for it",
                &["source"],
            ),
            api_requests: counter_vec(
                &r,
                "allowsync_api_requests_total",
                "GetIPList requests per source and nettype (and url source requests, without a nettype), by result (ok or the error's class)",
                &["source", "nettype", "result"],
                &[],
            ),
            guard_refusals: counter_vec(
                &r,
                "allowsync_guard_refusals_total",
                "What a safety guard refused, by guard",
                &["guard"],
                &GUARDS,
            ),
            repairs: counter_vec(
                &r,
                "allowsync_repairs_total",
                "Repairs of allowsync's objects or sets, by what found the damage",
                &["cause"],
                &CAUSES,
            ),
            usersig_expiry: gauge_vec(
                &r,
                "allowsync_usersig_expiry_timestamp_seconds",
                "When the usersig a Chat source sends expires",
                &["source"],
            ),
            registry: r,
            last_success_at: AtomicU64::new(0),
            interval_s: AtomicU64::new(interval.as_secs()),
        }
    }

    /// The interval `/healthz` judges by (after a reload).
    pub fn set_interval(&self, interval: Duration) {
        self.interval_s.store(interval.as_secs(), Ordering::Relaxed);
    }

    /// What the state file knew at start: the last success and the sources' states, so that a
    /// restart does not look like an allowlist that never synced.
    pub fn seed(&self, h: &Health) {
        self.set_health(h);
        if let Some(k) = h.kernel {
            self.set_entries("kernel", k);
        }
        if let Some(d) = h.desired {
            self.set_entries("desired", d);
        }
    }

    fn set_health(&self, h: &Health) {
        if let Some(t) = h.last_success {
            self.last_success.set(t as i64);
            self.last_success_at.store(t, Ordering::Relaxed);
        }
        // Sources no longer configured disappear with the next cycle's health.
        self.source_last_success.reset();
        self.source_last_good.reset();
        for (name, s) in &h.sources {
            if let Some(t) = s.last_success {
                self.source_last_success.with_label_values(&[name]).set(t as i64);
            }
            self.source_last_good.with_label_values(&[name]).set(i64::from(s.on_last_good));
        }
    }

    fn set_entries(&self, place: &str, c: health::Counts) {
        self.entries.with_label_values(&["ipv4", place]).set(c.v4 as i64);
        self.entries.with_label_values(&["ipv6", place]).set(c.v6 as i64);
    }

    /// A finished cycle, with the health it left in the state.
    pub fn cycle(&self, r: &CycleReport, h: &Health) {
        self.syncs.with_label_values(&[health::outcome_label(&r.outcome)]).inc();
        self.sync_duration.observe(r.duration_ms as f64 / 1000.0);
        self.set_health(h);
        if let Some(k) = r.kernel {
            self.set_entries("kernel", k);
        }
        self.set_entries("desired", r.desired);
        for q in &r.requests {
            // A `url` source has no nettype: an empty label, which Prometheus reads as none.
            let nettype = q.nettype.map_or_else(String::new, |n| n.to_string());
            self.api_requests.with_label_values(&[&q.source, &nettype, q.result]).inc();
        }
        for g in &r.guards {
            self.guard_refusals.with_label_values(&[g]).inc();
        }
        if r.drift.is_some() {
            self.repairs.with_label_values(&["poll"]).inc();
        }
        self.usersig_expiry.reset();
        for (name, t) in &r.usersig_expiries {
            self.usersig_expiry.with_label_values(&[name]).set(*t as i64);
        }
    }

    /// A cycle abandoned at its deadline before it reached the kernel.
    pub fn abandoned(&self, took: Duration) {
        self.syncs.with_label_values(&["failed"]).inc();
        self.sync_duration.observe(took.as_secs_f64());
    }

    /// A repair that put something back (`cause` from [`cause`]); a refused one counts as a
    /// guard refusal.
    pub fn repaired(&self, cause: &str) {
        self.repairs.with_label_values(&[cause]).inc();
    }

    pub fn refused(&self, guard: &str) {
        self.guard_refusals.with_label_values(&[guard]).inc();
    }

    /// What the kernel holds after a repair.
    pub fn kernel(&self, c: health::Counts) {
        self.set_entries("kernel", c);
    }

    /// Every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encoding to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// `/healthz`: `Ok` while the last success is younger than 2 × interval, else why not.
    pub fn healthz(&self, now: u64) -> Result<String, String> {
        let at = self.last_success_at.load(Ordering::Relaxed);
        let interval = Duration::from_secs(self.interval_s.load(Ordering::Relaxed));
        match health::stale((at > 0).then_some(at), interval, now) {
            Some(why) => Err(why),
            None => Ok(format!("ok: last successful sync {}s ago", now.saturating_sub(at))),
        }
    }
}

/// Writes `text` ([`Metrics::encode`]) to `path` for node_exporter's textfile collector: a
/// temporary file in the same directory, mode 0644, renamed over the old one, so that a scrape
/// reads the old file or the new one, never half of one. No timestamps (node_exporter refuses
/// them).
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // node_exporter reads only *.prom: the temporary name must not end so.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    // The mode regardless of the umask.
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    #[test]
    fn fixed_label_values_exist_from_the_start_and_the_text_parses() {
        let m = Metrics::new(Duration::from_secs(60));
        let s = parse(&m.encode());
        let value = |name: &str, label: (&str, &str)| {
            s.samples
                .iter()
                .find(|x| x.metric == name && x.labels.get(label.0) == Some(label.1))
                .map(|x| x.value.clone())
        };
        for o in OUTCOMES {
            assert_eq!(
                value("allowsync_syncs_total", ("outcome", o)),
                Some(prometheus_parse::Value::Counter(0.0))
            );
        }
        for g in GUARDS {
            assert!(value("allowsync_guard_refusals_total", ("guard", g)).is_some(), "{g}");
        }
        assert_eq!(
            value("allowsync_build_info", ("version", env!("CARGO_PKG_VERSION"))),
            Some(prometheus_parse::Value::Gauge(1.0))
        );
        assert_eq!(m.healthz(1000), Err("no successful sync yet".into()));
        let h = Health { last_success: Some(1000), ..Health::default() };
        m.seed(&h);
        assert!(m.healthz(1120).is_ok());
        assert!(m.healthz(1121).unwrap_err().contains("more than 2 x interval"));
    }

    #[test]
    fn the_textfile_is_replaced_whole_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowsync.prom");
        std::fs::write(&path, "stale").unwrap();
        let m = Metrics::new(Duration::from_secs(60));
        write_textfile(&path, &m.encode()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let s = parse(&std::fs::read_to_string(&path).unwrap());
        assert!(s.samples.iter().any(|x| x.metric == "allowsync_build_info"));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("allowsync.prom")], "no temporary file left");
    }
}
