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
            if self.fault == Fault::NoHeartbeat {
                let store = self.memory.store.clone();
                return Ok(Box::new(NoHeartbeat { store, service }));
            }
            self.memory.registrar(service).await
        }
        async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
            if self.fault == Fault::StaleAfterStop {
                let inner = MemoryInstancer::new(&self.memory.store, prefix)?;
                let last = Mutex::new(None);
                return Ok(Box::new(StaleAfterStop { inner, last }));
            }
            self.memory.instancer(prefix).await
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

    async fn fails<F: std::future::Future<Output = ()>>(case: F) -> bool {
        AssertUnwindSafe(case).catch_unwind().await.is_err()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registrar_that_never_heartbeats() {
        let h = broken(Fault::NoHeartbeat);
        assert!(fails(testkit::ttl_expiry_removes_crashed_instance(&h)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_after_stop_that_yields_the_last_state() {
        let h = broken(Fault::StaleAfterStop);
        assert!(fails(testkit::stop_ends_all_streams(&h)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_failure_subscribers_never_hear_of() {
        let h = broken(Fault::SilentStore);
        assert!(fails(testkit::store_error_reaches_subscribers(&h)).await);
    }
}
