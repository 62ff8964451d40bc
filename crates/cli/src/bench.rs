//! `hubbub bench`: a load generator that measures a running server as clients feel it.
//!
//! It speaks the wire protocol with raw WebSocket frames (no client-side queues in the
//! way), reads server memory from `/proc/<pid>/status` when given `--server-pid`, and
//! prints one JSON line per run followed by a readable summary. Loopback targets only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Server base URL (loopback only), e.g. ws://127.0.0.1:8080
    #[arg(long, default_value = "ws://127.0.0.1:8080", global = true)]
    url: String,
    /// PID of the server process, to read its memory and CPU time.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Open N idle connections and report the server's memory per connection.
    Idle {
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Connections opened per second.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Seconds to hold them open after the last one connected.
        #[arg(long, default_value_t = 2)]
        hold: u64,
    },
    /// One room: S senders pipelining sends, M members receiving; acked messages/s.
    Room {
        /// Sending connections.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Extra receiving members.
        #[arg(long, default_value_t = 0)]
        members: usize,
        /// Sends in flight per sender.
        #[arg(long, default_value_t = 32)]
        inflight: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    check_loopback(&args.url)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        match args.scenario {
            Scenario::Idle { conns, rate, hold } => {
                idle(&args.url, args.server_pid, conns, rate, hold).await
            }
            Scenario::Room {
                senders,
                members,
                inflight,
                duration,
                size,
            } => {
                room(
                    &args.url,
                    args.server_pid,
                    senders,
                    members,
                    inflight,
                    duration,
                    size,
                )
                .await
            }
        }
    })
}

fn check_loopback(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("ws://")
        .context("the bench URL must start with ws://")?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let ok = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !ok {
        bail!("hubbub bench only targets loopback addresses, got {host:?}");
    }
    Ok(())
}

/// Resident memory of a process in bytes, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, user: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/ws?user={user}"))
        .await
        .with_context(|| format!("connecting {user}"))?;
    // Wait for the welcome.
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains(r#""type":"welcome""#) => Ok(ws),
        other => bail!("no welcome for {user}: {other:?}"),
    }
}

async fn idle(
    url: &str,
    pid: Option<u32>,
    conns: usize,
    rate: u32,
    hold: u64,
) -> anyhow::Result<()> {
    let before = pid.and_then(rss_bytes);
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tasks = Vec::with_capacity(conns);
    let failures = Arc::new(AtomicU64::new(0));
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut ticker = tokio::time::interval(interval);
    for i in 0..conns {
        ticker.tick().await;
        let url = url.to_string();
        let failures = failures.clone();
        let mut stop = stop_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            match connect(&url, &format!("idle{i}")).await {
                Ok(mut ws) => {
                    // Keep reading so pings are answered, until told to stop.
                    loop {
                        tokio::select! {
                            _ = stop.recv() => break,
                            m = ws.next() => if m.is_none() { break },
                        }
                    }
                    let _ = ws.close(None).await;
                    true
                }
                Err(e) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect failed: {e:#}");
                    }
                    false
                }
            }
        }));
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = pid.and_then(rss_bytes);
    let _ = stop_tx.send(());
    for t in tasks {
        let _ = t.await;
    }
    let failed = failures.load(Ordering::Relaxed);
    let open = conns as u64 - failed;
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if open > 0 => Some((a.saturating_sub(b)) as f64 / open as f64),
        _ => None,
    };
    let out = json!({
        "scenario": "idle", "conns": conns, "failed": failed, "connect_secs": connect_secs,
        "rss_before": before, "rss_after": after, "bytes_per_conn": per_conn,
    });
    println!("{out}");
    println!(
        "idle: {open} connections open ({failed} failed) in {connect_secs:.1}s; server RSS {} -> {}; {} bytes per connection",
        before.map_or("?".into(), |b| b.to_string()),
        after.map_or("?".into(), |a| a.to_string()),
        per_conn.map_or("?".into(), |p| format!("{p:.0}")),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn room(
    url: &str,
    pid: Option<u32>,
    senders: usize,
    members: usize,
    inflight: usize,
    duration: u64,
    size: usize,
) -> anyhow::Result<()> {
    let run_id = std::process::id();
    let room = format!("bench{run_id}");
    let conv = format!("room:{room}");
    let delivered = Arc::new(AtomicU64::new(0));
    // Receivers.
    let mut receivers = Vec::new();
    for i in 0..members {
        let mut ws = connect(url, &format!("r{run_id}x{i}")).await?;
        join(&mut ws, &room).await?;
        let delivered = delivered.clone();
        receivers.push(tokio::spawn(async move {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    let n = t.as_str().matches(r#""type":"message""#).count() as u64;
                    delivered.fetch_add(n, Ordering::Relaxed);
                }
            }
        }));
    }
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
    ));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let payload = "x".repeat(size);
    let cpu_before = pid.and_then(cpu_seconds);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(duration);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let mut ws = connect(url, &format!("s{run_id}x{s}")).await?;
        join(&mut ws, &room).await?;
        let (hist, acked, errors) = (hist.clone(), acked.clone(), errors.clone());
        let (conv, payload) = (conv.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let mut sent_at = std::collections::HashMap::new();
            let mut next = 0u64;
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
            loop {
                let now = Instant::now();
                if now < deadline {
                    while sent_at.len() < inflight {
                        let frame = format!(
                            r#"{{"type":"send","id":{next},"conv":"{conv}","client_msg_id":"b{run_id}-{s}-{next}","content_type":"text","content":"{payload}"}}"#
                        );
                        if tx.send(Message::text(frame)).await.is_err() {
                            return;
                        }
                        sent_at.insert(next, Instant::now());
                        next += 1;
                    }
                } else if sent_at.is_empty() {
                    break;
                }
                let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), rx.next()).await else {
                    break;
                };
                let Message::Text(text) = msg else { continue };
                for line in text.as_str().split('\n') {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                    let Some(id) = v["id"].as_u64() else { continue };
                    let Some(t0) = sent_at.remove(&id) else { continue };
                    if v["type"] == "ok" {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if let Some(h) = local.as_mut() {
                            let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Some(h) = local {
                let _ = hist.lock().await.add(h);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    // Give receivers a moment to drain what is in flight.
    let total = acked.load(Ordering::Relaxed);
    let want = total * members as u64;
    let drain_until = Instant::now() + Duration::from_secs(5);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in receivers {
        r.abort();
    }
    let h = hist.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let out = json!({
        "scenario": "room", "senders": senders, "members": members, "inflight": inflight,
        "size": size, "secs": secs, "acked": total, "errors": errors.load(Ordering::Relaxed),
        "acked_per_sec": total as f64 / secs,
        "ack_ms": {"p50": ms(0.5), "p99": ms(0.99), "max": h.max() as f64 / 1000.0},
        "delivered": delivered.load(Ordering::Relaxed), "server_cpu_secs": cpu,
    });
    println!("{out}");
    println!(
        "room: {senders} senders x {inflight} in flight, {members} receivers, {secs:.1}s: {total} acked ({:.0}/s), ack p50 {:.2} ms p99 {:.2} ms max {:.2} ms; {} deliveries; server CPU {}",
        total as f64 / secs,
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0,
        delivered.load(Ordering::Relaxed),
        cpu.map_or("?".into(), |c| format!("{c:.2}s")),
    );
    Ok(())
}

async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    ws.send(Message::text(format!(
        r#"{{"type":"join","id":"join","room":"{room}"}}"#
    )))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.as_str().contains(r#""id":"join""#) {
                    if t.as_str().contains(r#""type":"ok""#) {
                        return Ok(());
                    }
                    bail!("join refused: {t}");
                }
            }
            Ok(Some(Ok(_))) => {}
            other => bail!("join failed: {other:?}"),
        }
    }
    bail!("join timed out")
}
