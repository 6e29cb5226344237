//! Consistent hashing by a request key: [`Maglev`].
//!
//! The same key goes to the same instance for as long as the set does not change, and when one
//! of N instances leaves (or joins) only about 1/N of the keys move: those of that instance, and
//! few others. Maglev (Eisenbud et al., *Maglev: A Fast and Reliable Software Network Load
//! Balancer*, NSDI 2016) gets there with a lookup table: each instance fills the table's entries
//! in an order of its own (a permutation derived from its address), taking turns, so each owns an
//! almost equal share; a key is hashed to an entry. A pick is one hash and one table read.
//!
//! Keys and addresses are hashed with a fixed function (FNV-1a, then a 64-bit mixer), so every
//! client of a fleet, whatever its build, maps a key to the same instance for the same set.
//!
//! With [`Maglev::bounded`], loads are bounded as in Mirrokni, Thorup and Zadimoghaddam,
//! *Consistent Hashing with Bounded Loads* (SODA 2018): no instance takes more than
//! `ceil(c × (requests in flight + 1) / N)` requests at once; a key whose instance is full goes
//! to the next instance in table order with room, so one hot key cannot overload one instance.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sd_core::{Balancer, Endpointer, Error, Slots, Snapshot};

use crate::per_snapshot::PerSnapshot;
use crate::thread_cache::ThreadCache;

/// FNV-1a over `bytes`, then SplitMix64's finaliser (FNV alone mixes the high bits poorly).
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Table sizes: primes, the first at least 100 entries per instance is used (Maglev's advice
/// for an even spread), up to the last.
const SIZES: [usize; 6] = [251, 4093, 65_537, 262_147, 1_048_583, 4_194_319];

/// The Maglev table of a set of `n` slots whose addresses are `addrs`: entry → slot.
fn table(addrs: &[&str]) -> Arc<[u32]> {
    let n = addrs.len();
    if n == 0 {
        return Arc::from(Vec::new());
    }
    let m = SIZES
        .iter()
        .copied()
        .find(|&m| m >= 100 * n)
        .unwrap_or(SIZES[SIZES.len() - 1]);
    // Each slot's permutation of the entries: offset + j × skip (mod m), m prime.
    let prefs: Vec<(usize, usize)> = addrs
        .iter()
        .map(|a| {
            let h = hash_key(a.as_bytes());
            let offset = (h % m as u64) as usize;
            let skip = (mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut entry = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for slot in 0..n {
            let (offset, skip) = prefs[slot];
            // This slot's next preferred entry that is still free.
            let mut c = (offset + next[slot] * skip) % m;
            while entry[c] != u32::MAX {
                next[slot] += 1;
                c = (offset + next[slot] * skip) % m;
            }
            entry[c] = slot as u32;
            next[slot] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Arc::from(entry)
}

/// A snapshot's table and, under a load bound, each slot's in-flight counter.
#[derive(Clone)]
struct View {
    table: Arc<[u32]>,
    loads: Arc<[Arc<AtomicUsize>]>,
}

/// The view of the last snapshot built (shared by the threads that move to it next), and every
/// in-flight counter still alive, by address, so an instance keeps its count across sets.
#[derive(Default)]
struct Tables {
    views: PerSnapshot<View>,
    loads: Mutex<std::collections::HashMap<String, std::sync::Weak<AtomicUsize>>>,
}

impl Tables {
    fn for_snapshot<E>(&self, snapshot: &Snapshot<E>, bounded: bool) -> View {
        self.views.get(snapshot, || self.build(snapshot, bounded))
    }

    fn build<E>(&self, snapshot: &Snapshot<E>, bounded: bool) -> View {
        let instances = snapshot.instances();
        // An endpoint without an instance (a fixed list) is named by its position.
        let names: Vec<String> = (0..snapshot.endpoints().len())
            .map(|i| match instances.get(i) {
                Some(inst) if !inst.addr().is_empty() => inst.addr().to_string(),
                _ => format!("#{i}"),
            })
            .collect();
        // The table is built over the addresses in sorted order, not slot order (which depends
        // on the history of each client's endpointer), so every client maps a key alike.
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]));
        let sorted: Vec<&str> = order.iter().map(|&i| names[i].as_str()).collect();
        let table: Arc<[u32]> = table(&sorted)
            .iter()
            .map(|&k| order.get(k as usize).map_or(0, |&slot| slot as u32))
            .collect();
        let loads: Arc<[Arc<AtomicUsize>]> = if bounded {
            let mut known = self.loads.lock().unwrap_or_else(|e| e.into_inner());
            let loads = names
                .iter()
                .map(
                    |name| match known.get(name).and_then(std::sync::Weak::upgrade) {
                        Some(load) => load,
                        None => {
                            let load = Arc::new(AtomicUsize::new(0));
                            known.insert(name.clone(), Arc::downgrade(&load));
                            load
                        }
                    },
                )
                .collect();
            known.retain(|_, l| l.strong_count() > 0);
            loads
        } else {
            Arc::from(Vec::new())
        };
        View { table, loads }
    }
}

/// Picks by request key with Maglev consistent hashing (see the [module docs](crate::hash)).
///
/// Not a [`Balancer`] itself (a pick needs the key): call [`endpoint_for`](Self::endpoint_for),
/// or make a per-key [`Balancer`] with [`for_key`](Self::for_key) (for [`Retry`](crate::Retry):
/// every attempt then goes to the key's instance, or, bounded, the next with room). The table is
/// built once per snapshot, O(table size), and a pick of an unchanged set takes no lock.
///
/// ```
/// use sd_core::FixedEndpointer;
/// use sd_lb::Maglev;
///
/// let maglev = Maglev::new(FixedEndpointer::new(vec!["a", "b", "c"]));
/// let first = maglev.endpoint_for(b"user-42").unwrap();
/// assert_eq!(maglev.endpoint_for(b"user-42").unwrap(), first, "same key, same endpoint");
/// ```
pub struct Maglev<E: Send + Sync, P> {
    endpointer: P,
    tables: Tables,
    cache: ThreadCache<E, View>,
    bound: Option<Bound>,
}

/// Bounded loads: the factor, and the requests in flight in all.
struct Bound {
    factor: f64,
    total: Arc<AtomicUsize>,
}

impl<E: Send + Sync, P: Endpointer<E>> Maglev<E, P> {
    /// Consistent hashing over `endpointer`, without a load bound.
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let maglev = sd_lb::Maglev::new(FixedEndpointer::new(vec![1, 2]));
    /// assert!(maglev.endpoint_for(b"k").is_ok());
    /// ```
    pub fn new(endpointer: P) -> Self {
        Maglev {
            endpointer,
            tables: Tables::default(),
            cache: ThreadCache::new(),
            bound: None,
        }
    }

    /// Consistent hashing with bounded loads: no instance holds more than
    /// `ceil(factor × (in flight + 1) / N)` requests at once, counted by the [`Held`] guards
    /// that [`held_for`](Self::held_for) hands out. `factor` must be at least 1 (1.25 is usual:
    /// the smaller, the more keys move away from their instance under load).
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let maglev = sd_lb::Maglev::bounded(FixedEndpointer::new(vec![1, 2]), 1.25).unwrap();
    /// let held = maglev.held_for(b"hot").unwrap();
    /// assert_eq!(held.in_flight(), 1);
    /// assert!(sd_lb::Maglev::bounded(FixedEndpointer::new(vec![1]), 0.5).is_err());
    /// ```
    pub fn bounded(endpointer: P, factor: f64) -> Result<Self, Error> {
        if !(factor >= 1.0 && factor.is_finite()) {
            return Err(Error::invalid_argument(format!(
                "load bound factor {factor} must be a finite number of at least 1 (1.25 is usual)"
            )));
        }
        let mut maglev = Self::new(endpointer);
        maglev.bound = Some(Bound {
            factor,
            total: Arc::new(AtomicUsize::new(0)),
        });
        Ok(maglev)
    }

    /// The endpointer this picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// let maglev = sd_lb::Maglev::new(FixedEndpointer::new(vec![1]));
    /// assert_eq!(maglev.endpointer().endpoints().unwrap().len(), 1);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }

    /// Runs `pick` with this thread's snapshot and its view (table, loads).
    #[inline]
    fn with_view<R>(&self, pick: impl FnOnce(&Slots<E>, &Snapshot<E>, &View) -> R) -> R {
        self.cache.with(
            &self.endpointer,
            |_| View {
                table: Arc::from(Vec::new()),
                loads: Arc::from(Vec::new()),
            },
            |snapshot, view| *view = self.tables.for_snapshot(snapshot, self.bound.is_some()),
            #[inline(always)]
            |endpoints, snapshot, view| pick(endpoints, snapshot, view),
        )
    }
}

impl<E: Clone + Send + Sync, P: Endpointer<E>> Maglev<E, P> {
    /// The endpoint of `key` (any bytes: a user id, a cache key). Unbounded: the load bound
    /// applies only to [`held_for`](Self::held_for).
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let maglev = sd_lb::Maglev::new(FixedEndpointer::<u8>::new(vec![]));
    /// assert!(maglev.endpoint_for(b"k").is_err(), "nothing to pick from");
    /// ```
    pub fn endpoint_for(&self, key: &[u8]) -> Result<E, Error> {
        self.endpoint_for_hash(hash_key(key))
    }

    /// The endpoint of a key already hashed (with [`hash_key`], or a hash of your own that is
    /// uniform over `u64`).
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{hash_key, Maglev};
    ///
    /// let maglev = Maglev::new(FixedEndpointer::new(vec![1, 2, 3]));
    /// assert_eq!(maglev.endpoint_for_hash(hash_key(b"k")).unwrap(), maglev.endpoint_for(b"k").unwrap());
    /// ```
    #[inline]
    pub fn endpoint_for_hash(&self, hash: u64) -> Result<E, Error> {
        self.with_view(|endpoints, snapshot, view| {
            let slot = match view.table.len() {
                0 => None,
                m => view.table.get((hash % m as u64) as usize),
            };
            crate::pick::cloned_at(endpoints, snapshot, slot.map(|&s| s as usize))
        })
    }

    /// A [`Balancer`] whose every pick is `key`'s endpoint (bounded: the key's endpoint or the
    /// next with room), for [`Retry`](crate::Retry) and other code that takes a balancer.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::Maglev;
    ///
    /// let maglev = Maglev::new(FixedEndpointer::new(vec![1, 2, 3]));
    /// let b = maglev.for_key(b"user-7");
    /// assert_eq!(*b.endpoint().unwrap(), maglev.endpoint_for(b"user-7").unwrap());
    /// ```
    pub fn for_key(&self, key: &[u8]) -> ForKey<'_, E, P> {
        ForKey {
            maglev: self,
            hash: hash_key(key),
        }
    }

    /// The endpoint of `key` under the load bound, as a guard that counts one request in
    /// flight until dropped. The key's own endpoint if it has room, else the next endpoint in
    /// table order that has. Without a bound ([`new`](Self::new)), the key's endpoint.
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let maglev = sd_lb::Maglev::bounded(FixedEndpointer::new(vec!["a", "b", "c", "d"]), 1.0).unwrap();
    /// // One hot key, four requests at once: with a factor of 1 each instance takes one.
    /// let held: Vec<_> = (0..4).map(|_| maglev.held_for(b"hot").unwrap()).collect();
    /// let mut got: Vec<&str> = held.iter().map(|h| **h).collect();
    /// got.sort();
    /// assert_eq!(got, ["a", "b", "c", "d"]);
    /// ```
    pub fn held_for(&self, key: &[u8]) -> Result<Held<E>, Error> {
        self.held_for_hash(hash_key(key))
    }

    /// [`held_for`](Self::held_for) a key already hashed.
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{hash_key, Maglev};
    ///
    /// let maglev = Maglev::bounded(FixedEndpointer::new(vec![1, 2]), 1.25).unwrap();
    /// assert_eq!(*maglev.held_for_hash(hash_key(b"k")).unwrap(), maglev.endpoint_for(b"k").unwrap());
    /// ```
    pub fn held_for_hash(&self, hash: u64) -> Result<Held<E>, Error> {
        let Some(bound) = &self.bound else {
            let endpoint = self.endpoint_for_hash(hash)?;
            return Ok(Held {
                endpoint,
                load: None,
            });
        };
        self.with_view(|endpoints, snapshot, view| {
            let (n, m) = (endpoints.len().min(view.loads.len()), view.table.len());
            if n == 0 || m == 0 {
                return Err(crate::metrics::no_endpoint(snapshot));
            }
            let total = bound.total.load(Ordering::Relaxed);
            let cap = ((bound.factor * (total + 1) as f64) / n as f64).ceil() as usize;
            let start = (hash % m as u64) as usize;
            // Table order from the key's entry: the first slot with room. The loads always
            // leave one (they sum to less than n × cap); if they moved meanwhile, the key's
            // own slot.
            let mut chosen = None;
            for k in 0..m {
                let Some(&slot) = view.table.get((start + k) % m) else {
                    break;
                };
                let slot = slot as usize;
                if view
                    .loads
                    .get(slot)
                    .is_some_and(|l| l.load(Ordering::Relaxed) < cap)
                {
                    chosen = Some(slot);
                    break;
                }
            }
            let slot = match chosen {
                Some(slot) => slot,
                None => view.table.get(start).map_or(0, |&s| s as usize),
            };
            match (endpoints.get(slot), view.loads.get(slot)) {
                (Some(endpoint), Some(load)) => {
                    load.fetch_add(1, Ordering::Relaxed);
                    bound.total.fetch_add(1, Ordering::Relaxed);
                    Ok(Held {
                        endpoint: endpoint.clone(),
                        load: Some((load.clone(), bound.total.clone())),
                    })
                }
                _ => Err(crate::metrics::no_endpoint(snapshot)),
            }
        })
    }
}

/// A [`Maglev`] pick fixed to one key, as a [`Balancer`] (see [`Maglev::for_key`]).
pub struct ForKey<'a, E: Send + Sync, P> {
    maglev: &'a Maglev<E, P>,
    hash: u64,
}

impl<E: Clone + Send + Sync, P: Endpointer<E>> Balancer for ForKey<'_, E, P> {
    type Endpoint = Held<E>;

    fn endpoint(&self) -> Result<Held<E>, Error> {
        self.maglev.held_for_hash(self.hash)
    }
}

/// An endpoint picked by [`Maglev::held_for`], counted as one request in flight (under a load
/// bound) until dropped. Derefs to the endpoint.
pub struct Held<E> {
    endpoint: E,
    load: Option<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
}

impl<E> Held<E> {
    /// The requests in flight on this endpoint now, this one included (1 without a bound).
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let maglev = sd_lb::Maglev::new(FixedEndpointer::new(vec![1]));
    /// assert_eq!(maglev.held_for(b"k").unwrap().in_flight(), 1);
    /// ```
    pub fn in_flight(&self) -> usize {
        self.load
            .as_ref()
            .map_or(1, |(load, _)| load.load(Ordering::Relaxed))
    }
}

impl<E> std::ops::Deref for Held<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.endpoint
    }
}

#[cfg(feature = "tower")]
crate::tower::service_of_guard!(
    Held,
    "The picked endpoint's service (feature `tower`), by delegation. Keep the guard until the \
     response ends ([`Balanced`](crate::tower::Balanced) does) for the call to count against \
     the load bound."
);

impl<E> Drop for Held<E> {
    fn drop(&mut self) {
        if let Some((load, total)) = &self.load {
            load.fetch_sub(1, Ordering::Relaxed);
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<E: fmt::Debug> fmt::Debug for Held<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("endpoint", &self.endpoint)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for Maglev<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .field("bound", &self.bound.as_ref().map(|b| b.factor))
            .finish()
    }
}
