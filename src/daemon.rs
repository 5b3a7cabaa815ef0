//! `allowsync run`: the long-running service.
//!
//! Start: load the configuration, take the lock, load the state (neither stops it: see
//! [`Syncer::for_daemon`]), create the kernel objects and restore the last good allowlist
//! *before any fetch*, run the first sync, tell systemd `READY=1` (or after [`READY_WAIT`] while
//! that sync still waits for the API). Then one cycle per `interval` (plus a random share of
//! `jitter`), with backoff by error class:
//!
//! | what failed | next attempt |
//! |---|---|
//! | rate limited, transient, network, bad response, the kernel | 5 s, doubling up to `interval` |
//! | configuration (wrong key, not an admin, …) | `interval`, logged as an error every time |
//! | locked (70050) | at least 60 s |
//! | only the state file write | `interval` (the kernel holds the sync; the write is retried) |
//!
//! Between cycles allowsync's objects are watched: nftables notifications, or the ipset
//! backend's check every `check_interval`. What someone else deleted is put back from memory at
//! once ([`crate::repair`]), bursts debounced into one repair, at most
//! [`REPAIRS_PER_SECOND`] per second.
//!
//! The loop owns everything and never waits for work: a fetch is a task, kernel work runs on
//! the blocking pool (one job at a time), so the watchdog, signals and notifications are
//! answered while either is under way. A cycle has a hard deadline ([`cycle_deadline`]): a
//! fetch still running then is abandoned (it changed nothing), a transaction not begun by then
//! is not begun.
//!
//! With `metrics:` configured, every cycle and repair feeds [`crate::metrics`] (served on its own
//! task, written as a textfile from the blocking pool), and `STATUS=` carries the health summary
//! of [`crate::health`].
//!
//! Signals, coalesced ([`crate::coalesce`]): SIGUSR1 asks for a sync (one more if one is under
//! way, not N), SIGHUP for a reload (a broken configuration is logged and the old one kept);
//! at most one cycle per [`CYCLE_SPACING`] and one reload per [`RELOAD_SPACING`].
//! SIGTERM/SIGINT stop at once (a fetch is abandoned; a kernel transaction under way is finished
//! and recorded first). Nothing is flushed on the way out: the sets and rules stay as they are,
//! enforcing the last good allowlist.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::backend::BackendError;
use crate::backend::nftables::Monitor;
use crate::backend::nftables::monitor::Changes;
use crate::clock;
use crate::coalesce::Gate;
use crate::config::{BackendConfig, Config, SourceKind};
use crate::engine::Outcome;
use crate::health;
use crate::metrics::{self, Metrics};
use crate::repair::{self, Repaired, Trigger};
use crate::source::ErrorClass;
use crate::syncer::{CycleReport, Fetches, Finished, Restored, Syncer, SyncerError};

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
        // A state file that cannot be written is retried every cycle, not sooner: the sync
        // itself reached the kernel.
        let failed = report.sync_failed() || class.is_some_and(retryable);
        if class == Some(ErrorClass::Locked) {
            self.backoff = None;
            return LOCKED_WAIT.max(self.normal(random).min(LOCKED_WAIT * 2));
        }
        if failed && class != Some(ErrorClass::Configuration) {
            return self.after_failure();
        }
        self.backoff = None;
        self.normal(random)
    }

    /// The delay after a failed cycle: 5 s, doubling up to `interval`.
    pub fn after_failure(&mut self) -> Duration {
        let next = match self.backoff {
            None => BACKOFF_START,
            Some(b) => (b * 2).min(self.interval),
        };
        self.backoff = Some(next);
        next.min(self.interval)
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
/// applied list: the two differ whenever an apply failed or someone changed the set), the last
/// sync (attempt), the last success with its age and the degraded sources
/// ([`health::success_summary`]), and whether this cycle failed, was refused or lost a source.
fn status_line(s: &Syncer, report: &CycleReport) -> String {
    let names = match &s.config().backend {
        crate::config::BackendConfig::Nftables(n) => (n.set_v4.clone(), n.set_v6.clone()),
        crate::config::BackendConfig::Ipset(i) => (i.set_v4.clone(), i.set_v6.clone()),
        crate::config::BackendConfig::DryRun => ("v4".into(), "v6".into()),
        crate::config::BackendConfig::File(_) => ("file v4".into(), "v6".into()),
    };
    let held = match report.kernel {
        Some(k) => format!("{} {}, {} {}", names.0, k.v4, names.1, k.v6),
        None => format!("{} and {} unreadable", names.0, names.1),
    };
    let h = &s.state().health;
    let last = h.last_attempt.map_or("never".into(), |t| clock::rfc3339(t)[11..19].to_string());
    let success = health::success_summary(h, s.config().interval, clock::now_unix());
    let cycle = match &report.outcome {
        Err(_) => ", last cycle failed (see the journal)",
        Ok(Outcome::Refused(_)) => ", last cycle refused by a safety guard",
        Ok(_) if report.worst_error_class().is_some() => ", a source failed (see the journal)",
        Ok(_) => "",
    };
    format!("{held}, last sync {last}, {success}{cycle}")
}

/// How long the kernel part of any job may take before it counts as stuck (a netlink call that
/// does not return, an `ipset` or `iptables` process that hangs on the xtables lock): far more
/// than a 100k-entry load takes (seconds). A stuck job cannot be abandoned (it is one blocking
/// call, and the transaction must end whole), so the daemon then stops answering the watchdog
/// and lets systemd restart it; the kernel keeps the sets meanwhile.
pub const KERNEL_BUDGET: Duration = Duration::from_secs(30);

/// READY=1 is sent after the first cycle, or this long after the start while that cycle still
/// waits for a slow API: the restored allowlist is in place by then, and a start must not time
/// out (`TimeoutStartSec=`) because of the API.
pub const READY_WAIT: Duration = Duration::from_secs(20);

/// Cycles (for the sources: API calls) start at most once per this period, whatever asks for
/// them (the schedule, SIGUSR1, a reload): a signal storm costs at most one GetIPList call per
/// nettype and source per second.
pub const CYCLE_SPACING: Duration = Duration::from_secs(1);

/// Reloads (SIGHUP) happen at most once per this period; the asks in between become one.
pub const RELOAD_SPACING: Duration = Duration::from_secs(1);

/// A burst of notifications becomes one repair this long after its first: the commits of one
/// tool's reload follow each other within a millisecond or two (and one `nft -f`, `flush
/// ruleset` and all, is a single commit). A longer burst costs a repair or two more, which look
/// before they write; at most [`REPAIRS_PER_SECOND`] start in any second.
pub const REPAIR_DEBOUNCE: Duration = Duration::from_millis(2);
pub const REPAIRS_PER_SECOND: usize = 5;

/// When the nftables notifications cannot be had, the daemon checks this often instead.
const POLL_WITHOUT_NOTIFICATIONS: Duration = Duration::from_secs(10);

/// The longest a fetch may take: per Chat source, each nettype's request tries the primary
/// endpoint and, after a connect failure, the backup (each attempt bounded by `timeout`), and
/// the request is made once more after an expired usersig is minted anew: 4 × `timeout`.
/// Sources and nettypes are fetched concurrently, so the slowest source sets the bound.
pub fn fetch_bound(cfg: &Config) -> Duration {
    cfg.sources
        .iter()
        .filter_map(|s| match &s.kind {
            SourceKind::TencentChat(c) => Some(c.timeout * 4),
            SourceKind::Static(_) => None,
            // One request, bounded whole by its timeout.
            SourceKind::Url(u) => Some(u.timeout),
        })
        .max()
        .unwrap_or(Duration::ZERO)
}

/// A cycle's hard deadline, from its start: the fetch's bound, then the kernel's budget. A fetch
/// still running at the deadline is abandoned (it changes nothing); a transaction not begun by
/// then is not begun.
pub fn cycle_deadline(cfg: &Config) -> Duration {
    fetch_bound(cfg) + kernel_budget(cfg)
}

/// [`KERNEL_BUDGET`], and the file backend's `on_change_timeout` on top: its jobs may wait
/// that long for the program.
pub fn kernel_budget(cfg: &Config) -> Duration {
    match &cfg.backend {
        BackendConfig::File(f) if f.on_change.is_some() => KERNEL_BUDGET + f.on_change_timeout,
        _ => KERNEL_BUDGET,
    }
}

/// Runs the daemon until SIGTERM or SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(config_path: &Path, cfg: Config) -> Result<(), DaemonError> {
    // The handlers come first: a SIGTERM during start-up is then a clean stop (exit 0, sets in
    // place) rather than the default action, and "allowsync starting" (logged after them) tells
    // a supervisor or a test that signals are handled from now on.
    let signals = Signals::new()?;
    let syncer = Syncer::for_daemon(cfg)?;
    info!(config = %config_path.display(), pid = std::process::id(), "allowsync starting");
    let metrics = Arc::new(Metrics::new(syncer.config().interval));
    metrics.seed(&syncer.state().health);
    // Dropped (and so stopped) with this function.
    let _server = serve_metrics(syncer.config(), &metrics).await;
    Daemon::new(syncer, config_path, metrics).run(signals).await
}

/// Starts the `metrics.listen` endpoint as a task of its own (see [`metrics::http`]). One that
/// cannot bind is logged and done without: the firewall comes first.
async fn serve_metrics(cfg: &Config, m: &Arc<Metrics>) -> Option<AbortOnDrop> {
    let addr = cfg.metrics.listen?;
    match metrics::http::bind(addr).await {
        Ok(listener) => {
            info!(listen = %addr, "serving GET /metrics and /healthz");
            Some(AbortOnDrop(tokio::spawn(metrics::http::serve(listener, Arc::clone(m)))))
        }
        Err(e) => {
            error!(listen = %addr, error = %e, "cannot listen for metrics: running without the endpoint");
            None
        }
    }
}

/// A task that ends with its handle.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the textfile on the blocking pool (a slow filesystem must not hold up the loop),
/// encoded here, so that it is this moment's metrics; a failure is logged.
fn write_textfile(cfg: &Config, m: &Metrics) {
    let Some(path) = cfg.metrics.textfile.clone() else { return };
    let text = m.encode();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = metrics::write_textfile(&path, &text) {
            error!(path = %path.display(), error = %e, "cannot write the metrics textfile");
        }
    });
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn new() -> Result<Signals, DaemonError> {
        let s = |k| signal(k).map_err(DaemonError::Signals);
        Ok(Signals {
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            hup: s(SignalKind::hangup())?,
            usr1: s(SignalKind::user_defined1())?,
        })
    }
}

/// Kernel work in flight: one at a time (they share the backend).
struct Job {
    kind: JobKind,
    /// Past this it counts as stuck (see [`KERNEL_BUDGET`]).
    deadline: Instant,
    handle: JoinHandle<JobOutput>,
}

enum JobKind {
    Restore,
    Finish,
    Repair { trigger: Trigger, since: Instant },
    Check,
}

enum JobOutput {
    Restore(Restored),
    Finish(Box<Finished>),
    Repair(Result<Repaired, BackendError>),
    Check(Result<Vec<String>, BackendError>),
}

/// A fetch in flight: the first half of a cycle.
struct Fetching {
    deadline: Instant,
    handle: JoinHandle<Fetches>,
}

/// How the objects are watched between cycles.
enum Watcher {
    /// Nothing to watch (dry-run).
    None,
    /// nftables: change notifications.
    Notified(Monitor),
    /// ipset (or nftables without notifications): a check every `every`.
    Polled { every: Duration, next: Instant, repair: bool },
}

/// What the repairs asked for since the last one started, gathered.
#[derive(Default)]
struct RepairAsk {
    changes: Changes,
    missing: Vec<String>,
}

impl RepairAsk {
    /// A failed repair's reason, asked again (its window still open since `since`).
    fn put_back(&mut self, trigger: Trigger, since: Instant) {
        let mut again = Changes { first_at: Some(since), ..Changes::default() };
        match trigger {
            Trigger::Notified { what, commits } => {
                again.what = what.into_iter().collect();
                again.commits = commits;
            }
            Trigger::Lost => again.lost = true,
            Trigger::Check { missing } => self.missing.extend(missing),
            // Asking again is all a poll needs.
            Trigger::Poll => return,
        }
        self.changes.merge(again);
    }
}

/// The loop's state. The loop owns the syncer; fetches and kernel jobs are tasks that borrow
/// nothing, so the loop answers the watchdog, signals and notifications while they run.
struct Daemon<'a> {
    config_path: &'a Path,
    syncer: Syncer,
    metrics: Arc<Metrics>,
    schedule: Schedule,
    /// When the schedule asks for the next cycle.
    next_cycle: Instant,
    cycles: Gate,
    reloads: Gate,
    repairs: Gate,
    repair_ask: RepairAsk,
    fetch: Option<Fetching>,
    /// A fetch done, waiting for the kernel (a repair is under way), with its cycle's deadline.
    fetched: Option<(Fetches, Instant)>,
    job: Option<Job>,
    watcher: Watcher,
    /// The last time a check found everything in place (the start of a repair's window).
    last_ok_check: Instant,
    watchdog: Option<Duration>,
    started: Instant,
    restored: bool,
    ready: bool,
    /// The stuck job was logged (once per job).
    stuck_logged: bool,
    /// A throttled repair was logged (once per throttled stretch).
    throttle_logged: bool,
}

/// Far enough in the future to mean "not scheduled" (`Instant` has no maximum).
fn never() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

impl<'a> Daemon<'a> {
    fn new(syncer: Syncer, config_path: &'a Path, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        let schedule = Schedule::new(syncer.config().interval, syncer.config().jitter);
        let mut d = Daemon {
            config_path,
            syncer,
            metrics,
            schedule,
            next_cycle: now,
            cycles: Gate::new(1, CYCLE_SPACING, Duration::ZERO),
            reloads: Gate::new(1, RELOAD_SPACING, Duration::ZERO),
            repairs: Gate::new(REPAIRS_PER_SECOND, Duration::from_secs(1), REPAIR_DEBOUNCE),
            repair_ask: RepairAsk::default(),
            fetch: None,
            fetched: None,
            job: None,
            watcher: Watcher::None,
            last_ok_check: now,
            watchdog: sd_notify::watchdog_enabled(),
            started: now,
            restored: false,
            ready: false,
            stuck_logged: false,
            throttle_logged: false,
        };
        d.watch();
        d
    }

    /// Starts watching the configured backend's objects: notifications for nftables (before
    /// the restore, so that nothing done meanwhile is missed), a periodic check for ipset.
    fn watch(&mut self) {
        let now = Instant::now();
        self.watcher = match &self.syncer.config().backend {
            BackendConfig::Nftables(n) => match Monitor::start(n) {
                Ok(m) => Watcher::Notified(m),
                Err(e) => {
                    error!(
                        error = %e,
                        every_s = POLL_WITHOUT_NOTIFICATIONS.as_secs(),
                        "no nf_tables notifications: checking allowsync's objects periodically instead"
                    );
                    Watcher::Polled { every: POLL_WITHOUT_NOTIFICATIONS, next: now, repair: true }
                }
            },
            BackendConfig::Ipset(i) => {
                Watcher::Polled { every: i.check_interval, next: now + i.check_interval, repair: false }
            }
            BackendConfig::DryRun | BackendConfig::File(_) => Watcher::None,
        };
    }

    async fn run(mut self, mut signals: Signals) -> Result<(), DaemonError> {
        // The objects and the last good allowlist first; the first fetch meanwhile.
        self.start_job(JobKind::Restore, Instant::now());
        let mut watchdog_tick =
            tokio::time::interval(self.watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
        loop {
            let now = Instant::now();
            self.dispatch(now);
            let wake = self.next_wake();
            tokio::select! {
                _ = signals.term.recv() => return self.stop("SIGTERM").await,
                _ = signals.int.recv() => return self.stop("SIGINT").await,
                _ = signals.usr1.recv() => {
                    if self.cycles.ask(Instant::now()) {
                        info!("SIGUSR1: syncing now");
                    } else {
                        debug!("SIGUSR1: a sync is already asked for; coalesced");
                    }
                }
                _ = signals.hup.recv() => {
                    if self.reloads.ask(Instant::now()) {
                        info!("SIGHUP: reloading the configuration");
                    } else {
                        debug!("SIGHUP: a reload is already asked for; coalesced");
                    }
                }
                _ = watchdog_tick.tick(), if self.watchdog.is_some() => self.answer_watchdog(),
                out = join(&mut self.job) => self.job_done(out),
                fetches = join_fetch(&mut self.fetch) => self.fetch_done(fetches),
                changes = next_change(&self.watcher) => self.changed(changes),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// A cycle is under way: fetching, waiting for the kernel, or in its transaction.
    fn cycle_in_flight(&self) -> bool {
        self.fetch.is_some()
            || self.fetched.is_some()
            || matches!(self.job, Some(Job { kind: JobKind::Finish, .. }))
    }

    /// Kernel work may start (none under way, the restore done).
    fn kernel_free(&self) -> bool {
        self.job.is_none() && self.restored
    }

    /// A reload may start: it swaps the sources and backend, so nothing may be using them.
    fn may_reload(&self) -> bool {
        !self.cycle_in_flight() && self.job.is_none()
    }

    /// A cycle may start: none under way, and no reload waiting (it syncs itself).
    fn may_cycle(&self) -> bool {
        !self.cycle_in_flight() && !self.reloads.pending()
    }

    /// Starts what is due and may start now.
    fn dispatch(&mut self, now: Instant) {
        if now >= self.next_cycle {
            self.cycles.ask(now);
            self.next_cycle = never();
        }
        if let Some(fetch) = &self.fetch {
            if now >= fetch.deadline {
                self.abandon_fetch(now);
            }
        }
        if self.may_reload() && self.reloads.due().is_some_and(|d| d <= now) {
            self.reloads.start(now);
            self.reload();
            self.reloads.finish();
        }
        if self.kernel_free() {
            if self.repairs.due().is_some_and(|d| d <= now) {
                self.throttle_logged = false;
                let trigger = self.take_repair_trigger();
                self.repairs.start(now);
                self.start_job(JobKind::Repair { since: trigger.1, trigger: trigger.0 }, now);
            } else if let Some((fetches, deadline)) = self.fetched.take() {
                let job = self.syncer.finish_job(fetches, false, Some(deadline));
                self.spawn(JobKind::Finish, deadline, async move { JobOutput::Finish(Box::new(job.await)) });
            } else if let Watcher::Polled { every, next, repair } = &mut self.watcher {
                if now >= *next {
                    *next = now + *every;
                    if *repair {
                        self.repairs.ask(now);
                    } else {
                        self.start_job(JobKind::Check, now);
                    }
                }
            }
        }
        if self.repairs.throttled() && !self.throttle_logged {
            self.throttle_logged = true;
            warn!(
                max_per_second = REPAIRS_PER_SECOND,
                "repairs throttled: allowsync's objects keep being changed; the next repair waits for the rate limit"
            );
        }
        if self.may_cycle() && self.cycles.due().is_some_and(|d| d <= now) {
            self.cycles.start(now);
            let deadline = now + cycle_deadline(self.syncer.config());
            self.fetch = Some(Fetching { deadline, handle: tokio::spawn(self.syncer.fetch()) });
        }
        if !self.ready && self.restored && now >= self.started + READY_WAIT {
            self.ready = true;
            notify(&[
                NotifyState::Ready,
                NotifyState::Status("restored the last good allowlist; first sync still in progress"),
            ]);
        }
    }

    /// The earliest moment something may become due. What waits for a job or a cycle to end
    /// is left out: that end wakes the loop itself (and a due time in the past would spin it).
    fn next_wake(&self) -> Instant {
        let mut wake = self.next_cycle;
        let mut at = |when: bool, t: Option<Instant>| {
            if let (true, Some(t)) = (when, t) {
                wake = wake.min(t);
            }
        };
        at(self.may_cycle(), self.cycles.due());
        at(self.may_reload(), self.reloads.due());
        at(self.kernel_free(), self.repairs.due());
        at(true, self.fetch.as_ref().map(|f| f.deadline));
        if let Watcher::Polled { next, .. } = &self.watcher {
            at(self.kernel_free(), Some(*next));
        }
        at(!self.ready && self.restored, Some(self.started + READY_WAIT));
        wake
    }

    fn start_job(&mut self, kind: JobKind, now: Instant) {
        let deadline = now + kernel_budget(self.syncer.config());
        match kind {
            JobKind::Restore => {
                let job = self.syncer.restore_job();
                self.spawn(kind, deadline, async move { JobOutput::Restore(job.await) })
            }
            JobKind::Repair { .. } => {
                let job = repair::job(&self.syncer);
                self.spawn(kind, deadline, async move { JobOutput::Repair(job.await) })
            }
            JobKind::Check => {
                let job = repair::check_job(&self.syncer);
                self.spawn(kind, deadline, async move { JobOutput::Check(job.await) })
            }
            JobKind::Finish => unreachable!("a finish job is started with its fetches"),
        }
    }

    fn spawn(
        &mut self,
        kind: JobKind,
        deadline: Instant,
        f: impl Future<Output = JobOutput> + Send + 'static,
    ) {
        self.stuck_logged = false;
        self.job = Some(Job { kind, deadline, handle: tokio::spawn(f) });
    }

    fn job_done(&mut self, out: JobOutput) {
        let Some(job) = self.job.take() else { return };
        let now = Instant::now();
        match (job.kind, out) {
            (JobKind::Restore, JobOutput::Restore(done)) => {
                if let Err(e) = self.syncer.restored(done) {
                    error!(error = %e, "cannot restore the last good allowlist; will retry with the first sync");
                }
                self.restored = true;
            }
            (JobKind::Finish, JobOutput::Finish(done)) => {
                let report = self.syncer.complete(*done);
                self.cycles.finish();
                self.cycle_done(&report, now);
            }
            (JobKind::Repair { trigger, since }, JobOutput::Repair(r)) => {
                repair::log(&trigger, since, &r);
                self.repair_metrics(&trigger, &r);
                self.repairs.finish();
                match &r {
                    Ok(_) => self.last_ok_check = now,
                    // Changed under it (a tool deleting the table again meanwhile): again, within
                    // the rate limit. Other failures wait for the next change or cycle.
                    Err(e) if e.is_missing() || e.is_conflict() => {
                        self.repair_ask.put_back(trigger, since);
                        self.repairs.ask(now);
                    }
                    Err(_) => {}
                }
            }
            (JobKind::Check, JobOutput::Check(r)) => match r {
                Ok(missing) if missing.is_empty() => self.last_ok_check = now,
                Ok(missing) => {
                    self.repair_ask.missing.extend(missing);
                    self.repairs.ask(now);
                }
                Err(e) => {
                    warn!(error = %e, "checking allowsync's objects failed; checking again at the next interval")
                }
            },
            _ => unreachable!("each job kind has its own output"),
        }
    }

    /// What the repair about to start answers, and when its window opened.
    fn take_repair_trigger(&mut self) -> (Trigger, Instant) {
        let ask = std::mem::take(&mut self.repair_ask);
        if ask.changes.lost {
            (Trigger::Lost, ask.changes.first_at.unwrap_or(self.last_ok_check))
        } else if ask.changes.commits > 0 {
            let since = ask.changes.first_at.unwrap_or(self.last_ok_check);
            (
                Trigger::Notified {
                    what: ask.changes.what.into_iter().collect(),
                    commits: ask.changes.commits,
                },
                since,
            )
        } else if !ask.missing.is_empty() {
            (Trigger::Check { missing: ask.missing }, self.last_ok_check)
        } else {
            (Trigger::Poll, self.last_ok_check)
        }
    }

    fn changed(&mut self, changes: Changes) {
        let now = Instant::now();
        self.repair_ask.changes.merge(changes);
        self.repairs.ask(now);
    }

    fn repair_metrics(&self, trigger: &Trigger, r: &Result<Repaired, BackendError>) {
        let Ok(r) = r else { return };
        if let Some(Outcome::Refused(reason)) = &r.synced {
            self.metrics.refused(reason.guard());
        } else if r.changed() {
            self.metrics.repaired(metrics::cause(trigger));
        } else {
            return;
        }
        if let Some(k) = r.kernel {
            self.metrics.kernel(k);
        }
        write_textfile(self.syncer.config(), &self.metrics);
    }

    fn fetch_done(&mut self, fetches: Fetches) {
        let Some(fetch) = self.fetch.take() else { return };
        self.fetched = Some((fetches, fetch.deadline));
    }

    /// The fetch overran the cycle's deadline: dropped (it changed nothing), logged, retried
    /// like any failed cycle.
    fn abandon_fetch(&mut self, now: Instant) {
        let Some(fetch) = self.fetch.take() else { return };
        fetch.handle.abort();
        self.cycles.finish();
        let deadline = cycle_deadline(self.syncer.config());
        self.metrics.abandoned(deadline);
        write_textfile(self.syncer.config(), &self.metrics);
        let deadline_s = deadline.as_secs();
        let delay = self.schedule.after_failure();
        error!(
            deadline_s,
            retry_in_s = delay.as_secs(),
            "sync abandoned: the fetch overran the cycle's deadline; nothing was applied"
        );
        self.next_cycle = now + delay;
    }

    fn cycle_done(&mut self, report: &CycleReport, now: Instant) {
        self.metrics.cycle(report, &self.syncer.state().health);
        write_textfile(self.syncer.config(), &self.metrics);
        let delay = self.schedule.next(report, rand::random());
        if !matches!(report.outcome, Ok(Outcome::InSync | Outcome::Applied { .. })) {
            warn!(retry_in_s = delay.as_secs(), "next attempt scheduled");
        } else if report.worst_error_class().is_some() {
            warn!(retry_in_s = delay.as_secs(), "a source failed: backing off");
        }
        self.next_cycle = now + delay;
        let status = status_line(&self.syncer, report);
        if self.ready {
            notify(&[NotifyState::Status(&status)]);
        } else {
            self.ready = true;
            notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }

    /// `WATCHDOG=1`, unless kernel work has been stuck past its deadline: then systemd restarts
    /// the daemon (see [`KERNEL_BUDGET`]).
    fn answer_watchdog(&mut self) {
        if let Some(job) = &self.job {
            if Instant::now() > job.deadline {
                if !self.stuck_logged {
                    self.stuck_logged = true;
                    error!(
                        budget_s = KERNEL_BUDGET.as_secs(),
                        "kernel work has not returned within its budget: no longer answering the watchdog, so that systemd restarts allowsync (the sets stay in place)"
                    );
                }
                return;
            }
        }
        notify(&[NotifyState::Watchdog]);
    }

    /// SIGHUP, coalesced: re-reads the configuration; a broken one is logged and the old one
    /// kept. A good one is in use from now on and syncs at once.
    fn reload(&mut self) {
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        let backend_before = self.syncer.config().backend.clone();
        let listen_before = self.syncer.config().metrics.listen;
        let loaded = Config::load(self.config_path).map_err(|e| e.to_string()).and_then(|new| {
            for w in &new.warnings {
                warn!("{w}");
            }
            self.syncer.reload(new).map_err(|e| format!("cannot be used: {e}"))
        });
        match loaded {
            Ok(()) => {
                info!("SIGHUP: configuration reloaded; syncing now");
                self.metrics.set_interval(self.syncer.config().interval);
                if self.syncer.config().metrics.listen != listen_before {
                    warn!("metrics.listen changed: the listener moves when allowsync is restarted");
                }
                self.schedule = Schedule::new(self.syncer.config().interval, self.syncer.config().jitter);
                if self.syncer.config().backend != backend_before {
                    self.watch();
                }
                self.cycles.ask(Instant::now());
            }
            Err(e) => error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the old one"),
        }
        notify(&[NotifyState::Ready]);
    }

    /// SIGTERM or SIGINT: a fetch is abandoned (it changed nothing); kernel work under way is
    /// finished and recorded first. Nothing is flushed.
    async fn stop(mut self, signal: &str) -> Result<(), DaemonError> {
        if let Some(f) = self.fetch.take() {
            f.handle.abort();
        }
        if let Some(job) = self.job.as_mut() {
            let out = (&mut job.handle).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            self.job_done(out);
        }
        info!("{signal}: stopping; the sets stay in place");
        notify(&[NotifyState::Stopping]);
        Ok(())
    }
}

/// The job's output when it ends; pending forever without one. A panicked job panics here.
async fn join(job: &mut Option<Job>) -> JobOutput {
    match job {
        Some(j) => (&mut j.handle).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        None => std::future::pending().await,
    }
}

/// The fetch's result when it ends; pending forever without one.
async fn join_fetch(fetch: &mut Option<Fetching>) -> Fetches {
    match fetch {
        Some(f) => (&mut f.handle).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        None => std::future::pending().await,
    }
}

/// The next batch of foreign changes; pending forever without notifications.
async fn next_change(watcher: &Watcher) -> Changes {
    match watcher {
        Watcher::Notified(m) => m.next().await,
        _ => std::future::pending().await,
    }
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
            kernel: Some(crate::health::Counts { v4: 1, v6: 0 }),
            drift: None,
            state_error: None,
            success: class.is_none(),
            desired: crate::health::Counts { v4: 1, v6: 0 },
            requests: Vec::new(),
            usersig_expiries: Vec::new(),
            guards: Vec::new(),
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

    /// A stale published list will not be fixed in seconds: asking the relay sooner gains nothing.
    #[test]
    fn a_stale_list_waits_the_normal_interval() {
        let mut s = Schedule::new(Duration::from_secs(20), Duration::ZERO);
        assert_eq!(s.next(&report(Ok(Outcome::InSync), Some(ErrorClass::Stale)), 0.0).as_secs(), 20);
    }

    /// The sync reached the kernel; only the state file failed: the next attempt is the next
    /// cycle (which writes the state again), not a backoff that would call the API sooner.
    #[test]
    fn a_state_file_that_cannot_be_written_does_not_back_off() {
        let mut s = Schedule::new(Duration::from_secs(60), Duration::ZERO);
        let e = "state file /var/lib/allowsync/state.json: write: Read-only file system (os error 30)";
        let mut r = report(Err(e.into()), None);
        r.state_error = Some(e.into());
        assert!(!r.sync_failed());
        assert_eq!(s.next(&r, 0.0).as_secs(), 60);
        r.state_error = None;
        assert_eq!(s.next(&r, 0.0).as_secs(), 5, "a failed sync backs off");
    }

    /// The unit's timeouts and the daemon's agree (issue 17: `WatchdogSec=60s` with a `timeout`
    /// of up to 120 s got a daemon waiting on a hanging API killed and restarted in a loop).
    #[test]
    fn the_unit_and_the_daemon_agree_on_timeouts() {
        let unit = include_str!("../systemd/allowsync.service");
        let sec = |key: &str| {
            let line = unit
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key}="));
            humantime::parse_duration(line.trim()).unwrap()
        };
        let (watchdog, start) = (sec("WatchdogSec"), sec("TimeoutStartSec"));
        assert!(
            watchdog > crate::config::MAX_TIMEOUT,
            "WatchdogSec {watchdog:?} must exceed the largest source timeout {:?}",
            crate::config::MAX_TIMEOUT
        );
        // The restore (kernel work) and the wait for the first sync fit in the start timeout.
        assert!(READY_WAIT + KERNEL_BUDGET < start, "TimeoutStartSec {start:?}");
        // A stuck job stops the pings well before a healthy daemon could look stuck.
        assert!(KERNEL_BUDGET < watchdog);
    }

    #[test]
    fn the_cycle_deadline_follows_the_slowest_source() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k").unwrap();
        let yaml = format!(
            "sources:\n  - name: a\n    static: [192.0.2.1]\n  - name: b\n    tencent_chat: {{ endpoint: \"http://127.0.0.1:1\", sdkappid: 1, identifier: x, secret_key_file: {}, timeout: 120s }}\n",
            key.display()
        );
        let parse = |yaml: &str| {
            crate::config::parse(yaml, &dir.path().join("c.yaml"))
                .and_then(crate::config::Parsed::resolve)
                .unwrap()
        };
        let cfg = parse(&yaml);
        assert_eq!(fetch_bound(&cfg), Duration::from_secs(480));
        assert_eq!(cycle_deadline(&cfg), Duration::from_secs(480) + KERNEL_BUDGET);
        let only_static = parse("sources:\n  - name: a\n    static: [192.0.2.1]\n");
        assert_eq!(cycle_deadline(&only_static), KERNEL_BUDGET);
        // The file backend's jobs may wait for on_change on top.
        let file = "sources:\n  - name: a\n    static: [192.0.2.1]\nbackend:\n  file: { path: /tmp/x.json, on_change: [/bin/true], on_change_timeout: 45s }\n";
        assert_eq!(cycle_deadline(&parse(file)), KERNEL_BUDGET + Duration::from_secs(45));
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
