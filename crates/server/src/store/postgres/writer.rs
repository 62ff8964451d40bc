//! The writer: one task and one connection per node applying every write, in batches.
//!
//! Writes are queued with their reply sender kept apart ([`Queued`]); the task takes
//! everything queued (up to [`MAX_BATCH`]) and applies it in one transaction: group
//! commit. Runs of appends are applied together: their conversations' rows are locked
//! (in id order, so nodes never deadlock on them), membership and retried
//! `client_msg_id`s are looked up in one query each, the next seqs are taken from the
//! locked rows, and the messages go in with one insert. So a seq is taken only for a
//! message that is stored, and two nodes appending to one conversation take turns on its
//! row: seqs stay gapless. If another node stored the same `(sender, client_msg_id)`
//! meanwhile, the insert fails, the batch is rolled back and applied again (then it
//! finds the stored message). After the commit, the changes go to the commit hook in
//! commit order, then the callers are answered.
//!
//! Lookups of many keys at once are written as `unnest(...) CROSS JOIN LATERAL (... WHERE
//! key = k LIMIT 1)`: one index probe per key, whatever plan is cached (the `LIMIT` keeps
//! the planner from flattening the subquery into a join). An `IN (SELECT * FROM
//! unnest(...))` lets a generic plan made while a table was small hash-join a full scan
//! of it, which then runs for every batch as the table grows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubbub_protocol::{excerpt_of, ContentType, Message, ReplyRef};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use super::{row_to_file, row_to_message, Connector, MESSAGE_COLUMNS, REPLIED};
use crate::auth::name_skeleton;
use crate::metrics::Metrics;
use crate::store::{
    attachment_file_id, now_ms, Appended, CommitHook, Committed, FileMeta, JoinOutcome, NewMessage,
    StoreError, StoreResult, MAX_EMOJI_PER_MESSAGE,
};

/// Most operations in one transaction.
pub(super) const MAX_BATCH: usize = 2048;
/// How often a batch that lost a race with another node is applied again.
const RETRIES: usize = 5;
/// Longest a batch may take before it is abandoned (rolled back, connection dropped): a
/// stalled database fails the batch's callers with `unavailable` instead of holding them.
pub(super) const BATCH_DEADLINE: Duration = Duration::from_secs(5);

/// A write operation.
pub(super) enum Op {
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
    ClaimGuest {
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
    /// A round trip through the writer and the database.
    Ping,
}

/// What a write produced.
#[allow(clippy::large_enum_variant)] // messages travel by value: boxing would allocate once more per message
pub(super) enum Outcome {
    Appended(Appended),
    Joined(JoinOutcome),
    Left(Option<u64>),
    /// Whether a reaction changed.
    Reacted(bool),
    Done,
    EditedAt(i64),
    ReadUpTo(u64),
    Stored(bool),
    Deleted(Vec<FileMeta>),
}

pub(super) type Reply = oneshot::Sender<StoreResult<Outcome>>;

/// What the writer's queue carries.
#[allow(clippy::large_enum_variant)] // messages travel by value: boxing would allocate once more per message
pub(super) enum Queued {
    Write(Op, Reply),
    /// Commit what is queued before it, then stop.
    Close(oneshot::Sender<()>),
}

pub(super) struct Writer {
    pub(super) connector: Connector,
    pub(super) conn: Option<Conn>,
    pub(super) hook: CommitHook,
    pub(super) metrics: Metrics,
    /// While a batch is open: a time at or before its stamps; `i64::MAX` between batches.
    pub(super) stamping: Arc<AtomicI64>,
}

/// The writer's connection and its prepared statements.
pub(super) struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// DM conversations whose rows are known to exist (rows are never deleted).
    dms: HashSet<String>,
}

impl Conn {
    pub(super) fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: HashMap::new(),
            dms: HashSet::new(),
        }
    }
}

/// One open batch: the connection its transaction is open on, what it produced, what it
/// will announce.
struct Batch<'a> {
    tx: &'a Client,
    statements: &'a mut HashMap<&'static str, Statement>,
    dms: &'a HashSet<String>,
    /// DM rows this batch created (known once it commits).
    new_dms: Vec<String>,
    changes: Vec<Committed>,
    now: i64,
}

type PgResult<T> = Result<T, tokio_postgres::Error>;

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        let mut replies = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            let mut close = None;
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Queued::Write(op, reply) => {
                        ops.push(op);
                        replies.push(reply);
                    }
                    Queued::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
                if ops.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !ops.is_empty() {
                let results = self.commit(&ops).await;
                for (reply, result) in replies.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
                ops.clear();
            }
            if let Some(done) = close {
                rx.close();
                while let Ok(item) = rx.try_recv() {
                    if let Queued::Write(_, reply) = item {
                        let _ =
                            reply.send(Err(StoreError::Unavailable("the store is closed".into())));
                    }
                }
                let _ = done.send(());
                break;
            }
        }
        tracing::debug!("postgres store writer stopped");
    }

    /// Applies `ops` in one transaction (again, if it lost a race with another node) and
    /// announces what it changed; one result per operation.
    async fn commit(&mut self, ops: &[Op]) -> Vec<StoreResult<Outcome>> {
        let started = std::time::Instant::now();
        let mut last_error = String::new();
        for attempt in 0..RETRIES {
            let conn = match self.conn.as_mut() {
                Some(c) => c,
                None => match self.connector.connect().await {
                    Ok(client) => self.conn.insert(Conn::new(client)),
                    Err(e) => {
                        last_error = e.to_string();
                        break;
                    }
                },
            };
            // Published before the stamp is taken, so no stamp of this batch is earlier.
            self.stamping.store(now_ms(), Ordering::SeqCst);
            let applied =
                match tokio::time::timeout(BATCH_DEADLINE, apply(conn, ops, now_ms())).await {
                    Ok(applied) => applied,
                    Err(_) => {
                        // Whatever it was doing, the connection goes: its transaction is
                        // rolled back by the server when it closes.
                        self.conn = None;
                        last_error = "the batch took too long".into();
                        break;
                    }
                };
            match applied {
                Ok((results, changes, new_dms)) => {
                    conn.dms.extend(new_dms);
                    let elapsed = started.elapsed();
                    self.metrics.store_batch_size.observe(ops.len() as f64);
                    self.metrics
                        .store_commit_seconds
                        .observe(elapsed.as_secs_f64());
                    for c in changes {
                        if matches!(c, Committed::Message { .. }) {
                            self.metrics.messages_stored.inc();
                        }
                        (self.hook)(c);
                    }
                    self.stamping.store(i64::MAX, Ordering::SeqCst);
                    return results;
                }
                Err(e) => {
                    let retry = matches!(
                        e.code(),
                        Some(c) if *c == SqlState::UNIQUE_VIOLATION
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE
                            || *c == SqlState::T_R_DEADLOCK_DETECTED
                    );
                    last_error = e.to_string();
                    if conn.client.is_closed() {
                        self.conn = None;
                    }
                    if !retry {
                        break;
                    }
                    tracing::debug!(attempt, error = %e, "store batch lost a race; applying it again");
                    tokio::time::sleep(Duration::from_millis(2 << attempt)).await;
                }
            }
        }
        self.stamping.store(i64::MAX, Ordering::SeqCst);
        tracing::error!(error = %last_error, "store batch failed; rolled back");
        ops.iter()
            .map(|_| Err(StoreError::Unavailable(last_error.clone())))
            .collect()
    }
}

type Applied = (Vec<StoreResult<Outcome>>, Vec<Committed>, Vec<String>);

/// Applies `ops` in one transaction. `BEGIN`, `COMMIT` and the queries of a run of
/// appends are pipelined (sent without waiting for the answers before them): on a busy
/// machine each round trip to the database costs a scheduling delay, so a batch takes
/// three round trips instead of one per statement.
async fn apply(conn: &mut Conn, ops: &[Op], now: i64) -> PgResult<Applied> {
    let Conn {
        client,
        statements,
        dms,
    } = conn;
    let client: &Client = client;
    let mut b = Batch {
        tx: client,
        statements,
        dms,
        new_dms: Vec::new(),
        changes: Vec::new(),
        now,
    };
    // Polled first, so `BEGIN` goes out before the batch's first statement.
    let (begun, results) = tokio::join!(client.batch_execute("BEGIN"), b.apply_all(ops));
    let outcome = match begun.and(results) {
        Ok(results) => client.batch_execute("COMMIT").await.map(|()| results),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(results) => Ok((results, b.changes, b.new_dms)),
        Err(e) => {
            // Whatever failed, no transaction stays open on the connection.
            if !client.is_closed() {
                let _ = client.batch_execute("ROLLBACK").await;
            }
            Err(e)
        }
    }
}

impl Batch<'_> {
    async fn apply_all(&mut self, ops: &[Op]) -> PgResult<Vec<StoreResult<Outcome>>> {
        let mut results = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            if let Op::Append(_) = &ops[i] {
                let run: Vec<&NewMessage> = ops[i..]
                    .iter()
                    .map_while(|op| match op {
                        Op::Append(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                i += run.len();
                self.append(&run, &mut results).await?;
                continue;
            }
            if let Op::ClaimGuest { .. } = &ops[i] {
                let run: Vec<&str> = ops[i..]
                    .iter()
                    .map_while(|op| match op {
                        Op::ClaimGuest { name } => Some(name.as_str()),
                        _ => None,
                    })
                    .collect();
                i += run.len();
                self.claim_guests(&run, &mut results).await?;
                continue;
            }
            let result = self.one(&ops[i]).await?;
            results.push(result);
            i += 1;
        }
        Ok(results)
    }

    /// Records a run of guest names, each unless an account has its skeleton: the
    /// skeletons are locked (in lock order, as account creation locks its one), the
    /// accounts looked up and the names inserted in one round trip.
    async fn claim_guests(
        &mut self,
        names: &[&str],
        results: &mut Vec<StoreResult<Outcome>>,
    ) -> PgResult<()> {
        let skeletons: Vec<String> = names.iter().map(|n| name_skeleton(n)).collect();
        let st_lock = self
            .st("SELECT pg_advisory_xact_lock(h) FROM \
                 (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS l")
            .await?;
        let st_accounts = self
            .st("SELECT skeleton FROM users WHERE skeleton = ANY($1)")
            .await?;
        let st_insert = self
            .st("INSERT INTO guest_names (name, skeleton, first_seen) \
                 SELECT n, s, $3 FROM unnest($1::text[], $2::text[]) AS u(n, s) \
                 WHERE NOT EXISTS (SELECT 1 FROM users WHERE users.skeleton = u.s) \
                 ON CONFLICT (name) DO NOTHING")
            .await?;
        let tx = self.tx;
        let now = self.now;
        let (_, accounts, _) = tokio::try_join!(
            async { tx.query(&st_lock, &[&skeletons]).await },
            async { tx.query(&st_accounts, &[&skeletons]).await },
            async { tx.execute(&st_insert, &[&names, &skeletons, &now]).await }
        )?;
        let taken: HashSet<String> = accounts.iter().map(|r| r.get(0)).collect();
        for (name, skeleton) in names.iter().zip(&skeletons) {
            results.push(if taken.contains(skeleton) {
                Err(StoreError::Conflict(format!(
                    "the name {name:?} belongs to an account (or is too similar to one): \
                     log in, or choose another guest name"
                )))
            } else {
                Ok(Outcome::Done)
            });
        }
        Ok(())
    }

    async fn st(&mut self, sql: &'static str) -> PgResult<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Applies a run of appends (see the module docs).
    async fn append(
        &mut self,
        run: &[&NewMessage],
        results: &mut Vec<StoreResult<Outcome>>,
    ) -> PgResult<()> {
        let now = self.now;
        // Retried sends: found before any seq is taken. (Another node storing the same
        // id after this lookup makes the insert fail, and the batch is applied again.)
        let (senders, ids): (Vec<&str>, Vec<&str>) = run
            .iter()
            .map(|m| (m.from.as_str(), m.client_msg_id.as_str()))
            .unzip();
        // The conversations' rows are locked in id order.
        let convs: Vec<&str> = run
            .iter()
            .map(|m| m.conv.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // Room membership is read under those locks (a leave takes the same lock).
        let (rconvs, rusers): (Vec<&str>, Vec<&str>) = run
            .iter()
            .filter(|m| m.dm_members.is_none())
            .map(|m| (m.conv.as_str(), m.from.as_str()))
            .unzip();
        let st_stored = self.st(select_stored_sql()).await?;
        let st_lock = self
            .st("SELECT conv, last_seq FROM conversations WHERE conv = ANY($1) ORDER BY conv FOR UPDATE")
            .await?;
        let st_members = self
            .st(
                "SELECT m.conv, m.user_name FROM unnest($1::text[], $2::text[]) AS k(c, u) \
                 CROSS JOIN LATERAL (SELECT conv, user_name FROM members \
                                     WHERE conv = k.c AND user_name = k.u LIMIT 1) AS m",
            )
            .await?;
        let tx = self.tx;
        let lock = async { tx.query(&st_lock, &[&convs]).await };
        let members = async {
            if rconvs.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&st_members, &[&rconvs, &rusers]).await
        };
        // The three reads go out together, unless a DM's rows must be created between
        // the lookup of retried sends and the locks.
        let creates_dm = run
            .iter()
            .any(|m| m.dm_members.is_some() && !self.dms.contains(&m.conv));
        let (stored, locked, member_rows) = if creates_dm {
            let stored = stored_by_id(tx.query(&st_stored, &[&senders, &ids]).await?);
            self.create_dms(run, &stored).await?;
            let (locked, member_rows) = tokio::try_join!(lock, members)?;
            (stored, locked, member_rows)
        } else {
            let (stored, locked, member_rows) = tokio::try_join!(
                async { tx.query(&st_stored, &[&senders, &ids]).await },
                lock,
                members
            )?;
            (stored_by_id(stored), locked, member_rows)
        };
        let mut stored = stored;
        let mut last: HashMap<String, i64> = locked
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect();
        let members: HashSet<(String, String)> =
            member_rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        // The messages replied to, stored before this run (those of this run are found
        // as they are taken).
        let mut replied: HashMap<(String, u64), ReplyRef> = HashMap::new();
        let (qconvs, qseqs): (Vec<&str>, Vec<i64>) = run
            .iter()
            .filter_map(|m| Some((m.conv.as_str(), m.reply_to? as i64)))
            .unzip();
        if !qconvs.is_empty() {
            let st = self
                .st(
                    "SELECT k.c, k.s, m.sender, m.content_type, m.content, m.recalled \
                     FROM unnest($1::text[], $2::int8[]) AS k(c, s) \
                     JOIN messages m ON m.conv = k.c AND m.seq = k.s",
                )
                .await?;
            for r in self.tx.query(&st, &[&qconvs, &qseqs]).await? {
                let seq = r.get::<_, i64>(1) as u64;
                let (kind, content, recalled): (String, String, bool) =
                    (r.get(3), r.get(4), r.get(5));
                replied.insert(
                    (r.get(0), seq),
                    crate::store::reply_ref(seq, r.get(2), &kind, &content, recalled),
                );
            }
        }
        // Seqs for the new messages, in request order.
        let mut rows = NewRows::default();
        let first_result = results.len();
        let mut fresh: Vec<(usize, Message, u64)> = Vec::new();
        for m in run {
            let key = (m.from.clone(), m.client_msg_id.clone());
            if let Some(found) = stored.get(&key) {
                results.push(retried(found.clone(), m));
                continue;
            }
            if m.dm_members.is_none() && !members.contains(&(m.conv.clone(), m.from.clone())) {
                results.push(Err(StoreError::NotMember(format!(
                    "you are not a member of {}",
                    m.conv
                ))));
                continue;
            }
            let reply_to = match m.reply_to {
                None => None,
                Some(to) => match replied.get(&(m.conv.clone(), to)) {
                    Some(r) => Some(r.clone()),
                    None => {
                        results.push(Err(StoreError::Invalid(format!(
                            "reply_to: no message {to} in {}",
                            m.conv
                        ))));
                        continue;
                    }
                },
            };
            let Some(seq) = last.get_mut(&m.conv) else {
                results.push(Err(StoreError::NotFound(format!(
                    "no conversation {}",
                    m.conv
                ))));
                continue;
            };
            *seq += 1;
            let message = Message {
                conv: m.conv.clone(),
                seq: *seq as u64,
                msg_id: ulid::Ulid::new().to_string(),
                from: m.from.clone(),
                client_msg_id: m.client_msg_id.clone(),
                content_type: m.content_type,
                content: Some(m.content.clone()),
                ts: now,
                recalled: false,
                edited_at: None,
                reply_to: reply_to.map(Box::new),
                reactions: Default::default(),
                mentions: m.mentions.clone(),
            };
            rows.push(&message, &m.content);
            // A later message of this run may reply to this one.
            replied.insert(
                (message.conv.clone(), message.seq),
                ReplyRef {
                    seq: message.seq,
                    from: message.from.clone(),
                    excerpt: m
                        .content
                        .as_str()
                        .filter(|_| m.content_type == ContentType::Text)
                        .map(excerpt_of),
                },
            );
            // The same id twice in one run: the second is a retry of the first.
            stored.insert(key, message.clone());
            fresh.push((results.len(), message.clone(), m.origin));
            results.push(Ok(Outcome::Appended(Appended {
                message,
                duplicate: false,
            })));
        }
        debug_assert!(results.len() - first_result == run.len());
        if rows.is_empty() {
            return Ok(());
        }
        let st = self
            .st(
                "INSERT INTO messages (conv, seq, msg_id, sender, client_msg_id, content_type, content, ts, reply_to, mentions) \
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[], $9::int8[], $10::text[])",
            )
            .await?;
        let st_update = self
            .st("UPDATE conversations c SET last_seq = u.s \
                 FROM unnest($1::text[], $2::int8[]) AS u(conv, s) \
                 WHERE c.conv = u.conv AND c.conv = ANY($1)")
            .await?;
        let ts = vec![now; rows.conv.len()];
        let (uconvs, useqs): (Vec<&str>, Vec<i64>) = convs
            .iter()
            .filter_map(|c| Some((*c, *last.get(*c)?)))
            .unzip();
        tokio::try_join!(
            async {
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
                    &rows.conv,
                    &rows.seq,
                    &rows.msg_id,
                    &rows.sender,
                    &rows.client_msg_id,
                    &rows.content_type,
                    &rows.content,
                    &ts,
                    &rows.reply_to,
                    &rows.mentions,
                ];
                tx.execute(&st, &params).await
            },
            async { tx.execute(&st_update, &[&uconvs, &useqs]).await }
        )?;
        if !rows.mentioned.is_empty() {
            let st = self
                .st(
                    "INSERT INTO mentions (user_name, conv, seq) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) ON CONFLICT DO NOTHING",
                )
                .await?;
            let (users, (mconvs, mseqs)): (Vec<&str>, (Vec<&str>, Vec<i64>)) = rows
                .mentioned
                .iter()
                .map(|(u, c, s)| (u.as_str(), (c.as_str(), *s)))
                .unzip();
            self.tx.execute(&st, &[&users, &mconvs, &mseqs]).await?;
        }
        for (_, message, origin) in fresh {
            if let Some(content) = &message.content {
                if attachment_file_id(content).is_some() {
                    self.share_file(&message.conv, message.seq, &message.from, content)
                        .await?;
                }
            }
            self.changes.push(Committed::Message { message, origin });
        }
        Ok(())
    }

    /// Creates the conversation and member rows of the run's new DMs (not for a refused
    /// retry: a DM exists from its first stored message on).
    async fn create_dms(
        &mut self,
        run: &[&NewMessage],
        stored: &HashMap<(String, String), Message>,
    ) -> PgResult<()> {
        let now = self.now;
        let new_dms: BTreeMap<&str, &(String, String)> = run
            .iter()
            .filter(|m| !stored.contains_key(&(m.from.clone(), m.client_msg_id.clone())))
            .filter_map(|m| Some((m.conv.as_str(), m.dm_members.as_ref()?)))
            .filter(|(conv, _)| !self.dms.contains(*conv))
            .collect();
        if !new_dms.is_empty() {
            let convs: Vec<&str> = new_dms.keys().copied().collect();
            let creators: Vec<&str> = convs
                .iter()
                .map(|c| {
                    run.iter()
                        .find(|m| m.conv == *c)
                        .map_or("", |m| m.from.as_str())
                })
                .collect();
            let st = self
                .st(
                    "INSERT INTO conversations (conv, kind, created_by, created_at) \
                     SELECT c, 'dm', b, $3 FROM unnest($1::text[], $2::text[]) AS u(c, b) \
                     ON CONFLICT (conv) DO NOTHING",
                )
                .await?;
            self.tx.execute(&st, &[&convs, &creators, &now]).await?;
            let mut mconvs = Vec::new();
            let mut musers = Vec::new();
            for (conv, (a, b)) in &new_dms {
                mconvs.extend([*conv, *conv]);
                musers.extend([a.as_str(), b.as_str()]);
            }
            let st = self
                .st("INSERT INTO members (conv, user_name, role, joined_at) \
                     SELECT c, u, 'member', $3 FROM unnest($1::text[], $2::text[]) AS x(c, u) \
                     ON CONFLICT (conv, user_name) DO NOTHING")
                .await?;
            self.tx.execute(&st, &[&mconvs, &musers, &now]).await?;
            self.new_dms.extend(convs.iter().map(|c| c.to_string()));
        }
        Ok(())
    }

    /// Applies one operation other than an append.
    async fn one(&mut self, op: &Op) -> PgResult<StoreResult<Outcome>> {
        let now = self.now;
        Ok(match op {
            Op::Append(_) => unreachable!("appends are applied in runs"),
            Op::Join { conv, user } => {
                let st = self
                    .st(
                        "INSERT INTO conversations (conv, kind, created_by, created_at) \
                         VALUES ($1, 'room', $2, $3) ON CONFLICT (conv) DO NOTHING",
                    )
                    .await?;
                let created = self.tx.execute(&st, &[conv, user, &now]).await? == 1;
                let last_seq = self.lock_conversation(conv).await?.unwrap_or(0);
                let role = if created { "admin" } else { "member" };
                let st = self
                    .st("INSERT INTO members (conv, user_name, role, joined_at) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (conv, user_name) DO NOTHING")
                    .await?;
                let added = self.tx.execute(&st, &[conv, user, &role, &now]).await? == 1;
                if added {
                    self.changes.push(Committed::Member {
                        conv: conv.clone(),
                        user: user.clone(),
                        joined: true,
                        at: last_seq as u64,
                        by: None,
                    });
                }
                Ok(Outcome::Joined(JoinOutcome {
                    created,
                    added,
                    last_seq: last_seq as u64,
                }))
            }
            Op::Leave { conv, user, by } => {
                let last_seq = self.lock_conversation(conv).await?.unwrap_or(0);
                let st = self
                    .st("DELETE FROM members WHERE conv = $1 AND user_name = $2")
                    .await?;
                let left = self.tx.execute(&st, &[conv, user]).await? == 1;
                if left {
                    self.changes.push(Committed::Member {
                        conv: conv.clone(),
                        user: user.clone(),
                        joined: false,
                        at: last_seq as u64,
                        by: by.clone(),
                    });
                }
                Ok(Outcome::Left(left.then_some(last_seq as u64)))
            }
            Op::React {
                conv,
                seq,
                user,
                emoji,
                on,
                origin,
            } => return self.react(conv, *seq, user, emoji, *on, *origin).await,
            Op::Recall {
                conv,
                seq,
                by,
                origin,
            } => {
                let st = self
                    .st("SELECT recalled FROM messages WHERE conv = $1 AND seq = $2 FOR UPDATE")
                    .await?;
                let seq_i = *seq as i64;
                let found = self.tx.query_opt(&st, &[conv, &seq_i]).await?;
                match found.map(|r| r.get::<_, bool>(0)) {
                    None => Err(StoreError::NotFound(format!("no message {seq} in {conv}"))),
                    Some(true) => Ok(Outcome::Done),
                    Some(false) => {
                        let st = self
                            .st(
                                "UPDATE messages SET recalled = true, content = 'null', recalled_by = $3, \
                                 modified_at = $4 WHERE conv = $1 AND seq = $2",
                            )
                            .await?;
                        self.tx.execute(&st, &[conv, &seq_i, by, &now]).await?;
                        self.unshare_message(conv, seq_i).await?;
                        self.set_mentions(conv, seq_i, &[]).await?;
                        let st = self
                            .st("DELETE FROM reactions WHERE conv = $1 AND seq = $2")
                            .await?;
                        self.tx.execute(&st, &[conv, &seq_i]).await?;
                        self.changes.push(Committed::Recalled {
                            conv: conv.clone(),
                            seq: *seq,
                            by: by.clone(),
                            origin: *origin,
                        });
                        Ok(Outcome::Done)
                    }
                }
            }
            Op::Edit {
                conv,
                seq,
                content,
                mentions,
                origin,
            } => {
                let st = self
                    .st("SELECT recalled, sender FROM messages WHERE conv = $1 AND seq = $2 FOR UPDATE")
                    .await?;
                let seq_i = *seq as i64;
                let found = self.tx.query_opt(&st, &[conv, &seq_i]).await?;
                match found.map(|r| (r.get::<_, bool>(0), r.get::<_, String>(1))) {
                    None => Err(StoreError::NotFound(format!("no message {seq} in {conv}"))),
                    Some((true, _)) => Err(StoreError::Conflict(format!(
                        "message {seq} in {conv} was recalled"
                    ))),
                    Some((false, sender)) => {
                        let text = serde_json::to_string(content).unwrap_or_else(|_| "null".into());
                        let st = self
                            .st(
                                "UPDATE messages SET content = $3, edited_at = $4, modified_at = $4 \
                                 WHERE conv = $1 AND seq = $2",
                            )
                            .await?;
                        self.tx.execute(&st, &[conv, &seq_i, &text, &now]).await?;
                        self.set_mentions(conv, seq_i, mentions).await?;
                        self.unshare_message(conv, seq_i).await?;
                        self.share_file(conv, *seq, &sender, content).await?;
                        self.changes.push(Committed::Edited {
                            conv: conv.clone(),
                            seq: *seq,
                            content: content.clone(),
                            edited_at: now,
                            origin: *origin,
                        });
                        Ok(Outcome::EditedAt(now))
                    }
                }
            }
            Op::MarkRead {
                conv,
                user,
                seq,
                origin,
            } => {
                let st = self
                    .st("SELECT last_seq FROM conversations WHERE conv = $1")
                    .await?;
                let last: i64 = self
                    .tx
                    .query_opt(&st, &[conv])
                    .await?
                    .map_or(0, |r| r.get(0));
                let want = (*seq).min(last as u64) as i64;
                let st = self
                    .st(
                        "INSERT INTO read_cursors (conv, user_name, seq) VALUES ($1, $2, $3) \
                         ON CONFLICT (conv, user_name) DO UPDATE SET seq = excluded.seq \
                         WHERE read_cursors.seq < excluded.seq",
                    )
                    .await?;
                let moved = want > 0 && self.tx.execute(&st, &[conv, user, &want]).await? == 1;
                if moved {
                    self.changes.push(Committed::Receipt {
                        conv: conv.clone(),
                        user: user.clone(),
                        seq: want as u64,
                        origin: *origin,
                    });
                    Ok(Outcome::ReadUpTo(want as u64))
                } else {
                    let st = self
                        .st("SELECT seq FROM read_cursors WHERE conv = $1 AND user_name = $2")
                        .await?;
                    let current: i64 = self
                        .tx
                        .query_opt(&st, &[conv, user])
                        .await?
                        .map_or(0, |r| r.get(0));
                    Ok(Outcome::ReadUpTo(current as u64))
                }
            }
            Op::CreateUser {
                name,
                password_hash,
            } => {
                let skeleton = name_skeleton(name);
                self.lock_name(&skeleton).await?;
                if let Some(taken) = self.account_with_skeleton(&skeleton).await? {
                    Err(StoreError::Conflict(if &taken == name {
                        format!("the user name {name:?} is taken")
                    } else {
                        format!(
                            "the user name {name:?} is too similar to an existing account's name"
                        )
                    }))
                } else if self.guest_with_skeleton(&skeleton).await? {
                    Err(StoreError::Conflict(format!(
                        "the user name {name:?} (or one too similar to it) was used by a guest"
                    )))
                } else {
                    let st = self
                        .st(
                            "INSERT INTO users (name, password_hash, created_at, skeleton) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                        )
                        .await?;
                    let n = self
                        .tx
                        .execute(&st, &[name, password_hash, &now, &skeleton])
                        .await?;
                    if n == 1 {
                        Ok(Outcome::Done)
                    } else {
                        Err(StoreError::Conflict(format!(
                            "the user name {name:?} is taken"
                        )))
                    }
                }
            }
            Op::ClaimGuest { name } => {
                let mut one = Vec::with_capacity(1);
                self.claim_guests(&[name], &mut one).await?;
                one.pop().unwrap_or(Ok(Outcome::Done))
            }
            Op::PutFile { meta, quota } => {
                // One uploader's quota is checked and spent by one transaction at a time.
                self.lock_name(&format!("files:{}", meta.uploader)).await?;
                let st = self
                    .st("SELECT coalesce(sum(size), 0)::int8 FROM files WHERE uploader = $1")
                    .await?;
                let used: i64 = self.tx.query_one(&st, &[&meta.uploader]).await?.get(0);
                if (used as u64).saturating_add(meta.size) > *quota {
                    Ok(Outcome::Stored(false))
                } else {
                    let st = self
                        .st(
                            "INSERT INTO files (id, name, mime, size, uploader, created_at) \
                             VALUES ($1, $2, $3, $4, $5, $6)",
                        )
                        .await?;
                    let size = meta.size as i64;
                    self.tx
                        .execute(
                            &st,
                            &[
                                &meta.id,
                                &meta.name,
                                &meta.mime,
                                &size,
                                &meta.uploader,
                                &meta.created_at,
                            ],
                        )
                        .await?;
                    Ok(Outcome::Stored(true))
                }
            }
            Op::DeleteUnsharedFiles {
                created_before,
                limit,
            } => {
                let st = self
                    .st("DELETE FROM files WHERE id IN (\
                           SELECT id FROM files f WHERE created_at < $1 \
                             AND NOT EXISTS (SELECT 1 FROM message_files s WHERE s.file_id = f.id) \
                           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                         RETURNING id, name, mime, size, uploader, created_at")
                    .await?;
                let limit = i64::from(*limit);
                let mut gone: Vec<FileMeta> = self
                    .tx
                    .query(&st, &[created_before, &limit])
                    .await?
                    .iter()
                    .map(row_to_file)
                    .collect();
                gone.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
                Ok(Outcome::Deleted(gone))
            }
            Op::Ping => {
                self.tx.query_one("SELECT 1", &[]).await?;
                Ok(Outcome::Done)
            }
        })
    }

    /// Locks a conversation's row until the commit; its `last_seq` (none if no row).
    async fn lock_conversation(&mut self, conv: &str) -> PgResult<Option<i64>> {
        let st = self
            .st("SELECT last_seq FROM conversations WHERE conv = $1 FOR UPDATE")
            .await?;
        Ok(self.tx.query_opt(&st, &[&conv]).await?.map(|r| r.get(0)))
    }

    /// Serializes the transactions about one name (or key) until the commit.
    async fn lock_name(&mut self, key: &str) -> PgResult<()> {
        let st = self
            .st("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .await?;
        self.tx.execute(&st, &[&key]).await?;
        Ok(())
    }

    async fn account_with_skeleton(&mut self, skeleton: &str) -> PgResult<Option<String>> {
        let st = self
            .st("SELECT name FROM users WHERE skeleton = $1 LIMIT 1")
            .await?;
        Ok(self
            .tx
            .query_opt(&st, &[&skeleton])
            .await?
            .map(|r| r.get(0)))
    }

    async fn guest_with_skeleton(&mut self, skeleton: &str) -> PgResult<bool> {
        let st = self
            .st("SELECT 1 FROM guest_names WHERE skeleton = $1 LIMIT 1")
            .await?;
        Ok(self.tx.query_opt(&st, &[&skeleton]).await?.is_some())
    }

    /// Records that message `seq` of `conv` shares the file its attachment points to,
    /// when `sender` may read that file now.
    async fn share_file(
        &mut self,
        conv: &str,
        seq: u64,
        sender: &str,
        content: &serde_json::Value,
    ) -> PgResult<()> {
        let Some(id) = attachment_file_id(content) else {
            return Ok(());
        };
        let st = self.st(super::MAY_READ_FILE).await?;
        if self.tx.query_opt(&st, &[&id, &sender]).await?.is_none() {
            tracing::debug!(file = %id, user = %sender, %conv, "not shared: the sender may not read the file");
            return Ok(());
        }
        let st = self
            .st(
                "INSERT INTO message_files (file_id, conv, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        self.tx.execute(&st, &[&id, &conv, &(seq as i64)]).await?;
        Ok(())
    }

    /// Replaces the mentions of message `seq` of `conv`.
    async fn set_mentions(&mut self, conv: &str, seq: i64, mentions: &[String]) -> PgResult<()> {
        let st = self
            .st("DELETE FROM mentions WHERE conv = $1 AND seq = $2")
            .await?;
        self.tx.execute(&st, &[&conv, &seq]).await?;
        if !mentions.is_empty() {
            let st = self
                .st(
                    "INSERT INTO mentions (user_name, conv, seq) SELECT u, $2, $3 \
                     FROM unnest($1::text[]) AS u ON CONFLICT DO NOTHING",
                )
                .await?;
            self.tx.execute(&st, &[&mentions, &conv, &seq]).await?;
        }
        let list =
            (!mentions.is_empty()).then(|| serde_json::to_string(mentions).unwrap_or_default());
        let st = self
            .st("UPDATE messages SET mentions = $3 WHERE conv = $1 AND seq = $2")
            .await?;
        self.tx.execute(&st, &[&conv, &seq, &list]).await?;
        Ok(())
    }

    /// Sets or clears a reaction (see `Store::react`).
    #[allow(clippy::too_many_arguments)]
    async fn react(
        &mut self,
        conv: &str,
        seq: u64,
        user: &str,
        emoji: &str,
        on: bool,
        origin: u64,
    ) -> PgResult<StoreResult<Outcome>> {
        let now = self.now;
        let seq_i = seq as i64;
        let st = self
            .st("SELECT recalled FROM messages WHERE conv = $1 AND seq = $2 FOR UPDATE")
            .await?;
        match self
            .tx
            .query_opt(&st, &[&conv, &seq_i])
            .await?
            .map(|r| r.get::<_, bool>(0))
        {
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
            let st = self
                .st(
                    "SELECT coalesce(bool_or(emoji = $3 AND user_name = $4), false), \
                       coalesce(bool_or(emoji = $3), false), count(DISTINCT emoji) \
                     FROM reactions WHERE conv = $1 AND seq = $2",
                )
                .await?;
            let r = self
                .tx
                .query_one(&st, &[&conv, &seq_i, &emoji, &user])
                .await?;
            let (set, known, distinct): (bool, bool, i64) = (r.get(0), r.get(1), r.get(2));
            if set {
                false
            } else if !known && distinct as usize >= MAX_EMOJI_PER_MESSAGE {
                return Ok(Err(StoreError::Invalid(format!(
                    "a message holds at most {MAX_EMOJI_PER_MESSAGE} different emoji"
                ))));
            } else {
                let st = self
                    .st("INSERT INTO reactions (conv, seq, emoji, user_name, at) VALUES ($1, $2, $3, $4, $5)")
                    .await?;
                self.tx
                    .execute(&st, &[&conv, &seq_i, &emoji, &user, &now])
                    .await?;
                true
            }
        } else {
            let st = self
                .st("DELETE FROM reactions WHERE conv = $1 AND seq = $2 AND emoji = $3 AND user_name = $4")
                .await?;
            self.tx
                .execute(&st, &[&conv, &seq_i, &emoji, &user])
                .await?
                == 1
        };
        if changed {
            let st = self
                .st("UPDATE messages SET reacted_at = $3 WHERE conv = $1 AND seq = $2")
                .await?;
            self.tx.execute(&st, &[&conv, &seq_i, &now]).await?;
            self.changes.push(Committed::Reaction {
                conv: conv.to_string(),
                seq,
                user: user.to_string(),
                emoji: emoji.to_string(),
                on,
                origin,
            });
        }
        Ok(Ok(Outcome::Reacted(changed)))
    }

    async fn unshare_message(&mut self, conv: &str, seq: i64) -> PgResult<()> {
        let st = self
            .st("DELETE FROM message_files WHERE conv = $1 AND seq = $2")
            .await?;
        self.tx.execute(&st, &[&conv, &seq]).await?;
        Ok(())
    }
}

/// Stored messages by `(sender, client_msg_id)`.
fn stored_by_id(rows: Vec<tokio_postgres::Row>) -> HashMap<(String, String), Message> {
    let mut stored = HashMap::new();
    for r in rows {
        match row_to_message(&r) {
            Ok(m) => {
                stored.insert((m.from.clone(), m.client_msg_id.clone()), m);
            }
            Err(e) => tracing::error!(error = %e, "a stored message cannot be read"),
        }
    }
    stored
}

fn select_stored_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT m.* FROM unnest($1::text[], $2::text[]) AS k(s, c) \
             CROSS JOIN LATERAL (SELECT {MESSAGE_COLUMNS} FROM messages m {REPLIED} \
                                 WHERE m.sender = k.s AND m.client_msg_id = k.c LIMIT 1) AS m"
        )
    })
}

/// The answer to a retried send: the stored message, or a conflict if its
/// `client_msg_id` was used in another conversation.
fn retried(found: Message, m: &NewMessage) -> StoreResult<Outcome> {
    if found.conv != m.conv {
        return Err(StoreError::Conflict(format!(
            "client_msg_id {:?} was already used in {}",
            m.client_msg_id, found.conv
        )));
    }
    Ok(Outcome::Appended(Appended {
        message: found,
        duplicate: true,
    }))
}

/// The columns of the messages one insert stores.
#[derive(Default)]
struct NewRows {
    conv: Vec<String>,
    seq: Vec<i64>,
    msg_id: Vec<String>,
    sender: Vec<String>,
    client_msg_id: Vec<String>,
    content_type: Vec<&'static str>,
    content: Vec<String>,
    reply_to: Vec<Option<i64>>,
    mentions: Vec<Option<String>>,
    /// (user, conv, seq) of each mention.
    mentioned: Vec<(String, String, i64)>,
}

impl NewRows {
    fn push(&mut self, m: &Message, content: &serde_json::Value) {
        self.conv.push(m.conv.clone());
        self.seq.push(m.seq as i64);
        self.msg_id.push(m.msg_id.clone());
        self.sender.push(m.from.clone());
        self.client_msg_id.push(m.client_msg_id.clone());
        self.content_type.push(m.content_type.as_str());
        self.content
            .push(serde_json::to_string(content).unwrap_or_else(|_| "null".into()));
        self.reply_to
            .push(m.reply_to.as_ref().map(|r| r.seq as i64));
        self.mentions.push(
            (!m.mentions.is_empty())
                .then(|| serde_json::to_string(&m.mentions).unwrap_or_default()),
        );
        self.mentioned.extend(
            m.mentions
                .iter()
                .map(|u| (u.clone(), m.conv.clone(), m.seq as i64)),
        );
    }

    fn is_empty(&self) -> bool {
        self.conv.is_empty()
    }
}
