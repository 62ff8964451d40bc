//! The writer: one thread owns the only write connection. Every write is queued to it
//! with the sender of its answer; it takes everything that is queued (up to
//! [`MAX_BATCH`]) and applies it in one transaction with one fsync: group commit. While
//! one batch commits, the next one queues up, so the batch grows with load and durability
//! costs little per message. After the commit it announces the changes to the commit
//! hook, in order, then answers. A panic while applying abandons that batch only.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};
use std::sync::Arc;

use hubbub_protocol::{Message, ReplyRef};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::pending_ids::{self, PendingIds};
use super::reads::{
    last_seq, may_read_file, row_to_file, row_to_message, MESSAGE_COLUMNS, MESSAGE_FROM,
};
use super::unavailable;
use crate::auth::name_skeleton;
use crate::metrics::Metrics;
use crate::store::{
    attachment_file_id, now_ms, Appended, CommitHook, Committed, FileMeta, JoinOutcome, NewMessage,
    StoreError, StoreResult, MAX_EMOJI_PER_MESSAGE,
};

/// Most write operations committed in one transaction. Large: under load, a commit's cost
/// is mostly the pages it touches (one leaf of each busy conversation and sender), which
/// a bigger batch shares among more messages (4096 stored 15-35% more messages a second
/// than 1024 in `hubbub bench dm`).
const MAX_BATCH: usize = 4096;

/// Texts are added to the search index in batches, not with each message: a commit's
/// share of the index costs about as much for a few messages as for a thousand. The
/// texts stored since the last indexing join the batch that is being committed when a
/// search waits for them, when there are [`INDEX_AFTER_MESSAGES`] of them, or once the
/// first of them waited [`INDEX_AFTER`] (in a transaction of their own if nothing else
/// is written). Larger chunks index faster and stall the batch that carries them
/// longer: 4,096 texts every 250 ms raised `hubbub bench dm` throughput by a tenth and
/// its ack p99 at half that rate by half. The senders' `client_msg_id`s go to
/// `client_ids` per sender (see [`Writer::pending_ids`]).
const INDEX_AFTER_MESSAGES: i64 = 1024;
const INDEX_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Most senders whose highest client id the writer keeps (see [`Writer::id_ceilings`]).
const MAX_ID_CEILINGS: usize = 100_000;

/// The write-ahead log is copied into the database file once it holds this many pages
/// (SQLite's own default). The writer does it after it has answered the batch that grew
/// the log this far, not inside that batch's commit as SQLite's automatic checkpoint
/// would: the batch's senders do not wait for it, only the next batch does.
const CHECKPOINT_AFTER_PAGES: i32 = 1000;

/// A write operation.
pub(super) enum WriteOp {
    Append(NewMessage),
    Join {
        conv: String,
        user: String,
    },
    Leave {
        conv: String,
        user: String,
        by: Option<String>,
    },
    React {
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        on: bool,
        origin: u64,
    },
    Recall {
        conv: String,
        seq: u64,
        by: String,
        origin: u64,
    },
    Edit {
        conv: String,
        seq: u64,
        content: serde_json::Value,
        mentions: Vec<String>,
        origin: u64,
    },
    MarkRead {
        conv: String,
        user: String,
        seq: u64,
        origin: u64,
    },
    CreateUser {
        name: String,
        password_hash: String,
    },
    ClaimGuestName {
        name: String,
    },
    PutFile {
        meta: FileMeta,
        quota: u64,
    },
    DeleteUnsharedFiles {
        created_before: i64,
        limit: u32,
    },
    /// Answered once the batch it is in commits: the writer is taking writes.
    Ping,
    /// Answered once every text stored before it is in the search index.
    IndexTexts,
    /// Commit what is queued, then stop.
    Close,
}

/// A write's answer, one variant per operation.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // messages travel by value: boxing would allocate once more per message
pub(super) enum Answer {
    Appended(Appended),
    Joined(JoinOutcome),
    /// Whether the user was a member.
    Left(Option<u64>),
    Recalled,
    /// Whether the reaction changed.
    Reacted(bool),
    /// The edit's `edited_at`.
    Edited(i64),
    /// The read position after the call.
    MarkedRead(u64),
    UserCreated,
    GuestNameClaimed,
    /// Whether the file's record was stored (false: over the quota).
    FileStored(bool),
    FilesDeleted(Vec<FileMeta>),
    Pong,
    /// Everything queued before the close is committed; nothing more is taken.
    Closed,
}

/// Where a write's answer goes.
type Reply = oneshot::Sender<StoreResult<Answer>>;

/// A write waiting for the writer: the operation and where its answer goes.
type Queued = (WriteOp, Reply);

/// The store's end of the writer: the queue, and the writer's stamping time.
pub(super) struct Writes {
    queue: flume::Sender<Queued>,
    stamping: Arc<AtomicI64>,
}

impl Writes {
    /// Starts the writer thread on `conn`, the only write connection.
    /// `lock` (see `lock_dir`) is held while the writer runs; without it (a store for
    /// account commands beside a running server) the writer indexes nothing.
    pub(super) fn start(
        mut conn: Connection,
        lock: Option<std::fs::File>,
        hook: CommitHook,
        metrics: Metrics,
    ) -> StoreResult<Writes> {
        let (queue, rx) = flume::unbounded();
        let stamping = Arc::new(AtomicI64::new(i64::MAX));
        // Replaces SQLite's automatic checkpoint (see `CHECKPOINT_AFTER_PAGES`).
        let wal_pages = Arc::new(AtomicI32::new(0));
        let pages = wal_pages.clone();
        conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
                pages.store(n, Ordering::Relaxed);
                Ok(())
            },
        ))
        .map_err(super::unavailable)?;
        let mut writer = Writer {
            conn,
            indexing: lock.is_some(),
            lock,
            wal_pages,
            seqs: HashMap::new(),
            hook,
            metrics,
            stamping: stamping.clone(),
            indexed_upto: 0,
            newest: 0,
            ids_upto: 0,
            ids_checked_at: 0,
            pending_ids: None,
            id_ceilings: HashMap::new(),
            index_wanted: false,
            index_due: None,
            ids_due: None,
        };
        writer.reload_index_progress().map_err(super::unavailable)?;
        std::thread::Builder::new()
            .name("hubbub-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer: {e}")))?;
        Ok(Writes { queue, stamping })
    }

    /// Queues `op` now (so writes are ordered at call time, before the future is polled)
    /// and returns its answer to come.
    pub(super) fn send(
        &self,
        op: WriteOp,
    ) -> impl Future<Output = StoreResult<Answer>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.queue.send((op, tx)).is_ok();
        async move {
            if !sent {
                return Err(closed());
            }
            rx.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the store writer stopped".into())))
        }
    }

    /// See [`crate::store::Store::watermark`]: the writer's [`Writer::stamping`].
    pub(super) fn watermark(&self) -> i64 {
        self.stamping.load(Ordering::SeqCst)
    }
}

struct Writer {
    conn: Connection,
    /// `hubbub.lock`, locked while this writer runs (see `lock_dir`).
    lock: Option<std::fs::File>,
    /// Whether it indexes texts and client ids (only the writer that holds the lock).
    indexing: bool,
    /// Pages in the write-ahead log after the last commit (set by the WAL hook).
    wal_pages: Arc<AtomicI32>,
    /// Last assigned `seq` per conversation seen since start (also: the conversation row
    /// exists).
    seqs: HashMap<String, u64>,
    hook: CommitHook,
    metrics: Metrics,
    /// While a batch is open: a time at or before its change stamps; `i64::MAX` between
    /// batches.
    stamping: Arc<AtomicI64>,
    /// The search index holds the texts of the messages up to this id
    /// (`index_progress.indexed_upto`); newer ones wait for [`Writer::index_pending`].
    indexed_upto: i64,
    /// `client_ids` holds the client ids of the messages up to this id
    /// (`index_progress.ids_upto`), and of some newer ones.
    ids_upto: i64,
    /// `newest` when the pending ids were last checked for age.
    ids_checked_at: i64,
    /// The newest message id.
    newest: i64,
    /// The client ids of the messages newer than `ids_upto` not yet in `client_ids`:
    /// with `client_ids`, where a retried send finds what it stored. Kept in memory and
    /// written per sender (see [`pending_ids`]), so that a commit writes the leaves of a
    /// few senders only, not one for each sender in the batch (which made about half of
    /// the pages a commit wrote); rebuilt from the messages newer than `ids_upto` at start
    /// and after a failed batch (`None`: to be rebuilt before use).
    pending_ids: Option<PendingIds>,
    /// Per sender seen lately, a client id at or above every one it stored: a send whose
    /// id is above it is new without a lookup. Clients that make their ids in increasing
    /// order (the client library does: time first) skip the lookup every time; others
    /// look up as before. Dropped when it holds [`MAX_ID_CEILINGS`] senders and after a
    /// failed batch; filled again from `client_ids` and `pending_ids`.
    id_ceilings: HashMap<String, String>,
    /// A search waits: index the pending texts in this batch.
    index_wanted: bool,
    /// When the pending texts are to be indexed even if nothing else is written.
    index_due: Option<std::time::Instant>,
    /// When all pending client ids are to be written if nothing else is written.
    ids_due: Option<std::time::Instant>,
}

/// What an applied operation answers, and the change it announces once committed.
struct Applied {
    answer: Answer,
    change: Option<Committed>,
}

impl Applied {
    /// An answer with no change to announce.
    fn quiet(answer: Answer) -> Applied {
        Applied {
            answer,
            change: None,
        }
    }
}

/// The result of applying one operation: a database error fails the whole batch; a
/// refusal (the inner `Err`) wrote nothing and is answered at once.
type Outcome = rusqlite::Result<StoreResult<Applied>>;

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

impl Writer {
    fn run(mut self, rx: flume::Receiver<Queued>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let next = match self.index_due.into_iter().chain(self.ids_due).min() {
                Some(due) => rx.recv_deadline(due),
                None => rx.recv().map_err(|_| flume::RecvTimeoutError::Disconnected),
            };
            let queued = match next {
                Ok(queued) => queued,
                Err(flume::RecvTimeoutError::Timeout) => {
                    self.index_alone();
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            batch.push(queued);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(queued) => batch.push(queued),
                    Err(_) => break,
                }
            }
            let mut close = None;
            let writes: Vec<Queued> = batch
                .drain(..)
                .filter_map(|(op, reply)| match op {
                    WriteOp::Close => {
                        close = Some(reply);
                        None
                    }
                    op => Some((op, reply)),
                })
                .collect();
            // A panic while applying (a bug, or a commit hook that panics) must not end the
            // writer: the batch's callers get `unavailable` (their reply senders are
            // dropped), an open transaction is rolled back, and the next batch starts
            // clean. A retried send finds what was committed by its `client_msg_id`.
            let applied =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_batch(writes)));
            if applied.is_err() {
                self.metrics.store_writer_panics.inc();
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.seqs.clear();
                self.stamping.store(i64::MAX, Ordering::SeqCst);
                self.forget_index_progress();
            }
            if let Some(reply) = close {
                // Everything queued before the close has been committed above; refuse the
                // rest (what is sent later fails once the receiver is dropped). Texts not
                // indexed yet are indexed at the next start.
                while let Ok((_, reply)) = rx.try_recv() {
                    let _ = reply.send(Err(closed()));
                }
                // Another store may open the database as soon as this one is closed.
                drop(self.lock.take());
                let _ = reply.send(Ok(Answer::Closed));
                break;
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn apply_batch(&mut self, batch: Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let n = batch.len();
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let err = unavailable(e);
            for (_, reply) in batch {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        // Published before the stamp is taken, so no stamp of this batch is earlier.
        self.stamping.store(now_ms(), Ordering::SeqCst);
        let now = now_ms();
        let mut done: Vec<(Reply, Applied)> = Vec::with_capacity(n);
        let mut failure = None;
        let mut batch = batch.into_iter();
        for (op, reply) in batch.by_ref() {
            match self.apply(op, now) {
                Ok(Ok(applied)) => done.push((reply, applied)),
                // A refusal wrote nothing: answered now, whatever becomes of the batch.
                Ok(Err(refusal)) => {
                    let _ = reply.send(Err(refusal));
                }
                Err(e) => {
                    failure = Some(e);
                    let _ = reply.send(Err(StoreError::Unavailable("the batch failed".into())));
                    break;
                }
            }
        }
        if failure.is_none() && self.indexing {
            failure = self.write_client_ids().err();
        }
        // The pending texts join this commit when a search waits for them or there are
        // enough of them.
        if failure.is_none()
            && self.indexing
            && (self.index_wanted
                || self.newest - self.indexed_upto >= INDEX_AFTER_MESSAGES
                || self.index_due.is_some_and(|due| started >= due))
        {
            failure = self.index_pending().err();
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
            self.forget_index_progress();
            let err = unavailable(e);
            let applied = done.into_iter().map(|(reply, _)| reply);
            for reply in applied.chain(batch.map(|(_, reply)| reply)) {
                let _ = reply.send(Err(err.clone()));
            }
            self.stamping.store(i64::MAX, Ordering::SeqCst);
            return;
        }
        self.index_wanted = false;
        self.schedule_index(true);
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
        for (_, applied) in &mut done {
            if let Some(change) = applied.change.take() {
                if matches!(change, Committed::Message { .. }) {
                    self.metrics.messages_stored.inc();
                }
                (self.hook)(change);
            }
        }
        self.stamping.store(i64::MAX, Ordering::SeqCst);
        for (reply, applied) in done {
            let _ = reply.send(Ok(applied.answer));
        }
        self.checkpoint_if_due();
    }

    /// Copies the write-ahead log into the database file if it grew to
    /// [`CHECKPOINT_AFTER_PAGES`]. Passive: pages a reader still needs wait for the next
    /// time (as with SQLite's automatic checkpoint, which this replaces), and the log
    /// starts over at the next commit once all of it was copied.
    fn checkpoint_if_due(&mut self) {
        if self.wal_pages.load(Ordering::Relaxed) < CHECKPOINT_AFTER_PAGES {
            return;
        }
        self.wal_pages.store(0, Ordering::Relaxed);
        let started = std::time::Instant::now();
        match self
            .conn
            .wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE)
        {
            Ok(_) => self
                .metrics
                .store_checkpoint_seconds
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => tracing::warn!(error = %e, "checkpoint of the write-ahead log failed"),
        }
    }

    /// Applies one operation inside the open transaction.
    fn apply(&mut self, op: WriteOp, now: i64) -> Outcome {
        match op {
            WriteOp::Append(msg) => self.append(msg, now),
            WriteOp::Join { conv, user } => self.join(conv, user, now),
            WriteOp::Leave { conv, user, by } => self.leave(conv, user, by),
            WriteOp::React {
                conv,
                seq,
                user,
                emoji,
                on,
                origin,
            } => self.react(conv, seq, user, emoji, on, origin, now),
            WriteOp::Recall {
                conv,
                seq,
                by,
                origin,
            } => self.recall(conv, seq, by, origin, now),
            WriteOp::Edit {
                conv,
                seq,
                content,
                mentions,
                origin,
            } => self.edit(conv, seq, content, mentions, origin, now),
            WriteOp::MarkRead {
                conv,
                user,
                seq,
                origin,
            } => self.mark_read(conv, user, seq, origin),
            WriteOp::CreateUser {
                name,
                password_hash,
            } => self.create_user(&name, &password_hash, now),
            WriteOp::ClaimGuestName { name } => self.claim_guest_name(&name, now),
            WriteOp::PutFile { meta, quota } => self.put_file(&meta, quota),
            WriteOp::DeleteUnsharedFiles {
                created_before,
                limit,
            } => self.delete_unshared_files(created_before, limit),
            WriteOp::Ping => Ok(Ok(Applied::quiet(Answer::Pong))),
            WriteOp::IndexTexts => {
                self.index_wanted = true;
                Ok(Ok(Applied::quiet(Answer::Pong)))
            }
            // `run` answers a close after the batch; never applied.
            WriteOp::Close => Ok(Ok(Applied::quiet(Answer::Closed))),
        }
    }

    fn last_seq_of(&mut self, conv: &str) -> rusqlite::Result<u64> {
        match self.seqs.get(conv) {
            Some(s) => Ok(*s),
            None => last_seq(&self.conn, conv),
        }
    }

    fn append(&mut self, msg: NewMessage, now: i64) -> Outcome {
        // A retry finds what was stored the first time, even if the sender has left since
        // or the message it replied to is gone.
        if let Some(id) = self.stored_id(&msg.from, &msg.client_msg_id)? {
            return self.stored_already(&msg, id);
        }
        if msg.dm_members.is_none() {
            let member = self
                .conn
                .prepare_cached("SELECT 1 FROM members WHERE conv = ?1 AND user = ?2")?
                .exists(params![msg.conv, msg.from])?;
            if !member {
                return Ok(Err(StoreError::NotMember(format!(
                    "you are not a member of {}",
                    msg.conv
                ))));
            }
        }
        let cached = self.seqs.get(&msg.conv).copied();
        let last = match cached {
            Some(s) => s,
            None => last_seq(&self.conn, &msg.conv)?,
        };
        let seq = last + 1;
        let reply_to = match msg.reply_to {
            None => None,
            Some(to) => match self.reply_ref(&msg.conv, to)? {
                Some(r) => Some(r),
                None => {
                    return Ok(Err(StoreError::Invalid(format!(
                        "reply_to: no message {to} in {}",
                        msg.conv
                    ))))
                }
            },
        };
        let msg_id = ulid::Ulid::new().to_string();
        let content = serde_json::to_string(&msg.content).unwrap_or_else(|_| "null".into());
        let mentions = (!msg.mentions.is_empty())
            .then(|| serde_json::to_string(&msg.mentions).unwrap_or_default());
        // Its text and client id are indexed later, with others (see
        // `INDEX_AFTER_MESSAGES`).
        self.conn
            .prepare_cached(
                "INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts, reply_to, mentions) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                msg.conv,
                seq,
                msg_id,
                msg.from,
                msg.client_msg_id,
                msg.content_type.as_str(),
                content,
                now,
                msg.reply_to,
                mentions,
            ])?;
        self.newest = self.conn.last_insert_rowid();
        let id = self.newest;
        if let Some(ceiling) = self.id_ceilings.get_mut(msg.from.as_str()) {
            if msg.client_msg_id > *ceiling {
                ceiling.clone_from(&msg.client_msg_id);
            }
        }
        self.pending_ids
            .as_mut()
            .expect("read by stored_id")
            .insert(&msg.from, msg.client_msg_id.clone(), id);
        let mut mention = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO mentions (user, conv, seq) VALUES (?1, ?2, ?3)",
        )?;
        for user in &msg.mentions {
            mention.execute(params![user, msg.conv, seq])?;
        }
        drop(mention);
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
        let message = Message {
            conv: msg.conv,
            seq,
            msg_id,
            from: msg.from,
            client_msg_id: msg.client_msg_id,
            content_type: msg.content_type,
            content: Some(msg.content),
            ts: now,
            recalled: false,
            edited_at: None,
            reply_to: reply_to.map(Box::new),
            reactions: Default::default(),
            mentions: msg.mentions,
        };
        Ok(Ok(Applied {
            change: Some(Committed::Message {
                message: message.clone(),
                origin: msg.origin,
            }),
            answer: Answer::Appended(Appended {
                message,
                duplicate: false,
            }),
        }))
    }

    /// The reference of a reply to message `seq` of `conv`, if it exists.
    fn reply_ref(&mut self, conv: &str, seq: u64) -> rusqlite::Result<Option<ReplyRef>> {
        self.conn
            .prepare_cached(
                "SELECT sender, content_type, content, recalled FROM messages WHERE conv = ?1 AND seq = ?2",
            )?
            .query_row(params![conv, seq], |r| {
                let (from, kind, content, recalled): (String, String, String, bool) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                Ok(crate::store::reply_ref(seq, from, &kind, &content, recalled))
            })
            .optional()
    }

    /// Takes message `seq` of `conv` out of the search index. Returns its id if it was
    /// indexed already (a pending text is indexed as it is when its turn comes).
    fn unindex_text(&mut self, conv: &str, seq: u64) -> rusqlite::Result<Option<i64>> {
        let id: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM messages WHERE conv = ?1 AND seq = ?2")?
            .query_row(params![conv, seq], |r| r.get(0))
            .optional()?;
        let Some(id) = id.filter(|id| *id <= self.indexed_upto) else {
            return Ok(None);
        };
        self.conn
            .prepare_cached("DELETE FROM message_text WHERE rowid = ?1")?
            .execute([id])?;
        Ok(Some(id))
    }

    /// Adds the texts of the messages stored since the last indexing to the search index,
    /// inside the open transaction (recalled messages have no text; an edited one is
    /// indexed as it is now).
    fn index_pending(&mut self) -> rusqlite::Result<()> {
        if self.newest <= self.indexed_upto {
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "INSERT INTO message_text (rowid, body) \
                 SELECT id, json_extract(content, '$') FROM messages \
                 WHERE id > ?1 AND id <= ?2 AND content_type = 'text' AND recalled = 0 \
                   AND json_valid(content)",
            )?
            .execute(params![self.indexed_upto, self.newest])?;
        self.conn
            .prepare_cached("UPDATE index_progress SET indexed_upto = ?1")?
            .execute([self.newest])?;
        self.indexed_upto = self.newest;
        Ok(())
    }

    /// Writes to `client_ids`, inside the open transaction, the pending ids of the senders
    /// that have [`pending_ids::CHUNK`] of them and, every [`INDEX_AFTER_MESSAGES`]
    /// messages, of those whose oldest is [`pending_ids::MAX_AGE`] messages old.
    fn write_client_ids(&mut self) -> rusqlite::Result<()> {
        let Some(pending) = self.pending_ids.as_mut() else {
            return Ok(());
        };
        let mut due = pending.take_full();
        let check_age = self.newest - self.ids_checked_at >= INDEX_AFTER_MESSAGES;
        if check_age {
            due.extend(pending.take_older(self.newest - pending_ids::MAX_AGE));
        }
        self.insert_client_ids(due)?;
        if check_age {
            self.ids_checked_at = self.newest;
            self.advance_ids_upto()?;
        }
        Ok(())
    }

    /// Writes `ids` (per sender, sorted: each sender's leaves are visited once) to
    /// `client_ids`.
    fn insert_client_ids(
        &mut self,
        ids: Vec<(String, Vec<(String, i64)>)>,
    ) -> rusqlite::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // `OR IGNORE`: after a restart the ids newer than `ids_upto` are pending again,
        // some of them written already.
        let mut insert = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO client_ids (sender, client_msg_id, id) VALUES (?1, ?2, ?3)",
        )?;
        for (sender, of_sender) in ids {
            for (client_msg_id, id) in of_sender {
                insert.execute(params![sender, client_msg_id, id])?;
            }
        }
        Ok(())
    }

    /// Records in `index_progress` how far `client_ids` is complete.
    fn advance_ids_upto(&mut self) -> rusqlite::Result<()> {
        // Not known (to be rebuilt after a failure): nothing to record.
        let Some(pending) = self.pending_ids.as_ref() else {
            return Ok(());
        };
        let upto = match pending.oldest() {
            Some(oldest) => oldest - 1,
            None => self.newest,
        };
        if upto > self.ids_upto {
            self.conn
                .prepare_cached("UPDATE index_progress SET ids_upto = ?1")?
                .execute([upto])?;
            self.ids_upto = upto;
        }
        Ok(())
    }

    /// Indexes the pending texts, and writes pending client ids (up to
    /// [`INDEX_AFTER_MESSAGES`] of them), in a transaction of their own: nothing else was
    /// written for a while.
    fn index_alone(&mut self) {
        let started = std::time::Instant::now();
        let texts = self.index_due.is_some_and(|due| started >= due);
        let ids = self.ids_due.is_some_and(|due| started >= due);
        let indexed = self.conn.execute_batch("BEGIN IMMEDIATE").and_then(|()| {
            if texts {
                self.index_pending()?;
            }
            if ids {
                let some = match self.pending_ids.as_mut() {
                    Some(pending) => pending.take_some(INDEX_AFTER_MESSAGES as usize),
                    None => Vec::new(),
                };
                self.insert_client_ids(some)?;
                self.advance_ids_upto()?;
            }
            self.conn.execute_batch("COMMIT")
        });
        if texts {
            self.index_due = None;
        }
        if ids {
            self.ids_due = None;
        }
        match indexed {
            Ok(()) => {
                self.metrics
                    .store_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.schedule_index(false);
                self.checkpoint_if_due();
            }
            Err(e) => {
                tracing::error!(error = %e, "indexing texts for search failed; rolled back");
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.forget_index_progress();
            }
        }
    }

    /// After a commit: when the pending texts and client ids are to be written if nothing
    /// else is. Client ids wait for a moment with no writes at all: a commit with writes
    /// pushes that moment back.
    fn schedule_index(&mut self, wrote: bool) {
        let later = std::time::Instant::now() + INDEX_AFTER;
        if !self.indexing || self.newest <= self.indexed_upto {
            self.index_due = None;
        } else if self.index_due.is_none() {
            self.index_due = Some(later);
        }
        if !self.indexing || self.pending_ids.as_ref().is_none_or(PendingIds::is_empty) {
            self.ids_due = None;
        } else if wrote || self.ids_due.is_none() {
            self.ids_due = Some(later);
        }
    }

    /// Reads how far the indexes are (after a failed transaction: what it committed)
    /// and the client ids of the messages not indexed yet, and schedules their indexing.
    fn reload_index_progress(&mut self) -> rusqlite::Result<()> {
        self.pending_ids = None;
        self.id_ceilings.clear();
        (self.indexed_upto, self.ids_upto, self.newest) = self.conn.query_row(
            "SELECT indexed_upto, ids_upto, (SELECT coalesce(max(id), 0) FROM messages) \
             FROM index_progress",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut ids = PendingIds::default();
        {
            let mut select = self.conn.prepare_cached(
                "SELECT sender, client_msg_id, id FROM messages WHERE id > ?1 ORDER BY id",
            )?;
            let mut rows = select.query([self.ids_upto])?;
            while let Some(row) = rows.next()? {
                let sender: String = row.get(0)?;
                ids.insert(&sender, row.get(1)?, row.get(2)?);
            }
        }
        self.pending_ids = Some(ids);
        self.ids_checked_at = self.newest;
        self.index_wanted = false;
        self.index_due = None;
        self.ids_due = None;
        self.schedule_index(false);
        Ok(())
    }

    /// [`Writer::reload_index_progress`] after a failed transaction; if even that fails,
    /// a later indexing tries again.
    fn forget_index_progress(&mut self) {
        if let Err(e) = self.reload_index_progress() {
            tracing::error!(error = %e, "cannot read the search index's progress");
            self.index_due = Some(std::time::Instant::now() + INDEX_AFTER);
        }
    }

    /// Replaces the mentions of message `seq` of `conv`.
    fn set_mentions(&mut self, conv: &str, seq: u64, mentions: &[String]) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM mentions WHERE conv = ?1 AND seq = ?2")?
            .execute(params![conv, seq])?;
        let mut add = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO mentions (user, conv, seq) VALUES (?1, ?2, ?3)",
        )?;
        for user in mentions {
            add.execute(params![user, conv, seq])?;
        }
        let list =
            (!mentions.is_empty()).then(|| serde_json::to_string(mentions).unwrap_or_default());
        self.conn
            .prepare_cached("UPDATE messages SET mentions = ?3 WHERE conv = ?1 AND seq = ?2")?
            .execute(params![conv, seq, list])?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn react(
        &mut self,
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        on: bool,
        origin: u64,
        now: i64,
    ) -> Outcome {
        let recalled: Option<bool> = self
            .conn
            .prepare_cached("SELECT recalled FROM messages WHERE conv = ?1 AND seq = ?2")?
            .query_row(params![conv, seq], |r| r.get(0))
            .optional()?;
        match recalled {
            None => {
                return Ok(Err(StoreError::NotFound(format!(
                    "no message {seq} in {conv}"
                ))))
            }
            Some(true) => {
                return Ok(Err(StoreError::Conflict(format!(
                    "message {seq} in {conv} was recalled"
                ))))
            }
            Some(false) => {}
        }
        let changed = if on {
            let (set, known, distinct): (bool, bool, usize) = self
                .conn
                .prepare_cached(
                    "SELECT coalesce(max(emoji = ?3 AND user = ?4), 0), coalesce(max(emoji = ?3), 0), \
                     count(DISTINCT emoji) FROM reactions WHERE conv = ?1 AND seq = ?2",
                )?
                .query_row(params![conv, seq, emoji, user], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            if set {
                false
            } else if !known && distinct >= MAX_EMOJI_PER_MESSAGE {
                return Ok(Err(StoreError::Invalid(format!(
                    "a message holds at most {MAX_EMOJI_PER_MESSAGE} different emoji"
                ))));
            } else {
                self.conn
                    .prepare_cached(
                        "INSERT INTO reactions (conv, seq, emoji, user, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![conv, seq, emoji, user, now])?;
                true
            }
        } else {
            self.conn
                .prepare_cached(
                    "DELETE FROM reactions WHERE conv = ?1 AND seq = ?2 AND emoji = ?3 AND user = ?4",
                )?
                .execute(params![conv, seq, emoji, user])?
                == 1
        };
        if !changed {
            return Ok(Ok(Applied::quiet(Answer::Reacted(false))));
        }
        self.conn
            .prepare_cached("UPDATE messages SET reacted_at = ?3 WHERE conv = ?1 AND seq = ?2")?
            .execute(params![conv, seq, now])?;
        Ok(Ok(Applied {
            answer: Answer::Reacted(true),
            change: Some(Committed::Reaction {
                conv,
                seq,
                user,
                emoji,
                on,
                origin,
            }),
        }))
    }

    /// The id of the message `sender` stored under `client_msg_id`, if any.
    fn stored_id(&mut self, sender: &str, client_msg_id: &str) -> rusqlite::Result<Option<i64>> {
        if self.pending_ids.is_none() {
            self.reload_index_progress()?;
        }
        if let Some(id) = self
            .pending_ids
            .as_ref()
            .and_then(|ids| ids.get(sender, client_msg_id))
        {
            return Ok(Some(id));
        }
        if !self.id_ceilings.contains_key(sender) {
            let indexed: Option<String> = self
                .conn
                .prepare_cached("SELECT max(client_msg_id) FROM client_ids WHERE sender = ?1")?
                .query_row([sender], |r| r.get(0))?;
            let pending = self
                .pending_ids
                .as_ref()
                .and_then(|ids| ids.highest(sender));
            // "" is below every client id (they have 1 byte or more).
            let ceiling = indexed.max(pending.cloned()).unwrap_or_default();
            if self.id_ceilings.len() >= MAX_ID_CEILINGS {
                self.id_ceilings.clear();
            }
            self.id_ceilings.insert(sender.to_owned(), ceiling);
        }
        if self
            .id_ceilings
            .get(sender)
            .is_some_and(|ceiling| client_msg_id > ceiling.as_str())
        {
            return Ok(None);
        }
        self.conn
            .prepare_cached("SELECT id FROM client_ids WHERE sender = ?1 AND client_msg_id = ?2")?
            .query_row(params![sender, client_msg_id], |r| r.get(0))
            .optional()
    }

    /// The answer to a retried send: the message stored the first time (`id`), or a
    /// conflict if its `client_msg_id` was used in another conversation.
    fn stored_already(&mut self, msg: &NewMessage, id: i64) -> Outcome {
        let message = self
            .conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM {MESSAGE_FROM} WHERE m.id = ?1"
            ))?
            .query_row([id], row_to_message)?;
        if message.conv != msg.conv {
            return Ok(Err(StoreError::Conflict(format!(
                "client_msg_id {:?} was already used in {}",
                msg.client_msg_id, message.conv
            ))));
        }
        Ok(Ok(Applied::quiet(Answer::Appended(Appended {
            message,
            duplicate: true,
        }))))
    }

    fn join(&mut self, conv: String, user: String, now: i64) -> Outcome {
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
        let last_seq = self.last_seq_of(&conv)?;
        Ok(Ok(Applied {
            answer: Answer::Joined(JoinOutcome {
                created,
                added,
                last_seq,
            }),
            change: added.then_some(Committed::Member {
                conv,
                user,
                joined: true,
                at: last_seq,
                by: None,
            }),
        }))
    }

    fn leave(&mut self, conv: String, user: String, by: Option<String>) -> Outcome {
        let left = self
            .conn
            .prepare_cached("DELETE FROM members WHERE conv = ?1 AND user = ?2")?
            .execute(params![conv, user])?
            == 1;
        let at = self.last_seq_of(&conv)?;
        Ok(Ok(Applied {
            answer: Answer::Left(left.then_some(at)),
            change: left.then_some(Committed::Member {
                conv,
                user,
                joined: false,
                at,
                by,
            }),
        }))
    }

    fn recall(&mut self, conv: String, seq: u64, by: String, origin: u64, now: i64) -> Outcome {
        let recalled: Option<bool> = self
            .conn
            .prepare_cached("SELECT recalled FROM messages WHERE conv = ?1 AND seq = ?2")?
            .query_row(params![conv, seq], |r| r.get(0))
            .optional()?;
        let change = match recalled {
            None => {
                return Ok(Err(StoreError::NotFound(format!(
                    "no message {seq} in {conv}"
                ))))
            }
            Some(true) => None,
            Some(false) => {
                // Before the text changes: the index reads it to take it out.
                self.unindex_text(&conv, seq)?;
                self.conn
                    .prepare_cached(
                        "UPDATE messages SET recalled = 1, content = 'null', recalled_by = ?3, modified_at = ?4 \
                         WHERE conv = ?1 AND seq = ?2",
                    )?
                    .execute(params![conv, seq, by, now])?;
                self.unshare_message(&conv, seq)?;
                self.set_mentions(&conv, seq, &[])?;
                self.conn
                    .prepare_cached("DELETE FROM reactions WHERE conv = ?1 AND seq = ?2")?
                    .execute(params![conv, seq])?;
                Some(Committed::Recalled {
                    conv,
                    seq,
                    by,
                    origin,
                })
            }
        };
        Ok(Ok(Applied {
            answer: Answer::Recalled,
            change,
        }))
    }

    fn edit(
        &mut self,
        conv: String,
        seq: u64,
        content: serde_json::Value,
        mentions: Vec<String>,
        origin: u64,
        now: i64,
    ) -> Outcome {
        let found: Option<(bool, String, String)> = self
            .conn
            .prepare_cached(
                "SELECT recalled, sender, content_type FROM messages WHERE conv = ?1 AND seq = ?2",
            )?
            .query_row(params![conv, seq], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let (sender, kind) = match found {
            None => {
                return Ok(Err(StoreError::NotFound(format!(
                    "no message {seq} in {conv}"
                ))))
            }
            Some((true, _, _)) => {
                return Ok(Err(StoreError::Conflict(format!(
                    "message {seq} in {conv} was recalled"
                ))))
            }
            Some((false, sender, kind)) => (sender, kind),
        };
        // Out of the index before the text changes (the index reads the old text to take
        // it out), back in with the new one.
        let indexed = self.unindex_text(&conv, seq)?;
        let text = serde_json::to_string(&content).unwrap_or_else(|_| "null".into());
        self.conn
            .prepare_cached(
                "UPDATE messages SET content = ?3, edited_at = ?4, modified_at = ?4 WHERE conv = ?1 AND seq = ?2",
            )?
            .execute(params![conv, seq, text, now])?;
        self.unshare_message(&conv, seq)?;
        self.share_file(&conv, seq, &sender, &content)?;
        if let (Some(id), Some(text)) = (indexed, content.as_str().filter(|_| kind == "text")) {
            self.conn
                .prepare_cached("INSERT INTO message_text (rowid, body) VALUES (?1, ?2)")?
                .execute(params![id, text])?;
        }
        self.set_mentions(&conv, seq, &mentions)?;
        Ok(Ok(Applied {
            answer: Answer::Edited(now),
            change: Some(Committed::Edited {
                conv,
                seq,
                content,
                edited_at: now,
                origin,
            }),
        }))
    }

    fn mark_read(&mut self, conv: String, user: String, seq: u64, origin: u64) -> Outcome {
        let seq = seq.min(self.last_seq_of(&conv)?);
        let current: u64 = self
            .conn
            .prepare_cached("SELECT seq FROM read_cursors WHERE conv = ?1 AND user = ?2")?
            .query_row(params![conv, user], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        if seq <= current {
            return Ok(Ok(Applied::quiet(Answer::MarkedRead(current))));
        }
        self.conn
            .prepare_cached(
                "INSERT INTO read_cursors (conv, user, seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (conv, user) DO UPDATE SET seq = excluded.seq",
            )?
            .execute(params![conv, user, seq])?;
        Ok(Ok(Applied {
            answer: Answer::MarkedRead(seq),
            change: Some(Committed::Receipt {
                conv,
                user,
                seq,
                origin,
            }),
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
        let Some(id) = attachment_file_id(content) else {
            return Ok(());
        };
        if !may_read_file(&self.conn, id, sender)? {
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

    /// Inserts an account unless its name meets an account's or a guest's name.
    fn create_user(&mut self, name: &str, password_hash: &str, now: i64) -> Outcome {
        let skeleton = name_skeleton(name);
        if let Some(taken) = account_with_skeleton(&self.conn, &skeleton)? {
            return Ok(Err(StoreError::Conflict(if taken == name {
                format!("the user name {name:?} is taken")
            } else {
                format!("the user name {name:?} is too similar to an existing account's name")
            })));
        }
        let guest: Option<String> = self
            .conn
            .prepare_cached("SELECT name FROM guest_names WHERE skeleton = ?1 LIMIT 1")?
            .query_row([&skeleton], |r| r.get(0))
            .optional()?;
        if guest.is_some() {
            return Ok(Err(StoreError::Conflict(format!(
                "the user name {name:?} (or one too similar to it) was used by a guest"
            ))));
        }
        let n = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO users (name, password_hash, created_at, skeleton) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![name, password_hash, now, skeleton])?;
        if n == 0 {
            return Ok(Err(StoreError::Conflict(format!(
                "the user name {name:?} is taken"
            ))));
        }
        Ok(Ok(Applied::quiet(Answer::UserCreated)))
    }

    /// Records a guest name unless it meets an account's name.
    fn claim_guest_name(&mut self, name: &str, now: i64) -> Outcome {
        let skeleton = name_skeleton(name);
        if account_with_skeleton(&self.conn, &skeleton)?.is_some() {
            return Ok(Err(StoreError::Conflict(format!(
                "the name {name:?} belongs to an account (or is too similar to one): \
                 log in, or choose another guest name"
            ))));
        }
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO guest_names (name, skeleton, first_seen) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![name, skeleton, now])?;
        Ok(Ok(Applied::quiet(Answer::GuestNameClaimed)))
    }

    /// Stores a file's record unless its uploader's files would then total more than
    /// `quota` bytes.
    fn put_file(&mut self, meta: &FileMeta, quota: u64) -> Outcome {
        let used: u64 = self
            .conn
            .prepare_cached("SELECT coalesce(sum(size), 0) FROM files WHERE uploader = ?1")?
            .query_row([&meta.uploader], |r| r.get(0))?;
        if used.saturating_add(meta.size) > quota {
            return Ok(Ok(Applied::quiet(Answer::FileStored(false))));
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
        Ok(Ok(Applied::quiet(Answer::FileStored(true))))
    }

    /// Deletes (and returns) up to `limit` records of files created before
    /// `created_before` that no message shares, oldest first.
    fn delete_unshared_files(&mut self, created_before: i64, limit: u32) -> Outcome {
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
        Ok(Ok(Applied::quiet(Answer::FilesDeleted(gone))))
    }
}

/// The account, if any, whose name has `skeleton`.
fn account_with_skeleton(conn: &Connection, skeleton: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT name FROM users WHERE skeleton = ?1 LIMIT 1")?
        .query_row([skeleton], |r| r.get(0))
        .optional()
}

#[cfg(test)]
mod tests {
    use super::MAX_BATCH;

    /// The batch-size histogram has a bucket as large as the largest batch.
    #[test]
    fn the_batch_size_histogram_reaches_the_largest_batch() {
        let m = crate::metrics::Metrics::new();
        m.store_batch_size.observe(MAX_BATCH as f64);
        let text = m.render();
        let bucket = format!("hubbub_store_batch_size_bucket{{le=\"{MAX_BATCH}\"}} 1");
        assert!(text.contains(&bucket), "{bucket} missing from:\n{text}");
    }
}
