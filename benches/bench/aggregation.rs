//! Aggregation of 1M random entries (`AllowSet::from_nets`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use allowsync::prefixes::AllowSet;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::measure::{median, ms};
use crate::report::{Report, fmt_ms};

pub fn aggregation(rep: &mut Report, runs: usize) {
    const N: usize = 1_000_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let nets: Vec<IpNet> = (0..N)
        .map(|i| {
            if i % 10 < 9 {
                let len = if rng.random_bool(0.7) { 32 } else { rng.random_range(16..=31) };
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len).unwrap().trunc())
            } else {
                let len = rng.random_range(32..=128);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(rng.random::<u128>()), len).unwrap().trunc())
            }
        })
        .collect();
    let mut times = Vec::new();
    let mut out = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let set = AllowSet::from_nets(nets.iter().copied());
        times.push(ms(t.elapsed()));
        out = set.len();
    }
    let m = median(&times);
    rep.line(format!("\n## Aggregation (AllowSet::from_nets), median of {runs} runs"));
    rep.line("| input | output ranges | time |");
    rep.line("|---|---:|---:|");
    rep.line(format!(
        "| {N} random entries (90% IPv4 /16../32, 10% IPv6 /32../128) | {out} | {} |",
        fmt_ms(Some(m))
    ));
    rep.push(
        "aggregation",
        json!({ "entries": N, "ranges": out, "runs": runs, "median_ms": m, "samples": times }),
    );
    rep.target(m <= 1000.0, format!("aggregation of 1M entries: {} (target <= 1 s)", fmt_ms(Some(m))));
}
