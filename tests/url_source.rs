//! The `url` source against a local HTTPS relay whose CA is minted by the test and trusted
//! through `ca_file` only:
//!
//! - in process: 200 then one 304 that answers the kept list; an ETag from another URL is not
//!   sent; a bad SHA-256, an unknown version, an oversized body (with `Content-Length`, chunked,
//!   and endless), a stale `generated_at`, one from the future, a 304 nobody asked for, an entry
//!   wider than the minimum and the other family's entries each end in the right error;
//! - the real binary's `once` in a network namespace with nftables: the ETag kept in the state
//!   file makes the next run cost one 304 and change nothing; every failure (on a 200 or after a
//!   304) keeps the last good list in the kernel and the state, and `once` exits 1.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use allowsync::admission::MinPrefix;
use allowsync::config::{SourceConfig, SourceKind, UrlConfig};
use allowsync::prefixes::AllowSet;
use allowsync::source::{ErrorClass, FetchError, Fetched, Sources};
use allowsync::state::{SourceState, StateFile};
use allowsync_testkit::daemon::{Env, Setup, lists_of, setup_with};
use allowsync_testkit::relay::{Relay, RelayFault, RelayHandle};
use allowsync_testkit::set;

const LIST: &[&str] = &["203.0.113.0/24", "198.51.100.7", "2001:db8::/48"];
const T: Duration = Duration::from_secs(20);
const HOUR: Duration = Duration::from_secs(3600);

/// What a case does to the relay before the fetch.
type Arrange<'a> = Box<dyn Fn() + 'a>;

fn ago(d: Duration) -> SystemTime {
    SystemTime::now() - d
}

fn url_cfg(relay: &RelayHandle) -> UrlConfig {
    UrlConfig {
        url: relay.url(),
        ca_file: Some(relay.ca_file().to_path_buf()),
        timeout: Duration::from_secs(30),
        max_bytes: 64 * 1024,
        max_age: HOUR,
    }
}

fn sources(cfg: UrlConfig) -> Sources {
    let kind = SourceKind::Url(Box::new(cfg));
    Sources::from_configs(&[SourceConfig { name: "relay".into(), kind }], MinPrefix::default()).unwrap()
}

async fn fetch(s: &Sources, known: &BTreeMap<String, SourceState>) -> Fetched {
    let mut all = s.fetch_all_with(s.kept_for_fetch(known)).await;
    assert_eq!(all.len(), 1);
    all.remove(0)
}

/// The state a successful sync keeps for `f`.
fn kept(f: &Fetched) -> BTreeMap<String, SourceState> {
    let list = f.result.clone().expect("the fetch succeeded");
    let st = SourceState { list, fetched_at: 1, published: f.published.clone() };
    BTreeMap::from([(f.name.clone(), st)])
}

fn err(f: &Fetched) -> &FetchError {
    f.result.as_ref().expect_err("the fetch should have failed")
}

async fn relay() -> (tempfile::TempDir, RelayHandle) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path()).await.unwrap();
    relay.publish(ago(Duration::from_secs(60)), LIST);
    (dir, relay)
}

#[tokio::test]
async fn an_unchanged_list_costs_one_304_and_is_answered_from_the_state() {
    let (_dir, relay) = relay().await;
    let s = sources(url_cfg(&relay));
    let first = fetch(&s, &BTreeMap::new()).await;
    assert_eq!(first.result, Ok(set::<AllowSet>(LIST)));
    let published = first.published.clone().expect("kept with the list");
    assert_eq!((published.url.as_str(), published.etag.as_deref()), (relay.url().as_str(), Some("\"v2\"")));
    assert_eq!(relay.requests()[0].if_none_match, None);

    let second = fetch(&s, &kept(&first)).await;
    assert_eq!(second.result, Ok(set::<AllowSet>(LIST)), "the kept list");
    assert_eq!(second.published, first.published);
    let r = relay.requests();
    assert_eq!((r.len(), relay.answered(304)), (2, 1));
    assert_eq!(r[1].if_none_match.as_deref(), Some("\"v2\""));

    // A new list: a 200 again, and its new ETag.
    relay.publish(SystemTime::now(), &["192.0.2.0/24"]);
    let third = fetch(&s, &kept(&second)).await;
    assert_eq!(third.result, Ok(set::<AllowSet>(["192.0.2.0/24"])));
    assert_eq!(third.published.unwrap().etag, Some(relay.etag()));

    // An ETag kept for another URL means nothing here.
    let mut other = kept(&first);
    other.get_mut("relay").unwrap().published.as_mut().unwrap().url =
        "https://elsewhere.example/x.json".into();
    relay.publish(ago(Duration::from_secs(60)), LIST);
    let before = relay.requests().len();
    assert!(fetch(&s, &other).await.result.is_ok());
    assert_eq!(relay.requests()[before].if_none_match, None);
    // Nor one that cannot be sent (a state file edited by hand): the list is fetched in full.
    let mut edited = kept(&first);
    edited.get_mut("relay").unwrap().published.as_mut().unwrap().etag = Some("\"v\n2\"".into());
    let before = relay.requests().len();
    assert_eq!(fetch(&s, &edited).await.result, Ok(set::<AllowSet>(LIST)));
    assert_eq!(relay.requests()[before].if_none_match, None);
}

#[tokio::test]
async fn a_broken_list_is_a_failed_fetch_of_the_right_class() {
    let (_dir, relay) = relay().await;
    let s = sources(url_cfg(&relay));
    let good = allowsync::published::render_json(ago(Duration::from_secs(60)), &[], &[]);
    let cases: Vec<(&str, Arrange<'_>, ErrorClass, &str)> = vec![
        (
            "bad sha",
            Box::new(|| relay.set_body(good.replace("e3b0c442", "00000000"))),
            ErrorClass::InvalidResponse,
            "the SHA-256 does not match the prefixes",
        ),
        (
            "version 2",
            Box::new(|| relay.set_body(good.replace("\"version\": 1", "\"version\": 2"))),
            ErrorClass::InvalidResponse,
            "unknown version 2",
        ),
        (
            "not JSON",
            Box::new(|| relay.set_body("<html>\u{1b}[2J</html>")),
            ErrorClass::InvalidResponse,
            "invalid published list: not a published list",
        ),
        (
            "stale",
            Box::new(|| relay.publish(ago(2 * HOUR), LIST)),
            ErrorClass::Stale,
            "the published list is stale: generated at ",
        ),
        (
            "from the future",
            Box::new(|| relay.publish(SystemTime::now() + HOUR, LIST)),
            ErrorClass::InvalidResponse,
            "ahead of this host's clock",
        ),
        (
            "0.0.0.0/0",
            Box::new(|| relay.publish(ago(Duration::from_secs(60)), &["203.0.113.0/24", "0.0.0.0/0"])),
            ErrorClass::InvalidResponse,
            "suspicious answer, none of it used: entry \"0.0.0.0/0\"",
        ),
        (
            "404",
            Box::new(|| relay.inject_times(RelayFault::Status(404), 1)),
            ErrorClass::Configuration,
            "HTTP 404 from https://127.0.0.1:",
        ),
        (
            "304 unasked",
            Box::new(|| relay.inject_times(RelayFault::NotModified, 1)),
            ErrorClass::InvalidResponse,
            "HTTP 304 to a request that was not conditional",
        ),
    ];
    for (what, arrange, class, text) in cases {
        arrange();
        let f = fetch(&s, &BTreeMap::new()).await;
        let e = err(&f);
        assert_eq!(e.class(), class, "{what}: {e}");
        assert!(e.to_string().contains(text), "{what}: {e}");
        assert!(!e.to_string().chars().any(char::is_control), "{what}: {e}");
        assert_eq!(f.published, None, "{what}: nothing to keep");
    }
    // Stale is named with its age and the bound.
    relay.publish(ago(2 * HOUR), LIST);
    let f = fetch(&s, &BTreeMap::new()).await;
    assert!(
        err(&f).to_string().ends_with("2h ago, longer than max_age 1h: is its publisher alive?"),
        "{}",
        err(&f)
    );
}

#[tokio::test]
async fn a_list_older_than_max_age_fails_after_a_304_too() {
    let (_dir, relay) = relay().await;
    let s = sources(url_cfg(&relay));
    let first = fetch(&s, &BTreeMap::new()).await;
    let mut known = kept(&first);
    // The publisher died an hour and more ago: the server still answers 304 to the kept ETag.
    known.get_mut("relay").unwrap().published.as_mut().unwrap().generated_at -= 2 * 3600;
    let f = fetch(&s, &known).await;
    assert_eq!(relay.answered(304), 1);
    assert_eq!(err(&f).class(), ErrorClass::Stale, "{}", err(&f));
}

#[tokio::test]
async fn the_body_is_capped_while_it_streams() {
    let (_dir, relay) = relay().await;
    let s = sources(url_cfg(&relay));
    let big: Vec<&str> = (0..8000).map(|_| "192.0.2.1").collect();
    let nets: Vec<String> = (0..4000).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let nets: Vec<&str> = nets.iter().map(String::as_str).collect();
    relay.publish(SystemTime::now(), &nets);
    assert!(relay.requests().is_empty());
    let f = fetch(&s, &BTreeMap::new()).await;
    assert_eq!(err(&f), &FetchError::BodyTooLarge { limit: 64 * 1024 }, "with Content-Length");
    relay.inject_times(RelayFault::ChunkedBody(format!("{big:?}").into_bytes()), 1);
    let f = fetch(&s, &BTreeMap::new()).await;
    assert_eq!(err(&f), &FetchError::BodyTooLarge { limit: 64 * 1024 }, "chunked");
    // A body that never ends: only a read that stops at the cap answers before the timeout.
    relay.inject_times(RelayFault::Endless, 1);
    let f = fetch(&s, &BTreeMap::new()).await;
    assert_eq!(err(&f), &FetchError::BodyTooLarge { limit: 64 * 1024 }, "endless");
    assert_eq!(err(&f).class(), ErrorClass::InvalidResponse);
}

#[tokio::test]
async fn entries_are_judged_as_the_chat_sources_are() {
    let (_dir, relay) = relay().await;
    let s = sources(url_cfg(&relay));
    // Written by hand: special ranges and the other family are skipped, host bits masked.
    let (v4, v6) = (
        ["203.0.113.0/24", "127.0.0.1", "2001:db8::/48", "192.0.2.9/24"],
        ["2001:db8:1::/48", "192.0.2.0/25", "::1"],
    );
    let lines: String = v4.iter().chain(&v6).map(|l| format!("{l}\n")).collect();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(lines.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let at = humantime::format_rfc3339_seconds(SystemTime::now());
    relay.set_body(format!(
        r#"{{"version":1,"generated_at":"{at}","ipv4":{v4:?},"ipv6":{v6:?},"sha256":"{sha}"}}"#
    ));
    let f = fetch(&s, &BTreeMap::new()).await;
    assert_eq!(f.result, Ok(set::<AllowSet>(["203.0.113.0/24", "192.0.2.0/24", "2001:db8:1::/48"])));
    assert_eq!((f.entries, f.skipped), (3, 4));
    // Nothing valid at all: broken, not an empty allowlist (which an empty list is).
    relay.publish(SystemTime::now(), &["127.0.0.1", "::1"]);
    assert_eq!(fetch(&s, &BTreeMap::new()).await.result, Err(FetchError::AllInvalid { count: 2 }));
    relay.publish(SystemTime::now(), &[]);
    assert_eq!(fetch(&s, &BTreeMap::new()).await.result, Ok(AllowSet::default()));
}

#[tokio::test]
async fn only_the_ca_file_makes_the_relay_trusted() {
    let (_dir, relay) = relay().await;
    let mut cfg = url_cfg(&relay);
    cfg.ca_file = None;
    let f = fetch(&sources(cfg), &BTreeMap::new()).await;
    assert_eq!(err(&f).class(), ErrorClass::Network, "{}", err(&f));
    assert!(matches!(err(&f), FetchError::Connect { .. }), "{}", err(&f));
    assert!(relay.requests().is_empty(), "no request over an untrusted connection");
}

// ---- `once` in a namespace, with nftables ----------------------------------------------------

/// A namespace with the relay serving [`LIST`] and a configuration of one `url` source into
/// nftables. The relay lives on the namespace's loopback, served by the environment's runtime.
fn env() -> Option<(Env, RelayHandle)> {
    let env = setup_with(Setup::new("unused-key", BTreeMap::new()), |_| {})?;
    let relay = env.rt.block_on(Relay::start(env.dir.path())).unwrap();
    relay.publish(ago(Duration::from_secs(60)), LIST);
    let yaml = format!(
        "state_file: state.json
sources:
  - name: relay
    url:
      url: {url}
      ca_file: relay-ca.pem
      timeout: 5s
      max_bytes: 65536
backend:
  nftables: {{ table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }}
",
        url = relay.url()
    );
    std::fs::write(&env.cfg, yaml).unwrap();
    Some((env, relay))
}

fn output(f: &allowsync_testkit::daemon::Finished) -> String {
    format!("{}{}", f.stdout, f.stderr)
}

#[test]
fn once_keeps_the_etag_in_the_state_file_and_an_unchanged_list_costs_one_304() {
    let Some((env, relay)) = env() else { return };
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), set::<AllowSet>(LIST));
    let st = env.parsed_state();
    let p = st.sources["relay"].published.clone().expect("the ETag is kept");
    assert_eq!((p.etag.as_deref(), p.url.as_str()), (Some("\"v2\""), relay.url().as_str()));
    assert!(env.state().contains(r#""etag": "\"v2\"""#), "{}", env.state());

    // A second process: the ETag came through the state file.
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert!(o.stderr.contains("outcome=\"in-sync\""), "{}", output(&o));
    assert_eq!((relay.requests().len(), relay.answered(304)), (2, 1));
    assert_eq!(relay.requests()[1].if_none_match.as_deref(), Some("\"v2\""));
    assert_eq!(env.kernel(), set::<AllowSet>(LIST));
    assert_eq!(env.parsed_state().sources["relay"].published, Some(p));

    // A change reaches the set.
    relay.publish(SystemTime::now(), &["203.0.113.0/24", "2001:db8::/48"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(env.kernel(), set::<AllowSet>(["203.0.113.0/24", "2001:db8::/48"]));
    assert_eq!(env.parsed_state().sources["relay"].published.clone().unwrap().etag, Some(relay.etag()));
}

#[test]
fn once_fails_the_source_and_keeps_the_last_good_list() {
    let Some((env, relay)) = env() else { return };
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    let good = set::<AllowSet>(LIST);
    let state = lists_of(&env.parsed_state());
    let fresh = ago(Duration::from_secs(60));
    let oversized: Vec<String> = (0..4000).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let oversized: Vec<&str> = oversized.iter().map(String::as_str).collect();
    let cases: Vec<(&str, Arrange<'_>, &str)> = vec![
        (
            "bad sha",
            Box::new(|| {
                relay.set_body(allowsync::published::render_json(fresh, &[], &[]).replace("e3b0", "0000"))
            }),
            "SHA-256 does not match",
        ),
        (
            "version 2",
            Box::new(|| {
                relay.set_body(
                    allowsync::published::render_json(fresh, &[], &[])
                        .replace("\"version\": 1", "\"version\": 2"),
                )
            }),
            "unknown version 2",
        ),
        ("oversized", Box::new(|| relay.publish(fresh, &oversized)), "larger than 65536 bytes"),
        ("endless", Box::new(|| relay.inject_times(RelayFault::Endless, 1)), "larger than 65536 bytes"),
        ("stale", Box::new(|| relay.publish(ago(2 * HOUR), LIST)), "the published list is stale"),
        (
            "0.0.0.0/0",
            Box::new(|| relay.publish(fresh, &["203.0.113.0/24", "0.0.0.0/0"])),
            "suspicious answer",
        ),
    ];
    for (what, arrange, text) in cases {
        arrange();
        let o = env.once(T);
        assert_eq!(o.code, Some(1), "{what}: {}", output(&o));
        assert!(o.stderr.contains(text), "{what}: {}", output(&o));
        assert!(o.stderr.contains("failed(kept last good)"), "{what}: {}", output(&o));
        assert_eq!(env.kernel(), good, "{what}: the set changed");
        assert_eq!(lists_of(&env.parsed_state()), state, "{what}: the last good list changed");
    }

    // Stale after a 304: the relay still has the list the state's ETag names, generated (as the
    // state tells) two hours ago.
    relay.publish(fresh, LIST);
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    let file = StateFile::new(env.state_path());
    let mut st = file.peek().unwrap().unwrap();
    st.sources.get_mut("relay").unwrap().published.as_mut().unwrap().generated_at -= 2 * 3600;
    file.save(&st).unwrap();
    let o = env.once(T);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert_eq!(relay.requests().last().unwrap().status, 304);
    assert!(o.stderr.contains("the published list is stale"), "{}", output(&o));
    assert!(o.stderr.contains("class=stale"), "{}", output(&o));
    assert_eq!(env.kernel(), good);
}

#[test]
fn http_to_a_non_loopback_address_is_refused_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "sources:\n  - name: relay\n    url:\n      url: http://192.0.2.10/chat.json\n")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .arg("-c")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!(
        "{}:4:12: sources[0].url.url: `http://192.0.2.10/chat.json` uses http:// to a non-loopback host",
        cfg.display()
    );
    assert!(err.contains(&want), "{err}");
}

#[test]
fn the_reference_configurations_url_source_is_valid_as_documented() {
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/allowsync.yaml")).unwrap();
    // Uncomment the documented relay source, block by block as an operator would.
    let mut lines = Vec::new();
    let mut inside = false;
    for l in reference.lines() {
        inside = l.starts_with("  # - name: relay") || (inside && l.starts_with("  #"));
        lines.push(if inside {
            format!("  {}", &l[4..])
        } else {
            l.replace("/etc/allowsync/chat-sgp.key", "k")
        });
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), lines.join("\n")).unwrap();
    std::fs::write(dir.path().join("k"), "key").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .arg("-c")
        .arg(dir.path().join("config.yaml"))
        .arg("check-config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "relay: url https://allowlist.internal.example/chat.json, max_age 1h, max_bytes 4194304"
        ),
        "{text}"
    );
}
