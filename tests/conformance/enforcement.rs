//! `enforce` against how webhook receivers really run (issue 18), for every backend: this test's
//! namespace is the "host". It publishes port 443 to a "container" namespace by DNAT to 8443
//! (`-d <host address> -j DNAT`, as `docker run -p 10.200.0.1:443:8443` writes it), serves 443
//! itself on a second address, and routes for the clients to the container's own address,
//! where 443 is served too. Two clients, `.2` and `.3` (`::2`, `::3`), send requests over real
//! TCP and UDP, IPv4 and IPv6, through veth pairs; each server answers with its name, so an
//! answer also proves which path the packet took.

use std::net::{IpAddr, SocketAddr};

use allowsync::config::{Enforce, EnforceScope};
use allowsync_testkit::netns::{NamedNetns, VethEnd, run, veth_to};
use allowsync_testkit::set;
use allowsync_testkit::traffic::{Connection, Proto, Responder, patience, request};

use super::{Harness, enter_new_netns, sync};

/// The enforced port, TCP and UDP, as the client sees it.
const PORT: u16 = 443;
/// Where the container listens; DNAT sends `PORT` of the published address there.
const CONTAINER_PORT: u16 = 8443;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What a client sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The host's published address: DNATed to the container.
    Published,
    /// The host's second address: its own socket.
    Local,
    /// The container's own address: routed through the host, not addressed to it.
    Routed,
}

impl Target {
    const ALL: [Target; 3] = [Target::Published, Target::Local, Target::Routed];

    fn addr(self, family: Family) -> SocketAddr {
        let ip = match (self, family) {
            (Target::Published, Family::V4) => "10.200.0.1",
            (Target::Published, Family::V6) => "fd00:200::1",
            (Target::Local, Family::V4) => "10.200.0.10",
            (Target::Local, Family::V6) => "fd00:200::10",
            (Target::Routed, Family::V4) => "10.201.0.2",
            (Target::Routed, Family::V6) => "fd00:201::2",
        };
        SocketAddr::new(ip.parse().unwrap(), PORT)
    }

    /// The name of the server that must answer.
    fn server(self) -> &'static str {
        match self {
            Target::Published => "container",
            Target::Local => "host",
            Target::Routed => "routed",
        }
    }
}

/// The two clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    Two,
    Three,
}

impl Client {
    fn addr(self, family: Family) -> IpAddr {
        let ip = match (self, family) {
            (Client::Two, Family::V4) => "10.200.0.2",
            (Client::Two, Family::V6) => "fd00:200::2",
            (Client::Three, Family::V4) => "10.200.0.3",
            (Client::Three, Family::V6) => "fd00:200::3",
        };
        ip.parse().unwrap()
    }

    /// An allowlist of this client's two addresses.
    fn only(self) -> allowsync::prefixes::AllowSet {
        set([self.addr(Family::V4).to_string(), self.addr(Family::V6).to_string()])
    }
}

/// The namespaces, links, DNAT rules and servers around this test's namespace.
struct Site {
    client: NamedNetns,
    _container: NamedNetns,
    _servers: Vec<Responder>,
}

impl Site {
    fn new() -> Site {
        let client = veth_to(
            "as-cli",
            VethEnd {
                dev: "as-srv",
                mac: "02:00:00:00:02:01",
                addrs: &["10.200.0.1/24", "10.200.0.10/24", "fd00:200::1/64", "fd00:200::10/64"],
            },
            VethEnd {
                dev: "as-cli",
                mac: "02:00:00:00:02:02",
                addrs: &["10.200.0.2/24", "10.200.0.3/24", "fd00:200::2/64", "fd00:200::3/64"],
            },
        );
        let container = veth_to(
            "as-ctr",
            VethEnd { dev: "as-ctr", mac: "02:00:00:00:03:01", addrs: &["10.201.0.1/24", "fd00:201::1/64"] },
            VethEnd { dev: "as-ctr", mac: "02:00:00:00:03:02", addrs: &["10.201.0.2/24", "fd00:201::2/64"] },
        );
        for (ns, gw4, gw6) in
            [(&client, "10.200.0.1", "fd00:200::1"), (&container, "10.201.0.1", "fd00:201::1")]
        {
            run("ip", &["-n", &ns.name, "route", "add", "default", "via", gw4]);
            run("ip", &["-n", &ns.name, "-6", "route", "add", "default", "via", gw6]);
        }
        run("sysctl", &["-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        // What `docker run -p` writes (iptables, nat PREROUTING), for the published address only.
        for (iptables, host, to) in [
            ("iptables", "10.200.0.1", "10.201.0.2:8443"),
            ("ip6tables", "fd00:200::1", "[fd00:201::2]:8443"),
        ] {
            for proto in ["tcp", "udp"] {
                let port = PORT.to_string();
                let rule = ["-d", host, "-p", proto, "--dport", &port, "-j", "DNAT", "--to-destination", to];
                run(iptables, &[&["-t", "nat", "-A", "PREROUTING"][..], &rule].concat());
            }
        }
        let mut servers = Vec::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            for family in [Family::V4, Family::V6] {
                let published = SocketAddr::new(Target::Routed.addr(family).ip(), CONTAINER_PORT);
                servers.push(Responder::start(
                    Some(&container),
                    proto,
                    published,
                    Target::Published.server(),
                ));
                servers.push(Responder::start(
                    Some(&container),
                    proto,
                    Target::Routed.addr(family),
                    "routed",
                ));
                servers.push(Responder::start(
                    None,
                    proto,
                    Target::Local.addr(family),
                    Target::Local.server(),
                ));
            }
            for lo in ["127.0.0.1", "::1"] {
                servers.push(Responder::start(
                    None,
                    proto,
                    SocketAddr::new(lo.parse().unwrap(), PORT),
                    "loopback",
                ));
            }
        }
        Site { client, _container: container, _servers: servers }
    }

    /// Whether `client` gets an answer from `target`'s server, waiting as long as `expected`
    /// (the answer one expects) deserves.
    fn answered(&self, proto: Proto, family: Family, client: Client, target: Target, expected: bool) -> bool {
        let from = client.addr(family);
        let to = target.addr(family);
        let answer = request(Some(&self.client), proto, from, to, "hello", patience(expected));
        answer.is_some_and(|a| a == format!("{} hello", target.server()))
    }

    /// Asserts, for each protocol, family, client and target, that the client is answered
    /// exactly when `open(client, target)`.
    fn assert_reach<H: Harness>(&self, label: &str, open: impl Fn(Client, Target) -> bool) {
        let mut wrong = Vec::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            for family in [Family::V4, Family::V6] {
                for client in [Client::Two, Client::Three] {
                    for target in Target::ALL {
                        let want = open(client, target);
                        if self.answered(proto, family, client, target, want) != want {
                            let verdict = if want { "not answered" } else { "answered" };
                            wrong.push(format!(
                                "{proto:?} {family:?} from {client:?} to {target:?}: {verdict}"
                            ));
                        }
                    }
                }
            }
        }
        if !wrong.is_empty() {
            println!("{}", H::snapshot());
        }
        assert!(wrong.is_empty(), "{} {label}:\n{}", H::NAME, wrong.join("\n"));
    }
}

fn enforce(scope: EnforceScope) -> Option<Enforce> {
    Some(Enforce { tcp_ports: vec![PORT], udp_ports: vec![PORT], scope })
}

/// A backend with `enforce` set up as a daemon cycle does: objects, the allowlist, the rules.
fn enforcing<H: Harness>(scope: EnforceScope, allow: Client) -> Box<dyn allowsync::backend::Backend> {
    let mut b = H::backend(enforce(scope));
    b.ensure().unwrap();
    sync(&mut *b, &allow.only());
    b.enforce().unwrap();
    b
}

/// The matrix: a published (DNATed) port and a local one are closed to the stranger in
/// both protocols and families, routed traffic is not touched, loopback is never filtered, and
/// an apply that swaps the clients swaps who gets through.
pub fn published_and_local_ports_are_closed_to_strangers_and_routed_traffic_is_not<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let site = Site::new();
    site.assert_reach::<H>("without enforcement (the network, the DNAT and the servers work)", |_, _| true);

    let mut b = enforcing::<H>(EnforceScope::Host, Client::Two);
    site.assert_reach::<H>("allowing .2", |client, target| target == Target::Routed || client == Client::Two);

    // The host's own traffic comes in on lo, from addresses no allowlist may hold.
    for proto in [Proto::Tcp, Proto::Udp] {
        for (from, to) in [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("10.200.0.10", "10.200.0.10")] {
            let to = SocketAddr::new(to.parse().unwrap(), PORT);
            let answer = request(None, proto, from.parse().unwrap(), to, "hello", patience(true));
            assert!(answer.is_some(), "{} {proto:?} {from} -> {to} over loopback: no answer", H::NAME);
        }
    }

    // One apply removes .2 and adds .3: .2's next connections fail, .3's succeed.
    sync(&mut *b, &Client::Three.only());
    site.assert_reach::<H>("allowing .3", |client, target| {
        target == Target::Routed || client == Client::Three
    });

    b.teardown().unwrap();
    site.assert_reach::<H>("after teardown", |_, _| true);
}

/// Established TCP flows, through the DNAT and to the local socket, in both families: an
/// apply that keeps their source, and the next cycle's ensure and enforce (which rewrite the
/// rules), leave them alone. An apply that removes the source cuts them: every packet is
/// dropped, the flows' own included. Dropped, not reset: allowed again, the retransmitted
/// request is answered on the same connection.
pub fn established_flows_are_kept_with_their_source_and_cut_without_it<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let site = Site::new();
    let mut b = enforcing::<H>(EnforceScope::Host, Client::Two);
    let mut flows: Vec<(String, Connection)> = Vec::new();
    for family in [Family::V4, Family::V6] {
        for target in [Target::Published, Target::Local] {
            let from = Client::Two.addr(family);
            let c = Connection::open(&site.client, from, target.addr(family), patience(true));
            let label = format!("{} {family:?} flow to {target:?} ({})", H::NAME, target.server());
            flows.push((label.clone(), c.unwrap_or_else(|| panic!("{label}: cannot connect"))));
        }
    }
    let ask = |flows: &mut Vec<(String, Connection)>, request: &str, answered: bool| {
        for (label, c) in flows.iter_mut() {
            let answer = c.ask(request, patience(answered));
            assert_eq!(answer.is_some(), answered, "{label}, request {request:?}: {answer:?}");
        }
    };
    ask(&mut flows, "1", true);

    sync(&mut *b, &set(["10.200.0.2", "10.200.0.3", "fd00:200::2", "fd00:200::3"]));
    b.ensure().unwrap();
    b.enforce().unwrap();
    ask(&mut flows, "2", true);

    sync(&mut *b, &Client::Three.only());
    ask(&mut flows, "3", false);

    sync(&mut *b, &Client::Two.only());
    // The stalled request comes through at TCP's next retransmission, whose backoff grew while
    // it was dropped (about as long again as the stall lasted): wait for it with a bound well
    // past that, not the usual patience, which a loaded host can outlast.
    for (label, c) in &mut flows {
        let answer = c.answer(std::time::Duration::from_secs(60));
        assert!(answer.as_deref().is_some_and(|a| a.ends_with(" 3")), "{label}: {answer:?}");
    }
}

/// `scope: local` is the input hook (every earlier version's enforcement): the published port
/// stays open to the stranger, which is why `host` is the default. Switching scope either way
/// replaces the chain, and never leaves the local port open.
pub fn the_scope_switches_both_ways_and_local_leaves_published_ports_open<H: Harness>() {
    let Some(_ns) = enter_new_netns() else { return };
    let site = Site::new();
    let local_only = |client, target| target != Target::Local || client == Client::Two;
    let host = |client, target| target == Target::Routed || client == Client::Two;

    let _local = enforcing::<H>(EnforceScope::Local, Client::Two);
    assert_eq!(H::enforcement_scopes(), [EnforceScope::Local]);
    site.assert_reach::<H>("scope local", local_only);

    let _host = enforcing::<H>(EnforceScope::Host, Client::Two);
    assert_eq!(H::enforcement_scopes(), [EnforceScope::Host]);
    site.assert_reach::<H>("scope host, after local", host);

    let mut back = enforcing::<H>(EnforceScope::Local, Client::Two);
    assert_eq!(H::enforcement_scopes(), [EnforceScope::Local]);
    site.assert_reach::<H>("scope local, after host", local_only);

    back.teardown().unwrap();
    assert_eq!(H::enforcement_scopes(), []);
}
