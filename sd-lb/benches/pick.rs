//! The cost of one pick, and of a retried call whose first attempt succeeds.
//!
//! Every balancer is measured through the live `DefaultEndpointer` (fed by a `Publisher`-backed
//! instancer, as a backend would) and through `FixedEndpointer`, over 1 to 10 000 endpoints of a
//! `u64`-sized handle, on one thread and while a second thread picks from the same balancer.
//! The baseline in the same run is the cheapest pick there is: a shared `AtomicUsize::fetch_add`
//! and a slice index. Run with `cargo bench -p sd-lb --bench pick`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Bencher, BenchmarkId, Criterion};
use futures::FutureExt;
use sd_core::{Balancer, DefaultEndpointer, FixedEndpointer, Instance, Metadata, ValueFormat};
use sd_lb::{
    Maglev, Outliers, P2c, Random, Retry, RetryBudget, RoundRobin, WeightedRandom,
    WeightedRoundRobin,
};

const SIZES: [usize; 4] = [1, 10, 1_000, 10_000];

/// go-kit's round robin, and the floor: one shared counter, one index.
struct Bare {
    next: AtomicUsize,
    endpoints: Arc<[u64]>,
}

impl Bare {
    #[inline]
    fn pick(&self) -> u64 {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints[i % self.endpoints.len()]
    }
}

/// Measures `pick` on this thread while another thread runs `pick` in a loop on the same
/// balancer; reports the measured thread's time per pick.
fn two_threads(b: &mut Bencher, pick: &(dyn Fn() + Sync)) {
    b.iter_custom(|iters| {
        let stop = AtomicBool::new(false);
        let running = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                running.store(true, Ordering::Release);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        pick();
                    }
                }
            });
            while !running.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let start = Instant::now();
            for _ in 0..iters {
                pick();
            }
            let elapsed = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            elapsed
        })
    });
}

struct Sets {
    _runtime: tokio::runtime::Runtime,
    _instances: common::Instances,
    live: Arc<DefaultEndpointer<u64>>,
    fixed: Arc<FixedEndpointer<u64>>,
}

fn sets(n: usize) -> Sets {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let instances = common::Instances::new((0..n).map(|i| i.to_string()));
    let live = Arc::new(runtime.block_on(instances.numbers()));
    let fixed = Arc::new(FixedEndpointer::new((0..n as u64).collect()));
    Sets {
        _runtime: runtime,
        _instances: instances,
        live,
        fixed,
    }
}

fn bench_picks(c: &mut Criterion) {
    for threads in ["one_thread", "two_threads"] {
        let mut group = c.benchmark_group(threads);
        for n in SIZES {
            let sets = sets(n);
            let bare = Bare {
                next: AtomicUsize::new(0),
                endpoints: (0..n as u64).collect(),
            };
            let rr_live = RoundRobin::new(sets.live.clone());
            let rr_fixed = RoundRobin::new(sets.fixed.clone());
            let random_live = Random::new(sets.live.clone());
            let random_fixed = Random::new(sets.fixed.clone());
            let p2c_live = P2c::new(sets.live.clone());
            let p2c_fixed = P2c::new(sets.fixed.clone());
            let cases: [(&str, &(dyn Fn() + Sync)); 7] = [
                ("baseline_fetch_add_index", &|| {
                    black_box(bare.pick());
                }),
                ("round_robin_live", &|| {
                    let _ = black_box(rr_live.endpoint());
                }),
                ("round_robin_fixed", &|| {
                    let _ = black_box(rr_fixed.endpoint());
                }),
                ("random_live", &|| {
                    let _ = black_box(random_live.endpoint());
                }),
                ("random_fixed", &|| {
                    let _ = black_box(random_fixed.endpoint());
                }),
                ("p2c_live", &|| {
                    let _ = black_box(p2c_live.endpoint());
                }),
                ("p2c_fixed", &|| {
                    let _ = black_box(p2c_fixed.endpoint());
                }),
            ];
            for (name, pick) in cases {
                group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                    if threads == "one_thread" {
                        b.iter(pick)
                    } else {
                        two_threads(b, pick)
                    }
                });
            }
        }
        group.finish();
    }
}

/// Weighted picks (weights 1 to 4 in turn) and consistent-hash picks beside the unweighted
/// round robin and the bare baseline, one thread.
fn bench_weighted(c: &mut Criterion) {
    let mut group = c.benchmark_group("weighted");
    for n in [10usize, 10_000] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let plain = common::Instances::new((0..n).map(|i| i.to_string()));
        let weighted = common::Instances::new((0..n).map(|i| {
            let meta = Metadata::new()
                .with_weight(1 + (i % 4) as u32)
                .expect("a weight");
            Instance::with_metadata(&i.to_string(), meta, ValueFormat::Json).expect("encodable")
        }));
        let plain_live = Arc::new(runtime.block_on(plain.numbers()));
        let weighted_live = Arc::new(runtime.block_on(weighted.numbers()));
        let bare = Bare {
            next: AtomicUsize::new(0),
            endpoints: (0..n as u64).collect(),
        };
        let rr = RoundRobin::new(plain_live.clone());
        let wrr = WeightedRoundRobin::new(weighted_live.clone());
        let wrandom = WeightedRandom::new(weighted_live.clone());
        let wp2c = P2c::new(weighted_live.clone());
        let maglev = Maglev::new(plain_live.clone());
        let key = AtomicUsize::new(0);
        let checked = RoundRobin::new(plain_live.clone()).with_outliers(Arc::new(Outliers::new()));
        let cases: [(&str, &dyn Fn()); 7] = [
            ("baseline_fetch_add_index", &|| {
                black_box(bare.pick());
            }),
            ("round_robin_unweighted", &|| {
                let _ = black_box(rr.endpoint());
            }),
            // Health checked on every pick (one more load), nothing ejected.
            ("round_robin_outliers", &|| {
                let _ = black_box(checked.endpoint());
            }),
            ("weighted_round_robin", &|| {
                let _ = black_box(wrr.endpoint());
            }),
            ("weighted_random", &|| {
                let _ = black_box(wrandom.endpoint());
            }),
            ("weighted_p2c", &|| {
                let _ = black_box(wp2c.endpoint());
            }),
            // A new 8-byte key each pick: hashing it is part of the pick.
            ("maglev_by_key", &|| {
                let k = key.fetch_add(1, Ordering::Relaxed) as u64;
                let _ = black_box(maglev.endpoint_for(&k.to_le_bytes()));
            }),
        ];
        for (name, pick) in cases {
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| b.iter(pick));
        }
    }
    group.finish();
}

/// Health tracking on the success path (nothing ejected or warming) beside the same balancers
/// without it and the bare baseline, one thread.
fn bench_health(c: &mut Criterion) {
    let mut group = c.benchmark_group("health");
    for n in [10usize, 10_000] {
        let sets = sets(n);
        let bare = Bare {
            next: AtomicUsize::new(0),
            endpoints: (0..n as u64).collect(),
        };
        let outliers = || Arc::new(Outliers::new());
        let warming = || {
            Arc::new(
                Outliers::new()
                    .slow_start(Duration::from_secs(30))
                    .expect("a valid window"),
            )
        };
        let rr = RoundRobin::new(sets.live.clone());
        let rr_checked = RoundRobin::new(sets.live.clone()).with_outliers(outliers());
        let rr_slow = RoundRobin::new(sets.live.clone()).with_outliers(warming());
        let random = Random::new(sets.live.clone());
        let random_checked = Random::new(sets.live.clone()).with_outliers(outliers());
        let p2c = P2c::new(sets.live.clone());
        let p2c_checked = P2c::new(sets.live.clone()).with_outliers(outliers());
        let cases: [(&str, &dyn Fn()); 8] = [
            ("baseline_fetch_add_index", &|| {
                black_box(bare.pick());
            }),
            ("round_robin", &|| {
                let _ = black_box(rr.endpoint());
            }),
            ("round_robin_outliers", &|| {
                let _ = black_box(rr_checked.endpoint());
            }),
            ("round_robin_outliers_slow_start", &|| {
                let _ = black_box(rr_slow.endpoint());
            }),
            ("random", &|| {
                let _ = black_box(random.endpoint());
            }),
            ("random_outliers", &|| {
                let _ = black_box(random_checked.endpoint());
            }),
            ("p2c", &|| {
                let _ = black_box(p2c.endpoint());
            }),
            ("p2c_outliers", &|| {
                let _ = black_box(p2c_checked.endpoint());
            }),
        ];
        for (name, pick) in cases {
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| b.iter(pick));
        }
    }
    group.finish();
}

fn bench_retry(c: &mut Criterion) {
    let mut group = c.benchmark_group("retry_first_attempt_succeeds");
    let sets = sets(10);
    let endpoint = |e: u64| async move { Ok::<u64, String>(black_box(e)) };
    group.bench_function("bare_closure", |b| {
        b.iter(|| endpoint(black_box(3)).now_or_never())
    });
    let rr = RoundRobin::new(sets.live.clone());
    group.bench_function("pick_then_closure", |b| {
        b.iter(|| endpoint(rr.endpoint().unwrap_or_default()).now_or_never())
    });
    let retry = Retry::new(
        RoundRobin::new(sets.live.clone()),
        3,
        Duration::from_secs(1),
    )
    .expect("valid retry settings");
    group.bench_function("retry_round_robin_live", |b| {
        b.iter(|| retry.call(endpoint).now_or_never())
    });
    let budgeted = Retry::new(
        RoundRobin::new(sets.live.clone()),
        3,
        Duration::from_secs(1),
    )
    .expect("valid retry settings")
    .with_budget(Arc::new(RetryBudget::new(10, 0.1).expect("a valid budget")));
    group.bench_function("retry_round_robin_live_budget", |b| {
        b.iter(|| budgeted.call(endpoint).now_or_never())
    });
    let checked = Retry::new(
        RoundRobin::new(sets.live.clone()).with_outliers(Arc::new(Outliers::new())),
        3,
        Duration::from_secs(1),
    )
    .expect("valid retry settings");
    group.bench_function("retry_round_robin_live_outliers", |b| {
        b.iter(|| checked.call(endpoint).now_or_never())
    });
    // Each attempt counted in flight (an endpointer that drains removed endpoints).
    let instances = common::Instances::new((0..10).map(|i| i.to_string()));
    let draining = Arc::new(sets._runtime.block_on(
        instances.numbers_with(sd_core::EndpointerOptions::new().drain(Duration::from_secs(5))),
    ));
    let retry_draining = Retry::new(RoundRobin::new(draining), 3, Duration::from_secs(1))
        .expect("valid retry settings");
    group.bench_function("retry_round_robin_live_draining", |b| {
        b.iter(|| retry_draining.call(endpoint).now_or_never())
    });
    let retry_p2c = Retry::new(P2c::new(sets.live.clone()), 3, Duration::from_secs(1))
        .expect("valid retry settings");
    group.bench_function("retry_p2c_live", |b| {
        b.iter(|| retry_p2c.call(|e| endpoint(*e)).now_or_never())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = bench_picks, bench_weighted, bench_health, bench_retry
}
criterion_main!(benches);
