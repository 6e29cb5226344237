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
        TtlOption::new(Duration::from_millis(500), Duration::from_millis(1200))
            .expect("a valid TTL")
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
