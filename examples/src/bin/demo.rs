//! The sd demo: three in-process "barsvc" instances register with a TTL, a client discovers them
//! and calls them through round robin + retry, printing which instance served each call. Then one
//! instance deregisters, another hangs (stops answering but keeps heart-beating: outlier
//! detection ejects it, and restores it once it answers again), and one crashes (stops
//! heart-beating and answering), and the calls move to the survivors.
//!
//! Runs on the in-memory backend: `cargo run -p examples --bin demo`; on etcd with
//! `cargo run -p examples --bin demo -- --etcd http://127.0.0.1:2379` (e.g. `cargo xtask etcd`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::process::ExitCode;

use clap::Parser;
use futures::StreamExt;
use sd_core::{
    Balancer, Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event, Instance,
    Instancer, Registrar, Service, TtlOption,
};
use sd_etcd::{ClientOptions, EtcdClient, EtcdInstancer, EtcdRegistrar};
use sd_lb::outliers::HealthChange;
use sd_lb::{AttemptError, Outliers, Retry, RetryCallback, RoundRobin};
use sd_memory::{MemoryInstancer, MemoryRegistrar, MemoryStore};

const PREFIX: &str = "/services/barsvc/";

/// One barsvc instance, in process: it answers calls until it is crashed.
struct BarSvc {
    addr: String,
    up: AtomicBool,
}

impl BarSvc {
    async fn call(&self, request: u32) -> Result<String, String> {
        if self.up.load(Ordering::SeqCst) {
            Ok(format!("request {request:>2} served by {}", self.addr))
        } else {
            Err(format!("{} does not answer", self.addr))
        }
    }
}

/// Waits (at most 10 s) until the endpointer serves `n` endpoints: discovery is asynchronous,
/// and the demo's calls should show the state after each step.
async fn settle<E: Clone + Send + Sync + 'static>(endpointer: &DefaultEndpointer<E>, n: usize) {
    let wait = async {
        while endpointer.snapshot().endpoints().len() != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        println!("(still waiting for {n} instances after 10 s; going on)");
    }
}

/// Makes one retried call per request number and prints who served it.
async fn calls<B, C>(retry: &Retry<B, C>, requests: std::ops::Range<u32>)
where
    B: Balancer<Endpoint = Arc<BarSvc>>,
    C: RetryCallback<String>,
{
    for r in requests {
        match retry
            .call(|svc: Arc<BarSvc>| async move { svc.call(r).await })
            .await
        {
            Ok(reply) => println!("call         {reply}"),
            Err(e) => println!(
                "call         request {r:>2} failed: {}",
                examples::retry_failure(&e)
            ),
        }
    }
}

/// The sd demo: discovery, round robin and retry while instances come and go.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// Run on etcd at these endpoints (comma-separated) instead of the in-memory store.
    #[arg(long = "etcd", value_delimiter = ',')]
    etcd: Option<Vec<String>>,
}

/// Where the demo registers and discovers.
enum Backend {
    Memory(MemoryStore),
    Etcd(EtcdClient),
}

impl Backend {
    /// A registrar that, when dropped, leaves its key to expire at its TTL (a crash).
    fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error> {
        Ok(match self {
            Backend::Memory(store) => Box::new(MemoryRegistrar::new(store, service)?),
            Backend::Etcd(client) => {
                Box::new(EtcdRegistrar::new(client.clone(), service).with_revoke_on_drop(false))
            }
        })
    }

    async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
        Ok(match self {
            Backend::Memory(store) => Box::new(MemoryInstancer::new(store, prefix)?),
            Backend::Etcd(client) => Box::new(EtcdInstancer::new(client.clone(), prefix).await?),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    examples::init_logging("error");
    let args = Args::parse();
    let backend = match args.etcd {
        None => Backend::Memory(MemoryStore::new()),
        Some(endpoints) => match EtcdClient::connect(&endpoints, ClientOptions::new()).await {
            Ok(client) => Backend::Etcd(client),
            Err(e) => {
                eprintln!("demo: {}", sd_core::Report(&e));
                return ExitCode::FAILURE;
            }
        },
    };
    match run(backend).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {}", sd_core::Report(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(backend: Backend) -> Result<(), Error> {
    // Heartbeat every 500 ms; the store forgets an instance 1.5 s after its last heartbeat
    // (etcd rounds lease TTLs up to whole seconds: 2 s there).
    let ttl = TtlOption::new(Duration::from_millis(500), Duration::from_millis(1500))?;

    // The service side: three barsvc instances register themselves.
    let mut servers = HashMap::new();
    let mut registrars = Vec::new();
    for port in [8081, 8082, 8083] {
        let addr = format!("127.0.0.1:{port}");
        servers.insert(
            addr.clone(),
            Arc::new(BarSvc {
                addr: addr.clone(),
                up: AtomicBool::new(true),
            }),
        );
        let service = Service::new(format!("{PREFIX}{addr}"), &addr)?.with_ttl(ttl);
        let registrar = backend.registrar(service)?;
        registrar.register().await?;
        println!("registered   {addr}");
        registrars.push(registrar);
    }
    let servers = Arc::new(servers);

    // The client side: instancer -> endpointer (factory) -> round robin -> retry.
    let instancer = backend.instancer(PREFIX).await?;
    let mut changes = instancer.subscribe();
    let watcher = tokio::spawn(async move {
        while let Some(event) = changes.next().await {
            match event {
                Event::Instances(set) => println!("instances    {:?}", set),
                Event::Error(e) => println!("discovery error: {}", sd_core::Report(&e)),
            }
        }
    });
    let dial = servers.clone();
    let factory = move |instance: &Instance| -> Result<(Arc<BarSvc>, Option<Closer>), Error> {
        let svc = dial.get(instance.as_str()).cloned().ok_or_else(|| {
            Error::factory(instance, std::io::Error::other("no such barsvc instance"))
        })?;
        let name = instance.to_string();
        let closer: Closer = Box::new(move || println!("closed       {name}"));
        Ok((svc, Some(closer)))
    };
    let endpointer =
        Arc::new(DefaultEndpointer::new(&instancer, factory, EndpointerOptions::new()).await);
    // Outlier detection: two failed calls in a row eject an instance for 1 s (30 s and 5 calls
    // are the defaults; the demo is short), then one probe call decides.
    let outliers = Outliers::new()
        .consecutive_failures(2)?
        .base_ejection(Duration::from_secs(1))?
        .on_change(|instance, change| match change {
            HealthChange::Ejected { duration, .. } => {
                println!("ejected      {instance} for {duration:?}: its calls keep failing")
            }
            _ => println!("restored     {instance}: its probe call succeeded"),
        });
    let retry = Retry::new(
        RoundRobin::new(endpointer.clone()).with_outliers(Arc::new(outliers)),
        3,
        Duration::from_secs(1),
    )?
    .with_callback(|attempt: usize, err: &AttemptError<String>| {
        println!(
            "  attempt {attempt} failed: {}; trying the next instance",
            examples::attempt_failure(err)
        );
        true
    });

    println!("\n-- all three instances up");
    calls(&retry, 0..6).await;

    println!("\n-- 127.0.0.1:8081 deregisters");
    registrars[0].deregister().await?;
    settle(&endpointer, 2).await;
    calls(&retry, 6..10).await;

    let set_up = |addr: &str, up: bool| {
        if let Some(svc) = servers.get(addr) {
            svc.up.store(up, Ordering::SeqCst);
        }
    };
    println!("\n-- 127.0.0.1:8083 hangs: it stops answering, but its heartbeat goes on");
    set_up("127.0.0.1:8083", false);
    calls(&retry, 10..16).await;
    println!("\n-- 127.0.0.1:8083 answers again");
    set_up("127.0.0.1:8083", true);
    // Its ejection (1 s) ends; the next call to reach it is the probe.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    calls(&retry, 16..20).await;

    println!("\n-- 127.0.0.1:8082 crashes: it stops answering and heart-beating");
    set_up("127.0.0.1:8082", false);
    drop(registrars.remove(1));
    calls(&retry, 20..24).await;
    println!("\n-- 127.0.0.1:8082's key has expired: no call tries it any more");
    settle(&endpointer, 1).await;
    calls(&retry, 24..28).await;

    println!("\n-- shutting down");
    for registrar in &registrars {
        registrar.deregister().await?;
    }
    settle(&endpointer, 0).await;
    instancer.stop();
    let _ = watcher.await;
    Ok(())
}
