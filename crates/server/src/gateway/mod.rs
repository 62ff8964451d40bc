//! The WebSocket gateway: `GET /ws` checks the credential, the browser origin and the
//! subprotocol before upgrading, then runs one [`session`] per connection.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hubbub_protocol::{ErrorCode, SUBPROTOCOL_JSON, SUBPROTOCOL_PB};
use serde::Deserialize;
use tracing::Instrument;

use crate::api::ApiError;
use crate::auth::Credentials;
use crate::client_addr::ClientAddr;
use crate::AppState;

mod handler;
mod limits;
pub mod session;

pub use limits::ConnLimiter;

pub use session::Codec;

/// Query parameters of `GET /ws`.
#[derive(Debug, Default, Deserialize)]
pub struct WsParams {
    pub token: Option<String>,
    pub user: Option<String>,
    pub device: Option<String>,
}

/// Longest device id.
const MAX_DEVICE: usize = 64;

/// `GET /ws`.
pub async fn ws_handler(
    State(state): State<Arc<AppState>>,
    ClientAddr(client): ClientAddr,
    Query(params): Query<WsParams>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if state.shutdown.is_cancelled() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the server is shutting down",
        )
        .into_response();
    }
    let creds = Credentials::from_parts(&headers, params.token.as_deref(), params.user.as_deref());
    let identity = match state.auth.authenticate(&creds) {
        Ok(id) => id,
        Err(e) => {
            state.metrics.auth_failures.inc();
            tracing::debug!(error = %e, addr = %client, "refused a WebSocket credential");
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                e.to_string(),
            )
            .into_response();
        }
    };
    let identity = match crate::access::admit_guest(&state, identity).await {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if let Err(origin) = check_origin(&state, &headers) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("origin {origin:?} is not allowed"),
        )
        .into_response();
    }
    let device = params.device.unwrap_or_else(|| "default".to_string());
    if device.is_empty()
        || device.len() > MAX_DEVICE
        || !device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return ApiError::bad_request("device must match ^[A-Za-z0-9_.-]{1,64}$").into_response();
    }
    // The first offered subprotocol we speak wins; none offered means JSON.
    let mut codec = Codec::Json;
    if let Some(offered) = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    {
        let chosen = offered.split(',').map(str::trim).find_map(|p| match p {
            SUBPROTOCOL_JSON => Some(Codec::Json),
            SUBPROTOCOL_PB => Some(Codec::Protobuf),
            _ => None,
        });
        match chosen {
            Some(c) => codec = c,
            None => {
                return ApiError::bad_request(format!(
                    "unsupported subprotocol; offer {SUBPROTOCOL_JSON} or {SUBPROTOCOL_PB}"
                ))
                .into_response()
            }
        }
    }
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("not a WebSocket upgrade: {rejection}"),
            )
            .into_response()
        }
    };
    // Per client address: behind a trusted proxy, the address it forwarded.
    let permit = match state.conn_limiter.try_acquire(client) {
        Ok(p) => p,
        Err(refusal) => {
            tracing::debug!(addr = %client, reason = %refusal.message, "refused a WebSocket");
            return refusal.into_response();
        }
    };
    let cfg = &state.config;
    let (read_buffer, max_frame) = (cfg.ws_read_buffer, cfg.max_frame_bytes);
    // What the session needs once upgraded, in one box: axum keeps the callback beside
    // the session's future for as long as the connection lives.
    let accepted = Box::new(Accepted {
        peer: client,
        identity,
        device,
        codec,
        permit,
        state,
    });
    upgrade
        .protocols([match codec {
            Codec::Json => SUBPROTOCOL_JSON,
            Codec::Protobuf => SUBPROTOCOL_PB,
        }])
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        // The session writes one frame at a time and waits for it to be flushed, so the
        // write buffer never holds more than one frame (plus control frames); a cap here
        // would only break large answers (a full history page can be megabytes).
        .max_write_buffer_size(usize::MAX)
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| accepted.start(socket))
}

/// An authorized connection waiting for its WebSocket upgrade.
struct Accepted {
    /// The client's address ([`ClientAddr`]).
    peer: std::net::IpAddr,
    identity: crate::auth::Identity,
    device: String,
    codec: Codec,
    permit: limits::ConnPermit,
    state: Arc<AppState>,
}

impl Accepted {
    // Boxed on purpose: the box is what the upgrade callback captures.
    #[allow(clippy::boxed_local)]
    fn start(
        self: Box<Self>,
        socket: axum::extract::ws::WebSocket,
    ) -> impl std::future::Future<Output = ()> {
        let Accepted {
            peer,
            identity,
            device,
            codec,
            permit,
            state,
        } = *self;
        // Every log line of the session carries who it is.
        let span = tracing::info_span!(
            "session",
            user = %identity.user,
            device = %device,
            session = tracing::field::Empty
        );
        let tracker = state.sessions.clone();
        let conn = session::Upgraded {
            socket,
            identity,
            device,
            codec,
            permit,
            peer,
        };
        tracker.track_future(session::run(conn, state).instrument(span))
    }
}

/// Browsers send `Origin`; it must be the server's own origin or on the allow-list.
/// Requests without `Origin` (programs) pass.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| "<not text>".to_string())?;
    if state
        .config
        .allowed_origins
        .iter()
        .any(|o| o == origin || o == "*")
    {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| !host.is_empty() && rest.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(origin.to_string())
    }
}
