//! Typed configuration: defaults < config file < `HUBBUB_*` environment < command-line
//! flags. The binary collects flags into a [`figment`] provider and calls [`Config::load`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Everything `hubbub serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Directory for the database and attachments.
    pub data_dir: PathBuf,
    /// Users with admin rights (authenticated by token, never as guests).
    pub admins: Vec<String>,
    /// Guest mode (`?user=NAME`). `None`: on when bound to a loopback address.
    pub guest: Option<bool>,
    /// Interval of server pings; a connection silent for 2.5x this is closed.
    pub heartbeat_ms: u64,
    /// Largest accepted WebSocket frame (after joining fragments).
    pub max_frame_bytes: usize,
    /// Largest text content, in UTF-8 bytes.
    pub max_text_bytes: usize,
    /// Bound of each session's outgoing queue, in protocol messages.
    pub queue_frames: usize,
    /// Read buffer of each WebSocket, in bytes.
    pub ws_read_buffer: usize,
    /// Most coalesced bytes the writer puts into one outgoing frame.
    pub max_coalesce_bytes: usize,
    /// A connection written to less than this many milliseconds ago waits until then
    /// before its next frame, so that a busy connection's messages share frames (0: off).
    pub write_linger_ms: u64,
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
    /// Bound of each session's outgoing queue, in bytes (of the encoded frames queued and
    /// not yet written). A push beyond it closes the session as a slow consumer; answers
    /// to the session's own requests wait while the queue holds half of it (or half of
    /// `queue_frames`), so that pushes always find room.
    pub queue_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("hubbub-data"),
            admins: Vec::new(),
            guest: None,
            heartbeat_ms: 25_000,
            max_frame_bytes: 65_536,
            max_text_bytes: 16_384,
            queue_frames: 1024,
            ws_read_buffer: 512,
            max_coalesce_bytes: 64 * 1024,
            write_linger_ms: 5,
            large_room: 1000,
            send_rate_per_sec: 100,
            send_burst: 200,
            rate_limit_strikes: 50,
            max_inflight_sends: 64,
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
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file_exact(file));
        }
        // HUBBUB_LOG (log filter) and HUBBUB_CONFIG (the file) are not config keys.
        fig.merge(
            Env::prefixed("HUBBUB_")
                .ignore(&["log", "config"])
                .split("__"),
        )
        .merge(overrides)
        .extract()
        .map_err(Box::new)
    }

    /// Whether guest mode is on, applying the loopback default.
    pub fn guest_enabled(&self) -> bool {
        self.guest.unwrap_or_else(|| self.bind.ip().is_loopback())
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms < 10 {
            return Err("heartbeat_ms must be at least 10".into());
        }
        if self.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
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
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err("log_format is text or json".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_defaults_to_loopback_only() {
        let mut c = Config::default();
        assert!(c.guest_enabled());
        c.bind = "0.0.0.0:80".parse().unwrap();
        assert!(!c.guest_enabled());
        c.guest = Some(true);
        assert!(c.guest_enabled());
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
