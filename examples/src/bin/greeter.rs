//! A gRPC greeter found through etcd.
//!
//! `greeter serve` runs a greeter server (tonic) and, once it listens, registers its address
//! under `/services/greeter/<addr>` with a TTL; on SIGTERM or Ctrl-C it deregisters first, then
//! finishes the calls in flight. `greeter call` discovers the servers and calls one every
//! `--every`, printing `ok <server addr>` or `error <message>` per call and, last,
//! `calls N ok A failed F` (exit status 1 if any call failed).
//!
//! `call` balances with sd's balancers by default: a tonic channel per instance, round robin
//! with outlier ejection (an instance failing 2 calls in a row gets no calls for 30 s, then one
//! probe), inside retries (3 attempts within 3 s, never twice to an instance that failed in the
//! call). A server that crashed without deregistering costs at most 2 failed attempts, each
//! retried elsewhere, before it is ejected (printed as `ejected <addr> for 30s`), long before
//! its registration expires. `--balancer tonic` calls through tonic's own balanced channel
//! (`sd_core::tonic::balance_channel`) instead: no retries, no ejection.
//!
//! ```text
//! cargo xtask etcd &                      # a local etcd on 127.0.0.1:2379
//! cargo run -p examples --bin greeter -- serve --addr 127.0.0.1:50051 &
//! cargo run -p examples --bin greeter -- serve --addr 127.0.0.1:50052 &
//! cargo run -p examples --bin greeter -- call --count 20 --every 10ms
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use examples::greeter::{self, GreeterClient, HelloRequest, PREFIX};
use examples::EtcdArgs;
use sd_core::tonic::{balance_channel, ChannelHandle, ChannelOptions, ChannelService};
use sd_core::{DefaultEndpointer, EndpointerOptions, Error, Registrar, Service, TtlOption};
use sd_etcd::{EtcdInstancer, EtcdRegistrar};
use sd_lb::outliers::HealthChange;
use sd_lb::{Outliers, Retry, RoundRobin};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic::transport::Channel;

/// A gRPC greeter found through etcd.
#[derive(Debug, Parser)]
#[command(name = "greeter")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the greeter and register it under /services/greeter/<addr>.
    Serve(ServeArgs),
    /// Discover the greeter servers and call them.
    Call(CallArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Where to serve, HOST:PORT (port 0: one the system chooses); the address bound is the
    /// one registered, so it must be one clients can dial (not 0.0.0.0 or [::]).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// How often the registration is refreshed (at least 500ms).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How long etcd keeps the registration after the last heartbeat (more than --heartbeat).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// How `call` picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Balancer {
    /// sd's round robin with outlier ejection, inside retries.
    Sd,
    /// tonic's balanced channel (power of two choices): no retries, no ejection.
    Tonic,
}

#[derive(Debug, clap::Args)]
struct CallArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// How many calls to make (at least 1).
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// The time between the starts of two calls.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// How long connecting to a server, and each attempt, may take.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The name to greet.
    #[arg(long, default_value = "sd")]
    name: String,
    /// How calls pick a server.
    #[arg(long, value_enum, default_value_t = Balancer::Sd)]
    balancer: Balancer,
}

#[tokio::main]
async fn main() -> ExitCode {
    examples::init_logging("warn");
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args).await.map(|()| true),
        Command::Call(args) => call(args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("greeter: {}", sd_core::Report(&e));
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT, installed before anything is registered so no signal finds the program
/// without them.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Self, Error> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(Error::backend)?,
            int: signal(SignalKind::interrupt()).map_err(Error::backend)?,
        })
    }

    /// Waits for either; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), Error> {
    for (flag, value) in [("--heartbeat", args.heartbeat), ("--ttl", args.ttl)] {
        examples::check_duration(flag, value).map_err(Error::invalid_argument)?;
    }
    if args.addr.ip().is_unspecified() {
        return Err(Error::invalid_argument(format!(
            "--addr {}: the address served is the one registered, and clients cannot dial {}: \
             give the address they reach this host at, e.g. 127.0.0.1:{}",
            args.addr,
            args.addr.ip(),
            args.addr.port()
        )));
    }
    let ttl = TtlOption::new(args.heartbeat, args.ttl)?;
    let mut signals = Signals::install()?;
    let client = args.etcd.connect("greeter").await?;

    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| Error::backend_msg(format!("cannot listen on {}: {e}", args.addr)))?;
    let addr = listener.local_addr().map_err(Error::backend)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(greeter::serve(listener, stopped));
    examples::say!("serving {addr}");

    let key = format!("{PREFIX}{addr}");
    let registrar = EtcdRegistrar::new(client, Service::new(&key, addr.to_string())?.with_ttl(ttl));
    registrar.register().await?;
    examples::say!("registered {key}");

    let served_early = tokio::select! {
        name = signals.recv() => {
            examples::say!("{name}: shutting down");
            None
        }
        served = &mut server => Some(served),
    };
    // Deregister first, so clients stop picking this server, then finish what is in flight.
    let deregistered = registrar.deregister().await;
    if deregistered.is_ok() {
        examples::say!("deregistered {key}");
    }
    let _ = stop.send(());
    let served = match served_early {
        Some(served) => served,
        None => server.await,
    };
    let served = served
        .map_err(Error::backend)?
        .map_err(|e| Error::backend_msg(format!("serving on {addr}: {}", sd_core::Report(&e))));
    deregistered?;
    served?;
    examples::say!("stopped");
    Ok(())
}

/// The two ways `call` reaches a server.
#[allow(clippy::large_enum_variant)] // one per program: the size does not matter
enum Caller {
    /// A channel per instance, round robin with outlier ejection, inside retries.
    Sd(Retry<RoundRobin<Channel, DefaultEndpointer<Channel>>>),
    /// tonic's balanced channel.
    Tonic {
        client: GreeterClient<ChannelService>,
        /// Keeps discovery running.
        _handle: ChannelHandle,
    },
}

impl Caller {
    async fn new(
        balancer: Balancer,
        instancer: EtcdInstancer,
        options: ChannelOptions,
    ) -> Result<Self, Error> {
        Ok(match balancer {
            Balancer::Sd => {
                let endpointer =
                    DefaultEndpointer::owning(instancer, options, EndpointerOptions::new()).await;
                // Two failures in a row eject an instance: a crashed server costs at most two
                // failed attempts (each retried elsewhere), not a failed call per round.
                let outliers =
                    Outliers::new()
                        .consecutive_failures(2)?
                        .on_change(|instance, change| match change {
                            HealthChange::Ejected { duration, .. } => examples::say!(
                                "ejected {} for {}",
                                instance.addr(),
                                humantime::format_duration(*duration)
                            ),
                            HealthChange::Restored => {
                                examples::say!("restored {}", instance.addr())
                            }
                            _ => {}
                        });
                let balancer = RoundRobin::new(endpointer).with_outliers(Arc::new(outliers));
                Caller::Sd(Retry::new(balancer, 3, Duration::from_secs(3))?)
            }
            Balancer::Tonic => {
                let (_channel, handle) = balance_channel(instancer, options);
                Caller::Tonic {
                    client: GreeterClient::new(handle.service()),
                    _handle: handle,
                }
            }
        })
    }

    /// One greeting: the address of the server that answered, or why none did.
    async fn greet(&self, name: &str) -> Result<String, String> {
        let request = || HelloRequest { name: name.into() };
        match self {
            Caller::Sd(retry) => retry
                .call(|channel| async move {
                    GreeterClient::new(channel)
                        .say_hello(request())
                        .await
                        .map_err(|status| describe(&status))
                })
                .await
                .map(|reply| reply.into_inner().server)
                .map_err(|e| examples::retry_failure(&e)),
            Caller::Tonic { client, .. } => client
                .clone()
                .say_hello(request())
                .await
                .map(|reply| reply.into_inner().server)
                .map_err(|status| describe(&status)),
        }
    }
}

/// A status as one line: its code and message (tonic's Display adds details and metadata).
fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Makes the calls; `Ok(false)` when any failed.
async fn call(args: CallArgs) -> Result<bool, Error> {
    for (flag, value) in [("--every", args.every), ("--timeout", args.timeout)] {
        examples::check_duration(flag, value).map_err(Error::invalid_argument)?;
    }
    if args.count == 0 {
        return Err(Error::invalid_argument(
            "--count 0: give the number of calls to make, at least 1",
        ));
    }
    let mut signals = Signals::install()?;
    let client = args.etcd.connect("greeter").await?;
    let instancer = EtcdInstancer::new(client, PREFIX).await?;
    let options = ChannelOptions::new()
        .connect_timeout(args.timeout)?
        .timeout(args.timeout)?;
    let caller = Caller::new(args.balancer, instancer, options).await?;

    let mut ticks = tokio::time::interval(args.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut made, mut ok) = (0u64, 0u64);
    while made < args.count {
        tokio::select! {
            name = signals.recv() => {
                examples::say!("{name}: stopping");
                break;
            }
            _ = ticks.tick() => {}
        }
        made += 1;
        match caller.greet(&args.name).await {
            Ok(server) => {
                ok += 1;
                examples::say!("ok {server}");
            }
            Err(e) => examples::say!("error {e}"),
        }
    }
    examples::say!("calls {made} ok {ok} failed {}", made - ok);
    Ok(ok == made)
}
