//! Registering a service in a [`MemoryStore`].

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use sd_core::{Error, Registrar, RegistrationState, Service, TtlOption};
use tokio::task::JoinHandle;
use tokio::time::{interval, MissedTickBehavior};
use tracing::Instrument;

use crate::store::{is_lease_not_found, LeaseId, MemoryStore};

/// A [`Registrar`] for a [`MemoryStore`], with etcd's behaviour: with a TTL it grants a lease,
/// puts the key on it and keeps it alive every heartbeat, re-granting and re-putting if the lease
/// was lost (e.g. the store was down for longer than the TTL).
///
/// Dropping it without [`deregister`](Registrar::deregister) stops the heartbeats but leaves the
/// key, which then expires at its TTL: what a crashed process does.
///
/// ```
/// use std::time::Duration;
/// use sd_core::{Registrar, Service, TtlOption};
/// use sd_memory::{MemoryRegistrar, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sd_core::Error> {
/// let store = MemoryStore::new();
/// let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3))?;
/// let svc = Service::new("/services/bar/127.0.0.1:80", "127.0.0.1:80")?.with_ttl(ttl);
/// let registrar = MemoryRegistrar::new(&store, svc)?;
/// registrar.register().await?;
/// assert_eq!(store.get_prefix("/services/bar/")?.len(), 1);
/// registrar.deregister().await?;
/// assert!(store.get_prefix("/services/bar/")?.is_empty());
/// # Ok(())
/// # }
/// ```
pub struct MemoryRegistrar {
    store: MemoryStore,
    service: Service,
    inner: Arc<Mutex<RegState>>,
}

impl fmt::Debug for MemoryRegistrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistrar")
            .field("service", &self.service)
            .field("state", &self.state())
            .finish()
    }
}

struct RegState {
    state: RegistrationState,
    lease: Option<LeaseId>,
    heartbeat: Option<JoinHandle<()>>,
    registered: bool,
}

fn lock(m: &Mutex<RegState>) -> MutexGuard<'_, RegState> {
    // Every critical section leaves the state whole, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryRegistrar {
    /// A registrar for `service` (checked: non-empty key and value). Nothing is written until
    /// [`register`](Registrar::register).
    ///
    /// ```
    /// use sd_core::{Registrar, Service};
    /// use sd_memory::{MemoryRegistrar, MemoryStore};
    ///
    /// let store = MemoryStore::new();
    /// let svc = Service::new("/svc/a/1", "a:1").unwrap();
    /// let registrar = MemoryRegistrar::new(&store, svc).unwrap();
    /// assert!(!registrar.state().is_registered());
    /// assert!(store.get_prefix("/svc/").unwrap().is_empty(), "nothing written yet");
    /// ```
    pub fn new(store: &MemoryStore, service: Service) -> Result<Self, Error> {
        service.validate()?;
        Ok(MemoryRegistrar {
            store: store.clone(),
            service,
            inner: Arc::new(Mutex::new(RegState {
                state: RegistrationState::Unregistered,
                lease: None,
                heartbeat: None,
                registered: false,
            })),
        })
    }

    /// The service this registrar registers.
    ///
    /// ```
    /// use sd_core::Service;
    /// use sd_memory::{MemoryRegistrar, MemoryStore};
    ///
    /// let svc = Service::new("/svc/a/1", "a:1").unwrap();
    /// let registrar = MemoryRegistrar::new(&MemoryStore::new(), svc.clone()).unwrap();
    /// assert_eq!(registrar.service(), &svc);
    /// ```
    pub fn service(&self) -> &Service {
        &self.service
    }
}

/// Grants a lease and puts the key on it.
fn put_leased(store: &MemoryStore, service: &Service, ttl: TtlOption) -> Result<LeaseId, Error> {
    let lease = store.grant(ttl.ttl())?;
    if let Err(e) = store.put_with_lease(&service.key, &service.value, Some(lease)) {
        // Best effort: an orphaned lease would expire on its own anyway.
        let _ = store.revoke(lease);
        return Err(e);
    }
    Ok(lease)
}

async fn heartbeat(
    store: MemoryStore,
    service: Service,
    ttl: TtlOption,
    inner: Arc<Mutex<RegState>>,
) {
    let mut ticks = interval(ttl.heartbeat());
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    // Whether the last round failed: a failing store is one warning when it starts and one line
    // when it is over, not a warning per heartbeat.
    let mut failing = false;
    loop {
        ticks.tick().await;
        // The whole round runs under the registrar's lock (store calls are synchronous), so a
        // concurrent `deregister()` never interleaves with a re-grant and leaves a fresh lease
        // and key behind.
        let mut st = lock(&inner);
        let Some(lease) = st.lease else {
            return;
        };
        let result = match store.keep_alive(lease) {
            Err(e) if is_lease_not_found(&e) => {
                tracing::warn!("lease lost: registering again");
                put_leased(&store, &service, ttl).map(|new| {
                    st.lease = Some(new);
                })
            }
            other => other,
        };
        match result {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("registration recovered");
                }
                st.state = RegistrationState::Registered;
            }
            Err(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %sd_core::Report(&e), "heartbeat still failing");
                } else {
                    tracing::warn!(error = %sd_core::Report(&e), "heartbeat failed; retrying every heartbeat");
                }
                st.state = RegistrationState::Retrying(e);
            }
        }
    }
}

#[async_trait]
impl Registrar for MemoryRegistrar {
    async fn register(&self) -> Result<(), Error> {
        // Held throughout (nothing here awaits): two concurrent calls must not both register
        // and leave a second, unowned heartbeat task running.
        let mut st = lock(&self.inner);
        if st.registered {
            return Ok(());
        }
        let lease = match self.service.ttl {
            None => {
                self.store.put(&self.service.key, &self.service.value)?;
                None
            }
            Some(ttl) => Some(put_leased(&self.store, &self.service, ttl)?),
        };
        st.lease = lease;
        st.registered = true;
        st.state = RegistrationState::Registered;
        if let Some(ttl) = self.service.ttl {
            // At ERROR level, so a filter that lets warnings through keeps the key they are about.
            let span = tracing::error_span!("memory_registrar", key = %self.service.key);
            st.heartbeat = Some(tokio::spawn(
                heartbeat(
                    self.store.clone(),
                    self.service.clone(),
                    ttl,
                    self.inner.clone(),
                )
                .instrument(span),
            ));
        }
        Ok(())
    }

    async fn deregister(&self) -> Result<(), Error> {
        let (task, lease) = {
            let mut st = lock(&self.inner);
            if !st.registered {
                return Ok(());
            }
            // Delete before stopping the heartbeats: if the delete fails, the registration is
            // still whole and kept alive, and a later `deregister()` can try again.
            match st.lease {
                Some(lease) => self.store.delete_if_lease(&self.service.key, lease)?,
                None => self
                    .store
                    .delete_if_value(&self.service.key, &self.service.value)?,
            };
            st.registered = false;
            st.state = RegistrationState::Unregistered;
            (st.heartbeat.take(), st.lease.take())
        };
        if let Some(task) = task {
            task.abort();
        }
        if let Some(lease) = lease {
            // The key is gone; a lease left behind by a failed revoke expires at its TTL.
            self.store.revoke(lease)?;
        }
        Ok(())
    }

    fn state(&self) -> RegistrationState {
        lock(&self.inner).state.clone()
    }
}

impl Drop for MemoryRegistrar {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.inner).heartbeat.take() {
            task.abort();
        }
    }
}
