//! No answer from the API can open the port to the world: the real binary, the mock Chat API
//! and the kernel's nftables with `enforce`, each test in a network namespace of its own, and a
//! client namespace joined by a veth pair to prove with real TCP connections who gets in.
//!
//! - an entry wider than the minimum prefix makes the answer suspicious: `once` exits 1, the
//!   set stays, a stranger still cannot connect;
//! - a mass widening is refused (exit 3) until `--force`;
//! - special addresses are skipped, each with one warning, the rest applied;
//! - text from the network cannot forge a log line.

use std::net::TcpListener;
use std::time::Duration;

use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, lists_of, setup_with, stop, strings, wait_until};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::netns::{veth_pair, who_connects};
use allowsync_testkit::set;

const KEY: &str = "input-safety-test-key";
const PORT: u16 = 8443;
const T: Duration = Duration::from_secs(20);
/// The client `10.200.0.2` / `fd00:200::2` is allowlisted; `.3` is a stranger.
const GOOD5: &[&str] = &["10.200.0.2", "203.0.113.0/24"];
const GOOD6: &[&str] = &["fd00:200::2", "2001:db8:6::/56"];

fn good() -> AllowSet {
    set([GOOD5, GOOD6].concat())
}

/// The mock serving `lists`, allowsync enforcing [`PORT`], with `format` logs.
fn env_with(lists: [(u8, &[&str]); 2], format: &str) -> Option<Env> {
    let mut setup = Setup::new(KEY, lists.into_iter().map(|(n, l)| (n, strings(l))).collect());
    setup.log_format = format;
    setup_with(setup, |y| {
        *y = y.replace(
            "set_v6: allow_v6 }",
            &format!("set_v6: allow_v6, enforce: {{ tcp_ports: [{PORT}] }} }}"),
        )
    })
}

fn output(f: &allowsync_testkit::daemon::Finished) -> String {
    format!("{}{}", f.stdout, f.stderr)
}

#[test]
fn an_entry_wider_than_the_minimum_fails_the_source_and_opens_nothing() {
    let Some(env) = env_with([(5, GOOD5), (6, GOOD6)], "text") else { return };
    let client = veth_pair();
    // Listeners in the server namespace (this thread's): the kernel completes handshakes into
    // the backlog, nothing needs to accept.
    let _l4 = TcpListener::bind(("10.200.0.1", PORT)).unwrap();
    let _l6 = TcpListener::bind(("fd00:200::1", PORT)).unwrap();
    assert_eq!(who_connects(&client, PORT), [true; 4], "without allowsync the network works");

    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), good());
    assert_eq!(who_connects(&client, PORT), [true, false, true, false]);
    let state = lists_of(&env.parsed_state());

    for wide in ["0.0.0.0/0", "::ffff:0.0.0.0/96", "::/0"] {
        env.mock.set_list(5, strings(&[GOOD5, &[wide]].concat()));
        let o = env.once(T);
        let err = &o.stderr;
        assert_eq!(o.code, Some(1), "{wide}: {}", output(&o));
        assert_eq!(env.kernel(), good(), "{wide}: the set changed");
        assert_eq!(lists_of(&env.parsed_state()), state, "{wide}: the last good lists changed");
        // Logged as an error, with the source and the entry as sent (escaped).
        let line = err
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("suspicious answer"))
            .unwrap_or_else(|| panic!("{wide}: no error line:\n{err}"));
        assert!(line.contains("source=chat") && line.contains(&format!("entry=\"{wide}\"")), "{line}");
        assert!(err.contains("failed(kept last good)"), "{wide}: {err}");
        assert_eq!(who_connects(&client, PORT), [true, false, true, false], "{wide}: a stranger got in");
    }
    // `plan` shows why the source's last good list stands in.
    let o = env.command(&["plan"], T);
    assert!(output(&o).contains("suspicious answer, none of it used: entry \"::/0\""), "{}", output(&o));
    assert!(output(&o).contains("keeping its last good list"), "{}", output(&o));
}

#[test]
fn a_pure_widening_is_refused_until_forced() {
    let two = ["203.0.113.0/25", "198.51.100.128/25"];
    let Some(env) = env_with([(5, &two), (6, &["2001:db8:6::/64"])], "text") else { return };
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    let before = set([&two[..], &["2001:db8:6::/64"]].concat());
    assert_eq!(env.kernel(), before);
    let state = lists_of(&env.parsed_state());

    // The same two /25s plus 10.0.0.0/8: nothing is removed, 2^24 addresses are added.
    env.mock.set_list(5, strings(&[two[0], two[1], "10.0.0.0/8"]));
    let o = env.command(&["plan"], T);
    let text = output(&o);
    assert_eq!(o.code, Some(3), "{text}");
    assert!(
        text.contains("widening: +16777216 IPv4 addresses (max_added_addresses_v4 65536), +0 IPv6"),
        "{text}"
    );
    assert!(text.contains("verdict: REFUSED: refusing to add 16777216 IPv4 addresses"), "{text}");
    let o = env.once(T);
    assert_eq!(o.code, Some(3), "{}", output(&o));
    assert!(o.stderr.contains("outcome=\"refused\""), "{}", o.stderr);
    assert_eq!(env.kernel(), before, "a refused widening changed the set");
    assert_eq!(lists_of(&env.parsed_state()), state, "a refused list became the last good one");

    // The daemon refuses it too, as an error, and keeps the set.
    let d = env.spawn();
    let refused = wait_until(Duration::from_secs(10), || {
        env.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("refusing to add 16777216 IPv4 addresses"))
    });
    stop(d);
    assert!(refused, "the daemon did not log the refusal:\n{}", env.log());
    assert_eq!(env.kernel(), before);

    let o = env.command(&["once", "--force"], T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    let widened = set([two[0], two[1], "10.0.0.0/8", "2001:db8:6::/64"]);
    assert_eq!(env.kernel(), widened);

    // IPv6 counts /64 networks: a /32 is 2^32 of them.
    env.mock.set_list(6, strings(&["2001:db8:6::/64", "2001:db9::/32"]));
    let o = env.once(T);
    assert_eq!(o.code, Some(3), "{}", output(&o));
    assert!(o.stderr.contains("4294967296 IPv6 /64 networks"), "{}", o.stderr);
    assert_eq!(env.kernel(), widened);
    let o = env.command(&["once", "--force"], T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert!(env.kernel().v6.covers(&allowsync::prefixes::Range::from_prefix(0x2001_0db9 << 96, 32)));
}

#[test]
fn special_addresses_are_skipped_with_one_warning_each() {
    let special4 = ["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "169.254.10.1", "240.0.0.1"];
    let special6 = ["::1", "::", "ff02::1", "fe80::1", "::ffff:127.0.0.2"];
    // Each special one twice: still one warning.
    let list5 = [GOOD5, &special4, &special4].concat();
    let list6 = [GOOD6, &special6, &special6].concat();
    let Some(env) = env_with([(5, &list5), (6, &list6)], "text") else { return };
    let o = env.once(T);
    let err = &o.stderr;
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), good());
    for s in special4.iter().chain(&special6) {
        let warned: Vec<&str> = err.lines().filter(|l| l.contains(&format!("entry=\"{s}\""))).collect();
        assert_eq!(warned.len(), 1, "{s}:\n{err}");
        assert!(warned[0].contains("WARN") && warned[0].contains("never allowed"), "{}", warned[0]);
    }
    assert!(err.contains("chat=ok(4, 22 skipped)"), "{err}");
}

/// An entry and an `ErrorInfo` that try to forge a log line and reach the terminal.
const FORGED: &str =
    "192.0.2.1\n2026-01-01T00:00:00.000000Z  INFO sync outcome=\"applied\" added=1\r\x1b[2JFORGED";

fn assert_no_forged_line(log: &str, format: &str) {
    assert!(!log.contains(['\r', '\x1b']), "{format}: a raw CR or ESC in the log:\n{log:?}");
    for line in log.lines() {
        match format {
            // Every line is the formatter's: a timestamp, then the level.
            "text" => {
                let ts = line.get(..20).unwrap_or_default();
                let shape = ts.len() == 20 && ts.as_bytes()[4] == b'-' && ts.as_bytes()[10] == b'T';
                assert!(shape, "text: a line that is not the formatter's: {line:?}\n{log}");
                assert!(!line.starts_with("2026-01-01T00:00:00.000000Z"), "forged: {line:?}");
            }
            _ => {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("json: not JSON ({e}): {line:?}"));
                assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
                // Every field was escaped before it was encoded: no control character decodes.
                for (k, f) in v.as_object().unwrap() {
                    let text = f.as_str().unwrap_or_default();
                    assert!(!text.chars().any(char::is_control), "json field {k}: {text:?}");
                }
            }
        }
    }
}

#[test]
fn text_from_the_network_cannot_forge_a_log_line() {
    for format in ["text", "json"] {
        let Some(env) = env_with([(5, GOOD5), (6, GOOD6)], format) else { return };
        env.mock.inject(Fault::ExtraEntries(strings(&[FORGED])));
        let o = env.once(T);
        assert_eq!(o.code, Some(0), "{format}: {}", output(&o));
        assert_eq!(env.kernel(), good());
        // Shown, escaped: in JSON the field decodes to the escaped text.
        let escaped = r#""192.0.2.1\n2026-01-01T00:00:00.000000Z  INFO sync outcome=\"applied\" added=1\r\u{1b}[2JFORGED""#;
        let shown = match format {
            "text" => o.stderr.contains(&format!("entry={escaped}")),
            _ => o
                .stderr
                .lines()
                .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["entry"] == escaped)),
        };
        assert!(shown, "{format}: the entry is not shown escaped:\n{}", o.stderr);
        assert_no_forged_line(&o.stderr, format);

        // The server's ErrorInfo, in the error of a failed source.
        env.mock.clear_faults();
        let info = serde_json::to_string(FORGED).unwrap();
        env.mock.inject(Fault::Body(format!(
            r#"{{"ActionStatus":"FAIL","ErrorCode":70009,"ErrorInfo":{info}}}"#
        )));
        let o = env.once(T);
        assert_eq!(o.code, Some(1), "{format}: {}", output(&o));
        assert!(o.stderr.contains("wrong secret key (server: "), "{format}: {}", o.stderr);
        assert_no_forged_line(&o.stderr, format);
        assert_eq!(env.kernel(), good());
        // The state file's last error (shown by `status`) holds it escaped too.
        let status = env.command(&["status"], T);
        assert!(
            !status.stdout.contains(['\r', '\x1b']) && status.stdout.contains("FORGED"),
            "{}",
            status.stdout
        );
    }
}
