//! `allowsync status [--json]`: is the allowlist healthy? Whether the daemon runs (the state
//! lock's holder), the last attempt and the last success with their ages, the next poll, each
//! source's result and the age of its list, the last error, the kernel against the desired set
//! and drift. Read from the state file and the kernel, so it works with the daemon stopped.
//!
//! Exit codes, for monitoring (Nagios-style, README "status"): 0 healthy, 1 degraded ([`judge`]
//! found a reason, drift, or the kernel or the state file cannot be read), 2 configuration
//! error, 4 not running (no live process holds the state lock).

use std::fmt::Write as _;
use std::time::Duration;

use allowsync::backend;
use allowsync::cli::Cli;
use allowsync::clock;
use allowsync::config::Config;
use allowsync::health::{self, Counts, Health, judge};
use allowsync::state::StateFile;
use serde_json::{Value, json};

use super::{CmdResult, Failure, exit, exit_with};

/// The version of `status --json`'s schema: raised only when a field changes meaning or goes.
const SCHEMA: u32 = 1;

pub fn run(cli: &Cli, json: bool) -> CmdResult {
    // No logging: status speaks on stdout only.
    let cfg = Config::load(&cli.config).map_err(Failure::usage)?;
    let now = clock::now_unix();
    let file = StateFile::new(&cfg.state_file);
    let st = file.peek();
    let holder = health::lock_holder(&file.lock_path());
    let running = holder.running();
    let kernel = backend::from_config(&cfg.backend).and_then(|mut b| b.read());
    let s = st.as_ref().ok().and_then(|s| s.as_ref());
    let applied = s.and_then(|s| s.applied.clone());
    let drift = match (&kernel, &applied) {
        (Ok(k), Some(a)) => Some(k != a),
        _ => None,
    };
    let mut h = s.map(|s| s.health.clone()).unwrap_or_default();
    // The kernel as it is now, not as the last cycle left it.
    if let Ok(k) = &kernel {
        h.kernel = Some(Counts::of(k));
    }
    let mut reasons = judge(&h, cfg.interval, now);
    if drift == Some(true) {
        reasons.push("drift: the kernel differs from what allowsync last applied".into());
    }
    if let Err(e) = &kernel {
        reasons.push(format!("cannot read the kernel set: {e}"));
    }
    if let Err(e) = &st {
        reasons.push(format!("cannot read the state file: {e}"));
    }
    // Not knowing whether it runs is no proof that it does not.
    if let Some(e) = &holder.unknown {
        reasons.push(e.clone());
    }
    let (verdict, code) = match (running || holder.unknown.is_some(), reasons.is_empty()) {
        (false, _) => ("not running", exit::NOT_RUNNING),
        (true, true) => ("healthy", 0),
        (true, false) => ("degraded", exit::FAILURE),
    };
    let next_poll = next_poll(&h, running, cfg.interval + cfg.jitter);
    let summary = health::summary(&h, cfg.interval, now);
    let since = |t: u64| now.saturating_sub(t);

    if json {
        let at = |t: Option<u64>| t.map(|t| json!({"at": t, "age_s": since(t)}));
        let counts = |c: Option<Counts>| c.map(|c| json!({"v4": c.v4, "v6": c.v6}));
        let sources: Vec<Value> = h
            .sources
            .iter()
            .map(|(name, x)| {
                json!({
                    "name": name,
                    "result": x.result,
                    "on_last_good": x.on_last_good,
                    "list_age_s": x.list_fetched_at.map(since),
                    "last_success": at(x.last_success),
                })
            })
            .collect();
        let v = json!({
            "schema": SCHEMA,
            "health": verdict,
            "exit_code": code,
            "reasons": reasons,
            "summary": summary,
            "daemon": {"running": running, "pid": holder.pid(), "pid_alive": holder.pid().map(health::alive)},
            "interval_s": cfg.interval.as_secs(),
            "last_attempt": at(h.last_attempt).map(|mut a| { a["outcome"] = json!(h.last_outcome); a }),
            "last_success": at(h.last_success),
            "next_poll_by": next_poll,
            "sources": sources,
            "last_error": s.and_then(|s| s.last_error.as_ref()).map(|e| json!({"at": e.at, "age_s": since(e.at), "message": e.message})),
            "prefixes": {"kernel": counts(h.kernel), "desired": counts(h.desired)},
            "drift": drift,
            "state_file": cfg.state_file,
            "state_error": st.as_ref().err(),
            "last_sync": s.and_then(|s| s.last_sync),
            "state_entries": applied.as_ref().map(|a| json!({"v4": a.v4.len(), "v6": a.v6.len()})),
            "kernel_entries": kernel.as_ref().ok().map(|k| json!({"v4": k.v4.len(), "v6": k.v6.len()})),
            "kernel_error": kernel.as_ref().err().map(ToString::to_string),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", text(&Text { cfg: &cfg, h: &h, st: &st, holder: &holder, now, next_poll })?);
        let mut out = String::new();
        writeln!(out, "health:       {verdict}: {summary}")?;
        for r in &reasons {
            writeln!(out, "              - {r}")?;
        }
        let ranges = |v4: usize, v6: usize| format!("{v4} IPv4, {v6} IPv6 ranges");
        if let Some(a) = &applied {
            writeln!(out, "applied:      {}", ranges(a.v4.len(), a.v6.len()))?;
        }
        match (&kernel, drift) {
            (Ok(k), Some(false)) => {
                writeln!(out, "kernel:       {}: matches the state file", ranges(k.v4.len(), k.v6.len()))?
            }
            (Ok(k), Some(true)) => writeln!(
                out,
                "kernel:       {}: DRIFT, differs from the state file (the next sync repairs it)",
                ranges(k.v4.len(), k.v6.len())
            )?,
            (Ok(k), None) => writeln!(out, "kernel:       {}", ranges(k.v4.len(), k.v6.len()))?,
            (Err(e), _) => writeln!(out, "kernel:       cannot read: {e}")?,
        }
        print!("{out}");
    }
    exit_with(code)
}

/// The latest the daemon polls next: the last attempt plus interval and jitter (a backoff after
/// a failure is shorter; a locked account's wait is at least a minute). `None` when no daemon
/// runs or it has not synced yet.
fn next_poll(h: &Health, running: bool, longest: Duration) -> Option<u64> {
    let last = h.last_attempt.filter(|_| running)?;
    let longest = if h.sources.values().any(|s| s.result == "locked") {
        longest.max(Duration::from_secs(120))
    } else {
        longest
    };
    Some(last + longest.as_secs())
}

struct Text<'a> {
    cfg: &'a Config,
    h: &'a Health,
    st: &'a Result<Option<allowsync::state::State>, String>,
    holder: &'a health::LockHolder,
    now: u64,
    next_poll: Option<u64>,
}

/// The text form, above the health line.
fn text(t: &Text<'_>) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    let when = |x: Option<u64>| match x {
        Some(x) => format!("{} ({} ago)", clock::rfc3339(x), health::age(t.now.saturating_sub(x))),
        None => "never".into(),
    };
    let daemon = match (t.holder.running(), t.holder.pid()) {
        (true, Some(pid)) => format!("running (pid {pid})"),
        (false, Some(pid)) => format!(
            "NOT RUNNING (last pid {pid}, {})",
            if health::alive(pid) { "alive but not holding the lock" } else { "gone" }
        ),
        (_, None) if t.holder.unknown.is_some() => "UNKNOWN (see below)".into(),
        (_, None) => "NOT RUNNING".into(),
    };
    writeln!(out, "daemon:       {daemon}")?;
    writeln!(out, "state file:   {}", t.cfg.state_file.display())?;
    match t.st {
        Err(e) => writeln!(out, "              UNREADABLE: {e}")?,
        Ok(None) => writeln!(out, "              none yet (never synced)")?,
        Ok(Some(_)) => {}
    }
    let outcome = t.h.last_outcome.as_deref().map_or(String::new(), |o| format!(", {o}"));
    writeln!(out, "last attempt: {}{outcome}", when(t.h.last_attempt))?;
    writeln!(out, "last success: {} (every source fresh, kernel = desired)", when(t.h.last_success))?;
    match t.next_poll {
        Some(n) => writeln!(out, "next poll:    by {}", clock::rfc3339(n))?,
        None => writeln!(out, "next poll:    none (no daemon running, or no sync yet)")?,
    }
    for (name, s) in &t.h.sources {
        let list = match s.list_fetched_at {
            Some(at) => format!("list {} old", health::age(t.now.saturating_sub(at))),
            None => "no list".into(),
        };
        let good = if s.on_last_good { ", ON ITS LAST GOOD LIST" } else { "" };
        writeln!(out, "source {name}: {}, {list}{good}, last success {}", s.result, when(s.last_success))?;
    }
    match t.st.as_ref().ok().and_then(|s| s.as_ref()).and_then(|s| s.last_error.as_ref()) {
        Some(e) => writeln!(
            out,
            "last error:   {} ({} ago): {}",
            clock::rfc3339(e.at),
            health::age(t.now.saturating_sub(e.at)),
            e.message
        )?,
        None => writeln!(out, "last error:   none")?,
    }
    if let Some(d) = t.h.desired {
        writeln!(out, "desired:      {} IPv4, {} IPv6 prefixes", d.v4, d.v6)?;
    }
    Ok(out)
}
