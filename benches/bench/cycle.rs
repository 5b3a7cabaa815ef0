//! A cycle with nothing to change: `Syncer::cycle` in process, its CPU time and its writes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use allowsync::backend::{self, Backend};
use allowsync::config::Config;
use allowsync::syncer::Syncer;
use allowsync_testkit::backends::Counting;
use allowsync_testkit::daemon;
use serde_json::json;

use crate::api::Api;
use crate::entries::Kind;
use crate::measure::{cpu_of, median, ms, percentile, thread_cpu};
use crate::report::{Report, fmt_ms};

pub fn no_change_cycle(rep: &mut Report, api: &Api, runs: usize) {
    const N: u32 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = api.config(dir.path());
    api.serve(&Kind::V4Host.entries(10, N));
    let _ = daemon::backend().teardown();
    let cfg = Config::load(&cfg_path).unwrap();
    let counting = Counting::new(daemon::backend());
    let applies = counting.applies();
    // Wrapped as `backend::from_config` wraps the daemon's backend.
    let cached = backend::Cached::new(Box::new(counting));
    let mut syncer = Syncer::with_backend(cfg, Box::new(cached), true).unwrap();
    // The syncer's runtime on this thread, and its one blocking-pool thread (backend calls and
    // the state file write run there), kept alive throughout: their CPU time is the cycle's.
    let pool = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = pool.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        // SAFETY: pthread_self has no preconditions.
        .on_thread_start(move || started.lock().unwrap().push(unsafe { libc::pthread_self() }))
        .build()
        .unwrap();
    let syncer_cpu = || thread_cpu() + pool.lock().unwrap().iter().map(|&t| cpu_of(t)).sum::<Duration>();
    rt.block_on(syncer.cycle(false)); // loads the set
    rt.block_on(syncer.cycle(false)); // warm
    let before_applies = applies.load(Ordering::Relaxed);
    let gen_before = daemon::backend().generation().unwrap();
    let requests_before = api.mock.request_count();
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (c0, t0) = (syncer_cpu(), Instant::now());
        let report = rt.block_on(syncer.cycle(false));
        wall.push(ms(t0.elapsed()));
        cpu.push(ms(syncer_cpu() - c0));
        assert!(report.outcome.is_ok(), "{:?}", report.outcome);
        assert_eq!(report.v4, N as usize);
    }
    let gen_after = daemon::backend().generation().unwrap();
    let writes = applies.load(Ordering::Relaxed) - before_applies;
    let fetches = api.mock.request_count() - requests_before;
    let _ = daemon::backend().teardown();
    let (w, c) = (median(&wall), median(&cpu));
    let gen_moved = gen_after != gen_before;
    rep.line(format!(
        "\n## A cycle with nothing to change, {N} entries (Syncer::cycle in process, {runs} runs, mock API on another thread)"
    ));
    rep.line("| wall p50 | CPU p50 (syncer threads) | CPU max | GetIPList calls per cycle | non-empty applies | ruleset generation changed |");
    rep.line("|---:|---:|---:|---:|---:|---:|");
    rep.line(format!(
        "| {} | {} | {} | {} | {writes} | {} |",
        fmt_ms(Some(w)),
        fmt_ms(Some(c)),
        fmt_ms(Some(percentile(&cpu, 100.0))),
        fetches / runs,
        if gen_moved { "yes" } else { "no" }
    ));
    rep.push(
        "no_change_cycle",
        json!({
            "entries": N, "runs": runs, "wall_p50_ms": w, "cpu_p50_ms": c, "writes": writes,
            "generation_changed": gen_moved, "samples": { "wall": wall, "cpu": cpu },
        }),
    );
    rep.target(c <= 5.0, format!("no-change cycle at {N}: {} CPU (target <= 5 ms)", fmt_ms(Some(c))));
    rep.target(
        writes == 0 && !gen_moved,
        format!(
            "no-change cycle at {N}: {writes} applies, ruleset generation {} (target: no writes)",
            if gen_moved { "changed" } else { "unchanged" }
        ),
    );
}
