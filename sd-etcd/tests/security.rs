//! Fault 5, security: TLS with client certificates works; a wrong CA, a missing certificate
//! file, a wrong password and an unreachable endpoint each give a clear error.

use std::time::{Duration, Instant};

use sd_core::testkit::eventually_instances;
use sd_core::{Instancer, Registrar, Service};
use sd_etcd::testing::{EtcdServer, ServerOptions};
use sd_etcd::{Client, ClientOptions, Error, EtcdClient, EtcdInstancer, EtcdRegistrar};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn connect_err(endpoints: Vec<String>, options: ClientOptions) -> Error {
    match EtcdClient::connect(endpoints, options).await {
        Ok(c) => panic!("connecting should fail, got {c:?}"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let etcd = EtcdServer::start_with(ServerOptions::new().with_tls()).await;
    let tls = etcd.tls().expect("TLS files").clone();
    assert!(etcd.endpoint().starts_with("https://"));

    // Works with the right CA and a client certificate, from files...
    let client = EtcdClient::connect(etcd.endpoints(), etcd.client_options())
        .await
        .unwrap();
    let prefix = "/secure/svc/";
    let registrar = EtcdRegistrar::new(
        client.clone(),
        Service::new(format!("{prefix}127.0.0.1:6000"), "127.0.0.1:6000").unwrap(),
    );
    registrar.register().await.unwrap();
    let instancer = EtcdInstancer::new(client, prefix).await.unwrap();
    let mut events = instancer.subscribe();
    eventually_instances(&mut events, TIMEOUT, &["127.0.0.1:6000"]).await;
    registrar.deregister().await.unwrap();

    // ... and from PEM in memory.
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let in_memory = ClientOptions::new()
        .with_ca_pem(read(&tls.ca))
        .with_client_cert_pem(read(&tls.client_cert), read(&tls.client_key));
    let client = EtcdClient::connect(etcd.endpoints(), in_memory)
        .await
        .unwrap();
    client.put("/secure/x", "y", None).await.unwrap();

    // A wrong CA: the server's certificate is not trusted.
    let wrong_ca = ClientOptions::new()
        .with_ca_file(&tls.other_ca)
        .with_client_cert_files(&tls.client_cert, &tls.client_key)
        .with_connect_timeout(Duration::from_secs(2));
    let err = connect_err(etcd.endpoints(), wrong_ca).await;
    let msg = err.to_string();
    eprintln!("wrong CA: {msg}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(msg.contains(&etcd.endpoint()), "{msg}");
    assert!(msg.contains("TLS") || msg.contains("certificate"), "{msg}");

    // No client certificate: the server requires one.
    let no_cert = ClientOptions::new()
        .with_ca_file(&tls.ca)
        .with_connect_timeout(Duration::from_secs(2));
    let err = connect_err(etcd.endpoints(), no_cert).await;
    eprintln!("no client certificate: {err}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains("with_client_cert_files"),
        "says what to do: {err}"
    );

    // A missing certificate file is named, before any network traffic.
    let missing = tls.ca.with_file_name("no-such-ca.pem");
    let err = connect_err(
        etcd.endpoints(),
        ClientOptions::new().with_ca_file(&missing),
    )
    .await;
    eprintln!("missing file: {err}");
    assert!(matches!(err, Error::Certificate { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-ca.pem"), "{err}");

    // A file that holds no key.
    let err = connect_err(
        etcd.endpoints(),
        ClientOptions::new()
            .with_ca_file(&tls.ca)
            .with_client_cert_files(&tls.client_cert, &tls.ca),
    )
    .await;
    assert!(err.to_string().contains("client key"), "{err}");

    // TLS options with an http:// endpoint.
    let http = etcd.endpoint().replace("https://", "http://");
    let err = connect_err(vec![http], etcd.client_options()).await;
    assert!(matches!(err, Error::InvalidOptions(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_right_and_wrong_password() {
    let mut etcd = EtcdServer::start_with(ServerOptions::new().with_auth("s3cret")).await;

    let err = connect_err(
        etcd.endpoints(),
        ClientOptions::new().with_user("root", "wrong"),
    )
    .await;
    eprintln!("wrong password: {err}");
    assert!(matches!(err, Error::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("password"), "{err}");

    let client = EtcdClient::connect(etcd.endpoints(), etcd.client_options())
        .await
        .unwrap();
    let prefix = "/auth/svc/";
    client
        .put(&format!("{prefix}a"), "127.0.0.1:7000", None)
        .await
        .unwrap();
    let instancer = EtcdInstancer::new(client.clone(), prefix).await.unwrap();
    let mut events = instancer.subscribe();
    eventually_instances(&mut events, TIMEOUT, &["127.0.0.1:7000"]).await;

    // After a restart. The change comes from another client, so the instancer must recover
    // by itself: no unary call of its client refreshes the shared token first.
    etcd.restart().await;
    let other = EtcdClient::connect(etcd.endpoints(), etcd.client_options())
        .await
        .unwrap();
    other
        .put(&format!("{prefix}b"), "127.0.0.1:7001", None)
        .await
        .unwrap();
    eventually_instances(&mut events, TIMEOUT, &["127.0.0.1:7000", "127.0.0.1:7001"]).await;
    // And the first client's calls refresh theirs.
    client
        .put(&format!("{prefix}c"), "127.0.0.1:7002", None)
        .await
        .unwrap();
    eventually_instances(
        &mut events,
        TIMEOUT,
        &["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_named() {
    // A loopback port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let err = connect_err(
        vec![endpoint.clone()],
        ClientOptions::new().with_connect_timeout(Duration::from_secs(1)),
    )
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    eprintln!("unreachable: {msg}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(msg.contains(&endpoint), "{msg}");
    assert!(msg.contains("1s"), "{msg}");
    assert!(msg.contains("is etcd running"), "says what to check: {msg}");
}

/// Of several endpoints, one unreachable: connecting succeeds on the live one, calls never
/// fail, and the dead one is out of rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_among_several_is_skipped() {
    let etcd = EtcdServer::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let client = EtcdClient::connect(vec![dead.clone(), etcd.endpoint()], ClientOptions::new())
        .await
        .unwrap();
    for i in 0..20 {
        client
            .put(&format!("/multi/{i}"), "v", None)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
    let start = Instant::now();
    while client.live_endpoints() != [etcd.endpoint()] {
        assert!(start.elapsed() < TIMEOUT, "{client:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.current_endpoint(), etcd.endpoint());
}
