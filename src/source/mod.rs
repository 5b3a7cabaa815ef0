//! The sources of the allowlist, as the engine sees them: [`Sources`] is built once from the
//! configuration and [`Sources::fetch_all`] asks every source at once, each answering with a
//! [`Fetched`]: a list, or a typed, classified [`FetchError`].
//!
//! A source's result is all or nothing: a Chat source with several nettypes succeeds only if
//! every nettype did, so the engine never mistakes half a list for the whole one (it keeps the
//! source's last good list instead). What became of each source is the engine's
//! [`crate::engine::SourceReport`].
//!
//! This module is the orchestration; everything about the Chat REST API itself (requests,
//! answers, its error codes, the HTTP client, the region domains) is in [`chat`], a list
//! published by another allowsync is read by [`url`]. [`admit`] judges the entries of both.

mod admit;
pub mod chat;
mod http;
pub mod url;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tracing::warn;

use chat::ChatSource;
pub use chat::NettypeList;
use url::UrlSource;

use crate::admission::MinPrefix;
use crate::config::{Config, SourceConfig, SourceKind, TencentChatConfig};
use crate::prefixes::AllowSet;
use crate::state::{Published, SourceState};

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
    /// An answer that is not a usable GetIPList response (or published list).
    InvalidResponse,
    /// A published list older than the source's `max_age`: its publisher may be dead. Retried
    /// at the normal interval.
    Stale,
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
            ErrorClass::Stale => "stale",
        })
    }
}

impl ErrorClass {
    /// The class as a metric label or a `status --json` value: `rate_limited`, `network`, …
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Transient => "transient",
            ErrorClass::UsersigExpired => "usersig_expired",
            ErrorClass::Locked => "locked",
            ErrorClass::Configuration => "configuration",
            ErrorClass::Network => "network",
            ErrorClass::InvalidResponse => "invalid_response",
            ErrorClass::Stale => "stale",
        }
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
    #[error("every one of the {count} entries of the list is invalid or never allowed")]
    AllInvalid { count: usize },
    /// An entry wider than `safety.min_prefix_v4` / `_v6`: the whole answer is not used.
    /// `entry` is the entry as sent, escaped (`logging::Untrusted`).
    #[error("suspicious answer, none of it used: entry {entry}: {reason}")]
    Suspicious { entry: String, reason: String },
    /// A published list that cannot be used (not JSON, another version, a SHA-256 that does
    /// not match…); `reason` escapes whatever it quotes.
    #[error("invalid published list: {reason}")]
    Published { reason: String },
    /// A published list generated longer than `max_age` ago, on a 200 or after a 304.
    #[error(
        "the published list is stale: generated at {generated_at}, {} ago, longer than max_age {}: is its publisher alive?",
        crate::config::fmt_duration(*age),
        crate::config::fmt_duration(*max_age)
    )]
    Stale { generated_at: String, age: Duration, max_age: Duration },
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
            | FetchError::Suspicious { .. }
            | FetchError::Published { .. } => ErrorClass::InvalidResponse,
            FetchError::Stale { .. } => ErrorClass::Stale,
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
    #[error("source {0:?} is not a tencent_chat source: it has no usersig")]
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
    /// For a `url` source's list: what it was published as, to keep with it in the state.
    pub published: Option<Published>,
}

enum Source {
    Static { name: String, nets: Vec<IpNet> },
    Chat(Arc<ChatSource>),
    Url(Arc<UrlSource>),
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
            Source::Url(u) => u.name(),
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
                SourceKind::Static(_) | SourceKind::Url(_) => None,
            })
            .collect();
        let client = if chats.is_empty() { None } else { Some(chat::client(&chats)?) };
        let sources = configs
            .iter()
            .map(|s| match &s.kind {
                SourceKind::Static(nets) => Ok(Source::Static { name: s.name.clone(), nets: nets.clone() }),
                SourceKind::TencentChat(c) => Ok(Source::Chat(Arc::new(ChatSource::new(
                    s.name.clone(),
                    c,
                    min_prefix,
                    client.clone().expect("built when there is a Chat source"),
                )))),
                SourceKind::Url(u) => {
                    Ok(Source::Url(Arc::new(UrlSource::new(s.name.clone(), u, min_prefix)?)))
                }
            })
            .collect::<Result<_, SourceError>>()?;
        Ok(Sources { sources })
    }

    /// Per Chat source that has minted one, when its usersig expires (unix seconds).
    pub fn usersig_expiries(&self) -> Vec<(String, u64)> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::Chat(c) => c.usersig_expires_at().map(|t| (c.name().to_owned(), t)),
                Source::Static { .. } | Source::Url(_) => None,
            })
            .collect()
    }

    /// The requests every Chat and `url` source sent since the last call, as (source, nettype
    /// (`None` for a `url` source), `ok` or the error's class); a fetch abandoned midway gives
    /// its requests to the next call.
    pub fn take_requests(&self) -> Vec<(String, Option<u8>, &'static str)> {
        let mut out = Vec::new();
        for s in &self.sources {
            match s {
                Source::Chat(c) => {
                    out.extend(c.take_requests().into_iter().map(|(n, r)| (c.name().to_owned(), Some(n), r)))
                }
                Source::Url(u) => {
                    out.extend(u.take_requests().into_iter().map(|r| (u.name().to_owned(), None, r)))
                }
                Source::Static { .. } => {}
            }
        }
        out
    }

    /// Fetches every source concurrently; one result per source, in configuration order.
    /// Never panics: a panicking fetch becomes [`FetchError::Internal`]. Without the state's
    /// last good lists, a `url` source asks unconditionally.
    pub async fn fetch_all(&self) -> Vec<Fetched> {
        self.fetch_all_with(BTreeMap::new()).await
    }

    /// Of the state's per-source records (`State::sources`), those a fetch asks with: a `url`
    /// source's that keep what it was published as (its `ETag`). Picked before a fetch so that
    /// the other sources' lists, the bulk of the state, are not copied for it.
    pub fn kept_for_fetch(&self, all: &BTreeMap<String, SourceState>) -> BTreeMap<String, SourceState> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::Url(u) => all.get_key_value(u.name()).filter(|(_, st)| st.published.is_some()),
                Source::Static { .. } | Source::Chat(_) => None,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// As [`Sources::fetch_all`], with [`Sources::kept_for_fetch`]'s records: a `url` source asks
    /// with the `ETag` it keeps with its list, and on a 304 answers that list.
    pub async fn fetch_all_with(&self, mut known: BTreeMap<String, SourceState>) -> Vec<Fetched> {
        let handles: Vec<_> = self
            .sources
            .iter()
            .map(|s| match s {
                Source::Static { name, nets } => Err(Box::new(Fetched {
                    name: name.clone(),
                    result: Ok(AllowSet::from_nets(nets.iter().copied())),
                    entries: nets.len(),
                    skipped: 0,
                    nettypes: Vec::new(),
                    published: None,
                })),
                Source::Chat(c) => {
                    let c = Arc::clone(c);
                    Ok((c.name().to_owned(), tokio::spawn(async move { fetch_chat(&c).await })))
                }
                Source::Url(u) => {
                    let (u, last) = (Arc::clone(u), known.remove(u.name()));
                    Ok((u.name().to_owned(), tokio::spawn(async move { u.fetch(last.as_ref()).await })))
                }
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(match h {
                Err(done) => *done,
                Ok((name, handle)) => handle.await.unwrap_or_else(|e| Fetched {
                    result: Err(FetchError::Internal { message: format!("the fetch task failed: {e}") }),
                    name,
                    entries: 0,
                    skipped: 0,
                    nettypes: Vec::new(),
                    published: None,
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
        // The fetch logs its own failure; a task that did not finish is logged here.
        let result = h.await.unwrap_or_else(|e| {
            let e =
                FetchError::Internal { message: format!("the fetch task for nettype {nettype} failed: {e}") };
            c.span(nettype).in_scope(|| warn!(class = %e.class(), error = %e, "GetIPList failed"));
            Err(e)
        });
        nettypes.push(NettypeFetched { nettype, result });
    }
    let ok: Vec<&NettypeList> = nettypes.iter().filter_map(|n| n.result.as_ref().ok()).collect();
    let entries = ok.iter().map(|l| l.entries).sum();
    let skipped = ok.iter().map(|l| l.skipped).sum();
    let result = match nettypes.iter().find_map(|n| n.result.as_ref().err()) {
        Some(e) => Err(e.clone()),
        None => Ok(AllowSet::union(ok.iter().map(|l| &l.list))),
    };
    Fetched { name: c.name().to_owned(), result, entries, skipped, nettypes, published: None }
}
