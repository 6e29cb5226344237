use std::sync::Arc;

use crate::{Endpointer, Instance, Slots, Snapshot};

/// An endpointer over a list that never changes, for static configuration and tests.
///
/// ```
/// use sd_core::{Endpointer, FixedEndpointer};
///
/// let e = FixedEndpointer::new(vec!["127.0.0.1:8080", "127.0.0.1:8081"]);
/// assert_eq!(e.endpoints().unwrap().len(), 2);
/// ```
#[derive(Debug)]
pub struct FixedEndpointer<E> {
    snapshot: Arc<Snapshot<E>>,
}

impl<E> FixedEndpointer<E> {
    /// Serves `endpoints` for ever.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// let e = FixedEndpointer::new(vec!["a:1"]);
    /// assert_eq!(e.version(), 0);
    /// assert_eq!(e.endpoints().unwrap(), ["a:1"]);
    /// ```
    pub fn new(endpoints: Vec<E>) -> Self {
        let instances: Slots<Instance> = (0..endpoints.len()).map(|_| Instance::new("")).collect();
        FixedEndpointer {
            snapshot: Arc::new(Snapshot::new(0, instances, Slots::from(endpoints), None)),
        }
    }
}

impl<E: Send + Sync> Endpointer<E> for FixedEndpointer<E> {
    fn version(&self) -> u64 {
        0
    }
    fn snapshot(&self) -> Arc<Snapshot<E>> {
        self.snapshot.clone()
    }
}
