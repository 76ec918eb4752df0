//! The HTTP/1.1 server under the operator's port: hyper 1 on a current-thread
//! tokio runtime, all on one thread named `expmon-http`. Whatever clients send,
//! the port holds at most [`MAX_CONNECTIONS`] connections (more are closed at
//! once with a 503), buffers at most [`MAX_HEAD_BYTES`] of a request head
//! (431 beyond), drops a connection whose next request head is not complete
//! within [`HEADER_READ_TIMEOUT`] (a slow client and an idle keep-alive alike)
//! or that lives longer than [`MAX_CONNECTION_LIFETIME`], serves only GET and
//! HEAD (405) and reads no request body over [`MAX_BODY_BYTES`] (413). So its
//! memory and its threads stay bounded. The routes themselves are
//! [`super::Pages`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use super::{Pages, ServeError};
use crate::failures::Failures;

/// Connections open at once; one more is closed at once with a 503.
pub const MAX_CONNECTIONS: usize = 64;
/// The most of a request head (request line and headers) read; beyond it the
/// answer is 431 and the connection is closed.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time for a complete request head, from the connection's start or from
/// the end of its previous response (keep-alive): then it is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, however busy: then it is closed.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The largest request body a GET or HEAD may announce (it is not read);
/// one larger, or of unknown length, is answered 413.
pub const MAX_BODY_BYTES: u64 = 1024;
/// How often a repeating accept error is logged.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// What `serve::spawn` started.
#[derive(Debug)]
pub struct HttpServer {
    /// The address bound (the actual port when asked for port 0).
    pub addr: SocketAddr,
}

/// The thread's name, as a failure of the run names it.
const THREAD: &str = "expmon-http";

/// Binds `addr` now (so a busy port is the caller's error), then serves
/// `pages` on the `expmon-http` thread, under the run's [`Failures`] guard:
/// the thread ending (it never does on its own) or a request handler
/// panicking stops the run with one error line, as any engine thread does.
pub(super) fn spawn(addr: SocketAddr, pages: Pages, failures: &Failures) -> Result<HttpServer, ServeError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| ServeError::Listen { addr, error })?;
    let bound = listener.local_addr().unwrap_or(addr);
    listener.set_nonblocking(true).map_err(|error| ServeError::Socket { addr, error })?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(ServeError::Runtime)?;
    let run_failures = failures.clone();
    failures
        .spawn(THREAD.into(), move || {
            runtime.block_on(accept_loop(listener, Arc::new(pages), run_failures.clone()));
            run_failures.record(THREAD, "the HTTP server stopped");
        })
        .map_err(ServeError::Thread)?;
    Ok(HttpServer { addr: bound })
}

/// Accepts connections for ever, each on its own task while a permit of
/// [`MAX_CONNECTIONS`] is free. Accept errors (out of file descriptors, a
/// connection reset before it was accepted) pass: wait a moment, go on.
async fn accept_loop(listener: std::net::TcpListener, pages: Arc<Pages>, failures: Failures) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("HTTP port: {e}");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES);
    let mut refused: u64 = 0;
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if last_accept_error.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                    tracing::warn!("HTTP port: cannot accept a connection: {e}");
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if refused == 0 {
                tracing::warn!("HTTP port: {MAX_CONNECTIONS} connections open; closing new ones until some end");
            }
            refused += 1;
            // Best effort: the client may not be reading; the close says it anyway.
            let _ =
                stream.try_write(b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
            continue;
        };
        if refused > 0 {
            tracing::warn!("HTTP port: closed {refused} connections at the cap of {MAX_CONNECTIONS}");
            refused = 0;
        }
        let (pages, failures) = (pages.clone(), failures.clone());
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                // A panic in a handler would only end its task, unseen: it is
                // a bug of the engine's, so it stops the run like any thread's.
                let response = failures
                    .guard(THREAD, || respond(&pages, &req))
                    .unwrap_or_else(|| closing(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"));
                async move { Ok::<_, Infallible>(response) }
            }),
        );
        tokio::spawn(async move {
            let _permit = permit;
            // A connection error (reset, header timeout, 431) only ends that connection.
            let _ = tokio::time::timeout(MAX_CONNECTION_LIFETIME, conn).await;
        });
    }
}

/// The answer to one request: the limits first, then the route.
fn respond(pages: &Pages, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = closing(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: only GET and HEAD\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if req.body().size_hint().upper().is_none_or(|n| n > MAX_BODY_BYTES) {
        return closing(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    crate::failures::failpoint("http.request");
    let page = pages.get(req.uri().path(), req.uri().query().unwrap_or(""));
    let mut r = Response::new(Full::new(Bytes::from(page.body)));
    *r.status_mut() = StatusCode::from_u16(page.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(page.content_type));
    r
}

/// A plain-text refusal after which the connection is closed (its body is
/// not read).
fn closing(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
