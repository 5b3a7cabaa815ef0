//! The nftables backend against the real kernel. Every test runs in a network namespace of its
//! own (see `common/netns.rs`), so it can create and break nftables objects freely; `nft` is
//! used only to inspect the result and to cause drift, as an operator would.
//!
//! Only what is particular to nftables is here (the ruleset generation, the enforcement chain's
//! idempotency, the edges of the interval encoding); what every backend must do is in
//! `conformance.rs`.

use std::net::IpAddr;

use allowsync::backend::nftables::{ENFORCE_CHAIN, NftablesBackend, enforce_chain_text, enforce_rule_text};
use allowsync::backend::{Backend, BackendError};
use allowsync::config::{Enforce, EnforceScope, NftablesConfig};
use allowsync::prefixes::{AllowSet, Diff, Ranges};
use allowsync_testkit::netns::{self, current_netns_id, enter_new_netns, nft_script, run};
use allowsync_testkit::{set, sync};

const TABLE: &str = "allowsync";

fn config(enforce: Option<Enforce>) -> NftablesConfig {
    NftablesConfig { table: TABLE.into(), set_v4: "allow_v4".into(), set_v6: "allow_v6".into(), enforce }
}

fn backend(enforce: Option<Enforce>) -> NftablesBackend {
    NftablesBackend::new(&config(enforce)).unwrap()
}

/// Inclusive address ranges, family-independent.
type IpRanges = Vec<(IpAddr, IpAddr)>;

/// The elements of a set as `nft -j` lists them, as inclusive address ranges, sorted.
fn nft_elements(set: &str) -> IpRanges {
    netns::nft_set_elements("inet", TABLE, set)
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
fn every_commit_changes_the_generation_and_an_empty_diff_sends_nothing() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut b = backend(None);
    b.ensure().unwrap();
    let gen_before = b.generation().unwrap().unwrap();
    sync(&mut b, &set(["10.0.0.0/24", "2001:db8::/48"]));
    let gen_after = b.generation().unwrap().unwrap();
    assert_ne!(gen_before, gen_after, "a commit changes the generation");

    // An empty diff sends nothing: the generation stays.
    b.apply(&Diff::default()).unwrap();
    assert_eq!(b.generation().unwrap().unwrap(), gen_after);
    // Anyone else's commit moves it.
    run("nft", &["add", "table", "inet", "someone_else"]);
    assert_ne!(b.generation().unwrap().unwrap(), gen_after);
}

#[test]
fn foreign_sets_and_chains_are_reported_and_left_alone() {
    let Some(_ns) = enter_new_netns() else { return };
    // (A set without `flags interval` is in the conformance suite.)
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
        matches!(&err, BackendError::Foreign { object, why, .. } if object == "set inet allowsync allow_v6" && why == "has type inet_service, not ipv6_addr"),
        "{err}"
    );
    assert_eq!(run("nft", &["list", "ruleset"]), before);

    // A chain with the reserved name that allowsync did not create (no comment), in a table
    // that is allowsync's, is not adopted as the enforcement chain...
    nft_script(&format!(
        "flush ruleset\n\
         table inet allowsync {{\n\
           comment \"managed by allowsync\"\n\
           chain {ENFORCE_CHAIN} {{\n counter\n }}\n\
         }}\n"
    ));
    let before = run("nft", &["list", "ruleset"]);
    let enforce = Enforce { tcp_ports: vec![443], ..Enforce::default() };
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
        set(["0.0.0.0/0", "::/0"]),
        set(["255.255.255.255/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"]),
        set(["0.0.0.0/32", "255.255.255.254/31", "::/128", "ffff::/16"]),
        set(["0.0.0.0/1", "128.0.0.0/2", "::/1", "8000::/2"]), // canonical: 0.0.0.0-191.255.255.255
        AllowSet::default(),
    ] {
        sync(&mut b, &desired);
        assert_holds(&mut b, &desired);
    }
}

#[test]
fn ensure_is_idempotent_and_teardown_removes_the_table() {
    let Some(_ns) = enter_new_netns() else { return };
    let enforce = Enforce { tcp_ports: vec![443, 8443], udp_ports: vec![53], ..Enforce::default() };
    let mut b = backend(Some(enforce.clone()));
    b.ensure().unwrap();
    sync(&mut b, &set(["192.0.2.0/24"]));

    // Each rule carries allowsync's comment (how ensure recognises its own rules).
    let rules = |listing: &str| -> Vec<String> {
        listing
            .lines()
            .map(str::trim)
            .filter(|l| l.contains(" accept") || l.contains(" drop"))
            .filter(|l| !l.starts_with("type "))
            .map(|l| match l.split_once(" comment \"allowsync ") {
                Some((rule, _)) => rule.to_string(),
                None => format!("{l} (no comment)"),
            })
            .collect()
    };
    let first = run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN]);
    assert!(first.contains("type filter hook prerouting priority mangle; policy accept;"), "{first}");
    assert!(first.contains(enforce_chain_text(EnforceScope::Host)), "{first}");
    // What ensure installed is exactly what the README tells operators to write.
    assert_eq!(rules(&first), enforce_rule_text(&config(None), &enforce));

    // In place and current: ensure commits nothing, enforcement or not.
    let generation = b.generation().unwrap();
    b.ensure().unwrap();
    b.ensure().unwrap();
    assert_eq!(b.generation().unwrap(), generation, "an intact chain is not rewritten");
    assert!(b.missing().unwrap().is_empty());
    // A rule replaced by hand (same place, another rule) is noticed and put back.
    let handle = run("nft", &["-a", "list", "chain", "inet", TABLE, ENFORCE_CHAIN])
        .lines()
        .find(|l| l.contains("dport 443 ") && l.contains(" ip saddr"))
        .and_then(|l| l.rsplit("handle ").next())
        .map(|h| h.trim().to_string())
        .unwrap();
    run(
        "nft",
        &[
            "replace",
            "rule",
            "inet",
            TABLE,
            ENFORCE_CHAIN,
            "handle",
            &handle,
            "tcp",
            "dport",
            "443",
            "accept",
        ],
    );
    assert_eq!(b.missing().unwrap(), ["the rules of chain inet allowsync enforce"]);
    b.ensure().unwrap();
    assert!(b.missing().unwrap().is_empty());
    let ruleset: serde_json::Value = serde_json::from_str(&run("nft", &["-j", "list", "ruleset"])).unwrap();
    let items = ruleset["nftables"].as_array().unwrap();
    assert_eq!(items.iter().filter(|i| i.get("table").is_some()).count(), 1);
    assert_eq!(items.iter().filter(|i| i.get("chain").is_some()).count(), 1);
    assert_eq!(items.iter().filter(|i| i.get("set").is_some()).count(), 2);
    assert_eq!(items.iter().filter(|i| i.get("rule").is_some()).count(), 1 + 2 * 3);
    assert_eq!(rules(&run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN])), rules(&first));
    // Ensure never touches the elements.
    assert_eq!(b.read().unwrap(), set(["192.0.2.0/24"]));

    // Nothing to do: ensure commits nothing.
    let mut plain = backend(None);
    plain.ensure().unwrap(); // removes the enforcement chain
    assert!(!run("nft", &["list", "table", "inet", TABLE]).contains("chain"));
    let generation = plain.generation().unwrap();
    plain.ensure().unwrap();
    assert_eq!(plain.generation().unwrap(), generation);
    assert_eq!(plain.read().unwrap(), set(["192.0.2.0/24"]));

    b.teardown().unwrap();
    assert!(!run("nft", &["list", "tables"]).contains(TABLE));
    b.teardown().unwrap(); // already gone: fine
    // Reading without the table is an error that makes the daemon run ensure again, and says
    // what is missing.
    let err = b.read().unwrap_err();
    assert!(err.is_missing(), "{err}");
    assert_eq!(
        err.to_string(),
        "table inet allowsync does not exist (allowsync creates it at its next sync)"
    );
}

/// A removal the kernel refuses because an operator's rule still uses the object (EBUSY) does not
/// hold up the rest: the transaction goes ahead without it, the object stays recorded as
/// allowsync's, and teardown later reports it left, with the operator's chain that holds it.
#[test]
fn a_removal_an_operators_rule_blocks_is_left_and_the_rest_goes_ahead() {
    let Some(_ns) = enter_new_netns() else { return };
    let mut a = backend(None);
    a.ensure().unwrap();
    let list = set(["192.0.2.0/24", "2001:db8::/48"]);
    sync(&mut a, &list);
    // The operator's own rule in allowsync's table, on its set (the README of 0.1 suggested it).
    nft_script(
        "add chain inet allowsync mine { type filter hook input priority 0; policy accept; }\n\
         add rule inet allowsync mine tcp dport 443 ip saddr != @allow_v4 drop\n",
    );
    let mut b = NftablesBackend::new(&NftablesConfig { set_v4: "chat_v4".into(), ..config(None) }).unwrap();
    b.set_recorded(&a.footprint().unwrap());
    b.ensure().unwrap();
    assert_eq!(b.read().unwrap(), list, "the new set starts with the old one's elements");
    let listing = run("nft", &["list", "table", "inet", TABLE]);
    assert!(listing.contains("set allow_v4") && listing.contains("set chat_v4"), "{listing}");
    let owned: Vec<String> = b.footprint().unwrap().owned.iter().map(ToString::to_string).collect();
    assert!(owned.contains(&"set inet allowsync allow_v4".to_string()), "still recorded: {owned:?}");

    let report = b.teardown().unwrap();
    assert_eq!(report.removed, ["set inet allowsync allow_v6", "set inet allowsync chat_v4"], "{report:?}");
    assert!(
        report.left.iter().any(|l| l.starts_with("set inet allowsync allow_v4: the kernel refused")),
        "{report:?}"
    );
    assert!(
        report.left.contains(
            &"table inet allowsync: it holds chain mine, which allowsync did not create".to_string()
        ),
        "{report:?}"
    );
    let listing = run("nft", &["list", "table", "inet", TABLE]);
    assert!(listing.contains("chain mine") && listing.contains("set allow_v4"), "{listing}");
}

/// allowsync's enforcement chain of the other scope (`scope: local`, the input hook): the next
/// `ensure` puts it in prerouting, in one transaction (the generation moves by one: no commit in
/// between sees the port unenforced), and keeps the sets' elements. (An earlier version's
/// unmarked chain is not allowsync's: refused, see the conformance suite.)
#[test]
fn allowsyncs_chain_of_the_other_scope_is_replaced_in_one_transaction() {
    let Some(_ns) = enter_new_netns() else { return };
    let enforce = Enforce { tcp_ports: vec![443], ..Enforce::default() };
    let mut old = backend(Some(Enforce { scope: EnforceScope::Local, ..enforce.clone() }));
    old.ensure().unwrap();
    sync(&mut old, &set(["192.0.2.0/24"]));
    let mut b = backend(Some(enforce.clone()));
    let before = b.generation().unwrap().unwrap();
    b.ensure().unwrap();
    assert_eq!(b.generation().unwrap().unwrap(), before + 1, "one commit");
    let chain = run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN]);
    assert!(chain.contains(enforce_chain_text(EnforceScope::Host)), "{chain}");
    for rule in enforce_rule_text(&config(None), &enforce) {
        assert!(chain.contains(&rule), "{rule} missing in\n{chain}");
    }
    assert_eq!(b.read().unwrap(), set(["192.0.2.0/24"]));

    // `scope: local` keeps (or brings back) exactly that earlier chain.
    let local = Enforce { scope: EnforceScope::Local, ..enforce };
    backend(Some(local.clone())).ensure().unwrap();
    let chain = run("nft", &["list", "chain", "inet", TABLE, ENFORCE_CHAIN]);
    assert!(chain.contains(enforce_chain_text(EnforceScope::Local)), "{chain}");
    assert_eq!(enforce_rule_text(&config(None), &local)[1], "tcp dport 443 ip saddr != @allow_v4 drop");
}
