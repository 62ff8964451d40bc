//! Sending a message, and what may happen to it after: recall, edit, read receipts.

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use hubbub_protocol::reply::{EditOk, RecallOk, SendOk};
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
        admit()?;
        let dm_members = self.authorize(actor.user, &req.conv).await?;
        let stored = self.store.append(NewMessage {
            conv: req.conv,
            from: actor.user.to_string(),
            client_msg_id: req.client_msg_id,
            content_type: req.content_type,
            content: req.content,
            dm_members,
            origin: actor.session,
        });
        Ok(async move {
            let m = stored.await?.message;
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
        let edited_at = self.store.edit(conv, seq, content, actor.session).await?;
        Ok(EditOk {
            conv: conv.to_string(),
            seq,
            edited_at,
        })
    }

    async fn existing_message(&self, conv: &str, seq: u64) -> Result<Message, ProtoError> {
        self.store.message(conv, seq).await?.ok_or_else(|| {
            ProtoError::new(ErrorCode::NotFound, format!("no message {seq} in {conv}"))
        })
    }
}
