//! Enforcement for the ipset backend: with `enforce`, the chain [`ENFORCE_CHAIN`] in the
//! `filter` table of iptables (with `<set_v4>`) and ip6tables (with `<set_v6>`) holds
//! `-i lo -j RETURN`, then per port `-p tcp --dport P -m set ! --match-set <set> src -j DROP`
//! (udp likewise), and INPUT jumps to it first.
//!
//! The chain is declared and refilled with one `iptables-restore --noflush` (one commit: never
//! a moment with the chain empty), and the jump is added only when `-S` does not list it, so
//! restarts add nothing. The rules are installed by [`Backend::enforce`], after the sets are
//! synced, not by [`Backend::ensure`]: a rule iptables refuses (say, without CAP_NET_RAW, which
//! `--match-set` needs) is an error of its own and never keeps the sets empty. A chain of that
//! name whose rules are not all of that form is [`BackendError::Foreign`] (never changed). Teardown removes the jump and the chain before
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

/// Name of the iptables/ip6tables chain allowsync fills with its enforcement rules. Reserved.
pub const ENFORCE_CHAIN: &str = "ALLOWSYNC";

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

    pub(super) fn ensure_enforcement(&self) -> Result<(), BackendError> {
        for family in Family::BOTH {
            let Some((iptables, restore, set)) = self.firewall(family) else {
                if self.enforce.is_some() {
                    return Err(BackendError::Unavailable(
                        "iptables programs missing: install the Debian package `iptables`".into(),
                    ));
                }
                continue;
            };
            let object = chain_object(iptables);
            let state = self.chain_state(iptables)?;
            let ours = state.is_ours(set);
            match &self.enforce {
                Some(enforce) => {
                    if state.exists && !ours {
                        return Err(BackendError::Foreign {
                            object,
                            why: format!(
                                "it holds rules allowsync did not write ({}); the name is reserved for allowsync's enforcement",
                                state.rules.join(" | ")
                            ),
                        });
                    }
                    // Declaring the chain in a --noflush restore flushes it; the rules follow in
                    // the same commit, so the chain is never seen empty.
                    let mut script = format!("*filter\n:{ENFORCE_CHAIN} - [0:0]\n");
                    for rule in enforce_rules(set, enforce) {
                        let _ = writeln!(script, "-A {ENFORCE_CHAIN} {rule}");
                    }
                    if state.jumps == 0 {
                        let _ = writeln!(script, "-I INPUT 1 -j {ENFORCE_CHAIN}");
                    }
                    script.push_str("COMMIT\n");
                    run(restore, &["-w", "--noflush"], Some(script.as_bytes()), "install rules", &object)?;
                    debug!(chain = %object, jump_added = state.jumps == 0, "enforcement rules installed");
                }
                None if state.exists && ours => {
                    warn!(chain = %object, "enforcement is not configured: removing the enforcement chain");
                    self.remove_chain(restore, &state, &object)?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Removes INPUT's jumps and the enforcement chain (iptables and ip6tables), for teardown;
    /// a chain of that name that allowsync did not write is left alone.
    pub(super) fn teardown_enforcement(&self) -> Result<(), BackendError> {
        for family in Family::BOTH {
            let Some((iptables, restore, set)) = self.firewall(family) else { continue };
            let object = chain_object(iptables);
            let state = self.chain_state(iptables)?;
            if state.exists && state.is_ours(set) {
                self.remove_chain(restore, &state, &object)?;
            } else if state.exists {
                warn!(chain = %object, "not removing a chain allowsync did not write");
            }
        }
        Ok(())
    }

    /// Removes INPUT's jumps to the chain and the chain, in one commit.
    fn remove_chain(&self, restore: &Path, state: &ChainState, object: &str) -> Result<(), BackendError> {
        let mut script = String::from("*filter\n");
        for _ in 0..state.jumps {
            let _ = writeln!(script, "-D INPUT -j {ENFORCE_CHAIN}");
        }
        let _ = writeln!(script, "-F {ENFORCE_CHAIN}\n-X {ENFORCE_CHAIN}\nCOMMIT");
        run(restore, &["-w", "--noflush"], Some(script.as_bytes()), "remove rules", object).map(drop)
    }
}

fn chain_object(iptables: &Path) -> String {
    let prog = iptables
        .file_name()
        .map_or_else(|| iptables.display().to_string(), |n| n.to_string_lossy().into_owned());
    format!("{prog} chain filter {ENFORCE_CHAIN}")
}

/// What `iptables -S` shows about [`ENFORCE_CHAIN`].
#[derive(Debug, Default)]
struct ChainState {
    exists: bool,
    rules: Vec<String>,
    jumps: usize,
}

impl ChainState {
    fn parse(listing: &str) -> Self {
        let mut s = ChainState::default();
        let rule_prefix = format!("-A {ENFORCE_CHAIN} ");
        for line in listing.lines().map(str::trim) {
            if line == format!("-N {ENFORCE_CHAIN}") {
                s.exists = true;
            } else if let Some(rule) = line.strip_prefix(&rule_prefix) {
                s.rules.push(rule.to_string());
            } else if line == format!("-A INPUT -j {ENFORCE_CHAIN}") {
                s.jumps += 1;
            }
        }
        s
    }

    /// Every rule is one allowsync writes (for any ports): loopback, or a drop of sources not
    /// in `set`.
    fn is_ours(&self, set: &str) -> bool {
        let drop = format!("-m set ! --match-set {set} src -j DROP");
        self.rules.iter().all(|r| r == "-i lo -j RETURN" || r.ends_with(&drop))
    }
}

/// The rules of [`ENFORCE_CHAIN`] for one family, as `iptables` arguments: loopback first, then
/// TCP ports, then UDP ports.
pub fn enforce_rules(set: &str, enforce: &Enforce) -> Vec<String> {
    let mut out = vec!["-i lo -j RETURN".to_string()];
    let ports =
        enforce.tcp_ports.iter().map(|p| ("tcp", p)).chain(enforce.udp_ports.iter().map(|p| ("udp", p)));
    for (proto, port) in ports {
        out.push(format!("-p {proto} -m {proto} --dport {port} -m set ! --match-set {set} src -j DROP"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_listing_is_recognised() {
        let s = ChainState::parse(
            "-P INPUT ACCEPT\n-N ALLOWSYNC\n-A INPUT -j ALLOWSYNC\n-A ALLOWSYNC -i lo -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP\n",
        );
        assert!(s.exists && s.jumps == 1 && s.is_ours("v4"));
        assert!(!s.is_ours("other"));
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53], ..Enforce::default() };
        assert_eq!(
            enforce_rules("v4", &e)[1],
            "-p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP"
        );
    }
}
