//! Protocol conformance and abuse: broken WebSocket frames are closed with the code RFC
//! 6455 names, one user cannot knock another offline with signals, control frames count
//! against the frame rate limit, and out-of-range seqs are bad requests that show no
//! internal error text.

mod common;

use std::time::Duration;

use common::{error_code, http, TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use hubbub_protocol::{ClientFrame, ErrorCode, SignalKind};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket connection without the client library: it reads only when told to.
async fn raw(server: &TestServer, user: &str) -> Raw {
    let url = format!("{}/ws?user={user}", server.url());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect");
    ws
}

/// One client frame (masked, as RFC 6455 requires of clients), written as raw bytes.
fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads until the server's close frame; returns its code. Panics on a timeout or when
/// the connection ends without one.
async fn close_code(ws: &mut Raw) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no close frame within {WAIT:?}"),
            Ok(Some(Ok(Message::Close(Some(c))))) => return c.code.into(),
            Ok(Some(Ok(Message::Close(None)))) => panic!("a close frame without a code"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("the connection failed before a close frame: {e}"),
            Ok(None) => panic!("the connection ended without a close frame"),
        }
    }
}

/// Writes raw bytes on the connection, after its handshake.
async fn write_raw(ws: &mut Raw, bytes: &[u8]) {
    match ws.get_mut() {
        MaybeTlsStream::Plain(tcp) => tcp.write_all(bytes).await.expect("write"),
        _ => unreachable!("loopback connections are plain TCP"),
    }
}

#[tokio::test]
async fn a_broken_close_frame_is_answered_with_1002_and_an_invalid_utf8_one_with_1007() {
    let server = TestServer::start().await;
    let long_reason = [&1000u16.to_be_bytes()[..], &[b'a'; 124][..]].concat();
    let bad_utf8 = [&1000u16.to_be_bytes()[..], &[0xce, 0xba, 0xff, 0xfe][..]].concat();
    let cases: [(&str, Vec<u8>, u16); 3] = [
        ("a 1-byte close payload", vec![b'a'], 1002),
        ("a close reason over 123 bytes", long_reason, 1002),
        ("a close reason that is not UTF-8", bad_utf8, 1007),
    ];
    for (what, payload, want) in cases {
        let mut ws = raw(&server, "closer").await;
        write_raw(&mut ws, &masked_frame(0x88, &payload)).await;
        assert_eq!(close_code(&mut ws).await, want, "{what}");
    }
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_is_closed_with_1007_and_a_protocol_violation_with_1002() {
    let server = TestServer::start().await;
    let mut ws = raw(&server, "writer").await;
    write_raw(&mut ws, &masked_frame(0x81, &[b'{', 0xc0, 0xaf, b'}'])).await;
    assert_eq!(close_code(&mut ws).await, 1007, "invalid UTF-8 text");

    // A reserved bit set without an extension that defines it.
    let mut ws = raw(&server, "writer").await;
    write_raw(&mut ws, &masked_frame(0x81 | 0x40, b"{}")).await;
    assert_eq!(close_code(&mut ws).await, 1002, "a reserved bit");

    // A continuation frame with no message to continue.
    let mut ws = raw(&server, "writer").await;
    write_raw(&mut ws, &masked_frame(0x80, b"x")).await;
    assert_eq!(close_code(&mut ws).await, 1002, "a stray continuation");
}

#[tokio::test]
async fn a_flood_of_pings_is_closed_with_1008() {
    let server = TestServer::with(|c| {
        c.frame_burst = 20;
        c.frame_rate_per_sec = 1;
        c.rate_limit_strikes = 5;
    })
    .await;
    let mut ws = raw(&server, "pinger").await;
    for i in 0..200u32 {
        ws.feed(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await
            .expect("send ping");
    }
    ws.flush().await.expect("flush");
    assert_eq!(close_code(&mut ws).await, 1008);
    // Others are unaffected.
    let other = server.connect("other").await;
    other.ping().await.unwrap();
}

fn signal(to: &str, data: Value) -> ClientFrame {
    ClientFrame::Signal {
        id: None,
        to: to.into(),
        call_id: "call-1".into(),
        kind: SignalKind::Candidate,
        data,
    }
}

#[tokio::test]
async fn signal_data_is_capped_in_size_and_budgeted_per_sender_and_recipient() {
    let server = TestServer::with(|c| {
        c.max_signal_bytes = 1000;
        c.signal_burst_bytes = 3000;
        c.signal_bytes_per_sec = 1;
    })
    .await;
    let alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    let carol = server.connect("carol").await;
    for c in [&alice, &bob, &carol] {
        c.join("call").await.unwrap();
    }
    // 998 characters and two quotes: exactly the limit.
    let at_limit = json!("x".repeat(998));
    let over = json!("x".repeat(999));
    assert_eq!(
        error_code(alice.request(signal("bob", over)).await.unwrap_err()),
        ErrorCode::TooLarge
    );
    for _ in 0..3 {
        alice
            .send_no_reply(signal("bob", at_limit.clone()))
            .await
            .unwrap();
    }
    alice.ping().await.unwrap();
    assert_eq!(
        error_code(
            alice
                .request(signal("bob", at_limit.clone()))
                .await
                .unwrap_err()
        ),
        ErrorCode::RateLimited,
        "the burst is spent"
    );
    // Another recipient, and another sender, have budgets of their own.
    alice
        .send_no_reply(signal("carol", at_limit.clone()))
        .await
        .unwrap();
    carol
        .send_no_reply(signal("bob", at_limit.clone()))
        .await
        .unwrap();
    alice.ping().await.unwrap();
    carol.ping().await.unwrap();
}

#[tokio::test]
async fn a_flood_of_signals_does_not_knock_the_recipient_offline() {
    // The victim reads nothing while the flood lasts (a phone on a slow link): before,
    // the flood filled its queue and closed it as a slow consumer.
    let server = TestServer::with(|c| c.queue_frames = 16).await;
    let mut victim = raw(&server, "victim").await;
    victim
        .send(Message::text(r#"{"type":"join","id":"j","room":"call"}"#))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, victim.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""id":"j""#) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("the victim's join got no answer: {other:?}"),
        }
    }
    let attacker = server.connect("attacker").await;
    attacker.join("call").await.unwrap();
    // Each signal just under the 64 KiB frame limit.
    let big = json!("x".repeat(60_000));
    let small = json!("x".repeat(16_000));
    let flood = std::time::Instant::now();
    for i in 0..200 {
        let data = if i % 2 == 0 {
            big.clone()
        } else {
            small.clone()
        };
        attacker
            .send_no_reply(signal("victim", data))
            .await
            .unwrap();
    }
    // Every signal is handled once the ping is answered.
    attacker.ping().await.unwrap();
    let took = flood.elapsed().as_secs_f64();

    // The victim reads again: no close, and it still answers.
    victim
        .send(Message::text(r#"{"type":"ping","id":"after"}"#))
        .await
        .unwrap();
    let mut signals = 0;
    // A bound, not a wait: the frames are all there; reading them is slow under load.
    let deadline = tokio::time::Instant::now() + 3 * WAIT;
    loop {
        match tokio::time::timeout_at(deadline, victim.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                signals += t.matches(r#""type":"signal""#).count();
                if t.contains(r#""id":"after""#) {
                    break;
                }
            }
            Ok(Some(Ok(Message::Close(c)))) => panic!("the victim was closed: {c:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("the victim's connection failed: {other:?}"),
        }
    }
    // The burst (256 KiB) of 16 KB signals, and what the budget (64 KiB/s) refilled
    // while the flood lasted; none of the 60 KB ones.
    let most = 16 + (took * 65_536.0 / 16_002.0).ceil() as usize;
    assert!(
        (16..=most).contains(&signals),
        "{signals} signals delivered (at most {most} in {took:.2} s)"
    );
}

const HUGE: u64 = u64::MAX;

#[tokio::test]
async fn a_seq_beyond_the_stored_range_is_a_bad_request_on_every_path() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    alice.join("big").await.unwrap();
    alice.send_text("room:big", "one").await.unwrap();
    let conv = "room:big".to_string();
    let frames = [
        ClientFrame::History {
            id: None,
            conv: conv.clone(),
            before_seq: Some(HUGE),
            after_seq: None,
            limit: None,
        },
        ClientFrame::History {
            id: None,
            conv: conv.clone(),
            before_seq: None,
            after_seq: Some(HUGE),
            limit: None,
        },
        ClientFrame::Sync {
            id: None,
            cursors: [(conv.clone(), HUGE)].into(),
            limit: None,
            since: None,
        },
        ClientFrame::Read {
            id: None,
            conv: conv.clone(),
            seq: HUGE,
        },
        ClientFrame::Recall {
            id: None,
            conv: conv.clone(),
            seq: HUGE,
        },
        ClientFrame::Edit {
            id: None,
            conv: conv.clone(),
            seq: HUGE,
            content: json!("edited"),
        },
    ];
    for frame in frames {
        let what = frame.type_name();
        match alice.request(frame).await {
            Err(hubbub_client::ClientError::Server(e)) => {
                assert_eq!(e.code, ErrorCode::BadRequest, "{what}: {}", e.message);
                assert!(e.message.contains("at most"), "{what}: {}", e.message);
            }
            other => panic!("{what}: expected bad_request, got {other:?}"),
        }
    }
    // The largest stored seq is still a valid cursor.
    let max = i64::MAX as u64;
    let page = alice
        .history("room:big", Some(max), None, None)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);

    for param in ["before_seq", "after_seq"] {
        let url = server.http(&format!(
            "/api/conversations/room:big/messages?user=alice&{param}={HUGE}"
        ));
        let r = http().get(url).send().await.unwrap();
        assert_eq!(r.status(), 400, "{param}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "bad_request", "{param}: {body}");
    }
    alice.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_shows_clients_a_generic_message_and_no_driver_text() {
    let server = TestServer::with(|c| c.store_busy_timeout_ms = 300).await;
    let alice = server.connect("alice").await;
    alice.join("ops").await.unwrap();
    // Another process takes the database's write lock until told to let go.
    let db = server.dir.path().join("hubbub.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let locker = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(10));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv_timeout(WAIT).expect("the lock is taken");

    match alice.send_text("room:ops", "during").await {
        Err(hubbub_client::ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
            // SQLite says "database is locked".
            assert!(!e.message.contains("locked"), "{}", e.message);
            assert!(!e.message.contains("database"), "{}", e.message);
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    let r = http().get(server.http("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    assert!(
        !body["message"].as_str().unwrap().contains("locked"),
        "{body}"
    );
    release_tx.send(()).unwrap();
    locker.join().unwrap();
}
