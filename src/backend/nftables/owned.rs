//! The nftables backend's decisions about ownership (see [`crate::ownership`]): which objects
//! are allowsync's (those with its comment), what `ensure` creates, refuses and removes, and
//! what `teardown` removes, empties and leaves.
//!
//! - allowsync creates tables and sets only in its own table, and only when that table is its
//!   own (or missing, then it creates it). An operator's set must exist; its elements are all
//!   allowsync changes in it.
//! - The enforcement chain is rewritten only when it carries the mark; a chain of that name
//!   without it is refused with `enforce`, left alone without. One that holds exactly the rules
//!   allowsync writes (their comments say so: see `batch.rs`) is not rewritten at all, so
//!   that an ensure with everything in place writes nothing.
//! - Objects the state file records as owned that the configuration no longer uses are removed
//!   in the same transaction that creates the new ones (a reload moving to another table or set
//!   is one commit), provided they still carry the mark. A table goes whole only when everything
//!   in it is allowsync's; otherwise its marked objects go one by one and it stays. A removal the
//!   kernel refuses because a rule of the operator's still uses the object (EBUSY) is dropped
//!   from the transaction, which then goes ahead without it, and the object stays recorded.
//! - A set created to replace another starts with that set's elements, in that commit.

use std::collections::BTreeSet;

use tracing::{debug, info, warn};

use super::batch::Step;
use super::query::{self, ChainInfo, Contents, SetInfo, marked};
use super::{ENFORCE_CHAIN, Family, Name, NftablesBackend};
use crate::backend::BackendError;
use crate::backend::netlink::NfSocket;
use crate::ownership::{Footprint, MARK, Object, Teardown};
use crate::prefixes::AllowSet;

/// Set flags the libc crate does not define (linux/netfilter/nf_tables.h).
const NFT_SET_OBJECT: u32 = 0x40;
const NFT_SET_CONCAT: u32 = 0x80;

/// What `ensure` will send, and what allowsync owns afterwards.
pub(super) struct EnsurePlan {
    pub(super) steps: Vec<Step>,
    /// Owned afterwards if every step goes through.
    pub(super) footprint: Footprint,
    /// The removals of objects an earlier configuration left, each with the recorded objects it
    /// takes along: they stay owned when the kernel refuses the removal.
    cleanup: Vec<(Step, Vec<Object>)>,
    /// The enforcement chain exists (then a [`Step::Enforce`] rewrites its rules).
    chain_exists: bool,
}

impl EnsurePlan {
    fn is_cleanup(&self, step: &Step, b: &NftablesBackend) -> bool {
        self.cleanup.iter().any(|(s, _)| s.object(b) == step.object(b))
    }

    /// The footprint once the transaction went through without the `dropped` steps.
    pub(super) fn footprint_after(&self, b: &NftablesBackend, dropped: &[(Step, BackendError)]) -> Footprint {
        let mut f = self.footprint.clone();
        for (step, _) in dropped {
            if let Some((_, covers)) = self.cleanup.iter().find(|(s, _)| s.object(b) == step.object(b)) {
                f.owned.extend(covers.iter().cloned());
            }
        }
        f
    }
}

/// What `teardown` will send: each step with the line it adds to the report and the recorded
/// objects it removes.
pub(super) struct TeardownPlan {
    pub(super) steps: Vec<(Step, String, Vec<Object>)>,
    left: Vec<String>,
}

impl TeardownPlan {
    /// The report and the footprint left, once the steps went through without `dropped`.
    pub(super) fn outcome(
        &self,
        b: &NftablesBackend,
        dropped: &[(Step, BackendError)],
    ) -> (Teardown, Footprint) {
        let mut report = Teardown::default();
        let mut owned = b.recorded.owned.clone();
        for (step, line, covers) in &self.steps {
            if let Some((_, e)) = dropped.iter().find(|(s, _)| s.object(b) == step.object(b)) {
                report.left.push(format!("{}: the kernel refused to remove it ({e})", step.object(b)));
                continue;
            }
            match step {
                Step::FlushSet(_) => report.emptied.push(line.clone()),
                _ => report.removed.push(line.clone()),
            }
            for o in covers {
                owned.remove(o);
            }
        }
        report.left.extend(self.left.iter().cloned());
        (report, Footprint { owned, sets: b.recorded.sets.clone(), ..Footprint::default() })
    }
}

impl Step {
    /// For the log: what the step does to which object.
    pub(super) fn describe(&self, b: &NftablesBackend) -> String {
        let verb = match self {
            Step::AddTable(_) | Step::AddSet { .. } => "add",
            Step::Enforce => "rewrite",
            Step::DeleteChain(_) | Step::DeleteSet(_) | Step::DeleteTable(_) => "delete",
            Step::FlushSet(_) => "flush",
        };
        match self {
            Step::AddSet { seed, .. } if !seed.is_empty() => {
                format!("{verb} {} with {} ranges", self.object(b), seed.len())
            }
            _ => format!("{verb} {}", self.object(b)),
        }
    }
}

impl NftablesBackend {
    /// Whether anything of allowsync's lives in its own table: a set, or the enforcement chain.
    pub(super) fn uses_own_table(&self) -> bool {
        self.enforce.is_some() || self.sets.iter().any(|s| s.table() == self.table)
    }

    /// `backend.nftables.set_v4` or `set_v6`, the key naming `set`.
    fn key_of(&self, set: &Name) -> &'static str {
        if *set == self.sets[0] { "set_v4" } else { "set_v6" }
    }

    pub(super) fn plan_ensure(&self, sock: &NfSocket) -> Result<EnsurePlan, BackendError> {
        let own = query::get_table(sock, &self.table)?;
        let own_is_ours = own.as_ref().is_none_or(|t| marked(&t.comment));
        let mut steps = Vec::new();
        let mut owned = BTreeSet::new();
        if self.uses_own_table() && own_is_ours {
            if own.is_none() {
                steps.push(Step::AddTable(self.table.clone()));
            }
            owned.insert(self.table.object.clone());
        }

        // Both sets are checked before anything is sent.
        for family in Family::BOTH {
            let set = self.set(family);
            match query::get_set(sock, set)? {
                Some(info) => {
                    self.check_set(set, family, &info)?;
                    if marked(&info.comment) {
                        owned.insert(set.object.clone());
                    }
                }
                None if set.table() == self.table && own_is_ours => {
                    steps.push(Step::AddSet { set: set.clone(), family, seed: self.seed(sock, family) });
                    owned.insert(set.object.clone());
                }
                None => return Err(self.absent(sock, set)?),
            }
        }

        let chain = match own {
            Some(_) => query::get_chain(sock, &self.chain)?,
            None => None,
        };
        let mut cleanup = Vec::new();
        match (&self.enforce, &chain) {
            (Some(_), Some(c)) if !marked(&c.comment) => return Err(self.foreign_chain(c)),
            (Some(e), c) => {
                // Ours, but of the other scope (an earlier version's input chain): the kernel
                // cannot change a base chain's hook in place, so it is recreated in the same
                // commit, which leaves no moment without enforcement.
                let other_scope = c.as_ref().is_some_and(|c| c.enforcement_scope() != Some(e.scope));
                if other_scope {
                    info!(chain = %self.chain.object, to = ?e.scope, "replacing the enforcement chain for the configured scope");
                    steps.push(Step::DeleteChain(self.chain.clone()));
                }
                // In place with exactly our rules: nothing to write.
                let want: Vec<Option<String>> = self.rule_comments(e).into_iter().map(Some).collect();
                let current = c.is_some() && !other_scope && query::rule_comments(sock, &self.chain)? == want;
                if !current {
                    steps.push(Step::Enforce);
                }
                owned.insert(self.chain.object.clone());
            }
            (None, Some(c)) if marked(&c.comment) => {
                warn!(chain = %self.chain.object, "enforcement is not configured: removing allowsync's enforcement chain");
                cleanup.push((Step::DeleteChain(self.chain.clone()), vec![self.chain.object.clone()]));
            }
            (None, Some(_)) => {
                debug!(chain = %self.chain.object, "a chain named like the enforcement chain that is not allowsync's: left alone");
            }
            (None, None) => {}
        }

        cleanup.extend(self.stale(sock, &owned, &cleanup)?);
        // Removals last: the new objects (and the rewritten chain's rules) are in place first,
        // and no rule refers to a set any more when it goes.
        cleanup.sort_by_key(|(s, _)| match s {
            Step::DeleteChain(_) => 0,
            Step::DeleteSet(_) => 1,
            _ => 2,
        });
        let kept = self.recorded.owned.iter().filter(|o| !o.is_nftables()).cloned();
        let mut footprint = Footprint {
            owned,
            sets: vec![self.sets[0].object.clone(), self.sets[1].object.clone()],
            ..Footprint::default()
        };
        footprint.owned.extend(kept);
        steps.extend(cleanup.iter().map(|(s, _)| s.clone()));
        Ok(EnsurePlan { steps, footprint, cleanup, chain_exists: chain.is_some() })
    }

    /// What `ensure` would put back now (not what it would remove), named for a log line.
    pub(super) fn missing_objects(&self, sock: &NfSocket) -> Result<Vec<String>, BackendError> {
        let plan = self.plan_ensure(sock)?;
        Ok(plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::AddTable(n) | Step::AddSet { set: n, .. } => Some(n.object.to_string()),
                Step::Enforce if plan.chain_exists => Some(format!("the rules of {}", self.chain.object)),
                Step::Enforce => Some(self.chain.object.to_string()),
                _ => None,
            })
            .collect())
    }

    /// Removals of what the state file records as owned that this configuration does not use,
    /// still carrying the mark; `scheduled` are removals already decided.
    fn stale(
        &self,
        sock: &NfSocket,
        used: &BTreeSet<Object>,
        scheduled: &[(Step, Vec<Object>)],
    ) -> Result<Vec<(Step, Vec<Object>)>, BackendError> {
        let candidates: Vec<&Object> =
            self.recorded.owned.iter().filter(|o| o.is_nftables() && !used.contains(o)).collect();
        let mut out: Vec<(Step, Vec<Object>)> = Vec::new();
        let mut gone_tables = Vec::new();
        for object in candidates.iter().filter(|o| matches!(o, Object::NftTable { .. })) {
            let t = Name::of(object)?;
            let Some(info) = query::get_table(sock, &t)? else { continue };
            if !marked(&info.comment) {
                warn!(table = %t.object, "recorded as allowsync's, but it no longer carries allowsync's comment: left alone");
                continue;
            }
            let contents = query::contents(sock, &t)?;
            let inside = |o: &&Object| o.nft_table().as_ref() == Some(*object);
            if holds_only_ours(&contents, info.objects) && !used.iter().any(|o| inside(&o)) {
                let covers = self.recorded.owned.iter().filter(|o| inside(o)).cloned().collect();
                out.push((Step::DeleteTable(t), covers));
                gone_tables.push((*object).clone());
            }
        }
        for object in candidates.iter().filter(|o| !matches!(o, Object::NftTable { .. })) {
            let in_gone_table = object.nft_table().is_some_and(|t| gone_tables.contains(&t));
            let decided = scheduled.iter().chain(&out).any(|(s, _)| s.object(self) == object.to_string());
            if in_gone_table || decided {
                continue;
            }
            let n = Name::of(object)?;
            let (exists, is_ours) = match object {
                Object::NftChain { .. } => {
                    query::get_chain(sock, &n)?.map_or((false, false), |c| (true, marked(&c.comment)))
                }
                _ => query::get_set(sock, &n)?.map_or((false, false), |s| (true, marked(&s.comment))),
            };
            if !exists {
                continue;
            }
            if !is_ours {
                warn!(object = %n.object, "recorded as allowsync's, but it no longer carries allowsync's comment: left alone");
                continue;
            }
            let step = match object {
                Object::NftChain { .. } => Step::DeleteChain(n),
                _ => Step::DeleteSet(n),
            };
            out.push((step, vec![(*object).clone()]));
        }
        Ok(out)
    }

    /// The elements of the set the state file says held the allowlist before, when that was
    /// another set than `family`'s now: a set created to replace it starts with them.
    fn seed(&self, sock: &NfSocket, family: Family) -> AllowSet {
        let Some(previous) = self.recorded.set(family == Family::V6) else { return AllowSet::default() };
        if previous == &self.set(family).object || !previous.is_nftables() {
            return AllowSet::default();
        }
        let read = Name::of(previous).and_then(|n| match family {
            Family::V4 => query::read_set::<u32>(sock, &n).map(|v4| AllowSet { v4, ..AllowSet::default() }),
            Family::V6 => query::read_set::<u128>(sock, &n).map(|v6| AllowSet { v6, ..AllowSet::default() }),
        });
        read.unwrap_or_else(|e| {
            debug!(set = %previous, error = %e, "the previous set cannot be read: the new one starts empty");
            AllowSet::default()
        })
    }

    /// Why `set` cannot hold the allowlist, if it cannot: in nft's words, with the fix.
    fn check_set(&self, set: &Name, family: Family, info: &SetInfo) -> Result<(), BackendError> {
        let want = family.type_name();
        let name = set.name.to_string_lossy();
        let declare = format!("declare it as `set {name} {{ type {want}; flags interval; }}`");
        let foreign =
            |why: String, fix: String| BackendError::Foreign { object: set.object.to_string(), why, fix };
        let flags = info.flags;
        if flags & (libc::NFT_SET_MAP as u32 | NFT_SET_OBJECT) != 0 {
            let key = self.key_of(set);
            return Err(foreign(
                "is a map, not a set".into(),
                format!("point backend.nftables.{key} at a set: {declare}"),
            ));
        }
        if flags & NFT_SET_CONCAT != 0
            || info.key_type != family.key_type()
            || info.key_len != family.key_len()
        {
            let key = self.key_of(set);
            return Err(foreign(
                format!("has type {}, not {want}", type_name(info.key_type, flags)),
                format!("{declare}, or point backend.nftables.{key} at such a set"),
            ));
        }
        let refused = [
            (libc::NFT_SET_CONSTANT, "constant", "its elements cannot be changed"),
            (libc::NFT_SET_TIMEOUT, "timeout", "its elements would expire"),
            (libc::NFT_SET_EVAL, "dynamic", "the packet path adds elements to it"),
            (libc::NFT_SET_ANONYMOUS, "anonymous", "it belongs to one rule"),
        ];
        if let Some((_, flag, why)) = refused.iter().find(|(f, _, _)| flags & *f as u32 != 0) {
            return Err(foreign(
                format!("has `flags {flag}`, so {why}"),
                format!("{declare}, without `{flag}`"),
            ));
        }
        if flags & libc::NFT_SET_INTERVAL as u32 == 0 {
            return Err(foreign(
                "lacks `flags interval`, which allowsync needs to hold address ranges".into(),
                declare,
            ));
        }
        Ok(())
    }

    fn foreign_chain(&self, chain: &ChainInfo) -> BackendError {
        let object = self.chain.object.to_string();
        let table = self.table.object.to_string();
        BackendError::Foreign {
            why: format!(
                "exists ({chain}) and allowsync did not create it (it has no comment \"{MARK}\"); allowsync never deletes, flushes, re-policies or rewrites a chain it did not create"
            ),
            fix: format!(
                "rename your chain (allowsync's enforcement chain is named `{ENFORCE_CHAIN}`), or set backend.nftables.table to a table of allowsync's own instead of {table} (the default, inet allowsync); if an earlier allowsync (one that did not mark its objects) created it, delete it (`nft delete {object}`) and allowsync creates its own"
            ),
            object,
        }
    }

    /// The error for a set the configuration names that does not exist: missing (allowsync
    /// creates it at its next sync) when it belongs in allowsync's own table, else absent, with
    /// the operator's fix.
    pub(super) fn missing_error(&self, sock: &NfSocket, object: &str) -> Result<BackendError, BackendError> {
        let Some(set) = self.sets.iter().find(|s| s.object.to_string() == object) else {
            return Ok(BackendError::Missing { object: object.to_string() });
        };
        let own = query::get_table(sock, &self.table)?;
        match own {
            None if set.table() == self.table => {
                Ok(BackendError::Missing { object: self.table.object.to_string() })
            }
            Some(t) if set.table() == self.table && marked(&t.comment) => {
                Ok(BackendError::Missing { object: object.to_string() })
            }
            _ => self.absent(sock, set),
        }
    }

    /// An operator's set (or its table) that does not exist, with the fix.
    fn absent(&self, sock: &NfSocket, set: &Name) -> Result<BackendError, BackendError> {
        let table = set.table();
        let key = self.key_of(set);
        let own = &self.table.object;
        Ok(match query::get_table(sock, &table)? {
            None => BackendError::Absent {
                object: table.object.to_string(),
                fix: format!(
                    "allowsync fills the sets of your ruleset but creates tables and sets only under its own name ({own}): load your ruleset first (allowsync.service starts after nftables.service), or correct backend.nftables.{key}"
                ),
            },
            Some(t) => {
                let why =
                    if marked(&t.comment) { "" } else { " (it has no comment \"managed by allowsync\")" };
                let family = if *set == self.sets[0] { Family::V4 } else { Family::V6 };
                BackendError::Absent {
                    object: set.object.to_string(),
                    fix: format!(
                        "{} is not allowsync's{why}, so allowsync does not create sets in it: declare it in your ruleset (`nft add {} '{{ type {}; flags interval; }}'`), or correct backend.nftables.{key}",
                        table.object,
                        set.object,
                        family.type_name()
                    ),
                }
            }
        })
    }

    /// Commits `steps` as one transaction. A removal the kernel refuses as busy (a rule of the
    /// operator's still uses the object) or finds gone, among the `optional` steps, is taken
    /// out and the rest sent again; each such step is returned with its refusal.
    pub(super) fn commit_steps(
        &self,
        mut steps: Vec<Step>,
        optional: impl Fn(&Step) -> bool,
    ) -> Result<Vec<(Step, BackendError)>, BackendError> {
        let mut dropped = Vec::new();
        while !steps.is_empty() {
            let Err(e) = self.transaction(&steps).commit() else { break };
            let at = e.refused_object().and_then(|(object, errno)| {
                let droppable = matches!(errno, Some(libc::EBUSY) | Some(libc::ENOENT));
                steps.iter().position(|s| droppable && optional(s) && s.object(self) == object)
            });
            let Some(i) = at else { return Err(e) };
            warn!(object = %steps[i].object(self), error = %e, "cannot remove it: going on without that step");
            dropped.push((steps.remove(i), e));
        }
        Ok(dropped)
    }

    pub(super) fn commit_ensure(&self, plan: &EnsurePlan) -> Result<Vec<(Step, BackendError)>, BackendError> {
        self.commit_steps(plan.steps.clone(), |s| plan.is_cleanup(s, self))
    }

    /// What `teardown` removes: every table of the configuration and the state file that is
    /// allowsync's and holds nothing else goes whole; from any other, allowsync's own chains and
    /// sets go one by one and the table stays; an operator's set allowsync filled is emptied.
    pub(super) fn plan_teardown(&self, sock: &NfSocket) -> Result<TeardownPlan, BackendError> {
        let mut tables: Vec<Object> = vec![self.table.object.clone()];
        let recorded = self.recorded.owned.iter().filter(|o| o.is_nftables());
        for o in self.sets.iter().map(|s| &s.object).chain(recorded) {
            if let Some(t) = o.nft_table().filter(|t| !tables.contains(t)) {
                tables.push(t);
            }
        }
        let mut plan = TeardownPlan { steps: Vec::new(), left: Vec::new() };
        let mut gone: Vec<Object> = Vec::new();
        for t in &tables {
            let name = Name::of(t)?;
            let Some(info) = query::get_table(sock, &name)? else { continue };
            let contents = query::contents(sock, &name)?;
            let inside = |o: &Object| o.nft_table().as_ref() == Some(t);
            if marked(&info.comment) && holds_only_ours(&contents, info.objects) {
                let mut what: Vec<String> =
                    contents.chains.iter().map(|c| format!("chain {}", c.name)).collect();
                what.extend(contents.sets.iter().map(|s| format!("set {}", s.name)));
                let line =
                    if what.is_empty() { t.to_string() } else { format!("{t} (with {})", what.join(", ")) };
                let mut covers: Vec<Object> =
                    self.recorded.owned.iter().filter(|o| inside(o)).cloned().collect();
                covers.push(t.clone());
                plan.steps.push((Step::DeleteTable(name), line, covers));
                gone.push(t.clone());
                continue;
            }
            for c in contents.chains.iter().filter(|c| marked(&c.comment)) {
                let n = name.child(&c.name, true);
                plan.steps.push((Step::DeleteChain(n.clone()), n.object.to_string(), vec![n.object.clone()]));
                gone.push(n.object);
            }
            for s in contents.sets.iter().filter(|s| marked(&s.comment)) {
                let n = name.child(&s.name, false);
                plan.steps.push((Step::DeleteSet(n.clone()), n.object.to_string(), vec![n.object.clone()]));
                gone.push(n.object);
            }
            plan.left.push(self.why_left(t, &info.comment, &contents));
        }
        // Chain deletions before set deletions: a rule of our chain may use our set.
        plan.steps.sort_by_key(|(s, _, _)| match s {
            Step::DeleteChain(_) => 0,
            Step::DeleteSet(_) => 1,
            _ => 2,
        });
        for set in &self.sets {
            if gone.contains(&set.object) || gone.contains(&set.object.nft_table().expect("a set")) {
                continue;
            }
            if query::get_set(sock, set)?.is_some() {
                plan.steps.push((Step::FlushSet(set.clone()), set.object.to_string(), Vec::new()));
            }
        }
        Ok(plan)
    }

    /// Why teardown leaves table `t`: not allowsync's, or holding what is not.
    fn why_left(&self, t: &Object, comment: &Option<String>, contents: &Contents) -> String {
        if !marked(comment) {
            // A hint only (ownership is never guessed): an older allowsync's table held its two
            // sets and at most its enforcement chain, nothing else.
            let configured = |name: &str| self.sets.iter().any(|s| s.name.to_string_lossy() == name);
            let old_shape = contents.sets.iter().all(|s| configured(&s.name))
                && contents.chains.iter().all(|c| c.name == ENFORCE_CHAIN);
            let legacy = if *t == self.table.object && old_shape {
                format!(
                    "; an earlier allowsync (one that did not mark its objects) created its table without one: if this is that table, remove it with `nft delete {t}`"
                )
            } else {
                String::new()
            };
            return format!("{t}: allowsync did not create it (it has no comment \"{MARK}\"){legacy}");
        }
        let mut theirs: Vec<String> = contents
            .chains
            .iter()
            .filter(|c| !marked(&c.comment))
            .map(|c| format!("chain {}", c.name))
            .collect();
        theirs.extend(
            contents
                .sets
                .iter()
                .filter(|s| !marked(&s.comment) && !s.name.starts_with("__"))
                .map(|s| format!("set {}", s.name)),
        );
        if theirs.is_empty() {
            theirs.push("objects allowsync did not create".into());
        }
        format!("{t}: it holds {}, which allowsync did not create", theirs.join(", "))
    }
}

/// Whether every chain and set of a table is allowsync's and there is nothing else in it
/// (`objects` counts its stateful objects and flowtables too).
fn holds_only_ours(contents: &Contents, objects: u32) -> bool {
    let all_marked = contents.chains.iter().all(|c| marked(&c.comment))
        && contents.sets.iter().all(|s| marked(&s.comment));
    all_marked && (contents.chains.len() + contents.sets.len()) as u32 == objects
}

/// nft's name of a set key type (nft's `datatype.h`), for messages.
fn type_name(key_type: u32, flags: u32) -> String {
    if flags & NFT_SET_CONCAT != 0 || key_type > 63 {
        return "a concatenation".into();
    }
    let name = match key_type {
        4 => "integer",
        5 => "string",
        6 => "ll_addr",
        7 => "ipv4_addr",
        8 => "ipv6_addr",
        9 => "ether_addr",
        10 => "ether_type",
        12 => "inet_proto",
        13 => "inet_service",
        19 => "mark",
        20 => "iface_index",
        t => return format!("#{t}"),
    };
    name.into()
}
