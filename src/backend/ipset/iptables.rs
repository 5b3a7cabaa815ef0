//! Enforcement for the ipset backend: with `enforce`, the chain [`ENFORCE_CHAIN`] of iptables
//! (with `<set_v4>`) and ip6tables (with `<set_v6>`) holds `-i lo -j RETURN`, then per port
//! `-p tcp --dport P [-m addrtype --dst-type LOCAL] -m set ! --match-set <set> src -j DROP`
//! (udp likewise), and a built-in chain jumps to it first. Every one of these rules, the jump
//! included, carries `-m comment --comment "managed by allowsync"`: that mark (with the state
//! file's record of the chain) is what makes the chain allowsync's (see [`crate::ownership`]).
//! Where it lives is the scope's ([`hook_of`]):
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
//! list it, so restarts add nothing. A chain that already holds exactly these rules, with the
//! jump in place, is left as it is: a sync with nothing to change writes nothing. A chain of allowsync's left in the other scope's table
//! (before `scope` changed) is removed by the same `iptables-restore`, after the new one is
//! committed: both filter for a moment, never neither. One without the mark (an earlier
//! version's, or anyone's) is never removed. The rules are
//! installed by [`Backend::enforce`], after the sets are synced, not by [`Backend::ensure`]: a
//! rule iptables refuses (say, without CAP_NET_RAW, which `--match-set` needs) is an error of
//! its own and never keeps the sets empty. A chain of that name that is not allowsync's is
//! [`BackendError::Foreign`] where allowsync needs it, and is never changed. Teardown removes
//! the jumps and the chains before destroying the sets: the kernel refuses to destroy a set a
//! rule references.

use std::fmt::Write as _;
use std::path::Path;

use tracing::{debug, info, warn};

use super::cmd::run;
use super::{Family, IpsetBackend};
#[cfg(doc)]
use crate::backend::Backend;
use crate::backend::BackendError;
use crate::config::{Enforce, EnforceScope};
use crate::ownership::{MARK, Object, Xtables};

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

    /// What `-S` shows of `scope`'s table: whether our chain exists, its rules, and how many
    /// jumps the built-in chain has to it.
    fn chain_state(&self, iptables: &Path, scope: EnforceScope) -> Result<ChainState, BackendError> {
        let (table, parent) = hook_of(scope);
        let out =
            run(iptables, &["-w", "-t", table, "-S"], None, "list rules", &chain_object(iptables, scope))?;
        Ok(ChainState::parse(&out.stdout, parent))
    }

    /// Whether the chain `state` describes is allowsync's: every rule in it carries the mark,
    /// and it has one (an empty chain is allowsync's only when the state file records it).
    fn chain_is_ours(&self, family: Family, scope: EnforceScope, state: &ChainState) -> bool {
        let recorded = self.owned_chains.contains(&chain_of(family, scope));
        state.exists && state.all_marked() && (!state.rules.is_empty() || recorded)
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
            // The configured scope's chain first, then the removal of ours elsewhere: one
            // iptables-restore, one commit per table, in that order.
            let mut script = String::new();
            let (mut installed, mut removed) = (None, Vec::new());
            if let Some(enforce) = &self.enforce {
                let state = self.chain_state(&iptables, enforce.scope)?;
                if state.exists && !self.chain_is_ours(family, enforce.scope, &state) {
                    return Err(foreign_chain(&chain_object(&iptables, enforce.scope), &iptables, &state));
                }
                if !state.is_current(&set, enforce) {
                    install_script(&mut script, enforce, &set, &state);
                }
                installed = Some(enforce.scope);
            }
            for scope in SCOPES.into_iter().filter(|s| self.enforce.as_ref().is_none_or(|e| e.scope != *s)) {
                let state = self.chain_state(&iptables, scope)?;
                let chain = chain_object(&iptables, scope);
                if self.chain_is_ours(family, scope, &state) {
                    match &self.enforce {
                        None => warn!(
                            chain,
                            "enforcement is not configured: removing allowsync's enforcement chain"
                        ),
                        Some(e) => {
                            info!(chain, scope = ?e.scope, "removing the enforcement chain of the other scope")
                        }
                    }
                    removal_script(&mut script, scope, &state);
                    removed.push(scope);
                } else if state.exists {
                    debug!(
                        chain,
                        "a chain named like the enforcement chain that is not allowsync's: left alone"
                    );
                }
            }
            if !script.is_empty() {
                let object =
                    chain_object(&iptables, self.enforce.as_ref().map_or(EnforceScope::Host, |e| e.scope));
                run(&restore, &["-w", "--noflush"], Some(script.as_bytes()), "install rules", &object)?;
                debug!(chain = %object, "enforcement rules installed");
            }
            self.owned_chains.extend(installed.map(|s| chain_of(family, s)));
            for scope in removed {
                self.owned_chains.remove(&chain_of(family, scope));
            }
        }
        Ok(())
    }

    /// What [`IpsetBackend::ensure_enforcement`] would put back in the configured scope: per
    /// family, the chain, its rules or the built-in chain's jump to it. Nothing without
    /// `enforce`.
    pub(super) fn missing_enforcement(&self) -> Result<Vec<String>, BackendError> {
        let mut out = Vec::new();
        let Some(enforce) = &self.enforce else { return Ok(out) };
        for family in Family::BOTH {
            let Some((iptables, _, set)) = self.firewall(family) else { continue };
            let object = chain_object(iptables, enforce.scope);
            let state = self.chain_state(iptables, enforce.scope)?;
            if !state.exists {
                out.push(object);
            } else if !self.chain_is_ours(family, enforce.scope, &state) {
                return Err(foreign_chain(&object, iptables, &state));
            } else if !state.is_current(set, enforce) {
                if state.rules != enforce_rules(set, enforce) {
                    out.push(format!("the rules of {object}"));
                }
                if state.jumps == 0 {
                    out.push(format!("{}'s jump to {object}", hook_of(enforce.scope).1));
                }
            }
        }
        Ok(out)
    }

    /// Removes the jumps and the enforcement chains (iptables and ip6tables, every scope's
    /// table), for teardown; a chain of that name that allowsync did not write is left alone.
    /// Returns the report's lines: `(removed, left)`.
    pub(super) fn teardown_enforcement(&mut self) -> Result<(Vec<String>, Vec<String>), BackendError> {
        let (mut removed, mut left) = (Vec::new(), Vec::new());
        for family in Family::BOTH {
            let Some((iptables, restore, _)) = self.firewall(family) else { continue };
            let (iptables, restore) = (iptables.to_path_buf(), restore.to_path_buf());
            let mut script = String::new();
            for scope in SCOPES {
                let state = self.chain_state(&iptables, scope)?;
                let object = chain_object(&iptables, scope);
                if self.chain_is_ours(family, scope, &state) {
                    removal_script(&mut script, scope, &state);
                    removed.push(object);
                } else if state.exists {
                    warn!(chain = %object, "not removing a chain allowsync did not write");
                    let (table, parent) = hook_of(scope);
                    left.push(format!(
                        "{object}: allowsync did not create it (its rules carry no comment \"{MARK}\"); if an earlier allowsync (one that did not mark its rules) did, remove it with `{0} -t {table} -D {parent} -j {ENFORCE_CHAIN}; {0} -t {table} -F {ENFORCE_CHAIN}; {0} -t {table} -X {ENFORCE_CHAIN}`",
                        program(&iptables)
                    ));
                }
                self.owned_chains.remove(&chain_of(family, scope));
            }
            if !script.is_empty() {
                let object = chain_object(&iptables, EnforceScope::Host);
                run(&restore, &["-w", "--noflush"], Some(script.as_bytes()), "remove rules", &object)?;
            }
        }
        Ok((removed, left))
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
        let _ = writeln!(script, "-I {parent} 1 {} -j {ENFORCE_CHAIN}", mark_match());
    }
    script.push_str("COMMIT\n");
}

/// Appends the table block that removes the built-in chain's jumps (ours: marked) and the chain.
fn removal_script(script: &mut String, scope: EnforceScope, state: &ChainState) {
    let (table, parent) = hook_of(scope);
    let _ = writeln!(script, "*{table}");
    for _ in 0..state.jumps {
        let _ = writeln!(script, "-D {parent} {} -j {ENFORCE_CHAIN}", mark_match());
    }
    let _ = writeln!(script, "-F {ENFORCE_CHAIN}\n-X {ENFORCE_CHAIN}\nCOMMIT");
}

fn foreign_chain(object: &str, iptables: &Path, state: &ChainState) -> BackendError {
    let theirs: Vec<&str> =
        state.rules.iter().filter(|r| !r.contains(&mark_match())).map(String::as_str).collect();
    let what = if theirs.is_empty() {
        "exists, empty,".to_string()
    } else {
        format!("holds rules allowsync did not write ({}), so", theirs.join(" | "))
    };
    let table = object.split_whitespace().nth(2).unwrap_or("filter");
    BackendError::Foreign {
        object: object.to_string(),
        why: format!(
            "{what} allowsync did not create it; allowsync never changes a chain it did not create (the name is reserved for its enforcement)"
        ),
        fix: format!(
            "rename your chain; if an earlier allowsync wrote it (its rules carry no comment \"{MARK}\"), remove it with `{0} -t {table} -F {ENFORCE_CHAIN}` after deleting the jumps to it, then `{0} -t {table} -X {ENFORCE_CHAIN}`, and allowsync installs its own",
            program(iptables)
        ),
    }
}

fn program(iptables: &Path) -> String {
    iptables.file_name().map_or_else(|| iptables.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn chain_object(iptables: &Path, scope: EnforceScope) -> String {
    format!("{} chain {} {ENFORCE_CHAIN}", program(iptables), hook_of(scope).0)
}

/// The enforcement chain of `family` in `scope`'s table, as the state file records it.
pub(super) fn chain_of(family: Family, scope: EnforceScope) -> Object {
    let program = match family {
        Family::V4 => Xtables::Iptables,
        Family::V6 => Xtables::Ip6tables,
    };
    Object::XtChain { program, table: hook_of(scope).0.into(), chain: ENFORCE_CHAIN.into() }
}

/// What `iptables -S` of one table shows about [`ENFORCE_CHAIN`].
#[derive(Debug, Default)]
struct ChainState {
    exists: bool,
    rules: Vec<String>,
    /// The built-in chain's jumps to it that allowsync added (marked).
    jumps: usize,
}

impl ChainState {
    /// `parent`: the built-in chain whose jumps to ours are counted.
    fn parse(listing: &str, parent: &str) -> Self {
        let mut s = ChainState::default();
        let rule_prefix = format!("-A {ENFORCE_CHAIN} ");
        let jump = format!("-A {parent} {} -j {ENFORCE_CHAIN}", mark_match());
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

    /// The chain holds exactly the rules of `enforce` and the built-in chain jumps to it.
    fn is_current(&self, set: &str, enforce: &Enforce) -> bool {
        self.exists && self.jumps > 0 && self.rules == enforce_rules(set, enforce)
    }
}

/// The rules of [`ENFORCE_CHAIN`] for one family, as `iptables` arguments (and as `-S` prints
/// them), each with the mark: loopback first, then TCP ports, then UDP ports. With `scope:
/// host` each drop is limited to packets addressed to one of this host's addresses (`-m
/// addrtype --dst-type LOCAL`, the kernel's `RTN_LOCAL`, as nftables' `fib daddr type local`):
/// in PREROUTING that leaves routed traffic alone. Broadcast and multicast destinations are
/// other types, so not matched.
pub fn enforce_rules(set: &str, enforce: &Enforce) -> Vec<String> {
    let mark = mark_match();
    let mut out = vec![format!("-i lo {mark} -j RETURN")];
    let to_host = match enforce.scope {
        EnforceScope::Host => "-m addrtype --dst-type LOCAL ",
        EnforceScope::Local => "",
    };
    let ports =
        enforce.tcp_ports.iter().map(|p| ("tcp", p)).chain(enforce.udp_ports.iter().map(|p| ("udp", p)));
    for (proto, port) in ports {
        out.push(format!(
            "-p {proto} -m {proto} --dport {port} {to_host}-m set ! --match-set {set} src {mark} -j DROP"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_listing_is_recognised_by_its_mark() {
        let mark = "-m comment --comment \"managed by allowsync\"";
        let listing = format!(
            "-P INPUT ACCEPT\n-N ALLOWSYNC\n-A INPUT {mark} -j ALLOWSYNC\n-A ALLOWSYNC -i lo {mark} -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src {mark} -j DROP\n"
        );
        let s = ChainState::parse(&listing, "INPUT");
        assert!(s.exists && s.jumps == 1 && s.all_marked());
        assert_eq!(ChainState::parse(&listing, "PREROUTING").jumps, 0);
        // The same rules without the mark (an earlier allowsync's, or anyone's): not ours.
        let legacy = ChainState::parse(
            "-N ALLOWSYNC\n-A INPUT -j ALLOWSYNC\n-A ALLOWSYNC -i lo -j RETURN\n\
             -A ALLOWSYNC -p tcp -m tcp --dport 443 -m set ! --match-set v4 src -j DROP\n",
            "INPUT",
        );
        assert!(legacy.exists && legacy.jumps == 0 && !legacy.all_marked());
        let local = |tcp_ports| Enforce { tcp_ports, udp_ports: vec![], scope: EnforceScope::Local };
        assert!(s.is_current("v4", &local(vec![443])), "nothing to write");
        assert!(!s.is_current("v4", &local(vec![443, 80])));
        assert!(!legacy.is_current("v4", &local(vec![443])));
        let e = Enforce { tcp_ports: vec![443], udp_ports: vec![53], scope: EnforceScope::Local };
        assert_eq!(
            enforce_rules("v4", &e)[1],
            format!("-p tcp -m tcp --dport 443 -m set ! --match-set v4 src {mark} -j DROP")
        );
        let host = Enforce { scope: EnforceScope::Host, ..e.clone() };
        assert_eq!(
            enforce_rules("v4", &host)[2],
            format!(
                "-p udp -m udp --dport 53 -m addrtype --dst-type LOCAL -m set ! --match-set v4 src {mark} -j DROP"
            )
        );
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
        let mark = "-m comment --comment \"managed by allowsync\"";
        assert_eq!(
            script,
            format!(
                "*mangle\n:ALLOWSYNC - [0:0]\n-A ALLOWSYNC -i lo {mark} -j RETURN\n\
                 -A ALLOWSYNC -p tcp -m tcp --dport 443 -m addrtype --dst-type LOCAL -m set ! --match-set v4 src {mark} -j DROP\n\
                 -I PREROUTING 1 {mark} -j ALLOWSYNC\nCOMMIT\n\
                 *filter\n-D INPUT {mark} -j ALLOWSYNC\n-F ALLOWSYNC\n-X ALLOWSYNC\nCOMMIT\n"
            )
        );
    }
}
