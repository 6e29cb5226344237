//! Endpoint sets: the [`Endpointer`] trait, its [`Snapshot`], the live [`DefaultEndpointer`] and
//! the static [`FixedEndpointer`].

mod default;
mod fixed;

use std::sync::Arc;

pub use default::{DefaultEndpointer, EndpointerOptions};
pub use fixed::FixedEndpointer;

use crate::{Error, Instance};

/// One consistent view of an endpointer: its endpoints, the instances they were made for (same
/// order), the error that is current, and a version that changes whenever any of them does.
///
/// ```
/// use sd_core::{Endpointer, FixedEndpointer};
///
/// let e = FixedEndpointer::new(vec!["a", "b"]);
/// let snap = e.snapshot();
/// assert_eq!(&snap.endpoints()[..], &["a", "b"]);
/// assert!(snap.error().is_none());
/// ```
#[derive(Debug)]
pub struct Snapshot<E> {
    version: u64,
    instances: Arc<[Instance]>,
    endpoints: Arc<[E]>,
    error: Option<Arc<Error>>,
}

impl<E> Snapshot<E> {
    /// A snapshot; `instances` and `endpoints` must have the same length and order (an endpoint
    /// without an instance gets an empty one).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::{Instance, Snapshot};
    ///
    /// let instances: Arc<[Instance]> = Arc::from(vec![Instance::new("a:1")]);
    /// let snap = Snapshot::new(1, instances, Arc::from(vec!["a"]), None);
    /// assert_eq!((snap.instances()[0].as_str(), snap.endpoints()[0]), ("a:1", "a"));
    /// ```
    pub fn new(
        version: u64,
        instances: Arc<[Instance]>,
        endpoints: Arc<[E]>,
        error: Option<Arc<Error>>,
    ) -> Self {
        debug_assert_eq!(instances.len(), endpoints.len());
        Snapshot {
            version,
            instances,
            endpoints,
            error,
        }
    }

    /// Changes whenever the endpoints or the error change.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// let snap = sd_core::Snapshot::<u8>::new(7, Arc::from(vec![]), Arc::from(vec![]), None);
    /// assert_eq!(snap.version(), 7);
    /// ```
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The endpoints, in instance order.
    ///
    /// ```
    /// use sd_core::{Endpointer, FixedEndpointer};
    ///
    /// assert_eq!(&FixedEndpointer::new(vec![1, 2]).snapshot().endpoints()[..], &[1, 2]);
    /// ```
    pub fn endpoints(&self) -> &Arc<[E]> {
        &self.endpoints
    }

    /// The instance each endpoint was made for.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use sd_core::{Instance, Snapshot};
    ///
    /// let instances: Arc<[Instance]> = Arc::from(vec![Instance::new("a:1")]);
    /// let snap = Snapshot::new(0, instances, Arc::from(vec![1]), None);
    /// assert_eq!(&snap.instances()[..], &["a:1"]);
    /// ```
    pub fn instances(&self) -> &Arc<[Instance]> {
        &self.instances
    }

    /// The current discovery error, if the instancer last reported one.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// use sd_core::{Error, Snapshot};
    ///
    /// let err = Some(Arc::new(Error::backend_msg("down")));
    /// let snap = Snapshot::<u8>::new(0, Arc::from(vec![]), Arc::from(vec![]), err);
    /// assert_eq!(snap.error().unwrap().to_string(), "backend error: down");
    /// ```
    pub fn error(&self) -> Option<&Arc<Error>> {
        self.error.as_ref()
    }

    /// The error a balancer returns when this snapshot has no endpoint.
    ///
    /// ```
    /// use sd_core::{Endpointer, Error, FixedEndpointer};
    ///
    /// let err = FixedEndpointer::<u8>::new(vec![]).snapshot().no_endpoints();
    /// assert!(matches!(err, Error::NoEndpoints { last_error: None }));
    /// ```
    pub fn no_endpoints(&self) -> Error {
        Error::NoEndpoints {
            last_error: self.error.clone(),
        }
    }
}

/// The current set of endpoints of one service.
///
/// Balancers read it on every pick, so both methods are cheap: [`version`](Self::version) is one
/// atomic load, and a balancer calls [`snapshot`](Self::snapshot) only when the version moved.
///
/// ```
/// use sd_core::{Endpointer, FixedEndpointer};
///
/// let e = FixedEndpointer::new(vec![1, 2, 3]);
/// assert_eq!(&*e.endpoints().unwrap(), &[1, 2, 3]);
/// assert!(FixedEndpointer::<u8>::new(vec![]).endpoints().is_err());
/// ```
pub trait Endpointer<E>: Send + Sync {
    /// The version of the current snapshot.
    fn version(&self) -> u64;

    /// The current snapshot.
    fn snapshot(&self) -> Arc<Snapshot<E>>;

    /// The current endpoints, or [`Error::NoEndpoints`] (with the last discovery error) if none.
    fn endpoints(&self) -> Result<Arc<[E]>, Error> {
        let snap = self.snapshot();
        if snap.endpoints.is_empty() {
            Err(snap.no_endpoints())
        } else {
            Ok(snap.endpoints.clone())
        }
    }
}

impl<E, T: Endpointer<E> + ?Sized> Endpointer<E> for Arc<T> {
    fn version(&self) -> u64 {
        (**self).version()
    }
    fn snapshot(&self) -> Arc<Snapshot<E>> {
        (**self).snapshot()
    }
}
