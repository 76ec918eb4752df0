//! A strict KairosDB-protocol server for tests: plain HTTP/1.1 over std TCP,
//! validating `POST /api/v1/datapoints` the way KairosDB does, storing points
//! with overwrite semantics, and injecting faults on demand.
//!
//! Validation (answered with `400 {"errors":[…]}`): the body must be a JSON
//! array (gzip-decoded when `Content-Encoding: gzip`); each metric needs a
//! non-empty `name`, at least one tag, no empty tag names or values, a `type`
//! of `long` or `double` when given, an integer `ttl` when given, and
//! `datapoints` of `[ms, value]` pairs with integer timestamps (integer values
//! for longs; doubles are stored as millionths).
//! A valid request stores every point (same name, tags and timestamp: the
//! newer value overwrites) and answers `204` with no body.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A stored point's identity: (metric name, tags, timestamp).
pub type StoredId = (String, BTreeMap<String, String>, i64);

/// One injected fault, applied to the next datapoints request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer 500 `{"errors":[…]}` without storing.
    Error500,
    /// Answer 429 without storing.
    TooMany429,
    /// Close the connection without answering (nothing stored).
    Drop,
    /// Wait this long, store nothing, then close (a client timeout).
    Hang(Duration),
    /// Store the first half of the metrics, answer 400 for the rest.
    Partial400,
    /// Go down for this long: this and every connection meanwhile is dropped.
    Down(Duration),
}

#[derive(Debug, Default)]
pub struct State {
    pub points: BTreeMap<StoredId, i64>,
    /// Datapoints requests received (valid or not).
    pub requests: u64,
    pub gzip_requests: u64,
    /// Faults for the next datapoints requests, in order.
    pub faults: VecDeque<Fault>,
    /// Extra latency of every datapoints request.
    pub delay: Duration,
    /// Until then, every connection is closed at once (a down server).
    pub down_until: Option<Instant>,
    /// Metrics refused by validation or by a Partial400 fault.
    pub refused: Vec<String>,
    /// Data points and JSON bytes (before gzip) of each datapoints request
    /// that parsed as a JSON array, in arrival order (to check batch limits).
    pub request_sizes: Vec<(usize, usize)>,
    /// Answer /api/v1/version as something that is not KairosDB.
    pub impostor: bool,
    /// Accept datapoints without decoding them (for throughput benchmarks).
    pub sink_only: bool,
    /// If set, every request must carry `Authorization: Basic <this>`.
    pub basic_auth: Option<String>,
    /// Refuse every metric of every datapoints request (400, nothing stored),
    /// with one error per metric naming it, as KairosDB lists each invalid
    /// metric: the error text grows with the request.
    pub refuse_all: bool,
}

pub struct KairosServer {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl KairosServer {
    pub fn start() -> KairosServer {
        KairosServer::start_with(None)
    }

    /// The same server behind TLS with this certificate chain and key (DER).
    pub fn start_tls(cert: Vec<u8>, key: Vec<u8>) -> KairosServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(cert)],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap();
        KairosServer::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> KairosServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (st, tls) = (st.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(conn, &st),
                    Some(config) => {
                        let Ok(session) = rustls::ServerConnection::new(config) else { return };
                        serve(rustls::StreamOwned::new(session, conn), &st)
                    }
                });
            }
        });
        KairosServer { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

impl Drop for KairosServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn respond(conn: &mut impl Write, code: u16, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    let head = if code == 204 {
        format!("HTTP/1.1 204 {reason}\r\n\r\n")
    } else {
        format!("HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len())
    };
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

/// Serves requests on one keep-alive connection (plain or TLS).
fn serve(conn: impl Read + Write, state: &Mutex<State>) {
    if state.lock().unwrap().down_until.is_some_and(|t| Instant::now() < t) {
        return; // dropped at once
    }
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let conn = reader.get_mut();
        let auth = state.lock().unwrap().basic_auth.clone();
        if let Some(want) = auth {
            if headers.get("authorization") != Some(&format!("Basic {want}")) {
                if respond(conn, 401, r#"{"errors":["unauthorized"]}"#).is_err() {
                    return;
                }
                continue;
            }
        }
        let ok = match (method.as_str(), path.as_str()) {
            ("GET", "/api/v1/version") => {
                let impostor = state.lock().unwrap().impostor;
                let v = if impostor {
                    r#"{"version":"InfluxDB 1.8"}"#
                } else {
                    r#"{"version":"KairosDB 1.3.0-1.20210808"}"#
                };
                respond(conn, 200, v)
            }
            ("GET", "/api/v1/health/check") => respond(conn, 204, ""),
            ("POST", "/api/v1/datapoints") => match datapoints(state, &headers, &body) {
                Some((code, text)) => respond(conn, code, &text),
                None => return, // connection dropped by a fault
            },
            _ => respond(conn, 404, r#"{"errors":["not found"]}"#),
        };
        if ok.is_err() {
            return;
        }
    }
}

/// Handles one datapoints request; `None` drops the connection.
fn datapoints(state: &Mutex<State>, headers: &BTreeMap<String, String>, body: &[u8]) -> Option<(u16, String)> {
    let (fault, delay) = {
        let mut st = state.lock().unwrap();
        st.requests += 1;
        if st.down_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        (st.faults.pop_front(), st.delay)
    };
    std::thread::sleep(delay);
    match fault {
        Some(Fault::Error500) => return Some((500, r#"{"errors":["injected failure"]}"#.into())),
        Some(Fault::TooMany429) => return Some((429, r#"{"errors":["slow down"]}"#.into())),
        Some(Fault::Drop) => return None,
        Some(Fault::Hang(d)) => {
            std::thread::sleep(d);
            return None;
        }
        Some(Fault::Down(d)) => {
            state.lock().unwrap().down_until = Some(Instant::now() + d);
            return None;
        }
        Some(Fault::Partial400) | None => {}
    }
    if state.lock().unwrap().sink_only {
        return Some((204, String::new()));
    }
    let gzip = headers.get("content-encoding").is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    let raw = if gzip {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(body).read_to_end(&mut out).is_err() {
            return Some((400, r#"{"errors":["body is not valid gzip"]}"#.into()));
        }
        out
    } else {
        body.to_vec()
    };
    let metrics = match serde_json::from_slice::<serde_json::Value>(&raw) {
        Ok(serde_json::Value::Array(m)) => m,
        _ => return Some((400, r#"{"errors":["Invalid json: expected an array of metrics"]}"#.into())),
    };
    let partial = matches!(fault, Some(Fault::Partial400));
    let refuse_all = state.lock().unwrap().refuse_all;
    let mut errors = Vec::new();
    let mut st = state.lock().unwrap();
    let points = metrics.iter().map(|m| m["datapoints"].as_array().map_or(0, Vec::len)).sum();
    st.request_sizes.push((points, raw.len()));
    if gzip {
        st.gzip_requests += 1;
    }
    for (i, m) in metrics.iter().enumerate() {
        if refuse_all {
            let name = m["name"].as_str().unwrap_or("");
            errors.push(format!("metric[{i}](name={name}).tags refused by this server, which refuses every metric"));
            st.refused.push(name.to_string());
            continue;
        }
        if partial && i >= metrics.len() / 2 {
            errors.push(format!("metric[{i}] refused by injected fault"));
            st.refused.push(m["name"].as_str().unwrap_or("").to_string());
            continue;
        }
        match validate(i, m) {
            Ok(points) => {
                for (id, v) in points {
                    st.points.insert(id, v);
                }
            }
            Err(e) => {
                st.refused.push(e.clone());
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Some((204, String::new()))
    } else {
        Some((400, serde_json::json!({ "errors": errors }).to_string()))
    }
}

fn validate(i: usize, m: &serde_json::Value) -> Result<Vec<(StoredId, i64)>, String> {
    let name = m["name"].as_str().filter(|n| !n.is_empty()).ok_or(format!("metric[{i}].name may not be empty"))?;
    let at = |what: &str| format!("metric[{i}](name={name}).{what}");
    let tags = m["tags"].as_object().ok_or(at("tags must be an object"))?;
    if tags.is_empty() {
        return Err(at("tags count must be greater than or equal to 1"));
    }
    let mut t = BTreeMap::new();
    for (k, v) in tags {
        let v = v.as_str().ok_or(at("tag values must be strings"))?;
        if k.is_empty() || v.is_empty() {
            return Err(at("tag names and values may not be empty"));
        }
        t.insert(k.clone(), v.to_string());
    }
    let double = match m.get("type").map(|t| t.as_str()) {
        None | Some(Some("long")) => false,
        Some(Some("double")) => true,
        _ => return Err(at("type must be long or double in this server")),
    };
    if let Some(ttl) = m.get("ttl") {
        if !ttl.is_u64() {
            return Err(at("ttl must be a non-negative integer"));
        }
    }
    let dps = m["datapoints"].as_array().ok_or(at("datapoints must be an array"))?;
    let mut out = Vec::new();
    for dp in dps {
        let pair = dp.as_array().filter(|p| p.len() == 2).ok_or(at("datapoint must be [timestamp, value]"))?;
        let ts = pair[0].as_i64().ok_or(at("timestamp must be an integer in milliseconds"))?;
        let v = if double {
            // Stored as millionths, so that one map holds both kinds.
            let v = pair[1].as_f64().filter(|v| v.is_finite()).ok_or(at("value of a double must be a number"))?;
            (v * 1e6).round() as i64
        } else {
            pair[1].as_i64().ok_or(at("value of a long must be an integer"))?
        };
        out.push(((name.to_string(), t.clone(), ts), v));
    }
    Ok(out)
}
