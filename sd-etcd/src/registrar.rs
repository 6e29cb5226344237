//! [`EtcdRegistrar`]: one service's key in etcd, kept alive on a lease shared with the other
//! registrations of the same client.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sd_core::{RegistrationState, Service};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics::LeaseMetrics;
use crate::{Client, Error, EtcdClient};

/// The lease pools of one client, found by the registrars made with that client: one pool, and
/// one lease, per (TTL, heartbeat).
///
/// A [`Client`] hands it out through [`Client::lease_pools`]; [`EtcdClient`] has one, shared
/// by its clones. A client that has none gives each registrar a lease of its own.
///
/// ```
/// let pools = sd_etcd::LeasePools::new();
/// let same = pools.clone();
/// # let _ = same;
/// ```
#[derive(Clone, Default)]
pub struct LeasePools(Arc<Mutex<HashMap<PoolKey, Weak<dyn Any + Send + Sync>>>>);

/// A pool's TTL (whole seconds) and heartbeat.
type PoolKey = (i64, Duration);

/// A key waiting to be put, with whoever waits for the answer.
type Waiter = (Arc<Entry>, oneshot::Sender<Result<(), Error>>);

impl LeasePools {
    /// An empty set of pools.
    ///
    /// ```
    /// let pools = sd_etcd::LeasePools::new();
    /// # let _ = pools;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    fn pool<C: Client + Clone>(
        &self,
        client: &C,
        ttl_secs: i64,
        heartbeat: Duration,
    ) -> Arc<Pool<C>> {
        let mut map = lock(&self.0);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(any) = map.get(&(ttl_secs, heartbeat)).and_then(Weak::upgrade) {
            if let Ok(pool) = any.downcast::<Pool<C>>() {
                return pool;
            }
        }
        let pool = Pool::new(client.clone(), ttl_secs, heartbeat);
        let any: Arc<dyn Any + Send + Sync> = pool.clone();
        map.insert((ttl_secs, heartbeat), Arc::downgrade(&any));
        pool
    }
}

impl fmt::Debug for LeasePools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeasePools")
            .field("pools", &lock(&self.0).len())
            .finish()
    }
}

/// Registers a [`Service`] in etcd (go-kit's `etcdv3.Registrar`).
///
/// Without a TTL it is a plain put (and delete on deregister). With a TTL the key is put on a
/// lease that every registrar of the same client with the same TTL and heartbeat shares (TTL
/// rounded *up* to whole seconds, as etcd counts them), kept alive every heartbeat on one
/// long-lived keep-alive stream, so keeping 10 000 registrations alive costs what keeping one
/// does. Registrations that arrive together are put together (transactions of up to 128 keys),
/// and etcd's back-pressure (`too many requests`) is ridden out with a backoff.
///
/// It recovers from what etcd can do to a registration, and reports it through
/// [`state`](sd_core::Registrar::state) (`Retrying(error)` until it is back):
/// - **lease lost** (expired while cut off, revoked, or a store wiped or restored from a
///   backup): a new lease is granted and every key of the pool is put again, retrying with a
///   backoff capped at the heartbeat;
/// - **key deleted or overwritten behind its back** while the lease lives: every heartbeat
///   checks which keys the lease still holds and puts a missing one back. The rule: a key that
///   is gone, or that someone overwrote without a lease (`etcdctl put`), is put back; a key now
///   held by *another* lease belongs to another registrar, which registered it on purpose, and
///   is left alone (`Retrying`, naming that lease) until it goes away.
///
/// The lease's task logs in a span `etcd_lease_pool{ttl_secs, heartbeat, lease}`: a failure is
/// one warning when it starts (retries after it at `debug`) and one `info` line,
/// `registrations recovered`, when it is over; heartbeats log nothing at `info`.
///
/// `register()` returns the error of its first attempt (an empty key or value, etcd
/// unreachable, ...) and then leaves nothing running: call it again. Once registered, failures
/// are retried in the background. `register()` and `deregister()` are idempotent.
///
/// [`deregister`](sd_core::Registrar::deregister) deletes the key only if it still carries
/// this registrar's lease (another process may have taken it over); the lease is revoked when
/// its last key is gone. Dropping the registrar deregisters in the background (best effort,
/// unless [`with_revoke_on_drop(false)`](Self::with_revoke_on_drop)); [`abandon`](Self::abandon)
/// leaves the key to expire at its TTL, as a crashed process's would.
///
/// ```no_run
/// use std::time::Duration;
/// use sd_core::{Registrar, Service, TtlOption};
/// use sd_etcd::{ClientOptions, EtcdClient, EtcdRegistrar};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = EtcdClient::connect(["http://127.0.0.1:2379"], ClientOptions::new()).await?;
/// let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3))?;
/// let svc = Service::new("/services/foo/10.0.0.1:80", "10.0.0.1:80")?.with_ttl(ttl);
/// let registrar = EtcdRegistrar::new(client, svc);
/// registrar.register().await?;
/// assert!(registrar.state().is_registered());
/// registrar.deregister().await?;
/// # Ok(()) }
/// ```
pub struct EtcdRegistrar<C: Client + Clone = EtcdClient> {
    client: C,
    entry: Arc<Entry>,
    /// With a TTL: the pool whose lease carries the key.
    pool: Option<Arc<Pool<C>>>,
    /// Serialises `register` and `deregister`.
    op: tokio::sync::Mutex<()>,
    /// Without a TTL: whether the key was put and not yet deleted.
    plain_registered: Mutex<bool>,
    revoke_on_drop: bool,
}

/// One registration: the key, its value and what is known of it.
struct Entry {
    key: String,
    value: String,
    state: Mutex<RegistrationState>,
}

impl Entry {
    fn set_state(&self, s: RegistrationState) {
        *lock(&self.state) = s;
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Values behind these locks are replaced whole, so a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: Client + Clone> fmt::Debug for EtcdRegistrar<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistrar")
            .field("key", &self.entry.key)
            .field("value", &self.entry.value)
            .field("state", &*lock(&self.entry.state))
            .field("lease", &self.lease())
            .finish()
    }
}

/// The TTL in whole seconds, rounded up.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

impl<C: Client + Clone> EtcdRegistrar<C> {
    /// A registrar for `service` (not yet registered: call `register()`).
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) -> Result<(), sd_core::Error> {
    /// let svc = sd_core::Service::new("/services/foo/a:1", "a:1")?;
    /// let registrar = sd_etcd::EtcdRegistrar::new(client, svc);
    /// # let _ = registrar; Ok(()) }
    /// ```
    pub fn new(client: C, service: Service) -> Self {
        let pool = service.ttl.map(|ttl| {
            let secs = ttl_secs(ttl.ttl());
            match client.lease_pools() {
                Some(pools) => pools.pool(&client, secs, ttl.heartbeat()),
                None => Pool::new(client.clone(), secs, ttl.heartbeat()),
            }
        });
        EtcdRegistrar {
            client,
            entry: Arc::new(Entry {
                key: service.key,
                value: service.value,
                state: Mutex::new(RegistrationState::Unregistered),
            }),
            pool,
            op: tokio::sync::Mutex::new(()),
            plain_registered: Mutex::new(false),
            revoke_on_drop: true,
        }
    }

    /// Whether dropping the registrar deregisters it (default `true`). With `false`, a dropped
    /// registrar's key lives until its TTL runs out, like a crashed process's.
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient, svc: sd_core::Service) {
    /// let registrar = sd_etcd::EtcdRegistrar::new(client, svc).with_revoke_on_drop(false);
    /// # let _ = registrar; }
    /// ```
    pub fn with_revoke_on_drop(mut self, revoke: bool) -> Self {
        self.revoke_on_drop = revoke;
        self
    }

    /// The key this registrar publishes.
    ///
    /// ```no_run
    /// # fn f(r: &sd_etcd::EtcdRegistrar) {
    /// println!("{}", r.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.entry.key
    }

    /// The lease the key is on (with a TTL, once registered). Registrars of one client with the
    /// same TTL and heartbeat share it.
    ///
    /// ```no_run
    /// # fn f(r: &sd_etcd::EtcdRegistrar) {
    /// if let Some(lease) = r.lease() { println!("lease {lease:x}"); }
    /// # }
    /// ```
    pub fn lease(&self) -> Option<i64> {
        let pool = self.pool.as_ref()?;
        let st = lock(&pool.state);
        st.holds(&self.entry).then_some(st.lease).flatten()
    }

    /// Stops keeping the key alive without deleting it, as a crashed process would: the key
    /// expires at its TTL. (It is moved to a lease of its own that nobody refreshes, so the
    /// other registrations of the shared lease live on.)
    ///
    /// ```no_run
    /// # fn f(r: sd_etcd::EtcdRegistrar) {
    /// r.abandon();
    /// # }
    /// ```
    pub fn abandon(mut self) {
        self.revoke_on_drop = false;
    }

    fn check(&self) -> Result<(), Error> {
        if self.entry.key.is_empty() {
            return Err(Error::NoKey);
        }
        if self.entry.value.is_empty() {
            return Err(Error::NoValue);
        }
        Ok(())
    }

    async fn do_register(&self) -> Result<(), Error> {
        self.check()?;
        let _op = self.op.lock().await;
        let entry = &self.entry;
        match &self.pool {
            None => {
                if !*lock(&self.plain_registered) {
                    self.client.put(&entry.key, &entry.value, None).await?;
                    *lock(&self.plain_registered) = true;
                }
            }
            Some(pool) => {
                if pool.holds(entry) {
                    return Ok(());
                }
                pool.add(entry.clone()).await?;
            }
        }
        entry.set_state(RegistrationState::Registered);
        tracing::debug!(key = %entry.key, lease = ?self.lease(), "registered");
        Ok(())
    }

    async fn do_deregister(&self) -> Result<(), Error> {
        let _op = self.op.lock().await;
        let entry = &self.entry;
        match &self.pool {
            None => {
                if *lock(&self.plain_registered) {
                    self.client.delete(&entry.key).await?;
                    *lock(&self.plain_registered) = false;
                }
            }
            Some(pool) => pool.remove(entry).await?,
        }
        entry.set_state(RegistrationState::Unregistered);
        tracing::debug!(key = %entry.key, "deregistered");
        Ok(())
    }
}

/// One shared lease and the keys on it, kept alive by one background task.
struct Pool<C> {
    client: C,
    ttl_secs: i64,
    heartbeat: Duration,
    state: Mutex<PoolState>,
    /// Wakes the task: new keys to put.
    wake: Notify,
    /// Serialises lease grants and revokes.
    lease_op: tokio::sync::Mutex<()>,
    metrics: LeaseMetrics,
}

#[derive(Default)]
struct PoolState {
    lease: Option<i64>,
    /// Registered keys.
    entries: HashMap<String, Arc<Entry>>,
    /// Keys waiting to be put, with whoever waits for the answer.
    pending: Vec<Waiter>,
    /// Keys waiting to be deleted, with whoever waits for the answer.
    removing: Vec<Waiter>,
    /// Batches taken from `pending` or `removing` and not answered yet.
    in_flight: usize,
    task: Option<JoinHandle<()>>,
}

impl PoolState {
    /// Whether `entry` is the registration this pool keeps for its key.
    fn holds(&self, entry: &Arc<Entry>) -> bool {
        self.entries
            .get(&entry.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
    }

    /// Forgets `entry` (waiting or registered); returns whether it was registered.
    fn forget(&mut self, entry: &Arc<Entry>) -> bool {
        self.pending.retain(|(e, _)| !Arc::ptr_eq(e, entry));
        let held = self.holds(entry);
        if held {
            self.entries.remove(&entry.key);
        }
        held
    }

    /// Whether nothing is registered, waiting or being written.
    fn idle(&self) -> bool {
        self.entries.is_empty()
            && self.pending.is_empty()
            && self.removing.is_empty()
            && self.in_flight == 0
    }
}

impl<C> Drop for Pool<C> {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.state).task.take() {
            task.abort();
        }
    }
}

/// Exponential backoff from 100 ms, capped, with jitter.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(16));
    let d = base.min(cap);
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

impl<C: Client + Clone> Pool<C> {
    fn new(client: C, ttl_secs: i64, heartbeat: Duration) -> Arc<Self> {
        Arc::new(Pool {
            client,
            ttl_secs,
            heartbeat,
            state: Mutex::new(PoolState::default()),
            wake: Notify::new(),
            lease_op: tokio::sync::Mutex::new(()),
            metrics: LeaseMetrics::new(ttl_secs),
        })
    }

    fn holds(&self, entry: &Arc<Entry>) -> bool {
        lock(&self.state).holds(entry)
    }

    /// The pool's lease, granted if it has none.
    async fn ensure_lease(&self) -> Result<i64, Error> {
        if let Some(lease) = lock(&self.state).lease {
            return Ok(lease);
        }
        let _op = self.lease_op.lock().await;
        if let Some(lease) = lock(&self.state).lease {
            return Ok(lease);
        }
        let (lease, granted) = self.client.grant(self.ttl_secs).await?;
        if granted > 0 && Duration::from_secs(granted.unsigned_abs()) <= self.heartbeat {
            let _ = self.client.revoke(lease).await;
            return Err(Error::InvalidTtl(format!(
                "etcd granted a TTL of {granted}s, not above the heartbeat {:?}: use a longer TTL",
                self.heartbeat
            )));
        }
        lock(&self.state).lease = Some(lease);
        Ok(lease)
    }

    /// Puts `entry` on the lease (together with whatever else is waiting) and adds it.
    async fn add(self: &Arc<Self>, entry: Arc<Entry>) -> Result<(), Error> {
        self.ensure_lease().await?;
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&self.state);
            st.pending.push((entry, tx));
            self.ensure_task(&mut st);
        }
        self.wake.notify_one();
        rx.await.unwrap_or(Err(Error::Stopped))
    }

    fn ensure_task(self: &Arc<Self>, st: &mut PoolState) {
        if st.task.as_ref().is_none_or(JoinHandle::is_finished) {
            // At ERROR level, so a filter that lets warnings through keeps the lease they are
            // about; the task records the lease in it whenever it changes.
            let span = tracing::error_span!(
                "etcd_lease_pool",
                ttl_secs = self.ttl_secs,
                heartbeat = ?self.heartbeat,
                lease = tracing::field::Empty,
            );
            st.task = Some(tokio::spawn(keep(Arc::downgrade(self)).instrument(span)));
        }
    }

    /// Deletes `entry`'s key (if it still carries our lease, together with whatever else is
    /// being removed) and forgets it; revokes the lease once no key is left on it.
    async fn remove(self: &Arc<Self>, entry: &Arc<Entry>) -> Result<(), Error> {
        let rx = {
            let mut st = lock(&self.state);
            if !st.forget(entry) {
                return Ok(());
            }
            if st.lease.is_none() {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.removing.push((entry.clone(), tx));
                self.ensure_task(&mut st);
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            self.wake.notify_one();
            rx.await.unwrap_or(Err(Error::Stopped))?;
        }
        self.release_if_idle(true).await;
        Ok(())
    }

    /// Stops the task when no key is left on the lease, and revokes the lease if `revoke` (else
    /// it expires at its TTL).
    async fn release_if_idle(&self, revoke: bool) {
        let _op = self.lease_op.lock().await;
        let lease = {
            let mut st = lock(&self.state);
            if !st.idle() {
                return;
            }
            if let Some(task) = st.task.take() {
                task.abort();
            }
            st.lease.take().filter(|_| revoke)
        };
        if let Some(lease) = lease {
            // The keys are gone; a lease that outlives them holds nothing and expires at its TTL.
            if let Err(e) = self.client.revoke(lease).await {
                tracing::warn!(lease, error = %sd_core::Report(&e), "revoking the lease failed; it expires at its TTL");
            }
        }
    }

    /// Forgets `entry` without deleting its key, and moves the key to a lease nobody refreshes,
    /// so it expires at its TTL.
    async fn orphan(&self, entry: &Arc<Entry>) {
        if !self.holds(entry) {
            lock(&self.state).forget(entry);
            return;
        }
        // Moved while still registered here, so the shared lease is not released (revoking
        // it) until the key is off it.
        let moved = async {
            let (lease, _) = self.client.grant(self.ttl_secs).await?;
            self.client.put(&entry.key, &entry.value, Some(lease)).await
        };
        let moved = moved.await;
        if let Err(e) = &moved {
            tracing::warn!(key = %entry.key, error = %sd_core::Report(e), "could not leave the key to expire");
        }
        lock(&self.state).forget(entry);
        // With nothing else on the shared lease, stop refreshing it. It holds no key once ours
        // moved, so it is revoked; if the move failed, it holds ours and must expire instead.
        self.release_if_idle(moved.is_ok()).await;
    }

    fn set_all(&self, state: &RegistrationState) {
        for e in lock(&self.state).entries.values() {
            e.set_state(state.clone());
        }
    }

    /// Takes the waiters of one queue as a batch in flight, with the lease to write on.
    fn take_batch(
        &self,
        queue: fn(&mut PoolState) -> &mut Vec<Waiter>,
    ) -> Option<(Vec<Waiter>, Option<i64>)> {
        let mut st = lock(&self.state);
        let batch = std::mem::take(queue(&mut st));
        if batch.is_empty() {
            return None;
        }
        st.in_flight += 1;
        Some((batch, st.lease))
    }

    /// Ends a batch taken with [`take_batch`](Self::take_batch).
    fn finish_batch(&self) -> std::sync::MutexGuard<'_, PoolState> {
        let mut st = lock(&self.state);
        st.in_flight -= 1;
        st
    }

    /// Deletes every key waiting to go; answers each waiter. A failure puts the keys back
    /// among the registered ones (nothing changed in etcd: they stay kept alive).
    async fn flush_removals(&self) {
        let Some((batch, lease)) = self.take_batch(|st| &mut st.removing) else {
            return;
        };
        let result = match lease {
            Some(lease) => {
                let keys: Vec<String> = batch.iter().map(|(e, _)| e.key.clone()).collect();
                self.client.delete_many_if_lease(&keys, lease).await
            }
            None => Ok(()),
        };
        let mut st = self.finish_batch();
        for (entry, tx) in batch {
            if result.is_err() {
                st.entries.entry(entry.key.clone()).or_insert(entry);
            }
            let _ = tx.send(result.clone());
        }
    }

    /// Puts every waiting key; answers each waiter.
    async fn flush(&self) {
        self.flush_removals().await;
        let Some((batch, lease)) = self.take_batch(|st| &mut st.pending) else {
            return;
        };
        let result = match lease {
            Some(lease) => {
                let entries: Vec<(String, String)> = batch
                    .iter()
                    .map(|(e, _)| (e.key.clone(), e.value.clone()))
                    .collect();
                self.client.put_many(&entries, Some(lease)).await
            }
            None => Err(Error::LeaseNotFound(0)),
        };
        let mut st = self.finish_batch();
        for (entry, tx) in batch {
            if result.is_ok() {
                st.entries.insert(entry.key.clone(), entry);
            }
            let _ = tx.send(result.clone());
        }
        if result.is_err() && st.idle() {
            // Nobody holds anything on this lease: start afresh next time.
            if let Some(lease) = st.lease.take() {
                let client = self.client.clone();
                let span = tracing::error_span!("etcd_revoke", lease = %format_args!("{lease:x}"));
                tokio::spawn(
                    async move {
                        if let Err(e) = client.revoke(lease).await {
                            tracing::debug!(error = %sd_core::Report(&e), "revoking an unused lease failed; it expires at its TTL");
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    /// The lease is gone: grant a new one and put every key on it again.
    async fn regrant(&self) -> Result<i64, Error> {
        {
            let _op = self.lease_op.lock().await;
            lock(&self.state).lease = None;
        }
        let lease = self.ensure_lease().await?;
        let entries: Vec<(String, String)> = lock(&self.state)
            .entries
            .values()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        self.client.put_many(&entries, Some(lease)).await?;
        self.metrics.reregistered(entries.len());
        Ok(lease)
    }

    /// Puts back the keys the lease no longer holds, unless another lease holds them now.
    async fn guard(&self, lease: i64) -> Result<(), Error> {
        let Some(held) = self.client.lease_keys(lease).await? else {
            return Err(Error::LeaseNotFound(lease));
        };
        let missing: Vec<Arc<Entry>> = {
            let state = lock(&self.state);
            // The usual round: the lease holds as many keys as are registered, and every key
            // put on it is one of ours, so none is missing. Only a count that differs (a key
            // deleted, or overwritten without our lease) costs a lookup per key.
            if held.len() == state.entries.len() {
                return Ok(());
            }
            let held: std::collections::HashSet<&[u8]> = held.iter().map(Vec::as_slice).collect();
            state
                .entries
                .values()
                .filter(|e| !held.contains(e.key.as_bytes()))
                .cloned()
                .collect()
        };
        let mut restore = Vec::new();
        for entry in missing {
            let (kv, _) = self.client.get(&entry.key).await?;
            match kv {
                Some(kv) if kv.lease != 0 && kv.lease != lease => {
                    // Checked every heartbeat while it lasts: said once.
                    if matches!(*lock(&entry.state), RegistrationState::Retrying(_)) {
                        tracing::debug!(key = %entry.key, "key still held by another lease");
                    } else {
                        tracing::warn!(
                            key = %entry.key,
                            other_lease = %format_args!("{:x}", kv.lease),
                            "key taken over by another lease: left to its owner until it goes away"
                        );
                    }
                    entry.set_state(RegistrationState::Retrying(
                        Error::TakenOver {
                            key: entry.key.clone(),
                            lease: kv.lease,
                        }
                        .into(),
                    ));
                }
                Some(kv) if kv.lease == lease => entry.set_state(RegistrationState::Registered),
                _ => {
                    tracing::warn!(key = %entry.key, "key deleted or overwritten behind our back: putting it back");
                    entry.set_state(RegistrationState::Retrying(
                        Error::KeyLost(entry.key.clone()).into(),
                    ));
                    restore.push(entry);
                }
            }
        }
        if !restore.is_empty() {
            let entries: Vec<(String, String)> = restore
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect();
            self.client.put_many(&entries, Some(lease)).await?;
            self.metrics.reregistered(entries.len());
            for e in restore {
                e.set_state(RegistrationState::Registered);
            }
        }
        Ok(())
    }
}

/// The pool's task: puts waiting keys, refreshes the lease every heartbeat (each round bounded
/// by the heartbeat), checks the keys it holds, and re-grants a lost lease.
///
/// A failure is one warning when it starts and one `info` line when it is over; the retries in
/// between log at `debug`, so a long outage does not flood the log.
async fn keep<C: Client + Clone>(pool: Weak<Pool<C>>) {
    let Some(every) = pool.upgrade().map(|p| p.heartbeat) else {
        return;
    };
    let mut next = Instant::now() + every;
    let mut failures = 0u32;
    let mut lost = false;
    // Whether a failure has been reported and its recovery not yet.
    let mut failing = false;
    // The lease the span names.
    let mut named = None;
    loop {
        let Some(p) = pool.upgrade() else { return };
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(next) => false,
            _ = p.wake.notified() => true,
        };
        if woken {
            p.flush().await;
            name_lease(&p, &mut named);
            continue;
        }
        p.flush().await;
        name_lease(&p, &mut named);
        let round = async {
            if lost {
                p.regrant().await?;
                lost = false;
                p.set_all(&RegistrationState::Registered);
                name_lease(&p, &mut named);
            }
            let Some(lease) = lock(&p.state).lease else {
                return Ok(());
            };
            if !p.client.keep_alive(lease, every).await? {
                return Err(Error::LeaseNotFound(lease));
            }
            p.guard(lease).await
        };
        match round.await {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("registrations recovered");
                    p.set_all(&RegistrationState::Registered);
                }
                failures = 0;
                next = Instant::now() + every;
            }
            Err(Error::LeaseNotFound(lease)) if !lost => {
                // A lost lease is a fault of its own, worth its warning even within an outage.
                tracing::warn!(
                    lost_lease = %format_args!("{lease:x}"),
                    "etcd lost the lease; granting a new one and putting every key again"
                );
                p.metrics.lease_lost();
                p.set_all(&RegistrationState::Retrying(
                    Error::LeaseNotFound(lease).into(),
                ));
                lost = true;
                failing = true;
                next = Instant::now();
            }
            Err(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %sd_core::Report(&e), "keeping the registrations alive failed again");
                } else {
                    tracing::warn!(error = %sd_core::Report(&e), "keeping the registrations alive failed; retrying with backoff");
                }
                p.set_all(&RegistrationState::Retrying(e.into()));
                failures += 1;
                next = Instant::now() + backoff(failures, every);
            }
        }
    }
}

/// Records `p`'s lease in the task's span when it changed since `named`.
fn name_lease<C>(p: &Pool<C>, named: &mut Option<i64>) {
    let lease = lock(&p.state).lease;
    if lease.is_some() && lease != *named {
        *named = lease;
        if let Some(lease) = lease {
            tracing::Span::current().record("lease", tracing::field::display(format!("{lease:x}")));
        }
    }
}

#[async_trait]
impl<C: Client + Clone> sd_core::Registrar for EtcdRegistrar<C> {
    async fn register(&self) -> Result<(), sd_core::Error> {
        self.do_register().await.map_err(Into::into)
    }

    async fn deregister(&self) -> Result<(), sd_core::Error> {
        self.do_deregister().await.map_err(Into::into)
    }

    fn state(&self) -> RegistrationState {
        lock(&self.entry.state).clone()
    }
}

impl<C: Client + Clone> Drop for EtcdRegistrar<C> {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A key without a lease was meant to stay: dropping the handle leaves it.
        if let Some(pool) = &self.pool {
            let (pool, entry) = (pool.clone(), self.entry.clone());
            let span = tracing::error_span!("etcd_registrar_drop", key = %entry.key);
            if self.revoke_on_drop {
                rt.spawn(
                    async move {
                        if let Err(e) = pool.remove(&entry).await {
                            tracing::debug!(error = %sd_core::Report(&e), "best-effort deregister on drop failed");
                        }
                    }
                    .instrument(span),
                );
            } else {
                rt.spawn(async move { pool.orphan(&entry).await }.instrument(span));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockClient;
    use sd_core::{Registrar, TtlOption};
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    fn svc_on(key: &str, ttl: bool) -> Service {
        let value = key.rsplit('/').next().unwrap_or(key);
        let s = Service::new(key, value).unwrap();
        if ttl {
            s.with_ttl(
                TtlOption::new(Duration::from_millis(500), Duration::from_millis(1500)).unwrap(),
            )
        } else {
            s
        }
    }

    fn svc(ttl: bool) -> Service {
        svc_on("/svc/a:1", ttl)
    }

    /// A mock whose registrars each get a pool of their own.
    fn mock() -> MockClient {
        let mut m = MockClient::new();
        m.expect_lease_pools().returning(|| None);
        m
    }

    fn kv(key: &str, lease: i64) -> crate::KeyValue {
        crate::KeyValue {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            mod_revision: 2,
            lease,
        }
    }

    #[test]
    fn ttl_rounds_up() {
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_secs(3)), 3);
        assert_eq!(ttl_secs(Duration::from_millis(10)), 1);
    }

    #[tokio::test]
    async fn empty_key_is_refused_without_touching_etcd() {
        let r = EtcdRegistrar::new(
            Arc::new(mock()),
            Service {
                key: String::new(),
                value: "x".into(),
                ttl: None,
            },
        );
        let err = r.register().await.unwrap_err();
        assert!(matches!(err, sd_core::Error::InvalidArgument(_)), "{err:?}");
    }

    #[tokio::test]
    async fn plain_put_and_delete_without_ttl() {
        let mut mock = mock();
        mock.expect_put()
            .withf(|k, v, l| k == "/svc/a:1" && v == "a:1" && l.is_none())
            .times(1)
            .returning(|_, _, _| Ok(()));
        mock.expect_delete().times(1).returning(|_| Ok(()));
        let r = EtcdRegistrar::new(Arc::new(mock), svc(false));
        r.register().await.unwrap();
        r.register().await.unwrap();
        assert!(r.state().is_registered());
        r.deregister().await.unwrap();
        r.deregister().await.unwrap();
        assert!(!r.state().is_registered());
    }

    #[tokio::test]
    async fn failed_put_revokes_the_new_lease_and_reports() {
        let mut mock = mock();
        mock.expect_grant().returning(|ttl| Ok((7, ttl)));
        mock.expect_put_many().returning(|_, _| {
            Err(Error::Timeout {
                op: "put",
                after: Duration::from_secs(5),
            })
        });
        let revoked = Arc::new(AtomicUsize::new(0));
        let rv = revoked.clone();
        mock.expect_revoke().withf(|l| *l == 7).returning(move |_| {
            rv.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        assert!(r.register().await.is_err());
        assert!(!r.state().is_registered());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(revoked.load(Ordering::SeqCst), 1);
    }

    /// Registrars of one client with one TTL share one lease and one keep-alive per heartbeat.
    #[tokio::test(start_paused = true)]
    async fn registrars_of_one_client_share_one_lease() {
        let pools = LeasePools::new();
        let mut mock = MockClient::new();
        let p = pools.clone();
        mock.expect_lease_pools().returning(move || Some(p.clone()));
        mock.expect_grant().times(1).returning(|ttl| Ok((3, ttl)));
        let put = Arc::new(AtomicUsize::new(0));
        let pt = put.clone();
        mock.expect_put_many().returning(move |e, l| {
            assert_eq!(l, Some(3));
            pt.fetch_add(e.len(), Ordering::SeqCst);
            Ok(())
        });
        let beats = Arc::new(AtomicUsize::new(0));
        let b = beats.clone();
        mock.expect_keep_alive().returning(move |_, _| {
            b.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        });
        mock.expect_lease_keys().returning(|_| {
            Ok(Some(
                (0..10).map(|i| format!("/svc/{i}").into_bytes()).collect(),
            ))
        });
        let client = Arc::new(mock);
        let regs: Vec<_> = (0..10)
            .map(|i| EtcdRegistrar::new(client.clone(), svc_on(&format!("/svc/{i}"), true)))
            .collect();
        futures::future::try_join_all(regs.iter().map(|r| r.register()))
            .await
            .unwrap();
        assert_eq!(put.load(Ordering::SeqCst), 10);
        assert!(regs.iter().all(|r| r.lease() == Some(3)));
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let n = beats.load(Ordering::SeqCst);
        assert!(
            (3..=5).contains(&n),
            "{n} keep-alives in 4 heartbeats for 10 registrars"
        );
        for r in regs {
            r.abandon();
        }
    }

    // Paused time: the heartbeat's timers fire in a fixed order, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn lost_lease_is_regranted_and_key_put_again() {
        let mut mock = mock();
        let next_lease = Arc::new(AtomicI64::new(1));
        let n = next_lease.clone();
        mock.expect_grant()
            .returning(move |ttl| Ok((n.fetch_add(1, Ordering::SeqCst), ttl)));
        let puts = Arc::new(AtomicUsize::new(0));
        let p = puts.clone();
        mock.expect_put_many().returning(move |_, lease| {
            p.fetch_add(1, Ordering::SeqCst);
            assert!(lease.is_some());
            Ok(())
        });
        // Lease 1 is lost at once; lease 2 stays alive.
        mock.expect_keep_alive()
            .returning(|lease, _| Ok(lease != 1));
        mock.expect_lease_keys()
            .returning(|_| Ok(Some(vec![b"/svc/a:1".to_vec()])));
        mock.expect_delete_many_if_lease()
            .withf(|_, l| *l == 2)
            .returning(|_, _| Ok(()));
        mock.expect_revoke()
            .withf(|l| *l == 2)
            .returning(|_| Ok(()));
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        r.register().await.unwrap();
        assert_eq!(r.lease(), Some(1));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(r.lease(), Some(2), "state: {:?}", r.state());
        assert_eq!(puts.load(Ordering::SeqCst), 2);
        assert!(r.state().is_registered());
        r.deregister().await.unwrap();
    }

    // Paused time: the heartbeat's timers fire in a fixed order, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn failing_heartbeat_reports_retrying_then_recovers() {
        let mut mock = mock();
        mock.expect_grant().returning(|ttl| Ok((5, ttl)));
        mock.expect_put_many().returning(|_, _| Ok(()));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        mock.expect_keep_alive().returning(move |_, _| {
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Error::Watch("connection reset".into()))
            } else {
                Ok(true)
            }
        });
        mock.expect_lease_keys()
            .returning(|_| Ok(Some(vec![b"/svc/a:1".to_vec()])));
        mock.expect_delete_many_if_lease().returning(|_, _| Ok(()));
        mock.expect_revoke().returning(|_| Ok(()));
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        r.register().await.unwrap();
        tokio::time::sleep(Duration::from_millis(650)).await;
        assert!(
            matches!(r.state(), RegistrationState::Retrying(_)),
            "{:?}",
            r.state()
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(r.state().is_registered(), "{:?}", r.state());
        assert!(calls.load(Ordering::SeqCst) >= 3);
        drop(r);
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn deregister_leaves_a_key_taken_over_by_another_lease() {
        let mut mock = mock();
        mock.expect_grant().returning(|ttl| Ok((9, ttl)));
        mock.expect_put_many().returning(|_, _| Ok(()));
        mock.expect_delete_many_if_lease().returning(|_, _| Ok(()));
        mock.expect_delete().never();
        mock.expect_revoke()
            .withf(|l| *l == 9)
            .times(1)
            .returning(|_| Ok(()));
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        r.register().await.unwrap();
        r.deregister().await.unwrap();
        assert_eq!(r.lease(), None);
    }

    // Paused time: the heartbeat's timers fire in a fixed order, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn a_failed_deregister_keeps_the_registration_alive() {
        let mut mock = mock();
        mock.expect_grant().times(1).returning(|ttl| Ok((5, ttl)));
        mock.expect_put_many().times(1).returning(|_, _| Ok(()));
        let beats = Arc::new(AtomicUsize::new(0));
        let b = beats.clone();
        mock.expect_keep_alive().returning(move |_, _| {
            b.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        });
        mock.expect_lease_keys()
            .returning(|_| Ok(Some(vec![b"/svc/a:1".to_vec()])));
        let deletes = Arc::new(AtomicUsize::new(0));
        let d = deletes.clone();
        mock.expect_delete_many_if_lease().returning(move |_, _| {
            if d.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(Error::Watch("unavailable".into()))
            } else {
                Ok(())
            }
        });
        mock.expect_revoke().times(1).returning(|_| Ok(()));
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        r.register().await.unwrap();
        assert!(r.deregister().await.is_err());
        // The key is still there, on lease 5: it must still be kept alive.
        assert!(r.state().is_registered(), "{:?}", r.state());
        let before = beats.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(
            beats.load(Ordering::SeqCst) > before,
            "no heartbeat after a failed deregister()"
        );
        // register() on a registered service is a no-op that keeps it alive.
        r.register().await.unwrap();
        r.deregister().await.unwrap();
        assert_eq!(r.lease(), None);
    }

    /// The guard's rule, all three ways: a key deleted, or overwritten without a lease, is put
    /// back within a heartbeat; a key another lease holds is left alone (Retrying) until it is
    /// gone, then put back.
    #[tokio::test(start_paused = true)]
    async fn a_key_lost_behind_our_back_is_put_back_unless_another_lease_holds_it() {
        // What etcd holds for our key, round by round: (on our lease?, value of a get).
        let script: Arc<[(bool, Option<i64>)]> = Arc::from(vec![
            (true, None),      // registered
            (false, None),     // deleted behind our back -> put back
            (true, None),      // back
            (false, Some(0)),  // overwritten without a lease -> put back
            (true, None),      // back
            (false, Some(77)), // held by lease 77 -> left alone
            (false, Some(77)), // still held -> still left alone
            (false, None),     // lease 77's key gone -> put back
            (true, None),
        ]);
        let round = Arc::new(AtomicUsize::new(0));
        let mut mock = mock();
        mock.expect_grant().returning(|ttl| Ok((5, ttl)));
        let restores = Arc::new(Mutex::new(Vec::new()));
        let (rs, rd) = (restores.clone(), round.clone());
        mock.expect_put_many().returning(move |_, lease| {
            assert_eq!(lease, Some(5), "never overwrites on another lease");
            rs.lock().unwrap().push(rd.load(Ordering::SeqCst));
            Ok(())
        });
        mock.expect_keep_alive().returning(|_, _| Ok(true));
        let (sc, rd) = (script.clone(), round.clone());
        mock.expect_lease_keys().returning(move |_| {
            let i = rd.fetch_add(1, Ordering::SeqCst);
            let held = sc.get(i).map(|s| s.0).unwrap_or(true);
            Ok(Some(if held {
                vec![b"/svc/a:1".to_vec()]
            } else {
                vec![]
            }))
        });
        let (sc, rd) = (script.clone(), round.clone());
        mock.expect_get().returning(move |key| {
            let i = rd.load(Ordering::SeqCst) - 1;
            let lease = sc.get(i).and_then(|s| s.1);
            Ok((lease.map(|l| kv(key, l)), crate::Header::default()))
        });
        let r = EtcdRegistrar::new(Arc::new(mock), svc(true));
        r.register().await.unwrap();
        let mut states = Vec::new();
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tokio::task::yield_now().await;
            states.push(r.state());
        }
        // Puts: the registration (round 0), then after rounds 2, 4 and 8 (1-based rounds).
        assert_eq!(*restores.lock().unwrap(), vec![0, 2, 4, 8], "{states:?}");
        assert!(
            states.iter().any(|s| matches!(s, RegistrationState::Retrying(e) if e.to_string().contains("another lease"))),
            "{states:?}"
        );
        assert!(r.state().is_registered(), "{:?}", r.state());
        r.abandon();
    }
}
