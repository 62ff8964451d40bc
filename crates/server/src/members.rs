//! Cached member lists of rooms, loaded from the store on first use.
//!
//! A list changes only through [`Members::apply`], called with the store's announcements
//! in commit order (by the bus shard that also delivers the room's messages), so it
//! agrees with the store at every message. Loading a list from the store races with those
//! announcements: changes announced while the load runs are kept in a log and replayed
//! over the loaded list. Each change sets one user's membership, so replaying one that
//! the loaded list already reflects changes nothing.
//!
//! Each room also keeps the sessions its last delivery went to ([`Targets`]), reused
//! while neither its members nor the hub's sessions change.
//!
//! Lists of unknown rooms are not kept; lists of rooms unused for a while with nobody
//! online are dropped ([`Members::evict_idle`]). The cache is a fast refusal only: the
//! store checks membership again when it appends.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::hub::{Hub, SessionHandle};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The hash of the cache's maps (foldhash; a fan-out looks up every member).
pub(crate) type Hasher = foldhash::fast::RandomState;

/// A room's members, as cached.
#[derive(Debug, Default)]
pub struct Room {
    loaded: tokio::sync::OnceCell<()>,
    state: RwLock<RoomState>,
    /// When the room was last used (ms since the cache was made), for eviction.
    used: AtomicU64,
    /// Changes with every change of the member list.
    version: AtomicU64,
    /// The sessions a delivery to the room last pushed to.
    targets: Mutex<Option<Targets>>,
}

/// The sessions of a room's members on this node, as a fan-out built them: reused for
/// the room's next messages while neither the member list nor the hub's sessions
/// changed, so a message costs no lookup per member.
#[derive(Debug)]
struct Targets {
    /// [`Room::version`] and [`Hub::generation`] when built.
    version: u64,
    generation: u64,
    sessions: Arc<[SessionHandle]>,
}

#[derive(Debug, Default)]
struct RoomState {
    members: HashSet<Arc<str>, Hasher>,
    ready: bool,
    /// Changes announced before the load finished, in commit order.
    log: Vec<(Arc<str>, bool)>,
}

impl Room {
    /// Changes with every change of the member list.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The sessions of the members online in `hub`: the list built last time if neither
    /// the members nor the hub's sessions changed since, a new one if they did.
    pub fn targets(&self, hub: &Hub) -> Arc<[SessionHandle]> {
        // Read before building: a change meanwhile leaves the list marked stale.
        let generation = hub.generation();
        let version = self.version();
        let mut cached = self.targets.lock();
        if let Some(t) = &*cached {
            if t.generation == generation && t.version == version {
                return t.sessions.clone();
            }
        }
        let mut sessions = Vec::new();
        self.for_each(|u| hub.sessions_into(u, &mut sessions));
        let sessions: Arc<[SessionHandle]> = sessions.into();
        *cached = Some(Targets {
            version,
            generation,
            sessions: sessions.clone(),
        });
        sessions
    }

    /// Drops the list of sessions (it holds closed sessions until rebuilt).
    fn forget_targets(&self) {
        self.targets.lock().take();
    }

    pub fn contains(&self, user: &str) -> bool {
        self.state.read().members.contains(user)
    }

    pub fn len(&self) -> usize {
        self.state.read().members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the member list.
    pub fn members(&self) -> Vec<Arc<str>> {
        self.state.read().members.iter().cloned().collect()
    }

    /// Calls `f` with each member, under the list's read lock (`f` must not block).
    pub fn for_each(&self, mut f: impl FnMut(&str)) {
        for u in self.state.read().members.iter() {
            f(u);
        }
    }

    /// How many members `pred` holds for.
    pub fn count(&self, mut pred: impl FnMut(&str) -> bool) -> u64 {
        let mut n = 0;
        self.for_each(|u| n += u64::from(pred(u)));
        n
    }

    fn apply(&self, user: &str, joined: bool) {
        let mut st = self.state.write();
        self.version.fetch_add(1, Ordering::SeqCst);
        if !st.ready {
            st.log.push((Arc::from(user), joined));
        } else if joined {
            st.members.insert(Arc::from(user));
        } else {
            st.members.remove(user);
        }
    }

    fn set_loaded(&self, members: Vec<String>) {
        let mut st = self.state.write();
        self.version.fetch_add(1, Ordering::SeqCst);
        st.members = members.into_iter().map(Arc::from).collect();
        for (user, joined) in std::mem::take(&mut st.log) {
            if joined {
                st.members.insert(user);
            } else {
                st.members.remove(&user);
            }
        }
        st.ready = true;
    }
}

/// The cache of room member lists.
pub struct Members {
    rooms: DashMap<String, Arc<Room>, Hasher>,
    store: Arc<dyn Store>,
    metrics: Metrics,
    /// The cache's clock for eviction.
    started: std::time::Instant,
}

impl Members {
    pub fn new(store: Arc<dyn Store>, metrics: Metrics) -> Members {
        Members {
            rooms: DashMap::default(),
            store,
            metrics,
            started: std::time::Instant::now(),
        }
    }

    /// The room `conv`, loading its members from the store on first use. A room without
    /// members (one that does not exist) is not kept: lookups of unknown rooms leave
    /// nothing behind.
    pub async fn room(&self, conv: &str) -> Result<Arc<Room>, StoreError> {
        let room = match self.rooms.get(conv) {
            Some(r) => r.clone(),
            None => {
                let room = self.rooms.entry(conv.to_string()).or_default().clone();
                self.metrics.rooms_cached.set(self.rooms.len() as i64);
                room
            }
        };
        room.used.store(self.clock_ms(), Ordering::Relaxed);
        let loaded = room
            .loaded
            .get_or_try_init(|| async {
                let members = self.store.members(conv).await?;
                room.set_loaded(members);
                Ok::<(), StoreError>(())
            })
            .await;
        if loaded.is_err() || room.is_empty() {
            self.forget(conv, &room);
        }
        loaded?;
        Ok(room)
    }

    /// Drops `room` if it is still the cached one and has no members (or failed to
    /// load). Always safe: the next use loads it again from the store.
    fn forget(&self, conv: &str, room: &Arc<Room>) {
        let removed = self
            .rooms
            .remove_if(conv, |_, r| {
                Arc::ptr_eq(r, room) && (r.loaded.get().is_none() || r.is_empty())
            })
            .is_some();
        if removed {
            self.metrics.rooms_cached.set(self.rooms.len() as i64);
        }
    }

    /// Applies a membership change the store announced, in commit order. A room that is
    /// not cached is left alone: whoever loads it later reads the store, which has the
    /// change.
    pub fn apply(&self, conv: &str, user: &str, joined: bool) -> Option<Arc<Room>> {
        let room = self.rooms.get(conv)?.clone();
        room.apply(user, joined);
        Some(room)
    }

    /// Forgets the cached list of `conv` (the next use loads it from the store), also
    /// while it is being loaded.
    pub fn invalidate(&self, conv: &str) {
        if self.rooms.remove(conv).is_some() {
            self.metrics.rooms_cached.set(self.rooms.len() as i64);
        }
    }

    /// Drops rooms not used for `idle_ms` none of whose members `online` holds for.
    /// Returns how many were dropped.
    pub fn evict_idle(&self, idle_ms: u64, online: impl Fn(&str) -> bool) -> usize {
        let now = self.clock_ms();
        let before = self.rooms.len();
        self.rooms.retain(|_, room| {
            let idle = now.saturating_sub(room.used.load(Ordering::Relaxed)) >= idle_ms;
            if idle {
                room.forget_targets();
            }
            !idle || room.count(&online) > 0
        });
        let after = self.rooms.len();
        self.metrics.rooms_cached.set(after as i64);
        before - after
    }

    /// Forgets every cached room (each is loaded again from the store on next use): after
    /// a cluster node may have missed membership changes of other nodes.
    pub fn clear(&self) {
        self.rooms.clear();
        self.metrics.rooms_cached.set(0);
    }

    /// Number of rooms cached now.
    pub fn cached(&self) -> usize {
        self.rooms.len()
    }

    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
