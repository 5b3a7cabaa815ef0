//! The `dry_run` backend: logs the transaction it would send and keeps nothing, so every sync
//! starts from an empty set. For trying a configuration without touching the firewall.

use tracing::info;

use super::{Backend, BackendError};
use crate::ownership::Teardown;
use crate::prefixes::{AllowSet, Diff};

#[derive(Debug, Default)]
pub struct DryRun;

impl Backend for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    fn persists(&self) -> bool {
        false
    }

    fn ensure(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        Ok(AllowSet::default())
    }

    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        for r in &diff.v4.remove {
            info!(family = "ipv4", range = %r, "dry-run: would delete");
        }
        for r in &diff.v6.remove {
            info!(family = "ipv6", range = %r, "dry-run: would delete");
        }
        for r in &diff.v4.add {
            info!(family = "ipv4", range = %r, "dry-run: would add");
        }
        for r in &diff.v6.add {
            info!(family = "ipv6", range = %r, "dry-run: would add");
        }
        info!(added = diff.added(), removed = diff.removed(), "dry-run: transaction not sent");
        Ok(())
    }

    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        Ok(Teardown::default())
    }
}
