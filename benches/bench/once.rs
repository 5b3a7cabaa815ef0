//! `allowsync once`, the release binary as an operator runs it: wall time and peak RSS, cold and in sync.

use std::sync::atomic::Ordering;

use allowsync::backend::Backend;
use allowsync_testkit::daemon;
use serde_json::json;

use crate::api::Api;
use crate::contenders::allowsync_bin;
use crate::entries::Kind;
use crate::measure::{HELPER_HWM_KIB, median, percentile, run_rusage};
use crate::report::{Report, fmt_ms};

/// Runs of `allowsync once`: cold (empty kernel set, no state file) and in sync (nothing to
/// change; a fresh process still dumps the set once). Returns (cold walls, in-sync walls, cold
/// max RSS KiB, in-sync max RSS KiB) as medians-ready vectors.
pub fn once_runs(api: &Api, n: u32, runs: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = api.config(dir.path());
    let nets = Kind::V4Host.entries(10, n);
    api.serve(&nets);
    let bin = allowsync_bin();
    let log = dir.path().join("once.log");
    let args = ["-c", cfg.to_str().unwrap(), "once"];
    let (mut cold, mut warm, mut cold_rss, mut warm_rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let once = |what: &str| {
        let (w, rss, code) = run_rusage(&bin, &args, &log);
        assert_eq!(
            code,
            0,
            "allowsync once ({what}) failed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        (w, rss as f64)
    };
    for _ in 0..runs {
        let _ = daemon::backend().teardown();
        let _ = std::fs::remove_file(dir.path().join("state.json"));
        let (w, rss) = once("cold");
        cold.push(w);
        cold_rss.push(rss);
        let (w, rss) = once("in sync");
        warm.push(w);
        warm_rss.push(rss);
    }
    let held = daemon::backend().read().unwrap();
    assert_eq!(held.len(), n as usize, "the kernel holds what the API served");
    let _ = daemon::backend().teardown();
    (cold, warm, cold_rss, warm_rss)
}

pub fn once_section(rep: &mut Report, api: &Api, runs: usize, rss_runs: usize) {
    rep.line(format!(
        "\n## `allowsync once` (release binary, mock API over loopback, 7 GetIPList calls, IPv4 /32; {runs} runs)"
    ));
    rep.line(
        "| entries | cold p50 | cold p99 | in sync p50 | in sync p99 | peak RSS cold | peak RSS in sync |",
    );
    rep.line("|---:|---:|---:|---:|---:|---:|---:|");
    for (n, r) in [(100u32, runs), (10_000, runs), (100_000, rss_runs)] {
        let (cold, warm, cold_rss, warm_rss) = once_runs(api, n, r);
        let (crss, wrss) = (median(&cold_rss) / 1024.0, median(&warm_rss) / 1024.0);
        let pct = |v: &[f64], p| if r >= 20 { fmt_ms(Some(percentile(v, p))) } else { "-".into() };
        rep.line(format!(
            "| {n} | {} | {} | {} | {} | {crss:.1} MiB | {wrss:.1} MiB |",
            fmt_ms(Some(percentile(&cold, 50.0))),
            pct(&cold, 99.0),
            fmt_ms(Some(percentile(&warm, 50.0))),
            pct(&warm, 99.0),
        ));
        rep.push(
            "once",
            json!({
                "entries": n, "runs": r,
                "cold_p50_ms": percentile(&cold, 50.0), "cold_p99_ms": percentile(&cold, 99.0),
                "in_sync_p50_ms": percentile(&warm, 50.0), "in_sync_p99_ms": percentile(&warm, 99.0),
                "peak_rss_cold_mib": crss, "peak_rss_in_sync_mib": wrss,
                "samples": { "cold": cold, "in_sync": warm },
            }),
        );
        let limit = match n {
            100 => Some(15.0),
            100_000 => Some(64.0),
            _ => None,
        };
        if let Some(l) = limit {
            let peak = crss.max(wrss);
            rep.target(
                peak <= l,
                format!("peak RSS of allowsync once at {n} entries: {peak:.1} MiB (target <= {l} MB)"),
            );
        }
    }
    rep.line(format!(
        "(cold: empty set and no state file; in sync: nothing to change, a fresh process dumps the set once; p99 is nearest-rank, the 100k row runs only for RSS; peak RSS = ru_maxrss via wait4 from a helper whose own VmHWM is {:.1} MiB)",
        HELPER_HWM_KIB.load(Ordering::Relaxed) as f64 / 1024.0
    ));
}
