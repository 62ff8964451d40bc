//! The conformance suite every [`Store`] implementation must pass.
//!
//! Each property is a public async function taking a [`Fixture`]: a fresh, empty store
//! whose commit hook records every [`Committed`] change. An implementation's test file
//! runs them all with one macro line:
//!
//! ```ignore
//! hubbub_server::store_conformance!(my_factory);
//! // where: async fn my_factory(hook: CommitHook) -> (Arc<dyn Store>, Box<dyn Any + Send>)
//! ```
//!
//! The second element of the factory's result keeps whatever the store needs alive for
//! the test (a temp dir, a database server handle).
//!
//! Compiled only with the cargo feature `conformance`: a store's tests turn it on with a
//! dev-dependency on `hubbub-server` with `features = ["conformance"]` (hubbub-server's
//! own tests do it through a dev-dependency on itself).

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::Arc;

use hubbub_protocol::{ContentType, Message};
use parking_lot::Mutex;
use serde_json::json;

use super::{
    now_ms, CommitHook, Committed, ConvSummary, FileMeta, HistoryQuery, Membership, NewMessage,
    Store, StoreError,
};

/// A fresh store and the changes its commit hook has seen.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub committed: Arc<Mutex<Vec<Committed>>>,
    _keep: Box<dyn Any + Send>,
}

impl Fixture {
    /// Builds a fixture from a factory.
    pub async fn new<F, Fut>(factory: F) -> Fixture
    where
        F: FnOnce(CommitHook) -> Fut,
        Fut: std::future::Future<Output = (Arc<dyn Store>, Box<dyn Any + Send>)>,
    {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let log = committed.clone();
        let hook: CommitHook = Arc::new(move |c| log.lock().push(c));
        let (store, keep) = factory(hook).await;
        Fixture {
            store,
            committed,
            _keep: keep,
        }
    }
}

fn text(conv: &str, from: &str, cid: &str, body: &str) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: from.into(),
        client_msg_id: cid.into(),
        content_type: ContentType::Text,
        content: json!(body),
        dm_members: None,
        origin: 7,
        reply_to: None,
        mentions: Vec::new(),
    }
}

fn dm(a: &str, b: &str, from: &str, cid: &str, body: &str) -> NewMessage {
    NewMessage {
        dm_members: Some((a.into(), b.into())),
        ..text(&format!("dm:{a}:{b}"), from, cid, body)
    }
}

async fn append(s: &dyn Store, m: NewMessage) -> Message {
    s.append(m).await.expect("append").message
}

async fn seqs(s: &dyn Store, conv: &str) -> Vec<u64> {
    s.history(
        conv,
        HistoryQuery::After {
            after: 0,
            limit: 10_000,
        },
    )
    .await
    .expect("history")
    .messages
    .iter()
    .map(|m| m.seq)
    .collect()
}

/// `seq` is 1, 2, 3, ... per conversation, independent across conversations.
pub async fn seq_is_contiguous_per_conversation(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:a", "u").await.unwrap();
    s.join_room("room:b", "u").await.unwrap();
    for i in 0..5 {
        let m = append(s, text("room:a", "u", &format!("a{i}"), "x")).await;
        assert_eq!(m.seq, i + 1);
    }
    for i in 0..3 {
        let m = append(s, text("room:b", "u", &format!("b{i}"), "x")).await;
        assert_eq!(m.seq, i + 1);
    }
    assert_eq!(seqs(s, "room:a").await, vec![1, 2, 3, 4, 5]);
    assert_eq!(s.last_seq("room:a").await.unwrap(), 5);
    assert_eq!(s.last_seq("room:b").await.unwrap(), 3);
    assert_eq!(s.last_seq("room:none").await.unwrap(), 0);
}

/// Concurrent appends to one conversation get exactly 1..=N, no gaps, no repeats, and
/// calls made one after the other are numbered in call order.
pub async fn concurrent_appends_have_no_gaps(f: Fixture) {
    let s = f.store.clone();
    for t in 0..8 {
        s.join_room("room:busy", &format!("u{t}")).await.unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // Issue 100 appends without awaiting in between: seqs follow call order.
            let futs: Vec<_> = (0..100)
                .map(|i| {
                    s.append(text(
                        "room:busy",
                        &format!("u{t}"),
                        &format!("{t}-{i}"),
                        "x",
                    ))
                })
                .collect();
            let mut got = Vec::new();
            for fut in futs {
                got.push(fut.await.expect("append").message.seq);
            }
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "call order kept: {got:?}"
            );
            got
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for seq in t.await.unwrap() {
            assert!(all.insert(seq), "seq {seq} given twice");
        }
    }
    assert_eq!(all, (1..=800).collect());
    assert_eq!(seqs(&*s, "room:busy").await, (1..=800).collect::<Vec<_>>());
}

/// A retried append (same sender, same `client_msg_id`) returns the original and
/// stores nothing; another sender's equal id is a different message; reusing an id in
/// another conversation is a conflict.
pub async fn appends_are_idempotent_per_sender(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:a", "u").await.unwrap();
    let first = s
        .append(text("room:a", "u", "same", "hello"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = s
        .append(text("room:a", "u", "same", "hello"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message, first.message);
    s.join_room("room:a", "v").await.unwrap();
    let other = s
        .append(text("room:a", "v", "same", "hello"))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 2);
    assert_eq!(seqs(s, "room:a").await, vec![1, 2]);
    match s.append(text("room:b", "u", "same", "hello")).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Refused in a DM that has no message yet: the DM is not created either.
    match s.append(dm("u", "w", "u", "same", "hello")).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(s.conversations("w").await.unwrap().is_empty());
    let news = f
        .committed
        .lock()
        .iter()
        .filter(|c| matches!(c, Committed::Message { .. }))
        .count();
    assert_eq!(news, 2, "the hook never hears of duplicates");
}

/// The commit hook hears of each new message once, in commit order, with its origin.
pub async fn commit_hook_sees_messages_in_order(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:a", "u").await.unwrap();
    let futs: Vec<_> = (0..20)
        .map(|i| s.append(text("room:a", "u", &format!("c{i}"), &format!("m{i}"))))
        .collect();
    for fut in futs {
        fut.await.unwrap();
    }
    let log = f.committed.lock();
    let got: Vec<(u64, u64)> = log
        .iter()
        .filter_map(|c| match c {
            Committed::Message { message, origin } => Some((message.seq, *origin)),
            _ => None,
        })
        .collect();
    assert_eq!(got, (1..=20).map(|s| (s, 7)).collect::<Vec<_>>());
}

/// History pages: newest, before, after, and `has_more` at the edges.
pub async fn history_pages_in_both_directions(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:h", "u").await.unwrap();
    for i in 1..=10 {
        append(s, text("room:h", "u", &format!("h{i}"), &format!("m{i}"))).await;
    }
    let page = |q| async move {
        let p = s.history("room:h", q).await.unwrap();
        (
            p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            p.has_more,
        )
    };
    assert_eq!(
        page(HistoryQuery::Latest { limit: 3 }).await,
        (vec![8, 9, 10], true)
    );
    assert!(!page(HistoryQuery::Latest { limit: 10 }).await.1);
    assert_eq!(
        page(HistoryQuery::Before {
            before: 8,
            limit: 3
        })
        .await,
        (vec![5, 6, 7], true)
    );
    assert_eq!(
        page(HistoryQuery::Before {
            before: 4,
            limit: 3
        })
        .await,
        (vec![1, 2, 3], false)
    );
    assert_eq!(
        page(HistoryQuery::After { after: 0, limit: 4 }).await,
        (vec![1, 2, 3, 4], true)
    );
    assert_eq!(
        page(HistoryQuery::After { after: 7, limit: 3 }).await,
        (vec![8, 9, 10], false)
    );
    assert_eq!(
        page(HistoryQuery::After {
            after: 10,
            limit: 3
        })
        .await,
        (vec![], false)
    );
    let m = s.message("room:h", 4).await.unwrap().unwrap();
    assert_eq!((m.seq, m.content), (4, Some(json!("m4"))));
    assert_eq!(s.message("room:h", 11).await.unwrap(), None);
}

/// The store has the last word on who may post in a room: an append from a non-member
/// is refused in the transaction that would store it. A retry of a send stored while
/// the sender was a member still returns the stored message.
pub async fn only_members_append_to_a_room(f: Fixture) {
    let s = &*f.store;
    match s.append(text("room:m", "eve", "e1", "hi")).await {
        Err(StoreError::NotMember(_)) => {}
        other => panic!("expected not a member, got {other:?}"),
    }
    s.join_room("room:m", "bob").await.unwrap();
    let first = append(s, text("room:m", "bob", "b1", "hi")).await;
    assert!(s.leave_room("room:m", "bob", None).await.unwrap().is_some());
    match s.append(text("room:m", "bob", "b2", "again")).await {
        Err(StoreError::NotMember(_)) => {}
        other => panic!("expected not a member, got {other:?}"),
    }
    let retry = s.append(text("room:m", "bob", "b1", "hi")).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message, first);
    assert_eq!(seqs(s, "room:m").await, vec![1], "a refusal takes no seq");
}

/// Joins and leaves reach the commit hook in commit order, between the messages they
/// were committed between, each with the room's last seq then; a join of a member or a
/// leave of a non-member announces nothing.
pub async fn joins_and_leaves_are_announced_in_commit_order(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:j", "alice").await.unwrap();
    append(s, text("room:j", "alice", "j1", "one")).await;
    s.join_room("room:j", "bob").await.unwrap();
    s.join_room("room:j", "bob").await.unwrap();
    append(s, text("room:j", "alice", "j2", "two")).await;
    // A leave answers the room's last seq when it committed; a non-member's, nothing.
    assert_eq!(s.leave_room("room:j", "bob", None).await.unwrap(), Some(2));
    assert_eq!(s.leave_room("room:j", "bob", None).await.unwrap(), None);
    append(s, text("room:j", "alice", "j3", "three")).await;
    let seen: Vec<String> = f
        .committed
        .lock()
        .iter()
        .filter(|c| c.conv() == "room:j")
        .map(|c| match c {
            Committed::Message { message, .. } => format!("m{}", message.seq),
            Committed::Member {
                user, joined, at, ..
            } => format!("{user}{}@{at}", if *joined { "+" } else { "-" }),
            other => format!("{other:?}"),
        })
        .collect();
    // `at`: the room's last seq when the change committed.
    assert_eq!(seen, ["alice+@0", "m1", "bob+@1", "m2", "bob-@2", "m3"]);
}

/// `watermark` is never later than the stamp of a change that is not committed yet: a
/// `sync` that reports it as `server_time` misses nothing with `since` later.
pub async fn the_watermark_is_never_after_a_pending_stamp(f: Fixture) {
    let s = f.store.clone();
    s.join_room("room:w", "u").await.unwrap();
    append(&*s, text("room:w", "u", "w1", "v0")).await;
    // An idle store's watermark is recent: now, or a fixed margin behind it for a store
    // that other nodes write to as well (their batches' stamps are not seen here).
    let idle = s.watermark();
    assert!(
        idle >= now_ms() - 60_000,
        "an idle store's watermark is at most a minute in the past"
    );
    let edits = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut stamps = Vec::new();
            for i in 0..200 {
                stamps.push(
                    s.edit("room:w", 1, json!(format!("v{i}")), vec![], 0)
                        .await
                        .unwrap(),
                );
            }
            stamps
        })
    };
    // A read that starts after the watermark was taken shows every change stamped
    // before it: no edit is stamped between the edit a read shows and the watermark.
    let mut seen = Vec::new();
    while !edits.is_finished() && seen.len() < 100_000 {
        let mark = s.watermark().min(now_ms());
        let shown = s.message("room:w", 1).await.unwrap().unwrap();
        seen.push((mark, shown.edited_at.unwrap_or(0)));
        tokio::task::yield_now().await;
    }
    let stamps = edits.await.unwrap();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
    for (mark, shown) in seen {
        let hidden = stamps.iter().find(|&&t| t > shown && t < mark);
        assert!(
            hidden.is_none(),
            "a read after watermark {mark} showed the edit of {shown} but not that of {hidden:?}"
        );
    }
}

/// Rooms: the first join creates the room and makes the joiner its admin.
pub async fn rooms_membership_and_roles(f: Fixture) {
    let s = &*f.store;
    let first = s.join_room("room:r", "alice").await.unwrap();
    assert!(first.created && first.added);
    let second = s.join_room("room:r", "bob").await.unwrap();
    assert!(!second.created && second.added);
    let again = s.join_room("room:r", "bob").await.unwrap();
    assert!(!again.created && !again.added);
    assert_eq!(
        s.member_role("room:r", "alice").await.unwrap().as_deref(),
        Some("admin")
    );
    assert_eq!(
        s.member_role("room:r", "bob").await.unwrap().as_deref(),
        Some("member")
    );
    assert_eq!(s.member_role("room:r", "carol").await.unwrap(), None);
    let mut members = s.members("room:r").await.unwrap();
    members.sort();
    assert_eq!(members, vec!["alice", "bob"]);
    assert!(s.is_member("room:r", "bob").await.unwrap());
    assert!(s.leave_room("room:r", "bob", None).await.unwrap().is_some());
    assert!(s.leave_room("room:r", "bob", None).await.unwrap().is_none());
    assert!(!s.is_member("room:r", "bob").await.unwrap());
    s.join_room("room:q", "carol").await.unwrap();
    let rooms = s.rooms(None, 10).await.unwrap();
    let counts: Vec<(String, u64)> = rooms.into_iter().map(|r| (r.conv, r.members)).collect();
    assert_eq!(counts, vec![("room:q".into(), 1), ("room:r".into(), 1)]);
    // Pages in name order, after a cursor.
    let first = s.rooms(None, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].conv, "room:q");
    let next = s.rooms(Some("room:q"), 1).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].conv, "room:r");
    assert!(s.rooms(Some("room:r"), 1).await.unwrap().is_empty());
    append(s, text("room:r", "alice", "j1", "x")).await;
    assert_eq!(s.join_room("room:r", "bob").await.unwrap().last_seq, 1);
}

/// A DM's two users become its members with its first message; conversations list
/// rooms and DMs with read positions and unread counts that exclude one's own messages.
pub async fn conversations_read_cursors_and_unread(f: Fixture) {
    let s = &*f.store;
    append(s, dm("a", "b", "a", "d1", "hi")).await;
    append(s, dm("a", "b", "b", "d2", "yo")).await;
    append(s, dm("a", "b", "a", "d3", "?")).await;
    assert!(s.is_member("dm:a:b", "a").await.unwrap());
    assert!(s.is_member("dm:a:b", "b").await.unwrap());
    assert!(s.share_conversation("a", "b").await.unwrap());
    assert!(!s.share_conversation("a", "c").await.unwrap());
    s.join_room("room:x", "b").await.unwrap();
    s.join_room("room:x", "c").await.unwrap();
    append(s, text("room:x", "c", "x1", "hello")).await;
    assert!(s.share_conversation("b", "c").await.unwrap());

    let b = s.conversations("b").await.unwrap();
    let find = |conv: &str| b.iter().find(|c| c.conv == conv).cloned().unwrap();
    let d = find("dm:a:b");
    assert_eq!(
        (d.last_seq, d.read_seq, d.unread),
        (3, 0, 2),
        "b's own message is not unread"
    );
    let r = find("room:x");
    assert_eq!((r.last_seq, r.read_seq, r.unread), (1, 0, 1));
    let heads = |v: &[ConvSummary]| {
        v.iter()
            .map(|c| Membership {
                conv: c.conv.clone(),
                last_seq: c.last_seq,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(s.memberships("b").await.unwrap(), heads(&b));
    assert!(s.memberships("nobody").await.unwrap().is_empty());

    assert_eq!(s.mark_read("dm:a:b", "b", 2, 9).await.unwrap(), 2);
    assert_eq!(
        s.mark_read("dm:a:b", "b", 1, 9).await.unwrap(),
        2,
        "never backwards"
    );
    assert_eq!(
        s.mark_read("dm:a:b", "b", 99, 9).await.unwrap(),
        3,
        "capped at the last"
    );
    let d = s
        .conversations("b")
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.conv == "dm:a:b")
        .unwrap();
    assert_eq!((d.read_seq, d.unread), (3, 0));
    let receipts: Vec<u64> = f
        .committed
        .lock()
        .iter()
        .filter_map(|c| match c {
            Committed::Receipt {
                user,
                seq,
                origin: 9,
                ..
            } if user == "b" => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, vec![2, 3], "only forward moves are announced");
}

/// Recall erases content and keeps the seq; edit replaces content; both are announced.
pub async fn recall_and_edit(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:e", "u").await.unwrap();
    append(s, text("room:e", "u", "e1", "secret")).await;
    append(s, text("room:e", "u", "e2", "typo")).await;

    s.recall("room:e", 1, "u", 3).await.unwrap();
    s.recall("room:e", 1, "u", 3).await.unwrap();
    let m = s.message("room:e", 1).await.unwrap().unwrap();
    assert!(m.recalled);
    assert_eq!(m.content, None);
    let page = s
        .history("room:e", HistoryQuery::Latest { limit: 10 })
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 2);
    assert!(page.messages[0].recalled && page.messages[0].content.is_none());

    let edited_at = s
        .edit("room:e", 2, json!("fixed"), vec![], 4)
        .await
        .unwrap();
    let m = s.message("room:e", 2).await.unwrap().unwrap();
    assert_eq!(
        (m.content, m.edited_at),
        (Some(json!("fixed")), Some(edited_at))
    );
    match s.edit("room:e", 1, json!("back"), vec![], 4).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("editing a recalled message: {other:?}"),
    }
    match s.edit("room:e", 9, json!("x"), vec![], 4).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("editing a missing message: {other:?}"),
    }
    match s.recall("room:e", 9, "u", 4).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("recalling a missing message: {other:?}"),
    }
    // Both changes are reported as current state to a reconnecting reader, once each.
    let changes = s.changes_since("room:e", 0, 2).await.unwrap();
    assert!(matches!(&changes[0], Committed::Recalled { seq: 1, by, .. } if by == "u"));
    assert!(matches!(
        &changes[1],
        Committed::Edited { seq: 2, content, edited_at: e, .. }
            if *content == json!("fixed") && *e == edited_at
    ));
    assert_eq!(changes.len(), 2);
    assert!(
        s.changes_since("room:e", 0, 1).await.unwrap().len() == 1,
        "only up to the cursor"
    );
    assert!(
        s.changes_since("room:e", edited_at, 2)
            .await
            .unwrap()
            .is_empty(),
        "only after since"
    );

    let log = f.committed.lock();
    let recalls = log
        .iter()
        .filter(|c| {
            matches!(
                c,
                Committed::Recalled {
                    seq: 1,
                    origin: 3,
                    ..
                }
            )
        })
        .count();
    assert_eq!(recalls, 1, "a second recall changes nothing");
    assert!(log.iter().any(|c| matches!(
        c,
        Committed::Edited { seq: 2, origin: 4, edited_at: e, .. } if *e == edited_at
    )));
}

/// Account names are unique up to look-alikes, and guest names and account names never
/// meet, in either order.
pub async fn guest_names_and_account_names_never_meet(f: Fixture) {
    let s = &*f.store;
    s.create_user("alice", "$argon2id$hash").await.unwrap();
    for lookalike in ["Alice", "ALICE", "aIice", "a1ice", "alIce"] {
        match s.create_user(lookalike, "$argon2id$other").await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{lookalike} next to alice: {other:?}"),
        }
        match s.claim_guest_name(lookalike).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("guest {lookalike} next to account alice: {other:?}"),
        }
    }
    match s.claim_guest_name("alice").await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("guest alice next to account alice: {other:?}"),
    }
    s.claim_guest_name("b0b").await.unwrap();
    s.claim_guest_name("b0b").await.unwrap();
    for lookalike in ["b0b", "BOB", "bob"] {
        match s.create_user(lookalike, "$argon2id$hash").await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("account {lookalike} after guest b0b: {other:?}"),
        }
    }
    assert_eq!(s.password_hash("bob").await.unwrap(), None);
    s.create_user("carol", "$argon2id$hash").await.unwrap();
}

/// Accounts and files.
pub async fn accounts_and_files(f: Fixture) {
    let s = &*f.store;
    s.create_user("alice", "$argon2id$hash").await.unwrap();
    match s.create_user("alice", "$argon2id$other").await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a taken name: {other:?}"),
    }
    assert_eq!(
        s.password_hash("alice").await.unwrap().as_deref(),
        Some("$argon2id$hash")
    );
    assert_eq!(s.password_hash("bob").await.unwrap(), None);
    let meta = FileMeta {
        id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
        name: "cat.png".into(),
        mime: "image/png".into(),
        size: 1234,
        uploader: "alice".into(),
        created_at: 1_700_000_000_000,
    };
    assert!(s.put_file(meta.clone(), u64::MAX).await.unwrap());
    assert_eq!(s.file(&meta.id).await.unwrap(), Some(meta));
    assert_eq!(s.file("nope").await.unwrap(), None);
    s.ping().await.unwrap();
}

/// A file is visible to its uploader and to members of conversations it was sent to
/// (by append or edit), and no longer to someone who left the room.
pub async fn files_are_visible_to_uploader_and_recipients(f: Fixture) {
    let s = &*f.store;
    let id = "01ARZ3NDEKTSV4RRFFQ69G5FAW";
    s.put_file(
        FileMeta {
            id: id.into(),
            name: "a.png".into(),
            mime: "image/png".into(),
            size: 1,
            uploader: "alice".into(),
            created_at: 0,
        },
        u64::MAX,
    )
    .await
    .unwrap();
    let attachment = json!({"url": format!("/files/{id}/a.png"), "name": "a.png"});
    assert!(s.may_read_file(id, "alice").await.unwrap());
    assert!(!s.may_read_file(id, "bob").await.unwrap());
    let mut m = dm("alice", "bob", "alice", "f1", "");
    m.content_type = ContentType::Image;
    m.content = attachment.clone();
    append(s, m).await;
    assert!(s.may_read_file(id, "bob").await.unwrap());
    assert!(!s.may_read_file(id, "carol").await.unwrap());

    s.join_room("room:pics", "alice").await.unwrap();
    s.join_room("room:pics", "carol").await.unwrap();
    append(s, text("room:pics", "alice", "f2", "soon")).await;
    assert!(!s.may_read_file(id, "carol").await.unwrap());
    s.edit("room:pics", 1, attachment, vec![], 1).await.unwrap();
    assert!(
        s.may_read_file(id, "carol").await.unwrap(),
        "shared by an edit"
    );
    s.leave_room("room:pics", "carol", None).await.unwrap();
    assert!(
        !s.may_read_file(id, "carol").await.unwrap(),
        "former members lose access"
    );
    assert!(!s.may_read_file("nope", "alice").await.unwrap());
}

fn file(id: &str, uploader: &str, size: u64, created_at: i64) -> FileMeta {
    FileMeta {
        id: id.into(),
        name: "a.png".into(),
        mime: "image/png".into(),
        size,
        uploader: uploader.into(),
        created_at,
    }
}

fn attachment(conv: &str, from: &str, cid: &str, id: &str) -> NewMessage {
    let mut m = text(conv, from, cid, "");
    m.content_type = ContentType::Image;
    m.content = json!({"url": format!("/files/{id}/a.png"), "name": "a.png"});
    m
}

/// Sending a file's URL shares the file only when the sender may read it at that moment:
/// someone who merely saw the URL, or who lost access by leaving, grants nothing.
pub async fn a_url_shares_a_file_only_when_its_sender_may_read_it(f: Fixture) {
    let s = &*f.store;
    let id = "01ARZ3NDEKTSV4RRFFQ69G5FB0";
    assert!(s.put_file(file(id, "alice", 1, 0), u64::MAX).await.unwrap());
    for (room, who) in [("room:a", "alice"), ("room:a", "bob"), ("room:b", "bob")] {
        s.join_room(room, who).await.unwrap();
    }
    s.join_room("room:b", "carol").await.unwrap();
    s.join_room("room:c", "mallory").await.unwrap();
    s.join_room("room:c", "dave").await.unwrap();

    // mallory never could read it: her message shares nothing.
    append(s, attachment("room:c", "mallory", "m1", id)).await;
    assert!(!s.may_read_file(id, "mallory").await.unwrap());
    assert!(
        !s.may_read_file(id, "dave").await.unwrap(),
        "a URL alone grants nothing"
    );

    // bob may read it once alice shared it in room:a, so his forward to room:b shares it.
    append(s, attachment("room:a", "alice", "a1", id)).await;
    assert!(s.may_read_file(id, "bob").await.unwrap());
    append(s, attachment("room:b", "bob", "b1", id)).await;
    assert!(
        s.may_read_file(id, "carol").await.unwrap(),
        "forwarded by a reader"
    );

    // After leaving room:a, bob's access is gone and his new forward shares nothing.
    s.join_room("room:d", "bob").await.unwrap();
    s.join_room("room:d", "erin").await.unwrap();
    s.leave_room("room:a", "bob", None).await.unwrap();
    s.leave_room("room:b", "bob", None).await.unwrap();
    assert!(!s.may_read_file(id, "bob").await.unwrap());
    append(s, attachment("room:d", "bob", "d1", id)).await;
    assert!(
        !s.may_read_file(id, "erin").await.unwrap(),
        "an ex-member grants nothing"
    );
    // Editing a message to point to the file follows the same rule.
    append(s, text("room:c", "mallory", "m2", "hi")).await;
    s.edit(
        "room:c",
        2,
        json!({"url": format!("/files/{id}/a.png")}),
        vec![],
        0,
    )
    .await
    .unwrap();
    assert!(
        !s.may_read_file(id, "dave").await.unwrap(),
        "nor an edit by a non-reader"
    );
}

/// A recalled message no longer shares its file, and neither does one edited to point
/// elsewhere; another message that still shares it keeps it readable.
pub async fn a_recalled_or_edited_attachment_no_longer_shares_its_file(f: Fixture) {
    let s = &*f.store;
    let (id, other) = ("01ARZ3NDEKTSV4RRFFQ69G5FB1", "01ARZ3NDEKTSV4RRFFQ69G5FB2");
    assert!(s.put_file(file(id, "alice", 1, 0), u64::MAX).await.unwrap());
    assert!(s
        .put_file(file(other, "alice", 1, 0), u64::MAX)
        .await
        .unwrap());
    s.join_room("room:r", "alice").await.unwrap();
    s.join_room("room:r", "bob").await.unwrap();
    let first = append(s, attachment("room:r", "alice", "r1", id)).await;
    let second = append(s, attachment("room:r", "alice", "r2", id)).await;
    assert!(s.may_read_file(id, "bob").await.unwrap());
    s.recall("room:r", first.seq, "alice", 0).await.unwrap();
    assert!(
        s.may_read_file(id, "bob").await.unwrap(),
        "still shared by the second message"
    );
    s.edit(
        "room:r",
        second.seq,
        json!({"url": format!("/files/{other}/a.png")}),
        vec![],
        0,
    )
    .await
    .unwrap();
    assert!(!s.may_read_file(id, "bob").await.unwrap(), "edited away");
    assert!(s.may_read_file(other, "bob").await.unwrap(), "edited in");
    s.recall("room:r", second.seq, "alice", 0).await.unwrap();
    assert!(!s.may_read_file(other, "bob").await.unwrap(), "recalled");
    assert!(
        s.may_read_file(id, "alice").await.unwrap(),
        "the uploader keeps it"
    );
}

/// Uploads count against their uploader's quota; files no message shares are collected
/// once old enough, shared ones never.
pub async fn uploads_have_a_quota_and_unshared_ones_are_collected(f: Fixture) {
    let s = &*f.store;
    let ids = [
        "01ARZ3NDEKTSV4RRFFQ69G5FC0",
        "01ARZ3NDEKTSV4RRFFQ69G5FC1",
        "01ARZ3NDEKTSV4RRFFQ69G5FC2",
        "01ARZ3NDEKTSV4RRFFQ69G5FC3",
    ];
    assert!(s
        .put_file(file(ids[0], "alice", 600, 1_000), 1_000)
        .await
        .unwrap());
    assert!(
        !s.put_file(file(ids[1], "alice", 401, 2_000), 1_000)
            .await
            .unwrap(),
        "over the quota"
    );
    assert_eq!(s.file(ids[1]).await.unwrap(), None, "nothing stored");
    assert!(s
        .put_file(file(ids[1], "alice", 400, 2_000), 1_000)
        .await
        .unwrap());
    assert!(
        s.put_file(file(ids[2], "bob", 900, 3_000), 1_000)
            .await
            .unwrap(),
        "per user"
    );
    assert_eq!(s.file_usage("alice").await.unwrap(), 1_000);
    assert_eq!(s.file_usage("nobody").await.unwrap(), 0);
    assert!(s
        .put_file(file(ids[3], "bob", 1, 9_000), 1_000)
        .await
        .unwrap());

    // ids[1] is shared; ids[0] and ids[2] are not and old enough; ids[3] is too new.
    s.join_room("room:g", "alice").await.unwrap();
    append(s, attachment("room:g", "alice", "g1", ids[1])).await;
    let gone = s.delete_unshared_files(5_000, 100).await.unwrap();
    let mut gone: Vec<&str> = gone.iter().map(|f| f.id.as_str()).collect();
    gone.sort();
    assert_eq!(gone, [ids[0], ids[2]]);
    assert_eq!(s.file(ids[0]).await.unwrap(), None);
    assert!(s.file(ids[1]).await.unwrap().is_some());
    assert!(s.file(ids[3]).await.unwrap().is_some());
    assert_eq!(
        s.file_usage("alice").await.unwrap(),
        400,
        "the quota is freed"
    );
    assert!(s
        .delete_unshared_files(5_000, 100)
        .await
        .unwrap()
        .is_empty());

    // A recalled share leaves the file unshared: collected on the next pass.
    s.recall("room:g", 1, "alice", 0).await.unwrap();
    let gone = s.delete_unshared_files(5_000, 1).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, ids[1]);
}

fn reply(conv: &str, from: &str, cid: &str, body: &str, to: u64) -> NewMessage {
    NewMessage {
        reply_to: Some(to),
        ..text(conv, from, cid, body)
    }
}

/// A reply carries the `seq`, sender and the start of the text it answers, in the
/// append's answer, in the commit hook and in history; the excerpt goes when that
/// message is recalled; a reply to a message that does not exist is `Invalid` and
/// stores nothing.
pub async fn replies_point_to_a_message_of_their_conversation(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:q", "alice").await.unwrap();
    s.join_room("room:q", "bob").await.unwrap();
    let long = "x".repeat(300);
    append(s, text("room:q", "alice", "q1", &long)).await;
    let answer = append(s, reply("room:q", "bob", "q2", "agreed", 1)).await;
    let want = hubbub_protocol::ReplyRef {
        seq: 1,
        from: "alice".into(),
        excerpt: Some("x".repeat(hubbub_protocol::EXCERPT_CHARS)),
    };
    assert_eq!(answer.reply_to.as_deref(), Some(&want));
    let hooked = f.committed.lock().iter().find_map(|c| match c {
        Committed::Message { message, .. } if message.seq == 2 && message.conv == "room:q" => {
            message.reply_to.clone()
        }
        _ => None,
    });
    assert_eq!(hooked.as_deref(), Some(&want));
    // A reply to a reply in the same batch of appends finds it.
    let (a, b) = tokio::join!(
        s.append(text("room:q", "alice", "q3", "three")),
        s.append(reply("room:q", "bob", "q4", "to three", 3))
    );
    assert_eq!(a.unwrap().message.seq, 3);
    assert_eq!(
        b.unwrap().message.reply_to.unwrap().excerpt.as_deref(),
        Some("three")
    );
    match s
        .append(reply("room:q", "bob", "q5", "to nothing", 99))
        .await
    {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("a reply to nothing: {other:?}"),
    }
    assert_eq!(s.last_seq("room:q").await.unwrap(), 4, "nothing stored");
    // Retried, the reply is the same message.
    let again = append(s, reply("room:q", "bob", "q2", "agreed", 1)).await;
    assert_eq!((again.seq, again.reply_to.as_deref()), (2, Some(&want)));
    s.recall("room:q", 1, "alice", 0).await.unwrap();
    let page = s
        .history("room:q", HistoryQuery::Latest { limit: 10 })
        .await
        .unwrap();
    let two = page.messages.iter().find(|m| m.seq == 2).unwrap();
    assert_eq!(
        two.reply_to.as_deref(),
        Some(&hubbub_protocol::ReplyRef {
            excerpt: None,
            ..want
        }),
        "the excerpt of a recalled message is gone"
    );
}

/// Reactions: set and cleared once each (a repeat changes and announces nothing), at
/// most 20 different emoji per message, shown in history with the users sorted, gone
/// with a recall (which takes no new ones), and replayed by `changes_since`.
pub async fn reactions_are_kept_per_user_and_emoji(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:x", "alice").await.unwrap();
    append(s, text("room:x", "alice", "x1", "hello")).await;
    append(s, text("room:x", "alice", "x2", "world")).await;
    let before = now_ms() - 1;
    assert!(s.react("room:x", 1, "bob", "👍", true, 3).await.unwrap());
    assert!(s.react("room:x", 1, "alice", "👍", true, 3).await.unwrap());
    assert!(
        !s.react("room:x", 1, "alice", "👍", true, 3).await.unwrap(),
        "already set"
    );
    assert!(s.react("room:x", 1, "alice", "🎉", true, 3).await.unwrap());
    assert!(s.react("room:x", 1, "alice", "🎉", false, 3).await.unwrap());
    assert!(
        !s.react("room:x", 1, "alice", "🎉", false, 3).await.unwrap(),
        "not set"
    );
    let announced: Vec<(String, bool)> = f
        .committed
        .lock()
        .iter()
        .filter_map(|c| match c {
            Committed::Reaction {
                user,
                emoji,
                on,
                origin,
                ..
            } => {
                assert_eq!(*origin, 3);
                Some((format!("{user}{emoji}"), *on))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        announced,
        [
            ("bob👍".to_string(), true),
            ("alice👍".to_string(), true),
            ("alice🎉".to_string(), true),
            ("alice🎉".to_string(), false)
        ]
    );
    let one = s.message("room:x", 1).await.unwrap().unwrap();
    let want: hubbub_protocol::Reactions = [(
        "👍".to_string(),
        vec!["alice".to_string(), "bob".to_string()],
    )]
    .into();
    assert_eq!(one.reactions, want);
    let page = s
        .history("room:x", HistoryQuery::Latest { limit: 10 })
        .await
        .unwrap();
    assert_eq!(page.messages[0].reactions, want);
    assert!(page.messages[1].reactions.is_empty());
    // Replayed as the state now.
    let replay = s.changes_since("room:x", before, 2).await.unwrap();
    assert!(
        replay.iter().any(
            |c| matches!(c, Committed::Reactions { seq: 1, reactions, .. } if *reactions == want)
        ),
        "{replay:?}"
    );
    // 20 different emoji at most; more of one already there is fine.
    for i in 0..19 {
        s.react("room:x", 2, "alice", &format!("e{i}"), true, 0)
            .await
            .unwrap();
    }
    s.react("room:x", 2, "alice", "last", true, 0)
        .await
        .unwrap();
    match s.react("room:x", 2, "alice", "one-too-many", true, 0).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("a 21st emoji: {other:?}"),
    }
    assert!(s.react("room:x", 2, "bob", "last", true, 0).await.unwrap());
    // No such message; a recalled one loses its reactions and takes none.
    match s.react("room:x", 9, "alice", "x", true, 0).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("no message: {other:?}"),
    }
    s.recall("room:x", 1, "alice", 0).await.unwrap();
    assert!(s
        .message("room:x", 1)
        .await
        .unwrap()
        .unwrap()
        .reactions
        .is_empty());
    match s.react("room:x", 1, "bob", "👍", true, 0).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a recalled message: {other:?}"),
    }
}

/// Mentions are stored with the message, counted among the unread of the mentioned
/// user, replaced by an edit and gone with a recall.
pub async fn mentions_are_stored_and_counted_while_unread(f: Fixture) {
    let s = &*f.store;
    for u in ["alice", "bob", "carol"] {
        s.join_room("room:m", u).await.unwrap();
    }
    let m = NewMessage {
        mentions: vec!["bob".into(), "carol".into()],
        ..text("room:m", "alice", "m1", "@bob @carol look")
    };
    assert_eq!(append(s, m).await.mentions, ["bob", "carol"]);
    let m = NewMessage {
        mentions: vec!["bob".into()],
        ..text("room:m", "alice", "m2", "@bob again")
    };
    append(s, m).await;
    append(s, text("room:m", "alice", "m3", "nobody")).await;
    let count = |user: &'static str| async move {
        s.conversations(user)
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.conv == "room:m")
            .unwrap()
            .mentions
    };
    assert_eq!(count("bob").await, 2);
    assert_eq!(count("carol").await, 1);
    assert_eq!(count("alice").await, 0);
    s.mark_read("room:m", "bob", 1, 0).await.unwrap();
    assert_eq!(count("bob").await, 1, "read ones do not count");
    s.edit("room:m", 2, json!("never mind"), vec![], 0)
        .await
        .unwrap();
    assert_eq!(count("bob").await, 0, "edited away");
    let m = s.message("room:m", 1).await.unwrap().unwrap();
    assert_eq!(m.mentions, ["bob", "carol"]);
    s.recall("room:m", 1, "alice", 0).await.unwrap();
    assert_eq!(count("carol").await, 0, "recalled");
    assert!(s
        .message("room:m", 1)
        .await
        .unwrap()
        .unwrap()
        .mentions
        .is_empty());
}

/// Search: every word, the last as a prefix, case-insensitive; only the conversations
/// the user is a member of (or the one asked for); newest first, paged by a cursor;
/// recalled messages never match, edited ones by their new text; the matches are
/// wrapped in `[` `]`.
pub async fn search_finds_words_in_the_users_conversations(f: Fixture) {
    use super::{SearchCursor, SearchQuery};
    let s = &*f.store;
    s.join_room("room:ops", "alice").await.unwrap();
    s.join_room("room:ops", "bob").await.unwrap();
    s.join_room("room:secret", "carol").await.unwrap();
    // A few ms apart, so that newest first is one order.
    let tick = || tokio::time::sleep(std::time::Duration::from_millis(3));
    append(s, text("room:ops", "alice", "s1", "The deployment failed")).await;
    tick().await;
    append(
        s,
        text("room:ops", "bob", "s2", "deployment fixed, Deploy again?"),
    )
    .await;
    tick().await;
    append(s, text("room:ops", "alice", "s3", "lunch")).await;
    append(s, text("room:secret", "carol", "s4", "secret deployment")).await;
    tick().await;
    append(s, dm("alice", "bob", "alice", "s5", "our deployment plan")).await;
    let q = |words: &[&str]| SearchQuery {
        words: words.iter().map(|w| w.to_string()).collect(),
        conv: None,
        limit: 10,
        before: None,
    };
    let found = s.search("alice", q(&["deplo"])).await.unwrap();
    let hits: Vec<(String, u64)> = found.iter().map(|r| (r.conv.clone(), r.seq)).collect();
    assert_eq!(
        hits,
        [
            ("dm:alice:bob".to_string(), 1),
            ("room:ops".to_string(), 2),
            ("room:ops".to_string(), 1)
        ],
        "newest first, never carol's room"
    );
    assert_eq!(found[2].text, "The deployment failed");
    assert_eq!(found[2].highlight, "The [deployment] failed");
    assert_eq!(found[2].from, "alice");
    let both = s.search("alice", q(&["deployment", "fai"])).await.unwrap();
    assert_eq!(both.len(), 1, "every word must match");
    let one_conv = SearchQuery {
        conv: Some("room:ops".into()),
        ..q(&["DEPLOYMENT"])
    };
    assert_eq!(s.search("alice", one_conv).await.unwrap().len(), 2);
    // Paging.
    let first = s
        .search(
            "alice",
            SearchQuery {
                limit: 2,
                ..q(&["deplo"])
            },
        )
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    let last = &first[1];
    let rest = s
        .search(
            "alice",
            SearchQuery {
                before: Some(SearchCursor {
                    ts: last.ts,
                    conv: last.conv.clone(),
                    seq: last.seq,
                }),
                ..q(&["deplo"])
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].conv.as_str(), rest[0].seq), ("room:ops", 1));
    // Recalled never, edited by the new text.
    s.recall("room:ops", 1, "alice", 0).await.unwrap();
    s.edit("room:ops", 2, json!("all good now"), vec![], 0)
        .await
        .unwrap();
    let now = s.search("alice", q(&["deployment"])).await.unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].conv, "dm:alice:bob");
    assert_eq!(s.search("alice", q(&["good"])).await.unwrap().len(), 1);
    // A leaver no longer finds the room's messages.
    s.leave_room("room:ops", "bob", None).await.unwrap();
    assert!(s.search("bob", q(&["good"])).await.unwrap().is_empty());
}

/// A search sees every text stored before it as it is then: edited ones by their new
/// words, recalled ones not at all, also when they changed before any search ran.
pub async fn search_sees_texts_as_they_are_when_it_runs(f: Fixture) {
    use super::SearchQuery;
    let s = &*f.store;
    s.join_room("room:w", "alice").await.unwrap();
    let q = |word: &str| SearchQuery {
        words: vec![word.to_string()],
        conv: None,
        limit: 10,
        before: None,
    };
    append(s, text("room:w", "alice", "w1", "walrus one")).await;
    append(s, text("room:w", "alice", "w2", "walrus two")).await;
    append(s, text("room:w", "alice", "w3", "walrus three")).await;
    s.recall("room:w", 1, "alice", 0).await.unwrap();
    s.edit("room:w", 2, json!("penguin two"), vec![], 0)
        .await
        .unwrap();
    let seqs = |found: Vec<super::SearchResult>| found.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.search("alice", q("walrus")).await.unwrap()), [3]);
    assert_eq!(seqs(s.search("alice", q("penguin")).await.unwrap()), [2]);
    // Sent right after a search, found by the next one.
    append(s, text("room:w", "alice", "w4", "walrus four")).await;
    assert_eq!(seqs(s.search("alice", q("walrus")).await.unwrap()), [4, 3]);
}

/// Room members come with their role and join time; a removal by an admin is
/// announced with who removed.
pub async fn room_members_and_removals(f: Fixture) {
    let s = &*f.store;
    s.join_room("room:r", "alice").await.unwrap();
    s.join_room("room:r", "bob").await.unwrap();
    let members = s.room_members("room:r").await.unwrap();
    let roles: Vec<(&str, &str)> = members
        .iter()
        .map(|m| (m.user.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(roles, [("alice", "admin"), ("bob", "member")]);
    assert!(members.iter().all(|m| m.joined_at > 0));
    assert!(s
        .leave_room("room:r", "bob", Some("alice"))
        .await
        .unwrap()
        .is_some());
    let removal = f.committed.lock().iter().find_map(|c| match c {
        Committed::Member {
            user,
            joined: false,
            by,
            ..
        } => Some((user.clone(), by.clone())),
        _ => None,
    });
    assert_eq!(
        removal,
        Some(("bob".to_string(), Some("alice".to_string())))
    );
    assert_eq!(s.room_members("room:r").await.unwrap().len(), 1);
}

/// Runs every property of the suite as its own `#[tokio::test]`, given an async
/// factory `fn(CommitHook) -> (Arc<dyn Store>, Box<dyn Any + Send>)`.
#[macro_export]
macro_rules! store_conformance {
    ($factory:path) => {
        $crate::store_conformance!(@tests $factory;
            seq_is_contiguous_per_conversation,
            concurrent_appends_have_no_gaps,
            appends_are_idempotent_per_sender,
            commit_hook_sees_messages_in_order,
            history_pages_in_both_directions,
            rooms_membership_and_roles,
            conversations_read_cursors_and_unread,
            recall_and_edit,
            accounts_and_files,
            guest_names_and_account_names_never_meet,
            files_are_visible_to_uploader_and_recipients,
            only_members_append_to_a_room,
            joins_and_leaves_are_announced_in_commit_order,
            the_watermark_is_never_after_a_pending_stamp,
            a_url_shares_a_file_only_when_its_sender_may_read_it,
            a_recalled_or_edited_attachment_no_longer_shares_its_file,
            uploads_have_a_quota_and_unshared_ones_are_collected,
            replies_point_to_a_message_of_their_conversation,
            reactions_are_kept_per_user_and_emoji,
            mentions_are_stored_and_counted_while_unread,
            search_finds_words_in_the_users_conversations,
            search_sees_texts_as_they_are_when_it_runs,
            room_members_and_removals,
        );
    };
    (@tests $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let f = $crate::store::conformance::Fixture::new($factory).await;
                $crate::store::conformance::$name(f).await;
            }
        )*
    };
}
