//! Watching a prefix of the store: the [`Instancer`] trait and the [`Publisher`] backends use.

use std::sync::{Mutex, MutexGuard};

use futures::StreamExt;
use tokio::sync::watch;

use crate::{Event, EventStream};

/// Watches the instances of one service and tells subscribers the current set.
///
/// Implemented by every backend (`sd-etcd`, `sd-memory`, your own).
///
/// # The contract
/// Every backend keeps these rules; the conformance kit ([`testkit`](crate::testkit), feature
/// `testkit`) checks each with a case of the same name.
/// - **The prefix** must end in `/` (anything else is [`Error::InvalidArgument`](crate::Error),
///   `prefix_must_end_in_slash`), so `/svc/a/` never matches `/svc/ab/...`
///   (`prefix_is_isolated`). Every key below it is an instance, however deeply nested
///   (`nested_keys_are_instances`); the instance is the key's value.
/// - **The constructor** returns once the prefix has been read (or with the read's error), so
///   the first item of `subscribe()` is the store's current state, at once
///   (`late_subscriber_gets_current_state`).
/// - **Delivery is latest-value**: a slow subscriber sees the newest state when it next reads,
///   never a queue of stale ones, and never delays the instancer or other subscribers
///   (`idle_subscriber_does_not_delay_others`).
/// - **No spurious events**: on a healthy store there is no error event and never the same
///   state twice in a row (`no_spurious_events`). An error event means a read or watch really
///   failed and could not be resumed at once (`store_error_reaches_subscribers`).
/// - **Recovery re-reads**: once the store answers again, the instancer shows what it holds now,
///   including removals made while it was unreachable, never its old set
///   (`healed_store_is_reread`).
/// - **`stop()`** ends every stream and every background task it started
///   (`stop_ends_all_streams`, `stop_ends_background_work`); `subscribe()` after `stop()` returns
///   a stream that ends at once. Dropping the instancer stops it.
///
/// Backends get the subscriber side of all this from [`Publisher`].
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{Event, Instancer, Publisher};
///
/// struct Static(Publisher);
/// impl Instancer for Static {
///     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
///     fn stop(&self) { self.0.stop() }
/// }
///
/// # futures::executor::block_on(async {
/// let inst = Static(Publisher::new(Event::from_instances(["a:1"])));
/// let mut events = inst.subscribe();
/// assert_eq!(events.next().await, Some(Event::from_instances(["a:1"])));
/// inst.stop();
/// assert_eq!(events.next().await, None);
/// # });
/// ```
pub trait Instancer: Send + Sync {
    /// A stream of the watched prefix's state, starting with the current one.
    fn subscribe(&self) -> EventStream;

    /// Stops watching and ends every subscriber's stream. Idempotent.
    fn stop(&self);
}

impl<T: Instancer + ?Sized> Instancer for std::sync::Arc<T> {
    fn subscribe(&self) -> EventStream {
        (**self).subscribe()
    }
    fn stop(&self) {
        (**self).stop()
    }
}

impl<T: Instancer + ?Sized> Instancer for Box<T> {
    fn subscribe(&self) -> EventStream {
        (**self).subscribe()
    }
    fn stop(&self) {
        (**self).stop()
    }
}

/// An instancer held by what it feeds (an endpointer, a tower discovery): stopped when the
/// holder is dropped, even when the caller kept a handle to it too (an `Arc`).
pub(crate) struct Owned(Box<dyn Instancer>);

impl Owned {
    pub(crate) fn new(instancer: impl Instancer + 'static) -> Self {
        Owned(Box::new(instancer))
    }

    #[cfg_attr(not(feature = "tonic"), allow(dead_code))]
    pub(crate) fn get(&self) -> &dyn Instancer {
        &*self.0
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The latest-value broadcast behind an [`Instancer`]: backends publish, subscribers read.
///
/// Built on `tokio::sync::watch`: publishing never waits for subscribers, each subscriber sees
/// the newest event, and an event equal to the current one is not sent again.
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{Event, Publisher};
///
/// # futures::executor::block_on(async {
/// let p = Publisher::new(Event::empty());
/// let mut s = p.subscribe();
/// assert!(p.publish(Event::from_instances(["a"])));
/// assert!(!p.publish(Event::from_instances(["a"])), "equal events are not sent twice");
/// assert_eq!(s.next().await, Some(Event::from_instances(["a"])));
/// # });
/// ```
#[derive(Debug)]
pub struct Publisher {
    tx: Mutex<Option<watch::Sender<Event>>>,
}

impl Publisher {
    /// A publisher whose current state is `initial`.
    ///
    /// ```
    /// use sd_core::{Event, Publisher};
    ///
    /// let p = Publisher::new(Event::from_instances(["a:1"]));
    /// assert_eq!(p.current(), Some(Event::from_instances(["a:1"])));
    /// ```
    pub fn new(initial: Event) -> Self {
        Publisher {
            tx: Mutex::new(Some(watch::Sender::new(initial))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<watch::Sender<Event>>> {
        // The guarded value is only ever replaced whole, so a poisoned lock holds valid data.
        self.tx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `event` the current state. Returns whether it was sent: `false` when it equals the
    /// current state or the publisher is stopped.
    ///
    /// ```
    /// use sd_core::{Event, Publisher};
    ///
    /// let p = Publisher::new(Event::empty());
    /// assert!(p.publish(Event::from_instances(["a:1"])));
    /// assert!(!p.publish(Event::from_instances(["a:1"])), "unchanged");
    /// ```
    pub fn publish(&self, event: Event) -> bool {
        match &*self.lock() {
            Some(tx) => tx.send_if_modified(|cur| {
                if *cur == event {
                    false
                } else {
                    *cur = event;
                    true
                }
            }),
            None => false,
        }
    }

    /// The current state, or `None` once stopped.
    ///
    /// ```
    /// use sd_core::{Event, Publisher};
    ///
    /// let p = Publisher::new(Event::empty());
    /// assert_eq!(p.current(), Some(Event::empty()));
    /// p.stop();
    /// assert_eq!(p.current(), None);
    /// ```
    pub fn current(&self) -> Option<Event> {
        self.lock().as_ref().map(|tx| tx.borrow().clone())
    }

    /// A stream that yields the current state at once, then every later state (latest-value).
    /// After [`stop`](Self::stop) the stream is empty.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sd_core::{Event, Publisher};
    ///
    /// # futures::executor::block_on(async {
    /// let p = Publisher::new(Event::from_instances(["a:1"]));
    /// let mut s = p.subscribe();
    /// assert_eq!(s.next().await, Some(Event::from_instances(["a:1"])));
    /// # });
    /// ```
    pub fn subscribe(&self) -> EventStream {
        match &*self.lock() {
            Some(tx) => stream_of(tx.subscribe()),
            None => futures::stream::empty().boxed(),
        }
    }

    /// Ends every subscriber's stream. Idempotent.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sd_core::{Event, Publisher};
    ///
    /// # futures::executor::block_on(async {
    /// let p = Publisher::new(Event::empty());
    /// p.stop();
    /// assert_eq!(p.subscribe().next().await, None);
    /// # });
    /// ```
    pub fn stop(&self) {
        self.lock().take();
    }

    /// Whether [`stop`](Self::stop) was called.
    ///
    /// ```
    /// let p = sd_core::Publisher::new(sd_core::Event::empty());
    /// assert!(!p.is_stopped());
    /// p.stop();
    /// assert!(p.is_stopped());
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.lock().is_none()
    }
}

/// A publisher is itself an instancer: one whose state is whatever was last published. Handy for
/// static instance lists and for tests of code that takes an [`Instancer`].
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{Event, Instancer, Publisher};
///
/// # futures::executor::block_on(async {
/// let instancer = Publisher::new(Event::from_instances(["127.0.0.1:80"]));
/// let mut events = Instancer::subscribe(&instancer);
/// assert_eq!(events.next().await, Some(Event::from_instances(["127.0.0.1:80"])));
/// # });
/// ```
impl Instancer for Publisher {
    fn subscribe(&self) -> EventStream {
        Publisher::subscribe(self)
    }

    fn stop(&self) {
        Publisher::stop(self)
    }
}

fn stream_of(rx: watch::Receiver<Event>) -> EventStream {
    futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        let event = rx.borrow_and_update().clone();
        Some((event, (rx, false)))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn first_item_is_immediate_and_latest_value_wins() {
        let p = Publisher::new(Event::from_instances(["a"]));
        let mut s = p.subscribe();
        assert_eq!(
            s.next().now_or_never(),
            Some(Some(Event::from_instances(["a"])))
        );
        assert!(
            s.next().now_or_never().is_none(),
            "no second item until something changes"
        );
        for i in 0..100 {
            p.publish(Event::from_instances([format!("x{i}")]));
        }
        assert_eq!(s.next().await, Some(Event::from_instances(["x99"])));
    }

    #[tokio::test]
    async fn stop_ends_streams_and_later_subscriptions() {
        let p = Publisher::new(Event::empty());
        let mut s = p.subscribe();
        s.next().await;
        p.stop();
        assert_eq!(s.next().await, None);
        assert!(
            p.subscribe().next().await.is_none(),
            "subscribe after stop ends at once"
        );
        assert!(!p.publish(Event::empty()));
        assert!(p.is_stopped());
        assert!(p.current().is_none());
    }
}
