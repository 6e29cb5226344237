//! Publishing a service instance: [`Service`], [`TtlOption`] and the [`Registrar`] trait.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, Metadata, ValueFormat};

/// The shortest heartbeat a [`TtlOption`] accepts.
///
/// ```
/// use std::time::Duration;
/// use sd_core::{TtlOption, MIN_HEARTBEAT};
///
/// assert_eq!(MIN_HEARTBEAT, Duration::from_millis(500));
/// assert!(TtlOption::new(MIN_HEARTBEAT, 3 * MIN_HEARTBEAT).is_ok());
/// ```
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(500);

/// How a registration is kept alive: the store forgets the key `ttl` after the last heartbeat,
/// and the registrar sends one every `heartbeat`.
///
/// ```
/// use std::time::Duration;
/// use sd_core::TtlOption;
///
/// let ttl = TtlOption::new(Duration::from_secs(3), Duration::from_secs(10)).unwrap();
/// assert_eq!(ttl.heartbeat(), Duration::from_secs(3));
///
/// // A heartbeat under 500 ms, or a TTL that would expire before the next heartbeat, is refused.
/// assert!(TtlOption::new(Duration::from_millis(100), Duration::from_secs(1)).is_err());
/// assert!(TtlOption::new(Duration::from_secs(3), Duration::from_secs(3)).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlOption {
    heartbeat: Duration,
    ttl: Duration,
}

impl TtlOption {
    /// Validates and builds the option: `heartbeat` at least [`MIN_HEARTBEAT`], `ttl` above it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::TtlOption;
    ///
    /// assert!(TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).is_ok());
    /// assert!(TtlOption::new(Duration::from_secs(3), Duration::from_secs(1)).is_err());
    /// ```
    pub fn new(heartbeat: Duration, ttl: Duration) -> Result<Self, Error> {
        if heartbeat < MIN_HEARTBEAT {
            return Err(Error::invalid_argument(format!(
                "heartbeat {heartbeat:?} is too short: use at least {MIN_HEARTBEAT:?}"
            )));
        }
        if ttl <= heartbeat {
            return Err(Error::invalid_argument(format!(
                "ttl {ttl:?} must be longer than the heartbeat {heartbeat:?}, \
                 or the key expires between two heartbeats (a ttl of 3 heartbeats is usual)"
            )));
        }
        Ok(TtlOption { heartbeat, ttl })
    }

    /// How often the registrar refreshes the registration.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let ttl = sd_core::TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap();
    /// assert_eq!(ttl.heartbeat(), Duration::from_secs(1));
    /// ```
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// How long the store keeps the key after the last heartbeat.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let ttl = sd_core::TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap();
    /// assert_eq!(ttl.ttl(), Duration::from_secs(3));
    /// ```
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// A service instance to register: the store key, the instance string stored under it, and an
/// optional TTL (without one, the key lives until it is deregistered).
///
/// The key is usually the watched prefix plus the instance, as go-kit lays it out:
///
/// ```
/// use std::time::Duration;
/// use sd_core::{Service, TtlOption};
///
/// let svc = Service::new("/services/barsvc/10.0.0.7:8080", "10.0.0.7:8080")
///     .unwrap()
///     .with_ttl(TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap());
/// assert!(svc.validate().is_ok());
/// assert!(Service::new("", "x").is_err());
/// assert!(Service::new("/k", "").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The store key.
    pub key: String,
    /// The instance string published under the key.
    pub value: String,
    /// Keep-alive settings; `None` registers a key that lives until deregistered.
    pub ttl: Option<TtlOption>,
}

impl Service {
    /// A service without a TTL; fails if `key` or `value` is empty.
    ///
    /// ```
    /// let svc = sd_core::Service::new("/services/foo/a:1", "a:1").unwrap();
    /// assert_eq!((svc.key.as_str(), svc.value.as_str()), ("/services/foo/a:1", "a:1"));
    /// assert_eq!(svc.ttl, None);
    /// ```
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Result<Self, Error> {
        let svc = Service {
            key: key.into(),
            value: value.into(),
            ttl: None,
        };
        svc.validate()?;
        Ok(svc)
    }

    /// The same service, kept alive with `ttl`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use sd_core::{Service, TtlOption};
    ///
    /// let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap();
    /// assert_eq!(Service::new("/k", "v").unwrap().with_ttl(ttl).ttl, Some(ttl));
    /// ```
    pub fn with_ttl(mut self, ttl: TtlOption) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The same service, its value (the address) stored with `meta` in `format`: etcd's naming
    /// JSON (which Go's `naming/endpoints` manager and gRPC's etcd resolver read) or this
    /// project's. Plain, the default, has no room for metadata (go-kit clients read only plain
    /// values).
    ///
    /// ```
    /// use sd_core::{Instance, Metadata, Service, ValueFormat};
    ///
    /// let meta = Metadata::new().with_weight(2).unwrap().with_zone("eu-1");
    /// let svc = Service::new("/svc/foo/1", "10.0.0.1:80").unwrap()
    ///     .with_metadata(meta.clone(), ValueFormat::EtcdNaming).unwrap();
    /// assert_eq!(svc.value, r#"{"Op":0,"Addr":"10.0.0.1:80","Metadata":{"weight":2,"zone":"eu-1"}}"#);
    /// let seen = Instance::from_value(&svc.value).unwrap();
    /// assert_eq!((seen.addr(), seen.metadata()), ("10.0.0.1:80", &meta));
    /// ```
    pub fn with_metadata(mut self, meta: Metadata, format: ValueFormat) -> Result<Self, Error> {
        self.value = format.encode(&self.value, &meta)?;
        Ok(self)
    }

    /// Checks what the fields, being public, may have been set to: a non-empty key and value.
    /// Registrars call it before touching the store.
    ///
    /// ```
    /// let mut svc = sd_core::Service::new("/k", "v").unwrap();
    /// assert!(svc.validate().is_ok());
    /// svc.key.clear();
    /// assert!(svc.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        if self.key.is_empty() {
            return Err(Error::invalid_argument(
                "service key is empty: give the full store key, e.g. /services/foo/10.0.0.1:80",
            ));
        }
        if self.value.is_empty() {
            return Err(Error::invalid_argument(
                "service value is empty: give the instance string, e.g. 10.0.0.1:80",
            ));
        }
        Ok(())
    }
}

/// Where a registration stands, as seen by its registrar.
///
/// ```
/// use sd_core::{Error, RegistrationState};
///
/// let state = RegistrationState::Retrying(Error::backend_msg("down"));
/// assert!(!state.is_registered());
/// assert!(matches!(state, RegistrationState::Retrying(_)));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RegistrationState {
    /// Not registered (never, or since `deregister()`).
    Unregistered,
    /// The key is in the store and, with a TTL, kept alive.
    Registered,
    /// The last attempt to (re)register or heartbeat failed; the registrar keeps trying.
    Retrying(Error),
}

impl RegistrationState {
    /// Whether the key is in the store and kept alive.
    ///
    /// ```
    /// assert!(sd_core::RegistrationState::Registered.is_registered());
    /// ```
    pub fn is_registered(&self) -> bool {
        matches!(self, RegistrationState::Registered)
    }
}

/// Registers one [`Service`] in a store and keeps it there until deregistered.
///
/// Unlike go-kit's, failures are returned, and a backend that keeps a registration alive (TTL
/// heartbeats) goes on retrying in the background, reporting through [`state`](Self::state).
///
/// # The contract
/// Every backend keeps these rules; the conformance kit ([`testkit`](crate::testkit), feature
/// `testkit`) checks each one with a case of the same name.
/// - **`register()`** validates the service first (an empty key or value is
///   [`Error::InvalidArgument`]). If its first attempt fails it returns that error and leaves
///   nothing running: the caller decides whether to call it again. Once it has returned `Ok`,
///   the registrar keeps the key in the store (heart-beating it with a TTL) and retries any
///   later failure in the background (lease lost, key deleted behind its back, store down)
///   until `deregister()`. It is idempotent: a second call while registered returns `Ok` and
///   changes nothing (`register_is_idempotent`).
/// - **`state()`** is `Unregistered` before `register()` and after `deregister()`;
///   `Registered` only while the key is readable in the store, so a new instancer started once
///   `state()` says `Registered` lists it (`registered_means_readable`); `Retrying(error)` as soon
///   as keeping the key alive fails, and `Registered` again once it works
///   (`failing_heartbeat_is_reported`): a heartbeat never gives up silently.
/// - **`deregister()`** removes the key only if it still holds this registrar's own value (or
///   lease): a value another registrar has written since stays (`deregister_removes_only_our_value`).
///   It stops all background work, so nothing puts the key back (`deregister_is_final`). It is
///   idempotent, and `register()` may be called again afterwards.
/// - **Lease loss** (the store forgot the TTL lease): the registrar grants a new one and puts
///   the key again, reporting `Retrying` meanwhile.
/// - **Drop** stops the heartbeat. Whether it also removes the key is the backend's choice and
///   is documented by it: `sd-etcd` makes a best-effort revoke (or not, `with_revoke_on_drop`),
///   `sd-memory` leaves the key to expire at its TTL, as a crashed process would. Call
///   `deregister()` on shutdown.
///
/// ```
/// use async_trait::async_trait;
/// use sd_core::{Error, Registrar, RegistrationState};
///
/// struct Noop;
/// #[async_trait]
/// impl Registrar for Noop {
///     async fn register(&self) -> Result<(), Error> { Ok(()) }
///     async fn deregister(&self) -> Result<(), Error> { Ok(()) }
///     fn state(&self) -> RegistrationState { RegistrationState::Unregistered }
/// }
/// ```
#[async_trait]
pub trait Registrar: Send + Sync {
    /// Puts the service in the store (and starts heart-beating it with a TTL). Idempotent; see
    /// the trait's contract for failures.
    async fn register(&self) -> Result<(), Error>;

    /// Removes the service from the store, if it still holds our value, and stops all
    /// background work. Idempotent.
    async fn deregister(&self) -> Result<(), Error>;

    /// The registration's current state: `Registered` only while the key is readable.
    fn state(&self) -> RegistrationState;
}

#[async_trait]
impl<T: Registrar + ?Sized> Registrar for Box<T> {
    async fn register(&self) -> Result<(), Error> {
        (**self).register().await
    }
    async fn deregister(&self) -> Result<(), Error> {
        (**self).deregister().await
    }
    fn state(&self) -> RegistrationState {
        (**self).state()
    }
}

#[async_trait]
impl<T: Registrar + ?Sized> Registrar for std::sync::Arc<T> {
    async fn register(&self) -> Result<(), Error> {
        (**self).register().await
    }
    async fn deregister(&self) -> Result<(), Error> {
        (**self).deregister().await
    }
    fn state(&self) -> RegistrationState {
        (**self).state()
    }
}
