//! `allowsync run`: the long-running service.
//!
//! Start: load the configuration, take the lock, load the state, create the kernel objects and
//! restore the last good allowlist *before any fetch*, run the first sync, tell systemd
//! `READY=1`. Then one cycle per `interval` (plus a random share of `jitter`), with backoff by
//! error class:
//!
//! | what failed | next attempt |
//! |---|---|
//! | rate limited, transient, network, bad response, the kernel | 5 s, doubling up to `interval` |
//! | configuration (wrong key, not an admin, …) | `interval`, logged as an error every time |
//! | locked (70050) | at least 60 s |
//!
//! Signals: SIGHUP reloads the configuration (a broken one is logged and the old one kept),
//! SIGUSR1 syncs now, SIGTERM/SIGINT stop at once (a fetch is abandoned; a kernel transaction
//! under way is finished and recorded first). Nothing is flushed on the way out: the sets
//! and rules stay as they are, enforcing the last good allowlist.

use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::clock;
use crate::config::Config;
use crate::engine::Outcome;
use crate::source::ErrorClass;
use crate::syncer::{CycleReport, Syncer, SyncerError};

/// First retry delay after a retryable failure.
const BACKOFF_START: Duration = Duration::from_secs(5);
/// The API locks an account for about a minute after too many failed logins (70050).
const LOCKED_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Syncer(#[from] SyncerError),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
}

/// When to run the next cycle, given how the last one went.
#[derive(Debug, Clone)]
struct Schedule {
    interval: Duration,
    jitter: Duration,
    backoff: Option<Duration>,
}

impl Schedule {
    fn new(interval: Duration, jitter: Duration) -> Self {
        Schedule { interval, jitter, backoff: None }
    }

    /// The delay before the next cycle after `report`. Jitter only applies to the normal
    /// interval: a backoff is already spread out by the failures that cause it.
    fn next(&mut self, report: &CycleReport, random: f64) -> Duration {
        let retryable = |c: ErrorClass| {
            matches!(
                c,
                ErrorClass::RateLimited
                    | ErrorClass::Transient
                    | ErrorClass::Network
                    | ErrorClass::InvalidResponse
                    | ErrorClass::UsersigExpired
            )
        };
        let class = report.worst_error_class();
        let failed = report.outcome.is_err() || class.is_some_and(retryable);
        if class == Some(ErrorClass::Locked) {
            self.backoff = None;
            return LOCKED_WAIT.max(self.normal(random).min(LOCKED_WAIT * 2));
        }
        if failed && class != Some(ErrorClass::Configuration) {
            let next = match self.backoff {
                None => BACKOFF_START,
                Some(b) => (b * 2).min(self.interval),
            };
            self.backoff = Some(next);
            return next.min(self.interval);
        }
        self.backoff = None;
        self.normal(random)
    }

    fn normal(&self, random: f64) -> Duration {
        self.interval + self.jitter.mul_f64(random.clamp(0.0, 1.0))
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// `STATUS=`: what the kernel holds after the cycle (read back, not the state file's last
/// applied list: the two differ whenever an apply failed or someone changed the set), when the
/// last sync succeeded, and whether this cycle failed, was refused or lost a source.
fn status_line(s: &Syncer, report: &CycleReport) -> String {
    let names = match &s.config().backend {
        crate::config::BackendConfig::Nftables(n) => (n.set_v4.clone(), n.set_v6.clone()),
        crate::config::BackendConfig::Ipset(i) => (i.set_v4.clone(), i.set_v6.clone()),
        crate::config::BackendConfig::DryRun => ("v4".into(), "v6".into()),
    };
    let held = match report.kernel {
        Some((v4, v6)) => format!("{} {v4}, {} {v6}", names.0, names.1),
        None => format!("{} and {} unreadable", names.0, names.1),
    };
    let last = s.state().last_sync.map_or("never".into(), |t| clock::rfc3339(t)[11..19].to_string());
    let cycle = match &report.outcome {
        Err(_) => ", last cycle failed (see the journal)",
        Ok(Outcome::Refused(_)) => ", last cycle refused by a safety guard",
        Ok(_) if report.worst_error_class().is_some() => ", a source failed (see the journal)",
        Ok(_) => "",
    };
    format!("{held}, last sync {last}{cycle}")
}

/// Runs the daemon until SIGTERM or SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(config_path: &Path, cfg: Config) -> Result<(), DaemonError> {
    // The handlers come first: a SIGTERM during start-up is then a clean stop (exit 0, sets in
    // place) rather than the default action, and "allowsync starting" (logged after them) tells
    // a supervisor or a test that signals are handled from now on.
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;

    let mut syncer = Syncer::new(cfg, true)?;
    info!(config = %config_path.display(), pid = std::process::id(), "allowsync starting");

    match syncer.restore().await {
        Ok(_) => {}
        Err(e) => {
            error!(error = %e, "cannot restore the last good allowlist; will retry with the first sync")
        }
    }

    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    let mut schedule = Schedule::new(syncer.config().interval, syncer.config().jitter);
    let mut ready = false;

    loop {
        // Cancelling the fetch (on SIGTERM) changes nothing. The rest of the cycle (kernel
        // transaction, state file) runs on the blocking pool and is never cut short: a signal
        // arriving meanwhile waits in its stream until the next select, milliseconds later.
        let fetches = tokio::select! {
            f = syncer.fetch() => f,
            _ = term.recv() => { info!("SIGTERM during a fetch: stopping; the sets stay in place"); return stop(); }
            _ = int.recv() => { info!("SIGINT during a fetch: stopping; the sets stay in place"); return stop(); }
        };
        let report = syncer.finish(fetches, false).await;
        let delay = schedule.next(&report, rand::random());
        if !matches!(report.outcome, Ok(Outcome::InSync | Outcome::Applied { .. })) {
            warn!(retry_in_s = delay.as_secs(), "next attempt scheduled");
        } else if report.worst_error_class().is_some() {
            warn!(retry_in_s = delay.as_secs(), "a source failed: backing off");
        }
        let status = status_line(&syncer, &report);
        if ready {
            notify(&[NotifyState::Status(&status)]);
        } else {
            ready = true;
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }

        // Wait for the next cycle, or a signal that brings it forward.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = usr1.recv() => { info!("SIGUSR1: syncing now"); break; }
                _ = hup.recv() => {
                    if reload(&mut syncer, config_path) {
                        schedule = Schedule::new(syncer.config().interval, syncer.config().jitter);
                        break;
                    }
                }
                _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
                _ = term.recv() => { info!("SIGTERM: stopping; the sets stay in place"); return stop(); }
                _ = int.recv() => { info!("SIGINT: stopping; the sets stay in place"); return stop(); }
            }
        }
    }
}

/// SIGHUP: re-reads the configuration. A broken one is logged and the old one kept. True when
/// the new one is in use (the caller then syncs at once).
fn reload(syncer: &mut Syncer, config_path: &Path) -> bool {
    let mut reloading = vec![NotifyState::Reloading];
    reloading.extend(NotifyState::monotonic_usec_now().ok());
    notify(&reloading);
    let ok = match Config::load(config_path) {
        Ok(new) => {
            for w in &new.warnings {
                warn!("{w}");
            }
            match syncer.reload(new) {
                Ok(()) => {
                    info!("SIGHUP: configuration reloaded; syncing now");
                    true
                }
                Err(e) => {
                    error!(error = %e, "SIGHUP: the new configuration cannot be used; keeping the old one");
                    false
                }
            }
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the old one");
            false
        }
    };
    notify(&[NotifyState::Ready]);
    ok
}

fn stop() -> Result<(), DaemonError> {
    notify(&[NotifyState::Stopping]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SourceReport;
    use crate::engine::{Refusal, SourceStatus};

    fn report(outcome: Result<Outcome, String>, class: Option<ErrorClass>) -> CycleReport {
        CycleReport {
            outcome,
            sources: vec![SourceReport {
                name: "chat".into(),
                status: match class {
                    None => SourceStatus::Fresh { ranges: 1 },
                    Some(_) => SourceStatus::Missing { reason: "x".into() },
                },
                error_class: class,
                skipped: 0,
            }],
            v4: 1,
            v6: 0,
            duration_ms: 1,
            kernel: Some((1, 0)),
            drift: None,
        }
    }

    #[test]
    fn backoff_doubles_from_5s_up_to_the_interval_and_resets() {
        let mut s = Schedule::new(Duration::from_secs(60), Duration::from_secs(10));
        let fail = report(Ok(Outcome::InSync), Some(ErrorClass::Network));
        let got: Vec<u64> = (0..6).map(|_| s.next(&fail, 0.5).as_secs()).collect();
        assert_eq!(got, [5, 10, 20, 40, 60, 60]);
        assert_eq!(s.next(&report(Ok(Outcome::InSync), None), 0.5), Duration::from_secs(65));
        assert_eq!(s.next(&fail, 0.0).as_secs(), 5, "reset after a success");
        let kernel = report(Err("netlink".into()), None);
        assert_eq!(s.next(&kernel, 0.0).as_secs(), 10);
    }

    #[test]
    fn configuration_errors_wait_the_normal_interval_and_locked_a_minute() {
        let mut s = Schedule::new(Duration::from_secs(20), Duration::ZERO);
        assert_eq!(s.next(&report(Ok(Outcome::InSync), Some(ErrorClass::Configuration)), 0.0).as_secs(), 20);
        assert_eq!(s.next(&report(Ok(Outcome::InSync), Some(ErrorClass::Locked)), 0.0).as_secs(), 60);
        let refused = report(Ok(Outcome::Refused(Refusal::Empty { current: 3 })), None);
        assert_eq!(s.next(&refused, 0.0).as_secs(), 20, "a refusal is retried next cycle");
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        for _ in 0..100 {
            let r: f64 = rand::random();
            assert!((0.0..1.0).contains(&r));
        }
        let mut s = Schedule::new(Duration::from_secs(10), Duration::from_secs(4));
        assert_eq!(s.next(&report(Ok(Outcome::InSync), None), 0.999_999).as_secs(), 13);
    }
}
