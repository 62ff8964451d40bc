//! [`Session`]: a [`Client`] that survives disconnects.
//!
//! It keeps, per conversation, a cursor: every `seq` up to it was delivered (or handed
//! over by the caller with [`Session::saw`]). A cursor only moves over a contiguous run
//! of seqs. A message beyond a gap is held back (at most 5,000 per
//! conversation) while the gap is fetched from the store with `history`, then delivered
//! in order; a repeat is dropped. When the connection ends it reconnects with
//! exponential backoff (250 ms doubling to 10 s, with jitter), then `sync`s page by page
//! from those cursors until every conversation of the user is caught up, including ones
//! it learns of from the `sync` answer (those from `seq` 1). Messages pushed during the
//! catch-up wait beyond the gap like any other, so the pages only have to reach the
//! first of them, however fast they come. With `fallback_urls` (other nodes of a
//! cluster), each failed attempt moves on to the next node. So the caller sees every
//! message once, in `seq` order per conversation: nothing missed, nothing repeated.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use hubbub_protocol::{Message, ServerFrame};

use crate::{Client, ClientError, CloseInfo, ConnectOptions, Event};

/// Shortest and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Most messages held back per conversation beyond a gap. Further ones are dropped and
/// fetched again from the store once the gap is filled.
const MAX_AHEAD: usize = 5_000;
/// Size of the `history` pages that fill a gap.
const GAP_PAGE: u32 = 200;
/// Most `sync` rounds of one catch-up (each round moves a cursor or ends the catch-up).
const MAX_ROUNDS: usize = 100_000;

/// What a [`Session`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A pushed frame (messages are reported once, in order, also after reconnects).
    Frame(ServerFrame),
    /// The connection dropped; a reconnect follows.
    Disconnected(Option<CloseInfo>),
    /// Connected again and caught up; recalls and edits made meanwhile follow as
    /// frames, then the `missed` messages.
    Reconnected { missed: usize },
}

/// One conversation's place in the stream.
#[derive(Debug, Clone, Default)]
struct Track {
    /// Every seq up to here was delivered or handed over by the caller.
    cursor: u64,
    /// The highest seq known to exist.
    known: u64,
    /// Beyond a gap: messages waiting for it (`None`: one the caller already has).
    ahead: BTreeMap<u64, Option<Message>>,
}

/// Puts each conversation's messages in order: delivers a contiguous run, holds back
/// what comes after a gap, drops repeats.
#[derive(Debug, Clone, Default)]
struct Sequencer {
    tracks: BTreeMap<String, Track>,
}

impl Sequencer {
    fn cursors(&self) -> BTreeMap<String, u64> {
        self.tracks
            .iter()
            .map(|(c, t)| (c.clone(), t.cursor))
            .collect()
    }

    /// Conversations with a gap to fetch, with their cursors.
    fn behind(&self) -> BTreeMap<String, u64> {
        self.tracks
            .iter()
            .filter(|(_, t)| t.cursor < t.known)
            .map(|(c, t)| (c.clone(), t.cursor))
            .collect()
    }

    fn follow(&mut self, conv: &str, seq: u64) {
        self.tracks.entry(conv.to_string()).or_insert(Track {
            cursor: seq,
            known: seq,
            ahead: BTreeMap::new(),
        });
    }

    /// `last` exists in `conv` (a conversation met for the first time starts at 0).
    fn learn(&mut self, conv: &str, last: u64) {
        let t = self.tracks.entry(conv.to_string()).or_default();
        t.known = t.known.max(last);
    }

    /// Takes `m` in; what became deliverable goes to `out`, in order.
    fn offer(&mut self, m: Message, out: &mut Vec<Message>) {
        let conv = m.conv.clone();
        let seq = m.seq;
        self.put(&conv, seq, Some(m), out);
    }

    /// The caller has `m`: the cursor passes over it without delivering it.
    fn held(&mut self, m: &Message, out: &mut Vec<Message>) {
        self.put(&m.conv, m.seq, None, out);
    }

    fn put(&mut self, conv: &str, seq: u64, m: Option<Message>, out: &mut Vec<Message>) {
        let t = self.tracks.entry(conv.to_string()).or_default();
        t.known = t.known.max(seq);
        if seq <= t.cursor {
            return;
        }
        if seq == t.cursor + 1 {
            t.cursor = seq;
            out.extend(m);
            Self::drain(t, out);
            return;
        }
        // Beyond a gap: keep the lowest MAX_AHEAD (the gap fill reaches them first).
        match t.ahead.entry(seq) {
            Entry::Vacant(v) => {
                v.insert(m);
            }
            // What the caller has wins over a copy to deliver.
            Entry::Occupied(mut o) => {
                if m.is_none() {
                    o.insert(None);
                }
            }
        }
        if t.ahead.len() > MAX_AHEAD {
            t.ahead.pop_last();
        }
    }

    fn drain(t: &mut Track, out: &mut Vec<Message>) {
        while let Some(entry) = t.ahead.first_entry() {
            if *entry.key() > t.cursor + 1 {
                break;
            }
            let (seq, m) = entry.remove_entry();
            if seq == t.cursor + 1 {
                t.cursor = seq;
                out.extend(m);
            }
        }
    }

    /// The store has nothing after `conv`'s cursor: stop waiting for what is not there.
    fn settle(&mut self, conv: &str, out: &mut Vec<Message>) {
        let Some(t) = self.tracks.get_mut(conv) else {
            return;
        };
        match t.ahead.first_key_value() {
            Some((&first, _)) => {
                t.cursor = first - 1;
                Self::drain(t, out);
            }
            None => t.known = t.cursor,
        }
    }

    /// `conv` may not be read: forget its gap.
    fn deny(&mut self, conv: &str) {
        if let Some(t) = self.tracks.get_mut(conv) {
            t.ahead.clear();
            t.known = t.cursor;
        }
    }
}

/// What a successful catch-up brings.
struct CaughtUp {
    seq: Sequencer,
    changes: Vec<ServerFrame>,
    missed: Vec<Message>,
}

/// A reconnecting, catching-up connection.
#[derive(Debug)]
pub struct Session {
    opts: ConnectOptions,
    /// Which of `opts.url` and `opts.fallback_urls` (in that order) to connect to.
    node: usize,
    client: Option<Client>,
    seq: Sequencer,
    pending: VecDeque<SessionEvent>,
    backoff: Duration,
    /// When the next reconnect attempt is due (while disconnected).
    next_attempt: Option<tokio::time::Instant>,
    /// `server_time` of the welcome of the last connection that completed its catch-up:
    /// recalls and edits from then on arrived live, earlier ones are replayed by the
    /// next catch-up.
    connected_at: i64,
}

impl Session {
    /// Connects (once; a failure here is returned, not retried).
    pub async fn connect(opts: ConnectOptions) -> Result<Session, ClientError> {
        let client = Client::connect(opts.clone()).await?;
        Ok(Session {
            connected_at: client.welcome().server_time,
            opts,
            node: 0,
            client: Some(client),
            seq: Sequencer::default(),
            pending: Default::default(),
            backoff: BACKOFF_MIN,
            next_attempt: None,
        })
    }

    /// The URL of the node this session is (or will next try to be) connected to.
    pub fn url(&self) -> &str {
        let n = self.node % (1 + self.opts.fallback_urls.len());
        match n {
            0 => &self.opts.url,
            _ => &self.opts.fallback_urls[n - 1],
        }
    }

    /// The live client, if connected now.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// Per conversation, the `seq` up to which everything was delivered.
    pub fn cursors(&self) -> BTreeMap<String, u64> {
        self.seq.cursors()
    }

    /// Records messages the caller has by other means (its own sends, a `history` page
    /// it fetched): they are not delivered again, and a cursor passes over them. A gap
    /// before them is still fetched and delivered, so a page that does not start at the
    /// cursor should come after [`Session::follow`] with the seq before its first.
    pub fn saw(&mut self, messages: &[Message]) {
        let mut out = Vec::new();
        for m in messages {
            self.seq.held(m, &mut out);
        }
        self.deliver(out);
    }

    /// Starts following `conv` after `seq` (e.g. 0 to be given its whole history). No
    /// effect on a conversation already followed. A conversation never followed is
    /// delivered from `seq` 1 when the session meets it.
    pub fn follow(&mut self, conv: &str, seq: u64) {
        self.seq.follow(conv, seq);
    }

    fn deliver(&mut self, messages: Vec<Message>) {
        self.pending.extend(
            messages
                .into_iter()
                .map(|m| SessionEvent::Frame(ServerFrame::Message(m))),
        );
    }

    /// The next event, waiting at most `timeout` (then `Err(Timeout)`). Reconnects by
    /// itself; only a refused credential (HTTP 401/403) ends the session with an error.
    pub async fn next(&mut self, timeout: Duration) -> Result<SessionEvent, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Bounded by the deadline: every turn waits for the network or returns.
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let Some(client) = self.client.as_mut() else {
                self.reconnect(deadline).await?;
                continue;
            };
            if let Some((conv, cursor)) = self.seq.behind().into_iter().next() {
                // A gap: one page of it per turn.
                let mut out = Vec::new();
                match client
                    .history(&conv, None, Some(cursor), Some(GAP_PAGE))
                    .await
                {
                    Ok(page) => {
                        for m in page.messages {
                            self.seq.offer(m, &mut out);
                        }
                        // No progress: the store has nothing right after the cursor.
                        if self.seq.tracks.get(&conv).map(|t| t.cursor) == Some(cursor) {
                            self.seq.settle(&conv, &mut out);
                        }
                    }
                    Err(ClientError::Server(e)) => {
                        tracing::debug!(conv, error = %e, "cannot fill a gap; skipping it");
                        self.seq.deny(&conv);
                    }
                    Err(ClientError::Closed) => {
                        self.client = None;
                        return Ok(SessionEvent::Disconnected(None));
                    }
                    Err(e) => return Err(e),
                }
                self.deliver(out);
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next_event(left).await {
                Ok(Event::Frame(ServerFrame::Message(m))) => {
                    let mut out = Vec::new();
                    self.seq.offer(m, &mut out);
                    self.deliver(out);
                }
                Ok(Event::Frame(f)) => return Ok(SessionEvent::Frame(f)),
                Ok(Event::Closed(info)) => {
                    self.client = None;
                    return Ok(SessionEvent::Disconnected(info));
                }
                Err(ClientError::Closed) => {
                    self.client = None;
                    return Ok(SessionEvent::Disconnected(None));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the next attempt (or the caller's deadline, whichever is first) and
    /// tries to reconnect. The backoff schedule does not depend on how often the caller
    /// polls: short `next` timeouts just return `Timeout` until the attempt is due.
    async fn reconnect(&mut self, deadline: tokio::time::Instant) -> Result<(), ClientError> {
        loop {
            let due = *self.next_attempt.get_or_insert_with(|| {
                let jitter = Duration::from_millis(u64::from(std::process::id() % 97));
                tokio::time::Instant::now() + self.backoff + jitter
            });
            if due > deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(ClientError::Timeout);
            }
            tokio::time::sleep_until(due).await;
            self.next_attempt = None;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            let opts = ConnectOptions {
                url: self.url().to_string(),
                ..self.opts.clone()
            };
            // A failed attempt moves on to the next node (see `fallback_urls`).
            self.node += 1;
            match Client::connect(opts).await {
                Ok(mut client) => match self.catch_up(&mut client).await {
                    Ok(done) => {
                        self.node -= 1;
                        self.seq = done.seq;
                        self.connected_at = client.welcome().server_time;
                        self.client = Some(client);
                        self.backoff = BACKOFF_MIN;
                        self.pending.push_back(SessionEvent::Reconnected {
                            missed: done.missed.len(),
                        });
                        self.pending
                            .extend(done.changes.into_iter().map(SessionEvent::Frame));
                        self.deliver(done.missed);
                        return Ok(());
                    }
                    Err(e) => tracing::debug!(error = %e, "catch-up failed; retrying"),
                },
                Err(ClientError::Connect {
                    status: Some(s @ (401 | 403)),
                    body,
                }) => {
                    return Err(ClientError::Connect {
                        status: Some(s),
                        body,
                    })
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed; retrying"),
            }
        }
    }

    /// Syncs, page by page, every followed conversation and every conversation the
    /// server lists with messages beyond the cursor (one met for the first time from
    /// seq 1), until none is behind. Returns the new state, the recalls and edits of
    /// messages the caller already had, and the missed messages in order. Nothing is
    /// kept unless the whole catch-up succeeds, so a failure halfway loses nothing: the
    /// next attempt starts from the same place.
    async fn catch_up(&self, client: &mut Client) -> Result<CaughtUp, ClientError> {
        let mut seq = self.seq.clone();
        let mut missed = Vec::new();
        let mut changes = Vec::new();
        // The first round names every followed conversation (even none: its answer
        // lists the user's conversations) and replays changes since the last catch-up.
        let mut ask = seq.cursors();
        let mut since = Some(self.connected_at);
        for _ in 0..MAX_ROUNDS {
            let r = client.sync_since(ask.clone(), None, since).await?;
            since = None;
            changes.extend(r.changes);
            for (conv, last) in &r.conversations {
                seq.learn(conv, *last);
            }
            for conv in &r.more {
                if let Some(&c) = r.cursors.get(conv) {
                    seq.learn(conv, c + 1);
                }
            }
            for conv in &r.denied {
                seq.deny(conv);
            }
            for m in r.messages {
                seq.offer(m, &mut missed);
            }
            // Live messages (pushed during this round or between rounds) wait beyond
            // the gap, so the pages only need to reach the first of them: the catch-up
            // ends however fast messages keep coming.
            for m in r.live.into_iter().chain(client.take_pushed_messages()) {
                seq.offer(m, &mut missed);
            }
            for (conv, &asked) in &ask {
                // No progress: the store has nothing (more) right after the cursor.
                if seq.tracks.get(conv).map(|t| t.cursor) == Some(asked) {
                    seq.settle(conv, &mut missed);
                }
            }
            ask = seq.behind();
            if ask.is_empty() {
                return Ok(CaughtUp {
                    seq,
                    changes,
                    missed,
                });
            }
        }
        Err(ClientError::Protocol(
            "the catch-up did not finish in the allowed rounds".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubbub_protocol::ContentType;

    fn msg(conv: &str, seq: u64) -> Message {
        Message {
            conv: conv.into(),
            seq,
            msg_id: format!("m{seq}"),
            from: "alice".into(),
            client_msg_id: format!("c{seq}"),
            content_type: ContentType::Text,
            content: Some(serde_json::Value::String(format!("text {seq}"))),
            ts: 0,
            recalled: false,
            edited_at: None,
            reply_to: None,
            reactions: Default::default(),
            mentions: Vec::new(),
        }
    }

    fn seqs(out: &[Message]) -> Vec<u64> {
        out.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn messages_beyond_a_gap_wait_for_it_and_repeats_are_dropped() {
        let mut s = Sequencer::default();
        s.follow("room:a", 0);
        let mut out = Vec::new();
        s.offer(msg("room:a", 1), &mut out);
        // A jump: 4 and 5 wait, the cursor stays; the gap is reported.
        s.offer(msg("room:a", 4), &mut out);
        s.offer(msg("room:a", 5), &mut out);
        s.offer(msg("room:a", 4), &mut out);
        assert_eq!(seqs(&out), [1]);
        assert_eq!(s.behind(), BTreeMap::from([("room:a".to_string(), 1)]));
        // The gap filled (with repeats) delivers everything once, in order.
        for seq in [1, 2, 3, 4] {
            s.offer(msg("room:a", seq), &mut out);
        }
        assert_eq!(seqs(&out), [1, 2, 3, 4, 5]);
        assert!(s.behind().is_empty());
        assert_eq!(s.cursors()["room:a"], 5);
    }

    #[test]
    fn what_the_caller_has_is_passed_over_not_delivered() {
        let mut s = Sequencer::default();
        s.follow("dm:alice:bob", 2);
        let mut out = Vec::new();
        // The caller's own send got seq 4 before 3 arrived.
        s.held(&msg("dm:alice:bob", 4), &mut out);
        assert_eq!(s.cursors()["dm:alice:bob"], 2);
        s.offer(msg("dm:alice:bob", 3), &mut out);
        s.offer(msg("dm:alice:bob", 5), &mut out);
        assert_eq!(seqs(&out), [3, 5]);
        assert_eq!(s.cursors()["dm:alice:bob"], 5);
    }

    #[test]
    fn the_held_back_messages_are_bounded_and_the_dropped_ones_are_fetched_later() {
        let mut s = Sequencer::default();
        s.follow("room:a", 0);
        let mut out = Vec::new();
        let last = MAX_AHEAD as u64 + 100;
        for seq in (2..=last).rev() {
            s.offer(msg("room:a", seq), &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(s.tracks["room:a"].ahead.len(), MAX_AHEAD);
        s.offer(msg("room:a", 1), &mut out);
        // The lowest ones were kept: delivered up to the bound, the rest is still a gap.
        assert_eq!(seqs(&out), (1..=MAX_AHEAD as u64 + 1).collect::<Vec<_>>());
        assert_eq!(
            s.behind(),
            BTreeMap::from([("room:a".to_string(), MAX_AHEAD as u64 + 1)])
        );
    }

    #[test]
    fn a_conversation_met_for_the_first_time_starts_at_seq_1() {
        let mut s = Sequencer::default();
        let mut out = Vec::new();
        s.learn("dm:alice:bob", 3);
        assert_eq!(
            s.behind(),
            BTreeMap::from([("dm:alice:bob".to_string(), 0)])
        );
        s.offer(msg("room:new", 2), &mut out);
        assert!(out.is_empty());
        assert_eq!(s.behind()["room:new"], 0);
    }

    #[test]
    fn a_gap_the_store_does_not_have_is_not_waited_for() {
        let mut s = Sequencer::default();
        s.follow("room:a", 0);
        let mut out = Vec::new();
        s.offer(msg("room:a", 3), &mut out);
        s.settle("room:a", &mut out);
        assert_eq!(seqs(&out), [3]);
        assert!(s.behind().is_empty());
    }
}
