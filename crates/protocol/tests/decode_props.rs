//! Property tests: the decoders never panic, and whatever they refuse is refused with a
//! message (and the request id when one can be read).

use hubbub_protocol::{decode_client_frame, pb, ClientFrame, ContentType};
use proptest::prelude::*;
use serde_json::{json, Value};

/// What `decode_client_frame` decodes, the way serde decodes any frame: `send`s take a
/// shorter way there, which must agree with this one on every text.
fn the_general_way(text: &str) -> Option<ClientFrame> {
    serde_json::from_str::<ClientFrame>(text).ok().filter(|f| {
        matches!(
            f.id(),
            None | Some(Value::String(_)) | Some(Value::Number(_))
        )
    })
}

/// Valid frame `which` with some bytes replaced (`flips`: position, byte) and cut
/// after `cut` bytes.
fn mutated(which: usize, cut: usize, flips: &[(usize, u8)]) -> String {
    let mut bytes = valid_frames()[which].clone().into_bytes();
    for &(pos, b) in flips {
        if !bytes.is_empty() {
            let i = pos % bytes.len();
            bytes[i] = b;
        }
    }
    bytes.truncate(cut.min(bytes.len()));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A `send`-like frame: each field one of a few values (valid or not) or absent
/// (`None`), the keys in the given order.
fn send_like(fields: &[(&str, Option<&str>)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("\"{k}\":{v}")))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn valid_frames() -> Vec<String> {
    vec![
        r#"{"type":"ping","id":1}"#.into(),
        r#"{"type":"join","id":"j","room":"lobby"}"#.into(),
        r#"{"type":"send","id":"s","conv":"room:lobby","client_msg_id":"c1","content_type":"text","content":"hi"}"#.into(),
        r#"{"type":"send","id":"s","conv":"dm:a:b","client_msg_id":"c2","content_type":"image","content":{"url":"/f/x.png","size":3}}"#.into(),
        r#"{"type":"history","id":"h","conv":"room:lobby","before_seq":10,"limit":5}"#.into(),
        r#"{"type":"sync","id":"y","cursors":{"room:lobby":3}}"#.into(),
        r#"{"type":"signal","to":"bob","call_id":"k","kind":"offer","data":{"sdp":"v=0"}}"#.into(),
        r#"{"type":"edit","id":9,"conv":"room:a","seq":1,"content":"x"}"#.into(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,300}") {
        let _ = decode_client_frame(&s);
    }

    #[test]
    fn mutated_valid_frames_never_panic_and_errors_say_why(
        which in 0usize..8,
        cut in 0usize..200,
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..4),
    ) {
        let text = mutated(which, cut, &flips);
        if let Err(e) = decode_client_frame(&text) {
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn mutated_frames_decode_as_the_general_way_decodes_them(
        which in 0usize..8,
        cut in 0usize..200,
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..4),
    ) {
        let text = mutated(which, cut, &flips);
        prop_assert_eq!(decode_client_frame(&text).ok(), the_general_way(&text));
    }

    #[test]
    fn send_frames_of_any_shape_decode_as_the_general_way_decodes_them(
        order in Just((0..9).collect::<Vec<usize>>()).prop_shuffle(),
        picks in proptest::collection::vec(0usize..8, 9),
    ) {
        let choices: [(&str, &[Option<&str>]); 9] = [
            ("type", &[Some("\"send\""), Some("\"join\""), Some("\"Send\""), None, Some("1")]),
            ("id", &[None, Some("null"), Some("1"), Some("\"s\""), Some("true"), Some("1.5"), Some("{}")]),
            ("conv", &[Some("\"room:a\""), Some("5"), None, Some("\"dm:a:b\"")]),
            ("client_msg_id", &[Some("\"c-1\""), None, Some("null")]),
            ("content_type", &[Some("\"text\""), Some("\"image\""), Some("\"bogus\""), None]),
            ("content", &[Some("\"hi\""), Some("{\"url\":\"/f/x\",\"size\":3}"), Some("null"), None, Some("[1,2]")]),
            ("reply_to", &[None, Some("null"), Some("3"), Some("-1"), Some("1.5"), Some("\"3\"")]),
            ("extra", &[None, Some("1"), Some("{\"type\":\"join\"}")]),
            ("room", &[None, Some("\"lobby\"")]),
        ];
        let fields: Vec<(&str, Option<&str>)> = order
            .iter()
            .map(|&i| {
                let (key, values) = choices[i];
                (key, values[picks[i] % values.len()])
            })
            .collect();
        let text = send_like(&fields);
        prop_assert_eq!(decode_client_frame(&text).ok(), the_general_way(&text), "{}", text);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_protobuf_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = pb::decode_client(&bytes) {
            prop_assert!(!e.message.is_empty());
        }
        let _ = pb::decode_server(&bytes);
    }

    #[test]
    fn send_frames_roundtrip_through_protobuf(
        conv in "room:[a-z]{1,10}",
        cid in "[a-zA-Z0-9-]{1,20}",
        body in ".{0,100}",
        id in proptest::option::of("[a-z0-9]{1,8}"),
        reply_to in proptest::option::of(1u64..),
    ) {
        let f = ClientFrame::Send {
            id: id.map(serde_json::Value::String),
            conv,
            client_msg_id: cid,
            content_type: ContentType::Text,
            content: json!(body),
            reply_to,
        };
        prop_assert_eq!(pb::decode_client(&pb::encode_client(&f)).unwrap(), f);
    }
}

#[test]
fn the_valid_frames_used_above_are_valid() {
    for f in valid_frames() {
        decode_client_frame(&f).unwrap_or_else(|e| panic!("{f}: {}", e.message));
    }
}
