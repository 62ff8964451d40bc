//! WebSocket conformance: the Autobahn testsuite's fuzzing client (cases 1 to 7:
//! framing, pings and pongs, reserved bits and opcodes, fragmentation, UTF-8, the
//! close handshake) against the real `/ws` endpoint of a real server.
//!
//! wstest runs through `tests/autobahn/hubbub_wstest.py`, which leaves hubbub's
//! application frames out of the comparison of events (the cases expect an echo
//! server; see that file) and changes nothing else. Every case's `behavior` and
//! `behaviorClose` must be OK, NON-STRICT or INFORMATIONAL.
//!
//! wstest comes from `tests/autobahn/setup.sh <dir>` (a Python 2.7 virtualenv). The test
//! looks for it at `$HUBBUB_WSTEST`, else at `target/autobahn-venv/bin/wstest`, and
//! fails (it does not skip) when it is not there.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{json, Value};

/// How long the whole run may take (it takes about 25 seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// The cases run, and how many of them there are in autobahntestsuite 25.10.1.
const CASES: [&str; 7] = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*"];
const CASE_COUNT: usize = 246;

/// The results that pass. NON-STRICT: allowed by RFC 6455 but not what it prefers
/// (e.g. failing an invalid UTF-8 message only once it is complete); INFORMATIONAL:
/// cases with no pass or fail (e.g. the close code a client echoes).
const PASSING: [&str; 3] = ["OK", "NON-STRICT", "INFORMATIONAL"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$HUBBUB_WSTEST`, else wstest in `autobahn-venv` under the target dir.
fn wstest() -> PathBuf {
    if let Some(p) = std::env::var_os("HUBBUB_WSTEST") {
        return PathBuf::from(p);
    }
    // This test runs as <target>/<profile>/deps/autobahn-<hash>.
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("autobahn-venv/bin/wstest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_endpoint_passes_the_autobahn_fuzzing_cases_1_to_7() {
    let wstest = wstest();
    assert!(
        wstest.is_file(),
        "wstest not found at {}: install it with `tests/autobahn/setup.sh target/autobahn-venv` \
         (it needs Python 2.7), or point HUBBUB_WSTEST at a wstest",
        wstest.display()
    );
    // The wrapper runs on the virtualenv's Python, beside wstest.
    let python = wstest.with_file_name("python");
    let wrapper = repo_root().join("tests/autobahn/hubbub_wstest.py");

    let server = TestServer::start().await;
    let work = tempfile::tempdir().expect("temp dir");
    let reports = work.path().join("reports");
    let spec = json!({
        "servers": [{
            "agent": "hubbub",
            "url": format!("ws://{}/ws?user=autobahn", server.addr),
        }],
        "cases": CASES,
        "exclude-cases": [],
        "exclude-agent-cases": {},
        "outdir": reports,
    });
    let spec_path = work.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).expect("write spec");

    let started = Instant::now();
    let child = tokio::process::Command::new(&python)
        .arg(&wrapper)
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec_path)
        .current_dir(work.path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("wstest did not finish within {RUN_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let took = started.elapsed();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "wstest failed ({}):\n{log}",
        out.status
    );

    let index = std::fs::read_to_string(reports.join("index.json"))
        .unwrap_or_else(|e| panic!("no index.json from wstest ({e}):\n{log}"));
    let index: Value = serde_json::from_str(&index).expect("index.json is JSON");
    let cases = index["hubbub"]
        .as_object()
        .unwrap_or_else(|| panic!("no results for hubbub in index.json:\n{log}"));
    let mut failed = Vec::new();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for (id, result) in cases {
        let behavior = result["behavior"].as_str().unwrap_or("?");
        let close = result["behaviorClose"].as_str().unwrap_or("?");
        *tally.entry(format!("{behavior}/{close}")).or_default() += 1;
        if !PASSING.contains(&behavior) || !PASSING.contains(&close) {
            let report = result["reportfile"].as_str().unwrap_or("");
            let detail = std::fs::read_to_string(reports.join(report))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .map(|r| {
                    format!(
                        "{}; {}; close code {}",
                        r["result"], r["resultClose"], r["remoteCloseCode"]
                    )
                })
                .unwrap_or_default();
            failed.push(format!("{id}: {behavior} / {close}: {detail}"));
        }
    }
    failed.sort();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    assert_eq!(cases.len(), CASE_COUNT, "every case ran");
    eprintln!(
        "autobahn: {} cases passed in {took:.1?} (behavior/behaviorClose: {tally:?})",
        cases.len()
    );
}
