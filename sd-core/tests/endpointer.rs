//! The default endpointer's contract: factory once per new instance, closers exactly once, last
//! good endpoints kept on errors, invalidation after a timeout, restoration on recovery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_core::{
    Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event, Instance, Publisher,
};

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

/// The endpoints, sorted (slot order is not instance order once the set has changed).
fn names(e: &impl Endpointer<String>) -> Vec<String> {
    let mut names = e.snapshot().endpoints().to_vec();
    names.sort();
    names
}

#[tokio::test(flavor = "current_thread")]
async fn first_event_is_applied_before_new_returns() {
    let inst = Publisher::new(Event::from_instances(["a", "b"]));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    assert_eq!(names(&e), ["ep:a", "ep:b"]);
    assert_eq!(e.snapshot().instances().len(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn factory_once_per_instance_and_closers_exactly_once() {
    let inst = Publisher::new(Event::from_instances(["a", "b"]));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    let v1 = e.version();

    inst.publish(Event::from_instances(["b", "c"]));
    settle().await;
    assert_eq!(names(&e), ["ep:b", "ep:c"]);
    assert!(e.version() > v1);
    assert_eq!(
        (counts.made("a"), counts.made("b"), counts.made("c")),
        (1, 1, 1)
    );
    assert_eq!((counts.closed("a"), counts.closed("b")), (1, 0));

    inst.publish(Event::from_instances(["a", "b", "c"]));
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
    let inst = Publisher::new(Event::from_instances(["bad1", "good"]));
    let counts = Counts::default();
    counts.fail_bad.store(1, Ordering::SeqCst);
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    assert_eq!(
        names(&e),
        ["ep:good"],
        "the failing instance is skipped, the rest served"
    );

    counts.fail_bad.store(0, Ordering::SeqCst);
    inst.publish(Event::from_instances(["bad1", "good", "other"]));
    settle().await;
    assert_eq!(names(&e), ["ep:bad1", "ep:good", "ep:other"]);
}

/// The same for an instance stored as JSON (its address differs from its stored value).
#[tokio::test(flavor = "current_thread")]
async fn a_failed_instance_with_metadata_is_retried_too() {
    use sd_core::{InstanceSet, Metadata, ValueFormat};
    let fails = Arc::new(AtomicUsize::new(1));
    let f = fails.clone();
    let factory = sd_core::factory(move |i| {
        if f.load(Ordering::SeqCst) > 0 {
            f.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::factory(i, std::io::Error::other("not yet")));
        }
        Ok((i.addr().to_string(), None))
    });
    let json = Instance::with_metadata("10.0.0.1:80", Metadata::new(), ValueFormat::Json).unwrap();
    let mut set: InstanceSet = [json].into_iter().collect();
    let inst = Publisher::new(Event::Instances(set.clone()));
    let e = DefaultEndpointer::new(&inst, factory, EndpointerOptions::new()).await;
    assert!(e.endpoints().is_err(), "the first factory call failed");
    set.insert("other:1");
    inst.publish(Event::Instances(set));
    let snap = tokio::time::timeout(
        Duration::from_secs(5),
        e.wait_until(|s| s.endpoints().len() == 2),
    )
    .await
    .unwrap_or_else(|_| panic!("the failed instance was not retried: {:?}", e.snapshot()));
    let mut got = snap.endpoints().to_vec();
    got.sort();
    assert_eq!(got, ["10.0.0.1:80", "other:1"]);
}

#[tokio::test(flavor = "current_thread")]
async fn error_keeps_last_endpoints_by_default() {
    let inst = Publisher::new(Event::from_instances(["a"]));
    let counts = Counts::default();
    let e = DefaultEndpointer::new(&inst, counts.factory(), EndpointerOptions::new()).await;
    inst.publish(Event::Error(Error::backend_msg("store down")));
    settle().await;
    assert_eq!(e.endpoints().unwrap(), ["ep:a"]);
    assert!(e.snapshot().error().is_some(), "the error is visible");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(counts.closed("a"), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn invalidate_on_error_drops_endpoints_after_timeout_and_recovery_restores() {
    let inst = Publisher::new(Event::from_instances(["a", "b"]));
    let counts = Counts::default();
    let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_secs(5));
    let e = DefaultEndpointer::new(&inst, counts.factory(), opts).await;

    inst.publish(Event::Error(Error::backend_msg("store down")));
    settle().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A second, different error must not restart the timer.
    inst.publish(Event::Error(Error::backend_msg("still down")));
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

    inst.publish(Event::from_instances(["a"]));
    settle().await;
    assert_eq!(e.endpoints().unwrap(), ["ep:a"]);
    assert_eq!(counts.made("a"), 2, "restored through the factory");
    assert!(e.snapshot().error().is_none());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn recovery_before_timeout_cancels_invalidation() {
    let inst = Publisher::new(Event::from_instances(["a"]));
    let counts = Counts::default();
    let opts = EndpointerOptions::new().invalidate_on_error(Duration::from_secs(1));
    let e = DefaultEndpointer::new(&inst, counts.factory(), opts).await;
    inst.publish(Event::Error(Error::backend_msg("blip")));
    settle().await;
    inst.publish(Event::from_instances(["a"]));
    settle().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(e.endpoints().unwrap(), ["ep:a"]);
    assert_eq!(counts.closed("a"), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn stopped_instancer_gives_no_endpoints_with_stopped() {
    let inst = Publisher::new(Event::empty());
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

/// The factory is user code and runs outside the endpointer's lock: dropping the endpointer does
/// not wait for a factory call in progress (which might be waiting on the dropping thread), and
/// an endpoint made after the drop is closed at once, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_does_not_wait_for_a_factory_in_progress() {
    let inst = Publisher::new(Event::from_instances(["a"]));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
    let released = Arc::new(AtomicBool::new(false));
    let closed_slow = Arc::new(AtomicUsize::new(0));
    let (r, c) = (released.clone(), closed_slow.clone());
    let factory = move |i: &Instance| -> Result<(String, Option<Closer>), Error> {
        let slow = i.as_str() == "slow";
        if slow {
            let _ = entered_tx.lock().unwrap().send(());
            let rx = release_rx.lock().unwrap();
            r.store(
                rx.recv_timeout(Duration::from_secs(10)).is_ok(),
                Ordering::SeqCst,
            );
        }
        let c = c.clone();
        let closer: Closer = Box::new(move || {
            if slow {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        Ok((i.to_string(), Some(closer)))
    };
    let e = DefaultEndpointer::new(&inst, factory, EndpointerOptions::new()).await;
    inst.publish(Event::from_instances(["a", "slow"]));
    tokio::task::spawn_blocking(move || entered_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the factory is called for the new instance");
    drop(e);
    let _ = release_tx.send(());
    let waited = async {
        while closed_slow.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), waited)
        .await
        .expect("the endpoint made after the drop is closed");
    assert!(
        released.load(Ordering::SeqCst),
        "drop() waited for the factory to give up"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(closed_slow.load(Ordering::SeqCst), 1, "closed exactly once");
}

/// A timeout too long to represent never fires; it must not panic the endpointer's task.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn invalidate_on_error_with_a_huge_timeout_never_invalidates() {
    let inst = Publisher::new(Event::from_instances(["a"]));
    let counts = Counts::default();
    let opts = EndpointerOptions::new().invalidate_on_error(Duration::MAX);
    let e = DefaultEndpointer::new(&inst, counts.factory(), opts).await;
    inst.publish(Event::Error(Error::backend_msg("down")));
    settle().await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(e.endpoints().unwrap(), ["ep:a"]);
    inst.publish(Event::from_instances(["a", "b"]));
    settle().await;
    assert_eq!(names(&e), ["ep:a", "ep:b"], "the endpointer still follows");
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_factory_skips_the_instance_and_keeps_following() {
    let inst = Publisher::new(Event::from_instances(["boom", "good"]));
    let factory = |i: &Instance| -> Result<(String, Option<Closer>), Error> {
        if i.as_str() == "boom" {
            panic!("factory bug");
        }
        Ok((format!("ep:{i}"), None))
    };
    let e = DefaultEndpointer::new(&inst, factory, EndpointerOptions::new()).await;
    assert_eq!(names(&e), ["ep:good"]);
    inst.publish(Event::from_instances(["boom", "good", "later"]));
    settle().await;
    assert_eq!(
        names(&e),
        ["ep:good", "ep:later"],
        "the task survived the panic"
    );
}
