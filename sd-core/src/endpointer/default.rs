use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

use crate::factory::{make_or_skip, CloseGuard};
use crate::instancer::Owned;
use crate::metrics::EndpointerMetrics;
use crate::{
    Calls, Change, Endpointer, Error, Event, EventStream, Factory, Instance, InstanceSet,
    Instancer, Slots, Snapshot,
};

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
    drain: Option<Duration>,
    name: Option<String>,
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

    /// Graceful drain: an endpoint whose instance leaves the set gets no new pick at once, but
    /// its closer runs only when the last call through it ends, or after `timeout` if calls are
    /// still in flight then (a hung call must not keep a connection open for ever). Off by
    /// default: closers run as soon as the instance leaves.
    ///
    /// Calls are counted from the pick to the end of the attempt by balancers that record their
    /// picks with [`Tried::record_in`](crate::Tried::record_in): every sd-lb balancer but
    /// Maglev, through [`Balancer::endpoint_avoiding`](crate::Balancer::endpoint_avoiding), which
    /// `Retry` and the tower service use. A bare `endpoint()` pick is not counted. Counting costs
    /// two atomic operations per call; each removal that finds calls in flight starts one timer.
    /// Envoy's `drain_timeout` and gRPC's graceful `GOAWAY` follow the same idea.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let opts = sd_core::EndpointerOptions::new().drain(Duration::from_secs(5));
    /// assert_eq!(opts.drain_timeout(), Some(Duration::from_secs(5)));
    /// ```
    pub fn drain(mut self, timeout: Duration) -> Self {
        self.drain = Some(timeout);
        self
    }

    /// The timeout set by [`drain`](Self::drain).
    ///
    /// ```
    /// assert_eq!(sd_core::EndpointerOptions::new().drain_timeout(), None);
    /// ```
    pub fn drain_timeout(&self) -> Option<Duration> {
        self.drain
    }

    /// Names the endpointer (say, after the service it calls): its background task logs in a
    /// span `sd_endpointer{name}`, and with feature `metrics` its metrics carry the label
    /// `endpointer="<name>"` (`default` when unnamed; see `sd_core::metrics`). With many
    /// endpointers in one program, this is how their logs and metrics tell them apart.
    ///
    /// ```
    /// let opts = sd_core::EndpointerOptions::new().name("barsvc");
    /// assert_eq!(opts.endpointer_name(), Some("barsvc"));
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The name set by [`name`](Self::name).
    ///
    /// ```
    /// assert_eq!(sd_core::EndpointerOptions::new().endpointer_name(), None);
    /// ```
    pub fn endpointer_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// An endpointer fed by an [`Instancer`]: the live endpoint set of one service.
///
/// It subscribes to the instancer, calls the factory once for each new instance, runs the closer
/// of each instance that goes away (exactly once, also when the endpointer is dropped), and on an
/// error event keeps serving the last good endpoints (see
/// [`EndpointerOptions::invalidate_on_error`]). Updates run on a background task; reading the
/// endpoints never waits for it. A factory that fails or panics for an instance skips it (logged)
/// and is called again for it on each later event that still lists it.
///
/// A change costs time in proportion to what changed, not to the size of the set: the
/// endpointer diffs each event's [`InstanceSet`] against the previous one (skipping the structure
/// they share), calls the factory only for new instances, and derives the next snapshot's
/// [`Slots`] from the last one, a new endpoint taking the next slot and a removed one's slot going
/// to the last endpoint. A large change (more than an eighth of the set) rebuilds the slots in
/// instance order instead.
///
/// [`new`](Self::new) borrows the instancer: keep it alive as long as the endpointer.
/// [`owning`](Self::owning) takes it, and stops it when the endpointer is dropped. Once the
/// instancer stops (or is dropped, which stops it), the endpointer keeps serving its last
/// endpoints, with [`Error::Stopped`] as the current error, until `invalidate_on_error` drops
/// them.
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
/// assert_eq!(endpointer.endpoints().unwrap(), ["http://127.0.0.1:80", "http://127.0.0.1:81"]);
/// # }
/// ```
pub struct DefaultEndpointer<E> {
    shared: Arc<Shared<E>>,
    task: Option<JoinHandle<()>>,
    /// The instancer, when the endpointer owns it ([`DefaultEndpointer::owning`]).
    source: Option<Owned>,
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
    /// Woken on every new snapshot, for [`DefaultEndpointer::wait_until`].
    published: tokio::sync::Notify,
    cache: Mutex<Cache<E>>,
}

struct Cache<E> {
    /// The instance set of the last event applied.
    set: InstanceSet,
    /// The live endpoints' instances, each with its slot and closer.
    entries: BTreeMap<Instance, Entry>,
    /// Instances of `set` the factory failed for: tried again on each event.
    failed: BTreeSet<Instance>,
    /// The next snapshot's slots: `entries`' instances and their endpoints.
    instances: Slots<Instance>,
    endpoints: Slots<E>,
    /// With drain: each endpoint's calls in flight, in slot order, and the drain timeout.
    calls: Option<(Slots<Arc<Calls>>, Duration)>,
    /// Slots changed since the last published snapshot; `None` after a rebuild (all of them).
    changed: Option<Vec<usize>>,
    error: Option<Arc<Error>>,
    closed: bool,
}

struct Entry {
    slot: usize,
    /// Runs the instance's closer when the entry is dropped (with drain: once its calls end).
    close: CloseGuard,
    /// With drain: the calls in flight through this endpoint, and the drain timeout.
    calls: Option<(Arc<Calls>, Duration)>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some((calls, timeout)) = self.calls.take() {
            let close = std::mem::replace(&mut self.close, CloseGuard::new(None));
            calls.drain_guard(close, Some(timeout));
        }
    }
}

/// What one event asks of the factory, found under the lock and done outside it.
struct Work {
    added: Vec<Instance>,
    removed: Vec<Instance>,
}

impl<E> Cache<E> {
    /// Drops every endpoint (returned, so their closers run outside the lock) and forgets the
    /// set, so the next event adds all its instances again.
    fn clear(&mut self) -> BTreeMap<Instance, Entry> {
        self.set = InstanceSet::new();
        self.failed.clear();
        self.instances = Slots::new();
        self.endpoints = Slots::new();
        if let Some((calls, _)) = &mut self.calls {
            *calls = Slots::new();
        }
        self.changed = None;
        std::mem::take(&mut self.entries)
    }
}

impl<E: Clone> Cache<E> {
    fn empty(drain: Option<Duration>) -> Self {
        Cache {
            set: InstanceSet::new(),
            entries: BTreeMap::new(),
            failed: BTreeSet::new(),
            instances: Slots::new(),
            endpoints: Slots::new(),
            calls: drain.map(|timeout| (Slots::new(), timeout)),
            changed: Some(Vec::new()),
            error: None,
            closed: false,
        }
    }

    fn mark(&mut self, slot: usize) {
        if let Some(changed) = &mut self.changed {
            changed.push(slot);
        }
    }

    /// Removes `instance`'s endpoint: the last slot's endpoint moves into its slot.
    fn remove(&mut self, instance: &Instance) -> Option<Entry> {
        let entry = self.entries.remove(instance)?;
        self.instances.swap_remove(entry.slot);
        self.endpoints.swap_remove(entry.slot);
        if let Some((calls, _)) = &mut self.calls {
            calls.swap_remove(entry.slot);
        }
        if let Some(moved) = self.instances.get(entry.slot).cloned() {
            if let Some(e) = self.entries.get_mut(&moved) {
                e.slot = entry.slot;
            }
            self.mark(entry.slot);
        }
        Some(entry)
    }

    /// Adds an endpoint in a new last slot (an instance already present is replaced in place).
    fn add(&mut self, instance: Instance, endpoint: E, close: CloseGuard) -> Option<Entry> {
        let calls = self
            .calls
            .as_ref()
            .map(|(_, timeout)| (Calls::new(), *timeout));
        if let Some(entry) = self.entries.get_mut(&instance) {
            let slot = entry.slot;
            self.endpoints.set(slot, endpoint);
            if let (Some((slots, _)), Some((c, _))) = (&mut self.calls, &calls) {
                slots.set(slot, c.clone());
            }
            let old = Entry {
                slot,
                close: std::mem::replace(&mut entry.close, close),
                calls: std::mem::replace(&mut entry.calls, calls),
            };
            self.mark(slot);
            return Some(old);
        }
        let slot = self.instances.len();
        self.instances.push(instance.clone());
        self.endpoints.push(endpoint);
        if let (Some((slots, _)), Some((c, _))) = (&mut self.calls, &calls) {
            slots.push(c.clone());
        }
        self.entries.insert(instance, Entry { slot, close, calls });
        self.mark(slot);
        None
    }

    /// Lays every endpoint out again, in instance order.
    fn rebuild(&mut self) {
        let mut instances = Vec::with_capacity(self.entries.len());
        let mut endpoints = Vec::with_capacity(self.entries.len());
        let mut calls = Vec::new();
        for (slot, (instance, entry)) in self.entries.iter_mut().enumerate() {
            let old = entry.slot;
            entry.slot = slot;
            instances.push(instance.clone());
            if let Some(e) = self.endpoints.get(old) {
                endpoints.push(e.clone());
            }
            if let Some((c, _)) = &entry.calls {
                calls.push(c.clone());
            }
        }
        self.instances = Slots::from(instances);
        self.endpoints = Slots::from(endpoints);
        if let Some((slots, _)) = &mut self.calls {
            *slots = Slots::from(calls);
        }
        self.changed = None;
    }
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
    /// assert_eq!(e.endpoints().unwrap(), ["a:1"]);
    /// # }
    /// ```
    pub async fn new<I, F>(instancer: &I, factory: F, options: EndpointerOptions) -> Self
    where
        I: Instancer + ?Sized,
        F: Factory<E>,
    {
        let shared = Arc::new(Shared {
            version: AtomicU64::new(0),
            snapshot: ArcSwap::from_pointee(Snapshot::new(0, Slots::new(), Slots::new(), None)),
            published: tokio::sync::Notify::new(),
            cache: Mutex::new(Cache::empty(options.drain)),
        });
        let mut stream = instancer.subscribe();
        // At ERROR level, so a filter that lets warnings through keeps the span that says which
        // endpointer warned.
        let span = match options.endpointer_name() {
            Some(name) => tracing::error_span!("sd_endpointer", name = %name),
            None => tracing::error_span!("sd_endpointer"),
        };
        let mut follower = Follower {
            shared: shared.clone(),
            factory,
            metrics: EndpointerMetrics::new(options.endpointer_name()),
            options,
            invalidate_at: None,
        };
        let task = match stream.next().await {
            Some(first) => {
                span.in_scope(|| follower.apply(first));
                Some(tokio::spawn(follower.run(stream).instrument(span)))
            }
            None => {
                follower.shared.set_error(Error::Stopped);
                None
            }
        };
        DefaultEndpointer {
            shared,
            task,
            source: None,
        }
    }

    /// Like [`new`](Self::new), but the endpointer owns `instancer`: nothing else has to keep it
    /// alive, and dropping the endpointer stops it. Pass an `Arc` of an instancer to keep a
    /// handle to it too.
    ///
    /// ```
    /// use sd_core::{endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions, Event, Publisher};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let e = DefaultEndpointer::owning(
    ///     Publisher::new(Event::from_instances(["a:1"])),
    ///     endpoint_fn(|i| format!("http://{i}")),
    ///     EndpointerOptions::new(),
    /// )
    /// .await;
    /// assert_eq!(e.endpoints().unwrap(), ["http://a:1"]);
    /// # }
    /// ```
    pub async fn owning<I, F>(instancer: I, factory: F, options: EndpointerOptions) -> Self
    where
        I: Instancer + 'static,
        F: Factory<E>,
    {
        let mut endpointer = Self::new(&instancer, factory, options).await;
        endpointer.source = Some(Owned::new(instancer));
        endpointer
    }
}

impl<E> DefaultEndpointer<E> {
    /// Waits until the current snapshot satisfies `done`, and returns it: for tests and for
    /// code that must not act before a change has been applied (no polling). Checks the current
    /// snapshot first, then each new one. Waits for ever if no snapshot ever satisfies `done`
    /// (wrap it in a timeout where that can happen).
    ///
    /// ```
    /// use sd_core::{endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions, Event, Publisher};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let instancer = Publisher::new(Event::from_instances(["a:1"]));
    /// let e = DefaultEndpointer::new(&instancer, endpoint_fn(|i| i.to_string()), EndpointerOptions::new()).await;
    /// instancer.publish(Event::from_instances(["a:1", "b:1"]));
    /// let snap = e.wait_until(|s| s.endpoints().len() == 2).await;
    /// assert_eq!(snap.endpoints().len(), 2);
    /// # }
    /// ```
    pub async fn wait_until(&self, done: impl Fn(&Snapshot<E>) -> bool) -> Arc<Snapshot<E>> {
        loop {
            let next = self.shared.published.notified();
            tokio::pin!(next);
            // Registered before the check, so a snapshot published in between still wakes us.
            next.as_mut().enable();
            let snap = self.shared.snapshot.load_full();
            if done(&snap) {
                return snap;
            }
            next.await;
        }
    }

    /// Waits for the first snapshot newer than version `since` (from
    /// [`Endpointer::version`] or an earlier snapshot), and returns it.
    ///
    /// ```
    /// use sd_core::{endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions, Event, Publisher};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let instancer = Publisher::new(Event::from_instances(["a:1"]));
    /// let e = DefaultEndpointer::new(&instancer, endpoint_fn(|i| i.to_string()), EndpointerOptions::new()).await;
    /// let before = e.version();
    /// instancer.publish(Event::from_instances(["b:1"]));
    /// assert_eq!(*e.changed(before).await.endpoints(), ["b:1"]);
    /// # }
    /// ```
    pub async fn changed(&self, since: u64) -> Arc<Snapshot<E>> {
        self.wait_until(|s| s.version() > since).await
    }
}

impl<E> Drop for DefaultEndpointer<E> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // Stops an owned instancer.
        drop(self.source.take());
        // Close every endpoint now rather than whenever the aborted task is dropped.
        let mut cache = self.shared.lock();
        cache.closed = true;
        let entries = cache.clear();
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
    fn publish(&self, cache: &mut Cache<E>) {
        let current = self.snapshot.load();
        let same_error = match (current.error(), &cache.error) {
            (None, None) => true,
            (Some(a), Some(b)) => a.to_string() == b.to_string(),
            _ => false,
        };
        let same_slots = cache.changed.as_ref().is_some_and(|c| c.is_empty())
            && current.endpoints().len() == cache.endpoints.len();
        if same_error && same_slots && current.version() != 0 {
            return;
        }
        let version = current.version() + 1;
        let mut snapshot = Snapshot::new(
            version,
            cache.instances.clone(),
            cache.endpoints.clone(),
            cache.error.clone(),
        );
        if let Some((calls, _)) = &cache.calls {
            snapshot = snapshot.with_calls(calls.clone());
        }
        if let Some(mut changed) = cache.changed.replace(Vec::new()) {
            changed.retain(|&slot| slot < cache.endpoints.len());
            changed.sort_unstable();
            changed.dedup();
            snapshot = snapshot.with_changed_slots(current.version(), changed);
        }
        self.snapshot.store(Arc::new(snapshot));
        // Readers see the new version only once the snapshot it names is in place.
        self.version.store(version, Ordering::Release);
        self.published.notify_waiters();
    }

    fn set_error(&self, err: Error) {
        let mut cache = self.lock();
        if cache.closed {
            return;
        }
        cache.error = Some(Arc::new(err));
        self.publish(&mut cache);
    }

    fn invalidate(&self, metrics: &EndpointerMetrics) {
        let mut cache = self.lock();
        if cache.closed {
            return;
        }
        let dropped = cache.clear();
        tracing::warn!(
            endpoints = dropped.len(),
            error = ?cache.error,
            "discovery has failed for longer than invalidate_on_error: dropping all endpoints"
        );
        metrics.changed(dropped.len(), 0);
        self.publish(&mut cache);
        drop(cache);
        drop(dropped);
    }
}

struct Follower<E, F> {
    shared: Arc<Shared<E>>,
    factory: F,
    options: EndpointerOptions,
    invalidate_at: Option<Instant>,
    metrics: EndpointerMetrics,
}

impl<E: Clone + Send + Sync + 'static, F: Factory<E>> Follower<E, F> {
    async fn run(mut self, mut stream: EventStream) {
        loop {
            let next = match self.invalidate_at {
                Some(at) => tokio::select! {
                    next = stream.next() => next,
                    _ = sleep_until(at) => {
                        self.invalidate_at = None;
                        self.shared.invalidate(&self.metrics);
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
                        self.shared.invalidate(&self.metrics);
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
                self.update(set);
            }
            Event::Error(err) => {
                let first = self.shared.lock().error.is_none();
                // One warning when discovery starts failing, one line when it recovers
                // (`update`); the errors in between (one per failed reconnect) are details.
                if matches!(err, Error::Stopped) {
                    tracing::info!("the instancer stopped: serving the last known endpoints");
                } else if first {
                    tracing::warn!(error = %crate::Report(&err), "discovery failing: serving the last known endpoints");
                } else {
                    tracing::debug!(error = %crate::Report(&err), "discovery still failing");
                }
                if self.invalidate_at.is_none() && first {
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

    fn update(&self, set: InstanceSet) {
        // The factory is user code (it may block, or take locks a thread dropping the
        // endpointer holds): call it outside our lock. Only this task changes the set and adds
        // entries, so what is found here still holds when the results go in.
        let work = {
            let mut cache = self.shared.lock();
            if cache.closed {
                return;
            }
            let mut work = Work {
                added: Vec::new(),
                removed: Vec::new(),
            };
            for change in cache.set.changes(&set) {
                match change {
                    Change::Added(i) => work.added.push(i.clone()),
                    Change::Removed(i) => work.removed.push(i.clone()),
                }
            }
            // Instances the factory failed for are tried again while the set lists them.
            work.added
                .extend(cache.failed.iter().filter(|i| set.contains(*i)).cloned());
            cache.set = set;
            work
        };
        let mut failed = Vec::new();
        let made: Vec<(Instance, E, CloseGuard)> = work
            .added
            .into_iter()
            .filter_map(|instance| match make_or_skip(&self.factory, &instance) {
                Some((endpoint, closer)) => Some((instance, endpoint, CloseGuard::new(closer))),
                None => {
                    failed.push(instance);
                    None
                }
            })
            .collect();
        let mut cache = self.shared.lock();
        if cache.closed {
            // The endpointer was dropped while the factory ran: close what it just made.
            drop(cache);
            drop(made);
            return;
        }
        let changes = work.removed.len() + made.len();
        let mut dropped = Vec::with_capacity(work.removed.len());
        for instance in &work.removed {
            cache.failed.remove(instance);
            dropped.extend(cache.remove(instance));
        }
        for (instance, endpoint, close) in made {
            cache.failed.remove(&instance);
            dropped.extend(cache.add(instance, endpoint, close));
        }
        cache.failed.extend(failed);
        if changes > 64 && changes * 8 > cache.entries.len() {
            cache.rebuild();
        }
        if let Some(err) = cache.error.take() {
            if !matches!(*err, Error::Stopped) {
                tracing::info!(endpoints = cache.entries.len(), "discovery recovered");
            }
        }
        self.metrics.changed(changes, cache.entries.len());
        self.shared.publish(&mut cache);
        drop(cache);
        // Closers may block or take locks of their own: run them outside ours.
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::{Closer, Publisher};

    /// Random rounds of adds and removes, small and large: after each, the snapshot holds one
    /// endpoint per instance in matching slots, every removed instance was closed once, and the
    /// slots the snapshot says changed are exactly those that differ from the previous one.
    #[tokio::test]
    async fn follows_changes_slot_by_slot() {
        let closed = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(AtomicUsize::new(0));
        let factory = {
            let (closed, made) = (closed.clone(), made.clone());
            move |i: &Instance| -> Result<(String, Option<Closer>), Error> {
                made.fetch_add(1, Ordering::Relaxed);
                let closed = closed.clone();
                let closer: Closer = Box::new(move || {
                    closed.fetch_add(1, Ordering::Relaxed);
                });
                Ok((format!("ep-{i}"), Some(closer)))
            }
        };
        let mut set: InstanceSet = (0..3000).map(|i| format!("i{i}")).collect();
        let publisher = Publisher::new(Event::Instances(set.clone()));
        let endpointer =
            DefaultEndpointer::new(&publisher, factory, EndpointerOptions::new()).await;
        let mut rng = fastrand::Rng::with_seed(3);
        let mut next = 3000;
        let mut previous = endpointer.snapshot();
        for round in 0..60 {
            // Mostly a few changes (slot by slot), sometimes a large one (a rebuild).
            let n = if round % 10 == 9 {
                800
            } else {
                rng.usize(1..6)
            };
            for _ in 0..n {
                if rng.bool() && !set.is_empty() {
                    if let Some(victim) = set.iter().nth(rng.usize(..set.len())).cloned() {
                        set.remove(&victim);
                    }
                } else {
                    set.insert(format!("i{next}"));
                    next += 1;
                }
            }
            publisher.publish(Event::Instances(set.clone()));
            let snap = loop {
                let snap = endpointer.snapshot();
                if snap.version() != previous.version() {
                    break snap;
                }
                tokio::task::yield_now().await;
            };
            let mut pairs: Vec<(String, String)> = snap
                .instances()
                .iter()
                .zip(snap.endpoints())
                .map(|(i, e)| (i.to_string(), e.clone()))
                .collect();
            assert!(
                pairs.iter().all(|(i, e)| *e == format!("ep-{i}")),
                "round {round}"
            );
            pairs.sort();
            assert!(pairs
                .iter()
                .map(|(i, _)| i.as_str())
                .eq(set.iter().map(|i| i.as_str())));
            // Every endpoint made and no longer in the set was closed, once.
            assert_eq!(
                closed.load(Ordering::Relaxed),
                made.load(Ordering::Relaxed) - set.len(),
                "round {round}"
            );
            if let Some((since, slots)) = snap.changed_since() {
                assert_eq!(since, previous.version());
                let differing: Vec<usize> = (0..snap.instances().len())
                    .filter(|&s| previous.instances().get(s) != snap.instances().get(s))
                    .collect();
                assert_eq!(slots, &differing[..], "round {round}");
            } else {
                assert_eq!(n, 800, "only large changes rebuild");
            }
            previous = snap;
        }
        // At most one factory call per instance (some came and went within one round).
        assert!(made.load(Ordering::Relaxed) <= next);
        drop(endpointer);
        assert_eq!(closed.load(Ordering::Relaxed), made.load(Ordering::Relaxed));
    }
}
