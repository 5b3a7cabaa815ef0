//! The netlink transport of the nftables backend (and of the ipset backend's `proto.rs`, whose
//! messages ride the same `NETLINK_NETFILTER` socket): one `NETLINK_NETFILTER` socket per operation,
//! a batch sent in a single `sendmsg`, request/reply exchanges (single objects and dumps), and
//! a socket subscribed to a multicast group for change notifications.
//!
//! This module knows netlink framing (headers, attributes, `NLMSG_ERROR`, `NLMSG_DONE`) but
//! nothing about nf_tables objects or ipsets: building and parsing those messages is the
//! business of `nftables/` and `ipset/proto.rs`.
//!
//! Own commits: every notification of a commit carries, as its header's `nlmsg_pid`, the
//! netlink port id of the socket that sent the batch (measured here: `nft`'s messages carry
//! its port id). While a change monitor runs ([`watch_own_commits`]), each batch socket is
//! bound before it sends and its port id noted, so that the monitor can tell the notifications
//! of this process's own commits from everyone else's ([`take_own_commit`]). The note is made
//! before the batch is sent, so it can never come after the notification it explains.
//!
//! Why the batch path looks the way it does (measured, see the project's kernel notes): a batch
//! larger than one libnftnl page that is sent page by page is rejected with EINVAL, so every
//! page goes into **one** `sendmsg` (the kernel copies all iovecs into one buffer and processes
//! the whole transaction before `sendmsg` returns). The socket's send buffer is raised to the
//! batch size with `SO_SNDBUFFORCE` (netlink refuses a message larger than the send buffer);
//! `NETLINK_CAP_ACK` keeps acknowledgements small (no copy of the request in each reply), and
//! the replies are drained with `MSG_DONTWAIT` until `EAGAIN`: an aborted batch does not
//! acknowledge every sequence number, so counting replies would wait forever.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `NLMSG_ALIGN`: netlink messages start on 4-byte boundaries.
const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// `NLM_F_DUMP_INTR` (not in the libc crate for Linux): the kernel sets it on a dump message
/// when the objects changed while the dump was in progress, so the dump may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;

/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = std::mem::size_of::<libc::nlmsghdr>();

/// Receive buffer: large enough for the biggest skb a netlink dump fills (32 KiB on current
/// kernels); a bigger message is detected (`MSG_TRUNC`) and reported rather than misparsed.
const RECV_BUF_BYTES: usize = 128 * 1024;

/// A byte buffer aligned for `struct nlmsghdr`, so that libnftnl may read headers in place.
pub(crate) struct AlignedBuf {
    words: Vec<u64>,
}

impl AlignedBuf {
    pub(crate) fn zeroed(bytes: usize) -> Self {
        AlignedBuf { words: vec![0; bytes.div_ceil(8)] }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }

    fn len(&self) -> usize {
        self.words.len() * 8
    }

    pub(crate) fn as_slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.len());
        // SAFETY: `words` owns `self.len()` initialised bytes and `len` is within them; u8 has
        // no alignment or validity requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), len) }
    }
}

/// One received netlink message: the header fields and the whole message (header included).
pub(crate) struct Message<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    /// `nlmsg_pid`: in a notification, the port id of the socket whose request caused it.
    pub(crate) pid: u32,
    pub(crate) bytes: &'a [u8],
}

impl<'a> Message<'a> {
    /// The message as libnftnl's parsers want it. Valid for `self.bytes.len()` bytes, which is
    /// exactly the header's `nlmsg_len`, and 4-byte aligned (it lives in an [`AlignedBuf`] at a
    /// `NLMSG_ALIGN`ed offset).
    pub(crate) fn as_ptr(&self) -> *const libc::nlmsghdr {
        self.bytes.as_ptr().cast()
    }

    /// The `int error` that follows the header of `NLMSG_ERROR` and `NLMSG_DONE` (negative
    /// errno, 0 for an acknowledgement).
    fn error_code(&self) -> i32 {
        self.bytes
            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
    }

    /// The bytes after the header and a fixed family header of `fixed` bytes (`struct
    /// nfgenmsg` is 4): where the attributes start. Empty when the message is shorter.
    pub(crate) fn payload(&self, fixed: usize) -> &'a [u8] {
        self.bytes.get(NLMSG_HDRLEN + fixed..).unwrap_or_default()
    }

    /// Attribute `ty` of the message (after a fixed header of `fixed` bytes).
    pub(crate) fn attr(&self, fixed: usize, ty: u16) -> Option<&'a [u8]> {
        attributes(self.payload(fixed)).find(|&(t, _)| t == ty).map(|(_, v)| v)
    }

    /// String attribute `ty` (`NLA_NUL_STRING`), up to its NUL.
    pub(crate) fn str_attr(&self, fixed: usize, ty: u16) -> Option<String> {
        let v = self.attr(fixed, ty)?;
        Some(String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned())
    }
}

/// The netlink attributes `(type, value)` in `b`, in order, with the nested and byte-order
/// flags masked off the type. Stops at the first attribute whose length does not fit, so a
/// malformed tail is never read.
pub(crate) fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*b.first()?, *b.get(1)?]));
        let ty = u16::from_ne_bytes([*b.get(2)?, *b.get(3)?]) & 0x3fff;
        if !(4..=b.len()).contains(&len) {
            return None;
        }
        let value = &b[4..len];
        b = &b[align4(len).min(b.len())..];
        Some((ty, value))
    })
}

/// Splits a buffer of received bytes into messages; a truncated or malformed header is an error
/// (`EBADMSG`), never silently skipped.
pub(crate) fn for_each_message<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(Message<'a>) -> io::Result<()>,
) -> io::Result<()> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let h = &buf[off..];
        let len = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > h.len() {
            return Err(io::Error::from_raw_os_error(libc::EBADMSG));
        }
        let ty = u16::from_ne_bytes(h[4..6].try_into().expect("2 bytes"));
        let flags = u16::from_ne_bytes(h[6..8].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(h[8..12].try_into().expect("4 bytes"));
        let pid = u32::from_ne_bytes(h[12..16].try_into().expect("4 bytes"));
        f(Message { ty, flags, seq, pid, bytes: &h[..len] })?;
        off += align4(len);
    }
    Ok(())
}

/// A dump that the kernel flagged `NLM_F_DUMP_INTR`: the objects changed while it ran, so what
/// was received may mix two states. Read again.
#[derive(Debug, thiserror::Error)]
#[error("the ruleset changed during the dump (NLM_F_DUMP_INTR)")]
pub(crate) struct DumpInterrupted;

impl DumpInterrupted {
    pub(crate) fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<DumpInterrupted>())
    }
}

/// What the kernel answered to a batch.
#[derive(Debug, Default)]
pub(crate) struct BatchReplies {
    /// Sequence numbers acknowledged with success.
    pub(crate) acked: usize,
    /// `(sequence number, errno)` of every message the kernel refused, in reply order.
    pub(crate) errors: Vec<(u32, i32)>,
}

/// A socket subscribed to a multicast group ([`NfSocket::subscribe`]), read through the tokio
/// reactor: waiting for notifications holds no thread.
pub(crate) struct Subscription {
    fd: AsyncFd<NfSocket>,
}

impl Subscription {
    /// Subscribes to `group`; must be called within a tokio runtime.
    pub(crate) fn new(group: u32, rcvbuf: usize) -> io::Result<Self> {
        let sock = NfSocket::subscribe(group, rcvbuf)?;
        // SAFETY: `sock` owns its descriptor and moves into the AsyncFd, which owns it until it
        // is dropped; `NfSocket::as_raw_fd` always returns that same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?;
        Ok(Subscription { fd })
    }

    /// Waits for the next datagram of notifications and receives it into `buf`. `ENOBUFS`
    /// means that some were lost (the socket could not keep up).
    pub(crate) async fn recv(&self, buf: &mut AlignedBuf) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match self.fd.get_ref().recv(buf, libc::MSG_DONTWAIT)? {
                Some(n) => return Ok(n),
                None => ready.clear_ready(),
            }
        }
    }
}

/// How long a noted port id waits for its commit's notification: far longer than the kernel
/// takes to queue it (it does so before `sendmsg` returns), short enough that a note whose
/// notification was lost (ENOBUFS) cannot linger.
const OWN_COMMIT_TTL: Duration = Duration::from_secs(30);

/// The port ids of this process's batch sockets whose notifications have not been seen yet,
/// and how many monitors want them noted (none: nothing is noted, nothing grows).
struct OwnCommits {
    watchers: usize,
    sent: VecDeque<(u32, Instant)>,
}

static OWN_COMMITS: Mutex<OwnCommits> = Mutex::new(OwnCommits { watchers: 0, sent: VecDeque::new() });

fn own_commits() -> std::sync::MutexGuard<'static, OwnCommits> {
    // A panic while holding it leaves a plain list behind: still usable.
    OWN_COMMITS.lock().unwrap_or_else(|p| p.into_inner())
}

/// While alive, batch sockets note their port ids (see the module header).
pub(crate) struct OwnCommitsWatch(());

/// Starts noting the port ids of this process's batches, until the guard is dropped.
pub(crate) fn watch_own_commits() -> OwnCommitsWatch {
    own_commits().watchers += 1;
    OwnCommitsWatch(())
}

impl Drop for OwnCommitsWatch {
    fn drop(&mut self) {
        let mut own = own_commits();
        own.watchers -= 1;
        if own.watchers == 0 {
            own.sent.clear();
        }
    }
}

/// True when `portid` sent a batch of this process that the kernel committed and whose
/// notification was not taken yet; takes the note.
pub(crate) fn take_own_commit(portid: u32) -> bool {
    let mut own = own_commits();
    match own.sent.iter().position(|&(p, _)| p == portid) {
        Some(i) => {
            own.sent.remove(i);
            true
        }
        None => false,
    }
}

fn note_own_commit(portid: u32) {
    let mut own = own_commits();
    let now = Instant::now();
    while own.sent.front().is_some_and(|&(_, at)| now.duration_since(at) > OWN_COMMIT_TTL) {
        own.sent.pop_front();
    }
    own.sent.push_back((portid, now));
}

/// An aborted batch is never notified: its note must not wait for a port id that the kernel may
/// soon give to another process's socket.
fn forget_own_commit(portid: u32) {
    let mut own = own_commits();
    if let Some(i) = own.sent.iter().rposition(|&(p, _)| p == portid) {
        own.sent.remove(i);
    }
}

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
///
/// A fresh socket per operation: no stale replies of an earlier, failed exchange can be
/// mistaken for this one's, and the buffer sizes fit the batch at hand.
pub(crate) struct NfSocket {
    fd: OwnedFd,
    /// Sequence number of the last request: each exchange has its own, so that replies left
    /// over from an exchange abandoned on error are never taken for the next one's.
    seq: AtomicU32,
}

impl AsRawFd for NfSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NfSocket {
    pub(crate) fn open() -> io::Result<Self> {
        let sock = Self::socket(0)?;
        // Acknowledgements without a copy of the request: a refused 64 KiB element message
        // would otherwise come back whole.
        sock.set_opt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        Ok(sock)
    }

    /// A non-blocking socket that receives the notifications of multicast `group` (the
    /// kernel's, never sent to), with a receive buffer of `rcvbuf` bytes. A burst larger than
    /// that makes the next receive fail with `ENOBUFS`: notifications were lost.
    pub(crate) fn subscribe(group: u32, rcvbuf: usize) -> io::Result<Self> {
        let sock = Self::socket(libc::SOCK_NONBLOCK)?;
        // Bound first: the kernel skips a listener whose port id equals the one a broadcast
        // excludes, and an unbound socket's 0 is what most notifications carry.
        sock.bind_portid()?;
        sock.set_opt(libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, group as libc::c_int)?;
        let rcvbuf = rcvbuf.min(i32::MAX as usize) as libc::c_int;
        // FORCE needs CAP_NET_ADMIN (which the daemon has); the plain option is capped by
        // net.core.rmem_max, but is better than the default.
        sock.set_opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf)
            .or_else(|_| sock.set_opt(libc::SOL_SOCKET, libc::SO_RCVBUF, rcvbuf))?;
        Ok(sock)
    }

    fn socket(flags: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(NfSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: AtomicU32::new(0) })
    }

    /// Binds the socket to a port id of the kernel's choosing (what the first send would do) and
    /// returns it.
    fn bind_portid(&self) -> io::Result<u32> {
        let mut addr: libc::sockaddr_nl = {
            // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (port id 0: "choose").
            unsafe { std::mem::zeroed() }
        };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a live sockaddr_nl and `len` its size, for both calls; the kernel
        // writes at most `len` bytes back.
        let rc = unsafe {
            if libc::bind(self.fd.as_raw_fd(), (&raw const addr).cast(), len) < 0 {
                -1
            } else {
                libc::getsockname(self.fd.as_raw_fd(), (&raw mut addr).cast(), &mut len)
            }
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(addr.nl_pid) }
    }

    /// A fresh sequence number for a request on this socket.
    pub(crate) fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    fn set_opt(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: `value` is a live c_int and its size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Sends a whole batch (all its pages) in one `sendmsg` and collects every reply.
    ///
    /// `messages` is the number of messages that may be answered; it sizes the receive buffer
    /// so that no acknowledgement is dropped (a dropped reply would make the outcome unknown,
    /// reported as `ENOBUFS`).
    pub(crate) fn send_batch(&self, pages: &[&[u8]], messages: usize) -> io::Result<BatchReplies> {
        let total: usize = pages.iter().map(|p| p.len()).sum();
        if pages.len() > libc::UIO_MAXIOV as usize {
            // Cannot happen with the page sizes the backend picks; refuse rather than split,
            // since a split batch is no longer one transaction.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "batch has too many pages for one sendmsg",
            ));
        }
        // Netlink refuses a message longer than the send buffer; the kernel doubles the value.
        let sndbuf = total.saturating_add(64 * 1024).min(i32::MAX as usize) as libc::c_int;
        self.set_opt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf)?;
        // Each acknowledgement occupies about 1 KiB of receive buffer (skb overhead included).
        let rcvbuf = messages.saturating_mul(2048).saturating_add(256 * 1024).min(i32::MAX as usize);
        self.set_opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf as libc::c_int)?;

        let mut iov: Vec<libc::iovec> =
            pages.iter().map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() }).collect();
        let mut dst: libc::sockaddr_nl = {
            // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0 = the kernel).
            unsafe { std::mem::zeroed() }
        };
        dst.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let msg = libc::msghdr {
            msg_name: (&raw mut dst).cast(),
            msg_namelen: std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            msg_iov: iov.as_mut_ptr(),
            msg_iovlen: iov.len(),
            msg_control: std::ptr::null_mut(),
            msg_controllen: 0,
            msg_flags: 0,
        };
        // Noted before sending: the kernel queues the notifications inside sendmsg.
        let noted = if own_commits().watchers > 0 {
            let portid = self.bind_portid()?;
            note_own_commit(portid);
            Some(portid)
        } else {
            None
        };
        let forget = || noted.map(forget_own_commit);
        let sent = loop {
            // SAFETY: `msg` points at `dst` and `iov`, which outlive the call; every iovec
            // describes a live page of the batch the caller borrows.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                forget();
                return Err(e);
            }
        };
        if sent != total {
            forget();
            return Err(io::Error::new(io::ErrorKind::WriteZero, "netlink sendmsg sent part of the batch"));
        }

        // The kernel ran the whole transaction inside sendmsg: every reply is queued already.
        let mut replies = BatchReplies::default();
        let mut buf = AlignedBuf::zeroed(RECV_BUF_BYTES);
        while let Some(n) = self.recv(&mut buf, libc::MSG_DONTWAIT)? {
            for_each_message(buf.as_slice(n), |m| {
                if m.ty == libc::NLMSG_ERROR as u16 {
                    match m.error_code() {
                        0 => replies.acked += 1,
                        e => replies.errors.push((m.seq, -e)),
                    }
                }
                Ok(())
            })?;
        }
        // A refused message aborts the whole batch, which is then never notified.
        if !replies.errors.is_empty() {
            forget();
        }
        Ok(replies)
    }

    /// Sends one request and hands every data message of the answer to `on_data`, until the
    /// exchange ends: `NLMSG_DONE` for a dump, the acknowledgement for a single-object request
    /// (which must carry `NLM_F_ACK`). A refusal is returned as the errno's `io::Error`; a dump
    /// the kernel marks as interrupted by a concurrent change fails with [`DumpInterrupted`]
    /// once the dump is over.
    pub(crate) fn request(
        &self,
        request: &[u8],
        seq: u32,
        mut on_data: impl FnMut(&Message<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            // SAFETY: `request` is a live byte slice of the given length.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
            if n >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let mut buf = AlignedBuf::zeroed(RECV_BUF_BYTES);
        let mut interrupted = false;
        loop {
            let n = self.recv(&mut buf, 0)?.expect("a blocking recv never returns EAGAIN");
            let mut done = false;
            for_each_message(buf.as_slice(n), |m| {
                if m.seq != seq || done {
                    return Ok(()); // not ours (cannot happen on a private socket) or after the end
                }
                match i32::from(m.ty) {
                    libc::NLMSG_ERROR | libc::NLMSG_DONE => {
                        done = true;
                        match m.error_code() {
                            0 => Ok(()),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        }
                    }
                    _ => {
                        interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                        on_data(&m)
                    }
                }
            })?;
            if done {
                return if interrupted { Err(io::Error::other(DumpInterrupted)) } else { Ok(()) };
            }
        }
    }

    /// One `recv` into `buf`: `Ok(None)` on `EAGAIN` (non-blocking), an error when the message
    /// did not fit (`MSG_TRUNC`) or replies were lost (`ENOBUFS`).
    fn recv(&self, buf: &mut AlignedBuf, flags: libc::c_int) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes. MSG_TRUNC makes the call return
            // the real length of a message that did not fit, so truncation is detected.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags | libc::MSG_TRUNC)
            };
            if n >= 0 {
                let n = n as usize;
                if n > buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message larger than buffer",
                    ));
                }
                return Ok(Some(n));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_split_and_malformed_ones_rejected() {
        let mut buf = Vec::new();
        for (ty, seq, payload) in [(2u16, 7u32, &[0u8, 0, 0, 0][..]), (3, 8, &[1, 2, 3][..])] {
            let len = (NLMSG_HDRLEN + payload.len()) as u32;
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(payload);
            buf.resize(align4(buf.len()), 0);
        }
        let mut seen = Vec::new();
        for_each_message(&buf, |m| {
            seen.push((m.ty, m.seq, m.bytes.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [(2, 7, 20), (3, 8, 19)]);

        // A length past the end of the buffer is an error, not a silent stop.
        buf[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(for_each_message(&buf, |_| Ok(())).is_err());
    }

    /// `(len, type, value)` as netlink lays an attribute out, padded to 4 bytes.
    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(align4(a.len()), 0);
        a
    }

    #[test]
    fn attributes_are_read_in_order_and_a_bad_length_ends_them() {
        let mut b = [attr(1, b"t\0"), attr(0x8000 | 2, &[1, 2, 3, 4, 5])].concat();
        let got: Vec<(u16, Vec<u8>)> = attributes(&b).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(got, [(1, b"t\0".to_vec()), (2, vec![1, 2, 3, 4, 5])], "the nested flag is masked");
        b.extend_from_slice(&[200, 0, 3, 0]);
        assert_eq!(attributes(&b).count(), 2, "an attribute longer than the rest is not read");
    }

    #[test]
    fn own_commits_are_noted_only_while_watched_and_taken_once() {
        let watch = watch_own_commits();
        note_own_commit(4242);
        note_own_commit(4243);
        forget_own_commit(4243);
        assert!(take_own_commit(4242));
        assert!(!take_own_commit(4242), "taken once");
        assert!(!take_own_commit(4243), "an aborted batch is forgotten");
        note_own_commit(4244);
        drop(watch);
        assert!(!take_own_commit(4244), "cleared with the last watcher");
    }
}
