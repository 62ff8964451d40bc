//! Opening load-generator connections: source addresses, the two targets, failure causes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use futures_util::StreamExt;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

pub(super) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Which server the bench talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Target {
    /// hubbub's protocol: guest login, `welcome`, `join`, `send` with `ok`.
    Hubbub,
    /// A plain broadcast hub: every text frame goes to every client (sender included),
    /// queued frames may be joined with newlines; nothing else.
    Raw,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub(super) struct Dialer {
    pub(super) target: Target,
    addr: SocketAddr,
    url: String,
    source_addrs: u8,
}

/// Why a connection could not be opened, as counted in the reports.
#[derive(Debug)]
pub(super) struct ConnectError {
    pub(super) cause: &'static str,
    pub(super) error: anyhow::Error,
}

impl Dialer {
    /// `url` is `ws://HOST:PORT` on a loopback address.
    pub(super) fn new(url: &str, target: Target, source_addrs: u8) -> anyhow::Result<Dialer> {
        let rest = url
            .strip_prefix("ws://")
            .context("the bench URL must start with ws://")?
            .trim_end_matches('/');
        let hostport = rest.split(['/', '?']).next().unwrap_or_default();
        let (host, port) = hostport
            .rsplit_once(':')
            .context("the bench URL needs a port: ws://127.0.0.1:PORT")?;
        let ip: IpAddr = if host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.trim_matches(['[', ']'])
                .parse()
                .with_context(|| format!("{host:?} is not an IP address"))?
        };
        if !ip.is_loopback() {
            bail!("hubbub bench only targets loopback addresses, got {host:?}");
        }
        if source_addrs > 1 && !ip.is_ipv4() {
            bail!("--source-addrs needs an IPv4 loopback target");
        }
        let port: u16 = port.parse().context("bad port in the bench URL")?;
        Ok(Dialer {
            target,
            addr: SocketAddr::new(ip, port),
            url: format!("ws://{hostport}"),
            source_addrs: source_addrs.max(1),
        })
    }

    /// Opens connection number `index` as `user`; for hubbub, waits for the `welcome`.
    pub(super) async fn connect(&self, index: usize, user: &str) -> Result<Ws, ConnectError> {
        let fail = |cause, error| ConnectError { cause, error };
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| fail(io_cause(&e), e.into()))?;
        if self.source_addrs > 1 {
            // 127.0.0.1 ..= 127.0.0.N: each source address has its own ephemeral ports.
            let last = (index % usize::from(self.source_addrs)) as u8 + 1;
            let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0);
            socket.bind(src).map_err(|e| fail(io_cause(&e), e.into()))?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(self.addr))
            .await
            .map_err(|_| fail("timeout", anyhow::anyhow!("TCP connect timed out")))?
            .map_err(|e| fail(io_cause(&e), e.into()))?;
        let _ = stream.set_nodelay(true);
        let url = match self.target {
            Target::Hubbub => format!("{}/ws?user={user}", self.url),
            Target::Raw => format!("{}/ws", self.url),
        };
        let request = url
            .into_client_request()
            .map_err(|e| fail("other", e.into()))?;
        let handshake =
            tokio_tungstenite::client_async_with_config(request, stream, Some(client_config()));
        let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| fail("timeout", anyhow::anyhow!("handshake timed out")))?
            .map_err(|e| {
                let cause = match &e {
                    tokio_tungstenite::tungstenite::Error::Http(r) => match r.status().as_u16() {
                        401 => "http_401",
                        429 => "http_429",
                        503 => "http_503",
                        _ => "http_other",
                    },
                    tokio_tungstenite::tungstenite::Error::Io(io) => io_cause(io),
                    _ => "handshake",
                };
                fail(cause, e.into())
            })?;
        if self.target == Target::Hubbub {
            match tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t))))
                    if t.as_str().starts_with(r#"{"type":"welcome""#) => {}
                Err(_) => return Err(fail("timeout", anyhow::anyhow!("no welcome"))),
                other => {
                    return Err(fail(
                        "no_welcome",
                        anyhow::anyhow!("expected a welcome, got {other:?}"),
                    ))
                }
            }
        }
        Ok(ws)
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Small buffers: the generator holds tens of thousands of sockets.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 20))
}

fn io_cause(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(24) => "too_many_open_files",
        Some(99) => "addr_not_available",
        Some(111) => "refused",
        Some(104) => "reset",
        _ => "io",
    }
}

/// Raises this process's open-file limit to its hard limit; returns the new soft limit.
pub(super) fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert!(Dialer::new("ws://127.0.0.1:8080", Target::Hubbub, 1).is_ok());
        assert!(Dialer::new("ws://localhost:8080/", Target::Raw, 1).is_ok());
        assert!(Dialer::new("ws://[::1]:8080", Target::Hubbub, 1).is_ok());
        assert!(Dialer::new("ws://10.0.0.1:8080", Target::Hubbub, 1).is_err());
        assert!(Dialer::new("ws://example.com:80", Target::Hubbub, 1).is_err());
        assert!(Dialer::new("http://127.0.0.1:8080", Target::Hubbub, 1).is_err());
        assert!(Dialer::new("ws://[::1]:8080", Target::Hubbub, 4).is_err());
    }
}
