//! The GetIPList client against the in-process mock Chat API: lists per nettype and their
//! union, every fault ending in the right error class in bounded time, the usersig re-mint and
//! backup-endpoint retries, and no secret in any log line or error.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use allowsync::clock;
use allowsync::config::{SecretKey, SourceConfig, SourceKind, TencentChatConfig};
use allowsync::source::{ErrorClass, FetchError, Fetched, Sources};
use allowsync::usersig;
use allowsync_testkit::mock::{Fault, MockChatApi, MockConfig, MockHandle};

const APP: u64 = 1400000000;
const ADMIN: &str = "administrator";
const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e-test-secret";

// ---- log capture --------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary, at every level, from every crate.
fn logs() -> &'static Buf {
    static LOGS: OnceLock<Buf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Buf::default();
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

/// Neither the key nor any usersig the mock received appears in the logs so far (of all the
/// tests of this binary, as they share the key) or in these results' Display and Debug.
fn assert_no_secrets(mock: &MockHandle, fetched: &[&Fetched]) {
    let mut texts = vec![log_text()];
    for f in fetched {
        texts.push(format!("{f:?}"));
        if let Err(e) = &f.result {
            texts.push(format!("{e} {e:?}"));
        }
        for n in &f.nettypes {
            if let Err(e) = &n.result {
                texts.push(format!("{e} {e:?}"));
            }
        }
    }
    let sigs: Vec<String> =
        mock.requests().iter().filter_map(|r| r.param("usersig").map(str::to_owned)).collect();
    for t in &texts {
        assert!(!t.contains(KEY), "the secret key leaked: {t}");
        for s in &sigs {
            assert!(!t.contains(s.as_str()), "a usersig leaked: {t}");
            // The signature inside it would let anyone rebuild it.
            if let Ok(doc) = usersig::decode(s) {
                assert!(!t.contains(&doc.sig), "a usersig's TLS.sig leaked: {t}");
            }
        }
    }
}

// ---- helpers ------------------------------------------------------------------------------

async fn mock() -> MockHandle {
    logs();
    let mut cfg = MockConfig::new(APP, ADMIN, KEY);
    cfg.lists.insert(5, vec!["203.0.113.0/24".into(), "198.51.100.7".into()]);
    cfg.lists.insert(6, vec!["192.0.2.128/25".into(), "2001:db8::/48".into()]);
    MockChatApi::start(cfg).await.unwrap()
}

fn chat_cfg(endpoints: Vec<String>, nettypes: &[u8], timeout: Duration) -> TencentChatConfig {
    TencentChatConfig {
        region: None,
        endpoints,
        sdkappid: APP,
        identifier: ADMIN.into(),
        secret_key: SecretKey::new(KEY, "test"),
        nettypes: nettypes.to_vec(),
        timeout,
        usersig_ttl: Duration::from_secs(86_400),
        ca_file: None,
    }
}

fn sources(cfg: TencentChatConfig) -> Sources {
    Sources::from_configs(
        &[SourceConfig { name: "chat".into(), kind: SourceKind::TencentChat(Box::new(cfg)) }],
        Default::default(),
    )
    .unwrap()
}

/// Fetches the single source, failing the test if that takes longer than `bound`.
async fn fetch_within(s: &Sources, bound: Duration) -> Fetched {
    let start = Instant::now();
    let mut all = tokio::time::timeout(bound, s.fetch_all()).await.expect("fetch took too long");
    assert!(start.elapsed() < bound);
    assert_eq!(all.len(), 1);
    all.remove(0)
}

async fn fetch_one(mock: &MockHandle, nettypes: &[u8]) -> Fetched {
    let s = sources(chat_cfg(vec![mock.url()], nettypes, Duration::from_secs(2)));
    fetch_within(&s, Duration::from_secs(10)).await
}

fn shown(f: &Fetched) -> Vec<String> {
    f.result.as_ref().expect("fetch failed").to_nets().iter().map(ToString::to_string).collect()
}

fn err(f: &Fetched) -> &FetchError {
    f.result.as_ref().expect_err("fetch should have failed")
}

// ---- lists --------------------------------------------------------------------------------

#[tokio::test]
async fn each_nettype_and_their_union() {
    let m = mock().await;
    for n in 0..=6u8 {
        m.set_list(n, vec![format!("10.{n}.0.0/16")]);
    }
    for n in 0..=6u8 {
        let f = fetch_one(&m, &[n]).await;
        assert_eq!(shown(&f), [format!("10.{n}.0.0/16")]);
        assert_eq!((f.entries, f.skipped), (1, 0));
    }
    m.set_list(5, vec!["203.0.113.0/24".into(), "198.51.100.7".into(), "10.5.0.0/16".into()]);
    m.set_list(6, vec!["203.0.113.0/25".into(), "2001:db8::1/48".into()]);
    let f = fetch_one(&m, &[5, 6]).await;
    assert_eq!(shown(&f), ["10.5.0.0/16", "198.51.100.7/32", "203.0.113.0/24", "2001:db8::/48"]);
    assert_eq!((f.entries, f.skipped), (5, 0));
    assert_eq!(f.nettypes.iter().map(|n| n.nettype).collect::<Vec<_>>(), [5, 6]);

    // What the mock saw: well-formed requests, a fresh random each, one per nettype.
    let reqs = m.requests();
    assert_eq!(reqs.len(), 7 + 2);
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v4/ConfigSvc/GetIPList");
        assert_eq!(r.body, b"{}");
        assert_eq!(r.param("contenttype"), Some("json"));
        assert_eq!(r.param("identifier"), Some(ADMIN));
        assert_eq!(r.param("sdkappid"), Some("1400000000"));
        assert_eq!(r.error_code, Some(0));
    }
    let mut randoms: Vec<&str> = reqs.iter().map(|r| r.param("random").unwrap()).collect();
    randoms.sort_unstable();
    randoms.dedup();
    assert!(randoms.len() >= reqs.len() - 1, "random is not fresh per request");
    // URLs are logged (at debug), redacted: the scan below is not vacuous.
    assert!(log_text().contains("usersig=REDACTED"));
    assert_no_secrets(&m, &[&f]);
}

#[tokio::test]
async fn the_list_can_change_between_fetches() {
    let m = mock().await;
    let s = sources(chat_cfg(vec![m.url()], &[5], Duration::from_secs(2)));
    assert_eq!(
        shown(&fetch_within(&s, Duration::from_secs(10)).await),
        ["198.51.100.7/32", "203.0.113.0/24"]
    );
    m.set_list(5, vec!["192.0.2.1".into()]);
    assert_eq!(shown(&fetch_within(&s, Duration::from_secs(10)).await), ["192.0.2.1/32"]);
    // The same source reuses its usersig.
    let sigs: Vec<_> = m.requests().iter().map(|r| r.param("usersig").unwrap().to_owned()).collect();
    assert_eq!(sigs[0], sigs[1]);
}

#[tokio::test]
async fn invalid_entries_are_skipped_and_valid_ones_kept() {
    let m = mock().await;
    m.inject(Fault::ExtraEntries(vec![
        "bogus".into(),
        "10.0.0.0/33".into(),
        " ".into(),
        "10.0.0.1/8".into(),
    ]));
    let f = fetch_one(&m, &[5]).await;
    // 10.0.0.1/8 is masked to 10.0.0.0/8, with a warning.
    assert_eq!(shown(&f), ["10.0.0.0/8", "198.51.100.7/32", "203.0.113.0/24"]);
    assert_eq!((f.entries, f.skipped), (3, 3));
    let logs = log_text();
    assert!(logs.contains("skipping invalid entry") && logs.contains(r#"entry="bogus""#), "{logs}");
    assert!(logs.contains("entry=10.0.0.1/8"), "{logs}");

    // Elements that are not strings are invalid entries too.
    m.clear_faults();
    m.inject(Fault::Body(
        r#"{"ActionStatus":"OK","ErrorCode":0,"IPList":["192.0.2.1",5,null,["x"]]}"#.into(),
    ));
    let f = fetch_one(&m, &[5]).await;
    assert_eq!(shown(&f), ["192.0.2.1/32"]);
    assert_eq!((f.entries, f.skipped), (1, 3));
    assert_no_secrets(&m, &[&f]);
}

#[tokio::test]
async fn a_fetch_logs_in_a_span_that_names_its_source_and_nettype() {
    let m = mock().await;
    m.inject(Fault::ExtraEntries(vec!["span-marker-entry".into()]));
    let f = fetch_one(&m, &[6]).await;
    assert_eq!(f.skipped, 1);
    let logs = log_text();
    let line = logs.lines().find(|l| l.contains("span-marker-entry")).unwrap_or_else(|| panic!("{logs}"));
    assert!(
        line.contains("fetch{source=chat nettype=6}") && line.contains("skipping invalid entry"),
        "{line}"
    );
}

#[tokio::test]
async fn a_list_of_nothing_but_invalid_entries_is_an_error() {
    let m = mock().await;
    m.set_list(5, vec!["bogus".into(), "300.1.1.1".into()]);
    let f = fetch_one(&m, &[5]).await;
    assert_eq!(err(&f), &FetchError::AllInvalid { count: 2 });
    assert_eq!(err(&f).class(), ErrorClass::InvalidResponse);
    assert_no_secrets(&m, &[&f]);
}

#[tokio::test]
async fn an_empty_list_is_an_empty_success() {
    // Documented choice: the engine's safety guards decide about empty lists.
    let m = mock().await;
    m.inject(Fault::EmptyList);
    let f = fetch_one(&m, &[5, 6]).await;
    assert!(f.result.as_ref().unwrap().is_empty());
    assert_eq!((f.entries, f.skipped), (0, 0));
}

#[tokio::test]
async fn one_failed_nettype_fails_the_whole_source() {
    let m = mock().await;
    m.inject_times(Fault::ErrorCode(70500), 1);
    let f = fetch_one(&m, &[5, 6]).await;
    assert_eq!(err(&f).code(), Some(70500));
    assert_eq!(err(&f).class(), ErrorClass::Transient);
    assert_eq!(f.nettypes.iter().filter(|n| n.result.is_err()).count(), 1);
    assert_eq!(f.nettypes.iter().filter(|n| n.result.is_ok()).count(), 1);
    assert_no_secrets(&m, &[&f]);
}

#[tokio::test]
async fn static_sources_need_no_network() {
    let net: ipnet::IpNet = "192.0.2.0/24".parse().unwrap();
    let s = Sources::from_configs(
        &[SourceConfig { name: "office".into(), kind: SourceKind::Static(vec![net]) }],
        Default::default(),
    )
    .unwrap();
    let f = fetch_within(&s, Duration::from_secs(5)).await;
    assert_eq!(shown(&f), ["192.0.2.0/24"]);
    assert_eq!((f.entries, f.skipped), (1, 0));
}

// ---- faults -------------------------------------------------------------------------------

#[tokio::test]
async fn every_fault_ends_in_its_class_in_bounded_time() {
    let timeout = Duration::from_millis(800);
    let cases: Vec<(Fault, ErrorClass)> = vec![
        (Fault::Status(502), ErrorClass::Network),
        (Fault::Status(500), ErrorClass::Network),
        (Fault::Status(404), ErrorClass::Configuration),
        (Fault::Status(429), ErrorClass::RateLimited),
        (Fault::Hang, ErrorClass::Network),
        (Fault::Delay(Duration::from_secs(3)), ErrorClass::Network),
        (Fault::Dribble(Duration::from_millis(50)), ErrorClass::Network),
        (Fault::Garbage, ErrorClass::InvalidResponse),
        (Fault::Truncated, ErrorClass::Network),
        (Fault::Oversized, ErrorClass::InvalidResponse),
        (Fault::OversizedChunked, ErrorClass::InvalidResponse),
        (Fault::WrongTypes, ErrorClass::InvalidResponse),
        (Fault::Body(r#"{"ActionStatus":"OK","ErrorCode":0}"#.into()), ErrorClass::InvalidResponse),
        (Fault::Body(r#"{"ActionStatus":"FAIL","ErrorCode":0}"#.into()), ErrorClass::InvalidResponse),
        (Fault::Body("[]".into()), ErrorClass::InvalidResponse),
        (Fault::ErrorCode(60007), ErrorClass::RateLimited),
        (Fault::ErrorCode(60019), ErrorClass::RateLimited),
        (Fault::ErrorCode(60008), ErrorClass::Transient),
        (Fault::ErrorCode(70169), ErrorClass::Transient),
        (Fault::ErrorCode(70050), ErrorClass::Locked),
        (Fault::ErrorCode(60004), ErrorClass::Configuration),
        (Fault::ErrorCode(60021), ErrorClass::Configuration),
        (Fault::ErrorCode(70403), ErrorClass::Configuration),
        (Fault::ErrorCode(70001), ErrorClass::UsersigExpired),
        (Fault::ErrorCode(70052), ErrorClass::UsersigExpired),
    ];
    let m = mock().await;
    let mut results = Vec::new();
    for (fault, class) in cases {
        m.clear_faults();
        m.inject(fault.clone());
        let s = sources(chat_cfg(vec![m.url()], &[5], timeout));
        // At most two attempts (the 70001 retry), each bounded by the timeout.
        let f = fetch_within(&s, timeout * 3).await;
        let e = err(&f);
        assert_eq!(e.class(), class, "{fault:?}: {e}");
        if let Fault::ErrorCode(c) = fault {
            assert_eq!(e.code(), Some(c));
        }
        if matches!(fault, Fault::Oversized | Fault::OversizedChunked) {
            assert_eq!(e, &FetchError::BodyTooLarge { limit: 1024 * 1024 });
        }
        if matches!(fault, Fault::Hang | Fault::Delay(_) | Fault::Dribble(_)) {
            assert!(matches!(e, FetchError::Timeout { .. }), "{fault:?}: {e:?}");
        }
        results.push(f);
    }
    // A slow answer within the timeout is fine.
    m.clear_faults();
    m.inject(Fault::Delay(Duration::from_millis(200)));
    let f = fetch_one(&m, &[5]).await;
    assert_eq!(shown(&f), ["198.51.100.7/32", "203.0.113.0/24"]);
    assert_no_secrets(&m, &results.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn configuration_errors_name_the_fix() {
    let m = mock().await;
    // Another secret key: the mock cannot verify the signature.
    let mut cfg = chat_cfg(vec![m.url()], &[5], Duration::from_secs(2));
    cfg.secret_key = SecretKey::new("another key", "test");
    let f = fetch_within(&sources(cfg), Duration::from_secs(10)).await;
    assert_eq!(err(&f).code(), Some(70009));
    assert!(err(&f).to_string().contains("usersig minted with the wrong secret key"), "{}", err(&f));

    // An identifier that is not the admin (its usersig is valid).
    let mut cfg = chat_cfg(vec![m.url()], &[5], Duration::from_secs(2));
    cfg.identifier = "someone".into();
    let g = fetch_within(&sources(cfg), Duration::from_secs(10)).await;
    assert_eq!(err(&g).code(), Some(60010));
    assert!(
        err(&g)
            .to_string()
            .contains("the identifier someone is not an app administrator of SDKAppID 1400000000"),
        "{}",
        err(&g)
    );

    // Another SDKAppID.
    let mut cfg = chat_cfg(vec![m.url()], &[5], Duration::from_secs(2));
    cfg.sdkappid = 1400000001;
    let h = fetch_within(&sources(cfg), Duration::from_secs(10)).await;
    assert_eq!(err(&h).code(), Some(60006));
    for x in [&f, &g, &h] {
        assert_eq!(err(x).class(), ErrorClass::Configuration);
    }
    assert_no_secrets(&m, &[&f, &g, &h]);
}

// ---- retries ------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_usersig_is_reminted_and_retried_once() {
    let m = mock().await;
    m.inject_times(Fault::ErrorCode(70001), 1);
    let f = fetch_one(&m, &[5]).await;
    assert_eq!(shown(&f), ["198.51.100.7/32", "203.0.113.0/24"]);
    let reqs = m.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!((reqs[0].error_code, reqs[1].error_code), (Some(70001), Some(0)));
    let (a, b) = (reqs[0].param("usersig").unwrap(), reqs[1].param("usersig").unwrap());
    assert_ne!(a, b, "the retry must carry a new usersig");
    let now = clock::now_unix();
    usersig::verify(b, APP, ADMIN, KEY, now + 1).unwrap();
    assert_no_secrets(&m, &[&f]);
}

#[tokio::test]
async fn a_usersig_still_expired_after_reminting_is_reported() {
    let m = mock().await;
    // The mock's clock is two days ahead: every usersig valid for a day looks expired.
    m.set_clock_offset(2 * 86_400);
    let f = fetch_one(&m, &[5]).await;
    assert_eq!(err(&f).code(), Some(70001));
    assert_eq!(err(&f).class(), ErrorClass::UsersigExpired);
    assert_eq!(m.request_count(), 2, "exactly one retry");
    assert!(log_text().contains("check this host's clock"));
    assert_no_secrets(&m, &[&f]);
}

/// An address where nothing listens.
async fn closed_endpoint() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn the_backup_endpoint_is_tried_when_the_primary_cannot_be_reached() {
    let m = mock().await;
    let closed = closed_endpoint().await;
    let s = sources(chat_cfg(vec![closed.clone(), m.url()], &[5, 6], Duration::from_secs(2)));
    let f = fetch_within(&s, Duration::from_secs(10)).await;
    assert_eq!(shown(&f), ["192.0.2.128/25", "198.51.100.7/32", "203.0.113.0/24", "2001:db8::/48"]);
    assert_eq!(m.request_count(), 2);
    assert!(log_text().contains("trying the backup endpoint"));

    // Both unreachable: a network error naming the (redacted) URL, no panic.
    let s = sources(chat_cfg(vec![closed.clone(), closed], &[5], Duration::from_secs(2)));
    let g = fetch_within(&s, Duration::from_secs(10)).await;
    assert!(matches!(err(&g), FetchError::Connect { .. }), "{:?}", err(&g));
    assert_eq!(err(&g).class(), ErrorClass::Network);
    assert!(err(&g).to_string().contains("usersig=REDACTED"), "{}", err(&g));

    // The backup is not used for an answer that is an error: that is the service speaking.
    m.inject(Fault::Status(502));
    let other = MockChatApi::start(MockConfig::new(APP, ADMIN, KEY)).await.unwrap();
    let s = sources(chat_cfg(vec![m.url(), other.url()], &[5], Duration::from_secs(2)));
    let h = fetch_within(&s, Duration::from_secs(10)).await;
    assert_eq!(
        err(&h),
        &FetchError::Http {
            status: 502,
            url: match err(&h) {
                FetchError::Http { url, .. } => url.clone(),
                _ => unreachable!(),
            }
        }
    );
    assert_eq!(other.request_count(), 0);
    assert_no_secrets(&m, &[&f, &g, &h]);
}

// ---- the mock itself, as a client would see it ---------------------------------------------

#[tokio::test]
async fn the_mock_checks_requests_like_the_service() {
    let m = mock().await;
    let client = reqwest::Client::new();
    let now = clock::now_unix();
    let good = usersig::mint(APP, ADMIN, KEY, 3600, now);
    let code = |q: Vec<(&'static str, String)>, method: reqwest::Method, body: &'static str| {
        let client = client.clone();
        let url = format!("{}/v4/ConfigSvc/GetIPList", m.url());
        async move {
            let url = reqwest::Url::parse_with_params(&url, &q).unwrap();
            let resp = client.request(method, url).body(body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
            v["ErrorCode"].as_i64().unwrap()
        }
    };
    let q = |sig: &str, random: &str, nettype: &str, content: &str| {
        vec![
            ("sdkappid", APP.to_string()),
            ("identifier", ADMIN.to_string()),
            ("usersig", sig.to_string()),
            ("random", random.to_string()),
            ("contenttype", content.to_string()),
            ("nettype", nettype.to_string()),
        ]
    };
    let post = reqwest::Method::POST;
    assert_eq!(code(q(good.expose(), "4294967295", "5", "json"), post.clone(), "{}").await, 0);
    assert_eq!(code(q(good.expose(), "1", "5", "json"), reqwest::Method::GET, "{}").await, 60002);
    assert_eq!(code(q(good.expose(), "4294967296", "5", "json"), post.clone(), "{}").await, 60002);
    assert_eq!(code(q(good.expose(), "-1", "5", "json"), post.clone(), "{}").await, 60002);
    assert_eq!(code(q(good.expose(), "1", "7", "json"), post.clone(), "{}").await, 60002);
    assert_eq!(code(q(good.expose(), "1", "5", "xml"), post.clone(), "{}").await, 60002);
    assert_eq!(code(q(good.expose(), "1", "5", "json"), post.clone(), "").await, 60003);
    let expired = usersig::mint(APP, ADMIN, KEY, 60, now - 3600);
    assert_eq!(code(q(expired.expose(), "1", "5", "json"), post.clone(), "{}").await, 70001);
    let other_app = usersig::mint(APP + 1, ADMIN, KEY, 3600, now);
    assert_eq!(code(q(other_app.expose(), "1", "5", "json"), post.clone(), "{}").await, 70014);
    let other_id = usersig::mint(APP, "someone", KEY, 3600, now);
    assert_eq!(code(q(other_id.expose(), "1", "5", "json"), post.clone(), "{}").await, 70013);
    let other_key = usersig::mint(APP, ADMIN, "not the key", 3600, now);
    assert_eq!(code(q(other_key.expose(), "1", "5", "json"), post.clone(), "{}").await, 70009);
    assert_eq!(code(q("garbage", "1", "5", "json"), post.clone(), "{}").await, 70003);
    let mut no_sig = q("", "1", "5", "json");
    no_sig.retain(|(k, _)| *k != "usersig");
    assert_eq!(code(no_sig, post.clone(), "{}").await, 60004);
    assert_eq!(m.request_count(), 13);
    m.shutdown().await;
}

#[test]
fn a_bad_ca_file_is_refused_when_the_sources_are_built() {
    use allowsync::source::SourceError;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = chat_cfg(vec!["https://127.0.0.1:1".into()], &[5], Duration::from_secs(2));
    cfg.ca_file = Some(dir.path().join("missing.pem"));
    let build = |cfg: TencentChatConfig| {
        Sources::from_configs(
            &[SourceConfig { name: "chat".into(), kind: SourceKind::TencentChat(Box::new(cfg)) }],
            Default::default(),
        )
    };
    assert!(matches!(build(cfg.clone()), Err(SourceError::CaFileRead { .. })));
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    cfg.ca_file = Some(garbage);
    assert!(matches!(build(cfg), Err(SourceError::CaFile { .. })));
}
