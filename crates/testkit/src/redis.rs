//! A Redis server in a temp dir.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::port::free_port;
use crate::process::{launch_retrying, log_tail, wait_for, Failed};

/// How long a started server may take to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// Starts that fail because another process took the port just before.
const PORT_ATTEMPTS: usize = 5;

/// A Redis server of its own (`redis-server` from `PATH`: the Debian package
/// `redis-server`), a child of this process listening on a free `127.0.0.1` port, with
/// no persistence (`--save '' --appendonly no`) and its temp dir as working dir. Dropping
/// it kills it (SIGKILL to its PID) and removes the temp dir. Its log is `redis.log` in
/// [`RedisServer::dir`].
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    // Last, so that the server is gone before the dir goes.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING; panics (with the tail of its log)
    /// when it does not.
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("hubbub-testkit-redis-")
            .tempdir()
            .expect("create a temp dir for Redis");
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir,
        };
        launch_retrying(
            "redis-server did not start",
            PORT_ATTEMPTS,
            || {},
            || {
                server.port = free_port();
                server.launch()
            },
        );
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on (the same after [`RedisServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID. Panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("the Redis server is not running")
            .id()
    }

    /// The temp dir (its working dir and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether it answers PING with PONG within a second.
    pub fn ping(&self) -> bool {
        ping(self.addr(), Duration::from_secs(1))
    }

    /// SIGKILL to its PID, then waits until it is gone. Everything it held is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let status = wait_for(&mut child, Duration::from_secs(10));
            assert!(
                status.is_some(),
                "redis-server {} still running 10 s after SIGKILL",
                child.id()
            );
        }
    }

    /// Starts the killed server again on the same port, empty. Panics when it does not
    /// start, or when the port stays taken for a few seconds.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the Redis server is already running");
        launch_retrying(
            "redis-server did not start again",
            20,
            || std::thread::sleep(Duration::from_millis(250)),
            || self.launch(),
        );
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns redis-server and waits until it answers PING.
    fn launch(&mut self) -> Result<(), Failed> {
        let log = self.log();
        let log_before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open redis.log");
        let err = out.try_clone().expect("clone the redis.log handle");
        let port = self.port.to_string();
        let mut child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server: {e}; install the Debian package redis-server \
                     (./test.sh does)"
                )
            });
        let deadline = Instant::now() + READY_WITHIN;
        let mut pause = Duration::from_millis(1);
        let why = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("redis-server exited: {status}");
            }
            // The PID check: another server that took the port must not pass for this one.
            if ping(self.addr(), Duration::from_millis(500))
                && server_pid(self.addr(), Duration::from_secs(1)) == Some(child.id())
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = wait_for(&mut child, Duration::from_secs(10));
                break format!("no PONG within {READY_WITHIN:?}");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        let new_log = fs::read(&log)
            .map(|bytes| String::from_utf8_lossy(&bytes[log_before as usize..]).into_owned())
            .unwrap_or_default();
        let why = format!("{why}\n{}", log_tail(&log));
        if new_log.contains("Address already in use") {
            Err(Failed::PortInUse(why))
        } else {
            Err(Failed::Other(why))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if wait_for(&mut child, Duration::from_secs(10)).is_none() {
                eprintln!(
                    "hubbub-testkit: redis-server {} still running after SIGKILL",
                    child.id()
                );
            }
        }
    }
}

/// PING in RESP; true on `+PONG`.
fn ping(addr: SocketAddr, limit: Duration) -> bool {
    let answer = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    answer().unwrap_or(false)
}

/// The `process_id` in the answer to `INFO server`.
fn server_pid(addr: SocketAddr, limit: Duration) -> Option<u32> {
    let answer = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        stream.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")?;
        // A bulk string: "$LEN\r\n", LEN bytes, "\r\n".
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        reader.read_line(&mut head)?;
        let len: usize = head
            .strip_prefix('$')
            .and_then(|n| n.trim_end().parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a bulk string: {head:?}")))?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    let info = answer().ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_taken_port_is_told_apart_from_other_failures() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut server = RedisServer {
            port: taken.local_addr().expect("address").port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        match server.launch() {
            Err(Failed::PortInUse(_)) => {}
            Err(Failed::Other(why)) => panic!("not seen as a taken port: {why}"),
            Ok(()) => panic!("started on a taken port"),
        }
        assert!(server.child.is_none());
        server.port = free_port();
        assert!(server.launch().is_ok(), "starts on a free port");
        assert!(server.ping());
    }
}
