//! The `hubbub` binary as a process: signals, crashes, restarts and the admin verbs.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hubbub_client::{Client, ConnectOptions};
use hubbub_protocol::ServerFrame;

const WAIT: Duration = Duration::from_secs(10);

mod common;

use common::Server;

impl Server {
    /// `hubbub serve` on 127.0.0.1:0 with extra arguments. The crash test sends as fast
    /// as acks come back: the send limit is lifted.
    fn start_on_any_port(dir: &Path, extra: &[&str]) -> Server {
        Server::start_with(
            dir,
            "127.0.0.1:0",
            extra,
            &[
                ("HUBBUB_SEND_RATE_PER_SEC", "100000"),
                ("HUBBUB_SEND_BURST", "100000"),
            ],
        )
    }

    async fn connect(&self, opts: ConnectOptions) -> Client {
        tokio::time::timeout(WAIT, Client::connect(opts))
            .await
            .expect("connect in time")
            .expect("connect")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "the server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn hubbub(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hubbub");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on_any_port(dir.path(), &[]);
    let mut alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    let mut bob = server
        .connect(ConnectOptions::guest(server.url(), "bob"))
        .await;
    alice.join("lobby").await.unwrap();
    let sent = alice
        .send_text("room:lobby", "before the end")
        .await
        .unwrap();
    assert_eq!(sent.seq, 1);

    let start = Instant::now();
    server.signal("-TERM");
    for c in [&mut alice, &mut bob] {
        let close = c.wait_closed(WAIT).await.expect("closed in time");
        assert_eq!(close.map(|c| c.code), Some(1001));
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(start.elapsed() < Duration::from_secs(10));

    // The acked message survived the shutdown.
    let server = Server::start_on_any_port(dir.path(), &[]);
    let alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    let page = alice.history("room:lobby", None, None, None).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].content, Some("before the end".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acked_sends_loses_none_of_them() {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on_any_port(dir.path(), &[]);
    let alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    alice.join("crash").await.unwrap();
    let mut acked = Vec::new();
    for i in 0..N {
        let s = alice
            .send_text("room:crash", &format!("message {i}"))
            .await
            .unwrap();
        acked.push((s.seq, format!("message {i}")));
    }
    // Crash right after the last ack: no shutdown, no flush.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(alice);

    let server = Server::start_on_any_port(dir.path(), &[]);
    let alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    let mut stored = Vec::new();
    let mut after = 0;
    for _ in 0..10 {
        let page = alice
            .history("room:crash", None, Some(after), Some(200))
            .await
            .unwrap();
        for m in &page.messages {
            stored.push((
                m.seq,
                m.content
                    .clone()
                    .and_then(|c| c.as_str().map(String::from))
                    .unwrap(),
            ));
        }
        after = stored.last().map_or(0, |s| s.0);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(stored, acked);
    assert_eq!(
        acked.iter().map(|a| a.0).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_and_token_verbs_work_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = hubbub(
        &["user", "add", "carol", "--data-dir", d],
        Some("a long password\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = hubbub(
        &["user", "add", "carol", "--data-dir", d],
        Some("a long password\n"),
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is taken"));
    let short = hubbub(&["user", "add", "dave", "--data-dir", d], Some("short\n"));
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 8"));

    let server = Server::start_on_any_port(dir.path(), &["--no-guest"]);
    let token = hubbub(&["token", "carol", "--data-dir", d], None);
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let carol = server
        .connect(ConnectOptions::guest(server.url(), "ignored").token(token))
        .await;
    assert_eq!(carol.welcome().user, "carol");
    // Accounts are added while the server runs (it holds the data dir's lock), and can
    // log in at once.
    let started = std::time::Instant::now();
    let erin = hubbub(
        &["user", "add", "erin", "--data-dir", d],
        Some(
            "another long password
",
        ),
    );
    assert!(
        erin.status.success(),
        "{}",
        String::from_utf8_lossy(&erin.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "it waited for the lock"
    );
    let login = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{}/api/login", server.addr))
        .json(&serde_json::json!({"username": "erin", "password": "another long password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);

    // A token that expires while connected ends the session with 4003.
    let short = hubbub(&["token", "carol", "--ttl", "1", "--data-dir", d], None);
    let short = String::from_utf8(short.stdout).unwrap().trim().to_string();
    let mut c = server
        .connect(
            ConnectOptions::guest(server.url(), "ignored")
                .token(short.clone())
                .device("tablet"),
        )
        .await;
    let close = c.wait_closed(Duration::from_secs(5)).await.unwrap();
    assert_eq!(close.map(|c| c.code), Some(4003));
    // Once expired, it is refused before the upgrade.
    match Client::connect(ConnectOptions::guest(server.url(), "ignored").token(short)).await {
        Err(hubbub_client::ClientError::Connect { status, .. }) => assert_eq!(status, Some(401)),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    // carol's long-lived session is untouched.
    carol.ping().await.expect("the first session still works");
}

/// What one sender knows: acked (client_msg_id, seq), and the one it was sending when
/// the connection died (to retry with the same id).
#[derive(Default)]
struct SenderLog {
    acked: Vec<(String, u64)>,
    unsure: Option<String>,
    next: u64,
}

impl SenderLog {
    /// Sends the unsure message again (with its id), or else the next one, into
    /// `room:load` as `user`; records it as acked, or as unsure when the send failed.
    async fn send_one(&mut self, client: &Client, user: &str) -> bool {
        let id = match self.unsure.take() {
            Some(id) => id,
            None => {
                self.next += 1;
                format!("{user}-{}", self.next)
            }
        };
        let sent = client
            .send_message(
                "room:load",
                &id,
                hubbub_protocol::ContentType::Text,
                serde_json::Value::String(id.clone()),
            )
            .await;
        match sent {
            Ok(s) => {
                self.acked.push((id, s.seq));
                true
            }
            Err(_) => {
                self.unsure = Some(id);
                false
            }
        }
    }
}

/// Sends into `room:load` as `user` until the connection fails; retries the unsure
/// message first, with its original id.
async fn send_until_failure(url: String, user: String, mut log: SenderLog) -> SenderLog {
    let Ok(client) = Client::connect(ConnectOptions::guest(url, user.clone())).await else {
        return log;
    };
    if client.join("load").await.is_err() {
        return log;
    }
    while log.send_one(&client, &user).await {}
    log
}

/// Two senders into `room:load` on each of `nodes`, named `n{node}s{i}`, in that order.
fn two_senders_each(nodes: &[Server]) -> Vec<tokio::task::JoinHandle<SenderLog>> {
    nodes
        .iter()
        .enumerate()
        .flat_map(|(n, node)| {
            (0..2).map(move |i| {
                tokio::spawn(send_until_failure(
                    node.url(),
                    format!("n{n}s{i}"),
                    SenderLog::default(),
                ))
            })
        })
        .collect()
}

/// Waits for senders whose server is gone (each stops at its first failure).
async fn sender_logs(tasks: Vec<tokio::task::JoinHandle<SenderLog>>) -> Vec<SenderLog> {
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(
            tokio::time::timeout(WAIT, t)
                .await
                .expect("sender stops")
                .unwrap(),
        );
    }
    logs
}

/// Every acked message is stored with its seq; seqs are 1..=N; each text appears once.
async fn check_store(server: &Server, logs: &[SenderLog]) -> usize {
    let reader = server
        .connect(ConnectOptions::guest(server.url(), "auditor"))
        .await;
    reader.join("load").await.unwrap();
    let mut stored = Vec::new();
    let mut cursors = std::collections::BTreeMap::from([("room:load".to_string(), 0u64)]);
    for _ in 0..1000 {
        let r = reader.sync(cursors.clone(), Some(1000)).await.unwrap();
        stored.extend(r.messages);
        cursors = r.cursors;
        if r.caught_up {
            break;
        }
    }
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "no gaps"
    );
    let by_text: std::collections::HashMap<String, u64> = stored
        .iter()
        .map(|m| {
            (
                m.content.clone().unwrap().as_str().unwrap().to_string(),
                m.seq,
            )
        })
        .collect();
    assert_eq!(by_text.len(), stored.len(), "no message stored twice");
    let mut acked = 0;
    for log in logs {
        for (id, seq) in &log.acked {
            assert_eq!(by_text.get(id), Some(seq), "acked {id} lost or renumbered");
            acked += 1;
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_at_random_moments_loses_no_acked_message() {
    const SENDERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut logs: Vec<SenderLog> = (0..SENDERS).map(|_| SenderLog::default()).collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for round in 0..3u64 {
        let mut server = Server::start_on_any_port(dir.path(), &[]);
        let tasks: Vec<_> = logs
            .drain(..)
            .enumerate()
            .map(|(i, log)| tokio::spawn(send_until_failure(server.url(), format!("s{i}"), log)))
            .collect();
        // A random moment between 200 and 800 ms into the load.
        let delay = 200
            + (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(round * 1442695040888963407)
                >> 33)
                % 600;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        for t in tasks {
            logs.push(
                tokio::time::timeout(WAIT, t)
                    .await
                    .expect("sender stops")
                    .unwrap(),
            );
        }
    }
    let server = Server::start_on_any_port(dir.path(), &[]);
    // The senders reconnect once more and retry what they were unsure of.
    let tasks: Vec<_> = logs
        .drain(..)
        .enumerate()
        .map(|(i, mut log)| {
            let url = server.url();
            tokio::spawn(async move {
                if log.unsure.is_some() {
                    let user = format!("s{i}");
                    let c = Client::connect(ConnectOptions::guest(url, user.clone()))
                        .await
                        .unwrap();
                    assert!(log.send_one(&c, &user).await, "the retry is stored");
                }
                log
            })
        })
        .collect();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    let acked = check_store(&server, &logs).await;
    assert!(acked > 50, "the load was real: {acked} acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_acks_only_what_is_stored_and_exits_in_time() {
    const SENDERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_on_any_port(dir.path(), &[]);
    // A watcher in the room tells when the load is real, however slow the machine.
    let mut watcher = server
        .connect(ConnectOptions::guest(server.url(), "watcher"))
        .await;
    watcher.join("load").await.unwrap();
    let tasks: Vec<_> = (0..SENDERS)
        .map(|i| {
            tokio::spawn(send_until_failure(
                server.url(),
                format!("s{i}"),
                SenderLog::default(),
            ))
        })
        .collect();
    watcher
        .wait_for(
            Duration::from_secs(30),
            |f| matches!(f, ServerFrame::Message(m) if m.seq >= 60),
        )
        .await
        .expect("the senders get going");
    let start = Instant::now();
    server.signal("-TERM");
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let logs = sender_logs(tasks).await;
    let server = Server::start_on_any_port(dir.path(), &[]);
    let acked = check_store(&server, &logs).await;
    assert!(acked > 20, "the load was real: {acked} acked");
}

/// Three hubbub processes share one PostgreSQL database, each with its own senders to
/// one room. One is killed with -9 under load, then the other two: every acked message
/// is stored with its seq, and the room's seqs are gapless (each process took turns on
/// the room's counter row; the killed one's open transaction rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_nodes_on_one_postgres_loses_no_acked_message() {
    let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
        .await
        .unwrap();
    let url = pg.create_database();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Server> = dirs
        .iter()
        .map(|d| Server::start_on_any_port(d.path(), &["--store", &url]))
        .collect();
    // A watcher on the first node hears what that node commits (nodes do not forward to
    // each other yet): it tells when the first node is under load, however slow the
    // machine.
    let mut watcher = nodes[0]
        .connect(ConnectOptions::guest(nodes[0].url(), "watcher"))
        .await;
    watcher.join("load").await.unwrap();
    let tasks = two_senders_each(&nodes);
    for _ in 0..40 {
        watcher
            .wait_for(Duration::from_secs(30), |f| {
                matches!(f, ServerFrame::Message(_))
            })
            .await
            .expect("the first node's senders get going");
    }
    nodes[0].signal("-KILL");
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[1].signal("-KILL");
    nodes[2].signal("-KILL");
    let logs = sender_logs(tasks).await;
    for node in &mut nodes {
        let _ = node.child.wait();
    }
    let fresh = tempfile::tempdir().unwrap();
    let auditor = Server::start_on_any_port(fresh.path(), &["--store", &url]);
    let acked = check_store(&auditor, &logs).await;
    let from_killed_first: usize = logs[..2].iter().map(|l| l.acked.len()).sum();
    assert!(from_killed_first > 10, "the first node was under load");
    assert!(acked > 100, "the load was real: {acked} acked");
    drop(auditor);
    drop(pg);
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Opens a WebSocket by hand and drops the TCP connection without a close handshake.
async fn open_and_drop(addr: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let req = format!(
        "GET /ws?user=ghost HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_ok() {
        let mut buf = [0u8; 512];
        let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_and_dropped_connections_leaves_memory_near_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on_any_port(dir.path(), &[]);
    let pid = server.child.id();
    let mut alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    alice.join("calm").await.unwrap();
    // Warm up allocator arenas and caches with the same kind of work first.
    for _ in 0..3 {
        let batch: Vec<_> = (0..200).map(|_| open_and_drop(&server.addr)).collect();
        futures_util::future::join_all(batch).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss_bytes(pid);

    // Junk: thousands of undecodable frames from mallory. Each gets an error until the
    // frame rate limit runs out; a client that keeps going is closed with 1008.
    let mut mallory = server
        .connect(ConnectOptions::guest(server.url(), "mallory"))
        .await;
    let junk = (0..100)
        .map(|i| format!("{{not json {i}"))
        .collect::<Vec<_>>()
        .join("\n");
    for _ in 0..30 {
        if mallory.send_raw(junk.clone()).await.is_err() {
            break;
        }
    }
    let close = mallory
        .wait_closed(WAIT)
        .await
        .unwrap()
        .expect("close frame");
    assert_eq!((close.code, close.reason.as_str()), (1008, "rate limited"));
    // Thousands of connections opened and dropped without a close handshake, while
    // alice keeps being served.
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let batch: Vec<_> = (0..200).map(|_| open_and_drop(&server.addr)).collect();
        let ping = async {
            let t = Instant::now();
            let _ = alice.ping().await;
            t.elapsed()
        };
        let (_, took) = tokio::join!(futures_util::future::join_all(batch), ping);
        worst = worst.max(took);
    }
    assert!(
        worst < Duration::from_secs(1),
        "alice waited {worst:?} for a pong"
    );
    while alice.next_event(Duration::from_millis(50)).await.is_ok() {}

    // Memory comes back near the baseline once the dropped connections are reaped.
    let mut after = u64::MAX;
    for _ in 0..100 {
        after = rss_bytes(pid);
        if after < baseline + 8 * 1024 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("rss baseline {baseline} after {after}");
    assert!(
        after < baseline + 8 * 1024 * 1024,
        "RSS {after} did not return near the baseline {baseline}"
    );
    alice.ping().await.unwrap();
}

/// A log that cannot be written (stderr on a full disk: here `/dev/full`, where every
/// write fails with ENOSPC) must not take the server down: the log line that the store
/// writer wrote before a rollback used to panic it, and every later send got
/// `unavailable: the store is closed` until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_stops_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let mut server = Server::start_logging_to(
        dir.path(),
        "127.0.0.1:0",
        &[],
        &[("HUBBUB_LOG", "trace")],
        Stdio::from(full),
    );
    let alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    alice.join("lobby").await.expect("join");
    for i in 0..50 {
        alice
            .send_text("room:lobby", &format!("m{i}"))
            .await
            .expect("send while every log write fails");
    }
    let page = alice
        .history("room:lobby", None, None, Some(100))
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 50);
    drop(alice);
    server.signal("-TERM");
    let status = server.wait_exit(WAIT);
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn environment_variables_a_platform_injects_are_ignored_with_one_warning() {
    // What Kubernetes puts into every pod of a namespace with a Service named hubbub.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("HUBBUB_LOG", "warn")
        .env("HUBBUB_PORT", "tcp://10.0.0.1:8080")
        .env("HUBBUB_PORT_8080_TCP_ADDR", "10.0.0.1")
        .env("HUBBUB_SERVICE_HOST", "10.0.0.1")
        .env("HUBBUB_HEARTBEAT_MS", "20000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hubbub serve");
    // Panics unless the server started and printed its listening line.
    common::listening_addr(&mut child);
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "exit status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("environment variables"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning line: {stderr}");
    for name in [
        "HUBBUB_PORT",
        "HUBBUB_PORT_8080_TCP_ADDR",
        "HUBBUB_SERVICE_HOST",
    ] {
        assert!(warnings[0].contains(name), "{name} named: {stderr}");
    }
    assert!(!warnings[0].contains("HUBBUB_HEARTBEAT_MS"), "{stderr}");
    assert!(!warnings[0].contains("HUBBUB_LOG"), "{stderr}");
}

#[test]
fn a_bad_value_in_the_environment_is_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_BACKTRACE", "1")
        .env("HUBBUB_HEARTBEAT_MS", "soon")
        .stdin(Stdio::null())
        .output()
        .expect("run hubbub serve");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "it did not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("hubbub: error: "), "{stderr}");
    assert!(
        stderr.to_ascii_lowercase().contains("heartbeat_ms") && stderr.contains("\"soon\""),
        "names the key and the value: {stderr}"
    );
}

#[test]
fn a_token_lifetime_beyond_ten_years_is_one_clear_line_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // u64::MAX seconds used to wrap around to an already expired token (a panic in a
    // debug build).
    for ttl in ["315360001", "18446744073709551615"] {
        let out = hubbub(&["token", "carol", "--ttl", ttl, "--data-dir", d], None);
        assert_eq!(out.status.code(), Some(1), "--ttl {ttl}");
        assert!(out.stdout.is_empty(), "no token for --ttl {ttl}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("at most 315360000 seconds"), "{stderr}");
    }
    let out = hubbub(
        &["token", "carol", "--ttl", "315360000", "--data-dir", d],
        None,
    );
    assert!(out.status.success(), "ten years is allowed");
}

#[test]
fn a_trusted_proxies_entry_that_is_no_address_stops_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let flag = ["--trusted-proxies", "127.0.0.1,proxy.internal"];
    for (args, env, bad) in [
        (&flag[..], None, "proxy.internal"),
        (&[][..], Some("10.0.0.0/8, 10.0.0.0/33"), "10.0.0.0/33"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubbub"));
        cmd.args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(args)
            .stdin(Stdio::null());
        if let Some(value) = env {
            cmd.env("HUBBUB_TRUSTED_PROXIES", value);
        }
        let out = cmd.output().expect("run hubbub serve");
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty(), "it did not start listening");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with("hubbub: error: ")
                && stderr.contains("trusted_proxies")
                && stderr.contains(&format!("\"{bad}\"")),
            "names the key and the entry: {stderr}"
        );
    }
}

/// Starts `hubbub ARGS` on 127.0.0.1:0 (through the environment, so the no-subcommand
/// demo can be started too); returns the child, its address and its stderr.
fn spawn_hubbub(dir: &Path, args: &[&str]) -> (std::process::Child, String) {
    spawn_hubbub_with(dir, args, &[])
}

/// [`spawn_hubbub`] with more environment variables.
fn spawn_hubbub_with(
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(args)
        .envs(envs.iter().copied())
        .env("HUBBUB_BIND", "127.0.0.1:0")
        .env("HUBBUB_DATA_DIR", dir)
        .env("HUBBUB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hubbub");
    let addr = common::listening_addr(&mut child);
    (child, addr)
}

/// Stops a child and returns what it wrote to stderr.
fn stop_and_read_stderr(mut child: std::process::Child) -> String {
    use std::io::Read;
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// The scheduling policy of each thread of process `pid` (`/proc/PID/task/*/stat`,
/// field 41), by thread name.
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // a thread that ended meanwhile
        };
        let (head, rest) = stat.rsplit_once(") ").unwrap();
        let name = head.split_once(" (").unwrap().1.to_string();
        // `rest` starts at field 3 (the state).
        let policy = rest.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        out.push((name, policy));
    }
    out
}

#[test]
fn the_servers_threads_run_under_the_batch_policy_unless_told_not_to() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (envs, want) in [
        (&[][..], SCHED_BATCH),
        (&[("HUBBUB_SCHED_BATCH", "false")][..], SCHED_OTHER),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (child, _addr) = spawn_hubbub_with(dir.path(), &["serve"], envs);
        // The store opens after the listening line: wait for its writer (bounded).
        let mut policies = thread_policies(child.id());
        for _ in 0..100 {
            if policies.iter().any(|(n, _)| n == "hubbub-store-wr") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            policies = thread_policies(child.id());
        }
        stop_and_read_stderr(child);
        // The runtime's workers and the store's writer at least, each started after the
        // policy was chosen.
        for name in ["tokio-rt-worker", "hubbub-store-wr"] {
            assert!(
                policies.iter().any(|(n, _)| n == name),
                "{name}: {policies:?}"
            );
        }
        assert!(
            policies.iter().all(|(_, p)| *p == want),
            "{envs:?}: {policies:?}"
        );
    }
}

#[tokio::test]
async fn guests_come_only_with_the_demo_or_when_chosen() {
    let dir = tempfile::tempdir().unwrap();
    // `hubbub serve`: accounts only.
    let (child, addr) = spawn_hubbub(dir.path(), &["serve"]);
    let refused = Client::connect(ConnectOptions::guest(format!("ws://{addr}"), "visitor")).await;
    assert!(
        matches!(
            refused,
            Err(hubbub_client::ClientError::Connect {
                status: Some(401),
                ..
            })
        ),
        "{:?}",
        refused.map(|_| ())
    );
    let err = stop_and_read_stderr(child);
    assert!(!err.contains("demo mode"), "{err}");

    // `hubbub` alone: the local demo lets guests in and says so.
    let (child, addr) = spawn_hubbub(dir.path(), &[]);
    let guest = tokio::time::timeout(
        WAIT,
        Client::connect(ConnectOptions::guest(format!("ws://{addr}"), "visitor")),
    )
    .await
    .expect("connect in time")
    .expect("the demo lets guests in");
    assert_eq!(guest.welcome().user, "visitor");
    drop(guest);
    let err = stop_and_read_stderr(child);
    assert!(
        err.contains("demo mode: guests may join without a password"),
        "{err}"
    );
}

/// A WebSocket as `user` on a socket with a small receive buffer, that sends `requests`
/// and then reads nothing.
async fn ask_and_never_read(
    addr: &str,
    user: &str,
    requests: impl Iterator<Item = String>,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures_util::SinkExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let url = format!("ws://{addr}/ws?user={user}");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("upgrade in time")
        .expect("upgrade");
    for r in requests {
        let msg = tokio_tungstenite::tungstenite::Message::text(r);
        if ws.feed(msg).await.is_err() {
            break;
        }
    }
    // The server may stop reading: do not wait for the last requests to be taken.
    let _ = tokio::time::timeout(Duration::from_millis(500), ws.flush()).await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_ask_for_more_than_they_read_hold_bounded_memory_that_returns() {
    const MIB: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[],
        &[
            ("HUBBUB_SEND_RATE_PER_SEC", "100000"),
            ("HUBBUB_SEND_BURST", "100000"),
            ("HUBBUB_FRAME_RATE_PER_SEC", "100000"),
            ("HUBBUB_FRAME_BURST", "100000"),
        ],
    );
    let pid = server.child.id();
    let alice = server
        .connect(ConnectOptions::guest(server.url(), "alice"))
        .await;
    alice.join("big").await.unwrap();
    let text = "m".repeat(16 * 1024);
    for _ in 0..200 {
        alice.send_text("room:big", &text).await.unwrap();
    }
    // Warm up: the same pages, read.
    for _ in 0..10 {
        let page = alice
            .history("room:big", None, None, Some(200))
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 200);
    }
    let baseline = rss_bytes(pid);

    // Three clients each ask for 300 pages of 200 messages of 16 KiB (about 1 GB of
    // answers) and read none of them; twice.
    let history = |i| format!(r#"{{"type":"history","id":"h{i}","conv":"room:big","limit":200}}"#);
    let mut rounds = Vec::new();
    for round in 0..2 {
        let mut stuck = Vec::new();
        for u in 0..3 {
            let user = format!("greedy{round}{u}");
            let c = server
                .connect(ConnectOptions::guest(server.url(), &user))
                .await;
            c.join("big").await.unwrap();
            c.close().await.unwrap();
            stuck.push(ask_and_never_read(&server.addr, &user, (0..300).map(history)).await);
        }
        // While they sit there, the server holds a bounded amount for each (its queue, the
        // answer being written and the one waiting for room) and serves alice.
        let mut peak = 0;
        for _ in 0..60 {
            peak = peak.max(rss_bytes(pid));
            alice.ping().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(stuck);
        // Wait until the server has let go of them.
        let mut presence = false;
        for _ in 0..100 {
            let users: Vec<String> = (0..3).map(|u| format!("greedy{round}{u}")).collect();
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            presence = alice.presence(&users).await.unwrap().values().any(|&on| on);
            if !presence {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!presence, "the server kept the greedy sessions");
        let after = rss_bytes(pid);
        eprintln!(
            "round {round}: rss baseline {} MiB, peak {} MiB, after {} MiB",
            baseline / MIB,
            peak / MIB,
            after / MIB
        );
        rounds.push((peak, after));
    }
    // The bound: a few tens of MiB for three such clients (about 25 MiB each), not a
    // gigabyte.
    for (peak, _) in &rounds {
        assert!(
            *peak < baseline + 112 * MIB,
            "RSS {peak} grew far beyond the baseline {baseline}"
        );
    }
    // glibc's malloc keeps much of what was freed for reuse rather than returning it
    // (BENCHMARKS.md has the numbers): the second round reuses it and does not grow.
    let (first, second) = (rounds[0].1, rounds[1].1);
    assert!(
        second < first + 32 * MIB && second < baseline + 128 * MIB,
        "RSS after the second round {second} grew beyond the first {first}"
    );
    alice.ping().await.unwrap();
}

/// Three cluster nodes (one PostgreSQL, one Redis); senders on the first two, a watcher
/// on the third. The first node is killed with -9 under load: its users go offline for
/// the others within 15 s. It is started again and its senders go on through it (the
/// message each was sending when it died retried with its id). The watcher, which heard
/// the room through its own node all along, got every stored message once and in order
/// (the last ones after a `sync`), and every acked message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_cluster_node_loses_nothing_and_its_users_go_offline() {
    let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
        .await
        .unwrap();
    let redis = tokio::task::spawn_blocking(hubbub_testkit::RedisServer::start)
        .await
        .unwrap();
    let (store, bus) = (pg.create_database(), redis.url());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |dir: &Path| {
        Server::start_with(
            dir,
            "127.0.0.1:0",
            &["--store", &store, "--bus", &bus],
            &[
                ("HUBBUB_SEND_RATE_PER_SEC", "100000"),
                ("HUBBUB_SEND_BURST", "100000"),
                (
                    "HUBBUB_JWT_SECRET",
                    "the secret of the test cluster, 32+ bytes",
                ),
            ],
        )
    };
    let mut nodes: Vec<Server> = dirs.iter().map(|d| start(d.path())).collect();
    let mut watcher = nodes[2]
        .connect(ConnectOptions::guest(nodes[2].url(), "watcher"))
        .await;
    watcher.join("load").await.unwrap();
    let tasks = two_senders_each(&nodes[..2]);
    let mut pushed: Vec<u64> = Vec::new();
    while pushed.len() < 60 {
        match watcher
            .wait_for(Duration::from_secs(30), |f| {
                matches!(f, ServerFrame::Message(_))
            })
            .await
        {
            Ok(ServerFrame::Message(m)) => pushed.push(m.seq),
            other => panic!("the watcher heard {other:?}"),
        }
    }
    nodes[0].signal("-KILL");
    let _ = nodes[0].child.wait();
    // The dead node's senders go offline for the watcher, by expiry of its key.
    let killed_at = Instant::now();
    for user in ["n0s0", "n0s1"] {
        let left = Duration::from_secs(15).saturating_sub(killed_at.elapsed());
        let deadline = Instant::now() + left;
        loop {
            let online = watcher.presence(&[user]).await.unwrap();
            if online.get(user) == Some(&false) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{user} still online 15 s after its node died"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The first node is started again; its senders go on through it, retrying the
    // message they were sending with its id. The watcher hears them again.
    let mut tasks = tasks;
    let stopped = sender_logs(tasks.drain(..2).collect()).await;
    nodes[0] = start(dirs[0].path());
    let url = nodes[0].url();
    tasks.extend(
        stopped
            .into_iter()
            .enumerate()
            .map(|(i, log)| tokio::spawn(send_until_failure(url.clone(), format!("n0s{i}"), log))),
    );
    let mut heard_again = 0;
    while heard_again < 20 {
        match watcher
            .wait_for(Duration::from_secs(30), |f| {
                matches!(f, ServerFrame::Message(_))
            })
            .await
        {
            Ok(ServerFrame::Message(m)) => {
                heard_again += usize::from(m.from.starts_with("n0"));
                pushed.push(m.seq);
            }
            other => panic!("the watcher heard {other:?}"),
        }
    }
    for node in &mut nodes[..2] {
        node.signal("-KILL");
        let _ = node.child.wait();
    }
    let logs = sender_logs(tasks).await;
    // What was pushed, then what a sync from the last pushed seq adds.
    while let Ok(ServerFrame::Message(m)) = watcher
        .wait_for(Duration::from_millis(500), |f| {
            matches!(f, ServerFrame::Message(_))
        })
        .await
    {
        pushed.push(m.seq);
    }
    let last_pushed = *pushed.last().unwrap();
    let rest = watcher
        .sync(
            std::collections::BTreeMap::from([("room:load".to_string(), last_pushed)]),
            Some(1000),
        )
        .await
        .unwrap();
    pushed.extend(rest.messages.iter().map(|m| m.seq));
    let acked = check_store(&nodes[2], &logs).await;
    assert!(acked > 60, "the load was real: {acked} acked");
    let stored = rest.cursors["room:load"];
    assert_eq!(
        pushed,
        (1..=stored).collect::<Vec<_>>(),
        "the watcher holds every stored message once, in order"
    );
    drop(nodes);
    drop(redis);
    drop(pg);
}

/// Sends into `room:load` as `user` through `urls` in turn until `stop`: when its node
/// dies it goes on through the next one, retrying the message it was sending with its
/// id. Bounded by `limit`.
async fn send_with_failover(
    urls: Vec<String>,
    user: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    limit: Instant,
) -> SenderLog {
    let mut log = SenderLog::default();
    for attempt in 0.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > limit {
            break;
        }
        let url = urls[attempt % urls.len()].clone();
        let Ok(Ok(client)) = tokio::time::timeout(
            WAIT,
            Client::connect(ConnectOptions::guest(url, user.clone())),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if client.join("load").await.is_err() {
            continue;
        }
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && Instant::now() < limit
            && log.send_one(&client, &user).await
        {}
    }
    // The message in flight when it stopped: sent once more, so that every id it
    // used is either acked or never stored.
    for url in &urls {
        if log.unsure.is_none() {
            break;
        }
        if let Ok(client) = Client::connect(ConnectOptions::guest(url.clone(), user.clone())).await
        {
            log.send_one(&client, &user).await;
        }
    }
    log.unsure = None;
    log
}

/// Three nodes of a cluster, each with two senders and a watching client library
/// `Session` that knows the other nodes. Three times, a node chosen at random is killed
/// with SIGKILL at a random moment and started again (on its address) 2 s later:
/// its senders and its watcher fail over to other nodes at once and go on. In the
/// end every watcher was handed every stored message once and in order (pushed, or
/// caught up by `sync` after its failover), and every acked message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fail_over_to_other_nodes_while_nodes_are_killed_and_miss_nothing() {
    let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
        .await
        .unwrap();
    let redis = tokio::task::spawn_blocking(hubbub_testkit::RedisServer::start)
        .await
        .unwrap();
    let (store, bus) = (pg.create_database(), redis.url());
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |dir: &Path, bind: &str| {
        Server::start_with(
            dir,
            bind,
            &["--store", &store, "--bus", &bus],
            &[
                ("HUBBUB_SEND_RATE_PER_SEC", "100000"),
                ("HUBBUB_SEND_BURST", "100000"),
                (
                    "HUBBUB_JWT_SECRET",
                    "the secret of the test cluster, 32+ bytes",
                ),
            ],
        )
    };
    let mut nodes: Vec<Server> = dirs
        .iter()
        .map(|d| start(d.path(), "127.0.0.1:0"))
        .collect();
    let urls: Vec<String> = nodes.iter().map(Server::url).collect();
    // Starting at node n, then the others in order.
    let from = |n: usize| -> Vec<String> { (0..3).map(|i| urls[(n + i) % 3].clone()).collect() };

    // Watchers: one per node, each a Session that may fail over to the others.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut watchers = Vec::new();
    for n in 0..3 {
        let mut order = from(n);
        let opts = ConnectOptions {
            fallback_urls: order.split_off(1),
            ..ConnectOptions::guest(order[0].clone(), format!("watcher{n}"))
        };
        let mut session = hubbub_client::Session::connect(opts).await.unwrap();
        session.client().unwrap().join("load").await.unwrap();
        session.follow("room:load", 0);
        let stop = stop.clone();
        watchers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut urls = vec![session.url().to_string()];
            let limit = Instant::now() + Duration::from_secs(120);
            // Until told to stop, then until nothing came for 3 s.
            let mut quiet_since = Instant::now();
            while Instant::now() < limit {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    && quiet_since.elapsed() > Duration::from_secs(3)
                {
                    break;
                }
                match session.next(Duration::from_millis(100)).await {
                    Ok(hubbub_client::SessionEvent::Frame(ServerFrame::Message(m))) => {
                        seqs.push(m.seq);
                        quiet_since = Instant::now();
                    }
                    Ok(hubbub_client::SessionEvent::Reconnected { .. }) => {
                        urls.push(session.url().to_string());
                        quiet_since = Instant::now();
                    }
                    Ok(_) | Err(hubbub_client::ClientError::Timeout) => {}
                    Err(e) => panic!("watcher{n}: {e}"),
                }
            }
            (seqs, urls)
        }));
    }

    let limit = Instant::now() + Duration::from_secs(90);
    let senders: Vec<_> = (0..3)
        .flat_map(|n| {
            let (from, stop) = (from(n), stop.clone());
            (0..2).map(move |i| {
                tokio::spawn(send_with_failover(
                    from.clone(),
                    format!("n{n}s{i}"),
                    stop.clone(),
                    limit,
                ))
            })
        })
        .collect();

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut random = move |below: u64| {
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    for round in 0..3 {
        let victim = random(3) as usize;
        let pause = 300 + random(1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        nodes[victim].signal("-KILL");
        let _ = nodes[victim].child.wait();
        println!("round {round}: node {victim} killed after {pause} ms");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let bind = nodes[victim].addr.to_string();
        nodes[victim] = start(dirs[victim].path(), &bind);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut logs = Vec::new();
    for s in senders {
        logs.push(
            tokio::time::timeout(Duration::from_secs(60), s)
                .await
                .expect("sender stops")
                .unwrap(),
        );
    }
    let acked = check_store(&nodes[0], &logs).await;
    assert!(acked > 100, "the load was real: {acked} acked");
    let stored = nodes[0]
        .connect(ConnectOptions::guest(nodes[0].url(), "auditor"))
        .await
        .history("room:load", None, None, Some(1))
        .await
        .unwrap()
        .messages[0]
        .seq;
    let mut failovers = 0;
    for (n, w) in watchers.into_iter().enumerate() {
        let (seqs, urls) = w.await.unwrap();
        assert_eq!(
            seqs,
            (1..=stored).collect::<Vec<_>>(),
            "watcher{n} was handed every stored message once, in order (nodes {urls:?})"
        );
        failovers += urls.windows(2).filter(|w| w[0] != w[1]).count();
    }
    assert!(failovers > 0, "a watcher moved to another node");
    drop(nodes);
    drop(redis);
    drop(pg);
}

/// `--workers 3`: three node processes share one port. Clients connecting to it land on
/// different workers and still chat as on one server; SIGTERM to the parent stops every
/// worker and exits 0, and no worker outlives a parent killed with -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_one_port_and_act_as_one() {
    let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
        .await
        .unwrap();
    let redis = tokio::task::spawn_blocking(hubbub_testkit::RedisServer::start)
        .await
        .unwrap();
    let (store, bus) = (pg.create_database(), redis.url());
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Server::start_with(
            dir.path(),
            "127.0.0.1:0",
            &["--store", &store, "--bus", &bus, "--workers", "3"],
            &[(
                "HUBBUB_JWT_SECRET",
                "the secret of the test cluster, 32+ bytes",
            )],
        )
    };
    let mut server = start();
    let workers = children_of(server.child.id());
    assert_eq!(workers.len(), 3, "three workers: {workers:?}");
    // Twelve members, connected one after another: the kernel spreads them over the
    // workers by their ports. Each sends one message; each gets all twelve.
    let mut clients = Vec::new();
    for i in 0..12 {
        let c = server
            .connect(ConnectOptions::guest(server.url(), format!("u{i}")))
            .await;
        c.join("all").await.unwrap();
        clients.push(c);
    }
    let mut own = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        own.push(
            c.send_text("room:all", &format!("from u{i}"))
                .await
                .unwrap()
                .seq,
        );
    }
    // Each gets the other eleven pushed (its own came as the `ok`).
    for (c, own) in clients.iter_mut().zip(own) {
        let mut seqs = Vec::new();
        while seqs.len() < 11 {
            match c
                .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
                .await
            {
                Ok(ServerFrame::Message(m)) => seqs.push(m.seq),
                other => panic!("got {seqs:?}, then {other:?}"),
            }
        }
        let others: Vec<u64> = (1..=12).filter(|s| *s != own).collect();
        assert_eq!(seqs, others);
    }
    // Connections were spread: more than one worker holds some.
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let held: Vec<usize> = workers.iter().map(|p| connections_on(*p, port)).collect();
    assert_eq!(
        held.iter().sum::<usize>(),
        12,
        "every client on a worker: {held:?}"
    );
    let holding = held.iter().filter(|n| **n > 0).count();
    assert!(holding > 1, "all connections on one worker: {held:?}");
    drop(clients);
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    for pid in &workers {
        assert!(!is_running(*pid), "worker {pid} still runs");
    }
    // A parent killed with -9 takes its workers with it.
    let server = start();
    let workers = children_of(server.child.id());
    server.signal("-KILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    while workers.iter().any(|p| is_running(*p)) {
        assert!(Instant::now() < deadline, "workers outlived their parent");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    drop(redis);
    drop(pg);
}

/// The PIDs of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "PID (comm) STATE PPID ...": the fields after the last ')'.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// How many connections to local `port` process `pid` holds (from /proc/net/tcp and the
/// process's descriptors).
fn connections_on(pid: u32, port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // Columns: sl local_address rem_address st ... inode (the tenth).
    let inodes: std::collections::HashSet<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let established = *f.get(3)? == "01";
            (established && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| f.get(9).map(|i| i.to_string()))?
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| {
                        let l = l.to_string_lossy();
                        l.strip_prefix("socket:[")
                            .and_then(|r| r.strip_suffix(']'))
                            .is_some_and(|i| inodes.contains(i))
                    })
                })
                .count()
        })
        .unwrap_or(0)
}
