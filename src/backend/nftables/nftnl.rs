//! Every call into libnftnl's C API (`nftnl_sys`), behind safe functions: the request messages
//! the queries send, the parsers of the kernel's replies, and the four things the safe `nftnl`
//! crate cannot express (a set's `flags interval`, interval-end elements, an inverted lookup,
//! the `fib` expression).
//!
//! With `../netlink.rs` this is the only code of allowsync allowed `unsafe`; every block says
//! why it is sound. Nothing here decides anything: it only translates.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;

use ::nftnl::expr::Expression;
use ::nftnl::nftnl_sys as sys;
use ::nftnl::set::{Set, SetKey};
use ::nftnl::{ProtoFamily, Rule, Table};

use super::query::{ChainInfo, SetInfo};
use crate::backend::netlink::{AlignedBuf, Message};

/// Room for one request message (names are at most 256 bytes).
const REQUEST_BUF_BYTES: usize = 8 * 1024;

/// One request message, in a buffer of its own.
pub(super) struct Request {
    buf: AlignedBuf,
    len: usize,
}

impl Request {
    /// The message, as `NfSocket::request` sends it.
    pub(super) fn bytes(&self) -> &[u8] {
        self.buf.as_slice(self.len)
    }
}

/// `NFT_MSG_GETTABLE` for `inet table` (acknowledged).
pub(super) fn table_request(seq: u32, table: &CStr) -> Request {
    inet_request(seq, libc::NFT_MSG_GETTABLE, libc::NLM_F_ACK, |nlh| {
        // SAFETY: allocation checked for NULL; libnftnl copies the name, writes the payload into
        // the request buffer behind `nlh` (room checked by `build`), and the object is freed
        // afterwards.
        unsafe {
            let t = allocated(sys::nftnl_table_alloc()).as_ptr();
            sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, libc::NFPROTO_INET as u32);
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, table.as_ptr());
            sys::nftnl_table_nlmsg_build_payload(nlh, t);
            sys::nftnl_table_free(t);
        }
    })
}

/// `NFT_MSG_GETCHAIN` for chain `chain` of `inet table` (acknowledged).
pub(super) fn chain_request(seq: u32, table: &CStr, chain: &CStr) -> Request {
    inet_request(seq, libc::NFT_MSG_GETCHAIN, libc::NLM_F_ACK, |nlh| {
        // SAFETY: as in `table_request`.
        unsafe {
            let c = allocated(sys::nftnl_chain_alloc()).as_ptr();
            sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_FAMILY as u16, libc::NFPROTO_INET as u32);
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, chain.as_ptr());
            sys::nftnl_chain_nlmsg_build_payload(nlh, c);
            sys::nftnl_chain_free(c);
        }
    })
}

/// `NFT_MSG_GETSET` for set `name` of `inet table` (acknowledged).
pub(super) fn set_request(seq: u32, table: &CStr, name: &CStr) -> Request {
    let request = NftnlSet::new(table, name);
    inet_request(seq, libc::NFT_MSG_GETSET, libc::NLM_F_ACK, |nlh| {
        // SAFETY: `nlh` heads a request buffer with room for the payload (see `build`);
        // `request` is live.
        unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, request.ptr()) }
    })
}

/// `NFT_MSG_GETSETELEM` dump of set `name` of `inet table`.
pub(super) fn set_elements_request(seq: u32, table: &CStr, name: &CStr) -> Request {
    let request = NftnlSet::new(table, name);
    inet_request(seq, libc::NFT_MSG_GETSETELEM, libc::NLM_F_DUMP, |nlh| {
        // SAFETY: as in `set_request`; `request` has no elements, so only the table and set
        // names are written.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, request.ptr()) }
    })
}

/// `NFT_MSG_GETGEN`: the ruleset generation (acknowledged).
pub(super) fn generation_request(seq: u32) -> Request {
    build(libc::NFT_MSG_GETGEN, libc::AF_UNSPEC as u16, libc::NLM_F_ACK, seq, |_| {})
}

/// A request of family `inet`.
fn inet_request(
    seq: u32,
    ty: libc::c_int,
    flags: libc::c_int,
    payload: impl FnOnce(*mut libc::nlmsghdr),
) -> Request {
    build(ty, libc::NFPROTO_INET as u16, flags, seq, payload)
}

/// Builds a request header into a fresh buffer and lets `payload` add attributes.
fn build(
    ty: libc::c_int,
    family: u16,
    flags: libc::c_int,
    seq: u32,
    payload: impl FnOnce(*mut libc::nlmsghdr),
) -> Request {
    let mut buf = AlignedBuf::zeroed(REQUEST_BUF_BYTES);
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
    Request { buf, len }
}

/// A libnftnl allocation, checked: out of memory aborts, as nftnl itself handles it.
fn allocated<T>(p: *mut T) -> NonNull<T> {
    NonNull::new(p).unwrap_or_else(|| std::process::abort())
}

/// An owned `nftnl_set` used for requests and for parsing replies.
struct NftnlSet(NonNull<sys::nftnl_set>);

impl NftnlSet {
    fn alloc() -> Self {
        // SAFETY: plain allocation, checked for NULL by `allocated`.
        NftnlSet(allocated(unsafe { sys::nftnl_set_alloc() }))
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

/// The key type, key length and flags of an `NFT_MSG_NEWSET` reply.
pub(super) fn parse_set(m: &Message<'_>) -> io::Result<SetInfo> {
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

/// The hook, priority and type of an `NFT_MSG_NEWCHAIN` reply.
pub(super) fn parse_chain(m: &Message<'_>) -> io::Result<ChainInfo> {
    // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; attribute
    // getters are only called for attributes that are set, and the type string is copied
    // before the chain is freed.
    unsafe {
        let c = allocated(sys::nftnl_chain_alloc()).as_ptr();
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

/// Calls `f(key, is_interval_end)` for every element of one `NFT_MSG_NEWSETELEM` dump message.
pub(super) fn for_each_element(m: &Message<'_>, mut f: impl FnMut(&[u8], bool)) -> io::Result<()> {
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
        let iter = allocated(sys::nftnl_set_elems_iter_create(s.ptr()));
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
pub(super) fn parse_generation(m: &Message<'_>) -> io::Result<u32> {
    // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; the id is read
    // only when present; the object is freed before returning.
    unsafe {
        let g = allocated(sys::nftnl_gen_alloc()).as_ptr();
        let ok = sys::nftnl_gen_nlmsg_parse(m.as_ptr(), g) >= 0
            && sys::nftnl_gen_is_set(g, sys::NFTNL_GEN_ID as u16);
        let id = ok.then(|| sys::nftnl_gen_get_u32(g, sys::NFTNL_GEN_ID as u16));
        sys::nftnl_gen_free(g);
        id.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADMSG))
    }
}

/// A new expression of type `name` (`lookup`, `fib`, ...).
fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: plain allocation by name (libnftnl copies nothing from it afterwards), checked.
    allocated(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
}

/// `<saddr> != @set`: a lookup with `NFT_LOOKUP_F_INV`, which nftnl's `Lookup` cannot express.
pub(super) struct NotInSet<'a> {
    pub(super) set: &'a CStr,
}

impl Expression for NotInSet<'_> {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"lookup");
        // SAFETY: the expression is live; libnftnl copies the set name; the rule takes
        // ownership of the returned expression.
        unsafe {
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG as u16, libc::NFT_REG_1 as u32);
            sys::nftnl_expr_set_str(e, sys::NFTNL_EXPR_LOOKUP_SET as u16, self.set.as_ptr());
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_LOOKUP_FLAGS as u16, libc::NFT_LOOKUP_F_INV as u32);
            expr
        }
    }
}

/// From linux/netfilter/nf_tables.h (neither the libc crate nor nftnl_sys has them):
/// `enum nft_fib_result`'s `NFT_FIB_RESULT_ADDRTYPE` and `enum nft_fib_flags`' `NFTA_FIB_F_DADDR`.
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;

/// `fib daddr type`: the route type (`RTN_*`, a host-order u32) of the packet's destination
/// address into register 1, as nft generates it (`[ fib daddr type => reg 1 ]`).
pub(super) struct FibDaddrType;

impl Expression for FibDaddrType {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"fib");
        // SAFETY: the expression is live; libnftnl copies the u32 attributes; the rule takes
        // ownership of the returned expression.
        unsafe {
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_FIB_DREG as u16, libc::NFT_REG_1 as u32);
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_FIB_RESULT as u16, NFT_FIB_RESULT_ADDRTYPE);
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_FIB_FLAGS as u16, NFTA_FIB_F_DADDR);
            expr
        }
    }
}

/// A named `flags interval` set of key type `K` (what `Set::new_named` lacks: the flags).
pub(super) fn interval_set<'a, K: SetKey>(name: &CStr, id: u32, table: &'a Table) -> Set<'a, K> {
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

/// Appends one element with `key` (at most 16 bytes) and `flags` to `set`'s element list.
pub(super) fn append_element<K>(set: &Set<'_, K>, key: &[u8], flags: u32) {
    assert!(key.len() <= 16, "an nftables address key is at most 16 bytes");
    // SAFETY: the element is allocated by libnftnl (checked for NULL), `nftnl_set_elem_set`
    // copies `key` (at most 16 bytes, checked above, within libnftnl's key buffer), and
    // `nftnl_set_elem_add` hands the element to the live set, which frees it.
    unsafe {
        let e = allocated(sys::nftnl_set_elem_alloc()).as_ptr();
        sys::nftnl_set_elem_set(e, sys::NFTNL_SET_ELEM_KEY as u16, key.as_ptr().cast(), key.len() as u32);
        if flags != 0 {
            sys::nftnl_set_elem_set_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16, flags);
        }
        sys::nftnl_set_elem_add(set.as_ptr().as_ptr(), e);
    }
}

/// How libnftnl prints an `NFT_MSG_NEWRULE` or `NFT_MSG_NEWCHAIN` message of a batch: for a
/// rule the expressions as `nft --debug=netlink` shows them (`[ fib daddr type => reg 1 ]`
/// ...), for a chain its name, hook and priority. `None` for any other message. For the
/// recorder tests, which compare what allowsync sends with what nft sends.
#[cfg(test)]
pub(super) fn describe(m: &Message<'_>) -> Option<String> {
    let kind = i32::from(m.ty & 0xff);
    if kind != libc::NFT_MSG_NEWRULE && kind != libc::NFT_MSG_NEWCHAIN {
        return None;
    }
    // The parsers read the header's fields in place: give them an aligned copy.
    let mut buf = AlignedBuf::zeroed(m.bytes.len());
    let mut text = vec![0u8; 4096];
    // SAFETY: `buf` holds `m.bytes.len()` bytes, aligned, into which the message is copied
    // whole; objects are checked for NULL, parsed from that one complete message, printed into
    // `text` (its length passed, NUL-terminated by snprintf) and freed before returning.
    let printed = unsafe {
        std::ptr::copy_nonoverlapping(m.bytes.as_ptr(), buf.as_mut_ptr(), m.bytes.len());
        let nlh = buf.as_mut_ptr().cast::<libc::nlmsghdr>();
        let out = text.as_mut_ptr().cast::<libc::c_char>();
        if kind == libc::NFT_MSG_NEWRULE {
            let Some(r) = NonNull::new(sys::nftnl_rule_alloc()) else { std::process::abort() };
            let ok = sys::nftnl_rule_nlmsg_parse(nlh, r.as_ptr()) >= 0;
            if ok {
                sys::nftnl_rule_snprintf(out, text.len(), r.as_ptr(), sys::NFTNL_OUTPUT_DEFAULT, 0);
            }
            sys::nftnl_rule_free(r.as_ptr());
            ok
        } else {
            let Some(c) = NonNull::new(sys::nftnl_chain_alloc()) else { std::process::abort() };
            let ok = sys::nftnl_chain_nlmsg_parse(nlh, c.as_ptr()) >= 0;
            if ok {
                sys::nftnl_chain_snprintf(out, text.len(), c.as_ptr(), sys::NFTNL_OUTPUT_DEFAULT, 0);
            }
            sys::nftnl_chain_free(c.as_ptr());
            ok
        }
    };
    assert!(printed, "libnftnl cannot parse the message");
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    Some(String::from_utf8_lossy(&text[..end]).into_owned())
}
