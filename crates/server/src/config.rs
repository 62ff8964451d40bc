//! Typed configuration: defaults < config file < `HUBBUB_*` environment < command-line
//! flags. The binary collects flags into a [`figment`] provider and calls [`Config::load`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Bounds of `ws_read_buffer`: below the smallest, a frame takes many reads (one system
/// call each); above the largest, idle connections alone would hold gigabytes.
const MIN_WS_READ_BUFFER: usize = 64;
const MAX_WS_READ_BUFFER: usize = 1 << 20;

/// Everything `hubbub serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Directory for the database and attachments.
    pub data_dir: PathBuf,
    /// Where messages are stored: `sqlite` (the embedded database in `data_dir`) or a
    /// `postgres://` URL (a database several nodes can share). Uploaded files stay in
    /// `data_dir` either way.
    pub store: String,
    /// How committed changes and live events reach the sessions: `local` (this process
    /// only) or a `redis://HOST:PORT` URL, which makes this process a node of a cluster
    /// (needs a `postgres://` store and a `jwt_secret` shared by every node).
    pub bus: String,
    /// Users with admin rights (authenticated by token, never as guests).
    pub admins: Vec<String>,
    /// Guest mode (`?user=NAME`, no password): an explicit choice; `None` means off.
    pub guest: Option<bool>,
    /// Interval of server pings; a connection silent for 2.5x this is closed.
    pub heartbeat_ms: u64,
    /// Largest accepted WebSocket frame (after joining fragments).
    pub max_frame_bytes: usize,
    /// Largest text content, in UTF-8 bytes.
    pub max_text_bytes: usize,
    /// Bound of each session's outgoing queue, in protocol messages.
    pub queue_frames: usize,
    /// Read buffer of each WebSocket, in bytes: allocated with the connection and kept
    /// while it is open, and the most one read from its socket takes. 256 holds a chat
    /// frame and costs idle connections 256 bytes less than 512 did, with the same
    /// throughput (BENCHMARKS.md, round 8); a larger frame grows it while it is read.
    pub ws_read_buffer: usize,
    /// Most coalesced bytes the writer puts into one outgoing frame.
    pub max_coalesce_bytes: usize,
    /// A connection written to less than this many milliseconds ago waits until then
    /// before its next frame, so that a busy connection's messages share frames (0: off).
    pub write_linger_ms: u64,
    /// The linger of a busy connection: it grows from `write_linger_ms` for a quiet
    /// connection to this for one receiving two frames or more per this many
    /// milliseconds, so a busy member is written at most about 1,000 / this times a
    /// second (at most `write_linger_ms`: a fixed linger).
    pub write_linger_max_ms: u64,
    /// Rooms with more members than this send no `member`, `typing` or room `presence`.
    pub large_room: usize,
    /// Sustained `send` rate per connection (messages per second).
    pub send_rate_per_sec: u32,
    /// Burst of `send`s per connection.
    pub send_burst: u32,
    /// Consecutive rate-limited frames after which a connection is closed with 1008.
    pub rate_limit_strikes: u32,
    /// Most sends of one connection waiting for their commit at once.
    pub max_inflight_sends: usize,
    /// Run the server's threads under the kernel's batch scheduling policy
    /// (`SCHED_BATCH`, Linux): a thread the server wakes does not preempt the one that
    /// woke it, so the store writer answers a whole commit before the network side
    /// takes the answers, instead of trading the core back and forth for each one.
    pub sched_batch: bool,
    /// Largest history page.
    pub history_max: u32,
    /// Largest sync page per conversation.
    pub sync_max: u32,
    /// Browser origins allowed to open WebSockets, besides the server's own origin.
    pub allowed_origins: Vec<String>,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// Token signing secret; when unset, one is generated once and kept in
    /// `data_dir/jwt.secret` (mode 0600).
    pub jwt_secret: Option<String>,
    /// Lifetime of tokens issued by `POST /api/login`, in seconds.
    pub token_ttl_secs: u64,
    /// Largest attachment accepted by `POST /api/files`, in bytes.
    pub max_upload_bytes: usize,
    /// Largest JSON request body of the HTTP API, in bytes.
    pub max_body_bytes: usize,
    /// Sustained rate of all frames per connection (sends count here too).
    pub frame_rate_per_sec: u32,
    /// Burst of frames per connection.
    pub frame_burst: u32,
    /// Most WebSocket connections open at once (more are refused with 503).
    pub max_connections: usize,
    /// Most WebSocket connections from one IP address (more are refused with 429).
    pub max_connections_per_ip: usize,
    /// Most rooms one user may be a member of.
    pub max_rooms_per_user: usize,
    /// How long the store waits for a database locked by another process before the
    /// operation fails with `unavailable`, in milliseconds.
    pub store_busy_timeout_ms: u64,
    /// Most bytes of uploads one user may have stored at once (`POST /api/files` answers
    /// 413 beyond it).
    pub upload_quota_bytes: u64,
    /// Uploads one user may start per minute (also the burst).
    pub uploads_per_minute: u32,
    /// Uploads one IP address may start per minute (also the burst).
    pub uploads_per_minute_per_ip: u32,
    /// Uploads no message shares are deleted once this old, in seconds (0: never).
    pub upload_gc_age_secs: u64,
    /// How often the collector of unshared uploads runs, in milliseconds.
    pub file_gc_interval_ms: u64,
    /// Lifetime of a file pass (the download cookie of browsers), in seconds.
    pub file_pass_ttl_secs: u64,
    /// Host names (the `Host` header, port ignored) served besides IP literals and
    /// `localhost`; `["*"]` serves any host (no DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// A new connection must deliver its first request head within this many
    /// milliseconds.
    pub http_header_timeout_ms: u64,
    /// A keep-alive connection between requests is closed when its next request head is
    /// not complete within this many milliseconds of the previous response.
    pub http_idle_timeout_ms: u64,
    /// A request body that sends nothing for this many milliseconds is dropped.
    pub http_body_timeout_ms: u64,
    /// Most HTTP connections open at once, before upgrades (more are refused with 503).
    pub max_http_connections: usize,
    /// Most HTTP connections from one IP address, before upgrades (more get 429). The
    /// connections of `trusted_proxies` are not capped per address (they carry many
    /// clients); they count in `max_http_connections`.
    pub max_http_connections_per_ip: usize,
    /// Reverse proxies (IP addresses or CIDR ranges) whose `X-Forwarded-For` /
    /// `X-Real-IP` name the client: the address every per-address limit, throttle and
    /// log then uses (`client_addr`). Empty: the TCP peer is always the client. In the
    /// environment, one comma-separated list (`HUBBUB_TRUSTED_PROXIES=10.0.0.0/8,::1`).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub trusted_proxies: Vec<String>,
    /// STUN/TURN servers for calls, sent to clients in `welcome` as WebRTC
    /// `RTCIceServer`s: `[{"urls": ["stun:stun.example.org:3478"]}, {"urls":
    /// "turn:turn.example.org", "username": "u", "credential": "p"}]`. In the environment,
    /// that list as JSON (`HUBBUB_ICE_SERVERS='[...]'`). Empty by default.
    #[serde(deserialize_with = "list_or_json")]
    pub ice_servers: Vec<serde_json::Value>,
    /// Searches (`GET /api/search`) one user may make per minute (a token bucket with
    /// `search_burst`).
    pub search_rate_per_min: u32,
    pub search_burst: u32,
    /// Rooms one IP address may create per minute (a token bucket with this burst).
    pub room_create_per_ip_per_min: u32,
    /// Rooms the whole server creates per minute (a token bucket with this burst).
    pub room_create_per_min: u32,
    /// Register and login requests allowed per source address per minute, sustained.
    pub auth_rate_per_min: u32,
    /// Burst of register and login requests per source address.
    pub auth_burst: u32,
    /// Password hashes computed at once (argon2id, 19 MiB each); 0: half the cores, at
    /// least 1.
    pub hash_concurrency: usize,
    /// Requests that may wait for a place to hash a password; more are refused with 503.
    pub hash_queue: usize,
    /// Largest `data` of a `signal` (its JSON encoding), in bytes; larger is `too_large`.
    pub max_signal_bytes: usize,
    /// Sustained rate of `signal` data one user may send to one other user, in bytes per
    /// second (over budget is `rate_limited`).
    pub signal_bytes_per_sec: u32,
    /// Burst of `signal` data one user may send to one other user, in bytes.
    pub signal_burst_bytes: u32,
    /// Bound of each session's outgoing queue, in bytes (of the encoded frames queued and
    /// not yet written). A push beyond it closes the session as a slow consumer; answers
    /// to the session's own requests wait while the queue holds half of it (or half of
    /// `queue_frames`), so that pushes always find room.
    pub queue_bytes: usize,
}

/// Which store a configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind<'a> {
    /// The embedded SQLite file in the data dir.
    Sqlite,
    /// A PostgreSQL database at this URL.
    Postgres(&'a str),
}

/// What carries changes between sessions (see [`Config::bus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind<'a> {
    /// This process only.
    Local,
    /// A cluster's Redis at this URL.
    Redis(&'a str),
}

/// `url` with its password, if any, replaced by `***` (for messages and logs).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("hubbub-data"),
            store: "sqlite".into(),
            bus: "local".into(),
            admins: Vec::new(),
            guest: None,
            heartbeat_ms: 25_000,
            max_frame_bytes: 65_536,
            max_text_bytes: 16_384,
            queue_frames: 1024,
            ws_read_buffer: 256,
            max_coalesce_bytes: 64 * 1024,
            write_linger_ms: 5,
            write_linger_max_ms: 60,
            large_room: 1000,
            send_rate_per_sec: 100,
            send_burst: 200,
            rate_limit_strikes: 50,
            max_inflight_sends: 64,
            sched_batch: true,
            history_max: 200,
            sync_max: 1000,
            allowed_origins: Vec::new(),
            log_format: "text".into(),
            jwt_secret: None,
            token_ttl_secs: 7 * 24 * 3600,
            max_upload_bytes: 25 * 1024 * 1024,
            max_body_bytes: 64 * 1024,
            frame_rate_per_sec: 200,
            frame_burst: 400,
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            max_rooms_per_user: 1_000,
            store_busy_timeout_ms: 5_000,
            upload_quota_bytes: 1024 * 1024 * 1024,
            uploads_per_minute: 30,
            uploads_per_minute_per_ip: 120,
            upload_gc_age_secs: 24 * 3600,
            file_gc_interval_ms: 10 * 60 * 1000,
            file_pass_ttl_secs: 15 * 60,
            allowed_hosts: Vec::new(),
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            http_body_timeout_ms: 30_000,
            max_http_connections: 10_000,
            max_http_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
            ice_servers: Vec::new(),
            search_rate_per_min: 60,
            search_burst: 20,
            room_create_per_ip_per_min: 60,
            room_create_per_min: 600,
            auth_rate_per_min: 20,
            auth_burst: 20,
            hash_concurrency: 0,
            hash_queue: 32,
            max_signal_bytes: 16 * 1024,
            signal_bytes_per_sec: 64 * 1024,
            signal_burst_bytes: 256 * 1024,
            queue_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Config {
    /// The token signer of this configuration (reading or creating the secret file).
    pub fn tokens(&self) -> std::io::Result<crate::auth::Tokens> {
        let secret = match &self.jwt_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => crate::auth::load_or_create_secret(&self.data_dir)?,
        };
        Ok(crate::auth::Tokens::new(
            &secret,
            std::time::Duration::from_secs(self.token_ttl_secs),
        ))
    }

    /// Layers: defaults, then `file` (TOML, if given), then `HUBBUB_*` variables, then
    /// `overrides` (usually the command-line flags that were set).
    pub fn load(
        file: Option<&Path>,
        overrides: impl figment::Provider,
    ) -> Result<Config, Box<figment::Error>> {
        Self::load_with_env(file, "HUBBUB_", overrides)
    }

    /// [`Config::load`] with the environment variables named `prefix*`.
    fn load_with_env(
        file: Option<&Path>,
        prefix: &str,
        overrides: impl figment::Provider,
    ) -> Result<Config, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file_exact(file));
        }
        // Only variables naming a config key are read: others (HUBBUB_LOG, HUBBUB_CONFIG,
        // and what a platform injects, such as Kubernetes' HUBBUB_PORT=tcp://... for a
        // Service named hubbub) are left alone; `unknown_env_keys` lists them.
        fig.merge(
            Env::prefixed(prefix)
                .filter(|k| is_config_key(k.as_str()))
                .split("__"),
        )
        .merge(overrides)
        .extract()
        .map_err(Box::new)
    }

    /// The `HUBBUB_*` variables of `vars` that name no config key (and are not
    /// `HUBBUB_LOG` or `HUBBUB_CONFIG`), sorted: they are ignored, and worth a warning.
    pub fn unknown_env_keys(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        let mut unknown: Vec<String> = vars
            .into_iter()
            .filter_map(|(k, _)| {
                let key = k.strip_prefix("HUBBUB_")?.to_ascii_lowercase();
                let known = is_config_key(&key) || matches!(key.as_str(), "log" | "config");
                (!known).then_some(k)
            })
            .collect();
        unknown.sort();
        unknown
    }

    /// Whether guest mode is on: only when chosen (`guest = true`, `--guest`).
    pub fn guest_enabled(&self) -> bool {
        self.guest.unwrap_or(false)
    }

    /// The store this configuration names.
    pub fn store_kind(&self) -> Result<StoreKind<'_>, String> {
        let s = self.store.trim();
        if s.eq_ignore_ascii_case("sqlite") {
            return Ok(StoreKind::Sqlite);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreKind::Postgres(s));
        }
        Err(format!(
            "store must be sqlite or a postgres:// URL, got {:?}",
            redact_url(s)
        ))
    }

    /// Which bus [`Config::bus`] names.
    pub fn bus_kind(&self) -> Result<BusKind<'_>, String> {
        let s = self.bus.trim();
        if s.eq_ignore_ascii_case("local") {
            return Ok(BusKind::Local);
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            return Ok(BusKind::Redis(s));
        }
        Err(format!(
            "bus must be local or a redis:// URL, got {:?}",
            redact_url(s)
        ))
    }

    /// Whether this process is a node of a cluster (a Redis bus).
    pub fn is_cluster(&self) -> bool {
        matches!(self.bus_kind(), Ok(BusKind::Redis(_)))
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), String> {
        let store = self.store_kind()?;
        if let BusKind::Redis(_) = self.bus_kind()? {
            if store == StoreKind::Sqlite {
                return Err(
                    "a cluster node (bus = redis://...) needs a postgres:// store: \
                     the SQLite file belongs to one process"
                        .into(),
                );
            }
            if self.jwt_secret.as_deref().is_none_or(|s| s.len() < 32) {
                return Err(
                    "a cluster node (bus = redis://...) needs jwt_secret (at least 32 \
                     bytes, the same on every node): tokens signed by one node must be \
                     accepted by all"
                        .into(),
                );
            }
        }
        if self.write_linger_ms > 1000 || self.write_linger_max_ms > 1000 {
            return Err("write_linger_ms and write_linger_max_ms must be at most 1000".into());
        }
        if self.heartbeat_ms < 10 {
            return Err("heartbeat_ms must be at least 10".into());
        }
        if self.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
        }
        if !(MIN_WS_READ_BUFFER..=MAX_WS_READ_BUFFER).contains(&self.ws_read_buffer) {
            return Err(format!(
                "ws_read_buffer must be from {MIN_WS_READ_BUFFER} to {MAX_WS_READ_BUFFER} bytes \
                 (every connection holds one), got {}",
                self.ws_read_buffer
            ));
        }
        for (key, secs) in [
            ("token_ttl_secs", self.token_ttl_secs),
            ("file_pass_ttl_secs", self.file_pass_ttl_secs),
        ] {
            if !(1..=crate::auth::MAX_TOKEN_TTL_SECS).contains(&secs) {
                return Err(format!(
                    "{key} must be from 1 to {} (ten years), got {secs}",
                    crate::auth::MAX_TOKEN_TTL_SECS
                ));
            }
        }
        if self.queue_bytes < 64 * 1024 {
            return Err("queue_bytes must be at least 65536".into());
        }
        if self.queue_frames == 0 || self.max_inflight_sends == 0 {
            return Err("queue_frames and max_inflight_sends must be positive".into());
        }
        if self.send_rate_per_sec == 0 || self.send_burst == 0 {
            return Err("send_rate_per_sec and send_burst must be positive".into());
        }
        if self.frame_rate_per_sec == 0 || self.frame_burst == 0 {
            return Err("frame_rate_per_sec and frame_burst must be positive".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return Err("max_connections and max_connections_per_ip must be positive".into());
        }
        if self.history_max == 0 || self.sync_max == 0 {
            return Err("history_max and sync_max must be positive".into());
        }
        if self.uploads_per_minute == 0 || self.uploads_per_minute_per_ip == 0 {
            return Err("uploads_per_minute and uploads_per_minute_per_ip must be positive".into());
        }
        if self.file_gc_interval_ms == 0 {
            return Err("file_gc_interval_ms must be positive".into());
        }
        if self.max_http_connections == 0 || self.max_http_connections_per_ip == 0 {
            return Err(
                "max_http_connections and max_http_connections_per_ip must be positive".into(),
            );
        }
        if self.http_header_timeout_ms == 0
            || self.http_idle_timeout_ms == 0
            || self.http_body_timeout_ms == 0
        {
            return Err("the http_*_timeout_ms keys must be positive".into());
        }
        if self.room_create_per_ip_per_min == 0 || self.room_create_per_min == 0 {
            return Err(
                "room_create_per_ip_per_min and room_create_per_min must be positive".into(),
            );
        }
        if let Some(bad) = self
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains(['/', ' ']))
        {
            return Err(format!("allowed_hosts entry {bad:?} is not a host name"));
        }
        crate::client_addr::TrustedProxies::parse(&self.trusted_proxies)?;
        for server in &self.ice_servers {
            check_ice_server(server)?;
        }
        if self.search_rate_per_min == 0 || self.search_burst == 0 {
            return Err("search_rate_per_min and search_burst must be positive".into());
        }
        if self.auth_rate_per_min == 0 || self.auth_burst == 0 {
            return Err("auth_rate_per_min and auth_burst must be positive".into());
        }
        if self.signal_bytes_per_sec == 0 || self.signal_burst_bytes == 0 {
            return Err("signal_bytes_per_sec and signal_burst_bytes must be positive".into());
        }
        if self.max_signal_bytes > self.signal_burst_bytes as usize {
            return Err("max_signal_bytes must be at most signal_burst_bytes".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err("log_format is text or json".into());
        }
        Ok(())
    }
}

/// A list of strings, given as a list (the config file) or as one comma-separated string
/// (a `HUBBUB_*` variable or a flag); empty items are dropped.
fn list_or_comma_separated<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Given::deserialize(deserializer)? {
        Given::List(list) => list,
        Given::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// A list of JSON values, given as a list (the config file) or as JSON text (a
/// `HUBBUB_*` variable or a flag).
fn list_or_json<'de, D>(deserializer: D) -> Result<Vec<serde_json::Value>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<serde_json::Value>),
        Text(String),
    }
    match Given::deserialize(deserializer)? {
        Given::List(list) => Ok(list),
        Given::Text(text) if text.trim().is_empty() => Ok(Vec::new()),
        Given::Text(text) => serde_json::from_str(&text)
            .map_err(|e| serde::de::Error::custom(format!("not a JSON list: {e}"))),
    }
}

/// An `ice_servers` entry is an object with `urls` (a `stun:`, `turn:` or `turns:` URL,
/// or a list of them) and optional string `username` and `credential`.
fn check_ice_server(server: &serde_json::Value) -> Result<(), String> {
    let bad = |why: &str| Err(format!("ice_servers entry {server}: {why}"));
    let Some(obj) = server.as_object() else {
        return bad("not an object");
    };
    let urls: Vec<&serde_json::Value> = match obj.get("urls") {
        Some(serde_json::Value::Array(list)) if !list.is_empty() => list.iter().collect(),
        Some(one @ serde_json::Value::String(_)) => vec![one],
        _ => return bad("needs \"urls\": a URL or a list of URLs"),
    };
    for url in urls {
        let ok = url.as_str().is_some_and(|u| {
            ["stun:", "turn:", "turns:"]
                .iter()
                .any(|s| u.starts_with(s))
        });
        if !ok {
            return bad("urls must start with stun:, turn: or turns:");
        }
    }
    for (key, value) in obj {
        match key.as_str() {
            "urls" => {}
            "username" | "credential" if value.is_string() => {}
            _ => return bad(&format!("unknown or non-string key {key:?}")),
        }
    }
    Ok(())
}

/// Whether `key` (lower case, as figment sees an environment variable without its
/// prefix; nested keys as `outer__inner`) names a config key.
fn is_config_key(key: &str) -> bool {
    static KEYS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        });
    let top = key.split("__").next().unwrap_or(key);
    KEYS.iter().any(|k| k.eq_ignore_ascii_case(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_needs_postgres_and_a_shared_secret() {
        let mut c = Config {
            bus: "redis://127.0.0.1:6379".into(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        assert!(err.contains("postgres://"), "{err}");
        c.store = "postgres://hubbub@127.0.0.1:5432/hubbub".into();
        let err = c.validate().unwrap_err();
        assert!(err.contains("jwt_secret"), "{err}");
        c.jwt_secret = Some("short".into());
        assert!(c.validate().is_err(), "a short secret is refused");
        c.jwt_secret = Some("x".repeat(32));
        c.validate().expect("a valid cluster node");
        assert!(c.is_cluster());
        c.bus = "nats://127.0.0.1".into();
        assert!(c.validate().unwrap_err().contains("bus must be"));
    }

    #[test]
    fn the_websocket_read_buffer_is_bounded_both_ways() {
        Config::default().validate().expect("the default is valid");
        for bad in [0, 63, (1 << 20) + 1, 1 << 30] {
            let c = Config {
                ws_read_buffer: bad,
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("ws_read_buffer"), "{bad}: {err}");
        }
        for good in [64, 256, 1 << 20] {
            let c = Config {
                ws_read_buffer: good,
                ..Config::default()
            };
            c.validate().expect("within the bounds");
        }
    }

    #[test]
    fn token_and_file_pass_lifetimes_are_bounded_both_ways() {
        let max = crate::auth::MAX_TOKEN_TTL_SECS;
        for bad in [0, max + 1, u64::MAX] {
            let c = Config {
                token_ttl_secs: bad,
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("token_ttl_secs"), "{bad}: {err}");
            let c = Config {
                file_pass_ttl_secs: bad,
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("file_pass_ttl_secs"), "{bad}: {err}");
        }
        let c = Config {
            token_ttl_secs: max,
            file_pass_ttl_secs: max,
            ..Config::default()
        };
        c.validate().expect("ten years is allowed");
    }

    #[test]
    fn guest_mode_is_off_unless_chosen() {
        let mut c = Config::default();
        assert!(c.bind.ip().is_loopback());
        assert!(!c.guest_enabled(), "not even on a loopback address");
        c.guest = Some(true);
        assert!(c.guest_enabled());
    }

    #[test]
    fn unknown_environment_keys_are_ignored_and_listed_and_bad_values_name_the_key() {
        // figment reads the process environment, shared by the tests running at once:
        // this test uses a prefix of its own.
        let none = || Serialized::defaults(serde_json::json!({}));
        std::env::set_var("HBENVTEST_PORT", "tcp://10.0.0.1:8080");
        std::env::set_var("HBENVTEST_SERVICE_HOST", "10.0.0.1");
        std::env::set_var("HBENVTEST_SYNC_MAX", "77");
        let c = Config::load_with_env(None, "HBENVTEST_", none()).unwrap();
        assert_eq!(c.sync_max, 77, "known keys are still read");
        let vars = [
            ("HUBBUB_PORT", "tcp://10.0.0.1:8080"),
            ("HUBBUB_SERVICE_HOST", "10.0.0.1"),
            ("HUBBUB_SYNC_MAX", "77"),
            ("HUBBUB_LOG", "debug"),
            ("HUBBUB_CONFIG", "x.toml"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            Config::unknown_env_keys(vars),
            ["HUBBUB_PORT", "HUBBUB_SERVICE_HOST"]
        );
        std::env::set_var("HBENVTEST_SYNC_MAX", "lots");
        let err = Config::load_with_env(None, "HBENVTEST_", none()).unwrap_err();
        for k in [
            "HBENVTEST_SYNC_MAX",
            "HBENVTEST_PORT",
            "HBENVTEST_SERVICE_HOST",
        ] {
            std::env::remove_var(k);
        }
        let text = err.to_string();
        assert!(text.to_ascii_lowercase().contains("sync_max"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }

    #[test]
    fn trusted_proxies_come_as_a_list_or_comma_separated_and_bad_entries_stop_start_up() {
        let none = || Serialized::defaults(serde_json::json!({}));
        assert!(
            Config::default().trusted_proxies.is_empty(),
            "none by default"
        );
        std::env::set_var("HBPROXYTEST_TRUSTED_PROXIES", "10.0.0.0/8, ::1,,192.0.2.7");
        let c = Config::load_with_env(None, "HBPROXYTEST_", none());
        std::env::remove_var("HBPROXYTEST_TRUSTED_PROXIES");
        let c = c.unwrap();
        assert_eq!(c.trusted_proxies, ["10.0.0.0/8", "::1", "192.0.2.7"]);
        assert!(c.validate().is_ok());
        for one in ["127.0.0.1", "::1", "fd00::/8"] {
            std::env::set_var("HBPROXYTEST_TRUSTED_PROXIES", one);
            let c = Config::load_with_env(None, "HBPROXYTEST_", none());
            std::env::remove_var("HBPROXYTEST_TRUSTED_PROXIES");
            assert_eq!(c.unwrap().trusted_proxies, [one]);
        }

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hubbub.toml");
        std::fs::write(&file, "trusted_proxies = [\"127.0.0.1\", \"fd00::/8\"]\n").unwrap();
        let c = Config::load(Some(&file), none()).unwrap();
        assert_eq!(c.trusted_proxies, ["127.0.0.1", "fd00::/8"]);
        let flags = Serialized::defaults(serde_json::json!({"trusted_proxies": ["10.1.1.1"]}));
        let c = Config::load(Some(&file), flags).unwrap();
        assert_eq!(c.trusted_proxies, ["10.1.1.1"], "flags win");

        let bad = Config {
            trusted_proxies: vec!["127.0.0.1".into(), "proxy.internal".into()],
            ..Config::default()
        };
        let err = bad.validate().unwrap_err();
        assert!(
            err.contains("trusted_proxies") && err.contains("\"proxy.internal\""),
            "{err}"
        );
    }

    #[test]
    fn ice_servers_come_as_json_in_the_environment_or_a_list_in_the_file_and_are_checked() {
        let none = || Serialized::defaults(serde_json::json!({}));
        assert!(Config::default().ice_servers.is_empty(), "none by default");
        std::env::set_var(
            "HBICETEST_ICE_SERVERS",
            r#"[{"urls": ["stun:stun.example.org:3478"]}, {"urls": "turn:t.example.org", "username": "u", "credential": "p"}]"#,
        );
        let c = Config::load_with_env(None, "HBICETEST_", none());
        std::env::remove_var("HBICETEST_ICE_SERVERS");
        let c = c.unwrap();
        assert_eq!(c.ice_servers.len(), 2);
        assert_eq!(c.ice_servers[1]["username"], "u");
        assert!(c.validate().is_ok());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hubbub.toml");
        std::fs::write(&file, "[[ice_servers]]\nurls = [\"stun:s.example.org\"]\n").unwrap();
        let c = Config::load(Some(&file), none()).unwrap();
        assert_eq!(
            c.ice_servers,
            [serde_json::json!({"urls": ["stun:s.example.org"]})]
        );

        for bad in [
            serde_json::json!({"urls": "http://x"}),
            serde_json::json!({"url": "stun:x"}),
            serde_json::json!({"urls": "stun:x", "credential": 5}),
            serde_json::json!("stun:x"),
        ] {
            let c = Config {
                ice_servers: vec![bad.clone()],
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("ice_servers"), "{bad}: {err}");
        }
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hubbub.toml");
        std::fs::write(&file, "heartbeat_ms = 1234\nmax_text_bytes = 99\n").unwrap();
        let flags = Serialized::defaults(serde_json::json!({"heartbeat_ms": 777}));
        let c = Config::load(Some(&file), flags).unwrap();
        assert_eq!(c.heartbeat_ms, 777);
        assert_eq!(c.max_text_bytes, 99);
        assert!(Config::load(
            Some(&dir.path().join("missing.toml")),
            Serialized::defaults(serde_json::json!({}))
        )
        .is_err());
    }
}

/// A layer of overrides (e.g. the command-line flags that were given), as JSON.
#[derive(Debug, Clone)]
pub struct Overrides(Serialized<serde_json::Value>);

impl Overrides {
    pub fn new(value: serde_json::Value) -> Self {
        Overrides(Serialized::defaults(value))
    }
}

impl figment::Provider for Overrides {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("command-line flags")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.0.data()
    }
}
