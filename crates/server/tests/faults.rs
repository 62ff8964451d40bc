//! Faults: an unavailable store, clients that stall mid-frame. The server keeps serving
//! everyone else, loses nothing it acknowledged, and recovers by itself.

mod common;

use std::time::{Duration, Instant};

use common::{http, TestServer, WAIT};
use hubbub_client::ClientError;
use hubbub_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn readyz(server: &TestServer) -> u16 {
    http()
        .get(server.http("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_fails_sends_and_readiness_then_service_resumes() {
    let server = TestServer::with(|c| c.store_busy_timeout_ms = 500).await;
    let alice = server.connect("alice").await;
    alice.join("ops").await.unwrap();
    assert_eq!(alice.send_text("room:ops", "before").await.unwrap().seq, 1);
    assert_eq!(readyz(&server).await, 200);
    // Bob has been here before (a new guest name is recorded in the store, a write).
    server.connect("bob").await.close().await.ok();

    // Another process takes the database's write lock and keeps it.
    let db = server.dir.path().join("hubbub.db");
    let locker = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        std::thread::sleep(Duration::from_secs(3));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(
        readyz(&server).await,
        503,
        "not ready while the store cannot write"
    );
    let start = Instant::now();
    let failed = alice.send_text("room:ops", "during").await;
    match failed {
        Err(ClientError::Server(e)) => {
            assert!(
                matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal),
                "{e:?}"
            )
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    // Others are still served meanwhile: connecting and reads do not need the write lock.
    let bob = server.connect("bob").await;
    bob.join("ops").await.ok();
    locker.join().unwrap();

    // Back by itself: ready again, and the failed send left no gap.
    let mut ready = false;
    for _ in 0..50 {
        if readyz(&server).await == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "readiness comes back");
    assert_eq!(alice.send_text("room:ops", "after").await.unwrap().seq, 2);
    let page = alice.history("room:ops", None, None, None).await.unwrap();
    let texts: Vec<_> = page
        .messages
        .iter()
        .map(|m| (m.seq, m.content.clone().unwrap()))
        .collect();
    assert_eq!(
        texts,
        vec![(1, "before".into()), (2, "after".into())],
        "nothing acked lost, nothing unacked stored"
    );
}

/// Sends a WebSocket upgrade by hand, then only half of a frame, and waits.
#[tokio::test]
async fn a_client_that_stalls_mid_frame_is_closed_on_time_and_others_are_served() {
    let server = TestServer::with(|c| c.heartbeat_ms = 200).await;
    let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /ws?user=staller HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // A masked text frame header announcing 100 bytes, then 3 of them, then nothing.
    raw.write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4, b'a', b'b', b'c'])
        .await
        .unwrap();

    let alice = server.connect("alice").await;
    let started = Instant::now();
    // The server closes the stalled connection: reads reach EOF (after any frames it sent).
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled client was not closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Meanwhile and after, others are served normally.
    alice.ping().await.unwrap();
    alice.join("fine").await.unwrap();
}
