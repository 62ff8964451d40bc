//! The OpenAPI document of the HTTP API, generated from the handlers' annotations.

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The body of every HTTP error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code from PROTOCOL.md (`bad_request`, `unauthorized`, ...).
    #[schema(value_type = String)]
    pub code: hubbub_protocol::ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "token_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("token"))),
        );
    }
}

/// The document served at `/api/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "hubbub HTTP API", description = "Accounts, conversations, files and administration. The real-time protocol is the WebSocket at /ws (see PROTOCOL.md)."),
    paths(
        super::healthz,
        super::readyz,
        super::metrics,
        openapi_json,
        super::accounts::register,
        super::accounts::login,
        super::conversations::list,
        super::conversations::messages,
        super::conversations::rooms,
        super::conversations::members,
        super::conversations::search,
        super::files::upload,
        super::files::download,
        super::files::pass,
        super::files::drop_pass,
        super::admin::broadcast,
    ),
    components(schemas(ErrorBody, super::accounts::Credentials, super::admin::Broadcast)),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", responses((status = 200, description = "OpenAPI 3.1 JSON")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
