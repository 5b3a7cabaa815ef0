//! The Tencent Cloud Chat `GetIPList` client: one request per nettype, with the source's own
//! usersig, over the shared connection pool.
//!
//! Within one fetch there are exactly two retries, both for failures that a second attempt
//! fixes at once: a usersig the server calls expired (70001 / 70052) is re-minted and the
//! request sent once more, and a connect or TLS failure to the primary domain is retried once
//! on the backup domain. Everything else (backoff, the next cycle) is the scheduler's.
//!
//! Secrets: the usersig travels in the query string, so every URL that may reach a log or an
//! error goes through `redact_url`, and reqwest errors are stripped of their URL.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use tracing::{Instrument, debug, warn};

use super::admit::{Admit, Item};
use super::{ErrorClass, FetchError, SourceError};
use crate::admission::MinPrefix;
use crate::clock;
use crate::config::{Config, Region, SourceKind, TencentChatConfig};
use crate::logging::Untrusted;
use crate::prefixes::AllowSet;
use crate::usersig::{self, Minted, UsersigCache};

/// The path of the API, appended to an endpoint's base URL.
pub(crate) const GET_IP_LIST: &str = "/v4/ConfigSvc/GetIPList";
/// Largest response body read; a longer one is an error and nothing of it is used.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

impl Region {
    /// The REST API domains of the region's data centre, primary first, as documented. Tokyo
    /// and Mumbai have no documented backup.
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

/// What one nettype's request gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NettypeList {
    pub list: AllowSet,
    /// Valid entries in the response.
    pub entries: usize,
    /// Entries skipped: invalid, or in a range that is never allowed.
    pub skipped: usize,
}

/// One `tencent_chat` source.
#[derive(Debug)]
pub(crate) struct ChatSource {
    name: String,
    endpoints: Vec<String>,
    sdkappid: u64,
    identifier: String,
    nettypes: Vec<u8>,
    timeout: Duration,
    /// `safety.min_prefix_v4` / `_v6`: a shorter entry makes an answer suspicious.
    min_prefix: MinPrefix,
    client: reqwest::Client,
    sigs: Arc<UsersigCache>,
    /// Every request sent and how it ended, until [`ChatSource::take_requests`] (the metrics).
    sent: std::sync::Mutex<Vec<(u8, &'static str)>>,
}

impl ChatSource {
    /// A source that sends its requests through `client` (shared by all sources) and judges
    /// the entries of its answers with `min_prefix`.
    pub fn new(
        name: impl Into<String>,
        cfg: &TencentChatConfig,
        min_prefix: MinPrefix,
        client: reqwest::Client,
    ) -> Self {
        ChatSource {
            name: name.into(),
            endpoints: cfg.endpoints.clone(),
            sdkappid: cfg.sdkappid,
            identifier: cfg.identifier.clone(),
            nettypes: cfg.nettypes.clone(),
            timeout: cfg.timeout,
            min_prefix,
            client,
            sigs: Arc::new(UsersigCache::new(
                cfg.sdkappid,
                cfg.identifier.clone(),
                cfg.secret_key.clone(),
                cfg.usersig_ttl,
            )),
            sent: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn nettypes(&self) -> &[u8] {
        &self.nettypes
    }

    /// The requests sent since the last call: per request its nettype and `ok` or the error's
    /// class ([`ErrorClass::label`]); a retry on the backup endpoint or with a new usersig is a
    /// request of its own.
    pub fn take_requests(&self) -> Vec<(u8, &'static str)> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// When the usersig this source sends expires (`None` before its first request).
    pub fn usersig_expires_at(&self) -> Option<u64> {
        self.sigs.expires_at()
    }

    /// The span every log line of one nettype's fetch is in: `fetch{source=… nettype=…}`. At
    /// error level, so that it is there whatever level the log is filtered at.
    pub(crate) fn span(&self, nettype: u8) -> tracing::Span {
        tracing::error_span!("fetch", source = %self.name, nettype)
    }

    /// Fetches one nettype: the list, or why not (logged). A usersig rejected as expired is
    /// re-minted and the request retried once; a primary domain that cannot be reached is
    /// replaced by the next endpoint once.
    pub(crate) async fn fetch_nettype(&self, nettype: u8) -> Result<NettypeList, FetchError> {
        async {
            let result = self.fetch_with_retries(nettype).await;
            if let Err(e) = &result {
                warn!(class = %e.class(), error = %e, "GetIPList failed");
            }
            result
        }
        .instrument(self.span(nettype))
        .await
    }

    async fn fetch_with_retries(&self, nettype: u8) -> Result<NettypeList, FetchError> {
        let mut sig = self.sigs.get(clock::now_unix());
        let mut reminted = false;
        loop {
            match self.request(nettype, &sig).await {
                Err(e) if e.class() == ErrorClass::UsersigExpired && !reminted => {
                    warn!(
                        code = e.code().unwrap_or_default(),
                        "the server rejected the usersig as expired; minting a new one and retrying once"
                    );
                    sig = self.sigs.refresh(&sig.usersig, clock::now_unix());
                    reminted = true;
                }
                Err(e) if e.class() == ErrorClass::UsersigExpired => {
                    // Still expired with a usersig signed seconds ago: the clocks disagree.
                    warn!(
                        "a freshly minted usersig was rejected as expired too: check this host's clock (NTP)"
                    );
                    return Err(e);
                }
                other => return other,
            }
        }
    }

    /// One request, on the primary endpoint and, after a connect or TLS failure, the next.
    async fn request(&self, nettype: u8, sig: &Minted) -> Result<NettypeList, FetchError> {
        let mut last = None;
        // Only one fallback: the configuration holds [primary, backup] or a single endpoint.
        for (i, endpoint) in self.endpoints.iter().take(2).enumerate() {
            if i > 0 {
                warn!(endpoint = %endpoint, "trying the backup endpoint");
            }
            let result = self.attempt(endpoint, nettype, sig).await;
            let label = result.as_ref().map_or_else(|e| e.class().label(), |_| "ok");
            self.sent.lock().unwrap_or_else(|p| p.into_inner()).push((nettype, label));
            match result {
                Err(e @ FetchError::Connect { .. }) => {
                    warn!(endpoint = %endpoint, error = %e, "cannot reach the endpoint");
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| FetchError::Configuration {
            message: format!("source {} has no endpoint configured", self.name),
        }))
    }

    async fn attempt(&self, endpoint: &str, nettype: u8, sig: &Minted) -> Result<NettypeList, FetchError> {
        let url = build_url(endpoint, self.sdkappid, &self.identifier, sig.usersig.expose(), nettype)?;
        let shown = redact_url(&url);
        debug!(url = %shown, "GetIPList");
        let mut body = self.post(url, &shown).await?;
        // ErrorInfo is the server's text: make sure it cannot carry our usersig (nor its TLS.sig,
        // nor the key: a server, proxy or wrong endpoint may echo anything) into a log. Scrubbed
        // in the body first, because the parser cuts ErrorInfo (logging::MAX_UNTRUSTED) and a
        // cut secret would no longer match (leaking its first part); then in the error, for a
        // secret the JSON spelled with escapes.
        let secrets = self.sigs.secrets(sig);
        for secret in &secrets {
            body = scrub_bytes(body, secret.as_bytes());
        }
        let parsed = parse_response(&body, self.sdkappid, &self.identifier, &self.min_prefix);
        parsed.map_err(|e| secrets.iter().fold(e, |e, secret| e.scrub(secret)))
    }

    /// Sends the request and reads at most [`MAX_BODY`] bytes of the answer.
    async fn post(&self, url: Url, shown: &str) -> Result<Vec<u8>, FetchError> {
        let net_err = |e: reqwest::Error| FetchError::from_reqwest(e, shown, self.timeout);
        let resp = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body("{}")
            .timeout(self.timeout)
            .send()
            .await
            .map_err(net_err)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::Http { status: status.as_u16(), url: shown.to_owned() });
        }
        super::http::read_capped(resp, MAX_BODY, net_err).await
    }
}

/// `body` with every occurrence of `secret` replaced by `REDACTED`.
fn scrub_bytes(body: Vec<u8>, secret: &[u8]) -> Vec<u8> {
    if secret.is_empty() || !body.windows(secret.len()).any(|w| w == secret) {
        return body;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(secret) {
            out.extend_from_slice(b"REDACTED");
            i += secret.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

/// `{endpoint}/v4/ConfigSvc/GetIPList?sdkappid=..&identifier=..&usersig=..&random=..&contenttype=json&nettype=..`
/// with every value URL-encoded and a fresh random number.
pub(crate) fn build_url(
    endpoint: &str,
    sdkappid: u64,
    identifier: &str,
    usersig: &str,
    nettype: u8,
) -> Result<Url, FetchError> {
    let base = format!("{}{GET_IP_LIST}", endpoint.trim_end_matches('/'));
    let mut url = Url::parse(&base).map_err(|e| FetchError::Configuration {
        message: format!("endpoint {endpoint:?} is not a URL: {e}"),
    })?;
    url.query_pairs_mut()
        .append_pair("sdkappid", &sdkappid.to_string())
        .append_pair("identifier", identifier)
        .append_pair("usersig", usersig)
        .append_pair("random", &rand::random::<u32>().to_string())
        .append_pair("contenttype", "json")
        .append_pair("nettype", &nettype.to_string());
    Ok(url)
}

/// The URL as it may be shown: the usersig replaced by `REDACTED`.
pub(crate) fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    let pairs: Vec<(String, String)> =
        url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    {
        let mut q = shown.query_pairs_mut();
        q.clear();
        for (k, v) in &pairs {
            q.append_pair(k, if k == "usersig" { "REDACTED" } else { v });
        }
    }
    shown.to_string()
}

/// Parses a GetIPList answer. `sdkappid` and `identifier` only word error messages; the log
/// lines name the source and nettype through the caller's span (`ChatSource::span`).
///
/// - `ActionStatus` must be a string and `ErrorCode` an integer; `FAIL` or a non-zero code is
///   an API error, classified by its code.
/// - On success `IPList` must be an array, whose elements are judged as every source's are
///   ([`super::admit`]): invalid or never-allowed ones skipped, one wider than `min_prefix`
///   making the whole answer suspicious, nothing valid at all an error.
/// - Every text of the answer that reaches a log or an error goes through `Untrusted`.
/// - An empty `IPList` is a success with an empty list. Whether to apply it is the engine's
///   decision, taken with its safety guards (`allow_empty`, `max_removal_percent`) that see the
///   whole desired set; refusing it here would hide it from them.
pub fn parse_response(
    body: &[u8],
    sdkappid: u64,
    identifier: &str,
    min_prefix: &MinPrefix,
) -> Result<NettypeList, FetchError> {
    let invalid = |reason: &str| FetchError::InvalidResponse { reason: reason.to_owned() };
    let v: Value = serde_json::from_slice(body).map_err(|e| FetchError::InvalidResponse {
        reason: format!("the body is not JSON ({} bytes; {})", body.len(), e.classify_str()),
    })?;
    let obj = v.as_object().ok_or_else(|| invalid("the body is not a JSON object"))?;
    let status = match obj.get("ActionStatus") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(invalid("ActionStatus is not a string")),
        None => return Err(invalid("ActionStatus is missing")),
    };
    let code = match obj.get("ErrorCode") {
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| invalid("ErrorCode is not an integer"))?,
        Some(_) => return Err(invalid("ErrorCode is not an integer")),
        // The documented answers always carry it; tolerate its absence on OK only.
        None if status == "OK" => 0,
        None => return Err(invalid("ErrorCode is missing")),
    };
    let info = match obj.get("ErrorInfo") {
        Some(Value::String(s)) => s.as_str(),
        _ => "",
    };
    if status != "OK" || code != 0 {
        if code == 0 {
            return Err(invalid("ActionStatus is not OK but ErrorCode is 0"));
        }
        return Err(FetchError::api(code, info, sdkappid, identifier));
    }
    let list = match obj.get("IPList") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("IPList is not an array")),
        None => return Err(invalid("IPList is missing")),
    };
    let mut admit = Admit::new(min_prefix);
    for item in list {
        let item = match item {
            Value::String(s) => Item::Text(s),
            other => Item::Other(other),
        };
        admit.push(item, None)?;
    }
    admit.finish()
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    /// The kind of JSON error without its message: the message may quote the body.
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

// ---- the Chat error codes, per the reference's table ---------------------------------------

impl FetchError {
    /// The error for an answer with this `ErrorCode` and `ErrorInfo` (the server's text,
    /// quoted and escaped here), with the fix named where the reference knows it.
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

    /// A reqwest error, without its URL (which holds the usersig): `shown` is the redacted URL.
    pub(super) fn from_reqwest(e: reqwest::Error, shown: &str, timeout: Duration) -> FetchError {
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
pub(crate) fn classify_code(code: i64) -> ErrorClass {
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
pub(crate) fn redact_query_param(text: &str, param: &str) -> String {
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

// ---- the HTTP client and the usersig of `allowsync usersig` ---------------------------------

/// The one HTTP client every Chat source sends through (every `ca_file` is read here). One
/// client serves every source, so it trusts the union of their extra CAs.
pub(super) fn client(chats: &[&TencentChatConfig]) -> Result<reqwest::Client, SourceError> {
    let shortest = chats.iter().map(|c| c.timeout).min().unwrap_or(Duration::from_secs(10));
    // Half the shortest whole-request timeout, so that an unreachable primary domain leaves
    // time to try the backup before the caller gives up.
    let connect = (shortest / 2).max(Duration::from_millis(500));
    super::http::client(connect, chats.iter().filter_map(|c| c.ca_file.as_ref()))
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
        Some(SourceKind::Static(_) | SourceKind::Url(_)) => Err(SourceError::NotChat(name.to_owned())),
        None => Err(SourceError::UnknownSource(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(entries: &[&str]) -> Result<NettypeList, FetchError> {
        let body = serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "IPList": entries});
        parse_response(body.to_string().as_bytes(), 1, "a", &MinPrefix::default())
    }
    fn listed(l: &NettypeList) -> Vec<String> {
        l.list.to_nets().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_entry_wider_than_the_minimum_makes_the_whole_answer_suspicious() {
        for (wide, shown) in [
            ("10.0.0.0/7", r#""10.0.0.0/7""#),
            ("2001:db8::/31", r#""2001:db8::/31""#),
            ("0.0.0.0/0", r#""0.0.0.0/0""#),
            ("::/0", r#""::/0""#),
            ("::ffff:0.0.0.0/96", r#""::ffff:0.0.0.0/96""#),
            ("::/96", r#""::/96""#),
            ("10.202.0.99/0", r#""10.202.0.99/0""#),
        ] {
            match answer(&["192.0.2.0/24", wide, "198.51.100.7"]) {
                Err(e @ FetchError::Suspicious { .. }) => {
                    assert_eq!(e.class(), ErrorClass::InvalidResponse);
                    let text = e.to_string();
                    assert!(text.contains(&format!("entry {shown}: ")), "{text}");
                    assert!(text.contains("is wider than /"), "{text}");
                }
                other => panic!("{wide}: {other:?}"),
            }
        }
        // At the minimum, fine.
        let l = answer(&["10.0.0.0/8", "2001:db8::/32", "::ffff:12.0.0.0/104"]).unwrap();
        assert_eq!(listed(&l), ["10.0.0.0/8", "12.0.0.0/8", "2001:db8::/32"]);
        // The operator's lower minimum is honoured.
        let body = r#"{"ActionStatus":"OK","ErrorCode":0,"IPList":["16.0.0.0/4"]}"#.as_bytes();
        let low = MinPrefix { v4: 4, v6: 32 };
        assert_eq!(listed(&parse_response(body, 1, "a", &low).unwrap()), ["16.0.0.0/4"]);
    }

    #[test]
    fn special_entries_are_skipped_and_the_rest_kept() {
        let l = answer(&[
            "192.0.2.0/24",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.7.7",
            "240.0.0.1",
            "::1",
            "::",
            "ff02::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "127.0.0.1",
            "2001:db8::/48",
        ])
        .unwrap();
        assert_eq!(listed(&l), ["192.0.2.0/24", "2001:db8::/48"]);
        assert_eq!((l.entries, l.skipped), (2, 12));
        // Nothing but special entries: the answer is broken, not an empty allowlist.
        assert!(matches!(answer(&["127.0.0.1", "::1"]), Err(FetchError::AllInvalid { count: 2 })));
    }

    #[test]
    fn error_info_reaches_the_error_escaped() {
        let body = serde_json::json!({"ActionStatus": "FAIL", "ErrorCode": 70009, "ErrorInfo": "bad\n\u{1b}[31mINFO forged"});
        let e = parse_response(body.to_string().as_bytes(), 1, "a", &MinPrefix::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.ends_with(r#"(server: "bad\n\u{1b}[31mINFO forged")"#), "{text}");
        assert!(!text.chars().any(char::is_control), "{text}");
    }

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
        let url = build_url("http://127.0.0.1:1/", 1400000000, "ad min&x", "eJy*a-b_", 5).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["identifier"], "ad min&x");
        assert_eq!(q["usersig"], "eJy*a-b_");
        assert_eq!(q["nettype"], "5");
        assert_eq!(q["contenttype"], "json");
        q["random"].parse::<u32>().unwrap();
        assert_eq!(url.path(), "/v4/ConfigSvc/GetIPList");
        let shown = redact_url(&url);
        assert!(shown.contains("usersig=REDACTED"), "{shown}");
        assert!(!shown.contains("eJy"), "{shown}");
    }
}
