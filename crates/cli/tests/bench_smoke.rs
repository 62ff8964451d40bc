//! `hubbub bench` stays working: every scenario, small and short, against a real server
//! (and the reference broadcast hub in `bench/gohub` for `--target raw`), checking the
//! numbers it reports.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

/// The server's limits lifted the way BENCHMARKS.md runs it.
const LIFTED: &[(&str, &str)] = &[
    ("HUBBUB_SEND_RATE_PER_SEC", "1000000"),
    ("HUBBUB_SEND_BURST", "1000000"),
    ("HUBBUB_FRAME_RATE_PER_SEC", "1000000"),
    ("HUBBUB_FRAME_BURST", "1000000"),
];

/// Runs `hubbub bench ARGS`, returns its JSON line and prints its summary.
fn bench(url: &str, pid: u32, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "--url", url, "--server-pid", &pid.to_string()])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run hubbub bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench {args:?} failed:\n{stdout}");
    print!("{stdout}");
    let line = stdout.lines().next().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn every_scenario_runs_against_hubbub_and_reports_sane_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "127.0.0.1:0", LIFTED);
    let (url, pid) = (server.url(), server.child.id());

    let idle = bench(&url, pid, &["idle", "--conns", "200", "--hold", "1"]);
    assert_eq!(n(&idle, "connected"), 200);
    let per_conn = idle["bytes_per_conn"].as_f64().expect("bytes_per_conn");
    assert!(per_conn > 0.0 && per_conn < 1_000_000.0, "{idle}");

    let connect = bench(&url, pid, &["connect", "--conns", "300", "--procs", "2"]);
    assert_eq!(n(&connect, "connected"), 300);
    assert_eq!(n(&connect, "procs"), 2);
    assert!(connect["conns_per_sec"].as_f64().unwrap() > 0.0);

    // Two worker processes share one room; every delivery is checked.
    let fanout = bench(
        &url,
        pid,
        &[
            "fanout",
            "--members",
            "40",
            "--senders",
            "4",
            "--rate",
            "20",
            "--duration",
            "1",
            "--procs",
            "2",
        ],
    );
    assert_eq!(n(&fanout, "connected"), 40);
    assert_eq!(n(&fanout, "sent"), 80);
    assert_eq!(n(&fanout, "acked"), 80);
    // hubbub does not echo a message to the session that sent it.
    assert_eq!(n(&fanout, "expected"), 80 * 39);
    assert_eq!(n(&fanout, "delivered"), 80 * 39);
    assert_eq!(n(&fanout, "lost"), 0);
    assert_eq!(n(&fanout, "duplicates"), 0);
    assert!(fanout["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    // Few messages: each one's last delivery is reported, and every one arrived.
    let each = fanout["last_delivery_each_ms"].as_array().unwrap();
    assert_eq!(each.len(), 80);
    assert!(each.iter().all(|v| v.as_f64().unwrap() > 0.0), "{each:?}");
    assert!(fanout["cpu_secs_per_million_deliveries"].as_f64().is_some());

    let closed_loop = bench(
        &url,
        pid,
        &[
            "fanout",
            "--members",
            "10",
            "--senders",
            "2",
            "--rate",
            "0",
            "--duration",
            "1",
        ],
    );
    assert!(n(&closed_loop, "acked") > 0);
    assert_eq!(n(&closed_loop, "acked"), n(&closed_loop, "sent"));
    assert_eq!(n(&closed_loop, "lost"), 0);

    // More sends outstanding than the server keeps in flight (64): its pipeline fills.
    let dm = bench(
        &url,
        pid,
        &["dm", "--pairs", "5", "--inflight", "100", "--duration", "1"],
    );
    assert!(n(&dm, "acked") > 0);
    assert_eq!(n(&dm, "acked"), n(&dm, "sent"));
    assert_eq!(n(&dm, "errors"), 0);
    assert!(dm["ack_ms"]["p99"].as_f64().unwrap() > 0.0);

    // The other side of each pair received every stored message, and timed it.
    assert_eq!(n(&dm, "delivered"), n(&dm, "acked"));
    assert!(dm["delivery_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn refused_connections_are_counted_by_cause_not_hidden() {
    // Nothing listens on this port once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    let v = bench(&url, std::process::id(), &["connect", "--conns", "5"]);
    assert_eq!(n(&v, "connected"), 0);
    assert_eq!(v["failures"]["refused"].as_u64(), Some(5), "{v}");
}

#[test]
fn only_loopback_targets_are_accepted() {
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "--url", "ws://192.0.2.1:80", "idle"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

/// The reference hub, built from `bench/gohub` with Debian's Go packages.
struct GoHub(Child, u16);

impl Drop for GoHub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gohub(out_dir: &Path) -> GoHub {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/gohub");
    let exe = out_dir.join("gohub");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&exe)
        .arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", out_dir.join("gocache"))
        .status()
        .expect("go is needed: apt-get install -y golang-go golang-github-gorilla-websocket-dev");
    assert!(built.success(), "building bench/gohub failed");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&exe)
        .args(["--port", &port.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gohub did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    GoHub(child, port)
}

#[test]
fn raw_target_measures_the_reference_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_gohub(dir.path());
    let url = format!("ws://127.0.0.1:{}", hub.1);
    let pid = hub.0.id();
    let fanout = bench(
        &url,
        pid,
        &[
            "--target",
            "raw",
            "fanout",
            "--members",
            "30",
            "--senders",
            "3",
            "--rate",
            "20",
            "--duration",
            "1",
        ],
    );
    // A broadcast hub echoes to the sender too.
    assert_eq!(n(&fanout, "expected"), 60 * 30);
    assert_eq!(n(&fanout, "delivered"), 60 * 30);
    assert_eq!(n(&fanout, "lost"), 0);
    let idle = bench(
        &url,
        pid,
        &["--target", "raw", "idle", "--conns", "100", "--hold", "1"],
    );
    assert_eq!(n(&idle, "connected"), 100);
    let connect = bench(&url, pid, &["--target", "raw", "connect", "--conns", "100"]);
    assert_eq!(n(&connect, "connected"), 100);
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "--url", &url, "--target", "raw", "dm"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "dm has no meaning on a broadcast hub"
    );
}

#[test]
fn floor_measures_what_one_loopback_send_costs() {
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "floor", "--conns", "20", "--rate", "5000"])
        .args(["--duration", "0.5", "--per-write", "2"])
        .output()
        .expect("run hubbub bench floor");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench floor failed:\n{stdout}");
    let v: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    // 5,000 frames a second for half a second, two per write; the reader got them all.
    assert_eq!(n(&v, "writes"), 1250);
    assert_eq!(n(&v, "read_bytes"), 1250 * 400);
    let per_write = v["cpu_us_per_write"].as_f64().unwrap();
    assert!(per_write > 0.0 && per_write < 10_000.0, "{v}");
    // Each number is read back from its own decimal text, which serde_json may parse a
    // unit in the last place off: equal up to that, not bit for bit.
    let per_frame = v["cpu_us_per_frame"].as_f64().unwrap();
    assert!(
        (per_frame - per_write / 2.0).abs() <= per_write * 1e-12,
        "{per_frame} is not half of {per_write}"
    );
}

#[test]
fn disk_times_the_fsyncs_of_commit_sized_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "disk", "--pages", "8", "--interval-ms", "1"])
        .args(["--duration", "0.3", "--slow-ms", "0"])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run hubbub bench disk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench disk failed:\n{stdout}");
    let v: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let fsyncs = n(&v, "fsyncs");
    assert!(fsyncs >= 1, "{v}");
    let (p50, max) = (
        v["fsync_ms"]["p50"].as_f64().unwrap(),
        v["fsync_ms"]["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= max, "{v}");
    // With a 0 ms bound every fsync is a stall, and their total is at least the longest.
    assert_eq!(n(&v, "slow"), fsyncs);
    assert!(v["slow_ms_total"].as_f64().unwrap() >= max * 0.99, "{v}");
    // Its file is gone afterwards.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // A directory that does not exist is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_hubbub"))
        .args(["bench", "disk", "--duration", "0.1", "--dir"])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("creating a file in"),
        "{out:?}"
    );
}
