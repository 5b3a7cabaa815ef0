//! Every nf_tables transaction allowsync sends is built here, with the enforcement chain and
//! its rules in it.
//!
//! A [`Transaction`] is one batch, committed in one `sendmsg`: the kernel applies all of it or
//! none of it (EEXIST/ENOENT on any element abort the whole batch), which is what makes
//! [`Backend::apply`](crate::backend::Backend::apply)'s "on error the set is as it was" true. It
//! remembers which operation on which object each message is, so that a refusal names its
//! cause; the tests read back what a transaction would send, message by message, without a
//! kernel.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use ::nftnl::expr::{
    Cmp, CmpOp, Meta, Payload, TcpHeaderField, TransportHeaderField, UdpHeaderField, Verdict,
};
use ::nftnl::set::Set;
use ::nftnl::{Batch, Chain, MsgType, NlMsg, Rule, Table};
use tracing::debug;

use super::{Family, Name, NftablesBackend, SetKeyAddr, kernel, nftnl, open_socket, proto};
use crate::backend::BackendError;
use crate::config::{Enforce, EnforceScope, NftablesConfig};
use crate::ownership::MARK;
use crate::prefixes::{AllowSet, Diff, Range};

/// Bytes one element takes in a message, roughly (nests, key, flags): sizes the batch pages.
const ELEMENT_BYTES_ESTIMATE: usize = 40;

/// Ranges turned into libnftnl element objects at a time (two elements each); the messages are
/// the same transaction whatever the chunking, only split at chunk boundaries too.
const ELEMENT_CHUNK_RANGES: usize = 4096;

/// One nf_tables transaction under construction, remembering which operation on which object
/// each message is, so that a refusal names its cause.
pub(super) struct Transaction {
    batch: Batch,
    /// Messages added (without the batch begin/end markers).
    pub(super) messages: usize,
    /// `(index of the first message, operation, object)`, in message order.
    labels: Vec<(usize, &'static str, String)>,
    /// Bytes the caller expected to write (for logs).
    pub(super) len_hint: usize,
}

impl Transaction {
    fn new(expected_bytes: usize) -> Self {
        // All pages go into one sendmsg, which takes at most UIO_MAXIOV (1024) of them: keep
        // the page count well below that, whatever the batch size.
        let page = (expected_bytes / 256).max(::nftnl::default_batch_page_size() as usize);
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
    pub(super) fn commit(self) -> Result<(), BackendError> {
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
        let (op, object) = index
            .and_then(|i| label_of(&labels, i))
            .map_or(("batch", "nf_tables".to_string()), |(op, obj)| (op, obj.to_string()));
        Err(refused(op, object, errno))
    }
}

/// One message of a transaction as it would reach the kernel, read back from the batch.
#[cfg(test)]
#[derive(Debug)]
pub(super) struct Sent {
    pub(super) op: &'static str,
    pub(super) object: String,
    /// `NFT_MSG_*`.
    pub(super) msg: i32,
    /// `(key, is_interval_end)` of each element, for element messages.
    pub(super) elements: Vec<(Vec<u8>, bool)>,
    /// Whether the message carries [`MARK`] (as a comment in its userdata).
    pub(super) marked: bool,
    /// The `nfgenmsg` family (`NFPROTO_*`).
    pub(super) family: u8,
    /// For rules and chains, what libnftnl prints of them (see `nftnl::describe`).
    pub(super) text: Option<String>,
}

#[cfg(test)]
impl Transaction {
    /// Everything this transaction would send, in order, without the batch begin/end markers:
    /// a test recorder in the manner of google/nftables', decoded from the finished batch.
    pub(super) fn recorded(self) -> Vec<Sent> {
        use crate::backend::netlink::for_each_message;
        let labels = self.labels;
        let finalized = self.batch.finalize();
        let mut out = Vec::new();
        for page in finalized.iter() {
            for_each_message(page, |m| {
                let ty = i32::from(m.ty);
                if ty == libc::NFNL_MSG_BATCH_BEGIN || ty == libc::NFNL_MSG_BATCH_END {
                    return Ok(());
                }
                assert_eq!(ty >> 8, libc::NFNL_SUBSYS_NFTABLES, "an nf_tables message");
                let (op, object) = label_of(&labels, out.len()).expect("every message is labelled");
                let msg = ty & 0xff;
                let elements = if msg == libc::NFT_MSG_NEWSETELEM || msg == libc::NFT_MSG_DELSETELEM {
                    elements_of(m.bytes)
                } else {
                    Vec::new()
                };
                let marked = m.bytes.windows(MARK.len()).any(|w| w == MARK.as_bytes());
                let family = m.bytes[std::mem::size_of::<libc::nlmsghdr>()];
                let text = nftnl::describe(&m);
                out.push(Sent { op, object: object.to_string(), msg, elements, marked, family, text });
                Ok(())
            })
            .expect("the batch parses");
        }
        out
    }
}

/// `(key, is_interval_end)` of every element of a set element message, decoded from the bytes
/// (libnftnl's own parser expects the kernel's numbering of the nested elements, not ours).
#[cfg(test)]
fn elements_of(message: &[u8]) -> Vec<(Vec<u8>, bool)> {
    // From linux/netfilter/nf_tables.h (not in the libc crate).
    const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
    const NFTA_SET_ELEM_KEY: u16 = 1;
    const NFTA_SET_ELEM_FLAGS: u16 = 3;
    const NFTA_DATA_VALUE: u16 = 1;
    // `struct nlmsghdr`, then `struct nfgenmsg`.
    use crate::backend::netlink::attributes;
    let payload = &message[std::mem::size_of::<libc::nlmsghdr>() + 4..];
    let mut out = Vec::new();
    for (_, list) in attributes(payload).filter(|(t, _)| *t == NFTA_SET_ELEM_LIST_ELEMENTS) {
        for (_, element) in attributes(list) {
            let (mut key, mut end) = (None, false);
            for (t, value) in attributes(element) {
                match t {
                    NFTA_SET_ELEM_KEY => {
                        key = attributes(value).find(|(t, _)| *t == NFTA_DATA_VALUE);
                    }
                    NFTA_SET_ELEM_FLAGS => {
                        let flags = u32::from_be_bytes(value.try_into().expect("a u32"));
                        end = flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0;
                    }
                    _ => {}
                }
            }
            out.push((key.expect("every element has a key").1.to_vec(), end));
        }
    }
    out
}

/// The operation and object of message `index`: the last label that starts at or before it.
fn label_of<'a>(
    labels: &'a [(usize, &'static str, String)],
    index: usize,
) -> Option<(&'static str, &'a str)> {
    let at = labels.partition_point(|(first, _, _)| *first <= index).checked_sub(1)?;
    labels.get(at).map(|(_, op, obj)| (*op, obj.as_str()))
}

/// A refusal of the kernel as a [`BackendError`].
fn refused(op: &'static str, object: String, errno: i32) -> BackendError {
    let source = io::Error::from_raw_os_error(errno);
    match errno {
        libc::EEXIST | libc::ENOENT => BackendError::Conflict { op, object, detail: source.to_string() },
        _ => kernel(op, object, source),
    }
}

/// One change of a transaction [`NftablesBackend::transaction`] sends, in the order given.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// A table of allowsync's own, with [`MARK`].
    AddTable(Name),
    /// A `flags interval` set of the family's address type, with [`MARK`], filled with `seed`
    /// (the allowlist the set it replaces held) in the same commit.
    AddSet {
        set: Name,
        family: Family,
        seed: AllowSet,
    },
    /// The enforcement chain, with [`MARK`], its rules flushed and re-added (so a restart never
    /// duplicates them).
    Enforce,
    DeleteChain(Name),
    DeleteSet(Name),
    /// A table with everything in it (only one that holds nothing but allowsync's objects).
    DeleteTable(Name),
    /// Every element of an operator's set (`teardown`).
    FlushSet(Name),
}

impl Step {
    /// The object the step changes, as its messages' labels name it.
    pub(super) fn object(&self, backend: &NftablesBackend) -> String {
        match self {
            Step::AddTable(n)
            | Step::AddSet { set: n, .. }
            | Step::DeleteChain(n)
            | Step::DeleteSet(n)
            | Step::DeleteTable(n)
            | Step::FlushSet(n) => n.object.to_string(),
            Step::Enforce => backend.chain.object.to_string(),
        }
    }
}

fn nft_table(name: &Name) -> Table {
    Table::new(&name.table, proto(name.family))
}

impl NftablesBackend {
    /// `steps` as one transaction.
    pub(super) fn transaction(&self, steps: &[Step]) -> Transaction {
        let seeded: usize = steps
            .iter()
            .map(|s| match s {
                Step::AddSet { seed, .. } => 2 * seed.len(),
                _ => 0,
            })
            .sum();
        let mut tx = Transaction::new(seeded * ELEMENT_BYTES_ESTIMATE);
        for (id, step) in (1u32..).zip(steps) {
            let object = step.object(self);
            match step {
                Step::AddTable(t) => tx.push(
                    &nftnl::MarkedTable::new(t.family, &t.table, MARK),
                    MsgType::Add,
                    "add table",
                    &object,
                ),
                Step::AddSet { set, family, seed } => {
                    let table = nft_table(set);
                    match family {
                        Family::V4 => tx.push(
                            &nftnl::interval_set::<Ipv4Addr>(&set.name, id, &table, MARK),
                            MsgType::Add,
                            "add set",
                            &object,
                        ),
                        Family::V6 => tx.push(
                            &nftnl::interval_set::<Ipv6Addr>(&set.name, id, &table, MARK),
                            MsgType::Add,
                            "add set",
                            &object,
                        ),
                    }
                    push_elements(&mut tx, set, seed.v4.as_slice(), MsgType::Add);
                    push_elements(&mut tx, set, seed.v6.as_slice(), MsgType::Add);
                }
                Step::Enforce => self.push_enforcement(&mut tx),
                Step::DeleteChain(c) => {
                    let table = nft_table(c);
                    tx.push(&Chain::new(&c.name, &table), MsgType::Del, "delete chain", &object);
                }
                Step::DeleteSet(s) => {
                    let table = nft_table(s);
                    let set = Set::<Ipv4Addr>::new_named(&s.name, 0, &table, proto(s.family));
                    tx.push(&set, MsgType::Del, "delete set", &object);
                }
                Step::DeleteTable(t) => tx.push(&nft_table(t), MsgType::Del, "delete table", &object),
                Step::FlushSet(s) => tx.push(
                    &nftnl::FlushSet::new(s.family, &s.table, &s.name),
                    MsgType::Del,
                    "flush set",
                    &object,
                ),
            }
        }
        tx
    }

    /// The enforcement chain, flushed and refilled: one batch, so it is never seen empty.
    fn push_enforcement(&self, tx: &mut Transaction) {
        let Some(enforce) = &self.enforce else { return };
        let c = &self.chain;
        let object = c.object.to_string();
        let (hook, priority) = enforce_hook(enforce.scope);
        let marked = nftnl::MarkedChain::new(c.family, &c.table, &c.name, (hook, priority, c"filter"), MARK);
        tx.push(&marked, MsgType::Add, "add chain", &object);
        let table = nft_table(c);
        let chain = Chain::new(&c.name, &table);
        // A rule without a handle, deleted: the kernel flushes the chain.
        tx.push(&Rule::new(&chain), MsgType::Del, "flush chain", &object);
        for rule in self.enforcement_rules(&chain, enforce) {
            tx.push(&rule, MsgType::Add, "add rule", &object);
        }
    }

    /// Applies a diff: all removals (IPv4, IPv6), then all additions, as interval elements.
    pub(super) fn apply_transaction(&self, diff: &Diff) -> Transaction {
        let elements = 2 * (diff.added() + diff.removed());
        let mut tx = Transaction::new(elements * ELEMENT_BYTES_ESTIMATE);
        let [v4, v6] = &self.sets;
        push_elements(&mut tx, v4, &diff.v4.remove, MsgType::Del);
        push_elements(&mut tx, v6, &diff.v6.remove, MsgType::Del);
        push_elements(&mut tx, v4, &diff.v4.add, MsgType::Add);
        push_elements(&mut tx, v6, &diff.v6.add, MsgType::Add);
        tx
    }

    /// The enforcement rules, in the order [`enforce_rule_text`] prints them.
    /// The comment each enforcement rule carries, `allowsync <i>/<n> <fingerprint>`: its place
    /// and a fingerprint of the whole rule list (the rules as [`enforce_rule_text`] prints them,
    /// and [`RULES_VERSION`]). Reading them back is how `ensure` tells that the chain holds
    /// exactly the rules it would write without rewriting it: a rule that anyone replaced, added
    /// or removed, or other ports, scope or set names, change the list.
    pub(super) fn rule_comments(&self, enforce: &Enforce) -> Vec<String> {
        let name = |f: Family| self.sets[f.index()].name.to_string_lossy().into_owned();
        let texts = rule_texts(&name(Family::V4), &name(Family::V6), enforce);
        let print = fingerprint(RULES_VERSION, &texts);
        let n = texts.len();
        (1..=n).map(|i| format!("allowsync {i}/{n} {print:016x}")).collect()
    }

    /// The enforcement rules, in the order [`enforce_rule_text`] prints them, each with its
    /// [`NftablesBackend::rule_comments`] comment.
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
                // `tcp dport 443 [fib daddr type local] ip saddr != @allow_v4 drop`: cheap
                // port match first.
                let mut r = Rule::new(chain);
                r.add_expr(&Meta::L4Proto);
                r.add_expr(&Cmp::new(CmpOp::Eq, l4proto.ipproto()));
                r.add_expr(&Payload::Transport(l4proto.dport()));
                r.add_expr(&Cmp::new(CmpOp::Eq, &port.to_be_bytes()[..]));
                if enforce.scope == EnforceScope::Host {
                    add_addressed_to_this_host(&mut r);
                }
                r.add_expr(&Meta::NfProto);
                r.add_expr(&Cmp::new(CmpOp::Eq, family.nfproto()));
                r.add_expr(&family.saddr());
                r.add_expr(&nftnl::NotInSet { set: &self.sets[family.index()].name });
                r.add_expr(&Verdict::Drop);
                rules.push(r);
            }
        }
        for (rule, comment) in rules.iter_mut().zip(self.rule_comments(enforce)) {
            // Set names are at most 31 characters: every comment is far below nft's 128 bytes.
            let comment = std::ffi::CString::new(comment).expect("names have no NUL");
            rule.set_comment(comment).expect("a rule comment fits");
        }
        rules
    }
}

/// The hook and priority of the enforcement base chain for `scope` (`policy accept`: it only
/// ever drops):
///
/// - `host`: `type filter hook prerouting priority mangle` (-150), after conntrack (-200) and
///   before its DNAT (`dstnat`, -100), so the rules see every packet addressed to this host
///   with its original destination port, whether it then ends at a local socket or is DNATed
///   on to a container, a VM or a pod (which never passes the input hook);
/// - `local`: `type filter hook input priority filter` (0), the chain of earlier versions:
///   only what reaches a local socket.
pub(super) fn enforce_hook(scope: EnforceScope) -> (u32, i32) {
    match scope {
        EnforceScope::Host => (libc::NF_INET_PRE_ROUTING as u32, libc::NF_IP_PRI_MANGLE),
        EnforceScope::Local => (libc::NF_INET_LOCAL_IN as u32, libc::NF_IP_PRI_FILTER),
    }
}

/// `fib daddr type local`: the destination is one of this host's addresses. In prerouting
/// that is what separates traffic for this host (its sockets and what it DNATs onward) from
/// traffic it routes for others, which is left alone. Broadcast and multicast destinations are
/// other types, so not matched (`scope: local` filters what of them reaches a socket).
fn add_addressed_to_this_host(r: &mut Rule<'_>) {
    r.add_expr(&nftnl::FibDaddrType);
    r.add_expr(&Cmp::new(CmpOp::Eq, u32::from(libc::RTN_LOCAL)));
}

/// The rules an operator would write by hand for `enforce`'s ports, as `nft` prints them (and as
/// [`Backend::ensure`] installs them in [`ENFORCE_CHAIN`] when `enforce` is configured): loopback
/// first, then one drop rule per port and family. nftables sets are per table, so such rules
/// must live in a chain of `table inet <table>` to reference the sets.
pub fn enforce_rule_text(config: &NftablesConfig, enforce: &Enforce) -> Vec<String> {
    // The sets' names: with `enforce`, both sets are in allowsync's table.
    let name = |v6| match config.set_object(v6) {
        crate::ownership::Object::NftSet { name, .. } => name,
        other => other.to_string(),
    };
    rule_texts(&name(false), &name(true), enforce)
}

/// [`enforce_rule_text`] for the sets named `set_v4` and `set_v6`.
fn rule_texts(set_v4: &str, set_v6: &str, enforce: &Enforce) -> Vec<String> {
    let mut out = vec![r#"iifname "lo" accept"#.to_string()];
    let to_host = match enforce.scope {
        EnforceScope::Host => "fib daddr type local ",
        EnforceScope::Local => "",
    };
    for (l4proto, port) in enforced_ports(enforce) {
        for family in Family::BOTH {
            let set = match family {
                Family::V4 => set_v4,
                Family::V6 => set_v6,
            };
            out.push(format!(
                "{} dport {port} {to_host}{} saddr != @{set} drop",
                l4proto.name(),
                family.nft_proto()
            ));
        }
    }
    out
}

/// Bump when [`NftablesBackend::enforcement_rules`] encodes the same rule text differently: the
/// fingerprint in the rules' comments changes, and every chain is rewritten once.
const RULES_VERSION: u32 = 1;

/// FNV-1a (64 bits) over the version and the rule texts: stable across builds and toolchains
/// (unlike std's `DefaultHasher`), which matters because another build may read the comments.
/// Eight bytes of fingerprint against accidental change, not an adversary: whoever can write the
/// chain can write any comment.
fn fingerprint(version: u32, texts: &[String]) -> u64 {
    let bytes = version.to_le_bytes().into_iter().chain(texts.iter().flat_map(|t| t.bytes().chain([b'\n'])));
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The hook and priority of the chain [`enforce_rule_text`]'s rules go in, as `nft` prints them.
pub fn enforce_chain_text(scope: EnforceScope) -> &'static str {
    match scope {
        EnforceScope::Host => "type filter hook prerouting priority mangle; policy accept;",
        EnforceScope::Local => "type filter hook input priority filter; policy accept;",
    }
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

/// The element messages of `ranges` (one family) for set `set` into `tx`.
fn push_elements<A: SetKeyAddr>(tx: &mut Transaction, set: &Name, ranges: &[Range<A>], ty: MsgType) {
    if ranges.is_empty() {
        return;
    }
    let op = match ty {
        MsgType::Add => "add elements",
        MsgType::Del => "delete elements",
    };
    let object = set.object.to_string();
    let table = nft_table(set);
    // The set object only carries table and name for the element messages; key type and
    // flags are not sent with them. Built and serialized a chunk at a time: libnftnl takes
    // about 300 bytes per element object, so holding all of a 100k-range diff at once cost
    // 60 MB, while the serialized batch needs about 60 bytes per element.
    for chunk in ranges.chunks(ELEMENT_CHUNK_RANGES) {
        match A::FAMILY {
            Family::V4 => {
                let s = Set::<Ipv4Addr>::new_named(&set.name, 0, &table, proto(set.family));
                append_interval_elements(&s, chunk);
                tx.push_elements(&s, ty, op, &object);
            }
            Family::V6 => {
                let s = Set::<Ipv6Addr>::new_named(&set.name, 0, &table, proto(set.family));
                append_interval_elements(&s, chunk);
                tx.push_elements(&s, ty, op, &object);
            }
        }
    }
}

/// Appends the interval elements of `ranges` to `set`'s element list: the start, and the end
/// (`end + 1`, flagged `NFT_SET_ELEM_INTERVAL_END`) unless the range reaches the top.
fn append_interval_elements<K, A: SetKeyAddr>(set: &Set<'_, K>, ranges: &[Range<A>]) {
    let len = A::FAMILY.key_len() as usize;
    for r in ranges {
        nftnl::append_element(set, &r.start.key()[..len], 0);
        if let Some(end) = r.interval_end() {
            nftnl::append_element(set, &end.key()[..len], libc::NFT_SET_ELEM_INTERVAL_END as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefixes::Delta;

    #[test]
    fn rule_text_lists_loopback_then_each_port_and_family() {
        let cfg = NftablesConfig {
            table: "allowsync".into(),
            set_v4: "allow_v4".into(),
            set_v6: "allow_v6".into(),
            enforce: None,
        };
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53], scope: EnforceScope::Host };
        assert_eq!(
            enforce_rule_text(&cfg, &e),
            [
                r#"iifname "lo" accept"#,
                "tcp dport 443 fib daddr type local ip saddr != @allow_v4 drop",
                "tcp dport 443 fib daddr type local ip6 saddr != @allow_v6 drop",
                "udp dport 53 fib daddr type local ip saddr != @allow_v4 drop",
                "udp dport 53 fib daddr type local ip6 saddr != @allow_v6 drop",
            ]
        );
        let local = Enforce { scope: EnforceScope::Local, ..e };
        assert_eq!(
            enforce_rule_text(&cfg, &local)[1..3],
            ["tcp dport 443 ip saddr != @allow_v4 drop", "tcp dport 443 ip6 saddr != @allow_v6 drop"]
        );
    }

    fn backend(enforce: Option<Enforce>) -> NftablesBackend {
        NftablesBackend::new(&NftablesConfig {
            table: "t".into(),
            set_v4: "s4".into(),
            set_v6: "s6".into(),
            enforce,
        })
        .unwrap()
    }

    #[test]
    fn rule_comments_name_the_place_and_change_with_the_rules() {
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![], scope: EnforceScope::Host };
        let c = backend(Some(e.clone())).rule_comments(&e);
        assert_eq!(c.len(), 3);
        assert!(c[0].starts_with("allowsync 1/3 ") && c[2].starts_with("allowsync 3/3 "), "{c:?}");
        assert_eq!(c[0].len(), "allowsync 1/3 ".len() + 16);
        assert!(c.iter().all(|c| !c.contains('"')), "nft prints comments in double quotes");
        for other in [
            Enforce { tcp_ports: vec![8443], ..e.clone() },
            Enforce { scope: EnforceScope::Local, ..e.clone() },
        ] {
            assert_ne!(backend(Some(other.clone())).rule_comments(&other)[0], c[0], "{other:?}");
        }
        assert_ne!(fingerprint(1, &["a".into()]), fingerprint(2, &["a".into()]));
    }

    /// `(op, object, NFT_MSG_*)` of every message.
    fn ops(sent: &[Sent]) -> Vec<(&str, &str, i32)> {
        sent.iter().map(|s| (s.op, s.object.as_str(), s.msg)).collect()
    }

    fn v4(a: &str) -> u32 {
        u32::from(a.parse::<Ipv4Addr>().unwrap())
    }

    /// The ranges of the element messages with `msg`, decoded as the kernel reads them.
    fn ranges_in<A: SetKeyAddr>(sent: &[Sent], msg: i32, object: &str) -> Vec<Range<A>> {
        let elements: Vec<(A, bool)> = sent
            .iter()
            .filter(|s| s.msg == msg && s.object == object)
            .flat_map(|s| s.elements.iter().map(|(k, end)| (A::from_key(k).unwrap(), *end)))
            .collect();
        super::super::query::intervals_from_elements(elements).unwrap()
    }

    const CHAIN: &str = "chain inet t enforce";

    fn enforce(scope: EnforceScope) -> Option<Enforce> {
        Some(Enforce { tcp_ports: vec![443], udp_ports: vec![], scope })
    }

    /// What libnftnl prints of the chain and rule messages, in order.
    fn texts(sent: &[Sent]) -> Vec<&str> {
        sent.iter().filter_map(|s| s.text.as_deref()).collect()
    }

    /// The expressions of a rule as libnftnl prints them, one per line, trimmed.
    fn exprs(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).filter(|l| l.starts_with('[')).collect()
    }

    /// The chain hooks prerouting before conntrack's DNAT, and each drop carries `fib daddr type
    /// local`: the expressions are exactly those `nft --debug=netlink add rule inet t enforce
    /// tcp dport 443 fib daddr type local ip saddr != @s4 drop` prints (nft 1.0.6; register
    /// contents in host byte order, so on a little-endian host).
    #[test]
    #[cfg(target_endian = "little")]
    fn the_host_scope_hooks_prerouting_before_dnat_and_drops_only_what_is_addressed_here() {
        let sent = backend(enforce(EnforceScope::Host)).transaction(&[Step::Enforce]).recorded();
        let texts = texts(&sent);
        assert!(texts[0].contains("type filter hook prerouting prio -150 policy accept"), "{}", texts[0]);
        assert_eq!(
            exprs(texts[1]),
            [
                "[ meta load iifname => reg 1 ]",
                "[ cmp eq reg 1 0x00006f6c 0x00000000 0x00000000 0x00000000 ]",
                "[ immediate reg 0 accept ]"
            ]
        );
        assert_eq!(
            exprs(texts[2]),
            [
                "[ meta load l4proto => reg 1 ]",
                "[ cmp eq reg 1 0x00000006 ]",
                "[ payload load 2b @ transport header + 2 => reg 1 ]",
                "[ cmp eq reg 1 0x0000bb01 ]",
                "[ fib daddr type => reg 1 ]",
                "[ cmp eq reg 1 0x00000002 ]",
                "[ meta load nfproto => reg 1 ]",
                "[ cmp eq reg 1 0x00000002 ]",
                "[ payload load 4b @ network header + 12 => reg 1 ]",
                "[ lookup reg 1 set s4 0x1 ]",
                "[ immediate reg 0 drop ]",
            ]
        );
        assert_eq!(exprs(texts[3])[4..6], ["[ fib daddr type => reg 1 ]", "[ cmp eq reg 1 0x00000002 ]"]);
        assert_eq!(exprs(texts[3])[9], "[ lookup reg 1 set s6 0x1 ]");
    }

    #[test]
    fn the_local_scope_is_the_input_chain_of_earlier_versions() {
        let sent = backend(enforce(EnforceScope::Local)).transaction(&[Step::Enforce]).recorded();
        let texts = texts(&sent);
        assert!(texts[0].contains("type filter hook input prio 0 policy accept"), "{}", texts[0]);
        assert_eq!(texts.len(), 4);
        assert!(texts.iter().all(|t| !t.contains("fib")), "{texts:?}");
    }

    fn name(text: &str) -> Name {
        Name::of(&text.parse().unwrap()).unwrap()
    }

    #[test]
    fn a_move_creates_marked_objects_with_their_elements_then_removes_the_old_ones_in_one_batch() {
        let b = backend(enforce(EnforceScope::Host));
        let seed = allowsync_testkit::set(["2001:db8::/48"]);
        let steps = [
            Step::AddTable(name("table inet t")),
            Step::AddSet { set: name("set inet t s6"), family: Family::V6, seed },
            Step::Enforce,
            Step::DeleteChain(name("chain inet old enforce")),
            Step::DeleteSet(name("set inet t old_v6")),
            Step::DeleteTable(name("table inet old")),
        ];
        let sent = b.transaction(&steps).recorded();
        assert_eq!(
            ops(&sent),
            [
                ("add table", "table inet t", libc::NFT_MSG_NEWTABLE),
                ("add set", "set inet t s6", libc::NFT_MSG_NEWSET),
                ("add elements", "set inet t s6", libc::NFT_MSG_NEWSETELEM),
                ("add chain", CHAIN, libc::NFT_MSG_NEWCHAIN),
                // A rule without a handle, deleted: the kernel flushes the chain first, so a
                // restart never duplicates the rules.
                ("flush chain", CHAIN, libc::NFT_MSG_DELRULE),
                ("add rule", CHAIN, libc::NFT_MSG_NEWRULE),
                ("add rule", CHAIN, libc::NFT_MSG_NEWRULE),
                ("add rule", CHAIN, libc::NFT_MSG_NEWRULE),
                ("delete chain", "chain inet old enforce", libc::NFT_MSG_DELCHAIN),
                ("delete set", "set inet t old_v6", libc::NFT_MSG_DELSET),
                ("delete table", "table inet old", libc::NFT_MSG_DELTABLE),
            ]
        );
        // The table, the set and the chain carry the mark; the rules and deletions do not.
        let marked: Vec<&str> = sent.iter().filter(|s| s.marked).map(|s| s.op).collect();
        assert_eq!(marked, ["add table", "add set", "add chain"]);
        assert_eq!(ranges_in::<u128>(&sent, libc::NFT_MSG_NEWSETELEM, "set inet t s6").len(), 1);
    }

    #[test]
    fn an_operators_set_in_any_family_is_flushed_by_name_and_filled_in_its_own_family() {
        let b = NftablesBackend::new(&NftablesConfig {
            table: "t".into(),
            set_v4: "ip filter chat_v4".into(),
            set_v6: "ip6 filter chat_v6".into(),
            enforce: None,
        })
        .unwrap();
        let sent = b.transaction(&[Step::FlushSet(name("set ip filter chat_v4"))]).recorded();
        assert_eq!(ops(&sent), [("flush set", "set ip filter chat_v4", libc::NFT_MSG_DELSETELEM)]);
        assert!(sent[0].elements.is_empty(), "no element: the whole set");
        let diff = Diff {
            v4: Delta { remove: vec![], add: vec![Range { start: v4("10.0.0.0"), end: v4("10.0.0.255") }] },
            v6: Delta { remove: vec![], add: vec![Range { start: 1u128, end: 1 }] },
        };
        let sent = b.apply_transaction(&diff).recorded();
        assert_eq!(
            ops(&sent),
            [
                ("add elements", "set ip filter chat_v4", libc::NFT_MSG_NEWSETELEM),
                ("add elements", "set ip6 filter chat_v6", libc::NFT_MSG_NEWSETELEM),
            ]
        );
        assert_eq!(
            sent.iter().map(|s| s.family).collect::<Vec<_>>(),
            [libc::NFPROTO_IPV4 as u8, libc::NFPROTO_IPV6 as u8]
        );
    }

    #[test]
    fn a_diff_is_all_removals_then_all_additions_as_interval_elements() {
        let b = backend(None);
        let r = |a: &str, z: &str| Range { start: v4(a), end: v4(z) };
        let top = r("255.255.255.0", "255.255.255.255");
        let six = Range { start: 1u128, end: 1 };
        let diff = Diff {
            v4: Delta {
                remove: vec![r("10.0.0.0", "10.0.0.255")],
                add: vec![r("10.1.0.0", "10.1.1.255"), top],
            },
            v6: Delta { remove: vec![six], add: vec![] },
        };
        let sent = b.apply_transaction(&diff).recorded();
        assert_eq!(
            ops(&sent),
            [
                ("delete elements", "set inet t s4", libc::NFT_MSG_DELSETELEM),
                ("delete elements", "set inet t s6", libc::NFT_MSG_DELSETELEM),
                ("add elements", "set inet t s4", libc::NFT_MSG_NEWSETELEM),
            ]
        );
        // A range is its start plus an interval end one past it, network byte order; the
        // range reaching the top of the address space has no end element.
        assert_eq!(sent[0].elements, [(vec![10, 0, 0, 0], false), (vec![10, 0, 1, 0], true)]);
        assert_eq!(
            sent[2].elements,
            [(vec![10, 1, 0, 0], false), (vec![10, 1, 2, 0], true), (vec![255, 255, 255, 0], false)]
        );
        assert_eq!(ranges_in::<u128>(&sent, libc::NFT_MSG_DELSETELEM, "set inet t s6"), [six]);
        assert_eq!(
            ranges_in::<u32>(&sent, libc::NFT_MSG_NEWSETELEM, "set inet t s4"),
            [r("10.1.0.0", "10.1.1.255"), top]
        );
    }

    #[test]
    fn a_large_diff_is_one_transaction_of_many_messages_each_labelled() {
        let b = backend(None);
        // Every other /32: none adjacent, so each range is two elements.
        let add: Vec<Range<u32>> = (0..10_000u32).map(|i| Range { start: 2 * i, end: 2 * i }).collect();
        let diff = Diff { v4: Delta { remove: vec![], add: add.clone() }, v6: Delta::default() };
        let tx = b.apply_transaction(&diff);
        let messages = tx.messages;
        let sent = tx.recorded();
        assert_eq!(sent.len(), messages);
        assert!(messages > 2, "split into messages of at most 64 KiB: {messages}");
        assert!(sent.iter().all(|s| (s.op, s.object.as_str()) == ("add elements", "set inet t s4")));
        assert_eq!(ranges_in::<u32>(&sent, libc::NFT_MSG_NEWSETELEM, "set inet t s4"), add);
    }

    #[test]
    fn a_refused_message_is_named_by_its_label() {
        let labels = vec![(0, "add table", "table".to_string()), (1, "add elements", "set".to_string())];
        assert_eq!(label_of(&labels, 0), Some(("add table", "table")));
        assert_eq!(label_of(&labels, 1), Some(("add elements", "set")));
        assert_eq!(label_of(&labels, 7), Some(("add elements", "set")));
        assert_eq!(label_of(&[], 0), None);
    }
}
