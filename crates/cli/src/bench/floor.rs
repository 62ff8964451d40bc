//! `hubbub bench floor`: what one loopback send costs this machine's kernel, the floor
//! under any server's CPU per delivery.
//!
//! A writer thread pinned to one core writes frames of a given size to N loopback TCP
//! connections in turn, at a fixed rate, one `write` per frame (or K frames per write);
//! a reader thread pinned to another core reads every connection, as clients would. The
//! writer's own CPU time (user and system, from `getrusage(RUSAGE_THREAD)`) divided by
//! its writes is the cost of a send: on loopback it includes the receiving side's TCP
//! work and waking the reader, which the kernel does in the sender's system call. No
//! server does less per send than this loop.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::resource::{getrusage, UsageWho};
use nix::unistd::Pid;

/// What a floor run measures.
#[derive(Debug, Clone, Copy, clap::Args, serde::Serialize)]
pub(crate) struct FloorArgs {
    /// Connections written in turn.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Bytes per frame (a hubbub message of a 100-byte text is about 200 bytes).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Frames per second (all connections together).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Frames joined into one write.
    #[arg(long, default_value_t = 1)]
    per_write: usize,
    /// Seconds of writing.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Core of the writing thread.
    #[arg(long, default_value_t = 0)]
    writer_cpu: usize,
    /// Core of the reading thread.
    #[arg(long, default_value_t = 1)]
    reader_cpu: usize,
}

fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("no such core")?;
    sched_setaffinity(Pid::from_raw(0), &set).context("pinning a thread")
}

fn thread_cpu_secs() -> anyhow::Result<f64> {
    let u = getrusage(UsageWho::RUSAGE_THREAD).context("getrusage")?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(secs(u.user_time()) + secs(u.system_time()))
}

pub(super) fn run(args: FloorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.conns > 0 && args.size > 0 && args.per_write > 0 && args.rate > 0);
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(args.conns);
    let mut readers = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        let w = TcpStream::connect(addr).context("connecting on loopback")?;
        w.set_nodelay(true)?;
        let (r, _) = listener.accept()?;
        r.set_nonblocking(true)?;
        writers.push(w);
        readers.push(r);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let read_bytes = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, read_bytes) = (stop.clone(), read_bytes.clone());
        let cpu = args.reader_cpu;
        std::thread::spawn(move || read_all(readers, cpu, &stop, &read_bytes))
    };
    pin(args.writer_cpu)?;
    let frame = vec![b'x'; args.size * args.per_write];
    let writes_per_sec = args.rate as f64 / args.per_write as f64;
    let total = (writes_per_sec * args.duration) as u64;
    let cpu_before = thread_cpu_secs()?;
    let start = Instant::now();
    let mut next = 0usize;
    let mut written = 0u64;
    // Writes in 1 ms slices, so the rate holds without a timer per write.
    while written < total {
        let due = (start.elapsed().as_secs_f64() * writes_per_sec) as u64;
        while written < due.min(total) {
            writers[next]
                .write_all(&frame)
                .context("writing on loopback")?;
            next = (next + 1) % writers.len();
            written += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cpu = thread_cpu_secs()? - cpu_before;
    let elapsed = start.elapsed().as_secs_f64();
    // Let the reader catch up, then stop it.
    let expected = total * frame.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_bytes.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let reader_cpu = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader failed"))??;
    let per_write_us = cpu / written as f64 * 1e6;
    let per_frame_us = per_write_us / args.per_write as f64;
    let json = serde_json::json!({
        "scenario": "floor",
        "params": args,
        "writes": written,
        "elapsed_secs": elapsed,
        "writer_cpu_secs": cpu,
        "reader_cpu_secs": reader_cpu,
        "cpu_us_per_write": per_write_us,
        "cpu_us_per_frame": per_frame_us,
        "read_bytes": read_bytes.load(Ordering::Relaxed),
    });
    println!("{json}");
    println!(
        "floor: {written} writes of {} bytes ({} frames each) over {} connections in {elapsed:.1} s: writer CPU {cpu:.2} s = {per_write_us:.2} us per write, {per_frame_us:.2} us per frame (= {:.2} s per million frames); reader CPU {reader_cpu:.2} s",
        frame.len(),
        args.per_write,
        args.conns,
        per_frame_us,
    );
    Ok(())
}

/// Reads every connection until `stop`, counting bytes, one task per connection on one
/// thread (so each socket is watched by epoll, as a client's would be); returns the
/// thread's CPU time.
fn read_all(
    conns: Vec<TcpStream>,
    cpu: usize,
    stop: &AtomicBool,
    read_bytes: &Arc<AtomicU64>,
) -> anyhow::Result<f64> {
    use tokio::io::AsyncReadExt;
    pin(cpu)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the reader's runtime")?;
    let before = thread_cpu_secs()?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(conns.len());
        for c in conns {
            let mut c = tokio::net::TcpStream::from_std(c)?;
            let read_bytes = read_bytes.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            }));
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in tasks {
            t.abort();
        }
        anyhow::Ok(())
    })?;
    Ok(thread_cpu_secs()? - before)
}
