use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::factory::{make_or_skip, CloseGuard};
use crate::{Endpointer, Error, Event, EventStream, Factory, Instance, Instancer, Snapshot};

/// Options of a [`DefaultEndpointer`].
///
/// ```
/// use std::time::Duration;
/// use sd_core::EndpointerOptions;
///
/// let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_secs(30));
/// assert_eq!(opts.invalidate_timeout(), Some(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct EndpointerOptions {
    invalidate_on_error: Option<Duration>,
}

impl EndpointerOptions {
    /// The defaults: on a discovery error, keep serving the last good endpoints indefinitely.
    ///
    /// ```
    /// assert_eq!(sd_core::EndpointerOptions::new().invalidate_timeout(), None);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Once the instancer has reported errors for `timeout` without a good event in between,
    /// drop (and close) every endpoint, so callers fail fast with the discovery error instead of
    /// calling instances that may be gone. A later good event restores them.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = sd_core::EndpointerOptions::new().invalidate_on_error(Duration::from_secs(5));
    /// assert_eq!(opts.invalidate_timeout(), Some(Duration::from_secs(5)));
    /// ```
    pub fn invalidate_on_error(mut self, timeout: Duration) -> Self {
        self.invalidate_on_error = Some(timeout);
        self
    }

    /// The timeout set by [`invalidate_on_error`](Self::invalidate_on_error).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use sd_core::EndpointerOptions;
    ///
    /// assert_eq!(EndpointerOptions::new().invalidate_timeout(), None);
    /// let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_millis(250));
    /// assert_eq!(opts.invalidate_timeout(), Some(Duration::from_millis(250)));
    /// ```
    pub fn invalidate_timeout(&self) -> Option<Duration> {
        self.invalidate_on_error
    }
}

/// An endpointer fed by an [`Instancer`]: the live endpoint set of one service.
///
/// It subscribes to the instancer, calls the factory once for each new instance, runs the closer
/// of each instance that goes away (exactly once, also when the endpointer is dropped), and on an
/// error event keeps serving the last good endpoints (see
/// [`EndpointerOptions::invalidate_on_error`]). Updates run on a background task; reading the
/// endpoints never waits for it. A factory that fails or panics for an instance skips it (logged)
/// until the next event lists it again.
///
/// The endpointer does not own the instancer: keep the instancer alive as long as the
/// endpointer. Once the instancer stops (or is dropped, which stops it), the endpointer keeps
/// serving its last endpoints, with [`Error::Stopped`] as the current error, until
/// `invalidate_on_error` drops them.
///
/// ```
/// use sd_core::{Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event,
///               Instance, Instancer, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// struct Static(Publisher);
/// impl Instancer for Static {
///     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
///     fn stop(&self) { self.0.stop() }
/// }
/// let instancer = Static(Publisher::new(Event::from_instances(["127.0.0.1:80", "127.0.0.1:81"])));
/// let factory = |i: &Instance| -> Result<(String, Option<Closer>), Error> {
///     Ok((format!("http://{i}"), None))
/// };
/// let endpointer = DefaultEndpointer::new(&instancer, factory, EndpointerOptions::new()).await;
/// assert_eq!(&*endpointer.endpoints().unwrap(), &["http://127.0.0.1:80", "http://127.0.0.1:81"]);
/// # }
/// ```
pub struct DefaultEndpointer<E> {
    shared: Arc<Shared<E>>,
    task: Option<JoinHandle<()>>,
}

impl<E> fmt::Debug for DefaultEndpointer<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.shared.snapshot.load();
        f.debug_struct("DefaultEndpointer")
            .field("version", &snap.version())
            .field("instances", &snap.instances())
            .field("error", &snap.error())
            .finish()
    }
}

struct Shared<E> {
    version: AtomicU64,
    snapshot: ArcSwap<Snapshot<E>>,
    cache: Mutex<Cache<E>>,
}

struct Cache<E> {
    entries: BTreeMap<Instance, Entry<E>>,
    error: Option<Arc<Error>>,
    closed: bool,
}

struct Entry<E> {
    endpoint: E,
    /// Runs the instance's closer when the entry is dropped.
    _close: CloseGuard,
}

impl<E: Clone + Send + Sync + 'static> DefaultEndpointer<E> {
    /// Subscribes to `instancer` and applies its first event before returning, so the first
    /// [`endpoints`](Endpointer::endpoints) call already sees the current set.
    ///
    /// Must be called within a tokio runtime (it spawns the task that follows the instancer).
    ///
    /// ```
    /// use sd_core::{Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Instance};
    /// # use sd_core::{Event, Instancer, Publisher};
    /// # struct Static(Publisher);
    /// # impl Instancer for Static {
    /// #     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
    /// #     fn stop(&self) { self.0.stop() }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let instancer = Static(Publisher::new(Event::from_instances(["a:1"])));
    /// let factory =
    ///     |i: &Instance| -> Result<(String, Option<Closer>), Error> { Ok((i.to_string(), None)) };
    /// let e = DefaultEndpointer::new(&instancer, factory, EndpointerOptions::new()).await;
    /// assert_eq!(&*e.endpoints().unwrap(), &["a:1"]);
    /// # }
    /// ```
    pub async fn new<I, F>(instancer: &I, factory: F, options: EndpointerOptions) -> Self
    where
        I: Instancer + ?Sized,
        F: Factory<E>,
    {
        let shared = Arc::new(Shared {
            version: AtomicU64::new(0),
            snapshot: ArcSwap::from_pointee(Snapshot::new(
                0,
                Arc::from(Vec::new()),
                Arc::from(Vec::new()),
                None,
            )),
            cache: Mutex::new(Cache {
                entries: BTreeMap::new(),
                error: None,
                closed: false,
            }),
        });
        let mut stream = instancer.subscribe();
        let mut follower = Follower {
            shared: shared.clone(),
            factory,
            options,
            invalidate_at: None,
        };
        let task = match stream.next().await {
            Some(first) => {
                follower.apply(first);
                Some(tokio::spawn(follower.run(stream)))
            }
            None => {
                follower.shared.set_error(Error::Stopped);
                None
            }
        };
        DefaultEndpointer { shared, task }
    }
}

impl<E> Drop for DefaultEndpointer<E> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Close every endpoint now rather than whenever the aborted task is dropped.
        let mut cache = self.shared.lock();
        cache.closed = true;
        let entries = std::mem::take(&mut cache.entries);
        drop(cache);
        drop(entries);
    }
}

impl<E: Clone + Send + Sync + 'static> Endpointer<E> for DefaultEndpointer<E> {
    fn version(&self) -> u64 {
        self.shared.version.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Arc<Snapshot<E>> {
        self.shared.snapshot.load_full()
    }
}

impl<E> Shared<E> {
    fn lock(&self) -> MutexGuard<'_, Cache<E>> {
        // Every critical section leaves the cache consistent, so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<E: Clone> Shared<E> {
    /// Publishes the cache as a new snapshot, unless nothing visible changed.
    fn publish(&self, cache: &Cache<E>) {
        let current = self.snapshot.load();
        let same_error = match (current.error(), &cache.error) {
            (None, None) => true,
            (Some(a), Some(b)) => a.to_string() == b.to_string(),
            _ => false,
        };
        let same_set = current.instances().len() == cache.entries.len()
            && current.instances().iter().eq(cache.entries.keys());
        if same_error && same_set && current.version() != 0 {
            return;
        }
        let version = current.version() + 1;
        let instances: Arc<[Instance]> = cache.entries.keys().cloned().collect();
        let endpoints: Arc<[E]> = cache.entries.values().map(|e| e.endpoint.clone()).collect();
        self.snapshot.store(Arc::new(Snapshot::new(
            version,
            instances,
            endpoints,
            cache.error.clone(),
        )));
        // Readers see the new version only once the snapshot it names is in place.
        self.version.store(version, Ordering::Release);
    }

    fn set_error(&self, err: Error) {
        let mut cache = self.lock();
        if cache.closed {
            return;
        }
        cache.error = Some(Arc::new(err));
        self.publish(&cache);
    }

    fn invalidate(&self) {
        let mut cache = self.lock();
        if cache.closed {
            return;
        }
        let dropped = std::mem::take(&mut cache.entries);
        tracing::warn!(
            endpoints = dropped.len(),
            error = ?cache.error,
            "discovery has failed for longer than invalidate_on_error: dropping all endpoints"
        );
        self.publish(&cache);
        drop(cache);
        drop(dropped);
    }
}

/// The items of `from` that `other` lacks. Both are sorted: one merge walk, no lookups.
fn missing<'a>(
    from: impl Iterator<Item = &'a Instance>,
    other: impl Iterator<Item = &'a Instance>,
) -> Vec<Instance> {
    let mut other = other.peekable();
    let mut out = Vec::new();
    for item in from {
        while other.next_if(|o| *o < item).is_some() {}
        if other.next_if(|o| *o == item).is_none() {
            out.push(item.clone());
        }
    }
    out
}

struct Follower<E, F> {
    shared: Arc<Shared<E>>,
    factory: F,
    options: EndpointerOptions,
    invalidate_at: Option<Instant>,
}

impl<E: Clone + Send + Sync + 'static, F: Factory<E>> Follower<E, F> {
    async fn run(mut self, mut stream: EventStream) {
        loop {
            let next = match self.invalidate_at {
                Some(at) => tokio::select! {
                    next = stream.next() => next,
                    _ = sleep_until(at) => {
                        self.invalidate_at = None;
                        self.shared.invalidate();
                        continue;
                    }
                },
                None => stream.next().await,
            };
            match next {
                Some(event) => self.apply(event),
                None => {
                    // The instancer stopped: no more updates will come. Treat it as a lasting
                    // error (serve the last endpoints, invalidate when the timeout says so).
                    self.apply(Event::Error(Error::Stopped));
                    if let Some(at) = self.invalidate_at {
                        sleep_until(at).await;
                        self.shared.invalidate();
                    }
                    return;
                }
            }
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Instances(set) => {
                self.invalidate_at = None;
                self.update(&crate::event::normalized(set));
            }
            Event::Error(err) => {
                tracing::warn!(error = %err, "discovery error: serving the last known endpoints");
                if self.invalidate_at.is_none() && self.shared.lock().error.is_none() {
                    // A timeout too long to represent (e.g. `Duration::MAX`) never fires.
                    self.invalidate_at = self
                        .options
                        .invalidate_on_error
                        .and_then(|timeout| Instant::now().checked_add(timeout));
                }
                self.shared.set_error(err);
            }
        }
    }

    fn update(&self, set: &[Instance]) {
        // The factory is user code (it may block, or take locks a thread dropping the
        // endpointer holds): call it outside our lock. Only this task adds entries, so the
        // instances found new here are still missing when the results go in.
        let new: Vec<Instance> = {
            let cache = self.shared.lock();
            if cache.closed {
                return;
            }
            missing(set.iter(), cache.entries.keys())
        };
        let made: Vec<(Instance, Entry<E>)> = new
            .into_iter()
            .filter_map(|instance| {
                let (endpoint, closer) = make_or_skip(&self.factory, &instance)?;
                Some((
                    instance,
                    Entry {
                        endpoint,
                        _close: CloseGuard::new(closer),
                    },
                ))
            })
            .collect();
        let mut cache = self.shared.lock();
        if cache.closed {
            // The endpointer was dropped while the factory ran: close what it just made.
            drop(cache);
            drop(made);
            return;
        }
        let gone = missing(cache.entries.keys(), set.iter());
        let mut removed = Vec::with_capacity(gone.len());
        for k in gone {
            removed.extend(cache.entries.remove(&k));
        }
        for (instance, entry) in made {
            removed.extend(cache.entries.insert(instance, entry));
        }
        cache.error = None;
        self.shared.publish(&cache);
        drop(cache);
        // Closers may block or take locks of their own: run them outside ours.
        drop(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> Vec<Instance> {
        items.iter().map(Instance::new).collect()
    }

    #[test]
    fn missing_is_a_sorted_difference() {
        let a = set(&["a", "b", "d", "f"]);
        let b = set(&["b", "c", "d", "e"]);
        assert_eq!(missing(a.iter(), b.iter()), set(&["a", "f"]));
        assert_eq!(missing(b.iter(), a.iter()), set(&["c", "e"]));
        assert_eq!(missing(a.iter(), [].iter()), a);
        assert!(missing([].iter(), a.iter()).is_empty());
        assert!(missing(a.iter(), a.iter()).is_empty());
    }
}
