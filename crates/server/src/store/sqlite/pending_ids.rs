//! The client ids stored with messages but not yet written to `client_ids`, kept by the
//! writer in memory per sender. A sender's ids go to `client_ids` together, once it has
//! [`CHUNK`] of them (or they are old, or nothing else is written): a commit then writes
//! the `client_ids` leaves of a few senders, not one for every sender in the batch.

use std::collections::HashMap;

/// A sender's pending ids are written once it has this many. With 100 busy senders, a
/// commit of 250 messages wrote 6.5 pages of `client_ids` instead of 50 (one leaf per
/// sender every fourth commit, with the search index's batch).
pub(super) const CHUNK: usize = 128;

/// No id waits longer than this many newer messages: a quiet sender's ids are written
/// then, so `ids_upto` (where a restart rebuilds the pending ids from) stays close to the
/// newest message, and the memory is bounded by it.
pub(super) const MAX_AGE: i64 = 16_384;

/// A sender's pending ids.
struct OfSender {
    ids: HashMap<String, i64>,
    /// The smallest message id among them.
    oldest: i64,
}

#[derive(Default)]
pub(super) struct PendingIds {
    by_sender: HashMap<String, OfSender>,
    /// Senders that reached [`CHUNK`] since the last [`PendingIds::take_full`].
    full: Vec<String>,
    len: usize,
}

impl PendingIds {
    /// The message `sender` stored under `client_msg_id`, if it is pending.
    pub(super) fn get(&self, sender: &str, client_msg_id: &str) -> Option<i64> {
        self.by_sender.get(sender)?.ids.get(client_msg_id).copied()
    }

    /// The highest pending client id of `sender`.
    pub(super) fn highest(&self, sender: &str) -> Option<&String> {
        self.by_sender.get(sender)?.ids.keys().max()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn insert(&mut self, sender: &str, client_msg_id: String, id: i64) {
        let of_sender = match self.by_sender.get_mut(sender) {
            Some(of_sender) => of_sender,
            None => self
                .by_sender
                .entry(sender.to_owned())
                .or_insert_with(|| OfSender {
                    ids: HashMap::new(),
                    oldest: id,
                }),
        };
        if of_sender.ids.insert(client_msg_id, id).is_none() {
            self.len += 1;
            of_sender.oldest = of_sender.oldest.min(id);
            if of_sender.ids.len() == CHUNK {
                self.full.push(sender.to_owned());
            }
        }
    }

    /// Takes the senders that have [`CHUNK`] ids or more, with their ids sorted.
    pub(super) fn take_full(&mut self) -> Vec<(String, Vec<(String, i64)>)> {
        let full = std::mem::take(&mut self.full);
        full.into_iter()
            .filter_map(|sender| self.take(sender))
            .collect()
    }

    /// Takes the senders whose oldest pending id is at or below `id`.
    pub(super) fn take_older(&mut self, id: i64) -> Vec<(String, Vec<(String, i64)>)> {
        let old: Vec<String> = self
            .by_sender
            .iter()
            .filter(|(_, of_sender)| of_sender.oldest <= id)
            .map(|(sender, _)| sender.clone())
            .collect();
        old.into_iter()
            .filter_map(|sender| self.take(sender))
            .collect()
    }

    /// Takes senders, oldest pending id first, until `at_least` ids are taken or none is
    /// left.
    pub(super) fn take_some(&mut self, at_least: usize) -> Vec<(String, Vec<(String, i64)>)> {
        let mut senders: Vec<(i64, String)> = self
            .by_sender
            .iter()
            .map(|(sender, of_sender)| (of_sender.oldest, sender.clone()))
            .collect();
        senders.sort_unstable();
        let mut taken = Vec::new();
        let mut count = 0;
        for (_, sender) in senders {
            if count >= at_least {
                break;
            }
            if let Some((sender, ids)) = self.take(sender) {
                count += ids.len();
                taken.push((sender, ids));
            }
        }
        taken
    }

    /// Every message id below the smallest pending one has its client id written.
    pub(super) fn oldest(&self) -> Option<i64> {
        self.by_sender
            .values()
            .map(|of_sender| of_sender.oldest)
            .min()
    }

    fn take(&mut self, sender: String) -> Option<(String, Vec<(String, i64)>)> {
        let of_sender = self.by_sender.remove(&sender)?;
        self.len -= of_sender.ids.len();
        let mut ids: Vec<(String, i64)> = of_sender.ids.into_iter().collect();
        ids.sort_unstable();
        Some((sender, ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_taken_when_full_old_or_asked_for() {
        let mut pending = PendingIds::default();
        for i in 0..CHUNK as i64 {
            pending.insert("busy", format!("b{i:04}"), 10 + 2 * i);
        }
        pending.insert("quiet", "q".into(), 11);
        pending.insert("late", "l".into(), 1000);
        // A repeated id is not counted twice.
        pending.insert("late", "l".into(), 1000);
        assert_eq!(pending.get("busy", "b0003"), Some(16));
        assert_eq!(pending.highest("busy").map(String::as_str), Some("b0127"));
        assert_eq!(pending.oldest(), Some(10));

        let full = pending.take_full();
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].0, "busy");
        assert_eq!(full[0].1.len(), CHUNK);
        assert!(full[0].1.windows(2).all(|w| w[0] < w[1]), "sorted");
        assert!(pending.take_full().is_empty());
        assert_eq!(pending.get("busy", "b0003"), None);
        assert_eq!(pending.oldest(), Some(11));

        let old = pending.take_older(500);
        assert_eq!(old, vec![("quiet".to_owned(), vec![("q".to_owned(), 11)])]);
        assert!(!pending.is_empty());
        assert_eq!(pending.take_some(1).len(), 1);
        assert!(pending.is_empty());
        assert_eq!(pending.oldest(), None);
    }
}
