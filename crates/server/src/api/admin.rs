//! `POST /api/admin/broadcast`: a `notice` to every online session.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use hubbub_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Caller, JsonBody};
use crate::AppState;

/// An announcement.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Broadcast {
    pub text: String,
}

/// The answer to a broadcast.
#[derive(Debug, Serialize, ToSchema)]
pub struct Broadcasted {
    /// Sessions reached.
    pub delivered: usize,
}

/// Send a server-wide announcement (admins only: users named in `--admins`, by token).
#[utoipa::path(post, path = "/api/admin/broadcast", request_body = Broadcast, responses(
    (status = 200, description = "sent", body = Broadcasted),
    (status = 400, description = "empty text", body = super::docs::ErrorBody),
    (status = 403, description = "not an admin", body = super::docs::ErrorBody),
    (status = 413, description = "text over the limit", body = super::docs::ErrorBody),
), security(("bearer" = [])))]
pub async fn broadcast(
    State(state): State<Arc<AppState>>,
    Caller(caller): Caller,
    JsonBody(body): JsonBody<Broadcast>,
) -> Result<Json<Broadcasted>, ApiError> {
    if !caller.admin || caller.guest {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "only admins may broadcast",
        ));
    }
    if body.text.trim().is_empty() {
        return Err(ApiError::bad_request("text must not be empty"));
    }
    if body.text.len() > state.config.max_text_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("text is over {} bytes", state.config.max_text_bytes),
        ));
    }
    let delivered = state.node.broadcast(&caller.user, body.text);
    tracing::info!(admin = %caller.user, delivered, "broadcast");
    Ok(Json(Broadcasted { delivered }))
}
