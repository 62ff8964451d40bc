//! The client library's reconnecting `Session` against a server that goes away and
//! comes back: every message is reported once, in order, none missing.

mod common;

use std::time::Duration;

use common::TestServer;
use hubbub_client::{ConnectOptions, Session, SessionEvent};
use hubbub_protocol::ServerFrame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reconnects_and_catches_up_without_duplicates() {
    let server = TestServer::start().await;
    let mut alice = Session::connect(ConnectOptions::guest(server.url(), "alice"))
        .await
        .unwrap();
    alice.client().unwrap().join("team").await.unwrap();
    alice.follow("room:team", 0);
    let bob = server.connect("bob").await;
    bob.join("team").await.unwrap();
    for i in 1..=3 {
        bob.send_text("room:team", &format!("live {i}"))
            .await
            .unwrap();
    }

    let mut seen = Vec::new();
    let mut disconnects = 0;
    let mut reconnects = 0;
    let mut server = Some(server);
    let mut bob = Some(bob);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 8 {
        assert!(tokio::time::Instant::now() < deadline, "seen only {seen:?}");
        // Short polls, as a UI loop does: reconnecting must not depend on long waits.
        let event = match alice.next(Duration::from_millis(50)).await {
            Err(hubbub_client::ClientError::Timeout) => continue,
            other => other.unwrap(),
        };
        match event {
            SessionEvent::Frame(ServerFrame::Message(m)) => {
                seen.push(m.seq);
                if m.seq == 3 {
                    // The server goes away; while alice is out, bob sends 5 more.
                    drop(bob.take());
                    let restarted = server.take().unwrap().restart().await;
                    let b = restarted.connect("bob").await;
                    for i in 4..=8 {
                        b.send_text("room:team", &format!("missed {i}"))
                            .await
                            .unwrap();
                    }
                    bob = Some(b);
                    server = Some(restarted);
                }
            }
            SessionEvent::Frame(_) => {}
            SessionEvent::Disconnected(_) => disconnects += 1,
            SessionEvent::Reconnected { .. } => reconnects += 1,
        }
    }
    assert_eq!(seen, (1..=8).collect::<Vec<_>>(), "each once, in order");
    assert_eq!((disconnects, reconnects), (1, 1));
    assert_eq!(alice.cursors()["room:team"], 8);
    // Live delivery continues on the new connection.
    bob.as_ref()
        .unwrap()
        .send_text("room:team", "after")
        .await
        .unwrap();
    loop {
        if let SessionEvent::Frame(ServerFrame::Message(m)) =
            alice.next(Duration::from_secs(5)).await.unwrap()
        {
            assert_eq!(m.seq, 9);
            break;
        }
    }
}
