//! `hubbub migrate`: copies a SQLite deployment (`DATA_DIR/hubbub.db`) into an empty
//! PostgreSQL database, resumably, and checks the copy.
//!
//! - The source is opened read-only and read in one transaction (one snapshot); nothing
//!   in it changes. The server must be stopped on it first (nothing checks that).
//! - The target's schema comes from [`PgStore::open`] (the store's own migrations). Then
//!   each table is copied in chunks of at most `chunk_rows` rows (and about 8 MiB), read
//!   in primary-key order (keyset paging, so memory stays bounded) and written with one
//!   `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` per chunk. The chunk's
//!   transaction also records the last key it copied in `hubbub_migration_progress`: a
//!   run that was interrupted goes on after the last committed chunk, and nothing is
//!   copied twice.
//! - A chunk of messages also moves `conversations.last_seq` (PostgreSQL's counter of
//!   each conversation's seqs) up to the newest seq it copied, and creates the row of a
//!   conversation that only messages name.
//! - A target holding hubbub data without that progress table (written by a server, not
//!   by this copy), or holding the progress of another source, is refused before
//!   anything is written.
//! - At the end the [`Report`] compares the row count of every table and, per
//!   conversation, the newest seq and the number of messages, and checks that each
//!   conversation's `last_seq` is its newest seq.
//!
//! The schemas differ a little: `user` is `user_name` in `members` and `read_cursors`,
//! `recalled` is a boolean, and name skeletons are NOT NULL (computed with
//! [`name_skeleton`] where SQLite has none).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::postgres::Connector;
use super::{PgStore, Store};
use crate::auth::name_skeleton;
use crate::metrics::Metrics;

/// Rows per chunk (one transaction each) unless [`Options::chunk_rows`] says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 5000;
/// A chunk also ends once its text columns hold this many bytes.
const CHUNK_BYTES: usize = 8 << 20;
/// The SQLite schema version this copy knows (`PRAGMA user_version` after the SQLite
/// store's migrations). A new SQLite migration must be carried over here too.
const SQLITE_SCHEMA_VERSION: i64 = 15;
/// The advisory lock a migration holds on the target ("hubbub" in ASCII, plus 2).
const LOCK: i64 = 0x6875_6262_7562_0002;
/// How long to wait for the lock another run holds.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// A table being copied reports its progress this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Conversations compared at once.
const CONV_PAGE: i64 = 5000;
/// Mismatches listed in the report (all are counted).
const MAX_LISTED: usize = 50;

const PROGRESS_TABLE: &str = "
CREATE TABLE hubbub_migration_progress (
    -- 'source', or the name of a table
    item    TEXT PRIMARY KEY,
    -- source: what identifies the SQLite database; table: its last key copied (JSON)
    value   TEXT,
    copied  BIGINT NOT NULL DEFAULT 0,
    done    BOOLEAN NOT NULL DEFAULT false
)";

/// Receives progress lines.
pub type ProgressSink = Arc<dyn Fn(&str) + Send + Sync>;

/// How to copy.
#[derive(Clone)]
pub struct Options {
    /// Rows per chunk; each chunk is one transaction on the target.
    pub chunk_rows: usize,
    /// Stop with an error once this many chunks are committed (to test resuming).
    pub stop_after_chunks: Option<u64>,
    /// Where progress lines go (one per table, and every few seconds on a long one).
    pub progress: Option<ProgressSink>,
}

impl Default for Options {
    /// [`DEFAULT_CHUNK_ROWS`], progress lines on stderr.
    fn default() -> Self {
        Options {
            chunk_rows: DEFAULT_CHUNK_ROWS,
            stop_after_chunks: None,
            progress: Some(Arc::new(|line| {
                use std::io::Write as _;
                // Not `eprintln!`: it panics when stderr cannot be written.
                let _ = writeln!(std::io::stderr(), "hubbub migrate: {line}");
            })),
        }
    }
}

/// One table of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub name: &'static str,
    /// Rows in SQLite (for `conversations`, also those that only messages name).
    pub source: u64,
    /// Rows in PostgreSQL at the end.
    pub target: u64,
    /// Rows this run inserted.
    pub copied_now: u64,
}

/// What a migration did and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: Vec<TableReport>,
    /// Conversations with messages whose newest seq and message count were compared.
    pub conversations_compared: u64,
    /// Every difference found (0: the copy matches the source).
    pub mismatch_count: u64,
    /// The first differences, described.
    pub mismatches: Vec<String>,
    /// The target held the progress of an earlier run, which this one went on from.
    pub resumed: bool,
    pub elapsed: Duration,
}

impl Report {
    /// True when the copy matches the source.
    pub fn verified(&self) -> bool {
        self.mismatch_count == 0
    }

    fn mismatch(&mut self, what: String) {
        self.mismatch_count += 1;
        if self.mismatches.len() < MAX_LISTED {
            self.mismatches.push(what);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<15} {:>12} {:>12} {:>12}",
            "table", "SQLite", "PostgreSQL", "copied now"
        )?;
        for t in &self.tables {
            writeln!(
                f,
                "{:<15} {:>12} {:>12} {:>12}",
                t.name, t.source, t.target, t.copied_now
            )?;
        }
        writeln!(
            f,
            "conversations compared (newest seq, message count, last_seq): {}",
            self.conversations_compared
        )?;
        if self.verified() {
            write!(
                f,
                "verified: the copy matches the source ({:.1} s{})",
                self.elapsed.as_secs_f64(),
                if self.resumed { ", resumed" } else { "" }
            )
        } else {
            writeln!(f, "MISMATCH: {} difference(s):", self.mismatch_count)?;
            for m in &self.mismatches {
                writeln!(f, "  {m}")?;
            }
            if self.mismatch_count > self.mismatches.len() as u64 {
                writeln!(
                    f,
                    "  ... and {} more",
                    self.mismatch_count - self.mismatches.len() as u64
                )?;
            }
            write!(f, "the copy does not match the source")
        }
    }
}

/// Copies the SQLite deployment in `data_dir` into the PostgreSQL database at `url` and
/// verifies the copy; progress lines go to stderr. See the module docs.
pub async fn sqlite_to_postgres(data_dir: &Path, url: &str) -> anyhow::Result<Report> {
    sqlite_to_postgres_with(data_dir, url, &Options::default()).await
}

/// [`sqlite_to_postgres`] with [`Options`].
pub async fn sqlite_to_postgres_with(
    data_dir: &Path,
    url: &str,
    opts: &Options,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    anyhow::ensure!(opts.chunk_rows > 0, "chunk_rows must be at least 1");
    let say = |line: &str| {
        if let Some(p) = &opts.progress {
            p(line);
        }
    };
    let source = Source::open(data_dir)?;
    let fingerprint = source.call(fingerprint).await?;
    let counts = source.call(source_counts).await?;

    // The schema, made by the store's own migrations.
    let store = PgStore::open(url, Arc::new(|_| {}), Metrics::new())
        .await
        .context("preparing the PostgreSQL database")?;
    let _ = store.close().await;
    drop(store);
    let mut pg = Connector::new(url)?
        .connect()
        .await
        .context("connecting to PostgreSQL")?;
    lock_target(&pg).await?;
    let resumed = claim_target(&mut pg, &fingerprint).await?;
    if resumed {
        say("going on from the progress of an earlier run");
    }
    let mut progress = load_progress(&pg).await?;

    let mut chunks = 0u64;
    let mut copied = Vec::with_capacity(TABLES.len());
    for (t, &total) in TABLES.iter().zip(&counts) {
        let state = progress.remove(t.name).unwrap_or_default();
        let n = copy_table(&mut pg, &source, t, state, total, opts, &mut chunks, &say).await?;
        copied.push(n);
    }
    let mut report = verify(&pg, &source, &counts, &copied).await?;
    report.resumed = resumed;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A table's copy so far, as recorded in the target.
#[derive(Debug, Default)]
struct TableProgress {
    last_key: Option<Vec<Value>>,
    copied: u64,
    done: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Bool,
}

use Kind::{Bool, Int, Text};

/// One table: the same name in both databases.
struct Table {
    name: &'static str,
    /// (SQLite column, PostgreSQL column, kind), the primary key's columns first.
    columns: &'static [(&'static str, &'static str, Kind)],
    /// How many of the first columns make the primary key.
    key: usize,
    /// The name and skeleton columns: a missing skeleton is computed from the name.
    skeleton: Option<(usize, usize)>,
}

/// Every table, in copying order (conversations before the messages that move their
/// `last_seq`).
const TABLES: &[Table] = &[
    Table {
        name: "users",
        columns: &[
            ("name", "name", Text),
            ("password_hash", "password_hash", Text),
            ("created_at", "created_at", Int),
            ("skeleton", "skeleton", Text),
        ],
        key: 1,
        skeleton: Some((0, 3)),
    },
    Table {
        name: "guest_names",
        columns: &[
            ("name", "name", Text),
            ("skeleton", "skeleton", Text),
            ("first_seen", "first_seen", Int),
        ],
        key: 1,
        skeleton: Some((0, 1)),
    },
    Table {
        name: "conversations",
        columns: &[
            ("conv", "conv", Text),
            ("kind", "kind", Text),
            ("created_by", "created_by", Text),
            ("created_at", "created_at", Int),
        ],
        key: 1,
        skeleton: None,
    },
    Table {
        name: "members",
        columns: &[
            ("conv", "conv", Text),
            ("user", "user_name", Text),
            ("role", "role", Text),
            ("joined_at", "joined_at", Int),
        ],
        key: 2,
        skeleton: None,
    },
    Table {
        name: "messages",
        columns: &[
            ("conv", "conv", Text),
            ("seq", "seq", Int),
            ("msg_id", "msg_id", Text),
            ("sender", "sender", Text),
            ("client_msg_id", "client_msg_id", Text),
            ("content_type", "content_type", Text),
            ("content", "content", Text),
            ("ts", "ts", Int),
            ("recalled", "recalled", Bool),
            ("edited_at", "edited_at", Int),
            ("modified_at", "modified_at", Int),
            ("recalled_by", "recalled_by", Text),
            ("reply_to", "reply_to", Int),
            ("mentions", "mentions", Text),
            ("reacted_at", "reacted_at", Int),
        ],
        key: 2,
        skeleton: None,
    },
    Table {
        name: "read_cursors",
        columns: &[
            ("conv", "conv", Text),
            ("user", "user_name", Text),
            ("seq", "seq", Int),
        ],
        key: 2,
        skeleton: None,
    },
    Table {
        name: "files",
        columns: &[
            ("id", "id", Text),
            ("name", "name", Text),
            ("mime", "mime", Text),
            ("size", "size", Int),
            ("uploader", "uploader", Text),
            ("created_at", "created_at", Int),
        ],
        key: 1,
        skeleton: None,
    },
    Table {
        name: "reactions",
        columns: &[
            ("conv", "conv", Text),
            ("seq", "seq", Int),
            ("emoji", "emoji", Text),
            ("user", "user_name", Text),
            ("at", "at", Int),
        ],
        key: 4,
        skeleton: None,
    },
    Table {
        name: "mentions",
        columns: &[
            ("user", "user_name", Text),
            ("conv", "conv", Text),
            ("seq", "seq", Int),
        ],
        key: 3,
        skeleton: None,
    },
    Table {
        name: "message_files",
        columns: &[
            ("file_id", "file_id", Text),
            ("conv", "conv", Text),
            ("seq", "seq", Int),
        ],
        key: 3,
        skeleton: None,
    },
];

/// Index of `messages` columns used to move the counters.
const MSG_CONV: usize = 0;
const MSG_SEQ: usize = 1;
const MSG_TS: usize = 7;

/// One column of a chunk.
enum Col {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<bool>),
}

impl Col {
    fn new(kind: Kind, capacity: usize) -> Col {
        match kind {
            Text => Col::Text(Vec::with_capacity(capacity)),
            Int => Col::Int(Vec::with_capacity(capacity)),
            Bool => Col::Bool(Vec::with_capacity(capacity)),
        }
    }

    /// Appends column `i` of `row`; returns the bytes of text it took.
    fn push(&mut self, row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<usize> {
        match self {
            Col::Text(v) => {
                let s: Option<String> = row.get(i)?;
                let n = s.as_ref().map_or(0, String::len);
                v.push(s);
                Ok(n)
            }
            Col::Int(v) => {
                v.push(row.get(i)?);
                Ok(0)
            }
            Col::Bool(v) => {
                v.push(row.get(i)?);
                Ok(0)
            }
        }
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Col::Text(v) => v,
            Col::Int(v) => v,
            Col::Bool(v) => v,
        }
    }

    /// Row `i`'s value, as a key part.
    fn key_part(&self, i: usize) -> Value {
        match self {
            Col::Text(v) => v[i].clone().map_or(Value::Null, Value::String),
            Col::Int(v) => v[i].map_or(Value::Null, Value::from),
            Col::Bool(v) => Value::Bool(v[i]),
        }
    }

    fn texts(&self) -> &[Option<String>] {
        match self {
            Col::Text(v) => v,
            _ => &[],
        }
    }

    fn ints(&self) -> &[Option<i64>] {
        match self {
            Col::Int(v) => v,
            _ => &[],
        }
    }
}

/// Rows read from SQLite, by column.
struct Chunk {
    cols: Vec<Col>,
    rows: usize,
}

impl Chunk {
    fn last_key(&self, t: &Table) -> Vec<Value> {
        self.cols[..t.key]
            .iter()
            .map(|c| c.key_part(self.rows - 1))
            .collect()
    }
}

/// The source database: one read-only connection in one read transaction.
struct Source {
    conn: Arc<Mutex<Connection>>,
}

impl Source {
    fn open(dir: &Path) -> anyhow::Result<Source> {
        let path = dir.join("hubbub.db");
        if !path.is_file() {
            bail!(
                "{} does not exist: --from names the data dir of a hubbub server that uses SQLite",
                path.display()
            );
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        // A server that was stopped cleanly left no write-ahead log: then the file is
        // opened as immutable, so that not even SQLite's `-wal` and `-shm` companions
        // are created beside it. With a log (a server that was killed), the log is read
        // too (opening it read-only still uses its `-shm` index).
        let wal = dir.join("hubbub.db-wal");
        let immutable = match path.to_str() {
            Some(p) if !wal.exists() => Some(format!(
                "file:{}?immutable=1",
                p.replace('%', "%25")
                    .replace('?', "%3f")
                    .replace('#', "%23")
            )),
            _ => None,
        };
        let conn = match immutable {
            Some(uri) => Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI),
            None => Connection::open_with_flags(&path, flags),
        }
        .with_context(|| format!("opening {} read-only", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 0 {
            bail!("{} is not a hubbub database", path.display());
        }
        if version < SQLITE_SCHEMA_VERSION {
            bail!(
                "{} has an older schema (version {version}): start this version of `hubbub serve` \
                 on it once (it upgrades the schema at start), stop it, then migrate",
                path.display()
            );
        }
        if version > SQLITE_SCHEMA_VERSION {
            bail!(
                "{} has a newer schema (version {version}) than this hubbub knows \
                 ({SQLITE_SCHEMA_VERSION}): migrate with the hubbub that wrote it",
                path.display()
            );
        }
        // Every read below sees one snapshot.
        conn.execute_batch("BEGIN")?;
        Ok(Source {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection, on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock()))
            .await
            .context("the SQLite reader stopped")?
            .context("reading the SQLite database")
    }
}

/// What tells one source database from another: its first message, else its first
/// account, else its first conversation.
fn fingerprint(c: &Connection) -> rusqlite::Result<String> {
    let first = |sql: &str| c.query_row(sql, [], |r| r.get::<_, String>(0)).optional();
    if let Some(id) = first("SELECT msg_id FROM messages ORDER BY conv, seq LIMIT 1")? {
        return Ok(format!("message {id}"));
    }
    if let Some(u) = first("SELECT name || ' ' || created_at FROM users ORDER BY name LIMIT 1")? {
        return Ok(format!("user {u}"));
    }
    if let Some(c) =
        first("SELECT conv || ' ' || created_at FROM conversations ORDER BY conv LIMIT 1")?
    {
        return Ok(format!("conversation {c}"));
    }
    Ok("empty".into())
}

/// Rows per table in the source ([`TABLES`] order); conversations include those that
/// only messages name (the copy creates their rows).
fn source_counts(c: &Connection) -> rusqlite::Result<Vec<u64>> {
    let mut counts = Vec::with_capacity(TABLES.len());
    for t in TABLES {
        let mut n: u64 = c.query_row(&format!("SELECT count(*) FROM {}", t.name), [], |r| {
            r.get(0)
        })?;
        if t.name == "conversations" {
            n += c.query_row(
                "SELECT count(*) FROM (SELECT DISTINCT conv FROM messages) m \
                 WHERE NOT EXISTS (SELECT 1 FROM conversations c WHERE c.conv = m.conv)",
                [],
                |r| r.get::<_, u64>(0),
            )?;
        }
        counts.push(n);
    }
    Ok(counts)
}

/// Reads the rows of `t` after `after` (its key), in key order: at most `limit` of them,
/// fewer once they hold [`CHUNK_BYTES`] of text.
fn read_chunk(
    c: &Connection,
    t: &'static Table,
    after: Option<Vec<Value>>,
    limit: usize,
) -> rusqlite::Result<Chunk> {
    let columns: Vec<&str> = t.columns.iter().map(|c| c.0).collect();
    let key = columns[..t.key].join(", ");
    let mut params: Vec<rusqlite::types::Value> = Vec::new();
    let filter = match &after {
        None => String::new(),
        Some(parts) => {
            for p in parts {
                params.push(match p {
                    Value::String(s) => rusqlite::types::Value::Text(s.clone()),
                    Value::Number(n) => rusqlite::types::Value::Integer(n.as_i64().unwrap_or(0)),
                    _ => rusqlite::types::Value::Null,
                });
            }
            let marks: Vec<String> = (1..=parts.len()).map(|i| format!("?{i}")).collect();
            format!("WHERE ({key}) > ({})", marks.join(", "))
        }
    };
    params.push(rusqlite::types::Value::Integer(limit as i64));
    let sql = format!(
        "SELECT {} FROM {} {filter} ORDER BY {key} LIMIT ?{}",
        columns.join(", "),
        t.name,
        params.len()
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut cols: Vec<Col> = t
        .columns
        .iter()
        .map(|c| Col::new(c.2, limit.min(1024)))
        .collect();
    let mut n = 0;
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        for (i, col) in cols.iter_mut().enumerate() {
            bytes += col.push(row, i)?;
        }
        n += 1;
        if bytes >= CHUNK_BYTES {
            break;
        }
    }
    if let Some((name, skeleton)) = t.skeleton {
        let names: Vec<String> = cols[name]
            .texts()
            .iter()
            .map(|s| s.clone().unwrap_or_default())
            .collect();
        if let Col::Text(skeletons) = &mut cols[skeleton] {
            for (s, name) in skeletons.iter_mut().zip(names) {
                if s.is_none() {
                    *s = Some(name_skeleton(&name));
                }
            }
        }
    }
    Ok(Chunk { cols, rows: n })
}

/// Takes the migration's lock on the target, waiting a little for a run that was just
/// stopped (its session may take a moment to end).
async fn lock_target(pg: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let locked: bool = pg
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
            .await?
            .get(0);
        if locked {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("another `hubbub migrate` is running on this database");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that the target holds nothing but an earlier run of this copy from the same
/// source; records the source on a fresh target. True when an earlier run is resumed.
async fn claim_target(pg: &mut Client, fingerprint: &str) -> anyhow::Result<bool> {
    let exists: bool = pg
        .query_one(
            "SELECT to_regclass('hubbub_migration_progress') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if exists {
        let recorded: Option<String> = pg
            .query_opt(
                "SELECT value FROM hubbub_migration_progress WHERE item = 'source'",
                &[],
            )
            .await?
            .and_then(|r| r.get(0));
        if recorded.as_deref() != Some(fingerprint) {
            bail!(
                "the target database holds a migration of another SQLite database \
                 ({}, this one is {fingerprint}): migrate into an empty database",
                recorded.as_deref().unwrap_or("unknown")
            );
        }
        return Ok(true);
    }
    let mut holding = Vec::new();
    for t in TABLES {
        let any: bool = pg
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {})", t.name), &[])
            .await?
            .get(0);
        if any {
            holding.push(t.name);
        }
    }
    if !holding.is_empty() {
        bail!(
            "the target database already holds hubbub data that `hubbub migrate` did not \
             copy (rows in {}): migrate into an empty database",
            holding.join(", ")
        );
    }
    let tx = pg.transaction().await?;
    tx.batch_execute(PROGRESS_TABLE).await?;
    tx.execute(
        "INSERT INTO hubbub_migration_progress (item, value) VALUES ('source', $1)",
        &[&fingerprint],
    )
    .await?;
    for t in TABLES {
        tx.execute(
            "INSERT INTO hubbub_migration_progress (item) VALUES ($1)",
            &[&t.name],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(false)
}

async fn load_progress(pg: &Client) -> anyhow::Result<BTreeMap<String, TableProgress>> {
    let mut out = BTreeMap::new();
    for r in pg
        .query(
            "SELECT item, value, copied, done FROM hubbub_migration_progress WHERE item <> 'source'",
            &[],
        )
        .await?
    {
        let item: String = r.get(0);
        let last_key = match r.get::<_, Option<String>>(1) {
            Some(text) => Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("the recorded progress of {item}: {text:?}"))?,
            ),
            None => None,
        };
        out.insert(
            item,
            TableProgress {
                last_key,
                copied: r.get::<_, i64>(2) as u64,
                done: r.get(3),
            },
        );
    }
    Ok(out)
}

/// Copies what is left of table `t`, chunk by chunk; returns the rows it inserted.
#[allow(clippy::too_many_arguments)]
async fn copy_table(
    pg: &mut Client,
    source: &Source,
    t: &'static Table,
    mut state: TableProgress,
    total: u64,
    opts: &Options,
    chunks: &mut u64,
    say: &impl Fn(&str),
) -> anyhow::Result<u64> {
    if state.done {
        say(&format!(
            "{}: copied before ({} rows)",
            t.name, state.copied
        ));
        return Ok(0);
    }
    let started = Instant::now();
    if let Some(key) = &state.last_key {
        say(&format!(
            "{}: going on after {} ({} of {total} rows copied before)",
            t.name,
            Value::Array(key.clone()),
            state.copied
        ));
    }
    let insert = pg.prepare(&insert_sql(t)).await?;
    let mut copied_now = 0u64;
    let mut last_line = Instant::now();
    loop {
        if opts.stop_after_chunks.is_some_and(|max| *chunks >= max) {
            bail!("stopped after {chunks} chunks, as asked");
        }
        let after = state.last_key.clone();
        let limit = opts.chunk_rows;
        let chunk = source
            .call(move |c| read_chunk(c, t, after, limit))
            .await
            .with_context(|| format!("reading {}", t.name))?;
        let tx = pg.transaction().await?;
        if chunk.rows == 0 {
            tx.execute(
                "UPDATE hubbub_migration_progress SET done = true WHERE item = $1",
                &[&t.name],
            )
            .await?;
            tx.commit().await?;
            break;
        }
        let params: Vec<&(dyn ToSql + Sync)> = chunk.cols.iter().map(Col::param).collect();
        let inserted = tx
            .execute(&insert, &params)
            .await
            .with_context(|| format!("writing {}", t.name))?;
        if t.name == "messages" {
            move_counters(&tx, &chunk).await?;
        }
        let key = chunk.last_key(t);
        tx.execute(
            "UPDATE hubbub_migration_progress SET value = $2, copied = copied + $3 WHERE item = $1",
            &[
                &t.name,
                &Value::Array(key.clone()).to_string(),
                &(inserted as i64),
            ],
        )
        .await?;
        tx.commit()
            .await
            .with_context(|| format!("committing a chunk of {}", t.name))?;
        *chunks += 1;
        copied_now += inserted;
        state.copied += inserted;
        state.last_key = Some(key);
        if last_line.elapsed() >= PROGRESS_EVERY {
            say(&format!("{}: {} of {total} rows", t.name, state.copied));
            last_line = Instant::now();
        }
    }
    say(&format!(
        "{}: {} of {total} rows copied ({copied_now} in this run) in {:.1} s",
        t.name,
        state.copied,
        started.elapsed().as_secs_f64()
    ));
    Ok(copied_now)
}

fn insert_sql(t: &Table) -> String {
    let columns: Vec<&str> = t.columns.iter().map(|c| c.1).collect();
    let arrays: Vec<String> = t
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ty = match c.2 {
                Text => "text",
                Int => "int8",
                Bool => "bool",
            };
            format!("${}::{ty}[]", i + 1)
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT DO NOTHING",
        t.name,
        columns.join(", "),
        arrays.join(", ")
    )
}

/// For a chunk of messages: creates the rows of conversations that only messages name,
/// and moves each conversation's `last_seq` up to its newest seq in the chunk.
async fn move_counters(tx: &tokio_postgres::Transaction<'_>, chunk: &Chunk) -> anyhow::Result<()> {
    let convs = chunk.cols[MSG_CONV].texts();
    let seqs = chunk.cols[MSG_SEQ].ints();
    let tss = chunk.cols[MSG_TS].ints();
    // Per conversation: the newest seq, the first message's time.
    let mut per: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for i in 0..chunk.rows {
        let (Some(conv), Some(seq)) = (convs[i].as_deref(), seqs[i]) else {
            continue;
        };
        let ts = tss[i].unwrap_or(0);
        let e = per.entry(conv).or_insert((seq, ts));
        e.0 = e.0.max(seq);
        e.1 = e.1.min(ts);
    }
    let names: Vec<&str> = per.keys().copied().collect();
    let last: Vec<i64> = per.values().map(|v| v.0).collect();
    let first_ts: Vec<i64> = per.values().map(|v| v.1).collect();
    tx.execute(
        "INSERT INTO conversations (conv, kind, created_by, created_at) \
         SELECT c, CASE WHEN c LIKE 'dm:%' THEN 'dm' ELSE 'room' END, NULL, t \
         FROM unnest($1::text[], $2::int8[]) AS u(c, t) ON CONFLICT (conv) DO NOTHING",
        &[&names, &first_ts],
    )
    .await?;
    tx.execute(
        "UPDATE conversations c SET last_seq = u.s FROM unnest($1::text[], $2::int8[]) AS u(conv, s) \
         WHERE c.conv = u.conv AND c.last_seq < u.s",
        &[&names, &last],
    )
    .await?;
    Ok(())
}

/// Newest seq and message count per conversation.
type ConvStats = BTreeMap<String, (i64, i64)>;

/// Compares the two databases: row counts, and per conversation the newest seq, the
/// message count and `last_seq`.
async fn verify(
    pg: &Client,
    source: &Source,
    counts: &[u64],
    copied: &[u64],
) -> anyhow::Result<Report> {
    let mut report = Report {
        tables: Vec::new(),
        conversations_compared: 0,
        mismatch_count: 0,
        mismatches: Vec::new(),
        resumed: false,
        elapsed: Duration::ZERO,
    };
    for ((t, &source_rows), &copied_now) in TABLES.iter().zip(counts).zip(copied) {
        let target: i64 = pg
            .query_one(&format!("SELECT count(*) FROM {}", t.name), &[])
            .await?
            .get(0);
        let target = target as u64;
        if target != source_rows {
            report.mismatch(format!(
                "{}: {source_rows} rows in SQLite, {target} in PostgreSQL",
                t.name
            ));
        }
        report.tables.push(TableReport {
            name: t.name,
            source: source_rows,
            target,
            copied_now,
        });
    }

    // Per conversation, a page of conversations at a time: the source's next page names
    // the range, the target's conversations in that range are compared with it.
    let mut after = String::new();
    loop {
        let from = after.clone();
        let page: ConvStats = source
            .call(move |c| {
                c.prepare_cached(
                    "SELECT conv, max(seq), count(*) FROM messages WHERE conv > ?1 \
                     GROUP BY conv ORDER BY conv LIMIT ?2",
                )?
                .query_map(rusqlite::params![from, CONV_PAGE], |r| {
                    Ok((r.get(0)?, (r.get(1)?, r.get(2)?)))
                })?
                .collect()
            })
            .await?;
        let upto = (page.len() as i64 == CONV_PAGE)
            .then(|| page.keys().next_back().cloned())
            .flatten();
        let rows = match &upto {
            Some(upto) => {
                pg.query(
                    "SELECT conv, max(seq), count(*) FROM messages WHERE conv > $1 AND conv <= $2 \
                     GROUP BY conv",
                    &[&after, upto],
                )
                .await?
            }
            None => {
                pg.query(
                    "SELECT conv, max(seq), count(*) FROM messages WHERE conv > $1 GROUP BY conv",
                    &[&after],
                )
                .await?
            }
        };
        let target: ConvStats = rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let convs: BTreeSet<&String> = page.keys().chain(target.keys()).collect();
        for conv in convs {
            report.conversations_compared += 1;
            match (page.get(conv), target.get(conv)) {
                (Some(s), Some(t)) if s == t => {}
                (Some((s_seq, s_n)), Some((t_seq, t_n))) => report.mismatch(format!(
                    "{conv}: newest seq {s_seq} and {s_n} messages in SQLite, \
                     newest seq {t_seq} and {t_n} messages in PostgreSQL"
                )),
                (Some((seq, n)), None) => report.mismatch(format!(
                    "{conv}: no messages in PostgreSQL (SQLite: newest seq {seq}, {n} messages)"
                )),
                (None, Some((seq, n))) => report.mismatch(format!(
                    "{conv}: messages only in PostgreSQL (newest seq {seq}, {n} messages)"
                )),
                (None, None) => {}
            }
        }
        match upto {
            Some(upto) => after = upto,
            None => break,
        }
    }

    // Every conversation's counter is its newest seq (0 without messages).
    let stale: i64 = pg
        .query_one(
            "SELECT count(*) FROM conversations c \
             WHERE c.last_seq <> coalesce((SELECT max(seq) FROM messages m WHERE m.conv = c.conv), 0)",
            &[],
        )
        .await?
        .get(0);
    if stale > 0 {
        for r in pg
            .query(
                "SELECT c.conv, c.last_seq, coalesce((SELECT max(seq) FROM messages m WHERE m.conv = c.conv), 0) \
                 FROM conversations c \
                 WHERE c.last_seq <> coalesce((SELECT max(seq) FROM messages m WHERE m.conv = c.conv), 0) \
                 ORDER BY c.conv LIMIT $1",
                &[&(MAX_LISTED as i64)],
            )
            .await?
        {
            let (conv, last, newest): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            report.mismatch(format!(
                "{conv}: last_seq {last} in PostgreSQL, but its newest message is seq {newest}"
            ));
        }
        let listed = stale.min(MAX_LISTED as i64);
        report.mismatch_count += (stale - listed) as u64;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQLite store's schema is the one this copy knows: a new SQLite migration must
    /// be carried over to the copy (and to the PostgreSQL schema).
    #[tokio::test]
    async fn the_copy_knows_the_sqlite_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        store.close().await.unwrap();
        drop(store);
        let conn = Connection::open(dir.path().join("hubbub.db")).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SQLITE_SCHEMA_VERSION);
        for t in TABLES {
            let columns: Vec<&str> = t.columns.iter().map(|c| c.0).collect();
            conn.prepare(&format!("SELECT {} FROM {}", columns.join(", "), t.name))
                .unwrap_or_else(|e| panic!("{}: {e}", t.name));
        }
    }

    /// Paging by key uses the primary key, or for messages its unique (conv, seq) index
    /// (no sort, no full scan per page).
    #[tokio::test]
    async fn chunks_are_read_along_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::SqliteStore::open(dir.path(), Arc::new(|_| {})).unwrap();
        store.close().await.unwrap();
        drop(store);
        let conn = Connection::open(dir.path().join("hubbub.db")).unwrap();
        for t in TABLES {
            let columns: Vec<&str> = t.columns.iter().map(|c| c.0).collect();
            let key = columns[..t.key].join(", ");
            let marks: Vec<String> = (1..=t.key).map(|i| format!("?{i}")).collect();
            let sql = format!(
                "EXPLAIN QUERY PLAN SELECT {} FROM {} WHERE ({key}) > ({}) ORDER BY {key} LIMIT 10",
                columns.join(", "),
                t.name,
                marks.join(", ")
            );
            let plan: Vec<String> = conn
                .prepare(&sql)
                .unwrap()
                .query_map(
                    rusqlite::params_from_iter(vec![rusqlite::types::Value::Null; t.key]),
                    |r| r.get::<_, String>(3),
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(
                plan.contains("SEARCH")
                    && (plan.contains("PRIMARY KEY") || plan.contains("INDEX messages_by_seq"))
                    && !plan.contains("TEMP B-TREE"),
                "{}: {plan}",
                t.name
            );
        }
    }
}
