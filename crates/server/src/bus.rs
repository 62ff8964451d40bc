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
            tracker.spawn(async move {
                while let Some(change) = rx.recv().await {
                    deliver(&hub, &*store, change).await;
                }
            });
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
