//! Fault injection and TTL behaviour of the in-memory backend, on paused tokio time.

use std::time::Duration;

use futures::StreamExt;
use sd_core::{Event, Instancer, Registrar, RegistrationState, Service, TtlOption};
use sd_memory::{MemoryInstancer, MemoryRegistrar, MemoryStore};
use tokio::time::sleep;

fn leased(key: &str, value: &str) -> Service {
    let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(3)).expect("valid ttl");
    Service::new(key, value)
        .expect("valid service")
        .with_ttl(ttl)
}

#[tokio::test(start_paused = true)]
async fn registration_survives_an_outage_longer_than_its_ttl() {
    let store = MemoryStore::new();
    let reg = MemoryRegistrar::new(&store, leased("/svc/a/1", "127.0.0.1:1")).unwrap();
    reg.register().await.unwrap();
    let inst = MemoryInstancer::new(&store, "/svc/a/").unwrap();
    let mut events = inst.subscribe();
    assert_eq!(
        events.next().await,
        Some(Event::from_instances(["127.0.0.1:1"]))
    );

    store.set_available(false);
    assert!(events.next().await.unwrap().error().is_some());
    sleep(Duration::from_secs(5)).await;
    assert!(
        matches!(reg.state(), RegistrationState::Retrying(_)),
        "heartbeats fail while the store is down: {:?}",
        reg.state()
    );
    store.set_available(true);
    // The lease expired during the outage: the next heartbeat re-grants and re-puts.
    sleep(Duration::from_millis(1100)).await;
    assert!(reg.state().is_registered(), "state: {:?}", reg.state());
    assert_eq!(
        inst.subscribe().next().await,
        Some(Event::from_instances(["127.0.0.1:1"]))
    );
    assert_eq!(store.get_prefix("/svc/a/").unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn crashed_registrar_expires_at_its_ttl_not_before() {
    let store = MemoryStore::new();
    let reg = MemoryRegistrar::new(&store, leased("/svc/a/1", "127.0.0.1:1")).unwrap();
    reg.register().await.unwrap();
    // The last heartbeat before the crash is at t = 10 s, so the key expires at t = 13 s.
    sleep(Duration::from_millis(10_500)).await;
    assert_eq!(
        store.get_prefix("/svc/").unwrap().len(),
        1,
        "heartbeats keep it"
    );
    drop(reg);
    sleep(Duration::from_millis(2_400)).await;
    assert_eq!(
        store.get_prefix("/svc/").unwrap().len(),
        1,
        "not before the TTL"
    );
    sleep(Duration::from_millis(200)).await;
    assert!(
        store.get_prefix("/svc/").unwrap().is_empty(),
        "gone after the TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn break_watches_gives_an_error_then_the_recovered_set() {
    let store = MemoryStore::new();
    store.put("/svc/a/1", "127.0.0.1:1").unwrap();
    let inst = MemoryInstancer::new(&store, "/svc/a/").unwrap();
    let mut events = inst.subscribe();
    events.next().await;
    store.break_watches();
    assert!(events.next().await.unwrap().error().is_some());
    store.put("/svc/a/2", "127.0.0.1:2").unwrap();
    assert_eq!(
        events.next().await,
        Some(Event::from_instances(["127.0.0.1:1", "127.0.0.1:2"]))
    );
}

#[tokio::test]
async fn fail_next_fails_exactly_n_operations() {
    let store = MemoryStore::new();
    store.fail_next(2);
    let reg = MemoryRegistrar::new(&store, leased("/svc/a/1", "127.0.0.1:1")).unwrap();
    let err = reg.register().await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(MemoryInstancer::new(&store, "/svc/a/").is_err());
    reg.register().await.unwrap();
    assert!(reg.state().is_registered());
    assert!(reg.register().await.is_ok(), "register() is idempotent");
    assert_eq!(store.get_prefix("/svc/a/").unwrap().len(), 1);
}

#[tokio::test]
async fn invalid_services_are_refused() {
    let store = MemoryStore::new();
    let empty_key = Service {
        key: String::new(),
        value: "x".into(),
        ttl: None,
    };
    assert!(MemoryRegistrar::new(&store, empty_key).is_err());
    assert!(TtlOption::new(Duration::from_millis(499), Duration::from_secs(5)).is_err());
}

#[tokio::test(start_paused = true)]
async fn failed_deregister_keeps_the_registration_alive_until_a_retry() {
    let store = MemoryStore::new();
    let reg = MemoryRegistrar::new(&store, leased("/svc/a/1", "127.0.0.1:1")).unwrap();
    reg.register().await.unwrap();
    store.fail_next(1);
    assert!(reg.deregister().await.is_err());
    // Still registered: heartbeats go on well past the 3 s TTL, and register() stays a no-op.
    sleep(Duration::from_secs(10)).await;
    assert!(reg.state().is_registered(), "state: {:?}", reg.state());
    reg.register().await.unwrap();
    assert_eq!(store.get_prefix("/svc/a/").unwrap().len(), 1);
    reg.deregister().await.unwrap();
    assert!(store.get_prefix("/svc/a/").unwrap().is_empty());
    assert!(!reg.state().is_registered());
}

#[tokio::test(start_paused = true)]
async fn break_watches_alone_recovers_the_unchanged_set() {
    let store = MemoryStore::new();
    store.put("/svc/a/1", "127.0.0.1:1").unwrap();
    let inst = MemoryInstancer::new(&store, "/svc/a/").unwrap();
    let mut events = inst.subscribe();
    events.next().await;
    store.break_watches();
    assert!(events.next().await.unwrap().error().is_some());
    // No write in between: the "reconnect" alone publishes the set again.
    assert_eq!(
        events.next().await,
        Some(Event::from_instances(["127.0.0.1:1"]))
    );
}

#[tokio::test(start_paused = true)]
async fn a_ttl_too_long_to_represent_does_not_panic() {
    let store = MemoryStore::new();
    let ttl = TtlOption::new(Duration::from_secs(1), Duration::MAX).unwrap();
    let svc = Service::new("/svc/a/1", "127.0.0.1:1")
        .unwrap()
        .with_ttl(ttl);
    let reg = MemoryRegistrar::new(&store, svc).unwrap();
    reg.register().await.unwrap();
    sleep(Duration::from_secs(5)).await;
    assert!(reg.state().is_registered(), "state: {:?}", reg.state());
    assert_eq!(store.get_prefix("/svc/a/").unwrap().len(), 1);
}

/// Formatted log lines of every test of this binary, written where a test can read them.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// The process-wide subscriber's lines (at `info` and above). Global, not per test: a
    /// callsite first reached by a thread without a subscriber can be cached as disabled for
    /// every thread, so a thread-local subscriber misses events while other tests run.
    fn global() -> Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .init();
            logs
        })
        .clone()
    }

    /// The lines that contain `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

/// A store down for a few heartbeats: at `info` and above, the registrar's task says once that
/// its heartbeats fail and once that the registration recovered, in a span naming its key;
/// heartbeats before and after log nothing.
#[tokio::test(start_paused = true)]
async fn an_outage_is_one_warning_and_one_recovery_line_in_the_registrars_span() {
    let logs = Logs::global();
    let span = "memory_registrar{key=/svc/logged/1}";
    let store = MemoryStore::new();
    let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(10)).expect("valid ttl");
    let service = Service::new("/svc/logged/1", "127.0.0.1:1")
        .unwrap()
        .with_ttl(ttl);
    let reg = MemoryRegistrar::new(&store, service).unwrap();
    reg.register().await.unwrap();
    sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        logs.lines_with(span),
        Vec::<String>::new(),
        "quiet while well"
    );

    store.set_available(false);
    sleep(Duration::from_secs(4)).await;
    assert!(matches!(reg.state(), RegistrationState::Retrying(_)));
    store.set_available(true);
    sleep(Duration::from_secs(3)).await;
    assert!(reg.state().is_registered(), "{:?}", reg.state());

    let lines = logs.lines_with(span);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for (line, says) in lines.iter().zip([
        " WARN memory_registrar{key=/svc/logged/1}: sd_memory::registrar: heartbeat failed",
        " INFO memory_registrar{key=/svc/logged/1}: sd_memory::registrar: registration recovered",
    ]) {
        assert!(line.contains(says), "{line:?} does not say {says:?}");
    }
}
