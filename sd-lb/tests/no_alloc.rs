//! Picks and a retry whose first attempt succeeds allocate nothing, checked with a counting
//! global allocator (its own test binary, so the counter sees only this file's code; counts are
//! per thread, so tests running in parallel don't disturb each other).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use common::Instances;
use futures::FutureExt;
use sd_core::{Balancer, Endpointer, FixedEndpointer};
use sd_lb::{P2c, Random, Retry, RoundRobin};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the allocator also runs while a thread's locals are torn down.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How many allocations `f` makes on this thread.
fn allocations<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = ALLOCATIONS.with(Cell::get);
    let r = f();
    (ALLOCATIONS.with(Cell::get) - before, r)
}

fn picks_allocate_nothing<B: Balancer>(balancer: &B) {
    // The first pick of a thread makes its slot and caches the snapshot.
    drop(balancer.endpoint().unwrap());
    let (n, ()) = allocations(|| {
        for _ in 0..1000 {
            drop(std::hint::black_box(balancer.endpoint().unwrap()));
        }
    });
    assert_eq!(
        n,
        0,
        "{n} allocations in 1000 picks by {}",
        std::any::type_name::<B>()
    );
}

/// 1 000 calls through `retry` (over endpoints 0 to 9) whose first attempt succeeds, after one
/// to warm up: none allocates, and every call returns its endpoint (they add up to 4 500).
fn successful_retries_allocate_nothing<B: Balancer<Endpoint = u64>>(retry: &Retry<B>) {
    let call = || {
        retry
            .call(|e| async move { Ok::<_, String>(e) })
            .now_or_never()
    };
    call();
    let (n, r) = allocations(|| (0..1000).map(|_| call().unwrap().unwrap()).sum::<u64>());
    assert_eq!((n, r), (0, 4500));
}

#[test]
fn the_counter_sees_allocations() {
    let (n, v) = allocations(|| vec![1u8; 16]);
    assert_eq!((n, v.len()), (1, 16));
}

#[test]
fn picks_from_a_fixed_list_allocate_nothing() {
    let list = || FixedEndpointer::new((0..100u64).collect());
    picks_allocate_nothing(&RoundRobin::new(list()));
    picks_allocate_nothing(&Random::new(list()));
    picks_allocate_nothing(&Random::with_seed(list(), 1));
    picks_allocate_nothing(&P2c::new(list()));
}

#[test]
fn picks_from_a_live_endpointer_allocate_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let instances = Instances::new((0..100).map(|i| i.to_string()));
    let endpointer = std::sync::Arc::new(rt.block_on(instances.numbers()));
    picks_allocate_nothing(&RoundRobin::new(endpointer.clone()));
    picks_allocate_nothing(&Random::new(endpointer.clone()));
    picks_allocate_nothing(&sd_lb::WeightedRoundRobin::new(endpointer.clone()));
    picks_allocate_nothing(&sd_lb::WeightedRandom::new(endpointer.clone()));
    picks_allocate_nothing(&sd_lb::ZoneAware::new(endpointer.clone(), "z"));
    picks_allocate_nothing(&P2c::new(endpointer));
}

#[test]
fn a_retry_whose_first_attempt_succeeds_allocates_nothing() {
    let rr = RoundRobin::new(FixedEndpointer::new((0..10u64).collect()));
    successful_retries_allocate_nothing(&Retry::new(rr, 3, Duration::from_secs(1)).unwrap());
    let p2c = P2c::new(FixedEndpointer::new((0..10u64).collect()));
    let retry_p2c = Retry::new(p2c, 3, Duration::from_secs(1)).unwrap();
    let call_p2c = || {
        retry_p2c
            .call(|e| async move { Ok::<_, String>(*e) })
            .now_or_never()
    };
    call_p2c();
    let (n, r) = allocations(|| (0..1000).map(|_| call_p2c().unwrap().unwrap()).sum::<u64>());
    assert_eq!(n, 0, "sum {r}");
    // With a retry budget: the success path reads it, and allocates nothing either.
    let budget = std::sync::Arc::new(sd_lb::RetryBudget::new(10, 0.1).unwrap());
    let rr = RoundRobin::new(FixedEndpointer::new((0..10u64).collect()));
    let budgeted = Retry::new(rr, 3, Duration::from_secs(1))
        .unwrap()
        .with_budget(budget);
    successful_retries_allocate_nothing(&budgeted);
    // With outlier detection: the pick checks health and the call reports its success, and
    // neither allocates.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let outliers = std::sync::Arc::new(sd_lb::Outliers::new());
    let rr = RoundRobin::new(FixedEndpointer::new((0..10u64).collect())).with_outliers(outliers);
    successful_retries_allocate_nothing(&Retry::new(rr, 3, Duration::from_secs(1)).unwrap());
}

#[test]
fn picks_past_ejected_and_warming_instances_allocate_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let instances = Instances::new((0..10).map(|i| i.to_string()));
    let endpointer = std::sync::Arc::new(rt.block_on(instances.numbers()));
    let outliers = std::sync::Arc::new(
        sd_lb::Outliers::new()
            .consecutive_failures(1)
            .unwrap()
            .slow_start(Duration::from_secs(30))
            .unwrap(),
    );
    let rr = RoundRobin::new(endpointer.clone()).with_outliers(outliers.clone());
    let random = Random::new(endpointer.clone()).with_outliers(outliers.clone());
    let p2c = P2c::new(endpointer.clone()).with_outliers(outliers.clone());
    rr.endpoint().unwrap();
    // One instance ejected (its call failed), one warming (it joined after the first set).
    let retry = Retry::new(&rr, 1, Duration::from_secs(1)).unwrap();
    while outliers.ejected() == 0 {
        let _ = retry
            .call(|e| async move {
                if e == 4 {
                    Err("down")
                } else {
                    Ok(())
                }
            })
            .now_or_never();
    }
    let before = endpointer.version();
    instances.set((0..11).map(|i| i.to_string()));
    rt.block_on(common::changed(&*endpointer, before));
    rr.endpoint().unwrap();
    assert_eq!((outliers.ejected(), outliers.warming()), (1, 1));
    picks_allocate_nothing(&rr);
    picks_allocate_nothing(&random);
    picks_allocate_nothing(&p2c);
}

#[test]
fn a_retry_over_a_draining_endpointer_allocates_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let instances = Instances::new((0..10).map(|i| i.to_string()));
    let options = sd_core::EndpointerOptions::new().drain(Duration::from_secs(5));
    let endpointer = rt.block_on(instances.numbers_with(options));
    let retry = Retry::new(RoundRobin::new(endpointer), 3, Duration::from_secs(1)).unwrap();
    successful_retries_allocate_nothing(&retry);
}

#[test]
fn a_failed_attempt_allocates_its_error_list() {
    // The other side of the check above: the error list is made on the first failure.
    let rr = RoundRobin::new(FixedEndpointer::new(vec![1u64]));
    let retry = Retry::new(rr, 2, Duration::from_secs(1)).unwrap();
    let mut first = true;
    let call = || {
        retry
            .call(|e| {
                let fail = std::mem::replace(&mut first, false);
                async move {
                    if fail {
                        Err("flaky")
                    } else {
                        Ok(e)
                    }
                }
            })
            .now_or_never()
    };
    let (n, r) = allocations(call);
    assert_eq!(r.unwrap().unwrap(), 1);
    assert!(n >= 1, "the first failure allocates the error list");
}
