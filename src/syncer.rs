//! The sync cycle with its I/O: fetch every source, build the desired set, sync it through the
//! backend, record the outcome in the state file, and log one line about it. `allowsync once`
//! runs one cycle; the daemon runs one per interval. The decisions themselves live in
//! [`crate::engine`].
//!
//! Every backend call and the state file write block (netlink round trips, `ipset` processes,
//! fsync): they run on tokio's blocking pool, so the runtime's own thread stays free for
//! signals, timers and other tasks while a sync runs. The daemon runs a cycle's two halves as
//! jobs that borrow nothing ([`Syncer::fetch`], [`Syncer::finish_job`], then
//! [`Syncer::complete`]), so that its loop keeps answering while they are under way.
//!
//! For the daemon, [`Syncer::for_daemon`] starts whatever the state directory's trouble: a lock
//! or a state file that cannot be used is logged, and the firewall is put in place all the same.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{error, info, warn};

use crate::backend::{self, Backend, BackendError};
use crate::clock;
use crate::config::Config;
use crate::engine::{self, Desired, Outcome, Plan, SourceReport, SourceStatus};
use crate::health::{self, Counts, CycleHealth};
use crate::ownership::Footprint;
use crate::ownership::lock::{LockError, ObjectLocks};
use crate::prefixes::AllowSet;
use crate::source::{ErrorClass, FetchError, Fetched, Sources};
use crate::state::{self, State, StateError, StateFile, StateLock};

#[derive(Debug, thiserror::Error)]
pub enum SyncerError {
    #[error(transparent)]
    Objects(#[from] LockError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("sources: {0}")]
    Sources(String),
}

/// What one cycle did, for the log line, `once`'s exit code and the daemon's backoff.
#[derive(Debug, Clone)]
pub struct CycleReport {
    /// `Err` carries the failure's message.
    pub outcome: Result<Outcome, String>,
    /// What became of each source.
    pub sources: Vec<SourceReport>,
    pub v4: usize,
    pub v6: usize,
    pub duration_ms: u128,
    /// Set when the kernel no longer held what allowsync last applied.
    pub drift: Option<String>,
    /// What the kernel holds after the cycle (`None`: unreadable), read on the blocking pool
    /// with the sync itself, for systemd's `STATUS=` and the metrics.
    pub kernel: Option<Counts>,
    /// Why the state file could not be written, when it could not (also in `outcome` when the
    /// sync itself succeeded): the kernel holds the sync all the same.
    pub state_error: Option<String>,
    /// Every source answered fresh and the kernel was left equal to the desired set (see
    /// [`crate::health`]).
    pub success: bool,
    /// What this cycle wanted.
    pub desired: Counts,
    /// Every GetIPList request sent (retries included): how it ended.
    pub requests: Vec<ApiRequest>,
    /// Per Chat source, when the usersig it sends expires (unix seconds).
    pub usersig_expiries: Vec<(String, u64)>,
    /// Each guard that refused something this cycle, once per refusal: `min_prefix` per
    /// answer with an entry too wide, `empty` per suspicious empty answer and per refused empty
    /// allowlist, `removal`, `widening` ([`engine::Refusal::guard`]).
    pub guards: Vec<&'static str>,
}

/// How one request (a GetIPList call for one source, nettype and attempt, or a `url` source's
/// GET) ended, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub source: String,
    /// `None` for a `url` source.
    pub nettype: Option<u8>,
    /// `ok`, or the error's class ([`ErrorClass::label`]).
    pub result: &'static str,
}

impl CycleReport {
    /// True when the sync itself failed (the kernel, enforcement, an overrun), not merely the
    /// state file write after it.
    pub fn sync_failed(&self) -> bool {
        match &self.outcome {
            Err(e) => self.state_error.as_ref() != Some(e),
            Ok(_) => false,
        }
    }

    /// The most urgent fetch error class of the cycle (for backoff), if any source failed.
    pub(crate) fn worst_error_class(&self) -> Option<ErrorClass> {
        // Locked needs the longest wait, then configuration (normal interval, loud), then the
        // retryable ones.
        let rank = |c: &ErrorClass| match c {
            ErrorClass::Locked => 0,
            ErrorClass::Configuration => 1,
            ErrorClass::RateLimited => 2,
            ErrorClass::UsersigExpired => 3,
            ErrorClass::Transient => 4,
            ErrorClass::Network => 5,
            ErrorClass::InvalidResponse => 6,
            ErrorClass::Stale => 7,
        };
        self.sources.iter().filter_map(|s| s.error_class).min_by_key(rank)
    }
}

/// The first half of a cycle: what every source answered (see [`Syncer::fetch`]).
pub struct Fetches {
    started: Instant,
    fetched: Vec<Fetched>,
    usersig_expiries: Vec<(String, u64)>,
    requests: Vec<ApiRequest>,
}

/// What [`Syncer::finish_job`] did, for [`Syncer::complete`].
pub struct Finished {
    started: Instant,
    sources: Vec<SourceReport>,
    desired: Counts,
    requests: Vec<ApiRequest>,
    usersig_expiries: Vec<(String, u64)>,
    guards: Vec<&'static str>,
    /// `None` when the deadline had passed before the kernel was touched: nothing was done.
    done: Option<KernelWork>,
}

/// The kernel half of a cycle, as it came back from the blocking pool.
struct KernelWork {
    result: Result<(Outcome, Plan), BackendError>,
    enforce_error: Option<BackendError>,
    drift: Option<String>,
    state: State,
    saved: Result<(), StateError>,
    kernel: Option<Counts>,
    success: bool,
}

/// What [`Syncer::restore_job`] did, for [`Syncer::restored`].
pub struct Restored {
    result: Result<usize, SyncerError>,
    objects: Option<Footprint>,
}

/// Holds what a cycle needs between cycles: the sources (connection pool, usersig caches), the
/// backend, the state and the lock that makes this the only allowsync on this state.
pub struct Syncer {
    cfg: Config,
    /// Shared with a fetch under way (see [`Syncer::fetch`]).
    sources: Arc<Sources>,
    /// Shared with the blocking-pool thread each call runs on (see [`Syncer::on_backend`]).
    backend: Arc<Mutex<Box<dyn Backend>>>,
    state_file: StateFile,
    state: State,
    _lock: Option<StateLock>,
    /// One manager per kernel object, whatever the state file (see [`crate::ownership::lock`]).
    objects: Option<ObjectLocks>,
}

impl Syncer {
    /// Takes the locks (the state file's, and one per kernel object the configuration writes
    /// to), loads the state and builds sources and backend. With `lock: false` (`plan`) nothing
    /// is locked and nothing will be written.
    pub fn new(cfg: Config, lock: bool) -> Result<Syncer, SyncerError> {
        let backend = backend::from_config(&cfg.backend)?;
        Syncer::with_backend(cfg, backend, lock)
    }

    /// As [`Syncer::new`], with a backend of the caller's (tests, the bench), used as given.
    pub fn with_backend(cfg: Config, backend: Box<dyn Backend>, lock: bool) -> Result<Syncer, SyncerError> {
        let state_file = StateFile::new(&cfg.state_file);
        let lock = if lock { Some(state_file.lock()?) } else { None };
        let objects = match lock {
            Some(_) => Some(ObjectLocks::take(&backend.managed(), &cfg.path)?),
            None => None,
        };
        let state = if lock.is_some() {
            state_file.load()?
        } else {
            state_file.peek().ok().flatten().unwrap_or_default()
        };
        Syncer::assemble(cfg, backend, state_file, state, lock, objects)
    }

    /// For `run`: as [`Syncer::new`], except that no lock or state file problem stops it. The
    /// daemon must put the firewall in place whatever happened to its state directory:
    ///
    /// - the state lock file cannot be created or written (read-only directory, disk full,
    ///   permission denied, a directory in its place): an existing one is locked through a
    ///   read-only descriptor; without one the daemon runs without that lock. The per-object
    ///   locks likewise: one that cannot be taken is logged and done without. Logged as errors.
    /// - the state file cannot be read (permission denied, a directory in its place, a corrupt
    ///   file that cannot be set aside): logged as an error; the daemon starts without last good
    ///   lists, and every cycle tries to write the state again (and logs it when that fails).
    ///
    /// Only a lock held by another live allowsync is still an error.
    pub fn for_daemon(cfg: Config) -> Result<Syncer, SyncerError> {
        let backend = backend::from_config(&cfg.backend)?;
        let state_file = StateFile::new(&cfg.state_file);
        let lock = match state_file.lock() {
            Ok(l) => Some(l),
            Err(e @ StateError::Locked { .. }) => return Err(e.into()),
            Err(failed) => match state_file.lock_read_only() {
                Ok(l) => {
                    error!(error = %failed, "cannot write the state lock file: holding the lock through a read-only descriptor");
                    Some(l)
                }
                Err(e @ StateError::Locked { .. }) => return Err(e.into()),
                Err(_) => {
                    error!(error = %failed, "cannot take the state lock: running without it; start no second allowsync on this state");
                    None
                }
            },
        };
        let objects = match ObjectLocks::take(&backend.managed(), &cfg.path) {
            Ok(l) => Some(l),
            Err(e @ LockError::Held { .. }) => return Err(e.into()),
            Err(e) => {
                error!(error = %e, "cannot lock the kernel objects: running without those locks; start no second allowsync on these sets");
                None
            }
        };
        let state = state_file.load().unwrap_or_else(|e| {
            error!(
                error = %e,
                "cannot read the state file: starting without the last good lists; the firewall is put in place all the same"
            );
            State::default()
        });
        Syncer::assemble(cfg, backend, state_file, state, lock, objects)
    }

    fn assemble(
        cfg: Config,
        mut backend: Box<dyn Backend>,
        state_file: StateFile,
        mut state: State,
        lock: Option<StateLock>,
        objects: Option<ObjectLocks>,
    ) -> Result<Syncer, SyncerError> {
        state::forget_unknown_sources(&mut state, cfg.sources.iter().map(|s| s.name.as_str()));
        let sources = Arc::new(Sources::new(&cfg).map_err(|e| SyncerError::Sources(e.to_string()))?);
        backend.set_recorded(&state.objects);
        let backend = Arc::new(Mutex::new(backend));
        Ok(Syncer { cfg, sources, backend, state_file, state, _lock: lock, objects })
    }

    /// Takes a new configuration (SIGHUP): new sources, same state. When `backend:` did not
    /// change, the backend is kept, with what it knows of the kernel: the next cycle neither
    /// dumps nor writes when nothing changed. Otherwise a new one: the object locks move to the
    /// new configuration's objects (another allowsync holding one of them refuses the reload),
    /// and the new backend is told what the old one owned, so that its first `ensure` removes
    /// what the new configuration no longer uses. The state file cannot move while running; a
    /// changed `state_file` waits for a restart.
    pub fn reload(&mut self, mut cfg: Config) -> Result<(), SyncerError> {
        if cfg.state_file != self.cfg.state_file {
            warn!(
                old = %self.cfg.state_file.display(),
                new = %cfg.state_file.display(),
                "state_file changed: keeping the old one until allowsync is restarted"
            );
            cfg.state_file = self.cfg.state_file.clone();
        }
        let sources = Arc::new(Sources::new(&cfg).map_err(|e| SyncerError::Sources(e.to_string()))?);
        if cfg.backend != self.cfg.backend {
            let mut backend = backend::from_config(&cfg.backend)?;
            if let Some(locks) = &mut self.objects {
                locks.retarget(&backend.managed())?;
            }
            backend.set_recorded(&self.state.objects);
            self.backend = Arc::new(Mutex::new(backend));
        }
        state::forget_unknown_sources(&mut self.state, cfg.sources.iter().map(|s| s.name.as_str()));
        self.sources = sources;
        self.cfg = cfg;
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Creates the kernel objects and, when the set is empty (a reboot, a deleted table), puts
    /// the last applied allowlist from the state file back into it, before any fetch: after a
    /// reboot the allowlist is back even when the API is unreachable. The first cycle does the
    /// rest with the guards in force.
    ///
    /// A set that holds anything is left alone: the kernel is the truth. The state file is
    /// written *after* each commit, so a crash between the two leaves a kernel newer than the
    /// state file; adding the state's older list to it would mix the old and new allowlists
    /// (and re-open addresses the newer list had removed) until the next sync.
    pub async fn restore(&mut self) -> Result<usize, SyncerError> {
        let done = self.restore_job().await;
        self.restored(done)
    }

    /// [`Syncer::restore`]'s work as a job that borrows nothing; hand the result to
    /// [`Syncer::restored`].
    pub fn restore_job(&self) -> impl Future<Output = Restored> + Send + 'static {
        let applied = self.state.applied.clone();
        self.on_backend(move |b| Restored { result: restore_into(b, applied), objects: b.footprint() })
    }

    /// Takes what [`Syncer::restore_job`] found into this syncer.
    pub fn restored(&mut self, done: Restored) -> Result<usize, SyncerError> {
        if let Some(objects) = done.objects {
            // Written with the first cycle's state.
            self.state.objects = objects;
        }
        done.result
    }

    /// Runs `f` with the backend on tokio's blocking pool; the future borrows nothing and waits
    /// for it without holding up the runtime. Dropping the future does not stop `f`: it runs to
    /// its end, and the backend stays usable (the next call waits for it).
    pub(crate) fn on_backend<T, F>(&self, f: F) -> impl Future<Output = T> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Backend) -> T + Send + 'static,
    {
        let backend = Arc::clone(&self.backend);
        blocking(move || f(backend.lock().expect("a backend call panicked").as_mut()))
    }

    /// The allowlist allowsync last applied, as it holds it in memory.
    pub fn applied(&self) -> Option<&AllowSet> {
        self.state.applied.as_ref()
    }

    /// One sync cycle: fetch, build, guard, apply, record, log.
    pub async fn cycle(&mut self, force: bool) -> CycleReport {
        let fetches = self.fetch().await;
        self.finish(fetches, force).await
    }

    /// The first half of a cycle: every source fetched. The only part that waits on the
    /// network, and the only one the daemon cancels (on SIGTERM, or at the cycle's deadline):
    /// it changes nothing. Borrows nothing, so the daemon can run it as a task of its own.
    pub fn fetch(&self) -> impl Future<Output = Fetches> + Send + 'static {
        let sources = Arc::clone(&self.sources);
        // A `url` source asks with the ETag it keeps with its last good list.
        let known = sources.kept_for_fetch(&self.state.sources);
        async move {
            let started = Instant::now();
            let fetched = sources.fetch_all_with(known).await;
            let requests = sources
                .take_requests()
                .into_iter()
                .map(|(source, nettype, result)| ApiRequest { source, nettype, result })
                .collect();
            Fetches { started, fetched, usersig_expiries: sources.usersig_expiries(), requests }
        }
    }

    /// The second half: build, guard, apply, record, log. Meant to run to its end: dropped once
    /// the backend call has started, the transaction and the state file write still happen,
    /// but this syncer's copy of the state does not learn of them.
    pub async fn finish(&mut self, fetches: Fetches, force: bool) -> CycleReport {
        let done = self.finish_job(fetches, force, None).await;
        self.complete(done)
    }

    /// [`Syncer::finish`]'s work as a job that borrows nothing: the desired set is built and the
    /// sources' failures logged now; the kernel transaction and the state file write run on the
    /// blocking pool, with a copy of the state. When `deadline` has passed by the time the
    /// blocking pool takes the job, it touches nothing (the cycle is abandoned whole, never
    /// half-applied). Hand the result to [`Syncer::complete`].
    pub fn finish_job(
        &self,
        fetches: Fetches,
        force: bool,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Finished> + Send + 'static {
        let Fetches { started, fetched, usersig_expiries, requests } = fetches;
        let mut guards: Vec<&'static str> = fetched
            .iter()
            .flat_map(|f| &f.nettypes)
            .filter(|n| matches!(n.result, Err(FetchError::Suspicious { .. })))
            .map(|_| "min_prefix")
            .collect();
        for f in &fetched {
            if let Err(e) = &f.result {
                let class = e.class();
                if class == ErrorClass::Configuration {
                    error!(source = %f.name, ?class, error = %e, "source failed: check the configuration");
                } else {
                    warn!(source = %f.name, ?class, error = %e, "source failed");
                }
            }
        }
        let desired = Desired::build(fetched, &self.state);
        let sources = desired.sources.clone();
        let desired_counts = Counts::of(&desired.set);
        guards.extend(
            desired
                .sources
                .iter()
                .filter(|s| health::source_result(s) == "suspicious_empty")
                .map(|_| "empty"),
        );

        // The kernel transaction and the state file write in one trip to the blocking pool. The
        // state goes as a copy: if this future is dropped meanwhile, `self.state` stays whole.
        let safety = self.cfg.safety.clone();
        let (file, mut state) = (self.state_file.clone(), self.state.clone());
        let work = self.on_backend(move |b| {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            let ensured = b.ensure();
            let enforced = ensured.is_ok();
            let result = ensured.and_then(|()| engine::sync(b, &desired, &safety, force));
            // The enforcement rules after the sets: one that cannot be installed fails this
            // cycle, but the sets were synced (and are recorded as such).
            let enforce_error = if enforced { b.enforce().err() } else { None };
            if let Some(objects) = b.footprint().filter(|_| enforced) {
                state.objects = objects;
            }
            let drift = match (&result, &state.applied) {
                // dry-run keeps nothing: every cycle starts from an empty set by design.
                _ if !b.persists() => None,
                (Ok((_, plan)), Some(applied)) => drift_of(plan, applied),
                _ => None,
            };
            let now = clock::now_unix();
            engine::record(&mut state, &desired, &result, now);
            // Cheap after our own commit: the cache answers while the generation is ours.
            let kernel = b.read().ok().map(|k| Counts::of(&k));
            let synced = matches!(&result, Ok((Outcome::InSync | Outcome::Applied { .. }, _)));
            let success = synced && enforce_error.is_none() && desired.all_fresh();
            // As `complete` tells it, but for the state file (which this very write records).
            let outcome = match &result {
                Err(_) => "failed",
                Ok(_) if synced && enforce_error.is_some() => "failed",
                Ok((o, _)) => health::outcome_label(&Ok(o.clone())),
            };
            let cycle =
                CycleHealth { sources: &desired.sources, success, outcome, kernel, desired: desired_counts };
            state.health.record(&cycle, now);
            let saved = file.save(&state);
            Some(KernelWork { result, enforce_error, drift, state, saved, kernel, success })
        });
        async move {
            Finished {
                started,
                sources,
                desired: desired_counts,
                requests,
                usersig_expiries,
                guards,
                done: work.await,
            }
        }
    }

    /// Takes what [`Syncer::finish_job`] did into this syncer (the new state) and logs the
    /// cycle's line.
    pub fn complete(&mut self, finished: Finished) -> CycleReport {
        let Finished { started, sources, desired, requests, usersig_expiries, mut guards, done } = finished;
        let Some(KernelWork { result, enforce_error, drift, state, saved, kernel, success }) = done else {
            let report = CycleReport {
                outcome: Err(
                    "the cycle overran its deadline before its transaction: abandoned, nothing applied"
                        .into(),
                ),
                sources,
                v4: self.state.applied.as_ref().map_or(0, |a| a.v4.len()),
                v6: self.state.applied.as_ref().map_or(0, |a| a.v6.len()),
                duration_ms: started.elapsed().as_millis(),
                drift: None,
                kernel: None,
                state_error: None,
                success: false,
                desired,
                requests,
                usersig_expiries,
                guards,
            };
            log_cycle(&report);
            return report;
        };
        self.state = state;
        match &enforce_error {
            Some(e @ BackendError::FollowUp { .. }) => {
                error!(error = %e, "the sync is written, but what follows it failed")
            }
            Some(e) => error!(error = %e, "cannot install the enforcement rules; the sets are in place"),
            None => {}
        }
        if let Some(d) = &drift {
            error!(drift = %d, "drift: the kernel set differs from what allowsync last applied; repairing");
        }
        let mut outcome = result.map(|(o, _)| o).map_err(|e| e.to_string());
        if let Ok(Outcome::Refused(r)) = &outcome {
            guards.push(r.guard());
        }
        if let (Some(e), Ok(Outcome::InSync | Outcome::Applied { .. })) = (&enforce_error, &outcome) {
            outcome = Err(match e {
                BackendError::FollowUp { .. } => e.to_string(),
                _ => format!("enforcement: {e}"),
            });
        }
        let state_error = saved.err().map(|e| e.to_string());
        if let Some(e) = &state_error {
            error!(
                error = %e,
                "cannot write the state file: the kernel holds this sync; keeping the state in memory and writing it again next cycle"
            );
            if outcome.is_ok() {
                outcome = Err(e.clone());
            }
        }
        let (v4, v6) = match &self.state.applied {
            Some(a) => (a.v4.len(), a.v6.len()),
            None => (0, 0),
        };
        let report = CycleReport {
            outcome,
            sources,
            v4,
            v6,
            duration_ms: started.elapsed().as_millis(),
            drift,
            kernel,
            state_error,
            success,
            desired,
            requests,
            usersig_expiries,
            guards,
        };
        log_cycle(&report);
        report
    }

    /// Fetches and plans against the live set without changing anything, not even the state.
    pub async fn plan(&mut self) -> Result<(Desired, Plan), SyncerError> {
        let fetched = self.sources.fetch_all_with(self.sources.kept_for_fetch(&self.state.sources)).await;
        let desired = Desired::build(fetched, &self.state);
        let current = match self.on_backend(|b| b.read()).await {
            // On a host where allowsync never ran the set does not exist yet: plan against
            // nothing rather than fail, since plan creates nothing.
            Err(e) if e.is_missing() => {
                warn!(error = %e, "cannot read the live set: planning against an empty one");
                AllowSet::default()
            }
            other => other?,
        };
        let p = engine::plan(current, &desired, &self.cfg.safety, false);
        Ok((desired, p))
    }
}

/// [`Syncer::restore`]'s work, on a blocking-pool thread.
fn restore_into(backend: &mut dyn Backend, applied: Option<AllowSet>) -> Result<usize, SyncerError> {
    backend.ensure()?;
    let Some(applied) = applied else { return Ok(0) };
    let mut retried = false;
    loop {
        let current = backend.read()?;
        if !current.is_empty() {
            return Ok(0);
        }
        let diff = current.diff_to(&applied);
        if diff.is_empty() {
            return Ok(0);
        }
        match backend.apply(&diff) {
            Ok(()) => {
                info!(
                    added = diff.added(),
                    v4 = applied.v4.len(),
                    v6 = applied.v6.len(),
                    "restored the last good allowlist from the state file"
                );
                return Ok(diff.added());
            }
            // Someone filled the set meanwhile: read again; if it now holds anything, it
            // is left alone like any non-empty set.
            Err(e) if e.is_conflict() && !retried => {
                warn!(error = %e, "the set changed while restoring: reading it again");
                retried = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs `f` on tokio's blocking pool and waits for it; a panic in `f` is resumed here.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a blocking task did not finish: {e}"),
        },
    }
}

fn drift_of(plan: &Plan, applied: &AllowSet) -> Option<String> {
    if &plan.current == applied {
        return None;
    }
    let missing = applied.lost_in(&plan.current);
    let extra = plan.current.lost_in(applied);
    Some(format!(
        "{} missing (e.g. {}), {} unexpected (e.g. {})",
        missing.len(),
        missing.first().map_or("-", String::as_str),
        extra.len(),
        extra.first().map_or("-", String::as_str)
    ))
}

fn log_cycle(r: &CycleReport) {
    let sources: Vec<String> = r
        .sources
        .iter()
        .map(|s| match &s.status {
            SourceStatus::Fresh { ranges } if s.skipped > 0 => {
                format!("{}=ok({ranges}, {} skipped)", s.name, s.skipped)
            }
            SourceStatus::Fresh { ranges } => format!("{}=ok({ranges})", s.name),
            SourceStatus::Stale { .. } => format!("{}=failed(kept last good)", s.name),
            SourceStatus::Missing { .. } => format!("{}=failed(no last good)", s.name),
        })
        .collect();
    let sources = sources.join(" ");
    match &r.outcome {
        Ok(Outcome::Applied { added, removed }) => info!(
            outcome = "applied", added, removed, v4 = r.v4, v6 = r.v6, duration_ms = r.duration_ms as u64, %sources,
            "sync"
        ),
        Ok(Outcome::InSync) => info!(
            outcome = "in-sync", added = 0, removed = 0, v4 = r.v4, v6 = r.v6, duration_ms = r.duration_ms as u64, %sources,
            "sync"
        ),
        Ok(Outcome::Refused(reason)) => error!(
            outcome = "refused", %reason, v4 = r.v4, v6 = r.v6, duration_ms = r.duration_ms as u64, %sources,
            "sync refused"
        ),
        Err(e) => error!(
            outcome = "failed", error = %e, v4 = r.v4, v6 = r.v6, duration_ms = r.duration_ms as u64, %sources,
            "sync failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/crash.rs: killed between the kernel commit of list B and the state write
    /// (which still said A), a restart restored A into the set holding B, and a second kill left
    /// the mix A+B in the kernel.
    #[test]
    fn restore_fills_an_empty_set_only_never_mixes_into_a_newer_one() {
        use allowsync_testkit::set;

        use crate::backend::memory::MemoryBackend;
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("config.yaml");
        let cfg = crate::config::parse(
            "sources:\n  - name: s\n    static: [192.0.2.1]\nstate_file: state.json\n",
            &cfg_path,
        )
        .and_then(crate::config::Parsed::resolve)
        .unwrap();
        let (a, b): (AllowSet, AllowSet) = (set(["10.0.0.1", "10.0.0.3"]), set(["10.1.0.1"]));
        let st = State { applied: Some(a.clone()), ..State::default() };
        StateFile::new(&cfg.state_file).save(&st).unwrap();

        // The kernel already holds a newer list: left as it is.
        let mem = MemoryBackend::new();
        *mem.shared().lock().unwrap() = b.clone();
        let mut syncer = Syncer::with_backend(cfg.clone(), Box::new(mem.clone()), true).unwrap();
        let rt = runtime();
        assert_eq!(rt.block_on(syncer.restore()).unwrap(), 0);
        assert_eq!(*mem.shared().lock().unwrap(), b);
        drop(syncer);

        // An empty set (after a reboot) gets the last applied list back.
        let mem = MemoryBackend::new();
        let mut syncer = Syncer::with_backend(cfg, Box::new(mem.clone()), true).unwrap();
        assert_eq!(rt.block_on(syncer.restore()).unwrap(), 2);
        assert_eq!(*mem.shared().lock().unwrap(), a);
    }

    /// The daemon's runtime: one thread, so a backend call on it would stall everything.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A backend whose every `ensure` blocks until the test lets it go.
    struct Gate {
        inner: crate::backend::memory::MemoryBackend,
        entered: tokio::sync::mpsc::UnboundedSender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Backend for Gate {
        fn name(&self) -> &'static str {
            "gate"
        }
        fn ensure(&mut self) -> Result<(), BackendError> {
            self.entered.send(()).unwrap();
            // Bounded: if this blocks the runtime's only thread, nothing can release it, and
            // the call fails rather than hanging the test.
            self.release.recv_timeout(std::time::Duration::from_secs(20)).map_err(|_| {
                BackendError::Unavailable("never released: the backend call blocked the runtime".into())
            })?;
            self.inner.ensure()
        }
        fn read(&mut self) -> Result<AllowSet, BackendError> {
            self.inner.read()
        }
        fn apply(&mut self, diff: &crate::prefixes::Diff) -> Result<(), BackendError> {
            self.inner.apply(diff)
        }
        fn teardown(&mut self) -> Result<crate::ownership::Teardown, BackendError> {
            self.inner.teardown()
        }
    }

    #[test]
    fn the_runtime_keeps_serving_other_tasks_while_a_backend_call_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::parse(
            "sources:\n  - name: s\n    static: [192.0.2.1]\nstate_file: state.json\n",
            &dir.path().join("config.yaml"),
        )
        .and_then(crate::config::Parsed::resolve)
        .unwrap();
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let mem = crate::backend::memory::MemoryBackend::new();
        let gate = Gate { inner: mem.clone(), entered: entered_tx, release: release_rx };
        let mut syncer = Syncer::with_backend(cfg, Box::new(gate), true).unwrap();
        // Runs next to a blocked backend call: waits until the call has started, shows that
        // the runtime still runs another task meanwhile, then lets the call go.
        let meanwhile = async |entered: &mut tokio::sync::mpsc::UnboundedReceiver<()>| {
            entered.recv().await.unwrap();
            let served = tokio::spawn(async { "served" }).await.unwrap();
            release.send(()).unwrap();
            served
        };
        runtime().block_on(async {
            let (restored, served) = tokio::join!(syncer.restore(), meanwhile(&mut entered));
            assert_eq!((restored.unwrap(), served), (0, "served"));
            let (report, served) = tokio::join!(syncer.cycle(false), meanwhile(&mut entered));
            assert!(report.outcome.is_ok(), "{:?}", report.outcome);
            assert_eq!(served, "served");
        });
        assert_eq!(*mem.shared().lock().unwrap(), AllowSet::from_nets(["192.0.2.1/32".parse().unwrap()]));
    }
}
