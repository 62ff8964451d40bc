//! Durable storage: the [`Store`] trait over users' conversations, memberships and
//! messages, and its embedded SQLite implementation ([`SqliteStore`]).
//!
//! Every implementation must pass the shared suite in `conformance` (behind the cargo
//! feature `conformance`, which the tests turn on), so a future PostgreSQL store plugs
//! into the same tests.
//!
//! Contract highlights:
//! - `append` assigns the next `seq` of the conversation (1, 2, 3, ... without gaps) and
//!   resolves only after the message is durable. Appends are ordered at call time: two
//!   `append` calls made one after the other get increasing `seq`s in the same
//!   conversation, even before either future is polled.
//! - The same `(from, client_msg_id)` returns the original message and stores nothing.
//! - Committed messages are announced to the [`CommitHook`] in commit order, before the
//!   appending caller is answered; this is what lets fan-out keep `seq` order. Joins and
//!   leaves are announced the same way, in the same order, so member lists built from
//!   the announcements agree with the store at every message.
//! - An append to a room by a non-member is refused (`NotMember`) in the transaction
//!   that would store it: the store, not a cache, has the last word on membership.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hubbub_protocol::{ContentType, ErrorCode, Message, ProtoError};

#[cfg(feature = "conformance")]
pub mod conformance;
mod postgres;
mod sqlite;
pub mod transfer;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot take writes or reads right now (disk full, locked, closed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request conflicts with stored data (e.g. a reused `client_msg_id`).
    #[error("conflict: {0}")]
    Conflict(String),
    /// No such message or conversation.
    #[error("not found: {0}")]
    NotFound(String),
    /// The sender is not a member of the room (checked in the append's transaction).
    #[error("not a member: {0}")]
    NotMember(String),
    /// The request is not valid against what is stored (a reply to a message that does
    /// not exist, a 21st emoji on a message).
    #[error("invalid: {0}")]
    Invalid(String),
    /// Something that should not happen.
    #[error("store error: {0}")]
    Internal(String),
}

/// What clients are told when the store cannot answer.
pub const UNAVAILABLE_MESSAGE: &str = "the store is unavailable; retry later";

/// Clients get a fixed message for `Unavailable` and `Internal` (the details are logged);
/// `Conflict` and `NotFound` carry messages written for them.
impl From<StoreError> for ProtoError {
    fn from(e: StoreError) -> Self {
        match e {
            // The driver's text stays in the log: it names internals (and may quote the
            // request), which clients have no use for.
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ProtoError::new(ErrorCode::Unavailable, UNAVAILABLE_MESSAGE)
            }
            StoreError::Conflict(m) => ProtoError::new(ErrorCode::Conflict, m),
            StoreError::NotFound(m) => ProtoError::new(ErrorCode::NotFound, m),
            StoreError::NotMember(m) => ProtoError::new(ErrorCode::NotMember, m),
            StoreError::Invalid(m) => ProtoError::new(ErrorCode::BadRequest, m),
            StoreError::Internal(m) => {
                tracing::error!(error = %m, "store error");
                ProtoError::new(ErrorCode::Internal, "internal store error")
            }
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conv: String,
    pub from: String,
    pub client_msg_id: String,
    pub content_type: ContentType,
    /// Validated content (a string for text, an object for attachments).
    pub content: serde_json::Value,
    /// For a DM: its two participants, recorded as members on the first message.
    pub dm_members: Option<(String, String)>,
    /// Opaque id of the session that sent it (passed through to the [`CommitHook`]).
    pub origin: u64,
    /// The seq of the message of the same conversation it answers (it must exist:
    /// `Invalid` otherwise).
    pub reply_to: Option<u64>,
    /// The members its text mentions, each once.
    pub mentions: Vec<String>,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub message: Message,
    /// True when `client_msg_id` had been stored before: nothing new was written.
    pub duplicate: bool,
}

/// Which page of history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `limit`.
    Latest { limit: u32 },
    /// The newest `limit` with `seq < before`.
    Before { before: u64, limit: u32 },
    /// The oldest `limit` with `seq > after`.
    After { after: u64, limit: u32 },
}

/// A page of history, ascending by `seq`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    /// More exist in the paging direction.
    pub has_more: bool,
}

/// Outcome of joining a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinOutcome {
    /// The room did not exist and was created (the joiner is its admin).
    pub created: bool,
    /// The user was not a member before.
    pub added: bool,
    pub last_seq: u64,
}

/// A conversation a user belongs to, with the user's read position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSummary {
    pub conv: String,
    pub last_seq: u64,
    /// Highest `seq` the user marked read (0 if none).
    pub read_seq: u64,
    /// Messages after `read_seq` not sent by the user.
    pub unread: u64,
    /// Of those, the ones that mention the user (recalled ones do not count).
    pub mentions: u64,
}

/// A member of a room, as `GET /api/rooms/{name}/members` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMember {
    pub user: String,
    /// `admin` or `member`.
    pub role: String,
    pub joined_at: i64,
}

/// Most distinct emoji on one message.
pub const MAX_EMOJI_PER_MESSAGE: usize = 20;

/// What to search (see [`Store::search`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    /// The words, each to match (case-insensitively), the last also as a prefix.
    pub words: Vec<String>,
    /// Only this conversation (the caller may read it); otherwise every conversation the
    /// user is a member of.
    pub conv: Option<String>,
    pub limit: u32,
    /// Only results older than this one (the `next` of the previous page).
    pub before: Option<SearchCursor>,
}

/// A place in the newest-first order of search results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchCursor {
    pub ts: i64,
    pub conv: String,
    pub seq: u64,
}

impl SearchCursor {
    /// As sent to clients: `TS.SEQ.CONV`.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.ts, self.seq, self.conv)
    }

    pub fn decode(s: &str) -> Option<SearchCursor> {
        let mut parts = s.splitn(3, '.');
        let ts = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let conv = parts.next()?.to_string();
        Some(SearchCursor { ts, conv, seq })
    }
}

/// One search result, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResult {
    pub conv: String,
    pub seq: u64,
    pub msg_id: String,
    pub from: String,
    pub ts: i64,
    pub text: String,
    /// `text` with each match wrapped in `[` `]`.
    pub highlight: String,
}

/// A conversation a user belongs to and its newest `seq`: what presence and `sync` need,
/// without the read positions and unread counts of [`ConvSummary`] (counting unread
/// messages reads every one of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub conv: String,
    pub last_seq: u64,
}

/// A public room and its member count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub conv: String,
    pub members: u64,
}

/// An uploaded attachment's record (the bytes live in the data dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub id: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
    pub uploader: String,
    pub created_at: i64,
}

/// What the store announces after each commit, in commit order. (Serialized as it
/// travels between the nodes of a cluster.)
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Committed {
    /// A new message (never a duplicate).
    Message { message: Message, origin: u64 },
    /// A message was recalled (its content is gone).
    Recalled {
        conv: String,
        seq: u64,
        by: String,
        origin: u64,
    },
    /// A message's content was replaced.
    Edited {
        conv: String,
        seq: u64,
        content: serde_json::Value,
        edited_at: i64,
        origin: u64,
    },
    /// A user's read position moved forward.
    Receipt {
        conv: String,
        user: String,
        seq: u64,
        origin: u64,
    },
    /// A user joined (`joined: true`) or left a room. Announced in commit order with
    /// the messages, so whoever applies it to a member list sees every message of the
    /// room exactly while the user was a member. `at` is the room's last seq when the
    /// change committed: the joiner gets the messages after it, the leaver those up to it
    /// (a cluster node, which hears of changes from other nodes in no set order, sorts
    /// by it).
    Member {
        conv: String,
        user: String,
        joined: bool,
        #[serde(default)]
        at: u64,
        /// Who removed the user (a leave by a room admin), if not the user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// `user` set (`on`) or cleared the reaction `emoji` on a message.
    Reaction {
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        on: bool,
        origin: u64,
    },
    /// A message's reactions as they are now (only in [`Store::changes_since`]).
    Reactions {
        conv: String,
        seq: u64,
        reactions: hubbub_protocol::Reactions,
    },
}

impl Committed {
    /// The conversation the change belongs to.
    pub fn conv(&self) -> &str {
        match self {
            Committed::Message { message, .. } => &message.conv,
            Committed::Recalled { conv, .. }
            | Committed::Edited { conv, .. }
            | Committed::Receipt { conv, .. }
            | Committed::Member { conv, .. }
            | Committed::Reaction { conv, .. }
            | Committed::Reactions { conv, .. } => conv,
        }
    }
}

/// Called by the store after each commit, once per change, in commit order. It must
/// not block for long: it runs on the store's writer.
pub type CommitHook = Arc<dyn Fn(Committed) + Send + Sync>;

/// Durable storage of conversations and messages.
pub trait Store: Send + Sync + 'static {
    /// Appends a message (see the module docs for ordering and idempotency).
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, StoreResult<Appended>>;

    /// Joins `user` to the room `conv`, creating the room on first join. A new member is
    /// announced to the [`CommitHook`] (`Committed::Member`) in commit order.
    fn join_room(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<JoinOutcome>>;

    /// Removes `user` from the room (`by` someone else: a room admin's removal); the
    /// room's last seq then, or `None` when it was not a member. A removal is announced
    /// to the [`CommitHook`] in commit order.
    fn leave_room(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> BoxFuture<'static, StoreResult<Option<u64>>>;

    /// The members of a room with their roles and when they joined, by name.
    fn room_members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<RoomMember>>>;

    /// Sets (`on`) or clears `user`'s reaction `emoji` on a message; whether anything
    /// changed (a change is announced to the [`CommitHook`]). `NotFound` without such a
    /// message, `Conflict` if it was recalled, `Invalid` for a new emoji beyond
    /// [`MAX_EMOJI_PER_MESSAGE`].
    fn react(
        &self,
        conv: &str,
        seq: u64,
        user: &str,
        emoji: &str,
        on: bool,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<bool>>;

    /// Text messages of the conversations `user` is a member of (or of `q.conv`) that
    /// contain every word of `q` (the last as a prefix), newest first; recalled ones
    /// never, edited ones by their text now.
    fn search(
        &self,
        user: &str,
        q: SearchQuery,
    ) -> BoxFuture<'static, StoreResult<Vec<SearchResult>>>;

    /// Every member of a conversation.
    fn members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<String>>>;

    /// Whether `user` is a member of `conv`.
    fn is_member(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>>;

    /// Highest `seq` of a conversation (0 when empty or unknown).
    fn last_seq(&self, conv: &str) -> BoxFuture<'static, StoreResult<u64>>;

    /// [`Store::last_seq`] of each of `convs`, in the same order.
    fn last_seqs(&self, convs: Vec<String>) -> BoxFuture<'static, StoreResult<Vec<u64>>> {
        let reads: Vec<_> = convs.iter().map(|c| self.last_seq(c)).collect();
        async move {
            let mut out = Vec::with_capacity(reads.len());
            for r in reads {
                out.push(r.await?);
            }
            Ok(out)
        }
        .boxed()
    }

    /// A page of history.
    fn history(&self, conv: &str, q: HistoryQuery) -> BoxFuture<'static, StoreResult<HistoryPage>>;

    /// Every conversation `user` belongs to, with its `last_seq`, the user's read position
    /// and unread count, by conversation id.
    fn conversations(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<ConvSummary>>>;

    /// Every conversation `user` belongs to, with its `last_seq` only, by conversation id.
    fn memberships(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<Membership>>>;

    /// One message (recalled ones without content).
    fn message(&self, conv: &str, seq: u64) -> BoxFuture<'static, StoreResult<Option<Message>>>;

    /// The role of `user` in `conv` (`"admin"` or `"member"`), if a member.
    fn member_role(
        &self,
        conv: &str,
        user: &str,
    ) -> BoxFuture<'static, StoreResult<Option<String>>>;

    /// Recalls a message: its content is erased, its `seq` stays. Recalling a recalled
    /// message changes nothing. `NotFound` if there is no such message.
    fn recall(
        &self,
        conv: &str,
        seq: u64,
        by: &str,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<()>>;

    /// Replaces a message's content (and the members it mentions); returns `edited_at`.
    /// `NotFound` if there is no such message, `Conflict` if it was recalled.
    fn edit(
        &self,
        conv: &str,
        seq: u64,
        content: serde_json::Value,
        mentions: Vec<String>,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<i64>>;

    /// Moves `user`'s read position in `conv` forward to `seq` (capped at the last
    /// message); returns the position after the call.
    fn mark_read(
        &self,
        conv: &str,
        user: &str,
        seq: u64,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<u64>>;

    /// Creates an account; `Conflict` if the name is taken, confusable with an account's
    /// name (same [`crate::auth::name_skeleton`]), or confusable with a name a guest used.
    fn create_user(&self, name: &str, password_hash: &str) -> BoxFuture<'static, StoreResult<()>>;

    /// Records that a guest uses `name` (idempotent), so that no account can take it
    /// later; `Conflict` if the name is confusable with an account's name (same
    /// [`crate::auth::name_skeleton`]). Names are recorded for good.
    fn claim_guest_name(&self, name: &str) -> BoxFuture<'static, StoreResult<()>>;

    /// The stored password hash of an account, if it exists.
    fn password_hash(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<String>>>;

    /// Rooms with their member counts, in `conv` order: at most `limit` of them, those
    /// after the room `after` (a `conv`) when given.
    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RoomSummary>>>;

    /// Records an uploaded file, unless its uploader's files would then total more than
    /// `quota` bytes: false, and nothing is stored. The check and the insert are atomic.
    fn put_file(&self, meta: FileMeta, quota: u64) -> BoxFuture<'static, StoreResult<bool>>;

    /// Total size of the files `user` uploaded that are still stored, in bytes.
    fn file_usage(&self, user: &str) -> BoxFuture<'static, StoreResult<u64>>;

    /// Deletes the records of up to `limit` files created before `created_before` (ms)
    /// that no message shares (never sent, or every message that sent them was recalled
    /// or edited away), oldest first, and returns them so that their bytes can go too.
    fn delete_unshared_files(
        &self,
        created_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, StoreResult<Vec<FileMeta>>>;

    /// An uploaded file's record.
    fn file(&self, id: &str) -> BoxFuture<'static, StoreResult<Option<FileMeta>>>;

    /// Whether two users share a room or a DM.
    fn share_conversation(&self, a: &str, b: &str) -> BoxFuture<'static, StoreResult<bool>>;

    /// Recalls and edits made after `since` (ms) to messages up to `up_to`, one per
    /// message, as its current state (`Recalled` or `Edited`, origin 0), then the
    /// reactions changed since then (`Reactions`) of messages not recalled, by `seq`.
    fn changes_since(
        &self,
        conv: &str,
        since: i64,
        up_to: u64,
    ) -> BoxFuture<'static, StoreResult<Vec<Committed>>>;

    /// Whether `user` may download the file `id`: its uploader, or a member of a
    /// conversation a message shared it to. A message shares the file its attachment's
    /// `url` points to only when its sender could read the file when sending (or
    /// editing) it, and only until it is recalled or edited to point elsewhere.
    fn may_read_file(&self, id: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>>;

    /// A time (Unix ms) before which every change stamp (`ts`, `edited_at`, recall time)
    /// belongs to a committed change: a change being written now is stamped at or after
    /// it. `sync` reports it as `server_time`, so a later `sync` with `since` misses
    /// nothing that was committed after the first one read. An idle store's watermark is
    /// recent (never more than a minute old).
    fn watermark(&self) -> i64;

    /// Checks that the store answers reads and writes.
    fn ping(&self) -> BoxFuture<'static, StoreResult<()>>;

    /// Commits everything queued and stops taking writes.
    fn close(&self) -> BoxFuture<'static, StoreResult<()>>;
}

/// The id of an uploaded file an attachment's content points to
/// (`{"url": "/files/<id>/<name>"}`), if any.
pub fn attachment_file_id(content: &serde_json::Value) -> Option<&str> {
    let url = content.get("url")?.as_str()?;
    match hubbub_protocol::parse_attachment_url(url)? {
        hubbub_protocol::AttachmentUrl::Upload { id, .. } => Some(id),
        hubbub_protocol::AttachmentUrl::External => None,
    }
}

/// The reference a reply keeps to message `seq` from `from`, as stored: its
/// `content_type`, its content (JSON text) and whether it was recalled. Only a text that
/// is not recalled gives an excerpt.
pub(crate) fn reply_ref(
    seq: u64,
    from: String,
    content_type: &str,
    content: &str,
    recalled: bool,
) -> hubbub_protocol::ReplyRef {
    let excerpt = (content_type == "text" && !recalled)
        .then(|| serde_json::from_str::<String>(content).ok())
        .flatten()
        .map(|t| hubbub_protocol::excerpt_of(&t));
    hubbub_protocol::ReplyRef { seq, from, excerpt }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
