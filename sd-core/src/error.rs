//! The one error type of the core traits.

use std::sync::Arc;
use std::time::Duration;

/// A boxed, shareable error from a backend (etcd, the in-memory store, a user's own).
///
/// ```
/// use std::sync::Arc;
/// use sd_core::{BackendError, Error};
///
/// let source: BackendError = Arc::new(std::io::Error::other("refused"));
/// // `Backend` is transparent: the backend error's own message.
/// assert_eq!(Error::Backend(source).to_string(), "refused");
/// ```
pub type BackendError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What the core traits return when something goes wrong.
///
/// It is `Clone` (errors travel inside [`Event`](crate::Event)s to every subscriber) and
/// `#[non_exhaustive]`: match it with a wildcard arm.
///
/// Causes are chained, not repeated: each error's message says what failed at its level, and
/// [`source()`](std::error::Error::source) leads to why. [`Report`] prints the whole chain. A
/// backend's own error stays typed inside [`Error::Backend`]: find it with
/// [`downcast_ref`](Self::downcast_ref) (for example an `sd_etcd::Error`, to tell a lost lease
/// from a refused password).
///
/// ```
/// use sd_core::Error;
///
/// let err = Error::invalid_argument("key must not be empty");
/// assert!(matches!(err, Error::InvalidArgument(_)));
/// assert_eq!(err.to_string(), "invalid argument: key must not be empty");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The balancer had nothing to pick from. `last_error` is the store error that emptied the
    /// endpoint set, if there was one.
    #[error("no endpoints available: {}", match .last_error {
        Some(_) => "discovery is failing",
        None => "no instance is registered under the watched prefix",
    })]
    NoEndpoints {
        /// The most recent error reported by the instancer, if any (also the `source()`).
        #[source]
        last_error: Option<Arc<Error>>,
    },
    /// A caller passed a value that can never work (an empty key, a TTL too short, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(Arc<str>),
    /// The instancer, registrar or endpointer was stopped.
    #[error("stopped: this discovery component was stopped; create a new one")]
    Stopped,
    /// A factory could not turn an instance into an endpoint.
    #[error("factory failed for instance {instance}")]
    Factory {
        /// The instance string the factory was given.
        instance: Arc<str>,
        /// Why it failed.
        source: BackendError,
    },
    /// A store operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// An error of the backend (etcd, the in-memory store, ...): its message and its
    /// `source()` are the backend error's own.
    #[error(transparent)]
    Backend(BackendError),
}

impl Error {
    /// An [`Error::InvalidArgument`] with the given explanation.
    ///
    /// ```
    /// let err = sd_core::Error::invalid_argument("max attempts must be at least 1");
    /// assert!(err.to_string().contains("at least 1"));
    /// ```
    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(Arc::from(msg.into()))
    }

    /// Wraps any backend error.
    ///
    /// ```
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    /// let err = sd_core::Error::backend(io);
    /// assert_eq!(err.to_string(), "refused");
    /// ```
    pub fn backend<E>(err: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Backend(Arc::new(err))
    }

    /// A backend error made of a message alone.
    ///
    /// ```
    /// let err = sd_core::Error::backend_msg("store unavailable");
    /// assert_eq!(err.to_string(), "store unavailable");
    /// ```
    pub fn backend_msg(msg: impl Into<String>) -> Self {
        Error::Backend(Arc::new(Message(msg.into())))
    }

    /// A factory error for `instance`.
    ///
    /// ```
    /// let err = sd_core::Error::factory("10.0.0.1:80", std::io::Error::other("bad address"));
    /// assert!(err.to_string().contains("10.0.0.1:80"));
    /// ```
    pub fn factory<E>(instance: impl AsRef<str>, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Factory {
            instance: Arc::from(instance.as_ref()),
            source: Arc::new(source),
        }
    }
}

/// A plain message used as an error source.
impl Error {
    /// The first error of type `T` in this error's chain: a backend's own error inside
    /// [`Error::Backend`], a factory's cause, the discovery error behind `NoEndpoints`, or what
    /// those wrap in turn.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::Error;
    ///
    /// let err = Error::NoEndpoints {
    ///     last_error: Some(Arc::new(Error::backend(std::io::Error::other("refused")))),
    /// };
    /// assert_eq!(err.downcast_ref::<std::io::Error>().unwrap().to_string(), "refused");
    /// assert!(err.downcast_ref::<std::fmt::Error>().is_none());
    /// ```
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            next = match e.downcast_ref::<Error>() {
                // Our own links are followed by hand: their sources sit behind `Arc`s, which
                // hide the type inside from a downcast.
                Some(core) => core.cause(),
                None => e.source(),
            };
        }
        None
    }

    /// The error this one wraps, unwrapped from its `Arc`.
    fn cause(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Backend(e) | Error::Factory { source: e, .. } => Some(&**e),
            Error::NoEndpoints {
                last_error: Some(e),
            } => Some(&**e),
            _ => None,
        }
    }
}

/// Prints an error and every cause in its `source()` chain, separated by `": "`: what to show a
/// person or a log line.
///
/// ```
/// use std::sync::Arc;
/// use sd_core::{Error, Report};
///
/// let err = Error::NoEndpoints {
///     last_error: Some(Arc::new(Error::backend(std::io::Error::other("connection refused")))),
/// };
/// assert_eq!(err.to_string(), "no endpoints available: discovery is failing");
/// assert_eq!(
///     Report(&err).to_string(),
///     "no endpoints available: discovery is failing: connection refused"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Message(String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endpoints_names_the_cause() {
        let plain = Error::NoEndpoints { last_error: None };
        assert!(plain.to_string().contains("no instance is registered"));
        let with = Error::NoEndpoints {
            last_error: Some(Arc::new(Error::backend_msg("connection refused"))),
        };
        assert!(
            !with.to_string().contains("connection refused"),
            "not repeated: {with}"
        );
        let source = std::error::Error::source(&with).map(|e| e.to_string());
        assert_eq!(source.as_deref(), Some("connection refused"));
        assert!(Report(&with).to_string().ends_with(": connection refused"));
    }
}
