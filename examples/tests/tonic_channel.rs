//! tonic clients over sd, against real parts: a real etcd and real tonic greeter servers on
//! loopback. `balance_channel` (tonic's balancer fed by an instancer) in process; the
//! `greeter` program (sd's balancers: a channel per instance, round robin with outlier
//! ejection, inside retries) as processes, one of them killed mid-run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::Program;
use examples::greeter::{GreeterClient, HelloRequest, LocalServer, PREFIX};
use sd_core::tonic::{balance_channel, ChannelHandle, ChannelOptions, ChannelState};
use sd_core::{Registrar, Service};
use sd_etcd::testing::EtcdServer;
use sd_etcd::{EtcdClient, EtcdInstancer, EtcdRegistrar};
use tonic::Code;

/// Registers `server` under the greeter prefix, its address as the value.
async fn register(client: &EtcdClient, server: &LocalServer) -> EtcdRegistrar<EtcdClient> {
    let addr = server.addr().to_string();
    let service = Service::new(format!("{PREFIX}{addr}"), &addr).expect("a valid service");
    let registrar = EtcdRegistrar::new(client.clone(), service);
    registrar.register().await.expect("register");
    registrar
}

async fn wait_for_state(
    handle: &ChannelHandle,
    what: &str,
    done: impl FnMut(&ChannelState) -> bool,
) -> ChannelState {
    let mut state = handle.state();
    let seen = tokio::time::timeout(Duration::from_secs(20), state.wait_for(done))
        .await
        .map(|r| r.map(|s| s.clone()));
    match seen {
        Ok(Ok(s)) => s,
        _ => panic!("the state never showed {what}: {:?}", *state.borrow()),
    }
}

/// Makes `n` calls through the handle's service; how many each server answered.
async fn spread(handle: &ChannelHandle, n: usize) -> BTreeMap<String, usize> {
    let mut client = GreeterClient::new(handle.service());
    let mut served = BTreeMap::new();
    for _ in 0..n {
        let reply = client
            .say_hello(HelloRequest { name: "sd".into() })
            .await
            .expect("a call through the balanced channel")
            .into_inner();
        *served.entry(reply.server).or_insert(0) += 1;
    }
    served
}

fn names(servers: &[&LocalServer]) -> BTreeSet<String> {
    servers.iter().map(|s| s.addr().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_channel_reaches_every_server_and_follows_removal_and_addition() {
    let etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let servers = [
        LocalServer::start().await.unwrap(),
        LocalServer::start().await.unwrap(),
        LocalServer::start().await.unwrap(),
    ];
    let mut registrars = Vec::new();
    for server in &servers {
        registrars.push(register(&client, server).await);
    }
    let instancer = EtcdInstancer::new(client.clone(), PREFIX).await.unwrap();
    let (channel, handle) = balance_channel(instancer, ChannelOptions::new());
    assert_eq!(handle.state().borrow().instances().len(), 3);

    // tonic's balancer is power of two choices: with equal loads, 60 calls reach all three
    // (a server is left out with a chance of about (2/3)^60).
    let served = spread(&handle, 60).await;
    assert_eq!(
        served.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[&servers[0], &servers[1], &servers[2]]),
        "{served:?}"
    );
    // The channel itself, for clients typed `GreeterClient<Channel>`, balances the same set.
    let mut plain = GreeterClient::new(channel);
    let reply = plain
        .say_hello(HelloRequest { name: "sd".into() })
        .await
        .unwrap();
    assert!(names(&[&servers[0], &servers[1], &servers[2]]).contains(&reply.into_inner().server));

    // A server leaves: once the state shows it, no call reaches it (it still answers).
    let gone = registrars.remove(0);
    gone.deregister().await.unwrap();
    wait_for_state(&handle, "2 instances", |s| s.instances().len() == 2).await;
    let served = spread(&handle, 60).await;
    assert_eq!(
        served.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[&servers[1], &servers[2]]),
        "{served:?}"
    );

    // A new one joins and gets calls.
    let fourth = LocalServer::start().await.unwrap();
    let _fourth_registration = register(&client, &fourth).await;
    wait_for_state(&handle, "3 instances", |s| s.instances().len() == 3).await;
    let served = spread(&handle, 60).await;
    assert!(
        served.contains_key(&fourth.addr().to_string()),
        "{served:?}"
    );
    assert!(!served.contains_key(&servers[0].addr().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_errors_show_in_the_state_and_the_channel_keeps_serving() {
    let mut etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let server = LocalServer::start().await.unwrap();
    let _registration = register(&client, &server).await;
    let instancer = EtcdInstancer::new(client.clone(), PREFIX).await.unwrap();
    let (_channel, handle) = balance_channel(instancer, ChannelOptions::new());

    etcd.kill();
    let state = wait_for_state(&handle, "a discovery error", |s| s.error().is_some()).await;
    assert_eq!(state.instances().len(), 1, "instances kept: {state:?}");
    assert!(!state.is_stopped());
    assert_eq!(
        spread(&handle, 3).await.get(&server.addr().to_string()),
        Some(&3),
        "calls still reach the server while etcd is down"
    );

    etcd.restart().await;
    let state = wait_for_state(&handle, "recovery", |s| s.error().is_none()).await;
    assert_eq!(state.instances().len(), 1);

    let state = handle.state();
    drop(handle);
    assert!(state.borrow().is_stopped());
}

/// Calls through `handle.service()`: the reply's server, or the status.
async fn call(handle: &ChannelHandle) -> Result<String, tonic::Status> {
    GreeterClient::new(handle.service())
        .say_hello(HelloRequest { name: "sd".into() })
        .await
        .map(|r| r.into_inner().server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_no_instance_waits_for_one_then_fails_with_unavailable_and_why() {
    let mut etcd = EtcdServer::start().await;
    let client = etcd.client().await;
    let instancer = EtcdInstancer::new(client.clone(), PREFIX).await.unwrap();
    let wait = Duration::from_millis(1500);
    let options = ChannelOptions::new().no_instances_wait(wait);
    let (_channel, handle) = balance_channel(instancer, options);
    assert!(handle.state().borrow().instances().is_empty());

    // Nothing registered: the call fails after the wait, saying so.
    let started = Instant::now();
    let status = call(&handle).await.unwrap_err();
    assert!(started.elapsed() >= wait, "failed before the wait was over");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "no instance to call after waiting 1.5s: no instance of the service is registered"
    );

    // A server that registers during the wait gets the call.
    let server = LocalServer::start().await.unwrap();
    let waiting = tokio::spawn({
        let service = handle.service();
        async move {
            GreeterClient::new(service)
                .say_hello(HelloRequest { name: "sd".into() })
                .await
                .map(|r| r.into_inner().server)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let registration = register(&client, &server).await;
    assert_eq!(waiting.await.unwrap().unwrap(), server.addr().to_string());

    // Deregistered, then etcd gone: the reason is the failing discovery.
    registration.deregister().await.unwrap();
    wait_for_state(&handle, "no instance", |s| s.instances().is_empty()).await;
    etcd.kill();
    wait_for_state(&handle, "a discovery error", |s| s.error().is_some()).await;
    let status = call(&handle).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .starts_with("no instance to call after waiting 1.5s: service discovery is failing: "),
        "{status:?}"
    );

    // Stopped: at once.
    let service = handle.service();
    drop(handle);
    let started = Instant::now();
    let status = GreeterClient::new(service)
        .say_hello(HelloRequest { name: "sd".into() })
        .await
        .unwrap_err();
    assert!(started.elapsed() < wait, "no wait once stopped");
    assert!(
        status.message().starts_with("service discovery stopped"),
        "{status:?}"
    );
}

const GREETER: &str = env!("CARGO_BIN_EXE_greeter");

/// Starts `greeter serve` on a port the system chooses; returns it and the address it serves.
fn start_server(etcd: &str, extra: &[&str]) -> (Program, String) {
    let mut args = vec!["serve", "--etcd", etcd, "--addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut server = Program::start(GREETER, &args);
    let line = server.expect_line("serving ");
    let addr = line["serving ".len()..].to_string();
    server.expect_line(&format!("registered {PREFIX}{addr}"));
    (server, addr)
}

/// Starts `greeter call` making `count` calls, one every 10 ms.
fn greeter_call(etcd: &str, count: u32) -> Program {
    let count = count.to_string();
    Program::start(
        GREETER,
        &["call", "--etcd", etcd, "--count", &count, "--every", "10ms"],
    )
}

async fn greeter_keys(etcd: &EtcdServer) -> Vec<String> {
    let mut raw = etcd.raw_client().await;
    let resp = raw
        .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("read greeter keys");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_serve_registers_once_listening_and_deregisters_on_sigterm_and_sigint() {
    let etcd = EtcdServer::start().await;
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let (mut server, addr) = start_server(&etcd.endpoint(), &[]);
        assert_eq!(greeter_keys(&etcd).await, [format!("{PREFIX}{addr}")]);
        let mut call = greeter_call(&etcd.endpoint(), 2);
        call.expect_line(&format!("ok {addr}"));
        call.expect_line("calls 2 ok 2 failed 0");
        assert!(call.wait(), "call exits 0 when every call succeeded");

        server.signal(sig);
        server.expect_line(&format!("{name}: shutting down"));
        server.expect_line(&format!("deregistered {PREFIX}{addr}"));
        server.expect_line("stopped");
        assert!(server.wait(), "serve exits 0 after {name}");
        assert!(
            greeter_keys(&etcd).await.is_empty(),
            "deregistered on {name}"
        );
    }

    // Nothing registered: every call fails, and the exit status says so.
    let mut call = greeter_call(&etcd.endpoint(), 1);
    call.expect_line("error ");
    call.expect_line("calls 1 ok 0 failed 1");
    assert!(!call.wait());
}

/// A reader that went away (a pipe's reader stopped by the same Ctrl-C) does not keep a
/// shutting-down server from deregistering: it still exits 0 and leaves no key behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_serve_deregisters_even_when_its_stdout_is_gone() {
    use std::io::BufRead;
    let etcd = EtcdServer::start().await;
    let mut child = std::process::Command::new(GREETER)
        .args(["serve", "--etcd", &etcd.endpoint(), "--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start greeter serve");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    while !line.starts_with("registered ") {
        line.clear();
        let read = stdout.read_line(&mut line).expect("read greeter's stdout");
        assert!(read > 0, "greeter ended before registering");
    }
    assert_eq!(greeter_keys(&etcd).await.len(), 1);
    drop(stdout); // the reader goes away
                  // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task")
        .expect("wait for greeter");
    assert!(status.success(), "greeter serve: {status}");
    assert!(greeter_keys(&etcd).await.is_empty(), "key left registered");
}

/// What `greeter call` printed, read line by line.
#[derive(Debug, Default)]
struct CallOutput {
    /// The server of each successful call, in order, with the index of its line.
    ok: Vec<(usize, String)>,
    errors: Vec<String>,
    /// `ejected <addr> for ...` lines: (line index, addr).
    ejected: Vec<(usize, String)>,
    summary: Option<String>,
}

impl CallOutput {
    fn read(&mut self, index: usize, line: &str) {
        if let Some(addr) = line.strip_prefix("ok ") {
            self.ok.push((index, addr.to_string()));
        } else if let Some(e) = line.strip_prefix("error ") {
            self.errors.push(e.to_string());
        } else if let Some(rest) = line.strip_prefix("ejected ") {
            let addr = rest.split(' ').next().unwrap_or_default();
            self.ejected.push((index, addr.to_string()));
        } else if line.starts_with("calls ") {
            self.summary = Some(line.to_string());
        }
    }
}

/// The greeter's settings, stated: 3 attempts per call, retries never going back to an instance
/// that failed in the call, and an instance failing 2 calls in a row ejected for 30 s. With
/// two servers alive, a call makes at most one attempt on the killed one, and the killed one
/// fails at most 2 attempts before it is ejected for longer than the run: no call fails.
const MAX_FAILED_CALLS: usize = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_calls_keep_succeeding_when_a_server_crashes() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    // A registration outlives the run: calls must leave the killed server before its TTL ends.
    let ttl = ["--heartbeat", "3s", "--ttl", "30s"];
    let (_a, addr_a) = start_server(&endpoint, &ttl);
    let (killed, addr_killed) = start_server(&endpoint, &ttl);
    let (_c, addr_c) = start_server(&endpoint, &ttl);
    let all: BTreeSet<String> = [&addr_a, &addr_killed, &addr_c]
        .into_iter()
        .cloned()
        .collect();

    let mut call = greeter_call(&endpoint, 300);
    let mut out = CallOutput::default();
    let mut index = 0;
    // Kill one server a third of the way in, without deregistering (SIGKILL).
    while out.ok.len() + out.errors.len() < 100 {
        let line = call
            .next_line(Duration::from_secs(20))
            .expect("call ended early");
        out.read(index, &line);
        index += 1;
    }
    killed.signal(libc::SIGKILL);
    let killed_at = index;
    while let Some(line) = call.next_line(Duration::from_secs(20)) {
        out.read(index, &line);
        index += 1;
    }
    let text = call.seen.join("\n");

    assert_eq!(
        out.errors.len(),
        MAX_FAILED_CALLS,
        "calls failed beyond the bound:\n{text}"
    );
    assert_eq!(
        out.summary.as_deref(),
        Some("calls 300 ok 300 failed 0"),
        "{text}"
    );
    assert!(call.wait(), "call exits 0 when every call succeeded");
    assert!(out.ok.iter().all(|(_, s)| all.contains(s)), "{text}");
    let before: BTreeSet<String> = out.ok[..100].iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(before, all, "round robin over the three before the kill");

    // The crash is noticed through failed attempts, and the killed server ejected ...
    let ejected_at = out
        .ejected
        .iter()
        .find(|(_, addr)| *addr == addr_killed)
        .map(|(i, _)| *i)
        .unwrap_or_else(|| panic!("{addr_killed} never ejected:\n{text}"));
    assert!(
        ejected_at >= killed_at,
        "ejected before it was killed:\n{text}"
    );
    // ... after which no call reaches it, and the two others share the calls.
    let after: Vec<&String> = out
        .ok
        .iter()
        .filter(|(i, _)| *i > ejected_at)
        .map(|(_, s)| s)
        .collect();
    assert!(!after.contains(&&addr_killed), "{text}");
    for alive in [&addr_a, &addr_c] {
        assert!(
            after.contains(&alive),
            "{alive} got no call after the crash:\n{text}"
        );
    }
    // All this before the killed server's registration expired.
    assert!(
        greeter_keys(&etcd)
            .await
            .contains(&format!("{PREFIX}{addr_killed}")),
        "the killed server's key is still registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_refuses_bad_flags_a_busy_address_and_unreachable_etcd() {
    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    // Nothing listens there: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = format!("http://{closed}");
    for (args, says) in [
        (vec!["call", "--count", "0"], "--count 0"),
        (vec!["call", "--every", "0s"], "--every 0s"),
        (vec!["call", "--timeout", "400days"], "at most 365 days"),
        (
            vec!["serve", "--ttl", "1s", "--heartbeat", "3s"],
            "ttl 1s must be longer than the heartbeat 3s",
        ),
        (
            vec!["serve", "--etcd", &endpoint, "--addr", &busy_addr],
            &format!("cannot listen on {busy_addr}"),
        ),
        (
            vec!["serve", "--etcd", &endpoint, "--addr", "0.0.0.0:0"],
            "clients cannot dial 0.0.0.0",
        ),
        (
            vec!["serve", "--etcd", &endpoint, "--addr", "[::]:0"],
            "clients cannot dial ::",
        ),
        (
            vec!["call", "--etcd", &unreachable, "--dial-timeout", "300ms"],
            "could not connect to etcd",
        ),
        (
            vec!["serve", "--etcd", &unreachable, "--dial-timeout", "300ms"],
            "could not connect to etcd",
        ),
    ] {
        let out = tokio::process::Command::new(GREETER)
            .args(&args)
            .output()
            .await
            .expect("run greeter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(greeter_keys(&etcd).await.is_empty(), "nothing registered");
}
