//! Every call into libnftnl's C API (`nftnl_sys`), behind safe functions: the request messages
//! the queries send, the parsers of the kernel's replies, and what the safe `nftnl` crate cannot
//! express (a set's `flags interval`, interval-end elements, an inverted lookup, the `fib`
//! expression, comments on tables, chains and sets, a set flush).
//!
//! With `../netlink.rs` this is the only code of allowsync allowed `unsafe`; every block says
//! why it is sound. Nothing here decides anything: it only translates.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_void};
use std::io;
use std::ptr::NonNull;

use ::nftnl::expr::Expression;
use ::nftnl::nftnl_sys as sys;
use ::nftnl::set::{Set, SetKey};
use ::nftnl::{MsgType, NlMsg, Rule, Table};

use super::query::{ChainInfo, SetInfo, TableInfo};
use crate::backend::netlink::{AlignedBuf, Message};
use crate::ownership::NftFamily;

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

/// `NFT_MSG_GETTABLE` for `table` of `family` (acknowledged).
pub(super) fn table_request(seq: u32, family: NftFamily, table: &CStr) -> Request {
    build(libc::NFT_MSG_GETTABLE, family.nfproto(), libc::NLM_F_ACK, seq, |nlh| {
        // SAFETY: allocation checked for NULL; libnftnl copies the name, writes the payload into
        // the request buffer behind `nlh` (room checked by `build`), and the object is freed
        // afterwards.
        unsafe {
            let t = allocated(sys::nftnl_table_alloc()).as_ptr();
            sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, table.as_ptr());
            sys::nftnl_table_nlmsg_build_payload(nlh, t);
            sys::nftnl_table_free(t);
        }
    })
}

/// `NFT_MSG_GETCHAIN` for chain `chain` of `table` (acknowledged), or with `chain: None` a dump
/// of every chain of `family` (the kernel does not filter chain dumps by table).
pub(super) fn chain_request(seq: u32, family: NftFamily, table: &CStr, chain: Option<&CStr>) -> Request {
    let flags = if chain.is_some() { libc::NLM_F_ACK } else { libc::NLM_F_DUMP };
    build(libc::NFT_MSG_GETCHAIN, family.nfproto(), flags, seq, |nlh| {
        let Some(chain) = chain else { return };
        // SAFETY: as in `table_request`.
        unsafe {
            let c = allocated(sys::nftnl_chain_alloc()).as_ptr();
            sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_NAME as u16, chain.as_ptr());
            sys::nftnl_chain_nlmsg_build_payload(nlh, c);
            sys::nftnl_chain_free(c);
        }
    })
}

/// `NFT_MSG_GETRULE` dump of the rules of chain `chain` of `family table`.
pub(super) fn rule_dump_request(seq: u32, family: NftFamily, table: &CStr, chain: &CStr) -> Request {
    build(libc::NFT_MSG_GETRULE, family.nfproto(), libc::NLM_F_DUMP, seq, |nlh| {
        // SAFETY: as in `table_request`.
        unsafe {
            let r = allocated(sys::nftnl_rule_alloc()).as_ptr();
            sys::nftnl_rule_set_u32(r, sys::NFTNL_RULE_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
            sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
            sys::nftnl_rule_nlmsg_build_payload(nlh, r);
            sys::nftnl_rule_free(r);
        }
    })
}

/// `NFT_MSG_GETSET` for set `name` of `table` (acknowledged), or with `name: None` a dump of
/// every set of `table`.
pub(super) fn set_request(seq: u32, family: NftFamily, table: &CStr, name: Option<&CStr>) -> Request {
    let request = NftnlSet::new(family, table, name);
    let flags = if name.is_some() { libc::NLM_F_ACK } else { libc::NLM_F_DUMP };
    build(libc::NFT_MSG_GETSET, family.nfproto(), flags, seq, |nlh| {
        // SAFETY: `nlh` heads a request buffer with room for the payload (see `build`);
        // `request` is live.
        unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, request.ptr()) }
    })
}

/// `NFT_MSG_GETSETELEM` dump of set `name` of `table`.
pub(super) fn set_elements_request(seq: u32, family: NftFamily, table: &CStr, name: &CStr) -> Request {
    let request = NftnlSet::new(family, table, Some(name));
    build(libc::NFT_MSG_GETSETELEM, family.nfproto(), libc::NLM_F_DUMP, seq, |nlh| {
        // SAFETY: as in `set_request`; `request` has no elements, so only the table and set
        // names are written.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, request.ptr()) }
    })
}

/// `NFT_MSG_GETGEN`: the ruleset generation (acknowledged).
pub(super) fn generation_request(seq: u32) -> Request {
    build(libc::NFT_MSG_GETGEN, libc::AF_UNSPEC as u16, libc::NLM_F_ACK, seq, |_| {})
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

    /// A set named `name` (or any set: `None`) in `table` of `family`, to address requests.
    fn new(family: NftFamily, table: &CStr, name: Option<&CStr>) -> Self {
        let s = Self::alloc();
        // SAFETY: the set is live; libnftnl copies the strings.
        unsafe {
            sys::nftnl_set_set_u32(s.ptr(), sys::NFTNL_SET_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            if let Some(name) = name {
                sys::nftnl_set_set_str(s.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
            }
        }
        s
    }

    fn str_attr(&self, attr: u32) -> String {
        // SAFETY: the set is live; the string is copied before the set can be freed.
        unsafe {
            if !sys::nftnl_set_is_set(self.ptr(), attr as u16) {
                return String::new();
            }
            CStr::from_ptr(sys::nftnl_set_get_str(self.ptr(), attr as u16)).to_string_lossy().into_owned()
        }
    }

    /// The set's userdata, copied.
    fn userdata(&self) -> Vec<u8> {
        let mut len = 0u32;
        // SAFETY: the set is live; `get_data` returns a pointer into it with its length (NULL
        // when unset), copied at once.
        unsafe {
            let p = sys::nftnl_set_get_data(self.ptr(), sys::NFTNL_SET_USERDATA as u16, &mut len);
            copy_data(p, len)
        }
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

/// The name, key type, key length, flags and comment of an `NFT_MSG_NEWSET` reply.
pub(super) fn parse_set(m: &Message<'_>) -> io::Result<SetInfo> {
    let s = NftnlSet::alloc();
    // SAFETY: `m` is one complete, aligned netlink message; libnftnl validates attributes.
    if unsafe { sys::nftnl_set_nlmsg_parse(m.as_ptr(), s.ptr()) } < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADMSG));
    }
    Ok(SetInfo {
        name: s.str_attr(sys::NFTNL_SET_NAME),
        key_type: s.u32_attr(sys::NFTNL_SET_KEY_TYPE).unwrap_or(0),
        key_len: s.u32_attr(sys::NFTNL_SET_KEY_LEN).unwrap_or(0),
        flags: s.u32_attr(sys::NFTNL_SET_FLAGS).unwrap_or(0),
        comment: udata_comment(&s.userdata(), UDATA_SET_COMMENT),
    })
}

/// How many objects (chains, sets, stateful objects, flowtables) an `NFT_MSG_NEWTABLE` reply's
/// table holds, and its comment.
pub(super) fn parse_table(m: &Message<'_>) -> io::Result<TableInfo> {
    // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; attributes are
    // read only when set, userdata copied before the table is freed.
    unsafe {
        let t = allocated(sys::nftnl_table_alloc()).as_ptr();
        let parsed = sys::nftnl_table_nlmsg_parse(m.as_ptr(), t);
        let objects = if sys::nftnl_table_is_set(t, sys::NFTNL_TABLE_USE as u16) {
            sys::nftnl_table_get_u32(t, sys::NFTNL_TABLE_USE as u16)
        } else {
            0
        };
        let mut len = 0u32;
        let p = sys::nftnl_table_get_data(t, sys::NFTNL_TABLE_USERDATA as u16, &mut len);
        let udata = copy_data(p, len);
        sys::nftnl_table_free(t);
        if parsed < 0 {
            return Err(io::Error::from_raw_os_error(libc::EBADMSG));
        }
        Ok(TableInfo { objects, comment: udata_comment(&udata, UDATA_TABLE_COMMENT) })
    }
}

/// The table, name, hook, priority, type and comment of an `NFT_MSG_NEWCHAIN` reply.
pub(super) fn parse_chain(m: &Message<'_>) -> io::Result<ChainInfo> {
    // SAFETY: allocation checked for NULL; `m` is one complete, aligned message; attribute
    // getters are only called for attributes that are set, and the type string is copied
    // before the chain is freed.
    unsafe {
        let c = allocated(sys::nftnl_chain_alloc()).as_ptr();
        let parsed = sys::nftnl_chain_nlmsg_parse(m.as_ptr(), c);
        let is = |a: u32| sys::nftnl_chain_is_set(c, a as u16);
        let text = |a: u32| {
            if is(a) {
                CStr::from_ptr(sys::nftnl_chain_get_str(c, a as u16)).to_string_lossy().into_owned()
            } else {
                String::new()
            }
        };
        let mut len = 0u32;
        let p = sys::nftnl_chain_get_data(c, sys::NFTNL_CHAIN_USERDATA as u16, &mut len);
        let udata = copy_data(p, len);
        let info = ChainInfo {
            table: text(sys::NFTNL_CHAIN_TABLE),
            name: text(sys::NFTNL_CHAIN_NAME),
            comment: udata_comment(&udata, UDATA_CHAIN_COMMENT),
            hook: is(sys::NFTNL_CHAIN_HOOKNUM)
                .then(|| sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16)),
            priority: if is(sys::NFTNL_CHAIN_PRIO) {
                sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16)
            } else {
                0
            },
            chain_type: text(sys::NFTNL_CHAIN_TYPE),
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

/// A named `flags interval` set of key type `K` in `table`, with the comment `mark` (what
/// `Set::new_named` lacks: the flags and the userdata).
pub(super) fn interval_set<'a, K: SetKey>(name: &CStr, id: u32, table: &'a Table, mark: &str) -> Set<'a, K> {
    let set = Set::<K>::new_named(name, id, table, table.get_family());
    let udata = comment_udata(UDATA_SET_COMMENT, mark);
    // SAFETY: `set` owns a live nftnl_set; setting a u32 attribute copies the value, setting
    // data copies `udata.len()` bytes from it.
    unsafe {
        let p = set.as_ptr().as_ptr();
        sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, libc::NFT_SET_INTERVAL as u32);
        sys::nftnl_set_set_data(p, sys::NFTNL_SET_USERDATA as u16, udata.as_ptr().cast(), udata.len() as u32);
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
            let r = allocated(sys::nftnl_rule_alloc());
            let ok = sys::nftnl_rule_nlmsg_parse(nlh, r.as_ptr()) >= 0;
            if ok {
                sys::nftnl_rule_snprintf(out, text.len(), r.as_ptr(), sys::NFTNL_OUTPUT_DEFAULT, 0);
            }
            sys::nftnl_rule_free(r.as_ptr());
            ok
        } else {
            let c = allocated(sys::nftnl_chain_alloc());
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

/// The userdata attribute types nft stores comments under (libnftnl's `udata.h`): a table's and a
/// chain's comment is attribute 0, a set's attribute 7 (after its byte orders, merge flag, …).
pub(super) const UDATA_TABLE_COMMENT: u8 = sys::NFTNL_UDATA_TABLE_COMMENT as u8;
pub(super) const UDATA_CHAIN_COMMENT: u8 = sys::NFTNL_UDATA_CHAIN_COMMENT as u8;
pub(super) const UDATA_SET_COMMENT: u8 = sys::NFTNL_UDATA_SET_COMMENT as u8;
/// A rule's comment (how the enforcement rules are recognised: see `batch.rs`).
pub(super) const UDATA_RULE_COMMENT: u8 = sys::NFTNL_UDATA_RULE_COMMENT as u8;

/// Userdata holding the one comment `text` under attribute `ty`, the way nft writes it: a
/// type byte, a length byte, the text and its NUL (nft refuses a comment without the NUL).
fn comment_udata(ty: u8, text: &str) -> Vec<u8> {
    let len = u8::try_from(text.len() + 1).expect("a comment of at most 254 bytes");
    let mut out = vec![ty, len];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

/// The comment under attribute `ty` of userdata `udata` (type-length-value attributes), without
/// its NUL; `None` when there is none or the userdata does not parse.
pub(super) fn udata_comment(udata: &[u8], ty: u8) -> Option<String> {
    let mut rest = udata;
    while let [t, len, tail @ ..] = rest {
        let value = tail.get(..usize::from(*len))?;
        if *t == ty {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &tail[usize::from(*len)..];
    }
    None
}

/// A table with the comment `mark`, as an `NFT_MSG_NEWTABLE` (or `DELTABLE`) message: what
/// nftnl's `Table` cannot carry.
pub(super) struct MarkedTable {
    table: NonNull<sys::nftnl_table>,
    family: NftFamily,
}

impl MarkedTable {
    pub(super) fn new(family: NftFamily, name: &CStr, mark: &str) -> Self {
        let udata = comment_udata(UDATA_TABLE_COMMENT, mark);
        // SAFETY: allocation checked for NULL; libnftnl copies the name and the userdata.
        unsafe {
            let t = allocated(sys::nftnl_table_alloc());
            let p = t.as_ptr();
            sys::nftnl_table_set_u32(p, sys::NFTNL_TABLE_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_table_set_str(p, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_data(
                p,
                sys::NFTNL_TABLE_USERDATA as u16,
                udata.as_ptr().cast(),
                udata.len() as u32,
            );
            MarkedTable { table: t, family }
        }
    }
}

impl Drop for MarkedTable {
    fn drop(&mut self) {
        // SAFETY: we own the table object.
        unsafe { sys::nftnl_table_free(self.table.as_ptr()) }
    }
}

// SAFETY: `write` builds one message into `buf`, which the batch sizes for the largest one.
unsafe impl NlMsg for MarkedTable {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let ty = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWTABLE,
            MsgType::Del => libc::NFT_MSG_DELTABLE,
        };
        let flags = libc::NLM_F_ACK | libc::NLM_F_CREATE;
        // SAFETY: the caller's buffer holds a maximal message; the table is live.
        unsafe {
            let nlh = message_header(buf, ty, self.family, flags, seq);
            sys::nftnl_table_nlmsg_build_payload(nlh, self.table.as_ptr());
        }
    }
}

/// A base chain `type <chain_type> hook <hook> priority <priority>; policy accept;` with the
/// comment `mark`, as an `NFT_MSG_NEWCHAIN` message: what nftnl's `Chain` cannot carry.
pub(super) struct MarkedChain {
    chain: NonNull<sys::nftnl_chain>,
    family: NftFamily,
}

impl MarkedChain {
    pub(super) fn new(
        family: NftFamily,
        table: &CStr,
        name: &CStr,
        (hook, priority, chain_type): (u32, i32, &CStr),
        mark: &str,
    ) -> Self {
        let udata = comment_udata(UDATA_CHAIN_COMMENT, mark);
        // SAFETY: allocation checked for NULL; libnftnl copies strings and userdata.
        unsafe {
            let c = allocated(sys::nftnl_chain_alloc());
            let p = c.as_ptr();
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(family.nfproto()));
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16, hook);
            sys::nftnl_chain_set_s32(p, sys::NFTNL_CHAIN_PRIO as u16, priority);
            sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TYPE as u16, chain_type.as_ptr());
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_POLICY as u16, libc::NF_ACCEPT as u32);
            sys::nftnl_chain_set_data(
                p,
                sys::NFTNL_CHAIN_USERDATA as u16,
                udata.as_ptr().cast(),
                udata.len() as u32,
            );
            MarkedChain { chain: c, family }
        }
    }
}

impl Drop for MarkedChain {
    fn drop(&mut self) {
        // SAFETY: we own the chain object.
        unsafe { sys::nftnl_chain_free(self.chain.as_ptr()) }
    }
}

// SAFETY: as for `MarkedTable`.
unsafe impl NlMsg for MarkedChain {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let ty = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWCHAIN,
            MsgType::Del => libc::NFT_MSG_DELCHAIN,
        };
        let flags = libc::NLM_F_ACK | libc::NLM_F_CREATE;
        // SAFETY: the caller's buffer holds a maximal message; the chain is live.
        unsafe {
            let nlh = message_header(buf, ty, self.family, flags, seq);
            sys::nftnl_chain_nlmsg_build_payload(nlh, self.chain.as_ptr());
        }
    }
}

/// `NFT_MSG_DELSETELEM` naming a set and no element: the kernel removes every element (nft's
/// `flush set`).
pub(super) struct FlushSet {
    set: NftnlSet,
    family: NftFamily,
}

impl FlushSet {
    pub(super) fn new(family: NftFamily, table: &CStr, name: &CStr) -> Self {
        FlushSet { set: NftnlSet::new(family, table, Some(name)), family }
    }
}

// SAFETY: as for `MarkedTable`.
unsafe impl NlMsg for FlushSet {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: the caller's buffer holds a maximal message; the set is live and has no
        // elements, so only its table and name are written.
        unsafe {
            let nlh = message_header(buf, libc::NFT_MSG_DELSETELEM, self.family, libc::NLM_F_ACK, seq);
            sys::nftnl_set_elems_nlmsg_build_payload(nlh, self.set.ptr());
        }
    }
}

/// The header of one batch message of type `ty` at the start of `buf`.
///
/// # Safety
/// `buf` must have room for a maximal nf_tables message (the batch guarantees it to `write`).
unsafe fn message_header(
    buf: *mut c_void,
    ty: libc::c_int,
    family: NftFamily,
    flags: libc::c_int,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: the caller's buffer holds a maximal message.
    unsafe { sys::nftnl_nlmsg_build_hdr(buf.cast(), ty as u16, family.nfproto(), flags as u16, seq) }
}

/// A copy of `len` bytes of userdata at `p` (nothing when NULL).
///
/// # Safety
/// `p` must be NULL or point at `len` readable bytes.
unsafe fn copy_data(p: *const c_void, len: u32) -> Vec<u8> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize).to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_encoded_and_found_as_nft_writes_them() {
        let u = comment_udata(UDATA_SET_COMMENT, "managed by allowsync");
        assert_eq!(&u[..2], &[7, 21]);
        assert_eq!(u.last(), Some(&0));
        // After other attributes (a set's key byte order), and not confused with them.
        let mut with_others = vec![0, 4, 1, 0, 0, 0];
        with_others.extend(&u);
        assert_eq!(udata_comment(&with_others, UDATA_SET_COMMENT).as_deref(), Some("managed by allowsync"));
        assert_eq!(udata_comment(&with_others, 3), None);
        assert_eq!(udata_comment(&[7, 200, 1], 7), None, "a truncated attribute");
        assert_eq!(udata_comment(&[], 0), None);
    }
}
