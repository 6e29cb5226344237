//! What the example programs share: the etcd connection flags of go-kit's `etcdv3.ClientOptions`.

use std::path::PathBuf;
use std::time::Duration;

use sd_etcd::{ClientOptions, EtcdClient};

/// etcd connection flags (`--etcd`, TLS files, user and password, timeouts).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd",
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) to verify etcd's server certificate; implies TLS.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, requires = "password")]
    pub user: Option<String>,
    /// etcd password.
    #[arg(long, env = "ETCD_PASSWORD", requires = "user", hide_env_values = true)]
    pub password: Option<String>,
    /// How long to wait for an etcd endpoint to answer when connecting.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// HTTP/2 keep-alive: how long to wait for a ping's answer.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub keep_alive: Duration,
}

impl EtcdArgs {
    /// The client options these flags describe.
    pub fn client_options(&self) -> ClientOptions {
        let mut opts = ClientOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive_timeout(self.keep_alive);
        if let Some(ca) = &self.ca_file {
            opts = opts.with_ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            opts = opts.with_client_cert_files(cert, key);
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            opts = opts.with_user(user, password);
        }
        opts
    }

    /// Connects to etcd (fails within the dial timeout, naming the endpoints, if none answers).
    pub async fn connect(&self) -> Result<EtcdClient, sd_etcd::Error> {
        EtcdClient::connect(
            self.endpoints.iter().map(String::as_str),
            self.client_options(),
        )
        .await
    }
}

/// Logs to stderr, at the level `RUST_LOG` asks for (default: `default`).
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
}
