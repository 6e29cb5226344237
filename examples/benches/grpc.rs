//! A unary gRPC call to a tonic greeter server on loopback, four ways, in one run:
//!
//! - `plain Channel`: tonic's `Channel` connected to the one server (the baseline);
//! - `balance_channel Channel`: the channel of `sd_core::tonic::balance_channel` over a
//!   one-instance instancer (tonic's balancer);
//! - `balance_channel service`: the same through `handle.service()` (a state check per call);
//! - `greeter Retry`: the `greeter` program's path: a channel per instance from a
//!   `DefaultEndpointer`, round robin with outlier ejection, inside `Retry`.
//!
//! `cargo bench -p examples --bench grpc`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use examples::greeter::{GreeterClient, HelloRequest, LocalServer};
use sd_core::tonic::{balance_channel, ChannelOptions};
use sd_core::{DefaultEndpointer, EndpointerOptions, Event, Publisher};
use sd_lb::{Outliers, Retry, RoundRobin};
use tonic::transport::{Channel, Endpoint};

fn request() -> HelloRequest {
    HelloRequest { name: "sd".into() }
}

fn unary_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let server = rt.block_on(LocalServer::start()).expect("a greeter server");
    let addr = server.addr().to_string();
    let instancer = || Publisher::new(Event::from_instances([addr.clone()]));

    let plain: Channel = rt
        .block_on(
            Endpoint::from_shared(format!("http://{addr}"))
                .expect("a URI")
                .connect(),
        )
        .expect("connected");
    let (balanced, handle) =
        rt.block_on(async { balance_channel(instancer(), ChannelOptions::new()) });
    let retry = rt.block_on(async {
        let endpointer =
            DefaultEndpointer::owning(instancer(), ChannelOptions::new(), EndpointerOptions::new())
                .await;
        let outliers = Arc::new(Outliers::new().consecutive_failures(2).expect("valid"));
        Retry::new(
            RoundRobin::new(endpointer).with_outliers(outliers),
            3,
            Duration::from_secs(3),
        )
        .expect("valid")
    });

    let mut group = c.benchmark_group("unary call");
    group.bench_function("plain Channel", |b| {
        let mut client = GreeterClient::new(plain.clone());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    client.say_hello(request()).await.expect("a reply");
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("balance_channel Channel", |b| {
        let mut client = GreeterClient::new(balanced.clone());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    client.say_hello(request()).await.expect("a reply");
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("balance_channel service", |b| {
        let mut client = GreeterClient::new(handle.service());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    client.say_hello(request()).await.expect("a reply");
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("greeter Retry", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    retry
                        .call(|channel| async move {
                            GreeterClient::new(channel).say_hello(request()).await
                        })
                        .await
                        .expect("a reply");
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    drop(handle);
    drop(server);
}

criterion_group!(benches, unary_call);
criterion_main!(benches);
