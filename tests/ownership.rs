//! Never touching what allowsync did not create, through the real binary, the mock Chat API and
//! the kernel's nftables, each test in a network namespace of its own: an operator's ruleset in
//! any family left exactly as it was (before/after dumps), a chain named like the enforcement
//! chain, a configuration change that moves to other objects in one commit (seen with `nft
//! monitor`), and one manager per set. What both backends must do is in `conformance.rs`.

use std::path::Path;
use std::time::Duration;

use allowsync::prefixes::{Addr, AllowSet};
use allowsync_testkit::daemon::{Env, Finished, Setup, setup_with, signal, stop, strings, wait_until};
use allowsync_testkit::netns::{NftMonitor, nft_script, nft_set_elements, run};
use allowsync_testkit::set;

const KEY: &str = "ownership-test-secret-key";
const LIST5: &[&str] = &["203.0.113.0/25", "198.51.100.7"];
const LIST6: &[&str] = &["192.0.2.0/24", "2001:db8:6::/48"];
const DEFAULT_BACKEND: &str = "nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6 }";
const T: Duration = Duration::from_secs(20);

/// An environment whose configuration has `backend` in place of the default nftables backend.
fn setup(backend: &str) -> Option<Env> {
    let lists = [(5, strings(LIST5)), (6, strings(LIST6))].into();
    setup_with(Setup::new(KEY, lists), |yaml| *yaml = yaml.replace(DEFAULT_BACKEND, backend))
}

fn full_list() -> AllowSet {
    set([LIST5, LIST6].concat())
}

/// Inclusive address ranges, both families, sorted.
type IpRanges = Vec<(std::net::IpAddr, std::net::IpAddr)>;

/// What sets `v4` and `v6` (`family table set` each) hold, as nft lists them.
fn held(v4: (&str, &str, &str), v6: (&str, &str, &str)) -> IpRanges {
    let mut out = nft_set_elements(v4.0, v4.1, v4.2);
    out.extend(nft_set_elements(v6.0, v6.1, v6.2));
    out.sort();
    out
}

/// The full list as [`held`] shows it.
fn full() -> IpRanges {
    let l = full_list();
    let mut out: IpRanges = l.v4.iter().map(|r| (r.start.to_ip(), r.end.to_ip())).collect();
    out.extend(l.v6.iter().map(|r| (r.start.to_ip(), r.end.to_ip())));
    out.sort();
    out
}

fn tables() -> Vec<String> {
    run("nft", &["list", "tables"]).lines().map(String::from).collect()
}

fn output(f: &Finished) -> String {
    format!("exit {:?}\n{}{}", f.code, f.stdout, f.stderr)
}

/// Rewrites the configuration file: `from` replaced by `to`.
fn edit_config(env: &Env, from: &str, to: &str) {
    let yaml = std::fs::read_to_string(&env.cfg).unwrap();
    assert!(yaml.contains(from), "{from} not in\n{yaml}");
    std::fs::write(&env.cfg, yaml.replace(from, to)).unwrap();
}

const OPERATOR_INET_FILTER: &str = "table inet filter {
  set chat_v4 { type ipv4_addr; flags interval; }
  set chat_v6 { type ipv6_addr; flags interval; }
  counter webhooks { }
  chain input {
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
    tcp dport 22 accept
    tcp dport 443 ip saddr @chat_v4 counter name webhooks accept
    tcp dport 443 ip6 saddr @chat_v6 accept
  }
  chain forward { type filter hook forward priority 0; policy drop; }
}
";

#[test]
fn the_operators_inet_filter_table_is_filled_and_teardown_leaves_it_byte_identical() {
    let Some(env) = setup("nftables: { table: filter, set_v4: chat_v4, set_v6: chat_v6 }") else { return };
    nft_script(OPERATOR_INET_FILTER);
    let before = run("nft", &["-j", "list", "table", "inet", "filter"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(held(("inet", "filter", "chat_v4"), ("inet", "filter", "chat_v6")), full());
    assert_eq!(tables(), ["table inet filter"], "nothing of allowsync's own was created");

    let o = env.command(&["teardown"], T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(run("nft", &["-j", "list", "table", "inet", "filter"]), before, "teardown changed the table");
    assert!(!o.stdout.contains("removed "), "{}", output(&o));
    assert!(o.stdout.contains("emptied set inet filter chat_v4"), "{}", output(&o));
    assert!(o.stdout.contains("emptied set inet filter chat_v6"), "{}", output(&o));
    assert!(
        o.stdout.contains(
            "left table inet filter: allowsync did not create it (it has no comment \"managed by allowsync\")"
        ),
        "{}",
        output(&o)
    );
}

#[test]
fn an_operators_base_chain_named_like_the_enforcement_chain_is_never_changed() {
    let backend = "nftables: { table: filter, set_v4: chat_v4, set_v6: chat_v6 }";
    let Some(env) = setup(backend) else { return };
    nft_script(
        "table inet filter {
           set chat_v4 { type ipv4_addr; flags interval; }
           set chat_v6 { type ipv6_addr; flags interval; }
           chain enforce { type filter hook input priority 0; policy drop; iifname \"lo\" accept; tcp dport 22 accept; }
         }\n",
    );
    let chain = || run("nft", &["-j", "list", "chain", "inet", "filter", "enforce"]);
    let before = chain();

    // Without `enforce`: the sets are filled, the chain neither deleted, flushed nor re-policied.
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(chain(), before);
    assert_eq!(held(("inet", "filter", "chat_v4"), ("inet", "filter", "chat_v6")), full());
    let o = env.command(&["teardown"], T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(chain(), before);

    // With `enforce`: a clear error naming the chain and the fix, and nothing changes at all.
    edit_config(&env, "set_v6: chat_v6 }", "set_v6: chat_v6, enforce: { tcp_ports: [443] } }");
    let table = run("nft", &["-j", "list", "table", "inet", "filter"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    let want = "chain inet filter enforce exists (type filter hook input priority 0) and allowsync did not create it (it has no comment \"managed by allowsync\")";
    assert!(o.stderr.contains(want), "{}", output(&o));
    assert!(o.stderr.contains("rename your chain"), "{}", output(&o));
    assert_eq!(run("nft", &["-j", "list", "table", "inet", "filter"]), table);
}

#[test]
fn operator_sets_in_ip_and_ip6_tables_are_filled_and_no_inet_table_appears() {
    let backend = r#"nftables: { set_v4: "ip filter chat_v4", set_v6: "ip6 filter chat_v6" }"#;
    let Some(env) = setup(backend) else { return };
    nft_script(
        "table ip filter {
           set chat_v4 { type ipv4_addr; flags interval; }
           chain input { type filter hook input priority 0; tcp dport 443 ip saddr != @chat_v4 drop; }
         }
         table ip6 filter {
           set chat_v6 { type ipv6_addr; flags interval; }
           chain input { type filter hook input priority 0; tcp dport 443 ip6 saddr != @chat_v6 drop; }
         }\n",
    );
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(held(("ip", "filter", "chat_v4"), ("ip6", "filter", "chat_v6")), full());
    assert_eq!(tables(), ["table ip filter", "table ip6 filter"], "no inet filter (nor inet allowsync)");

    // A missing operator set or table is an error naming it; nothing is created elsewhere.
    run("nft", &["delete", "chain", "ip6", "filter", "input"]);
    run("nft", &["delete", "set", "ip6", "filter", "chat_v6"]);
    let ruleset = run("nft", &["list", "ruleset"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert!(o.stderr.contains("set ip6 filter chat_v6 does not exist"), "{}", output(&o));
    assert_eq!(run("nft", &["list", "ruleset"]), ruleset);
    run("nft", &["delete", "table", "ip6", "filter"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert!(o.stderr.contains("table ip6 filter does not exist"), "{}", output(&o));
    assert_eq!(tables(), ["table ip filter"]);

    // A set that cannot hold ranges is refused in nft's words.
    run("nft", &["add", "table", "ip6", "filter"]);
    run("nft", &["add", "set", "ip6", "filter", "chat_v6", "{ type ipv6_addr; }"]);
    let o = env.once(T);
    assert_eq!(o.code, Some(1), "{}", output(&o));
    assert!(o.stderr.contains("set ip6 filter chat_v6 lacks `flags interval`"), "{}", output(&o));
    assert!(
        o.stderr.contains("declare it as `set chat_v6 { type ipv6_addr; flags interval; }`"),
        "{}",
        output(&o)
    );
    assert!(!o.stderr.contains("0x"), "{}", output(&o));
}

/// Starts the daemon on `before` (a piece of the configuration), changes it to `after` and sends
/// SIGHUP; returns the transactions `nft monitor` saw from then on, and the daemon.
fn reload(env: &Env, before: &str, after: &str) -> (Vec<Vec<String>>, std::process::Child) {
    let d = env.spawn();
    env.wait_syncs(0, T);
    let monitor = NftMonitor::start();
    edit_config(env, before, after);
    signal(&d, libc::SIGHUP);
    env.wait_syncs(1, T);
    // The reload's sync is logged after its commits: a commit of our own after that, once seen,
    // means the monitor has reported everything before it.
    monitor.barrier();
    (monitor.transactions(), d)
}

/// The one transaction of `txs` with a line containing `needle`.
fn the_one_with<'a>(txs: &'a [Vec<String>], needle: &str) -> &'a [String] {
    let found: Vec<&Vec<String>> = txs.iter().filter(|t| t.iter().any(|l| l.contains(needle))).collect();
    assert_eq!(found.len(), 1, "{needle:?} in {} transactions: {txs:#?}", found.len());
    found[0]
}

fn assert_has(tx: &[String], wanted: &[&str]) {
    for w in wanted {
        assert!(tx.iter().any(|l| l.contains(w)), "{w:?} not in the transaction {tx:#?}");
    }
}

#[test]
fn sighup_from_table_a_to_table_b_is_one_commit_and_a_restart_likewise() {
    let enforce = "enforce: { tcp_ports: [443] }";
    let Some(env) = setup(&format!("nftables: {{ table: table_a, {enforce} }}")) else { return };
    let (txs, d) = reload(&env, "table: table_a", "table: table_b");
    let tx = the_one_with(&txs, "delete table inet table_a");
    assert_has(
        tx,
        &[
            "add table inet table_b",
            "add set inet table_b allow_v4",
            "add set inet table_b allow_v6",
            "element inet table_b allow_v4 {",
            "element inet table_b allow_v6 {",
            "add chain inet table_b enforce",
            "add rule inet table_b enforce",
        ],
    );
    // Nothing else of B's was committed apart: its elements came with it.
    the_one_with(&txs, "table_b");
    assert_eq!(tables(), ["table inet table_b"]);
    assert_eq!(held(("inet", "table_b", "allow_v4"), ("inet", "table_b", "allow_v6")), full());
    stop(d);
    let state = env.state();
    assert!(state.contains("\"table inet table_b\"") && !state.contains("table_a"), "{state}");

    // A restart with a changed file cleans up the same way.
    edit_config(&env, "table: table_b", "table: table_c");
    let o = env.once(T);
    assert_eq!(o.code, Some(0), "{}", output(&o));
    assert_eq!(tables(), ["table inet table_c"]);
    assert_eq!(held(("inet", "table_c", "allow_v4"), ("inet", "table_c", "allow_v6")), full());
}

#[test]
fn sighup_renaming_a_set_is_one_commit() {
    let backend =
        "nftables: { table: allowsync, set_v4: allow_v4, set_v6: allow_v6, enforce: { tcp_ports: [443] } }";
    let Some(env) = setup(backend) else { return };
    let (txs, d) = reload(&env, "set_v4: allow_v4", "set_v4: chat_v4");
    let tx = the_one_with(&txs, "delete set inet allowsync allow_v4");
    assert_has(
        tx,
        &["add set inet allowsync chat_v4", "element inet allowsync chat_v4 {", "ip saddr != @chat_v4 drop"],
    );
    the_one_with(&txs, "chat_v4");
    let listing = run("nft", &["list", "table", "inet", "allowsync"]);
    assert!(!listing.contains("allow_v4"), "{listing}");
    assert_eq!(held(("inet", "allowsync", "chat_v4"), ("inet", "allowsync", "allow_v6")), full());
    stop(d);
}

#[test]
fn a_second_allowsync_on_the_same_sets_is_refused_whatever_its_state_file() {
    let Some(env) = setup(DEFAULT_BACKEND) else { return };
    let d = env.start(&full_list());
    let other = env.dir.path().join("other.yaml");
    let yaml = std::fs::read_to_string(&env.cfg)
        .unwrap()
        .replace("state_file: state.json", "state_file: other.json");
    std::fs::write(&other, yaml).unwrap();
    let want = format!(
        "another allowsync (pid {}, configuration {}) already manages table inet allowsync",
        d.id(),
        env.cfg.display()
    );
    for command in ["run", "once", "teardown"] {
        let o = env.command_with(&other, &[command], T);
        assert_eq!(o.code, Some(1), "{command}: {}", output(&o));
        assert!(o.stderr.contains(&want), "{command}: {}", output(&o));
    }
    assert_eq!(env.kernel(), full_list(), "the table and sets stay");
    assert!(!Path::new(&env.dir.path().join("other.json")).exists(), "the second one wrote nothing");

    // The same names in another network namespace are other objects: not blocked.
    {
        let elsewhere = setup(DEFAULT_BACKEND).expect("namespaces work here: this test has one");
        let o = elsewhere.once(T);
        assert_eq!(o.code, Some(0), "{}", output(&o));
    }
    stop(d);
    let o = env.command_with(&other, &["once"], T);
    assert_eq!(o.code, Some(0), "released with the first one: {}", output(&o));
    assert!(wait_until(Duration::from_secs(1), || env.kernel() == full_list()));
}
