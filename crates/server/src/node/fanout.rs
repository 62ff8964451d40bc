//! Delivery to this node's sessions: the bus's [`Subscriber`].
//!
//! Each committed change becomes one frame ([`frame_of`]), wrapped once in an
//! [`OutFrame`] (encoded at most once per codec) and pushed to every session of every
//! member of its conversation, except the session it came from. Joins and leaves are
//! applied to the room's member list here, between the room's deliveries and in commit
//! order, so a message reaches exactly the users who were members when it was committed.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hubbub_protocol::{Conv, MemberEvent, ServerFrame};

use crate::bus::Subscriber;
use crate::hub::{Hub, OutFrame};
use crate::members::Members;
use crate::presence::Presence;
use crate::store::{Committed, StoreError};

/// Delivers frames of conversations to this node's sessions.
pub struct Fanout {
    hub: Arc<Hub>,
    members: Arc<Members>,
    presence: Arc<dyn Presence>,
    /// Rooms with more members than this get no `member` frames.
    large_room: usize,
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
        }
    }

    /// Pushes `frame` to every member session of `conv` here, except the session
    /// `except`; with `skip_user`, none of that user's sessions get it. Returns how many
    /// sessions got it.
    pub async fn deliver(
        &self,
        conv: &str,
        frame: &Arc<OutFrame>,
        except: Option<u64>,
        skip_user: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        match Conv::parse(conv) {
            Ok(Conv::Dm(a, b)) => {
                for u in [a, b] {
                    if Some(u) != skip_user {
                        n += self.hub.send_to_user(u, frame, except);
                    }
                }
            }
            Ok(Conv::Room(_)) => {
                let room = self.members.room(conv).await?;
                room.for_each(|u| {
                    if Some(u) != skip_user {
                        n += self.hub.send_to_user(u, frame, except);
                    }
                });
            }
            Err(_) => {}
        }
        Ok(n)
    }

    async fn change(&self, change: Committed) {
        let conv = change.conv().to_string();
        let (frame, origin) = match change {
            Committed::Member { conv, user, joined } => {
                self.member_changed(conv, user, joined).await;
                return;
            }
            other => match frame_of(other) {
                Some(f) => f,
                None => return,
            },
        };
        let frame = OutFrame::new(frame);
        if let Err(e) = self.deliver(&conv, &frame, Some(origin), None).await {
            tracing::warn!(%conv, error = %e, "fan-out failed; recipients will sync");
        }
    }

    /// Applies a join or leave to the room's member list and tells the other members
    /// (rooms up to `large_room` members).
    async fn member_changed(&self, conv: String, user: String, joined: bool) {
        let room = match self.members.apply(&conv, &user, joined) {
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
        if quiet {
            return;
        }
        let frame = OutFrame::new(ServerFrame::Member {
            conv: conv.clone(),
            online: room.count(|u| self.presence.is_online(u)),
            user: user.clone(),
            event: if joined {
                MemberEvent::Joined
            } else {
                MemberEvent::Left
            },
        });
        let _ = self.deliver(&conv, &frame, None, Some(&user)).await;
    }
}

impl Subscriber for Fanout {
    fn handle(&self, change: Committed) -> BoxFuture<'_, ()> {
        self.change(change).boxed()
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
        Committed::Member { .. } => return None,
    })
}
