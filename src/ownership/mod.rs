//! Ownership: which kernel objects allowsync created, and so may change or remove.
//!
//! Ownership is recorded, never guessed from an object's shape or name:
//!
//! - **in the kernel**: every nftables table, set and chain allowsync creates carries the comment
//!   [`MARK`] (its userdata, which `nft list ruleset` shows as `comment "managed by
//!   allowsync"`), and every iptables rule it writes carries it as a comment match. ipsets
//!   cannot carry a comment;
//! - **in the state file**: the [`Footprint`], the objects allowsync created and the sets it
//!   fills. For ipsets it is the only record.
//!
//! Everything else is the operator's: never deleted, flushed, re-policied or rewritten. Of a
//! configured set that is not ours, allowsync manages the elements and nothing else. An object
//! named like one of ours that is not ours is an error naming it and the fix.
//!
//! Objects that an earlier allowsync created, before these marks, carry none, so
//! they are not owned: their sets are filled, their chains left alone, and `teardown` leaves
//! them and says how to remove them (README, "Upgrading").
//!
//! [`lock`] keeps two allowsync processes off the same kernel objects (those a backend's
//! [`crate::backend::Backend::managed`] names).

pub mod lock;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The comment on every nftables table, set and chain and every iptables rule allowsync
/// creates: what makes it allowsync's.
pub const MARK: &str = "managed by allowsync";

/// An nftables address family, as nft writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NftFamily {
    Inet,
    Ip,
    Ip6,
}

impl NftFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            NftFamily::Inet => "inet",
            NftFamily::Ip => "ip",
            NftFamily::Ip6 => "ip6",
        }
    }

    /// `NFPROTO_*`, the family of an nf_tables message.
    pub fn nfproto(self) -> u16 {
        match self {
            NftFamily::Inet => libc::NFPROTO_INET as u16,
            NftFamily::Ip => libc::NFPROTO_IPV4 as u16,
            NftFamily::Ip6 => libc::NFPROTO_IPV6 as u16,
        }
    }

    fn parse(s: &str) -> Option<NftFamily> {
        match s {
            "inet" => Some(NftFamily::Inet),
            "ip" => Some(NftFamily::Ip),
            "ip6" => Some(NftFamily::Ip6),
            _ => None,
        }
    }
}

/// The iptables programs, each with its own tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Xtables {
    Iptables,
    Ip6tables,
}

impl Xtables {
    pub fn as_str(self) -> &'static str {
        match self {
            Xtables::Iptables => "iptables",
            Xtables::Ip6tables => "ip6tables",
        }
    }
}

/// A kernel object allowsync creates or fills, named the way `nft` and `ipset` name it. Its
/// text form (`table inet allowsync`, `set ip filter chat_v4`, `chain inet allowsync enforce`,
/// `ipset allowsync_v4`, `iptables chain filter ALLOWSYNC`) is how errors, `teardown` and the
/// state file write it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Object {
    NftTable {
        family: NftFamily,
        table: String,
    },
    NftSet {
        family: NftFamily,
        table: String,
        name: String,
    },
    NftChain {
        family: NftFamily,
        table: String,
        name: String,
    },
    Ipset {
        name: String,
    },
    XtChain {
        program: Xtables,
        table: String,
        chain: String,
    },
    /// The `file` backend's file (`file /var/www/allowlist/chat.json`): not a kernel object,
    /// recorded the same way.
    File {
        path: std::path::PathBuf,
    },
}

impl Object {
    /// The nftables table this object is or lives in.
    pub fn nft_table(&self) -> Option<Object> {
        match self {
            Object::NftTable { .. } => Some(self.clone()),
            Object::NftSet { family, table, .. } | Object::NftChain { family, table, .. } => {
                Some(Object::NftTable { family: *family, table: table.clone() })
            }
            Object::Ipset { .. } | Object::XtChain { .. } | Object::File { .. } => None,
        }
    }

    pub fn is_nftables(&self) -> bool {
        self.nft_table().is_some()
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::NftTable { family, table } => write!(f, "table {} {table}", family.as_str()),
            Object::NftSet { family, table, name } => write!(f, "set {} {table} {name}", family.as_str()),
            Object::NftChain { family, table, name } => write!(f, "chain {} {table} {name}", family.as_str()),
            Object::Ipset { name } => write!(f, "ipset {name}"),
            Object::XtChain { program, table, chain } => {
                write!(f, "{} chain {table} {chain}", program.as_str())
            }
            Object::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

impl FromStr for Object {
    type Err = String;

    fn from_str(s: &str) -> Result<Object, String> {
        // A path may hold spaces: everything after the word is the path.
        if let Some(path) = s.strip_prefix("file ").map(std::path::Path::new) {
            return if path.is_absolute() {
                Ok(Object::File { path: path.to_path_buf() })
            } else {
                Err(format!("`{s}`: a file is recorded by its absolute path"))
            };
        }
        let words: Vec<&str> = s.split_whitespace().collect();
        let family = |w: &str| NftFamily::parse(w).ok_or_else(|| format!("unknown nftables family `{w}`"));
        let name =
            |w: &str| valid_name(w).then(|| w.to_string()).ok_or_else(|| format!("invalid name `{w}`"));
        match words.as_slice() {
            ["table", fam, t] => Ok(Object::NftTable { family: family(fam)?, table: name(t)? }),
            ["set", fam, t, n] => {
                Ok(Object::NftSet { family: family(fam)?, table: name(t)?, name: name(n)? })
            }
            ["chain", fam, t, n] => {
                Ok(Object::NftChain { family: family(fam)?, table: name(t)?, name: name(n)? })
            }
            ["ipset", n] => Ok(Object::Ipset { name: name(n)? }),
            [prog @ ("iptables" | "ip6tables"), "chain", t, c] => Ok(Object::XtChain {
                program: if *prog == "iptables" { Xtables::Iptables } else { Xtables::Ip6tables },
                table: name(t)?,
                chain: name(c)?,
            }),
            _ => Err(format!("`{s}` is not a kernel object allowsync knows")),
        }
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A name allowsync accepts for a table, set or chain: letters, digits, `_` and `-`, starting
/// with a letter, at most 31 characters (ipset's limit, and well under nftables' 256).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 31
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_alphabetic()
}

/// An nftables set as the configuration names it: `allow_v4` (in `table inet <table>`) or, the
/// way nft writes it, `<family> <table> <set>` (`ip filter chat_v4`).
pub fn parse_nft_set(text: &str, own_table: &str) -> Result<Object, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let bad = |w: &str| {
        format!(
            "`{w}` is not a valid name: start with a letter, then letters, digits, _ or -, at most 31 characters"
        )
    };
    match words.as_slice() {
        [name] if valid_name(name) => Ok(Object::NftSet {
            family: NftFamily::Inet,
            table: own_table.to_string(),
            name: name.to_string(),
        }),
        [name] => Err(bad(name)),
        [fam, table, name] => {
            let family = NftFamily::parse(fam)
                .ok_or_else(|| format!("`{fam}` is not an nftables family: write `ip`, `ip6` or `inet`"))?;
            let invalid = [table, name].into_iter().find(|w| !valid_name(w));
            match invalid {
                Some(w) => Err(bad(w)),
                None => Ok(Object::NftSet { family, table: table.to_string(), name: name.to_string() }),
            }
        }
        _ => Err(format!(
            "`{text}` is neither a set name (`allow_v4`) nor a set the way nft writes it (`ip filter chat_v4`)"
        )),
    }
}

/// What the state file records about the kernel objects: what allowsync created (and has not
/// removed since) and which sets hold the allowlist. A configuration change removes the objects
/// of the old configuration that the new one no longer uses; `teardown` removes them all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Footprint {
    /// Created by allowsync and not removed since.
    #[serde(default)]
    pub owned: BTreeSet<Object>,
    /// The IPv4 and IPv6 sets that hold the allowlist, allowsync's or the operator's.
    #[serde(default)]
    pub sets: Vec<Object>,
    /// Files the `file` backend changed whose `on_change` has not succeeded since: run at the
    /// next sync, after a restart too.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub on_change_pending: BTreeSet<Object>,
}

impl Footprint {
    pub fn is_empty(&self) -> bool {
        self.owned.is_empty() && self.sets.is_empty() && self.on_change_pending.is_empty()
    }

    /// The recorded IPv4 (`v6: false`) or IPv6 set.
    pub fn set(&self, v6: bool) -> Option<&Object> {
        self.sets.get(usize::from(v6))
    }
}

/// What `teardown` did, for the operator: one line per object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Teardown {
    /// Deleted, with what went with them (`table inet allowsync (sets allow_v4, allow_v6)`).
    pub removed: Vec<String>,
    /// An operator's set that allowsync filled: it stays, its elements are gone.
    pub emptied: Vec<String>,
    /// Left in place, each with why (`table inet filter: allowsync did not create it`).
    pub left: Vec<String>,
}

impl Teardown {
    /// The report `allowsync teardown` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.removed {
            out.push_str(&format!("removed {r}\n"));
        }
        for e in &self.emptied {
            out.push_str(&format!(
                "emptied {e}: not allowsync's, so only the elements allowsync put in it were removed\n"
            ));
        }
        for l in &self.left {
            out.push_str(&format!("left {l}\n"));
        }
        if out.is_empty() {
            out.push_str("nothing to remove: allowsync owns no object of this configuration\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_print_and_parse_the_way_nft_and_ipset_name_them() {
        for text in [
            "table inet allowsync",
            "set ip filter chat_v4",
            "set ip6 filter chat_v6",
            "chain inet allowsync enforce",
            "ipset allowsync_v4",
            "iptables chain filter ALLOWSYNC",
            "ip6tables chain filter ALLOWSYNC",
            "file /var/www/allow list/chat.json",
        ] {
            let o: Object = text.parse().unwrap();
            assert_eq!(o.to_string(), text);
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{text}\""));
        }
        assert!("table arp x".parse::<Object>().is_err());
        assert!("set inet t".parse::<Object>().is_err());
        assert!("set inet t bad/name".parse::<Object>().is_err());
        assert!("file chat.json".parse::<Object>().is_err());
    }

    #[test]
    fn configured_set_names_are_plain_or_as_nft_writes_them() {
        let set = |f, t: &str, n: &str| Object::NftSet { family: f, table: t.into(), name: n.into() };
        assert_eq!(parse_nft_set("allow_v4", "allowsync"), Ok(set(NftFamily::Inet, "allowsync", "allow_v4")));
        assert_eq!(
            parse_nft_set("ip filter chat_v4", "allowsync"),
            Ok(set(NftFamily::Ip, "filter", "chat_v4"))
        );
        assert_eq!(parse_nft_set(" ip6  filter chat_v6 ", "x"), Ok(set(NftFamily::Ip6, "filter", "chat_v6")));
        assert!(parse_nft_set("arp filter s", "x").unwrap_err().contains("`arp` is not an nftables family"));
        assert!(parse_nft_set("ip filter", "x").unwrap_err().contains("neither a set name"));
        assert!(parse_nft_set("ip fil.ter s", "x").unwrap_err().contains("`fil.ter` is not a valid name"));
        assert!(parse_nft_set("9set", "x").unwrap_err().contains("`9set` is not a valid name"));
    }

    #[test]
    fn the_teardown_report_says_what_was_removed_and_what_was_left() {
        let t = Teardown {
            removed: vec!["table inet allowsync (sets allow_v4, allow_v6)".into()],
            emptied: vec!["set ip filter chat_v4".into()],
            left: vec!["table ip filter: allowsync did not create it".into()],
        };
        let text = t.render();
        assert!(text.starts_with("removed table inet allowsync (sets allow_v4, allow_v6)\n"), "{text}");
        assert!(text.contains("emptied set ip filter chat_v4: not allowsync's"), "{text}");
        assert!(text.ends_with("left table ip filter: allowsync did not create it\n"), "{text}");
        assert!(Teardown::default().render().starts_with("nothing to remove"));
    }
}
