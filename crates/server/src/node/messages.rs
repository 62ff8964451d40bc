//! Sending a message, and what may happen to it after: recall, edit, reactions, read
//! receipts. Who a message mentions is decided here ([`mentioned`]).

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hubbub_protocol::reply::{EditOk, ReactOk, RecallOk, SendOk};
use hubbub_protocol::{
    check_seq, validate_content, ContentType, Conv, ErrorCode, Message, ProtoError,
    MAX_CLIENT_MSG_ID,
};
use serde_json::Value;

use super::{Actor, Node};
use crate::store::NewMessage;

/// A `send` request.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub conv: String,
    pub client_msg_id: String,
    pub content_type: ContentType,
    pub content: Value,
    /// The seq of the message of the same conversation it answers.
    pub reply_to: Option<u64>,
}

/// Longest reaction emoji, in bytes.
pub(crate) const MAX_EMOJI_BYTES: usize = 32;

/// The names `text` mentions with `@name` (a user name as in `?user=`), in order of
/// first mention, each once. A name is read greedily; one that ends in dots (`@bob.`
/// at the end of a sentence) is also tried without them, by [`Node::mentions`].
pub(crate) fn mentioned(text: &str) -> Vec<&str> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let mut out: Vec<&str> = Vec::new();
    let mut rest = text;
    let mut before: Option<char> = None;
    while let Some(at) = rest.find('@') {
        let prev = rest[..at].chars().last().or(before);
        let after = &rest[at + 1..];
        let len = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
        // `a@b` (an address) is no mention.
        if !prev.is_some_and(is_name) && len > 0 && len <= 32 {
            let name = &after[..len];
            if !out.contains(&name) {
                out.push(name);
            }
        }
        before = Some('@');
        rest = &after[len..];
    }
    out
}

impl Node {
    /// Sends a message: checks it, checks that the sender may write the conversation,
    /// and hands it to the store at once, so the order of calls is the order of `seq`s.
    /// The returned future resolves with the `ok` once the message is durable (a
    /// retried `client_msg_id` resolves with the stored message and stores nothing).
    ///
    /// `admit` runs after the message is found valid and before anything else: the
    /// caller's rate limit, which only well-formed messages spend.
    pub async fn send(
        &self,
        actor: Actor<'_>,
        req: SendRequest,
        admit: impl FnOnce() -> Result<(), ProtoError>,
    ) -> Result<BoxFuture<'static, Result<SendOk, ProtoError>>, ProtoError> {
        if req.client_msg_id.is_empty() || req.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(ProtoError::bad_request(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
            )));
        }
        validate_content(req.content_type, &req.content, self.limits.max_text_bytes)?;
        if let Some(to) = req.reply_to {
            check_seq("reply_to", to)?;
        }
        admit()?;
        let dm_members = self.authorize(actor.user, &req.conv).await?;
        let mentions = self
            .mentions(&req.conv, req.content_type, &req.content)
            .await?;
        // In a cluster, a copy of it read from the store must skip this session.
        let noted = self
            .fanout
            .sending(actor.user, &req.client_msg_id, actor.session)
            .then(|| {
                let from = actor.user.to_string();
                (self.fanout.clone(), from, req.client_msg_id.clone())
            });
        let stored = self.store.append(NewMessage {
            conv: req.conv,
            from: actor.user.to_string(),
            client_msg_id: req.client_msg_id,
            content_type: req.content_type,
            content: req.content,
            dm_members,
            origin: actor.session,
            reply_to: req.reply_to,
            mentions,
        });
        Ok(async move {
            let appended = stored.await;
            if let Some((fanout, from, client_msg_id)) = &noted {
                if !appended.as_ref().is_ok_and(|a| !a.duplicate) {
                    fanout.not_sending(from, client_msg_id);
                }
            }
            let m = appended?.message;
            Ok(SendOk {
                conv: m.conv,
                seq: m.seq,
                msg_id: m.msg_id,
                ts: m.ts,
            })
        }
        .boxed())
    }

    /// Moves the user's read position forward; the others get a `receipt`.
    pub async fn read(&self, actor: Actor<'_>, conv: &str, seq: u64) -> Result<(), ProtoError> {
        check_seq("seq", seq)?;
        self.authorize(actor.user, conv).await?;
        self.store
            .mark_read(conv, actor.user, seq, actor.session)
            .await?;
        Ok(())
    }

    /// Recalls a message: only its sender, or an admin of the room, may.
    pub async fn recall(
        &self,
        actor: Actor<'_>,
        conv: &str,
        seq: u64,
    ) -> Result<RecallOk, ProtoError> {
        check_seq("seq", seq)?;
        self.authorize(actor.user, conv).await?;
        let msg = self.existing_message(conv, seq).await?;
        if msg.from != actor.user {
            let admin = Conv::parse(conv)?.is_room()
                && self
                    .store
                    .member_role(conv, actor.user)
                    .await?
                    .is_some_and(|r| r == "admin");
            if !admin {
                return Err(ProtoError::new(
                    ErrorCode::Forbidden,
                    "only the sender or a room admin may recall a message",
                ));
            }
        }
        self.store
            .recall(conv, seq, actor.user, actor.session)
            .await?;
        Ok(RecallOk {
            conv: conv.to_string(),
            seq,
        })
    }

    /// Edits a message: only its sender may; the new content follows the message's
    /// content type.
    pub async fn edit(
        &self,
        actor: Actor<'_>,
        conv: &str,
        seq: u64,
        content: Value,
    ) -> Result<EditOk, ProtoError> {
        check_seq("seq", seq)?;
        self.authorize(actor.user, conv).await?;
        let msg = self.existing_message(conv, seq).await?;
        if msg.from != actor.user {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                "only the sender may edit a message",
            ));
        }
        validate_content(msg.content_type, &content, self.limits.max_text_bytes)?;
        let mentions = self.mentions(conv, msg.content_type, &content).await?;
        let edited_at = self
            .store
            .edit(conv, seq, content, mentions, actor.session)
            .await?;
        Ok(EditOk {
            conv: conv.to_string(),
            seq,
            edited_at,
        })
    }

    /// Sets (`on`) or clears the user's reaction `emoji` (1 to [`MAX_EMOJI_BYTES`] bytes,
    /// no whitespace) on a message of a conversation the user may read. Setting one that
    /// is set, or clearing one that is not, changes and pushes nothing.
    pub async fn react(
        &self,
        actor: Actor<'_>,
        conv: &str,
        seq: u64,
        emoji: &str,
        on: bool,
    ) -> Result<ReactOk, ProtoError> {
        check_seq("seq", seq)?;
        if emoji.is_empty()
            || emoji.len() > MAX_EMOJI_BYTES
            || emoji.chars().any(char::is_whitespace)
        {
            return Err(ProtoError::bad_request(format!(
                "emoji must be 1 to {MAX_EMOJI_BYTES} bytes without whitespace"
            )));
        }
        self.authorize(actor.user, conv).await?;
        self.store
            .react(conv, seq, actor.user, emoji, on, actor.session)
            .await?;
        Ok(ReactOk {
            conv: conv.to_string(),
            seq,
        })
    }

    /// The members of `conv` a text mentions (see [`mentioned`]); none for other content.
    async fn mentions(
        &self,
        conv: &str,
        content_type: ContentType,
        content: &Value,
    ) -> Result<Vec<String>, ProtoError> {
        let Some(text) = content
            .as_str()
            .filter(|_| content_type == ContentType::Text)
        else {
            return Ok(Vec::new());
        };
        let names = mentioned(text);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let is_member: Box<dyn Fn(&str) -> bool + Send> = match Conv::parse(conv)? {
            Conv::Dm(a, b) => {
                let (a, b) = (a.to_string(), b.to_string());
                Box::new(move |u| u == a || u == b)
            }
            Conv::Room(_) => {
                let room = self.room(conv).await?;
                Box::new(move |u| room.contains(u))
            }
        };
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let name = if is_member(name) {
                name
            } else {
                name.trim_end_matches('.')
            };
            if is_member(name) && !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    async fn existing_message(&self, conv: &str, seq: u64) -> Result<Message, ProtoError> {
        self.store.message(conv, seq).await?.ok_or_else(|| {
            ProtoError::new(ErrorCode::NotFound, format!("no message {seq} in {conv}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::mentioned;

    #[test]
    fn mentions_are_names_after_an_at_sign_and_not_addresses() {
        assert_eq!(
            mentioned("hi @bob and @carol_2, @bob again"),
            ["bob", "carol_2"]
        );
        assert_eq!(mentioned("mail a@b.example"), Vec::<&str>::new());
        assert_eq!(mentioned("@alice."), ["alice."]);
        assert_eq!(mentioned("@ @@x"), ["x"]);
        assert_eq!(
            mentioned(&format!("@{}", "a".repeat(33))),
            Vec::<&str>::new()
        );
    }
}
