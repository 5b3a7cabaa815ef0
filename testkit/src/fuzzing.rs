//! The fuzz targets' entry functions, one per parser of outside input. They live here, in the
//! test support crate, so that the libFuzzer harness (`fuzz/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`, run by `make test`) call exactly the same code: a seed or a saved
//! crash input that `make fuzz` found keeps being checked by every `cargo test`.
//!
//! Each function takes arbitrary bytes and panics only on a bug: beyond "does not crash", it
//! checks a property that must hold for any input (a parse round-trips, an accepted list is
//! canonical, an error never quotes the signature).

use std::path::Path;

use allowsync::admission::{self, MinPrefix};
use allowsync::config;
use allowsync::prefixes::{self, AllowSet};
use allowsync::source::chat;
use allowsync::state;
use allowsync::usersig;

/// A fuzz target: arbitrary bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("get_ip_list", get_ip_list),
    ("entry", entry),
    ("config", config),
    ("usersig", usersig),
    ("state", state),
    ("published", published),
];

/// The GetIPList response parser, on any body.
pub fn get_ip_list(data: &[u8]) {
    let Ok(list) = chat::parse_response(data, 1400000000, "administrator", &Default::default()) else {
        return;
    };
    // An accepted answer is a canonical set (sorted, disjoint, merged), whatever order and
    // overlaps the entries came in, and accounts for every entry it saw.
    assert!(list.list.v4.is_canonical() && list.list.v6.is_canonical());
    assert!(list.entries >= list.list.len(), "{} entries became {} ranges?", list.entries, list.list.len());
    assert!(list.entries > 0 || list.skipped == 0, "all-invalid lists must be an error");
    // No address of it is special, whatever the entries were.
    for r in list.list.v4.iter() {
        assert!(
            admission::SPECIAL_V4.iter().all(|s| !s.range.overlaps(r)),
            "special addresses accepted: {r}"
        );
    }
    for r in list.list.v6.iter() {
        assert!(
            admission::SPECIAL_V6.iter().all(|s| !s.range.overlaps(r)),
            "special addresses accepted: {r}"
        );
    }
}

/// One entry of IPList (or of a static source).
pub fn entry(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(e) = prefixes::parse_entry(s) else { return };
    // The accepted network is in canonical form: host bits cleared, IPv4-mapped IPv6 unmapped,
    // and printing and parsing it again gives the same network with nothing to correct.
    assert_eq!(e.net, e.net.trunc(), "{s:?}: host bits left in {}", e.net);
    if let ipnet::IpNet::V6(n) = e.net {
        assert!(n.prefix_len() < 96 || n.network().to_ipv4_mapped().is_none(), "{s:?}: still mapped: {n}");
        let compatible = u128::from(n.network()) >> 32 == 0 && n.prefix_len() >= 96;
        assert!(
            !compatible || n.prefix_len() == 128 && u128::from(n.network()) <= 1,
            "{s:?}: still compatible: {n}"
        );
    }
    let again = prefixes::parse_entry(&e.net.to_string()).expect("a printed network parses");
    assert_eq!(again.net, e.net);
    assert_eq!(again.masked_from, None);
    assert_eq!(AllowSet::from_nets([e.net]).to_nets(), vec![e.net], "a single prefix round-trips");
    // Accepted under the default minimums, and under none at all: never special, never wider
    // than the minimum. Checked against the standard library's idea of each range, not ours.
    for min in [MinPrefix::default(), MinPrefix { v4: 0, v6: 0 }] {
        if admission::check(e.net, &min).is_ok() {
            assert_never_special(s, e.net, &min);
        }
    }
}

/// What [`entry`] asserts of an accepted entry, independently of [`admission`]'s tables.
fn assert_never_special(s: &str, net: ipnet::IpNet, min: &MinPrefix) {
    use ipnet::IpNet;
    match net {
        IpNet::V4(n) => {
            assert!(n.prefix_len() >= min.v4, "{s:?}: {n} is wider than /{}", min.v4);
            // Prefixes overlap only when one holds the other: the entry's own first address
            // is special when it lies in a special range, and a special range's first address
            // lies in the entry when the entry holds it.
            let a = n.network();
            // 0.0.0.0/8, loopback, multicast, link-local; 240.0.0.0/4 holds 255.255.255.255.
            let special = a.octets()[0] == 0
                || a.is_loopback()
                || a.is_multicast()
                || a.is_link_local()
                || a.octets()[0] >= 240;
            assert!(!special, "{s:?}: {n} is special");
            for first in ["0.0.0.0", "127.0.0.0", "169.254.0.0", "224.0.0.0", "240.0.0.0", "255.255.255.255"]
            {
                assert!(
                    !n.contains(&first.parse::<std::net::Ipv4Addr>().unwrap()),
                    "{s:?}: {n} holds {first}"
                );
            }
        }
        IpNet::V6(n) => {
            assert!(n.prefix_len() >= min.v6, "{s:?}: {n} is wider than /{}", min.v6);
            let a = n.network();
            let special =
                a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_unicast_link_local();
            assert!(!special, "{s:?}: {n} is special");
            for first in ["::", "::1", "fe80::", "ff00::"] {
                assert!(
                    !n.contains(&first.parse::<std::net::Ipv6Addr>().unwrap()),
                    "{s:?}: {n} holds {first}"
                );
            }
        }
    }
}

/// The configuration file, parsed and checked. Parsing reads nothing (the secret keys are read
/// by `Parsed::resolve`, which this target does not call), whatever the text says.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::parse(text, Path::new("/etc/allowsync/config.yaml")) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The usersig decoder and verifier (the mock server's side, and `allowsync usersig`'s).
pub fn usersig(data: &[u8]) {
    const KEY: &str = "fuzz-secret-key";
    let Ok(s) = std::str::from_utf8(data) else { return };
    let decoded = usersig::decode(s);
    let verified = usersig::verify(s, 1400000000, "administrator", KEY, 1_700_000_000);
    if let Err(e) = &verified {
        // No error may quote the signature: it is as good as the usersig.
        if let Ok(doc) = &decoded {
            // (Unless the fuzzer made the signature a substring of what errors may quote.)
            let quotable = doc.identifier.contains(&doc.sig) || doc.ver.contains(&doc.sig);
            if doc.sig.len() >= 8 && !quotable {
                assert!(!e.to_string().contains(&doc.sig), "error quotes TLS.sig: {e}");
            }
        }
    }
    if let Ok(doc) = decoded {
        assert!(verified.is_err() || doc.identifier == "administrator");
        // What decodes can be re-minted from its fields and verifies as that document.
        let again = usersig::mint(doc.sdkappid, &doc.identifier, KEY, doc.expire, doc.time);
        let back = usersig::verify(again.expose(), doc.sdkappid, &doc.identifier, KEY, doc.time)
            .expect("a freshly minted usersig verifies");
        assert_eq!(
            (back.identifier, back.sdkappid, back.expire, back.time),
            (doc.identifier, doc.sdkappid, doc.expire, doc.time)
        );
    }
}

/// The state file. A state that parses writes back to a file that parses to the same state.
pub fn state(data: &[u8]) {
    let Ok(st) = state::parse(data) else { return };
    let bytes = serde_json::to_vec_pretty(&st).expect("state serializes");
    let again = state::parse(&bytes).expect("a written state parses");
    assert_eq!(again, st);
}

/// A published list (the `url` source's answer), on any body.
pub fn published(data: &[u8]) {
    match allowsync::published::parse_document(data) {
        // The error quotes the document only escaped.
        Err(e) => assert!(!e.to_string().chars().any(char::is_control), "unescaped: {e}"),
        // An accepted document's hash is that of its entries: written again, it reads the same.
        Ok(doc) => {
            let Ok(strict) = allowsync::published::parse_json(data) else { return };
            let text = allowsync::published::render_json(strict.generated_at, &strict.ipv4, &strict.ipv6);
            let again =
                allowsync::published::parse_document(text.as_bytes()).expect("a rendered list parses");
            assert_eq!((again.ipv4, again.ipv6), (doc.ipv4, doc.ipv6));
        }
    }
}
