//! An in-memory backend with the kernel's rules: removing an absent range fails (ENOENT),
//! adding an overlapping one fails (EEXIST), and a failed apply changes nothing. The engine's
//! tests use it; tests can also reach in (`shared()`) to simulate drift or someone else's write.

use std::sync::{Arc, Mutex};

use super::{Backend, BackendError};
use crate::prefixes::{AllowSet, ApplyError, Diff};

/// The set lives behind a shared handle so a test keeps a view of it after handing the backend
/// to the engine.
#[derive(Clone, Debug, Default)]
pub struct MemoryBackend {
    set: Arc<Mutex<AllowSet>>,
    /// Number of successful applies (writes to the "kernel").
    writes: Arc<Mutex<usize>>,
    /// Fail the next N applies with an I/O error, leaving the set intact.
    fail_next: Arc<Mutex<usize>>,
    /// Number of reads (dumps) of the set.
    reads: Arc<Mutex<usize>>,
    /// A ruleset generation like nftables', once enabled: bumped by every write.
    generation: Arc<Mutex<Option<u64>>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The live set, shared with every clone of this backend.
    pub fn shared(&self) -> Arc<Mutex<AllowSet>> {
        Arc::clone(&self.set)
    }

    /// Number of transactions committed so far.
    pub fn writes(&self) -> usize {
        *self.writes.lock().unwrap()
    }

    /// Number of reads so far.
    pub fn reads(&self) -> usize {
        *self.reads.lock().unwrap()
    }

    /// Starts reporting a generation number, as nftables does.
    pub fn enable_generation(&self) {
        *self.generation.lock().unwrap() = Some(1);
    }

    /// Changes the set as another process would: the generation moves too.
    pub fn foreign_write(&self, f: impl FnOnce(&mut AllowSet)) {
        f(&mut self.set.lock().unwrap());
        self.bump();
    }

    fn bump(&self) {
        if let Some(g) = self.generation.lock().unwrap().as_mut() {
            *g += 1;
        }
    }

    /// Makes the next `n` applies fail as the kernel would on an unexpected error.
    pub fn fail_next_applies(&self, n: usize) {
        *self.fail_next.lock().unwrap() = n;
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn ensure(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        *self.reads.lock().unwrap() += 1;
        Ok(self.set.lock().unwrap().clone())
    }

    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        {
            let mut fail = self.fail_next.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(BackendError::Kernel {
                    op: "apply",
                    object: "memory set".into(),
                    cause: std::io::Error::from_raw_os_error(libc::ENOBUFS),
                });
            }
        }
        let mut set = self.set.lock().unwrap();
        let next = set.apply(diff).map_err(|e| BackendError::Conflict {
            op: match e {
                ApplyError::NotFound(_) => "delete element",
                ApplyError::Overlap(_) => "add element",
            },
            object: "memory set".into(),
            detail: e.to_string(),
        })?;
        *set = next;
        drop(set);
        *self.writes.lock().unwrap() += 1;
        self.bump();
        Ok(())
    }

    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        Ok(*self.generation.lock().unwrap())
    }

    fn teardown(&mut self) -> Result<crate::ownership::Teardown, BackendError> {
        *self.set.lock().unwrap() = AllowSet::default();
        Ok(crate::ownership::Teardown::default())
    }
}
