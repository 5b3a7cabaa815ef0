//! The commands, as the binary runs them (this file belongs to the binary, not the library):
//! each loads what it needs, calls into the library and turns the result into output on stdout,
//! messages on stderr and an exit code (see [`allowsync::exit`]).

use std::fmt::Write as _;

use allowsync::backend;
use allowsync::cli::{Cli, Command};
use allowsync::config::Config;
use allowsync::engine::{SourceStatus, Verdict};
use allowsync::exit;
use allowsync::prefixes::{Delta, Range};
use allowsync::source::{self, Sources};
use allowsync::state::{self, StateFile};
use allowsync::syncer::{self, Syncer};

pub fn dispatch(cli: &Cli) -> i32 {
    let result = match &cli.command {
        Command::CheckConfig => check_config(cli),
        Command::Once { force } => once(cli, *force),
        Command::Plan => plan(cli),
        Command::Status { json } => status(cli, *json),
        Command::Teardown => teardown(cli),
        Command::Run => run(cli),
        Command::Fetch => fetch(cli),
        Command::Usersig { source } => usersig(cli, source),
    };
    result.unwrap_or_else(|e| {
        eprintln!("allowsync: {e:#}");
        exit::FAILURE
    })
}

/// Loads the configuration and starts logging; a bad configuration is exit 2.
fn load(cli: &Cli) -> Result<Config, i32> {
    match Config::load(&cli.config) {
        Ok(cfg) => {
            if let Some(w) = allowsync::logging::init(&cfg.log) {
                tracing::warn!("{w}");
            }
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            Ok(cfg)
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            Err(exit::USAGE)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn check_config(cli: &Cli) -> anyhow::Result<i32> {
    match Config::load(&cli.config) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", cfg.summary());
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            Ok(exit::USAGE)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    runtime()?.block_on(allowsync::daemon::run(&cli.config, cfg))?;
    Ok(exit::OK)
}

/// `allowsync fetch`: every source's normalized list; no firewall is touched.
fn fetch(cli: &Cli) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let sources = Sources::new(&cfg)?;
    let fetched = runtime()?.block_on(sources.fetch_all());
    print!("{}", source::render_fetched(&fetched));
    Ok(if fetched.iter().all(|f| f.result.is_ok()) { exit::OK } else { exit::FAILURE })
}

/// `allowsync usersig --source NAME`: a fresh usersig and its expiry.
fn usersig(cli: &Cli, name: &str) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match source::mint_usersig(&cfg, name, allowsync::clock::now_unix()) {
        Ok(m) => {
            print!("{}", source::render_usersig(&m));
            Ok(exit::OK)
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            Ok(exit::USAGE)
        }
    }
}

fn once(cli: &Cli, force: bool) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut syncer = Syncer::new(cfg, true)?;
    let report = runtime()?.block_on(syncer.cycle(force));
    Ok(report.exit_code())
}

fn plan(cli: &Cli) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut syncer = Syncer::new(cfg, false)?;
    let (desired, plan) = runtime()?.block_on(syncer.plan())?;
    let mut out = String::new();
    for s in &desired.sources {
        writeln!(out, "source {s}")?;
    }
    family(&mut out, "ipv4", &plan.diff.v4)?;
    family(&mut out, "ipv6", &plan.diff.v6)?;
    let safety = &syncer.config().safety;
    writeln!(
        out,
        "widening: +{} IPv4 addresses (max_added_addresses_v4 {}), +{} IPv6 /64 networks (max_added_addresses_v6 {})",
        plan.widening.v4_addresses,
        safety.max_added_addresses_v4,
        plan.widening.v6_nets,
        safety.max_added_addresses_v6
    )?;
    // As `once` would exit: 3 refused, else 1 when a source failed, else 0.
    let source_failed = desired.sources.iter().any(|s| !matches!(s.status, SourceStatus::Fresh { .. }));
    let ok = if source_failed { exit::FAILURE } else { exit::OK };
    let code = match &plan.verdict {
        Verdict::InSync => {
            writeln!(out, "verdict: in sync, nothing to do")?;
            ok
        }
        Verdict::Apply => {
            writeln!(
                out,
                "verdict: would apply {} additions and {} removals",
                plan.diff.added(),
                plan.diff.removed()
            )?;
            ok
        }
        Verdict::Refused(r) => {
            writeln!(out, "verdict: REFUSED: {r}")?;
            exit::REFUSED
        }
    };
    print!("{out}");
    Ok(code)
}

fn family<A: allowsync::prefixes::Addr>(out: &mut String, name: &str, d: &Delta<A>) -> std::fmt::Result {
    if d.is_empty() {
        return writeln!(out, "{name}: no change");
    }
    writeln!(out, "{name}: +{} -{}", d.add.len(), d.remove.len())?;
    let line = |out: &mut String, sign: char, r: &Range<A>| writeln!(out, "  {sign} {r}");
    for r in &d.remove {
        line(out, '-', r)?;
    }
    for r in &d.add {
        line(out, '+', r)?;
    }
    Ok(())
}

fn status(cli: &Cli, json: bool) -> anyhow::Result<i32> {
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("allowsync: {e}");
            return Ok(exit::USAGE);
        }
    };
    let file = StateFile::new(&cfg.state_file);
    let st = file.peek();
    let kernel = backend::from_config(&cfg.backend).and_then(|mut b| b.read());
    let applied = st.as_ref().ok().and_then(|s| s.as_ref()).and_then(|s| s.applied.clone());
    let drift = match (&kernel, &applied) {
        (Ok(k), Some(a)) => Some(k != a),
        _ => None,
    };
    let s = st.as_ref().ok().and_then(|s| s.as_ref());
    if json {
        let v = serde_json::json!({
            "state_file": cfg.state_file,
            "state_error": st.as_ref().err(),
            "last_sync": s.and_then(|s| s.last_sync),
            "last_error": s.and_then(|s| s.last_error.as_ref()).map(|e| serde_json::json!({"at": e.at, "message": e.message})),
            "state_entries": applied.as_ref().map(|a| serde_json::json!({"v4": a.v4.len(), "v6": a.v6.len()})),
            "kernel_entries": kernel.as_ref().ok().map(|k| serde_json::json!({"v4": k.v4.len(), "v6": k.v6.len()})),
            "kernel_error": kernel.as_ref().err().map(ToString::to_string),
            "drift": drift,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let mut out = String::new();
        writeln!(out, "state file:   {}", cfg.state_file.display())?;
        match &st {
            Err(e) => writeln!(out, "              UNREADABLE: {e}")?,
            Ok(None) => writeln!(out, "              none yet (never synced)")?,
            Ok(Some(_)) => {}
        }
        let when = s.and_then(|s| s.last_sync).map_or("never".to_string(), state::fmt_time);
        writeln!(out, "last sync:    {when}")?;
        match s.and_then(|s| s.last_error.as_ref()) {
            Some(e) => writeln!(out, "last error:   {} at {}", e.message, state::fmt_time(e.at))?,
            None => writeln!(out, "last error:   none")?,
        }
        if let Some(a) = &applied {
            writeln!(out, "applied:      {} IPv4 ranges, {} IPv6 ranges", a.v4.len(), a.v6.len())?;
        }
        match (&kernel, drift) {
            (Ok(k), Some(false)) => writeln!(
                out,
                "kernel:       {} IPv4, {} IPv6 ranges: matches the state file",
                k.v4.len(),
                k.v6.len()
            )?,
            (Ok(k), Some(true)) => writeln!(
                out,
                "kernel:       {} IPv4, {} IPv6 ranges: DRIFT, differs from the state file (the next sync repairs it)",
                k.v4.len(),
                k.v6.len()
            )?,
            (Ok(k), None) => writeln!(out, "kernel:       {} IPv4, {} IPv6 ranges", k.v4.len(), k.v6.len())?,
            (Err(e), _) => writeln!(out, "kernel:       cannot read: {e}")?,
        }
        print!("{out}");
    }
    Ok(if drift == Some(true) || kernel.is_err() || st.is_err() { exit::FAILURE } else { exit::OK })
}

fn teardown(cli: &Cli) -> anyhow::Result<i32> {
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // The lock `run` and `once` hold: a running daemon would recreate everything at its next
    // cycle. Held, it is an error naming the holder's pid (exit 1).
    let _lock = syncer::lock_state(&cfg.state_file)?;
    let mut b = backend::from_config(&cfg.backend)?;
    b.teardown()?;
    println!("removed what allowsync created for backend {}", cfg.backend.kind());
    Ok(exit::OK)
}
