//! The operator's HTTP port under hostile clients, through the real binary
//! and real loopback sockets: an oversized request head gets 431 and memory
//! stays bounded, a thousand idle connections add no threads and are closed,
//! only GET and HEAD are served, no large request body is taken, a client that
//! never finishes its head is disconnected, and the routes still answer as
//! before. Every loop here is bounded by a count and a deadline.

mod common;

use common::{free_port, Expmon, Running};
use expmon::serve::{HEADER_READ_TIMEOUT, MAX_HEAD_BYTES};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long a test waits for the server to close a connection it should
/// close: well past the header timeout, so only a server that never closes
/// it fails.
const CLOSE_WAIT: Duration = Duration::from_secs(6 * HEADER_READ_TIMEOUT.as_secs());

/// A running `expmon run` with its HTTP port on a free loopback port, fed an
/// open stdin so that it keeps running.
struct Run {
    run: Running,
    addr: SocketAddr,
    _x: Expmon,
}

impl Run {
    fn start() -> Run {
        let x = Expmon::new();
        x.write("demo.toml", expmon::config::DEMO_CONFIG);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let run = x
            .run()
            .config("demo.toml")
            .source("file:-")
            .sink("file:out.jsonl")
            .args(["--metrics-addr", &addr.to_string(), "--trigger", "100ms", "--threads", "2"])
            .spawn();
        let run = Run { run, addr, _x: x };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_status(&run.get("/healthz"), 200) {
            assert!(Instant::now() < deadline, "the HTTP port never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        run
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(CLOSE_WAIT)).unwrap();
        s.set_write_timeout(Some(CLOSE_WAIT)).unwrap();
        s
    }

    /// Sends `request` on a new connection and reads the answer to its end
    /// (empty when the port is not up yet).
    fn exchange(&self, request: &[u8]) -> Vec<u8> {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10)) else { return Vec::new() };
        s.set_read_timeout(Some(CLOSE_WAIT)).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    fn get(&self, path: &str) -> String {
        String::from_utf8_lossy(&self.exchange(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()))
            .into_owned()
    }

    fn status(&self, key: &str) -> u64 {
        self.run.proc_status(key)
    }

    fn rss_mb(&self) -> u64 {
        self.status("VmRSS") / 1024
    }
}

/// Writes `head` then up to `total` bytes of `filler` in 64 KiB pieces, until
/// the server stops taking them; returns what it answered, if anything
/// (a reset is no answer).
fn flood(mut s: TcpStream, head: &[u8], filler: u8, total: usize) -> Vec<u8> {
    let chunk = vec![filler; 64 * 1024];
    let _ = s.write_all(head);
    for _ in 0..total / chunk.len() {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Whether the server closed `s` (end of stream or reset) instead of leaving
/// it open past `CLOSE_WAIT`; what it said before, if anything.
fn closed_by_server(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(out),
        Err(e) => Err(format!("still open after {CLOSE_WAIT:?}: {e} (read {} bytes)", out.len())),
    }
}

/// Whether `answer` starts with a status line of `code` (HTTP/1.0 or 1.1:
/// the server answers in the request's version).
fn has_status(answer: &str, code: u16) -> bool {
    let line = answer.get(..13).unwrap_or("").to_ascii_uppercase();
    line == format!("HTTP/1.0 {code} ") || line == format!("HTTP/1.1 {code} ")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What broke: a request head had no size limit, so the server kept reading
/// it (tiny_http waited for more and never answered).
#[test]
fn an_oversized_request_head_gets_431() {
    let run = Run::start();
    let mut s = run.connect();
    let mut head = b"GET /".to_vec();
    head.resize(MAX_HEAD_BYTES, b'a');
    s.write_all(&head).unwrap();
    let answer = text(&closed_by_server(&mut s).unwrap());
    assert!(has_status(&answer, 431), "{answer}");
    assert!(run.get("/healthz").ends_with("\r\n\r\nok\n"));
}

/// What broke: a 50 MB request line took the RSS from 30 to 198 MB, four
/// parallel 100 MB ones to 666 MB.
#[test]
fn huge_request_lines_do_not_grow_memory() {
    let run = Run::start();
    let before = run.rss_mb();
    let one = flood(run.connect(), b"GET /", b'a', 50 << 20);
    assert!(one.is_empty() || has_status(&text(&one), 431), "{}", text(&one));
    assert!(run.rss_mb() < 100, "RSS {} MB after a 50 MB request line (before: {before} MB)", run.rss_mb());
    let four: Vec<_> = (0..4)
        .map(|_| {
            let s = run.connect();
            std::thread::spawn(move || flood(s, b"GET /?q=", b'b', 100 << 20))
        })
        .collect();
    for t in four {
        let answer = t.join().unwrap();
        assert!(answer.is_empty() || has_status(&text(&answer), 431), "{}", text(&answer));
    }
    assert!(run.rss_mb() < 100, "RSS {} MB after four 100 MB request lines (before: {before} MB)", run.rss_mb());
    assert!(run.get("/healthz").ends_with("\r\n\r\nok\n"));
}

/// What broke: 1,000 idle connections made 969 threads, and none was ever
/// closed.
#[test]
fn a_thousand_idle_connections_add_no_threads_and_are_closed() {
    let run = Run::start();
    let threads_before = run.status("Threads");
    let mut idle: Vec<TcpStream> = (0..1000).map(|_| run.connect()).collect();
    // One more request, after all of them in the accept queue: once it is
    // answered (served, or refused at the cap), every idle one was accepted.
    let answer = text(&run.exchange(b"GET /healthz HTTP/1.0\r\n\r\n"));
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    let threads = run.status("Threads");
    assert!(threads < 40 && threads <= threads_before + 2, "{threads} threads (before: {threads_before})");
    // Those over the cap are closed at once, the rest after the header timeout.
    for s in &mut idle {
        let said = text(&closed_by_server(s).unwrap());
        assert!(said.is_empty() || has_status(&said, 503) || has_status(&said, 408), "{said}");
    }
    assert!(run.get("/healthz").ends_with("\r\n\r\nok\n"));
}

/// What broke: a client that never finished its request head kept its
/// connection (and, with tiny_http, a thread) for ever.
#[test]
fn a_slow_client_is_disconnected_after_the_header_timeout() {
    let run = Run::start();
    let mut s = run.connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let said = text(&closed_by_server(&mut s).unwrap());
    assert!(said.is_empty() || has_status(&said, 408), "{said}");
    // A kept-alive connection left idle after its answer is closed too.
    let mut s = run.connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let said = text(&closed_by_server(&mut s).unwrap());
    assert!(has_status(&said, 200) && said.ends_with("\r\n\r\nok\n"), "{said}");
}

/// What broke: any method was served (tiny_http answered a POST like a GET)
/// and a request body of any size was accepted.
#[test]
fn only_get_and_head_are_served_and_no_big_body_is_taken() {
    let run = Run::start();
    let mut s = run.connect();
    s.write_all(b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 104857600\r\n\r\n").unwrap();
    let answer = text(&closed_by_server(&mut s).unwrap());
    assert!(has_status(&answer, 405), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nallow: get, head\r\n"), "{answer}");
    // Sending that body anyway is cut off, and memory stays bounded.
    let said =
        flood(run.connect(), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n", b'c', 100 << 20);
    assert!(has_status(&text(&said), 405) || said.is_empty(), "{}", text(&said));
    assert!(run.rss_mb() < 100, "RSS {} MB after a 100 MB POST body", run.rss_mb());

    let mut s = run.connect();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10485760\r\n\r\n").unwrap();
    let answer = text(&closed_by_server(&mut s).unwrap());
    assert!(has_status(&answer, 413), "{answer}");
    let mut s = run.connect();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let answer = text(&closed_by_server(&mut s).unwrap());
    assert!(has_status(&answer, 413), "{answer}");
}

/// The routes answer as before the server changed: same status, type and
/// bytes; HEAD has the headers without the body; keep-alive works.
#[test]
fn the_routes_still_answer_byte_for_byte() {
    let run = Run::start();
    let split = |answer: String| {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        (head.to_ascii_lowercase(), body.to_string())
    };
    let (head, body) = split(run.get("/healthz"));
    assert!(has_status(&head, 200) && head.contains("\r\ncontent-type: text/plain\r\n"), "{head}");
    assert_eq!(body, "ok\n");
    let (head, body) = split(run.get("/"));
    assert!(head.contains("\r\ncontent-type: text/html; charset=utf-8\r\n"), "{head}");
    assert_eq!(body, include_str!("../src/serve/page.html"));
    let (head, body) = split(run.get("/metrics"));
    assert!(has_status(&head, 200) && head.contains("\r\ncontent-type: text/plain; version=0.0.4\r\n"));
    assert!(body.is_empty() || body.starts_with("# HELP expmon_"), "{body}");
    let (head, body) = split(run.get("/api/experiments"));
    assert!(has_status(&head, 200) && head.contains("\r\ncontent-type: application/json\r\n"));
    assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok(), "{body}");
    let (head, body) = split(run.get("/api/experiment?tenant=nobody&id=1"));
    assert!(has_status(&head, 404) && head.contains("\r\ncontent-type: application/json\r\n"));
    assert_eq!(body, "{\"error\":\"no such experiment\"}");
    let (head, body) = split(run.get("/nothing-here"));
    assert!(has_status(&head, 404) && head.contains("\r\ncontent-type: text/plain\r\n"));
    assert_eq!(body, "not found\n");
    let (head, body) = split(text(&run.exchange(b"HEAD /healthz HTTP/1.0\r\n\r\n")));
    assert!(has_status(&head, 200) && head.contains("\r\ncontent-length: 3"), "{head}");
    assert_eq!(body, "");
    // Two requests on one kept-alive connection, then the client closes.
    let mut s = run.connect();
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let both = text(&closed_by_server(&mut s).unwrap());
    assert_eq!(both.matches("HTTP/1.1 200 ").count(), 2, "{both}");
}
