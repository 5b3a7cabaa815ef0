//! What the daemon tells systemd (`sd_notify`) and what its logs look like to a machine:
//! READY=1 after the first sync, STATUS=, WATCHDOG=1 (also while a fetch hangs),
//! RELOADING=1/READY=1 around SIGHUP, STOPPING=1; and the one JSON line per sync with its
//! fields.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use allowsync::backend::Backend;
use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, backend, signal, stop, strings, wait_until};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::{netns, set};

const KEY: &str = "notify-test-secret-key";

fn setup(log_format: &str) -> Option<Env> {
    let lists =
        [(5, strings(&["203.0.113.0/24", "198.51.100.7"])), (6, strings(&["2001:db8:6::/48"]))].into();
    let mut s = Setup::new(KEY, lists);
    s.log_format = log_format;
    allowsync_testkit::daemon::setup_with(s, |_| {})
}

/// Collects notification datagrams until `until` holds for what was received, or `within`.
fn collect(sock: &UnixDatagram, got: &mut Vec<String>, within: Duration, until: impl Fn(&[String]) -> bool) {
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while !until(got) && Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

/// Starts `allowsync run` with a notify socket of its own (and `WATCHDOG_USEC` when given).
fn run_notified(env: &Env, watchdog_usec: Option<&str>) -> (UnixDatagram, Child) {
    let path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_allowsync"));
    cmd.args(["-c", env.cfg.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec);
    }
    (sock, cmd.spawn().unwrap())
}

#[test]
fn ready_status_watchdog_reloading_and_stopping_reach_the_notify_socket() {
    let Some(env) = setup("text") else { return };
    let (sock, d) = run_notified(&env, Some("1000000"));
    let mut got = Vec::new();
    let has = |got: &[String], s: &str| got.iter().any(|m| m.lines().any(|l| l.starts_with(s)));
    collect(&sock, &mut got, Duration::from_secs(10), |g| has(g, "READY=1"));
    let ready =
        got.iter().find(|m| m.contains("READY=1")).cloned().unwrap_or_else(|| panic!("no READY=1: {got:?}"));
    assert!(ready.contains("STATUS=allow_v4 2, allow_v6 1, last sync "), "{ready}");
    // The last success and its age, as `status` tells them.
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=") && l.contains(", last success ") && l.contains(" ago)")),
        "{ready}"
    );
    // The kernel already holds the list when READY=1 arrives: the first sync came before it.
    assert_eq!(env.kernel().len(), 3);

    // The watchdog is pinged at half its period (1 s here): at least two pings in ~1.5 s.
    got.clear();
    collect(&sock, &mut got, Duration::from_millis(1500), |_| false);
    assert!(got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "{got:?}");

    got.clear();
    signal(&d, libc::SIGHUP);
    collect(&sock, &mut got, Duration::from_secs(3), |g| has(g, "READY=1"));
    let reloading = got.iter().position(|m| m.contains("RELOADING=1")).unwrap_or_else(|| panic!("{got:?}"));
    assert!(got[reloading].contains("MONOTONIC_USEC="), "{got:?}");
    assert!(got[reloading..].iter().any(|m| m.contains("READY=1")), "READY=1 after the reload: {got:?}");

    // stop() waits for the process; STOPPING=1 was sent before it exited.
    let sock2 = sock.try_clone().unwrap();
    stop(d);
    got.clear();
    collect(&sock2, &mut got, Duration::from_secs(1), |g| has(g, "STOPPING=1"));
    assert!(has(&got, "STOPPING=1"), "{got:?}");
}

/// STATUS= tells what the kernel holds, not the state file's last applied list: entries added
/// behind allowsync's back make the next sync a refused mass removal, and the status counts them.
#[test]
fn status_reports_what_the_kernel_holds() {
    let Some(env) = setup("text") else { return };
    let (sock, d) = run_notified(&env, None);
    let status = |got: &[String], s: &str| {
        got.iter().any(|m| m.lines().any(|l| l.starts_with("STATUS=") && l.contains(s)))
    };
    let mut got = Vec::new();
    collect(&sock, &mut got, Duration::from_secs(10), |g| status(g, "allow_v4 2, allow_v6 1"));
    assert!(status(&got, "allow_v4 2, allow_v6 1, last sync "), "{got:?}");

    let mut b = backend();
    let extra = set([
        "192.0.2.10",
        "192.0.2.20",
        "192.0.2.30",
        "192.0.2.40",
        "192.0.2.50",
        "192.0.2.60",
        "192.0.2.70",
        "192.0.2.80",
        "192.0.2.90",
        "192.0.2.100",
    ]);
    let current = b.read().unwrap();
    b.apply(&current.diff_to(&AllowSet::union([&current, &extra]))).unwrap();
    got.clear();
    signal(&d, libc::SIGUSR1);
    collect(&sock, &mut got, Duration::from_secs(10), |g| status(g, "refused"));
    assert!(status(&got, "allow_v4 12, allow_v6 1, last sync "), "{got:?}");
    assert!(status(&got, "last cycle refused by a safety guard"), "{got:?}");
    stop(d);
}

/// With the API hanging (it reads each request and never answers, up to the source's 20 s
/// `timeout`), the daemon keeps answering: WATCHDOG=1 at its period, a `flush ruleset`
/// repaired from memory, SIGTERM.
#[test]
fn the_watchdog_notifications_and_signals_are_answered_while_the_api_hangs() {
    let lists = [(5, strings(&["203.0.113.0/24"])), (6, strings(&["2001:db8:6::/56"]))].into();
    let mut s = Setup::new(KEY, lists);
    s.timeout = "20s";
    let Some(env) =
        allowsync_testkit::daemon::setup_with(s, |y| *y = y.replace("interval: 10s", "interval: 5m"))
    else {
        return;
    };
    let want: AllowSet = set(["203.0.113.0/24", "2001:db8:6::/56"]);
    let (sock, d) = run_notified(&env, Some("1000000"));
    let mut got = Vec::new();
    let has = |got: &[String], s: &str| got.iter().any(|m| m.lines().any(|l| l.starts_with(s)));
    collect(&sock, &mut got, Duration::from_secs(10), |g| has(g, "READY=1"));
    assert!(has(&got, "READY=1"), "{got:?}");

    let before = env.mock.request_count();
    env.mock.inject(Fault::Hang);
    signal(&d, libc::SIGUSR1);
    // The fetch is under way: the mock holds both nettypes' requests and answers neither.
    assert!(wait_until(Duration::from_secs(10), || env.mock.request_count() == before + 2));

    // Pinged every 0.5 s (half of WATCHDOG_USEC) while the requests hang.
    got.clear();
    collect(&sock, &mut got, Duration::from_secs(3), |_| false);
    let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "{pings} WATCHDOG=1 in 3 s with a 1 s watchdog while a fetch hangs: {got:?}");

    // Notifications too: a wipe meanwhile is repaired from memory, with no further request.
    netns::run("nft", &["flush", "ruleset"]);
    assert!(wait_until(Duration::from_secs(10), || backend().read().ok() == Some(want.clone())));
    assert_eq!(env.mock.request_count(), before + 2, "the hanging fetch is the only one");

    // And signals: SIGTERM stops it at once, the fetch abandoned (stop() bounds it to 5 s).
    let sock2 = sock.try_clone().unwrap();
    stop(d);
    got.clear();
    collect(&sock2, &mut got, Duration::from_secs(1), |g| has(g, "STOPPING=1"));
    assert!(has(&got, "STOPPING=1"), "{got:?}");
    assert_eq!(backend().read().unwrap(), want, "the sets stay");
}

#[test]
fn json_logs_carry_one_sync_line_with_its_fields() {
    let Some(env) = setup("json") else { return };
    let o = env.once(Duration::from_secs(20));
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let lines: Vec<serde_json::Value> = o
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let syncs: Vec<_> = lines.iter().filter(|v| v["message"] == "sync").collect();
    assert_eq!(syncs.len(), 1, "{}", o.stderr);
    let s = syncs[0];
    assert_eq!(s["level"], "INFO");
    assert_eq!(s["outcome"], "applied");
    assert_eq!(s["added"], 3);
    assert_eq!(s["removed"], 0);
    assert_eq!(s["v4"], 2);
    assert_eq!(s["v6"], 1);
    assert!(s["duration_ms"].is_u64(), "{s}");
    assert_eq!(s["sources"], "chat=ok(3)");
    assert!(!o.stderr.contains(KEY));
}
