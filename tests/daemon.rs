//! `allowsync run` for real: the release-shaped binary, the mock Chat API and the kernel's
//! nftables, each test in a network namespace of its own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use allowsync::backend::Backend;
use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, signal, stop, strings, wait_until};
use allowsync_testkit::mock::Fault;
use allowsync_testkit::{netns, set};

const KEY: &str = "daemon-test-secret-key";

const LIST5: &[&str] = &["203.0.113.0/25", "203.0.113.128/25", "198.51.100.7", "198.51.100.9"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];

fn setup() -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    allowsync_testkit::daemon::setup_with(Setup::new(KEY, lists), |_| {})
}

fn full_list() -> AllowSet {
    set([LIST5, LIST6].concat())
}

#[test]
fn a_list_change_reaches_the_kernel_within_one_interval_and_sigusr1_syncs_at_once() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    assert!(env.log().contains("outcome=\"applied\""), "{}", env.log());

    // Changed at the API: reaches the kernel by the next interval (10 s), without a signal.
    env.mock.set_list(5, strings(&["203.0.113.0/24", "198.51.100.7", "198.51.100.9", "198.51.100.64/26"]));
    let t = Instant::now();
    let want = set([
        "203.0.113.0/24",
        "198.51.100.7",
        "198.51.100.9",
        "198.51.100.64/26",
        "192.0.2.0/24",
        "2001:db8:6::/48",
    ]);
    env.wait_kernel(&want, Duration::from_secs(13));
    eprintln!("list change reached the kernel after {:?}", t.elapsed());

    // SIGUSR1: now, not in 10 s.
    env.mock.set_list(6, strings(&["192.0.2.0/24", "2001:db8:6::/48", "2001:db8:7::/48"]));
    let t = Instant::now();
    signal(&d, libc::SIGUSR1);
    let want = set([
        "203.0.113.0/24",
        "198.51.100.7",
        "198.51.100.9",
        "198.51.100.64/26",
        "192.0.2.0/24",
        "2001:db8:6::/48",
        "2001:db8:7::/48",
    ]);
    env.wait_kernel(&want, Duration::from_secs(3));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(env.log().contains("SIGUSR1: syncing now"));

    // SIGTERM: stops quickly, the set stays.
    let took = stop(d);
    assert!(took < Duration::from_secs(5));
    assert_eq!(env.kernel(), want, "SIGTERM must leave the set in place");
    let log = env.log();
    assert!(!log.contains(KEY), "the secret key leaked into the log");
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_and_keeps_syncing() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    let good = std::fs::read_to_string(&env.cfg).unwrap();
    std::fs::write(&env.cfg, format!("{good}\nbogus_key: 1\n")).unwrap();
    signal(&d, libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(3), || env.log().contains("SIGHUP: the new configuration is invalid")),
        "{}",
        env.log()
    );
    assert!(env.log().contains("bogus_key"), "the error names the key: {}", env.log());
    // Still alive, still syncing with the old configuration.
    env.mock.set_list(5, strings(&[LIST5, &["198.51.100.200"]].concat()));
    signal(&d, libc::SIGUSR1);
    env.wait_kernel(&set([LIST5, LIST6, &["198.51.100.200"]].concat()), Duration::from_secs(3));
    // A good new configuration is taken: a static source appears.
    std::fs::write(
        &env.cfg,
        good.replace("backend:", "  - name: office\n    static: [100.64.0.1]\nbackend:"),
    )
    .unwrap();
    signal(&d, libc::SIGHUP);
    env.wait_kernel(&set([LIST5, LIST6, &["198.51.100.200", "100.64.0.1"]].concat()), Duration::from_secs(3));
    stop(d);
}

#[test]
fn api_unreachable_at_start_restores_the_set_from_the_state_file() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    stop(d);
    // A "reboot": the kernel loses everything, and the API is down.
    netns::run("nft", &["delete", "table", "inet", "allowsync"]);
    env.mock.inject(Fault::Status(502));
    let d = env.spawn();
    env.wait_kernel(&full_list(), Duration::from_secs(5));
    assert!(env.log().contains("restored the last good allowlist from the state file"), "{}", env.log());
    // And the failing API does not shrink it.
    env.wait_syncs(1, Duration::from_secs(5));
    assert!(env.log().contains("kept last good"), "{}", env.log());
    assert_eq!(env.kernel(), full_list());
    stop(d);
}

#[test]
fn api_failing_mid_run_leaves_the_set_and_backs_off() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    let state_before = env.state();
    env.mock.inject(Fault::Status(500));
    let before = env.mock.request_count();
    signal(&d, libc::SIGUSR1);
    std::thread::sleep(Duration::from_secs(12));
    let requests = env.mock.request_count() - before;
    // Cycles at 0 s, +5 s, +10 s (backoff 5 s, then 10 s = interval): 3 cycles of 2 nettypes.
    assert!((2..=6).contains(&requests), "{requests} requests in 12 s: no hot loop, but retries");
    assert_eq!(env.kernel(), full_list(), "a failing API must not change the set");
    assert!(env.log().contains("backing off"), "{}", env.log());
    let state_after = env.state();
    assert!(state_after.contains("\"last_error\": {"), "{state_after}");
    // The last good list is unchanged (only last_error and last_sync move).
    let lists = |s: &str| s.split("\"applied\"").next().unwrap().to_string();
    assert_eq!(lists(&state_before), lists(&state_after));
    stop(d);
}

#[test]
fn a_mass_removal_is_refused_and_hand_deletions_are_repaired() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());

    // The API suddenly drops most entries: refused, logged, nothing removed.
    env.mock.set_list(5, strings(&["198.51.100.7"]));
    env.mock.set_list(6, strings(&[]));
    let n = env.syncs();
    signal(&d, libc::SIGUSR1);
    env.wait_syncs(n, Duration::from_secs(3));
    assert!(env.log().contains("refusing to remove"), "{}", env.log());
    assert_eq!(env.kernel(), full_list());

    // Back to normal; now someone deletes an element and adds a stray one by hand: put back
    // from memory at once (issue 17), no signal needed.
    env.mock.set_list(5, strings(LIST5));
    env.mock.set_list(6, strings(LIST6));
    netns::nft_script(
        "delete element inet allowsync allow_v4 { 198.51.100.7 }\nadd element inet allowsync allow_v4 { 10.66.0.0/16 }\n",
    );
    env.wait_kernel(&full_list(), Duration::from_secs(10));
    let repaired = || {
        env.log()
            .lines()
            .any(|l| l.contains("repaired allowsync's objects") && l.contains("restored=1 removed=1"))
    };
    assert!(wait_until(Duration::from_secs(10), repaired), "{}", env.log());

    // The whole table deleted by hand is created and filled again.
    netns::run("nft", &["delete", "table", "inet", "allowsync"]);
    env.wait_kernel(&full_list(), Duration::from_secs(10));
    stop(d);
}

#[test]
fn kill_9_then_restart_converges_and_a_second_instance_refuses() {
    let Some(env) = setup() else { return };
    let mut d = env.start(&full_list());

    // A second instance on the same state refuses, naming the first.
    let out = Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .args(["-c", env.cfg.to_str().unwrap(), "run"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {}", d.id())), "{err}");

    d.kill().unwrap();
    d.wait().unwrap();
    assert_eq!(env.kernel(), full_list(), "kill -9 leaves the set");
    env.mock.set_list(5, strings(&["203.0.113.0/24", "198.51.100.7", "198.51.100.9", "198.51.100.11"]));
    let d = env.spawn();
    env.wait_kernel(
        &set([
            "203.0.113.0/24",
            "198.51.100.7",
            "198.51.100.9",
            "198.51.100.11",
            "192.0.2.0/24",
            "2001:db8:6::/48",
        ]),
        Duration::from_secs(10),
    );
    stop(d);
}

#[test]
fn status_reports_the_last_sync_and_drift() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    let t = Duration::from_secs(10);
    let o = env.command(&["status", "--json"], t);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["drift"], false);
    assert_eq!(v["kernel_entries"]["v4"], 4);
    assert_eq!(v["kernel_entries"]["v6"], 1);
    assert!(v["last_sync"].as_u64().is_some());
    // With the daemon stopped (running, it would put the element back at once).
    stop(d);
    netns::run("nft", &["delete", "element", "inet", "allowsync", "allow_v6", "{ 2001:db8:6::/48 }"]);
    let o = env.command(&["status"], t);
    assert_eq!(o.code, Some(4), "not running comes first");
    let text = &o.stdout;
    assert!(text.contains("DRIFT") && text.contains("daemon:       NOT RUNNING"), "{text}");
    let state = env.state();
    assert!(!state.is_empty() && !state.contains(KEY) && !text.contains(KEY));
}

#[test]
fn teardown_refuses_while_the_daemon_runs_and_names_its_pid() {
    let Some(env) = setup() else { return };
    let d = env.start(&full_list());
    let t = Duration::from_secs(10);
    let o = env.command(&["teardown"], t);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert!(
        o.stderr.contains(&format!("another allowsync (pid {}) already manages this state", d.id())),
        "{}",
        o.stderr
    );
    assert_eq!(env.kernel(), full_list(), "the table and sets stay");
    stop(d);
    let o = env.command(&["teardown"], t);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert!(
        allowsync_testkit::daemon::backend().read().unwrap_err().is_missing(),
        "teardown removed the table"
    );
}

#[test]
fn status_says_a_missing_table_or_set_is_missing() {
    let Some(env) = setup() else { return };
    let t = Duration::from_secs(10);
    let o = env.command(&["status"], t);
    assert_eq!(o.code, Some(4), "{}", output(&o));
    let want = "kernel:       cannot read: table inet allowsync does not exist (allowsync creates it at its next sync)\n";
    assert!(o.stdout.ends_with(want), "{}", output(&o));
    let o = env.once(t);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    netns::run("nft", &["delete", "set", "inet", "allowsync", "allow_v6"]);
    let o = env.command(&["status", "--json"], t);
    assert_eq!(o.code, Some(4), "{}", output(&o));
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["health"], "not running");
    assert_eq!(
        v["kernel_error"],
        "set inet allowsync allow_v6 does not exist (allowsync creates it at its next sync)"
    );
}

fn output(f: &allowsync_testkit::daemon::Finished) -> String {
    format!("{}{}", f.stdout, f.stderr)
}

#[test]
fn once_and_plan_exit_codes_and_plan_changes_nothing() {
    let Some(env) = setup() else { return };
    let t = Duration::from_secs(20);
    // plan on a fresh host: everything would be added, nothing is created.
    let o = env.command(&["plan"], t);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert!(output(&o).contains("+ 203.0.113.0/24"), "{}", output(&o));
    assert!(allowsync_testkit::daemon::backend().read().is_err(), "plan must not create the set");
    assert!(env.state().is_empty(), "plan must not write the state file");

    let o = env.once(t);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), full_list());

    // A mass removal: plan says REFUSED (exit 3) and changes nothing, not even the state file.
    env.mock.set_list(5, strings(&["198.51.100.7"]));
    env.mock.set_list(6, strings(&[]));
    let state = env.state();
    let o = env.command(&["plan"], t);
    assert_eq!(o.code, Some(3), "{}", output(&o));
    assert!(output(&o).contains("verdict: REFUSED: refusing to remove 4 of 5 entries"), "{}", output(&o));
    assert_eq!(env.state(), state);
    // once refuses too, exit 3, set unchanged; --force applies.
    let o = env.once(t);
    assert_eq!(o.code, Some(3), "{}", output(&o));
    assert_eq!(env.kernel(), full_list());
    let o = env.command(&["once", "--force"], t);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), set(["198.51.100.7"]));

    // A failing source: exit 1, its last good list stays applied.
    env.mock.inject(Fault::Status(502));
    let o = env.once(t);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert!(output(&o).contains("kept last good"), "{}", output(&o));
    assert_eq!(env.kernel(), set(["198.51.100.7"]));
}
