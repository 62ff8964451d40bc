//! Micro-benchmarks of the SQLite append path, as the gateway uses it: every `send` calls
//! `Store::append` without waiting for earlier ones (pipelining), and the store's single
//! writer thread commits whatever is queued in one transaction (group commit, WAL,
//! `synchronous = FULL`, one fsync per commit).
//!
//! One iteration issues `n` appends back to back and waits until all are durable. The
//! writer forms its batches by itself, so a burst of `n` may take more than one commit;
//! the number of commits seen per iteration is printed after the results.
//!
//! - `one_conversation`: `n` messages to one room (the sender is a member, as checked by
//!   the gateway before appending).
//! - `one_conversation_attachments`: the same with image messages pointing to an upload
//!   (the append checks the sender may read it and records the share).
//! - `many_conversations`: `n` messages to `n` DMs never written before (each creates the
//!   conversation and its two members, like a first DM).
//!
//! The database lives in a temporary directory under Cargo's target dir (a real disk,
//! unlike a tmpfs `/tmp`), with the same settings as the server.
//!
//! Run with `cargo bench -p hubbub-server --bench store_append`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use divan::counter::ItemsCount;
use divan::Bencher;
use hubbub_protocol::{ContentType, Conv};
use hubbub_server::metrics::Metrics;
use hubbub_server::store::{CommitHook, FileMeta, NewMessage, SqliteStore, Store};
use serde_json::Value;
use tempfile::TempDir;

/// Messages appended per iteration.
const BURSTS: [usize; 3] = [1, 16, 128];
/// Each sample is at least one fsync: keep the run short.
const SAMPLES: u32 = 60;

fn main() {
    divan::main();
    print_commits();
}

/// A fresh store and the runtime its futures are awaited on.
struct Bed {
    store: SqliteStore,
    metrics: Metrics,
    rt: tokio::runtime::Runtime,
    next: AtomicU64,
    // Dropped last: the database files live in it.
    _dir: TempDir,
}

impl Bed {
    fn open() -> Bed {
        let dir = tempfile::Builder::new()
            .prefix("hubbub-store-bench")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir");
        // The server's hook publishes to the fan-out bus; here nobody listens.
        let hook: CommitHook = Arc::new(|_| {});
        let metrics = Metrics::new();
        let store =
            SqliteStore::open_with(dir.path(), hook, metrics.clone(), Duration::from_secs(5))
                .expect("open store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Bed {
            store,
            metrics,
            rt,
            next: AtomicU64::new(0),
            _dir: dir,
        }
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Appends every message (all queued before any is awaited) and waits for all.
    fn append_all(&self, msgs: Vec<NewMessage>) {
        let pending: Vec<_> = msgs.into_iter().map(|m| self.store.append(m)).collect();
        self.rt.block_on(async {
            for p in pending {
                let a = p.await.expect("append");
                assert!(!a.duplicate);
            }
        });
    }

    fn commits(&self) -> (u64, f64) {
        let h = &self.metrics.store_batch_size;
        (h.get_sample_count(), h.get_sample_sum())
    }

    /// Measures bursts of `n` appends of `message(id)` (ids unique within this bed), then
    /// records the commits they took.
    fn bench(self, bencher: Bencher, name: &str, n: usize, message: impl Fn(u64) -> NewMessage) {
        let before = self.commits();
        bencher
            .counter(ItemsCount::new(n))
            .with_inputs(|| (0..n).map(|_| message(self.id())).collect::<Vec<_>>())
            .bench_local_values(|msgs| self.append_all(msgs));
        self.close(name, n, before);
    }

    fn close(self, name: &str, n: usize, before: (u64, f64)) {
        let (count, sum) = self.commits();
        let iterations = self.next.load(Ordering::Relaxed) / n as u64;
        self.rt.block_on(self.store.close()).expect("close");
        COMMITS.lock().expect("report").push(Commits {
            name: name.to_string(),
            n,
            iterations,
            commits: count - before.0,
            ops: sum - before.1,
        });
    }
}

/// A ~100-byte chat line.
fn content(i: u64) -> Value {
    Value::String(format!(
        "message {i:>8}: are we still on for the 3pm sync? I pushed the reconnect fix."
    ))
}

#[divan::bench(args = BURSTS, sample_count = SAMPLES)]
fn one_conversation(bencher: Bencher, n: usize) {
    let bed = Bed::open();
    let conv = Conv::room_id("general");
    bed.rt
        .block_on(bed.store.join_room(&conv, "alice"))
        .expect("join");
    bed.bench(bencher, "one_conversation", n, |i| NewMessage {
        conv: conv.clone(),
        from: "alice".into(),
        client_msg_id: format!("c-{i}"),
        content_type: ContentType::Text,
        content: content(i),
        dm_members: None,
        origin: 1,
        reply_to: None,
        mentions: Vec::new(),
    });
}

/// Like `one_conversation`, but every message is an image pointing to an upload of its
/// sender: the append also checks that the sender may read the file and records the
/// message's share of it (only messages with a `/files/` URL pay for this).
#[divan::bench(args = BURSTS, sample_count = SAMPLES)]
fn one_conversation_attachments(bencher: Bencher, n: usize) {
    let bed = Bed::open();
    let conv = Conv::room_id("general");
    let file = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    bed.rt.block_on(async {
        bed.store.join_room(&conv, "alice").await.expect("join");
        let meta = FileMeta {
            id: file.into(),
            name: "a.png".into(),
            mime: "image/png".into(),
            size: 1,
            uploader: "alice".into(),
            created_at: 0,
        };
        assert!(bed.store.put_file(meta, u64::MAX).await.expect("put file"));
    });
    bed.bench(bencher, "one_conv_attachments", n, |i| NewMessage {
        conv: conv.clone(),
        from: "alice".into(),
        client_msg_id: format!("c-{i}"),
        content_type: ContentType::Image,
        content: serde_json::json!({"url": format!("/files/{file}/a.png"), "name": "a.png", "size": i}),
        dm_members: None,
        origin: 1,
reply_to: None,
mentions: Vec::new(),
});
}

#[divan::bench(args = BURSTS, sample_count = SAMPLES)]
fn many_conversations(bencher: Bencher, n: usize) {
    Bed::open().bench(bencher, "many_conversations", n, |i| {
        let (a, b) = (format!("u{i}a"), format!("u{i}b"));
        NewMessage {
            conv: Conv::dm_id(&a, &b),
            from: a.clone(),
            client_msg_id: format!("c-{i}"),
            content_type: ContentType::Text,
            content: content(i),
            dm_members: Some((a, b)),
            origin: 1,
            reply_to: None,
            mentions: Vec::new(),
        }
    });
}

/// Commits observed by one benchmark.
struct Commits {
    name: String,
    n: usize,
    iterations: u64,
    commits: u64,
    ops: f64,
}

static COMMITS: Mutex<Vec<Commits>> = Mutex::new(Vec::new());

fn print_commits() {
    let rows = COMMITS.lock().expect("report");
    if rows.is_empty() {
        return;
    }
    println!();
    println!("group commits (writer transactions) per iteration:");
    println!(
        "{:<20} {:>5} {:>10} {:>9} {:>14} {:>16}",
        "bench", "n", "iterations", "commits", "commits/iter", "appends/commit"
    );
    for r in rows.iter() {
        let iters = r.iterations.max(1) as f64;
        let commits = r.commits.max(1) as f64;
        println!(
            "{:<20} {:>5} {:>10} {:>9} {:>14.2} {:>16.1}",
            r.name,
            r.n,
            r.iterations,
            r.commits,
            r.commits as f64 / iters,
            r.ops / commits
        );
    }
}
