//! A flood of registrations against the real server (in this process, so its memory is
//! this process's): password hashing stays bounded in concurrency and memory, and other
//! users' sends stay fast meanwhile. Its own test binary, so no other test's memory mixes
//! in.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, metric, TestServer};
use serde_json::json;

/// Resident memory of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Send-to-`ok` times of `n` messages, in order.
async fn send_times(c: &hubbub_client::Client, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        c.send_text("room:lobby", &format!("m{i}"))
            .await
            .expect("send");
        times.push(t.elapsed());
    }
    times
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_flood_keeps_hashing_bounded_and_other_users_sends_fast() {
    let server = TestServer::with(|c| {
        // One address floods here: lift its rate limit to reach the hashing bound.
        c.auth_rate_per_min = 1_000_000;
        c.auth_burst = 1_000_000;
        c.send_rate_per_sec = 100_000;
        c.send_burst = 100_000;
        // Alice sends back to back for as long as the flood lasts: however fast that
        // is, her frames must not meet the frame limit either.
        c.frame_rate_per_sec = 100_000;
        c.frame_burst = 100_000;
    })
    .await;
    let permits = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1);
    let queue = server.config.hash_queue;
    let alice = server.connect("alice").await;
    alice.join("lobby").await.unwrap();
    let bob = server.connect("bob").await;
    bob.join("lobby").await.unwrap();
    let before = median(send_times(&alice, 50).await);
    let rss_before = rss_bytes();

    const TOTAL: usize = 256;
    const CONCURRENCY: usize = 64;
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, created, busy) = (next.clone(), created.clone(), busy.clone());
            let url = server.http("/api/register");
            tokio::spawn(async move {
                // A request may wait for the whole queue ahead of it.
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        break;
                    }
                    let r = http
                        .post(&url)
                        .json(
                            &json!({"username": format!("flood{i}"), "password": "correct horse"}),
                        )
                        .send()
                        .await
                        .expect("register");
                    match r.status().as_u16() {
                        201 => created.fetch_add(1, Ordering::Relaxed),
                        503 => {
                            assert!(r.headers().get("retry-after").is_some());
                            busy.fetch_add(1, Ordering::Relaxed)
                        }
                        other => panic!("unexpected status {other}"),
                    };
                }
            })
        })
        .collect();

    // Meanwhile: memory, concurrent hashes, and another user's sends.
    let sampler = {
        let done = done.clone();
        let metrics_url = server.http("/metrics");
        tokio::spawn(async move {
            let http = http();
            let (mut rss_max, mut active_max, mut waiting_max) = (0u64, 0f64, 0f64);
            let mut every = tokio::time::interval(Duration::from_millis(5));
            for _ in 0..100_000 {
                every.tick().await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                rss_max = rss_max.max(rss_bytes());
                let text = http
                    .get(&metrics_url)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                active_max = active_max.max(metric(&text, "hubbub_password_hashes_active"));
                waiting_max = waiting_max.max(metric(&text, "hubbub_password_hashes_waiting"));
            }
            (rss_max, active_max, waiting_max)
        })
    };
    let sender = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut times = Vec::new();
            for i in 0..10_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                alice
                    .send_text("room:lobby", &format!("during {i}"))
                    .await
                    .expect("send");
                times.push(t.elapsed());
            }
            times
        })
    };
    let started = Instant::now();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("the flood ends in time")
            .expect("worker");
    }
    let flood_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (rss_max, active_max, waiting_max) = sampler.await.unwrap();
    let during = sender.await.unwrap();
    let worst = during.iter().max().copied().unwrap_or_default();
    let sends = during.len();
    let during_median = median(during);
    let (created, busy) = (
        created.load(Ordering::Relaxed),
        busy.load(Ordering::Relaxed),
    );
    let bound = (permits as u64) * hubbub_server::auth::HASH_MEMORY_BYTES as u64;
    eprintln!(
        "flood of {TOTAL} registrations at concurrency {CONCURRENCY} took {flood_time:?}: \
         {created} created, {busy} refused with 503; hashes at once <= {active_max} \
         (permits {permits}), waiting <= {waiting_max} (queue {queue}); RSS {} MiB before, \
         {} MiB at most during (bound of the hashes: {} MiB); sends: median {before:?} \
         before, {during_median:?} during (worst {worst:?}, {sends} sends)",
        rss_before >> 20,
        rss_max >> 20,
        bound >> 20,
    );
    assert!(created >= 1, "no registration got through");
    assert!(busy >= 1, "the wait queue never filled");
    assert!(active_max <= permits as f64, "{active_max} hashes at once");
    assert!(waiting_max <= queue as f64, "{waiting_max} waiting");
    // The hashes' own memory plus room for the requests in flight.
    assert!(
        rss_max.saturating_sub(rss_before) <= bound + 96 * 1024 * 1024,
        "RSS grew from {} MiB to {} MiB",
        rss_before >> 20,
        rss_max >> 20
    );
    assert!(sends >= 5, "too few sends measured: {sends}");
    assert!(
        during_median < Duration::from_millis(100),
        "sends slowed to {during_median:?} (from {before:?})"
    );
    drop(bob);
}
