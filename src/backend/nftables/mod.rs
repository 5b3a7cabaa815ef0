//! The nftables backend: the allowlist lives in two interval sets of allowsync's own table,
//! `inet <table>`, written and read over netlink with libnftnl (no `nft` process).
//!
//! What it manages, all inside that one table:
//!
//! - set `<set_v4>` (`type ipv4_addr; flags interval`) and set `<set_v6>` (`type ipv6_addr;
//!   flags interval`), created when missing. An existing set of another type or flags is
//!   [`BackendError::Foreign`] and never changed;
//! - with `enforce`, the base chain [`ENFORCE_CHAIN`] (`policy accept`): loopback is accepted
//!   first, then traffic to the enforced ports is dropped unless its source is in the set of its
//!   family ([`enforce_rule_text`] prints the rules). With `scope: host` (the default) it is
//!   `type filter hook prerouting priority mangle` and its rules match `fib daddr type local`:
//!   every packet addressed to this host, by its port before DNAT, so a port published to a
//!   container is covered too; with `scope: local` it is `type filter hook input priority
//!   filter`, as in earlier versions, whose chain is replaced in one transaction. Without
//!   `enforce` that chain is removed if an earlier configuration created it; other chains of the
//!   table (an operator's own rules using the sets) are never touched.
//!
//! This file holds the [`Backend`] impl and its decisions (what to create, adopt, refuse or
//! remove). The layers under it:
//!
//! - `batch.rs`: every transaction sent, each one nf_tables batch that the kernel applies whole
//!   or not at all;
//! - `query.rs`: reading the kernel (table, sets, chain, generation, element dumps) and
//!   rebuilding ranges from interval elements;
//! - `nftnl.rs`: every libnftnl C call, behind safe functions;
//! - `../netlink.rs`: the socket transport.

mod batch;
mod nftnl;
mod query;

use std::ffi::{CStr, CString};
use std::io;
use std::time::Instant;

use ::nftnl::expr::{Ipv4HeaderField, Ipv6HeaderField, NetworkHeaderField, Payload};
use tracing::{debug, info, warn};

pub use batch::{enforce_chain_text, enforce_rule_text};
use query::{ChainInfo, SetInfo, get_generation};

use super::netlink::NfSocket;
use super::{Backend, BackendError, Family};
use crate::config::{Enforce, EnforceScope, NftablesConfig};
use crate::prefixes::{Addr, AllowSet, Diff};

/// Name of the enforcement chain in allowsync's table. Reserved: allowsync creates, flushes and
/// deletes a chain of this name in its table.
pub const ENFORCE_CHAIN: &str = "enforce";

/// The nf_tables data types of the set keys (`ipv4_addr`, `ipv6_addr` in nft's `datatype.h`).
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;

impl Family {
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

    /// The scope of the enforcement chain in the kernel, if it is allowsync's: only a chain of
    /// one of allowsync's shapes is adopted or replaced (with `enforce`) or removed (without); a
    /// different chain of that name is refused, or left alone.
    fn our_chain(&self, chain: Option<&ChainInfo>) -> Result<Option<EnforceScope>, BackendError> {
        let Some(c) = chain else { return Ok(None) };
        match c.enforcement_scope() {
            Some(scope) => Ok(Some(scope)),
            None if self.enforce.is_some() => Err(BackendError::Foreign {
                object: self.chain_object(),
                why: format!(
                    "it is not a `type filter hook prerouting priority mangle` (or `hook input priority \
                     filter`) base chain ({c}); the name is reserved for allowsync's enforcement"
                ),
            }),
            None => Ok(None),
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

        let chain = self.our_chain(chain.as_ref())?;
        let changes = !table_exists || !missing.is_empty() || self.enforce.is_some() || chain.is_some();
        if !changes {
            debug!(table = %self.table_object(), "nftables objects already in place");
            return Ok(());
        }
        match (&self.enforce, chain) {
            (None, Some(_)) => {
                warn!(chain = %self.chain_object(), "enforcement is not configured: removing the enforcement chain");
            }
            (Some(e), Some(old)) if e.scope != old => info!(
                chain = %self.chain_object(),
                from = ?old,
                to = ?e.scope,
                "replacing the enforcement chain for the configured scope"
            ),
            _ => {}
        }
        self.ensure_transaction(&missing, chain).commit()?;
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
