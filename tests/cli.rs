//! Whole-binary tests: the `expmon` executable, run the way an operator runs it,
//! through one small harness ([`Expmon`]).

mod common;

use common::*;
use expmon::config::Config;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the built `expmon` binary in a temporary directory.
struct Expmon {
    dir: tempfile::TempDir,
}

impl Expmon {
    fn new() -> Expmon {
        Expmon { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_expmon")).args(args).current_dir(self.dir.path()).output().unwrap()
    }

    /// Runs and asserts success, returning stderr.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "expmon {args:?} failed: {err}");
        err
    }

    /// Starts the binary with a piped stdin (and stderr).
    fn spawn_with_stdin(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_expmon"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .current_dir(self.dir.path())
            .spawn()
            .unwrap()
    }

    /// Runs and asserts failure, returning stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "expmon {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    }
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path).unwrap().split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

#[test]
fn generated_replay_equals_reference_at_every_width() {
    let x = Expmon::new();
    let events = x.path("events.jsonl");
    x.ok(&[
        "gen",
        "--profile",
        "demo",
        "--events",
        "60000",
        "--seed",
        "7",
        "--out",
        &format!("file:{}", events.display()),
    ]);
    let config = Config::demo();
    let expected = reference(&config, &lines_of(&events));
    assert!(expected.len() > 500, "a meaningful amount of output: {}", expected.len());
    let mut summaries = Vec::new();
    for threads in ["1", "2", "4", "8"] {
        let out = x.path(&format!("out-{threads}.jsonl"));
        let err = x.ok(&[
            "run",
            "--source",
            &format!("file:{}", events.display()),
            "--sink",
            &format!("file:{}", out.display()),
            "--threads",
            threads,
        ]);
        let got = totals_from_jsonl(&std::fs::read_to_string(&out).unwrap(), "dc1");
        let d = diff(&expected, &got);
        assert!(d.is_empty(), "threads={threads}: {d:#?}");
        // The summary's counter lines (the first summary line has the timing).
        let counters = err.lines().skip_while(|l| !l.starts_with("  rejected")).take(2);
        summaries.push(counters.map(str::to_string).collect::<Vec<_>>());
    }
    // The data exercises late drops, and counters other than timing agree.
    assert!(!summaries[0][0].contains("late dropped 0,"), "{:?}", summaries[0]);
    assert!(summaries.windows(2).all(|w| w[0] == w[1]), "{summaries:#?}");
}

#[test]
fn file_sink_lines_have_the_spec_shape() {
    let x = Expmon::new();
    let events = x.path("e.jsonl");
    std::fs::write(
        &events,
        "{\"ts\":1525356185123,\"tenant\":\"uswm\",\"session\":\"s-9f2c\",\"mp\":\"home_page\",\"device\":\"desktop\",\"login\":\"in\",\"assign\":{\"123\":1231,\"77\":771}}\n",
    )
    .unwrap();
    x.ok(&["run", "--source", "file:e.jsonl", "--sink", "file:o.jsonl", "--instance", "node7"]);
    let text = std::fs::read_to_string(x.path("o.jsonl")).unwrap();
    // Health metrics go to the same sink, tagged dc and instance (SPEC §6).
    let health =
        text.lines().find(|l| l.starts_with(r#"{"name":"expmon.events_in","tags":{"dc":"dc1","instance":"node7"}"#));
    assert!(health.is_some_and(|l| l.ends_with(r#""value":1}"#)), "{text}");
    assert!(
        text.lines().any(|l| l
            == r#"{"name":"uswm.session.assigned.1231","tags":{"dc":"dc1","device":"desktop","login":"in"},"timestamp":1525356180000,"value":1}"#),
        "{text}"
    );
}

#[test]
fn embedded_demo_runs_and_writes_points() {
    let x = Expmon::new();
    let err = x.ok(&["run", "--duration", "3s", "--trigger", "1s"]);
    let text = std::fs::read_to_string(x.path("expmon-out/points.jsonl")).unwrap();
    assert!(text.lines().count() > 10, "points written: {err}");
    assert!(text.contains("uswm.session.assigned.123"), "{text}");
    assert!(err.contains("events in"), "{err}");
}

#[test]
fn stdin_source_and_null_sink() {
    let x = Expmon::new();
    let mut child = x.spawn_with_stdin(&["run", "--source", "file:-", "--sink", "null"]);
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, r#"{{"ts":1525356185123,"tenant":"uswm","session":"a","mp":"home_page"}}"#).unwrap();
        writeln!(stdin, "garbage").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 events in") && err.contains("not_json=1"), "{err}");
}

#[test]
fn check_config_prints_summary_or_a_located_error() {
    let x = Expmon::new();
    std::fs::write(x.path("good.toml"), expmon::config::DEMO_CONFIG).unwrap();
    let out = x.run(&["check-config", "good.toml"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 experiments, 12 variations, 3 tenants"));

    std::fs::write(x.path("bad.toml"), "[[experiment]]\nid = 1\ntenant = \"a\"\nvariations = [5]\n\n[[experiment]]\nid = 2\ntenant = \"a\"\nvariations = [5]\n").unwrap();
    let err = x.fails(&["check-config", "bad.toml"]);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("bad.toml:9: experiment[1].variations: variation id 5 is already used by experiment 1"),
        "{err}"
    );

    let err = x.fails(&["run", "--config", "bad.toml", "--source", "file:x"]);
    assert!(err.contains("bad.toml:9:"), "{err}");
}

#[test]
fn bad_flags_give_one_clear_line() {
    let x = Expmon::new();
    for (args, needle) in [
        (vec!["run", "--source", "nope:x"], "bad source"),
        (vec!["run", "--source", "file:/does/not/exist.jsonl", "--sink", "null"], "cannot open /does/not/exist.jsonl"),
        (vec!["run", "--source", "gen:demo?events=10", "--sink", "carrier-pigeon"], "bad sink"),
        (vec!["run", "--source", "gen:nosuch?events=10"], "unknown generator profile"),
        (vec!["check-config", "/does/not/exist.toml"], "cannot read config file"),
    ] {
        let err = x.fails(&args);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn generator_is_reproducible_and_in_process_source_matches_it() {
    let x = Expmon::new();
    x.ok(&["gen", "--profile", "demo", "--events", "5000", "--seed", "3", "--out", "file:a.jsonl"]);
    x.ok(&["gen", "--profile", "demo", "--events", "5000", "--seed", "3", "--out", "file:b.jsonl"]);
    assert_eq!(std::fs::read(x.path("a.jsonl")).unwrap(), std::fs::read(x.path("b.jsonl")).unwrap());
    x.ok(&["run", "--source", "file:a.jsonl", "--sink", "file:from-file.jsonl"]);
    x.ok(&["run", "--source", "gen:demo?events=5000&seed=3", "--sink", "file:from-gen.jsonl"]);
    let a = totals_from_jsonl(&std::fs::read_to_string(x.path("from-file.jsonl")).unwrap(), "dc1");
    let b = totals_from_jsonl(&std::fs::read_to_string(x.path("from-gen.jsonl")).unwrap(), "dc1");
    assert!(!a.is_empty());
    assert!(diff(&a, &b).is_empty());
}

#[test]
fn sigterm_drains_flushes_and_exits_zero_even_with_a_quiet_stdin() {
    let x = Expmon::new();
    let mut child = x.spawn_with_stdin(&["run", "--source", "file:-", "--sink", "file:o.jsonl", "--trigger", "1h"]);
    let mut stdin = child.stdin.take().unwrap();
    {
        use std::io::Write;
        writeln!(
            stdin,
            r#"{{"ts":1525356185123,"tenant":"uswm","session":"a","mp":"home_page","assign":{{"123":1231}}}}"#
        )
        .unwrap();
        stdin.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped promptly");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(x.path("o.jsonl")).unwrap();
    assert!(text.contains(r#""name":"uswm.session.assigned.1231""#), "the pending minute was flushed: {text}");
}
