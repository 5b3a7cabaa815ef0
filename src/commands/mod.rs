//! The commands, as the binary runs them (this directory belongs to the binary, not the
//! library), one file each: every command loads what it needs, calls into the library and turns
//! the result into output on stdout, messages on stderr and an exit code.
//!
//! A command returns `Ok(())` for exit 0, or a [`Failure`] that carries its exit code ([`exit`])
//! and the message for stderr. Errors of the library become failures with `?`: a configuration
//! error is exit 2 ([`load`]), anything else exit 1.

mod check_config;
mod fetch;
mod once;
mod plan;
mod run;
mod status;
mod teardown;
mod usersig;

use std::fmt::Display;

use allowsync::cli::{Cli, Command};
use allowsync::config::Config;

/// Process exit codes, the same for every command. `status` answers with 0 (healthy), 1
/// (degraded), 2 (configuration error) and 4 (not running).
pub mod exit {
    /// A runtime failure (network, kernel, state file).
    pub const FAILURE: u8 = 1;
    /// Bad usage or an invalid configuration.
    pub const USAGE: u8 = 2;
    /// A safety guard refused the sync (mass removal, mass widening, empty allowlist).
    pub const REFUSED: u8 = 3;
    /// `status`: no live allowsync holds the state lock.
    pub const NOT_RUNNING: u8 = 4;
}

/// How a command ends when it does not succeed.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    /// For stderr; `None` when the command's own output already says why.
    message: Option<String>,
}

impl Failure {
    /// Exit `code`, with nothing more to say.
    pub fn quiet(code: u8) -> Self {
        Failure { code, message: None }
    }

    /// A usage or configuration error: exit 2.
    pub fn usage(e: impl Display) -> Self {
        Failure { code: exit::USAGE, message: Some(e.to_string()) }
    }
}

/// Any other error is a runtime failure (exit 1), printed with its chain of causes.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { code: exit::FAILURE, message: Some(format!("{:#}", e.into())) }
    }
}

/// What a command returns.
pub type CmdResult = Result<(), Failure>;

/// `Ok(())` for exit code 0, a quiet failure for any other.
fn exit_with(code: u8) -> CmdResult {
    if code == 0 { Ok(()) } else { Err(Failure::quiet(code)) }
}

/// Runs the command and returns the process exit code; failures are printed here.
pub fn dispatch(cli: &Cli) -> u8 {
    let outcome = match &cli.command {
        Command::CheckConfig => check_config::run(cli),
        Command::Once { force } => once::run(cli, *force),
        Command::Plan => plan::run(cli),
        Command::Status { json } => status::run(cli, *json),
        Command::Teardown => teardown::run(cli),
        Command::Run => run::run(cli),
        Command::Fetch => fetch::run(cli),
        Command::Usersig { source } => usersig::run(cli, source),
    };
    match outcome {
        Ok(()) => 0,
        Err(Failure { code, message }) => {
            if let Some(m) = message {
                eprintln!("allowsync: {m}");
            }
            code
        }
    }
}

/// Loads the configuration and starts logging (with its warnings logged); a bad configuration
/// is exit 2.
fn load(cli: &Cli) -> Result<Config, Failure> {
    let cfg = Config::load(&cli.config).map_err(Failure::usage)?;
    if let Some(w) = allowsync::logging::init(&cfg.log) {
        tracing::warn!("{w}");
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

/// The runtime of a command that fetches: one thread is plenty.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}
