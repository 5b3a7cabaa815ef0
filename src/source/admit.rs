//! An answer's entries, one by one, through the syntax ([`prefixes::parse_entry`]) and the
//! rules ([`admission::check`]), the same for every source that reads a list from outside:
//!
//! - an entry that is invalid (or not a string, or of the other family where the answer says
//!   which) is logged and skipped;
//! - one in (or holding) a range that is never allowed is logged and skipped;
//! - one wider than the minimum prefix length makes the whole answer suspicious
//!   ([`FetchError::Suspicious`]), so that the source keeps its last good list;
//! - an answer whose every entry was skipped is an error: a list of nothing but garbage says
//!   the service is broken, not that the allowlist is empty.
//!
//! Every entry shown goes through `Untrusted`; only so many are logged one by one.

use std::collections::HashSet;

use ipnet::IpNet;
use serde_json::Value;
use tracing::{error, warn};

use super::FetchError;
use super::chat::NettypeList;
use crate::admission::{self, MinPrefix, Refused};
use crate::logging::Untrusted;
use crate::prefixes::{self, AllowSet};

/// Invalid or refused entries logged one by one per answer; the rest are counted in one
/// summary line, so that a broken list cannot flood the journal.
const MAX_ENTRY_WARNINGS: usize = 20;

/// One entry as the answer holds it.
#[derive(Clone, Copy)]
pub(crate) enum Item<'a> {
    Text(&'a str),
    /// Anything but a string (in a JSON answer).
    Other(&'a Value),
}

impl Item<'_> {
    fn shown(self) -> String {
        match self {
            Item::Text(s) => Untrusted(s).to_string(),
            Item::Other(v) => Untrusted(&v.to_string()).to_string(),
        }
    }
}

/// The family an answer says an entry is of (`ipv4` / `ipv6` of a published list).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

/// The entries of one answer, as they are judged.
pub(crate) struct Admit<'m> {
    min_prefix: &'m MinPrefix,
    nets: Vec<IpNet>,
    skipped: usize,
    /// Warned about once each, however often the answer repeats them.
    refused: HashSet<IpNet>,
}

impl<'m> Admit<'m> {
    pub(crate) fn new(min_prefix: &'m MinPrefix) -> Self {
        Admit { min_prefix, nets: Vec::new(), skipped: 0, refused: HashSet::new() }
    }

    fn skip(&mut self, item: Item<'_>, reason: &dyn std::fmt::Display, message: &str) {
        self.skipped += 1;
        if self.skipped <= MAX_ENTRY_WARNINGS {
            warn!(entry = %item.shown(), reason = %reason, "{message}");
        }
    }

    /// Judges one entry (of `family`, when the answer says); `Err` when it makes the whole
    /// answer suspicious.
    pub(crate) fn push(&mut self, item: Item<'_>, family: Option<Family>) -> Result<(), FetchError> {
        let parsed = match item {
            Item::Text(s) => prefixes::parse_entry(s).map_err(|e| e.to_string()),
            Item::Other(_) => Err("not a string".to_owned()),
        };
        let e = match parsed {
            Ok(e) => e,
            Err(reason) => {
                self.skip(item, &reason, "skipping invalid entry");
                return Ok(());
            }
        };
        let is_v6 = matches!(e.net, IpNet::V6(_));
        if let Some(f) = family.filter(|f| (*f == Family::V6) != is_v6) {
            let reason =
                if f == Family::V4 { "an IPv6 prefix among ipv4" } else { "an IPv4 prefix among ipv6" };
            self.skip(item, &reason, "skipping invalid entry");
            return Ok(());
        }
        match admission::check(e.net, self.min_prefix) {
            Ok(()) => {}
            Err(r @ Refused::TooShort { .. }) => {
                let entry = item.shown();
                error!(entry = %entry, reason = %r, "suspicious answer: an entry is wider than the minimum prefix length; not using any of it");
                return Err(FetchError::Suspicious { entry, reason: r.to_string() });
            }
            Err(r @ Refused::Special { .. }) => {
                if self.refused.insert(e.net) {
                    self.skip(item, &r, "skipping an entry that is never allowed");
                } else {
                    self.skipped += 1;
                }
                return Ok(());
            }
        }
        if let Some(orig) = e.masked_from {
            warn!(entry = %orig, used = %e.net, "entry has host bits set; using its network");
        }
        self.nets.push(e.net);
        Ok(())
    }

    /// The list of the entries admitted.
    pub(crate) fn finish(self) -> Result<NettypeList, FetchError> {
        let skipped = self.skipped;
        if skipped > MAX_ENTRY_WARNINGS {
            warn!(skipped, "more entries skipped without a warning each");
        }
        if self.nets.is_empty() && skipped > 0 {
            return Err(FetchError::AllInvalid { count: skipped });
        }
        Ok(NettypeList { entries: self.nets.len(), skipped, list: AllowSet::from_nets(self.nets) })
    }
}
