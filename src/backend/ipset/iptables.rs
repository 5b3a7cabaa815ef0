//! Enforcement for the ipset backend: with `enforce`, the chain [`ENFORCE_CHAIN`] in the
//! `filter` table of iptables (with `<set_v4>`) and ip6tables (with `<set_v6>`) holds
//! `-i lo -j RETURN`, then per port `-p tcp --dport P -m set ! --match-set <set> src -j DROP`
//! (udp likewise), and INPUT jumps to it first. Every one of these rules, the jump included,
//! carries `-m comment --comment "managed by allowsync"`: that mark is what makes the chain
//! allowsync's (see [`crate::ownership`]), with the state file's record of it.
//!
//! The chain is declared and refilled with one `iptables-restore --noflush` (one commit: never
//! a moment with the chain empty), and the jump is added only when `-S` does not list it, so
//! restarts add nothing. The rules are installed by [`Backend::enforce`], after the sets are
//! synced, not by [`Backend::ensure`]: a rule iptables refuses (say, without CAP_NET_RAW, which
//! `--match-set` needs) is an error of its own and never keeps the sets empty. A chain of that
//! name that is not allowsync's (a rule without the mark) is [`BackendError::Foreign`] with
//! `enforce`, and never changed or removed. Teardown removes the jump and the chain before
//! destroying the sets: the kernel refuses to destroy a set a rule references.

use std::fmt::Write as _;
use std::path::Path;

use tracing::{debug, warn};

use super::cmd::run;
use super::{Family, IpsetBackend};
#[cfg(doc)]
use crate::backend::Backend;
use crate::backend::BackendError;
use crate::config::Enforce;
use crate::ownership::{MARK, Object, Xtables};

/// Name of the iptables/ip6tables chain allowsync fills with its enforcement rules. Reserved.
pub const ENFORCE_CHAIN: &str = "ALLOWSYNC";

/// The comment match every rule allowsync writes carries, as `iptables -S` prints it.
fn mark_match() -> String {
    format!("-m comment --comment \"{MARK}\"")
}

impl IpsetBackend {
    /// `(iptables, iptables-restore, set)` for `family`.
    fn firewall(&self, family: Family) -> Option<(&Path, &Path, &str)> {
        let t = self.tools.iptables.as_ref()?;
        Some(match family {
            Family::V4 => (&t[0], &t[1], &self.set_v4),
            Family::V6 => (&t[2], &t[3], &self.set_v6),
        })
    }

    /// What `-S` shows of the filter table: whether our chain exists, its rules, and how many
    /// jumps INPUT has to it.
    fn chain_state(&self, iptables: &Path) -> Result<ChainState, BackendError> {
        let out = run(iptables, &["-w", "-t", "filter", "-S"], None, "list rules", &chain_object(iptables))?;
        Ok(ChainState::parse(&out.stdout))
    }

    /// Whether the chain `state` describes is allowsync's: every rule in it carries the mark,
    /// and it has one (an empty chain is allowsync's only when the state file records it).
    fn chain_is_ours(&self, family: Family, state: &ChainState) -> bool {
        let recorded = self.owned_chains.contains(&chain_of(family));
        state.all_marked() && (!state.rules.is_empty() || recorded)
    }

    pub(super) fn ensure_enforcement(&mut self) -> Result<(), BackendError> {
        for family in Family::BOTH {
            let Some((iptables, restore, set)) = self.firewall(family) else {
                if self.enforce.is_some() {
                    return Err(BackendError::Unavailable(
                        "iptables programs missing: install the Debian package `iptables`".into(),
                    ));
                }
                continue;
            };
            let (iptables, restore, set) = (iptables.to_path_buf(), restore.to_path_buf(), set.to_string());
            let object = chain_object(&iptables);
            let state = self.chain_state(&iptables)?;
            let ours = self.chain_is_ours(family, &state);
            match &self.enforce {
                Some(enforce) => {
                    if state.exists && !ours {
                        return Err(foreign_chain(&object, &iptables, &state));
                    }
                    // Declaring the chain in a --noflush restore flushes it; the rules follow in
                    // the same commit, so the chain is never seen empty.
                    let mut script = format!("*filter\n:{ENFORCE_CHAIN} - [0:0]\n");
                    for rule in enforce_rules(&set, enforce) {
                        let _ = writeln!(script, "-A {ENFORCE_CHAIN} {rule}");
                    }
                    if state.jumps == 0 {
                        let _ = writeln!(script, "-I INPUT 1 {} -j {ENFORCE_CHAIN}", mark_match());
                    }
                    script.push_str("COMMIT\n");
                    run(&restore, &["-w", "--noflush"], Some(script.as_bytes()), "install rules", &object)?;
                    self.owned_chains.insert(chain_of(family));
                    debug!(chain = %object, jump_added = state.jumps == 0, "enforcement rules installed");
                }
                None if state.exists && ours => {
                    warn!(chain = %object, "enforcement is not configured: removing allowsync's enforcement chain");
                    remove_chain(&restore, &state, &object)?;
                    self.owned_chains.remove(&chain_of(family));
                }
                None => {
                    self.owned_chains.remove(&chain_of(family));
                }
            }
        }
        Ok(())
    }

    /// Removes INPUT's jumps and the enforcement chain (iptables and ip6tables), for teardown;
    /// a chain of that name that is not allowsync's is left alone. Returns the report's lines:
    /// `(removed, left)`.
    pub(super) fn teardown_enforcement(&mut self) -> Result<(Vec<String>, Vec<String>), BackendError> {
        let (mut removed, mut left) = (Vec::new(), Vec::new());
        for family in Family::BOTH {
            let Some((iptables, restore, _)) = self.firewall(family) else { continue };
            let (iptables, restore) = (iptables.to_path_buf(), restore.to_path_buf());
            let object = chain_object(&iptables);
            let state = self.chain_state(&iptables)?;
            if state.exists && self.chain_is_ours(family, &state) {
                remove_chain(&restore, &state, &object)?;
                removed.push(object);
            } else if state.exists {
                warn!(chain = %object, "not removing a chain allowsync did not write");
                left.push(format!(
                    "{object}: allowsync did not create it (its rules carry no comment \"{MARK}\"); if an earlier allowsync (one that did not mark its rules) did, remove it with `{0} -D INPUT -j {ENFORCE_CHAIN}; {0} -F {ENFORCE_CHAIN}; {0} -X {ENFORCE_CHAIN}`",
                    program(&iptables)
                ));
            }
            self.owned_chains.remove(&chain_of(family));
        }
        Ok((removed, left))
    }
}

/// Removes INPUT's jumps to the chain (ours: marked) and the chain, in one commit.
fn remove_chain(restore: &Path, state: &ChainState, object: &str) -> Result<(), BackendError> {
    let mut script = String::from("*filter\n");
    for _ in 0..state.jumps {
        let _ = writeln!(script, "-D INPUT {} -j {ENFORCE_CHAIN}", mark_match());
    }
    let _ = writeln!(script, "-F {ENFORCE_CHAIN}\n-X {ENFORCE_CHAIN}\nCOMMIT");
    run(restore, &["-w", "--noflush"], Some(script.as_bytes()), "remove rules", object).map(drop)
}

fn foreign_chain(object: &str, iptables: &Path, state: &ChainState) -> BackendError {
    let theirs: Vec<&str> =
        state.rules.iter().filter(|r| !r.contains(&mark_match())).map(String::as_str).collect();
    let what = if theirs.is_empty() {
        "exists, empty,".to_string()
    } else {
        format!("holds rules allowsync did not write ({}), so", theirs.join(" | "))
    };
    BackendError::Foreign {
        object: object.to_string(),
        why: format!(
            "{what} allowsync did not create it; allowsync never changes a chain it did not create (the name is reserved for its enforcement)"
        ),
        fix: format!(
            "rename your chain; if an earlier allowsync wrote it (its rules carry no comment \"{MARK}\"), remove it with `{0} -D INPUT -j {ENFORCE_CHAIN}; {0} -F {ENFORCE_CHAIN}; {0} -X {ENFORCE_CHAIN}` and allowsync installs its own",
            program(iptables)
        ),
    }
}

fn program(iptables: &Path) -> String {
    iptables.file_name().map_or_else(|| iptables.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn chain_object(iptables: &Path) -> String {
    format!("{} chain filter {ENFORCE_CHAIN}", program(iptables))
}

/// The enforcement chain of `family`, as the state file records it.
pub(super) fn chain_of(family: Family) -> Object {
    let program = match family {
        Family::V4 => Xtables::Iptables,
        Family::V6 => Xtables::Ip6tables,
    };
    Object::XtChain { program, table: "filter".into(), chain: ENFORCE_CHAIN.into() }
}

/// What `iptables -S` shows about [`ENFORCE_CHAIN`].
#[derive(Debug, Default)]
struct ChainState {
    exists: bool,
    rules: Vec<String>,
    /// INPUT's jumps to it that allowsync added (marked).
    jumps: usize,
}

impl ChainState {
    fn parse(listing: &str) -> Self {
        let mut s = ChainState::default();
        let rule_prefix = format!("-A {ENFORCE_CHAIN} ");
        let jump = format!("-A INPUT {} -j {ENFORCE_CHAIN}", mark_match());
        for line in listing.lines().map(str::trim) {
            if line == format!("-N {ENFORCE_CHAIN}") {
                s.exists = true;
            } else if let Some(rule) = line.strip_prefix(&rule_prefix) {
                s.rules.push(rule.to_string());
            } else if line == jump {
                s.jumps += 1;
            }
        }
        s
    }

    fn all_marked(&self) -> bool {
        self.rules.iter().all(|r| r.contains(&mark_match()))
    }
}

/// The rules of [`ENFORCE_CHAIN`] for one family, as `iptables` arguments (and as `-S` prints
/// them): loopback first, then TCP ports, then UDP ports, each with the mark.
pub fn enforce_rules(set: &str, enforce: &Enforce) -> Vec<String> {
    let mark = mark_match();
    let mut out = vec![format!("-i lo {mark} -j RETURN")];
    let ports =
        enforce.tcp_ports.iter().map(|p| ("tcp", p)).chain(enforce.udp_ports.iter().map(|p| ("udp", p)));
    for (proto, port) in ports {
        out.push(format!(
            "-p {proto} -m {proto} --dport {port} -m set ! --match-set {set} src {mark} -j DROP"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_listing_is_recognised_by_its_mark() {
        let s = ChainState::parse(
            "-P INPUT ACCEPT\n-N ALLOWSYNC\n-A INPUT -m comment --comment \"managed by allowsync\" -j ALLOWSYNC\n\
             -A ALLOWSYNC -i lo -m comment --comment \"managed by allowsync\" -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src -m comment --comment \"managed by allowsync\" -j DROP\n",
        );
        assert!(s.exists && s.jumps == 1 && s.all_marked());
        // The same rules without the mark (an earlier allowsync's, or anyone's): not ours.
        let legacy = ChainState::parse(
            "-N ALLOWSYNC\n-A INPUT -j ALLOWSYNC\n-A ALLOWSYNC -i lo -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP\n",
        );
        assert!(legacy.exists && legacy.jumps == 0 && !legacy.all_marked());
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53] };
        assert_eq!(
            enforce_rules("v4", &e)[1],
            "-p tcp -m tcp --dport 443 -m set ! --match-set v4 src -m comment --comment \"managed by allowsync\" -j DROP"
        );
    }
}
