//! The state file: what allowsync must remember across restarts and reboots.
//!
//! It holds, per source, the last list that was fetched *and* applied (the fallback when that
//! source fails), the allowlist last applied to the kernel (restored at start before any fetch,
//! so a reboot with the API unreachable still gets its allowlist back), the outcome of the last
//! sync, and the health `status` reports ([`crate::health`]: last attempt, last success, per
//! source).
//!
//! Writes are atomic: a temporary file in the same directory is written and fsynced, renamed
//! over the old file, and the directory fsynced, so a crash at any moment leaves either the old
//! or the new file. A file that does not parse, or has an unknown version, is never trusted and
//! never deleted: it is renamed to `state.json.corrupt-<unix time>` and allowsync starts empty.
//!
//! Next to it lives the lock (`state.json.lock`, [`StateFile::lock`]) that `run`, `once` and
//! `teardown` hold: one allowsync at a time on a state, and so on its table.
//!
//! A state file that is a symbolic link is refused, for reading and writing: the rename would
//! replace the link with a regular file (leaving its target stale), and the lock is taken by
//! the configured path, so a second configuration naming the target would not see it.

use std::collections::BTreeMap;
use std::fs;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::clock;
use crate::health::Health;
use crate::ownership::Footprint;
use crate::prefixes::AllowSet;

/// The only format version this build reads and writes.
pub(crate) const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Per source name: its last good list.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceState>,
    /// The allowlist last applied to the kernel, if any.
    #[serde(default)]
    pub applied: Option<AllowSet>,
    /// When the last sync succeeded (unix seconds).
    #[serde(default)]
    pub last_sync: Option<u64>,
    /// The last failure or refusal, cleared by the next successful sync.
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// The kernel objects allowsync created and the sets it fills (see [`crate::ownership`]).
    /// Absent in a state file from before the ownership marks: nothing is then recorded as allowsync's.
    #[serde(default, skip_serializing_if = "Footprint::is_empty")]
    pub objects: Footprint,
    /// The last attempt and the last success, per source too, for `status` (see
    /// [`crate::health`]). Absent in a state file of an earlier version: nothing known yet.
    #[serde(default)]
    pub health: Health,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: VERSION,
            sources: BTreeMap::new(),
            applied: None,
            last_sync: None,
            last_error: None,
            objects: Footprint::default(),
            health: Health::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceState {
    pub list: AllowSet,
    /// When this list was fetched (unix seconds).
    pub fetched_at: u64,
    /// A `url` source's: what its list was published as (absent for other sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
}

/// What a `url` source keeps with its last good list: the `ETag` to ask again with
/// (`If-None-Match`, so an unchanged list costs one 304, in `once` runs too) and the list's
/// `generated_at`, so that a 304 still tells how old the list is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// The URL the list came from: an ETag means nothing to another URL.
    pub url: String,
    /// As the server sent it (untrusted: escaped wherever it is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The list's `generated_at` (unix seconds).
    pub generated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastError {
    pub at: u64,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {op}: {cause}")]
    Io { path: PathBuf, op: &'static str, cause: std::io::Error },
    #[error("another allowsync (pid {pid}) already manages this state ({lock}); stop it first")]
    Locked { pid: String, lock: PathBuf },
    #[error("lock file {path}: {cause}")]
    Lock { path: PathBuf, cause: std::io::Error },
    #[error(
        "state file {path} is a symbolic link (to {target}): allowsync does not follow it; set state_file to the file itself"
    )]
    Symlink { path: PathBuf, target: PathBuf },
}

/// The state file on disk.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |cause| StateError::Io { path: self.path.clone(), op, cause }
    }

    /// Reads the state. A missing file is an empty state. A corrupt or unknown-version file is
    /// set aside (renamed, logged as an error) and an empty state returned: never trusted.
    /// Only an I/O error other than "not found" is an error.
    pub fn load(&self) -> Result<State, StateError> {
        self.refuse_symlink()?;
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(self.io("read")(e)),
        };
        match parse(&bytes) {
            Ok(state) => Ok(state),
            Err(reason) => {
                let aside = self.set_aside()?;
                error!(
                    path = %self.path.display(),
                    moved_to = %aside.display(),
                    %reason,
                    "state file is corrupt: set aside, starting without a last good list"
                );
                Ok(State::default())
            }
        }
    }

    /// Reads the state without side effects (for `status`): `Err` with the reason when the file
    /// is corrupt, instead of setting it aside.
    pub fn peek(&self) -> Result<Option<State>, String> {
        self.refuse_symlink().map_err(|e| e.to_string())?;
        match fs::read(&self.path) {
            Ok(b) => parse(&b).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// See the module header.
    fn refuse_symlink(&self) -> Result<(), StateError> {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&self.path).map_err(self.io("read link"))?;
                Err(StateError::Symlink { path: self.path.clone(), target })
            }
            _ => Ok(()),
        }
    }

    fn set_aside(&self) -> Result<PathBuf, StateError> {
        let mut aside = self.path.as_os_str().to_owned();
        aside.push(format!(".corrupt-{}", clock::now_unix()));
        let mut aside = PathBuf::from(aside);
        // Two corrupt files in one second must not overwrite each other.
        let mut n = 1;
        while aside.exists() {
            aside.set_extension(format!("{}-{n}", aside.extension().and_then(|e| e.to_str()).unwrap_or("")));
            n += 1;
        }
        fs::rename(&self.path, &aside).map_err(self.io("set aside"))?;
        Ok(aside)
    }

    /// Writes the state atomically (see the module header).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.stage(state)?.commit()
    }

    /// First half of [`StateFile::save`]: the new state written and fsynced to a temporary file
    /// next to the real one, which is not touched yet.
    pub(crate) fn stage(&self, state: &State) -> Result<Staged<'_>, StateError> {
        self.refuse_symlink()?;
        let dir = self.dir();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(self.io("create directory"))?;
        }
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // tempfile creates the file with mode 0600 and a random name: no other process can have
        // it open, and a crash leaves at most a stray `.state.json.XXXX.tmp`.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(self.io("create temporary file"))?;
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        tmp.write_all(&json).and_then(|()| tmp.write_all(b"\n")).map_err(self.io("write"))?;
        tmp.as_file().sync_all().map_err(self.io("fsync"))?;
        Ok(Staged { file: self, tmp })
    }

    fn dir(&self) -> &Path {
        self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// The lock next to the state file, held while alive: one allowsync at a time on a state (and
/// so on its table). The kernel drops it when the process dies, however it dies, so a stale
/// lock cannot block a restart.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateFile {
    /// The lock file: the state file's path with `.lock` appended.
    pub fn lock_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock that `run`, `once` and `teardown` hold while they work. A lock already
    /// held is [`StateError::Locked`], naming the holder's pid.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        take_lock(&self.lock_path()).map(|file| StateLock { _file: file })
    }

    /// The same lock through a read-only descriptor of an existing lock file, for a daemon whose
    /// state directory cannot be written: another instance sees it held all the same, it just
    /// cannot say our pid. [`StateError::Locked`] when another holds it.
    pub fn lock_read_only(&self) -> Result<StateLock, StateError> {
        let path = self.lock_path();
        let io = |cause| StateError::Lock { path: path.clone(), cause };
        let f = File::open(&path).map_err(io)?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(StateLock { _file: f }),
            Err(errno) => Err(locked_or(f, &path, std::io::Error::from(errno))),
        }
    }
}

/// [`StateError::Locked`] (naming the holder's pid as its lock file says) when `err` is
/// `EWOULDBLOCK`, else the I/O error.
fn locked_or(mut f: File, path: &Path, err: std::io::Error) -> StateError {
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return StateError::Lock { path: path.to_path_buf(), cause: err };
    }
    let mut pid = String::new();
    let _ = f.read_to_string(&mut pid);
    let pid = pid.trim();
    StateError::Locked {
        pid: if pid.is_empty() { "unknown".into() } else { pid.into() },
        lock: path.to_path_buf(),
    }
}

/// Takes an exclusive `flock` on the lock file and writes our pid into it. The kernel drops the
/// lock when the process dies, however it dies, so a stale lock cannot block a restart.
fn take_lock(path: &Path) -> Result<File, StateError> {
    let io = |cause| StateError::Lock { path: path.to_path_buf(), cause };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    let mut f =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    if let Err(errno) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        return Err(locked_or(f, path, std::io::Error::from(errno)));
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(f)
}

/// A state written to its temporary file, not yet in place.
pub(crate) struct Staged<'a> {
    file: &'a StateFile,
    tmp: tempfile::NamedTempFile,
}

impl Staged<'_> {
    /// Renames the temporary file over the state file and fsyncs the directory, so the rename
    /// itself survives a power cut.
    pub fn commit(self) -> Result<(), StateError> {
        let f = self.file;
        self.tmp.persist(&f.path).map_err(|e| f.io("rename into place")(e.error))?;
        let dir = fs::File::open(f.dir()).map_err(f.io("open directory"))?;
        dir.sync_all().map_err(f.io("fsync directory"))?;
        Ok(())
    }

    /// Leaves the temporary file behind as a crash would.
    #[cfg(test)]
    fn abandon(self) -> PathBuf {
        let (_, path) = self.tmp.keep().expect("keep temporary file");
        path
    }
}

/// Parses a state file's bytes: `Err` with the reason when it is corrupt or of another version.
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    // Look at the version first, so an unknown version is reported as such rather than as a
    // schema mismatch.
    #[derive(Deserialize)]
    struct Version {
        version: Option<u32>,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match v.version {
        Some(VERSION) => {}
        Some(other) => return Err(format!("unknown version {other} (this build reads version {VERSION})")),
        None => return Err("no version field".into()),
    }
    let state: State = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(state)
}

/// Warns about a state that references sources no longer configured: their lists are dropped
/// from the fallback so a removed source stops contributing.
pub(crate) fn forget_unknown_sources<'a>(state: &mut State, configured: impl IntoIterator<Item = &'a str>) {
    let keep: std::collections::HashSet<&str> = configured.into_iter().collect();
    let gone: Vec<String> = state.sources.keys().filter(|k| !keep.contains(k.as_str())).cloned().collect();
    for name in gone {
        warn!(source = %name, "source is no longer configured: forgetting its last good list");
        state.sources.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        let set: AllowSet = allowsync_testkit::set(["10.0.0.0/24", "2001:db8::/48"]);
        let mut s = State::default();
        s.sources.insert(
            "chat".into(),
            SourceState { list: set.clone(), fetched_at: 1_700_000_000, published: None },
        );
        s.applied = Some(set);
        s.last_sync = Some(1_700_000_001);
        s.last_error = Some(LastError { at: 1_700_000_002, message: "boom".into() });
        s
    }

    #[test]
    fn a_second_lock_names_the_first_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json.lock");
        let _first = take_lock(&p).unwrap();
        match take_lock(&p) {
            Err(StateError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(_first);
        assert!(take_lock(&p).is_ok(), "released with the file");

        // Read-only (a daemon whose state directory cannot be written): the same lock.
        let file = StateFile::new(dir.path().join("state.json"));
        let held = file.lock().unwrap();
        assert!(matches!(file.lock_read_only(), Err(StateError::Locked { .. })));
        drop(held);
        let ro = file.lock_read_only().unwrap();
        assert!(
            matches!(file.lock(), Err(StateError::Locked { .. })),
            "held through the read-only descriptor"
        );
        drop(ro);
    }

    #[test]
    fn round_trip_with_mode_0600_in_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("sub/state.json"));
        assert_eq!(f.load().unwrap(), State::default(), "missing file is an empty state");
        f.save(&sample()).unwrap();
        assert_eq!(f.load().unwrap(), sample());
        let mode = fs::metadata(f.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = fs::metadata(dir.path().join("sub")).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        let text = fs::read_to_string(f.path()).unwrap();
        assert!(text.contains("\"version\": 1") && text.contains("10.0.0.0/24"), "{text}");
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("state.json"));
        f.save(&sample()).unwrap();
        let mut newer = sample();
        newer.last_sync = Some(1_800_000_000);
        let tmp = f.stage(&newer).unwrap().abandon();
        assert!(tmp.exists());
        assert_eq!(f.load().unwrap(), sample());
        // And the next save still works with the stray file around.
        f.save(&newer).unwrap();
        assert_eq!(f.load().unwrap(), newer);
    }

    #[test]
    fn corrupt_and_unknown_versions_are_set_aside_not_trusted() {
        for bad in [
            "{\"version\": 1, \"sources\": {",
            "not json",
            "{\"version\": 2}",
            "{}",
            "{\"version\":1,\"applied\":[\"10.0.0.300/8\"]}",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let f = StateFile::new(dir.path().join("state.json"));
            fs::write(f.path(), bad).unwrap();
            assert!(f.peek().is_err(), "{bad}");
            assert_eq!(f.load().unwrap(), State::default(), "{bad}");
            assert!(!f.path().exists());
            let aside: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(aside.len(), 1, "{aside:?}");
            assert!(aside[0].starts_with("state.json.corrupt-"), "{aside:?}");
            assert_eq!(fs::read_to_string(dir.path().join(&aside[0])).unwrap(), bad, "kept as it was");
        }
    }

    #[test]
    fn a_symlinked_state_file_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.json");
        let f = StateFile::new(dir.path().join("state.json"));
        StateFile::new(&target).save(&sample()).unwrap();
        std::os::unix::fs::symlink(&target, f.path()).unwrap();
        let before = fs::read(&target).unwrap();
        let want = format!(
            "state file {} is a symbolic link (to {}): allowsync does not follow it; set state_file to the file itself",
            f.path().display(),
            target.display()
        );
        assert_eq!(f.load().unwrap_err().to_string(), want);
        assert_eq!(f.peek().unwrap_err(), want);
        assert_eq!(f.save(&State::default()).unwrap_err().to_string(), want);
        assert!(fs::symlink_metadata(f.path()).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(fs::read(&target).unwrap(), before, "the target is untouched");
    }

    #[test]
    fn the_owned_objects_round_trip_and_a_file_without_them_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("state.json"));
        let mut st = sample();
        st.objects.owned.insert("table inet allowsync".parse().unwrap());
        st.objects.sets =
            vec!["set ip filter chat_v4".parse().unwrap(), "set ip6 filter chat_v6".parse().unwrap()];
        f.save(&st).unwrap();
        assert_eq!(f.load().unwrap(), st);
        let text = fs::read_to_string(f.path()).unwrap();
        assert!(
            text.contains("\"table inet allowsync\"") && text.contains("\"set ip filter chat_v4\""),
            "{text}"
        );
        // A state file written before the ownership record: loaded, nothing owned.
        fs::write(f.path(), "{\"version\": 1, \"applied\": [\"10.0.0.0/24\"]}").unwrap();
        assert!(f.load().unwrap().objects.is_empty());
    }

    #[test]
    fn a_url_sources_etag_round_trips_and_other_sources_write_none() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("state.json"));
        f.save(&sample()).unwrap();
        assert!(!fs::read_to_string(f.path()).unwrap().contains("published"));
        let mut st = sample();
        st.sources.get_mut("chat").unwrap().published = Some(Published {
            url: "https://relay.example/chat.json".into(),
            etag: Some("W/\"x\u{1b}\"".into()),
            generated_at: 1_700_000_000,
        });
        f.save(&st).unwrap();
        assert_eq!(f.load().unwrap(), st);
    }

    #[test]
    fn forgetting_removed_sources() {
        let mut s = sample();
        forget_unknown_sources(&mut s, ["other"]);
        assert!(s.sources.is_empty());
        let mut s = sample();
        forget_unknown_sources(&mut s, ["chat"]);
        assert_eq!(s.sources.len(), 1);
    }
}
