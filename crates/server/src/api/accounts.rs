//! `POST /api/register` and `POST /api/login`.

use crate::cluster_logins::Verdict;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hubbub_protocol::{is_valid_user_name, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, JsonBody};
use crate::auth::{check_password_rules, hash_password, verify_password, HashBusy};
use crate::client_addr::ClientAddr;
use crate::AppState;

/// A user name and a password.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Credentials {
    /// `^[A-Za-z0-9_.-]{1,32}$`
    pub username: String,
    /// At least 8 characters.
    pub password: String,
}

/// Refuses a request from `ip` beyond its register/login rate, before any password work.
fn check_address_rate(state: &AppState, ip: std::net::IpAddr) -> Result<(), ApiError> {
    state.auth_rate.check(ip).map_err(|wait| {
        ApiError::rate_limited(
            "too many register and login requests from this address; try again later",
            wait,
        )
    })
}

fn busy(e: HashBusy) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unavailable,
        e.to_string(),
    )
    .retry_after(Duration::from_secs(1))
}

/// Create an account.
#[utoipa::path(post, path = "/api/register", request_body = Credentials, responses(
    (status = 201, description = "the account was created, with a token for it", body = Registered),
    (status = 400, description = "invalid name or password", body = super::docs::ErrorBody),
    (status = 409, description = "the name is taken, too similar to a taken name, or used by a guest", body = super::docs::ErrorBody),
    (status = 429, description = "too many requests from this address (Retry-After)", body = super::docs::ErrorBody),
    (status = 503, description = "too many passwords being hashed (Retry-After)", body = super::docs::ErrorBody),
))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    check_address_rate(&state, client)?;
    if !is_valid_user_name(&body.username) {
        return Err(ApiError::bad_request(
            "username must match ^[A-Za-z0-9_.-]{1,32}$",
        ));
    }
    check_password_rules(&body.password).map_err(ApiError::bad_request)?;
    let password = body.password;
    let permit = state.hashing.acquire().await.map_err(busy)?;
    let hash = permit
        .run(move || hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    state.store.create_user(&body.username, &hash).await?;
    state.node.account_created(&body.username);
    tracing::info!(user = %body.username, "account created");
    // A token as a login would give: the new user is signed in without a second request,
    // which earlier failed logins from the same address could throttle.
    let (token, expires_at) = state
        .auth
        .tokens()
        .issue(&body.username, None)
        .map_err(ApiError::internal)?;
    let created = Registered {
        user: body.username,
        token,
        expires_at,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The answer to `POST /api/register`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Registered {
    /// The new account's name.
    pub user: String,
    /// A signed token for the new account, as `POST /api/login` gives.
    pub token: String,
    /// When it expires (Unix ms).
    pub expires_at: i64,
}

/// The answer to `POST /api/login`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoggedIn {
    /// A signed token: `Authorization: Bearer <token>` (or `?token=` on the WebSocket).
    pub token: String,
    /// When it expires (Unix ms).
    pub expires_at: i64,
}

/// Log in: a signed token for the WebSocket and the HTTP API.
#[utoipa::path(post, path = "/api/login", request_body = Credentials, responses(
    (status = 200, description = "a token", body = LoggedIn),
    (status = 401, description = "bad credentials", body = super::docs::ErrorBody),
    (status = 429, description = "too many requests or failed attempts for this account or address (Retry-After)", body = super::docs::ErrorBody),
    (status = 503, description = "too many passwords being checked (Retry-After)", body = super::docs::ErrorBody),
))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    check_address_rate(&state, client)?;
    let too_many = |wait: std::time::Duration| {
        ApiError::rate_limited(
            format!(
                "too many failed logins; try again in {} s",
                wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
            ),
            wait,
        )
    };
    // Counted before the check; one check per account at a time: on this node, and in
    // a cluster on every node.
    let attempt = state
        .logins
        .begin(&body.username, client)
        .map_err(too_many)?;
    let shared = match &state.cluster_logins {
        Some(logins) => match logins.begin(&body.username, client).await {
            Ok(shared) => shared,
            Err(wait) => {
                attempt.not_checked();
                return Err(too_many(wait));
            }
        },
        None => None,
    };
    let verdict = |v: Verdict| async move {
        if let Some(shared) = shared {
            shared.finish(v).await;
        }
    };
    let hash = if is_valid_user_name(&body.username) {
        state.store.password_hash(&body.username).await?
    } else {
        None
    };
    let permit = match state.hashing.acquire().await {
        Ok(p) => p,
        Err(e) => {
            attempt.not_checked();
            verdict(Verdict::NotChecked).await;
            return Err(busy(e));
        }
    };
    let password = body.password;
    let ok = permit
        .run(move || match hash {
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
        attempt.failed();
        verdict(Verdict::Failed).await;
        state.metrics.auth_failures.inc();
        return Err(ApiError::unauthorized("wrong user name or password"));
    }
    attempt.succeeded();
    verdict(Verdict::Succeeded).await;
    let (token, expires_at) = state
        .auth
        .tokens()
        .issue(&body.username, None)
        .map_err(ApiError::internal)?;
    Ok(Json(LoggedIn { token, expires_at }).into_response())
}

/// An argon2id hash of a random password, checked when the account does not exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0lQ6mwVv8tOUtRkWgBqD6Dwn5Q9bKNPCF4fSa8yzTxw";
