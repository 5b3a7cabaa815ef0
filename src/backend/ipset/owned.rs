//! The ipset backend's ownership (see [`crate::ownership`]). An ipset cannot carry a comment,
//! so the state file's record is what makes one allowsync's: the sets it created (and this
//! process saw it create). Of any other configured ipset only the elements are managed: its
//! `maxelem` is never changed, and `teardown` empties it rather than destroying it. The
//! enforcement chains are allowsync's by the comment on their rules (`iptables.rs`).
//!
//! A configuration that names other ipsets than before: the new set is created with the old
//! one's contents, the enforcement rules move to it, and only then is the old set destroyed
//! (if allowsync created it), since the kernel refuses to destroy a set a rule still uses. ipset
//! has no transactions: that order is what keeps the allowlist enforced throughout.

use tracing::{info, warn};

use super::proto::{self, Batch, Cmd};
use super::{Family, IpsetAddr, IpsetBackend, Prefix, set_object, temp_name};
use crate::backend::BackendError;
use crate::ownership::{Footprint, Object, Teardown};

impl IpsetBackend {
    /// Takes the state file's record: the ipsets and chains it says allowsync created.
    pub(super) fn adopt_record(&mut self, recorded: &Footprint) {
        self.recorded = recorded.clone();
        for o in &recorded.owned {
            match o {
                Object::Ipset { name } => {
                    self.owned_sets.insert(name.clone());
                }
                Object::XtChain { .. } => {
                    self.owned_chains.insert(o.clone());
                }
                _ => {}
            }
        }
    }

    /// What allowsync owns and fills now; objects of another backend the state file records
    /// (an earlier nftables configuration) are kept as recorded.
    pub(super) fn current_footprint(&self) -> Footprint {
        let mut f = Footprint {
            owned: self.recorded.owned.iter().filter(|o| o.is_nftables()).cloned().collect(),
            sets: vec![
                Object::Ipset { name: self.set_v4.clone() },
                Object::Ipset { name: self.set_v6.clone() },
            ],
            ..Footprint::default()
        };
        f.owned.extend(self.owned_sets.iter().map(|name| Object::Ipset { name: name.clone() }));
        f.owned.extend(self.owned_chains.iter().cloned());
        f
    }

    /// The prefixes of the set the state file says held `A`'s family before, when that was
    /// another set: a set created to replace it starts with them.
    pub(super) fn seed<A: IpsetAddr>(&self) -> Vec<Prefix<A>> {
        let name = self.set_name(A::FAMILY);
        match self.recorded.set(A::FAMILY == Family::V6) {
            Some(Object::Ipset { name: previous }) if previous != name => {
                self.read_named::<A>(previous).map(|live| live.prefixes).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Destroys the ipsets allowsync created that the configuration no longer names. One still
    /// in use by a rule (the operator's) stays, and stays recorded.
    pub(super) fn remove_stale_sets(&mut self) {
        let configured = [self.set_v4.clone(), self.set_v6.clone()];
        let stale: Vec<String> =
            self.owned_sets.iter().filter(|n| !configured.contains(n)).cloned().collect();
        for name in stale {
            match self.destroy(&name) {
                Ok(()) | Err(BackendError::Missing { .. }) => {
                    info!(set = %name, "destroyed an ipset the configuration no longer uses");
                    self.owned_sets.remove(&name);
                }
                Err(e) => {
                    warn!(set = %name, error = %e, "cannot destroy an ipset the configuration no longer uses")
                }
            }
        }
    }

    /// `teardown`: the chains, then the sets allowsync created (the configured ones, those the
    /// state file records, and any temporary set), then the operator's configured sets emptied.
    pub(super) fn remove_everything(&mut self) -> Result<Teardown, BackendError> {
        let (removed, mut left) = self.teardown_enforcement()?;
        let mut report = Teardown { removed, emptied: Vec::new(), left: Vec::new() };
        let configured = [(self.set_v4.clone(), Family::V4), (self.set_v6.clone(), Family::V6)];
        let mut ours: Vec<String> = self.owned_sets.iter().cloned().collect();
        ours.extend(configured.iter().map(|(n, f)| temp_name(n, *f)));
        for set in ours {
            match self.destroy(&set) {
                Ok(()) => report.removed.push(set_object(&set)),
                Err(BackendError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
            self.owned_sets.remove(&set);
        }
        for (name, _) in &configured {
            if report.removed.contains(&set_object(name)) {
                continue;
            }
            let mut flush = Batch::new();
            flush.named(Cmd::Flush, name);
            match proto::exchange(flush, "flush set", &set_object(name)) {
                Ok(()) => {
                    report.emptied.push(set_object(name));
                    left.push(format!(
                        "{}: allowsync did not create it (the state file does not record it as allowsync's)",
                        set_object(name)
                    ));
                }
                Err(BackendError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        report.left = left;
        Ok(report)
    }
}
