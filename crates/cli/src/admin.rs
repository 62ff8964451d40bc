//! Admin verbs that work on a server's data dir: `hubbub user add`, `hubbub token` and
//! `hubbub migrate`.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hubbub_protocol::is_valid_user_name;
use hubbub_server::auth::{check_password_rules, hash_password};
use hubbub_server::store::transfer::{self, DEFAULT_CHUNK_ROWS};
use hubbub_server::store::{SqliteStore, Store, StoreError};
use hubbub_server::Config;
use serde_json::{Map, Value};

/// Which server's data to act on.
#[derive(Debug, Args)]
pub(crate) struct Target {
    /// Config file (TOML) of the server.
    #[arg(long, env = "HUBBUB_CONFIG")]
    config: Option<PathBuf>,
    /// The server's data directory [default: ./hubbub-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl Target {
    fn config(&self) -> anyhow::Result<Config> {
        let mut m = Map::new();
        if let Some(d) = &self.data_dir {
            m.insert("data_dir".into(), Value::String(d.display().to_string()));
        }
        Config::load(
            self.config.as_deref(),
            hubbub_server::config::Overrides::new(Value::Object(m)),
        )
        .context("reading the configuration")
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Create an account; the password is read from stdin (or prompted for on a terminal).
    Add {
        /// The user name (`[A-Za-z0-9_.-]{1,32}`).
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The user the token is for.
    name: String,
    /// Lifetime in seconds [default: the server's token_ttl_secs].
    #[arg(long)]
    ttl: Option<u64>,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The data dir of the SQLite deployment (its `hubbub.db` is read, never changed).
    #[arg(long, value_name = "DATA_DIR")]
    from: PathBuf,
    /// The PostgreSQL database to copy into: `postgres://USER@HOST:PORT/DB` (empty, or
    /// holding what an interrupted `hubbub migrate` from the same data dir copied).
    #[arg(long, value_name = "URL")]
    to: String,
    /// Rows per chunk (one transaction each).
    #[arg(long, hide = true, default_value_t = DEFAULT_CHUNK_ROWS)]
    chunk_rows: usize,
}

pub(crate) fn user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name, target } => {
            if !is_valid_user_name(&name) {
                bail!("a user name must match ^[A-Za-z0-9_.-]{{1,32}}$");
            }
            let config = target.config()?;
            let password = read_password()?;
            check_password_rules(&password).map_err(anyhow::Error::msg)?;
            let hash = hash_password(&password).map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            // Beside a running server too: it holds the data dir's lock.
            let store =
                SqliteStore::open_for_accounts(&config.data_dir).context("opening the store")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let created = rt.block_on(async {
                let r = store.create_user(&name, &hash).await;
                store.close().await.ok();
                r
            });
            match created {
                Ok(()) => {
                    eprintln!("created user {name}");
                    Ok(())
                }
                Err(StoreError::Conflict(why)) => bail!("cannot add the user {name}: {why}"),
                Err(e) => Err(e).context("creating the user"),
            }
        }
    }
}

fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let second = rpassword::prompt_password("Again: ")?;
        if first != second {
            bail!("the passwords differ");
        }
        Ok(first)
    } else {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

pub(crate) fn token(args: TokenArgs) -> anyhow::Result<()> {
    if !is_valid_user_name(&args.name) {
        bail!("a user name must match ^[A-Za-z0-9_.-]{{1,32}}$");
    }
    let config = args.target.config()?;
    // Creates data_dir/jwt.secret when the server has not yet: it will use the same one.
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let tokens = config.tokens().context("reading the token secret")?;
    let (token, _) = tokens
        .issue(&args.name, args.ttl.map(Duration::from_secs))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(())
}

/// `hubbub migrate`: copies the data dir's SQLite database into PostgreSQL, prints the
/// verification's summary on stdout, and fails when the copy does not match.
pub(crate) fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let opts = transfer::Options {
        chunk_rows: args.chunk_rows,
        ..transfer::Options::default()
    };
    let report = rt.block_on(transfer::sqlite_to_postgres_with(
        &args.from, &args.to, &opts,
    ))?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{report}");
        let _ = out.flush();
    }
    if !report.verified() {
        bail!(
            "the copy does not match the source ({} difference(s), listed above)",
            report.mismatch_count
        );
    }
    Ok(())
}
