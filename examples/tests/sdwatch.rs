//! sdwatch run as a user runs it, against a real etcd: its JSON lines parsed one by one (puts,
//! deletes, an outage and the recovery, revisions as etcd reported them), its text output, and
//! its refusals and exit codes.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::Program;

use sd_etcd::testing::EtcdServer;
use serde_json::{json, Value};

const PREFIX: &str = "/services/barsvc/";

/// The environment variables sdwatch reads flags from, cleared so that the test's own
/// environment cannot change what a run means.
const ETCD_ENV: [&str; 3] = ["ETCD_ENDPOINTS", "ETCD_USER", "ETCD_PASSWORD"];

fn sdwatch() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdwatch"));
    for var in ETCD_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// sdwatch running, its stdout lines arriving on a channel.
struct Sdwatch(Program);

impl Sdwatch {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = sdwatch();
        cmd.args(args).envs(env.iter().copied());
        Sdwatch(Program::spawn(cmd, format!("sdwatch {}", args.join(" "))))
    }

    /// The next line; panics with everything seen if none comes within 20 s.
    fn next_line(&mut self) -> String {
        match self.0.next_line(Duration::from_secs(20)) {
            Some(line) => line,
            None => panic!(
                "sdwatch's output ended; it printed:\n{}",
                self.0.seen.join("\n")
            ),
        }
    }

    /// The next line, which must be one JSON object with a `type`.
    fn next_json(&mut self) -> Value {
        let line = self.next_line();
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(value["type"].is_string(), "no type: {line}");
        assert!(
            value["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "no UTC time: {line}"
        );
        value
    }

    fn signal(&self, sig: libc::c_int) {
        self.0.signal(sig);
    }

    /// Waits (at most 10 s) for sdwatch to exit and returns its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        self.0.exit_code(Duration::from_secs(10))
    }
}

/// The addresses of a JSON line's `field` (a list of instance objects).
fn addrs(line: &Value, field: &str) -> Vec<String> {
    line[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} list in {line}"))
        .iter()
        .map(|i| i["addr"].as_str().expect("an addr").to_string())
        .collect()
}

async fn put(raw: &mut etcd_client::Client, key: &str, value: &str) -> i64 {
    let resp = raw.put(key, value, None).await.expect("put");
    resp.header().expect("a header").revision()
}

async fn delete(raw: &mut etcd_client::Client, key: &str) -> i64 {
    let resp = raw.delete(key, None).await.expect("delete");
    resp.header().expect("a header").revision()
}

/// Everything a script sees with `--json`: the set at start, each put and delete at the
/// revision etcd gave it (with an instance's metadata from etcd's naming format), nothing from
/// a neighbouring prefix, an error while etcd is down, the recovery and the right set after it,
/// and exit code 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_follow_puts_deletes_and_an_outage() {
    let mut etcd = EtcdServer::start().await;
    let mut raw = etcd.raw_client().await;
    put(&mut raw, "/services/barsvc/a", "127.0.0.1:9000").await;
    // A neighbouring prefix sdwatch must not show; its put is the store's revision at start.
    let start_rev = put(&mut raw, "/services/barsvc2/x", "127.0.0.1:9999").await;

    let mut w = Sdwatch::start(&["--json", "--etcd", &etcd.endpoint(), PREFIX], &[]);
    let first = w.next_json();
    assert_eq!(first["type"], "instances", "{first}");
    assert_eq!(first["revision"], start_rev, "the read's revision: {first}");
    assert_eq!(addrs(&first, "instances"), ["127.0.0.1:9000"]);
    assert_eq!(first["added"], first["instances"], "{first}");
    assert_eq!(first["removed"], json!([]));
    assert_eq!(
        first["instances"][0],
        json!({"addr": "127.0.0.1:9000", "value": "127.0.0.1:9000",
               "metadata": {"weight": 1, "zone": null, "labels": {}}})
    );

    let naming = r#"{"Op":0,"Addr":"127.0.0.1:9001","Metadata":{"weight":3}}"#;
    let rev_b = put(&mut raw, "/services/barsvc/b", naming).await;
    let added = w.next_json();
    assert_eq!(added["type"], "instances", "{added}");
    assert_eq!(added["revision"], rev_b, "{added}");
    assert_eq!(
        addrs(&added, "instances"),
        ["127.0.0.1:9000", "127.0.0.1:9001"]
    );
    assert_eq!(
        added["added"],
        json!([{"addr": "127.0.0.1:9001", "value": naming,
                "metadata": {"weight": 3, "zone": null, "labels": {}}}])
    );
    assert_eq!(added["removed"], json!([]));

    let rev_del = delete(&mut raw, "/services/barsvc/a").await;
    let removed = w.next_json();
    assert_eq!(removed["revision"], rev_del, "{removed}");
    assert!(rev_del > rev_b && rev_b > start_rev);
    assert_eq!(addrs(&removed, "instances"), ["127.0.0.1:9001"]);
    assert_eq!(addrs(&removed, "removed"), ["127.0.0.1:9000"]);
    assert_eq!(removed["added"], json!([]));

    etcd.kill();
    let error = w.next_json();
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    etcd.restart().await;
    // More error lines may come before etcd answers again; then the recovery.
    let recovered = loop {
        let line = w.next_json();
        match line["type"].as_str() {
            Some("error") => continue,
            _ => break line,
        }
    };
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert!(
        recovered["revision"].as_i64() >= Some(rev_del),
        "{recovered}"
    );
    assert!(recovered["outage_ms"].as_u64().is_some(), "{recovered}");
    let after = w.next_json();
    assert_eq!(after["type"], "instances", "{after}");
    assert_eq!(addrs(&after, "instances"), ["127.0.0.1:9001"], "{after}");
    assert_eq!(
        (&after["added"], &after["removed"]),
        (&json!([]), &json!([]))
    );

    // Watching again: the next change shows at its own revision.
    let mut raw = etcd.raw_client().await;
    let rev_c = put(&mut raw, "/services/barsvc/c", "127.0.0.1:9002").await;
    let line = w.next_json();
    assert_eq!(line["revision"], rev_c, "{line}");
    assert_eq!(addrs(&line, "added"), ["127.0.0.1:9002"]);

    w.signal(libc::SIGTERM);
    assert_eq!(w.exit_code(), Some(0), "SIGTERM ends sdwatch cleanly");
    assert!(
        !w.0.seen.iter().any(|l| l.contains("9999")),
        "a neighbouring prefix shown: {:?}",
        w.0.seen
    );
}

/// Text mode: the set at start with metadata, then `+`/`-` lines with the local time and the
/// revision; Ctrl-C (SIGINT) ends it with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_shows_the_instances_then_each_change() {
    let etcd = EtcdServer::start().await;
    let mut raw = etcd.raw_client().await;
    let rev_a = put(
        &mut raw,
        "/services/barsvc/a",
        r#"{"addr":"127.0.0.1:9001","weight":2,"zone":"z1"}"#,
    )
    .await;
    // Local time in UTC here, so the printed date can be checked against the clock.
    let today = humantime::format_rfc3339(SystemTime::now()).to_string()[..10].to_string();
    let mut w = Sdwatch::start(&["--etcd", &etcd.endpoint(), PREFIX], &[("TZ", "UTC")]);
    let header = w.next_line();
    assert!(
        header.ends_with(&format!(" rev {rev_a} {PREFIX}: 1 instance")),
        "{header}"
    );
    assert!(header.starts_with(&today), "{header}");
    assert_eq!(w.next_line(), "  127.0.0.1:9001 weight=2 zone=z1");

    let rev_b = put(&mut raw, "/services/barsvc/b", "127.0.0.1:9002").await;
    let line = w.next_line();
    assert!(
        line.ends_with(&format!(" rev {rev_b} + 127.0.0.1:9002")),
        "{line}"
    );
    let rev_del = delete(&mut raw, "/services/barsvc/a").await;
    let line = w.next_line();
    assert!(
        line.ends_with(&format!(" rev {rev_del} - 127.0.0.1:9001 weight=2 zone=z1")),
        "{line}"
    );

    w.signal(libc::SIGINT);
    assert_eq!(w.exit_code(), Some(0), "Ctrl-C ends sdwatch cleanly");
}

/// Asserts that sdwatch failed with exit code `code` (no panic), saying each of `says`.
fn assert_refused(out: &Output, code: i32, says: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for s in says {
        assert!(err.contains(s), "stderr says {s:?}:\n{err}");
    }
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A prefix without its `/`, an etcd that does not answer and bad flags are refused on stderr,
/// saying what to do.
#[test]
fn bad_prefixes_unreachable_etcd_and_bad_flags_are_refused() {
    // Checked before anything is dialed: nothing listens on this endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        format!(
            "http://127.0.0.1:{}",
            l.local_addr().expect("address").port()
        )
    };
    let out = sdwatch()
        .args(["--etcd", &closed, "/services/barsvc"])
        .output()
        .expect("run sdwatch");
    assert_refused(
        &out,
        1,
        &[
            "sdwatch: invalid argument: the prefix \"/services/barsvc\" does not end in '/'",
            "give \"/services/barsvc/\"",
        ],
    );

    let out = sdwatch()
        .args(["--etcd", &closed, "--dial-timeout", "1s", PREFIX])
        .output()
        .expect("run sdwatch");
    assert_refused(
        &out,
        1,
        &[
            "sdwatch: could not connect to etcd",
            &closed,
            "is etcd running there",
            "--etcd URL",
        ],
    );

    let out = sdwatch()
        .args(["--dial-timeout", "0s", PREFIX])
        .output()
        .expect("run sdwatch");
    assert_refused(&out, 1, &["--dial-timeout 0s: give a duration above zero"]);

    let out = sdwatch()
        .args(["--etcd", "127.0.0.1:2379", PREFIX])
        .output()
        .expect("run sdwatch");
    assert_refused(&out, 1, &["has no scheme", "write http://HOST:PORT"]);

    // Command-line errors: clap's usage error, exit code 2.
    let out = sdwatch().arg("--json").output().expect("run sdwatch");
    assert_refused(&out, 2, &["<PREFIX>"]);
    let out = sdwatch()
        .args(["--dial-timeout", "soon", PREFIX])
        .output()
        .expect("run sdwatch");
    assert_refused(&out, 2, &["--dial-timeout"]);
}
