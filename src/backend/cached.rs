//! [`Cached`]: a wrapper around any backend that skips the costly read (and the ensure) while
//! the kernel's ruleset generation says nothing changed since allowsync last looked.

use super::{Backend, BackendError};
use crate::ownership::{Footprint, Object, Teardown};
use crate::prefixes::{AllowSet, Diff};

/// Skips [`Backend::read`] when the ruleset generation is the one seen right after our own last
/// read or write: nothing was committed since, by anyone, so the kernel still holds what we
/// know. Dumping a 100k-element set costs over a second; asking for the generation costs one
/// small netlink round trip. Backends without a generation are read every time.
///
/// The same goes for [`Backend::ensure`]: while the generation is the one at which an ensure
/// last found everything in place (or our own apply since), nobody can have removed our objects,
/// so it is skipped, and [`Backend::missing`] answers nothing. Only an ensure that committed
/// nothing, with no commit by anyone around it, proves that: after one that created something,
/// a foreign commit may have come right after ours (a tool deleting the table again), so the
/// next ensure looks again.
pub struct Cached {
    inner: Box<dyn Backend>,
    known: Option<(u64, AllowSet)>,
    ensured_at: Option<u64>,
}

impl Cached {
    /// Wraps `inner`; the first read and ensure go through to it.
    pub fn new(inner: Box<dyn Backend>) -> Self {
        Cached { inner, known: None, ensured_at: None }
    }
}

impl Backend for Cached {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn persists(&self) -> bool {
        self.inner.persists()
    }

    fn ensure(&mut self) -> Result<(), BackendError> {
        let generation = self.inner.generation()?;
        if generation.is_some() && generation == self.ensured_at {
            return Ok(());
        }
        self.ensured_at = None;
        self.inner.ensure()?;
        let after = self.inner.generation()?;
        if after == generation {
            self.ensured_at = after;
        }
        Ok(())
    }

    /// Nothing, while nobody has committed since our last ensure: the same reasoning as above.
    fn missing(&mut self) -> Result<Vec<String>, BackendError> {
        let generation = self.inner.generation()?;
        if generation.is_some() && generation == self.ensured_at {
            return Ok(Vec::new());
        }
        self.inner.missing()
    }

    fn read(&mut self) -> Result<AllowSet, BackendError> {
        let generation = self.inner.generation()?;
        if let (Some(g), Some((known_g, set))) = (generation, &self.known) {
            if g == *known_g {
                return Ok(set.clone());
            }
        }
        let set = self.inner.read()?;
        // Trust the copy only if nothing was committed while we dumped.
        let after = self.inner.generation()?;
        self.known = match (generation, after) {
            (Some(a), Some(b)) if a == b => Some((a, set.clone())),
            _ => None,
        };
        Ok(set)
    }

    fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
        let before = self.inner.generation()?;
        let known = self.known.take();
        let ensured = self.ensured_at.take();
        self.inner.apply(diff)?;
        let after = self.inner.generation()?;
        if let (Some(b), Some(a)) = (before, after) {
            if ensured == Some(b) && a == b.wrapping_add(1) {
                self.ensured_at = Some(a);
            }
        }
        // Our own commit moves the generation by exactly one; anything more means someone else
        // committed too, and the copy is no longer the truth.
        if let (Some(b), Some(a), Some((kg, set))) = (before, after, known) {
            if kg == b && a == b.wrapping_add(1) {
                if let Ok(next) = set.apply(diff) {
                    self.known = Some((a, next));
                }
            }
        }
        Ok(())
    }

    fn enforce(&mut self) -> Result<(), BackendError> {
        self.inner.enforce()
    }

    fn managed(&self) -> Vec<Object> {
        self.inner.managed()
    }

    fn set_recorded(&mut self, recorded: &Footprint) {
        // Another record may mean other objects to remove: ensure again.
        self.ensured_at = None;
        self.inner.set_recorded(recorded);
    }

    fn footprint(&self) -> Option<Footprint> {
        self.inner.footprint()
    }

    fn teardown(&mut self) -> Result<Teardown, BackendError> {
        self.known = None;
        self.ensured_at = None;
        self.inner.teardown()
    }

    fn generation(&mut self) -> Result<Option<u64>, BackendError> {
        self.inner.generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allowsync_testkit::set;

    use crate::backend::memory::MemoryBackend;

    #[test]
    fn an_unchanged_generation_skips_the_dump() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        mem.foreign_write(|s| *s = set(["10.0.0.0/24"]));
        let mut c = Cached::new(Box::new(mem.clone()));
        assert_eq!(c.read().unwrap(), set(["10.0.0.0/24"]));
        assert_eq!(c.read().unwrap(), set(["10.0.0.0/24"]));
        assert_eq!(mem.reads(), 1, "second read served from the copy");

        // Our own write keeps the copy valid, and up to date.
        let want = set(["10.0.0.0/24", "10.1.0.0/24"]);
        let d = c.read().unwrap().diff_to(&want);
        c.apply(&d).unwrap();
        assert_eq!(c.read().unwrap(), want);
        assert_eq!(mem.reads(), 1);

        // Someone else's write moves the generation: dump again and see it.
        mem.foreign_write(|s| *s = set(["192.0.2.1"]));
        assert_eq!(c.read().unwrap(), set(["192.0.2.1"]));
        assert_eq!(mem.reads(), 2);
    }

    /// Counts ensures; one commits (creates the objects) when they are missing, which a foreign
    /// write makes them.
    struct Ensures(MemoryBackend, std::sync::Arc<std::sync::Mutex<usize>>, bool);
    impl Backend for Ensures {
        fn name(&self) -> &'static str {
            "ensures"
        }
        fn ensure(&mut self) -> Result<(), BackendError> {
            *self.1.lock().unwrap() += 1;
            if std::mem::replace(&mut self.2, false) {
                self.0.foreign_write(|_| {});
            }
            Ok(())
        }
        fn read(&mut self) -> Result<AllowSet, BackendError> {
            self.0.read()
        }
        fn apply(&mut self, diff: &Diff) -> Result<(), BackendError> {
            self.0.apply(diff)
        }
        fn teardown(&mut self) -> Result<Teardown, BackendError> {
            Ok(Teardown::default())
        }
        fn generation(&mut self) -> Result<Option<u64>, BackendError> {
            self.0.generation()
        }
    }

    #[test]
    fn ensure_is_skipped_until_someone_else_commits() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        let count = std::sync::Arc::new(std::sync::Mutex::new(0));
        let mut c = Cached::new(Box::new(Ensures(mem.clone(), count.clone(), true)));
        // The first ensure creates (commits); the second finds everything in place; then the
        // copy answers.
        c.ensure().unwrap();
        c.ensure().unwrap();
        c.ensure().unwrap();
        assert!(c.missing().unwrap().is_empty());
        assert_eq!(*count.lock().unwrap(), 2);
        // Our own apply does not make the objects suspect...
        let d = c.read().unwrap().diff_to(&set(["10.0.0.1"]));
        c.apply(&d).unwrap();
        c.ensure().unwrap();
        assert_eq!(*count.lock().unwrap(), 2);
        // ...anyone else's commit does.
        mem.foreign_write(|_| {});
        c.ensure().unwrap();
        assert_eq!(*count.lock().unwrap(), 3);
        // A steady state reads from the copy and writes nothing.
        let (reads, writes) = (mem.reads(), mem.writes());
        c.ensure().unwrap();
        assert_eq!(c.read().unwrap(), set(["10.0.0.1"]));
        assert_eq!((mem.reads(), mem.writes()), (reads + 1, writes), "one dump after the foreign commit");
        c.ensure().unwrap();
        c.read().unwrap();
        assert_eq!((mem.reads(), mem.writes()), (reads + 1, writes));
    }

    #[test]
    fn without_a_generation_every_read_dumps() {
        let mem = MemoryBackend::new();
        let mut c = Cached::new(Box::new(mem.clone()));
        c.read().unwrap();
        c.read().unwrap();
        assert_eq!(mem.reads(), 2);
    }

    #[test]
    fn a_failed_apply_forgets_the_copy() {
        let mem = MemoryBackend::new();
        mem.enable_generation();
        let mut c = Cached::new(Box::new(mem.clone()));
        c.read().unwrap();
        mem.fail_next_applies(1);
        assert!(c.apply(&AllowSet::default().diff_to(&set(["10.0.0.1"]))).is_err());
        c.read().unwrap();
        assert_eq!(mem.reads(), 2);
    }
}
