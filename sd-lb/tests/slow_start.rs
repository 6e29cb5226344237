//! Slow start (`Outliers::slow_start`) through round robin, random and P2C, with paused time:
//! a new instance's share of picks rises in every interval of the window, starts well below
//! its fair share and reaches it by the window's end, while the first set is served evenly at
//! once; and picks turned away from an ejected instance spread evenly over the rest.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Instances, Name};
use sd_core::{Balancer, DefaultEndpointer, Endpointer};
use sd_lb::{Outliers, P2c, Random, Retry, RoundRobin};

const WINDOW: Duration = Duration::from_secs(30);
const BUCKET: Duration = Duration::from_secs(5);
/// Picks per bucket: 2 000 for each of 11 instances at a fair share.
const PICKS: usize = 22_000;

fn counts<B: Balancer>(balancer: &B, picks: usize) -> HashMap<String, usize>
where
    B::Endpoint: Name,
{
    let mut counts = HashMap::new();
    for _ in 0..picks {
        *counts
            .entry(balancer.endpoint().unwrap().name())
            .or_insert(0) += 1;
    }
    counts
}

async fn ramps_up<B, M>(name: &str, make: M)
where
    M: FnOnce(Arc<DefaultEndpointer<String>>, Arc<Outliers>) -> B,
    B: Balancer,
    B::Endpoint: Name,
{
    let first: Vec<String> = (0..10).map(|i| format!("i{i}")).collect();
    let instances = Instances::new(first.clone());
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().slow_start(WINDOW).unwrap());
    let balancer = make(endpointer.clone(), outliers.clone());

    // The first set the balancer sees is served evenly at once: nothing warms up.
    let at_start = counts(&balancer, 20_000);
    assert_eq!(outliers.warming(), 0, "{name}");
    for i in &first {
        let share = at_start[i] as f64 / 2_000.0;
        assert!(
            (0.85..=1.15).contains(&share),
            "{name}: {i} got {share:.2} of its share at once"
        );
    }

    let mut all = first.clone();
    all.push("new".into());
    let before = endpointer.version();
    instances.set(all);
    common::changed(&*endpointer, before).await;

    let fair = (PICKS / 11) as f64;
    let mut shares = Vec::new();
    // Buckets of 5 s, sampled at their middle: six within the window, two after it.
    tokio::time::advance(BUCKET / 2).await;
    for _ in 0..8 {
        let c = counts(&balancer, PICKS);
        shares.push(c.get("new").copied().unwrap_or(0) as f64 / fair);
        tokio::time::advance(BUCKET).await;
    }
    assert!(
        shares[0] < 0.35,
        "{name}: started at {:.2} of its fair share",
        shares[0]
    );
    for w in shares[..7].windows(2) {
        assert!(w[1] > w[0], "{name}: share did not rise: {shares:.2?}");
    }
    for s in &shares[6..] {
        assert!(
            (0.85..=1.15).contains(s),
            "{name}: after the window: {shares:.2?}"
        );
    }
    assert_eq!(outliers.warming(), 0, "{name}: warm after the window");
}

#[tokio::test(start_paused = true)]
async fn a_new_instance_ramps_up_round_robin() {
    ramps_up("round robin", |e, o| RoundRobin::new(e).with_outliers(o)).await;
}

#[tokio::test(start_paused = true)]
async fn a_new_instance_ramps_up_random() {
    ramps_up("random", |e, o| Random::with_seed(e, 11).with_outliers(o)).await;
}

#[tokio::test(start_paused = true)]
async fn a_new_instance_ramps_up_p2c() {
    ramps_up("p2c", |e, o| P2c::with_seed(e, 11).with_outliers(o)).await;
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_comes_back_warms_up_again() {
    let instances = Instances::new(["a", "b"]);
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().slow_start(WINDOW).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    counts(&rr, 10);
    for set in [&["a"][..], &["a", "b"][..]] {
        let before = endpointer.version();
        instances.set(set.iter().copied());
        common::changed(&*endpointer, before).await;
        counts(&rr, 10);
    }
    assert_eq!(outliers.warming(), 1, "b came back: it warms up");
    let c = counts(&rr, 2_000);
    assert!(c.get("b").copied().unwrap_or(0) < 300, "{c:?}");
    // Leaving while warming no longer counts as warming.
    let before = endpointer.version();
    instances.set(["a"]);
    common::changed(&*endpointer, before).await;
    counts(&rr, 10);
    assert_eq!(outliers.warming(), 0);
}

/// With one of ten instances ejected, round robin hands its turn to the next in turn and moves
/// on, so the other nine get exactly equal shares (not one neighbour twice as many).
#[tokio::test(start_paused = true)]
async fn an_ejected_instances_picks_spread_evenly() {
    let instances = Instances::new((0..10).map(|i| format!("i{i}")));
    let endpointer = Arc::new(instances.strings().await);
    let outliers = Arc::new(Outliers::new().consecutive_failures(1).unwrap());
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    let retry = Retry::new(&rr, 1, Duration::from_secs(1)).unwrap();
    while outliers.ejected() == 0 {
        let _ = retry
            .call(|e: String| async move {
                if e == "i4" {
                    Err("down")
                } else {
                    Ok(())
                }
            })
            .await;
    }
    let c = counts(&rr, 9_000);
    assert_eq!(c.get("i4"), None);
    for i in (0..10).filter(|&i| i != 4) {
        assert_eq!(c[&format!("i{i}")], 1_000, "{c:?}");
    }
}

#[test]
fn bad_settings_are_refused() {
    assert!(Outliers::new().slow_start(Duration::ZERO).is_err());
    assert!(Outliers::new().slow_start_shape(-1.0, 10).is_err());
    assert!(Outliers::new().slow_start_shape(f64::NAN, 10).is_err());
    assert!(Outliers::new().slow_start_shape(1.0, 200).is_err());
}
