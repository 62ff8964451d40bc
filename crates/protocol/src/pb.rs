//! The `hubbub.v1.pb` codec: the frames of this crate as protobuf messages
//! (`proto/hubbub.v1.proto`). Free-form JSON values travel as JSON text
//! (`Signal.data_json`, `Ok.body_json`); request ids are strings.

use prost::Message as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{ClientFrame, ContentType, DecodeError, Message, ReqId, ServerFrame};

/// Types generated from `proto/hubbub.v1.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/hubbub.v1.rs"));
}

use wire::client_frame::Frame as CF;
use wire::server_frame::Frame as SF;

fn id_out(id: &Option<ReqId>) -> String {
    match id {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn id_in(id: String) -> Option<ReqId> {
    (!id.is_empty()).then_some(Value::String(id))
}

/// The snake_case name of a unit enum variant.
fn name_of<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn parse_name<T: DeserializeOwned>(what: &str, s: String) -> Result<T, String> {
    serde_json::from_value(Value::String(s.clone())).map_err(|_| format!("unknown {what} {s:?}"))
}

fn content_out(v: &Value) -> wire::Content {
    use wire::content::Value as C;
    let value = match v {
        Value::String(s) => C::Text(s.clone()),
        Value::Object(o) => C::Attachment(wire::Attachment {
            url: o
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
            name: o.get("name").and_then(Value::as_str).map(Into::into),
            size: o.get("size").and_then(Value::as_u64),
            mime: o.get("mime").and_then(Value::as_str).map(Into::into),
        }),
        other => C::Text(other.to_string()),
    };
    wire::Content { value: Some(value) }
}

fn content_in(c: Option<wire::Content>) -> Value {
    use wire::content::Value as C;
    match c.and_then(|c| c.value) {
        None => Value::Null,
        Some(C::Text(s)) => Value::String(s),
        Some(C::Attachment(a)) => {
            let mut o = Map::new();
            o.insert("url".into(), Value::String(a.url));
            if let Some(n) = a.name {
                o.insert("name".into(), Value::String(n));
            }
            if let Some(s) = a.size {
                o.insert("size".into(), Value::from(s));
            }
            if let Some(m) = a.mime {
                o.insert("mime".into(), Value::String(m));
            }
            Value::Object(o)
        }
    }
}

fn json_text(v: &Value) -> String {
    if v.is_null() {
        String::new()
    } else {
        v.to_string()
    }
}

fn json_value(s: &str, what: &str) -> Result<Value, String> {
    if s.is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_str(s).map_err(|e| format!("{what} is not JSON: {e}"))
    }
}

fn message_out(m: &Message) -> wire::Message {
    wire::Message {
        conv: m.conv.clone(),
        seq: m.seq,
        msg_id: m.msg_id.clone(),
        from: m.from.clone(),
        client_msg_id: m.client_msg_id.clone(),
        content_type: m.content_type.as_str().into(),
        content: m.content.as_ref().map(content_out),
        ts: m.ts,
        recalled: m.recalled,
        edited_at: m.edited_at,
        reply_to: m.reply_to.as_ref().map(|r| wire::ReplyRef {
            seq: r.seq,
            from: r.from.clone(),
            excerpt: r.excerpt.clone(),
        }),
        reactions: reactions_out(&m.reactions),
        mentions: m.mentions.clone(),
    }
}

fn reactions_out(r: &crate::Reactions) -> std::collections::HashMap<String, wire::Users> {
    r.iter()
        .map(|(e, users)| {
            (
                e.clone(),
                wire::Users {
                    users: users.clone(),
                },
            )
        })
        .collect()
}

fn reactions_in(r: std::collections::HashMap<String, wire::Users>) -> crate::Reactions {
    r.into_iter().map(|(e, u)| (e, u.users)).collect()
}

fn message_in(m: wire::Message) -> Result<Message, String> {
    let content = content_in(m.content);
    Ok(Message {
        conv: m.conv,
        seq: m.seq,
        msg_id: m.msg_id,
        from: m.from,
        client_msg_id: m.client_msg_id,
        content_type: content_type(m.content_type)?,
        content: (!content.is_null()).then_some(content),
        ts: m.ts,
        recalled: m.recalled,
        edited_at: m.edited_at,
        reply_to: m.reply_to.map(|r| {
            Box::new(crate::ReplyRef {
                seq: r.seq,
                from: r.from,
                excerpt: r.excerpt,
            })
        }),
        reactions: reactions_in(m.reactions),
        mentions: m.mentions,
    })
}

fn content_type(s: String) -> Result<ContentType, String> {
    ContentType::parse(&s).ok_or_else(|| format!("unknown content_type {s:?}"))
}

/// Encodes a server frame (done once per message and codec, not per recipient).
pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
    let f = match frame {
        ServerFrame::Welcome {
            user,
            device,
            session,
            heartbeat_ms,
            server_time,
            max_frame_bytes,
            ice_servers,
        } => SF::Welcome(wire::Welcome {
            user: user.clone(),
            device: device.clone(),
            session: session.clone(),
            heartbeat_ms: *heartbeat_ms,
            server_time: *server_time,
            max_frame_bytes: *max_frame_bytes as u64,
            ice_servers_json: json_text(&Value::Array(ice_servers.clone())),
        }),
        ServerFrame::Message(m) => SF::Message(message_out(m)),
        ServerFrame::Member {
            conv,
            user,
            event,
            online,
            by,
        } => SF::Member(wire::Member {
            conv: conv.clone(),
            user: user.clone(),
            event: name_of(event),
            online: *online,
            by: by.clone(),
        }),
        ServerFrame::Reaction {
            conv,
            seq,
            user,
            emoji,
            on,
        } => SF::Reaction(wire::Reaction {
            conv: conv.clone(),
            seq: *seq,
            user: user.clone(),
            emoji: emoji.clone(),
            on: *on,
        }),
        ServerFrame::Reactions {
            conv,
            seq,
            reactions,
        } => SF::Reactions(wire::Reactions {
            conv: conv.clone(),
            seq: *seq,
            reactions: reactions_out(reactions),
        }),
        ServerFrame::Presence { user, online } => SF::Presence(wire::Presence {
            user: user.clone(),
            online: *online,
        }),
        ServerFrame::Receipt { conv, user, seq } => SF::Receipt(wire::Receipt {
            conv: conv.clone(),
            user: user.clone(),
            seq: *seq,
        }),
        ServerFrame::Typing { conv, user } => SF::Typing(wire::TypingEvent {
            conv: conv.clone(),
            user: user.clone(),
        }),
        ServerFrame::Recalled { conv, seq, by } => SF::Recalled(wire::Recalled {
            conv: conv.clone(),
            seq: *seq,
            by: by.clone(),
        }),
        ServerFrame::Edited {
            conv,
            seq,
            content,
            edited_at,
        } => SF::Edited(wire::Edited {
            conv: conv.clone(),
            seq: *seq,
            content: Some(content_out(content)),
            edited_at: *edited_at,
        }),
        ServerFrame::Signal {
            from,
            call_id,
            kind,
            data,
        } => SF::Signal(wire::SignalIn {
            from: from.clone(),
            call_id: call_id.clone(),
            kind: name_of(kind),
            data_json: json_text(data),
        }),
        ServerFrame::Notice { text, from } => SF::Notice(wire::Notice {
            text: text.clone(),
            from: from.clone(),
        }),
        ServerFrame::Kicked { reason } => SF::Kicked(wire::Kicked {
            reason: reason.clone(),
        }),
        ServerFrame::Pong { id } => SF::Pong(wire::Pong { id: id_out(id) }),
        ServerFrame::Ok { id, body } => SF::Ok(wire::Ok {
            id: id_out(id),
            body_json: serde_json::to_string(body).unwrap_or_default(),
        }),
        ServerFrame::Error { id, code, message } => SF::Error(wire::Error {
            id: id_out(id),
            code: name_of(code),
            message: message.clone(),
        }),
    };
    wire::ServerFrame { frame: Some(f) }.encode_to_vec()
}

/// Decodes a server frame (for clients).
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, String> {
    let frame = wire::ServerFrame::decode(bytes)
        .map_err(|e| format!("not a hubbub.v1 ServerFrame: {e}"))?
        .frame
        .ok_or("empty ServerFrame")?;
    Ok(match frame {
        SF::Welcome(w) => ServerFrame::Welcome {
            user: w.user,
            device: w.device,
            session: w.session,
            heartbeat_ms: w.heartbeat_ms,
            server_time: w.server_time,
            max_frame_bytes: w.max_frame_bytes as usize,
            ice_servers: match json_value(&w.ice_servers_json, "ice_servers_json")? {
                Value::Array(list) => list,
                _ => Vec::new(),
            },
        },
        SF::Message(m) => ServerFrame::Message(message_in(m)?),
        SF::Member(m) => ServerFrame::Member {
            conv: m.conv,
            user: m.user,
            event: parse_name("member event", m.event)?,
            online: m.online,
            by: m.by,
        },
        SF::Reaction(r) => ServerFrame::Reaction {
            conv: r.conv,
            seq: r.seq,
            user: r.user,
            emoji: r.emoji,
            on: r.on,
        },
        SF::Reactions(r) => ServerFrame::Reactions {
            conv: r.conv,
            seq: r.seq,
            reactions: reactions_in(r.reactions),
        },
        SF::Presence(p) => ServerFrame::Presence {
            user: p.user,
            online: p.online,
        },
        SF::Receipt(r) => ServerFrame::Receipt {
            conv: r.conv,
            user: r.user,
            seq: r.seq,
        },
        SF::Typing(t) => ServerFrame::Typing {
            conv: t.conv,
            user: t.user,
        },
        SF::Recalled(r) => ServerFrame::Recalled {
            conv: r.conv,
            seq: r.seq,
            by: r.by,
        },
        SF::Edited(e) => ServerFrame::Edited {
            conv: e.conv,
            seq: e.seq,
            content: content_in(e.content),
            edited_at: e.edited_at,
        },
        SF::Signal(s) => ServerFrame::Signal {
            from: s.from,
            call_id: s.call_id,
            kind: parse_name("signal kind", s.kind)?,
            data: json_value(&s.data_json, "data_json")?,
        },
        SF::Notice(n) => ServerFrame::Notice {
            text: n.text,
            from: n.from,
        },
        SF::Kicked(k) => ServerFrame::Kicked { reason: k.reason },
        SF::Pong(p) => ServerFrame::Pong { id: id_in(p.id) },
        SF::Ok(o) => ServerFrame::Ok {
            id: id_in(o.id),
            body: crate::Reply::Fields(match json_value(&o.body_json, "body_json")? {
                Value::Object(m) => m,
                _ => Map::new(),
            }),
        },
        SF::Error(e) => ServerFrame::Error {
            id: id_in(e.id),
            code: parse_name("error code", e.code)?,
            message: e.message,
        },
    })
}

/// Encodes a client frame (for clients).
pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    let id = id_out(&frame.id().cloned());
    let f = match frame.clone() {
        ClientFrame::Ping { .. } => CF::Ping(wire::Ping {}),
        ClientFrame::Join { room, .. } => CF::Join(wire::Join { room }),
        ClientFrame::Leave { room, .. } => CF::Leave(wire::Leave { room }),
        ClientFrame::Send {
            conv,
            client_msg_id,
            content_type,
            content,
            reply_to,
            ..
        } => CF::Send(wire::Send {
            conv,
            client_msg_id,
            content_type: content_type.as_str().into(),
            content: Some(content_out(&content)),
            reply_to,
        }),
        ClientFrame::History {
            conv,
            before_seq,
            after_seq,
            limit,
            ..
        } => CF::History(wire::History {
            conv,
            before_seq,
            after_seq,
            limit,
        }),
        ClientFrame::Sync {
            cursors,
            limit,
            since,
            ..
        } => CF::Sync(wire::Sync {
            cursors: cursors.into_iter().collect(),
            limit,
            since,
        }),
        ClientFrame::Read { conv, seq, .. } => CF::Read(wire::Read { conv, seq }),
        ClientFrame::Typing { conv, .. } => CF::Typing(wire::Typing { conv }),
        ClientFrame::Recall { conv, seq, .. } => CF::Recall(wire::Recall { conv, seq }),
        ClientFrame::Edit {
            conv, seq, content, ..
        } => CF::Edit(wire::Edit {
            conv,
            seq,
            content: Some(content_out(&content)),
        }),
        ClientFrame::Presence { users, .. } => CF::Presence(wire::PresenceQuery { users }),
        ClientFrame::Signal {
            to,
            call_id,
            kind,
            data,
            ..
        } => CF::Signal(wire::SignalOut {
            to,
            call_id,
            kind: name_of(&kind),
            data_json: json_text(&data),
        }),
        ClientFrame::React {
            conv,
            seq,
            emoji,
            on,
            ..
        } => CF::React(wire::React {
            conv,
            seq,
            emoji,
            on: Some(on),
        }),
        ClientFrame::Remove { room, user, .. } => CF::Remove(wire::Remove { room, user }),
    };
    wire::ClientFrame { id, frame: Some(f) }.encode_to_vec()
}

/// Decodes a client frame; errors carry the request id when it could be read.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    let cf = wire::ClientFrame::decode(bytes).map_err(|e| DecodeError {
        id: None,
        message: format!("not a hubbub.v1 ClientFrame: {e}"),
    })?;
    let id = id_in(cf.id);
    let err = |message: String| DecodeError {
        id: id.clone(),
        message,
    };
    let Some(frame) = cf.frame else {
        return Err(err("the frame has no type".into()));
    };
    let id = id.clone();
    Ok(match frame {
        CF::Ping(_) => ClientFrame::Ping { id },
        CF::Join(j) => ClientFrame::Join { id, room: j.room },
        CF::Leave(l) => ClientFrame::Leave { id, room: l.room },
        CF::Send(s) => ClientFrame::Send {
            content_type: content_type(s.content_type).map_err(err)?,
            id,
            conv: s.conv,
            client_msg_id: s.client_msg_id,
            content: content_in(s.content),
            reply_to: s.reply_to,
        },
        CF::History(h) => ClientFrame::History {
            id,
            conv: h.conv,
            before_seq: h.before_seq,
            after_seq: h.after_seq,
            limit: h.limit,
        },
        CF::Sync(s) => ClientFrame::Sync {
            id,
            cursors: s.cursors.into_iter().collect(),
            limit: s.limit,
            since: s.since,
        },
        CF::Read(r) => ClientFrame::Read {
            id,
            conv: r.conv,
            seq: r.seq,
        },
        CF::Typing(t) => ClientFrame::Typing { id, conv: t.conv },
        CF::Recall(r) => ClientFrame::Recall {
            id,
            conv: r.conv,
            seq: r.seq,
        },
        CF::Edit(e) => ClientFrame::Edit {
            id,
            conv: e.conv,
            seq: e.seq,
            content: content_in(e.content),
        },
        CF::Presence(p) => ClientFrame::Presence { id, users: p.users },
        CF::Signal(s) => ClientFrame::Signal {
            kind: parse_name("signal kind", s.kind).map_err(err)?,
            data: json_value(&s.data_json, "data_json").map_err(err)?,
            id,
            to: s.to,
            call_id: s.call_id,
        },
        CF::React(r) => ClientFrame::React {
            id,
            conv: r.conv,
            seq: r.seq,
            emoji: r.emoji,
            on: r.on.unwrap_or(true),
        },
        CF::Remove(r) => ClientFrame::Remove {
            id,
            room: r.room,
            user: r.user,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_roundtrip() {
        let frames = vec![
            ClientFrame::Send {
                id: Some(json!("7")),
                conv: "room:a".into(),
                client_msg_id: "c1".into(),
                content_type: ContentType::Image,
                content: json!({"url": "/files/x/a.png", "name": "a.png", "size": 3, "mime": "image/png"}),
                reply_to: Some(2),
            },
            ClientFrame::React {
                id: Some(json!("8")),
                conv: "room:a".into(),
                seq: 2,
                emoji: "👍".into(),
                on: false,
            },
            ClientFrame::Remove {
                id: None,
                room: "a".into(),
                user: "bob".into(),
            },
            ClientFrame::Signal {
                id: None,
                to: "bob".into(),
                call_id: "k".into(),
                kind: crate::SignalKind::Offer,
                data: json!({"sdp": "v=0"}),
            },
            ClientFrame::Sync {
                id: Some(json!("s")),
                cursors: [("room:a".to_string(), 3u64)].into_iter().collect(),
                limit: Some(10),
                since: Some(1_700_000_000_000),
            },
        ];
        for f in frames {
            assert_eq!(decode_client(&encode_client(&f)).unwrap(), f);
        }
    }

    #[test]
    fn server_frames_roundtrip() {
        let frames = vec![
            ServerFrame::Message(Message {
                conv: "dm:a:b".into(),
                seq: 4,
                msg_id: "m".into(),
                from: "a".into(),
                client_msg_id: "c".into(),
                content_type: ContentType::Text,
                content: Some(json!("hi <b>")),
                ts: 5,
                recalled: false,
                edited_at: Some(6),
                reply_to: Some(Box::new(crate::ReplyRef {
                    seq: 2,
                    from: "b".into(),
                    excerpt: Some("hello".into()),
                })),
                reactions: [("🎉".to_string(), vec!["a".to_string(), "b".to_string()])].into(),
                mentions: vec!["b".into()],
            }),
            ServerFrame::Welcome {
                user: "a".into(),
                device: "d".into(),
                session: "s".into(),
                heartbeat_ms: 1,
                server_time: 2,
                max_frame_bytes: 3,
                ice_servers: vec![json!({"urls": ["stun:stun.example:3478"]})],
            },
            ServerFrame::Member {
                conv: "room:a".into(),
                user: "b".into(),
                event: crate::MemberEvent::Removed,
                online: 1,
                by: Some("a".into()),
            },
            ServerFrame::Reaction {
                conv: "room:a".into(),
                seq: 2,
                user: "b".into(),
                emoji: "👍".into(),
                on: true,
            },
            ServerFrame::Reactions {
                conv: "room:a".into(),
                seq: 2,
                reactions: [("👍".to_string(), vec!["b".to_string()])].into(),
            },
            ServerFrame::ok(
                Some(json!("1")),
                crate::Reply::Fields(
                    json!({"seq": 1, "conv": "room:a"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            ),
            ServerFrame::error(
                Some(json!("2")),
                crate::ProtoError::new(crate::ErrorCode::NotMember, "no"),
            ),
        ];
        for f in frames {
            assert_eq!(decode_server(&encode_server(&f)).unwrap(), f);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_client(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_client(&[]).is_err());
        let no_type = wire::ClientFrame {
            id: "9".into(),
            frame: None,
        }
        .encode_to_vec();
        assert_eq!(decode_client(&no_type).unwrap_err().id, Some(json!("9")));
    }
}
