//! Stories of the messaging core, against the real server and real WebSocket clients.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{error_code, TestServer, WAIT};
use hubbub_client::{ClientError, ConnectOptions, Event};
use hubbub_protocol::{ClientFrame, ContentType, ErrorCode, MemberEvent, ServerFrame};
use serde_json::json;

#[tokio::test]
async fn a_new_connection_is_welcomed_first() {
    let server = TestServer::start().await;
    let alice = server.connect_device("alice", "phone").await;
    let w = alice.welcome();
    assert_eq!(w.user, "alice");
    assert_eq!(w.device, "phone");
    assert!(w.session.starts_with("s-"));
    assert_eq!(w.heartbeat_ms, 25_000);
    assert_eq!(w.max_frame_bytes, 65_536);
    let now = hubbub_server::store::now_ms();
    assert!((w.server_time - now).abs() < 60_000, "server_time is in ms");
}

#[tokio::test]
async fn connecting_without_credentials_is_refused_with_401_json() {
    let server = TestServer::start().await;
    let mut opts = ConnectOptions::guest(server.url(), "x");
    opts.user = None;
    match hubbub_client::Client::connect(opts).await {
        Err(ClientError::Connect { status, body }) => {
            assert_eq!(status, Some(401));
            let v: serde_json::Value = serde_json::from_str(&body).expect("json body");
            assert_eq!(v["code"], "unauthorized");
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    // An invalid guest name is refused the same way.
    match hubbub_client::Client::connect(ConnectOptions::guest(server.url(), "no spaces!")).await {
        Err(ClientError::Connect { status, .. }) => assert_eq!(status, Some(401)),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn guests_are_refused_when_guest_mode_is_off() {
    let server = TestServer::with(|c| c.guest = Some(false)).await;
    match hubbub_client::Client::connect(ConnectOptions::guest(server.url(), "alice")).await {
        Err(ClientError::Connect { status, .. }) => assert_eq!(status, Some(401)),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_foreign_browser_origin_is_refused_and_the_own_origin_accepted() {
    let server = TestServer::start().await;
    let mut evil = ConnectOptions::guest(server.url(), "alice");
    evil.origin = Some("http://evil.example".into());
    match hubbub_client::Client::connect(evil).await {
        Err(ClientError::Connect { status, .. }) => assert_eq!(status, Some(403)),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let mut own = ConnectOptions::guest(server.url(), "alice");
    own.origin = Some(format!("http://{}", server.addr));
    server.connect_opts(own).await;
}

#[tokio::test]
async fn an_unknown_subprotocol_is_refused_with_400() {
    let server = TestServer::start().await;
    let mut opts = ConnectOptions::guest(server.url(), "alice");
    opts.subprotocol = Some("chat.v9".into());
    match hubbub_client::Client::connect(opts).await {
        Err(ClientError::Connect { status, .. }) => assert_eq!(status, Some(400)),
        other => panic!("expected 400, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn joining_a_room_tells_members_who_came_and_how_many_are_online() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let ok = alice.join("ops").await.expect("alice joins");
    assert_eq!(ok["conv"], "room:ops");
    assert_eq!(ok["last_seq"], 0);
    assert_eq!(ok["online"], 1);

    let bob = server.connect("bob").await;
    let ok = bob.join("ops").await.expect("bob joins");
    assert_eq!(ok["online"], 2);

    let member = alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Member { .. }))
        .await
        .expect("alice hears of bob");
    assert_eq!(
        member,
        ServerFrame::Member {
            conv: "room:ops".into(),
            user: "bob".into(),
            event: MemberEvent::Joined,
            online: 2,
            by: None,
        }
    );

    // Joining again adds no member and pushes nothing; leaving pushes `left`.
    bob.join("ops").await.expect("re-join is fine");
    bob.leave("ops").await.expect("bob leaves");
    let left = alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Member { .. }))
        .await
        .expect("alice hears bob left");
    assert!(
        matches!(
            left,
            ServerFrame::Member {
                event: MemberEvent::Left,
                online: 1,
                ..
            }
        ),
        "{left:?}"
    );
    assert_eq!(
        error_code(bob.leave("ops").await.unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        error_code(bob.join("bad name").await.unwrap_err()),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn room_messages_are_numbered_and_reach_every_member_and_the_senders_other_devices() {
    let server = TestServer::start().await;
    let mut alice_phone = server.connect_device("alice", "phone").await;
    let mut alice_laptop = server.connect_device("alice", "laptop").await;
    let mut bob = server.connect("bob").await;
    alice_phone.join("general").await.unwrap();
    bob.join("general").await.unwrap();

    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let sent = alice_phone
            .send_text("room:general", text)
            .await
            .expect("acked");
        assert_eq!(sent.seq, i as u64 + 1);
        assert_eq!(sent.conv, "room:general");
        assert!(!sent.msg_id.is_empty());
    }
    for client in [&mut bob, &mut alice_laptop] {
        for (i, text) in ["one", "two", "three"].iter().enumerate() {
            let f = client
                .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
                .await
                .expect("message pushed");
            let ServerFrame::Message(m) = f else {
                unreachable!()
            };
            assert_eq!(m.seq, i as u64 + 1);
            assert_eq!(m.from, "alice");
            assert_eq!(m.content, Some(json!(text)));
            assert_eq!(m.content_type, ContentType::Text);
        }
    }
    // The sending session got only its `ok`s: a ping round trip flushes anything queued.
    alice_phone.ping().await.unwrap();
    let mut pushed = Vec::new();
    while let Ok(Event::Frame(f)) = alice_phone.next_event(Duration::from_millis(200)).await {
        pushed.push(f);
    }
    assert!(
        !pushed.iter().any(|f| matches!(f, ServerFrame::Message(_))),
        "sender saw its own message: {pushed:?}"
    );
}

#[tokio::test]
async fn attachments_roundtrip_and_oversized_text_is_refused() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    alice.join("media").await.unwrap();
    let image = json!({"url": "https://example.com/cat.png", "name": "cat.png", "size": 1234, "mime": "image/png"});
    for kind in [
        ContentType::Image,
        ContentType::File,
        ContentType::Audio,
        ContentType::Video,
    ] {
        alice
            .send_message(
                "room:media",
                &format!("att-{}", kind.as_str()),
                kind,
                image.clone(),
            )
            .await
            .expect("attachment accepted");
    }
    let page = alice.history("room:media", None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 4);
    assert_eq!(page.messages[0].content_type, ContentType::Image);
    assert_eq!(page.messages[0].content, Some(image.clone()));

    let exactly = "a".repeat(16_384);
    alice
        .send_text("room:media", &exactly)
        .await
        .expect("16384 bytes pass");
    let over = "a".repeat(16_385);
    assert_eq!(
        error_code(alice.send_text("room:media", &over).await.unwrap_err()),
        ErrorCode::TooLarge
    );
    assert_eq!(
        error_code(
            alice
                .send_message(
                    "room:media",
                    "bad-1",
                    ContentType::Image,
                    json!("not an object")
                )
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
    let raw = r#"{"type":"send","id":"x1","conv":"room:media","client_msg_id":"c9","content_type":"hologram","content":"hi"}"#;
    let mut alice = alice;
    alice.send_raw(raw).await.unwrap();
    let err = alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Error { .. }))
        .await
        .unwrap();
    assert!(
        matches!(err, ServerFrame::Error { code: ErrorCode::BadRequest, ref id, .. } if id == &Some(json!("x1"))),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_retried_send_is_stored_once() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob").await;
    let alice = server.connect("alice").await;
    alice.join("r").await.unwrap();
    bob.join("r").await.unwrap();
    let first = alice
        .send_message("room:r", "retry-me", ContentType::Text, json!("hello"))
        .await
        .unwrap();
    let again = alice
        .send_message("room:r", "retry-me", ContentType::Text, json!("hello"))
        .await
        .unwrap();
    assert_eq!((first.seq, &first.msg_id), (again.seq, &again.msg_id));
    let page = alice.history("room:r", None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    // Bob was pushed the message once.
    bob.wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    bob.ping().await.unwrap();
    assert!(matches!(
        bob.next_event(Duration::from_millis(200)).await,
        Err(ClientError::Timeout)
    ));
    // The same id in another conversation is a conflict, not a silent no-op.
    alice.join("other").await.unwrap();
    assert_eq!(
        error_code(
            alice
                .send_message("room:other", "retry-me", ContentType::Text, json!("x"))
                .await
                .unwrap_err()
        ),
        ErrorCode::Conflict
    );
}

#[tokio::test]
async fn a_dm_is_private_to_its_two_users() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let mallory = server.connect("mallory").await;
    let sent = alice
        .send_text("dm:alice:bob", "psst")
        .await
        .expect("dm send");
    assert_eq!(sent.seq, 1);
    let f = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    assert!(
        matches!(f, ServerFrame::Message(ref m) if m.conv == "dm:alice:bob" && m.from == "alice")
    );
    bob.send_text("dm:alice:bob", "ok")
        .await
        .expect("bob answers");

    assert_eq!(
        error_code(mallory.send_text("dm:alice:bob", "hi").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(
        error_code(
            mallory
                .history("dm:alice:bob", None, None, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::Forbidden
    );
    // Unsorted or self DMs are malformed ids.
    assert_eq!(
        error_code(alice.send_text("dm:bob:alice", "x").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        error_code(alice.send_text("dm:alice:alice", "x").await.unwrap_err()),
        ErrorCode::BadRequest
    );
    // A room nobody joined: not a member.
    assert_eq!(
        error_code(mallory.send_text("room:secret", "x").await.unwrap_err()),
        ErrorCode::NotMember
    );
    assert_eq!(
        error_code(
            mallory
                .history("room:secret", None, None, None)
                .await
                .unwrap_err()
        ),
        ErrorCode::NotMember
    );
    let page = alice
        .history("dm:alice:bob", None, None, None)
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[tokio::test]
async fn history_pages_backwards_and_forwards() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    alice.join("log").await.unwrap();
    for i in 1..=120 {
        alice.send_text("room:log", &format!("m{i}")).await.unwrap();
    }
    let seqs =
        |p: &hubbub_client::HistoryPage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let newest = alice.history("room:log", None, None, None).await.unwrap();
    assert_eq!(seqs(&newest), (71..=120).collect::<Vec<_>>());
    assert!(newest.has_more);
    let older = alice
        .history("room:log", Some(71), None, Some(50))
        .await
        .unwrap();
    assert_eq!(seqs(&older), (21..=70).collect::<Vec<_>>());
    assert!(older.has_more);
    let oldest = alice
        .history("room:log", Some(21), None, Some(50))
        .await
        .unwrap();
    assert_eq!(seqs(&oldest), (1..=20).collect::<Vec<_>>());
    assert!(!oldest.has_more);
    let forward = alice
        .history("room:log", None, Some(100), Some(50))
        .await
        .unwrap();
    assert_eq!(seqs(&forward), (101..=120).collect::<Vec<_>>());
    assert!(!forward.has_more);
    let capped = alice
        .history("room:log", None, Some(0), Some(10_000))
        .await
        .unwrap();
    assert_eq!(
        capped.messages.len(),
        120,
        "limit is capped at 200, all 120 fit"
    );
    assert_eq!(
        error_code(
            alice
                .history("room:log", Some(5), Some(1), None)
                .await
                .unwrap_err()
        ),
        ErrorCode::BadRequest
    );
}

#[tokio::test]
async fn bob_reconnects_and_sync_returns_exactly_the_50_he_missed() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    alice.join("team").await.unwrap();
    bob.join("team").await.unwrap();
    alice.send_text("room:team", "before").await.unwrap();
    alice.send_text("dm:alice:bob", "dm before").await.unwrap();
    bob.close().await.unwrap();

    let mut expected = Vec::new();
    for i in 0..50 {
        let conv = if i % 5 == 0 {
            "dm:alice:bob"
        } else {
            "room:team"
        };
        let sent = alice.send_text(conv, &format!("missed {i}")).await.unwrap();
        expected.push((sent.conv.clone(), sent.seq, format!("missed {i}")));
    }

    let bob = server.connect("bob").await;
    let cursors = BTreeMap::from([
        ("room:team".to_string(), 1),
        ("dm:alice:bob".to_string(), 1),
    ]);
    let result = bob.sync(cursors, None).await.expect("sync");
    assert!(result.caught_up);
    assert!(result.more.is_empty());
    let got: Vec<_> = result
        .messages
        .iter()
        .map(|m| {
            (
                m.conv.clone(),
                m.seq,
                m.content
                    .clone()
                    .and_then(|c| c.as_str().map(String::from))
                    .unwrap_or_default(),
            )
        })
        .collect();
    let mut want = expected.clone();
    want.sort_by_key(|a| (a.0.clone(), a.1));
    let mut got_sorted = got.clone();
    got_sorted.sort_by_key(|a| (a.0.clone(), a.1));
    assert_eq!(
        got_sorted, want,
        "exactly the missed messages, no gaps, no repeats"
    );
    // Within each conversation they arrived in seq order.
    for conv in ["room:team", "dm:alice:bob"] {
        let seqs: Vec<u64> = got.iter().filter(|g| g.0 == conv).map(|g| g.1).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{conv}: {seqs:?}"
        );
    }
    assert_eq!(result.cursors["room:team"], 41);
    assert_eq!(result.cursors["dm:alice:bob"], 11);
    let convs: HashSet<_> = result.conversations.iter().map(|c| c.0.clone()).collect();
    assert!(convs.contains("room:team") && convs.contains("dm:alice:bob"));

    // Syncing again from the new cursors returns nothing.
    let again = bob.sync(result.cursors.clone(), None).await.unwrap();
    assert!(again.messages.is_empty() && again.caught_up);
}

#[tokio::test]
async fn sync_pages_with_a_limit_and_reports_more() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    alice.join("big").await.unwrap();
    for i in 0..30 {
        alice.send_text("room:big", &format!("{i}")).await.unwrap();
    }
    let r = alice
        .sync(BTreeMap::from([("room:big".to_string(), 0)]), Some(20))
        .await
        .unwrap();
    assert_eq!(r.messages.len(), 20);
    assert!(!r.caught_up);
    assert_eq!(r.more, vec!["room:big".to_string()]);
    let r2 = alice.sync(r.cursors.clone(), Some(20)).await.unwrap();
    assert_eq!(
        r2.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (21..=30).collect::<Vec<_>>()
    );
    assert!(r2.caught_up);
}

#[tokio::test]
async fn presence_is_pushed_to_room_mates_and_answered_on_query() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("lobby").await.unwrap();
    {
        let bob = server.connect("bob").await;
        bob.join("lobby").await.unwrap();
        let online = alice.presence(&["bob", "carol"]).await.unwrap();
        assert!(online["bob"]);
        assert!(!online["carol"]);
        bob.close().await.unwrap();
    }
    let f = alice
        .wait_for(WAIT, |f| {
            matches!(f, ServerFrame::Presence { online: false, .. })
        })
        .await
        .expect("bob went offline");
    assert_eq!(
        f,
        ServerFrame::Presence {
            user: "bob".into(),
            online: false
        }
    );
    let _bob = server.connect("bob").await;
    let f = alice
        .wait_for(WAIT, |f| {
            matches!(f, ServerFrame::Presence { online: true, .. })
        })
        .await
        .expect("bob came back");
    assert_eq!(
        f,
        ServerFrame::Presence {
            user: "bob".into(),
            online: true
        }
    );
    let online = alice.presence(&["bob"]).await.unwrap();
    assert!(online["bob"]);
}

#[tokio::test]
async fn a_second_connection_for_the_same_device_replaces_the_first() {
    let server = TestServer::start().await;
    let mut first = server.connect_device("alice", "phone").await;
    let mut other_device = server.connect_device("alice", "laptop").await;
    let second = server.connect_device("alice", "phone").await;
    let kicked = first
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Kicked { .. }))
        .await
        .expect("kicked");
    assert_eq!(
        kicked,
        ServerFrame::Kicked {
            reason: "replaced".into()
        }
    );
    let close = first
        .wait_closed(WAIT)
        .await
        .expect("closed")
        .expect("close frame");
    assert_eq!(close.code, 4001);
    // The new session and the other device keep working.
    second.join("x").await.unwrap();
    other_device.ping().await.unwrap();
    assert!(matches!(
        other_device.next_event(Duration::from_millis(100)).await,
        Err(ClientError::Timeout)
    ));
}

#[tokio::test]
async fn call_signals_are_relayed_to_every_session_of_the_callee() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let mut bob_phone = server.connect_device("bob", "phone").await;
    let mut bob_laptop = server.connect_device("bob", "laptop").await;
    let stranger = server.connect("stranger").await;
    alice.send_text("dm:alice:bob", "call you?").await.unwrap();

    let offer = ClientFrame::Signal {
        id: Some(json!("sig1")),
        to: "bob".into(),
        call_id: "c-1".into(),
        kind: hubbub_protocol::SignalKind::Offer,
        data: json!({"sdp": "v=0..."}),
    };
    alice.send_no_reply(offer).await.unwrap();
    for bob in [&mut bob_phone, &mut bob_laptop] {
        let f = bob
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Signal { .. }))
            .await
            .unwrap();
        assert_eq!(
            f,
            ServerFrame::Signal {
                from: "alice".into(),
                call_id: "c-1".into(),
                kind: hubbub_protocol::SignalKind::Offer,
                data: json!({"sdp": "v=0..."})
            }
        );
    }
    let to_offline = ClientFrame::Signal {
        id: Some(json!(2)),
        to: "carol".into(),
        call_id: "c-2".into(),
        kind: hubbub_protocol::SignalKind::Ring,
        data: json!(null),
    };
    assert_eq!(
        error_code(alice.request(to_offline).await.unwrap_err()),
        ErrorCode::NotFound
    );
    let unrelated = ClientFrame::Signal {
        id: Some(json!(3)),
        to: "bob".into(),
        call_id: "c-3".into(),
        kind: hubbub_protocol::SignalKind::Ring,
        data: json!(null),
    };
    assert_eq!(
        error_code(stranger.request(unrelated).await.unwrap_err()),
        ErrorCode::Forbidden
    );
}

#[tokio::test]
async fn malformed_and_unknown_frames_get_errors_and_the_connection_keeps_working() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    let cases = [
        ("{not json", None),
        (r#"{"type":"teleport","id":"u1"}"#, Some(json!("u1"))),
        (r#"{"type":"join","id":7}"#, Some(json!(7))),
        (r#"{"type":"send","id":"s","conv":42}"#, Some(json!("s"))),
        (r#"["type","ping"]"#, None),
        (r#"{"id":"no-type"}"#, Some(json!("no-type"))),
    ];
    for (raw, id) in cases {
        alice.send_raw(raw).await.unwrap();
        let f = alice
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Error { .. }))
            .await
            .unwrap_or_else(|e| panic!("no error for {raw}: {e:?}"));
        match f {
            ServerFrame::Error { id: got, code, .. } => {
                assert_eq!(code, ErrorCode::BadRequest, "{raw}");
                assert_eq!(got, id, "{raw}");
            }
            _ => unreachable!(),
        }
    }
    alice.send_binary(vec![1, 2, 3]).await.unwrap();
    let f = alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Error { .. }))
        .await
        .unwrap();
    assert!(matches!(
        f,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // Still usable.
    alice.join("fine").await.unwrap();
    alice.send_text("room:fine", "still here").await.unwrap();
}

#[tokio::test]
async fn several_requests_in_one_frame_are_all_answered() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice").await;
    alice.join("batch").await.unwrap();
    let frame = (1..=5)
        .map(|i| format!(r#"{{"type":"send","id":"b{i}","conv":"room:batch","client_msg_id":"cb{i}","content_type":"text","content":"{i}"}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    alice.send_raw(frame).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..5 {
        match alice
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Ok { .. }))
            .await
            .unwrap()
        {
            ServerFrame::Ok { body, .. } => seqs.push(body.into_fields()["seq"].as_u64().unwrap()),
            _ => unreachable!(),
        }
    }
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5],
        "answers in order, seqs in frame order"
    );
}

/// A client may pipeline more sends than the server keeps in flight: the server stops
/// reading while its pipeline is full and reads on as soon as answers make room.
#[tokio::test]
async fn more_sends_than_the_pipeline_holds_are_all_answered_promptly() {
    let server = TestServer::with(|c| {
        c.max_inflight_sends = 4;
        (c.send_burst, c.frame_burst) = (1000, 1000);
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("pipe").await.unwrap();
    const N: u64 = 300;
    for i in 1..=N {
        alice
            .send_raw(format!(r#"{{"type":"send","id":"p{i}","conv":"room:pipe","client_msg_id":"cp{i}","content_type":"text","content":"{i}"}}"#))
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    for i in 1..=N {
        match alice
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Ok { .. }))
            .await
            .unwrap()
        {
            ServerFrame::Ok { body, .. } => {
                assert_eq!(body.into_fields()["seq"], i, "answers in order")
            }
            _ => unreachable!(),
        }
    }
    // Far below the heartbeat (25 s), the only other timer that would wake the session.
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

/// Every answer leaves in request order, errors for undecodable frames included: the
/// `error`s of two bad frames sent after twenty pipelined sends come after the twenty
/// `ok`s (they used to overtake them).
#[tokio::test]
async fn errors_for_bad_frames_never_overtake_the_answers_before_them() {
    let server = TestServer::with(|c| (c.send_burst, c.frame_burst) = (1000, 1000)).await;
    let mut alice = server.connect("alice").await;
    alice.join("order").await.unwrap();
    for round in 0..5 {
        let mut lines: Vec<String> = (1..=20)
            .map(|i| format!(r#"{{"type":"send","id":"r{round}s{i}","conv":"room:order","client_msg_id":"o{round}-{i}","content_type":"text","content":"{i}"}}"#))
            .collect();
        lines.push("{not json".into());
        lines.push(format!(
            r#"{{"type":"no_such_request","id":"r{round}bad"}}"#
        ));
        alice.send_raw(lines.join("\n")).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..22 {
            let f = alice
                .wait_for(WAIT, |f| {
                    matches!(f, ServerFrame::Ok { .. } | ServerFrame::Error { .. })
                })
                .await
                .expect("an answer");
            answers.push(match f {
                ServerFrame::Ok { id, .. } => format!("ok {}", id.unwrap().as_str().unwrap()),
                ServerFrame::Error { id, .. } => {
                    format!("error {}", id.map_or("-".into(), |i| i.to_string()))
                }
                _ => unreachable!(),
            });
        }
        let mut want: Vec<String> = (1..=20).map(|i| format!("ok r{round}s{i}")).collect();
        want.push("error -".into());
        want.push(format!("error \"r{round}bad\""));
        assert_eq!(answers, want, "round {round}");
    }
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_with_1009() {
    let server = TestServer::with(|c| c.max_frame_bytes = 4096).await;
    let mut alice = server.connect("alice").await;
    assert_eq!(alice.welcome().max_frame_bytes, 4096);
    let padding = "x".repeat(4096 - r#"{"type":"ping","id":"p","pad":""}"#.len());
    let exactly = format!(r#"{{"type":"ping","id":"p","pad":"{padding}"}}"#);
    assert_eq!(exactly.len(), 4096);
    alice.send_raw(exactly).await.unwrap();
    alice
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Pong { .. }))
        .await
        .expect("4096 bytes pass");
    alice
        .send_raw(format!(r#"{{"type":"ping","id":"p","pad":"{padding}x"}}"#))
        .await
        .unwrap();
    let close = alice.wait_closed(WAIT).await.unwrap().expect("close frame");
    assert_eq!(close.code, 1009);
}

#[tokio::test]
async fn a_burst_of_sends_is_allowed_and_a_flood_is_rate_limited() {
    let server = TestServer::with(|c| {
        c.send_burst = 100;
        c.send_rate_per_sec = 50;
        c.rate_limit_strikes = 1000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("flood").await.unwrap();
    let frame = (0..150)
        .map(|i| format!(r#"{{"type":"send","id":{i},"conv":"room:flood","client_msg_id":"f{i}","content_type":"text","content":"x"}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    alice.send_raw(frame).await.unwrap();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..150 {
        match alice
            .wait_for(WAIT, |f| {
                matches!(f, ServerFrame::Ok { .. } | ServerFrame::Error { .. })
            })
            .await
            .unwrap()
        {
            ServerFrame::Ok { .. } => ok += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok >= 100, "a burst of 100 passes, got {ok}");
    assert!(limited > 0, "the flood is limited");
}

#[tokio::test]
async fn a_client_that_keeps_flooding_is_closed_with_1008() {
    let server = TestServer::with(|c| {
        c.send_burst = 10;
        c.send_rate_per_sec = 1;
        c.rate_limit_strikes = 5;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("flood").await.unwrap();
    let frame = (0..40)
        .map(|i| format!(r#"{{"type":"send","id":{i},"conv":"room:flood","client_msg_id":"f{i}","content_type":"text","content":"x"}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    alice.send_raw(frame).await.unwrap();
    let close = alice.wait_closed(WAIT).await.unwrap().expect("close frame");
    assert_eq!((close.code, close.reason.as_str()), (1008, "rate limited"));
    // What was accepted before the close is stored.
    let bob = server.connect("bob").await;
    bob.join("flood").await.unwrap();
    let page = bob.history("room:flood", None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 10);
}
