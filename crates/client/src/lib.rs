//! An async client for the hubbub protocol (`hubbub.v1.json` or `hubbub.v1.pb`), used by
//! the terminal client, the load generator and the test suite.
//!
//! A [`Client`] owns one WebSocket connection. A background task reads the socket: answers
//! (`ok`, `error`, `pong`) are routed to the request that carries their `id`, and every
//! other frame (messages, presence, member events...) becomes an [`Event`]. Requests
//! take `&self`, so one task can wait for events while others send.
//!
//! ```no_run
//! use std::time::Duration;
//! use hubbub_client::{Client, ConnectOptions, Event};
//! use hubbub_protocol::ServerFrame;
//!
//! # async fn demo() -> Result<(), hubbub_client::ClientError> {
//! let mut alice = Client::connect(ConnectOptions::guest("ws://127.0.0.1:8080", "alice")).await?;
//! alice.join("lobby").await?;
//! let sent = alice.send_text("room:lobby", "hello").await?;
//! println!("stored as seq {}", sent.seq);
//! while let Ok(Event::Frame(ServerFrame::Message(m))) = alice.next_event(Duration::from_secs(30)).await {
//!     println!("{}: {:?}", m.from, m.content);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! [`Session`] adds reconnection: it remembers the highest `seq` seen per conversation
//! and, after any disconnect, reconnects with backoff and `sync`s what was missed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hubbub_protocol::reply::{HistoryOk, PresenceOk, SendOk, SyncOk};
use hubbub_protocol::{
    ClientFrame, ContentType, ProtoError, Reply, ServerFrame, SUBPROTOCOL_JSON, SUBPROTOCOL_PB,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

mod session;
pub use session::{Session, SessionEvent};

/// How long a request waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Client::connect`] waits for the `welcome`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the upgrade (`status` is the HTTP status, `body` its body), or
    /// the connection could not be made (`status` is `None`).
    #[error("connect failed ({status:?}): {body}")]
    Connect { status: Option<u16>, body: String },
    /// The server answered the request with an `error` frame.
    #[error("server error: {0}")]
    Server(ProtoError),
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out")]
    Timeout,
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A WebSocket error.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `ws://host:port` (the path `/ws` is added when the URL has none).
    pub url: String,
    /// Guest name (`?user=`), used when no token is given.
    pub user: Option<String>,
    /// A token from `POST /api/login`, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Send the token as `?token=` instead of the header.
    pub token_in_query: bool,
    /// Device id (`?device=`); the server's default is `default`.
    pub device: Option<String>,
    /// An `Origin` header, as a browser would send.
    pub origin: Option<String>,
    /// The subprotocol to offer: `hubbub.v1.json` (default) or `hubbub.v1.pb`.
    pub subprotocol: Option<String>,
    /// Other nodes of the same cluster (`ws://host:port` each): a [`Session`] whose
    /// connection ends tries them in turn after `url`, moving on at each failed
    /// attempt, so it fails over when its node dies. [`Client::connect`] uses `url` only.
    pub fallback_urls: Vec<String>,
}

impl ConnectOptions {
    /// A guest connection (`?user=NAME`).
    pub fn guest(url: impl Into<String>, user: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            user: Some(user.into()),
            ..Default::default()
        }
    }

    /// A connection authenticated by a token.
    pub fn with_token(url: impl Into<String>, token: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: Some(token.into()),
            ..Default::default()
        }
    }

    /// Uses `token` instead of a guest name.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self.user = None;
        self
    }

    /// Connects as device `device`.
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }

    /// Speaks protobuf (`hubbub.v1.pb`) instead of JSON.
    pub fn protobuf(mut self) -> Self {
        self.subprotocol = Some(SUBPROTOCOL_PB.into());
        self
    }

    /// The URL to open, with its query.
    pub fn request_url(&self) -> String {
        let base = self.url.trim_end_matches('/');
        let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
        let mut url = if after_scheme.contains('/') {
            base.to_string()
        } else {
            format!("{base}/ws")
        };
        let mut query = Vec::new();
        match (&self.token, &self.user) {
            (Some(t), _) if self.token_in_query => query.push(format!("token={}", encode(t))),
            (None, Some(u)) => query.push(format!("user={}", encode(u))),
            _ => {}
        }
        if let Some(d) = &self.device {
            query.push(format!("device={}", encode(d)));
        }
        if !query.is_empty() {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&query.join("&"));
        }
        url
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The server's `welcome`.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub user: String,
    pub device: String,
    pub session: String,
    pub heartbeat_ms: u64,
    pub server_time: i64,
    pub max_frame_bytes: usize,
    /// STUN/TURN servers for calls (`RTCIceServer`s; empty from older servers).
    pub ice_servers: Vec<Value>,
}

/// The close frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

/// Something the server pushed.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A frame that is not the answer to a request.
    Frame(ServerFrame),
    /// The connection ended, with the server's close frame if there was one.
    Closed(Option<CloseInfo>),
}

/// The `ok` of a `send`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub conv: String,
    pub seq: u64,
    pub msg_id: String,
    pub ts: i64,
    pub client_msg_id: String,
}

/// A page of history, ascending by `seq`.
pub type HistoryPage = HistoryOk;

pub use hubbub_protocol::Message;

/// The outcome of a `sync`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncResult {
    /// The missed messages, by conversation in `seq` order, each once: per
    /// conversation exactly the seqs after its cursor up to its new cursor.
    pub messages: Vec<Message>,
    /// The new cursor of every synced conversation (never past a gap: live messages
    /// that arrived during the sync count only when they directly follow the replay).
    pub cursors: BTreeMap<String, u64>,
    /// Messages pushed live during the sync beyond a gap after the run in `messages`
    /// (not covered by `cursors`: a later sync from them returns these again).
    pub live: Vec<Message>,
    /// Conversations with more to fetch (sync again from `cursors`).
    pub more: Vec<String>,
    pub caught_up: bool,
    /// Every conversation of the user with its `last_seq`.
    pub conversations: Vec<(String, u64)>,
    /// Named conversations the user may not read.
    pub denied: Vec<String>,
    /// With `since`: recalls, edits and reactions of messages up to the cursors, as
    /// `recalled`, `edited` and `reactions` frames (and any that arrived live meanwhile).
    pub changes: Vec<ServerFrame>,
    /// Pass this as `since` to the next sync.
    pub server_time: i64,
}

type Answer = Result<Reply, ProtoError>;

struct SyncCollect {
    convs: HashSet<String>,
    messages: Vec<Message>,
    changes: Vec<ServerFrame>,
}

#[derive(Default)]
struct Shared {
    pending: HashMap<String, oneshot::Sender<Answer>>,
    /// While a `sync` runs: the conversations it names and what was collected.
    sync: Option<SyncCollect>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Json,
    Protobuf,
}

/// One connection to a hubbub server.
pub struct Client {
    welcome: Welcome,
    codec: Codec,
    out: mpsc::UnboundedSender<WsMessage>,
    events: mpsc::UnboundedReceiver<Event>,
    buffered: VecDeque<Event>,
    shared: Arc<parking_lot::Mutex<Shared>>,
    /// Serializes syncs (one collector at a time).
    sync_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("welcome", &self.welcome)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Connects and waits for the `welcome`.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ClientError> {
        let url = opts.request_url();
        let mut req = url.as_str().into_client_request()?;
        let headers = req.headers_mut();
        if let (Some(t), false) = (&opts.token, opts.token_in_query) {
            headers.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?,
            );
        }
        if let Some(o) = &opts.origin {
            headers.insert(
                "origin",
                HeaderValue::from_str(o).map_err(|e| ClientError::Protocol(e.to_string()))?,
            );
        }
        let offered = opts
            .subprotocol
            .clone()
            .unwrap_or_else(|| SUBPROTOCOL_JSON.into());
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&offered).map_err(|e| ClientError::Protocol(e.to_string()))?,
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(16 << 20))
            .max_frame_size(Some(16 << 20));
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(req, Some(config), true),
        )
        .await
        .map_err(|_| ClientError::Timeout)?;
        let (ws, resp) = match connected {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ClientError::Connect {
                    status: Some(status),
                    body,
                });
            }
            Err(e) => {
                return Err(ClientError::Connect {
                    status: None,
                    body: e.to_string(),
                })
            }
        };
        let codec = match resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
        {
            Some(SUBPROTOCOL_PB) => Codec::Protobuf,
            _ => Codec::Json,
        };
        let shared = Arc::new(parking_lot::Mutex::new(Shared::default()));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(io_task(ws, codec, out_rx, ev_tx, shared.clone()));
        let first = tokio::time::timeout(CONNECT_TIMEOUT, ev_rx.recv())
            .await
            .map_err(|_| ClientError::Timeout)?;
        let welcome = match first {
            Some(Event::Frame(ServerFrame::Welcome {
                user,
                device,
                session,
                heartbeat_ms,
                server_time,
                max_frame_bytes,
                ice_servers,
            })) => Welcome {
                user,
                device,
                session,
                heartbeat_ms,
                server_time,
                max_frame_bytes,
                ice_servers,
            },
            Some(Event::Closed(_)) | None => return Err(ClientError::Closed),
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome first, got {other:?}"
                )))
            }
        };
        Ok(Client {
            welcome,
            codec,
            out: out_tx,
            events: ev_rx,
            buffered: VecDeque::new(),
            shared,
            sync_lock: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            task,
        })
    }

    /// The server's greeting.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Whether this connection speaks protobuf.
    pub fn is_protobuf(&self) -> bool {
        self.codec == Codec::Protobuf
    }

    fn encode(&self, frame: &ClientFrame) -> WsMessage {
        match self.codec {
            Codec::Json => {
                WsMessage::text(serde_json::to_string(frame).unwrap_or_else(|_| "{}".into()))
            }
            Codec::Protobuf => WsMessage::binary(hubbub_protocol::pb::encode_client(frame)),
        }
    }

    fn fresh_id(&self) -> String {
        format!("c{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a request and waits for its `ok` (the body's fields) or `error`. A frame
    /// without an id gets a fresh one.
    pub async fn request(&self, frame: ClientFrame) -> Result<Map<String, Value>, ClientError> {
        self.answer(frame).await.map(Reply::into_fields)
    }

    /// [`Client::request`], reading the `ok` as `T` (a type of
    /// [`hubbub_protocol::reply`]).
    pub async fn request_as<T: serde::de::DeserializeOwned>(
        &self,
        frame: ClientFrame,
    ) -> Result<T, ClientError> {
        let kind = frame.type_name();
        self.answer(frame)
            .await?
            .parse()
            .map_err(|e| ClientError::Protocol(format!("the ok of {kind}: {e}")))
    }

    async fn answer(&self, mut frame: ClientFrame) -> Result<Reply, ClientError> {
        let id = match frame.id() {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => {
                let id = self.fresh_id();
                frame.set_id(Some(Value::String(id.clone())));
                id
            }
        };
        let (tx, rx) = oneshot::channel();
        self.shared.lock().pending.insert(id.clone(), tx);
        if self.out.send(self.encode(&frame)).is_err() {
            self.shared.lock().pending.remove(&id);
            return Err(ClientError::Closed);
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(Ok(body))) => Ok(body),
            Ok(Ok(Err(e))) => Err(ClientError::Server(e)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => {
                self.shared.lock().pending.remove(&id);
                Err(ClientError::Timeout)
            }
        }
    }

    /// Sends a frame without waiting for anything.
    pub async fn send_no_reply(&self, frame: ClientFrame) -> Result<(), ClientError> {
        let msg = self.encode(&frame);
        self.out.send(msg).map_err(|_| ClientError::Closed)
    }

    /// Sends a raw text frame (for tests of malformed input).
    pub async fn send_raw(&self, text: impl Into<String>) -> Result<(), ClientError> {
        self.out
            .send(WsMessage::text(text.into()))
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.out
            .send(WsMessage::binary(bytes))
            .map_err(|_| ClientError::Closed)
    }

    /// Joins `room` (a name, without `room:`); returns the `ok` body.
    pub async fn join(&self, room: &str) -> Result<Map<String, Value>, ClientError> {
        self.request(ClientFrame::Join {
            id: None,
            room: room.into(),
        })
        .await
    }

    /// Leaves `room`.
    pub async fn leave(&self, room: &str) -> Result<Map<String, Value>, ClientError> {
        self.request(ClientFrame::Leave {
            id: None,
            room: room.into(),
        })
        .await
    }

    /// A `client_msg_id` unique to this process run.
    pub fn new_client_msg_id(&self) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{nanos:x}-{:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Sends a text message.
    pub async fn send_text(&self, conv: &str, text: &str) -> Result<Sent, ClientError> {
        let id = self.new_client_msg_id();
        self.send_message(conv, &id, ContentType::Text, Value::String(text.into()))
            .await
    }

    /// Sends a text message that answers message `reply_to` of the same conversation.
    pub async fn send_reply(
        &self,
        conv: &str,
        text: &str,
        reply_to: u64,
    ) -> Result<Sent, ClientError> {
        let id = self.new_client_msg_id();
        self.send_full(
            conv,
            &id,
            ContentType::Text,
            Value::String(text.into()),
            Some(reply_to),
        )
        .await
    }

    /// Sends a message with an explicit `client_msg_id` (reuse it to retry).
    pub async fn send_message(
        &self,
        conv: &str,
        client_msg_id: &str,
        content_type: ContentType,
        content: Value,
    ) -> Result<Sent, ClientError> {
        self.send_full(conv, client_msg_id, content_type, content, None)
            .await
    }

    /// Sends a message, a reply when `reply_to` is given.
    pub async fn send_full(
        &self,
        conv: &str,
        client_msg_id: &str,
        content_type: ContentType,
        content: Value,
        reply_to: Option<u64>,
    ) -> Result<Sent, ClientError> {
        let ok: SendOk = self
            .request_as(ClientFrame::Send {
                id: None,
                conv: conv.into(),
                client_msg_id: client_msg_id.into(),
                content_type,
                content,
                reply_to,
            })
            .await?;
        Ok(Sent {
            conv: ok.conv,
            seq: ok.seq,
            msg_id: ok.msg_id,
            ts: ok.ts,
            client_msg_id: client_msg_id.into(),
        })
    }

    /// Sets (`on`) or clears this user's reaction `emoji` on message `seq` of `conv`.
    pub async fn react(
        &self,
        conv: &str,
        seq: u64,
        emoji: &str,
        on: bool,
    ) -> Result<(), ClientError> {
        self.request(ClientFrame::React {
            id: None,
            conv: conv.into(),
            seq,
            emoji: emoji.into(),
            on,
        })
        .await
        .map(|_| ())
    }

    /// Removes `user` from `room` (a room admin's or a server admin's right).
    pub async fn remove(&self, room: &str, user: &str) -> Result<(), ClientError> {
        self.request(ClientFrame::Remove {
            id: None,
            room: room.into(),
            user: user.into(),
        })
        .await
        .map(|_| ())
    }

    /// A page of history: the newest `limit`, or those before `before` / after `after`.
    pub async fn history(
        &self,
        conv: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        self.request_as(ClientFrame::History {
            id: None,
            conv: conv.into(),
            before_seq: before,
            after_seq: after,
            limit,
        })
        .await
    }

    /// Catches up: every message after each cursor, then the new cursors.
    pub async fn sync(
        &self,
        cursors: BTreeMap<String, u64>,
        limit: Option<u32>,
    ) -> Result<SyncResult, ClientError> {
        self.sync_since(cursors, limit, None).await
    }

    /// [`Client::sync`], also replaying recalls and edits made since `since` (the
    /// `server_time` of a previous sync or welcome) to messages up to the cursors.
    pub async fn sync_since(
        &self,
        cursors: BTreeMap<String, u64>,
        limit: Option<u32>,
        since: Option<i64>,
    ) -> Result<SyncResult, ClientError> {
        let _one_at_a_time = self.sync_lock.lock().await;
        self.shared.lock().sync = Some(SyncCollect {
            convs: cursors.keys().cloned().collect(),
            messages: Vec::new(),
            changes: Vec::new(),
        });
        let result = self
            .request_as::<SyncOk>(ClientFrame::Sync {
                id: None,
                cursors: cursors.clone(),
                limit,
                since,
            })
            .await;
        let collected = self.shared.lock().sync.take();
        let (collected, changes) = collected
            .map(|c| (c.messages, c.changes))
            .unwrap_or_default();
        let ok = result?;
        let mut out = SyncResult {
            changes,
            server_time: ok.server_time,
            caught_up: ok.caught_up,
            more: ok.more,
            denied: ok.denied,
            cursors: ok.cursors,
            conversations: ok
                .conversations
                .into_iter()
                .map(|c| (c.conv, c.last_seq))
                .collect(),
            ..Default::default()
        };
        // Live messages may interleave with the replay. Per conversation the result is
        // one contiguous run after the cursor: the replay (up to the cursor the server
        // answered), extended by live messages that directly follow it; each seq once.
        // A live message beyond a gap goes to `live` and its conversation is listed in
        // `more`: the next sync fetches the gap. A cursor never jumps a gap.
        let mut by_conv: BTreeMap<String, BTreeMap<u64, Message>> = BTreeMap::new();
        for m in collected {
            by_conv
                .entry(m.conv.clone())
                .or_default()
                .entry(m.seq)
                .or_insert(m);
        }
        let mut messages = Vec::new();
        for (conv, run) in by_conv {
            let asked = cursors.get(&conv).copied().unwrap_or(0);
            let answered = out.cursors.get(&conv).copied().unwrap_or(asked).max(asked);
            let mut end = answered;
            let mut beyond_gap = false;
            for (seq, m) in run {
                if seq <= asked {
                    continue;
                }
                if seq <= answered || seq == end + 1 {
                    end = end.max(seq);
                    messages.push(m);
                } else {
                    beyond_gap = true;
                    out.live.push(m);
                }
            }
            if let Some(c) = out.cursors.get_mut(&conv) {
                *c = end;
            }
            if beyond_gap && !out.more.contains(&conv) {
                out.more.push(conv);
                out.caught_up = false;
            }
        }
        out.messages = messages;
        Ok(out)
    }

    /// Asks who of `users` is online.
    pub async fn presence(&self, users: &[&str]) -> Result<BTreeMap<String, bool>, ClientError> {
        let ok: PresenceOk = self
            .request_as(ClientFrame::Presence {
                id: None,
                users: users.iter().map(|u| u.to_string()).collect(),
            })
            .await?;
        Ok(ok.online)
    }

    /// Application-level ping; waits for the `pong`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.answer(ClientFrame::Ping { id: None })
            .await
            .map(|_| ())
    }

    /// The next pushed event, waiting at most `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        if let Some(e) = self.buffered.pop_front() {
            return Ok(e);
        }
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Takes the pushed messages that have arrived so far out of the event queue
    /// (without waiting); other events stay queued, in order.
    pub fn take_pushed_messages(&mut self) -> Vec<Message> {
        while let Ok(e) = self.events.try_recv() {
            self.buffered.push_back(e);
        }
        let mut messages = Vec::new();
        self.buffered.retain(|e| match e {
            Event::Frame(ServerFrame::Message(m)) => {
                messages.push(m.clone());
                false
            }
            _ => true,
        });
        messages
    }

    /// Waits for the first pushed frame matching `pred`; other events stay queued for
    /// later calls. Fails with `Closed` if the connection ends first.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&ServerFrame) -> bool,
    ) -> Result<ServerFrame, ClientError> {
        if let Some(pos) = self
            .buffered
            .iter()
            .position(|e| matches!(e, Event::Frame(f) if pred(f)))
        {
            if let Some(Event::Frame(f)) = self.buffered.remove(pos) {
                return Ok(f);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(None) => return Err(ClientError::Closed),
                Ok(Some(Event::Frame(f))) if pred(&f) => return Ok(f),
                Ok(Some(e @ Event::Closed(_))) => {
                    self.buffered.push_back(e);
                    return Err(ClientError::Closed);
                }
                Ok(Some(e)) => self.buffered.push_back(e),
            }
        }
    }

    /// Waits until the connection ends; returns the server's close frame, if any.
    pub async fn wait_closed(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<CloseInfo>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = self
                .buffered
                .iter()
                .position(|e| matches!(e, Event::Closed(_)))
            {
                if let Some(Event::Closed(c)) = self.buffered.remove(pos) {
                    return Ok(c);
                }
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(None) => return Ok(None),
                Ok(Some(Event::Closed(c))) => return Ok(c),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Closes the connection (code 1000) and waits briefly for the server's answer.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let _ = self
            .out
            .send(WsMessage::Close(Some(tungstenite::protocol::CloseFrame {
                code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "bye".into(),
            })));
        let _ = self.wait_closed(Duration::from_secs(5)).await;
        Ok(())
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Owns the socket: writes what the client queues, reads and routes what arrives.
async fn io_task(
    mut ws: Ws,
    codec: Codec,
    mut out: mpsc::UnboundedReceiver<WsMessage>,
    events: mpsc::UnboundedSender<Event>,
    shared: Arc<parking_lot::Mutex<Shared>>,
) {
    let mut close: Option<CloseInfo> = None;
    let mut out_open = true;
    loop {
        tokio::select! {
            msg = out.recv(), if out_open => match msg {
                Some(m) => {
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
                None => {
                    out_open = false;
                    let _ = ws.close(None).await;
                }
            },
            incoming = ws.next() => {
                let Some(Ok(msg)) = incoming else { break };
                match msg {
                    WsMessage::Text(t) if codec == Codec::Json => {
                        for line in hubbub_protocol::split_frames(t.as_str()) {
                            match serde_json::from_str::<ServerFrame>(line) {
                                Ok(f) => route(f, &events, &shared),
                                Err(e) => tracing::warn!(error = %e, "undecodable frame from the server"),
                            }
                        }
                    }
                    WsMessage::Binary(b) if codec == Codec::Protobuf => {
                        match hubbub_protocol::pb::decode_server(&b) {
                            Ok(f) => route(f, &events, &shared),
                            Err(e) => tracing::warn!(error = %e, "undecodable frame from the server"),
                        }
                    }
                    WsMessage::Close(frame) => {
                        close = frame.map(|f| CloseInfo {
                            code: u16::from(f.code),
                            reason: f.reason.to_string(),
                        });
                    }
                    // Pongs to the server's pings are queued by tungstenite; send them.
                    // (A failed flush shows up as an error on the next read.)
                    WsMessage::Ping(_) => {
                        let _ = ws.flush().await;
                    }
                    _ => {}
                }
            }
        }
    }
    // Fail whatever still waits for an answer.
    shared.lock().pending.clear();
    let _ = events.send(Event::Closed(close));
}

fn route(
    frame: ServerFrame,
    events: &mpsc::UnboundedSender<Event>,
    shared: &parking_lot::Mutex<Shared>,
) {
    let answer = match &frame {
        ServerFrame::Ok { id: Some(id), .. }
        | ServerFrame::Error { id: Some(id), .. }
        | ServerFrame::Pong { id: Some(id) } => Some(match id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        _ => None,
    };
    let mut sh = shared.lock();
    if let Some(id) = answer {
        if let Some(tx) = sh.pending.remove(&id) {
            let reply = match frame {
                ServerFrame::Ok { body, .. } => Ok(body),
                ServerFrame::Error { code, message, .. } => Err(ProtoError::new(code, message)),
                _ => Ok(Reply::Fields(Map::new())),
            };
            let _ = tx.send(reply);
            return;
        }
    }
    if let Some(c) = sh.sync.as_mut() {
        match &frame {
            ServerFrame::Message(m) if c.convs.contains(&m.conv) => {
                c.messages.push(m.clone());
                return;
            }
            ServerFrame::Recalled { conv, .. }
            | ServerFrame::Edited { conv, .. }
            | ServerFrame::Reactions { conv, .. }
                if c.convs.contains(conv) =>
            {
                c.changes.push(frame);
                return;
            }
            _ => {}
        }
    }
    drop(sh);
    let _ = events.send(Event::Frame(frame));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_credential_and_device_encoded() {
        let o = ConnectOptions::guest("ws://127.0.0.1:9", "al ice").device("ph/one");
        assert_eq!(
            o.request_url(),
            "ws://127.0.0.1:9/ws?user=al%20ice&device=ph%2Fone"
        );
        let mut t = ConnectOptions::with_token("ws://h:1/", "a.b+c");
        assert_eq!(t.request_url(), "ws://h:1/ws");
        t.token_in_query = true;
        assert_eq!(t.request_url(), "ws://h:1/ws?token=a.b%2Bc");
        let custom = ConnectOptions::guest("ws://h:1/chat/ws", "bob");
        assert_eq!(custom.request_url(), "ws://h:1/chat/ws?user=bob");
    }
}
