//! `sdwatch`: what a client sees under a prefix of etcd, live. It watches the prefix through an
//! [`EtcdInstancer`], as every sd client does, and prints the instances (with their metadata)
//! when it starts, then each change with its local time and etcd revision, then errors and
//! recoveries, until Ctrl-C or SIGTERM (exit 0).
//!
//! ```text
//! cargo run -p examples --bin sdwatch -- --etcd http://127.0.0.1:2379 /services/barsvc/
//! 2026-12-02 11:27:03.120 rev 41 /services/barsvc/: 1 instance
//!   127.0.0.1:9000
//! 2026-12-02 11:27:09.514 rev 42 + 127.0.0.1:9001 weight=3
//! 2026-12-02 11:27:15.002 rev 43 - 127.0.0.1:9000
//! ```
//!
//! With `--json`, one JSON object a line, for scripts (times in UTC):
//! `{"type":"instances","time":..,"revision":R,"instances":[..],"added":[..],"removed":[..]}`
//! (`added` and `removed` against the previous `instances` line; the first one adds them all),
//! `{"type":"error","time":..,"message":".."}`, and `{"type":"recovered","time":..,
//! "revision":R,"outage_ms":N}` followed by the `instances` line of the state read again. An
//! instance is `{"addr":..,"value":..,"metadata":{"weight":..,"zone":..,"labels":{..}}}`.
//!
//! The connection flags are foosvc's (`--etcd`, `--ca-file`, `--cert-file`, `--key-file`,
//! `--user`, `--password`, `--dial-timeout`, `--keep-alive`). A prefix that does not end in `/`
//! and an etcd that does not answer are refused on stderr with exit code 1.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use examples::EtcdArgs;
use futures::StreamExt;
use sd_core::{Change, Error, Event, Instance, InstanceSet, Instancer};
use sd_etcd::EtcdInstancer;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

/// Shows, live, the instances a client sees under an etcd prefix, and each change to them.
#[derive(Debug, Parser)]
#[command(name = "sdwatch")]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print one JSON object a line (instances, error, recovered) instead of text.
    #[arg(long)]
    json: bool,
    /// The prefix to watch, ending in '/', e.g. /services/barsvc/.
    prefix: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    // The instancer logs watch failures; sdwatch prints them itself.
    examples::init_logging("error");
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sdwatch: {}", sd_core::Report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Checks the prefix before anything is dialed: etcd would take `/services/barsvc` as a prefix
/// of `/services/barsvc2/` too.
fn check_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.ends_with('/') {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "the prefix {prefix:?} does not end in '/': give {:?} (without the '/', it would also \
         match the keys of any other prefix that starts the same way)",
        format!("{prefix}/")
    )))
}

async fn run(args: Args) -> Result<(), Error> {
    check_prefix(&args.prefix)?;
    // Installed first, so a signal at any moment ends sdwatch cleanly.
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::backend)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::backend)?;
    let start = async {
        let client = args.etcd.connect("sdwatch").await.map_err(|e| match e {
            e @ sd_etcd::Error::Connect { .. } => Error::backend_msg(format!(
                "{e}; give etcd's address with --etcd URL (or set ETCD_ENDPOINTS)"
            )),
            e => e.into(),
        })?;
        Ok::<_, Error>(EtcdInstancer::new(client, args.prefix.as_str()).await?)
    };
    let instancer = tokio::select! {
        started = start => started?,
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    };
    let mut events = instancer.subscribe();
    let mut view = View::new(args.prefix.clone(), args.json);
    let result = loop {
        let event = tokio::select! {
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
            event = events.next() => event,
        };
        let lines = match event {
            Some(Event::Instances(set)) => view.instances(set, instancer.revision(), Now::get()),
            Some(Event::Error(e)) => view.error(&e, Now::get()),
            None => break Err(Error::backend_msg("the watch ended")),
        };
        if let Err(e) = print(&lines) {
            // A reader that went away (`sdwatch ... | head`) is an end, not an error.
            break match e.kind() {
                std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(Error::backend_msg(format!("cannot write to stdout: {e}"))),
            };
        }
    };
    instancer.stop();
    result
}

fn print(lines: &[String]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

/// When something was seen: the wall clock for the printed time, the monotonic one for how
/// long an outage lasted.
#[derive(Debug, Clone, Copy)]
struct Now {
    wall: SystemTime,
    mono: Instant,
}

impl Now {
    fn get() -> Self {
        Now {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// What sdwatch has shown so far, and how the next event is printed.
#[derive(Debug)]
struct View {
    prefix: String,
    json: bool,
    /// The last set shown; `None` before the first.
    last: Option<InstanceSet>,
    /// Since when the watch has been failing (the first error event of the outage).
    failing_since: Option<Instant>,
}

impl View {
    fn new(prefix: String, json: bool) -> Self {
        View {
            prefix,
            json,
            last: None,
            failing_since: None,
        }
    }

    /// The lines for a new instance set read at `revision`.
    fn instances(&mut self, set: InstanceSet, revision: i64, now: Now) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(since) = self.failing_since.take() {
            let outage = now.mono.saturating_duration_since(since);
            lines.push(if self.json {
                Line::Recovered {
                    time: utc(now.wall),
                    revision,
                    outage_ms: u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
                }
                .json()
            } else {
                format!(
                    "{} rev {revision} recovered after {:.1}s: {}",
                    local(now.wall),
                    outage.as_secs_f64(),
                    count(set.len())
                )
            });
        }
        let before = self.last.take();
        let empty = InstanceSet::new();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for change in before.as_ref().unwrap_or(&empty).changes(&set) {
            match change {
                Change::Added(i) => added.push(i),
                Change::Removed(i) => removed.push(i),
            }
        }
        if self.json {
            lines.push(
                Line::Instances {
                    time: utc(now.wall),
                    revision,
                    instances: set.iter().map(InstanceOut::from).collect(),
                    added: added.iter().copied().map(InstanceOut::from).collect(),
                    removed: removed.iter().copied().map(InstanceOut::from).collect(),
                }
                .json(),
            );
        } else if before.is_none() {
            lines.push(format!(
                "{} rev {revision} {}: {}",
                local(now.wall),
                self.prefix,
                count(set.len())
            ));
            lines.extend(set.iter().map(|i| format!("  {}", examples::describe(i))));
        } else {
            let at = local(now.wall);
            lines.extend(
                removed
                    .iter()
                    .map(|i| format!("{at} rev {revision} - {}", examples::describe(i))),
            );
            lines.extend(
                added
                    .iter()
                    .map(|i| format!("{at} rev {revision} + {}", examples::describe(i))),
            );
        }
        self.last = Some(set);
        lines
    }

    /// The lines for a failed read or watch. The set shown last stays the last known one.
    fn error(&mut self, e: &Error, now: Now) -> Vec<String> {
        let first = self.failing_since.is_none();
        self.failing_since.get_or_insert(now.mono);
        let message = sd_core::Report(e).to_string();
        vec![if self.json {
            Line::Error {
                time: utc(now.wall),
                message,
            }
            .json()
        } else if first {
            format!(
                "{} error: {message} (retrying; the instances shown may be out of date until \
                 etcd answers again)",
                local(now.wall)
            )
        } else {
            format!("{} error: {message}", local(now.wall))
        }]
    }
}

fn count(n: usize) -> String {
    match n {
        1 => String::from("1 instance"),
        n => format!("{n} instances"),
    }
}

/// A line of `--json` output: one JSON object whose first field is `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line<'a> {
    /// The instances at `revision`, and what changed since the previous `instances` line.
    Instances {
        time: String,
        revision: i64,
        instances: Vec<InstanceOut<'a>>,
        added: Vec<InstanceOut<'a>>,
        removed: Vec<InstanceOut<'a>>,
    },
    Error {
        time: String,
        message: String,
    },
    /// The watch works again; an `instances` line follows.
    Recovered {
        time: String,
        revision: i64,
        outage_ms: u64,
    },
}

impl Line<'_> {
    fn json(&self) -> String {
        // Strings, numbers and maps of strings: serializing them cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({"type": "error", "message": e.to_string()}).to_string()
        })
    }
}

/// An instance as `--json` prints it: its address, its stored value, and its metadata.
#[derive(Debug, Serialize)]
struct InstanceOut<'a> {
    addr: &'a str,
    value: &'a str,
    metadata: MetadataOut<'a>,
}

#[derive(Debug, Serialize)]
struct MetadataOut<'a> {
    weight: u32,
    zone: Option<&'a str>,
    labels: BTreeMap<&'a str, &'a str>,
}

impl<'a> From<&'a Instance> for InstanceOut<'a> {
    fn from(i: &'a Instance) -> Self {
        let meta = i.metadata();
        InstanceOut {
            addr: i.addr(),
            value: i.value(),
            metadata: MetadataOut {
                weight: meta.weight(),
                zone: meta.zone(),
                labels: meta.labels().iter().map(|(k, v)| (&**k, &**v)).collect(),
            },
        }
    }
}

/// `t` in UTC, RFC 3339 with milliseconds, for scripts.
fn utc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `t` in the local time zone (`TZ`, else `/etc/localtime`), `2026-12-02 11:27:03.120`, for
/// people; in UTC if the C library cannot convert it.
fn local(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let Ok(secs) = libc::time_t::try_from(since.as_secs()) else {
        return utc(t);
    };
    // SAFETY: an all-zero `tm` is valid (integers, and a null `tm_zone` pointer where there is
    // one); localtime_r only writes into it, and only reads TZ, which this program never sets.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return utc(t);
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn set(values: &[&str]) -> InstanceSet {
        values
            .iter()
            .map(|v| Instance::from_value(v).unwrap())
            .collect()
    }

    fn parse(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn a_prefix_must_end_in_a_slash() {
        assert!(check_prefix("/services/barsvc/").is_ok());
        for bad in ["/services/barsvc", ""] {
            let err = check_prefix(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("give \"{bad}/\"")), "{err}");
        }
    }

    #[test]
    fn text_shows_the_set_then_each_change_with_its_revision() {
        let mut v = View::new("/s/".into(), false);
        let t0 = Now::get();
        let first = v.instances(set(&["a:1", r#"{"addr":"b:1","weight":3}"#]), 7, t0);
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first[0].ends_with(" rev 7 /s/: 2 instances"), "{first:?}");
        assert_eq!(first[1..], ["  a:1", "  b:1 weight=3"]);

        let lines = v.instances(set(&[r#"{"addr":"b:1","weight":3}"#, "c:1"]), 9, t0);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].ends_with(" rev 9 - a:1"), "{lines:?}");
        assert!(lines[1].ends_with(" rev 9 + c:1"), "{lines:?}");

        let err = Error::backend_msg("etcd is gone");
        let lines = v.error(&err, t0);
        assert!(
            lines[0].contains("error: etcd is gone (retrying"),
            "{lines:?}"
        );
        assert!(!v.error(&err, t0)[0].contains("retrying"), "said once");
        let later = Now {
            mono: t0.mono + Duration::from_millis(2500),
            ..t0
        };
        let lines = v.instances(set(&["c:1"]), 12, later);
        assert!(
            lines[0].ends_with(" rev 12 recovered after 2.5s: 1 instance"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with(" rev 12 - b:1 weight=3"), "{lines:?}");
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn json_lines_carry_the_set_the_changes_and_the_metadata() {
        let mut v = View::new("/s/".into(), true);
        let t0 = Now::get();
        let naming =
            r#"{"Op":0,"Addr":"b:1","Metadata":{"weight":3,"zone":"z","labels":{"team":"x"}}}"#;
        let first = v.instances(set(&["a:1", naming]), 7, t0);
        assert!(first[0].starts_with(r#"{"type":"instances","#), "{first:?}");
        let first = parse(&first[0]);
        assert_eq!(first["type"], "instances");
        assert_eq!(first["revision"], 7);
        assert_eq!(
            first["added"], first["instances"],
            "the first adds them all"
        );
        assert_eq!(first["removed"], json!([]));
        assert_eq!(
            first["instances"],
            json!([
                {"addr": "a:1", "value": "a:1",
                 "metadata": {"weight": 1, "zone": null, "labels": {}}},
                {"addr": "b:1", "value": naming,
                 "metadata": {"weight": 3, "zone": "z", "labels": {"team": "x"}}},
            ])
        );

        let lines = v.error(&Error::backend_msg("gone"), t0);
        let err = parse(&lines[0]);
        assert_eq!(
            (&err["type"], &err["message"]),
            (&json!("error"), &json!("gone"))
        );
        let later = Now {
            mono: t0.mono + Duration::from_millis(1500),
            ..t0
        };
        let lines = v.instances(set(&["c:1"]), 20, later);
        assert_eq!(lines.len(), 2);
        let recovered = parse(&lines[0]);
        assert_eq!(recovered["type"], "recovered");
        assert_eq!(recovered["revision"], 20);
        assert_eq!(recovered["outage_ms"], 1500);
        let after = parse(&lines[1]);
        assert_eq!(after["added"][0]["addr"], "c:1");
        let removed: Vec<&str> = after["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["addr"].as_str().unwrap())
            .collect();
        assert_eq!(removed, ["a:1", "b:1"], "against the set before the outage");
    }

    #[test]
    fn local_time_is_a_date_and_a_time_with_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let s = local(t);
        assert_eq!(s.len(), "2023-11-14 22:13:20.123".len(), "{s}");
        assert!(s.ends_with(".123"), "{s}");
        assert!(s.starts_with("2023-11-1"), "{s}");
    }
}
