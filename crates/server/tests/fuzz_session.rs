//! Random and mutated frames against a live session: no crash, every undecodable frame
//! answered with `error`, and the session keeps working.

mod common;

use common::{TestServer, WAIT};
use hubbub_protocol::{decode_client_frame, ErrorCode, ServerFrame};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

const VALID: &[&str] = &[
    r#"{"type":"send","id":"s","conv":"room:fuzz","client_msg_id":"c1","content_type":"text","content":"hi"}"#,
    r#"{"type":"history","id":"h","conv":"room:fuzz","before_seq":10,"limit":5}"#,
    r#"{"type":"sync","id":"y","cursors":{"room:fuzz":0}}"#,
    r#"{"type":"join","id":"j","room":"fuzz"}"#,
    r#"{"type":"signal","to":"bob","call_id":"k","kind":"offer","data":{"sdp":"v=0"}}"#,
];

fn junk() -> impl Strategy<Value = String> {
    let random = "[^\n]{1,200}".boxed();
    let mutated = (
        0..VALID.len(),
        0usize..150,
        proptest::collection::vec((0usize..150, 0x20u8..0x7f), 0..4),
    )
        .prop_map(|(which, cut, flips)| {
            let mut b = VALID[which].as_bytes().to_vec();
            for (pos, byte) in flips {
                let i = pos % b.len();
                b[i] = byte;
            }
            b.truncate(cut.max(1).min(b.len()));
            String::from_utf8_lossy(&b).replace('\n', " ")
        })
        .boxed();
    proptest::prop_oneof![random, mutated]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_frames_get_errors_and_the_session_survives() {
    let server = TestServer::with(|c| {
        c.frame_rate_per_sec = 100_000;
        c.frame_burst = 100_000;
    })
    .await;
    let mut alice = server.connect("alice").await;
    alice.join("fuzz").await.unwrap();
    let mut runner = TestRunner::deterministic();
    let strategy = junk();
    let mut sent = 0;
    for _ in 0..400 {
        let frame = strategy.new_tree(&mut runner).unwrap().current();
        // Only frames the decoder refuses (and that are not blank lines, which are
        // skipped by design); valid ones would be served as requests.
        if frame.trim().is_empty() || decode_client_frame(&frame).is_ok() {
            continue;
        }
        alice.send_raw(frame.clone()).await.unwrap();
        let answer = alice
            .wait_for(WAIT, |f| matches!(f, ServerFrame::Error { .. }))
            .await
            .unwrap_or_else(|e| panic!("no error for {frame:?}: {e:?}"));
        let ServerFrame::Error { code, message, .. } = answer else {
            unreachable!()
        };
        assert_eq!(code, ErrorCode::BadRequest, "{frame:?}");
        assert!(!message.is_empty());
        sent += 1;
    }
    assert!(sent > 300, "most generated frames were junk: {sent}");
    // Still fully usable.
    alice.ping().await.unwrap();
    let s = alice.send_text("room:fuzz", "still here").await.unwrap();
    assert_eq!(s.seq, 1);
}
