//! One conformance suite for every kernel backend: the same test bodies run against nftables
//! and ipset (the `conformance!` macro at the bottom generates a module per backend). Each test
//! runs in a network namespace of its own (`common/netns.rs`). What differs per backend — how
//! the CLI lists a set, how an operator causes drift, what a foreign object looks like, how an
//! apply can honestly fail — is behind the [`Harness`] trait. `conformance/enforcement.rs`:
//! `enforce` with DNAT to a container, local sockets and routed traffic.

#[path = "conformance/enforcement.rs"]
mod enforcement;

use enforcement::{
    established_flows_are_kept_with_their_source_and_cut_without_it,
    published_and_local_ports_are_closed_to_strangers_and_routed_traffic_is_not,
    the_scope_switches_both_ways_and_local_leaves_published_ports_open,
};

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use allowsync::backend::ipset::{ENFORCE_CHAIN, IpsetBackend, hook_of};
use allowsync::backend::nftables::NftablesBackend;
use allowsync::backend::{Backend, BackendError};
use allowsync::config::{Enforce, EnforceScope, IpsetConfig, NftablesConfig};
use allowsync::prefixes::{AllowSet, Delta, Diff, Range, Ranges};
use allowsync_testkit::netns::{
    self, NamedNetns, enter_new_netns, nft_script, run, run_stdin, tcp_connects, veth_pair,
};
use allowsync_testkit::{set, sync};

/// `count` IPv4 ranges of `2^(32-len)` addresses each, every other block (so none touch).
fn spaced_blocks(base: u32, len: u8, count: u32) -> Ranges<u32> {
    let size = 1u32 << (32 - len);
    Ranges::from_disjoint((0..count).map(|i| Range::from_prefix(base + 2 * i * size, len)).collect()).unwrap()
}

/// What differs between backends.
trait Harness {
    const NAME: &'static str;
    fn backend(enforce: Option<Enforce>) -> Box<dyn Backend>;
    /// Asserts that the CLI lists both sets with the right types (and nothing else of ours).
    fn assert_objects();
    /// What the kernel holds, as the CLI lists it (`nft -j list set`, `ipset list -o save`).
    fn cli_read() -> AllowSet;
    /// Everything of the firewall the backend could touch, as text.
    fn snapshot() -> String;
    /// The scopes of the enforcement chains allowsync has in the kernel (in both families).
    fn enforcement_scopes() -> Vec<EnforceScope>;
    /// Changes the sets by hand, as an operator would, from
    /// `{10.1.0.0/24, 10.2.0.0/24, 10.3.0.1, 2001:db8::/64}`: removes `10.2.0.0/24`, adds
    /// `172.16.0.0/16`, `10.9.0.0/25` and `10.9.0.128/25` (separately) and `2001:db8:ffff::1`.
    /// Returns what `read()` must then see.
    fn drift() -> AllowSet;
    /// Creates an object of one of our names that the backend must not adopt; returns the
    /// object the error must name.
    fn make_foreign() -> &'static str;
    /// A backend, a state it holds, and a diff against that state that the kernel will refuse
    /// part-way for an honest reason.
    fn failing_apply() -> (Box<dyn Backend>, Diff);

    // ---- ownership ---------------------------------------------------------------------------

    /// What [`Harness::backend`] owns once ensured (with the enforcement chain).
    fn owned_objects() -> Vec<&'static str>;
    /// Asserts that the kernel shows allowsync's mark on every object it created.
    fn assert_marked();
    /// Whether the objects of [`Harness::backend`] (`moved: false`) or [`Harness::moved`] exist.
    fn objects_exist(moved: bool) -> bool;
    /// A backend on other names than [`Harness::backend`]'s: another table, other sets.
    fn moved(enforce: Option<Enforce>) -> Box<dyn Backend>;
    /// The operator's own ruleset: two empty sets of the right kind, used by a rule of theirs,
    /// among other objects of theirs. Returns a backend configured on those sets.
    fn operator_ruleset() -> Box<dyn Backend>;
    /// What the operator's sets hold, as the CLI lists them.
    fn operator_read() -> AllowSet;
    /// What an allowsync before 0.2 left: the objects of [`Harness::backend`]'s names, unmarked
    /// and unrecorded, with a chain of the enforcement chain's name holding an operator's rule.
    fn legacy_objects();
    /// That chain, as the CLI lists it.
    fn enforcement_chain_listing() -> String;
}

fn assert_holds<H: Harness>(b: &mut dyn Backend, want: &AllowSet) {
    assert_eq!(&b.read().unwrap(), want, "{}: read() differs", H::NAME);
    assert_eq!(&H::cli_read(), want, "{}: the CLI's listing differs", H::NAME);
}

// ---- the cases -----------------------------------------------------------------------------

fn objects_are_created_and_changes_applied<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = H::backend(None);
    b.ensure().unwrap();
    H::assert_objects();
    assert_holds::<H>(&mut *b, &AllowSet::default());

    let first = set(["10.0.0.0/24", "10.0.2.7", "192.0.2.16/28", "2001:db8::/48", "2001:db8:1::5"]);
    let d = sync(&mut *b, &first);
    assert_eq!((d.added(), d.removed()), (5, 0));
    assert_holds::<H>(&mut *b, &first);

    // Widen one prefix, drop one, add one, keep the rest.
    let second = set(["10.0.0.0/23", "192.0.2.16/28", "198.51.100.0/24", "2001:db8::/48", "2001:db8:2::/64"]);
    let d = sync(&mut *b, &second);
    assert_eq!((d.added(), d.removed()), (3, 3));
    assert_holds::<H>(&mut *b, &second);

    // A second ensure changes nothing in the sets.
    b.ensure().unwrap();
    H::assert_objects();
    assert_holds::<H>(&mut *b, &second);
    sync(&mut *b, &AllowSet::default());
    assert_holds::<H>(&mut *b, &AllowSet::default());
}

fn large_sets_load<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = H::backend(None);
    b.ensure().unwrap();
    let name = H::NAME;

    let hosts = AllowSet { v4: spaced_blocks(0x0a00_0000, 32, 100_000), v6: Ranges::default() };
    let t = Instant::now();
    sync(&mut *b, &hosts);
    println!("{name}: 100k /32 applied: {:?}", t.elapsed());
    let t = Instant::now();
    let read = b.read().unwrap();
    println!("{name}: 100k /32 read back: {:?}", t.elapsed());
    assert_eq!(read, hosts);

    let mut both = hosts.clone();
    both.v4 = Ranges::from_disjoint(
        hosts.v4.iter().copied().chain(spaced_blocks(0x2000_0000, 24, 100_000).iter().copied()).collect(),
    )
    .unwrap();
    let t = Instant::now();
    let d = sync(&mut *b, &both);
    println!("{name}: 100k /24 added to them: {:?}", t.elapsed());
    assert_eq!(d.added(), 100_000);
    let t = Instant::now();
    let read = b.read().unwrap();
    println!("{name}: 200k set read back: {:?}", t.elapsed());
    assert_eq!(read, both);
    assert_eq!(H::cli_read(), both);

    // +100 / -100 on the 200k set.
    let mut small = both.v4.as_slice().to_vec();
    small.drain(..100);
    small.extend(spaced_blocks(0x6400_0000, 32, 100).iter().copied());
    let changed = AllowSet { v4: Ranges::from_disjoint(small).unwrap(), v6: Ranges::default() };
    let d = both.diff_to(&changed);
    assert_eq!((d.added(), d.removed()), (100, 100));
    let t = Instant::now();
    b.apply(&d).unwrap();
    println!("{name}: +100/-100 on a 200k set applied: {:?}", t.elapsed());
    assert_eq!(b.read().unwrap(), changed);
}

fn a_failing_apply_changes_nothing<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let (mut b, diff) = H::failing_apply();
    let before = H::cli_read();
    let snapshot = H::snapshot();
    let err = b.apply(&diff).unwrap_err();
    println!("{}: refused apply: {err}", H::NAME);
    assert_eq!(H::cli_read(), before, "a refused apply changed the set");
    assert_eq!(H::snapshot(), snapshot);
    assert_eq!(b.read().unwrap(), before);

    // A removal of a range the set does not hold: a conflict (the engine re-reads), nothing done,
    // even though a valid removal comes first.
    let held = before.v4.as_slice()[0];
    let not_held = Range::from_prefix(0xc633_6400, 25); // 198.51.100.0/25
    assert!(!before.v4.covers(&not_held));
    let missing = Diff { v4: Delta { remove: vec![held, not_held], add: vec![] }, v6: Delta::default() };
    let err = b.apply(&missing).unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(b.read().unwrap(), before);
}

fn drift_is_read_and_repaired<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = H::backend(None);
    b.ensure().unwrap();
    let desired = set(["10.1.0.0/24", "10.2.0.0/24", "10.3.0.1", "2001:db8::/64"]);
    sync(&mut *b, &desired);

    let want_seen = H::drift();
    let seen = b.read().unwrap();
    assert_eq!(seen, want_seen);
    assert!(!seen.v4.contains(0x0a02_0001));
    assert!(seen.v4.covers(&Range::from_prefix(0x0a09_0000, 24)));
    assert!(seen.v6.contains(0x2001_0db8_ffff_0000_0000_0000_0000_0001));

    let d = sync(&mut *b, &desired);
    assert!(d.added() >= 1 && d.removed() >= 3, "{d:?}");
    assert_holds::<H>(&mut *b, &desired);
}

fn foreign_objects_are_reported_and_left_alone<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let want_object = H::make_foreign();
    let before = H::snapshot();
    let err = H::backend(None).ensure().unwrap_err();
    match &err {
        BackendError::Foreign { object, why, .. } => {
            assert_eq!(object, want_object, "{why}");
        }
        other => panic!("expected Foreign, got {other}"),
    }
    assert_eq!(H::snapshot(), before, "ensure changed a foreign object");
}

// ---- ownership ------------------------------------------------------------------------------

fn enforce_443() -> Option<Enforce> {
    Some(Enforce { tcp_ports: vec![443], ..Enforce::default() })
}

fn owned_objects_carry_the_mark_and_teardown_removes_exactly_them<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = H::backend(enforce_443());
    b.ensure().unwrap();
    sync(&mut *b, &set(["192.0.2.0/24", "2001:db8::/48"]));
    b.enforce().unwrap();
    let footprint = b.footprint().unwrap();
    let owned: Vec<String> = footprint.owned.iter().map(ToString::to_string).collect();
    assert_eq!(owned, H::owned_objects(), "{}", H::NAME);
    H::assert_marked();
    let report = b.teardown().unwrap();
    assert!(report.emptied.is_empty() && report.left.is_empty(), "{}: {report:?}", H::NAME);
    assert!(!report.removed.is_empty(), "{}", H::NAME);
    assert!(!H::objects_exist(false), "{}: teardown left an owned object:\n{}", H::NAME, H::snapshot());
    assert!(b.footprint().unwrap().owned.is_empty(), "{}: nothing is owned after teardown", H::NAME);
}

/// Teardown of a backend that owns nothing: both sets emptied, nothing removed, and it says
/// what it left.
fn teardown_removes_nothing<H: Harness>(b: &mut dyn Backend) {
    assert!(b.footprint().unwrap().owned.is_empty(), "{}: nothing here is allowsync's", H::NAME);
    let report = b.teardown().unwrap();
    assert!(report.removed.is_empty(), "{}: {report:?}", H::NAME);
    assert_eq!(report.emptied.len(), 2, "{}: {report:?}", H::NAME);
    assert!(!report.left.is_empty(), "{}: teardown says what it left: {report:?}", H::NAME);
}

fn an_operators_sets_are_filled_and_teardown_leaves_the_rest_as_it_was<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = H::operator_ruleset();
    let before = H::snapshot();
    b.ensure().unwrap();
    b.enforce().unwrap();
    assert_eq!(H::snapshot(), before, "{}: ensure changed the operator's ruleset", H::NAME);
    assert!(!H::objects_exist(false), "{}: allowsync created objects of its own", H::NAME);
    let list = set(["192.0.2.0/24", "2001:db8::/48"]);
    sync(&mut *b, &list);
    assert_eq!(H::operator_read(), list, "{}", H::NAME);
    teardown_removes_nothing::<H>(&mut *b);
    assert_eq!(H::snapshot(), before, "{}: teardown changed the operator's ruleset", H::NAME);
}

fn objects_without_the_mark_are_used_but_never_changed_or_removed<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    H::legacy_objects();
    let chain = H::enforcement_chain_listing();
    // With `enforce`: refused, naming the chain, and nothing changes.
    let before = H::snapshot();
    let mut b = H::backend(enforce_443());
    let err = b.ensure().and_then(|()| b.enforce()).unwrap_err();
    match &err {
        BackendError::Foreign { object, why, fix } => {
            assert!(object.contains("chain") && why.contains("allowsync did not create it"), "{err}");
            assert!(fix.contains("rename your chain"), "{err}");
        }
        other => panic!("{}: expected Foreign, got {other}", H::NAME),
    }
    assert_eq!(H::snapshot(), before, "{}", H::NAME);
    // Without: the sets are filled, the chain is neither deleted nor flushed nor re-policied.
    let mut b = H::backend(None);
    b.ensure().unwrap();
    let list = set(["192.0.2.0/24", "2001:db8::/48"]);
    sync(&mut *b, &list);
    b.enforce().unwrap();
    assert_eq!(b.read().unwrap(), list);
    assert_eq!(H::enforcement_chain_listing(), chain, "{}", H::NAME);
    // Teardown empties the sets and leaves everything, saying so.
    teardown_removes_nothing::<H>(&mut *b);
    assert!(H::objects_exist(false), "{}", H::NAME);
    assert_eq!(H::enforcement_chain_listing(), chain, "{}", H::NAME);
}

fn a_new_configuration_replaces_the_owned_objects_and_leaves_an_operators_alone<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let list = set(["192.0.2.0/24", "2001:db8::/48"]);
    let mut a = H::backend(enforce_443());
    a.ensure().unwrap();
    sync(&mut *a, &list);
    a.enforce().unwrap();

    // To other names: the new objects start with the allowlist, the old ones go.
    let mut b = H::moved(enforce_443());
    b.set_recorded(&a.footprint().unwrap());
    b.ensure().unwrap();
    assert_eq!(b.read().unwrap(), list, "{}: the new sets start with the old ones' elements", H::NAME);
    b.enforce().unwrap();
    assert!(!H::objects_exist(false), "{}: the old objects stay:\n{}", H::NAME, H::snapshot());
    assert!(H::objects_exist(true), "{}", H::NAME);
    let recorded = b.footprint().unwrap();
    for old in &a.footprint().unwrap().sets {
        assert!(!recorded.owned.contains(old), "{}: {old} is still recorded", H::NAME);
    }

    // To the operator's sets: allowsync's objects go, theirs are filled.
    let mut c = H::operator_ruleset();
    c.set_recorded(&recorded);
    c.ensure().unwrap();
    sync(&mut *c, &list);
    c.enforce().unwrap();
    assert!(!H::objects_exist(true), "{}:\n{}", H::NAME, H::snapshot());
    assert_eq!(H::operator_read(), list);

    // And back: an operator's set used before is left alone, its elements included.
    let mut d = H::backend(None);
    d.set_recorded(&c.footprint().unwrap());
    d.ensure().unwrap();
    assert_eq!(d.read().unwrap(), list, "{}: seeded from the operator's sets", H::NAME);
    d.enforce().unwrap();
    assert_eq!(H::operator_read(), list, "{}: the operator's sets were changed", H::NAME);
}

// ---- enforcement: two namespaces joined by a veth pair ---------------------------------------

const TCP_PORT: u16 = 8443;
const OPEN_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn udp_arrives(ns: &NamedNetns, server: &UdpSocket, from: IpAddr, to: SocketAddr) -> bool {
    let payload = format!("hello from {from}");
    let sent = payload.clone();
    ns.run_in(move || {
        let s = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
        s.send_to(sent.as_bytes(), to).unwrap();
    });
    let mut buf = [0u8; 128];
    loop {
        match server.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == payload.as_bytes() => return true,
            Ok(_) => continue, // a datagram of an earlier probe
            Err(_) => return false,
        }
    }
}

fn enforcement_filters_traffic_by_the_allowlist<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let client = veth_pair();

    // Listeners in the server namespace (this thread's); the kernel completes handshakes into
    // the backlog, so nothing needs to accept.
    let _tcp4 = TcpListener::bind(("10.200.0.1", TCP_PORT)).unwrap();
    let _tcp6 = TcpListener::bind(("fd00:200::1", TCP_PORT)).unwrap();
    let _open = TcpListener::bind(("10.200.0.1", OPEN_PORT)).unwrap();
    let udp = UdpSocket::bind(("10.200.0.1", UDP_PORT)).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();

    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (a2, a3, b2, b3) = (ip("10.200.0.2"), ip("10.200.0.3"), ip("fd00:200::2"), ip("fd00:200::3"));
    let tcp4: SocketAddr = (ip("10.200.0.1"), TCP_PORT).into();
    let tcp6: SocketAddr = (ip("fd00:200::1"), TCP_PORT).into();
    let open: SocketAddr = (ip("10.200.0.1"), OPEN_PORT).into();
    let udp4: SocketAddr = (ip("10.200.0.1"), UDP_PORT).into();

    // Without enforcement everyone gets through: the network itself works.
    for from in [a2, a3] {
        assert!(tcp_connects(&client, from, tcp4), "baseline tcp from {from}");
        assert!(udp_arrives(&client, &udp, from, udp4), "baseline udp from {from}");
    }
    for from in [b2, b3] {
        assert!(tcp_connects(&client, from, tcp6), "baseline tcp6 from {from}");
    }

    let enforce = Enforce { tcp_ports: vec![TCP_PORT], udp_ports: vec![UDP_PORT], ..Enforce::default() };
    let mut b = H::backend(Some(enforce));
    b.ensure().unwrap();
    sync(&mut *b, &set(["10.200.0.2", "fd00:200::2"]));
    b.enforce().unwrap();
    let verdicts = |label: &str| {
        let v = [
            tcp_connects(&client, a2, tcp4),
            tcp_connects(&client, a3, tcp4),
            tcp_connects(&client, b2, tcp6),
            tcp_connects(&client, b3, tcp6),
            udp_arrives(&client, &udp, a2, udp4),
            udp_arrives(&client, &udp, a3, udp4),
            tcp_connects(&client, a3, open),
        ];
        println!("{} {label}: {v:?}", H::NAME);
        v
    };
    let v = verdicts("allow .2");
    if v != [true, false, true, false, true, false, true] {
        println!("{}", H::snapshot());
    }
    assert_eq!(v, [true, false, true, false, true, false, true]);

    sync(&mut *b, &set(["10.200.0.3", "fd00:200::3"]));
    assert_eq!(verdicts("allow .3"), [false, true, false, true, false, true, true]);

    // Loopback is never filtered, allowlisted or not.
    assert!(TcpListener::bind(("127.0.0.1", TCP_PORT)).is_ok_and(|l| {
        std::net::TcpStream::connect_timeout(&l.local_addr().unwrap(), Duration::from_millis(700)).is_ok()
    }));

    b.teardown().unwrap();
    assert_eq!(verdicts("after teardown"), [true, true, true, true, true, true, true]);
}

// ---- nftables --------------------------------------------------------------------------------

struct Nft;

const TABLE: &str = "allowsync";

/// The elements of a set of `inet allowsync` as `nft -j` lists them, as inclusive ranges
/// (exactly as held).
fn nft_ranges<A: allowsync::prefixes::Addr>(set: &str, conv: impl Fn(IpAddr) -> A) -> Ranges<A> {
    nft_ranges_of(TABLE, set, conv)
}

fn nft_ranges_of<A: allowsync::prefixes::Addr>(
    table: &str,
    set: &str,
    conv: impl Fn(IpAddr) -> A,
) -> Ranges<A> {
    let ranges = netns::nft_set_elements("inet", table, set);
    Ranges::from_disjoint(ranges.into_iter().map(|(s, e)| Range { start: conv(s), end: conv(e) }).collect())
        .unwrap()
}

impl Harness for Nft {
    const NAME: &'static str = "nftables";

    fn backend(enforce: Option<Enforce>) -> Box<dyn Backend> {
        let cfg = NftablesConfig {
            table: TABLE.into(),
            set_v4: "allow_v4".into(),
            set_v6: "allow_v6".into(),
            enforce,
        };
        Box::new(NftablesBackend::new(&cfg).unwrap())
    }

    fn assert_objects() {
        let listing = run("nft", &["list", "table", "inet", TABLE]);
        for want in ["set allow_v4", "type ipv4_addr", "set allow_v6", "type ipv6_addr", "flags interval"] {
            assert!(listing.contains(want), "{want} missing in\n{listing}");
        }
        assert!(!listing.contains("chain"), "no chain without enforce:\n{listing}");
    }

    fn cli_read() -> AllowSet {
        let v4 = nft_ranges("allow_v4", |ip| match ip {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(_) => panic!("IPv6 in allow_v4"),
        });
        let v6 = nft_ranges("allow_v6", |ip| match ip {
            IpAddr::V6(a) => u128::from(a),
            IpAddr::V4(_) => panic!("IPv4 in allow_v6"),
        });
        AllowSet { v4, v6 }
    }

    fn snapshot() -> String {
        run("nft", &["list", "ruleset"])
    }

    fn enforcement_scopes() -> Vec<EnforceScope> {
        let chains: serde_json::Value = serde_json::from_str(&run("nft", &["-j", "list", "chains"])).unwrap();
        let ours = |c: &&serde_json::Value| c["table"] == TABLE && c["name"] == "enforce";
        let chains = chains["nftables"].as_array().unwrap().iter().filter_map(|i| i.get("chain"));
        chains
            .filter(ours)
            .map(|c| match c["hook"].as_str() {
                Some("prerouting") => EnforceScope::Host,
                Some("input") => EnforceScope::Local,
                other => panic!("enforcement chain hooked to {other:?}"),
            })
            .collect()
    }

    fn drift() -> AllowSet {
        nft_script(
            "delete element inet allowsync allow_v4 { 10.2.0.0/24 }\n\
             add element inet allowsync allow_v4 { 172.16.0.0/16 }\n\
             add element inet allowsync allow_v4 { 10.9.0.0/25, 10.9.0.128/25 }\n\
             add element inet allowsync allow_v6 { 2001:db8:ffff::1 }\n",
        );
        // Interval sets hold exactly what was added: the adjacent /25s stay two elements, and
        // the diff must remove exactly those.
        let v4 = Ranges::from_disjoint(vec![
            Range::from_prefix(0x0a01_0000, 24),
            Range::from_prefix(0x0a03_0001, 32),
            Range::from_prefix(0x0a09_0000, 25),
            Range::from_prefix(0x0a09_0080, 25),
            Range::from_prefix(0xac10_0000, 16),
        ])
        .unwrap();
        let v6 = Ranges::from_disjoint(vec![
            Range::from_prefix(0x2001_0db8 << 96, 64),
            Range::from_prefix(0x2001_0db8_ffff_0000_0000_0000_0000_0001, 128),
        ])
        .unwrap();
        AllowSet { v4, v6 }
    }

    fn make_foreign() -> &'static str {
        nft_script("table inet allowsync {\n set allow_v4 { type ipv4_addr; elements = { 192.0.2.1 } }\n}\n");
        "set inet allowsync allow_v4"
    }

    fn failing_apply() -> (Box<dyn Backend>, Diff) {
        let mut b = Self::backend(None);
        b.ensure().unwrap();
        sync(&mut *b, &set(["10.0.0.0/24", "10.5.0.0/16", "2001:db8::/48"]));
        // 5k valid additions, then one address inside the /24: EEXIST aborts the whole batch.
        let mut add: Vec<Range<u32>> = spaced_blocks(0x7000_0000, 32, 5_000).as_slice().to_vec();
        add.push(Range::from_prefix(0x0a00_0007, 32));
        (
            b,
            Diff {
                v4: Delta { remove: vec![Range::from_prefix(0x0a05_0000, 16)], add },
                v6: Delta::default(),
            },
        )
    }

    fn owned_objects() -> Vec<&'static str> {
        vec![
            "table inet allowsync",
            "set inet allowsync allow_v4",
            "set inet allowsync allow_v6",
            "chain inet allowsync enforce",
        ]
    }

    fn assert_marked() {
        let listing = run("nft", &["list", "table", "inet", TABLE]);
        // The table, both sets and the chain.
        assert_eq!(listing.matches("comment \"managed by allowsync\"").count(), 4, "{listing}");
    }

    fn objects_exist(moved: bool) -> bool {
        let table = if moved { "allowsync_b" } else { TABLE };
        run("nft", &["list", "tables"]).lines().any(|l| l == format!("table inet {table}"))
    }

    fn moved(enforce: Option<Enforce>) -> Box<dyn Backend> {
        let cfg = NftablesConfig {
            table: "allowsync_b".into(),
            set_v4: "allow_v4".into(),
            set_v6: "allow_v6".into(),
            enforce,
        };
        Box::new(NftablesBackend::new(&cfg).unwrap())
    }

    fn operator_ruleset() -> Box<dyn Backend> {
        nft_script(
            "table inet filter {\n\
               set chat_v4 { type ipv4_addr; flags interval; }\n\
               set chat_v6 { type ipv6_addr; flags interval; }\n\
               chain input { type filter hook input priority 0; policy accept; tcp dport 8443 ip saddr != @chat_v4 drop; }\n\
               chain forward { type filter hook forward priority 0; policy drop; }\n\
             }\n",
        );
        let cfg = NftablesConfig {
            table: TABLE.into(),
            set_v4: "inet filter chat_v4".into(),
            set_v6: "inet filter chat_v6".into(),
            enforce: None,
        };
        Box::new(NftablesBackend::new(&cfg).unwrap())
    }

    fn operator_read() -> AllowSet {
        let v4 = nft_ranges_of("filter", "chat_v4", |ip| match ip {
            IpAddr::V4(a) => u32::from(a),
            IpAddr::V6(_) => panic!("IPv6 in chat_v4"),
        });
        let v6 = nft_ranges_of("filter", "chat_v6", |ip| match ip {
            IpAddr::V6(a) => u128::from(a),
            IpAddr::V4(_) => panic!("IPv4 in chat_v6"),
        });
        AllowSet { v4, v6 }
    }

    fn legacy_objects() {
        nft_script(
            "table inet allowsync {\n\
               set allow_v4 { type ipv4_addr; flags interval; }\n\
               set allow_v6 { type ipv6_addr; flags interval; }\n\
               chain enforce { type filter hook input priority 0; policy drop; tcp dport 22 accept; }\n\
             }\n",
        );
    }

    fn enforcement_chain_listing() -> String {
        run("nft", &["-j", "list", "chain", "inet", TABLE, "enforce"])
    }
}

// ---- ipset -----------------------------------------------------------------------------------

struct Ipset;

const SET_V4: &str = "allowsync_v4";
const SET_V6: &str = "allowsync_v6";

fn ipset_config(maxelem: u32, enforce: Option<Enforce>) -> IpsetConfig {
    IpsetConfig {
        set_v4: SET_V4.into(),
        set_v6: SET_V6.into(),
        maxelem,
        enforce,
        check_interval: Duration::from_secs(10),
    }
}

/// The entries of an ipset as `ipset list -o save` prints them.
fn ipset_entries(set: &str) -> Vec<String> {
    run("ipset", &["list", "-o", "save", set])
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("add {set} ")).map(String::from))
        .collect()
}

impl Harness for Ipset {
    const NAME: &'static str = "ipset";

    fn backend(enforce: Option<Enforce>) -> Box<dyn Backend> {
        Box::new(IpsetBackend::new(&ipset_config(65536, enforce)).unwrap())
    }

    fn assert_objects() {
        for (set, family) in [(SET_V4, "inet"), (SET_V6, "inet6")] {
            let header = run("ipset", &["list", "-t", "-o", "save", set]);
            let want = format!("create {set} hash:net family {family} ");
            assert!(header.starts_with(&want), "{header}");
            assert!(header.contains(" maxelem 65536 "), "{header}");
        }
        assert!(!run("iptables", &["-S"]).contains("ALLOWSYNC"), "no chain without enforce");
    }

    fn cli_read() -> AllowSet {
        let entries = ipset_entries(SET_V4).into_iter().chain(ipset_entries(SET_V6));
        set(entries)
    }

    fn snapshot() -> String {
        let mut s = run("ipset", &["save"]);
        // Element order in a hash dump is not stable across reads of the same set.
        let mut lines: Vec<&str> = s.lines().collect();
        lines.sort_unstable();
        s = lines.join("\n");
        // iptables-save's `# Generated … on <time>` comments change with the clock: only the rules.
        let rules = |prog: &str| -> String {
            run(prog, &["-t", "filter"])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        s + "\n" + &rules("iptables-save") + &rules("ip6tables-save")
    }

    fn enforcement_scopes() -> Vec<EnforceScope> {
        let scopes = |prog: &str| -> Vec<EnforceScope> {
            [EnforceScope::Host, EnforceScope::Local]
                .into_iter()
                .filter(|&scope| {
                    let (table, parent) = hook_of(scope);
                    let listing = run(prog, &["-t", table, "-S"]);
                    let jump = format!(
                        "-A {parent} -m comment --comment \"managed by allowsync\" -j {ENFORCE_CHAIN}"
                    );
                    let jumps = listing.contains(&jump);
                    let exists = listing.contains(&format!("-N {ENFORCE_CHAIN}"));
                    assert_eq!(
                        jumps, exists,
                        "{prog} -t {table}: a chain without its jump or the reverse\n{listing}"
                    );
                    exists
                })
                .collect()
        };
        let v4 = scopes("iptables");
        assert_eq!(scopes("ip6tables"), v4, "iptables and ip6tables differ");
        v4
    }

    fn drift() -> AllowSet {
        run_stdin(
            "ipset",
            &["restore"],
            "del allowsync_v4 10.2.0.0/24\nadd allowsync_v4 172.16.0.0/16\n\
             add allowsync_v4 10.9.0.0/25\nadd allowsync_v4 10.9.0.128/25\nadd allowsync_v6 2001:db8:ffff::1\n",
        );
        // ipset holds prefixes; the backend reads them aggregated.
        set(["10.1.0.0/24", "10.3.0.1", "10.9.0.0/24", "172.16.0.0/16", "2001:db8::/64", "2001:db8:ffff::1"])
    }

    fn make_foreign() -> &'static str {
        run("ipset", &["create", SET_V6, "hash:ip", "family", "inet6"]);
        run("ipset", &["add", SET_V6, "2001:db8::1"]);
        "ipset allowsync_v6"
    }

    /// Someone fills the set behind allowsync's back after its read, so the additions overflow
    /// `maxelem` part-way through `ipset restore`: the lines already applied must be rolled back.
    fn failing_apply() -> (Box<dyn Backend>, Diff) {
        let mut b: Box<dyn Backend> = Box::new(IpsetBackend::new(&ipset_config(1024, None)).unwrap());
        b.ensure().unwrap();
        let held = set(["10.0.0.0/24", "10.5.0.0/16", "2001:db8::/48"]);
        sync(&mut *b, &held);
        let mut stray = String::new();
        for i in 0..(1024 - 2 - 40) {
            stray += &format!("add {SET_V4} 192.168.{}.{}\n", i / 256, i % 256);
        }
        run_stdin("ipset", &["restore"], &stray);
        // 100 additions: 40 fit, the 41st hits "Hash is full". The removal comes after them.
        let add = spaced_blocks(0x7000_0000, 32, 100).as_slice().to_vec();
        (
            b,
            Diff {
                v4: Delta { remove: vec![Range::from_prefix(0x0a05_0000, 16)], add },
                v6: Delta::default(),
            },
        )
    }
    fn owned_objects() -> Vec<&'static str> {
        vec![
            "ipset allowsync_v4",
            "ipset allowsync_v6",
            "iptables chain mangle ALLOWSYNC",
            "ip6tables chain mangle ALLOWSYNC",
        ]
    }

    fn assert_marked() {
        for prog in ["iptables", "ip6tables"] {
            let rules: Vec<String> = run(prog, &["-t", "mangle", "-S"])
                .lines()
                .filter(|l| l.contains("ALLOWSYNC") && l.starts_with("-A"))
                .map(String::from)
                .collect();
            assert_eq!(rules.len(), 3, "the jump, loopback and one port: {rules:?}");
            assert!(
                rules.iter().all(|r| r.contains("-m comment --comment \"managed by allowsync\"")),
                "{rules:?}"
            );
        }
    }

    fn objects_exist(moved: bool) -> bool {
        let names = if moved { ["allowsync_b4", "allowsync_b6"] } else { [SET_V4, SET_V6] };
        let listed = run("ipset", &["list", "-n"]);
        names.iter().any(|n| listed.lines().any(|l| l == *n))
    }

    fn moved(enforce: Option<Enforce>) -> Box<dyn Backend> {
        let cfg = IpsetConfig {
            set_v4: "allowsync_b4".into(),
            set_v6: "allowsync_b6".into(),
            maxelem: 65536,
            enforce,
            check_interval: Duration::from_secs(10),
        };
        Box::new(IpsetBackend::new(&cfg).unwrap())
    }

    fn operator_ruleset() -> Box<dyn Backend> {
        run("ipset", &["create", "op_v4", "hash:net", "family", "inet"]);
        run("ipset", &["create", "op_v6", "hash:net", "family", "inet6"]);
        for (prog, set) in [("iptables", "op_v4"), ("ip6tables", "op_v6")] {
            let rule = format!("-A INPUT -p tcp --dport 8443 -m set ! --match-set {set} src -j DROP");
            run(prog, &rule.split_whitespace().collect::<Vec<_>>());
            run(prog, &["-N", "OPERATOR"]);
            run(prog, &["-A", "OPERATOR", "-j", "RETURN"]);
        }
        let cfg = IpsetConfig {
            set_v4: "op_v4".into(),
            set_v6: "op_v6".into(),
            maxelem: 65536,
            enforce: None,
            check_interval: Duration::from_secs(10),
        };
        Box::new(IpsetBackend::new(&cfg).unwrap())
    }

    fn operator_read() -> AllowSet {
        set(ipset_entries("op_v4").into_iter().chain(ipset_entries("op_v6")))
    }

    fn legacy_objects() {
        run("ipset", &["create", SET_V4, "hash:net", "family", "inet"]);
        run("ipset", &["create", SET_V6, "hash:net", "family", "inet6"]);
        // Where `enforce` (scope host, the default) puts its chain.
        let (table, parent) = hook_of(EnforceScope::Host);
        run("iptables", &["-t", table, "-N", "ALLOWSYNC"]);
        run("iptables", &["-t", table, "-A", "ALLOWSYNC", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"]);
        run("iptables", &["-t", table, "-I", parent, "-j", "ALLOWSYNC"]);
    }

    fn enforcement_chain_listing() -> String {
        let (table, parent) = hook_of(EnforceScope::Host);
        run("iptables", &["-t", table, "-S", "ALLOWSYNC"]) + &run("iptables", &["-t", table, "-S", parent])
    }
}

/// One `#[test]` per case and backend: `nftables::<case>` and `ipset::<case>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod nftables {
            use super::*;
            $(#[test] fn $case() { super::$case::<Nft>(); })*
        }
        mod ipset {
            use super::*;
            $(#[test] fn $case() { super::$case::<Ipset>(); })*
        }
    };
}

conformance!(
    objects_are_created_and_changes_applied,
    large_sets_load,
    a_failing_apply_changes_nothing,
    drift_is_read_and_repaired,
    foreign_objects_are_reported_and_left_alone,
    enforcement_filters_traffic_by_the_allowlist,
    owned_objects_carry_the_mark_and_teardown_removes_exactly_them,
    an_operators_sets_are_filled_and_teardown_leaves_the_rest_as_it_was,
    objects_without_the_mark_are_used_but_never_changed_or_removed,
    a_new_configuration_replaces_the_owned_objects_and_leaves_an_operators_alone,
    published_and_local_ports_are_closed_to_strangers_and_routed_traffic_is_not,
    established_flows_are_kept_with_their_source_and_cut_without_it,
    the_scope_switches_both_ways_and_local_leaves_published_ports_open,
);
