//! Test certificates: a CA, a server and a client certificate signed by it, and an unrelated
//! CA, written as PEM files.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

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

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Generates the CA, server and client certificates into `dir`.
pub(crate) fn generate_tls(dir: &Path) -> TlsFiles {
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
