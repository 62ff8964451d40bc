//! The store conformance suite against PostgreSQL (a real server per test, started by
//! the test kit in a temp dir), plus what only a shared database shows: several store
//! instances writing to one database at once keep every conversation's seqs gapless.

use std::any::Any;
use std::sync::Arc;

use hubbub_server::metrics::Metrics;
use hubbub_server::store::{CommitHook, HistoryQuery, NewMessage, PgStore, Store};
use hubbub_testkit::PgServer;
use serde_json::json;

async fn postgres(hook: CommitHook) -> (Arc<dyn Store>, Box<dyn Any + Send>) {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let store = PgStore::open(&url, hook, Metrics::new())
        .await
        .expect("open postgres");
    (Arc::new(store), Box::new(pg))
}

hubbub_server::store_conformance!(postgres);

fn text(conv: &str, from: &str, cid: String) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: from.into(),
        client_msg_id: cid.clone(),
        content_type: hubbub_protocol::ContentType::Text,
        content: json!(cid),
        dm_members: None,
        origin: 1,
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// Three store instances (three pools and writers, as three nodes) append 10,000
/// messages each, half to one shared room and half to 100 other rooms they all write
/// to, at once: every room ends with seqs exactly 1..N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_appending_to_one_database_keep_seqs_gapless() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let noop: CommitHook = Arc::new(|_| {});
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(
            PgStore::open(&url, noop.clone(), Metrics::new())
                .await
                .unwrap(),
        ));
    }
    const PER_NODE: usize = 10_000;
    const ROOMS: usize = 100;
    for (n, s) in stores.iter().enumerate() {
        s.join_room("room:shared", &format!("n{n}")).await.unwrap();
        for r in 0..ROOMS {
            s.join_room(&format!("room:r{r}"), &format!("n{n}"))
                .await
                .unwrap();
        }
    }
    let tasks: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let s = s.clone();
            tokio::spawn(async move {
                let user = format!("n{n}");
                // At most 500 in flight per node, as many sessions' pipelined sends.
                let mut pending = std::collections::VecDeque::new();
                for i in 0..PER_NODE {
                    let conv = if i % 2 == 0 {
                        "room:shared".to_string()
                    } else {
                        format!("room:r{}", (i / 2 + n) % ROOMS)
                    };
                    pending.push_back(s.append(text(&conv, &user, format!("{user}-{i}"))));
                    if pending.len() >= 500 {
                        pending.pop_front().unwrap().await.expect("append");
                    }
                }
                for p in pending {
                    p.await.expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let reader = &stores[0];
    let mut convs = vec!["room:shared".to_string()];
    convs.extend((0..ROOMS).map(|r| format!("room:r{r}")));
    let mut total = 0;
    for conv in convs {
        let page = reader
            .history(
                &conv,
                HistoryQuery::After {
                    after: 0,
                    limit: 100_000,
                },
            )
            .await
            .unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{conv}");
        assert_eq!(reader.last_seq(&conv).await.unwrap(), seqs.len() as u64);
        total += seqs.len();
    }
    assert_eq!(total, 3 * PER_NODE, "every append stored once");
    let shared = reader.last_seq("room:shared").await.unwrap();
    assert_eq!(shared, (3 * PER_NODE / 2) as u64);
    for s in &stores {
        s.close().await.unwrap();
    }
}

/// The writer's batched lookups (retried `client_msg_id`s, room membership) probe the
/// indexes key by key: a batch never scans a whole table. With `IN (SELECT * FROM
/// unnest(...))`, the plan cached while `messages` was small was a hash join over a full
/// scan of it, run again for every batch as the table grew (half the database's CPU in
/// the dm benchmark, and more with every message stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_lookups_never_scan_whole_tables() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let noop: CommitHook = Arc::new(|_| {});
    // The schema's migrations read the (empty) tables: they are not counted. A first
    // store migrates and closes (its connection's statistics arrive as it exits), then
    // the counts start from zero.
    let first = PgStore::open(&url, noop.clone(), Metrics::new())
        .await
        .unwrap();
    first.close().await.unwrap();
    drop(first);
    let db = url.rsplit('/').next().unwrap().to_owned();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    pg.psql(&db, "SELECT pg_stat_reset()");
    let store = Arc::new(PgStore::open(&url, noop, Metrics::new()).await.unwrap());
    const USERS: usize = 100;
    for u in 0..USERS {
        store.join_room("room:r", &format!("u{u}")).await.unwrap();
    }
    // 40 waves of one send from each user at once: batches of many keys, while the
    // table grows from empty to 4,000 messages.
    for wave in 0..40 {
        let sends: Vec<_> = (0..USERS)
            .map(|u| {
                let store = store.clone();
                tokio::spawn(async move {
                    let user = format!("u{u}");
                    store
                        .append(text("room:r", &user, format!("{user}-{wave}")))
                        .await
                        .expect("append")
                })
            })
            .collect();
        for s in sends {
            s.await.unwrap();
        }
    }
    assert_eq!(store.last_seq("room:r").await.unwrap(), 40 * USERS as u64);
    // Closing ends the writer's connection, which hands its statistics over.
    store.close().await.unwrap();
    drop(store);
    let scans = |table: &str| -> u64 {
        let sql = format!("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = '{table}'");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            // The statistics arrive once the closed connection's backend has exited.
            let out = pg.psql(&db, &format!("SELECT pg_stat_clear_snapshot(); {sql}"));
            let n: u64 = out
                .lines()
                .last()
                .unwrap_or("0")
                .trim()
                .parse()
                .unwrap_or(0);
            let idx: u64 = pg
                .psql(&db, &format!("SELECT coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = '{table}'"))
                .trim()
                .parse()
                .unwrap_or(0);
            if idx > 0 || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let (messages, members) = (scans("messages"), scans("members"));
    assert!(
        messages <= 5,
        "{messages} full scans of messages in about 40+ batches"
    );
    assert!(
        members <= 5,
        "{members} full scans of members in about 40+ batches"
    );
}

/// An immediate stop of PostgreSQL (its kill -9) fails what is in flight with
/// `unavailable` and loses nothing that was acknowledged; once it is back, the store
/// serves again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_loses_no_acked_append_and_the_store_recovers() {
    let mut pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let noop: CommitHook = Arc::new(|_| {});
    let store = PgStore::open(&url, noop, Metrics::new()).await.unwrap();
    store.join_room("room:c", "u").await.unwrap();
    let mut acked = 0u64;
    for i in 0..50 {
        store
            .append(text("room:c", "u", format!("before-{i}")))
            .await
            .unwrap();
        acked += 1;
    }
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop_immediate();
        pg
    })
    .await
    .unwrap();
    let failed = store.append(text("room:c", "u", "during".into())).await;
    assert!(failed.is_err(), "no database: {failed:?}");
    assert!(store.ping().await.is_err());
    let mut pg = pg;
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    // Back by itself: bounded retries while the pool and the writer reconnect.
    let mut ok = false;
    for _ in 0..100 {
        if store.ping().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "the store serves again");
    let again = store
        .append(text("room:c", "u", "during".into()))
        .await
        .unwrap();
    assert_eq!(
        again.message.seq,
        acked + 1,
        "the failed append took no seq"
    );
    let page = store
        .history(
            "room:c",
            HistoryQuery::After {
                after: 0,
                limit: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.messages.len() as u64, acked + 1);
    store.close().await.unwrap();
    drop(pg);
}

/// Nodes starting together on an empty database: the migrations run once (under the
/// advisory lock) and every node opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once_and_all_open() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = pg.create_database();
    let noop: CommitHook = Arc::new(|_| {});
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let (url, hook) = (url.clone(), noop.clone());
            tokio::spawn(async move { PgStore::open(&url, hook, Metrics::new()).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("every node opens"));
    }
    stores[0].join_room("room:x", "u").await.unwrap();
    assert!(stores[3].is_member("room:x", "u").await.unwrap());
    let version = pg.psql(
        url.rsplit('/').next().unwrap(),
        "SELECT count(*), max(version) FROM hubbub_schema",
    );
    assert_eq!(version.trim(), "1|2", "one row, the latest version");
    for s in &stores {
        s.close().await.unwrap();
    }
}

/// TLS: a server that accepts only TLS on TCP, with a certificate from a private CA. The
/// store verifies it against `sslrootcert`; without it (the web PKI roots) the server is
/// not trusted, and without TLS it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_and_verified_against_sslrootcert() {
    let (pg, ca) = tokio::task::spawn_blocking(|| {
        let mut pg = PgServer::start();
        let ca = pg.require_tls();
        (pg, ca)
    })
    .await
    .unwrap();
    let url = pg.create_database();
    let noop: CommitHook = Arc::new(|_| {});
    let ca = ca.display().to_string();
    let verified = format!("{url}?sslmode=require&sslrootcert={ca}");
    let store = PgStore::open(&verified, noop.clone(), Metrics::new())
        .await
        .expect("TLS verified against the test CA");
    store.join_room("room:tls", "u").await.unwrap();
    store
        .append(text("room:tls", "u", "over tls".into()))
        .await
        .unwrap();
    store.ping().await.unwrap();
    store.close().await.unwrap();

    let untrusted = PgStore::open(
        &format!("{url}?sslmode=require"),
        noop.clone(),
        Metrics::new(),
    )
    .await;
    assert!(
        untrusted.is_err(),
        "a private CA is not in the web PKI roots"
    );
    let plain = PgStore::open(&format!("{url}?sslmode=disable"), noop, Metrics::new()).await;
    assert!(plain.is_err(), "the server refuses connections without TLS");
}
