//! Test support for allowsync, kept out of the library:
//!
//! - [`mock`]: the mock Chat REST API (`GetIPList`) with fault injection;
//! - [`relay`]: an HTTPS server of a published list, for the `url` source;
//! - [`netns`]: a private network namespace per test, and the commands that inspect it;
//! - [`scrape`]: Prometheus metrics parsed with a real parser;
//! - [`traffic`]: servers and clients of real TCP and UDP traffic between namespaces;
//! - [`daemon`]: the real binary against the mock and the kernel, in such a namespace;
//! - [`backends`]: test-only backends and [`sync`];
//! - [`fuzzing`]: the fuzz targets' entry functions (`fuzz/` and `tests/fuzz_corpus.rs`);
//! - [`set`]: an allowlist from entries as an operator writes them.
//!
//! The integration tests, the bench, the fuzz harness and the `mock_chat_api` example use it; the
//! library's own unit tests use [`set`] (it is generic over the collection for them: their
//! `AllowSet` is the one of their own build of the crate, not this crate's).

pub mod backends;
pub mod daemon;
pub mod fuzzing;
pub mod mock;
pub mod netns;
pub mod relay;
pub mod scrape;
pub mod traffic;

pub use backends::sync;

use allowsync::prefixes::parse_entry;
use ipnet::IpNet;

/// The networks of `entries` (`10.0.0.0/24`, `192.0.2.1`, `2001:db8::/48`, …), each read by
/// allowsync's own entry parser, collected into an `AllowSet` (or any collection of networks).
/// Panics on an entry the parser refuses.
pub fn set<S: FromIterator<IpNet>>(entries: impl IntoIterator<Item = impl AsRef<str>>) -> S {
    entries
        .into_iter()
        .map(|e| {
            let e = e.as_ref();
            parse_entry(e).unwrap_or_else(|err| panic!("{e:?}: {err}")).net
        })
        .collect()
}
