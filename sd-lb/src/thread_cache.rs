//! The per-thread snapshot cache every balancer picks through.
//!
//! Reading the endpointer's snapshot on every pick (an `arc-swap` load) costs more than the rest of
//! the pick, and far more when two threads pick at once: the load touches shared, written cache
//! lines. So each thread keeps its own copy of the snapshot's `Arc` together with the endpointer
//! version it was read at. A pick loads the version (one atomic read of a line nobody writes until
//! the set changes), compares it with the cached one, and fetches a new snapshot only when they
//! differ. The per-thread state also holds what a balancer advances on every pick (a round robin
//! counter, a random generator), so a pick writes only memory its own thread owns.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sd_core::{Endpointer, Snapshot};
use thread_local::ThreadLocal;

/// Per-thread cached snapshots and balancer state `S`.
pub(crate) struct ThreadCache<E: Send + Sync, S: Send> {
    slots: ThreadLocal<Slot<E, S>>,
    /// Hands each thread an ordinal when it first picks, to seed its state.
    ordinal: AtomicUsize,
}

/// One thread's entry. Aligned to two cache lines so that two threads' entries never share a
/// line (nor an adjacent-line prefetch pair): each pick writes its own entry.
#[repr(align(128))]
struct Slot<E, S>(RefCell<Local<E, S>>);

struct Local<E, S> {
    cached: Option<Cached<E>>,
    state: S,
}

struct Cached<E> {
    /// The endpointer version read before fetching `snapshot` (the snapshot is at least as new).
    version: u64,
    /// `snapshot.endpoints()`, kept here to save a pointer hop per pick.
    endpoints: Arc<[E]>,
    snapshot: Arc<Snapshot<E>>,
}

impl<E: Send + Sync, S: Send> ThreadCache<E, S> {
    pub(crate) fn new() -> Self {
        ThreadCache {
            slots: ThreadLocal::new(),
            ordinal: AtomicUsize::new(0),
        }
    }

    /// Runs `pick` with this thread's current snapshot and state.
    ///
    /// `init` makes a thread's state from its ordinal (0 for the first thread that picks, 1 for
    /// the next, ...). `refresh` runs when the thread moves to a new snapshot, before `pick`.
    /// The fast path (unchanged version) takes no lock, allocates nothing, and writes only this
    /// thread's slot.
    #[inline]
    pub(crate) fn with<P, R>(
        &self,
        endpointer: &P,
        init: impl Fn(usize) -> S,
        refresh: impl FnOnce(&Snapshot<E>, &mut S),
        pick: impl FnOnce(&[E], &Snapshot<E>, &mut S) -> R,
    ) -> R
    where
        P: Endpointer<E> + ?Sized,
    {
        let slot = match self.slots.get() {
            Some(slot) => slot,
            None => self.new_slot(&init),
        };
        let version = endpointer.version();
        // The slot is borrowed only while our own code runs, plus `pick` (which clones an
        // endpoint). A clone that picks from this same balancer again finds the slot borrowed
        // and takes the uncached path instead of panicking.
        if let Ok(mut local) = slot.0.try_borrow_mut() {
            let Local { cached, state } = &mut *local;
            if let Some(c) = cached {
                if c.version == version {
                    return pick(&c.endpoints, &c.snapshot, state);
                }
            }
        }
        self.refresh_and_pick(slot, version, endpointer, init, refresh, pick)
    }

    /// Makes this thread's slot: once per thread, out of line so that the (over-aligned) slot
    /// is never built on the pick path's stack.
    #[cold]
    #[inline(never)]
    fn new_slot(&self, init: &impl Fn(usize) -> S) -> &Slot<E, S> {
        self.slots.get_or(|| {
            let ordinal = self.ordinal.fetch_add(1, Ordering::Relaxed);
            Slot(RefCell::new(Local {
                cached: None,
                state: init(ordinal),
            }))
        })
    }

    #[cold]
    #[inline(never)]
    fn refresh_and_pick<P, R>(
        &self,
        slot: &Slot<E, S>,
        version: u64,
        endpointer: &P,
        init: impl Fn(usize) -> S,
        refresh: impl FnOnce(&Snapshot<E>, &mut S),
        pick: impl FnOnce(&[E], &Snapshot<E>, &mut S) -> R,
    ) -> R
    where
        P: Endpointer<E> + ?Sized,
    {
        // Fetched outside the borrow: `snapshot()` is the endpointer's code.
        let snapshot = endpointer.snapshot();
        match slot.0.try_borrow_mut() {
            Ok(mut local) => {
                let Local { cached, state } = &mut *local;
                refresh(&snapshot, state);
                let fresh = Cached {
                    version,
                    endpoints: snapshot.endpoints().clone(),
                    snapshot,
                };
                let old = cached.take();
                let c = cached.insert(fresh);
                let r = pick(&c.endpoints, &c.snapshot, state);
                drop(local);
                // Dropping the old snapshot may drop endpoints (their own code): not while
                // the slot is borrowed.
                drop(old);
                r
            }
            Err(_) => {
                // Re-entered from within a pick on this thread: use a one-off state.
                let mut state = init(self.ordinal.fetch_add(1, Ordering::Relaxed));
                refresh(&snapshot, &mut state);
                pick(snapshot.endpoints(), &snapshot, &mut state)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::{FixedEndpointer, Instance};
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    /// An endpointer whose set a test replaces by hand.
    struct Manual {
        version: AtomicU64,
        snapshot: Mutex<Arc<Snapshot<u32>>>,
        fetches: AtomicUsize,
    }

    impl Manual {
        fn new(endpoints: Vec<u32>) -> Self {
            let m = Manual {
                version: AtomicU64::new(0),
                snapshot: Mutex::new(Arc::new(Snapshot::new(
                    0,
                    Arc::from(Vec::new()),
                    Arc::from(Vec::new()),
                    None,
                ))),
                fetches: AtomicUsize::new(0),
            };
            m.set(endpoints);
            m
        }

        fn set(&self, endpoints: Vec<u32>) {
            let version = self.version.load(Ordering::SeqCst) + 1;
            let instances: Arc<[Instance]> = endpoints
                .iter()
                .map(|e| Instance::new(e.to_string()))
                .collect();
            *self.snapshot.lock().unwrap() =
                Arc::new(Snapshot::new(version, instances, endpoints.into(), None));
            self.version.store(version, Ordering::SeqCst);
        }
    }

    impl Endpointer<u32> for Manual {
        fn version(&self) -> u64 {
            self.version.load(Ordering::SeqCst)
        }
        fn snapshot(&self) -> Arc<Snapshot<u32>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.snapshot.lock().unwrap().clone()
        }
    }

    fn first(cache: &ThreadCache<u32, ()>, e: &Manual) -> Option<u32> {
        cache.with(e, |_| (), |_, _| {}, |eps, _, _| eps.first().copied())
    }

    #[test]
    fn fetches_the_snapshot_only_when_the_version_moves() {
        let e = Manual::new(vec![1, 2]);
        let cache = ThreadCache::new();
        for _ in 0..10 {
            assert_eq!(first(&cache, &e), Some(1));
        }
        assert_eq!(e.fetches.load(Ordering::SeqCst), 1);
        e.set(vec![7]);
        for _ in 0..10 {
            assert_eq!(first(&cache, &e), Some(7));
        }
        assert_eq!(e.fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn each_thread_gets_its_own_ordinal_and_state() {
        let e = FixedEndpointer::new(vec![0u32]);
        let cache: ThreadCache<u32, usize> = ThreadCache::new();
        let mine = cache.with(&e, |ordinal| ordinal, |_, _| {}, |_, _, s| *s);
        let theirs = std::thread::scope(|s| {
            s.spawn(|| cache.with(&e, |ordinal| ordinal, |_, _| {}, |_, _, s| *s))
                .join()
                .unwrap()
        });
        assert_eq!((mine, theirs), (0, 1));
        // The state persists between picks of one thread.
        cache.with(&e, |o| o, |_, _| {}, |_, _, s| *s += 10);
        assert_eq!(cache.with(&e, |o| o, |_, _| {}, |_, _, s| *s), 10);
    }

    #[test]
    fn refresh_runs_once_per_new_snapshot() {
        let e = Manual::new(vec![1]);
        let cache: ThreadCache<u32, usize> = ThreadCache::new();
        let refreshes =
            |cache: &ThreadCache<u32, usize>| cache.with(&e, |_| 0, |_, s| *s += 1, |_, _, s| *s);
        assert_eq!(refreshes(&cache), 1);
        assert_eq!(refreshes(&cache), 1);
        e.set(vec![2]);
        assert_eq!(refreshes(&cache), 2);
    }

    #[test]
    fn a_reentrant_pick_takes_the_uncached_path() {
        let e = Manual::new(vec![5]);
        let cache: ThreadCache<u32, ()> = ThreadCache::new();
        first(&cache, &e);
        let inner = cache.with(&e, |_| (), |_, _| {}, |_, _, _| first(&cache, &e));
        assert_eq!(inner, Some(5));
    }
}
