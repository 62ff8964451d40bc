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

/// Takes `user`'s default-device session over with another connection (the session in
/// use is kicked with 4001), waits until `session` reports the disconnect, then lets
/// the other connection go. `session` stays away until it is polled again.
async fn cut_off(server: &TestServer, user: &str, session: &mut Session) {
    let other = server.connect(user).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no disconnect");
        match session.next(Duration::from_secs(1)).await {
            Ok(SessionEvent::Disconnected(_)) => break,
            Ok(SessionEvent::Frame(ServerFrame::Message(m))) => {
                panic!("unexpected message before the cut: {m:?}")
            }
            Ok(_) | Err(hubbub_client::ClientError::Timeout) => {}
            Err(e) => panic!("session failed: {e}"),
        }
    }
    other.close().await.unwrap();
}

/// Polls `session` until `conv` has delivered `until` (or the deadline passes) and
/// returns the seqs delivered for `conv` in order, and the `missed` counts reported.
async fn collect(session: &mut Session, conv: &str, until: u64) -> (Vec<u64>, Vec<usize>) {
    let mut seen = Vec::new();
    let mut reconnects = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.last().copied().unwrap_or(0) < until && seen.len() < until as usize + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{conv}: seen {} up to {:?}, waiting for {until}",
            seen.len(),
            seen.last()
        );
        match session.next(Duration::from_millis(50)).await {
            Ok(SessionEvent::Frame(ServerFrame::Message(m))) if m.conv == conv => seen.push(m.seq),
            Ok(SessionEvent::Reconnected { missed }) => reconnects.push(missed),
            Ok(_) | Err(hubbub_client::ClientError::Timeout) => {}
            Err(e) => panic!("session failed: {e}"),
        }
    }
    (seen, reconnects)
}

/// The next message `session` delivers for `conv`.
async fn next_message(session: &mut Session, conv: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message in {conv}"
        );
        match session.next(Duration::from_millis(200)).await {
            Ok(SessionEvent::Frame(ServerFrame::Message(m))) if m.conv == conv => return m.seq,
            Ok(_) | Err(hubbub_client::ClientError::Timeout) => {}
            Err(e) => panic!("session failed: {e}"),
        }
    }
}

/// Pages of 100 (a backlog of 1,200 takes twelve `sync` rounds), rate limits lifted.
fn small_pages(c: &mut hubbub_server::Config) {
    c.sync_max = 100;
    c.send_rate_per_sec = 100_000;
    c.send_burst = 100_000;
    c.frame_rate_per_sec = 100_000;
    c.frame_burst = 100_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_catch_up_under_live_traffic_delivers_every_seq_once_in_order() {
    let server = TestServer::with(small_pages).await;
    paged_catch_up_story(&server, &server, 5).await;
}

/// The same with bob's session on one node of a cluster and the senders on another:
/// the backlog, the live messages and the gaps between them cross nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_paged_catch_up_under_live_traffic_from_another_node_delivers_every_seq_once(
) {
    let c = common::cluster_with(2, small_pages).await;
    paged_catch_up_story(&c.nodes[1], &c.nodes[0], 2).await;
}

/// bob's `Session` on `server` is away while alice (on `others`) stores a backlog of
/// 1,200 messages, then reconnects while carol (on `others`) sends every 2 ms.
async fn paged_catch_up_story(server: &TestServer, others: &TestServer, trials: usize) {
    const BACKLOG: u64 = 1200;
    // Live sends per trial at most (1.5 s at one per 2 ms): enough to overlap the
    // reconnect and the whole catch-up, bounded so that a debug build on a busy machine
    // that falls behind (and is closed as a slow consumer) still catches up in time.
    const LIVE: u64 = 750;
    let mut bob = Session::connect(ConnectOptions::guest(server.url(), "bob"))
        .await
        .unwrap();
    let alice = std::sync::Arc::new(others.connect("alice").await);
    let carol = std::sync::Arc::new(others.connect("carol").await);
    for trial in 0..trials {
        let room = format!("paged{trial}");
        let conv = format!("room:{room}");
        bob.client().unwrap().join(&room).await.unwrap();
        bob.follow(&conv, 0);
        alice.join(&room).await.unwrap();
        carol.join(&room).await.unwrap();

        // bob is away while alice stores the backlog (from 8 tasks at once).
        cut_off(server, "bob", &mut bob).await;
        let mut senders = Vec::new();
        for t in 0..8 {
            let (alice, conv) = (alice.clone(), conv.clone());
            senders.push(tokio::spawn(async move {
                for i in 0..BACKLOG / 8 {
                    alice
                        .send_text(&conv, &format!("backlog {t}.{i}"))
                        .await
                        .unwrap();
                }
            }));
        }
        for s in senders {
            s.await.unwrap();
        }

        // While bob reconnects and pages through it, carol sends every 2 ms.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = {
            let (carol, conv, stop) = (carol.clone(), conv.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < LIVE {
                    tick.tick().await;
                    carol.send_text(&conv, "live").await.unwrap();
                    sent += 1;
                }
                sent
            })
        };
        // Live traffic keeps coming until bob has the backlog and 100 live ones.
        let (mut seen, reconnects) = collect(&mut bob, &conv, BACKLOG + 100).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let total = BACKLOG + live.await.unwrap();
        // The rest of the live messages, if the sender got further than bob had seen.
        let (rest, more) = if seen.last().copied().unwrap_or(0) < total {
            collect(&mut bob, &conv, total).await
        } else {
            (Vec::new(), Vec::new())
        };
        seen.extend(rest);
        assert!(
            seen == (1..=total).collect::<Vec<_>>(),
            "trial {trial}: {} delivered of {total}; first out of place: {:?}",
            seen.len(),
            seen.iter().enumerate().find(|(i, s)| **s != *i as u64 + 1)
        );
        println!(
            "trial {trial}: {total} delivered once in order ({} live), {:?} by the catch-up",
            total - BACKLOG,
            reconnects
        );
        assert!(
            reconnects.first().is_some_and(|&n| n >= BACKLOG as usize),
            "trial {trial}: the catch-up brought the backlog: {reconnects:?} {more:?}"
        );
        assert_eq!(bob.cursors()[&conv], total);
        // Nothing repeats afterwards: the next message is the next seq.
        alice.send_text(&conv, "after").await.unwrap();
        assert_eq!(
            next_message(&mut bob, &conv).await,
            total + 1,
            "trial {trial}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_started_while_the_session_was_away_is_caught_up_from_seq_1() {
    let server = TestServer::start().await;
    let mut bob = Session::connect(ConnectOptions::guest(server.url(), "bob"))
        .await
        .unwrap();
    let alice = server.connect("alice").await;
    cut_off(&server, "bob", &mut bob).await;
    for i in 1..=3 {
        alice
            .send_text("dm:alice:bob", &format!("while away {i}"))
            .await
            .unwrap();
    }
    // The catch-up learns of the DM from the `sync` answer and fetches it whole.
    let (seen, reconnects) = collect(&mut bob, "dm:alice:bob", 3).await;
    assert_eq!(seen, [1, 2, 3]);
    assert_eq!(reconnects, [3]);
    alice.send_text("dm:alice:bob", "live").await.unwrap();
    assert_eq!(next_message(&mut bob, "dm:alice:bob").await, 4);
    assert_eq!(bob.cursors()["dm:alice:bob"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_message_after_a_gap_waits_until_the_gap_is_fetched() {
    let server = TestServer::start().await;
    let mut bob = Session::connect(ConnectOptions::guest(server.url(), "bob"))
        .await
        .unwrap();
    let alice = server.connect("alice").await;
    bob.client().unwrap().join("gap").await.unwrap();
    alice.join("gap").await.unwrap();
    bob.follow("room:gap", 0);
    // bob's own sends are answered with an `ok` only, never pushed back to him: for
    // the session they are a gap before alice's next message.
    for i in 1..=2 {
        let sent = bob
            .client()
            .unwrap()
            .send_text("room:gap", &format!("mine {i}"))
            .await
            .unwrap();
        assert_eq!(sent.seq, i);
    }
    alice.send_text("room:gap", "hers").await.unwrap();
    let (seen, _) = collect(&mut bob, "room:gap", 3).await;
    assert_eq!(
        seen,
        [1, 2, 3],
        "the gap first, then the live one, each once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_during_live_traffic_returns_contiguous_pages_and_never_skips() {
    const BACKLOG: u64 = 600;
    let server = TestServer::with(|c| {
        c.sync_max = 50;
        c.send_rate_per_sec = 100_000;
        c.send_burst = 100_000;
        c.frame_rate_per_sec = 100_000;
        c.frame_burst = 100_000;
    })
    .await;
    let alice = server.connect("alice").await;
    let carol = std::sync::Arc::new(server.connect("carol").await);
    let bob = server.connect("bob").await;
    for c in [&alice, &*carol, &bob] {
        c.join("pages").await.unwrap();
    }
    for i in 0..BACKLOG {
        alice
            .send_text("room:pages", &format!("b{i}"))
            .await
            .unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let live = {
        let (carol, stop) = (carol.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 5000 {
                tick.tick().await;
                carol.send_text("room:pages", "live").await.unwrap();
                sent += 1;
            }
        })
    };
    // bob pages through the backlog while carol's messages are pushed to him.
    let mut cursor = 0;
    let mut got = Vec::new();
    for round in 0.. {
        assert!(round < 500, "not caught up after {round} pages");
        let r = bob
            .sync(
                std::collections::BTreeMap::from([("room:pages".to_string(), cursor)]),
                None,
            )
            .await
            .unwrap();
        let seqs: Vec<u64> = r.messages.iter().map(|m| m.seq).collect();
        let next = r.cursors["room:pages"];
        assert!(
            seqs == (cursor + 1..=next).collect::<Vec<_>>(),
            "page {round} after {cursor}: {} messages for a new cursor of {next}, first out \
             of place: {:?}",
            seqs.len(),
            seqs.iter()
                .enumerate()
                .find(|(i, s)| **s != cursor + 1 + *i as u64)
        );
        got.extend(seqs);
        cursor = next;
        if round == 2 {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if r.caught_up && round > 2 {
            break;
        }
    }
    live.await.unwrap();
    assert!(cursor >= BACKLOG);
    assert_eq!(got, (1..=cursor).collect::<Vec<_>>());
}
