//! The `file` backend through the binary: `once`'s exit codes with an `on_change` that fails
//! (the file stays written, the next run retries it from the state file), the daemon retrying
//! it at its next cycle, and a process killed between the write and the rename (stopped there
//! by strace, so the moment is exact) leaving the old file whole.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use allowsync::published;
use allowsync_testkit::daemon::{stop, wait_until};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap() }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A configuration writing `chat.json` from a static list, with an on_change that appends
    /// to `runs` and exits with the number in `exit` (0 when there is none).
    fn configure(&self, entries: &[&str]) {
        let hook = format!(
            "echo run >> {0}/runs; exit $(cat {0}/exit 2>/dev/null || echo 0)",
            self.dir.path().display()
        );
        let yaml = format!(
            "interval: 10s\njitter: 0s\nstate_file: state.json\nsources:\n  - name: office\n    static: {entries:?}\n\
             backend:\n  file:\n    path: chat.json\n    on_change: [\"/bin/sh\", \"-c\", {hook:?}]\n"
        );
        fs::write(self.p("config.yaml"), yaml).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_with("config.yaml", args)
    }

    fn command_with(&self, config: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_allowsync"));
        c.arg("-c").arg(self.p(config)).args(args).env("RUNTIME_DIRECTORY", self.dir.path());
        c
    }

    fn once(&self) -> Output {
        self.command(&["once"]).output().unwrap()
    }

    fn fail_hook(&self, fail: bool) {
        fs::write(self.p("exit"), if fail { "7" } else { "0" }).unwrap();
    }

    fn runs(&self) -> usize {
        fs::read_to_string(self.p("runs")).map_or(0, |s| s.lines().count())
    }

    /// The published list's prefixes, checked as a consumer checks them.
    fn published(&self) -> Vec<String> {
        let list = published::parse_json(&fs::read(self.p("chat.json")).unwrap()).unwrap();
        list.nets().iter().map(ToString::to_string).collect()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_failing_on_change_exits_1_leaves_the_file_written_and_is_retried_by_the_next_run() {
    let env = Env::new();
    env.configure(&["203.0.113.0/24"]);
    env.fail_hook(true);
    let o = env.once();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is written, but on_change /bin/sh failed: exit status: 7"),
        "{}",
        stderr(&o)
    );
    assert_eq!(env.published(), ["203.0.113.0/24"], "the file stays written");
    assert_eq!(env.runs(), 1);

    // Nothing changed since, but the state file says on_change is owed: retried, still failing.
    let o = env.once();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(env.runs(), 2);

    env.fail_hook(false);
    let o = env.once();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(env.runs(), 3);
    // Done: an unchanged list runs nothing.
    let o = env.once();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(env.runs(), 3);
    // A change does.
    env.configure(&["203.0.113.0/24", "198.51.100.0/24"]);
    assert_eq!(env.once().status.code(), Some(0));
    assert_eq!(env.runs(), 4);
    assert_eq!(env.published(), ["198.51.100.0/24", "203.0.113.0/24"]);
}

#[test]
fn the_daemon_retries_a_failed_on_change_at_its_next_cycle() {
    let env = Env::new();
    env.configure(&["203.0.113.0/24"]);
    env.fail_hook(true);
    let log = fs::File::create(env.p("daemon.log")).unwrap();
    let daemon = env.command(&["run"]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let within = Duration::from_secs(60);
    assert!(
        wait_until(within, || env.runs() >= 2),
        "not retried; log:\n{}",
        fs::read_to_string(env.p("daemon.log")).unwrap()
    );
    assert_eq!(env.published(), ["203.0.113.0/24"]);
    // A second allowsync on the same file, with another state file, is refused.
    let other = fs::read_to_string(env.p("config.yaml")).unwrap().replace("state.json", "other.json");
    fs::write(env.p("other.yaml"), other).unwrap();
    let o = env.command_with("other.yaml", &["once"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let want = format!("already manages file {}", env.p("chat.json").display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    env.fail_hook(false);
    let ran = |env: &Env| fs::read_to_string(env.p("daemon.log")).unwrap().contains("on_change ran");
    assert!(wait_until(within, || ran(&env)), "log:\n{}", fs::read_to_string(env.p("daemon.log")).unwrap());
    stop(daemon);
    let st = fs::read_to_string(env.p("state.json")).unwrap();
    assert!(!st.contains("on_change_pending"), "{st}");
}

/// strace, or `None` outside CI where it is not installed (CI installs it: scripts/install-deps.sh).
fn strace() -> Option<PathBuf> {
    let found = ["/usr/bin/strace", "/bin/strace"].into_iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI=true: strace must be installed (scripts/install-deps.sh)"
        );
        eprintln!("skipped: strace is not installed");
    }
    found
}

#[test]
fn killed_between_the_write_and_the_rename_the_old_file_stays_whole() {
    let Some(strace) = strace() else { return };
    let env = Env::new();
    env.configure(&["203.0.113.0/24"]);
    assert_eq!(env.once().status.code(), Some(0));
    let old = fs::read(env.p("chat.json")).unwrap();

    // The first rename of the next run is the file's (the state file is written after it):
    // strace stops the process on entering it, fails it and delivers SIGKILL.
    env.configure(&["203.0.113.0/24", "198.51.100.0/24"]);
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=/^rename", "-e"])
        .arg("inject=/^rename:error=EIO:signal=SIGKILL:when=1")
        .arg(env!("CARGO_BIN_EXE_allowsync"))
        .arg("-c")
        .arg(env.p("config.yaml"))
        .arg("once")
        .env("RUNTIME_DIRECTORY", env.dir.path());
    let o = cmd.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        o.status.signal() == Some(libc::SIGKILL) || o.status.code() == Some(128 + libc::SIGKILL),
        "{:?}: {}",
        o.status,
        stderr(&o)
    );
    let tmp = env.p(".chat.json.allowsync-tmp");
    assert!(tmp.exists(), "the new list was written to the temporary file");
    assert!(String::from_utf8(fs::read(&tmp).unwrap()).unwrap().contains("198.51.100.0/24"));
    assert_eq!(fs::read(env.p("chat.json")).unwrap(), old, "the old file, whole");
    assert_eq!(env.runs(), 1, "on_change did not run");

    // The next run writes the new list and leaves no temporary file.
    let o = env.once();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(env.published(), ["198.51.100.0/24", "203.0.113.0/24"]);
    assert!(!Path::new(&tmp).exists());
    assert_eq!(env.runs(), 2);
}
