//! A worker process: opens its share of the connections, waits for `GO`, runs its part
//! of the scenario and prints its [`Report`].

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use super::conn::{self, Dialer, Target, Ws};
use super::report::{histogram, now_us, to_pairs, Report};
use super::{Load, Scenario};

/// How often a receiving connection that heard nothing checks again whether it is done.
const RECHECK: Duration = Duration::from_millis(50);

/// Connections set up at once by one worker (fanout and dm).
const SETUP_CONCURRENCY: usize = 64;

pub(super) fn worker(
    scenario: &Scenario,
    dialer: Dialer,
    index: usize,
    procs: usize,
    run_id: &str,
) -> anyhow::Result<()> {
    conn::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let ctx = Ctx {
        dialer,
        index,
        procs,
        run_id: run_id.to_string(),
    };
    let report = rt.block_on(async move {
        let mut ctl = Control::new();
        match scenario.clone() {
            Scenario::Idle { conns, rate, .. } => idle(&ctx, &mut ctl, conns, rate).await,
            Scenario::Connect { conns, concurrency } => {
                connect(&ctx, &mut ctl, conns, concurrency).await
            }
            Scenario::Fanout {
                members,
                senders,
                rate,
                load,
                drain,
            } => {
                fanout(
                    &ctx,
                    &mut ctl,
                    members,
                    Plan::new(senders, rate, load, drain),
                )
                .await
            }
            Scenario::Floor(_) | Scenario::Disk(_) => {
                bail!("floor and disk run in the parent process")
            }
            Scenario::Dm { pairs, rate, load } => {
                let plan = Plan {
                    schedules: pairs * 2,
                    ..Plan::new(0, rate, load, 10.0)
                };
                dm(&ctx, &mut ctl, pairs, plan).await
            }
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

struct Ctx {
    dialer: Dialer,
    index: usize,
    procs: usize,
    run_id: String,
}

impl Ctx {
    /// This worker's part of `0..total`.
    fn share(&self, total: usize) -> Range<usize> {
        total * self.index / self.procs..total * (self.index + 1) / self.procs
    }

    fn hubbub(&self) -> bool {
        self.dialer.target == Target::Hubbub
    }
}

/// The READY / GO handshake with the parent over stdout and stdin.
struct Control {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
}

impl Control {
    fn new() -> Control {
        Control {
            lines: tokio::io::BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    /// Says READY and waits for `GO <start µs>`; returns the start as an `Instant`.
    async fn ready(&mut self) -> anyhow::Result<(u64, Instant)> {
        println!("READY");
        let line = self
            .lines
            .next_line()
            .await?
            .context("the bench parent went away")?;
        let start_us: u64 = line
            .strip_prefix("GO ")
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("expected GO, got {line:?}"))?;
        Ok((start_us, instant_of(start_us)))
    }
}

/// The `Instant` of a wall-clock time in µs since the epoch.
fn instant_of(us: u64) -> Instant {
    let now = now_us();
    if us >= now {
        Instant::now() + Duration::from_micros(us - now)
    } else {
        Instant::now() - Duration::from_micros(now - us)
    }
}

fn note_failure(report: &Mutex<Report>, e: &conn::ConnectError) {
    let mut r = report.lock().expect("report lock");
    if r.failures.values().sum::<u64>() < 3 {
        eprintln!("bench: connect failed ({}): {:#}", e.cause, e.error);
    }
    r.fail(e.cause);
}

// ---------------------------------------------------------------------------------------
// idle and connect

async fn idle(ctx: &Ctx, ctl: &mut Control, conns: usize, rate: u32) -> anyhow::Result<Report> {
    let share = ctx.share(conns);
    let rate = (f64::from(rate.max(1)) / ctx.procs as f64).max(1.0);
    let report = Arc::new(Mutex::new(Report::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut holders = Vec::with_capacity(share.len());
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(1024);
    for i in share.clone() {
        ticker.tick().await;
        let dialer = ctx.dialer.clone();
        let name = format!("b{}i{i}", ctx.run_id);
        let (report, mut stop, opened) = (report.clone(), stop_rx.clone(), opened_tx.clone());
        holders.push(tokio::spawn(async move {
            let mut ws = match dialer.connect(i, &name).await {
                Ok(ws) => ws,
                Err(e) => {
                    note_failure(&report, &e);
                    let _ = opened.send(()).await;
                    return;
                }
            };
            report.lock().expect("report lock").connected += 1;
            let _ = opened.send(()).await;
            drop(opened);
            // Keep reading so that pings are answered, until told to stop.
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    m = ws.next() => if !matches!(m, Some(Ok(_))) {
                        report.lock().expect("report lock").closed += 1;
                        return;
                    },
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }));
    }
    drop(opened_tx);
    for _ in share {
        opened_rx.recv().await;
    }
    ctl.ready().await?;
    let _ = stop_tx.send(true);
    for h in holders {
        let _ = h.await;
    }
    let mut r = std::mem::take(&mut *report.lock().expect("report lock"));
    r.end_us = now_us();
    Ok(r)
}

async fn connect(
    ctx: &Ctx,
    ctl: &mut Control,
    conns: usize,
    concurrency: usize,
) -> anyhow::Result<Report> {
    let share = ctx.share(conns);
    let concurrency = (concurrency / ctx.procs).max(1);
    let (_, start) = ctl.ready().await?;
    tokio::time::sleep_until(start.into()).await;
    let opened: Vec<_> = futures_util::stream::iter(share)
        .map(|i| {
            let name = format!("b{}c{i}", ctx.run_id);
            async move {
                let t0 = Instant::now();
                let res = ctx.dialer.connect(i, &name).await;
                (res, t0.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let end_us = now_us();
    let mut r = Report {
        end_us,
        ..Report::default()
    };
    let mut h = histogram();
    let mut sockets = Vec::new();
    for (res, took) in opened {
        match res {
            Ok(ws) => {
                r.connected += 1;
                let _ = h.record(took.as_micros().max(1) as u64);
                sockets.push(ws);
            }
            Err(e) => {
                if r.failures.values().sum::<u64>() < 3 {
                    eprintln!("bench: connect failed ({}): {:#}", e.cause, e.error);
                }
                r.fail(e.cause);
            }
        }
    }
    r.connect_latency = to_pairs(&h);
    futures_util::stream::iter(sockets)
        .for_each_concurrent(256, |mut ws| async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        })
        .await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// fanout and dm

/// How senders send.
#[derive(Debug, Clone, Copy)]
struct Plan {
    senders: usize,
    /// Messages per second per sender; 0 for closed loop.
    rate: f64,
    inflight: usize,
    duration: f64,
    size: usize,
    drain: f64,
    /// How many connections send (for spreading their schedules), and whether they send
    /// in step.
    schedules: usize,
    in_step: bool,
}

impl Plan {
    fn new(senders: usize, rate: f64, load: Load, drain: f64) -> Plan {
        let Load {
            inflight,
            duration,
            size,
            in_step,
        } = load;
        Plan {
            senders,
            rate,
            inflight,
            duration,
            size,
            drain,
            schedules: senders.max(1),
            in_step,
        }
    }

    /// The start of sending connection `i`'s schedule: `start_us`, shifted by its share
    /// of one interval unless the senders go in step.
    fn start_of(&self, start_us: u64, i: usize) -> u64 {
        if self.in_step || self.rate <= 0.0 {
            return start_us;
        }
        let interval_us = 1e6 / self.rate;
        start_us + (interval_us * (i % self.schedules) as f64 / self.schedules as f64) as u64
    }

    /// Messages per sender at a fixed rate (None in closed loop).
    fn fixed_count(&self) -> Option<u64> {
        (self.rate > 0.0).then(|| (self.rate * self.duration).round() as u64)
    }

    /// When message `k` is due, in µs since the epoch.
    fn due_us(&self, start_us: u64, k: u64) -> u64 {
        start_us + (k as f64 * 1e6 / self.rate) as u64
    }
}

/// The text a message carries: `~B<sender>.<k>.<due µs>~` and padding up to `size`.
fn payload(sender: usize, k: u64, due_us: u64, size: usize) -> String {
    let mut s = format!("~B{sender}.{k}.{due_us}~");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Finds a payload marker in one received line: (sender, k, due µs).
fn parse_marker(line: &str) -> Option<(usize, u64, u64)> {
    let at = line.find("~B")?;
    let rest = &line[at + 2..];
    let end = rest.find('~')?;
    let mut parts = rest[..end].split('.');
    let s = parts.next()?.parse().ok()?;
    let k = parts.next()?.parse().ok()?;
    let due = parts.next()?.parse().ok()?;
    Some((s, k, due))
}

/// The numeric `id` of a hubbub `ok` line.
fn ok_id(line: &str) -> Option<u64> {
    let rest = &line[line.find(r#""id":"#)? + 5..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What one sending connection shares between its send loop and its receive loop.
struct SendState {
    sent: AtomicU64,
    acked: AtomicU64,
    done: AtomicBool,
    /// Closed loop: free places in the window.
    window: Semaphore,
    /// Closed loop: when send `id` went out, at `id % len`.
    sent_at: Vec<AtomicU64>,
}

impl SendState {
    fn new(inflight: usize) -> SendState {
        SendState {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            done: AtomicBool::new(false),
            window: Semaphore::new(inflight),
            sent_at: (0..inflight.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Sends `frame(k, due_us)` on the plan's schedule (or as the window allows) until the
/// count or the time is used up.
async fn send_loop(
    mut sink: SplitSink<Ws, Message>,
    plan: Plan,
    start_us: u64,
    start: Instant,
    state: Arc<SendState>,
    frame: impl Fn(u64, u64) -> String,
) -> SplitSink<Ws, Message> {
    let end = start + Duration::from_secs_f64(plan.duration);
    let mut k = 0u64;
    loop {
        let due_us = if let Some(n) = plan.fixed_count() {
            if k >= n {
                break;
            }
            let due = plan.due_us(start_us, k);
            tokio::time::sleep_until(instant_of(due).into()).await;
            due
        } else {
            if Instant::now() >= end {
                break;
            }
            // Bounded by the end of the run: a server that stops answering must not hang
            // the generator.
            let acquired = tokio::time::timeout_at(end.into(), state.window.acquire()).await;
            let Ok(Ok(permit)) = acquired else {
                break;
            };
            permit.forget();
            let now = now_us();
            state.sent_at[k as usize % state.sent_at.len()].store(now, Ordering::Relaxed);
            now
        };
        if sink.send(Message::text(frame(k, due_us))).await.is_err() {
            break;
        }
        k += 1;
        state.sent.store(k, Ordering::Relaxed);
    }
    state.done.store(true, Ordering::Release);
    sink
}

/// One receiving connection's bookkeeping.
struct Receiver {
    /// Per sender, a bitset of the message numbers seen.
    seen: Vec<Vec<u64>>,
    unique: Vec<u64>,
    delivered: u64,
    duplicates: u64,
    errors: u64,
}

impl Receiver {
    fn new(senders: usize) -> Receiver {
        Receiver {
            seen: vec![Vec::new(); senders],
            unique: vec![0; senders],
            delivered: 0,
            duplicates: 0,
            errors: 0,
        }
    }

    /// Records message `k` of sender `s`; false for a duplicate or an unknown sender.
    fn mark(&mut self, s: usize, k: u64) -> bool {
        let Some(bits) = self.seen.get_mut(s) else {
            return false;
        };
        self.delivered += 1;
        let (word, bit) = ((k / 64) as usize, 1u64 << (k % 64));
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        bits[word] |= bit;
        self.unique[s] += 1;
        true
    }
}

/// Shared by all connections of a worker.
struct Shared {
    latency: Mutex<Histogram<u64>>,
    /// dm: send-to-delivery latency (`latency` holds the acks').
    delivery: Mutex<Histogram<u64>>,
    /// Fixed rate: per message (`sender * n + k`), its slowest delivery so far.
    last_delivery: Vec<AtomicU64>,
    errors_logged: AtomicU64,
}

impl Shared {
    fn record(&self, samples: &[u64]) {
        Self::record_in(&self.latency, samples);
    }

    fn record_in(hist: &Mutex<Histogram<u64>>, samples: &[u64]) {
        if samples.is_empty() {
            return;
        }
        let mut h = hist.lock().expect("histogram lock");
        for &v in samples {
            let _ = h.record(v.max(1));
        }
    }

    fn log_error(&self, line: &str) {
        if self.errors_logged.fetch_add(1, Ordering::Relaxed) < 3 {
            eprintln!("bench: server error: {line}");
        }
    }
}

/// What a receive loop does with ack lines.
enum Acks<'a> {
    /// Not a sender (or a broadcast hub, which does not ack).
    None,
    /// Count them and open the window.
    Count(&'a SendState),
    /// Also time them (dm).
    Time(&'a SendState, Plan, u64),
}

/// Reads one connection until `done(receiver)` holds or the deadline passes.
/// Returns whether the server closed the connection.
async fn receive_loop(
    stream: &mut SplitStream<Ws>,
    rx: &mut Receiver,
    shared: &Shared,
    acks: Acks<'_>,
    fixed_count: Option<u64>,
    deadline: Instant,
    done: impl Fn(&Receiver) -> bool,
) -> bool {
    let mut samples = Vec::new();
    let mut deliveries = Vec::new();
    let deadline = tokio::time::Instant::from(deadline);
    while !done(rx) {
        // `done` may wait on other connections (a dm peer's acks), whose progress sends
        // this one nothing: look again now and then.
        let wake = deadline.min(tokio::time::Instant::now() + RECHECK);
        let msg = match tokio::time::timeout_at(wake, stream.next()).await {
            Err(_) if wake < deadline => continue,
            Err(_) => return false,
            Ok(Some(Ok(m))) => m,
            Ok(_) => return true,
        };
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(_) => return true,
            _ => continue,
        };
        let now = now_us();
        for line in text.split('\n') {
            if let Some((s, k, due)) = parse_marker(line) {
                if !rx.mark(s, k) {
                    continue;
                }
                let lat = now.saturating_sub(due);
                if matches!(acks, Acks::Time(..)) {
                    // dm: `latency` times the acks; deliveries have their own.
                    deliveries.push(lat);
                    continue;
                }
                samples.push(lat);
                if let Some(n) = fixed_count {
                    if let Some(slot) = shared.last_delivery.get(s * n as usize + k as usize) {
                        slot.fetch_max(lat, Ordering::Relaxed);
                    }
                }
            } else if line.starts_with(r#"{"type":"ok""#) {
                match &acks {
                    Acks::None => {}
                    Acks::Count(st) => {
                        st.acked.fetch_add(1, Ordering::Relaxed);
                        st.window.add_permits(1);
                    }
                    Acks::Time(st, plan, start_us) => {
                        st.acked.fetch_add(1, Ordering::Relaxed);
                        st.window.add_permits(1);
                        if let Some(id) = ok_id(line) {
                            let sent = if plan.rate > 0.0 {
                                plan.due_us(*start_us, id)
                            } else {
                                st.sent_at[id as usize % st.sent_at.len()].load(Ordering::Relaxed)
                            };
                            samples.push(now.saturating_sub(sent));
                        }
                    }
                }
            } else if line.starts_with(r#"{"type":"error""#) {
                rx.errors += 1;
                shared.log_error(line);
            }
        }
        shared.record(&samples);
        samples.clear();
        Shared::record_in(&shared.delivery, &deliveries);
        deliveries.clear();
    }
    false
}

/// Opens the connections `range` (named by `name(i)`), joining `room` on hubbub.
async fn open_all(
    ctx: &Ctx,
    range: Range<usize>,
    name: impl Fn(usize) -> String,
    room: Option<&str>,
    report: &Mutex<Report>,
) -> Vec<(usize, Ws)> {
    let opened: Vec<_> = futures_util::stream::iter(range)
        .map(|i| {
            let user = name(i);
            async move {
                let mut ws = ctx.dialer.connect(i, &user).await?;
                if let Some(room) = room {
                    join(&mut ws, room)
                        .await
                        .map_err(|error| conn::ConnectError {
                            cause: "join",
                            error,
                        })?;
                }
                Ok::<_, conn::ConnectError>((i, ws))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::new();
    for res in opened {
        match res {
            Ok(pair) => {
                report.lock().expect("report lock").connected += 1;
                out.push(pair);
            }
            Err(e) => note_failure(report, &e),
        }
    }
    out
}

async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    ws.send(Message::text(format!(
        r#"{{"type":"join","id":"j","room":"{room}"}}"#
    )))
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("join timed out")?;
        let Some(Ok(Message::Text(t))) = msg else {
            if matches!(msg, Some(Ok(_))) {
                continue;
            }
            bail!("connection closed while joining: {msg:?}");
        };
        for line in t.as_str().split('\n') {
            if line.contains(r#""id":"j""#) {
                if line.starts_with(r#"{"type":"ok""#) {
                    return Ok(());
                }
                bail!("join refused: {line}");
            }
        }
    }
}

async fn close(stream: SplitStream<Ws>, sink: SplitSink<Ws, Message>) {
    if let Ok(mut ws) = stream.reunite(sink) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
}

fn shared_for(plan: &Plan) -> Arc<Shared> {
    let slots = plan.fixed_count().map_or(0, |n| n as usize * plan.senders);
    Arc::new(Shared {
        latency: Mutex::new(histogram()),
        delivery: Mutex::new(histogram()),
        last_delivery: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        errors_logged: AtomicU64::new(0),
    })
}

/// READY/GO with the parent, then starts the connections' tasks and waits for them.
async fn start_and_finish(
    ctl: &mut Control,
    go_tx: watch::Sender<Option<(u64, Instant)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let go = ctl.ready().await?;
    let _ = go_tx.send(Some(go));
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// A hubbub `send` of `text` to `conv` as request `k`. Its client id grows with `k` in
/// text order too (fixed width), as ids made from the time do.
fn send_frame(k: u64, conv: &str, text: &str) -> String {
    format!(
        r#"{{"type":"send","id":{k},"conv":"{conv}","client_msg_id":"m{k:012}","content_type":"text","content":"{text}"}}"#
    )
}

fn finish(report: &Mutex<Report>, shared: &Shared, plan: &Plan) -> Report {
    let mut r = std::mem::take(&mut *report.lock().expect("report lock"));
    r.latency = to_pairs(&shared.latency.lock().expect("histogram lock"));
    r.delivery_latency = to_pairs(&shared.delivery.lock().expect("histogram lock"));
    if plan.fixed_count().is_some() {
        r.last_delivery = shared
            .last_delivery
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
    }
    r.end_us = now_us();
    r
}

async fn fanout(
    ctx: &Ctx,
    ctl: &mut Control,
    members: usize,
    plan: Plan,
) -> anyhow::Result<Report> {
    let hubbub = ctx.hubbub();
    let room = format!("bench{}", ctx.run_id);
    let conv = format!("room:{room}");
    let report = Arc::new(Mutex::new(Report {
        sent_per_sender: vec![0; plan.senders],
        receivers_per_sender: vec![0; plan.senders],
        unique_per_sender: vec![0; plan.senders],
        ..Report::default()
    }));
    let shared = shared_for(&plan);
    let run_id = ctx.run_id.clone();
    let sockets = open_all(
        ctx,
        ctx.share(members),
        |i| format!("b{run_id}m{i}"),
        hubbub.then_some(room.as_str()),
        &report,
    )
    .await;
    // Until GO, every connection drains what arrives (member pushes of later joins).
    let (go_tx, go_rx) = watch::channel(None::<(u64, Instant)>);
    let receiving = Receiving::new(sockets.len());
    let mut tasks = Vec::new();
    for (i, ws) in sockets {
        let (report, shared, conv) = (report.clone(), shared.clone(), conv.clone());
        let mut go = go_rx.clone();
        let place = receiving.place();
        tasks.push(tokio::spawn(async move {
            let (sink, mut stream) = ws.split();
            let (start_us, start) = loop {
                if let Some(g) = *go.borrow_and_update() {
                    break g;
                }
                tokio::select! {
                    r = go.changed() => if r.is_err() { return },
                    m = stream.next() => if !matches!(m, Some(Ok(_))) {
                        report.lock().expect("report lock").closed += 1;
                        return;
                    },
                }
            };
            let is_sender = i < plan.senders;
            // hubbub does not echo a sender's own message to its sending session.
            let expects = |s: usize| !(hubbub && s == i);
            let expected: u64 = plan.fixed_count().map_or(u64::MAX, |n| {
                n * (0..plan.senders).filter(|&s| expects(s)).count() as u64
            });
            let state = Arc::new(SendState::new(plan.inflight));
            let (sender, idle_sink) = if is_sender {
                let state = state.clone();
                let (conv, size) = (conv.clone(), plan.size);
                let handle = tokio::spawn(send_loop(
                    sink,
                    plan,
                    plan.start_of(start_us, i),
                    start,
                    state,
                    move |k, due| {
                        let text = payload(i, k, due, size);
                        if hubbub {
                            send_frame(k, &conv, &text)
                        } else {
                            text
                        }
                    },
                ));
                (Some(handle), None)
            } else {
                (None, Some(sink))
            };
            let mut rx = Receiver::new(plan.senders);
            let sending_ends = start + Duration::from_secs_f64(plan.duration);
            let deadline = sending_ends + Duration::from_secs_f64(plan.drain);
            let acks = if is_sender && hubbub {
                Acks::Count(&state)
            } else {
                Acks::None
            };
            let fixed = plan.fixed_count();
            let closed = receive_loop(&mut stream, &mut rx, &shared, acks, fixed, deadline, |rx| {
                let got: u64 = rx.unique.iter().sum();
                let acked = !is_sender
                    || !hubbub
                    || (state.done.load(Ordering::Acquire)
                        && state.acked.load(Ordering::Relaxed)
                            >= state.sent.load(Ordering::Relaxed));
                got >= expected && acked
            })
            .await;
            let sink = match sender {
                Some(h) => h.await.ok(),
                None => idle_sink,
            };
            {
                let mut r = report.lock().expect("report lock");
                r.closed += u64::from(closed);
                r.delivered += rx.delivered;
                r.duplicates += rx.duplicates;
                r.errors += rx.errors;
                if is_sender {
                    let sent = state.sent.load(Ordering::Relaxed);
                    r.sent += sent;
                    r.sent_per_sender[i] += sent;
                    r.acked += state.acked.load(Ordering::Relaxed);
                }
                for s in 0..plan.senders {
                    if expects(s) {
                        r.receivers_per_sender[s] += 1;
                    }
                    r.unique_per_sender[s] += rx.unique[s];
                }
            }
            place.done_then_wait_for_all(deadline).await;
            if let Some(sink) = sink {
                close(stream, sink).await;
            }
        }));
    }
    start_and_finish(ctl, go_tx, tasks).await?;
    Ok(finish(&report, &shared, &plan))
}

/// Connections of one worker that are still receiving (fanout and dm). A connection
/// closes only once all of them are done (or the run's deadline passed): closing early
/// makes the server do its per-connection closing work (unregistering, presence) while
/// others still wait for their last messages, which then look slow.
struct Receiving(Arc<watch::Sender<usize>>);

/// One connection's place in [`Receiving`]: counted out when dropped, so on every way out
/// of its task.
struct StillReceiving(Arc<watch::Sender<usize>>);

impl Receiving {
    fn new(conns: usize) -> Receiving {
        Receiving(Arc::new(watch::Sender::new(conns)))
    }

    fn place(&self) -> StillReceiving {
        StillReceiving(self.0.clone())
    }
}

impl StillReceiving {
    /// Counts this connection out, then waits until every connection is done receiving,
    /// or until `deadline`.
    async fn done_then_wait_for_all(self, deadline: Instant) {
        let mut left = self.0.subscribe();
        drop(self);
        let _ = tokio::time::timeout_at(deadline.into(), left.wait_for(|n| *n == 0)).await;
    }
}

impl Drop for StillReceiving {
    fn drop(&mut self) {
        self.0.send_modify(|left| *left = left.saturating_sub(1));
    }
}

async fn dm(ctx: &Ctx, ctl: &mut Control, pairs: usize, plan: Plan) -> anyhow::Result<Report> {
    let report = Arc::new(Mutex::new(Report::default()));
    let shared = shared_for(&plan);
    let run_id = ctx.run_id.clone();
    let pair_share = ctx.share(pairs);
    // Connection 2p is user a of pair p, 2p+1 user b.
    let name = |i: usize| {
        format!(
            "b{run_id}{}{}",
            if i.is_multiple_of(2) { 'a' } else { 'b' },
            i / 2
        )
    };
    let sockets = open_all(
        ctx,
        pair_share.start * 2..pair_share.end * 2,
        name,
        None,
        &report,
    )
    .await;
    let (go_tx, go_rx) = watch::channel(None::<(u64, Instant)>);
    let receiving = Receiving::new(sockets.len());
    let mut tasks = Vec::new();
    // Each connection reads until its peer's acked messages have arrived too.
    let states: std::collections::HashMap<usize, Arc<SendState>> = sockets
        .iter()
        .map(|(i, _)| (*i, Arc::new(SendState::new(plan.inflight))))
        .collect();
    for (i, ws) in sockets {
        let (report, shared) = (report.clone(), shared.clone());
        let conv = format!("dm:{}:{}", name(i & !1), name(i | 1));
        let mut go = go_rx.clone();
        let state = states[&i].clone();
        let peer = states.get(&(i ^ 1)).cloned();
        let place = receiving.place();
        tasks.push(tokio::spawn(async move {
            let Ok(g) = go.wait_for(Option::is_some).await.map(|g| *g) else {
                return;
            };
            let (start_us, start) = g.expect("waited for Some");
            let start_us = plan.start_of(start_us, i);
            let (sink, mut stream) = ws.split();
            let sender = tokio::spawn(send_loop(
                sink,
                plan,
                start_us,
                start,
                state.clone(),
                // Marked with its side (a: 0, b: 1): a copy of a sender's own message
                // pushed back to it is told from its peer's.
                move |k, due| {
                    let text = payload(i & 1, k, due, plan.size);
                    send_frame(k, &conv, &text)
                },
            ));
            let (own, other) = (i & 1, (i & 1) ^ 1);
            let mut rx = Receiver::new(2);
            let deadline = start + Duration::from_secs_f64(plan.duration + plan.drain);
            let acks = Acks::Time(&state, plan, start_us);
            let finished = |st: &SendState| {
                st.done.load(Ordering::Acquire)
                    && st.acked.load(Ordering::Relaxed) >= st.sent.load(Ordering::Relaxed)
            };
            let closed = receive_loop(&mut stream, &mut rx, &shared, acks, None, deadline, |rx| {
                finished(&state)
                    && peer.as_ref().is_none_or(|p| {
                        finished(p) && rx.unique[other] >= p.acked.load(Ordering::Relaxed)
                    })
            })
            .await;
            let sink = sender.await.ok();
            {
                let mut r = report.lock().expect("report lock");
                r.closed += u64::from(closed);
                // The sending session gets only its `ok`: a copy of its own message
                // counts as a duplicate.
                r.delivered += rx.delivered - rx.unique[own];
                r.duplicates += rx.duplicates + rx.unique[own];
                r.errors += rx.errors;
                r.sent += state.sent.load(Ordering::Relaxed);
                r.acked += state.acked.load(Ordering::Relaxed);
            }
            place.done_then_wait_for_all(deadline).await;
            if let Some(sink) = sink {
                close(stream, sink).await;
            }
        }));
    }
    start_and_finish(ctl, go_tx, tasks).await?;
    Ok(finish(&report, &shared, &plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_schedules_start_within_one_interval_and_in_step_ones_together() {
        let load = Load {
            inflight: 1,
            duration: 1.0,
            size: 10,
            in_step: false,
        };
        let plan = Plan::new(4, 10.0, load, 1.0);
        let starts: Vec<u64> = (0..4).map(|i| plan.start_of(1_000_000, i)).collect();
        assert_eq!(starts, [1_000_000, 1_025_000, 1_050_000, 1_075_000]);
        let in_step = Plan::new(
            4,
            10.0,
            Load {
                in_step: true,
                ..load
            },
            1.0,
        );
        assert!((0..4).all(|i| in_step.start_of(1_000_000, i) == 1_000_000));
        // Closed loop has no schedule to spread.
        let closed = Plan::new(4, 0.0, load, 1.0);
        assert_eq!(closed.start_of(7, 3), 7);
    }

    #[test]
    fn markers_roundtrip_inside_json_and_raw_lines() {
        let p = payload(7, 42, 1_700_000_000_123_456, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse_marker(&p), Some((7, 42, 1_700_000_000_123_456)));
        let line = format!(r#"{{"type":"message","conv":"room:x","seq":3,"content":"{p}"}}"#);
        assert_eq!(parse_marker(&line), Some((7, 42, 1_700_000_000_123_456)));
        assert_eq!(parse_marker(r#"{"type":"member"}"#), None);
    }

    #[test]
    fn ok_ids_are_read() {
        assert_eq!(ok_id(r#"{"type":"ok","id":17,"seq":3}"#), Some(17));
        assert_eq!(ok_id(r#"{"type":"ok","id":"j"}"#), None);
    }

    #[test]
    fn receivers_count_duplicates_and_unknown_senders() {
        let mut rx = Receiver::new(2);
        assert!(rx.mark(0, 5));
        assert!(!rx.mark(0, 5));
        assert!(rx.mark(1, 200));
        assert!(!rx.mark(9, 0));
        assert_eq!(rx.unique, vec![1, 1]);
        assert_eq!(rx.duplicates, 1);
        assert_eq!(rx.delivered, 3);
    }

    #[test]
    fn shares_cover_the_range_once() {
        let dialer = Dialer::new("ws://127.0.0.1:1", Target::Raw, 1).unwrap();
        let mut seen = Vec::new();
        for index in 0..3 {
            let ctx = Ctx {
                dialer: dialer.clone(),
                index,
                procs: 3,
                run_id: "x".into(),
            };
            seen.extend(ctx.share(10));
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
