//! The sd-core conformance kit, run against the in-memory backend.

use std::time::Duration;

use async_trait::async_trait;
use sd_core::testkit::Harness;
use sd_core::{Error, Instancer, Registrar, Service, TtlOption};
use sd_memory::{MemoryInstancer, MemoryRegistrar, MemoryStore};

struct MemoryHarness {
    store: MemoryStore,
}

#[async_trait]
impl Harness for MemoryHarness {
    fn ttl(&self) -> TtlOption {
        // Real time on a shared, loaded machine: 1.5 s of slack (three heartbeats) before a
        // heart-beated key could expire, as the etcd harness allows.
        TtlOption::new(Duration::from_millis(500), Duration::from_secs(2)).expect("a valid TTL")
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error> {
        Ok(Box::new(MemoryRegistrar::new(&self.store, service)?))
    }

    async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
        Ok(Box::new(MemoryInstancer::new(&self.store, prefix)?))
    }

    async fn break_store(&self) {
        self.store.set_available(false);
    }

    async fn heal_store(&self) {
        self.store.set_available(true);
    }
}

sd_core::conformance_tests!(async {
    MemoryHarness {
        store: MemoryStore::new(),
    }
});

/// The kit must be able to fail: backends broken on purpose, one way each, and the case that
/// has to catch it.
mod kit_catches {
    use std::panic::AssertUnwindSafe;
    use std::sync::Mutex;

    use futures::{FutureExt, StreamExt};
    use sd_core::testkit;
    use sd_core::{Event, EventStream, RegistrationState};

    use super::*;

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        /// Registers with a lease but never keeps it alive.
        NoHeartbeat,
        /// After `stop()`, `subscribe()` still yields the last state (tokio's `WatchStream`).
        StaleAfterStop,
        /// `break_store()` changes nothing subscribers can see.
        SilentStore,
        /// `deregister()` deletes the key but leaves the heartbeat running, which puts it back.
        BeatsAfterDeregister,
        /// The heartbeat gives up at its first failure while `state()` stays `Registered`.
        GivesUpSilently,
        /// `deregister()` deletes the key whatever value it holds now.
        DeletesAnyValue,
        /// The instancer starts a background task that `stop()` does not end.
        TaskOutlivesStop,
        /// The instancer sends an error event now and then on a healthy store.
        SpuriousErrors,
        /// After a store failure the instancer goes back to the set it had before it.
        KeepsOldSet,
        /// A prefix without its trailing `/` is accepted (with one added).
        AddsTheSlash,
        /// `register()` returns, saying `Registered`, before the key is in the store.
        RegisteredTooEarly,
        /// A second `register()` fails.
        RegistersOnce,
    }

    /// Says `Registered` at once and puts the key a moment later; or refuses a second
    /// `register()`.
    struct Hasty {
        store: MemoryStore,
        service: Service,
        fault: Fault,
        registered: Mutex<bool>,
    }

    #[async_trait]
    impl Registrar for Hasty {
        async fn register(&self) -> Result<(), Error> {
            let mut registered = self.registered.lock().unwrap();
            if *registered && self.fault == Fault::RegistersOnce {
                return Err(Error::backend_msg("already registered"));
            }
            *registered = true;
            if self.fault == Fault::RegisteredTooEarly {
                let (store, service) = (self.store.clone(), self.service.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = store.put(&service.key, &service.value);
                });
                return Ok(());
            }
            self.store.put(&self.service.key, &self.service.value)
        }
        async fn deregister(&self) -> Result<(), Error> {
            *self.registered.lock().unwrap() = false;
            self.store
                .delete_if_value(&self.service.key, &self.service.value)
                .map(drop)
        }
        fn state(&self) -> RegistrationState {
            match *self.registered.lock().unwrap() {
                true => RegistrationState::Registered,
                false => RegistrationState::Unregistered,
            }
        }
    }

    /// A registrar with its own heartbeat task, broken one of two ways.
    struct OwnBeat {
        store: MemoryStore,
        service: Service,
        /// Whether `deregister()` stops the heartbeat (`false`: `BeatsAfterDeregister`).
        stops: bool,
        task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    }

    #[async_trait]
    impl Registrar for OwnBeat {
        async fn register(&self) -> Result<(), Error> {
            let ttl = self.service.ttl.expect("the kit registers with a TTL here");
            let lease = self.store.grant(ttl.ttl())?;
            self.store
                .put_with_lease(&self.service.key, &self.service.value, Some(lease))?;
            let (store, service) = (self.store.clone(), self.service.clone());
            let beat = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl.heartbeat()).await;
                    // GivesUpSilently: the first failure ends the heartbeat, and nobody is told.
                    if store.keep_alive(lease).is_err() {
                        return;
                    }
                    // A heartbeat that re-puts its key (as some do) puts back a deleted one.
                    let _ = store.put_with_lease(&service.key, &service.value, Some(lease));
                }
            });
            *self.task.lock().unwrap() = Some(beat);
            Ok(())
        }
        async fn deregister(&self) -> Result<(), Error> {
            if self.stops {
                if let Some(task) = self.task.lock().unwrap().take() {
                    task.abort();
                }
            }
            self.store.delete(&self.service.key).map(drop)
        }
        fn state(&self) -> RegistrationState {
            RegistrationState::Registered
        }
    }

    impl Drop for OwnBeat {
        fn drop(&mut self) {
            if let Some(task) = self.task.lock().unwrap().take() {
                task.abort();
            }
        }
    }

    /// A correct registrar whose `deregister()` first deletes the key unconditionally.
    struct DeletesAny {
        store: MemoryStore,
        inner: MemoryRegistrar,
        key: String,
    }

    #[async_trait]
    impl Registrar for DeletesAny {
        async fn register(&self) -> Result<(), Error> {
            self.inner.register().await
        }
        async fn deregister(&self) -> Result<(), Error> {
            self.store.delete(&self.key)?;
            self.inner.deregister().await
        }
        fn state(&self) -> RegistrationState {
            self.inner.state()
        }
    }

    /// A correct instancer beside a task of its own that nothing ends.
    struct Leaky(MemoryInstancer);

    impl Instancer for Leaky {
        fn subscribe(&self) -> EventStream {
            self.0.subscribe()
        }
        fn stop(&self) {
            self.0.stop()
        }
    }

    /// A correct instancer's events, passed through `relay` (a task of its own) into a publisher
    /// of the wrapper's: the base of two broken instancers.
    struct Relayed {
        publisher: std::sync::Arc<sd_core::Publisher>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Relayed {
        fn new<F, Fut>(inner: MemoryInstancer, relay: F) -> Self
        where
            F: FnOnce(EventStream, std::sync::Arc<sd_core::Publisher>) -> Fut,
            Fut: std::future::Future<Output = ()> + Send + 'static,
        {
            let events = inner.subscribe();
            let publisher = std::sync::Arc::new(sd_core::Publisher::new(Event::empty()));
            let relay = relay(events, publisher.clone());
            let task = tokio::spawn(async move {
                let _inner = inner;
                relay.await
            });
            Relayed { publisher, task }
        }

        /// Adds an error event every 700 ms, each followed by the last state again.
        fn noisy(inner: MemoryInstancer) -> Self {
            Self::new(inner, |mut events, out| async move {
                let mut tick = tokio::time::interval(Duration::from_millis(700));
                let mut last = Event::empty();
                loop {
                    tokio::select! {
                        ev = events.next() => match ev {
                            Some(ev) => { last = ev.clone(); out.publish(ev); }
                            None => return,
                        },
                        _ = tick.tick() => {
                            out.publish(Event::Error(Error::backend_msg("spurious")));
                            out.publish(last.clone());
                        }
                    }
                }
            })
        }

        /// After an error event, shows the set from before the error instead of the store's.
        fn stale(inner: MemoryInstancer) -> Self {
            Self::new(inner, |mut events, out| async move {
                let mut last_good = Event::empty();
                let mut after_error = false;
                while let Some(ev) = events.next().await {
                    if ev.error().is_some() {
                        after_error = true;
                        out.publish(ev);
                    } else if after_error {
                        after_error = false;
                        out.publish(last_good.clone());
                    } else {
                        last_good = ev.clone();
                        out.publish(ev);
                    }
                }
            })
        }
    }

    impl Instancer for Relayed {
        fn subscribe(&self) -> EventStream {
            self.publisher.subscribe()
        }
        fn stop(&self) {
            self.task.abort();
            self.publisher.stop();
        }
    }

    struct Broken {
        memory: MemoryHarness,
        fault: Fault,
    }

    struct NoHeartbeat {
        store: MemoryStore,
        service: Service,
    }

    #[async_trait]
    impl Registrar for NoHeartbeat {
        async fn register(&self) -> Result<(), Error> {
            let lease = match self.service.ttl {
                Some(ttl) => Some(self.store.grant(ttl.ttl())?),
                None => None,
            };
            self.store
                .put_with_lease(&self.service.key, &self.service.value, lease)
        }
        async fn deregister(&self) -> Result<(), Error> {
            self.store.delete(&self.service.key).map(drop)
        }
        fn state(&self) -> RegistrationState {
            RegistrationState::Registered
        }
    }

    struct StaleAfterStop {
        inner: MemoryInstancer,
        last: Mutex<Option<Event>>,
    }

    impl Instancer for StaleAfterStop {
        fn subscribe(&self) -> EventStream {
            match self.last.lock().unwrap().clone() {
                Some(ev) => futures::stream::iter([ev]).boxed(),
                None => self.inner.subscribe(),
            }
        }
        fn stop(&self) {
            *self.last.lock().unwrap() = self.inner.subscribe().next().now_or_never().flatten();
            self.inner.stop();
        }
    }

    #[async_trait]
    impl Harness for Broken {
        fn ttl(&self) -> TtlOption {
            self.memory.ttl()
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(2)
        }
        async fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error> {
            let store = self.memory.store.clone();
            match self.fault {
                Fault::NoHeartbeat => Ok(Box::new(NoHeartbeat { store, service })),
                Fault::BeatsAfterDeregister | Fault::GivesUpSilently if service.ttl.is_some() => {
                    Ok(Box::new(OwnBeat {
                        store,
                        service,
                        stops: self.fault == Fault::GivesUpSilently,
                        task: Mutex::new(None),
                    }))
                }
                Fault::DeletesAnyValue => Ok(Box::new(DeletesAny {
                    inner: MemoryRegistrar::new(&store, service.clone())?,
                    store,
                    key: service.key,
                })),
                Fault::RegisteredTooEarly | Fault::RegistersOnce => Ok(Box::new(Hasty {
                    store,
                    service,
                    fault: self.fault,
                    registered: Mutex::new(false),
                })),
                _ => self.memory.registrar(service).await,
            }
        }
        async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
            match self.fault {
                Fault::StaleAfterStop => {
                    let inner = MemoryInstancer::new(&self.memory.store, prefix)?;
                    let last = Mutex::new(None);
                    Ok(Box::new(StaleAfterStop { inner, last }))
                }
                Fault::TaskOutlivesStop => {
                    let inner = MemoryInstancer::new(&self.memory.store, prefix)?;
                    tokio::spawn(async {
                        loop {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    });
                    Ok(Box::new(Leaky(inner)))
                }
                Fault::SpuriousErrors => Ok(Box::new(Relayed::noisy(MemoryInstancer::new(
                    &self.memory.store,
                    prefix,
                )?))),
                Fault::KeepsOldSet => Ok(Box::new(Relayed::stale(MemoryInstancer::new(
                    &self.memory.store,
                    prefix,
                )?))),
                Fault::AddsTheSlash if !prefix.ends_with('/') => {
                    self.memory.instancer(&format!("{prefix}/")).await
                }
                _ => self.memory.instancer(prefix).await,
            }
        }
        async fn break_store(&self) {
            if self.fault != Fault::SilentStore {
                self.memory.break_store().await;
            }
        }
        async fn heal_store(&self) {
            self.memory.heal_store().await;
        }
    }

    fn broken(fault: Fault) -> Broken {
        let store = MemoryStore::new();
        Broken {
            memory: MemoryHarness { store },
            fault,
        }
    }

    /// Runs `case` and checks that it fails naming `rule`.
    async fn fails_naming<F: std::future::Future<Output = ()>>(rule: &str, case: F) {
        let panic = match AssertUnwindSafe(case).catch_unwind().await {
            Ok(()) => panic!("the kit passed a backend that breaks `{rule}`"),
            Err(panic) => panic,
        };
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(
            message.contains(&format!("conformance rule `{rule}` violated")),
            "the kit failed, but not naming `{rule}`: {message}"
        );
    }

    /// One test per broken backend: the kit's case for the rule it breaks must fail, naming
    /// that rule.
    macro_rules! kit_fails {
        ($($test:ident: $fault:ident => $case:ident;)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let h = broken(Fault::$fault);
                let rule = stringify!($case);
                fails_naming(rule, testkit::check(rule, testkit::$case(&h))).await;
            }
        )*};
    }

    kit_fails! {
        a_registrar_that_never_heartbeats: NoHeartbeat => ttl_expiry_removes_crashed_instance;
        a_stream_after_stop_that_yields_the_last_state: StaleAfterStop => stop_ends_all_streams;
        a_store_failure_subscribers_never_hear_of: SilentStore => store_error_reaches_subscribers;
        a_heartbeat_that_outlives_deregister: BeatsAfterDeregister => deregister_is_final;
        a_heartbeat_that_gives_up_silently: GivesUpSilently => failing_heartbeat_is_reported;
        a_deregister_that_deletes_another_registrars_value: DeletesAnyValue => deregister_removes_only_our_value;
        a_task_that_outlives_stop: TaskOutlivesStop => stop_ends_background_work;
        spurious_error_events: SpuriousErrors => no_spurious_events;
        an_instancer_that_keeps_its_old_set_after_a_failure: KeepsOldSet => healed_store_is_reread;
        a_prefix_without_its_slash_accepted: AddsTheSlash => prefix_must_end_in_slash;
        registered_before_the_key_is_readable: RegisteredTooEarly => registered_means_readable;
        a_second_register_that_fails: RegistersOnce => register_is_idempotent;
    }
}
