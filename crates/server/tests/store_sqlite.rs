//! The store conformance suite against the embedded SQLite store, plus what only a
//! file-backed store can show: data survives closing and reopening.

use std::any::Any;
use std::sync::Arc;

use hubbub_server::store::{CommitHook, HistoryQuery, NewMessage, SqliteStore, Store};
use serde_json::json;

async fn sqlite(hook: CommitHook) -> (Arc<dyn Store>, Box<dyn Any + Send>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), hook).expect("open sqlite");
    (Arc::new(store), Box::new(dir))
}

hubbub_server::store_conformance!(sqlite);

/// A text from "u" to `conv`.
fn text(conv: &str, client_msg_id: &str, body: &str) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: "u".into(),
        client_msg_id: client_msg_id.into(),
        content_type: hubbub_protocol::ContentType::Text,
        content: json!(body),
        dm_members: None,
        origin: 1,
        reply_to: None,
        mentions: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let store = SqliteStore::open(dir.path(), noop.clone()).unwrap();
    store.join_room("room:d", "u").await.unwrap();
    for i in 0..50 {
        store
            .append(text("room:d", &format!("c{i}"), &format!("m{i}")))
            .await
            .unwrap();
    }
    store.mark_read("room:d", "v", 10, 1).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let store = SqliteStore::open(dir.path(), noop).unwrap();
    let page = store
        .history(
            "room:d",
            HistoryQuery::After {
                after: 0,
                limit: 100,
            },
        )
        .await
        .unwrap();
    let got: Vec<(u64, serde_json::Value)> = page
        .messages
        .into_iter()
        .map(|m| (m.seq, m.content.unwrap()))
        .collect();
    let want: Vec<(u64, serde_json::Value)> =
        (0..50).map(|i| (i + 1, json!(format!("m{i}")))).collect();
    assert_eq!(got, want);
    // Numbering continues after a restart, and idempotency remembers old ids.
    let next = store.append(text("room:d", "c3", "m3")).await.unwrap();
    assert!(next.duplicate);
    assert_eq!(next.message.seq, 4);
    assert!(store.is_member("room:d", "u").await.unwrap());
}

/// A panic on the writer (here: a commit hook that panics once) abandons that batch
/// only: its callers get `unavailable`, and the writer keeps serving. A retry of the
/// abandoned send finds what was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_writer_fails_one_batch_and_the_store_keeps_working() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let trigger = armed.clone();
    let hook: CommitHook = Arc::new(move |_| {
        if trigger.swap(false, Ordering::SeqCst) {
            panic!("a hook that fails once");
        }
    });
    let store = SqliteStore::open(dir.path(), hook).unwrap();
    store.join_room("room:p", "u").await.unwrap();
    let msg = |cid: &str| text("room:p", cid, "hi");
    armed.store(true, Ordering::SeqCst);
    match store.append(msg("first")).await {
        Err(hubbub_server::store::StoreError::Unavailable(_)) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
    // The writer is still there: new writes and the retry succeed.
    let second = store.append(msg("second")).await.expect("the writer lives");
    let retry = store.append(msg("first")).await.expect("retry");
    assert!(retry.duplicate, "the abandoned batch had committed");
    assert_eq!((retry.message.seq, second.message.seq), (1, 2));
    store.ping().await.expect("ping");
    store.close().await.expect("close");
}

/// (rows in `table`, the newest message the batched indexes cover), read from the
/// database file `db`. Of the search index, the texts it finds with "narwhal" (it reads
/// texts from the messages: counting its rows would count the messages' texts).
fn index_state(db: &std::path::Path, table: &str) -> (i64, i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let (rows, upto) = match table {
        "client_ids" => ("SELECT count(*) FROM client_ids", "ids_upto"),
        "message_text" => (
            "SELECT count(*) FROM message_text WHERE message_text MATCH 'narwhal'",
            "indexed_upto",
        ),
        other => panic!("no index {other}"),
    };
    c.query_row(
        &format!("SELECT ({rows}), (SELECT {upto} FROM index_progress)"),
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )
    .unwrap()
}

/// Waits (5 s at most) until [`index_state`] is `want`.
async fn wait_for_index(db: &std::path::Path, table: &str, want: (i64, i64)) {
    for _ in 0..100 {
        if index_state(db, table) == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{table} holds {:?}, not {want:?}", index_state(db, table));
}

/// Texts are added to the search index in batches after they are stored: a moment later
/// without any search, and after a restart those that were still pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_are_indexed_for_search_without_a_search_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let db = dir.path().join("hubbub.db");
    let indexed = || index_state(&db, "message_text");
    let wait_for = |want| wait_for_index(&db, "message_text", want);

    let store = SqliteStore::open(dir.path(), noop.clone()).unwrap();
    store.join_room("room:s", "u").await.unwrap();
    store.append(text("room:s", "a", "narwhal")).await.unwrap();
    store
        .append(text("room:s", "b", "narwhal again"))
        .await
        .unwrap();
    wait_for((2, 2)).await;
    store
        .append(text("room:s", "c", "narwhal thrice"))
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    let (count, upto) = indexed();
    assert!(
        (count, upto) == (2, 2) || (count, upto) == (3, 3),
        "{count} {upto}"
    );

    let store = SqliteStore::open(dir.path(), noop).unwrap();
    wait_for((3, 3)).await;
    let found = store
        .search(
            "u",
            hubbub_server::store::SearchQuery {
                words: vec!["narwhal".into()],
                conv: None,
                limit: 10,
                before: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 3);
    store.close().await.unwrap();
}

/// Client ids are indexed in batches like texts; the newest are kept in memory. A retried
/// send finds its message while its id is only in memory, once it is indexed, and after a
/// restart that found it not yet indexed; a client id used in another conversation is a
/// conflict in each case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_found_before_and_after_their_client_ids_are_indexed_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let db = dir.path().join("hubbub.db");
    let indexed = || index_state(&db, "client_ids");
    let retry = |store: &SqliteStore, conv: &str, cid: &str| store.append(text(conv, cid, "again"));
    let store = SqliteStore::open(dir.path(), noop.clone()).unwrap();
    for conv in ["room:i", "room:j"] {
        store.join_room(conv, "u").await.unwrap();
    }
    store.append(text("room:i", "a", "first")).await.unwrap();
    // In memory only (indexing waits 50 ms), then indexed.
    assert_eq!(indexed(), (0, 0));
    let again = retry(&store, "room:i", "a").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.message.seq, again.message.content),
        (1, Some(json!("first")))
    );
    wait_for_index(&db, "client_ids", (1, 1)).await;
    let again = retry(&store, "room:i", "a").await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 1));
    assert!(matches!(
        retry(&store, "room:j", "a").await,
        Err(hubbub_server::store::StoreError::Conflict(_))
    ));
    // Stored and closed before it was indexed: found after the restart.
    store.append(text("room:i", "b", "second")).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    assert_eq!(indexed(), (1, 1));
    let store = SqliteStore::open(dir.path(), noop).unwrap();
    let again = retry(&store, "room:i", "b").await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 2));
    assert!(matches!(
        retry(&store, "room:j", "b").await,
        Err(hubbub_server::store::StoreError::Conflict(_))
    ));
    // An id below the highest one stored is looked up, and is new all the same.
    let below = store.append(text("room:i", "0", "below")).await.unwrap();
    assert_eq!((below.duplicate, below.message.seq), (false, 3));
    let again = retry(&store, "room:i", "0").await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 3));
    // The sender left room:i: a retry still finds what it stored there.
    store.leave_room("room:i", "u", None).await.unwrap();
    let again = retry(&store, "room:i", "a").await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 1));
    let next = store.append(text("room:j", "c", "third")).await.unwrap();
    assert_eq!((next.duplicate, next.message.seq), (false, 1));
    store.close().await.unwrap();
}

/// A busy sender's client ids go to `client_ids` as soon as it has 128 of them, while
/// writes go on (a commit then writes that sender's leaves only), and a quiet sender's
/// wait; after a restart every id is found again, and a pause writes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_senders_client_ids_are_written_in_a_chunk_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let db = dir.path().join("hubbub.db");
    let quiet = |cid: &str| NewMessage {
        from: "q".into(),
        ..text("room:c", cid, "quiet")
    };
    let store = SqliteStore::open(dir.path(), noop.clone()).unwrap();
    for user in ["u", "q"] {
        store.join_room("room:c", user).await.unwrap();
    }
    store.append(quiet("q1")).await.unwrap();
    // Queued together, well within the pause after which pending ids are written.
    let busy = (0..128).map(|i| store.append(text("room:c", &format!("u{i:03}"), "busy")));
    futures_util::future::try_join_all(busy).await.unwrap();
    store.close().await.unwrap();
    drop(store);
    assert_eq!(index_state(&db, "client_ids"), (128, 0), "u's ids only");

    let store = SqliteStore::open(dir.path(), noop).unwrap();
    let again = store.append(quiet("q1")).await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 1));
    let again = store.append(text("room:c", "u005", "again")).await.unwrap();
    assert_eq!((again.duplicate, again.message.seq), (true, 7));
    let next = store.append(text("room:c", "u128", "next")).await.unwrap();
    assert_eq!((next.duplicate, next.message.seq), (false, 130));
    wait_for_index(&db, "client_ids", (130, 130)).await;
    store.close().await.unwrap();
}

/// The search index reads the texts from the messages: a recall or an edit of an indexed
/// text takes it out of the index before the text changes (taken out after, the index
/// no longer matches the messages: FTS5's integrity check fails), and search finds what
/// the messages say now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recalls_and_edits_of_indexed_texts_keep_the_search_index_whole() {
    use hubbub_server::store::SearchQuery;
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let db = dir.path().join("hubbub.db");
    let store = SqliteStore::open(dir.path(), noop).unwrap();
    store.join_room("room:x", "u").await.unwrap();
    for (cid, body) in [
        ("a", "narwhal one"),
        ("b", "narwhal two"),
        ("c", "narwhal three"),
    ] {
        store.append(text("room:x", cid, body)).await.unwrap();
    }
    wait_for_index(&db, "message_text", (3, 3)).await;
    store.recall("room:x", 1, "u", 0).await.unwrap();
    store
        .edit("room:x", 2, json!("walrus two"), vec![], 0)
        .await
        .unwrap();
    let found = |word: &str| {
        let query = SearchQuery {
            words: vec![word.into()],
            conv: None,
            limit: 10,
            before: None,
        };
        let store = &store;
        async move {
            let found = store.search("u", query).await.unwrap();
            found.iter().map(|r| r.seq).collect::<Vec<_>>()
        }
    };
    assert_eq!(found("narwhal").await, [3]);
    assert_eq!(found("walrus").await, [2]);
    store.close().await.unwrap();
    drop(store);
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO message_text (message_text, rank) VALUES ('integrity-check', 1)",
            [],
        )
        .expect("the search index matches the messages");
}

/// One writer per database: a second store on the same directory (a second server
/// started on it by mistake) is refused with a clear error while the first runs, and
/// opens once the first is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_on_the_same_directory_is_refused_until_the_first_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let open = || {
        SqliteStore::open_with(
            dir.path(),
            noop.clone(),
            hubbub_server::metrics::Metrics::new(),
            std::time::Duration::from_millis(200),
        )
    };
    let first = open().unwrap();
    first.join_room("room:l", "u").await.unwrap();
    match open() {
        Err(hubbub_server::store::StoreError::Unavailable(e)) => {
            assert!(e.contains("in use by another hubbub"), "{e}")
        }
        Err(e) => panic!("refused with {e:?}"),
        Ok(_) => panic!("a second writer opened the database"),
    }
    first.close().await.unwrap();
    let second = open().expect("opens once the first is closed");
    assert!(second.is_member("room:l", "u").await.unwrap());
    second.close().await.unwrap();
}

/// The writer checkpoints the write-ahead log itself, after answering the batch that
/// grew it past 1,000 pages (SQLite's automatic checkpoint is replaced): the data reaches
/// the database file while the store stays open, and each checkpoint is timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let noop: CommitHook = Arc::new(|_| {});
    let metrics = hubbub_server::metrics::Metrics::new();
    let store = SqliteStore::open_with(
        dir.path(),
        noop,
        metrics.clone(),
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    store.join_room("room:w", "u").await.unwrap();
    let db_len = || {
        std::fs::metadata(dir.path().join("hubbub.db"))
            .unwrap()
            .len()
    };
    let before = db_len();
    // About three quarters of a page per message: 2,000 pages in batches of up to 300.
    let body = "w".repeat(3000);
    for round in 0..9 {
        let sends = (0..300).map(|i| store.append(text("room:w", &format!("{round}-{i}"), &body)));
        for sent in futures_util::future::join_all(sends).await {
            sent.unwrap();
        }
    }
    assert!(
        metrics.store_checkpoint_seconds.get_sample_count() >= 1,
        "no checkpoint was made"
    );
    // Without a checkpoint the pages would all still be in the log.
    assert!(
        db_len() >= before + 1000 * 4096,
        "the database file grew from {before} to {} bytes only",
        db_len()
    );
    store.close().await.unwrap();
}
