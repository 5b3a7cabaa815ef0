//! Fan-out end to end (issue 22): the one key holder runs allowsync with `backend.file` (the
//! publisher); a web server serves that file over HTTPS (testkit's relay, reading it from disk at
//! each request as a static file server does); a fleet host runs allowsync with a `url` source
//! and the nftables backend (the consumer), holds no key, and enforces the list, checked with real
//! TCP connections through a veth pair. Everything runs in a network namespace of the test.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use allowsync::prefixes::AllowSet;
use allowsync_testkit::daemon::{Env, Setup, setup_with, stop, strings, wait_until};
use allowsync_testkit::netns::{veth_pair, who_connects};
use allowsync_testkit::relay::{Relay, RelayHandle};
use allowsync_testkit::scrape::{parse, value};
use allowsync_testkit::set;

const KEY: &str = "fleet-test-publisher-key";
const PORT: u16 = 8443;
const T: Duration = Duration::from_secs(20);
/// The consumer's poll interval (the shortest allowed), without jitter.
const INTERVAL: Duration = Duration::from_secs(10);
/// The client `10.200.0.2` / `fd00:200::2` is allowlisted at first; `.3` is a stranger.
const LIST5: &[&str] = &["10.200.0.2", "203.0.113.0/24"];
const LIST6: &[&str] = &["fd00:200::2", "2001:db8:6::/56"];

struct Fleet {
    /// The consumer's configuration is `env.cfg` (so that the environment's daemon helpers and
    /// its clean-up apply to it); the publisher's is `publisher`.
    env: Env,
    publisher: std::path::PathBuf,
    relay: RelayHandle,
}

fn fleet() -> Option<Fleet> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    let env = setup_with(Setup::new(KEY, lists), |_| {})?;
    let dir = env.dir.path();
    // The publisher: the environment's Chat source and key, the list written as json into a
    // directory a web server serves.
    std::fs::create_dir(dir.join("www")).unwrap();
    let publisher = dir.join("publisher.yaml");
    let yaml = std::fs::read_to_string(&env.cfg).unwrap();
    let backend = "  nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }\n";
    assert!(yaml.contains(backend), "{yaml}");
    let yaml = yaml
        .replace(backend, "  file: { path: www/chat.json, format: json }\n")
        .replace("state_file: state.json", "state_file: publisher-state.json");
    std::fs::write(&publisher, yaml).unwrap();

    let relay = env.rt.block_on(Relay::start(dir)).unwrap();
    relay.serve_file(&dir.join("www/chat.json"));
    // The consumer: the served copy, nothing of the key.
    let consumer = format!(
        "interval: {interval}s
jitter: 0s
state_file: state.json
sources:
  - name: relay
    url:
      url: {url}
      ca_file: relay-ca.pem
      timeout: 5s
backend:
  nftables: {{ table: allowsync, set_v4: allow_v4, set_v6: allow_v6, enforce: {{ tcp_ports: [{PORT}] }} }}
",
        interval = INTERVAL.as_secs(),
        url = relay.url()
    );
    std::fs::write(&env.cfg, consumer).unwrap();
    Some(Fleet { env, publisher, relay })
}

impl Fleet {
    fn publish(&self) {
        let o = self.env.command_with(&self.publisher, &["once"], T);
        assert_eq!(o.code, Some(0), "publisher: {}{}", o.stdout, o.stderr);
    }
}

#[test]
fn a_list_published_by_the_key_holder_reaches_a_keyless_hosts_set_within_one_interval() {
    let Some(f) = fleet() else { return };
    let consumer_cfg = std::fs::read_to_string(&f.env.cfg).unwrap();
    assert!(!consumer_cfg.contains("secret") && !consumer_cfg.contains(KEY), "{consumer_cfg}");
    let client = veth_pair();
    // Listeners in the server namespace (this thread's): the kernel completes handshakes into the
    // backlog, nothing needs to accept.
    let _l4 = TcpListener::bind(("10.200.0.1", PORT)).unwrap();
    let _l6 = TcpListener::bind(("fd00:200::1", PORT)).unwrap();
    assert_eq!(who_connects(&client, PORT), [true; 4], "without allowsync the network works");

    f.publish();
    let first: AllowSet = set([LIST5, LIST6].concat());
    let published = std::fs::read(f.env.dir.path().join("www/chat.json")).unwrap();
    let list = allowsync::published::parse_json(&published).expect("the publisher wrote a valid list");
    assert_eq!(AllowSet::from_nets(list.nets()), first);

    let d = f.env.start(&first);
    assert_eq!(
        who_connects(&client, PORT),
        [true, false, true, false],
        "only the published addresses get in"
    );

    // The key holder's API answer changes; the publisher writes it; the consumer's next poll,
    // at most one interval later, brings it into its set without a signal.
    f.env.mock.set_list(5, strings(&["10.200.0.2", "10.200.0.3", "203.0.113.0/24"]));
    f.publish();
    let t = Instant::now();
    let second: AllowSet =
        set(["10.200.0.2", "10.200.0.3", "203.0.113.0/24", "fd00:200::2", "2001:db8:6::/56"]);
    f.env.wait_kernel(&second, INTERVAL + Duration::from_secs(3));
    eprintln!("the publisher's change reached the consumer's set after {:?}", t.elapsed());
    assert_eq!(who_connects(&client, PORT), [true, true, true, false]);

    // Every request after the first asked with the ETag the consumer kept; the change was a 200.
    let requests = f.relay.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    assert_eq!(requests[0].if_none_match, None, "{requests:?}");
    assert!(requests[1..].iter().all(|r| r.if_none_match.is_some()), "{requests:?}");
    assert_eq!(requests.last().unwrap().status, 200, "{requests:?}");
    assert_eq!(f.relay.answered(200) + f.relay.answered(304), requests.len(), "{requests:?}");
    stop(d);
}

#[test]
fn a_dead_publisher_fails_the_consumers_source_and_keeps_its_set() {
    let Some(f) = fleet() else { return };
    f.publish();
    let first: AllowSet = set([LIST5, LIST6].concat());
    // A consumer that demands a list younger than 1 s: the publisher's file, never refreshed,
    // goes stale while it is served unchanged (304s).
    let cfg =
        std::fs::read_to_string(&f.env.cfg).unwrap().replace("timeout: 5s", "timeout: 5s\n      max_age: 1s");
    std::fs::write(&f.env.cfg, cfg).unwrap();
    let o = f.env.once(T);
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert_eq!(f.env.kernel(), first);
    let generated =
        allowsync::published::parse_json(&std::fs::read(f.env.dir.path().join("www/chat.json")).unwrap())
            .unwrap()
            .generated_at;
    // Bounded wait for the condition (the list being older than max_age), not a sleep.
    assert!(wait_until(Duration::from_secs(5), || {
        generated.elapsed().is_ok_and(|a| a > Duration::from_secs(2))
    }));
    let o = f.env.once(T);
    assert_eq!(o.code, Some(1), "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("class=stale"), "{}", o.stderr);
    assert_eq!(f.env.kernel(), first, "the last good list stays");
    assert_eq!(f.relay.requests().last().unwrap().status, 304, "{:?}", f.relay.requests());

    // The daemon shows it in its metrics (node_exporter's textfile, parsed with a Prometheus
    // parser): the source on its last good list, its requests counted as `stale`.
    let cfg = std::fs::read_to_string(&f.env.cfg).unwrap() + "metrics:\n  textfile: allowsync.prom\n";
    std::fs::write(&f.env.cfg, cfg).unwrap();
    let d = f.env.spawn();
    let textfile = f.env.dir.path().join("allowsync.prom");
    let mut last = None;
    let seen = wait_until(Duration::from_secs(10), || {
        let Ok(text) = std::fs::read_to_string(&textfile) else { return false };
        let s = parse(&text);
        let stale = value(&s, "allowsync_source_using_last_good", &[("source", "relay")]) == Some(1.0)
            && value(&s, "allowsync_api_requests_total", &[("source", "relay"), ("result", "stale")])
                .is_some_and(|v| v >= 1.0);
        last = Some(text);
        stale
    });
    assert!(seen, "textfile: {last:?}\nlog:\n{}", f.env.log());
    assert_eq!(f.env.kernel(), first, "the last good list stays");
    stop(d);
}
