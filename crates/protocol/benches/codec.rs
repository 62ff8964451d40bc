//! Micro-benchmarks of the codec hot paths, as the server runs them:
//!
//! - a client `send` arrives as JSON text (`split_frames` + `decode_client_frame`, per
//!   line of a text frame) or as protobuf bytes (`pb::decode_client`, per binary frame);
//! - a committed message is encoded once per codec (`ServerFrame::to_json`,
//!   `pb::encode_server`), then the bytes are shared by every recipient;
//! - a `ping` is decoded like any other frame.
//!
//! Text content is 100 B (a typical chat line) or 4 KiB (a long paste).
//!
//! Run with `cargo bench -p hubbub-protocol --bench codec`.

use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use hubbub_protocol::{
    decode_client_frame, pb, split_frames, ClientFrame, ContentType, Message, ServerFrame,
};
use serde_json::Value;

fn main() {
    divan::main();
}

/// One call takes about a microsecond: many samples of several calls each keep the
/// timer's own cost out of the results.
const SAMPLES: u32 = 1000;
/// Calls per sample.
const SAMPLE_SIZE: u32 = 32;

/// Content sizes in bytes.
const SIZES: [usize; 2] = [100, 4096];

/// Chat-like text of exactly `len` UTF-8 bytes (mostly ASCII, one multi-byte dash per
/// sentence, a quote to escape in JSON).
fn text(len: usize) -> String {
    const SENTENCE: &str =
        "Are we still on for the 3pm sync? I pushed the \"reconnect\" fix \u{2014} have a look. ";
    let mut s = String::with_capacity(len + SENTENCE.len());
    while s.len() < len {
        s.push_str(SENTENCE);
    }
    let mut end = len;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    while s.len() < len {
        s.push('.');
    }
    s
}

fn send_frame(len: usize) -> ClientFrame {
    ClientFrame::Send {
        id: Some(Value::from(4217)),
        conv: "room:general".into(),
        client_msg_id: "c-01JB8ZQ4M6N2P7R5T0V1W3X8YA".into(),
        content_type: ContentType::Text,
        content: Value::String(text(len)),
        reply_to: None,
    }
}

fn message_frame(len: usize) -> ServerFrame {
    ServerFrame::Message(Message {
        conv: "room:general".into(),
        seq: 184_467,
        msg_id: "01JB8ZQ5A1B2C3D4E5F6G7H8J9".into(),
        from: "alice".into(),
        client_msg_id: "c-01JB8ZQ4M6N2P7R5T0V1W3X8YA".into(),
        content_type: ContentType::Text,
        content: Some(Value::String(text(len))),
        ts: 1_760_000_000_123,
        recalled: false,
        edited_at: None,
        reply_to: None,
        reactions: Default::default(),
        mentions: Vec::new(),
    })
}

/// Decoding a client `send` frame.
#[divan::bench_group(sample_count = SAMPLES, sample_size = SAMPLE_SIZE)]
mod decode_send {
    use super::*;

    /// One JSON text frame holding one `send` line, handled as the session reader does.
    #[divan::bench(args = SIZES)]
    fn json(bencher: Bencher, len: usize) {
        let wire = serde_json::to_string(&send_frame(len)).expect("serializable");
        bencher.counter(BytesCount::of_str(&wire)).bench_local(|| {
            for line in split_frames(black_box(&wire)) {
                let frame = decode_client_frame(line).expect("valid send");
                black_box(frame);
            }
        });
    }

    /// One binary frame (`hubbub.v1.pb`).
    #[divan::bench(args = SIZES)]
    fn protobuf(bencher: Bencher, len: usize) {
        let wire = pb::encode_client(&send_frame(len));
        bencher
            .counter(BytesCount::of_slice(&wire))
            .bench_local(|| pb::decode_client(black_box(&wire)).expect("valid send"));
    }
}

/// Encoding a server `message` frame (once per message and codec).
#[divan::bench_group(sample_count = SAMPLES, sample_size = SAMPLE_SIZE)]
mod encode_message {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn json(bencher: Bencher, len: usize) {
        let frame = message_frame(len);
        let out = frame.to_json().len();
        bencher
            .counter(BytesCount::new(out))
            .bench_local(|| black_box(&frame).to_json());
    }

    #[divan::bench(args = SIZES)]
    fn protobuf(bencher: Bencher, len: usize) {
        let frame = message_frame(len);
        let out = pb::encode_server(&frame).len();
        bencher
            .counter(BytesCount::new(out))
            .bench_local(|| pb::encode_server(black_box(&frame)));
    }
}

/// Decoding a `ping` with a request id (the most frequent small frame).
#[divan::bench_group(sample_count = SAMPLES, sample_size = SAMPLE_SIZE)]
mod decode_ping {
    use super::*;

    fn ping() -> ClientFrame {
        ClientFrame::Ping {
            id: Some(Value::String("p-17".into())),
        }
    }

    #[divan::bench]
    fn json(bencher: Bencher) {
        let wire = serde_json::to_string(&ping()).expect("serializable");
        bencher.counter(BytesCount::of_str(&wire)).bench_local(|| {
            for line in split_frames(black_box(&wire)) {
                black_box(decode_client_frame(line).expect("valid ping"));
            }
        });
    }

    #[divan::bench]
    fn protobuf(bencher: Bencher) {
        let wire = pb::encode_client(&ping());
        bencher
            .counter(BytesCount::of_slice(&wire))
            .bench_local(|| pb::decode_client(black_box(&wire)).expect("valid ping"));
    }
}
