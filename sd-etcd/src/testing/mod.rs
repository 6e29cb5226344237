//! Throwaway etcd servers and clusters on loopback, for tests and `cargo xtask etcd`
//! (feature `testing`).
//!
//! Runs the `etcd` binary on `PATH` (or `$ETCD_BIN`): fresh ports from a per-process counter
//! with a random base (kept for a node's whole life, so a restart gets them back), data under
//! `/dev/shm` on Linux (fsync stalls on a slow disk trigger elections with the fast election
//! flags used here; elsewhere, the system's temporary directory),
//! `--heartbeat-interval 10 --election-timeout 100` (a fresh node answers in ~0.1 s).
//! On Linux every etcd is started with `PR_SET_PDEATHSIG`, from a thread that lives as long as
//! the process, so it dies with the test process even when a test panics or is killed;
//! dropping the handle kills it (SIGKILL) by PID. If etcd cannot start, `start` panics with
//! etcd's stderr: tests never pass silently without etcd.
//!
//! A single node can also be wiped (a brand-new, empty cluster on the same ports) or rolled
//! back to a snapshot, as a store that lost or rewound its data; restoring a snapshot runs
//! `etcdctl` (on `PATH`, or `$ETCDCTL_BIN`).
//!
//! ```no_run
//! use sd_etcd::testing::{EtcdServer, ServerOptions};
//!
//! # async fn run() {
//! let mut etcd = EtcdServer::start().await;
//! let client = etcd.client().await;
//! etcd.kill();          // SIGKILL
//! etcd.restart().await; // same ports, same data
//! let snapshot = etcd.snapshot_save().await;
//! etcd.restore_snapshot(&snapshot).await; // same ports, data as in the snapshot
//! etcd.wipe().await;    // same ports, no data, a new cluster id
//! let secure = EtcdServer::start_with(ServerOptions::new().with_tls().with_auth("pw")).await;
//! # let _ = (client, secure); }
//! ```

mod certs;
mod cluster;
mod process;
mod proxy;

pub use certs::TlsFiles;
pub use cluster::{EtcdCluster, EtcdServer, ServerOptions};
pub use proxy::TcpProxy;

/// A loopback port free right now that no etcd or proxy of this process got, for a test's own
/// server (a program's metrics listener, say). It comes from below the kernel's ephemeral
/// range, so no outgoing connection takes it before the server binds it.
///
/// ```
/// let port = sd_etcd::testing::free_port();
/// assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
/// ```
pub fn free_port() -> u16 {
    process::next_port()
}
