//! Random: a uniformly random endpoint per pick.

use std::fmt;

use std::sync::Arc;

use sd_core::{Balancer, Endpointer, Error, Slots, Snapshot, Tried};

use crate::outliers::{Health, Host, Outliers};

use crate::thread_cache::ThreadCache;

/// Picks a uniformly random endpoint of an [`Endpointer`] (go-kit's `NewRandom`).
///
/// Each thread draws from its own [`fastrand::Rng`] and keeps its own cached snapshot of the
/// endpoint set, so a pick takes no lock, allocates nothing and shares no written memory with
/// other threads. [`Random::with_seed`] makes the picks reproducible: a thread's generator is
/// seeded from the seed and the thread's ordinal (the first thread to pick uses the seed
/// itself), so a single-threaded test sees the same sequence on every run.
///
/// ```
/// use sd_core::{Balancer, FixedEndpointer};
/// use sd_lb::Random;
///
/// let random = Random::new(FixedEndpointer::new(vec!["a:80", "b:80"]));
/// let pick = random.endpoint().unwrap();
/// assert!(pick == "a:80" || pick == "b:80");
/// ```
pub struct Random<E: Send + Sync, P> {
    endpointer: P,
    seed: Option<u64>,
    cache: ThreadCache<E, RandomState>,
    health: Health,
}

/// Per thread: its generator, and (with outlier detection) the health of the cached
/// snapshot's endpoints.
struct RandomState {
    rng: fastrand::Rng,
    hosts: Arc<[Arc<Host>]>,
}

impl<E: Send + Sync, P: Endpointer<E>> Random<E, P> {
    /// A random balancer over `endpointer`, seeded from fastrand's per-thread generator.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::Random;
    ///
    /// let random = Random::new(FixedEndpointer::new(vec![7]));
    /// assert_eq!(random.endpoint().unwrap(), 7);
    /// ```
    pub fn new(endpointer: P) -> Self {
        Random {
            endpointer,
            seed: None,
            cache: ThreadCache::new(),
            health: Health::default(),
        }
    }

    /// A random balancer whose picks are reproducible: the same seed gives the same sequence
    /// of picks on a thread (given the same sets and the same order in which threads start).
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::Random;
    ///
    /// let picks = |seed| {
    ///     let random = Random::with_seed(FixedEndpointer::new((0..100).collect()), seed);
    ///     (0..10).map(|_| random.endpoint().unwrap()).collect::<Vec<i32>>()
    /// };
    /// assert_eq!(picks(42), picks(42));
    /// assert_ne!(picks(42), picks(43));
    /// ```
    pub fn with_seed(endpointer: P, seed: u64) -> Self {
        Random {
            endpointer,
            seed: Some(seed),
            cache: ThreadCache::new(),
            health: Health::default(),
        }
    }

    /// Skips instances that `outliers` ejected (see [`Outliers`]); [`Retry`](crate::Retry)
    /// reports every attempt's outcome to it through [`Balancer::report`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::{Outliers, Random};
    ///
    /// let r = Random::new(FixedEndpointer::new(vec![1])).with_outliers(Arc::new(Outliers::new()));
    /// assert_eq!(r.endpoint().unwrap(), 1);
    /// ```
    pub fn with_outliers(mut self, outliers: Arc<Outliers>) -> Self {
        self.health = Health::new(outliers);
        self
    }

    fn init(&self, ordinal: usize) -> RandomState {
        RandomState {
            rng: thread_rng(self.seed, ordinal),
            hosts: Arc::from(Vec::new()),
        }
    }

    /// Runs `pick` with this thread's snapshot and state (see [`ThreadCache::with`]).
    #[inline(always)]
    fn with<R>(&self, pick: impl FnOnce(&Slots<E>, &Snapshot<E>, &mut RandomState) -> R) -> R {
        self.cache.with(
            &self.endpointer,
            |ordinal| self.init(ordinal),
            |snapshot, state| self.health.refresh(snapshot, &mut state.hosts),
            pick,
        )
    }

    /// A random slot, past ejected instances and those slow start turns away.
    #[inline(always)]
    fn next_slot(&self, state: &mut RandomState, n: usize) -> Option<usize> {
        let RandomState { rng, hosts } = state;
        // Slot 0 of an empty set: the pick finds no endpoint there and says so.
        let first = below(rng, n);
        Some(self.health.pick(hosts, n, first, || below(rng, n)))
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    /// use sd_lb::Random;
    ///
    /// let random = Random::new(FixedEndpointer::new(vec![1, 2]));
    /// assert_eq!(random.endpointer().endpoints().unwrap().len(), 2);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }
}

/// The generator of the thread with `ordinal`: seeded when a seed was given, else from
/// fastrand's own per-thread generator.
pub(crate) fn thread_rng(seed: Option<u64>, ordinal: usize) -> fastrand::Rng {
    match seed {
        // Spread the ordinals over the seed space (the golden-ratio increment of SplitMix64)
        // so neighbouring threads get unrelated sequences; ordinal 0 uses the seed as given.
        Some(seed) => fastrand::Rng::with_seed(
            seed.wrapping_add((ordinal as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        ),
        None => fastrand::Rng::new(),
    }
}

/// A uniform draw in `0..n` (0 when `n` is 0), by one widening multiply (Lemire's method
/// without its rejection step: the bias, under n / 2^64, is far below anything measurable).
#[inline(always)]
fn below(rng: &mut fastrand::Rng, n: usize) -> usize {
    ((u128::from(rng.u64(..)) * n as u128) >> 64) as usize
}

impl<E, P> Balancer for Random<E, P>
where
    E: Clone + Send + Sync,
    P: Endpointer<E>,
{
    type Endpoint = E;

    #[inline]
    fn endpoint(&self) -> Result<E, Error> {
        self.with(
            // Inlined at both of the cache's call sites: as a call, its result would be
            // copied out of the callee's frame on every pick.
            #[inline(always)]
            |endpoints, snapshot, state| {
                let slot = self.next_slot(state, endpoints.len());
                crate::pick::cloned_at(endpoints, snapshot, slot)
            },
        )
    }

    crate::pick::endpoint_avoiding_by_next_slot!();

    /// Passes the outcome to the outlier detection, if any.
    fn report(&self, tried: &Tried, ok: bool) {
        if let Some(pick) = self.health.wants(tried) {
            self.with(|endpoints, snapshot, state| {
                self.health
                    .record(&state.hosts, snapshot, pick, ok, endpoints.len())
            });
        }
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for Random<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Random")
            .field("seed", &self.seed)
            .field("version", &self.endpointer.version())
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::FixedEndpointer;
    use std::sync::Arc;

    /// Pearson's chi-square statistic of `counts` against a uniform distribution.
    fn chi_square(counts: &[usize]) -> f64 {
        let total: usize = counts.iter().sum();
        let expected = total as f64 / counts.len() as f64;
        counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn spreads_picks_uniformly() {
        let n = 10;
        let random = Random::with_seed(FixedEndpointer::new((0..n).collect()), 1);
        let picks = 100_000;
        let mut counts = vec![0usize; n];
        for _ in 0..picks {
            counts[random.endpoint().unwrap()] += 1;
        }
        // 9 degrees of freedom: P(chi² > 27.88) = 0.001 for a uniform source.
        let chi2 = chi_square(&counts);
        assert!(chi2 < 27.88, "chi² = {chi2}, counts {counts:?}");
        // And no bucket strays more than 5 % from the expected 10 000.
        let expected = picks / n;
        for &c in &counts {
            assert!(c.abs_diff(expected) < expected / 20, "{counts:?}");
        }
    }

    #[test]
    fn chi_square_flags_a_skewed_source() {
        // The check above can fail: a source that favours one endpoint is caught.
        let mut counts = vec![10_000usize; 10];
        counts[0] += 600;
        counts[1] -= 600;
        assert!(chi_square(&counts) > 27.88);
    }

    #[test]
    fn the_same_seed_gives_the_same_picks() {
        let picks = |seed| {
            let random = Random::with_seed(FixedEndpointer::new((0..1000).collect()), seed);
            (0..50)
                .map(|_| random.endpoint().unwrap())
                .collect::<Vec<u32>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
    }

    #[test]
    fn threads_get_different_sequences() {
        let random = Arc::new(Random::with_seed(
            FixedEndpointer::new((0..1000u32).collect()),
            3,
        ));
        let draw = || {
            (0..20)
                .map(|_| random.endpoint().unwrap())
                .collect::<Vec<_>>()
        };
        let mine = draw();
        let theirs = std::thread::scope(|s| s.spawn(draw).join().unwrap());
        assert_ne!(mine, theirs);
    }

    /// The draw stays below its bound, reaches every value, and gives 0 for an empty set.
    #[test]
    fn below_stays_in_range() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(super::below(&mut rng, 0), 0);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[super::below(&mut rng, 7)] = true;
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn no_endpoints_is_an_error() {
        let random = Random::new(FixedEndpointer::<u8>::new(vec![]));
        assert!(matches!(
            random.endpoint(),
            Err(Error::NoEndpoints { last_error: None })
        ));
    }

    #[test]
    fn debug_shows_the_seed() {
        let random = Random::with_seed(FixedEndpointer::new(vec![1]), 9);
        assert!(format!("{random:?}").contains("seed: Some(9)"));
    }
}
