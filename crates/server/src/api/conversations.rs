//! `GET /api/conversations`, `GET /api/conversations/{conv}/messages`, `GET /api/rooms`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use hubbub_protocol::Conv;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

use super::{ApiError, Caller};
use crate::access::{authorize, history_query};
use crate::AppState;

/// The caller's conversations with their read positions.
#[utoipa::path(get, path = "/api/conversations", responses(
    (status = 200, description = "{\"conversations\":[{\"conv\",\"kind\",\"last_seq\",\"read_seq\",\"unread\"}]}"),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
) -> Result<Json<Value>, ApiError> {
    let convs = state.store.conversations(&caller.user).await?;
    let conversations: Vec<Value> = convs
        .into_iter()
        .map(|c| {
            let kind = match Conv::parse(&c.conv) {
                Ok(Conv::Dm(..)) => "dm",
                _ => "room",
            };
            json!({
                "conv": c.conv,
                "kind": kind,
                "last_seq": c.last_seq,
                "read_seq": c.read_seq,
                "unread": c.unread,
            })
        })
        .collect();
    Ok(Json(json!({ "conversations": conversations })))
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
        (status = 200, description = "{\"messages\",\"has_more\"}"),
        (status = 400, description = "bad conversation id or paging", body = super::docs::ErrorBody),
        (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
        (status = 403, description = "not a member / not a participant", body = super::docs::ErrorBody),
    ), security(("bearer" = [])))]
pub async fn messages(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    Path(conv): Path<String>,
    paging: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(paging) = paging.map_err(|e| ApiError::bad_request(e.body_text()))?;
    authorize(&state, &caller.user, &conv).await?;
    let q = history_query(
        paging.before_seq,
        paging.after_seq,
        paging.limit,
        state.config.history_max,
    )?;
    let page = state.store.history(&conv, q).await?;
    Ok(Json(
        json!({"messages": page.messages, "has_more": page.has_more}),
    ))
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
pub const ROOMS_PAGE_MAX: usize = 500;

/// Public rooms with their member and online counts, a page at a time in name order.
#[utoipa::path(get, path = "/api/rooms", params(RoomPaging), responses(
    (status = 200, description = "{\"rooms\":[{\"name\",\"conv\",\"members\",\"online\"}],\"next\"}: `next` is the `after` of the following page, null on the last one"),
    (status = 400, description = "bad paging", body = super::docs::ErrorBody),
    (status = 401, description = "no valid credential", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn rooms(
    State(state): State<Arc<AppState>>,
    Caller(_caller): Caller,
    paging: Result<Query<RoomPaging>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(paging) = paging.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = paging.limit.unwrap_or(ROOMS_PAGE);
    if limit == 0 || limit > ROOMS_PAGE_MAX {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..={ROOMS_PAGE_MAX}"
        )));
    }
    let after = paging.after.map(|name| Conv::room_id(&name));
    // One more than the page tells whether another page follows.
    let mut rooms = state.store.rooms(after.as_deref(), limit + 1).await?;
    let more = rooms.len() > limit;
    rooms.truncate(limit);
    let mut out = Vec::with_capacity(rooms.len());
    for r in rooms {
        let online = match state.hub.room(&r.conv, &*state.store).await {
            Ok(room) => state.hub.online_in(&room),
            Err(_) => 0,
        };
        let name = r.conv.strip_prefix("room:").unwrap_or(&r.conv).to_string();
        out.push(json!({"name": name, "conv": r.conv, "members": r.members, "online": online}));
    }
    let next = if more {
        out.last().map(|r| r["name"].clone())
    } else {
        None
    };
    Ok(Json(json!({ "rooms": out, "next": next })))
}
