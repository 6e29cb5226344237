//! The in-memory key-value store with leases, watches and fault injection.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sd_core::{Error, Event, Instance, InstanceSet, Publisher};
use tokio::time::{sleep, sleep_until, Instant};
use tracing::Instrument;

/// How long a broken watch waits before it "reconnects" and publishes the current set again.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Identifies a lease granted by a [`MemoryStore`].
///
/// ```
/// # use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = sd_memory::MemoryStore::new();
/// let a = store.grant(Duration::from_secs(5)).unwrap();
/// let b = store.grant(Duration::from_secs(5)).unwrap();
/// assert_ne!(a, b);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(u64);

/// An in-process key-value store with etcd's semantics, shared by cloning.
///
/// Keys may be attached to a lease that expires `ttl` after its last keep-alive (tokio time);
/// an expired lease takes its keys with it. Watchers ([`MemoryInstancer`](crate::MemoryInstancer))
/// see every change under their prefix. Fault injection: [`fail_next`](Self::fail_next),
/// [`break_watches`](Self::break_watches), [`set_available`](Self::set_available).
///
/// ```
/// use sd_memory::MemoryStore;
///
/// let store = MemoryStore::new();
/// store.put("/svc/a/1", "127.0.0.1:1").unwrap();
/// store.put("/svc/ab/2", "127.0.0.1:2").unwrap();
/// assert_eq!(store.get_prefix("/svc/a/").unwrap(), vec![("/svc/a/1".to_string(), "127.0.0.1:1".to_string())]);
///
/// store.fail_next(1);
/// assert!(store.put("/svc/a/3", "x").is_err());
/// assert!(store.put("/svc/a/3", "x").is_ok());
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("MemoryStore")
            .field("keys", &state.keys.len())
            .field("leases", &state.leases.len())
            .field("available", &state.available)
            .finish()
    }
}

#[derive(Default)]
pub(crate) struct Inner {
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section leaves the state half-changed, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    keys: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: u64,
    fail_next: usize,
    available: bool,
    watchers: Vec<Weak<Watcher>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            keys: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            fail_next: 0,
            available: true,
            watchers: Vec::new(),
        }
    }
}

struct Entry {
    value: String,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

/// One prefix watch: the publisher its instancer hands subscriptions out of.
pub(crate) struct Watcher {
    pub(crate) prefix: String,
    pub(crate) publisher: Publisher,
    /// The prefix's values, kept in step with the store (only under the store's lock).
    view: Mutex<View>,
}

/// The distinct values under a prefix, counted (two keys may hold one value), and their set,
/// edited per change so publishing it is a clone.
#[derive(Default)]
struct View {
    counts: HashMap<Instance, usize>,
    set: InstanceSet,
    /// Values skipped as not instances.
    invalid: u64,
}

impl View {
    /// Counts `value` in; a value that is not an instance (see `sd_core::ValueFormat`) is
    /// skipped with a warning and counted, as etcd's instancer does.
    fn add(&mut self, key: &str, value: &str) {
        let instance = match Instance::from_value(value) {
            Ok(i) => i,
            Err(e) => {
                self.invalid += 1;
                tracing::warn!(%key, error = %e, "key skipped: its value is not an instance");
                return;
            }
        };
        let n = self.counts.entry(instance.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.set.insert(instance);
        }
    }

    fn release(&mut self, value: &str) {
        if let Some(n) = self.counts.get_mut(value) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(value);
                self.set.remove(value);
            }
        }
    }
}

impl Watcher {
    fn view(&self) -> MutexGuard<'_, View> {
        // Every critical section leaves the view consistent, so a poisoned lock is still usable.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self) -> Event {
        Event::Instances(self.view().set.clone())
    }

    /// How many values this watcher skipped as not instances.
    pub(crate) fn invalid_values(&self) -> u64 {
        self.view().invalid
    }
}

impl State {
    /// Fault injection and availability, checked by every operation.
    fn check(&mut self, op: &str) -> Result<(), Error> {
        if !self.available {
            return Err(Error::backend_msg(format!(
                "memory store unavailable ({op}): the test took it down with set_available(false)"
            )));
        }
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(Error::backend_msg(format!(
                "injected failure ({op}): fail_next() was set on the memory store"
            )));
        }
        Ok(())
    }

    /// The values under `prefix`, counted: read once when a watcher starts.
    fn view(&self, prefix: &str) -> View {
        let mut view = View::default();
        for (k, e) in self
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            view.add(k, &e.value);
        }
        view
    }

    /// Tells every live watcher of a prefix that holds `key` that its value went from `old` to
    /// `new` (`None`: absent): O(log N) per watcher.
    fn notify(&mut self, key: &str, old: Option<&str>, new: Option<&str>) {
        self.watchers.retain(|w| w.strong_count() > 0);
        for w in self.watchers.iter().filter_map(Weak::upgrade) {
            if !key.starts_with(&w.prefix) {
                continue;
            }
            let mut view = w.view();
            if let Some(old) = old {
                view.release(old);
            }
            if let Some(new) = new {
                view.add(key, new);
            }
            let event = Event::Instances(view.set.clone());
            drop(view);
            if self.available {
                w.publisher.publish(event);
            }
        }
    }

    fn notify_all(&mut self) {
        self.watchers.retain(|w| w.strong_count() > 0);
        for w in self.watchers.iter().filter_map(Weak::upgrade) {
            w.publisher.publish(w.event());
        }
    }

    fn remove_key(&mut self, key: &str) -> bool {
        match self.keys.remove(key) {
            Some(old) => {
                self.notify(key, Some(&old.value), None);
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            tracing::debug!(%key, "lease expired: key removed");
            self.remove_key(&key);
        }
    }
}

impl MemoryStore {
    /// An empty store.
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// assert!(store.get_prefix("").unwrap().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `key` = `value` with no lease (it lives until deleted).
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.put("/svc/a/1", "a:1").unwrap();
    /// assert_eq!(store.get_prefix("/svc/").unwrap(), [("/svc/a/1".into(), "a:1".into())]);
    /// assert!(store.put("", "a:1").is_err());
    /// ```
    pub fn put(&self, key: &str, value: &str) -> Result<(), Error> {
        self.put_with_lease(key, value, None)
    }

    /// Puts `key` = `value`, attached to `lease` if given (the key goes when the lease does).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let lease = store.grant(Duration::from_secs(5)).unwrap();
    /// store.put_with_lease("/svc/a/1", "a:1", Some(lease)).unwrap();
    /// store.revoke(lease).unwrap();
    /// assert!(store.get_prefix("/svc/").unwrap().is_empty(), "the key went with its lease");
    /// # }
    /// ```
    pub fn put_with_lease(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::invalid_argument("key is empty"));
        }
        let mut state = self.inner.lock();
        state.check("put")?;
        if let Some(id) = lease {
            if !state.leases.contains_key(&id) {
                return Err(lease_not_found(id));
            }
        }
        let old = state.keys.insert(
            key.to_string(),
            Entry {
                value: value.to_string(),
                lease,
            },
        );
        state.notify(key, old.as_ref().map(|e| e.value.as_str()), Some(value));
        Ok(())
    }

    /// Deletes `key`; returns whether it existed.
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.put("/k", "v").unwrap();
    /// assert!(store.delete("/k").unwrap());
    /// assert!(!store.delete("/k").unwrap());
    /// ```
    pub fn delete(&self, key: &str) -> Result<bool, Error> {
        let mut state = self.inner.lock();
        state.check("delete")?;
        Ok(state.remove_key(key))
    }

    /// Deletes `key` only if it is attached to `lease` (etcd's compare-and-delete on the lease).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let mine = store.grant(Duration::from_secs(5)).unwrap();
    /// let other = store.grant(Duration::from_secs(5)).unwrap();
    /// store.put_with_lease("/k", "v", Some(mine)).unwrap();
    /// assert!(!store.delete_if_lease("/k", other).unwrap());
    /// assert!(store.delete_if_lease("/k", mine).unwrap());
    /// # }
    /// ```
    pub fn delete_if_lease(&self, key: &str, lease: LeaseId) -> Result<bool, Error> {
        let mut state = self.inner.lock();
        state.check("delete")?;
        if state.keys.get(key).is_some_and(|e| e.lease == Some(lease)) {
            Ok(state.remove_key(key))
        } else {
            Ok(false)
        }
    }

    /// Deletes `key` only if it holds `value` and no lease (a plain registration of ours).
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.put("/k", "v").unwrap();
    /// assert!(!store.delete_if_value("/k", "other").unwrap());
    /// assert!(store.delete_if_value("/k", "v").unwrap());
    /// ```
    pub fn delete_if_value(&self, key: &str, value: &str) -> Result<bool, Error> {
        let mut state = self.inner.lock();
        state.check("delete")?;
        if state
            .keys
            .get(key)
            .is_some_and(|e| e.value == value && e.lease.is_none())
        {
            Ok(state.remove_key(key))
        } else {
            Ok(false)
        }
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.put("/svc/b", "2").unwrap();
    /// store.put("/svc/a", "1").unwrap();
    /// store.put("/other", "3").unwrap();
    /// let keys: Vec<_> = store.get_prefix("/svc/").unwrap().into_iter().map(|(k, _)| k).collect();
    /// assert_eq!(keys, ["/svc/a", "/svc/b"]);
    /// ```
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let mut state = self.inner.lock();
        state.check("get")?;
        Ok(state
            .keys
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect())
    }

    /// Grants a lease that expires `ttl` after its last keep-alive. Needs a tokio runtime (the
    /// expiry runs on a task).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let lease = store.grant(Duration::from_secs(5)).unwrap();
    /// assert!(store.lease_alive(lease));
    /// assert!(store.grant(Duration::ZERO).is_err());
    /// # }
    /// ```
    pub fn grant(&self, ttl: Duration) -> Result<LeaseId, Error> {
        if ttl.is_zero() {
            return Err(Error::invalid_argument("lease ttl must be above zero"));
        }
        let mut state = self.inner.lock();
        state.check("grant")?;
        let id = LeaseId(state.next_lease);
        state.next_lease += 1;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: deadline_after(ttl),
            },
        );
        drop(state);
        tokio::spawn(
            expire_when_due(Arc::downgrade(&self.inner), id)
                .instrument(tracing::error_span!("memory_lease", lease = id.0)),
        );
        Ok(id)
    }

    /// Pushes the lease's expiry `ttl` into the future. Fails if the lease is gone.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let lease = store.grant(Duration::from_secs(2)).unwrap();
    /// tokio::time::sleep(Duration::from_secs(1)).await;
    /// store.keep_alive(lease).unwrap();
    /// tokio::time::sleep(Duration::from_millis(1500)).await;
    /// assert!(store.lease_alive(lease), "the keep-alive pushed the expiry back");
    /// # }
    /// ```
    pub fn keep_alive(&self, lease: LeaseId) -> Result<(), Error> {
        let mut state = self.inner.lock();
        state.check("keep_alive")?;
        match state.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = deadline_after(l.ttl);
                Ok(())
            }
            None => Err(lease_not_found(lease)),
        }
    }

    /// Revokes the lease now, deleting its keys. Revoking an unknown lease is not an error.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let lease = store.grant(Duration::from_secs(5)).unwrap();
    /// store.revoke(lease).unwrap();
    /// assert!(!store.lease_alive(lease));
    /// assert!(store.revoke(lease).is_ok(), "revoking twice is fine");
    /// # }
    /// ```
    pub fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        let mut state = self.inner.lock();
        state.check("revoke")?;
        state.expire(lease);
        Ok(())
    }

    /// Whether `lease` is still alive.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = sd_memory::MemoryStore::new();
    /// let lease = store.grant(Duration::from_secs(1)).unwrap();
    /// assert!(store.lease_alive(lease));
    /// tokio::time::sleep(Duration::from_secs(2)).await;
    /// assert!(!store.lease_alive(lease), "expired");
    /// # }
    /// ```
    pub fn lease_alive(&self, lease: LeaseId) -> bool {
        self.inner.lock().leases.contains_key(&lease)
    }

    /// Makes the next `n` operations (puts, deletes, reads, grants, keep-alives, revokes, and a
    /// broken watch's reconnect attempts) fail, replacing any count still pending. They are the
    /// next `n` of any caller, a registrar's background heartbeats included: with heartbeats
    /// running, which call fails depends on timing (pause tokio time, or use
    /// [`set_available`](Self::set_available), to be exact).
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.fail_next(1);
    /// assert!(store.put("/k", "v").is_err());
    /// assert!(store.put("/k", "v").is_ok());
    /// ```
    ///
    /// With [`break_watches`](Self::break_watches), each failed reconnect is an error event, and
    /// watchers try again after the reconnect delay:
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sd_core::Instancer;
    /// use sd_memory::{MemoryInstancer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = MemoryStore::new();
    /// store.put("/svc/a", "a:1").unwrap();
    /// let instancer = MemoryInstancer::new(&store, "/svc/").unwrap();
    /// let mut events = instancer.subscribe();
    /// events.next().await;
    /// store.break_watches();
    /// store.fail_next(1);
    /// let broken = events.next().await.unwrap();
    /// assert!(broken.error().unwrap().to_string().contains("broken"));
    /// let failed_reconnect = events.next().await.unwrap();
    /// assert!(failed_reconnect.error().unwrap().to_string().contains("injected"));
    /// assert_eq!(events.next().await.unwrap().instances().unwrap(), &["a:1"]);
    /// # }
    /// ```
    pub fn fail_next(&self, n: usize) {
        self.inner.lock().fail_next = n;
    }

    /// Breaks every watch: subscribers see an error event, then, after a short reconnect delay,
    /// the current set again (if the store is available by then; otherwise when it is).
    /// Needs a tokio runtime.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sd_core::Instancer;
    /// use sd_memory::{MemoryInstancer, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = MemoryStore::new();
    /// let instancer = MemoryInstancer::new(&store, "/svc/").unwrap();
    /// let mut events = instancer.subscribe();
    /// events.next().await;
    /// store.break_watches();
    /// assert!(events.next().await.unwrap().error().is_some());
    /// assert!(events.next().await.unwrap().error().is_none(), "reconnected");
    /// # }
    /// ```
    pub fn break_watches(&self) {
        let mut state = self.inner.lock();
        state.watchers.retain(|w| w.strong_count() > 0);
        for w in state.watchers.iter().filter_map(Weak::upgrade) {
            w.publisher.publish(Event::Error(Error::backend_msg(
                "memory store watch broken by break_watches(); reconnecting",
            )));
        }
        drop(state);
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(
            async move {
                loop {
                    sleep(RECONNECT_DELAY).await;
                    let Some(inner) = inner.upgrade() else { return };
                    let mut state = inner.lock();
                    if !state.available {
                        // `set_available(true)` publishes the set when the store comes back.
                        return;
                    }
                    match state.check("watch reconnect") {
                        Ok(()) => {
                            state.notify_all();
                            return;
                        }
                        Err(e) => {
                            state.watchers.retain(|w| w.strong_count() > 0);
                            for w in state.watchers.iter().filter_map(Weak::upgrade) {
                                w.publisher.publish(Event::Error(e.clone()));
                            }
                        }
                    }
                }
            }
            .instrument(tracing::error_span!("memory_watch_reconnect")),
        );
    }

    /// Takes the store down (`false`: every operation fails and every watch reports an error)
    /// or brings it back (`true`: watches publish the current set). Leases keep running while
    /// the store is down, so a registration whose heartbeats fail for longer than its TTL expires.
    ///
    /// ```
    /// let store = sd_memory::MemoryStore::new();
    /// store.set_available(false);
    /// assert!(store.get_prefix("/").is_err());
    /// store.set_available(true);
    /// assert!(store.get_prefix("/").is_ok());
    /// ```
    pub fn set_available(&self, available: bool) {
        let mut state = self.inner.lock();
        if state.available == available {
            return;
        }
        state.available = available;
        state.watchers.retain(|w| w.strong_count() > 0);
        if available {
            state.notify_all();
        } else {
            for w in state.watchers.iter().filter_map(Weak::upgrade) {
                w.publisher.publish(Event::Error(Error::backend_msg(
                    "memory store unavailable: set_available(false)",
                )));
            }
        }
    }

    /// Adds a watcher of `prefix`, seeded with the current set. Fails like a read would.
    pub(crate) fn watch(&self, prefix: &str) -> Result<Arc<Watcher>, Error> {
        let mut state = self.inner.lock();
        state.check("watch")?;
        let view = state.view(prefix);
        let watcher = Arc::new(Watcher {
            prefix: prefix.to_string(),
            publisher: Publisher::new(Event::Instances(view.set.clone())),
            view: Mutex::new(view),
        });
        state.watchers.push(Arc::downgrade(&watcher));
        Ok(watcher)
    }
}

/// `ttl` from now; a TTL too long to represent (e.g. `Duration::MAX`) is thirty years, which is
/// never in a test's lifetime, rather than a panic.
fn deadline_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

fn lease_not_found(id: LeaseId) -> Error {
    Error::backend_msg(format!("requested lease not found: {id:?}"))
}

/// Whether `err` says a lease is gone (so a registrar must grant a new one).
pub(crate) fn is_lease_not_found(err: &Error) -> bool {
    err.to_string().contains("requested lease not found")
}

async fn expire_when_due(inner: Weak<Inner>, id: LeaseId) {
    loop {
        let deadline = {
            let Some(inner) = inner.upgrade() else { return };
            let mut state = inner.lock();
            let Some(lease) = state.leases.get(&id) else {
                return;
            };
            if lease.deadline <= Instant::now() {
                state.expire(id);
                return;
            }
            lease.deadline
        };
        sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_expires_after_ttl_without_keep_alive() {
        let store = MemoryStore::new();
        let lease = store.grant(Duration::from_secs(2)).unwrap();
        store.put_with_lease("/k", "v", Some(lease)).unwrap();
        sleep(Duration::from_millis(1500)).await;
        store.keep_alive(lease).unwrap();
        sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            store.get_prefix("/").unwrap().len(),
            1,
            "keep-alive extended it"
        );
        sleep(Duration::from_millis(600)).await;
        assert!(
            store.get_prefix("/").unwrap().is_empty(),
            "expired 2 s after the keep-alive"
        );
        assert!(!store.lease_alive(lease));
        assert!(is_lease_not_found(&store.keep_alive(lease).unwrap_err()));
        assert!(store.put_with_lease("/k", "v", Some(lease)).is_err());
    }

    #[tokio::test]
    async fn unavailable_store_fails_every_operation() {
        let store = MemoryStore::new();
        store.set_available(false);
        assert!(store.put("/k", "v").is_err());
        assert!(store.get_prefix("/").is_err());
        assert!(store.grant(Duration::from_secs(1)).is_err());
        store.set_available(true);
        assert!(store.put("/k", "v").is_ok());
    }

    #[tokio::test]
    async fn delete_if_lease_only_deletes_our_key() {
        let store = MemoryStore::new();
        let ours = store.grant(Duration::from_secs(5)).unwrap();
        let theirs = store.grant(Duration::from_secs(5)).unwrap();
        store.put_with_lease("/k", "v", Some(theirs)).unwrap();
        assert!(!store.delete_if_lease("/k", ours).unwrap());
        assert!(store.delete_if_lease("/k", theirs).unwrap());
        assert!(store.put("", "v").is_err(), "an empty key is refused");
    }
}
