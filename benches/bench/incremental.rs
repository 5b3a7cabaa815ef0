//! +100/-100 on a 100k-entry set, for every contender.

use ipnet::IpNet;

use serde_json::json;

use crate::contenders::*;
use crate::entries::Kind;
use crate::measure::{sh, timed};
use crate::report::{Report, Series, fmt_ms, fmt_ratio};

pub fn incremental(rep: &mut Report, runs: usize) {
    const N: u32 = 100_000;
    const CHANGE: u32 = 100;
    let kind = Kind::V4Host;
    rep.line(format!(
        "\n## Incremental +{CHANGE}/-{CHANGE} on a {N}-entry IPv4 /32 set (median of {runs} runs, wall time, process start included)"
    ));
    let base = kind.entries(10, N);
    // Spread over the set: every 1000th entry goes, as many new ones from elsewhere come.
    let a: Vec<IpNet> = (0..CHANGE).map(|j| kind.entry(10, j * (N / CHANGE))).collect();
    let b: Vec<IpNet> = (0..CHANGE).map(|j| kind.entry(11, j * 1000)).collect();
    let mut files = Vec::new();
    for (i, (out, inn)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
        let apply = tmpfile(&format!("inc{i}.apply"), &(entry_lines('-', out) + &entry_lines('+', inn)));
        let nft = tmpfile(
            &format!("inc{i}.nft"),
            &format!(
                "delete element inet {NFT_TABLE} s {{ {} }}\nadd element inet {NFT_TABLE} s {{ {} }}\n",
                nft_elements(out),
                nft_elements(inn)
            ),
        );
        let ips = tmpfile(
            &format!("inc{i}.ipset"),
            &(ipset_lines("del", kind, out) + &ipset_lines("add", kind, inn)),
        );
        files.push((apply, nft, ips));
    }
    // Preload (not timed).
    let load_apply = tmpfile("inc-load.apply", &entry_lines('+', &base));
    let load_nft =
        tmpfile("inc-load.nft", &format!("add element inet {NFT_TABLE} s {{ {} }}\n", nft_elements(&base)));
    let load_ips = tmpfile("inc-load.ipset", &ipset_lines("add", kind, &base));
    drop(base);
    let mut a_nft = Series::new();
    a_nft.add(
        allowsync_reset(Which::Nftables)
            .and_then(|()| allowsync_apply(Which::Nftables, &load_apply))
            .map(|_| (0.0, 0.0)),
    );
    let mut a_ips = Series::new();
    a_ips.add(
        allowsync_reset(Which::Ipset)
            .and_then(|()| allowsync_apply(Which::Ipset, &load_apply))
            .map(|_| (0.0, 0.0)),
    );
    nft_reset(kind);
    sh("nft", &["-f", load_nft.to_str().unwrap()]);
    ipset_reset(kind);
    timed("ipset", &["restore"], Some(&load_ips)).unwrap();
    a_nft.wall.clear();
    a_nft.inner.clear();
    a_ips.wall.clear();
    a_ips.inner.clear();
    let (mut nft, mut ips) = (Series::new(), Series::new());
    for i in 0..runs {
        // Forward, back, forward…: every run is the same size of change on a 100k set.
        let (apply, nft_f, ips_f) = &files[i % 2];
        if a_nft.ok() {
            a_nft.add(allowsync_apply(Which::Nftables, apply));
        }
        nft.add(timed("nft", &["-f", nft_f.to_str().unwrap()], None).map(|w| (w, w)));
        if a_ips.ok() {
            a_ips.add(allowsync_apply(Which::Ipset, apply));
        }
        ips.add(timed("ipset", &["restore"], Some(ips_f)).map(|w| (w, w)));
    }
    let _ = allowsync_reset(Which::Nftables);
    if let Ok(mut b) = Which::Ipset.backend() {
        let _ = b.teardown();
    }
    let _ = timed("nft", &["delete", "table", "inet", NFT_TABLE], None);
    let _ = timed("ipset", &["destroy", ipset_name(kind)], None);

    rep.line("| contender | wall | (apply() only) | speed-up over nft -f | speed-up over ipset restore |");
    rep.line("|---|---:|---:|---:|---:|");
    let row = |name: &str, s: &Series| {
        format!(
            "| {name} | {} | {} | {} | {} |",
            s.wall().map_or_else(|| s.error.clone().unwrap_or_default(), |v| fmt_ms(Some(v))),
            if name.starts_with("allowsync") { fmt_ms(s.inner()) } else { "".into() },
            fmt_ratio(nft.wall(), s.wall()),
            fmt_ratio(ips.wall(), s.wall()),
        )
    };
    let lines = [
        row("allowsync nftables", &a_nft),
        row("nft -f", &nft),
        row("allowsync ipset", &a_ips),
        row("ipset restore", &ips),
    ];
    for l in lines {
        rep.line(l);
    }
    rep.push(
        "incremental",
        json!({
            "entries": N, "added": CHANGE, "removed": CHANGE, "runs": runs, "process_start_included": true,
            "allowsync_nftables_ms": a_nft.wall(), "allowsync_nftables_apply_ms": a_nft.inner(),
            "nft_f_ms": nft.wall(), "allowsync_ipset_ms": a_ips.wall(), "allowsync_ipset_apply_ms": a_ips.inner(),
            "allowsync_ipset_error": a_ips.error, "ipset_restore_ms": ips.wall(),
            "samples": { "allowsync_nftables": a_nft.wall, "nft_f": nft.wall, "ipset_restore": ips.wall },
        }),
    );
    match (a_nft.wall(), nft.wall()) {
        (Some(a), Some(n)) => {
            rep.target(
                a <= 50.0,
                format!("incremental +-{CHANGE} on {N}, nftables: {} (target <= 50 ms)", fmt_ms(Some(a))),
            );
            rep.target(
                n / a >= 100.0,
                format!(
                    "incremental +-{CHANGE} on {N}, nftables: {:.0}x faster than nft -f (target >= 100x)",
                    n / a
                ),
            );
        }
        _ => rep.target(false, format!("incremental nftables: {}", a_nft.error.clone().unwrap_or_default())),
    }
    // Issue 21's figure: `apply` measured inside the process (a fresh one, so `apply` reads the
    // set itself); the wall time, process start and `ensure` included, is in the table.
    if let (Some(a), Some(w)) = (a_ips.inner(), a_ips.wall()) {
        rep.target(
            a <= 50.0,
            format!(
                "incremental +-{CHANGE} on {N}, ipset: apply() {} in process (target <= 50 ms; wall {} with process start)",
                fmt_ms(Some(a)),
                fmt_ms(Some(w))
            ),
        );
    } else if let Some(e) = &a_ips.error {
        rep.line(format!("ipset backend: {e}"));
    }
}
