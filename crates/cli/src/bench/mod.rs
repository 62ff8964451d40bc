//! `hubbub bench`: a load generator that measures a running server as clients feel it.
//!
//! The parent process plans a run and starts worker processes (copies of this binary
//! with `--worker-index`), so the client side is never limited by one process's open
//! files; each worker opens its share of the connections, says `READY`, waits for `GO
//! <start time>` on stdin, runs, and prints its [`Report`] as one JSON line. The parent
//! reads the server's memory and CPU time from `/proc/<pid>` around the run (given
//! `--server-pid`), merges the reports and prints one JSON line and a readable summary.
//!
//! Latency is measured against the send *schedule*: each message carries the time it
//! was due, so a server that stalls cannot hide the wait behind a late send. Loopback
//! targets only.

mod conn;
mod disk;
mod floor;
mod report;
mod work;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use conn::{Dialer, Target};
use report::{now_us, Report};

#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Server base URL (loopback only), e.g. ws://127.0.0.1:8080
    #[arg(long, default_value = "ws://127.0.0.1:8080", global = true)]
    url: String,
    /// PID of the server process, to read its memory and CPU time from /proc (with its
    /// children: the workers of `serve --workers N`).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// What the server speaks: hubbub's protocol, or a plain broadcast hub's text frames.
    #[arg(long, value_enum, default_value = "hubbub", global = true)]
    target: Target,
    /// Worker processes (0: one per 16,000 connections).
    #[arg(long, default_value_t = 0, global = true)]
    procs: usize,
    /// Spread client sockets over 127.0.0.1 ..= 127.0.0.N (more ephemeral ports).
    #[arg(long, default_value_t = 1, global = true)]
    source_addrs: u8,
    /// Internal: this process is worker I of --procs.
    #[arg(long, hide = true, global = true)]
    worker_index: Option<usize>,
    /// Internal: how many workers this run has.
    #[arg(long, hide = true, global = true)]
    worker_of: Option<usize>,
    /// Internal: names this run's users and room, the same in every worker.
    #[arg(long, hide = true, global = true)]
    run_id: Option<String>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand, serde::Serialize)]
#[serde(untagged)]
pub(super) enum Scenario {
    /// Open N idle connections at a given rate, hold them, report server memory per
    /// connection.
    Idle {
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Connections opened per second (all workers together).
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Seconds to hold them open after the last one connected, before measuring.
        #[arg(long, default_value_t = 2)]
        hold: u64,
    },
    /// Connections established per second (hubbub: including the welcome frame).
    Connect {
        /// Connections to open.
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        /// Handshakes in flight at once (all workers together).
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// One room of M members; S of them send R messages/s each for D seconds; every
    /// member's deliveries are timed and checked for loss and duplicates.
    Fanout {
        /// Members of the room (senders included).
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// How many of the members send.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Messages per second per sender; 0: as fast as acks allow (hubbub only), with
        /// --inflight sends outstanding.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[command(flatten)]
        #[serde(flatten)]
        load: Load,
        /// Seconds to wait for late deliveries after the last send.
        #[arg(long, default_value_t = 5.0)]
        drain: f64,
    },
    /// The floor under any server's CPU per delivery: what one loopback send costs this
    /// machine's kernel (no server needed; --url and the other options are ignored).
    Floor(floor::FloorArgs),
    /// The floor under a durable store's ack latency: how long this machine's disk takes
    /// to fsync a commit's pages (no server needed; --url and the other options are
    /// ignored).
    Disk(disk::DiskArgs),
    /// P pairs of users sending direct messages to each other (hubbub only): acked
    /// (stored) messages per second and ack latency.
    Dm {
        /// Pairs of users.
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Messages per second per user; 0: as fast as acks allow, with --inflight
        /// outstanding.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[command(flatten)]
        #[serde(flatten)]
        load: Load,
    },
}

/// What every sender of `fanout` and `dm` does besides its rate (whose default differs).
#[derive(Debug, Clone, Copy, Args, serde::Serialize)]
pub(super) struct Load {
    /// Sends outstanding per sender when --rate is 0.
    #[arg(long, default_value_t = 32)]
    pub(super) inflight: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    pub(super) duration: f64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    pub(super) size: usize,
    /// At a fixed rate, every sender sends at the same instants (all senders' messages
    /// arrive together). Without it the senders' schedules are spread evenly over one
    /// interval, as independent people's would be: a server cannot join one sender's
    /// message with another's for free.
    #[arg(long)]
    #[serde(default)]
    pub(super) in_step: bool,
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Idle { .. } => "idle",
            Scenario::Connect { .. } => "connect",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Dm { .. } => "dm",
            Scenario::Floor(_) => "floor",
            Scenario::Disk(_) => "disk",
        }
    }

    /// Connections of the whole run.
    fn conns(&self) -> usize {
        match self {
            Scenario::Idle { conns, .. } | Scenario::Connect { conns, .. } => *conns,
            Scenario::Fanout { members, .. } => *members,
            Scenario::Dm { pairs, .. } => pairs * 2,
            Scenario::Floor(_) | Scenario::Disk(_) => 0,
        }
    }
}

/// Connections one worker process opens at most (the per-process file limit here is
/// 20,000; the rest is headroom).
const CONNS_PER_PROC: usize = 16_000;

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Floor(f) => return floor::run(f),
        Scenario::Disk(d) => return disk::run(d),
        _ => {}
    }
    let dialer = Dialer::new(&args.url, args.target, args.source_addrs)?;
    validate(&args)?;
    let procs = if let Some(k) = args.worker_of {
        k
    } else if args.procs == 0 {
        args.scenario.conns().div_ceil(CONNS_PER_PROC).max(1)
    } else {
        args.procs
    };
    if let Some(index) = args.worker_index {
        let run_id = args.run_id.as_deref().unwrap_or("0");
        return work::worker(&args.scenario, dialer, index, procs, run_id);
    }
    conn::raise_nofile();
    coordinate(&args, procs)
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.scenario {
        Scenario::Dm { .. } if args.target == Target::Raw => {
            bail!("dm needs --target hubbub: a broadcast hub has no direct messages")
        }
        Scenario::Fanout {
            members,
            senders,
            rate,
            ..
        } => {
            if senders > members || *senders == 0 {
                bail!("--senders must be between 1 and --members");
            }
            if *rate <= 0.0 && args.target == Target::Raw {
                bail!("--rate 0 (closed loop) needs acks: use a rate with --target raw");
            }
        }
        _ => {}
    }
    Ok(())
}

/// One started worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(index: usize, procs: usize, run_id: &str) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("finding this program")?;
        let mut child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .args(["--worker-of", &procs.to_string()])
            .args(["--worker-index", &index.to_string()])
            .args(["--run-id", run_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a bench worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker {
            child,
            stdin,
            lines,
        })
    }

    fn expect_line(&self, index: usize, timeout: Duration) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(timeout)
            .with_context(|| format!("bench worker {index} stopped answering"))
    }
}

fn coordinate(args: &BenchArgs, procs: usize) -> anyhow::Result<()> {
    let pid = args.server_pid;
    let rss_before = pid.and_then(report::rss_bytes);
    let setup_started = Instant::now();
    // Users and the room are new in every run: base 36 of the clock in ms.
    let run_id = radix36(now_us() / 1000 % 36u64.pow(7));
    let mut workers = (0..procs)
        .map(|i| Worker::start(i, procs, &run_id))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Setup: connecting (and joining) can take a while for tens of thousands.
    for (i, w) in workers.iter().enumerate() {
        let line = w.expect_line(i, Duration::from_secs(600))?;
        if line != "READY" {
            bail!("bench worker {i} said {line:?} instead of READY");
        }
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();
    if let Scenario::Idle { hold, .. } = args.scenario {
        std::thread::sleep(Duration::from_secs(hold));
    }
    let rss_loaded = pid.and_then(report::rss_bytes);
    let cpu_before = pid.and_then(report::cpu_seconds);
    // Start together, a moment from now.
    let start_us = now_us() + 200_000;
    for w in &mut workers {
        writeln!(w.stdin, "GO {start_us}").context("starting a bench worker")?;
    }
    let run_limit = Duration::from_secs(match &args.scenario {
        Scenario::Fanout { load, drain, .. } => (load.duration + drain) as u64 + 120,
        Scenario::Dm { load, .. } => load.duration as u64 + 120,
        _ => 600,
    });
    let mut total = Report::default();
    for (i, w) in workers.iter().enumerate() {
        let line = w.expect_line(i, run_limit)?;
        let r: Report = serde_json::from_str(&line)
            .with_context(|| format!("bench worker {i} sent a bad report: {line}"))?;
        total.merge(r);
    }
    let cpu = match (cpu_before, pid.and_then(report::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    for mut w in workers {
        drop(w.stdin);
        let _ = w.child.wait();
    }
    let summary = report::Summary {
        scenario: &args.scenario,
        target: args.target,
        procs,
        start_us,
        setup_secs,
        rss_before,
        rss_loaded,
        server_cpu_secs: cpu,
        report: &total,
    };
    let (json_line, text) = summary.render();
    // A closed pipe (`| head -1`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json_line}").and_then(|()| writeln!(out, "{text}"));
    Ok(())
}

/// The scenario's parameters, for the JSON output.
fn scenario_json(s: &Scenario) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn radix36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}
