//! Running a test inside a fresh network namespace of its own, so that tests can change
//! nftables rulesets, links and addresses without touching the host's (or each other's), and
//! the commands they use to set up and inspect it.
//!
//! Network namespaces belong to a thread, not a process: `unshare(CLONE_NEWNET)` moves only the
//! calling thread, and processes it spawns afterwards (`nft`, `ip`) start in the new namespace.
//! Every cargo test runs on a thread of its own, so each test gets a private namespace. The
//! guard moves the thread back to where it was when dropped; the namespace disappears with its
//! last user.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

/// Keeps the current thread in its private network namespace until dropped.
pub struct NetnsGuard {
    original: File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: setns(2) on a descriptor we own; the result is checked.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !std::thread::panicking() {
            panic!("cannot return to the original network namespace: {}", std::io::Error::last_os_error());
        }
    }
}

/// Moves the current thread into a new, empty network namespace with `lo` up.
///
/// Without the privilege to do so: panics when `CI` is set (tests must run there), otherwise
/// prints why and returns `None` so the test can return early.
pub fn enter_new_netns() -> Option<NetnsGuard> {
    let original = match File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => return unavailable(&format!("cannot open /proc/thread-self/ns/net: {e}")),
    };
    // SAFETY: unshare(2) only changes the calling thread's namespaces; the result is checked.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return unavailable(&format!("unshare(CLONE_NEWNET): {e}"));
    }
    let guard = NetnsGuard { original };
    run("ip", &["link", "set", "lo", "up"]);
    Some(guard)
}

fn unavailable(why: &str) -> Option<NetnsGuard> {
    if std::env::var_os("CI").is_some() {
        panic!("network namespace tests must run in CI: {why}");
    }
    eprintln!("skipping: needs root/CAP_SYS_ADMIN for a private network namespace ({why})");
    None
}

/// The identity of the current thread's network namespace (`net:[inode]`).
pub fn current_netns_id() -> String {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap().to_string_lossy().into_owned()
}

/// Runs a command (in the current thread's namespace) and returns its stdout; panics with its
/// stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `nft -f -` with `script` on stdin.
pub fn nft_script(script: &str) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nft -f: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// A named network namespace (`ip netns add`), deleted when dropped: the far end of a veth
/// pair for tests that need a second host.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(prefix: &str) -> Self {
        let name = format!("{prefix}-{}-{:?}", std::process::id(), std::thread::current().id())
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        NamedNetns { name }
    }

    /// Runs `f` on a new thread that has joined this namespace.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: setns(2) on a descriptor we own, moving only this new thread.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

/// Runs `program args` with `input` on stdin; panics with its stderr when it fails.
pub fn run_stdin(program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The elements of an nftables set as `nft -j list set` shows them, as inclusive address ranges,
/// sorted: what the kernel holds, read by another program than allowsync.
pub fn nft_set_elements(family: &str, table: &str, set: &str) -> Vec<(std::net::IpAddr, std::net::IpAddr)> {
    use std::net::IpAddr;
    let out = run("nft", &["-j", "list", "set", family, table, set]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges = Vec::new();
    for item in json["nftables"].as_array().unwrap() {
        let Some(elems) = item.get("set").and_then(|s| s.get("elem")) else { continue };
        for e in elems.as_array().unwrap() {
            let ip = |v: &serde_json::Value| v.as_str().unwrap().parse::<IpAddr>().unwrap();
            let range = if e.is_string() {
                (ip(e), ip(e))
            } else if let Some(p) = e.get("prefix") {
                let net = ipnet::IpNet::new(ip(&p["addr"]), p["len"].as_u64().unwrap() as u8).unwrap();
                (net.network(), net.broadcast())
            } else if let Some(r) = e.get("range") {
                (ip(&r[0]), ip(&r[1]))
            } else {
                panic!("unexpected element form {e}");
            };
            ranges.push(range);
        }
    }
    ranges.sort();
    ranges
}

/// `nft monitor` in the current thread's namespace: every committed change, and one
/// `# new generation N by process P (name)` line per transaction.
pub struct NftMonitor {
    child: std::process::Child,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NftMonitor {
    /// Starts it and waits (bounded) until it reports a probe commit of its own: from then on it
    /// sees every commit.
    pub fn start() -> NftMonitor {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("monitor.txt");
        let child = Command::new("nft")
            .arg("monitor")
            .stdout(File::create(&out).unwrap())
            .spawn()
            .expect("nft monitor");
        let m = NftMonitor { child, out, _dir: dir };
        let probe = "table inet nft_monitor_probe";
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let _ = Command::new("nft").args(["add", "table", "inet", "nft_monitor_probe"]).status();
            let _ = Command::new("nft").args(["delete", "table", "inet", "nft_monitor_probe"]).status();
            if m.text().contains(&format!("delete {probe}")) {
                return m;
            }
            assert!(std::time::Instant::now() < end, "nft monitor reported nothing within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Commits a probe and waits (bounded) until the monitor reports it: everything committed
    /// before has been reported too.
    pub fn barrier(&self) {
        let seen = |m: &NftMonitor| m.text().matches("delete table inet nft_monitor_probe").count();
        let before = seen(self);
        let _ = Command::new("nft").args(["add", "table", "inet", "nft_monitor_probe"]).status();
        let _ = Command::new("nft").args(["delete", "table", "inet", "nft_monitor_probe"]).status();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while seen(self) == before {
            assert!(std::time::Instant::now() < end, "nft monitor did not report the probe within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The events of each transaction since the start, probe excluded: the lines before each
    /// `# new generation` line.
    pub fn transactions(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut current = Vec::new();
        for line in self.text().lines() {
            if line.starts_with("# new generation") {
                if !current.is_empty() && !current.iter().any(|l: &String| l.contains("nft_monitor_probe")) {
                    out.push(std::mem::take(&mut current));
                }
                current.clear();
            } else if !line.trim().is_empty() {
                current.push(line.to_string());
            }
        }
        out
    }
}

impl Drop for NftMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- two hosts: this namespace and a client one, joined by a veth pair ----------------------

/// Whether a TCP connection from `from` (an address of `ns`) to `to` completes within 700 ms.
pub fn tcp_connects(ns: &NamedNetns, from: IpAddr, to: SocketAddr) -> bool {
    ns.run_in(move || crate::traffic::connect(from, to, Duration::from_millis(700)).is_ok())
}

/// Who can connect to `port` of the server addresses of a [`veth_pair`] from its client
/// namespace, as (allowlisted `10.200.0.2`, stranger `.3`, allowlisted `fd00:200::2`, stranger
/// `::3`): what the tests' allowlists hold and leave out.
pub fn who_connects(client: &NamedNetns, port: u16) -> [bool; 4] {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let v4 = SocketAddr::new(ip("10.200.0.1"), port);
    let v6 = SocketAddr::new(ip("fd00:200::1"), port);
    [
        tcp_connects(client, ip("10.200.0.2"), v4),
        tcp_connects(client, ip("10.200.0.3"), v4),
        tcp_connects(client, ip("fd00:200::2"), v6),
        tcp_connects(client, ip("fd00:200::3"), v6),
    ]
}

/// A client namespace `as-cli` joined to this one by a veth pair: server `10.200.0.1` and
/// `fd00:200::1` here, clients `.2` and `.3` of both families there.
pub fn veth_pair() -> NamedNetns {
    veth_to(
        "as-cli",
        VethEnd { dev: "as-srv", mac: "02:00:00:00:02:01", addrs: &["10.200.0.1/24", "fd00:200::1/64"] },
        VethEnd {
            dev: "as-cli",
            mac: "02:00:00:00:02:02",
            addrs: &["10.200.0.2/24", "10.200.0.3/24", "fd00:200::2/64", "fd00:200::3/64"],
        },
    )
}

/// One end of a veth pair: interface name, MAC address, addresses (`address/prefix length`).
pub struct VethEnd<'a> {
    pub dev: &'a str,
    pub mac: &'a str,
    pub addrs: &'a [&'a str],
}

/// A new namespace (named after `prefix`) joined to this one by a veth pair, `here` in this
/// namespace and `there` in the new one, both up, with every address of each end as a static
/// neighbour on the other: IPv6 neighbour discovery for a new source address can take a 1 s
/// retransmission while the link-local addresses are still tentative, longer than the
/// connect timeouts; the tests are about the firewall, not about ND. IPv6 addresses skip DAD.
pub fn veth_to(prefix: &str, here: VethEnd<'_>, there: VethEnd<'_>) -> NamedNetns {
    let ns = NamedNetns::new(prefix);
    let link = ["link", "add", here.dev, "address", here.mac, "type", "veth", "peer", "name", there.dev];
    run("ip", &[&link[..], &["address", there.mac, "netns", &ns.name]].concat());
    // `ip` in this namespace, or with `-n <new namespace>`.
    let ip = |in_ns: bool, args: &[&str]| {
        let prefix: &[&str] = if in_ns { &["-n", &ns.name] } else { &[] };
        run("ip", &[prefix, args].concat());
    };
    for (in_ns, end, peer) in [(false, &here, &there), (true, &there, &here)] {
        for a in end.addrs {
            let nodad: &[&str] = if a.contains(':') { &["nodad"] } else { &[] };
            ip(in_ns, &[&["addr", "add", a, "dev", end.dev][..], nodad].concat());
        }
        ip(in_ns, &["link", "set", end.dev, "up"]);
        for a in peer.addrs {
            let addr = a.split('/').next().unwrap();
            ip(in_ns, &["neigh", "replace", addr, "lladdr", peer.mac, "dev", end.dev, "nud", "permanent"]);
        }
    }
    ns
}
