//! Bounds that must never lose a valid event silently (SPEC §1): a `ts` from a
//! broken clock is rejected by reason instead of dragging the watermark past
//! everything after it; names beyond a table's bound become `_other`, counted
//! in the run summary, the `expmon.*` health points and `/metrics`.

mod common;

use common::runs::{assert_totals, BIN};
use common::*;
use expmon::config::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A temporary directory to run the binary in.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Runs `expmon` with `args`, asserts success, returns stderr (the summary).
    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(BIN).args(args).current_dir(self.0.path()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "expmon {args:?} failed: {err}");
        err
    }

    /// `expmon run` of the embedded demo config on `lines` to a file sink:
    /// (stderr, the sink's text).
    fn replay(&self, name: &str, lines: &[Vec<u8>]) -> (String, String) {
        let input = format!("{name}.jsonl");
        std::fs::write(self.path(&input), jsonl(lines)).unwrap();
        let out = format!("{name}-out.jsonl");
        let err = self.ok(&[
            "run",
            "--source",
            &format!("file:{input}"),
            "--sink",
            &format!("file:{out}"),
            "--threads",
            "2",
            "--status",
            "false",
            "--metrics-addr",
            "off",
        ]);
        (err, std::fs::read_to_string(self.path(&out)).unwrap())
    }
}

fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    std::fs::read(path).unwrap().split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

/// The last value of health point `expmon.NAME` whose tag `tag` is `value`.
fn last_tagged_health(text: &str, name: &str, tag: &str, value: &str) -> Option<i64> {
    let needle = format!(r#"{{"name":"expmon.{name}","#);
    text.lines()
        .filter(|l| l.starts_with(&needle))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["tags"][tag] == value)
        .last()
        .map(|v| v["value"].as_i64().unwrap())
}

/// The summary's number after `label` (e.g. "late dropped ").
fn summary_number(err: &str, label: &str) -> u64 {
    let at = err.find(label).unwrap_or_else(|| panic!("no {label:?} in the summary: {err}")) + label.len();
    err[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// What broke: one line with `ts = i64::MAX` early in a replay moved the
/// watermark to the end of time, and 19,878 of the next 20,000 events were
/// dropped as late. Now such lines are rejected (`ts_future`) and the rest of
/// the file counts as if they were not there.
#[test]
fn a_far_future_ts_early_in_a_replay_is_rejected_and_drops_nothing_as_late() {
    let d = Dir::new();
    d.ok(&["gen", "--profile", "demo", "--events", "20000", "--seed", "11", "--out", "file:valid.jsonl"]);
    let valid = lines_of(&d.path("valid.jsonl"));
    assert_eq!(valid.len(), 20_000);
    // i64::MAX (19 digits: the serde path) and the year 2100 (the fast path).
    let broken = [
        br#"{"ts":9223372036854775807,"tenant":"uswm","session":"clock","mp":"home_page","assign":{"123":1231}}"#
            .to_vec(),
        br#"{"ts":4102444800000,"tenant":"uswm","session":"clock2","mp":"home_page","assign":{"123":1231}}"#.to_vec(),
    ];
    let mut lines = valid[..3].to_vec();
    lines.push(broken[0].clone());
    lines.extend_from_slice(&valid[3..10]);
    lines.push(broken[1].clone());
    lines.extend_from_slice(&valid[10..]);

    let (clean_err, _) = d.replay("clean", &valid);
    let (err, text) = d.replay("broken", &lines);
    assert!(err.contains("ts_future=2)"), "{err}");
    assert_eq!(summary_number(&err, "rejected "), summary_number(&clean_err, "rejected ") + 2, "{err}");
    assert_eq!(
        summary_number(&err, "late dropped "),
        summary_number(&clean_err, "late dropped "),
        "the broken clock made on-time events late: {err}"
    );
    assert_eq!(last_tagged_health(&text, "events_rejected_by_reason", "reason", "ts_future"), Some(2));
    assert_totals(&reference(&Config::demo(), &valid), &totals_from_jsonl(&text, "dc1"));
}
