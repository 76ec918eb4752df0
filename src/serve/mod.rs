//! The operator's HTTP port (`--metrics-addr`, default `127.0.0.1:9464`):
//! `/metrics` (Prometheus text of the health figures of the last trigger),
//! `/healthz`, and the results page `/` with its JSON API
//! (`/api/experiments`, `/api/experiment?tenant=T&id=N`), served from the
//! engine's recent in-memory totals — no KairosDB needed. In `--scale-out`
//! mode (no results) those three routes answer 404 with [`NO_RESULTS`]. This
//! file holds the routes; `http.rs` the server and its bounds on size, time
//! and connections.

mod http;
mod results;

pub use http::{
    HttpServer, HEADER_READ_TIMEOUT, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_CONNECTION_LIFETIME, MAX_HEAD_BYTES,
};
pub use results::{Results, SharedResults, KEEP_MINUTES};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::failures::lock;
use crate::health::prometheus::prometheus_text;
use crate::metrics::{HealthPoint, LatencyBuckets};

const PAGE: &str = include_str!("page.html");

/// The answer of the results routes where the run has no results.
pub const NO_RESULTS: &str = "no results page in --scale-out mode: each instance holds only its share of the \
    points (those of its stage-2 tasks, which move on every rebalance), so its figures would be partial; read the \
    totals from the sink (docs/scale-out.md §6)\n";

/// What the writer publishes each trigger for the server.
#[derive(Debug, Default)]
pub struct Published {
    pub health: Mutex<Snapshot>,
}

/// The last trigger's figures: its health points and the sink's write
/// latencies by bucket (see [`crate::health::prometheus`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub points: Vec<HealthPoint>,
    pub write_latency: LatencyBuckets,
}

/// Starts the server on its own thread (`expmon-http`, see `http` for its
/// limits). Binds `addr` before returning, and fails with a clear message if
/// it cannot be bound. `results`: `None` where the run has none (scale-out).
pub fn spawn(
    addr: SocketAddr,
    published: Arc<Published>,
    results: Option<SharedResults>,
    failures: &crate::failures::Failures,
) -> Result<HttpServer, ServeError> {
    http::spawn(addr, Pages { published, results }, failures)
}

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on --metrics-addr {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
    #[error("--metrics-addr {addr}: {error}")]
    Socket { addr: SocketAddr, error: std::io::Error },
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the HTTP thread: {0}")]
    Thread(std::io::Error),
}

/// One route's answer.
struct Page {
    status: u16,
    content_type: &'static str,
    body: String,
}

/// The routes, over what the writer publishes.
struct Pages {
    published: Arc<Published>,
    results: Option<SharedResults>,
}

impl Pages {
    /// The answer to a GET of `path` with the (undecoded) `query`.
    fn get(&self, path: &str, query: &str) -> Page {
        let page = |status, content_type, body| Page { status, content_type, body };
        match (path, &self.results) {
            ("/metrics", _) => {
                let h = lock(&self.published.health);
                page(200, "text/plain; version=0.0.4", prometheus_text(&h.points, &h.write_latency))
            }
            ("/healthz", _) => page(200, "text/plain", "ok\n".to_string()),
            ("/" | "/api/experiments" | "/api/experiment", None) => page(404, "text/plain", NO_RESULTS.to_string()),
            ("/", Some(_)) => page(200, "text/html; charset=utf-8", PAGE.to_string()),
            ("/api/experiments", Some(results)) => page(200, "application/json", lock(results).experiments_json()),
            ("/api/experiment", Some(results)) => {
                let arg =
                    |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
                let found = match (arg("tenant"), arg("id").and_then(|i| i.parse().ok())) {
                    (Some(t), Some(id)) => lock(results).experiment_json(t, id),
                    _ => None,
                };
                match found {
                    Some(json) => page(200, "application/json", json),
                    None => page(404, "application/json", "{\"error\":\"no such experiment\"}".to_string()),
                }
            }
            _ => page(404, "text/plain", "not found\n".to_string()),
        }
    }
}
