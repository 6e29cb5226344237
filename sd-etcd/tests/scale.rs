//! Fleet sizes on a real etcd: 10 000 registrations in one process, and a burst of changes
//! under a large prefix while the process's own registration must stay alive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_core::testkit::eventually;
use sd_core::{Instancer, Registrar, Service, TtlOption};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{Client, EtcdClient, EtcdInstancer, EtcdRegistrar};

const TIMEOUT: Duration = Duration::from_secs(60);

async fn count(client: &EtcdClient, prefix: &str) -> usize {
    client.get_prefix(prefix).await.expect("read").0.len()
}

async fn leases(etcd: &EtcdServer) -> usize {
    let mut raw = etcd.raw_client().await;
    raw.leases().await.expect("leases").leases().len()
}

/// 10 000 `register()` calls at once from one process: no error (etcd's back-pressure is
/// ridden out, puts go together), one lease kept alive past its TTL, every key removed on
/// deregister and the lease revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_registrations_at_once() {
    const K: usize = 10_000;
    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let prefix = "/scale/reg/";
    let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap();
    let regs: Vec<Arc<EtcdRegistrar>> = (0..K)
        .map(|i| {
            let inst = format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256);
            Arc::new(EtcdRegistrar::new(
                client.clone(),
                Service::new(format!("{prefix}{inst}"), inst)
                    .unwrap()
                    .with_ttl(ttl),
            ))
        })
        .collect();
    let start = Instant::now();
    let tasks: Vec<_> = regs
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move { r.register().await })
        })
        .collect();
    let mut errors = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            errors.push(e.to_string());
        }
    }
    eprintln!("{K} registrations in {:?}", start.elapsed());
    assert!(
        errors.is_empty(),
        "{} failed, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(count(&client, prefix).await, K);
    assert_eq!(leases(&etcd).await, 1, "one shared lease");

    // Past the TTL twice over, everything is still there.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(count(&client, prefix).await, K, "registrations lapsed");
    assert!(regs.iter().all(|r| r.state().is_registered()));

    let start = Instant::now();
    let tasks: Vec<_> = regs
        .iter()
        .map(|r| {
            let r = r.clone();
            tokio::spawn(async move { r.deregister().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("deregister");
    }
    eprintln!("{K} deregistrations in {:?}", start.elapsed());
    assert_eq!(count(&client, prefix).await, 0);
    assert_eq!(leases(&etcd).await, 0, "the lease outlived its keys");
}

/// A burst: `N` instances under a prefix, then 2 000 single puts as fast as one client can
/// make them, while this process's own registration (heartbeat 1 s, TTL 3 s) must never lapse
/// and the instancer's view must be right soon after the last put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_starves_nothing() {
    let n: usize = std::env::var("SD_BURST_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let prefix = "/scale/burst/";
    let entries: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("{prefix}{i:06}"),
                format!("10.0.{}.{}:80", i / 256, i % 256),
            )
        })
        .collect();
    client.put_many(&entries, None).await.unwrap();

    let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).unwrap();
    let me = format!("{prefix}me");
    let registrar = EtcdRegistrar::new(
        client.clone(),
        Service::new(&me, "127.0.0.1:1").unwrap().with_ttl(ttl),
    );
    registrar.register().await.unwrap();
    let instancer = EtcdInstancer::new(client.clone(), prefix).await.unwrap();
    let mut events = instancer.subscribe();

    let writer = etcd.client().await;
    let watcher = etcd.client().await;
    let sampling = tokio::spawn(async move {
        let (mut samples, mut missing) = (0, 0);
        let end = Instant::now() + Duration::from_secs(6);
        while Instant::now() < end {
            samples += 1;
            if watcher
                .get(&me)
                .await
                .map(|(kv, _)| kv.is_none())
                .unwrap_or(true)
            {
                missing += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (samples, missing)
    });
    let start = Instant::now();
    for i in 0..2_000 {
        writer
            .put(
                &format!("{prefix}{:06}", i % n),
                &format!("10.9.{}.{}:80", i / 256, i % 256),
                None,
            )
            .await
            .unwrap();
    }
    let last_put = Instant::now();
    eprintln!("2000 puts in {:?}", last_put - start);
    eventually(&mut events, TIMEOUT, "the burst's final set", |ev| {
        ev.instances().is_some_and(|set| {
            set.len() == n + 1 && set.iter().any(|i| i.as_str() == "10.9.7.207:80")
        })
    })
    .await;
    let settled = last_put.elapsed();
    eprintln!("view right {settled:?} after the last put");
    assert!(
        settled < Duration::from_secs(5),
        "view right only {settled:?} after the burst"
    );
    let (samples, missing) = sampling.await.unwrap();
    assert_eq!(
        missing, 0,
        "own registration missing in {missing} of {samples} samples"
    );
    assert!(registrar.state().is_registered(), "{:?}", registrar.state());
    registrar.deregister().await.unwrap();
}
