//! The bodies of `ok` answers, one struct per request kind, and of the HTTP API's JSON
//! answers that carry the same data.
//!
//! The server builds its answers from these types, the client library reads them back
//! with [`Reply::parse`], the protobuf codec carries them as `Ok.body_json`, and the
//! OpenAPI document describes them (feature `openapi`). A field added here is added
//! everywhere at once.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Message;

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// `ok` to `send`: where the message was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SendOk {
    pub conv: String,
    pub seq: u64,
    pub msg_id: String,
    /// When it was stored (Unix ms).
    pub ts: i64,
}

/// `ok` to `join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct JoinOk {
    /// `room:<name>`.
    pub conv: String,
    /// The room's newest `seq` when the join was committed.
    pub last_seq: u64,
    /// Distinct online users who are members, the joiner included.
    pub online: u64,
    /// The join created the room (the joiner is its admin).
    pub created: bool,
}

/// `ok` to `leave`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LeaveOk {
    pub conv: String,
    /// The room's last seq when the leave committed: the leaver gets the messages up to
    /// it and none after (an addition to version 1; absent from older servers).
    #[serde(default)]
    pub last_seq: u64,
}

/// `ok` to `history`, and the body of `GET /api/conversations/{conv}/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct HistoryOk {
    /// Ascending by `seq`.
    pub messages: Vec<Message>,
    /// More exist in the paging direction.
    pub has_more: bool,
}

/// A conversation the user belongs to and its newest `seq` (in [`SyncOk`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ConvSeq {
    pub conv: String,
    pub last_seq: u64,
}

/// `ok` to `sync`, after the replayed frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SyncOk {
    /// Pass as `since` to the next sync (Unix ms).
    pub server_time: i64,
    /// The last `seq` sent for each named conversation.
    pub cursors: BTreeMap<String, u64>,
    /// `more` is empty.
    pub caught_up: bool,
    /// Named conversations with messages left: sync again.
    pub more: Vec<String>,
    /// Every conversation the user belongs to.
    pub conversations: Vec<ConvSeq>,
    /// Named conversations the user may not read (left out of the answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<String>,
}

/// `ok` to `presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct PresenceOk {
    /// Each asked name: online or not.
    pub online: BTreeMap<String, bool>,
}

/// `ok` to `recall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RecallOk {
    pub conv: String,
    pub seq: u64,
}

/// `ok` to `react`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ReactOk {
    pub conv: String,
    pub seq: u64,
}

/// `ok` to `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RemoveOk {
    pub conv: String,
    pub user: String,
}

/// One result of `GET /api/search`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SearchHit {
    pub conv: String,
    pub seq: u64,
    pub msg_id: String,
    pub from: String,
    pub ts: i64,
    /// The message's text now.
    pub content: String,
    /// The text with each match wrapped in `[` `]`.
    pub highlight: String,
}

/// The body of `GET /api/search`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct SearchPage {
    pub results: Vec<SearchHit>,
    /// The `before` of the next page; null on the last one.
    pub next: Option<String>,
}

/// One member of `GET /api/rooms/{name}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MemberInfo {
    pub user: String,
    /// `admin` or `member`.
    pub role: String,
    pub online: bool,
    pub joined_at: i64,
}

/// The body of `GET /api/rooms/{name}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MemberList {
    pub members: Vec<MemberInfo>,
}

/// `ok` to `edit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct EditOk {
    pub conv: String,
    pub seq: u64,
    /// When the edit was stored (Unix ms).
    pub edited_at: i64,
}

/// One conversation of `GET /api/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ConversationInfo {
    pub conv: String,
    /// `room` or `dm`.
    pub kind: String,
    pub last_seq: u64,
    /// Highest `seq` the user marked read (0 if none).
    pub read_seq: u64,
    /// Messages after `read_seq` not sent by the user.
    pub unread: u64,
    /// Of those, the ones that mention the user (1.1).
    #[serde(default)]
    pub mentions: u64,
}

/// The body of `GET /api/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ConversationList {
    pub conversations: Vec<ConversationInfo>,
}

/// One room of `GET /api/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RoomInfo {
    /// The bare name.
    pub name: String,
    /// `room:<name>`.
    pub conv: String,
    pub members: u64,
    /// Distinct members online now.
    pub online: u64,
}

/// The body of `GET /api/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RoomPage {
    pub rooms: Vec<RoomInfo>,
    /// The `after` of the following page; null on the last one.
    pub next: Option<String>,
}

/// The body of an `ok` answer: its fields sit beside `type` and `id` on the wire.
///
/// The server answers with the typed variants. A decoded answer is always
/// [`Reply::Fields`] (the frame alone does not say which request it answers); the
/// requester, who knows, reads it with [`Reply::parse`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Send(SendOk),
    Join(JoinOk),
    Leave(LeaveOk),
    History(HistoryOk),
    Sync(SyncOk),
    Presence(PresenceOk),
    Recall(RecallOk),
    Edit(EditOk),
    React(ReactOk),
    Remove(RemoveOk),
    /// The fields as decoded.
    Fields(Map<String, Value>),
}

impl Reply {
    /// The fields as a JSON object.
    pub fn into_fields(self) -> Map<String, Value> {
        match self {
            Reply::Fields(m) => m,
            typed => match serde_json::to_value(typed) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            },
        }
    }

    /// Reads the body as the answer type `T` of the request it answers.
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        serde_json::from_value(Value::Object(self.into_fields()))
    }
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Map::deserialize(d).map(Reply::Fields)
    }
}

macro_rules! reply_from {
    ($($t:ident => $v:ident),* $(,)?) => {
        $(impl From<$t> for Reply {
            fn from(body: $t) -> Reply {
                Reply::$v(body)
            }
        })*
    };
}

reply_from!(
    SendOk => Send,
    JoinOk => Join,
    LeaveOk => Leave,
    HistoryOk => History,
    SyncOk => Sync,
    PresenceOk => Presence,
    RecallOk => Recall,
    EditOk => Edit,
    ReactOk => React,
    RemoveOk => Remove,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerFrame;

    #[test]
    fn typed_bodies_sit_beside_type_and_id_and_parse_back() {
        let sent = SendOk {
            conv: "room:x".into(),
            seq: 4,
            msg_id: "01J".into(),
            ts: 9,
        };
        let frame = ServerFrame::Ok {
            id: Some(Value::from("7")),
            body: sent.clone().into(),
        };
        let text = frame.to_json();
        assert_eq!(
            text,
            r#"{"type":"ok","id":"7","conv":"room:x","seq":4,"msg_id":"01J","ts":9}"#
        );
        let ServerFrame::Ok { body, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("not an ok: {text}");
        };
        assert_eq!(body.parse::<SendOk>().unwrap(), sent);
    }

    #[test]
    fn an_empty_denied_list_is_left_out() {
        let sync = SyncOk {
            server_time: 1,
            cursors: BTreeMap::from([("room:x".into(), 3)]),
            caught_up: true,
            more: vec![],
            conversations: vec![ConvSeq {
                conv: "room:x".into(),
                last_seq: 3,
            }],
            denied: vec![],
        };
        let fields = Reply::from(sync.clone()).into_fields();
        assert!(!fields.contains_key("denied"));
        assert_eq!(Reply::Fields(fields).parse::<SyncOk>().unwrap(), sync);
    }
}
