//! The fault matrix: every fault the mock Chat API can inject, and an error code from every
//! class of the reference's table, against `allowsync once` and `allowsync run` (the real
//! binary, the nftables backend, a private network namespace per case), each starting from a
//! populated set and state file.
//!
//! For every case: the kernel set and the state file's lists stay as they were (a bad answer is
//! never applied, and never replaces the last good list), the command ends in bounded time, and
//! the number of requests the mock saw is bounded (no hot loop). `once` must exit 1 on a source
//! failure; `run` must log the error's class and schedule the retry that class calls for
//! (5 s backoff, the 10 s interval for configuration errors, 60 s when locked).
//!
//! Cases run in parallel threads (each thread its own namespace): most of the time is spent
//! waiting on timeouts and backoffs, not on the CPU.

use std::time::Duration;

use allowsync_testkit::daemon::{Env, Setup, lists_of, setup_with, stop, strings};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::set;

const KEY: &str = "faults-test-secret-key";
const LIST5: &[&str] = &["203.0.113.0/24", "198.51.100.7"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];
/// The source's timeout in the configuration.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long each `run` case watches the daemon.
const WINDOW: Duration = Duration::from_secs(7);

/// What a fault should lead to.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    fault: Fault,
    /// The class logged for the failed source (`class=Network`), `None` for an answer that is
    /// fetched fine but not used as is (empty list, invalid entries).
    class: Option<&'static str>,
    /// `once`'s exit code.
    exit: i32,
    /// The delay `run` schedules after the first failed cycle, in seconds.
    retry_in_s: Option<u64>,
    /// Requests per cycle (2 nettypes; twice that when the usersig is re-minted once).
    per_cycle: usize,
    /// A text the log must contain.
    log_has: &'static str,
}

fn case(name: &str, fault: Fault, class: &'static str) -> Case {
    let retry = match class {
        "Configuration" => 10,
        "Locked" => 60,
        _ => 5,
    };
    Case {
        name: name.into(),
        fault,
        class: Some(class),
        exit: 1,
        retry_in_s: Some(retry),
        per_cycle: 2,
        log_has: "failed(kept last good)",
    }
}

fn cases() -> Vec<Case> {
    let all_invalid = r#"{"ActionStatus":"OK","ErrorCode":0,"IPList":["not-an-address","10.0.0.0/33"]}"#;
    vec![
        case("http 502", Fault::Status(502), "Network"),
        case("http 500", Fault::Status(500), "Network"),
        case("http 429", Fault::Status(429), "RateLimited"),
        case("http 404", Fault::Status(404), "Configuration"),
        case("hang", Fault::Hang, "Network"),
        case("delay past the timeout", Fault::Delay(TIMEOUT + Duration::from_secs(1)), "Network"),
        case("garbage", Fault::Garbage, "InvalidResponse"),
        case("truncated", Fault::Truncated, "Network"),
        case("oversized", Fault::Oversized, "InvalidResponse"),
        case("oversized chunked", Fault::OversizedChunked, "InvalidResponse"),
        case("wrong types", Fault::WrongTypes, "InvalidResponse"),
        case("dribble", Fault::Dribble(Duration::from_millis(500)), "Network"),
        case("body: every entry invalid", Fault::Body(all_invalid.into()), "InvalidResponse"),
        case("chunked body: every entry invalid", Fault::ChunkedBody(all_invalid.into()), "InvalidResponse"),
        // An entry wider than safety.min_prefix_v4 makes the whole answer suspicious.
        case(
            "an entry wider than the minimum",
            Fault::ExtraEntries(strings(&["0.0.0.0/0"])),
            "InvalidResponse",
        ),
        case("60007 rate", Fault::ErrorCode(60007), "RateLimited"),
        case("60008 transient", Fault::ErrorCode(60008), "Transient"),
        // Re-minted and retried once per nettype, then given up: twice the requests.
        Case { per_cycle: 4, ..case("70001 expired, persisting", Fault::ErrorCode(70001), "UsersigExpired") },
        case("70050 locked", Fault::ErrorCode(70050), "Locked"),
        case("60010 not an admin", Fault::ErrorCode(60010), "Configuration"),
        case("70009 wrong key", Fault::ErrorCode(70009), "Configuration"),
        case("60021 ip not allowed", Fault::ErrorCode(60021), "Configuration"),
        // Fetched fine, but an empty list where there was one is suspicious: the last good list
        // stands in, and `once` reports the source as failed.
        Case { class: None, retry_in_s: None, ..case("empty list", Fault::EmptyList, "") },
        // The valid entries are used, the invalid ones skipped: the same list, nothing failed.
        Case {
            class: None,
            exit: 0,
            retry_in_s: None,
            log_has: "skipping invalid entry",
            ..case(
                "extra invalid entries",
                Fault::ExtraEntries(strings(&["300.1.2.3", "10.0.0.0/33", "", "2001:db8::/129"])),
                "",
            )
        },
    ]
}

fn full_list() -> allowsync::prefixes::AllowSet {
    set([LIST5, LIST6].concat())
}

/// A namespace with the mock, a set holding the full list and a state file recording it.
fn populated() -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let env = setup_with(Setup::new(KEY, lists), |_| {})?;
    let first = env.once(Duration::from_secs(20));
    assert_eq!(first.code, Some(0), "the populating `once` failed: {}", first.stderr);
    assert_eq!(env.kernel(), full_list());
    Some(env)
}

/// Runs `f` for every case on a thread of its own; collects every failure instead of stopping
/// at the first, so one run shows the whole matrix.
fn matrix(f: fn(&Case) -> Result<(), String>) {
    let handles: Vec<_> = cases()
        .into_iter()
        .map(|c| {
            std::thread::Builder::new().name(c.name.clone()).spawn(move || (c.name.clone(), f(&c))).unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => failures.push(format!("[{name}] {e}")),
            Err(p) => failures.push(format!(
                "panicked: {}",
                p.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{p:?}"))
            )),
        }
    }
    assert!(failures.is_empty(), "{} failing cases:\n{}", failures.len(), failures.join("\n\n"));
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn once_case(c: &Case) -> Result<(), String> {
    let Some(env) = populated() else { return Ok(()) };
    let state_before = lists_of(&env.parsed_state());
    let before = env.mock.request_count();
    env.mock.inject(c.fault.clone());
    let out = env.once(Duration::from_secs(30));
    let requests = env.mock.request_count() - before;
    let err = &out.stderr;
    check!(out.code == Some(c.exit), "exit {:?} (want {}) after {:?}:\n{err}", out.code, c.exit, out.elapsed);
    // The source timeout, plus generous room for a loaded machine; never a hang.
    check!(out.elapsed < TIMEOUT * 2 + Duration::from_secs(8), "took {:?}", out.elapsed);
    check!(env.kernel() == full_list(), "the kernel set changed:\n{err}");
    check!(lists_of(&env.parsed_state()) == state_before, "the state file's lists changed:\n{}", env.state());
    check!((1..=c.per_cycle).contains(&requests), "{requests} requests (want 1..={}):\n{err}", c.per_cycle);
    if let Some(class) = c.class {
        check!(err.contains(&format!("class={class}")), "no class={class} in:\n{err}");
    }
    if c.exit != 0 {
        check!(
            env.parsed_state().last_error.is_some_and(|e| e.message.contains("keeping its last good list")),
            "last_error does not say the last good list was kept:\n{}",
            env.state()
        );
    }
    check!(err.contains(c.log_has), "no {:?} in:\n{err}", c.log_has);
    Ok(())
}

fn run_case(c: &Case) -> Result<(), String> {
    let Some(env) = populated() else { return Ok(()) };
    let state_before = lists_of(&env.parsed_state());
    env.mock.inject(c.fault.clone());
    let before = env.mock.request_count();
    let d = env.spawn();
    std::thread::sleep(WINDOW);
    let requests = env.mock.request_count() - before;
    let took = stop(d);
    let log = env.log();
    check!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    check!(env.kernel() == full_list(), "the kernel set changed:\n{log}");
    check!(lists_of(&env.parsed_state()) == state_before, "the state file's lists changed:\n{}", env.state());
    // Cycles at 0 s and, after the shortest backoff (5 s), one more within the window; a
    // configuration or locked error waits 10 s or 60 s, so only the first. Never more.
    let cycles = match c.retry_in_s {
        Some(s) if s > WINDOW.as_secs() => 1,
        _ => 1 + (WINDOW.as_secs() / 5) as usize,
    };
    let max = cycles * c.per_cycle;
    check!((2..=max).contains(&requests), "{requests} requests in {WINDOW:?} (want 2..={max}):\n{log}");
    if let Some(class) = c.class {
        check!(log.contains(&format!("class={class}")), "no class={class} in:\n{log}");
    }
    if let Some(s) = c.retry_in_s {
        check!(
            log.contains(&format!("a source failed: backing off retry_in_s={s}")),
            "no backoff of {s} s in:\n{log}"
        );
    }
    check!(log.contains(c.log_has), "no {:?} in:\n{log}", c.log_has);
    Ok(())
}

#[test]
fn once_leaves_the_set_and_the_state_on_every_fault() {
    matrix(once_case);
}

#[test]
fn run_backs_off_and_leaves_the_set_and_the_state_on_every_fault() {
    matrix(run_case);
}
