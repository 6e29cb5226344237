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
    Certificate, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseTimeToLiveOptions, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchResponse,
};
use futures::StreamExt;
use tokio::time::{timeout, Instant};
use tracing::Instrument;

use crate::error::{is_auth, is_lease_not_found, is_retryable_etcd, is_token_message};
use crate::{
    Client, ClientOptions, Error, Header, KeyValue, LeasePools, WatchBatch, WatchEvent, WatchStream,
};

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
    /// One keep-alive stream per lease, opened on first use and re-opened after a failure.
    keepers: Mutex<std::collections::HashMap<i64, KeeperSlot>>,
    /// The leases this client's registrars share.
    pools: LeasePools,
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
            keepers: Mutex::new(std::collections::HashMap::new()),
            pools: LeasePools::new(),
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
            inner.mark_dead_for(i, &e);
        }
        if !probes.is_empty() {
            let weak = Arc::downgrade(&inner);
            tokio::spawn(
                async move {
                    while let Some((i, r)) = probes.next().await {
                        if let (Err(e), Some(inner)) = (r, weak.upgrade()) {
                            inner.mark_dead_for(i, &e);
                        }
                    }
                }
                .instrument(tracing::error_span!("etcd_connect_probes")),
            );
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

    /// Runs `f` on a live endpoint within the request timeout, retrying node failures on the
    /// next endpoint, riding out etcd's back-pressure (`too many requests`: the same endpoint,
    /// after a backoff, within the request timeout) and renewing a refused auth token once.
    /// Returns the result and the endpoint that produced it.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<(T, usize), Error>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let inner = &self.inner;
        let n = inner.nodes.len();
        let attempts = n.max(2);
        let request_timeout = inner.options.request_timeout();
        let overload_until = Instant::now() + request_timeout;
        let mut overloads = 0u32;
        let mut refreshed = false;
        let mut last = None;
        let mut attempt = 0;
        while attempt < attempts {
            if attempt > 0 && n == 1 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            attempt += 1;
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
            let result = timeout(request_timeout, f(client.clone())).await;
            match result {
                Ok(Ok(v)) => return Ok((v, i)),
                Ok(Err(e)) if e.is_overload() => {
                    // The node is alive and asks us to slow down: not a node failure.
                    let pause = backoff(overloads, Duration::from_secs(1));
                    overloads += 1;
                    if Instant::now() + pause > overload_until {
                        return Err(e);
                    }
                    tracing::debug!(endpoint = %inner.nodes[i].url, op, "etcd is overloaded; backing off");
                    tokio::time::sleep(pause).await;
                    attempt -= 1;
                    last = Some(e);
                }
                Ok(Err(e)) if e.is_invalid_token() && !refreshed => {
                    // etcd forgot our token (it keeps tokens in memory: a restart drops them all).
                    refreshed = true;
                    tracing::info!(endpoint = %inner.nodes[i].url, op, "etcd refused the auth token; renewing it");
                    client
                        .refresh_token()
                        .await
                        .map_err(|e| classify("authenticate", e, None))?;
                    attempt -= 1;
                    last = Some(e);
                }
                Ok(Err(e)) if e.is_retryable() => {
                    tracing::debug!(endpoint = %inner.nodes[i].url, error = %sd_core::Report(&e), op, "retryable etcd error");
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

/// Exponential backoff from 50 ms, capped, with jitter.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(50).saturating_mul(1 << failures.min(16));
    base.min(cap).mul_f64(0.5 + fastrand::f64() * 0.5)
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
        self.take_out(i, None);
    }

    /// [`mark_dead`](Self::mark_dead), saying why in its warning.
    fn mark_dead_for(self: &Arc<Self>, i: usize, why: &Error) {
        self.take_out(i, Some(why));
    }

    fn take_out(self: &Arc<Self>, i: usize, why: Option<&Error>) {
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
        let span = tracing::error_span!("etcd_endpoint_probe", endpoint = %node.url);
        span.in_scope(|| match why {
            Some(e) => tracing::warn!(error = %sd_core::Report(e), "etcd endpoint down: out of rotation, probing it until it answers"),
            None => tracing::warn!("etcd endpoint taken out of rotation: probing it until it answers"),
        });
        let weak: Weak<Inner> = Arc::downgrade(self);
        rt.spawn(
            async move {
                loop {
                    tokio::time::sleep(PROBE_INTERVAL).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.probe(i).await.is_ok() {
                        let node = &inner.nodes[i];
                        node.dead.store(false, Ordering::Relaxed);
                        node.probing.store(false, Ordering::Release);
                        tracing::info!("etcd endpoint back in rotation");
                        return;
                    }
                }
            }
            .instrument(span),
        );
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

fn header_of(h: Option<&etcd_client::ResponseHeader>) -> Header {
    h.map(|h| Header {
        revision: h.revision(),
        cluster_id: h.cluster_id(),
        raft_term: h.raft_term(),
    })
    .unwrap_or_default()
}

fn kv_of(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn events_of(resp: &WatchResponse) -> impl Iterator<Item = WatchEvent> + '_ {
    resp.events().iter().filter_map(|ev| {
        let kv = ev.kv()?;
        let key = kv.key().to_vec();
        let mod_revision = kv.mod_revision();
        Some(match ev.event_type() {
            EventType::Put => WatchEvent::Put {
                key,
                value: kv.value().to_vec(),
                mod_revision,
            },
            EventType::Delete => WatchEvent::Delete { key, mod_revision },
        })
    })
}

fn batch_of(resp: &WatchResponse, mut fragments: Vec<WatchEvent>) -> WatchBatch {
    fragments.extend(events_of(resp));
    WatchBatch {
        events: fragments,
        header: header_of(resp.header()),
        canceled: resp.canceled(),
        compact_revision: resp.compact_revision(),
        cancel_reason: resp.cancel_reason().to_string(),
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's rule: the
/// prefix with its last byte below 0xff incremented; `\0` means "to the end").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

/// Pages of a prefix read aim at this many bytes (well under any decoding limit).
const PAGE_TARGET_BYTES: usize = 2 << 20;
/// The most keys one page asks for.
const PAGE_MAX_KEYS: i64 = 10_000;

fn too_large(e: &etcd_client::Error) -> bool {
    let s = e.to_string();
    s.contains("message length too large") || s.contains("larger than max")
}

fn compacted(e: &Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
}

/// The state of one open watch, driven by [`watch_stream`].
struct WatchState {
    ws: etcd_client::WatchStream,
    client: etcd_client::Client,
    pending: Option<WatchBatch>,
    inner: Arc<Inner>,
    node: usize,
    tick: tokio::time::Interval,
    deadline: Option<Instant>,
    done: bool,
}

/// Turns an open etcd watch into a [`WatchStream`]: converts responses, reassembles fragments,
/// asks for progress every [`PROGRESS_INTERVAL`] and ends with an error when the node stops
/// answering.
fn watch_stream(st: WatchState) -> WatchStream {
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(b) = st.pending.take() {
            st.done = b.canceled;
            return Some((Ok(b), st));
        }
        let mut fragments: Vec<WatchEvent> = Vec::new();
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
                            if resp.0.fragment {
                                // More of the same revision follows in the next response.
                                fragments.extend(events_of(&resp));
                                continue;
                            }
                            let b = batch_of(&resp, std::mem::take(&mut fragments));
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
                                        tracing::warn!(error = %sd_core::Report(&e), "refreshing the etcd auth token failed");
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

/// An open lease keep-alive stream, on one endpoint.
struct Keeper {
    node: usize,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

type KeeperSlot = Arc<tokio::sync::Mutex<Option<Keeper>>>;

impl Inner {
    fn keeper_slot(&self, lease: i64) -> KeeperSlot {
        let mut map = self.keepers.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(lease).or_default().clone()
    }

    fn forget_keeper(&self, lease: i64) {
        let mut map = self.keepers.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&lease);
    }
}

impl EtcdClient {
    /// One page of a prefix read: up to `limit` keys from `start`, at `revision` (0: now).
    async fn range_page(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, Header, bool), Error> {
        let max = self.inner.options.max_response_size();
        let (r, _) = self
            .call("get", |c| {
                let (start, end) = (start.clone(), end.clone());
                async move {
                    let mut opts = GetOptions::new().with_range(end).with_limit(limit);
                    if revision > 0 {
                        opts = opts.with_revision(revision);
                    }
                    let resp = c
                        .kv_client()
                        .max_decoding_message_size(max)
                        .get(start, Some(opts))
                        .await
                        .map_err(|e| {
                            if too_large(&e) {
                                Error::TooLarge { limit: max }
                            } else {
                                classify("get", e, None)
                            }
                        })?;
                    let kvs: Vec<KeyValue> = resp.kvs().iter().map(kv_of).collect();
                    Ok((kvs, header_of(resp.header()), resp.more()))
                }
            })
            .await?;
        Ok(r)
    }

    /// Runs `ops` in order, `per_txn` to a transaction (each retried as [`call`](Self::call)
    /// does). `lease` names the lease the operations use, for a "lease not found" answer.
    async fn txns(
        &self,
        op: &'static str,
        ops: &[TxnOp],
        per_txn: usize,
        lease: Option<i64>,
    ) -> Result<(), Error> {
        for chunk in ops.chunks(per_txn) {
            self.call(op, |mut c| async move {
                c.txn(Txn::new().and_then(chunk.to_vec()))
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(op, e, lease))
            })
            .await?;
        }
        Ok(())
    }

    async fn read_prefix_once(&self, prefix: &str) -> Result<(Vec<KeyValue>, Header), Error> {
        let end = prefix_end(prefix.as_bytes());
        let mut start = prefix.as_bytes().to_vec();
        let mut limit: i64 = 1_000;
        let mut out: Vec<KeyValue> = Vec::new();
        let mut header = Header::default();
        loop {
            let page = self
                .range_page(start.clone(), end.clone(), limit, header.revision)
                .await;
            let (kvs, h, more) = match page {
                Ok(p) => p,
                Err(Error::TooLarge { .. }) if limit > 1 => {
                    limit = (limit / 8).max(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if header.revision == 0 {
                header = h;
            }
            let bytes: usize = kvs
                .iter()
                .map(|kv| kv.key.len() + kv.value.len() + 16)
                .sum();
            let n = kvs.len();
            if let Some(last) = kvs.last() {
                start = last.key.clone();
                start.push(0);
            }
            out.extend(kvs);
            if !more || n == 0 {
                return Ok((out, header));
            }
            // Size the next page from this one's bytes per key.
            let per_key = (bytes / n).max(1);
            limit = i64::try_from(PAGE_TARGET_BYTES / per_key)
                .unwrap_or(PAGE_MAX_KEYS)
                .clamp(1, PAGE_MAX_KEYS);
        }
    }
}

#[async_trait]
impl Client for EtcdClient {
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Header), Error> {
        // Every page is read at the first page's revision; if that revision is compacted
        // between pages, start again at the current one.
        let mut tries = 0;
        loop {
            match self.read_prefix_once(prefix).await {
                Err(e) if compacted(&e) && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Header), Error> {
        let (r, _) = self
            .call("get", |mut c| async move {
                let resp = c
                    .get(key, None)
                    .await
                    .map_err(|e| classify("get", e, None))?;
                Ok((resp.kvs().first().map(kv_of), header_of(resp.header())))
            })
            .await?;
        Ok(r)
    }

    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, Error> {
        let max = self.inner.options.max_response_size();
        let ((ws, client, first), node) = self
            .call("watch", |c| async move {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_fragment()
                    .with_start_revision(start_revision);
                let mut ws = c
                    .watch_client()
                    .max_decoding_message_size(max)
                    .watch(prefix, Some(opts))
                    .await
                    .map_err(|e| classify("watch", e, None))?;
                // Wait for `created`, so a watch that returns is a watch etcd accepted.
                match ws.message().await {
                    Ok(Some(resp)) => {
                        let b = batch_of(&resp, Vec::new());
                        if b.canceled && is_token_message(&b.cancel_reason) {
                            return Err(Error::Auth(b.cancel_reason));
                        }
                        Ok((ws, c, b))
                    }
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
            pending: Some(first),
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

    async fn keep_alive(&self, lease: i64, deadline: Duration) -> Result<bool, Error> {
        let inner = &self.inner;
        let slot = inner.keeper_slot(lease);
        let mut open = slot.lock().await;
        let i = inner.pick();
        if open.as_ref().is_some_and(|k| k.node != i) {
            // Calls moved to another endpoint: so does the keep-alive stream.
            *open = None;
        }
        let round = async {
            if let Some(k) = open.as_mut() {
                k.keeper
                    .keep_alive()
                    .await
                    .map_err(|e| classify("lease keep-alive", e, None))?;
                return match k.stream.message().await {
                    Ok(Some(resp)) => Ok(resp.ttl() > 0),
                    Ok(None) => Err(Error::Watch(
                        "etcd closed the lease keep-alive stream".into(),
                    )),
                    Err(e) if is_lease_not_found(&e) => Ok(false),
                    Err(e) => Err(classify("lease keep-alive", e, None)),
                };
            }
            let mut c = inner.node_client(i).await?;
            let mut refreshed = false;
            loop {
                // Opening the stream is itself a round: etcd-client sends the first request and
                // reads its answer (TTL 0 becomes a "lease not found" error).
                match c.lease_keep_alive(lease).await {
                    Ok((keeper, stream)) => {
                        *open = Some(Keeper {
                            node: i,
                            keeper,
                            stream,
                        });
                        return Ok(true);
                    }
                    Err(e) if is_lease_not_found(&e) => return Ok(false),
                    Err(e) => {
                        let e = classify("lease keep-alive", e, None);
                        if refreshed || !e.is_invalid_token() {
                            return Err(e);
                        }
                        refreshed = true;
                        c.refresh_token()
                            .await
                            .map_err(|e| classify("authenticate", e, None))?;
                    }
                }
            }
        };
        let result = timeout(deadline, round).await;
        match result {
            Ok(Ok(true)) => Ok(true),
            Ok(Ok(false)) => {
                *open = None;
                drop(open);
                inner.forget_keeper(lease);
                Ok(false)
            }
            Ok(Err(e)) => {
                *open = None;
                if e.is_retryable() {
                    inner.mark_dead(i);
                }
                Err(e)
            }
            Err(_) => {
                // The node did not answer within the deadline its caller set: hung or cut off.
                *open = None;
                tracing::debug!(endpoint = %inner.nodes[i].url, lease, "lease keep-alive unanswered");
                inner.mark_dead(i);
                Err(Error::Timeout {
                    op: "lease keep-alive",
                    after: deadline,
                })
            }
        }
    }

    async fn lease_keys(&self, lease: i64) -> Result<Option<Vec<Vec<u8>>>, Error> {
        let (r, _) = self
            .call("lease time-to-live", |mut c| async move {
                match c
                    .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
                    .await
                {
                    Ok(resp) if resp.ttl() < 0 => Ok(None),
                    // Moved out, not copied: the list is as long as the lease has keys.
                    Ok(mut resp) => Ok(Some(std::mem::take(&mut resp.0.keys))),
                    Err(e) if is_lease_not_found(&e) => Ok(None),
                    Err(e) => Err(classify("lease time-to-live", e, None)),
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

    async fn put_many(
        &self,
        entries: &[(String, String)],
        lease: Option<i64>,
    ) -> Result<(), Error> {
        // etcd refuses a transaction that names one key twice: the last value wins.
        let mut latest: std::collections::HashMap<&str, &str> =
            std::collections::HashMap::with_capacity(entries.len());
        for (k, v) in entries {
            latest.insert(k, v);
        }
        let ops: Vec<TxnOp> = latest
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, lease.map(|l| PutOptions::new().with_lease(l))))
            .collect();
        self.txns("put", &ops, MAX_TXN_OPS, lease).await
    }

    async fn delete_many_if_lease(&self, keys: &[String], lease: i64) -> Result<(), Error> {
        // One nested transaction per key: each compares its own key's lease.
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| {
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(k.as_str(), CompareOp::Equal, lease)])
                        .and_then([TxnOp::delete(k.as_str(), None)]),
                )
            })
            .collect();
        // etcd counts a nested transaction and the delete inside it as two operations.
        self.txns("delete", &ops, MAX_TXN_OPS / 2, None).await
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

    fn lease_pools(&self) -> Option<LeasePools> {
        Some(self.inner.pools.clone())
    }

    async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.inner.forget_keeper(lease);
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

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

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
