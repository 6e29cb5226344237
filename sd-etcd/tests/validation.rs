//! Input refused up front: malformed endpoint URLs and a client key that does not belong to its
//! certificate make `EtcdClient::connect` fail at once, before any network traffic, with an
//! error that names the input and says what to write instead; well-formed endpoints (IPv6
//! literals, a trailing `/`) are dialed as given.

use std::time::{Duration, Instant};

use sd_etcd::testing::{EtcdServer, ServerOptions};
use sd_etcd::{ClientOptions, Error, EtcdClient};

/// Connecting must fail; returns the error and how long it took.
async fn connect_err(endpoints: &[&str], options: ClientOptions) -> (Error, Duration) {
    let start = Instant::now();
    match EtcdClient::connect(endpoints, options).await {
        Ok(c) => panic!("connecting to {endpoints:?} should fail, got {c:?}"),
        Err(e) => (e, start.elapsed()),
    }
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

#[tokio::test]
async fn malformed_endpoints_are_refused_before_dialing() {
    for (endpoint, says) in [
        ("127.0.0.1:99999", "has no scheme"),
        ("unix:///x", "scheme \"unix\""),
        ("ftp://127.0.0.1:2379", "scheme \"ftp\""),
        ("http://127.0.0.1:99999", "port 99999"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://127.0.0.1", "has no port"),
        ("http://127.0.0.1:2379/v3", "path"),
        ("http://::1:2379", "without brackets"),
    ] {
        let (err, took) = connect_err(&[endpoint], ClientOptions::new()).await;
        assert!(
            matches!(err, Error::InvalidOptions(_)),
            "{endpoint}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(endpoint), "{endpoint}: named in {msg}");
        assert!(msg.contains(says), "{endpoint}: says {says:?}: {msg}");
        assert!(
            msg.contains("write http://HOST:PORT or https://HOST:PORT"),
            "{endpoint}: says what to write: {msg}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{endpoint}: refused without dialing, took {took:?}"
        );
        // The conversion the sd-core traits see: an argument error, not a backend failure.
        assert!(matches!(
            sd_core::Error::from(err),
            sd_core::Error::InvalidArgument(_)
        ));
    }
}

/// Well-formed endpoints get past validation and are dialed at the address they name: a
/// listener that is not etcd sees the connection, and the client reports a connect failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_literals_and_a_trailing_slash_are_dialed_as_given() {
    for (bind, url) in [
        ("127.0.0.1:0", "http://127.0.0.1:{port}/"),
        ("[::1]:0", "http://[::1]:{port}"),
    ] {
        let listener = match tokio::net::TcpListener::bind(bind).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping {url}: cannot bind {bind}: {e}");
                continue;
            }
        };
        let port = listener.local_addr().expect("local address").port();
        let endpoint = url.replace("{port}", &port.to_string());
        let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
        let options = ClientOptions::new().with_connect_timeout(Duration::from_secs(1));
        let (err, _) = connect_err(&[endpoint.as_str()], options).await;
        assert!(matches!(err, Error::Connect { .. }), "{endpoint}: {err:?}");
        assert!(err.to_string().contains(&endpoint), "{endpoint}: {err}");
        let reached = tokio::time::timeout(Duration::from_secs(5), accepted)
            .await
            .expect("the client dialed the listener")
            .expect("accept task");
        assert!(reached, "{endpoint}: the listener saw the connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailing_slash_reaches_etcd() {
    let etcd = EtcdServer::start().await;
    let endpoint = format!("{}/", etcd.endpoint());
    // connect() returns once a status() call through the endpoint has been answered.
    EtcdClient::connect([endpoint.as_str()], ClientOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error_naming_the_endpoint() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let options = ClientOptions::new().with_connect_timeout(Duration::from_secs(1));
    let (err, _) = connect_err(&[endpoint.as_str()], options).await;
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
}

/// A client key that is not the certificate's: refused before dialing, naming both files, where
/// the TLS handshake would only say "transport error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_of_another_certificate_is_refused_before_dialing() {
    let etcd = EtcdServer::start_with(ServerOptions::new().with_tls()).await;
    let tls = etcd.tls().expect("TLS files").clone();
    let endpoints = etcd.endpoints();
    let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();

    let wrong_key = ClientOptions::new()
        .with_ca_file(&tls.ca)
        .with_client_cert_files(&tls.client_cert, &tls.server_key);
    let (err, took) = connect_err(&endpoints, wrong_key).await;
    assert!(matches!(err, Error::Certificate { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&tls.server_key.display().to_string()), "{msg}");
    assert!(
        msg.contains(&tls.client_cert.display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains("does not belong to the client certificate"),
        "{msg}"
    );
    assert!(
        took < Duration::from_secs(1),
        "refused without dialing: {took:?}"
    );

    // A key-shaped PEM block with no key in it.
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage-key.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write the garbage key");
    let (err, _) = connect_err(
        &endpoints,
        ClientOptions::new()
            .with_ca_file(&tls.ca)
            .with_client_cert_files(&tls.client_cert, &garbage),
    )
    .await;
    let msg = err.to_string();
    assert!(msg.contains(&garbage.display().to_string()), "{msg}");
    assert!(
        msg.contains(&tls.client_cert.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("give the private key"), "{msg}");

    // The right pair still connects.
    EtcdClient::connect(&endpoints, etcd.client_options())
        .await
        .expect("the matching pair connects");
}
