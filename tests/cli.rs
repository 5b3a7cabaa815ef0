//! The command line as an operator meets it: help, check-config, exit codes, error messages.

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
    assert!(t.contains("backend nftables: own table inet allowsync, set inet allowsync allow_v4 and set inet allowsync allow_v6"), "{t}");
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
    assert!(text(&o).contains("metrics: no listener, no textfile"), "{}", text(&o));
    // Its metrics block, uncommented, is valid too.
    let yaml = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    let yaml = ["metrics:", "listen:", "allow_remote:", "textfile:"]
        .iter()
        .fold(yaml, |y, k| y.replace(&format!("# {k}"), k).replace(&format!("#   {k}"), &format!("  {k}")));
    std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
    let o = allowsync(&["-c", &dir.path().join("config.yaml").display().to_string(), "check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("metrics: GET /metrics and /healthz on 127.0.0.1:9733, textfile /var/lib/prometheus/node-exporter/allowsync.prom"),
        "{}",
        text(&o)
    );
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

/// A configuration with one static source, the dry-run backend and `state_file`.
fn dry_run_config(dir: &Path, state_file: &Path) -> String {
    let p = dir.join("c.yaml");
    let yaml = format!(
        "sources:\n  - name: a\n    static: [10.0.0.1]\nbackend:\n  dry_run: {{}}\nstate_file: {}\n",
        state_file.display()
    );
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

/// `allowsync -c CFG once`: its exit code and its whole stderr.
fn once(cfg: &str) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_allowsync"))
        .args(["-c", cfg, "once"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn an_io_error_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    // The state directory is a regular file: the lock file cannot be created.
    std::fs::write(dir.path().join("file"), "").unwrap();
    let state = dir.path().join("file/sub/state.json");
    let got = once(&dry_run_config(dir.path(), &state));
    let want = format!("allowsync: lock file {}.lock: Not a directory (os error 20)\n", state.display());
    assert_eq!(got, (Some(1), want));
    // The state file is a directory: it cannot be read.
    let state = dir.path().join("state.json");
    std::fs::create_dir(&state).unwrap();
    let got = once(&dry_run_config(dir.path(), &state));
    let want = format!("allowsync: state file {}: read: Is a directory (os error 21)\n", state.display());
    assert_eq!(got, (Some(1), want));
}

#[test]
fn a_read_only_state_directory_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state/state.json");
    std::fs::create_dir(dir.path().join("state")).unwrap();
    let cfg = dry_run_config(dir.path(), &state);
    // A read-only bind mount of the state directory, in a mount namespace of its own.
    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" once"#;
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(dir.path().join("state"))
        .args([env!("CARGO_BIN_EXE_allowsync"), &cfg])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    if stderr.starts_with("unshare:") || stderr.starts_with("mount:") {
        assert!(std::env::var_os("CI").is_none(), "must run in CI: {stderr}");
        eprintln!("skipping: needs root for a mount namespace ({stderr})");
        return;
    }
    let want =
        format!("allowsync: lock file {}.lock: Read-only file system (os error 30)\n", state.display());
    assert_eq!((o.status.code(), stderr.into_owned()), (Some(1), want));
}

#[test]
fn a_symlinked_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let target = dir.path().join("elsewhere.json");
    std::os::unix::fs::symlink(&target, &state).unwrap();
    let got = once(&dry_run_config(dir.path(), &state));
    let want = format!(
        "allowsync: state file {} is a symbolic link (to {}): allowsync does not follow it; set state_file to the file itself\n",
        state.display(),
        target.display()
    );
    assert_eq!(got, (Some(1), want));
    assert!(!target.exists(), "nothing written through the link");
    assert!(std::fs::symlink_metadata(&state).unwrap().file_type().is_symlink());
}
