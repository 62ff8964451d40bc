//! Behind a reverse proxy: the deployed `deploy/nginx.conf` (run by the test kit's
//! `NginxServer`) in front of real hubbub servers, one or a cluster. Chat works through
//! it; with `trusted_proxies`, each client behind nginx has its own address for the
//! per-address limits, and without it nobody picks an address by sending forwarding
//! headers.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{TestServer, WAIT};
use hubbub_client::{Client, ConnectOptions};
use hubbub_protocol::ServerFrame;
use hubbub_testkit::{NginxServer, PgServer, RedisServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

/// nginx with the deployed configuration in front of `nodes`.
async fn nginx(nodes: &[SocketAddr]) -> NginxServer {
    let nodes = nodes.to_vec();
    tokio::task::spawn_blocking(move || NginxServer::start(&nodes))
        .await
        .expect("start nginx")
}

/// Trusts the proxy on 127.0.0.1, where nginx connects from.
fn behind_nginx(c: &mut hubbub_server::Config) {
    c.trusted_proxies = vec!["127.0.0.1".into()];
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `to` from source address `from`.
async fn dial(to: SocketAddr, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the source address");
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Opens `/ws` as guest `user` on `to` from source address `from`, with `headers`
/// besides the handshake's: the open WebSocket, or the status it was refused with.
async fn open_ws(
    to: SocketAddr,
    from: IpAddr,
    user: &str,
    headers: &[(&'static str, &str)],
) -> Result<WebSocketStream<TcpStream>, u16> {
    let mut request = format!("ws://{to}/ws?user={user}")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("header value"));
    }
    let stream = dial(to, from).await;
    let handshake = tokio_tungstenite::client_async(request, stream);
    match tokio::time::timeout(WAIT, handshake)
        .await
        .expect("handshake timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake from {from} failed: {e}"),
    }
}

/// A guest client of the chat through nginx.
async fn client(nginx: &NginxServer, user: &str) -> Client {
    tokio::time::timeout(
        WAIT,
        Client::connect(ConnectOptions::guest(nginx.ws_url(), user)),
    )
    .await
    .expect("connect timed out")
    .expect("connect through nginx")
}

#[tokio::test]
async fn chat_works_through_nginx() {
    let server = TestServer::with(|c| {
        behind_nginx(c);
        // Heartbeats go through nginx too, several of them during the test.
        c.heartbeat_ms = 250;
    })
    .await;
    let nginx = nginx(&[server.addr]).await;
    let mut alice = client(&nginx, "alice").await;
    let mut bob = client(&nginx, "bob").await;
    alice.join("lobby").await.expect("alice joins");
    bob.join("lobby").await.expect("bob joins");
    let sent = alice
        .send_text("room:lobby", "hello through nginx")
        .await
        .expect("send");
    let got = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .expect("bob hears alice");
    let ServerFrame::Message(m) = got else {
        unreachable!()
    };
    assert_eq!((m.from.as_str(), m.seq), ("alice", sent.seq));
    assert_eq!(m.content, Some(json!("hello through nginx")));

    // Five heartbeats later both are still there and answer.
    tokio::time::sleep(Duration::from_millis(1250)).await;
    bob.ping().await.expect("bob is still connected");
    bob.send_text("room:lobby", "still here")
        .await
        .expect("send");
    alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .expect("alice hears bob");

    // The HTTP API answers through nginx as well.
    let rooms: serde_json::Value = common::http()
        .get(format!("{}/api/rooms?user=carol", nginx.url()))
        .send()
        .await
        .expect("GET /api/rooms")
        .json()
        .await
        .expect("json");
    assert_eq!(rooms["rooms"][0]["name"], "lobby", "{rooms}");
}

/// Two nodes of one cluster behind nginx: nginx puts one client on each, and they chat
/// as on one server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_behind_nginx_acts_as_one_server() {
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start postgres");
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .expect("start redis");
    let store = pg.create_database();
    let one = TestServer::node(&store, &redis.url(), behind_nginx).await;
    let two = TestServer::node(&store, &redis.url(), behind_nginx).await;
    let nginx = nginx(&[one.addr, two.addr]).await;
    let alice = client(&nginx, "alice").await;
    let mut bob = client(&nginx, "bob").await;
    for node in [&one, &two] {
        assert_eq!(
            node.metric("hubbub_connections_open").await,
            1.0,
            "least_conn: one WebSocket on each node"
        );
    }
    alice.join("lobby").await.expect("alice joins");
    bob.join("lobby").await.expect("bob joins");
    let sent = alice
        .send_text("room:lobby", "from the other node")
        .await
        .expect("send");
    let got = bob
        .wait_for(Duration::from_secs(10), |f| {
            matches!(f, ServerFrame::Message(_))
        })
        .await
        .expect("bob hears alice across nodes");
    let ServerFrame::Message(m) = got else {
        unreachable!()
    };
    assert_eq!((m.from.as_str(), m.seq), ("alice", sent.seq));
    assert_eq!(m.content, Some(json!("from the other node")));
}

#[tokio::test]
async fn behind_trusted_nginx_each_client_address_has_its_own_connection_allowance() {
    let server = TestServer::with(|c| {
        behind_nginx(c);
        c.max_connections_per_ip = 1;
    })
    .await;
    let nginx = nginx(&[server.addr]).await;
    let first = open_ws(nginx.addr(), loopback(2), "a", &[]).await;
    assert!(first.is_ok(), "127.0.0.2 gets in: {:?}", first.err());
    let other = open_ws(nginx.addr(), loopback(3), "b", &[]).await;
    assert!(
        other.is_ok(),
        "127.0.0.3 has an allowance of its own, though nginx connects from 127.0.0.1 for \
         both: {:?}",
        other.err()
    );
    assert_eq!(
        open_ws(nginx.addr(), loopback(2), "c", &[]).await.err(),
        Some(429),
        "a second connection from 127.0.0.2 is one too many"
    );
    // A client cannot dodge its cap with a header of its own: nginx appends the address
    // it saw, and that is the one taken.
    assert_eq!(
        open_ws(
            nginx.addr(),
            loopback(2),
            "d",
            &[("x-forwarded-for", "192.0.2.50")]
        )
        .await
        .err(),
        Some(429)
    );
}

#[tokio::test]
async fn forwarding_headers_from_a_peer_that_is_not_trusted_change_nothing() {
    let spoofs = [("198.51.100.1", "192.0.2.1"), ("198.51.100.2", "192.0.2.2")];
    // No trusted proxy, and a trusted proxy elsewhere: the peer's address counts.
    for trusted in [vec![], vec!["127.0.0.9".to_string()]] {
        let server = TestServer::with(|c| {
            c.max_connections_per_ip = 1;
            c.trusted_proxies = trusted.clone();
        })
        .await;
        let mut results = Vec::new();
        for (user, (forwarded, real)) in ["a", "b"].into_iter().zip(spoofs) {
            let headers = [("x-forwarded-for", forwarded), ("x-real-ip", real)];
            // (An open WebSocket stays open until the end: its place stays taken.)
            results.push(open_ws(server.addr, loopback(1), user, &headers).await);
        }
        let refusals: Vec<Option<u16>> =
            results.iter().map(|r| r.as_ref().err().copied()).collect();
        assert_eq!(
            refusals,
            [None, Some(429)],
            "trusted {trusted:?}: the second client is refused, whatever it says"
        );
    }
    // The same headers from a trusted peer do name the client (so the refusal above is
    // the trust check's doing).
    let server = TestServer::with(|c| {
        c.max_connections_per_ip = 1;
        c.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let mut open = Vec::new();
    for (user, (forwarded, real)) in ["a", "b"].into_iter().zip(spoofs) {
        let headers = [("x-forwarded-for", forwarded), ("x-real-ip", real)];
        open.push(
            open_ws(server.addr, loopback(1), user, &headers)
                .await
                .expect("each forwarded address has its own allowance"),
        );
    }
}

#[tokio::test]
async fn rate_limits_of_the_http_api_count_per_client_behind_nginx() {
    let server = TestServer::with(|c| {
        behind_nginx(c);
        c.auth_rate_per_min = 1;
        c.auth_burst = 1;
    })
    .await;
    let nginx = nginx(&[server.addr]).await;
    // A name that is refused before any password work, after the address's rate.
    let register = |from: u8| {
        let url = format!("{}/api/register", nginx.url());
        async move {
            reqwest::Client::builder()
                .no_proxy()
                .timeout(WAIT)
                .local_address(loopback(from))
                .build()
                .expect("http client")
                .post(url)
                .json(&json!({"username": "not a name", "password": "correct horse"}))
                .send()
                .await
                .expect("POST /api/register")
                .status()
                .as_u16()
        }
    };
    assert_eq!(register(2).await, 400, "127.0.0.2: its one request");
    assert_eq!(register(2).await, 429, "127.0.0.2: over its rate");
    assert_eq!(register(3).await, 400, "127.0.0.3 has a rate of its own");
}

#[tokio::test]
async fn limits_are_kept_by_each_node_behind_nginx() {
    let config = |c: &mut hubbub_server::Config| {
        behind_nginx(c);
        c.max_connections_per_ip = 1;
    };
    let one = TestServer::with(config).await;
    let two = TestServer::with(config).await;
    let nginx = nginx(&[one.addr, two.addr]).await;
    // nginx sends each new WebSocket to the node with the fewest: one each.
    let _a = open_ws(nginx.addr(), loopback(2), "a", &[])
        .await
        .expect("first");
    let _b = open_ws(nginx.addr(), loopback(2), "b", &[])
        .await
        .expect("second, on the other node");
    // Both nodes have this address's one connection; a 429 is not retried elsewhere.
    assert_eq!(
        open_ws(nginx.addr(), loopback(2), "c", &[]).await.err(),
        Some(429)
    );
    // Another address still has its own allowance on either node.
    let _d = open_ws(nginx.addr(), loopback(3), "d", &[])
        .await
        .expect("127.0.0.3 gets in");
}

#[tokio::test]
async fn a_trusted_proxys_http_connections_are_not_capped_per_address_but_others_are() {
    let server = TestServer::with(|c| {
        behind_nginx(c);
        c.max_http_connections_per_ip = 1;
    })
    .await;
    // Holds an idle HTTP connection from `from`, then asks for /healthz on another one.
    async fn second_connection(server: SocketAddr, from: IpAddr) -> String {
        // Connected first, so accepted first.
        let _idle = dial(server, from).await;
        let mut second = dial(server, from).await;
        second
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        tokio::time::timeout(WAIT, second.read_to_string(&mut answer))
            .await
            .expect("answer timed out")
            .expect("read");
        answer
    }
    let proxy = second_connection(server.addr, loopback(1)).await;
    assert!(proxy.starts_with("HTTP/1.1 200"), "{proxy}");
    let other = second_connection(server.addr, loopback(2)).await;
    assert!(other.starts_with("HTTP/1.1 429"), "{other}");
}
