//! Power of two choices: the less loaded of two random endpoints.
//!
//! Picking the least loaded of *all* endpoints needs a view of every endpoint's load on every
//! pick, and it herds: every client sends its next request to the same idle endpoint. Picking
//! uniformly at random ignores load. Choosing two endpoints at random and taking the less
//! loaded one gets almost all of the benefit of the full search at the cost of two reads: with
//! `n` requests over `n` servers the most loaded server holds `O(log log n)` requests instead
//! of random's `O(log n / log log n)`, an exponential improvement.
//!
//! Source: Michael Mitzenmacher, *The Power of Two Choices in Randomized Load Balancing*
//! (PhD thesis, UC Berkeley, 1996; IEEE Transactions on Parallel and Distributed Systems 12(10),
//! 2001). Finagle's "Power of Two Choices (P2C) + Least Loaded" balancer and tower's
//! `tower::balance::p2c` use the same rule, with the number of requests in flight as the load.
//!
//! Here the load of an endpoint is the number of [`InFlight`] guards handed out for it and not
//! yet dropped: hold the guard for as long as the request runs.
//!
//! ```
//! use sd_core::{Balancer, FixedEndpointer};
//! use sd_lb::P2c;
//!
//! let p2c = P2c::new(FixedEndpointer::new(vec!["a:80", "b:80"]));
//! let busy = p2c.endpoint().unwrap();       // one request in flight on `busy`
//! let next = p2c.endpoint().unwrap();
//! assert_ne!(*busy, *next, "the idle endpoint wins");
//! drop(busy);                               // the request is over
//! ```

use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};

use sd_core::{Balancer, Endpointer, Error, Instance, Slots, Snapshot, Tried};

use crate::outliers::{Health, Host, Outliers};
use crate::per_snapshot::PerSnapshot;
use crate::random::thread_rng;
use crate::thread_cache::ThreadCache;

/// Power-of-two-choices least-loaded balancer: picks two endpoints at random and hands out the
/// one with fewer requests in flight per unit of its instance's
/// [`weight`](sd_core::Instance::weight) (see the [module docs](crate::p2c) for why): an instance
/// of weight 2 is as loaded with two requests as one of weight 1 with one.
///
/// A pick returns an [`InFlight`] guard that derefs to the endpoint and counts as one request
/// in flight until dropped. The counts belong to instances, not to positions in the set: an
/// instance that stays in the set across an update keeps its count.
///
/// A pick of an unchanged set takes no lock and allocates nothing (per-thread cached snapshot
/// and random generator, as in [`Random`](crate::Random)); it writes only the chosen endpoint's
/// load (one atomic add, and one atomic sub when the guard drops), the one thing a load-aware
/// balancer has to share between threads. When the set changes, the first pick of each thread
/// takes a lock to map the new set to its counters: in time proportional to the change when the
/// endpointer records which slots changed (as [`DefaultEndpointer`](sd_core::DefaultEndpointer)
/// does) and the balancer mapped the snapshot before, otherwise once over the whole set.
///
/// ```
/// use sd_core::{Balancer, FixedEndpointer};
/// use sd_lb::P2c;
///
/// let p2c = P2c::with_seed(FixedEndpointer::new(vec![1, 2, 3]), 7);
/// let endpoint = p2c.endpoint().unwrap();
/// assert_eq!(endpoint.load(), 1);
/// let n: i32 = *endpoint; // use it like the endpoint itself
/// assert!((1..=3).contains(&n));
/// ```
pub struct P2c<E: Send + Sync, P> {
    endpointer: P,
    seed: Option<u64>,
    registry: Mutex<Registry>,
    cache: ThreadCache<E, Local>,
    zone: Option<ZonePreference>,
    health: Health,
}

/// [`P2c::in_zone`]'s settings, and the local slots of the last snapshot seen.
struct ZonePreference {
    zone: Arc<str>,
    spill: f64,
    local: PerSnapshot<Arc<[u32]>>,
}

/// The load of one endpoint. Its requests in flight are the strong references its guards
/// hold: exactly one other reference exists while the endpoint is in a counter table, its
/// [`Counter`]'s. So a pick costs one atomic add (cloning the `Arc` into its guard) and the
/// guard's drop one atomic sub, both on the one cache line the endpoint's load lives on.
struct Load {
    /// Pads the `Arc` allocation to a cache line's size, so that the loads of two endpoints
    /// (which different threads update at once) do not share a line.
    _pad: [usize; 6],
}

/// The one holder of a [`Load`] besides its guards, shared by every counter table (and every
/// version of one) that lists the endpoint.
struct Counter {
    load: Arc<Load>,
    /// The instance's weight: P2C compares requests in flight per unit of weight.
    weight: u64,
}

/// The number of requests in flight on `load`.
#[inline]
fn in_flight(load: &Arc<Load>) -> usize {
    // The counter's reference is not a request. Relaxed: it only steers a heuristic.
    Arc::strong_count(load).saturating_sub(1)
}

/// Two distinct positions below `n` (at least 2), uniformly.
#[inline(always)]
fn two(rng: &mut fastrand::Rng, n: usize) -> (usize, usize) {
    let a = rng.usize(..n);
    let mut b = rng.usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Of slots `a` and `b`, the one with less in flight per unit of weight (`b / wb < a / wa`,
/// multiplied out); ties go to `a`, itself random.
#[inline(always)]
fn lighter(loads: &Table, a: usize, b: usize) -> usize {
    match (loads.get(a), loads.get(b)) {
        (Some(la), Some(lb))
            if (in_flight(&lb.load) as u64) * la.weight
                < (in_flight(&la.load) as u64) * lb.weight =>
        {
            b
        }
        _ => a,
    }
}

/// A counter's requests in flight, plus `extra`, per unit of weight.
#[inline(always)]
fn per_weight(counter: &Counter, extra: usize) -> f64 {
    (in_flight(&counter.load) + extra) as f64 / counter.weight as f64
}

/// The counters of one snapshot's endpoints, in slot order. Persistent, as the snapshot's
/// slots are: the table of the next snapshot is derived from this one's.
type Table = Slots<Arc<Counter>>;

/// One thread's generator and the counters of its cached snapshot.
struct Local {
    rng: fastrand::Rng,
    loads: Table,
    /// The slots of instances in the preferred zone (empty: no preference applies).
    local: Arc<[u32]>,
    /// With outlier detection, the health of the cached snapshot's endpoints.
    hosts: Arc<[Arc<Host>]>,
}

/// Maps instances to their counters; used only when a thread moves to a new snapshot.
#[derive(Default)]
struct Registry {
    /// The counter table of the last snapshot mapped, so the threads that move to it next share
    /// one table, and the next snapshot's table is derived from it.
    current: Option<Mapped>,
    /// Every counter still alive (held by a table) and every load still alive (held by a
    /// counter or a guard), by instance and by occurrence of that instance in its set (a static
    /// list may repeat an instance, e.g. the empty one). An instance that leaves the set and
    /// comes back while its requests still run gets its old load back.
    by_instance: HashMap<(Instance, usize), (Weak<Counter>, Weak<Load>)>,
    /// How many tables were built over a whole set rather than derived from the last one.
    rebuilds: usize,
}

/// A snapshot (by version and instance slots) and its counter table.
struct Mapped {
    version: u64,
    instances: Slots<Instance>,
    loads: Table,
}

impl Registry {
    /// The counters of `snapshot`'s endpoints, in slot order: an instance already known keeps
    /// its counter, a new one gets a fresh counter.
    fn table<E>(&mut self, snapshot: &Snapshot<E>) -> Table {
        if let Some(m) = &self.current {
            if m.version == snapshot.version() && m.instances.ptr_eq(snapshot.instances()) {
                return m.loads.clone();
            }
        }
        let loads = self
            .derived(snapshot)
            .unwrap_or_else(|| self.rebuilt(snapshot));
        // Forget the counters no table holds any more, once they outnumber the live ones
        // (so the sweep's cost is shared among the changes that made them).
        if self.by_instance.len() > 2 * loads.len() + 64 {
            self.by_instance
                .retain(|_, (_, load)| load.strong_count() > 0);
        }
        self.current = Some(Mapped {
            version: snapshot.version(),
            instances: snapshot.instances().clone(),
            loads: loads.clone(),
        });
        loads
    }

    /// The counter of the `occurrence`th `instance` in a set: the live one, or a new one.
    fn counter(&mut self, instance: &Instance, occurrence: usize) -> Arc<Counter> {
        let key = (instance.clone(), occurrence);
        let known = self.by_instance.get(&key);
        if let Some(counter) = known.and_then(|(c, _)| c.upgrade()) {
            return counter;
        }
        // No counter holds the load any more, so the new one is again its only holder.
        let load = known
            .and_then(|(_, l)| l.upgrade())
            .unwrap_or_else(|| Arc::new(Load { _pad: [0; 6] }));
        let counter = Arc::new(Counter {
            load,
            weight: u64::from(instance.weight()),
        });
        self.by_instance.insert(
            key,
            (Arc::downgrade(&counter), Arc::downgrade(&counter.load)),
        );
        counter
    }

    /// `snapshot`'s table derived from the last one mapped, when the snapshot records its
    /// changed slots since that one: O(changes).
    fn derived<E>(&mut self, snapshot: &Snapshot<E>) -> Option<Table> {
        let (since, changed) = snapshot.changed_since()?;
        let mut loads = match &self.current {
            Some(m) if m.version == since => m.loads.clone(),
            _ => return None,
        };
        let len = snapshot.endpoints().len();
        while loads.len() > len {
            loads.pop();
        }
        for &slot in changed {
            let counter = self.counter(snapshot.instances().get(slot)?, 0);
            if slot < loads.len() {
                loads.set(slot, counter);
            } else if slot == loads.len() {
                loads.push(counter);
            } else {
                return None;
            }
        }
        (loads.len() == len).then_some(loads)
    }

    /// `snapshot`'s table built over all of its slots: O(N).
    fn rebuilt<E>(&mut self, snapshot: &Snapshot<E>) -> Table {
        self.rebuilds += 1;
        let instances = snapshot.instances();
        let mut occurrences: HashMap<&Instance, usize> = HashMap::new();
        let unnamed = Instance::new("");
        // Built over the endpoints: a snapshot whose instance list is shorter (a broken
        // endpointer) still gets one counter per endpoint.
        (0..snapshot.endpoints().len())
            .map(|i| {
                let instance = instances.get(i).unwrap_or(&unnamed);
                let seen = occurrences.entry(instance).or_insert(0);
                let occurrence = *seen;
                *seen += 1;
                self.counter(instance, occurrence)
            })
            .collect()
    }
}

impl<E: Send + Sync, P: Endpointer<E>> P2c<E, P> {
    /// A P2C balancer over `endpointer`, its random choices seeded from fastrand's per-thread
    /// generator.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::P2c;
    ///
    /// let p2c = P2c::new(FixedEndpointer::new(vec!["only"]));
    /// assert_eq!(*p2c.endpoint().unwrap(), "only");
    /// ```
    pub fn new(endpointer: P) -> Self {
        Self::build(endpointer, None)
    }

    /// A P2C balancer whose random choices are reproducible (see [`Random::with_seed`](crate::Random::with_seed)).
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::P2c;
    ///
    /// let picks = |seed| {
    ///     let p2c = P2c::with_seed(FixedEndpointer::new((0..100).collect()), seed);
    ///     (0..10).map(|_| *p2c.endpoint().unwrap()).collect::<Vec<i32>>()
    /// };
    /// assert_eq!(picks(1), picks(1));
    /// ```
    pub fn with_seed(endpointer: P, seed: u64) -> Self {
        Self::build(endpointer, Some(seed))
    }

    fn build(endpointer: P, seed: Option<u64>) -> Self {
        P2c {
            endpointer,
            seed,
            registry: Mutex::new(Registry::default()),
            cache: ThreadCache::new(),
            zone: None,
            health: Health::default(),
        }
    }

    /// Skips instances that `outliers` ejected (see [`Outliers`]); [`Retry`](crate::Retry)
    /// reports every attempt's outcome to it through [`Balancer::report`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::{Outliers, P2c};
    ///
    /// let p2c = P2c::new(FixedEndpointer::new(vec![1])).with_outliers(Arc::new(Outliers::new()));
    /// assert_eq!(*p2c.endpoint().unwrap(), 1);
    /// ```
    pub fn with_outliers(mut self, outliers: Arc<Outliers>) -> Self {
        self.health = Health::new(outliers);
        self
    }

    fn init(&self, ordinal: usize) -> Local {
        Local {
            rng: thread_rng(self.seed, ordinal),
            loads: Slots::new(),
            local: Arc::from(Vec::new()),
            hosts: Arc::from(Vec::new()),
        }
    }

    /// Prefers instances in `zone`, spilling by load: a pick takes the less loaded of two
    /// instances of the zone (per unit of weight, as always), unless that one carries more than
    /// `spill` times the load (plus one) of an instance drawn from the whole set, which then
    /// gets the request. So the zone takes everything while it keeps up, and sheds load to the
    /// others once it is `spill` times busier (2.0 is a usual setting; at least 1). With no
    /// instance in the zone, or only instances of the zone, it is plain P2C.
    ///
    /// ```
    /// use sd_core::{endpoint_fn, Balancer, DefaultEndpointer, EndpointerOptions, Event, Instance,
    ///               InstanceSet, Metadata, Publisher, ValueFormat};
    /// use sd_lb::P2c;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let zoned = |addr: &str, zone: &str| {
    ///     Instance::with_metadata(addr, Metadata::new().with_zone(zone), ValueFormat::Json).unwrap()
    /// };
    /// let set: InstanceSet = [zoned("a1", "a"), zoned("b1", "b"), zoned("b2", "b")].into_iter().collect();
    /// let endpointer = DefaultEndpointer::owning(
    ///     Publisher::new(Event::Instances(set)),
    ///     endpoint_fn(|i| i.addr().to_string()),
    ///     EndpointerOptions::new(),
    /// )
    /// .await;
    /// let p2c = P2c::with_seed(endpointer, 3).in_zone("a", 2.0).unwrap();
    /// let held: Vec<_> = (0..3).map(|_| p2c.endpoint().unwrap()).collect();
    /// assert!(held.iter().all(|g| **g == "a1"), "zone a keeps up with three requests");
    /// let more: Vec<_> = (0..20).map(|_| p2c.endpoint().unwrap()).collect();
    /// assert!(more.iter().any(|g| **g != "a1"), "then it sheds load");
    /// # }
    /// ```
    pub fn in_zone(mut self, zone: impl AsRef<str>, spill: f64) -> Result<Self, Error> {
        if !(spill >= 1.0 && spill.is_finite()) {
            return Err(Error::invalid_argument(format!(
                "spill factor {spill} must be a finite number of at least 1 (2.0 is usual)"
            )));
        }
        self.zone = Some(ZonePreference {
            zone: Arc::from(zone.as_ref()),
            spill,
            local: PerSnapshot::default(),
        });
        Ok(self)
    }

    /// The slots of `snapshot`'s instances in the preferred zone: empty without a preference,
    /// or when none or all of them are in it.
    fn local_slots(&self, snapshot: &Snapshot<E>) -> Arc<[u32]> {
        let Some(pref) = &self.zone else {
            return Arc::from(Vec::new());
        };
        pref.local.get(snapshot, || {
            let mut local = crate::per_snapshot::slots_in_zone(snapshot, &pref.zone);
            if local.len() == snapshot.endpoints().len() {
                local.clear();
            }
            Arc::from(local)
        })
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    /// use sd_lb::P2c;
    ///
    /// let p2c = P2c::new(FixedEndpointer::new(vec![1, 2]));
    /// assert_eq!(p2c.endpointer().endpoints().unwrap().len(), 2);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }
}

impl<E, P> Balancer for P2c<E, P>
where
    E: Clone + Send + Sync,
    P: Endpointer<E>,
{
    type Endpoint = InFlight<E>;

    #[inline]
    fn endpoint(&self) -> Result<InFlight<E>, Error> {
        self.with(
            // Inlined at both of the cache's call sites: as a call, its result would be
            // copied out of the callee's frame on every pick.
            #[inline(always)]
            |endpoints, snapshot, local| {
                let n = endpoints.len().min(local.loads.len());
                if n == 0 {
                    return Err(crate::metrics::no_endpoint(snapshot));
                }
                let i = self.admitted(local, n);
                guard_at(endpoints, &local.loads, snapshot, i)
            },
        )
    }

    /// The less loaded of two endpoints that have not failed in this call (see
    /// [`Balancer::endpoint_avoiding`]).
    fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<InFlight<E>, Error> {
        crate::pick::until_open(
            || {
                self.with(|endpoints, snapshot, local| {
                    let n = endpoints.len().min(local.loads.len());
                    if n == 0 {
                        return Some(Err(crate::metrics::no_endpoint(snapshot)));
                    }
                    let i = self.admitted(local, n);
                    let i = crate::pick::avoiding(tried, snapshot, i, n, |s| {
                        self.health.shut_at(&local.hosts, s)
                    })?;
                    Some(guard_at(endpoints, &local.loads, snapshot, i))
                })
            },
            || Err(crate::metrics::no_endpoint(&self.endpointer.snapshot())),
        )
    }

    /// Passes the outcome to the outlier detection, if any.
    fn report(&self, tried: &Tried, ok: bool) {
        if let Some(pick) = self.health.wants(tried) {
            self.with(|endpoints, snapshot, local| {
                self.health
                    .record(&local.hosts, snapshot, pick, ok, endpoints.len())
            });
        }
    }
}

impl<E: Send + Sync, P: Endpointer<E>> P2c<E, P> {
    /// Runs `pick` with this thread's snapshot and state (see [`ThreadCache::with`]).
    #[inline(always)]
    fn with<R>(&self, pick: impl FnOnce(&Slots<E>, &Snapshot<E>, &mut Local) -> R) -> R {
        self.cache.with(
            &self.endpointer,
            |ordinal| self.init(ordinal),
            |snapshot, local| self.refresh(snapshot, local),
            pick,
        )
    }

    /// Moves a thread's state to `snapshot`: its counter table, its zone's slots, and (with
    /// outlier detection) its health table.
    fn refresh(&self, snapshot: &Snapshot<E>, local: &mut Local) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        local.loads = registry.table(snapshot);
        drop(registry);
        local.local = self.local_slots(snapshot);
        self.health.refresh(snapshot, &mut local.hosts);
    }

    /// [`choose`](Self::choose), drawn again past ejected instances and those slow start
    /// turns away.
    #[inline(always)]
    fn admitted(&self, local: &mut Local, n: usize) -> usize {
        let Local {
            rng,
            loads,
            local: zone,
            hosts,
            ..
        } = local;
        let first = self.choose(rng, loads, zone, n);
        self.health
            .pick(hosts, n, first, || self.choose(rng, loads, zone, n))
    }

    /// The slot to pick among `n` (at least 1): the lighter of two random ones per unit of
    /// weight, within the preferred zone unless it spills.
    #[inline(always)]
    fn choose(&self, rng: &mut fastrand::Rng, loads: &Table, zone: &[u32], n: usize) -> usize {
        match n {
            1 => 0,
            _ if !zone.is_empty() => {
                let best = match zone.len() {
                    1 => zone[0] as usize,
                    m => {
                        let (a, b) = two(rng, m);
                        lighter(loads, zone[a] as usize, zone[b] as usize)
                    }
                };
                let other = rng.usize(..n);
                let spill = self.zone.as_ref().map_or(f64::INFINITY, |z| z.spill);
                match (loads.get(best), loads.get(other)) {
                    (Some(lb), Some(lo)) if per_weight(lb, 0) > spill * per_weight(lo, 1) => other,
                    _ => best,
                }
            }
            _ => {
                let (a, b) = two(rng, n);
                lighter(loads, a, b)
            }
        }
    }
}

/// The endpoint at slot `i` with its counter, as a request in flight.
#[inline(always)]
fn guard_at<E: Clone>(
    endpoints: &Slots<E>,
    loads: &Table,
    snapshot: &Snapshot<E>,
    i: usize,
) -> Result<InFlight<E>, Error> {
    match (endpoints.get(i), loads.get(i)) {
        (Some(endpoint), Some(counter)) => Ok(InFlight {
            endpoint: endpoint.clone(),
            // This clone is the request in flight.
            load: counter.load.clone(),
        }),
        _ => Err(crate::metrics::no_endpoint(snapshot)),
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for P2c<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let in_flight: Vec<usize> = registry
            .current
            .as_ref()
            .map(|m| m.loads.iter().map(|c| in_flight(&c.load)).collect())
            .unwrap_or_default();
        f.debug_struct("P2c")
            .field("seed", &self.seed)
            .field("version", &self.endpointer.version())
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .field("in_flight", &in_flight)
            .finish_non_exhaustive()
    }
}

/// An endpoint picked by [`P2c`], counted as one request in flight until dropped.
///
/// Derefs to the endpoint. Keep it alive for as long as the request runs (move it into the
/// request's future); dropping it releases the count, also when the request is cancelled.
///
/// ```
/// use sd_core::{Balancer, FixedEndpointer};
/// use sd_lb::P2c;
///
/// let p2c = P2c::new(FixedEndpointer::new(vec![String::from("a:80")]));
/// let first = p2c.endpoint().unwrap();
/// assert_eq!(first.len(), 4); // a method of String, through Deref
/// let second = p2c.endpoint().unwrap();
/// assert_eq!(second.load(), 2);
/// drop(first);
/// assert_eq!(second.load(), 1);
/// ```
pub struct InFlight<E> {
    endpoint: E,
    load: Arc<Load>,
}

impl<E> InFlight<E> {
    /// The endpoint.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::P2c;
    ///
    /// let p2c = P2c::new(FixedEndpointer::new(vec![5u16]));
    /// assert_eq!(*p2c.endpoint().unwrap().endpoint(), 5);
    /// ```
    pub fn endpoint(&self) -> &E {
        &self.endpoint
    }

    /// The number of requests in flight on this endpoint now, this one included.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::P2c;
    ///
    /// let p2c = P2c::new(FixedEndpointer::new(vec!["a"]));
    /// let guard = p2c.endpoint().unwrap();
    /// assert_eq!(guard.load(), 1);
    /// ```
    pub fn load(&self) -> usize {
        in_flight(&self.load)
    }
}

impl<E> Deref for InFlight<E> {
    type Target = E;

    fn deref(&self) -> &E {
        &self.endpoint
    }
}

#[cfg(feature = "tower")]
crate::tower::service_of_guard!(
    InFlight,
    "The picked endpoint's service (feature `tower`), by delegation. Keep the guard until the \
     response ends ([`Balanced`](crate::tower::Balanced) does) for the call to count as in \
     flight."
);

impl<E: fmt::Debug> fmt::Debug for InFlight<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("endpoint", &self.endpoint)
            .field("load", &self.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::FixedEndpointer;
    use std::sync::Arc;

    #[test]
    fn prefers_the_less_loaded_of_two() {
        // With two endpoints both are always drawn, so every pick goes to the less loaded one.
        let p2c = P2c::with_seed(FixedEndpointer::new(vec!["a", "b"]), 1);
        let mut held: Vec<InFlight<&str>> = Vec::new();
        for _ in 0..20 {
            held.push(p2c.endpoint().unwrap());
            let on_a = held.iter().filter(|g| ***g == "a").count();
            assert!(
                on_a.abs_diff(held.len() - on_a) <= 1,
                "loads never differ by more than one"
            );
        }
        // Free "a" entirely: "b" still holds 10, so the next 10 picks must all be "a".
        held.retain(|g| **g == "b");
        for i in 0..10 {
            let g = p2c.endpoint().unwrap();
            assert_eq!(*g, "a", "pick {i}");
            held.push(g);
        }
    }

    #[test]
    fn releases_the_count_when_the_guard_drops() {
        let p2c = P2c::with_seed(FixedEndpointer::new(vec!["a", "b"]), 2);
        let a = p2c.endpoint().unwrap();
        let busy = *a;
        for _ in 0..10 {
            // `busy` holds one request, the other none: every pick goes to the other.
            let other = p2c.endpoint().unwrap();
            assert_ne!(*other, busy);
            assert_eq!(other.load(), 1);
        }
        drop(a);
        let loads: Vec<usize> = {
            let g1 = p2c.endpoint().unwrap();
            let g2 = p2c.endpoint().unwrap();
            vec![g1.load(), g2.load()]
        };
        assert_eq!(loads, [1, 1], "both idle again after the drop: one each");
    }

    #[test]
    fn keeps_the_loads_close_over_many_endpoints() {
        let p2c = P2c::with_seed(FixedEndpointer::new((0..10).collect::<Vec<u32>>()), 3);
        let held: Vec<_> = (0..200).map(|_| p2c.endpoint().unwrap()).collect();
        let mut loads = vec![0usize; 10];
        for g in &held {
            loads[**g as usize] += 1;
        }
        // Mean 20. Random alone would typically leave a spread of about 13 here (3 standard
        // deviations of a bucket); the power of two choices keeps it to a few.
        let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(max - min <= 4, "{loads:?}");
        drop(held);
        assert_eq!(p2c.endpoint().unwrap().load(), 1, "every count released");
    }

    #[test]
    fn no_endpoints_is_an_error() {
        let p2c = P2c::new(FixedEndpointer::<u8>::new(vec![]));
        assert!(matches!(
            p2c.endpoint(),
            Err(Error::NoEndpoints { last_error: None })
        ));
    }

    #[test]
    fn repeated_instances_get_their_own_counters() {
        // FixedEndpointer names every instance "": each position still has its own count.
        let p2c = P2c::with_seed(FixedEndpointer::new(vec![0, 1]), 4);
        let g = p2c.endpoint().unwrap();
        assert_eq!(g.load(), 1);
        let other = p2c.endpoint().unwrap();
        assert_ne!(*other, *g);
        assert_eq!((g.load(), other.load()), (1, 1));
    }

    #[test]
    fn threads_share_the_counts() {
        let p2c = Arc::new(P2c::with_seed(FixedEndpointer::new(vec!["a", "b"]), 5));
        let mine = p2c.endpoint().unwrap();
        let theirs = std::thread::scope(|s| s.spawn(|| *p2c.endpoint().unwrap()).join().unwrap());
        assert_ne!(
            theirs, *mine,
            "the other thread sees this thread's request in flight"
        );
    }

    /// A live set of 2 000 instances changed 200 times, a few instances at a time: each new
    /// table is derived from the last (no rebuild over the whole set), and every slot's counter
    /// is its instance's.
    #[tokio::test]
    async fn tables_follow_small_changes_without_a_rebuild() {
        use sd_core::{
            Closer, DefaultEndpointer, EndpointerOptions, Event, InstanceSet, Publisher,
        };
        let mut set: InstanceSet = (0..2000).map(|i| format!("i{i}")).collect();
        let publisher = Publisher::new(Event::Instances(set.clone()));
        let factory =
            |i: &Instance| -> Result<(String, Option<Closer>), Error> { Ok((i.to_string(), None)) };
        let endpointer =
            Arc::new(DefaultEndpointer::new(&publisher, factory, EndpointerOptions::new()).await);
        let p2c = P2c::with_seed(endpointer.clone(), 8);
        let held = p2c.endpoint().unwrap();
        let mut rng = fastrand::Rng::with_seed(9);
        for round in 0..200 {
            let victim = set.iter().nth(rng.usize(..set.len())).cloned().unwrap();
            if *victim != **held {
                set.remove(&victim);
            }
            set.insert(format!("n{round}"));
            let version = endpointer.version();
            publisher.publish(Event::Instances(set.clone()));
            while endpointer.version() == version {
                tokio::task::yield_now().await;
            }
            drop(p2c.endpoint().unwrap());
            let registry = p2c.registry.lock().unwrap();
            let m = registry.current.as_ref().unwrap();
            assert_eq!(m.loads.len(), set.len());
            for (instance, counter) in m.instances.iter().zip(m.loads.iter()) {
                let (known, _) = &registry.by_instance[&(instance.clone(), 0)];
                assert!(
                    Weak::ptr_eq(known, &Arc::downgrade(counter)),
                    "round {round}"
                );
            }
        }
        assert_eq!(
            p2c.registry.lock().unwrap().rebuilds,
            1,
            "only the first table"
        );
        assert_eq!(held.load(), 1, "the held request is still counted");
    }

    #[test]
    fn debug_shows_the_counts() {
        let p2c = P2c::with_seed(FixedEndpointer::new(vec![1]), 6);
        let g = p2c.endpoint().unwrap();
        let s = format!("{p2c:?} {g:?}");
        assert!(s.contains("in_flight: [1]") && s.contains("load: 1"), "{s}");
    }
}
