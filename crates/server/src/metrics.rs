//! Prometheus metrics of one server instance (a registry per server, so several servers
//! in one process, as in tests, do not mix their numbers). Served at `GET /metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder};

/// Every metric hubbub records.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGauge,
    pub connections_total: IntCounter,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub messages_stored: IntCounter,
    /// Presence announcements not made because the store could not list the user's
    /// conversations in time.
    pub presence_skipped: IntCounter,
    /// Cluster events dropped because Redis was away too long (messages are caught up).
    pub cluster_dropped: IntCounter,
    /// Conversations a cluster node found behind the store and caught up.
    pub cluster_catch_ups: IntCounter,
    /// Subscriptions of this cluster node to the other nodes' events (one more after each
    /// loss of Redis).
    pub cluster_subscriptions: IntCounter,
    pub deliveries: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub auth_failures: IntCounter,
    pub store_batch_size: Histogram,
    pub store_commit_seconds: Histogram,
    /// Checkpoints of the SQLite write-ahead log into the database file.
    pub store_checkpoint_seconds: Histogram,
    pub store_writer_panics: IntCounter,
    pub rooms_cached: IntGauge,
    /// Password hashes and checks running now (argon2id, bounded by `hash_concurrency`).
    pub password_hashes_active: IntGauge,
    /// Requests waiting for a place to hash a password (bounded by `hash_queue`).
    pub password_hashes_waiting: IntGauge,
}

// Metric names and help texts below are constants; creating and registering them can only
// fail on a programming error (a duplicate or malformed name), caught by the tests.
#[allow(clippy::expect_used)]
impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("hubbub".into()), None).expect("registry");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique counter");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique histogram");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique gauge");
            g
        };
        let connections_open = gauge("connections_open", "WebSocket sessions open now");
        let rooms_cached = gauge(
            "rooms_cached",
            "rooms whose member lists are held in memory now",
        );
        let password_hashes_active = gauge(
            "password_hashes_active",
            "password hashes and checks running now",
        );
        let password_hashes_waiting = gauge(
            "password_hashes_waiting",
            "requests waiting for a place to hash a password",
        );
        Metrics {
            connections_open,
            connections_total: counter("connections_total", "WebSocket sessions opened"),
            frames_in: counter("frames_in_total", "protocol messages received from clients"),
            frames_out: counter(
                "frames_out_total",
                "WebSocket frames written to clients (each may carry several messages)",
            ),
            messages_stored: counter("messages_stored_total", "messages appended to the store"),
            presence_skipped: counter(
                "presence_announcements_skipped_total",
                "presence changes not announced because the store did not answer in time",
            ),
            cluster_dropped: counter(
                "cluster_events_dropped_total",
                "events for other nodes dropped while redis was unreachable",
            ),
            cluster_catch_ups: counter(
                "cluster_catch_ups_total",
                "conversations caught up from the store after a missed event",
            ),
            cluster_subscriptions: counter(
                "cluster_subscriptions_total",
                "subscriptions to the cluster's events (one more after each loss of redis)",
            ),
            deliveries: counter("deliveries_total", "pushes queued to sessions"),
            slow_consumer_closes: counter(
                "slow_consumer_closes_total",
                "sessions closed because their outgoing queue was full",
            ),
            auth_failures: counter(
                "auth_failures_total",
                "refused credentials (WebSocket upgrade, HTTP, login)",
            ),
            store_batch_size: histogram(
                "store_batch_size",
                "write operations per store transaction",
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                    4096.0,
                ],
            ),
            store_commit_seconds: histogram(
                "store_commit_seconds",
                "time to apply and commit one store batch",
                prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("buckets"),
            ),
            store_checkpoint_seconds: histogram(
                "store_checkpoint_seconds",
                "time to copy the write-ahead log into the database file (SQLite)",
                prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("buckets"),
            ),
            store_writer_panics: counter(
                "store_writer_panics_total",
                "store batches abandoned because the writer panicked (it keeps running)",
            ),
            rooms_cached,
            password_hashes_active,
            password_hashes_waiting,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_every_metric() {
        let m = super::Metrics::new();
        m.frames_in.inc();
        m.store_batch_size.observe(3.0);
        let text = m.render();
        for name in [
            "hubbub_frames_in_total 1",
            "hubbub_connections_open",
            "hubbub_store_batch_size_bucket",
            "hubbub_store_commit_seconds_bucket",
            "hubbub_store_checkpoint_seconds_bucket",
            "hubbub_slow_consumer_closes_total",
            "hubbub_auth_failures_total",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
