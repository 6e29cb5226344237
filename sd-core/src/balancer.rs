//! Picking one endpoint.

use crate::{CallGuard, Error, Snapshot};

/// Picks one endpoint per call.
///
/// `Endpoint` is what a pick hands out: the endpoint itself for most balancers, a guard that
/// derefs to it where the balancer tracks load (it releases the load when dropped). A balancer
/// with nothing to pick from returns [`Error::NoEndpoints`].
///
/// ```
/// use sd_core::{Balancer, Error};
///
/// struct First(Vec<&'static str>);
/// impl Balancer for First {
///     type Endpoint = &'static str;
///     fn endpoint(&self) -> Result<&'static str, Error> {
///         self.0.first().copied().ok_or(Error::NoEndpoints { last_error: None })
///     }
/// }
/// assert_eq!(First(vec!["a"]).endpoint().unwrap(), "a");
/// assert!(First(vec![]).endpoint().is_err());
/// ```
pub trait Balancer: Send + Sync {
    /// What one pick returns.
    type Endpoint;

    /// Picks an endpoint.
    fn endpoint(&self) -> Result<Self::Endpoint, Error>;

    /// Picks an endpoint other than those `tried` marks as failed, while another exists, and
    /// records the pick in `tried` (a retry then calls [`Tried::failed`] if it failed). The
    /// default ignores `tried`: a balancer that can steer around failed picks overrides it.
    ///
    /// ```
    /// use sd_core::{Balancer, Error, Tried};
    ///
    /// struct First(Vec<&'static str>);
    /// impl Balancer for First {
    ///     type Endpoint = &'static str;
    ///     fn endpoint(&self) -> Result<&'static str, Error> {
    ///         self.0.first().copied().ok_or(Error::NoEndpoints { last_error: None })
    ///     }
    /// }
    /// let mut tried = Tried::new();
    /// assert_eq!(First(vec!["a"]).endpoint_avoiding(&mut tried).unwrap(), "a");
    /// ```
    fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<Self::Endpoint, Error> {
        let _ = tried;
        self.endpoint()
    }

    /// How the call through the last pick recorded in `tried` went (`ok`), for a balancer that
    /// tracks the health of its endpoints (outlier detection). The default ignores it.
    /// [`Retry`](https://docs.rs/sd-lb) reports every attempt.
    ///
    /// ```
    /// use sd_core::{Balancer, Error, Tried};
    ///
    /// struct Only(&'static str);
    /// impl Balancer for Only {
    ///     type Endpoint = &'static str;
    ///     fn endpoint(&self) -> Result<&'static str, Error> { Ok(self.0) }
    /// }
    /// let b = Only("a");
    /// let mut tried = Tried::new();
    /// b.endpoint_avoiding(&mut tried).unwrap();
    /// b.report(&tried, false); // ignored by this balancer
    /// ```
    fn report(&self, tried: &Tried, ok: bool) {
        let _ = (tried, ok);
    }
}

/// The picks of one call that failed, so its retries go elsewhere (see
/// [`Balancer::endpoint_avoiding`]).
///
/// Picks are recorded by the position of the endpoint in the balancer's snapshot (its slot)
/// and that snapshot's version. When the set changes between attempts the positions mean other
/// instances, so what was tried before is forgotten rather than misapplied.
///
/// Recording a pick writes two words; only [`failed`](Self::failed) keeps it (allocating on the
/// first failure), so a call whose first attempt succeeds allocates nothing.
///
/// With an endpointer that drains removed endpoints ([`EndpointerOptions::drain`](crate::EndpointerOptions::drain)),
/// a pick recorded with [`record_in`](Self::record_in) also counts a call in flight through that
/// endpoint until [`finish`](Self::finish) (or the next pick, or dropping the `Tried`), so the
/// endpoint is not closed under it.
///
/// ```
/// use sd_core::Tried;
///
/// let mut tried = Tried::new();
/// tried.record(7, 2);
/// assert!(!tried.avoids(7, 2), "recorded, not yet failed");
/// tried.failed();
/// assert!(tried.avoids(7, 2));
/// assert!(!tried.avoids(8, 2), "another version: forgotten");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Tried {
    /// The snapshot version `slots` belong to.
    version: u64,
    slots: Vec<u32>,
    /// The last pick, not yet known to have failed.
    last: Option<(u64, u32)>,
    /// The call in flight through the last pick, when its endpointer drains.
    call: Option<CallGuard>,
}

impl Tried {
    /// Nothing tried yet.
    ///
    /// ```
    /// assert!(!sd_core::Tried::new().any(0));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a pick: slot `slot` of the snapshot of version `version` (by balancers).
    ///
    /// ```
    /// let mut t = sd_core::Tried::new();
    /// t.record(1, 0);
    /// ```
    #[inline]
    pub fn record(&mut self, version: u64, slot: usize) {
        self.last = u32::try_from(slot).ok().map(|s| (version, s));
    }

    /// Records a pick of slot `slot` of `snapshot` (by balancers), and counts a call in flight
    /// through it when the endpointer drains removed endpoints, until [`finish`](Self::finish).
    /// Returns `false`, recording nothing, when that endpoint was already closed: the snapshot
    /// is older than the endpoint's removal, so pick again from the endpointer's current one.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer, Tried};
    ///
    /// let snap = FixedEndpointer::new(vec!["a", "b"]).snapshot();
    /// let mut t = Tried::new();
    /// assert!(t.record_in(&snap, 1));
    /// assert_eq!(t.last(), Some((snap.version(), 1)));
    /// ```
    #[inline]
    pub fn record_in<E>(&mut self, snapshot: &Snapshot<E>, slot: usize) -> bool {
        self.call = None;
        if let Some(calls) = snapshot.calls() {
            match calls.get(slot).map(|c| c.enter()) {
                Some(None) => {
                    self.last = None;
                    return false;
                }
                Some(guard) => self.call = guard,
                None => {}
            }
        }
        self.record(snapshot.version(), slot);
        true
    }

    /// The call through the last pick has ended (by callers: [`Retry`](https://docs.rs/sd-lb)
    /// after each attempt); a removed endpoint waiting for it may close now. Also happens on the
    /// next pick and when the `Tried` is dropped.
    ///
    /// ```
    /// let mut t = sd_core::Tried::new();
    /// t.finish(); // nothing in flight: nothing to do
    /// ```
    #[inline]
    pub fn finish(&mut self) {
        self.call = None;
    }

    /// The last recorded pick failed: avoid it from now on (by retries).
    ///
    /// ```
    /// let mut t = sd_core::Tried::new();
    /// t.record(1, 3);
    /// t.failed();
    /// assert!(t.any(1));
    /// ```
    pub fn failed(&mut self) {
        if let Some((version, slot)) = self.last.take() {
            if version != self.version {
                self.version = version;
                self.slots.clear();
            }
            self.slots.push(slot);
        }
    }

    /// Whether slot `slot` of version `version` failed in this call.
    ///
    /// ```
    /// assert!(!sd_core::Tried::new().avoids(0, 0));
    /// ```
    #[inline]
    pub fn avoids(&self, version: u64, slot: usize) -> bool {
        version == self.version && self.slots.iter().any(|&s| s as usize == slot)
    }

    /// The last recorded pick (snapshot version, slot), if any.
    ///
    /// ```
    /// let mut t = sd_core::Tried::new();
    /// t.record(4, 2);
    /// assert_eq!(t.last(), Some((4, 2)));
    /// ```
    pub fn last(&self) -> Option<(u64, usize)> {
        self.last.map(|(v, s)| (v, s as usize))
    }

    /// Whether any pick of version `version` failed in this call.
    ///
    /// ```
    /// assert!(!sd_core::Tried::new().any(3));
    /// ```
    #[inline]
    pub fn any(&self, version: u64) -> bool {
        version == self.version && !self.slots.is_empty()
    }
}

impl<B: Balancer + ?Sized> Balancer for std::sync::Arc<B> {
    type Endpoint = B::Endpoint;
    fn endpoint(&self) -> Result<Self::Endpoint, Error> {
        (**self).endpoint()
    }
    fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<Self::Endpoint, Error> {
        (**self).endpoint_avoiding(tried)
    }
    fn report(&self, tried: &Tried, ok: bool) {
        (**self).report(tried, ok)
    }
}

impl<B: Balancer + ?Sized> Balancer for &B {
    type Endpoint = B::Endpoint;
    fn endpoint(&self) -> Result<Self::Endpoint, Error> {
        (**self).endpoint()
    }
    fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<Self::Endpoint, Error> {
        (**self).endpoint_avoiding(tried)
    }
    fn report(&self, tried: &Tried, ok: bool) {
        (**self).report(tried, ok)
    }
}
