//! Turning an instance string into a callable endpoint.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{Error, Instance};

/// Runs once when the endpoint it belongs to goes away (its instance left the set, or the
/// endpointer was dropped): close connections here.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// let closed = Arc::new(AtomicBool::new(false));
/// let flag = closed.clone();
/// let closer: sd_core::Closer = Box::new(move || flag.store(true, Ordering::SeqCst));
/// closer();
/// assert!(closed.load(Ordering::SeqCst));
/// ```
pub type Closer = Box<dyn FnOnce() + Send + 'static>;

/// Makes an endpoint `E` for an instance, plus an optional [`Closer`].
///
/// Any `Fn(&Instance) -> Result<(E, Option<Closer>), Error>` is a factory. It is synchronous:
/// connect lazily (most clients do) rather than blocking here. A failing factory skips that
/// instance (logged), and it is tried again on the next event that still lists it.
///
/// ```
/// use sd_core::{Closer, Error, Factory, Instance};
///
/// let factory = |i: &Instance| -> Result<(String, Option<Closer>), Error> {
///     Ok((format!("http://{i}/"), None))
/// };
/// let (url, _) = factory.make(&Instance::new("127.0.0.1:80")).unwrap();
/// assert_eq!(url, "http://127.0.0.1:80/");
/// ```
pub trait Factory<E>: Send + Sync + 'static {
    /// Makes the endpoint for `instance`.
    fn make(&self, instance: &Instance) -> Result<(E, Option<Closer>), Error>;
}

impl<E, F> Factory<E> for F
where
    F: Fn(&Instance) -> Result<(E, Option<Closer>), Error> + Send + Sync + 'static,
{
    fn make(&self, instance: &Instance) -> Result<(E, Option<Closer>), Error> {
        self(instance)
    }
}

/// A factory from a closure whose types are inferred: no annotation on its argument or its
/// result. The closure returns the endpoint and an optional closer, or an error.
///
/// ```
/// use sd_core::{factory, Factory, Instance};
///
/// let f = factory(|i| Ok((format!("http://{i}/"), None)));
/// let (url, closer) = f.make(&Instance::new("127.0.0.1:80")).unwrap();
/// assert_eq!(url, "http://127.0.0.1:80/");
/// assert!(closer.is_none());
/// ```
pub fn factory<E, F>(f: F) -> F
where
    F: Fn(&Instance) -> Result<(E, Option<Closer>), Error> + Send + Sync + 'static,
{
    f
}

/// A factory that cannot fail and needs no closer: the closure turns an instance into its
/// endpoint.
///
/// ```
/// use sd_core::{endpoint_fn, Factory, Instance};
///
/// let f = endpoint_fn(|i| format!("http://{i}/"));
/// let (url, _) = f.make(&Instance::new("127.0.0.1:80")).unwrap();
/// assert_eq!(url, "http://127.0.0.1:80/");
/// ```
pub fn endpoint_fn<E, F>(f: F) -> EndpointFn<F>
where
    F: Fn(&Instance) -> E + Send + Sync + 'static,
{
    EndpointFn(f)
}

/// The factory [`endpoint_fn`] makes.
///
/// ```
/// let f: sd_core::EndpointFn<_> = sd_core::endpoint_fn(|i| i.len());
/// # let _ = f;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct EndpointFn<F>(F);

impl<E, F> Factory<E> for EndpointFn<F>
where
    F: Fn(&Instance) -> E + Send + Sync + 'static,
{
    fn make(&self, instance: &Instance) -> Result<(E, Option<Closer>), Error> {
        Ok(((self.0)(instance), None))
    }
}

/// Runs a closer exactly once: when dropped.
///
/// The mutex is never locked (only `get_mut` in `drop`): it makes the guard `Sync`, so it can be
/// shared through an `Arc` by the tower adapter's services and their calls in flight.
pub(crate) struct CloseGuard(std::sync::Mutex<Option<Closer>>);

impl CloseGuard {
    pub(crate) fn new(closer: Option<Closer>) -> Self {
        CloseGuard(std::sync::Mutex::new(closer))
    }
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let closer = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(close) = closer.take() {
            close();
        }
    }
}

/// Calls `factory` for `instance`; an error or a panic skips the instance (logged), so one bad
/// instance never takes down the task that follows the instancer.
pub(crate) fn make_or_skip<E, F: Factory<E> + ?Sized>(
    factory: &F,
    instance: &Instance,
) -> Option<(E, Option<Closer>)> {
    match catch_unwind(AssertUnwindSafe(|| factory.make(instance))) {
        Ok(Ok(made)) => Some(made),
        Ok(Err(err)) => {
            tracing::warn!(%instance, error = %crate::Report(&err), "factory failed: instance skipped until the next update");
            None
        }
        Err(_) => {
            tracing::error!(%instance, "factory panicked: instance skipped until the next update");
            None
        }
    }
}
