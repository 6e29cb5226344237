//! Weighted balancing over a live endpointer: shares by weight, and weights that change live.

mod common;

use std::collections::HashMap;

use common::Instances;
use sd_core::{
    endpoint_fn, Balancer, DefaultEndpointer, Endpointer, EndpointerOptions, Instance, Metadata,
    ValueFormat,
};
use sd_lb::{P2c, WeightedRandom, WeightedRoundRobin};

fn weighted(addr: &str, weight: u32, format: ValueFormat) -> Instance {
    let meta = Metadata::new().with_weight(weight).expect("a valid weight");
    Instance::with_metadata(addr, meta, format).expect("encodable")
}

/// Instances `w1`..`w4` of weights 1 to 4 (alternately in etcd's format and ours).
fn one_to_four() -> Vec<Instance> {
    (1..=4)
        .map(|w| {
            let format = if w % 2 == 0 {
                ValueFormat::EtcdNaming
            } else {
                ValueFormat::Json
            };
            weighted(&format!("w{w}"), w, format)
        })
        .collect()
}

async fn endpointer(instances: &Instances) -> DefaultEndpointer<String> {
    DefaultEndpointer::new(
        instances,
        endpoint_fn(|i| i.addr().to_string()),
        EndpointerOptions::new(),
    )
    .await
}

/// Each endpoint's share of `picks`, against its weight's share: within 2 %.
fn assert_shares(counts: &HashMap<String, usize>, picks: usize, what: &str) {
    for w in 1..=4usize {
        let got = counts.get(&format!("w{w}")).copied().unwrap_or(0) as f64 / picks as f64;
        let want = w as f64 / 10.0;
        assert!(
            (got - want).abs() <= 0.02 * want,
            "{what}: w{w} got {got:.4} of the picks, want {want:.4} (within 2 %): {counts:?}"
        );
    }
}

#[tokio::test]
async fn weights_are_honoured_over_100_000_picks() {
    let instances = Instances::new(one_to_four());
    let e = endpointer(&instances).await;
    let n = 100_000;

    let wrr = WeightedRoundRobin::new(&e);
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(wrr.endpoint().unwrap()).or_insert(0) += 1;
    }
    assert_shares(&counts, n, "weighted round robin");
    // Round robin is exact: 100 000 picks are 10 000 whole periods of 10.
    assert_eq!(counts["w3"], 30_000);

    let random = WeightedRandom::with_seed(&e, 11);
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(random.endpoint().unwrap()).or_insert(0) += 1;
    }
    assert_shares(&counts, n, "weighted random");

    // P2C with every request still in flight: loads end up in proportion to the weights.
    let p2c = P2c::with_seed(&e, 12);
    let held: Vec<_> = (0..n).map(|_| p2c.endpoint().unwrap()).collect();
    let mut counts = HashMap::new();
    for g in &held {
        *counts.entry((**g).clone()).or_insert(0) += 1;
    }
    assert_shares(&counts, n, "weighted P2C");
}

#[tokio::test]
async fn weights_change_live_with_the_store() {
    let instances = Instances::new([
        weighted("a", 1, ValueFormat::Json),
        weighted("b", 1, ValueFormat::Json),
    ]);
    let e = endpointer(&instances).await;
    let wrr = WeightedRoundRobin::new(&e);
    let share_of_a = |picks: usize| {
        (0..picks)
            .filter(|_| wrr.endpoint().unwrap() == "a")
            .count()
    };
    assert_eq!(share_of_a(1000), 500);
    let v = e.version();
    instances.set([
        weighted("a", 3, ValueFormat::Json),
        weighted("b", 1, ValueFormat::Json),
    ]);
    e.changed(v).await;
    assert_eq!(share_of_a(1000), 750, "a's weight went from 1 to 3");
}

fn zoned(addr: &str, zone: &str) -> Instance {
    Instance::with_metadata(addr, Metadata::new().with_zone(zone), ValueFormat::Json)
        .expect("encodable")
}

/// Local instances only while the zone has enough of them; all zones once it has too few, and
/// back when it recovers.
#[tokio::test]
async fn zone_preference_spills_when_the_local_zone_is_too_small() {
    use sd_lb::ZoneAware;
    let instances = Instances::new([
        zoned("a1", "a"),
        zoned("a2", "a"),
        zoned("b1", "b"),
        zoned("b2", "b"),
    ]);
    let e = endpointer(&instances).await;
    let b = ZoneAware::new(&e, "a").min_local(2);
    let picks = |n: usize| {
        let mut seen: Vec<String> = (0..n).map(|_| b.endpoint().unwrap()).collect();
        seen.sort();
        seen.dedup();
        seen
    };
    assert_eq!(picks(100), ["a1", "a2"], "only zone a");

    // Zone a loses an instance: one is under min_local 2, so calls spill over both zones.
    let v = e.version();
    instances.set([zoned("a1", "a"), zoned("b1", "b"), zoned("b2", "b")]);
    e.changed(v).await;
    assert_eq!(picks(100), ["a1", "b1", "b2"]);

    // It comes back.
    let v = e.version();
    instances.set([
        zoned("a1", "a"),
        zoned("a3", "a"),
        zoned("b1", "b"),
        zoned("b2", "b"),
    ]);
    e.changed(v).await;
    assert_eq!(picks(100), ["a1", "a3"]);

    // A share rule: zone a holds 2 of 10 instances, under the 30 % asked.
    let mut many = vec![zoned("a1", "a"), zoned("a2", "a")];
    many.extend((0..8).map(|i| zoned(&format!("b{i}"), "b")));
    let v = e.version();
    instances.set(many);
    e.changed(v).await;
    let shared = ZoneAware::new(&e, "a").min_share(0.3).unwrap();
    let mut seen: Vec<String> = (0..100).map(|_| shared.endpoint().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10, "spilled over all: {seen:?}");
}

/// P2C in a zone: the zone takes every request while it keeps up, and sheds load once its best
/// instance is `spill` times busier than another.
#[tokio::test]
async fn p2c_in_a_zone_spills_by_load() {
    let instances = Instances::new([
        zoned("a1", "a"),
        zoned("a2", "a"),
        zoned("b1", "b"),
        zoned("b2", "b"),
        zoned("b3", "b"),
    ]);
    let e = endpointer(&instances).await;
    let p2c = P2c::with_seed(&e, 21).in_zone("a", 2.0).unwrap();
    // Light load: each request is over before the next, all in zone a.
    for _ in 0..100 {
        assert!(p2c.endpoint().unwrap().starts_with('a'));
    }
    // Sustained load: every request held.
    let held: Vec<_> = (0..200).map(|_| p2c.endpoint().unwrap()).collect();
    let mut loads: HashMap<String, usize> = HashMap::new();
    for g in &held {
        *loads.entry((**g).clone()).or_insert(0) += 1;
    }
    let local = loads["a1"] + loads["a2"];
    let remote = 200 - local;
    assert!(remote > 0, "zone a never shed load: {loads:?}");
    // Each zone-a instance ends near 2x (load + 1) of the zone-b ones.
    let per_remote = remote as f64 / 3.0;
    let per_local = local as f64 / 2.0;
    assert!(
        per_local > 1.5 * per_remote && per_local < 2.5 * (per_remote + 1.0),
        "{loads:?}"
    );
    assert!(P2c::new(&e).in_zone("a", 0.5).is_err());
}
