//! Graceful drain (`EndpointerOptions::drain`) through round robin, random and P2C inside
//! `Retry`: a removed endpoint gets no new pick, its closer waits for the calls in flight
//! through it (or the drain timeout), and runs exactly once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Instances, Name};
use sd_core::{
    Balancer, Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Instance,
};
use sd_lb::{P2c, Random, Retry, RoundRobin};
use tokio::sync::oneshot;

/// How many times each instance's closer ran.
#[derive(Clone, Default)]
struct Closes(Arc<Mutex<HashMap<String, usize>>>);

impl Closes {
    fn of(&self, instance: &str) -> usize {
        self.0.lock().unwrap().get(instance).copied().unwrap_or(0)
    }
}

/// A draining endpointer over `instances` whose endpoints are the instance strings.
async fn draining(
    instances: &Instances,
    timeout: Duration,
) -> (Arc<DefaultEndpointer<String>>, Closes) {
    let closes = Closes::default();
    let factory = {
        let closes = closes.clone();
        move |i: &Instance| -> Result<(String, Option<Closer>), Error> {
            let (closes, name) = (closes.clone(), i.to_string());
            let closer: Closer = Box::new(move || {
                *closes.0.lock().unwrap().entry(name).or_insert(0) += 1;
            });
            Ok((i.to_string(), Some(closer)))
        }
    };
    let endpointer =
        DefaultEndpointer::new(instances, factory, EndpointerOptions::new().drain(timeout)).await;
    (Arc::new(endpointer), closes)
}

/// Starts a call through `retry` that holds its endpoint until `release` fires; returns the
/// endpoint it got.
async fn hold<B>(retry: Arc<Retry<B>>) -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>)
where
    B: Balancer + 'static,
    B::Endpoint: Name + Send,
{
    let (got_tx, got_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut got = Some(got_tx);
        let mut release = Some(release_rx);
        let _ = retry
            .call(|e: B::Endpoint| {
                if let Some(tx) = got.take() {
                    let _ = tx.send(e.name());
                }
                let release = release.take();
                async move {
                    if let Some(r) = release {
                        let _ = r.await;
                    }
                    let _keep = e;
                    Ok::<_, &str>(())
                }
            })
            .await;
    });
    let endpoint = got_rx.await.expect("the call started");
    (endpoint, release_tx, task)
}

async fn closer_waits_for_the_call_in_flight<B, M>(name: &str, make: M)
where
    M: FnOnce(Arc<DefaultEndpointer<String>>) -> B,
    B: Balancer + 'static,
    B::Endpoint: Name + Send,
{
    let instances = Instances::new(["a", "b", "c"]);
    let (endpointer, closes) = draining(&instances, Duration::from_secs(30)).await;
    let retry = Arc::new(Retry::new(make(endpointer.clone()), 1, Duration::from_secs(60)).unwrap());
    let (busy, release, task) = hold(retry.clone()).await;

    let rest: Vec<&str> = ["a", "b", "c"].into_iter().filter(|i| *i != busy).collect();
    let before = endpointer.version();
    instances.set(rest.clone());
    common::changed(&*endpointer, before).await;
    assert_eq!(closes.of(&busy), 0, "{name}: closed under a call in flight");

    // New picks never choose the draining endpoint.
    for _ in 0..300 {
        let e = retry
            .call(|e: B::Endpoint| async move { Ok::<_, &str>(e.name()) })
            .await
            .unwrap();
        assert_ne!(e, busy, "{name}: picked a removed endpoint");
    }
    assert_eq!(closes.of(&busy), 0, "{name}");

    release.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(closes.of(&busy), 1, "{name}: closed when its call ended");
    assert!(rest.iter().all(|i| closes.of(i) == 0), "{name}");
}

#[tokio::test]
async fn closer_waits_for_the_call_in_flight_round_robin() {
    closer_waits_for_the_call_in_flight("round robin", RoundRobin::new).await;
}

#[tokio::test]
async fn closer_waits_for_the_call_in_flight_random() {
    closer_waits_for_the_call_in_flight("random", |e| Random::with_seed(e, 7)).await;
}

#[tokio::test]
async fn closer_waits_for_the_call_in_flight_p2c() {
    closer_waits_for_the_call_in_flight("p2c", |e| P2c::with_seed(e, 7)).await;
}

#[tokio::test]
async fn an_idle_removed_endpoint_closes_at_once() {
    let instances = Instances::new(["a", "b"]);
    let (endpointer, closes) = draining(&instances, Duration::from_secs(30)).await;
    let retry = Retry::new(
        RoundRobin::new(endpointer.clone()),
        1,
        Duration::from_secs(1),
    )
    .unwrap();
    for _ in 0..4 {
        retry
            .call(|_e: String| async { Ok::<_, &str>(()) })
            .await
            .unwrap();
    }
    let before = endpointer.version();
    instances.set(["b"]);
    common::changed(&*endpointer, before).await;
    assert_eq!(closes.of("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_drain_timeout_closes_a_hung_call_once() {
    let instances = Instances::new(["a"]);
    let (endpointer, closes) = draining(&instances, Duration::from_secs(5)).await;
    let retry = Arc::new(
        Retry::new(
            RoundRobin::new(endpointer.clone()),
            1,
            Duration::from_secs(3600),
        )
        .unwrap(),
    );
    let (busy, release, task) = hold(retry).await;
    assert_eq!(busy, "a");
    let before = endpointer.version();
    instances.set(Vec::<&str>::new());
    common::changed(&*endpointer, before).await;

    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert_eq!(closes.of("a"), 0, "not before the timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closes.of("a"), 1, "closed by the timeout");

    // The hung call ends late: no second close.
    release.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(closes.of("a"), 1);
}

/// Eight callers on two threads while the set changes 40 times: no closer ever runs while a
/// call through its instance is in flight, and every removed instance is closed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_closer_runs_under_a_call_during_churn() {
    let instances = Instances::new((0..6).map(|i| format!("i{i}")));
    let (endpointer, closes) = draining(&instances, Duration::from_secs(60)).await;
    let retry =
        Arc::new(Retry::new(P2c::new(endpointer.clone()), 2, Duration::from_secs(60)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (retry, stop, violations, closes, calls) = (
                retry.clone(),
                stop.clone(),
                violations.clone(),
                closes.clone(),
                calls.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let closes = &closes;
                    let violations = &violations;
                    let _ = retry
                        .call(|e| async move {
                            for _ in 0..3 {
                                if closes.of(&e.name()) != 0 {
                                    violations.fetch_add(1, Ordering::SeqCst);
                                }
                                tokio::task::yield_now().await;
                            }
                            Ok::<_, &str>(())
                        })
                        .await;
                    calls.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let mut next = 6;
    let mut live: Vec<String> = (0..6).map(|i| format!("i{i}")).collect();
    let mut removed = Vec::new();
    for round in 0..40 {
        // Replace one instance per round (the oldest), sometimes two.
        for _ in 0..(1 + round % 2) {
            removed.push(live.remove(0));
            live.push(format!("i{next}"));
            next += 1;
        }
        let before = endpointer.version();
        instances.set(live.clone());
        common::changed(&*endpointer, before).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    assert!(calls.load(Ordering::SeqCst) > 100, "the callers ran");
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a closer ran under a call"
    );
    for r in &removed {
        assert_eq!(closes.of(r), 1, "{r} closed once");
    }
    assert!(live.iter().all(|i| closes.of(i) == 0));
    let _ = endpointer.endpoints();
}
