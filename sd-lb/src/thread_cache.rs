//! The per-thread snapshot cache every balancer picks through.
//!
//! Reading the endpointer's snapshot on every pick (an `arc-swap` load) costs more than the rest of
//! the pick, and far more when two threads pick at once: the load touches shared, written cache
//! lines. So each thread keeps its own copy of the snapshot's `Arc` together with the endpointer
//! version it was read at. A pick loads the version (one atomic read of a line nobody writes until
//! the set changes), compares it with the cached one, and fetches a new snapshot only when they
//! differ. The per-thread state also holds what a balancer advances on every pick (a round robin
//! counter, a random generator), so a pick writes only memory its own thread owns.
//!
//! Finding this thread's entry through `thread_local::ThreadLocal` (thread id, bucket, presence
//! flag) cost about as much as the rest of the pick, so each thread also remembers, in a plain
//! `std` thread-local, the last cache it picked through (by a process-unique id) and where its
//! entry in that cache is: a thread that keeps picking from one balancer reads two words and
//! compares one. And the pick's result is built once, in place: the slow path (a new snapshot)
//! updates the entry and hands back to the inline pick rather than returning the result itself.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use sd_core::{Endpointer, Slots, Snapshot};
use thread_local::ThreadLocal;

/// Per-thread cached snapshots and balancer state `S`.
pub(crate) struct ThreadCache<E: Send + Sync, S: Send> {
    /// This cache's name in [`LAST`]: unique for the life of the process, never 0.
    id: u64,
    slots: ThreadLocal<Slot<E, S>>,
    /// Hands each thread an ordinal when it first picks, to seed its state.
    ordinal: AtomicUsize,
}

/// The next [`ThreadCache::id`]. Ids are never reused: the counter stops (and `new` panics)
/// rather than wrap.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The cache this thread last picked through (by id, 0 for none) and the address of this
    /// thread's slot in it: a pick through the same cache as the last one skips the
    /// `ThreadLocal` lookup (a thread-id read, a bucket load and a presence check) and reads
    /// these two words instead. Const-initialised and without a destructor, so reading it is a
    /// plain thread-local load.
    static LAST: Cell<(u64, *const ())> = const { Cell::new((0, std::ptr::null())) };
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
    endpoints: Slots<E>,
    snapshot: Arc<Snapshot<E>>,
}

/// What [`ThreadCache::refresh`] did.
enum Refreshed<E, S> {
    /// The slot now caches the snapshot of this version: pick from the slot.
    Cached(u64),
    /// The slot is in use further up this thread's stack: pick from this snapshot with this
    /// one-off state instead.
    OneOff(Arc<Snapshot<E>>, S),
}

impl<E: Send + Sync, S: Send> ThreadCache<E, S> {
    pub(crate) fn new() -> Self {
        ThreadCache {
            id: NEXT_ID
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| id.checked_add(1))
                .expect("2^64 balancers made: no unused id left"),
            slots: ThreadLocal::new(),
            ordinal: AtomicUsize::new(0),
        }
    }

    /// Runs `pick` with this thread's current snapshot and state.
    ///
    /// `init` makes a thread's state from its ordinal (0 for the first thread that picks, 1 for
    /// the next, ...). `refresh` runs when the thread moves to a new snapshot, before `pick`.
    /// The fast path (unchanged version) takes no lock, allocates nothing, and writes only this
    /// thread's slot. `pick` is called from two places (the slot and a one-off snapshot): mark
    /// the closure `#[inline(always)]`, or LLVM may make it a call whose result is copied.
    #[inline]
    pub(crate) fn with<P, R>(
        &self,
        endpointer: &P,
        init: impl Fn(usize) -> S,
        refresh: impl Fn(&Snapshot<E>, &mut S),
        pick: impl FnOnce(&Slots<E>, &Snapshot<E>, &mut S) -> R,
    ) -> R
    where
        P: Endpointer<E> + ?Sized,
    {
        let slot = self.slot(&init);
        let mut version = endpointer.version();
        // At most two rounds: a stale slot is refreshed, and the second round picks from it
        // (nothing runs between `refresh` reading the slot's version and the check below).
        // The slow path does not return `R` itself but hands back here, so that `pick` writes
        // its result straight into the caller's place: a result that comes either from a call
        // or from inline code is built in a temporary and copied (40 bytes for a balancer's
        // `Result<E, Error>`), which costs the fast path about as much as the slot lookup.
        loop {
            // The slot is borrowed only while our own code runs, plus `pick` (which clones an
            // endpoint). A clone that picks from this same balancer again finds the slot
            // borrowed and takes the one-off path instead of panicking.
            if let Ok(mut local) = slot.0.try_borrow_mut() {
                let Local { cached, state } = &mut *local;
                if let Some(c) = cached {
                    if c.version == version {
                        return pick(&c.endpoints, &c.snapshot, state);
                    }
                }
            }
            match self.refresh(slot, version, endpointer, &init, &refresh) {
                Refreshed::Cached(now) => version = now,
                Refreshed::OneOff(snapshot, mut state) => {
                    return pick(snapshot.endpoints(), &snapshot, &mut state)
                }
            }
        }
    }

    /// This thread's slot, made on its first pick.
    #[inline]
    fn slot(&self, init: &impl Fn(usize) -> S) -> &Slot<E, S> {
        let (id, ptr) = LAST.get();
        if id == self.id {
            // SAFETY: `ptr` points to this thread's slot in `self.slots`, and that slot lives
            // as long as `self` does (so for the lifetime of the returned reference):
            // - Only `lookup`, on this thread, writes `LAST` (it is a thread-local), and it
            //   writes the id of the cache it ran on with the address of the slot
            //   `ThreadLocal::get`/`get_or` returned there, which is this thread's own slot.
            // - Ids are unique for the life of the process (`NEXT_ID` hands each cache a new
            //   one and never wraps), so `id == self.id` means that `lookup` ran on `self`,
            //   not on a cache that was dropped since, even one that lived at this address.
            // - `ThreadLocal` never moves or frees an entry through `&self`: entries live in
            //   heap buckets that are freed only when the `ThreadLocal` is dropped (or
            //   through `&mut`/by value, which cannot happen while `&self` is borrowed; this
            //   module never calls `clear`, `iter_mut` or `into_iter`). Moving the cache
            //   moves only the bucket pointers, not the slots.
            // - The slot is this thread's, so it is only ever used from this thread, as a
            //   reference from `ThreadLocal::get` would be.
            unsafe { &*ptr.cast::<Slot<E, S>>() }
        } else {
            self.lookup(init)
        }
    }

    /// The slow half of [`slot`](Self::slot): a pick through another cache than this thread's
    /// last one (or its first pick).
    #[inline(never)]
    fn lookup(&self, init: &impl Fn(usize) -> S) -> &Slot<E, S> {
        let slot = match self.slots.get() {
            Some(slot) => slot,
            None => self.new_slot(init),
        };
        LAST.set((self.id, (slot as *const Slot<E, S>).cast()));
        slot
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

    /// Moves the slot to the endpointer's current snapshot (at least as new as `version`), or,
    /// when the slot is borrowed further up this thread's stack (a pick re-entered from an
    /// endpoint's `clone`), hands back the snapshot and a one-off state to pick from.
    #[cold]
    #[inline(never)]
    fn refresh<P>(
        &self,
        slot: &Slot<E, S>,
        version: u64,
        endpointer: &P,
        init: &impl Fn(usize) -> S,
        refresh: &impl Fn(&Snapshot<E>, &mut S),
    ) -> Refreshed<E, S>
    where
        P: Endpointer<E> + ?Sized,
    {
        // Fetched outside the borrow: `snapshot()` is the endpointer's code.
        let snapshot = endpointer.snapshot();
        let old = match slot.0.try_borrow_mut() {
            Ok(mut local) => {
                let Local { cached, state } = &mut *local;
                refresh(&snapshot, state);
                let fresh = Cached {
                    version,
                    endpoints: snapshot.endpoints().clone(),
                    snapshot,
                };
                cached.replace(fresh)
            }
            Err(_) => {
                // Re-entered from within a pick on this thread: use a one-off state.
                let mut state = init(self.ordinal.fetch_add(1, Ordering::Relaxed));
                refresh(&snapshot, &mut state);
                return Refreshed::OneOff(snapshot, state);
            }
        };
        // Dropping the old snapshot may drop endpoints (their own code, which may pick from
        // this balancer again and even refresh the slot once more): not while the slot is
        // borrowed, and the version to pick at is read only afterwards.
        drop(old);
        match slot.0.try_borrow().as_deref() {
            Ok(Local {
                cached: Some(c), ..
            }) => Refreshed::Cached(c.version),
            // Not reached: the slot was ours a moment ago and has a snapshot. Fall back to
            // picking from a one-off state rather than loop.
            _ => {
                let mut state = init(self.ordinal.fetch_add(1, Ordering::Relaxed));
                let snapshot = endpointer.snapshot();
                refresh(&snapshot, &mut state);
                Refreshed::OneOff(snapshot, state)
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
                snapshot: Mutex::new(Arc::new(Snapshot::new(0, Slots::new(), Slots::new(), None))),
                fetches: AtomicUsize::new(0),
            };
            m.set(endpoints);
            m
        }

        fn set(&self, endpoints: Vec<u32>) {
            let version = self.version.load(Ordering::SeqCst) + 1;
            let instances: Slots<Instance> = endpoints
                .iter()
                .map(|e| Instance::new(e.to_string()))
                .collect();
            *self.snapshot.lock().unwrap() = Arc::new(Snapshot::new(
                version,
                instances,
                Slots::from(endpoints),
                None,
            ));
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
        cache.with(e, |_| (), |_, _| {}, |eps, _, _| eps.get(0).copied())
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

    #[test]
    fn a_reentrant_pick_sees_a_set_change_at_once() {
        let e = Manual::new(vec![1]);
        let cache: ThreadCache<u32, ()> = ThreadCache::new();
        first(&cache, &e);
        // Inside a pick (the slot borrowed), the set changes: the nested pick sees the new set
        // through a one-off snapshot, and the next pick refreshes the slot itself.
        let (outer, inner) = cache.with(
            &e,
            |_| (),
            |_, _| {},
            |eps, _, _| {
                e.set(vec![2]);
                (eps[0], first(&cache, &e))
            },
        );
        assert_eq!((outer, inner), (1, Some(2)));
        assert_eq!(first(&cache, &e), Some(2));
        assert_eq!(first(&cache, &e), Some(2));
    }

    /// Picks once through `cache`, counting the picks of this thread in its state.
    fn count(cache: &ThreadCache<u32, (usize, usize)>, e: &impl Endpointer<u32>) -> (usize, u32) {
        cache.with(
            e,
            |ordinal| (ordinal, 0),
            |_, _| {},
            |eps, _, (_, n)| {
                *n += 1;
                (*n, eps[0])
            },
        )
    }

    #[test]
    fn two_caches_alternating_on_one_thread_keep_their_own_slots() {
        let (ea, eb) = (Manual::new(vec![10]), Manual::new(vec![20]));
        let (a, b) = (ThreadCache::new(), ThreadCache::new());
        let (mut na, mut nb) = (0, 0);
        // Strict alternation, then runs on one cache, then alternation again.
        let order = "ababab aaa bbbb abba b a".replace(' ', "");
        for c in order.chars() {
            if c == 'a' {
                na += 1;
                assert_eq!(count(&a, &ea), (na, 10));
            } else {
                nb += 1;
                assert_eq!(count(&b, &eb), (nb, 20));
            }
        }
        let ordinal = |cache: &ThreadCache<u32, (usize, usize)>, e| {
            cache.with(e, |o| (o, 0), |_, _| {}, |_, _, s| s.0)
        };
        assert_eq!(
            (ordinal(&a, &ea), ordinal(&b, &eb)),
            (0, 0),
            "one slot each"
        );
        assert_eq!(ea.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(eb.fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_new_cache_at_a_dropped_ones_address_gets_a_fresh_slot() {
        let e1 = Manual::new(vec![1]);
        let e2 = Manual::new(vec![2]);
        let mut cache = ThreadCache::new();
        let at = &cache as *const ThreadCache<u32, (usize, usize)>;
        for i in 1..=3 {
            assert_eq!(count(&cache, &e1), (i, 1));
        }
        for round in 0..3 {
            // Drops the old cache and moves a new one into the same place: this thread's
            // remembered (id, slot) of the old cache must not be taken for the new one's.
            cache = ThreadCache::new();
            assert_eq!(&cache as *const _, at);
            let e = if round % 2 == 0 { &e2 } else { &e1 };
            let expected = if round % 2 == 0 { 2 } else { 1 };
            assert_eq!(count(&cache, e), (1, expected), "round {round}");
            assert_eq!(count(&cache, e), (2, expected), "round {round}");
        }
        // Moving a cache keeps its slots (they live on the heap, not in the cache).
        let moved = Box::new(cache);
        assert_eq!(count(&moved, &e2), (3, 2));
    }

    #[test]
    fn threads_keep_their_own_slots_in_every_cache() {
        let (ea, eb) = (Manual::new(vec![1, 2]), Manual::new(vec![3]));
        let (a, b) = (ThreadCache::new(), ThreadCache::new());
        let picks = 2_000;
        // All four threads live at once (a thread that exits leaves its slot to the next one).
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        // Alternate between the two caches, and sometimes stay on one.
                        let (mut na, mut nb) = (0, 0);
                        for i in 0..picks {
                            if i % 3 != 2 {
                                na = count(&a, &ea).0;
                            }
                            nb = count(&b, &eb).0;
                        }
                        let ordinals = (
                            a.with(&ea, |o| (o, 0), |_, _| {}, |_, _, s| s.0),
                            b.with(&eb, |o| (o, 0), |_, _| {}, |_, _, s| s.0),
                        );
                        barrier.wait();
                        (na, nb, ordinals)
                    })
                })
                .collect();
            let mut ordinals_a = Vec::new();
            let mut ordinals_b = Vec::new();
            for w in workers {
                let (na, nb, (oa, ob)) = w.join().unwrap();
                // Each thread counted exactly its own picks in each cache.
                assert_eq!((na, nb), (picks - picks / 3, picks));
                ordinals_a.push(oa);
                ordinals_b.push(ob);
            }
            ordinals_a.sort_unstable();
            ordinals_b.sort_unstable();
            assert_eq!(ordinals_a, [0, 1, 2, 3], "one slot per thread");
            assert_eq!(ordinals_b, [0, 1, 2, 3], "one slot per thread");
        });
    }
}
