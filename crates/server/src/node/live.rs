//! What is live and never stored: sessions coming and going (with presence), typing,
//! presence queries, call signals, and server-wide announcements.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use hubbub_protocol::reply::PresenceOk;
use hubbub_protocol::{is_valid_user_name, Conv, ErrorCode, ProtoError, ServerFrame, SignalKind};
use serde_json::Value;

use super::{Actor, Node};
use crate::bus::Live;
use crate::hub::{OutFrame, SessionHandle};

/// Most user names in one `presence` query.
const MAX_PRESENCE_QUERY: usize = 256;
/// Most users named in a presence announcement to the other nodes (more: each node
/// finds them itself).
const MAX_ANNOUNCE_LIST: usize = 2000;
/// Longest `call_id`, in bytes.
const MAX_CALL_ID: usize = 128;

/// A `signal` request.
#[derive(Debug, Clone)]
pub struct SignalRequest {
    pub to: String,
    pub call_id: String,
    pub kind: SignalKind,
    pub data: Value,
}

impl Node {
    /// Adds a session to this node. Another live session of the same user and device is
    /// replaced: it gets `kicked` and is closed with 4001. Returns whether the user just
    /// came online (then call [`Node::announce_presence`]).
    pub fn session_opened(&self, session: &SessionHandle) -> bool {
        let first_here = self.hub.register(session).first;
        // The same device's sessions on other nodes are replaced as well.
        self.bus.relay(Live::Kick {
            user: session.user.to_string(),
            device: session.device.to_string(),
        });
        self.presence.opened(&session.user, first_here)
    }

    /// Removes a session. Returns whether the user just went offline (then call
    /// [`Node::announce_presence`]).
    pub fn session_closed(&self, session: &SessionHandle) -> bool {
        let last_here = self.hub.unregister(session);
        self.presence.closed(&session.user, last_here)
    }

    /// Applies a live event from another node to this node's sessions.
    pub async fn remote_live(&self, event: Live) {
        match event {
            Live::Typing { conv, user } => {
                let frame = OutFrame::new(ServerFrame::Typing {
                    conv: conv.clone(),
                    user: user.clone(),
                });
                let _ = self.fanout.deliver(&conv, &frame, None, &[&user]).await;
            }
            Live::Signal {
                to,
                from,
                call_id,
                kind,
                data,
            } => {
                let frame = OutFrame::new(ServerFrame::Signal {
                    from,
                    call_id,
                    kind,
                    data,
                });
                self.hub.send_to_user(&to, &frame, None);
            }
            Live::Notice { from, text } => {
                self.hub
                    .broadcast(&OutFrame::new(ServerFrame::Notice { text, from }));
            }
            Live::Kick { user, device } => {
                self.hub.kick_device(&user, &device);
            }
            Live::Announce {
                user,
                online,
                to: Some(to),
            } => self.tell_presence(&user, online, to.iter().map(String::as_str)),
            Live::Announce {
                user,
                online,
                to: None,
            } => self.announce_presence_here(&user, online).await,
            // Presence is the cluster's presence's to apply.
            Live::Presence { .. } => {}
        }
    }

    /// Tells users who share a conversation with `user` that it came online or went
    /// offline, on every node (members of large rooms are not told). For a change this
    /// node saw first: a user's first session opened or last closed here.
    pub async fn announce_presence(&self, user: &str, online: bool) {
        let notify = self.presence_audience(user).await;
        self.bus.relay(Live::Announce {
            user: user.to_string(),
            online,
            to: (notify.len() <= MAX_ANNOUNCE_LIST)
                .then(|| notify.iter().map(|u| u.to_string()).collect()),
        });
        self.tell_presence(user, online, notify.iter().map(|u| &**u));
    }

    /// [`Node::announce_presence`] to this node's sessions only: for a change every node
    /// sees by itself (the users of a node that died).
    pub async fn announce_presence_here(&self, user: &str, online: bool) {
        let notify = self.presence_audience(user).await;
        self.tell_presence(user, online, notify.iter().map(|u| &**u));
    }

    fn tell_presence<'a>(&self, user: &str, online: bool, to: impl Iterator<Item = &'a str>) {
        let frame = OutFrame::new(ServerFrame::Presence {
            user: user.to_string(),
            online,
        });
        for u in to {
            self.hub.send_to_user(u, &frame, None);
        }
    }

    /// The users who share a conversation with `user` (not through a large room).
    async fn presence_audience(&self, user: &str) -> HashSet<Arc<str>> {
        let mut notify: HashSet<Arc<str>> = HashSet::new();
        let convs = match self.store.memberships(user).await {
            Ok(c) => c,
            Err(e) => {
                // Best effort, and a storm of arriving users on a saturated database
                // would log a line each: counted instead.
                tracing::debug!(error = %e, "presence: cannot list conversations");
                self.hub.metrics().presence_skipped.inc();
                return notify;
            }
        };
        for c in convs {
            match Conv::parse(&c.conv) {
                Ok(dm @ Conv::Dm(..)) => {
                    if let Some(peer) = dm.dm_peer(user) {
                        notify.insert(Arc::from(peer));
                    }
                }
                Ok(Conv::Room(_)) => {
                    if let Ok(room) = self.members.room(&c.conv).await {
                        if room.len() <= self.limits.large_room {
                            notify.extend(room.members());
                        }
                    }
                }
                Err(_) => {}
            }
        }
        notify.remove(user);
        notify
    }

    /// Who of `users` is online.
    pub fn presence(&self, users: &[String]) -> Result<PresenceOk, ProtoError> {
        if users.len() > MAX_PRESENCE_QUERY {
            return Err(ProtoError::bad_request(format!(
                "at most {MAX_PRESENCE_QUERY} users per presence query"
            )));
        }
        let online: BTreeMap<String, bool> = users
            .iter()
            .map(|u| (u.clone(), self.presence.is_online(u)))
            .collect();
        Ok(PresenceOk { online })
    }

    /// Tells the others in `conv` that the user is typing (not in large rooms).
    pub async fn typing(&self, actor: Actor<'_>, conv: &str) -> Result<(), ProtoError> {
        self.authorize(actor.user, conv).await?;
        if let Ok(Conv::Room(_)) = Conv::parse(conv) {
            if self.room(conv).await?.len() > self.limits.large_room {
                return Ok(());
            }
        }
        let frame = OutFrame::new(ServerFrame::Typing {
            conv: conv.to_string(),
            user: actor.user.to_string(),
        });
        self.fanout
            .deliver(conv, &frame, None, &[actor.user])
            .await?;
        self.bus.relay(Live::Typing {
            conv: conv.to_string(),
            user: actor.user.to_string(),
        });
        Ok(())
    }

    /// Relays a call signal to every session of an online user who shares a room or a
    /// DM with the sender, within the pair's byte budget.
    pub async fn signal(&self, actor: Actor<'_>, req: SignalRequest) -> Result<(), ProtoError> {
        let SignalRequest {
            to,
            call_id,
            kind,
            data,
        } = req;
        if !is_valid_user_name(&to) {
            return Err(ProtoError::bad_request("to must be a valid user name"));
        }
        if to == actor.user {
            return Err(ProtoError::bad_request("cannot signal yourself"));
        }
        if call_id.is_empty() || call_id.len() > MAX_CALL_ID {
            return Err(ProtoError::bad_request(format!(
                "call_id must be 1 to {MAX_CALL_ID} bytes"
            )));
        }
        let max = self.limits.max_signal_bytes;
        let size = json_len(&data);
        if size > max {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!("signal data must be at most {max} bytes (it is {size})"),
            ));
        }
        let offline = || ProtoError::new(ErrorCode::NotFound, format!("{to} is not online"));
        if !self.presence.is_online(&to) {
            return Err(offline());
        }
        if !self.store.share_conversation(actor.user, &to).await? {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                format!("you share no room or dm with {to}"),
            ));
        }
        // Last, so that only signals that are delivered spend the budget.
        if !self.signal_budget.take(actor.user, &to, size) {
            return Err(ProtoError::new(
                ErrorCode::RateLimited,
                format!("too much signal data to {to}; slow down"),
            ));
        }
        let elsewhere = self.presence.elsewhere(&to);
        if elsewhere {
            self.bus.relay(Live::Signal {
                to: to.clone(),
                from: actor.user.to_string(),
                call_id: call_id.clone(),
                kind,
                data: data.clone(),
            });
        }
        let frame = OutFrame::new(ServerFrame::Signal {
            from: actor.user.to_string(),
            call_id,
            kind,
            data,
        });
        if self.hub.send_to_user(&to, &frame, None) == 0 && !elsewhere {
            return Err(offline());
        }
        Ok(())
    }

    /// Pushes a `notice` to every online session, on every node; returns how many got it
    /// on this node.
    pub fn broadcast(&self, from: &str, text: String) -> usize {
        self.bus.relay(Live::Notice {
            from: from.to_string(),
            text: text.clone(),
        });
        let frame = OutFrame::new(ServerFrame::Notice {
            text,
            from: from.to_string(),
        });
        self.hub.broadcast(&frame)
    }
}

/// The length of `v` encoded as compact JSON.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing into a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}
