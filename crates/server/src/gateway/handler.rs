//! Request handling for one session: decode, call the [`Node`](crate::node::Node),
//! answer.
//!
//! Every answer (an `ok`, an `error` of any kind, a `pong`) leaves through the session's
//! [`Answers`], in request order: a `send`'s answer is queued at once as the future of
//! its commit, and any other request first waits for the answers before it. So an
//! `error` for a bad frame never overtakes the `ok`s of the sends made before it.

use std::num::NonZeroU32;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::FutureExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hubbub_protocol::{
    decode_client_frame, ClientFrame, ErrorCode, ProtoError, Reply, ReqId, ServerFrame,
};

use crate::auth::Identity;
use crate::hub::{CloseReason, SessionHandle};
use crate::node::{Actor, Node, SendRequest, SignalRequest, SyncRequest};
use crate::AppState;

/// A session's answers, in request order. Created on the first answer: an empty
/// `FuturesOrdered` already holds two allocations, which idle connections skip.
#[derive(Default)]
pub(crate) struct Answers(Option<FuturesOrdered<BoxFuture<'static, ServerFrame>>>);

impl Answers {
    /// Queues the answer a future will give (a `send`'s, once its commit lands).
    fn push_later(&mut self, answer: BoxFuture<'static, ServerFrame>) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(answer);
    }

    /// Queues an answer that is ready now.
    fn push(&mut self, answer: ServerFrame) {
        self.push_later(futures_util::future::ready(answer).boxed());
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl futures_util::Stream for Answers {
    type Item = ServerFrame;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ServerFrame>> {
        match &mut self.0 {
            Some(p) => futures_util::StreamExt::poll_next_unpin(p, cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

/// The request handler of one session.
pub(crate) struct Conn {
    state: Arc<AppState>,
    session: SessionHandle,
    identity: Identity,
    peer: std::net::IpAddr,
    send_limiter: DefaultDirectRateLimiter,
    frame_limiter: DefaultDirectRateLimiter,
    strikes: u32,
}

impl Conn {
    pub(crate) fn new(
        state: Arc<AppState>,
        session: SessionHandle,
        identity: Identity,
        peer: std::net::IpAddr,
    ) -> Conn {
        let cfg = &state.config;
        let rate = NonZeroU32::new(cfg.send_rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.send_burst).unwrap_or(NonZeroU32::MIN);
        let frame_rate = NonZeroU32::new(cfg.frame_rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let frame_burst = NonZeroU32::new(cfg.frame_burst).unwrap_or(NonZeroU32::MIN);
        // One clock for all limiters: creating one calibrates it (CPUID and timing),
        // which cost more than the rest of accepting a connection.
        static CLOCK: std::sync::LazyLock<governor::clock::DefaultClock> =
            std::sync::LazyLock::new(governor::clock::DefaultClock::default);
        Conn {
            send_limiter: RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                CLOCK.clone(),
            ),
            frame_limiter: RateLimiter::direct_with_clock(
                Quota::per_second(frame_rate).allow_burst(frame_burst),
                CLOCK.clone(),
            ),
            state,
            session,
            identity,
            peer,
            strikes: 0,
        }
    }

    pub(crate) fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    fn node(&self) -> &Node {
        &self.state.node
    }

    fn actor(&self) -> Actor<'_> {
        Actor {
            user: &self.identity.user,
            session: self.session.id,
        }
    }

    /// Handles one protocol message of a JSON text frame.
    pub(crate) async fn handle_line(&mut self, line: &str, answers: &mut Answers) {
        self.handle(decode_client_frame(line), answers).await
    }

    /// Answers a frame of the wrong kind for the codec (binary on JSON, text on
    /// protobuf).
    pub(crate) fn wrong_frame_kind(&mut self, message: &str, answers: &mut Answers) {
        answers.push(ServerFrame::error(None, ProtoError::bad_request(message)));
    }

    /// Handles one decoded (or undecodable) protocol message, whatever its codec. A
    /// `send` is handed to the store at once and its answer queued as the future of its
    /// commit (pipelining); any other request waits for the answers before it, then runs
    /// to completion.
    pub(crate) async fn handle(
        &mut self,
        decoded: Result<ClientFrame, hubbub_protocol::DecodeError>,
        answers: &mut Answers,
    ) {
        if self.frame_limiter.check().is_err() {
            let id = match &decoded {
                Ok(f) => f.id().cloned(),
                Err(e) => e.id.clone(),
            };
            let err = self.strike("too many frames; slow down");
            answers.push(ServerFrame::error(id, err));
            return;
        }
        let frame = match decoded {
            Ok(f) => f,
            Err(e) => {
                answers.push(ServerFrame::error(e.id, ProtoError::bad_request(e.message)));
                return;
            }
        };
        if let ClientFrame::Send {
            id,
            conv,
            client_msg_id,
            content_type,
            content,
            reply_to,
        } = frame
        {
            let req = SendRequest {
                conv,
                client_msg_id,
                content_type,
                content,
                reply_to,
            };
            match self.send(req).await {
                Ok(fut) => answers.push_later(fut.map(move |r| answer(id, r)).boxed()),
                Err(e) => answers.push(ServerFrame::error(id, e)),
            }
            return;
        }
        // The sends before this request are stored (a history after a send sees it) and
        // answered before it.
        while let Some(earlier) = futures_util::StreamExt::next(answers).await {
            self.session.reply(earlier).await;
        }
        if let Some(a) = self.request(frame).await {
            answers.push(a);
        }
    }

    /// Runs one request other than `send`; its answer, if it has one.
    async fn request(&self, frame: ClientFrame) -> Option<ServerFrame> {
        let node = self.node();
        let actor = self.actor();
        let id = frame.id().cloned();
        Some(match frame {
            ClientFrame::Ping { id } => ServerFrame::Pong { id },
            ClientFrame::Join { room, .. } => answer(id, node.join(actor, &room, self.peer).await),
            ClientFrame::Leave { room, .. } => answer(id, node.leave(actor, &room).await),
            ClientFrame::History {
                conv,
                before_seq,
                after_seq,
                limit,
                ..
            } => answer(
                id,
                node.history(actor.user, &conv, before_seq, after_seq, limit)
                    .await,
            ),
            ClientFrame::Sync {
                cursors,
                limit,
                since,
                ..
            } => {
                let req = SyncRequest {
                    cursors,
                    limit,
                    since,
                };
                let session = &self.session;
                answer(id, node.sync(actor, req, |f| session.reply(f)).await)
            }
            ClientFrame::Presence { users, .. } => answer(id, node.presence(&users)),
            ClientFrame::Recall { conv, seq, .. } => {
                answer(id, node.recall(actor, &conv, seq).await)
            }
            ClientFrame::Edit {
                conv, seq, content, ..
            } => answer(id, node.edit(actor, &conv, seq, content).await),
            ClientFrame::React {
                conv,
                seq,
                emoji,
                on,
                ..
            } => answer(id, node.react(actor, &conv, seq, &emoji, on).await),
            ClientFrame::Remove { room, user, .. } => {
                let admin = self.identity.admin && !self.identity.guest;
                answer(id, node.remove(actor, admin, &room, &user).await)
            }
            // No answer on success.
            ClientFrame::Typing { conv, .. } => return failed(id, node.typing(actor, &conv).await),
            ClientFrame::Read { conv, seq, .. } => {
                return failed(id, node.read(actor, &conv, seq).await)
            }
            ClientFrame::Signal {
                to,
                call_id,
                kind,
                data,
                ..
            } => {
                let req = SignalRequest {
                    to,
                    call_id,
                    kind,
                    data,
                };
                return failed(id, node.signal(actor, req).await);
            }
            ClientFrame::Send { .. } => return None,
        })
    }

    /// Hands a send to the node, with this connection's send rate as its admission.
    async fn send(
        &mut self,
        req: SendRequest,
    ) -> Result<BoxFuture<'static, Result<hubbub_protocol::reply::SendOk, ProtoError>>, ProtoError>
    {
        let mut rate_limited = false;
        let limiter = &self.send_limiter;
        let admitted = self
            .node()
            .send(self.actor(), req, || {
                if limiter.check().is_err() {
                    rate_limited = true;
                    return Err(ProtoError::new(ErrorCode::RateLimited, ""));
                }
                Ok(())
            })
            .await;
        if rate_limited {
            return Err(self.strike("too many messages; slow down"));
        }
        if admitted.is_ok() {
            self.strikes = 0;
        }
        admitted
    }

    /// Counts a ping or pong from the peer against the frame rate limit. Nothing is
    /// answered (control frames have no `id`), but the strikes count: a peer that keeps
    /// flooding is closed with 1008.
    pub(crate) fn control_frame(&mut self) {
        if self.frame_limiter.check().is_err() {
            self.strike("too many frames; slow down");
        }
    }

    /// Counts a rate-limited frame; a connection that keeps going is closed with 1008.
    fn strike(&mut self, message: &str) -> ProtoError {
        self.strikes += 1;
        if self.strikes >= self.state.config.rate_limit_strikes {
            self.session.close(CloseReason::RATE_LIMITED);
        }
        ProtoError::new(ErrorCode::RateLimited, message)
    }

    /// Tells the users who share a conversation with this user that it came online or
    /// went offline.
    pub(crate) async fn announce_presence(&self, online: bool) {
        self.node()
            .announce_presence(&self.identity.user, online)
            .await
    }
}

/// The answer to a request with a body.
fn answer<T: Into<Reply>>(id: Option<ReqId>, result: Result<T, ProtoError>) -> ServerFrame {
    match result {
        Ok(body) => ServerFrame::ok(id, body),
        Err(e) => ServerFrame::error(id, e),
    }
}

/// The answer to a request answered only when it fails.
fn failed(id: Option<ReqId>, result: Result<(), ProtoError>) -> Option<ServerFrame> {
    result.err().map(|e| ServerFrame::error(id, e))
}
