//! `hubbub chat` end to end: the real terminal client inside tmux, the real server, and
//! a second user on the client library.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hubbub_client::{Client, ConnectOptions};
use hubbub_protocol::ServerFrame;

const WAIT: Duration = Duration::from_secs(10);

mod common;
use common::Server;

fn start_server(dir: &std::path::Path, bind: &str) -> Server {
    Server::start(dir, bind, &[])
}

/// A tmux session on a private tmux server (its own socket, so no other tmux is
/// touched), killed on drop (also when the test fails).
struct Tmux(String);

fn tmux(session: &str) -> Command {
    let mut c = Command::new("tmux");
    c.args([
        "-L",
        &format!("hubbub-test-{}-{session}", std::process::id()),
    ]);
    c
}

impl Tmux {
    fn start(name: &str, cmd: &str) -> Tmux {
        let ok = tmux(name)
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "120",
                "-y",
                "40",
                cmd,
            ])
            .status()
            .unwrap_or_else(|e| panic!("tmux is needed (apt-get install -y tmux): {e}"))
            .success();
        assert!(ok, "tmux new-session failed");
        Tmux(name.to_string())
    }

    fn screen(&self) -> String {
        let out = tmux(&self.0)
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let ok = tmux(&self.0)
            .args(["send-keys", "-t", &self.0])
            .args(keys)
            .status()
            .expect("tmux send-keys")
            .success();
        assert!(ok);
    }

    /// Polls the screen until `pred` holds (at most `WAIT`).
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(start.elapsed() < WAIT, "waited for {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = tmux(&self.0).arg("kill-server").status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_text_reaches_another_client_and_theirs_appears_on_screen() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), "127.0.0.1:0");
    let url = format!("ws://{}", server.addr);
    let name = format!("hubbub-tui-{}", std::process::id());
    let tui = Tmux::start(
        &name,
        &format!(
            "{} chat --url {url} --user alice --room lobby",
            env!("CARGO_BIN_EXE_hubbub")
        ),
    );
    tui.wait_for("the room to open", |s| {
        s.contains("#lobby") && s.contains("connected")
    });

    let mut bob = Client::connect(ConnectOptions::guest(&url, "bob"))
        .await
        .unwrap();
    bob.join("lobby").await.unwrap();
    tui.wait_for("bob's arrival", |s| s.contains("bob joined"));

    tui.keys(&["hello from the terminal", "Enter"]);
    let got = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = got else {
        unreachable!()
    };
    assert_eq!(m.from, "alice");
    assert_eq!(m.content, Some("hello from the terminal".into()));

    bob.send_text("room:lobby", "hi alice, bob here")
        .await
        .unwrap();
    tui.wait_for("bob's message", |s| s.contains("bob: hi alice, bob here"));
    // Control characters never reach the terminal.
    bob.send_text("room:lobby", "evil\u{1b}[2Jclear")
        .await
        .unwrap();
    let screen = tui.wait_for("the escaped message", |s| s.contains("evil [2Jclear"));
    assert!(
        screen.contains("alice: hello from the terminal"),
        "{screen}"
    );

    // 1.1 from the terminal: a reply to bob's message (seq 2), a reaction on it that
    // bob is pushed, and a search whose results show the matches.
    tui.keys(&["/reply 2 glad you came", "Enter"]);
    let got = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Message(_)))
        .await
        .unwrap();
    let ServerFrame::Message(m) = got else {
        unreachable!()
    };
    assert_eq!(m.reply_to.map(|r| r.seq), Some(2));
    tui.wait_for("the quote", |s| {
        s.contains("[↪ #2 bob: hi alice, bob here] glad you came")
    });
    tui.keys(&["/react 2 ok", "Enter"]);
    let got = bob
        .wait_for(WAIT, |f| matches!(f, ServerFrame::Reaction { .. }))
        .await
        .unwrap();
    assert!(
        matches!(
            got,
            ServerFrame::Reaction {
                seq: 2,
                on: true,
                ..
            }
        ),
        "{got:?}"
    );
    tui.wait_for("the reaction count", |s| s.contains("[ok1]"));
    tui.keys(&["/search termin", "Enter"]);
    tui.wait_for("the search results", |s| {
        s.contains("search: termin") && s.contains("[terminal]")
    });
    tui.keys(&["Escape"]);
    tui.wait_for("the room again", |s| s.contains("glad you came"));

    // The server goes away and comes back on the same address: the client reconnects
    // and catches up what was sent meanwhile.
    let addr = server.addr.clone();
    drop(bob);
    let _ = server.child.kill();
    let _ = server.child.wait();
    tui.wait_for("the drop to show", |s| s.contains("reconnecting"));
    server = start_server(dir.path(), &addr);
    let mut bob = Client::connect(ConnectOptions::guest(&url, "bob"))
        .await
        .unwrap();
    bob.send_text("room:lobby", "sent while you were away")
        .await
        .unwrap();
    let screen = tui.wait_for("the catch-up", |s| {
        s.contains("bob: sent while you were away") && s.contains("caught up")
    });
    // Once, not repeated by the catch-up (the reply quotes it, on its own line).
    let shown = screen
        .lines()
        .filter(|l| l.contains("#2 bob: hi alice, bob here") && !l.contains('↪'))
        .count();
    assert_eq!(shown, 1, "{screen}");

    // Slash commands: a DM, then quitting restores the terminal and ends the process.
    tui.keys(&["/dm bob", "Enter"]);
    tui.wait_for("the DM to open", |s| s.contains("@bob"));
    tui.keys(&["psst", "Enter"]);
    let got = bob
        .wait_for(
            WAIT,
            |f| matches!(f, ServerFrame::Message(m) if m.conv == "dm:alice:bob"),
        )
        .await
        .unwrap();
    assert!(matches!(got, ServerFrame::Message(m) if m.content == Some("psst".into())));
    tui.keys(&["/quit", "Enter"]);
    drop(server);
    let start = Instant::now();
    loop {
        let alive = tmux(&name)
            .args(["has-session", "-t", &name])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if !alive {
            break;
        }
        assert!(start.elapsed() < WAIT, "the client did not quit");
        std::thread::sleep(Duration::from_millis(100));
    }
}
