//! The presence seam: who is online, as the whole deployment sees it.
//!
//! The node tells its [`Presence`] when a user's sessions come and go on this node, and
//! asks it whether a user is online anywhere. [`LocalPresence`] is the one-node
//! implementation: online means a session on this node's hub. The cluster's
//! implementation ([`crate::cluster::ClusterPresence`]) gives the same answers across
//! nodes (and notices when a node's users went offline with it).

use std::sync::Arc;

use crate::hub::Hub;

/// Who is online.
pub trait Presence: Send + Sync + 'static {
    /// A session of `user` opened on this node (`first_here`: the user had none here).
    /// Returns whether the user just came online (had no session anywhere).
    fn opened(&self, user: &str, first_here: bool) -> bool;

    /// A session of `user` closed on this node (`last_here`: the user has none left
    /// here). Returns whether the user just went offline (has no session anywhere).
    fn closed(&self, user: &str, last_here: bool) -> bool;

    /// Whether `user` has a session anywhere.
    fn is_online(&self, user: &str) -> bool;

    /// Whether `user` has a session on another node.
    fn elsewhere(&self, _user: &str) -> bool {
        false
    }
}

/// Presence of a single node: its hub's sessions.
#[derive(Debug, Clone)]
pub struct LocalPresence {
    hub: Arc<Hub>,
}

impl LocalPresence {
    pub fn new(hub: Arc<Hub>) -> LocalPresence {
        LocalPresence { hub }
    }
}

impl Presence for LocalPresence {
    fn opened(&self, _user: &str, first_here: bool) -> bool {
        first_here
    }

    fn closed(&self, _user: &str, last_here: bool) -> bool {
        last_here
    }

    fn is_online(&self, user: &str) -> bool {
        self.hub.is_online(user)
    }
}
