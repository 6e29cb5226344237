//! Weighted balancing: smooth weighted round robin and weighted random, by each instance's
//! [`weight`](sd_core::Instance::weight).
//!
//! Both pick through a *schedule*: one period of smooth weighted round robin, a list of slots in
//! which each endpoint appears as many times as its weight, spread out (nginx's algorithm: an
//! endpoint of weight 5 among two of weight 1 goes `a a b a c a a`, not `a a a a a b c`).
//! Round robin walks the schedule; random draws from it, which picks each endpoint with
//! probability weight / total. A pick is one index more than an unweighted one, and a set whose
//! weights are all equal has no schedule at all: it is picked as [`RoundRobin`](crate::RoundRobin)
//! and [`Random`](crate::Random) would.
//!
//! The schedule is built once per snapshot (shared by every thread that moves to it), in
//! O(total weight × log N). A period is at most [`MAX_PERIOD`] slots: larger totals are scaled
//! down in proportion (each weight at least 1), so shares are then exact to within one slot in
//! `MAX_PERIOD`.

use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

use sd_core::{Balancer, Endpointer, Error, Instance, Snapshot, Tried};

use crate::per_snapshot::PerSnapshot;

use crate::random::thread_rng;
use crate::thread_cache::ThreadCache;

/// The most slots one period of a schedule holds.
pub const MAX_PERIOD: usize = 1 << 16;

/// One period of smooth weighted round robin, as slot indices; `None` when all weights are equal.
type Schedule = Option<Arc<[u32]>>;

/// The schedule of `snapshot`: one weight per endpoint (an endpoint without an instance, from a
/// broken endpointer, has 1).
fn schedule_of<E>(snapshot: &Snapshot<E>) -> Schedule {
    let instances = snapshot.instances();
    let weights: Vec<u32> = (0..snapshot.endpoints().len())
        .map(|i| instances.get(i).map_or(1, Instance::weight))
        .collect();
    schedule(&weights)
}

/// One period of smooth weighted round robin over `weights` (slot `i` has `weights[i]`).
fn schedule(weights: &[u32]) -> Schedule {
    let first = *weights.first()?;
    if weights.iter().all(|&w| w == first) || weights.len() > u32::MAX as usize {
        return None;
    }
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let weights: Vec<u64> = if total > MAX_PERIOD as u64 {
        // Scaled to the period, each at least 1.
        weights
            .iter()
            .map(|&w| (u64::from(w) * MAX_PERIOD as u64 / total).max(1))
            .collect()
    } else {
        weights.iter().map(|&w| u64::from(w)).collect()
    };
    let total: u64 = weights.iter().sum();
    let n = weights.len() as u64;
    let slots = if n.saturating_mul(total) <= 1 << 22 {
        nginx(&weights, total)
    } else {
        earliest_deadline(&weights, total)
    };
    Some(Arc::from(slots))
}

/// nginx's smooth weighted round robin, step by step: every slot's credit grows by its weight,
/// the richest is picked and pays the total. O(N) per pick, used for small sets.
fn nginx(weights: &[u64], total: u64) -> Vec<u32> {
    let total = total as i64;
    let mut credit = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                credit[i] += *w as i64;
                if credit[i] > credit[best] {
                    best = i;
                }
            }
            credit[best] -= total;
            best as u32
        })
        .collect()
}

/// The same spread for large sets, O(log N) per slot: each slot's k-th turn is due at
/// (k + ½) / weight of the period, and turns are taken in order of their due time (ties to the
/// lower slot).
fn earliest_deadline(weights: &[u64], total: u64) -> Vec<u32> {
    // Due times compared exactly as fractions (2k + 1) / (2 w): the heap holds the negated
    // order through `Reverse`.
    #[derive(PartialEq, Eq)]
    struct Turn {
        num: u64,
        den: u64,
        slot: u32,
    }
    impl Ord for Turn {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            let a = u128::from(self.num) * u128::from(other.den);
            let b = u128::from(other.num) * u128::from(self.den);
            b.cmp(&a).then(other.slot.cmp(&self.slot))
        }
    }
    impl PartialOrd for Turn {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    let mut heap: BinaryHeap<Turn> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Turn {
            num: 1,
            den: 2 * w,
            slot: i as u32,
        })
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    while out.len() < total as usize {
        let Some(mut turn) = heap.pop() else { break };
        out.push(turn.slot);
        turn.num += 2;
        heap.push(turn);
    }
    out
}

/// Smooth weighted round robin: each endpoint gets picks in proportion to its instance's
/// weight, spread out over the period (see the [module docs](crate::weighted)).
///
/// Per thread, as [`RoundRobin`](crate::RoundRobin): a pick takes no lock and allocates nothing,
/// and on one thread the sequence is exact. With equal weights it is plain round robin.
///
/// ```
/// use sd_core::{DefaultEndpointer, EndpointerOptions, Event, Instance, InstanceSet, Metadata,
///               Publisher, ValueFormat, Balancer, endpoint_fn};
/// use sd_lb::WeightedRoundRobin;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let weighted = |addr: &str, w: u32| {
///     Instance::with_metadata(addr, Metadata::new().with_weight(w).unwrap(), ValueFormat::Json).unwrap()
/// };
/// let set: InstanceSet = [weighted("a", 5), weighted("b", 1), weighted("c", 1)].into_iter().collect();
/// let endpointer = DefaultEndpointer::owning(
///     Publisher::new(Event::Instances(set)),
///     endpoint_fn(|i| i.addr().to_string()),
///     EndpointerOptions::new(),
/// )
/// .await;
/// let wrr = WeightedRoundRobin::new(endpointer);
/// let picks: String = (0..7).map(|_| wrr.endpoint().unwrap()).collect();
/// assert_eq!(picks, "aabacaa");
/// # }
/// ```
pub struct WeightedRoundRobin<E: Send + Sync, P> {
    endpointer: P,
    schedules: PerSnapshot<Schedule>,
    cache: ThreadCache<E, RrState>,
}

struct RrState {
    schedule: Schedule,
    next: usize,
}

impl<E: Send + Sync, P: Endpointer<E>> WeightedRoundRobin<E, P> {
    /// A smooth weighted round robin balancer over `endpointer`.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::WeightedRoundRobin;
    ///
    /// // A fixed list has no metadata: every weight is 1, so this is round robin.
    /// let wrr = WeightedRoundRobin::new(FixedEndpointer::new(vec![1, 2]));
    /// assert_eq!((wrr.endpoint().unwrap(), wrr.endpoint().unwrap()), (1, 2));
    /// ```
    pub fn new(endpointer: P) -> Self {
        WeightedRoundRobin {
            endpointer,
            schedules: PerSnapshot::default(),
            cache: ThreadCache::new(),
        }
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// let wrr = sd_lb::WeightedRoundRobin::new(FixedEndpointer::new(vec![1]));
    /// assert_eq!(wrr.endpointer().endpoints().unwrap().len(), 1);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }
}

impl<E, P> Balancer for WeightedRoundRobin<E, P>
where
    E: Clone + Send + Sync,
    P: Endpointer<E>,
{
    type Endpoint = E;

    crate::pick::endpoint_by_pick!();
}

impl<E: Clone + Send + Sync, P: Endpointer<E>> WeightedRoundRobin<E, P> {
    /// One pick, recorded in `tried` when given (see [`crate::pick::cloned_avoiding`]).
    #[inline(always)]
    fn pick(&self, tried: Option<&mut Tried>) -> Option<Result<E, Error>> {
        self.cache.with(
            &self.endpointer,
            |ordinal| RrState {
                schedule: None,
                next: ordinal,
            },
            |snapshot, state| {
                state.schedule = self.schedules.get(snapshot, || schedule_of(snapshot));
            },
            #[inline(always)]
            |endpoints, snapshot, state| {
                let slot = crate::pick::step_over(
                    &mut state.next,
                    state.schedule.as_deref(),
                    endpoints.len(),
                );
                crate::pick::cloned_avoiding(endpoints, snapshot, slot, tried, |_| false)
            },
        )
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for WeightedRoundRobin<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightedRoundRobin")
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .finish()
    }
}

/// Weighted random: each pick is an endpoint with probability its instance's weight over the
/// total (a uniform draw from the schedule, see the [module docs](crate::weighted)). Seedable,
/// per thread, as [`Random`](crate::Random).
///
/// ```
/// use sd_core::{Balancer, FixedEndpointer};
/// use sd_lb::WeightedRandom;
///
/// let random = WeightedRandom::with_seed(FixedEndpointer::new(vec![1, 2, 3]), 7);
/// assert!((1..=3).contains(&random.endpoint().unwrap()));
/// ```
pub struct WeightedRandom<E: Send + Sync, P> {
    endpointer: P,
    seed: Option<u64>,
    schedules: PerSnapshot<Schedule>,
    cache: ThreadCache<E, RandomState>,
}

struct RandomState {
    schedule: Schedule,
    rng: fastrand::Rng,
}

impl<E: Send + Sync, P: Endpointer<E>> WeightedRandom<E, P> {
    /// A weighted random balancer over `endpointer`, seeded from fastrand's per-thread
    /// generator.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    ///
    /// let random = sd_lb::WeightedRandom::new(FixedEndpointer::new(vec!["only"]));
    /// assert_eq!(random.endpoint().unwrap(), "only");
    /// ```
    pub fn new(endpointer: P) -> Self {
        Self::build(endpointer, None)
    }

    /// A weighted random balancer whose draws are reproducible (see
    /// [`Random::with_seed`](crate::Random::with_seed)).
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::WeightedRandom;
    ///
    /// let picks = |seed| {
    ///     let r = WeightedRandom::with_seed(FixedEndpointer::new((0..100).collect()), seed);
    ///     (0..10).map(|_| r.endpoint().unwrap()).collect::<Vec<i32>>()
    /// };
    /// assert_eq!(picks(1), picks(1));
    /// ```
    pub fn with_seed(endpointer: P, seed: u64) -> Self {
        Self::build(endpointer, Some(seed))
    }

    fn build(endpointer: P, seed: Option<u64>) -> Self {
        WeightedRandom {
            endpointer,
            seed,
            schedules: PerSnapshot::default(),
            cache: ThreadCache::new(),
        }
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// let r = sd_lb::WeightedRandom::new(FixedEndpointer::new(vec![1]));
    /// assert_eq!(r.endpointer().endpoints().unwrap().len(), 1);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }
}

impl<E, P> Balancer for WeightedRandom<E, P>
where
    E: Clone + Send + Sync,
    P: Endpointer<E>,
{
    type Endpoint = E;

    crate::pick::endpoint_by_pick!();
}

impl<E: Clone + Send + Sync, P: Endpointer<E>> WeightedRandom<E, P> {
    /// One pick, recorded in `tried` when given (see [`crate::pick::cloned_avoiding`]).
    #[inline(always)]
    fn pick(&self, tried: Option<&mut Tried>) -> Option<Result<E, Error>> {
        self.cache.with(
            &self.endpointer,
            |ordinal| RandomState {
                schedule: None,
                rng: thread_rng(self.seed, ordinal),
            },
            |snapshot, state| {
                state.schedule = self.schedules.get(snapshot, || schedule_of(snapshot));
            },
            #[inline(always)]
            |endpoints, snapshot, state| {
                let slot = match &state.schedule {
                    _ if endpoints.is_empty() => None,
                    None => Some(state.rng.usize(..endpoints.len())),
                    Some(s) if !s.is_empty() => {
                        s.get(state.rng.usize(..s.len())).map(|&s| s as usize)
                    }
                    Some(_) => None,
                };
                crate::pick::cloned_avoiding(endpoints, snapshot, slot, tried, |_| false)
            },
        )
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for WeightedRandom<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightedRandom")
            .field("seed", &self.seed)
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(slots: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in slots {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn nginx_sequence_for_the_classic_example() {
        // nginx's own example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(nginx(&[5, 1, 1], 7), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(schedule(&[5, 1, 1]).unwrap()[..], [0, 0, 1, 0, 2, 0, 0]);
        assert!(
            schedule(&[3, 3, 3]).is_none(),
            "equal weights need no schedule"
        );
    }

    #[test]
    fn every_schedule_gives_each_slot_its_weight_and_spreads_it() {
        let weights: Vec<u32> = (0..3000).map(|i| 1 + (i % 7)).collect();
        let s = schedule(&weights).unwrap();
        assert_eq!(
            counts(&s, weights.len()),
            weights.iter().map(|&w| w as usize).collect::<Vec<_>>()
        );
        // Spread: a slot of weight w recurs about every total / w picks, never twice in a row
        // while others are due (here: no slot twice in a row at all).
        assert!(s.windows(2).all(|w| w[0] != w[1]));
        let e = earliest_deadline(&[5, 1, 1], 7);
        assert_eq!(counts(&e, 3), [5, 1, 1]);
    }

    #[test]
    fn a_large_total_is_scaled_to_the_period() {
        let weights = [1_000_000u32, 3_000_000, 1];
        let s = schedule(&weights).unwrap();
        assert!(s.len() <= MAX_PERIOD + weights.len());
        let c = counts(&s, 3);
        assert_eq!(c[2], 1, "every slot keeps at least one turn");
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{c:?}");
    }
}
