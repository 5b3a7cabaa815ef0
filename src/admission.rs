//! What allowsync will not apply, whatever a source says: the rules every entry must pass
//! before it may join an allowlist, after [`crate::prefixes::parse_entry`] has read it (and
//! unmapped IPv4-mapped and IPv4-compatible IPv6 to IPv4, so that `::ffff:0.0.0.0/96` is judged
//! as the `0.0.0.0/0` it is).
//!
//! 1. **Minimum prefix length** (`safety.min_prefix_v4`, default 8; `safety.min_prefix_v6`,
//!    default 32). A shorter entry from the API makes the whole answer suspicious (the source
//!    keeps its last good list); in `static` it is a configuration error.
//! 2. **Special ranges**, never allowed in either family: an entry that *overlaps* one of
//!    [`SPECIAL_V4`] / [`SPECIAL_V6`] (lies in it, equals it or contains it) is refused. From the
//!    API it is skipped with a warning; in `static` it is a configuration error. Containing
//!    counts: `224.0.0.0/3` holds all of multicast, and lowering the minimum prefix to 0 must
//!    not make `0.0.0.0/0` acceptable. Private and documentation ranges are not special.
//!
//! The minimum is checked first, so an entry that is both too short and special (`0.0.0.0/0`)
//! makes the answer suspicious rather than being quietly skipped.

use std::fmt;

use ipnet::IpNet;

use crate::prefixes::{Addr, Range};

/// Default of `safety.min_prefix_v4`: nothing wider than a /8.
pub(crate) const DEFAULT_MIN_PREFIX_V4: u8 = 8;
/// Default of `safety.min_prefix_v6`: nothing wider than a /32 (a regional registry's usual
/// allocation to one network).
pub(crate) const DEFAULT_MIN_PREFIX_V6: u8 = 32;

/// The minimum prefix lengths, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinPrefix {
    pub v4: u8,
    pub v6: u8,
}

impl Default for MinPrefix {
    fn default() -> Self {
        MinPrefix { v4: DEFAULT_MIN_PREFIX_V4, v6: DEFAULT_MIN_PREFIX_V6 }
    }
}

/// A special range: its addresses and what they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special<A> {
    pub range: Range<A>,
    pub kind: &'static str,
}

const fn v4(a: [u8; 4], len: u32, kind: &'static str) -> Special<u32> {
    let start = u32::from_be_bytes(a);
    let host = if len == 32 { 0 } else { u32::MAX >> len };
    Special { range: Range { start, end: start | host }, kind }
}

const fn v6(start: u128, len: u32, kind: &'static str) -> Special<u128> {
    let host = if len == 128 { 0 } else { u128::MAX >> len };
    Special { range: Range { start, end: start | host }, kind }
}

/// IPv4 ranges that never belong in an allowlist. The limited broadcast address comes before
/// the reserved block that holds it, so that it is named as what it is.
pub const SPECIAL_V4: &[Special<u32>] = &[
    v4([0, 0, 0, 0], 8, "unspecified"),
    v4([127, 0, 0, 0], 8, "loopback"),
    v4([169, 254, 0, 0], 16, "link-local"),
    v4([224, 0, 0, 0], 4, "multicast"),
    v4([255, 255, 255, 255], 32, "limited broadcast"),
    v4([240, 0, 0, 0], 4, "reserved"),
];

/// IPv6 ranges that never belong in an allowlist.
pub const SPECIAL_V6: &[Special<u128>] = &[
    v6(0, 128, "unspecified"),
    v6(1, 128, "loopback"),
    v6(0xfe80 << 112, 10, "link-local"),
    v6(0xff00 << 112, 8, "multicast"),
];

/// Why an entry may not be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Shorter than the family's minimum prefix length: from the API, a suspicious answer.
    #[error("{net} is wider than /{min} (safety.min_prefix_{family})")]
    TooShort { net: IpNet, min: u8, family: &'static str },
    /// Overlaps a special range: never allowed.
    #[error("{net} {relation} the {kind} range {range}, which is never allowed")]
    Special { net: IpNet, relation: Relation, kind: &'static str, range: String },
}

/// How a refused entry relates to the special range it overlaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Is,
    IsIn,
    Contains,
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Relation::Is => "is",
            Relation::IsIn => "is in",
            Relation::Contains => "contains",
        })
    }
}

/// Checks a parsed entry against the minimum prefix lengths, then the special ranges.
pub fn check(net: IpNet, min: &MinPrefix) -> Result<(), Refused> {
    match net {
        IpNet::V4(n) => check_family(net, u32::from(n.network()), n.prefix_len(), min.v4, "v4", SPECIAL_V4),
        IpNet::V6(n) => check_family(net, u128::from(n.network()), n.prefix_len(), min.v6, "v6", SPECIAL_V6),
    }
}

fn check_family<A: Addr>(
    net: IpNet,
    addr: A,
    len: u8,
    min: u8,
    family: &'static str,
    specials: &[Special<A>],
) -> Result<(), Refused> {
    if len < min {
        return Err(Refused::TooShort { net, min, family });
    }
    let r = Range::from_prefix(addr, len);
    match specials.iter().find(|s| s.range.overlaps(&r)) {
        None => Ok(()),
        Some(s) => {
            let relation = if s.range == r {
                Relation::Is
            } else if s.range.contains_range(&r) {
                Relation::IsIn
            } else {
                Relation::Contains
            };
            Err(Refused::Special { net, relation, kind: s.kind, range: s.range.to_string() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefixes::parse_entry;

    fn judge(entry: &str, min: &MinPrefix) -> Result<IpNet, Refused> {
        let net = parse_entry(entry).unwrap().net;
        check(net, min).map(|()| net)
    }
    fn ok(entry: &str) -> bool {
        judge(entry, &MinPrefix::default()).is_ok()
    }
    fn too_short(entry: &str) -> bool {
        matches!(judge(entry, &MinPrefix::default()), Err(Refused::TooShort { .. }))
    }
    fn special(entry: &str) -> Option<&'static str> {
        match judge(entry, &MinPrefix::default()) {
            Err(Refused::Special { kind, .. }) => Some(kind),
            _ => None,
        }
    }

    #[test]
    fn the_minimum_prefix_length_at_its_edges() {
        assert!(too_short("10.0.0.0/7") && ok("10.0.0.0/8"));
        assert!(too_short("2001:db8::/31") && ok("2001:db8::/32"));
        assert!(too_short("0.0.0.0/0") && too_short("::/0"));
        // Host bits do not make a short prefix long: masked first, then judged.
        assert!(too_short("10.202.0.99/0"));
        // Mapped and compatible IPv6 is judged as the IPv4 it is.
        assert!(too_short("::ffff:0.0.0.0/96") && too_short("::ffff:10.0.0.0/103"));
        assert!(ok("::ffff:10.0.0.0/104"));
        assert!(too_short("::/96") && too_short("::10.0.0.0/103") && ok("::10.0.0.0/104"));
        let e = judge("::ffff:0.0.0.0/96", &MinPrefix::default()).unwrap_err().to_string();
        assert_eq!(e, "0.0.0.0/0 is wider than /8 (safety.min_prefix_v4)");
    }

    #[test]
    fn lowering_the_minimum_is_the_operators_opt_in() {
        let low = MinPrefix { v4: 4, v6: 16 };
        assert!(judge("16.0.0.0/4", &low).is_ok());
        assert!(judge("2001::/16", &low).is_ok());
        assert!(matches!(judge("16.0.0.0/3", &low), Err(Refused::TooShort { min: 4, .. })));
        // It never makes a range that holds special addresses acceptable.
        let none = MinPrefix { v4: 0, v6: 0 };
        for e in ["0.0.0.0/0", "::/0", "128.0.0.0/1", "160.0.0.0/4", "::ffff:0.0.0.0/96"] {
            assert!(matches!(judge(e, &none), Err(Refused::Special { .. })), "{e}");
        }
    }

    #[test]
    fn every_special_range_in_both_families() {
        for (entry, kind) in [
            ("0.0.0.0", "unspecified"),
            ("0.255.255.255", "unspecified"),
            ("0.0.0.0/8", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.255", "loopback"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("255.255.255.255", "limited broadcast"),
            ("169.254.1.1", "link-local"),
            ("169.254.0.0/16", "link-local"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("ff00::/32", "multicast"),
            ("fe80::/64", "link-local"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            // Unmapped, then judged as IPv4.
            ("::ffff:127.0.0.1", "loopback"),
            ("::127.0.0.1", "loopback"),
            ("::2", "unspecified"),
            ("::ffff:224.0.0.0/104", "multicast"),
        ] {
            assert_eq!(special(entry), Some(kind), "{entry}");
        }
        // Their neighbours are ordinary addresses.
        for entry in [
            "1.0.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "223.255.255.255",
            "::ffff:1.0.0.0",
            "fe7f:ffff::1",
            "fec0::1",
            "feff:ffff::1",
        ] {
            assert!(ok(entry), "{entry}");
        }
    }

    #[test]
    fn an_entry_that_contains_a_special_range_is_refused() {
        let e = judge("224.0.0.0/3", &MinPrefix { v4: 3, v6: 32 }).unwrap_err();
        assert!(matches!(e, Refused::Special { relation: Relation::Contains, kind: "multicast", .. }));
        assert_eq!(
            e.to_string(),
            "224.0.0.0/3 contains the multicast range 224.0.0.0/4, which is never allowed"
        );
        assert!(matches!(special("127.0.0.0/8"), Some("loopback")));
        assert_eq!(
            judge("127.0.0.0/8", &MinPrefix::default()).unwrap_err().to_string(),
            "127.0.0.0/8 is the loopback range 127.0.0.0/8, which is never allowed"
        );
        assert_eq!(special("169.0.0.0/8"), Some("link-local"));
        let wide = MinPrefix { v4: 0, v6: 0 };
        assert!(matches!(judge("fe00::/8", &wide), Err(Refused::Special { kind: "link-local", .. })));
        assert!(matches!(judge("ff00::/8", &wide), Err(Refused::Special { relation: Relation::Is, .. })));
        assert_eq!(special("::/32"), Some("unspecified"));
        // 192.0.0.0/3 is 192.0.0.0-223.255.255.255: nothing special in it.
        assert!(judge("192.0.0.0/3", &MinPrefix { v4: 3, v6: 32 }).is_ok());
    }

    #[test]
    fn private_and_documentation_ranges_stay_allowed() {
        for entry in [
            "1.0.0.0/8",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "100.64.0.0/10",
            "2001:db8::/32",
            "fd12:3456::/32",
            "fd00:200::2",
        ] {
            assert!(ok(entry), "{entry}");
        }
        assert!(judge("fc00::/7", &MinPrefix { v4: 8, v6: 7 }).is_ok());
    }
}
