//! Any [`Instancer`] as a [`tower::discover::Discover`] (feature `tower`), so tower's balancers
//! (and everything built on them) can use any sd backend.
//!
//! - [`discover`] borrows the instancer (keep it alive: dropping it stops it, and the
//!   discovery then ends); [`discover_owning`] takes it, and stops it when the discovery (or
//!   the tower balancer holding it) is dropped.
//! - Discovery errors are **not** yielded as stream errors: tower's balancers treat an error
//!   from their `Discover` as fatal (every later call fails), while a backend's errors are
//!   usually passing (etcd unreachable for a while). The balancer keeps the services it has, as
//!   sd's default endpointer does, and [`Discovery::state`] shows the error, the number of
//!   instances (an empty set makes tower's calls wait, without an error) and whether the
//!   instancer has stopped, so a caller can fail fast or explain a wait.
//! - Each service comes wrapped in a [`Closing`], which runs the instance's closer once tower has
//!   dropped the service and the calls made through it have ended, not when the removal is
//!   yielded.
//!
//! With tower's power-of-two-choices balancer:
//!
//! ```
//! use sd_core::{discover_owning, endpoint_fn, Event, Publisher};
//! use tower::balance::p2c::Balance;
//! use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let instancer = Publisher::new(Event::from_instances(["127.0.0.1:8080"]));
//! // Your client per instance; here a service answering with its instance.
//! let factory = endpoint_fn(|i| {
//!     let addr = i.to_string();
//!     service_fn(move |req: &'static str| {
//!         let addr = addr.clone();
//!         async move { Ok::<_, std::io::Error>(format!("{req} from {addr}")) }
//!     })
//! });
//! let discovery = discover_owning(instancer, factory);
//! let state = discovery.state();
//! let balance = Balance::new(PendingRequestsDiscover::new(discovery, CompleteOnResponse::default()));
//! let reply = balance.oneshot("hello").await?;
//! assert_eq!(reply, "hello from 127.0.0.1:8080");
//! assert_eq!(state.borrow().instances(), 1);
//! # Ok(())
//! # }
//! ```

mod closing;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tower::discover::Change;

pub use closing::{Closing, ResponseFuture};

use crate::factory::make_or_skip;
use crate::instancer::Owned;
use crate::{Error, Event, EventStream, Factory, Instance, InstanceSet, Instancer};

/// A stream of [`Change`]s, keyed by instance, made from an instancer's events and a factory:
/// a `tower::discover::Discover` (see the [module docs](self)).
///
/// Each new instance becomes `Change::Insert(instance, service)` (the factory is called once for
/// it; an instance whose factory fails is skipped, logged, and tried again on the next event),
/// each instance that goes away `Change::Remove(instance)`; the service is a [`Closing`], whose
/// closer runs once the service is dropped. An error event changes nothing but the
/// [`state`](Self::state): tower keeps the services it has. The stream ends when the instancer
/// stops (and stays ended: tower polls it again).
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{discover, Closer, Error, Event, Instance, Instancer, Publisher};
/// use tower::discover::Change;
///
/// # futures::executor::block_on(async {
/// struct Static(Publisher);
/// impl Instancer for Static {
///     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
///     fn stop(&self) { self.0.stop() }
/// }
/// let instancer = Static(Publisher::new(Event::from_instances(["127.0.0.1:80"])));
/// let factory = |i: &Instance| -> Result<(String, Option<Closer>), Error> {
///     Ok((format!("service for {i}"), None))
/// };
/// let mut changes = discover(&instancer, factory);
/// match changes.next().await {
///     Some(Ok(Change::Insert(key, svc))) => assert_eq!(*svc.get_ref(), format!("service for {key}")),
///     other => panic!("{other:?}"),
/// }
/// # });
/// ```
pub struct Discovery<S, F> {
    /// `None` once the instancer's stream has ended: it is never polled again (tower's
    /// balancers poll a discovery stream again after it ended).
    events: Option<EventStream>,
    factory: F,
    /// The instances whose service was made (and inserted or queued).
    current: BTreeSet<Instance>,
    /// The last event's set, to diff the next one against.
    last: InstanceSet,
    /// Instances of `last` the factory failed for: tried again on each event.
    failed: BTreeSet<Instance>,
    pending: VecDeque<Change<Instance, Closing<S>>>,
    state: watch::Sender<State>,
    /// The instancer, when the discovery owns it ([`discover_owning`]): stopped on drop.
    source: Option<Owned>,
}

/// What a [`Discovery`] knows of its source, watched through [`Discovery::state`]: how many
/// instances it has a service for, the current discovery error, and whether the instancer has
/// stopped.
///
/// It is updated as the discovery is polled; under a tower balancer that is on each
/// `poll_ready`, so while a call waits for an instance the state is current.
///
/// ```
/// use sd_core::discover::State;
///
/// let state = State::default();
/// assert_eq!(state.instances(), 0);
/// assert!(state.error().is_none() && !state.ended());
/// assert!(state.check().is_err(), "no instance: a call would wait");
/// ```
#[derive(Debug, Clone, Default)]
pub struct State {
    instances: usize,
    error: Option<Arc<Error>>,
    ended: bool,
}

impl State {
    /// The number of instances with a service (those the factory failed for are not counted).
    ///
    /// ```
    /// assert_eq!(sd_core::discover::State::default().instances(), 0);
    /// ```
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// The discovery error, if the instancer's last event was one (the services are kept);
    /// [`Error::Stopped`] once the instancer has stopped. Cleared by the next instance set.
    ///
    /// ```
    /// assert!(sd_core::discover::State::default().error().is_none());
    /// ```
    pub fn error(&self) -> Option<&Arc<Error>> {
        self.error.as_ref()
    }

    /// Whether the instancer has stopped (or was dropped): the set will not change again.
    ///
    /// ```
    /// assert!(!sd_core::discover::State::default().ended());
    /// ```
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// `Ok` while there is an instance to call; otherwise the error a caller should get instead
    /// of waiting: [`Error::NoEndpoints`], with the discovery error (if any) as its cause.
    ///
    /// ```
    /// use sd_core::Error;
    ///
    /// let err = sd_core::discover::State::default().check().unwrap_err();
    /// assert!(matches!(err, Error::NoEndpoints { last_error: None }));
    /// ```
    pub fn check(&self) -> Result<(), Error> {
        if self.instances == 0 {
            Err(Error::NoEndpoints {
                last_error: self.error.clone(),
            })
        } else {
            Ok(())
        }
    }
}

/// Follows `instancer`, turning its instances into services with `factory`, as a
/// `tower::discover::Discover` (see [`Discovery`]). The instancer is borrowed: keep it alive as
/// long as the discovery (dropping it stops it, and the discovery then ends; see
/// [`discover_owning`] to hand it over).
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{discover, Closer, Error, Event, Instance, Instancer, Publisher};
/// use tower::discover::Change;
/// # struct Static(Publisher);
/// # impl Instancer for Static {
/// #     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
/// #     fn stop(&self) { self.0.stop() }
/// # }
///
/// # futures::executor::block_on(async {
/// let instancer = Static(Publisher::new(Event::from_instances(["a:1"])));
/// let factory = |i: &Instance| -> Result<(usize, Option<Closer>), Error> { Ok((i.len(), None)) };
/// let change = discover(&instancer, factory).next().await;
/// assert!(matches!(change, Some(Ok(Change::Insert(k, s))) if k == "a:1" && *s.get_ref() == 3));
/// # });
/// ```
pub fn discover<I, S, F>(instancer: &I, factory: F) -> Discovery<S, F>
where
    I: Instancer + ?Sized,
    F: Factory<S>,
{
    Discovery {
        events: Some(instancer.subscribe()),
        factory,
        current: BTreeSet::new(),
        last: InstanceSet::new(),
        failed: BTreeSet::new(),
        pending: VecDeque::new(),
        state: watch::Sender::new(State::default()),
        source: None,
    }
}

/// Like [`discover`], but the discovery owns `instancer`: dropping the discovery (or the tower
/// balancer holding it) stops the instancer, so nothing outlives what the user holds. Pass an
/// `Arc` of an instancer to keep a handle to it too.
///
/// ```
/// use std::sync::Arc;
/// use sd_core::{discover_owning, endpoint_fn, Event, Publisher};
///
/// let instancer = Arc::new(Publisher::new(Event::from_instances(["a:1"])));
/// let discovery = discover_owning(instancer.clone(), endpoint_fn(|i| i.to_string()));
/// assert!(!instancer.is_stopped());
/// drop(discovery);
/// assert!(instancer.is_stopped());
/// ```
pub fn discover_owning<I, S, F>(instancer: I, factory: F) -> Discovery<S, F>
where
    I: Instancer + 'static,
    F: Factory<S>,
{
    let mut discovery = discover(&instancer, factory);
    discovery.source = Some(Owned::new(instancer));
    discovery
}

// Services are only ever moved in and out of the queue, never pinned.
impl<S, F: Unpin> Unpin for Discovery<S, F> {}

impl<S, F> fmt::Debug for Discovery<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("instances", &self.current)
            .field("pending_changes", &self.pending.len())
            .field("state", &*self.state.borrow())
            .field("owns_instancer", &self.source.is_some())
            .finish()
    }
}

impl<S, F> Discovery<S, F> {
    /// A watch of the discovery's [`State`]: instance count, current discovery error, and
    /// whether the instancer has stopped. Errors are shown here rather than yielded (see the
    /// [module docs](self)).
    ///
    /// ```
    /// use futures::{FutureExt, StreamExt};
    /// use sd_core::{discover, endpoint_fn, Error, Event, Publisher};
    ///
    /// # futures::executor::block_on(async {
    /// let instancer = Publisher::new(Event::from_instances(["a:1", "b:1"]));
    /// let mut discovery = discover(&instancer, endpoint_fn(|i| i.to_string()));
    /// let state = discovery.state();
    /// while let Some(Some(_)) = discovery.next().now_or_never() {}
    /// assert_eq!(state.borrow().instances(), 2);
    ///
    /// instancer.publish(Event::Error(Error::backend_msg("etcd unreachable")));
    /// assert!(discovery.next().now_or_never().is_none(), "no change, no error yielded");
    /// assert_eq!(state.borrow().error().unwrap().to_string(), "etcd unreachable");
    /// assert_eq!(state.borrow().instances(), 2, "services kept");
    /// # });
    /// ```
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    fn set_state(&self, update: impl FnOnce(&mut State)) {
        self.state.send_if_modified(|state| {
            let before = (
                state.instances,
                state.error.as_ref().map(|e| e.to_string()),
                state.ended,
            );
            update(state);
            before
                != (
                    state.instances,
                    state.error.as_ref().map(|e| e.to_string()),
                    state.ended,
                )
        });
    }
}

impl<S, F: Factory<S>> Discovery<S, F> {
    /// Queues what changed since the last event: O(changes) for sets derived from each other.
    fn apply(&mut self, set: InstanceSet) {
        let mut added = Vec::new();
        for change in self.last.changes(&set) {
            match change {
                crate::Change::Added(instance) => added.push(instance.clone()),
                crate::Change::Removed(instance) => {
                    self.failed.remove(instance);
                    if self.current.remove(instance) {
                        self.pending.push_back(Change::Remove(instance.clone()));
                    }
                }
            }
        }
        added.extend(std::mem::take(&mut self.failed));
        for instance in added {
            match make_or_skip(&self.factory, &instance) {
                Some((service, closer)) => {
                    self.current.insert(instance.clone());
                    self.pending
                        .push_back(Change::Insert(instance, Closing::new(service, closer)));
                }
                None => {
                    self.failed.insert(instance);
                }
            }
        }
        self.last = set;
        let instances = self.current.len();
        if self.state.borrow().error.is_some() {
            tracing::info!(instances, "discovery recovered");
        }
        self.set_state(|state| {
            state.instances = instances;
            state.error = None;
        });
    }
}

impl<S, F> Stream for Discovery<S, F>
where
    F: Factory<S> + Unpin,
{
    type Item = Result<Change<Instance, Closing<S>>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            let Some(events) = this.events.as_mut() else {
                return Poll::Ready(None);
            };
            match events.poll_next_unpin(cx) {
                Poll::Ready(Some(Event::Instances(set))) => this.apply(set),
                Poll::Ready(Some(Event::Error(err))) => {
                    // One warning per outage; its repeats are debug lines.
                    if this.state.borrow().error.is_none() {
                        tracing::warn!(error = %crate::Report(&err), "discovery error: keeping the current services");
                    } else {
                        tracing::debug!(error = %crate::Report(&err), "discovery still failing");
                    }
                    this.set_state(|state| state.error = Some(Arc::new(err)));
                }
                Poll::Ready(None) => {
                    this.events = None;
                    this.set_state(|state| {
                        state.error = Some(Arc::new(Error::Stopped));
                        state.ended = true;
                    });
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::FutureExt;
    use tower::discover::Discover;

    use super::*;
    use crate::{Closer, Publisher};

    fn is_discover<D: Discover<Key = Instance, Service = Closing<String>, Error = Error>>(
        d: D,
    ) -> D {
        d
    }

    /// Every change ready now, services kept (as a balancer would hold them) by instance.
    fn drain(
        d: &mut Discovery<String, impl Factory<String> + Unpin>,
        held: &mut Vec<Closing<String>>,
    ) -> Vec<(&'static str, String)> {
        let mut seen = Vec::new();
        while let Some(Some(Ok(change))) = d.next().now_or_never() {
            match change {
                Change::Insert(k, svc) => {
                    seen.push(("insert", k.to_string()));
                    held.push(svc);
                }
                Change::Remove(k) => seen.push(("remove", k.to_string())),
            }
        }
        seen
    }

    #[tokio::test]
    async fn inserts_and_removes_follow_the_instancer_and_closers_wait_for_the_service() {
        let inst = Publisher::new(Event::from_instances(["a", "b"]));
        let closed = Arc::new(AtomicUsize::new(0));
        let c = closed.clone();
        let factory = move |i: &Instance| -> Result<(String, Option<Closer>), Error> {
            if i.as_str() == "bad" {
                return Err(Error::factory(i, std::io::Error::other("nope")));
            }
            let c = c.clone();
            Ok((
                i.to_string(),
                Some(Box::new(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                })),
            ))
        };
        let mut d = is_discover(discover(&inst, factory));
        let state = d.state();
        let mut held = Vec::new();
        assert_eq!(
            drain(&mut d, &mut held),
            [("insert", "a".into()), ("insert", "b".into())]
        );
        assert_eq!(state.borrow().instances(), 2);

        inst.publish(Event::from_instances(["b", "bad", "c"]));
        assert_eq!(
            drain(&mut d, &mut held),
            [("remove", "a".into()), ("insert", "c".into())]
        );
        assert_eq!(state.borrow().instances(), 2, "bad is not counted");
        assert_eq!(
            closed.load(Ordering::SeqCst),
            0,
            "a's service is still held"
        );
        let a = held.remove(0);
        assert_eq!(a.get_ref(), "a");
        drop(a);
        assert_eq!(closed.load(Ordering::SeqCst), 1, "a closed once dropped");

        inst.stop();
        assert!(
            d.next().await.is_none(),
            "the stream ends with the instancer"
        );
        assert!(state.borrow().ended());
        assert!(matches!(
            state.borrow().error().map(|e| &**e),
            Some(Error::Stopped)
        ));
        // tower's balancers poll a discovery stream again after it ended: no panic, still none.
        assert!(d.next().await.is_none());
        assert!(d.next().await.is_none());
        drop(d);
        assert_eq!(closed.load(Ordering::SeqCst), 1, "the services outlive it");
        drop(held);
        assert_eq!(closed.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn errors_show_in_the_state_and_a_good_event_clears_them() {
        let inst = Publisher::new(Event::from_instances(["a"]));
        let mut d = discover(&inst, crate::endpoint_fn(|i| i.to_string()));
        let mut state = d.state();
        let mut held = Vec::new();
        drain(&mut d, &mut held);
        state.borrow_and_update();
        inst.publish(Event::Error(Error::backend_msg("down")));
        assert!(drain(&mut d, &mut held).is_empty());
        assert!(state.has_changed().unwrap());
        let now = state.borrow_and_update().clone();
        assert_eq!(now.error().unwrap().to_string(), "down");
        assert_eq!(now.instances(), 1);
        assert!(now.check().is_ok());

        inst.publish(Event::empty());
        assert_eq!(drain(&mut d, &mut held), [("remove", "a".into())]);
        let now = state.borrow_and_update().clone();
        assert!(now.error().is_none());
        assert!(matches!(
            now.check(),
            Err(Error::NoEndpoints { last_error: None })
        ));
    }

    #[tokio::test]
    async fn a_hand_built_unsorted_set_changes_nothing_it_still_lists() {
        let inst = Publisher::new(Event::from_instances(["a", "b", "c"]));
        let factory =
            |i: &Instance| -> Result<(String, Option<Closer>), Error> { Ok((i.to_string(), None)) };
        let mut d = discover(&inst, factory);
        for _ in 0..3 {
            assert!(matches!(d.next().await, Some(Ok(Change::Insert(..)))));
        }
        let raw: InstanceSet = ["c", "b", "a", "a"].into_iter().collect();
        inst.publish(Event::Instances(raw));
        let change = d.next().now_or_never();
        assert!(change.is_none(), "no change expected");
    }
}
