//! The example programs, run as a user runs them: the demo on the in-memory store and on a real
//! etcd, and foosvc against a real etcd (registration, discovery, deregistration on signals).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Program;
use sd_etcd::testing::{EtcdServer, ServerOptions};

/// Checks what the demo printed: calls leave a deregistered instance at once, and a crashed
/// one once its TTL has expired; every endpoint is closed exactly once.
fn check_demo_output(out: &Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section = |from: &str, to: &str| -> String {
        let start = text
            .find(from)
            .unwrap_or_else(|| panic!("no {from:?} in:\n{text}"));
        let rest = &text[start..];
        let end = rest.find(to).unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let up = section("-- all three instances up", "-- 127.0.0.1:8081 deregisters");
    for port in [8081, 8082, 8083] {
        assert_eq!(
            up.matches(&format!("served by 127.0.0.1:{port}")).count(),
            2,
            "round robin over three: each serves 2 of 6 calls:\n{up}"
        );
    }
    let after_dereg = section("-- 127.0.0.1:8081 deregisters", "-- shutting down");
    assert!(
        !after_dereg.contains("served by 127.0.0.1:8081"),
        "{after_dereg}"
    );
    // The hung instance: ejected after two failures, so later calls go to 8082 first; then
    // back in service once its probe succeeds.
    let hung = section("-- 127.0.0.1:8083 hangs", "-- 127.0.0.1:8083 answers again");
    let ejected_at = hung
        .find("ejected      127.0.0.1:8083")
        .unwrap_or_else(|| panic!("8083 never ejected:\n{hung}"));
    assert!(
        !hung[ejected_at..].contains("127.0.0.1:8083 does not answer"),
        "no call tried 8083 after its ejection:\n{hung}"
    );
    let back = section(
        "-- 127.0.0.1:8083 answers again",
        "-- 127.0.0.1:8082 crashes",
    );
    assert!(back.contains("restored     127.0.0.1:8083"), "{back}");
    assert!(back.contains("served by 127.0.0.1:8083"), "{back}");
    let crashed = section("-- 127.0.0.1:8082 crashes", "key has expired");
    assert_eq!(
        crashed.matches("served by 127.0.0.1:8083").count(),
        4,
        "{crashed}"
    );
    assert!(
        crashed.contains("127.0.0.1:8082 does not answer"),
        "{crashed}"
    );
    let expired = section("key has expired", "-- shutting down");
    assert_eq!(
        expired.matches("served by 127.0.0.1:8083").count(),
        4,
        "{expired}"
    );
    assert!(!expired.contains("does not answer"), "{expired}");
    for port in [8081, 8082, 8083] {
        assert_eq!(
            text.matches(&format!("closed       127.0.0.1:{port}"))
                .count(),
            1,
            "each endpoint closed exactly once:\n{text}"
        );
    }
}

#[test]
fn demo_on_memory_moves_calls_to_the_survivors() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .output()
        .expect("run the demo binary");
    check_demo_output(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_etcd_moves_calls_to_the_survivors() {
    let etcd = EtcdServer::start().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--etcd", &etcd.endpoint()])
        .output()
        .await
        .expect("run the demo binary");
    check_demo_output(&out);
}

/// foosvc running with `args`.
fn foosvc(args: &[&str]) -> Program {
    Program::start(env!("CARGO_BIN_EXE_foosvc"), args)
}

async fn foosvc_keys(etcd: &EtcdServer) -> Vec<String> {
    let mut raw = etcd.raw_client().await;
    let resp = raw
        .get(
            "/services/foosvc/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("read foosvc keys");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_registers_discovers_and_deregisters_on_sigterm_and_sigint() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut raw = etcd.raw_client().await;
    for (instance, sig, name) in [
        ("127.0.0.1:9101", libc::SIGTERM, "SIGTERM"),
        ("127.0.0.1:9102", libc::SIGINT, "SIGINT"),
    ] {
        let mut foo = foosvc(&[
            "--etcd",
            &endpoint,
            "--instance",
            instance,
            "--heartbeat",
            "1s",
            "--ttl",
            "3s",
            "--call-every",
            "200ms",
        ]);
        foo.expect_line("registered /services/foosvc/");
        assert_eq!(
            foosvc_keys(&etcd).await,
            [format!("/services/foosvc/{instance}")]
        );
        let bar = format!("/services/barsvc/{instance}0");
        raw.put(bar.as_str(), format!("{instance}0"), None)
            .await
            .expect("put a barsvc instance");
        foo.expect_line(&format!("barsvc instances: [\"{instance}0\"]"));
        foo.expect_line(&format!("call: barsvc at {instance}0 answered"));
        raw.delete(bar.as_str(), None).await.expect("delete barsvc");
        foo.expect_line("barsvc instances: []");

        foo.signal(sig);
        foo.expect_line(&format!("{name}: shutting down"));
        foo.expect_line("deregistered");
        foo.wait_success();
        // Deregistered at once, not left to expire at its TTL.
        assert!(
            foosvc_keys(&etcd).await.is_empty(),
            "key left behind after {name}"
        );
    }
}

/// `--weight`, `--zone` and `--format`: the registration is stored in the chosen form with its
/// metadata, barsvc instances are printed with theirs, and calls prefer barsvc's own zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_registers_and_prints_metadata() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut raw = etcd.raw_client().await;
    let mut foo = foosvc(&[
        "--etcd",
        &endpoint,
        "--instance",
        "127.0.0.1:9201",
        "--weight",
        "2",
        "--zone",
        "z1",
        "--format",
        "etcd-naming",
        "--call-every",
        "100ms",
    ]);
    foo.expect_line("registered /services/foosvc/127.0.0.1:9201");
    let stored = raw
        .get("/services/foosvc/127.0.0.1:9201", None)
        .await
        .expect("read the registration");
    let value = stored
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap_or("").to_string());
    assert_eq!(
        value.as_deref(),
        Some(r#"{"Op":0,"Addr":"127.0.0.1:9201","Metadata":{"weight":2,"zone":"z1"}}"#)
    );
    // One barsvc in zone z1 (our JSON), one elsewhere (etcd's format): calls stay in z1.
    raw.put(
        "/services/barsvc/a",
        r#"{"addr":"127.0.0.1:9301","weight":3,"zone":"z1"}"#,
        None,
    )
    .await
    .expect("put barsvc a");
    raw.put(
        "/services/barsvc/b",
        r#"{"Op":0,"Addr":"127.0.0.1:9302","Metadata":{"zone":"z2"}}"#,
        None,
    )
    .await
    .expect("put barsvc b");
    // Ordered by stored value: etcd's format (`{"Op"...`) sorts before ours (`{"addr"...`).
    foo.expect_line(
        r#"barsvc instances: ["127.0.0.1:9302 zone=z2", "127.0.0.1:9301 weight=3 zone=z1"]"#,
    );
    for _ in 0..5 {
        foo.expect_line("call: barsvc at 127.0.0.1:9301 answered");
    }
    assert!(
        !foo.seen.iter().any(|l| l.contains("at 127.0.0.1:9302")),
        "a call left zone z1: {:?}",
        foo.seen
    );
    foo.signal(libc::SIGTERM);
    foo.expect_line("deregistered");
    foo.wait_success();
}

/// Metadata needs a JSON format: asked of a plain registration, it is refused before anything
/// is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_refuses_metadata_in_plain_form() {
    let etcd = EtcdServer::start().await;
    let out = run_foosvc(
        &[
            "--etcd",
            &etcd.endpoint(),
            "--weight",
            "3",
            "--run-for",
            "1s",
        ],
        &[],
    )
    .await;
    assert_refused(
        &out,
        &["--weight and --zone need --format etcd-naming or json"],
    );
    assert!(foosvc_keys(&etcd).await.is_empty());
    let out = run_foosvc(&["--etcd", &etcd.endpoint(), "--format", "xml"], &[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("plain, etcd-naming or json"),
        "{err}"
    );
}

#[test]
fn foosvc_reports_bad_flags_and_unreachable_etcd() {
    let out = Command::new(env!("CARGO_BIN_EXE_foosvc"))
        .args(["--heartbeat", "100ms"])
        .output()
        .expect("run foosvc");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat 100ms is too short"), "{err}");

    // A closed loopback port: nothing listens on port 1.
    let out = Command::new(env!("CARGO_BIN_EXE_foosvc"))
        .args(["--etcd", "http://127.0.0.1:1", "--dial-timeout", "1s"])
        .output()
        .expect("run foosvc");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:1"), "{err}");
}

/// The environment variables foosvc reads flags from, cleared so that the test's own
/// environment cannot change what a run means.
const ETCD_ENV: [&str; 3] = ["ETCD_ENDPOINTS", "ETCD_USER", "ETCD_PASSWORD"];

/// Runs foosvc to completion with `args` and `env` (and none of [`ETCD_ENV`] otherwise).
async fn run_foosvc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_foosvc"));
    for var in ETCD_ENV {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().copied()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("foosvc finished within 30 s")
        .expect("run foosvc")
}

/// Asserts that foosvc failed with an error (no panic) that says each of `says`; returns stderr.
fn assert_refused(out: &Output, says: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "foosvc should fail; stderr:\n{err}");
    assert_eq!(out.status.code(), Some(1), "an error, not a crash: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for s in says {
        assert!(err.contains(s), "stderr says {s:?}:\n{err}");
    }
    err
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// Durations that would panic once registered (a zero call period panics the timer; a
/// `--run-for` past the clock's end overflows it) are refused before anything is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_refuses_bad_durations_before_registering() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    for (flag, value, says) in [
        (
            "--call-every",
            "0s",
            "--call-every 0s: give a duration above zero",
        ),
        (
            "--run-for",
            "100000000000s",
            "--run-for 100000000000s: too long",
        ),
        ("--run-for", "18446744073709551615s", "at most 365 days"),
        ("--call-every", "18446744073709551615s", "--call-every"),
        ("--ttl", "18446744073709551615s", "--ttl"),
        ("--dial-timeout", "0s", "--dial-timeout 0s"),
        ("--keep-alive", "0s", "--keep-alive 0s"),
    ] {
        let out = run_foosvc(
            &[
                "--etcd",
                &endpoint,
                "--instance",
                "127.0.0.1:9201",
                flag,
                value,
            ],
            &[],
        )
        .await;
        assert_refused(&out, &[says]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("registered"), "{flag} {value}: {stdout}");
        assert!(
            foosvc_keys(&etcd).await.is_empty(),
            "{flag} {value}: key left behind"
        );
    }
}

/// Endpoints that are not http://HOST:PORT or https://HOST:PORT are refused without dialing,
/// naming the endpoint and saying what to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_refuses_malformed_endpoints() {
    for (endpoint, says) in [
        ("127.0.0.1:99999", "has no scheme"),
        ("unix:///x", "has the scheme \"unix\""),
        (
            "http://127.0.0.1:99999",
            "the port 99999, which is out of range",
        ),
        ("http://127.0.0.1:0", "the port 0, which is out of range"),
    ] {
        let out = run_foosvc(&["--etcd", endpoint], &[]).await;
        assert_refused(
            &out,
            &[
                &format!("endpoint {endpoint:?}"),
                says,
                "write http://HOST:PORT or https://HOST:PORT",
            ],
        );
    }
}

/// ETCD_PASSWORD without a user is ignored with a note: the run goes on (here to a closed
/// port, so it fails to connect, naming the endpoint). `--password` without `--user` is an
/// error of the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_ignores_etcd_password_without_a_user() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let out = run_foosvc(
        &["--etcd", &endpoint, "--dial-timeout", "1s"],
        &[("ETCD_PASSWORD", "hunter2")],
    )
    .await;
    let err = assert_refused(
        &out,
        &[
            "foosvc: ETCD_PASSWORD is set but no --user was given: ignoring it",
            "could not connect to etcd",
            &endpoint,
        ],
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!err.contains("required"), "not a command-line error: {err}");

    let out = run_foosvc(&["--etcd", &endpoint, "--password", "hunter2"], &[]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a command-line error: {err}");
    assert!(err.contains("--user"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// With a user (from --user or ETCD_USER), ETCD_PASSWORD is the password; a user without any
/// password is refused before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_logs_in_with_etcd_user_and_etcd_password() {
    let etcd = EtcdServer::start_with(ServerOptions::new().with_auth("s3cret")).await;
    let endpoint = etcd.endpoint();
    let args = [
        "--etcd",
        &endpoint,
        "--instance",
        "127.0.0.1:9202",
        "--run-for",
        "500ms",
    ];
    for (user_flag, env) in [
        (
            &[][..],
            &[("ETCD_USER", "root"), ("ETCD_PASSWORD", "s3cret")][..],
        ),
        (&["--user", "root"][..], &[("ETCD_PASSWORD", "s3cret")][..]),
    ] {
        let out = run_foosvc(&[&args[..], user_flag].concat(), env).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{env:?}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("registered /services/foosvc/127.0.0.1:9202"),
            "{stdout}"
        );
        assert!(stdout.contains("deregistered"), "{stdout}");
        assert!(!stderr.contains("ignoring"), "{stderr}");
    }
    assert!(foosvc_keys(&etcd).await.is_empty());

    let out = run_foosvc(&args, &[("ETCD_USER", "root")]).await;
    assert_refused(
        &out,
        &["the etcd user \"root\"", "has no password", "ETCD_PASSWORD"],
    );
}

/// `GET /metrics` over a plain TCP connection, as Prometheus scrapes: the body of a `200`
/// answer, or why there was none.
fn scrape(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {answer}"))?;
    if !head.starts_with("HTTP/1.1 200") || !head.to_ascii_lowercase().contains("text/plain") {
        return Err(format!("not a 200 with Prometheus text: {head}"));
    }
    Ok(body.to_string())
}

/// The value of the sample `series` (a name with its labels, as Prometheus prints them).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes until `series` satisfies `want`; panics with the last scrape after 20 s.
fn wait_for_sample(port: u16, series: &str, want: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = scrape(port);
        if let Ok(text) = &body {
            if sample(text, series).is_some_and(&want) {
                return text.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{series} never as expected; last scrape: {body:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// foosvc's `--metrics-addr`, scraped over HTTP: the barsvc instances and endpoints it sees,
/// the changes it applied, and, once etcd is killed, its discovery errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_serves_its_metrics_over_http() {
    let mut etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut raw = etcd.raw_client().await;
    for port in [9401, 9402] {
        let addr = format!("127.0.0.1:{port}");
        raw.put(format!("/services/barsvc/{addr}"), addr, None)
            .await
            .expect("put barsvc");
    }
    let port = sd_etcd::testing::free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut foo = foosvc(&[
        "--etcd",
        &endpoint,
        "--instance",
        "127.0.0.1:9203",
        "--metrics-addr",
        &metrics_addr,
        "--call-every",
        "100ms",
    ]);
    foo.expect_line(&format!("metrics at http://{metrics_addr}/metrics"));
    foo.expect_line("registered /services/foosvc/127.0.0.1:9203");
    let instances = r#"sd_instances{prefix="/services/barsvc/"}"#;
    let body = wait_for_sample(port, instances, |v| v == 2.0);
    assert_eq!(
        sample(&body, r#"sd_endpoints{endpointer="barsvc"}"#),
        Some(2.0),
        "{body}"
    );
    assert!(body.contains("# TYPE sd_instances gauge"), "{body}");

    raw.put("/services/barsvc/127.0.0.1:9403", "127.0.0.1:9403", None)
        .await
        .expect("put barsvc");
    let body = wait_for_sample(port, instances, |v| v == 3.0);
    assert_eq!(
        sample(
            &body,
            r#"sd_changes_applied_total{prefix="/services/barsvc/"}"#
        ),
        Some(1.0),
        "{body}"
    );
    foo.expect_line("call: barsvc at 127.0.0.1:9403 answered");

    let errors = r#"sd_discovery_errors_total{prefix="/services/barsvc/"}"#;
    let before = sample(&scrape(port).expect("scrape"), errors).unwrap_or(0.0);
    assert_eq!(before, 0.0, "no discovery error while etcd is up");
    etcd.kill();
    let body = wait_for_sample(port, errors, |v| v >= 1.0);
    // The instances it knew are still served while discovery fails.
    assert_eq!(sample(&body, instances), Some(3.0), "{body}");
    assert_eq!(
        sample(&body, r#"sd_endpoints{endpointer="barsvc"}"#),
        Some(3.0),
        "{body}"
    );
}

/// A `--metrics-addr` something else listens on is refused, naming it, before anything is
/// registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_refuses_a_busy_metrics_address_before_registering() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = busy.local_addr().expect("local address").to_string();
    let out = run_foosvc(
        &[
            "--etcd",
            &endpoint,
            "--instance",
            "127.0.0.1:9204",
            "--metrics-addr",
            &addr,
        ],
        &[],
    )
    .await;
    assert_refused(
        &out,
        &[
            &format!("--metrics-addr {addr}: cannot serve metrics there"),
            "in use",
        ],
    );
    assert!(foosvc_keys(&etcd).await.is_empty());
}

/// On SIGTERM foosvc deregisters first (clients stop picking it), then lets its calls in
/// flight finish; with a short `--drain-timeout` it abandons calls that take longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foosvc_deregisters_then_drains_its_calls_on_sigterm() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let mut raw = etcd.raw_client().await;
    raw.put("/services/barsvc/127.0.0.1:9301", "127.0.0.1:9301", None)
        .await
        .expect("put a barsvc instance");
    for (instance, drain, drains) in [
        ("127.0.0.1:9311", "10s", true),
        ("127.0.0.1:9312", "300ms", false),
    ] {
        let mut foo = foosvc(&[
            "--etcd",
            &endpoint,
            "--instance",
            instance,
            "--call-every",
            "100ms",
            "--call-latency",
            "1500ms",
            "--drain-timeout",
            drain,
        ]);
        foo.expect_line("registered /services/foosvc/");
        foo.expect_line("barsvc instances:");
        // Calls take 1.5 s and start every 100 ms: several are in flight now.
        tokio::time::sleep(Duration::from_millis(700)).await;
        foo.signal(libc::SIGTERM);
        foo.expect_line("SIGTERM: shutting down");
        foo.expect_line("deregistered");
        // Deregistered while its calls still run: the key is gone before they end.
        assert!(
            foosvc_keys(&etcd).await.is_empty(),
            "key left while draining"
        );
        foo.expect_line("draining");
        let after = foo.seen.len();
        if drains {
            foo.expect_line("drained");
            let answered = foo.seen[after..]
                .iter()
                .filter(|l| l.starts_with("call: barsvc at 127.0.0.1:9301 answered"))
                .count();
            assert!(
                answered >= 2,
                "calls answered after deregistering:\n{}",
                foo.seen.join("\n")
            );
        } else {
            foo.expect_line("drain timeout: abandoning");
            assert!(
                !foo.seen[after..].iter().any(|l| l.starts_with("call:")),
                "no call finished within 300 ms:\n{}",
                foo.seen.join("\n")
            );
        }
        foo.wait_success();
    }
}
