//! The tower adapter under tower's own power-of-two-choices balancer (`tower::balance::p2c`):
//! what a tower user sees.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use sd_core::{
    discover, discover_owning, Closer, Discovery, Error, Event, Factory, Instance, Publisher,
};
use tokio::sync::oneshot;
use tower::balance::p2c::Balance;
use tower::load::{CompleteOnResponse, PendingRequestsDiscover};
use tower::{Service, ServiceExt};

/// A request: the call answers once the gate opens (its sender sends or is dropped), so a test
/// can keep calls in flight.
type Gate = oneshot::Receiver<()>;

fn open() -> Gate {
    oneshot::channel().1
}

/// What the services saw: the instance of every call, and the instances closed, in order.
#[derive(Clone, Default)]
struct Log {
    calls: Arc<Mutex<Vec<String>>>,
    closed: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn closed(&self) -> Vec<String> {
        self.closed.lock().unwrap().clone()
    }
}

/// One instance's service: answers with its instance.
#[derive(Clone)]
struct Answer {
    instance: String,
    log: Log,
}

impl Service<Gate> for Answer {
    type Response = String;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<String, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, gate: Gate) -> Self::Future {
        self.log.calls.lock().unwrap().push(self.instance.clone());
        let instance = self.instance.clone();
        Box::pin(async move {
            let _ = gate.await;
            Ok(instance)
        })
    }
}

/// Makes an [`Answer`] per instance, with a closer that logs the instance.
fn answers(log: &Log) -> impl Factory<Answer> {
    let log = log.clone();
    move |i: &Instance| -> Result<(Answer, Option<Closer>), Error> {
        let closed = log.closed.clone();
        let instance = i.to_string();
        let closer: Closer = Box::new(move || closed.lock().unwrap().push(instance));
        Ok((
            Answer {
                instance: i.to_string(),
                log: log.clone(),
            },
            Some(closer),
        ))
    }
}

/// tower's p2c over a discovery, by requests in flight (the usual setup).
fn balance<F>(
    discovery: Discovery<Answer, F>,
) -> Balance<PendingRequestsDiscover<Discovery<Answer, F>>, Gate>
where
    F: Factory<Answer> + Unpin,
{
    Balance::new(PendingRequestsDiscover::new(
        discovery,
        CompleteOnResponse::default(),
    ))
}

/// Starts a call (waiting for the balancer to be ready) and returns its response future.
async fn start<S: Service<Gate>>(svc: &mut S, gate: Gate) -> S::Future
where
    S::Error: std::fmt::Debug,
{
    svc.ready().await.expect("ready").call(gate)
}

#[tokio::test]
async fn tower_balances_over_three_instances() {
    let log = Log::default();
    let instancer = Publisher::new(Event::from_instances(["a", "b", "c"]));
    let mut lb = balance(discover(&instancer, answers(&log)));
    // Calls held in flight, so p2c's loads (requests in flight) steer each pick.
    let mut gates = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..90 {
        let (tx, rx) = oneshot::channel();
        gates.push(tx);
        responses.push(start(&mut lb, rx).await);
    }
    let mut per_instance = BTreeMap::<String, usize>::new();
    for instance in log.calls() {
        *per_instance.entry(instance).or_default() += 1;
    }
    assert_eq!(per_instance.len(), 3, "{per_instance:?}");
    assert!(
        per_instance.values().all(|&n| (20..=40).contains(&n)),
        "90 calls in flight over 3: {per_instance:?}"
    );
    drop(gates);
    for response in responses {
        response.await.expect("answered");
    }
}

#[tokio::test]
async fn a_removed_instance_closes_only_after_tower_dropped_it_and_its_calls_ended() {
    let log = Log::default();
    let instancer = Publisher::new(Event::from_instances(["a", "b", "c"]));
    let mut lb = balance(discover(&instancer, answers(&log)));

    // A call to c, held in flight (others answer at once).
    let mut held = None;
    for _ in 0..1000 {
        let (tx, rx) = oneshot::channel();
        let response = start(&mut lb, rx).await;
        if log.calls().last().map(String::as_str) == Some("c") {
            held = Some((tx, response));
            break;
        }
        drop(tx);
        response.await.expect("answered");
    }
    let (c_gate, c_response) = held.expect("p2c picked c at some point");

    instancer.publish(Event::from_instances(["a", "b"]));
    // tower takes the removal on its next poll_ready and drops c's service.
    let response = start(&mut lb, open()).await;
    assert_eq!(lb.len(), 2, "tower has dropped c");
    assert_ne!(response.await.expect("answered"), "c");
    assert!(
        log.closed().is_empty(),
        "c's closer waits for its call in flight"
    );

    c_gate.send(()).expect("c's call is waiting");
    assert_eq!(c_response.await.expect("answered"), "c");
    assert_eq!(log.closed(), ["c"], "closed once its last call ended");

    for _ in 0..20 {
        let to = start(&mut lb, open()).await.await.expect("answered");
        assert_ne!(to, "c", "no call goes to a removed instance");
    }
    drop(lb);
    let mut closed = log.closed();
    closed.sort();
    assert_eq!(closed, ["a", "b", "c"], "tower dropped the rest");
}

#[tokio::test(start_paused = true)]
async fn errors_the_empty_set_and_the_end_show_in_the_state_without_a_panic() {
    let log = Log::default();
    let instancer = Publisher::new(Event::from_instances(["a"]));
    let discovery = discover(&instancer, answers(&log));
    let state = discovery.state();
    let mut lb = balance(discovery);
    assert_eq!(start(&mut lb, open()).await.await.unwrap(), "a");
    assert_eq!(state.borrow().instances(), 1);

    // A discovery error: tower keeps calling what it has, the state says what is wrong.
    instancer.publish(Event::Error(Error::backend_msg("etcd unreachable")));
    assert_eq!(start(&mut lb, open()).await.await.unwrap(), "a");
    assert_eq!(
        state.borrow().error().map(|e| e.to_string()).as_deref(),
        Some("etcd unreachable")
    );
    assert_eq!(state.borrow().instances(), 1);

    // The empty set: a call waits (tower's way); the state says why.
    instancer.publish(Event::empty());
    let waited = tokio::time::timeout(Duration::from_secs(1), lb.ready()).await;
    assert!(waited.is_err(), "no instance: tower waits");
    let now = state.borrow().clone();
    assert_eq!(now.instances(), 0);
    assert!(now.error().is_none());
    assert!(matches!(
        now.check(),
        Err(Error::NoEndpoints { last_error: None })
    ));

    instancer.publish(Event::from_instances(["b"]));
    assert_eq!(start(&mut lb, open()).await.await.unwrap(), "b");

    // The instancer stops: the discovery ends, tower polls it again and again, no panic, and the
    // services it has keep answering.
    instancer.stop();
    for _ in 0..3 {
        assert_eq!(start(&mut lb, open()).await.await.unwrap(), "b");
    }
    let now = state.borrow().clone();
    assert!(now.ended());
    assert!(matches!(now.error().map(|e| &**e), Some(Error::Stopped)));
    assert_eq!(now.instances(), 1);
}

#[tokio::test]
async fn dropping_an_owning_discovery_stops_its_instancer() {
    let log = Log::default();
    let instancer = Arc::new(Publisher::new(Event::from_instances(["a", "b"])));
    let mut lb = balance(discover_owning(instancer.clone(), answers(&log)));
    start(&mut lb, open()).await.await.unwrap();
    assert!(!instancer.is_stopped());
    drop(lb);
    assert!(instancer.is_stopped(), "the balancer took the instancer");
    let mut closed = log.closed();
    closed.sort();
    assert_eq!(closed, ["a", "b"]);

    // A borrowing discovery whose instancer is dropped ends, and says so.
    let instancer = Publisher::new(Event::from_instances(["a"]));
    let discovery = discover(&instancer, answers(&log));
    let state = discovery.state();
    let mut lb = balance(discovery);
    start(&mut lb, open()).await.await.unwrap();
    drop(instancer);
    start(&mut lb, open()).await.await.unwrap();
    assert!(state.borrow().ended(), "a dropped instancer is visible");
}
