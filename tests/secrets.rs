//! Secrets: the app's secret key, every usersig the daemon sent and each one's `TLS.sig` (from
//! which a usersig can be rebuilt) never appear in the logs (text, json, and journald, which
//! falls back to text without a journal socket), the output of `status` (text and `--json`),
//! `check-config`, `fetch` or `once`, any error message, or the state file; and the state file
//! is mode 0600.
//!
//! The daemon is put through the paths that build messages from outside text: network errors
//! and timeouts (whose library messages hold the request URL, with the usersig in it), a
//! rejected usersig re-minted, HTTP errors, garbage, and a server whose `ErrorInfo` echoes the
//! usersig, its `TLS.sig` and the key (once padded so that the parser's 200-character cut lands
//! inside the secret).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use allowsync_testkit::daemon::{Env, Setup, setup_with, signal, stop, strings, wait_until};
use allowsync_testkit::mock::{Fault, MockHandle};

/// Distinctive, and long enough that a match cannot be chance.
const KEY: &str = "K3y-0f-th3-s3cr3ts-t3st-5e1f0c2d9a8b7e6f";
const LIST5: &[&str] = &["203.0.113.0/24", "198.51.100.7"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];

fn echo(m: &MockHandle, code: i64, text: &str) {
    let info = serde_json::to_string(text).unwrap();
    m.inject_times(
        Fault::Body(format!(r#"{{"ActionStatus":"FAIL","ErrorCode":{code},"ErrorInfo":{info}}}"#)),
        2,
    );
}

/// The usersig of the last request and its TLS.sig.
fn last_usersig(m: &MockHandle) -> (String, String) {
    let r = m.requests();
    let sig = r.last().and_then(|r| r.param("usersig")).expect("a request with a usersig").to_owned();
    let tls = allowsync::usersig::decode(&sig).unwrap().sig;
    (sig, tls)
}

/// Drives one configuration through every path; returns every text allowsync produced.
fn exercise(env: &Env) -> Vec<(String, String)> {
    let mut texts = Vec::new();
    let mut push = |what: &str, t: String| texts.push((what.to_owned(), t));
    let out = env.once(Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    push("once stderr", out.stderr);

    let d = env.spawn();
    env.wait_syncs(0, Duration::from_secs(10));
    let mut n = env.syncs();
    let mut cycle = |what: &str, prepare: &dyn Fn(&MockHandle)| {
        prepare(&env.mock);
        signal(&d, libc::SIGUSR1);
        let ok = wait_until(Duration::from_secs(10), || env.syncs() > n);
        assert!(ok, "{what}: no sync; log:\n{}", env.log());
        n = env.syncs();
        env.mock.clear_faults();
    };
    cycle("502", &|m| m.inject_times(Fault::Status(502), 2));
    cycle("hang", &|m| m.inject_times(Fault::Hang, 2));
    cycle("truncated", &|m| m.inject_times(Fault::Truncated, 2));
    cycle("garbage", &|m| m.inject_times(Fault::Garbage, 2));
    cycle("70001 once: re-minted", &|m| m.inject_times(Fault::ErrorCode(70001), 1));
    cycle("70009", &|m| m.inject_times(Fault::ErrorCode(70009), 2));
    // The daemon reuses its usersig: the server can echo the one it will receive.
    cycle("echo", &|m| {
        let (sig, tls) = last_usersig(m);
        echo(m, 70009, &format!("key {KEY} sig {tls} usersig {sig}"));
    });
    cycle("echo cut at 200", &|m| {
        let (sig, _) = last_usersig(m);
        echo(m, 60004, &format!("{} {KEY} {sig}", "x".repeat(180)));
    });
    stop(d);
    push("daemon log", env.log());

    for args in [&["status"][..], &["status", "--json"], &["check-config"], &["plan"]] {
        let out = env.command(args, Duration::from_secs(20));
        push(&format!("{args:?} stdout"), out.stdout);
        push(&format!("{args:?} stderr"), out.stderr);
    }
    env.mock.inject_times(Fault::Status(502), 2);
    let out = env.command(&["fetch"], Duration::from_secs(20));
    push("fetch (502) stdout", out.stdout);
    push("fetch (502) stderr", out.stderr);
    env.mock.clear_faults();
    let out = env.command(&["fetch"], Duration::from_secs(20));
    push("fetch stdout", out.stdout);
    push("fetch stderr", out.stderr);

    push("state file", env.state());
    let mode = std::fs::metadata(env.state_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "state file mode {mode:o}");
    texts
}

fn check_format(format: &str) {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let Some(env) =
        setup_with(Setup { log_format: format, log_level: "debug", ..Setup::new(KEY, lists) }, |_| {})
    else {
        return;
    };
    let texts = exercise(&env);

    let mut secrets = vec![("the secret key".to_owned(), KEY.to_owned())];
    for r in env.mock.requests() {
        let sig = r.param("usersig").unwrap().to_owned();
        let tls = allowsync::usersig::decode(&sig).unwrap().sig;
        secrets.push(("a usersig".into(), sig));
        secrets.push(("a TLS.sig".into(), tls));
    }
    secrets.sort();
    secrets.dedup();
    // Re-minted after the 70001: at least two distinct usersigs were used.
    assert!(secrets.iter().filter(|(k, _)| k == "a usersig").count() >= 2, "{secrets:?}");

    let mut leaks = Vec::new();
    for (what, text) in &texts {
        for (kind, secret) in &secrets {
            // Also a leading part: a secret cut short must not leak either.
            if text.contains(secret.as_str()) || text.contains(&secret[..secret.len().min(24)]) {
                leaks.push(format!("{kind} in the {what}"));
            }
        }
    }
    assert!(leaks.is_empty(), "log.format {format}: {}", leaks.join(", "));

    // The paths were really taken (else the scan proves nothing).
    let log = &texts.iter().find(|(w, _)| w == "daemon log").unwrap().1;
    for needle in ["70009", "70001", "REDACTED", "502", "no complete answer"] {
        assert!(log.contains(needle), "log.format {format}: no {needle:?} in the log:\n{log}");
    }
    match format {
        "json" => assert!(log.lines().all(|l| l.starts_with('{')), "not JSON lines:\n{log}"),
        "journald" => assert!(log.contains("the journal is not reachable"), "no fallback:\n{log}"),
        _ => {}
    }
}

#[test]
fn no_secret_in_text_logs_or_any_output() {
    check_format("text");
}

#[test]
fn no_secret_in_json_logs() {
    check_format("json");
}

#[test]
fn no_secret_in_the_journald_fallback() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        // The logs would go to the journal, out of this test's reach.
        eprintln!("skipping: a journal socket exists here, so journald does not fall back to text");
        return;
    }
    check_format("journald");
}
