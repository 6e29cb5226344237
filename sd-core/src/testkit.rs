//! The conformance kit: one set of async test cases that every backend must pass.
//!
//! A backend's tests implement [`Harness`] (how to get a registrar and an instancer, how to break
//! and heal the store) and expand [`conformance_tests!`](crate::conformance_tests), which writes
//! one `#[tokio::test]` per case. Each case is named after the rule of the
//! [`Registrar`] or [`Instancer`] contract it checks, and a
//! broken rule fails with ``conformance rule `<name>` violated: ...`` and what the store and the
//! stream held. Cases run in real time with the TTL the harness chooses, so the same kit runs
//! against an in-process store and a real etcd. Each case works under its own fresh prefix and
//! builds its own harness (the macro calls the harness expression once per case): a harness whose
//! [`break_store`](Harness::break_store) breaks a store other cases use makes them fail, so give
//! each harness its own store, or one that breaking affects alone.
//!
//! # Writing a backend
//! A backend is a registrar and an instancer over some store. The subscriber side of an
//! instancer comes from [`Publisher`](crate::Publisher): publish the prefix's set after each
//! change (a real backend keeps one [`InstanceSet`](crate::InstanceSet) and edits it, so a
//! change costs O(log N)). Below, a whole backend over a map (no TTL support, so the TTL cases
//! are left out) and its harness, run through some of the kit's cases:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::{Arc, Mutex};
//!
//! use async_trait::async_trait;
//! use sd_core::testkit::{self, Harness};
//! use sd_core::{
//!     Error, Event, EventStream, Instancer, Publisher, RegistrationState, Registrar, Service,
//!     TtlOption,
//! };
//!
//! /// The store: keys, whether it answers, and the watches to tell of changes.
//! #[derive(Clone, Default)]
//! struct Store(Arc<Mutex<Inner>>);
//!
//! #[derive(Default)]
//! struct Inner {
//!     keys: BTreeMap<String, String>,
//!     down: bool,
//!     watches: Vec<(String, Arc<Publisher>)>,
//! }
//!
//! impl Inner {
//!     fn read(&self, prefix: &str) -> Event {
//!         if self.down {
//!             return Event::Error(Error::backend_msg("store down"));
//!         }
//!         let under = self.keys.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix));
//!         Event::from_instances(under.map(|(_, v)| v.clone()))
//!     }
//!     fn tell(&self) {
//!         for (prefix, publisher) in &self.watches {
//!             publisher.publish(self.read(prefix));
//!         }
//!     }
//! }
//!
//! impl Store {
//!     fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
//!         self.0.lock().unwrap_or_else(|e| e.into_inner())
//!     }
//! }
//!
//! struct MapRegistrar { store: Store, service: Service, registered: Mutex<bool> }
//!
//! #[async_trait]
//! impl Registrar for MapRegistrar {
//!     async fn register(&self) -> Result<(), Error> {
//!         self.service.validate()?;
//!         let mut inner = self.store.inner();
//!         if inner.down {
//!             return Err(Error::backend_msg("store down"));
//!         }
//!         inner.keys.insert(self.service.key.clone(), self.service.value.clone());
//!         inner.tell();
//!         *self.registered.lock().unwrap() = true;
//!         Ok(())
//!     }
//!     async fn deregister(&self) -> Result<(), Error> {
//!         let mut inner = self.store.inner();
//!         // Only our own value: another registrar may have written the key since.
//!         if inner.keys.get(&self.service.key) == Some(&self.service.value) {
//!             inner.keys.remove(&self.service.key);
//!             inner.tell();
//!         }
//!         *self.registered.lock().unwrap() = false;
//!         Ok(())
//!     }
//!     fn state(&self) -> RegistrationState {
//!         match *self.registered.lock().unwrap() {
//!             true => RegistrationState::Registered,
//!             false => RegistrationState::Unregistered,
//!         }
//!     }
//! }
//!
//! struct MapInstancer(Arc<Publisher>);
//!
//! impl MapInstancer {
//!     fn new(store: &Store, prefix: &str) -> Result<Self, Error> {
//!         if !prefix.ends_with('/') {
//!             return Err(Error::invalid_argument(format!("prefix {prefix:?} must end in '/'")));
//!         }
//!         let mut inner = store.inner();
//!         let publisher = Arc::new(Publisher::new(inner.read(prefix)));
//!         inner.watches.push((prefix.to_string(), publisher.clone()));
//!         Ok(MapInstancer(publisher))
//!     }
//! }
//!
//! impl Instancer for MapInstancer {
//!     fn subscribe(&self) -> EventStream { self.0.subscribe() }
//!     fn stop(&self) { self.0.stop() }
//! }
//!
//! struct MapHarness(Store);
//!
//! #[async_trait]
//! impl Harness for MapHarness {
//!     fn ttl(&self) -> TtlOption {
//!         TtlOption::new(std::time::Duration::from_millis(500), std::time::Duration::from_secs(2)).unwrap()
//!     }
//!     async fn registrar(&self, service: Service) -> Result<Box<dyn Registrar>, Error> {
//!         Ok(Box::new(MapRegistrar { store: self.0.clone(), service, registered: Mutex::new(false) }))
//!     }
//!     async fn instancer(&self, prefix: &str) -> Result<Box<dyn Instancer>, Error> {
//!         Ok(Box::new(MapInstancer::new(&self.0, prefix)?))
//!     }
//!     async fn break_store(&self) {
//!         let mut inner = self.0.inner();
//!         inner.down = true;
//!         inner.tell();
//!     }
//!     async fn heal_store(&self) {
//!         let mut inner = self.0.inner();
//!         inner.down = false;
//!         inner.tell();
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! // In a backend's tests: `sd_core::conformance_tests!(async { MapHarness(Store::default()) });`
//! let h = MapHarness(Store::default());
//! testkit::registered_instance_is_seen(&h).await;
//! testkit::deregister_removes_only_our_value(&h).await;
//! testkit::register_is_idempotent(&h).await;
//! testkit::registered_means_readable(&h).await;
//! testkit::nested_keys_are_instances(&h).await;
//! testkit::prefix_must_end_in_slash(&h).await;
//! testkit::prefix_is_isolated(&h).await;
//! testkit::late_subscriber_gets_current_state(&h).await;
//! testkit::stop_ends_all_streams(&h).await;
//! testkit::stop_ends_background_work(&h).await;
//! testkit::store_error_reaches_subscribers(&h).await;
//! testkit::empty_key_or_value_is_refused(&h).await;
//! # }
//! ```

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use crate::{
    Error, Event, EventStream, Instancer, Registrar, RegistrationState, Service, TtlOption,
};

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
    let seen = |last: Option<Event>| match last {
        Some(ev) => format!("the last event read was {ev:?}"),
        None => String::from(
            "no event arrived while waiting (the state read before the wait did not match either)",
        ),
    };
    match tokio::time::timeout(timeout, search).await {
        Ok(Some(ev)) => ev,
        Ok(None) => panic!("waiting for {what}: the stream ended; {}", seen(last)),
        Err(_) => panic!(
            "waiting for {what}: not seen within {timeout:?}; {}",
            seen(last)
        ),
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
    assert_eq!(
        first,
        Some(Some(Event::from_instances(["127.0.0.1:1010"]))),
        "a new instancer's first item must be the current state of the store, ready at once"
    );
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

/// Panics with the message every rule violation carries: the rule's name (the case's) and what
/// the store and the stream held.
#[track_caller]
pub fn violated(rule: &str, details: impl std::fmt::Display) -> ! {
    panic!("conformance rule `{rule}` violated: {details}")
}

/// Runs one case and makes any failure of it name `rule`: a panic that does not already say
/// which rule it broke (a failed wait, a failed call) is raised again as
/// ``conformance rule `<rule>` violated: <message>``. [`conformance_tests!`](crate::conformance_tests)
/// runs every case through it.
///
/// ```
/// use futures::FutureExt;
///
/// # futures::executor::block_on(async {
/// let failed = sd_core::testkit::check("some_rule", async { panic!("not seen") })
///     .catch_unwind()
///     .await
///     .unwrap_err();
/// let message = failed.downcast_ref::<String>().unwrap();
/// assert_eq!(message, "conformance rule `some_rule` violated: not seen");
/// # });
/// ```
pub async fn check<F: std::future::Future<Output = ()>>(rule: &str, case: F) {
    if let Err(panic) = std::panic::AssertUnwindSafe(case).catch_unwind().await {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        match message {
            Some(m) if !m.starts_with("conformance rule `") => violated(rule, m),
            _ => std::panic::resume_unwind(panic),
        }
    }
}

/// The first item of a fresh instancer of `prefix` (what the store holds now).
async fn current<H: Harness + ?Sized>(h: &H, prefix: &str) -> Option<Event> {
    let fresh = instancer(h, prefix).await;
    let first = fresh.subscribe().next().now_or_never().flatten();
    fresh.stop();
    first
}

/// Polls `state()` until `pred` holds, for at most `timeout`; the last state otherwise.
async fn state_becomes(
    r: &dyn Registrar,
    timeout: Duration,
    pred: impl Fn(&RegistrationState) -> bool,
) -> Result<(), RegistrationState> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = r.state();
        if pred(&state) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(state);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rule: `deregister()` removes the key for good. Nothing of the registrar's (a heartbeat left
/// running, a retry) puts it back.
pub async fn deregister_is_final<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "deregister_is_final";
    let prefix = unique_prefix("final");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1040", true).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1040"]).await;
    expect_ok(r.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
    // Three heartbeats: a heartbeat still running would have put the key back by then.
    let window = h.ttl().heartbeat() * 3;
    let back = tokio::time::timeout(window, async {
        while let Some(ev) = s.next().await {
            if ev.instances().is_some_and(|i| !i.is_empty()) {
                return Some(ev);
            }
        }
        None
    })
    .await;
    if let Ok(Some(ev)) = back {
        violated(
            RULE,
            format!("the key came back after deregister() returned: {ev:?}"),
        );
    }
    match current(h, &prefix).await {
        Some(ev) if ev == Event::empty() => {}
        other => violated(
            RULE,
            format!("{window:?} after deregister() the store holds {other:?}"),
        ),
    }
    if r.state().is_registered() {
        violated(
            RULE,
            format!("state() after deregister() is {:?}", r.state()),
        );
    }
}

/// Rule: a registration that cannot be kept alive says so (`state()` leaves `Registered`
/// within the harness's timeout of the store breaking), keeps trying, and is `Registered` and
/// readable again once the store heals.
pub async fn failing_heartbeat_is_reported<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "failing_heartbeat_is_reported";
    let prefix = unique_prefix("beat");
    let r = registrar(h, &prefix, "127.0.0.1:1041", true).await;
    if let Err(state) = state_becomes(&*r, h.timeout(), RegistrationState::is_registered).await {
        violated(RULE, format!("state() after register() is {state:?}"));
    }
    h.break_store().await;
    if let Err(state) = state_becomes(&*r, h.timeout(), |s| !s.is_registered()).await {
        violated(
            RULE,
            format!(
                "the store has been broken for {:?} and state() still says {state:?}",
                h.timeout()
            ),
        );
    }
    h.heal_store().await;
    let limit = h.timeout() + h.ttl().ttl();
    if let Err(state) = state_becomes(&*r, limit, RegistrationState::is_registered).await {
        violated(
            RULE,
            format!("{limit:?} after the store healed, state() is {state:?}"),
        );
    }
    match current(h, &prefix).await {
        Some(ev) if ev == Event::from_instances(["127.0.0.1:1041"]) => {}
        other => violated(
            RULE,
            format!(
                "state() says Registered after the store healed, but the store holds {other:?}"
            ),
        ),
    }
    expect_ok(r.deregister().await, "deregister()");
}

/// Rule: `deregister()` removes only this registrar's own value: a key another registrar has
/// since written stays.
pub async fn deregister_removes_only_our_value<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "deregister_removes_only_our_value";
    let prefix = unique_prefix("ours");
    let key = format!("{prefix}shared");
    let make = |value: &'static str| {
        let svc = expect_ok(Service::new(&key, value), "Service::new").with_ttl(h.ttl());
        h.registrar(svc)
    };
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let first = expect_ok(make("127.0.0.1:1042").await, "creating a registrar");
    expect_ok(first.register().await, "register()");
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1042"]).await;
    let second = expect_ok(make("127.0.0.1:1043").await, "creating a registrar");
    expect_ok(second.register().await, "register()");
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1043"]).await;
    // Its result is the backend's to choose; the other registrar's value must stay.
    let result = first.deregister().await;
    tokio::time::sleep(h.ttl().heartbeat() * 2).await;
    match current(h, &prefix).await {
        Some(ev) if ev == Event::from_instances(["127.0.0.1:1043"]) => {}
        other => violated(
            RULE,
            format!(
                "the first registrar's deregister() (which returned {result:?}) left the store \
                 holding {other:?}, not the second registrar's value"
            ),
        ),
    }
    expect_ok(second.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
}

/// Rule: `stop()` ends every background task the instancer started (measured with tokio's
/// count of alive tasks on the case's own runtime).
pub async fn stop_ends_background_work<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "stop_ends_background_work";
    let metrics = tokio::runtime::Handle::current().metrics();
    // A first instancer brings up whatever the harness's client keeps for its whole life (a
    // connection's tasks): those are not the instancer's.
    let warm = instancer(h, &unique_prefix("warm")).await;
    warm.stop();
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = metrics.num_alive_tasks();
    let prefix = unique_prefix("tasks");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let _r = registrar(h, &prefix, "127.0.0.1:1048", false).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1048"]).await;
    drop(_r);
    let during = metrics.num_alive_tasks();
    inst.stop();
    let deadline = tokio::time::Instant::now() + h.timeout();
    loop {
        let now = metrics.num_alive_tasks();
        if now <= before {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            violated(
                RULE,
                format!(
                    "{now} tasks alive {:?} after stop(), {during} while it ran, {before} before \
                     it was made",
                    h.timeout()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
}

/// Rule: on a healthy store an instancer sends no error event and never the same state twice
/// in a row (watched for three seconds).
pub async fn no_spurious_events<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "no_spurious_events";
    let prefix = unique_prefix("quiet");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1044", true).await;
    let mut last = eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1044"]).await;
    let watch = async {
        while let Some(ev) = s.next().await {
            if ev.error().is_some() {
                violated(RULE, format!("an error event on a healthy store: {ev:?}"));
            }
            if ev == last {
                violated(RULE, format!("the same state sent twice in a row: {ev:?}"));
            }
            last = ev;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), watch).await;
    expect_ok(r.deregister().await, "deregister()");
}

/// Rule: keys nested below the prefix are instances too (`/svc/a/x/y` is under `/svc/a/`).
pub async fn nested_keys_are_instances<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "nested_keys_are_instances";
    let prefix = unique_prefix("nested");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(
        h,
        &format!("{prefix}zone-a/rack-1/"),
        "127.0.0.1:1045",
        false,
    )
    .await;
    let ev = eventually(&mut s, h.timeout(), "the nested instance", |ev| {
        ev.instances().is_some_and(|i| !i.is_empty())
    })
    .await;
    if ev != Event::from_instances(["127.0.0.1:1045"]) {
        violated(
            RULE,
            format!("a key two levels below the prefix showed as {ev:?}"),
        );
    }
    expect_ok(r.deregister().await, "deregister()");
}

/// Rule: a prefix must end in `/` (or `/svc/a` would also watch `/svc/ab/...`): anything else is
/// refused with `InvalidArgument`.
pub async fn prefix_must_end_in_slash<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "prefix_must_end_in_slash";
    let prefix = unique_prefix("slash");
    let without = prefix.trim_end_matches('/');
    match h.instancer(without).await {
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => violated(
            RULE,
            format!("prefix {without:?} was refused, but not as InvalidArgument: {e:?}"),
        ),
        Ok(inst) => {
            inst.stop();
            violated(
                RULE,
                format!("prefix {without:?} (no trailing '/') was accepted"),
            )
        }
    }
}

/// Rule: `register()` is idempotent: a second call succeeds and changes nothing, and one
/// `deregister()` then removes the instance.
pub async fn register_is_idempotent<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "register_is_idempotent";
    let prefix = unique_prefix("twice");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let r = registrar(h, &prefix, "127.0.0.1:1046", true).await;
    if let Err(e) = r.register().await {
        violated(RULE, format!("a second register() failed: {e:?}"));
    }
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1046"]).await;
    if let Err(state) = state_becomes(&*r, h.timeout(), RegistrationState::is_registered).await {
        violated(
            RULE,
            format!("state() after two register() calls is {state:?}"),
        );
    }
    expect_ok(r.deregister().await, "deregister()");
    eventually_instances(&mut s, h.timeout(), &[]).await;
    tokio::time::sleep(h.ttl().heartbeat() * 2).await;
    match current(h, &prefix).await {
        Some(ev) if ev == Event::empty() => {}
        other => violated(
            RULE,
            format!("after two register() calls and one deregister() the store holds {other:?}"),
        ),
    }
}

/// Rule: once `register()` has returned `Ok` and `state()` says `Registered`, the key is
/// readable: a new instancer's first item lists it.
pub async fn registered_means_readable<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "registered_means_readable";
    let prefix = unique_prefix("readable");
    let r = registrar(h, &prefix, "127.0.0.1:1047", true).await;
    let state = r.state();
    let first = current(h, &prefix).await;
    let want = Event::from_instances(["127.0.0.1:1047"]);
    if state.is_registered() && first.as_ref() != Some(&want) {
        violated(
            RULE,
            format!("state() said {state:?} but a new instancer's first item was {first:?}"),
        );
    }
    if !state.is_registered() && first.as_ref() != Some(&want) {
        // Registered may come later, but then the key must be there by the time it does.
        if let Err(state) = state_becomes(&*r, h.timeout(), RegistrationState::is_registered).await
        {
            violated(
                RULE,
                format!("state() after register() returned is {state:?}"),
            );
        }
        let first = current(h, &prefix).await;
        if first.as_ref() != Some(&want) {
            violated(
                RULE,
                format!("state() said Registered but a new instancer's first item was {first:?}"),
            );
        }
    }
    expect_ok(r.deregister().await, "deregister()");
}

/// Rule: after the store heals, an instancer follows what the store holds *now*: a key that
/// went away while the store was unreachable is gone from its set (the instancer reads the
/// store again rather than keeping its old set).
pub async fn healed_store_is_reread<H: Harness + ?Sized>(h: &H) {
    const RULE: &str = "healed_store_is_reread";
    let prefix = unique_prefix("reread");
    let inst = instancer(h, &prefix).await;
    let mut s = inst.subscribe();
    let keep = registrar(h, &prefix, "127.0.0.1:1049", false).await;
    let crash = registrar(h, &prefix, "127.0.0.1:1050", true).await;
    eventually_instances(&mut s, h.timeout(), &["127.0.0.1:1049", "127.0.0.1:1050"]).await;
    h.crash(crash).await;
    h.break_store().await;
    // The crashed registration's TTL runs out while the store is down (or, for a store that
    // stops its clocks while down, right after it comes back).
    tokio::time::sleep(h.ttl().ttl() * 2).await;
    h.heal_store().await;
    let limit = h.timeout() + h.ttl().ttl() * 2;
    let want = Event::from_instances(["127.0.0.1:1049"]);
    let seen = tokio::time::timeout(limit, async {
        let mut last = None;
        while let Some(ev) = s.next().await {
            if ev == want {
                return Ok(());
            }
            last = Some(ev);
        }
        Err(last)
    })
    .await;
    match seen {
        Ok(Ok(())) => {}
        Ok(Err(last)) => violated(RULE, format!("the stream ended; last event {last:?}")),
        Err(_) => violated(
            RULE,
            format!(
                "{limit:?} after the store healed, the instancer still does not show what the \
                 store holds ({:?}); its current state is {:?}",
                current(h, &prefix).await,
                inst.subscribe().next().now_or_never().flatten()
            ),
        ),
    }
    expect_ok(keep.deregister().await, "deregister()");
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
            deregister_is_final,
            failing_heartbeat_is_reported,
            deregister_removes_only_our_value,
            stop_ends_background_work,
            no_spurious_events,
            nested_keys_are_instances,
            prefix_must_end_in_slash,
            register_is_idempotent,
            registered_means_readable,
            healed_store_is_reread,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $harness.await;
                $crate::testkit::check(
                    ::core::stringify!($case),
                    $crate::testkit::$case(&harness),
                )
                .await;
            }
        )*
    };
}
