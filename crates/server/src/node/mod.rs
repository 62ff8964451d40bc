//! The node: what every chat operation means, whoever asks for it.
//!
//! The WebSocket gateway and the HTTP API both call the [`Node`]; they only decode the
//! request, call, encode the answer and write it. The rules live here, once: who may
//! read or write a conversation ([`Node::authorize`]), room limits, who may recall or
//! signal, how a sync is assembled, who hears of presence.
//!
//! One file per group of operations (as one file per command):
//! - `messages.rs`: send, recall, edit, read;
//! - `rooms.rs`: join, leave, the room list;
//! - `reading.rs`: history, sync, the conversation list;
//! - `live.rs`: typing, presence, call signals, sessions coming and going, broadcast;
//! - `fanout.rs`: delivering committed changes to this node's sessions (the bus's
//!   subscriber);
//! - `limits.rs`: room creation and signal budgets shared by every session.
//!
//! The node reaches the rest through seams: the [`Store`] (the truth), the [`Bus`]
//! (committed changes to whoever delivers them), [`Presence`] (who is online), the
//! [`Hub`] (this node's sessions), and [`Members`] (cached room member lists, kept in
//! commit order by the fan-out).

use std::sync::Arc;

use dashmap::DashSet;
use hubbub_protocol::{Conv, ErrorCode, ProtoError};

use crate::bus::Bus;
use crate::config::Config;
use crate::hub::Hub;
use crate::members::{Members, Room};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::store::Store;

mod fanout;
mod limits;
mod live;
mod messages;
mod reading;
mod rooms;

#[cfg(test)]
pub(crate) use fanout::for_tests as fanout_for_tests;
pub use fanout::Fanout;
pub use limits::{RoomCreation, SignalBudget};
pub use live::SignalRequest;
pub use messages::SendRequest;
pub use reading::{history_query, page_limit, SyncRequest};
pub use rooms::ROOMS_PAGE_MAX;

/// Who acts: a user, through one session (0 for the HTTP API).
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub user: &'a str,
    /// The session the request came from: it does not get its own change pushed back.
    pub session: u64,
}

/// The limits of chat operations, from the configuration.
#[derive(Debug, Clone)]
struct Limits {
    large_room: usize,
    max_rooms_per_user: usize,
    history_max: u32,
    sync_max: u32,
    max_text_bytes: usize,
    max_signal_bytes: usize,
}

/// What chat operations mean (see the module docs).
pub struct Node {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    presence: Arc<dyn Presence>,
    hub: Arc<Hub>,
    members: Arc<Members>,
    fanout: Arc<Fanout>,
    limits: Limits,
    /// DMs need an existing peer account unless guests are allowed.
    guests: bool,
    /// Accounts known to exist (accounts are never deleted).
    known_users: DashSet<String>,
    room_creation: RoomCreation,
    signal_budget: SignalBudget,
}

impl Node {
    /// A node on these seams, with the limits of `config`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn Presence>,
        hub: Arc<Hub>,
        metrics: &Metrics,
    ) -> Node {
        let members = Arc::new(Members::new(store.clone(), metrics.clone()));
        let mut fanout = Fanout::new(
            hub.clone(),
            members.clone(),
            presence.clone(),
            config.large_room,
        );
        if config.is_cluster() {
            fanout = fanout.with_catch_up(store.clone());
        }
        let fanout = Arc::new(fanout);
        Node {
            store,
            bus,
            presence,
            hub,
            members,
            fanout,
            limits: Limits {
                large_room: config.large_room,
                max_rooms_per_user: config.max_rooms_per_user,
                history_max: config.history_max,
                sync_max: config.sync_max,
                max_text_bytes: config.max_text_bytes,
                max_signal_bytes: config.max_signal_bytes,
            },
            guests: config.guest_enabled(),
            known_users: DashSet::new(),
            room_creation: RoomCreation::new(
                config.room_create_per_ip_per_min,
                config.room_create_per_min,
            ),
            signal_budget: SignalBudget::new(
                config.signal_bytes_per_sec,
                config.signal_burst_bytes,
            ),
        }
    }

    /// The bus's subscriber: delivers committed changes to this node's sessions.
    pub fn fanout(&self) -> Arc<Fanout> {
        self.fanout.clone()
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Forgets every cached member list (a cluster node that may have missed other
    /// nodes' membership changes reads them again from the store).
    pub fn forget_members(&self) {
        self.members.clear();
    }

    /// Drops cached member lists unused for `idle_ms` with no member online.
    pub fn evict_idle_rooms(&self, idle_ms: u64) -> usize {
        self.members
            .evict_idle(idle_ms, |u| self.presence.is_online(u))
    }

    /// Records that an account exists (a DM with it needs no lookup).
    pub fn account_created(&self, name: &str) {
        self.known_users.insert(name.to_string());
    }

    /// Checks that `user` may read and write `conv`. Rooms: a member (`not_member`
    /// otherwise). DMs: one of the two names (`forbidden` otherwise); when guests are not
    /// allowed, the other one must be an account (`not_found`). For a DM, returns its
    /// two participants.
    pub async fn authorize(
        &self,
        user: &str,
        conv: &str,
    ) -> Result<Option<(String, String)>, ProtoError> {
        match Conv::parse(conv)? {
            Conv::Room(_) => {
                if self.room(conv).await?.contains(user) {
                    Ok(None)
                } else {
                    Err(ProtoError::new(
                        ErrorCode::NotMember,
                        format!("you are not a member of {conv}"),
                    ))
                }
            }
            Conv::Dm(a, b) => {
                let peer = if a == user {
                    b
                } else if b == user {
                    a
                } else {
                    return Err(ProtoError::new(
                        ErrorCode::Forbidden,
                        format!("{conv} is a conversation between two other users"),
                    ));
                };
                if !self.guests && !self.account_exists(peer).await? {
                    return Err(ProtoError::new(
                        ErrorCode::NotFound,
                        format!("there is no user {peer:?}"),
                    ));
                }
                Ok(Some((a.to_string(), b.to_string())))
            }
        }
    }

    /// Whether an account exists (cached once seen: accounts are never deleted).
    async fn account_exists(&self, name: &str) -> Result<bool, ProtoError> {
        if self.known_users.contains(name) {
            return Ok(true);
        }
        let exists = self.store.password_hash(name).await?.is_some();
        if exists {
            self.account_created(name);
        }
        Ok(exists)
    }

    /// The member list of a room.
    async fn room(&self, conv: &str) -> Result<Arc<Room>, ProtoError> {
        Ok(self.members.room(conv).await?)
    }

    /// Distinct online users among a room's members.
    fn online_in(&self, room: &Room) -> u64 {
        room.count(|u| self.presence.is_online(u))
    }
}
