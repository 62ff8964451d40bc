//! [`Session`]: a [`Client`] that survives disconnects.
//!
//! It remembers the highest `seq` seen in every conversation. When the connection ends
//! it reconnects with exponential backoff (250 ms doubling to 10 s, with jitter), then
//! `sync`s from those cursors, so the caller sees every message once, in `seq` order per
//! conversation: nothing missed, nothing repeated.

use std::collections::BTreeMap;
use std::time::Duration;

use hubbub_protocol::{Message, ServerFrame};

use crate::{Client, ClientError, CloseInfo, ConnectOptions, Event};

/// Shortest and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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

/// A reconnecting, catching-up connection.
#[derive(Debug)]
pub struct Session {
    opts: ConnectOptions,
    client: Option<Client>,
    cursors: BTreeMap<String, u64>,
    pending: std::collections::VecDeque<SessionEvent>,
    backoff: Duration,
    /// When the next reconnect attempt is due (while disconnected).
    next_attempt: Option<tokio::time::Instant>,
    /// `server_time` of the current connection's welcome: recalls and edits from then
    /// on arrive live, earlier ones are replayed by the catch-up after a reconnect.
    connected_at: i64,
}

impl Session {
    /// Connects (once; a failure here is returned, not retried).
    pub async fn connect(opts: ConnectOptions) -> Result<Session, ClientError> {
        let client = Client::connect(opts.clone()).await?;
        Ok(Session {
            connected_at: client.welcome().server_time,
            opts,
            client: Some(client),
            cursors: BTreeMap::new(),
            pending: Default::default(),
            backoff: BACKOFF_MIN,
            next_attempt: None,
        })
    }

    /// The live client, if connected now.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// The highest `seq` seen per conversation.
    pub fn cursors(&self) -> &BTreeMap<String, u64> {
        &self.cursors
    }

    /// Records messages the caller fetched itself (e.g. with `history`), so that a later
    /// catch-up starts after them.
    pub fn saw(&mut self, messages: &[Message]) {
        for m in messages {
            let c = self.cursors.entry(m.conv.clone()).or_insert(0);
            *c = (*c).max(m.seq);
        }
    }

    /// Starts following `conv` from `seq` (e.g. 0 to be given its whole history on the
    /// next catch-up).
    pub fn follow(&mut self, conv: &str, seq: u64) {
        self.cursors.entry(conv.to_string()).or_insert(seq);
    }

    /// Whether `m` is new (and records it when it is).
    fn accept(&mut self, m: &Message) -> bool {
        let c = self.cursors.entry(m.conv.clone()).or_insert(0);
        if m.seq <= *c {
            return false;
        }
        *c = m.seq;
        true
    }

    /// The next event, waiting at most `timeout` (then `Err(Timeout)`). Reconnects by
    /// itself; only a refused credential (HTTP 401/403) ends the session with an error.
    pub async fn next(&mut self, timeout: Duration) -> Result<SessionEvent, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let Some(client) = self.client.as_mut() else {
                self.reconnect(deadline).await?;
                continue;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.next_event(left).await {
                Ok(Event::Frame(ServerFrame::Message(m))) => {
                    if self.accept(&m) {
                        return Ok(SessionEvent::Frame(ServerFrame::Message(m)));
                    }
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
            match Client::connect(self.opts.clone()).await {
                Ok(client) => match self.catch_up(&client).await {
                    Ok((changes, missed)) => {
                        self.saw(&missed);
                        self.connected_at = client.welcome().server_time;
                        self.client = Some(client);
                        self.backoff = BACKOFF_MIN;
                        self.pending.push_back(SessionEvent::Reconnected {
                            missed: missed.len(),
                        });
                        self.pending
                            .extend(changes.into_iter().map(SessionEvent::Frame));
                        self.pending.extend(
                            missed
                                .into_iter()
                                .map(|m| SessionEvent::Frame(ServerFrame::Message(m))),
                        );
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

    /// Syncs every followed conversation until caught up; returns the recalls and
    /// edits of messages the caller already had, and the missed messages. The cursors
    /// move only when the whole catch-up succeeded, so a failure halfway loses nothing:
    /// the next attempt starts from the same place.
    async fn catch_up(
        &self,
        client: &Client,
    ) -> Result<(Vec<ServerFrame>, Vec<Message>), ClientError> {
        let mut cursors = self.cursors.clone();
        let mut missed = Vec::new();
        let mut changes = Vec::new();
        let mut since = Some(self.connected_at);
        // Bounded: each round moves some cursor forward or ends.
        for _ in 0..1000 {
            if cursors.is_empty() {
                break;
            }
            let r = client.sync_since(cursors.clone(), None, since).await?;
            // Changes are replayed by the first round; later rounds only page messages.
            since = None;
            changes.extend(r.changes);
            for m in r.messages {
                let c = cursors.entry(m.conv.clone()).or_insert(0);
                if m.seq > *c {
                    *c = m.seq;
                    missed.push(m);
                }
            }
            if r.caught_up {
                break;
            }
        }
        Ok((changes, missed))
    }
}
