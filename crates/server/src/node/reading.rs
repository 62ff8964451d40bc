//! Reading what is stored: history pages, catching up with `sync`, the list of a user's
//! conversations.

use std::collections::BTreeMap;
use std::future::Future;

use hubbub_protocol::reply::{ConvSeq, ConversationInfo, ConversationList, HistoryOk, SyncOk};
use hubbub_protocol::{check_seq, Conv, ErrorCode, ProtoError, ServerFrame};

use super::fanout::frame_of;
use super::{Actor, Node};
use crate::store::{now_ms, HistoryQuery};

/// Most conversations named in one `sync`.
const MAX_SYNC_CONVS: usize = 1000;
/// Default sync page size.
const DEFAULT_SYNC: u32 = 500;
/// Default history page size.
const DEFAULT_HISTORY: u32 = 50;

/// A `sync` request.
#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    /// The last `seq` the client has of each conversation.
    pub cursors: BTreeMap<String, u64>,
    /// Page size per conversation.
    pub limit: Option<u32>,
    /// `server_time` of the previous sync: also replay recalls and edits since then.
    pub since: Option<i64>,
}

impl Node {
    /// A page of a conversation's history, for a user who may read it.
    pub async fn history(
        &self,
        user: &str,
        conv: &str,
        before_seq: Option<u64>,
        after_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryOk, ProtoError> {
        self.authorize(user, conv).await?;
        let q = history_query(before_seq, after_seq, limit, self.limits.history_max)?;
        let page = self.store.history(conv, q).await?;
        Ok(HistoryOk {
            messages: page.messages,
            has_more: page.has_more,
        })
    }

    /// Catches a user up: for each named conversation, the recalls and edits since
    /// `since` (when given) and the messages after its cursor (a page), each handed to
    /// `emit` in order; then the answer. `emit` returns false when the session is gone.
    /// Conversations the user may not read are listed in `denied`.
    pub async fn sync<F, Fut>(
        &self,
        actor: Actor<'_>,
        req: SyncRequest,
        mut emit: F,
    ) -> Result<SyncOk, ProtoError>
    where
        F: FnMut(ServerFrame) -> Fut,
        Fut: Future<Output = bool>,
    {
        // Taken before reading anything, and before the stamps of changes still being
        // committed: a change committed while this sync runs is replayed again by the
        // next one rather than missed (replays are idempotent).
        let server_time = now_ms().min(self.store.watermark()) - 1;
        if req.cursors.len() > MAX_SYNC_CONVS {
            return Err(ProtoError::bad_request(format!(
                "at most {MAX_SYNC_CONVS} conversations per sync"
            )));
        }
        for (conv, &cursor) in &req.cursors {
            Conv::parse(conv)?;
            check_seq("a cursor", cursor)?;
        }
        let limit = page_limit(req.limit, DEFAULT_SYNC, self.limits.sync_max)?;
        let mut cursors = BTreeMap::new();
        let mut more = Vec::new();
        let mut denied = Vec::new();
        for (conv, cursor) in req.cursors {
            if self.authorize(actor.user, &conv).await.is_err() {
                denied.push(conv);
                continue;
            }
            let after = HistoryQuery::After {
                after: cursor,
                limit,
            };
            let page = self.store.history(&conv, after).await?;
            let last = page.messages.last().map_or(cursor, |m| m.seq);
            let mut frames: Vec<ServerFrame> = Vec::new();
            if let Some(since) = req.since {
                // Recalls and edits of messages the client already has.
                let changes = self.store.changes_since(&conv, since, cursor).await?;
                frames.extend(changes.into_iter().filter_map(|c| frame_of(c).map(|f| f.0)));
            }
            frames.extend(page.messages.into_iter().map(ServerFrame::Message));
            for f in frames {
                if !emit(f).await {
                    return Err(ProtoError::new(ErrorCode::Unavailable, "session closing"));
                }
            }
            if page.has_more {
                more.push(conv.clone());
            }
            cursors.insert(conv, last);
        }
        let conversations = self
            .store
            .memberships(actor.user)
            .await?
            .into_iter()
            .map(|c| ConvSeq {
                conv: c.conv,
                last_seq: c.last_seq,
            })
            .collect();
        Ok(SyncOk {
            server_time,
            cursors,
            caught_up: more.is_empty(),
            more,
            conversations,
            denied,
        })
    }

    /// Every conversation of `user` with its read position and unread count.
    pub async fn conversations(&self, user: &str) -> Result<ConversationList, ProtoError> {
        let convs = self.store.conversations(user).await?;
        let conversations = convs
            .into_iter()
            .map(|c| ConversationInfo {
                kind: match Conv::parse(&c.conv) {
                    Ok(Conv::Dm(..)) => "dm",
                    _ => "room",
                }
                .to_string(),
                conv: c.conv,
                last_seq: c.last_seq,
                read_seq: c.read_seq,
                unread: c.unread,
            })
            .collect();
        Ok(ConversationList { conversations })
    }
}

/// Turns history paging parameters into a query, with PROTOCOL.md's defaults and caps.
pub fn history_query(
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u32>,
    max: u32,
) -> Result<HistoryQuery, ProtoError> {
    let limit = page_limit(limit, DEFAULT_HISTORY, max)?;
    Ok(match (before_seq, after_seq) {
        (Some(_), Some(_)) => {
            return Err(ProtoError::bad_request(
                "give before_seq or after_seq, not both",
            ))
        }
        (Some(before), None) => HistoryQuery::Before {
            before: check_seq("before_seq", before)?,
            limit,
        },
        (None, Some(after)) => HistoryQuery::After {
            after: check_seq("after_seq", after)?,
            limit,
        },
        (None, None) => HistoryQuery::Latest { limit },
    })
}

/// A page size: `default` when absent, at most `max`, never 0.
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32, ProtoError> {
    match limit {
        None => Ok(default.min(max)),
        Some(0) => Err(ProtoError::bad_request("limit must be at least 1")),
        Some(n) => Ok(n.min(max)),
    }
}
