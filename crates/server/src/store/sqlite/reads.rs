//! Reads: a small pool of read-only connections, used from blocking threads (WAL lets
//! them run beside the writer), and the read queries. The writer runs some of these
//! queries too, inside its transaction.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use std::collections::BTreeMap;

use hubbub_protocol::{ContentType, Message, Reactions, ReplyRef};
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::schema::open_conn;
use super::unavailable;
use crate::store::{
    Committed, ConvSummary, FileMeta, HistoryPage, HistoryQuery, Membership, RoomMember,
    RoomSummary, SearchQuery, SearchResult, StoreError, StoreResult,
};

/// Read-only connections in the pool.
const READERS: usize = 4;

/// The pool of read-only connections.
pub(super) struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    /// Opens the pool's connections to the database at `path`.
    pub(super) fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Readers> {
        let mut conns = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let conn = open_conn(path, busy_timeout)?;
            conn.pragma_update(None, "query_only", true)?;
            // 16 MB of pages each (filled only as pages are read): the messages of one
            // conversation are spread over the table, one page per message in a busy
            // store, and catching up re-reads them.
            conn.pragma_update(None, "cache_size", -16384)?;
            conns.push(Mutex::new(conn));
        }
        Ok(Readers {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a blocking thread with the first free connection (trying them in
    /// turn from a rotating start), or waits for one.
    pub(super) fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let pool = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let n = pool.conns.len();
                let start = pool.next.fetch_add(1, Ordering::Relaxed);
                for i in 0..n {
                    if let Some(conn) = pool.conns[(start + i) % n].try_lock() {
                        return f(&conn);
                    }
                }
                let conn = pool.conns[start % n].lock();
                f(&conn)
            })
            .await
            .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
            .map_err(unavailable)
        })
    }
}

/// The columns [`row_to_message`] reads, of `messages m` joined with the message it
/// replies to ([`MESSAGE_FROM`]).
pub(super) const MESSAGE_COLUMNS: &str =
    "m.conv, m.seq, m.msg_id, m.sender, m.client_msg_id, m.content_type, m.content, m.ts, \
     m.recalled, m.edited_at, m.reply_to, r.sender, r.content_type, r.content, r.recalled, \
     m.mentions, m.reacted_at";

/// The tables of [`MESSAGE_COLUMNS`].
pub(super) const MESSAGE_FROM: &str =
    "messages m LEFT JOIN messages r ON r.conv = m.conv AND r.seq = m.reply_to";

/// The reply reference of a message from its columns 10 to 14.
fn reply_ref(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<ReplyRef>> {
    let Some(seq) = row.get::<_, Option<u64>>(10)? else {
        return Ok(None);
    };
    let from: Option<String> = row.get(11)?;
    let kind: Option<String> = row.get(12)?;
    let content: Option<String> = row.get(13)?;
    let recalled: Option<bool> = row.get(14)?;
    Ok(Some(crate::store::reply_ref(
        seq,
        from.unwrap_or_default(),
        kind.as_deref().unwrap_or(""),
        content.as_deref().unwrap_or("null"),
        recalled.unwrap_or(true),
    )))
}

pub(super) fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
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
        reply_to: reply_ref(row)?.map(Box::new),
        // Filled in by `with_reactions` when `reacted_at` (column 16) says there may be
        // some.
        reactions: Default::default(),
        mentions: match row.get::<_, Option<String>>(15)? {
            Some(m) if !recalled => serde_json::from_str(&m).unwrap_or_default(),
            _ => Vec::new(),
        },
    })
}

/// A message and whether it may have reactions.
fn row_to_message_flagged(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Message, bool)> {
    Ok((
        row_to_message(row)?,
        row.get::<_, Option<i64>>(16)?.is_some(),
    ))
}

/// The reactions of `conv`'s messages with seqs from `first` to `last`.
pub(super) fn reactions_between(
    c: &Connection,
    conv: &str,
    first: u64,
    last: u64,
) -> rusqlite::Result<BTreeMap<u64, Reactions>> {
    let mut s = c.prepare_cached(
        "SELECT seq, emoji, user FROM reactions WHERE conv = ?1 AND seq BETWEEN ?2 AND ?3 \
         ORDER BY seq, emoji, user",
    )?;
    let mut out: BTreeMap<u64, Reactions> = BTreeMap::new();
    let rows = s.query_map(params![conv, first, last], |r| {
        Ok((
            r.get::<_, u64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (seq, emoji, user) = row?;
        out.entry(seq)
            .or_default()
            .entry(emoji)
            .or_default()
            .push(user);
    }
    Ok(out)
}

/// Messages of one conversation with their reactions read (one query for those that
/// may have some).
fn with_reactions(c: &Connection, rows: Vec<(Message, bool)>) -> rusqlite::Result<Vec<Message>> {
    let flagged: Vec<u64> = rows
        .iter()
        .filter(|(_, f)| *f)
        .map(|(m, _)| m.seq)
        .collect();
    let mut found = match (flagged.iter().min(), flagged.iter().max(), rows.first()) {
        (Some(&first), Some(&last), Some((m, _))) => reactions_between(c, &m.conv, first, last)?,
        _ => BTreeMap::new(),
    };
    Ok(rows
        .into_iter()
        .map(|(mut m, _)| {
            if let Some(r) = found.remove(&m.seq) {
                m.reactions = r;
            }
            m
        })
        .collect())
}

pub(super) fn row_to_file(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileMeta> {
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
pub(super) fn may_read_file(conn: &Connection, id: &str, user: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM files WHERE id = ?1 AND uploader = ?2 \
         UNION ALL SELECT 1 FROM message_files s JOIN members m ON m.conv = s.conv \
         WHERE s.file_id = ?1 AND m.user = ?2 LIMIT 1",
    )?
    .exists(params![id, user])
}

pub(super) fn last_seq(conn: &Connection, conv: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM messages WHERE conv = ?1")?
        .query_row([conv], |r| r.get(0))
}

pub(super) fn members(c: &Connection, conv: &str) -> rusqlite::Result<Vec<String>> {
    let mut s = c.prepare_cached("SELECT user FROM members WHERE conv = ?1 ORDER BY user")?;
    let rows = s.query_map([conv], |r| r.get(0))?;
    rows.collect()
}

pub(super) fn is_member(c: &Connection, conv: &str, user: &str) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT 1 FROM members WHERE conv = ?1 AND user = ?2")?
        .exists(params![conv, user])
}

pub(super) fn history(
    c: &Connection,
    conv: &str,
    q: HistoryQuery,
) -> rusqlite::Result<HistoryPage> {
    let (sql, bound, limit, descending) = match q {
        HistoryQuery::Latest { limit } => (
            format!("SELECT {MESSAGE_COLUMNS} FROM {MESSAGE_FROM} WHERE m.conv = ?1 AND m.seq > ?2 ORDER BY m.seq DESC LIMIT ?3"),
            0,
            limit,
            true,
        ),
        HistoryQuery::Before { before, limit } => (
            format!("SELECT {MESSAGE_COLUMNS} FROM {MESSAGE_FROM} WHERE m.conv = ?1 AND m.seq < ?2 ORDER BY m.seq DESC LIMIT ?3"),
            before,
            limit,
            true,
        ),
        HistoryQuery::After { after, limit } => (
            format!("SELECT {MESSAGE_COLUMNS} FROM {MESSAGE_FROM} WHERE m.conv = ?1 AND m.seq > ?2 ORDER BY m.seq ASC LIMIT ?3"),
            after,
            limit,
            false,
        ),
    };
    let mut s = c.prepare_cached(&sql)?;
    let rows = s.query_map(
        params![conv, bound, i64::from(limit) + 1],
        row_to_message_flagged,
    )?;
    let mut messages: Vec<(Message, bool)> = rows.collect::<rusqlite::Result<_>>()?;
    let has_more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    if descending {
        messages.reverse();
    }
    Ok(HistoryPage {
        messages: with_reactions(c, messages)?,
        has_more,
    })
}

pub(super) fn conversations(c: &Connection, user: &str) -> rusqlite::Result<Vec<ConvSummary>> {
    let mut s = c.prepare_cached(
        "SELECT m.conv, \
           (SELECT coalesce(max(seq), 0) FROM messages WHERE conv = m.conv), \
           coalesce((SELECT seq FROM read_cursors WHERE conv = m.conv AND user = m.user), 0) \
         FROM members m WHERE m.user = ?1 ORDER BY m.conv",
    )?;
    let rows: Vec<(String, u64, u64)> = s
        .query_map([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut unread = c.prepare_cached(
        "SELECT count(*) FROM messages WHERE conv = ?1 AND seq > ?2 AND sender != ?3",
    )?;
    let mut mentions = c.prepare_cached(
        "SELECT count(*) FROM mentions WHERE user = ?3 AND conv = ?1 AND seq > ?2",
    )?;
    rows.into_iter()
        .map(|(conv, last_seq, read_seq)| {
            let (n, m): (u64, u64) = if last_seq > read_seq {
                (
                    unread.query_row(params![conv, read_seq, user], |r| r.get(0))?,
                    mentions.query_row(params![conv, read_seq, user], |r| r.get(0))?,
                )
            } else {
                (0, 0)
            };
            Ok(ConvSummary {
                conv,
                last_seq,
                read_seq,
                unread: n,
                mentions: m,
            })
        })
        .collect()
}

pub(super) fn memberships(c: &Connection, user: &str) -> rusqlite::Result<Vec<Membership>> {
    c.prepare_cached(
        "SELECT m.conv, (SELECT coalesce(max(seq), 0) FROM messages WHERE conv = m.conv) \
         FROM members m WHERE m.user = ?1 ORDER BY m.conv",
    )?
    .query_map([user], |r| {
        Ok(Membership {
            conv: r.get(0)?,
            last_seq: r.get(1)?,
        })
    })?
    .collect()
}

pub(super) fn message(c: &Connection, conv: &str, seq: u64) -> rusqlite::Result<Option<Message>> {
    let found = c
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM {MESSAGE_FROM} WHERE m.conv = ?1 AND m.seq = ?2"
        ))?
        .query_row(params![conv, seq], row_to_message_flagged)
        .optional()?;
    Ok(match found {
        Some(row) => with_reactions(c, vec![row])?.pop(),
        None => None,
    })
}

pub(super) fn member_role(
    c: &Connection,
    conv: &str,
    user: &str,
) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT role FROM members WHERE conv = ?1 AND user = ?2")?
        .query_row(params![conv, user], |r| r.get(0))
        .optional()
}

pub(super) fn password_hash(c: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT password_hash FROM users WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()
}

/// At most `limit` rooms after `after` (`""`: from the first), in `conv` order.
pub(super) fn rooms(c: &Connection, after: &str, limit: i64) -> rusqlite::Result<Vec<RoomSummary>> {
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
}

pub(super) fn file_usage(c: &Connection, user: &str) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT coalesce(sum(size), 0) FROM files WHERE uploader = ?1")?
        .query_row([user], |r| r.get(0))
}

pub(super) fn file(c: &Connection, id: &str) -> rusqlite::Result<Option<FileMeta>> {
    c.prepare_cached("SELECT id, name, mime, size, uploader, created_at FROM files WHERE id = ?1")?
        .query_row([id], row_to_file)
        .optional()
}

pub(super) fn share_conversation(c: &Connection, a: &str, b: &str) -> rusqlite::Result<bool> {
    c.prepare_cached(
        "SELECT 1 FROM members x JOIN members y ON x.conv = y.conv WHERE x.user = ?1 AND y.user = ?2 LIMIT 1",
    )?
    .exists(params![a, b])
}

pub(super) fn changes_since(
    c: &Connection,
    conv: &str,
    since: i64,
    up_to: u64,
) -> rusqlite::Result<Vec<Committed>> {
    let mut stmt = c.prepare_cached(
        "SELECT seq, recalled, recalled_by, content, edited_at FROM messages \
         WHERE conv = ?1 AND modified_at > ?2 AND seq <= ?3 ORDER BY seq",
    )?;
    let rows = stmt.query_map(params![conv, since, up_to], |r| {
        let seq: u64 = r.get(0)?;
        let recalled: bool = r.get(1)?;
        if recalled {
            Ok(Committed::Recalled {
                conv: conv.to_string(),
                seq,
                by: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                origin: 0,
            })
        } else {
            let content: String = r.get(3)?;
            Ok(Committed::Edited {
                conv: conv.to_string(),
                seq,
                content: serde_json::from_str(&content).unwrap_or(serde_json::Value::Null),
                edited_at: r.get::<_, Option<i64>>(4)?.unwrap_or_default(),
                origin: 0,
            })
        }
    })?;
    let mut out: Vec<Committed> = rows.collect::<rusqlite::Result<_>>()?;
    let reacted: Vec<u64> = c
        .prepare_cached(
            "SELECT seq FROM messages WHERE conv = ?1 AND reacted_at > ?2 AND seq <= ?3 \
             AND recalled = 0 ORDER BY seq",
        )?
        .query_map(params![conv, since, up_to], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if let (Some(&first), Some(&last)) = (reacted.first(), reacted.last()) {
        let mut now = reactions_between(c, conv, first, last)?;
        out.extend(reacted.into_iter().map(|seq| Committed::Reactions {
            conv: conv.to_string(),
            seq,
            reactions: now.remove(&seq).unwrap_or_default(),
        }));
    }
    Ok(out)
}

pub(super) fn room_members(c: &Connection, conv: &str) -> rusqlite::Result<Vec<RoomMember>> {
    c.prepare_cached("SELECT user, role, joined_at FROM members WHERE conv = ?1 ORDER BY user")?
        .query_map([conv], |r| {
            Ok(RoomMember {
                user: r.get(0)?,
                role: r.get(1)?,
                joined_at: r.get(2)?,
            })
        })?
        .collect()
}

/// The FTS5 query of `words`: each a quoted phrase, the last one also a prefix.
fn fts_query(words: &[String]) -> String {
    let n = words.len();
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let quoted = format!("\"{}\"", w.replace('"', "\"\""));
            if i + 1 == n {
                quoted + "*"
            } else {
                quoted
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn search(
    c: &Connection,
    user: &str,
    q: &SearchQuery,
) -> rusqlite::Result<Vec<SearchResult>> {
    let (ts, conv_before, seq) = match &q.before {
        Some(b) => (b.ts, b.conv.clone(), b.seq as i64),
        None => (i64::MAX, String::new(), 0),
    };
    let mut s = c.prepare_cached(
        "SELECT m.conv, m.seq, m.msg_id, m.sender, m.ts, t.body, \
           highlight(message_text, 0, '[', ']') \
         FROM message_text t JOIN messages m ON m.id = t.rowid \
         WHERE message_text MATCH ?1 \
           AND m.conv IN (SELECT conv FROM members WHERE user = ?2) \
           AND (?3 IS NULL OR m.conv = ?3) \
           AND (?4 = 9223372036854775807 OR (m.ts, m.conv, m.seq) < (?4, ?5, ?6)) \
         ORDER BY m.ts DESC, m.conv DESC, m.seq DESC LIMIT ?7",
    )?;
    let rows = s.query_map(
        params![
            fts_query(&q.words),
            user,
            q.conv,
            ts,
            conv_before,
            seq,
            q.limit
        ],
        |r| {
            Ok(SearchResult {
                conv: r.get(0)?,
                seq: r.get(1)?,
                msg_id: r.get(2)?,
                from: r.get(3)?,
                ts: r.get(4)?,
                text: r.get(5)?,
                highlight: r.get(6)?,
            })
        },
    )?;
    rows.collect()
}

/// Whether a read connection answers.
pub(super) fn ping(c: &Connection) -> rusqlite::Result<()> {
    c.query_row("SELECT 1", [], |_| Ok(()))
}
