//! `POST /api/register` and `POST /api/login`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hubbub_protocol::{is_valid_user_name, ErrorCode};
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::{ApiError, JsonBody};
use crate::auth::{check_password_rules, hash_password, verify_password};
use crate::AppState;

/// A user name and a password.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Credentials {
    /// `^[A-Za-z0-9_.-]{1,32}$`
    pub username: String,
    /// At least 8 characters.
    pub password: String,
}

/// Create an account.
#[utoipa::path(post, path = "/api/register", request_body = Credentials, responses(
    (status = 201, description = "created: {\"user\"}"),
    (status = 400, description = "invalid name or password", body = super::docs::ErrorBody),
    (status = 409, description = "the name is taken", body = super::docs::ErrorBody),
))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    if !is_valid_user_name(&body.username) {
        return Err(ApiError::bad_request(
            "username must match ^[A-Za-z0-9_.-]{1,32}$",
        ));
    }
    check_password_rules(&body.password).map_err(ApiError::bad_request)?;
    let password = body.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    state.store.create_user(&body.username, &hash).await?;
    state.known_users.insert(body.username.clone());
    tracing::info!(user = %body.username, "account created");
    Ok((StatusCode::CREATED, Json(json!({"user": body.username}))).into_response())
}

/// Log in: a signed token for the WebSocket and the HTTP API.
#[utoipa::path(post, path = "/api/login", request_body = Credentials, responses(
    (status = 200, description = "{\"token\",\"expires_at\"} (expires_at in Unix ms)"),
    (status = 401, description = "bad credentials", body = super::docs::ErrorBody),
    (status = 429, description = "too many failed attempts for this account or address", body = super::docs::ErrorBody),
))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let account_key = format!("user:{}", body.username);
    let ip_key = format!("ip:{}", peer.ip());
    for key in [&account_key, &ip_key] {
        if let Some(secs) = state.logins.retry_after(key) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!("too many failed logins; try again in {secs} s"),
            ));
        }
    }
    let hash = if is_valid_user_name(&body.username) {
        state.store.password_hash(&body.username).await?
    } else {
        None
    };
    let password = body.password;
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => verify_password(&password, &h),
        None => {
            // Spend the same time as a real check, so timing does not reveal names.
            let _ = verify_password(&password, DUMMY_HASH);
            false
        }
    })
    .await
    .unwrap_or(false);
    if !ok {
        state.logins.failed(&account_key);
        state.logins.failed(&ip_key);
        state.metrics.auth_failures.inc();
        return Err(ApiError::unauthorized("wrong user name or password"));
    }
    state.logins.succeeded(&account_key);
    let (token, expires_at) = state
        .auth
        .tokens()
        .issue(&body.username, None)
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"token": token, "expires_at": expires_at})).into_response())
}

/// An argon2id hash of a random password, checked when the account does not exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0lQ6mwVv8tOUtRkWgBqD6Dwn5Q9bKNPCF4fSa8yzTxw";
