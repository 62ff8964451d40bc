//! Stories about clients that read slowly or not at all: what they cost the others, what
//! the server keeps for them, and when they are closed.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{unlimited, TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use hubbub_client::{Client, Event};
use hubbub_protocol::ServerFrame;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Raw = WebSocketStream<TcpStream>;

/// The stories here measure time and hold a lot in flight: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A WebSocket client on a socket with a small receive buffer (so that the kernel cannot
/// hide a backlog), as `user` on `device`. It reads only when told to.
async fn raw_client(server: &TestServer, user: &str, device: &str) -> Raw {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let url = format!("{}/ws?user={user}&device={device}", server.url());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("upgrade in time")
        .expect("upgrade");
    ws
}

/// Reads until the close frame (bounded by `limit`); returns its code and reason, and
/// every protocol message seen before it.
async fn read_to_close(ws: &mut Raw, limit: Duration) -> (Option<(u16, String)>, Vec<String>) {
    let mut lines = Vec::new();
    let close = tokio::time::timeout(limit, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => lines.extend(t.as_str().split('\n').map(String::from)),
                Ok(Message::Close(Some(f))) => {
                    return Some((u16::from(f.code), f.reason.to_string()))
                }
                Ok(Message::Close(None)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        None
    })
    .await
    .expect("the connection was not closed in time");
    (close, lines)
}

/// Members of one room who each send `per_member` messages of `size` bytes at once and
/// wait for everyone else's; returns how long until the last member had them all.
async fn exchange(members: &mut [Client], conv: &str, per_member: usize, size: usize) -> Duration {
    let n = members.len();
    let text = "x".repeat(size);
    let started = Instant::now();
    let work = members.iter_mut().map(|c| {
        let text = &text;
        async move {
            let sends =
                futures_util::future::join_all((0..per_member).map(|_| c.send_text(conv, text)));
            for sent in sends.await {
                sent.expect("send");
            }
            let mut got = 0;
            let want = (n - 1) * per_member;
            let deadline = Instant::now() + Duration::from_secs(60);
            while got < want {
                assert!(Instant::now() < deadline, "got {got} of {want} messages");
                match c.next_event(Duration::from_secs(10)).await {
                    Ok(Event::Frame(ServerFrame::Message(m))) if m.conv == conv => got += 1,
                    Ok(Event::Frame(_)) => {}
                    other => panic!("member lost with {got} of {want} messages: {other:?}"),
                }
            }
        }
    });
    futures_util::future::join_all(work).await;
    started.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A member that never reads must not slow the others down. At this scale it used to
/// go worse than slow: the bus shard pushed a whole commit (hundreds of messages) into
/// every member's queue without letting the writers run, and a healthy member's queue
/// overflowed, closing it as a slow consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_slow_the_others_down() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = TestServer::with(unlimited).await;
    // The reported scale: 20 members exchange 5,000 messages of 2 KB, so the one that never
    // reads fills its socket buffers and queue and is closed meanwhile, and the commits
    // carry hundreds of messages each.
    const MEMBERS: usize = 20;
    const PER_MEMBER: usize = 250;
    const SIZE: usize = 2_000;
    const RUNS: usize = 3;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let c = server.connect(&format!("m{i}")).await;
        c.join("busy").await.unwrap();
        members.push(c);
    }
    // Warm up (the room's member cache, the store, the allocator).
    exchange(&mut members, "room:busy", PER_MEMBER / 4, SIZE).await;

    let mut alone = Vec::new();
    let mut beside_a_stuck_one = Vec::new();
    for run in 0..RUNS {
        alone.push(exchange(&mut members, "room:busy", PER_MEMBER, SIZE).await);
        // A member that completes the upgrade and never reads again.
        let user = format!("stuck{run}");
        let stuck_member = server.connect(&user).await;
        stuck_member.join("busy").await.unwrap();
        stuck_member.close().await.unwrap();
        let stuck = raw_client(&server, &user, "d").await;
        eprintln!("run {run}: alone {:?}", alone[run]);
        beside_a_stuck_one.push(exchange(&mut members, "room:busy", PER_MEMBER, SIZE).await);
        eprintln!("run {run}: beside {:?}", beside_a_stuck_one[run]);
        drop(stuck);
    }
    let (alone, beside) = (median(alone), median(beside_a_stuck_one));
    let ratio = beside.as_secs_f64() / alone.as_secs_f64();
    eprintln!("exchange alone {alone:?}, beside a member that never reads {beside:?}: {ratio:.2}x");
    assert!(
        ratio < 1.5,
        "a member that never reads slowed the others down {ratio:.2}x ({alone:?} -> {beside:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_session_whose_queue_is_full_is_closed_with_4001() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = TestServer::with(|c| {
        unlimited(c);
        c.queue_frames = 8;
    })
    .await;
    // Big pages, so that a few answers fill the socket buffers and the rest wait in the
    // queue.
    let alice = server.connect("alice").await;
    alice.join("big").await.unwrap();
    let text = "y".repeat(16_000);
    for _ in 0..20 {
        alice.send_text("room:big", &text).await.unwrap();
    }
    let mut tab = raw_client(&server, "alice", "tab").await;
    const ASKED: usize = 60;
    let frames_before = server.metric("hubbub_frames_in_total").await;
    for i in 0..ASKED {
        let history = format!(r#"{{"type":"history","id":"h{i}","conv":"room:big","limit":20}}"#);
        tab.send(Message::text(history)).await.unwrap();
    }
    // The server read requests until the answers filled the socket and the queue; the
    // last ones are not even read.
    let mut read = 0.0;
    let mut last_change = Instant::now();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline && last_change.elapsed() < Duration::from_millis(500) {
        let now = server.metric("hubbub_frames_in_total").await - frames_before;
        if now != read {
            read = now;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("requests read while the answers were not: {read} of {ASKED}");

    // The same device logs in again (another tab): the old session is replaced.
    let _new_tab = server.connect_device("alice", "tab").await;
    let (close, lines) = read_to_close(&mut tab, Duration::from_secs(20)).await;
    assert_eq!(close, Some((4001, "replaced".to_string())));
    let kicked = lines
        .iter()
        .filter(|l| l.contains(r#""type":"kicked""#))
        .count();
    assert!(kicked <= 1, "kicked {kicked} times");
}

/// Reads a WebSocket at about `bytes_per_sec`: `(close, message frames by conv, ok frames)`.
async fn read_throttled(
    ws: &mut Raw,
    bytes_per_sec: f64,
    mut done: impl FnMut(&HashMap<String, Vec<u64>>, usize) -> bool,
    limit: Duration,
) -> (Option<(u16, String)>, HashMap<String, Vec<u64>>, usize) {
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut oks = 0;
    let deadline = started + limit;
    let close = loop {
        if done(&seen, oks) {
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "the reader did not finish in time"
        );
        let msg = match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(_))) | Ok(None) => break Some((0, "connection lost".into())),
            Err(_) => panic!("nothing to read for {WAIT:?}"),
        };
        match msg {
            Message::Text(t) => {
                bytes += t.len();
                for line in t.as_str().split('\n') {
                    let v: serde_json::Value = serde_json::from_str(line).unwrap();
                    match v["type"].as_str() {
                        Some("message") => seen
                            .entry(v["conv"].as_str().unwrap().to_string())
                            .or_default()
                            .push(v["seq"].as_u64().unwrap()),
                        Some("ok") => oks += 1,
                        _ => {}
                    }
                }
            }
            Message::Close(f) => {
                break Some(f.map_or((0, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                }))
            }
            _ => {}
        }
        // Keep to the rate: wait until the bytes read so far are due.
        let due = started + Duration::from_secs_f64(bytes as f64 / bytes_per_sec);
        tokio::time::sleep_until(due.into()).await;
    };
    (close, seen, oks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_catching_up_a_large_backlog_is_not_closed_and_gets_it_all_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let server = TestServer::with(unlimited).await;
    const ROOMS: usize = 8;
    const PER_ROOM: u64 = 1_000;
    // One live message every 100 ms while it catches up (8 MB at 1 MB/s).
    const LIVE: u64 = 60;
    let alice = server.connect("alice").await;
    let reader = server.connect("reader").await;
    for r in 0..ROOMS {
        alice.join(&format!("r{r}")).await.unwrap();
        reader.join(&format!("r{r}")).await.unwrap();
    }
    alice.join("live").await.unwrap();
    reader.join("live").await.unwrap();
    reader.close().await.unwrap();
    let text = "b".repeat(1_000);
    for r in 0..ROOMS {
        let conv = format!("room:r{r}");
        let sends = (0..PER_ROOM).map(|_| alice.send_text(&conv, &text));
        for sent in futures_util::future::join_all(sends).await {
            sent.unwrap();
        }
    }

    // The reader comes back behind a slow link and catches up.
    let mut ws = raw_client(&server, "reader", "d").await;
    let cursors: serde_json::Map<_, _> = (0..ROOMS)
        .map(|r| (format!("room:r{r}"), serde_json::json!(0)))
        .collect();
    let sync = serde_json::json!({"type": "sync", "id": "s", "cursors": cursors, "limit": 1000});
    ws.send(Message::text(sync.to_string())).await.unwrap();
    // Live messages meanwhile, in a room it does not sync.
    let live = async {
        let mut sent = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while sent < LIVE && Instant::now() < deadline {
            tick.tick().await;
            alice.send_text("room:live", "live").await.unwrap();
            sent += 1;
        }
        sent
    };
    let want = ROOMS as u64 * PER_ROOM;
    let live_wanted = LIVE as usize;
    let read = read_throttled(
        &mut ws,
        1_000_000.0,
        |seen, oks| {
            let replayed: usize = seen
                .iter()
                .filter(|(c, _)| c.as_str() != "room:live")
                .map(|(_, v)| v.len())
                .sum();
            oks >= 1
                && replayed as u64 >= want
                && seen.get("room:live").map_or(0, Vec::len) >= live_wanted
        },
        Duration::from_secs(60),
    );
    let (sent_live, (close, seen, oks)) = tokio::join!(live, read);
    assert_eq!(close, None, "the reader was closed");
    assert_eq!(oks, 1);
    for r in 0..ROOMS {
        let seqs = &seen[&format!("room:r{r}")];
        assert_eq!(*seqs, (1..=PER_ROOM).collect::<Vec<_>>(), "room r{r}");
    }
    assert_eq!(seen["room:live"], (1..=sent_live).collect::<Vec<_>>());
}
