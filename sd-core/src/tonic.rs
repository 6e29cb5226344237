//! tonic channels that follow an instancer (feature `tonic`).
//!
//! tonic 0.14 balances over a changing set of endpoints only through
//! `Channel::balance_channel`, which hands back an `mpsc` sender of tonic's own `Change` type:
//! every program then writes the same forwarding task from its discovery to that sender, and
//! owns neither its errors nor its end. [`balance_channel`] is that task, done once:
//!
//! - it turns each instance into an [`Endpoint`] ([`ChannelOptions::endpoint`]: `http://{addr}`
//!   with timeouts, `https://` with TLS, or your own function) and forwards additions and
//!   removals to the channel;
//! - the returned [`ChannelHandle`] owns the instancer and the task: dropping it stops both;
//! - [`ChannelHandle::state`] is a watch of the instances in the channel, the last discovery
//!   error and whether discovery has stopped;
//! - [`ChannelHandle::service`] is the channel as a client transport that fails a call with
//!   `Unavailable` and the reason (nothing registered, discovery failing, discovery stopped)
//!   after [`ChannelOptions::no_instances_wait`], where tonic's balancer would wait for an
//!   endpoint for ever.
//!
//! tonic balances with power of two choices over its connections and knows nothing of failed
//! calls: a server that crashed without deregistering keeps getting calls until its
//! registration expires. To steer calls around failing instances, use a [`Channel`] per
//! instance with sd's balancers instead: [`ChannelOptions`] is a [`Factory`] of
//! lazily connected channels for a [`DefaultEndpointer`](crate::DefaultEndpointer), under
//! `sd_lb::RoundRobin::with_outliers` (outlier ejection) inside `sd_lb::Retry` (retries that
//! avoid the instance that failed). The `greeter` program in `examples` shows both.
//!
//! ```
//! use std::time::Duration;
//! use sd_core::tonic::{balance_channel, ChannelOptions};
//! use sd_core::{Event, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sd_core::Error> {
//! // Any instancer: sd_etcd::EtcdInstancer, sd_memory::MemoryInstancer, ...
//! let instancer = Publisher::new(Event::from_instances(["127.0.0.1:50051", "127.0.0.1:50052"]));
//! let options = ChannelOptions::new()
//!     .connect_timeout(Duration::from_secs(1))?
//!     .no_instances_wait(Duration::from_millis(500));
//! let (channel, handle) = balance_channel(instancer, options);
//! assert_eq!(handle.state().borrow().instances().len(), 2);
//! // Give `channel` (or `handle.service()`, which fails fast) to a generated client:
//! // `GreeterClient::new(handle.service())`.
//! # drop(channel);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tracing::Instrument;

use ::tonic::body::Body;
use ::tonic::transport::channel::Change;
#[cfg(feature = "tonic-tls")]
use ::tonic::transport::ClientTlsConfig;
use ::tonic::transport::{Channel, Endpoint};
use ::tonic::Status;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::instancer::Owned;
use crate::{Closer, Error, Event, EventStream, Factory, Instance, InstanceSet, Instancer, Report};

/// How many changes wait for tonic's balancer: it reads them only while it serves a call, so
/// an idle channel's queue fills; the forwarding task then waits, keeping the state current.
const CHANGE_CAPACITY: usize = 1024;

/// The error a call fails with besides a [`Status`]: what tower services carry.
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

type EndpointFnDyn = dyn Fn(&Instance) -> Result<Endpoint, Error> + Send + Sync;

/// How [`balance_channel`] (and the [`Factory`] of per-instance channels) makes an endpoint of
/// an instance, and how long a call waits for an instance.
///
/// The default endpoint is `http://{addr}` (`addr` is [`Instance::addr`]; an address that
/// already has a scheme is kept as it is), with a connect timeout of 3 s and no request
/// timeout; [`tls`](Self::tls) (feature `tonic-tls`) makes it `https://{addr}`.
/// [`endpoint_fn`](Self::endpoint_fn) replaces all of this with your own function.
///
/// As a [`Factory`], it makes a lazily connected [`Channel`] per instance, for a
/// [`DefaultEndpointer`](crate::DefaultEndpointer) under sd's balancers.
///
/// ```
/// use std::time::Duration;
/// use sd_core::tonic::ChannelOptions;
/// use sd_core::Instance;
///
/// let options = ChannelOptions::new()
///     .connect_timeout(Duration::from_millis(500)).unwrap()
///     .timeout(Duration::from_secs(2)).unwrap();
/// let endpoint = options.endpoint(&Instance::new("127.0.0.1:50051")).unwrap();
/// assert_eq!(endpoint.uri().to_string(), "http://127.0.0.1:50051/");
/// assert_eq!(endpoint.get_connect_timeout(), Some(Duration::from_millis(500)));
/// assert!(options.endpoint(&Instance::new("not an address")).is_err());
/// ```
#[derive(Clone)]
pub struct ChannelOptions {
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    #[cfg(feature = "tonic-tls")]
    tls: Option<ClientTlsConfig>,
    custom: Option<Arc<EndpointFnDyn>>,
    no_instances_wait: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            connect_timeout: Some(Duration::from_secs(3)),
            timeout: None,
            #[cfg(feature = "tonic-tls")]
            tls: None,
            custom: None,
            no_instances_wait: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for ChannelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ChannelOptions");
        d.field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout);
        #[cfg(feature = "tonic-tls")]
        d.field("tls", &self.tls.is_some());
        d.field("endpoint_fn", &self.custom.is_some())
            .field("no_instances_wait", &self.no_instances_wait)
            .finish()
    }
}

fn above_zero(what: &str, value: Duration) -> Result<(), Error> {
    if value.is_zero() {
        return Err(Error::invalid_argument(format!(
            "{what} 0: give a duration above zero (e.g. Duration::from_secs(1))"
        )));
    }
    Ok(())
}

impl ChannelOptions {
    /// The defaults: `http://{addr}`, connect timeout 3 s, no request timeout, calls wait up to
    /// 1 s for an instance.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = sd_core::tonic::ChannelOptions::new();
    /// assert_eq!(options.no_instances_wait_time(), Duration::from_secs(1));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// How long connecting to an instance may take (default 3 s; above zero).
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::tonic::ChannelOptions;
    ///
    /// assert!(ChannelOptions::new().connect_timeout(Duration::from_secs(1)).is_ok());
    /// assert!(ChannelOptions::new().connect_timeout(Duration::ZERO).is_err());
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        above_zero("connect timeout", timeout)?;
        self.connect_timeout = Some(timeout);
        Ok(self)
    }

    /// How long one request may take (tonic's `Endpoint::timeout`; none by default; above
    /// zero). A call that runs out fails with `Cancelled`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::tonic::ChannelOptions;
    ///
    /// assert!(ChannelOptions::new().timeout(Duration::from_secs(5)).is_ok());
    /// assert!(ChannelOptions::new().timeout(Duration::ZERO).is_err());
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        above_zero("request timeout", timeout)?;
        self.timeout = Some(timeout);
        Ok(self)
    }

    /// Connects with TLS: endpoints become `https://{addr}` with this configuration (set its
    /// `domain_name` when instances register IP addresses). Feature `tonic-tls`.
    ///
    /// ```
    /// use sd_core::tonic::ChannelOptions;
    /// use sd_core::Instance;
    /// use tonic::transport::ClientTlsConfig;
    ///
    /// let options = ChannelOptions::new().tls(ClientTlsConfig::new().domain_name("greeter"));
    /// let endpoint = options.endpoint(&Instance::new("127.0.0.1:50051")).unwrap();
    /// assert_eq!(endpoint.uri().scheme_str(), Some("https"));
    /// ```
    #[cfg(feature = "tonic-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic-tls")))]
    pub fn tls(mut self, config: ClientTlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Makes endpoints with `f` instead (the timeouts and TLS above are then not applied: set
    /// them on the endpoint). An error skips the instance; it is tried again on the next change
    /// of the set.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::tonic::ChannelOptions;
    /// use sd_core::Instance;
    /// use tonic::transport::Endpoint;
    ///
    /// let options = ChannelOptions::new().endpoint_fn(|instance| {
    ///     let endpoint = Endpoint::from_shared(format!("http://{}", instance.addr()))
    ///         .map_err(|e| sd_core::Error::factory(instance, e))?;
    ///     Ok(endpoint.tcp_nodelay(true).timeout(Duration::from_secs(1)))
    /// });
    /// let endpoint = options.endpoint(&Instance::new("127.0.0.1:50051")).unwrap();
    /// assert!(endpoint.get_tcp_nodelay());
    /// ```
    pub fn endpoint_fn(
        mut self,
        f: impl Fn(&Instance) -> Result<Endpoint, Error> + Send + Sync + 'static,
    ) -> Self {
        self.custom = Some(Arc::new(f));
        self
    }

    /// How long a call through [`ChannelHandle::service`] waits for an instance when the
    /// channel has none, before failing with `Unavailable` (default 1 s; zero fails at once).
    /// The wait ends as soon as an instance arrives.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::tonic::ChannelOptions;
    ///
    /// let options = ChannelOptions::new().no_instances_wait(Duration::ZERO);
    /// assert_eq!(options.no_instances_wait_time(), Duration::ZERO);
    /// ```
    pub fn no_instances_wait(mut self, wait: Duration) -> Self {
        self.no_instances_wait = wait;
        self
    }

    /// The wait set by [`no_instances_wait`](Self::no_instances_wait).
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(sd_core::tonic::ChannelOptions::new().no_instances_wait_time(), Duration::from_secs(1));
    /// ```
    pub fn no_instances_wait_time(&self) -> Duration {
        self.no_instances_wait
    }

    /// The endpoint of `instance`, built as these options say: what [`balance_channel`] adds
    /// to its channel, for programs that build their own the same way. An address that is no
    /// valid URI authority is an [`Error::Factory`] naming the instance.
    ///
    /// ```
    /// use sd_core::tonic::ChannelOptions;
    /// use sd_core::Instance;
    ///
    /// let options = ChannelOptions::new();
    /// let endpoint = options.endpoint(&Instance::new("[::1]:50051")).unwrap();
    /// assert_eq!(endpoint.uri().to_string(), "http://[::1]:50051/");
    /// // A JSON registration's address.
    /// let json = Instance::from_value(r#"{"addr":"127.0.0.1:50052","weight":2}"#).unwrap();
    /// assert_eq!(options.endpoint(&json).unwrap().uri().port_u16(), Some(50052));
    /// assert!(options.endpoint(&Instance::new("no spaces please")).unwrap_err()
    ///     .to_string().contains("no spaces please"));
    /// ```
    pub fn endpoint(&self, instance: &Instance) -> Result<Endpoint, Error> {
        if let Some(custom) = &self.custom {
            return custom(instance);
        }
        let addr = instance.addr();
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{}://{addr}", self.scheme())
        };
        let mut endpoint =
            Endpoint::from_shared(uri).map_err(|e| Error::factory(instance.addr(), e))?;
        if let Some(timeout) = self.connect_timeout {
            endpoint = endpoint.connect_timeout(timeout);
        }
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        #[cfg(feature = "tonic-tls")]
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Error::factory(instance.addr(), e))?;
        }
        Ok(endpoint)
    }

    fn scheme(&self) -> &'static str {
        #[cfg(feature = "tonic-tls")]
        if self.tls.is_some() {
            return "https";
        }
        "http"
    }
}

/// A lazily connected [`Channel`] per instance (it connects on its first call, and again after
/// the connection breaks), for a [`DefaultEndpointer`](crate::DefaultEndpointer) under sd's
/// balancers. Must run within a tokio runtime (each channel spawns its worker).
///
/// ```
/// use sd_core::tonic::ChannelOptions;
/// use sd_core::{DefaultEndpointer, Endpointer, EndpointerOptions, Event, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let endpointer = DefaultEndpointer::owning(
///     Publisher::new(Event::from_instances(["127.0.0.1:50051", "bad address"])),
///     ChannelOptions::new(),
///     EndpointerOptions::new(),
/// )
/// .await;
/// // One channel: the instance whose address is no URI is skipped (and logged).
/// assert_eq!(endpointer.endpoints().unwrap().len(), 1);
/// # }
/// ```
impl Factory<Channel> for ChannelOptions {
    fn make(&self, instance: &Instance) -> Result<(Channel, Option<Closer>), Error> {
        Ok((self.endpoint(instance)?.connect_lazy(), None))
    }
}

/// What [`ChannelHandle::state`] watches: the instances the channel balances over, the last
/// discovery error, the instances that could not be made endpoints, and whether discovery has
/// stopped.
///
/// ```
/// use sd_core::tonic::{balance_channel, ChannelOptions};
/// use sd_core::{Event, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (_channel, handle) = balance_channel(
///     Publisher::new(Event::from_instances(["127.0.0.1:50051"])),
///     ChannelOptions::new(),
/// );
/// let state = handle.state().borrow().clone();
/// assert_eq!(state.instances(), &["127.0.0.1:50051"]);
/// assert!(state.error().is_none() && state.skipped().is_empty() && !state.is_stopped());
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ChannelState {
    instances: InstanceSet,
    error: Option<Error>,
    skipped: Vec<(Instance, Error)>,
    stopped: bool,
}

impl ChannelState {
    /// The instances the channel balances over: the discovered set, less those skipped.
    ///
    /// ```
    /// assert!(sd_core::tonic::ChannelState::default().instances().is_empty());
    /// ```
    pub fn instances(&self) -> &InstanceSet {
        &self.instances
    }

    /// The instancer's last error, until its next set of instances (the channel keeps its
    /// instances meanwhile).
    ///
    /// ```
    /// assert!(sd_core::tonic::ChannelState::default().error().is_none());
    /// ```
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Discovered instances that could not be made endpoints (an address that is no URI, an
    /// error of your [`endpoint_fn`](ChannelOptions::endpoint_fn)), with the error; each is
    /// tried again on the next change of the set.
    ///
    /// ```
    /// assert!(sd_core::tonic::ChannelState::default().skipped().is_empty());
    /// ```
    pub fn skipped(&self) -> &[(Instance, Error)] {
        &self.skipped
    }

    /// Whether discovery has stopped (the [`ChannelHandle`] was dropped, or the instancer
    /// stopped): the channel no longer follows the service.
    ///
    /// ```
    /// assert!(!sd_core::tonic::ChannelState::default().is_stopped());
    /// ```
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Why a call cannot go out now, if it cannot: discovery stopped, or no instance (and why).
    fn unavailable(&self, waited: Duration) -> Option<Status> {
        if self.stopped {
            return Some(Status::unavailable(
                "service discovery stopped (its ChannelHandle was dropped or its instancer \
                 stopped): this channel no longer follows the service's instances; keep the \
                 handle for as long as the channel is used",
            ));
        }
        if !self.instances.is_empty() {
            return None;
        }
        let why = if let Some(err) = &self.error {
            format!("service discovery is failing: {}", Report(err))
        } else if let Some((instance, err)) = self.skipped.first() {
            format!(
                "{} registered instance(s) could not be made endpoints; {}: {}",
                self.skipped.len(),
                instance.addr(),
                Report(err)
            )
        } else {
            "no instance of the service is registered".to_string()
        };
        Some(Status::unavailable(format!(
            "no instance to call after waiting {waited:?}: {why}"
        )))
    }
}

/// Owns what keeps a [`balance_channel`] following its instancer: the instancer and the
/// forwarding task. Dropping it stops both; the state then says stopped, and calls through
/// [`service`](Self::service) fail with `Unavailable`. (The channel itself keeps the
/// endpoints it had: tonic offers no way to end a balanced channel.)
///
/// ```
/// use sd_core::tonic::{balance_channel, ChannelOptions};
/// use sd_core::{Event, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (_channel, handle) = balance_channel(
///     Publisher::new(Event::from_instances(["127.0.0.1:50051"])),
///     ChannelOptions::new(),
/// );
/// let state = handle.state();
/// drop(handle);
/// assert!(state.borrow().is_stopped());
/// # }
/// ```
#[must_use = "dropping the handle stops discovery: keep it for as long as the channel is used"]
pub struct ChannelHandle {
    state: Arc<watch::Sender<ChannelState>>,
    channel: Channel,
    wait: Duration,
    task: JoinHandle<()>,
    /// Stopped when the handle is dropped.
    _instancer: Owned,
}

impl fmt::Debug for ChannelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelHandle")
            .field("state", &*self.state.borrow())
            .field("no_instances_wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl ChannelHandle {
    /// A watch of the channel's [`ChannelState`]: `borrow()` reads it, `changed()` waits for
    /// the next change.
    ///
    /// ```
    /// use sd_core::tonic::{balance_channel, ChannelOptions};
    /// use sd_core::{Error, Event, Publisher};
    /// use std::sync::Arc;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let instancer = Arc::new(Publisher::new(Event::from_instances(["127.0.0.1:50051"])));
    /// let (_channel, handle) = balance_channel(instancer.clone(), ChannelOptions::new());
    /// let mut state = handle.state();
    /// instancer.publish(Event::Error(Error::backend_msg("etcd unreachable")));
    /// let now = state.wait_for(|s| s.error().is_some()).await.unwrap().clone();
    /// assert_eq!(now.instances().len(), 1, "instances are kept through a discovery error");
    /// # }
    /// ```
    pub fn state(&self) -> watch::Receiver<ChannelState> {
        self.state.subscribe()
    }

    /// The channel as a client transport (`GreeterClient::new(handle.service())`) that does
    /// not hang when there is nothing to call: with no instance, a call waits up to
    /// [`ChannelOptions::no_instances_wait`] for one, then fails with `Unavailable` saying
    /// why (nothing registered, discovery failing, endpoints that could not be made); once
    /// discovery has stopped, every call fails with `Unavailable` at once. Otherwise the call
    /// goes through the channel unchanged.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::tonic::{balance_channel, ChannelOptions};
    /// use sd_core::{Event, Publisher};
    /// use tower::Service;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let options = ChannelOptions::new().no_instances_wait(Duration::from_millis(10));
    /// let (_channel, handle) = balance_channel(Publisher::new(Event::empty()), options);
    /// let mut service = handle.service();
    /// std::future::poll_fn(|cx| service.poll_ready(cx)).await.unwrap();
    /// let err = service.call(http::Request::new(tonic::body::Body::empty())).await.unwrap_err();
    /// let status = err.downcast::<tonic::Status>().unwrap();
    /// assert_eq!(status.code(), tonic::Code::Unavailable);
    /// assert!(status.message().contains("no instance of the service is registered"));
    /// # }
    /// ```
    pub fn service(&self) -> ChannelService {
        ChannelService {
            channel: self.channel.clone(),
            state: self.state.subscribe(),
            wait: self.wait,
        }
    }
}

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        self.task.abort();
        // Only ever set, never cleared, so a publish of the aborted task racing this keeps it.
        self.state.send_modify(|s| s.stopped = true);
    }
}

/// The channel of a [`balance_channel`] as a tower service (a tonic client transport) that
/// fails fast when there is nothing to call: see [`ChannelHandle::service`]. Cheap to clone.
///
/// ```
/// use sd_core::tonic::{balance_channel, ChannelOptions, ChannelService};
/// use sd_core::{Event, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (_channel, handle) = balance_channel(Publisher::new(Event::empty()), ChannelOptions::new());
/// let service: ChannelService = handle.service();
/// assert!(format!("{service:?}").contains("ChannelService"));
/// # }
/// ```
#[derive(Clone)]
pub struct ChannelService {
    channel: Channel,
    state: watch::Receiver<ChannelState>,
    wait: Duration,
}

impl fmt::Debug for ChannelService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelService")
            .field("instances", &self.state.borrow().instances.len())
            .field("no_instances_wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl tower::Service<http::Request<Body>> for ChannelService {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The channel's buffer has room: that is all readiness means for a balanced channel.
        tower::Service::poll_ready(&mut self.channel, cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The channel made ready holds the buffer slot: it goes with the call.
        let mut ready = self.channel.clone();
        std::mem::swap(&mut ready, &mut self.channel);
        let mut state = self.state.clone();
        let wait = self.wait;
        Box::pin(async move {
            admit(&mut state, wait).await?;
            tower::Service::call(&mut ready, request)
                .await
                .map_err(Into::into)
        })
    }
}

/// Returns at once while the channel has instances; otherwise waits up to `wait` for one, and
/// fails with the reason there is none.
async fn admit(state: &mut watch::Receiver<ChannelState>, wait: Duration) -> Result<(), Status> {
    {
        let now = state.borrow();
        if !now.stopped && !now.instances.is_empty() {
            return Ok(());
        }
    }
    // Ends at once when stopped; an error (every sender gone) comes after the handle's drop
    // marked the state stopped.
    let _ = tokio::time::timeout(
        wait,
        state.wait_for(|s| s.stopped || !s.instances.is_empty()),
    )
    .await;
    match state.borrow().unavailable(wait) {
        Some(status) => Err(status),
        None => Ok(()),
    }
}

/// Makes a tonic [`Channel`] that balances over `instancer`'s instances (tonic's power of two
/// choices), each made an [`Endpoint`] by `options`, and the [`ChannelHandle`] that owns the
/// instancer and the task forwarding its changes to the channel.
///
/// The first set of instances is in the state when this returns (an instancer's first event
/// is immediate). A discovery error keeps the channel's endpoints (and shows in the state); an
/// instance that cannot be made an endpoint is skipped (logged, in
/// [`ChannelState::skipped`], tried again on the next change). Must be called within a tokio
/// runtime.
///
/// ```
/// use std::sync::Arc;
/// use sd_core::tonic::{balance_channel, ChannelOptions};
/// use sd_core::{Event, Publisher};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let instancer = Arc::new(Publisher::new(Event::from_instances(["127.0.0.1:50051"])));
/// let (channel, handle) = balance_channel(instancer.clone(), ChannelOptions::new());
/// let mut state = handle.state();
/// instancer.publish(Event::from_instances(["127.0.0.1:50051", "127.0.0.1:50052"]));
/// state.wait_for(|s| s.instances().len() == 2).await.unwrap();
/// # drop(channel);
/// # }
/// ```
pub fn balance_channel<I>(instancer: I, options: ChannelOptions) -> (Channel, ChannelHandle)
where
    I: Instancer + 'static,
{
    let instancer = Owned::new(instancer);
    let (channel, tx) = Channel::balance_channel(CHANGE_CAPACITY);
    let state = Arc::new(watch::Sender::new(ChannelState::default()));
    let wait = options.no_instances_wait;
    let mut forwarder = Forwarder {
        events: instancer.get().subscribe(),
        options,
        tx,
        state: state.clone(),
        last: InstanceSet::new(),
        failed: BTreeMap::new(),
        in_channel: HashSet::new(),
        queue: VecDeque::new(),
        error: None,
        dirty: false,
    };
    // An instancer's first event is ready at once: the state is right before the first call
    // (the channel gets its endpoints as soon as the task runs).
    let ended = match forwarder.events.next().now_or_never() {
        Some(Some(event)) => {
            forwarder.apply(event);
            forwarder.publish();
            false
        }
        Some(None) => true,
        None => false,
    };
    let task = tokio::spawn(
        async move {
            if ended {
                forwarder.stopped(End::Instancer);
            } else {
                forwarder.run().await;
            }
        }
        .instrument(tracing::error_span!("sd_tonic_channel")),
    );
    let handle = ChannelHandle {
        state,
        channel: channel.clone(),
        wait,
        task,
        _instancer: instancer,
    };
    (channel, handle)
}

/// A change waiting for tonic's balancer; checked against the wanted set when it is sent, so
/// changes overtaken by later events are dropped rather than applied out of date.
enum Op {
    /// Boxed: an endpoint is large, and most queued changes are removals or overtaken.
    Insert(Instance, Box<Endpoint>),
    Remove(Instance),
}

/// Why the forwarding task ended.
enum End {
    /// The instancer's stream ended.
    Instancer,
    /// The channel and every clone of it were dropped.
    Channel,
}

/// The forwarding task: instancer events in, tonic `Change`s out.
struct Forwarder {
    events: EventStream,
    options: ChannelOptions,
    tx: mpsc::Sender<Change<Instance, Endpoint>>,
    state: Arc<watch::Sender<ChannelState>>,
    /// The last set of instances discovered.
    last: InstanceSet,
    /// Instances of `last` whose endpoint could not be made, with why.
    failed: BTreeMap<Instance, Error>,
    /// What tonic's balancer has been sent.
    in_channel: HashSet<Instance>,
    queue: VecDeque<Op>,
    error: Option<Error>,
    /// The state changed since it was last published.
    dirty: bool,
}

impl Forwarder {
    async fn run(mut self) {
        let cause = loop {
            let event = match self.next_op() {
                Some(op) => {
                    match self.tx.try_reserve() {
                        Ok(permit) => {
                            send(&mut self.in_channel, permit, op);
                            continue;
                        }
                        Err(mpsc::error::TrySendError::Closed(())) => break End::Channel,
                        Err(mpsc::error::TrySendError::Full(())) => {}
                    }
                    // tonic's balancer reads changes only while it serves a call: until one
                    // comes, wait for room, and keep the state current meanwhile.
                    self.publish();
                    tokio::select! {
                        biased;
                        event = self.events.next() => {
                            self.queue.push_front(op);
                            event
                        }
                        permit = self.tx.reserve() => match permit {
                            Ok(permit) => {
                                send(&mut self.in_channel, permit, op);
                                continue;
                            }
                            Err(_) => break End::Channel,
                        },
                    }
                }
                None => {
                    self.publish();
                    tokio::select! {
                        event = self.events.next() => event,
                        // The channel and every clone of it are gone: nothing to feed.
                        _ = self.tx.closed() => break End::Channel,
                    }
                }
            };
            match event {
                Some(event) => self.apply(event),
                None => break End::Instancer,
            }
        };
        self.stopped(cause);
    }

    /// The next queued change that still applies.
    fn next_op(&mut self) -> Option<Op> {
        while let Some(op) = self.queue.pop_front() {
            let applies = match &op {
                Op::Insert(i, _) => {
                    self.last.contains(i)
                        && !self.failed.contains_key(i)
                        && !self.in_channel.contains(i)
                }
                Op::Remove(i) => self.in_channel.contains(i) && !self.last.contains(i),
            };
            if applies {
                return Some(op);
            }
        }
        None
    }

    fn make(&mut self, instance: &Instance) {
        // A custom endpoint function is the user's code: its panic skips the instance (as the
        // default endpointer's factory does) instead of ending discovery for the channel.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.options.endpoint(instance)
        }))
        .unwrap_or_else(|_| {
            Err(Error::factory(
                instance.addr(),
                Panicked("the endpoint function panicked"),
            ))
        });
        match made {
            Ok(endpoint) => {
                self.failed.remove(instance);
                self.queue
                    .push_back(Op::Insert(instance.clone(), Box::new(endpoint)));
            }
            Err(err) => {
                tracing::warn!(%instance, error = %Report(&err), "no endpoint for this instance: skipped until the set changes");
                self.failed.insert(instance.clone(), err);
            }
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Instances(set) => {
                let mut added = Vec::new();
                for change in self.last.changes(&set) {
                    match change {
                        crate::Change::Added(i) => added.push(i.clone()),
                        crate::Change::Removed(i) => {
                            self.failed.remove(i);
                            self.queue.push_back(Op::Remove(i.clone()));
                        }
                    }
                }
                added.extend(self.failed.keys().cloned().collect::<Vec<_>>());
                self.last = set;
                for instance in &added {
                    self.make(instance);
                }
                if self.error.take().is_some() {
                    tracing::info!("service discovery recovered");
                }
            }
            Event::Error(err) => {
                // One warning per outage; the errors during it are in the state.
                if self.error.is_none() {
                    tracing::warn!(error = %Report(&err), "service discovery error: the channel keeps its endpoints");
                } else {
                    tracing::debug!(error = %Report(&err), "service discovery error");
                }
                self.error = Some(err);
            }
        }
        self.dirty = true;
    }

    /// Publishes the state if it changed: once the channel has been handed the changes (or
    /// cannot take them yet), so a caller that saw an instance leave the state never reaches
    /// it through a call made afterwards.
    fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let mut instances = self.last.clone();
        for instance in self.failed.keys() {
            instances.remove(instance);
        }
        let skipped = self
            .failed
            .iter()
            .map(|(i, e)| (i.clone(), e.clone()))
            .collect();
        let error = self.error.clone();
        self.state.send_modify(|s| {
            s.instances = instances;
            s.error = error;
            s.skipped = skipped;
        });
    }

    fn stopped(&mut self, cause: End) {
        self.publish();
        match cause {
            End::Instancer => tracing::warn!(
                instances = self.in_channel.len(),
                "service discovery stopped: the channel keeps its endpoints but no longer follows the service"
            ),
            End::Channel => {
                tracing::debug!("the channel is gone: service discovery for it stops")
            }
        }
        self.state.send_modify(|s| s.stopped = true);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // However the task ended, the state says discovery no longer runs.
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.stopped, true));
    }
}

/// Why an endpoint function gave no endpoint when it panicked.
#[derive(Debug)]
struct Panicked(&'static str);

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Panicked {}

/// Hands `op` to tonic's balancer and records what it now has.
fn send(
    in_channel: &mut HashSet<Instance>,
    permit: mpsc::Permit<'_, Change<Instance, Endpoint>>,
    op: Op,
) {
    match op {
        Op::Insert(instance, endpoint) => {
            in_channel.insert(instance.clone());
            permit.send(Change::Insert(instance, *endpoint));
        }
        Op::Remove(instance) => {
            in_channel.remove(&instance);
            permit.send(Change::Remove(instance));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tower::Service;

    use super::*;
    use crate::Publisher;

    async fn wait_for_state(
        handle: &ChannelHandle,
        what: &str,
        done: impl FnMut(&ChannelState) -> bool,
    ) -> ChannelState {
        let mut state = handle.state();
        let seen = tokio::time::timeout(Duration::from_secs(10), state.wait_for(done))
            .await
            .map(|r| r.map(|s| s.clone()));
        match seen {
            Ok(Ok(s)) => s,
            _ => panic!("state never showed {what}: {:?}", *state.borrow()),
        }
    }

    /// Calls through `handle.service()` with an empty request: the status it fails with.
    async fn call_status(handle: &ChannelHandle) -> Status {
        let mut service = handle.service();
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .expect("the channel's buffer is ready");
        let err = service
            .call(http::Request::new(Body::empty()))
            .await
            .expect_err("nothing to call");
        *err.downcast::<Status>().expect("a status")
    }

    #[tokio::test]
    async fn skipped_instances_are_in_the_state_and_tried_again_on_the_next_change() {
        let accept_b = Arc::new(AtomicBool::new(false));
        let accept = accept_b.clone();
        let options = ChannelOptions::new().endpoint_fn(move |i| {
            if i.as_str() == "127.0.0.1:2" && !accept.load(Ordering::SeqCst) {
                return Err(Error::factory(i, std::io::Error::other("not yet")));
            }
            Endpoint::from_shared(format!("http://{i}")).map_err(|e| Error::factory(i, e))
        });
        let instancer = Arc::new(Publisher::new(Event::from_instances([
            "127.0.0.1:1",
            "127.0.0.1:2",
        ])));
        let (_channel, handle) = balance_channel(instancer.clone(), options);
        let state = handle.state().borrow().clone();
        assert_eq!(state.instances(), &["127.0.0.1:1"]);
        assert_eq!(state.skipped().len(), 1);
        assert_eq!(state.skipped()[0].0, "127.0.0.1:2");
        assert!(
            Report(&state.skipped()[0].1)
                .to_string()
                .contains("not yet"),
            "{:?}",
            state.skipped()
        );

        accept_b.store(true, Ordering::SeqCst);
        instancer.publish(Event::from_instances([
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3",
        ]));
        let state = wait_for_state(&handle, "3 instances", |s| s.instances().len() == 3).await;
        assert!(state.skipped().is_empty());
    }

    /// A panicking endpoint function skips its instance, at the first event and later ones,
    /// and discovery goes on.
    #[tokio::test]
    async fn an_endpoint_function_that_panics_skips_its_instance() {
        let options = ChannelOptions::new().endpoint_fn(|i| {
            let port: u16 = i
                .as_str()
                .rsplit(':')
                .next()
                .unwrap_or("")
                .parse()
                .expect("a port");
            Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .map_err(|e| Error::factory(i, e))
        });
        let instancer = Arc::new(Publisher::new(Event::from_instances([
            "127.0.0.1:1",
            "127.0.0.1:x",
        ])));
        let (_channel, handle) = balance_channel(instancer.clone(), options);
        let state = handle.state().borrow().clone();
        assert_eq!(state.instances(), &["127.0.0.1:1"]);
        assert_eq!(state.skipped().len(), 1);
        assert!(
            Report(&state.skipped()[0].1)
                .to_string()
                .contains("panicked"),
            "{:?}",
            state.skipped()
        );
        instancer.publish(Event::from_instances([
            "127.0.0.1:1",
            "127.0.0.1:y",
            "127.0.0.1:3",
        ]));
        let state =
            wait_for_state(&handle, "the third instance", |s| s.instances().len() == 2).await;
        assert_eq!(state.instances(), &["127.0.0.1:1", "127.0.0.1:3"]);
        assert!(!state.is_stopped());
    }

    #[tokio::test]
    async fn the_state_stays_current_while_an_idle_channel_takes_no_changes() {
        // No call is made, so tonic's balancer reads none of the changes: past the queue's
        // capacity the task waits, and the state must still follow the instancer.
        let instancer = Arc::new(Publisher::new(Event::empty()));
        let (_channel, handle) = balance_channel(instancer.clone(), ChannelOptions::new());
        let set =
            |n: usize| Event::from_instances((0..n).map(|i| format!("127.0.0.1:{}", 1000 + i)));
        instancer.publish(set(CHANGE_CAPACITY * 2));
        wait_for_state(&handle, "the first large set", |s| {
            s.instances().len() == CHANGE_CAPACITY * 2
        })
        .await;
        instancer.publish(set(3));
        wait_for_state(&handle, "the set shrunk to 3", |s| s.instances().len() == 3).await;
        instancer.publish(Event::Error(Error::backend_msg("etcd down")));
        let state = wait_for_state(&handle, "the error", |s| s.error().is_some()).await;
        assert_eq!(state.instances().len(), 3, "an error keeps the instances");
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_instancer_and_fails_calls_at_once() {
        let instancer = Arc::new(Publisher::new(Event::from_instances(["127.0.0.1:1"])));
        let (_channel, handle) = balance_channel(
            instancer.clone(),
            ChannelOptions::new().no_instances_wait(Duration::from_secs(3600)),
        );
        let mut service = handle.service();
        let state = handle.state();
        drop(handle);
        assert!(instancer.is_stopped(), "the handle owned the instancer");
        assert!(state.borrow().is_stopped());
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let err = service
            .call(http::Request::new(Body::empty()))
            .await
            .unwrap_err();
        let status = err.downcast::<Status>().unwrap();
        assert_eq!(status.code(), ::tonic::Code::Unavailable);
        assert!(
            status.message().contains("service discovery stopped"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn the_instancer_stopping_shows_in_the_state() {
        let instancer = Arc::new(Publisher::new(Event::from_instances(["127.0.0.1:1"])));
        let (_channel, handle) = balance_channel(instancer.clone(), ChannelOptions::new());
        instancer.stop();
        let state = wait_for_state(&handle, "stopped", ChannelState::is_stopped).await;
        assert_eq!(state.instances().len(), 1);
        assert!(call_status(&handle)
            .await
            .message()
            .contains("service discovery stopped"));

        // An instancer stopped before it was given: stopped from the start.
        let (_channel, handle) = balance_channel(instancer, ChannelOptions::new());
        wait_for_state(&handle, "stopped", ChannelState::is_stopped).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_with_no_instance_waits_then_says_why() {
        let wait = Duration::from_secs(2);
        let instancer = Arc::new(Publisher::new(Event::empty()));
        let options = ChannelOptions::new().no_instances_wait(wait);
        let (_channel, handle) = balance_channel(instancer.clone(), options);

        let started = tokio::time::Instant::now();
        let status = call_status(&handle).await;
        assert_eq!(started.elapsed(), wait, "failed after the wait, not before");
        assert_eq!(status.code(), ::tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "no instance to call after waiting 2s: no instance of the service is registered"
        );

        instancer.publish(Event::Error(Error::backend_msg("etcd down")));
        wait_for_state(&handle, "the error", |s| s.error().is_some()).await;
        let status = call_status(&handle).await;
        assert!(
            status
                .message()
                .ends_with("service discovery is failing: etcd down"),
            "{status:?}"
        );

        instancer.publish(Event::from_instances(["no spaces allowed"]));
        wait_for_state(&handle, "the skipped instance", |s| !s.skipped().is_empty()).await;
        let status = call_status(&handle).await;
        assert!(
            status.message().contains(
                "1 registered instance(s) could not be made endpoints; no spaces allowed"
            ),
            "{status:?}"
        );
    }
}
