//! Bounded resources: answers built to exhaust memory or time (a 50 MB body, with and without
//! `Content-Length`, a 1M-entry list, a body dribbled a byte a second) cost `allowsync once` a
//! bounded amount of memory (its peak RSS, from `wait4`) and time (the source's timeout plus a
//! margin), and nothing of them is applied: the kernel set stays as it was.
//!
//! And the parse and aggregation path, fed 1M entries directly (past the 1 MiB cap that stops
//! them at the door), stays linear: run in a child process of its own so that the peak memory
//! it reads is its alone.

use std::time::{Duration, Instant};

use allowsync::source::chat;
use allowsync_testkit::daemon::{Setup, setup_with, strings, wait_child};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::set;

const KEY: &str = "resources-test-secret-key";
const LIST5: &[&str] = &["203.0.113.0/24", "198.51.100.7"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];
/// The source's timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Peak RSS allowed to `allowsync once` (it needs about 10 MiB); the answers here are 1 to 50 MB.
const MAX_RSS_KIB: i64 = 64 * 1024;

/// 50 MB of a valid-looking answer: a list of one address repeated.
fn fifty_mb() -> String {
    let mut s = String::from(r#"{"ActionStatus":"OK","ErrorCode":0,"IPList":["#);
    let item = r#""192.0.2.1","#;
    s.reserve(50 * 1024 * 1024);
    while s.len() < 50 * 1024 * 1024 {
        s.push_str(item);
    }
    s.push_str(r#""192.0.2.1"]}"#);
    s
}

/// `n` distinct addresses (10.0.0.0 upwards, every other one, so that none merge).
fn many(n: u32) -> Vec<String> {
    (0..n).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i).to_string()).collect()
}

/// Populates the set, applies `prepare` to the mock, runs `allowsync once` and checks it fails
/// in bounded time and memory, naming `class` and leaving the kernel as it was.
fn bounded(name: &str, prepare: impl FnOnce(&allowsync_testkit::mock::MockHandle), class: &str) {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let Some(env) = setup_with(Setup::new(KEY, lists), |_| {}) else { return };
    let first = env.once(Duration::from_secs(20));
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let full = set([LIST5, LIST6].concat());
    assert_eq!(env.kernel(), full);
    let baseline = first.max_rss_kib;

    prepare(&env.mock);
    let out = env.once(Duration::from_secs(30));
    eprintln!(
        "{name}: exit {:?} in {:?}, peak RSS {} KiB (a normal `once`: {baseline} KiB)",
        out.code, out.elapsed, out.max_rss_kib
    );
    assert_eq!(out.code, Some(1), "{name}: {}", out.stderr);
    assert!(out.elapsed < TIMEOUT + Duration::from_secs(5), "{name}: took {:?}", out.elapsed);
    assert!(out.max_rss_kib < MAX_RSS_KIB, "{name}: peak RSS {} KiB", out.max_rss_kib);
    assert!(out.stderr.contains(&format!("class={class}")), "{name}: {}", out.stderr);
    assert_eq!(env.kernel(), full, "{name}: something of the bad answer was applied");
}

#[test]
fn a_50_mb_body_with_content_length_is_refused_unread() {
    let body = fifty_mb();
    bounded("50 MB, Content-Length", |m| m.inject(Fault::Body(body)), "InvalidResponse");
}

#[test]
fn a_50_mb_chunked_body_is_cut_at_the_cap() {
    let body = fifty_mb();
    bounded("50 MB, chunked", |m| m.inject(Fault::ChunkedBody(body)), "InvalidResponse");
}

#[test]
fn a_list_of_a_million_entries_is_refused() {
    bounded("1M entries", |m| m.set_list(5, many(1_000_000)), "InvalidResponse");
}

#[test]
fn a_body_dribbled_a_byte_a_second_times_out() {
    bounded("dribble 1 byte/s", |m| m.inject(Fault::Dribble(Duration::from_secs(1))), "Network");
}

/// The work of [`a_million_entries_parse_and_aggregate_in_bounded_memory`], which runs it in a
/// child process (`--ignored --exact`) so that the peak memory it reads is its own.
#[test]
#[ignore = "run in a child process by a_million_entries_parse_and_aggregate_in_bounded_memory"]
fn million_entry_parse_child() {
    let n = 1_000_000;
    let body =
        serde_json::to_vec(&serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "IPList": many(n)}))
            .unwrap();
    let t = Instant::now();
    let got = chat::parse_response(&body, 1, "a", &Default::default()).unwrap();
    eprintln!("parsed and aggregated {n} entries ({} bytes) in {:?}", body.len(), t.elapsed());
    assert_eq!((got.entries, got.skipped, got.list.len()), (n as usize, 0, n as usize));
    // Adjacent addresses merge: 1M of them are one range.
    let adjacent: Vec<_> = (0..n).map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string()).collect();
    let body =
        serde_json::to_vec(&serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "IPList": adjacent}))
            .unwrap();
    let got = chat::parse_response(&body, 1, "a", &Default::default()).unwrap();
    assert_eq!((got.entries, got.list.len()), (n as usize, 1));
    // This process's own peak: exact, as it is read from inside.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak = allowsync_testkit::daemon::vm_hwm_kib(&status).unwrap();
    eprintln!("peak RSS of the 1M-entry parse: {} MiB", peak / 1024);
    // Two ~15 MB bodies, their parsed JSON and the lists: a few hundred bytes per entry at
    // most. Linear in the input, no blow-up.
    assert!(peak < 512 * 1024, "peak RSS {} MiB for 1M entries", peak / 1024);
}

#[test]
fn a_million_entries_parse_and_aggregate_in_bounded_memory() {
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "million_entry_parse_child", "--nocapture", "--test-threads=1"])
        .spawn()
        .unwrap();
    // The child checks its own peak memory; a generous time bound proves it ended.
    let (code, took, _) = wait_child(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "the child failed or was killed after {took:?}");
}
