//! Backends for tests and the bench, and the one-step sync the backend tests drive them with.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use allowsync::backend::{Backend, BackendError};
use allowsync::ownership::{Footprint, Object, Teardown};
use allowsync::prefixes::{AllowSet, Diff};

/// Brings the kernel from whatever it holds to `desired` in one apply, as the engine does
/// (without its guards). Returns the diff applied; panics when the read or the apply fails.
pub fn sync(b: &mut dyn Backend, desired: &AllowSet) -> Diff {
    let diff = b.read().unwrap().diff_to(desired);
    b.apply(&diff).unwrap();
    diff
}

/// Passes every call to `inner` and counts the applies that change something: what reaches
/// the kernel.
pub struct Counting<B> {
    inner: B,
    applies: Arc<AtomicUsize>,
}

impl<B: Backend> Counting<B> {
    pub fn new(inner: B) -> Self {
        Counting { inner, applies: Arc::default() }
    }

    /// The count of non-empty applies, readable after the backend was handed away.
    pub fn applies(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.applies)
    }
}

impl<B: Backend> Backend for Counting<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn persists(&self) -> bool {
        self.inner.persists()
    }
    fn ensure(&mut self) -> Result<(), BackendError> {
        self.inner.ensure()
    }
    fn read(&mut self) -> Result<AllowSet, BackendError> {
        self.inner.read()
    }
    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        if !diff.is_empty() {
            self.applies.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.apply(diff)
    }
    fn enforce(&mut self) -> Result<(), BackendError> {
        self.inner.enforce()
    }
    fn managed(&self) -> Vec<Object> {
        self.inner.managed()
    }
    fn set_recorded(&mut self, recorded: &Footprint) {
        self.inner.set_recorded(recorded)
    }
    fn footprint(&self) -> Option<Footprint> {
        self.inner.footprint()
    }
    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        self.inner.teardown()
    }
    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        self.inner.generation()
    }
}
