//! The ipset backend over netlink (issue 21), 100k IPv4 /32 entries: a whole `allowsync once`
//! that loads them against `ipset restore` of the same entries into a pre-created set (process
//! start included for both); a `once` that applies +100/-100 against one that finds nothing to
//! change; `apply` of +100/-100 and `read` in process, the read beside `ipset list -o save`.
//! (The target on `apply` is the incremental section's, whose child process measures it.)

use std::time::Instant;

use allowsync::backend::Backend;
use allowsync::backend::ipset::IpsetBackend;
use allowsync::config::IpsetConfig;
use allowsync::prefixes::AllowSet;
use ipnet::IpNet;
use serde_json::json;

use crate::api::Api;
use crate::contenders::*;
use crate::entries::Kind;
use crate::measure::{median, ms, run_rusage, timed};
use crate::report::{Report, fmt_ms};

const N: u32 = 100_000;
const CHANGE: u32 = 100;

/// The list and the same list with +100/-100 (every 1000th entry out, as many from elsewhere in).
fn lists() -> (Vec<IpNet>, Vec<IpNet>) {
    let kind = Kind::V4Host;
    let base = kind.entries(10, N);
    let out: Vec<IpNet> = (0..CHANGE).map(|j| kind.entry(10, j * (N / CHANGE))).collect();
    let changed: Vec<IpNet> = base
        .iter()
        .filter(|n| !out.contains(n))
        .copied()
        .chain((0..CHANGE).map(|j| kind.entry(11, j * 1000)))
        .collect();
    (base, changed)
}

fn once_backend() -> IpsetBackend {
    IpsetBackend::new(&IpsetConfig {
        set_v4: "once_v4".into(),
        set_v6: "once_v6".into(),
        maxelem: MAXELEM,
        enforce: None,
        check_interval: std::time::Duration::from_secs(10),
    })
    .unwrap()
}

pub fn ipset_section(rep: &mut Report, api: &Api, runs: usize, once_runs: usize) {
    rep.line(format!(
        "\n## The ipset backend over netlink, {N} IPv4 /32 entries (medians; processes with their start included)"
    ));
    let (base, changed) = lists();
    let dir = tempfile::tempdir().unwrap();
    let cfg = api.config_with(
        dir.path(),
        &format!("ipset: {{ set_v4: once_v4, set_v6: once_v6, maxelem: {MAXELEM} }}"),
    );
    let bin = allowsync_bin();
    let log = dir.path().join("once.log");
    let args = ["-c", cfg.to_str().unwrap(), "once"];
    let once = |what: &str| {
        let (w, _, code) = run_rusage(&bin, &args, &log);
        assert_eq!(
            code,
            0,
            "allowsync once ({what}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        w
    };

    // Full load: a cold `once` (no set, no state file) against `ipset restore` into a set
    // created beforehand, interleaved.
    let restore_file = tmpfile("ipset-load.ipset", &ipset_lines("add", Kind::V4Host, &base));
    api.serve(&base);
    let (mut cold, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = once_backend().teardown();
        let _ = std::fs::remove_file(dir.path().join("state.json"));
        cold.push(once("cold"));
        ipset_reset(Kind::V4Host);
        restore.push(timed("ipset", &["restore"], Some(&restore_file)).unwrap());
    }
    let _ = timed("ipset", &["destroy", IPSET_V4], None);

    // A `once` that changes +100/-100 against one that finds nothing to change.
    let _ = once_backend().teardown();
    let _ = std::fs::remove_file(dir.path().join("state.json"));
    once("cold");
    let (mut same, mut change) = (Vec::new(), Vec::new());
    for i in 0..once_runs {
        same.push(once("in sync"));
        api.serve(if i % 2 == 0 { &changed } else { &base });
        change.push(once("with a change"));
    }
    let held = once_backend().read().unwrap();
    assert_eq!(held.len(), N as usize, "the kernel holds what the API served");

    // In process: `apply` of +100/-100 by a backend that has read nothing yet (it reads the set
    // itself, as in a fresh process), and by one right after the cycle's `read`; the read
    // beside `ipset list -o save` of the same set.
    let mut b = once_backend();
    b.ensure().unwrap();
    let (mut read, mut apply, mut apply_after_read, mut list) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (base_set, changed_set) =
        (AllowSet::from_nets(base.iter().copied()), AllowSet::from_nets(changed.iter().copied()));
    let now = b.read().unwrap();
    b.apply(&now.diff_to(&base_set)).unwrap();
    for _ in 0..once_runs {
        // base -> changed by a fresh backend, then back by `b` after its read.
        let t = Instant::now();
        let now = b.read().unwrap();
        read.push(ms(t.elapsed()));
        list.push(timed("ipset", &["list", "-o", "save", "once_v4"], None).unwrap());
        let diff = now.diff_to(&changed_set);
        let mut fresh = once_backend();
        fresh.ensure().unwrap();
        let t = Instant::now();
        fresh.apply(&diff).unwrap();
        apply.push(ms(t.elapsed()));
        let now = b.read().unwrap();
        let diff = now.diff_to(&base_set);
        let t = Instant::now();
        b.apply(&diff).unwrap();
        apply_after_read.push(ms(t.elapsed()));
    }
    let _ = once_backend().teardown();

    let (cold_m, restore_m) = (median(&cold), median(&restore));
    let (same_m, change_m) = (median(&same), median(&change));
    let (read_m, apply_m, list_m) = (median(&read), median(&apply), median(&list));
    let after_read_m = median(&apply_after_read);
    rep.line("| figure | allowsync | beside | ratio or difference |");
    rep.line("|---|---:|---:|---:|");
    rep.line(format!(
        "| full load: `once` cold vs `ipset restore` into a pre-created set ({runs} runs) | {} | {} | {:.2}x |",
        fmt_ms(Some(cold_m)),
        fmt_ms(Some(restore_m)),
        cold_m / restore_m
    ));
    rep.line(format!(
        "| `once` applying +{CHANGE}/-{CHANGE} vs `once` in sync ({once_runs} runs each) | {} | {} | +{} |",
        fmt_ms(Some(change_m)),
        fmt_ms(Some(same_m)),
        fmt_ms(Some(change_m - same_m))
    ));
    rep.line(format!(
        "| `apply` +{CHANGE}/-{CHANGE} in process, the set not read before (`apply` reads it) | {} | | |",
        fmt_ms(Some(apply_m))
    ));
    rep.line(format!(
        "| `apply` +{CHANGE}/-{CHANGE} in process, right after the cycle's `read` | {} | | |",
        fmt_ms(Some(after_read_m))
    ));
    rep.line(format!(
        "| `read` of the set in process vs `ipset list -o save` | {} | {} | {:.2}x |",
        fmt_ms(Some(read_m)),
        fmt_ms(Some(list_m)),
        read_m / list_m
    ));
    rep.push(
        "ipset_netlink",
        json!({
            "entries": N, "changed": CHANGE,
            "once_cold_ms": cold_m, "ipset_restore_ms": restore_m,
            "once_in_sync_ms": same_m, "once_with_change_ms": change_m,
            "apply_ms": apply_m, "apply_after_read_ms": after_read_m, "read_ms": read_m, "ipset_list_save_ms": list_m,
            "samples": { "once_cold": cold, "ipset_restore": restore, "once_in_sync": same,
                         "once_with_change": change, "apply": apply, "apply_after_read": apply_after_read, "read": read, "ipset_list_save": list },
        }),
    );
    rep.target(
        change_m - same_m <= 25.0,
        format!(
            "ipset once with +-{CHANGE} on {N} minus once unchanged: {} (target <= 25 ms)",
            fmt_ms(Some(change_m - same_m))
        ),
    );
    rep.target(
        cold_m <= 0.6 * restore_m,
        format!(
            "ipset full load {N}: once {} vs ipset restore {} = {:.2}x (target <= 0.6x)",
            fmt_ms(Some(cold_m)),
            fmt_ms(Some(restore_m)),
            cold_m / restore_m
        ),
    );
    rep.target(
        read_m <= 0.5 * list_m,
        format!(
            "ipset read {N}: {} vs ipset list -o save {} = {:.2}x (target <= 0.5x)",
            fmt_ms(Some(read_m)),
            fmt_ms(Some(list_m)),
            read_m / list_m
        ),
    );
}
