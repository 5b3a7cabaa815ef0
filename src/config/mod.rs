//! The configuration file: one YAML document, read once at start and again on SIGHUP.
//!
//! [`Config::load`] takes three steps, each of which names the file, line, column and key of any
//! mistake:
//!
//! 1. `raw.rs` deserializes what was written, checking every value as it is read;
//! 2. [`parse`] checks how the parts fit (one secret, one backend, unique names, static entries
//!    that may be allowed) and resolves relative paths against the configuration's directory.
//!    No I/O: the result, [`Parsed`], knows where each secret key is but has read none;
//! 3. [`Parsed::resolve`] reads the keys (`secret.rs`: file, systemd credential, environment).
//!
//! Secrets are held as [`SecretKey`], whose `Debug` and `Display` never print the key.

mod raw;
mod secret;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_saphyr::Spanned;

pub use raw::{
    Enforce, EnforceScope, FileConfig, FileFormat, IpsetConfig, LogConfig, LogFormat, MAX_TIMEOUT,
    MetricsConfig, NftablesConfig, Region, Safety, fmt_duration,
};
use raw::{RawChat, RawConfig, secs};
#[cfg(test)]
use raw::{check_endpoint, parse_duration};
pub use secret::{SecretKey, SecretRef};

use crate::admission::{self, MinPrefix};

/// Where the daemon looks when `-c` and `ALLOWSYNC_CONFIG` are not given.
pub const DEFAULT_PATH: &str = "/etc/allowsync/config.yaml";
/// The default state file.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/allowsync/state.json";

/// A configuration mistake, located.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    /// `file:line:column: key: what is wrong`.
    #[error("{path}:{line}:{column}: {key}: {message}")]
    Invalid { path: PathBuf, line: u64, column: u64, key: String, message: String },
}

/// A validated configuration with every path absolute. `K` is the secret key of each Chat
/// source: [`SecretKey`] once read, [`SecretRef`] (where it is) after [`parse`].
#[derive(Debug, Clone)]
pub struct Config<K = SecretKey> {
    /// The file this was loaded from.
    pub path: PathBuf,
    pub interval: Duration,
    pub jitter: Duration,
    pub state_file: PathBuf,
    pub sources: Vec<SourceConfig<K>>,
    pub backend: BackendConfig,
    pub safety: Safety,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// Things worth a warning that do not stop the daemon (inline secret, loose key file
    /// permissions). Logged by the caller once logging is set up.
    pub warnings: Vec<String>,
}

/// A configuration parsed and checked, its secret keys not read yet.
pub type Parsed = Config<SecretRef>;

#[derive(Debug, Clone)]
pub struct SourceConfig<K = SecretKey> {
    pub name: String,
    pub kind: SourceKind<K>,
}

#[derive(Debug, Clone)]
pub enum SourceKind<K = SecretKey> {
    TencentChat(Box<TencentChatConfig<K>>),
    Static(Vec<IpNet>),
    Url(Box<UrlConfig>),
}

/// A list published by another allowsync (`backend.file`, format `json`), read over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlConfig {
    /// `https://…`, or `http://` to a loopback address.
    pub url: String,
    /// Extra CA certificates (PEM) trusted for this source only, on top of the system store.
    pub ca_file: Option<PathBuf>,
    /// The whole request, body included.
    pub timeout: Duration,
    /// The largest body read; a longer one is a failed fetch.
    pub max_bytes: usize,
    /// A list generated longer ago than this is a failed source (a dead publisher).
    pub max_age: Duration,
}

/// One Chat application to ask for its webhook egress addresses.
#[derive(Debug, Clone)]
pub struct TencentChatConfig<K = SecretKey> {
    pub region: Option<Region>,
    /// Base URLs to try in order: the region's primary and backup domains, or the configured
    /// `endpoint` alone.
    pub endpoints: Vec<String>,
    pub sdkappid: u64,
    pub identifier: String,
    pub secret_key: K,
    pub nettypes: Vec<u8>,
    pub timeout: Duration,
    pub usersig_ttl: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Nftables(NftablesConfig),
    Ipset(IpsetConfig),
    DryRun,
    File(FileConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Nftables(_) => "nftables",
            BackendConfig::Ipset(_) => "ipset",
            BackendConfig::DryRun => "dry_run",
            BackendConfig::File(_) => "file",
        }
    }
}

impl Config {
    /// Reads, parses and resolves the configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|cause| ConfigError::Read { path: path.to_path_buf(), cause })?;
        parse(&text, path)?.resolve()
    }
}

/// Parses and checks configuration text as if read from `path` (relative paths in it resolve
/// against `path`'s directory). No I/O.
pub fn parse(text: &str, path: &Path) -> Result<Parsed, ConfigError> {
    let raw = raw::parse(text, path)?;
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    build(raw, path, &base)
}

impl Parsed {
    /// Reads every secret key (files, the systemd credential in their place, environment
    /// variables); their errors point at the key's own line.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let Config {
            path,
            interval,
            jitter,
            state_file,
            sources,
            backend,
            safety,
            log,
            metrics,
            mut warnings,
        } = self;
        let mut resolved = Vec::with_capacity(sources.len());
        for SourceConfig { name, kind } in sources {
            let kind = match kind {
                SourceKind::Static(nets) => SourceKind::Static(nets),
                SourceKind::Url(u) => SourceKind::Url(u),
                SourceKind::TencentChat(c) => {
                    let c = *c;
                    let secret_key = c.secret_key.read(&path, &mut warnings)?;
                    SourceKind::TencentChat(Box::new(TencentChatConfig {
                        region: c.region,
                        endpoints: c.endpoints,
                        sdkappid: c.sdkappid,
                        identifier: c.identifier,
                        secret_key,
                        nettypes: c.nettypes,
                        timeout: c.timeout,
                        usersig_ttl: c.usersig_ttl,
                        ca_file: c.ca_file,
                    }))
                }
            };
            resolved.push(SourceConfig { name, kind });
        }
        Ok(Config {
            path,
            interval,
            jitter,
            state_file,
            sources: resolved,
            backend,
            safety,
            log,
            metrics,
            warnings,
        })
    }
}

fn at<T>(path: &Path, s: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line: s.referenced.line(),
        column: s.referenced.column(),
        key: key.into(),
        message: message.into(),
    }
}

fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// The checks across keys, on what `raw.rs` read.
fn build(raw: RawConfig, path: &Path, base: &Path) -> Result<Parsed, ConfigError> {
    let mut warnings = Vec::new();
    let interval = raw.interval.unwrap_or(secs(300));
    let jitter = match &raw.jitter {
        None => interval / 10,
        Some(j) if j.value.0 > interval => {
            let default = if raw.interval.is_none() { ", the default" } else { "" };
            return Err(at(
                path,
                j,
                "jitter",
                format!(
                    "jitter {} is longer than interval ({}{default}): it must be at most the interval",
                    fmt_duration(j.value.0),
                    fmt_duration(interval)
                ),
            ));
        }
        Some(j) => j.value.0,
    };
    let state_file =
        raw.state_file.map_or_else(|| PathBuf::from(DEFAULT_STATE_FILE), |s| absolute(base, &s.value));

    if raw.sources.value.is_empty() {
        return Err(at(
            path,
            &raw.sources,
            "sources",
            "no sources: configure at least one (tencent_chat, static or url)",
        ));
    }
    let mut names = HashSet::new();
    let mut sources = Vec::new();
    for (i, src) in raw.sources.value.into_iter().enumerate() {
        let key = |k: &str| format!("sources[{i}].{k}");
        let name = src.name.value.trim().to_string();
        if name.is_empty() {
            return Err(at(path, &src.name, key("name"), "a source needs a name"));
        }
        if !names.insert(name.clone()) {
            return Err(at(
                path,
                &src.name,
                key("name"),
                format!("source name `{name}` is used twice: names must be unique"),
            ));
        }
        if let Some(u) = src.url {
            if src.tencent_chat.is_some() || src.static_entries.is_some() {
                return Err(at(
                    path,
                    &u,
                    key("url"),
                    format!("source `{name}` has url and another kind: give each its own source"),
                ));
            }
            let r = u.value;
            let ca_file = r.ca_file.as_ref().map(|p| absolute(base, p));
            let (url, timeout, max_bytes, max_age) = (r.url, r.timeout, r.max_bytes, r.max_age);
            let kind = SourceKind::Url(Box::new(UrlConfig { url, ca_file, timeout, max_bytes, max_age }));
            sources.push(SourceConfig { name, kind });
            continue;
        }
        let kind = match (src.tencent_chat, src.static_entries) {
            (Some(chat), None) => {
                let c = build_chat(chat, path, base, &key("tencent_chat"), &name, &mut warnings)?;
                SourceKind::TencentChat(Box::new(c))
            }
            (None, Some(list)) => {
                SourceKind::Static(admit_static(list, path, &key("static"), &raw.safety.min_prefix())?)
            }
            (Some(chat), Some(_)) => {
                return Err(at(
                    path,
                    &chat,
                    key("tencent_chat"),
                    format!("source `{name}` has both tencent_chat and static: give each its own source"),
                ));
            }
            (None, None) => {
                return Err(at(
                    path,
                    &src.name,
                    key("name"),
                    format!("source `{name}` needs tencent_chat:, static: or url:"),
                ));
            }
        };
        sources.push(SourceConfig { name, kind });
    }

    let backend = match raw.backend {
        None => BackendConfig::Nftables(NftablesConfig {
            table: raw::default_table(),
            set_v4: raw::default_set_v4(),
            set_v6: raw::default_set_v6(),
            enforce: None,
        }),
        Some(b) => match (&b.value.nftables, &b.value.ipset, &b.value.dry_run, &b.value.file) {
            (Some(n), None, None, None) if n.check().is_err() => {
                let (key, message) = n.check().unwrap_err();
                return Err(at(path, &b, format!("backend.nftables.{key}"), message));
            }
            (None, Some(i), None, None) if i.set_v4 == i.set_v6 => {
                return Err(at(path, &b, "backend.ipset", "set_v4 and set_v6 must differ"));
            }
            (Some(n), None, None, None) => BackendConfig::Nftables(n.clone()),
            (None, Some(i), None, None) => BackendConfig::Ipset(i.clone()),
            (None, None, Some(_), None) => BackendConfig::DryRun,
            (None, None, None, Some(f)) => {
                BackendConfig::File(FileConfig { path: absolute(base, &f.path), ..f.clone() })
            }
            _ => {
                return Err(at(
                    path,
                    &b,
                    "backend",
                    "configure exactly one of nftables, ipset, dry_run or file",
                ));
            }
        },
    };

    let metrics = build_metrics(raw.metrics, path, base)?;
    if let BackendConfig::File(f) = &backend {
        if f.refresh < interval {
            warnings.push(format!(
                "backend.file.refresh {} is shorter than interval {}: it is checked at each sync, so the file is refreshed once per cycle",
                fmt_duration(f.refresh),
                fmt_duration(interval)
            ));
        }
    }

    Ok(Config {
        path: path.to_path_buf(),
        interval,
        jitter,
        state_file,
        sources,
        backend,
        safety: raw.safety,
        log: raw.log,
        metrics,
        warnings,
    })
}

/// `metrics:`: a listener off loopback only with `allow_remote: true` (the metrics name the
/// sources and the firewall's state: nothing for the whole network by accident), a textfile
/// that node_exporter reads (`*.prom`).
fn build_metrics(
    raw: Option<raw::RawMetrics>,
    path: &Path,
    base: &Path,
) -> Result<MetricsConfig, ConfigError> {
    let Some(m) = raw else { return Ok(MetricsConfig::default()) };
    if let Some(l) = &m.listen {
        if !l.value.ip().is_loopback() && !m.allow_remote {
            return Err(at(
                path,
                l,
                "metrics.listen",
                format!(
                    "{} is not a loopback address: anyone who can reach it reads the metrics; set metrics.allow_remote: true if that is meant",
                    l.value
                ),
            ));
        }
    }
    let textfile = match &m.textfile {
        Some(t) if t.value.extension().is_none_or(|e| e != "prom") => {
            return Err(at(
                path,
                t,
                "metrics.textfile",
                format!(
                    "{} does not end in .prom: node_exporter's textfile collector reads only *.prom files",
                    t.value.display()
                ),
            ));
        }
        Some(t) => Some(absolute(base, &t.value)),
        None => None,
    };
    Ok(MetricsConfig { listen: m.listen.map(|l| l.value), textfile, allow_remote: m.allow_remote })
}

fn build_chat(
    chat: Spanned<RawChat>,
    path: &Path,
    base: &Path,
    key: &str,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<TencentChatConfig<SecretRef>, ConfigError> {
    let c = &chat.value;
    let endpoints = match (&c.endpoint, c.region) {
        (Some(e), _) => vec![e.clone()],
        (None, Some(r)) => r.domains().iter().map(|d| format!("https://{d}")).collect(),
        (None, None) => {
            return Err(at(
                path,
                &chat,
                key,
                format!("source `{name}` needs a region (china, singapore, …) or an endpoint"),
            ));
        }
    };
    if c.identifier.trim().is_empty() {
        return Err(at(
            path,
            &chat,
            format!("{key}.identifier"),
            "identifier is empty: give an app administrator account",
        ));
    }
    let given = [c.secret_key_file.is_some(), c.secret_key_env.is_some(), c.secret_key.is_some()];
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(at(
            path,
            &chat,
            key,
            format!("source `{name}` needs exactly one of secret_key_file, secret_key_env or secret_key"),
        ));
    }
    let secret_key = if let Some(f) = &c.secret_key_file {
        SecretRef::file(absolute(base, &f.value), f, format!("{key}.secret_key_file"))
    } else if let Some(v) = &c.secret_key_env {
        SecretRef::env(v.value.clone(), v, format!("{key}.secret_key_env"))
    } else {
        warnings.push(format!(
            "source `{name}`: the secret key is written inline in {}; prefer secret_key_file (mode 0600) or systemd's LoadCredential",
            path.display()
        ));
        let s = c.secret_key.as_deref().unwrap_or_default().trim();
        if s.is_empty() {
            return Err(at(path, &chat, format!("{key}.secret_key"), "secret_key is empty"));
        }
        SecretRef::inline(s, &chat, format!("{key}.secret_key"))
    };
    Ok(TencentChatConfig {
        region: c.region,
        endpoints,
        sdkappid: c.sdkappid,
        identifier: c.identifier.trim().to_string(),
        secret_key,
        nettypes: c.nettypes.clone(),
        timeout: c.timeout,
        usersig_ttl: c.usersig_ttl,
        ca_file: c.ca_file.as_ref().map(|p| absolute(base, p)),
    })
}

/// Static entries must pass the same rules as the API's: a refused one is a configuration error
/// at its own line and column.
fn admit_static(
    list: Vec<Spanned<IpNet>>,
    path: &Path,
    key: &str,
    min: &MinPrefix,
) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (j, e) in list.into_iter().enumerate() {
        if let Err(r) = admission::check(e.value, min) {
            let message = match &r {
                admission::Refused::TooShort { family, .. } => {
                    format!("static entry {r}: lower safety.min_prefix_{family} if that is really meant")
                }
                admission::Refused::Special { .. } => format!("static entry {r}"),
            };
            return Err(at(path, &e, format!("{key}[{j}]"), message));
        }
        out.push(e.value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
sources:
  - name: office
    static: [203.0.113.7, \"2001:db8:1::/48\"]
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        super::parse(text, Path::new("/etc/allowsync/config.yaml")).and_then(Parsed::resolve)
    }

    fn invalid(text: &str) -> (u64, String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { line, key, message, path, .. }) => {
                assert_eq!(path, Path::new("/etc/allowsync/config.yaml"));
                (line, key, message)
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.interval, secs(300));
        assert_eq!(c.jitter, secs(30));
        assert_eq!(c.state_file, Path::new(DEFAULT_STATE_FILE));
        assert_eq!(
            c.safety,
            Safety {
                allow_empty: false,
                max_removal_percent: 50,
                min_prefix_v4: 8,
                min_prefix_v6: 32,
                max_added_addresses_v4: 65536,
                max_added_addresses_v6: 65536,
            }
        );
        assert!(
            matches!(&c.backend, BackendConfig::Nftables(n) if n.table == "allowsync" && n.set_v4 == "allow_v4" && n.set_v6 == "allow_v6")
        );
        assert!(matches!(&c.sources[0].kind, SourceKind::Static(v) if v.len() == 2));
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_key() {
        let (line, key, msg) = invalid("interval: 5m\nsources:\n  - name: a\n    statik: [1.2.3.4]\n");
        assert_eq!(line, 4);
        assert_eq!(key, "sources[0].statik");
        assert!(msg.contains("unknown field `statik`"), "{msg}");
        let (line, key, _) = invalid("intervall: 5m\n");
        assert_eq!((line, key.as_str()), (1, "intervall"));
        let e = parse("sources: []\nbackend:\n  nftables:\n    tabel: x\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/allowsync/config.yaml:4:5: backend.nftables.tabel: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), secs(30));
        assert_eq!(parse_duration("5m").unwrap(), secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["", "5", "m", "5 minutes", "-5s", "5x", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let (line, key, msg) = invalid(&format!("interval: 5s\n{BASE}"));
        assert_eq!((line, key.as_str()), (1, "interval"));
        assert!(msg.contains("between 10s and 7d"), "{msg}");
        let (_, key, msg) = invalid(&format!("interval: soon\n{BASE}"));
        assert_eq!(key, "interval");
        assert!(msg.contains("not a duration"), "{msg}");
    }

    #[test]
    fn jitter_defaults_to_a_tenth_of_the_interval() {
        let c = parse(&format!("interval: 1h\n{BASE}")).unwrap();
        assert_eq!(c.jitter, secs(360));
    }

    #[test]
    fn jitter_is_at_most_the_interval() {
        let e = parse(&format!("interval: 10s\njitter: 1d\n{BASE}")).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/allowsync/config.yaml:2:9: jitter: jitter 1d is longer than interval (10s): it must be at most the interval"
        );
        let (line, key, msg) = invalid(&format!("jitter: 6m\n{BASE}"));
        assert_eq!((line, key.as_str()), (1, "jitter"));
        assert!(msg.contains("longer than interval (5m, the default)"), "{msg}");
        assert_eq!(parse(&format!("interval: 10s\njitter: 10s\n{BASE}")).unwrap().jitter, secs(10));
    }

    fn chat(extra: &str) -> String {
        format!(
            "sources:\n  - name: sgp\n    tencent_chat:\n      region: singapore\n      sdkappid: 1400000000\n      identifier: administrator\n{extra}"
        )
    }

    #[test]
    fn exactly_one_secret() {
        let (line, key, msg) = invalid(&chat(""));
        assert_eq!((line, key.as_str()), (4, "sources[0].tencent_chat"));
        assert!(msg.contains("exactly one of secret_key_file, secret_key_env or secret_key"), "{msg}");
        let (_, _, msg) = invalid(&chat("      secret_key: abc\n      secret_key_env: X\n"));
        assert!(msg.contains("exactly one"), "{msg}");
    }

    #[test]
    fn inline_secret_warns_and_never_prints() {
        let c = parse(&chat("      secret_key: s3cr3t-value\n")).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("inline")));
        let SourceKind::TencentChat(t) = &c.sources[0].kind else { panic!() };
        assert_eq!(t.secret_key.expose(), "s3cr3t-value");
        assert_eq!(t.endpoints, ["https://adminapisgp.im.qcloud.com", "https://adminapisgp.my-imcloud.com"]);
        for shown in [format!("{c:?}"), format!("{}", t.secret_key)] {
            assert!(!shown.contains("s3cr3t-value"), "{shown}");
        }
    }

    #[test]
    fn secret_file_relative_missing_and_loose() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.yaml");
        std::fs::write(&cfg, chat("      secret_key_file: keys/app.key\n")).unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains(":7:24: sources[0].tencent_chat.secret_key_file: cannot read the secret key file"),
            "{e}"
        );
        assert!(e.contains(&dir.path().join("keys/app.key").display().to_string()), "{e}");

        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/app.key"), "filekey\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("keys/app.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let c = Config::load(&cfg).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("readable by group or others")), "{:?}", c.warnings);
        let SourceKind::TencentChat(t) = &c.sources[0].kind else { panic!() };
        assert_eq!(t.secret_key.expose(), "filekey");

        std::fs::set_permissions(dir.path().join("keys/app.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert!(Config::load(&cfg).unwrap().warnings.is_empty());
    }

    #[test]
    fn parsing_reads_no_secret_and_resolving_reads_them() {
        let path = Path::new("/etc/allowsync/config.yaml");
        let parsed = super::parse(&chat("      secret_key_file: /nonexistent/app.key\n"), path).unwrap();
        assert!(format!("{parsed:?}").contains("SecretRef(file /nonexistent/app.key)"), "{parsed:?}");
        let e = parsed.resolve().unwrap_err().to_string();
        assert!(
            e.contains(":7:24: sources[0].tencent_chat.secret_key_file: cannot read the secret key file /nonexistent/app.key"),
            "{e}"
        );
        let parsed = super::parse(&chat("      secret_key: s3cr3t-value\n"), path).unwrap();
        assert!(!format!("{parsed:?}").contains("s3cr3t-value"), "{parsed:?}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.yaml");
        std::fs::write(&cfg, chat("      secret_key_file: app.key\n")).unwrap();
        std::fs::write(dir.path().join("app.key"), "\u{feff}filekey\r\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("app.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(&cfg).unwrap();
        let SourceKind::TencentChat(t) = &c.sources[0].kind else { panic!() };
        assert_eq!(t.secret_key.expose(), "filekey");
        let file = dir.path().join("app.key");
        let want =
            format!("secret key file {} starts with a UTF-8 byte order mark (BOM): ignored", file.display());
        assert_eq!(c.warnings, [want]);
    }

    #[test]
    fn secret_env() {
        let (line, key, msg) = invalid(&chat("      secret_key_env: ALLOWSYNC_TEST_UNSET_VAR\n"));
        assert_eq!((line, key.as_str()), (7, "sources[0].tencent_chat.secret_key_env"));
        assert!(msg.contains("ALLOWSYNC_TEST_UNSET_VAR is not set"), "{msg}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c = parse(&format!("state_file: state/s.json\n{BASE}")).unwrap();
        assert_eq!(c.state_file, Path::new("/etc/allowsync/state/s.json"));
        let c = parse(&chat("      secret_key: k\n      ca_file: ca.pem\n")).unwrap();
        let SourceKind::TencentChat(t) = &c.sources[0].kind else { panic!() };
        assert_eq!(t.ca_file.as_deref(), Some(Path::new("/etc/allowsync/ca.pem")));
    }

    #[test]
    fn endpoints_must_be_https_or_loopback_http() {
        assert!(check_endpoint("https://adminapisgp.im.qcloud.com").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080").is_ok());
        assert!(check_endpoint("http://[::1]:8080").is_ok());
        assert!(check_endpoint("http://localhost:1").is_ok());
        assert!(check_endpoint("http://example.com").is_err());
        assert!(check_endpoint("http://10.0.0.1:80").is_err());
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("https://").is_err());
        let (line, key, msg) = invalid(&chat("      secret_key: k\n      endpoint: http://192.0.2.1\n"));
        assert_eq!((line, key.as_str()), (8, "sources[0].tencent_chat.endpoint"));
        assert!(msg.contains("clear text"), "{msg}");
        let c = parse(&chat("      secret_key: k\n      endpoint: http://127.0.0.1:9/\n")).unwrap();
        let SourceKind::TencentChat(t) = &c.sources[0].kind else { panic!() };
        assert_eq!(t.endpoints, ["http://127.0.0.1:9"]);
    }

    #[test]
    fn static_entries_are_checked() {
        let (line, key, msg) = invalid("sources:\n  - name: a\n    static: [10.0.0.1, 10.0.0.300]\n");
        assert_eq!((line, key.as_str()), (3, "sources[0].static"));
        assert!(msg.contains("`10.0.0.300`"), "{msg}");
        let (_, _, msg) = invalid("sources:\n  - name: a\n    static: [10.0.0.1/24]\n");
        assert!(msg.contains("did you mean `10.0.0.0/24`"), "{msg}");
    }

    #[test]
    fn static_entries_must_pass_the_admission_rules() {
        // Too wide: at the entry's own line and column, with its key.
        let e = parse("sources:\n  - name: a\n    static:\n      - 10.0.0.0/8\n      - 0.0.0.0/0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/allowsync/config.yaml:5:9: sources[0].static[1]: static entry 0.0.0.0/0 is wider than /8 \
             (safety.min_prefix_v4): lower safety.min_prefix_v4 if that is really meant"
        );
        // The edges, both families, mapped IPv6 judged as IPv4.
        let one = |entry: &str, safety: &str| {
            parse(&format!("sources:\n  - name: a\n    static: [\"{entry}\"]\n{safety}"))
        };
        for bad in ["10.0.0.0/7", "2001:db8::/31", "::ffff:0.0.0.0/96", "::/0"] {
            let (line, key, msg) = invalid(&format!("sources:\n  - name: a\n    static: [\"{bad}\"]\n"));
            assert_eq!((line, key.as_str()), (3, "sources[0].static[0]"), "{bad}");
            assert!(msg.contains("is wider than"), "{bad}: {msg}");
        }
        for good in [
            "10.0.0.0/8",
            "2001:db8::/32",
            "192.0.2.0/24",
            "198.51.100.7",
            "203.0.113.0/24",
            "2001:db8:1::/48",
        ] {
            assert!(one(good, "").is_ok(), "{good}");
        }
        // Special ranges, whatever the minimum.
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
            "240.0.0.1",
            "::1",
            "::",
            "ff02::1",
            "fe80::1",
        ] {
            let (_, key, msg) = invalid(&format!("sources:\n  - name: a\n    static: [\"{bad}\"]\n"));
            assert_eq!(key, "sources[0].static[0]");
            assert!(msg.contains("which is never allowed"), "{bad}: {msg}");
        }
        let e = one("0.0.0.0/0", "safety: { min_prefix_v4: 0 }\n").unwrap_err().to_string();
        assert!(e.contains("static entry 0.0.0.0/0 contains the unspecified range 0.0.0.0/8"), "{e}");
        // Lowering the minimum is the operator's opt-in, wherever safety is written.
        assert!(one("16.0.0.0/4", "safety: { min_prefix_v4: 4 }\n").is_ok());
        let c = parse("safety: { min_prefix_v6: 16 }\nsources:\n  - name: a\n    static: [\"2001::/16\"]\n")
            .unwrap();
        assert_eq!(c.safety.min_prefix(), MinPrefix { v4: 8, v6: 16 });
    }

    #[test]
    fn safety_keys_are_range_checked() {
        let hosts = "sources:\n  - name: office\n    static: [203.0.113.7, \"2001:db8:1::7\"]\n";
        let c = parse(&format!(
            "{hosts}safety:\n  min_prefix_v4: 32\n  min_prefix_v6: 128\n  max_added_addresses_v4: 0\n  max_added_addresses_v6: 18446744073709551615\n"
        )).unwrap();
        assert_eq!((c.safety.min_prefix_v4, c.safety.min_prefix_v6), (32, 128));
        assert_eq!((c.safety.max_added_addresses_v4, c.safety.max_added_addresses_v6), (0, u64::MAX));
        let (line, key, msg) = invalid(&format!("{BASE}safety:\n  min_prefix_v4: 33\n"));
        assert_eq!((line, key.as_str()), (6, "safety.min_prefix_v4"));
        assert!(msg.contains("0..=32"), "{msg}");
        let (_, key, _) = invalid(&format!("{BASE}safety:\n  min_prefix_v6: 129\n"));
        assert_eq!(key, "safety.min_prefix_v6");
        let (_, key, _) = invalid(&format!("{BASE}safety:\n  max_added_addresses_v4: -1\n"));
        assert_eq!(key, "safety.max_added_addresses_v4");
    }

    #[test]
    fn names_unique_and_at_least_one_source() {
        let (line, key, msg) =
            invalid("sources:\n  - name: a\n    static: [10.0.0.1]\n  - name: a\n    static: [10.0.0.2]\n");
        assert_eq!((line, key.as_str()), (4, "sources[1].name"));
        assert!(msg.contains("used twice"), "{msg}");
        let (_, key, msg) = invalid("sources: []\n");
        assert_eq!(key, "sources");
        assert!(msg.contains("at least one"), "{msg}");
        let (_, key, _) = invalid("interval: 5m\n");
        assert!(key.contains("sources") || key == "(top level)", "{key}");
    }

    #[test]
    fn nettypes_and_ranges() {
        let (_, key, msg) = invalid(&chat("      secret_key: k\n      nettypes: [5, 7]\n"));
        assert_eq!(key, "sources[0].tencent_chat.nettypes");
        assert!(msg.contains("nettype 7"), "{msg}");
        let (_, key, _) = invalid(&format!("{BASE}safety:\n  max_removal_percent: 101\n"));
        assert_eq!(key, "safety.max_removal_percent");
        let (_, key, _) = invalid(&chat("      secret_key: k\n      timeout: 0s\n"));
        assert_eq!(key, "sources[0].tencent_chat.timeout");
        let (line, key, msg) = invalid(&chat("      secret_key: k\n").replace("singapore", "mars"));
        assert_eq!((line, key.as_str()), (4, "sources[0].tencent_chat.region"));
        assert!(msg.contains("mars"), "{msg}");
        let (_, _, msg) = invalid(&chat("      secret_key: k\n      region: seoul\n"));
        assert!(msg.contains("duplicate"), "{msg}");
    }

    #[test]
    fn exactly_one_backend() {
        let (line, key, msg) = invalid(&format!("{BASE}backend:\n  nftables: {{}}\n  dry_run: {{}}\n"));
        assert_eq!((line, key.as_str()), (6, "backend"));
        assert!(msg.contains("exactly one"), "{msg}");
        let c = parse(&format!(
            "{BASE}backend:\n  ipset: {{ maxelem: 200000, enforce: {{ tcp_ports: [443, 443, 80] }} }}\n"
        ))
        .unwrap();
        assert!(
            matches!(&c.backend, BackendConfig::Ipset(i) if i.maxelem == 200000 && i.enforce.as_ref().unwrap().tcp_ports == [80, 443])
        );
        let (_, key, _) = invalid(&format!("{BASE}backend:\n  nftables: {{ table: \"bad name\" }}\n"));
        assert_eq!(key, "backend.nftables.table");
    }

    #[test]
    fn the_file_backend_keys() {
        let file = |body: &str| parse(&format!("{BASE}backend:\n  file: {{ {body} }}\n"));
        let c = file("path: out/chat.json").unwrap();
        assert_eq!(
            c.backend,
            BackendConfig::File(FileConfig {
                path: "/etc/allowsync/out/chat.json".into(),
                format: FileFormat::Json,
                on_change: None,
                on_change_timeout: secs(30),
                refresh: secs(900),
            })
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = file("path: a, refresh: 1m").unwrap();
        assert!(c.warnings[0].contains("refresh 1m is shorter than interval 5m"), "{:?}", c.warnings);
        let c = file(r#"path: /srv/a.conf, format: nginx, on_change: ["/usr/sbin/nginx", "-s", "reload"], on_change_timeout: 5s, refresh: 1h"#).unwrap();
        let BackendConfig::File(f) = c.backend else { panic!() };
        assert_eq!((f.format, f.on_change_timeout, f.refresh), (FileFormat::Nginx, secs(5), secs(3600)));
        assert_eq!(f.on_change.unwrap(), ["/usr/sbin/nginx", "-s", "reload"]);
        for (body, key, says) in [
            ("format: yaml, path: /a", "backend.file.format", "yaml"),
            ("path: /a, on_change: [nginx, -s, reload]", "backend.file.on_change", "not an absolute path"),
            ("path: /a, on_change: []", "backend.file.on_change", "on_change is empty"),
            ("path: /srv/", "backend.file.path", "not a file path"),
            ("path: /a, refresh: 1s", "backend.file.refresh", "out of range"),
            ("path: /a, on_change_timeout: 10m", "backend.file.on_change_timeout", "out of range"),
            ("format: json", "backend.file", "path"),
        ] {
            let (line, k, msg) = invalid(&format!("{BASE}backend:\n  file: {{ {body} }}\n"));
            assert_eq!((line, k.as_str()), (6, key), "{body}: {msg}");
            assert!(msg.contains(says), "{body}: {msg}");
        }
        let (_, key, msg) = invalid(&format!("{BASE}backend:\n  file: {{ path: /a }}\n  dry_run: {{}}\n"));
        assert_eq!(key, "backend");
        assert!(msg.contains("exactly one of nftables, ipset, dry_run or file"), "{msg}");
    }

    #[test]
    fn the_ipset_check_interval_defaults_to_10s_and_is_bounded() {
        let ipset = |extra: &str| parse(&format!("{BASE}backend:\n  ipset: {{ {extra} }}\n"));
        let every = |c: Config| match c.backend {
            BackendConfig::Ipset(i) => i.check_interval,
            other => panic!("{other:?}"),
        };
        assert_eq!(every(ipset("").unwrap()), secs(10));
        assert_eq!(every(ipset("check_interval: 2s").unwrap()), secs(2));
        let (_, key, msg) = invalid(&format!("{BASE}backend:\n  ipset: {{ check_interval: 0s }}\n"));
        assert_eq!(key, "backend.ipset.check_interval");
        assert!(msg.contains("out of range"), "{msg}");
    }

    #[test]
    fn enforce_scope_defaults_to_host() {
        let enforce =
            |yaml: &str| match parse(&format!("{BASE}backend:\n  nftables: {{ enforce: {yaml} }}\n")) {
                Ok(Config { backend: BackendConfig::Nftables(n), .. }) => n.enforce.unwrap(),
                other => panic!("{other:?}"),
            };
        // A configuration written before the key existed gets the wider scope.
        assert_eq!(enforce("{ tcp_ports: [443] }").scope, EnforceScope::Host);
        assert_eq!(enforce("{ tcp_ports: [443], scope: host }").scope, EnforceScope::Host);
        assert_eq!(enforce("{ tcp_ports: [443], scope: local }").scope, EnforceScope::Local);
        let (line, key, msg) = invalid(&format!(
            "{BASE}backend:\n  ipset:\n    enforce: {{ tcp_ports: [443], scope: input }}\n"
        ));
        assert_eq!((line, key.as_str()), (7, "backend.ipset.enforce.scope"), "{msg}");
        assert!(msg.contains("host") && msg.contains("local"), "{msg}");
    }

    #[test]
    fn operator_sets_are_named_as_nft_writes_them_and_must_fit_their_family() {
        let nft = |body: &str| format!("{BASE}backend:\n  nftables: {{ {body} }}\n");
        let c = parse(&nft(r#"set_v4: "ip filter chat_v4", set_v6: "ip6  filter chat_v6""#)).unwrap();
        let BackendConfig::Nftables(n) = &c.backend else { panic!() };
        assert_eq!(n.set_object(false).to_string(), "set ip filter chat_v4");
        assert_eq!(n.set_object(true).to_string(), "set ip6 filter chat_v6");
        assert_eq!(n.table_object().to_string(), "table inet allowsync");
        // Plain names keep meaning the set of `table inet <table>`; `inet <name>` is that table.
        let c = parse(&nft(r#"table: "inet fw", set_v4: allow_v4"#)).unwrap();
        let BackendConfig::Nftables(n) = &c.backend else { panic!() };
        assert_eq!(n.set_object(false).to_string(), "set inet fw allow_v4");
        assert_eq!(n.set_object(true).to_string(), "set inet fw allow_v6");

        let (line, key, message) = invalid(&nft(r#"table: "ip filter""#));
        assert_eq!((line, key.as_str()), (6, "backend.nftables.table"));
        assert!(message.contains("it is an inet table, not ip"), "{message}");
        let (_, key, message) = invalid(&nft(r#"set_v4: "ip6 filter chat_v4""#));
        assert_eq!(key, "backend.nftables.set_v4");
        assert!(message.contains("set ip6 filter chat_v4 cannot hold IPv4 addresses"), "{message}");
        let (_, key, message) = invalid(&nft(r#"set_v4: "arp filter x""#));
        assert_eq!(key, "backend.nftables.set_v4");
        assert!(message.contains("`arp` is not an nftables family"), "{message}");
        let (_, key, _) = invalid(&nft(r#"set_v4: "inet allowsync allow_v6""#));
        assert_eq!(key, "backend.nftables.set_v4", "the same set as set_v6");
        // A rule can only use the sets of its own table.
        let (_, key, message) =
            invalid(&nft(r#"set_v4: "ip filter chat_v4", enforce: { tcp_ports: [443] }"#));
        assert_eq!(key, "backend.nftables.enforce");
        assert!(
            message.contains("enforce needs set_v4 and set_v6 in allowsync's own table inet allowsync"),
            "{message}"
        );
    }

    #[test]
    fn metrics_are_off_by_default_and_listen_on_loopback_unless_allowed() {
        assert_eq!(parse(BASE).unwrap().metrics, MetricsConfig::default());
        let m = |yaml: &str| parse(&format!("{BASE}metrics:\n{yaml}"));
        let c = m("  listen: 127.0.0.1:9733\n  textfile: allowsync.prom\n").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9733".parse().unwrap()));
        assert_eq!(c.metrics.textfile.as_deref(), Some(Path::new("/etc/allowsync/allowsync.prom")));
        assert!(m("  listen: \"[::1]:9733\"\n").is_ok());

        let (line, key, message) = invalid(&format!("{BASE}metrics:\n  listen: 0.0.0.0:9733\n"));
        assert_eq!((line, key.as_str()), (6, "metrics.listen"));
        assert!(message.contains("set metrics.allow_remote: true"), "{message}");
        let c = m("  listen: 0.0.0.0:9733\n  allow_remote: true\n").unwrap();
        assert!(c.metrics.allow_remote);

        let (_, key, message) = invalid(&format!("{BASE}metrics:\n  listen: localhost\n"));
        assert_eq!(key, "metrics.listen");
        assert!(message.contains("write IP:port"), "{message}");
        let (_, key, _) = invalid(&format!("{BASE}metrics:\n  listen: 127.0.0.1:0\n"));
        assert_eq!(key, "metrics.listen");
        let (line, key, message) = invalid(&format!("{BASE}metrics:\n  textfile: /tmp/allowsync.txt\n"));
        assert_eq!((line, key.as_str()), (6, "metrics.textfile"));
        assert!(message.contains("*.prom"), "{message}");
        let (_, key, _) = invalid(&format!("{BASE}metrics:\n  listn: 127.0.0.1:9733\n"));
        assert!(key.starts_with("metrics"), "{key}");
    }

    fn url_source(extra: &str) -> String {
        format!("sources:\n  - name: relay\n    url:\n{extra}")
    }

    #[test]
    fn a_url_source_with_its_defaults() {
        let c = parse(&url_source(
            "      url: https://allowlist.internal.example/chat.json?v=1\n      ca_file: relay-ca.pem\n",
        ))
        .unwrap();
        let SourceKind::Url(u) = &c.sources[0].kind else { panic!("{:?}", c.sources) };
        assert_eq!(
            **u,
            UrlConfig {
                url: "https://allowlist.internal.example/chat.json?v=1".into(),
                ca_file: Some(PathBuf::from("/etc/allowsync/relay-ca.pem")),
                timeout: secs(10),
                max_bytes: 4 * 1024 * 1024,
                max_age: secs(3600),
            }
        );
        let c = parse(&url_source("      url: http://[::1]:8080/l.json\n      timeout: 3s\n      max_bytes: 2048\n      max_age: 20m\n")).unwrap();
        let SourceKind::Url(u) = &c.sources[0].kind else { panic!() };
        assert_eq!((u.timeout, u.max_bytes, u.max_age), (secs(3), 2048, secs(1200)));
        assert!(parse(&url_source("      url: http://localhost:1/l.json\n")).is_ok());
        assert!(parse(&url_source("      url: http://127.0.0.2/l.json\n")).is_ok());
    }

    #[test]
    fn a_url_source_is_checked_where_it_is_written() {
        for (extra, want_line, want_key, want) in [
            (
                "      url: http://192.0.2.10/chat.json\n",
                4,
                "sources[0].url.url",
                "uses http:// to a non-loopback host",
            ),
            ("      url: http://relay.example/chat.json\n", 4, "sources[0].url.url", "use https://"),
            ("      url: ftp://relay.example/chat.json\n", 4, "sources[0].url.url", "only https:// URLs"),
            (
                "      url: https://user:pw@relay.example/c.json\n",
                4,
                "sources[0].url.url",
                "no credentials in the URL",
            ),
            ("      url: not a url\n", 4, "sources[0].url.url", "is not a URL"),
            (
                "      url: https://r.example/c.json\n      max_age: 0s\n",
                5,
                "sources[0].url.max_age",
                "out of range",
            ),
            (
                "      url: https://r.example/c.json\n      max_bytes: 10\n",
                5,
                "sources[0].url.max_bytes",
                "out of range",
            ),
            (
                "      url: https://r.example/c.json\n      timeout: 0s\n",
                5,
                "sources[0].url.timeout",
                "out of range",
            ),
            (
                "      url: https://r.example/c.json\n      refresh: 15m\n",
                5,
                "sources[0].url.refresh",
                "unknown field",
            ),
            ("      ca_file: x.pem\n", 4, "sources[0].url", "missing field `url`"),
        ] {
            let (line, key, msg) = invalid(&url_source(extra));
            assert_eq!((line, key.as_str()), (want_line, want_key), "{extra}: {msg}");
            assert!(msg.contains(want), "{extra}: {msg}");
        }
        let e = parse(&url_source("      url: http://192.0.2.10/chat.json\n")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/allowsync/config.yaml:4:12: sources[0].url.url: `http://192.0.2.10/chat.json` uses http://"), "{e}");
        let (line, key, msg) = invalid(
            "sources:\n  - name: relay\n    static: [192.0.2.1]\n    url: { url: https://r.example/c.json }\n",
        );
        assert_eq!((line, key.as_str()), (4, "sources[0].url"));
        assert!(msg.contains("has url and another kind"), "{msg}");
    }
}
