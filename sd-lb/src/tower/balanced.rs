//! [`Balanced`]: a balancer whose endpoints are services, as one service; and its layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sd_core::{Balancer, Tried};
use tower::{BoxError, Layer, Service};

/// Any [`Balancer`] whose endpoints are [`tower::Service`]s, as one service (see the
/// [module docs](super)).
///
/// Each call picks an endpoint ([`Balancer::endpoint_avoiding`]), waits for it to be ready,
/// calls it, and reports whether the call succeeded ([`Balancer::report`]; an error from the
/// endpoint's `poll_ready` counts as a failure), so outlier detection ejects an instance whose
/// calls keep failing. The pick (for [`P2c`](crate::P2c), the [`InFlight`](crate::InFlight)
/// count) is held until the response ends. A call dropped before it ends reports nothing.
///
/// Always ready; cloning shares the balancer. A call with nothing to pick fails at once with the
/// balancer's error ([`sd_core::Error::NoEndpoints`]); every error is boxed (tower's
/// [`BoxError`]), as tower's own balancers do.
///
/// ```
/// use std::sync::Arc;
/// use sd_core::FixedEndpointer;
/// use sd_lb::tower::Balanced;
/// use sd_lb::{Outliers, P2c};
/// use tower::{service_fn, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let client = service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n * 2) });
/// let p2c = P2c::new(FixedEndpointer::new(vec![client])).with_outliers(Arc::new(Outliers::new()));
/// let balanced = Balanced::new(p2c);
/// assert_eq!(balanced.oneshot(21).await?, 42);
/// # Ok(())
/// # }
/// ```
pub struct Balanced<B> {
    balancer: Arc<B>,
}

impl<B> Balanced<B> {
    /// Calls through `balancer`'s picks.
    ///
    /// ```
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{tower::Balanced, RoundRobin};
    ///
    /// let client = tower::service_fn(|_: ()| async { Ok::<_, std::io::Error>("pong") });
    /// let balanced = Balanced::new(RoundRobin::new(FixedEndpointer::new(vec![client])));
    /// # let _ = balanced;
    /// ```
    pub fn new(balancer: B) -> Self {
        Balanced {
            balancer: Arc::new(balancer),
        }
    }

    /// The balancer calls pick from.
    ///
    /// ```
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::{tower::Balanced, RoundRobin};
    ///
    /// let balanced = Balanced::new(RoundRobin::new(FixedEndpointer::new(vec![7])));
    /// assert_eq!(balanced.balancer().endpoint().unwrap(), 7);
    /// ```
    pub fn balancer(&self) -> &B {
        &self.balancer
    }
}

impl<B> Clone for Balanced<B> {
    fn clone(&self) -> Self {
        Balanced {
            balancer: self.balancer.clone(),
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for Balanced<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balanced")
            .field("balancer", &self.balancer)
            .finish()
    }
}

impl<B, Req> Service<Req> for Balanced<B>
where
    B: Balancer + 'static,
    B::Endpoint: Service<Req> + Send + 'static,
    <B::Endpoint as Service<Req>>::Future: Send,
    <B::Endpoint as Service<Req>>::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = <B::Endpoint as Service<Req>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Which endpoint a call gets is known only once it picks: readiness is awaited there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let balancer = self.balancer.clone();
        Box::pin(async move {
            let mut tried = Tried::new();
            let mut endpoint = balancer.endpoint_avoiding(&mut tried)?;
            let result = super::ready_call(&mut endpoint, req).await;
            balancer.report(&tried, result.is_ok());
            // The pick (P2C's in-flight count) is released only now, with the response.
            drop(endpoint);
            result.map_err(Into::into)
        })
    }
}

/// Makes a [`Balanced`] of a balancer, for `tower::ServiceBuilder`.
///
/// ```
/// use sd_core::FixedEndpointer;
/// use sd_lb::{tower::BalanceLayer, RoundRobin};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let client = service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n + 1) });
/// let svc = ServiceBuilder::new()
///     .layer(BalanceLayer::new())
///     .service(RoundRobin::new(FixedEndpointer::new(vec![client])));
/// assert_eq!(svc.oneshot(1).await?, 2);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct BalanceLayer {
    _private: (),
}

impl BalanceLayer {
    /// The layer.
    ///
    /// ```
    /// let layer = sd_lb::tower::BalanceLayer::new();
    /// # let _ = layer;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }
}

impl<B: Balancer> Layer<B> for BalanceLayer {
    type Service = Balanced<B>;

    fn layer(&self, balancer: B) -> Balanced<B> {
        Balanced::new(balancer)
    }
}
