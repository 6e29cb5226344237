//! Consistent hashing over a live endpointer: spread, disruption when one instance leaves, the
//! same mapping whatever the slot order, and bounded loads under a hot key.

mod common;

use std::collections::HashMap;

use common::Instances;
use sd_core::{endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions};
use sd_lb::Maglev;

const KEYS: usize = 100_000;

fn addrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.0.{}.{}:80", i / 250, i % 250))
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

fn mapping<P: Endpointer<String>>(maglev: &Maglev<String, P>) -> Vec<String> {
    (0..KEYS)
        .map(|k| maglev.endpoint_for(format!("key-{k}").as_bytes()).unwrap())
        .collect()
}

#[tokio::test]
async fn one_of_n_leaving_moves_about_one_nth_of_the_keys() {
    let n = 100;
    let all = addrs(n);
    let instances = Instances::new(all.clone());
    let e = endpointer(&instances).await;
    let maglev = Maglev::new(&e);
    let before = mapping(&maglev);

    // Spread: each instance owns close to 1/N of the keys.
    let mut per: HashMap<&str, usize> = HashMap::new();
    for a in &before {
        *per.entry(a).or_insert(0) += 1;
    }
    let (min, max) = (per.values().min().unwrap(), per.values().max().unwrap());
    assert!(
        *min as f64 > 0.7 * (KEYS / n) as f64 && (*max as f64) < 1.3 * (KEYS / n) as f64,
        "keys per instance from {min} to {max}, mean {}",
        KEYS / n
    );

    let gone = all[37].clone();
    let v = e.version();
    instances.set(all.iter().filter(|a| **a != gone).cloned());
    e.changed(v).await;
    let after = mapping(&maglev);
    let on_gone = before.iter().filter(|a| **a == gone).count();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let moved_others = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != gone && b != a)
        .count();
    assert!(after.iter().all(|a| *a != gone));
    let fraction = moved as f64 / KEYS as f64;
    println!(
        "moved {moved} of {KEYS} keys ({fraction:.4}; 1/N = {:.4}); {on_gone} were on the instance \
         that left, {moved_others} on others",
        1.0 / n as f64
    );
    assert!(
        fraction < 2.0 / n as f64,
        "{fraction:.4} of the keys moved when 1 of {n} left"
    );
    // Maglev moves a few keys between staying instances too (the table's turns shift): fewer
    // than those that had to move.
    assert!(
        moved_others < on_gone,
        "{moved_others} keys of staying instances moved, {on_gone} of the one that left"
    );
}

#[tokio::test]
async fn every_client_maps_a_key_alike_whatever_its_slot_order() {
    let all = addrs(50);
    // Client one saw the set at once; client two saw it grow one instance at a time and
    // shrink again, so its slots are in another order.
    let one = Instances::new(all.clone());
    let e1 = endpointer(&one).await;
    let two = Instances::new(all[..10].iter().rev().cloned());
    let e2 = endpointer(&two).await;
    for k in 10..all.len() {
        let v = e2.version();
        two.set(all[..=k].iter().cloned().chain(["10.9.9.9:80".to_string()]));
        e2.changed(v).await;
    }
    let v = e2.version();
    two.set(all.clone());
    e2.changed(v).await;
    let slots = |e: &DefaultEndpointer<String>| e.snapshot().endpoints().to_vec();
    assert_ne!(
        slots(&e1),
        slots(&e2),
        "the two clients' slot orders differ"
    );
    assert_eq!(mapping(&Maglev::new(&e1)), mapping(&Maglev::new(&e2)));
}

#[tokio::test]
async fn a_hot_key_stays_within_the_bound() {
    let n = 20;
    let instances = Instances::new(addrs(n));
    let e = endpointer(&instances).await;
    let factor = 1.25;
    let maglev = Maglev::bounded(&e, factor).unwrap();
    let mut held = Vec::new();
    for i in 0..400 {
        // Mostly one hot key, some others.
        let key = if i % 5 == 0 {
            format!("cold-{i}")
        } else {
            "hot".to_string()
        };
        held.push(maglev.held_for(key.as_bytes()).unwrap());
        let total = held.len();
        let bound = (factor * total as f64 / n as f64).ceil() as usize;
        let mut loads: HashMap<&str, usize> = HashMap::new();
        for h in &held {
            *loads.entry(h.as_str()).or_insert(0) += 1;
        }
        let max = loads.values().max().copied().unwrap_or(0);
        assert!(
            max <= bound,
            "after {total} picks an instance holds {max} > {bound}"
        );
    }
    // The hot key's own instance is full, yet it got its share: the key is not starved.
    let hot = maglev.endpoint_for(b"hot").unwrap();
    assert!(held.iter().filter(|h| h.as_str() == hot).count() >= 400 / n);
    drop(held);
    assert_eq!(
        maglev.held_for(b"hot").unwrap().in_flight(),
        1,
        "every count released"
    );
}
