//! The PostgreSQL store: the same contract as the embedded SQLite store, on a database
//! that several hubbub nodes share.
//!
//! - `schema.rs`: the schema and its migrations (under an advisory lock, so nodes that
//!   start together migrate once).
//! - `writer.rs`: every write goes through one task and one connection per node, in
//!   batches (group commit); seqs come from a counter row per conversation locked for the
//!   transaction, so they stay gapless when several nodes append to one conversation.
//! - here: connecting (TLS through rustls unless `sslmode=disable`), the read pool
//!   (deadpool; tokio-postgres pipelines the queries of one connection), and the reads.
//!
//! Every connection runs with `synchronous_commit = on`: an append is answered only after
//! its `COMMIT` is durable. Uploaded files' bytes stay in the data dir, which the nodes
//! of a deployment share (see the README).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::BTreeMap;

use hubbub_protocol::{ContentType, Message, Reactions};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Row};

use super::{
    Appended, CommitHook, Committed, ConvSummary, FileMeta, HistoryPage, HistoryQuery, JoinOutcome,
    Membership, NewMessage, RoomMember, RoomSummary, SearchQuery, SearchResult, Store, StoreError,
    StoreResult,
};
use crate::metrics::Metrics;

mod schema;
mod writer;

use writer::{Op, Outcome, Queued, Writer};

/// A connection of the read pool (it keeps its prepared statements).
type PooledClient = deadpool_postgres::Client;

/// Read connections in the pool.
const DEFAULT_POOL: usize = 16;

/// The columns [`row_to_message`] reads, of `messages m` joined with the message it
/// replies to, `r` ([`REPLIED`]).
/// The message `m` replies to, as `r`: a lateral join, so that it is one index probe
/// per row whatever plan is cached (a hash join would read all of `messages`).
const REPLIED: &str = "LEFT JOIN LATERAL (SELECT sender, content_type, content, recalled \
     FROM messages r WHERE m.reply_to IS NOT NULL AND r.conv = m.conv AND r.seq = m.reply_to) r ON true";

const MESSAGE_COLUMNS: &str =
    "m.conv, m.seq, m.msg_id, m.sender, m.client_msg_id, m.content_type, m.content, m.ts, \
     m.recalled, m.edited_at, m.reply_to, r.sender AS r_sender, r.content_type AS r_type, \
     r.content AS r_content, r.recalled AS r_recalled, m.mentions, m.reacted_at";

/// Whether `$2` may read the file `$1`: its uploader, or a member of a conversation a
/// message shared it to.
const MAY_READ_FILE: &str = "SELECT 1 FROM files WHERE id = $1 AND uploader = $2 \
     UNION ALL SELECT 1 FROM message_files s JOIN members m ON m.conv = s.conv \
     WHERE s.file_id = $1 AND m.user_name = $2 LIMIT 1";

/// Opens connections to the database, with TLS when the URL asks for it.
#[derive(Clone)]
pub(in crate::store) struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    pub(in crate::store) fn new(url: &str) -> StoreResult<Connector> {
        let (url, root_cert) = take_sslrootcert(url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad postgres URL: {e}")))?;
        config.options("-c synchronous_commit=on");
        config.application_name("hubbub");
        config.connect_timeout(std::time::Duration::from_secs(5));
        let tls = match config.get_ssl_mode() {
            SslMode::Disable => None,
            _ => {
                let roots = match &root_cert {
                    None => rustls::RootCertStore::from_iter(
                        webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
                    ),
                    Some(path) => ca_file_roots(path)?,
                };
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| StoreError::Unavailable(format!("TLS setup: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            }
        };
        Ok(Connector { config, tls })
    }

    /// A new connection (its driver runs on its own task until the client is dropped).
    pub(in crate::store) async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "postgres connection ended");
                    }
                });
                Ok(client)
            }
        }
    }

    fn pool(&self, size: usize) -> StoreResult<Pool> {
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            None => Manager::from_config(self.config.clone(), tokio_postgres::NoTls, mc),
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), mc),
        };
        Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(std::time::Duration::from_secs(5)))
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))
    }
}

/// Splits the `sslrootcert=FILE` parameter (as libpq names it) off a URL: the CA
/// certificates (PEM) to verify the server with, instead of the web PKI roots.
fn take_sslrootcert(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut root = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("sslrootcert=") {
            Some(v) => {
                root = Some(
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, root)
}

/// The CA certificates of a PEM file, as the roots to verify the server with.
fn ca_file_roots(path: &str) -> StoreResult<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |e: String| StoreError::Unavailable(format!("sslrootcert {path}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(roots)
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    writes: mpsc::UnboundedSender<Queued>,
    stamping: Arc<AtomicI64>,
    pool: Pool,
}

impl PgStore {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`), runs the migrations and starts
    /// the writer. Must be called inside a tokio runtime.
    pub async fn open(url: &str, hook: CommitHook, metrics: Metrics) -> StoreResult<PgStore> {
        let connector = Connector::new(url)?;
        let mut client = connector.connect().await.map_err(unavailable)?;
        schema::migrate(&mut client).await.map_err(unavailable)?;
        let pool = connector.pool(DEFAULT_POOL)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let stamping = Arc::new(AtomicI64::new(i64::MAX));
        let writer = Writer {
            connector,
            conn: Some(writer::Conn::new(client)),
            hook,
            metrics,
            stamping: stamping.clone(),
        };
        tokio::spawn(writer.run(rx));
        Ok(PgStore {
            inner: Arc::new(Inner {
                writes: tx,
                stamping,
                pool,
            }),
        })
    }

    fn write<T: Send + 'static>(
        &self,
        op: Op,
        take: fn(Outcome) -> Option<T>,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.writes.send(Queued::Write(op, tx)).is_ok();
        async move {
            if !sent {
                return Err(StoreError::Unavailable("the store is closed".into()));
            }
            let outcome = rx.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable("the store writer stopped".into()))
            })?;
            take(outcome).ok_or_else(|| StoreError::Internal("unexpected write outcome".into()))
        }
        .boxed()
    }

    /// Runs `f` on a pooled read connection.
    fn read<T, F>(&self, f: F) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c PooledClient) -> BoxFuture<'c, Result<T, tokio_postgres::Error>>
            + Send
            + 'static,
    {
        let pool = self.inner.pool.clone();
        async move {
            let conn = pool
                .get()
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            f(&conn).await.map_err(unavailable)
        }
        .boxed()
    }
}

fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A message from its row ([`MESSAGE_COLUMNS`]).
fn row_to_message(row: &Row) -> Result<Message, String> {
    let content_type: String = row.get(5);
    let content_type = ContentType::parse(&content_type)
        .ok_or_else(|| format!("unknown content_type {content_type:?}"))?;
    let recalled: bool = row.get(8);
    let content = if recalled {
        None
    } else {
        let text: String = row.get(6);
        Some(serde_json::from_str(&text).map_err(|e| e.to_string())?)
    };
    let reply_to = row.get::<_, Option<i64>>(10).map(|seq| {
        let kind: Option<String> = row.get(12);
        let content: Option<String> = row.get(13);
        crate::store::reply_ref(
            seq as u64,
            row.get::<_, Option<String>>(11).unwrap_or_default(),
            kind.as_deref().unwrap_or(""),
            content.as_deref().unwrap_or("null"),
            row.get::<_, Option<bool>>(14).unwrap_or(true),
        )
    });
    Ok(Message {
        conv: row.get(0),
        seq: row.get::<_, i64>(1) as u64,
        msg_id: row.get(2),
        from: row.get(3),
        client_msg_id: row.get(4),
        content_type,
        content,
        ts: row.get(7),
        recalled,
        edited_at: row.get(9),
        reply_to: reply_to.map(Box::new),
        reactions: Default::default(),
        mentions: match row.get::<_, Option<String>>(15) {
            Some(m) if !recalled => serde_json::from_str(&m).unwrap_or_default(),
            _ => Vec::new(),
        },
    })
}

/// Whether a row of [`MESSAGE_COLUMNS`] may have reactions.
fn may_have_reactions(row: &Row) -> bool {
    row.get::<_, Option<i64>>(16).is_some()
}

/// The reactions of `conv`'s messages with seqs from `first` to `last`.
async fn reactions_between(
    c: &PooledClient,
    conv: &str,
    first: u64,
    last: u64,
) -> Result<BTreeMap<u64, Reactions>, tokio_postgres::Error> {
    let st = c
        .prepare_cached(
            "SELECT seq, emoji, user_name FROM reactions \
             WHERE conv = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq, emoji, user_name",
        )
        .await?;
    let mut out: BTreeMap<u64, Reactions> = BTreeMap::new();
    for r in c
        .query(&st, &[&conv, &(first as i64), &(last as i64)])
        .await?
    {
        out.entry(r.get::<_, i64>(0) as u64)
            .or_default()
            .entry(r.get(1))
            .or_default()
            .push(r.get(2));
    }
    Ok(out)
}

/// The messages of `rows` (one conversation's) with their reactions.
async fn messages_with_reactions(
    c: &PooledClient,
    rows: Vec<Row>,
) -> Result<Vec<Message>, tokio_postgres::Error> {
    let flagged: Vec<u64> = rows
        .iter()
        .filter(|r| may_have_reactions(r))
        .map(|r| r.get::<_, i64>(1) as u64)
        .collect();
    let mut list = messages(rows);
    if let (Some(&first), Some(&last), Some(m)) =
        (flagged.iter().min(), flagged.iter().max(), list.first())
    {
        let mut found = reactions_between(c, &m.conv.clone(), first, last).await?;
        for m in &mut list {
            if let Some(r) = found.remove(&m.seq) {
                m.reactions = r;
            }
        }
    }
    Ok(list)
}

fn row_to_file(r: &Row) -> FileMeta {
    FileMeta {
        id: r.get(0),
        name: r.get(1),
        mime: r.get(2),
        size: r.get::<_, i64>(3) as u64,
        uploader: r.get(4),
        created_at: r.get(5),
    }
}

fn messages(rows: Vec<Row>) -> Vec<Message> {
    rows.iter()
        .filter_map(|r| match row_to_message(r) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %e, "a stored message cannot be read");
                None
            }
        })
        .collect()
}

/// Runs one statement (prepared once per pooled connection) and returns its rows.
async fn rows(
    c: &PooledClient,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let st = c.prepare_cached(sql).await?;
    c.query(&st, params).await
}

impl Store for PgStore {
    fn append(&self, msg: NewMessage) -> BoxFuture<'static, StoreResult<Appended>> {
        self.write(Op::Append(msg), |o| match o {
            Outcome::Appended(a) => Some(a),
            _ => None,
        })
    }

    fn join_room(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<JoinOutcome>> {
        let op = Op::Join {
            conv: conv.to_string(),
            user: user.to_string(),
        };
        self.write(op, |o| match o {
            Outcome::Joined(j) => Some(j),
            _ => None,
        })
    }

    fn leave_room(
        &self,
        conv: &str,
        user: &str,
        by: Option<&str>,
    ) -> BoxFuture<'static, StoreResult<Option<u64>>> {
        let op = Op::Leave {
            conv: conv.to_string(),
            user: user.to_string(),
            by: by.map(str::to_string),
        };
        self.write(op, |o| match o {
            Outcome::Left(b) => Some(b),
            _ => None,
        })
    }

    fn members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<String>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT user_name FROM members WHERE conv = $1 ORDER BY user_name",
                    &[&conv],
                )
                .await?;
                Ok(r.iter().map(|r| r.get(0)).collect())
            }
            .boxed()
        })
    }

    fn is_member(&self, conv: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT 1 FROM members WHERE conv = $1 AND user_name = $2",
                    &[&conv, &user],
                )
                .await?;
                Ok(!r.is_empty())
            }
            .boxed()
        })
    }

    fn last_seq(&self, conv: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let conv = conv.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT last_seq FROM conversations WHERE conv = $1",
                    &[&conv],
                )
                .await?;
                Ok(r.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
            }
            .boxed()
        })
    }

    fn last_seqs(&self, convs: Vec<String>) -> BoxFuture<'static, StoreResult<Vec<u64>>> {
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT conv, last_seq FROM conversations WHERE conv = ANY($1)",
                    &[&convs],
                )
                .await?;
                let found: std::collections::HashMap<String, i64> =
                    r.iter().map(|r| (r.get(0), r.get(1))).collect();
                Ok(convs
                    .iter()
                    .map(|c| found.get(c).map_or(0, |s| *s as u64))
                    .collect())
            }
            .boxed()
        })
    }

    fn history(&self, conv: &str, q: HistoryQuery) -> BoxFuture<'static, StoreResult<HistoryPage>> {
        let conv = conv.to_string();
        self.read(move |c| {
            async move {
                let (sql, bound, limit, descending) = match q {
                    HistoryQuery::Latest { limit } => (HISTORY_BEFORE, i64::MAX, limit, true),
                    HistoryQuery::Before { before, limit } => {
                        (HISTORY_BEFORE, before as i64, limit, true)
                    }
                    HistoryQuery::After { after, limit } => {
                        (HISTORY_AFTER, after as i64, limit, false)
                    }
                };
                let fetch = i64::from(limit) + 1;
                let mut page =
                    messages_with_reactions(c, rows(c, sql, &[&conv, &bound, &fetch]).await?)
                        .await?;
                let has_more = page.len() > limit as usize;
                page.truncate(limit as usize);
                if descending {
                    page.reverse();
                }
                Ok(HistoryPage {
                    messages: page,
                    has_more,
                })
            }
            .boxed()
        })
    }

    fn conversations(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<ConvSummary>>> {
        let user = user.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT m.conv, coalesce(c.last_seq, 0), coalesce(r.seq, 0), \
                       CASE WHEN coalesce(c.last_seq, 0) > coalesce(r.seq, 0) THEN \
                         (SELECT count(*) FROM messages x WHERE x.conv = m.conv \
                            AND x.seq > coalesce(r.seq, 0) AND x.sender <> m.user_name) \
                       ELSE 0 END, \
                       CASE WHEN coalesce(c.last_seq, 0) > coalesce(r.seq, 0) THEN \
                         (SELECT count(*) FROM mentions x WHERE x.user_name = m.user_name \
                            AND x.conv = m.conv AND x.seq > coalesce(r.seq, 0)) \
                       ELSE 0 END \
                     FROM members m \
                     LEFT JOIN conversations c ON c.conv = m.conv \
                     LEFT JOIN read_cursors r ON r.conv = m.conv AND r.user_name = m.user_name \
                     WHERE m.user_name = $1 ORDER BY m.conv",
                    &[&user],
                )
                .await?;
                Ok(r.iter()
                    .map(|r| ConvSummary {
                        conv: r.get(0),
                        last_seq: r.get::<_, i64>(1) as u64,
                        read_seq: r.get::<_, i64>(2) as u64,
                        unread: r.get::<_, i64>(3) as u64,
                        mentions: r.get::<_, i64>(4) as u64,
                    })
                    .collect())
            }
            .boxed()
        })
    }

    fn memberships(&self, user: &str) -> BoxFuture<'static, StoreResult<Vec<Membership>>> {
        let user = user.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT m.conv, coalesce(c.last_seq, 0) FROM members m \
                     LEFT JOIN conversations c ON c.conv = m.conv \
                     WHERE m.user_name = $1 ORDER BY m.conv",
                    &[&user],
                )
                .await?;
                Ok(r.iter()
                    .map(|r| Membership {
                        conv: r.get(0),
                        last_seq: r.get::<_, i64>(1) as u64,
                    })
                    .collect())
            }
            .boxed()
        })
    }

    fn message(&self, conv: &str, seq: u64) -> BoxFuture<'static, StoreResult<Option<Message>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            async move {
                let seq = seq as i64;
                let r = rows(c, MESSAGE_AT, &[&conv, &seq]).await?;
                Ok(messages_with_reactions(c, r).await?.pop())
            }
            .boxed()
        })
    }

    fn member_role(
        &self,
        conv: &str,
        user: &str,
    ) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let (conv, user) = (conv.to_string(), user.to_string());
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT role FROM members WHERE conv = $1 AND user_name = $2",
                    &[&conv, &user],
                )
                .await?;
                Ok(r.first().map(|r| r.get(0)))
            }
            .boxed()
        })
    }

    fn recall(
        &self,
        conv: &str,
        seq: u64,
        by: &str,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<()>> {
        let op = Op::Recall {
            conv: conv.to_string(),
            seq,
            by: by.to_string(),
            origin,
        };
        self.write(op, |o| matches!(o, Outcome::Done).then_some(()))
    }

    fn edit(
        &self,
        conv: &str,
        seq: u64,
        content: serde_json::Value,
        mentions: Vec<String>,
        origin: u64,
    ) -> BoxFuture<'static, StoreResult<i64>> {
        let op = Op::Edit {
            conv: conv.to_string(),
            seq,
            content,
            mentions,
            origin,
        };
        self.write(op, |o| match o {
            Outcome::EditedAt(t) => Some(t),
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
        let op = Op::MarkRead {
            conv: conv.to_string(),
            user: user.to_string(),
            seq,
            origin,
        };
        self.write(op, |o| match o {
            Outcome::ReadUpTo(s) => Some(s),
            _ => None,
        })
    }

    fn create_user(&self, name: &str, password_hash: &str) -> BoxFuture<'static, StoreResult<()>> {
        let op = Op::CreateUser {
            name: name.to_string(),
            password_hash: password_hash.to_string(),
        };
        self.write(op, |o| matches!(o, Outcome::Done).then_some(()))
    }

    fn claim_guest_name(&self, name: &str) -> BoxFuture<'static, StoreResult<()>> {
        let op = Op::ClaimGuest {
            name: name.to_string(),
        };
        self.write(op, |o| matches!(o, Outcome::Done).then_some(()))
    }

    fn password_hash(&self, name: &str) -> BoxFuture<'static, StoreResult<Option<String>>> {
        let name = name.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT password_hash FROM users WHERE name = $1",
                    &[&name],
                )
                .await?;
                Ok(r.first().map(|r| r.get(0)))
            }
            .boxed()
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
            async move {
                let r = rows(
                    c,
                    "SELECT c.conv, (SELECT count(*) FROM members m WHERE m.conv = c.conv) \
                     FROM conversations c WHERE c.kind = 'room' AND c.conv > $1 \
                     ORDER BY c.conv LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
                Ok(r.iter()
                    .map(|r| RoomSummary {
                        conv: r.get(0),
                        members: r.get::<_, i64>(1) as u64,
                    })
                    .collect())
            }
            .boxed()
        })
    }

    fn put_file(&self, meta: FileMeta, quota: u64) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(Op::PutFile { meta, quota }, |o| match o {
            Outcome::Stored(b) => Some(b),
            _ => None,
        })
    }

    fn file_usage(&self, user: &str) -> BoxFuture<'static, StoreResult<u64>> {
        let user = user.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT coalesce(sum(size), 0)::int8 FROM files WHERE uploader = $1",
                    &[&user],
                )
                .await?;
                Ok(r.first().map_or(0, |r| r.get::<_, i64>(0) as u64))
            }
            .boxed()
        })
    }

    fn delete_unshared_files(
        &self,
        created_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, StoreResult<Vec<FileMeta>>> {
        let op = Op::DeleteUnsharedFiles {
            created_before,
            limit,
        };
        self.write(op, |o| match o {
            Outcome::Deleted(d) => Some(d),
            _ => None,
        })
    }

    fn file(&self, id: &str) -> BoxFuture<'static, StoreResult<Option<FileMeta>>> {
        let id = id.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT id, name, mime, size, uploader, created_at FROM files WHERE id = $1",
                    &[&id],
                )
                .await?;
                Ok(r.first().map(row_to_file))
            }
            .boxed()
        })
    }

    fn share_conversation(&self, a: &str, b: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (a, b) = (a.to_string(), b.to_string());
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT 1 FROM members x JOIN members y ON x.conv = y.conv \
                     WHERE x.user_name = $1 AND y.user_name = $2 LIMIT 1",
                    &[&a, &b],
                )
                .await?;
                Ok(!r.is_empty())
            }
            .boxed()
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
            async move {
                let up_to = up_to as i64;
                let r = rows(
                    c,
                    "SELECT seq, recalled, recalled_by, content, edited_at FROM messages \
                     WHERE conv = $1 AND modified_at > $2 AND seq <= $3 ORDER BY seq",
                    &[&conv, &since, &up_to],
                )
                .await?;
                let reacted: Vec<u64> = rows(
                    c,
                    "SELECT seq FROM messages WHERE conv = $1 AND reacted_at > $2 AND seq <= $3 \
                     AND NOT recalled ORDER BY seq",
                    &[&conv, &since, &up_to],
                )
                .await?
                .iter()
                .map(|r| r.get::<_, i64>(0) as u64)
                .collect();
                let mut now = match (reacted.first(), reacted.last()) {
                    (Some(&first), Some(&last)) => reactions_between(c, &conv, first, last).await?,
                    _ => BTreeMap::new(),
                };
                let reactions = reacted.into_iter().map(|seq| Committed::Reactions {
                    conv: conv.clone(),
                    seq,
                    reactions: now.remove(&seq).unwrap_or_default(),
                });
                Ok(r.iter()
                    .map(|r| {
                        let seq = r.get::<_, i64>(0) as u64;
                        if r.get::<_, bool>(1) {
                            Committed::Recalled {
                                conv: conv.clone(),
                                seq,
                                by: r.get::<_, Option<String>>(2).unwrap_or_default(),
                                origin: 0,
                            }
                        } else {
                            let content: String = r.get(3);
                            Committed::Edited {
                                conv: conv.clone(),
                                seq,
                                content: serde_json::from_str(&content)
                                    .unwrap_or(serde_json::Value::Null),
                                edited_at: r.get::<_, Option<i64>>(4).unwrap_or_default(),
                                origin: 0,
                            }
                        }
                    })
                    .chain(reactions)
                    .collect())
            }
            .boxed()
        })
    }

    fn room_members(&self, conv: &str) -> BoxFuture<'static, StoreResult<Vec<RoomMember>>> {
        let conv = conv.to_string();
        self.read(move |c| {
            async move {
                let r = rows(
                    c,
                    "SELECT user_name, role, joined_at FROM members WHERE conv = $1 ORDER BY user_name",
                    &[&conv],
                )
                .await?;
                Ok(r.iter()
                    .map(|r| RoomMember {
                        user: r.get(0),
                        role: r.get(1),
                        joined_at: r.get(2),
                    })
                    .collect())
            }
            .boxed()
        })
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
        let op = Op::React {
            conv: conv.to_string(),
            seq,
            user: user.to_string(),
            emoji: emoji.to_string(),
            on,
            origin,
        };
        self.write(op, |o| match o {
            Outcome::Reacted(changed) => Some(changed),
            _ => None,
        })
    }

    fn search(
        &self,
        user: &str,
        q: SearchQuery,
    ) -> BoxFuture<'static, StoreResult<Vec<SearchResult>>> {
        let user = user.to_string();
        self.read(move |c| {
            async move {
                // Every word, the last also as a prefix; the words are letters and digits
                // only (see `node::search_words`), quoted all the same.
                let n = q.words.len();
                let query = q
                    .words
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let quoted = format!("'{}'", w.replace('\'', "''"));
                        if i + 1 == n {
                            quoted + ":*"
                        } else {
                            quoted
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" & ");
                let (ts, before_conv, seq) = match &q.before {
                    Some(b) => (b.ts, b.conv.clone(), b.seq as i64),
                    None => (i64::MAX, String::new(), 0),
                };
                let limit = i64::from(q.limit);
                let r = rows(
                    c,
                    "SELECT m.conv, m.seq, m.msg_id, m.sender, m.ts, m.content::json #>> '{}', \
                       ts_headline('simple', m.content::json #>> '{}', q, \
                         'StartSel=[, StopSel=], HighlightAll=true') \
                     FROM messages m, to_tsquery('simple', $1) q \
                     WHERE m.search @@ q \
                       AND m.conv IN (SELECT conv FROM members WHERE user_name = $2) \
                       AND ($3::text IS NULL OR m.conv = $3) \
                       AND ($4 = 9223372036854775807 OR (m.ts, m.conv, m.seq) < ($4, $5, $6)) \
                     ORDER BY m.ts DESC, m.conv DESC, m.seq DESC LIMIT $7",
                    &[&query, &user, &q.conv, &ts, &before_conv, &seq, &limit],
                )
                .await?;
                Ok(r.iter()
                    .map(|r| SearchResult {
                        conv: r.get(0),
                        seq: r.get::<_, i64>(1) as u64,
                        msg_id: r.get(2),
                        from: r.get(3),
                        ts: r.get(4),
                        text: r.get(5),
                        highlight: r.get(6),
                    })
                    .collect())
            }
            .boxed()
        })
    }

    fn may_read_file(&self, id: &str, user: &str) -> BoxFuture<'static, StoreResult<bool>> {
        let (id, user) = (id.to_string(), user.to_string());
        self.read(move |c| {
            async move { Ok(!rows(c, MAY_READ_FILE, &[&id, &user]).await?.is_empty()) }.boxed()
        })
    }

    /// This node's batches only: with several nodes on one database, a change another
    /// node stamped before a sync here and committed after it is not covered (the
    /// cluster's catch-up covers it).
    fn watermark(&self) -> i64 {
        self.inner.stamping.load(Ordering::SeqCst)
    }

    fn ping(&self) -> BoxFuture<'static, StoreResult<()>> {
        let write = self.write(Op::Ping, |o| matches!(o, Outcome::Done).then_some(()));
        let read = self.read(|c| {
            async move {
                c.query_one("SELECT 1", &[]).await?;
                Ok(())
            }
            .boxed()
        });
        async move {
            read.await?;
            write.await
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'static, StoreResult<()>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.writes.send(Queued::Close(tx)).is_ok();
        async move {
            if sent {
                let _ = rx.await;
            }
            Ok(())
        }
        .boxed()
    }
}

const HISTORY_BEFORE: &str = "SELECT m.conv, m.seq, m.msg_id, m.sender, m.client_msg_id, m.content_type, m.content, m.ts, \
     m.recalled, m.edited_at, m.reply_to, r.sender, r.content_type, r.content, r.recalled, m.mentions, m.reacted_at \
     FROM messages m LEFT JOIN LATERAL (SELECT sender, content_type, content, recalled FROM messages r \
     WHERE m.reply_to IS NOT NULL AND r.conv = m.conv AND r.seq = m.reply_to) r ON true \
     WHERE m.conv = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT $3";
const HISTORY_AFTER: &str = "SELECT m.conv, m.seq, m.msg_id, m.sender, m.client_msg_id, m.content_type, m.content, m.ts, \
     m.recalled, m.edited_at, m.reply_to, r.sender, r.content_type, r.content, r.recalled, m.mentions, m.reacted_at \
     FROM messages m LEFT JOIN LATERAL (SELECT sender, content_type, content, recalled FROM messages r \
     WHERE m.reply_to IS NOT NULL AND r.conv = m.conv AND r.seq = m.reply_to) r ON true \
     WHERE m.conv = $1 AND m.seq > $2 ORDER BY m.seq ASC LIMIT $3";
const MESSAGE_AT: &str = "SELECT m.conv, m.seq, m.msg_id, m.sender, m.client_msg_id, m.content_type, m.content, m.ts, \
     m.recalled, m.edited_at, m.reply_to, r.sender, r.content_type, r.content, r.recalled, m.mentions, m.reacted_at \
     FROM messages m LEFT JOIN LATERAL (SELECT sender, content_type, content, recalled FROM messages r \
     WHERE m.reply_to IS NOT NULL AND r.conv = m.conv AND r.seq = m.reply_to) r ON true \
     WHERE m.conv = $1 AND m.seq = $2";
