//! [`EtcdRegistrar`]: one service's key in etcd, kept alive by a lease of its own.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sd_core::{RegistrationState, Service};
use tokio::task::JoinHandle;

use crate::{Client, Error, EtcdClient};

/// Registers a [`Service`] in etcd (go-kit's `etcdv3.Registrar`).
///
/// Without a TTL it is a plain put (and delete on deregister). With a TTL it grants a lease of
/// its own (TTL rounded *up* to whole seconds, as etcd counts them), puts the key on it, and
/// refreshes the lease every heartbeat in a background task, each round bounded by the
/// heartbeat. When etcd says the lease is gone (expired while the registrar was cut off, or
/// revoked), it grants a new one and puts the key again, retrying with a backoff capped at the
/// heartbeat; [`state`](sd_core::Registrar::state) reports `Retrying(error)` meanwhile.
///
/// `register()` returns the error of its first attempt (an empty key or value, etcd
/// unreachable, ...) and then leaves nothing running: call it again. Once registered, failures
/// are retried in the background and reported through `state()`.
///
/// [`deregister`](sd_core::Registrar::deregister) deletes the key only if it still carries this
/// registrar's lease (another process may have taken it over), then revokes the lease. Dropping
/// the registrar stops the heartbeat and revokes the lease in the background (best effort,
/// unless [`with_revoke_on_drop(false)`](Self::with_revoke_on_drop)); [`abandon`](Self::abandon)
/// stops heart-beating without revoking, as a crashed process would.
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
pub struct EtcdRegistrar<C: Client = EtcdClient> {
    shared: Arc<Shared<C>>,
    /// Serialises `register` and `deregister`.
    op: tokio::sync::Mutex<()>,
    task: Mutex<Option<JoinHandle<()>>>,
    revoke_on_drop: bool,
}

struct Shared<C> {
    client: C,
    service: Service,
    state: Mutex<RegistrationState>,
    /// Whether the key was put (and not yet deleted) by this registrar.
    registered: Mutex<bool>,
    /// The lease the key is on, with a TTL.
    lease: Mutex<Option<i64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Values behind these locks are replaced whole, so a poisoned lock still holds valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C: Client> Shared<C> {
    fn set_state(&self, s: RegistrationState) {
        *lock(&self.state) = s;
    }
    fn lease(&self) -> Option<i64> {
        *lock(&self.lease)
    }
}

impl<C: Client> fmt::Debug for EtcdRegistrar<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistrar")
            .field("service", &self.shared.service)
            .field("state", &*lock(&self.shared.state))
            .field("lease", &self.shared.lease())
            .finish()
    }
}

/// The TTL in whole seconds, rounded up.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

impl<C: Client> EtcdRegistrar<C> {
    /// A registrar for `service` (not yet registered: call `register()`).
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) -> Result<(), sd_core::Error> {
    /// let svc = sd_core::Service::new("/services/foo/a:1", "a:1")?;
    /// let registrar = sd_etcd::EtcdRegistrar::new(client, svc);
    /// # let _ = registrar; Ok(()) }
    /// ```
    pub fn new(client: C, service: Service) -> Self {
        EtcdRegistrar {
            shared: Arc::new(Shared {
                client,
                service,
                state: Mutex::new(RegistrationState::Unregistered),
                registered: Mutex::new(false),
                lease: Mutex::new(None),
            }),
            op: tokio::sync::Mutex::new(()),
            task: Mutex::new(None),
            revoke_on_drop: true,
        }
    }

    /// Whether dropping the registrar revokes its lease (default `true`). With `false`, a
    /// dropped registrar's key lives until its TTL runs out, like a crashed process's.
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

    /// The service this registrar publishes.
    ///
    /// ```no_run
    /// # fn f(r: &sd_etcd::EtcdRegistrar) {
    /// println!("{}", r.service().key);
    /// # }
    /// ```
    pub fn service(&self) -> &Service {
        &self.shared.service
    }

    /// The lease the key is on (with a TTL, once registered).
    ///
    /// ```no_run
    /// # fn f(r: &sd_etcd::EtcdRegistrar) {
    /// if let Some(lease) = r.lease() { println!("lease {lease:x}"); }
    /// # }
    /// ```
    pub fn lease(&self) -> Option<i64> {
        self.shared.lease()
    }

    /// Stops heart-beating without deleting the key or revoking the lease, as a crashed process
    /// would: the key expires at its TTL.
    ///
    /// ```no_run
    /// # fn f(r: sd_etcd::EtcdRegistrar) {
    /// r.abandon();
    /// # }
    /// ```
    pub fn abandon(mut self) {
        self.revoke_on_drop = false;
        self.stop_task();
    }

    fn stop_task(&self) -> Option<JoinHandle<()>> {
        let task = lock(&self.task).take();
        if let Some(t) = &task {
            t.abort();
        }
        task
    }

    fn check(&self) -> Result<(), Error> {
        let svc = &self.shared.service;
        if svc.key.is_empty() {
            return Err(Error::NoKey);
        }
        if svc.value.is_empty() {
            return Err(Error::NoValue);
        }
        Ok(())
    }

    async fn do_register(&self) -> Result<(), Error> {
        self.check()?;
        let _op = self.op.lock().await;
        let shared = &self.shared;
        let svc = &shared.service;
        if *lock(&shared.registered) {
            // Already registered; make sure the key is kept alive.
            self.ensure_heartbeat();
            return Ok(());
        }
        match svc.ttl {
            None => {
                shared.client.put(&svc.key, &svc.value, None).await?;
            }
            Some(ttl) => {
                let secs = ttl_secs(ttl.ttl());
                let lease = grant_and_put(shared, secs, ttl.heartbeat()).await?;
                *lock(&shared.lease) = Some(lease);
                let task = tokio::spawn(heartbeat(shared.clone(), ttl.heartbeat(), secs));
                if let Some(old) = lock(&self.task).replace(task) {
                    old.abort();
                }
            }
        }
        *lock(&shared.registered) = true;
        shared.set_state(RegistrationState::Registered);
        tracing::debug!(key = %svc.key, lease = ?shared.lease(), "registered");
        Ok(())
    }

    /// Starts the heartbeat of a registered, leased service if it is not running.
    fn ensure_heartbeat(&self) {
        let Some(ttl) = self.shared.service.ttl else {
            return;
        };
        let mut task = lock(&self.task);
        if task.as_ref().is_none_or(JoinHandle::is_finished) {
            *task = Some(tokio::spawn(heartbeat(
                self.shared.clone(),
                ttl.heartbeat(),
                ttl_secs(ttl.ttl()),
            )));
        }
    }

    async fn do_deregister(&self) -> Result<(), Error> {
        let _op = self.op.lock().await;
        if let Some(task) = self.stop_task() {
            // Wait until it is gone, so it cannot put the key back after our delete.
            let _ = task.await;
        }
        let shared = &self.shared;
        if !*lock(&shared.registered) {
            shared.set_state(RegistrationState::Unregistered);
            return Ok(());
        }
        let key = &shared.service.key;
        let lease = shared.lease();
        let deleted = match lease {
            Some(lease) => shared
                .client
                .delete_if_lease(key, lease)
                .await
                .map(|deleted| {
                    if !deleted {
                        tracing::debug!(%key, "key no longer on our lease: left alone");
                    }
                }),
            None => shared.client.delete(key).await,
        };
        if let Err(e) = deleted {
            // Nothing changed in etcd: the registration stays, kept alive, and the caller may
            // try again.
            self.ensure_heartbeat();
            return Err(e);
        }
        if let Some(lease) = lease {
            // The key is gone; a lease that outlives it holds nothing and expires at its TTL.
            if let Err(e) = shared.client.revoke(lease).await {
                tracing::warn!(%key, lease, error = %e, "revoking the lease failed; it expires at its TTL");
            }
        }
        *lock(&shared.lease) = None;
        *lock(&shared.registered) = false;
        shared.set_state(RegistrationState::Unregistered);
        tracing::debug!(%key, "deregistered");
        Ok(())
    }
}

/// Grants a lease and puts the key on it; revokes the lease if the put fails.
async fn grant_and_put<C: Client>(
    shared: &Shared<C>,
    secs: i64,
    heartbeat: Duration,
) -> Result<i64, Error> {
    let (lease, granted) = shared.client.grant(secs).await?;
    // Recorded at once: a registrar stopped between the grant and the put (deregister() aborts
    // a heartbeat re-granting a lost lease; drop does too) must still delete its key from, and
    // revoke, this lease, not the one it replaces.
    let previous = lock(&shared.lease).replace(lease);
    let failed = |e: Error| async move {
        let _ = shared.client.revoke(lease).await;
        *lock(&shared.lease) = previous;
        Err(e)
    };
    if granted > 0 && Duration::from_secs(granted.unsigned_abs()) <= heartbeat {
        return failed(Error::InvalidTtl(format!(
            "etcd granted a TTL of {granted}s, not above the heartbeat {heartbeat:?}: \
             use a longer TTL"
        )))
        .await;
    }
    let svc = &shared.service;
    if let Err(e) = shared.client.put(&svc.key, &svc.value, Some(lease)).await {
        return failed(e).await;
    }
    Ok(lease)
}

/// Exponential backoff from 100 ms, capped, with jitter.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(16));
    let d = base.min(cap);
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Keeps the lease alive; re-grants and re-puts when etcd says it is gone.
async fn heartbeat<C: Client>(shared: Arc<Shared<C>>, every: Duration, secs: i64) {
    let key = shared.service.key.clone();
    let mut delay = every;
    let mut failures = 0u32;
    let mut lost = false;
    loop {
        tokio::time::sleep(delay).await;
        if lost {
            match tokio::time::timeout(every.max(Duration::from_secs(1)) * 2, async {
                grant_and_put(&shared, secs, every).await
            })
            .await
            {
                Ok(Ok(lease)) => {
                    tracing::info!(%key, lease, "lease re-granted and key put again");
                    *lock(&shared.lease) = Some(lease);
                    shared.set_state(RegistrationState::Registered);
                    lost = false;
                    failures = 0;
                    delay = every;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%key, error = %e, "re-registering failed; retrying");
                    shared.set_state(RegistrationState::Retrying(e.into()));
                    failures += 1;
                    delay = backoff(failures, every);
                }
                Err(_) => {
                    shared.set_state(RegistrationState::Retrying(sd_core::Error::Timeout(
                        every * 2,
                    )));
                    failures += 1;
                    delay = backoff(failures, every);
                }
            }
            continue;
        }
        let Some(lease) = shared.lease() else { return };
        match tokio::time::timeout(every, shared.client.keep_alive(lease)).await {
            Ok(Ok(ttl)) if ttl > 0 => {
                if failures > 0 {
                    tracing::info!(%key, "heartbeat recovered");
                }
                shared.set_state(RegistrationState::Registered);
                failures = 0;
                delay = every;
            }
            Ok(Ok(_)) | Ok(Err(Error::LeaseNotFound(_))) => {
                tracing::warn!(%key, lease, "etcd lost the lease; granting a new one");
                shared.set_state(RegistrationState::Retrying(
                    Error::LeaseNotFound(lease).into(),
                ));
                lost = true;
                delay = Duration::ZERO;
            }
            Ok(Err(e)) => {
                tracing::warn!(%key, error = %e, "heartbeat failed; retrying");
                shared.set_state(RegistrationState::Retrying(e.into()));
                failures += 1;
                delay = backoff(failures, every);
            }
            Err(_) => {
                tracing::warn!(%key, "heartbeat timed out; retrying");
                shared.set_state(RegistrationState::Retrying(sd_core::Error::Timeout(every)));
                failures += 1;
                delay = backoff(failures, every);
            }
        }
    }
}

#[async_trait]
impl<C: Client> sd_core::Registrar for EtcdRegistrar<C> {
    async fn register(&self) -> Result<(), sd_core::Error> {
        self.do_register().await.map_err(Into::into)
    }

    async fn deregister(&self) -> Result<(), sd_core::Error> {
        self.do_deregister().await.map_err(Into::into)
    }

    fn state(&self) -> RegistrationState {
        lock(&self.shared.state).clone()
    }
}

impl<C: Client> Drop for EtcdRegistrar<C> {
    fn drop(&mut self) {
        self.stop_task();
        if !self.revoke_on_drop {
            return;
        }
        // A lease without a registration is one a canceled register() granted: revoke it too.
        let Some(lease) = self.shared.lease() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move {
                if let Err(e) = shared.client.revoke(lease).await {
                    tracing::debug!(error = %e, lease, "best-effort revoke on drop failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockClient;
    use sd_core::{Registrar, TtlOption};
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    fn svc(ttl: bool) -> Service {
        let s = Service::new("/svc/a:1", "a:1").unwrap();
        if ttl {
            s.with_ttl(
                TtlOption::new(Duration::from_millis(500), Duration::from_millis(1500)).unwrap(),
            )
        } else {
            s
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
        let mock = MockClient::new();
        let r = EtcdRegistrar::new(
            mock,
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
        let mut mock = MockClient::new();
        mock.expect_put()
            .withf(|k, v, l| k == "/svc/a:1" && v == "a:1" && l.is_none())
            .times(1)
            .returning(|_, _, _| Ok(()));
        mock.expect_delete().times(1).returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(false));
        r.register().await.unwrap();
        r.register().await.unwrap();
        assert!(r.state().is_registered());
        r.deregister().await.unwrap();
        r.deregister().await.unwrap();
        assert!(!r.state().is_registered());
    }

    #[tokio::test]
    async fn failed_put_revokes_the_new_lease_and_reports() {
        let mut mock = MockClient::new();
        mock.expect_grant().returning(|ttl| Ok((7, ttl)));
        mock.expect_put().returning(|_, _, _| {
            Err(Error::Timeout {
                op: "put",
                after: Duration::from_secs(5),
            })
        });
        mock.expect_revoke()
            .withf(|l| *l == 7)
            .times(1)
            .returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(true));
        assert!(r.register().await.is_err());
        assert!(!r.state().is_registered());
    }

    // Paused time: the heartbeat's timers fire in a fixed order, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn lost_lease_is_regranted_and_key_put_again() {
        let mut mock = MockClient::new();
        let next_lease = Arc::new(AtomicI64::new(1));
        let n = next_lease.clone();
        mock.expect_grant()
            .returning(move |ttl| Ok((n.fetch_add(1, Ordering::SeqCst), ttl)));
        let puts = Arc::new(AtomicUsize::new(0));
        let p = puts.clone();
        mock.expect_put().returning(move |_, _, lease| {
            p.fetch_add(1, Ordering::SeqCst);
            assert!(lease.is_some());
            Ok(())
        });
        // Lease 1 is lost at once; lease 2 stays alive.
        mock.expect_keep_alive()
            .returning(|lease| Ok(if lease == 1 { 0 } else { 2 }));
        mock.expect_delete_if_lease()
            .withf(|_, l| *l == 2)
            .returning(|_, _| Ok(true));
        mock.expect_revoke()
            .withf(|l| *l == 2)
            .returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(true));
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
        let mut mock = MockClient::new();
        mock.expect_grant().returning(|ttl| Ok((5, ttl)));
        mock.expect_put().returning(|_, _, _| Ok(()));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        mock.expect_keep_alive().returning(move |_| {
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Error::Watch("connection reset".into()))
            } else {
                Ok(2)
            }
        });
        mock.expect_revoke().returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(true));
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
        // Dropping revokes in the background.
        drop(r);
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn deregister_leaves_a_key_taken_over_by_another_lease() {
        let mut mock = MockClient::new();
        mock.expect_grant().returning(|ttl| Ok((9, ttl)));
        mock.expect_put().returning(|_, _, _| Ok(()));
        mock.expect_keep_alive().returning(|_| Ok(2));
        mock.expect_delete_if_lease().returning(|_, _| Ok(false));
        mock.expect_delete().never();
        mock.expect_revoke()
            .withf(|l| *l == 9)
            .times(1)
            .returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(true));
        r.register().await.unwrap();
        r.deregister().await.unwrap();
        assert_eq!(r.lease(), None);
    }

    // Paused time: the heartbeat's timers fire in a fixed order, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn a_failed_deregister_keeps_the_registration_alive() {
        let mut mock = MockClient::new();
        mock.expect_grant().times(1).returning(|ttl| Ok((5, ttl)));
        mock.expect_put().times(1).returning(|_, _, _| Ok(()));
        let beats = Arc::new(AtomicUsize::new(0));
        let b = beats.clone();
        mock.expect_keep_alive().returning(move |_| {
            b.fetch_add(1, Ordering::SeqCst);
            Ok(2)
        });
        let deletes = Arc::new(AtomicUsize::new(0));
        let d = deletes.clone();
        mock.expect_delete_if_lease().returning(move |_, _| {
            if d.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(Error::Watch("unavailable".into()))
            } else {
                Ok(true)
            }
        });
        mock.expect_revoke().times(1).returning(|_| Ok(()));
        let r = EtcdRegistrar::new(mock, svc(true));
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
        let before = beats.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(beats.load(Ordering::SeqCst) > before);
        r.deregister().await.unwrap();
        assert_eq!(r.lease(), None);
    }

    /// A client whose `put` on one lease never answers (mockall's answers are synchronous, so
    /// it cannot leave a call in flight by itself).
    struct StalledPut {
        inner: MockClient,
        lease: i64,
        entered: Arc<tokio::sync::Notify>,
    }

    #[async_trait]
    impl Client for StalledPut {
        async fn get_prefix(&self, p: &str) -> Result<(Vec<crate::KeyValue>, i64), Error> {
            self.inner.get_prefix(p).await
        }
        async fn watch_prefix(&self, p: &str, rev: i64) -> Result<crate::WatchStream, Error> {
            self.inner.watch_prefix(p, rev).await
        }
        async fn grant(&self, ttl: i64) -> Result<(i64, i64), Error> {
            self.inner.grant(ttl).await
        }
        async fn keep_alive(&self, lease: i64) -> Result<i64, Error> {
            self.inner.keep_alive(lease).await
        }
        async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), Error> {
            if lease == Some(self.lease) {
                self.entered.notify_one();
                std::future::pending::<()>().await;
            }
            self.inner.put(key, value, lease).await
        }
        async fn delete_if_lease(&self, key: &str, lease: i64) -> Result<bool, Error> {
            self.inner.delete_if_lease(key, lease).await
        }
        async fn delete(&self, key: &str) -> Result<(), Error> {
            self.inner.delete(key).await
        }
        async fn revoke(&self, lease: i64) -> Result<(), Error> {
            self.inner.revoke(lease).await
        }
    }

    /// deregister() while the heartbeat re-grants a lost lease (granted, key not yet put):
    /// the new lease is the one revoked, so neither it nor the key outlives the registrar.
    #[tokio::test]
    async fn deregister_during_a_regrant_revokes_the_new_lease() {
        let mut mock = MockClient::new();
        let next = Arc::new(AtomicI64::new(1));
        let n = next.clone();
        mock.expect_grant()
            .times(2)
            .returning(move |ttl| Ok((n.fetch_add(1, Ordering::SeqCst), ttl)));
        mock.expect_put()
            .withf(|_, _, l| *l == Some(1))
            .times(1)
            .returning(|_, _, _| Ok(()));
        mock.expect_keep_alive()
            .withf(|l| *l == 1)
            .returning(|_| Ok(0));
        mock.expect_delete_if_lease()
            .withf(|_, l| *l == 2)
            .times(1)
            .returning(|_, _| Ok(true));
        mock.expect_revoke()
            .withf(|l| *l == 2)
            .times(1)
            .returning(|_| Ok(()));
        let entered = Arc::new(tokio::sync::Notify::new());
        let client = StalledPut {
            inner: mock,
            lease: 2,
            entered: entered.clone(),
        };
        let r = EtcdRegistrar::new(client, svc(true));
        r.register().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), entered.notified())
            .await
            .expect("the heartbeat re-grants the lost lease");
        r.deregister().await.unwrap();
        assert_eq!(r.lease(), None);
    }

    #[tokio::test]
    async fn failed_deregister_can_be_retried() {
        let mut mock = MockClient::new();
        mock.expect_put().returning(|_, _, _| Ok(()));
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        mock.expect_delete().returning(move |_| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(Error::Watch("unavailable".into()))
            } else {
                Ok(())
            }
        });
        let r = EtcdRegistrar::new(mock, svc(false));
        r.register().await.unwrap();
        assert!(r.deregister().await.is_err());
        r.deregister().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_revoke_after_the_delete_still_deregisters() {
        let mut mock = MockClient::new();
        mock.expect_grant().times(1).returning(|ttl| Ok((7, ttl)));
        mock.expect_put().times(1).returning(|_, _, _| Ok(()));
        mock.expect_keep_alive().returning(|_| Ok(2));
        mock.expect_delete_if_lease()
            .times(1)
            .returning(|_, _| Ok(true));
        mock.expect_revoke()
            .times(1)
            .returning(|_| Err(Error::Watch("unavailable".into())));
        let r = EtcdRegistrar::new(mock, svc(true)).with_revoke_on_drop(false);
        r.register().await.unwrap();
        r.deregister().await.unwrap();
        assert!(!r.state().is_registered(), "{:?}", r.state());
        assert_eq!(r.lease(), None);
        r.deregister().await.unwrap();
    }
}
