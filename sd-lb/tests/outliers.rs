//! Outlier detection through round robin and Retry, with paused time: ejection after the
//! threshold, no picks while ejected, one probe when the ejection ends, longer ejections for
//! a repeat offender, restoration after a good probe, and the max-ejection cap.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Instances;
use sd_core::Endpointer;
use sd_lb::{Outliers, P2c, Random, Retry, RoundRobin};

/// One call per attempt (no retries), so every pick's outcome is seen.
async fn calls<B>(retry: &Retry<B>, n: usize, failing: &dyn Fn(&str) -> bool) -> Vec<String>
where
    B: sd_core::Balancer,
    B::Endpoint: std::ops::Deref<Target = String>,
{
    let mut picked = Vec::new();
    for _ in 0..n {
        let _ = retry
            .call(|e: B::Endpoint| {
                let e: String = (*e).clone();
                picked.push(e.clone());
                let fail = failing(&e);
                async move {
                    if fail {
                        Err("down")
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
    }
    picked
}

/// An endpoint owned by value, seen through `Deref` as P2C's guards are.
struct Owned<B>(B);

impl<B: sd_core::Balancer<Endpoint = String>> sd_core::Balancer for Owned<B> {
    type Endpoint = Box<String>;
    fn endpoint(&self) -> Result<Box<String>, sd_core::Error> {
        self.0.endpoint().map(Box::new)
    }
    fn endpoint_avoiding(&self, tried: &mut sd_core::Tried) -> Result<Box<String>, sd_core::Error> {
        self.0.endpoint_avoiding(tried).map(Box::new)
    }
    fn report(&self, tried: &sd_core::Tried, ok: bool) {
        self.0.report(tried, ok)
    }
}

/// One instance of ten failing, through `balancer`: ejected after its 5th failure in a row, no
/// picks while ejected, one probe when the ejection ends (which fails: ejected again for
/// twice as long), then healed, restored by the next probe.
async fn eject_probe_restore<B>(name: &str, outliers: Arc<Outliers>, balancer: B)
where
    B: sd_core::Balancer,
    B::Endpoint: std::ops::Deref<Target = String>,
{
    let retry = Retry::new(balancer, 1, Duration::from_secs(1)).unwrap();
    let broken = AtomicBool::new(true);
    let failing = |e: &str| e == "i3" && broken.load(Ordering::SeqCst);
    let count = |picks: &[String]| picks.iter().filter(|p| *p == "i3").count();

    let mut before = 0;
    for _ in 0..2000 {
        before += count(&calls(&retry, 1, &failing).await);
        if outliers.ejected() == 1 {
            break;
        }
    }
    assert_eq!(
        (before, outliers.ejected()),
        (5, 1),
        "{name}: ejected after 5 failures"
    );
    let during = calls(&retry, 200, &failing).await;
    assert_eq!(count(&during), 0, "{name}: no picks while ejected");

    // The ejection (30 s) ends: one probe, which fails: ejected again, for 60 s.
    tokio::time::advance(Duration::from_secs(30)).await;
    let probe = calls(&retry, 200, &failing).await;
    assert_eq!(count(&probe), 1, "{name}: exactly one probe");
    assert_eq!(outliers.ejected(), 1);
    tokio::time::advance(Duration::from_secs(45)).await;
    let still = calls(&retry, 200, &failing).await;
    assert_eq!(count(&still), 0, "{name}: 60 s this time");

    // Healed: the next probe succeeds and i3 is back.
    broken.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(15)).await;
    let after = calls(&retry, 200, &failing).await;
    assert!(
        count(&after) >= 5,
        "{name}: restored, {} picks of 200",
        count(&after)
    );
    assert_eq!(outliers.ejected(), 0, "{name}");
}

#[tokio::test(start_paused = true)]
async fn a_failing_instance_is_ejected_probed_and_restored() {
    let instances = Instances::new((0..10).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let o = Arc::new(Outliers::new()); // 5 in a row, 30 s, 50 %
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(o.clone());
    eject_probe_restore("round robin", o, Owned(rr)).await;
    let o = Arc::new(Outliers::new());
    let random = Random::with_seed(endpointer.clone(), 1).with_outliers(o.clone());
    eject_probe_restore("random", o, Owned(random)).await;
    let o = Arc::new(Outliers::new());
    let p2c = P2c::with_seed(endpointer.clone(), 2).with_outliers(o.clone());
    eject_probe_restore("p2c", o, p2c).await;
}

#[tokio::test(start_paused = true)]
async fn no_more_than_the_cap_is_ejected() {
    let instances = Instances::new((0..10).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new()); // at most 50 %: 5 of 10
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    let retry = Retry::new(Owned(rr), 1, Duration::from_secs(1)).unwrap();
    // Eight of ten fail.
    let failing = |e: &str| !matches!(e, "i0" | "i1");
    let mut most = 0;
    for _ in 0..20 {
        calls(&retry, 50, &failing).await;
        most = most.max(outliers.ejected());
    }
    assert_eq!(most, 5, "at most half of the set ejected at once");
    // The three failing instances left in service still get picks: the healthy two are not
    // made to carry everything.
    let picks = calls(&retry, 100, &failing).await;
    let distinct: std::collections::BTreeSet<_> = picks.iter().collect();
    assert_eq!(distinct.len(), 5, "{distinct:?}");
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_leaves_and_returns_starts_clean() {
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(2).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    let retry = Retry::new(Owned(rr), 1, Duration::from_secs(1)).unwrap();
    let failing = |e: &str| e == "i2";
    calls(&retry, 8, &failing).await;
    assert_eq!(outliers.ejected(), 1);
    // i2 leaves (its ejection no longer counts), then comes back: in service at once.
    let v = endpointer.version();
    instances.set(["i0", "i1", "i3"]);
    common::changed(&*endpointer, v).await;
    calls(&retry, 3, &|_| false).await;
    assert_eq!(outliers.ejected(), 0);
    let v = endpointer.version();
    instances.set(["i0", "i1", "i2", "i3"]);
    common::changed(&*endpointer, v).await;
    let picks = calls(&retry, 4, &|_| false).await;
    assert!(picks.iter().any(|p| p == "i2"), "{picks:?}");
}

/// An instance failing every other call is never 5 in a row, but the failure-rate detector
/// (50 % over 20 calls) ejects it; without the detector it stays.
#[tokio::test(start_paused = true)]
async fn an_instance_failing_often_but_not_in_a_row_is_ejected_by_rate() {
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let flip = AtomicBool::new(false);
    // i1 fails every other call it gets.
    let failing = |e: &str| e == "i1" && !flip.fetch_xor(true, Ordering::SeqCst);
    for (rate, want) in [(None, 0), (Some((50, 20)), 1)] {
        let mut outliers = Outliers::new();
        if let Some((percent, window)) = rate {
            outliers = outliers.failure_rate(percent, window).unwrap();
        }
        let outliers = Arc::new(outliers);
        let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
        let retry = Retry::new(Owned(rr), 1, Duration::from_secs(1)).unwrap();
        calls(&retry, 400, &failing).await;
        assert_eq!(outliers.ejected(), want, "detector {rate:?}");
    }
}

/// A program that calls endpoints itself reports by instance: the same ejection.
#[tokio::test(start_paused = true)]
async fn direct_reports_by_instance_eject_too() {
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(3).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    use sd_core::Balancer;
    for _ in 0..40 {
        let e = rr.endpoint().unwrap();
        outliers.report(&sd_core::Instance::new(&e), e != "i2");
    }
    assert_eq!(outliers.ejected(), 1);
    let picks: Vec<String> = (0..40).map(|_| rr.endpoint().unwrap()).collect();
    assert!(!picks.iter().any(|p| p == "i2"), "{picks:?}");
}

/// A fixed list names every endpoint alike: each still has its own health.
#[test]
fn a_fixed_lists_endpoints_each_have_their_own_health() {
    use sd_core::{Balancer, FixedEndpointer};
    let outliers = Arc::new(Outliers::new().consecutive_failures(2).unwrap());
    let rr = RoundRobin::new(FixedEndpointer::new(vec!["a", "b", "c", "d"]))
        .with_outliers(outliers.clone());
    let retry = Retry::new(&rr, 1, Duration::from_secs(1)).unwrap();
    for _ in 0..20 {
        let _ = futures::FutureExt::now_or_never(retry.call(|e| async move {
            if e == "b" {
                Err(())
            } else {
                Ok(())
            }
        }));
    }
    assert_eq!(outliers.ejected(), 1, "only b");
    let picks: Vec<&str> = (0..30).map(|_| rr.endpoint().unwrap()).collect();
    assert!(!picks.contains(&"b") && picks.contains(&"a"), "{picks:?}");
}

/// Outcomes of calls picked before an ejection that arrive after it (a late success, a late
/// failure) decide nothing: the instance stays out for its whole ejection, and only the probe
/// when it ends restores it.
#[tokio::test(start_paused = true)]
async fn late_outcomes_of_calls_from_before_an_ejection_decide_nothing() {
    use sd_core::{Balancer, Instance};
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(1).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    let i2 = Instance::new("i2");
    outliers.report(&i2, false);
    assert_eq!(outliers.ejected(), 1);
    // Calls that were in flight when it was ejected end now, some well, some not.
    for ok in [true, false, true, true] {
        outliers.report(&i2, ok);
    }
    assert_eq!(outliers.ejected(), 1, "a late outcome decided");
    let picks: Vec<String> = (0..40).map(|_| rr.endpoint().unwrap()).collect();
    assert!(!picks.iter().any(|p| p == "i2"), "{picks:?}");
    // Its first ejection (30 s) ends: one probe, whose success restores it.
    tokio::time::advance(Duration::from_secs(31)).await;
    let picks: Vec<String> = (0..8).map(|_| rr.endpoint().unwrap()).collect();
    assert_eq!(picks.iter().filter(|p| *p == "i2").count(), 1, "{picks:?}");
    outliers.report(&i2, true);
    assert_eq!(outliers.ejected(), 0);
}

/// Many calls to one instance failing at once eject it once: it counts once against the cap,
/// and its restoration brings the count back to zero.
#[test]
fn failures_reported_at_once_from_many_threads_eject_once() {
    use sd_core::{Balancer, FixedEndpointer, Instance};
    for round in 0..500 {
        let outliers = Arc::new(
            Outliers::new()
                .consecutive_failures(1)
                .unwrap()
                .max_ejection_percent(100)
                .unwrap(),
        );
        let rr =
            RoundRobin::new(FixedEndpointer::new(vec!["a", "b"])).with_outliers(outliers.clone());
        rr.endpoint().unwrap();
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    start.wait();
                    // A fixed list's endpoints are unnamed: the first is `("", 0)`.
                    outliers.report(&Instance::new(""), false);
                });
            }
        });
        assert_eq!(outliers.ejected(), 1, "round {round}");
    }
}

/// Health belongs to the newest set: an instance that leaves while ejected stops counting
/// against the cap, and comes back clean, even while another thread's cache still holds the
/// table of the set it left.
#[tokio::test(start_paused = true)]
async fn an_instance_leaving_is_let_go_even_while_a_thread_holds_its_old_table() {
    use sd_core::{Balancer, Instance};
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(1).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    // This thread picks once, then never again: its cache keeps the first set's table.
    rr.endpoint().unwrap();
    let on_another_thread =
        |f: &(dyn Fn() + Sync)| std::thread::scope(|s| s.spawn(f).join().unwrap());
    on_another_thread(&|| {
        rr.endpoint().unwrap();
        outliers.report(&Instance::new("i2"), false);
    });
    assert_eq!(outliers.ejected(), 1);

    let v = endpointer.version();
    instances.set(["i0", "i1", "i3"]);
    common::changed(&*endpointer, v).await;
    on_another_thread(&|| {
        rr.endpoint().unwrap();
    });
    assert_eq!(
        outliers.ejected(),
        0,
        "i2 left, yet still counts as ejected"
    );

    let v = endpointer.version();
    instances.set(["i0", "i1", "i2", "i3"]);
    common::changed(&*endpointer, v).await;
    on_another_thread(&|| {
        let picks: Vec<String> = (0..8).map(|_| rr.endpoint().unwrap()).collect();
        assert_eq!(picks.iter().filter(|p| *p == "i2").count(), 2, "{picks:?}");
    });
    assert_eq!(outliers.ejected(), 0);
}

/// A retry steps past an ejected instance too: when its draw lands on the instance that just
/// failed, the next one tried is an untried one in service, not the ejected one.
#[tokio::test(start_paused = true)]
async fn a_retry_does_not_step_onto_an_ejected_instance() {
    use sd_core::{Balancer, Instance};
    let instances = Instances::new(["a-failing", "b-ejected", "c-good"]);
    let endpointer = Arc::new(instances.strings().await);
    // One of three may be out: b, so a (failing every call) stays in.
    let outliers = Arc::new(
        Outliers::new()
            .consecutive_failures(1)
            .unwrap()
            .max_ejection_percent(34)
            .unwrap(),
    );
    let random = Random::new(endpointer.clone()).with_outliers(outliers.clone());
    random.endpoint().unwrap();
    outliers.report(&Instance::new("b-ejected"), false);
    assert_eq!(outliers.ejected(), 1);
    let retry = Retry::new(Owned(random), 2, Duration::from_secs(1)).unwrap();
    let picks = calls(&retry, 300, &|e| e == "a-failing").await;
    assert_eq!(outliers.ejected(), 1, "the cap holds a in service");
    assert!(picks.iter().any(|p| p == "a-failing"), "{picks:?}");
    assert!(!picks.iter().any(|p| p == "b-ejected"), "{picks:?}");
}

/// A call that hangs until `Retry`'s deadline has failed: an instance that accepts calls and
/// never answers is ejected like one that answers with errors.
#[tokio::test(start_paused = true)]
async fn calls_cut_short_by_the_deadline_count_as_failures() {
    let instances = Instances::new((0..4).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(2).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    let retry = Retry::new(Owned(rr), 1, Duration::from_secs(1)).unwrap();
    let mut picked = Vec::new();
    for _ in 0..16 {
        let _ = retry
            .call(|e: Box<String>| {
                picked.push((*e).clone());
                let hangs = *e == "i1";
                async move {
                    if hangs {
                        std::future::pending::<()>().await;
                    }
                    Ok::<(), &str>(())
                }
            })
            .await;
    }
    assert_eq!(outliers.ejected(), 1, "{picked:?}");
    let hung = picked.iter().filter(|p| *p == "i1").count();
    assert_eq!(hung, 2, "i1 ejected after its second hung call: {picked:?}");
}
