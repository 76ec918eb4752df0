//! `/metrics` as operators' tools see it (issue 17, items 1, 2 and 5): a real
//! Prometheus (Debian's `prometheus` package, `/usr/bin/prometheus` and
//! `/usr/bin/promtool`, installed by `.ci/run`) scrapes an `expmon run` that
//! consumes a Kafka topic of known lines from the test broker, and its query
//! API must give back what the run did: every line counted, the malformed
//! ones by reason, the consumer lag of every partition. `promtool check
//! metrics` must find no problem in the scraped text, and every query of the
//! Grafana dashboard (`dashboards/expmon.json`) must name only families the
//! engine exports ([`expmon::health::prometheus::FAMILIES`]) and be accepted
//! by that Prometheus.
//!
//! Everything listens on loopback; every wait is bounded by count and time;
//! every child is killed at the end, also on failure (Drop guards).

mod common;

use common::broker::Broker;
use common::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use expmon::health::prometheus::FAMILIES;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
const DASHBOARD: &str = include_str!("../dashboards/expmon.json");
const T0: i64 = 1_767_225_600_000;

/// One HTTP/1.0 GET on loopback: the body, or `None` if it could not be had.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Percent-encodes a PromQL expression for a query string.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus on loopback scraping one target every second, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: expmon\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{PROMETHEUS}: {e} (install Debian's prometheus package, see .ci/run)"));
        let p = Prometheus { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(port, "/-/ready").is_none_or(|b| !b.contains("Ready")) {
            assert!(Instant::now() < deadline, "prometheus not ready in 60 s: {}", p.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The API's answer to an instant query (`status` success asserted).
    fn query(&self, q: &str) -> serde_json::Value {
        let body = http_get(self.port, &format!("/api/v1/query?query={}", encode(q)))
            .unwrap_or_else(|| panic!("no answer to {q}"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {e}: {body}"));
        assert_eq!(v["status"], "success", "{q}: {body}");
        v
    }

    /// The value of a query answering one sample, `None` if it answers none.
    fn value(&self, q: &str) -> Option<f64> {
        let v = self.query(q);
        let result = v["data"]["result"].as_array().unwrap_or_else(|| panic!("{q}: {v}"));
        assert!(result.len() <= 1, "{q}: one sample expected: {v}");
        result.first().map(|r| r["value"][1].as_str().unwrap().parse().unwrap())
    }

    /// Waits (60 s at most) until `q` answers `want`.
    fn wait_for(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.value(q);
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{q} is {got:?}, not {want}, after 60 s; prometheus: {}", self.log());
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` valid events from `first` on, then malformed lines of known
/// reasons: (lines, malformed count by reason).
fn batch(first: usize, count: usize) -> (Vec<Vec<u8>>, [(&'static str, usize); 3]) {
    let mut lines: Vec<Vec<u8>> = (first..first + count)
        .map(|i| {
            let variation = if i % 2 == 0 { 1231 } else { 1232 };
            ev(T0 + i as i64 * 50, &format!("s{}", i / 4), "home_page", "desktop", "guest", &[(123, variation)])
        })
        .collect();
    let not_json = 7;
    let not_object = 3;
    let missing_field: usize = 5;
    lines.extend((0..not_json).map(|i| format!("{{not json {i}").into_bytes()));
    lines.extend((0..not_object).map(|i| format!("[{i}, 2]").into_bytes()));
    lines.extend((0..missing_field).map(|i| format!(r#"{{"ts":{},"tenant":"uswm"}}"#, T0 + i as i64).into_bytes()));
    (lines, [("not_json", not_json), ("not_object", not_object), ("missing_field", missing_field)])
}

/// The text a scrape of `port`'s `/metrics` gives once the engine has written
/// its first trigger.
fn scrape(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(text) = http_get(port, "/metrics").filter(|t| t.contains("expmon_events_in_total")) {
            return text;
        }
        assert!(Instant::now() < deadline, "no figures on /metrics in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `promtool check metrics` on `text`: its complaints (empty: none).
fn promtool_problems(text: &str) -> String {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PROMTOOL}: {e} (install Debian's prometheus package, see .ci/run)"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("exit {:?}: {said}", out.status.code())
    }
}

#[test]
fn promtool_rejects_the_old_hand_written_text() {
    // What `/metrics` served before issue 17: the check is not blind.
    let old = "# TYPE expmon_events_in gauge\nexpmon_events_in{dc=\"dc1\",instance=\"h\"} 5\n\
               # TYPE expmon_write_latency_us gauge\nexpmon_write_latency_us{dc=\"dc1\",quantile=\"p99\"} 3\n";
    let problems = promtool_problems(old);
    assert!(problems.contains("no help text") && problems.contains("quantile"), "{problems}");
}

/// A real Prometheus scrapes a run consuming a topic of known lines; its
/// answers are what the run did, and promtool finds no problem.
#[test]
fn a_real_prometheus_scrapes_what_the_run_did() {
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    let (first, bad) = batch(0, 400);
    dir.produce(&broker, "events", &first);
    let port = free_port();
    let options = "group=prom&statistics.interval.ms=500";
    let metrics_addr = format!("127.0.0.1:{port}");
    let run = dir.consume_args(&broker, "events", options, "out.jsonl", &["--metrics-addr", &metrics_addr]);
    let prometheus = Prometheus::start(&metrics_addr);
    prometheus.wait_for("up{job=\"expmon\"}", 1.0);
    let scraped = |q: &str| format!("{q}{{job=\"expmon\"}}");

    // Prometheus holds the first batch before the second is produced, so the
    // counter's increase over the run is at least the second batch.
    prometheus.wait_for(&scraped("expmon_events_in_total"), first.len() as f64);
    let (second, _) = batch(400, 600);
    dir.produce(&broker, "events", &second);
    let sent = (first.len() + second.len()) as f64;
    prometheus.wait_for(&scraped("expmon_events_in_total"), sent);
    let increase = prometheus.value("increase(expmon_events_in_total[10m])").unwrap();
    assert!(increase >= second.len() as f64, "increase {increase} over the run");
    assert_eq!(prometheus.value("resets(expmon_events_in_total[10m])"), Some(0.0), "a counter never goes down");
    assert!(prometheus.value("rate(expmon_events_in_total[10m])").is_some_and(|r| r > 0.0));

    // The malformed lines, by reason, and in all.
    let mut malformed = 0;
    for (reason, n) in bad {
        let q = format!("expmon_events_rejected_by_reason_total{{job=\"expmon\",reason=\"{reason}\"}}");
        prometheus.wait_for(&q, 2.0 * n as f64);
        malformed += 2 * n;
    }
    prometheus.wait_for(&scraped("expmon_events_rejected_total"), malformed as f64);
    assert_eq!(
        prometheus.value("sum(expmon_events_rejected_by_reason_total)"),
        Some(malformed as f64),
        "no other reason"
    );

    // The consumer lag of each of the 8 partitions, 0 once everything is read.
    prometheus.wait_for("count(expmon_kafka_consumer_lag == 0)", 8.0);
    assert_eq!(prometheus.value("max(expmon_kafka_consumer_lag)"), Some(0.0));
    // Base units: memory in bytes, the write latency a histogram.
    assert!(prometheus.value("expmon_resident_memory_bytes").is_some_and(|b| b > 1e6));
    assert!(prometheus.value("sum(expmon_write_latency_seconds_bucket{le=\"+Inf\"})").is_some());

    // The text Prometheus scraped passes promtool, and every family of the
    // table that this run has is in it.
    let text = scrape(port);
    assert_eq!(promtool_problems(&text), "", "{text}");
    for name in ["expmon_events_in_total", "expmon_kafka_consumer_lag", "expmon_write_latency_seconds"] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing: {text}");
    }

    // Every query of the dashboard is valid PromQL there, and those of the
    // throughput, rejections and lag panels answer.
    for expr in dashboard_exprs() {
        let q = expr.replace("$__rate_interval", "1m");
        prometheus.query(&q);
    }
    for q in ["sum(rate(expmon_events_in_total[1m]))", "sum by (reason) (expmon_events_rejected_by_reason_total)"] {
        assert!(!prometheus.query(q)["data"]["result"].as_array().unwrap().is_empty(), "{q}");
    }
    drop(prometheus);
    drop(run);
    drop(broker);
}

/// The `expr` of every target of every panel of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboards/expmon.json is valid JSON");
    let panels = d["panels"].as_array().expect("a panels array");
    let mut out = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        for t in targets {
            out.push(t["expr"].as_str().unwrap_or_else(|| panic!("target without expr: {t}")).to_string());
        }
    }
    out
}

/// The `expmon_…` names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("expmon_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The dashboard names only series the engine exports, and has the panels
/// operators need: throughput, lag, rejections by reason, sink latency and
/// errors, memory.
#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let exported: BTreeSet<String> = FAMILIES.iter().flat_map(|f| f.series()).collect();
    let exprs = dashboard_exprs();
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "a query naming no expmon metric: {e}");
        for n in names {
            assert!(exported.contains(&n), "{e}: {n} is not exported (families: {exported:?})");
            used.insert(n);
        }
    }
    for needed in [
        "expmon_events_in_total",
        "expmon_kafka_consumer_lag",
        "expmon_events_rejected_by_reason_total",
        "expmon_write_latency_seconds_bucket",
        "expmon_write_errors_total",
        "expmon_resident_memory_bytes",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
    assert_eq!(
        metric_names("rate(expmon_a_total[1m]) / expmon_b"),
        ["expmon_a_total", "expmon_b"].map(String::from).into()
    );
}

/// The README's table shows every family of [`FAMILIES`] beside its KairosDB
/// point name.
#[test]
fn the_readme_table_lists_every_family() {
    let readme = include_str!("../README.md");
    for f in FAMILIES.iter() {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}", f.point)) && l.contains(&format!("`{}", f.exposed())))
            .unwrap_or_else(|| panic!("README has no row for {} ↔ {}", f.point, f.exposed()));
        let kind = format!("{:?}", f.kind).to_lowercase();
        assert!(row.ends_with(&format!("| {kind} |")), "{row}");
    }
}
