//! The ipset backend: the allowlist lives in two `hash:net` ipsets, `<set_v4>` (`family inet`)
//! and `<set_v6>` (`family inet6`), for hosts whose firewall is iptables rules rather than
//! nftables. `cmd.rs` runs the programs and maps their errors; `iptables.rs` keeps the optional
//! enforcement chain.
//!
//! A `hash:net` set holds CIDR prefixes, possibly overlapping, and no `/0`; the engine thinks in
//! ranges. So a read aggregates what the set holds and remembers the exact prefixes, and an
//! apply sends the prefix-level difference to its target (`/0` as two `/1`). `ipset restore` is
//! not atomic: each family's change is a temporary set swapped in, or one incremental restore
//! with its exact inverse at hand, and a failure in the second family takes the first one's
//! change back (see `change`). A set that does not exist is [`BackendError::Missing`].

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use tracing::{debug, info, warn};

mod cmd;
mod iptables;
mod owned;

pub use iptables::{ENFORCE_CHAIN, enforce_rules, hook_of};

use cmd::{Output, Tools, run};

use super::{Backend, BackendError, Family};
use crate::config::{Enforce, IpsetConfig};
use crate::ownership::{Footprint, Object, Teardown};
use crate::prefixes::{Addr, AllowSet, Delta, Diff, Range, Ranges};

/// Above this many prefix operations in one family, a change is made by filling a temporary set
/// and swapping it in rather than line by line in the live set: a failure then costs nothing
/// (and a rollback of thousands of lines is avoided), and rebuilding a set of that order costs
/// about as much as editing it (measured: 100k prefixes in about 2 s).
const FULL_REPLACE_OPS: usize = 4096;

impl Family {
    /// ipset's name of the family.
    fn ipset_family(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
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

/// An address as ipset writes and reads it.
trait IpsetAddr: Addr {
    const FAMILY: Family;
    fn format(p: Prefix<Self>) -> String;
    fn parse(s: &str) -> Option<Prefix<Self>>;
}

impl IpsetAddr for u32 {
    const FAMILY: Family = Family::V4;
    fn format((a, len): Prefix<u32>) -> String {
        format!("{}/{len}", Ipv4Addr::from(a))
    }
    fn parse(s: &str) -> Option<Prefix<u32>> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse().ok()?),
            None => (s, 32),
        };
        (len <= 32).then_some(())?;
        Some((u32::from(a.parse::<Ipv4Addr>().ok()?), len))
    }
}

impl IpsetAddr for u128 {
    const FAMILY: Family = Family::V6;
    fn format((a, len): Prefix<u128>) -> String {
        format!("{}/{len}", Ipv6Addr::from(a))
    }
    fn parse(s: &str) -> Option<Prefix<u128>> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse().ok()?),
            None => (s, 128),
        };
        (len <= 128).then_some(())?;
        Some((u128::from(a.parse::<Ipv6Addr>().ok()?), len))
    }
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

/// The temporary set used to replace `name` (`<name>_t4`/`_t6`, truncated to ipset's 31
/// characters). Reserved like the set names themselves.
fn temp_name(name: &str, family: Family) -> String {
    let keep = name.len().min(31 - 3);
    format!("{}_t{}", &name[..keep], family.suffix())
}

/// What `ipset` says about an existing set: its `create` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    set_type: String,
    family: String,
    maxelem: u32,
    /// Options other than the ones every plain `hash:net` set has (`timeout`, `counters`,
    /// `comment`, `forceadd`, …): allowsync does not create sets with them.
    extra: Vec<String>,
}

impl Header {
    /// Parses `create <name> <type> family inet hashsize 1024 maxelem 65536 bucketsize 12 …`.
    fn parse(line: &str) -> Option<Header> {
        let mut t = line.split_whitespace();
        (t.next()? == "create").then_some(())?;
        let _name = t.next()?;
        let set_type = t.next()?.to_string();
        let (mut family, mut maxelem, mut extra) = (String::new(), 0, Vec::new());
        let with_value = ["family", "hashsize", "maxelem", "bucketsize", "initval", "timeout", "netmask"];
        while let Some(key) = t.next() {
            let value = if with_value.contains(&key) { t.next() } else { None };
            match (key, value) {
                ("family", Some(v)) => family = v.to_string(),
                ("maxelem", Some(v)) => maxelem = v.parse().ok()?,
                ("hashsize" | "bucketsize" | "initval", Some(_)) => {}
                (k, Some(v)) => extra.push(format!("{k} {v}")),
                (k, None) => extra.push(k.to_string()),
            }
        }
        Some(Header { set_type, family, maxelem, extra })
    }

    /// Why set `name` with this header cannot hold `family`'s allowlist, if it cannot, with
    /// the fix.
    fn foreign(&self, name: &str, family: Family) -> Option<BackendError> {
        let create = format!("ipset create {name} hash:net family {}", family.ipset_family());
        let (why, fix) = if self.set_type != "hash:net" || self.family != family.ipset_family() {
            (
                format!(
                    "is {} family {}, not hash:net family {}",
                    self.set_type,
                    self.family,
                    family.ipset_family()
                ),
                format!("recreate it with `{create}`, or configure another set name"),
            )
        } else if !self.extra.is_empty() {
            (
                format!("was created with `{}`, which allowsync does not manage", self.extra.join(" ")),
                format!("recreate it as a plain `{create}`, or configure another set name"),
            )
        } else {
            return None;
        };
        Some(BackendError::Foreign { object: set_object(name), why, fix })
    }
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

/// A change already made to one family's set during an apply, and how to take it back.
enum Done {
    /// Lines sent to the live set; `undo` is the inverse script.
    Edited { set: String, undo: String },
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
    /// A backend for the sets of `config`. Finds the `ipset` program (and with `enforce` the
    /// iptables programs) now, so a missing one is reported at start with the package to
    /// install. Nothing is sent to the kernel before [`Backend::ensure`].
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

    fn ipset(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        op: &'static str,
        object: &str,
    ) -> Result<Output, BackendError> {
        run(&self.tools.ipset, args, stdin, op, object)
    }

    /// The header of set `name`, `None` when it does not exist.
    fn header(&self, name: &str) -> Result<Option<Header>, BackendError> {
        match self.ipset(&["-t", "-o", "save", "list", name], None, "list set", &set_object(name)) {
            Ok(out) => {
                let line = out.stdout.lines().next().unwrap_or_default();
                Header::parse(line).map(Some).ok_or_else(|| BackendError::Kernel {
                    op: "list set",
                    object: set_object(name),
                    cause: io::Error::new(io::ErrorKind::InvalidData, format!("unexpected header {line:?}")),
                })
            }
            Err(BackendError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How many entries set `name` holds (`ipset -t list`, no members listed), `None` when it
    /// does not exist.
    fn entries(&self, name: &str) -> Result<Option<usize>, BackendError> {
        let out = match self.ipset(&["-t", "list", name], None, "list set", &set_object(name)) {
            Ok(out) => out,
            Err(BackendError::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let count =
            out.stdout.lines().find_map(|l| l.strip_prefix("Number of entries:")?.trim().parse().ok());
        count.map(Some).ok_or_else(|| BackendError::Kernel {
            op: "list set",
            object: set_object(name),
            cause: io::Error::new(io::ErrorKind::InvalidData, "no \"Number of entries\" in `ipset -t list`"),
        })
    }

    /// Reads one family's set: its header (checked) and its exact prefixes.
    fn read_family<A: IpsetAddr>(&self) -> Result<Live<A>, BackendError> {
        self.read_named(self.set_name(A::FAMILY))
    }

    /// Reads set `name` as one of `A`'s family.
    fn read_named<A: IpsetAddr>(&self, name: &str) -> Result<Live<A>, BackendError> {
        let object = set_object(name);
        let out = self.ipset(&["-o", "save", "list", name], None, "list set", &object)?;
        let mut lines = out.stdout.lines();
        let header = lines.next().and_then(Header::parse).ok_or_else(|| BackendError::Kernel {
            op: "list set",
            object: object.clone(),
            cause: io::Error::new(io::ErrorKind::InvalidData, "no create line in `ipset list -o save`"),
        })?;
        if let Some(e) = header.foreign(name, A::FAMILY) {
            return Err(e);
        }
        let mut prefixes = Vec::new();
        for line in lines {
            let mut t = line.split_whitespace();
            let entry = match (t.next(), t.next(), t.next(), t.next()) {
                (Some("add"), Some(_), Some(cidr), None) => A::parse(cidr),
                _ => None,
            };
            match entry {
                Some(p) => prefixes.push(p),
                // `nomatch` or other per-entry options change what the set matches in ways
                // allowsync does not model: refuse rather than guess.
                None => {
                    return Err(BackendError::Foreign {
                        object,
                        why: format!(
                            "holds the entry `{line}`, which allowsync does not manage (plain prefixes only)"
                        ),
                        fix: "remove that entry, or configure another set name".into(),
                    });
                }
            }
        }
        Ok(Live::new(prefixes, header.maxelem))
    }

    fn read_both(&self) -> Result<(Live<u32>, Live<u128>), BackendError> {
        Ok((self.read_family::<u32>()?, self.read_family::<u128>()?))
    }

    /// Makes sure a stale temporary set (left by a crash) is gone; refuses to touch a set of
    /// that name that is not a plain `hash:net` of the family.
    fn clear_temp(&self, family: Family) -> Result<String, BackendError> {
        let tmp = temp_name(self.set_name(family), family);
        if let Some(h) = self.header(&tmp)? {
            if let Some(e) = h.foreign(&tmp, family) {
                return Err(e);
            }
            warn!(set = %tmp, "destroying a temporary set left by an interrupted replace");
            self.ipset(&["destroy", &tmp], None, "destroy set", &set_object(&tmp))?;
        }
        Ok(tmp)
    }

    /// Builds `prefixes` into a temporary set of `maxelem` and swaps it with the live set. The
    /// temporary set, holding the old contents afterwards, is returned for the caller to destroy
    /// (or swap back). A failure before the swap leaves the live set untouched.
    fn replace<A: IpsetAddr>(&self, prefixes: &[Prefix<A>], maxelem: u32) -> Result<Done, BackendError> {
        let family = A::FAMILY;
        let set = self.set_name(family).to_string();
        let tmp = self.clear_temp(family)?;
        // A hash sized for the load up front saves the rehashes of growing from 1024.
        let hashsize = (prefixes.len() / 2).next_power_of_two().clamp(1024, 1 << 20);
        let mut script = String::with_capacity(64 + prefixes.len() * 24);
        let _ = writeln!(
            script,
            "create {tmp} hash:net family {} hashsize {hashsize} maxelem {maxelem}",
            family.ipset_family()
        );
        for &p in prefixes {
            let _ = writeln!(script, "add {tmp} {}", A::format(p));
        }
        let filled =
            self.ipset(&["restore"], Some(script.as_bytes()), "fill temporary set", &set_object(&tmp));
        let swapped =
            filled.and_then(|_| self.ipset(&["swap", &set, &tmp], None, "swap sets", &set_object(&set)));
        if let Err(e) = swapped {
            if let Err(d) = self.ipset(&["destroy", &tmp], None, "destroy set", &set_object(&tmp)) {
                debug!(set = %tmp, error = %d, "temporary set not destroyed");
            }
            return Err(e);
        }
        Ok(Done::Swapped { set, tmp })
    }

    /// Sends `add` then `del` lines to the live set in one `ipset restore -exist`; on failure
    /// sends the inverse and returns the error.
    fn edit<A: IpsetAddr>(&self, add: &[Prefix<A>], del: &[Prefix<A>]) -> Result<Done, BackendError> {
        let set = self.set_name(A::FAMILY).to_string();
        let object = set_object(&set);
        let lines = |verb: &str, ps: &[Prefix<A>], out: &mut String| {
            for &p in ps {
                let _ = writeln!(out, "{verb} {set} {}", A::format(p));
            }
        };
        let (mut script, mut undo) = (String::new(), String::new());
        lines("add", add, &mut script);
        lines("del", del, &mut script);
        // The inverse frees room first: delete what we added, then re-add what we removed.
        lines("del", add, &mut undo);
        lines("add", del, &mut undo);
        if let Err(e) = self.ipset(&["-exist", "restore"], Some(script.as_bytes()), "update set", &object) {
            return Err(
                match self.ipset(&["-exist", "restore"], Some(undo.as_bytes()), "roll back set", &object) {
                    Ok(_) => {
                        warn!(set = %set, error = %e, "ipset restore failed part way; the lines it applied were rolled back");
                        e
                    }
                    Err(r) => partly_changed(&object, &e, &r),
                },
            );
        }
        Ok(Done::Edited { set, undo })
    }

    /// Changes one family's set from `live` to `target` prefixes. Returns `None` when nothing
    /// changes. `ipset restore` is not atomic (a failure leaves the lines before it applied),
    /// so the change takes one of two paths:
    ///
    /// - **full replace** (the set's `maxelem` must grow or change, the change is big — more
    ///   than [`FULL_REPLACE_OPS`] prefix operations, e.g. a first sync — or adds would pass
    ///   `maxelem` before the removals free room): a temporary set [`temp_name`] is created and
    ///   filled by one `ipset restore`, then `ipset swap`ped with the live set (atomic in the
    ///   kernel: packets see either the old or the new set, never a half-filled one), and the
    ///   old contents (now in the temporary set) are destroyed. A failure before the swap
    ///   destroys the temporary set and leaves the live set untouched;
    /// - **incremental** (everything else): one `ipset restore -exist` with the **additions
    ///   first, then the removals**. A `hash:net` set may hold overlapping prefixes, so adding
    ///   first means an address allowed before and after the change (say `10.0.0.0/24` widened
    ///   to `/23`) is never dropped in between, and the additions are checked against `maxelem`
    ///   before sending. Every line is generated from typed addresses, so only the kernel can
    ///   refuse one (set full because someone filled it behind our back, set destroyed, out of
    ///   memory). If it does, the exact inverse script is sent (delete what we added, re-add
    ///   what we removed; `-exist` makes lines that never took effect no-ops, and every added
    ///   prefix was absent before, every removed one present), which restores the previous
    ///   contents, and the original error is returned. Only if that rollback fails too is the
    ///   set left partly changed; the error says so and the next read shows the truth.
    fn change<A: IpsetAddr>(
        &self,
        live: &Live<A>,
        target: &[Prefix<A>],
    ) -> Result<Option<Done>, BackendError> {
        let (add, del) = prefix_delta(&live.prefixes, target);
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
            let d = self.edit(&add, &del)?;
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
    fn undo(&self, done: &Done) -> Result<(), BackendError> {
        match done {
            Done::Edited { set, undo } => self
                .ipset(&["-exist", "restore"], Some(undo.as_bytes()), "roll back set", &set_object(set))
                .map(drop),
            Done::Swapped { set, tmp } => {
                self.ipset(&["swap", set, tmp], None, "swap sets back", &set_object(set)).map(drop)
            }
        }
    }

    /// Destroys the old contents after a successful swap (best effort: a leftover is cleared
    /// before the next replace).
    fn finish(&self, done: Done) {
        if let Done::Swapped { tmp, .. } = done {
            if let Err(e) = self.ipset(&["destroy", &tmp], None, "destroy set", &set_object(&tmp)) {
                warn!(set = %tmp, error = %e, "old set contents not destroyed after the swap");
            }
        }
    }

    /// Creates a missing set; rebuilds one whose `maxelem` no longer fits the configuration.
    fn ensure_set<A: IpsetAddr>(&mut self) -> Result<Option<String>, BackendError> {
        let family = A::FAMILY;
        let name = self.set_name(family).to_string();
        let object = set_object(&name);
        let Some(h) = self.header(&name)? else {
            // Created with the contents of the set it replaces, if the configuration moved.
            let seed = self.seed::<A>();
            let mut script = format!(
                "create {name} hash:net family {} maxelem {}\n",
                family.ipset_family(),
                self.maxelem.max(grown_maxelem(seed.len()))
            );
            for &p in &seed {
                let _ = writeln!(script, "add {name} {}", A::format(p));
            }
            self.owned_sets.insert(name.clone());
            self.ipset(&["restore"], Some(script.as_bytes()), "create set", &object)?;
            return Ok(Some(name));
        };
        if let Some(e) = h.foreign(&name, family) {
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

/// `(to add, to delete)` turning sorted, unique `current` into sorted, unique `target`.
fn prefix_delta<A: Ord + Copy>(current: &[A], target: &[A]) -> (Vec<A>, Vec<A>) {
    let cur: BTreeSet<A> = current.iter().copied().collect();
    let tgt: BTreeSet<A> = target.iter().copied().collect();
    (tgt.difference(&cur).copied().collect(), cur.difference(&tgt).copied().collect())
}

/// The ranges `live` holds with `delta` applied, if `delta` fits them (removals exact).
fn target_of<A: IpsetAddr>(live: &Live<A>, delta: &Delta<A>) -> Option<Vec<Prefix<A>>> {
    let next = live.ranges.apply(delta).ok()?;
    Some(storable(&Ranges::aggregate(next.iter().copied())))
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
        for family in Family::BOTH {
            let name = self.set_name(family);
            if let Some(h) = self.header(name)? {
                if let Some(e) = h.foreign(name, family) {
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

    /// Cheap enough to run every few seconds: the sets' headers (`ipset -t list`, no members)
    /// and, with `enforce`, `iptables -S` / `ip6tables -S`. A set whose entry count is not the
    /// number of prefixes allowsync last read or wrote there (flushed, or edited behind its
    /// back) is named too.
    fn missing(&mut self) -> Result<Vec<String>, BackendError> {
        let mut out = Vec::new();
        let known = self.known.as_ref().map(|(v4, v6)| [v4.prefixes.len(), v6.prefixes.len()]);
        for (i, family) in Family::BOTH.into_iter().enumerate() {
            let name = self.set_name(family);
            match (self.entries(name)?, known) {
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

    /// Does not send the range diff as such: applies it to the ranges last read, turns the
    /// result into prefixes ([`Ranges::to_prefixes`], `/0` split) and sends the prefix-level
    /// difference between what the set holds and that target. A diff that does not apply to what
    /// was last read (an exact removal missing) means the engine diffed against another picture:
    /// the sets are read again, and if it still does not apply the result is
    /// [`BackendError::Conflict`]. A set that does not exist is [`BackendError::Missing`].
    ///
    /// The two families are two sets, so an apply is up to two kernel operations; when the
    /// second fails, the first is undone (inverse script, or swapping the old set back in: the
    /// old set is only destroyed once both families are done), so an apply is all-or-nothing
    /// across families too, except when an undo itself fails.
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        if diff.is_empty() {
            return Ok(());
        }
        // The diff was computed against a read; the prefixes of that read are the ones to
        // change. When it does not fit what we remember, look again.
        let targets =
            |k: &(Live<u32>, Live<u128>)| Some((target_of(&k.0, &diff.v4)?, target_of(&k.1, &diff.v6)?));
        let known = match self.known.take() {
            Some(k) if targets(&k).is_some() => k,
            _ => self.read_both()?,
        };
        let Some((t4, t6)) = targets(&known) else {
            return Err(BackendError::Conflict {
                op: "apply diff",
                object: format!("ipsets {} and {}", self.set_v4, self.set_v6),
                detail: "a range to remove is not in the set (it changed since it was read)".into(),
            });
        };
        let done4 = self.change(&known.0, &t4)?;
        let done6 = match self.change(&known.1, &t6) {
            Ok(d) => d,
            Err(e) => {
                // All or nothing across the two sets: take the IPv4 change back.
                if let Some(d) = &done4 {
                    if let Err(u) = self.undo(d) {
                        return Err(partly_changed(&set_object(&self.set_v4), &e, &u));
                    }
                }
                if let Some(d) = done4 {
                    self.finish(d);
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
            self.known = Some((Live::new(t4, known.0.maxelem), Live::new(t6, known.1.maxelem)));
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
    fn prefixes_parse_and_print_like_ipset() {
        assert_eq!(u32::parse("10.0.0.1"), Some((0x0a00_0001, 32)));
        assert_eq!(u32::parse("10.0.0.0/8"), Some((0x0a00_0000, 8)));
        assert_eq!(u32::parse("10.0.0.0/33"), None);
        assert_eq!(u128::parse("2001:db8::/32"), Some((0x2001_0db8 << 96, 32)));
        assert_eq!(u128::format((1, 128)), "::1/128");
        assert_eq!(u32::format((0x0a00_0000, 8)), "10.0.0.0/8");
    }

    #[test]
    fn headers_are_parsed_and_judged() {
        let h = Header::parse(
            "create s hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1",
        )
        .unwrap();
        assert_eq!(h.maxelem, 65536);
        assert!(h.foreign("s", Family::V4).is_none());
        let e = h.foreign("s", Family::V6).unwrap().to_string();
        assert_eq!(
            e,
            "ipset s is hash:net family inet, not hash:net family inet6: recreate it with `ipset create s hash:net family inet6`, or configure another set name"
        );
        let t = Header::parse("create s hash:net family inet6 hashsize 1024 maxelem 65536 timeout 0 counters comment bucketsize 12 initval 0x1").unwrap();
        assert!(t.foreign("s", Family::V6).unwrap().to_string().contains("`timeout 0 counters comment`"));
        let ip = Header::parse("create s hash:ip family inet hashsize 1024 maxelem 65536").unwrap();
        assert!(ip.foreign("s", Family::V4).unwrap().to_string().contains("is hash:ip family inet"));
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
