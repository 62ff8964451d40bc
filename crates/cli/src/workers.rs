//! `hubbub serve --workers N`: N node processes sharing one port (`SO_REUSEPORT`), each a
//! full node of the cluster on the shared store and bus. One machine then holds more
//! connections than one process's file limit allows, and uses every core.
//!
//! The parent binds the address first (so `:0` becomes one port for all), starts the
//! workers with the same arguments plus `--reuse-port --bind ADDR`, prints the listening
//! line once every worker listens, restarts a worker that dies, and on SIGTERM or Ctrl-C
//! passes SIGTERM on and waits for all of them.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Longest wait for a worker to say it listens.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the workers to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause before a worker that died is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// In a worker: asks the kernel to send SIGTERM when the parent dies (even by -9), so
/// no worker outlives it.
pub(crate) fn follow_parent() -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).context("following the parent")?;
    // The parent may have died before that.
    anyhow::ensure!(
        nix::unistd::getppid() != Pid::from_raw(1),
        "the parent process is gone"
    );
    Ok(())
}

/// A listener socket on `addr` that other processes may bind as well.
pub(crate) fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The command-line arguments of this process without `--workers N` and `--bind ADDR`
/// (each in either spelling).
fn worker_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--workers" || a == "--bind" {
            args.next();
            continue;
        }
        if a.starts_with("--workers=") || a.starts_with("--bind=") {
            continue;
        }
        out.push(a);
    }
    out
}

struct Worker {
    child: Child,
}

async fn start_worker(args: &[String], addr: SocketAddr) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut child = Command::new(exe)
        .args(args)
        .args(["--reuse-port", "--bind", &addr.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker")?;
    let stdout = child.stdout.take().context("a worker's output")?;
    let mut lines = BufReader::new(stdout).lines();
    let listening = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("hubbub listening on ") {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    match listening {
        Ok(Ok(true)) => {}
        _ => anyhow::bail!("a worker did not start (its log says why)"),
    }
    // The rest of its output is not needed; keep the pipe drained.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Worker { child })
}

fn terminate(worker: &Worker) {
    if let Some(pid) = worker.child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
}

/// Runs `n` workers on `bind` until SIGTERM or Ctrl-C.
pub(crate) fn run(n: usize, bind: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Held (bound, listening) until the end, so the port stays this group's.
        let holder = reuse_port_listener(bind).with_context(|| format!("binding {bind}"))?;
        let addr = holder.local_addr()?;
        // The holder takes no connections: the workers' sockets do (it is closed for
        // accepting by never being polled; the kernel spreads new connections over every
        // listening socket, so it is dropped as soon as the workers listen).
        let args = worker_args();
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            workers.push(start_worker(&args, addr).await?);
        }
        drop(holder);
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "hubbub listening on http://{addr} ({n} workers)");
            let _ = out.flush();
        }
        tracing::info!(%addr, workers = n, "workers started");
        let mut shutdown = std::pin::pin!(crate::shutdown_signal());
        loop {
            let exited = async {
                let waits = workers
                    .iter_mut()
                    .enumerate()
                    .map(|(i, w)| Box::pin(async move { (i, w.child.wait().await) }));
                futures_util::future::select_all(waits).await.0
            };
            tokio::select! {
                _ = &mut shutdown => break,
                (i, status) = exited => {
                    tracing::warn!(worker = i, status = ?status.ok(), "a worker exited; starting it again");
                    tokio::time::sleep(RESTART_PAUSE).await;
                    match start_worker(&args, addr).await {
                        Ok(w) => workers[i] = w,
                        Err(e) => tracing::error!(error = %e, "cannot start a worker again"),
                    }
                }
            }
        }
        for w in &workers {
            terminate(w);
        }
        let mut clean = true;
        for w in &mut workers {
            match tokio::time::timeout(STOP_TIMEOUT, w.child.wait()).await {
                Ok(Ok(status)) => clean &= status.success(),
                _ => {
                    clean = false;
                    let _ = w.child.kill().await;
                }
            }
        }
        anyhow::ensure!(clean, "a worker did not stop cleanly");
        Ok(())
    })
}
