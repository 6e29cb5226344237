//! Active health checks (`Outliers::spawn_checks`) with paused time: the thresholds in both
//! directions, no picks while out, a hanging check is a failure, the ejection cap holds, calls
//! do not bring a checked-out instance back, dropping the handle stops the checks and brings
//! back what they took out, and a check that panics has failed.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Instances;
use sd_core::Balancer;
use sd_lb::checks::ActiveChecks;
use sd_lb::outliers::HealthChange;
use sd_lb::{Outliers, Retry, RoundRobin};

const INTERVAL: Duration = Duration::from_secs(1);

/// Instances whose check fails (or hangs), and every health change reported.
#[derive(Clone, Default)]
struct World {
    failing: Arc<Mutex<HashSet<String>>>,
    hanging: Arc<Mutex<HashSet<String>>>,
    changes: Arc<Mutex<Vec<(String, HealthChange)>>>,
    checks: Arc<AtomicUsize>,
}

impl World {
    fn fail(&self, names: &[&str]) {
        *self.failing.lock().unwrap() = names.iter().map(|s| s.to_string()).collect();
    }

    fn outliers(&self) -> Arc<Outliers> {
        let changes = self.changes.clone();
        Arc::new(Outliers::new().on_change(move |i, c| {
            changes.lock().unwrap().push((i.to_string(), c.clone()));
        }))
    }

    fn check(
        &self,
    ) -> impl Fn(
        sd_core::Instance,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
           + Send
           + Sync
           + 'static {
        let world = self.clone();
        move |instance| {
            world.checks.fetch_add(1, Ordering::SeqCst);
            let name = instance.to_string();
            let fails = world.failing.lock().unwrap().contains(&name);
            let hangs = world.hanging.lock().unwrap().contains(&name);
            Box::pin(async move {
                if hangs {
                    std::future::pending::<()>().await;
                }
                !fails
            })
        }
    }
}

/// Waits `rounds` check intervals (paused time advances on its own while all tasks wait).
async fn rounds(n: u32) {
    tokio::time::sleep(INTERVAL * n).await;
}

fn picks_of<B: Balancer<Endpoint = String>>(b: &B, name: &str, n: usize) -> usize {
    (0..n).filter(|_| b.endpoint().unwrap() == name).count()
}

#[tokio::test(start_paused = true)]
async fn thresholds_take_an_instance_out_and_bring_it_back() {
    let world = World::default();
    let instances = Instances::new((0..10).map(|i| format!("i{i}")));
    let outliers = world.outliers();
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    let settings = ActiveChecks::new(INTERVAL)
        .unwrap()
        .thresholds(2, 3)
        .unwrap();
    let _checks = outliers.spawn_checks(settings, world.check()).unwrap();
    // The first check runs at once; let it land between ticks.
    tokio::time::sleep(INTERVAL / 2).await;

    world.fail(&["i3"]);
    rounds(2).await;
    assert_eq!(outliers.ejected(), 0, "two failed checks are not enough");
    assert!(picks_of(&rr, "i3", 100) > 0);
    rounds(1).await;
    assert_eq!(outliers.ejected(), 1, "the third takes it out");
    assert_eq!(picks_of(&rr, "i3", 1000), 0, "no picks while out");

    world.fail(&[]);
    rounds(1).await;
    assert_eq!(outliers.ejected(), 1, "one pass is not enough");
    assert_eq!(picks_of(&rr, "i3", 100), 0);
    rounds(1).await;
    assert_eq!(outliers.ejected(), 0, "the second brings it back");
    assert_eq!(picks_of(&rr, "i3", 100), 10);
    let changes = world.changes.lock().unwrap().clone();
    assert_eq!(
        changes,
        [
            ("i3".to_string(), HealthChange::Unhealthy { failures: 3 }),
            ("i3".to_string(), HealthChange::Restored)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_check_is_a_failure() {
    let world = World::default();
    let instances = Instances::new(["a", "b"]);
    let outliers = world.outliers();
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    world.hanging.lock().unwrap().insert("a".into());
    let settings = ActiveChecks::new(INTERVAL)
        .unwrap()
        .timeout(Duration::from_millis(300))
        .unwrap()
        .thresholds(1, 2)
        .unwrap();
    let _checks = outliers.spawn_checks(settings, world.check()).unwrap();
    tokio::time::sleep(INTERVAL / 2).await;
    rounds(2).await;
    assert_eq!(outliers.ejected(), 1);
    assert_eq!(picks_of(&rr, "a", 100), 0);
}

#[tokio::test(start_paused = true)]
async fn the_cap_holds_and_calls_do_not_bring_them_back() {
    let world = World::default();
    let names: Vec<String> = (0..10).map(|i| format!("i{i}")).collect();
    let instances = Instances::new(names.clone());
    let outliers = world.outliers();
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    let _checks = outliers
        .spawn_checks(ActiveChecks::new(INTERVAL).unwrap(), world.check())
        .unwrap();
    tokio::time::sleep(INTERVAL / 2).await;
    let failing: Vec<&str> = names[..8].iter().map(String::as_str).collect();
    world.fail(&failing);
    rounds(5).await;
    assert_eq!(outliers.ejected(), 5, "at most 50 % out");

    // Successes reported for every instance, directly and through Retry calls: still out.
    for name in &names {
        outliers.report(&sd_core::Instance::new(name.as_str()), true);
    }
    let retry = Retry::new(&rr, 1, Duration::from_secs(1)).unwrap();
    for _ in 0..200 {
        retry
            .call(|_e: String| async { Ok::<_, &str>(()) })
            .await
            .unwrap();
    }
    rounds(1).await;
    assert_eq!(outliers.ejected(), 5);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_stops_the_checks() {
    let world = World::default();
    let instances = Instances::new(["a", "b"]);
    let outliers = world.outliers();
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    let checks = outliers
        .spawn_checks(ActiveChecks::new(INTERVAL).unwrap(), world.check())
        .unwrap();
    tokio::time::sleep(INTERVAL / 2).await;
    rounds(3).await;
    let seen = world.checks.load(Ordering::SeqCst);
    assert_eq!(seen, 8, "two instances, four rounds");
    drop(checks);
    rounds(5).await;
    assert_eq!(world.checks.load(Ordering::SeqCst), seen);
}

#[test]
fn spawning_outside_a_runtime_is_an_error() {
    let outliers = Arc::new(Outliers::new());
    let err = outliers
        .spawn_checks(ActiveChecks::new(INTERVAL).unwrap(), |_| async { true })
        .unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

/// Only checks bring back what checks took out: when they stop, it is back in service.
#[tokio::test(start_paused = true)]
async fn stopping_the_checks_brings_back_what_they_took_out() {
    let world = World::default();
    let instances = Instances::new(["a", "b", "c"]);
    let outliers = world.outliers();
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    world.fail(&["b"]);
    let checks = outliers
        .spawn_checks(ActiveChecks::new(INTERVAL).unwrap(), world.check())
        .unwrap();
    rounds(4).await;
    assert_eq!(outliers.ejected(), 1);
    assert_eq!(picks_of(&rr, "b", 30), 0);
    drop(checks);
    assert_eq!(outliers.ejected(), 0);
    assert_eq!(picks_of(&rr, "b", 30), 10);
}

/// A check that panics before returning its future has failed, and the checks go on.
#[tokio::test(start_paused = true)]
async fn a_check_that_panics_has_failed() {
    let instances = Instances::new(["a", "b", "c"]);
    let outliers = Arc::new(Outliers::new());
    let rr = RoundRobin::new(instances.strings().await).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    let checked = Arc::new(AtomicUsize::new(0));
    let count = checked.clone();
    let _checks = outliers
        .spawn_checks(ActiveChecks::new(INTERVAL).unwrap(), move |instance| {
            count.fetch_add(1, Ordering::SeqCst);
            if instance.addr() == "b" {
                panic!("a check with a bug");
            }
            async { true }
        })
        .unwrap();
    tokio::time::sleep(INTERVAL / 2).await;
    rounds(3).await;
    assert_eq!(
        checked.load(Ordering::SeqCst),
        12,
        "three instances, four rounds"
    );
    assert_eq!(outliers.ejected(), 1);
    assert_eq!(picks_of(&rr, "b", 30), 0);
}
