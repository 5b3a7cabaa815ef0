//! Change notifications: a task that reads nf_tables' multicast group `NFNLGRP_NFTABLES` (what
//! `nft monitor` reads) and reports every commit by someone else that touched a table holding
//! allowsync's objects (its own table, and the operator's tables whose sets it fills), so that
//! the daemon can repair them at once instead of at its next poll.
//!
//! Each committed transaction arrives as its `NFT_MSG_NEW*` / `NFT_MSG_DEL*` messages (one per
//! table, chain, rule, set or batch of elements it changed), then one `NFT_MSG_NEWGEN`; every
//! one of them carries the committing socket's port id. A transaction is reported when it
//! changed anything in the watched table and was not one of this process's own batches (see
//! the own commits of `netlink.rs`). A commit elsewhere (fail2ban's, Docker's or firewalld's
//! tables) is not reported at all: it cannot have changed allowsync's objects, so a host where
//! such tools commit every second costs allowsync nothing but reading their notifications.
//!
//! What is reported is only a reason to look: the repair reads the kernel and writes only what
//! is missing. Notifications lost to a full receive buffer (`ENOBUFS`) are reported as
//! [`Changes::lost`]: then anything may have changed, and everything is checked.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, error, warn};

use crate::backend::BackendError;
use crate::backend::netlink::{
    AlignedBuf, Message, OwnCommitsWatch, Subscription, for_each_message, take_own_commit, watch_own_commits,
};
use crate::config::NftablesConfig;
use crate::logging::Untrusted;
use crate::ownership::Object;

/// Receive buffer of the notification socket: a `flush ruleset` of a large ruleset is a burst
/// of thousands of messages, and the daemon may be busy for a moment.
const RCVBUF_BYTES: usize = 4 << 20;

/// The largest datagram read at a time (the kernel sends one notification per datagram).
const RECV_BYTES: usize = 64 << 10;

/// Distinct changes remembered for one report; more are counted, not listed.
const MAX_WHAT: usize = 16;

/// After the socket failed (not ENOBUFS), how long before it is opened again.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

// From linux/netfilter/nf_tables.h: the attribute that names the table is 1 in every object's
// message; the object's own name (or, for a rule, its chain's) differs.
const NFTA_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_NAME: u16 = 2;

/// What changed since the last report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// When the first of these notifications was read.
    pub first_at: Option<Instant>,
    /// What the foreign commits did to the table, e.g. `set inet allowsync allow_v4 deleted`.
    pub what: BTreeSet<String>,
    /// How many foreign commits touched the table.
    pub commits: usize,
    /// Notifications were lost (ENOBUFS) or the socket failed: anything may have changed.
    pub lost: bool,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.commits == 0 && !self.lost
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: Changes) {
        self.first_at = match (self.first_at, other.first_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.commits += other.commits;
        self.lost |= other.lost;
        for w in other.what {
            if self.what.len() < MAX_WHAT {
                self.what.insert(w);
            }
        }
    }
}

/// The tables whose changes matter, as `(nfproto family, name)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    tables: Vec<(u8, String)>,
}

impl Watch {
    /// allowsync's own table and the tables of both sets.
    fn of(config: &NftablesConfig) -> Watch {
        let mut tables = Vec::new();
        let objects = [config.table_object(), config.set_object(false), config.set_object(true)];
        for t in objects.iter().filter_map(Object::nft_table) {
            if let Object::NftTable { family, table } = t {
                let entry = (family.nfproto() as u8, table);
                if !tables.contains(&entry) {
                    tables.push(entry);
                }
            }
        }
        Watch { tables }
    }
}

struct Shared {
    changes: Mutex<Changes>,
    notify: Notify,
}

impl Shared {
    fn publish(&self, c: Changes) {
        self.changes.lock().unwrap_or_else(|p| p.into_inner()).merge(c);
        self.notify.notify_one();
    }
}

/// The running notification reader. Dropping it stops the task.
pub struct Monitor {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    _own: OwnCommitsWatch,
}

impl Monitor {
    /// Subscribes, in the calling thread's network namespace, and starts the reader on the
    /// current tokio runtime. Fails when the socket cannot be opened or subscribed.
    pub fn start(config: &NftablesConfig) -> Result<Monitor, BackendError> {
        let watch = Watch::of(config);
        let fd = subscribe()?;
        let shared = Arc::new(Shared { changes: Mutex::default(), notify: Notify::new() });
        // Noting our own batches starts before the first notification can be read.
        let own = watch_own_commits();
        let task = tokio::spawn(read_forever(fd, watch, Arc::clone(&shared)));
        Ok(Monitor { shared, task, _own: own })
    }

    /// Waits for the next foreign change of the table (or a loss) and takes what was gathered
    /// since the last call. Cancel-safe: nothing is taken until it returns.
    pub async fn next(&self) -> Changes {
        loop {
            let taken = std::mem::take(&mut *self.shared.changes.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return taken;
            }
            self.shared.notify.notified().await;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn subscribe() -> Result<Subscription, BackendError> {
    Subscription::new(libc::NFNLGRP_NFTABLES as u32, RCVBUF_BYTES).map_err(|e| BackendError::Kernel {
        op: "subscribe to nf_tables notifications",
        object: "NFNLGRP_NFTABLES".into(),
        cause: e,
    })
}

/// The reader: gathers each transaction's messages and publishes the foreign ones that touched
/// the table. A failed socket is reported as a loss and opened again.
async fn read_forever(mut sub: Subscription, watch: Watch, shared: Arc<Shared>) {
    let mut buf = AlignedBuf::zeroed(RECV_BYTES);
    let mut tx = Transaction::default();
    loop {
        let failure = match read_one(&sub, &mut buf, &watch, &mut tx, &shared).await {
            Ok(()) => continue,
            Err(e) => e,
        };
        tx = Transaction::default();
        shared.publish(Changes { lost: true, first_at: Some(Instant::now()), ..Changes::default() });
        if failure.raw_os_error() == Some(libc::ENOBUFS) {
            warn!("nf_tables notifications were lost (ENOBUFS): checking everything");
            continue;
        }
        error!(error = %failure, "reading nf_tables notifications failed: opening the socket again");
        loop {
            tokio::time::sleep(REOPEN_AFTER).await;
            match subscribe() {
                Ok(new) => {
                    sub = new;
                    break;
                }
                Err(e) => error!(error = %e, "cannot subscribe to nf_tables notifications"),
            }
        }
        // What happened while no socket listened is unknown.
        shared.publish(Changes { lost: true, first_at: Some(Instant::now()), ..Changes::default() });
    }
}

/// Reads the next datagram and takes its messages.
async fn read_one(
    sub: &Subscription,
    buf: &mut AlignedBuf,
    watch: &Watch,
    tx: &mut Transaction,
    shared: &Shared,
) -> io::Result<()> {
    let n = sub.recv(buf).await?;
    let at = Instant::now();
    for_each_message(buf.as_slice(n), |m| {
        if let Some(done) = tx.add(&m, watch, at) {
            shared.publish(done);
        }
        Ok(())
    })
}

/// The messages of the transaction being read, up to its `NEWGEN`.
#[derive(Debug, Default)]
struct Transaction {
    what: BTreeSet<String>,
    first_at: Option<Instant>,
}

impl Transaction {
    /// Takes one message; at the transaction's end (`NEWGEN`), what to report, if anything.
    fn add(&mut self, m: &Message<'_>, watch: &Watch, at: Instant) -> Option<Changes> {
        if i32::from(m.ty) >> 8 != libc::NFNL_SUBSYS_NFTABLES {
            return None;
        }
        if i32::from(m.ty) & 0xff != libc::NFT_MSG_NEWGEN {
            if let Some(what) = describe(m, watch) {
                self.first_at.get_or_insert(at);
                if self.what.len() < MAX_WHAT {
                    self.what.insert(what);
                }
            }
            return None;
        }
        let tx = std::mem::take(self);
        if take_own_commit(m.pid) {
            debug!(portid = m.pid, touched = !tx.what.is_empty(), "our own commit");
            return None;
        }
        if tx.what.is_empty() {
            return None;
        }
        debug!(portid = m.pid, what = ?tx.what, "a foreign commit changed the table");
        Some(Changes { first_at: tx.first_at, what: tx.what, commits: 1, lost: false })
    }
}

/// What a notification says about the watched table, `None` when it is about anything else.
fn describe(m: &Message<'_>, watch: &Watch) -> Option<String> {
    let msg = i32::from(m.ty) & 0xff;
    // `struct nfgenmsg`: family, version, resource id; the attributes follow.
    let family = *m.payload(0).first()?;
    let attr = |want: u16| m.str_attr(4, want);
    let name = attr(NFTA_TABLE)?;
    if !watch.tables.iter().any(|(f, t)| *f == family && *t == name) {
        return None;
    }
    let table = format!("table {} {name}", family_name(family));
    let named = |kind: &str, a: u16| format!("{kind} {} {name} {}", family_name(family), shown(attr(a)));
    Some(match msg {
        libc::NFT_MSG_NEWTABLE => format!("{table} changed"),
        libc::NFT_MSG_DELTABLE => format!("{table} deleted"),
        libc::NFT_MSG_NEWCHAIN => format!("{} added or changed", named("chain", NFTA_CHAIN_NAME)),
        libc::NFT_MSG_DELCHAIN => format!("{} deleted", named("chain", NFTA_CHAIN_NAME)),
        libc::NFT_MSG_NEWRULE => format!("a rule added to {}", named("chain", NFTA_RULE_CHAIN)),
        libc::NFT_MSG_DELRULE => format!("a rule deleted from {}", named("chain", NFTA_RULE_CHAIN)),
        libc::NFT_MSG_NEWSET => format!("{} added or changed", named("set", NFTA_SET_NAME)),
        libc::NFT_MSG_DELSET => format!("{} deleted", named("set", NFTA_SET_NAME)),
        libc::NFT_MSG_NEWSETELEM => format!("elements added to {}", named("set", NFTA_SET_NAME)),
        libc::NFT_MSG_DELSETELEM => format!("elements deleted from {}", named("set", NFTA_SET_NAME)),
        other => format!("an object in {table} changed (message {other})"),
    })
}

/// A name from the kernel as logs show it: as is when it is a plain identifier (allowsync's own
/// are), quoted and escaped otherwise (anyone may name a chain in the table).
fn shown(name: Option<String>) -> String {
    match name {
        Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) => n,
        Some(n) => Untrusted(&n).to_string(),
        None => "?".into(),
    }
}

fn family_name(family: u8) -> &'static str {
    match i32::from(family) {
        libc::NFPROTO_INET => "inet",
        libc::NFPROTO_IPV4 => "ip",
        libc::NFPROTO_IPV6 => "ip6",
        libc::NFPROTO_ARP => "arp",
        libc::NFPROTO_BRIDGE => "bridge",
        libc::NFPROTO_NETDEV => "netdev",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::netlink::for_each_message;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    /// One nf_tables notification as the kernel sends it: header, nfgenmsg, attributes.
    fn message(msg: i32, family: u8, portid: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = [vec![family, 0, 0, 0], attrs.concat()].concat();
        let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&(((libc::NFNL_SUBSYS_NFTABLES << 8) | msg) as u16).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&portid.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn inet(msg: i32, table: &str, name_attr: Option<(u16, &str)>, portid: u32) -> Vec<u8> {
        let mut attrs = vec![attr(NFTA_TABLE, format!("{table}\0").as_bytes())];
        if let Some((a, n)) = name_attr {
            attrs.push(attr(a, format!("{n}\0").as_bytes()));
        }
        message(msg, libc::NFPROTO_INET as u8, portid, &attrs)
    }

    fn newgen(portid: u32) -> Vec<u8> {
        message(libc::NFT_MSG_NEWGEN, 0, portid, &[attr(1, &7u32.to_be_bytes())])
    }

    /// Feeds `bytes` through a transaction reader, as the task does; the reports it makes.
    fn read(bytes: &[u8]) -> Vec<Changes> {
        let watch = Watch {
            tables: vec![
                (libc::NFPROTO_INET as u8, "allowsync".into()),
                (libc::NFPROTO_IPV4 as u8, "filter".into()),
            ],
        };
        let mut tx = Transaction::default();
        let mut out = Vec::new();
        for_each_message(bytes, |m| {
            out.extend(tx.add(&m, &watch, Instant::now()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn a_flush_ruleset_is_one_report_naming_what_went() {
        // What `nft flush ruleset` sent here, in order (see the kernel notes).
        let bytes = [
            inet(libc::NFT_MSG_DELRULE, "allowsync", Some((NFTA_RULE_CHAIN, "enforce")), 900),
            inet(libc::NFT_MSG_DELSET, "allowsync", Some((NFTA_SET_NAME, "allow_v4")), 900),
            inet(libc::NFT_MSG_DELCHAIN, "allowsync", Some((NFTA_CHAIN_NAME, "enforce")), 900),
            inet(libc::NFT_MSG_DELTABLE, "allowsync", None, 900),
            inet(libc::NFT_MSG_DELTABLE, "firewalld", None, 900),
            newgen(900),
        ]
        .concat();
        let got = read(&bytes);
        assert_eq!(got.len(), 1, "{got:?}");
        let what: Vec<&str> = got[0].what.iter().map(String::as_str).collect();
        assert_eq!(
            what,
            [
                "a rule deleted from chain inet allowsync enforce",
                "chain inet allowsync enforce deleted",
                "set inet allowsync allow_v4 deleted",
                "table inet allowsync deleted",
            ]
        );
        assert_eq!((got[0].commits, got[0].lost), (1, false));
        assert!(got[0].first_at.is_some());
    }

    #[test]
    fn commits_elsewhere_are_not_reported() {
        let bytes = [
            inet(libc::NFT_MSG_NEWSETELEM, "f2b-table", Some((NFTA_SET_NAME, "addr-set-sshd")), 77),
            newgen(77),
            // `ip filter` holds a set allowsync fills (see `read`); `inet filter` is another table.
            inet(libc::NFT_MSG_DELTABLE, "filter", None, 79),
            newgen(79),
            // Same name, another family: `table ip allowsync` is not ours.
            message(
                libc::NFT_MSG_DELTABLE,
                libc::NFPROTO_IPV4 as u8,
                78,
                &[attr(NFTA_TABLE, b"allowsync\0")],
            ),
            newgen(78),
        ]
        .concat();
        assert_eq!(read(&bytes), []);
    }

    #[test]
    fn the_tables_of_operator_sets_are_watched() {
        let set = [attr(NFTA_TABLE, b"filter\0"), attr(NFTA_SET_NAME, b"chat_v4\0")];
        let bytes = [message(libc::NFT_MSG_DELSET, libc::NFPROTO_IPV4 as u8, 80, &set), newgen(80)].concat();
        let got = read(&bytes);
        assert_eq!(got[0].what.iter().next().unwrap(), "set ip filter chat_v4 deleted");
        let cfg = NftablesConfig {
            table: "allowsync".into(),
            set_v4: "ip filter chat_v4".into(),
            set_v6: "allow_v6".into(),
            enforce: None,
        };
        let want = [
            (libc::NFPROTO_INET as u8, "allowsync".to_string()),
            (libc::NFPROTO_IPV4 as u8, "filter".to_string()),
        ];
        assert_eq!(Watch::of(&cfg).tables, want);
    }

    #[test]
    fn foreign_names_are_escaped() {
        let bytes =
            [inet(libc::NFT_MSG_NEWCHAIN, "allowsync", Some((NFTA_CHAIN_NAME, "x\ny")), 5), newgen(5)]
                .concat();
        let got = read(&bytes);
        assert_eq!(got[0].what.iter().next().unwrap(), r#"chain inet allowsync "x\ny" added or changed"#);
    }

    #[test]
    fn merged_changes_keep_the_earliest_time_and_count_commits() {
        let t0 = Instant::now();
        let mut a =
            Changes { first_at: Some(t0 + Duration::from_millis(5)), commits: 1, ..Changes::default() };
        a.merge(Changes { first_at: Some(t0), commits: 2, lost: true, what: ["x".to_string()].into() });
        assert_eq!((a.first_at, a.commits, a.lost, a.what.len()), (Some(t0), 3, true, 1));
    }
}
