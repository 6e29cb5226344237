//! Running the example programs as a user does: a child process whose stdout lines arrive on
//! a channel, read with a deadline.

#![allow(dead_code)] // each test binary uses a part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running program; killed (and reaped) when dropped.
pub struct Program {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Program {
    /// Starts `binary` with `args`, stdout piped to us, stderr to the test's.
    pub fn start(binary: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary);
        cmd.args(args);
        Self::spawn(cmd, format!("{binary} {}", args.join(" ")))
    }

    /// Starts `cmd` (for a test that sets its environment too), called `name` in failures.
    pub fn spawn(mut cmd: Command, name: String) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
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
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line, or `None` at the end of output; panics after `within`.
    pub fn next_line(&mut self, within: Duration) -> Option<String> {
        match self.lines.recv_timeout(within) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "{} printed nothing for {within:?}; it printed:\n{}",
                self.name,
                self.seen.join("\n")
            ),
        }
    }

    /// Waits for a line containing `needle` and returns it; panics with everything seen after
    /// 20 s or at the end of output.
    pub fn expect_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "{} never printed {needle:?}; it printed:\n{}",
            self.name,
            self.seen.join("\n")
        );
    }

    /// Sends `sig` (SIGTERM, SIGINT, SIGKILL, ...).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {}", self.name);
    }

    /// Waits for the program to exit and asserts that it succeeded.
    pub fn wait_success(&mut self) {
        assert!(self.wait(), "{} failed", self.name);
    }

    /// Waits at most `within` for the program to exit; returns its exit code.
    pub fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the program") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the program to exit; returns whether it succeeded.
    pub fn wait(&mut self) -> bool {
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name))
            .success()
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
