//! Running `on_change`: argv as configured, no shell, stdin closed, in a process group of its
//! own, bounded by `on_change_timeout`. Its output goes to an anonymous file, not a pipe, so
//! that a program which leaves a daemon behind holding its stdout cannot hold us up. On the
//! timeout the whole group is killed.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, kill_process_group, pidfd_open};

/// How much of the program's output a failure quotes (its end).
const OUTPUT_TAIL: u64 = 2048;

/// Runs `argv` and waits at most `timeout`; `Err` says how it failed, with the end of its
/// output, escaped.
pub(super) fn run(argv: &[String], timeout: Duration) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("no program")?;
    let mut out = tempfile::tempfile().map_err(|e| format!("cannot create a file for its output: {e}"))?;
    let (stdout, stderr) = match (out.try_clone(), out.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Err(format!("cannot create a file for its output: {e}")),
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = Pid::from_child(&child);
    let finished = wait_for(pid, timeout);
    if !finished {
        // The group has the child's pid, which stays ours until we reap it.
        let _ = kill_process_group(pid, Signal::KILL);
    }
    let status = child.wait().map_err(|e| format!("cannot wait for {program}: {e}"))?;
    let said = tail(&mut out);
    if !finished {
        return Err(format!("did not finish within {}: killed{said}", crate::config::fmt_duration(timeout)));
    }
    if status.success() { Ok(()) } else { Err(format!("{status}{said}")) }
}

/// True when the process exited within `timeout` (not reaped yet).
fn wait_for(pid: Pid, timeout: Duration) -> bool {
    let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) else {
        // No pidfd (a kernel before 5.3): wait without a bound rather than not at all.
        return true;
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(ts) = Timespec::try_from(left) else { return true };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) if left.is_zero() => return false,
            Ok(0) => {}
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return true,
        }
    }
}

/// `: <the end of the output>`, lines joined with `; `, escaped; empty without output.
fn tail(out: &mut std::fs::File) -> String {
    let len = out.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut buf = Vec::new();
    if out.seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL))).is_err()
        || out.read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| l.escape_debug().to_string()).collect();
    if lines.is_empty() { String::new() } else { format!(": {}", lines.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        ["/bin/sh", "-c", script].map(String::from).to_vec()
    }

    #[test]
    fn success_failure_and_output() {
        assert_eq!(run(&sh("exit 0"), Duration::from_secs(10)), Ok(()));
        let e =
            run(&sh("echo 'nginx: [emerg] bad\x1b[0m' >&2; exit 3"), Duration::from_secs(10)).unwrap_err();
        assert_eq!(e, "exit status: 3: nginx: [emerg] bad\\u{1b}[0m");
        let e = run(&["/nonexistent/prog".to_string()], Duration::from_secs(10)).unwrap_err();
        assert!(e.starts_with("cannot run /nonexistent/prog:"), "{e}");
    }

    #[test]
    fn a_program_that_hangs_is_killed_with_its_group() {
        // The child leaves a grandchild holding the output file; both are in the group.
        let e = run(&sh("sleep 600 & echo started; wait"), Duration::from_secs(1)).unwrap_err();
        assert_eq!(e, "did not finish within 1s: killed: started");
    }
}
