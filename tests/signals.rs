//! Signal storms against the real daemon and the mock Chat API, in a network namespace of its
//! own: however many signals arrive, SIGUSR1 makes at most one cycle per second (so at most one
//! GetIPList call per nettype per second) and SIGHUP at most one reload per second, and a
//! reload that changes nothing in the kernel objects writes nothing to the kernel.
//!
//! The bounds are computed from how long each storm took, whatever the machine's speed: at
//! most one cycle (or reload) starts per second of storm, plus the one under way when it began
//! and the one its last signal queued.

use std::thread::sleep;
use std::time::{Duration, Instant};

use allowsync::backend::Backend;
use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, backend, setup_with, signal, stop, strings, wait_until};
use allowsync_testkit::set;

const KEY: &str = "signals-test-secret-key";
const LIST5: &[&str] = &["203.0.113.0/24", "198.51.100.7"];
const LIST6: &[&str] = &["2001:db8:6::/56"];
const WAIT: Duration = Duration::from_secs(20);
/// GetIPList calls per cycle: nettypes 5 and 6.
const CALLS_PER_CYCLE: usize = 2;

fn env() -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    setup_with(Setup::new(KEY, lists), |y| {
        *y = y
            .replace("interval: 10s", "interval: 5m")
            .replace("set_v6: allow_v6 }", "set_v6: allow_v6, enforce: { tcp_ports: [8443] } }");
    })
}

fn full_list() -> AllowSet {
    set([LIST5, LIST6].concat())
}

/// The most runs a storm of `took` can start: one per started second, plus the one under way
/// at its start and the one its last signal queued.
fn bound(took: Duration) -> usize {
    took.as_secs() as usize + 1 + 2
}

/// Sends `n` signals `sig`, `gap` apart; returns how long that took and the daemon's log length
/// just before the last one (whatever the last signal causes is logged after it).
fn storm(env: &Env, d: &std::process::Child, sig: i32, n: usize, gap: Duration) -> (Duration, usize) {
    let t = Instant::now();
    for _ in 1..n {
        signal(d, sig);
        sleep(gap);
    }
    let mark = env.log().len();
    signal(d, sig);
    (t.elapsed(), mark)
}

#[test]
fn a_sigusr1_storm_makes_a_bounded_number_of_api_calls() {
    let Some(env) = env() else { return };
    let d = env.start(&full_list());
    let before = env.mock.request_count();
    // 500 signals about 5 ms apart: before issue 17, about one cycle each.
    let (took, mark) = storm(&env, &d, libc::SIGUSR1, 500, Duration::from_millis(5));
    // The last signal asks for one more cycle: it comes.
    assert!(wait_until(WAIT, || env.log()[mark..].contains(" sync ")), "{}", env.log());
    let calls = env.mock.request_count() - before;
    assert!(calls >= CALLS_PER_CYCLE, "the storm synced at least once: {calls}");
    assert!(
        calls <= bound(took) * CALLS_PER_CYCLE,
        "{calls} GetIPList calls for a storm of {took:?} (at most {} cycles)",
        bound(took)
    );
    stop(d);
}

#[test]
fn a_sighup_storm_reloads_at_most_once_per_second_and_writes_nothing_when_nothing_changed() {
    let Some(env) = env() else { return };
    let d = env.start(&full_list());
    let generation = || backend().generation().unwrap().unwrap();
    let before = generation();
    let reloads = |log: &str| log.matches("SIGHUP: configuration reloaded").count();
    let reloads_before = reloads(&env.log());
    let (took, mark) = storm(&env, &d, libc::SIGHUP, 100, Duration::from_millis(10));
    // The reload the last signal asked for, and the sync that follows it.
    let done = || {
        let log = env.log();
        let after = &log[mark..];
        after.find("SIGHUP: configuration reloaded").is_some_and(|i| after[i..].contains(" sync "))
    };
    assert!(wait_until(WAIT, done), "{}", env.log());
    let n = reloads(&env.log()) - reloads_before;
    assert!(n >= 1 && n <= bound(took), "{n} reloads for a storm of {took:?}");
    assert_eq!(generation(), before, "a reload that changes nothing wrote to the kernel:\n{}", env.log());
    assert_eq!(env.kernel(), full_list());
    stop(d);
}
