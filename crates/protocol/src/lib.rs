//! Wire types of the hubbub protocol, version 1.
//!
//! This crate is the contract shared by the server, the client library and the tests.
//! It has no I/O and no async runtime: only frame types, conversation ids, name rules
//! and the validation of client input.
//!
//! # Layout
//!
//! - [`ClientFrame`]: every frame a client may send, decoded by [`decode_client_frame`].
//! - [`ServerFrame`]: every frame the server sends; [`Message`] is one stored message.
//! - [`Conv`]: a parsed conversation id (`room:<name>` or `dm:<a>:<b>`).
//! - [`ErrorCode`]: the stable error codes of `error` frames and HTTP error bodies.
//! - [`reply`]: the body of each `ok` answer (and of the HTTP API's JSON answers).
//! - [`validate_content`]: the rules for `send` and `edit` content.

pub mod pb;
pub mod reply;

pub use reply::Reply;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Subprotocol name of the JSON encoding (text frames).
pub const SUBPROTOCOL_JSON: &str = "hubbub.v1.json";
/// Subprotocol name of the protobuf encoding (binary frames).
pub const SUBPROTOCOL_PB: &str = "hubbub.v1.pb";

/// Longest user name, in bytes.
pub const MAX_USER_NAME: usize = 32;
/// Longest room name, in bytes.
pub const MAX_ROOM_NAME: usize = 64;
/// Longest `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 128;
/// Longest URL inside attachment content, in bytes.
pub const MAX_URL: usize = 2048;
/// The largest `seq` a request may name (seqs are stored as signed 64-bit integers).
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Stable error codes, shared by `error` frames and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotMember,
    NotFound,
    TooLarge,
    RateLimited,
    Conflict,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The wire spelling of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol-level error: a code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtoError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// Checks a `seq` a request names: at most [`MAX_SEQ`] (`bad_request` otherwise, naming
/// the field).
pub fn check_seq(field: &str, seq: u64) -> Result<u64, ProtoError> {
    if seq > MAX_SEQ {
        return Err(ProtoError::bad_request(format!(
            "{field} must be at most {MAX_SEQ}"
        )));
    }
    Ok(seq)
}

/// True when `name` is a valid user name: `^[A-Za-z0-9_.-]{1,32}$`.
pub fn is_valid_user_name(name: &str) -> bool {
    is_name(name, MAX_USER_NAME)
}

/// True when `name` is a valid bare room name: `^[A-Za-z0-9_.-]{1,64}$`.
pub fn is_valid_room_name(name: &str) -> bool {
    is_name(name, MAX_ROOM_NAME)
}

fn is_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A parsed conversation id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv<'a> {
    /// `room:<name>`
    Room(&'a str),
    /// `dm:<a>:<b>` with `a < b`.
    Dm(&'a str, &'a str),
}

impl<'a> Conv<'a> {
    /// Parses and validates a conversation id. Unsorted, equal or invalid DM names and
    /// invalid room names are errors.
    pub fn parse(id: &'a str) -> Result<Conv<'a>, ProtoError> {
        if let Some(name) = id.strip_prefix("room:") {
            if is_valid_room_name(name) {
                return Ok(Conv::Room(name));
            }
            return Err(ProtoError::bad_request(format!(
                "invalid room name in conversation id {id:?}"
            )));
        }
        if let Some(rest) = id.strip_prefix("dm:") {
            let Some((a, b)) = rest.split_once(':') else {
                return Err(ProtoError::bad_request(format!(
                    "a dm id is dm:<a>:<b>, got {id:?}"
                )));
            };
            if !is_valid_user_name(a) || !is_valid_user_name(b) {
                return Err(ProtoError::bad_request(format!(
                    "invalid user name in conversation id {id:?}"
                )));
            }
            if a >= b {
                return Err(ProtoError::bad_request(format!(
                    "the names of a dm id must be distinct and sorted, got {id:?}"
                )));
            }
            return Ok(Conv::Dm(a, b));
        }
        Err(ProtoError::bad_request(format!(
            "a conversation id starts with room: or dm:, got {id:?}"
        )))
    }

    /// The DM id of two distinct users, names sorted.
    pub fn dm_id(a: &str, b: &str) -> String {
        if a <= b {
            format!("dm:{a}:{b}")
        } else {
            format!("dm:{b}:{a}")
        }
    }

    /// The conversation id of a bare room name.
    pub fn room_id(name: &str) -> String {
        format!("room:{name}")
    }

    /// For a DM, the participant other than `me` (if `me` is one of the two).
    pub fn dm_peer(&self, me: &str) -> Option<&'a str> {
        match *self {
            Conv::Dm(a, b) if a == me => Some(b),
            Conv::Dm(a, b) if b == me => Some(a),
            _ => None,
        }
    }

    pub fn is_room(&self) -> bool {
        matches!(self, Conv::Room(_))
    }
}

/// Kinds of message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    Text,
    Image,
    File,
    Audio,
    Video,
    System,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Text => "text",
            ContentType::Image => "image",
            ContentType::File => "file",
            ContentType::Audio => "audio",
            ContentType::Video => "video",
            ContentType::System => "system",
        }
    }

    pub fn parse(s: &str) -> Option<ContentType> {
        Some(match s {
            "text" => ContentType::Text,
            "image" => ContentType::Image,
            "file" => ContentType::File,
            "audio" => ContentType::Audio,
            "video" => ContentType::Video,
            "system" => ContentType::System,
            _ => return None,
        })
    }

    /// Text-like kinds carry a string; the others an attachment object.
    pub fn is_textual(self) -> bool {
        matches!(self, ContentType::Text | ContentType::System)
    }
}

/// Longest name of an uploaded file, in bytes.
pub const MAX_FILE_NAME: usize = 100;

/// Where an attachment's `url` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentUrl<'a> {
    /// A file of the upload API: `/files/<id>/<name>`.
    Upload { id: &'a str, name: &'a str },
    /// An absolute `https://` URL elsewhere.
    External,
}

/// True when `id` has the form of an upload id: a ULID as the upload API writes it
/// (26 characters of Crockford base32, upper case, first one `0`-`7`).
pub fn is_file_id(id: &str) -> bool {
    id.len() == 26
        && id.as_bytes()[0] <= b'7'
        && id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z'))
}

/// True when `name` is a stored file name as the upload API writes it: 1 to
/// [`MAX_FILE_NAME`] bytes of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FILE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Classifies an attachment URL; `None` when it is neither an upload URL
/// (`/files/<id>/<name>`, nothing after the name) nor an absolute `https://` URL with a
/// host (printable ASCII only, no backslash). Anything else (other schemes, other paths,
/// `//host`, `/\host`) could send a browser somewhere unexpected.
pub fn parse_attachment_url(url: &str) -> Option<AttachmentUrl<'_>> {
    if url.len() > MAX_URL {
        return None;
    }
    if let Some(rest) = url.strip_prefix("/files/") {
        let (id, name) = rest.split_once('/')?;
        return (is_file_id(id) && is_safe_file_name(name))
            .then_some(AttachmentUrl::Upload { id, name });
    }
    let scheme = url.get(..8)?;
    if !scheme.eq_ignore_ascii_case("https://") {
        return None;
    }
    if !url
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b'\\')
    {
        return None;
    }
    let host = url[8..].split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or("");
    (!host.is_empty() && !host.starts_with(':')).then_some(AttachmentUrl::External)
}

/// Checks `content` against its `content_type`: text (and system) content is a string of
/// at most `max_text_bytes` UTF-8 bytes; attachments are `{url, name?, size?, mime?}`.
pub fn validate_content(
    content_type: ContentType,
    content: &Value,
    max_text_bytes: usize,
) -> Result<(), ProtoError> {
    if content_type.is_textual() {
        let Value::String(text) = content else {
            return Err(ProtoError::bad_request(format!(
                "content of a {} message must be a string",
                content_type.as_str()
            )));
        };
        if text.len() > max_text_bytes {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!(
                    "text is {} bytes, the limit is {max_text_bytes}",
                    text.len()
                ),
            ));
        }
        return Ok(());
    }
    let Value::Object(obj) = content else {
        return Err(ProtoError::bad_request(format!(
            "content of a {} message must be an object {{url, name, size, mime}}",
            content_type.as_str()
        )));
    };
    match obj.get("url") {
        Some(Value::String(url)) if !url.is_empty() && url.len() <= MAX_URL => {
            if parse_attachment_url(url).is_none() {
                return Err(ProtoError::bad_request(
                    "attachment url must be a /files/<id>/<name> URL from the upload API \
                     or an absolute https:// URL",
                ));
            }
        }
        Some(Value::String(url)) if url.len() > MAX_URL => {
            return Err(ProtoError::new(
                ErrorCode::TooLarge,
                format!("url is longer than {MAX_URL} bytes"),
            ))
        }
        _ => {
            return Err(ProtoError::bad_request(
                "attachment content needs a non-empty string url",
            ))
        }
    }
    for key in ["name", "mime"] {
        match obj.get(key) {
            None | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(ProtoError::bad_request(format!(
                    "attachment {key} must be a string"
                )))
            }
        }
    }
    match obj.get("size") {
        None => {}
        Some(v) if v.as_u64().is_some() => {}
        Some(_) => {
            return Err(ProtoError::bad_request(
                "attachment size must be a non-negative integer",
            ))
        }
    }
    let encoded_len = serde_json::to_string(content).map(|s| s.len()).unwrap_or(0);
    if encoded_len > max_text_bytes {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!("attachment content is {encoded_len} bytes, the limit is {max_text_bytes}"),
        ));
    }
    Ok(())
}

/// Kinds of call signals relayed by `signal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    Offer,
    Answer,
    Candidate,
    Hangup,
    Ring,
}

/// A request id chosen by the client: a string or a number, echoed in the answer.
pub type ReqId = Value;

/// Every frame a client may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
    },
    Join {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        room: String,
    },
    Leave {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        room: String,
    },
    Send {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        client_msg_id: String,
        content_type: ContentType,
        content: Value,
        /// The `seq` of the message of the same conversation this one answers (1.1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Sync {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        cursors: BTreeMap<String, u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// `server_time` of the previous sync: also replay recalls and edits made since
        /// then to messages up to the cursors (a hubbub addition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<i64>,
    },
    Read {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        seq: u64,
    },
    Typing {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
    },
    Recall {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        seq: u64,
    },
    Edit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        seq: u64,
        content: Value,
    },
    Presence {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        users: Vec<String>,
    },
    Signal {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        to: String,
        call_id: String,
        kind: SignalKind,
        #[serde(default)]
        data: Value,
    },
    /// Sets (`on`, the default) or clears `user`'s reaction `emoji` on a message (1.1).
    React {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        conv: String,
        seq: u64,
        emoji: String,
        #[serde(default = "yes")]
        on: bool,
    },
    /// A room admin removes `user` from `room` (1.1).
    Remove {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        room: String,
        user: String,
    },
}

fn yes() -> bool {
    true
}

impl ClientFrame {
    /// Sets the request id.
    pub fn set_id(&mut self, new: Option<ReqId>) {
        match self {
            ClientFrame::Ping { id }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Sync { id, .. }
            | ClientFrame::Read { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::Recall { id, .. }
            | ClientFrame::Edit { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::Signal { id, .. }
            | ClientFrame::React { id, .. }
            | ClientFrame::Remove { id, .. } => *id = new,
        }
    }

    /// The request id, when the frame carries one.
    pub fn id(&self) -> Option<&ReqId> {
        match self {
            ClientFrame::Ping { id }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Sync { id, .. }
            | ClientFrame::Read { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::Recall { id, .. }
            | ClientFrame::Edit { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::Signal { id, .. }
            | ClientFrame::React { id, .. }
            | ClientFrame::Remove { id, .. } => id.as_ref(),
        }
    }

    /// The frame's `type` as sent on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Send { .. } => "send",
            ClientFrame::History { .. } => "history",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Recall { .. } => "recall",
            ClientFrame::Edit { .. } => "edit",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::Signal { .. } => "signal",
            ClientFrame::React { .. } => "react",
            ClientFrame::Remove { .. } => "remove",
        }
    }
}

/// A frame that could not be decoded: the id it carried (if any could be found) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<ReqId>,
    pub message: String,
}

/// Decodes one JSON protocol message sent by a client.
///
/// On failure the error still carries the request `id` when the text was a JSON object
/// with a string or number `id`, so that the `error` frame can echo it.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, DecodeError> {
    // Most frames are `send`s: one that starts with its type is decoded straight into
    // its fields. serde decodes an internally tagged enum by first copying every field
    // into a buffer of its own (strings included) to find the tag; every other frame,
    // and a `send` that is not well-formed, takes that general way, errors included.
    let sent = starts_as_send(text)
        .then(|| serde_json::from_str::<SendFrame>(text).ok())
        .flatten();
    let decoded = match sent {
        Some(send) => Ok(send.into()),
        None => serde_json::from_str::<ClientFrame>(text),
    };
    match decoded {
        Ok(frame) => match frame.id() {
            None | Some(Value::String(_)) | Some(Value::Number(_)) => Ok(frame),
            Some(_) => Err(DecodeError {
                id: None,
                message: "id must be a string or a number".into(),
            }),
        },
        Err(err) => {
            #[derive(Deserialize)]
            struct IdOnly {
                #[serde(default)]
                id: Option<Value>,
            }
            let id = serde_json::from_str::<IdOnly>(text)
                .ok()
                .and_then(|v| v.id)
                .filter(|v| v.is_string() || v.is_number());
            Err(DecodeError {
                id,
                message: describe_decode_error(text, &err),
            })
        }
    }
}

/// Whether `text` begins `{"type":"send"` (whitespace allowed between the tokens).
fn starts_as_send(text: &str) -> bool {
    let rest = text.trim_start().strip_prefix('{').map(str::trim_start);
    let rest = rest
        .and_then(|t| t.strip_prefix("\"type\""))
        .map(str::trim_start);
    let rest = rest.and_then(|t| t.strip_prefix(':')).map(str::trim_start);
    rest.is_some_and(|t| t.starts_with("\"send\""))
}

/// A `send` frame's fields (see [`decode_client_frame`]); decodes exactly what
/// `ClientFrame::Send` does.
#[derive(Deserialize)]
struct SendFrame {
    #[serde(rename = "type")]
    _type: SendTag,
    #[serde(default)]
    id: Option<ReqId>,
    conv: String,
    client_msg_id: String,
    content_type: ContentType,
    content: Value,
    #[serde(default)]
    reply_to: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SendTag {
    Send,
}

impl From<SendFrame> for ClientFrame {
    fn from(f: SendFrame) -> Self {
        ClientFrame::Send {
            id: f.id,
            conv: f.conv,
            client_msg_id: f.client_msg_id,
            content_type: f.content_type,
            content: f.content,
            reply_to: f.reply_to,
        }
    }
}

fn describe_decode_error(text: &str, err: &serde_json::Error) -> String {
    if err.is_syntax() || err.is_eof() {
        return format!("malformed JSON: {err}");
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => match obj.get("type") {
            None => "a frame needs a string \"type\"".into(),
            Some(Value::String(t)) => format!("bad {t} frame: {err}"),
            Some(_) => "\"type\" must be a string".into(),
        },
        Ok(_) => "a frame is a JSON object".into(),
        Err(_) => format!("malformed frame: {err}"),
    }
}

/// One stored message, as pushed in `message` frames and returned by `history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Message {
    pub conv: String,
    pub seq: u64,
    pub msg_id: String,
    pub from: String,
    pub client_msg_id: String,
    pub content_type: ContentType,
    /// Absent when the message was recalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    pub ts: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub recalled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<i64>,
    /// The message this one answers (1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Box<ReplyRef>>,
    /// Per emoji, the users who reacted with it, sorted (1.1; absent when none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: Reactions,
    /// The members of the conversation the text mentions with `@name` (1.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
}

/// Per emoji, the users who reacted with it (sorted).
pub type Reactions = BTreeMap<String, Vec<String>>;

/// The message a reply answers: its `seq`, sender and the start of its text (at most
/// [`EXCERPT_CHARS`] characters; absent when it is not text or was recalled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReplyRef {
    pub seq: u64,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// Longest excerpt of a replied-to text, in characters.
pub const EXCERPT_CHARS: usize = 140;

/// The excerpt of a replied-to message's text (see [`ReplyRef`]).
pub fn excerpt_of(text: &str) -> String {
    text.chars().take(EXCERPT_CHARS).collect()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `member` event kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberEvent {
    Joined,
    Left,
    /// Removed by a room admin (1.1): the frame's `by` says who.
    Removed,
}

/// Every frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: String,
        device: String,
        session: String,
        heartbeat_ms: u64,
        server_time: i64,
        max_frame_bytes: usize,
        /// STUN/TURN servers for calls, as WebRTC `RTCIceServer`s (1.1).
        #[serde(default)]
        ice_servers: Vec<Value>,
    },
    Message(Message),
    Member {
        conv: String,
        user: String,
        event: MemberEvent,
        online: u64,
        /// Who removed the member (`event: removed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// `user` set (`on`) or cleared a reaction (1.1).
    Reaction {
        conv: String,
        seq: u64,
        user: String,
        emoji: String,
        on: bool,
    },
    /// A message's reactions now, replayed by `sync` with `since` (1.1).
    Reactions {
        conv: String,
        seq: u64,
        reactions: Reactions,
    },
    Presence {
        user: String,
        online: bool,
    },
    Receipt {
        conv: String,
        user: String,
        seq: u64,
    },
    Typing {
        conv: String,
        user: String,
    },
    Recalled {
        conv: String,
        seq: u64,
        by: String,
    },
    Edited {
        conv: String,
        seq: u64,
        content: Value,
        edited_at: i64,
    },
    Signal {
        from: String,
        call_id: String,
        kind: SignalKind,
        #[serde(default)]
        data: Value,
    },
    Notice {
        text: String,
        from: String,
    },
    Kicked {
        reason: String,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
    },
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        #[serde(flatten)]
        body: Reply,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ReqId>,
        code: ErrorCode,
        message: String,
    },
}

impl ServerFrame {
    /// An `ok` answer with the given body.
    pub fn ok(id: Option<ReqId>, body: impl Into<Reply>) -> ServerFrame {
        ServerFrame::Ok {
            id,
            body: body.into(),
        }
    }

    /// An `error` answer.
    pub fn error(id: Option<ReqId>, err: ProtoError) -> ServerFrame {
        ServerFrame::Error {
            id,
            code: err.code,
            message: err.message,
        }
    }

    /// Compact JSON of the frame (never contains a raw newline).
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_string()
        })
    }
}

/// Splits the text of one WebSocket frame into its protocol messages (separated by `\n`),
/// skipping empty lines.
pub fn split_frames(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sends_that_start_with_their_type_are_told_apart_cheaply() {
        for yes in [
            r#"{"type":"send","conv":"x"}"#,
            " {\n \"type\" :\t\"send\" }",
        ] {
            assert!(starts_as_send(yes), "{yes}");
        }
        for no in [
            r#"{"conv":"x","type":"send"}"#,
            r#"{"type":"sending"}"#,
            r#"{"type":"ping"}"#,
            r#"["type","send"]"#,
            "",
        ] {
            assert!(!starts_as_send(no), "{no}");
        }
    }

    #[test]
    fn conv_ids_parse_and_validate() {
        assert_eq!(Conv::parse("room:ops").unwrap(), Conv::Room("ops"));
        assert_eq!(
            Conv::parse("dm:alice:bob").unwrap(),
            Conv::Dm("alice", "bob")
        );
        for bad in [
            "dm:bob:alice",
            "dm:bob:bob",
            "dm:bob",
            "room:",
            "room:a b",
            "chan:x",
            "dm:a:b:c",
            "",
        ] {
            let err = Conv::parse(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad}");
        }
        assert_eq!(Conv::dm_id("bob", "alice"), "dm:alice:bob");
        assert_eq!(Conv::Dm("alice", "bob").dm_peer("bob"), Some("alice"));
        assert_eq!(Conv::Dm("alice", "bob").dm_peer("carol"), None);
    }

    #[test]
    fn names_follow_the_pattern() {
        assert!(is_valid_user_name("a.b-c_9"));
        assert!(is_valid_user_name(&"x".repeat(32)));
        assert!(!is_valid_user_name(&"x".repeat(33)));
        assert!(!is_valid_user_name("al ice"));
        assert!(!is_valid_user_name("ålice"));
        assert!(is_valid_room_name(&"r".repeat(64)));
        assert!(!is_valid_room_name(&"r".repeat(65)));
    }

    #[test]
    fn decodes_send_and_keeps_id_on_errors() {
        let f = decode_client_frame(
            r#"{"type":"send","id":7,"conv":"room:x","client_msg_id":"c1","content_type":"text","content":"hi","extra":1}"#,
        )
        .unwrap();
        assert_eq!(f.type_name(), "send");
        assert_eq!(f.id(), Some(&json!(7)));

        let err = decode_client_frame(r#"{"type":"nope","id":"a"}"#).unwrap_err();
        assert_eq!(err.id, Some(json!("a")));
        let err = decode_client_frame(r#"{"type":"send","id":"b","conv":"room:x"}"#).unwrap_err();
        assert_eq!(err.id, Some(json!("b")));
        assert!(err.message.contains("send"), "{}", err.message);
        let err = decode_client_frame("{not json").unwrap_err();
        assert_eq!(err.id, None);
        let err = decode_client_frame(r#"{"type":"ping","id":[1]}"#).unwrap_err();
        assert_eq!(err.id, None);
    }

    #[test]
    fn text_limit_counts_utf8_bytes() {
        let ok = Value::String("é".repeat(8192));
        assert!(validate_content(ContentType::Text, &ok, 16384).is_ok());
        let too_big = Value::String(format!("{}x", "é".repeat(8192)));
        assert_eq!(
            validate_content(ContentType::Text, &too_big, 16384)
                .unwrap_err()
                .code,
            ErrorCode::TooLarge
        );
        assert_eq!(
            validate_content(ContentType::Image, &json!("x"), 16384)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert!(validate_content(
            ContentType::Image,
            &json!({"url":"/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/a.png","name":"a.png","size":3,"mime":"image/png"}),
            16384
        )
        .is_ok());
        assert!(validate_content(ContentType::File, &json!({"url":""}), 16384).is_err());
        assert!(validate_content(ContentType::File, &json!({"url":"u","size":-1}), 16384).is_err());
    }

    #[test]
    fn attachment_urls_are_uploads_or_https_only() {
        let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        assert_eq!(
            parse_attachment_url(&format!("/files/{id}/a.png")),
            Some(AttachmentUrl::Upload { id, name: "a.png" })
        );
        assert_eq!(
            parse_attachment_url("https://example.com/a.png"),
            Some(AttachmentUrl::External)
        );
        for bad in [
            "/\\evil.example/x",
            "//evil.example/x",
            "http://example.com/",
            "javascript:alert(1)",
            "https://",
            "https:///x",
            "https://:80/x",
            "https://a b/",
            "https://é.example/",
            "/files/01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/",
            "/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/a/b",
            "/files/01ARZ3NDEKTSV4RRFFQ69G5FAV/..",
            "/files/81ARZ3NDEKTSV4RRFFQ69G5FAV/a.png",
            "/files/01ARZ3NDEKTSV4RRFFQ69G5FAI/a.png",
        ] {
            assert_eq!(parse_attachment_url(bad), None, "{bad:?}");
        }
        assert!(is_safe_file_name(&"a".repeat(MAX_FILE_NAME)));
        assert!(!is_safe_file_name(&"a".repeat(MAX_FILE_NAME + 1)));
    }

    #[test]
    fn server_frames_roundtrip() {
        let msg = ServerFrame::Message(Message {
            conv: "room:x".into(),
            seq: 3,
            msg_id: "01J".into(),
            from: "alice".into(),
            client_msg_id: "c".into(),
            content_type: ContentType::Text,
            content: Some(json!("a\nb")),
            ts: 1,
            recalled: false,
            edited_at: None,
            reply_to: None,
            reactions: Reactions::new(),
            mentions: vec![],
        });
        let text = msg.to_json();
        assert!(!text.contains('\n'));
        assert!(text.starts_with(r#"{"type":"message","#), "{text}");
        // 1.1 fields are left out when empty.
        for absent in ["reply_to", "reactions", "mentions"] {
            assert!(!text.contains(absent), "{text}");
        }
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), msg);

        let fields = json!({"seq": 1}).as_object().unwrap().clone();
        let ok = ServerFrame::ok(Some(json!("7")), Reply::Fields(fields));
        let text = ok.to_json();
        assert_eq!(text, r#"{"type":"ok","id":"7","seq":1}"#);
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), ok);
    }

    #[test]
    fn split_skips_blank_lines() {
        let parts: Vec<_> = split_frames("{\"a\":1}\n\n{\"b\":2}\n").collect();
        assert_eq!(parts, vec!["{\"a\":1}", "{\"b\":2}"]);
    }
}
