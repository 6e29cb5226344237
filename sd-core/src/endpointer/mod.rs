//! Endpoint sets: the [`Endpointer`] trait, its [`Snapshot`], the live [`DefaultEndpointer`] and
//! the static [`FixedEndpointer`].

mod calls;
mod default;
mod fixed;
pub mod slots;

use std::sync::Arc;

pub use calls::{CallGuard, Calls};
pub use default::{DefaultEndpointer, EndpointerOptions};
pub use fixed::FixedEndpointer;
pub use slots::Slots;

use crate::{Error, Instance};

/// One consistent view of an endpointer: its endpoints, the instances they were made for (same
/// order), the error that is current, and a version that changes whenever any of them does.
///
/// Endpoints are kept in [`Slots`], in slot order (not sorted): a new instance takes the next
/// slot, and a removed one's slot is filled by the last endpoint, so a change touches a bounded
/// number of slots and the next snapshot shares everything else with this one. Where the
/// endpointer knows them it also records which slots changed since the previous snapshot
/// ([`changed_since`](Self::changed_since)), so per-endpoint state kept beside a snapshot (P2C's
/// load counters) follows a change in time proportional to it.
///
/// ```
/// use sd_core::{Endpointer, FixedEndpointer};
///
/// let e = FixedEndpointer::new(vec!["a", "b"]);
/// let snap = e.snapshot();
/// assert_eq!(*snap.endpoints(), ["a", "b"]);
/// assert!(snap.error().is_none());
/// ```
#[derive(Debug)]
pub struct Snapshot<E> {
    version: u64,
    instances: Slots<Instance>,
    endpoints: Slots<E>,
    error: Option<Arc<Error>>,
    changed: Option<(u64, Arc<[usize]>)>,
    /// Each endpoint's calls in flight, when the endpointer drains removed endpoints.
    calls: Option<Slots<Arc<Calls>>>,
}

impl<E> Snapshot<E> {
    /// A snapshot; `instances` and `endpoints` must have the same length and order (an endpoint
    /// without an instance gets an empty one).
    ///
    /// ```
    /// use sd_core::{Instance, Slots, Snapshot};
    ///
    /// let instances = Slots::from(vec![Instance::new("a:1")]);
    /// let snap = Snapshot::new(1, instances, Slots::from(vec!["a"]), None);
    /// assert_eq!((snap.instances()[0].as_str(), snap.endpoints()[0]), ("a:1", "a"));
    /// ```
    pub fn new(
        version: u64,
        instances: Slots<Instance>,
        endpoints: Slots<E>,
        error: Option<Arc<Error>>,
    ) -> Self {
        debug_assert_eq!(instances.len(), endpoints.len());
        Snapshot {
            version,
            instances,
            endpoints,
            error,
            changed: None,
            calls: None,
        }
    }

    /// Attaches each endpoint's [`Calls`] (same order as the endpoints), for an endpointer that
    /// closes a removed endpoint only once the calls through it end (see
    /// [`EndpointerOptions::drain`]). Balancers count a call through
    /// [`Tried::record_in`](crate::Tried::record_in).
    ///
    /// ```
    /// use sd_core::{Calls, Slots, Snapshot};
    ///
    /// let snap = Snapshot::new(1, Slots::from(vec!["a:1".into()]), Slots::from(vec![1]), None)
    ///     .with_calls(Slots::from(vec![Calls::new()]));
    /// assert_eq!(snap.calls().map(|c| c.len()), Some(1));
    /// ```
    pub fn with_calls(mut self, calls: Slots<Arc<Calls>>) -> Self {
        debug_assert_eq!(calls.len(), self.endpoints.len());
        self.calls = Some(calls);
        self
    }

    /// Each endpoint's calls in flight, when the endpointer drains (see
    /// [`with_calls`](Self::with_calls)).
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// assert!(FixedEndpointer::new(vec![1]).snapshot().calls().is_none());
    /// ```
    #[inline]
    pub fn calls(&self) -> Option<&Slots<Arc<Calls>>> {
        self.calls.as_ref()
    }

    /// Records that this snapshot differs from the one of version `since` only in the given
    /// `slots` (below this snapshot's length) and in its length: every other slot holds the same
    /// instance and endpoint. An endpointer that knows this says so; one that does not leaves it
    /// out, and readers then treat every slot as changed.
    ///
    /// ```
    /// use sd_core::{Slots, Snapshot};
    ///
    /// let snap = Snapshot::new(5, Slots::from(vec!["a:1".into()]), Slots::from(vec![1]), None)
    ///     .with_changed_slots(4, vec![0]);
    /// assert_eq!(snap.changed_since(), Some((4, &[0][..])));
    /// ```
    pub fn with_changed_slots(mut self, since: u64, slots: Vec<usize>) -> Self {
        self.changed = Some((since, Arc::from(slots)));
        self
    }

    /// The version this snapshot was derived from and the slots that changed since, if the
    /// endpointer recorded them (see [`with_changed_slots`](Self::with_changed_slots)). Slots past
    /// the older snapshot's length are new; the older snapshot's slots past this one's length are
    /// gone.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// assert_eq!(FixedEndpointer::new(vec![1]).snapshot().changed_since(), None);
    /// ```
    pub fn changed_since(&self) -> Option<(u64, &[usize])> {
        self.changed
            .as_ref()
            .map(|(since, slots)| (*since, &slots[..]))
    }

    /// Changes whenever the endpoints or the error change.
    ///
    /// ```
    /// use sd_core::{Slots, Snapshot};
    ///
    /// let snap = Snapshot::<u8>::new(7, Slots::new(), Slots::new(), None);
    /// assert_eq!(snap.version(), 7);
    /// ```
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The endpoints, in slot order.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// assert_eq!(*FixedEndpointer::new(vec![1, 2]).snapshot().endpoints(), [1, 2]);
    /// ```
    #[inline]
    pub fn endpoints(&self) -> &Slots<E> {
        &self.endpoints
    }

    /// The instance each endpoint was made for.
    ///
    /// ```
    /// use sd_core::{Instance, Slots, Snapshot};
    ///
    /// let snap = Snapshot::new(0, Slots::from(vec![Instance::new("a:1")]), Slots::from(vec![1]), None);
    /// assert_eq!(*snap.instances(), ["a:1"]);
    /// ```
    pub fn instances(&self) -> &Slots<Instance> {
        &self.instances
    }

    /// The current discovery error, if the instancer last reported one.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use sd_core::{Error, Slots, Snapshot};
    ///
    /// let err = Some(Arc::new(Error::backend_msg("down")));
    /// let snap = Snapshot::<u8>::new(0, Slots::new(), Slots::new(), err);
    /// assert_eq!(snap.error().unwrap().to_string(), "down");
    /// ```
    pub fn error(&self) -> Option<&Arc<Error>> {
        self.error.as_ref()
    }

    /// The error a balancer returns when this snapshot has no endpoint.
    ///
    /// ```
    /// use sd_core::{Endpointer, Error, FixedEndpointer};
    ///
    /// let err = FixedEndpointer::<u8>::new(vec![]).snapshot().no_endpoints();
    /// assert!(matches!(err, Error::NoEndpoints { last_error: None }));
    /// ```
    pub fn no_endpoints(&self) -> Error {
        Error::NoEndpoints {
            last_error: self.error.clone(),
        }
    }
}

/// The current set of endpoints of one service.
///
/// Balancers read it on every pick, so both methods are cheap: [`version`](Self::version) is one
/// atomic load, and a balancer calls [`snapshot`](Self::snapshot) only when the version moved.
///
/// ```
/// use sd_core::{Endpointer, FixedEndpointer};
///
/// let e = FixedEndpointer::new(vec![1, 2, 3]);
/// assert_eq!(e.endpoints().unwrap(), [1, 2, 3]);
/// assert!(FixedEndpointer::<u8>::new(vec![]).endpoints().is_err());
/// ```
pub trait Endpointer<E>: Send + Sync {
    /// The version of the current snapshot.
    fn version(&self) -> u64;

    /// The current snapshot.
    fn snapshot(&self) -> Arc<Snapshot<E>>;

    /// The current endpoints (in slot order, a cheap clone of the snapshot's), or
    /// [`Error::NoEndpoints`] (with the last discovery error) if none.
    fn endpoints(&self) -> Result<Slots<E>, Error> {
        let snap = self.snapshot();
        if snap.endpoints.is_empty() {
            Err(snap.no_endpoints())
        } else {
            Ok(snap.endpoints.clone())
        }
    }
}

/// A balancer may pick through a borrowed endpointer.
impl<E, T: Endpointer<E> + ?Sized> Endpointer<E> for &T {
    fn version(&self) -> u64 {
        (**self).version()
    }
    fn snapshot(&self) -> Arc<Snapshot<E>> {
        (**self).snapshot()
    }
}

impl<E, T: Endpointer<E> + ?Sized> Endpointer<E> for Arc<T> {
    fn version(&self) -> u64 {
        (**self).version()
    }
    fn snapshot(&self) -> Arc<Snapshot<E>> {
        (**self).snapshot()
    }
}
