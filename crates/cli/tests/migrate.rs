//! `hubbub migrate`: a SQLite deployment filled through the protocol is copied into a
//! real PostgreSQL server and served from there with the same messages, seqs, recalls,
//! edits, read positions, accounts and files; an interrupted copy goes on where it
//! stopped and copies nothing twice; a target holding other data is refused, and a copy
//! changed afterwards fails the verification.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubbub_client::{Client, ClientError, ConnectOptions};
use hubbub_protocol::{ClientFrame, ContentType};
use hubbub_server::metrics::Metrics;
use hubbub_server::store::transfer::{self, Options};
use hubbub_server::store::{FileMeta, NewMessage, PgStore, SqliteStore, Store};
use hubbub_testkit::PgServer;
use serde_json::{json, Value};

mod common;

use common::Server;

const WAIT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "correct horse battery";
const TABLES: [&str; 8] = [
    "users",
    "guest_names",
    "conversations",
    "members",
    "messages",
    "read_cursors",
    "files",
    "message_files",
];

fn hubbub(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run hubbub")
}

fn migrate(dir: &Path, url: &str) -> Output {
    hubbub(&["migrate", "--from", dir.to_str().unwrap(), "--to", url])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The database name at the end of a test server's URL.
fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

async fn start_pg() -> PgServer {
    tokio::task::spawn_blocking(PgServer::start).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// Stops a server as an operator does before migrating: SIGTERM, then its exit.
fn stop(mut server: Server) {
    let sent = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(sent);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "the server exited with {status}");
            return;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The SQLite database's files (`hubbub.db` and any `-wal`/`-shm`), by name.
fn db_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("hubbub.db"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Every table of a PostgreSQL database, in key order, as psql prints it.
fn dump(pg: &PgServer, url: &str) -> String {
    let keys = [
        "name",
        "name",
        "conv",
        "conv, user_name",
        "conv, seq",
        "conv, user_name",
        "id",
        "file_id, conv, seq",
    ];
    TABLES
        .iter()
        .zip(keys)
        .map(|(t, key)| {
            let rows = pg.psql(db_name(url), &format!("SELECT * FROM {t} ORDER BY {key}"));
            format!("{t}:\n{rows}\n")
        })
        .collect()
}

/// Someone using the server.
#[derive(Clone)]
enum Who {
    Account(&'static str, String),
    Guest(&'static str),
}

impl Who {
    fn name(&self) -> &'static str {
        match self {
            Who::Account(n, _) | Who::Guest(n) => n,
        }
    }

    async fn connect(&self, server: &Server) -> Client {
        let opts = match self {
            Who::Account(_, token) => ConnectOptions::with_token(server.url(), token),
            Who::Guest(name) => ConnectOptions::guest(server.url(), *name),
        };
        tokio::time::timeout(WAIT, Client::connect(opts))
            .await
            .expect("connect in time")
            .expect("connect")
    }

    fn get(&self, server: &Server, path: &str) -> reqwest::RequestBuilder {
        match self {
            Who::Account(_, token) => http()
                .get(format!("http://{}{path}", server.addr))
                .bearer_auth(token),
            Who::Guest(name) => http().get(format!("http://{}{path}?user={name}", server.addr)),
        }
    }

    /// Downloads `url`: its status and bytes.
    async fn download(&self, server: &Server, url: &str) -> (u16, Vec<u8>) {
        let r = self.get(server, url).send().await.expect("download");
        (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
    }
}

async fn post(server: &Server, path: &str, body: &Value) -> reqwest::Response {
    http()
        .post(format!("http://{}{path}", server.addr))
        .json(body)
        .send()
        .await
        .expect("http request")
}

/// Logs in as `name`: a token.
async fn login(server: &Server, name: &str) -> String {
    let r = post(
        server,
        "/api/login",
        &json!({"username": name, "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), 200, "login {name}");
    let v: Value = r.json().await.unwrap();
    v["token"].as_str().expect("token").to_string()
}

/// What `who` sees: every conversation through `sync` (messages, cursors, the recalls
/// and edits since the start) and `history`, and the read positions of
/// `GET /api/conversations`.
async fn view(server: &Server, who: &Who) -> Value {
    let c = who.connect(server).await;
    let conversations = c.sync(BTreeMap::new(), None).await.unwrap().conversations;
    let from_start: BTreeMap<String, u64> = conversations
        .iter()
        .map(|(conv, _)| (conv.clone(), 0))
        .collect();
    let all = c.sync(from_start, Some(1000)).await.unwrap();
    assert!(all.caught_up, "one page holds everything");
    let changes = c
        .sync_since(all.cursors.clone(), Some(1), Some(0))
        .await
        .unwrap()
        .changes;
    let mut history = serde_json::Map::new();
    for conv in all.cursors.keys() {
        let page = c.history(conv, None, None, Some(200)).await.unwrap();
        history.insert(conv.clone(), serde_json::to_value(&page.messages).unwrap());
    }
    let listed = who.get(server, "/api/conversations").send().await.unwrap();
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    c.close().await.unwrap();
    json!({
        "conversations": conversations,
        "messages": all.messages,
        "cursors": all.cursors,
        "changes": changes,
        "history": history,
        "listed": listed,
    })
}

/// What [`populate`] made.
struct Populated {
    people: Vec<Who>,
    /// The uploaded file's URL and bytes.
    file: (String, Vec<u8>),
}

const GENERAL: &str = "room:general";
const DM: &str = "dm:alice:bob";

/// Fills a server through the protocol and the HTTP API: an account (alice) and guests,
/// two rooms (one without messages), a DM, a recall, an edit, read positions, and an
/// uploaded file sent in a message.
async fn populate(server: &Server) -> Populated {
    let r = post(
        server,
        "/api/register",
        &json!({"username": "alice", "password": PASSWORD}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let alice = Who::Account("alice", login(server, "alice").await);
    let bob = Who::Guest("bob");
    let carol = Who::Guest("carol");
    let dave = Who::Guest("dave");
    let a = alice.connect(server).await;
    let b = bob.connect(server).await;
    let c = carol.connect(server).await;
    let d = dave.connect(server).await;
    a.join("general").await.unwrap();
    b.join("general").await.unwrap();
    c.join("quiet").await.unwrap();
    for i in 1..=24u64 {
        let (client, name) = if i % 2 == 1 {
            (&a, "alice")
        } else {
            (&b, "bob")
        };
        let sent = client
            .send_text(GENERAL, &format!("general {i} from {name}"))
            .await
            .unwrap();
        assert_eq!(sent.seq, i);
    }
    for i in 1..=5u64 {
        let client = if i % 2 == 1 { &a } else { &b };
        let sent = client.send_text(DM, &format!("dm {i}")).await.unwrap();
        assert_eq!(sent.seq, i);
    }
    b.request(ClientFrame::Recall {
        id: None,
        conv: GENERAL.into(),
        seq: 4,
    })
    .await
    .unwrap();
    a.request(ClientFrame::Edit {
        id: None,
        conv: GENERAL.into(),
        seq: 3,
        content: json!("general 3 from alice, edited"),
    })
    .await
    .unwrap();

    let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let Who::Account(_, token) = &alice else {
        unreachable!()
    };
    let part = reqwest::multipart::Part::bytes(bytes.clone())
        .file_name("notes.txt")
        .mime_str("text/plain")
        .unwrap();
    let r = http()
        .post(format!("http://{}/api/files", server.addr))
        .bearer_auth(token)
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let uploaded: Value = r.json().await.unwrap();
    let url = uploaded["url"].as_str().unwrap().to_string();
    let sent = a
        .send_message(
            GENERAL,
            &a.new_client_msg_id(),
            ContentType::File,
            uploaded.clone(),
        )
        .await
        .unwrap();
    assert_eq!(sent.seq, 25);

    // `read` has no answer: wait until the positions are stored.
    for (client, who, conv, seq) in [(&b, &bob, GENERAL, 10), (&a, &alice, DM, 5)] {
        let frame = ClientFrame::Read {
            id: None,
            conv: conv.into(),
            seq,
        };
        client.send_no_reply(frame).await.unwrap();
        wait_read(server, who, conv, seq).await;
    }
    for client in [a, b, c, d] {
        client.close().await.unwrap();
    }
    Populated {
        people: vec![alice, bob, carol, dave],
        file: (url, bytes),
    }
}

/// Waits until `who`'s read position in `conv` is `seq`.
async fn wait_read(server: &Server, who: &Who, conv: &str, seq: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let listed: Value = who
            .get(server, "/api/conversations")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let found = listed["conversations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["conv"] == conv && c["read_seq"] == seq);
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{conv} read up to {seq}: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn views(server: &Server, people: &[Who]) -> BTreeMap<&'static str, Value> {
    let mut out = BTreeMap::new();
    for who in people {
        out.insert(who.name(), view(server, who).await);
    }
    out
}

/// The uploaded file: alice (who sent it) and bob (in the room it was sent to) download
/// it; dave (in no conversation with it) does not.
async fn check_downloads(server: &Server, people: &[Who], file: &(String, Vec<u8>)) {
    let (url, bytes) = file;
    for who in &people[..2] {
        let (status, got) = who.download(server, url).await;
        assert_eq!(status, 200, "{} downloads {url}", who.name());
        assert!(got == *bytes, "{} gets the same bytes", who.name());
    }
    assert_eq!(people[3].download(server, url).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_deployment_copied_by_migrate_is_served_the_same_from_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_pg().await;
    let server = Server::start_with(dir.path(), "127.0.0.1:0", &[], &[]);
    let populated = populate(&server).await;
    let before = views(&server, &populated.people).await;
    let general = &before["alice"]["history"][GENERAL];
    assert_eq!(general.as_array().unwrap().len(), 25);
    assert_eq!(general[3]["recalled"], true);
    assert!(general[2]["edited_at"].is_i64());
    assert_eq!(
        before["alice"]["changes"].as_array().unwrap().len(),
        2,
        "the recall and the edit are replayed"
    );
    check_downloads(&server, &populated.people, &populated.file).await;
    stop(server);

    let source_files = db_files(dir.path());
    let url = pg.create_database();
    let started = Instant::now();
    let out = migrate(dir.path(), &url);
    let took = started.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("verified: the copy matches the source"),
        "{stdout}"
    );
    for table in TABLES {
        assert!(
            stderr.contains(&format!("hubbub migrate: {table}: ")),
            "a progress line for {table}: {stderr}"
        );
    }
    eprintln!("migrate took {took:?}:\n{stdout}");
    assert!(
        db_files(dir.path()) == source_files,
        "the SQLite database is left as it was, and nothing is created beside it"
    );
    let db = db_name(&url);
    assert_eq!(
        pg.psql(db, "SELECT conv, last_seq FROM conversations ORDER BY conv"),
        "dm:alice:bob|5\nroom:general|25\nroom:quiet|0"
    );
    assert_eq!(
        pg.psql(db, "SELECT name FROM guest_names ORDER BY name"),
        "bob\ncarol\ndave"
    );

    // Run again: nothing left to copy, verified again.
    let again = migrate(dir.path(), &url);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("messages: copied before"));
    assert!(text(&again.stdout).contains("verified"));

    let server = Server::start_with(dir.path(), "127.0.0.1:0", &["--store", &url], &[]);
    // The account logs in with its password.
    let mut people = populated.people.clone();
    people[0] = Who::Account("alice", login(&server, "alice").await);
    let after = views(&server, &people).await;
    assert_eq!(before, after);
    check_downloads(&server, &people, &populated.file).await;
    // Guests still can't take the account's name, nor an account a guest's.
    match Client::connect(ConnectOptions::guest(server.url(), "ALICE")).await {
        Err(ClientError::Connect {
            status: Some(401), ..
        }) => {}
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let taken = post(
        &server,
        "/api/register",
        &json!({"username": "bob", "password": PASSWORD}),
    )
    .await;
    assert_eq!(taken.status(), 409);
    // Seqs go on from the copied ones.
    let a = people[0].connect(&server).await;
    assert_eq!(a.send_text(GENERAL, "after").await.unwrap().seq, 26);
    assert_eq!(a.send_text(DM, "after").await.unwrap().seq, 6);
    a.close().await.unwrap();
}

/// A server killed with -9 leaves messages in SQLite's write-ahead log: the copy reads
/// them too, and changes neither file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_killed_server_left_in_the_write_ahead_log_are_copied() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_pg().await;
    let server = Server::start_with(dir.path(), "127.0.0.1:0", &[], &[]);
    let erin = Who::Guest("erin").connect(&server).await;
    erin.join("logged").await.unwrap();
    for i in 1..=30 {
        erin.send_text("room:logged", &format!("m{i}"))
            .await
            .unwrap();
    }
    drop(erin);
    drop(server); // SIGKILL
    let wal = dir.path().join("hubbub.db-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0, "a log was left");
    let kept = |files: BTreeMap<String, Vec<u8>>| {
        files
            .into_iter()
            .filter(|(name, _)| !name.ends_with("-shm"))
            .collect::<BTreeMap<_, _>>()
    };
    let before = kept(db_files(dir.path()));
    let url = pg.create_database();
    let out = migrate(dir.path(), &url);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        kept(db_files(dir.path())) == before,
        "hubbub.db and its log are unchanged"
    );
    assert_eq!(
        pg.psql(
            db_name(&url),
            "SELECT count(*), max(seq) FROM messages WHERE conv = 'room:logged'"
        ),
        "30|30"
    );
}

fn message(conv: &str, from: &str, n: usize, content: Value) -> NewMessage {
    let dm_members = conv.strip_prefix("dm:").map(|rest| {
        let (x, y) = rest.split_once(':').unwrap();
        (x.to_string(), y.to_string())
    });
    NewMessage {
        conv: conv.into(),
        from: from.into(),
        client_msg_id: format!("{conv}-{n}"),
        content_type: if content.is_object() {
            ContentType::Image
        } else {
            ContentType::Text
        },
        content,
        dm_members,
        origin: 0,
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// Fills a data dir through the SQLite store: an account, guests, three rooms of 40
/// messages, a DM, a recall, an edit, read positions and a shared file.
async fn fill(dir: &Path, tag: &str) {
    let store = SqliteStore::open(dir, Arc::new(|_| {})).unwrap();
    store
        .create_user("owner", "$argon2id$not-a-real-hash")
        .await
        .unwrap();
    let users = ["g1", "g2", "g3", "owner"];
    for g in &users[..3] {
        store.claim_guest_name(g).await.unwrap();
    }
    for r in 0..3 {
        let conv = format!("room:r{r}");
        for u in users {
            store.join_room(&conv, u).await.unwrap();
        }
        for i in 0..40 {
            let m = message(&conv, users[i % 4], i, json!(format!("{tag} {conv} {i}")));
            store.append(m).await.unwrap();
        }
    }
    for i in 0..15 {
        let from = if i % 2 == 0 { "g1" } else { "g2" };
        let m = message("dm:g1:g2", from, i, json!(format!("{tag} dm {i}")));
        store.append(m).await.unwrap();
    }
    store.recall("room:r0", 5, "g1", 0).await.unwrap();
    store
        .edit("room:r1", 7, json!("edited"), vec![], 0)
        .await
        .unwrap();
    store.mark_read("room:r0", "g2", 30, 0).await.unwrap();
    store.mark_read("room:r1", "g3", 12, 0).await.unwrap();
    store.mark_read("dm:g1:g2", "g1", 15, 0).await.unwrap();
    let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let meta = FileMeta {
        id: id.into(),
        name: "a.png".into(),
        mime: "image/png".into(),
        size: 10,
        uploader: "owner".into(),
        created_at: 1,
    };
    assert!(store.put_file(meta, u64::MAX).await.unwrap());
    let content = json!({"url": format!("/files/{id}/a.png"), "name": "a.png", "size": 10, "mime": "image/png"});
    store
        .append(message("room:r2", "owner", 99, content))
        .await
        .unwrap();
    store.close().await.unwrap();
}

fn quiet(chunk_rows: usize, stop_after_chunks: Option<u64>) -> Options {
    Options {
        chunk_rows,
        stop_after_chunks,
        progress: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_copy_goes_on_where_it_stopped_and_copies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), "resume").await;
    let pg = start_pg().await;

    // In one go.
    let whole = pg.create_database();
    let report = transfer::sqlite_to_postgres_with(dir.path(), &whole, &quiet(5000, None))
        .await
        .unwrap();
    assert!(report.verified(), "{report}");
    assert!(!report.resumed);
    let messages = report.tables.iter().find(|t| t.name == "messages").unwrap();
    assert_eq!((messages.source, messages.target), (136, 136));
    let expected = dump(&pg, &whole);

    // Three chunks of 7 rows per run, every run stopped until one finishes.
    let stepped = pg.create_database();
    let mut runs = 0;
    let report = loop {
        runs += 1;
        assert!(runs < 100, "the copy ends");
        match transfer::sqlite_to_postgres_with(dir.path(), &stepped, &quiet(7, Some(3))).await {
            Ok(report) => break report,
            Err(e) => assert!(e.to_string().contains("stopped after 3 chunks"), "{e:#}"),
        }
    };
    assert!(runs > 5, "the copy was stopped often: {runs} runs");
    assert!(report.verified(), "{report}");
    assert!(report.resumed);
    assert_eq!(dump(&pg, &stepped), expected);

    // `hubbub migrate` killed with -9 in the middle, then run again.
    let killed = pg.create_database();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["migrate", "--chunk-rows", "2", "--from"])
        .arg(dir.path())
        .args(["--to", &killed])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("a progress line for conversations")
            .unwrap();
        if line.starts_with("hubbub migrate: conversations:") {
            break;
        }
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed before the end");
    let db = db_name(&killed);
    let partial: u64 = pg
        .psql(db, "SELECT count(*) FROM messages")
        .parse()
        .unwrap();
    assert!(partial < 136, "the copy was cut short: {partial} messages");
    let out = migrate(dir.path(), &killed);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("going on from the progress of an earlier run"),
        "{stderr}"
    );
    assert!(stderr.contains("conversations: copied before"), "{stderr}");
    assert!(text(&out.stdout).contains("verified"));
    assert_eq!(dump(&pg, &killed), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_other_data_is_refused_and_a_changed_copy_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), "one").await;
    let pg = start_pg().await;

    // Written by a server, not by a migration: refused, and left as it was.
    let used = pg.create_database();
    let store = PgStore::open(&used, Arc::new(|_| {}), Metrics::new())
        .await
        .unwrap();
    store.join_room("room:x", "zed").await.unwrap();
    store
        .append(message("room:x", "zed", 0, json!("hello")))
        .await
        .unwrap();
    store.close().await.unwrap();
    let out = migrate(dir.path(), &used);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "already holds hubbub data that `hubbub migrate` did not copy \
             (rows in conversations, members, messages): migrate into an empty database"
        ),
        "{stderr}"
    );
    let db = db_name(&used);
    assert_eq!(
        pg.psql(
            db,
            "SELECT to_regclass('hubbub_migration_progress') IS NULL"
        ),
        "t"
    );
    assert_eq!(pg.psql(db, "SELECT count(*) FROM messages"), "1");

    // Holding the copy of another deployment: refused.
    let other = tempfile::tempdir().unwrap();
    fill(other.path(), "two").await;
    let target = pg.create_database();
    assert!(migrate(other.path(), &target).status.success());
    let out = migrate(dir.path(), &target);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("holds a migration of another SQLite database"),
        "{}",
        text(&out.stderr)
    );

    // A copy changed after the fact: the verification says where, and the exit is 1.
    let db = db_name(&target);
    pg.psql(
        db,
        "DELETE FROM messages WHERE conv = 'room:r1' AND seq = 40",
    );
    let out = migrate(other.path(), &target);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    let counts = format!("{:<15} {:>12} {:>12}", "messages", 136, 135);
    assert!(stdout.contains(&counts), "{stdout}");
    assert!(
        stdout.contains(
            "room:r1: newest seq 40 and 40 messages in SQLite, \
             newest seq 39 and 39 messages in PostgreSQL"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("room:r1: last_seq 40 in PostgreSQL, but its newest message is seq 39"),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("the copy does not match the source"),
        "{}",
        text(&out.stderr)
    );

    // No database where --from points.
    let empty = tempfile::tempdir().unwrap();
    let out = migrate(empty.path(), &pg.create_database());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("hubbub.db does not exist"),
        "{}",
        text(&out.stderr)
    );
}
