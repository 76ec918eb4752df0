//! The one way tests run the `expmon` binary, like ripgrep's one test macro.
//!
//! - [`Expmon`] owns a temporary working directory (optionally holding the
//!   demo config as `demo.toml`) and reads and writes its files.
//! - [`Cmd`] builds one invocation in it: `x.run().config(..).source(..)
//!   .sink(..).arg(..)`, or `x.cmd(&["gen", ..])`, with `.env(..)` and
//!   `.input(..)` (bytes on stdin), and ends in `.output()`, `.ok()` (asserts
//!   success, returns stderr) or `.fails()`; or in `.spawn()`.
//! - A [`Running`] process has a piped stdin ([`Running::send`]), its stdout
//!   and stderr in files of the directory (so a test can read the log while it
//!   runs and wait for a line of it), can be signalled, stopped with SIGTERM
//!   (stdin left open), ended by closing stdin, or killed; it is killed when
//!   dropped.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_expmon");

/// How long a test waits for a running process to say something.
const LOG_WAIT: Duration = Duration::from_secs(60);

/// A temporary working directory to run `expmon` in.
pub struct Expmon {
    dir: tempfile::TempDir,
    spawned: std::cell::Cell<usize>,
}

impl Expmon {
    pub fn new() -> Expmon {
        Expmon { dir: tempfile::tempdir().unwrap(), spawned: Default::default() }
    }

    /// A directory holding the demo config as `demo.toml`, as `expmon gen
    /// --write-config` writes it.
    pub fn with_demo_config() -> Expmon {
        let x = Expmon::new();
        x.cmd(&["gen", "--profile", "demo", "--events", "0", "--out", "file:none.jsonl"])
            .args(["--write-config", "demo.toml"])
            .ok();
        x
    }

    /// A file of the directory (`""`: the directory).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    /// A file's text; empty if there is no such file (yet).
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// A JSON Lines file's non-empty lines.
    pub fn lines(&self, name: &str) -> Vec<Vec<u8>> {
        lines_of(&self.path(name))
    }

    /// `expmon ARGS` in the directory.
    pub fn cmd(&self, args: &[&str]) -> Cmd {
        let mut command = Command::new(BIN);
        command.args(args).current_dir(self.dir.path());
        let n = self.spawned.get();
        self.spawned.set(n + 1);
        Cmd { command, input: None, dir: self.dir.path().to_path_buf(), name: format!("expmon-{n}") }
    }

    /// `expmon run --status false`: no status panel, whatever the terminal.
    pub fn run(&self) -> Cmd {
        self.cmd(&["run", "--status", "false"])
    }

    /// `expmon ARGS`, run to its end.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output()
    }

    /// `expmon ARGS`, asserted to succeed; its stderr.
    pub fn ok(&self, args: &[&str]) -> String {
        self.cmd(args).ok()
    }

    /// `expmon ARGS`, asserted to fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        self.cmd(args).fails()
    }
}

/// One invocation of `expmon`, being built.
pub struct Cmd {
    command: Command,
    input: Option<Vec<u8>>,
    dir: PathBuf,
    name: String,
}

impl Cmd {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.command.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cmd {
        self.command.args(args);
        self
    }

    pub fn config(self, path: &str) -> Cmd {
        self.args(["--config", path])
    }

    pub fn source(self, source: &str) -> Cmd {
        self.args(["--source", source])
    }

    pub fn sink(self, sink: &str) -> Cmd {
        self.args(["--sink", sink])
    }

    pub fn env(mut self, key: &str, value: &str) -> Cmd {
        self.command.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Cmd {
        self.command.env_remove(key);
        self
    }

    /// Bytes for stdin, then its end (for [`Cmd::output`]).
    pub fn input(mut self, bytes: impl Into<Vec<u8>>) -> Cmd {
        self.input = Some(bytes.into());
        self
    }

    /// Runs to the end: its status, stdout and stderr.
    pub fn output(mut self) -> Output {
        let Some(input) = self.input.take() else { return self.command.output().unwrap() };
        let mut child =
            self.command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // A run refused before it reads exits at once: a broken pipe then is expected.
        let _ = child.stdin.take().unwrap().write_all(&input);
        child.wait_with_output().unwrap()
    }

    /// Runs to the end, asserting success; its stderr.
    pub fn ok(self) -> String {
        let what = format!("{:?}", self.command.get_args().collect::<Vec<_>>());
        let out = self.output();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "expmon {what} failed: {err}");
        err
    }

    /// Runs to the end, asserting failure; its stderr.
    pub fn fails(self) -> String {
        let what = format!("{:?}", self.command.get_args().collect::<Vec<_>>());
        let out = self.output();
        assert!(!out.status.success(), "expmon {what} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    /// Names the spawned process's output files (`NAME.log`, `NAME.stdout`).
    pub fn named(mut self, name: &str) -> Cmd {
        self.name = name.to_string();
        self
    }

    /// Starts it with a piped stdin, its stderr in `NAME.log` and its stdout
    /// in `NAME.stdout` of the directory.
    pub fn spawn(mut self) -> Running {
        let log = self.dir.join(format!("{}.log", self.name));
        let stdout = self.dir.join(format!("{}.stdout", self.name));
        let mut child = self
            .command
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Running { child: Some(child), stdin, log, stdout }
    }
}

/// A started `expmon`; killed if still running when dropped.
pub struct Running {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
    stdout: PathBuf,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Writes `bytes` to stdin and flushes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes.as_ref()).unwrap();
        stdin.flush().unwrap();
    }

    /// Writes each line, newline-terminated, to stdin and flushes.
    pub fn send_lines(&mut self, lines: &[Vec<u8>]) {
        self.send(super::jsonl(lines));
    }

    /// Closes stdin: the end of a `file:-` source's input.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of stderr contains `needle` and returns that line.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log in {LOG_WAIT:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`TERM`, `HUP`, `KILL`, …).
    pub fn signal(&self, signal: &str) {
        send_signal(self.id(), signal);
    }

    /// Waits for it to exit (stdin left as it is): its status and output.
    pub fn wait(&mut self) -> Output {
        let status = self.child.take().expect("running").wait().unwrap();
        drop(self.stdin.take());
        let read = |p: &Path| std::fs::read(p).unwrap_or_default();
        Output { status, stdout: read(&self.stdout), stderr: read(&self.log) }
    }

    /// Its status and output if it has exited (stdin left as it is).
    pub fn try_wait(&mut self) -> Option<Output> {
        self.child.as_mut().expect("running").try_wait().unwrap()?;
        Some(self.wait())
    }

    /// Closes stdin (the end of input) and waits for it to exit.
    pub fn finish(&mut self) -> Output {
        self.close_stdin();
        self.wait()
    }

    /// SIGTERM with stdin still open (a stop, not an end of input), then waits.
    pub fn stop(&mut self) -> Output {
        self.signal("TERM");
        self.wait()
    }

    /// SIGKILL, then waits.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
        drop(self.stdin.take());
    }

    /// Whether it has not been waited for yet.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A line `Key:   value` of /proc/PID/status: its first number.
    pub fn proc_status(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.id())).unwrap();
        let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid}");
}

/// A TCP port free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A JSON Lines file's non-empty lines.
pub fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path).unwrap().split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}
