//! Full loads into an empty set: 1k to 100k (1M with `BENCH_FULL=1`) entries of each kind.

use serde_json::json;

use crate::contenders::*;
use crate::entries::Kind;
use crate::measure::timed;
use crate::report::{Report, Series, fmt_ms, fmt_ratio};

pub fn full_loads(rep: &mut Report, runs: usize, sizes: &[u32]) {
    rep.line(format!(
        "\n## Full load into an empty set (median of {} runs up to 10k, {runs} above; wall time, process start included)",
        3 * runs
    ));
    rep.line("| entries | kind | allowsync nftables | (apply() only) | nft -f | ratio | allowsync ipset | ipset restore | ratio |");
    rep.line("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut ipset_unavailable: Option<String> = None;
    for &n in sizes {
        for kind in Kind::ALL {
            let nets = kind.entries(10, n);
            let apply_file = tmpfile("load.apply", &entry_lines('+', &nets));
            let nft_file = tmpfile(
                "load.nft",
                &format!("add element inet {NFT_TABLE} s {{ {} }}\n", nft_elements(&nets)),
            );
            let ipset_file = tmpfile("load.ipset", &ipset_lines("add", kind, &nets));
            drop(nets);
            let (mut a_nft, mut nft, mut a_ips, mut ips) =
                (Series::new(), Series::new(), Series::new(), Series::new());
            // Small loads take milliseconds and the host is noisy: three times the runs there.
            let runs = if n <= 10_000 { 3 * runs } else { runs };
            for _ in 0..runs {
                // Interleaved, so that noise hits every contender alike.
                a_nft.add(
                    allowsync_reset(Which::Nftables)
                        .and_then(|()| allowsync_apply(Which::Nftables, &apply_file)),
                );
                nft_reset(kind);
                nft.add(timed("nft", &["-f", nft_file.to_str().unwrap()], None).map(|w| (w, w)));
                if a_ips.ok() {
                    a_ips.add(
                        allowsync_reset(Which::Ipset)
                            .and_then(|()| allowsync_apply(Which::Ipset, &apply_file)),
                    );
                }
                ipset_reset(kind);
                ips.add(timed("ipset", &["restore"], Some(&ipset_file)).map(|w| (w, w)));
            }
            if let Some(e) = &a_ips.error {
                ipset_unavailable.get_or_insert(e.clone());
            }
            let _ = allowsync_reset(Which::Nftables);
            if let Ok(mut b) = Which::Ipset.backend() {
                let _ = b.teardown();
            }
            let _ = timed("nft", &["delete", "table", "inet", NFT_TABLE], None);
            let _ = timed("ipset", &["destroy", ipset_name(kind)], None);
            rep.line(format!(
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} |",
                kind.label(),
                fmt_ms(a_nft.wall()),
                fmt_ms(a_nft.inner()),
                fmt_ms(nft.wall()),
                fmt_ratio(a_nft.wall(), nft.wall()),
                a_ips.wall().map_or("unavailable".into(), |v| fmt_ms(Some(v))),
                fmt_ms(ips.wall()),
                fmt_ratio(a_ips.wall(), ips.wall()),
            ));
            for (name, s) in [
                ("allowsync nftables", &a_nft),
                ("nft -f", &nft),
                ("allowsync ipset", &a_ips),
                ("ipset restore", &ips),
            ] {
                if let Some(e) = &s.error {
                    if name != "allowsync ipset" {
                        rep.line(format!("  {name}: {e}"));
                    }
                }
            }
            rep.push(
                "full_load",
                json!({
                    "entries": n, "kind": kind.label(), "runs": runs, "process_start_included": true,
                    "allowsync_nftables_ms": a_nft.wall(), "allowsync_nftables_apply_ms": a_nft.inner(),
                    "nft_f_ms": nft.wall(), "allowsync_ipset_ms": a_ips.wall(),
                    "allowsync_ipset_error": a_ips.error, "ipset_restore_ms": ips.wall(),
                    "samples": { "allowsync_nftables": a_nft.wall, "nft_f": nft.wall, "ipset_restore": ips.wall },
                }),
            );
            if let (Some(a), Some(b)) = (a_nft.wall(), nft.wall()) {
                rep.target(
                    a <= 0.5 * b,
                    format!(
                        "full load {n} {}: allowsync {} vs nft -f {} = {:.2}x (target <= 0.5x)",
                        kind.label(),
                        fmt_ms(Some(a)),
                        fmt_ms(Some(b)),
                        a / b
                    ),
                );
            }
        }
    }
    if let Some(e) = ipset_unavailable {
        rep.line(format!("ipset backend: {e}"));
    }
}
