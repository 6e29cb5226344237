//! go-kit's etcdv3 example, in Rust: `foosvc` registers itself in etcd under
//! `/services/foosvc/<instance>` with a TTL, discovers `/services/barsvc/` through an instancer,
//! an endpointer with a factory, round robin and retry (3 attempts within 3 s), prints the barsvc
//! instances as they change, calls one every `--call-every`, and deregisters on shutdown
//! (Ctrl-C / SIGINT, SIGTERM, or after `--run-for`). Shutdown drains: foosvc deregisters first,
//! so clients stop picking it, then gives the calls it has in flight up to `--drain-timeout` to
//! finish before it exits.
//!
//! With `--metrics-addr 127.0.0.1:9100` it serves its metrics (sd's: instances per prefix,
//! endpoints, discovery errors, lease losses, retries, ...) as Prometheus text at
//! `http://127.0.0.1:9100/metrics`.
//!
//! Every flag is checked before anything is registered (durations above zero and at most 365
//! days, endpoints `http://HOST:PORT` or `https://HOST:PORT`, TLS files readable and matching),
//! so a mistake is reported on stderr with a non-zero exit, and no key is left behind.
//!
//! ```text
//! cargo xtask etcd &                      # a local etcd on 127.0.0.1:2379
//! cargo run -p examples --bin foosvc -- --instance 127.0.0.1:8080
//! etcdctl put /services/barsvc/127.0.0.1:9000 127.0.0.1:9000
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use examples::EtcdArgs;
use futures::StreamExt;
use sd_core::{
    Closer, DefaultEndpointer, EndpointerOptions, Error, Event, Instance, Instancer, Metadata,
    Registrar, Service, TtlOption, ValueFormat,
};
use sd_etcd::{EtcdInstancer, EtcdRegistrar};
use sd_lb::{Retry, WeightedRoundRobin, ZoneAware};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

const FOO_PREFIX: &str = "/services/foosvc/";
const BAR_PREFIX: &str = "/services/barsvc/";

/// go-kit's etcdv3 example: register foosvc, discover and call barsvc.
#[derive(Debug, Parser)]
#[command(name = "foosvc")]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// This instance's address, registered under /services/foosvc/<instance>.
    #[arg(long, default_value = "127.0.0.1:8080")]
    instance: String,
    /// How often the registration is refreshed (at least 500ms).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How long etcd keeps the registration after the last heartbeat (more than --heartbeat,
    /// at most 365 days).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How often to call barsvc (above zero, at most 365 days).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    call_every: Duration,
    /// Shut down after this long (at most 365 days) instead of waiting for a signal.
    #[arg(long, value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
    /// This instance's weight for weighted balancing (at least 1; needs a JSON --format).
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// This instance's zone: registered (needs a JSON --format), and barsvc calls prefer
    /// barsvc instances of the same zone.
    #[arg(long)]
    zone: Option<String>,
    /// How the registration is stored: plain (go-kit), etcd-naming (etcd's Go naming package,
    /// gRPC's resolver) or json.
    #[arg(long, default_value = "plain")]
    format: ValueFormat,
    /// On shutdown, after deregistering, how long calls in flight may take to finish before
    /// foosvc exits without them (above zero, at most 365 days).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// How long each barsvc call takes (simulates a slow backend; default none).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    call_latency: Duration,
    /// Serve metrics as Prometheus text at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// A barsvc endpoint. A real program would hold a client connection here; the example only
/// names the instance it would call.
#[derive(Debug, Clone)]
struct BarEndpoint(Instance);

impl BarEndpoint {
    async fn call(&self, latency: Duration) -> Result<String, Error> {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok(format!("barsvc at {} answered", self.0))
    }
}

/// How calls pick a barsvc instance.
enum Pick {
    Weighted(WeightedRoundRobin<BarEndpoint, DefaultEndpointer<BarEndpoint>>),
    Zoned(ZoneAware<BarEndpoint, DefaultEndpointer<BarEndpoint>>),
}

impl sd_core::Balancer for Pick {
    type Endpoint = BarEndpoint;

    fn endpoint(&self) -> Result<BarEndpoint, Error> {
        match self {
            Pick::Weighted(b) => b.endpoint(),
            Pick::Zoned(b) => b.endpoint(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    examples::init_logging("warn");
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foosvc: {}", sd_core::Report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Checks foosvc's own duration flags, before anything is registered: a zero `--call-every`
/// would panic the call timer, and an unbounded `--run-for` overflows the clock.
fn check_durations(args: &Args) -> Result<(), Error> {
    let mut checks = vec![
        ("--heartbeat", args.heartbeat),
        ("--ttl", args.ttl),
        ("--call-every", args.call_every),
        ("--drain-timeout", args.drain_timeout),
    ];
    checks.extend(args.run_for.map(|d| ("--run-for", d)));
    if !args.call_latency.is_zero() {
        checks.push(("--call-latency", args.call_latency));
    }
    for (flag, value) in checks {
        examples::check_duration(flag, value).map_err(Error::invalid_argument)?;
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), Error> {
    check_durations(&args)?;
    let ttl = TtlOption::new(args.heartbeat, args.ttl)?;
    if args.format == ValueFormat::Plain && (args.weight != 1 || args.zone.is_some()) {
        return Err(Error::invalid_argument(
            "--weight and --zone need --format etcd-naming or json: a plain value (go-kit's \
             format) carries no metadata",
        ));
    }
    let mut meta = Metadata::new().with_weight(args.weight)?;
    if let Some(zone) = &args.zone {
        meta = meta.with_zone(zone);
    }
    let service = Service::new(format!("{FOO_PREFIX}{}", args.instance), &args.instance)?
        .with_metadata(meta, args.format)?
        .with_ttl(ttl);
    // Before anything that records metrics is made (they register with the recorder installed
    // at that moment), and before registering: a busy address leaves no key behind.
    if let Some(addr) = args.metrics_addr {
        examples::serve_metrics(addr).map_err(Error::invalid_argument)?;
        examples::say!("metrics at http://{addr}/metrics");
    }
    // Install the signal handlers before registering, so no signal finds us without them.
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::backend)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::backend)?;

    let client = args.etcd.connect("foosvc").await?;
    let registrar = EtcdRegistrar::new(client.clone(), service);
    registrar.register().await?;
    examples::say!(
        "registered {FOO_PREFIX}{} (ttl {:?})",
        args.instance,
        args.ttl
    );

    let mut in_flight = JoinSet::new();
    let result = serve(&args, client, &mut sigterm, &mut sigint, &mut in_flight).await;

    // Deregister first, whatever serve() returned, so that clients stop picking this instance
    // while its calls finish; report both errors if both failed.
    let deregistered = registrar.deregister().await;
    if deregistered.is_ok() {
        examples::say!("deregistered {FOO_PREFIX}{}", args.instance);
    }
    drain(&mut in_flight, args.drain_timeout).await;
    match deregistered {
        Ok(()) => result,
        Err(e) => {
            if let Err(served) = &result {
                eprintln!("foosvc: {served}");
            }
            Err(e)
        }
    }
}

/// Waits for the calls in flight, at most `timeout`; abandons those still running then.
async fn drain(in_flight: &mut JoinSet<()>, timeout: Duration) {
    if in_flight.is_empty() {
        return;
    }
    examples::say!(
        "draining {} call(s) in flight (at most {timeout:?})",
        in_flight.len()
    );
    let finished = tokio::time::timeout(timeout, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_ok() {
        examples::say!("drained");
    } else {
        examples::say!(
            "drain timeout: abandoning {} call(s) in flight",
            in_flight.len()
        );
        in_flight.abort_all();
    }
}

async fn serve(
    args: &Args,
    client: sd_etcd::EtcdClient,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
    in_flight: &mut JoinSet<()>,
) -> Result<(), Error> {
    let instancer = EtcdInstancer::new(client, BAR_PREFIX).await?;
    let mut changes = instancer.subscribe();
    let factory = |instance: &Instance| -> Result<(BarEndpoint, Option<Closer>), Error> {
        Ok((BarEndpoint(instance.clone()), None))
    };
    let options = EndpointerOptions::new().name("barsvc");
    let endpointer = DefaultEndpointer::new(&instancer, factory, options).await;
    // By weight; with --zone, round robin within the zone while it has barsvc instances.
    let balancer = match &args.zone {
        Some(zone) => Pick::Zoned(ZoneAware::new(endpointer, zone)),
        None => Pick::Weighted(WeightedRoundRobin::new(endpointer)),
    };
    // Shared with the calls, which run concurrently: a slow one does not hold up the next.
    let retry = Arc::new(Retry::new(balancer, 3, Duration::from_secs(3))?);
    let latency = args.call_latency;

    // Both durations were checked by check_durations(): the period is not zero, and sleep()
    // saturates a deadline past the clock's end instead of adding to an Instant.
    let mut calls = tokio::time::interval(args.call_every);
    let deadline = async {
        match args.run_for {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { examples::say!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { examples::say!("SIGINT: shutting down"); break; }
            _ = &mut deadline => { examples::say!("--run-for elapsed: shutting down"); break; }
            change = changes.next() => match change {
                Some(Event::Instances(set)) => {
                    examples::say!("barsvc instances: {:?}", set.iter().map(examples::describe).collect::<Vec<_>>())
                }
                Some(Event::Error(e)) => examples::say!("barsvc discovery error: {}", sd_core::Report(&e)),
                None => break,
            },
            _ = calls.tick() => {
                let retry = retry.clone();
                in_flight.spawn(async move {
                    match retry.call(|bar: BarEndpoint| async move { bar.call(latency).await }).await {
                        Ok(reply) => examples::say!("call: {reply}"),
                        Err(e) => examples::say!("call failed: {}", examples::retry_failure(&e)),
                    }
                });
            }
            // Reaps finished calls, so the set holds only those in flight.
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    instancer.stop();
    Ok(())
}
