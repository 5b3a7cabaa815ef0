//! The app's secret key: where the configuration says it is, and reading it.
//!
//! A Chat source names its key in exactly one way: `secret_key_file` (keep it mode 0600; under
//! systemd, the copy `LoadCredential=` hands the service stands in for it), `secret_key_env`,
//! or `secret_key` inline (warned about). Parsing only records which, as a [`SecretRef`] that
//! knows the line to blame; [`super::Parsed::resolve`] reads it. The key is held as
//! [`SecretKey`], whose `Debug` and `Display` never print it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::ConfigError;

/// The app's secret key. Never printed: `Debug` and `Display` show where it came from only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey {
    key: String,
    origin: String,
}

impl SecretKey {
    pub fn new(key: impl Into<String>, origin: impl Into<String>) -> Self {
        SecretKey { key: key.into(), origin: origin.into() }
    }
    /// The key itself, for signing only.
    pub fn expose(&self) -> &str {
        &self.key
    }
    /// Where the key came from (`file /etc/…`, `environment variable X`, `inline`).
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<redacted>, from {})", self.origin)
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret key from {}>", self.origin)
    }
}

/// Where a Chat source's key is, as the configuration says, before it is read: a file, an
/// environment variable, or the key itself (inline), with the line and key path that an error
/// about it names. `Debug` never prints an inline key.
#[derive(Clone)]
pub struct SecretRef {
    kind: Kind,
    line: u64,
    column: u64,
    /// `sources[0].tencent_chat.secret_key_file` and the like.
    key: String,
}

#[derive(Clone)]
enum Kind {
    /// The configured path, absolute.
    File(PathBuf),
    Env(String),
    Inline(SecretKey),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::File(p) => write!(f, "SecretRef(file {})", p.display()),
            Kind::Env(v) => write!(f, "SecretRef(environment variable {v})"),
            Kind::Inline(k) => write!(f, "SecretRef({k:?})"),
        }
    }
}

impl SecretRef {
    /// `secret_key_file: <path>` (already absolute), written at `at`.
    pub(super) fn file<T>(path: PathBuf, at: &Spanned<T>, key: String) -> Self {
        SecretRef::new(Kind::File(path), at, key)
    }

    /// `secret_key_env: <var>`, written at `at`.
    pub(super) fn env(var: String, at: &Spanned<String>, key: String) -> Self {
        SecretRef::new(Kind::Env(var), at, key)
    }

    /// `secret_key: <key>`: nothing left to read.
    pub(super) fn inline<T>(key_text: &str, at: &Spanned<T>, key: String) -> Self {
        SecretRef::new(Kind::Inline(SecretKey::new(key_text, "inline")), at, key)
    }

    fn new<T>(kind: Kind, at: &Spanned<T>, key: String) -> Self {
        SecretRef { kind, line: at.referenced.line(), column: at.referenced.column(), key }
    }

    fn invalid(&self, config: &Path, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: config.to_path_buf(),
            line: self.line,
            column: self.column,
            key: self.key.clone(),
            message,
        }
    }

    /// Reads the key (the file, the systemd credential in its place, or the environment); its
    /// errors name `config` and the key's own line. A file readable by group or others, or that
    /// starts with a byte order mark, adds a warning.
    pub(super) fn read(self, config: &Path, warnings: &mut Vec<String>) -> Result<SecretKey, ConfigError> {
        match &self.kind {
            Kind::Inline(k) => Ok(k.clone()),
            Kind::Env(var) => match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => {
                    Ok(SecretKey::new(s.trim(), format!("environment variable {var}")))
                }
                _ => Err(self.invalid(config, format!("environment variable {var} is not set (or empty)"))),
            },
            Kind::File(configured) => self.read_file(configured, config, warnings),
        }
    }

    fn read_file(
        &self,
        configured: &Path,
        config: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<SecretKey, ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let credential = systemd_credential(configured, credentials.as_deref());
        let file = credential.clone().unwrap_or_else(|| configured.to_path_buf());
        let text = std::fs::read_to_string(&file).map_err(|e| {
            self.invalid(config, format!("cannot read the secret key file {}: {e}", file.display()))
        })?;
        if let Ok(meta) = std::fs::metadata(&file) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                warnings.push(format!(
                    "secret key file {} is readable by group or others (mode {:o}): chmod 600 it",
                    file.display(),
                    mode & 0o777
                ));
            }
        }
        // An editor's UTF-8 byte order mark is not part of the key: signed with it, every
        // usersig is refused (70009, as if the key were wrong).
        let key_text = match text.strip_prefix('\u{feff}') {
            Some(rest) => {
                warnings.push(format!(
                    "secret key file {} starts with a UTF-8 byte order mark (BOM): ignored",
                    file.display()
                ));
                rest
            }
            None => &text,
        }
        .trim();
        if key_text.is_empty() && credential.is_some() {
            // The unit's SetCredential= fallback: LoadCredential= found no file to copy.
            return Err(self.invalid(
                config,
                format!(
                    "the secret key file {} is missing or empty (systemd handed the service an empty credential {})",
                    configured.display(),
                    file.display()
                ),
            ));
        }
        if key_text.is_empty() {
            return Err(self.invalid(config, format!("the secret key file {} is empty", file.display())));
        }
        Ok(SecretKey::new(key_text, format!("file {}", file.display())))
    }
}

/// Under systemd, `LoadCredential=chat-sgp.key:/etc/allowsync/chat-sgp.key` hands the daemon
/// (which runs as an unprivileged user that cannot read `/etc/allowsync/chat-sgp.key`) a copy as
/// `$CREDENTIALS_DIRECTORY/chat-sgp.key`. When that copy exists it is read in place of the
/// configured file, so one configuration serves both the service and root at a shell.
fn systemd_credential(configured: &Path, credentials_dir: Option<&Path>) -> Option<PathBuf> {
    let candidate = credentials_dir?.join(configured.file_name()?);
    candidate.is_file().then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_systemd_credential_stands_in_for_the_key_file() {
        let creds = tempfile::tempdir().unwrap();
        let etc = Path::new("/etc/allowsync/chat-sgp.key");
        assert_eq!(systemd_credential(etc, None), None);
        assert_eq!(systemd_credential(etc, Some(creds.path())), None, "no such credential");
        std::fs::write(creds.path().join("chat-sgp.key"), "k").unwrap();
        assert_eq!(systemd_credential(etc, Some(creds.path())), Some(creds.path().join("chat-sgp.key")));
        assert_eq!(systemd_credential(Path::new("/etc/allowsync/other.key"), Some(creds.path())), None);
    }
}
