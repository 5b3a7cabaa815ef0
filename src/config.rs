//! The configuration file: one YAML document, read once at start and again on SIGHUP.
//!
//! Loading happens in two steps, both of which name the file, line, column and key of any
//! mistake:
//!
//! 1. [`RawConfig`] is deserialized with unknown keys denied. Values are checked as they are
//!    read (durations in range, `https://` endpoints, static entries), so serde-saphyr puts the
//!    line of the offending value on the error and serde_path_to_error the key path.
//! 2. [`Config::load`] resolves what needs the file system or environment: relative paths
//!    against the configuration's directory, and the secret key (file, environment variable or
//!    inline), whose errors point at the key's own line through [`Spanned`].
//!
//! Secrets are held as [`SecretKey`], whose `Debug` and `Display` never print the key.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use crate::admission::{self, MinPrefix};
use crate::prefixes;

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

/// A validated configuration with every path absolute and every secret read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from.
    pub path: PathBuf,
    pub interval: Duration,
    pub jitter: Duration,
    pub state_file: PathBuf,
    pub sources: Vec<SourceConfig>,
    pub backend: BackendConfig,
    pub safety: Safety,
    pub log: LogConfig,
    /// Things worth a warning that do not stop the daemon (inline secret, loose key file
    /// permissions). Logged by the caller once logging is set up.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
}

#[derive(Debug, Clone)]
pub enum SourceKind {
    TencentChat(Box<TencentChatConfig>),
    Static(Vec<IpNet>),
}

/// One Chat application to ask for its webhook egress addresses.
#[derive(Debug, Clone)]
pub struct TencentChatConfig {
    pub region: Option<Region>,
    /// Base URLs to try in order: the region's primary and backup domains, or the configured
    /// `endpoint` alone.
    pub endpoints: Vec<String>,
    pub sdkappid: u64,
    pub identifier: String,
    pub secret_key: SecretKey,
    pub nettypes: Vec<u8>,
    pub timeout: Duration,
    pub usersig_ttl: Duration,
    pub ca_file: Option<PathBuf>,
}

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

/// Chat data-centre regions and their REST API domains (primary, then backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    China,
    Singapore,
    Seoul,
    Frankfurt,
    SiliconValley,
    Jakarta,
    Tokyo,
    Mumbai,
}

impl Region {
    /// The documented domains, primary first. Tokyo and Mumbai have no documented backup.
    pub fn domains(self) -> &'static [&'static str] {
        match self {
            Region::China => &["console.tim.qq.com", "adminapi.my-imcloud.com"],
            Region::Singapore => &["adminapisgp.im.qcloud.com", "adminapisgp.my-imcloud.com"],
            Region::Seoul => &["adminapikr.im.qcloud.com", "adminapikr.my-imcloud.com"],
            Region::Frankfurt => &["adminapiger.im.qcloud.com", "adminapiger.my-imcloud.com"],
            Region::SiliconValley => &["adminapiusa.im.qcloud.com", "adminapiusa.my-imcloud.com"],
            Region::Jakarta => &["adminapiidn.im.qcloud.com", "adminapiidn.my-imcloud.com"],
            Region::Tokyo => &["adminapijpn.im.qcloud.com"],
            Region::Mumbai => &["adminapiind.im.qcloud.com"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Nftables(NftablesConfig),
    Ipset(IpsetConfig),
    DryRun,
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Nftables(_) => "nftables",
            BackendConfig::Ipset(_) => "ipset",
            BackendConfig::DryRun => "dry_run",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    #[serde(default = "default_table", deserialize_with = "object_name")]
    pub table: String,
    #[serde(default = "default_set_v4", deserialize_with = "object_name")]
    pub set_v4: String,
    #[serde(default = "default_set_v6", deserialize_with = "object_name")]
    pub set_v6: String,
    #[serde(default)]
    pub enforce: Option<Enforce>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpsetConfig {
    #[serde(default = "default_ipset_v4", deserialize_with = "object_name")]
    pub set_v4: String,
    #[serde(default = "default_ipset_v6", deserialize_with = "object_name")]
    pub set_v6: String,
    #[serde(default = "default_maxelem", deserialize_with = "maxelem")]
    pub maxelem: u32,
    #[serde(default)]
    pub enforce: Option<Enforce>,
}

/// Ports to close to everyone but the allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Enforce {
    #[serde(default, deserialize_with = "ports")]
    pub tcp_ports: Vec<u16>,
    #[serde(default, deserialize_with = "ports")]
    pub udp_ports: Vec<u16>,
    #[serde(default)]
    pub scope: EnforceScope,
}

/// Which packets `enforce` filters (`enforce.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EnforceScope {
    /// Every packet addressed to one of this host's addresses, judged by its original
    /// destination port before any DNAT: local sockets, and containers, VMs and pods behind a
    /// published port alike (a prerouting hook).
    #[default]
    Host,
    /// Only packets delivered to a local socket (the input hook): a DNATed port is not covered.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Safety {
    #[serde(default)]
    pub allow_empty: bool,
    #[serde(default = "default_max_removal", deserialize_with = "percent")]
    pub max_removal_percent: u8,
    /// Entries wider than this are never applied (see [`crate::admission`]).
    #[serde(default = "default_min_prefix_v4", deserialize_with = "min_prefix_v4")]
    pub min_prefix_v4: u8,
    #[serde(default = "default_min_prefix_v6", deserialize_with = "min_prefix_v6")]
    pub min_prefix_v6: u8,
    /// The widening guard: IPv4 addresses one sync may add to what the kernel holds.
    #[serde(default = "default_max_added")]
    pub max_added_addresses_v4: u64,
    /// The same in IPv6, counted in /64 networks.
    #[serde(default = "default_max_added")]
    pub max_added_addresses_v6: u64,
}

impl Default for Safety {
    fn default() -> Self {
        Safety {
            allow_empty: false,
            max_removal_percent: default_max_removal(),
            min_prefix_v4: default_min_prefix_v4(),
            min_prefix_v6: default_min_prefix_v6(),
            max_added_addresses_v4: default_max_added(),
            max_added_addresses_v6: default_max_added(),
        }
    }
}

impl Safety {
    /// The minimum prefix lengths, for [`crate::admission::check`].
    pub fn min_prefix(&self) -> MinPrefix {
        MinPrefix { v4: self.min_prefix_v4, v6: self.min_prefix_v6 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level", deserialize_with = "log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: default_level() }
    }
}

// ---- the file as written ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, deserialize_with = "interval")]
    interval: Option<Duration>,
    #[serde(default)]
    jitter: Option<Spanned<Jitter>>,
    #[serde(default)]
    state_file: Option<Spanned<PathBuf>>,
    sources: Spanned<Vec<RawSource>>,
    #[serde(default)]
    backend: Option<Spanned<RawBackend>>,
    #[serde(default)]
    safety: Safety,
    #[serde(default)]
    log: LogConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    #[serde(default)]
    tencent_chat: Option<Spanned<RawChat>>,
    #[serde(default, rename = "static", deserialize_with = "static_entries")]
    static_entries: Option<Vec<Spanned<IpNet>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChat {
    #[serde(default)]
    region: Option<Region>,
    #[serde(default, deserialize_with = "endpoint")]
    endpoint: Option<String>,
    sdkappid: u64,
    identifier: String,
    #[serde(default)]
    secret_key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    secret_key_env: Option<Spanned<String>>,
    #[serde(default)]
    secret_key: Option<String>,
    #[serde(default = "default_nettypes", deserialize_with = "nettypes")]
    nettypes: Vec<u8>,
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    timeout: Duration,
    #[serde(default = "default_usersig_ttl", deserialize_with = "usersig_ttl")]
    usersig_ttl: Duration,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

/// `backend:` holds exactly one of its keys.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(default)]
    nftables: Option<NftablesConfig>,
    #[serde(default)]
    ipset: Option<IpsetConfig>,
    #[serde(default)]
    dry_run: Option<DryRunConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunConfig {}

fn default_table() -> String {
    "allowsync".into()
}
fn default_set_v4() -> String {
    "allow_v4".into()
}
fn default_set_v6() -> String {
    "allow_v6".into()
}
fn default_ipset_v4() -> String {
    "allowsync_v4".into()
}
fn default_ipset_v6() -> String {
    "allowsync_v6".into()
}
fn default_maxelem() -> u32 {
    65536
}
fn default_max_removal() -> u8 {
    50
}
fn default_min_prefix_v4() -> u8 {
    admission::DEFAULT_MIN_PREFIX_V4
}
fn default_min_prefix_v6() -> u8 {
    admission::DEFAULT_MIN_PREFIX_V6
}
/// A /16 of IPv4, 65536 /64s of IPv6: far more than any GetIPList answer adds (tens of /24s and
/// /25s), far less than a stray /8.
fn default_max_added() -> u64 {
    65536
}
fn default_level() -> String {
    "info".into()
}
fn default_nettypes() -> Vec<u8> {
    vec![5, 6]
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_usersig_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

// ---- value checks, run while deserializing so errors carry the value's line --------------

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` and sums like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("`{s}` is not a duration: write a number and a unit, like 30s, 5m, 1h (units ms, s, m, h, d)")
    };
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let unit_len = rest[digits..].bytes().take_while(u8::is_ascii_alphabetic).count();
        if digits == 0 || unit_len == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_ms: u64 = match &rest[digits..digits + unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        total = total.checked_add(Duration::from_millis(ms)).ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// A duration as [`parse_duration`] reads it: `30s`, `5m`, `1h`, `250ms`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn duration_in<'de, D: Deserializer<'de>>(
    d: D,
    min: Duration,
    max: Duration,
    what: &str,
) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let v = parse_duration(&s).map_err(serde::de::Error::custom)?;
    if v < min || v > max {
        return Err(serde::de::Error::custom(format!(
            "{what} `{s}` is out of range: it must be between {} and {}",
            fmt_duration(min),
            fmt_duration(max)
        )));
    }
    Ok(v)
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_in(d, secs(10), secs(7 * 86_400), "interval").map(Some)
}
/// `jitter`, spanned so that its bound by `interval` (known only later) can name its line.
#[derive(Debug)]
struct Jitter(Duration);
impl<'de> Deserialize<'de> for Jitter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration_in(d, secs(0), secs(86_400), "jitter").map(Jitter)
    }
}
fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, secs(1), secs(120), "timeout")
}
fn usersig_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    // The official libraries default to 180 days; below an hour we would re-mint constantly.
    duration_in(d, secs(3600), secs(180 * 86_400), "usersig_ttl")
}

fn nettypes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let v = Vec::<u8>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "nettypes is empty: list at least one of 0..=6 (5 and 6 are the webhook egress lists)",
        ));
    }
    if let Some(n) = v.iter().find(|&&n| n > 6) {
        return Err(serde::de::Error::custom(format!(
            "nettype {n} does not exist: use 0..=6 (5: webhook egress inside China, 6: outside)"
        )));
    }
    let mut out = v.clone();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    check_endpoint(&s).map_err(serde::de::Error::custom)?;
    Ok(Some(s.trim_end_matches('/').to_string()))
}

/// `https://host[:port]`, or `http://` to a loopback address (tests, local mirrors). The
/// usersig travels in the query string: it must not cross a network in clear text.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let (scheme, rest) =
        s.split_once("://").ok_or_else(|| format!("`{s}` is not a URL: write https://host"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    if rest.contains(['?', '#']) {
        return Err(format!("`{s}`: give the base URL only, without a query"));
    }
    match scheme {
        "https" => Ok(()),
        "http" => {
            let host = if let Some(h) = authority.strip_prefix('[') {
                h.split(']').next().unwrap_or_default()
            } else {
                authority.rsplit_once(':').map_or(authority, |(h, _)| h)
            };
            let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "`{s}` uses http:// to a non-loopback host: the usersig would travel in clear text; use https://"
                ))
            }
        }
        _ => Err(format!("`{s}`: only https:// endpoints are allowed (http:// only to a loopback address)")),
    }
}

/// The syntax of static entries; whether they may be allowed depends on `safety`, so
/// [`admit_static`] judges them once the whole file is read (each keeps its location for that).
fn static_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Spanned<IpNet>>>, D::Error> {
    let v = Vec::<Spanned<String>>::deserialize(d)?;
    let mut out = Vec::with_capacity(v.len());
    for spanned in v {
        let s = &spanned.value;
        let e = prefixes::parse_entry(s)
            .map_err(|e| serde::de::Error::custom(format!("static entry `{s}`: {e}")))?;
        if let Some(orig) = e.masked_from {
            return Err(serde::de::Error::custom(format!(
                "static entry `{orig}` has host bits set: did you mean `{}`?",
                e.net
            )));
        }
        out.push(Spanned::new(e.net, spanned.referenced, spanned.defined));
    }
    Ok(Some(out))
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

fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    let mut v = Vec::<u16>::deserialize(d)?;
    if v.contains(&0) {
        return Err(serde::de::Error::custom("port 0 is not a port: use 1..=65535"));
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v > 100 {
        return Err(serde::de::Error::custom(format!("{v} is not a percentage: use 0..=100")));
    }
    Ok(v)
}

fn prefix_length<'de, D: Deserializer<'de>>(d: D, max: u8) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v > max {
        return Err(serde::de::Error::custom(format!("/{v} is not a prefix length: use 0..={max}")));
    }
    Ok(v)
}
fn min_prefix_v4<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    prefix_length(d, 32)
}
fn min_prefix_v6<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    prefix_length(d, 128)
}

fn maxelem<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v < 1024 {
        return Err(serde::de::Error::custom(format!("maxelem {v} is too small: use at least 1024")));
    }
    Ok(v)
}

/// nftables and ipset object names: letters, digits, `_` and `-`, at most 31 characters (ipset's
/// limit, and well under nftables' 256).
fn object_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let ok = !s.is_empty()
        && s.len() <= 31
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_alphabetic();
    if !ok {
        return Err(serde::de::Error::custom(format!(
            "`{s}` is not a valid name: start with a letter, then letters, digits, _ or -, at most 31 characters"
        )));
    }
    Ok(s)
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(s),
        _ => Err(serde::de::Error::custom(format!(
            "unknown log level `{s}`: use error, warn, info, debug or trace"
        ))),
    }
}

// ---- loading ----------------------------------------------------------------------------

impl Config {
    /// Reads, validates and resolves the configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|cause| ConfigError::Read { path: path.to_path_buf(), cause })?;
        Config::parse(&text, path)
    }

    /// Validates and resolves configuration text as if read from `path` (relative paths in it
    /// resolve against `path`'s directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw = parse_raw(text, path)?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        resolve(raw, path, &base)
    }
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    let mut key = String::new();
    let opts = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::with_deserializer_from_str_with_options(text, opts, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            key = key_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // The location is ours to place at the front; drop the library's copy at the end.
        if let Some(stripped) = message.strip_suffix(&format!(" at line {line}, column {column}")) {
            message = stripped.to_string();
        }
        let key = if key.is_empty() { "(top level)".to_string() } else { key };
        ConfigError::Invalid { path: path.to_path_buf(), line, column, key, message }
    })
}

/// The path as the operator wrote it: `sources[0].tencent_chat.region`. `Spanned` wrappers add
/// a `value` level of their own, which is dropped (no key of ours is called `value`).
fn key_path(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut s = String::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => s.push_str(&format!("[{index}]")),
            Segment::Map { key } if key == "value" => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(key);
            }
            Segment::Unknown => s.push_str(".?"),
        }
    }
    s
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

fn resolve(raw: RawConfig, path: &Path, base: &Path) -> Result<Config, ConfigError> {
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
            "no sources: configure at least one (tencent_chat or static)",
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
        let kind = match (src.tencent_chat, src.static_entries) {
            (Some(chat), None) => {
                let c = resolve_chat(chat, path, base, &key("tencent_chat"), &name, &mut warnings)?;
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
                    format!("source `{name}` needs tencent_chat: or static:"),
                ));
            }
        };
        sources.push(SourceConfig { name, kind });
    }

    let backend = match raw.backend {
        None => BackendConfig::Nftables(NftablesConfig {
            table: default_table(),
            set_v4: default_set_v4(),
            set_v6: default_set_v6(),
            enforce: None,
        }),
        Some(b) => match (&b.value.nftables, &b.value.ipset, &b.value.dry_run) {
            (Some(n), None, None) if n.set_v4 == n.set_v6 => {
                return Err(at(path, &b, "backend.nftables", "set_v4 and set_v6 must differ"));
            }
            (None, Some(i), None) if i.set_v4 == i.set_v6 => {
                return Err(at(path, &b, "backend.ipset", "set_v4 and set_v6 must differ"));
            }
            (Some(n), None, None) => BackendConfig::Nftables(n.clone()),
            (None, Some(i), None) => BackendConfig::Ipset(i.clone()),
            (None, None, Some(_)) => BackendConfig::DryRun,
            _ => return Err(at(path, &b, "backend", "configure exactly one of nftables, ipset or dry_run")),
        },
    };

    Ok(Config {
        path: path.to_path_buf(),
        interval,
        jitter,
        state_file,
        sources,
        backend,
        safety: raw.safety,
        log: raw.log,
        warnings,
    })
}

/// Under systemd, `LoadCredential=chat-sgp.key:/etc/allowsync/chat-sgp.key` hands the daemon
/// (which runs as an unprivileged user that cannot read `/etc/allowsync/chat-sgp.key`) a copy as
/// `$CREDENTIALS_DIRECTORY/chat-sgp.key`. When that copy exists it is read in place of the
/// configured file, so one configuration serves both the service and root at a shell.
fn systemd_credential(configured: &Path, credentials_dir: Option<&Path>) -> Option<PathBuf> {
    let candidate = credentials_dir?.join(configured.file_name()?);
    candidate.is_file().then_some(candidate)
}

fn resolve_chat(
    chat: Spanned<RawChat>,
    path: &Path,
    base: &Path,
    key: &str,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<TencentChatConfig, ConfigError> {
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
        let configured = absolute(base, &f.value);
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let credential = systemd_credential(&configured, credentials.as_deref());
        let file = credential.clone().unwrap_or_else(|| configured.clone());
        let k = format!("{key}.secret_key_file");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            at(path, f, &k, format!("cannot read the secret key file {}: {e}", file.display()))
        })?;
        if let Ok(meta) = std::fs::metadata(&file) {
            use std::os::unix::fs::PermissionsExt;
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
            return Err(at(
                path,
                f,
                &k,
                format!(
                    "the secret key file {} is missing or empty (systemd handed the service an empty credential {})",
                    configured.display(),
                    file.display()
                ),
            ));
        }
        if key_text.is_empty() {
            return Err(at(path, f, &k, format!("the secret key file {} is empty", file.display())));
        }
        SecretKey::new(key_text, format!("file {}", file.display()))
    } else if let Some(v) = &c.secret_key_env {
        let k = format!("{key}.secret_key_env");
        match std::env::var(&v.value) {
            Ok(s) if !s.trim().is_empty() => {
                SecretKey::new(s.trim(), format!("environment variable {}", v.value))
            }
            _ => {
                return Err(at(
                    path,
                    v,
                    k,
                    format!("environment variable {} is not set (or empty)", v.value),
                ));
            }
        }
    } else {
        warnings.push(format!(
            "source `{name}`: the secret key is written inline in {}; prefer secret_key_file (mode 0600) or systemd's LoadCredential",
            path.display()
        ));
        let s = c.secret_key.as_deref().unwrap_or_default().trim();
        if s.is_empty() {
            return Err(at(path, &chat, format!("{key}.secret_key"), "secret_key is empty"));
        }
        SecretKey::new(s, "inline")
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
sources:
  - name: office
    static: [203.0.113.7, \"2001:db8:1::/48\"]
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/allowsync/config.yaml"))
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
    fn a_systemd_credential_stands_in_for_the_key_file() {
        let creds = tempfile::tempdir().unwrap();
        let etc = Path::new("/etc/allowsync/chat-sgp.key");
        assert_eq!(systemd_credential(etc, None), None);
        assert_eq!(systemd_credential(etc, Some(creds.path())), None, "no such credential");
        std::fs::write(creds.path().join("chat-sgp.key"), "k").unwrap();
        assert_eq!(systemd_credential(etc, Some(creds.path())), Some(creds.path().join("chat-sgp.key")));
        assert_eq!(systemd_credential(Path::new("/etc/allowsync/other.key"), Some(creds.path())), None);
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
}
