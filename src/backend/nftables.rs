//! The nftables backend: the allowlist lives in two interval sets of allowsync's own table,
//! `inet <table>`, written and read over netlink with libnftnl (no `nft` process).
//!
//! What it manages, all inside that one table:
//!
//! - set `<set_v4>` (`type ipv4_addr; flags interval`) and set `<set_v6>` (`type ipv6_addr;
//!   flags interval`), created when missing. An existing set of another type or flags is
//!   [`BackendError::Foreign`] and never changed;
//! - with `enforce`, the base chain [`ENFORCE_CHAIN`] (`type filter hook input priority filter;
//!   policy accept`): loopback is accepted first, then traffic to the enforced ports is dropped
//!   unless its source is in the set of its family ([`enforce_rule_text`] prints the rules).
//!   Without `enforce` that chain is removed if an earlier configuration created it; other
//!   chains of the table (an operator's own rules using the sets) are never touched.
//!
//! Every change is one nf_tables transaction, built in one of the `*_transaction` functions
//! below and committed by [`Transaction::commit`]: the kernel applies all of it or none of it
//! (EEXIST/ENOENT on any element abort the whole batch), which is what makes
//! [`Backend::apply`]'s "on error the set is as it was" true.
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

use std::ffi::{CStr, CString};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;
use std::time::Instant;

use nftnl::expr::{
    Cmp, CmpOp, Expression, Ipv4HeaderField, Ipv6HeaderField, Meta, NetworkHeaderField, Payload,
    TcpHeaderField, TransportHeaderField, UdpHeaderField, Verdict,
};
use nftnl::nftnl_sys as sys;
use nftnl::set::Set;
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, NlMsg, Policy, ProtoFamily, Rule, Table};
use tracing::{debug, info, warn};

use super::netlink::{AlignedBuf, DumpInterrupted, Message, NfSocket};
use super::{Backend, BackendError};
use crate::config::{Enforce, NftablesConfig};
use crate::prefixes::{Addr, AllowSet, Diff, Range, Ranges};

/// Name of the enforcement chain in allowsync's table. Reserved: allowsync creates, flushes and
/// deletes a chain of this name in its table.
pub const ENFORCE_CHAIN: &str = "enforce";

/// The nf_tables data types of the set keys (`ipv4_addr`, `ipv6_addr` in nft's `datatype.h`).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;

/// The two sets, by address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn key_type(self) -> u32 {
        match self {
            Family::V4 => TYPE_IPV4_ADDR,
            Family::V6 => TYPE_IPV6_ADDR,
        }
    }

    fn key_len(self) -> u32 {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    /// nft's name of the network header: `ip` or `ip6`.
    fn nft_proto(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// `meta nfproto` value.
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => libc::NFPROTO_IPV4 as u8,
            Family::V6 => libc::NFPROTO_IPV6 as u8,
        }
    }

    fn saddr(self) -> Payload {
        match self {
            Family::V4 => Payload::Network(NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr)),
            Family::V6 => Payload::Network(NetworkHeaderField::Ipv6(Ipv6HeaderField::Saddr)),
        }
    }
}

/// An address as an nftables set key: network byte order, 4 or 16 bytes.
trait SetKeyAddr: Addr {
    const FAMILY: Family;
    /// The key; only the first `FAMILY.key_len()` bytes are meaningful.
    fn key(self) -> [u8; 16];
    fn from_key(key: &[u8]) -> Option<Self>;
}

impl SetKeyAddr for u32 {
    const FAMILY: Family = Family::V4;
    fn key(self) -> [u8; 16] {
        let mut k = [0; 16];
        k[..4].copy_from_slice(&self.to_be_bytes());
        k
    }
    fn from_key(key: &[u8]) -> Option<Self> {
        key.try_into().ok().map(u32::from_be_bytes)
    }
}

impl SetKeyAddr for u128 {
    const FAMILY: Family = Family::V6;
    fn key(self) -> [u8; 16] {
        self.to_be_bytes()
    }
    fn from_key(key: &[u8]) -> Option<Self> {
        key.try_into().ok().map(u128::from_be_bytes)
    }
}

/// The [`Backend`] for nftables. Each call opens its own netlink socket in the calling thread's
/// network namespace.
#[derive(Debug)]
pub struct NftablesBackend {
    table: CString,
    set_v4: CString,
    set_v6: CString,
    enforce: Option<Enforce>,
}

impl NftablesBackend {
    /// A backend for the table and sets of `config`. Nothing is sent to the kernel before
    /// [`Backend::ensure`]. Fails only on names the kernel cannot take (NUL bytes); the
    /// configuration loader never produces those.
    pub fn new(config: &NftablesConfig) -> Result<Self, BackendError> {
        let c = |what: &str, name: &str| {
            CString::new(name).map_err(|_| {
                BackendError::Unavailable(format!("nftables {what} name {name:?} contains a NUL byte"))
            })
        };
        Ok(NftablesBackend {
            table: c("table", &config.table)?,
            set_v4: c("set", &config.set_v4)?,
            set_v6: c("set", &config.set_v6)?,
            enforce: config.enforce.clone(),
        })
    }

    fn table_str(&self) -> &str {
        self.table.to_str().expect("built from a String")
    }

    fn set_name(&self, family: Family) -> &CStr {
        match family {
            Family::V4 => &self.set_v4,
            Family::V6 => &self.set_v6,
        }
    }

    /// `set inet <table> <name>`, as errors and logs name it.
    fn set_object(&self, family: Family) -> String {
        format!("set inet {} {}", self.table_str(), self.set_name(family).to_string_lossy())
    }

    fn table_object(&self) -> String {
        format!("table inet {}", self.table_str())
    }

    fn chain_object(&self) -> String {
        format!("chain inet {} {}", self.table_str(), ENFORCE_CHAIN)
    }

    fn nft_table(&self) -> Table {
        Table::new(&self.table, ProtoFamily::Inet)
    }

    // ---- transactions: every batch allowsync sends is built here ------------------------

    /// Creates what is missing: the table (a no-op when it exists), the missing sets, and
    /// with `enforce` the chain with its rules (flushed and re-added, so a restart never
    /// duplicates them); without `enforce` it deletes an enforcement chain left from before.
    fn ensure_transaction(&self, missing_sets: &[Family], chain_exists: bool) -> Transaction {
        let mut tx = Transaction::new(0);
        let table = self.nft_table();
        tx.push(&table, MsgType::Add, "add table", &self.table_object());

        for (id, &family) in (1u32..).zip(missing_sets) {
            let (name, object) = (self.set_name(family), self.set_object(family));
            match family {
                Family::V4 => {
                    tx.push(&interval_set::<Ipv4Addr>(name, id, &table), MsgType::Add, "add set", &object)
                }
                Family::V6 => {
                    tx.push(&interval_set::<Ipv6Addr>(name, id, &table), MsgType::Add, "add set", &object)
                }
            }
        }

        let chain_name = CString::new(ENFORCE_CHAIN).expect("no NUL");
        match &self.enforce {
            Some(enforce) => {
                let mut chain = Chain::new(&chain_name, &table);
                chain.set_hook(Hook::In, 0);
                chain.set_type(ChainType::Filter);
                chain.set_policy(Policy::Accept);
                tx.push(&chain, MsgType::Add, "add chain", &self.chain_object());
                // A rule without a handle, deleted: the kernel flushes the chain.
                tx.push(&Rule::new(&chain), MsgType::Del, "flush chain", &self.chain_object());
                for rule in self.enforcement_rules(&chain, enforce) {
                    tx.push(&rule, MsgType::Add, "add rule", &self.chain_object());
                }
            }
            None if chain_exists => {
                tx.push(&Chain::new(&chain_name, &table), MsgType::Del, "delete chain", &self.chain_object());
            }
            None => {}
        }
        tx
    }

    /// Applies a diff: all removals (IPv4, IPv6), then all additions, as interval elements.
    fn apply_transaction(&self, diff: &Diff) -> Transaction {
        let elements = 2 * (diff.added() + diff.removed());
        let mut tx = Transaction::new(elements * ELEMENT_BYTES_ESTIMATE);
        let table = self.nft_table();
        self.push_elements(&mut tx, &table, &diff.v4.remove, MsgType::Del);
        self.push_elements(&mut tx, &table, &diff.v6.remove, MsgType::Del);
        self.push_elements(&mut tx, &table, &diff.v4.add, MsgType::Add);
        self.push_elements(&mut tx, &table, &diff.v6.add, MsgType::Add);
        tx
    }

    /// Deletes allowsync's table with everything in it.
    fn teardown_transaction(&self) -> Transaction {
        let mut tx = Transaction::new(0);
        tx.push(&self.nft_table(), MsgType::Del, "delete table", &self.table_object());
        tx
    }

    /// The element messages of `ranges` (one family) into `tx`.
    fn push_elements<A: SetKeyAddr>(
        &self,
        tx: &mut Transaction,
        table: &Table,
        ranges: &[Range<A>],
        ty: MsgType,
    ) {
        if ranges.is_empty() {
            return;
        }
        let family = A::FAMILY;
        let name = self.set_name(family);
        let op = match ty {
            MsgType::Add => "add elements",
            MsgType::Del => "delete elements",
        };
        let object = self.set_object(family);
        // The set object only carries table and name for the element messages; key type and
        // flags are not sent with them. Built and serialized a chunk at a time: libnftnl takes
        // about 300 bytes per element object, so holding all of a 100k-range diff at once cost
        // 60 MB, while the serialized batch needs about 60 bytes per element.
        for chunk in ranges.chunks(ELEMENT_CHUNK_RANGES) {
            match family {
                Family::V4 => {
                    let set = Set::<Ipv4Addr>::new_named(name, 0, table, ProtoFamily::Inet);
                    append_interval_elements(&set, chunk);
                    tx.push_elements(&set, ty, op, &object);
                }
                Family::V6 => {
                    let set = Set::<Ipv6Addr>::new_named(name, 0, table, ProtoFamily::Inet);
                    append_interval_elements(&set, chunk);
                    tx.push_elements(&set, ty, op, &object);
                }
            }
        }
    }

    /// The enforcement rules, in the order [`enforce_rule_text`] prints them.
    fn enforcement_rules<'a>(&self, chain: &'a Chain<'a>, enforce: &Enforce) -> Vec<Rule<'a>> {
        let mut rules = Vec::new();

        // iifname "lo" accept: nft compares the whole IFNAMSIZ buffer, so do the same.
        let mut lo = Rule::new(chain);
        let mut ifname = [0u8; libc::IFNAMSIZ];
        ifname[..2].copy_from_slice(b"lo");
        lo.add_expr(&Meta::IifName);
        lo.add_expr(&Cmp::new(CmpOp::Eq, &ifname[..]));
        lo.add_expr(&Verdict::Accept);
        rules.push(lo);

        for (l4proto, port) in enforced_ports(enforce) {
            for family in Family::BOTH {
                // The same expressions, in the same order, as nft generates for
                // `tcp dport 443 ip saddr != @allow_v4 drop`: cheap port match first.
                let mut r = Rule::new(chain);
                r.add_expr(&Meta::L4Proto);
                r.add_expr(&Cmp::new(CmpOp::Eq, l4proto.ipproto()));
                r.add_expr(&Payload::Transport(l4proto.dport()));
                r.add_expr(&Cmp::new(CmpOp::Eq, &port.to_be_bytes()[..]));
                r.add_expr(&Meta::NfProto);
                r.add_expr(&Cmp::new(CmpOp::Eq, family.nfproto()));
                r.add_expr(&family.saddr());
                r.add_expr(&NotInSet { set: self.set_name(family) });
                r.add_expr(&Verdict::Drop);
                rules.push(r);
            }
        }
        rules
    }

    // ---- reading the kernel's state -------------------------------------------------------

    /// Whether the table exists.
    fn table_exists(&self, sock: &NfSocket) -> Result<bool, BackendError> {
        let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
        let seq = sock.next_seq();
        let msg = build_request(&mut buf, seq, libc::NFT_MSG_GETTABLE, libc::NLM_F_ACK, |nlh| {
            table_request_payload(nlh, &self.table)
        });
        match sock.request(msg, seq, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(kernel("get table", self.table_object(), e)),
        }
    }

    /// The kernel's description of one of our sets, `None` when it (or the table) is missing.
    fn get_set(&self, sock: &NfSocket, family: Family) -> Result<Option<SetInfo>, BackendError> {
        let request = NftnlSet::new(&self.table, self.set_name(family));
        let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
        let seq = sock.next_seq();
        let msg = build_request(&mut buf, seq, libc::NFT_MSG_GETSET, libc::NLM_F_ACK, |nlh| {
            // SAFETY: `nlh` heads a request buffer with room for the payload (see
            // `build_request`); `request` is live.
            unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, request.ptr()) }
        });
        let mut info = None;
        let result = sock.request(msg, seq, |m| {
            info = Some(SetInfo::parse(m)?);
            Ok(())
        });
        match result {
            Ok(()) => Ok(info),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(kernel("get set", self.set_object(family), e)),
        }
    }

    /// The kernel's description of the enforcement chain, `None` when it is missing.
    fn get_chain(&self, sock: &NfSocket) -> Result<Option<ChainInfo>, BackendError> {
        let chain_name = CString::new(ENFORCE_CHAIN).expect("no NUL");
        let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
        let seq = sock.next_seq();
        let msg = build_request(&mut buf, seq, libc::NFT_MSG_GETCHAIN, libc::NLM_F_ACK, |nlh| {
            chain_request_payload(nlh, &self.table, &chain_name)
        });
        let mut info = None;
        let result = sock.request(msg, seq, |m| {
            info = Some(ChainInfo::parse(m)?);
            Ok(())
        });
        match result {
            Ok(()) => Ok(info),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(kernel("get chain", self.chain_object(), e)),
        }
    }

    /// Why an existing set is not one allowsync can use, if it is not.
    fn foreign_set(&self, family: Family, info: &SetInfo) -> Option<BackendError> {
        let want_flags = libc::NFT_SET_INTERVAL as u32;
        let why = if info.key_type != family.key_type() || info.key_len != family.key_len() {
            format!(
                "its key is type {} of {} bytes, allowsync needs {} ({} bytes)",
                info.key_type,
                info.key_len,
                family.type_name(),
                family.key_len()
            )
        } else if info.flags != want_flags {
            format!(
                "its flags are {:#x}, allowsync needs exactly `flags interval` ({want_flags:#x})",
                info.flags
            )
        } else {
            return None;
        };
        Some(BackendError::Foreign { object: self.set_object(family), why })
    }

    /// Dumps one set's elements and rebuilds its ranges, exactly as the kernel holds them.
    fn read_set<A: SetKeyAddr>(&self, sock: &NfSocket) -> Result<Ranges<A>, BackendError> {
        let family = A::FAMILY;
        let object = self.set_object(family);
        let request = NftnlSet::new(&self.table, self.set_name(family));
        let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
        let seq = sock.next_seq();
        let msg = build_request(&mut buf, seq, libc::NFT_MSG_GETSETELEM, libc::NLM_F_DUMP, |nlh| {
            // SAFETY: as in `get_set`; `request` has no elements, so only the
            // table and set names are written.
            unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, request.ptr()) }
        });
        let mut elements: Vec<(A, bool)> = Vec::new();
        let mut bad_key = None;
        let result = sock.request(msg, seq, |m| {
            for_each_element(m, |key, end| match A::from_key(key) {
                Some(a) => elements.push((a, end)),
                None => bad_key = Some(key.len()),
            })
        });
        match result {
            Ok(()) => {}
            // No table or no set: not something to read as "empty" (an apply against it could
            // only fail); the caller runs `ensure` again, which recreates them.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let object = if self.table_exists(sock)? { object } else { self.table_object() };
                return Err(BackendError::Missing { object });
            }
            Err(e) if DumpInterrupted::is(&e) => {
                return Err(BackendError::Conflict { op: "list elements", object, detail: e.to_string() });
            }
            Err(e) => return Err(kernel("list elements", object, e)),
        }
        if let Some(len) = bad_key {
            return Err(BackendError::Foreign {
                object,
                why: format!("it holds {len}-byte keys, allowsync needs {}", family.type_name()),
            });
        }
        let ranges = intervals_from_elements(elements)
            .map_err(|why| BackendError::Foreign { object: object.clone(), why: why.clone() })?;
        Ranges::from_disjoint(ranges)
            .map_err(|e| BackendError::Foreign { object, why: format!("its elements overlap: {e}") })
    }
}

impl Backend for NftablesBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Looks before it writes: the table, both sets (key type and flags) and the enforcement
    /// chain are queried first, and anything foreign stops it before any change. Then one
    /// transaction creates what is missing. With `enforce` the chain's rules are flushed and
    /// re-added on every call (one commit, so the generation changes); without, a call with
    /// everything in place commits nothing.
    fn ensure(&mut self) -> Result<(), BackendError> {
        let sock = open_socket()?;
        let table_exists = self.table_exists(&sock)?;
        let mut missing = Vec::new();
        let mut chain = None;
        if table_exists {
            for family in Family::BOTH {
                match self.get_set(&sock, family)? {
                    Some(info) => {
                        if let Some(e) = self.foreign_set(family, &info) {
                            return Err(e);
                        }
                    }
                    None => missing.push(family),
                }
            }
            chain = self.get_chain(&sock)?;
        } else {
            missing.extend(Family::BOTH);
        }

        // Only a chain that looks like allowsync's is adopted (with `enforce`) or removed
        // (without); a different chain of that name is refused, or left alone.
        let chain_exists = match &chain {
            Some(c) if !c.is_enforcement_chain() => {
                if self.enforce.is_some() {
                    return Err(BackendError::Foreign {
                        object: self.chain_object(),
                        why: format!(
                            "it is not a `type filter hook input priority filter` base chain ({c}); \
                             the name is reserved for allowsync's enforcement"
                        ),
                    });
                }
                false
            }
            c => c.is_some(),
        };

        let changes = !table_exists || !missing.is_empty() || self.enforce.is_some() || chain_exists;
        if !changes {
            debug!(table = %self.table_object(), "nftables objects already in place");
            return Ok(());
        }
        if chain_exists && self.enforce.is_none() {
            warn!(chain = %self.chain_object(), "enforcement is not configured: removing the enforcement chain");
        }
        self.ensure_transaction(&missing, chain_exists).commit()?;
        info!(
            table = %self.table_object(),
            created_sets = ?missing.iter().map(|f| self.set_object(*f)).collect::<Vec<_>>(),
            enforce = self.enforce.is_some(),
            "nftables objects ensured"
        );
        Ok(())
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let started = Instant::now();
        let sock = open_socket()?;
        // Two dumps are two snapshots: the generation around them makes them one.
        let before = get_generation(&sock)?;
        let set = AllowSet { v4: self.read_set::<u32>(&sock)?, v6: self.read_set::<u128>(&sock)? };
        if get_generation(&sock)? != before {
            return Err(BackendError::Conflict {
                op: "list elements",
                object: self.table_object(),
                detail: "the ruleset changed while the sets were read".into(),
            });
        }
        debug!(
            v4 = set.v4.len(),
            v6 = set.v6.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "read nftables sets"
        );
        Ok(set)
    }

    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        if diff.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let tx = self.apply_transaction(diff);
        let (messages, bytes) = (tx.messages, tx.len_hint);
        tx.commit()?;
        info!(
            added = diff.added(),
            removed = diff.removed(),
            messages,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "nftables transaction committed"
        );
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        match self.teardown_transaction().commit() {
            Err(BackendError::Conflict { .. }) => {
                // ENOENT: the table is already gone (EEXIST cannot happen on a delete).
                debug!(table = %self.table_object(), "nothing to tear down");
                Ok(())
            }
            r => r,
        }
    }

    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        get_generation(&open_socket()?).map(|g| Some(u64::from(g)))
    }
}

/// The ruleset generation of the socket's network namespace (`NFT_MSG_GETGEN`).
fn get_generation(sock: &NfSocket) -> Result<u32, BackendError> {
    let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
    let seq = sock.next_seq();
    let msg = build_request_family(
        &mut buf,
        libc::NFT_MSG_GETGEN,
        libc::AF_UNSPEC as u16,
        libc::NLM_F_ACK,
        seq,
        |_| {},
    );
    let mut id = None;
    sock.request(msg, seq, |m| {
        id = Some(parse_generation(m)?);
        Ok(())
    })
    .map_err(|e| kernel("get generation", "nf_tables".into(), e))?;
    id.ok_or_else(|| kernel("get generation", "nf_tables".into(), io::ErrorKind::UnexpectedEof.into()))
}

/// The rules an operator would write by hand for `enforce`'s ports, as `nft` prints them (and as
/// [`Backend::ensure`] installs them in [`ENFORCE_CHAIN`] when `enforce` is configured): loopback
/// first, then one drop rule per port and family. nftables sets are per table, so such rules
/// must live in a chain of `table inet <table>` to reference the sets.
pub fn enforce_rule_text(config: &NftablesConfig, enforce: &Enforce) -> Vec<String> {
    let mut out = vec![r#"iifname "lo" accept"#.to_string()];
    for (l4proto, port) in enforced_ports(enforce) {
        for family in Family::BOTH {
            let set = match family {
                Family::V4 => &config.set_v4,
                Family::V6 => &config.set_v6,
            };
            out.push(format!("{} dport {port} {} saddr != @{set} drop", l4proto.name(), family.nft_proto()));
        }
    }
    out
}

#[derive(Clone, Copy)]
enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
    fn ipproto(self) -> u8 {
        match self {
            L4::Tcp => libc::IPPROTO_TCP as u8,
            L4::Udp => libc::IPPROTO_UDP as u8,
        }
    }
    fn dport(self) -> TransportHeaderField {
        match self {
            L4::Tcp => TransportHeaderField::Tcp(TcpHeaderField::Dport),
            L4::Udp => TransportHeaderField::Udp(UdpHeaderField::Dport),
        }
    }
}

/// TCP ports, then UDP ports, in configuration order.
fn enforced_ports(e: &Enforce) -> impl Iterator<Item = (L4, u16)> + '_ {
    e.tcp_ports.iter().map(|&p| (L4::Tcp, p)).chain(e.udp_ports.iter().map(|&p| (L4::Udp, p)))
}

/// `<saddr> != @set`: a lookup with `NFT_LOOKUP_F_INV`, which nftnl's `Lookup` cannot express.
struct NotInSet<'a> {
    set: &'a CStr,
}

impl Expression for NotInSet<'_> {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: libnftnl allocates the expression (checked for NULL below) and copies the
        // set name; the rule takes ownership of the returned expression.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"lookup".as_ptr())) else {
                std::process::abort(); // out of memory, as nftnl itself handles it
            };
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG as u16, libc::NFT_REG_1 as u32);
            sys::nftnl_expr_set_str(e, sys::NFTNL_EXPR_LOOKUP_SET as u16, self.set.as_ptr());
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_LOOKUP_FLAGS as u16, libc::NFT_LOOKUP_F_INV as u32);
            expr
        }
    }
}

/// A named `flags interval` set of key type `K` (what `Set::new_named` lacks: the flags).
fn interval_set<'a, K: nftnl::set::SetKey>(name: &CStr, id: u32, table: &'a Table) -> Set<'a, K> {
    let set = Set::<K>::new_named(name, id, table, ProtoFamily::Inet);
    // SAFETY: `set` owns a live nftnl_set; setting a u32 attribute copies the value.
    unsafe {
        sys::nftnl_set_set_u32(
            set.as_ptr().as_ptr(),
            sys::NFTNL_SET_FLAGS as u16,
            libc::NFT_SET_INTERVAL as u32,
        )
    };
    set
}

/// Appends the interval elements of `ranges` to `set`'s element list: the start, and the end
/// (`end + 1`, flagged `NFT_SET_ELEM_INTERVAL_END`) unless the range reaches the top.
fn append_interval_elements<K, A: SetKeyAddr>(set: &Set<'_, K>, ranges: &[Range<A>]) {
    let len = A::FAMILY.key_len() as usize;
    for r in ranges {
        append_element(set, &r.start.key()[..len], 0);
        if let Some(end) = r.interval_end() {
            append_element(set, &end.key()[..len], libc::NFT_SET_ELEM_INTERVAL_END as u32);
        }
    }
}

fn append_element<K>(set: &Set<'_, K>, key: &[u8], flags: u32) {
    // SAFETY: the element is allocated by libnftnl (checked for NULL), `nftnl_set_elem_set`
    // copies `key` (at most 16 bytes, within libnftnl's key buffer), and `nftnl_set_elem_add`
    // hands the element to the live set, which frees it.
    unsafe {
        let Some(elem) = NonNull::new(sys::nftnl_set_elem_alloc()) else {
            std::process::abort(); // out of memory, as nftnl itself handles it
        };
        let e = elem.as_ptr();
        sys::nftnl_set_elem_set(e, sys::NFTNL_SET_ELEM_KEY as u16, key.as_ptr().cast(), key.len() as u32);
        if flags != 0 {
            sys::nftnl_set_elem_set_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16, flags);
        }
        sys::nftnl_set_elem_add(set.as_ptr().as_ptr(), e);
    }
}

/// Rebuilds ranges from interval elements `(key, is_interval_end)` in any order (the kernel
/// dumps its rbtree from the highest key down).
///
/// Sorted by key with an end before a start of the same key (adjacent intervals `[a, k)` and
/// `[k, b)` hold both), each start pairs with the next end. A start with no end after it runs
/// to the top of the address space (that is how such a range is stored). An end with no open
/// start is skipped: older nft versions stored a lone "interval end" at `0.0.0.0`/`::` to mark
/// the gap below the first range, and it carries no addresses.
fn intervals_from_elements<A: Addr>(mut elements: Vec<(A, bool)>) -> Result<Vec<Range<A>>, String> {
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

// ---- the transaction -----------------------------------------------------------------------

/// Bytes one element takes in a message, roughly (nests, key, flags): sizes the batch pages.
const ELEMENT_BYTES_ESTIMATE: usize = 40;

/// Ranges turned into libnftnl element objects at a time (two elements each); the messages are
/// the same transaction whatever the chunking, only split at chunk boundaries too.
const ELEMENT_CHUNK_RANGES: usize = 4096;

/// Room for one request message (names are at most 256 bytes).
const REQUEST_BUF_BYTES: usize = 8 * 1024;

/// One nf_tables transaction under construction, remembering which operation on which object
/// each message is, so that a refusal names its cause.
struct Transaction {
    batch: Batch,
    /// Messages added (without the batch begin/end markers).
    messages: usize,
    /// `(index of the first message, operation, object)`, in message order.
    labels: Vec<(usize, &'static str, String)>,
    /// Bytes the caller expected to write (for logs).
    len_hint: usize,
}

impl Transaction {
    fn new(expected_bytes: usize) -> Self {
        // All pages go into one sendmsg, which takes at most UIO_MAXIOV (1024) of them: keep
        // the page count well below that, whatever the batch size.
        let page = (expected_bytes / 256).max(nftnl::default_batch_page_size() as usize);
        let page = u32::try_from(page.next_power_of_two()).unwrap_or(1 << 30);
        Transaction {
            batch: Batch::with_page_size(page),
            messages: 0,
            labels: Vec::new(),
            len_hint: expected_bytes,
        }
    }

    fn label(&mut self, op: &'static str, object: &str) {
        if self.labels.last().is_none_or(|(_, o, obj)| *o != op || obj != object) {
            self.labels.push((self.messages, op, object.to_string()));
        }
    }

    fn push(&mut self, msg: &impl NlMsg, ty: MsgType, op: &'static str, object: &str) {
        self.label(op, object);
        self.batch.add(msg, ty);
        self.messages += 1;
    }

    /// The element messages of `set`: libnftnl splits its element list into messages of at
    /// most 64 KiB (a netlink attribute's length is 16 bits).
    fn push_elements<K>(&mut self, set: &Set<'_, K>, ty: MsgType, op: &'static str, object: &str) {
        self.label(op, object);
        for msg in set.elems_iter() {
            self.batch.add(&msg, ty);
            self.messages += 1;
        }
    }

    /// Sends the batch as one `sendmsg` and checks every reply. EEXIST/ENOENT (an element or
    /// object appeared or vanished under us) are [`BackendError::Conflict`]; the kernel has then
    /// aborted the whole transaction.
    fn commit(self) -> Result<(), BackendError> {
        let messages = self.messages;
        let labels = self.labels;
        let finalized = self.batch.finalize();
        let seqs = finalized.sequence_numbers();
        // On kernels that acknowledge the batch begin/end markers they take a sequence number
        // each (the first and the last); the messages are numbered in between.
        let markers = (seqs.len() - messages) / 2;
        let first_msg_seq = seqs.start + markers as u32;
        let pages: Vec<&[u8]> = finalized.iter().collect();
        let bytes: usize = pages.iter().map(|p| p.len()).sum();

        let sock = open_socket()?;
        let replies =
            sock.send_batch(&pages, seqs.len()).map_err(|e| kernel("send batch", "nf_tables".into(), e))?;
        debug!(messages, bytes, pages = pages.len(), acked = replies.acked, "nf_tables batch sent");

        let Some(&(seq, errno)) = replies.errors.first() else {
            // A committed batch acknowledges every message that asked for it (all of ours).
            // Acknowledgements alone prove nothing (an aborted batch acknowledges the messages
            // before the refused one too), but a missing one without any error means replies
            // were lost and the outcome is unknown: say so, the caller re-reads.
            if replies.acked != seqs.len() {
                let why = format!("kernel acknowledged {} of {} messages", replies.acked, seqs.len());
                return Err(kernel("commit batch", "nf_tables".into(), io::Error::other(why)));
            }
            return Ok(());
        };
        for &(seq, errno) in &replies.errors[1..] {
            debug!(seq, errno, "further error in the same batch");
        }
        let index = seq.checked_sub(first_msg_seq).map(|i| i as usize).filter(|&i| i < messages);
        let (op, object) = match index {
            Some(i) => {
                let at = labels.partition_point(|(first, _, _)| *first <= i).saturating_sub(1);
                labels.get(at).map_or(("batch", "nf_tables".to_string()), |(_, op, obj)| (*op, obj.clone()))
            }
            None => ("batch", "nf_tables".to_string()),
        };
        Err(refused(op, object, errno))
    }
}

/// A refusal of the kernel as a [`BackendError`].
fn refused(op: &'static str, object: String, errno: i32) -> BackendError {
    let source = io::Error::from_raw_os_error(errno);
    match errno {
        libc::EEXIST | libc::ENOENT => BackendError::Conflict { op, object, detail: source.to_string() },
        _ => kernel(op, object, source),
    }
}

fn kernel(op: &'static str, object: String, source: io::Error) -> BackendError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            BackendError::Unavailable(format!("{op} on {object}: {source} (needs CAP_NET_ADMIN)"))
        }
        _ => BackendError::Kernel { op, object, cause: source },
    }
}

fn open_socket() -> Result<NfSocket, BackendError> {
    NfSocket::open().map_err(|e| match e.raw_os_error() {
        Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => {
            BackendError::Unavailable(format!("netlink netfilter socket: {e} (no nf_tables in this kernel?)"))
        }
        _ => kernel("open netlink socket", "nf_tables".into(), e),
    })
}

// ---- libnftnl plumbing for requests and parsing -------------------------------------------

/// Builds a request header (family `inet`) into `buf`, lets `payload` add attributes, and
/// returns the finished message.
fn build_request(
    buf: &mut AlignedBuf,
    seq: u32,
    ty: libc::c_int,
    flags: libc::c_int,
    payload: impl FnOnce(*mut libc::nlmsghdr),
) -> &[u8] {
    build_request_family(buf, ty, libc::NFPROTO_INET as u16, flags, seq, payload)
}

fn build_request_family(
    buf: &mut AlignedBuf,
    ty: libc::c_int,
    family: u16,
    flags: libc::c_int,
    seq: u32,
    payload: impl FnOnce(*mut libc::nlmsghdr),
) -> &[u8] {
    let base = buf.as_mut_ptr();
    // SAFETY: `buf` is REQUEST_BUF_BYTES long and aligned; a header plus a table, set or chain
    // name (at most 256 bytes each) fits many times over.
    let nlh = unsafe {
        sys::nftnl_nlmsg_build_hdr(base.cast(), ty as u16, family, (flags | libc::NLM_F_REQUEST) as u16, seq)
    };
    payload(nlh);
    // SAFETY: `nlh` points at the header libnftnl wrote at the start of `buf`; the payload
    // functions keep `nlmsg_len` up to date and within the buffer.
    let len = unsafe { (*nlh).nlmsg_len } as usize;
    assert!(len <= REQUEST_BUF_BYTES, "request overflowed its buffer");
    // SAFETY: `len` bytes from `base` were written by libnftnl (or zeroed) and stay borrowed
    // from `buf`.
    unsafe { std::slice::from_raw_parts(base, len) }
}

/// Writes the attributes naming `inet table` into a GETTABLE request.
fn table_request_payload(nlh: *mut libc::nlmsghdr, table: &CStr) {
    // SAFETY: allocation checked for NULL; libnftnl copies the name, writes the payload into
    // the request buffer behind `nlh` (room checked by `build_request`), and the object is
    // freed afterwards.
    unsafe {
        let Some(t) = NonNull::new(sys::nftnl_table_alloc()) else { std::process::abort() };
        let t = t.as_ptr();
        sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, libc::NFPROTO_INET as u32);
        sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, table.as_ptr());
        sys::nftnl_table_nlmsg_build_payload(nlh, t);
        sys::nftnl_table_free(t);
    }
}

/// Writes the attributes naming chain `chain` of `inet table` into a GETCHAIN request.
fn chain_request_payload(nlh: *mut libc::nlmsghdr, table: &CStr, chain: &CStr) {
    // SAFETY: as in `table_request_payload`.
    unsafe {
        let Some(c) = NonNull::new(sys::nftnl_chain_alloc()) else { std::process::abort() };
        let c = c.as_ptr();
        sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_FAMILY as u16, libc::NFPROTO_INET as u32);
        sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
        sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, chain.as_ptr());
        sys::nftnl_chain_nlmsg_build_payload(nlh, c);
        sys::nftnl_chain_free(c);
    }
}

/// An owned `nftnl_set` used for requests and for parsing replies.
struct NftnlSet(NonNull<sys::nftnl_set>);

impl NftnlSet {
    fn alloc() -> Self {
        // SAFETY: plain allocation, checked for NULL.
        match NonNull::new(unsafe { sys::nftnl_set_alloc() }) {
            Some(p) => NftnlSet(p),
            None => std::process::abort(),
        }
    }

    /// A set named `name` in `inet table`, to address requests.
    fn new(table: &CStr, name: &CStr) -> Self {
        let s = Self::alloc();
        // SAFETY: the set is live; libnftnl copies the strings.
        unsafe {
            sys::nftnl_set_set_u32(s.ptr(), sys::NFTNL_SET_FAMILY as u16, libc::NFPROTO_INET as u32);
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        s
    }

    fn ptr(&self) -> *mut sys::nftnl_set {
        self.0.as_ptr()
    }

    fn u32_attr(&self, attr: u32) -> Option<u32> {
        // SAFETY: the set is live; `get_u32` is only called for an attribute that is set.
        unsafe {
            sys::nftnl_set_is_set(self.ptr(), attr as u16)
                .then(|| sys::nftnl_set_get_u32(self.ptr(), attr as u16))
        }
    }
}

impl Drop for NftnlSet {
    fn drop(&mut self) {
        // SAFETY: we own the set (and the elements libnftnl attached to it).
        unsafe { sys::nftnl_set_free(self.ptr()) }
    }
}

/// What matters about an existing set.
#[derive(Debug)]
struct SetInfo {
    key_type: u32,
    key_len: u32,
    flags: u32,
}

impl SetInfo {
    fn parse(m: &Message<'_>) -> io::Result<Self> {
        let s = NftnlSet::alloc();
        // SAFETY: `m` is one complete, aligned netlink message; libnftnl validates attributes.
        if unsafe { sys::nftnl_set_nlmsg_parse(m.as_ptr(), s.ptr()) } < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADMSG));
        }
        Ok(SetInfo {
            key_type: s.u32_attr(sys::NFTNL_SET_KEY_TYPE).unwrap_or(0),
            key_len: s.u32_attr(sys::NFTNL_SET_KEY_LEN).unwrap_or(0),
            flags: s.u32_attr(sys::NFTNL_SET_FLAGS).unwrap_or(0),
        })
    }
}

/// What matters about an existing chain.
#[derive(Debug)]
struct ChainInfo {
    /// `None` for a regular (non-base) chain.
    hook: Option<u32>,
    priority: i32,
    chain_type: String,
}

impl ChainInfo {
    fn parse(m: &Message<'_>) -> io::Result<Self> {
        // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; attribute
        // getters are only called for attributes that are set, and the type string is copied
        // before the chain is freed.
        unsafe {
            let Some(c) = NonNull::new(sys::nftnl_chain_alloc()) else { std::process::abort() };
            let c = c.as_ptr();
            let parsed = sys::nftnl_chain_nlmsg_parse(m.as_ptr(), c);
            let is = |a: u32| sys::nftnl_chain_is_set(c, a as u16);
            let info = ChainInfo {
                hook: is(sys::NFTNL_CHAIN_HOOKNUM)
                    .then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16)),
                priority: if is(sys::NFTNL_CHAIN_PRIO) {
                    sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16)
                } else {
                    0
                },
                chain_type: if is(sys::NFTNL_CHAIN_TYPE) {
                    CStr::from_ptr(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16))
                        .to_string_lossy()
                        .into_owned()
                } else {
                    String::new()
                },
            };
            sys::nftnl_chain_free(c);
            if parsed < 0 {
                return Err(io::Error::from_raw_os_error(libc::EBADMSG));
            }
            Ok(info)
        }
    }

    fn is_enforcement_chain(&self) -> bool {
        self.hook == Some(libc::NF_INET_LOCAL_IN as u32) && self.priority == 0 && self.chain_type == "filter"
    }
}

impl std::fmt::Display for ChainInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hook {
            None => write!(f, "a regular chain"),
            Some(h) => write!(f, "type {} hook {} priority {}", self.chain_type, h, self.priority),
        }
    }
}

/// Calls `f(key, is_interval_end)` for every element of one `NFT_MSG_NEWSETELEM` dump message.
fn for_each_element(m: &Message<'_>, mut f: impl FnMut(&[u8], bool)) -> io::Result<()> {
    // A set object per message: its element list is freed with it, so memory stays bounded by
    // one message however large the set.
    let s = NftnlSet::alloc();
    // SAFETY: `m` is one complete, aligned netlink message; libnftnl validates attributes.
    if unsafe { sys::nftnl_set_elems_nlmsg_parse(m.as_ptr(), s.ptr()) } < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADMSG));
    }
    // SAFETY: the iterator walks the live set's element list and is destroyed before the set.
    // Element getters return pointers into the element (valid while the set lives) with
    // their length; attributes are checked with `is_set` before being read.
    unsafe {
        let Some(iter) = NonNull::new(sys::nftnl_set_elems_iter_create(s.ptr())) else {
            std::process::abort()
        };
        // `iter_next` returns the current element and advances (NULL at the end).
        loop {
            let elem = sys::nftnl_set_elems_iter_next(iter.as_ptr());
            if elem.is_null() {
                break;
            }
            let mut len = 0u32;
            let key = sys::nftnl_set_elem_get(elem, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
            let flags = if sys::nftnl_set_elem_is_set(elem, sys::NFTNL_SET_ELEM_FLAGS as u16) {
                sys::nftnl_set_elem_get_u32(elem, sys::NFTNL_SET_ELEM_FLAGS as u16)
            } else {
                0
            };
            if !key.is_null() {
                let key = std::slice::from_raw_parts(key.cast::<u8>(), len as usize);
                f(key, flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0);
            }
        }
        sys::nftnl_set_elems_iter_destroy(iter.as_ptr());
    }
    Ok(())
}

/// `NFTA_GEN_ID` of an `NFT_MSG_NEWGEN` reply.
fn parse_generation(m: &Message<'_>) -> io::Result<u32> {
    // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; the id is read
    // only when present; the object is freed before returning.
    unsafe {
        let Some(g) = NonNull::new(sys::nftnl_gen_alloc()) else { std::process::abort() };
        let g = g.as_ptr();
        let ok = sys::nftnl_gen_nlmsg_parse(m.as_ptr(), g) >= 0
            && sys::nftnl_gen_is_set(g, sys::NFTNL_GEN_ID as u16);
        let id = ok.then(|| sys::nftnl_gen_get_u32(g, sys::NFTNL_GEN_ID as u16));
        sys::nftnl_gen_free(g);
        id.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADMSG))
    }
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
    fn two_open_starts_are_an_error() {
        assert!(intervals_from_elements(vec![(1u32, false), (5, false), (9, true)]).is_err());
    }

    #[test]
    fn keys_are_network_byte_order() {
        assert_eq!(&0x0a000001u32.key()[..4], &[10, 0, 0, 1]);
        assert_eq!(u32::from_key(&[10, 0, 0, 1]), Some(0x0a000001));
        assert_eq!(u128::from_key(&1u128.key()), Some(1));
        assert_eq!(1u128.key()[15], 1);
        assert_eq!(u32::from_key(&[1, 2, 3]), None);
    }

    #[test]
    fn rule_text_lists_loopback_then_each_port_and_family() {
        let cfg = NftablesConfig {
            table: "allowsync".into(),
            set_v4: "allow_v4".into(),
            set_v6: "allow_v6".into(),
            enforce: None,
        };
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53] };
        assert_eq!(
            enforce_rule_text(&cfg, &e),
            [
                r#"iifname "lo" accept"#,
                "tcp dport 443 ip saddr != @allow_v4 drop",
                "tcp dport 443 ip6 saddr != @allow_v6 drop",
                "udp dport 53 ip saddr != @allow_v4 drop",
                "udp dport 53 ip6 saddr != @allow_v6 drop",
            ]
        );
    }
}
