//! The ipset netlink protocol: what the `ipset` program itself speaks to the kernel
//! (`NFNL_SUBSYS_IPSET` messages on a `NETLINK_NETFILTER` socket, protocol version 6, see the
//! kernel's `include/uapi/linux/netfilter/ipset/ip_set.h`), over the project's netlink transport
//! (`backend/netlink.rs`, which holds all the `unsafe`). Builds the requests, decodes the binary
//! listings and maps the kernel's error numbers (errno and `IPSET_ERR_*`) to [`BackendError`].
//!
//! ipset has no transactions: every message of a batch is carried out (or refused) on its own,
//! so every message asks for an acknowledgement and [`Outcome`] says which ones the kernel
//! refused. The sequence number of a message is its index in the batch plus one.

use std::io;

use crate::backend::BackendError;
use crate::backend::netlink::{NfSocket, attributes};

const NFNL_SUBSYS_IPSET: u16 = 6;
/// The oldest protocol every kernel since 3.x speaks; the kernel accepts 6 and 7.
const PROTOCOL: u8 = 6;
/// `IPSET_MAXNAMELEN`, the NUL included.
pub(super) const MAXNAMELEN: usize = 32;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
/// `sizeof(struct nfgenmsg)`.
const NFGENMSG_LEN: usize = 4;

/// `enum ipset_cmd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(super) enum Cmd {
    Protocol = 1,
    Create = 2,
    Destroy = 3,
    Flush = 4,
    Swap = 6,
    List = 7,
    Add = 9,
    Del = 10,
    Type = 13,
}

// Command-level attributes.
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_SETNAME2: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_FLAGS: u16 = 6;
const ATTR_DATA: u16 = 7;
const ATTR_ADT: u16 = 8;
const ATTR_LINENO: u16 = 9;
// Data attributes (in `ATTR_DATA`).
const ATTR_IP: u16 = 1;
const ATTR_CIDR: u16 = 3;
const ATTR_TIMEOUT: u16 = 6;
const ATTR_CADT_FLAGS: u16 = 8;
const ATTR_MARKMASK: u16 = 11;
const ATTR_BITMASK: u16 = 12;
const ATTR_INITVAL: u16 = 17;
const ATTR_HASHSIZE: u16 = 18;
const ATTR_MAXELEM: u16 = 19;
const ATTR_NETMASK: u16 = 20;
const ATTR_BUCKETSIZE: u16 = 21;
const ATTR_ELEMENTS: u16 = 24;
const ATTR_REFERENCES: u16 = 25;
const ATTR_MEMSIZE: u16 = 26;
// In `ATTR_IP`.
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;

/// `IPSET_FLAG_LIST_HEADER`: list a set's header, not its members.
const FLAG_LIST_HEADER: u32 = 1 << 2;
/// `IPSET_FLAG_EXIST`, the `-exist` of `ipset`: adding what is there, deleting what is not,
/// creating a set that exists alike or destroying one that does not is no error. The kernel
/// takes it from the *absence* of `NLM_F_EXCL` on the message (`flag_exist()` in
/// `ip_set_core.c`), so every message here carries `NLM_F_EXCL` unless asked for this.
pub(super) const FLAG_EXIST: u32 = 1;
/// `IPSET_FLAG_NOMATCH` (per element).
const CADT_NOMATCH: u32 = 1 << 2;
/// The set options a header's `CADT_FLAGS` may carry, by bit.
const CADT_OPTIONS: [(u32, &str); 4] =
    [(1 << 3, "counters"), (1 << 4, "comment"), (1 << 5, "forceadd"), (1 << 6, "skbinfo")];

// `enum ipset_errno` and the hash types' own.
const ERR_PROTOCOL: i32 = 4097;
const ERR_FIND_TYPE: i32 = 4098;
const ERR_BUSY: i32 = 4100;
const ERR_EXIST_SETNAME2: i32 = 4101;
const ERR_TYPE_MISMATCH: i32 = 4102;
const ERR_EXIST: i32 = 4103;
const ERR_REFERENCED: i32 = 4108;
const ERR_HASH_FULL: i32 = 4352;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// An address family as ipset's messages carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Af {
    Inet,
    Inet6,
}

impl Af {
    fn nfproto(self) -> u8 {
        match self {
            Af::Inet => NFPROTO_IPV4,
            Af::Inet6 => NFPROTO_IPV6,
        }
    }

    /// ipset's name of the family (`family inet`).
    pub(super) fn name(self) -> &'static str {
        match self {
            Af::Inet => "inet",
            Af::Inet6 => "inet6",
        }
    }
}

/// Netlink messages being built into one buffer, to go out in one `sendmsg`.
#[derive(Default)]
pub(super) struct Batch {
    buf: Vec<u8>,
    /// Where the current message starts.
    msg: usize,
    /// Open nested attributes.
    nests: Vec<usize>,
    /// Messages so far.
    count: u32,
}

impl Batch {
    pub(super) fn new() -> Self {
        Batch::default()
    }

    /// Starts a message of `cmd` (with the protocol attribute every command needs) that asks
    /// for an acknowledgement, strict (`NLM_F_EXCL`) unless `flags` has [`FLAG_EXIST`]. Its
    /// sequence number is the new [`Batch::len`].
    pub(super) fn begin(&mut self, cmd: Cmd, extra_flags: u16) -> &mut Self {
        self.begin_with(cmd, extra_flags, 0)
    }

    fn begin_with(&mut self, cmd: Cmd, extra_flags: u16, flags: u32) -> &mut Self {
        self.count += 1;
        self.msg = self.buf.len();
        let ty = (NFNL_SUBSYS_IPSET << 8) | cmd as u16;
        let excl = if flags & FLAG_EXIST != 0 { 0 } else { libc::NLM_F_EXCL };
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | excl) as u16 | extra_flags;
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `end`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.count.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg: family, version NFNETLINK_V0, res_id 0.
        self.buf.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        self.u8(ATTR_PROTOCOL, PROTOCOL)
    }

    /// Ends the current message.
    pub(super) fn end(&mut self) -> &mut Self {
        let len = (self.buf.len() - self.msg) as u32;
        self.buf[self.msg..self.msg + 4].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.attr(ty, &[v])
    }

    fn be32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty | NLA_F_NET_BYTEORDER, &v.to_be_bytes())
    }

    fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    pub(super) fn setname(&mut self, name: &str) -> &mut Self {
        self.string(ATTR_SETNAME, name)
    }

    fn nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(ty | NLA_F_NESTED, &[])
    }

    fn close(&mut self) -> &mut Self {
        let at = self.nests.pop().expect("a nest to close");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// One element's data attributes: the address (nested, network byte order) and the prefix
    /// length.
    fn element(&mut self, addr: &[u8], cidr: u8) -> &mut Self {
        let ty = if addr.len() == 4 { ATTR_IPADDR_IPV4 } else { ATTR_IPADDR_IPV6 };
        self.nest(ATTR_DATA).nest(ATTR_IP).attr(ty | NLA_F_NET_BYTEORDER, addr).close();
        self.u8(ATTR_CIDR, cidr).close()
    }

    /// `ipset create NAME hash:net family AF hashsize H maxelem M` at `revision`.
    pub(super) fn create(
        &mut self,
        name: &str,
        af: Af,
        revision: u8,
        hashsize: u32,
        maxelem: u32,
    ) -> &mut Self {
        self.begin(Cmd::Create, 0).setname(name).string(ATTR_TYPENAME, "hash:net");
        self.u8(ATTR_REVISION, revision).u8(ATTR_FAMILY, af.nfproto());
        self.nest(ATTR_DATA).be32(ATTR_HASHSIZE, hashsize).be32(ATTR_MAXELEM, maxelem).close();
        self.end()
    }

    /// A message of `cmd` (destroy, flush) about set `name` alone.
    pub(super) fn named(&mut self, cmd: Cmd, name: &str) -> &mut Self {
        self.begin(cmd, 0).setname(name).end()
    }

    pub(super) fn swap(&mut self, a: &str, b: &str) -> &mut Self {
        self.begin(Cmd::Swap, 0).setname(a).string(ATTR_SETNAME2, b).end()
    }

    /// One add or del of one element: its own acknowledgement says whether it took effect.
    pub(super) fn one(&mut self, cmd: Cmd, name: &str, addr: &[u8], cidr: u8) -> &mut Self {
        self.begin(cmd, 0).setname(name).element(addr, cidr).end()
    }

    /// Adds or deletes many elements, as few messages as a nested attribute's 64 KiB allow
    /// (the kernel stops a message at its first refused element).
    pub(super) fn many<B: AsRef<[u8]>>(
        &mut self,
        cmd: Cmd,
        name: &str,
        flags: u32,
        elements: impl IntoIterator<Item = (B, u8)>,
    ) -> &mut Self {
        // Room for the largest element (IPv6: 36 bytes) under the u16 length of `ATTR_ADT`.
        const ADT_MAX: usize = 65535 - 64;
        let mut open = false;
        for (addr, cidr) in elements {
            if open && self.buf.len() - self.nests[0] > ADT_MAX {
                self.close().end();
                open = false;
            }
            if !open {
                self.begin_with(cmd, 0, flags).setname(name);
                // The kernel wants a line number with ADT (it reports a refused one by it).
                self.be32(ATTR_LINENO, 0).nest(ATTR_ADT);
                open = true;
            }
            self.element(addr.as_ref(), cidr);
        }
        if open {
            self.close().end();
        }
        self
    }

    /// Messages so far (the last one's sequence number).
    pub(super) fn len(&self) -> usize {
        self.count as usize
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sends every message in one `sendmsg` and collects the acknowledgements.
    pub(super) fn send(self) -> io::Result<Outcome> {
        if self.is_empty() {
            return Ok(Outcome { refused: Vec::new() });
        }
        let sock = NfSocket::open()?;
        let replies = sock.send_batch(&[&self.buf], self.len())?;
        if replies.acked + replies.errors.len() != self.len() {
            // A reply lost is an outcome unknown: the caller reads the set again.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} of {} ipset messages answered", replies.acked + replies.errors.len(), self.len()),
            ));
        }
        Ok(Outcome { refused: replies.errors })
    }
}

/// What the kernel answered to a [`Batch`].
#[derive(Debug)]
pub(super) struct Outcome {
    /// `(sequence number, error number)` of every refused message.
    pub(super) refused: Vec<(u32, i32)>,
}

impl Outcome {
    /// The first refusal as an error.
    pub(super) fn check(&self, op: &'static str, object: &str) -> Result<(), BackendError> {
        match self.refused.first() {
            None => Ok(()),
            Some(&(_, errno)) => Err(error(op, object, errno)),
        }
    }
}

/// Sends one message and waits for its acknowledgement.
pub(super) fn exchange(batch: Batch, op: &'static str, object: &str) -> Result<(), BackendError> {
    batch.send().map_err(|e| io_error(op, object, e))?.check(op, object)
}

/// A set as the kernel lists it.
#[derive(Debug, Clone, Default)]
pub(super) struct Listing {
    pub(super) type_name: String,
    pub(super) revision: u8,
    /// `inet`, `inet6`, or the number of another family.
    pub(super) family: String,
    pub(super) maxelem: u32,
    /// Entries, as the header counts them.
    pub(super) elements: u32,
    /// Options other than those every plain `hash:net` set has (`timeout`, `counters`, …).
    pub(super) extra: Vec<String>,
    /// The members' addresses in network order, one after the other (4 or 16 bytes each), and
    /// their prefix lengths, with a listing of members.
    pub(super) addrs: Vec<u8>,
    pub(super) cidrs: Vec<u8>,
    /// Whether the members were asked for.
    pub(super) with_members: bool,
    /// Members carrying something allowsync does not model (`nomatch`, a timeout, counters),
    /// described.
    pub(super) odd: Option<String>,
}

/// Lists set `name` (with `members`, or its header only). `Ok(None)` when there is no such set.
pub(super) fn list(
    name: &str,
    members: bool,
    op: &'static str,
    object: &str,
) -> Result<Option<Listing>, BackendError> {
    let mut b = Batch::new();
    b.begin(Cmd::List, libc::NLM_F_DUMP as u16).setname(name);
    if !members {
        b.be32(ATTR_FLAGS, FLAG_LIST_HEADER);
    }
    b.end();
    let sock = NfSocket::open().map_err(|e| io_error(op, object, e))?;
    let mut out = Listing { with_members: members, ..Listing::default() };
    let mut header = false;
    let got = sock.request(&b.buf, b.count, |m| {
        let attrs = m.payload(NFGENMSG_LEN);
        decode_list(attrs, &mut out, &mut header);
        Ok(())
    });
    match got {
        Ok(()) if header => Ok(Some(out)),
        Ok(()) => Err(BackendError::Kernel {
            op,
            object: object.to_string(),
            cause: io::Error::new(io::ErrorKind::InvalidData, "the kernel listed no header"),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(io_error(op, object, e)),
    }
}

/// Decodes one message of a listing into `out`.
fn decode_list(attrs: &[u8], out: &mut Listing, header: &mut bool) {
    for (ty, v) in attributes(attrs) {
        match ty {
            ATTR_TYPENAME => {
                out.type_name =
                    String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
            }
            ATTR_REVISION => out.revision = v.first().copied().unwrap_or(0),
            ATTR_FAMILY => {
                out.family = match v.first().copied() {
                    Some(NFPROTO_IPV4) => "inet".into(),
                    Some(NFPROTO_IPV6) => "inet6".into(),
                    other => format!("{}", other.unwrap_or(0)),
                }
            }
            ATTR_DATA => {
                *header = true;
                decode_header(v, out);
            }
            ATTR_ADT => {
                for (ty, data) in attributes(v) {
                    if ty == ATTR_DATA {
                        decode_member(data, out);
                    }
                }
            }
            _ => {}
        }
    }
}

fn be32(v: &[u8]) -> u32 {
    v.get(..4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
}

fn decode_header(data: &[u8], out: &mut Listing) {
    for (ty, v) in attributes(data) {
        match ty {
            ATTR_MAXELEM => out.maxelem = be32(v),
            ATTR_ELEMENTS => {
                out.elements = be32(v);
                // The members follow: room for all of them at once (the family came first).
                let n = if out.with_members { out.elements as usize } else { 0 };
                out.cidrs.reserve(n);
                out.addrs.reserve(n * if out.family == "inet6" { 16 } else { 4 });
            }
            ATTR_TIMEOUT => out.extra.push(format!("timeout {}", be32(v))),
            ATTR_NETMASK => out.extra.push(format!("netmask {}", v.first().copied().unwrap_or(0))),
            ATTR_MARKMASK => out.extra.push(format!("markmask {:#x}", be32(v))),
            ATTR_BITMASK => out.extra.push("bitmask".into()),
            ATTR_CADT_FLAGS => {
                let f = be32(v);
                out.extra
                    .extend(CADT_OPTIONS.iter().filter(|(bit, _)| f & bit != 0).map(|(_, n)| n.to_string()));
            }
            ATTR_HASHSIZE | ATTR_BUCKETSIZE | ATTR_INITVAL | ATTR_REFERENCES | ATTR_MEMSIZE => {}
            _ => {}
        }
    }
}

fn decode_member(data: &[u8], out: &mut Listing) {
    let (mut addr, mut cidr, mut odd) = (None, None, None);
    for (ty, v) in attributes(data) {
        match ty {
            ATTR_IP => {
                addr = attributes(v)
                    .find(|&(t, a)| {
                        (t == ATTR_IPADDR_IPV4 && a.len() == 4) || (t == ATTR_IPADDR_IPV6 && a.len() == 16)
                    })
                    .map(|(_, a)| a)
            }
            ATTR_CIDR => cidr = v.first().copied(),
            ATTR_CADT_FLAGS if be32(v) & CADT_NOMATCH != 0 => odd = Some("nomatch"),
            ATTR_CADT_FLAGS => {}
            _ => odd = Some("an option (timeout, counters, comment or skbinfo)"),
        }
    }
    match addr {
        Some(a) => {
            let full = (a.len() * 8) as u8;
            let cidr = cidr.unwrap_or(full);
            if let Some(o) = odd {
                out.odd.get_or_insert_with(|| format!("{} with {o}", show(a, cidr)));
            }
            out.addrs.extend_from_slice(a);
            out.cidrs.push(cidr);
        }
        None => {
            out.odd.get_or_insert_with(|| "an entry without an address".into());
        }
    }
}

/// A member for a message: `a.b.c.d/len` or `x::/len`.
pub(super) fn show(addr: &[u8], cidr: u8) -> String {
    match addr.len() {
        4 => format!("{}/{cidr}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(addr).expect("4 bytes"))),
        16 => format!("{}/{cidr}", std::net::Ipv6Addr::from(<[u8; 16]>::try_from(addr).expect("16 bytes"))),
        _ => format!("{addr:?}/{cidr}"),
    }
}

/// The highest revision of `hash:net` this kernel has for `af` (what `ipset create` uses).
pub(super) fn revision(af: Af, op: &'static str, object: &str) -> Result<u8, BackendError> {
    let mut b = Batch::new();
    b.begin(Cmd::Type, 0).string(ATTR_TYPENAME, "hash:net").u8(ATTR_FAMILY, af.nfproto()).end();
    let sock = NfSocket::open().map_err(|e| io_error(op, object, e))?;
    let mut rev = None;
    sock.request(&b.buf, b.count, |m| {
        rev = rev.or(m.attr(NFGENMSG_LEN, ATTR_REVISION).and_then(|v| v.first().copied()));
        Ok(())
    })
    .map_err(|e| io_error(op, object, e))?;
    rev.ok_or_else(|| BackendError::Kernel {
        op,
        object: object.to_string(),
        cause: io::Error::new(io::ErrorKind::InvalidData, "no revision of hash:net in the kernel's answer"),
    })
}

/// Asks the kernel for its protocol version: the first contact, where a kernel without ipset
/// or a process without CAP_NET_ADMIN is told apart from anything else.
pub(super) fn probe() -> Result<(), BackendError> {
    let mut b = Batch::new();
    b.begin(Cmd::Protocol, 0).end();
    let op = "open ipset session";
    let object = "the kernel's ip_set";
    let sock = NfSocket::open().map_err(|e| io_error(op, object, e))?;
    match sock.request(&b.buf, b.count, |_| Ok(())) {
        Ok(()) => Ok(()),
        // No ip_set subsystem registered (and none could be loaded): nfnetlink says EINVAL.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
            Err(no_ip_set(op, object, &e.to_string()))
        }
        Err(e) => Err(io_error(op, object, e)),
    }
}

fn no_ip_set(op: &str, object: &str, why: &str) -> BackendError {
    BackendError::Unavailable(format!(
        "{op} on {object}: {why}: this kernel has no ip_set support (load it with `modprobe ip_set ip_set_hash_net`, or use the nftables backend)"
    ))
}

/// An error of the transport itself (socket, send, receive) or a refusal carried as errno.
pub(super) fn io_error(op: &'static str, object: &str, e: io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(n) => error(op, object, n),
        None => BackendError::Kernel { op, object: object.to_string(), cause: e },
    }
}

/// Maps an error number of the kernel (errno, or ipset's own above 4096) to a [`BackendError`].
pub(super) fn error(op: &'static str, object: &str, errno: i32) -> BackendError {
    let object = object.to_string();
    let kernel = |kind: io::ErrorKind, msg: &str| BackendError::Kernel {
        op,
        object: object.clone(),
        cause: io::Error::new(kind, format!("{msg} (ipset error {errno})")),
    };
    match errno {
        // Like a missing nftables set: not "empty"; `ensure` recreates it.
        libc::ENOENT | ERR_EXIST_SETNAME2 => BackendError::Missing { object },
        libc::EPERM | libc::EACCES => BackendError::Unavailable(format!(
            "{op} on {object}: operation not permitted: the ipset backend needs CAP_NET_ADMIN (run it as root, or grant the capability, as the packaged unit does)"
        )),
        libc::EPROTONOSUPPORT => no_ip_set(op, &object, "protocol not supported"),
        ERR_FIND_TYPE => BackendError::Unavailable(format!(
            "{op} on {object}: the kernel has no hash:net set type (load it with `modprobe ip_set_hash_net`)"
        )),
        // Adding what is there, deleting what is not, creating what exists: someone changed
        // the set since it was read.
        ERR_EXIST => BackendError::Conflict {
            op,
            object,
            detail: "an element (or the set) is already there, or no longer is".into(),
        },
        ERR_HASH_FULL => kernel(io::ErrorKind::StorageFull, "the set is full (maxelem reached)"),
        ERR_BUSY | ERR_REFERENCED => {
            kernel(io::ErrorKind::ResourceBusy, "the set is in use by a kernel component")
        }
        ERR_TYPE_MISMATCH => kernel(io::ErrorKind::InvalidInput, "the sets are of different types"),
        ERR_PROTOCOL => kernel(io::ErrorKind::InvalidData, "the kernel refused the message (protocol error)"),
        n if n < 4096 => BackendError::Kernel { op, object, cause: io::Error::from_raw_os_error(n) },
        _ => kernel(io::ErrorKind::Other, "refused by the kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_the_kernel_reads_them() {
        let mut b = Batch::new();
        b.one(Cmd::Add, "s", &[10, 0, 0, 0], 8);
        let m = &b.buf;
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), (6 << 8) | 9);
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&m[20..]).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(attrs[0], (ATTR_PROTOCOL, vec![PROTOCOL]));
        assert_eq!(attrs[1], (ATTR_SETNAME, b"s\0".to_vec()));
        let mut listing = Listing::default();
        decode_member(&attrs[2].1, &mut listing);
        assert_eq!((listing.addrs, listing.cidrs), (vec![10, 0, 0, 0], vec![8]));
        assert!(listing.odd.is_none());
        // The data attribute is nested, the address in network byte order.
        let data_ty = u16::from_ne_bytes(m[20 + 8 + 8 + 2..20 + 8 + 8 + 4].try_into().unwrap());
        assert_eq!(data_ty, ATTR_DATA | NLA_F_NESTED);
    }

    /// The kernel reads `-exist` from a *missing* `NLM_F_EXCL`: strict unless asked.
    #[test]
    fn messages_are_strict_unless_exist_is_asked_for() {
        let flags = |exist: u32| {
            let mut b = Batch::new();
            b.many(Cmd::Del, "s", exist, [([10u8, 0, 0, 1], 32)]);
            u16::from_ne_bytes(b.buf[6..8].try_into().unwrap())
        };
        assert_ne!(flags(0) & libc::NLM_F_EXCL as u16, 0);
        assert_eq!(flags(FLAG_EXIST) & libc::NLM_F_EXCL as u16, 0);
        let mut b = Batch::new();
        b.named(Cmd::Destroy, "s");
        assert_ne!(u16::from_ne_bytes(b.buf[6..8].try_into().unwrap()) & libc::NLM_F_EXCL as u16, 0);
    }

    #[test]
    fn many_elements_are_split_under_the_attribute_limit() {
        let addrs: Vec<[u8; 16]> = (0..5000u32).map(|i| (u128::from(i) << 64).to_be_bytes()).collect();
        let mut b = Batch::new();
        b.many(Cmd::Add, "s", 0, addrs.iter().map(|a| (a, 64)));
        assert!(b.len() > 1);
        let mut n = 0;
        crate::backend::netlink::for_each_message(&b.buf, |m| {
            let adt = m.attr(NFGENMSG_LEN, ATTR_ADT).unwrap();
            n += attributes(adt).count();
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 5000);
    }

    #[test]
    fn kernel_errors_are_typed() {
        assert!(error("x", "s", libc::ENOENT).is_missing());
        assert!(error("x", "s", ERR_EXIST).is_conflict());
        assert!(error("x", "s", libc::EPERM).to_string().contains("CAP_NET_ADMIN"));
        assert!(matches!(
            error("x", "s", ERR_HASH_FULL),
            BackendError::Kernel { cause, .. } if cause.kind() == io::ErrorKind::StorageFull
        ));
        assert!(error("x", "s", libc::EPROTONOSUPPORT).to_string().contains("ip_set"));
    }
}
