//! Test harness: a real server on 127.0.0.1:0 with a temp data dir, and real clients.
//!
//! With `HUBBUB_TEST_STORE=postgres`, every server made by [`TestServer::with`] stores
//! its messages in a PostgreSQL database of its own (a real PostgreSQL server started for
//! it by the test kit); `./test.sh` runs the chat stories that way as well.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use hubbub_client::{Client, ConnectOptions};
use hubbub_server::Config;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound for every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    /// The configuration it runs with (kept by `restart`).
    pub config: Config,
    /// The PostgreSQL server of its store, when the stories run on PostgreSQL.
    pub pg: Option<hubbub_testkit::PgServer>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server with the default configuration (guest mode on).
    pub async fn start() -> TestServer {
        Self::with(|_| {}).await
    }

    /// A server whose configuration `f` may change.
    pub async fn with(f: impl FnOnce(&mut Config)) -> TestServer {
        Self::with_store(on_postgres(), f).await
    }

    /// A server on PostgreSQL whatever `HUBBUB_TEST_STORE` says.
    pub async fn with_postgres(f: impl FnOnce(&mut Config)) -> TestServer {
        Self::with_store(true, f).await
    }

    async fn with_store(postgres: bool, f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pg = if postgres {
            let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
                .await
                .expect("start postgres");
            Some(pg)
        } else {
            None
        };
        let store = pg.as_ref().map(|pg| pg.create_database());
        Self::serve(listener, dir, pg, |c| {
            if let Some(url) = store {
                c.store = url;
            }
            f(c)
        })
        .await
    }

    /// A node of a cluster: the PostgreSQL store at `store`, the Redis bus at `bus`, the
    /// secret every node of the tests' clusters shares.
    pub async fn node(store: &str, bus: &str, f: impl FnOnce(&mut Config)) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, bus) = (store.to_string(), bus.to_string());
        Self::serve(listener, dir, None, |c| {
            c.store = store;
            c.bus = bus;
            c.jwt_secret = Some("the secret of the test cluster, 32+ bytes".into());
            f(c)
        })
        .await
    }

    /// A server on an existing data dir (its embedded store).
    pub async fn in_dir(dir: TempDir, f: impl FnOnce(&mut Config)) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener, dir, None, f).await
    }

    /// Stops this server gracefully and starts a new one on the same address and data
    /// dir (clients see a real disconnect and can reconnect to the same URL).
    pub async fn restart(mut self) -> TestServer {
        let addr = self.addr;
        let config = self.config.clone();
        let pg = self.pg.take();
        let dir = self.stop().await;
        let mut tries = 0;
        // The old socket may take a moment to go away.
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        Self::serve(listener, dir, pg, |c| *c = config).await
    }

    async fn serve(
        listener: TcpListener,
        dir: TempDir,
        pg: Option<hubbub_testkit::PgServer>,
        f: impl FnOnce(&mut Config),
    ) -> TestServer {
        // HUBBUB_TEST_LOG=debug shows the server's logs of a failing test.
        if let Ok(filter) = std::env::var("HUBBUB_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let addr = listener.local_addr().expect("addr");
        let mut config = Config {
            bind: addr,
            data_dir: dir.path().to_path_buf(),
            guest: Some(true),
            ..Config::default()
        };
        f(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hubbub_server::run(listener, config.clone(), async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            dir,
            config,
            pg,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The current value of an unlabelled metric from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = http()
            .get(self.http("/metrics"))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("read /metrics");
        metric(&text, name)
    }

    /// A WebSocket of guest `user` (device `raw`) without the client library: it sees
    /// the frames as they were written.
    #[allow(dead_code)]
    pub async fn raw_ws(&self, user: &str) -> RawWs {
        let url = format!("{}/ws?user={user}&device=raw", self.url());
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("upgrade in time")
            .expect("upgrade");
        ws
    }

    /// A connected guest on the default device.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_opts(ConnectOptions::guest(self.url(), user))
            .await
    }

    /// A connected guest on `device`.
    pub async fn connect_device(&self, user: &str, device: &str) -> Client {
        self.connect_opts(ConnectOptions::guest(self.url(), user).device(device))
            .await
    }

    pub async fn connect_opts(&self, opts: ConnectOptions) -> Client {
        tokio::time::timeout(WAIT, Client::connect(opts))
            .await
            .expect("connect timed out")
            .expect("connect failed")
    }

    /// Stops the server gracefully and returns its data dir.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server did not stop in time")
                .expect("server task panicked")
                .expect("server returned an error");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Whether the stories run on PostgreSQL (`HUBBUB_TEST_STORE=postgres`).
/// A WebSocket without the client library (see [`TestServer::raw_ws`]).
#[allow(dead_code)]
pub type RawWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn on_postgres() -> bool {
    std::env::var("HUBBUB_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// Lifts the per-connection rate limits, for stories that send as fast as they can.
pub fn unlimited(c: &mut Config) {
    c.send_rate_per_sec = 1_000_000;
    c.send_burst = 1_000_000;
    c.frame_rate_per_sec = 1_000_000;
    c.frame_burst = 1_000_000;
}

/// An HTTP client for the API (loopback only, no proxies).
/// A copy of every TCP socket of this process (the test servers run in it): the servers'
/// ends of their connections included, to check their options.
#[allow(dead_code)] // not every test binary looks at sockets
pub fn tcp_sockets_of_this_process() -> Vec<std::net::TcpStream> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd of this process");
    std::fs::read_dir("/proc/self/fd")
        .expect("list descriptors")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|fd| pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()).ok())
        .map(std::net::TcpStream::from)
        .filter(|stream| stream.peer_addr().is_ok())
        .collect()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("http client")
}

/// The value of the unlabelled metric `name` in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The code of an `error` answer (panics on any other failure).
pub fn error_code(e: hubbub_client::ClientError) -> hubbub_protocol::ErrorCode {
    match e {
        hubbub_client::ClientError::Server(p) => p.code,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

/// POSTs a JSON body; returns the status and the JSON answer (`Null` if none).
pub async fn post_json(
    server: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = http()
        .post(server.http(path))
        .json(body)
        .send()
        .await
        .expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Connection options that authenticate with `token` (as `Authorization: Bearer`).
pub fn token_opts(url: String, token: &str) -> hubbub_client::ConnectOptions {
    let mut o = hubbub_client::ConnectOptions::guest(url, "unused");
    o.user = None;
    o.token = Some(token.to_string());
    o
}

/// The secret test servers with accounts sign tokens with.
pub const SECRET: &str = "a test secret that is long enough for HS256";

/// Registers `user` and logs in; returns the token.
pub async fn register_and_login(server: &TestServer, user: &str) -> String {
    let http = http();
    let body = serde_json::json!({"username": user, "password": "correct horse"});
    let r = http
        .post(server.http("/api/register"))
        .json(&body)
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201, "register {user}");
    let r = http
        .post(server.http("/api/login"))
        .json(&body)
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "login {user}");
    let v: serde_json::Value = r.json().await.expect("login json");
    v["token"].as_str().expect("token").to_string()
}

/// Nodes of one cluster: one PostgreSQL, one Redis, started for the test.
pub struct Cluster {
    pub nodes: Vec<TestServer>,
    pub redis: hubbub_testkit::RedisServer,
    _pg: hubbub_testkit::PgServer,
}

/// A cluster of `n` nodes with the rate limits lifted ([`unlimited`]).
pub async fn cluster(n: usize) -> Cluster {
    cluster_with(n, unlimited).await
}

/// A cluster of `n` nodes, each configured by `f`.
pub async fn cluster_with(n: usize, f: impl Fn(&mut Config)) -> Cluster {
    let pg = tokio::task::spawn_blocking(hubbub_testkit::PgServer::start)
        .await
        .unwrap();
    let redis = tokio::task::spawn_blocking(hubbub_testkit::RedisServer::start)
        .await
        .unwrap();
    let store = pg.create_database();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(TestServer::node(&store, &redis.url(), &f).await);
    }
    Cluster {
        nodes,
        redis,
        _pg: pg,
    }
}
