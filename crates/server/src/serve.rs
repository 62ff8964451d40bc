//! The HTTP/1.1 accept loop: hyper's connection driver with the limits `axum::serve`
//! does not offer.
//!
//! - Open HTTP connections are capped per source address (`max_http_connections_per_ip`,
//!   refused with `429`) and in total (`max_http_connections`, `503`): the refusal is
//!   written at once and the socket closed, before anything is read. A connection
//!   upgraded to a WebSocket leaves these counts (the gateway's own limits take over).
//!   Connections from `trusted_proxies` count in the total only: they carry the requests
//!   of many clients, whose addresses are only known from each request's headers
//!   ([`crate::client_addr`]).
//! - A new connection must deliver its first request head within
//!   `http_header_timeout_ms`; between requests, a keep-alive connection must deliver
//!   the next head within `http_idle_timeout_ms` (or the header timeout when that is
//!   longer): slow or silent clients (slowloris) are closed, not kept.
//! - A request body that sends nothing for `http_body_timeout_ms` fails the request;
//!   the handler's work is dropped and the connection closed.
//!
//! On shutdown the loop stops accepting, idle connections close at once and busy ones
//! after their current response.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutBody;

use crate::api::ApiError;
use crate::client_addr::TrustedProxies;
use crate::config::Config;
use crate::gateway::ConnLimiter;

/// How long shutdown waits for HTTP connections to finish their current request.
const DRAIN: Duration = Duration::from_secs(5);

/// The timeouts of one connection.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header: Duration,
    idle: Duration,
    body: Duration,
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting and waits
/// (at most a few seconds) for the open HTTP connections to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    config: &Config,
    trusted: &TrustedProxies,
    stop: CancellationToken,
    shutdown: impl Future<Output = ()>,
) {
    let timeouts = Timeouts {
        header: Duration::from_millis(config.http_header_timeout_ms),
        idle: Duration::from_millis(config.http_idle_timeout_ms),
        body: Duration::from_millis(config.http_body_timeout_ms),
    };
    let limiter = ConnLimiter::new(
        config.max_http_connections,
        config.max_http_connections_per_ip,
    );
    let conns = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let admitted = if trusted.contains(peer.ip()) {
            limiter.try_acquire_total()
        } else {
            limiter.try_acquire(peer.ip())
        };
        let permit = match admitted {
            Ok(p) => p,
            Err(refusal) => {
                refuse(&stream, &refusal);
                continue;
            }
        };
        // Frames are small and each is due now: without this, a write while an earlier
        // one is unacknowledged waits for the peer's (delayed) acknowledgement.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            serve_connection(stream, peer, app, timeouts, stop).await;
            drop(permit);
        });
    }
    stop.cancel();
    drop(listener);
    conns.close();
    if tokio::time::timeout(DRAIN, conns.wait()).await.is_err() {
        tracing::warn!("some HTTP connections did not finish in time");
    }
}

/// Drives one connection until it closes, times out or (after `stop`) finishes its
/// current request.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    let started = Arc::new(AtomicBool::new(false));
    let service = {
        let started = started.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            started.store(true, Ordering::Relaxed);
            let mut req = req.map(|body| TimeoutBody::new(timeouts.body, body));
            req.extensions_mut().insert(ConnectInfo(peer));
            tower_service::Service::call(&mut app.clone(), req)
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's timer runs whenever a head is awaited: on a new connection and between
        // requests. The first head has its own, usually shorter, limit below.
        .header_read_timeout(timeouts.idle.max(timeouts.header))
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let first_head = tokio::time::sleep(timeouts.header);
    let mut first_head = std::pin::pin!(first_head);
    let mut stopping = false;
    let mut first_head_due = true;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            // (A branch's condition is only read when the select starts: look again.)
            _ = &mut first_head, if first_head_due => {
                first_head_due = false;
                if !started.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "no request head in time; closing");
                    return;
                }
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Writes the refusal (the socket is fresh: its send buffer takes it without waiting)
/// and closes the connection.
fn refuse(stream: &TcpStream, refusal: &ApiError) {
    let body = serde_json::to_string(&crate::api::docs::ErrorBody {
        code: refusal.code,
        message: refusal.message.clone(),
    })
    .unwrap_or_default();
    let status = refusal.status;
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// Accept errors: a connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors) is logged, and the loop waits a moment so it does not
/// spin while nothing can be accepted.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(200)).await;
}
