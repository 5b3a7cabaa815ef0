//! The `allowsync` binary: parses the command line and hands each command to the library.
//! Errors become messages and exit codes here, and only here.

use std::process::ExitCode;

use allowsync::cli::{Cli, Command};
use allowsync::config::Config;
use allowsync::exit;
use allowsync::source::{self, Sources};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::CheckConfig => check_config(&cli),
        Command::Fetch => fetch(&cli),
        Command::Usersig { ref source } => usersig(&cli, source),
        Command::Run | Command::Once { .. } | Command::Plan | Command::Status { .. } | Command::Teardown => {
            eprintln!("allowsync: not implemented yet");
            exit::FAILURE
        }
    };
    ExitCode::from(code as u8)
}

/// Minimal stderr logging (RUST_LOG, default info) until the daemon's own logging exists.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn load(cli: &Cli) -> Result<Config, i32> {
    let cfg = Config::load(&cli.config).map_err(|e| {
        eprintln!("allowsync: {e}");
        exit::USAGE
    })?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

/// `allowsync fetch`: every source's normalized list; no firewall is touched.
fn fetch(cli: &Cli) -> i32 {
    init_logging();
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let run = || -> anyhow::Result<i32> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let sources = Sources::new(&cfg)?;
        let fetched = rt.block_on(sources.fetch_all());
        print!("{}", source::render_fetched(&fetched));
        Ok(if fetched.iter().all(|f| f.result.is_ok()) { exit::OK } else { exit::FAILURE })
    };
    run().unwrap_or_else(|e| {
        eprintln!("allowsync: {e:#}");
        exit::FAILURE
    })
}

/// `allowsync usersig --source NAME`: a fresh usersig and its expiry.
fn usersig(cli: &Cli, name: &str) -> i32 {
    init_logging();
    let cfg = match load(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match source::mint_usersig(&cfg, name, allowsync::usersig::unix_now()) {
        Ok(m) => {
            print!("{}", source::render_usersig(&m));
            exit::OK
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            exit::USAGE
        }
    }
}

fn check_config(cli: &Cli) -> i32 {
    match Config::load(&cli.config) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", cfg.summary());
            exit::OK
        }
        Err(e) => {
            eprintln!("allowsync: {e}");
            exit::USAGE
        }
    }
}
