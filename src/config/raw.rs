//! What was written: the structs the YAML file deserializes into (unknown keys denied), their
//! defaults, and the checks each value passes as it is read (durations in range, `https://`
//! endpoints, static entries, names), so that serde-saphyr puts the line of the offending value
//! on the error and serde_path_to_error its key path. No I/O: text in, [`RawConfig`] out.
//!
//! The sections used as written ([`NftablesConfig`], [`Safety`], [`LogConfig`], …) are part of
//! [`super::Config`] as they are.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::ConfigError;
use crate::admission::{self, MinPrefix};
use crate::ownership::{self, NftFamily, Object};
use crate::prefixes;

/// Chat data-centre regions (their REST API domains are the Chat source's: `source/chat.rs`).
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftablesConfig {
    /// allowsync's own table, `inet <table>` (written `allowsync` or `inet allowsync`; kept as
    /// the bare name).
    #[serde(default = "default_table", deserialize_with = "own_table")]
    pub table: String,
    /// A set name (in `table inet <table>`) or a set the way nft writes it, `ip filter chat_v4`
    /// (see [`NftablesConfig::set_object`]).
    #[serde(default = "default_set_v4", deserialize_with = "nft_set")]
    pub set_v4: String,
    #[serde(default = "default_set_v6", deserialize_with = "nft_set")]
    pub set_v6: String,
    #[serde(default)]
    pub enforce: Option<Enforce>,
}

impl NftablesConfig {
    /// The IPv4 (`v6: false`) or IPv6 set: a plain name is that set in `table inet <table>`.
    pub fn set_object(&self, v6: bool) -> Object {
        let text = if v6 { &self.set_v6 } else { &self.set_v4 };
        // Checked when the configuration was read; a value built in code falls back to a name.
        ownership::parse_nft_set(text, &self.table).unwrap_or_else(|_| Object::NftSet {
            family: NftFamily::Inet,
            table: self.table.clone(),
            name: text.clone(),
        })
    }

    /// allowsync's own table, `table inet <table>`.
    pub fn table_object(&self) -> Object {
        Object::NftTable { family: NftFamily::Inet, table: self.table.clone() }
    }

    /// Why these sets cannot work together, if they cannot: each set in a table of its family,
    /// two different sets, and with `enforce` both in allowsync's table (a rule can only use the
    /// sets of its own table).
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        let (v4, v6) = (self.set_object(false), self.set_object(true));
        for (key, set, wrong, holds) in
            [("set_v4", &v4, NftFamily::Ip6, "IPv4"), ("set_v6", &v6, NftFamily::Ip, "IPv6")]
        {
            if matches!(set, Object::NftSet { family, .. } if *family == wrong) {
                let only = if holds == "IPv4" { "IPv6" } else { "IPv4" };
                return Err((
                    key,
                    format!(
                        "{set} cannot hold {holds} addresses: an {} table is {only} only",
                        wrong.as_str()
                    ),
                ));
            }
        }
        if v4 == v6 {
            return Err(("set_v4", "set_v4 and set_v6 must differ".into()));
        }
        let own = self.table_object();
        if self.enforce.is_some() && [&v4, &v6].iter().any(|s| s.nft_table().as_ref() != Some(&own)) {
            return Err((
                "enforce",
                format!(
                    "enforce needs set_v4 and set_v6 in allowsync's own {own}, and they are {v4} and {v6}: an nftables rule can only use the sets of its own table. With your own sets, write the drop rules in your ruleset next to them (README, \"Using your own ruleset\"), or use plain set names"
                ),
            ));
        }
        Ok(())
    }
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
    /// How often the daemon checks that the sets (and with `enforce` the iptables chain and
    /// jump) are still there: ipset sends no change notifications.
    #[serde(default = "default_check_interval", deserialize_with = "check_interval")]
    pub check_interval: Duration,
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

/// `backend.file`: the allowlist written to a file for a proxy or a web server (see
/// [`crate::backend::file`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute once the configuration is built (relative to the configuration's directory).
    #[serde(deserialize_with = "file_path")]
    pub path: PathBuf,
    #[serde(default)]
    pub format: FileFormat,
    /// The program and its arguments, run without a shell when the prefixes changed.
    #[serde(default, deserialize_with = "argv")]
    pub on_change: Option<Vec<String>>,
    #[serde(default = "default_on_change_timeout", deserialize_with = "on_change_timeout")]
    pub on_change_timeout: Duration,
    /// How often an unchanged list is rewritten with a fresh `generated_at`.
    #[serde(default = "default_refresh", deserialize_with = "refresh")]
    pub refresh: Duration,
}

/// How `backend.file` writes the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// The published list (see [`crate::published`]).
    #[default]
    Json,
    /// One prefix per line.
    Plain,
    /// `allow PREFIX;` lines, for an nginx `include`.
    Nginx,
    /// One prefix per line, for HAProxy's `acl … src -f FILE`.
    Haproxy,
}

impl FileFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Json => "json",
            FileFormat::Plain => "plain",
            FileFormat::Nginx => "nginx",
            FileFormat::Haproxy => "haproxy",
        }
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default, deserialize_with = "interval")]
    pub(super) interval: Option<Duration>,
    #[serde(default)]
    pub(super) jitter: Option<Spanned<Jitter>>,
    #[serde(default)]
    pub(super) state_file: Option<Spanned<PathBuf>>,
    pub(super) sources: Spanned<Vec<RawSource>>,
    #[serde(default)]
    pub(super) backend: Option<Spanned<RawBackend>>,
    #[serde(default)]
    pub(super) safety: Safety,
    #[serde(default)]
    pub(super) log: LogConfig,
    #[serde(default)]
    pub(super) metrics: Option<RawMetrics>,
}

/// `metrics:` as written; [`super::build`] checks `listen` against `allow_remote`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    #[serde(default, deserialize_with = "listen")]
    pub(super) listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    pub(super) textfile: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) allow_remote: bool,
}

/// `metrics:`: off unless `listen` or `textfile` is given (see [`crate::metrics`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` and `GET /healthz` are served.
    pub listen: Option<SocketAddr>,
    /// node_exporter's textfile collector: written after every cycle.
    pub textfile: Option<PathBuf>,
    /// Lets `listen` be a non-loopback address.
    pub allow_remote: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) tencent_chat: Option<Spanned<RawChat>>,
    #[serde(default, rename = "static", deserialize_with = "static_entries")]
    pub(super) static_entries: Option<Vec<Spanned<IpNet>>>,
    #[serde(default)]
    pub(super) url: Option<Spanned<RawUrl>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChat {
    #[serde(default)]
    pub(super) region: Option<Region>,
    #[serde(default, deserialize_with = "endpoint")]
    pub(super) endpoint: Option<String>,
    pub(super) sdkappid: u64,
    pub(super) identifier: String,
    #[serde(default)]
    pub(super) secret_key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub(super) secret_key_env: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) secret_key: Option<String>,
    #[serde(default = "default_nettypes", deserialize_with = "nettypes")]
    pub(super) nettypes: Vec<u8>,
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    pub(super) timeout: Duration,
    #[serde(default = "default_usersig_ttl", deserialize_with = "usersig_ttl")]
    pub(super) usersig_ttl: Duration,
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
}

/// A `url` source: a list published in the `json` format ([`crate::published`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUrl {
    #[serde(deserialize_with = "list_url")]
    pub(super) url: String,
    #[serde(default)]
    pub(super) ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout", deserialize_with = "timeout")]
    pub(super) timeout: Duration,
    #[serde(default = "default_max_bytes", deserialize_with = "max_bytes")]
    pub(super) max_bytes: usize,
    #[serde(default = "default_max_age", deserialize_with = "max_age")]
    pub(super) max_age: Duration,
}

/// `backend:` holds exactly one of its keys.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    #[serde(default)]
    pub(super) nftables: Option<NftablesConfig>,
    #[serde(default)]
    pub(super) ipset: Option<IpsetConfig>,
    #[serde(default)]
    pub(super) dry_run: Option<DryRunConfig>,
    #[serde(default)]
    pub(super) file: Option<FileConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DryRunConfig {}

pub(super) fn default_table() -> String {
    "allowsync".into()
}
pub(super) fn default_set_v4() -> String {
    "allow_v4".into()
}
pub(super) fn default_set_v6() -> String {
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
fn default_check_interval() -> Duration {
    secs(10)
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
/// 4 MiB: some 100 000 prefixes, far more than a Chat list.
fn default_max_bytes() -> usize {
    4 * 1024 * 1024
}
/// Four times the publisher's default `refresh` (15m).
fn default_max_age() -> Duration {
    secs(3600)
}
fn default_usersig_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_on_change_timeout() -> Duration {
    secs(30)
}
fn default_refresh() -> Duration {
    secs(15 * 60)
}

// Value checks, run while deserializing so that errors carry the value's line.

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d` and sums like `1h30m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// A duration as `parse_duration` reads it: `30s`, `5m`, `1h`, `250ms`.
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

pub(super) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration_in(d, secs(10), secs(7 * 86_400), "interval").map(Some)
}
/// `jitter`, spanned so that its bound by `interval` (known only later) can name its line.
#[derive(Debug)]
pub(super) struct Jitter(pub(super) Duration);
impl<'de> Deserialize<'de> for Jitter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration_in(d, secs(0), secs(86_400), "jitter").map(Jitter)
    }
}
/// The largest `timeout` a source may have (the systemd unit's `WatchdogSec` is longer).
pub const MAX_TIMEOUT: Duration = secs(120);

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, secs(1), MAX_TIMEOUT, "timeout")
}
fn check_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, Duration::from_millis(100), secs(3600), "check_interval")
}
fn usersig_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    // The official libraries default to 180 days; below an hour we would re-mint constantly.
    duration_in(d, secs(3600), secs(180 * 86_400), "usersig_ttl")
}

fn on_change_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, secs(1), MAX_TIMEOUT, "on_change_timeout")
}
fn refresh<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, secs(10), secs(86_400), "refresh")
}

/// A file to write: a path with a file name (a directory is not one).
fn file_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.ends_with('/') || Path::new(&s).file_name().is_none() {
        return Err(serde::de::Error::custom(format!("`{s}` is not a file path: give the file to write")));
    }
    Ok(PathBuf::from(s))
}

/// A command as argv: an absolute program path (a service's PATH is not a shell's), then its
/// arguments. No shell ever sees it.
fn argv<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    match v.first() {
        None => Err(serde::de::Error::custom(
            "on_change is empty: give the program and its arguments, like [\"/usr/sbin/nginx\", \"-s\", \"reload\"]",
        )),
        Some(p) if !Path::new(p).is_absolute() => Err(serde::de::Error::custom(format!(
            "on_change program `{p}` is not an absolute path: write it in full, like /usr/sbin/nginx (no shell runs it)"
        ))),
        Some(_) => Ok(Some(v)),
    }
}

/// Above 0; whether it exceeds the publisher's `refresh` cannot be known here (README).
fn max_age<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_in(d, secs(1), secs(30 * 86_400), "max_age")
}
/// The largest `max_bytes`: what one fetch may hold in memory.
const MAX_MAX_BYTES: usize = 256 * 1024 * 1024;
fn max_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = u64::deserialize(d)?;
    if !(1024..=MAX_MAX_BYTES as u64).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "max_bytes {v} is out of range: it must be between 1024 and {MAX_MAX_BYTES} (bytes)"
        )));
    }
    Ok(v as usize)
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
pub(crate) fn check_endpoint(s: &str) -> Result<(), String> {
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

fn list_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_list_url(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

/// A `url` source's URL: `https://`, or `http://` to a loopback address, as for the Chat
/// endpoint (a list read in clear text could be rewritten on the way). A path and a query are
/// fine; credentials are not (the URL is logged).
pub(crate) fn check_list_url(s: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("`{s}` has no host"))?;
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "`{}`: no credentials in the URL (it is written to logs and the state file)",
            u.host_str().unwrap_or_default()
        ));
    }
    if u.fragment().is_some() {
        return Err(format!("`{s}`: a URL with a #fragment is not fetched as written"));
    }
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "`{s}` uses http:// to a non-loopback host: the list could be rewritten on the way; use https://"
        )),
        _ => Err(format!("`{s}`: only https:// URLs are allowed (http:// only to a loopback address)")),
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

/// `IP:port` (`127.0.0.1:9733`, `[::1]:9733`); whether it may be remote is [`super::build`]'s.
fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<SocketAddr>>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let addr: SocketAddr = s.value.trim().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`{}` is not an address and port: write IP:port, like 127.0.0.1:9733 or [::1]:9733",
            s.value
        ))
    })?;
    if addr.port() == 0 {
        return Err(serde::de::Error::custom("port 0 is not a port: use 1..=65535"));
    }
    Ok(Some(Spanned::new(addr, s.referenced, s.defined)))
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

/// allowsync's own nftables table: `allowsync` or `inet allowsync`, kept as the bare name. It
/// holds both families' sets and the enforcement chain, so it is an `inet` table.
fn own_table<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    let name = match s.split_whitespace().collect::<Vec<_>>().as_slice() {
        [name] | ["inet", name] => name.to_string(),
        [family @ ("ip" | "ip6" | "arp" | "bridge" | "netdev"), _] => {
            return Err(serde::de::Error::custom(format!(
                "allowsync's own table holds both families, so it is an inet table, not {family}: write `inet <name>` or just the name (your own `{family}` sets go in set_v4/set_v6, e.g. `ip filter chat_v4`)"
            )));
        }
        _ => s.clone(),
    };
    name_checked(name).map_err(serde::de::Error::custom)
}

/// A set: a name, or `<family> <table> <set>` as nft writes it.
fn nft_set<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    ownership::parse_nft_set(&s, "allowsync").map_err(serde::de::Error::custom)?;
    Ok(s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn name_checked(s: String) -> Result<String, String> {
    if ownership::valid_name(&s) {
        Ok(s)
    } else {
        Err(format!(
            "`{s}` is not a valid name: start with a letter, then letters, digits, _ or -, at most 31 characters"
        ))
    }
}

/// nftables and ipset object names: letters, digits, `_` and `-`, at most 31 characters (ipset's
/// limit, and well under nftables' 256).
fn object_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !ownership::valid_name(&s) {
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

/// Deserializes `text` as read from `path`; an error names the file, line, column and key.
pub(super) fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
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
