//! The sd-core conformance kit against a real etcd: one etcd per case (cases run in parallel,
//! and the break/heal case kills its etcd).

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use sd_core::{Error, Instancer, Registrar, Service, TtlOption};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{Client, EtcdClient, EtcdInstancer, EtcdRegistrar};

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
    lease_ids(etcd).await.len()
}

async fn lease_ids(etcd: &EtcdServer) -> Vec<i64> {
    let mut raw = etcd.raw_client().await;
    raw.leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect()
}

/// How many TCP connections this process has open to `port` on loopback: the sockets among
/// our file descriptors that /proc/net/tcp shows established to that port.
fn connections_to(port: u16) -> usize {
    let ours: BTreeSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = f[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16).unwrap() == port
                && f[3] == "01"
                && ours.contains(f[9])
        })
        .count()
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
    let port: u16 = etcd.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let base_tasks = tasks();
    let client = etcd.client().await;
    assert!(connections_to(port) > 0, "the connection check sees ours");
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
        assert_eq!(
            leases(&etcd).await,
            1,
            "the four registrations share one lease"
        );
        // Two deregistered, one dropped (deregisters in the background), one abandoned (its
        // key lives until its TTL, as a crashed process's would).
        let mut regs = regs.into_iter();
        let (a, b, c, d) = (
            regs.next().unwrap(),
            regs.next().unwrap(),
            regs.next().unwrap(),
            regs.next().unwrap(),
        );
        a.deregister().await.unwrap();
        b.deregister().await.unwrap();
        let (c_key, d_key) = (c.key().to_string(), d.key().to_string());
        drop(c);
        d.abandon();
        // The dropped registrar's key is deleted, not left to expire: it is gone while the
        // abandoned one's (kept alive until just now, TTL 2 s) still lives.
        until("dropped registrar's key deleted", || async {
            client.get(&c_key).await.unwrap().0.is_none()
        })
        .await;
        assert!(
            client.get(&d_key).await.unwrap().0.is_some(),
            "the abandoned registrar's key was deleted instead of left to expire"
        );
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
    // Dropping the client closes its connections, and no task of ours outlives it.
    drop(client);
    until("connections closed", || async { connections_to(port) == 0 }).await;
    until("tasks ended", || async { tasks() <= base_tasks }).await;
}

/// One client shared by ten registrars and two instancers, all working at once: registrations
/// and deregistrations run concurrently on the client the watches use, the watches keep
/// delivering, the registrars' shared lease is kept alive past its TTL. (go-kit's client holds
/// one lease, and a `Register()` on it silently kills that client's watch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_shared_by_many_registrars_and_instancers() {
    use sd_core::testkit::eventually_instances;
    use std::sync::Arc;
    const TIMEOUT: Duration = Duration::from_secs(15);

    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let prefix = "/shared/svc/";
    let ttl = TtlOption::new(Duration::from_millis(500), Duration::from_secs(2)).unwrap();
    let names: Vec<String> = (0..10).map(|i| format!("127.0.0.1:{}", 9100 + i)).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let instancers = [
        EtcdInstancer::new(client.clone(), prefix).await.unwrap(),
        EtcdInstancer::new(client.clone(), prefix).await.unwrap(),
    ];
    let mut streams: Vec<_> = instancers.iter().map(|i| i.subscribe()).collect();
    let regs: Vec<Arc<EtcdRegistrar>> = names
        .iter()
        .map(|inst| {
            Arc::new(EtcdRegistrar::new(
                client.clone(),
                Service::new(format!("{prefix}{inst}"), inst.as_str())
                    .unwrap()
                    .with_ttl(ttl),
            ))
        })
        .collect();

    // Runs `f` on every registrar selected by `pick`, each in a task of its own, at once.
    async fn on_all(regs: &[Arc<EtcdRegistrar>], pick: impl Fn(usize) -> bool, register: bool) {
        let tasks: Vec<_> = regs
            .iter()
            .enumerate()
            .filter(|(i, _)| pick(*i))
            .map(|(i, r)| {
                let r = r.clone();
                tokio::spawn(async move {
                    let res = if register {
                        r.register().await
                    } else {
                        r.deregister().await
                    };
                    res.unwrap_or_else(|e| panic!("registrar {i}: {e}"));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    async fn both_see(streams: &mut [sd_core::EventStream], want: &[&str]) {
        for s in streams.iter_mut() {
            eventually_instances(s, TIMEOUT, want).await;
        }
    }

    on_all(&regs, |_| true, true).await;
    both_see(&mut streams, &all).await;
    let lease_ids: BTreeSet<i64> = regs.iter().filter_map(|r| r.lease()).collect();
    assert_eq!(lease_ids.len(), 1, "the registrars share one lease");

    // Half deregister while the other half registers again (a no-op) and a plain key is put.
    let odd = |i: usize| i % 2 == 1;
    let plain = format!("{prefix}plain");
    let (_, _, put) = tokio::join!(
        on_all(&regs, odd, false),
        on_all(&regs, |i| !odd(i), true),
        client.put(&plain, "127.0.0.1:9999", None),
    );
    put.unwrap();
    let mut want: Vec<&str> = all.iter().step_by(2).copied().collect();
    want.push("127.0.0.1:9999");
    both_see(&mut streams, &want).await;

    // The deregistered half comes back while the plain key goes.
    let (_, del) = tokio::join!(on_all(&regs, odd, true), client.delete(&plain),);
    del.unwrap();
    both_see(&mut streams, &all).await;

    // Past the TTL, every lease is still kept alive and the watches still deliver.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (kvs, _) = client.get_prefix(prefix).await.unwrap();
    assert_eq!(kvs.len(), 10, "registrations expired: {kvs:?}");
    for r in &regs {
        assert!(r.state().is_registered(), "{:?}", r.state());
    }
    client
        .put(&format!("{prefix}late"), "127.0.0.1:9998", None)
        .await
        .unwrap();
    let mut with_late = all.clone();
    with_late.push("127.0.0.1:9998");
    both_see(&mut streams, &with_late).await;

    on_all(&regs, |_| true, false).await;
    both_see(&mut streams, &["127.0.0.1:9998"]).await;
    assert_eq!(leases(&etcd).await, 0, "every lease revoked");
}
