//! Reading the kernel's state: tables, sets and chains ([`TableInfo`], [`SetInfo`],
//! [`ChainInfo`], with their comments: whether they are allowsync's), what a table holds, the
//! comments of a chain's rules (how `ensure` tells that the enforcement rules are the ones it
//! writes), the ruleset generation, and the sets' elements.
//!
//! Reading dumps both sets (`NFT_MSG_GETSETELEM`) between two reads of the ruleset generation;
//! a change in between or a dump the kernel flags as interrupted is a
//! [`BackendError::Conflict`] (read again), a missing table or set [`BackendError::Missing`]
//! (run `ensure` again, which recreates it). A missing set is never read as empty. The ranges are rebuilt exactly as the kernel
//! holds them (adjacent elements stay separate), because removals must name exact intervals.
//!
//! Interval encoding (kernel facts): a range `start..=end` is the element `start` plus the
//! element `end + 1` flagged `NFT_SET_ELEM_INTERVAL_END`; a range reaching the top of the address
//! space has no end element. Keys are in network byte order.

use std::io;

use tracing::debug;

use super::{Name, SetKeyAddr, kernel, nftnl};
use crate::backend::BackendError;
use crate::backend::netlink::{DumpInterrupted, NfSocket};
use crate::config::EnforceScope;
use crate::ownership::MARK;
use crate::prefixes::{Addr, Range, Ranges};

/// What matters about an existing table.
#[derive(Debug)]
pub(super) struct TableInfo {
    /// How many chains, sets, stateful objects and flowtables it holds (`NFTA_TABLE_USE`).
    pub(super) objects: u32,
    pub(super) comment: Option<String>,
}

/// What matters about an existing set.
#[derive(Debug)]
pub(super) struct SetInfo {
    pub(super) name: String,
    pub(super) key_type: u32,
    pub(super) key_len: u32,
    pub(super) flags: u32,
    pub(super) comment: Option<String>,
}

/// What matters about an existing chain.
#[derive(Debug)]
pub(super) struct ChainInfo {
    pub(super) table: String,
    pub(super) name: String,
    /// `None` for a regular (non-base) chain.
    pub(super) hook: Option<u32>,
    pub(super) priority: i32,
    pub(super) chain_type: String,
    pub(super) comment: Option<String>,
}

impl ChainInfo {
    /// The scope whose shape this chain has, if it has one of allowsync's enforcement chain
    /// shapes: `type filter hook prerouting priority mangle` (`host`), or `type filter hook
    /// input priority filter` (`local`, and every earlier version's chain).
    pub(super) fn enforcement_scope(&self) -> Option<EnforceScope> {
        if self.chain_type != "filter" {
            return None;
        }
        match (self.hook.map(|h| h as i32), self.priority) {
            (Some(libc::NF_INET_PRE_ROUTING), libc::NF_IP_PRI_MANGLE) => Some(EnforceScope::Host),
            (Some(libc::NF_INET_LOCAL_IN), libc::NF_IP_PRI_FILTER) => Some(EnforceScope::Local),
            _ => None,
        }
    }
}

/// Whether an object's comment makes it allowsync's ([`MARK`]).
pub(super) fn marked(comment: &Option<String>) -> bool {
    comment.as_deref() == Some(MARK)
}

impl std::fmt::Display for ChainInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hook {
            None => write!(f, "a regular chain"),
            Some(h) => {
                let hooks = ["prerouting", "input", "forward", "output", "postrouting"];
                match hooks.get(h as usize) {
                    Some(hook) => {
                        write!(f, "type {} hook {hook} priority {}", self.chain_type, self.priority)
                    }
                    None => write!(f, "type {} hook #{h} priority {}", self.chain_type, self.priority),
                }
            }
        }
    }
}

/// The chains and sets of a table, as one dump each.
#[derive(Debug, Default)]
pub(super) struct Contents {
    pub(super) chains: Vec<ChainInfo>,
    pub(super) sets: Vec<SetInfo>,
}

/// One object by name: `Ok(None)` when it (or its table) does not exist.
fn get_one<T>(
    sock: &NfSocket,
    request: &nftnl::Request,
    seq: u32,
    what: (&'static str, &Name),
    parse: impl Fn(&crate::backend::netlink::Message<'_>) -> io::Result<T>,
) -> Result<Option<T>, BackendError> {
    let mut info = None;
    match sock.request(request.bytes(), seq, |m| {
        info = Some(parse(m)?);
        Ok(())
    }) {
        Ok(()) => Ok(info),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(kernel(what.0, what.1.object.to_string(), e)),
    }
}

/// The table `t`, `None` when it does not exist.
pub(super) fn get_table(sock: &NfSocket, t: &Name) -> Result<Option<TableInfo>, BackendError> {
    let seq = sock.next_seq();
    let request = nftnl::table_request(seq, t.family, &t.table);
    get_one(sock, &request, seq, ("get table", t), nftnl::parse_table)
}

/// The set `s`, `None` when it (or its table) does not exist.
pub(super) fn get_set(sock: &NfSocket, s: &Name) -> Result<Option<SetInfo>, BackendError> {
    let seq = sock.next_seq();
    let request = nftnl::set_request(seq, s.family, &s.table, Some(&s.name));
    get_one(sock, &request, seq, ("get set", s), nftnl::parse_set)
}

/// The chain `c`, `None` when it (or its table) does not exist.
pub(super) fn get_chain(sock: &NfSocket, c: &Name) -> Result<Option<ChainInfo>, BackendError> {
    let seq = sock.next_seq();
    let request = nftnl::chain_request(seq, c.family, &c.table, Some(&c.name));
    get_one(sock, &request, seq, ("get chain", c), nftnl::parse_chain)
}

// From linux/netfilter/nf_tables.h (not in the libc crate).
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_USERDATA: u16 = 7;

/// The comments of chain `c`'s rules, in the chain's order (`None` for a rule without one);
/// empty when the chain (or its table) does not exist.
pub(super) fn rule_comments(sock: &NfSocket, c: &Name) -> Result<Vec<Option<String>>, BackendError> {
    let seq = sock.next_seq();
    let request = nftnl::rule_dump_request(seq, c.family, &c.table, &c.name);
    let chain = c.name.to_string_lossy();
    let mut out = Vec::new();
    let result = sock.request(request.bytes(), seq, |m| {
        // The kernel filters the dump by chain; a rule of another chain is not counted all the
        // same.
        if m.str_attr(4, NFTA_RULE_CHAIN).as_deref() == Some(&*chain) {
            let udata = m.attr(4, NFTA_RULE_USERDATA);
            out.push(udata.and_then(|u| nftnl::udata_comment(u, nftnl::UDATA_RULE_COMMENT)));
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(out),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) if DumpInterrupted::is(&e) => Err(BackendError::Conflict {
            op: "list rules",
            object: c.object.to_string(),
            detail: e.to_string(),
        }),
        Err(e) => Err(kernel("list rules", c.object.to_string(), e)),
    }
}

/// Every chain and set of table `t` (empty when it does not exist).
pub(super) fn contents(sock: &NfSocket, t: &Name) -> Result<Contents, BackendError> {
    let mut out = Contents::default();
    let table = t.table.to_string_lossy();
    let seq = sock.next_seq();
    let request = nftnl::chain_request(seq, t.family, &t.table, None);
    sock.request(request.bytes(), seq, |m| {
        let c = nftnl::parse_chain(m)?;
        if c.table == table {
            out.chains.push(c);
        }
        Ok(())
    })
    .map_err(|e| kernel("list chains", t.object.to_string(), e))?;
    let seq = sock.next_seq();
    let request = nftnl::set_request(seq, t.family, &t.table, None);
    match sock.request(request.bytes(), seq, |m| {
        out.sets.push(nftnl::parse_set(m)?);
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(kernel("list sets", t.object.to_string(), e)),
    }
    Ok(out)
}

/// Dumps set `s`'s elements and rebuilds its ranges, exactly as the kernel holds them. A set or
/// table that does not exist is [`BackendError::Missing`], naming the set.
pub(super) fn read_set<A: SetKeyAddr>(sock: &NfSocket, s: &Name) -> Result<Ranges<A>, BackendError> {
    let family = A::FAMILY;
    let object = s.object.to_string();
    let seq = sock.next_seq();
    let request = nftnl::set_elements_request(seq, s.family, &s.table, &s.name);
    let mut elements: Vec<(A, bool)> = Vec::new();
    let mut bad_key = None;
    let result = sock.request(request.bytes(), seq, |m| {
        nftnl::for_each_element(m, |key, end| match A::from_key(key) {
            Some(a) => elements.push((a, end)),
            None => bad_key = Some(key.len()),
        })
    });
    let unusable = |why: String| BackendError::Foreign {
        object: object.clone(),
        why,
        fix: "allowsync cannot read it as an allowlist".into(),
    };
    match result {
        Ok(()) => {}
        // No table or no set: not something to read as "empty" (an apply against it could
        // only fail); the caller says which is missing and whether ensure recreates it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(BackendError::Missing { object });
        }
        Err(e) if DumpInterrupted::is(&e) => {
            return Err(BackendError::Conflict { op: "list elements", object, detail: e.to_string() });
        }
        Err(e) => return Err(kernel("list elements", object, e)),
    }
    if let Some(len) = bad_key {
        return Err(unusable(format!("holds {len}-byte keys, not {}", family.type_name())));
    }
    let ranges = intervals_from_elements(elements).map_err(unusable)?;
    Ranges::from_disjoint(ranges).map_err(|e| unusable(format!("holds overlapping elements ({e})")))
}

/// The ruleset generation of the socket's network namespace (`NFT_MSG_GETGEN`).
pub(super) fn get_generation(sock: &NfSocket) -> Result<u32, BackendError> {
    let seq = sock.next_seq();
    let request = nftnl::generation_request(seq);
    let mut id = None;
    sock.request(request.bytes(), seq, |m| {
        id = Some(nftnl::parse_generation(m)?);
        Ok(())
    })
    .map_err(|e| kernel("get generation", "nf_tables".into(), e))?;
    id.ok_or_else(|| kernel("get generation", "nf_tables".into(), io::ErrorKind::UnexpectedEof.into()))
}

/// Rebuilds ranges from interval elements `(key, is_interval_end)` in any order (the kernel
/// dumps its rbtree from the highest key down).
///
/// Sorted by key with an end before a start of the same key (adjacent intervals `[a, k)` and
/// `[k, b)` hold both), each start pairs with the next end. A start with no end after it runs
/// to the top of the address space (that is how such a range is stored). An end with no open
/// start is skipped: older nft versions stored a lone "interval end" at `0.0.0.0`/`::` to mark
/// the gap below the first range, and it carries no addresses.
pub(super) fn intervals_from_elements<A: Addr>(
    mut elements: Vec<(A, bool)>,
) -> Result<Vec<Range<A>>, String> {
    elements.sort_unstable_by_key(|&(key, end)| (key, !end));
    let mut out = Vec::with_capacity(elements.len() / 2 + 1);
    let mut open: Option<A> = None;
    for (key, end) in elements {
        match (open, end) {
            (None, false) => open = Some(key),
            (Some(start), true) => {
                // `from_interval` is None only for an empty interval (end == start), which an
                // end sorted after its start cannot be; skip it rather than invent addresses.
                out.extend(Range::from_interval(start, Some(key)));
                open = None;
            }
            (None, true) => debug!(key = ?key, "skipping interval end without a start"),
            (Some(start), false) => {
                return Err(format!(
                    "element {:?} starts while the interval from {:?} is still open",
                    key.to_ip(),
                    start.to_ip()
                ));
            }
        }
    }
    if let Some(start) = open {
        out.extend(Range::from_interval(start, None));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u32, end: u32) -> Range<u32> {
        Range { start, end }
    }

    #[test]
    fn intervals_pair_starts_with_ends_in_any_order() {
        // [10, 20), [20, 30) adjacent, [40, top] without end, dumped highest first.
        let elems = vec![(40, false), (30, true), (20, false), (20, true), (10, false)];
        assert_eq!(intervals_from_elements(elems).unwrap(), [r(10, 19), r(20, 29), r(40, u32::MAX)]);
    }

    #[test]
    fn lone_end_at_zero_is_skipped_and_zero_start_kept() {
        let elems = vec![(0, true), (0, false), (256, true), (u32::MAX, false)];
        assert_eq!(intervals_from_elements(elems).unwrap(), [r(0, 255), r(u32::MAX, u32::MAX)]);
        assert_eq!(intervals_from_elements(vec![(0u32, true)]).unwrap(), []);
    }

    #[test]
    fn only_allowsyncs_chain_shapes_have_a_scope() {
        let chain = |hook: Option<i32>, priority: i32, chain_type: &str| ChainInfo {
            table: "t".into(),
            name: "enforce".into(),
            hook: hook.map(|h| h as u32),
            priority,
            chain_type: chain_type.into(),
            comment: None,
        };
        let (pre, input) = (Some(libc::NF_INET_PRE_ROUTING), Some(libc::NF_INET_LOCAL_IN));
        assert_eq!(chain(pre, -150, "filter").enforcement_scope(), Some(EnforceScope::Host));
        assert_eq!(chain(input, 0, "filter").enforcement_scope(), Some(EnforceScope::Local));
        assert_eq!(chain(pre, -100, "nat").enforcement_scope(), None);
        assert_eq!(chain(pre, 0, "filter").enforcement_scope(), None);
        assert_eq!(chain(input, -150, "filter").enforcement_scope(), None);
        assert_eq!(chain(None, 0, "").enforcement_scope(), None);
    }

    #[test]
    fn two_open_starts_are_an_error() {
        assert!(intervals_from_elements(vec![(1u32, false), (5, false), (9, true)]).is_err());
    }
}
