//! Measuring: medians and percentiles, timed processes, peak RSS through a fresh helper, thread CPU time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// Nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a command to completion, stdin from `input`; returns its wall time in ms.
pub fn timed(program: &str, args: &[&str], input: Option<&Path>) -> Result<f64, String> {
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(p) = input {
        c.stdin(std::fs::File::open(p).map_err(|e| e.to_string())?);
    }
    let t = Instant::now();
    let out = c.output().map_err(|e| format!("{program}: {e}"))?;
    let elapsed = ms(t.elapsed());
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(elapsed)
}

pub fn sh(program: &str, args: &[&str]) {
    if let Err(e) = timed(program, args, None) {
        panic!("{e}");
    }
}

/// Runs `program` with args through a fresh `__rss` helper process: (wall ms, peak RSS in KiB,
/// exit code).
///
/// Not spawned from here directly: `ru_maxrss` of a child includes the high-water mark of the
/// address space it was forked from (the kernel carries it over at exec), and this process has
/// held a million entries by then. The helper is this binary freshly executed, a few MiB, far
/// below what it measures; it reports its own VmHWM too, printed next to the figures.
pub fn run_rusage(program: &Path, args: &[&str], log: &Path) -> (f64, i64, i32) {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("__rss")
        .arg(log)
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(
        out.status.success() && v.len() == 4,
        "__rss helper: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    HELPER_HWM_KIB.fetch_max(v[3] as usize, Ordering::Relaxed);
    (v[0], v[1] as i64, v[2] as i32)
}

pub static HELPER_HWM_KIB: AtomicUsize = AtomicUsize::new(0);

/// The helper side of [`run_rusage`]: `__rss LOG PROGRAM ARGS…`; prints `wall_ms maxrss_kib
/// exit_code own_vmhwm_kib`.
pub fn child_rss(args: &[String]) -> i32 {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&args[0]).unwrap();
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    let t = Instant::now();
    // Reaped by the wait4 below, which std's Child does not know about.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(&args[1])
        .args(&args[2..])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", args[1]));
    let mut status = 0;
    // SAFETY: wait4 on our own child, with out-pointers to live locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    let wall = ms(t.elapsed());
    assert_eq!(rc, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
    println!("{wall} {} {code} {own}", ru.ru_maxrss);
    0
}

pub fn thread_cpu() -> Duration {
    // SAFETY: getrusage into a live local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPU time another live thread of this process has used (its `pthread_getcpuclockid`).
pub fn cpu_of(thread: libc::pthread_t) -> Duration {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `thread` is a live thread of this process (the caller keeps it alive); both
    // out-pointers are live locals.
    unsafe {
        assert_eq!(libc::pthread_getcpuclockid(thread, &mut clock), 0);
        assert_eq!(libc::clock_gettime(clock, &mut ts), 0);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
