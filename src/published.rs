//! The published list: the `json` format one allowsync writes for others to read (issue 22),
//! a contract between a publisher and its consumers:
//!
//! ```json
//! {"version": 1, "generated_at": "2026-12-01T08:00:00Z",
//!  "ipv4": ["203.0.113.0/24"], "ipv6": ["2001:db8::/48"],
//!  "sha256": "<hex SHA-256 of the prefixes, one per line, ipv4 then ipv6, each line ending in \n>"}
//! ```
//!
//! [`parse_document`] checks what makes the document whole (JSON, version 1, `generated_at`,
//! the SHA-256 over the entries exactly as written) and leaves the entries as text, for a
//! consumer to judge one by one ([`crate::source::url`]); [`parse_json`] reads them strictly
//! as well (a publisher reading back the file it wrote). Nothing from the document reaches an
//! error message unescaped.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::logging::Untrusted;

/// The only version of the format this build reads and writes.
pub const VERSION: u32 = 1;

/// A published list, its entries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedList {
    pub version: u32,
    pub generated_at: SystemTime,
    pub ipv4: Vec<Ipv4Net>,
    pub ipv6: Vec<Ipv6Net>,
    /// Lower-case hex, as [`digest`] writes it.
    pub sha256: String,
}

impl PublishedList {
    /// Every prefix, IPv4 first.
    pub fn nets(&self) -> Vec<IpNet> {
        self.ipv4.iter().map(|n| IpNet::V4(*n)).chain(self.ipv6.iter().map(|n| IpNet::V6(*n))).collect()
    }
}

/// A published list whose integrity was checked, its entries still text as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub generated_at: SystemTime,
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
}

/// Why a published list cannot be used. Every text from the document is escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishedError {
    #[error("not a published list: {0}")]
    Json(String),
    #[error("unknown version {0} (this build reads version 1)")]
    Version(String),
    #[error("generated_at {0} is not an RFC 3339 UTC time (like 2026-12-01T08:00:00Z)")]
    GeneratedAt(String),
    #[error(
        "the SHA-256 does not match the prefixes: the list says {stated}, its prefixes hash to {computed}"
    )]
    Sha256 { stated: String, computed: String },
    #[error("entry {entry} in {family}: not an {family} prefix")]
    Entry { entry: String, family: &'static str },
}

#[derive(Deserialize)]
struct Wire {
    version: serde_json::Value,
    generated_at: String,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    sha256: String,
}

/// The hex SHA-256 of `lines`, each followed by `\n`.
fn digest_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The `sha256` of a list: the prefixes one per line, IPv4 then IPv6, each line ending in `\n`.
pub fn digest(v4: &[Ipv4Net], v6: &[Ipv6Net]) -> String {
    let lines: Vec<String> =
        v4.iter().map(ToString::to_string).chain(v6.iter().map(ToString::to_string)).collect();
    digest_lines(lines.iter().map(String::as_str))
}

/// The document as it is written: fields in the contract's order (a `json!` map would sort
/// them), two-space indent.
#[derive(Serialize)]
struct Written<'a> {
    version: u32,
    generated_at: String,
    ipv4: Vec<String>,
    ipv6: Vec<String>,
    sha256: &'a str,
}

/// The document for `v4` and `v6`, generated at `generated_at` (whole seconds, UTC), ending in
/// a newline: the same list always gives the same bytes.
pub fn render_json(generated_at: SystemTime, v4: &[Ipv4Net], v6: &[Ipv6Net]) -> String {
    let sha256 = digest(v4, v6);
    let doc = Written {
        version: VERSION,
        generated_at: humantime::format_rfc3339_seconds(generated_at).to_string(),
        ipv4: v4.iter().map(ToString::to_string).collect(),
        ipv6: v6.iter().map(ToString::to_string).collect(),
        sha256: &sha256,
    };
    let mut s = serde_json::to_string_pretty(&doc).expect("a document of strings serializes");
    s.push('\n');
    s
}

/// Reads a document: its version must be 1, its `generated_at` an RFC 3339 UTC time and its
/// `sha256` that of its entries as written. The entries are not judged.
pub fn parse_document(bytes: &[u8]) -> Result<Document, PublishedError> {
    let wire: Wire = serde_json::from_slice(bytes)
        .map_err(|e| PublishedError::Json(Untrusted(&e.to_string()).to_string()))?;
    if wire.version.as_u64() != Some(u64::from(VERSION)) {
        // A number is shown as it is (serde_json keeps it to 64 bits), anything else escaped.
        let shown = match &wire.version {
            serde_json::Value::Number(n) => n.to_string(),
            other => Untrusted(&other.to_string()).to_string(),
        };
        return Err(PublishedError::Version(shown));
    }
    let generated_at = humantime::parse_rfc3339(&wire.generated_at)
        .map_err(|_| PublishedError::GeneratedAt(Untrusted(&wire.generated_at).to_string()))?;
    let computed = digest_lines(wire.ipv4.iter().chain(&wire.ipv6).map(String::as_str));
    if !wire.sha256.eq_ignore_ascii_case(&computed) {
        return Err(PublishedError::Sha256 { stated: Untrusted(&wire.sha256).to_string(), computed });
    }
    Ok(Document { generated_at, ipv4: wire.ipv4, ipv6: wire.ipv6 })
}

/// Reads a document as [`parse_document`] does, and every entry strictly: each must be a
/// prefix of its family as [`render_json`] writes it.
pub fn parse_json(bytes: &[u8]) -> Result<PublishedList, PublishedError> {
    let doc = parse_document(bytes)?;
    fn read<N: std::str::FromStr + ToString>(
        e: &[String],
        family: &'static str,
    ) -> Result<Vec<N>, PublishedError> {
        e.iter()
            .map(|s| match s.parse::<N>() {
                Ok(n) if n.to_string() == *s => Ok(n),
                _ => Err(PublishedError::Entry { entry: Untrusted(s).to_string(), family }),
            })
            .collect()
    }
    let ipv4 = read::<Ipv4Net>(&doc.ipv4, "IPv4")?;
    let ipv6 = read::<Ipv6Net>(&doc.ipv6, "IPv6")?;
    let sha256 = digest(&ipv4, &ipv6);
    Ok(PublishedList { version: VERSION, generated_at: doc.generated_at, ipv4, ipv6, sha256 })
}

/// `generated_at` as unix seconds (0 before 1970).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn the_digest_is_of_the_lines_ipv4_then_ipv6() {
        let v4: Vec<Ipv4Net> = vec!["203.0.113.0/24".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let v6: Vec<Ipv6Net> = vec!["2001:db8::/48".parse().unwrap()];
        // printf '203.0.113.0/24\n192.0.2.7/32\n2001:db8::/48\n' | sha256sum
        let text = "203.0.113.0/24\n192.0.2.7/32\n2001:db8::/48\n";
        let want = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(digest(&v4, &v6), want);
        assert_eq!(digest(&[], &[]), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn render_and_parse_round_trip() {
        let v4: Vec<Ipv4Net> = vec!["203.0.113.0/24".parse().unwrap()];
        let v6: Vec<Ipv6Net> = vec!["2001:db8::/48".parse().unwrap()];
        let text = render_json(at("2026-12-01T08:00:00Z"), &v4, &v6);
        assert!(
            text.starts_with("{\n  \"version\": 1,\n  \"generated_at\": \"2026-12-01T08:00:00Z\",\n"),
            "{text}"
        );
        assert!(text.ends_with("}\n"), "{text}");
        let l = parse_json(text.as_bytes()).unwrap();
        assert_eq!((l.ipv4, l.ipv6, l.version), (v4, v6, 1));
        assert_eq!(l.generated_at, at("2026-12-01T08:00:00Z"));
    }

    #[test]
    fn version_sha_and_time_are_checked_and_quoted_escaped() {
        let doc = |version: &str, generated: &str, sha: &str| {
            format!(
                r#"{{"version": {version}, "generated_at": "{generated}", "ipv4": ["192.0.2.0/24"], "ipv6": [], "sha256": "{sha}"}}"#
            )
        };
        let good = digest(&["192.0.2.0/24".parse().unwrap()], &[]);
        assert!(parse_document(doc("1", "2026-12-01T08:00:00Z", &good).as_bytes()).is_ok());
        assert!(parse_document(doc("1", "2026-12-01T08:00:00Z", &good.to_uppercase()).as_bytes()).is_ok());
        for (v, want) in
            [("2", "unknown version 2"), ("\"1\"", r#"unknown version "\"1\"""#), ("1.0", "unknown version")]
        {
            let e = parse_document(doc(v, "2026-12-01T08:00:00Z", &good).as_bytes()).unwrap_err();
            assert!(e.to_string().starts_with(want), "{v}: {e}");
        }
        let e = parse_document(doc("1", "2026-12-01T08:00:00Z", "ab\\u001b[2J").as_bytes()).unwrap_err();
        assert!(matches!(e, PublishedError::Sha256 { .. }), "{e}");
        assert!(
            e.to_string().contains(r#"says "ab\u{1b}[2J""#) && !e.to_string().chars().any(char::is_control),
            "{e}"
        );
        let e = parse_document(doc("1", "yesterday\\n", &good).as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"generated_at "yesterday\n" is not an RFC 3339 UTC time (like 2026-12-01T08:00:00Z)"#
        );
        assert!(matches!(parse_document(b"{\"version\":1}"), Err(PublishedError::Json(_))));
        assert!(matches!(parse_document(b"<html>"), Err(PublishedError::Json(_))));
        // Entries are hashed as written: a list whose text differs from its hash is refused even
        // when the prefixes would be the same.
        let e = parse_document(
            doc("1", "2026-12-01T08:00:00Z", &good).replace("192.0.2.0/24", "192.0.2.0/24 ").as_bytes(),
        );
        assert!(matches!(e, Err(PublishedError::Sha256 { .. })));
    }

    #[test]
    fn the_strict_reader_wants_each_family_in_its_place() {
        let v6: Vec<Ipv6Net> = vec!["2001:db8::/48".parse().unwrap()];
        let text = format!(
            r#"{{"version":1,"generated_at":"2026-12-01T08:00:00Z","ipv4":["2001:db8::/48"],"ipv6":[],"sha256":"{}"}}"#,
            digest(&[], &v6)
        );
        let e = parse_json(text.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), r#"entry "2001:db8::/48" in IPv4: not an IPv4 prefix"#);
        // The lenient reader leaves that to the consumer.
        assert_eq!(parse_document(text.as_bytes()).unwrap().ipv4, ["2001:db8::/48"]);
    }
}
