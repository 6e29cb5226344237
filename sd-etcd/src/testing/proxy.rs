//! A TCP proxy in front of an etcd endpoint that tests can cut.

use std::net::Ipv4Addr;

use super::process::next_port;

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
