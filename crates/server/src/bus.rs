//! The bus: how committed changes reach the nodes that deliver them.
//!
//! The store announces each committed change, in commit order, to [`Bus::publish`]; the
//! bus hands it to a [`Subscriber`] (the node's fan-out, [`crate::node::Fanout`]) so that
//! every change of one conversation arrives in publish order. [`Bus::flush`] waits until
//! a conversation's changes published so far have been handled (a join is answered only
//! once its room's member list has it).
//!
//! [`LocalBus`] is the in-process implementation: it hashes the conversation to one of a
//! few shard tasks, so one conversation is delivered in `seq` order while different
//! conversations fan out in parallel. The cluster's bus ([`crate::cluster::ClusterBus`])
//! implements the same trait on top of a `LocalBus`: it also forwards every change and
//! every [`Live`] event to the other nodes. Anything that must be exact lives in the
//! store, never only on the bus.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use hubbub_protocol::SignalKind;
use serde::{Deserialize, Serialize};

use crate::store::Committed;

/// What is live and never stored, for the sessions of other nodes (a one-node bus has
/// no other nodes and drops them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "live", rename_all = "snake_case")]
pub enum Live {
    /// `user` is typing in `conv`.
    Typing { conv: String, user: String },
    /// A call signal for `to`'s sessions.
    Signal {
        to: String,
        from: String,
        call_id: String,
        kind: SignalKind,
        data: serde_json::Value,
    },
    /// An announcement for every session.
    Notice { from: String, text: String },
    /// A session of `user` on `device` opened: the same device's sessions elsewhere are
    /// replaced (closed with 4001).
    Kick { user: String, device: String },
    /// `user` has a session on the sending node now (`online`), or none left there.
    Presence { user: String, online: bool },
    /// `user` came online or went offline for the whole cluster: tell the sessions of
    /// `to` (the users who share a conversation with it), or, with `None` (too many to
    /// list), whoever shares one.
    Announce {
        user: String,
        online: bool,
        to: Option<Vec<String>>,
    },
}

/// Carries committed changes to whoever delivers them, per conversation in order.
pub trait Bus: Send + Sync + 'static {
    /// Hands a committed change to the bus. Never blocks; called on the store's writer
    /// in commit order.
    fn publish(&self, change: Committed);

    /// Resolves once every change of `conv` published before this call has been handled
    /// by the subscriber (at once if the bus has stopped).
    fn flush(&self, conv: &str) -> BoxFuture<'static, ()>;

    /// Sends a live event to the other nodes (none on a one-node bus). Never blocks.
    fn relay(&self, _event: Live) {}
}

/// What the bus delivers to: called for each change, one conversation's changes one at a
/// time and in publish order.
pub trait Subscriber: Send + Sync + 'static {
    /// Handles one change.
    fn handle(&self, change: Committed) -> BoxFuture<'_, ()>;

    /// Delivers what was committed in `conv` since the subscriber last delivered it (a
    /// change from another node may have been lost on the way). Called between the
    /// conversation's changes.
    fn catch_up(&self, _conv: String) -> BoxFuture<'_, ()> {
        futures_util::future::ready(()).boxed()
    }

    /// Whether the subscriber asks the bus to let other tasks run before the next change
    /// (recipients' queues are filling; their writers must get the thread).
    fn wants_yield(&self) -> bool {
        false
    }
}

/// In-process, conversation-sharded bus.
#[derive(Debug, Clone)]
pub struct LocalBus {
    shards: Arc<Vec<mpsc::UnboundedSender<Item>>>,
}

/// What a shard's queue carries.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // messages travel by value: boxing would allocate once more per message
enum Item {
    Change(Committed),
    /// Deliver what the store has beyond what was delivered.
    CatchUp(String),
    /// Answered once everything queued before it is handled.
    Flush(oneshot::Sender<()>),
}

/// The receiving ends of a [`LocalBus`], to be started once the subscriber exists.
#[derive(Debug)]
pub struct LocalBusWorkers {
    receivers: Vec<mpsc::UnboundedReceiver<Item>>,
}

impl LocalBus {
    /// A bus with `shards` delivery tasks (at least one).
    pub fn new(shards: usize) -> (LocalBus, LocalBusWorkers) {
        let (txs, rxs) = (0..shards.max(1))
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        (
            LocalBus {
                shards: Arc::new(txs),
            },
            LocalBusWorkers { receivers: rxs },
        )
    }

    /// Queues a catch-up of `conv` behind the changes queued for it so far (see
    /// [`Subscriber::catch_up`]).
    pub fn catch_up(&self, conv: &str) {
        let _ = self.shard(conv).send(Item::CatchUp(conv.to_string()));
    }

    fn shard(&self, conv: &str) -> &mpsc::UnboundedSender<Item> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conv.hash(&mut h);
        &self.shards[(h.finish() % self.shards.len() as u64) as usize]
    }
}

impl Bus for LocalBus {
    fn publish(&self, change: Committed) {
        if self
            .shard(change.conv())
            .send(Item::Change(change))
            .is_err()
        {
            tracing::debug!("fan-out stopped; change not pushed (clients will sync)");
        }
    }

    fn flush(&self, conv: &str) -> BoxFuture<'static, ()> {
        let (tx, rx) = oneshot::channel();
        let sent = self.shard(conv).send(Item::Flush(tx)).is_ok();
        async move {
            if sent {
                let _ = rx.await;
            }
        }
        .boxed()
    }
}

impl LocalBusWorkers {
    /// Starts one delivery task per shard. They stop when every [`LocalBus`] handle is
    /// gone.
    pub fn start(self, subscriber: Arc<dyn Subscriber>, tracker: &TaskTracker) {
        for mut rx in self.receivers {
            let subscriber = subscriber.clone();
            // Unconstrained: a shard drains everything committed before it yields, so that
            // under load, delivering what is stored comes before reading more sends (with
            // the cooperative budget it would run once per round of every session task).
            tracker.spawn(tokio::task::unconstrained(async move {
                while let Some(item) = rx.recv().await {
                    match item {
                        Item::Change(change) => {
                            subscriber.handle(change).await;
                            // Some recipient's queue is half full: let its writer run
                            // before pushing more (the budget is off, so only an explicit
                            // yield gives other tasks this thread).
                            if subscriber.wants_yield() {
                                tokio::task::yield_now().await;
                            }
                        }
                        Item::CatchUp(conv) => subscriber.catch_up(conv).await,
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hubbub_protocol::{ContentType, Message};

    use super::*;
    use crate::hub::{Hub, Session};
    use crate::metrics::Metrics;
    use crate::store::{SqliteStore, Store};

    /// Under load, what is committed is delivered before the other tasks run again: a
    /// shard that ran one cooperative budget (128 changes) per turn fell behind a busy
    /// server's sessions, so deliveries lagged seconds behind the senders' `ok`s.
    #[tokio::test]
    async fn a_shard_delivers_everything_committed_in_one_turn() {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let bob = Session::new(1, "bob".into(), "d".into(), 10_000, &metrics);
        hub.register(&bob);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap());
        let (bus, workers) = LocalBus::new(1);
        let tracker = TaskTracker::new();
        let fanout = crate::node::fanout_for_tests(&hub, store, &metrics);
        workers.start(Arc::new(fanout), &tracker);

        // Fifty busy tasks stand for the sessions of a loaded server.
        let turns = Arc::new(AtomicUsize::new(0));
        let busy: Vec<_> = (0..50)
            .map(|_| {
                let turns = turns.clone();
                tokio::spawn(async move {
                    for _ in 0..10_000 {
                        turns.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        const N: u64 = 1000;
        for seq in 1..=N {
            bus.publish(Committed::Message {
                message: Message {
                    conv: "dm:alice:bob".into(),
                    seq,
                    msg_id: format!("m{seq}"),
                    from: "alice".into(),
                    client_msg_id: format!("c{seq}"),
                    content_type: ContentType::Text,
                    content: Some(serde_json::json!("hi")),
                    ts: 0,
                    recalled: false,
                    edited_at: None,
                    reply_to: None,
                    reactions: Default::default(),
                    mentions: Vec::new(),
                },
                origin: 0,
            });
        }
        let before = turns.load(Ordering::Relaxed);
        let mut waited = 0;
        while bob.queued_frames() < N as usize {
            waited += 1;
            assert!(
                waited < 100_000,
                "only {} of {N} delivered",
                bob.queued_frames()
            );
            tokio::task::yield_now().await;
        }
        let others = turns.load(Ordering::Relaxed) - before;
        // One round of the busy tasks at most (eight rounds with a budget per turn).
        assert!(others <= 100, "the busy tasks ran {others} turns meanwhile");
        for b in busy {
            b.abort();
        }
    }
}
