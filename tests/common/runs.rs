//! Running the `expmon` binary against a Kafka-protocol broker: a working
//! directory with the demo config and data, producing with `expmon gen`, and
//! consumer runs whose output and health points the tests read.

use super::broker::Broker;
use super::{diff, totals_from_jsonl, Totals};
use expmon::config::Config;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_expmon");

/// A working directory with a demo config.
pub struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        let d = Dir { dir: tempfile::tempdir().unwrap() };
        let out = Command::new(BIN)
            .args(["gen", "--profile", "demo", "--events", "0", "--out", "file:none.jsonl"])
            .args(["--write-config", "demo.toml"])
            .current_dir(d.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self) -> Config {
        Config::load(&self.path("demo.toml")).unwrap()
    }

    /// The `demo` events of `seed`, as lines.
    pub fn events(&self, seed: u64, n: u64) -> Vec<Vec<u8>> {
        let file = format!("events-{seed}-{n}.jsonl");
        let out = Command::new(BIN)
            .args(["gen", "--profile", "demo", "--events", &n.to_string(), "--seed", &seed.to_string()])
            .args(["--out", &format!("file:{file}")])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(self.path(&file))
            .unwrap()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// `expmon gen` sending `lines` (from a file: the test's own copy of the
    /// lines is the truth) to `topic`, keyed by session id, optionally paced.
    fn producer(&self, broker: &Broker, topic: &str, lines: &[Vec<u8>], rate: Option<u32>) -> Command {
        let file = self.path(&format!("produce-{}-{}.jsonl", lines.len(), rate.unwrap_or(0)));
        std::fs::write(&file, super::jsonl(lines)).unwrap();
        let mut c = Command::new(BIN);
        c.args(["gen", "--replay", file.to_str().unwrap()]);
        if let Some(r) = rate {
            c.args(["--rate", &r.to_string()]);
        }
        c.arg("--out").arg(format!("kafka://{}/{topic}?partitions=8", broker.addr())).current_dir(self.dir.path());
        c
    }

    /// Produces `lines` to `topic` and waits for every acknowledgement.
    pub fn produce(&self, broker: &Broker, topic: &str, lines: &[Vec<u8>]) {
        let out = self.producer(broker, topic, lines, None).output().unwrap();
        assert!(out.status.success(), "producing failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts producing `lines` to `topic` at `rate` events/s in the
    /// background; the caller waits for the child.
    pub fn produce_paced(&self, broker: &Broker, topic: &str, lines: &[Vec<u8>], rate: u32) -> Child {
        self.producer(broker, topic, lines, Some(rate)).stderr(Stdio::null()).spawn().unwrap()
    }

    /// Starts `expmon run` on `topic` in `group`, writing to `out`.
    pub fn consume(&self, broker: &Broker, topic: &str, group: &str, out: &str) -> Consumer {
        self.consume_with(broker, topic, &format!("group={group}"), out)
    }

    /// Starts `expmon run` on `topic` with address options `options`.
    pub fn consume_with(&self, broker: &Broker, topic: &str, options: &str, out: &str) -> Consumer {
        self.consume_args(broker, topic, options, out, &["--threads", "2"])
    }

    /// Starts `expmon run` on `topic` with address options `options` (after
    /// `session.timeout.ms=6000&idle_timeout=1s` unless they set those) and
    /// more command-line arguments.
    pub fn consume_args(&self, broker: &Broker, topic: &str, options: &str, out: &str, args: &[&str]) -> Consumer {
        let stderr = std::fs::File::create(self.path(&format!("{out}.stderr"))).unwrap();
        // The defaults `options` does not set: an address takes each key once.
        let given = |key: &str| options.split('&').any(|kv| kv.split_once('=').is_some_and(|(k, _)| k == key));
        let defaults: String = [("session.timeout.ms", "6000"), ("idle_timeout", "1s")]
            .iter()
            .filter(|(k, _)| !given(k))
            .map(|(k, v)| format!("{k}={v}&"))
            .collect();
        let source = format!("kafka://{}/{topic}?{defaults}{options}", broker.addr());
        let child = Command::new(BIN)
            .args(["run", "--config", "demo.toml", "--source", &source, "--sink", &format!("file:{out}")])
            .args(["--trigger", "200ms", "--status", "false"])
            .args(args)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Consumer { child: Some(child), out: self.path(out), stderr: self.path(&format!("{out}.stderr")) }
    }
}

pub struct Consumer {
    pub child: Option<Child>,
    pub out: PathBuf,
    pub stderr: PathBuf,
}

impl Consumer {
    /// The last value of health metric `name` written, and how many times it was.
    pub fn health(&self, name: &str) -> (i64, usize) {
        last_health(&std::fs::read_to_string(&self.out).unwrap_or_default(), name)
    }

    /// Waits until the run has read `n` events and written a few more triggers
    /// since (so the offsets of the last flush are acknowledged and committed).
    pub fn wait_for_events(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut seen_at = None;
        loop {
            let (events, flushes) = self.health("events_in");
            assert!(events <= n, "read {events} events, only {n} were produced");
            if events == n {
                let since = *seen_at.get_or_insert(flushes);
                if flushes >= since + 5 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "read {events} of {n} events in 90 s; stderr: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM: drain, flush, commit, exit 0.
    pub fn stop(&mut self) -> String {
        let mut child = self.child.take().unwrap();
        send_signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        assert!(status.success(), "expmon run failed: {}", self.log());
        self.log()
    }

    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    pub fn totals(&self, dc: &str) -> Totals {
        totals_from_jsonl(&std::fs::read_to_string(&self.out).unwrap(), dc)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// In a file sink's output: the last value of health metric `expmon.NAME`
/// (0 if none) and how many times it was written.
pub fn last_health(text: &str, name: &str) -> (i64, usize) {
    let needle = format!(r#"{{"name":"expmon.{name}","#);
    let mut last = (0, 0);
    for l in text.lines().filter(|l| l.starts_with(&needle)) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        last = (v["value"].as_i64().unwrap(), last.1 + 1);
    }
    last
}

pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid}");
}

/// The same events `ms` later (malformed lines unchanged).
pub fn shifted(lines: &[Vec<u8>], ms: i64) -> Vec<Vec<u8>> {
    lines
        .iter()
        .map(|l| match serde_json::from_slice::<serde_json::Value>(l) {
            Ok(mut v) if v.get("ts").and_then(|t| t.as_i64()).is_some() => {
                v["ts"] = (v["ts"].as_i64().unwrap() + ms).into();
                serde_json::to_vec(&v).unwrap()
            }
            _ => l.clone(),
        })
        .collect()
}

pub fn assert_totals(expected: &Totals, actual: &Totals) {
    let d = diff(expected, actual);
    assert!(d.is_empty(), "{} differences, first: {d:#?}", d.len());
    assert!(!expected.is_empty());
}
