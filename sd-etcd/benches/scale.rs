//! Fleet scale, against one local etcd started by the benchmark on loopback:
//!
//! - `propagation/{bare,instancer,endpointer}/N`: the CPU the watching side spends per change
//!   with N instances under the prefix. Criterion's figure *is* CPU time: the watching side
//!   runs alone on one thread (its own single-threaded runtime, its etcd connection included)
//!   and each sample reports that thread's CPU clock. `bare` is etcd-client's own watch stream
//!   (the floor), `instancer` an `EtcdInstancer` read through a subscription, `endpointer` a
//!   `DefaultEndpointer` over it (a change counts when the factory made the new endpoint). Each
//!   change replaces one instance's value, so the set keeps its size. Put → seen latency
//!   (p50/p99) and the resident memory each instance costs are printed beside.
//! - `heartbeat/K`: the CPU one client spends per second keeping K registrations alive
//!   (heartbeat 1 s), again on a thread of its own; etcd's CPU per second is printed beside.
//!
//! `cargo bench -p sd-etcd --features testing --bench scale` (`SD_BENCH_SIZES=0,1000` and
//! `SD_BENCH_REGISTRATIONS=100` choose other sizes).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use etcd_client::WatchOptions;
use futures::StreamExt;
use sd_core::{Closer, DefaultEndpointer, EndpointerOptions, Error, Instance, Instancer};
use sd_core::{Registrar, Service, TtlOption};
use sd_etcd::testing::{EtcdServer, ServerOptions};
use sd_etcd::{Client, EtcdClient, EtcdInstancer, EtcdRegistrar};

const PREFIX: &str = "/bench/scale/";
/// The key whose value every change replaces.
const MOVING: &str = "/bench/scale/~moving";

fn sizes(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// This process's resident memory, in bytes, after handing freed heap pages back to the system
/// (so memory the initial read used and freed is not counted as the watcher's).
fn rss() -> u64 {
    // SAFETY: malloc_trim only releases free heap memory; it takes no pointer of ours.
    unsafe {
        libc::malloc_trim(0);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time (user + system) of process `pid`.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from the state field (3) after the name.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Bare,
    Instancer,
    Endpointer,
}

/// What the watching thread is asked to do.
enum Ask {
    /// Wait until the change to this value is seen; answer with the thread's CPU clock.
    Seen(String),
    /// Answer with the thread's CPU clock.
    Clock,
}

/// Runs the watching side of `mode` on a thread of its own. Returns its request channel and
/// the channel it answers on (CPU clock readings), once it is watching.
fn watcher(endpoint: String, mode: Mode) -> (mpsc::Sender<Ask>, mpsc::Receiver<(Duration, u64)>) {
    let (ask_tx, ask_rx) = mpsc::channel::<Ask>();
    let (ans_tx, ans_rx) = mpsc::channel::<(Duration, u64)>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let before = rss();
            let connect = || async {
                EtcdClient::connect([endpoint.as_str()], Default::default())
                    .await
                    .expect("connect")
            };
            match mode {
                Mode::Bare => {
                    let mut raw = etcd_client::Client::connect([endpoint.as_str()], None)
                        .await
                        .expect("connect");
                    let mut stream = raw
                        .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
                        .await
                        .expect("watch");
                    let _ = ans_tx.send((thread_cpu(), rss().saturating_sub(before)));
                    while let Ok(ask) = ask_rx.recv() {
                        if let Ask::Seen(value) = &ask {
                            'seen: loop {
                                let resp = stream.message().await.expect("watch").expect("open");
                                for ev in resp.events() {
                                    if ev.kv().map(|kv| kv.value()) == Some(value.as_bytes()) {
                                        break 'seen;
                                    }
                                }
                            }
                        }
                        let _ = ans_tx.send((thread_cpu(), 0));
                    }
                }
                Mode::Instancer => {
                    let instancer = EtcdInstancer::new(connect().await, PREFIX)
                        .await
                        .expect("instancer");
                    let mut events = instancer.subscribe();
                    events.next().await;
                    let _ = ans_tx.send((thread_cpu(), rss().saturating_sub(before)));
                    while let Ok(ask) = ask_rx.recv() {
                        if let Ask::Seen(value) = &ask {
                            let want = Instance::new(value);
                            loop {
                                let ev = events.next().await.expect("instancer running");
                                if ev.instances().is_some_and(|s| s.contains(&want)) {
                                    break;
                                }
                            }
                        }
                        let _ = ans_tx.send((thread_cpu(), 0));
                    }
                }
                Mode::Endpointer => {
                    let instancer = EtcdInstancer::new(connect().await, PREFIX)
                        .await
                        .expect("instancer");
                    let (made_tx, mut made_rx) = tokio::sync::mpsc::unbounded_channel::<Instance>();
                    let factory = move |i: &Instance| -> Result<(u64, Option<Closer>), Error> {
                        let _ = made_tx.send(i.clone());
                        Ok((i.len() as u64, None))
                    };
                    let endpointer =
                        DefaultEndpointer::new(&instancer, factory, EndpointerOptions::new()).await;
                    while made_rx.try_recv().is_ok() {}
                    let _ = ans_tx.send((thread_cpu(), rss().saturating_sub(before)));
                    while let Ok(ask) = ask_rx.recv() {
                        if let Ask::Seen(value) = &ask {
                            while made_rx.recv().await.expect("endpointer running").as_str()
                                != value
                            {}
                        }
                        let _ = ans_tx.send((thread_cpu(), 0));
                    }
                    drop(endpointer);
                }
            }
        });
    });
    (ask_tx, ans_rx)
}

fn bench_propagation(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let etcd = rt.block_on(EtcdServer::start_with(
        ServerOptions::new().with_arg("--quota-backend-bytes=4294967296"),
    ));
    let client = rt.block_on(etcd.client());
    let mut group = c.benchmark_group("propagation");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10);
    let mut filled = 0usize;
    let mut n_change = 0u64;
    for n in sizes("SD_BENCH_SIZES", &[0, 1_000, 10_000, 100_000]) {
        // Grow the prefix to n instances (60-byte values).
        if n > filled {
            let entries: Vec<(String, String)> = (filled..n)
                .map(|i| {
                    (
                        format!("{PREFIX}{i:08}"),
                        format!(
                            "10.{:03}.{:03}.{:03}:8080/instance-with-a-60-byte-value-xx",
                            i / 65536,
                            (i / 256) % 256,
                            i % 256
                        ),
                    )
                })
                .collect();
            for chunk in entries.chunks(4096) {
                rt.block_on(client.put_many(chunk, None)).expect("fill");
            }
            filled = n;
        }
        for mode in [Mode::Bare, Mode::Instancer, Mode::Endpointer] {
            let (ask, ans) = watcher(etcd.endpoint(), mode);
            let (_, mem) = ans.recv().expect("the watcher started");
            // Latency: put → seen, one change at a time.
            let mut lat = Vec::with_capacity(200);
            for _ in 0..200 {
                n_change += 1;
                let value = format!("127.0.0.1:{n_change}");
                let start = Instant::now();
                rt.block_on(client.put(MOVING, &value, None)).expect("put");
                ask.send(Ask::Seen(value)).expect("watcher alive");
                ans.recv().expect("seen");
                lat.push(start.elapsed());
            }
            lat.sort();
            eprintln!(
                "scale: {mode:?} N={n}: put->seen p50 {:?} p99 {:?}; resident memory {:.0} B per instance",
                lat[lat.len() / 2],
                lat[lat.len() * 99 / 100],
                mem as f64 / n.max(1) as f64
            );
            let name = format!("{mode:?}").to_lowercase();
            group.bench_function(format!("{name}/{n}"), |b| {
                b.iter_custom(|iters| {
                    ask.send(Ask::Clock).expect("watcher alive");
                    let (start, _) = ans.recv().expect("clock");
                    let mut end = start;
                    for _ in 0..iters {
                        n_change += 1;
                        let value = format!("127.0.0.1:{n_change}");
                        rt.block_on(client.put(MOVING, &value, None)).expect("put");
                        ask.send(Ask::Seen(value)).expect("watcher alive");
                        end = ans.recv().expect("seen").0;
                    }
                    end - start
                })
            });
            drop(ask);
        }
    }
    group.finish();
}

fn bench_heartbeat(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let etcd = rt.block_on(EtcdServer::start());
    let etcd_pid = etcd.pid().expect("etcd runs");
    let mut group = c.benchmark_group("heartbeat");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .sample_size(10);
    for k in sizes("SD_BENCH_REGISTRATIONS", &[100, 1_000, 10_000]) {
        // The registrations live on a thread of their own; each sample is one second of it.
        let (ask, ans) = registrations(etcd.endpoint(), k);
        ans.recv().expect("registered");
        let etcd_before = process_cpu(etcd_pid);
        let wall = Instant::now();
        group.bench_function(format!("{k}"), |b| {
            b.iter_custom(|iters| {
                ask.send(()).expect("alive");
                let start = ans.recv().expect("clock");
                std::thread::sleep(Duration::from_secs(iters));
                ask.send(()).expect("alive");
                ans.recv().expect("clock") - start
            })
        });
        let secs = wall.elapsed().as_secs_f64();
        eprintln!(
            "scale: heartbeat K={k}: etcd CPU {:.1} ms per second",
            (process_cpu(etcd_pid) - etcd_before).as_secs_f64() * 1000.0 / secs
        );
        drop(ask);
        // Let the registrations go before the next size.
        std::thread::sleep(Duration::from_secs(4));
    }
    group.finish();
}

/// K registrations (heartbeat 1 s, TTL 3 s) on one client, on a thread of their own; answers
/// each request with the thread's CPU clock.
fn registrations(endpoint: String, k: usize) -> (mpsc::Sender<()>, mpsc::Receiver<Duration>) {
    let (ask_tx, ask_rx) = mpsc::channel::<()>();
    let (ans_tx, ans_rx) = mpsc::channel::<Duration>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let client = EtcdClient::connect([endpoint.as_str()], Default::default())
                .await
                .expect("connect");
            let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).expect("ttl");
            let regs: Vec<EtcdRegistrar> = (0..k)
                .map(|i| {
                    let inst = format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256);
                    EtcdRegistrar::new(
                        client.clone(),
                        Service::new(format!("/bench/reg/{inst}"), inst)
                            .expect("service")
                            .with_ttl(ttl),
                    )
                })
                .collect();
            futures::future::try_join_all(regs.iter().map(|r| r.register()))
                .await
                .expect("register");
            let _ = ans_tx.send(thread_cpu());
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                while ask_rx.recv().is_ok() {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            });
            while rx.recv().await.is_some() {
                let _ = ans_tx.send(thread_cpu());
            }
            futures::future::try_join_all(regs.iter().map(|r| r.deregister()))
                .await
                .expect("deregister");
        });
    });
    (ask_tx, ans_rx)
}

criterion_group!(benches, bench_propagation, bench_heartbeat);
criterion_main!(benches);
