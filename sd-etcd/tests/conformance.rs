//! The sd-core conformance kit against a real etcd: one etcd per case (cases run in parallel,
//! and the break/heal case kills its etcd).

use std::time::Duration;

use async_trait::async_trait;
use sd_core::{Error, Instancer, Registrar, Service, TtlOption};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{EtcdClient, EtcdInstancer, EtcdRegistrar};

struct EtcdHarness {
    server: tokio::sync::Mutex<EtcdServer>,
    client: EtcdClient,
}

impl EtcdHarness {
    async fn new() -> Self {
        let server = EtcdServer::start().await;
        let client = server.client().await;
        EtcdHarness {
            server: tokio::sync::Mutex::new(server),
            client,
        }
    }
}

#[async_trait]
impl sd_core::testkit::Harness for EtcdHarness {
    fn ttl(&self) -> TtlOption {
        // etcd counts TTLs in whole seconds; 2 s leaves a loaded CI machine three heartbeats
        // of slack before a registration expires.
        TtlOption::new(Duration::from_millis(500), Duration::from_secs(2)).expect("valid TTL")
    }

    async fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error> {
        // Dropping then behaves as a crash: no revoke, the key expires at its TTL.
        Ok(Box::new(
            EtcdRegistrar::new(self.client.clone(), service).with_revoke_on_drop(false),
        ))
    }

    async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
        Ok(Box::new(
            EtcdInstancer::new(self.client.clone(), prefix).await?,
        ))
    }

    async fn break_store(&self) {
        self.server.lock().await.kill();
    }

    async fn heal_store(&self) {
        self.server.lock().await.restart().await;
    }
}

sd_core::conformance_tests!(async { EtcdHarness::new().await });

/// go-kit's key layout: a key put by `etcdctl put` is discovered, and a registration is
/// visible to `etcdctl get --prefix`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_sees_and_is_seen() {
    use futures::StreamExt;
    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(etcd.endpoint())
            .args(args)
            .output()
            .expect("etcdctl runs (Debian: apt-get install etcd-client)");
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let prefix = "/services/gokit/";
    etcdctl(&["put", "/services/gokit/10.0.0.1:80", "10.0.0.1:80"]);
    let instancer = EtcdInstancer::new(client.clone(), prefix).await.unwrap();
    let mut events = instancer.subscribe();
    assert_eq!(
        events.next().await,
        Some(sd_core::Event::from_instances(["10.0.0.1:80"]))
    );
    let svc = Service::new("/services/gokit/10.0.0.2:80", "10.0.0.2:80")
        .unwrap()
        .with_ttl(TtlOption::new(Duration::from_millis(500), Duration::from_secs(2)).unwrap());
    let registrar = EtcdRegistrar::new(client, svc);
    registrar.register().await.unwrap();
    let listed = etcdctl(&["get", "--prefix", prefix]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [
            "/services/gokit/10.0.0.1:80",
            "10.0.0.1:80",
            "/services/gokit/10.0.0.2:80",
            "10.0.0.2:80"
        ]
    );
    sd_core::testkit::eventually_instances(
        &mut events,
        Duration::from_secs(10),
        &["10.0.0.1:80", "10.0.0.2:80"],
    )
    .await;
    registrar.deregister().await.unwrap();
    assert_eq!(etcdctl(&["get", "--prefix", prefix]).lines().count(), 2);
}

/// etcd's count of open watchers, from its metrics endpoint.
async fn etcd_watchers(endpoint: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("etcd_debugging_mvcc_watcher_total in /metrics")
}

async fn leases(etcd: &EtcdServer) -> usize {
    let mut raw = etcd.raw_client().await;
    raw.leases().await.unwrap().leases().len()
}

async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One client shared by registrars and instancers; stopping, deregistering and dropping them
/// leaves no watch and no lease behind in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaks_in_etcd() {
    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let ep = etcd.endpoint();
    let base = etcd_watchers(&ep).await;
    let ttl = TtlOption::new(Duration::from_millis(500), Duration::from_secs(2)).unwrap();
    for round in 0..3 {
        let prefix = format!("/leak/{round}/");
        let instancers: Vec<EtcdInstancer> = futures::future::join_all(
            (0..3).map(|_| EtcdInstancer::new(client.clone(), prefix.clone())),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let regs: Vec<EtcdRegistrar> = (0..4)
            .map(|i| {
                let inst = format!("127.0.0.1:{}", 9000 + i);
                EtcdRegistrar::new(
                    client.clone(),
                    Service::new(format!("{prefix}{inst}"), inst)
                        .unwrap()
                        .with_ttl(ttl),
                )
            })
            .collect();
        for r in &regs {
            r.register().await.unwrap();
        }
        until("watches open", || async {
            etcd_watchers(&ep).await >= base + 3
        })
        .await;
        assert_eq!(leases(&etcd).await, 4);
        // Two deregistered, one dropped (revokes in the background), one abandoned (its lease
        // lives until its TTL, as a crashed process's would).
        let mut regs = regs.into_iter();
        let (a, b, c, d) = (
            regs.next().unwrap(),
            regs.next().unwrap(),
            regs.next().unwrap(),
            regs.next().unwrap(),
        );
        a.deregister().await.unwrap();
        b.deregister().await.unwrap();
        drop(c);
        d.abandon();
        instancers[0].stop();
        drop(instancers);
        until("watches closed", || async {
            etcd_watchers(&ep).await == base
        })
        .await;
        until("leases revoked or expired", || async {
            leases(&etcd).await == 0
        })
        .await;
    }
}
