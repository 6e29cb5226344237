//! Fault 2: a three-node cluster loses its leader. One test in its own binary, so multi-node
//! clusters never run in parallel.

use std::time::{Duration, Instant};

use sd_core::testkit::eventually_instances;
use sd_core::{Instancer, Registrar, Service, TtlOption};
use sd_etcd::testing::EtcdCluster;
use sd_etcd::{Client, EtcdClient, EtcdInstancer, EtcdRegistrar};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Restarts node `i` and waits until the client has it back in rotation.
async fn restart_into_rotation(cluster: &mut EtcdCluster, client: &EtcdClient, i: usize) {
    cluster.restart(i).await;
    let start = Instant::now();
    while client.live_endpoints().len() < cluster.len() {
        assert!(
            start.elapsed() < TIMEOUT,
            "restarted node not back in rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The index of the node serving `endpoint`.
fn node_of(cluster: &EtcdCluster, endpoint: &str) -> usize {
    cluster
        .endpoints()
        .iter()
        .position(|e| e == endpoint)
        .unwrap_or_else(|| panic!("{endpoint} is not a node of the cluster"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_registrations_and_watches_survive() {
    let mut cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    let prefix = "/cluster/svc/";
    let key = format!("{prefix}127.0.0.1:8000");
    let ttl = TtlOption::new(Duration::from_millis(500), Duration::from_secs(3)).unwrap();
    let registrar = EtcdRegistrar::new(
        client.clone(),
        Service::new(&key, "127.0.0.1:8000").unwrap().with_ttl(ttl),
    );
    registrar.register().await.unwrap();
    let instancer = EtcdInstancer::new(client.clone(), prefix).await.unwrap();
    let mut events = instancer.subscribe();
    eventually_instances(&mut events, TIMEOUT, &["127.0.0.1:8000"]).await;

    let leader = cluster.leader().await;
    cluster.kill(leader);
    let new_leader = cluster.leader().await;
    assert_ne!(leader, new_leader);

    // Once a new leader is elected, the user's calls see no errors, though the dead endpoint
    // is still in the client's list.
    let mut want = vec!["127.0.0.1:8000".to_string()];
    for i in 0..20 {
        let inst = format!("127.0.0.1:{}", 8001 + i);
        client
            .put(&format!("{prefix}{inst}"), &inst, None)
            .await
            .unwrap_or_else(|e| panic!("put {i} after the leader change: {e}"));
        want.push(inst);
    }
    let (kvs, _) = client.get_prefix(prefix).await.unwrap();
    assert_eq!(kvs.len(), 21);
    let want_refs: Vec<&str> = want.iter().map(String::as_str).collect();
    eventually_instances(&mut events, TIMEOUT, &want_refs).await;
    // The registration stayed alive through it all (its TTL is 3 s; we are well past it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(registrar.state().is_registered(), "{:?}", registrar.state());
    let (kvs, _) = client.get_prefix(&key).await.unwrap();
    assert_eq!(kvs.len(), 1, "the registration expired");

    // The old leader comes back and back into rotation.
    restart_into_rotation(&mut cluster, &client, leader).await;

    // Kill the node the client is using now: the next calls fail over without an error, and
    // that node is taken out of rotation until it answers again.
    let current = client.current_endpoint();
    let victim = node_of(&cluster, &current);
    cluster.kill(victim);
    cluster.leader().await;
    for i in 0..10 {
        client
            .put(
                &format!("{prefix}x"),
                &format!("127.0.0.1:{}", 8100 + i),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("put {i} after killing the current endpoint: {e}"));
    }
    assert!(
        !client.live_endpoints().contains(&current),
        "the dead endpoint must be out of rotation: {client:?}"
    );
    assert_ne!(client.current_endpoint(), current);
    client.delete(&format!("{prefix}x")).await.unwrap();

    // A hung node (SIGSTOP: connections open, no answers) where the client is pinned: the
    // registrar's heartbeats, the watch and the user's calls move to the other nodes.
    restart_into_rotation(&mut cluster, &client, victim).await;
    let current = client.current_endpoint();
    let hung = node_of(&cluster, &current);
    cluster.pause(hung);
    client
        .put(&format!("{prefix}127.0.0.1:8200"), "127.0.0.1:8200", None)
        .await
        .unwrap_or_else(|e| panic!("put while {current} hangs: {e}"));
    want.push("127.0.0.1:8200".to_string());
    let want_refs: Vec<&str> = want.iter().map(String::as_str).collect();
    eventually_instances(&mut events, TIMEOUT, &want_refs).await;
    // Longer than the TTL: the registration must have been kept alive through another node.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (kvs, _) = client.get_prefix(&key).await.unwrap();
    assert_eq!(
        kvs.len(),
        1,
        "the registration expired while {current} hung"
    );
    assert!(registrar.state().is_registered(), "{:?}", registrar.state());
    cluster.resume(hung);

    registrar.deregister().await.unwrap();
    want.remove(0);
    let want_refs: Vec<&str> = want.iter().map(String::as_str).collect();
    eventually_instances(&mut events, TIMEOUT, &want_refs).await;
}
