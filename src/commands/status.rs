//! `allowsync status [--json]`: the last sync, the last error, the set sizes and whether the
//! kernel drifted from the state file. Works whether the daemon runs or not; exit 1 on drift or
//! when the kernel or the state file cannot be read.

use std::fmt::Write as _;

use allowsync::backend;
use allowsync::cli::Cli;
use allowsync::clock;
use allowsync::config::Config;
use allowsync::state::StateFile;

use super::{CmdResult, Failure, exit, exit_with};

pub fn run(cli: &Cli, json: bool) -> CmdResult {
    // No logging: status speaks on stdout only.
    let cfg = Config::load(&cli.config).map_err(Failure::usage)?;
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
        let when = s.and_then(|s| s.last_sync).map_or("never".to_string(), clock::rfc3339);
        writeln!(out, "last sync:    {when}")?;
        match s.and_then(|s| s.last_error.as_ref()) {
            Some(e) => writeln!(out, "last error:   {} at {}", e.message, clock::rfc3339(e.at))?,
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
    exit_with(if drift == Some(true) || kernel.is_err() || st.is_err() { exit::FAILURE } else { 0 })
}
