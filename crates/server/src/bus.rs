//! The fan-out seam between the store and the hub.
//!
//! The store announces each committed change (in commit order) to [`Bus::publish`]. The
//! in-process bus hashes the conversation to one of a few shard tasks, so everything of
//! one conversation is delivered in `seq` order while different conversations fan out
//! in parallel. The shard of a room is also the one owner of the room's cached member
//! list: it applies joins and leaves between the room's deliveries, in commit order, so
//! a message reaches exactly the users who were members when it was committed.
//! [`Bus::flush`] waits until a conversation's shard has handled everything published
//! so far (a join is answered only once its member list has it). A multi-node deployment replaces this with a bus that also forwards to
//! other nodes; anything that must be exact lives in the store, never only on the bus.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use hubbub_protocol::{MemberEvent, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, OutFrame};
use crate::store::{Committed, Store};

/// In-process, conversation-sharded fan-out.
#[derive(Debug, Clone)]
pub struct Bus {
    shards: Arc<Vec<mpsc::UnboundedSender<Item>>>,
}

/// What a shard's queue carries.
#[derive(Debug)]
enum Item {
    Change(Committed),
    /// Answered once everything queued before it is handled.
    Flush(oneshot::Sender<()>),
}

/// The receiving ends of a [`Bus`], to be started once the store exists.
#[derive(Debug)]
pub struct BusWorkers {
    receivers: Vec<mpsc::UnboundedReceiver<Item>>,
}

impl Bus {
    /// A bus with `shards` delivery tasks (at least one).
    pub fn new(shards: usize) -> (Bus, BusWorkers) {
        let (txs, rxs) = (0..shards.max(1))
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        (
            Bus {
                shards: Arc::new(txs),
            },
            BusWorkers { receivers: rxs },
        )
    }

    fn shard(&self, conv: &str) -> &mpsc::UnboundedSender<Item> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conv.hash(&mut h);
        &self.shards[(h.finish() % self.shards.len() as u64) as usize]
    }

    /// Hands a committed change to its conversation's shard. Never blocks.
    pub fn publish(&self, change: Committed) {
        if self
            .shard(change.conv())
            .send(Item::Change(change))
            .is_err()
        {
            tracing::debug!("fan-out stopped; change not pushed (clients will sync)");
        }
    }

    /// Resolves once the shard of `conv` has handled everything published before this
    /// call (at once if the bus has stopped).
    pub async fn flush(&self, conv: &str) {
        let (tx, rx) = oneshot::channel();
        if self.shard(conv).send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl BusWorkers {
    /// Starts one delivery task per shard. They stop when every [`Bus`] handle is gone.
    /// Rooms with more than `large_room` members get no `member` frames.
    pub fn start(
        self,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        large_room: usize,
        tracker: &TaskTracker,
    ) {
        for mut rx in self.receivers {
            let hub = hub.clone();
            let store = store.clone();
            // Unconstrained: a shard drains everything committed before it yields, so that
            // under load, delivering what is stored comes before reading more sends (with
            // the cooperative budget it would run once per round of every session task).
            tracker.spawn(tokio::task::unconstrained(async move {
                while let Some(item) = rx.recv().await {
                    match item {
                        Item::Change(change) => {
                            deliver(&hub, &*store, large_room, change).await;
                            // Some recipient's queue is half full: let its writer run
                            // before pushing more (the budget is off, so only an explicit
                            // yield gives other tasks this thread).
                            if hub.take_filling() {
                                tokio::task::yield_now().await;
                            }
                        }
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }));
        }
    }
}

async fn deliver(hub: &Hub, store: &dyn Store, large_room: usize, change: Committed) {
    let conv = change.conv().to_string();
    let (frame, origin) = match change {
        Committed::Member { conv, user, joined } => {
            member_changed(hub, store, large_room, conv, user, joined).await;
            return;
        }
        Committed::Message { message, origin } => (ServerFrame::Message(message), origin),
        Committed::Recalled {
            conv,
            seq,
            by,
            origin,
        } => (ServerFrame::Recalled { conv, seq, by }, origin),
        Committed::Edited {
            conv,
            seq,
            content,
            edited_at,
            origin,
        } => (
            ServerFrame::Edited {
                conv,
                seq,
                content,
                edited_at,
            },
            origin,
        ),
        Committed::Receipt {
            conv,
            user,
            seq,
            origin,
        } => (ServerFrame::Receipt { conv, user, seq }, origin),
    };
    let frame = OutFrame::new(frame);
    if let Err(e) = hub.deliver(&conv, &frame, Some(origin), None, store).await {
        tracing::warn!(%conv, error = %e, "fan-out failed; recipients will sync");
    }
}

/// Applies a join or leave to the room's member list and tells the other members (rooms
/// up to `large_room` members).
async fn member_changed(
    hub: &Hub,
    store: &dyn Store,
    large_room: usize,
    conv: String,
    user: String,
    joined: bool,
) {
    let room = match hub.apply_member(&conv, &user, joined) {
        Some(room) => room,
        // Not cached: loading it reads the store, which has the change.
        None => match hub.room(&conv, store).await {
            Ok(room) => room,
            Err(e) => {
                tracing::warn!(%conv, error = %e, "member change not pushed; members will sync");
                return;
            }
        },
    };
    let quiet = if joined {
        room.len() > large_room
    } else {
        room.len() >= large_room
    };
    if quiet {
        return;
    }
    let frame = OutFrame::new(ServerFrame::Member {
        conv: conv.clone(),
        online: hub.online_in(&room),
        user: user.clone(),
        event: if joined {
            MemberEvent::Joined
        } else {
            MemberEvent::Left
        },
    });
    let _ = hub.deliver(&conv, &frame, None, Some(&user), store).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hubbub_protocol::{ContentType, Message};

    use super::*;
    use crate::hub::Session;
    use crate::metrics::Metrics;
    use crate::store::SqliteStore;

    /// Under load, what is committed is delivered before the other tasks run again: a
    /// shard that ran one cooperative budget (128 changes) per turn fell behind a busy
    /// server's sessions, so deliveries lagged seconds behind the senders' `ok`s.
    #[tokio::test]
    async fn a_shard_delivers_everything_committed_in_one_turn() {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let (tx, rx) = flume::bounded(10_000);
        let bob = Session::new(1, "bob".into(), "d".into(), tx, &metrics);
        hub.register(&bob);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap());
        let (bus, workers) = Bus::new(1);
        let tracker = TaskTracker::new();
        workers.start(hub.clone(), store, 1000, &tracker);

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
                },
                origin: 0,
            });
        }
        let before = turns.load(Ordering::Relaxed);
        let mut waited = 0;
        while rx.len() < N as usize {
            waited += 1;
            assert!(waited < 100_000, "only {} of {N} delivered", rx.len());
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
