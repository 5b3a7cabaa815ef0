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
//! runs per figure; `BENCH_ONCE_RUNS=N` (default 20) runs of `allowsync once`; `BENCH_ONLY=` a
//! comma-separated subset of aggregation, binary, cycle, once, load, incremental.

#[path = "../tests/common/daemon.rs"]
mod daemon;
#[path = "../tests/common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use allowsync::backend::nftables::NftablesBackend;
use allowsync::backend::{self, Backend, BackendError};
use allowsync::config::{BackendConfig, Config, IpsetConfig, NftablesConfig};
use allowsync::mock::{MockChatApi, MockConfig, MockHandle};
use allowsync::prefixes::{AllowSet, Delta, Diff, parse_entry};
use allowsync::syncer::Syncer;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const KEY: &str = "bench-secret-key";
const NFT_TABLE: &str = "bench_nft";
const IPSET_V4: &str = "bench_v4";
const IPSET_V6: &str = "bench_v6";
const MAXELEM: u32 = 4_000_000;

// ---- entry lists -----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    V4Host,
    V4Net24,
    V6Net64,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::V4Host, Kind::V4Net24, Kind::V6Net64];

    fn label(self) -> &'static str {
        match self {
            Kind::V4Host => "IPv4 /32",
            Kind::V4Net24 => "IPv4 /24",
            Kind::V6Net64 => "IPv6 /64",
        }
    }

    fn v6(self) -> bool {
        self == Kind::V6Net64
    }

    /// Entry `i` of this kind; `base` separates lists. Every other block is skipped, so no two
    /// entries are adjacent and aggregation keeps each one.
    fn entry(self, base: u32, i: u32) -> IpNet {
        match self {
            Kind::V4Host => IpNet::V4(Ipv4Net::new(Ipv4Addr::from((base << 24) + 2 * i), 32).unwrap()),
            Kind::V4Net24 => {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from((base << 24).wrapping_add((2 * i) << 8)), 24).unwrap())
            }
            Kind::V6Net64 => {
                let a = (0x2001_0db8u128 << 96) | (u128::from(base) << 88) | (u128::from(2 * i) << 64);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), 64).unwrap())
            }
        }
    }

    fn entries(self, base: u32, n: u32) -> Vec<IpNet> {
        (0..n).map(|i| self.entry(base, i)).collect()
    }
}

// ---- measuring -------------------------------------------------------------------------------

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a command to completion, stdin from `input`; returns its wall time in ms.
fn timed(program: &str, args: &[&str], input: Option<&Path>) -> Result<f64, String> {
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(p) = input {
        c.stdin(std::fs::File::open(p).map_err(|e| e.to_string())?);
    }
    let t = Instant::now();
    let out = c.output().map_err(|e| format!("{program}: {e}"))?;
    let elapsed = ms(t.elapsed());
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(elapsed)
}

fn sh(program: &str, args: &[&str]) {
    if let Err(e) = timed(program, args, None) {
        panic!("{e}");
    }
}

/// Runs `program` with args through a fresh `__rss` helper process: (wall ms, peak RSS in KiB,
/// exit code).
///
/// Not spawned from here directly: `ru_maxrss` of a child includes the high-water mark of the
/// address space it was forked from (the kernel carries it over at exec), and this process has
/// held a million entries by then. The helper is this binary freshly executed, a few MiB, far
/// below what it measures; it reports its own VmHWM too, printed next to the figures.
fn run_rusage(program: &Path, args: &[&str], log: &Path) -> (f64, i64, i32) {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("__rss")
        .arg(log)
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(
        out.status.success() && v.len() == 4,
        "__rss helper: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    HELPER_HWM_KIB.fetch_max(v[3] as usize, Ordering::Relaxed);
    (v[0], v[1] as i64, v[2] as i32)
}

static HELPER_HWM_KIB: AtomicUsize = AtomicUsize::new(0);

/// The helper side of [`run_rusage`]: `__rss LOG PROGRAM ARGS…`; prints `wall_ms maxrss_kib
/// exit_code own_vmhwm_kib`.
fn child_rss(args: &[String]) -> i32 {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&args[0]).unwrap();
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    let t = Instant::now();
    // Reaped by the wait4 below, which std's Child does not know about.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&args[1])
        .args(&args[2..])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", args[1]));
    let mut status = 0;
    // SAFETY: wait4 on our own child, with out-pointers to live locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    let wall = ms(t.elapsed());
    assert_eq!(rc, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    println!("{wall} {} {code} {own}", ru.ru_maxrss);
    0
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage into a live local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPU time another live thread of this process has used (its `pthread_getcpuclockid`).
fn cpu_of(thread: libc::pthread_t) -> Duration {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `thread` is a live thread of this process (the caller keeps it alive); both
    // out-pointers are live locals.
    unsafe {
        assert_eq!(libc::pthread_getcpuclockid(thread, &mut clock), 0);
        assert_eq!(libc::clock_gettime(clock, &mut ts), 0);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ---- the contenders --------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Nftables,
    Ipset,
}

impl Which {
    fn arg(self) -> &'static str {
        match self {
            Which::Nftables => "nftables",
            Which::Ipset => "ipset",
        }
    }

    fn config(self) -> BackendConfig {
        match self {
            Which::Nftables => BackendConfig::Nftables(NftablesConfig {
                table: "bench_allowsync".into(),
                set_v4: "allow_v4".into(),
                set_v6: "allow_v6".into(),
                enforce: None,
            }),
            Which::Ipset => BackendConfig::Ipset(IpsetConfig {
                set_v4: "bench_as_v4".into(),
                set_v6: "bench_as_v6".into(),
                maxelem: MAXELEM,
                enforce: None,
            }),
        }
    }

    fn backend(self) -> Result<Box<dyn Backend>, BackendError> {
        backend::from_config(&self.config())
    }
}

/// The child side of a load: `__apply BACKEND FILE`, FILE of `+entry` / `-entry` lines. Prints
/// the microseconds `apply` took. Exit 0, 3 when the backend is unavailable, 1 on failure.
fn child_apply(args: &[String]) -> i32 {
    let which = if args[0] == "ipset" { Which::Ipset } else { Which::Nftables };
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let (sign, entry) = line.split_at(1);
        let net = parse_entry(entry).unwrap().net;
        if sign == "+" { add.push(net) } else { remove.push(net) }
    }
    let (add, remove) = (AllowSet::from_nets(add), AllowSet::from_nets(remove));
    let diff = Diff {
        v4: Delta { remove: remove.v4.as_slice().to_vec(), add: add.v4.as_slice().to_vec() },
        v6: Delta { remove: remove.v6.as_slice().to_vec(), add: add.v6.as_slice().to_vec() },
    };
    let mut b = match which.backend() {
        Ok(b) => b,
        Err(e @ BackendError::Unavailable(_)) => {
            eprintln!("{e}");
            return 3;
        }
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Err(e) = b.ensure() {
        eprintln!("ensure: {e}");
        return if matches!(e, BackendError::Unavailable(_)) { 3 } else { 1 };
    }
    let t = Instant::now();
    if let Err(e) = b.apply(&diff) {
        eprintln!("apply: {e}");
        return 1;
    }
    println!("{}", t.elapsed().as_micros());
    0
}

/// One run of the allowsync child: (wall ms, apply ms), or why not.
fn allowsync_apply(which: Which, file: &Path) -> Result<(f64, f64), String> {
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = Command::new(exe)
        .args(["__apply", which.arg(), file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let wall = ms(t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => {
            let us: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
            Ok((wall, us / 1000.0))
        }
        Some(3) => Err(format!("unavailable ({err})")),
        _ => Err(format!("failed ({err})")),
    }
}

fn entry_lines(sign: char, nets: &[IpNet]) -> String {
    let mut s = String::with_capacity(nets.len() * 24);
    for n in nets {
        let _ = writeln!(s, "{sign}{n}");
    }
    s
}

fn nft_elements(nets: &[IpNet]) -> String {
    let mut s = String::with_capacity(nets.len() * 24);
    for (i, n) in nets.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{n}");
    }
    s
}

fn nft_set_type(kind: Kind) -> &'static str {
    if kind.v6() { "ipv6_addr" } else { "ipv4_addr" }
}

fn nft_reset(kind: Kind) {
    let _ = timed("nft", &["delete", "table", "inet", NFT_TABLE], None);
    let script = format!(
        "add table inet {NFT_TABLE}\nadd set inet {NFT_TABLE} s {{ type {}; flags interval; }}\n",
        nft_set_type(kind)
    );
    let f = tmpfile("nft-create", &script);
    sh("nft", &["-f", f.to_str().unwrap()]);
}

fn ipset_name(kind: Kind) -> &'static str {
    if kind.v6() { IPSET_V6 } else { IPSET_V4 }
}

fn ipset_reset(kind: Kind) {
    let name = ipset_name(kind);
    let _ = timed("ipset", &["destroy", name], None);
    let family = if kind.v6() { "inet6" } else { "inet" };
    sh("ipset", &["create", name, "hash:net", "family", family, "maxelem", &MAXELEM.to_string()]);
}

fn ipset_lines(op: &str, kind: Kind, nets: &[IpNet]) -> String {
    let name = ipset_name(kind);
    let mut s = String::with_capacity(nets.len() * 32);
    for n in nets {
        let _ = writeln!(s, "{op} {name} {n}");
    }
    s
}

fn allowsync_reset(which: Which) -> Result<(), String> {
    let mut b = which.backend().map_err(|e| format!("unavailable ({e})"))?;
    b.teardown().map_err(|e| e.to_string())?;
    b.ensure().map_err(|e| e.to_string())
}

fn tmpdir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fn tmpfile(name: &str, text: &str) -> PathBuf {
    let p = tmpdir().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

// ---- results ---------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    table: String,
    targets: Vec<(bool, String)>,
    json: BTreeMap<String, Value>,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.table.push_str(s.as_ref());
        self.table.push('\n');
    }

    fn target(&mut self, ok: bool, what: String) {
        let line = format!("{} {what}", if ok { "PASS" } else { "MISS" });
        println!("{line}");
        self.targets.push((ok, line));
    }

    fn push(&mut self, section: &str, v: Value) {
        match self.json.entry(section.to_string()).or_insert_with(|| Value::Array(Vec::new())) {
            Value::Array(a) => a.push(v),
            _ => unreachable!(),
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v >= 10.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "n/a".into(),
    }
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a / b >= 10.0 => format!("{:.0}x", a / b),
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// Medians of a contender's runs, or the first error.
struct Series {
    wall: Vec<f64>,
    inner: Vec<f64>,
    error: Option<String>,
}

impl Series {
    fn new() -> Self {
        Series { wall: Vec::new(), inner: Vec::new(), error: None }
    }
    fn add(&mut self, r: Result<(f64, f64), String>) {
        match r {
            Ok((w, i)) => {
                self.wall.push(w);
                self.inner.push(i);
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }
    fn ok(&self) -> bool {
        self.error.is_none()
    }
    fn wall(&self) -> Option<f64> {
        (self.ok() && !self.wall.is_empty()).then(|| median(&self.wall))
    }
    fn inner(&self) -> Option<f64> {
        (self.ok() && !self.inner.is_empty()).then(|| median(&self.inner))
    }
}

// ---- the sections ----------------------------------------------------------------------------

fn full_loads(rep: &mut Report, runs: usize, sizes: &[u32]) {
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

fn incremental(rep: &mut Report, runs: usize) {
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
    if let Some(a) = a_ips.wall() {
        rep.target(
            a <= 50.0,
            format!("incremental +-{CHANGE} on {N}, ipset: {} (target <= 50 ms)", fmt_ms(Some(a))),
        );
    } else if let Some(e) = &a_ips.error {
        rep.line(format!("ipset backend: {e}"));
    }
}

/// The mock API, on a runtime of its own (its CPU time is not allowsync's).
struct Api {
    mock: MockHandle,
    _rt: tokio::runtime::Runtime,
}

const NETTYPES: [u8; 7] = [0, 1, 2, 3, 4, 5, 6];

impl Api {
    fn start() -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mock =
            rt.block_on(MockChatApi::start(MockConfig::new(1400000000, "administrator", KEY))).unwrap();
        Api { mock, _rt: rt }
    }

    /// Serves `nets` spread over every nettype (GetIPList answers are capped at 1 MiB each, so
    /// 100k entries need more than one list).
    fn serve(&self, nets: &[IpNet]) {
        for (k, &t) in NETTYPES.iter().enumerate() {
            let list: Vec<String> =
                nets.iter().skip(k).step_by(NETTYPES.len()).map(|n| n.to_string()).collect();
            self.mock.set_list(t, list);
        }
    }

    fn config(&self, dir: &Path) -> PathBuf {
        std::fs::write(dir.join("key"), KEY).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let yaml = format!(
            "interval: 5m
state_file: state.json
sources:
  - name: chat
    tencent_chat:
      endpoint: {url}
      sdkappid: 1400000000
      identifier: administrator
      secret_key_file: key
      nettypes: [0, 1, 2, 3, 4, 5, 6]
      timeout: 30s
backend:
  nftables: {{ table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }}
safety:
  max_removal_percent: 100
  # A cold run loads up to 100k addresses at once: past the widening guard's default.
  max_added_addresses_v4: 4294967296
log:
  format: text
  level: warn
",
            url = self.mock.url()
        );
        let p = dir.join("config.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }
}

fn allowsync_bin() -> PathBuf {
    // `make bench` copies the release daemon (built without the mock) there first.
    let copied = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/allowsync");
    if copied.exists() { copied } else { PathBuf::from(env!("CARGO_BIN_EXE_allowsync")) }
}

/// Runs of `allowsync once`: cold (empty kernel set, no state file) and in sync (nothing to
/// change; a fresh process still dumps the set once). Returns (cold walls, in-sync walls, cold
/// max RSS KiB, in-sync max RSS KiB) as medians-ready vectors.
fn once_runs(api: &Api, n: u32, runs: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
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

fn once_section(rep: &mut Report, api: &Api, runs: usize, rss_runs: usize) {
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

/// Counts what reaches the kernel through the backend.
struct Counting {
    inner: NftablesBackend,
    applies: Arc<AtomicUsize>,
}

impl Backend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn ensure(&mut self) -> Result<(), BackendError> {
        self.inner.ensure()
    }
    fn read(&mut self) -> Result<AllowSet, BackendError> {
        self.inner.read()
    }
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        if !diff.is_empty() {
            self.applies.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.apply(diff)
    }
    fn teardown(&mut self) -> Result<(), BackendError> {
        self.inner.teardown()
    }
    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        self.inner.generation()
    }
}

fn no_change_cycle(rep: &mut Report, api: &Api, runs: usize) {
    const N: u32 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = api.config(dir.path());
    api.serve(&Kind::V4Host.entries(10, N));
    let _ = daemon::backend().teardown();
    let cfg = Config::load(&cfg_path).unwrap();
    let applies = Arc::new(AtomicUsize::new(0));
    let counting = Counting { inner: daemon::backend(), applies: applies.clone() };
    let mut syncer = Syncer::with_backend(cfg, Box::new(counting), true).unwrap();
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

fn aggregation(rep: &mut Report, runs: usize) {
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

fn binary_size(rep: &mut Report) {
    let bin = allowsync_bin();
    let size = std::fs::metadata(&bin).unwrap().len();
    let stripped_path = tmpdir().join("allowsync.stripped");
    sh("strip", &["-o", stripped_path.to_str().unwrap(), bin.to_str().unwrap()]);
    let stripped = std::fs::metadata(&stripped_path).unwrap().len();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    rep.line("\n## Release binary");
    rep.line(format!(
        "| unstripped | stripped |\n|---:|---:|\n| {:.2} MiB | {:.2} MiB |",
        mib(size),
        mib(stripped)
    ));
    rep.push("binary", json!({ "path": bin, "bytes": size, "stripped_bytes": stripped }));
}

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
        std::process::exit(child_apply(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some("__rss") {
        std::process::exit(child_rss(&args[2..]));
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

    // BENCH_ONLY=aggregation,binary,cycle,once,load,incremental: a subset (while profiling).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|o| o == s);
    if want("aggregation") {
        aggregation(&mut rep, runs);
    }
    if want("binary") {
        binary_size(&mut rep);
    }
    let api = Api::start();
    if want("cycle") {
        no_change_cycle(&mut rep, &api, once_runs);
    }
    if want("once") {
        once_section(&mut rep, &api, once_runs, runs);
    }
    if want("load") {
        full_loads(&mut rep, runs, &sizes);
    }
    if want("incremental") {
        incremental(&mut rep, runs);
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
