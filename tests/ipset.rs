//! The ipset backend against the real kernel: what is particular to ipset (the `/0` split,
//! `maxelem` growth, the iptables enforcement chain, teardown order). What every backend must do
//! is in `conformance.rs`. Each test runs in a network namespace of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use allowsync::backend::ipset::{ENFORCE_CHAIN, IpsetBackend, enforce_rules, hook_of};
use allowsync::backend::{Backend, BackendError};
use allowsync::config::{Enforce, EnforceScope, IpsetConfig};
use allowsync::prefixes::{AllowSet, Range, Ranges};
use allowsync_testkit::daemon::{Setup, setup_with, strings};
use allowsync_testkit::netns::{enter_new_netns, run};
use allowsync_testkit::{set, sync};

const SET_V4: &str = "allowsync_v4";
const SET_V6: &str = "allowsync_v6";

fn backend(maxelem: u32, enforce: Option<Enforce>) -> IpsetBackend {
    IpsetBackend::new(&IpsetConfig {
        set_v4: SET_V4.into(),
        set_v6: SET_V6.into(),
        maxelem,
        enforce,
        check_interval: Duration::from_secs(10),
    })
    .unwrap()
}

fn entries(set: &str) -> Vec<String> {
    let mut v: Vec<String> = run("ipset", &["list", "-o", "save", set])
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("add {set} ")).map(String::from))
        .collect();
    v.sort();
    v
}

fn maxelem(set: &str) -> u32 {
    let header = run("ipset", &["list", "-t", "-o", "save", set]);
    let mut t = header.split_whitespace().skip_while(|w| *w != "maxelem");
    t.nth(1).unwrap().parse().unwrap()
}

/// Runs `f` with this thread's tracing output captured, and returns that output.
fn logs_of(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn the_whole_space_is_stored_as_two_halves_and_read_back_whole() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(65536, None);
    b.ensure().unwrap();
    let all = set(["0.0.0.0/0", "::/0"]);
    sync(&mut b, &all);
    assert_eq!(entries(SET_V4), ["0.0.0.0/1", "128.0.0.0/1"]);
    assert_eq!(entries(SET_V6), ["8000::/1", "::/1"]);
    assert_eq!(b.read().unwrap(), all);

    // Narrowing to a part: the halves go, the part comes, and nothing in between is lost.
    let part = set(["10.0.0.0/8", "0.0.0.0/32", "255.255.255.255", "2001:db8::/32"]);
    sync(&mut b, &part);
    assert_eq!(entries(SET_V4), ["0.0.0.0", "10.0.0.0/8", "255.255.255.255"]);
    assert_eq!(b.read().unwrap(), part);

    // A range that is not one prefix is stored as its minimal prefixes.
    let odd = AllowSet {
        v4: Ranges::from_disjoint(vec![Range { start: 1, end: 6 }]).unwrap(),
        v6: Ranges::default(),
    };
    sync(&mut b, &odd);
    assert_eq!(entries(SET_V4), ["0.0.0.1", "0.0.0.2/31", "0.0.0.4/31", "0.0.0.6"]);
    assert_eq!(b.read().unwrap(), odd);
}

#[test]
fn a_set_too_small_is_grown_by_swap_with_a_warning() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(1024, None);
    b.ensure().unwrap();
    assert_eq!(maxelem(SET_V4), 1024);
    let small = set(["192.0.2.0/24"]);
    sync(&mut b, &small);

    let hosts: Vec<Range<u32>> = (0..2000u32).map(|i| Range::from_prefix(0x0a00_0000 + 2 * i, 32)).collect();
    let big = AllowSet { v4: Ranges::from_disjoint(hosts).unwrap(), v6: small.v6.clone() };
    let logs = logs_of(|| {
        sync(&mut b, &big);
    });
    assert!(logs.contains("WARN") && logs.contains("maxelem"), "no warning in:\n{logs}");
    assert_eq!(maxelem(SET_V4), 4096, "2000 entries and a quarter of room, rounded up");
    assert_eq!(maxelem(SET_V6), 1024, "the other family is untouched");
    assert_eq!(b.read().unwrap(), big);
    assert_eq!(entries(SET_V4).len(), 2000);
    // No temporary set is left behind.
    assert_eq!(run("ipset", &["list", "-n"]).lines().count(), 2);

    // A grown set keeps its size while the list still needs it: no rebuild, no warning.
    let logs = logs_of(|| {
        b.ensure().unwrap();
        sync(&mut b, &small);
    });
    assert!(!logs.contains("WARN"), "{logs}");

    // Once it fits the configured maxelem again with room to spare, ensure shrinks it back;
    // raising maxelem in the configuration rebuilds it larger. Contents survive both.
    b.ensure().unwrap();
    assert_eq!(maxelem(SET_V4), 1024);
    // A new backend (a restart) knows the sets are allowsync's from the state file's record.
    let mut raised = backend(8192, None);
    raised.set_recorded(&b.footprint().unwrap());
    raised.ensure().unwrap();
    assert_eq!((maxelem(SET_V4), maxelem(SET_V6)), (8192, 8192));
    assert_eq!(raised.read().unwrap(), small);
}

/// The lines of `prog -t <table> -S` that mention the enforcement chain.
fn rules(prog: &str, table: &str) -> Vec<String> {
    run(prog, &["-t", table, "-S"]).lines().filter(|l| l.contains(ENFORCE_CHAIN)).map(String::from).collect()
}

#[test]
fn enforcement_chain_is_idempotent_and_teardown_goes_in_order() {
    let Some(_ns) = enter_new_netns() else { return };
    let enforce = Enforce { tcp_ports: vec![443, 8443], udp_ports: vec![53], ..Enforce::default() };
    let mut b = backend(65536, Some(enforce.clone()));
    for _ in 0..3 {
        b.ensure().unwrap();
        b.enforce().unwrap();
    }
    sync(&mut b, &set(["192.0.2.0/24", "2001:db8::/32"]));
    let (table, parent) = hook_of(EnforceScope::Host);
    assert_eq!((table, parent), ("mangle", "PREROUTING"));
    for (prog, set) in [("iptables", SET_V4), ("ip6tables", SET_V6)] {
        let jump = format!("-A {parent} -m comment --comment \"managed by allowsync\" -j {ENFORCE_CHAIN}");
        let mut want = vec![format!("-N {ENFORCE_CHAIN}"), jump.clone()];
        want.extend(enforce_rules(set, &enforce).iter().map(|r| format!("-A {ENFORCE_CHAIN} {r}")));
        let mut got = rules(prog, table);
        got.sort();
        want.sort();
        assert_eq!(got, want, "{prog}");
        // The jump comes first in PREROUTING, loopback first in the chain.
        let prerouting = run(prog, &["-t", table, "-S", parent]);
        assert_eq!(prerouting.lines().nth(1), Some(&*jump), "{prerouting}");
        let chain = run(prog, &["-t", table, "-S", ENFORCE_CHAIN]);
        let lo = format!("-A {ENFORCE_CHAIN} -i lo -m comment --comment \"managed by allowsync\" -j RETURN");
        assert_eq!(chain.lines().nth(1), Some(&*lo), "{chain}");
        assert!(rules(prog, "filter").is_empty(), "{prog}: nothing in filter");
    }

    // Other ports: the chain is refilled, not appended to.
    let mut other = backend(65536, Some(Enforce { tcp_ports: vec![22], ..Enforce::default() }));
    other.ensure().unwrap();
    other.enforce().unwrap();
    assert_eq!(rules("iptables", table).len(), 4, "{:?}", rules("iptables", table));

    // A set in use by a rule cannot be destroyed: teardown removes the rules first.
    assert!(run("ipset", &["list", "-t", SET_V4]).contains("References: 1"));
    b.teardown().unwrap();
    assert!(rules("iptables", table).is_empty() && rules("ip6tables", table).is_empty());
    assert_eq!(run("ipset", &["list", "-n"]), "");
    b.teardown().unwrap(); // nothing left: fine

    // Without enforce, enforce() removes an enforcement chain left from before, in either table.
    for scope in [EnforceScope::Host, EnforceScope::Local] {
        let mut other = backend(65536, Some(Enforce { tcp_ports: vec![22], scope, ..Enforce::default() }));
        other.ensure().unwrap();
        other.enforce().unwrap();
        assert!(!rules("iptables", hook_of(scope).0).is_empty());
        backend(65536, None).enforce().unwrap();
        for t in ["mangle", "filter"] {
            assert!(rules("iptables", t).is_empty() && rules("ip6tables", t).is_empty(), "{t}");
        }
    }
}

/// allowsync's chain of the other scope (filter INPUT, `scope: local`) is moved to mangle
/// PREROUTING by the next enforce(), in both families; the new one is in place before the old
/// one goes. An earlier version's chain there (no mark) is not allowsync's: it stays.
#[test]
fn allowsyncs_input_chain_is_moved_to_prerouting_and_an_unmarked_one_stays() {
    let Some(_ns) = enter_new_netns() else { return };
    let host = Enforce { tcp_ports: vec![443], ..Enforce::default() };
    let local = Enforce { scope: EnforceScope::Local, ..host.clone() };
    let mut old = backend(65536, Some(local.clone()));
    old.ensure().unwrap();
    old.enforce().unwrap();
    let jump = |parent: &str| {
        format!("-A {parent} -m comment --comment \"managed by allowsync\" -j {ENFORCE_CHAIN}")
    };
    assert!(rules("iptables", "filter").contains(&jump("INPUT")));
    let mut b = backend(65536, Some(host.clone()));
    b.set_recorded(&old.footprint().unwrap());
    b.enforce().unwrap();
    for prog in ["iptables", "ip6tables"] {
        assert!(rules(prog, "filter").is_empty(), "{prog}: {:?}", rules(prog, "filter"));
        let moved = rules(prog, "mangle");
        assert!(moved.contains(&jump("PREROUTING")), "{prog}: {moved:?}");
        assert!(
            moved.iter().any(|r| r.contains("--dport 443 -m addrtype --dst-type LOCAL")),
            "{prog}: {moved:?}"
        );
    }
    // `scope: local` brings the filter INPUT chain back, and takes the mangle one away.
    backend(65536, Some(local)).enforce().unwrap();
    assert!(rules("iptables", "mangle").is_empty());
    assert!(rules("iptables", "filter").contains(&jump("INPUT")));

    // What an earlier version wrote, unmarked, in filter INPUT: left as it is.
    b.teardown().unwrap();
    let mut b = backend(65536, Some(host));
    b.ensure().unwrap();
    for (prog, set) in [("iptables", SET_V4), ("ip6tables", SET_V6)] {
        run(prog, &["-N", ENFORCE_CHAIN]);
        run(prog, &["-A", ENFORCE_CHAIN, "-i", "lo", "-j", "RETURN"]);
        let drop =
            format!("-A {ENFORCE_CHAIN} -p tcp -m tcp --dport 443 -m set ! --match-set {set} src -j DROP");
        run(prog, &drop.split_whitespace().collect::<Vec<_>>());
        run(prog, &["-I", "INPUT", "1", "-j", ENFORCE_CHAIN]);
    }
    let legacy = rules("iptables", "filter");
    b.enforce().unwrap();
    assert_eq!(rules("iptables", "filter"), legacy, "not allowsync's: untouched");
    assert!(rules("iptables", "mangle").contains(&jump("PREROUTING")));
}

#[test]
fn a_foreign_chain_is_reported_and_left_alone() {
    let Some(_ns) = enter_new_netns() else { return };
    // Where `scope: host` needs the name (mangle), and where `local` does (filter).
    for table in ["mangle", "filter"] {
        run("iptables", &["-t", table, "-N", ENFORCE_CHAIN]);
        run("iptables", &["-t", table, "-A", ENFORCE_CHAIN, "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);
    }
    let save = || {
        run("iptables-save", &[])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let before = save();
    for (scope, table) in [(EnforceScope::Host, "mangle"), (EnforceScope::Local, "filter")] {
        let mut b = backend(65536, Some(Enforce { tcp_ports: vec![443], scope, ..Enforce::default() }));
        b.ensure().unwrap();
        let err = b.enforce().unwrap_err();
        let want = format!("iptables chain {table} ALLOWSYNC");
        assert!(matches!(&err, BackendError::Foreign { object, .. } if object.contains(&want)), "{err}");
    }
    // Without enforce they are not removed either, and teardown leaves them.
    let mut plain = backend(65536, None);
    plain.ensure().unwrap();
    plain.enforce().unwrap();
    plain.teardown().unwrap();
    assert_eq!(save(), before);
}

/// The binary with the ipset backend (`enforce` on TCP 443) and a Chat source whose answer is
/// `203.0.113.0/24` and `2001:db8:6::/48`.
fn enforcing_env(key: &str) -> Option<allowsync_testkit::daemon::Env> {
    let lists = [(5, strings(&["203.0.113.0/24"])), (6, strings(&["2001:db8:6::/48"]))].into();
    setup_with(Setup::new(key, lists), |yaml| {
        let ipset =
            format!("ipset: {{ set_v4: {SET_V4}, set_v6: {SET_V6}, enforce: {{ tcp_ports: [443] }} }}");
        *yaml = yaml.replace("nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }", &ipset);
    })
}

/// The rules come after the sets: a rule iptables refuses (a foreign chain of that name here;
/// under systemd, a missing CAP_NET_RAW) fails the cycle, but the sets are filled all the same,
/// and the next cycle installs the rules once it can.
#[test]
fn a_rule_failure_never_keeps_the_sets_empty() {
    let Some(env) = enforcing_env("ipset-rule-failure-test-key") else { return };
    run("iptables", &["-t", "mangle", "-N", ENFORCE_CHAIN]);
    run("iptables", &["-t", "mangle", "-A", ENFORCE_CHAIN, "-j", "ACCEPT"]);
    let o = env.once(Duration::from_secs(20));
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("iptables chain mangle ALLOWSYNC holds rules allowsync did not write (-j ACCEPT)"),
        "{}",
        o.stderr
    );
    assert_eq!(entries(SET_V4), ["203.0.113.0/24"]);
    assert_eq!(entries(SET_V6), ["2001:db8:6::/48"]);

    run("iptables", &["-t", "mangle", "-F", ENFORCE_CHAIN]);
    run("iptables", &["-t", "mangle", "-X", ENFORCE_CHAIN]);
    let o = env.once(Duration::from_secs(20));
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let drop =
        format!("-m set ! --match-set {SET_V4} src -m comment --comment \"managed by allowsync\" -j DROP");
    assert!(
        rules("iptables", "mangle").iter().any(|r| r.ends_with(&drop)),
        "{:?}",
        rules("iptables", "mangle")
    );
}

#[test]
fn a_missing_set_is_missing_and_ensure_recreates_it() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(65536, None);
    assert!(b.read().unwrap_err().is_missing());
    b.ensure().unwrap();
    sync(&mut b, &set(["192.0.2.1"]));
    run("ipset", &["destroy", SET_V6]);
    let err = b.read().unwrap_err();
    assert!(err.is_missing(), "{err}");
    assert!(err.to_string().starts_with(&format!("ipset {SET_V6} does not exist")), "{err}");
    b.ensure().unwrap();
    assert_eq!(b.read().unwrap(), set(["192.0.2.1"]));
}

/// The state file is the ipsets' record of ownership: what `once` created is recorded there,
/// `teardown` destroys exactly that (and the marked chain), says so, and forgets it; an ipset
/// of the same name created by hand afterwards is not allowsync's.
#[test]
fn the_state_file_records_the_ipsets_allowsync_created_and_teardown_destroys_only_those() {
    let Some(env) = enforcing_env("ipset-ownership-test-key") else { return };
    let t = Duration::from_secs(20);
    let o = env.once(t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let owned: Vec<String> = env.parsed_state().objects.owned.iter().map(ToString::to_string).collect();
    assert_eq!(
        owned,
        [
            "ipset allowsync_v4",
            "ipset allowsync_v6",
            "iptables chain mangle ALLOWSYNC",
            "ip6tables chain mangle ALLOWSYNC"
        ]
    );
    let o = env.command(&["teardown"], t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    for line in [
        "removed iptables chain mangle ALLOWSYNC",
        "removed ipset allowsync_v4",
        "removed ipset allowsync_v6",
    ] {
        assert!(o.stdout.contains(line), "{line:?} in\n{}", o.stdout);
    }
    assert_eq!(run("ipset", &["list", "-n"]), "");
    assert!(env.parsed_state().objects.owned.is_empty(), "forgotten once destroyed");

    // Created by hand now: the operator's. Filled, then emptied, never destroyed.
    run("ipset", &["create", SET_V4, "hash:net", "family", "inet", "maxelem", "2048"]);
    run("ipset", &["create", SET_V6, "hash:net", "family", "inet6", "maxelem", "2048"]);
    let o = env.once(t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert_eq!(entries(SET_V4), ["203.0.113.0/24"], "filled");
    assert_eq!(maxelem(SET_V4), 2048, "its size is not");
    let o = env.command(&["teardown"], t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("emptied ipset allowsync_v4"), "{}", o.stdout);
    assert!(o.stdout.contains("left ipset allowsync_v4: allowsync did not create it"), "{}", o.stdout);
    assert_eq!(run("ipset", &["list", "-n"]).lines().count(), 2);
    assert!(entries(SET_V4).is_empty());
}

/// The daemon's client `10.200.0.2` / `fd00:200::2` is allowlisted, `.3` is a stranger.
const PORT: u16 = 8443;
const LIST5: &[&str] = &["10.200.0.2", "203.0.113.0/24"];
const LIST6: &[&str] = &["fd00:200::2", "2001:db8:6::/56"];

/// The ipset backend with `enforce` on [`PORT`], checked every 200 ms, one poll every 5 minutes
/// (a cycle comes when SIGUSR1 asks for it).
fn daemon_env(key: &str) -> Option<allowsync_testkit::daemon::Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    setup_with(Setup::new(key, lists), |yaml| {
        let ipset = format!(
            "ipset: {{ set_v4: {SET_V4}, set_v6: {SET_V6}, enforce: {{ tcp_ports: [{PORT}] }}, check_interval: 200ms }}"
        );
        *yaml = yaml
            .replace("interval: 10s", "interval: 5m")
            .replace("nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }", &ipset);
    })
}

/// Hides every `ipset` program (a bind mount of `/dev/null` over each, in a private mount
/// namespace), checks that none runs, then execs `allowsync -c CFG ARGS…`.
const WITHOUT_IPSET: &str = r#"
cfg="$1"; bin="$2"; shift 2
for d in /usr/sbin /sbin /usr/bin /bin /usr/local/sbin /usr/local/bin $(echo "$PATH" | tr : ' '); do
  if [ -e "$d/ipset" ]; then mount --bind /dev/null "$d/ipset" || exit 97; fi
done
if ipset --version >/dev/null 2>&1; then echo "an ipset program still runs" >&2; exit 98; fi
echo "no ipset program here" >&2
exec "$bin" -c "$cfg" "$@"
"#;

/// Done when of issue 21: with no `ipset` program on the system the backend creates and fills
/// the sets (with the enforcement rules), applies a change of the list and repairs a flushed
/// set, proven by real TCP connections.
#[test]
fn the_backend_needs_no_ipset_program() {
    use allowsync_testkit::daemon::{allowsync_bin, signal, stop, wait_until};
    use allowsync_testkit::netns::{veth_pair, who_connects};
    let Some(env) = daemon_env("ipset-no-program-test-key") else { return };
    let client = veth_pair();
    let _l4 = std::net::TcpListener::bind(("10.200.0.1", PORT)).unwrap();
    let _l6 = std::net::TcpListener::bind(("fd00:200::1", PORT)).unwrap();
    assert_eq!(who_connects(&client, PORT), [true; 4], "nothing enforced before the daemon");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", WITHOUT_IPSET, "sh"])
        .arg(&env.cfg)
        .arg(allowsync_bin())
        .arg("run");
    let d = env.spawn_command(cmd);
    assert!(env.log().starts_with("no ipset program here"), "{}", env.log());
    let wait = Duration::from_secs(20);

    // Created and filled, and enforced.
    assert!(wait_until(wait, || env.syncs() > 0), "{}", env.log());
    assert_eq!(entries(SET_V4), ["10.200.0.2", "203.0.113.0/24"], "{}", env.log());
    assert_eq!(entries(SET_V6), ["2001:db8:6::/56", "fd00:200::2"]);
    assert_eq!(who_connects(&client, PORT), [true, false, true, false], "{}", env.log());

    // Changed: the stranger `.3` comes in (the two hosts stored as their /31), `203.0.113.0/24`
    // goes.
    env.mock.set_list(5, strings(&["10.200.0.2", "10.200.0.3"]));
    signal(&d, libc::SIGUSR1);
    assert!(wait_until(wait, || entries(SET_V4) == ["10.200.0.2/31"]), "{}", env.log());
    assert_eq!(who_connects(&client, PORT), [true, true, true, false], "{}", env.log());

    // Repaired: a flushed set is filled again by the periodic check.
    run("ipset", &["flush", SET_V6]);
    assert!(wait_until(wait, || entries(SET_V6).len() == 2), "not repaired:\n{}", env.log());
    assert_eq!(who_connects(&client, PORT), [true, true, true, false], "{}", env.log());
    assert!(!env.log().contains("ERROR"), "{}", env.log());
    stop(d);
}

/// Without CAP_NET_ADMIN (dropped from the bounding set before the exec, so root loses it)
/// the error names the capability.
#[test]
fn without_cap_net_admin_the_error_names_it() {
    let Some(env) = enforcing_env("ipset-no-cap-test-key") else { return };
    let dir = env.dir.path();
    let err = dir.join("nocap.stderr");
    let status = std::process::Command::new("setpriv")
        .args(["--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--"])
        .arg(allowsync_testkit::daemon::allowsync_bin())
        .arg("-c")
        .arg(&env.cfg)
        .arg("once")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("the ipset backend needs CAP_NET_ADMIN"), "{stderr}");
    assert!(run("ipset", &["list", "-n"]).is_empty(), "nothing was created");
}
