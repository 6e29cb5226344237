//! [`RetryService`]: sd's [`Retry`] as a tower service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sd_core::Balancer;
use tower::Service;

use crate::{AlwaysRetry, Retry, RetryCallback, RetryError};

/// A [`Retry`] whose balancer's endpoints are [`tower::Service`]s, as one service: what tower
/// users should use to retry (see the [module docs](super) for why not tower's own retry).
///
/// Each attempt picks an endpoint (avoiding those that failed in this call while there are
/// others), waits for it to be ready, and calls it with a clone of the request (so `Req: Clone`);
/// its outcome is reported to the balancer (outlier detection). Everything else is `Retry`'s:
/// attempts, one deadline over all of them (waiting for readiness counts), backoff, budget,
/// callback, and its [`RetryError`] as the error.
///
/// Always ready; cloning shares the `Retry`.
///
/// ```
/// use std::time::Duration;
/// use sd_core::FixedEndpointer;
/// use sd_lb::tower::RetryService;
/// use sd_lb::{Retry, RoundRobin};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A client per instance; the one on 8080 is down.
/// let client = |addr: &'static str| {
///     service_fn(move |n: u32| async move {
///         if addr == "127.0.0.1:8080" { Err(std::io::Error::other("refused")) } else { Ok(n + 1) }
///     })
/// };
/// let endpoints = FixedEndpointer::new(vec![client("127.0.0.1:8080"), client("127.0.0.1:8081")]);
/// let retry = Retry::new(RoundRobin::new(endpoints), 3, Duration::from_secs(1))?;
/// let svc = RetryService::new(retry);
/// assert_eq!(svc.clone().oneshot(1).await?, 2, "the first attempt failed, the retry went elsewhere");
/// # Ok(())
/// # }
/// ```
pub struct RetryService<B, C = AlwaysRetry> {
    retry: Arc<Retry<B, C>>,
}

impl<B: Balancer, C> RetryService<B, C> {
    /// Calls through `retry`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{tower::RetryService, Retry, RoundRobin};
    ///
    /// let client = tower::service_fn(|_: ()| async { Ok::<_, std::io::Error>("pong") });
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![client])), 2, Duration::from_secs(1)).unwrap();
    /// let svc = RetryService::new(retry);
    /// # let _ = svc;
    /// ```
    pub fn new(retry: Retry<B, C>) -> Self {
        RetryService {
            retry: Arc::new(retry),
        }
    }

    /// The `Retry` calls go through.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{tower::RetryService, Retry, RoundRobin};
    ///
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// assert_eq!(RetryService::new(retry).retry().max_attempts(), 2);
    /// ```
    pub fn retry(&self) -> &Retry<B, C> {
        &self.retry
    }
}

impl<B, C> Clone for RetryService<B, C> {
    fn clone(&self) -> Self {
        RetryService {
            retry: self.retry.clone(),
        }
    }
}

impl<B: fmt::Debug, C> fmt::Debug for RetryService<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("retry", &self.retry)
            .finish()
    }
}

impl<B, C, Req> Service<Req> for RetryService<B, C>
where
    B: Balancer + 'static,
    B::Endpoint: Service<Req> + Send + 'static,
    <B::Endpoint as Service<Req>>::Future: Send,
    <B::Endpoint as Service<Req>>::Response: Send,
    <B::Endpoint as Service<Req>>::Error: Send,
    C: RetryCallback<<B::Endpoint as Service<Req>>::Error> + Send + Sync + 'static,
    Req: Clone + Send + 'static,
{
    type Response = <B::Endpoint as Service<Req>>::Response;
    type Error = RetryError<<B::Endpoint as Service<Req>>::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each attempt awaits the readiness of the endpoint it picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let retry = self.retry.clone();
        Box::pin(async move {
            retry
                .call(move |mut endpoint| {
                    let req = req.clone();
                    // The endpoint (P2C's in-flight count) lives as long as the attempt.
                    async move { super::ready_call(&mut endpoint, req).await }
                })
                .await
        })
    }
}
