//! `GET /api/conversations`, `GET /api/conversations/{conv}/messages`, `GET /api/rooms`,
//! `GET /api/rooms/{name}/members`, `GET /api/search`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use hubbub_protocol::reply::{ConversationList, HistoryOk, MemberList, RoomPage, SearchPage};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, Caller};
use crate::AppState;

/// The caller's conversations with their read positions.
#[utoipa::path(get, path = "/api/conversations", responses(
    (status = 200, description = "the caller's conversations", body = ConversationList),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<ConversationList>, ApiError> {
    Ok(Json(state.node.conversations(&caller.user).await?))
}

/// Paging of `GET /api/conversations/{conv}/messages`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Paging {
    /// Newest messages with `seq` below this.
    pub before_seq: Option<u64>,
    /// Oldest messages with `seq` above this.
    pub after_seq: Option<u64>,
    /// Page size (default 50, capped by the server's `history_max`).
    pub limit: Option<u32>,
}

/// A page of a conversation's history, with the same rules as the socket's `history`.
#[utoipa::path(get, path = "/api/conversations/{conv}/messages",
    params(("conv" = String, Path, description = "`room:NAME` or `dm:A:B`, colons raw or percent-encoded"), Paging),
    responses(
        (status = 200, description = "a page of messages, ascending by seq", body = HistoryOk),
        (status = 400, description = "bad conversation id or paging", body = super::docs::ErrorBody),
        (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
        (status = 403, description = "not a member / not a participant", body = super::docs::ErrorBody),
    ), security(("bearer" = [])))]
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(conv): Path<String>,
    paging: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<HistoryOk>, ApiError> {
    let Query(paging) = paging.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let page = state
        .node
        .history(
            &caller.user,
            &conv,
            paging.before_seq,
            paging.after_seq,
            paging.limit,
        )
        .await?;
    Ok(Json(page))
}

/// Paging of `GET /api/rooms`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RoomPaging {
    /// Page size: default 100, at most 500.
    pub limit: Option<usize>,
    /// Rooms whose name sorts after this one (the `next` of the previous page).
    pub after: Option<String>,
}

/// Default page of `GET /api/rooms`.
pub const ROOMS_PAGE: usize = 100;
/// Largest page of `GET /api/rooms`.
pub use crate::node::ROOMS_PAGE_MAX;

/// Public rooms with their member and online counts, a page at a time in name order.
#[utoipa::path(get, path = "/api/rooms", params(RoomPaging), responses(
    (status = 200, description = "a page of rooms; `next` is the `after` of the following page, null on the last one", body = RoomPage),
    (status = 400, description = "bad paging", body = super::docs::ErrorBody),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn rooms(
    State(state): State<Arc<AppState>>,
    Caller(_caller): Caller,
    paging: Result<Query<RoomPaging>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RoomPage>, ApiError> {
    let Query(paging) = paging.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = paging.limit.unwrap_or(ROOMS_PAGE);
    Ok(Json(
        state.node.rooms(paging.after.as_deref(), limit).await?,
    ))
}

/// The members of a room (for its members only).
#[utoipa::path(get, path = "/api/rooms/{name}/members",
    params(("name" = String, Path, description = "the room's bare name")),
    responses(
        (status = 200, description = "the members, by name", body = MemberList),
        (status = 400, description = "bad room name", body = super::docs::ErrorBody),
        (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
        (status = 403, description = "not a member", body = super::docs::ErrorBody),
    ), security(("bearer" = [])))]
pub async fn members(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(name): Path<String>,
) -> Result<Json<MemberList>, ApiError> {
    Ok(Json(state.node.room_members(&caller.user, &name).await?))
}

/// What `GET /api/search` looks for.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// The words (1 to 256 bytes): each must match, the last also as a prefix.
    pub q: String,
    /// Only this conversation.
    pub conv: Option<String>,
    /// Page size: default 20, at most 100.
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub before: Option<String>,
}

/// Searches the text of the caller's conversations, newest first.
#[utoipa::path(get, path = "/api/search", params(SearchParams), responses(
    (status = 200, description = "matching messages, newest first; `next` pages on (null on the last page)", body = SearchPage),
    (status = 400, description = "empty or long query, bad limit or cursor", body = super::docs::ErrorBody),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
    (status = 403, description = "`conv` is not the caller's", body = super::docs::ErrorBody),
    (status = 429, description = "too many searches (Retry-After)", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn search(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SearchPage>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Err(wait) = state.searches.check(caller.user.clone()) {
        return Err(ApiError::rate_limited(
            "too many searches; slow down".to_string(),
            wait,
        ));
    }
    Ok(Json(
        state
            .node
            .search(
                &caller.user,
                &p.q,
                p.conv.as_deref(),
                p.limit,
                p.before.as_deref(),
            )
            .await?,
    ))
}
