//! The KairosDB sink against a strict KairosDB-protocol server
//! (`tests/common/kairos_server.rs`), with faults injected: for each fault,
//! the points stored at the end equal the file sink's final totals for the same
//! input — nothing lost, nothing extra — except points the server refused with
//! a 400, which are never retried and must all be in the dead-letter file.

mod common;

use common::kairos_server::{Fault, KairosServer, StoredId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

/// A demo data set in a directory of the harness.
struct Run {
    x: common::Expmon,
}

impl Run {
    /// A demo data set of `events` lines in a fresh directory.
    fn new(events: &str) -> Run {
        let r = Run { x: common::Expmon::new() };
        let out =
            r.expmon(&["gen", "--profile", "demo", "--events", events, "--seed", "11", "--out", "file:events.jsonl"]);
        assert!(out.status.success());
        r
    }

    fn path(&self, name: &str) -> PathBuf {
        self.x.path(name)
    }

    fn expmon(&self, args: &[&str]) -> Output {
        self.x.output(args)
    }

    /// Runs the data set into `sink`, flushing often so that points are
    /// rewritten (and coalesced) many times.
    fn run(&self, sink: &str) -> Output {
        self.expmon(&["run", "--source", "file:events.jsonl", "--sink", sink, "--trigger", "1ms", "--threads", "2"])
    }

    /// Final values of the file sink for the same input (zeros included).
    fn expected(&self) -> BTreeMap<StoredId, i64> {
        let out = self.run("file:expected.jsonl");
        assert!(out.status.success());
        read_points(&std::fs::read_to_string(self.path("expected.jsonl")).unwrap())
    }
}

/// Experiment points of a file-sink or dead-letter file (health lines and the
/// dead-letter file's request lines skipped).
fn read_points(text: &str) -> BTreeMap<StoredId, i64> {
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with(r#"{"name":"expmon."#)) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v.get("name").is_none() {
            continue;
        }
        let tags =
            v["tags"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        out.insert(
            (v["name"].as_str().unwrap().to_string(), tags, v["timestamp"].as_i64().unwrap()),
            v["value"].as_i64().unwrap(),
        );
    }
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Sink spec with fast retries for tests.
fn spec(server: &KairosServer, extra: &str) -> String {
    format!(
        "kairosdb:{}?batch=200&linger=5ms&backoff=5ms&backoff_max=100ms&timeout=300ms&drain=20s{extra}",
        server.url()
    )
}

/// The points a server stored, health points (`expmon.*`) apart.
fn experiment_points(stored: &BTreeMap<StoredId, i64>) -> BTreeMap<StoredId, i64> {
    stored.iter().filter(|(k, _)| !k.0.starts_with("expmon.")).map(|(k, v)| (k.clone(), *v)).collect()
}

/// The stored experiment points (health points apart) equal `expected`.
fn assert_same(expected: &BTreeMap<StoredId, i64>, stored: &BTreeMap<StoredId, i64>) {
    let stored = &experiment_points(stored);
    assert!(expected.len() > 200, "a meaningful data set: {}", expected.len());
    let missing: Vec<_> = expected.iter().filter(|(k, v)| stored.get(*k) != Some(v)).take(5).collect();
    let extra: Vec<_> = stored.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing or wrong: {missing:?}\nextra: {extra:?}");
    assert_eq!(expected.len(), stored.len());
}

#[test]
fn delivers_exactly_the_file_sink_totals_gzipped_and_grouped() {
    let r = Run::new("30000");
    let expected = r.expected();
    let server = KairosServer::start();
    let out = r.run(&spec(&server, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("0 undelivered"), "{}", stderr(&out));
    let st = server.state();
    assert_same(&expected, &st.points);
    assert!(st.requests > 1);
    assert_eq!(st.gzip_requests, st.requests, "every request is gzipped");
    assert!(st.refused.is_empty(), "{:?}", st.refused);
    // Health metrics go through the same writer, tagged dc and instance.
    let health: Vec<_> = st.points.keys().filter(|k| k.0 == "expmon.events_in").collect();
    assert!(!health.is_empty(), "health points stored");
    assert!(health.iter().all(|k| k.1.contains_key("dc") && k.1.contains_key("instance")));
    assert!(st.points.keys().any(|k| k.0 == "expmon.write_latency_us"));
}

#[test]
fn retries_through_500s_429s_dropped_connections_and_timeouts() {
    let r = Run::new("30000");
    let expected = r.expected();
    let server = KairosServer::start();
    server.state().faults.extend([
        Fault::Error500,
        Fault::Error500,
        Fault::TooMany429,
        Fault::Drop,
        Fault::Hang(Duration::from_millis(600)),
        Fault::Error500,
        Fault::Drop,
        Fault::TooMany429,
    ]);
    let out = r.run(&spec(&server, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("retries") && !err.contains(" 0 retries"), "{err}");
    assert_same(&expected, &server.state().points);
}

#[test]
fn slow_server_and_a_small_queue_push_back_without_loss() {
    let r = Run::new("20000");
    let expected = r.expected();
    let server = KairosServer::start();
    server.state().delay = Duration::from_millis(15);
    // An address takes each key once: batch=100 replaces spec's batch=200.
    let out = r.run(&spec(&server, "&queue=300&inflight=2").replace("batch=200", "batch=100"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&expected, &server.state().points);
}

#[test]
fn server_down_for_a_while_then_back() {
    let r = Run::new("20000");
    let expected = r.expected();
    let server = KairosServer::start();
    server.state().faults.push_back(Fault::Down(Duration::from_millis(1500)));
    let out = r.run(&spec(&server, ""));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&expected, &server.state().points);
}

#[test]
fn partial_400_is_not_retried_and_goes_to_the_dead_letter_file() {
    let r = Run::new("20000");
    let expected = r.expected();
    let server = KairosServer::start();
    server.state().faults.extend([Fault::Partial400, Fault::Partial400]);
    let out = r.run(&spec(&server, "&dead_letter=rejected.jsonl"));
    // A point refused for good is a loss the operator must see: exit 1, one line.
    assert!(!out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("kairosdb refused"), "{err}");
    let text = std::fs::read_to_string(r.path("rejected.jsonl")).unwrap();
    let refused_line = format!(
        "expmon: error: {} upserts refused by KairosDB (HTTP 400), kept in rejected.jsonl",
        text.lines().filter(|l| l.starts_with(r#"{"name":"#)).count()
    );
    assert_eq!(err.trim_end().lines().last(), Some(refused_line.as_str()), "{err}");
    let dead = read_points(&text);
    assert!(!dead.is_empty());
    let st = server.state();
    assert_eq!(st.requests as usize, st.requests as usize);
    // Every final total is stored, or was refused (and dead-lettered) with that value.
    for (k, v) in &expected {
        assert!(st.points.get(k) == Some(v) || dead.get(k) == Some(v), "{k:?}={v} neither stored nor dead-lettered");
    }
    assert!(
        st.points.keys().filter(|k| !k.0.starts_with("expmon.")).all(|k| expected.contains_key(k)),
        "nothing extra"
    );
}

#[test]
fn start_up_check_gives_one_clear_line() {
    let r = Run::new("10");
    let server = KairosServer::start();
    server.state().impostor = true;
    let out = r.run(&format!("kairosdb:{}", server.url()));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("is not KairosDB"), "{err}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = r.run(&format!("kairosdb:http://{closed}"));
    let err = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach KairosDB"), "{err}");
}

#[test]
fn undeliverable_points_are_reported_at_the_drain_deadline() {
    let r = Run::new("5000");
    let server = KairosServer::start();
    server.state().faults.push_back(Fault::Down(Duration::from_secs(3600)));
    let out =
        r.run(&format!("kairosdb:{}?linger=5ms&backoff=5ms&backoff_max=50ms&timeout=200ms&drain=1s", server.url()));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("could not be delivered"), "{err}");
}

#[test]
fn basic_auth_from_the_url() {
    let r = Run::new("3000");
    let expected = r.expected();
    let server = KairosServer::start();
    // base64("user:secret")
    server.state().basic_auth = Some("dXNlcjpzZWNyZXQ=".into());
    let url = server.url().replace("http://", "http://user:secret@");
    let out = r.run(&format!("kairosdb:{url}?linger=5ms"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(experiment_points(&server.state().points), expected);
    let out = r.run(&format!("kairosdb:{}", server.url()));
    assert!(!out.status.success(), "no credentials: refused at start");
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
}

#[test]
fn https_with_a_private_ca() {
    let r = Run::new("3000");
    let expected = r.expected();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(r.path("ca.pem"), cert.cert.pem()).unwrap();
    let server = KairosServer::start_tls(cert.cert.der().to_vec(), cert.key_pair.serialize_der());
    let url = format!("https://localhost:{}", server.addr.port());
    let out = r.run(&format!("kairosdb:{url}?linger=5ms&ca=ca.pem"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(experiment_points(&server.state().points), expected);
    // Without the CA the server is not trusted: one clear line at start.
    let out = r.run(&format!("kairosdb:{url}"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach KairosDB"), "{}", stderr(&out));
}

/// What broke: the health points (`expmon.*`, with `expmon.experiment.*` of
/// 1,000 experiments) went out as one request of 10,505 points with
/// `batch=2000`, past both batch limits.
#[test]
fn health_points_respect_the_batch_limits() {
    let r = Run::new("10");
    let out = r.expmon(&[
        "gen",
        "--profile",
        "peak",
        "--events",
        "3000",
        "--seed",
        "1",
        "--out",
        "file:peak.jsonl",
        "--write-config",
        "peak.toml",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let server = KairosServer::start();
    let (batch, batch_bytes) = (2000, 150_000);
    let sink = format!("kairosdb:{}?batch={batch}&batch_bytes={batch_bytes}&linger=5ms", server.url());
    let out =
        r.expmon(&["run", "--config", "peak.toml", "--source", "file:peak.jsonl", "--sink", &sink, "--threads", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = server.state();
    let health = st.points.keys().filter(|k| k.0.starts_with("expmon.")).count();
    assert!(health > batch, "enough health points to need several requests: {health}");
    assert!(st.refused.is_empty(), "{:?}", st.refused);
    let over: Vec<_> = st.request_sizes.iter().filter(|&&(n, bytes)| n > batch || bytes > batch_bytes).collect();
    assert!(over.is_empty(), "requests over batch={batch} or batch_bytes={batch_bytes}: {over:?}");
}

/// What broke: with KairosDB answering 400 to everything (its error text
/// naming each refused metric), each dead-letter line repeated its request's
/// whole error text (1,540 points made 92.6 MB), a log line held all of it
/// (58,781 characters), and the run exited 0.
#[test]
fn refused_requests_keep_the_dead_letter_file_linear_and_fail_the_run() {
    let r = Run::new("3000");
    let expected = r.expected();
    let server = KairosServer::start();
    server.state().refuse_all = true;
    let out = r.run(&spec(&server, "&dead_letter=rejected.jsonl"));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    let long: Vec<_> = err.lines().filter(|l| l.len() > 1000).map(|l| l.len()).collect();
    assert!(long.is_empty(), "stderr lines over 1,000 characters: {long:?}");
    assert!(err.contains("kairosdb refused"), "{err}");

    // One request line (error text bounded) then its points, each tagged with it.
    let text = std::fs::read_to_string(r.path("rejected.jsonl")).unwrap();
    let (mut requests, mut points, mut announced, mut current) = (0, 0, 0, 0);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v.get("name").is_some() {
            assert!(l.len() < 400, "a point line carries no error text: {l}");
            assert_eq!(v["request"], current, "{l}");
            points += 1;
        } else {
            assert!(l.len() < 2600, "the error text is cut: {} bytes", l.len());
            assert_eq!(v["status"], 400, "{l}");
            current = v["request"].as_u64().unwrap();
            announced += v["points"].as_u64().unwrap();
            requests += 1;
        }
    }
    assert!(requests > 1 && points as u64 == announced, "{requests} requests, {points} points, {announced} announced");
    assert_eq!(read_points(&text), expected, "every refused experiment point is kept");
    let refused = format!("expmon: error: {points} upserts refused by KairosDB (HTTP 400), kept in rejected.jsonl");
    assert_eq!(err.trim_end().lines().last(), Some(refused.as_str()), "{err}");
    assert!(err.contains(&format!("{points} rejected")), "the summary counts them: {err}");
}

/// The KairosDB sink's write latency reaches `/metrics` as a Prometheus
/// histogram: one observation per write request (`_count` equals
/// `expmon_write_requests_total` once the sink is idle), `le="+Inf"` equal to
/// `_count`, a positive `_sum`.
#[test]
fn write_latency_is_a_prometheus_histogram_of_every_request() {
    use std::io::{Read, Write};
    let r = Run::new("3000");
    let server = KairosServer::start();
    let port = common::free_port();
    let mut run =
        r.x.cmd(&["run", "--source", "file:-", "--sink", &spec(&server, ""), "--trigger", "100ms"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--status", "false"])
            .spawn();
    run.send(std::fs::read(r.path("events.jsonl")).unwrap());
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        let count = value(&text, "expmon_write_latency_seconds_count{");
        if count.is_some_and(|c| c >= 2.0) && count == value(&text, "expmon_write_requests_total{") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no latency histogram in 60 s: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    run.close_stdin();
    assert!(text.contains("# TYPE expmon_write_latency_seconds histogram"), "{text}");
    let count = value(&text, "expmon_write_latency_seconds_count{");
    let inf = text
        .lines()
        .find(|l| l.starts_with("expmon_write_latency_seconds_bucket{") && l.contains("le=\"+Inf\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(inf, count, "{text}");
    assert!(value(&text, "expmon_write_latency_seconds_sum{").is_some_and(|s| s > 0.0), "{text}");
}

/// Broke: every sender thread had its own "at most every 10 s" limiter, so a
/// failing server got a retry warning per sender at once.
#[test]
fn retry_warnings_are_limited_across_all_senders() {
    let r = Run::new("5000");
    let server = KairosServer::start();
    server.state().faults.push_back(Fault::Down(Duration::from_millis(1500)));
    let started = std::time::Instant::now();
    let out = r.run(&spec(&server, "&inflight=4"));
    let elapsed_s = started.elapsed().as_secs();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let warnings = err.lines().filter(|l| l.contains("retrying with backoff")).count();
    assert!(warnings >= 1, "the outage was said: {err}");
    assert!(warnings as u64 <= 1 + elapsed_s / 10, "{warnings} warnings in {elapsed_s} s: {err}");
}
