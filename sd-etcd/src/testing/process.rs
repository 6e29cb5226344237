//! Running the `etcd` and `etcdctl` binaries: spawning etcd so it dies with this process,
//! signalling it, picking ports, and where node data lives.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Spawns children from one thread that lives as long as the process, each with
/// `PR_SET_PDEATHSIG` = SIGKILL: the death signal fires when the *thread* that forked dies, and
/// test threads come and go.
#[cfg(target_os = "linux")]
pub(crate) fn spawn(mut cmd: Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    use std::sync::Mutex;

    type Req = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the etcd spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("etcd spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("etcd spawner thread is gone"))?
}

/// Spawns a child. Without a parent-death signal on this OS, a child outlives this process
/// only if the process is killed before the handle is dropped.
#[cfg(not(target_os = "linux"))]
pub(crate) fn spawn(mut cmd: Command) -> io::Result<Child> {
    cmd.spawn()
}

/// Sends `sig` to a child that has not been reaped yet.
pub(crate) fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain syscall on the PID of a child we have not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A port no other node of this process got, free right now.
///
/// Ports come from below the kernel's ephemeral range: a port in that range can be taken at any
/// moment by an outgoing connection's local end (etcd's own clients included), which would make
/// etcd's listen, or a restart on the same port, fail with "address already in use".
pub(crate) fn next_port() -> u16 {
    const LOW: u32 = 10_000;
    static NEXT: OnceLock<(AtomicU32, u32)> = OnceLock::new();
    let (next, high) = NEXT.get_or_init(|| {
        let high = ephemeral_low().clamp(LOW + 1_000, 65_535);
        (AtomicU32::new(LOW + fastrand::u32(0..high - LOW)), high)
    });
    loop {
        let p = next.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (p - LOW) % (high - LOW);
        if let Ok(port) = u16::try_from(port) {
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
}

/// The first port of the kernel's ephemeral range (Linux's default when it can't be read).
#[cfg(target_os = "linux")]
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768)
}

/// The first port of the ephemeral range the IANA suggests, used by the BSDs and macOS.
#[cfg(not(target_os = "linux"))]
fn ephemeral_low() -> u32 {
    49_152
}

/// A new temporary directory for node data: under `/dev/shm` where it exists (fsync stalls on
/// a slow disk trigger elections with the fast election flags used here), else under the
/// system's temporary directory.
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix("sd-etcd-test-");
    #[cfg(target_os = "linux")]
    let t = {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            b.tempdir_in(shm)
        } else {
            b.tempdir()
        }
    };
    #[cfg(not(target_os = "linux"))]
    let t = b.tempdir();
    t.unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on `PATH`.
pub(crate) fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

/// The etcdctl binary: `$ETCDCTL_BIN`, else `etcdctl` on `PATH`.
pub(crate) fn etcdctl_bin() -> String {
    std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".to_string())
}

/// Runs `etcdctl` (v3 API) with `args` on a blocking thread and returns its stdout; panics with
/// its output if it cannot start or fails.
pub(crate) async fn etcdctl(args: Vec<OsString>) -> String {
    let bin = etcdctl_bin();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let run = {
        let bin = bin.clone();
        move || {
            Command::new(&bin)
                .args(&args)
                .env("ETCDCTL_API", "3")
                .stdin(std::process::Stdio::null())
                .output()
        }
    };
    let output = tokio::task::spawn_blocking(run)
        .await
        .unwrap_or_else(|e| panic!("running `{bin} {shown}`: {e}"))
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `{bin}` ({e}): install etcdctl (Debian: apt-get install \
                 etcd-client) or set ETCDCTL_BIN"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        panic!(
            "`{bin} {shown}` failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
}
