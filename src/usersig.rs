//! TLSSigAPIv2 usersigs: minting (the daemon signs its own admin usersig with the app's secret
//! key), decoding and verifying (the mock Chat API and the tests play the server's part), and a
//! cache that re-mints only when a usersig nears its expiry.
//!
//! The format, from the official `tls-sig-api-v2` libraries:
//!
//! ```text
//! TLS.sig  = base64(HMAC-SHA256(key, "TLS.identifier:{id}\nTLS.sdkappid:{app}\nTLS.time:{t}\nTLS.expire:{e}\n"))
//! usersig  = base64(zlib(JSON {TLS.ver, TLS.identifier, TLS.sdkappid, TLS.expire, TLS.time, TLS.sig}))
//!            with + / = replaced by * - _
//! ```
//!
//! The official libraries differ in JSON key order and zlib level, so two correct usersigs for the
//! same inputs need not be equal byte for byte: compare decoded documents.
//!
//! A usersig is as good as the secret key for as long as it is valid, so it lives in
//! [`Usersig`], whose `Debug` and `Display` never print it, and no error of this module quotes
//! one (nor the `TLS.sig` inside it, from which a usersig can be rebuilt).

use std::fmt;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::config::SecretKey;

/// Outside input is inflated up to this size and no further: a real usersig document is a few
/// hundred bytes, and a zlib bomb must not cost memory.
pub(crate) const MAX_INFLATED: usize = 64 * 1024;
/// Longest usersig string accepted for decoding (a real one is about 200 characters).
pub const MAX_USERSIG_LEN: usize = 16 * 1024;

/// A usersig. Its text is reachable only through [`Usersig::expose`], for building a request.
#[derive(Clone, PartialEq, Eq)]
pub struct Usersig(String);

impl Usersig {
    /// The usersig itself, for the request's query string only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Usersig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Usersig(<redacted>)")
    }
}

impl fmt::Display for Usersig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted usersig>")
    }
}

/// A minted usersig and the validity it was signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Minted {
    pub usersig: Usersig,
    /// `TLS.time`: when it was signed, Unix seconds.
    pub time: u64,
    /// `TLS.expire`: validity in seconds.
    pub expire: u64,
}

impl Minted {
    /// The last second at which the server accepts it (`now <= time + expire`).
    pub fn expires_at(&self) -> u64 {
        self.time.saturating_add(self.expire)
    }
}

/// The decoded JSON document of a usersig.
#[derive(Clone, PartialEq, Eq)]
pub struct UsersigDoc {
    pub ver: String,
    pub identifier: String,
    pub sdkappid: u64,
    pub expire: u64,
    pub time: u64,
    /// `TLS.sig`, standard base64. Secret: not shown by `Debug`.
    pub sig: String,
    /// `TLS.userbuf` (standard base64), when present; part of the signed text.
    pub userbuf: Option<String>,
}

impl fmt::Debug for UsersigDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsersigDoc")
            .field("ver", &self.ver)
            .field("identifier", &self.identifier)
            .field("sdkappid", &self.sdkappid)
            .field("expire", &self.expire)
            .field("time", &self.time)
            .field("sig", &"<redacted>")
            .field("userbuf", &self.userbuf)
            .finish()
    }
}

/// Why a usersig was rejected. Messages never quote the usersig or its signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsersigError {
    #[error("usersig is longer than {MAX_USERSIG_LEN} characters")]
    TooLong,
    #[error("usersig is not base64 (after undoing the * - _ substitutions)")]
    Base64,
    #[error("usersig does not inflate as zlib data")]
    Inflate,
    #[error("usersig inflates to more than {MAX_INFLATED} bytes")]
    TooLarge,
    #[error("usersig is not a JSON object")]
    Json,
    #[error("usersig field {field} is missing or has the wrong type")]
    Field { field: &'static str },
    #[error("usersig version {0:?} is not supported (want \"2.0\")")]
    Version(String),
    #[error("usersig is for SDKAppID {found}, not {expected}")]
    SdkappidMismatch { expected: u64, found: u64 },
    #[error("usersig is for identifier {found:?}, not {expected:?}")]
    IdentifierMismatch { expected: String, found: String },
    #[error("usersig expired at {expired_at} (Unix seconds), now is {now}")]
    Expired { expired_at: u64, now: u64 },
    #[error("usersig signature does not match: signed with another secret key, or altered")]
    BadSignature,
}

type HmacSha256 = Hmac<Sha256>;

fn content_to_sign(identifier: &str, sdkappid: u64, time: u64, expire: u64, userbuf: Option<&str>) -> String {
    let mut s = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    if let Some(b) = userbuf {
        s.push_str(&format!("TLS.userbuf:{b}\n"));
    }
    s
}

fn hmac(key: &str, text: &str) -> HmacSha256 {
    // The key string's UTF-8 bytes are the HMAC key as they are (not hex-decoded). HMAC takes
    // keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length");
    mac.update(text.as_bytes());
    mac
}

/// `TLS.sig` for these inputs: standard base64 of the HMAC-SHA256.
pub fn signature(sdkappid: u64, identifier: &str, key: &str, expire: u64, time: u64) -> String {
    let mac = hmac(key, &content_to_sign(identifier, sdkappid, time, expire, None));
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Mints a usersig signed at `now_unix`, valid for `expire` seconds.
pub fn mint(sdkappid: u64, identifier: &str, key: &str, expire: u64, now_unix: u64) -> Usersig {
    let doc = json!({
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": sdkappid,
        "TLS.expire": expire,
        "TLS.time": now_unix,
        "TLS.sig": signature(sdkappid, identifier, key, expire, now_unix),
    });
    let json = serde_json::to_vec(&doc).expect("a JSON value always serializes");
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&json).expect("writing to a Vec cannot fail");
    let compressed = z.finish().expect("writing to a Vec cannot fail");
    let b64 = STANDARD.encode(compressed);
    Usersig(
        b64.chars()
            .map(|c| match c {
                '+' => '*',
                '/' => '-',
                '=' => '_',
                c => c,
            })
            .collect(),
    )
}

/// Decodes a usersig into its document without checking anything but its shape.
pub fn decode(usersig: &str) -> Result<UsersigDoc, UsersigError> {
    if usersig.len() > MAX_USERSIG_LEN {
        return Err(UsersigError::TooLong);
    }
    let b64: String = usersig
        .chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect();
    let compressed = STANDARD.decode(b64.as_bytes()).map_err(|_| UsersigError::Base64)?;
    let mut json = Vec::new();
    flate2::read::ZlibDecoder::new(compressed.as_slice())
        .take(MAX_INFLATED as u64 + 1)
        .read_to_end(&mut json)
        .map_err(|_| UsersigError::Inflate)?;
    if json.len() > MAX_INFLATED {
        return Err(UsersigError::TooLarge);
    }
    // Parsed as a generic value and picked apart by hand: a typed deserializer's error would
    // quote the offending value, which may be the signature.
    let v: Value = serde_json::from_slice(&json).map_err(|_| UsersigError::Json)?;
    let obj = v.as_object().ok_or(UsersigError::Json)?;
    let ver = str_field(obj, "TLS.ver")?;
    if ver != "2.0" {
        return Err(UsersigError::Version(ver.chars().take(16).collect()));
    }
    Ok(UsersigDoc {
        ver,
        identifier: str_field(obj, "TLS.identifier")?,
        sdkappid: u64_field(obj, "TLS.sdkappid")?,
        expire: u64_field(obj, "TLS.expire")?,
        time: u64_field(obj, "TLS.time")?,
        sig: str_field(obj, "TLS.sig")?,
        userbuf: match obj.get("TLS.userbuf") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(UsersigError::Field { field: "TLS.userbuf" }),
        },
    })
}

fn str_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, UsersigError> {
    obj.get(field).and_then(Value::as_str).map(str::to_owned).ok_or(UsersigError::Field { field })
}

fn u64_field(obj: &Map<String, Value>, field: &'static str) -> Result<u64, UsersigError> {
    obj.get(field).and_then(Value::as_u64).ok_or(UsersigError::Field { field })
}

/// Checks a usersig as the server does: it decodes, it is for this SDKAppID and identifier, it
/// has not expired (`now <= time + expire`), and its HMAC matches `key`.
pub fn verify(
    usersig: &str,
    sdkappid: u64,
    identifier: &str,
    key: &str,
    now_unix: u64,
) -> Result<UsersigDoc, UsersigError> {
    let doc = decode(usersig)?;
    if doc.sdkappid != sdkappid {
        return Err(UsersigError::SdkappidMismatch { expected: sdkappid, found: doc.sdkappid });
    }
    if doc.identifier != identifier {
        return Err(UsersigError::IdentifierMismatch {
            expected: identifier.to_owned(),
            found: doc.identifier.chars().take(64).collect(),
        });
    }
    let expired_at = doc.time.saturating_add(doc.expire);
    if now_unix > expired_at {
        return Err(UsersigError::Expired { expired_at, now: now_unix });
    }
    let sig = STANDARD.decode(doc.sig.as_bytes()).map_err(|_| UsersigError::BadSignature)?;
    let text = content_to_sign(&doc.identifier, doc.sdkappid, doc.time, doc.expire, doc.userbuf.as_deref());
    // verify_slice compares in constant time.
    hmac(key, &text).verify_slice(&sig).map_err(|_| UsersigError::BadSignature)?;
    Ok(doc)
}

/// One source's usersig: minted on first use, reused until less than a tenth of its validity is
/// left, re-minted at once on demand (after the server answered 70001 / 70052).
pub(crate) struct UsersigCache {
    sdkappid: u64,
    identifier: String,
    key: SecretKey,
    expire: u64,
    current: Mutex<Option<Minted>>,
}

impl fmt::Debug for UsersigCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsersigCache")
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field("key", &self.key)
            .field("expire", &self.expire)
            .finish_non_exhaustive()
    }
}

impl UsersigCache {
    /// `ttl` is the validity each minted usersig is signed with (`usersig_ttl`), at least 1 s.
    pub fn new(sdkappid: u64, identifier: impl Into<String>, key: SecretKey, ttl: Duration) -> Self {
        UsersigCache {
            sdkappid,
            identifier: identifier.into(),
            key,
            expire: ttl.as_secs().max(1),
            current: Mutex::new(None),
        }
    }

    /// A usersig good at `now_unix`, minting one only when there is none, less than 10% of its
    /// validity is left, or the clock went back past its signing time.
    pub fn get(&self, now_unix: u64) -> Minted {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cur.as_ref() {
            let remaining = m.expires_at().saturating_sub(now_unix);
            if now_unix >= m.time && remaining >= m.expire.div_ceil(10) {
                return m.clone();
            }
        }
        let m = self.mint_at(now_unix);
        *cur = Some(m.clone());
        m
    }

    /// When the usersig in use expires (unix seconds); `None` before the first is minted.
    pub fn expires_at(&self) -> Option<u64> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(Minted::expires_at)
    }

    /// Mints a new usersig now, whatever the cached one's age; use after the server rejected
    /// `rejected` as expired. If another request already replaced `rejected`, its replacement
    /// is returned instead of minting again.
    ///
    /// The new one is signed at least one second after the rejected one, so that it differs
    /// from it even within the same second: sending the very string the server just refused
    /// would be a wasted retry.
    pub fn refresh(&self, rejected: &Usersig, now_unix: u64) -> Minted {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = now_unix;
        if let Some(m) = cur.as_ref() {
            if &m.usersig != rejected {
                return m.clone();
            }
            at = at.max(m.time.saturating_add(1));
        }
        let m = self.mint_at(at);
        *cur = Some(m.clone());
        m
    }

    /// What must never appear in a log or an error next to a request made with `m`: the
    /// usersig, its `TLS.sig` (from which it can be rebuilt) and the secret key itself.
    pub(crate) fn secrets(&self, m: &Minted) -> [String; 3] {
        [
            m.usersig.expose().to_owned(),
            signature(self.sdkappid, &self.identifier, self.key.expose(), m.expire, m.time),
            self.key.expose().to_owned(),
        ]
    }

    fn mint_at(&self, time: u64) -> Minted {
        Minted {
            usersig: mint(self.sdkappid, &self.identifier, self.key.expose(), self.expire, time),
            time,
            expire: self.expire,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::new("k3y", "test")
    }

    #[test]
    fn cache_reuses_until_a_tenth_is_left() {
        let c = UsersigCache::new(1, "admin", key(), Duration::from_secs(1000));
        let a = c.get(10_000);
        assert_eq!((a.time, a.expire), (10_000, 1000));
        // 100 s (a tenth) left: still good.
        assert_eq!(c.get(10_900), a);
        // 99 s left: re-minted.
        let b = c.get(10_901);
        assert_eq!(b.time, 10_901);
        assert_ne!(b.usersig, a.usersig);
        // The clock went back before the signing time: re-minted.
        assert_eq!(c.get(5_000).time, 5_000);
    }

    #[test]
    fn refresh_always_changes_the_usersig() {
        let c = UsersigCache::new(1, "admin", key(), Duration::from_secs(3600));
        let a = c.get(100);
        let b = c.refresh(&a.usersig, 100);
        assert_ne!(a.usersig, b.usersig);
        assert!(b.time > a.time);
        verify(b.usersig.expose(), 1, "admin", "k3y", 101).unwrap();
        // A second request that failed with the old usersig gets the replacement, not a third.
        assert_eq!(c.refresh(&a.usersig, 100), b);
        assert_eq!(c.get(102), b);
    }

    #[test]
    fn redacted_everywhere() {
        let c = UsersigCache::new(1, "admin", key(), Duration::from_secs(3600));
        let m = c.get(100);
        let text = m.usersig.expose().to_owned();
        for shown in [format!("{m:?}"), format!("{}", m.usersig), format!("{c:?}")] {
            assert!(!shown.contains(&text), "{shown}");
            assert!(!shown.contains("k3y"), "{shown}");
        }
        let doc = decode(&text).unwrap();
        assert!(!format!("{doc:?}").contains(&doc.sig));
    }

    #[test]
    fn zlib_bomb_is_capped() {
        let big = vec![b' '; MAX_INFLATED * 4];
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&big).unwrap();
        let s = STANDARD.encode(z.finish().unwrap()).replace('+', "*").replace('/', "-").replace('=', "_");
        assert_eq!(decode(&s), Err(UsersigError::TooLarge));
    }
}
