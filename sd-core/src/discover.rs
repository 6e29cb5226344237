//! Any [`Instancer`] as a [`tower::discover::Discover`] (feature `tower`), so tower's balancers
//! (and everything built on them) can use any sd backend.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tower::discover::Change;

use crate::factory::{make_or_skip, CloseGuard};
use crate::{Error, Event, EventStream, Factory, Instance, InstanceSet, Instancer};

/// A stream of [`Change`]s, keyed by instance, made from an instancer's events and a factory:
/// a `tower::discover::Discover`.
///
/// Each new instance becomes `Change::Insert(instance, service)` (the factory is called once for
/// it; an instance whose factory fails is skipped, logged, and tried again on the next event),
/// each instance that goes away `Change::Remove(instance)` (its closer runs then). An error
/// event changes nothing: tower keeps the services it has, as the default endpointer does. The
/// stream ends when the instancer stops.
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
///     Some(Ok(Change::Insert(key, svc))) => assert_eq!(svc, format!("service for {key}")),
///     other => panic!("{other:?}"),
/// }
/// # });
/// ```
pub struct Discovery<S, F> {
    /// `None` once the instancer's stream has ended: it is never polled again (tower's
    /// balancers poll a discovery stream again after it ended).
    events: Option<EventStream>,
    factory: F,
    current: BTreeMap<Instance, CloseGuard>,
    /// The last event's set, to diff the next one against.
    last: InstanceSet,
    /// Instances of `last` the factory failed for: tried again on each event.
    failed: BTreeSet<Instance>,
    pending: VecDeque<Change<Instance, S>>,
}

/// Follows `instancer`, turning its instances into services with `factory`, as a
/// `tower::discover::Discover` (see [`Discovery`]).
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
/// assert!(matches!(change, Some(Ok(Change::Insert(k, 3))) if k == "a:1"));
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
        current: BTreeMap::new(),
        last: InstanceSet::new(),
        failed: BTreeSet::new(),
        pending: VecDeque::new(),
    }
}

// Services are only ever moved in and out of the queue, never pinned.
impl<S, F: Unpin> Unpin for Discovery<S, F> {}

impl<S, F> fmt::Debug for Discovery<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("instances", &self.current.keys().collect::<Vec<_>>())
            .field("pending_changes", &self.pending.len())
            .finish()
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
                    // Dropping the guard runs the instance's closer.
                    if self.current.remove(instance).is_some() {
                        self.pending.push_back(Change::Remove(instance.clone()));
                    }
                }
            }
        }
        added.extend(std::mem::take(&mut self.failed));
        for instance in added {
            match make_or_skip(&self.factory, &instance) {
                Some((service, closer)) => {
                    self.current
                        .insert(instance.clone(), CloseGuard::new(closer));
                    self.pending.push_back(Change::Insert(instance, service));
                }
                None => {
                    self.failed.insert(instance);
                }
            }
        }
        self.last = set;
    }
}

impl<S, F> Stream for Discovery<S, F>
where
    F: Factory<S> + Unpin,
{
    type Item = Result<Change<Instance, S>, Error>;

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
                    tracing::warn!(error = %crate::Report(&err), "discovery error: keeping the current services");
                }
                Poll::Ready(None) => {
                    this.events = None;
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
    use std::sync::Arc;

    use futures::FutureExt;
    use tower::discover::Discover;

    use super::*;
    use crate::{Closer, Publisher};

    fn is_discover<D: Discover<Key = Instance, Service = String, Error = Error>>(d: D) -> D {
        d
    }

    fn key(c: &Change<Instance, String>) -> (&'static str, String) {
        match c {
            Change::Insert(k, _) => ("insert", k.to_string()),
            Change::Remove(k) => ("remove", k.to_string()),
        }
    }

    #[tokio::test]
    async fn inserts_and_removes_follow_the_instancer() {
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
        let mut next = || d.next().now_or_never().flatten().map(|r| key(&r.unwrap()));
        assert_eq!(next(), Some(("insert", "a".into())));
        assert_eq!(next(), Some(("insert", "b".into())));
        assert_eq!(next(), None, "nothing more until the set changes");

        let drain = |d: &mut Discovery<String, _>| {
            let mut seen = Vec::new();
            while let Some(Some(Ok(c))) = d.next().now_or_never() {
                seen.push(key(&c));
            }
            seen
        };
        inst.publish(Event::from_instances(["b", "bad", "c"]));
        let d2 = drain(&mut d);
        assert_eq!(d2, [("remove", "a".into()), ("insert", "c".into())]);
        assert_eq!(
            closed.load(Ordering::SeqCst),
            1,
            "a's closer ran on removal"
        );

        inst.stop();
        assert!(
            d.next().await.is_none(),
            "the stream ends with the instancer"
        );
        // tower's balancers poll a discovery stream again after it ended: no panic, still none.
        assert!(d.next().await.is_none());
        assert!(d.next().await.is_none());
        drop(d);
        assert_eq!(
            closed.load(Ordering::SeqCst),
            3,
            "b's and c's closers ran on drop"
        );
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
        assert!(
            change.is_none(),
            "no change expected, got {:?}",
            change.map(|c| c.map(|c| c.map(|c| key(&c))))
        );
    }
}
