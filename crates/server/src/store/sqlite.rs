//! Embedded SQLite store (WAL mode, `synchronous = FULL`).
//!
//! One writer thread owns the only write connection. Every write operation is sent to it
//! over a channel; it takes everything that is queued (up to [`MAX_BATCH`]) and applies
//! it in one transaction with one fsync: group commit. While one batch commits, the next
//! one queues up, so the batch grows with load and durability costs little per message.
//! Reads go to a small pool of read-only connections on blocking threads; WAL lets them
//! run beside the writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use hubbub_protocol::{ContentType, Message};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::auth::name_skeleton;
use crate::metrics::Metrics;

use super::{
    now_ms, Appended, CommitHook, Committed, ConvSummary, FileMeta, HistoryPage, HistoryQuery,
    JoinOutcome, Membership, NewMessage, RoomSummary, Store, StoreError, StoreResult,
};

/// Most write operations committed in one transaction. Large: under load, a commit's cost
/// is mostly the pages it touches (one leaf of each busy conversation and sender), which
/// a bigger batch shares among more messages (4096 stored 15-35% more messages a second
/// than 1024 in `hubbub bench dm`).
pub(super) const MAX_BATCH: usize = 4096;
const READERS: usize = 4;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE conversations (
    conv        TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    created_by  TEXT,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE members (
    conv        TEXT NOT NULL,
    user        TEXT NOT NULL,
    role        TEXT NOT NULL DEFAULT 'member',
    joined_at   INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user, conv);
CREATE TABLE messages (
    conv          TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    msg_id        TEXT NOT NULL,
    sender        TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    content       TEXT NOT NULL,
    ts            INTEGER NOT NULL,
    recalled      INTEGER NOT NULL DEFAULT 0,
    edited_at     INTEGER,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_msg_id);
"#,
    r#"
CREATE TABLE read_cursors (
    conv        TEXT NOT NULL,
    user        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    mime        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    uploader    TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // Which conversations an uploaded file was sent to: their members may download it.
    r#"
CREATE TABLE file_shares (
    file_id     TEXT NOT NULL,
    conv        TEXT NOT NULL,
    PRIMARY KEY (file_id, conv)
) WITHOUT ROWID;
"#,
    // When a message was last recalled or edited (and by whom it was recalled), so that a
    // reconnecting client can be told about changes to messages it already has.
    r#"
ALTER TABLE messages ADD COLUMN modified_at INTEGER;
ALTER TABLE messages ADD COLUMN recalled_by TEXT;
CREATE INDEX messages_modified ON messages (conv, modified_at) WHERE modified_at IS NOT NULL;
"#,
    // Shares per message, so that recalling or editing a message ends the share it made;
    // the shares recorded before are kept for the messages that still point to the file.
    // Per-uploader sums (quota) and the collection of old unshared uploads get indexes.
    r#"
CREATE TABLE message_files (
    file_id     TEXT NOT NULL,
    conv        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (file_id, conv, seq)
) WITHOUT ROWID;
CREATE INDEX message_files_by_message ON message_files (conv, seq);
INSERT OR IGNORE INTO message_files (file_id, conv, seq)
    SELECT s.file_id, s.conv, m.seq FROM file_shares s JOIN messages m ON m.conv = s.conv
    WHERE m.recalled = 0
      AND json_valid(m.content)
      AND json_type(m.content) = 'object'
      AND substr(json_extract(m.content, '$.url'), 1, 8 + length(s.file_id))
          = '/files/' || s.file_id || '/';
DROP TABLE file_shares;
CREATE INDEX files_by_uploader ON files (uploader, size);
CREATE INDEX files_by_age ON files (created_at);
"#,
    // Guest names and account names never meet: each name has a skeleton (case-folded,
    // look-alikes mapped, see `auth::name_skeleton`), filled in by `fill_skeletons` for
    // rows written before this migration. Names that already took part in conversations
    // without an account were used by guests: they are recorded as such.
    r#"
ALTER TABLE users ADD COLUMN skeleton TEXT;
CREATE INDEX users_by_skeleton ON users (skeleton);
CREATE TABLE guest_names (
    name        TEXT PRIMARY KEY,
    skeleton    TEXT,
    first_seen  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX guest_names_by_skeleton ON guest_names (skeleton);
INSERT OR IGNORE INTO guest_names (name, first_seen)
    SELECT name, CAST(strftime('%s', 'now') AS INTEGER) * 1000 FROM (
        SELECT user AS name FROM members
        UNION SELECT user FROM read_cursors
        UNION SELECT sender FROM messages
    ) WHERE name NOT IN (SELECT name FROM users);
"#,
];

type Reply<T> = oneshot::Sender<StoreResult<T>>;

enum WriteOp {
    Append(NewMessage, Reply<Appended>),
    Join {
        conv: String,
        user: String,
        reply: Reply<JoinOutcome>,
    },
    Leave {
        conv: String,
        user: String,
        reply: Reply<bool>,
    },
    Recall {
        conv: String,
        seq: u64,
        by: String,
        origin: u64,
        reply: Reply<()>,
    },
    Edit {
        conv: String,
        seq: u64,
        content: serde_json::Value,
        origin: u64,
        reply: Reply<i64>,
    },
    Read {
        conv: String,
        user: String,
        seq: u64,
        origin: u64,
        reply: Reply<u64>,
    },
    CreateUser {
        name: String,
        password_hash: String,
        reply: Reply<()>,
    },
    PutFile {
        meta: FileMeta,
        quota: u64,
        reply: Reply<bool>,
    },
    DeleteUnsharedFiles {
        created_before: i64,
        limit: u32,
        reply: Reply<Vec<FileMeta>>,
    },
    ClaimGuest {
        name: String,
        reply: Reply<()>,
    },
    Ping(Reply<()>),
    Close(Reply<()>),
}

/// The embedded SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writes: mpsc::UnboundedSender<WriteOp>,
    /// See [`Store::watermark`]: the writer's [`Writer::stamping`].
    stamping: Arc<AtomicI64>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/hubbub.db`, runs migrations and starts the writer.
    pub fn open(dir: &Path, hook: CommitHook) -> StoreResult<SqliteStore> {
        Self::open_with(dir, hook, Metrics::new(), DEFAULT_BUSY_TIMEOUT)
    }

    /// [`SqliteStore::open`], recording batch sizes and commit times in `metrics`, and
    /// waiting at most `busy_timeout` for a database locked by someone else (then the
    /// operations fail with `unavailable`).
    pub fn open_with(
        dir: &Path,
        hook: CommitHook,
        metrics: Metrics,
        busy_timeout: std::time::Duration,
    ) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = dir.join("hubbub.db");
        let mut conn = open_conn(&path, busy_timeout).map_err(unavailable)?;
        migrate(&mut conn).map_err(unavailable)?;
        fill_skeletons(&mut conn).map_err(unavailable)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = open_conn(&path, busy_timeout).map_err(unavailable)?;
            r.pragma_update(None, "query_only", true)
                .map_err(unavailable)?;
            readers.push(Mutex::new(r));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stamping = Arc::new(AtomicI64::new(i64::MAX));
        let writer = Writer {
            conn,
            seqs: HashMap::new(),
            hook,
            metrics,
            stamping: stamping.clone(),
        };
        std::thread::Builder::new()
            .name("hubbub-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writes: tx,
                stamping,
                readers,
                next_reader: AtomicUsize::new(0),
                path,
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn write<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> WriteOp,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.writes.send(make(tx)).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the store writer stopped".into())))
        })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let n = inner.readers.len();
                let start = inner.next_reader.fetch_add(1, Ordering::Relaxed);
                for i in 0..n {
                    if let Some(conn) = inner.readers[(start + i) % n].try_lock() {
                        return f(&conn);
                    }
                }
                let conn = inner.readers[start % n].lock();
                f(&conn)
            })
            .await
            .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
            .map_err(unavailable)
        })
    }
}

/// How long a connection waits for a lock held by another process, by default.
const DEFAULT_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_conn(path: &Path, busy_timeout: std::time::Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Every statement is prepared once per connection and kept (rusqlite keeps 16).
    conn.set_prepared_statement_cache_capacity(128);
    // Plans stay fixed once prepared: otherwise SQLite (built with STAT4) may recompile
    // a cached statement whenever a bound value changes, which dominated reads here.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

/// Computes the missing name skeletons (rows from before skeletons were stored).
fn fill_skeletons(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for table in ["users", "guest_names"] {
        let names: Vec<String> = tx
            .prepare(&format!("SELECT name FROM {table} WHERE skeleton IS NULL"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut update =
            tx.prepare(&format!("UPDATE {table} SET skeleton = ?2 WHERE name = ?1"))?;
        for name in names {
            update.execute(params![name, name_skeleton(&name)])?;
        }
    }
    tx.commit()
}

/// The account, if any, whose name has `skeleton`.
fn account_with_skeleton(conn: &Connection, skeleton: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT name FROM users WHERE skeleton = ?1 LIMIT 1")?
        .query_row([skeleton], |r| r.get(0))
        .optional()
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

const MESSAGE_COLUMNS: &str =
    "conv, seq, msg_id, sender, client_msg_id, content_type, content, ts, recalled, edited_at";

fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let content_type: String = row.get(5)?;
    let content: String = row.get(6)?;
    let recalled: bool = row.get(8)?;
    let content_type = ContentType::parse(&content_type).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            5,
            rusqlite::types::Type::Text,
            format!("unknown content_type {content_type:?}").into(),
        )
    })?;
    let content = if recalled {
        None
    } else {
        Some(serde_json::from_str(&content).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, e.into())
        })?)
    };
    Ok(Message {
        conv: row.get(0)?,
        seq: row.get(1)?,
        msg_id: row.get(2)?,
        from: row.get(3)?,
        client_msg_id: row.get(4)?,
        content_type,
        content,
        ts: row.get(7)?,
        recalled,
        edited_at: row.get(9)?,
    })
}

fn row_to_file(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileMeta> {
    Ok(FileMeta {
        id: r.get(0)?,
        name: r.get(1)?,
        mime: r.get(2)?,
        size: r.get(3)?,
        uploader: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// Whether `user` may read the file `id`: its uploader, or a member of a conversation a
/// message (not recalled) shared it to.
fn query_may_read_file(conn: &Connection, id: &str, user: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM files WHERE id = ?1 AND uploader = ?2 \
         UNION ALL SELECT 1 FROM message_files s JOIN members m ON m.conv = s.conv \
         WHERE s.file_id = ?1 AND m.user = ?2 LIMIT 1",
    )?
    .exists(params![id, user])
}

fn query_last_seq(conn: &Connection, conv: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM messages WHERE conv = ?1")?
        .query_row([conv], |r| r.get(0))
}

struct Writer {
    conn: Connection,
    /// Last assigned `seq` per conversation seen since start (also: the conversation row
    /// exists).
    seqs: HashMap<String, u64>,
    hook: CommitHook,
    metrics: Metrics,
    /// While a batch is open: a time at or before its change stamps; `i64::MAX` between
    /// batches.
    stamping: Arc<AtomicI64>,
}

/// What one operation of a batch produced, answered after the commit.
enum Done {
    /// Already answered (a refusal that wrote nothing).
    Answered,
    Append(Reply<Appended>, Appended, u64),
    Join(Reply<JoinOutcome>, JoinOutcome, Option<Committed>),
    Leave(Reply<bool>, bool, Option<Committed>),
    Ping(Reply<()>),
    /// A change to announce after the commit, then answer with ().
    Changed(Reply<()>, Option<Committed>),
    Edited(Reply<i64>, Committed),
    Read(Reply<u64>, u64, Option<Committed>),
    Stored(Reply<bool>, bool),
    Deleted(Reply<Vec<FileMeta>>, Vec<FileMeta>),
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut close = None;
            let ops: Vec<WriteOp> = batch
                .drain(..)
                .filter_map(|op| match op {
                    WriteOp::Close(reply) => {
                        close = Some(reply);
                        None
                    }
                    op => Some(op),
                })
                .collect();
            // A panic while applying (a bug, or a commit hook that panics) must not end the
            // writer: the batch's callers get `unavailable` (their reply senders are
            // dropped), an open transaction is rolled back, and the next batch starts
            // clean. A retried send finds what was committed by its `client_msg_id`.
            let applied =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_batch(ops)));
            if applied.is_err() {
                self.metrics.store_writer_panics.inc();
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.seqs.clear();
                self.stamping.store(i64::MAX, Ordering::SeqCst);
            }
            if let Some(reply) = close {
                // Everything queued before the close has been committed above; refuse the
                // rest.
                rx.close();
                while let Ok(op) = rx.try_recv() {
                    fail(op, StoreError::Unavailable("the store is closed".into()));
                }
                let _ = reply.send(Ok(()));
                break;
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn apply_batch(&mut self, ops: Vec<WriteOp>) {
        if ops.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let n = ops.len();
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let err = unavailable(e);
            for op in ops {
                fail(op, err.clone());
            }
            return;
        }
        // Published before the stamp is taken, so no stamp of this batch is earlier.
        self.stamping.store(now_ms(), Ordering::SeqCst);
        let now = now_ms();
        let mut done = Vec::with_capacity(n);
        let mut failure = None;
        let mut ops = ops.into_iter();
        for op in ops.by_ref() {
            match self.apply(op, now) {
                Ok(d) => done.push(d),
                Err(boxed) => {
                    let (op, e) = *boxed;
                    failure = Some(e);
                    fail(op, StoreError::Unavailable("the batch failed".into()));
                    break;
                }
            }
        }
        let commit = match failure {
            Some(e) => Err(e),
            None => self.conn.execute_batch("COMMIT"),
        };
        if let Err(e) = commit {
            tracing::error!(error = %e, "store batch failed; rolled back");
            let _ = self.conn.execute_batch("ROLLBACK");
            // Cached seqs may have advanced inside the failed transaction.
            self.seqs.clear();
            let err = unavailable(e);
            for d in done {
                d.fail(err.clone());
            }
            for op in ops {
                fail(op, err.clone());
            }
            self.stamping.store(i64::MAX, Ordering::SeqCst);
            return;
        }
        let elapsed = started.elapsed();
        self.metrics.store_batch_size.observe(n as f64);
        self.metrics
            .store_commit_seconds
            .observe(elapsed.as_secs_f64());
        tracing::trace!(
            ops = n,
            elapsed_us = elapsed.as_micros() as u64,
            "batch committed"
        );
        for d in &done {
            match d {
                Done::Append(_, a, origin) if !a.duplicate => {
                    self.metrics.messages_stored.inc();
                    (self.hook)(Committed::Message {
                        message: a.message.clone(),
                        origin: *origin,
                    })
                }
                Done::Changed(_, Some(c))
                | Done::Edited(_, c)
                | Done::Read(_, _, Some(c))
                | Done::Join(_, _, Some(c))
                | Done::Leave(_, _, Some(c)) => (self.hook)(c.clone()),
                _ => {}
            }
        }
        self.stamping.store(i64::MAX, Ordering::SeqCst);
        for d in done {
            d.answer();
        }
    }

    /// Applies one operation inside the open transaction. On a database error, gives the
    /// operation back so that the caller can answer it.
    fn apply(&mut self, op: WriteOp, now: i64) -> Result<Done, Box<(WriteOp, rusqlite::Error)>> {
        match op {
            WriteOp::Append(mut msg, reply) => match self.append(&mut msg, now) {
                Ok(Ok(a)) => Ok(Done::Append(reply, a, msg.origin)),
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    Ok(Done::Answered)
                }
                Err(e) => Err(Box::new((WriteOp::Append(msg, reply), e))),
            },
            WriteOp::Join { conv, user, reply } => match self.join(&conv, &user, now) {
                Ok(j) => {
                    let change = j.added.then_some(Committed::Member {
                        conv,
                        user,
                        joined: true,
                    });
                    Ok(Done::Join(reply, j, change))
                }
                Err(e) => Err(Box::new((WriteOp::Join { conv, user, reply }, e))),
            },
            WriteOp::Leave { conv, user, reply } => {
                match self
                    .conn
                    .prepare_cached("DELETE FROM members WHERE conv = ?1 AND user = ?2")
                    .and_then(|mut s| s.execute(params![conv, user]))
                {
                    Ok(n) => {
                        let change = (n == 1).then_some(Committed::Member {
                            conv,
                            user,
                            joined: false,
                        });
                        Ok(Done::Leave(reply, n == 1, change))
                    }
                    Err(e) => Err(Box::new((WriteOp::Leave { conv, user, reply }, e))),
                }
            }
            WriteOp::Recall {
                conv,
                seq,
                by,
                origin,
                reply,
            } => match self.recall(&conv, seq, &by, origin, now) {
                Ok(Ok(c)) => Ok(Done::Changed(reply, c)),
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    Ok(Done::Answered)
                }
                Err(e) => Err(Box::new((
                    WriteOp::Recall {
                        conv,
                        seq,
                        by,
                        origin,
                        reply,
                    },
                    e,
                ))),
            },
            WriteOp::Edit {
                conv,
                seq,
                content,
                origin,
                reply,
            } => match self.edit(&conv, seq, &content, origin, now) {
                Ok(Ok(c)) => Ok(Done::Edited(reply, c)),
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    Ok(Done::Answered)
                }
                Err(e) => Err(Box::new((
                    WriteOp::Edit {
                        conv,
                        seq,
                        content,
                        origin,
                        reply,
                    },
                    e,
                ))),
            },
            WriteOp::Read {
                conv,
                user,
                seq,
                origin,
                reply,
            } => match self.read(&conv, &user, seq, origin) {
                Ok((pos, c)) => Ok(Done::Read(reply, pos, c)),
                Err(e) => Err(Box::new((
                    WriteOp::Read {
                        conv,
                        user,
                        seq,
                        origin,
                        reply,
                    },
                    e,
                ))),
            },
            WriteOp::CreateUser {
                name,
                password_hash,
                reply,
            } => match self.create_user(&name, &password_hash, now) {
                Ok(None) => Ok(Done::Ping(reply)),
                Ok(Some(refusal)) => {
                    let _ = reply.send(Err(StoreError::Conflict(refusal)));
                    Ok(Done::Answered)
                }
                Err(e) => Err(Box::new((
                    WriteOp::CreateUser {
                        name,
                        password_hash,
                        reply,
                    },
                    e,
                ))),
            },
            WriteOp::PutFile { meta, quota, reply } => match self.put_file(&meta, quota) {
                Ok(stored) => Ok(Done::Stored(reply, stored)),
                Err(e) => Err(Box::new((WriteOp::PutFile { meta, quota, reply }, e))),
            },
            WriteOp::DeleteUnsharedFiles {
                created_before,
                limit,
                reply,
            } => match self.delete_unshared_files(created_before, limit) {
                Ok(gone) => Ok(Done::Deleted(reply, gone)),
                Err(e) => Err(Box::new((
                    WriteOp::DeleteUnsharedFiles {
                        created_before,
                        limit,
                        reply,
                    },
                    e,
                ))),
            },
            WriteOp::ClaimGuest { name, reply } => match self.claim_guest(&name, now) {
                Ok(None) => Ok(Done::Ping(reply)),
                Ok(Some(refusal)) => {
                    let _ = reply.send(Err(StoreError::Conflict(refusal)));
                    Ok(Done::Answered)
                }
                Err(e) => Err(Box::new((WriteOp::ClaimGuest { name, reply }, e))),
            },
            WriteOp::Ping(reply) => Ok(Done::Ping(reply)),
            WriteOp::Close(reply) => Ok(Done::Ping(reply)),
        }
    }

    fn last_seq_of(&mut self, conv: &str) -> rusqlite::Result<u64> {
        match self.seqs.get(conv) {
            Some(s) => Ok(*s),
            None => query_last_seq(&self.conn, conv),
        }
    }

    fn recall(
        &mut self,
        conv: &str,
        seq: u64,
        by: &str,
        origin: u64,
        now: i64,
    ) -> rusqlite::Result<StoreResult<Option<Committed>>> {
        let recalled: Option<bool> = self
            .conn
            .prepare_cached("SELECT recalled FROM messages WHERE conv = ?1 AND seq = ?2")?
            .query_row(params![conv, seq], |r| r.get(0))
            .optional()?;
        match recalled {
            None => Ok(Err(StoreError::NotFound(format!(
                "no message {seq} in {conv}"
            )))),
            Some(true) => Ok(Ok(None)),
            Some(false) => {
                self.conn
                    .prepare_cached(
                        "UPDATE messages SET recalled = 1, content = 'null', recalled_by = ?3, modified_at = ?4 \
                         WHERE conv = ?1 AND seq = ?2",
                    )?
                    .execute(params![conv, seq, by, now])?;
                self.unshare_message(conv, seq)?;
                Ok(Ok(Some(Committed::Recalled {
                    conv: conv.to_string(),
                    seq,
                    by: by.to_string(),
                    origin,
                })))
            }
        }
    }

    fn edit(
        &mut self,
        conv: &str,
        seq: u64,
        content: &serde_json::Value,
        origin: u64,
        now: i64,
    ) -> rusqlite::Result<StoreResult<Committed>> {
        let found: Option<(bool, String)> = self
            .conn
            .prepare_cached("SELECT recalled, sender FROM messages WHERE conv = ?1 AND seq = ?2")?
            .query_row(params![conv, seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (recalled, sender) = match found {
            Some((recalled, sender)) => (Some(recalled), sender),
            None => (None, String::new()),
        };
        match recalled {
            None => Ok(Err(StoreError::NotFound(format!(
                "no message {seq} in {conv}"
            )))),
            Some(true) => Ok(Err(StoreError::Conflict(format!(
                "message {seq} in {conv} was recalled"
            )))),
            Some(false) => {
                let text = serde_json::to_string(content).unwrap_or_else(|_| "null".into());
                self.conn
                    .prepare_cached(
                        "UPDATE messages SET content = ?3, edited_at = ?4, modified_at = ?4 WHERE conv = ?1 AND seq = ?2",
                    )?
                    .execute(params![conv, seq, text, now])?;
                self.unshare_message(conv, seq)?;
                self.share_file(conv, seq, &sender, content)?;
                Ok(Ok(Committed::Edited {
                    conv: conv.to_string(),
                    seq,
                    content: content.clone(),
                    edited_at: now,
                    origin,
                }))
            }
        }
    }

    fn read(
        &mut self,
        conv: &str,
        user: &str,
        seq: u64,
        origin: u64,
    ) -> rusqlite::Result<(u64, Option<Committed>)> {
        let seq = seq.min(self.last_seq_of(conv)?);
        let current: u64 = self
            .conn
            .prepare_cached("SELECT seq FROM read_cursors WHERE conv = ?1 AND user = ?2")?
            .query_row(params![conv, user], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        if seq <= current {
            return Ok((current, None));
        }
        self.conn
            .prepare_cached(
                "INSERT INTO read_cursors (conv, user, seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (conv, user) DO UPDATE SET seq = excluded.seq",
            )?
            .execute(params![conv, user, seq])?;
        Ok((
            seq,
            Some(Committed::Receipt {
                conv: conv.to_string(),
                user: user.to_string(),
                seq,
                origin,
            }),
        ))
    }

    /// Appends `msg`. Its strings move into the answer once nothing can fail any more;
    /// on an error `msg` is left whole.
    fn append(
        &mut self,
        msg: &mut NewMessage,
        now: i64,
    ) -> rusqlite::Result<StoreResult<Appended>> {
        if msg.dm_members.is_none() {
            let member = self
                .conn
                .prepare_cached("SELECT 1 FROM members WHERE conv = ?1 AND user = ?2")?
                .exists(params![msg.conv, msg.from])?;
            if !member {
                // A retry of a send stored while the sender was a member still finds it.
                return match self.stored_already(msg).optional()? {
                    Some(found) => Ok(found),
                    None => Ok(Err(StoreError::NotMember(format!(
                        "you are not a member of {}",
                        msg.conv
                    )))),
                };
            }
        }
        let cached = self.seqs.get(&msg.conv).copied();
        let last = match cached {
            Some(s) => s,
            None => query_last_seq(&self.conn, &msg.conv)?,
        };
        let seq = last + 1;
        let msg_id = ulid::Ulid::new().to_string();
        let content = serde_json::to_string(&msg.content).unwrap_or_else(|_| "null".into());
        // The insert itself finds a retried send in the (sender, client_msg_id) index: a
        // lookup before it would search that index twice for every new message.
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (sender, client_msg_id) DO NOTHING",
            )?
            .execute(params![
                msg.conv,
                seq,
                msg_id,
                msg.from,
                msg.client_msg_id,
                msg.content_type.as_str(),
                content,
                now
            ])?;
        if inserted == 0 {
            return self.stored_already(msg);
        }
        // A DM exists from its first message on (the first one this writer sees suffices).
        if let (None, Some((a, b))) = (cached, &msg.dm_members) {
            self.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO conversations (conv, kind, created_by, created_at) VALUES (?1, 'dm', ?2, ?3)",
                )?
                .execute(params![msg.conv, msg.from, now])?;
            let mut add = self.conn.prepare_cached(
                "INSERT OR IGNORE INTO members (conv, user, role, joined_at) VALUES (?1, ?2, 'member', ?3)",
            )?;
            add.execute(params![msg.conv, a, now])?;
            add.execute(params![msg.conv, b, now])?;
        }
        self.share_file(&msg.conv, seq, &msg.from, &msg.content)?;
        match self.seqs.get_mut(&msg.conv) {
            Some(last) => *last = seq,
            None => {
                self.seqs.insert(msg.conv.clone(), seq);
            }
        }
        // Nothing below can fail: the stored message takes the request's strings.
        let take = std::mem::take::<String>;
        Ok(Ok(Appended {
            message: Message {
                conv: take(&mut msg.conv),
                seq,
                msg_id,
                from: take(&mut msg.from),
                client_msg_id: take(&mut msg.client_msg_id),
                content_type: msg.content_type,
                content: Some(msg.content.take()),
                ts: now,
                recalled: false,
                edited_at: None,
            },
            duplicate: false,
        }))
    }

    /// The answer to a retried send: the message stored the first time, or a conflict if
    /// its `client_msg_id` was used in another conversation.
    /// (`QueryReturnedNoRows` when nothing was stored under that id.)
    fn stored_already(&mut self, msg: &NewMessage) -> rusqlite::Result<StoreResult<Appended>> {
        let message = self
            .conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = ?1 AND client_msg_id = ?2"
            ))?
            .query_row(params![msg.from, msg.client_msg_id], row_to_message)?;
        if message.conv != msg.conv {
            return Ok(Err(StoreError::Conflict(format!(
                "client_msg_id {:?} was already used in {}",
                msg.client_msg_id, message.conv
            ))));
        }
        Ok(Ok(Appended {
            message,
            duplicate: true,
        }))
    }

    /// Records that message `seq` of `conv` shares the uploaded file its attachment points
    /// to, if any, and only when `sender` may read that file now (a URL alone grants
    /// nothing). Only messages with a `/files/` URL pay for the check.
    fn share_file(
        &mut self,
        conv: &str,
        seq: u64,
        sender: &str,
        content: &serde_json::Value,
    ) -> rusqlite::Result<()> {
        let Some(id) = super::attachment_file_id(content) else {
            return Ok(());
        };
        if !query_may_read_file(&self.conn, id, sender)? {
            tracing::debug!(file = %id, user = %sender, %conv, "not shared: the sender may not read the file");
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO message_files (file_id, conv, seq) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id, conv, seq])?;
        Ok(())
    }

    /// Ends the share message `seq` of `conv` made (recalled, or edited).
    fn unshare_message(&mut self, conv: &str, seq: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM message_files WHERE conv = ?1 AND seq = ?2")?
            .execute(params![conv, seq])?;
        Ok(())
    }

    /// Stores a file's record unless its uploader's files would then total more than
    /// `quota` bytes.
    fn put_file(&mut self, meta: &FileMeta, quota: u64) -> rusqlite::Result<bool> {
        let used: u64 = self
            .conn
            .prepare_cached("SELECT coalesce(sum(size), 0) FROM files WHERE uploader = ?1")?
            .query_row([&meta.uploader], |r| r.get(0))?;
        if used.saturating_add(meta.size) > quota {
            return Ok(false);
        }
        self.conn
            .prepare_cached(
                "INSERT INTO files (id, name, mime, size, uploader, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                meta.id,
                meta.name,
                meta.mime,
                meta.size,
                meta.uploader,
                meta.created_at
            ])?;
        Ok(true)
    }

    /// Deletes (and returns) up to `limit` records of files created before
    /// `created_before` that no message shares, oldest first.
    fn delete_unshared_files(
        &mut self,
        created_before: i64,
        limit: u32,
    ) -> rusqlite::Result<Vec<FileMeta>> {
        let gone: Vec<FileMeta> = self
            .conn
            .prepare_cached(
                "SELECT id, name, mime, size, uploader, created_at FROM files f \
                 WHERE created_at < ?1 \
                   AND NOT EXISTS (SELECT 1 FROM message_files s WHERE s.file_id = f.id) \
                 ORDER BY created_at LIMIT ?2",
            )?
            .query_map(params![created_before, limit], row_to_file)?
            .collect::<rusqlite::Result<_>>()?;
        let mut delete = self
            .conn
            .prepare_cached("DELETE FROM files WHERE id = ?1")?;
        for f in &gone {
            delete.execute([&f.id])?;
        }
        Ok(gone)
    }

    fn join(&mut self, conv: &str, user: &str, now: i64) -> rusqlite::Result<JoinOutcome> {
        let created = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO conversations (conv, kind, created_by, created_at) VALUES (?1, 'room', ?2, ?3)",
            )?
            .execute(params![conv, user, now])?
            == 1;
        let role = if created { "admin" } else { "member" };
        let added = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO members (conv, user, role, joined_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![conv, user, role, now])?
            == 1;
        let last_seq = self.last_seq_of(conv)?;
        Ok(JoinOutcome {
            created,
            added,
            last_seq,
        })
    }
}

impl Done {
    fn answer(self) {
        match self {
            Done::Answered => {}
            Done::Append(r, a, _) => {
                let _ = r.send(Ok(a));
            }
            Done::Join(r, j, _) => {
                let _ = r.send(Ok(j));
            }
            Done::Leave(r, b, _) => {
                let _ = r.send(Ok(b));
            }
            Done::Ping(r) | Done::Changed(r, _) => {
                let _ = r.send(Ok(()));
            }
            Done::Edited(r, c) => {
                if let Committed::Edited { edited_at, .. } = c {
                    let _ = r.send(Ok(edited_at));
                }
            }
            Done::Read(r, pos, _) => {
                let _ = r.send(Ok(pos));
            }
            Done::Stored(r, b) => {
                let _ = r.send(Ok(b));
            }
            Done::Deleted(r, gone) => {
                let _ = r.send(Ok(gone));
            }
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Done::Answered => {}
            Done::Append(r, _, _) => {
                let _ = r.send(Err(e));
            }
            Done::Join(r, _, _) => {
                let _ = r.send(Err(e));
            }
            Done::Leave(r, _, _) => {
                let _ = r.send(Err(e));
            }
            Done::Ping(r) | Done::Changed(r, _) => {
                let _ = r.send(Err(e));
            }
            Done::Edited(r, _) => {
                let _ = r.send(Err(e));
            }
            Done::Read(r, _, _) => {
                let _ = r.send(Err(e));
            }
            Done::Stored(r, _) => {
                let _ = r.send(Err(e));
            }
            Done::Deleted(r, _) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

impl Writer {
    /// Inserts an account unless its name meets an account's or a guest's name; returns
    /// the refusal, if any.
    fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        now: i64,
    ) -> rusqlite::Result<Option<String>> {
        let skeleton = name_skeleton(name);
        if let Some(taken) = account_with_skeleton(&self.conn, &skeleton)? {
            return Ok(Some(if taken == name {
                format!("the user name {name:?} is taken")
            } else {
                format!("the user name {name:?} is too similar to an existing account's name")
            }));
        }
        let guest: Option<String> = self
            .conn
            .prepare_cached("SELECT name FROM guest_names WHERE skeleton = ?1 LIMIT 1")?
            .query_row([&skeleton], |r| r.get(0))
            .optional()?;
        if guest.is_some() {
            return Ok(Some(format!(
                "the user name {name:?} (or one too similar to it) was used by a guest"
            )));
        }
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO users (name, password_hash, created_at, skeleton) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![name, password_hash, now, skeleton])?;
        Ok((n == 0).then(|| format!("the user name {name:?} is taken")))
    }

    /// Records a guest name unless it meets an account's name; returns the refusal, if
    /// any.
    fn claim_guest(&self, name: &str, now: i64) -> rusqlite::Result<Option<String>> {
        let skeleton = name_skeleton(name);
        if account_with_skeleton(&self.conn, &skeleton)?.is_some() {
            return Ok(Some(format!(
                "the name {name:?} belongs to an account (or is too similar to one): \
                 log in, or choose another guest name"
            )));
        }
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO guest_names (name, skeleton, first_seen) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![name, skeleton, now])?;
        Ok(None)
    }
}

fn fail(op: WriteOp, e: StoreError) {
    match op {
        WriteOp::Append(_, r) => {
            let _ = r.send(Err(e));
        }
        WriteOp::Join { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Leave { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Recall { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Edit { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::Read { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::PutFile { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::DeleteUnsharedFiles { reply, .. } => {
            let _ = reply.send(Err(e));
        }
        WriteOp::CreateUser { reply, .. }
        | WriteOp::ClaimGuest { reply, .. }
        | WriteOp::Ping(reply)
        | WriteOp::Close(reply) => {
            let _ = reply.send(Err(e));
        }
    }
}

impl Store for SqliteStore {
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, StoreResult<Appended>> {
        self.write(|reply| WriteOp::Append(msg, reply))
    }

    fn join_room(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<JoinOutcome>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.write(|reply| WriteOp::Join { conv, user, reply })
    }

    fn leave_room(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.write(|reply| WriteOp::Leave { conv, user, reply })
    }

    fn members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<String>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            let mut s =
                c.prepare_cached("SELECT user FROM members WHERE conv = ?1 ORDER BY user")?;
            let rows = s.query_map([conv], |r| r.get(0))?;
            rows.collect()
        })
    }

    fn is_member(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| {
            c.prepare_cached("SELECT 1 FROM members WHERE conv = ?1 AND user = ?2")?
                .exists(params![conv, user])
        })
    }

    fn last_seq(&self, conv: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let conv = conv.to_string();
        self.read(move |c| query_last_seq(c, &conv))
    }

    fn history(&self, conv: &str, q: HistoryQuery) -> BoxFuture<'static, StoreResult<HistoryPage>> {
        let conv = conv.to_string();
        self.read(move |c| {
            let (sql, bound, limit, descending) = match q {
                HistoryQuery::Latest { limit } => (
                    format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND seq > ?2 ORDER BY seq DESC LIMIT ?3"),
                    0,
                    limit,
                    true,
                ),
                HistoryQuery::Before { before, limit } => (
                    format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"),
                    before,
                    limit,
                    true,
                ),
                HistoryQuery::After { after, limit } => (
                    format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3"),
                    after,
                    limit,
                    false,
                ),
            };
            let mut s = c.prepare_cached(&sql)?;
            let rows = s.query_map(params![conv, bound, i64::from(limit) + 1], row_to_message)?;
            let mut messages: Vec<Message> = rows.collect::<rusqlite::Result<_>>()?;
            let has_more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            if descending {
                messages.reverse();
            }
            Ok(HistoryPage { messages, has_more })
        })
    }

    fn conversations(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<ConvSummary>>> {
        let user = user.to_string();
        self.read(move |c| {
            let mut s = c.prepare_cached(
                "SELECT m.conv, \
                   (SELECT coalesce(max(seq), 0) FROM messages WHERE conv = m.conv), \
                   coalesce((SELECT seq FROM read_cursors WHERE conv = m.conv AND user = m.user), 0) \
                 FROM members m WHERE m.user = ?1 ORDER BY m.conv",
            )?;
            let rows: Vec<(String, u64, u64)> = s
                .query_map([&user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut unread = c.prepare_cached(
                "SELECT count(*) FROM messages WHERE conv = ?1 AND seq > ?2 AND sender != ?3",
            )?;
            rows.into_iter()
                .map(|(conv, last_seq, read_seq)| {
                    let n: u64 = if last_seq > read_seq {
                        unread.query_row(params![conv, read_seq, user], |r| r.get(0))?
                    } else {
                        0
                    };
                    Ok(ConvSummary {
                        conv,
                        last_seq,
                        read_seq,
                        unread: n,
                    })
                })
                .collect()
        })
    }

    fn memberships(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<Membership>>> {
        let user = user.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT m.conv, (SELECT coalesce(max(seq), 0) FROM messages WHERE conv = m.conv) \
                 FROM members m WHERE m.user = ?1 ORDER BY m.conv",
            )?
            .query_map([&user], |r| {
                Ok(Membership {
                    conv: r.get(0)?,
                    last_seq: r.get(1)?,
                })
            })?
            .collect()
        })
    }

    fn message(&self, conv: &str, seq: u64) -> BoxFuture<'static, StoreResult<Option<Message>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conv = ?1 AND seq = ?2"
            ))?
            .query_row(params![conv, seq], row_to_message)
            .optional()
        })
    }

    fn member_role(
        &self,
        conv: &str,
        user: &str,
    ) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| {
            c.prepare_cached("SELECT role FROM members WHERE conv = ?1 AND user = ?2")?
                .query_row(params![conv, user], |r| r.get(0))
                .optional()
        })
    }

    fn recall(
        &self,
        conv: &str,
        seq: u64,
        by: &str,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<()>> {
        let (conv, by) = (conv.to_string(), by.to_string());
        self.write(|reply| WriteOp::Recall {
            conv,
            seq,
            by,
            origin,
            reply,
        })
    }

    fn edit(
        &self,
        conv: &str,
        seq: u64,
        content: serde_json::Value,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<i64>> {
        let conv = conv.to_string();
        self.write(|reply| WriteOp::Edit {
            conv,
            seq,
            content,
            origin,
            reply,
        })
    }

    fn mark_read(
        &self,
        conv: &str,
        user: &str,
        seq: u64,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<u64>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.write(|reply| WriteOp::Read {
            conv,
            user,
            seq,
            origin,
            reply,
        })
    }

    fn create_user(&self, name: &str, password_hash: &str) -> BoxFuture<'static, StoreResult<()>> {
        let (name, password_hash) = (name.to_string(), password_hash.to_string());
        self.write(|reply| WriteOp::CreateUser {
            name,
            password_hash,
            reply,
        })
    }

    fn claim_guest_name(&self, name: &str) -> BoxFuture<'static, StoreResult<()>> {
        let name = name.to_string();
        self.write(|reply| WriteOp::ClaimGuest { name, reply })
    }

    fn password_hash(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let name = name.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT password_hash FROM users WHERE name = ?1")?
                .query_row([name], |r| r.get(0))
                .optional()
        })
    }

    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RoomSummary>>> {
        let after = after.unwrap_or("").to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut s = c.prepare_cached(
                "SELECT c.conv, (SELECT count(*) FROM members m WHERE m.conv = c.conv) \
                 FROM conversations c WHERE c.kind = 'room' AND c.conv > ?1 \
                 ORDER BY c.conv LIMIT ?2",
            )?;
            let rows = s.query_map(params![after, limit], |r| {
                Ok(RoomSummary {
                    conv: r.get(0)?,
                    members: r.get(1)?,
                })
            })?;
            rows.collect()
        })
    }

    fn put_file(&self, meta: FileMeta, quota: u64) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(|reply| WriteOp::PutFile { meta, quota, reply })
    }

    fn file_usage(&self, user: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let user = user.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT coalesce(sum(size), 0) FROM files WHERE uploader = ?1")?
                .query_row([user], |r| r.get(0))
        })
    }

    fn delete_unshared_files(
        &self,
        created_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, StoreResult<Vec<FileMeta>>> {
        self.write(|reply| WriteOp::DeleteUnsharedFiles {
            created_before,
            limit,
            reply,
        })
    }

    fn file(&self, id: &str) -> BoxFuture<'static, StoreResult<Option<FileMeta>>> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, name, mime, size, uploader, created_at FROM files WHERE id = ?1",
            )?
            .query_row([id], row_to_file)
            .optional()
        })
    }

    fn share_conversation(&self, a: &str, b: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (a, b) = (a.to_string(), b.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT 1 FROM members x JOIN members y ON x.conv = y.conv WHERE x.user = ?1 AND y.user = ?2 LIMIT 1",
            )?
            .exists(params![a, b])
        })
    }

    fn changes_since(
        &self,
        conv: &str,
        since: i64,
        up_to: u64,
    ) -> BoxFuture<'static, StoreResult<Vec<Committed>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, recalled, recalled_by, content, edited_at FROM messages \
                 WHERE conv = ?1 AND modified_at > ?2 AND seq <= ?3 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![conv, since, up_to], |r| {
                let seq: u64 = r.get(0)?;
                let recalled: bool = r.get(1)?;
                if recalled {
                    Ok(Committed::Recalled {
                        conv: conv.clone(),
                        seq,
                        by: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                        origin: 0,
                    })
                } else {
                    let content: String = r.get(3)?;
                    Ok(Committed::Edited {
                        conv: conv.clone(),
                        seq,
                        content: serde_json::from_str(&content).unwrap_or(serde_json::Value::Null),
                        edited_at: r.get::<_, Option<i64>>(4)?.unwrap_or_default(),
                        origin: 0,
                    })
                }
            })?;
            rows.collect()
        })
    }

    fn may_read_file(&self, id: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (id, user) = (id.to_string(), user.to_string());
        self.read(move |c| query_may_read_file(c, &id, &user))
    }

    fn watermark(&self) -> i64 {
        self.inner.stamping.load(Ordering::SeqCst)
    }

    fn ping(&self) -> BoxFuture<'static, StoreResult<()>> {
        let write = self.write(WriteOp::Ping);
        let read = self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())));
        Box::pin(async move {
            read.await?;
            write.await
        })
    }

    fn close(&self) -> BoxFuture<'static, StoreResult<()>> {
        self.write(WriteOp::Close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database made before shares were kept per message keeps the shares of the
    /// messages that still point to their file, and no others.
    #[tokio::test]
    async fn shares_recorded_before_per_message_shares_are_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hubbub.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..6] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 6).unwrap();
            conn.execute_batch(
                r#"
INSERT INTO conversations VALUES ('room:a', 'room', 'alice', 0), ('room:b', 'room', 'alice', 0);
INSERT INTO members (conv, user, role, joined_at) VALUES
    ('room:a', 'alice', 'admin', 0), ('room:a', 'bob', 'member', 0),
    ('room:b', 'alice', 'admin', 0), ('room:b', 'carol', 'member', 0);
INSERT INTO files VALUES ('01ARZ3NDEKTSV4RRFFQ69G5FAV', 'a.png', 'image/png', 1, 'alice', 0);
INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts) VALUES
    ('room:a', 1, 'm1', 'alice', 'c1', 'image', '{"url":"/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/a.png"}', 0),
    ('room:a', 2, 'm2', 'alice', 'c2', 'text', '"hello"', 0),
    ('room:b', 1, 'm3', 'alice', 'c3', 'image', 'null', 0);
UPDATE messages SET recalled = 1 WHERE conv = 'room:b';
INSERT INTO file_shares VALUES ('01ARZ3NDEKTSV4RRFFQ69G5FAV', 'room:a'), ('01ARZ3NDEKTSV4RRFFQ69G5FAV', 'room:b');
"#,
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        assert!(
            store.may_read_file(id, "bob").await.unwrap(),
            "still shared"
        );
        assert!(
            !store.may_read_file(id, "carol").await.unwrap(),
            "its message was recalled"
        );
        store.recall("room:a", 1, "alice", 0).await.unwrap();
        assert!(!store.may_read_file(id, "bob").await.unwrap());
        store.close().await.unwrap();
    }
}
