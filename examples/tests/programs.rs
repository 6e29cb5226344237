//! The example programs, run as a user runs them: the demo on the in-memory store and on a real
//! etcd, and foosvc against a real etcd (registration, discovery, deregistration on signals).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sd_etcd::testing::EtcdServer;

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

/// A child process whose stdout lines arrive on a channel.
struct Program {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Program {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_foosvc"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start foosvc");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Program {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; panics with everything seen after 20 s.
    fn expect_line(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "foosvc never printed {needle:?}; it printed:\n{}",
            self.seen.join("\n")
        );
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal foosvc");
    }

    fn wait_success(&mut self) {
        let status = self.child.wait().expect("wait for foosvc");
        assert!(status.success(), "foosvc exited with {status}");
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let mut foo = Program::start(&[
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
