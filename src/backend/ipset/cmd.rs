//! Running the iptables programs (the enforcement rules; the sets themselves are spoken to over
//! netlink, `proto.rs`): resolved once to absolute paths, run without a shell under `LC_ALL=C`,
//! with the stdin written from another thread, and their stderr mapped to a [`BackendError`]
//! (a refusal of privilege is unavailable).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::backend::BackendError;

/// The programs the backend runs, resolved to absolute paths once.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    /// `iptables`, `iptables-restore`, `ip6tables`, `ip6tables-restore`; `None` when any is
    /// missing (an error only with `enforce`).
    pub(super) iptables: Option<[PathBuf; 4]>,
}

impl Tools {
    /// Finds the iptables programs now, so that a missing one is reported at start with the
    /// package to install. Without them only `enforce` fails.
    pub(super) fn find(enforce: bool) -> Result<Tools, BackendError> {
        let found: Vec<Option<PathBuf>> = ["iptables", "iptables-restore", "ip6tables", "ip6tables-restore"]
            .iter()
            .map(|p| which(p))
            .collect();
        let iptables = match found.as_slice() {
            [Some(a), Some(b), Some(c), Some(d)] => Some([a.clone(), b.clone(), c.clone(), d.clone()]),
            _ => None,
        };
        if enforce && iptables.is_none() {
            return Err(BackendError::Unavailable(
                "ipset enforcement needs iptables, iptables-restore, ip6tables and ip6tables-restore, which are not all in PATH: install the Debian package `iptables` (apt-get install iptables)".into(),
            ));
        }
        Ok(Tools { iptables })
    }
}

/// Finds `program` in `PATH` (then `/usr/sbin`, `/sbin`, which a non-login root shell may lack).
fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .filter(|d| d.is_absolute())
        .map(|d| d.join(program))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A finished helper program run.
pub(super) struct Output {
    pub(super) stdout: String,
}

/// Runs `program args` (no shell, `LC_ALL=C` so messages are the ones parsed here), feeding
/// `stdin` when given; a non-zero exit is mapped by [`classify`] with the captured stderr.
pub(super) fn run(
    program: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    op: &'static str,
    object: &str,
) -> Result<Output, BackendError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| BackendError::Kernel {
        op,
        object: object.to_string(),
        cause: io::Error::new(e.kind(), format!("cannot run {}: {e}", program.display())),
    })?;
    let output = std::thread::scope(|s| {
        // Write from another thread: a program that fails early stops reading its stdin, and
        // its stderr must still be drained.
        let writer = child.stdin.take().map(|mut pipe| {
            let data = stdin.unwrap_or_default();
            s.spawn(move || match pipe.write_all(data) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e),
                _ => Ok(()),
            })
        });
        let out = child.wait_with_output();
        let written = writer.map_or(Ok(()), |w| w.join().unwrap_or_else(|_| Err(io::Error::other("panic"))));
        out.and_then(|o| written.map(|()| o))
    });
    let output = output.map_err(|cause| BackendError::Kernel { op, object: object.to_string(), cause })?;
    if output.status.success() {
        return Ok(Output { stdout: String::from_utf8_lossy(&output.stdout).into_owned() });
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let msg = stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("Try `")).collect::<Vec<_>>();
    let msg = if msg.is_empty() { output.status.to_string() } else { msg.join("; ") };
    Err(classify(op, object, &msg))
}

/// Maps a helper program's error message to a [`BackendError`].
pub(super) fn classify(op: &'static str, object: &str, msg: &str) -> BackendError {
    let object = object.to_string();
    let lower = msg.to_ascii_lowercase();
    let kernel = |kind: io::ErrorKind| BackendError::Kernel {
        op,
        object: object.clone(),
        cause: io::Error::new(kind, msg),
    };
    if lower.contains("in use by a kernel component") {
        kernel(io::ErrorKind::ResourceBusy)
    } else if lower.contains("operation not permitted")
        || lower.contains("permission denied")
        || lower.contains("must be root")
    {
        BackendError::Unavailable(format!("{op} on {object}: {msg} (needs CAP_NET_ADMIN)"))
    } else {
        kernel(io::ErrorKind::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        assert!(matches!(classify("x", "s", "Operation not permitted"), BackendError::Unavailable(_)));
        assert!(matches!(
            classify("x", "s", "iptables: No chain/target/match by that name."),
            BackendError::Kernel { .. }
        ));
    }
}
