//! The test harness itself: wiping a node and rolling it back to a snapshot do what the
//! hostile-store tests rely on.

use etcd_client::{Client, GetOptions};
use sd_etcd::testing::{EtcdServer, ServerOptions};

async fn cluster_id(c: &mut Client) -> u64 {
    c.status()
        .await
        .expect("status")
        .header()
        .expect("status header")
        .cluster_id()
}

/// The revision of the store, from a get's header.
async fn revision(c: &mut Client) -> i64 {
    c.get("/", None)
        .await
        .expect("get")
        .header()
        .expect("get header")
        .revision()
}

async fn keys(c: &mut Client, prefix: &str) -> Vec<String> {
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("get prefix")
        .kvs()
        .iter()
        .map(|kv| kv.key_str().expect("utf-8 key").to_string())
        .collect()
}

/// A client with the server's TLS files but no credentials.
async fn anonymous(etcd: &EtcdServer) -> Client {
    let tls = etcd.tls().expect("TLS files");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read TLS file");
    let options = etcd_client::ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&tls.client_cert),
                read(&tls.client_key),
            )),
    );
    Client::connect([etcd.endpoint()], Some(options))
        .await
        .expect("connect without credentials")
}

async fn put(c: &mut Client, key: &str) {
    c.put(key, "v", None).await.expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wipe_empties_the_store_and_keeps_the_cluster_id() {
    let mut etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut c = etcd.raw_client().await;
    put(&mut c, "/harness/a").await;
    put(&mut c, "/harness/b").await;
    let old_id = cluster_id(&mut c).await;
    let old_revision = revision(&mut c).await;
    assert_eq!(
        keys(&mut c, "/harness/").await,
        ["/harness/a", "/harness/b"]
    );

    etcd.wipe().await;

    assert_eq!(etcd.endpoint(), endpoint, "same ports after a wipe");
    let mut c = etcd.raw_client().await;
    assert!(
        keys(&mut c, "/harness/").await.is_empty(),
        "keys survived the wipe"
    );
    assert_eq!(
        cluster_id(&mut c).await,
        old_id,
        "etcd derives the cluster id from its flags: a wipe keeps it"
    );
    assert!(revision(&mut c).await < old_revision);
    put(&mut c, "/harness/c").await;
    assert_eq!(keys(&mut c, "/harness/").await, ["/harness/c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wipe_keeps_tls_and_auth() {
    let mut etcd = EtcdServer::start_with(ServerOptions::new().with_tls().with_auth("pw")).await;
    let mut c = etcd.raw_client().await;
    put(&mut c, "/harness/a").await;
    let old_id = cluster_id(&mut c).await;
    assert!(
        anonymous(&etcd)
            .await
            .put("/harness/c", "v", None)
            .await
            .is_err(),
        "auth is off before the wipe"
    );

    etcd.wipe().await;

    let mut c = etcd.raw_client().await;
    assert!(keys(&mut c, "/harness/").await.is_empty());
    assert_eq!(cluster_id(&mut c).await, old_id);
    put(&mut c, "/harness/b").await;
    assert!(
        anonymous(&etcd)
            .await
            .put("/harness/c", "v", None)
            .await
            .is_err(),
        "auth is off after the wipe"
    );
    // The server's client options (TLS files, root credentials) still reach it.
    drop(etcd.client().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_snapshot_rolls_the_store_back() {
    let mut etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut c = etcd.raw_client().await;
    put(&mut c, "/harness/before-1").await;
    put(&mut c, "/harness/before-2").await;
    let snapshot = etcd.snapshot_save().await;
    assert!(
        snapshot.is_file(),
        "no snapshot file at {}",
        snapshot.display()
    );
    let snapshot_revision = revision(&mut c).await;
    put(&mut c, "/harness/after-1").await;
    put(&mut c, "/harness/after-2").await;
    c.delete("/harness/before-1", None).await.expect("delete");
    let old_id = cluster_id(&mut c).await;
    let old_revision = revision(&mut c).await;
    assert!(old_revision > snapshot_revision);

    etcd.restore_snapshot(&snapshot).await;

    assert_eq!(etcd.endpoint(), endpoint, "same ports after a restore");
    let mut c = etcd.raw_client().await;
    assert_eq!(
        keys(&mut c, "/harness/").await,
        ["/harness/before-1", "/harness/before-2"]
    );
    let new_revision = revision(&mut c).await;
    assert!(
        new_revision < old_revision,
        "revision did not go back: {new_revision} >= {old_revision}"
    );
    assert_ne!(
        cluster_id(&mut c).await,
        old_id,
        "the cluster id did not change"
    );

    // The restored node keeps working, and survives a restart on its restored data.
    put(&mut c, "/harness/later").await;
    etcd.restart().await;
    let mut c = etcd.raw_client().await;
    assert_eq!(
        keys(&mut c, "/harness/").await,
        ["/harness/before-1", "/harness/before-2", "/harness/later"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_snapshot_with_tls_and_auth() {
    let mut etcd = EtcdServer::start_with(ServerOptions::new().with_tls().with_auth("pw")).await;
    let mut c = etcd.raw_client().await;
    put(&mut c, "/harness/before").await;
    let snapshot = etcd.snapshot_save().await;
    put(&mut c, "/harness/after").await;
    let old_revision = revision(&mut c).await;

    etcd.restore_snapshot(&snapshot).await;

    let mut c = etcd.raw_client().await;
    assert_eq!(keys(&mut c, "/harness/").await, ["/harness/before"]);
    assert!(revision(&mut c).await < old_revision);
    assert!(
        anonymous(&etcd)
            .await
            .put("/harness/c", "v", None)
            .await
            .is_err(),
        "auth is off after the restore"
    );
}
