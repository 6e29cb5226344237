//! Watching a prefix of a [`MemoryStore`].

use std::fmt;
use std::sync::Arc;

use sd_core::{Error, EventStream, Instancer};

use crate::store::{MemoryStore, Watcher};

/// An [`Instancer`] over a prefix of a [`MemoryStore`]: every change under the prefix is
/// published to subscribers at once.
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{Event, Instancer};
/// use sd_memory::{MemoryInstancer, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MemoryStore::new();
/// store.put("/svc/a/1", "127.0.0.1:1").unwrap();
/// let instancer = MemoryInstancer::new(&store, "/svc/a/").unwrap();
/// let mut events = instancer.subscribe();
/// assert_eq!(events.next().await, Some(Event::from_instances(["127.0.0.1:1"])));
/// assert!(MemoryInstancer::new(&store, "/svc/a").is_err(), "a prefix must end in /");
/// # }
/// ```
pub struct MemoryInstancer {
    watcher: Arc<Watcher>,
}

impl fmt::Debug for MemoryInstancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryInstancer")
            .field("prefix", &self.watcher.prefix)
            .field("current", &self.watcher.publisher.current())
            .finish()
    }
}

impl MemoryInstancer {
    /// Watches `prefix`, which must end in `/` (so `/svc/a/` never sees `/svc/ab/...`).
    /// Fails if the store is unavailable or a failure was injected.
    ///
    /// ```
    /// use sd_memory::{MemoryInstancer, MemoryStore};
    ///
    /// let store = MemoryStore::new();
    /// assert!(MemoryInstancer::new(&store, "/svc/a/").is_ok());
    /// assert!(MemoryInstancer::new(&store, "/svc/a").is_err());
    /// ```
    pub fn new(store: &MemoryStore, prefix: &str) -> Result<Self, Error> {
        if !prefix.ends_with('/') {
            return Err(Error::invalid_argument(format!(
                "prefix {prefix:?} must end in '/', or it would also match longer names \
                 (use {:?})",
                format!("{prefix}/")
            )));
        }
        Ok(MemoryInstancer {
            watcher: store.watch(prefix)?,
        })
    }

    /// The watched prefix.
    ///
    /// ```
    /// # use sd_memory::{MemoryInstancer, MemoryStore};
    /// let instancer = MemoryInstancer::new(&MemoryStore::new(), "/svc/a/").unwrap();
    /// assert_eq!(instancer.prefix(), "/svc/a/");
    /// ```
    pub fn prefix(&self) -> &str {
        &self.watcher.prefix
    }

    /// How many stored values this instancer has skipped because they were not instances
    /// (JSON that is invalid or has no address, see [`sd_core::ValueFormat`]). Each is logged
    /// with its key; the other keys are unaffected.
    ///
    /// ```
    /// use futures::StreamExt;
    /// use sd_core::Instancer;
    /// use sd_memory::{MemoryInstancer, MemoryStore};
    ///
    /// # futures::executor::block_on(async {
    /// let store = MemoryStore::new();
    /// store.put("/svc/a", r#"{"addr":"10.0.0.1:80","weight":2}"#).unwrap();
    /// store.put("/svc/b", r#"{"addr": oops"#).unwrap();
    /// let instancer = MemoryInstancer::new(&store, "/svc/").unwrap();
    /// let first = instancer.subscribe().next().await.unwrap();
    /// let set = first.instances().unwrap();
    /// assert_eq!(set.iter().map(|i| (i.addr(), i.weight())).collect::<Vec<_>>(), [("10.0.0.1:80", 2)]);
    /// assert_eq!(instancer.invalid_values(), 1);
    /// # });
    /// ```
    pub fn invalid_values(&self) -> u64 {
        self.watcher.invalid_values()
    }
}

impl Instancer for MemoryInstancer {
    fn subscribe(&self) -> EventStream {
        self.watcher.publisher.subscribe()
    }

    fn stop(&self) {
        self.watcher.publisher.stop();
    }
}

impl Drop for MemoryInstancer {
    fn drop(&mut self) {
        self.stop();
    }
}
