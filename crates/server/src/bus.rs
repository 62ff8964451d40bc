//! The fan-out seam between the store and the hub.
//!
//! The store announces each committed change (in commit order) to [`Bus::publish`]. The
//! in-process bus hashes the conversation to one of a few shard tasks, so everything of
//! one conversation is delivered in `seq` order while different conversations fan out
//! in parallel. A multi-node deployment replaces this with a bus that also forwards to
//! other nodes; anything that must be exact lives in the store, never only on the bus.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use hubbub_protocol::ServerFrame;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::hub::{Hub, OutFrame};
use crate::store::{Committed, Store};

/// In-process, conversation-sharded fan-out.
#[derive(Debug, Clone)]
pub struct Bus {
    shards: Arc<Vec<mpsc::UnboundedSender<Committed>>>,
}

/// The receiving ends of a [`Bus`], to be started once the store exists.
#[derive(Debug)]
pub struct BusWorkers {
    receivers: Vec<mpsc::UnboundedReceiver<Committed>>,
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

    /// Hands a committed change to its conversation's shard. Never blocks.
    pub fn publish(&self, change: Committed) {
        let conv = change.conv();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        conv.hash(&mut h);
        let i = (h.finish() % self.shards.len() as u64) as usize;
        if self.shards[i].send(change).is_err() {
            tracing::debug!("fan-out stopped; change not pushed (clients will sync)");
        }
    }
}

impl BusWorkers {
    /// Starts one delivery task per shard. They stop when every [`Bus`] handle is gone.
    pub fn start(self, hub: Arc<Hub>, store: Arc<dyn Store>, tracker: &TaskTracker) {
        for mut rx in self.receivers {
            let hub = hub.clone();
            let store = store.clone();
            // Unconstrained: a shard drains everything committed before it yields, so that
            // under load, delivering what is stored comes before reading more sends (with
            // the cooperative budget it would run once per round of every session task).
            tracker.spawn(tokio::task::unconstrained(async move {
                while let Some(change) = rx.recv().await {
                    deliver(&hub, &*store, change).await;
                }
            }));
        }
    }
}

async fn deliver(hub: &Hub, store: &dyn Store, change: Committed) {
    let conv = change.conv().to_string();
    let (frame, origin) = match change {
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
        workers.start(hub.clone(), store, &tracker);

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
