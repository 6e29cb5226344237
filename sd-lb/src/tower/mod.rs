//! sd's balancers as tower services (feature `tower`).
//!
//! When each endpoint is a [`tower::Service`] (a client per instance: a `tonic` channel, a
//! `hyper` client, a `service_fn`), any [`Balancer`](sd_core::Balancer) of this crate becomes one
//! service that calls through a picked endpoint:
//!
//! - [`Balanced`] picks an endpoint per call, waits until that endpoint is ready (its
//!   `poll_ready`: a concurrency limit, a connection being made), calls it, and reports the
//!   outcome to the balancer, so [`Outliers`](crate::Outliers) ejects an instance whose calls keep
//!   failing. The pick lives as long as the call: [`P2c`](crate::P2c) counts the call as in flight
//!   on that endpoint until its response ends. [`BalanceLayer`] makes one in a
//!   `tower::ServiceBuilder`.
//! - [`RetryService`] is [`Retry`](crate::Retry) as a service: every attempt goes through a pick
//!   like `Balanced`'s, a retry avoids the endpoints that already failed in the call, and every
//!   attempt's outcome is reported.
//!
//! `Balanced` and `RetryService` are always ready: picking, and waiting for the picked
//! endpoint, happen inside the call's future (a balancer cannot know in `poll_ready` which
//! endpoint the call will get). They are cheap to clone (an `Arc`), so one can be shared by many
//! tasks. With no endpoint to pick, a call fails at once with
//! [`Error::NoEndpoints`](sd_core::Error::NoEndpoints) (carrying the discovery error, if any)
//! rather than waiting.
//!
//! # Retries: use [`RetryService`], not tower's `retry::Retry`
//!
//! tower's `retry::Retry` with a `retry::Policy` (and its `retry::budget`) re-sends a request
//! to the service below it, which knows nothing of the attempt before: through `Balanced`, a
//! retry may be sent to the very instance that just failed, and the balancer cannot learn
//! which instance failed, so retries never steer around it. `RetryService` keeps both inside one
//! call: a retry goes to another endpoint while there is one, and each outcome reaches outlier
//! detection. For tower's budget, use sd's [`RetryBudget`](crate::RetryBudget) (gRPC's retry
//! throttling) through [`Retry::with_budget`](crate::Retry::with_budget). Layers that do not
//! retry (timeouts, rate and concurrency limits, load shedding) compose with both as usual; a
//! `tower::timeout` around `RetryService` bounds the whole call, the `Retry` deadline bounds it
//! too.
//!
//! ```
//! use std::time::Duration;
//! use sd_core::FixedEndpointer;
//! use sd_lb::tower::{Balanced, RetryService};
//! use sd_lb::{Retry, RoundRobin};
//! use tower::{service_fn, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // A client per instance; here one that answers with its instance.
//! let client = |addr: &'static str| {
//!     service_fn(move |req: String| async move { Ok::<_, std::io::Error>(format!("{req} from {addr}")) })
//! };
//! let endpoints = || FixedEndpointer::new(vec![client("127.0.0.1:8080"), client("127.0.0.1:8081")]);
//!
//! let balanced = Balanced::new(RoundRobin::new(endpoints()));
//! assert_eq!(balanced.clone().oneshot("hi".to_string()).await?, "hi from 127.0.0.1:8080");
//! assert_eq!(balanced.oneshot("hi".to_string()).await?, "hi from 127.0.0.1:8081");
//!
//! let retrying = RetryService::new(Retry::new(RoundRobin::new(endpoints()), 3, Duration::from_secs(1))?);
//! assert_eq!(retrying.oneshot("hello".to_string()).await?, "hello from 127.0.0.1:8080");
//! # Ok(())
//! # }
//! ```

mod balanced;
mod retry_service;

pub use balanced::{BalanceLayer, Balanced};
pub use retry_service::RetryService;

/// `tower::Service` for a pick guard (P2C's `InFlight`, Maglev's `Held`), by delegation to
/// the endpoint it holds: the guard lives as long as the call through it.
macro_rules! service_of_guard {
    ($guard:ident, $doc:literal) => {
        #[doc = $doc]
        #[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
        impl<E: ::tower::Service<Req>, Req> ::tower::Service<Req> for $guard<E> {
            type Response = E::Response;
            type Error = E::Error;
            type Future = E::Future;

            fn poll_ready(
                &mut self,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), E::Error>> {
                self.endpoint.poll_ready(cx)
            }

            fn call(&mut self, req: Req) -> E::Future {
                self.endpoint.call(req)
            }
        }
    };
}
pub(crate) use service_of_guard;

use std::future::poll_fn;

/// Waits until `service` is ready, then calls it with `req`.
async fn ready_call<S, Req>(service: &mut S, req: Req) -> Result<S::Response, S::Error>
where
    S: tower::Service<Req>,
{
    poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(req).await
}
