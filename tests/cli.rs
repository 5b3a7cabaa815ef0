//! The command line as an operator meets it: help, check-config, exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn allowsync(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_allowsync")).args(args).env_remove("ALLOWSYNC_CONFIG").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p).display().to_string()
}

#[test]
fn help_lists_every_command() {
    let o = allowsync(&["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for cmd in ["run", "once", "plan", "fetch", "check-config", "status", "teardown", "usersig"] {
        assert!(t.lines().any(|l| l.trim_start().starts_with(cmd)), "{cmd} missing from:\n{t}");
    }
    assert!(t.contains("Exit codes"), "{t}");
    let o = allowsync(&["once", "--help"]);
    assert!(text(&o).contains("--force"));
}

#[test]
fn the_demo_configuration_is_valid() {
    let o = allowsync(&["-c", &repo("config/demo.yaml"), "check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("chat-demo: tencent_chat sdkappid 1400000000"), "{t}");
    assert!(t.contains("backend nftables: table inet allowsync"), "{t}");
    let key = std::fs::read_to_string(repo("config/demo.key")).unwrap();
    assert!(!t.contains(key.trim()), "the key must not be printed");
}

#[test]
fn the_example_configuration_fails_only_for_its_key_file() {
    let o = allowsync(&["-c", &repo("config/allowsync.yaml"), "check-config"]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains("sources[0].tencent_chat.secret_key_file: cannot read the secret key file /etc/allowsync/chat-sgp.key"), "{t}");
    // With the key file present, it is valid.
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(repo("config/allowsync.yaml"))
        .unwrap()
        .replace("/etc/allowsync/chat-sgp.key", "chat-sgp.key");
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    std::fs::write(dir.path().join("chat-sgp.key"), "k").unwrap();
    let o = allowsync(&["-c", &dir.path().join("config.yaml").display().to_string(), "check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn an_unknown_key_exits_2_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(
        &p,
        "interval: 5m\nsources:\n  - name: a\n    static: [10.0.0.1]\nsafety:\n  max_removal_prcent: 10\n",
    )
    .unwrap();
    let o = allowsync(&["-c", &p.display().to_string(), "check-config"]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains(&format!("{}:6:3: safety.max_removal_prcent: unknown field", p.display())), "{t}");
}

#[test]
fn a_missing_file_and_bad_usage_exit_2() {
    let o = allowsync(&["-c", "/nonexistent/allowsync.yaml", "check-config"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/nonexistent/allowsync.yaml: cannot read"));
    assert_eq!(allowsync(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn the_config_file_comes_from_the_environment_too() {
    let o = Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .arg("check-config")
        .env("ALLOWSYNC_CONFIG", repo("config/demo.yaml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// `check-config` of the example configuration as under systemd: `$CREDENTIALS_DIRECTORY`
/// holding `chat-sgp.key` with `key`.
fn check_config_with_credential(key: &str) -> (std::process::Output, tempfile::TempDir) {
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("chat-sgp.key"), key).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .args(["-c", &repo("config/allowsync.yaml"), "check-config"])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .env_remove("ALLOWSYNC_CONFIG")
        .output()
        .unwrap();
    (o, creds)
}

#[test]
fn under_systemd_the_credential_copy_of_the_key_is_read() {
    // The example names /etc/allowsync/chat-sgp.key, absent here; the unit's LoadCredential=
    // copy in $CREDENTIALS_DIRECTORY stands in for it.
    let (o, creds) = check_config_with_credential("credential-key");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("key from file {}", creds.path().join("chat-sgp.key").display())),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("credential-key"));
}

#[test]
fn under_systemd_a_missing_key_file_is_named() {
    // The unit's SetCredential= fallback: LoadCredential= found no /etc/allowsync/chat-sgp.key
    // and systemd handed over a blank credential instead of failing the start.
    let (o, _creds) = check_config_with_credential("\n");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("the secret key file /etc/allowsync/chat-sgp.key is missing or empty"),
        "{}",
        text(&o)
    );
}
