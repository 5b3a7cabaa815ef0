//! One manager per kernel object: `run`, `once` and `teardown` hold an exclusive `flock` per
//! object they write to (see [`super::managed`]), whatever their state files, so a second
//! allowsync on the same sets exits naming the first one's pid and configuration file.
//!
//! The lock files live in `$RUNTIME_DIRECTORY` (the unit's `RuntimeDirectory=allowsync`, kept
//! across restarts) or `/run/allowsync`, one per object, named after the network namespace
//! (its inode) and the object: `4026531840.set.inet.allowsync.allow_v4.lock`. Objects of the
//! same name in another network namespace (a container, a parallel test) are other objects,
//! and their locks other files. The kernel drops a lock when its holder dies, however it dies;
//! the files stay (a few bytes each, on a tmpfs) and are reused.
//!
//! Lock files are 0600. One that root creates (an `allowsync once` from a shell) is given to
//! the directory's owner, so that the service's own user can lock it later.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Object;

/// Where the lock files go when systemd does not say (`$RUNTIME_DIRECTORY`).
pub const DEFAULT_DIR: &str = "/run/allowsync";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another allowsync (pid {pid}, configuration {config}) already manages {object}; stop it first (lock {path})"
    )]
    Held { object: String, pid: String, config: String, path: PathBuf },
    #[error("lock file {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

/// The locks this process holds, one per object.
#[derive(Debug)]
pub struct ObjectLocks {
    dir: PathBuf,
    config: PathBuf,
    held: BTreeMap<Object, File>,
}

impl ObjectLocks {
    /// Locks every one of `objects` for this process (running with configuration `config`),
    /// or none: the first one held elsewhere is [`LockError::Held`], naming its holder.
    pub fn take(objects: &[Object], config: &Path) -> Result<ObjectLocks, LockError> {
        let mut locks = ObjectLocks { dir: lock_dir(), config: config.to_path_buf(), held: BTreeMap::new() };
        locks.retarget(objects)?;
        Ok(locks)
    }

    /// Moves the locks to `objects` (a reloaded configuration): those still needed are kept,
    /// the new ones taken, and only then the others released. On error nothing changes.
    pub fn retarget(&mut self, objects: &[Object]) -> Result<(), LockError> {
        let netns = netns_inode().map_err(|cause| LockError::Io { path: netns_path().into(), cause })?;
        let mut wanted: Vec<&Object> = objects.iter().collect();
        wanted.sort();
        wanted.dedup();
        let mut taken = BTreeMap::new();
        for object in wanted.iter().filter(|o| !self.held.contains_key(**o)) {
            // On error, `taken` is dropped: what this call locked is released again.
            taken.insert((*object).clone(), lock_one(&self.dir, netns, object, &self.config)?);
        }
        self.held.retain(|o, _| wanted.contains(&o));
        self.held.append(&mut taken);
        Ok(())
    }

    /// The objects locked.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.held.keys()
    }
}

/// `$RUNTIME_DIRECTORY` (its first entry), else [`DEFAULT_DIR`].
fn lock_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The calling thread's network namespace (threads can differ; the daemon's do not).
fn netns_path() -> &'static str {
    "/proc/thread-self/ns/net"
}

fn netns_inode() -> io::Result<u64> {
    fs::metadata(netns_path()).or_else(|_| fs::metadata("/proc/self/ns/net")).map(|m| m.ino())
}

/// The lock file of `object` in network namespace `netns`: object names are letters, digits,
/// `_` and `-`, so dots separate the words unambiguously. A file (the `file` backend's) is named
/// by a digest of its path, which may hold anything and be long.
fn file_name(netns: u64, object: &Object) -> String {
    if let Object::File { path } = object {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
        let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
        return format!("{netns}.file.{hex}.lock");
    }
    format!("{netns}.{}.lock", object.to_string().replace(' ', "."))
}

fn lock_one(dir: &Path, netns: u64, object: &Object, config: &Path) -> Result<File, LockError> {
    let path = dir.join(file_name(netns, object));
    let io = |cause| LockError::Io { path: path.clone(), cause };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    let created = !path.exists();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io)?;
    if created {
        give_to_directory_owner(dir, &f);
    }
    if let Err(errno) = rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        let err = io::Error::from(errno);
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "unknown".into())
            };
            return Err(LockError::Held {
                object: object.to_string(),
                pid: field("pid "),
                config: field("config "),
                path,
            });
        }
        return Err(io(err));
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "pid {}\nconfig {}", std::process::id(), config.display()).map_err(io)?;
    Ok(f)
}

/// A lock file root creates belongs to the directory's owner (the service's user), who must be
/// able to open it later. Best effort: without the privilege it is ours already.
fn give_to_directory_owner(dir: &Path, f: &File) {
    if let Ok(m) = fs::metadata(dir) {
        let (uid, gid) = (rustix::fs::Uid::from_raw(m.uid()), rustix::fs::Gid::from_raw(m.gid()));
        let _ = rustix::fs::fchown(f, Some(uid), Some(gid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::NftFamily;

    fn set(name: &str) -> Object {
        Object::NftSet { family: NftFamily::Inet, table: "allowsync".into(), name: name.into() }
    }

    fn locks_in(dir: &Path, objects: &[Object], config: &str) -> Result<ObjectLocks, LockError> {
        let mut l = ObjectLocks { dir: dir.to_path_buf(), config: config.into(), held: BTreeMap::new() };
        l.retarget(objects)?;
        Ok(l)
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_nothing_is_half_taken() {
        let dir = tempfile::tempdir().unwrap();
        let first = locks_in(dir.path(), &[set("a"), set("b")], "/etc/allowsync/one.yaml").unwrap();
        // Wants `c` (free) and `b` (held): refused, and `c` not kept either.
        match locks_in(dir.path(), &[set("c"), set("b")], "/etc/allowsync/two.yaml") {
            Err(LockError::Held { object, pid, config, .. }) => {
                assert_eq!(object, "set inet allowsync b");
                assert_eq!(pid, std::process::id().to_string());
                assert_eq!(config, "/etc/allowsync/one.yaml");
            }
            other => panic!("{other:?}"),
        }
        assert!(locks_in(dir.path(), &[set("c")], "x").is_ok(), "c was released");
        let netns = netns_inode().unwrap();
        let name = dir.path().join(format!("{netns}.set.inet.allowsync.a.lock"));
        let mode = fs::metadata(&name).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        assert!(
            locks_in(dir.path(), &[set("a"), set("b")], "x").is_ok(),
            "released with the process's files"
        );
    }

    #[test]
    fn a_file_is_locked_by_a_digest_of_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = |p: &str| Object::File { path: p.into() };
        let long = format!("/srv/{}/chat.json", "d".repeat(300));
        let first = locks_in(dir.path(), &[file("/srv/a b/chat.json"), file(&long)], "one").unwrap();
        assert!(matches!(
            locks_in(dir.path(), &[file("/srv/a b/chat.json")], "two"),
            Err(LockError::Held { object, .. }) if object == "file /srv/a b/chat.json"
        ));
        assert!(locks_in(dir.path(), &[file("/srv/a/b/chat.json")], "two").is_ok());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "one flat file each");
        drop(first);
    }

    #[test]
    fn retargeting_keeps_what_is_still_needed_and_releases_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut mine = locks_in(dir.path(), &[set("a"), set("b")], "one").unwrap();
        // `a` is kept (a second flock of ours on it would conflict), `b` let go, `c` taken.
        mine.retarget(&[set("a"), set("c")]).unwrap();
        assert_eq!(mine.objects().cloned().collect::<Vec<_>>(), [set("a"), set("c")]);
        assert!(locks_in(dir.path(), &[set("b")], "two").is_ok());
        let other = locks_in(dir.path(), &[set("d")], "two").unwrap();
        // A retarget that cannot take everything changes nothing.
        assert!(mine.retarget(&[set("a"), set("e"), set("d")]).is_err());
        assert_eq!(mine.objects().cloned().collect::<Vec<_>>(), [set("a"), set("c")]);
        assert!(locks_in(dir.path(), &[set("e")], "two").is_ok(), "e was not kept");
        drop(other);
    }
}
