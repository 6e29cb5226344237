//! A local etcd on loopback for trying the examples: `cargo xtask etcd [--nodes N] [--port P]`
//! (which runs `cargo run -p sd-etcd --features testing --example local-etcd -- ...`).
//!
//! Runs until Ctrl-C; the etcd processes die with this one. Data lives under
//! `target/local-etcd/` and is wiped at each start.

use std::path::PathBuf;
use std::time::Duration;

use sd_etcd::testing::{EtcdCluster, ServerOptions};

fn usage() -> ! {
    eprintln!("usage: local-etcd [--nodes N] [--port P]   (defaults: 1 node, client port 2379)");
    std::process::exit(2)
}

fn main() {
    let mut nodes = 1usize;
    let mut port = 2379u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--nodes" | "-n" => nodes = value(&mut args).parse().unwrap_or_else(|_| usage()),
            "--port" | "-p" => port = value(&mut args).parse().unwrap_or_else(|_| usage()),
            "--help" | "-h" => usage(),
            _ => usage(),
        }
    }
    if nodes == 0 {
        usage();
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().map(PathBuf::from).unwrap_or(manifest);
    let dir = workspace
        .join("target")
        .join("local-etcd")
        .join(format!("{nodes}-node"));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("local-etcd: cannot start a runtime: {e}");
            std::process::exit(1)
        }
    };
    let options = ServerOptions::new()
        .with_data_dir(&dir)
        .with_client_port(port);
    let mut cluster = rt.block_on(EtcdCluster::start_with(nodes, options));
    let endpoints = cluster.endpoints().join(",");
    println!(
        "etcd is running ({nodes} node(s), data in {})",
        dir.display()
    );
    println!("  export ETCD_ENDPOINTS={endpoints}");
    println!("Ctrl-C to stop.");
    // Keep the runtime's threads alive but idle; block until the etcd processes exit.
    let _guard = rt.enter();
    std::thread::sleep(Duration::from_millis(10));
    cluster.wait();
}
