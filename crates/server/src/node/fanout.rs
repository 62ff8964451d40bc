//! Delivery to this node's sessions: the bus's [`Subscriber`].
//!
//! Each committed change becomes one frame ([`frame_of`]), wrapped once in an
//! [`OutFrame`] (encoded at most once per codec) and pushed to every session of every
//! member of its conversation, except the session it came from. Joins and leaves are
//! applied to the room's member list here, between the room's deliveries and in commit
//! order, so a message reaches exactly the users who were members when it was committed.
//!
//! In a cluster, changes come from every node, and the bus between nodes may lose one
//! (it is a doorbell, not a log). So the fan-out of a cluster node keeps, per
//! conversation, the last seq it delivered ([`CatchUp`]): a repeat is dropped, a jump is
//! first filled from the store, and [`Subscriber::catch_up`] delivers whatever the store
//! has beyond it. Every message reaches this node's sessions once and in seq order.
//!
//! Joins and leaves from other nodes arrive in no set order with the messages around
//! them, so a cluster node places each by its `at` (the room's last seq when it
//! committed, [`Move`]): a joiner gets the messages after it (those already delivered
//! are filled for them from the store) and none before it, a leaver the ones up to it
//! that arrive late. The room's member list is read again from the store after each
//! change, so two changes of one user that arrive swapped still end as the store says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hubbub_protocol::{Conv, MemberEvent, Message, ServerFrame};

use crate::bus::Subscriber;
use crate::hub::{Hub, OutFrame};
use crate::members::Members;
use crate::presence::Presence;
use crate::store::{Committed, HistoryQuery, Store, StoreError};

/// Most messages read from the store in one step of filling a gap.
const FILL_PAGE: u32 = 500;
/// How long before a message's commit the messages committed before it may still be on
/// their way from other nodes (ms).
const IN_FLIGHT_MS: i64 = 10_000;

/// Most sends noted in [`CatchUp::sending`] (each is there for about one commit).
const MAX_SENDING: usize = 65_536;

/// How long a join or leave is kept to place late messages around it: longer than any
/// message stays on its way.
const MOVE_KEPT: Duration = Duration::from_secs(60);

/// The seqs a cluster node delivered (see the module docs).
struct CatchUp {
    store: Arc<dyn Store>,
    /// Per conversation: the last seq delivered here, and when.
    delivered: DashMap<String, (u64, Instant)>,
    /// Per room: joins and leaves that messages committed before them may still pass.
    moves: DashMap<String, Vec<Move>>,
    /// When this fan-out began (Unix ms): nothing committed before was delivered by it.
    started_ms: i64,
    /// Sends of this node's sessions not yet delivered here, by [`sending_key`]: the
    /// session each came from. A gap filled from the store may hold such a message
    /// (another node's later message arrived before this node's own commit was handed
    /// on); the session it came from gets only its `ok`, never a copy.
    sending: DashMap<String, u64>,
}

/// The key of a send in [`CatchUp::sending`].
fn sending_key(from: &str, client_msg_id: &str) -> String {
    format!("{from}\n{client_msg_id}")
}

/// A join or leave of `user`, committed when the room's last seq was `at`.
#[derive(Clone)]
struct Move {
    user: String,
    joined: bool,
    at: u64,
    when: Instant,
}

impl CatchUp {
    /// The users whose recent join or leave changes who gets message `seq` of `conv`:
    /// (joiners who must not get it, leavers who must).
    fn around(&self, conv: &str, seq: u64) -> (Vec<String>, Vec<String>) {
        let (mut skip, mut add) = (Vec::new(), Vec::new());
        if let Some(moves) = self.moves.get(conv) {
            for m in moves.iter().filter(|m| m.at >= seq) {
                if m.joined {
                    skip.push(m.user.clone());
                } else {
                    add.push(m.user.clone());
                }
            }
        }
        (skip, add)
    }

    /// Forgets the moves of `conv` no message still to come can pass: those at or
    /// before `delivered`, and old ones.
    fn passed(&self, conv: &str, delivered: u64) {
        if let Some(mut moves) = self.moves.get_mut(conv) {
            moves.retain(|m| m.at > delivered && m.when.elapsed() < MOVE_KEPT);
            if moves.is_empty() {
                drop(moves);
                self.moves.remove_if(conv, |_, m| m.is_empty());
            }
        }
    }
}

/// Delivers frames of conversations to this node's sessions.
pub struct Fanout {
    hub: Arc<Hub>,
    members: Arc<Members>,
    presence: Arc<dyn Presence>,
    /// Rooms with more members than this get no `member` frames.
    large_room: usize,
    /// In a cluster: what was delivered, per conversation.
    catch_up: Option<CatchUp>,
}

impl Fanout {
    pub fn new(
        hub: Arc<Hub>,
        members: Arc<Members>,
        presence: Arc<dyn Presence>,
        large_room: usize,
    ) -> Fanout {
        Fanout {
            hub,
            members,
            presence,
            large_room,
            catch_up: None,
        }
    }

    /// A fan-out for a node of a cluster: it drops repeated messages and fills gaps from
    /// `store` (see the module docs).
    pub fn with_catch_up(mut self, store: Arc<dyn Store>) -> Fanout {
        self.catch_up = Some(CatchUp {
            store,
            delivered: DashMap::new(),
            moves: DashMap::new(),
            started_ms: crate::store::now_ms(),
            sending: DashMap::new(),
        });
        self
    }

    /// The conversations whose last delivered seq is tracked, with that seq; entries
    /// not used for `idle` are dropped first.
    pub fn delivered(&self, idle: Duration) -> Vec<(String, u64)> {
        let Some(c) = &self.catch_up else {
            return Vec::new();
        };
        c.delivered.retain(|_, (_, at)| at.elapsed() < idle);
        c.moves.retain(|_, moves| {
            moves.retain(|m| m.when.elapsed() < MOVE_KEPT);
            !moves.is_empty()
        });
        c.delivered
            .iter()
            .map(|e| (e.key().clone(), e.value().0))
            .collect()
    }

    /// In a cluster: `session` of `from` is sending `client_msg_id` (before it is
    /// stored). Until the message is delivered here, a copy read from the store skips
    /// that session. Returns whether it was noted (a cluster node's fan-out).
    pub fn sending(&self, from: &str, client_msg_id: &str, session: u64) -> bool {
        match &self.catch_up {
            Some(c) => {
                // Entries of sends whose answer nobody awaited (their connection went)
                // and that failed are never removed: a bound keeps them from piling up
                // (forgetting one risks only a copy to its sender).
                if c.sending.len() >= MAX_SENDING {
                    c.sending.clear();
                }
                c.sending.insert(sending_key(from, client_msg_id), session);
                true
            }
            None => false,
        }
    }

    /// The send noted by [`Fanout::sending`] stored nothing new (refused, failed, or a
    /// retry of a stored message): nothing of it is coming.
    pub fn not_sending(&self, from: &str, client_msg_id: &str) {
        if let Some(c) = &self.catch_up {
            c.sending.remove(&sending_key(from, client_msg_id));
        }
    }

    /// The session a message read from the store came from, if it is one of this node's
    /// and the message is still on its way here.
    fn sent_by(&self, m: &Message) -> Option<u64> {
        let c = self.catch_up.as_ref()?;
        if c.sending.is_empty() {
            return None;
        }
        c.sending
            .get(&sending_key(&m.from, &m.client_msg_id))
            .map(|e| *e)
    }

    /// Delivers a message once and in seq order (see the module docs).
    async fn message(&self, message: Message, origin: u64) {
        let conv = message.conv.clone();
        if let Some(c) = &self.catch_up {
            // Only this node's own commits carry a session (ids start at 1); other nodes'
            // changes arrive without one and were never noted.
            if origin != 0 && !c.sending.is_empty() {
                c.sending
                    .remove(&sending_key(&message.from, &message.client_msg_id));
            }
            let last = c.delivered.get(&conv).map(|e| e.0);
            match last {
                Some(last) if message.seq <= last => return,
                Some(last) if message.seq > last + 1 => {
                    self.fill(&conv, last, message.seq - 1, None).await;
                }
                Some(_) => {}
                // The first message of the conversation this node sees: messages
                // committed just before it by other nodes may still be on their way, and
                // would count as repeats once it is delivered. They are delivered first,
                // from the store.
                None if message.seq > 1 => self.fill_recent(&message).await,
                None => {}
            }
            c.delivered
                .insert(conv.clone(), (message.seq, Instant::now()));
        }
        let seq = message.seq;
        let frame = OutFrame::new(ServerFrame::Message(message));
        if let Err(e) = self.deliver_seq(&conv, seq, &frame, Some(origin)).await {
            tracing::warn!(%conv, error = %e, "fan-out failed; recipients will sync");
        }
    }

    /// Delivers message `seq` of `conv` like [`Fanout::deliver`]; in a cluster, to the
    /// members when it committed (see [`Move`]).
    async fn deliver_seq(
        &self,
        conv: &str,
        seq: u64,
        frame: &Arc<OutFrame>,
        except: Option<u64>,
    ) -> Result<usize, StoreError> {
        let Some(c) = &self.catch_up else {
            return self.deliver(conv, frame, except, &[]).await;
        };
        let (skip, add) = c.around(conv, seq);
        let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
        let mut n = self.deliver(conv, frame, except, &skip).await?;
        if !add.is_empty() {
            let room = self.members.room(conv).await?;
            for u in add.iter().filter(|u| !room.contains(u)) {
                n += self.hub.send_to_user(u, frame, except);
            }
        }
        c.passed(conv, seq);
        Ok(n)
    }

    /// Delivers the stored messages of `conv` after seq `after` up to `upto` (with
    /// `only`, to that user's sessions alone); returns the last seq delivered.
    async fn fill(&self, conv: &str, mut after: u64, upto: u64, only: Option<&str>) -> u64 {
        let Some(c) = &self.catch_up else {
            return after;
        };
        while after < upto {
            let limit = (upto - after).min(FILL_PAGE as u64) as u32;
            let page = match c
                .store
                .history(conv, HistoryQuery::After { after, limit })
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(%conv, error = %e, "cannot fill a gap; recipients will sync");
                    break;
                }
            };
            if page.messages.is_empty() {
                break;
            }
            for m in page.messages {
                if m.seq > upto {
                    break;
                }
                after = m.seq;
                let sender = self.sent_by(&m);
                let frame = OutFrame::new(ServerFrame::Message(m));
                match only {
                    Some(user) => {
                        self.hub.send_to_user(user, &frame, sender);
                    }
                    None => {
                        let _ = self.deliver_seq(conv, after, &frame, sender).await;
                    }
                }
            }
        }
        after
    }

    /// Delivers the messages of `first.conv` before `first` committed after this fan-out
    /// began and at most [`IN_FLIGHT_MS`] before `first`.
    async fn fill_recent(&self, first: &Message) {
        let Some(c) = &self.catch_up else {
            return;
        };
        let since = c.started_ms.max(first.ts - IN_FLIGHT_MS);
        let after = first.seq.saturating_sub(FILL_PAGE as u64 + 1);
        let limit = (first.seq - 1 - after) as u32;
        let page = match c
            .store
            .history(&first.conv, HistoryQuery::After { after, limit })
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(conv = %first.conv, error = %e, "cannot read recent messages; recipients will sync");
                return;
            }
        };
        for m in page.messages {
            if m.seq < first.seq && m.ts >= since {
                let seq = m.seq;
                let sender = self.sent_by(&m);
                let frame = OutFrame::new(ServerFrame::Message(m));
                let _ = self.deliver_seq(&first.conv, seq, &frame, sender).await;
            }
        }
    }

    /// Delivers what the store has of `conv` beyond the last seq delivered here.
    async fn catch_up_conv(&self, conv: String) {
        let Some(c) = &self.catch_up else {
            return;
        };
        let Some(last) = c.delivered.get(&conv).map(|e| e.0) else {
            return;
        };
        let stored = match c.store.last_seq(&conv).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%conv, error = %e, "catch-up: cannot read the last seq");
                return;
            }
        };
        if stored > last {
            let reached = self.fill(&conv, last, stored, None).await;
            c.delivered.insert(conv, (reached, Instant::now()));
        }
    }

    /// Pushes `frame` to every member session of `conv` here, except the session
    /// `except`; none of the sessions of the users in `skip` get it. Returns how many
    /// sessions got it.
    pub async fn deliver(
        &self,
        conv: &str,
        frame: &Arc<OutFrame>,
        except: Option<u64>,
        skip: &[&str],
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        match Conv::parse(conv) {
            Ok(Conv::Dm(a, b)) => {
                for u in [a, b] {
                    if !skip.contains(&u) {
                        n += self.hub.send_to_user(u, frame, except);
                    }
                }
            }
            Ok(Conv::Room(_)) => {
                let room = self.members.room(conv).await?;
                let targets = room.targets(&self.hub);
                let sessions = targets.iter().filter(|s| !skip.contains(&&*s.user));
                n += self.hub.push_to(sessions, frame, except);
            }
            Err(_) => {}
        }
        Ok(n)
    }

    async fn change(&self, change: Committed) {
        let conv = change.conv().to_string();
        let (frame, origin) = match change {
            Committed::Member {
                conv,
                user,
                joined,
                at,
                by,
            } => {
                self.member_changed(conv, user, joined, at, by).await;
                return;
            }
            Committed::Message { message, origin } => {
                self.message(message, origin).await;
                return;
            }
            other => match frame_of(other) {
                Some(f) => f,
                None => return,
            },
        };
        let frame = OutFrame::new(frame);
        if let Err(e) = self.deliver(&conv, &frame, Some(origin), &[]).await {
            tracing::warn!(%conv, error = %e, "fan-out failed; recipients will sync");
        }
    }

    /// Applies a join or leave to the room's member list and tells the other members
    /// (rooms up to `large_room` members). In a cluster, places it among the messages
    /// (see [`Move`]), and the member list takes what the store says now.
    async fn member_changed(
        &self,
        conv: String,
        user: String,
        joined: bool,
        at: u64,
        by: Option<String>,
    ) {
        let room = match &self.catch_up {
            None => self.members.apply(&conv, &user, joined),
            Some(c) => {
                // Changes of other nodes arrive in no set order: the member list is read
                // again from the store, which has this change and every one before it.
                self.members.invalidate(&conv);
                let room = match self.members.room(&conv).await {
                    Ok(room) => room,
                    Err(e) => {
                        tracing::warn!(%conv, error = %e, "member change not pushed; members will sync");
                        return;
                    }
                };
                let member = room.contains(&user);
                let delivered = c.delivered.get(&conv).map(|e| e.0);
                match delivered {
                    // Messages after the join were delivered before it was heard of.
                    Some(last) if joined && member && last > at => {
                        self.fill(&conv, at, last, Some(&user)).await;
                    }
                    // Messages the leaver gets have all been delivered.
                    Some(last) if !joined && last >= at => {}
                    _ => c.moves.entry(conv.clone()).or_default().push(Move {
                        user: user.clone(),
                        joined,
                        at,
                        when: Instant::now(),
                    }),
                }
                Some(room)
            }
        };
        let room = match room {
            Some(room) => room,
            // Not cached: loading it reads the store, which has the change.
            None => match self.members.room(&conv).await {
                Ok(room) => room,
                Err(e) => {
                    tracing::warn!(%conv, error = %e, "member change not pushed; members will sync");
                    return;
                }
            },
        };
        let quiet = if joined {
            room.len() > self.large_room
        } else {
            room.len() >= self.large_room
        };
        let removed = by.is_some();
        if quiet && !removed {
            return;
        }
        let frame = OutFrame::new(ServerFrame::Member {
            conv: conv.clone(),
            online: room.count(|u| self.presence.is_online(u)),
            user: user.clone(),
            event: match (joined, removed) {
                (true, _) => MemberEvent::Joined,
                (false, false) => MemberEvent::Left,
                (false, true) => MemberEvent::Removed,
            },
            by,
        });
        // A removed user is told too (in a large room, only they are).
        if removed {
            self.hub.send_to_user(&user, &frame, None);
        }
        if !quiet {
            let _ = self.deliver(&conv, &frame, None, &[&user]).await;
        }
    }
}

impl Subscriber for Fanout {
    fn handle(&self, change: Committed) -> BoxFuture<'_, ()> {
        self.change(change).boxed()
    }

    fn catch_up(&self, conv: String) -> BoxFuture<'_, ()> {
        self.catch_up_conv(conv).boxed()
    }

    fn wants_yield(&self) -> bool {
        self.hub.take_filling()
    }
}

/// The frame a committed change is pushed (or replayed) as, with the session it came
/// from; `None` for a membership change (pushed as `member`, never replayed).
pub(crate) fn frame_of(change: Committed) -> Option<(ServerFrame, u64)> {
    Some(match change {
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
        Committed::Reaction {
            conv,
            seq,
            user,
            emoji,
            on,
            origin,
        } => (
            ServerFrame::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
            },
            origin,
        ),
        Committed::Reactions {
            conv,
            seq,
            reactions,
        } => (
            ServerFrame::Reactions {
                conv,
                seq,
                reactions,
            },
            0,
        ),
        Committed::Member { .. } => return None,
    })
}

/// A fan-out of `hub` whose room member lists come from `store`, for tests.
#[cfg(test)]
pub(crate) fn for_tests(
    hub: &Arc<Hub>,
    store: Arc<dyn Store>,
    metrics: &crate::metrics::Metrics,
) -> Fanout {
    let members = Arc::new(Members::new(store, metrics.clone()));
    let presence = Arc::new(crate::presence::LocalPresence::new(hub.clone()));
    Fanout::new(hub.clone(), members, presence, 1000)
}

#[cfg(test)]
mod tests {
    use hubbub_protocol::ContentType;

    use super::*;
    use crate::hub::Session;
    use crate::metrics::Metrics;
    use crate::store::{NewMessage, SqliteStore};

    /// In a cluster, another node's message may arrive before this node's own commit just
    /// before it was handed on. The gap is filled from the store: the session that sent
    /// the filled message gets only its `ok` (it used to get a copy too), its user's other
    /// session and the other member get it, and every session gets each message once.
    #[tokio::test]
    async fn a_gap_filled_from_the_store_skips_the_session_that_sent_the_message() {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let phone = Session::new(7, "alice".into(), "phone".into(), 100, &metrics);
        let laptop = Session::new(8, "alice".into(), "laptop".into(), 100, &metrics);
        let bob = Session::new(9, "bob".into(), "desk".into(), 100, &metrics);
        for s in [&phone, &laptop, &bob] {
            hub.register(s);
        }
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap());
        let fanout = for_tests(&hub, store.clone(), &metrics).with_catch_up(store.clone());
        let text = |from: &str, cid: &str, origin| NewMessage {
            conv: "dm:alice:bob".into(),
            from: from.into(),
            client_msg_id: cid.into(),
            content_type: ContentType::Text,
            content: serde_json::json!(cid),
            dm_members: Some(("alice".into(), "bob".into())),
            origin,
            reply_to: None,
            mentions: Vec::new(),
        };
        let heard = |m: crate::store::Appended, origin| Committed::Message {
            message: m.message,
            origin,
        };
        // Another node's message: delivered to every session.
        let first = store.append(text("bob", "b1", 0)).await.unwrap();
        fanout.handle(heard(first, 0)).await;
        // Alice's phone sends on this node; before its commit is handed on here, the
        // next message of another node arrives.
        assert!(fanout.sending("alice", "a2", 7));
        let own = store.append(text("alice", "a2", 7)).await.unwrap();
        let next = store.append(text("bob", "b3", 0)).await.unwrap();
        fanout.handle(heard(next, 0)).await;
        fanout.handle(heard(own, 7)).await;
        let seqs = |s: &Session| {
            let mut seqs = Vec::new();
            s.take_while(|f| {
                if let ServerFrame::Message(m) = f.frame() {
                    seqs.push(m.seq);
                }
                true
            });
            seqs
        };
        assert_eq!(seqs(&phone), [1, 3], "the sending session");
        assert_eq!(seqs(&laptop), [1, 2, 3]);
        assert_eq!(seqs(&bob), [1, 2, 3]);
    }
}
