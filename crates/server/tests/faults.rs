//! Faults: an unavailable store, clients that stall mid-frame. The server keeps serving
//! everyone else, loses nothing it acknowledged, and recovers by itself.

mod common;

use std::time::{Duration, Instant};

use common::{http, unlimited, TestServer, WAIT};
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

/// PostgreSQL crashes under load (an immediate stop: its kill -9) and comes back: while
/// it is gone `/readyz` is 503 and sends get `unavailable`; nothing acknowledged is
/// lost; service resumes by itself; seqs stay gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_under_load_loses_no_acked_message_and_service_resumes() {
    let mut server = TestServer::with_postgres(unlimited).await;
    let alice = std::sync::Arc::new(server.connect("alice").await);
    alice.join("ops").await.unwrap();
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(String, u64)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (alice, acked, stop) = (alice.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failures = 0;
            for i in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let text = format!("m{i}");
                match alice.send_text("room:ops", &text).await {
                    Ok(s) => acked.lock().push((text, s.seq)),
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        })
    };
    let deadline = Instant::now() + WAIT;
    while acked.lock().len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(acked.lock().len() >= 100, "the load is real");
    let mut pg = server.pg.take().expect("a postgres server");
    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop_immediate();
        pg
    })
    .await
    .unwrap();
    assert_eq!(readyz(&server).await, 503, "not ready without the database");
    let during = acked.lock().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        acked.lock().len() <= during + 1,
        "nothing is acked without the database"
    );
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    server.pg = Some(pg);
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(&server).await != 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(readyz(&server).await, 200, "ready again by itself");
    let before = acked.lock().len();
    let deadline = Instant::now() + WAIT;
    while acked.lock().len() < before + 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = sender.await.unwrap();
    assert!(
        failures > 0,
        "some sends failed while the database was down"
    );
    assert!(acked.lock().len() >= before + 50, "sends are acked again");

    let page = alice
        .history("room:ops", None, Some(0), Some(200))
        .await
        .unwrap();
    let mut stored = page.messages;
    let mut after = stored.last().map_or(0, |m| m.seq);
    for _ in 0..1000 {
        let more = alice
            .history("room:ops", None, Some(after), Some(200))
            .await
            .unwrap();
        if more.messages.is_empty() {
            break;
        }
        after = more.messages.last().unwrap().seq;
        stored.extend(more.messages);
    }
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gapless");
    let by_text: std::collections::HashMap<String, u64> = stored
        .iter()
        .map(|m| {
            (
                m.content.clone().unwrap().as_str().unwrap().to_string(),
                m.seq,
            )
        })
        .collect();
    for (text, seq) in acked.lock().iter() {
        assert_eq!(
            by_text.get(text),
            Some(seq),
            "acked {text} is stored as seq {seq}"
        );
    }
}
