//! The netlink transport of the nftables backend: one `NETLINK_NETFILTER` socket per operation,
//! a batch sent in a single `sendmsg`, and request/reply exchanges (single objects and dumps).
//!
//! This module knows netlink framing (headers, `NLMSG_ERROR`, `NLMSG_DONE`) but nothing about
//! nf_tables objects: building and parsing those messages is the business of `nftables/`.
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

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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
    pub(crate) bytes: &'a [u8],
}

impl Message<'_> {
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
        f(Message { ty, flags, seq, bytes: &h[..len] })?;
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

/// A `NETLINK_NETFILTER` socket in the calling thread's network namespace.
///
/// A fresh socket per operation: no stale replies of an earlier, failed exchange can be
/// mistaken for this one's, and the buffer sizes fit the batch at hand.
pub(crate) struct NfSocket {
    fd: OwnedFd,
    /// Sequence number of the last request: each exchange has its own, so that replies left
    /// over from an exchange abandoned on error are never taken for the next one's.
    seq: std::cell::Cell<u32>,
}

impl NfSocket {
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let sock = NfSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: std::cell::Cell::new(0) };
        // Acknowledgements without a copy of the request: a refused 64 KiB element message
        // would otherwise come back whole.
        sock.set_opt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)?;
        Ok(sock)
    }

    /// A fresh sequence number for a request on this socket.
    pub(crate) fn next_seq(&self) -> u32 {
        self.seq.set(self.seq.get().wrapping_add(1));
        self.seq.get()
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
        let sent = loop {
            // SAFETY: `msg` points at `dst` and `iov`, which outlive the call; every iovec
            // describes a live page of the batch the caller borrows.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        if sent != total {
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
}
