//! The conformance kit: one set of async test cases that every backend must pass.
//!
//! A backend's tests implement [`Harness`] (how to get a registrar and an instancer, how to break
//! and heal the store) and expand [`conformance_tests!`](crate::conformance_tests), which writes
//! one `#[tokio::test]` per case. Cases run in real time with the TTL the harness chooses, so the
//! same kit runs against an in-process store and a real etcd. Each case works under its own
//! fresh prefix, so cases may run in parallel against one store.
//!
//! ```text
//! struct MyHarness { /* a store */ }
//! #[async_trait::async_trait]
//! impl sd_core::testkit::Harness for MyHarness { /* ... */ }
//!
//! sd_core::conformance_tests!(async { MyHarness::new().await });
//! ```

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use crate::{Error, Event, EventStream, Instancer, Registrar, Service, TtlOption};

/// What the kit needs from a backend.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The TTL the kit registers with; short, so expiry tests are quick (e.g. 500 ms heartbeat,
    /// 1 s TTL for an in-process store; etcd rounds TTLs up to whole seconds).
    fn ttl(&self) -> TtlOption;

    /// How long the kit waits for the store to reflect a change before failing.
    fn timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// A registrar for `service` (not yet registered).
    async fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error>;

    /// An instancer watching `prefix` (which ends in `/`), already holding the current state.
    async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error>;

    /// Makes `registrar` stop heart-beating without deregistering, as a crashed process would.
    /// The default drops it: right for a registrar that, dropped, leaves its key to expire
    /// (`sd-memory`'s; `sd-etcd`'s built `with_revoke_on_drop(false)`). Override it for one
    /// that deletes or revokes on drop, or the TTL case passes without any TTL expiring.
    async fn crash(&self, registrar: Box<dyn Registrar>) {
        drop(registrar);
    }

    /// Makes the store fail: instancers must report an error event.
    async fn break_store(&self);

    /// Ends what [`break_store`](Self::break_store) started: instancers must recover.
    async fn heal_store(&self);
}

/// A prefix no other case (in this or another process) uses: `/sd-kit/<name>-<unique>/`.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "/sd-kit/{name}-{}-{nanos}-{}/",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads `stream` until an event satisfies `pred`, for at most `timeout`; panics with the last
/// event seen otherwise. Returns the matching event.
pub async fn eventually<P>(
    stream: &mut EventStream,
    timeout: Duration,
    what: &str,
    pred: P,
) -> Event
where
    P: Fn(&Event) -> bool,
{
    let mut last: Option<Event> = None;
    let search = async {
        while let Some(ev) = stream.next().await {
            if pred(&ev) {
                return Some(ev);
            }
            last = Some(ev);
        }
        None
    };
    match tokio::time::timeout(timeout, search).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("waiting for {what}: the stream ended; last event: {last:?}"),
        Err(_) => panic!("waiting for {what}: not seen within {timeout:?}; last event: {last:?}"),
    }
}

/// Waits until the stream's state is exactly `expected` (as a set of instance strings).
pub async fn eventually_instances(
    stream: &mut EventStream,
    timeout: Duration,
    expected: &[&str],
) -> Event {
    let want = Event::from_instances(expected.iter().copied());
    let what = format!("instances {expected:?}");
    eventually(stream, timeout, &what, |ev| *ev == want).await
}

fn expect_ok<T, E: Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

async fn registrar<H: Harness + ?Sized>(
    h: &H,
    prefix: &str,
    instance: &str,
    ttl: bool,
) -> Box<dyn Registrar> {
    let mut svc = expect_ok(
        Service::new(format!("{prefix}{instance}"), instance),
        "Service::new",
    );
    if ttl {
        svc = svc.with_ttl(h.ttl());
    }
    let r = expect_ok(h.registrar(svc).await, "creating a registrar");
    expect_ok(r.register().await, "register()");
    r
}

async fn instancer<H: Harness + ?Sized>(h: &H, prefix: &str) -> Box<dyn Instancer> {
    expect_ok(h.instancer(prefix).await, "creating an instancer")
}

/// A registered instance is seen by an instancer of its prefix.
pub async fn registered_instance_is_seen<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("seen");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    eventually_instances(&mut s, h.timeout(), &[]).await;
    let _r = registrar(h, &prefix, "127.0.0.1:1001", true).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1001"]).await;
}

/// A deregistered instance disappears, and `deregister()` is idempotent.
pub async fn deregistered_instance_is_gone<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("gone");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1002", true).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1002"]).await;
    expect_ok(r.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
    expect_ok(r.deregister().await, "a second deregister()");
    assert!(
        !r.state().is_registered(),
        "state after deregister: {:?}",
        r.state()
    );
}

/// Several instances, with and without TTL, are all seen; removing one leaves the others.
pub async fn several_instances<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("several");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let a = registrar(h, &prefix, "127.0.0.1:1003", true).await;
    let _b = registrar(h, &prefix, "127.0.0.1:1004", false).await;
    let _c = registrar(h, &prefix, "127.0.0.1:1005", true).await;
    eventually_instances(
        &mut s,
        h.timeout(),
        &["127.0.0.1:1003", "127.0.0.1:1004", "127.0.0.1:1005"],
    )
    .await;
    expect_ok(a.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1004", "127.0.0.1:1005"]).await;
    expect_ok(_b.deregister().await, "deregister()");
}

/// A registration kept alive by heartbeats outlives its TTL; once its registrar crashes (stops
/// heart-beating without deregistering), the store expires it.
pub async fn ttl_expiry_removes_crashed_instance<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("ttl");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let keep = registrar(h, &prefix, "127.0.0.1:1006", true).await;
    let crash = registrar(h, &prefix, "127.0.0.1:1007", true).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1006", "127.0.0.1:1007"]).await;
    // Heartbeats must keep both alive well past one TTL.
    tokio::time::sleep(h.ttl().ttl() * 2).await;
    let now = s.next().now_or_never();
    let current = inst.subscribe().next().await;
    assert_eq!(
        current,
        Some(Event::from_instances(["127.0.0.1:1006", "127.0.0.1:1007"])),
        "heart-beated registrations must outlive their TTL (last streamed: {now:?})"
    );
    h.crash(crash).await;
    let limit = h.timeout() + h.ttl().ttl() * 2;
    eventually_instances(&mut s, limit, &["127.0.0.1:1006"]).await;
    assert!(keep.state().is_registered(), "state: {:?}", keep.state());
    expect_ok(keep.deregister().await, "deregister()");
}

/// Registering a key again with another value replaces the value.
pub async fn reregister_replaces_value<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("replace");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let key = format!("{prefix}slot");
    let first = expect_ok(
        h.registrar(expect_ok(
            Service::new(&key, "127.0.0.1:1008"),
            "Service::new",
        ))
        .await,
        "creating a registrar",
    );
    expect_ok(first.register().await, "register()");
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1008"]).await;
    let second = expect_ok(
        h.registrar(
            expect_ok(Service::new(&key, "127.0.0.1:1009"), "Service::new").with_ttl(h.ttl()),
        )
        .await,
        "creating a registrar",
    );
    expect_ok(second.register().await, "register()");
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1009"]).await;
    expect_ok(second.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
}

/// A subscriber that joins late gets the current state as its first item, at once.
pub async fn late_subscriber_gets_current_state<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("late");
    let inst = instancer(h, &prefix).await;
    let mut early = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1010", true).await;
    eventually_instances(&mut early, h.timeout(), &["127.0.0.1:1010"]).await;
    let mut late = inst.subscribe();
    let first = late.next().now_or_never();
    assert_eq!(
        first,
        Some(Some(Event::from_instances(["127.0.0.1:1010"]))),
        "a new subscriber's first item must be the current state, ready at once"
    );
    // A new instancer, too, starts from the current state.
    let fresh = instancer(h, &prefix).await;
    let first = fresh.subscribe().next().now_or_never();
    assert_eq!(first, Some(Some(Event::from_instances(["127.0.0.1:1010"]))));
    expect_ok(r.deregister().await, "deregister()");
}

/// One hundred subscribers of one instancer all converge on the same set.
pub async fn many_subscribers_converge<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("many");
    let inst = instancer(h, &prefix).await;
    let mut subs: Vec<EventStream> = (0..100).map(|_| inst.subscribe()).collect();
    let mut regs = Vec::new();
    for port in 1011..1014 {
        regs.push(registrar(h, &prefix, &format!("127.0.0.1:{port}"), true).await);
    }
    let want = ["127.0.0.1:1011", "127.0.0.1:1012", "127.0.0.1:1013"];
    let timeout = h.timeout();
    futures::future::join_all(
        subs.iter_mut()
            .map(|s| eventually_instances(s, timeout, &want)),
    )
    .await;
    for r in regs {
        expect_ok(r.deregister().await, "deregister()");
    }
}

/// A subscriber that never reads delays neither the instancer nor the other subscribers.
pub async fn idle_subscriber_does_not_delay_others<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("idle");
    let inst = instancer(h, &prefix).await;
    let _idle = inst.subscribe();
    let mut active = inst.subscribe();
    let mut regs = Vec::new();
    for port in 1100..1120 {
        regs.push(registrar(h, &prefix, &format!("127.0.0.1:{port}"), false).await);
    }
    let names: Vec<String> = (1100..1120).map(|p| format!("127.0.0.1:{p}")).collect();
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    eventually_instances(&mut active, h.timeout(), &want).await;
    for r in regs {
        expect_ok(r.deregister().await, "deregister()");
    }
    eventually_instances(&mut active, h.timeout(), &[]).await;
}

/// `stop()` ends every stream, and subscribing afterwards gives a stream that ends at once.
pub async fn stop_ends_all_streams<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("stop");
    let inst = instancer(h, &prefix).await;
    let mut a = inst.subscribe();
    let mut b = inst.subscribe();
    assert!(a.next().await.is_some());
    inst.stop();
    let ends = async {
        assert!(a.next().await.is_none(), "stream a must end after stop()");
        while b.next().await.is_some() {}
    };
    expect_ok(
        tokio::time::timeout(h.timeout(), ends).await,
        "streams ending after stop()",
    );
    let after = inst.subscribe().next().now_or_never();
    assert_eq!(
        after,
        Some(None),
        "subscribe() after stop() must end at once"
    );
    inst.stop();
}

/// A store failure reaches subscribers as an error event; recovery replaces it with the set.
pub async fn store_error_reaches_subscribers<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("fault");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1021", false).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1021"]).await;
    h.break_store().await;
    eventually(&mut s, h.timeout(), "an error event", |ev| {
        ev.error().is_some()
    })
    .await;
    h.heal_store().await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1021"]).await;
    expect_ok(r.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
}

/// An instancer of `/x/a/` never sees keys of `/x/ab/`.
pub async fn prefix_is_isolated<H: Harness + ?Sized>(h: &H) {
    let base = unique_prefix("prefix");
    let a = format!("{base}a/");
    let ab = format!("{base}ab/");
    let inst = instancer(h, &a).await;
    let mut s = inst.subscribe();
    let _other = registrar(h, &ab, "127.0.0.1:1031", false).await;
    let _mine = registrar(h, &a, "127.0.0.1:1030", false).await;
    let ev = eventually(&mut s, h.timeout(), "the instance under /a/", |ev| {
        ev.instances().is_some_and(|i| !i.is_empty())
    })
    .await;
    assert_eq!(ev, Event::from_instances(["127.0.0.1:1030"]));
    let current = inst.subscribe().next().await;
    assert_eq!(current, Some(Event::from_instances(["127.0.0.1:1030"])));
    expect_ok(_other.deregister().await, "deregister()");
    expect_ok(_mine.deregister().await, "deregister()");
}

/// Bad input gets an error, not a panic: registering a service whose fields were emptied.
pub async fn empty_key_or_value_is_refused<H: Harness + ?Sized>(h: &H) {
    let prefix = unique_prefix("bad");
    for (key, value) in [(String::new(), "x"), (format!("{prefix}k"), "")] {
        let svc = Service {
            key,
            value: value.to_string(),
            ttl: None,
        };
        let result = match h.registrar(svc).await {
            Ok(r) => r.register().await,
            Err(e) => Err(e),
        };
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "expected InvalidArgument, got {result:?}"
        );
    }
}

/// Expands to one `#[tokio::test]` per conformance case. The argument is an expression that
/// evaluates to a future of the harness (e.g. `async { MyHarness::new().await }`); each test
/// builds its own. The calling crate needs `tokio` (features `macros`, `rt-multi-thread`) among
/// its dev-dependencies: the tests run on a two-worker multi-threaded runtime.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@cases $harness;
            registered_instance_is_seen,
            deregistered_instance_is_gone,
            several_instances,
            ttl_expiry_removes_crashed_instance,
            reregister_replaces_value,
            late_subscriber_gets_current_state,
            many_subscribers_converge,
            idle_subscriber_does_not_delay_others,
            stop_ends_all_streams,
            store_error_reaches_subscribers,
            prefix_is_isolated,
            empty_key_or_value_is_refused,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $harness.await;
                $crate::testkit::$case(&harness).await;
            }
        )*
    };
}
