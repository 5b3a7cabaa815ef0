//! Self-healing between cycles: the real daemon (`interval: 5m`, `enforce`), the mock Chat API
//! and the kernel's nftables, each test in a network namespace of its own.
//!
//! - every kind of wipe another tool does is repaired from memory: no API request (the mock
//!   counts them), the sets and the enforcement chain back, the repair logged with what was
//!   missing and its window;
//! - 200 foreign commits that leave allowsync's objects alone (in another table, or an
//!   operator's chain in allowsync's table) cause no allowsync commit: the generation advances
//!   by exactly the foreign commits;
//! - with a read-only state directory at start, the allowlist is restored from the readable
//!   state file and enforced (real TCP connections through a veth pair), and the failed state
//!   write is logged every cycle.
//!
//! Every wait is for a condition, bounded; nothing asserts how fast a repair is (the bench
//! measures that).

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::Duration;

use allowsync::backend::Backend;
use allowsync::backend::nftables::NftablesBackend;
use allowsync::config::{Enforce, NftablesConfig};
use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{
    Env, Setup, allowsync_bin, backend, setup_with, signal, stop, strings, wait_until,
};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::netns::{self, veth_pair, who_connects};
use allowsync_testkit::set;

const KEY: &str = "repair-test-secret-key";
const PORT: u16 = 8443;
/// The client `10.200.0.2` / `fd00:200::2` is allowlisted; `.3` is a stranger.
const LIST5: &[&str] = &["10.200.0.2", "203.0.113.0/24", "198.51.100.7"];
const LIST6: &[&str] = &["fd00:200::2", "2001:db8:6::/56"];
const WAIT: Duration = Duration::from_secs(20);
const REPAIRED: &str = "repaired allowsync's objects from memory";

fn full_list() -> AllowSet {
    set([LIST5, LIST6].concat())
}

/// The daemon's environment: one poll every 5 minutes (no cycle interferes), enforcing [`PORT`],
/// the state file in `state/` (so that the directory can be made read-only).
fn env(log_level: &'static str) -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let mut s = Setup::new(KEY, lists);
    s.log_level = log_level;
    setup_with(s, |y| {
        *y = y
            .replace("interval: 10s", "interval: 5m")
            .replace("state_file: state.json", "state_file: state/state.json")
            .replace(
                "set_v6: allow_v6 }",
                &format!("set_v6: allow_v6, enforce: {{ tcp_ports: [{PORT}] }} }}"),
            );
    })
}

/// allowsync's objects as the daemon keeps them, read through a backend of the same
/// configuration: nothing missing (table, sets, the chain with exactly its rules) and the sets
/// holding `want`.
fn intact(want: &AllowSet) -> bool {
    let mut b = NftablesBackend::new(&NftablesConfig {
        table: "allowsync".into(),
        set_v4: "allow_v4".into(),
        set_v6: "allow_v6".into(),
        enforce: Some(Enforce { tcp_ports: vec![PORT], ..Enforce::default() }),
    })
    .unwrap();
    b.missing().is_ok_and(|m| m.is_empty()) && b.read().ok().as_ref() == Some(want)
}

/// The environment with the daemon started and its objects in place (`None`: no namespaces).
fn started(log_level: &'static str) -> Option<(Env, Child, AllowSet)> {
    let env = env(log_level)?;
    let want = full_list();
    let d = env.start(&want);
    assert!(wait_until(WAIT, || intact(&want)), "not in place after the first sync:\n{}", env.log());
    Some((env, d, want))
}

fn repairs(env: &Env) -> Vec<String> {
    env.log().lines().filter(|l| l.contains(REPAIRED)).map(String::from).collect()
}

#[test]
fn every_wipe_is_repaired_from_memory_without_an_api_request() {
    let Some((env, d, want)) = started("info") else { return };
    let requests = env.mock.request_count();

    // What each wipe is, and what its repair line must name. A set the enforcement rules use
    // cannot be deleted, nor a chain with rules: the chain is flushed in the same transaction,
    // as a tool would have to.
    let wipes: [(&str, &str, &[&str]); 6] = [
        ("nft flush ruleset", "flush ruleset", &["missing=table inet allowsync"]),
        ("delete table", "delete table inet allowsync", &["missing=table inet allowsync"]),
        (
            "delete set",
            "flush chain inet allowsync enforce\ndelete set inet allowsync allow_v6",
            &["set inet allowsync allow_v6", "the rules of chain inet allowsync enforce", "restored=2"],
        ),
        (
            "delete chain",
            "flush chain inet allowsync enforce\ndelete chain inet allowsync enforce",
            &["missing=chain inet allowsync enforce"],
        ),
        (
            "delete one element",
            "delete element inet allowsync allow_v4 { 203.0.113.0/24 }",
            &["missing=-", "restored=1"],
        ),
        ("flush set", "flush set inet allowsync allow_v4", &["missing=-", "restored=3"]),
    ];
    for (what, script, logged) in wipes {
        let before = repairs(&env).len();
        // (Not asserted here that the wipe took: the repair may be done before a read could
        // see it. The repair's line below says what it found missing.)
        netns::nft_script(script);
        assert!(wait_until(WAIT, || intact(&want)), "{what}: not repaired; log:\n{}", env.log());
        assert!(wait_until(WAIT, || repairs(&env).len() > before), "{what}: no repair line:\n{}", env.log());
        let line = repairs(&env).pop().unwrap();
        for fragment in logged {
            assert!(line.contains(fragment), "{what}: {fragment:?} not in {line}");
        }
        assert!(line.contains("window_ms=") && line.contains("trigger=\"notification\""), "{line}");
        assert_eq!(env.mock.request_count(), requests, "{what}: the repair asked the API");
    }
    stop(d);
}

#[test]
fn foreign_commits_that_leave_allowsync_alone_cause_no_allowsync_commit() {
    let Some((env, d, want)) = started("debug") else { return };
    // fail2ban's kind of table, in one commit of its own before counting.
    netns::nft_script("table inet churn {\n  set s { type ipv4_addr; }\n}\n");
    let generation = || backend().generation().unwrap().unwrap();
    let before = generation();
    const FOREIGN: u64 = 200;
    for i in 0..FOREIGN {
        let a = format!("{{ 10.9.0.{} }}", i / 2);
        match i % 8 {
            // An operator's own chain in allowsync's table: a change in the table that leaves
            // allowsync's objects intact (each one makes the daemon look, never write).
            6 => netns::run("nft", &["add", "chain", "inet", "allowsync", "operator"]),
            7 => netns::run("nft", &["delete", "chain", "inet", "allowsync", "operator"]),
            n if n % 2 == 0 => netns::run("nft", &["add", "element", "inet", "churn", "s", &a]),
            _ => netns::run("nft", &["delete", "element", "inet", "churn", "s", &a]),
        };
    }
    assert_eq!(generation(), before + FOREIGN, "each foreign command is one commit");

    // A real wipe last: once it is repaired, every notification before it has been read too.
    netns::run("nft", &["delete", "element", "inet", "allowsync", "allow_v4", "{ 198.51.100.7 }"]);
    assert!(wait_until(WAIT, || intact(&want)), "not repaired:\n{}", env.log());
    assert!(wait_until(WAIT, || repairs(&env).len() == 1), "{}", env.log());
    // The wipe and its repair: allowsync committed nothing else.
    assert_eq!(generation(), before + FOREIGN + 2, "{}", env.log());
    assert_eq!(repairs(&env).len(), 1, "one repair, for the one wipe:\n{}", env.log());
    // Its own repair's notification was recognised as its own.
    assert!(env.log().contains("our own commit"), "{}", env.log());
    stop(d);
}

const STATE_WRITE_FAILED: &str = "cannot write the state file";

#[test]
fn a_read_only_state_directory_at_start_still_restores_and_enforces() {
    let Some(env) = env("info") else { return };
    let client = veth_pair();
    let _l4 = TcpListener::bind(("10.200.0.1", PORT)).unwrap();
    let _l6 = TcpListener::bind(("fd00:200::1", PORT)).unwrap();
    // A first run leaves the state file (and its lock file); then the firewall goes (a
    // reboot, a `flush ruleset`) and the API is unreachable.
    let o = env.once(WAIT);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    netns::run("nft", &["flush", "ruleset"]);
    assert_eq!(who_connects(&client, PORT), [true; 4], "nothing enforced before the daemon");
    env.mock.inject(Fault::Status(502));

    // The daemon in a mount namespace where the state directory is read-only.
    let state_dir = env.dir.path().join("state");
    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" run"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(&state_dir)
        .arg(allowsync_bin())
        .arg(&env.cfg);
    let mut d = env.spawn_command(cmd);
    if env.log().starts_with("unshare:") || env.log().starts_with("mount:") {
        let _ = d.wait();
        assert!(std::env::var_os("CI").is_none(), "must run in CI: {}", env.log());
        eprintln!("skipping: needs root for a mount namespace ({})", env.log());
        return;
    }
    let want = full_list();
    assert!(wait_until(WAIT, || intact(&want)), "not restored:\n{}", env.log());
    assert_eq!(who_connects(&client, PORT), [true, false, true, false], "{}", env.log());
    let log = env.log();
    assert!(log.contains("restored the last good allowlist from the state file"), "{log}");
    assert!(log.contains("holding the lock through a read-only descriptor"), "{log}");

    // Every cycle tries the state file again, and says so.
    assert!(wait_until(WAIT, || env.log().matches(STATE_WRITE_FAILED).count() >= 1), "{}", env.log());
    let n = env.log().matches(STATE_WRITE_FAILED).count();
    signal(&d, libc::SIGUSR1);
    assert!(wait_until(WAIT, || env.log().matches(STATE_WRITE_FAILED).count() > n), "{}", env.log());
    assert!(env.log().contains("Read-only file system"), "{}", env.log());
    assert_eq!(who_connects(&client, PORT), [true, false, true, false]);
    stop(d);
}

/// The ipset backend sends no notifications: its check every `check_interval` finds a flushed
/// set and a lost iptables jump (mangle PREROUTING's, `scope: host`), and repairs them the same
/// way.
#[test]
fn the_ipset_backend_check_repairs_a_flushed_set_and_a_lost_jump() {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let Some(env) = setup_with(Setup::new(KEY, lists), |y| {
        let ipset = format!(
            "ipset: {{ set_v4: as_v4, set_v6: as_v6, enforce: {{ tcp_ports: [{PORT}] }}, check_interval: 200ms }}"
        );
        *y = y
            .replace("interval: 10s", "interval: 5m")
            .replace("nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }", &ipset);
    }) else {
        return;
    };
    let ipset_entries = |set: &str| -> usize {
        netns::run("ipset", &["list", "-o", "save", set]).lines().filter(|l| l.starts_with("add ")).count()
    };
    let jumps = || {
        let s = netns::run("iptables", &["-t", "mangle", "-S", "PREROUTING"]);
        s.lines().filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j ALLOWSYNC")).count()
    };
    let d = env.spawn();
    assert!(wait_until(WAIT, || env.syncs() > 0 && ipset_entries("as_v4") == LIST5.len()), "{}", env.log());
    assert_eq!(jumps(), 1);
    let requests = env.mock.request_count();

    netns::run("ipset", &["flush", "as_v4"]);
    assert!(wait_until(WAIT, || ipset_entries("as_v4") == LIST5.len()), "not repaired:\n{}", env.log());
    assert!(wait_until(WAIT, || repairs(&env).len() == 1), "{}", env.log());
    let line = repairs(&env).pop().unwrap();
    assert!(line.contains("trigger=\"periodic check\"") && line.contains("restored=3"), "{line}");

    netns::run("iptables", &["-t", "mangle", "-F", "PREROUTING"]);
    assert!(wait_until(WAIT, || jumps() == 1), "the jump was not put back:\n{}", env.log());
    assert!(wait_until(WAIT, || repairs(&env).len() == 2), "{}", env.log());
    assert!(
        repairs(&env)[1].contains("PREROUTING's jump to iptables chain mangle ALLOWSYNC"),
        "{}",
        env.log()
    );
    assert_eq!(env.mock.request_count(), requests, "a repair asked the API");
    stop(d);
}

/// A tool that keeps deleting the table is repaired at most 5 times per second; whatever the
/// storm, the table is back at its end.
#[test]
fn repairs_are_rate_limited_against_a_tool_that_keeps_deleting() {
    let Some((env, d, want)) = started("info") else { return };
    let before = repairs(&env).len();
    let t = std::time::Instant::now();
    for _ in 0..100 {
        // Fails while the table is gone (not repaired yet): that is the point.
        let _ = Command::new("nft").args(["delete", "table", "inet", "allowsync"]).output();
    }
    let took = t.elapsed();
    assert!(wait_until(WAIT, || intact(&want)), "not repaired after the storm:\n{}", env.log());
    // A repair is logged once it has committed: the first one's line is there by now, or soon.
    assert!(wait_until(WAIT, || repairs(&env).len() > before), "{}", env.log());
    let n = repairs(&env).len() - before;
    let bound = 5 * (took.as_secs() as usize + 2);
    assert!(n >= 1 && n <= bound, "{n} repairs for a storm of {took:?} (at most {bound})");
    stop(d);
}

/// `state.json` replaced by a directory: the daemon cannot read or write its state, and still
/// creates its objects, syncs from the API and enforces; the error is logged every cycle.
#[test]
fn a_directory_in_place_of_the_state_file_does_not_keep_the_firewall_out() {
    let Some(env) = env("info") else { return };
    std::fs::create_dir_all(env.dir.path().join("state/state.json")).unwrap();
    let want = full_list();
    let d = env.spawn();
    assert!(wait_until(WAIT, || intact(&want)), "{}", env.log());
    assert!(env.log().contains("cannot read the state file"), "{}", env.log());
    assert!(wait_until(WAIT, || env.log().matches(STATE_WRITE_FAILED).count() >= 1), "{}", env.log());
    let n = env.log().matches(STATE_WRITE_FAILED).count();
    signal(&d, libc::SIGUSR1);
    assert!(wait_until(WAIT, || env.log().matches(STATE_WRITE_FAILED).count() > n), "{}", env.log());
    stop(d);
}
