//! HTTP routes. Every error body is `{"code","message"}` with a fitting status; every
//! route but health, readiness, metrics and the OpenAPI document needs a credential
//! (`Authorization: Bearer`, `?token=`, or `?user=` in guest mode).
//!
//! - [`accounts`]: register and log in.
//! - [`conversations`]: the caller's conversations, message history, public rooms.
//! - [`files`]: attachment upload and download.
//! - [`admin`]: server-wide announcements.
//! - [`docs`]: the OpenAPI document, generated from these handlers.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hubbub_protocol::{ErrorCode, ProtoError};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::auth::{Credentials, Identity};
use crate::gateway::WsParams;
use crate::AppState;

pub mod accounts;
pub mod admin;
pub mod conversations;
pub mod docs;
pub mod files;

/// An HTTP error with a stable code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds) with 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After: wait` (rounded up to whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 429 `rate_limited`, with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            message,
        )
        .retry_after(wait)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    /// A `500 internal`: `e` is logged, the client gets a fixed message.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            INTERNAL_MESSAGE,
        )
    }
}

/// The message of every `internal` error body.
pub const INTERNAL_MESSAGE: &str = "internal error";

/// The HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::NotMember => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ProtoError> for ApiError {
    fn from(e: ProtoError) -> Self {
        ApiError::new(status_of(e.code), e.code, e.message)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ProtoError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // However it was made, an internal error shows no internal text.
        let message = if self.code == ErrorCode::Internal && self.message != INTERNAL_MESSAGE {
            tracing::error!(error = %self.message, "internal error");
            INTERNAL_MESSAGE.to_string()
        } else {
            self.message
        };
        let mut res = (
            self.status,
            Json(docs::ErrorBody {
                code: self.code,
                message,
            }),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        res
    }
}

/// The authenticated caller of an HTTP request.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let params = Query::<WsParams>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default();
        let creds = Credentials::from_parts(
            &parts.headers,
            params.token.as_deref(),
            params.user.as_deref(),
        );
        let identity = state.auth.authenticate(&creds).map_err(|e| {
            state.metrics.auth_failures.inc();
            ApiError::unauthorized(e.to_string())
        })?;
        crate::access::admit_guest(state, identity)
            .await
            .map(Caller)
    }
}

/// A JSON request body whose rejections use the API's error body.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::BadRequest
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// Every route of the server.
pub fn router(state: Arc<AppState>) -> Router {
    let upload_limit = state.config.max_upload_bytes;
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .merge(crate::web::routes())
        .route("/ws", get(crate::gateway::ws_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(docs::openapi_json))
        .route("/api/register", post(accounts::register))
        .route("/api/login", post(accounts::login))
        .route("/api/conversations", get(conversations::list))
        .route(
            "/api/conversations/{conv}/messages",
            get(conversations::messages),
        )
        .route("/api/rooms", get(conversations::rooms))
        .route("/api/rooms/{name}/members", get(conversations::members))
        .route("/api/search", get(conversations::search))
        .route(
            "/api/files",
            post(files::upload).layer(axum::extract::DefaultBodyLimit::max(
                upload_limit.saturating_add(64 * 1024),
            )),
        )
        .route(
            "/api/files/pass",
            post(files::pass).delete(files::drop_pass),
        )
        .route("/files/{id}/{name}", get(files::download))
        .route("/api/admin/broadcast", post(admin::broadcast))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::host::check,
        ))
        .with_state(state)
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "the process is up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the store answers reads and writes.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "the store is unreachable or the server is shutting down", body = docs::ErrorBody),
))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await;
    let unavailable = |m: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, m).into_response()
    };
    match ping {
        Ok(Ok(())) if !state.shutdown.is_cancelled() => {
            Json(json!({"status": "ready"})).into_response()
        }
        Ok(Ok(())) => unavailable("shutting down".into()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store failed");
            unavailable(crate::store::UNAVAILABLE_MESSAGE.into())
        }
        Err(_) => unavailable("the store did not answer in time".into()),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route")
}
