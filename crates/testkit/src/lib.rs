//! Real PostgreSQL and Redis servers for test suites, started by the test itself.
//!
//! Each server lives in its own temp dir, listens on a free `127.0.0.1` port, and is
//! stopped by its PID when dropped; no service is ever assumed to be running. This crate
//! is for tests only (`[dev-dependencies]`): nothing in it belongs in production code.
//!
//! ```no_run
//! use hubbub_testkit::{PgServer, RedisServer};
//!
//! let pg = PgServer::start();
//! let url = pg.create_database(); // postgres://postgres@127.0.0.1:PORT/test_1
//! let redis = RedisServer::start();
//! let redis_url = redis.url(); // redis://127.0.0.1:PORT
//! # let _ = (url, redis_url);
//! ```
//!
//! Needs the Debian packages `postgresql` (binaries under `/usr/lib/postgresql/*/bin`)
//! and `redis-server`; the repository's `test.sh` installs them. Every wait is bounded:
//! a server that does not come up panics with the tail of its log.

mod pg;
mod port;
mod process;
mod redis;

pub use pg::PgServer;
pub use port::free_port;
pub use redis::RedisServer;
