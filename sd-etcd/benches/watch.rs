//! What a change costs to reach a subscriber: our `EtcdInstancer` beside a bare etcd-client
//! watch, in the same run, against one local etcd (started by the benchmark on loopback).
//!
//! Each iteration puts one key (the value changes every time) and waits until the watcher has
//! delivered that value: a put's round trip plus the watch's delivery. The difference between
//! the two figures is what the instancer adds (applying the change to its state, building the
//! sorted instance set, publishing it to a subscriber).
//!
//! `cargo bench -p sd-etcd --features testing --bench watch`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use sd_core::{Event, Instancer};
use sd_etcd::testing::EtcdServer;
use sd_etcd::EtcdInstancer;

fn bench_watch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let etcd = rt.block_on(EtcdServer::start());
    let client = rt.block_on(etcd.client());
    let mut raw = rt.block_on(etcd.raw_client());

    let mut group = c.benchmark_group("put_to_event");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);

    // The baseline: etcd-client's own watch.
    let mut stream = rt
        .block_on(raw.watch("/bench/bare/", Some(WatchOptions::new().with_prefix())))
        .expect("watch");
    let mut n = 0u64;
    group.bench_function("bare_etcd_client_watch", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    let value = format!("127.0.0.1:{n}");
                    raw.put("/bench/bare/k", value.as_str(), None)
                        .await
                        .expect("put");
                    'seen: loop {
                        let resp = stream.message().await.expect("watch").expect("open");
                        for ev in resp.events() {
                            let seen = ev.kv().map(|kv| kv.value()) == Some(value.as_bytes());
                            if ev.event_type() == EventType::Put && seen {
                                break 'seen;
                            }
                        }
                    }
                }
                start.elapsed()
            })
        })
    });

    // Ours: the instancer, read through a subscription.
    let instancer = rt
        .block_on(EtcdInstancer::new(client, "/bench/ours/"))
        .expect("instancer");
    let mut events = instancer.subscribe();
    rt.block_on(events.next());
    group.bench_function("etcd_instancer", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    let value = format!("127.0.0.1:{n}");
                    raw.put("/bench/ours/k", value.as_str(), None)
                        .await
                        .expect("put");
                    let want = Event::from_instances([value.as_str()]);
                    while events.next().await.expect("instancer running") != want {}
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    instancer.stop();
}

criterion_group!(benches, bench_watch);
criterion_main!(benches);
