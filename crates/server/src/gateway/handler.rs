//! Request handling for one session: decode, authorize, act, answer.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::FutureExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hubbub_protocol::{
    check_seq, decode_client_frame, is_valid_room_name, is_valid_user_name, validate_content,
    ClientFrame, ContentType, Conv, ErrorCode, ProtoError, ReqId, ServerFrame, SignalKind,
    MAX_CLIENT_MSG_ID,
};
use serde_json::{json, Value};

use crate::access::{history_query, page_limit};
use crate::auth::Identity;
use crate::hub::{CloseReason, OutFrame, Room, SessionHandle};
use crate::store::{now_ms, HistoryQuery, NewMessage};
use crate::AppState;

/// Most user names in one `presence` query.
const MAX_PRESENCE_QUERY: usize = 256;
/// Most conversations named in one `sync`.
const MAX_SYNC_CONVS: usize = 1000;
/// Default sync page size.
const DEFAULT_SYNC: u32 = 500;

/// A session's pipelined `send`s, answered in order. Created on the first `send`: an
/// empty `FuturesOrdered` already holds two allocations, which idle connections skip.
#[derive(Default)]
pub(crate) struct Pending(Option<FuturesOrdered<BoxFuture<'static, ServerFrame>>>);

impl Pending {
    pub(crate) fn push_back(&mut self, answer: BoxFuture<'static, ServerFrame>) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(answer);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl futures_util::Stream for Pending {
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

type Answer = Result<Value, ProtoError>;

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

    pub(crate) fn session(&self) -> &SessionHandle {
        &self.session
    }

    pub(crate) fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    fn user(&self) -> &str {
        &self.identity.user
    }

    /// Handles one protocol message. `send`s are pipelined into `pending`; anything else
    /// waits for the pending sends first, then runs to completion.
    pub(crate) async fn handle_line(&mut self, line: &str, pending: &mut Pending) {
        self.handle(decode_client_frame(line), pending).await
    }

    /// Handles one decoded (or undecodable) protocol message, whatever its codec.
    pub(crate) async fn handle(
        &mut self,
        decoded: Result<ClientFrame, hubbub_protocol::DecodeError>,
        pending: &mut Pending,
    ) {
        if self.frame_limiter.check().is_err() {
            let id = match &decoded {
                Ok(f) => f.id().cloned(),
                Err(e) => e.id.clone(),
            };
            let err = self.strike("too many frames; slow down");
            pending.push_back(futures_util::future::ready(ServerFrame::error(id, err)).boxed());
            return;
        }
        let frame = match decoded {
            Ok(f) => f,
            Err(e) => {
                self.session
                    .reply(ServerFrame::error(e.id, ProtoError::bad_request(e.message)))
                    .await;
                return;
            }
        };
        if let ClientFrame::Send {
            id,
            conv,
            client_msg_id,
            content_type,
            content,
        } = frame
        {
            match self
                .start_send(conv, client_msg_id, content_type, content)
                .await
            {
                Ok(fut) => pending.push_back(fut.map(move |r| answer_frame(id, r)).boxed()),
                Err(e) => {
                    // Keep answers in request order.
                    pending
                        .push_back(futures_util::future::ready(ServerFrame::error(id, e)).boxed())
                }
            }
            return;
        }
        while let Some(answer) = futures_util::StreamExt::next(pending).await {
            self.session.reply(answer).await;
        }
        let id = frame.id().cloned();
        let result = match frame {
            ClientFrame::Ping { id } => {
                self.session.reply(ServerFrame::Pong { id }).await;
                return;
            }
            ClientFrame::Join { room, .. } => self.join(&room).await,
            ClientFrame::Leave { room, .. } => self.leave(&room).await,
            ClientFrame::History {
                conv,
                before_seq,
                after_seq,
                limit,
                ..
            } => self.history(&conv, before_seq, after_seq, limit).await,
            ClientFrame::Sync {
                cursors,
                limit,
                since,
                ..
            } => self.sync(cursors, limit, since).await,
            ClientFrame::Presence { users, .. } => self.presence(&users),
            ClientFrame::Typing { conv, .. } => self.typing(&conv).await.map(|()| Value::Null),
            ClientFrame::Signal {
                to,
                call_id,
                kind,
                data,
                ..
            } => self
                .signal(&to, call_id, kind, data)
                .await
                .map(|()| Value::Null),
            ClientFrame::Read { conv, seq, .. } => {
                self.read(&conv, seq).await.map(|()| Value::Null)
            }
            ClientFrame::Recall { conv, seq, .. } => self.recall(&conv, seq).await,
            ClientFrame::Edit {
                conv, seq, content, ..
            } => self.edit(&conv, seq, content).await,
            ClientFrame::Send { .. } => return,
        };
        match result {
            // Requests without an answer on success (typing, signal).
            Ok(Value::Null) => {}
            other => {
                self.session.reply(answer_frame(id, other)).await;
            }
        }
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

    /// Validates and authorizes a send, hands it to the store, and returns the future of
    /// its `ok` result fields.
    async fn start_send(
        &mut self,
        conv: String,
        client_msg_id: String,
        content_type: ContentType,
        content: Value,
    ) -> Result<BoxFuture<'static, Answer>, ProtoError> {
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(ProtoError::bad_request(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
            )));
        }
        validate_content(content_type, &content, self.state.config.max_text_bytes)?;
        if self.send_limiter.check().is_err() {
            return Err(self.strike("too many messages; slow down"));
        }
        self.strikes = 0;
        let dm_members = self.authorize(&conv).await?;
        let fut = self.state.store.append(NewMessage {
            conv,
            from: self.identity.user.clone(),
            client_msg_id,
            content_type,
            content,
            dm_members,
            origin: self.session.id,
        });
        Ok(async move {
            let a = fut.await?;
            let m = a.message;
            Ok(json!({"conv": m.conv, "seq": m.seq, "msg_id": m.msg_id, "ts": m.ts}))
        }
        .boxed())
    }

    /// Checks that the user may read and write `conv` (see [`crate::access`]).
    async fn authorize(&self, conv: &str) -> Result<Option<(String, String)>, ProtoError> {
        crate::access::authorize(&self.state, self.user(), conv).await
    }

    async fn room(&self, conv: &str) -> Result<Arc<Room>, ProtoError> {
        Ok(self.state.hub.room(conv, &*self.state.store).await?)
    }

    async fn join(&mut self, name: &str) -> Answer {
        if !is_valid_room_name(name) {
            return Err(ProtoError::bad_request(
                "room must match ^[A-Za-z0-9_.-]{1,64}$",
            ));
        }
        let conv = Conv::room_id(name);
        let room = self.room(&conv).await?;
        if !room.contains(self.user()) {
            let max = self.state.config.max_rooms_per_user;
            let rooms = self
                .state
                .store
                .memberships(self.user())
                .await?
                .iter()
                .filter(|c| c.conv.starts_with("room:"))
                .count();
            if rooms >= max {
                return Err(ProtoError::new(
                    ErrorCode::Forbidden,
                    format!("a user may be a member of at most {max} rooms"),
                ));
            }
        }
        // A room nobody is in may be created by this join: that takes a token from the
        // address's and the server's room-creation buckets first.
        if room.is_empty() {
            self.state.room_creation.check(self.peer)?;
        }
        let outcome = self.state.store.join_room(&conv, self.user()).await?;
        // The room's bus shard applies the join (and tells the members) in commit order
        // with the room's messages; answer once it has.
        self.state.bus.flush(&conv).await;
        let room = self.room(&conv).await?;
        let online = self.state.hub.online_in(&room);
        Ok(
            json!({"conv": conv, "last_seq": outcome.last_seq, "online": online, "created": outcome.created}),
        )
    }

    async fn leave(&mut self, name: &str) -> Answer {
        if !is_valid_room_name(name) {
            return Err(ProtoError::bad_request(
                "room must match ^[A-Za-z0-9_.-]{1,64}$",
            ));
        }
        let conv = Conv::room_id(name);
        if !self.state.store.leave_room(&conv, self.user()).await? {
            return Err(ProtoError::new(
                ErrorCode::NotMember,
                format!("you are not a member of {conv}"),
            ));
        }
        // As for a join: answered once the room's shard has applied it.
        self.state.bus.flush(&conv).await;
        Ok(json!({"conv": conv}))
    }

    async fn history(
        &self,
        conv: &str,
        before_seq: Option<u64>,
        after_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Answer {
        self.authorize(conv).await?;
        let q = history_query(before_seq, after_seq, limit, self.state.config.history_max)?;
        let page = self.state.store.history(conv, q).await?;
        Ok(json!({"messages": page.messages, "has_more": page.has_more}))
    }

    async fn sync(
        &self,
        cursors: BTreeMap<String, u64>,
        limit: Option<u32>,
        since: Option<i64>,
    ) -> Answer {
        // Taken before reading anything, and before the stamps of changes still being
        // committed: a change committed while this sync runs is replayed again by the
        // next one rather than missed (replays are idempotent).
        let server_time = now_ms().min(self.state.store.watermark()) - 1;
        if cursors.len() > MAX_SYNC_CONVS {
            return Err(ProtoError::bad_request(format!(
                "at most {MAX_SYNC_CONVS} conversations per sync"
            )));
        }
        for (conv, &cursor) in &cursors {
            Conv::parse(conv)?;
            check_seq("a cursor", cursor)?;
        }
        let limit = page_limit(limit, DEFAULT_SYNC, self.state.config.sync_max)?;
        let mut out = serde_json::Map::new();
        let mut more = Vec::new();
        let mut denied = Vec::new();
        for (conv, cursor) in cursors {
            if self.authorize(&conv).await.is_err() {
                denied.push(conv);
                continue;
            }
            let page = self
                .state
                .store
                .history(
                    &conv,
                    HistoryQuery::After {
                        after: cursor,
                        limit,
                    },
                )
                .await?;
            let last = page.messages.last().map_or(cursor, |m| m.seq);
            let mut frames: Vec<ServerFrame> = Vec::new();
            if let Some(since) = since {
                // Recalls and edits of messages the client already has.
                let changes = self.state.store.changes_since(&conv, since, cursor).await?;
                frames.extend(changes.into_iter().filter_map(change_frame));
            }
            frames.extend(page.messages.into_iter().map(ServerFrame::Message));
            for f in frames {
                if !self.session.reply(f).await {
                    return Err(ProtoError::new(ErrorCode::Unavailable, "session closing"));
                }
            }
            if page.has_more {
                more.push(conv.clone());
            }
            out.insert(conv, json!(last));
        }
        let conversations: Vec<Value> = self
            .state
            .store
            .memberships(self.user())
            .await?
            .into_iter()
            .map(|c| json!({"conv": c.conv, "last_seq": c.last_seq}))
            .collect();
        let mut body = json!({
            "server_time": server_time,
            "cursors": out,
            "caught_up": more.is_empty(),
            "more": more,
            "conversations": conversations,
        });
        if !denied.is_empty() {
            body["denied"] = json!(denied);
        }
        Ok(body)
    }

    async fn read(&self, conv: &str, seq: u64) -> Result<(), ProtoError> {
        check_seq("seq", seq)?;
        self.authorize(conv).await?;
        self.state
            .store
            .mark_read(conv, self.user(), seq, self.session.id)
            .await?;
        Ok(())
    }

    /// Only the sender, or an admin of the room, may recall.
    async fn recall(&self, conv: &str, seq: u64) -> Answer {
        check_seq("seq", seq)?;
        self.authorize(conv).await?;
        let msg = self.existing_message(conv, seq).await?;
        if msg.from != self.user() {
            let admin = Conv::parse(conv)?.is_room()
                && self
                    .state
                    .store
                    .member_role(conv, self.user())
                    .await?
                    .is_some_and(|r| r == "admin");
            if !admin {
                return Err(ProtoError::new(
                    ErrorCode::Forbidden,
                    "only the sender or a room admin may recall a message",
                ));
            }
        }
        self.state
            .store
            .recall(conv, seq, self.user(), self.session.id)
            .await?;
        Ok(json!({"conv": conv, "seq": seq}))
    }

    /// Only the sender may edit; the new content follows the message's content type.
    async fn edit(&self, conv: &str, seq: u64, content: Value) -> Answer {
        check_seq("seq", seq)?;
        self.authorize(conv).await?;
        let msg = self.existing_message(conv, seq).await?;
        if msg.from != self.user() {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                "only the sender may edit a message",
            ));
        }
        validate_content(msg.content_type, &content, self.state.config.max_text_bytes)?;
        let edited_at = self
            .state
            .store
            .edit(conv, seq, content, self.session.id)
            .await?;
        Ok(json!({"conv": conv, "seq": seq, "edited_at": edited_at}))
    }

    async fn existing_message(
        &self,
        conv: &str,
        seq: u64,
    ) -> Result<hubbub_protocol::Message, ProtoError> {
        self.state.store.message(conv, seq).await?.ok_or_else(|| {
            ProtoError::new(ErrorCode::NotFound, format!("no message {seq} in {conv}"))
        })
    }

    fn presence(&self, users: &[String]) -> Answer {
        if users.len() > MAX_PRESENCE_QUERY {
            return Err(ProtoError::bad_request(format!(
                "at most {MAX_PRESENCE_QUERY} users per presence query"
            )));
        }
        let online: serde_json::Map<String, Value> = users
            .iter()
            .map(|u| (u.clone(), Value::Bool(self.state.hub.is_online(u))))
            .collect();
        Ok(json!({"online": online}))
    }

    async fn typing(&self, conv: &str) -> Result<(), ProtoError> {
        self.authorize(conv).await?;
        if let Ok(Conv::Room(_)) = Conv::parse(conv) {
            if self.room(conv).await?.len() > self.state.config.large_room {
                return Ok(());
            }
        }
        let frame = OutFrame::new(ServerFrame::Typing {
            conv: conv.to_string(),
            user: self.user().to_string(),
        });
        self.state
            .hub
            .deliver(conv, &frame, None, Some(self.user()), &*self.state.store)
            .await?;
        Ok(())
    }

    async fn signal(
        &self,
        to: &str,
        call_id: String,
        kind: SignalKind,
        data: Value,
    ) -> Result<(), ProtoError> {
        if !is_valid_user_name(to) {
            return Err(ProtoError::bad_request("to must be a valid user name"));
        }
        if to == self.user() {
            return Err(ProtoError::bad_request("cannot signal yourself"));
        }
        if call_id.is_empty() || call_id.len() > 128 {
            return Err(ProtoError::bad_request("call_id must be 1 to 128 bytes"));
        }
        let max = self.state.config.max_signal_bytes;
        let size = json_len(&data);
        if size > max {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!("signal data must be at most {max} bytes (it is {size})"),
            ));
        }
        if !self.state.hub.is_online(to) {
            return Err(ProtoError::new(
                ErrorCode::NotFound,
                format!("{to} is not online"),
            ));
        }
        if !self.state.store.share_conversation(self.user(), to).await? {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                format!("you share no room or dm with {to}"),
            ));
        }
        // Last, so that only signals that are delivered spend the budget.
        if !self.state.signal_budget.take(self.user(), to, size) {
            return Err(ProtoError::new(
                ErrorCode::RateLimited,
                format!("too much signal data to {to}; slow down"),
            ));
        }
        let frame = OutFrame::new(ServerFrame::Signal {
            from: self.user().to_string(),
            call_id,
            kind,
            data,
        });
        if self.state.hub.send_to_user(to, &frame, None) == 0 {
            return Err(ProtoError::new(
                ErrorCode::NotFound,
                format!("{to} is not online"),
            ));
        }
        Ok(())
    }

    /// Tells users who share a conversation with this user that it came online or went
    /// offline. Large rooms are skipped.
    pub(crate) async fn announce_presence(&self, online: bool) {
        let store = &*self.state.store;
        let convs = match store.memberships(self.user()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "presence: cannot list conversations");
                return;
            }
        };
        let mut notify: HashSet<Arc<str>> = HashSet::new();
        for c in convs {
            match Conv::parse(&c.conv) {
                Ok(dm @ Conv::Dm(..)) => {
                    if let Some(peer) = dm.dm_peer(self.user()) {
                        notify.insert(Arc::from(peer));
                    }
                }
                Ok(Conv::Room(_)) => {
                    if let Ok(room) = self.state.hub.room(&c.conv, store).await {
                        if room.len() <= self.state.config.large_room {
                            notify.extend(room.members());
                        }
                    }
                }
                Err(_) => {}
            }
        }
        notify.remove(self.user());
        let frame = OutFrame::new(ServerFrame::Presence {
            user: self.user().to_string(),
            online,
        });
        for u in notify {
            self.state.hub.send_to_user(&u, &frame, None);
        }
    }
}

/// The length of `v` encoded as compact JSON.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

fn answer_frame(id: Option<ReqId>, result: Answer) -> ServerFrame {
    match result {
        Ok(body) => ServerFrame::ok(id, body),
        Err(e) => ServerFrame::error(id, e),
    }
}

/// The frame a replayed change is pushed as.
fn change_frame(c: crate::store::Committed) -> Option<ServerFrame> {
    use crate::store::Committed;
    match c {
        Committed::Recalled { conv, seq, by, .. } => Some(ServerFrame::Recalled { conv, seq, by }),
        Committed::Edited {
            conv,
            seq,
            content,
            edited_at,
            ..
        } => Some(ServerFrame::Edited {
            conv,
            seq,
            content,
            edited_at,
        }),
        Committed::Message { .. } | Committed::Receipt { .. } | Committed::Member { .. } => None,
    }
}
