//! `make bench` (issue 9): allowsync against `nft -f` and `ipset restore`, the whole `allowsync
//! once`, the no-change cycle, aggregation, memory and binary size. Prints a table, PASS/MISS
//! lines for the targets, and writes `target/bench/results.json`.
//!
//! Runs as root, inside a network namespace of its own (never the host's ruleset): the main
//! thread unshares before anything else, and every process and thread it starts afterwards
//! (`nft`, `ipset`, `allowsync`, the mock's runtime) lives in that namespace.
//!
//! Loads are measured as whole processes for every contender, process start included: `nft -f
//! FILE`, `ipset restore < FILE`, and this binary re-executed as `__apply BACKEND FILE` (parse the
//! entries, aggregate, `ensure`, then `Backend::apply` of the diff). The child also reports how
//! long `apply` alone took, printed as "apply()" next to it.
//!
//! Environment: `BENCH_FULL=1` adds the 1M-entry loads; `BENCH_RUNS=N` (default 5, at least 5)
//! runs per figure; `BENCH_ONCE_RUNS=N` (default 20) runs of `allowsync once` (and rounds of
//! each repair, at least 20); `BENCH_IDLE_SECONDS=N` (default 30) per idle-cost row;
//! `BENCH_ONLY=` a comma-separated subset of aggregation, binary, cycle, once, load, incremental,
//! ipset, repair, idle.
//!
//! One module per section (`load`, `incremental`, `once`, `cycle`, `aggregation`, `binary`,
//! `ipset` (the ipset backend's figures of issue 21), `repair` with the idle cost), with what they share: the entry lists, the contenders,
//! measuring and the report.

mod aggregation;
mod api;
mod binary;
mod contenders;
mod cycle;
mod entries;
mod incremental;
mod ipset;
mod load;
mod measure;
mod once;
mod repair;
mod report;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use allowsync_testkit::netns;
use serde_json::{Value, json};

use crate::api::Api;
use crate::report::Report;

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let ver = |p: &str, a: &str| {
        Command::new(p)
            .arg(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel, "cpu": cpu, "nft": ver("nft", "--version"), "ipset": ver("ipset", "--version"),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__apply") {
        std::process::exit(contenders::child_apply(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some("__rss") {
        std::process::exit(measure::child_rss(&args[2..]));
    }
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("make bench needs root (a private network namespace, nftables, ipset)");
        std::process::exit(2);
    }
    let Some(_ns) = netns::enter_new_netns() else {
        eprintln!("cannot enter a private network namespace");
        std::process::exit(2);
    };
    let env_n = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let runs = env_n("BENCH_RUNS", 5).max(5);
    let once_runs = env_n("BENCH_ONCE_RUNS", 20).max(5);
    let full = std::env::var("BENCH_FULL").is_ok_and(|v| v == "1");
    let mut sizes = vec![1_000, 10_000, 100_000];
    if full {
        sizes.push(1_000_000);
    }

    let m = machine();
    let mut rep = Report::default();
    rep.line(format!(
        "# allowsync bench: {} x {}, Linux {}, {}, {}",
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["nft"].as_str().unwrap_or(""),
        m["ipset"].as_str().unwrap_or("")
    ));
    rep.json.insert("machine".into(), m);

    // BENCH_ONLY=aggregation,binary,cycle,once,load,incremental,ipset,repair,idle: a subset.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    if want("aggregation") {
        aggregation::aggregation(&mut rep, runs);
    }
    if want("binary") {
        binary::binary_size(&mut rep);
    }
    let api = Api::start();
    if want("cycle") {
        cycle::no_change_cycle(&mut rep, &api, once_runs);
    }
    if want("once") {
        once::once_section(&mut rep, &api, once_runs, runs);
    }
    if want("load") {
        load::full_loads(&mut rep, runs, &sizes);
    }
    if want("incremental") {
        incremental::incremental(&mut rep, runs);
    }
    if want("ipset") {
        ipset::ipset_section(&mut rep, &api, runs, once_runs);
    }
    if want("repair") {
        repair::repair_latency(&mut rep, once_runs);
    }
    if want("idle") {
        repair::idle_cost(&mut rep, env_n("BENCH_IDLE_SECONDS", 30) as u64);
    }

    let wall = started.elapsed().as_secs_f64();
    rep.line(format!("\ntotal bench wall time: {wall:.0} s"));
    println!("\n## Targets");
    for (_, l) in &rep.targets {
        println!("{l}");
    }
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    rep.json.insert("wall_s".into(), json!(wall));
    rep.json.insert(
        "targets".into(),
        json!(rep.targets.iter().map(|(ok, l)| json!({"pass": ok, "line": l})).collect::<Vec<_>>()),
    );
    rep.json.insert("table".into(), json!(rep.table));
    let mut f = std::fs::File::create(out_dir.join("results.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&rep.json).unwrap()).unwrap();
    let mut md = rep.table.clone();
    md.push_str("\n## Targets\n");
    for (_, l) in &rep.targets {
        md.push_str(l);
        md.push('\n');
    }
    std::fs::write(out_dir.join("results.md"), md).unwrap();
    println!("\nwrote {}", out_dir.join("results.json").display());
}
