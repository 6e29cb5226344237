//! The default endpointer's contract: factory once per new instance, closers exactly once, last
//! good endpoints kept on errors, invalidation after a timeout, restoration on recovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_core::{
    Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event, EventStream, Instance,
    Instancer, Publisher,
};

struct TestInstancer(Publisher);

impl Instancer for TestInstancer {
    fn subscribe(&self) -> EventStream {
        self.0.subscribe()
    }
    fn stop(&self) {
        self.0.stop()
    }
}

/// Counts factory calls and closer runs per instance; fails for instances named `bad*` while
/// `fail_bad` is set.
#[derive(Clone, Default)]
struct Counts {
    made: Arc<Mutex<HashMap<String, usize>>>,
    closed: Arc<Mutex<HashMap<String, usize>>>,
    fail_bad: Arc<AtomicUsize>,
}

impl Counts {
    fn factory(
        &self,
    ) -> impl Fn(&Instance) -> Result<(String, Option<Closer>), Error> + Send + Sync + 'static {
        let counts = self.clone();
        move |i: &Instance| {
            if i.starts_with("bad") && counts.fail_bad.load(Ordering::SeqCst) > 0 {
                return Err(Error::factory(i, std::io::Error::other("cannot dial")));
            }
            *counts
                .made
                .lock()
                .unwrap()
                .entry(i.to_string())
                .or_default() += 1;
            let closed = counts.closed.clone();
            let name = i.to_string();
            let closer: Closer = Box::new(move || {
                *closed.lock().unwrap().entry(name).or_default() += 1;
            });
            Ok((format!("ep:{i}"), Some(closer)))
        }
    }
    fn made(&self, i: &str) -> usize {
        self.made.lock().unwrap().get(i).copied().unwrap_or(0)
    }
    fn closed(&self, i: &str) -> usize {
        self.closed.lock().unwrap().get(i).copied().unwrap_or(0)
    }
}

/// Lets the endpointer's task run until it has applied what was published.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn names(e: &impl Endpointer<String>) -> Vec<String> {
    e.snapshot().endpoints().to_vec()
}

#[tokio::test(flavor = "current_thread")]
async fn first_event_is_applied_before_new_returns() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["a", "b"])));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    assert_eq!(names(&e), ["ep:a", "ep:b"]);
    assert_eq!(e.snapshot().instances().len(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn factory_once_per_instance_and_closers_exactly_once() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["a", "b"])));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    let v1 = e.version();

    inst.0.publish(Event::from_instances(["b", "c"]));
    settle().await;
    assert_eq!(names(&e), ["ep:b", "ep:c"]);
    assert!(e.version() > v1);
    assert_eq!(
        (counts.made("a"), counts.made("b"), counts.made("c")),
        (1, 1, 1)
    );
    assert_eq!((counts.closed("a"), counts.closed("b")), (1, 0));

    inst.0.publish(Event::from_instances(["a", "b", "c"]));
    settle().await;
    assert_eq!(counts.made("a"), 2, "a came back: a new endpoint");
    assert_eq!(counts.made("b"), 1, "b stayed: no new endpoint");

    drop(e);
    for i in ["a", "b", "c"] {
        let expect = if i == "a" { 2 } else { 1 };
        assert_eq!(counts.closed(i), expect, "closer of {i} on drop");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn failing_factory_skips_the_instance_and_retries_later() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["bad1", "good"])));
    let counts = Counts::default();
    counts.fail_bad.store(1, Ordering::SeqCst);
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    assert_eq!(
        names(&e),
        ["ep:good"],
        "the failing instance is skipped, the rest served"
    );

    counts.fail_bad.store(0, Ordering::SeqCst);
    inst.0
        .publish(Event::from_instances(["bad1", "good", "other"]));
    settle().await;
    assert_eq!(names(&e), ["ep:bad1", "ep:good", "ep:other"]);
}

#[tokio::test(flavor = "current_thread")]
async fn error_keeps_last_endpoints_by_default() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["a"])));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    inst.0
        .publish(Event::Error(Error::backend_msg("store down")));
    settle().await;
    assert_eq!(e.endpoints().unwrap().as_ref(), ["ep:a"]);
    assert!(e.snapshot().error().is_some(), "the error is visible");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(counts.closed("a"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn invalidate_on_error_drops_endpoints_after_timeout_and_recovery_restores() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["a", "b"])));
    let counts = Counts::default();
    let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_secs(5));
    let e = DefaultEndpointer::new(&inst, counts.factory(), opts).await;

    inst.0
        .publish(Event::Error(Error::backend_msg("store down")));
    settle().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A second, different error must not restart the timer.
    inst.0
        .publish(Event::Error(Error::backend_msg("still down")));
    settle().await;
    tokio::time::sleep(Duration::from_millis(1900)).await;
    assert_eq!(e.endpoints().unwrap().len(), 2, "kept until the timeout");

    tokio::time::sleep(Duration::from_millis(200)).await;
    settle().await;
    match e.endpoints() {
        Err(Error::NoEndpoints {
            last_error: Some(err),
        }) => {
            assert!(err.to_string().contains("still down"), "{err}")
        }
        other => panic!("expected NoEndpoints with the store error, got {other:?}"),
    }
    assert_eq!((counts.closed("a"), counts.closed("b")), (1, 1));

    inst.0.publish(Event::from_instances(["a"]));
    settle().await;
    assert_eq!(e.endpoints().unwrap().as_ref(), ["ep:a"]);
    assert_eq!(counts.made("a"), 2, "restored through the factory");
    assert!(e.snapshot().error().is_none());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn recovery_before_timeout_cancels_invalidation() {
    let inst = TestInstancer(Publisher::new(Event::from_instances(["a"])));
    let counts = Counts::default();
    let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_secs(1));
    let e = DefaultEndpointer::new(&inst, counts.factory(), opts).await;
    inst.0.publish(Event::Error(Error::backend_msg("blip")));
    settle().await;
    inst.0.publish(Event::from_instances(["a"]));
    settle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(e.endpoints().unwrap().as_ref(), ["ep:a"]);
    assert_eq!(counts.closed("a"), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn stopped_instancer_gives_no_endpoints_with_stopped() {
    let inst = TestInstancer(Publisher::new(Event::empty()));
    inst.stop();
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    match e.endpoints() {
        Err(Error::NoEndpoints {
            last_error: Some(err),
        }) => {
            assert!(matches!(*err, Error::Stopped))
        }
        other => panic!("expected NoEndpoints(Stopped), got {other:?}"),
    }
}
