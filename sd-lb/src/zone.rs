//! Zone preference: calls stay in the caller's zone while it has enough instances.
//!
//! The rule, after Envoy's zone-aware routing and gRPC's locality picking, simplified to what
//! discovery knows: let `L` be the instances whose [`zone`](sd_core::Instance::zone) is the
//! caller's and `N` all of them. While `L` holds at least `min_local` instances (default 1) and
//! at least `min_share` of `N` (default 0: no share required), picks go round robin over `L`
//! only; otherwise they *spill* round robin over all `N`, local ones included. An instance
//! without a zone is never local. A set that changes re-applies the rule at once.
//!
//! `min_local` protects a zone that shrank to one or two instances from taking the whole zone's
//! traffic; `min_share` does the same relative to the fleet (with 3 zones of equal size, 0.2
//! spills once the local zone holds under a fifth of the instances).
//!
//! That rule counts instances. To spill by *load* (the zone keeps its traffic while it keeps up,
//! and sheds it once it is busier than the rest), use [`P2c::in_zone`](crate::P2c::in_zone).

use std::fmt;
use std::sync::Arc;

use sd_core::{Balancer, Endpointer, Error, Snapshot, Tried};

use crate::per_snapshot::PerSnapshot;

use crate::thread_cache::ThreadCache;

/// Prefers instances in the caller's zone (see the [module docs](crate::zone) for the rule),
/// round robin within the chosen group; per thread and lock-free, as
/// [`RoundRobin`](crate::RoundRobin).
///
/// ```
/// use sd_core::{endpoint_fn, Balancer, DefaultEndpointer, EndpointerOptions, Event, Instance,
///               InstanceSet, Metadata, Publisher, ValueFormat};
/// use sd_lb::ZoneAware;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let zoned = |addr: &str, zone: &str| {
///     Instance::with_metadata(addr, Metadata::new().with_zone(zone), ValueFormat::Json).unwrap()
/// };
/// let set: InstanceSet = [zoned("a1", "a"), zoned("a2", "a"), zoned("b1", "b")].into_iter().collect();
/// let endpointer = DefaultEndpointer::owning(
///     Publisher::new(Event::Instances(set)),
///     endpoint_fn(|i| i.addr().to_string()),
///     EndpointerOptions::new(),
/// )
/// .await;
/// let balancer = ZoneAware::new(endpointer, "a");
/// let picks: Vec<String> = (0..4).map(|_| balancer.endpoint().unwrap()).collect();
/// assert_eq!(picks, ["a1", "a2", "a1", "a2"], "zone b gets nothing while zone a has instances");
/// # }
/// ```
pub struct ZoneAware<E: Send + Sync, P> {
    endpointer: P,
    zone: Arc<str>,
    min_local: usize,
    min_share: f64,
    groups: PerSnapshot<Group>,
    cache: ThreadCache<E, ZoneState>,
}

/// The slots picks go to in one snapshot: the local ones, or `None` for all of them.
type Group = Option<Arc<[u32]>>;

struct ZoneState {
    group: Group,
    next: usize,
}

impl<E: Send + Sync, P: Endpointer<E>> ZoneAware<E, P> {
    /// Prefers instances in `zone` over `endpointer`, with the default thresholds (at least one
    /// local instance, no share required).
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    ///
    /// // A fixed list has no zones: nothing is local, so every pick spills over all.
    /// let b = sd_lb::ZoneAware::new(FixedEndpointer::new(vec![1, 2]), "eu-1");
    /// assert_eq!((b.endpoint().unwrap(), b.endpoint().unwrap()), (1, 2));
    /// ```
    pub fn new(endpointer: P, zone: impl AsRef<str>) -> Self {
        ZoneAware {
            endpointer,
            zone: Arc::from(zone.as_ref()),
            min_local: 1,
            min_share: 0.0,
            groups: PerSnapshot::default(),
            cache: ThreadCache::new(),
        }
    }

    /// Spill over all zones while the local zone has fewer than `n` instances (at least 1).
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let b = sd_lb::ZoneAware::new(FixedEndpointer::new(vec![1]), "z").min_local(3);
    /// # let _ = b;
    /// ```
    pub fn min_local(mut self, n: usize) -> Self {
        self.min_local = n.max(1);
        self
    }

    /// Spill over all zones while the local zone holds less than `share` (0 to 1) of all
    /// instances. Out of range is an error.
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    ///
    /// let b = sd_lb::ZoneAware::new(FixedEndpointer::new(vec![1]), "z").min_share(0.2).unwrap();
    /// assert!(sd_lb::ZoneAware::new(FixedEndpointer::new(vec![1]), "z").min_share(1.5).is_err());
    /// # let _ = b;
    /// ```
    pub fn min_share(mut self, share: f64) -> Result<Self, Error> {
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::invalid_argument(format!(
                "zone share {share} must be between 0 and 1"
            )));
        }
        self.min_share = share;
        Ok(self)
    }

    /// The endpointer this balancer picks from.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// let b = sd_lb::ZoneAware::new(FixedEndpointer::new(vec![1]), "z");
    /// assert_eq!(b.endpointer().endpoints().unwrap().len(), 1);
    /// ```
    pub fn endpointer(&self) -> &P {
        &self.endpointer
    }

    /// The slots to pick from in `snapshot`: the local ones, or all (`None`).
    fn group(&self, snapshot: &Snapshot<E>) -> Group {
        self.groups.get(snapshot, || {
            let all = snapshot.endpoints().len();
            let local: Vec<u32> = crate::per_snapshot::slots_in_zone(snapshot, &self.zone);
            let enough = local.len() >= self.min_local
                && local.len() as f64 >= self.min_share * all as f64;
            if !enough && all > 0 {
                tracing::debug!(zone = %self.zone, all, "too few local instances: spilling over all zones");
            }
            enough.then(|| Arc::from(local))
        })
    }
}

impl<E, P> Balancer for ZoneAware<E, P>
where
    E: Clone + Send + Sync,
    P: Endpointer<E>,
{
    type Endpoint = E;

    crate::pick::endpoint_by_pick!();
}

impl<E: Clone + Send + Sync, P: Endpointer<E>> ZoneAware<E, P> {
    /// One pick, recorded in `tried` when given (see [`crate::pick::cloned_avoiding`]).
    #[inline(always)]
    fn pick(&self, tried: Option<&mut Tried>) -> Option<Result<E, Error>> {
        self.cache.with(
            &self.endpointer,
            |ordinal| ZoneState {
                group: None,
                next: ordinal,
            },
            |snapshot, state| state.group = self.group(snapshot),
            #[inline(always)]
            |endpoints, snapshot, state| {
                let slot = crate::pick::step_over(
                    &mut state.next,
                    state.group.as_deref(),
                    endpoints.len(),
                );
                crate::pick::cloned_avoiding(endpoints, snapshot, slot, tried, |_| false)
            },
        )
    }
}

impl<E: Send + Sync, P: Endpointer<E>> fmt::Debug for ZoneAware<E, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneAware")
            .field("zone", &self.zone)
            .field("min_local", &self.min_local)
            .field("min_share", &self.min_share)
            .finish()
    }
}
