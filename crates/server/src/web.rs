//! The web UI: plain HTML, CSS and ES modules from the repository's `web/` folder,
//! embedded in the binary at build time and served with a strict
//! `Content-Security-Policy` (no inline script, no external origin).
//!
//! The start page carries one server fact the UI needs before it connects: whether guest
//! mode is on (`<meta name="hubbub-guest">`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

/// The policy every UI response carries: own scripts and styles only; WebSocket to any
/// host (the page's own, as the gateway checks the origin); images and media from
/// uploads, blobs and local camera streams.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; media-src 'self' blob: mediastream:; \
     connect-src 'self' ws: wss:; font-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../../../web/index.html");

/// One embedded static file.
struct Asset {
    path: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/app.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/app.js"),
    },
    Asset {
        path: "/conn.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/conn.js"),
    },
    Asset {
        path: "/call.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/call.js"),
    },
    Asset {
        path: "/render.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/render.js"),
    },
    Asset {
        path: "/notify.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/notify.js"),
    },
    Asset {
        path: "/search.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../../web/search.js"),
    },
    Asset {
        path: "/style.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../../../web/style.css"),
    },
    Asset {
        path: "/favicon.svg",
        mime: "image/svg+xml",
        body: include_bytes!("../../../web/favicon.svg"),
    },
];

/// The UI's routes: `/` and each embedded file under its own path.
pub fn routes() -> Router<Arc<AppState>> {
    let mut router = Router::new().route("/", get(index));
    for asset in ASSETS {
        router = router.route(
            asset.path,
            get(move || async move { respond(asset.mime, asset.body) }),
        );
    }
    router
}

/// The start page, telling the script whether guest mode is on.
async fn index(State(state): State<Arc<AppState>>) -> Response {
    let guest = if state.auth.guest_enabled() {
        "on"
    } else {
        "off"
    };
    let html = INDEX_HTML.replace("{{GUEST}}", guest);
    respond("text/html; charset=utf-8", html.into_bytes())
}

fn respond(mime: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut res = body.into().into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}
