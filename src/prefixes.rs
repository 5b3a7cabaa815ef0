//! The address model: what an allowlist *is*, independent of any source or firewall.
//!
//! An allowlist is, per address family, a sorted list of inclusive address ranges. Everything
//! else is a view of that:
//!
//! - sources give CIDR prefixes and single addresses ([`parse_entry`]); [`Ranges::aggregate`]
//!   turns any pile of them into the *canonical* form: sorted, non-overlapping and
//!   non-adjacent (overlaps and neighbours merged);
//! - nftables interval sets hold `[start, end + 1)` pairs ([`Range::interval_end`]);
//! - ipset and people want CIDR prefixes ([`Ranges::to_prefixes`]);
//! - a sync is a [`Delta`]: the exact ranges to delete and to insert, computed against what the
//!   kernel really holds ([`Ranges::delta_to`]).
//!
//! Why canonical ranges and not prefixes: nftables interval sets reject overlapping elements and
//! delete only exact intervals, so the only safe thing to send the kernel is a list in which no
//! two elements touch, and a diff by exact interval. Addresses are plain integers in host order
//! (`u32` for IPv4, `u128` for IPv6); backends convert to network byte order at the edge.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address family's address as an unsigned integer: `u32` for IPv4, `u128` for IPv6.
pub trait Addr: Copy + Ord + Eq + std::hash::Hash + fmt::Debug + Send + Sync + 'static {
    /// Number of bits in an address of this family.
    const BITS: u32;
    /// The highest address.
    const MAX: Self;
    /// `self + 1`, or `None` at the top of the address space.
    fn checked_succ(self) -> Option<Self>;
    /// `self - 1`, or `None` at zero.
    fn checked_pred(self) -> Option<Self>;
    /// The address of the prefix `self/len` with host bits cleared, and its last address.
    fn prefix_bounds(self, len: u8) -> (Self, Self);
    /// The longest prefix length `p` such that `self` is the first address of a `/p` block and
    /// that block ends at or before `end`.
    fn largest_block(self, end: Self) -> u8;
    /// The address as a standard library address.
    fn to_ip(self) -> IpAddr;
    /// The address as a number, to count and compare addresses of either family alike.
    fn to_u128(self) -> u128;
}

macro_rules! impl_addr {
    ($t:ty, $ip:ty) => {
        impl Addr for $t {
            const BITS: u32 = <$t>::BITS;
            const MAX: Self = <$t>::MAX;
            fn checked_succ(self) -> Option<Self> {
                self.checked_add(1)
            }
            fn checked_pred(self) -> Option<Self> {
                self.checked_sub(1)
            }
            fn prefix_bounds(self, len: u8) -> (Self, Self) {
                let host_bits = Self::BITS - u32::from(len);
                let host_mask = if host_bits == Self::BITS { <$t>::MAX } else { (1 << host_bits) - 1 };
                (self & !host_mask, self | host_mask)
            }
            fn largest_block(self, end: Self) -> u8 {
                // Host bits the start can give up (its alignment)...
                let align = if self == 0 { Self::BITS } else { self.trailing_zeros() };
                // ...and how many addresses are left up to `end`: a block of 2^k needs k <= log2(len).
                let span = end - self; // len - 1, so this cannot overflow at the full space
                let fit = if span == <$t>::MAX { Self::BITS } else { (span + 1).ilog2() };
                (Self::BITS - align.min(fit)) as u8
            }
            fn to_ip(self) -> IpAddr {
                IpAddr::from(<$ip>::from(self))
            }
            fn to_u128(self) -> u128 {
                u128::from(self)
            }
        }
    };
}
impl_addr!(u32, Ipv4Addr);
impl_addr!(u128, Ipv6Addr);

/// An inclusive range of addresses, `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range<A> {
    pub start: A,
    pub end: A,
}

impl<A: Addr> Range<A> {
    /// The range `start..=end`; `None` when `start > end`.
    pub fn new(start: A, end: A) -> Option<Self> {
        (start <= end).then_some(Range { start, end })
    }

    /// The addresses of the prefix `addr/len` (host bits of `addr` are ignored).
    pub fn from_prefix(addr: A, len: u8) -> Self {
        let (start, end) = addr.prefix_bounds(len);
        Range { start, end }
    }

    /// The nftables interval end: the first address past the range, which the kernel stores as
    /// an element flagged `NFT_SET_ELEM_INTERVAL_END`. `None` when the range reaches the top of
    /// the address space: such an interval has no end element.
    pub fn interval_end(&self) -> Option<A> {
        self.end.checked_succ()
    }

    /// The range of an nftables interval `[start, end_exclusive)`; `None` as the end means "to
    /// the top of the address space". `None` when the interval is empty.
    pub fn from_interval(start: A, end_exclusive: Option<A>) -> Option<Self> {
        match end_exclusive {
            None => Some(Range { start, end: A::MAX }),
            Some(e) => e.checked_pred().and_then(|end| Range::new(start, end)),
        }
    }

    /// Whether every address of `other` is in `self`.
    pub fn contains_range(&self, other: &Range<A>) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether `self` and `other` have an address in common.
    pub fn overlaps(&self, other: &Range<A>) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// How many addresses the range holds (`2^128` does not fit: the whole IPv6 space counts
    /// one less, which no guard can tell apart).
    pub fn size(&self) -> u128 {
        (self.end.to_u128() - self.start.to_u128()).saturating_add(1)
    }

    /// The minimal list of CIDR prefixes `(network, length)` that covers exactly this range.
    pub fn to_prefixes(&self) -> Vec<(A, u8)> {
        let mut out = Vec::new();
        self.for_each_prefix(|a, l| out.push((a, l)));
        out
    }

    fn for_each_prefix(&self, mut f: impl FnMut(A, u8)) {
        let mut start = self.start;
        loop {
            let len = start.largest_block(self.end);
            let (_, last) = start.prefix_bounds(len);
            f(start, len);
            if last >= self.end {
                return;
            }
            match last.checked_succ() {
                Some(next) => start = next,
                None => return,
            }
        }
    }

    /// The single prefix this range is, if it is one.
    pub fn as_prefix(&self) -> Option<(A, u8)> {
        let len = self.start.largest_block(self.end);
        (self.start.prefix_bounds(len).1 == self.end).then_some((self.start, len))
    }
}

impl<A: Addr> fmt::Display for Range<A> {
    /// A prefix prints as `10.0.0.0/24` (a single address as `10.0.0.1`), anything else as
    /// `10.0.0.1-10.0.0.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_prefix() {
            Some((a, len)) if u32::from(len) == A::BITS => write!(f, "{}", a.to_ip()),
            Some((a, len)) => write!(f, "{}/{}", a.to_ip(), len),
            None => write!(f, "{}-{}", self.start.to_ip(), self.end.to_ip()),
        }
    }
}

/// Ranges that overlap: a list read from the kernel or a state file that cannot be what an
/// interval set holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("overlapping ranges {first} and {second}")]
pub struct OverlapError {
    pub first: String,
    pub second: String,
}

/// A sorted list of pairwise disjoint ranges of one family.
///
/// Built by [`Ranges::aggregate`] it is also *canonical* (no two ranges adjacent). Built by
/// [`Ranges::from_disjoint`] (what the kernel holds) neighbours may touch: someone may have
/// added `10.0.0.0/25` and `10.0.0.128/25` as two elements, and the diff must remove exactly those.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ranges<A> {
    ranges: Vec<Range<A>>,
}

impl<A> Default for Ranges<A> {
    fn default() -> Self {
        Ranges { ranges: Vec::new() }
    }
}

/// What turns one [`Ranges`] into another in a single transaction: delete `remove`, then
/// insert `add`. Both lists are sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta<A> {
    pub remove: Vec<Range<A>>,
    pub add: Vec<Range<A>>,
}

impl<A> Default for Delta<A> {
    fn default() -> Self {
        Delta { remove: Vec::new(), add: Vec::new() }
    }
}

impl<A> Delta<A> {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

impl<A: Addr> Ranges<A> {
    /// The canonical form of any ranges: sorted, overlaps and neighbours merged.
    pub fn aggregate(input: impl IntoIterator<Item = Range<A>>) -> Self {
        let mut v: Vec<Range<A>> = input.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<Range<A>> = Vec::with_capacity(v.len());
        for r in v {
            if let Some(last) = out.last_mut() {
                // Merge when `r` overlaps `last` or starts right after it.
                let touches = match last.end.checked_succ() {
                    None => true, // `last` reaches the top: everything after is inside it
                    Some(next) => r.start <= next,
                };
                if touches {
                    if r.end > last.end {
                        last.end = r.end;
                    }
                    continue;
                }
            }
            out.push(r);
        }
        Ranges { ranges: out }
    }

    /// Ranges that must not overlap, but may touch: what an nftables interval set holds.
    pub fn from_disjoint(mut v: Vec<Range<A>>) -> Result<Self, OverlapError> {
        v.sort_unstable();
        if let Some(w) = v.windows(2).find(|w| w[1].start <= w[0].end) {
            return Err(OverlapError { first: w[0].to_string(), second: w[1].to_string() });
        }
        Ok(Ranges { ranges: v })
    }

    /// True when no two ranges touch: aggregating again would change nothing.
    pub fn is_canonical(&self) -> bool {
        self.ranges.windows(2).all(|w| w[0].end.checked_succ().is_some_and(|n| n < w[1].start))
    }

    pub fn as_slice(&self) -> &[Range<A>] {
        &self.ranges
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Range<A>> {
        self.ranges.iter()
    }

    /// Number of ranges (nftables interval elements, not addresses).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `addr` is in one of the ranges.
    pub fn contains(&self, addr: A) -> bool {
        self.covers(&Range { start: addr, end: addr })
    }

    /// Whether every address of `r` is in the union of the ranges.
    pub fn covers(&self, r: &Range<A>) -> bool {
        // The ranges are sorted and disjoint, but may touch: walk from the one holding r.start.
        let i = self.ranges.partition_point(|x| x.end < r.start);
        let mut need = r.start;
        for x in &self.ranges[i..] {
            if x.start > need {
                return false;
            }
            if x.end >= r.end {
                return true;
            }
            match x.end.checked_succ() {
                Some(n) => need = n,
                None => return true,
            }
        }
        false
    }

    /// The exact delta that turns `self` (what the kernel holds) into `desired`: every range of
    /// `self` that is not also a range of `desired` is removed, every range of `desired` that is
    /// not in `self` is added. Applied removals-first in one transaction it never creates an
    /// overlap, because `desired` is itself disjoint.
    pub fn delta_to(&self, desired: &Ranges<A>) -> Delta<A> {
        let (a, b) = (&self.ranges, &desired.ranges);
        let (mut i, mut j) = (0, 0);
        let mut d = Delta::default();
        while i < a.len() && j < b.len() {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    d.remove.push(a[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    d.add.push(b[j]);
                    j += 1;
                }
            }
        }
        d.remove.extend_from_slice(&a[i..]);
        d.add.extend_from_slice(&b[j..]);
        d
    }

    /// Applies a delta the way the kernel does: every removal must be an exact existing range
    /// (ENOENT otherwise) and no addition may overlap (EEXIST otherwise). Used by the in-memory
    /// backend and the tests.
    pub fn apply(&self, delta: &Delta<A>) -> Result<Self, ApplyError> {
        let mut v = self.ranges.clone();
        for r in &delta.remove {
            match v.binary_search(r) {
                Ok(i) => {
                    v.remove(i);
                }
                Err(_) => return Err(ApplyError::NotFound(r.to_string())),
            }
        }
        v.extend_from_slice(&delta.add);
        Ranges::from_disjoint(v).map_err(|e| ApplyError::Overlap(e.second))
    }

    /// The minimal CIDR prefixes covering exactly these ranges, in address order.
    pub fn to_prefixes(&self) -> Vec<(A, u8)> {
        let mut out = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            r.for_each_prefix(|a, l| out.push((a, l)));
        }
        out
    }

    /// The addresses of `self` that are not in `other`, as sorted, disjoint ranges: what moving
    /// from `other` to `self` adds to the allowlist.
    pub fn difference(&self, other: &Ranges<A>) -> Vec<Range<A>> {
        let o = &other.ranges;
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut from = Some(r.start);
            while let Some(s) = from {
                while j < o.len() && o[j].end < s {
                    j += 1;
                }
                match o.get(j) {
                    Some(x) if x.start <= r.end => {
                        if x.start > s {
                            out.push(Range { start: s, end: x.start.checked_pred().expect("x.start > s") });
                        }
                        // `x` may reach into the next range of `self`: keep it for that one.
                        from = if x.end >= r.end { None } else { x.end.checked_succ() };
                    }
                    _ => {
                        out.push(Range { start: s, end: r.end });
                        from = None;
                    }
                }
            }
        }
        out
    }

    /// The ranges not covered by `other`, as ranges of `self` (whole): used to list what a sync
    /// would take away from the allowlist.
    pub fn not_covered_by<'a>(&'a self, other: &'a Ranges<A>) -> impl Iterator<Item = &'a Range<A>> + 'a {
        self.ranges.iter().filter(move |r| !other.covers(r))
    }
}

/// Why applying a delta failed, in the kernel's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{0} is not in the set (ENOENT)")]
    NotFound(String),
    #[error("{0} overlaps an element of the set (EEXIST)")]
    Overlap(String),
}

/// An allowlist: the ranges of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowSet {
    pub v4: Ranges<u32>,
    pub v6: Ranges<u128>,
}

/// The change of both families in one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub v4: Delta<u32>,
    pub v6: Delta<u128>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
    /// Elements added, both families.
    pub fn added(&self) -> usize {
        self.v4.add.len() + self.v6.add.len()
    }
    /// Elements removed, both families.
    pub fn removed(&self) -> usize {
        self.v4.remove.len() + self.v6.remove.len()
    }
}

impl FromIterator<IpNet> for AllowSet {
    /// [`AllowSet::from_nets`].
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> Self {
        AllowSet::from_nets(nets)
    }
}

impl AllowSet {
    /// The canonical allowlist of any prefixes of either family.
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for n in nets {
            match n {
                IpNet::V4(n) => v4.push(Range::from_prefix(u32::from(n.network()), n.prefix_len())),
                IpNet::V6(n) => v6.push(Range::from_prefix(u128::from(n.network()), n.prefix_len())),
            }
        }
        AllowSet { v4: Ranges::aggregate(v4), v6: Ranges::aggregate(v6) }
    }

    /// The union of several allowlists, canonical.
    pub fn union<'a>(sets: impl IntoIterator<Item = &'a AllowSet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for s in sets {
            v4.extend_from_slice(s.v4.as_slice());
            v6.extend_from_slice(s.v6.as_slice());
        }
        AllowSet { v4: Ranges::aggregate(v4), v6: Ranges::aggregate(v6) }
    }

    /// The minimal CIDR prefixes of both families, IPv4 first.
    pub fn to_nets(&self) -> Vec<IpNet> {
        let v4 = self.v4.to_prefixes().into_iter().map(|(a, l)| {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).expect("prefix length within 0..=32"))
        });
        let v6 = self.v6.to_prefixes().into_iter().map(|(a, l)| {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).expect("prefix length within 0..=128"))
        });
        v4.chain(v6).collect()
    }

    /// The delta, per family, that turns `self` (the live set) into `desired`.
    pub fn diff_to(&self, desired: &AllowSet) -> Diff {
        Diff { v4: self.v4.delta_to(&desired.v4), v6: self.v6.delta_to(&desired.v6) }
    }

    /// Applies a diff with the kernel's rules (see [`Ranges::apply`]).
    pub fn apply(&self, diff: &Diff) -> Result<AllowSet, ApplyError> {
        Ok(AllowSet { v4: self.v4.apply(&diff.v4)?, v6: self.v6.apply(&diff.v6)? })
    }

    /// Number of ranges (interval elements), both families.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The ranges of `self`, printed, that are not fully inside `other`: what moving from
    /// `self` to `other` takes away from the allowlist. A range that is merely merged into a
    /// bigger one is not taken away.
    pub fn lost_in(&self, other: &AllowSet) -> Vec<String> {
        let v4 = self.v4.not_covered_by(&other.v4).map(ToString::to_string);
        let v6 = self.v6.not_covered_by(&other.v6).map(ToString::to_string);
        v4.chain(v6).collect()
    }
}

/// The state file and `fetch --json` store an allowlist as its CIDR prefixes, readable by people
/// and by other tools: `["10.0.0.0/24", "2001:db8::/48"]`.
impl Serialize for AllowSet {
    /// The same strings as [`AllowSet::to_nets`] prints. The state file holds every entry of
    /// every source and is written every cycle, so IPv4 prefixes (most of any list) are
    /// formatted by hand rather than through `fmt` (`format_v4_prefix`; byte-identical).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let (v4, v6) = (self.v4.to_prefixes(), self.v6.to_prefixes());
        let mut seq = s.serialize_seq(Some(v4.len() + v6.len()))?;
        let mut buf = [0u8; V4_PREFIX_MAX];
        for (a, l) in v4 {
            seq.serialize_element(format_v4_prefix(a, l, &mut buf))?;
        }
        for (a, l) in v6 {
            let net = Ipv6Net::new(Ipv6Addr::from(a), l).expect("prefix length within 0..=128");
            seq.serialize_element(&IpNet::V6(net))?;
        }
        seq.end()
    }
}

/// `255.255.255.255/32`.
const V4_PREFIX_MAX: usize = 18;

/// `a.b.c.d/len`, as `Ipv4Net`'s `Display` writes it.
fn format_v4_prefix(addr: u32, len: u8, buf: &mut [u8; V4_PREFIX_MAX]) -> &str {
    fn push_dec(buf: &mut [u8], at: &mut usize, v: u8) {
        if v >= 100 {
            buf[*at] = b'0' + v / 100;
            *at += 1;
        }
        if v >= 10 {
            buf[*at] = b'0' + (v / 10) % 10;
            *at += 1;
        }
        buf[*at] = b'0' + v % 10;
        *at += 1;
    }
    let mut at = 0;
    for (i, octet) in addr.to_be_bytes().into_iter().enumerate() {
        if i > 0 {
            buf[at] = b'.';
            at += 1;
        }
        push_dec(buf, &mut at, octet);
    }
    buf[at] = b'/';
    at += 1;
    push_dec(buf, &mut at, len);
    std::str::from_utf8(&buf[..at]).expect("ASCII digits, dots and a slash")
}

impl<'de> Deserialize<'de> for AllowSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(AllowSet::from_nets(Vec::<IpNet>::deserialize(d)?))
    }
}

/// An entry of a source list that was accepted, possibly after a correction worth a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub net: IpNet,
    /// Set when the entry had host bits set (`10.0.0.1/24`) and was masked to its network.
    pub masked_from: Option<IpNet>,
}

/// Why an entry of a source list is not an address or prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("empty entry")]
    Empty,
    #[error("not an IPv4 or IPv6 address or CIDR prefix")]
    Syntax,
    #[error("prefix length /{len} is out of range for {family} (0..={max})")]
    PrefixLength { len: String, family: &'static str, max: u8 },
}

/// Parses one entry of a source list: an IPv4 or IPv6 address or CIDR prefix, surrounding
/// whitespace ignored. A prefix with host bits set is masked to its network (the caller logs
/// [`Entry::masked_from`]); an IPv4-mapped or IPv4-compatible IPv6 address or prefix
/// (`::ffff:192.0.2.1`, `::192.0.2.1`) is the IPv4 address it maps, except `::` and `::1`, which
/// are IPv6's own unspecified and loopback addresses.
///
/// This is syntax only: whether the entry may be allowed is [`crate::admission::check`]'s call.
pub fn parse_entry(raw: &str) -> Result<Entry, EntryError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(EntryError::Empty);
    }
    let (addr, len) = match s.split_once('/') {
        None => {
            let a: IpAddr = s.parse().map_err(|_| EntryError::Syntax)?;
            (a, None)
        }
        Some((a, l)) => {
            let a: IpAddr = a.parse().map_err(|_| EntryError::Syntax)?;
            // Only plain decimal lengths: "/+8", "/08 " and the like are not CIDR.
            if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                return Err(EntryError::Syntax);
            }
            (a, Some(l))
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                return Err(EntryError::PrefixLength { len: l.to_string(), family, max });
            }
        },
    };
    let as_written = IpNet::new(addr, len).expect("length checked above");
    let net = unmap_v4(as_written.trunc());
    let masked_from = (as_written.addr() != as_written.network()).then_some(as_written);
    Ok(Entry { net, masked_from })
}

/// `::ffff:a.b.c.d/len` and `::a.b.c.d/len` (len >= 96) are the IPv4 prefix
/// `a.b.c.d/(len - 96)`; `::/128` and `::1/128` stay IPv6.
fn unmap_v4(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        let a = n.network();
        let compatible = u128::from(a) >> 32 == 0 && !(n.prefix_len() == 128 && u128::from(a) <= 1);
        let v4 = a.to_ipv4_mapped().or_else(|| compatible.then(|| Ipv4Addr::from(u128::from(a) as u32)));
        if let (Some(v4), true) = (v4, n.prefix_len() >= 96) {
            return IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("0..=32"));
        }
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;
    use allowsync_testkit::set;
    use proptest::prelude::*;

    fn shown(s: &AllowSet) -> Vec<String> {
        s.to_nets().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn aggregation_merges_overlaps_and_neighbours() {
        let s: AllowSet = set(["10.0.0.0/25", "10.0.0.128/25", "10.0.0.5", "10.0.2.0/24", "10.0.1.0/24"]);
        assert_eq!(s.v4.len(), 1);
        assert_eq!(shown(&s), ["10.0.0.0/23", "10.0.2.0/24"]);
        assert!(s.v4.is_canonical());
    }

    #[test]
    fn edges_of_the_address_space() {
        let s =
            set(["0.0.0.0/0", "255.255.255.255/32", "::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]);
        assert_eq!(shown(&s), ["0.0.0.0/0", "::/0"]);
        assert_eq!(s.v4.as_slice()[0].interval_end(), None);
        assert_eq!(s.v6.as_slice()[0].interval_end(), None);
        let top: AllowSet = set(["255.255.255.255"]);
        assert_eq!(top.v4.as_slice()[0], Range { start: u32::MAX, end: u32::MAX });
        assert_eq!(top.v4.as_slice()[0].interval_end(), None);
        assert_eq!(
            Range::<u32>::from_interval(u32::MAX, None),
            Some(Range { start: u32::MAX, end: u32::MAX })
        );
        assert_eq!(Range::<u32>::from_interval(5, Some(5)), None);
    }

    #[test]
    fn widening_a_prefix_replaces_the_interval() {
        let cur: AllowSet = set(["10.0.0.0/24"]);
        let want = set(["10.0.0.0/23"]);
        let d = cur.diff_to(&want);
        assert_eq!(d.v4.remove, cur.v4.as_slice());
        assert_eq!(d.v4.add, want.v4.as_slice());
        assert_eq!(cur.apply(&d).unwrap(), want);
        // Widening takes nothing away from the allowlist.
        assert!(cur.lost_in(&want).is_empty());
        assert_eq!(want.lost_in(&cur), ["10.0.0.0/23"]);
    }

    #[test]
    fn kernel_rules_are_enforced_by_apply() {
        let cur: AllowSet = set(["10.0.0.0/24"]);
        let bad_remove = Diff {
            v4: Delta { remove: set::<AllowSet>(["10.0.0.0/25"]).v4.as_slice().to_vec(), add: vec![] },
            ..Default::default()
        };
        assert!(matches!(cur.apply(&bad_remove), Err(ApplyError::NotFound(_))));
        let overlap = Diff {
            v4: Delta { remove: vec![], add: set::<AllowSet>(["10.0.0.7"]).v4.as_slice().to_vec() },
            ..Default::default()
        };
        assert!(matches!(cur.apply(&overlap), Err(ApplyError::Overlap(_))));
    }

    #[test]
    fn non_prefix_ranges_print_as_ranges_and_split_into_prefixes() {
        let r = Range::<u32> { start: 1, end: 6 };
        assert_eq!(r.to_string(), "0.0.0.1-0.0.0.6");
        assert_eq!(r.to_prefixes(), [(1, 32), (2, 31), (4, 31), (6, 32)]);
    }

    #[test]
    fn entries_are_trimmed_masked_and_unmapped() {
        assert_eq!(parse_entry(" 10.0.0.1 ").unwrap().net.to_string(), "10.0.0.1/32");
        let e = parse_entry("10.0.0.1/24").unwrap();
        assert_eq!(e.net.to_string(), "10.0.0.0/24");
        assert_eq!(e.masked_from.unwrap().to_string(), "10.0.0.1/24");
        assert_eq!(parse_entry("::ffff:192.0.2.1").unwrap().net.to_string(), "192.0.2.1/32");
        assert_eq!(parse_entry("::ffff:192.0.2.0/120").unwrap().net.to_string(), "192.0.2.0/24");
        assert_eq!(parse_entry("2001:db8::1/48").unwrap().net.to_string(), "2001:db8::/48");
        assert_eq!(parse_entry("183.192.202.0/25").unwrap().masked_from, None);
        // IPv4-compatible too; `::` and `::1` are IPv6's own addresses and stay IPv6.
        assert_eq!(parse_entry("::192.0.2.1").unwrap().net.to_string(), "192.0.2.1/32");
        assert_eq!(parse_entry("::ffff:0.0.0.0/96").unwrap().net.to_string(), "0.0.0.0/0");
        assert_eq!(parse_entry("::/96").unwrap().net.to_string(), "0.0.0.0/0");
        assert_eq!(parse_entry("::2").unwrap().net.to_string(), "0.0.0.2/32");
        assert_eq!(parse_entry("::").unwrap().net.to_string(), "::/128");
        assert_eq!(parse_entry("::1").unwrap().net.to_string(), "::1/128");
        assert_eq!(parse_entry("::/127").unwrap().net.to_string(), "0.0.0.0/31");
        assert_eq!(parse_entry("::/95").unwrap().net.to_string(), "::/95");
        assert_eq!(parse_entry("::1:0:0/96").unwrap().net.to_string(), "::1:0:0/96");
    }

    #[test]
    fn difference_is_what_a_move_adds() {
        let cur: AllowSet = set(["10.0.0.0/25", "10.0.1.0/24", "10.0.3.7"]);
        let want: AllowSet = set(["10.0.0.0/22"]);
        let d: Vec<String> = want.v4.difference(&cur.v4).iter().map(ToString::to_string).collect();
        assert_eq!(d, ["10.0.0.128/25", "10.0.2.0-10.0.3.6", "10.0.3.8-10.0.3.255"]);
        assert_eq!(want.v4.difference(&cur.v4).iter().map(Range::size).sum::<u128>(), 1024 - 128 - 256 - 1);
        assert!(cur.v4.difference(&want.v4).is_empty());
        let all: AllowSet = set(["0.0.0.0/0", "::/0"]);
        assert_eq!(all.v4.as_slice()[0].size(), 1 << 32);
        assert_eq!(all.v6.as_slice()[0].size(), u128::MAX);
    }

    #[test]
    fn bad_entries_are_rejected_with_a_reason() {
        assert_eq!(parse_entry("  "), Err(EntryError::Empty));
        for bad in
            ["10.0.0", "10.0.0.256", "hello", "10.0.0.0/", "10.0.0.0/+8", "1.2.3.4/24/1", "fe80::1%eth0"]
        {
            assert_eq!(parse_entry(bad), Err(EntryError::Syntax), "{bad}");
        }
        assert!(matches!(parse_entry("10.0.0.0/33"), Err(EntryError::PrefixLength { .. })));
        assert!(matches!(parse_entry("::/129"), Err(EntryError::PrefixLength { .. })));
    }

    #[test]
    fn serializes_as_prefixes() {
        let s = set(["10.0.0.0/24", "2001:db8::/48", "10.0.1.0/24"]);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"["10.0.0.0/23","2001:db8::/48"]"#);
        assert_eq!(serde_json::from_str::<AllowSet>(&j).unwrap(), s);
    }

    // ---- properties -------------------------------------------------------------------

    /// Ranges biased towards small spaces, so that overlaps and adjacency are common, plus the
    /// edges of the space.
    fn range_v4() -> impl Strategy<Value = Range<u32>> {
        prop_oneof![
            (0u32..64, 0u32..8).prop_map(|(s, l)| Range { start: s, end: s + l }),
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| Range::from_prefix(a, l)),
            Just(Range { start: u32::MAX, end: u32::MAX }),
            Just(Range { start: 0, end: u32::MAX }),
        ]
    }
    fn range_v6() -> impl Strategy<Value = Range<u128>> {
        prop_oneof![
            (0u128..64, 0u128..8).prop_map(|(s, l)| Range { start: s, end: s + l }),
            (u128::MAX - 64..=u128::MAX, 0u128..8)
                .prop_map(|(s, l)| Range { start: s, end: s.saturating_add(l) }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| Range::from_prefix(a, l)),
            Just(Range { start: 0, end: u128::MAX }),
        ]
    }

    /// Every address the input covers, tested on the probe points that matter: each range's
    /// ends and their neighbours.
    fn covered<A: Addr>(input: &[Range<A>], a: A) -> bool {
        input.iter().any(|r| r.start <= a && a <= r.end)
    }
    fn probes<A: Addr>(input: &[Range<A>]) -> Vec<A> {
        let mut p = Vec::new();
        for r in input {
            p.extend(
                [Some(r.start), Some(r.end), r.start.checked_pred(), r.end.checked_succ()]
                    .into_iter()
                    .flatten(),
            );
        }
        p
    }

    fn check_family<A: Addr>(input: Vec<Range<A>>, other: Vec<Range<A>>) -> Result<(), TestCaseError> {
        let agg = Ranges::aggregate(input.clone());
        // Covers exactly the input's addresses.
        for a in probes(&input).into_iter().chain(probes(agg.as_slice())) {
            prop_assert_eq!(covered(&input, a), agg.contains(a));
        }
        // Canonical and idempotent.
        prop_assert!(agg.is_canonical());
        prop_assert_eq!(Ranges::aggregate(agg.as_slice().to_vec()), agg.clone());
        // ranges -> prefixes -> ranges.
        let back = Ranges::aggregate(agg.to_prefixes().into_iter().map(|(a, l)| Range::from_prefix(a, l)));
        prop_assert_eq!(&back, &agg);
        for (a, l) in agg.to_prefixes() {
            prop_assert_eq!(a.prefix_bounds(l).0, a, "prefix has host bits");
        }
        // interval elements round-trip.
        for r in agg.iter() {
            prop_assert_eq!(Range::from_interval(r.start, r.interval_end()), Some(*r));
        }
        let b = Ranges::aggregate(other);
        // difference(a, b) is exactly the addresses of a that are not in b.
        let minus = Ranges::from_disjoint(agg.difference(&b)).expect("disjoint");
        prop_assert!(minus.is_canonical());
        for a in probes(agg.as_slice()).into_iter().chain(probes(b.as_slice())) {
            prop_assert_eq!(minus.contains(a), agg.contains(a) && !b.contains(a));
        }
        // diff(a, b) applied to a gives b, with kernel rules.
        let d = agg.delta_to(&b);
        prop_assert_eq!(agg.apply(&d).unwrap(), b.clone());
        prop_assert!(agg.delta_to(&agg).is_empty());
        Ok(())
    }

    proptest! {
        #[test]
        fn v4_prefixes_format_as_ipnet_does(addr in any::<u32>(), len in 0u8..=32) {
            let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
            let mut buf = [0u8; V4_PREFIX_MAX];
            prop_assert_eq!(format_v4_prefix(u32::from(net.network()), len, &mut buf), net.to_string());
        }

        #[test]
        fn serialized_sets_are_their_nets_printed(v4 in prop::collection::vec(range_v4(), 0..20), v6 in prop::collection::vec(range_v6(), 0..5)) {
            let set = AllowSet { v4: Ranges::aggregate(v4), v6: Ranges::aggregate(v6) };
            let want: Vec<String> = set.to_nets().iter().map(ToString::to_string).collect();
            prop_assert_eq!(serde_json::to_string(&set).unwrap(), serde_json::to_string(&want).unwrap());
        }

        #[test]
        fn v4_model(a in prop::collection::vec(range_v4(), 0..40), b in prop::collection::vec(range_v4(), 0..40)) {
            check_family(a, b)?;
        }

        #[test]
        fn v6_model(a in prop::collection::vec(range_v6(), 0..40), b in prop::collection::vec(range_v6(), 0..40)) {
            check_family(a, b)?;
        }

        /// Any prefix text ipnet can print parses back to the same canonical allowlist.
        #[test]
        fn entries_round_trip(a in prop::collection::vec((any::<u32>(), 0u8..=32), 0..20), b in prop::collection::vec((any::<u128>(), 0u8..=128), 0..20)) {
            let nets: Vec<IpNet> = a.iter().map(|&(x, l)| IpNet::V4(Ipv4Net::new(x.into(), l).unwrap()))
                .chain(b.iter().map(|&(x, l)| IpNet::V6(Ipv6Net::new(x.into(), l).unwrap()))).collect();
            let set = AllowSet::from_nets(nets.iter().copied());
            let reparsed = AllowSet::from_nets(nets.iter().map(|n| parse_entry(&n.to_string()).unwrap().net));
            // IPv4-mapped IPv6 prefixes become IPv4, so compare after the same unmapping.
            let unmapped = AllowSet::from_nets(nets.iter().map(|n| unmap_v4(n.trunc())));
            prop_assert_eq!(&reparsed, &unmapped);
            prop_assert_eq!(AllowSet::from_nets(set.to_nets()), set);
        }
    }
}
