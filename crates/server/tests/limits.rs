//! Limits and authorization: every limit refuses with a clear error, and nobody reads
//! or writes where they don't belong.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{error_code, http, TestServer, WAIT};
use hubbub_client::{Client, ClientError, ConnectOptions};
use hubbub_protocol::{ClientFrame, ErrorCode, ServerFrame};
use serde_json::{json, Value};

async fn refused(server: &TestServer, user: &str) -> Option<u16> {
    match Client::connect(ConnectOptions::guest(server.url(), user)).await {
        Err(ClientError::Connect { status, .. }) => status,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn connections_are_limited_in_total_and_per_address_before_the_upgrade() {
    let server = TestServer::with(|c| {
        c.max_connections = 100;
        c.max_connections_per_ip = 2;
    })
    .await;
    let a = server.connect("a").await;
    let _b = server.connect("b").await;
    assert_eq!(refused(&server, "c").await, Some(429));
    a.close().await.unwrap();
    // The place is freed once the server has noticed the close.
    let mut admitted = None;
    for _ in 0..100 {
        if let Ok(c) = Client::connect(ConnectOptions::guest(server.url(), "c")).await {
            admitted = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted.is_some(), "a freed place is reused");

    let server = TestServer::with(|c| {
        c.max_connections = 2;
        c.max_connections_per_ip = 100;
    })
    .await;
    let _a = server.connect("a").await;
    let _b = server.connect("b").await;
    assert_eq!(refused(&server, "c").await, Some(503));
}

#[tokio::test]
async fn a_user_may_join_at_most_the_configured_number_of_rooms() {
    let server = TestServer::with(|c| c.max_rooms_per_user = 2).await;
    let alice = server.connect("alice").await;
    alice.join("one").await.unwrap();
    alice.join("two").await.unwrap();
    assert_eq!(
        error_code(alice.join("three").await.unwrap_err()),
        ErrorCode::Forbidden
    );
    // Joining a room one is already in is not a new room.
    alice.join("one").await.unwrap();
    alice.leave("one").await.unwrap();
    alice.join("three").await.unwrap();
}

#[tokio::test]
async fn every_frame_counts_against_a_rate_limit() {
    let server = TestServer::with(|c| {
        c.frame_burst = 20;
        c.frame_rate_per_sec = 1;
        c.rate_limit_strikes = 1000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    let frame = (0..30)
        .map(|i| format!(r#"{{"type":"ping","id":"p{i}"}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    alice.send_raw(frame).await.unwrap();
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..30 {
        match alice
            .wait_for(WAIT, |f| {
                matches!(f, ServerFrame::Pong { .. } | ServerFrame::Error { .. })
            })
            .await
            .unwrap()
        {
            ServerFrame::Pong { .. } => pongs += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((pongs, limited), (20, 10));
}

#[tokio::test]
async fn an_oversized_request_body_is_refused_with_413() {
    let server = TestServer::with(|c| c.max_body_bytes = 1024).await;
    let body = json!({"username": "alice", "password": "x".repeat(2000)});
    let r = http()
        .post(server.http("/api/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "too_large");
}

async fn send(c: &Client) -> Option<ErrorCode> {
    let id = c.new_client_msg_id();
    c.send_message(
        "room:club",
        &id,
        hubbub_protocol::ContentType::Text,
        json!("x"),
    )
    .await
    .err()
    .map(error_code)
}

async fn history(c: &Client) -> Option<ErrorCode> {
    c.history("room:club", None, None, None)
        .await
        .err()
        .map(error_code)
}

async fn recall(c: &Client, seq: u64) -> Option<ErrorCode> {
    c.request(ClientFrame::Recall {
        id: None,
        conv: "room:club".into(),
        seq,
    })
    .await
    .err()
    .map(error_code)
}

async fn edit(c: &Client, seq: u64) -> Option<ErrorCode> {
    c.request(ClientFrame::Edit {
        id: None,
        conv: "room:club".into(),
        seq,
        content: json!("edited"),
    })
    .await
    .err()
    .map(error_code)
}

/// Who tries what, and which error they get (`None`: allowed).
#[tokio::test]
async fn membership_is_checked_on_every_message_bearing_path() {
    let server = TestServer::start().await;
    let owner = server.connect("owner").await; // created the room: its admin
    let member = server.connect("member").await;
    let former = server.connect("former").await;
    let outsider = server.connect("outsider").await;
    owner.join("club").await.unwrap();
    member.join("club").await.unwrap();
    former.join("club").await.unwrap();
    let by_member = member.send_text("room:club", "hello").await.unwrap();
    let by_former = former.send_text("room:club", "bye").await.unwrap();
    former.leave("club").await.unwrap();

    for (who, c) in [("outsider", &outsider), ("former", &former)] {
        assert_eq!(send(c).await, Some(ErrorCode::NotMember), "{who} send");
        assert_eq!(
            history(c).await,
            Some(ErrorCode::NotMember),
            "{who} history"
        );
        assert_eq!(
            recall(c, by_member.seq).await,
            Some(ErrorCode::NotMember),
            "{who} recall"
        );
        assert_eq!(
            edit(c, by_former.seq).await,
            Some(ErrorCode::NotMember),
            "{who} edit"
        );
        let e = c
            .request(ClientFrame::Read {
                id: None,
                conv: "room:club".into(),
                seq: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(error_code(e), ErrorCode::NotMember, "{who} read");
        let e = c
            .request(ClientFrame::Typing {
                id: None,
                conv: "room:club".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(error_code(e), ErrorCode::NotMember, "{who} typing");
        let s = c
            .sync(BTreeMap::from([("room:club".to_string(), 0)]), None)
            .await
            .unwrap();
        assert!(s.messages.is_empty(), "{who} sync leaks nothing");
        assert_eq!(s.denied, vec!["room:club".to_string()], "{who} sync");
        let r = http()
            .get(server.http(&format!("/api/conversations/room:club/messages?user={who}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{who} HTTP history");
    }
    // A member reads and writes, but may not recall or edit others' messages.
    assert_eq!(send(&member).await, None);
    assert_eq!(history(&member).await, None);
    assert_eq!(
        edit(&member, by_former.seq).await,
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        recall(&member, by_former.seq).await,
        Some(ErrorCode::Forbidden)
    );
    // The room's admin may recall anyone's message, but edits only their own.
    assert_eq!(
        edit(&owner, by_member.seq).await,
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(recall(&owner, by_former.seq).await, None);
    // A DM is for its two users only.
    member
        .send_text("dm:member:owner", "private")
        .await
        .unwrap();
    let e = outsider
        .history("dm:member:owner", None, None, None)
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
    let e = outsider
        .send_text("dm:member:owner", "let me in")
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
    let e = outsider
        .request(ClientFrame::Recall {
            id: None,
            conv: "dm:member:owner".into(),
            seq: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
}
