//! Throwaway etcd servers and clusters on loopback, for tests and `cargo xtask etcd`
//! (feature `testing`).
//!
//! Runs the `etcd` binary on `PATH` (or `$ETCD_BIN`): fresh ports from a per-process counter
//! with a random base (kept for a node's whole life, so a restart gets them back), data under
//! `/dev/shm` (fsync stalls on a slow disk trigger elections with the fast election flags used
//! here), `--heartbeat-interval 10 --election-timeout 100` (a fresh node answers in ~0.1 s).
//! Every etcd is started with `PR_SET_PDEATHSIG`, from a thread that lives as long as the
//! process, so it dies with the test process even when a test panics or is killed; dropping the
//! handle kills it (SIGKILL) by PID. If etcd cannot start, `start` panics with etcd's stderr:
//! tests never pass silently without etcd.
//!
//! ```no_run
//! use sd_etcd::testing::{EtcdServer, ServerOptions};
//!
//! # async fn run() {
//! let mut etcd = EtcdServer::start().await;
//! let client = etcd.client().await;
//! etcd.kill();          // SIGKILL
//! etcd.restart().await; // same ports, same data
//! let secure = EtcdServer::start_with(ServerOptions::new().with_tls().with_auth("pw")).await;
//! # let _ = (client, secure); }
//! ```

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{ClientOptions, EtcdClient};

/// How long a node may take to answer after (re)starting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Certificates and keys generated for a TLS test server, as PEM files.
///
/// ```no_run
/// # async fn run() {
/// use sd_etcd::testing::{EtcdServer, ServerOptions};
/// let etcd = EtcdServer::start_with(ServerOptions::new().with_tls()).await;
/// let tls = etcd.tls().expect("started with TLS");
/// let options = sd_etcd::ClientOptions::new()
///     .with_ca_file(&tls.ca)
///     .with_client_cert_files(&tls.client_cert, &tls.client_key);
/// # let _ = options; }
/// ```
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server certificate (SAN `IP:127.0.0.1` and `localhost`).
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// A client certificate signed by `ca`.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which signed nothing etcd uses (for "wrong CA" tests).
    pub other_ca: PathBuf,
}

/// A single-node test etcd. See the [module docs](self).
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

/// A test etcd cluster of one or more nodes. See the [module docs](self). Run multi-node tests
/// one at a time (a test binary of their own): they are heavy for a small machine.
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
    tls: Option<TlsFiles>,
    auth: Option<String>,
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

/// Spawns children from one thread that lives as long as the process: `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked dies, and test threads come and go.
fn spawn(mut cmd: Command) -> io::Result<Child> {
    type Req = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the etcd spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("etcd spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("etcd spawner thread is gone"))?
}

/// A port no other node of this process got, free right now.
///
/// Ports come from below the kernel's ephemeral range: a port in that range can be taken at any
/// moment by an outgoing connection's local end (etcd's own clients included), which would make
/// etcd's listen, or a restart on the same port, fail with "address already in use".
fn next_port() -> u16 {
    const LOW: u32 = 10_000;
    static NEXT: OnceLock<(AtomicU32, u32)> = OnceLock::new();
    let (next, high) = NEXT.get_or_init(|| {
        let high = ephemeral_low().clamp(LOW + 1_000, 65_535);
        (AtomicU32::new(LOW + fastrand::u32(0..high - LOW)), high)
    });
    loop {
        let p = next.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (p - LOW) % (high - LOW);
        if let Ok(port) = u16::try_from(port) {
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
}

/// The first port of the kernel's ephemeral range (Linux's default when it can't be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Generates the CA, server and client certificates into `dir`.
fn generate_tls(dir: &Path) -> TlsFiles {
    let fail = |e: rcgen::Error| -> ! { panic!("generating test certificates: {e}") };
    let ca_for = |cn: &str| {
        let key = KeyPair::generate().unwrap_or_else(|e| fail(e));
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail(e));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap_or_else(|e| fail(e));
        (cert, key)
    };
    let (ca, ca_key) = ca_for("sd-etcd test CA");
    let (other, _) = ca_for("sd-etcd unrelated CA");

    let server_key = KeyPair::generate().unwrap_or_else(|e| fail(e));
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap_or_else(|e| fail(e));
    sp.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    sp.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    sp.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server = sp
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap_or_else(|e| fail(e));

    let client_key = KeyPair::generate().unwrap_or_else(|e| fail(e));
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail(e));
    cp.distinguished_name
        .push(DnType::CommonName, "sd-etcd-test-client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = cp
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap_or_else(|e| fail(e));

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
        other_ca: dir.join("other-ca.pem"),
    };
    write(&files.ca, &ca.pem());
    write(&files.server_cert, &server.pem());
    write(&files.server_key, &server_key.serialize_pem());
    write(&files.client_cert, &client.pem());
    write(&files.client_key, &client_key.serialize_pem());
    write(&files.other_ca, &other.pem());
    files
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
                let shm = Path::new("/dev/shm");
                let mut b = tempfile::Builder::new();
                b.prefix("sd-etcd-test-");
                let t = if shm.is_dir() {
                    b.tempdir_in(shm)
                } else {
                    b.tempdir()
                }
                .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
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
            nodes,
            initial_cluster,
            tls,
            auth: None,
            _tmp: tmp,
        };
        for i in 0..n {
            cluster.spawn_node(i);
        }
        for i in 0..n {
            cluster.wait_ready(i).await;
        }
        if let Some(password) = options.auth {
            cluster.enable_auth(&password).await;
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
            .args(["--log-level", "warn"]);
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

    async fn enable_auth(&self, password: &str) {
        let mut c = self.raw_client_with(0, false).await;
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
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain syscall on the PID of a child we have not reaped yet.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
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

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(child) = &self.nodes[i].child {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: plain syscall on the PID of a child we have not reaped yet.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
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

/// A TCP proxy on loopback in front of an etcd endpoint, that tests can cut: every open
/// connection is closed and new ones are refused (accepted and closed at once) until healed.
/// Lets a test cut one client off while another keeps using etcd.
///
/// ```no_run
/// # async fn run() {
/// use sd_etcd::testing::{EtcdServer, TcpProxy};
/// let etcd = EtcdServer::start().await;
/// let proxy = TcpProxy::start(&etcd.endpoint()).await;
/// let url = proxy.endpoint(); // give this one to the client under test
/// proxy.cut();
/// proxy.heal();
/// # let _ = url; }
/// ```
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    scheme: &'static str,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `endpoint` (`http://127.0.0.1:PORT` or `https://...`).
    ///
    /// ```no_run
    /// # async fn f(etcd: &sd_etcd::testing::EtcdServer) {
    /// let proxy = sd_etcd::testing::TcpProxy::start(&etcd.endpoint()).await;
    /// # let _ = proxy; }
    /// ```
    pub async fn start(endpoint: &str) -> Self {
        let scheme = if endpoint.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let target = endpoint
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_string();
        let port = next_port();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap_or_else(|e| panic!("proxy cannot listen on 127.0.0.1:{port}: {e}"));
        // The value counts cuts; odd means "cut now".
        let (cut, rx) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                if *rx.borrow_and_update() % 2 == 1 {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            port,
            scheme,
            cut,
            task,
        }
    }

    /// The URL clients should use.
    ///
    /// ```no_run
    /// # fn f(p: &sd_etcd::testing::TcpProxy) { println!("{}", p.endpoint()); }
    /// ```
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Closes every connection and refuses new ones until [`heal`](Self::heal).
    ///
    /// ```no_run
    /// # fn f(p: &sd_etcd::testing::TcpProxy) { p.cut(); }
    /// ```
    pub fn cut(&self) {
        self.cut.send_modify(|n| {
            if *n % 2 == 0 {
                *n += 1
            }
        });
    }

    /// Lets connections through again.
    ///
    /// ```no_run
    /// # fn f(p: &sd_etcd::testing::TcpProxy) { p.heal(); }
    /// ```
    pub fn heal(&self) {
        self.cut.send_modify(|n| {
            if *n % 2 == 1 {
                *n += 1
            }
        });
    }

    /// Closes every open connection once (they may reconnect at once).
    ///
    /// ```no_run
    /// # fn f(p: &sd_etcd::testing::TcpProxy) { p.reset_connections(); }
    /// ```
    pub fn reset_connections(&self) {
        self.cut.send_modify(|n| *n += 2);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
