//! The database file: how a connection is opened (WAL, `synchronous = FULL`), the schema
//! as a list of migrations, and `PRAGMA user_version`, which counts those that ran.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

use crate::auth::name_skeleton;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // Version 1.1: replies, mentions, reactions and full-text search. `search_id` is the
    // message's row in `message_text` (text messages that are not recalled), so an edit
    // or a recall finds it; `reacted_at` is when its reactions last changed (for `sync`
    // with `since`).
    r#"
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
ALTER TABLE messages ADD COLUMN mentions TEXT;
ALTER TABLE messages ADD COLUMN reacted_at INTEGER;
ALTER TABLE messages ADD COLUMN search_id INTEGER;
CREATE INDEX messages_reacted ON messages (conv, reacted_at) WHERE reacted_at IS NOT NULL;
CREATE TABLE reactions (
    conv        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    emoji       TEXT NOT NULL,
    user        TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (conv, seq, emoji, user)
) WITHOUT ROWID;
CREATE TABLE mentions (
    user        TEXT NOT NULL,
    conv        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (user, conv, seq)
) WITHOUT ROWID;
CREATE INDEX mentions_by_message ON mentions (conv, seq);
CREATE VIRTUAL TABLE message_text USING fts5(
    body, conv UNINDEXED, seq UNINDEXED, tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO message_text (body, conv, seq)
    SELECT json_extract(content, '$'), conv, seq FROM messages
    WHERE content_type = 'text' AND recalled = 0 AND json_valid(content);
UPDATE messages SET search_id = (
    SELECT t.rowid FROM message_text t WHERE t.conv = messages.conv AND t.seq = messages.seq
) WHERE content_type = 'text' AND recalled = 0;
"#,
    // Messages are kept in the order they were stored (a rowid table) with (conv, seq)
    // as an index: a batch of new messages fills the last pages of the table instead of
    // one page (and its splits) per conversation, which cut the pages a commit writes
    // and fsyncs by about 40% with 50 busy conversations.
    r#"
CREATE TABLE messages_by_arrival (
    id            INTEGER PRIMARY KEY,
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
    modified_at   INTEGER,
    recalled_by   TEXT,
    reply_to      INTEGER,
    mentions      TEXT,
    reacted_at    INTEGER,
    search_id     INTEGER
);
INSERT INTO messages_by_arrival (conv, seq, msg_id, sender, client_msg_id, content_type,
        content, ts, recalled, edited_at, modified_at, recalled_by, reply_to, mentions,
        reacted_at, search_id)
    SELECT conv, seq, msg_id, sender, client_msg_id, content_type, content, ts, recalled,
        edited_at, modified_at, recalled_by, reply_to, mentions, reacted_at, search_id
    FROM messages ORDER BY ts, conv, seq;
DROP TABLE messages;
ALTER TABLE messages_by_arrival RENAME TO messages;
CREATE UNIQUE INDEX messages_by_seq ON messages (conv, seq);
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_msg_id);
CREATE INDEX messages_modified ON messages (conv, modified_at) WHERE modified_at IS NOT NULL;
CREATE INDEX messages_reacted ON messages (conv, reacted_at) WHERE reacted_at IS NOT NULL;
"#,
    // The search index's rows are the messages' ids, and texts are indexed in batches
    // after they are stored: `search_progress` is the newest message whose text is in
    // the index (the store indexes the rest before a search reads).
    r#"
DROP TABLE message_text;
CREATE VIRTUAL TABLE message_text USING fts5(
    body, tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO message_text (rowid, body)
    SELECT id, json_extract(content, '$') FROM messages
    WHERE content_type = 'text' AND recalled = 0 AND json_valid(content);
ALTER TABLE messages DROP COLUMN search_id;
CREATE TABLE search_progress (indexed_upto INTEGER NOT NULL);
INSERT INTO search_progress SELECT coalesce(max(id), 0) FROM messages;
"#,
    // A sender's `client_msg_id`s move from an index of `messages`, which every commit
    // wrote a leaf of for each of its senders, to a table filled in batches with the
    // search index: `index_progress` (was `search_progress`) is the newest message whose
    // text and client id are indexed; the writer keeps the newer ones in memory.
    r#"
CREATE TABLE client_ids (
    sender        TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    id            INTEGER NOT NULL,
    PRIMARY KEY (sender, client_msg_id)
) WITHOUT ROWID;
INSERT INTO client_ids (sender, client_msg_id, id)
    SELECT sender, client_msg_id, id FROM messages
    WHERE id <= (SELECT indexed_upto FROM search_progress);
DROP INDEX messages_by_client_id;
ALTER TABLE search_progress RENAME TO index_progress;
"#,
    // Client ids are written to `client_ids` per sender, apart from the search texts:
    // `ids_upto` is the newest message whose client id, and every older one's, is there.
    r#"
ALTER TABLE index_progress ADD COLUMN ids_upto INTEGER NOT NULL DEFAULT 0;
UPDATE index_progress SET ids_upto = indexed_upto;
"#,
    // The search index reads the texts from the messages (external content) instead of
    // keeping a copy, and keeps no per-text sizes (results are ordered by time, not
    // rank): 148 instead of 157 pages per commit of 250 direct messages
    // (`bench/wal_pages.py`). Rebuilt from the messages, every text indexed.
    r#"
DROP TABLE message_text;
CREATE VIEW message_bodies AS
    SELECT id, json_extract(content, '$') AS body FROM messages
    WHERE content_type = 'text' AND recalled = 0 AND json_valid(content);
CREATE VIRTUAL TABLE message_text USING fts5(
    body, content = 'message_bodies', content_rowid = 'id', columnsize = 0,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO message_text (message_text) VALUES ('rebuild');
UPDATE index_progress SET indexed_upto = (SELECT coalesce(max(id), 0) FROM messages);
"#,
    // The search index merges its segments less often: a level's segments are merged
    // once there are 16 of them (FTS5's default is 4), all at once only at 64 (16).
    // Merging was what made a batch that indexes texts slow; searches are as fast
    // (`bench/fts_merge.py`).
    r#"
INSERT INTO message_text (message_text, rank) VALUES ('automerge', 16);
INSERT INTO message_text (message_text, rank) VALUES ('crisismerge', 64);
"#,
];

/// Opens a connection to the database file with the store's settings.
pub(super) fn open_conn(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
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

/// Brings the schema up to date: the migrations not yet run, then the name skeletons of
/// rows written before they were stored.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    fill_skeletons(conn)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{SqliteStore, Store};

    /// A database directory whose schema is at `version` (the first `version`
    /// migrations), holding what `rows` inserts.
    fn database_at(version: usize, rows: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("hubbub.db")).unwrap();
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version).unwrap();
        conn.execute_batch(rows).unwrap();
        dir
    }

    /// A database whose messages were kept by (conv, seq) keeps every message, its
    /// search row and its `client_msg_id` when they move to the table kept in arrival
    /// order; new messages continue each conversation's seqs.
    #[tokio::test]
    async fn messages_moved_to_arrival_order_keep_history_search_and_retries() {
        let dir = database_at(
            9,
            r#"
INSERT INTO conversations VALUES ('room:a', 'room', 'alice', 0), ('room:b', 'room', 'alice', 0);
INSERT INTO members (conv, user, role, joined_at) VALUES
    ('room:a', 'alice', 'admin', 0), ('room:b', 'alice', 'admin', 0);
INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts, reply_to) VALUES
    ('room:b', 1, 'm1', 'alice', 'c1', 'text', '"apples and pears"', 10, NULL),
    ('room:a', 1, 'm2', 'alice', 'c2', 'text', '"pears only"', 20, NULL),
    ('room:a', 2, 'm3', 'alice', 'c3', 'text', '"apples again"', 30, 1);
INSERT INTO message_text (body, conv, seq) SELECT json_extract(content, '$'), conv, seq FROM messages;
UPDATE messages SET search_id = (
    SELECT t.rowid FROM message_text t WHERE t.conv = messages.conv AND t.seq = messages.seq
);
"#,
        );
        let store = SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        let page = store
            .history("room:a", crate::store::HistoryQuery::Latest { limit: 10 })
            .await
            .unwrap();
        let seqs: Vec<_> = page
            .messages
            .iter()
            .map(|m| (m.seq, m.msg_id.as_str()))
            .collect();
        assert_eq!(seqs, [(1, "m2"), (2, "m3")]);
        assert_eq!(page.messages[1].reply_to.as_ref().unwrap().seq, 1);
        let found = store
            .search(
                "alice",
                crate::store::SearchQuery {
                    words: vec!["apples".into()],
                    conv: None,
                    limit: 10,
                    before: None,
                },
            )
            .await
            .unwrap();
        let found: Vec<_> = found.iter().map(|r| r.msg_id.as_str()).collect();
        assert_eq!(found, ["m3", "m1"]);
        let mut retry = text("room:b", "c1", "apples and pears");
        let again = store.append(retry.clone()).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.msg_id, "m1");
        retry.client_msg_id = "c4".into();
        let next = store.append(retry).await.unwrap();
        assert_eq!((next.duplicate, next.message.seq), (false, 2));
        store.close().await.unwrap();
    }

    /// A database whose client ids were an index of `messages` keeps finding retries of
    /// every message: those the search index covered (moved to `client_ids`) and those
    /// still pending (kept in memory by the writer).
    #[tokio::test]
    async fn client_ids_moved_out_of_the_messages_index_still_find_retries() {
        let dir = database_at(
            11,
            r#"
INSERT INTO conversations VALUES ('room:a', 'room', 'alice', 0), ('room:b', 'room', 'alice', 0);
INSERT INTO members (conv, user, role, joined_at) VALUES
    ('room:a', 'alice', 'admin', 0), ('room:b', 'alice', 'admin', 0);
INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts) VALUES
    ('room:a', 1, 'm1', 'alice', 'c1', 'text', '"indexed"', 10),
    ('room:a', 2, 'm2', 'alice', 'c2', 'text', '"pending"', 20);
INSERT INTO message_text (rowid, body) VALUES (1, 'indexed');
UPDATE search_progress SET indexed_upto = 1;
"#,
        );
        let store = SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        // Before any write: `client_ids` is complete up to where the search index was.
        let upto: i64 = Connection::open(dir.path().join("hubbub.db"))
            .unwrap()
            .query_row("SELECT ids_upto FROM index_progress", [], |r| r.get(0))
            .unwrap();
        assert_eq!(upto, 1);
        for (cid, seq) in [("c1", 1), ("c2", 2)] {
            let again = store.append(text("room:a", cid, "retry")).await.unwrap();
            assert!(again.duplicate, "{cid}");
            assert_eq!(
                (again.message.seq, again.message.msg_id),
                (seq, format!("m{seq}"))
            );
            assert!(matches!(
                store.append(text("room:b", cid, "elsewhere")).await,
                Err(crate::store::StoreError::Conflict(_))
            ));
        }
        let next = store.append(text("room:a", "c3", "new")).await.unwrap();
        assert_eq!((next.duplicate, next.message.seq), (false, 3));
        store.close().await.unwrap();
    }

    /// A database of schema 14 gets the search index's merge settings of migration 15
    /// (FTS5 keeps them in `message_text_config`) and keeps its texts searchable.
    #[tokio::test]
    async fn the_search_index_merges_less_often_after_migration_15() {
        let dir = database_at(
            14,
            r#"
INSERT INTO conversations VALUES ('room:a', 'room', 'alice', 0);
INSERT INTO members (conv, user, role, joined_at) VALUES ('room:a', 'alice', 'admin', 0);
INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts) VALUES
    ('room:a', 1, 'm1', 'alice', 'c1', 'text', '"a narwhal surfaced"', 10);
INSERT INTO message_text (rowid, body) VALUES (1, 'a narwhal surfaced');
UPDATE index_progress SET indexed_upto = 1, ids_upto = 1;
"#,
        );
        let store = SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        let conn = Connection::open(dir.path().join("hubbub.db")).unwrap();
        let config: Vec<(String, i64)> = conn
            .prepare("SELECT k, v FROM message_text_config WHERE k LIKE '%merge' ORDER BY k")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            config,
            [
                ("automerge".to_string(), 16),
                ("crisismerge".to_string(), 64)
            ]
        );
        let found = store
            .search(
                "alice",
                crate::store::SearchQuery {
                    words: vec!["narwh".into()],
                    conv: None,
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].msg_id, "m1");
        store.close().await.unwrap();
    }

    fn text(conv: &str, cid: &str, body: &str) -> crate::store::NewMessage {
        crate::store::NewMessage {
            conv: conv.into(),
            from: "alice".into(),
            client_msg_id: cid.into(),
            content_type: hubbub_protocol::ContentType::Text,
            content: serde_json::json!(body),
            dm_members: None,
            origin: 0,
            reply_to: None,
            mentions: Vec::new(),
        }
    }

    /// A database made before shares were kept per message keeps the shares of the
    /// messages that still point to their file, and no others.
    #[tokio::test]
    async fn shares_recorded_before_per_message_shares_are_carried_over() {
        let dir = database_at(
            6,
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
        );
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
