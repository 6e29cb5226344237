//! Test etcd clusters and single servers: starting, stopping, restarting, wiping and restoring
//! nodes.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::certs::{generate_tls, TlsFiles};
use super::process::{etcd_bin, etcdctl, next_port, scratch_dir, signal, spawn};
use crate::{ClientOptions, EtcdClient};

/// How long a node may take to answer after (re)starting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long streaming a snapshot out of a node may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a test etcd.
///
/// ```
/// let opts = sd_etcd::testing::ServerOptions::new().with_tls().with_auth("secret");
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    tls: bool,
    auth: Option<String>,
    data_dir: Option<PathBuf>,
    client_port: Option<u16>,
    extra_args: Vec<String>,
}

impl ServerOptions {
    /// One plain-HTTP node, data in a temporary directory, ports chosen for you.
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new();
    /// # let _ = opts;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve clients over TLS with certificates generated now (CA, server certificate with SAN
    /// `IP:127.0.0.1`, client certificate) and require client certificates.
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new().with_tls();
    /// # let _ = opts;
    /// ```
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Enable auth: user `root` with this password and role `root`.
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new().with_auth("secret");
    /// # let _ = opts;
    /// ```
    pub fn with_auth(mut self, root_password: impl Into<String>) -> Self {
        self.auth = Some(root_password.into());
        self
    }

    /// Passes one more command-line argument to etcd (e.g. `--auth-token-ttl=2`).
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new().with_arg("--auth-token-ttl=2");
    /// # let _ = opts;
    /// ```
    pub fn with_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Keep the data under this directory (created if needed, kept on drop) instead of a
    /// temporary one.
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new().with_data_dir("target/etcd");
    /// # let _ = opts;
    /// ```
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Serve clients on this port (the first node; the others on the next ports).
    ///
    /// ```
    /// let opts = sd_etcd::testing::ServerOptions::new().with_client_port(2379);
    /// # let _ = opts;
    /// ```
    pub fn with_client_port(mut self, port: u16) -> Self {
        self.client_port = Some(port);
        self
    }
}

/// A single-node test etcd. See the [module docs](crate::testing).
///
/// ```no_run
/// # async fn run() {
/// let etcd = sd_etcd::testing::EtcdServer::start().await;
/// println!("{:?}", etcd.endpoints());
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts a plain-HTTP node and waits until it answers. Panics (with etcd's stderr) if it
    /// cannot.
    ///
    /// ```no_run
    /// # async fn run() {
    /// let etcd = sd_etcd::testing::EtcdServer::start().await;
    /// # let _ = etcd; }
    /// ```
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::new()).await
    }

    /// Starts a node with `options`.
    ///
    /// ```no_run
    /// # async fn run() {
    /// use sd_etcd::testing::{EtcdServer, ServerOptions};
    /// let etcd = EtcdServer::start_with(ServerOptions::new().with_tls()).await;
    /// # let _ = etcd; }
    /// ```
    pub async fn start_with(options: ServerOptions) -> Self {
        EtcdServer {
            cluster: EtcdCluster::start_with(1, options).await,
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:23456`.
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { println!("{}", etcd.endpoint()); }
    /// ```
    pub fn endpoint(&self) -> String {
        self.cluster.endpoint(0)
    }

    /// The client URLs (one).
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { assert_eq!(etcd.endpoints().len(), 1); }
    /// ```
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    /// Options that reach this server (TLS files and root credentials where enabled).
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { let _ = etcd.client_options(); }
    /// ```
    pub fn client_options(&self) -> ClientOptions {
        self.cluster.client_options()
    }

    /// A connected [`EtcdClient`]; panics if it cannot connect.
    ///
    /// ```no_run
    /// # async fn f(etcd: &sd_etcd::testing::EtcdServer) { let _ = etcd.client().await; }
    /// ```
    pub async fn client(&self) -> EtcdClient {
        self.cluster.client().await
    }

    /// A raw etcd-client connection (for what the `Client` trait does not offer: compaction,
    /// lease listing, ...); panics if it cannot connect.
    ///
    /// ```no_run
    /// # async fn f(etcd: &sd_etcd::testing::EtcdServer) { let _ = etcd.raw_client().await; }
    /// ```
    pub async fn raw_client(&self) -> etcd_client::Client {
        self.cluster.raw_client(0).await
    }

    /// The generated TLS files, with [`ServerOptions::with_tls`].
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { let _ = etcd.tls(); }
    /// ```
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.cluster.tls()
    }

    /// Kills etcd (SIGKILL), keeping its data and ports.
    ///
    /// ```no_run
    /// # fn f(etcd: &mut sd_etcd::testing::EtcdServer) { etcd.kill(); }
    /// ```
    pub fn kill(&mut self) {
        self.cluster.kill(0)
    }

    /// Starts etcd again on the same data and ports (killing it first if it runs) and waits
    /// until it answers.
    ///
    /// ```no_run
    /// # async fn f(etcd: &mut sd_etcd::testing::EtcdServer) { etcd.restart().await; }
    /// ```
    pub async fn restart(&mut self) {
        self.cluster.restart(0).await
    }

    /// Replaces etcd with a brand-new, empty one on the same ports: kills it, deletes its data
    /// and starts it as a new cluster (a new cluster id, revisions starting over), then waits
    /// until it answers. With [`ServerOptions::with_auth`], auth is enabled again (user and
    /// role `root`, same password); TLS files stay the same. Clients see a store that lost
    /// everything.
    ///
    /// ```no_run
    /// # async fn f(etcd: &mut sd_etcd::testing::EtcdServer) {
    /// let endpoint = etcd.endpoint();
    /// etcd.wipe().await;
    /// assert_eq!(etcd.endpoint(), endpoint);
    /// # }
    /// ```
    pub async fn wipe(&mut self) {
        self.cluster.wipe(0).await
    }

    /// Saves a snapshot of etcd's data into a new file under the server's data directory and
    /// returns its path, for [`restore_snapshot`](Self::restore_snapshot).
    ///
    /// ```no_run
    /// # async fn f(etcd: &sd_etcd::testing::EtcdServer) {
    /// let snapshot = etcd.snapshot_save().await;
    /// println!("{}", snapshot.display());
    /// # }
    /// ```
    pub async fn snapshot_save(&self) -> PathBuf {
        self.cluster.snapshot_save(0).await
    }

    /// Rolls etcd back to `snapshot` (from [`snapshot_save`](Self::snapshot_save)) on the same
    /// ports: kills it, deletes its data, restores the snapshot with `etcdctl snapshot restore`
    /// as a new cluster (a new cluster id; the revision goes back to the snapshot's), starts it
    /// and waits until it answers. Users, roles and auth come back as they were in the snapshot.
    /// Panics if `etcdctl` is missing or fails.
    ///
    /// ```no_run
    /// # async fn f(etcd: &mut sd_etcd::testing::EtcdServer) {
    /// let snapshot = etcd.snapshot_save().await;
    /// // ... more writes ...
    /// etcd.restore_snapshot(&snapshot).await; // the writes are gone
    /// # }
    /// ```
    pub async fn restore_snapshot(&mut self, snapshot: &Path) {
        self.cluster.restore_snapshot(0, snapshot).await
    }

    /// Freezes etcd (SIGSTOP): its connections stay open, nothing answers.
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { etcd.pause(); etcd.resume(); }
    /// ```
    pub fn pause(&self) {
        self.cluster.pause(0)
    }

    /// Thaws etcd after [`pause`](Self::pause) (SIGCONT).
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { etcd.resume(); }
    /// ```
    pub fn resume(&self) {
        self.cluster.resume(0)
    }

    /// The etcd process id, while it runs.
    ///
    /// ```no_run
    /// # fn f(etcd: &sd_etcd::testing::EtcdServer) { println!("{:?}", etcd.pid()); }
    /// ```
    pub fn pid(&self) -> Option<u32> {
        self.cluster.pid(0)
    }
}

struct Node {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A test etcd cluster of one or more nodes. See the [module docs](crate::testing). Run
/// multi-node tests one at a time (a test binary of their own): they are heavy for a small
/// machine.
///
/// ```no_run
/// # async fn run() {
/// let mut cluster = sd_etcd::testing::EtcdCluster::start(3).await;
/// let leader = cluster.leader().await;
/// cluster.kill(leader);
/// # }
/// ```
pub struct EtcdCluster {
    nodes: Vec<Node>,
    initial_cluster: String,
    token: String,
    /// How many times the cluster was recreated (wiped or restored): makes each new token unique.
    generation: u32,
    /// Where node data, logs, certificates and snapshots live.
    base: PathBuf,
    /// Snapshots taken so far (names the next snapshot file).
    snapshots: AtomicU32,
    tls: Option<TlsFiles>,
    auth: Option<String>,
    /// More etcd arguments, from [`ServerOptions::with_arg`].
    extra_args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field(
                "pids",
                &self
                    .nodes
                    .iter()
                    .map(|n| n.child.as_ref().map(Child::id))
                    .collect::<Vec<_>>(),
            )
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts an `n`-node plain-HTTP cluster and waits until every node answers and a leader
    /// is elected.
    ///
    /// ```no_run
    /// # async fn run() {
    /// let cluster = sd_etcd::testing::EtcdCluster::start(3).await;
    /// # let _ = cluster; }
    /// ```
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, ServerOptions::new()).await
    }

    /// Starts an `n`-node cluster with `options`.
    ///
    /// ```no_run
    /// # async fn run() {
    /// use sd_etcd::testing::{EtcdCluster, ServerOptions};
    /// let c = EtcdCluster::start_with(3, ServerOptions::new().with_auth("pw")).await;
    /// # let _ = c; }
    /// ```
    pub async fn start_with(n: usize, options: ServerOptions) -> Self {
        assert!(n >= 1, "a cluster needs at least one node");
        let (tmp, base) = match &options.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
                (None, d.clone())
            }
            None => {
                let t = scratch_dir();
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let tls = options.tls.then(|| generate_tls(&base));
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let client_port = match options.client_port {
                    Some(p) => p + 2 * u16::try_from(i).unwrap_or(0),
                    None => next_port(),
                };
                let peer_port = match options.client_port {
                    Some(p) => p + 1 + 2 * u16::try_from(i).unwrap_or(0),
                    None => next_port(),
                };
                let name = format!("node{i}");
                Node {
                    data_dir: base.join(format!("{name}.etcd")),
                    log: base.join(format!("{name}.log")),
                    name,
                    client_port,
                    peer_port,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = nodes
            .iter()
            .map(|n| format!("{}=http://127.0.0.1:{}", n.name, n.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            token: format!("sd-test-{}-{}", std::process::id(), nodes[0].client_port),
            generation: 0,
            base,
            snapshots: AtomicU32::new(0),
            nodes,
            initial_cluster,
            tls,
            auth: None,
            extra_args: options.extra_args.clone(),
            _tmp: tmp,
        };
        for i in 0..n {
            cluster.spawn_node(i);
        }
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        if let Some(password) = options.auth {
            cluster.enable_auth(0, &password).await;
            cluster.auth = Some(password);
        }
        cluster
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn_node(&mut self, i: usize) {
        let scheme = self.scheme();
        let node = &self.nodes[i];
        let client_url = format!("{scheme}://127.0.0.1:{}", node.client_port);
        let peer_url = format!("http://127.0.0.1:{}", node.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&node.name)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .args(&self.extra_args);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let log = std::fs::File::create(&node.log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", node.log.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = spawn(cmd).unwrap_or_else(|e| {
            panic!(
                "cannot start `{}` ({e}): install etcd (Debian: apt-get install etcd-server) \
                 or set ETCD_BIN",
                etcd_bin()
            )
        });
        tracing::debug!(node = %node.name, pid = child.id(), %client_url, "etcd started");
        self.nodes[i].child = Some(child);
    }

    fn stderr_of(&self, i: usize) -> String {
        let s = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Connect options for the raw readiness and admin client of node `i`.
    fn raw_options(&self, with_user: bool) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            let read = |p: &Path| {
                std::fs::read_to_string(p)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
            };
            o = o.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca)))
                    .identity(Identity::from_pem(
                        read(&tls.client_cert),
                        read(&tls.client_key),
                    )),
            );
        }
        if with_user {
            if let Some(pw) = &self.auth {
                o = o.with_user("root", pw.clone());
            }
        }
        o
    }

    async fn wait_ready(&mut self, i: usize) {
        let start = Instant::now();
        let url = self.endpoint(i);
        let mut last_err = String::new();
        loop {
            if let Some(child) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.nodes[i].child = None;
                    panic!(
                        "etcd {} exited at start ({status}); its stderr:\n{}",
                        self.nodes[i].name,
                        self.stderr_of(i)
                    );
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "etcd {} at {url} did not answer within {READY_TIMEOUT:?} (last error: \
                     {last_err}); its stderr:\n{}",
                    self.nodes[i].name,
                    self.stderr_of(i)
                );
            }
            let attempt = async {
                let mut c =
                    etcd_client::Client::connect([url.as_str()], Some(self.raw_options(false)))
                        .await?;
                c.status().await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(s)) if s.leader() != 0 => return,
                Ok(Ok(_)) => last_err = "no leader yet".into(),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Adds user `root` with `password` and role `root`, then enables auth, through node `i`.
    async fn enable_auth(&self, i: usize, password: &str) {
        let mut c = self.raw_client_with(i, false).await;
        let fail =
            |what: &str, e: etcd_client::Error| -> ! { panic!("enabling auth: {what}: {e}") };
        c.user_add("root", password, None)
            .await
            .unwrap_or_else(|e| fail("user add root", e));
        c.role_add("root")
            .await
            .unwrap_or_else(|e| fail("role add root", e));
        c.user_grant_role("root", "root")
            .await
            .unwrap_or_else(|e| fail("grant role root to root", e));
        c.auth_enable()
            .await
            .unwrap_or_else(|e| fail("auth enable", e));
    }

    async fn raw_client_with(&self, i: usize, with_user: bool) -> etcd_client::Client {
        let url = self.endpoint(i);
        etcd_client::Client::connect([url.as_str()], Some(self.raw_options(with_user)))
            .await
            .unwrap_or_else(|e| panic!("connecting a raw client to {url}: {e}"))
    }

    /// The number of nodes.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { assert_eq!(c.len(), 3); }
    /// ```
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always `false`: a cluster has at least one node.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { assert!(!c.is_empty()); }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client URL of node `i`.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { println!("{}", c.endpoint(0)); }
    /// ```
    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.nodes[i].client_port
        )
    }

    /// Every node's client URL.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { println!("{:?}", c.endpoints()); }
    /// ```
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Options that reach this cluster (TLS files and root credentials where enabled).
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { let _ = c.client_options(); }
    /// ```
    pub fn client_options(&self) -> ClientOptions {
        let mut o = ClientOptions::new();
        if let Some(tls) = &self.tls {
            o = o
                .with_ca_file(&tls.ca)
                .with_client_cert_files(&tls.client_cert, &tls.client_key);
        }
        if let Some(pw) = &self.auth {
            o = o.with_user("root", pw.clone());
        }
        o
    }

    /// A connected [`EtcdClient`] over every node; panics if it cannot connect.
    ///
    /// ```no_run
    /// # async fn f(c: &sd_etcd::testing::EtcdCluster) { let _ = c.client().await; }
    /// ```
    pub async fn client(&self) -> EtcdClient {
        EtcdClient::connect(self.endpoints(), self.client_options())
            .await
            .unwrap_or_else(|e| panic!("connecting to the test etcd: {e}"))
    }

    /// A raw etcd-client connection to node `i` (with root credentials where auth is on).
    ///
    /// ```no_run
    /// # async fn f(c: &sd_etcd::testing::EtcdCluster) { let _ = c.raw_client(0).await; }
    /// ```
    pub async fn raw_client(&self, i: usize) -> etcd_client::Client {
        self.raw_client_with(i, true).await
    }

    /// The generated TLS files, with [`ServerOptions::with_tls`].
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { let _ = c.tls(); }
    /// ```
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The index of the current leader (asking each live node).
    ///
    /// ```no_run
    /// # async fn f(c: &sd_etcd::testing::EtcdCluster) { println!("{}", c.leader().await); }
    /// ```
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut leader_id = 0;
            let mut ids = vec![0u64; self.nodes.len()];
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let url = self.endpoint(i);
                let attempt = async {
                    let mut c =
                        etcd_client::Client::connect([url.as_str()], Some(self.raw_options(false)))
                            .await?;
                    c.status().await
                };
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                    ids[i] = s.header().map(|h| h.member_id()).unwrap_or(0);
                    if s.leader() != 0 {
                        leader_id = s.leader();
                    }
                }
            }
            if let Some(i) = ids.iter().position(|&id| id != 0 && id == leader_id) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills node `i` (SIGKILL), keeping its data and ports.
    ///
    /// ```no_run
    /// # fn f(c: &mut sd_etcd::testing::EtcdCluster) { c.kill(0); }
    /// ```
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same data and ports (killing it first if it runs) and
    /// waits until it answers.
    ///
    /// ```no_run
    /// # async fn f(c: &mut sd_etcd::testing::EtcdCluster) { c.restart(0).await; }
    /// ```
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn_node(i);
        self.wait_ready(i).await;
    }

    /// Replaces node `i` with a brand-new, empty etcd on the same ports and flags, as an
    /// operator who deletes the data directory and restarts etcd would: kills it, deletes its
    /// data and starts it again (revisions and raft terms start over; the cluster id, which etcd
    /// derives from the flags, stays the same), then
    /// waits until it answers. With [`ServerOptions::with_auth`], auth is enabled again (user
    /// and role `root`, same password); TLS files stay the same.
    ///
    /// Only for one-node clusters: panics if the cluster has more nodes.
    ///
    /// ```no_run
    /// # async fn f(c: &mut sd_etcd::testing::EtcdCluster) {
    /// c.wipe(0).await;
    /// # }
    /// ```
    pub async fn wipe(&mut self, i: usize) {
        self.assert_single_node("wipe");
        self.kill(i);
        self.remove_data(i);
        self.spawn_node(i);
        self.wait_ready(i).await;
        if let Some(password) = self.auth.clone() {
            self.enable_auth(i, &password).await;
        }
        tracing::debug!(node = %self.nodes[i].name, "etcd wiped");
    }

    /// Saves a snapshot of node `i`'s data (etcd's maintenance snapshot, as `etcdctl snapshot
    /// save` does) into a new file under the cluster's data directory and returns its path, for
    /// [`restore_snapshot`](Self::restore_snapshot). Panics if the node cannot send it.
    ///
    /// ```no_run
    /// # async fn f(c: &sd_etcd::testing::EtcdCluster) {
    /// let snapshot = c.snapshot_save(0).await;
    /// println!("{}", snapshot.display());
    /// # }
    /// ```
    pub async fn snapshot_save(&self, i: usize) -> PathBuf {
        let n = self.snapshots.fetch_add(1, Ordering::Relaxed);
        let path = self
            .base
            .join(format!("{}-snapshot-{n}.db", self.nodes[i].name));
        let url = self.endpoint(i);
        let fail = |what: &str, e: etcd_client::Error| -> ! {
            panic!("saving a snapshot of {url}: {what}: {e}")
        };
        let options = self.raw_options(true).with_timeout(SNAPSHOT_TIMEOUT);
        let mut c = etcd_client::Client::connect([url.as_str()], Some(options))
            .await
            .unwrap_or_else(|e| fail("connecting", e));
        let mut stream = c.snapshot().await.unwrap_or_else(|e| fail("starting", e));
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .unwrap_or_else(|e| fail("receiving", e))
        {
            data.extend_from_slice(chunk.blob());
        }
        std::fs::write(&path, &data)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        tracing::debug!(
            node = %self.nodes[i].name,
            path = %path.display(),
            bytes = data.len(),
            "etcd snapshot saved"
        );
        path
    }

    /// Rolls node `i` back to `snapshot` (from [`snapshot_save`](Self::snapshot_save)) on the
    /// same ports: kills it, deletes its data, runs `etcdctl snapshot restore` into its data
    /// directory as a new cluster (a new cluster id; the revision goes back to the snapshot's),
    /// starts it on the restored data and waits until it answers. Users, roles and auth come
    /// back as they were in the snapshot.
    ///
    /// Only for one-node clusters: panics if the cluster has more nodes, or if `etcdctl` (on
    /// `PATH`, or `$ETCDCTL_BIN`) is missing or fails.
    ///
    /// ```no_run
    /// # async fn f(c: &mut sd_etcd::testing::EtcdCluster) {
    /// let snapshot = c.snapshot_save(0).await;
    /// c.restore_snapshot(0, &snapshot).await;
    /// # }
    /// ```
    pub async fn restore_snapshot(&mut self, i: usize, snapshot: &Path) {
        self.assert_single_node("restore_snapshot");
        self.kill(i);
        self.remove_data(i);
        self.new_token();
        let node = &self.nodes[i];
        let peer_url = format!("http://127.0.0.1:{}", node.peer_port);
        let args: Vec<OsString> = vec![
            "snapshot".into(),
            "restore".into(),
            snapshot.into(),
            "--data-dir".into(),
            node.data_dir.clone().into(),
            "--name".into(),
            node.name.clone().into(),
            "--initial-cluster".into(),
            self.initial_cluster.clone().into(),
            "--initial-cluster-token".into(),
            self.token.clone().into(),
            "--initial-advertise-peer-urls".into(),
            peer_url.into(),
        ];
        etcdctl(args).await;
        self.spawn_node(i);
        self.wait_ready(i).await;
        tracing::debug!(
            node = %self.nodes[i].name,
            snapshot = %snapshot.display(),
            "etcd restored"
        );
    }

    fn assert_single_node(&self, what: &str) {
        assert!(
            self.nodes.len() == 1,
            "EtcdCluster::{what} supports one-node clusters only (this one has {} nodes)",
            self.nodes.len()
        );
    }

    /// Deletes node `i`'s data directory (the node must not run).
    fn remove_data(&self, i: usize) {
        let dir = &self.nodes[i].data_dir;
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot delete {}: {e}", dir.display()),
        }
    }

    /// A cluster token no earlier incarnation of this cluster used: etcd derives the member and
    /// cluster ids from it, so a node started from empty data with it forms a new cluster.
    fn new_token(&mut self) {
        self.generation += 1;
        self.token = format!(
            "sd-test-{}-{}-{}",
            std::process::id(),
            self.nodes[0].client_port,
            self.generation
        );
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(child) = &self.nodes[i].child {
            signal(child, sig);
        }
    }

    /// Freezes node `i` (SIGSTOP): its connections stay open, nothing answers.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { c.pause(0); }
    /// ```
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP)
    }

    /// Thaws node `i` (SIGCONT).
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { c.resume(0); }
    /// ```
    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT)
    }

    /// Node `i`'s process id, while it runs.
    ///
    /// ```no_run
    /// # fn f(c: &sd_etcd::testing::EtcdCluster) { println!("{:?}", c.pid(0)); }
    /// ```
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Waits until every running node's process exits (for `cargo xtask etcd`: returns when
    /// they die, e.g. on Ctrl-C, which reaches the whole process group).
    ///
    /// ```no_run
    /// # fn f(mut c: sd_etcd::testing::EtcdCluster) { c.wait(); }
    /// ```
    pub fn wait(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.wait();
            }
            node.child = None;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
