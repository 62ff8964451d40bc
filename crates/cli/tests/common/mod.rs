//! Shared by the binary's tests: `hubbub serve` as a child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `hubbub serve` child process, killed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    /// `HOST:PORT` it listens on.
    pub(crate) addr: String,
}

impl Server {
    /// Starts `hubbub serve --bind BIND --data-dir DIR --guest` (these tests talk to it as
    /// guests, unless they pass `--no-guest`) with extra environment and waits for its
    /// listening line.
    #[allow(dead_code)] // not every test binary uses it
    pub(crate) fn start(dir: &Path, bind: &str, env: &[(&str, &str)]) -> Server {
        Self::start_with(dir, bind, &[], env)
    }

    /// [`Server::start`] with extra command-line arguments.
    pub(crate) fn start_with(
        dir: &Path,
        bind: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Self::start_logging_to(dir, bind, args, env, Stdio::inherit())
    }

    /// [`Server::start_with`], with the server's stderr (its log) going to `stderr`.
    pub(crate) fn start_logging_to(
        dir: &Path,
        bind: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hubbub"))
            .args(["serve", "--bind", bind, "--data-dir"])
            .arg(dir)
            .args((!args.contains(&"--no-guest")).then_some("--guest"))
            .args(args)
            .env("HUBBUB_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn hubbub serve");
        let addr = listening_addr(&mut child);
        Server { child, addr }
    }

    #[allow(dead_code)] // not every test binary uses it
    pub(crate) fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

/// Reads a starting `hubbub serve`'s first line from its piped stdout and returns the
/// `HOST:PORT` it listens on (panics on anything else).
#[allow(dead_code)] // not every test binary uses it
pub(crate) fn listening_addr(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the listening line");
    line.trim()
        .strip_prefix("hubbub listening on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
