//! Balancers over a live `DefaultEndpointer` whose set changes under them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{changed, changed_blocking, Instances};
use sd_core::{Balancer, Endpointer, Error};
use sd_lb::{P2c, Random, Retry, RoundRobin, StopReason};

fn counts<I: IntoIterator<Item = String>>(picks: I) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in picks {
        *m.entry(p).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn round_robin_follows_the_live_set() {
    let instances = Instances::new(["a", "b"]);
    let endpointer = Arc::new(instances.strings().await);
    let rr = RoundRobin::new(endpointer.clone());
    let picks: Vec<String> = (0..4).map(|_| rr.endpoint().unwrap()).collect();
    assert_eq!(picks, ["a", "b", "a", "b"]);

    let v = endpointer.version();
    instances.set(["a", "b", "c"]);
    changed(&endpointer, v).await;
    let k = 20;
    let c = counts((0..3 * k).map(|_| rr.endpoint().unwrap()));
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(
        c.values().all(|&n| n == k),
        "every endpoint exactly {k} times: {c:?}"
    );

    let v = endpointer.version();
    instances.set(["c"]);
    changed(&endpointer, v).await;
    assert!((0..5).all(|_| rr.endpoint().unwrap() == "c"));
}

#[tokio::test]
async fn random_follows_the_live_set() {
    let instances = Instances::new(["a", "b"]);
    let endpointer = Arc::new(instances.strings().await);
    let random = Random::with_seed(endpointer.clone(), 11);
    let before = counts((0..200).map(|_| random.endpoint().unwrap()));
    assert_eq!(before.keys().collect::<Vec<_>>(), ["a", "b"]);

    let v = endpointer.version();
    instances.set(["c", "d", "e"]);
    changed(&endpointer, v).await;
    let after = counts((0..300).map(|_| random.endpoint().unwrap()));
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["c", "d", "e"],
        "{after:?}"
    );
}

#[tokio::test]
async fn an_emptied_set_gives_no_endpoints_with_the_discovery_error() {
    let instances = Instances::new(["a"]);
    let endpointer = Arc::new(instances.strings().await);
    let rr = RoundRobin::new(endpointer.clone());
    let random = Random::new(endpointer.clone());
    let p2c = P2c::new(endpointer.clone());
    assert_eq!(rr.endpoint().unwrap(), "a");

    let v = endpointer.version();
    instances.set(Vec::<String>::new());
    changed(&endpointer, v).await;
    for result in [
        rr.endpoint(),
        random.endpoint(),
        p2c.endpoint().map(|g| g.clone()),
    ] {
        assert!(
            matches!(result, Err(Error::NoEndpoints { last_error: None })),
            "{result:?}"
        );
    }

    let v = endpointer.version();
    instances.fail("etcd unreachable");
    changed(&endpointer, v).await;
    for result in [
        rr.endpoint(),
        random.endpoint(),
        p2c.endpoint().map(|g| g.clone()),
    ] {
        match result {
            Err(
                err @ Error::NoEndpoints {
                    last_error: Some(_),
                },
            ) => {
                let chain = sd_core::Report(&err).to_string();
                assert!(chain.contains("etcd unreachable"), "{chain}")
            }
            other => panic!("expected NoEndpoints with the last error, got {other:?}"),
        }
    }

    let v = endpointer.version();
    instances.set(["b"]);
    changed(&endpointer, v).await;
    assert_eq!(rr.endpoint().unwrap(), "b");
    assert_eq!(random.endpoint().unwrap(), "b");
    assert_eq!(*p2c.endpoint().unwrap(), "b");
}

#[tokio::test]
async fn p2c_counts_survive_set_changes() {
    let instances = Instances::new(["a"]);
    let endpointer = Arc::new(instances.strings().await);
    let p2c = P2c::with_seed(endpointer.clone(), 5);

    let update = |set: &'static [&'static str]| {
        let v = endpointer.version();
        instances.set(set.iter().copied());
        changed(&endpointer, v)
    };

    let a = p2c.endpoint().unwrap();
    assert_eq!(*a, "a");
    update(&["a", "b"]).await;
    let b = p2c.endpoint().unwrap();
    assert_eq!(*b, "b", "a has a request in flight from before the change");

    // `a` leaves the set while its request is still running.
    update(&["b", "c"]).await;
    let c = p2c.endpoint().unwrap();
    assert_eq!(*c, "c", "b kept its count across the change");
    drop(b);

    // `a` comes back while its old request is still running: it keeps that count.
    update(&["a", "b"]).await;
    for _ in 0..5 {
        let g = p2c.endpoint().unwrap();
        assert_eq!(*g, "b", "a still has its request in flight");
    }
    assert_eq!(a.load(), 1);
    drop(a);
    let g1 = p2c.endpoint().unwrap();
    let g2 = p2c.endpoint().unwrap();
    assert_ne!(*g1, *g2, "both idle: one each");
    drop(c);
}

#[tokio::test]
async fn retry_through_a_live_round_robin_skips_a_failing_instance() {
    let instances = Instances::new(["bad", "good"]);
    let endpointer = Arc::new(instances.strings().await);
    let retry = Retry::new(
        RoundRobin::new(endpointer.clone()),
        2,
        Duration::from_secs(1),
    )
    .unwrap();
    for _ in 0..4 {
        let reply = retry
            .call(|e| async move {
                if e == "bad" {
                    Err("refused")
                } else {
                    Ok(e)
                }
            })
            .await
            .unwrap();
        assert_eq!(reply, "good");
    }
}

#[tokio::test]
async fn retry_over_p2c_releases_every_count() {
    // One endpoint: every attempt picks it, so a guard kept past its attempt would show.
    let instances = Instances::new(["a"]);
    let endpointer = Arc::new(instances.strings().await);
    let retry = Retry::new(
        P2c::with_seed(endpointer.clone(), 1),
        3,
        Duration::from_secs(1),
    )
    .unwrap();
    let err = retry
        .call(|guard| async move {
            assert_eq!(guard.load(), 1, "the previous attempt's guard was released");
            Err::<(), _>(format!("{} failed", *guard))
        })
        .await
        .unwrap_err();
    assert_eq!(err.reason(), StopReason::MaxAttempts);
    assert_eq!(err.to_string(), "all 3 attempts failed");
    assert_eq!(
        err.last().map(|e| e.to_string()).as_deref(),
        Some("a failed")
    );
    assert_eq!(retry.balancer().endpoint().unwrap().load(), 1);
}

/// Two threads pick at once while the set changes under them: every pick is a valid endpoint,
/// and once the last change is applied, both see only the final set.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn two_threads_pick_valid_endpoints_while_the_set_changes() {
    let instances = Instances::new(["a", "b", "c"]);
    let endpointer = Arc::new(instances.strings().await);
    let rr = RoundRobin::new(endpointer.clone());
    let random = Random::new(endpointer.clone());
    let p2c = P2c::new(endpointer.clone());
    let all: BTreeSet<&str> = ["a", "b", "c", "d", "e"].into();
    let stop = AtomicBool::new(false);
    let picked = [AtomicUsize::new(0), AtomicUsize::new(0)];
    // Waits (bounded) until both threads have picked again since the last call.
    let both_picked = || {
        let seen = picked.each_ref().map(|p| p.load(Ordering::SeqCst));
        let until = Instant::now() + Duration::from_secs(5);
        while picked
            .iter()
            .zip(seen)
            .any(|(p, s)| p.load(Ordering::SeqCst) == s)
        {
            assert!(Instant::now() < until, "a picking thread is stuck");
            std::thread::yield_now();
        }
    };

    let picker = |count: &AtomicUsize| {
        while !stop.load(Ordering::Relaxed) {
            for e in [
                rr.endpoint().unwrap(),
                random.endpoint().unwrap(),
                p2c.endpoint().unwrap().clone(),
            ] {
                assert!(all.contains(e.as_str()), "invalid endpoint {e}");
            }
            count.fetch_add(1, Ordering::SeqCst);
        }
    };
    std::thread::scope(|s| {
        let t1 = s.spawn(|| picker(&picked[0]));
        let t2 = s.spawn(|| picker(&picked[1]));
        for set in [
            &["c", "d"][..],
            &["a", "e"],
            &["b", "c", "d", "e"],
            &["d", "e"],
        ] {
            both_picked();
            let v = endpointer.version();
            instances.set(set.iter().copied());
            changed_blocking(&endpointer, v);
        }
        both_picked();
        stop.store(true, Ordering::Relaxed);
        t1.join().unwrap();
        t2.join().unwrap();

        // The final set is {d, e}: from now on, neither thread sees anything else.
        let finals = || {
            (0..100)
                .flat_map(|_| {
                    [
                        rr.endpoint().unwrap(),
                        random.endpoint().unwrap(),
                        p2c.endpoint().unwrap().clone(),
                    ]
                })
                .collect::<BTreeSet<String>>()
        };
        let f1 = s.spawn(finals);
        let f2 = s.spawn(finals);
        let want: BTreeSet<String> = ["d".to_string(), "e".to_string()].into();
        assert_eq!(f1.join().unwrap(), want);
        assert_eq!(f2.join().unwrap(), want);
    });
}

/// One retried call over three instances of which two fail: the attempts never go to the same
/// failed instance twice, so the call always succeeds by its third attempt, for round robin,
/// random, P2C, weighted round robin, weighted random and zone preference alike.
#[tokio::test]
async fn a_retry_never_repeats_a_failed_instance() {
    let instances = Instances::new(["bad1", "bad2", "good"]);
    let endpointer = Arc::new(instances.strings().await);
    async fn run<B>(name: &str, balancer: B)
    where
        B: sd_core::Balancer,
        B::Endpoint: std::ops::Deref<Target = String>,
    {
        let retry = Retry::new(balancer, 3, Duration::from_secs(1)).unwrap();
        for call in 0..300 {
            let seen = std::sync::Mutex::new(Vec::new());
            let out = retry
                .call(|e| {
                    let name = (*e).clone();
                    seen.lock().unwrap().push(name.clone());
                    async move {
                        if name == "good" {
                            Ok(())
                        } else {
                            Err(format!("{name} failed"))
                        }
                    }
                })
                .await;
            let seen = seen.into_inner().unwrap();
            let mut distinct = seen.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), seen.len(), "{name}, call {call}: {seen:?}");
            assert!(out.is_ok(), "{name}, call {call}: {seen:?}");
        }
    }
    /// Owned endpoints, seen through `Deref` as the guards of P2C are.
    struct Owned<B>(B);
    impl<B: sd_core::Balancer<Endpoint = String>> sd_core::Balancer for Owned<B> {
        type Endpoint = Box<String>;
        fn endpoint(&self) -> Result<Box<String>, sd_core::Error> {
            self.0.endpoint().map(Box::new)
        }
        fn endpoint_avoiding(
            &self,
            tried: &mut sd_core::Tried,
        ) -> Result<Box<String>, sd_core::Error> {
            self.0.endpoint_avoiding(tried).map(Box::new)
        }
    }
    run("round robin", Owned(RoundRobin::new(endpointer.clone()))).await;
    run("random", Owned(Random::with_seed(endpointer.clone(), 5))).await;
    run("p2c", P2c::with_seed(endpointer.clone(), 6)).await;
    run(
        "weighted round robin",
        Owned(sd_lb::WeightedRoundRobin::new(endpointer.clone())),
    )
    .await;
    run(
        "weighted random",
        Owned(sd_lb::WeightedRandom::with_seed(endpointer.clone(), 7)),
    )
    .await;
    run(
        "zone aware",
        Owned(sd_lb::ZoneAware::new(endpointer.clone(), "z")),
    )
    .await;
}
