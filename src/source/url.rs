//! The `url` source: a list another allowsync published (`backend.file`, format `json`, see
//! [`crate::published`]), read over HTTPS by a host that holds no Chat key.
//!
//! - One GET per fetch, with `If-None-Match` when the state keeps an `ETag` with this source's
//!   last good list (from this URL): an unchanged list costs one 304, and the 304 answers that
//!   list. The `ETag` is kept with the list only once the list was applied (the engine records
//!   it), so a list the guards refused is asked for again in full.
//! - The body is read up to `max_bytes` while it streams. The document must be version 1 with
//!   a matching SHA-256; its entries are judged as the Chat source's are ([`super::admit`]).
//! - A list whose `generated_at` is older than `max_age` is a failed source
//!   ([`FetchError::Stale`]), after a 304 too: a dead publisher must not freeze a fleet
//!   silently. One dated more than [`CLOCK_SKEW`] ahead is refused: it would stay "fresh"
//!   for as long as that.
//!
//! Everything from the server (the `ETag`, the document's text) is shown only through
//! `Untrusted`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, ETAG, HeaderValue, IF_NONE_MATCH};
use tracing::{Instrument, debug, info, warn};

use super::admit::{Admit, Family, Item};
use super::{FetchError, Fetched, SourceError};
use crate::admission::MinPrefix;
use crate::clock;
use crate::config::UrlConfig;
use crate::logging::Untrusted;
use crate::published;
use crate::state::{Published, SourceState};

/// How far ahead of this host's clock a `generated_at` may be (clock skew between publisher
/// and consumer).
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The longest `ETag` kept: a server must not grow the state file at will.
const MAX_ETAG: usize = 1024;

/// One `url` source.
#[derive(Debug)]
pub(crate) struct UrlSource {
    name: String,
    cfg: UrlConfig,
    min_prefix: MinPrefix,
    /// Its own client: its `ca_file` is trusted for this source only.
    client: reqwest::Client,
    /// How each request ended, until [`UrlSource::take_requests`] (the metrics).
    sent: std::sync::Mutex<Vec<&'static str>>,
}

impl UrlSource {
    /// Reads the source's `ca_file`, if any.
    pub(crate) fn new(name: String, cfg: &UrlConfig, min_prefix: MinPrefix) -> Result<Self, SourceError> {
        let client = super::http::client(cfg.timeout, cfg.ca_file.as_ref())?;
        Ok(UrlSource { name, cfg: cfg.clone(), min_prefix, client, sent: Default::default() })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The requests sent since the last call: `ok` or the error's class ([`ErrorClass::label`],
    /// `stale` for a list past `max_age`, a 304 included).
    ///
    /// [`ErrorClass::label`]: super::ErrorClass::label
    pub(crate) fn take_requests(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Fetches the list, conditionally when `last` (this source's state) keeps an `ETag` for
    /// this URL. A failure is logged here.
    pub(crate) async fn fetch(&self, last: Option<&SourceState>) -> Fetched {
        let span = tracing::error_span!("fetch", source = %self.name);
        async {
            let result = self.get(last).await;
            let label = result.as_ref().map_or_else(|e| e.class().label(), |_| "ok");
            self.sent.lock().unwrap_or_else(|p| p.into_inner()).push(label);
            if let Err(e) = &result {
                warn!(class = %e.class(), error = %e, url = %self.cfg.url, "fetching the published list failed");
            }
            let (result, entries, skipped, published) = match result {
                Ok((l, p)) => (Ok(l.list), l.entries, l.skipped, Some(p)),
                Err(e) => (Err(e), 0, 0, None),
            };
            Fetched { name: self.name.clone(), result, entries, skipped, nettypes: Vec::new(), published }
        }
        .instrument(span)
        .await
    }

    async fn get(&self, last: Option<&SourceState>) -> Result<(super::NettypeList, Published), FetchError> {
        let url = &self.cfg.url;
        // Only an ETag from this URL, kept with a list to answer a 304 with.
        // (A state file edited by hand may hold one that cannot be sent: then ask in full.)
        let known = last.and_then(|s| {
            let p = s.published.as_ref().filter(|p| p.url == *url)?;
            let etag = p.etag.as_deref()?;
            Some((HeaderValue::from_str(etag).ok()?, etag, p.generated_at, s))
        });
        let mut req = self.client.get(url).header(ACCEPT, "application/json").timeout(self.cfg.timeout);
        if let Some((value, ..)) = &known {
            req = req.header(IF_NONE_MATCH, value.clone());
        }
        let net_err = |e: reqwest::Error| FetchError::from_reqwest(e, url, self.cfg.timeout);
        let resp = req.send().await.map_err(net_err)?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => {
                let Some((_, etag, generated_at, last)) = known else {
                    return Err(FetchError::Published {
                        reason: "HTTP 304 to a request that was not conditional".into(),
                    });
                };
                self.check_age(generated_at)?;
                debug!(etag = %Untrusted(etag), "not modified: keeping the list");
                let published = Published { url: url.clone(), etag: Some(etag.to_owned()), generated_at };
                let list =
                    super::NettypeList { entries: last.list.len(), skipped: 0, list: last.list.clone() };
                Ok((list, published))
            }
            StatusCode::OK => {
                let etag = self.etag(&resp);
                let body = super::http::read_capped(resp, self.cfg.max_bytes, net_err).await?;
                let doc = published::parse_document(&body)
                    .map_err(|e| FetchError::Published { reason: e.to_string() })?;
                let generated_at = published::unix_seconds(doc.generated_at);
                self.check_age(generated_at)?;
                let mut admit = Admit::new(&self.min_prefix);
                for (family, entries) in [(Family::V4, &doc.ipv4), (Family::V6, &doc.ipv6)] {
                    for e in entries {
                        admit.push(Item::Text(e), Some(family))?;
                    }
                }
                let list = admit.finish()?;
                info!(
                    generated_at = %clock::rfc3339(generated_at),
                    ranges = list.list.len(),
                    "published list fetched"
                );
                Ok((list, Published { url: url.clone(), etag, generated_at }))
            }
            status => Err(FetchError::Http { status: status.as_u16(), url: url.clone() }),
        }
    }

    /// The answer's `ETag`, if it can be sent back as it is.
    fn etag(&self, resp: &reqwest::Response) -> Option<String> {
        let v = resp.headers().get(ETAG)?;
        match v.to_str() {
            Ok(s) if !s.is_empty() && s.len() <= MAX_ETAG => Some(s.to_owned()),
            _ => {
                let shown = String::from_utf8_lossy(v.as_bytes()).into_owned();
                warn!(etag = %Untrusted(&shown), "ignoring an ETag that cannot be sent back: every fetch will be in full");
                None
            }
        }
    }

    /// A list generated at `generated_at` (unix seconds) is recent enough to use.
    fn check_age(&self, generated_at: u64) -> Result<(), FetchError> {
        let now = clock::now_unix();
        if generated_at > now + CLOCK_SKEW.as_secs() {
            return Err(FetchError::Published {
                reason: format!(
                    "generated_at {} is {}s ahead of this host's clock: check the clocks of the publisher and of this host",
                    clock::rfc3339(generated_at),
                    generated_at - now
                ),
            });
        }
        let age = Duration::from_secs(now.saturating_sub(generated_at));
        if age > self.cfg.max_age {
            // In whole minutes past the first, to read as `2h`, not `7201s`.
            let shown = if age.as_secs() >= 60 { Duration::from_secs(age.as_secs() / 60 * 60) } else { age };
            return Err(FetchError::Stale {
                generated_at: clock::rfc3339(generated_at),
                age: shown,
                max_age: self.cfg.max_age,
            });
        }
        Ok(())
    }
}
