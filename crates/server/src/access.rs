//! Who may read and write which conversation: one rule set for the WebSocket and HTTP.

use hubbub_protocol::{check_seq, Conv, ErrorCode, ProtoError};

use crate::api::ApiError;
use crate::auth::Identity;
use crate::store::{HistoryQuery, StoreError};
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

/// Checks that `user` may read and write `conv`. Rooms: a member (`not_member`
/// otherwise). DMs: one of the two names (`forbidden` otherwise); when guest mode is off,
/// the other one must be a registered user (`not_found`). For a DM, returns its two
/// participants.
pub async fn authorize(
    state: &AppState,
    user: &str,
    conv: &str,
) -> Result<Option<(String, String)>, ProtoError> {
    match Conv::parse(conv)? {
        Conv::Room(_) => {
            let room = state.hub.room(conv, &*state.store).await?;
            if room.contains(user) {
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
            if !state.auth.guest_enabled() && !user_exists(state, peer).await? {
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
pub async fn user_exists(state: &AppState, name: &str) -> Result<bool, ProtoError> {
    if state.known_users.contains(name) {
        return Ok(true);
    }
    let exists = state.store.password_hash(name).await?.is_some();
    if exists {
        state.known_users.insert(name.to_string());
    }
    Ok(exists)
}

/// Turns history paging parameters into a query, with PROTOCOL.md's defaults and caps.
pub fn history_query(
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u32>,
    max: u32,
) -> Result<HistoryQuery, ProtoError> {
    let limit = page_limit(limit, 50, max)?;
    Ok(match (before_seq, after_seq) {
        (Some(_), Some(_)) => {
            return Err(ProtoError::bad_request(
                "give before_seq or after_seq, not both",
            ))
        }
        (Some(before), None) => HistoryQuery::Before {
            before: check_seq("before_seq", before)?,
            limit,
        },
        (None, Some(after)) => HistoryQuery::After {
            after: check_seq("after_seq", after)?,
            limit,
        },
        (None, None) => HistoryQuery::Latest { limit },
    })
}

/// A page size: `default` when absent, at most `max`, never 0.
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ProtoError> {
    match limit {
        None => Ok(default.min(max)),
        Some(0) => Err(ProtoError::bad_request("limit must be at least 1")),
        Some(n) => Ok(n.min(max)),
    }
}
