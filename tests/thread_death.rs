//! A thread that dies stops the run loudly: a panic in a KairosDB sender, a
//! shard worker, the writer or the router (made on purpose with
//! `EXPMON_FAILPOINT=panic:NAME@N`) ends `expmon run` with exit status 1 and
//! one error line naming the thread, instead of a half-working engine that
//! only shows the loss at exit, if at all. What can be kept is kept: the
//! other senders deliver the dead one's points, and no checkpoint is
//! published past points the sink has not acknowledged, so a restart ends
//! exactly where an uninterrupted run would.

mod common;

use common::kairos_server::KairosServer;
use common::{diff, Cmd, Expmon, Totals};
use std::path::PathBuf;
use std::process::Output;

/// A demo data set in a directory of the harness.
struct Run {
    x: Expmon,
}

impl Run {
    /// A demo data set of `events` lines in a fresh directory.
    fn new(events: &str) -> Run {
        let r = Run { x: Expmon::new() };
        let out = r.expmon(
            &["gen", "--profile", "demo", "--events", events, "--seed", "11", "--out", "file:events.jsonl"],
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        r
    }

    fn path(&self, name: &str) -> PathBuf {
        self.x.path(name)
    }

    /// `expmon ARGS` here; `failpoint` sets `EXPMON_FAILPOINT`. Without
    /// `RUST_BACKTRACE`, so that what the binary itself prints is seen.
    fn cmd(&self, args: &[&str], failpoint: Option<&str>) -> Cmd {
        let c = self.x.cmd(args).env_remove("RUST_BACKTRACE").env_remove("EXPMON_FAILPOINT");
        match failpoint {
            Some(f) => c.env("EXPMON_FAILPOINT", f),
            None => c,
        }
    }

    fn expmon(&self, args: &[&str], failpoint: Option<&str>) -> Output {
        self.cmd(args, failpoint).output()
    }

    /// Runs the data set into `sink`, flushing often.
    fn run(&self, sink: &str, extra: &[&str], failpoint: Option<&str>) -> Output {
        let mut args = vec!["run", "--source", "file:events.jsonl", "--sink", sink, "--trigger", "1ms"];
        args.extend(["--threads", "2", "--metrics-addr", "off", "--status", "false"]);
        args.extend(extra);
        self.expmon(&args, failpoint)
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Sink spec with fast retries for tests.
fn spec(server: &KairosServer, extra: &str) -> String {
    format!("kairosdb:{}?batch=200&linger=5ms&backoff=5ms&backoff_max=100ms&timeout=2s&drain=20s{extra}", server.url())
}

/// Exit status 1, and exactly one line about the panic: the error line naming
/// the thread (`expmon: error: thread expmon-kairos-1 panicked: failpoint …`).
fn assert_died_loudly(out: &Output, thread: &str, failpoint: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let about: Vec<&str> = err.lines().filter(|l| l.contains("panicked") || l.contains("expmon: error")).collect();
    assert_eq!(about.len(), 1, "one line about the death: {err}");
    let line = about[0];
    assert!(line.starts_with(&format!("expmon: error: thread {thread}")), "names the thread: {line}");
    assert!(line.contains(&format!("panicked: failpoint {failpoint}")), "says why: {line}");
}

#[test]
fn a_panicking_kairos_sender_stops_the_run_with_one_error_line() {
    let r = Run::new("20000");
    let server = KairosServer::start();
    let out = r.run(&spec(&server, "&inflight=2"), &[], Some("panic:kairos.send@2"));
    assert_died_loudly(&out, "expmon-kairos-", "kairos.send");
}

#[test]
fn a_panicking_shard_stops_the_run_with_one_error_line() {
    let r = Run::new("20000");
    let out = r.run("file:out.jsonl", &[], Some("panic:shard.flush@3"));
    assert_died_loudly(&out, "expmon-shard-", "shard.flush");
}

#[test]
fn a_panicking_writer_stops_the_run_with_one_error_line() {
    let r = Run::new("20000");
    let out = r.run("file:out.jsonl", &[], Some("panic:writer.flush@3"));
    assert_died_loudly(&out, "expmon-writer", "writer.flush");
}

#[test]
fn a_panicking_router_stops_the_run_with_one_error_line() {
    let r = Run::new("20000");
    let out = r.run("file:out.jsonl", &[], Some("panic:router.flush@3"));
    assert_died_loudly(&out, "expmon-router", "router.flush");
}

/// Non-zero experiment points of a file sink's output.
fn file_totals(text: &str) -> Totals {
    common::totals_from_jsonl(text, "dc1")
}

/// Non-zero experiment points a server stored.
fn server_totals(server: &KairosServer) -> Totals {
    let mut out = Totals::new();
    for ((name, tags, ts), v) in server.state().points.iter() {
        if !name.starts_with("expmon.") && *v != 0 {
            out.insert((name.clone(), tags["device"].clone(), tags["login"].clone(), *ts), *v);
        }
    }
    out
}

/// The only sender dies at its third request: everything after is never
/// delivered. The run must stop loudly without publishing a checkpoint past
/// those points (no final checkpoint, no publish of a pending one), so that
/// the next run, restoring from what was published, ends at the same totals
/// as an uninterrupted run.
#[test]
fn a_dead_kairos_sender_publishes_no_checkpoint_past_undelivered_points() {
    let r = Run::new("20000");
    let expected = r.run("file:expected.jsonl", &[], None);
    assert!(expected.status.success(), "{}", stderr(&expected));
    let expected = file_totals(&std::fs::read_to_string(r.path("expected.jsonl")).unwrap());
    assert!(expected.len() > 200, "a meaningful data set: {}", expected.len());

    let server = KairosServer::start();
    let ck = ["--checkpoint", "ck", "--checkpoint-interval", "1ms"];
    let first = r.run(&spec(&server, "&inflight=1"), &ck, Some("panic:kairos.send@3"));
    assert_died_loudly(&first, "expmon-kairos-0", "kairos.send");
    let missing = expected.iter().filter(|(k, v)| server_totals(&server).get(*k) != Some(v)).count();
    assert!(missing > 0, "the dead sender left points undelivered");

    let second = r.run(&spec(&server, ""), &ck, None);
    assert!(second.status.success(), "{}", stderr(&second));
    let d = diff(&expected, &server_totals(&server));
    assert!(d.is_empty(), "after the restart, {} differences, first: {d:#?}", d.len());
}

/// The HTTP thread is an engine thread too: a panic while answering a
/// request (here at the `http.request` failpoint) stops the run with one
/// line, where it used to end only that connection's task, unseen.
#[test]
fn a_panicking_http_handler_stops_the_run_with_one_error_line() {
    use std::io::{Read, Write};
    let r = Run::new("10");
    let run_args = ["run", "--source", "file:-", "--sink", "null", "--trigger", "50ms", "--status", "false"];
    // Stdin stays open and quiet: the run goes on until told.
    let mut run = r.cmd(&run_args, Some("panic:http.request")).args(["--metrics-addr", "127.0.0.1:0"]).spawn();
    let line = run.wait_for_log("metrics http://");
    let addr = line.split("metrics http://").nth(1).unwrap().trim().trim_end_matches("/metrics").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 500"), "{}", String::from_utf8_lossy(&answer));
    // The run stops by itself although its stdin stays open; bounded at 30 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        if let Some(out) = run.try_wait() {
            break out;
        }
        if std::time::Instant::now() > deadline {
            panic!("the run went on after its HTTP thread panicked: {}", run.log());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (status, seen) = (out.status, stderr(&out));
    assert_eq!(status.code(), Some(1), "{seen}");
    let about: Vec<&str> = seen.lines().filter(|l| l.contains("panicked") || l.contains("expmon: error")).collect();
    assert_eq!(about.len(), 1, "one line about the death: {seen}");
    assert!(about[0].starts_with("expmon: error: thread expmon-http panicked: failpoint http.request"), "{seen}");
}
