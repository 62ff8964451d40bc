//! Membership and delivery share one order: the store's commit order. Stories of joins
//! and leaves racing with messages and with each other, run many times.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cluster, error_code, http, unlimited, TestServer, WAIT};
use hubbub_client::{Client, Event};
use hubbub_protocol::{ErrorCode, ServerFrame};

/// Sends text to `conv` from `senders` concurrent loops until `stop`, recording the
/// highest acked seq in `acked`; returns it.
fn keep_sending(
    alice: Arc<Client>,
    conv: String,
    senders: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let loops = (0..senders).map(|_| {
            let (alice, conv, stop, acked) =
                (alice.clone(), conv.clone(), stop.clone(), acked.clone());
            async move {
                let mut last = 0;
                // Bounded: at most 20,000 sends per loop.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = alice.send_text(&conv, "x").await.expect("send");
                    last = last.max(sent.seq);
                    acked.fetch_max(sent.seq, Ordering::Relaxed);
                }
                last
            }
        });
        futures_util::future::join_all(loops)
            .await
            .into_iter()
            .max()
            .unwrap_or(0)
    })
}

/// The seqs of `conv` pushed to `client` until `last` arrives.
async fn seqs_until(client: &mut Client, conv: &str, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seqs.last() != Some(&last) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event(left).await {
            Ok(Event::Frame(ServerFrame::Message(m))) if m.conv == conv => seqs.push(m.seq),
            Ok(_) => {}
            Err(e) => panic!("waiting for seq {last} of {conv}: {e:?}; got {seqs:?}"),
        }
    }
    seqs
}

/// alice sends without pause while bob joins. Every message after the `last_seq` of
/// bob's join is pushed to him, once and in order, also when the join and a message
/// share a commit batch (that message used to be lost to him in 1 or 2 of 30 trials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_after_a_join_reaches_the_joiner() {
    let server = TestServer::with(unlimited).await;
    joiner_story(&server, &server, 30).await;
}

/// The same with alice on one node of a cluster and bob on another: the join and the
/// messages reach bob's node in no set order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_every_message_after_a_join_reaches_a_joiner_on_another_node() {
    let c = cluster(2).await;
    joiner_story(&c.nodes[0], &c.nodes[1], 20).await;
}

/// alice (on `a`) sends without pause while bob (on `b`) joins, `trials` times.
async fn joiner_story(a: &TestServer, b: &TestServer, trials: u64) {
    let alice = Arc::new(a.connect("alice").await);
    let mut bob = b.connect("bob").await;
    for trial in 0..trials {
        let room = format!("busy{trial}");
        let conv = format!("room:{room}");
        alice.join(&room).await.expect("alice joins");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let sender = keep_sending(alice.clone(), conv.clone(), 4, stop.clone(), acked.clone());
        // Let the traffic run a little before the join, varying by trial.
        alice.send_text(&conv, "warm-up").await.expect("send");
        tokio::time::sleep(Duration::from_millis(trial % 7)).await;
        let joined = bob.join(&room).await.expect("bob joins");
        let from = joined["last_seq"].as_u64().expect("last_seq") + 1;
        // Some more traffic after the join, then stop.
        let deadline = tokio::time::Instant::now() + WAIT;
        while acked.load(Ordering::Relaxed) < from + 20 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let last = sender.await.expect("sender");
        assert!(last >= from, "trial {trial}: no message after the join");
        let got = seqs_until(&mut bob, &conv, last).await;
        let want: Vec<u64> = (from..=last).collect();
        assert_eq!(got, want, "trial {trial}: bob joined at {}", from - 1);
    }
}

/// Whether the store lists `conv` among `user`'s conversations.
async fn store_says_member(server: &TestServer, user: &str, conv: &str) -> bool {
    let v: serde_json::Value = http()
        .get(server.http(&format!("/api/conversations?user={user}")))
        .send()
        .await
        .expect("conversations")
        .json()
        .await
        .expect("json");
    v["conversations"]
        .as_array()
        .expect("list")
        .iter()
        .any(|c| c["conv"] == conv)
}

/// bob leaves on his phone while he joins again on his laptop. However the two land,
/// the member list the server acts on agrees with the store: a send is accepted exactly
/// when the store says bob is a member, and room messages reach him exactly then. (In
/// 15 of 60 trials they used to disagree until a restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_and_a_join_at_once_leave_the_server_agreeing_with_the_store() {
    let server = TestServer::start().await;
    leave_and_join_story(&server, &server, 60).await;
}

/// The same with bob's phone on one node of a cluster and his laptop on another: each
/// node hears of the other's change after its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_leave_and_a_join_at_once_on_two_nodes_leave_both_agreeing_with_the_store() {
    let c = cluster(2).await;
    leave_and_join_story(&c.nodes[0], &c.nodes[1], 40).await;
}

/// bob leaves on his phone (on `a`, with alice) while he joins on his laptop (on `b`).
async fn leave_and_join_story(a: &TestServer, b: &TestServer, trials: u64) {
    let alice = a.connect("alice").await;
    let phone = a.connect_device("bob", "phone").await;
    let mut laptop = b.connect_device("bob", "laptop").await;
    let (mut members, mut outsiders) = (0, 0);
    for trial in 0..trials {
        let room = format!("flip{trial}");
        let conv = format!("room:{room}");
        alice.join(&room).await.expect("alice joins");
        phone.join(&room).await.expect("bob joins");
        let (left, joined) = tokio::join!(phone.leave(&room), laptop.join(&room));
        left.expect("leave");
        joined.expect("join");
        let member = store_says_member(b, "bob", &conv).await;
        match laptop.send_text(&conv, "am I in?").await {
            Ok(_) => assert!(
                member,
                "trial {trial}: a send was accepted from a non-member"
            ),
            Err(e) => {
                assert_eq!(error_code(e), ErrorCode::NotMember, "trial {trial}");
                assert!(!member, "trial {trial}: a member's send was refused");
            }
        }
        let sent = alice.send_text(&conv, "hello").await.expect("alice sends");
        let pushed = laptop
            .wait_for(
                if member {
                    WAIT
                } else {
                    Duration::from_millis(150)
                },
                |f| matches!(f, ServerFrame::Message(m) if m.conv == conv && m.seq == sent.seq),
            )
            .await
            .is_ok();
        assert_eq!(
            pushed, member,
            "trial {trial}: pushed {pushed}, member {member}"
        );
        if member {
            members += 1;
        } else {
            outsiders += 1;
        }
    }
    // Both outcomes happen: the race is real.
    println!("{members} trials ended a member, {outsiders} not");
}

/// Messages committed after a leave never reach the leaver; those before it do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_a_leaver_exactly_until_the_leave() {
    let server = TestServer::with(unlimited).await;
    leaver_story(&server, &server, 20, true).await;
}

/// In a cluster, a leaver on another node than the sender gets every message up to the
/// leave, also those that reach its node after the leave. (Messages committed after the
/// leave that reach its node before the leave does may still be pushed to it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_leaver_on_another_node_gets_every_message_up_to_the_leave() {
    let c = cluster(2).await;
    leaver_story(&c.nodes[0], &c.nodes[1], 20, false).await;
}

/// alice (on `a`) sends without pause while bob (on `b`) leaves, `trials` times. bob
/// is pushed every message up to his leave's `last_seq`, and with `exact` none after.
async fn leaver_story(a: &TestServer, b: &TestServer, trials: u64, exact: bool) {
    let alice = Arc::new(a.connect("alice").await);
    let mut bob = b.connect("bob").await;
    for trial in 0..trials {
        let room = format!("exit{trial}");
        let conv = format!("room:{room}");
        alice.join(&room).await.expect("alice joins");
        bob.join(&room).await.expect("bob joins");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let sender = keep_sending(alice.clone(), conv.clone(), 4, stop.clone(), acked);
        alice.send_text(&conv, "warm-up").await.expect("send");
        tokio::time::sleep(Duration::from_millis(trial % 5)).await;
        let left = bob.leave(&room).await.expect("bob leaves");
        let at = left["last_seq"].as_u64().expect("last_seq");
        stop.store(true, Ordering::Relaxed);
        let last = sender.await.expect("sender");
        // Everything bob may still read is before the leave: his history ends there.
        let seen = match bob.history(&conv, None, None, Some(1)).await {
            Err(e) => error_code(e),
            Ok(_) => panic!("trial {trial}: a leaver read the room"),
        };
        assert_eq!(seen, ErrorCode::NotMember);
        // What was pushed is a gapless run from 1 up to the leave.
        let mut got = seqs_until(&mut bob, &conv, at).await;
        while let Ok(Event::Frame(f)) = bob.next_event(Duration::from_millis(100)).await {
            if let ServerFrame::Message(m) = f {
                if m.conv == conv {
                    got.push(m.seq);
                }
            }
        }
        let want: Vec<u64> = (1..=got.len() as u64).collect();
        assert_eq!(got, want, "trial {trial}: pushes to the leaver");
        if exact {
            assert_eq!(
                got.len() as u64,
                at,
                "trial {trial}: pushed after the leave"
            );
        }
        assert!(got.len() as u64 <= last);
    }
}

/// Looking up rooms that do not exist (history, sync, HTTP) leaves nothing in memory:
/// 1.45 M lookups used to keep 375 MB.
#[tokio::test]
async fn lookups_of_unknown_rooms_leave_no_cache_behind() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    alice.join("real").await.expect("join");
    for i in 0..500 {
        let conv = format!("room:ghost{i}");
        let e = alice
            .history(&conv, None, None, None)
            .await
            .expect_err("not a member");
        assert_eq!(error_code(e), ErrorCode::NotMember);
        let r = http()
            .get(server.http(&format!("/api/conversations/{conv}/messages?user=alice")))
            .send()
            .await
            .expect("http history");
        assert_eq!(r.status(), 403);
    }
    let cursors = (0..500).map(|i| (format!("room:phantom{i}"), 0)).collect();
    let synced = alice.sync(cursors, None).await.expect("sync");
    assert_eq!(synced.denied.len(), 500);
    let cached = server.metric("hubbub_rooms_cached").await;
    assert!(
        cached <= 1.0,
        "{cached} rooms cached after 1,500 unknown lookups"
    );
}
