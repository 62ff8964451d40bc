//! Admitting guests: a guest name never meets an account's name. (Who may read and write
//! which conversation is the node's rule: [`crate::node::Node::authorize`].)

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::StoreError;
use crate::AppState;

/// Most guest names cached as recorded; beyond, the cache starts over.
const MAX_CACHED_GUEST_NAMES: usize = 100_000;

/// Lets a guest in only under a name that meets no account's name (same
/// [`crate::auth::name_skeleton`]), recording the name the first time so that no account
/// can take it later. Anyone else passes unchanged.
pub async fn admit_guest(state: &AppState, identity: Identity) -> Result<Identity, ApiError> {
    if !identity.guest || state.guest_names.contains(&identity.user) {
        return Ok(identity);
    }
    match state.store.claim_guest_name(&identity.user).await {
        Ok(()) => {
            if state.guest_names.len() >= MAX_CACHED_GUEST_NAMES {
                state.guest_names.clear();
            }
            state.guest_names.insert(identity.user.clone());
            Ok(identity)
        }
        Err(StoreError::Conflict(message)) => {
            state.metrics.auth_failures.inc();
            Err(ApiError::unauthorized(message))
        }
        Err(e) => Err(e.into()),
    }
}
