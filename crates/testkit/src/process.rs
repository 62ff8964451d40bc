//! Child processes with a time limit, and what the servers need to know about processes.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What a finished command printed.
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// Its output for a panic message.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to its end, killing it after `limit`. Its output is read on two threads,
/// so a grandchild that keeps the pipes open cannot hold this up for more than a second
/// after the child itself exits.
pub(crate) fn run(cmd: &mut Command, limit: Duration) -> Result<Finished, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let status = match wait_for(&mut child, limit) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = wait_for(&mut child, Duration::from_secs(5));
            return Err(format!("{what} did not finish within {limit:?}"));
        }
    };
    let collect = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(1))
            .unwrap_or_else(|_| "(output not closed)\n".to_owned())
    };
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn read_all(mut from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// Waits up to `limit` for `child` to exit.
pub(crate) fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Polls `ready` until it holds or `limit` passes.
pub(crate) fn poll_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether process `pid` exists and is not a zombie (an orphan's zombie lingers when
/// PID 1 does not reap).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any
        // character: it is the first field after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid` (with kill(1): this crate has no unsafe code).
pub(crate) fn kill_9(pid: u32) {
    signal(pid, "KILL");
}

/// Sends SIGTERM to `pid`.
pub(crate) fn terminate(pid: u32) {
    signal(pid, "TERM");
}

fn signal(pid: u32, name: &str) {
    let _ = run(
        Command::new("kill").args([&format!("-{name}"), &pid.to_string()]),
        Duration::from_secs(5),
    );
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // "Uid:" lists the real, effective, saved and filesystem ids.
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let from_proc = status.as_deref().and_then(|s| {
        s.lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
    });
    from_proc.unwrap_or_else(|| id(&["-u"]))
}

/// `id ARGS` as a number, e.g. `id -u postgres`.
pub(crate) fn id(args: &[&str]) -> u32 {
    let out = run(Command::new("id").args(args), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {}: no number: {}", args.join(" "), out.describe()))
}

/// The space left on the file system of `path`, from df(1); None when that fails.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let out = run(
        Command::new("df").args(["-P", "-k", "--"]).arg(path),
        Duration::from_secs(10),
    )
    .ok()?;
    // "Filesystem 1024-blocks Used Available Capacity Mounted on", then one line.
    let kib: u64 = out
        .stdout
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    out.status.success().then_some(kib * 1024)
}

/// The last lines of a log file, for a panic message.
pub(crate) fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            format!("--- last lines of {}\n{tail}", path.display())
        }
        Err(e) => format!("--- no log at {}: {e}", path.display()),
    }
}

/// Why a server did not start.
pub(crate) enum Failed {
    /// Its port was taken: worth another try (on another port, or after a wait).
    PortInUse(String),
    Other(String),
}

/// Runs `launch` until it starts the server: at most `attempts` times while the port is
/// taken, calling `between` before each retry. Panics with `what` and the reason
/// otherwise.
pub(crate) fn launch_retrying(
    what: &str,
    attempts: usize,
    mut between: impl FnMut(),
    mut launch: impl FnMut() -> Result<(), Failed>,
) {
    for attempt in 1.. {
        match launch() {
            Ok(()) => return,
            Err(Failed::PortInUse(_)) if attempt < attempts => between(),
            Err(Failed::PortInUse(why) | Failed::Other(why)) => panic!("{what}: {why}"),
        }
    }
}
