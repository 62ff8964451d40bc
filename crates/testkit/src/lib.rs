//! Real PostgreSQL, Redis and nginx servers for test suites, started by the test itself.
//!
//! Each server lives in its own temp dir, listens on a free `127.0.0.1` port, and is
//! stopped by its PID when dropped; no service is ever assumed to be running. This crate
//! is for tests only (`[dev-dependencies]`): nothing in it belongs in production code.
//!
//! ```no_run
//! use hubbub_testkit::{NginxServer, PgServer, RedisServer};
//!
//! let pg = PgServer::start();
//! let url = pg.create_database(); // postgres://postgres@127.0.0.1:PORT/test_1
//! let redis = RedisServer::start();
//! let redis_url = redis.url(); // redis://127.0.0.1:PORT
//! // deploy/nginx.conf in front of hubbub nodes on loopback addresses.
//! let node: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
//! let nginx = NginxServer::start(&[node]);
//! let ws = nginx.ws_url(); // ws://127.0.0.1:PORT
//! # let _ = (url, redis_url, ws);
//! ```
//!
//! Needs the Debian packages `postgresql` (binaries under `/usr/lib/postgresql/*/bin`),
//! `redis-server` and `nginx`; the repository's `test.sh` installs them. Every wait is
//! bounded: a server that does not come up panics with the tail of its log.

mod nginx;
mod pg;
mod port;
mod process;
mod redis;

pub use nginx::NginxServer;
pub use pg::PgServer;
pub use port::free_port;
pub use redis::RedisServer;
