//! One session per WebSocket connection, served by one task.
//!
//! The task owns the whole socket and does both jobs of a connection:
//! - reading: it decodes frames and handles requests. `send`s are pipelined: each is
//!   handed to the store at once (so its `seq` follows the order of the frames) and its
//!   `ok` is queued when the commit lands, in order. Any other request first waits for
//!   the sends before it, so a `history` after a `send` sees it.
//! - writing: it drains the bounded outgoing queue, coalescing what is queued into one
//!   frame (messages separated by `\n`), sends the heartbeat pings, and closes dead or
//!   stuck connections.
//!
//! Writing never waits for reading: while a request handler runs, the task keeps
//! writing beside it (see [`Io::drive`]), so a handler that waits for room in the queue
//! is unblocked by the same task. One task and one state machine per connection keeps an
//! idle connection small (BENCHMARKS.md has the budget).
//!
//! Anyone else (fan-out, kicks, shutdown) talks to the session through its
//! [`Session`](crate::hub::Session) handle: push into the queue or ask it to close.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::stream::StreamExt;
use futures_util::{Sink, SinkExt, Stream};
use hubbub_protocol::ServerFrame;
use tokio::time::{Instant, Sleep};

use super::handler::{Answers, Conn};
use super::limits::ConnPermit;
use crate::auth::Identity;
use crate::hub::{CloseReason, OutFrame, Session, SessionHandle};
use crate::store::now_ms;
use crate::AppState;

/// How long a close handshake (and the flush before it) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block before the peer is considered stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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
    pub(crate) socket: WebSocket,
    pub(crate) identity: Identity,
    pub(crate) device: String,
    pub(crate) codec: Codec,
    /// Its place in the connection limits, freed when the session ends.
    pub(crate) permit: ConnPermit,
    /// The client's address (the TCP peer, or what a trusted proxy forwarded): room
    /// creation is limited per address.
    pub(crate) peer: std::net::IpAddr,
}

/// Sets the session up (its queue, the `welcome`, its place in the hub) and returns the
/// future that serves it until it closes.
///
/// The setup runs here, outside the future, so that what it needs only once does not
/// take room in every connection's state machine.
pub(crate) fn run(conn: Upgraded, state: Arc<AppState>) -> impl Future<Output = ()> + Send {
    let Upgraded {
        socket,
        identity,
        device,
        codec,
        permit,
        peer,
    } = conn;
    let cfg = &state.config;
    // The queue grows as it fills, so an idle session holds no slots.
    let session = Session::with_queue(
        state.node.hub().next_session_id(),
        Arc::from(identity.user.as_str()),
        Arc::from(device.as_str()),
        cfg.queue_frames,
        cfg.queue_bytes,
        codec == Codec::Protobuf,
        state.node.hub().metrics(),
    );
    let welcome = ServerFrame::Welcome {
        user: identity.user.clone(),
        device,
        session: session.public_id(),
        heartbeat_ms: cfg.heartbeat_ms,
        server_time: now_ms(),
        max_frame_bytes: cfg.max_frame_bytes,
        ice_servers: state.config.ice_servers.clone(),
    };
    // The welcome goes into the queue before the session is visible to anyone, so it is
    // always the first frame.
    session.push(&OutFrame::new(welcome));
    let first = state.node.session_opened(&session);
    if state.shutdown.is_cancelled() {
        session.close(CloseReason::SHUTDOWN);
    }
    let io = Io::new(session.clone(), socket, codec, &state, identity.expires_at);
    let parts = Box::new(Parts {
        io,
        conn: Conn::new(state, session.clone(), identity, peer),
        answers: Answers::default(),
        permit,
    });
    serve(parts, session, first)
}

/// Everything a session keeps while it lives, on the heap in one piece: in the future
/// itself, the arguments of an `async fn` take their room twice.
struct Parts {
    io: Io,
    conn: Conn,
    /// Answers to the peer's requests, in request order.
    answers: Answers,
    /// Its place in the connection limits, freed when the session ends.
    permit: ConnPermit,
}

async fn serve(mut parts: Box<Parts>, session: SessionHandle, first: bool) {
    tracing::Span::current().record("session", session.public_id());
    tracing::debug!("session open");
    let Parts {
        io, conn, answers, ..
    } = &mut *parts;
    // Request handlers are boxed while they run: inlined, their largest state would be
    // part of every idle connection's future (kilobytes each).
    if first {
        let _ = io.drive(Box::pin(conn.announce_presence(true))).await;
    }
    let max_inflight = conn.state().config.max_inflight_sends;
    let peer_open = loop {
        let event = poll_fn(|cx| io.poll_event(cx, &session, answers, max_inflight)).await;
        let stop = match event {
            Event::Closing => break true,
            Event::Stop(stop) => Some(stop),
            Event::Answer(answer) => io.drive(Box::pin(session.reply_frame(answer))).await.err(),
            // Boxed: a frame's handling holds more state than an idle session should.
            Event::Frame(msg) => Box::pin(io.handle_frame(conn, msg, answers)).await.err(),
            Event::PeerClosed => break false,
            Event::ReadError(e) => {
                // tungstenite reports a broken frame without answering it: the close
                // frame with the fitting code is ours to send.
                if let Some(reason) = read_error_close(&e) {
                    session.close(reason);
                }
                tracing::debug!(session = session.id, error = %e, "read error");
                break false;
            }
        };
        match stop {
            None => {}
            Some(Stop::Expired) => {
                session.close(CloseReason::TOKEN_EXPIRED);
                break true;
            }
            Some(Stop::Dead) => {
                session.close(CloseReason::DEAD);
                break true;
            }
            Some(Stop::Broken) => {
                session.close(CloseReason::NORMAL);
                break false;
            }
        }
    };
    // Runs once, at the end, so boxed: inlined it would widen every idle connection.
    let answers = std::mem::take(answers);
    Box::pin(io.finish(&session, answers, peer_open)).await;
    session.end_queue();
    if conn.state().node.session_closed(&session) {
        Box::pin(conn.announce_presence(false)).await;
    }
    tracing::debug!(user = %session.user, session = session.id, reason = ?session.close_reason(), "session closed");
    // Last: the socket closes, then the connection's place in the limits is freed.
    let Parts { io, permit, .. } = *parts;
    drop(io);
    drop(permit);
}

/// What woke the session.
enum Event {
    /// The session was asked to close.
    Closing,
    /// The writing side gave up.
    Stop(Stop),
    /// The oldest answer, for which the queue has no room yet.
    Answer(Arc<OutFrame>),
    /// A frame from the peer.
    Frame(WsMessage),
    /// The peer closed (or the connection ended).
    PeerClosed,
    ReadError(axum::Error),
}

/// Why the writing side gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Nothing heard from the peer for too long.
    Dead,
    /// The token the session was opened with expired.
    Expired,
    /// A write failed or stayed blocked longer than [`WRITE_TIMEOUT`].
    Broken,
}

/// The socket of a session and the writing state.
struct Io {
    ws: WebSocket,
    session: SessionHandle,
    /// The write linger now (see [`Io::adapt_linger`]) and its bounds.
    linger: Duration,
    linger_base: Duration,
    linger_max: Duration,
    /// Frames per second this connection was written lately (a moving average).
    rate: f64,
    /// The last frame handed to the socket left more queued: write on.
    backlog: bool,
    /// Bytes and protocol messages handed to the socket since the last flush.
    fed: (usize, usize),
    /// The writer lingers (and told the session so).
    lingering: bool,
    /// A frame was handed to the socket and is not flushed yet.
    flushing: bool,
    ping_due: bool,
    /// A heartbeat passed: see whether the peer is still there.
    judge: bool,
    /// One timer for every deadline below.
    timer: Pin<Box<Sleep>>,
    next_ping: Instant,
    last_write: Instant,
    write_deadline: Option<Instant>,
    expires: Option<Instant>,
    /// When the peer was last heard from.
    last_seen: Instant,
    /// When the first ping since then was due: the peer has had since then to answer.
    unanswered: Option<Instant>,
    state: Arc<AppState>,
    codec: Codec,
    frames_out: prometheus::IntCounter,
}

impl Io {
    fn new(
        session: SessionHandle,
        ws: WebSocket,
        codec: Codec,
        state: &Arc<AppState>,
        expires_at: Option<i64>,
    ) -> Io {
        let cfg = &state.config;
        let now = Instant::now();
        let next_ping = now + Duration::from_millis(cfg.heartbeat_ms);
        let linger = Duration::from_millis(cfg.write_linger_ms);
        Io {
            ws,
            session,
            linger,
            linger_base: linger,
            linger_max: Duration::from_millis(cfg.write_linger_max_ms).max(linger),
            rate: 0.0,
            backlog: false,
            fed: (0, 0),
            lingering: false,
            flushing: false,
            ping_due: false,
            judge: false,
            timer: Box::pin(tokio::time::sleep_until(next_ping)),
            next_ping,
            last_write: now.checked_sub(linger).unwrap_or(now),
            write_deadline: None,
            expires: expires_at
                .map(|e| now + Duration::from_millis(e.saturating_sub(now_ms()).max(0) as u64)),
            last_seen: now,
            unanswered: None,
            state: state.clone(),
            codec,
            frames_out: state.node.hub().metrics().frames_out.clone(),
        }
    }

    /// Waits for the next thing the session must act on, writing meanwhile. Reads a
    /// frame only while fewer than `max_inflight` answers (mostly sends awaiting their
    /// commit) are queued.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        session: &Session,
        answers: &mut Answers,
        max_inflight: usize,
    ) -> Poll<Event> {
        if session.poll_closing(cx) {
            return Poll::Ready(Event::Closing);
        }
        // Answers first, so that the `ok`s of one commit go out in the same frame as the
        // messages that commit delivered to this session (one write instead of two).
        while !answers.is_empty() {
            let Poll::Ready(Some(answer)) = answers.poll_next_unpin(cx) else {
                break;
            };
            if let Err(answer) = session.try_reply(OutFrame::new(answer)) {
                // The queue is full: wait for room (writing meanwhile).
                return Poll::Ready(Event::Answer(answer));
            }
        }
        if let Poll::Ready(stop) = self.poll_write(cx) {
            return Poll::Ready(Event::Stop(stop));
        }
        // After the answers above: they made room in the pipeline.
        if answers.len() < max_inflight {
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    self.last_seen = Instant::now();
                    self.unanswered = None;
                    return Poll::Ready(Event::Frame(msg));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Event::ReadError(e)),
                Poll::Ready(None) => return Poll::Ready(Event::PeerClosed),
                Poll::Pending => {}
            }
            // At each heartbeat, and only when there was nothing to read (a busy task must
            // not take the peer's unread pong for silence): dead after two and a half
            // heartbeats without a word from the peer, and only if a ping went unanswered
            // for a whole heartbeat (a stalled process that pinged late must give the
            // peer its chance to answer before judging it).
            if std::mem::take(&mut self.judge) {
                let heartbeat = Duration::from_millis(self.state.config.heartbeat_ms);
                let now = Instant::now();
                let silent = now.duration_since(self.last_seen);
                let pinged = self.unanswered.map(|t| now.duration_since(t));
                if silent > heartbeat * 5 / 2 && pinged.is_some_and(|p| p >= heartbeat) {
                    return Poll::Ready(Event::Stop(Stop::Dead));
                }
            }
        }
        Poll::Pending
    }

    /// Runs `fut` (a request handler) to completion while writing beside it. Gives up
    /// on it if writing stops: a handler may be waiting for room in the queue.
    async fn drive<F: Future>(&mut self, mut fut: Pin<Box<F>>) -> Result<F::Output, Stop> {
        poll_fn(|cx| {
            if let Poll::Ready(t) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(t));
            }
            self.poll_write(cx).map(Err)
        })
        .await
    }

    /// Handles one frame from the peer.
    async fn handle_frame(
        &mut self,
        conn: &mut Conn,
        msg: WsMessage,
        answers: &mut Answers,
    ) -> Result<(), Stop> {
        match msg {
            WsMessage::Text(text) if self.codec == Codec::Json => {
                for line in hubbub_protocol::split_frames(text.as_str()) {
                    conn.state().node.hub().metrics().frames_in.inc();
                    self.drive(Box::pin(conn.handle_line(line, answers)))
                        .await?;
                }
            }
            WsMessage::Binary(bytes) if self.codec == Codec::Protobuf => {
                conn.state().node.hub().metrics().frames_in.inc();
                let decoded = hubbub_protocol::pb::decode_client(&bytes);
                self.drive(Box::pin(conn.handle(decoded, answers))).await?;
            }
            WsMessage::Text(_) | WsMessage::Binary(_) => {
                let message = match self.codec {
                    Codec::Json => "binary frames are not part of hubbub.v1.json; send text frames",
                    Codec::Protobuf => {
                        "text frames are not part of hubbub.v1.pb; send binary protobuf frames"
                    }
                };
                conn.wrong_frame_kind(message, answers);
            }
            // Pings are answered by tungstenite, but they cost as much as any frame: they
            // count against the frame rate limit like the rest.
            WsMessage::Ping(_) | WsMessage::Pong(_) => conn.control_frame(),
            // Close frames end the stream (tungstenite answers them).
            WsMessage::Close(_) => {}
        }
        Ok(())
    }

    /// Sets the linger after a write of `count` frames at `now`: from the base linger for
    /// a quiet connection, growing with the rate it is written at, up to the largest for
    /// a connection that gets two frames or more per largest linger. A busy connection is
    /// written less often (more frames per write); a quiet one is written at once.
    fn adapt_linger(&mut self, now: Instant, count: usize) {
        if self.linger_max <= self.linger_base {
            return;
        }
        let since = now.saturating_duration_since(self.last_write).as_secs_f64();
        let rate = count as f64 / since.max(0.001);
        self.rate = 0.75 * self.rate + 0.25 * rate;
        let full = 2.0 / self.linger_max.as_secs_f64();
        let share = (self.rate / full).min(1.0);
        self.linger = self.linger_base + (self.linger_max - self.linger_base).mul_f64(share);
    }

    /// Writes what is queued and keeps the timers; returns only when writing must stop.
    ///
    /// A connection written to less than the linger ago waits for the linger to end and
    /// then writes everything queued meanwhile in one frame. While it lingers it does not
    /// watch the queue, so pushes do not wake it: one wake-up and one write per linger
    /// however many frames arrive (a push that fills a quarter of the queue still wakes
    /// it, and an answer to the client's own request ends the linger).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Stop> {
        let max_coalesce = self.state.config.max_coalesce_bytes;
        let heartbeat = Duration::from_millis(self.state.config.heartbeat_ms);
        loop {
            if self.flushing {
                match Pin::new(&mut self.ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        let now = Instant::now();
                        let (_, count) = std::mem::take(&mut self.fed);
                        self.adapt_linger(now, count);
                        self.flushing = false;
                        self.write_deadline = None;
                        self.last_write = now;
                        self.frames_out.inc();
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Stop::Broken),
                    Poll::Pending => {}
                }
            }
            if !self.flushing {
                let now = Instant::now();
                let lingering = !self.backlog
                    && now < self.last_write + self.linger
                    && !self.session.answer_queued();
                self.lingering = lingering;
                // Otherwise a push that brings what the writer waits for wakes the task.
                let ready = self.ping_due || self.session.poll_queue(cx, lingering);
                if ready {
                    match Pin::new(&mut self.ws).poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let msg = if self.ping_due {
                                self.ping_due = false;
                                WsMessage::Ping(bytes::Bytes::new())
                            } else {
                                self.session.clear_answer_queued();
                                let next = next_message(self.codec, &self.session, max_coalesce);
                                let Some(next) = next else {
                                    continue;
                                };
                                self.backlog = next.more;
                                self.fed.1 += next.count;
                                if self.session.taken() {
                                    // A reply of this task waits for the room just made.
                                    cx.waker().wake_by_ref();
                                }
                                next.msg
                            };
                            let (len, data) = match &msg {
                                WsMessage::Text(t) => (t.len(), true),
                                WsMessage::Binary(b) => (b.len(), true),
                                _ => (0, false),
                            };
                            self.fed.0 += len.max(1);
                            if Pin::new(&mut self.ws).start_send(msg).is_err() {
                                return Poll::Ready(Stop::Broken);
                            }
                            // More is queued (protobuf: one frame per message): hand it
                            // over too, and flush everything with one write.
                            if data && self.backlog && self.fed.0 < max_coalesce {
                                continue;
                            }
                            self.flushing = true;
                            self.write_deadline = Some(now + WRITE_TIMEOUT);
                            // Flush it (and maybe write the next one) in the same poll.
                            continue;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Stop::Broken),
                        Poll::Pending => {}
                    }
                }
                // Frames handed over and not flushed: flush them now.
                if self.fed.0 > 0 {
                    self.flushing = true;
                    self.write_deadline.get_or_insert(now + WRITE_TIMEOUT);
                    continue;
                }
            }
            // Timers.
            let now = Instant::now();
            if self.write_deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(Stop::Broken);
            }
            if self.expires.is_some_and(|e| now >= e) {
                return Poll::Ready(Stop::Expired);
            }
            if now >= self.next_ping {
                self.ping_due = true;
                self.judge = true;
                self.unanswered.get_or_insert(now);
                self.next_ping = now + heartbeat;
                continue;
            }
            let mut deadline = self.next_ping;
            if let Some(d) = self.write_deadline {
                deadline = deadline.min(d);
            }
            if let Some(e) = self.expires {
                deadline = deadline.min(e);
            }
            let linger_until = self.last_write + self.linger;
            if self.lingering && !self.flushing && linger_until > now {
                deadline = deadline.min(linger_until);
            }
            if deadline != self.timer.deadline() {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// The end of a session: answers the sends already handed to the store (when the
    /// peer closed), writes what is queued when the close reason allows, sends the close
    /// frame and lets the peer finish its side of the close.
    async fn finish(&mut self, session: &Session, mut answers: Answers, peer_open: bool) {
        // The peer closed: the sends it made are stored; queue their answers (they are
        // written below if the peer still reads).
        if session.close_reason().is_none() {
            while let Some(answer) = answers.next().await {
                let queued = session.try_reply(OutFrame::new(answer)).is_ok();
                if session.close_reason().is_some() || !queued {
                    break;
                }
            }
        }
        drop(answers);
        let reason = session.close_reason().unwrap_or(CloseReason::NORMAL);
        session.close(reason.clone());
        if reason == CloseReason::DEAD {
            return;
        }
        let max_coalesce = self.state.config.max_coalesce_bytes;
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.flushing && ws.flush().await.is_err() {
                return;
            }
            if reason.flush {
                while let Some(next) = next_message(self.codec, session, max_coalesce) {
                    session.taken();
                    if ws.feed(next.msg).await.is_err() {
                        return;
                    }
                }
            }
            let close = WsMessage::Close(Some(CloseFrame {
                code: reason.code,
                reason: Utf8Bytes::from_static(reason.reason),
            }));
            if ws.send(close).await.is_err() {
                return;
            }
            // The peer may still be sending: keep reading (and discarding) until its
            // close frame, so the socket is not reset with unread data, which would make
            // the peer lose our close frame.
            if peer_open {
                while let Some(Ok(msg)) = ws.next().await {
                    if matches!(msg, WsMessage::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

/// The close a read error calls for: 1009 for a frame over the size limit, 1002 for a
/// protocol violation, 1007 for text (or a close reason) that is not UTF-8; `None` when
/// the connection itself failed.
fn read_error_close(e: &axum::Error) -> Option<CloseReason> {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<WsError>() {
            return match t {
                WsError::Capacity(_) => Some(CloseReason::TOO_LARGE),
                // The peer is gone: there is no one to tell.
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
                WsError::Protocol(_) => Some(CloseReason::PROTOCOL_ERROR),
                WsError::Utf8(_) => Some(CloseReason::INVALID_PAYLOAD),
                _ => None,
            };
        }
        source = s.source();
    }
    None
}

/// One outgoing WebSocket frame and what went into it.
struct Next {
    msg: WsMessage,
    /// Protocol messages it carries.
    count: usize,
    /// It stopped at the byte bound with more waiting.
    more: bool,
}

/// The next WebSocket frame from what is queued: for JSON, as many
/// messages as fit in `max` bytes, joined with `\n`; for protobuf, one message (binary
/// frames carry one each). `None` if there is nothing to write.
fn next_message(codec: Codec, session: &Session, max: usize) -> Option<Next> {
    if codec == Codec::Protobuf {
        let mut first = None;
        let more = session.take_while(|f| {
            first = Some(f.pb().clone());
            false
        });
        return Some(Next {
            msg: WsMessage::Binary(first?),
            count: 1,
            more,
        });
    }
    // One frame goes out as it is (no copy); more are joined into one buffer, sized once
    // for everything queued (with a newline per 16 bytes at most; up to `max`).
    let mut head: Option<Utf8Bytes> = None;
    let mut joined: Option<String> = None;
    let mut count = 0;
    let queued = session.queued_bytes();
    let more = session.take_while(|f| {
        let json = f.json();
        count += 1;
        let len = match (&mut joined, &head) {
            (Some(buf), _) => {
                buf.push('\n');
                buf.push_str(json);
                buf.len()
            }
            (None, Some(first)) => {
                let mut buf = String::with_capacity(
                    (queued + queued / 16).clamp(first.len() * 2 + 1, max + first.len()),
                );
                buf.push_str(first);
                buf.push('\n');
                buf.push_str(json);
                let len = buf.len();
                joined = Some(buf);
                len
            }
            (None, None) => {
                head = Some(json.clone());
                json.len()
            }
        };
        len < max
    });
    let text = match joined {
        Some(buf) => Utf8Bytes::from(buf),
        None => head?,
    };
    Some(Next {
        msg: WsMessage::Text(text),
        count,
        more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn texts(session: &Session, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let frame = OutFrame::new(ServerFrame::Kicked {
                    reason: format!("r{i}"),
                });
                assert!(session.push(&frame));
                frame.json().as_str().to_owned()
            })
            .collect()
    }

    fn text_of(next: &Next) -> &str {
        match &next.msg {
            WsMessage::Text(t) => t.as_str(),
            other => panic!("not a text frame: {other:?}"),
        }
    }

    #[test]
    fn queued_json_frames_are_joined_with_newlines_up_to_the_byte_bound() {
        let s = Session::new(1, "u".into(), "d".into(), 100, &Metrics::new());
        // One frame goes out as it is.
        let one = texts(&s, 1);
        let next = next_message(Codec::Json, &s, 1 << 16).expect("a frame");
        assert_eq!(
            (text_of(&next), next.count, next.more),
            (one[0].as_str(), 1, false)
        );
        // Several are joined, all of them while they fit.
        let five = texts(&s, 5);
        let next = next_message(Codec::Json, &s, 1 << 16).expect("a frame");
        assert_eq!(
            (text_of(&next), next.count, next.more),
            (five.join("\n").as_str(), 5, false)
        );
        assert!(next_message(Codec::Json, &s, 1 << 16).is_none());
        // A frame stops once it reaches the bound; the rest comes next, in order.
        let five = texts(&s, 5);
        let max = five[0].len() * 2 + 2;
        let first = next_message(Codec::Json, &s, max).expect("a frame");
        assert_eq!(
            (text_of(&first), first.count, first.more),
            (five[..3].join("\n").as_str(), 3, true)
        );
        let rest = next_message(Codec::Json, &s, max).expect("a frame");
        assert_eq!(
            (text_of(&rest), rest.count, rest.more),
            (five[3..].join("\n").as_str(), 2, false)
        );
    }
}
