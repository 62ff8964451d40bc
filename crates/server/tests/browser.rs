//! Browser tests of the web UI: the real server, the real headless chromium, driven by
//! `tests/browser/run.mjs` (npm `playwright-core`). Needs `node`, chromium and
//! `npm ci` in `tests/browser` (`.ci/run` installs all three); fails with instructions
//! when one is missing. Screenshots go to `target/browser-artifacts/`.
//!
//! The script asks for a server restart (same data dir, same port) by printing
//! `@@RESTART`; this test restarts the server and answers `RESTARTED` on its stdin.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Bound for the whole browser run.
const RUN_LIMIT: Duration = Duration::from_secs(300);

const INSTALL_HELP: &str = "the browser tests need node, npm packages and chromium. On Debian: \
     `apt-get install -y chromium nodejs npm` (or set HUBBUB_CHROMIUM / HUBBUB_NODE to the \
     executables), then `npm ci` in tests/browser. `.ci/run` does all of this.";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// An executable named `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool(env: &str, default: impl FnOnce() -> Option<PathBuf>, what: &str) -> PathBuf {
    let found = match std::env::var_os(env) {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => default(),
    };
    match found {
        Some(p) if p.is_file() => p,
        Some(p) => panic!(
            "{what} not found at {} ({env}): {INSTALL_HELP}",
            p.display()
        ),
        None => panic!("{what} not found: {INSTALL_HELP}"),
    }
}

/// A data dir whose `room:attic` holds a file message with the URL `/\\evil.example/x`,
/// as stored before such URLs were refused: the UI must not take it for one of ours.
async fn seeded_data_dir() -> tempfile::TempDir {
    use hubbub_server::store::{NewMessage, SqliteStore, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path(), std::sync::Arc::new(|_| {})).expect("store");
    store
        .join_room("room:attic", "mallory")
        .await
        .expect("join");
    store
        .append(NewMessage {
            conv: "room:attic".into(),
            from: "mallory".into(),
            client_msg_id: "evil-1".into(),
            content_type: hubbub_protocol::ContentType::File,
            content: serde_json::json!({"url": "/\\evil.example/x", "name": "report.pdf"}),
            dm_members: None,
            origin: 0,
            reply_to: None,
            mentions: Vec::new(),
        })
        .await
        .expect("append");
    store.close().await.expect("close");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_in_a_real_browser() {
    let root = repo_root();
    let suite = root.join("tests/browser");
    let node = tool(
        "HUBBUB_NODE",
        || on_path("node").or_else(|| on_path("nodejs")),
        "node",
    );
    let chromium = tool(
        "HUBBUB_CHROMIUM",
        || Some(PathBuf::from("/usr/bin/chromium")),
        "chromium",
    );
    assert!(
        suite
            .join("node_modules/playwright-core/package.json")
            .is_file(),
        "tests/browser/node_modules has no playwright-core: {INSTALL_HELP}"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let artifacts = target.join("browser-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");

    let mut server = Some(TestServer::in_dir(seeded_data_dir().await, |_| {}).await);
    let addr = server.as_ref().unwrap().addr;

    let mut child = Command::new(&node)
        .arg(suite.join("run.mjs"))
        .current_dir(&suite)
        .env("HUBBUB_URL", format!("http://{addr}"))
        .env("HUBBUB_CHROMIUM", &chromium)
        .env("HUBBUB_ARTIFACTS", &artifacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}: {INSTALL_HELP}", node.display()));
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    let run = async {
        while let Some(line) = lines.next_line().await.expect("read the script's output") {
            if line == "@@RESTART" {
                println!("restarting the server on {addr}");
                let running = server.take().expect("a running server");
                server = Some(running.restart().await);
                stdin
                    .write_all(b"RESTARTED\n")
                    .await
                    .expect("answer the script");
                stdin.flush().await.expect("flush");
            } else {
                println!("{line}");
            }
        }
        child.wait().await.expect("wait for node")
    };
    let status = match tokio::time::timeout(RUN_LIMIT, run).await {
        Ok(status) => status,
        Err(_) => panic!("the browser tests took longer than {RUN_LIMIT:?}"),
    };
    if let Some(s) = server.take() {
        s.stop().await;
    }
    assert!(
        status.success(),
        "browser tests failed ({status}); screenshots in {}",
        artifacts.display()
    );
}
