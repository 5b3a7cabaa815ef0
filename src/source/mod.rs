//! The sources of the allowlist, as the engine sees them: [`Sources`] is built once from the
//! configuration and [`Sources::fetch_all`] asks every source at once, each answering with a
//! [`Fetched`]: a list, or a typed, classified [`FetchError`].
//!
//! A source's result is all or nothing: a Chat source with several nettypes succeeds only if
//! every nettype did, so the engine never mistakes half a list for the whole one (it keeps the
//! source's last good list instead).

pub mod chat;

use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tracing::warn;

pub use chat::{ChatSource, NettypeList};

use crate::admission::MinPrefix;
use crate::config::{Config, SourceConfig, SourceKind, TencentChatConfig};
use crate::logging::Untrusted;
use crate::prefixes::AllowSet;
use crate::usersig::{self, Minted};

/// What a client should do about a failure, after the reference's error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Over the call rate limit: back off, jittered.
    RateLimited,
    /// A server-side timeout or internal error: retry a bounded number of times.
    Transient,
    /// The usersig was refused as expired even after re-minting: suspect clock skew.
    UsersigExpired,
    /// The admin account is locked for about a minute: wait at least 60 s.
    Locked,
    /// Wrong SDKAppID, identifier, key, endpoint…: retry only at the normal interval.
    Configuration,
    /// Connect, TLS, timeouts, HTTP 5xx, a connection cut mid-answer: retry with backoff.
    Network,
    /// An answer that is not a usable GetIPList response.
    InvalidResponse,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::RateLimited => "rate limited",
            ErrorClass::Transient => "transient",
            ErrorClass::UsersigExpired => "usersig expired",
            ErrorClass::Locked => "locked",
            ErrorClass::Configuration => "configuration",
            ErrorClass::Network => "network",
            ErrorClass::InvalidResponse => "invalid response",
        })
    }
}

/// Why a source could not be fetched. No variant holds the secret key or a usersig: URLs are
/// redacted, reqwest errors are stripped of theirs, and the server's `ErrorInfo` is scrubbed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The API answered `FAIL` with this code; `message` names the likely fix where one is known.
    #[error("Chat API error {code} ({class}): {message}")]
    Api { code: i64, class: ErrorClass, message: String },
    /// A configuration mistake found before sending anything.
    #[error("{message}")]
    Configuration { message: String },
    /// TCP connect or TLS handshake failed (or timed out).
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    /// No complete answer within the source's timeout.
    #[error("no complete answer from {url} within {after:?}")]
    Timeout { url: String, after: Duration },
    /// The connection failed after it was made (reset, closed mid-body).
    #[error("request to {url} failed: {message}")]
    Network { url: String, message: String },
    /// An HTTP status other than 200.
    #[error("HTTP {status} from {url}")]
    Http { status: u16, url: String },
    #[error("the response body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("invalid GetIPList response: {reason}")]
    InvalidResponse { reason: String },
    #[error("every one of the {count} entries of IPList is invalid or never allowed")]
    AllInvalid { count: usize },
    /// An entry wider than `safety.min_prefix_v4` / `_v6`: the whole answer is not used.
    /// `entry` is the entry as sent, escaped ([`crate::logging::Untrusted`]).
    #[error("suspicious answer, none of it used: entry {entry}: {reason}")]
    Suspicious { entry: String, reason: String },
    /// A bug: a fetch task panicked. Reported, never propagated as a panic.
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl FetchError {
    /// What to do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            FetchError::Api { class, .. } => *class,
            FetchError::Configuration { .. } => ErrorClass::Configuration,
            FetchError::Connect { .. } | FetchError::Timeout { .. } | FetchError::Network { .. } => {
                ErrorClass::Network
            }
            FetchError::Http { status, .. } => match status {
                429 => ErrorClass::RateLimited,
                500..=599 => ErrorClass::Network,
                // Redirects (not followed: they would carry the usersig elsewhere), 404 and the
                // like: the endpoint or a proxy is misconfigured.
                _ => ErrorClass::Configuration,
            },
            FetchError::BodyTooLarge { .. }
            | FetchError::InvalidResponse { .. }
            | FetchError::AllInvalid { .. }
            | FetchError::Suspicious { .. } => ErrorClass::InvalidResponse,
            FetchError::Internal { .. } => ErrorClass::Transient,
        }
    }

    /// The API error code, where the server gave one.
    pub fn code(&self) -> Option<i64> {
        match self {
            FetchError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The error for an API error code, with the fix named where the reference knows it.
    /// The error for an answer with this `ErrorCode` and `ErrorInfo` (the server's text,
    /// quoted and escaped here).
    pub fn api(code: i64, info: &str, sdkappid: u64, identifier: &str) -> FetchError {
        let class = classify_code(code);
        let hint = match code {
            60010 | 70403 => Some(format!(
                "the identifier {identifier} is not an app administrator of SDKAppID {sdkappid}"
            )),
            60021 => Some("this host's address is not allowed to call the REST API".to_owned()),
            70009 => Some("usersig minted with the wrong secret key".to_owned()),
            60006 => Some(format!("invalid SDKAppID {sdkappid}")),
            60016 => Some(format!("SDKAppID {sdkappid} is disabled")),
            60020 => Some(format!("the package of SDKAppID {sdkappid} has expired or is not active yet")),
            70013 => Some(format!("the usersig's identifier does not match {identifier}")),
            70014 => Some(format!("the usersig's SDKAppID does not match {sdkappid}")),
            60004 => Some(format!("wrong identifier ({identifier}) or usersig")),
            70001 | 70052 => Some("usersig expired: if this persists, check this host's clock".to_owned()),
            70050 => Some("the admin account is locked after failed logins; wait at least 60 s".to_owned()),
            _ => None,
        };
        let message = match (hint, info.is_empty()) {
            (Some(h), true) => h,
            (Some(h), false) => format!("{h} (server: {})", Untrusted(info)),
            (None, true) => "no ErrorInfo".to_owned(),
            (None, false) => format!("server: {}", Untrusted(info)),
        };
        FetchError::Api { code, class, message }
    }

    /// Replaces any occurrence of `secret` in the error's text.
    pub(crate) fn scrub(self, secret: &str) -> FetchError {
        if secret.is_empty() {
            return self;
        }
        let s = |t: String| t.replace(secret, "REDACTED");
        match self {
            FetchError::Api { code, class, message } => FetchError::Api { code, class, message: s(message) },
            FetchError::InvalidResponse { reason } => FetchError::InvalidResponse { reason: s(reason) },
            FetchError::Suspicious { entry, reason } => FetchError::Suspicious { entry: s(entry), reason },
            other => other,
        }
    }

    /// A reqwest error, without its URL (which holds the usersig): `shown` is the redacted URL.
    fn from_reqwest(e: reqwest::Error, shown: &str, timeout: Duration) -> FetchError {
        let url = shown.to_owned();
        let connect = e.is_connect();
        let timed_out = e.is_timeout();
        let e = e.without_url();
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let _ = write!(message, ": {s}");
            src = s.source();
        }
        let message = redact_query_param(&message, "usersig");
        if connect {
            FetchError::Connect { url, message }
        } else if timed_out {
            FetchError::Timeout { url, after: timeout }
        } else {
            FetchError::Network { url, message }
        }
    }
}

/// The class of an API error code, after the reference's table. Unknown codes are treated as
/// transient: retried with backoff, never hammered.
pub fn classify_code(code: i64) -> ErrorClass {
    match code {
        60007 | 60011 | 60018 | 60019 => ErrorClass::RateLimited,
        60008 | 60013 | 60014 | 70169 | 70500 => ErrorClass::Transient,
        70001 | 70052 => ErrorClass::UsersigExpired,
        70050 => ErrorClass::Locked,
        60002 | 60003 | 60004 | 60005 | 60006 | 60009 | 60010 | 60012 | 60015 | 60016 | 60017 | 60020
        | 60021 | 70002 | 70003 | 70005 | 70009 | 70013 | 70014 | 70016 | 70020 | 70051 | 70114 | 70403 => {
            ErrorClass::Configuration
        }
        _ => ErrorClass::Transient,
    }
}

/// `usersig=<anything>` in free text becomes `usersig=REDACTED`, up to the next `&`, space or
/// quote: the last line of defence for messages built by libraries.
pub fn redact_query_param(text: &str, param: &str) -> String {
    let needle = format!("{param}=");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&needle) {
        out.push_str(&rest[..i + needle.len()]);
        out.push_str("REDACTED");
        rest = &rest[i + needle.len()..];
        let end = rest.find(|c: char| c == '&' || c.is_whitespace() || c == '"' || c == '\'' || c == ')');
        rest = &rest[end.unwrap_or(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// Why the sources could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read ca_file {}: {cause}", path.display())]
    CaFileRead { path: PathBuf, cause: std::io::Error },
    #[error("ca_file {} holds no usable PEM certificate: {message}", path.display())]
    CaFile { path: PathBuf, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("no source named {0:?} in the configuration")]
    UnknownSource(String),
    #[error("source {0:?} is a static source: it has no usersig")]
    NotChat(String),
}

/// One nettype's part of a Chat source's result.
#[derive(Debug, Clone)]
pub struct NettypeFetched {
    pub nettype: u8,
    pub result: Result<NettypeList, FetchError>,
}

/// One source's result.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub name: String,
    /// The source's whole list, or the first failure among its nettypes.
    pub result: Result<AllowSet, FetchError>,
    /// Valid entries seen (over every nettype that answered).
    pub entries: usize,
    /// Invalid entries skipped.
    pub skipped: usize,
    /// Per nettype, for a Chat source (empty for a static one).
    pub nettypes: Vec<NettypeFetched>,
}

enum Source {
    Static { name: String, nets: Vec<IpNet> },
    Chat(Arc<ChatSource>),
}

/// Every configured source, ready to fetch.
pub struct Sources {
    sources: Vec<Source>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.sources.iter().map(|s| s.name())).finish()
    }
}

impl Source {
    fn name(&self) -> &str {
        match self {
            Source::Static { name, .. } => name,
            Source::Chat(c) => c.name(),
        }
    }
}

impl Sources {
    /// Builds every source of the configuration, with one HTTP client for all Chat sources
    /// (every `ca_file` is read here).
    pub fn new(cfg: &Config) -> Result<Sources, SourceError> {
        Sources::from_configs(&cfg.sources, cfg.safety.min_prefix())
    }

    /// As [`Sources::new`], from source definitions alone (tests, tools). Chat answers are
    /// judged with `min_prefix` (static entries were judged with the configuration).
    pub fn from_configs(configs: &[SourceConfig], min_prefix: MinPrefix) -> Result<Sources, SourceError> {
        let chats: Vec<&TencentChatConfig> = configs
            .iter()
            .filter_map(|s| match &s.kind {
                SourceKind::TencentChat(c) => Some(&**c),
                SourceKind::Static(_) => None,
            })
            .collect();
        let client = if chats.is_empty() { None } else { Some(build_client(&chats)?) };
        let sources = configs
            .iter()
            .map(|s| match &s.kind {
                SourceKind::Static(nets) => Source::Static { name: s.name.clone(), nets: nets.clone() },
                SourceKind::TencentChat(c) => Source::Chat(Arc::new(ChatSource::new(
                    s.name.clone(),
                    c,
                    min_prefix,
                    client.clone().expect("built when there is a Chat source"),
                ))),
            })
            .collect();
        Ok(Sources { sources })
    }

    /// Fetches every source concurrently; one result per source, in configuration order.
    /// Never panics: a panicking fetch becomes [`FetchError::Internal`].
    pub async fn fetch_all(&self) -> Vec<Fetched> {
        let handles: Vec<_> = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Static { name, nets } => Err(Fetched {
                    name: name.clone(),
                    result: Ok(AllowSet::from_nets(nets.iter().copied())),
                    entries: nets.len(),
                    skipped: 0,
                    nettypes: Vec::new(),
                }),
                Source::Chat(c) => {
                    let c = Arc::clone(c);
                    Ok((c.name().to_owned(), tokio::spawn(async move { fetch_chat(&c).await })))
                }
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(match h {
                Err(done) => done,
                Ok((name, handle)) => handle.await.unwrap_or_else(|e| Fetched {
                    result: Err(FetchError::Internal { message: format!("the fetch task failed: {e}") }),
                    name,
                    entries: 0,
                    skipped: 0,
                    nettypes: Vec::new(),
                }),
            });
        }
        out
    }
}

/// Every nettype of one Chat source, concurrently; the union if all succeeded.
async fn fetch_chat(c: &Arc<ChatSource>) -> Fetched {
    let handles: Vec<_> = c
        .nettypes()
        .iter()
        .map(|&n| {
            let c = Arc::clone(c);
            (n, tokio::spawn(async move { c.fetch_nettype(n).await }))
        })
        .collect();
    let mut nettypes = Vec::with_capacity(handles.len());
    for (nettype, h) in handles {
        let result = h.await.unwrap_or_else(|e| {
            Err(FetchError::Internal { message: format!("the fetch task for nettype {nettype} failed: {e}") })
        });
        if let Err(e) = &result {
            warn!(source = %c.name(), nettype, class = %e.class(), error = %e, "GetIPList failed");
        }
        nettypes.push(NettypeFetched { nettype, result });
    }
    let ok: Vec<&NettypeList> = nettypes.iter().filter_map(|n| n.result.as_ref().ok()).collect();
    let entries = ok.iter().map(|l| l.entries).sum();
    let skipped = ok.iter().map(|l| l.skipped).sum();
    let result = match nettypes.iter().find_map(|n| n.result.as_ref().err()) {
        Some(e) => Err(e.clone()),
        None => Ok(AllowSet::union(ok.iter().map(|l| &l.list))),
    };
    Fetched { name: c.name().to_owned(), result, entries, skipped, nettypes }
}

fn build_client(chats: &[&TencentChatConfig]) -> Result<reqwest::Client, SourceError> {
    let shortest = chats.iter().map(|c| c.timeout).min().unwrap_or(Duration::from_secs(10));
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("allowsync/", env!("CARGO_PKG_VERSION")))
        // Half the shortest whole-request timeout, so that an unreachable primary domain leaves
        // time to try the backup before the caller gives up.
        .connect_timeout((shortest / 2).max(Duration::from_millis(500)))
        // A redirect would carry the usersig in its query string to another address.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90));
    // One client serves every source, so it trusts the union of their extra CAs (on top of the
    // system store).
    let mut seen = std::collections::BTreeSet::new();
    for path in chats.iter().filter_map(|c| c.ca_file.as_ref()) {
        if !seen.insert(path.clone()) {
            continue;
        }
        let pem =
            std::fs::read(path).map_err(|cause| SourceError::CaFileRead { path: path.clone(), cause })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SourceError::CaFile { path: path.clone(), message: e.to_string() })?;
        if certs.is_empty() {
            return Err(SourceError::CaFile { path: path.clone(), message: "no certificate found".into() });
        }
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(|e| SourceError::Client(e.to_string()))
}

/// A fresh usersig for the Chat source `name` of the configuration, signed at `now_unix`.
pub fn mint_usersig(cfg: &Config, name: &str, now_unix: u64) -> Result<Minted, SourceError> {
    match cfg.sources.iter().find(|s| s.name == name).map(|s| &s.kind) {
        Some(SourceKind::TencentChat(c)) => {
            let expire = c.usersig_ttl.as_secs().max(1);
            Ok(Minted {
                usersig: usersig::mint(c.sdkappid, &c.identifier, c.secret_key.expose(), expire, now_unix),
                time: now_unix,
                expire,
            })
        }
        Some(SourceKind::Static(_)) => Err(SourceError::NotChat(name.to_owned())),
        None => Err(SourceError::UnknownSource(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_after_the_reference() {
        use ErrorClass::*;
        for (code, class) in [
            (60007, RateLimited),
            (60019, RateLimited),
            (60008, Transient),
            (70500, Transient),
            (70001, UsersigExpired),
            (70052, UsersigExpired),
            (70050, Locked),
            (60004, Configuration),
            (70403, Configuration),
            (60021, Configuration),
            (99999, Transient),
        ] {
            assert_eq!(classify_code(code), class, "{code}");
        }
    }

    #[test]
    fn configuration_errors_name_the_fix() {
        let e = FetchError::api(60010, "", 1400000000, "administrator");
        assert_eq!(e.class(), ErrorClass::Configuration);
        assert!(
            e.to_string()
                .contains("the identifier administrator is not an app administrator of SDKAppID 1400000000")
        );
        let e = FetchError::api(70009, "sig error", 1, "a");
        assert!(e.to_string().contains(r#"usersig minted with the wrong secret key (server: "sig error")"#));
        assert!(FetchError::api(60021, "", 1, "a").to_string().contains("not allowed"));
        assert_eq!(FetchError::api(12345, "", 1, "a").code(), Some(12345));
    }

    #[test]
    fn the_servers_text_is_escaped_and_capped() {
        let forged = format!(
            "oops\n2026-01-01T00:00:00Z  INFO sync outcome=\"applied\"\r\u{1b}[2J{}",
            "x".repeat(500)
        );
        for code in [70009, 12345] {
            let shown = FetchError::api(code, &forged, 1, "a").to_string();
            assert!(!shown.chars().any(char::is_control), "{shown}");
            assert!(
                shown.contains(r#""oops\n2026-01-01T00:00:00Z  INFO sync outcome=\"applied\"\r\u{1b}[2J"#),
                "{shown}"
            );
            assert!(shown.len() < 400, "not capped: {} characters", shown.len());
        }
    }

    #[test]
    fn query_params_are_redacted_in_free_text() {
        assert_eq!(
            redact_query_param("url (http://h/p?a=1&usersig=eJy*x-_&random=2) failed", "usersig"),
            "url (http://h/p?a=1&usersig=REDACTED&random=2) failed"
        );
        assert_eq!(redact_query_param("usersig=abc", "usersig"), "usersig=REDACTED");
        assert_eq!(redact_query_param("nothing here", "usersig"), "nothing here");
    }

    #[test]
    fn urls_are_encoded_and_redacted() {
        let url = chat::build_url("http://127.0.0.1:1/", 1400000000, "ad min&x", "eJy*a-b_", 5).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["identifier"], "ad min&x");
        assert_eq!(q["usersig"], "eJy*a-b_");
        assert_eq!(q["nettype"], "5");
        assert_eq!(q["contenttype"], "json");
        q["random"].parse::<u32>().unwrap();
        assert_eq!(url.path(), "/v4/ConfigSvc/GetIPList");
        let shown = chat::redact_url(&url);
        assert!(shown.contains("usersig=REDACTED"), "{shown}");
        assert!(!shown.contains("eJy"), "{shown}");
    }
}
