//! The nftables backend against the real kernel. Every test runs in a network namespace of its
//! own (see `common/netns.rs`), so it can create and break nftables objects freely; `nft` is
//! used only to inspect the result and to cause drift, as an operator would.

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use allowsync::backend::nftables::{ENFORCE_CHAIN, NftablesBackend, enforce_rule_text};
use allowsync::backend::{Backend, BackendError};
use allowsync::config::{Enforce, NftablesConfig};
use allowsync::prefixes::{AllowSet, Delta, Diff, Range, Ranges, parse_entry};
use common::netns::{NamedNetns, current_netns_id, enter_new_netns, nft_script, run};

const TABLE: &str = "allowsync";

fn config(enforce: Option<Enforce>) -> NftablesConfig {
    NftablesConfig { table: TABLE.into(), set_v4: "allow_v4".into(), set_v6: "allow_v6".into(), enforce }
}

fn backend(enforce: Option<Enforce>) -> NftablesBackend {
    NftablesBackend::new(&config(enforce)).unwrap()
}

fn nets(entries: &[&str]) -> AllowSet {
    AllowSet::from_nets(entries.iter().map(|e| parse_entry(e).unwrap().net))
}

/// Brings the kernel from whatever it holds to `desired`, the way the engine does.
fn sync(b: &mut NftablesBackend, desired: &AllowSet) -> Diff {
    let diff = b.read().unwrap().diff_to(desired);
    b.apply(&diff).unwrap();
    diff
}

/// Inclusive address ranges, family-independent.
type IpRanges = Vec<(IpAddr, IpAddr)>;

/// The elements of a set as `nft -j` lists them, as inclusive address ranges, sorted.
fn nft_elements(set: &str) -> IpRanges {
    let out = run("nft", &["-j", "list", "set", "inet", TABLE, set]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges = Vec::new();
    for item in json["nftables"].as_array().unwrap() {
        let Some(elems) = item.get("set").and_then(|s| s.get("elem")) else { continue };
        for e in elems.as_array().unwrap() {
            let ip = |v: &serde_json::Value| v.as_str().unwrap().parse::<IpAddr>().unwrap();
            let range = if e.is_string() {
                (ip(e), ip(e))
            } else if let Some(p) = e.get("prefix") {
                let net = ipnet::IpNet::new(ip(&p["addr"]), p["len"].as_u64().unwrap() as u8).unwrap();
                (net.network(), net.broadcast())
            } else if let Some(r) = e.get("range") {
                (ip(&r[0]), ip(&r[1]))
            } else {
                panic!("unexpected element form {e}");
            };
            ranges.push(range);
        }
    }
    ranges.sort();
    ranges
}

/// The ranges of an allow set, as [`nft_elements`] shows them.
fn as_ip_ranges(s: &AllowSet) -> (IpRanges, IpRanges) {
    fn conv<A: allowsync::prefixes::Addr>(r: &Ranges<A>) -> IpRanges {
        r.iter().map(|x| (x.start.to_ip(), x.end.to_ip())).collect()
    }
    (conv(&s.v4), conv(&s.v6))
}

/// Asserts the kernel holds exactly `want`, through `read()` and through `nft`.
fn assert_holds(b: &mut NftablesBackend, want: &AllowSet) {
    assert_eq!(&b.read().unwrap(), want, "read() differs");
    let (v4, v6) = as_ip_ranges(want);
    assert_eq!(nft_elements("allow_v4"), v4, "nft's allow_v4 differs");
    assert_eq!(nft_elements("allow_v6"), v6, "nft's allow_v6 differs");
}

#[test]
fn each_test_has_its_own_namespace_and_the_host_is_untouched() {
    let host = current_netns_id();
    let probe = format!("allowsync_probe_{}", std::process::id());
    let Some(guard) = enter_new_netns() else { return };
    let private = current_netns_id();
    assert_ne!(host, private);
    // Children spawned from this thread start in its namespace.
    assert_eq!(run("readlink", &["/proc/self/ns/net"]).trim(), private);
    run("nft", &["add", "table", "inet", &probe]);
    assert!(run("nft", &["list", "tables"]).contains(&probe));
    // The process's main thread is still in the host namespace; a thread spawned from this
    // one starts in this one's namespace (clone copies the creator's).
    assert_eq!(std::fs::read_link("/proc/self/ns/net").unwrap().to_string_lossy(), host);
    assert_eq!(std::thread::spawn(current_netns_id).join().unwrap(), private);
    drop(guard);
    assert_eq!(current_netns_id(), host);
    // The table exists only in the private namespace (this is a read-only look at the host).
    let host_tables = std::process::Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&host_tables.stdout).contains(&probe));
}

#[test]
fn objects_are_created_and_changes_applied() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(None);
    b.ensure().unwrap();
    let listing = run("nft", &["list", "table", "inet", TABLE]);
    for want in ["set allow_v4", "type ipv4_addr", "set allow_v6", "type ipv6_addr", "flags interval"] {
        assert!(listing.contains(want), "{want} missing in\n{listing}");
    }
    assert!(!listing.contains("chain"), "no chain without enforce:\n{listing}");
    assert_holds(&mut b, &AllowSet::default());

    let first = nets(&["10.0.0.0/24", "10.0.2.7", "192.0.2.16/28", "2001:db8::/48", "2001:db8:1::5"]);
    let d = sync(&mut b, &first);
    assert_eq!((d.added(), d.removed()), (5, 0));
    assert_holds(&mut b, &first);

    // Widen one prefix, drop one, add one, keep the rest.
    let second =
        nets(&["10.0.0.0/23", "192.0.2.16/28", "198.51.100.0/24", "2001:db8::/48", "2001:db8:2::/64"]);
    let gen_before = b.generation().unwrap().unwrap();
    let d = sync(&mut b, &second);
    assert_eq!((d.added(), d.removed()), (3, 3));
    assert_holds(&mut b, &second);
    let gen_after = b.generation().unwrap().unwrap();
    assert_ne!(gen_before, gen_after, "a commit changes the generation");

    // An empty diff sends nothing: the generation stays.
    b.apply(&Diff::default()).unwrap();
    assert_eq!(b.generation().unwrap().unwrap(), gen_after);
    // So does anyone else's commit.
    run("nft", &["add", "table", "inet", "someone_else"]);
    assert_ne!(b.generation().unwrap().unwrap(), gen_after);
}

/// `count` IPv4 ranges of `2^(32-len)` addresses each, every other block (so none touch).
fn spaced_blocks(base: u32, len: u8, count: u32) -> Ranges<u32> {
    let size = 1u32 << (32 - len);
    Ranges::from_disjoint((0..count).map(|i| Range::from_prefix(base + 2 * i * size, len)).collect()).unwrap()
}

#[test]
fn large_sets_load_in_one_transaction_and_a_conflict_changes_nothing() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(None);
    b.ensure().unwrap();

    let hosts = AllowSet { v4: spaced_blocks(0x0a00_0000, 32, 100_000), v6: Ranges::default() };
    let t = Instant::now();
    sync(&mut b, &hosts);
    println!("100k /32 applied in one transaction: {:?}", t.elapsed());
    let t = Instant::now();
    let read = b.read().unwrap();
    println!("100k /32 read back: {:?}", t.elapsed());
    assert_eq!(read.v4.len(), 100_000);
    assert_eq!(read, hosts);

    let mut both = hosts.clone();
    both.v4 = Ranges::from_disjoint(
        hosts.v4.iter().copied().chain(spaced_blocks(0x2000_0000, 24, 100_000).iter().copied()).collect(),
    )
    .unwrap();
    let t = Instant::now();
    let d = sync(&mut b, &both);
    println!("100k /24 added in one transaction: {:?}", t.elapsed());
    assert_eq!(d.added(), 100_000);
    let read = b.read().unwrap();
    assert_eq!(read.v4.len(), 200_000);
    assert_eq!(read, both);

    // +100 / -100 on the 200k set.
    let mut small = both.v4.as_slice().to_vec();
    small.drain(..100);
    small.extend(spaced_blocks(0x6400_0000, 32, 100).iter().copied());
    let changed = AllowSet { v4: Ranges::from_disjoint(small).unwrap(), v6: Ranges::default() };
    let d = both.diff_to(&changed);
    assert_eq!((d.added(), d.removed()), (100, 100));
    let t = Instant::now();
    b.apply(&d).unwrap();
    println!("+100/-100 on a 200k set applied: {:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(b.read().unwrap(), changed);
    println!("200k set read back: {:?}", t.elapsed());

    // 50k valid additions plus one address inside an existing /24: EEXIST aborts everything.
    let before_gen = b.generation().unwrap();
    let mut add: Vec<Range<u32>> = spaced_blocks(0x7000_0000, 32, 50_000).as_slice().to_vec();
    add.push(Range::from_prefix(0x2000_0005, 32)); // inside 32.0.0.0/24
    let overlap = Diff { v4: Delta { remove: vec![], add }, v6: Delta::default() };
    let err = b.apply(&overlap).unwrap_err();
    assert!(err.is_conflict(), "{err}");
    println!("conflicting batch refused: {err}");
    assert_eq!(b.read().unwrap(), changed, "a refused batch changed the set");
    assert_eq!(b.generation().unwrap(), before_gen, "a refused batch committed something");

    // Removing an interval the set does not hold exactly (half of a /24): ENOENT, nothing done,
    // even though the valid removals come first in the batch.
    let remove = vec![changed.v4.as_slice()[0], Range::from_prefix(0x2000_0200, 25)];
    let missing = Diff { v4: Delta { remove, add: vec![] }, v6: Delta::default() };
    let err = b.apply(&missing).unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(b.read().unwrap(), changed);
}

#[test]
fn drift_is_read_exactly_and_repaired() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(None);
    b.ensure().unwrap();
    let desired = nets(&["10.1.0.0/24", "10.2.0.0/24", "10.3.0.1", "2001:db8::/64"]);
    sync(&mut b, &desired);

    nft_script(
        "delete element inet allowsync allow_v4 { 10.2.0.0/24 }\n\
         add element inet allowsync allow_v4 { 172.16.0.0/16 }\n\
         add element inet allowsync allow_v4 { 10.9.0.0/25, 10.9.0.128/25 }\n\
         add element inet allowsync allow_v6 { 2001:db8:ffff::1 }\n",
    );
    let seen = b.read().unwrap();
    // Adjacent elements added separately stay separate: the diff must remove exactly those.
    let want_v4 = vec![
        Range::from_prefix(0x0a01_0000, 24),
        Range::from_prefix(0x0a03_0001, 32),
        Range::from_prefix(0x0a09_0000, 25),
        Range::from_prefix(0x0a09_0080, 25),
        Range::from_prefix(0xac10_0000, 16),
    ];
    assert_eq!(seen.v4.as_slice(), want_v4.as_slice());
    assert_eq!(seen.v6.len(), 2);
    assert!(seen.v6.contains(0x2001_0db8_ffff_0000_0000_0000_0000_0001));

    let d = sync(&mut b, &desired);
    assert_eq!((d.added(), d.removed()), (1, 4));
    assert_holds(&mut b, &desired);
}

#[test]
fn foreign_sets_and_chains_are_reported_and_left_alone() {
    let Some(_ns) = enter_new_netns() else { return };
    nft_script(
        "table inet allowsync {\n\
           set allow_v4 { type ipv4_addr; elements = { 192.0.2.1 } }\n\
         }\n",
    );
    let before = run("nft", &["list", "ruleset"]);
    let err = backend(None).ensure().unwrap_err();
    match &err {
        BackendError::Foreign { object, why } => {
            assert_eq!(object, "set inet allowsync allow_v4");
            assert!(why.contains("flags"), "{why}");
        }
        other => panic!("expected Foreign, got {other}"),
    }
    assert_eq!(run("nft", &["list", "ruleset"]), before, "ensure changed a foreign set");

    nft_script(
        "flush ruleset\n\
         table inet allowsync {\n\
           set allow_v4 { type ipv4_addr; flags interval; }\n\
           set allow_v6 { type inet_service; elements = { 443 } }\n\
         }\n",
    );
    let before = run("nft", &["list", "ruleset"]);
    let err = backend(None).ensure().unwrap_err();
    assert!(
        matches!(&err, BackendError::Foreign { object, why } if object == "set inet allowsync allow_v6" && why.contains("ipv6_addr")),
        "{err}"
    );
    assert_eq!(run("nft", &["list", "ruleset"]), before);

    // A regular chain with the reserved name is not adopted as the enforcement chain...
    nft_script(&format!(
        "flush ruleset\n\
         table inet allowsync {{\n\
           chain {ENFORCE_CHAIN} {{\n counter\n }}\n\
         }}\n"
    ));
    let before = run("nft", &["list", "ruleset"]);
    let enforce = Enforce { tcp_ports: vec![443], udp_ports: vec![] };
    let err = backend(Some(enforce)).ensure().unwrap_err();
    assert!(matches!(&err, BackendError::Foreign { object, .. } if object.contains(ENFORCE_CHAIN)), "{err}");
    assert_eq!(run("nft", &["list", "ruleset"]), before);
    // ...nor deleted when enforcement is off (the sets are created next to it).
    backend(None).ensure().unwrap();
    assert!(run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN]).contains("counter"));
}

#[test]
fn edges_of_the_address_space_round_trip() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(None);
    b.ensure().unwrap();
    for desired in [
        nets(&["0.0.0.0/0", "::/0"]),
        nets(&["255.255.255.255/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]),
        nets(&["0.0.0.0/32", "255.255.255.254/31", "::/128", "ffff::/16"]),
        nets(&["0.0.0.0/1", "128.0.0.0/2", "::/1", "8000::/2"]), // canonical: 0.0.0.0-191.255.255.255
        AllowSet::default(),
    ] {
        sync(&mut b, &desired);
        assert_holds(&mut b, &desired);
    }
}

#[test]
fn ensure_is_idempotent_and_teardown_removes_the_table() {
    let Some(_ns) = enter_new_netns() else { return };
    let enforce = Enforce { tcp_ports: vec![443, 8443], udp_ports: vec![53] };
    let mut b = backend(Some(enforce.clone()));
    b.ensure().unwrap();
    sync(&mut b, &nets(&["192.0.2.0/24"]));

    let rules = |listing: &str| -> Vec<String> {
        listing
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(" accept") || l.contains(" drop"))
            .filter(|l| !l.starts_with("type "))
            .map(String::from)
            .collect()
    };
    let first = run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN]);
    assert!(first.contains("type filter hook input priority filter; policy accept;"), "{first}");
    // What ensure installed is exactly what the README tells operators to write.
    assert_eq!(rules(&first), enforce_rule_text(&config(None), &enforce));

    b.ensure().unwrap();
    b.ensure().unwrap();
    let ruleset: serde_json::Value = serde_json::from_str(&run("nft", &["-j", "list", "ruleset"])).unwrap();
    let items = ruleset["nftables"].as_array().unwrap();
    assert_eq!(items.iter().filter(|i| i.get("table").is_some()).count(), 1);
    assert_eq!(items.iter().filter(|i| i.get("chain").is_some()).count(), 1);
    assert_eq!(items.iter().filter(|i| i.get("set").is_some()).count(), 2);
    assert_eq!(items.iter().filter(|i| i.get("rule").is_some()).count(), 1 + 2 * 3);
    assert_eq!(rules(&run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN])), rules(&first));
    // Ensure never touches the elements.
    assert_eq!(b.read().unwrap(), nets(&["192.0.2.0/24"]));

    // Nothing to do: ensure commits nothing.
    let mut plain = backend(None);
    plain.ensure().unwrap(); // removes the enforcement chain
    assert!(!run("nft", &["list", "table", "inet", TABLE]).contains("chain"));
    let generation = plain.generation().unwrap();
    plain.ensure().unwrap();
    assert_eq!(plain.generation().unwrap(), generation);
    assert_eq!(plain.read().unwrap(), nets(&["192.0.2.0/24"]));

    b.teardown().unwrap();
    assert!(!run("nft", &["list", "tables"]).contains(TABLE));
    b.teardown().unwrap(); // already gone: fine
    // Reading without the table is an error that makes the daemon run ensure again.
    assert!(b.read().unwrap_err().is_conflict());
}

// ---- enforcement: two namespaces joined by a veth pair -------------------------------------

const TCP_PORT: u16 = 8443;
const OPEN_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn tcp_connects(ns: &NamedNetns, from: IpAddr, to: SocketAddr) -> bool {
    ns.run_in(move || {
        let domain = socket2::Domain::for_address(to);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_millis(700)).is_ok()
    })
}

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

#[test]
fn enforcement_filters_traffic_by_the_allowlist() {
    let Some(_ns) = enter_new_netns() else { return };
    let client = NamedNetns::new("as-cli");
    let (srv_mac, cli_mac) = ("02:00:00:00:02:01", "02:00:00:00:02:02");
    run(
        "ip",
        &[
            "link",
            "add",
            "as-srv",
            "address",
            srv_mac,
            "type",
            "veth",
            "peer",
            "name",
            "as-cli",
            "address",
            cli_mac,
            "netns",
            &client.name,
        ],
    );
    run("ip", &["addr", "add", "10.200.0.1/24", "dev", "as-srv"]);
    run("ip", &["addr", "add", "fd00:200::1/64", "dev", "as-srv", "nodad"]);
    run("ip", &["link", "set", "as-srv", "up"]);
    for a in ["10.200.0.2/24", "10.200.0.3/24"] {
        run("ip", &["-n", &client.name, "addr", "add", a, "dev", "as-cli"]);
    }
    for a in ["fd00:200::2/64", "fd00:200::3/64"] {
        run("ip", &["-n", &client.name, "addr", "add", a, "dev", "as-cli", "nodad"]);
    }
    run("ip", &["-n", &client.name, "link", "set", "as-cli", "up"]);
    // Static neighbours: IPv6 neighbour discovery for a new source address can take a 1 s
    // retransmission while the link-local addresses are still tentative, longer than the
    // connect timeout; the test is about the firewall, not about ND.
    for a in ["10.200.0.2", "10.200.0.3", "fd00:200::2", "fd00:200::3"] {
        run("ip", &["neigh", "replace", a, "lladdr", cli_mac, "dev", "as-srv", "nud", "permanent"]);
    }
    for a in ["10.200.0.1", "fd00:200::1"] {
        run(
            "ip",
            &[
                "-n",
                &client.name,
                "neigh",
                "replace",
                a,
                "lladdr",
                srv_mac,
                "dev",
                "as-cli",
                "nud",
                "permanent",
            ],
        );
    }

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

    let enforce = Enforce { tcp_ports: vec![TCP_PORT], udp_ports: vec![UDP_PORT] };
    let mut b = backend(Some(enforce));
    b.ensure().unwrap();
    sync(&mut b, &nets(&["10.200.0.2", "fd00:200::2"]));
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
        println!("{label}: {v:?}");
        v
    };
    let v = verdicts("allow .2");
    if v != [true, false, true, false, true, false, true] {
        println!("{}", run("nft", &["list", "ruleset"]));
    }
    assert_eq!(v, [true, false, true, false, true, false, true]);

    sync(&mut b, &nets(&["10.200.0.3", "fd00:200::3"]));
    assert_eq!(verdicts("allow .3"), [false, true, false, true, false, true, true]);

    // Loopback is never filtered, allowlisted or not.
    assert!(TcpListener::bind(("127.0.0.1", TCP_PORT)).is_ok_and(|l| {
        std::net::TcpStream::connect_timeout(&l.local_addr().unwrap(), Duration::from_millis(700)).is_ok()
    }));

    b.teardown().unwrap();
    assert_eq!(verdicts("after teardown"), [true, true, true, true, true, true, true]);
}
