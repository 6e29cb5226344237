//! Picking one endpoint.

use crate::Error;

/// Picks one endpoint per call.
///
/// `Endpoint` is what a pick hands out: the endpoint itself for most balancers, a guard that
/// derefs to it where the balancer tracks load (it releases the load when dropped). A balancer
/// with nothing to pick from returns [`Error::NoEndpoints`].
///
/// ```
/// use sd_core::{Balancer, Error};
///
/// struct First(Vec<&'static str>);
/// impl Balancer for First {
///     type Endpoint = &'static str;
///     fn endpoint(&self) -> Result<&'static str, Error> {
///         self.0.first().copied().ok_or(Error::NoEndpoints { last_error: None })
///     }
/// }
/// assert_eq!(First(vec!["a"]).endpoint().unwrap(), "a");
/// assert!(First(vec![]).endpoint().is_err());
/// ```
pub trait Balancer: Send + Sync {
    /// What one pick returns.
    type Endpoint;

    /// Picks an endpoint.
    fn endpoint(&self) -> Result<Self::Endpoint, Error>;
}

impl<B: Balancer + ?Sized> Balancer for std::sync::Arc<B> {
    type Endpoint = B::Endpoint;
    fn endpoint(&self) -> Result<Self::Endpoint, Error> {
        (**self).endpoint()
    }
}

impl<B: Balancer + ?Sized> Balancer for &B {
    type Endpoint = B::Endpoint;
    fn endpoint(&self) -> Result<Self::Endpoint, Error> {
        (**self).endpoint()
    }
}
