//! [`ClientOptions`]: how to reach etcd (TLS, credentials, timeouts).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// The shortest HTTP/2 ping interval we use: etcd's `--grpc-keepalive-min-time` defaults to 5 s,
/// and a client that pings more often gets a GOAWAY that kills every idle watch.
///
/// ```
/// use std::time::Duration;
/// use sd_etcd::{ClientOptions, MIN_KEEP_ALIVE_INTERVAL};
///
/// let opts = ClientOptions::new().with_keep_alive_interval(Duration::from_secs(2));
/// assert_eq!(opts.keep_alive_interval(), MIN_KEEP_ALIVE_INTERVAL);
/// ```
pub const MIN_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Where a PEM comes from.
#[derive(Clone)]
enum Pem {
    File(PathBuf),
    Memory(String),
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(p) => write!(f, "File({})", p.display()),
            Pem::Memory(_) => f.write_str("Memory(..)"),
        }
    }
}

impl Pem {
    fn path(&self) -> Option<PathBuf> {
        match self {
            Pem::File(p) => Some(p.clone()),
            Pem::Memory(_) => None,
        }
    }

    fn read(&self, what: &'static str) -> Result<Vec<u8>, Error> {
        match self {
            Pem::Memory(s) => Ok(s.as_bytes().to_vec()),
            Pem::File(p) => std::fs::read(p).map_err(|e| Error::Certificate {
                what,
                path: Some(p.clone()),
                reason: format!("cannot read it: {e}"),
            }),
        }
    }

    /// Reads and checks that it holds at least one certificate.
    fn certificates(&self, what: &'static str) -> Result<String, Error> {
        let bytes = self.read(what)?;
        let bad = |reason: String| Error::Certificate {
            what,
            path: self.path(),
            reason,
        };
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            cert.map_err(|e| bad(format!("not a valid PEM certificate: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad(
                "holds no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)".into(),
            ));
        }
        String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))
    }

    /// Reads and checks that it holds a private key.
    fn private_key(&self, what: &'static str) -> Result<String, Error> {
        let bytes = self.read(what)?;
        let bad = |reason: String| Error::Certificate {
            what,
            path: self.path(),
            reason,
        };
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            bad(format!(
                "holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
            ))
        })?;
        String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))
    }
}

/// How an [`EtcdClient`](crate::EtcdClient) connects: TLS material, credentials and timeouts.
///
/// A builder, like etcd-client's `ConnectOptions`. Certificates and keys are given as file paths
/// (as in go-kit) or as PEM text; every one is read and parsed by [`validate`](Self::validate),
/// which [`EtcdClient::connect`](crate::EtcdClient::connect) calls before dialing, so a missing
/// or malformed file is reported by name, before any network traffic.
///
/// Defaults: dial timeout 3 s, HTTP/2 keep-alive ping timeout 3 s (pings every 10 s, never more
/// often than every 5 s), per-request timeout 5 s, no TLS, no credentials.
///
/// ```
/// use std::time::Duration;
/// use sd_etcd::ClientOptions;
///
/// let opts = ClientOptions::new()
///     .with_user("root", "secret")
///     .with_connect_timeout(Duration::from_secs(1))
///     .with_request_timeout(Duration::from_secs(2));
/// assert_eq!(opts.connect_timeout(), Duration::from_secs(1));
///
/// // TLS material is checked when validated: a missing file is named in the error.
/// let err = ClientOptions::new().with_ca_file("/no/such/ca.pem").validate().unwrap_err();
/// assert!(err.to_string().contains("/no/such/ca.pem"));
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    ca: Option<Pem>,
    cert: Option<Pem>,
    key: Option<Pem>,
    user: Option<(String, String)>,
    connect_timeout: Duration,
    keep_alive_timeout: Duration,
    keep_alive_interval: Duration,
    request_timeout: Duration,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key.as_ref().map(|_| ".."))
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// TLS material, read and checked.
#[derive(Debug, Clone)]
pub(crate) struct Tls {
    pub(crate) ca: Option<String>,
    pub(crate) identity: Option<(String, String)>,
}

impl ClientOptions {
    /// The defaults: no TLS, no credentials, 3 s dial and keep-alive timeouts, 5 s per request.
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new();
    /// assert_eq!(opts.request_timeout(), std::time::Duration::from_secs(5));
    /// ```
    pub fn new() -> Self {
        ClientOptions {
            ca: None,
            cert: None,
            key: None,
            user: None,
            connect_timeout: Duration::from_secs(3),
            keep_alive_timeout: Duration::from_secs(3),
            keep_alive_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Trust the CA certificate(s) in this PEM file to verify etcd's server certificate.
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new().with_ca_file("/etc/etcd/ca.pem");
    /// # let _ = opts;
    /// ```
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca = Some(Pem::File(path.as_ref().to_path_buf()));
        self
    }

    /// Trust the CA certificate(s) in this PEM text.
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new().with_ca_pem("-----BEGIN CERTIFICATE-----\n...");
    /// assert!(opts.validate().is_err(), "not a real certificate");
    /// ```
    pub fn with_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.ca = Some(Pem::Memory(pem.into()));
        self
    }

    /// Authenticate to etcd with this client certificate and private key (PEM files).
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new()
    ///     .with_client_cert_files("/etc/etcd/client.pem", "/etc/etcd/client-key.pem");
    /// # let _ = opts;
    /// ```
    pub fn with_client_cert_files(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.cert = Some(Pem::File(cert.as_ref().to_path_buf()));
        self.key = Some(Pem::File(key.as_ref().to_path_buf()));
        self
    }

    /// Authenticate to etcd with this client certificate and private key (PEM text).
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new().with_client_cert_pem("cert PEM", "key PEM");
    /// assert!(opts.validate().is_err());
    /// ```
    pub fn with_client_cert_pem(mut self, cert: impl Into<String>, key: impl Into<String>) -> Self {
        self.cert = Some(Pem::Memory(cert.into()));
        self.key = Some(Pem::Memory(key.into()));
        self
    }

    /// Log in with a username and password (etcd auth). The token is refreshed automatically
    /// when it expires (after an etcd restart, for instance).
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new().with_user("root", "secret");
    /// assert_eq!(opts.user(), Some("root"));
    /// ```
    pub fn with_user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// How long [`EtcdClient::connect`](crate::EtcdClient::connect) waits for an endpoint to
    /// answer (default 3 s); also the TCP connect timeout of each endpoint.
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new()
    ///     .with_connect_timeout(std::time::Duration::from_millis(500));
    /// # let _ = opts;
    /// ```
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an HTTP/2 keep-alive ping may go unanswered before the connection is dropped
    /// (default 3 s).
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new()
    ///     .with_keep_alive_timeout(std::time::Duration::from_secs(2));
    /// # let _ = opts;
    /// ```
    pub fn with_keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.keep_alive_timeout = timeout;
        self
    }

    /// How often HTTP/2 keep-alive pings are sent (default 10 s). Values under
    /// [`MIN_KEEP_ALIVE_INTERVAL`] (5 s) are raised to it: etcd answers faster pings with a
    /// GOAWAY. Hung nodes are detected faster than pings could anyway (watch progress requests
    /// and per-request deadlines).
    ///
    /// ```
    /// use std::time::Duration;
    /// let opts = sd_etcd::ClientOptions::new().with_keep_alive_interval(Duration::from_secs(1));
    /// assert_eq!(opts.keep_alive_interval(), Duration::from_secs(5));
    /// ```
    pub fn with_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = interval.max(MIN_KEEP_ALIVE_INTERVAL);
        self
    }

    /// The deadline of every unary etcd call (default 5 s).
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new()
    ///     .with_request_timeout(std::time::Duration::from_secs(2));
    /// # let _ = opts;
    /// ```
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The dial timeout.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().connect_timeout().as_secs(), 3);
    /// ```
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The keep-alive ping timeout.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().keep_alive_timeout().as_secs(), 3);
    /// ```
    pub fn keep_alive_timeout(&self) -> Duration {
        self.keep_alive_timeout
    }

    /// The keep-alive ping interval.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().keep_alive_interval().as_secs(), 10);
    /// ```
    pub fn keep_alive_interval(&self) -> Duration {
        self.keep_alive_interval
    }

    /// The per-request timeout.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().request_timeout().as_secs(), 5);
    /// ```
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The username, if credentials were given.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().user(), None);
    /// ```
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// Whether TLS material (a CA or a client certificate) was given.
    ///
    /// ```
    /// assert!(!sd_etcd::ClientOptions::new().uses_tls());
    /// ```
    pub fn uses_tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// Reads and parses every certificate and key, and checks the timeouts. Errors name the
    /// offending file.
    ///
    /// ```
    /// assert!(sd_etcd::ClientOptions::new().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        self.tls().map(|_| ())
    }

    /// Checks the options against the endpoints they will be used with.
    pub(crate) fn validate_for(&self, endpoints: &[String]) -> Result<Option<Tls>, Error> {
        if endpoints.is_empty() {
            return Err(Error::InvalidOptions(
                "no etcd endpoint given: pass at least one, e.g. http://127.0.0.1:2379".into(),
            ));
        }
        let tls = self.tls()?;
        if tls.is_some() {
            if let Some(plain) = endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(Error::InvalidOptions(format!(
                    "TLS options were given but endpoint {plain} is http://: use https:// endpoints \
                     with TLS, or drop the certificates"
                )));
            }
        }
        Ok(tls)
    }

    fn tls(&self) -> Result<Option<Tls>, Error> {
        for (name, d) in [
            ("connect timeout", self.connect_timeout),
            ("request timeout", self.request_timeout),
            ("keep-alive timeout", self.keep_alive_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::InvalidOptions(format!(
                    "the {name} is zero: give a positive duration"
                )));
            }
        }
        let ca = match &self.ca {
            Some(p) => Some(p.certificates("CA certificate")?),
            None => None,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((
                c.certificates("client certificate")?,
                k.private_key("client key")?,
            )),
            _ => None,
        };
        if ca.is_none() && identity.is_none() {
            return Ok(None);
        }
        Ok(Some(Tls { ca, identity }))
    }

    pub(crate) fn credentials(&self) -> Option<(String, String)> {
        self.user.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("sd-etcd-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();

        let err = ClientOptions::new()
            .with_ca_file(dir.join("missing.pem"))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        assert!(err.to_string().contains("cannot read"), "{err}");

        let err = ClientOptions::new()
            .with_ca_file(&junk)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("junk.pem"), "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");

        let err = ClientOptions::new()
            .with_client_cert_files(&junk, &junk)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("client certificate"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tls_with_http_endpoint_is_refused() {
        let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let opts = ClientOptions::new().with_ca_pem(cert);
        let err = opts
            .validate_for(&["http://127.0.0.1:2379".to_string()])
            .unwrap_err();
        assert!(err.to_string().contains("http://127.0.0.1:2379"), "{err}");
        assert!(opts.validate_for(&[]).is_err());
    }

    #[test]
    fn keep_alive_interval_is_floored() {
        let o = ClientOptions::new().with_keep_alive_interval(Duration::from_secs(1));
        assert_eq!(o.keep_alive_interval(), MIN_KEEP_ALIVE_INTERVAL);
        assert!(ClientOptions::new()
            .with_request_timeout(Duration::ZERO)
            .validate()
            .is_err());
    }
}
