//! Micro-benchmarks of the store reads made on every connect, disconnect and `sync`: the
//! list of a user's conversations. `conversations` also counts each one's unread
//! messages (for the HTTP API); `memberships` gives only ids and last seqs (for presence,
//! `sync` and the room limit). And history pages of one room among busy ones: the newest
//! page (opening a conversation) and the page after a seq (catching up).
//!
//! The user is a member of `ROOMS` rooms, each holding `n` messages from someone else
//! that the user has not read.
//!
//! Run with `cargo bench -p hubbub-server --bench store_read`.

use std::sync::Arc;
use std::time::Duration;

use divan::Bencher;
use hubbub_protocol::{ContentType, Conv};
use hubbub_server::metrics::Metrics;
use hubbub_server::store::{CommitHook, HistoryQuery, NewMessage, SqliteStore, Store};
use serde_json::Value;
use tempfile::TempDir;

/// Rooms the user belongs to.
const ROOMS: usize = 20;
/// Unread messages per room.
const UNREAD: [u64; 3] = [0, 100, 1000];

fn main() {
    divan::main();
}

/// A text from "alice" to `conv`.
fn text(conv: &str, client_msg_id: String, body: String) -> NewMessage {
    NewMessage {
        conv: conv.to_string(),
        from: "alice".into(),
        client_msg_id,
        content_type: ContentType::Text,
        content: Value::String(body),
        dm_members: None,
        origin: 1,
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// A store where "bob" has `unread` unread messages in each of [`ROOMS`] rooms.
fn setup(unread: u64) -> (SqliteStore, tokio::runtime::Runtime, TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("hubbub-store-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let hook: CommitHook = Arc::new(|_| {});
    let store = SqliteStore::open_with(dir.path(), hook, Metrics::new(), Duration::from_secs(5))
        .expect("open store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for r in 0..ROOMS {
            let conv = Conv::room_id(&format!("r{r}"));
            store.join_room(&conv, "alice").await.expect("join");
            store.join_room(&conv, "bob").await.expect("join");
            let appends: Vec<_> = (0..unread)
                .map(|i| store.append(text(&conv, format!("c-{r}-{i}"), format!("message {i}"))))
                .collect();
            for a in appends {
                a.await.expect("append");
            }
        }
    });
    (store, rt, dir)
}

#[divan::bench(args = UNREAD)]
fn conversations(bencher: Bencher, unread: u64) {
    let (store, rt, _dir) = setup(unread);
    bencher.bench_local(|| rt.block_on(store.conversations("bob")).expect("read"));
}

#[divan::bench(args = UNREAD)]
fn memberships(bencher: Bencher, unread: u64) {
    let (store, rt, _dir) = setup(unread);
    bencher.bench_local(|| rt.block_on(store.memberships("bob")).expect("read"));
}

/// Rooms whose messages arrive interleaved, and messages per room, for the history pages.
const BUSY_ROOMS: usize = 20;
const PER_ROOM: u64 = 1000;

/// A store with [`BUSY_ROOMS`] rooms of [`PER_ROOM`] messages each, sent in turn (one to
/// each room, again and again), as busy rooms fill a store.
fn busy_rooms() -> (SqliteStore, tokio::runtime::Runtime, TempDir) {
    let (store, rt, dir) = setup(0);
    rt.block_on(async {
        for i in 0..PER_ROOM {
            let appends: Vec<_> = (0..BUSY_ROOMS)
                .map(|r| {
                    store.append(text(
                        &Conv::room_id(&format!("r{r}")),
                        format!("h-{r}-{i}"),
                        format!("message {i} of a busy room, some words"),
                    ))
                })
                .collect();
            for a in appends {
                a.await.expect("append");
            }
        }
    });
    (store, rt, dir)
}

/// The newest `limit` messages of one busy room.
#[divan::bench(args = [50, 200])]
fn history_latest(bencher: Bencher, limit: u32) {
    let (store, rt, _dir) = busy_rooms();
    let conv = Conv::room_id("r7");
    bencher.bench_local(|| {
        rt.block_on(store.history(&conv, HistoryQuery::Latest { limit }))
            .expect("read")
    });
}

/// The `limit` messages after seq 500 of one busy room.
#[divan::bench(args = [50, 200])]
fn history_after(bencher: Bencher, limit: u32) {
    let (store, rt, _dir) = busy_rooms();
    let conv = Conv::room_id("r7");
    bencher.bench_local(|| {
        rt.block_on(store.history(&conv, HistoryQuery::After { after: 500, limit }))
            .expect("read")
    });
}
