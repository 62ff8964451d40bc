//! The `hubbub` binary: thin clap subcommands over the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hubbub_server::Config;
use serde_json::{Map, Value};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod bench;
mod chat;
mod workers;

#[derive(Debug, Parser)]
#[command(
    name = "hubbub",
    version,
    about = "A real-time instant-messaging server in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve WebSocket chat, the HTTP API and the web page on one port (the default).
    Serve(ServeArgs),
    /// Full-screen terminal chat client.
    Chat(chat::ChatArgs),
    /// Load generator: measure a running server (loopback only).
    Bench(bench::BenchArgs),
    /// Manage accounts in a server's data dir.
    #[command(subcommand)]
    User(admin::UserCommand),
    /// Print a token signed with a server's secret (for scripts and tests).
    Token(admin::TokenArgs),
    /// Copy a SQLite data dir's database into an empty PostgreSQL database (stop the
    /// server first); resumable, verified at the end.
    Migrate(admin::MigrateArgs),
}

#[derive(Debug, Default, Args)]
struct ServeArgs {
    /// Config file (TOML); flags and HUBBUB_* variables override it.
    #[arg(long, env = "HUBBUB_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Directory for the database and attachments [default: ./hubbub-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where messages are stored: `sqlite` (the embedded database in the data dir, the
    /// default) or `postgres://USER@HOST:PORT/DB` (a database several nodes can share;
    /// `?sslmode=require` for TLS).
    #[arg(long)]
    store: Option<String>,
    /// `local` (the default) or `redis://HOST:PORT`: the bus between the nodes of a
    /// cluster (needs a postgres:// store and a jwt_secret shared by every node).
    #[arg(long)]
    bus: Option<String>,
    /// Users with admin rights, comma separated.
    #[arg(long, value_delimiter = ',')]
    admins: Option<Vec<String>>,
    /// Allow guests (?user=NAME, no password; a guest can never use an account's name).
    /// Default: off (`hubbub` with no subcommand turns it on for a loopback demo).
    #[arg(long, conflicts_with = "no_guest")]
    guest: bool,
    /// Refuse guests.
    #[arg(long)]
    no_guest: bool,
    /// `hubbub` with no subcommand: the local demo.
    #[arg(skip)]
    demo: bool,
    /// Server ping interval in milliseconds; silent connections close after 2.5x.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Largest accepted WebSocket frame in bytes.
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// Bound of each session's outgoing queue (messages).
    #[arg(long)]
    queue_frames: Option<usize>,
    /// Reverse proxies whose X-Forwarded-For / X-Real-IP name the client, comma
    /// separated: IP addresses or CIDR ranges (e.g. 10.0.0.0/8). Default: none.
    #[arg(long, value_delimiter = ',')]
    trusted_proxies: Option<Vec<String>>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Run N node processes sharing the port (SO_REUSEPORT), each a node of the cluster
    /// (needs --bus redis:// and a postgres:// store).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Bind with SO_REUSEPORT (how the processes of --workers share the port).
    #[arg(long, hide = true)]
    reuse_port: bool,
}

impl ServeArgs {
    /// The flags that were given, as a config layer.
    fn overrides(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        if let Some(b) = self.bind {
            set("bind", Value::String(b.to_string()));
        }
        if let Some(d) = &self.data_dir {
            set("data_dir", Value::String(d.display().to_string()));
        }
        if let Some(s) = &self.store {
            set("store", Value::String(s.clone()));
        }
        if let Some(b) = &self.bus {
            set("bus", Value::String(b.clone()));
        }
        if let Some(a) = &self.admins {
            set(
                "admins",
                a.iter().map(|s| Value::String(s.clone())).collect(),
            );
        }
        if self.guest {
            set("guest", Value::Bool(true));
        }
        if self.no_guest {
            set("guest", Value::Bool(false));
        }
        if let Some(h) = self.heartbeat_ms {
            set("heartbeat_ms", h.into());
        }
        if let Some(f) = self.max_frame_bytes {
            set("max_frame_bytes", f.into());
        }
        if let Some(q) = self.queue_frames {
            set("queue_frames", q.into());
        }
        if let Some(p) = &self.trusted_proxies {
            set(
                "trusted_proxies",
                p.iter().map(|s| Value::String(s.clone())).collect(),
            );
        }
        if self.log_json {
            set("log_format", Value::String("json".into()));
        }
        m
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let demo = ServeArgs {
        demo: true,
        ..ServeArgs::default()
    };
    let result = match cli.command.unwrap_or(Command::Serve(demo)) {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => bench::run(args),
        Command::Chat(args) => chat::run(args),
        Command::User(cmd) => admin::user(cmd),
        Command::Token(args) => admin::token(args),
        Command::Migrate(args) => admin::migrate(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why (the causes joined with ": "), no backtrace.
            let text = format!("{e:#}").replace('\n', " ");
            eprintln!("hubbub: error: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUBBUB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr on a full disk, a closed pipe) is
    // dropped: with internal error reporting on, the subscriber would report it with
    // `eprintln!`, which panics when stderr fails, taking down whatever task logged (the
    // store writer, a session).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = figment_json(args.overrides());
    let mut config =
        Config::load(args.config.as_deref(), overrides).context("reading the configuration")?;
    // Before anything starts: a bad value (an unparsable trusted_proxies entry...) is
    // one line and exit 1.
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("checking the configuration")?;
    init_logs(config.log_format == "json");
    let unknown = Config::unknown_env_keys(std::env::vars());
    if !unknown.is_empty() {
        tracing::warn!(
            "ignoring environment variables that name no config key: {}",
            unknown.join(", ")
        );
    }
    // The local demo lets guests in, unless guest mode was decided either way, and only
    // on a loopback address.
    let demo_guests = args.demo && config.guest.is_none() && config.bind.ip().is_loopback();
    if demo_guests {
        config.guest = Some(true);
        eprintln!(
            "hubbub: demo mode: guests may join without a password (?user=NAME) on this \
             loopback address. `hubbub serve` runs with accounts only; add --guest to allow \
             guests there."
        );
        tracing::warn!("demo mode: guest mode is on");
    }
    if args.workers > 1 {
        anyhow::ensure!(
            config.is_cluster(),
            "--workers needs --bus redis://... and a postgres:// store: each worker is a \
             node of a cluster"
        );
        return workers::run(args.workers as usize, config.bind);
    }
    if args.reuse_port {
        workers::follow_parent()?;
    }
    if config.sched_batch {
        // Before any thread starts: every thread of the process inherits it.
        batch_scheduling();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = if args.reuse_port {
            workers::reuse_port_listener(config.bind)
        } else {
            tokio::net::TcpListener::bind(config.bind).await
        }
        .with_context(|| format!("binding {}", config.bind))?;
        let addr = listener.local_addr()?;
        let shutdown = shutdown_signal();
        // Scripts and tests read this line to find the port. Not `println!`: it panics
        // when stdout cannot be written.
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "hubbub listening on http://{addr}");
            let _ = out.flush();
        }
        hubbub_server::run(listener, config, shutdown).await
    })
}

/// Puts the calling thread, and so every thread it starts from now on, under the
/// kernel's batch scheduling policy (`sched_batch`). Any process may choose it; where
/// it is refused (a sandbox's system call filter), the server runs as before.
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        use preempt_rt::sched::{set_scheduler, Pid, Scheduler, SchedulerParams};
        match set_scheduler(
            Pid::current_thread(),
            Scheduler::SCHED_BATCH,
            SchedulerParams { priority: 0 },
        ) {
            Ok(()) => tracing::debug!("threads run under SCHED_BATCH"),
            Err(e) => {
                tracing::warn!(error = %e, "sched_batch: SCHED_BATCH refused; running under the default policy")
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!("sched_batch: no batch scheduling policy on this system");
}

fn figment_json(map: Map<String, Value>) -> hubbub_server::config::Overrides {
    hubbub_server::config::Overrides::new(Value::Object(map))
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed here, before the server
/// announces itself, so a signal sent right after the listening line still stops it
/// cleanly.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = signal(SignalKind::terminate())
            .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
        async move {
            match streams {
                Ok((mut term, mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            tracing::info!("shutdown requested");
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown requested");
        }
    }
}
