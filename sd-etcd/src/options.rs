//! [`ClientOptions`]: how to reach etcd (TLS, credentials, timeouts).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::sign::CertifiedKey;
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

/// The default of [`ClientOptions::with_max_response_size`]: 64 MiB.
const DEFAULT_MAX_RESPONSE_SIZE: usize = 64 << 20;

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

    /// How errors name it: "client certificate file /etc/x.pem", "client key (in-memory PEM)".
    fn describe(&self, what: &str) -> String {
        match self {
            Pem::File(p) => format!("{what} file {}", p.display()),
            Pem::Memory(_) => format!("{what} (in-memory PEM)"),
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

    /// Reads and checks that it holds at least one certificate; returns the text and the
    /// certificates, in file order.
    fn certificates(
        &self,
        what: &'static str,
    ) -> Result<(String, Vec<CertificateDer<'static>>), Error> {
        let bytes = self.read(what)?;
        let bad = |reason: String| Error::Certificate {
            what,
            path: self.path(),
            reason,
        };
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            certs.push(cert.map_err(|e| bad(format!("not a valid PEM certificate: {e}")))?);
        }
        if certs.is_empty() {
            return Err(bad(
                "holds no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)".into(),
            ));
        }
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
        Ok((text, certs))
    }

    /// Reads and checks that it holds a private key; returns the text and the key.
    fn private_key(&self, what: &'static str) -> Result<(String, PrivateKeyDer<'static>), Error> {
        let bytes = self.read(what)?;
        let bad = |reason: String| Error::Certificate {
            what,
            path: self.path(),
            reason,
        };
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
            bad(format!(
                "holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
            ))
        })?;
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8 text".into()))?;
        Ok((text, key))
    }
}

/// Checks that the client key is a key TLS can sign with, and that it is the private half of
/// the client certificate's public key (the first certificate of the chain), so that a wrong
/// pair is named here rather than failing the TLS handshake with a bare "transport error".
fn check_key_pair(
    cert: &Pem,
    chain: Vec<CertificateDer<'static>>,
    key: &Pem,
    key_der: &PrivateKeyDer<'_>,
) -> Result<(), Error> {
    let cert_name = cert.describe("client certificate");
    let key_name = key.describe("client key");
    // The only failure: no RSA (2048 bits or more), ECDSA or EdDSA parser took the key.
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key_der).map_err(|_| {
        Error::Certificate {
            what: "client key",
            path: key.path(),
            reason: format!(
                "is not a usable RSA (2048 bits or more), ECDSA (P-256, P-384) or Ed25519 \
                 private key: give the private key that was generated with the {cert_name}"
            ),
        }
    })?;
    match CertifiedKey::new(chain, signing_key).keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(Error::Certificate {
                what: "client key",
                path: key.path(),
                reason: format!(
                    "does not belong to the {cert_name}: the certificate holds another public \
                     key. Give the key that was generated with that certificate, or the \
                     certificate issued for this key (the client's own certificate must come \
                     first in the certificate file, before any CA certificate)"
                ),
            })
        }
        // The key cannot give its public key: the TLS handshake will check the pair.
        Err(rustls::Error::InconsistentKeys(_)) => Ok(()),
        Err(e) => Err(Error::Certificate {
            what: "client certificate",
            path: cert.path(),
            reason: format!(
                "is not a valid X.509 certificate ({e}): give the PEM certificate issued for \
                 the {key_name}"
            ),
        }),
    }
}

/// The scheme of an endpoint URL that [`check_endpoint`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// What every endpoint message ends with: the forms etcd endpoints take.
const ENDPOINT_FORMS: &str = "write http://HOST:PORT or https://HOST:PORT (e.g. \
                              http://127.0.0.1:2379 or https://[::1]:2379)";

/// Checks one endpoint URL: `http://HOST:PORT` or `https://HOST:PORT`, optionally followed by
/// `/`, where HOST is a DNS name, an IPv4 address or a bracketed IPv6 address and PORT is 1 to
/// 65535. etcd-client would otherwise dial `127.0.0.1:99999` on port 80 and look `unix:///x`
/// up as the host name `unix`.
fn check_endpoint(endpoint: &str) -> Result<Scheme, Error> {
    let bad = |problem: String| {
        Error::InvalidOptions(format!("endpoint {endpoint:?} {problem}; {ENDPOINT_FORMS}"))
    };
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err(bad("has no scheme".into()));
    };
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        s if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            return Err(bad(format!(
                "has the scheme {s:?}: the scheme must be lower case"
            )));
        }
        s => {
            return Err(bad(format!(
                "has the scheme {s:?}, which etcd's gRPC client cannot dial"
            )));
        }
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !tail.is_empty() && tail != "/" {
        return Err(bad(format!(
            "has a path, query or fragment ({tail:?}), which etcd endpoints do not take"
        )));
    }
    if authority.contains('@') {
        // Not echoed: the part before '@' may be a password.
        return Err(Error::InvalidOptions(format!(
            "an endpoint has a user name or password in it (before '@'); {ENDPOINT_FORMS}, and \
             give the credentials with ClientOptions::with_user"
        )));
    }
    // (host, port, whether the host is a bracketed IPv6 address, already checked)
    let (host, port, ipv6) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((ip, after)) = bracketed.split_once(']') else {
            return Err(bad("has an IPv6 address without its closing ']'".into()));
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(format!("has [{ip}], which is not an IPv6 address")));
        }
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(bad(format!("has {after:?} after the IPv6 address"))),
        };
        (ip, port, true)
    } else {
        match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(bad("has an IPv6 address without brackets".into()));
            }
            Some((host, port)) => (host, Some(port), false),
            None => (authority, None, false),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host".into()));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(ipv6 || c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(bad(format!(
            "has the character {c:?} in its host {host:?} (a host is a DNS name or an IP address)"
        )));
    }
    match port {
        None | Some("") => Err(bad(
            "has no port (etcd serves clients on port 2379 by default)".into(),
        )),
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            Err(bad(format!("has the port {p:?}, which is not a number")))
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(scheme),
            _ => Err(bad(format!(
                "has the port {p}, which is out of range: a port is 1 to 65535"
            ))),
        },
    }
}

/// How an [`EtcdClient`](crate::EtcdClient) connects: TLS material, credentials and timeouts.
///
/// A builder, like etcd-client's `ConnectOptions`. Certificates and keys are given as file paths
/// (as in go-kit) or as PEM text; every one is read and parsed by [`validate`](Self::validate),
/// which [`EtcdClient::connect`](crate::EtcdClient::connect) calls before dialing, so a missing
/// or malformed file, or a client key that does not belong to the client certificate, is
/// reported by name before any network traffic. `connect` also refuses endpoints that are not
/// `http://HOST:PORT` or `https://HOST:PORT` (port 1 to 65535, IPv6 addresses in brackets).
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
    max_response_size: usize,
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
            .field("max_response_size", &self.max_response_size)
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
            max_response_size: DEFAULT_MAX_RESPONSE_SIZE,
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

    /// The largest etcd response the client decodes, in bytes (default 64 MiB; gRPC's usual
    /// limit is 4 MiB). Prefix reads come in pages of about 2 MiB and watches ask etcd to split
    /// large responses, so this only bounds a single key's value, or a single revision's
    /// changes on etcd older than 3.4. Values under 4 MiB are raised to 4 MiB.
    ///
    /// ```
    /// let opts = sd_etcd::ClientOptions::new().with_max_response_size(16 << 20);
    /// assert_eq!(opts.max_response_size(), 16 << 20);
    /// ```
    pub fn with_max_response_size(mut self, bytes: usize) -> Self {
        self.max_response_size = bytes.max(4 << 20);
        self
    }

    /// The largest etcd response the client decodes.
    ///
    /// ```
    /// assert_eq!(sd_etcd::ClientOptions::new().max_response_size(), 64 << 20);
    /// ```
    pub fn max_response_size(&self) -> usize {
        self.max_response_size
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

    /// Reads and parses every certificate and key, checks that the client key belongs to the
    /// client certificate, and checks the timeouts. Errors name the offending file (both files
    /// when the key and the certificate do not match) and say what to do.
    ///
    /// Endpoints are checked by [`EtcdClient::connect`](crate::EtcdClient::connect), which takes
    /// them: `http://HOST:PORT` or `https://HOST:PORT`.
    ///
    /// ```
    /// assert!(sd_etcd::ClientOptions::new().validate().is_ok());
    ///
    /// // A key inside PEM framing that is not a key: refused, naming the certificate it goes with.
    /// let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
    /// let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    /// let err = sd_etcd::ClientOptions::new()
    ///     .with_client_cert_pem(cert, key)
    ///     .validate()
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("client key"), "{err}");
    /// assert!(err.to_string().contains("client certificate"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<(), Error> {
        self.tls().map(|_| ())
    }

    /// Checks the options against the endpoints they will be used with: every endpoint must be
    /// `http://HOST:PORT` or `https://HOST:PORT` (see [`check_endpoint`]), and TLS options
    /// need `https://` endpoints.
    pub(crate) fn validate_for(&self, endpoints: &[String]) -> Result<Option<Tls>, Error> {
        if endpoints.is_empty() {
            return Err(Error::InvalidOptions(
                "no etcd endpoint given: pass at least one, e.g. http://127.0.0.1:2379".into(),
            ));
        }
        let mut plain = None;
        for endpoint in endpoints {
            if check_endpoint(endpoint)? == Scheme::Http && plain.is_none() {
                plain = Some(endpoint);
            }
        }
        let tls = self.tls()?;
        if let (Some(_), Some(plain)) = (&tls, plain) {
            return Err(Error::InvalidOptions(format!(
                "TLS options were given but endpoint {plain} is http://: use https:// endpoints \
                 with TLS, or drop the certificates"
            )));
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
            Some(p) => Some(p.certificates("CA certificate")?.0),
            None => None,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let (cert_pem, chain) = c.certificates("client certificate")?;
                let (key_pem, key_der) = k.private_key("client key")?;
                check_key_pair(c, chain, k, &key_der)?;
                Some((cert_pem, key_pem))
            }
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

    /// The message of the error `validate_for` gives for these endpoints.
    fn refusal(endpoints: &[&str]) -> String {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        match ClientOptions::new().validate_for(&endpoints) {
            Ok(_) => panic!("{endpoints:?} accepted"),
            Err(e @ Error::InvalidOptions(_)) => e.to_string(),
            Err(e) => panic!("{endpoints:?}: not an InvalidOptions error: {e:?}"),
        }
    }

    #[test]
    fn malformed_endpoints_are_refused_naming_them_and_the_right_form() {
        for (endpoint, problem) in [
            ("127.0.0.1:99999", "has no scheme"),
            ("127.0.0.1:2379", "has no scheme"),
            ("unix:///x", "scheme \"unix\""),
            ("ftp://127.0.0.1:2379", "scheme \"ftp\""),
            ("HTTP://127.0.0.1:2379", "must be lower case"),
            (
                "http://127.0.0.1:99999",
                "port 99999, which is out of range",
            ),
            (
                "http://127.0.0.1:65536",
                "port 65536, which is out of range",
            ),
            ("http://127.0.0.1:0", "port 0, which is out of range"),
            ("http://127.0.0.1:123456789012345678901", "out of range"),
            ("http://127.0.0.1", "has no port"),
            ("http://127.0.0.1:", "has no port"),
            ("https://etcd.example.com", "has no port"),
            ("http://127.0.0.1:23a9", "\"23a9\", which is not a number"),
            ("http://127.0.0.1:-1", "not a number"),
            ("http://:2379", "has no host"),
            ("http://", "has no host"),
            (
                "http://127.0.0.1:2379/v3/kv",
                "path, query or fragment (\"/v3/kv\")",
            ),
            ("http://127.0.0.1:2379//", "path, query or fragment"),
            ("http://127.0.0.1:2379?x=1", "path, query or fragment"),
            ("http://127.0.0.1:2379/#top", "path, query or fragment"),
            ("http://::1:2379", "IPv6 address without brackets"),
            ("http://[::1:2379", "without its closing ']'"),
            ("http://[zz::1]:2379", "not an IPv6 address"),
            ("http://[127.0.0.1]:2379", "not an IPv6 address"),
            ("http://[::1]", "has no port"),
            ("http://[::1]2379", "after the IPv6 address"),
            ("http://exa mple:2379", "character ' '"),
        ] {
            let msg = refusal(&[endpoint]);
            assert!(
                msg.contains(&format!("{endpoint:?}")),
                "names {endpoint}: {msg}"
            );
            assert!(msg.contains(problem), "{endpoint}: says {problem:?}: {msg}");
            assert!(
                msg.contains("write http://HOST:PORT or https://HOST:PORT"),
                "{endpoint}: says what to write: {msg}"
            );
        }
    }

    #[test]
    fn credentials_in_an_endpoint_are_refused_without_echoing_them() {
        let msg = refusal(&["http://root:hunter2@127.0.0.1:2379"]);
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("ClientOptions::with_user"), "{msg}");
        assert!(msg.contains("http://HOST:PORT"), "{msg}");
    }

    #[test]
    fn the_bad_endpoint_among_good_ones_is_named() {
        let msg = refusal(&["http://127.0.0.1:2379", "http://127.0.0.1:99999"]);
        assert!(msg.contains("\"http://127.0.0.1:99999\""), "{msg}");
        assert!(msg.contains("port 99999"), "{msg}");
    }

    #[test]
    fn well_formed_endpoints_are_accepted() {
        for endpoint in [
            "http://127.0.0.1:2379",
            "http://127.0.0.1:2379/",
            "https://127.0.0.1:2379",
            "http://localhost:1",
            "http://127.0.0.1:65535",
            "https://etcd-0.etcd_headless.example.com:2379",
            "http://[::1]:2379",
            "https://[::1]:2379/",
            "http://[fe80::1:2]:2379",
            "http://[::ffff:127.0.0.1]:2379",
        ] {
            let scheme =
                check_endpoint(endpoint).unwrap_or_else(|e| panic!("{endpoint} refused: {e}"));
            assert_eq!(
                scheme == Scheme::Https,
                endpoint.starts_with("https://"),
                "{endpoint}"
            );
        }
        let all = [
            "http://127.0.0.1:2379".to_string(),
            "http://[::1]:2380/".to_string(),
        ];
        assert!(matches!(ClientOptions::new().validate_for(&all), Ok(None)));
    }

    /// A self-signed certificate and its key, as PEM, with a key of this algorithm.
    fn self_signed(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).expect("generate a key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("certificate params")
            .self_signed(&key)
            .expect("self-sign");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_client_key_that_belongs_to_the_certificate_is_accepted() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let (cert, key) = self_signed(alg);
            let opts = ClientOptions::new().with_client_cert_pem(&cert, &key);
            opts.validate()
                .unwrap_or_else(|e| panic!("{alg:?}: matching pair refused: {e}"));
            let dir = tempfile::tempdir().expect("temp dir");
            let (cert_file, key_file) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
            std::fs::write(&cert_file, &cert).unwrap();
            std::fs::write(&key_file, &key).unwrap();
            let opts = ClientOptions::new().with_client_cert_files(&cert_file, &key_file);
            let tls = opts
                .validate_for(&["https://127.0.0.1:2379".to_string()])
                .unwrap_or_else(|e| panic!("{alg:?}: matching files refused: {e}"))
                .expect("TLS material");
            assert_eq!(tls.identity, Some((cert, key)), "the PEM text is passed on");
        }
    }

    #[test]
    fn a_client_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert_a, _) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, key_b) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (_, key_ed) = self_signed(&rcgen::PKCS_ED25519);
        let cert_file = dir.path().join("client.pem");
        std::fs::write(&cert_file, &cert_a).unwrap();
        for (name, key) in [("other-key.pem", key_b), ("ed25519-key.pem", key_ed)] {
            let key_file = dir.path().join(name);
            std::fs::write(&key_file, key).unwrap();
            let err = ClientOptions::new()
                .with_client_cert_files(&cert_file, &key_file)
                .validate()
                .unwrap_err();
            match &err {
                Error::Certificate { what, path, .. } => {
                    assert_eq!(*what, "client key");
                    assert_eq!(path.as_deref(), Some(key_file.as_path()));
                }
                other => panic!("not a certificate error: {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(&key_file.display().to_string()), "{msg}");
            assert!(msg.contains(&cert_file.display().to_string()), "{msg}");
            assert!(
                msg.contains("does not belong to the client certificate"),
                "{msg}"
            );
            assert!(
                msg.contains("Give the key that was generated with that certificate"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_garbage_key_in_pem_framing_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, _) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert_file = dir.path().join("client.pem");
        let key_file = dir.path().join("client-key.pem");
        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(
            &key_file,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let msg = ClientOptions::new()
            .with_client_cert_files(&cert_file, &key_file)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("client key file {}", key_file.display())),
            "{msg}"
        );
        assert!(msg.contains(&cert_file.display().to_string()), "{msg}");
        assert!(msg.contains("is not a usable RSA"), "{msg}");
        assert!(msg.contains("give the private key"), "{msg}");
    }

    #[test]
    fn a_garbage_client_certificate_in_pem_framing_is_refused() {
        let (_, key) = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let cert = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let msg = ClientOptions::new()
            .with_client_cert_pem(cert, key)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("client certificate (in-memory PEM)"),
            "{msg}"
        );
        assert!(msg.contains("not a valid X.509 certificate"), "{msg}");
        assert!(msg.contains("client key (in-memory PEM)"), "{msg}");
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
