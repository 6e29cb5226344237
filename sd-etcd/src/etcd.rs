//! [`EtcdClient`]: the [`Client`] trait on a real etcd, with endpoint failover.
//!
//! etcd-client balances calls over all endpoints through one tonic channel, and keeps sending a
//! share of them to a dead endpoint for as long as it is dead. So this client holds one
//! etcd-client connection per endpoint and chooses itself: calls go to a *pinned* endpoint; an
//! endpoint whose call fails with a retryable error (unavailable, transport error, leader change,
//! no leader, timeout) is taken out of rotation, the call is retried on the next one, and a
//! background probe puts the endpoint back once its `status()` answers again. Every operation of
//! the trait is safe to retry (puts and deletes are idempotent; a retried `grant` may leave an
//! unused lease behind, which expires at its TTL).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse,
};
use futures::StreamExt;
use tokio::time::{timeout, Instant};

use crate::error::{is_auth, is_lease_not_found, is_retryable_etcd};
use crate::{Client, ClientOptions, Error, KeyValue, WatchBatch, WatchEvent, WatchStream};

/// How often a watch asks etcd for a progress notification, and how long it waits for one
/// before treating the node as hung (a SIGSTOPped node keeps its TCP connection open).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(700);
const PROGRESS_DEADLINE: Duration = Duration::from_millis(1300);
/// How often a dead endpoint is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The etcd implementation of [`Client`]. Cheap to clone (shared connections); share one among
/// any number of registrars and instancers.
///
/// ```no_run
/// use sd_etcd::{ClientOptions, EtcdClient};
///
/// # async fn run() -> Result<(), sd_etcd::Error> {
/// let client = EtcdClient::connect(
///     ["http://127.0.0.1:2379", "http://127.0.0.1:22379"],
///     ClientOptions::new(),
/// )
/// .await?;
/// println!("{client:?}");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdClient {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Vec<Node>,
    pinned: AtomicUsize,
    options: ClientOptions,
    connect: ConnectOptions,
}

struct Node {
    url: String,
    client: Mutex<Option<etcd_client::Client>>,
    dead: AtomicBool,
    probing: AtomicBool,
}

impl fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self
            .inner
            .nodes
            .iter()
            .map(|n| {
                let state = if n.dead.load(Ordering::Relaxed) {
                    "down"
                } else {
                    "up"
                };
                format!("{} ({state})", n.url)
            })
            .collect();
        f.debug_struct("EtcdClient")
            .field("endpoints", &nodes)
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Follows an error's `source()` chain, where tonic hides the useful part.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Converts an etcd-client error, recognising auth and lease errors.
fn classify(op: &'static str, e: etcd_client::Error, lease: Option<i64>) -> Error {
    if is_auth(&e) {
        return Error::Auth(chain(&e));
    }
    if let Some(lease) = lease {
        if is_lease_not_found(&e) {
            return Error::LeaseNotFound(lease);
        }
    }
    Error::etcd(op, e)
}

/// A hint for the most common connection failures.
fn hint(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    // The server's alert when a client certificate is missing or not trusted (which one
    // arrives, or a bare "connection closed", depends on timing and TLS version).
    if r.contains("badcertificate")
        || r.contains("bad certificate")
        || r.contains("certificaterequired")
        || r.contains("certificate required")
    {
        " (etcd rejected the client certificate or requires one: give one signed by a CA etcd \
         trusts with ClientOptions::with_client_cert_files)"
    } else if r.contains("certificate") || r.contains("tls") || r.contains("handshake") {
        " (TLS failed: check the CA certificate given to ClientOptions::with_ca_file, the client \
         certificate, and that the endpoints are https://)"
    } else if r.contains("connection closed")
        || r.contains("canceled")
        || r.contains("broken pipe")
        || r.contains("connection reset")
    {
        " (the server closed the connection: if it requires client certificates, give one with \
         ClientOptions::with_client_cert_files; check the endpoint's scheme, http:// or https://)"
    } else if r.contains("refused") {
        " (connection refused: is etcd running there, on that port?)"
    } else if r.contains("timed out") || r.contains("deadline") {
        " (no answer: is the address right and reachable?)"
    } else {
        ""
    }
}

impl EtcdClient {
    /// Connects to etcd: validates `options` (reading every certificate), then probes the
    /// endpoints with a `status()` call and returns once one answers. Fails with
    /// [`Error::Connect`] naming the endpoints when none answers within the dial timeout, or
    /// [`Error::Auth`] when etcd refuses the credentials.
    ///
    /// ```no_run
    /// use sd_etcd::{ClientOptions, EtcdClient};
    ///
    /// # async fn run() -> Result<(), sd_etcd::Error> {
    /// let options = ClientOptions::new()
    ///     .with_ca_file("ca.pem")
    ///     .with_client_cert_files("client.pem", "client-key.pem")
    ///     .with_user("root", "secret");
    /// let client = EtcdClient::connect(["https://127.0.0.1:2379"], options).await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub async fn connect<I, S>(endpoints: I, options: ClientOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|e| e.as_ref().trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let tls = options.validate_for(&endpoints)?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout())
            .with_keep_alive(options.keep_alive_interval(), options.keep_alive_timeout())
            // Idle pings without streams count as strikes against etcd's ping policy.
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some((user, password)) = options.credentials() {
            connect = connect
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = tls.ca {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(t);
        }
        let inner = Arc::new(Inner {
            nodes: endpoints
                .iter()
                .map(|url| Node {
                    url: url.clone(),
                    client: Mutex::new(None),
                    dead: AtomicBool::new(false),
                    probing: AtomicBool::new(false),
                })
                .collect(),
            pinned: AtomicUsize::new(0),
            options,
            connect,
        });
        // Probe every endpoint at once; return at the first answer, and let the probes still
        // running take their endpoints out of rotation if they fail.
        let mut probes: futures::stream::FuturesUnordered<_> = (0..inner.nodes.len())
            .map(|i| {
                let inner = inner.clone();
                async move { (i, inner.probe(i).await) }
            })
            .collect();
        let mut reasons = Vec::new();
        let mut first_ok = None;
        while let Some((i, r)) = probes.next().await {
            match r {
                Ok(()) => {
                    first_ok = Some(i);
                    break;
                }
                Err(e @ Error::Auth(_)) => return Err(e),
                Err(e) => reasons.push((i, e)),
            }
        }
        let Some(first) = first_ok else {
            let reason = reasons
                .iter()
                .map(|(i, e)| {
                    let text = match e {
                        Error::Etcd { source, .. } => chain(source.as_ref()),
                        other => other.to_string(),
                    };
                    format!("{}: {text}{}", inner.nodes[*i].url, hint(&text))
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::Connect {
                endpoints,
                timeout: inner.options.connect_timeout(),
                reason,
            });
        };
        inner.pinned.store(first, Ordering::Relaxed);
        for (i, e) in reasons {
            tracing::warn!(endpoint = %inner.nodes[i].url, error = %e, "etcd endpoint down at connect");
            inner.mark_dead(i);
        }
        if !probes.is_empty() {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                while let Some((i, r)) = probes.next().await {
                    if let (Err(e), Some(inner)) = (r, weak.upgrade()) {
                        tracing::warn!(endpoint = %inner.nodes[i].url, error = %e, "etcd endpoint down at connect");
                        inner.mark_dead(i);
                    }
                }
            });
        }
        Ok(EtcdClient { inner })
    }

    /// The endpoints this client was given.
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) {
    /// println!("{:?}", client.endpoints());
    /// # }
    /// ```
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The endpoints currently in rotation (those not found dead).
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) {
    /// assert!(!client.live_endpoints().is_empty());
    /// # }
    /// ```
    pub fn live_endpoints(&self) -> Vec<String> {
        self.inner
            .nodes
            .iter()
            .filter(|n| !n.dead.load(Ordering::Relaxed))
            .map(|n| n.url.clone())
            .collect()
    }

    /// The endpoint calls go to now (the pinned one; another is chosen when it fails).
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) {
    /// println!("{}", client.current_endpoint());
    /// # }
    /// ```
    pub fn current_endpoint(&self) -> String {
        self.inner.nodes[self.inner.pick()].url.clone()
    }

    /// The options this client was built with.
    ///
    /// ```no_run
    /// # async fn run(client: sd_etcd::EtcdClient) {
    /// println!("{:?}", client.options().request_timeout());
    /// # }
    /// ```
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Runs `f` on a live endpoint within the request timeout, retrying retryable failures on
    /// the next endpoint. Returns the result and the endpoint that produced it.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<(T, usize), Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let inner = &self.inner;
        let n = inner.nodes.len();
        let attempts = n.max(2);
        let request_timeout = inner.options.request_timeout();
        let mut last = None;
        for attempt in 0..attempts {
            if attempt > 0 && n == 1 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let i = inner.pick();
            let client = match timeout(inner.options.connect_timeout(), inner.node_client(i)).await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) if !e.is_retryable() => return Err(e),
                Ok(Err(e)) => {
                    inner.mark_dead(i);
                    last = Some(e);
                    continue;
                }
                Err(_) => {
                    inner.mark_dead(i);
                    last = Some(Error::Timeout {
                        op,
                        after: inner.options.connect_timeout(),
                    });
                    continue;
                }
            };
            let guard = InFlight {
                inner,
                node: i,
                start: Instant::now(),
                done: false,
            };
            let result = timeout(request_timeout, f(client)).await;
            guard.finish();
            match result {
                Ok(Ok(v)) => return Ok((v, i)),
                Ok(Err(e)) if e.is_retryable() => {
                    tracing::debug!(endpoint = %inner.nodes[i].url, error = %e, op, "retryable etcd error");
                    inner.mark_dead(i);
                    last = Some(e);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    tracing::debug!(endpoint = %inner.nodes[i].url, op, "etcd call timed out");
                    let err = Error::Timeout {
                        op,
                        after: request_timeout,
                    };
                    if n == 1 {
                        // The only endpoint is hung or overloaded: waiting again helps no one.
                        return Err(err);
                    }
                    inner.mark_dead(i);
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or(Error::Stopped))
    }
}

/// A call in flight on one endpoint. If the caller gives up on it (drops the future, e.g. a
/// registrar whose heartbeat deadline passed) after [`SLOW_CALL`], the endpoint is treated as
/// hung and taken out of rotation, so the caller's next attempt goes elsewhere.
struct InFlight<'a> {
    inner: &'a Arc<Inner>,
    node: usize,
    start: Instant,
    done: bool,
}

/// How long a call may run before abandoning it counts against its endpoint.
const SLOW_CALL: Duration = Duration::from_millis(400);

impl InFlight<'_> {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done && self.start.elapsed() >= SLOW_CALL {
            tracing::debug!(
                endpoint = %self.inner.nodes[self.node].url,
                "etcd call abandoned while in flight: endpoint treated as hung"
            );
            self.inner.mark_dead(self.node);
        }
    }
}

impl Inner {
    /// The pinned endpoint if alive, else the next live one (or the pinned one if all are down).
    fn pick(&self) -> usize {
        let n = self.nodes.len();
        let start = self.pinned.load(Ordering::Relaxed) % n;
        for k in 0..n {
            let i = (start + k) % n;
            if !self.nodes[i].dead.load(Ordering::Relaxed) {
                if k > 0 {
                    self.pinned.store(i, Ordering::Relaxed);
                }
                return i;
            }
        }
        start
    }

    /// Takes endpoint `i` out of rotation and probes it in the background until it answers.
    fn mark_dead(self: &Arc<Self>, i: usize) {
        if self.nodes.len() < 2 {
            return;
        }
        let node = &self.nodes[i];
        node.dead.store(true, Ordering::Relaxed);
        let _ = self.pinned.compare_exchange(
            i,
            (i + 1) % self.nodes.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if node.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            node.probing.store(false, Ordering::Release);
            return;
        };
        tracing::info!(endpoint = %node.url, "etcd endpoint taken out of rotation");
        let weak: Weak<Inner> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.probe(i).await.is_ok() {
                    let node = &inner.nodes[i];
                    node.dead.store(false, Ordering::Relaxed);
                    node.probing.store(false, Ordering::Release);
                    tracing::info!(endpoint = %node.url, "etcd endpoint back in rotation");
                    return;
                }
            }
        });
    }

    /// One `status()` round trip to endpoint `i`, within the dial timeout.
    async fn probe(&self, i: usize) -> Result<(), Error> {
        let dial = self.options.connect_timeout();
        let attempt = async {
            let mut c = self.node_client(i).await?;
            c.status()
                .await
                .map(|_| ())
                .map_err(|e| classify("status", e, None))
        };
        match timeout(dial, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                op: "status",
                after: dial,
            }),
        }
    }

    /// The connection to endpoint `i`, made on first use (it authenticates when credentials
    /// are set, so it needs the endpoint up).
    async fn node_client(&self, i: usize) -> Result<etcd_client::Client, Error> {
        let node = &self.nodes[i];
        if let Some(c) = node.lock().as_ref() {
            return Ok(c.clone());
        }
        let c = etcd_client::Client::connect([node.url.as_str()], Some(self.connect.clone()))
            .await
            .map_err(|e| classify("connect", e, None))?;
        *node.lock() = Some(c.clone());
        Ok(c)
    }
}

impl Node {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<etcd_client::Client>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn batch_of(resp: &WatchResponse) -> WatchBatch {
    let events = resp
        .events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let mod_revision = kv.mod_revision();
            Some(match ev.event_type() {
                EventType::Put => WatchEvent::Put {
                    key,
                    value: String::from_utf8_lossy(kv.value()).into_owned(),
                    mod_revision,
                },
                EventType::Delete => WatchEvent::Delete { key, mod_revision },
            })
        })
        .collect();
    WatchBatch {
        events,
        header_revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        canceled: resp.canceled(),
        compact_revision: resp.compact_revision(),
        cancel_reason: resp.cancel_reason().to_string(),
    }
}

/// The state of one open watch, driven by [`watch_stream`].
struct WatchState {
    ws: etcd_client::WatchStream,
    client: etcd_client::Client,
    pending: Option<WatchResponse>,
    inner: Arc<Inner>,
    node: usize,
    tick: tokio::time::Interval,
    deadline: Option<Instant>,
    done: bool,
}

/// Turns an open etcd watch into a [`WatchStream`]: converts responses, asks for progress
/// every [`PROGRESS_INTERVAL`] and ends with an error when the node stops answering.
fn watch_stream(st: WatchState) -> WatchStream {
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(resp) = st.pending.take() {
            let b = batch_of(&resp);
            st.done = b.canceled;
            return Some((Ok(b), st));
        }
        loop {
            let deadline = st.deadline;
            let hung = async move {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = st.ws.message() => {
                    st.deadline = None;
                    match msg {
                        Ok(Some(resp)) => {
                            if resp.created() && !resp.canceled() && resp.events().is_empty() {
                                continue;
                            }
                            let b = batch_of(&resp);
                            if b.canceled {
                                st.done = true;
                                let reason = &b.cancel_reason;
                                // etcd 3.4 cancels a watch whose token expired with "permission
                                // denied", later versions name the token.
                                if reason.contains("auth")
                                    || reason.contains("token")
                                    || reason.contains("permission denied")
                                {
                                    // etcd-client does not refresh tokens for watches.
                                    if let Err(e) = st.client.refresh_token().await {
                                        tracing::warn!(error = %e, "refreshing the etcd auth token failed");
                                    }
                                }
                            }
                            return Some((Ok(b), st));
                        }
                        Ok(None) => {
                            st.done = true;
                            st.inner.mark_dead(st.node);
                            return Some((Err(Error::Watch("etcd closed the watch stream".into())), st));
                        }
                        Err(e) => {
                            st.done = true;
                            if is_retryable_etcd(&e) {
                                st.inner.mark_dead(st.node);
                            }
                            return Some((Err(classify("watch", e, None)), st));
                        }
                    }
                }
                _ = st.tick.tick() => {
                    if st.deadline.is_none() {
                        if st.ws.request_progress().await.is_err() {
                            st.done = true;
                            return Some((Err(Error::Watch("the watch request stream closed".into())), st));
                        }
                        st.deadline = Some(Instant::now() + PROGRESS_DEADLINE);
                    }
                }
                _ = hung => {
                    st.done = true;
                    st.inner.mark_dead(st.node);
                    let url = st.inner.nodes[st.node].url.clone();
                    return Some((Err(Error::Watch(format!(
                        "{url} did not answer a progress request within {PROGRESS_DEADLINE:?}: treating it as hung"
                    ))), st));
                }
            }
        }
    })
    .boxed()
}

#[async_trait]
impl Client for EtcdClient {
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), Error> {
        let (r, _) = self
            .call("get", |mut c| async move {
                let resp = c
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| classify("get", e, None))?;
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                let kvs = resp
                    .kvs()
                    .iter()
                    .map(|kv| KeyValue {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    })
                    .collect();
                Ok((kvs, rev))
            })
            .await?;
        Ok(r)
    }

    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, Error> {
        let ((ws, client, pending), node) = self
            .call("watch", |mut c| async move {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start_revision);
                let mut ws = c
                    .watch(prefix, Some(opts))
                    .await
                    .map_err(|e| classify("watch", e, None))?;
                // Wait for `created`, so a watch that returns is a watch etcd accepted.
                match ws.message().await {
                    Ok(Some(resp)) if resp.created() && !resp.canceled() => {
                        let pending = (!resp.events().is_empty()).then_some(resp);
                        Ok((ws, c, pending))
                    }
                    Ok(Some(resp)) => Ok((ws, c, Some(resp))),
                    Ok(None) => Err(Error::Watch(
                        "etcd closed the watch stream before creating the watch".into(),
                    )),
                    Err(e) => Err(classify("watch", e, None)),
                }
            })
            .await?;
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        Ok(watch_stream(WatchState {
            ws,
            client,
            pending,
            inner: self.inner.clone(),
            node,
            tick,
            deadline: None,
            done: false,
        }))
    }

    async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), Error> {
        let (r, _) = self
            .call("lease grant", |mut c| async move {
                let resp = c
                    .lease_grant(ttl_secs, None)
                    .await
                    .map_err(|e| classify("lease grant", e, None))?;
                Ok((resp.id(), resp.ttl()))
            })
            .await?;
        Ok(r)
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, Error> {
        let (r, _) = self
            .call("lease keep-alive", |mut c| async move {
                // etcd-client sends the first keep-alive request when it opens the stream and
                // reads the answer itself (TTL 0 becomes a "lease not found" error); a second
                // round tells us the remaining TTL.
                let (mut keeper, mut stream) = match c.lease_keep_alive(lease).await {
                    Ok(s) => s,
                    Err(e) if is_lease_not_found(&e) => return Ok(0),
                    Err(e) => return Err(classify("lease keep-alive", e, None)),
                };
                keeper
                    .keep_alive()
                    .await
                    .map_err(|e| classify("lease keep-alive", e, None))?;
                match stream.message().await {
                    Ok(Some(resp)) => Ok(resp.ttl().max(0)),
                    Ok(None) => Err(Error::Watch(
                        "etcd closed the lease keep-alive stream".into(),
                    )),
                    Err(e) if is_lease_not_found(&e) => Ok(0),
                    Err(e) => Err(classify("lease keep-alive", e, None)),
                }
            })
            .await?;
        Ok(r)
    }

    async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), Error> {
        self.call("put", |mut c| async move {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            c.put(key, value, opts)
                .await
                .map(|_| ())
                .map_err(|e| classify("put", e, lease))
        })
        .await?;
        Ok(())
    }

    async fn delete_if_lease(&self, key: &str, lease: i64) -> Result<bool, Error> {
        let (r, _) = self
            .call("delete", |mut c| async move {
                let txn = Txn::new()
                    .when([Compare::lease(key, CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(key, None)]);
                c.txn(txn)
                    .await
                    .map(|r| r.succeeded())
                    .map_err(|e| classify("delete", e, None))
            })
            .await?;
        Ok(r)
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        self.call("delete", |mut c| async move {
            c.delete(key, None)
                .await
                .map(|_| ())
                .map_err(|e| classify("delete", e, None))
        })
        .await?;
        Ok(())
    }

    async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.call("lease revoke", |mut c| async move {
            match c.lease_revoke(lease).await {
                Ok(_) => Ok(()),
                Err(e) if is_lease_not_found(&e) => Ok(()),
                Err(e) => Err(classify("lease revoke", e, None)),
            }
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::hint;

    #[test]
    fn hints_say_what_to_do() {
        let no_client_cert = "transport error: received fatal alert: BadCertificate";
        assert!(hint(no_client_cert).contains("with_client_cert_files"));
        assert!(hint("connection closed").contains("with_client_cert_files"));
        let closed_mid_handshake = "transport error: stream closed because of a broken pipe";
        assert!(hint(closed_mid_handshake).contains("with_client_cert_files"));
        let wrong_ca = "invalid peer certificate: UnknownIssuer";
        assert!(hint(wrong_ca).contains("with_ca_file"));
        assert!(hint("tcp connect error: Connection refused").contains("is etcd running"));
        assert_eq!(hint("something else"), "");
    }
}
