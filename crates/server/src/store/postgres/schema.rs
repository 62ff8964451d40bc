//! The PostgreSQL schema and its migrations.
//!
//! Migrations run at start-up under a session advisory lock, so nodes starting together
//! apply each one exactly once; `hubbub_schema` records how many ran. Text that is
//! compared or ordered (ids, names) uses the "C" collation: byte order, as on SQLite.

use tokio_postgres::Client;

/// The advisory lock key held while migrating ("hubbub" in ASCII, plus 1).
const MIGRATION_LOCK: i64 = 0x6875_6262_7562_0001;

/// Schema migrations, applied in order.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE conversations (
    conv        TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT NOT NULL,
    created_by  TEXT,
    created_at  BIGINT NOT NULL,
    -- The newest seq: appends lock this row, take the next seqs and update it in the same
    -- transaction, so seqs are gapless across every node writing to the database.
    last_seq    BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE members (
    conv        TEXT COLLATE "C" NOT NULL,
    user_name   TEXT COLLATE "C" NOT NULL,
    role        TEXT NOT NULL DEFAULT 'member',
    joined_at   BIGINT NOT NULL,
    PRIMARY KEY (conv, user_name)
);
CREATE INDEX members_by_user ON members (user_name, conv);
CREATE TABLE messages (
    conv          TEXT COLLATE "C" NOT NULL,
    seq           BIGINT NOT NULL,
    msg_id        TEXT NOT NULL,
    sender        TEXT COLLATE "C" NOT NULL,
    client_msg_id TEXT COLLATE "C" NOT NULL,
    content_type  TEXT NOT NULL,
    content       TEXT NOT NULL,
    ts            BIGINT NOT NULL,
    recalled      BOOLEAN NOT NULL DEFAULT false,
    edited_at     BIGINT,
    modified_at   BIGINT,
    recalled_by   TEXT,
    PRIMARY KEY (conv, seq)
);
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, client_msg_id);
CREATE INDEX messages_modified ON messages (conv, modified_at) WHERE modified_at IS NOT NULL;
CREATE TABLE read_cursors (
    conv        TEXT COLLATE "C" NOT NULL,
    user_name   TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (conv, user_name)
);
CREATE TABLE users (
    name          TEXT COLLATE "C" PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    skeleton      TEXT NOT NULL
);
CREATE INDEX users_by_skeleton ON users (skeleton);
CREATE TABLE guest_names (
    name        TEXT COLLATE "C" PRIMARY KEY,
    skeleton    TEXT NOT NULL,
    first_seen  BIGINT NOT NULL
);
CREATE INDEX guest_names_by_skeleton ON guest_names (skeleton);
CREATE TABLE files (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    mime        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    uploader    TEXT COLLATE "C" NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX files_by_uploader ON files (uploader);
CREATE INDEX files_by_age ON files (created_at);
CREATE TABLE message_files (
    file_id     TEXT COLLATE "C" NOT NULL,
    conv        TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (file_id, conv, seq)
);
CREATE INDEX message_files_by_message ON message_files (conv, seq);
"#,
    // Version 1.1: replies, mentions, reactions and full-text search. `search` holds the
    // words of a text message that is not recalled (what search finds; kept by the
    // database itself as the content changes); `reacted_at` is when its reactions last
    // changed (for `sync` with `since`).
    r#"
ALTER TABLE messages ADD COLUMN reply_to BIGINT;
ALTER TABLE messages ADD COLUMN mentions TEXT;
ALTER TABLE messages ADD COLUMN reacted_at BIGINT;
ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS (
    CASE WHEN content_type = 'text' AND NOT recalled
         THEN to_tsvector('simple', content::json #>> '{}') END
) STORED;
CREATE INDEX messages_search ON messages USING gin (search);
CREATE INDEX messages_reacted ON messages (conv, reacted_at) WHERE reacted_at IS NOT NULL;
CREATE TABLE reactions (
    conv        TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL,
    emoji       TEXT COLLATE "C" NOT NULL,
    user_name   TEXT COLLATE "C" NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (conv, seq, emoji, user_name)
);
CREATE TABLE mentions (
    user_name   TEXT COLLATE "C" NOT NULL,
    conv        TEXT COLLATE "C" NOT NULL,
    seq         BIGINT NOT NULL,
    PRIMARY KEY (user_name, conv, seq)
);
CREATE INDEX mentions_by_message ON mentions (conv, seq);
"#,
];

/// Applies the migrations this database has not seen, holding the migration lock.
pub(super) async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client).await;
    // Released in any case (also dropped with the connection).
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS hubbub_schema (version INTEGER NOT NULL)")
        .await?;
    let done: i32 = client
        .query_opt("SELECT version FROM hubbub_schema", &[])
        .await?
        .map_or(0, |r| r.get(0));
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("DELETE FROM hubbub_schema", &[]).await?;
        tx.execute(
            "INSERT INTO hubbub_schema (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = i + 1, "applied schema migration (postgres)");
    }
    Ok(())
}
