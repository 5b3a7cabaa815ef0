//! The published allowlist: the `json` document a publisher's `file` backend writes and a
//! fleet host's `url` source reads. The format is a contract:
//!
//! ```json
//! {
//!   "version": 1,
//!   "generated_at": "2026-12-01T08:00:00Z",
//!   "ipv4": ["203.0.113.0/24"],
//!   "ipv6": ["2001:db8::/48"],
//!   "sha256": "<hex SHA-256 of the prefixes, one per line, ipv4 then ipv6, each ending in \n>"
//! }
//! ```
//!
//! [`render_json`] writes it (pretty, one prefix per line, a final newline: the same list
//! always gives the same bytes); [`parse_json`] reads one and checks the version and the
//! digest, over the prefixes as the document spells them. Fields a later version 1 writer adds
//! are ignored: the version is what says a reader must stop. No I/O here.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only schema version this build writes and reads.
pub const VERSION: u32 = 1;

/// A published list, as written or as read and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedList {
    pub version: u32,
    /// When the publisher wrote it (unix seconds; RFC 3339 UTC in the document).
    pub generated_at: u64,
    pub ipv4: Vec<Ipv4Net>,
    pub ipv6: Vec<Ipv6Net>,
    /// Lower-case hex, as in the document ([`digest`] of the prefixes).
    pub sha256: String,
}

impl PublishedList {
    /// The list of these prefixes, generated at `generated_at`, with its digest.
    pub fn new(generated_at: u64, ipv4: Vec<Ipv4Net>, ipv6: Vec<Ipv6Net>) -> PublishedList {
        let sha256 = digest(&ipv4, &ipv6);
        PublishedList { version: VERSION, generated_at, ipv4, ipv6, sha256 }
    }

    /// Every prefix, IPv4 first.
    pub fn nets(&self) -> Vec<IpNet> {
        self.ipv4.iter().map(|n| IpNet::V4(*n)).chain(self.ipv6.iter().map(|n| IpNet::V6(*n))).collect()
    }
}

/// Why a document is not a published list this build can trust.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishedError {
    #[error("not a published allowlist: {0}")]
    Syntax(String),
    #[error("schema version {found} is not supported (this build reads version {VERSION})")]
    Version { found: String },
    #[error("generated_at `{0}` is not an RFC 3339 UTC time like 2026-12-01T08:00:00Z")]
    GeneratedAt(String),
    #[error("{family} entry `{entry}` is not an {family} prefix")]
    Prefix { family: &'static str, entry: String },
    #[error("sha256 mismatch: the document says {stated}, its prefixes hash to {computed}")]
    Digest { stated: String, computed: String },
}

/// Hex SHA-256 of the prefixes, one per line, IPv4 then IPv6, each line ending in `\n`.
pub fn digest(v4: &[Ipv4Net], v6: &[Ipv6Net]) -> String {
    digest_lines(v4.iter().map(ToString::to_string).chain(v6.iter().map(ToString::to_string)))
}

fn digest_lines<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> String {
    let mut h = Sha256::new();
    for l in lines {
        h.update(l.as_ref().as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The document as it is written: field order fixed, two-space indent.
#[derive(Serialize)]
struct Document<'a> {
    version: u32,
    generated_at: String,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    sha256: &'a str,
}

/// The document's bytes, ending in a newline. Its digest is recomputed from the prefixes, so a
/// rendered document always verifies.
pub fn render_json(list: &PublishedList) -> Vec<u8> {
    let ipv4: Vec<String> = list.ipv4.iter().map(ToString::to_string).collect();
    let ipv6: Vec<String> = list.ipv6.iter().map(ToString::to_string).collect();
    let sha256 = digest_lines(ipv4.iter().chain(&ipv6));
    let doc = Document {
        version: list.version,
        generated_at: crate::clock::rfc3339(list.generated_at),
        ipv4,
        ipv6,
        sha256: &sha256,
    };
    let mut out = serde_json::to_vec_pretty(&doc).expect("a document of strings serializes");
    out.push(b'\n');
    out
}

/// What a document holds before it is checked.
#[derive(Deserialize)]
struct Raw {
    generated_at: String,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    sha256: String,
}

/// Parses and verifies a document: version 1, a UTC `generated_at`, prefixes of the right
/// family, and a `sha256` that matches them (compared case-insensitively).
pub fn parse_json(bytes: &[u8]) -> Result<PublishedList, PublishedError> {
    let syntax = |e: serde_json::Error| PublishedError::Syntax(e.to_string());
    // The version first, so that a later schema is reported as such, not as a mismatch.
    #[derive(Deserialize)]
    struct Version {
        version: Option<serde_json::Value>,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(syntax)?;
    match v.version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(serde_json::Value::Number(n)) => {
            return Err(PublishedError::Version { found: n.to_string() });
        }
        Some(_) => return Err(PublishedError::Syntax("`version` is not a number".into())),
        None => return Err(PublishedError::Syntax("no `version` field".into())),
    }
    let raw: Raw = serde_json::from_slice(bytes).map_err(syntax)?;
    let computed = digest_lines(raw.ipv4.iter().chain(&raw.ipv6));
    if !raw.sha256.eq_ignore_ascii_case(&computed) {
        return Err(PublishedError::Digest { stated: raw.sha256, computed });
    }
    let generated_at = parse_time(&raw.generated_at)?;
    let ipv4 = prefixes(&raw.ipv4, "IPv4", |n| match n {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    })?;
    let ipv6 = prefixes(&raw.ipv6, "IPv6", |n| match n {
        IpNet::V6(n) => Some(n),
        IpNet::V4(_) => None,
    })?;
    Ok(PublishedList { version: VERSION, generated_at, ipv4, ipv6, sha256: computed })
}

/// `2026-12-01T08:00:00Z` (fractions of a second are dropped); UTC only.
fn parse_time(s: &str) -> Result<u64, PublishedError> {
    let bad = || PublishedError::GeneratedAt(s.escape_debug().to_string());
    if !s.ends_with(['Z', 'z']) {
        return Err(bad());
    }
    let t = humantime::parse_rfc3339(s).map_err(|_| bad())?;
    t.duration_since(UNIX_EPOCH).as_ref().map(Duration::as_secs).map_err(|_| bad())
}

/// Each entry a `address/len` prefix of the family `pick` keeps.
fn prefixes<N>(
    entries: &[String],
    family: &'static str,
    pick: impl Fn(IpNet) -> Option<N>,
) -> Result<Vec<N>, PublishedError> {
    entries
        .iter()
        .map(|e| {
            e.parse::<IpNet>()
                .ok()
                .filter(|n| !matches!(n.addr(), IpAddr::V6(a) if a.to_ipv4_mapped().is_some()))
                .and_then(&pick)
                .ok_or_else(|| PublishedError::Prefix { family, entry: e.escape_debug().to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PublishedList {
        PublishedList::new(
            1_796_112_000,
            vec!["203.0.113.0/24".parse().unwrap(), "198.51.100.7/32".parse().unwrap()],
            vec!["2001:db8::/48".parse().unwrap()],
        )
    }

    #[test]
    fn the_digest_is_of_the_prefix_lines() {
        // printf '203.0.113.0/24\n198.51.100.7/32\n2001:db8::/48\n' | sha256sum
        assert_eq!(sample().sha256, "9287881cb40441074375aeb5fbae5effbae56568cbd0d1996d8b4050fee27cc3");
        assert_eq!(digest(&[], &[]), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn a_rendered_document_parses_back() {
        let list = sample();
        let bytes = render_json(&list);
        assert_eq!(parse_json(&bytes).unwrap(), list);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("{\n  \"version\": 1,\n  \"generated_at\": \"2026-12-01T08:00:00Z\",\n"),
            "{text}"
        );
        assert!(text.ends_with("}\n"), "{text}");
    }

    #[test]
    fn version_digest_time_and_families_are_checked() {
        let good = String::from_utf8(render_json(&sample())).unwrap();
        let bad = |from: &str, to: &str| parse_json(good.replacen(from, to, 1).as_bytes()).unwrap_err();
        assert_eq!(bad("\"version\": 1", "\"version\": 2"), PublishedError::Version { found: "2".into() });
        assert!(matches!(bad("203.0.113.0/24", "203.0.113.0/25"), PublishedError::Digest { .. }));
        assert!(matches!(bad("08:00:00Z", "08:00:00+01:00"), PublishedError::GeneratedAt(_)));
        assert!(matches!(bad("\"version\": 1,", ""), PublishedError::Syntax(_)));
        assert!(matches!(parse_json(b"not json"), Err(PublishedError::Syntax(_))));
        // An IPv6 prefix among the IPv4 ones, with a digest that matches: still refused.
        let v6_in_v4 = format!(
            "{{\"version\":1,\"generated_at\":\"2026-12-01T08:00:00Z\",\"ipv4\":[\"2001:db8::/48\"],\"ipv6\":[],\"sha256\":\"{}\"}}",
            digest_lines(["2001:db8::/48"])
        );
        assert!(matches!(
            parse_json(v6_in_v4.as_bytes()),
            Err(PublishedError::Prefix { family: "IPv4", .. })
        ));
    }
}
