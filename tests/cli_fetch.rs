//! `allowsync fetch`, `allowsync plan` and `allowsync usersig` end to end: the real binary, a
//! configuration file (dry-run backend) and the mock Chat API.

use std::path::Path;
use std::process::{Command, Output};

use allowsync::clock;
use allowsync::usersig;
use allowsync_testkit::mock::{Fault, MockChatApi, MockConfig};

const KEY: &str = "cli-test-secret-key-0123456789";

fn write_config(dir: &Path, endpoint: &str) -> std::path::PathBuf {
    write_config_with_key(dir, endpoint, &format!("{KEY}\n"))
}

/// As [`write_config`], with `key_file` as the key file's content.
fn write_config_with_key(dir: &Path, endpoint: &str, key_file: &str) -> std::path::PathBuf {
    let key = dir.join("chat.key");
    std::fs::write(&key, key_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "sources:\n  - name: chat\n    tencent_chat:\n      endpoint: {endpoint}\n      sdkappid: 1400000000\n      identifier: administrator\n      secret_key_file: chat.key\n      timeout: 2s\n  - name: office\n    static: [\"192.0.2.0/24\"]\nbackend:\n  dry_run: {{}}\nstate_file: state.json\n"
        ),
    )
    .unwrap();
    cfg
}

/// Runs the binary off the async runtime, so that the in-process mock keeps serving.
async fn run(cfg: &Path, args: &[&str]) -> Output {
    run_env(cfg, args, &[]).await
}

/// As [`run`], with the proxy variables cleared and then `env` set.
async fn run_env(cfg: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_allowsync"));
    cmd.arg("-c").arg(cfg).args(args).env("RUST_LOG", "debug");
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("the command took too long")
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_prints_every_source_and_exits_by_outcome() {
    let mut mc = MockConfig::new(1400000000, "administrator", KEY);
    mc.lists.insert(5, vec!["203.0.113.0/24".into(), "198.51.100.7".into(), "bogus".into()]);
    mc.lists.insert(6, vec!["2001:db8::/48".into()]);
    let mock = MockChatApi::start(mc).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &mock.url());

    let out = run(&cfg, &["fetch"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("source chat: ok, 3 entries, 1 skipped, 3 prefixes"), "{stdout}");
    assert!(
        stdout.contains(
            "  nettype 5: 2 entries, 1 skipped, 2 prefixes\n    198.51.100.7/32\n    203.0.113.0/24\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("  nettype 6: 1 entries, 0 skipped, 1 prefixes\n    2001:db8::/48\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("source office: ok, 1 entries, 0 skipped, 1 prefixes\n  192.0.2.0/24\n"),
        "{stdout}"
    );
    assert!(stderr.contains("skipping invalid entry"), "{stderr}");
    assert_eq!(mock.request_count(), 2);

    // A failing source: exit 1, the error and its class printed.
    mock.inject(Fault::ErrorCode(60021));
    let out = run(&cfg, &["fetch"]).await;
    let stdout2 = String::from_utf8_lossy(&out.stdout);
    let stderr2 = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout2}\n{stderr2}");
    assert!(stdout2.contains("source chat: FAILED (configuration): Chat API error 60021"), "{stdout2}");
    assert!(stdout2.contains("not allowed to call the REST API"), "{stdout2}");

    for text in [&stdout, &stderr, &stdout2, &stderr2] {
        assert!(!text.contains(KEY));
        for req in mock.requests() {
            assert!(!text.contains(req.param("usersig").unwrap()), "a usersig leaked: {text}");
        }
    }
}

fn mock_config() -> MockConfig {
    let mut mc = MockConfig::new(1400000000, "administrator", KEY);
    mc.lists.insert(5, vec!["203.0.113.0/24".into()]);
    mc.lists.insert(6, vec!["2001:db8::/48".into()]);
    mc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_exits_1_when_a_source_failed_and_still_prints_the_plan() {
    let mock = MockChatApi::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &mock.url());
    let out = run(&cfg, &["plan"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict: would apply 3 additions and 0 removals"), "{stdout}");

    mock.inject(Fault::Status(502));
    let out = run(&cfg, &["plan"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "as once would: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("source chat: HTTP 502"), "{stdout}");
    assert!(stdout.contains("no last good list, so nothing is removed this cycle"), "{stdout}");
    assert!(stdout.contains("ipv4: +1 -0\n  + 192.0.2.0/24\n"), "{stdout}");
    assert!(stdout.contains("verdict: would apply 1 additions and 0 removals"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_with_a_byte_order_mark_still_signs_right() {
    let mock = MockChatApi::start(mock_config()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config_with_key(dir.path(), &mock.url(), &format!("\u{feff}{KEY}\n"));
    let out = run(&cfg, &["fetch"]).await;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("source chat: ok, 2 entries"), "{stdout}");
    assert!(stderr.contains("starts with a UTF-8 byte order mark (BOM): ignored"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usersig_prints_a_valid_usersig_and_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9");
    let before = clock::now_unix();
    let out = run(&cfg, &["usersig", "--source", "chat"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let sig = stdout.lines().find_map(|l| l.strip_prefix("usersig: ")).expect("a usersig line");
    let doc = usersig::verify(sig, 1400000000, "administrator", KEY, clock::now_unix()).unwrap();
    assert!(doc.time >= before);
    // The default usersig_ttl is a day.
    assert_eq!(doc.expire, 86_400);
    let expiry = doc.time + doc.expire;
    let line = stdout.lines().find_map(|l| l.strip_prefix("expires: ")).expect("an expiry line");
    assert_eq!(line, format!("{} ({expiry} Unix seconds)", clock::rfc3339(expiry)));

    for (name, msg) in [("office", "is not a tencent_chat source"), ("nope", "no source named \"nope\"")] {
        let out = run(&cfg, &["usersig", "--source", name]).await;
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(msg));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_and_no_proxy_are_honoured() {
    // The "proxy" is a mock: it records the CONNECT it receives and refuses it.
    let proxy = MockChatApi::start(MockConfig::new(1, "x", "y")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "https://chat.invalid");
    let out = run_env(&cfg, &["fetch"], &[("HTTPS_PROXY", &proxy.url())]).await;
    assert_eq!(out.status.code(), Some(1));
    let reqs = proxy.requests();
    // One per nettype (5 and 6).
    assert_eq!(reqs.len(), 2, "the requests did not go through HTTPS_PROXY");
    for r in &reqs {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("CONNECT", "chat.invalid:443"));
    }

    let out = run_env(&cfg, &["fetch"], &[("HTTPS_PROXY", &proxy.url()), ("NO_PROXY", "chat.invalid")]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(proxy.request_count(), 2, "NO_PROXY was not honoured");
}
