//! The server's edge: which hosts it answers (DNS rebinding), how long it waits for
//! slow HTTP clients, how many connections one address may hold, and how fast rooms
//! may be created.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{error_code, http, TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use hubbub_protocol::ErrorCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("source address"))
        .expect("bind the source address");
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Reads one HTTP response head (and its body, by `content-length`) from `stream`.
/// Returns the status and the body; `None` when the server closed without answering.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
            return Some((status, body));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer and no close within {WAIT:?}"),
        }
    }
}

/// Sends `request` on a new connection and reads the answer.
async fn request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = connect_from("127.0.0.1", addr).await;
    s.write_all(request.as_bytes()).await.expect("write");
    read_response(&mut s).await.expect("an answer")
}

/// A browser's WebSocket handshake for `path` with `Host` and `Origin`.
fn ws_handshake(path: &str, host: &str, origin: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

fn get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// Waits until `stream` is closed by the server (EOF or reset); panics after `WAIT`.
async fn wait_closed(stream: &mut TcpStream) {
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the connection open for {WAIT:?}"),
        }
    }
}

#[tokio::test]
async fn a_page_on_a_rebound_name_cannot_reach_a_loopback_server() {
    let server = TestServer::start().await;
    let port = server.addr.port();
    let evil = format!("attacker.example:{port}");
    let evil_origin = format!("http://{evil}");

    // The socket, the API and the web UI all refuse the foreign host.
    let (status, body) = request(
        server.addr,
        &ws_handshake("/ws?user=mallory", &evil, &evil_origin),
    )
    .await;
    assert_eq!(status, 421, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json error body");
    assert_eq!(v["code"], "forbidden");
    assert!(v["message"].as_str().unwrap().contains("allowed_hosts"));
    for path in [
        "/api/rooms?user=mallory",
        "/",
        "/app.js",
        "/metrics",
        "/nope",
    ] {
        let (status, body) = request(server.addr, &get(path, &evil)).await;
        assert_eq!(status, 421, "{path}: {body}");
    }
    // Probes may address the server by any name.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            request(server.addr, &get(path, &evil)).await.0,
            200,
            "{path}"
        );
    }
    // The names it is reached by legitimately still work.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
    ] {
        let origin = format!("http://{host}");
        let (status, body) =
            request(server.addr, &ws_handshake("/ws?user=alice", &host, &origin)).await;
        assert_eq!(status, 101, "{host}: {body}");
        assert_eq!(request(server.addr, &get("/", &host)).await.0, 200);
    }

    // A configured name is served; `*` serves any.
    let server = TestServer::with(|c| c.allowed_hosts = vec!["chat.example.org".into()]).await;
    let host = "chat.example.org";
    let (status, _) = request(
        server.addr,
        &ws_handshake("/ws?user=alice", host, &format!("http://{host}")),
    )
    .await;
    assert_eq!(status, 101);
    assert_eq!(request(server.addr, &get("/", &evil)).await.0, 421);
    let server = TestServer::with(|c| c.allowed_hosts = vec!["*".into()]).await;
    assert_eq!(request(server.addr, &get("/", &evil)).await.0, 200);
}

#[tokio::test]
async fn slow_clients_are_closed_after_the_header_timeout_while_health_checks_keep_answering() {
    let server = TestServer::with(|c| {
        c.http_header_timeout_ms = 400;
        c.max_http_connections_per_ip = 1000;
    })
    .await;
    let start = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = connect_from("127.0.0.1", server.addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .expect("write");
        slow.push(s);
    }
    let health = http()
        .get(server.http("/healthz"))
        .send()
        .await
        .expect("/healthz answers while slow clients hang");
    assert_eq!(health.status(), 200);
    for s in &mut slow {
        wait_closed(s).await;
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    let health = http().get(server.http("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A keep-alive connection that goes quiet after a request is closed too.
    let server = TestServer::with(|c| {
        c.http_header_timeout_ms = 200;
        c.http_idle_timeout_ms = 600;
    })
    .await;
    let mut s = connect_from("127.0.0.1", server.addr).await;
    let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.expect("answer").0, 200);
    let idle = Instant::now();
    wait_closed(&mut s).await;
    let took = idle.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "idle closed after {took:?}"
    );
}

#[tokio::test]
async fn http_connections_are_capped_per_address_and_in_total() {
    let server = TestServer::with(|c| c.max_http_connections_per_ip = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.1", server.addr).await);
    }
    // Wait until the server has taken the three (a fourth is then refused).
    let mut extra = connect_from("127.0.0.1", server.addr).await;
    let (status, body) = read_response(&mut extra).await.expect("a refusal");
    assert_eq!(status, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "rate_limited");
    // Another address is served.
    let mut other = connect_from("127.0.0.2", server.addr).await;
    other
        .write_all(get("/healthz", "127.0.0.1").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut other).await.unwrap().0, 200);
    // A closed connection frees its place (once the server has seen the close).
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let mut s = connect_from("127.0.0.1", server.addr).await;
        s.write_all(get("/healthz", "127.0.0.1").as_bytes())
            .await
            .unwrap();
        if read_response(&mut s).await.map(|r| r.0) == Some(200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed place is reused");

    let server = TestServer::with(|c| c.max_http_connections = 2).await;
    let _a = connect_from("127.0.0.1", server.addr).await;
    let _b = connect_from("127.0.0.2", server.addr).await;
    let mut c = connect_from("127.0.0.3", server.addr).await;
    assert_eq!(read_response(&mut c).await.expect("a refusal").0, 503);
}

/// The partial uploads (`*.part`) in a data dir.
fn partial_files(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("files"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until `cond` holds for the data dir's partial files.
async fn wait_partials(data: &Path, what: &str, cond: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond(&partial_files(data)) {
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}",
            partial_files(data)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts an upload of 100 kB and sends only its first bytes.
async fn start_stalled_upload(addr: SocketAddr) -> TcpStream {
    let mut s = connect_from("127.0.0.1", addr).await;
    let head = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
                Content-Type: application/octet-stream\r\n\r\n";
    let request = format!(
        "POST /api/files?user=alice HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 100000\r\n\r\n\
         {head}{}",
        "x".repeat(5000)
    );
    s.write_all(request.as_bytes()).await.expect("write");
    s
}

#[tokio::test]
async fn a_stalled_upload_is_dropped_after_the_body_timeout_and_leaves_no_file() {
    let server = TestServer::with(|c| c.http_body_timeout_ms = 1000).await;
    let data = server.dir.path().to_path_buf();
    let mut s = start_stalled_upload(server.addr).await;
    wait_partials(&data, "the upload started", |p| p.len() == 1).await;
    let start = Instant::now();
    // The server answers (or just closes) once the body timeout passed.
    let _ = read_response(&mut s).await;
    assert!(start.elapsed() < WAIT);
    wait_partials(&data, "the partial file is removed", |p| p.is_empty()).await;

    // A client that goes away mid-upload leaves nothing either.
    let s = start_stalled_upload(server.addr).await;
    wait_partials(&data, "the upload started", |p| p.len() == 1).await;
    drop(s);
    wait_partials(&data, "the partial file is removed", |p| p.is_empty()).await;
    let stored = std::fs::read_dir(data.join("files")).unwrap().count();
    assert_eq!(stored, 0, "no file was stored");
}

/// A guest WebSocket from the loopback address `from`; answers the `join` of `room`
/// with the error code, if any.
async fn join_from(from: &str, addr: SocketAddr, user: &str, room: &str) -> Option<String> {
    let stream = connect_from(from, addr).await;
    let url = format!("ws://{addr}/ws?user={user}");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let join = format!(r#"{{"type":"join","id":7,"room":"{room}"}}"#);
    ws.send(tokio_tungstenite::tungstenite::Message::text(join))
        .await
        .expect("send join");
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .expect("an answer to join")
            .expect("open")
            .expect("frame");
        let Ok(text) = msg.to_text() else { continue };
        let v: Value = serde_json::from_str(text).unwrap_or_default();
        if v["id"] == 7 {
            return match v["type"].as_str() {
                Some("ok") => None,
                _ => Some(v["code"].as_str().unwrap_or("?").to_string()),
            };
        }
    }
}

#[tokio::test]
async fn room_creation_is_limited_per_address_and_for_the_whole_server() {
    let server = TestServer::with(|c| {
        c.room_create_per_ip_per_min = 3;
        c.room_create_per_min = 5;
    })
    .await;
    let alice = server.connect("alice").await;
    for room in ["r1", "r2", "r3"] {
        alice.join(room).await.unwrap();
    }
    // Other names from the same address don't help.
    let mallory = server.connect("mallory").await;
    assert_eq!(
        error_code(mallory.join("r4").await.unwrap_err()),
        ErrorCode::RateLimited
    );
    // Joining rooms that exist is not creating.
    mallory.join("r1").await.unwrap();
    let a = server.addr;
    // Another address has its own bucket, until the server's is empty.
    assert_eq!(join_from("127.0.0.2", a, "bob", "s1").await, None);
    assert_eq!(join_from("127.0.0.2", a, "bob", "s2").await, None);
    assert_eq!(
        join_from("127.0.0.2", a, "bob", "s3").await.as_deref(),
        Some("rate_limited")
    );
    assert_eq!(join_from("127.0.0.3", a, "carol", "r2").await, None);
}

#[tokio::test]
async fn the_room_list_comes_in_pages_with_a_cursor() {
    let server = TestServer::with(|c| c.room_create_per_ip_per_min = 1000).await;
    let alice = server.connect("alice").await;
    let mut names: Vec<String> = (0..105).map(|i| format!("room-{i:03}")).collect();
    for n in &names {
        alice.join(n).await.unwrap();
    }
    names.sort();
    let page = |q: String| {
        let url = server.http(&format!("/api/rooms?user=alice{q}"));
        async move {
            let r = http().get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = page(String::new()).await;
    assert_eq!(status, 200);
    assert_eq!(
        first["rooms"].as_array().unwrap().len(),
        100,
        "default page"
    );
    assert_eq!(first["next"], "room-099");

    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..20 {
        let (status, p) = page(format!("&limit=30{after}")).await;
        assert_eq!(status, 200);
        for r in p["rooms"].as_array().unwrap() {
            seen.push(r["name"].as_str().unwrap().to_string());
            assert_eq!(r["members"], 1);
        }
        match p["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, names, "every room once, in order");

    for bad in ["&limit=0", "&limit=501", "&limit=x"] {
        let (status, v) = page(bad.to_string()).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(v["code"], "bad_request");
    }
    assert_eq!(
        page("&limit=500".into()).await.1["rooms"]
            .as_array()
            .unwrap()
            .len(),
        105
    );
}

/// Every accepted connection sends small writes at once. With Nagle's algorithm on, a
/// frame written while an earlier one was unacknowledged waited for the client's next
/// packet or its delayed acknowledgement: at 100 direct messages a second per user, acks
/// took 10 ms at the median instead of 2 (BENCHMARKS.md, round 6).
#[tokio::test]
async fn accepted_connections_send_small_frames_without_delay() {
    let server = TestServer::start().await;
    let mut client = connect_from("127.0.0.1", server.addr).await;
    let host = server.addr.to_string();
    let keep_alive = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
    client
        .write_all(keep_alive.as_bytes())
        .await
        .expect("write");
    let (status, _) = read_response(&mut client).await.expect("an answer");
    assert_eq!(status, 200);
    let local = client.local_addr().expect("client address");
    let server_side: Vec<bool> = common::tcp_sockets_of_this_process()
        .iter()
        .filter(|s| s.local_addr().ok() == Some(server.addr) && s.peer_addr().ok() == Some(local))
        .map(|s| s.nodelay().expect("read TCP_NODELAY"))
        .collect();
    assert_eq!(server_side, [true], "the server's end of the connection");
}
