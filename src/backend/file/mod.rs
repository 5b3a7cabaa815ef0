//! The `file` backend: the allowlist written to a file, for a proxy (`nginx`, `haproxy`), a
//! web server that publishes it to a fleet (`json`, see [`crate::published`]) or anything that
//! reads `plain` lines. The engine treats it like a kernel set: [`Backend::read`] parses the
//! file, so a hand edit is drift and the next sync writes the list back; a file that does not
//! parse reads as empty (drift, never a crash) and is rewritten with the next diff.
//!
//! - **Atomic**: a temporary file next to it (`.<name>.allowsync-tmp`, one fixed name so that a
//!   crash leaves at most one behind, replaced at the next write) is written and fsynced, renamed
//!   over the file, and the directory fsynced. Readers see the old file or the new, whole.
//! - **Liveness vs churn**: a change is written at once; an unchanged list is rewritten with a
//!   fresh `generated_at` once per `refresh` (checked after each sync), never every cycle.
//! - **on_change** runs after a write that changed the prefixes (the first write counts, and so
//!   does a repaired hand edit), not after a refresh. A failure leaves the file written, fails
//!   the cycle, and is retried at every sync until it succeeds; the state file records it as
//!   pending ([`Footprint::on_change_pending`]), so a restart retries it too.
//! - **Ownership**: the file is allowsync's when the state file records that allowsync created
//!   it. An existing file it has no record of is adopted only when it parses as the configured
//!   format (for the text formats that means [`format::HEADER`] as its first line): then it was
//!   written by an allowsync, and nothing of the operator's is lost. Any other file, a symbolic
//!   link or a directory in its place is [`BackendError::Foreign`] and never written.
//! - **Mode**: a new file is 0644 (a web server or proxy reads it); rewriting keeps the
//!   existing file's mode and, where allowsync may set them, its owner and group.

mod format;
mod on_change;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::{Backend, BackendError};
use crate::clock::{Clock, SystemClock};
use crate::config::{FileConfig, FileFormat};
use crate::ownership::{Footprint, Object, Teardown};
use crate::prefixes::{AllowSet, ApplyError, Diff};

/// A new file's mode.
const NEW_MODE: u32 = 0o644;

/// What the last [`Backend::read`] found.
#[derive(Debug, Clone)]
struct Seen {
    set: AllowSet,
    /// The file's `generated_at`, when it parsed.
    generated_at: Option<u64>,
    /// The file is byte for byte what allowsync writes for `set` and `generated_at`.
    exact: bool,
    exists: bool,
}

#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    format: FileFormat,
    on_change: Option<Vec<String>>,
    on_change_timeout: Duration,
    refresh: Duration,
    clock: Arc<dyn Clock>,
    seen: Option<Seen>,
    /// allowsync created (or adopted) the file.
    owned: bool,
    /// The prefixes changed since `on_change` last succeeded.
    pending: bool,
    /// The state file's record, for what belongs to other backends or paths.
    recorded: Footprint,
}

impl FileBackend {
    pub fn new(cfg: &FileConfig) -> FileBackend {
        FileBackend::with_clock(cfg, Arc::new(SystemClock))
    }

    /// With the clock `generated_at` is taken from (tests fix it).
    pub fn with_clock(cfg: &FileConfig, clock: Arc<dyn Clock>) -> FileBackend {
        FileBackend {
            path: cfg.path.clone(),
            format: cfg.format,
            on_change: cfg.on_change.clone(),
            on_change_timeout: cfg.on_change_timeout,
            refresh: cfg.refresh,
            clock,
            seen: None,
            owned: false,
            pending: false,
            recorded: Footprint::default(),
        }
    }

    fn object(&self) -> Object {
        Object::File { path: self.path.clone() }
    }

    fn dir(&self) -> &Path {
        self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> BackendError + '_ {
        move |cause| BackendError::Kernel { op, object: self.object().to_string(), cause }
    }

    fn foreign(&self, why: String) -> BackendError {
        BackendError::Foreign {
            object: self.object().to_string(),
            why,
            fix: "allowsync never writes over a file it did not create: move it away, or set backend.file.path to another file".into(),
        }
    }

    /// The temporary file every write goes through.
    fn temp_path(&self) -> PathBuf {
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.dir().join(format!(".{name}.allowsync-tmp"))
    }

    /// Writes `set` with `generated_at` now, atomically (see the module header).
    fn write(&mut self, set: &AllowSet) -> Result<(), BackendError> {
        let now = self.clock.now_unix();
        let bytes = format::render(self.format, set, now);
        self.stage(&bytes)?;
        fs::rename(self.temp_path(), &self.path).map_err(|e| {
            let _ = fs::remove_file(self.temp_path());
            self.io("rename into place")(e)
        })?;
        File::open(self.dir()).and_then(|d| d.sync_all()).map_err(self.io("fsync directory"))?;
        self.owned = true;
        self.seen = Some(Seen { set: set.clone(), generated_at: Some(now), exact: true, exists: true });
        Ok(())
    }

    /// The first half of a write: `bytes` in the temporary file, fsynced, with the file's mode
    /// and owner. The file itself is not touched yet.
    fn stage(&self, bytes: &[u8]) -> Result<(), BackendError> {
        let tmp = self.temp_path();
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(self.io("remove the old temporary file")(e));
            }
            _ => {}
        }
        let existing = fs::symlink_metadata(&self.path).ok().filter(|m| m.is_file());
        let staged = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(bytes)?;
            let mode = match &existing {
                Some(m) => {
                    let mine = f.metadata()?;
                    if (mine.uid(), mine.gid()) != (m.uid(), m.gid()) {
                        std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
                    }
                    m.permissions().mode() & 0o777
                }
                None => NEW_MODE,
            };
            // After the chown, which would clear set-id bits, and past the umask.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.sync_all()
        })();
        staged.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io("write the temporary file")(e)
        })
    }

    /// The file's contents, or `None` when there is none.
    fn load(&self) -> Result<Option<Vec<u8>>, BackendError> {
        match fs::symlink_metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("stat")(e)),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(self.foreign("is a symbolic link (the rename would replace it)".into()));
            }
            Ok(m) if !m.is_file() => return Err(self.foreign("is not a regular file".into())),
            Ok(_) => {}
        }
        fs::read(&self.path).map(Some).map_err(self.io("read"))
    }

    /// Whether an unchanged file is due for a fresh `generated_at`. A time in the future (the
    /// clock was set back) is due too: consumers judge the age by it.
    fn refresh_due(&self, generated_at: Option<u64>) -> bool {
        let now = self.clock.now_unix();
        generated_at.is_none_or(|t| t > now || now - t >= self.refresh.as_secs())
    }
}

impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    /// Checks the directory and that the file may be written (see the module header); never
    /// creates the file (an empty one would publish an empty allowlist).
    fn ensure(&mut self) -> Result<(), BackendError> {
        if !self.dir().is_dir() {
            return Err(BackendError::Absent {
                object: format!("directory {}", self.dir().display()),
                fix: "create it (allowsync writes the file, never its directory)".into(),
            });
        }
        let Some(bytes) = self.load()? else { return Ok(()) };
        if self.owned {
            return Ok(());
        }
        match format::parse(self.format, &bytes) {
            Ok(_) => {
                info!(file = %self.path.display(), format = self.format.as_str(), "adopting the file: it is an allowlist allowsync wrote");
                self.owned = true;
                Ok(())
            }
            Err(why) => Err(self.foreign(format!(
                "exists and allowsync has no record of creating it, and it is not a `{}` file allowsync wrote ({why})",
                self.format.as_str()
            ))),
        }
    }

    /// The file: a second allowsync writing it is refused, like one on the same sets.
    fn managed(&self) -> Vec<Object> {
        vec![self.object()]
    }

    fn set_recorded(&mut self, recorded: &Footprint) {
        let me = self.object();
        self.owned = recorded.owned.contains(&me);
        self.pending = recorded.on_change_pending.contains(&me);
        self.recorded = recorded.clone();
    }

    fn footprint(&self) -> Option<Footprint> {
        let me = self.object();
        let mut f = self.recorded.clone();
        f.sets.clear();
        f.owned.remove(&me);
        f.on_change_pending.remove(&me);
        if self.owned {
            f.owned.insert(me.clone());
        }
        if self.pending {
            f.on_change_pending.insert(me);
        }
        Some(f)
    }

    /// What the file holds; absent, it holds nothing, and one that does not parse reads as
    /// empty (logged: it is drift, rewritten with the next diff).
    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let Some(bytes) = self.load()? else {
            self.seen =
                Some(Seen { set: AllowSet::default(), generated_at: None, exact: false, exists: false });
            return Ok(AllowSet::default());
        };
        let seen = match format::parse(self.format, &bytes) {
            Ok(p) => {
                let exact = format::render(self.format, &p.set, p.generated_at) == bytes;
                Seen { set: p.set, generated_at: Some(p.generated_at), exact, exists: true }
            }
            Err(why) => {
                error!(file = %self.path.display(), %why, "the file does not parse: reading it as empty (drift); the next sync writes it whole");
                Seen { set: AllowSet::default(), generated_at: None, exact: false, exists: true }
            }
        };
        self.seen = Some(seen.clone());
        Ok(seen.set)
    }

    /// Writes the file with the diff applied to what [`Backend::read`] found; `on_change` is
    /// then due (see [`Backend::enforce`]).
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        let base = match &self.seen {
            Some(s) => s.set.clone(),
            None => self.read()?,
        };
        let next = base.apply(diff).map_err(|e| BackendError::Conflict {
            op: match e {
                ApplyError::NotFound(_) => "delete element",
                ApplyError::Overlap(_) => "add element",
            },
            object: self.object().to_string(),
            detail: e.to_string(),
        })?;
        self.write(&next)?;
        if next != base {
            self.pending = true;
        }
        Ok(())
    }

    /// After every sync: an unchanged file that is due is rewritten with a fresh
    /// `generated_at`, one whose bytes differ from allowsync's rendering of the same list is
    /// rewritten, and a pending `on_change` is run. A file that did not parse is left to the
    /// next diff: rewriting it here, with what it read as (nothing), would publish an empty list.
    fn enforce(&mut self) -> Result<(), BackendError> {
        if let Some(seen) = self.seen.clone().filter(|s| s.exists && s.generated_at.is_some()) {
            if !seen.exact || self.refresh_due(seen.generated_at) {
                self.write(&seen.set)?;
                if seen.exact {
                    info!(file = %self.path.display(), "refreshed the file's generated_at (the list is unchanged)");
                } else {
                    warn!(file = %self.path.display(), "the file was edited but holds the same prefixes: rewritten as allowsync writes it");
                }
            }
        }
        if !self.pending {
            return Ok(());
        }
        let Some(argv) = &self.on_change else {
            self.pending = false;
            return Ok(());
        };
        match on_change::run(argv, self.on_change_timeout) {
            Ok(()) => {
                info!(file = %self.path.display(), program = %argv[0], "on_change ran");
                self.pending = false;
                Ok(())
            }
            Err(cause) => Err(BackendError::FollowUp {
                object: self.object().to_string(),
                what: format!("on_change {}", argv[0]),
                cause,
            }),
        }
    }

    /// Removes the file if allowsync created it; any other file is left.
    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        let mut t = Teardown::default();
        let exists = fs::symlink_metadata(&self.path).is_ok();
        match (exists, self.owned) {
            (true, true) => {
                fs::remove_file(&self.path).map_err(self.io("remove"))?;
                let _ = File::open(self.dir()).and_then(|d| d.sync_all());
                t.removed.push(self.object().to_string());
            }
            (true, false) => t.left.push(format!("{}: allowsync did not create it", self.object())),
            (false, _) => {}
        }
        self.owned = false;
        self.pending = false;
        Ok(t)
    }
}

#[cfg(test)]
mod tests;
