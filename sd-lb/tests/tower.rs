//! sd's balancers as tower services, over real TCP servers on loopback: each endpoint is a
//! `tower::service_fn` that connects to its instance, sends a line and reads the answer.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Instances;
use sd_core::{factory, DefaultEndpointer, EndpointerOptions, Error, Factory};
use sd_lb::tower::{BalanceLayer, Balanced, RetryService};
use sd_lb::{Outliers, P2c, Retry, RoundRobin};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tower::limit::ConcurrencyLimit;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// A line server on 127.0.0.1: answers each connection's line with `<name> <line>`.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(name: &str) -> Server {
        Server::start_holding(name, None).await
    }

    /// With `hold`, each answer waits for a permit of it: the test decides when calls end.
    async fn start_holding(name: &str, hold: Option<Arc<Semaphore>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = oneshot::channel();
        let (name, count) = (name.to_string(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    // Returning drops the listener: new connections are refused.
                    _ = &mut stopped => return,
                    conn = listener.accept() => {
                        let Ok((stream, _)) = conn else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(answer(stream, name.clone(), hold.clone()));
                    }
                }
            }
        });
        Server {
            addr,
            accepted,
            stop: Some(stop),
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listener (the instance stays registered: a crash, not a shutdown).
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task");
    }
}

async fn answer(stream: TcpStream, name: String, hold: Option<Arc<Semaphore>>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
        return;
    }
    if let Some(hold) = hold {
        hold.acquire().await.expect("open semaphore").forget();
    }
    let _ = write
        .write_all(format!("{name} {}\n", line.trim_end()).as_bytes())
        .await;
}

/// The client of one instance: connects, sends `req` as a line, returns the answer.
fn client(
    addr: SocketAddr,
) -> impl Service<
    String,
    Response = String,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<String>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: String| async move {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("{req}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).await?;
        if reply.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without an answer",
            ));
        }
        Ok(reply.trim_end().to_string())
    })
}

/// The factory of clients: an instance is a socket address.
fn clients<S: Send + Sync + 'static>(
    wrap: impl Fn(SocketAddr) -> S + Send + Sync + 'static,
) -> impl Factory<S> {
    factory(move |i| {
        let addr: SocketAddr = i.parse().map_err(|e| Error::factory(i, e))?;
        Ok((wrap(addr), None))
    })
}

fn instances_of(servers: &[Server]) -> Instances {
    Instances::new(servers.iter().map(|s| s.addr.to_string()))
}

/// The server name of an answer, after checking it echoes `req`.
fn answered_by(reply: &str, req: &str) -> String {
    let (name, echoed) = reply.split_once(' ').expect("`<name> <line>`");
    assert_eq!(echoed, req);
    name.to_string()
}

/// Waits (real time, at most 5 s) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("not within 5 s: {what}"));
}

async fn three_servers() -> Vec<Server> {
    vec![
        Server::start("a").await,
        Server::start("b").await,
        Server::start("c").await,
    ]
}

#[tokio::test]
async fn balanced_spreads_calls_evenly_over_three_servers() {
    let servers = three_servers().await;
    let instances = instances_of(&servers);
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    let svc = ServiceBuilder::new()
        .layer(BalanceLayer::new())
        .service(RoundRobin::new(endpointer));
    let mut per_server = BTreeMap::<String, usize>::new();
    for i in 0..60 {
        let req = format!("call {i}");
        let reply = svc.clone().oneshot(req.clone()).await.expect("answered");
        *per_server.entry(answered_by(&reply, &req)).or_default() += 1;
    }
    assert_eq!(
        per_server,
        BTreeMap::from([("a".into(), 20), ("b".into(), 20), ("c".into(), 20)])
    );
}

#[tokio::test]
async fn p2c_through_balanced_counts_a_call_in_flight_until_its_answer() {
    let hold = Arc::new(Semaphore::new(0));
    let servers = vec![
        Server::start_holding("a", Some(hold.clone())).await,
        Server::start_holding("b", Some(hold.clone())).await,
    ];
    let instances = instances_of(&servers);
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    let svc = Balanced::new(P2c::new(endpointer));
    let mut calls = Vec::new();
    for i in 1..=20 {
        calls.push(tokio::spawn(svc.clone().oneshot(format!("call {i}"))));
        until("the call reached its server", || {
            servers.iter().map(Server::accepted).sum::<usize>() == i
        })
        .await;
        // Both endpoints are drawn on every pick: the less loaded one wins while the calls
        // already made still count.
        let (a, b) = (servers[0].accepted(), servers[1].accepted());
        assert!(a.abs_diff(b) <= 1, "after {i} held calls: a {a}, b {b}");
    }
    hold.add_permits(20);
    for call in calls {
        call.await.expect("no panic").expect("answered");
    }
}

#[tokio::test]
async fn retry_service_loses_no_call_to_a_stopped_server_and_ejects_it() {
    let mut servers = three_servers().await;
    let instances = instances_of(&servers);
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    let outliers = Arc::new(Outliers::new().consecutive_failures(2).expect("valid"));
    let rr = RoundRobin::new(endpointer).with_outliers(outliers.clone());
    let svc = RetryService::new(Retry::new(rr, 3, Duration::from_secs(5)).expect("valid"));

    servers[1].stop().await;
    let mut failed = 0;
    let mut per_server = BTreeMap::<String, usize>::new();
    for i in 0..60 {
        let req = format!("call {i}");
        match svc.clone().oneshot(req.clone()).await {
            Ok(reply) => *per_server.entry(answered_by(&reply, &req)).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    assert_eq!(failed, 0, "every call that met b was retried elsewhere");
    assert_eq!(outliers.ejected(), 1, "b was ejected");
    assert_eq!(per_server.keys().collect::<Vec<_>>(), ["a", "c"]);
}

#[tokio::test]
async fn balanced_fails_exactly_the_ejection_threshold_of_calls_to_a_stopped_server() {
    let mut servers = three_servers().await;
    let instances = instances_of(&servers);
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    let outliers = Arc::new(Outliers::new().consecutive_failures(2).expect("valid"));
    let svc = Balanced::new(RoundRobin::new(endpointer).with_outliers(outliers.clone()));

    servers[1].stop().await;
    let mut failures = Vec::new();
    for i in 0..60 {
        let req = format!("call {i}");
        if let Err(err) = svc.clone().oneshot(req).await {
            failures.push(err);
        }
    }
    assert_eq!(
        failures.len(),
        2,
        "two failures in a row eject b: {failures:?}"
    );
    for err in &failures {
        let io = err
            .downcast_ref::<std::io::Error>()
            .expect("the call's own error");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    }
    assert_eq!(outliers.ejected(), 1);
}

#[tokio::test]
async fn balanced_waits_for_a_busy_endpoint_to_be_ready() {
    let hold = Arc::new(Semaphore::new(0));
    let servers = vec![Server::start_holding("a", Some(hold.clone())).await];
    let instances = instances_of(&servers);
    // One call at a time per instance: the endpoint is not ready while a call runs.
    let limited = clients(|addr| ConcurrencyLimit::new(client(addr), 1));
    let endpointer = DefaultEndpointer::new(&instances, limited, EndpointerOptions::new()).await;
    let svc = Balanced::new(RoundRobin::new(endpointer));

    let first = tokio::spawn(svc.clone().oneshot("1".to_string()));
    until("the first call connected", || servers[0].accepted() == 1).await;
    let second = tokio::spawn(svc.clone().oneshot("2".to_string()));
    // Give the second call every chance to go ahead; it must wait for readiness instead.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(servers[0].accepted(), 1, "the second call waits");
    assert!(!second.is_finished());

    hold.add_permits(1);
    assert_eq!(first.await.expect("no panic").expect("answered"), "a 1");
    until("the second call connected", || servers[0].accepted() == 2).await;
    hold.add_permits(1);
    assert_eq!(second.await.expect("no panic").expect("answered"), "a 2");
}

#[tokio::test]
async fn with_no_endpoint_a_call_fails_at_once_with_the_discovery_error() {
    let instances = Instances::new(Vec::<String>::new());
    instances.fail("etcd unreachable");
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    endpointer.wait_until(|s| s.error().is_some()).await;
    let err = Balanced::new(RoundRobin::new(endpointer))
        .oneshot("x".to_string())
        .await
        .expect_err("nothing to call");
    let err = err.downcast_ref::<Error>().expect("sd's error");
    assert!(
        matches!(err, Error::NoEndpoints { last_error: Some(e) } if e.to_string() == "etcd unreachable"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_maglev_pick_is_a_service_that_counts_against_the_bound_while_held() {
    let servers = three_servers().await;
    let instances = instances_of(&servers);
    let endpointer =
        DefaultEndpointer::new(&instances, clients(client), EndpointerOptions::new()).await;
    let maglev = sd_lb::Maglev::bounded(endpointer, 1.25).expect("valid");
    let mut first = maglev.held_for(b"user-42").expect("a pick");
    let reply = first
        .ready()
        .await
        .expect("ready")
        .call("hi".to_string())
        .await
        .expect("answered");
    let server = answered_by(&reply, "hi");
    // While the first pick is held, its server is at the load bound: the key spills over.
    let spilled = maglev.held_for(b"user-42").expect("a pick");
    let reply = spilled.oneshot("hi".to_string()).await.expect("answered");
    assert_ne!(answered_by(&reply, "hi"), server, "the held pick counts");
    drop(first);
    let back = maglev.held_for(b"user-42").expect("a pick");
    let reply = back.oneshot("hi".to_string()).await.expect("answered");
    assert_eq!(
        answered_by(&reply, "hi"),
        server,
        "released: the key's own server again"
    );
}

/// With a draining endpointer, a removed server's client is closed only after the call
/// `Balanced` made through it has answered.
#[tokio::test]
async fn a_draining_endpointer_closes_only_after_the_tower_call() {
    let hold = Arc::new(Semaphore::new(0));
    let server = Server::start_holding("a", Some(hold.clone())).await;
    let instances = Instances::new([server.addr.to_string()]);
    let closed = Arc::new(AtomicUsize::new(0));
    let make = {
        let closed = closed.clone();
        factory(move |i| {
            let addr: SocketAddr = i.parse().map_err(|e| Error::factory(i, e))?;
            let closed = closed.clone();
            let closer: sd_core::Closer = Box::new(move || {
                closed.fetch_add(1, Ordering::SeqCst);
            });
            Ok((client(addr), Some(closer)))
        })
    };
    let options = EndpointerOptions::new().drain(Duration::from_secs(30));
    let endpointer = Arc::new(DefaultEndpointer::new(&instances, make, options).await);
    let mut svc = Balanced::new(RoundRobin::new(endpointer.clone()));
    let call = tokio::spawn(svc.ready().await.expect("ready").call("x".to_string()));
    until("the call reached the server", || server.accepted() == 1).await;

    let before = sd_core::Endpointer::version(&*endpointer);
    instances.set(Vec::<String>::new());
    common::changed(&*endpointer, before).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(closed.load(Ordering::SeqCst), 0, "closed under the call");

    hold.add_permits(1);
    let reply = call.await.expect("task").expect("answered");
    assert_eq!(answered_by(&reply, "x"), "a");
    assert_eq!(
        closed.load(Ordering::SeqCst),
        1,
        "closed once the call answered"
    );
}
