//! One session per WebSocket connection.
//!
//! Two tasks serve a connection:
//! - the reader (this module's [`run`]) decodes frames and handles requests. `send`s are
//!   pipelined: each is handed to the store at once (so its `seq` follows the order of
//!   the frames) and its `ok` is queued when the commit lands, in order. Any other
//!   request first waits for the sends before it, so a `history` after a `send` sees it.
//! - the writer owns the socket's write half: it drains the bounded outgoing queue,
//!   coalescing what is queued into one frame (messages separated by `\n`), sends the
//!   heartbeat pings and closes dead connections.
//!
//! Anyone else (fan-out, kicks, shutdown) talks to the session through its
//! [`Session`](crate::hub::Session) handle: push into the queue or ask it to close.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, SplitSink, SplitStream, StreamExt};
use futures_util::SinkExt;
use hubbub_protocol::{ProtoError, ServerFrame};

use super::handler::Conn;
use super::limits::ConnPermit;
use crate::auth::Identity;
use crate::hub::{CloseReason, OutFrame, Session, SessionHandle};
use crate::store::now_ms;
use crate::AppState;

/// How long a close handshake (and the flush before it) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block before the peer is considered stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one upgraded connection until it closes.
/// The encoding a connection chose with its subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `hubbub.v1.json` (also when no subprotocol was offered): text frames.
    Json,
    /// `hubbub.v1.pb`: one protobuf message per binary frame.
    Protobuf,
}

/// An accepted connection, ready for its session.
pub(crate) struct Upgraded {
    pub(crate) sink: SplitSink<WebSocket, WsMessage>,
    pub(crate) stream: SplitStream<WebSocket>,
    pub(crate) identity: Identity,
    pub(crate) device: String,
    pub(crate) codec: Codec,
    /// Its place in the connection limits, freed when the session ends.
    pub(crate) permit: ConnPermit,
}

pub(crate) async fn run(conn: Upgraded, state: Arc<AppState>) {
    let Upgraded {
        sink,
        stream,
        identity,
        device,
        codec,
        permit,
    } = conn;
    // flume's queue grows as it fills, so an idle session holds no slots (a tokio mpsc
    // channel allocates a block of them up front).
    let (tx, rx) = flume::bounded(state.config.queue_frames);
    let session = Session::new(
        state.hub.next_session_id(),
        Arc::from(identity.user.as_str()),
        Arc::from(device.as_str()),
        tx,
        state.hub.metrics().clone(),
    );
    let welcome = ServerFrame::Welcome {
        user: identity.user.clone(),
        device: device.clone(),
        session: session.public_id(),
        heartbeat_ms: state.config.heartbeat_ms,
        server_time: now_ms(),
        max_frame_bytes: state.config.max_frame_bytes,
    };
    // The welcome goes into the queue before the session is visible to anyone, so it is
    // always the first frame.
    session.push(&OutFrame::new(welcome));
    let registered = state.hub.register(&session);
    if state.shutdown.is_cancelled() {
        session.close(CloseReason::SHUTDOWN);
    }
    tracing::Span::current().record("session", session.public_id());
    tracing::debug!("session open");

    let last_seen = Arc::new(AtomicI64::new(now_ms()));
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        session.clone(),
        state.clone(),
        last_seen.clone(),
        codec,
    ));

    let expires_at = identity.expires_at;
    let mut conn = Conn::new(state.clone(), session.clone(), identity);
    // Request handlers are boxed while they run: inlined, their largest state would be
    // part of every idle connection's task (kilobytes each).
    if registered.first {
        Box::pin(conn.announce_presence(true)).await;
    }
    read_loop(&mut conn, stream, &last_seen, expires_at, codec).await;

    session.close(CloseReason::NORMAL);
    let _ = writer.await;
    if state.hub.unregister(&session) {
        Box::pin(conn.announce_presence(false)).await;
    }
    tracing::debug!(user = %session.user, session = session.id, reason = ?session.close_reason(), "session closed");
    drop(permit);
}

async fn read_loop(
    conn: &mut Conn,
    mut stream: SplitStream<WebSocket>,
    last_seen: &AtomicI64,
    expires_at: Option<i64>,
    codec: Codec,
) {
    let session = conn.session().clone();
    // Far enough in the future never to fire for guests.
    let expiry = tokio::time::sleep(Duration::from_millis(
        expires_at.map_or(30 * 365 * 86_400_000, |e| (e - now_ms()).max(0) as u64),
    ));
    tokio::pin!(expiry);
    let max_inflight = conn.state().config.max_inflight_sends;
    let mut pending: FuturesOrdered<futures_util::future::BoxFuture<'static, ServerFrame>> =
        FuturesOrdered::new();
    // Whether the peer may still send (it has not closed, and reading has not failed).
    let mut peer_open = true;
    loop {
        tokio::select! {
            biased;
            _ = session.closing().cancelled() => break,
            _ = &mut expiry, if expires_at.is_some() => {
                session.close(CloseReason::TOKEN_EXPIRED);
                break;
            }
            Some(answer) = pending.next(), if !pending.is_empty() => {
                session.reply(answer).await;
            }
            msg = stream.next(), if pending.len() < max_inflight => {
                let Some(msg) = msg else {
                    peer_open = false;
                    break;
                };
                last_seen.store(now_ms(), Ordering::Relaxed);
                match msg {
                    Ok(WsMessage::Text(text)) if codec == Codec::Json => {
                        for line in hubbub_protocol::split_frames(text.as_str()) {
                            conn.state().hub.metrics().frames_in.inc();
                            Box::pin(conn.handle_line(line, &mut pending)).await;
                        }
                    }
                    Ok(WsMessage::Binary(bytes)) if codec == Codec::Protobuf => {
                        conn.state().hub.metrics().frames_in.inc();
                        Box::pin(conn.handle(hubbub_protocol::pb::decode_client(&bytes), &mut pending)).await;
                    }
                    Ok(WsMessage::Text(_)) | Ok(WsMessage::Binary(_)) => {
                        let message = match codec {
                            Codec::Json => "binary frames are not part of hubbub.v1.json; send text frames",
                            Codec::Protobuf => "text frames are not part of hubbub.v1.pb; send binary protobuf frames",
                        };
                        let error = ServerFrame::error(None, ProtoError::bad_request(message));
                        Box::pin(session.reply(error)).await;
                    }
                    Ok(WsMessage::Ping(_)) | Ok(WsMessage::Pong(_)) => {}
                    Ok(WsMessage::Close(_)) => {
                        peer_open = false;
                        break;
                    }
                    Err(e) => {
                        peer_open = false;
                        if is_too_large(&e) {
                            session.close(CloseReason::TOO_LARGE);
                        }
                        tracing::debug!(session = session.id, error = %e, "read error");
                        break;
                    }
                }
            }
        }
    }
    // Runs once, at the end, so boxed: inlined it would widen every idle task.
    Box::pin(finish_reading(&session, pending, stream, peer_open)).await;
}

/// After the read loop: answers the sends already handed to the store and lets the peer
/// finish its side of the close.
async fn finish_reading(
    session: &Session,
    mut pending: FuturesOrdered<futures_util::future::BoxFuture<'static, ServerFrame>>,
    mut stream: SplitStream<WebSocket>,
    peer_open: bool,
) {
    while let Some(answer) = pending.next().await {
        if session.close_reason().is_none() {
            session.reply(answer).await;
        }
    }
    // We are closing and the peer may still be sending: keep reading (and discarding)
    // until its close frame, so the socket is not reset with unread data, which would
    // make the peer lose our close frame. Bounded, and not for dead peers.
    if peer_open && session.close_reason() != Some(CloseReason::DEAD) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

fn is_too_large(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    false
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut rx: flume::Receiver<Arc<OutFrame>>,
    session: SessionHandle,
    state: Arc<AppState>,
    last_seen: Arc<AtomicI64>,
    codec: Codec,
) {
    let hb = Duration::from_millis(state.config.heartbeat_ms);
    let dead_after = (state.config.heartbeat_ms as i64) * 5 / 2;
    let max_coalesce = state.config.max_coalesce_bytes;
    let linger = Duration::from_millis(state.config.write_linger_ms);
    let mut last_write = tokio::time::Instant::now() - linger;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + hb, hb);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            biased;
            _ = session.closing().cancelled() => break,
            first = rx.recv_async() => match first.ok() {
                Some(first) => {
                    // Busy: let what follows join this frame (one wake-up and one write
                    // for many messages). Quiet: write at once.
                    let until = last_write + linger;
                    if tokio::time::Instant::now() < until {
                        let wait = Box::pin(tokio::time::sleep_until(until));
                        tokio::select! {
                            biased;
                            _ = session.closing().cancelled() => {}
                            _ = wait => {}
                        }
                    }
                    last_write = tokio::time::Instant::now();
                    encode(codec, first, &mut rx, max_coalesce)
                }
                None => break,
            },
            _ = ticker.tick() => {
                if now_ms() - last_seen.load(Ordering::Relaxed) > dead_after {
                    session.close(CloseReason::DEAD);
                    break;
                }
                WsMessage::Ping(bytes::Bytes::new())
            }
        };
        let sent = tokio::select! {
            r = tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)) => matches!(r, Ok(Ok(()))),
            _ = session.closing().cancelled() => false,
        };
        if !sent {
            break;
        }
        state.hub.metrics().frames_out.inc();
    }
    // Closing: why?
    let reason = session.close_reason().unwrap_or(CloseReason::NORMAL);
    session.close(reason.clone());
    if reason == CloseReason::DEAD {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if reason.flush {
            while let Ok(first) = rx.try_recv() {
                let msg = encode(codec, first, &mut rx, max_coalesce);
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
        }
        let close = WsMessage::Close(Some(CloseFrame {
            code: reason.code,
            reason: Utf8Bytes::from_static(reason.reason),
        }));
        let _ = sink.send(close).await;
        let _ = sink.close().await;
    })
    .await;
}

/// The next WebSocket frame: for JSON, `first` and what else is queued, coalesced; for
/// protobuf, `first` alone (binary frames carry one message each).
fn encode(
    codec: Codec,
    first: Arc<OutFrame>,
    rx: &mut flume::Receiver<Arc<OutFrame>>,
    max: usize,
) -> WsMessage {
    match codec {
        Codec::Json => coalesce(first, rx, max),
        Codec::Protobuf => WsMessage::Binary(first.pb().clone()),
    }
}

/// Joins `first` and whatever else is queued (up to `max` bytes) into one text frame.
fn coalesce(
    first: Arc<OutFrame>,
    rx: &mut flume::Receiver<Arc<OutFrame>>,
    max: usize,
) -> WsMessage {
    let head = first.json();
    let Ok(next) = rx.try_recv() else {
        return text_frame(head.clone());
    };
    let mut buf = BytesMut::with_capacity((head.len() * 2 + 1).min(max.max(head.len())));
    buf.extend_from_slice(head);
    let add = |f: &OutFrame, buf: &mut BytesMut| {
        buf.extend_from_slice(b"\n");
        buf.extend_from_slice(f.json());
    };
    add(&next, &mut buf);
    while buf.len() < max {
        match rx.try_recv() {
            Ok(f) => add(&f, &mut buf),
            Err(_) => break,
        }
    }
    text_frame(buf.freeze())
}

fn text_frame(bytes: bytes::Bytes) -> WsMessage {
    match Utf8Bytes::try_from(bytes) {
        Ok(t) => WsMessage::Text(t),
        // JSON from serde_json is always UTF-8.
        Err(_) => WsMessage::Text(Utf8Bytes::from_static(
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#,
        )),
    }
}
