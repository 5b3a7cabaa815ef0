//! Driving the real binary against the mock Chat API and the kernel's nftables, each test (or
//! each thread of a test) in a network namespace of its own: the setup of `tests/daemon.rs`,
//! shared by the reliability tests (faults, crash, resources, secrets) and the bench.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use allowsync::backend::Backend;
use allowsync::backend::nftables::NftablesBackend;
use allowsync::config::NftablesConfig;
use allowsync::prefixes::AllowSet;
use allowsync::state::{State, StateFile};

use crate::mock::{MockChatApi, MockConfig, MockHandle};
use crate::netns::{self, NetnsGuard};

pub const SDKAPPID: u64 = 1400000000;
pub const IDENTIFIER: &str = "administrator";

pub struct Env {
    pub mock: MockHandle,
    pub dir: tempfile::TempDir,
    pub cfg: PathBuf,
    pub key: String,
    /// Daemons started by [`Env::spawn`]: a test that fails before stopping one must not leave it
    /// running (see the `Drop` below).
    spawned: std::cell::RefCell<Vec<u32>>,
    // Dropped last: the runtime serves the mock, the guard keeps us in the namespace.
    pub rt: tokio::runtime::Runtime,
    _ns: NetnsGuard,
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in self.spawned.borrow().iter() {
            // Only a process that is still this test's daemon (not reaped, pid not reused by
            // another test's): its command line names this test's own configuration file.
            let cfg = self.cfg.as_os_str().as_encoded_bytes();
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(cfg.len()).any(|w| w == cfg));
            if ours {
                // SAFETY: kill(2) on a pid checked just above; at worst it is already gone.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
    }
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

/// The `allowsync` binary cargo built next to the running test (or bench): its executable
/// sits in `target/<profile>/deps/`, the binary one level up. (`CARGO_BIN_EXE_allowsync` only
/// exists while the root package's own tests compile, not in this crate.)
pub fn allowsync_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("allowsync");
    assert!(bin.is_file(), "{} is missing: build it with `cargo build` (cargo test does)", bin.display());
    bin
}

/// What [`setup_with`] builds. `yaml` may be changed (`tweak`) before it is written.
pub struct Setup<'a> {
    pub key: &'a str,
    pub lists: BTreeMap<u8, Vec<String>>,
    /// `log.format`.
    pub log_format: &'a str,
    pub log_level: &'a str,
    /// The source's `timeout`.
    pub timeout: &'a str,
}

impl<'a> Setup<'a> {
    pub fn new(key: &'a str, lists: BTreeMap<u8, Vec<String>>) -> Self {
        Setup { key, lists, log_format: "text", log_level: "info", timeout: "2s" }
    }
}

/// Enters a new network namespace, starts the mock there and writes a configuration for one
/// Chat source (nettypes 5 and 6, the key in a 0600 file) and the nftables backend.
/// `None` when namespaces are unavailable outside CI (see [`netns::enter_new_netns`]).
pub fn setup_with(s: Setup<'_>, tweak: impl FnOnce(&mut String)) -> Option<Env> {
    let ns = netns::enter_new_netns()?;
    // Built after entering the namespace: its threads, and so the mock's socket, live in it.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut mc = MockConfig::new(SDKAPPID, IDENTIFIER, s.key);
    mc.lists = s.lists;
    let mock = rt.block_on(MockChatApi::start(mc)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), s.key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path().join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut yaml = format!(
        "interval: 10s
jitter: 0s
state_file: state.json
sources:
  - name: chat
    tencent_chat:
      endpoint: {url}
      sdkappid: {SDKAPPID}
      identifier: {IDENTIFIER}
      secret_key_file: key
      nettypes: [5, 6]
      timeout: {timeout}
backend:
  nftables: {{ table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }}
log:
  format: {format}
  level: {level}
",
        url = mock.url(),
        timeout = s.timeout,
        format = s.log_format,
        level = s.log_level,
    );
    tweak(&mut yaml);
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    Some(Env { mock, dir, cfg, key: s.key.to_owned(), spawned: Default::default(), rt, _ns: ns })
}

/// How a finished `allowsync` command went.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it had to be killed at the deadline.
    pub code: Option<i32>,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
    /// Peak resident memory of the process (`VmHWM`), in KiB.
    pub max_rss_kib: i64,
}

impl Env {
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// Starts `allowsync run`, its stderr appended to [`Env::log_path`].
    pub fn spawn(&self) -> Child {
        let mut cmd = Command::new(allowsync_bin());
        cmd.args(["-c", self.cfg.to_str().unwrap(), "run"]);
        self.spawn_command(cmd)
    }

    /// Starts `cmd`, which must end up exec'ing `allowsync -c CFG run` in its own process (a
    /// wrapper such as `unshare … sh -c '…; exec allowsync …'`), as [`Env::spawn`] does.
    pub fn spawn_command(&self, mut cmd: Command) -> Child {
        let starts = self.log().matches("allowsync starting").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = cmd
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.spawned.borrow_mut().push(child.id());
        self.wait_started(&child, starts);
        child
    }

    /// Waits (bounded) until the daemon has logged one more "allowsync starting" than before it
    /// was spawned, or has exited: from then on it handles SIGTERM, so a test that stops it at
    /// once cannot hit the default action (death by signal) in the first milliseconds.
    fn wait_started(&self, child: &Child, before: usize) {
        let started = wait_until(Duration::from_secs(10), || {
            self.log().matches("allowsync starting").count() > before || exited(child)
        });
        assert!(started, "the daemon neither started nor exited within 10 s; log:\n{}", self.log());
    }

    /// Runs `allowsync -c CFG <args>` to its end, killing it at `deadline` (see [`wait_child`]).
    pub fn command(&self, args: &[&str], deadline: Duration) -> Finished {
        self.command_with(&self.cfg, args, deadline)
    }

    /// [`Env::command`] with another configuration file.
    pub fn command_with(&self, cfg: &std::path::Path, args: &[&str], deadline: Duration) -> Finished {
        let dir = self.dir.path();
        let (out, err) = (dir.join("cmd.stdout"), dir.join("cmd.stderr"));
        let child = Command::new(allowsync_bin())
            .arg("-c")
            .arg(cfg)
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let (code, elapsed, max_rss_kib) = wait_child(child, deadline);
        Finished {
            code,
            elapsed,
            stdout: std::fs::read_to_string(out).unwrap_or_default(),
            stderr: std::fs::read_to_string(err).unwrap_or_default(),
            max_rss_kib,
        }
    }

    /// `allowsync once`.
    pub fn once(&self, deadline: Duration) -> Finished {
        self.command(&["once"], deadline)
    }

    /// Starts the daemon and waits for its first sync to be complete: `want` in the kernel and
    /// the sync logged (which happens only after the state file is written).
    pub fn start(&self, want: &AllowSet) -> Child {
        let d = self.spawn();
        self.wait_kernel(want, Duration::from_secs(10));
        self.wait_syncs(0, Duration::from_secs(5));
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn syncs(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                // text: `INFO sync outcome=…`; json: `"message":"sync"`.
                l.contains(" sync ")
                    || l.contains(r#""message":"sync""#)
                    || l.contains("sync refused")
                    || l.contains("sync failed")
            })
            .count()
    }

    /// Waits until the log has more than `n` sync lines.
    pub fn wait_syncs(&self, n: usize, within: Duration) {
        assert!(
            wait_until(within, || self.syncs() > n),
            "no sync #{} within {within:?}; log:\n{}",
            n + 1,
            self.log()
        );
    }

    pub fn kernel(&self) -> AllowSet {
        backend().read().unwrap()
    }

    pub fn wait_kernel(&self, want: &AllowSet, within: Duration) {
        let ok = wait_until(within, || backend().read().ok().as_ref() == Some(want));
        let now = backend().read().map(|s| s.len());
        assert!(ok, "kernel ({now:?} ranges) != the {} wanted; log:\n{}", want.len(), self.log());
    }

    /// The state file's text ("" when missing).
    pub fn state(&self) -> String {
        std::fs::read_to_string(self.state_path()).unwrap_or_default()
    }

    /// The state file, parsed; panics when it is missing or does not parse.
    pub fn parsed_state(&self) -> State {
        StateFile::new(self.state_path()).peek().expect("the state file parses").expect("a state file exists")
    }
}

/// The lists of a state: each source's last good list and the applied allowlist, without the
/// times and `last_error` that a failed cycle may legitimately change.
pub fn lists_of(s: &State) -> (Vec<(String, AllowSet)>, Option<AllowSet>) {
    (s.sources.iter().map(|(k, v)| (k.clone(), v.list.clone())).collect(), s.applied.clone())
}

/// Waits for `child` until `deadline` (then kills it): exit code (`None` if killed or
/// signalled), how long it ran, and its peak RSS in KiB.
///
/// The peak is the largest `VmHWM` read from `/proc/PID/status` while it runs, polled every
/// 2 ms (it is a high-water mark, so only growth in its last 2 ms can be missed). Not
/// `wait4`'s `ru_maxrss`: the child is started with vfork semantics, and exec carries the
/// parent's high-water mark (this test process's) into the child's.
pub fn wait_child(child: Child, deadline: Duration) -> (Option<i32>, Duration, i64) {
    let t = Instant::now();
    let pid = child.id() as libc::pid_t;
    let status_path = format!("/proc/{pid}/status");
    let mut killed = false;
    let mut peak = 0i64;
    loop {
        if let Some(kib) = std::fs::read_to_string(&status_path).ok().as_deref().and_then(vm_hwm_kib) {
            peak = peak.max(kib);
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child, result checked.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(rc >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if rc == pid {
            let code = (libc::WIFEXITED(status) && !killed).then(|| libc::WEXITSTATUS(status));
            // Reaped: dropping the handle only closes what it holds, it never waits.
            drop(child);
            return (code, t.elapsed(), peak);
        }
        if t.elapsed() > deadline && !killed {
            // SAFETY: kill(2) on our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Whether `child` has exited, without reaping it: [`wait_child`] and [`stop`] still see its
/// status.
fn exited(child: &Child) -> bool {
    // SAFETY: waitid with WNOWAIT on our own child only peeks at its state; siginfo is zeroed
    // and written by the kernel.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc =
            libc::waitid(libc::P_PID, child.id(), &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        rc == 0 && info.si_pid() != 0
    }
}

/// `VmHWM` (peak resident set) in KiB from a `/proc/PID/status` text.
pub fn vm_hwm_kib(status: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn backend() -> NftablesBackend {
    NftablesBackend::new(&NftablesConfig {
        table: "allowsync".into(),
        set_v4: "allow_v4".into(),
        set_v6: "allow_v6".into(),
        enforce: None,
    })
    .unwrap()
}

pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Stops the daemon with SIGTERM and returns how long it took.
pub fn stop(mut child: Child) -> Duration {
    let t = Instant::now();
    signal(&child, libc::SIGTERM);
    let end = t + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "daemon exited with {status}");
            return t.elapsed();
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("daemon did not stop within 5 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
