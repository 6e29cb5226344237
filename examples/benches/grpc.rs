//! A unary gRPC call to a tonic greeter server on loopback, five ways, in one run:
//!
//! - `plain Channel`: tonic's `Channel` connected to the one server (the baseline);
//! - `balance_channel Channel`: the channel of `sd_core::tonic::balance_channel` over a
//!   one-instance instancer (tonic's balancer);
//! - `balance_channel service`: the same through `handle.service()` (a state check per call);
//! - `greeter Retry`: the `greeter` program's path: a channel per instance from a
//!   `DefaultEndpointer`, round robin with outlier ejection, inside `Retry`;
//! - `greeter pick, no Retry`: the same balancer's pick and a call on the picked channel,
//!   without `Retry` (what `Retry` itself adds is the difference).
//!
//! Each criterion iteration calls every case in turn and times only the measured one; then a
//! side-by-side table (printed) times every case in the same rounds, whose ratios are the
//! figures to compare: the host's slow spells weigh on all of them alike.
//!
//! `cargo bench -p examples --bench grpc`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use examples::greeter::{GreeterClient, HelloRequest, LocalServer};
use sd_core::tonic::{balance_channel, ChannelOptions, ChannelService};
use sd_core::{Balancer, DefaultEndpointer, EndpointerOptions, Event, Publisher};
use sd_lb::{Outliers, Retry, RoundRobin};
use tonic::transport::{Channel, Endpoint};

/// The cases, in the order each iteration calls them.
const CASES: [&str; 5] = [
    "plain Channel",
    "balance_channel Channel",
    "balance_channel service",
    "greeter Retry",
    "greeter pick, no Retry",
];

fn request() -> HelloRequest {
    HelloRequest { name: "sd".into() }
}

/// The ways to the server.
struct Paths {
    plain: GreeterClient<Channel>,
    channel: GreeterClient<Channel>,
    service: GreeterClient<ChannelService>,
    retry: Retry<RoundRobin<Channel, DefaultEndpointer<Channel>>>,
}

impl Paths {
    /// One call the way `CASES[case]` says.
    async fn call(&mut self, case: usize) {
        let replied = match case {
            0 => self.plain.say_hello(request()).await.is_ok(),
            1 => self.channel.say_hello(request()).await.is_ok(),
            2 => self.service.say_hello(request()).await.is_ok(),
            4 => match self.retry.balancer().endpoint() {
                Ok(channel) => GreeterClient::new(channel)
                    .say_hello(request())
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            _ => self
                .retry
                .call(
                    |channel| async move { GreeterClient::new(channel).say_hello(request()).await },
                )
                .await
                .is_ok(),
        };
        assert!(replied, "{} failed", CASES[case]);
    }
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

    let mut paths = Paths {
        plain: GreeterClient::new(plain),
        channel: GreeterClient::new(balanced),
        service: GreeterClient::new(handle.service()),
        retry,
    };

    // Each iteration makes one call of every case, in turn, and times the measured case's
    // only: the host's drift (other builds on its two cores) then weighs on every case alike.
    let mut group = c.benchmark_group("unary call");
    // The wall time is five times the measured time: keep the run near a minute.
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (case, name) in CASES.iter().enumerate() {
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut measured = Duration::ZERO;
                    for _ in 0..iters {
                        for other in 0..CASES.len() {
                            let start = Instant::now();
                            paths.call(other).await;
                            if other == case {
                                measured += start.elapsed();
                            }
                        }
                    }
                    measured
                })
            })
        });
    }
    group.finish();
    // Not in `cargo test --benches` (criterion's test mode): only where benchmarks are run.
    if std::env::args().any(|a| a == "--bench") {
        side_by_side(&rt, &mut paths);
    }
    drop(handle);
    drop(server);
}

/// Calls every case once per round (rotating which goes first) and prints each one's median,
/// mean and 90th percentile, and their ratios to the plain channel's: all are measured in
/// the same moments, so the host's slow spells (other builds on its two cores, which move
/// criterion's separate windows by 3x and more) cancel out of the ratios.
fn side_by_side(rt: &tokio::runtime::Runtime, paths: &mut Paths) {
    const WARM_UP: usize = 2_000;
    const ROUNDS: usize = 20_000;
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); CASES.len()];
    rt.block_on(async {
        for round in 0..WARM_UP + ROUNDS {
            for k in 0..CASES.len() {
                let case = (round + k) % CASES.len();
                let start = Instant::now();
                paths.call(case).await;
                if round >= WARM_UP {
                    times[case].push(start.elapsed());
                }
            }
        }
    });
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let stats: Vec<(f64, f64, f64)> = times
        .iter_mut()
        .map(|t| {
            t.sort_unstable();
            let mean = t.iter().map(|d| micros(*d)).sum::<f64>() / t.len() as f64;
            (micros(t[t.len() / 2]), mean, micros(t[t.len() * 9 / 10]))
        })
        .collect();
    println!("\nside by side: {ROUNDS} rounds, each case once per round (µs)");
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>14} {:>12}",
        "case", "median", "mean", "p90", "median/plain", "mean/plain"
    );
    let (plain_median, plain_mean, _) = stats[0];
    for (name, (median, mean, p90)) in CASES.iter().zip(&stats) {
        println!(
            "{name:<26} {median:>8.1} {mean:>8.1} {p90:>8.1} {:>14.3} {:>12.3}",
            median / plain_median,
            mean / plain_mean
        );
    }
}

criterion_group!(benches, unary_call);
criterion_main!(benches);
