//! Observability for real: the daemon in a network namespace against the mock Chat API, its
//! `/metrics` scraped and its textfile read with a Prometheus text format parser, `/healthz`
//! and `status`'s exit codes through an applied, an unchanged, a failing, a refused and a
//! repaired sync, and a listener that slow or garbage clients cannot use to stall the syncs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use allowsync::backend::Backend;
use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, backend, signal, stop, strings, wait_until};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::scrape::{Scrape, parse, value};
use allowsync_testkit::{netns, set};

const KEY: &str = "metrics-test-secret-key";
const ADDR: &str = "127.0.0.1:9733";
const LIST5: &[&str] = &["203.0.113.0/25", "198.51.100.7", "198.51.100.9"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];

fn setup() -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    allowsync_testkit::daemon::setup_with(Setup::new(KEY, lists), |y| {
        y.push_str(&format!("metrics:\n  listen: {ADDR}\n  textfile: allowsync.prom\n"));
    })
}

fn full_list() -> AllowSet {
    set([LIST5, LIST6].concat())
}

/// `GET path` on the listener: status and body (`None`: no answer).
fn get(env: &Env, method: &str, path: &str) -> Option<(u16, String)> {
    let url = format!("http://{ADDR}{path}");
    env.rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().ok()?;
        let r = client.request(method.parse().ok()?, url).send().await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    })
}

fn scrape(env: &Env) -> Scrape {
    let (status, body) = get(env, "GET", "/metrics").expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// `promtool check metrics` on `text`, where promtool is installed.
fn promtool(text: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("promtool").is_file()));
    if !found {
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn syncs(s: &Scrape, outcome: &str) -> f64 {
    value(s, "allowsync_syncs_total", &[("outcome", outcome)]).unwrap_or(0.0)
}

/// Waits (bounded) until a scrape satisfies `f`; the last scrape either way.
fn wait_scrape(env: &Env, within: Duration, mut f: impl FnMut(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let ok = wait_until(within, || {
        let s = scrape(env);
        let done = f(&s);
        last = Some(s);
        done
    });
    let s = last.expect("scraped at least once");
    assert!(ok, "not within {within:?}; last scrape: {:?}\nlog:\n{}", s.samples, env.log());
    s
}

#[test]
fn metrics_follow_applied_unchanged_failing_refused_and_repaired_syncs() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    let s = wait_scrape(&env, Duration::from_secs(5), |s| syncs(s, "applied") == 1.0);
    let now = allowsync::clock::now_unix() as f64;
    let last_success = value(&s, "allowsync_last_success_timestamp_seconds", &[]).unwrap();
    assert!(last_success > now - 60.0 && last_success <= now, "{last_success}");
    let entries =
        |s: &Scrape, family, place| value(s, "allowsync_entries", &[("family", family), ("where", place)]);
    // 203.0.113.0/25, two /32 and 192.0.2.0/24: 4 IPv4 prefixes; a /48.
    assert_eq!(entries(&s, "ipv4", "kernel"), Some(4.0));
    assert_eq!(entries(&s, "ipv4", "desired"), Some(4.0));
    assert_eq!(entries(&s, "ipv6", "kernel"), Some(1.0));
    assert_eq!(value(&s, "allowsync_source_using_last_good", &[("source", "chat")]), Some(0.0));
    assert_eq!(
        value(&s, "allowsync_source_last_success_timestamp_seconds", &[("source", "chat")]),
        Some(last_success)
    );
    for nettype in ["5", "6"] {
        let ok = [("source", "chat"), ("nettype", nettype), ("result", "ok")];
        assert_eq!(value(&s, "allowsync_api_requests_total", &ok), Some(1.0), "nettype {nettype}");
    }
    let expiry = value(&s, "allowsync_usersig_expiry_timestamp_seconds", &[("source", "chat")]).unwrap();
    // usersig_ttl defaults to a day.
    assert!((expiry - now - 86_400.0).abs() < 120.0, "{expiry} vs {now}");
    assert!(s.samples.iter().any(|x| x.metric.starts_with("allowsync_sync_duration_seconds")));
    assert_eq!(value(&s, "allowsync_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));

    // The textfile: the same metrics, mode 0644, parsed whole.
    let textfile = env.dir.path().join("allowsync.prom");
    let mode = std::fs::metadata(&textfile).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let body = std::fs::read_to_string(&textfile).unwrap();
    let t = parse(&body);
    assert_eq!(syncs(&t, "applied"), 1.0);
    promtool(&body);
    promtool(&get(&env, "GET", "/metrics").unwrap().1);
    let inode = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let first = inode(&textfile);

    // Unchanged: a success too.
    signal(&d, libc::SIGUSR1);
    let s = wait_scrape(&env, Duration::from_secs(5), |s| syncs(s, "unchanged") == 1.0);
    let last_success = value(&s, "allowsync_last_success_timestamp_seconds", &[]).unwrap();
    // Replaced by a rename (a new file), not rewritten in place.
    assert!(wait_until(Duration::from_secs(5), || inode(&textfile) != first));
    let t = parse(&std::fs::read_to_string(&textfile).unwrap());
    assert!(syncs(&t, "unchanged") >= 1.0);

    // The API fails: the source is on its last good list, the last success stays.
    env.mock.inject(Fault::Status(502));
    signal(&d, libc::SIGUSR1);
    let s = wait_scrape(&env, Duration::from_secs(5), |s| {
        value(s, "allowsync_source_using_last_good", &[("source", "chat")]) == Some(1.0)
    });
    assert_eq!(value(&s, "allowsync_last_success_timestamp_seconds", &[]), Some(last_success));
    let failed = [("source", "chat"), ("nettype", "5"), ("result", "network")];
    assert!(value(&s, "allowsync_api_requests_total", &failed) >= Some(1.0));
    // An answer with an entry wider than min_prefix_v4, then a suspicious empty one.
    let guard =
        |s: &Scrape, g: &str| value(s, "allowsync_guard_refusals_total", &[("guard", g)]).unwrap_or(0.0);
    for (fault, g) in
        [(Fault::ExtraEntries(strings(&["16.0.0.0/4"])), "min_prefix"), (Fault::EmptyList, "empty")]
    {
        env.mock.clear_faults();
        env.mock.inject(fault);
        signal(&d, libc::SIGUSR1);
        wait_scrape(&env, Duration::from_secs(10), |s| guard(s, g) >= 1.0);
    }
    assert_eq!(env.kernel(), full_list());
    env.mock.clear_faults();
    signal(&d, libc::SIGUSR1);
    let s = wait_scrape(&env, Duration::from_secs(10), |s| {
        value(s, "allowsync_source_using_last_good", &[("source", "chat")]) == Some(0.0)
    });
    assert!(value(&s, "allowsync_last_success_timestamp_seconds", &[]) >= Some(last_success));

    // A usersig refused as expired: minted anew and sent again, two requests, one cycle.
    let requests = |s: &Scrape, result: &str| -> f64 {
        ["5", "6"]
            .iter()
            .filter_map(|n| {
                value(
                    s,
                    "allowsync_api_requests_total",
                    &[("source", "chat"), ("nettype", n), ("result", result)],
                )
            })
            .sum()
    };
    let (ok_before, cycles) = (requests(&s, "ok"), syncs(&s, "unchanged"));
    env.mock.inject_times(Fault::ErrorCode(70001), 1);
    signal(&d, libc::SIGUSR1);
    let s = wait_scrape(&env, Duration::from_secs(10), |s| syncs(s, "unchanged") > cycles);
    assert_eq!(requests(&s, "usersig_expired"), 1.0);
    assert_eq!(requests(&s, "ok"), ok_before + 2.0, "both nettypes answered in the end");
    assert_eq!(value(&s, "allowsync_source_using_last_good", &[("source", "chat")]), Some(0.0));

    // Entries added behind allowsync's back: taking them out is a mass removal, refused.
    // Ten ranges apart (not adjacent, so not one range), outside the list.
    let extra = set((0..10).map(|i| format!("203.0.113.{}", 200 + 2 * i)).collect::<Vec<_>>());
    let mut b = backend();
    let current = b.read().unwrap();
    b.apply(&current.diff_to(&AllowSet::union([&current, &extra]))).unwrap();
    signal(&d, libc::SIGUSR1);
    wait_scrape(&env, Duration::from_secs(10), |s| {
        value(s, "allowsync_guard_refusals_total", &[("guard", "removal")]) >= Some(1.0)
            && syncs(s, "refused") >= 1.0
    });
    let current = b.read().unwrap();
    b.apply(&current.diff_to(&full_list())).unwrap();

    // A repair: an element deleted, put back at the notification.
    let repairs = |s: &Scrape| value(s, "allowsync_repairs_total", &[("cause", "event")]).unwrap_or(0.0);
    let before = repairs(&scrape(&env));
    netns::run("nft", &["delete", "element", "inet", "allowsync", "allow_v4", "{ 198.51.100.7 }"]);
    env.wait_kernel(&full_list(), Duration::from_secs(5));
    wait_scrape(&env, Duration::from_secs(5), |s| repairs(s) > before);

    // Secrets: neither the key nor the usersig anywhere in what the listener says.
    let sigs: Vec<String> =
        env.mock.requests().iter().filter_map(|r| r.param("usersig").map(str::to_owned)).collect();
    assert!(!sigs.is_empty());
    for path in ["/metrics", "/healthz"] {
        let (_, body) = get(&env, "GET", path).unwrap();
        assert!(!body.contains(KEY), "{path}");
        assert!(sigs.iter().all(|s| !body.contains(s.as_str())), "{path} holds a usersig");
    }
    stop(d);
}

#[test]
fn healthz_and_status_exit_codes_follow_the_last_success() {
    let Some(env) = setup() else { return };
    let t = Duration::from_secs(10);
    let d = env.start(&full_list());
    // Healthy: 0, and the JSON says why.
    let o = env.command(&["status", "--json"], t);
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((v["schema"].as_u64(), v["health"].as_str()), (Some(1), Some("healthy")));
    assert_eq!(v["daemon"]["running"], true);
    assert_eq!(v["daemon"]["pid"].as_u64(), Some(u64::from(d.id())));
    assert_eq!(v["daemon"]["pid_alive"], true);
    assert_eq!(v["last_attempt"]["outcome"], "applied");
    assert_eq!(v["last_success"]["at"], v["last_attempt"]["at"]);
    assert!(v["next_poll_by"].as_u64() > v["last_attempt"]["at"].as_u64());
    assert_eq!(v["sources"][0]["name"], "chat");
    assert_eq!(v["sources"][0]["result"], "ok");
    assert_eq!(v["sources"][0]["on_last_good"], false);
    assert_eq!(v["prefixes"]["kernel"], serde_json::json!({"v4": 4, "v6": 1}));
    assert_eq!(v["prefixes"]["desired"], v["prefixes"]["kernel"]);
    assert_eq!(v["drift"], false);
    assert_eq!(v["reasons"], serde_json::json!([]));
    let (status, body) = get(&env, "GET", "/healthz").unwrap();
    assert_eq!(status, 200, "{body}");

    // The API fails: degraded at once (the source is on its last good list), while /healthz
    // holds until the last success is 2 x interval (20 s) old.
    env.mock.inject(Fault::Status(502));
    signal(&d, libc::SIGUSR1);
    let degraded = wait_until(Duration::from_secs(10), || env.command(&["status"], t).code == Some(1));
    let o = env.command(&["status", "--json"], t);
    assert!(degraded, "{}", o.stdout);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["health"], "degraded");
    assert_eq!(v["sources"][0]["result"], "network");
    assert_eq!(v["sources"][0]["on_last_good"], true);
    assert!(
        v["last_attempt"]["at"].as_u64() > v["last_success"]["at"].as_u64()
            || v["last_attempt"]["at"] == v["last_success"]["at"]
    );
    assert!(v["reasons"][0].as_str().unwrap().contains("on its last good list"), "{v}");
    assert!(v["sources"][0]["list_age_s"].as_u64().is_some(), "{v}");
    assert!(v["last_error"]["message"].as_str().unwrap().contains("HTTP 502"), "{v}");
    assert!(v["last_error"]["age_s"].as_u64().is_some(), "{v}");
    let text = env.command(&["status"], t).stdout;
    assert!(text.contains("ON ITS LAST GOOD LIST") && text.contains("last success:"), "{text}");
    assert!(
        wait_until(Duration::from_secs(35), || get(&env, "GET", "/healthz").is_some_and(|(s, _)| s == 503)),
        "/healthz stayed 200; log:\n{}",
        env.log()
    );
    let (_, body) = get(&env, "GET", "/healthz").unwrap();
    assert!(body.starts_with("stale: last successful sync ") && body.ends_with("(20s)\n"), "{body}");
    assert!(!body.contains(KEY));

    // The API back: healthy again.
    env.mock.clear_faults();
    signal(&d, libc::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(10), || get(&env, "GET", "/healthz").is_some_and(|(s, _)| s == 200))
    );
    assert!(wait_until(Duration::from_secs(5), || env.command(&["status"], t).code == Some(0)));

    // Not running: 4, whatever else.
    stop(d);
    let o = env.command(&["status", "--json"], t);
    assert_eq!(o.code, Some(4), "{}", o.stdout);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!((v["health"].as_str(), v["daemon"]["running"].as_bool()), (Some("not running"), Some(false)));
    assert_eq!(v["next_poll_by"], serde_json::Value::Null);

    // A configuration error: 2.
    let bad = env.dir.path().join("bad.yaml");
    std::fs::write(&bad, std::fs::read_to_string(&env.cfg).unwrap().replace(ADDR, "0.0.0.0:9733")).unwrap();
    let o = env.command_with(&bad, &["status"], t);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(o.stderr.contains("metrics.listen") && o.stderr.contains("allow_remote"), "{}", o.stderr);
}

#[test]
fn slow_and_garbage_clients_cannot_stall_the_syncs_and_only_two_paths_answer() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    assert_eq!(get(&env, "GET", "/").map(|r| r.0), Some(404));
    assert_eq!(get(&env, "GET", "/metrics/../x").map(|r| r.0), Some(404));
    assert_eq!(get(&env, "POST", "/metrics").map(|r| r.0), Some(405));
    assert_eq!(get(&env, "GET", "/healthz?x=1").map(|r| r.0), Some(200));
    // Bound where configured only: another loopback address of the namespace is refused.
    assert!(TcpStream::connect("127.0.0.2:9733").is_err());

    // More clients than the listener serves, each holding its connection with half a request,
    // and one sending garbage.
    let mut held: Vec<TcpStream> = (0..24)
        .filter_map(|_| {
            let mut c = TcpStream::connect(ADDR).ok()?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(c)
        })
        .collect();
    let mut garbage = TcpStream::connect(ADDR).unwrap();
    garbage.write_all(&[0xff, 0x00, b'\r', b'\n', 0x1b, b'G']).unwrap();
    // The syncs go on meanwhile: SIGUSR1 syncs at once, a list change reaches the kernel.
    let syncs = env.syncs();
    env.mock.set_list(5, strings(&[LIST5, &["198.51.100.200"]].concat()));
    signal(&d, libc::SIGUSR1);
    let want = set([LIST5, LIST6, &["198.51.100.200"]].concat());
    env.wait_kernel(&want, Duration::from_secs(5));
    env.wait_syncs(syncs, Duration::from_secs(5));
    // The garbage got an error answer or a close, not a hang.
    garbage.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = garbage.read_to_end(&mut buf);
    assert!(buf.is_empty() || buf.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&buf));
    // The held connections time out; then /metrics answers again (every slot freed).
    assert!(
        wait_until(Duration::from_secs(20), || get(&env, "GET", "/metrics").is_some_and(|(s, _)| s == 200)),
        "the listener did not recover"
    );
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        // Closed by the listener (header timeout or connection limit): the read ends, with
        // an end of file or a reset, not a timeout.
        if let Err(e) = c.read_to_end(&mut rest) {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
    }
    stop(d);
}
