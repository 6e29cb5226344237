//! The error type of the etcd backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What can go wrong talking to etcd.
///
/// `#[non_exhaustive]`: match it with a wildcard arm. It converts into [`sd_core::Error`] (what
/// the core traits return): argument errors become `InvalidArgument`, everything else `Backend`.
///
/// ```
/// let err = sd_etcd::Error::NoKey;
/// assert!(err.to_string().contains("key"));
/// let core: sd_core::Error = err.into();
/// assert!(matches!(core, sd_core::Error::InvalidArgument(_)));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service key is empty.
    #[error("service key is empty: give the full etcd key, e.g. /services/foo/10.0.0.1:80")]
    NoKey,
    /// The service value (the instance string) is empty.
    #[error("service value is empty: give the instance string, e.g. 10.0.0.1:80")]
    NoValue,
    /// A TTL that etcd cannot honour.
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    /// A watched prefix that does not end in `/`.
    #[error(
        "invalid prefix {0:?}: a prefix must end in '/' (or /svc/a would also see /svc/ab/...)"
    )]
    InvalidPrefix(String),
    /// Options that can never work (no endpoint, TLS with `http://` endpoints, ...).
    #[error("invalid client options: {0}")]
    InvalidOptions(String),
    /// A certificate or key (file or in-memory PEM) could not be used.
    #[error("{}: {reason}", match .path {
        Some(p) => format!("{what} file {}", p.display()),
        None => format!("{what} (in-memory PEM)"),
    })]
    Certificate {
        /// What the PEM was supposed to hold ("CA certificate", "client key", ...).
        what: &'static str,
        /// The file it was read from, if any.
        path: Option<PathBuf>,
        /// Why it is unusable, and what to do.
        reason: String,
    },
    /// No endpoint answered within the dial timeout.
    #[error("could not connect to etcd at {} within {timeout:?}: {reason}", .endpoints.join(", "))]
    Connect {
        /// The endpoints that were tried.
        endpoints: Vec<String>,
        /// The dial timeout.
        timeout: Duration,
        /// What went wrong, per endpoint, with a hint.
        reason: String,
    },
    /// etcd refused the username or password, or the user lacks a permission.
    #[error("etcd authentication failed: {0} (check the username and password in ClientOptions::with_user, and the user's roles)")]
    Auth(String),
    /// The key was put on a lease etcd no longer knows (it expired or was revoked).
    #[error("lease {0:x} not found: it expired or was revoked; a new one must be granted")]
    LeaseNotFound(i64),
    /// A registered key is held by another lease: another registrar registered it on purpose,
    /// and it is left to that registrar until it goes away.
    #[error("key {key} is held by another lease ({lease:x}): another registrar owns it; this one puts it back once it is gone")]
    TakenOver {
        /// The key.
        key: String,
        /// The lease that holds it now.
        lease: i64,
    },
    /// A registered key was deleted or overwritten behind the registrar's back; it is being
    /// put back.
    #[error("key {0} was deleted or overwritten behind the registrar's back; putting it back")]
    KeyLost(String),
    /// An etcd call did not answer within the request timeout.
    #[error("etcd {op} timed out after {after:?} (is etcd overloaded, or is the node hung?)")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// etcd (or the connection to it) failed an operation.
    #[error("etcd {op} failed")]
    Etcd {
        /// The operation.
        op: &'static str,
        /// The error of the etcd client.
        source: Arc<etcd_client::Error>,
    },
    /// One etcd response was larger than the client may decode (a single value larger than the
    /// limit, as prefix reads are paginated and watches fragmented).
    #[error("an etcd response exceeded the client's decoding limit of {limit} bytes: raise it with ClientOptions::with_max_response_size")]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// A watch stream broke, was canceled by etcd or stopped answering.
    #[error("etcd watch failed: {0}")]
    Watch(String),
    /// The component was stopped.
    #[error("stopped: this component was stopped; create a new one")]
    Stopped,
}

impl Error {
    pub(crate) fn etcd(op: &'static str, source: etcd_client::Error) -> Self {
        Error::Etcd {
            op,
            source: Arc::new(source),
        }
    }

    /// Whether trying again (possibly on another endpoint) may succeed: unavailable or hung
    /// nodes, transport errors, leader changes and timeouts.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert!(sd_etcd::Error::Timeout { op: "get", after: Duration::from_secs(5) }.is_retryable());
    /// assert!(!sd_etcd::Error::NoKey.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Watch(_) => true,
            Error::Etcd { source, .. } => is_retryable_etcd(source),
            _ => false,
        }
    }

    /// Whether etcd refused the request because it is overloaded (`too many requests`): the
    /// node is alive, and the same request may succeed after a pause.
    ///
    /// ```
    /// assert!(!sd_etcd::Error::NoKey.is_overload());
    /// ```
    pub fn is_overload(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => match source.as_ref() {
                etcd_client::Error::GRpcStatus(s) => s.message().contains("too many requests"),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether etcd refused the auth token (expired, or forgotten by a restarted etcd): a new
    /// token, from the same credentials, is likely to work.
    ///
    /// ```
    /// assert!(sd_etcd::Error::Auth("etcdserver: invalid auth token".into()).is_invalid_token());
    /// assert!(!sd_etcd::Error::Auth("authentication failed, invalid user ID or password".into())
    ///     .is_invalid_token());
    /// ```
    pub fn is_invalid_token(&self) -> bool {
        match self {
            Error::Auth(m) => is_token_message(m),
            _ => false,
        }
    }
}

/// etcd's words for a token it does not accept (3.4 says "invalid auth token"; a watch canceled
/// for an expired token says "permission denied" in 3.4, later versions name the token).
pub(crate) fn is_token_message(m: &str) -> bool {
    m.contains("invalid auth token") || m.contains("auth token is expired")
}

/// Classifies etcd-client errors: transport trouble and leader changes are worth a retry.
pub(crate) fn is_retryable_etcd(e: &etcd_client::Error) -> bool {
    use tonic_code::*;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::WatchError(_) => true,
        etcd_client::Error::LeaseKeepAliveError(m) => !m.contains("lease not found"),
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() as i32 {
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED => true,
                UNKNOWN => {
                    // Transport and h2 errors surface as Unknown; so do some etcd server errors.
                    !msg.contains("etcdserver: ") || retryable_server_message(msg)
                }
                _ => retryable_server_message(msg),
            }
        }
        _ => false,
    }
}

fn retryable_server_message(msg: &str) -> bool {
    [
        "leader changed",
        "no leader",
        "request timed out",
        "not capable",
        "transport",
        "connection",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// Whether etcd said a lease does not exist.
pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        // etcd-client's own answer to a keep-alive response with TTL 0.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// Whether etcd refused our credentials or token.
pub(crate) fn is_auth(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == tonic_code::UNAUTHENTICATED
                || s.code() as i32 == tonic_code::PERMISSION_DENIED
                || s.message().contains("authentication failed")
                || s.message().contains("invalid auth token")
                || s.message().contains("user name is empty")
                || s.message().contains("permission denied")
        }
        _ => false,
    }
}

/// The gRPC status codes we look at (`tonic::Code` discriminants; etcd-client does not
/// re-export tonic).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

impl From<Error> for sd_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::NoKey
            | Error::NoValue
            | Error::InvalidTtl(_)
            | Error::InvalidPrefix(_)
            | Error::InvalidOptions(_) => sd_core::Error::invalid_argument(e.to_string()),
            Error::Stopped => sd_core::Error::Stopped,
            other => sd_core::Error::Backend(Arc::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_error_names_endpoints() {
        let e = Error::Connect {
            endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
            timeout: Duration::from_secs(3),
            reason: "connection refused".into(),
        };
        let s = e.to_string();
        assert!(s.contains("http://127.0.0.1:1, http://127.0.0.1:2"), "{s}");
        assert!(s.contains("3s"), "{s}");
    }

    #[test]
    fn certificate_error_names_the_file() {
        let e = Error::Certificate {
            what: "CA certificate",
            path: Some("/nope/ca.pem".into()),
            reason: "no such file".into(),
        };
        assert!(e.to_string().contains("/nope/ca.pem"));
    }

    /// A caller holding an `sd_core::Error` can tell a lost lease or an auth failure apart,
    /// also when it is the discovery error behind `NoEndpoints`.
    #[test]
    fn the_etcd_error_is_reachable_from_core() {
        let core = sd_core::Error::from(Error::LeaseNotFound(0x2a));
        assert!(matches!(
            core.downcast_ref::<Error>(),
            Some(Error::LeaseNotFound(0x2a))
        ));
        assert_eq!(core.to_string(), Error::LeaseNotFound(0x2a).to_string());
        let behind = sd_core::Error::NoEndpoints {
            last_error: Some(Arc::new(Error::Auth("wrong password".into()).into())),
        };
        assert!(matches!(
            behind.downcast_ref::<Error>(),
            Some(Error::Auth(_))
        ));
        let chain = sd_core::Report(&behind).to_string();
        assert!(
            chain.contains("discovery is failing: etcd authentication failed"),
            "{chain}"
        );
    }

    #[test]
    fn conversion_to_core() {
        assert!(matches!(
            sd_core::Error::from(Error::InvalidPrefix("/a".into())),
            sd_core::Error::InvalidArgument(_)
        ));
        assert!(matches!(
            sd_core::Error::from(Error::Stopped),
            sd_core::Error::Stopped
        ));
        assert!(matches!(
            sd_core::Error::from(Error::Watch("x".into())),
            sd_core::Error::Backend(_)
        ));
    }
}
