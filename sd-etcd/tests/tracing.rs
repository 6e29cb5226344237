//! What sd's background tasks log, on a real etcd, captured by a `tracing` layer: nothing at
//! `info` or above while all is well; for an outage (etcd killed for 3 s, then started again on
//! the same ports), exactly one warning when it starts and one `info` line when it ends, per
//! task, inside a span that says which prefix, lease or endpointer the task serves.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sd_core::{endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions, Registrar, Service};
use sd_core::{Instancer, TtlOption};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{EtcdInstancer, EtcdRegistrar};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as an event saw it: its name, level and fields.
#[derive(Debug, Clone)]
struct SpanSeen {
    name: &'static str,
    level: Level,
    fields: BTreeMap<String, String>,
}

/// One event: its level, target, message and the spans it was in (outermost first).
#[derive(Debug, Clone)]
struct Line {
    level: Level,
    target: String,
    message: String,
    spans: Vec<SpanSeen>,
}

impl Line {
    /// The innermost of the spans sd's tasks run in.
    fn task(&self) -> Option<&SpanSeen> {
        self.spans
            .iter()
            .rev()
            .find(|s| s.name.starts_with("etcd_") || s.name.starts_with("sd_"))
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.spans {
            write!(f, "{}{:?}: ", s.name, s.fields)?;
        }
        write!(f, "{} {} {}", self.level, self.target, self.message)
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// Keeps every event with its spans' fields.
struct Capture(Arc<Mutex<Vec<Line>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| SpanSeen {
                        name: span.name(),
                        level: *span.metadata().level(),
                        fields: span
                            .extensions()
                            .get::<Fields>()
                            .map(|f| f.0.clone())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let line = Line {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            message: fields.0.remove("message").unwrap_or_default(),
            spans,
        };
        self.0.lock().unwrap().push(line);
    }
}

/// The events sd logged (any task's, any thread's) since the test binary started.
fn captured() -> Arc<Mutex<Vec<Line>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<Line>>>> = OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
            lines
        })
        .clone()
}

/// sd's own lines at `info` or above.
fn loud(lines: &[Line]) -> Vec<Line> {
    lines
        .iter()
        .filter(|l| l.level <= Level::INFO && l.target.starts_with("sd_"))
        .cloned()
        .collect()
}

fn show(lines: &[Line]) -> String {
    lines.iter().map(|l| format!("  {l}\n")).collect()
}

/// Waits until `done` holds for sd's loud lines; panics with them after `limit`.
async fn wait_for_lines(lines: &Mutex<Vec<Line>>, limit: Duration, done: impl Fn(&[Line]) -> bool) {
    let start = Instant::now();
    loop {
        let now = loud(&lines.lock().unwrap());
        if done(&now) {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "not within {limit:?}; sd logged at info and above:\n{}",
            show(&now)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_when_well_one_warning_and_one_recovery_per_task_for_an_outage() {
    let lines = captured();
    let mut etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let prefix = "/tracing/svc/";

    // A registration (its lease outlives the outage: a restart keeps leases), an instancer
    // following its prefix, and a named endpointer over that instancer.
    let ttl = TtlOption::new(Duration::from_secs(1), Duration::from_secs(15)).unwrap();
    let service = Service::new(format!("{prefix}127.0.0.1:9000"), "127.0.0.1:9000")
        .unwrap()
        .with_ttl(ttl);
    let registrar = EtcdRegistrar::new(client.clone(), service);
    registrar.register().await.unwrap();
    let lease = registrar.lease().expect("registered on a lease");
    let instancer = EtcdInstancer::new(client.clone(), prefix).await.unwrap();
    let endpointer = DefaultEndpointer::new(
        &instancer,
        endpoint_fn(|i| i.to_string()),
        EndpointerOptions::new().name("svc"),
    )
    .await;
    assert_eq!(endpointer.endpoints().unwrap(), ["127.0.0.1:9000"]);

    // Steady state: heartbeats, progress requests, nothing worth a line at info.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet = loud(&lines.lock().unwrap());
    assert!(
        quiet.is_empty(),
        "sd logged at info or above while all was well:\n{}",
        show(&quiet)
    );

    // The outage: every task notices, says so once, and says once that it is over.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart().await;
    let tasks = ["etcd_instancer", "etcd_lease_pool", "sd_endpointer"];
    wait_for_lines(&lines, Duration::from_secs(20), |now| {
        tasks.iter().all(|task| {
            now.iter()
                .any(|l| l.level == Level::INFO && l.task().is_some_and(|s| s.name == *task))
        })
    })
    .await;
    assert!(registrar.state().is_registered(), "{:?}", registrar.state());
    assert!(endpointer.snapshot().error().is_none());
    // A few more heartbeats and progress rounds: anything logged twice would show by now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let all = loud(&lines.lock().unwrap());
    eprintln!("sd logged at info and above:\n{}", show(&all));
    let mut per_task: BTreeMap<(&str, Level), Vec<&Line>> = BTreeMap::new();
    for line in &all {
        let task = line.task().map_or("(no task span)", |s| s.name);
        per_task.entry((task, line.level)).or_default().push(line);
    }
    let counts: BTreeMap<String, usize> = per_task
        .iter()
        .map(|((task, level), l)| (format!("{task} {level}"), l.len()))
        .collect();
    let want: BTreeMap<String, usize> = tasks
        .iter()
        .flat_map(|t| [(format!("{t} WARN"), 1), (format!("{t} INFO"), 1)])
        .collect();
    assert_eq!(counts, want, "sd logged:\n{}", show(&all));

    // Each line names what its task serves, in a span at ERROR level (so a WARN filter keeps
    // it).
    let span_of = |task: &str, level: Level| per_task[&(task, level)][0].task().unwrap().clone();
    for task in tasks {
        for level in [Level::WARN, Level::INFO] {
            assert_eq!(span_of(task, level).level, Level::ERROR, "{task}");
        }
    }
    assert_eq!(
        span_of("etcd_instancer", Level::WARN)
            .fields
            .get("prefix")
            .map(String::as_str),
        Some(prefix)
    );
    let pool = span_of("etcd_lease_pool", Level::WARN);
    assert_eq!(
        pool.fields.get("lease"),
        Some(&format!("{lease:x}")),
        "{pool:?}"
    );
    assert_eq!(pool.fields.get("ttl_secs").map(String::as_str), Some("15"));
    assert_eq!(
        span_of("sd_endpointer", Level::INFO)
            .fields
            .get("name")
            .map(String::as_str),
        Some("svc")
    );
    let recovered: Vec<&str> = tasks
        .iter()
        .map(|t| per_task[&(*t, Level::INFO)][0].message.as_str())
        .collect();
    assert_eq!(
        recovered,
        [
            "etcd watch recovered",
            "registrations recovered",
            "discovery recovered"
        ]
    );

    instancer.stop();
    registrar.deregister().await.unwrap();
}
