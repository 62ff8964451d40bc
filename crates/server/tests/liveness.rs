//! Stories about dead and slow peers: heartbeats and slow consumers.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use futures_util::StreamExt;
use hubbub_client::ClientError;
use hubbub_protocol::ServerFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_silent_client_is_closed_after_two_and_a_half_heartbeats() {
    let server = TestServer::with(|c| c.heartbeat_ms = 100).await;
    // A raw socket that upgrades and then never answers pings nor sends anything.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /ws?user=ghost HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut total = Vec::new();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server never closed the silent connection"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "closed too early: {elapsed:?}"
    );
    let head = String::from_utf8_lossy(&total);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let server = TestServer::with(|c| c.heartbeat_ms = 50).await;
    let mut alice = server.connect("alice").await;
    // Ten heartbeats pass; the client library answers the pings while it reads.
    let waited = alice
        .wait_for(Duration::from_millis(500), |f| {
            matches!(f, ServerFrame::Kicked { .. })
        })
        .await;
    assert!(matches!(waited, Err(ClientError::Timeout)), "{waited:?}");
    alice.ping().await.expect("still connected");
}

#[tokio::test]
async fn a_pause_of_the_whole_process_is_not_taken_for_the_peers_silence() {
    let server = TestServer::with(|c| c.heartbeat_ms = 50).await;
    let mut alice = server.connect("alice").await;
    // The server and the client share this thread: blocking it pauses both, as a
    // descheduled or swapping process would. No ping could go out meanwhile, so the
    // peer was not silent; it must get its chance to answer the next one.
    std::thread::sleep(Duration::from_millis(300));
    let waited = alice
        .wait_for(Duration::from_millis(300), |f| {
            matches!(f, ServerFrame::Kicked { .. })
        })
        .await;
    assert!(matches!(waited, Err(ClientError::Timeout)), "{waited:?}");
    alice.ping().await.expect("still connected");
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1008_and_others_are_unaffected() {
    let server = TestServer::with(|c| {
        c.queue_frames = 16;
        c.send_burst = 10_000;
        c.send_rate_per_sec = 10_000;
        // Alice's 800 sends must not meet the frame limit either, however fast they go
        // (the default burst of 400 plus 200/s ran out on a fast machine).
        c.frame_burst = 10_000;
        c.frame_rate_per_sec = 10_000;
    })
    .await;
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("firehose").await.unwrap();
    bob.join("firehose").await.unwrap();

    // The slow one joins, then stops reading.
    // A small receive buffer, so that the kernel cannot hide the backlog.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async(format!("{}/ws?user=slowpoke", server.url()), stream)
            .await
            .unwrap();
    let join = r#"{"type":"join","id":"j","room":"firehose"}"#;
    futures_util::SinkExt::send(&mut slow, Message::text(join))
        .await
        .unwrap();
    // Wait until the join is acknowledged (read just that far).
    let deadline = Instant::now() + WAIT;
    'joined: while Instant::now() < deadline {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(WAIT, slow.next()).await.unwrap()
        else {
            panic!("slow client lost before joining");
        };
        for line in t.as_str().split('\n') {
            if line.contains(r#""type":"ok""#) {
                break 'joined;
            }
        }
    }

    let text = "z".repeat(16_000);
    const N: u64 = 800;
    let send_all = async {
        for i in 0..N {
            let sent = alice
                .send_text("room:firehose", &text)
                .await
                .expect("alice is never blocked");
            assert_eq!(sent.seq, i + 1);
        }
        // Bob got every message, in order.
        expect_messages(&mut bob, N).await;
    };
    // The slow client reads again once the server has given up on it (the close frame
    // waits behind what the server had written before; it must be read in time).
    let read_close = async {
        let mut waited = 0;
        while server.metric("hubbub_slow_consumer_closes_total").await < 1.0 {
            waited += 1;
            assert!(waited < 600, "the slow client was never closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = slow.next().await {
                match msg {
                    Ok(Message::Close(Some(frame))) => {
                        return Some((u16::from(frame.code), frame.reason.to_string()))
                    }
                    Ok(Message::Close(None)) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
            None
        })
        .await
        .expect("slow client was not closed")
    };
    let ((), code) = tokio::join!(send_all, read_close);
    assert_eq!(code, Some((1008, "slow consumer".to_string())));
    // And nothing was lost for it: history has all N.
    let page = alice
        .history("room:firehose", None, Some(0), Some(200))
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 200);
    assert!(page.has_more);
}

#[tokio::test]
async fn a_burst_during_the_write_linger_is_written_not_dropped() {
    // A long linger and a short queue: a burst that arrives while a session lingers must
    // end the linger early rather than fill the queue and close the session.
    let server = TestServer::with(|c| {
        c.queue_frames = 8;
        c.write_linger_ms = 300;
        c.send_burst = 10_000;
        c.send_rate_per_sec = 10_000;
    })
    .await;
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("burst").await.unwrap();
    bob.join("burst").await.unwrap();
    const N: u64 = 40;
    // One at a time, so each is its own commit and push (a burst larger than the queue
    // within one commit would overflow it whatever the linger): all of them arrive well
    // within one linger.
    let started = Instant::now();
    for i in 0..N {
        alice
            .send_text("room:burst", &format!("m{i}"))
            .await
            .unwrap();
    }
    let took = started.elapsed();
    expect_messages(&mut bob, N).await;
    bob.ping().await.expect("bob is still connected");
    // Otherwise the test proved nothing about the linger.
    assert!(
        took < Duration::from_millis(300 * N / 16),
        "sending took {took:?}"
    );
}

/// Waits for messages with seq 1..=n, in order.
async fn expect_messages(client: &mut hubbub_client::Client, n: u64) {
    for i in 0..n {
        let f = client
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
            .await
            .unwrap_or_else(|e| panic!("missed message {}: {e:?}", i + 1));
        let ServerFrame::Message(m) = f else {
            unreachable!()
        };
        assert_eq!(m.seq, i + 1);
    }
}

/// A server whose write linger grows from 5 ms to 300 ms.
async fn lingering_server() -> TestServer {
    TestServer::with(|c| {
        common::unlimited(c);
        c.write_linger_ms = 5;
        c.write_linger_max_ms = 300;
    })
    .await
}

/// `client` sends `n` messages to room `busy`, one every 5 ms.
async fn send_every_5_ms(client: &hubbub_client::Client, n: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..n {
        tick.tick().await;
        client
            .send_text("room:busy", &format!("m{i}"))
            .await
            .unwrap();
    }
}

/// Reads `n` messages from a raw WebSocket; returns how many WebSocket frames carried
/// them.
async fn frames_for(ws: &mut common::RawWs, n: usize) -> usize {
    let (mut got, mut frames) = (0, 0);
    tokio::time::timeout(WAIT, async {
        while got < n {
            let Some(Ok(Message::Text(t))) = ws.next().await else {
                panic!("connection ended with {got} of {n} messages");
            };
            let messages = t
                .as_str()
                .split('\n')
                .filter(|l| l.starts_with(r#"{"type":"message""#))
                .count();
            got += messages;
            frames += usize::from(messages > 0);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("got {got} of {n} messages"));
    frames
}

#[tokio::test]
async fn a_busy_member_is_written_less_often_and_a_quiet_one_at_once() {
    // The linger grows with the rate a connection is written at: a member getting a
    // message every 5 ms is soon written only every 300 ms (many messages per frame),
    // where a fixed 5 ms linger wrote nearly every message alone.
    let server = lingering_server().await;
    let alice = server.connect("alice").await;
    alice.join("busy").await.unwrap();
    let bob = server.connect("bob").await;
    bob.join("busy").await.unwrap();
    drop(bob);
    let mut raw = server.raw_ws("bob").await;
    const N: usize = 100;
    let (frames, ()) = tokio::join!(frames_for(&mut raw, N), send_every_5_ms(&alice, N));
    assert!(frames * 3 <= N, "{N} messages came in {frames} frames");
    // After a pause, the next message is written at once, not after a linger.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    alice.send_text("room:busy", "after a pause").await.unwrap();
    assert_eq!(frames_for(&mut raw, 1).await, 1);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(150), "took {took:?}");
}

#[tokio::test]
async fn a_busy_protobuf_member_gets_the_frames_of_one_linger_in_one_write() {
    // Protobuf carries one message per binary frame; the frames queued during a linger
    // still go out with one write (counted by hubbub_frames_out_total), not one each.
    let server = lingering_server().await;
    let alice = server.connect("alice").await;
    alice.join("busy").await.unwrap();
    let mut bob = server
        .connect_opts(hubbub_client::ConnectOptions::guest(server.url(), "bob").protobuf())
        .await;
    bob.join("busy").await.unwrap();
    let before = server.metric("hubbub_frames_out_total").await;
    const N: u64 = 60;
    send_every_5_ms(&alice, N as usize).await;
    expect_messages(&mut bob, N).await;
    let writes = server.metric("hubbub_frames_out_total").await - before;
    // Alice waits for each `ok`: N writes to her; bob's N messages share a few.
    assert!(
        writes <= (N + N / 3) as f64,
        "{writes} writes for {N} messages"
    );
}
