//! Developer tasks for the sd workspace: `cargo xtask <task>`.
//!
//! - `ci`: what CI runs: formatting check, clippy with `-D warnings`, the libraries' docs with
//!   `-D warnings`, a build of the libraries on their declared `rust-version`, every test of the
//!   workspace (etcd integration tests included: `etcd` must be on `PATH`; as root it is
//!   installed with apt-get when missing).
//! - `bench`: the criterion benchmarks.
//! - `etcd [--nodes N]`: a local etcd on loopback for trying the examples, until Ctrl-C.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("etcd") => etcd(&args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            usage();
            Ok(())
        }
        Some(other) => Err(format!("unknown task {other:?}; run `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() {
    println!(
        "usage: cargo xtask <task>\n\n\
         tasks:\n  \
         ci                 fmt check, clippy -D warnings, docs, rust-version build, all tests\n                            (installs etcd, Go and the rust-version toolchain as root if missing)\n  \
         bench [ARGS]       cargo bench --workspace [ARGS]\n  \
         etcd [--nodes N]   run a local etcd (1 or 3 nodes) on 127.0.0.1 until Ctrl-C"
    );
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn on_path(bin: &str) -> bool {
    env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
        .unwrap_or(false)
}

/// Where Debian's `golang-etcd-server-dev` puts etcd's Go naming package (the Go interop test
/// builds against it).
const GO_ETCD_NAMING: &str = "/usr/share/gocode/src/go.etcd.io/etcd/clientv3/naming/endpoints";

/// The etcd integration tests need `etcd`; the interop test needs Go and etcd's Go client.
fn etcd_present() -> bool {
    on_path("etcd") && on_path("etcdctl")
}

fn go_present() -> bool {
    on_path("go") && std::path::Path::new(GO_ETCD_NAMING).is_dir()
}

/// Installs Debian's `packages` when `present` says they are missing, if we can (root, apt-get).
fn ensure(what: &str, present: fn() -> bool, packages: &[&str]) -> Result<(), String> {
    if present() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root || !on_path("apt-get") {
        return Err(format!(
            "{what} is missing: install it (Debian: apt-get install {}) and run again; the \
             integration tests need it",
            packages.join(" ")
        ));
    }
    eprintln!(
        "xtask: {what} not found, installing {} with apt-get",
        packages.join(" ")
    );
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)?;
    if present() {
        Ok(())
    } else {
        Err(format!(
            "apt-get installed {} but {what} is still missing",
            packages.join(" ")
        ))
    }
}

fn ci() -> Result<(), String> {
    ensure("etcd", etcd_present, &["etcd-server", "etcd-client"])?;
    ensure(
        "Go with etcd's Go client",
        go_present,
        &["golang-go", "golang-etcd-server-dev"],
    )?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let mut doc = cargo();
    doc.args([
        "doc",
        "--workspace",
        "--exclude",
        "xtask",
        "--all-features",
        "--no-deps",
        "--lib",
    ])
    .env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    msrv()?;
    let mut test = cargo();
    // Benchmarks are built (to keep them compiling) by clippy above, not run here.
    test.args(["test", "--workspace", "--all-features", "--no-fail-fast"]);
    run(test)?;
    Ok(())
}

/// The libraries' declared `rust-version` (the workspace's), which this checks they build with.
const MSRV: &str = "1.88";

/// Builds the libraries, every feature on, with the toolchain of their `rust-version`
/// (installed with rustup when missing; skipped with a warning where it cannot be), in a target
/// directory of its own.
fn msrv() -> Result<(), String> {
    let toolchain = format!("+{MSRV}");
    let installed = Command::new("rustc")
        .arg(&toolchain)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        let mut install = Command::new("rustup");
        install.args(["toolchain", "install", MSRV, "--profile", "minimal"]);
        if let Err(e) = run(install) {
            // Not every machine can download a toolchain: say so loudly rather than fail the
            // tests over it.
            eprintln!(
                "xtask: WARNING: rust-version check SKIPPED: Rust {MSRV} could not be installed \
                 ({e}); run `rustup toolchain install {MSRV}` and `cargo xtask ci` again to check it"
            );
            return Ok(());
        }
    }
    let mut check = Command::new("cargo");
    check
        .current_dir(root())
        .arg(&toolchain)
        .args([
            "check",
            "--package",
            "sd-core",
            "--package",
            "sd-lb",
            "--package",
            "sd-memory",
            "--package",
            "sd-etcd",
            "--all-features",
            "--lib",
        ])
        .env("CARGO_TARGET_DIR", root().join("target").join("msrv"))
        // The outer cargo's variables name its own toolchain.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    run(check)
}

fn bench(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["bench", "--workspace"]).args(extra);
    run(cmd)
}

fn etcd(extra: &[String]) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--package",
        "sd-etcd",
        "--features",
        "testing",
        "--example",
        "local-etcd",
        "--",
    ])
    .args(extra);
    run(cmd)
}
