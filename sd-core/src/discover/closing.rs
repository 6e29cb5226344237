//! [`Closing`]: a discovered service that runs its instance's closer once nothing uses it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::factory::CloseGuard;
use crate::Closer;

/// A service made by a [`Discovery`](super::Discovery)'s factory, with its instance's
/// [`Closer`]: the closer runs once the service (every clone of it) has been dropped and the
/// response future of every call made through it has completed or been dropped.
///
/// So a removed instance's connection is closed when tower drops the service (a balancer drops
/// it when it takes the removal, or when it is itself dropped), never while tower still holds
/// it or a call's response future is pending. A streaming response body outlives that future:
/// a closer that tears down a connection shared with such a stream cuts it (close the client's
/// own handle instead, and let the connection end with its last user). tower drops a removed
/// service inside a caller's `poll_ready`: closers should be quick (hand slow work to a task).
///
/// It is a `tower::Service` (and a `tower::load::Load`) by delegation.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use futures::StreamExt;
/// use sd_core::{discover, Closer, Error, Event, Instance, Publisher};
/// use tower::discover::Change;
///
/// # futures::executor::block_on(async {
/// let closed = Arc::new(AtomicBool::new(false));
/// let flag = closed.clone();
/// let factory = move |i: &Instance| -> Result<(String, Option<Closer>), Error> {
///     let flag = flag.clone();
///     Ok((i.to_string(), Some(Box::new(move || flag.store(true, Ordering::SeqCst)))))
/// };
/// let instancer = Publisher::new(Event::from_instances(["127.0.0.1:80"]));
/// let mut changes = discover(&instancer, factory);
/// let Some(Ok(Change::Insert(_, service))) = changes.next().await else { panic!() };
/// assert_eq!(service.get_ref(), "127.0.0.1:80");
///
/// instancer.publish(Event::empty());
/// assert!(matches!(changes.next().await, Some(Ok(Change::Remove(_)))));
/// assert!(!closed.load(Ordering::SeqCst), "still held");
/// drop(service);
/// assert!(closed.load(Ordering::SeqCst));
/// # });
/// ```
pub struct Closing<S> {
    service: S,
    /// Shared with clones and with the response futures of calls in flight; `None` when the
    /// factory gave no closer (nothing to count).
    close: Option<Arc<CloseGuard>>,
}

impl<S> Closing<S> {
    pub(crate) fn new(service: S, closer: Option<Closer>) -> Self {
        Closing {
            service,
            close: closer.map(|c| Arc::new(CloseGuard::new(Some(c)))),
        }
    }

    /// The service the factory made.
    ///
    /// ```
    /// # use futures::StreamExt;
    /// # use sd_core::{discover, endpoint_fn, Event, Publisher};
    /// # use tower::discover::Change;
    /// # futures::executor::block_on(async {
    /// let instancer = Publisher::new(Event::from_instances(["127.0.0.1:80"]));
    /// let mut changes = discover(&instancer, endpoint_fn(|i| i.len()));
    /// let Some(Ok(Change::Insert(_, service))) = changes.next().await else { panic!() };
    /// assert_eq!(*service.get_ref(), 12);
    /// # });
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The service the factory made, mutably.
    ///
    /// ```
    /// # use futures::StreamExt;
    /// # use sd_core::{discover, endpoint_fn, Event, Publisher};
    /// # use tower::discover::Change;
    /// # futures::executor::block_on(async {
    /// let instancer = Publisher::new(Event::from_instances(["127.0.0.1:80"]));
    /// let mut changes = discover(&instancer, endpoint_fn(|i| i.len()));
    /// let Some(Ok(Change::Insert(_, mut service))) = changes.next().await else { panic!() };
    /// *service.get_mut() += 1;
    /// assert_eq!(*service.get_ref(), 13);
    /// # });
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }
}

impl<S: Clone> Clone for Closing<S> {
    fn clone(&self) -> Self {
        Closing {
            service: self.service.clone(),
            close: self.close.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Closing<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Closing")
            .field("service", &self.service)
            .field("has_closer", &self.close.is_some())
            .finish()
    }
}

impl<S, Req> tower::Service<Req> for Closing<S>
where
    S: tower::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.service.call(req),
            _close: self.close.clone(),
        }
    }
}

impl<S: tower::load::Load> tower::load::Load for Closing<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.service.load()
    }
}

pin_project_lite::pin_project! {
    /// The response future of a call through a [`Closing`] service: the service's own, holding
    /// the instance's closer back until it ends (or is dropped).
    ///
    /// ```
    /// # use futures::StreamExt;
    /// # use sd_core::{discover, endpoint_fn, Event, Publisher};
    /// # use tower::discover::Change;
    /// use tower::Service;
    ///
    /// # futures::executor::block_on(async {
    /// let instancer = Publisher::new(Event::from_instances(["127.0.0.1:80"]));
    /// let svc = |i: &sd_core::Instance| {
    ///     let len = i.len();
    ///     tower::service_fn(move |n: usize| async move { Ok::<_, std::io::Error>(n + len) })
    /// };
    /// let mut changes = discover(&instancer, endpoint_fn(svc));
    /// let Some(Ok(Change::Insert(_, mut service))) = changes.next().await else { panic!() };
    /// let response: sd_core::discover::ResponseFuture<_> = service.call(1);
    /// assert_eq!(response.await.unwrap(), 13);
    /// # });
    /// ```
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        _close: Option<Arc<CloseGuard>>,
    }
}

impl<F: fmt::Debug> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}
