//! The file backend in a temporary directory, with a clock the tests move.

use std::sync::atomic::{AtomicU64, Ordering};

use allowsync_testkit::set;

use super::*;
use crate::config::Safety;
use crate::engine::{self, Desired, Outcome};

/// 2026-12-01T08:00:00Z, the fixtures' `generated_at`.
const T0: u64 = 1_796_112_000;

#[derive(Debug)]
struct TestClock(AtomicU64);

impl Clock for TestClock {
    fn now_unix(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Env {
    dir: tempfile::TempDir,
    clock: Arc<TestClock>,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap(), clock: Arc::new(TestClock(AtomicU64::new(T0))) }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("chat.out")
    }

    fn cfg(&self, format: FileFormat, on_change: Option<Vec<String>>) -> FileConfig {
        FileConfig {
            path: self.path(),
            format,
            on_change,
            on_change_timeout: Duration::from_secs(10),
            refresh: Duration::from_secs(900),
        }
    }

    fn backend(&self, format: FileFormat, on_change: Option<Vec<String>>) -> FileBackend {
        FileBackend::with_clock(&self.cfg(format, on_change), self.clock.clone())
    }

    fn advance(&self, secs: u64) {
        self.clock.0.fetch_add(secs, Ordering::SeqCst);
    }

    /// An on_change that appends a line to `runs` and exits with what `exit` holds.
    fn hook(&self) -> Vec<String> {
        let script = format!(
            "echo run >> {0}/runs; exit $(cat {0}/exit 2>/dev/null || echo 0)",
            self.dir.path().display()
        );
        ["/bin/sh", "-c", &script].map(String::from).to_vec()
    }

    fn runs(&self) -> usize {
        fs::read_to_string(self.dir.path().join("runs")).map_or(0, |s| s.lines().count())
    }

    fn fail_hook(&self, fail: bool) {
        fs::write(self.dir.path().join("exit"), if fail { "7" } else { "0" }).unwrap();
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(self.path()).unwrap()
    }
}

fn sample() -> AllowSet {
    set(["203.0.113.0/24", "198.51.100.7", "2001:db8::/48"])
}

/// One cycle's backend calls, as the syncer makes them.
fn cycle(b: &mut FileBackend, want: &AllowSet) -> Result<Outcome, BackendError> {
    b.ensure()?;
    let (outcome, _) = engine::sync(b, &Desired::restore(want.clone()), &Safety::default(), false)?;
    b.enforce()?;
    Ok(outcome)
}

fn fixture(name: &str) -> Vec<u8> {
    fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/file-backend").join(name)).unwrap()
}

#[test]
fn each_format_byte_for_byte() {
    for (format, name) in [
        (FileFormat::Json, "chat.json"),
        (FileFormat::Plain, "chat.plain"),
        (FileFormat::Nginx, "chat.nginx"),
        (FileFormat::Haproxy, "chat.haproxy"),
    ] {
        let env = Env::new();
        let mut b = env.backend(format, None);
        assert!(matches!(cycle(&mut b, &sample()), Ok(Outcome::Applied { added: 3, removed: 0 })));
        assert_eq!(
            String::from_utf8(env.bytes()).unwrap(),
            String::from_utf8(fixture(name)).unwrap(),
            "{name}"
        );
        assert_eq!(b.read().unwrap(), sample(), "{name} reads back");
    }
}

#[test]
fn on_change_runs_only_on_a_change_and_a_failure_is_retried_after_a_restart_too() {
    let env = Env::new();
    let mut b = env.backend(FileFormat::Nginx, Some(env.hook()));
    // The first write counts as a change.
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(env.runs(), 1);
    // Unchanged: not run again.
    assert_eq!(cycle(&mut b, &sample()).unwrap(), Outcome::InSync);
    assert_eq!(env.runs(), 1);

    // A change whose on_change fails: the file is written all the same, the cycle fails.
    env.fail_hook(true);
    let smaller = set(["203.0.113.0/24", "2001:db8::/48"]);
    let e = cycle(&mut b, &smaller).unwrap_err();
    assert!(matches!(e, BackendError::FollowUp { .. }), "{e}");
    assert!(e.to_string().contains("on_change /bin/sh failed: exit status: 7"), "{e}");
    assert_eq!(env.runs(), 2);
    assert_eq!(b.read().unwrap(), smaller, "the file stays written");
    let recorded = b.footprint().unwrap();
    assert!(recorded.on_change_pending.contains(&Object::File { path: env.path() }));

    // Retried at the next cycle, with nothing left to write.
    assert!(cycle(&mut b, &smaller).is_err());
    assert_eq!(env.runs(), 3);

    // A restart (a new backend with the state file's record) retries it too, until it works.
    env.fail_hook(false);
    let mut again = env.backend(FileFormat::Nginx, Some(env.hook()));
    again.set_recorded(&recorded);
    assert_eq!(cycle(&mut again, &smaller).unwrap(), Outcome::InSync);
    assert_eq!(env.runs(), 4);
    assert!(again.footprint().unwrap().on_change_pending.is_empty());
    assert_eq!(cycle(&mut again, &smaller).unwrap(), Outcome::InSync);
    assert_eq!(env.runs(), 4, "done: not run again");
}

#[test]
fn refresh_rewrites_generated_at_once_per_period_without_on_change() {
    let env = Env::new();
    let mut b = env.backend(FileFormat::Json, Some(env.hook()));
    cycle(&mut b, &sample()).unwrap();
    let first = env.bytes();
    assert_eq!(first, fixture("chat.json"));
    let mtime = || fs::metadata(env.path()).unwrap().modified().unwrap();
    let written = mtime();
    // Within the period: the file is not touched at all.
    env.advance(899);
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(env.bytes(), first);
    assert_eq!(mtime(), written, "not rewritten");
    // At the period: rewritten, only generated_at differs, on_change not run.
    env.advance(1);
    cycle(&mut b, &sample()).unwrap();
    let refreshed = String::from_utf8(env.bytes()).unwrap();
    let want = String::from_utf8(first).unwrap().replace("2026-12-01T08:00:00Z", "2026-12-01T08:15:00Z");
    assert_eq!(refreshed, want);
    assert_eq!(env.runs(), 1);
    // A clock set back makes the file's time lie in the future: rewritten too.
    env.clock.0.store(T0, Ordering::SeqCst);
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(env.bytes(), fixture("chat.json"));
    assert_eq!(env.runs(), 1);
}

#[test]
fn drift_is_repaired_and_an_unparsable_file_is_drift() {
    let env = Env::new();
    let mut b = env.backend(FileFormat::Plain, Some(env.hook()));
    cycle(&mut b, &sample()).unwrap();
    let good = env.bytes();

    // A line taken out by hand: read as it is, written back whole, on_change told.
    let text = String::from_utf8(good.clone()).unwrap().replace("203.0.113.0/24\n", "");
    fs::write(env.path(), text).unwrap();
    assert_eq!(b.read().unwrap(), set(["198.51.100.7", "2001:db8::/48"]));
    assert_eq!(cycle(&mut b, &sample()).unwrap(), Outcome::Applied { added: 1, removed: 0 });
    assert_eq!(env.bytes(), good);
    assert_eq!(env.runs(), 2);

    // A cosmetic edit (same prefixes, a comment): rewritten, on_change not run.
    let mut commented = good.clone();
    commented.extend_from_slice(b"# hello\n");
    fs::write(env.path(), &commented).unwrap();
    assert_eq!(cycle(&mut b, &sample()).unwrap(), Outcome::InSync);
    assert_eq!(env.bytes(), good);
    assert_eq!(env.runs(), 2);

    // Garbage: no crash; it reads as empty and the sync writes the list back.
    fs::write(env.path(), b"\x00\xffnot a list").unwrap();
    assert_eq!(b.read().unwrap(), AllowSet::default());
    assert!(matches!(cycle(&mut b, &sample()).unwrap(), Outcome::Applied { added: 3, .. }));
    assert_eq!(env.bytes(), good);

    // Deleted: written again.
    fs::remove_file(env.path()).unwrap();
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(env.bytes(), good);
}

#[test]
fn a_crash_between_write_and_rename_leaves_the_old_file() {
    let env = Env::new();
    let mut b = env.backend(FileFormat::Json, None);
    cycle(&mut b, &sample()).unwrap();
    let old = env.bytes();
    // The temporary file written and fsynced, then the process dies before the rename.
    b.stage(b"{\"half\": ").unwrap();
    assert!(b.temp_path().exists());
    assert_eq!(env.bytes(), old);
    assert_eq!(b.read().unwrap(), sample());
    // The next write replaces the stray temporary file and leaves none behind.
    let next = set(["203.0.113.0/24", "2001:db8::/48"]);
    cycle(&mut b, &next).unwrap();
    assert_eq!(b.read().unwrap(), next);
    assert!(!b.temp_path().exists());
    let names: Vec<_> = fs::read_dir(env.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["chat.out"]);
}

#[test]
fn a_new_file_is_0644_and_an_existing_mode_is_kept() {
    let env = Env::new();
    let mode = || fs::metadata(env.path()).unwrap().permissions().mode() & 0o7777;
    let mut b = env.backend(FileFormat::Haproxy, None);
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(mode(), 0o644);
    fs::set_permissions(env.path(), fs::Permissions::from_mode(0o640)).unwrap();
    cycle(&mut b, &set(["203.0.113.0/24", "2001:db8::/48"])).unwrap();
    assert_eq!(mode(), 0o640);
    // As root (CI), the owner and group are kept too.
    if fs::metadata(env.path()).unwrap().uid() == 0 {
        std::os::unix::fs::chown(env.path(), Some(65534), Some(65534)).unwrap();
        cycle(&mut b, &set(["203.0.113.0/24"])).unwrap();
        let m = fs::metadata(env.path()).unwrap();
        assert_eq!((m.uid(), m.gid(), m.permissions().mode() & 0o7777), (65534, 65534, 0o640));
        assert_eq!(b.read().unwrap(), set(["203.0.113.0/24"]));
    }
}

#[test]
fn a_file_allowsync_did_not_write_is_never_written_over() {
    let env = Env::new();
    let hand_written = b"# our proxies\n10.0.0.0/8\n";
    fs::write(env.path(), hand_written).unwrap();
    let mut b = env.backend(FileFormat::Plain, None);
    let e = cycle(&mut b, &sample()).unwrap_err();
    assert!(matches!(e, BackendError::Foreign { .. }), "{e}");
    assert!(e.to_string().contains("allowsync has no record of creating it"), "{e}");
    assert_eq!(env.bytes(), hand_written);
    assert!(b.footprint().unwrap().owned.is_empty());

    // A file in the format allowsync writes (its state file lost) is adopted.
    fs::write(env.path(), fixture("chat.plain")).unwrap();
    assert_eq!(cycle(&mut b, &sample()).unwrap(), Outcome::InSync);
    assert!(b.footprint().unwrap().owned.contains(&Object::File { path: env.path() }));

    // Once recorded as allowsync's, garbage in it is drift, not someone else's file.
    let recorded = b.footprint().unwrap();
    fs::write(env.path(), b"garbage\n").unwrap();
    let mut b = env.backend(FileFormat::Plain, None);
    b.set_recorded(&recorded);
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(env.bytes(), fixture("chat.plain"));

    // A symbolic link is refused whatever the record, and left as it is.
    fs::remove_file(env.path()).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", env.path()).unwrap();
    let e = cycle(&mut b, &sample()).unwrap_err();
    assert!(e.to_string().contains("is a symbolic link"), "{e}");
    assert!(fs::symlink_metadata(env.path()).unwrap().file_type().is_symlink());

    // No directory: named, never created.
    let mut b = FileBackend::with_clock(
        &FileConfig { path: env.dir.path().join("missing/chat.json"), ..env.cfg(FileFormat::Json, None) },
        env.clock.clone(),
    );
    assert!(matches!(b.ensure(), Err(BackendError::Absent { .. })));
}

#[test]
fn teardown_removes_only_its_own_file() {
    let env = Env::new();
    let mut b = env.backend(FileFormat::Json, None);
    cycle(&mut b, &sample()).unwrap();
    assert_eq!(b.teardown().unwrap().removed, [format!("file {}", env.path().display())]);
    assert!(!env.path().exists());
    fs::write(env.path(), b"operator's\n").unwrap();
    let mut b = env.backend(FileFormat::Json, None);
    assert_eq!(b.teardown().unwrap().left.len(), 1);
    assert!(env.path().exists());
}
