//! Interop with etcd's own Go naming package (`go.etcd.io/etcd/clientv3/naming/endpoints`, what
//! gRPC's etcd resolver reads), against a real etcd: an endpoint a Go program registers through
//! the endpoints manager is seen by our instancer with its metadata, and a service we register
//! in etcd's naming format is listed by the manager.
//!
//! Needs Go and Debian's `golang-etcd-server-dev` (`.ci/run` and `cargo xtask ci` install them):
//! without them these tests fail, saying what to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use sd_core::{Instancer, Metadata, Registrar, Service, TtlOption, ValueFormat};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{EtcdInstancer, EtcdRegistrar};

const GO_ETCD: &str = "/usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/endpoints";

/// The Go program (`tests/go/naming`), built once per test process.
fn naming() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        assert!(
            std::path::Path::new(GO_ETCD).is_dir(),
            "etcd's Go client is missing ({GO_ETCD}): install golang-go and \
             golang-etcd-server-dev (Debian), as .ci/run does"
        );
        // Under cargo's scratch directory for tests: reused by the next run.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("go-naming");
        std::fs::create_dir_all(&dir).expect("a build directory");
        let bin = dir.join("naming");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/go/naming/main.go");
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(&src)
            .env("GO111MODULE", "off")
            .env(
                "GOPATH",
                format!("{}:/usr/share/gocode", dir.join("gopath").display()),
            )
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run go ({e}): install golang-go (Debian), as .ci/run does")
            });
        assert!(
            out.status.success(),
            "building {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

fn go(args: &[&str]) -> String {
    let out = Command::new(naming())
        .args(args)
        .output()
        .expect("the Go program runs");
    assert!(
        out.status.success(),
        "naming {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_go_registers_is_seen_with_its_metadata() {
    let server = EtcdServer::start().await;
    let endpoint = server.endpoint();
    let meta = r#"{"weight":3,"zone":"z1","labels":{"team":"go"}}"#;
    tokio::task::spawn_blocking(move || {
        go(&[
            endpoint.as_str(),
            "/interop/svc",
            "add",
            "/interop/svc/go-1",
            "127.0.0.1:7001",
            meta,
        ])
    })
    .await
    .expect("the Go program ran");
    let instancer = EtcdInstancer::new(server.client().await, "/interop/svc/")
        .await
        .expect("an instancer");
    let first = instancer.subscribe().next().await.expect("a first event");
    let set = first.instances().expect("instances");
    let seen: Vec<_> = set
        .iter()
        .map(|i| {
            let labels: Vec<(String, String)> = i
                .metadata()
                .labels()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (
                i.addr().to_string(),
                i.weight(),
                i.zone().map(String::from),
                labels,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(
            "127.0.0.1:7001".to_string(),
            3,
            Some("z1".to_string()),
            vec![("team".to_string(), "go".to_string())]
        )],
        "as stored by Go: {:?}",
        set
    );
    assert_eq!(instancer.invalid_values(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_we_register_in_etcd_naming_form_is_listed_by_go() {
    let server = EtcdServer::start().await;
    let meta = Metadata::new().with_weight(2).unwrap().with_zone("z2");
    let service = Service::new("/interop/svc2/rust-1", "127.0.0.1:7002")
        .unwrap()
        .with_metadata(meta, ValueFormat::EtcdNaming)
        .unwrap()
        .with_ttl(TtlOption::new(Duration::from_secs(1), Duration::from_secs(5)).unwrap());
    let registrar = EtcdRegistrar::new(server.client().await, service);
    registrar.register().await.expect("registered");
    let endpoint = server.endpoint();
    let listed =
        tokio::task::spawn_blocking(move || go(&[endpoint.as_str(), "/interop/svc2", "list"]))
            .await
            .expect("the Go program ran");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON from Go");
    assert_eq!(
        listed,
        serde_json::json!({
            "/interop/svc2/rust-1": {
                "Addr": "127.0.0.1:7002",
                "Metadata": {"weight": 2, "zone": "z2"}
            }
        }),
        "Go's endpoints manager lists: {listed}"
    );
    registrar.deregister().await.expect("deregistered");
}
