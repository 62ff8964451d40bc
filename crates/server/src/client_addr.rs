//! The address of the client a request comes from: what every per-address limit,
//! throttle and log uses.
//!
//! It is the TCP peer, unless the peer is one of the `trusted_proxies` (IP addresses or
//! CIDR ranges; none by default). A request relayed by a trusted proxy comes from the
//! address that proxy says:
//!
//! - `X-Forwarded-For` (every such header, in order, as one comma-separated list; each
//!   proxy appends the address it received the request from): read from the right,
//!   skipping the trusted proxies, the first address is the client. What lies to the
//!   left of it was written by the client itself and is never read. When every address
//!   is a trusted proxy, the left-most one is taken.
//! - Without `X-Forwarded-For`, `X-Real-IP` (one address).
//! - A header that cannot be read (not text, an entry that is no address before the
//!   client's is found, an empty list) counts for nothing: the peer is the client.
//!
//! Entries may carry a port (`192.0.2.1:4711`, `[2001:db8::1]:4711`); IPv4-mapped IPv6
//! addresses (`::ffff:192.0.2.1`, what a dual-stack listener sees) are taken as the IPv4
//! address, for the trust check and as the result.
//!
//! A client that is not behind a trusted proxy cannot change its address by sending
//! these headers itself. The HTTP accept loop has no headers to read: it leaves the
//! connections of trusted proxies out of its per-address cap (they carry many clients)
//! and counts them in its total only; the WebSocket cap and every rate limit apply to
//! the address found here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::api::ApiError;
use crate::AppState;

/// The reverse proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses the `trusted_proxies` entries: IP addresses (`10.0.0.7`, `::1`) or CIDR
    /// ranges (`10.0.0.0/8`, `fd00::/8`). An entry that is neither is an error naming it.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|entry| {
                let s = entry.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| match net {
                        // An IPv4-mapped range would never match: peers are canonical.
                        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                            Some(v4) if v6.prefix_len() >= 96 => {
                                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                                    .map(IpNet::V4)
                                    .unwrap_or(net)
                            }
                            _ => net,
                        },
                        v4 => v4,
                    })
                    .map_err(|_| {
                        format!(
                            "trusted_proxies entry {entry:?} is not an IP address or a CIDR \
                             range (such as 10.0.0.7 or 10.0.0.0/8)"
                        )
                    })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The client address of a request from `peer` with `headers` (see the module doc).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    let mut forwarded = headers.get_all("x-forwarded-for").iter().peekable();
    if forwarded.peek().is_some() {
        let mut values = Vec::new();
        for value in forwarded {
            match value.to_str() {
                Ok(text) => values.push(text),
                Err(_) => return peer,
            }
        }
        return from_forwarded_for(&values, trusted).unwrap_or(peer);
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_entry)
        .unwrap_or(peer)
}

/// The client in the `X-Forwarded-For` lists `values` (in header order), or None when
/// they cannot be read.
fn from_forwarded_for(values: &[&str], trusted: &TrustedProxies) -> Option<IpAddr> {
    let mut leftmost = None;
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let ip = parse_entry(entry)?;
        if !trusted.contains(ip) {
            return Some(ip);
        }
        leftmost = Some(ip);
    }
    leftmost
}

/// One address of a forwarding header: an IP address, optionally with a port.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The client address of an HTTP request, as an extractor: [`client_ip`] of the
/// connection's peer, the request's headers and the server's `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
            return Err(ApiError::internal(
                "a request without its connection's address",
            ));
        };
        Ok(ClientAddr(client_ip(
            peer.ip(),
            &parts.headers,
            &state.trusted_proxies,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn entries_are_addresses_or_ranges_and_anything_else_is_an_error_naming_it() {
        let t = trusted(&["10.0.0.0/8", " 192.0.2.7 ", "::1", "fd00::/8", "10.1.2.3/8"]);
        for yes in [
            "10.200.1.1",
            "192.0.2.7",
            "::1",
            "fd12::5",
            "::ffff:10.0.0.1",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in ["11.0.0.1", "192.0.2.8", "::2", "fe80::1", "127.0.0.1"] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        let mapped = trusted(&["::ffff:192.0.2.0/120"]);
        assert!(
            mapped.contains(ip("192.0.2.9")),
            "IPv4-mapped ranges match IPv4 peers"
        );
        assert!(TrustedProxies::default().is_empty());
        for bad in [
            "",
            "proxy.internal",
            "10.0.0.0/33",
            "10.0.0.256",
            "10.0.0.1:80",
            "*",
        ] {
            let err = TrustedProxies::parse(&[bad.to_string()]).unwrap_err();
            assert!(
                err.contains("trusted_proxies") && err.contains(&format!("{bad:?}")),
                "{err}"
            );
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_sends() {
        let none = TrustedProxies::default();
        let other = trusted(&["10.0.0.1"]);
        let spoof = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
        ]);
        for t in [&none, &other] {
            assert_eq!(client_ip(ip("198.51.100.4"), &spoof, t), ip("198.51.100.4"));
            assert_eq!(
                client_ip(
                    ip("198.51.100.4"),
                    &headers(&[("x-real-ip", "203.0.113.9")]),
                    t
                ),
                ip("198.51.100.4")
            );
        }
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let t = trusted(&["10.0.0.1"]);
        let proxy = ip("10.0.0.1");
        assert_eq!(
            client_ip(proxy, &headers(&[("x-forwarded-for", "203.0.113.9")]), &t),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(proxy, &headers(&[("x-real-ip", "203.0.113.9")]), &t),
            ip("203.0.113.9")
        );
        // X-Forwarded-For wins over X-Real-IP.
        let both = headers(&[
            ("x-real-ip", "198.51.100.1"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(client_ip(proxy, &both, &t), ip("203.0.113.9"));
        // No header: the proxy itself (its own requests, health checks).
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &t), proxy);
        // With a port.
        assert_eq!(
            client_ip(
                proxy,
                &headers(&[("x-forwarded-for", "203.0.113.9:4711")]),
                &t
            ),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn what_a_client_puts_in_front_of_the_proxys_entry_is_ignored() {
        let t = trusted(&["10.0.0.1"]);
        // The client sent "X-Forwarded-For: 192.0.2.1"; the proxy appended its peer.
        let h = headers(&[("x-forwarded-for", "192.0.2.1, 203.0.113.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("203.0.113.9"));
        let h = headers(&[("x-forwarded-for", "garbage, , 203.0.113.9")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("203.0.113.9"));
    }

    #[test]
    fn chains_of_trusted_proxies_are_walked_from_the_right() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = headers(&[(
            "x-forwarded-for",
            "192.0.2.1, 203.0.113.9, 10.0.0.5, 10.1.1.1",
        )]);
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &t), ip("203.0.113.9"));
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "192.0.2.1, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.5"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &t), ip("203.0.113.9"));
        // Every hop trusted: the left-most.
        let h = headers(&[("x-forwarded-for", "10.3.3.3, 10.0.0.5")]);
        assert_eq!(client_ip(ip("10.0.0.9"), &h, &t), ip("10.3.3.3"));
    }

    #[test]
    fn ipv6_peers_clients_and_mapped_addresses() {
        let t = trusted(&["::1", "127.0.0.1"]);
        let h = headers(&[("x-forwarded-for", "2001:db8::7")]);
        assert_eq!(client_ip(ip("::1"), &h, &t), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:443")]);
        assert_eq!(client_ip(ip("::1"), &h, &t), ip("2001:db8::7"));
        // A dual-stack listener sees the IPv4 proxy as ::ffff:127.0.0.1.
        let h = headers(&[("x-forwarded-for", "::ffff:203.0.113.9")]);
        assert_eq!(client_ip(ip("::ffff:127.0.0.1"), &h, &t), ip("203.0.113.9"));
        assert_eq!(
            client_ip(ip("::ffff:198.51.100.4"), &HeaderMap::new(), &t),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn headers_that_cannot_be_read_leave_the_peer() {
        let t = trusted(&["10.0.0.1"]);
        let proxy = ip("10.0.0.1");
        for bad in [
            "",
            " ",
            "unknown",
            "203.0.113.9, garbage",
            "203.0.113.9,",
            "2001:db8::7]",
        ] {
            let h = headers(&[("x-forwarded-for", bad), ("x-real-ip", "198.51.100.1")]);
            assert_eq!(client_ip(proxy, &h, &t), proxy, "{bad:?}");
        }
        assert_eq!(
            client_ip(proxy, &headers(&[("x-real-ip", "not an address")]), &t),
            proxy
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.9\xff").unwrap(),
        );
        assert_eq!(client_ip(proxy, &h, &t), proxy, "not text");
        let long = vec!["10.0.0.1"; 10_000].join(",");
        assert_eq!(
            client_ip(proxy, &headers(&[("x-forwarded-for", &long)]), &t),
            proxy,
            "only the proxy itself"
        );
    }
}
