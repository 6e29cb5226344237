//! Round robin: each endpoint in turn.

use std::fmt;

use std::sync::Arc;

use sd_core::{Balancer, Endpointer, Error, Slots, Snapshot, Tried};

use crate::outliers::{Health, Host, Outliers};

use crate::thread_cache::ThreadCache;

/// Hands out the endpoints of an [`Endpointer`] in turn (go-kit's `NewRoundRobin`).
///
/// A pick takes no lock, allocates nothing and does not await: each thread keeps its own cached
/// snapshot of the endpoint set (refreshed only when the endpointer's version moves) and its own
/// position in it. A thread's position starts at its ordinal (the first thread to pick starts
/// on the first endpoint, the second on the second, ...), so threads do not all begin on the
/// same endpoint. On one thread the order is exact round robin; over several threads each
/// thread cycles through the set, which spreads the load evenly without a shared counter.
///
/// When the set changes, a thread carries on from its position in the new set.
///
/// ```
/// use sd_core::{Balancer, FixedEndpointer};
/// use sd_lb::RoundRobin;
///
/// let rr = RoundRobin::new(FixedEndpointer::new(vec!["a:80", "b:80", "c:80"]));
/// let picks: Vec<_> = (0..4).map(|_| rr.endpoint().unwrap()).collect();
/// assert_eq!(picks, ["a:80", "b:80", "c:80", "a:80"]);
///
/// let empty = RoundRobin::new(FixedEndpointer::<&str>::new(vec![]));
/// assert!(matches!(empty.endpoint(), Err(sd_core::Error::NoEndpoints { .. })));
/// ```
pub struct RoundRobin<E: Send + Sync, P> {
    endpointer: P,
    cache: ThreadCache<E, RrState>,
    health: Health,
}

/// Per thread: the position of its next pick, and (with outlier detection) the health of the
/// cached snapshot's endpoints.
struct RrState {
    next: usize,
    hosts: Arc<[Arc<Host>]>,
}

impl<E: Send + Sync, P: Endpointer<E>> RoundRobin<E, P> {
    /// A round robin balancer over `endpointer`'s current endpoints.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::RoundRobin;
    ///
    /// // Share one endpointer between balancers with an Arc.
    /// let endpoints = Arc::new(FixedEndpointer::new(vec![1, 2]));
    /// let rr = RoundRobin::new(endpoints.clone());
    /// assert_eq!(rr.endpoint().unwrap(), 1);
    /// ```
    pub fn new(endpointer: P) -> Self {
        RoundRobin {
            endpointer,
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
    /// use sd_lb::{Outliers, RoundRobin};
    ///
    /// let rr = RoundRobin::new(FixedEndpointer::new(vec![1, 2]))
    ///     .with_outliers(Arc::new(Outliers::new()));
    /// assert_eq!(rr.endpoint().unwrap(), 1);
    /// ```
    pub fn with_outliers(mut self, outliers: Arc<Outliers>) -> Self {
        self.health = Health::new(outliers);
        self
    }

    fn init(ordinal: usize) -> RrState {
        RrState {
            next: ordinal,
            hosts: Arc::from(Vec::new()),
        }
    }

    /// Runs `pick` with this thread's snapshot and state (see [`ThreadCache::with`]).
    #[inline(always)]
    fn with<R>(&self, pick: impl FnOnce(&Slots<E>, &Snapshot<E>, &mut RrState) -> R) -> R {
        self.cache.with(
            &self.endpointer,
            Self::init,
            |snapshot, state| self.health.refresh(snapshot, &mut state.hosts),
            pick,
        )
    }

    /// The next slot in turn, past ejected instances and those slow start turns away.
    #[inline(always)]
    fn next_slot(&self, state: &mut RrState, n: usize) -> Option<usize> {
        let RrState { next, hosts } = state;
        let first = crate::pick::step(next, n)?;
        Some(
            self.health
                .pick(hosts, n, first, || crate::pick::step(next, n).unwrap_or(0)),
        )
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    /// use sd_lb::RoundRobin;
    ///
    /// let rr = RoundRobin::new(FixedEndpointer::new(vec![1, 2]));
    /// assert_eq!(rr.endpointer().endpoints().unwrap().len(), 2);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }
}

impl<E, P> Balancer for RoundRobin<E, P>
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

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for RoundRobin<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobin")
            .field("version", &self.endpointer.version())
            .field("endpoints", &self.endpointer.snapshot().endpoints().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_core::FixedEndpointer;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn visits_every_endpoint_equally_in_order() {
        let n = 7;
        let rr = RoundRobin::new(FixedEndpointer::new((0..n).collect()));
        let k = 50;
        let mut counts = vec![0usize; n];
        for pick in 0..k * n {
            let e = rr.endpoint().unwrap();
            assert_eq!(e, pick % n, "exact order on one thread");
            counts[e] += 1;
        }
        assert!(counts.iter().all(|&c| c == k), "{counts:?}");
    }

    #[test]
    fn no_endpoints_is_an_error() {
        let rr = RoundRobin::new(FixedEndpointer::<u8>::new(vec![]));
        for _ in 0..3 {
            match rr.endpoint() {
                Err(Error::NoEndpoints { last_error: None }) => {}
                other => panic!("expected NoEndpoints, got {other:?}"),
            }
        }
    }

    #[test]
    fn threads_start_at_different_endpoints_and_stay_even() {
        let rr = Arc::new(RoundRobin::new(FixedEndpointer::new(vec![0, 1, 2, 3])));
        assert_eq!(rr.endpoint().unwrap(), 0);
        let (first, counts) = std::thread::scope(|s| {
            s.spawn(|| {
                let first = rr.endpoint().unwrap();
                let mut counts = HashMap::new();
                for _ in 0..400 {
                    *counts.entry(rr.endpoint().unwrap()).or_insert(0) += 1;
                }
                (first, counts)
            })
            .join()
            .unwrap()
        });
        assert_eq!(first, 1, "the second thread starts on the second endpoint");
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn debug_shows_the_set_size() {
        let rr = RoundRobin::new(FixedEndpointer::new(vec![1, 2, 3]));
        let s = format!("{rr:?}");
        assert!(
            s.contains("RoundRobin") && s.contains("endpoints: 3"),
            "{s}"
        );
    }
}
