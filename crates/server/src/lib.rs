//! The hubbub server as a library: [`run`] serves WebSocket chat, the HTTP API and the
//! start page on one listener until a shutdown signal, then closes every session with
//! 1001 and flushes the store.
//!
//! # Layout
//!
//! - [`config`]: typed configuration (defaults < file < `HUBBUB_*` env < flags).
//! - [`node`]: what each chat operation means (send, join, sync, recall, signal...) and
//!   who may do it; the gateway and the HTTP API both call it.
//! - [`gateway`]: `GET /ws` upgrade (credential, origin, subprotocol checks) and one
//!   session per connection: read, decode, call the node, answer in order, write.
//! - [`api`]: HTTP routes and the JSON error body.
//! - The seams the node plugs into: [`store`] (the [`store::Store`] trait, the SQLite
//!   implementation with group commit), [`bus`] (the [`bus::Bus`] trait; the in-process
//!   sharded bus), [`presence`] (the [`presence::Presence`] trait; this node's sessions).
//! - [`hub`]: this node's sessions and their queues; [`members`]: cached room member
//!   lists.
//! - [`auth`]: credentials (tokens, guest names), password hashing and its limits, the
//!   login throttle; [`access`]: admitting guests under names no account has.
//! - `serve`: the accept loop (HTTP timeouts, connection caps); [`host`]: the `Host`
//!   check against DNS rebinding; [`client_addr`]: the client's address (the TCP peer, or
//!   what a trusted proxy says), for every per-address limit.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod access;
pub mod api;
pub mod auth;
pub mod bus;
pub mod client_addr;
pub mod cluster;
pub mod cluster_logins;
pub mod config;
pub mod gateway;
pub mod host;
pub mod hub;
pub mod members;
pub mod metrics;
pub mod node;
pub mod presence;
mod serve;
pub mod store;
pub mod web;

pub use config::Config;

use crate::auth::Authenticator;
use crate::bus::{Bus, LocalBus};
use crate::cluster::Cluster;
use crate::hub::{CloseReason, Hub};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::presence::{LocalPresence, Presence};
use crate::store::{CommitHook, PgStore, SqliteStore, Store};

/// How long shutdown waits for sessions to close before flushing the store anyway.
const SESSION_DRAIN: Duration = Duration::from_secs(6);
/// How often cached room member lists are checked for eviction.
const ROOM_SWEEP: Duration = Duration::from_secs(60);
/// A cached room unused this long with no member online is dropped from memory.
const ROOM_IDLE: Duration = Duration::from_secs(300);

/// Shared state of a running server.
pub struct AppState {
    pub config: Config,
    /// What chat operations mean; the gateway and the HTTP API call it.
    pub node: Arc<Node>,
    /// The store, for what is not chat (accounts, files, health).
    pub store: Arc<dyn Store>,
    pub auth: Authenticator,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Tracks every session task.
    pub sessions: TaskTracker,
    /// Failed-login bookkeeping.
    pub logins: auth::LoginThrottle,
    /// In a cluster, the same kept in Redis for every node (beside `logins`).
    pub cluster_logins: Option<Arc<cluster_logins::ClusterLogins>>,
    /// Guest names known to be recorded in the store (a cache; cleared when it grows large).
    pub guest_names: dashmap::DashSet<String>,
    /// Bounds concurrent password hashing.
    pub hashing: auth::PasswordWork,
    /// Register and login requests per source address.
    pub auth_rate: auth::AddressRate,
    /// Searches per user.
    pub searches: auth::KeyedRate<String>,
    pub metrics: Metrics,
    /// Open WebSocket connections, in total and per address.
    pub conn_limiter: Arc<gateway::ConnLimiter>,
    /// Signs and checks the download cookies of browsers.
    pub file_passes: api::files::FilePasses,
    /// Upload rates per user and per address.
    pub uploads: api::files::UploadLimits,
    /// The proxies whose forwarding headers name the client (`trusted_proxies`).
    pub trusted_proxies: client_addr::TrustedProxies,
}

/// Serves on `listener` until `shutdown` resolves; then stops accepting, closes every
/// client with 1001, commits what the store has queued and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let (local, workers) = LocalBus::new(shards);
    let metrics = Metrics::new();
    let hub = Arc::new(Hub::new(metrics.clone()));
    let cluster = match config.bus_kind().map_err(anyhow::Error::msg)? {
        config::BusKind::Local => None,
        config::BusKind::Redis(url) => {
            tracing::info!(bus = %config::redact_url(url), "joining the cluster");
            Some(Cluster::new(url, hub.clone(), metrics.clone())?)
        }
    };
    let bus: Arc<dyn Bus> = match &cluster {
        Some(c) => Arc::new(c.bus(local.clone())),
        None => Arc::new(local.clone()),
    };
    let hook: CommitHook = {
        let bus = bus.clone();
        Arc::new(move |change| bus.publish(change))
    };
    let store: Arc<dyn Store> = match config.store_kind().map_err(anyhow::Error::msg)? {
        config::StoreKind::Sqlite => Arc::new(SqliteStore::open_with(
            &config.data_dir,
            hook,
            metrics.clone(),
            std::time::Duration::from_millis(config.store_busy_timeout_ms),
        )?),
        config::StoreKind::Postgres(url) => {
            tracing::info!(store = %config::redact_url(url), "opening the postgres store");
            Arc::new(PgStore::open(url, hook, metrics.clone()).await?)
        }
    };
    let presence: Arc<dyn Presence> = match &cluster {
        Some(c) => c.presence(),
        None => Arc::new(LocalPresence::new(hub.clone())),
    };
    let node = Arc::new(Node::new(
        &config,
        store.clone(),
        bus,
        presence,
        hub.clone(),
        &metrics,
    ));
    let background = TaskTracker::new();
    let background_stop = CancellationToken::new();
    workers.start(node.fanout(), &background);
    if let Some(c) = &cluster {
        c.start(node.clone(), local, &background, background_stop.clone());
    }
    {
        // Cached member lists of rooms nobody online uses go after a while.
        let node = node.clone();
        let stop = background_stop.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(ROOM_SWEEP);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        node.evict_idle_rooms(ROOM_IDLE.as_millis() as u64);
                    }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    let tokens = config.tokens()?;
    let auth = Authenticator::new(
        config.guest_enabled(),
        config.admins.iter().cloned(),
        tokens,
    );
    let hashing = auth::PasswordWork::new(config.hash_concurrency, config.hash_queue, &metrics);
    let auth_rate = auth::AddressRate::new(config.auth_rate_per_min, config.auth_burst);
    let conn_limiter =
        gateway::ConnLimiter::new(config.max_connections, config.max_connections_per_ip);
    let file_passes = api::files::FilePasses::from_config(&config)?;
    let uploads =
        api::files::UploadLimits::new(config.uploads_per_minute, config.uploads_per_minute_per_ip);
    let state_search_rate = (config.search_rate_per_min, config.search_burst);
    let cluster_logins = match config.bus_kind().map_err(anyhow::Error::msg)? {
        config::BusKind::Local => None,
        config::BusKind::Redis(url) => Some(cluster_logins::ClusterLogins::new(url)?),
    };
    let trusted_proxies =
        client_addr::TrustedProxies::parse(&config.trusted_proxies).map_err(anyhow::Error::msg)?;
    let state = Arc::new(AppState {
        config,
        node,
        store: store.clone(),
        auth,
        shutdown: CancellationToken::new(),
        sessions: TaskTracker::new(),
        logins: auth::LoginThrottle::default(),
        cluster_logins,
        guest_names: dashmap::DashSet::new(),
        hashing,
        auth_rate,
        searches: auth::KeyedRate::new(state_search_rate.0, state_search_rate.1),
        metrics,
        conn_limiter,
        file_passes,
        uploads,
        trusted_proxies,
    });
    // Deletes old unshared uploads until shutdown begins.
    let collector = tokio::spawn(api::files::run_collector(state.clone()));

    let token = state.shutdown.clone();
    let closer = {
        let hub = hub.clone();
        let token = token.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            hub.close_all(CloseReason::SHUTDOWN);
        })
    };
    let app = api::router(state.clone());
    let local = listener.local_addr()?;
    tracing::info!(
        addr = %local,
        guest = state.auth.guest_enabled(),
        hash_concurrency = state.hashing.permits(),
        trusted_proxies = ?state.config.trusted_proxies,
        "serving"
    );
    serve::serve(
        listener,
        app,
        &state.config,
        &state.trusted_proxies,
        token.clone(),
        shutdown,
    )
    .await;

    token.cancel();
    let _ = closer.await;
    let _ = collector.await;
    state.sessions.close();
    if tokio::time::timeout(SESSION_DRAIN, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not close in time");
    }
    store.close().await?;
    drop(state);
    drop(store);
    background_stop.cancel();
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
    tracing::info!("stopped");
    Ok(())
}
