//! Embedded SQLite store (WAL mode, `synchronous = FULL`).
//!
//! [`SqliteStore`] hands each write to the writer thread (`writer.rs`: the only write
//! connection, group commit) and runs each read on a pool of read-only connections
//! (`reads.rs`); `schema.rs` holds the schema and its migrations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hubbub_protocol::Message;
use rusqlite::Connection;

use crate::metrics::Metrics;

use super::{
    Appended, CommitHook, Committed, ConvSummary, FileMeta, HistoryPage, HistoryQuery, JoinOutcome,
    Membership, NewMessage, RoomMember, RoomSummary, SearchQuery, SearchResult, Store, StoreError,
    StoreResult,
};

mod pending_ids;
mod reads;
mod schema;
mod writer;

use reads::Readers;
use writer::{Answer, WriteOp, Writes};

/// How long a connection waits for a lock held by another process, by default.
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writes: Writes,
    readers: Arc<Readers>,
    path: PathBuf,
}

/// Takes `dir/hubbub.lock` for this store's writer, waiting at most `wait` for a writer
/// that is stopping: one writer per database, since the writer keeps what it last wrote
/// in memory (each conversation's last seq, the client ids not indexed yet).
fn lock_dir(dir: &Path, wait: Duration) -> StoreResult<std::fs::File> {
    let path = dir.join("hubbub.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is in use by another hubbub (it holds {})",
                    dir.display(),
                    path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )))
            }
        }
    }
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
        busy_timeout: Duration,
    ) -> StoreResult<SqliteStore> {
        Self::open_locked(dir, hook, metrics, busy_timeout, true)
    }

    /// A store for account commands (`hubbub user add`) that may run beside a server on
    /// the same data dir: it takes no lock and indexes nothing. Only its account writes
    /// (creating users) are safe beside the server's writer, which keeps no account
    /// state in memory; it must not store messages.
    pub fn open_for_accounts(dir: &Path) -> StoreResult<SqliteStore> {
        let noop: CommitHook = Arc::new(|_| {});
        Self::open_locked(dir, noop, Metrics::new(), DEFAULT_BUSY_TIMEOUT, false)
    }

    fn open_locked(
        dir: &Path,
        hook: CommitHook,
        metrics: Metrics,
        busy_timeout: Duration,
        exclusive: bool,
    ) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let lock = match exclusive {
            true => Some(lock_dir(dir, busy_timeout)?),
            false => None,
        };
        let path = dir.join("hubbub.db");
        let mut conn = schema::open_conn(&path, busy_timeout).map_err(unavailable)?;
        schema::migrate(&mut conn).map_err(unavailable)?;
        let readers = Readers::open(&path, busy_timeout).map_err(unavailable)?;
        let writes = Writes::start(conn, lock, hook, metrics)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writes,
                readers: Arc::new(readers),
                path,
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues `op` now and takes its answer out with `take` (`None`: an answer of
    /// another kind, which the writer never gives).
    fn write<T: Send + 'static>(
        &self,
        op: WriteOp,
        take: fn(Answer) -> Option<T>,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let answer = self.inner.writes.send(op);
        Box::pin(async move {
            take(answer.await?)
                .ok_or_else(|| StoreError::Internal("the writer answered another write".into()))
        })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        self.inner.readers.read(f)
    }
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Store for SqliteStore {
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, StoreResult<Appended>> {
        self.write(WriteOp::Append(msg), |a| match a {
            Answer::Appended(appended) => Some(appended),
            _ => None,
        })
    }

    fn join_room(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<JoinOutcome>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.write(WriteOp::Join { conv, user }, |a| match a {
            Answer::Joined(outcome) => Some(outcome),
            _ => None,
        })
    }

    fn leave_room(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> BoxFuture<'static, StoreResult<Option<u64>>> {
        let (conv, user, by) = (conv.to_string(), user.to_string(), by.map(str::to_string));
        self.write(WriteOp::Leave { conv, user, by }, |a| match a {
            Answer::Left(was_member) => Some(was_member),
            _ => None,
        })
    }

    fn room_members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<RoomMember>>> {
        let conv = conv.to_string();
        self.read(move |c| reads::room_members(c, &conv))
    }

    fn react(
        &self,
        conv: &str,
        seq: u64,
        user: &str,
        emoji: &str,
        on: bool,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        let op = WriteOp::React {
            conv: conv.to_string(),
            seq,
            user: user.to_string(),
            emoji: emoji.to_string(),
            on,
            origin,
        };
        self.write(op, |a| match a {
            Answer::Reacted(changed) => Some(changed),
            _ => None,
        })
    }

    fn search(
        &self,
        user: &str,
        q: SearchQuery,
    ) -> BoxFuture<'static, StoreResult<Vec<SearchResult>>> {
        let user = user.to_string();
        // Every text stored before the search is found by it.
        let indexed = self.inner.writes.send(WriteOp::IndexTexts);
        let readers = self.inner.readers.clone();
        Box::pin(async move {
            indexed.await?;
            readers.read(move |c| reads::search(c, &user, &q)).await
        })
    }

    fn members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<String>>> {
        let conv = conv.to_string();
        self.read(move |c| reads::members(c, &conv))
    }

    fn is_member(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| reads::is_member(c, &conv, &user))
    }

    fn last_seq(&self, conv: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let conv = conv.to_string();
        self.read(move |c| reads::last_seq(c, &conv))
    }

    fn history(&self, conv: &str, q: HistoryQuery) -> BoxFuture<'static, StoreResult<HistoryPage>> {
        let conv = conv.to_string();
        self.read(move |c| reads::history(c, &conv, q))
    }

    fn conversations(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<ConvSummary>>> {
        let user = user.to_string();
        self.read(move |c| reads::conversations(c, &user))
    }

    fn memberships(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<Membership>>> {
        let user = user.to_string();
        self.read(move |c| reads::memberships(c, &user))
    }

    fn message(&self, conv: &str, seq: u64) -> BoxFuture<'static, StoreResult<Option<Message>>> {
        let conv = conv.to_string();
        self.read(move |c| reads::message(c, &conv, seq))
    }

    fn member_role(
        &self,
        conv: &str,
        user: &str,
    ) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| reads::member_role(c, &conv, &user))
    }

    fn recall(
        &self,
        conv: &str,
        seq: u64,
        by: &str,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<()>> {
        let (conv, by) = (conv.to_string(), by.to_string());
        let op = WriteOp::Recall {
            conv,
            seq,
            by,
            origin,
        };
        self.write(op, |a| matches!(a, Answer::Recalled).then_some(()))
    }

    fn edit(
        &self,
        conv: &str,
        seq: u64,
        content: serde_json::Value,
        mentions: Vec<String>,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<i64>> {
        let conv = conv.to_string();
        let op = WriteOp::Edit {
            conv,
            seq,
            content,
            mentions,
            origin,
        };
        self.write(op, |a| match a {
            Answer::Edited(edited_at) => Some(edited_at),
            _ => None,
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
        let op = WriteOp::MarkRead {
            conv,
            user,
            seq,
            origin,
        };
        self.write(op, |a| match a {
            Answer::MarkedRead(position) => Some(position),
            _ => None,
        })
    }

    fn create_user(&self, name: &str, password_hash: &str) -> BoxFuture<'static, StoreResult<()>> {
        let (name, password_hash) = (name.to_string(), password_hash.to_string());
        let op = WriteOp::CreateUser {
            name,
            password_hash,
        };
        self.write(op, |a| matches!(a, Answer::UserCreated).then_some(()))
    }

    fn claim_guest_name(&self, name: &str) -> BoxFuture<'static, StoreResult<()>> {
        let op = WriteOp::ClaimGuestName {
            name: name.to_string(),
        };
        self.write(op, |a| matches!(a, Answer::GuestNameClaimed).then_some(()))
    }

    fn password_hash(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let name = name.to_string();
        self.read(move |c| reads::password_hash(c, &name))
    }

    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RoomSummary>>> {
        let after = after.unwrap_or("").to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| reads::rooms(c, &after, limit))
    }

    fn put_file(&self, meta: FileMeta, quota: u64) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(WriteOp::PutFile { meta, quota }, |a| match a {
            Answer::FileStored(stored) => Some(stored),
            _ => None,
        })
    }

    fn file_usage(&self, user: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let user = user.to_string();
        self.read(move |c| reads::file_usage(c, &user))
    }

    fn delete_unshared_files(
        &self,
        created_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, StoreResult<Vec<FileMeta>>> {
        let op = WriteOp::DeleteUnsharedFiles {
            created_before,
            limit,
        };
        self.write(op, |a| match a {
            Answer::FilesDeleted(gone) => Some(gone),
            _ => None,
        })
    }

    fn file(&self, id: &str) -> BoxFuture<'static, StoreResult<Option<FileMeta>>> {
        let id = id.to_string();
        self.read(move |c| reads::file(c, &id))
    }

    fn share_conversation(&self, a: &str, b: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (a, b) = (a.to_string(), b.to_string());
        self.read(move |c| reads::share_conversation(c, &a, &b))
    }

    fn changes_since(
        &self,
        conv: &str,
        since: i64,
        up_to: u64,
    ) -> BoxFuture<'static, StoreResult<Vec<Committed>>> {
        let conv = conv.to_string();
        self.read(move |c| reads::changes_since(c, &conv, since, up_to))
    }

    fn may_read_file(&self, id: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (id, user) = (id.to_string(), user.to_string());
        self.read(move |c| reads::may_read_file(c, &id, &user))
    }

    fn watermark(&self) -> i64 {
        self.inner.writes.watermark()
    }

    fn ping(&self) -> BoxFuture<'static, StoreResult<()>> {
        let write = self.write(WriteOp::Ping, |a| matches!(a, Answer::Pong).then_some(()));
        let read = self.read(reads::ping);
        Box::pin(async move {
            read.await?;
            write.await
        })
    }

    fn close(&self) -> BoxFuture<'static, StoreResult<()>> {
        self.write(WriteOp::Close, |a| {
            matches!(a, Answer::Closed).then_some(())
        })
    }
}
