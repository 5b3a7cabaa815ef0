//! The nftables backend: the allowlist lives in two interval sets, written and read over netlink
//! with libnftnl (no `nft` process). By default both are sets of allowsync's own table,
//! `inet <table>`; `set_v4`/`set_v6` may also name an operator's sets in any family
//! (`ip filter chat_v4`).
//!
//! What it manages (who owns what: [`crate::ownership`]):
//!
//! - set `<set_v4>` (`type ipv4_addr; flags interval`) and set `<set_v6>` (`type ipv6_addr;
//!   flags interval`). In allowsync's own table they are created when missing (the table too),
//!   with the comment `managed by allowsync`. A set elsewhere (or in a table allowsync did not
//!   create) is the operator's: it must exist ([`BackendError::Absent`] otherwise), and only its
//!   elements are managed. A set of another type, or with flags that cannot hold the allowlist,
//!   is [`BackendError::Foreign`], in nft's words, and never changed;
//! - with `enforce`, the base chain [`ENFORCE_CHAIN`] of allowsync's table (`policy accept`,
//!   marked): loopback is accepted first, then traffic to the enforced ports is dropped unless
//!   its source is in the set of its family ([`enforce_rule_text`] prints the rules). With
//!   `scope: host` (the default) it is `type filter hook prerouting priority mangle` and its
//!   rules match `fib daddr type local`: every packet addressed to this host, by its port
//!   before DNAT, so a port published to a container is covered too; with `scope: local` it is
//!   `type filter hook input priority filter`, as in earlier versions. allowsync's chain of the
//!   other scope is replaced in the same transaction. A chain of that name allowsync did not create is
//!   [`BackendError::Foreign`] and never touched; without `enforce`, allowsync's own chain is
//!   removed, anyone else's left alone;
//! - what an earlier configuration created and this one no longer uses (the state file's
//!   [`Footprint`]) is removed in the same commit that creates the new objects, and a new set
//!   starts with the elements of the set it replaces: a reload never leaves a moment without
//!   the allowlist, nor the old objects behind.
//!
//! This file holds the [`Backend`] impl; `owned.rs` its decisions (what to create, refuse or
//! remove, in `ensure` and `teardown`). The layers under it:
//!
//! - `batch.rs`: every transaction sent, each one nf_tables batch that the kernel applies whole
//!   or not at all;
//! - `query.rs`: reading the kernel (tables, sets, chains with their comments, generation,
//!   element dumps) and rebuilding ranges from interval elements;
//! - `nftnl.rs`: every libnftnl C call, behind safe functions;
//! - `monitor.rs`: the change notifications that let the daemon repair at once;
//! - `../netlink.rs`: the socket transport.

mod batch;
pub mod monitor;
mod nftnl;
mod owned;
mod query;

use std::ffi::CString;
use std::io;
use std::time::Instant;

use ::nftnl::ProtoFamily;
use ::nftnl::expr::{Ipv4HeaderField, Ipv6HeaderField, NetworkHeaderField, Payload};
use tracing::{debug, info};

use batch::Step;
pub use batch::{enforce_chain_text, enforce_rule_text};
pub use monitor::Monitor;
use query::get_generation;

use super::netlink::NfSocket;
use super::{Backend, BackendError, Family};
use crate::config::{Enforce, NftablesConfig};
use crate::ownership::{Footprint, NftFamily, Object, Teardown};
use crate::prefixes::{Addr, AllowSet, Diff};

/// Name of the enforcement chain in allowsync's table. Reserved: allowsync creates, flushes and
/// deletes a chain of this name in its table, as long as it is its own (marked).
pub const ENFORCE_CHAIN: &str = "enforce";

/// The nf_tables data types of the set keys (`ipv4_addr`, `ipv6_addr` in nft's `datatype.h`).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;

impl Family {
    /// 0 for IPv4, 1 for IPv6: the index into the backend's sets.
    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

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

/// An nftables object as libnftnl addresses it (family, table and, for sets and chains, name)
/// and as messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    family: NftFamily,
    table: CString,
    /// The set's or chain's name; the table's own for a table.
    name: CString,
    object: Object,
}

impl Name {
    /// The libnftnl names of `object` (an nftables table, set or chain), or why the kernel
    /// cannot take them (a NUL byte; the configuration loader never produces one).
    fn of(object: &Object) -> Result<Name, BackendError> {
        let c = |s: &str| {
            CString::new(s).map_err(|_| {
                BackendError::Unavailable(format!("nftables name {s:?} in {object} contains a NUL byte"))
            })
        };
        let (family, table, name) = match object {
            Object::NftTable { family, table } => (*family, table, table),
            Object::NftSet { family, table, name } | Object::NftChain { family, table, name } => {
                (*family, table, name)
            }
            other => return Err(BackendError::Unavailable(format!("{other} is not an nftables object"))),
        };
        Ok(Name { family, table: c(table)?, name: c(name)?, object: object.clone() })
    }

    /// The table this object is or lives in.
    fn table(&self) -> Name {
        let object = self.object.nft_table().expect("an nftables object");
        Name { family: self.family, table: self.table.clone(), name: self.table.clone(), object }
    }

    /// A set or chain `name` of this table.
    fn child(&self, name: &str, chain: bool) -> Name {
        let (family, table) = (self.family, self.table.to_string_lossy().into_owned());
        let object = if chain {
            Object::NftChain { family, table, name: name.to_string() }
        } else {
            Object::NftSet { family, table, name: name.to_string() }
        };
        Name { family, table: self.table.clone(), name: CString::new(name).expect("from the kernel"), object }
    }
}

/// libnftnl's family for `f`.
fn proto(f: NftFamily) -> ProtoFamily {
    match f {
        NftFamily::Inet => ProtoFamily::Inet,
        NftFamily::Ip => ProtoFamily::Ipv4,
        NftFamily::Ip6 => ProtoFamily::Ipv6,
    }
}

/// The [`Backend`] for nftables. Each call opens its own netlink socket in the calling thread's
/// network namespace.
#[derive(Debug)]
pub struct NftablesBackend {
    /// allowsync's own table, `inet <table>`.
    table: Name,
    /// The IPv4 and IPv6 sets.
    sets: [Name; 2],
    /// [`ENFORCE_CHAIN`] of the own table.
    chain: Name,
    enforce: Option<Enforce>,
    /// What the state file says an earlier run owned and filled.
    recorded: Footprint,
    /// What the last `ensure` or `teardown` left.
    footprint: Option<Footprint>,
}

impl NftablesBackend {
    /// A backend for the table and sets of `config`. Nothing is sent to the kernel before
    /// [`Backend::ensure`]. Fails only on names the kernel cannot take (NUL bytes); the
    /// configuration loader never produces those.
    pub fn new(config: &NftablesConfig) -> Result<Self, BackendError> {
        let table = Name::of(&config.table_object())?;
        let chain = table.child(ENFORCE_CHAIN, true);
        Ok(NftablesBackend {
            sets: [Name::of(&config.set_object(false))?, Name::of(&config.set_object(true))?],
            table,
            chain,
            enforce: config.enforce.clone(),
            recorded: Footprint::default(),
            footprint: None,
        })
    }

    fn set(&self, family: Family) -> &Name {
        &self.sets[family.index()]
    }
}

impl Backend for NftablesBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Looks before it writes: the tables, sets (key type and flags, comments) and the
    /// enforcement chain are queried first, and anything foreign or missing stops it before any
    /// change. Then one transaction creates what is missing and removes what an earlier
    /// configuration left (see `owned.rs`). With everything in place (the enforcement chain
    /// holding exactly its rules, as their comments tell) it commits nothing.
    fn ensure(&mut self) -> Result<(), BackendError> {
        let sock = open_socket()?;
        let plan = self.plan_ensure(&sock)?;
        if plan.steps.is_empty() {
            debug!(table = %self.table.object, "nftables objects already in place");
            self.footprint = Some(plan.footprint);
            return Ok(());
        }
        let dropped = self.commit_ensure(&plan)?;
        self.footprint = Some(plan.footprint_after(self, &dropped));
        info!(
            steps = ?plan.steps.iter().map(|s| s.describe(self)).collect::<Vec<_>>(),
            enforce = self.enforce.is_some(),
            "nftables objects ensured"
        );
        Ok(())
    }

    /// The tables and sets to create, or the enforcement chain or its rules, as `ensure` would
    /// put them back (queries only).
    fn missing(&mut self) -> Result<Vec<String>, BackendError> {
        self.missing_objects(&open_socket()?)
    }

    /// Both sets, and allowsync's own table when anything of ours lives there (a set, the
    /// enforcement chain).
    fn managed(&self) -> Vec<Object> {
        let own = self.uses_own_table().then(|| self.table.object.clone());
        own.into_iter().chain(self.sets.iter().map(|s| s.object.clone())).collect()
    }

    fn set_recorded(&mut self, recorded: &Footprint) {
        self.recorded = recorded.clone();
    }

    fn footprint(&self) -> Option<Footprint> {
        self.footprint.clone()
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let started = Instant::now();
        let sock = open_socket()?;
        // Two dumps are two snapshots: the generation around them makes them one.
        let before = get_generation(&sock)?;
        let read = query::read_set::<u32>(&sock, self.set(Family::V4))
            .and_then(|v4| Ok(AllowSet { v4, v6: query::read_set::<u128>(&sock, self.set(Family::V6))? }));
        let set = match read {
            Err(BackendError::Missing { object }) => return Err(self.missing_error(&sock, &object)?),
            other => other?,
        };
        if get_generation(&sock)? != before {
            return Err(BackendError::Conflict {
                op: "list elements",
                object: format!("{} and {}", self.sets[0].object, self.sets[1].object),
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

    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        let sock = open_socket()?;
        let plan = self.plan_teardown(&sock)?;
        let steps = plan.steps.iter().map(|(s, _, _)| s.clone()).collect();
        let dropped = self.commit_steps(steps, |s| !matches!(s, Step::FlushSet(_)))?;
        let (report, footprint) = plan.outcome(self, &dropped);
        self.footprint = Some(footprint);
        Ok(report)
    }

    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        get_generation(&open_socket()?).map(|g| Some(u64::from(g)))
    }
}

/// A failed kernel call as a [`BackendError`]: a missing privilege makes the backend unavailable.
fn kernel(op: &'static str, object: String, source: io::Error) -> BackendError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            BackendError::Unavailable(format!("{op} on {object}: {source} (needs CAP_NET_ADMIN)"))
        }
        _ => BackendError::Kernel { op, object, cause: source },
    }
}

/// A netlink socket, or why this host cannot give one.
fn open_socket() -> Result<NfSocket, BackendError> {
    NfSocket::open().map_err(|e| match e.raw_os_error() {
        Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => {
            BackendError::Unavailable(format!("netlink netfilter socket: {e} (no nf_tables in this kernel?)"))
        }
        _ => kernel("open netlink socket", "nf_tables".into(), e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_network_byte_order() {
        assert_eq!(&0x0a000001u32.key()[..4], &[10, 0, 0, 1]);
        assert_eq!(u32::from_key(&[10, 0, 0, 1]), Some(0x0a000001));
        assert_eq!(u128::from_key(&1u128.key()), Some(1));
        assert_eq!(1u128.key()[15], 1);
        assert_eq!(u32::from_key(&[1, 2, 3]), None);
    }
}
