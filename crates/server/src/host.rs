//! The `Host` check against DNS rebinding: a web page can make a browser send requests
//! to a loopback server through a name the attacker controls (`attacker.example`
//! resolving to 127.0.0.1), and the browser then treats the server as the attacker's own
//! origin. Such requests carry the attacker's name in `Host`, so every route (the API,
//! `/ws`, the web UI) only answers hosts the server knows:
//!
//! - IP literals (`127.0.0.1:8080`, `[::1]:8080`, `10.1.2.3`): an address can't be
//!   rebound. When bound to one address, only that one (or any loopback address when it
//!   is a loopback address); when bound to `0.0.0.0` or `::`, any address.
//! - `localhost` (and names under `.localhost`, which browsers resolve to loopback
//!   themselves).
//! - the names in `allowed_hosts` (compared without the port, case-insensitively);
//!   `["*"]` turns the check off.
//!
//! The port is not compared (a proxy may forward another one). Requests without `Host`
//! pass: browsers always send one. `/healthz` and `/readyz` answer any host, for probes
//! that address the server by a name of their own; they reveal nothing.
//!
//! A refused request gets `421 Misdirected Request` with the `forbidden` error body.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hubbub_protocol::ErrorCode;

use crate::api::ApiError;
use crate::AppState;

/// Routes that answer any `Host`.
const ANY_HOST: &[&str] = &["/healthz", "/readyz"];

/// The middleware: refuses requests for hosts the server does not serve.
pub async fn check(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if ANY_HOST.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}").to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(host) if !allowed(&state.config.allowed_hosts, state.config.bind, &host) => {
            tracing::debug!(%host, "refused a request for a foreign host");
            ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::Forbidden,
                format!(
                    "host {:?} is not served here (add it to allowed_hosts)",
                    host.chars().take(100).collect::<String>()
                ),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// Whether a server bound to `bind` with `allowed_hosts` serves `host` (a `Host`
/// header value: a name or an IP literal, with or without a port).
pub fn allowed(allowed_hosts: &[String], bind: SocketAddr, host: &str) -> bool {
    if allowed_hosts.iter().any(|h| h == "*") {
        return true;
    }
    let Some(name) = hostname(host) else {
        return false;
    };
    if let Some(ip) = ip_literal(name) {
        let bound = bind.ip();
        return bound.is_unspecified() || ip == bound || (ip.is_loopback() && bound.is_loopback());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost") {
        return true;
    }
    allowed_hosts.iter().any(|h| {
        let h = hostname(h).unwrap_or(h);
        h.strip_suffix('.').unwrap_or(h).eq_ignore_ascii_case(name)
    })
}

/// The host part of `host[:port]` / `[v6][:port]`; `None` when malformed.
fn hostname(host: &str) -> Option<&str> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return Some(inside)
            .filter(|s| !s.is_empty())
            .map(|_| &host[..inside.len() + 2]);
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return None,
        None => host,
    };
    (!name.is_empty()).then_some(name)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `name` as an IP address (`[v6]` or dotted v4).
fn ip_literal(name: &str) -> Option<IpAddr> {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse().ok().filter(IpAddr::is_ipv6),
        None => name.parse().ok().filter(IpAddr::is_ipv4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(allowed_hosts: &[&str], bind: &str, host: &str) -> bool {
        let list: Vec<String> = allowed_hosts.iter().map(|s| s.to_string()).collect();
        allowed(&list, bind.parse().unwrap(), host)
    }

    #[test]
    fn only_known_hosts_are_served() {
        let lo = "127.0.0.1:8080";
        assert!(ok(&[], lo, "127.0.0.1:8080"));
        assert!(ok(&[], lo, "127.0.0.1"));
        assert!(ok(&[], lo, "[::1]:8080"));
        assert!(ok(&[], lo, "localhost:8080"));
        assert!(ok(&[], lo, "LocalHost."));
        assert!(ok(&[], lo, "app.localhost:1"));
        assert!(!ok(&[], lo, "attacker.example:8080"));
        assert!(!ok(&[], lo, "localhost.attacker.example"));
        assert!(!ok(&[], lo, "10.0.0.1:8080"), "not the bound address");
        assert!(!ok(&[], lo, "127.0.0.1:8080:1"));
        assert!(!ok(&[], lo, "[::1"));
        assert!(!ok(&[], lo, ""));
        assert!(ok(&["chat.example.com"], lo, "Chat.Example.com:443"));
        assert!(ok(&["chat.example.com:8443"], lo, "chat.example.com"));
        assert!(!ok(&["chat.example.com"], lo, "evil.example.com"));
        assert!(ok(&["*"], lo, "anything.example"));

        let any = "0.0.0.0:8080";
        assert!(ok(&[], any, "10.0.0.1:8080"), "a pod IP from a probe");
        assert!(ok(&[], "[::]:8080", "[fd00::1]:8080"));
        assert!(!ok(&[], any, "hubbub.default.svc:8080"));

        let one = "10.0.0.1:8080";
        assert!(ok(&[], one, "10.0.0.1"));
        assert!(!ok(&[], one, "10.0.0.2"));
        assert!(!ok(&[], one, "127.0.0.1"));
    }
}
