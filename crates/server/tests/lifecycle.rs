//! Message lifecycle (recall, edit, typing) and the protobuf subprotocol.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{error_code, TestServer, WAIT};
use hubbub_client::ConnectOptions;
use hubbub_protocol::{ClientFrame, ErrorCode, ServerFrame, SUBPROTOCOL_PB};
use serde_json::json;

#[tokio::test]
async fn recall_by_the_sender_is_pushed_persisted_and_stays_recalled_after_sync() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let carol = server.connect("carol").await;
    for c in [&alice, &bob, &carol] {
        c.join("lobby").await.unwrap();
    }
    let secret = alice
        .send_text("room:lobby", "my password is hunter2")
        .await
        .unwrap();
    alice.send_text("room:lobby", "oops").await.unwrap();

    // Neither a plain member nor an outsider may recall it.
    let e = carol
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:lobby".into(),
            seq: secret.seq,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
    let outsider = server.connect("mallory").await;
    let e = outsider
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:lobby".into(),
            seq: secret.seq,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember);
    let e = alice
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:lobby".into(),
            seq: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotFound);

    alice
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:lobby".into(),
            seq: secret.seq,
        })
        .await
        .unwrap();
    let pushed = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Recalled { .. }))
        .await
        .unwrap();
    assert_eq!(
        pushed,
        ServerFrame::Recalled {
            conv: "room:lobby".into(),
            seq: 1,
            by: "alice".into()
        }
    );

    // A user who was offline syncs: seq 1 is there, recalled, without its content.
    let dave = server.connect("dave").await;
    dave.join("lobby").await.unwrap();
    drop(dave);
    let dave = server.connect("dave").await;
    let r = dave
        .sync(BTreeMap::from([("room:lobby".to_string(), 0)]), None)
        .await
        .unwrap();
    assert_eq!(r.messages.len(), 2);
    assert_eq!(r.messages[0].seq, 1);
    assert!(r.messages[0].recalled);
    assert_eq!(r.messages[0].content, None);
    assert!(!r.to_json_text().contains("hunter2"));
    let page = bob.history("room:lobby", None, None, None).await.unwrap();
    assert!(page.messages[0].recalled && page.messages[0].content.is_none());
    assert_eq!(page.messages[1].content, Some(json!("oops")));
}

trait JsonText {
    fn to_json_text(&self) -> String;
}

impl JsonText for hubbub_client::SyncResult {
    fn to_json_text(&self) -> String {
        serde_json::to_string(&self.messages).unwrap()
    }
}

#[tokio::test]
async fn the_room_creator_may_recall_anyone_and_edit_is_for_the_sender_only() {
    let server = TestServer::start().await;
    let owner = server.connect("owner").await;
    let mut member = server.connect("member").await;
    let created = owner.join("club").await.unwrap();
    assert_eq!(created["created"], true);
    member.join("club").await.unwrap();
    let m = member.send_text("room:club", "spam").await.unwrap();
    owner
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:club".into(),
            seq: m.seq,
        })
        .await
        .unwrap();
    let f = member
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Recalled { .. }))
        .await
        .unwrap();
    assert_eq!(
        f,
        ServerFrame::Recalled {
            conv: "room:club".into(),
            seq: m.seq,
            by: "owner".into()
        }
    );

    let m2 = member.send_text("room:club", "teh typo").await.unwrap();
    let e = owner
        .request(ClientFrame::Edit {
            id: None,
            conv: "room:club".into(),
            seq: m2.seq,
            content: json!("hacked"),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
    let e = member
        .request(ClientFrame::Edit {
            id: None,
            conv: "room:club".into(),
            seq: m.seq,
            content: json!("back"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        error_code(e),
        ErrorCode::Conflict,
        "a recalled message cannot be edited"
    );
    let e = member
        .request(ClientFrame::Edit {
            id: None,
            conv: "room:club".into(),
            seq: m2.seq,
            content: json!({"url": "x"}),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::BadRequest);

    let mut owner = owner;
    let ok = member
        .request(ClientFrame::Edit {
            id: None,
            conv: "room:club".into(),
            seq: m2.seq,
            content: json!("the typo"),
        })
        .await
        .unwrap();
    let edited_at = ok["edited_at"].as_i64().unwrap();
    let f = owner
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Edited { .. }))
        .await
        .unwrap();
    assert_eq!(
        f,
        ServerFrame::Edited {
            conv: "room:club".into(),
            seq: m2.seq,
            content: json!("the typo"),
            edited_at
        }
    );
    let page = owner.history("room:club", None, None, None).await.unwrap();
    let last = page.messages.last().unwrap();
    assert_eq!(
        (last.content.clone(), last.edited_at),
        (Some(json!("the typo")), Some(edited_at))
    );
}

#[tokio::test]
async fn typing_is_pushed_to_others_and_never_stored() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    alice.join("lobby").await.unwrap();
    bob.join("lobby").await.unwrap();
    for conv in ["room:lobby", "dm:alice:bob"] {
        let typing = ClientFrame::Typing {
            id: None,
            conv: conv.into(),
        };
        alice.send_no_reply(typing).await.unwrap();
        let f = bob
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Typing { .. }))
            .await
            .unwrap();
        let want = ServerFrame::Typing {
            conv: conv.into(),
            user: "alice".into(),
        };
        assert_eq!(f, want);
        let page = bob.history(conv, None, None, None).await.unwrap();
        assert!(page.messages.is_empty(), "typing is never stored");
    }
    let e = server
        .connect("mallory")
        .await
        .request(ClientFrame::Typing {
            id: None,
            conv: "room:lobby".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember);
}

#[tokio::test]
async fn a_json_client_and_a_protobuf_client_chat_in_one_room() {
    let server = TestServer::start().await;
    let mut json_client = server.connect("alice").await;
    let mut opts = ConnectOptions::guest(server.url(), "bob");
    opts.subprotocol = Some(SUBPROTOCOL_PB.into());
    let mut pb_client = server.connect_opts(opts).await;
    assert_eq!(pb_client.welcome().user, "bob");
    json_client.join("mixed").await.unwrap();
    pb_client.join("mixed").await.unwrap();

    let a = json_client
        .send_text("room:mixed", "from json")
        .await
        .unwrap();
    let f = pb_client
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = f else {
        unreachable!()
    };
    assert_eq!(
        (m.seq, m.from.as_str(), m.content),
        (a.seq, "alice", Some(json!("from json")))
    );

    let b = pb_client
        .send_text("room:mixed", "from protobuf ✓")
        .await
        .unwrap();
    assert_eq!(b.seq, a.seq + 1);
    let f = json_client
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = f else {
        unreachable!()
    };
    assert_eq!(
        (m.seq, m.from.as_str(), m.content),
        (b.seq, "bob", Some(json!("from protobuf ✓")))
    );

    // Errors, history and sync work the same over protobuf.
    let e = pb_client
        .request(ClientFrame::History {
            id: None,
            conv: "room:elsewhere".into(),
            before_seq: None,
            after_seq: None,
            limit: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember);
    let page = pb_client
        .history("room:mixed", None, None, None)
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let r = pb_client
        .sync(BTreeMap::from([("room:mixed".to_string(), 0)]), None)
        .await
        .unwrap();
    assert_eq!(r.messages.len(), 2);
    assert!(r.caught_up);
    pb_client.ping().await.unwrap();
    // A text frame on the protobuf subprotocol is an error, and the connection stays.
    pb_client.send_raw(r#"{"type":"ping"}"#).await.unwrap();
    let f = pb_client
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
    pb_client.ping().await.unwrap();
    let _ = pb_client.next_event(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn recalls_and_edits_made_while_offline_are_replayed_by_sync_since() {
    let server = TestServer::start().await;
    let alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    alice.join("news").await.unwrap();
    bob.join("news").await.unwrap();
    for text in ["oops, a secret", "teh typo", "fine"] {
        bob.send_text("room:news", text).await.unwrap();
    }
    // alice has seen all three, then goes away.
    let seen_at = alice.welcome().server_time;
    let page = alice.history("room:news", None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    alice.close().await.unwrap();

    bob.request(ClientFrame::Recall {
        id: None,
        conv: "room:news".into(),
        seq: 1,
    })
    .await
    .unwrap();
    let edited = bob
        .request(ClientFrame::Edit {
            id: None,
            conv: "room:news".into(),
            seq: 2,
            content: json!("the typo"),
        })
        .await
        .unwrap();
    bob.send_text("room:news", "new one").await.unwrap();

    let alice = server.connect("alice").await;
    let r = alice
        .sync_since(
            BTreeMap::from([("room:news".to_string(), 3)]),
            None,
            Some(seen_at),
        )
        .await
        .unwrap();
    assert_eq!(
        r.changes,
        vec![
            ServerFrame::Recalled {
                conv: "room:news".into(),
                seq: 1,
                by: "bob".into()
            },
            ServerFrame::Edited {
                conv: "room:news".into(),
                seq: 2,
                content: json!("the typo"),
                edited_at: edited["edited_at"].as_i64().unwrap(),
            },
        ]
    );
    assert!(!format!("{:?}", r.changes).contains("secret"));
    assert_eq!(
        r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![4]
    );
    assert!(r.server_time >= seen_at);
    // From the new server_time on, nothing is replayed again.
    let again = alice
        .sync_since(r.cursors.clone(), None, Some(r.server_time))
        .await
        .unwrap();
    assert!(again.changes.is_empty() && again.messages.is_empty());
    // Without `since`, sync is as before: only new messages.
    let plain = alice
        .sync(BTreeMap::from([("room:news".to_string(), 3)]), None)
        .await
        .unwrap();
    assert!(plain.changes.is_empty());
}
