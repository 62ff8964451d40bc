//! `hubbub bench disk`: how long this machine's disk takes to make a commit durable, the
//! floor under the SQLite store's ack latency.
//!
//! Like the store's write-ahead log, a file in `--dir` is written page by page, `--pages`
//! pages at a time, each batch followed by an `fsync`, one batch every `--interval-ms`;
//! the file is rewritten from its start every 4,000 pages. Reports the `fsync` times:
//! percentiles, the longest, and how many took longer than `--slow-ms` and how long
//! those took together. An acknowledgement that waits for a durable commit waits for one
//! of these, so a stall here is a stall of every send in flight, whatever the server.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

/// What a disk run measures.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub(crate) struct DiskArgs {
    /// Directory of the file written (the data directory's disk is the one that matters).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Pages written before each fsync (a commit of a hundred direct messages writes
    /// about a hundred).
    #[arg(long, default_value_t = 100)]
    pages: usize,
    /// Bytes per page.
    #[arg(long, default_value_t = 4096)]
    page_size: usize,
    /// Milliseconds between the end of one fsync and the next batch.
    #[arg(long, default_value_t = 3)]
    interval_ms: u64,
    /// An fsync longer than this many milliseconds counts as a stall.
    #[arg(long, default_value_t = 20)]
    slow_ms: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

/// Pages the file holds before it is rewritten from its start.
const FILE_PAGES: usize = 4000;

pub(super) fn run(args: DiskArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.pages > 0 && args.page_size > 0,
        "--pages and --page-size must be positive"
    );
    let mut file = tempfile::tempfile_in(&args.dir)
        .with_context(|| format!("creating a file in {}", args.dir.display()))?;
    let page = vec![0x5au8; args.page_size];
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    let (mut slow, mut slow_us, mut written) = (0u64, 0u64, 0usize);
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    while Instant::now() < end {
        for _ in 0..args.pages {
            if written % FILE_PAGES == 0 {
                file.seek(SeekFrom::Start(0))?;
            }
            file.write_all(&page).context("writing")?;
            written += 1;
        }
        let started = Instant::now();
        file.sync_all().context("fsync")?;
        let us = started.elapsed().as_micros() as u64;
        lat.saturating_record(us.max(1));
        if us > args.slow_ms * 1000 {
            slow += 1;
            slow_us += us;
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    let ms = |q: f64| lat.value_at_quantile(q) as f64 / 1000.0;
    let json = serde_json::json!({
        "scenario": "disk",
        "params": args,
        "fsyncs": lat.len(),
        "fsync_ms": {"p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": lat.max() as f64 / 1000.0},
        "slow": slow,
        "slow_ms_total": slow_us as f64 / 1000.0,
    });
    println!("{json}");
    println!(
        "disk: {} fsyncs of {} pages of {} bytes in {:.0} s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; {slow} over {} ms, {:.0} ms in all",
        lat.len(),
        args.pages,
        args.page_size,
        args.duration,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        lat.max() as f64 / 1000.0,
        args.slow_ms,
        slow_us as f64 / 1000.0,
    );
    Ok(())
}
