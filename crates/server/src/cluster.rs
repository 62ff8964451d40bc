//! A node of a cluster: many hubbub processes on one PostgreSQL store and one Redis.
//!
//! PostgreSQL is the only truth; Redis is a doorbell. Every node is equal:
//!
//! - **Changes.** [`ClusterBus`] hands each committed change to this node's fan-out (a
//!   [`LocalBus`]) and publishes it on the Redis channel `hubbub:events`; every other
//!   node feeds what it hears into its own fan-out. The fan-out of a cluster node drops
//!   repeats and fills jumps from the store ([`crate::node::Fanout::with_catch_up`]), and
//!   every [`CATCH_UP_EVERY`] (and after every reconnect to Redis) it compares what it
//!   delivered with the store's last seqs. So a lost publish, or Redis gone for a while,
//!   only delays messages; none is lost or delivered twice.
//! - **Live events** (typing, call signals, announcements, the one-session-per-device
//!   kick, presence) travel the same channel ([`Live`]); they are not stored, and one
//!   lost while Redis is away is gone, as on one node when a client is offline.
//! - **Presence.** Each node keeps the set `hubbub:users:NODE` of users with a session
//!   on it, and refreshes `hubbub:node:NODE` (expiring after [`NODE_TTL`]) every
//!   [`HEARTBEAT`]. Nodes tell each other when a user's first session opens or last
//!   closes; a node whose key expired is dead, and its users go offline everywhere
//!   within [`NODE_TTL`] + [`HEARTBEAT`] (13 s). After a reconnect a node rebuilds its
//!   view from the sets of the live nodes and writes its own again (Redis may have
//!   restarted empty).
//! - Member lists cached by a node are dropped after every reconnect (joins and leaves
//!   of other nodes may have been missed) and read again from the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, Live, LocalBus};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::presence::Presence;
use crate::store::Committed;

/// The channel every node publishes on and listens to.
const CHANNEL: &str = "hubbub:events";
/// How often a node refreshes its liveness key and checks the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long a node's liveness key outlives its last refresh.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// How often delivered seqs are compared with the store's.
pub const CATCH_UP_EVERY: Duration = Duration::from_secs(5);
/// Conversations with no delivery for this long are no longer compared.
const TRACK_IDLE: Duration = Duration::from_secs(600);
/// Events waiting for Redis at most; more are dropped (the catch-up delivers messages).
const OUTGOING_MAX: usize = 100_000;
/// Largest payload of one publish, in bytes (events are grouped up to it).
const PUBLISH_BYTES: usize = 256 * 1024;
/// Longest wait for Redis to connect or answer.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// What one publish carries: events of one node, in order.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: String,
    events: Vec<Event>,
}

/// [`Envelope`] as it is written: its events already encoded.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    node: &'a str,
    events: &'a [Box<RawValue>],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    Change(Committed),
    Live(Live),
}

/// What the publishing task sends to Redis.
#[allow(clippy::large_enum_variant)] // messages travel by value: boxing would allocate once more per message
enum Outgoing {
    Event(Event),
    /// The user has a session on this node now.
    Here(String),
    /// The user has no session left on this node.
    Gone(String),
}

/// This node's link to the cluster: its id and the queue to Redis.
pub struct Cluster {
    id: String,
    client: redis::Client,
    tx: mpsc::Sender<Outgoing>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Outgoing>>>,
    presence: Arc<ClusterPresence>,
    metrics: Metrics,
}

/// A client of the Redis at `url` whose connections send each command at once
/// (`TCP_NODELAY`; the client's default waits, with Nagle's algorithm, for the
/// acknowledgement of the previous command while one is in flight).
pub(crate) fn redis_client(url: &str) -> anyhow::Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?)
}

impl Cluster {
    /// A node of the cluster whose Redis is at `url`, with this node's `hub`. Nothing
    /// connects before [`Cluster::start`].
    pub fn new(url: &str, hub: Arc<Hub>, metrics: Metrics) -> anyhow::Result<Arc<Cluster>> {
        let client = redis_client(url)?;
        let id = ulid::Ulid::new().to_string();
        let (tx, rx) = mpsc::channel(OUTGOING_MAX);
        let presence = Arc::new(ClusterPresence {
            hub,
            tx: tx.clone(),
            remote: DashMap::new(),
        });
        Ok(Arc::new(Cluster {
            id,
            client,
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            presence,
            metrics,
        }))
    }

    /// This node's id (random at each start).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bus of this node: `local` plus the other nodes.
    pub fn bus(self: &Arc<Self>, local: LocalBus) -> ClusterBus {
        ClusterBus {
            local,
            cluster: self.clone(),
        }
    }

    /// Who is online in the whole cluster.
    pub fn presence(&self) -> Arc<ClusterPresence> {
        self.presence.clone()
    }

    fn send(&self, out: Outgoing) {
        if self.tx.try_send(out).is_err() {
            self.metrics.cluster_dropped.inc();
        }
    }

    /// Starts the tasks that publish, listen, keep presence and catch up, until `stop`.
    pub fn start(
        self: &Arc<Self>,
        node: Arc<Node>,
        local: LocalBus,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) {
        let Some(rx) = self.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        tracing::info!(node = %self.id, "cluster node starting");
        let (resync_tx, resync_rx) = mpsc::unbounded_channel();
        tracker.spawn(self.clone().publish(rx, stop.clone()));
        tracker.spawn(
            self.clone()
                .listen(node.clone(), local.clone(), resync_tx, stop.clone()),
        );
        tracker.spawn(self.clone().watch(node, local, resync_rx, stop));
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Sends what is queued to Redis, and refreshes this node's liveness key.
    async fn publish(self: Arc<Self>, mut rx: mpsc::Receiver<Outgoing>, stop: CancellationToken) {
        let mut backoff = Backoff::default();
        'connect: while !stop.is_cancelled() {
            let mut conn = match self.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot reach redis to publish");
                    backoff.wait(&stop).await;
                    continue;
                }
            };
            // Redis may have restarted empty: this node's users are written again.
            if let Err(e) = self.register(&mut conn).await {
                tracing::warn!(error = %e, "cluster: cannot register this node");
                backoff.wait(&stop).await;
                continue;
            }
            backoff.reset();
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            loop {
                let result = tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = redis::pipe()
                            .del(self.node_key(&self.id))
                            .del(self.users_key(&self.id))
                            .query_async::<()>(&mut conn)
                            .await;
                        break 'connect;
                    }
                    _ = heartbeat.tick() => {
                        redis::cmd("SET")
                            .arg(self.node_key(&self.id))
                            .arg(1)
                            .arg("PX")
                            .arg(NODE_TTL.as_millis() as u64)
                            .query_async::<()>(&mut conn)
                            .await
                    }
                    first = rx.recv() => {
                        let Some(first) = first else { break 'connect };
                        let mut batch = vec![first];
                        while batch.len() < 1024 {
                            match rx.try_recv() {
                                Ok(o) => batch.push(o),
                                Err(_) => break,
                            }
                        }
                        self.send_batch(&mut conn, batch).await
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "cluster: redis failed; reconnecting");
                    continue 'connect;
                }
            }
        }
    }

    /// Writes this node's liveness key and its set of users.
    async fn register(&self, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let users: Vec<String> = self
            .presence
            .hub
            .online_users()
            .iter()
            .map(|u| u.to_string())
            .collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.node_key(&self.id))
            .arg(1)
            .arg("PX")
            .arg(NODE_TTL.as_millis() as u64)
            .ignore()
            .del(self.users_key(&self.id))
            .ignore();
        for chunk in users.chunks(1000) {
            pipe.sadd(self.users_key(&self.id), chunk).ignore();
        }
        pipe.query_async(conn).await
    }

    async fn send_batch(
        &self,
        conn: &mut MultiplexedConnection,
        batch: Vec<Outgoing>,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        // Each event is encoded once; an envelope joins them as they are.
        let mut events: Vec<Box<RawValue>> = Vec::new();
        let mut size = 0;
        let flush = |pipe: &mut redis::Pipeline, events: &mut Vec<Box<RawValue>>| {
            if events.is_empty() {
                return;
            }
            let envelope = EnvelopeOut {
                node: &self.id,
                events: events.as_slice(),
            };
            match serde_json::to_vec(&envelope) {
                Ok(payload) => {
                    pipe.publish(CHANNEL, payload).ignore();
                }
                Err(e) => tracing::error!(error = %e, "cluster: cannot encode events"),
            }
            events.clear();
        };
        for out in batch {
            match out {
                Outgoing::Event(e) => match serde_json::value::to_raw_value(&e) {
                    Ok(raw) => {
                        size += raw.get().len();
                        events.push(raw);
                        if size >= PUBLISH_BYTES {
                            flush(&mut pipe, &mut events);
                            size = 0;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cluster: cannot encode an event"),
                },
                // Set changes go in order with the events around them.
                Outgoing::Here(user) => {
                    flush(&mut pipe, &mut events);
                    size = 0;
                    pipe.sadd(self.users_key(&self.id), user).ignore();
                }
                Outgoing::Gone(user) => {
                    flush(&mut pipe, &mut events);
                    size = 0;
                    pipe.srem(self.users_key(&self.id), user).ignore();
                }
            }
        }
        flush(&mut pipe, &mut events);
        pipe.query_async(conn).await
    }

    /// Hears the other nodes' events and hands them on; after each (re)subscription,
    /// asks the watcher for a full resync.
    async fn listen(
        self: Arc<Self>,
        node: Arc<Node>,
        local: LocalBus,
        resync: mpsc::UnboundedSender<()>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::default();
        while !stop.is_cancelled() {
            let subscribed = async {
                let mut pubsub =
                    tokio::time::timeout(REDIS_TIMEOUT, self.client.get_async_pubsub())
                        .await
                        .map_err(|_| timeout_error())??;
                tokio::time::timeout(REDIS_TIMEOUT, pubsub.subscribe(CHANNEL))
                    .await
                    .map_err(|_| timeout_error())??;
                Ok::<_, redis::RedisError>(pubsub)
            }
            .await;
            let pubsub = match subscribed {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot subscribe to redis");
                    backoff.wait(&stop).await;
                    continue;
                }
            };
            backoff.reset();
            self.metrics.cluster_subscriptions.inc();
            tracing::info!(node = %self.id, "cluster: listening");
            let _ = resync.send(());
            let (sink, mut stream) = pubsub.split();
            let mut ping = tokio::time::interval(HEARTBEAT);
            ping.tick().await;
            // A connection that died silently shows as a ping without answer. The ping
            // runs beside the stream: its answer queues behind the messages before it.
            let mut pinging: Option<BoxFuture<'static, bool>> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ping.tick(), if pinging.is_none() => {
                        let mut sink = sink.clone();
                        pinging = Some(Box::pin(async move {
                            // Subscribed, Redis answers PING with ["pong", ""].
                            let answer =
                                tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>())
                                    .await;
                            matches!(answer, Ok(Ok(_)))
                        }));
                    }
                    alive = async { pinging.as_mut().expect("guarded").await }, if pinging.is_some() => {
                        pinging = None;
                        if !alive {
                            tracing::warn!("cluster: redis stopped answering; subscribing again");
                            break;
                        }
                    }
                    msg = stream.next() => {
                        let Some(msg) = msg else {
                            tracing::warn!("cluster: redis subscription ended; subscribing again");
                            break;
                        };
                        match serde_json::from_slice::<Envelope>(msg.get_payload_bytes()) {
                            Ok(envelope) if envelope.node != self.id => {
                                self.heard(&node, &local, envelope).await;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cluster: an event cannot be read"),
                        }
                    }
                }
            }
            backoff.wait(&stop).await;
        }
    }

    /// Applies another node's events.
    async fn heard(&self, node: &Arc<Node>, local: &LocalBus, envelope: Envelope) {
        for event in envelope.events {
            match event {
                Event::Change(change) => local.publish(without_origin(change)),
                // The node where it happened announces it (`Live::Announce`).
                Event::Live(Live::Presence { user, online }) => {
                    self.presence.remote(&envelope.node, &user, online);
                }
                Event::Live(live) => node.remote_live(live).await,
            }
        }
    }

    /// Every [`HEARTBEAT`]: drops the users of nodes that died. Every
    /// [`CATCH_UP_EVERY`], and when the listener (re)subscribed: catches up from the
    /// store; after a (re)subscription also rebuilds presence and drops cached member
    /// lists.
    async fn watch(
        self: Arc<Self>,
        node: Arc<Node>,
        local: LocalBus,
        mut resync: mpsc::UnboundedReceiver<()>,
        stop: CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut catch_up = tokio::time::interval(CATCH_UP_EVERY);
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            let full = tokio::select! {
                _ = stop.cancelled() => return,
                _ = heartbeat.tick() => None,
                _ = catch_up.tick() => Some(false),
                r = resync.recv() => {
                    if r.is_none() {
                        return;
                    }
                    Some(true)
                }
            };
            if conn.is_none() {
                conn = self.connect().await.ok();
            }
            if let Some(c) = conn.as_mut() {
                match self.live_nodes(c, full == Some(true)).await {
                    Ok(changes) => {
                        // Every node sees these by itself and tells its own sessions.
                        for (user, online) in changes {
                            node.announce_presence_here(&user, online).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cluster: cannot read the live nodes");
                        conn = None;
                    }
                }
            }
            if full == Some(true) {
                node.forget_members();
            }
            if full.is_some() {
                self.catch_up(&node, &local).await;
            }
        }
    }

    /// Reads which nodes are alive (and, with `full`, their users) and applies it to
    /// presence; returns the users whose cluster-wide state changed.
    async fn live_nodes(
        &self,
        conn: &mut MultiplexedConnection,
        full: bool,
    ) -> redis::RedisResult<Vec<(String, bool)>> {
        let keys: Vec<String> = {
            let mut iter: redis::AsyncIter<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg("hubbub:node:*")
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter_async(conn)
                .await?;
            let mut keys = Vec::new();
            while let Some(k) = iter.next_item().await {
                keys.push(k?);
            }
            keys
        };
        let alive: HashSet<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("hubbub:node:"))
            .filter(|id| *id != self.id)
            .map(str::to_string)
            .collect();
        if !full {
            return Ok(self.presence.keep_nodes(&alive));
        }
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        for id in &alive {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.users_key(id))
                .query_async(conn)
                .await?;
            users.insert(id.clone(), members);
        }
        Ok(self.presence.replace(users))
    }

    /// Compares the seqs delivered here with the store's and queues a catch-up for each
    /// conversation that is behind.
    async fn catch_up(&self, node: &Arc<Node>, local: &LocalBus) {
        let delivered = node.fanout().delivered(TRACK_IDLE);
        for chunk in delivered.chunks(1000) {
            let convs: Vec<String> = chunk.iter().map(|(c, _)| c.clone()).collect();
            match node.store().last_seqs(convs).await {
                Ok(stored) => {
                    for ((conv, seen), stored) in chunk.iter().zip(stored) {
                        if stored > *seen {
                            self.metrics.cluster_catch_ups.inc();
                            local.catch_up(conv);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster: catch-up cannot read the store");
                    return;
                }
            }
        }
    }

    fn node_key(&self, id: &str) -> String {
        format!("hubbub:node:{id}")
    }

    fn users_key(&self, id: &str) -> String {
        format!("hubbub:users:{id}")
    }
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis did not answer in time",
    ))
}

/// A change heard from another node: its `origin` names a session there, not here.
fn without_origin(change: Committed) -> Committed {
    match change {
        Committed::Message { message, .. } => Committed::Message { message, origin: 0 },
        Committed::Recalled { conv, seq, by, .. } => Committed::Recalled {
            conv,
            seq,
            by,
            origin: 0,
        },
        Committed::Edited {
            conv,
            seq,
            content,
            edited_at,
            ..
        } => Committed::Edited {
            conv,
            seq,
            content,
            edited_at,
            origin: 0,
        },
        Committed::Receipt {
            conv, user, seq, ..
        } => Committed::Receipt {
            conv,
            user,
            seq,
            origin: 0,
        },
        Committed::Reaction {
            conv,
            seq,
            user,
            emoji,
            on,
            ..
        } => Committed::Reaction {
            conv,
            seq,
            user,
            emoji,
            on,
            origin: 0,
        },
        state @ (Committed::Member { .. } | Committed::Reactions { .. }) => state,
    }
}

/// Waits between attempts to reach Redis: 100 ms, doubling up to 2 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    async fn wait(&mut self, stop: &CancellationToken) {
        let ms = (100u64 << self.0.min(5)).min(2000);
        self.0 += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = stop.cancelled() => {}
        }
    }

    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// The bus of a cluster node: this node's fan-out, and Redis to the others.
pub struct ClusterBus {
    local: LocalBus,
    cluster: Arc<Cluster>,
}

impl Bus for ClusterBus {
    fn publish(&self, change: Committed) {
        self.cluster
            .send(Outgoing::Event(Event::Change(change.clone())));
        self.local.publish(change);
    }

    fn flush(&self, conv: &str) -> BoxFuture<'static, ()> {
        self.local.flush(conv)
    }

    fn relay(&self, event: Live) {
        self.cluster.send(Outgoing::Event(Event::Live(event)));
    }
}

/// Presence across the nodes of a cluster (see the module docs).
pub struct ClusterPresence {
    hub: Arc<Hub>,
    tx: mpsc::Sender<Outgoing>,
    /// Users with sessions on other nodes, and those nodes.
    remote: DashMap<String, HashSet<String>>,
}

impl ClusterPresence {
    fn queue(&self, out: Outgoing) {
        let _ = self.tx.try_send(out);
    }

    /// Another node says `user` has (`online`) or no longer has a session there.
    fn remote(&self, node: &str, user: &str, online: bool) {
        if online {
            self.remote
                .entry(user.to_string())
                .or_default()
                .insert(node.to_string());
        } else {
            self.remote.remove_if_mut(user, |_, nodes| {
                nodes.remove(node);
                nodes.is_empty()
            });
        }
    }

    /// Forgets the users of nodes not in `alive`; returns those now offline.
    fn keep_nodes(&self, alive: &HashSet<String>) -> Vec<(String, bool)> {
        let mut gone = Vec::new();
        self.remote.retain(|user, nodes| {
            nodes.retain(|n| alive.contains(n));
            if nodes.is_empty() {
                gone.push(user.clone());
            }
            !nodes.is_empty()
        });
        gone.into_iter()
            .filter(|u| !self.hub.is_online(u))
            .map(|u| (u, false))
            .collect()
    }

    /// Replaces what is known of the other nodes' users; returns the users whose state
    /// changed.
    fn replace(&self, users: HashMap<String, Vec<String>>) -> Vec<(String, bool)> {
        let mut fresh: HashMap<String, HashSet<String>> = HashMap::new();
        for (node, list) in users {
            for user in list {
                fresh.entry(user).or_default().insert(node.clone());
            }
        }
        let mut changes = Vec::new();
        let old: Vec<String> = self.remote.iter().map(|e| e.key().clone()).collect();
        for user in old {
            if !fresh.contains_key(&user) {
                self.remote.remove(&user);
                if !self.hub.is_online(&user) {
                    changes.push((user, false));
                }
            }
        }
        for (user, nodes) in fresh {
            let was = self.is_online(&user);
            self.remote.insert(user.clone(), nodes);
            if !was {
                changes.push((user, true));
            }
        }
        changes
    }
}

impl Presence for ClusterPresence {
    fn opened(&self, user: &str, first_here: bool) -> bool {
        if !first_here {
            return false;
        }
        self.queue(Outgoing::Here(user.to_string()));
        self.queue(Outgoing::Event(Event::Live(Live::Presence {
            user: user.to_string(),
            online: true,
        })));
        !self.remote.contains_key(user)
    }

    fn closed(&self, user: &str, last_here: bool) -> bool {
        if !last_here {
            return false;
        }
        self.queue(Outgoing::Gone(user.to_string()));
        self.queue(Outgoing::Event(Event::Live(Live::Presence {
            user: user.to_string(),
            online: false,
        })));
        !self.remote.contains_key(user)
    }

    fn is_online(&self, user: &str) -> bool {
        self.hub.is_online(user) || self.remote.contains_key(user)
    }

    fn elsewhere(&self, user: &str) -> bool {
        self.remote.contains_key(user)
    }
}
