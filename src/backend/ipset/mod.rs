//! The ipset backend: the allowlist lives in two `hash:net` ipsets, `<set_v4>` (`family inet`)
//! and `<set_v6>` (`family inet6`), for hosts whose firewall is iptables rules rather than
//! nftables. The sets are spoken to over netlink in ipset's own protocol (`proto.rs`: no `ipset`
//! program); `cmd.rs` runs the iptables programs and maps their errors; `iptables.rs` keeps the
//! optional enforcement chain.
//!
//! A `hash:net` set holds CIDR prefixes, possibly overlapping, and no `/0`; the engine thinks in
//! ranges. So a read aggregates what the set holds and remembers the exact prefixes, and an
//! apply sends the prefix-level difference of the ranges it touches (`/0` as two `/1`, see
//! [`touched`]). ipset has no transactions: each family's change is a temporary set swapped in,
//! or one batch of element messages with its exact inverse at hand, and a failure in the second
//! family takes the first one's change back (see `change`). A set that does not exist is
//! [`BackendError::Missing`].

use std::collections::BTreeSet;
use std::io;
use std::time::Instant;

use tracing::{debug, info, warn};

mod cmd;
mod iptables;
mod owned;
mod proto;

pub use iptables::{ENFORCE_CHAIN, enforce_rules, hook_of};

use cmd::Tools;
use proto::{Af, Batch, Cmd, FLAG_EXIST, Listing};

use super::{Backend, BackendError, Family};
use crate::config::{Enforce, IpsetConfig};
use crate::ownership::{Footprint, Object, Teardown};
use crate::prefixes::{Addr, AllowSet, Delta, Diff, Range, Ranges};

/// Above this many prefix operations in one family, a change is made by filling a temporary set
/// and swapping it in rather than element by element in the live set: a failure then costs
/// nothing (and a rollback of thousands of elements is avoided), and rebuilding a set of that
/// order costs about as much as editing it.
const FULL_REPLACE_OPS: usize = 4096;

impl Family {
    fn af(self) -> Af {
        match self {
            Family::V4 => Af::Inet,
            Family::V6 => Af::Inet6,
        }
    }

    /// ipset's name of the family.
    fn ipset_family(self) -> &'static str {
        self.af().name()
    }

    fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }
}

/// A stored prefix `(network, length)`, host order.
type Prefix<A> = (A, u8);

/// An address as the ipset protocol carries it (network byte order).
trait IpsetAddr: Addr {
    const FAMILY: Family;
    const BYTES: usize;
    type Be: AsRef<[u8]>;
    fn to_be(self) -> Self::Be;
    fn from_be(b: &[u8]) -> Self;
}

impl IpsetAddr for u32 {
    const FAMILY: Family = Family::V4;
    const BYTES: usize = 4;
    type Be = [u8; 4];
    fn to_be(self) -> [u8; 4] {
        self.to_be_bytes()
    }
    fn from_be(b: &[u8]) -> u32 {
        u32::from_be_bytes(b.try_into().expect("4 bytes"))
    }
}

impl IpsetAddr for u128 {
    const FAMILY: Family = Family::V6;
    const BYTES: usize = 16;
    type Be = [u8; 16];
    fn to_be(self) -> [u8; 16] {
        self.to_be_bytes()
    }
    fn from_be(b: &[u8]) -> u128 {
        u128::from_be_bytes(b.try_into().expect("16 bytes"))
    }
}

/// `prefixes` as the protocol's elements.
fn elements<A: IpsetAddr>(prefixes: &[Prefix<A>]) -> impl Iterator<Item = (A::Be, u8)> + '_ {
    prefixes.iter().map(|&(a, l)| (a.to_be(), l))
}

/// The prefixes a `hash:net` set must hold for `ranges`: minimal CIDR prefixes, with a `/0`
/// (which ipset refuses) as its two `/1` halves. Sorted, unique.
fn storable<A: Addr>(ranges: &Ranges<A>) -> Vec<Prefix<A>> {
    let mut out = Vec::with_capacity(ranges.len());
    for (a, len) in ranges.to_prefixes() {
        if len == 0 {
            out.push((a, 1));
            out.push((Range::from_prefix(A::MAX, 1).start, 1));
        } else {
            out.push((a, len));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The `maxelem` to build a set with when it must hold `count` prefixes but the configured
/// `maxelem` is too small: a quarter of headroom, rounded up to a power of two, so that growth
/// is rare.
fn grown_maxelem(count: usize) -> u32 {
    let want = count.saturating_add(count / 4).next_power_of_two();
    u32::try_from(want).unwrap_or(u32::MAX)
}

/// A hash sized for `count` entries up front saves the kernel the rehashes of growing from 1024.
fn hashsize_for(count: usize) -> u32 {
    (count / 2).next_power_of_two().clamp(1024, 1 << 20) as u32
}

/// The temporary set used to replace `name` (`<name>_t4`/`_t6`, truncated to ipset's 31
/// characters). Reserved like the set names themselves.
fn temp_name(name: &str, family: Family) -> String {
    let keep = name.len().min(proto::MAXNAMELEN - 1 - 3);
    format!("{}_t{}", &name[..keep], family.suffix())
}

/// Why set `name` as the kernel lists it cannot hold `family`'s allowlist, if it cannot, with
/// the fix.
fn foreign(l: &Listing, name: &str, family: Family) -> Option<BackendError> {
    let create = format!("ipset create {name} hash:net family {}", family.ipset_family());
    let (why, fix) = if l.type_name != "hash:net" || l.family != family.ipset_family() {
        (
            format!("is {} family {}, not hash:net family {}", l.type_name, l.family, family.ipset_family()),
            format!("recreate it with `{create}`, or configure another set name"),
        )
    } else if !l.extra.is_empty() {
        (
            format!("was created with `{}`, which allowsync does not manage", l.extra.join(" ")),
            format!("recreate it as a plain `{create}`, or configure another set name"),
        )
    } else {
        return None;
    };
    Some(BackendError::Foreign { object: set_object(name), why, fix })
}

/// One family's set as last read: the exact prefixes it holds and its `maxelem`.
#[derive(Debug, Clone)]
struct Live<A> {
    prefixes: Vec<Prefix<A>>,
    ranges: Ranges<A>,
    maxelem: u32,
}

impl<A: Addr> Live<A> {
    fn new(mut prefixes: Vec<Prefix<A>>, maxelem: u32) -> Self {
        prefixes.sort_unstable();
        prefixes.dedup();
        let ranges = Ranges::aggregate(prefixes.iter().map(|&(a, l)| Range::from_prefix(a, l)));
        Live { prefixes, ranges, maxelem }
    }
}

/// One family's change, computed from the ranges the diff touches: the prefixes to add and to
/// delete, and what the set holds afterwards.
#[derive(Debug)]
struct Change<A> {
    add: Vec<Prefix<A>>,
    del: Vec<Prefix<A>>,
    next: Live<A>,
}

/// `x + 1`, or `x` at the top of the address space.
fn succ<A: Addr>(x: A) -> A {
    x.checked_succ().unwrap_or(x)
}

/// Whether two ranges overlap or are adjacent.
fn touch<A: Addr>(a: &Range<A>, b: &Range<A>) -> bool {
    a.start <= succ(b.end) && b.start <= succ(a.end)
}

/// The change that `delta` (against the aggregated ranges of `live`) makes to the prefixes
/// `live` holds, looking only at the ranges it touches: `None` when it does not fit `live` (a
/// removal that is not one of its ranges, an addition overlapping what stays).
///
/// The windows are the delta's ranges widened to every range of `live` they overlap or adjoin,
/// merged where they touch. No range of `live` or of the result crosses a window's edge (the
/// ranges of `live` are canonical, so none adjoins another; a result range is a chain of kept
/// and added pieces that touch, each kept piece touching an addition), so inside a window the
/// prefixes held can be replaced by the result's without looking elsewhere.
fn touched<A: Addr>(live: &Live<A>, delta: &Delta<A>) -> Option<Change<A>> {
    // The engine's deltas are sorted; the lookups below need them to be.
    let sorted = |v: &[Range<A>]| -> Vec<Range<A>> {
        let mut v = v.to_vec();
        if !v.is_sorted() {
            v.sort_unstable();
        }
        v
    };
    let delta = &Delta { remove: sorted(&delta.remove), add: sorted(&delta.add) };
    let old = live.ranges.as_slice();
    if delta.remove.iter().any(|r| old.binary_search(r).is_err()) {
        return None;
    }
    let mut seeds: Vec<Range<A>> = delta.remove.iter().chain(&delta.add).copied().collect();
    seeds.sort_unstable();
    let mut windows: Vec<Range<A>> = Vec::new();
    for s in seeds {
        let mut w = s;
        let i = old.partition_point(|o| succ(o.end) < s.start);
        for o in old[i..].iter().take_while(|o| o.start <= succ(s.end)) {
            w.start = w.start.min(o.start);
            w.end = w.end.max(o.end);
        }
        windows.push(w);
    }
    windows.sort_unstable();
    let mut merged: Vec<Range<A>> = Vec::with_capacity(windows.len());
    for w in windows {
        match merged.last_mut() {
            Some(l) if touch(l, &w) => l.end = l.end.max(w.end),
            _ => merged.push(w),
        }
    }
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let mut prefixes = Vec::with_capacity(live.prefixes.len() + delta.add.len());
    let mut ranges = Vec::with_capacity(old.len() + delta.add.len());
    let (mut pi, mut ri) = (0, 0);
    for w in merged {
        let in_w = |start: A| start >= w.start && start <= w.end;
        // What the window holds now, prefixes and ranges.
        let p_lo = pi + live.prefixes[pi..].partition_point(|p| p.0 < w.start);
        let p_hi = p_lo + live.prefixes[p_lo..].partition_point(|p| in_w(p.0));
        let r_lo = ri + old[ri..].partition_point(|r| r.start < w.start);
        let r_hi = r_lo + old[r_lo..].partition_point(|r| in_w(r.start));
        // What it holds afterwards: the ranges kept and the ones added, which must not overlap.
        let mut next: Vec<Range<A>> =
            old[r_lo..r_hi].iter().filter(|r| delta.remove.binary_search(r).is_err()).copied().collect();
        let a_lo = delta.add.partition_point(|r| r.start < w.start);
        let a_hi = a_lo + delta.add[a_lo..].partition_point(|r| in_w(r.start));
        next.extend_from_slice(&delta.add[a_lo..a_hi]);
        next.sort_unstable();
        if next.windows(2).any(|p| p[1].start <= p[0].end) {
            return None;
        }
        let next = Ranges::aggregate(next);
        let want = storable(&next);
        let have = &live.prefixes[p_lo..p_hi];
        sorted_delta(have, &want, &mut add, &mut del);
        prefixes.extend_from_slice(&live.prefixes[pi..p_lo]);
        prefixes.extend_from_slice(&want);
        ranges.extend_from_slice(&old[ri..r_lo]);
        ranges.extend_from_slice(next.as_slice());
        (pi, ri) = (p_hi, r_hi);
    }
    prefixes.extend_from_slice(&live.prefixes[pi..]);
    ranges.extend_from_slice(&old[ri..]);
    // `want` is sorted, but overlapping prefixes of an operator's set may interleave with it
    // at a window's edge only by start; sorting an almost sorted list costs a pass.
    prefixes.sort_unstable();
    prefixes.dedup();
    let next = Live { prefixes, ranges: Ranges::aggregate(ranges), maxelem: live.maxelem };
    Some(Change { add, del, next })
}

/// Appends to `add` what sorted, unique `want` has and `have` lacks, to `del` the reverse.
fn sorted_delta<A: Ord + Copy>(have: &[A], want: &[A], add: &mut Vec<A>, del: &mut Vec<A>) {
    let (mut i, mut j) = (0, 0);
    while i < have.len() || j < want.len() {
        match (have.get(i), want.get(j)) {
            (Some(h), Some(w)) if h == w => {
                i += 1;
                j += 1;
            }
            (Some(h), Some(w)) if h < w => {
                del.push(*h);
                i += 1;
            }
            (Some(h), None) => {
                del.push(*h);
                i += 1;
            }
            (_, Some(w)) => {
                add.push(*w);
                j += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
}

/// A change already made to one family's set during an apply, and how to take it back.
enum Done {
    /// Elements added to and deleted from the live set; `undo` is the inverse.
    Edited { set: String, undo: Batch },
    /// `tmp` (now holding the old contents) was swapped with `set`.
    Swapped { set: String, tmp: String },
}

/// The [`Backend`] for ipset (+ iptables for enforcement).
#[derive(Debug)]
pub struct IpsetBackend {
    set_v4: String,
    set_v6: String,
    maxelem: u32,
    enforce: Option<Enforce>,
    tools: Tools,
    /// What the last read (or our own apply since) saw: the prefixes `apply` diffs against.
    known: Option<(Live<u32>, Live<u128>)>,
    /// What the state file recorded (see `owned.rs`).
    recorded: Footprint,
    /// The ipsets that are allowsync's: created by it, as the state file records or this process
    /// saw. An ipset cannot carry a mark, so this record is all there is.
    owned_sets: BTreeSet<String>,
    /// The enforcement chains that are allowsync's (see `iptables.rs`).
    owned_chains: BTreeSet<Object>,
}

impl IpsetBackend {
    /// A backend for the sets of `config`. With `enforce`, finds the iptables programs now, so
    /// a missing one is reported at start with the package to install. The sets themselves need
    /// no program: they are the kernel's, spoken to over netlink. Nothing is sent to the kernel
    /// before [`Backend::ensure`].
    pub fn new(config: &IpsetConfig) -> Result<Self, BackendError> {
        let tools = Tools::find(config.enforce.is_some())?;
        Ok(IpsetBackend {
            set_v4: config.set_v4.clone(),
            set_v6: config.set_v6.clone(),
            maxelem: config.maxelem,
            enforce: config.enforce.clone(),
            tools,
            known: None,
            recorded: Footprint::default(),
            owned_sets: BTreeSet::new(),
            owned_chains: BTreeSet::new(),
        })
    }

    fn set_name(&self, family: Family) -> &str {
        match family {
            Family::V4 => &self.set_v4,
            Family::V6 => &self.set_v6,
        }
    }

    /// The header of set `name` (no members), `None` when it does not exist.
    fn header(&self, name: &str) -> Result<Option<Listing>, BackendError> {
        proto::list(name, false, "list set", &set_object(name))
    }

    /// Destroys set `name`.
    fn destroy(&self, name: &str) -> Result<(), BackendError> {
        let mut b = Batch::new();
        b.named(Cmd::Destroy, name);
        proto::exchange(b, "destroy set", &set_object(name))
    }

    /// Reads one family's set: its header (checked) and its exact prefixes.
    fn read_family<A: IpsetAddr>(&self) -> Result<Live<A>, BackendError> {
        self.read_named(self.set_name(A::FAMILY))
    }

    /// Reads set `name` as one of `A`'s family, from the kernel's binary listing.
    fn read_named<A: IpsetAddr>(&self, name: &str) -> Result<Live<A>, BackendError> {
        let object = set_object(name);
        let Some(l) = proto::list(name, true, "list set", &object)? else {
            return Err(BackendError::Missing { object });
        };
        if let Some(e) = foreign(&l, name, A::FAMILY) {
            return Err(e);
        }
        // `nomatch` or other per-entry options change what the set matches in ways allowsync
        // does not model: refuse rather than guess.
        if let Some(odd) = &l.odd {
            return Err(BackendError::Foreign {
                object,
                why: format!(
                    "holds the entry `{odd}`, which allowsync does not manage (plain prefixes only)"
                ),
                fix: "remove that entry, or configure another set name".into(),
            });
        }
        if l.addrs.len() != l.cidrs.len() * A::BYTES {
            return Err(BackendError::Kernel {
                op: "list set",
                object,
                cause: io::Error::new(io::ErrorKind::InvalidData, "members of another family in the listing"),
            });
        }
        let prefixes =
            l.addrs.chunks_exact(A::BYTES).zip(&l.cidrs).map(|(a, &c)| (A::from_be(a), c)).collect();
        Ok(Live::new(prefixes, l.maxelem))
    }

    fn read_both(&self) -> Result<(Live<u32>, Live<u128>), BackendError> {
        Ok((self.read_family::<u32>()?, self.read_family::<u128>()?))
    }

    /// Makes sure a stale temporary set (left by a crash) is gone; refuses to touch a set of
    /// that name that is not a plain `hash:net` of the family.
    fn clear_temp(&self, family: Family) -> Result<String, BackendError> {
        let tmp = temp_name(self.set_name(family), family);
        if let Some(h) = self.header(&tmp)? {
            if let Some(e) = foreign(&h, &tmp, family) {
                return Err(e);
            }
            warn!(set = %tmp, "destroying a temporary set left by an interrupted replace");
            self.destroy(&tmp)?;
        }
        Ok(tmp)
    }

    /// Creates set `name` of `A`'s family holding `prefixes`, in one `sendmsg`. When the kernel
    /// refuses an element, the new set is destroyed again and the refusal returned.
    fn create_filled<A: IpsetAddr>(
        &self,
        name: &str,
        prefixes: &[Prefix<A>],
        maxelem: u32,
    ) -> Result<(), BackendError> {
        let (af, object) = (A::FAMILY.af(), set_object(name));
        let revision = proto::revision(af, "create set", &object)?;
        let mut b = Batch::new();
        b.create(name, af, revision, hashsize_for(prefixes.len()), maxelem);
        b.many(Cmd::Add, name, 0, elements(prefixes));
        let outcome = b.send().map_err(|e| proto::io_error("fill set", &object, e))?;
        if let Some(&(seq, errno)) = outcome.refused.first() {
            // The first message is the create: a refused create leaves nothing to destroy.
            if seq > 1 {
                if let Err(d) = self.destroy(name) {
                    debug!(set = %name, error = %d, "set not destroyed after a refused fill");
                }
            }
            return Err(proto::error(if seq == 1 { "create set" } else { "fill set" }, &object, errno));
        }
        Ok(())
    }

    /// Builds `prefixes` into a temporary set of `maxelem` and swaps it with the live set. The
    /// temporary set, holding the old contents afterwards, is returned for the caller to destroy
    /// (or swap back). A failure before the swap leaves the live set untouched.
    fn replace<A: IpsetAddr>(&self, prefixes: &[Prefix<A>], maxelem: u32) -> Result<Done, BackendError> {
        let family = A::FAMILY;
        let set = self.set_name(family).to_string();
        let tmp = self.clear_temp(family)?;
        self.create_filled::<A>(&tmp, prefixes, maxelem)?;
        let mut b = Batch::new();
        b.swap(&set, &tmp);
        if let Err(e) = proto::exchange(b, "swap sets", &set_object(&set)) {
            if let Err(d) = self.destroy(&tmp) {
                debug!(set = %tmp, error = %d, "temporary set not destroyed");
            }
            return Err(e);
        }
        Ok(Done::Swapped { set, tmp })
    }

    /// Sends every addition then every removal to the live set, one message each, all in one
    /// `sendmsg`, and checks every acknowledgement. When the kernel refuses any, exactly the
    /// messages it carried out are taken back and the first refusal is returned.
    fn edit<A: IpsetAddr>(&self, add: &[Prefix<A>], del: &[Prefix<A>]) -> Result<Done, BackendError> {
        let set = self.set_name(A::FAMILY).to_string();
        let object = set_object(&set);
        let mut b = Batch::new();
        for (a, l) in elements(add) {
            b.one(Cmd::Add, &set, a.as_ref(), l);
        }
        for (a, l) in elements(del) {
            b.one(Cmd::Del, &set, a.as_ref(), l);
        }
        // The inverse frees room first: delete what was added, then re-add what was removed.
        // `FLAG_EXIST` makes an element already in its old state no error: the inverse is
        // about the state it restores.
        let inverse = |done: &dyn Fn(usize) -> bool| {
            let mut u = Batch::new();
            let added: Vec<Prefix<A>> =
                add.iter().enumerate().filter(|(i, _)| done(*i)).map(|(_, p)| *p).collect();
            let removed: Vec<Prefix<A>> =
                del.iter().enumerate().filter(|(i, _)| done(add.len() + *i)).map(|(_, p)| *p).collect();
            u.many(Cmd::Del, &set, FLAG_EXIST, elements(&added));
            u.many(Cmd::Add, &set, FLAG_EXIST, elements(&removed));
            u
        };
        let (first, undo) = match b.send() {
            Ok(outcome) if outcome.refused.is_empty() => {
                return Ok(Done::Edited { set: set.clone(), undo: inverse(&|_| true) });
            }
            Ok(outcome) => {
                let refused: BTreeSet<u32> = outcome.refused.iter().map(|&(seq, _)| seq).collect();
                let (_, errno) = outcome.refused[0];
                (proto::error("update set", &object, errno), inverse(&|i| !refused.contains(&(i as u32 + 1))))
            }
            // The outcome is unknown: take back everything (what never took effect is no error).
            Err(e) => (proto::io_error("update set", &object, e), inverse(&|_| true)),
        };
        match proto::exchange(undo, "roll back set", &object) {
            Ok(()) => {
                warn!(set = %set, error = %first, "the kernel refused part of the change; what it applied was taken back");
                Err(first)
            }
            Err(r) => Err(partly_changed(&object, &first, &r)),
        }
    }

    /// Changes one family's set as `change` says. Returns `None` when nothing changes. ipset
    /// has no transactions (every element is its own operation), so the change takes one of
    /// two paths:
    ///
    /// - **full replace** (the set's `maxelem` must grow or change, the change is big — more
    ///   than [`FULL_REPLACE_OPS`] prefix operations, e.g. a first sync — or adds would pass
    ///   `maxelem` before the removals free room): a temporary set [`temp_name`] is created and
    ///   filled (one `sendmsg`), then swapped with the live set (atomic in the kernel: packets
    ///   see either the old or the new set, never a half-filled one), and the old contents (now
    ///   in the temporary set) are destroyed. A failure before the swap destroys the temporary
    ///   set and leaves the live set untouched;
    /// - **incremental** (everything else): one message per element, **additions first, then
    ///   removals**, in one `sendmsg`. A `hash:net` set may hold overlapping prefixes, so adding
    ///   first means an address allowed before and after the change (say `10.0.0.0/24` widened
    ///   to `/23`) is never dropped in between, and the additions are checked against `maxelem`
    ///   before sending. Every element comes from typed addresses, so only the kernel can refuse
    ///   one (set full because someone filled it behind our back, an element added or removed
    ///   behind our back, set destroyed, out of memory). If it does, exactly the elements it
    ///   did add or delete are taken back, which restores the previous contents, and the
    ///   original error is returned. Only if that rollback fails too is the set left partly
    ///   changed; the error says so and the next read shows the truth.
    fn change<A: IpsetAddr>(&self, live: &Live<A>, change: &Change<A>) -> Result<Option<Done>, BackendError> {
        let (add, del, target) = (&change.add, &change.del, &change.next.prefixes);
        if add.is_empty() && del.is_empty() {
            return Ok(None);
        }
        let set = self.set_name(A::FAMILY);
        let ops = add.len() + del.len();
        let peak = live.prefixes.len() + add.len();
        let needed =
            if target.len() > self.maxelem as usize { grown_maxelem(target.len()) } else { self.maxelem };
        // Keep a set that was grown earlier and still has room; otherwise build one of `needed`.
        // An operator's set keeps the size it was given: only its elements are allowsync's.
        let maxelem = if !self.owned_sets.contains(set) {
            if target.len() > live.maxelem as usize {
                return Err(BackendError::Foreign {
                    object: set_object(set),
                    why: format!(
                        "holds at most {} entries (maxelem {}), and the allowlist needs {}; allowsync does not resize a set it did not create",
                        live.maxelem,
                        live.maxelem,
                        target.len()
                    ),
                    fix: "recreate it with a larger maxelem".into(),
                });
            }
            live.maxelem
        } else if target.len() <= live.maxelem as usize && live.maxelem >= self.maxelem {
            live.maxelem
        } else {
            needed
        };
        let started = Instant::now();
        let done = if maxelem != live.maxelem || ops > FULL_REPLACE_OPS || peak > live.maxelem as usize {
            if maxelem > self.maxelem && maxelem != live.maxelem {
                warn!(
                    set,
                    prefixes = target.len(),
                    configured_maxelem = self.maxelem,
                    maxelem,
                    "the allowlist needs more entries than maxelem allows: replacing the set with a larger one (raise backend.ipset.maxelem to silence this)"
                );
            }
            let d = self.replace(target, maxelem)?;
            info!(
                set,
                prefixes = target.len(),
                added = add.len(),
                removed = del.len(),
                maxelem,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ipset replaced by swap"
            );
            d
        } else {
            let d = self.edit(add, del)?;
            info!(
                set,
                added = add.len(),
                removed = del.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ipset updated in place"
            );
            d
        };
        Ok(Some(done))
    }

    /// Takes back a change made earlier in the same apply.
    fn undo(&self, done: Done) -> Result<Option<Done>, BackendError> {
        match done {
            Done::Edited { set, undo } => {
                proto::exchange(undo, "roll back set", &set_object(&set)).map(|()| None)
            }
            Done::Swapped { set, tmp } => {
                let mut b = Batch::new();
                b.swap(&set, &tmp);
                proto::exchange(b, "swap sets back", &set_object(&set))?;
                Ok(Some(Done::Swapped { set, tmp }))
            }
        }
    }

    /// Destroys the old contents after a successful swap (best effort: a leftover is cleared
    /// before the next replace).
    fn finish(&self, done: Done) {
        if let Done::Swapped { tmp, .. } = done {
            if let Err(e) = self.destroy(&tmp) {
                warn!(set = %tmp, error = %e, "old set contents not destroyed after the swap");
            }
        }
    }

    /// Creates a missing set; rebuilds one whose `maxelem` no longer fits the configuration.
    fn ensure_set<A: IpsetAddr>(&mut self) -> Result<Option<String>, BackendError> {
        let family = A::FAMILY;
        let name = self.set_name(family).to_string();
        let Some(h) = self.header(&name)? else {
            // Created with the contents of the set it replaces, if the configuration moved.
            let seed = self.seed::<A>();
            self.owned_sets.insert(name.clone());
            self.create_filled::<A>(&name, &seed, self.maxelem.max(grown_maxelem(seed.len())))?;
            return Ok(Some(name));
        };
        if let Some(e) = foreign(&h, &name, family) {
            return Err(e);
        }
        if !self.owned_sets.contains(&name) {
            debug!(set = %name, "an ipset allowsync did not create: only its elements are managed");
            return Ok(None);
        }
        let name = name.as_str();
        // Raised in the configuration: rebuild now. Lowered (or grown earlier and no longer
        // needed): shrink once the contents fit with a quarter to spare, so that a list hovering
        // around maxelem does not rebuild back and forth.
        let raise = h.maxelem < self.maxelem;
        let shrink = h.maxelem > self.maxelem;
        if raise || shrink {
            let live = self.read_family::<A>()?;
            let n = live.prefixes.len();
            let target = if n > self.maxelem as usize { grown_maxelem(n) } else { self.maxelem };
            let fits = n + n / 4 <= self.maxelem as usize;
            if target > h.maxelem || (shrink && fits && target < h.maxelem) {
                info!(
                    set = name,
                    from = h.maxelem,
                    to = target,
                    prefixes = n,
                    "changing the set's maxelem by replacing it"
                );
                let done = self.replace(&live.prefixes, target)?;
                self.finish(done);
            }
        }
        Ok(None)
    }
}

/// A refused change whose rollback failed too: the set holds part of it.
fn partly_changed(object: &str, first: &BackendError, rollback: &BackendError) -> BackendError {
    BackendError::Kernel {
        op: "update set",
        object: object.to_string(),
        cause: io::Error::other(format!(
            "{first}; rolling back failed too ({rollback}): the set holds part of the change until the next sync"
        )),
    }
}

fn set_object(name: &str) -> String {
    format!("ipset {name}")
}

impl Backend for IpsetBackend {
    fn name(&self) -> &'static str {
        "ipset"
    }

    /// Creates missing sets (and rebuilds one whose `maxelem` the configuration changed); the
    /// enforcement chain is [`Backend::enforce`]'s. An existing set of another type, family or
    /// options is [`BackendError::Foreign`] and never changed; both sets are checked before the
    /// first change.
    fn ensure(&mut self) -> Result<(), BackendError> {
        // The first contact: no ip_set in the kernel, or no CAP_NET_ADMIN, is said plainly.
        proto::probe()?;
        for family in Family::BOTH {
            let name = self.set_name(family);
            if let Some(h) = self.header(name)? {
                if let Some(e) = foreign(&h, name, family) {
                    return Err(e);
                }
            }
        }
        let created = [self.ensure_set::<u32>()?, self.ensure_set::<u128>()?];
        let created: Vec<String> = created.into_iter().flatten().collect();
        if !created.is_empty() {
            info!(created = ?created, enforce = self.enforce.is_some(), "ipsets ensured");
        }
        // A rebuilt set is not what we last read.
        self.known = None;
        Ok(())
    }

    /// Cheap enough to run every few seconds: the sets' headers (no members listed)
    /// and, with `enforce`, `iptables -S` / `ip6tables -S`. A set whose entry count is not the
    /// number of prefixes allowsync last read or wrote there (flushed, or edited behind its
    /// back) is named too.
    fn missing(&mut self) -> Result<Vec<String>, BackendError> {
        let mut out = Vec::new();
        let known = self.known.as_ref().map(|(v4, v6)| [v4.prefixes.len(), v6.prefixes.len()]);
        for (i, family) in Family::BOTH.into_iter().enumerate() {
            let name = self.set_name(family);
            match (self.header(name)?.map(|h| h.elements as usize), known) {
                (None, _) => out.push(set_object(name)),
                (Some(n), Some(k)) if n != k[i] => out.push(format!(
                    "the entries of {} ({n} where allowsync wrote {})",
                    set_object(name),
                    k[i]
                )),
                _ => {}
            }
        }
        out.extend(self.missing_enforcement()?);
        Ok(out)
    }

    /// The *aggregated* ranges of whatever prefixes the sets hold (`Ranges::aggregate`); the
    /// exact prefixes are remembered for the next apply.
    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let started = Instant::now();
        let (v4, v6) = self.read_both()?;
        let set = AllowSet { v4: v4.ranges.clone(), v6: v6.ranges.clone() };
        debug!(
            v4_prefixes = v4.prefixes.len(),
            v6_prefixes = v6.prefixes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "read ipsets"
        );
        self.known = Some((v4, v6));
        Ok(set)
    }

    /// Does not send the range diff as such: works out, from the ranges the diff touches only
    /// ([`touched`]), which prefixes of the set go and which come (`/0` split), and sends those.
    /// A diff that does not apply to what was last read (an exact removal missing) means the
    /// engine diffed against another picture: the sets are read again, and if it still does not
    /// apply the result is [`BackendError::Conflict`]. A set that does not exist is
    /// [`BackendError::Missing`].
    ///
    /// The two families are two sets, so an apply is up to two kernel operations; when the
    /// second fails, the first is undone (inverse elements, or swapping the old set back in:
    /// the old set is only destroyed once both families are done), so an apply is
    /// all-or-nothing across families too, except when an undo itself fails.
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        if diff.is_empty() {
            return Ok(());
        }
        // The diff was computed against a read; the prefixes of that read are the ones to
        // change. When it does not fit what we remember, look again.
        let changes =
            |k: &(Live<u32>, Live<u128>)| Some((touched(&k.0, &diff.v4)?, touched(&k.1, &diff.v6)?));
        let (known, (c4, c6)) = match self.known.take().and_then(|k| changes(&k).map(|c| (k, c))) {
            Some(found) => found,
            None => {
                let k = self.read_both()?;
                let Some(c) = changes(&k) else {
                    return Err(BackendError::Conflict {
                        op: "apply diff",
                        object: format!("ipsets {} and {}", self.set_v4, self.set_v6),
                        detail: "a range to remove is not in the set (it changed since it was read)".into(),
                    });
                };
                (k, c)
            }
        };
        let done4 = self.change(&known.0, &c4)?;
        let done6 = match self.change(&known.1, &c6) {
            Ok(d) => d,
            Err(e) => {
                // All or nothing across the two sets: take the IPv4 change back.
                if let Some(d) = done4 {
                    match self.undo(d) {
                        Ok(swapped_back) => swapped_back.into_iter().for_each(|d| self.finish(d)),
                        Err(u) => return Err(partly_changed(&set_object(&self.set_v4), &e, &u)),
                    }
                }
                return Err(e);
            }
        };
        // Remember what the sets now hold, unless a swap may have changed a maxelem: then the
        // next read learns it.
        let swapped = [&done4, &done6].iter().any(|d| matches!(d, Some(Done::Swapped { .. })));
        for d in [done4, done6].into_iter().flatten() {
            self.finish(d);
        }
        if !swapped {
            self.known = Some((c4.next, c6.next));
        }
        Ok(())
    }

    /// Installs (or, without `enforce`, removes) the enforcement chain, once the sets are there;
    /// then destroys the ipsets an earlier configuration created that this one no longer uses
    /// (no rule of ours refers to them any more).
    fn enforce(&mut self) -> Result<(), BackendError> {
        self.ensure_enforcement()?;
        self.remove_stale_sets();
        Ok(())
    }

    /// Both sets, and with `enforce` the chains of both iptables (in the scope's table).
    fn managed(&self) -> Vec<Object> {
        let mut out =
            vec![Object::Ipset { name: self.set_v4.clone() }, Object::Ipset { name: self.set_v6.clone() }];
        if let Some(e) = &self.enforce {
            out.extend(Family::BOTH.map(|f| iptables::chain_of(f, e.scope)));
        }
        out
    }

    fn set_recorded(&mut self, recorded: &Footprint) {
        self.adopt_record(recorded);
    }

    fn footprint(&self) -> Option<Footprint> {
        Some(self.current_footprint())
    }

    /// Removes the jumps and the enforcement chains (iptables and ip6tables, every scope's
    /// table) first, then the sets allowsync created and any temporary set: the kernel refuses
    /// to destroy a set a rule still uses. A chain of that name that allowsync did not write is
    /// left alone, and so is an ipset it did not create (emptied: only its elements were
    /// allowsync's).
    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        self.known = None;
        self.remove_everything()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_space_is_stored_as_two_halves() {
        let all = Ranges::aggregate([Range { start: 0u32, end: u32::MAX }]);
        assert_eq!(storable(&all), [(0, 1), (0x8000_0000, 1)]);
        let all6 = Ranges::aggregate([Range { start: 0u128, end: u128::MAX }]);
        assert_eq!(storable(&all6), [(0, 1), (1 << 127, 1)]);
        let some = Ranges::aggregate([Range { start: 1u32, end: 6 }]);
        assert_eq!(storable(&some), [(1, 32), (2, 31), (4, 31), (6, 32)]);
    }

    #[test]
    fn listings_are_judged() {
        let l = |t: &str, f: &str, extra: &[&str]| Listing {
            type_name: t.into(),
            family: f.into(),
            maxelem: 65536,
            extra: extra.iter().map(|e| e.to_string()).collect(),
            ..Listing::default()
        };
        assert!(foreign(&l("hash:net", "inet", &[]), "s", Family::V4).is_none());
        let e = foreign(&l("hash:net", "inet", &[]), "s", Family::V6).unwrap().to_string();
        assert_eq!(
            e,
            "ipset s is hash:net family inet, not hash:net family inet6: recreate it with `ipset create s hash:net family inet6`, or configure another set name"
        );
        let t = foreign(&l("hash:net", "inet6", &["timeout 0", "counters", "comment"]), "s", Family::V6);
        assert!(t.unwrap().to_string().contains("`timeout 0 counters comment`"));
        let ip = foreign(&l("hash:ip", "inet", &[]), "s", Family::V4).unwrap().to_string();
        assert!(ip.contains("is hash:ip family inet"));
    }

    fn r(start: u32, end: u32) -> Range<u32> {
        Range { start, end }
    }

    /// `touched` against the whole-set computation it replaces, on sets with neighbours,
    /// merges, splits and overlapping operator prefixes.
    #[test]
    fn the_touched_windows_give_what_the_whole_set_would() {
        let check = |held: Vec<Prefix<u32>>, delta: Delta<u32>| {
            let live = Live::new(held, 1 << 20);
            let c = touched(&live, &delta).expect("the delta fits");
            let whole = storable(&Ranges::aggregate(live.ranges.apply(&delta).unwrap().iter().copied()));
            assert_eq!(c.next.prefixes, whole, "{delta:?}");
            assert_eq!(
                c.next.ranges,
                Ranges::aggregate(whole.iter().map(|&(a, l)| Range::from_prefix(a, l)))
            );
            let mut expect_add: Vec<_> =
                whole.iter().filter(|p| !live.prefixes.contains(p)).copied().collect();
            let mut expect_del: Vec<_> =
                live.prefixes.iter().filter(|p| !whole.contains(p)).copied().collect();
            let (mut add, mut del) = (c.add.clone(), c.del.clone());
            for v in [&mut expect_add, &mut expect_del, &mut add, &mut del] {
                v.sort_unstable();
            }
            assert_eq!((add, del), (expect_add, expect_del), "{delta:?}");
        };
        let hosts: Vec<Prefix<u32>> = (0..50).map(|i| (i * 4, 32)).collect();
        // A host removed, one added in a gap, one added next to a held one (merging).
        check(hosts.clone(), Delta { remove: vec![r(8, 8)], add: vec![r(10, 10), r(13, 13)] });
        // A range grown on both sides (a removal and a wider addition), across two held hosts.
        check(hosts.clone(), Delta { remove: vec![r(16, 16), r(20, 20)], add: vec![r(15, 21)] });
        // Adds that join two held ranges into one.
        check(vec![(0, 30), (8, 30)], Delta { remove: vec![r(0, 3), r(8, 11)], add: vec![r(0, 11)] });
        // An operator's overlapping prefixes: 10.0.0.0/24 and 10.0.0.0/25, then narrowed.
        let ten = 0x0a00_0000;
        check(
            vec![(ten, 24), (ten, 25)],
            Delta { remove: vec![r(ten, ten + 255)], add: vec![r(ten, ten + 127)] },
        );
        // The whole space, to a part and back.
        check(vec![(0, 1), (1 << 31, 1)], Delta { remove: vec![r(0, u32::MAX)], add: vec![r(5, 9)] });
        check(vec![(5, 32)], Delta { remove: vec![r(5, 5)], add: vec![r(0, u32::MAX)] });
        // Untouched ranges stay as they were, however they were stored (the whole-set
        // computation would have dropped the redundant 0.0.0.1/32).
        let live = Live::new(vec![(0, 31), (1, 32), (100, 32)], 1024);
        let c = touched(&live, &Delta { remove: vec![r(100, 100)], add: vec![] }).unwrap();
        assert_eq!((c.add, c.del, c.next.prefixes), (vec![], vec![(100, 32)], vec![(0, 31), (1, 32)]));
    }

    #[test]
    fn a_delta_that_does_not_fit_is_refused() {
        let live = Live::new(vec![(0, 32), (8, 32)], 1024);
        assert!(touched(&live, &Delta { remove: vec![r(1, 1)], add: vec![] }).is_none(), "not held");
        assert!(touched(&live, &Delta { remove: vec![], add: vec![r(7, 9)] }).is_none(), "overlaps 8");
    }

    #[test]
    fn growth_leaves_headroom_and_temp_names_fit() {
        assert_eq!(grown_maxelem(100_000), 131_072);
        assert_eq!(grown_maxelem(200_000), 262_144);
        assert_eq!(temp_name("allowsync_v4", Family::V4), "allowsync_v4_t4");
        let long = "a".repeat(31);
        assert_eq!(temp_name(&long, Family::V6).len(), 31);
        assert_ne!(temp_name(&long, Family::V6), temp_name(&long, Family::V4));
    }
}
