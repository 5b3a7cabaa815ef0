//! Enforcement for the ipset backend: with `enforce`, the chain [`ENFORCE_CHAIN`] of iptables
//! (with `<set_v4>`) and ip6tables (with `<set_v6>`) holds `-i lo -j RETURN`, then per port
//! `-p tcp --dport P [-m addrtype --dst-type LOCAL] -m set ! --match-set <set> src -j DROP`
//! (udp likewise), and a built-in chain jumps to it first. Where it lives is the scope's
//! ([`hook_of`]):
//!
//! - `host` (the default): the `mangle` table, jumped to from PREROUTING. That hook runs at
//!   priority -150, the same as the nftables backend's chain: after conntrack, before the `nat`
//!   table's DNAT (-100), so `--dport` is the port the client connected to, and every packet
//!   addressed to one of this host's addresses (`--dst-type LOCAL`) is judged, whether it ends
//!   at a local socket or is DNATed on to a container. Routed traffic is not LOCAL and is left
//!   alone. Not `raw` (-300): it would work too, but mangle keeps both backends on the same hook
//!   and priority, so one conformance suite describes both. Not Docker's DOCKER-USER with
//!   `--ctorigdstport`: that chain exists only where Docker runs (not under Kubernetes, libvirt
//!   or Docker's nftables backend), is in FORWARD, so local sockets would need INPUT as well,
//!   and Docker rewrites it.
//! - `local`: the `filter` table, jumped to from INPUT (earlier versions' place): only what
//!   reaches a local socket.
//!
//! The chain is declared and refilled with one `iptables-restore --noflush` (one commit per
//! table: never a moment with the chain empty), and the jump is added only when `-S` does not
//! list it, so restarts add nothing. A chain of allowsync's left in the other scope's table (by
//! an earlier version, or before `scope` changed) is removed by the same `iptables-restore`,
//! after the new one is committed: both filter for a moment, never neither. The rules are
//! installed by [`Backend::enforce`], after the sets are synced, not by [`Backend::ensure`]: a
//! rule iptables refuses (say, without CAP_NET_RAW, which `--match-set` needs) is an error of
//! its own and never keeps the sets empty. A chain of that name whose rules are not all of that
//! form is [`BackendError::Foreign`] where allowsync needs it, and is never changed. Teardown
//! removes the jumps and the chains before destroying the sets: the kernel refuses to destroy a
//! set a rule references.

use std::fmt::Write as _;
use std::path::Path;

use tracing::{debug, info, warn};

use super::cmd::run;
use super::{Family, IpsetBackend};
#[cfg(doc)]
use crate::backend::Backend;
use crate::backend::BackendError;
use crate::config::{Enforce, EnforceScope};

/// Name of the iptables/ip6tables chain allowsync fills with its enforcement rules. Reserved.
pub const ENFORCE_CHAIN: &str = "ALLOWSYNC";

/// Every scope, so that a chain left in the other one's table is found.
const SCOPES: [EnforceScope; 2] = [EnforceScope::Host, EnforceScope::Local];

/// `(table, built-in chain that jumps to ENFORCE_CHAIN)` of a scope.
pub fn hook_of(scope: EnforceScope) -> (&'static str, &'static str) {
    match scope {
        EnforceScope::Host => ("mangle", "PREROUTING"),
        EnforceScope::Local => ("filter", "INPUT"),
    }
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

    /// What `-S` shows of `scope`'s table: whether our chain exists, its rules, and how many
    /// jumps the built-in chain has to it.
    fn chain_state(&self, iptables: &Path, scope: EnforceScope) -> Result<ChainState, BackendError> {
        let (table, parent) = hook_of(scope);
        let out =
            run(iptables, &["-w", "-t", table, "-S"], None, "list rules", &chain_object(iptables, scope))?;
        Ok(ChainState::parse(&out.stdout, parent))
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
            // The configured scope's chain first, then the removal of ours elsewhere: one
            // iptables-restore, one commit per table, in that order.
            let mut script = String::new();
            if let Some(enforce) = &self.enforce {
                let state = self.chain_state(iptables, enforce.scope)?;
                if state.exists && !state.is_ours(set) {
                    return Err(BackendError::Foreign {
                        object: chain_object(iptables, enforce.scope),
                        why: format!(
                            "it holds rules allowsync did not write ({}); the name is reserved for allowsync's enforcement",
                            state.rules.join(" | ")
                        ),
                    });
                }
                install_script(&mut script, enforce, set, &state);
            }
            for scope in SCOPES.into_iter().filter(|s| self.enforce.as_ref().is_none_or(|e| e.scope != *s)) {
                let state = self.chain_state(iptables, scope)?;
                if state.exists && state.is_ours(set) {
                    let chain = chain_object(iptables, scope);
                    match &self.enforce {
                        None => warn!(chain, "enforcement is not configured: removing the enforcement chain"),
                        Some(e) => {
                            info!(chain, scope = ?e.scope, "removing the enforcement chain of the other scope")
                        }
                    }
                    removal_script(&mut script, scope, &state);
                }
            }
            if !script.is_empty() {
                let object =
                    chain_object(iptables, self.enforce.as_ref().map_or(EnforceScope::Host, |e| e.scope));
                run(restore, &["-w", "--noflush"], Some(script.as_bytes()), "install rules", &object)?;
                debug!(chain = %object, "enforcement rules installed");
            }
        }
        Ok(())
    }

    /// Removes the jumps and the enforcement chains (iptables and ip6tables, every scope's
    /// table), for teardown; a chain of that name that allowsync did not write is left alone.
    pub(super) fn teardown_enforcement(&self) -> Result<(), BackendError> {
        for family in Family::BOTH {
            let Some((iptables, restore, set)) = self.firewall(family) else { continue };
            let mut script = String::new();
            for scope in SCOPES {
                let state = self.chain_state(iptables, scope)?;
                if state.exists && state.is_ours(set) {
                    removal_script(&mut script, scope, &state);
                } else if state.exists {
                    warn!(chain = %chain_object(iptables, scope), "not removing a chain allowsync did not write");
                }
            }
            if !script.is_empty() {
                let object = chain_object(iptables, EnforceScope::Host);
                run(restore, &["-w", "--noflush"], Some(script.as_bytes()), "remove rules", &object)?;
            }
        }
        Ok(())
    }
}

/// Appends the table block that declares (so flushes) the chain, fills it, and adds the jump
/// when `state` lists none.
fn install_script(script: &mut String, enforce: &Enforce, set: &str, state: &ChainState) {
    let (table, parent) = hook_of(enforce.scope);
    // Declaring the chain in a --noflush restore flushes it; the rules follow in the same
    // commit, so the chain is never seen empty.
    let _ = writeln!(script, "*{table}\n:{ENFORCE_CHAIN} - [0:0]");
    for rule in enforce_rules(set, enforce) {
        let _ = writeln!(script, "-A {ENFORCE_CHAIN} {rule}");
    }
    if state.jumps == 0 {
        let _ = writeln!(script, "-I {parent} 1 -j {ENFORCE_CHAIN}");
    }
    script.push_str("COMMIT\n");
}

/// Appends the table block that removes the built-in chain's jumps and the chain.
fn removal_script(script: &mut String, scope: EnforceScope, state: &ChainState) {
    let (table, parent) = hook_of(scope);
    let _ = writeln!(script, "*{table}");
    for _ in 0..state.jumps {
        let _ = writeln!(script, "-D {parent} -j {ENFORCE_CHAIN}");
    }
    let _ = writeln!(script, "-F {ENFORCE_CHAIN}\n-X {ENFORCE_CHAIN}\nCOMMIT");
}

fn chain_object(iptables: &Path, scope: EnforceScope) -> String {
    let prog = iptables
        .file_name()
        .map_or_else(|| iptables.display().to_string(), |n| n.to_string_lossy().into_owned());
    format!("{prog} chain {} {ENFORCE_CHAIN}", hook_of(scope).0)
}

/// What `iptables -S` of one table shows about [`ENFORCE_CHAIN`].
#[derive(Debug, Default)]
struct ChainState {
    exists: bool,
    rules: Vec<String>,
    jumps: usize,
}

impl ChainState {
    /// `parent`: the built-in chain whose jumps to ours are counted.
    fn parse(listing: &str, parent: &str) -> Self {
        let mut s = ChainState::default();
        let rule_prefix = format!("-A {ENFORCE_CHAIN} ");
        for line in listing.lines().map(str::trim) {
            if line == format!("-N {ENFORCE_CHAIN}") {
                s.exists = true;
            } else if let Some(rule) = line.strip_prefix(&rule_prefix) {
                s.rules.push(rule.to_string());
            } else if line == format!("-A {parent} -j {ENFORCE_CHAIN}") {
                s.jumps += 1;
            }
        }
        s
    }

    /// Every rule is one allowsync writes (for any ports and either scope): loopback, or a
    /// drop of sources not in `set`.
    fn is_ours(&self, set: &str) -> bool {
        let drop = format!("-m set ! --match-set {set} src -j DROP");
        self.rules.iter().all(|r| r == "-i lo -j RETURN" || r.ends_with(&drop))
    }
}

/// The rules of [`ENFORCE_CHAIN`] for one family, as `iptables` arguments: loopback first, then
/// TCP ports, then UDP ports. With `scope: host` each drop is limited to packets addressed to
/// one of this host's addresses (`-m addrtype --dst-type LOCAL`, the kernel's `RTN_LOCAL`, as
/// nftables' `fib daddr type local`): in PREROUTING that leaves routed traffic alone.
/// Broadcast and multicast destinations are other types, so not matched.
pub fn enforce_rules(set: &str, enforce: &Enforce) -> Vec<String> {
    let mut out = vec!["-i lo -j RETURN".to_string()];
    let to_host = match enforce.scope {
        EnforceScope::Host => "-m addrtype --dst-type LOCAL ",
        EnforceScope::Local => "",
    };
    let ports =
        enforce.tcp_ports.iter().map(|p| ("tcp", p)).chain(enforce.udp_ports.iter().map(|p| ("udp", p)));
    for (proto, port) in ports {
        out.push(format!(
            "-p {proto} -m {proto} --dport {port} {to_host}-m set ! --match-set {set} src -j DROP"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_listing_is_recognised() {
        let listing = "-P INPUT ACCEPT\n-N ALLOWSYNC\n-A INPUT -j ALLOWSYNC\n-A ALLOWSYNC -i lo -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP\n";
        let s = ChainState::parse(listing, "INPUT");
        assert!(s.exists && s.jumps == 1 && s.is_ours("v4"));
        assert!(!s.is_ours("other"));
        assert_eq!(ChainState::parse(listing, "PREROUTING").jumps, 0);
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53], scope: EnforceScope::Local };
        assert_eq!(
            enforce_rules("v4", &e)[1],
            "-p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP"
        );
        let host = Enforce { scope: EnforceScope::Host, ..e.clone() };
        assert_eq!(
            enforce_rules("v4", &host)[2],
            "-p udp -m udp --dport 53 -m addrtype --dst-type LOCAL -m set ! --match-set v4 src -j DROP"
        );
        // Either scope's rules are recognised as ours (a migration finds the old ones).
        let both = format!(
            "-N ALLOWSYNC\n-A ALLOWSYNC {}\n-A ALLOWSYNC {}\n",
            enforce_rules("v4", &host)[1],
            enforce_rules("v4", &e)[1]
        );
        assert!(ChainState::parse(&both, "PREROUTING").is_ours("v4"));
    }

    #[test]
    fn a_migration_installs_the_new_chain_before_it_removes_the_old_one() {
        let host = Enforce { tcp_ports: vec![443], udp_ports: vec![], scope: EnforceScope::Host };
        let mut script = String::new();
        install_script(&mut script, &host, "v4", &ChainState::default());
        removal_script(
            &mut script,
            EnforceScope::Local,
            &ChainState { exists: true, rules: vec![], jumps: 1 },
        );
        assert_eq!(
            script,
            "*mangle\n:ALLOWSYNC - [0:0]\n-A ALLOWSYNC -i lo -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m addrtype --dst-type LOCAL -m set ! --match-set v4 src -j DROP\n\
             -I PREROUTING 1 -j ALLOWSYNC\nCOMMIT\n\
             *filter\n-D INPUT -j ALLOWSYNC\n-F ALLOWSYNC\n-X ALLOWSYNC\nCOMMIT\n"
        );
    }
}
