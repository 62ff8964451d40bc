//! Version 1.1 of the protocol against the real server: replies, reactions, mentions,
//! search, room members, removing a member and ICE servers in `welcome`.

mod common;

use std::time::Duration;

use common::{error_code, http, TestServer, WAIT};
use hubbub_client::Client;
use hubbub_protocol::{ClientFrame, ErrorCode, MemberEvent, ServerFrame};
use serde_json::{json, Value};

/// Something that must not arrive arrives within this long, if it does.
const QUIET: Duration = Duration::from_millis(300);

async fn room_of_three(server: &TestServer) -> (Client, Client, Client) {
    let alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    let carol = server.connect("carol").await;
    for c in [&alice, &bob, &carol] {
        c.join("team").await.expect("join");
    }
    (alice, bob, carol)
}

async fn get(server: &TestServer, user: &str, path: &str) -> (u16, Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http()
        .get(server.http(&format!("{path}{sep}user={user}")))
        .send()
        .await
        .expect("http");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_carries_what_it_answers_and_must_answer_a_message_that_exists() {
    let server = TestServer::start().await;
    let (alice, bob, _carol) = room_of_three(&server).await;
    let mut alice = alice;
    let first = alice
        .send_text("room:team", "shall we ship?")
        .await
        .unwrap();
    let answer = bob
        .send_reply("room:team", "yes", first.seq)
        .await
        .expect("reply");
    let pushed = alice
        .wait_for(
            WAIT,
            |f| matches!(f, ServerFrame::Message(m) if m.seq == answer.seq),
        )
        .await
        .unwrap();
    let ServerFrame::Message(m) = pushed else {
        unreachable!()
    };
    let r = m.reply_to.expect("reply_to");
    assert_eq!((r.seq, r.from.as_str()), (first.seq, "alice"));
    assert_eq!(r.excerpt.as_deref(), Some("shall we ship?"));
    // History has it too.
    let page = alice.history("room:team", None, None, None).await.unwrap();
    let stored = page.messages.iter().find(|m| m.seq == answer.seq).unwrap();
    assert_eq!(stored.reply_to.as_ref().unwrap().seq, first.seq);
    // A reply to a message that does not exist (or to seq 0) stores nothing.
    for to in [99, 0] {
        let e = bob
            .send_reply("room:team", "to nothing", to)
            .await
            .unwrap_err();
        assert_eq!(error_code(e), ErrorCode::BadRequest, "reply_to {to}");
    }
    assert_eq!(
        alice
            .history("room:team", None, None, None)
            .await
            .unwrap()
            .messages
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_are_pushed_to_everyone_else_shown_in_history_and_replayed_by_sync() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = room_of_three(&server).await;
    let (mut alice, mut bob, mut carol) = (alice, bob, carol);
    let m = alice.send_text("room:team", "lunch?").await.unwrap();
    let since = alice.welcome().server_time;
    bob.react("room:team", m.seq, "👍", true)
        .await
        .expect("react");
    for who in [&mut alice, &mut carol] {
        let f = who
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Reaction { .. }))
            .await
            .unwrap();
        assert_eq!(
            f,
            ServerFrame::Reaction {
                conv: "room:team".into(),
                seq: m.seq,
                user: "bob".into(),
                emoji: "👍".into(),
                on: true
            }
        );
    }
    assert!(
        bob.wait_for(QUIET, |f| matches!(f, ServerFrame::Reaction { .. }))
            .await
            .is_err(),
        "the acting session gets only its ok"
    );
    // Setting it again is ok and pushes nothing.
    bob.react("room:team", m.seq, "👍", true).await.unwrap();
    assert!(alice
        .wait_for(QUIET, |f| matches!(f, ServerFrame::Reaction { .. }))
        .await
        .is_err());
    carol.react("room:team", m.seq, "👍", true).await.unwrap();
    let page = alice.history("room:team", None, None, None).await.unwrap();
    assert_eq!(
        page.messages[0].reactions,
        [(
            "👍".to_string(),
            vec!["bob".to_string(), "carol".to_string()]
        )]
        .into()
    );
    // Bad emoji.
    for bad in ["", "two words", &"x".repeat(33)] {
        let e = bob.react("room:team", m.seq, bad, true).await.unwrap_err();
        assert_eq!(error_code(e), ErrorCode::BadRequest, "{bad:?}");
    }
    // A reconnecting client learns the reactions made while it was away.
    let replay = carol
        .sync_since(
            [("room:team".to_string(), m.seq)].into(),
            Some(100),
            Some(since),
        )
        .await
        .unwrap();
    assert!(
        replay.changes.iter().any(|f| matches!(
            f,
            ServerFrame::Reactions { seq, reactions, .. } if *seq == m.seq && reactions["👍"].len() == 2
        )),
        "{:?}",
        replay.changes
    );
    // An outsider may not react; a recalled message takes no reaction.
    let dave = server.connect("dave").await;
    let e = dave
        .react("room:team", m.seq, "👍", true)
        .await
        .unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember);
    alice
        .request(ClientFrame::Recall {
            id: None,
            conv: "room:team".into(),
            seq: m.seq,
        })
        .await
        .unwrap();
    let e = bob.react("room:team", m.seq, "🎉", true).await.unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Conflict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_name_members_and_count_apart_from_unread() {
    let server = TestServer::start().await;
    let (alice, mut bob, _carol) = room_of_three(&server).await;
    alice
        .send_text("room:team", "@bob and @dave, see @carol.")
        .await
        .unwrap();
    alice.send_text("room:team", "no mention").await.unwrap();
    let f = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = f else {
        unreachable!()
    };
    assert_eq!(m.mentions, ["bob", "carol"], "members only, each once");
    let (status, list) = get(&server, "bob", "/api/conversations").await;
    assert_eq!(status, 200);
    let team = list["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conv"] == "room:team")
        .unwrap()
        .clone();
    assert_eq!(
        (team["unread"].as_u64(), team["mentions"].as_u64()),
        (Some(2), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_the_callers_messages_newest_first_in_pages() {
    let server = TestServer::start().await;
    let (alice, _bob, _carol) = room_of_three(&server).await;
    let outsider = server.connect("eve").await;
    outsider.join("elsewhere").await.unwrap();
    outsider
        .send_text("room:elsewhere", "deployment secrets")
        .await
        .unwrap();
    for i in 0..5 {
        alice
            .send_text("room:team", &format!("deployment number {i}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let (status, page) = get(&server, "bob", "/api/search?q=DEPLOY&limit=3").await;
    assert_eq!(status, 200, "{page}");
    let results = page["results"].as_array().unwrap();
    let texts: Vec<&str> = results
        .iter()
        .map(|r| r["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "deployment number 4",
            "deployment number 3",
            "deployment number 2"
        ]
    );
    assert_eq!(results[0]["highlight"], "[deployment] number 4");
    assert_eq!(results[0]["from"], "alice");
    let next = page["next"].as_str().expect("a next page");
    let (_, rest) = get(
        &server,
        "bob",
        &format!("/api/search?q=deploy&before={}", urlencode(next)),
    )
    .await;
    assert_eq!(rest["results"].as_array().unwrap().len(), 2);
    assert!(rest["next"].is_null());
    // Narrowed to a conversation the caller may not read.
    let (status, body) = get(&server, "bob", "/api/search?q=deploy&conv=room:elsewhere").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_member")));
    // Bad queries.
    let long = "a".repeat(257);
    for bad in [
        "q=",
        "q=%20%20",
        &format!("q={long}"),
        "q=x&limit=0",
        "q=x&limit=101",
        "q=x&before=nonsense",
    ] {
        let (status, body) = get(&server, "bob", &format!("/api/search?{bad}")).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_listed_for_members_and_an_admin_removes_one() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = room_of_three(&server).await;
    let (mut bob, mut carol) = (bob, carol);
    let (status, list) = get(&server, "bob", "/api/rooms/team/members").await;
    assert_eq!(status, 200);
    let members: Vec<(String, String, bool)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
                m["online"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        members,
        [
            ("alice".into(), "admin".into(), true),
            ("bob".into(), "member".into(), true),
            ("carol".into(), "member".into(), true)
        ]
    );
    let (status, body) = get(&server, "eve", "/api/rooms/team/members").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_member")));
    // Only an admin removes.
    let e = carol.remove("team", "bob").await.unwrap_err();
    assert_eq!(error_code(e), ErrorCode::Forbidden);
    alice
        .remove("team", "bob")
        .await
        .expect("the admin removes bob");
    for who in [&mut bob, &mut carol] {
        let f = who
            .wait_for(WAIT, |f| {
                matches!(
                    f,
                    ServerFrame::Member {
                        event: MemberEvent::Removed,
                        ..
                    }
                )
            })
            .await
            .unwrap();
        let ServerFrame::Member {
            user, event, by, ..
        } = f
        else {
            unreachable!()
        };
        assert_eq!(
            (user.as_str(), event, by.as_deref()),
            ("bob", MemberEvent::Removed, Some("alice"))
        );
    }
    let e = bob.send_text("room:team", "still here?").await.unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember);
    let e = alice.remove("team", "bob").await.unwrap_err();
    assert_eq!(error_code(e), ErrorCode::NotMember, "no longer a member");
}

#[tokio::test]
async fn welcome_carries_the_configured_ice_servers() {
    let none = TestServer::start().await;
    assert!(none.connect("a").await.welcome().ice_servers.is_empty());
    let stun = json!({"urls": ["stun:stun.example.org:3478"]});
    let with = {
        let stun = stun.clone();
        TestServer::with(move |c| c.ice_servers = vec![stun]).await
    };
    assert_eq!(with.connect("a").await.welcome().ice_servers, [stun]);
}
