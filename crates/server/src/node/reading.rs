//! Reading what is stored: history pages, catching up with `sync`, the list of a user's
//! conversations, search.

use std::collections::BTreeMap;
use std::future::Future;

use hubbub_protocol::reply::{
    ConvSeq, ConversationInfo, ConversationList, HistoryOk, SearchHit, SearchPage, SyncOk,
};
use hubbub_protocol::{check_seq, Conv, ErrorCode, ProtoError, ServerFrame};

use super::fanout::frame_of;
use super::{Actor, Node};
use crate::store::{now_ms, HistoryQuery, SearchCursor, SearchQuery};

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
                mentions: c.mentions,
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

impl Node {
    /// Searches the text messages of the conversations `user` may read now (or of
    /// `conv` alone), newest first: every word of `q` must match, the last also as a
    /// prefix. `q` is 1 to [`SEARCH_QUERY_MAX`] bytes with at least one word; `limit` 1 to
    /// [`SEARCH_LIMIT_MAX`] (default 20); `before` the `next` of the previous page.
    pub async fn search(
        &self,
        user: &str,
        q: &str,
        conv: Option<&str>,
        limit: Option<u32>,
        before: Option<&str>,
    ) -> Result<SearchPage, ProtoError> {
        if q.trim().is_empty() || q.len() > SEARCH_QUERY_MAX {
            return Err(ProtoError::bad_request(format!(
                "q must be 1 to {SEARCH_QUERY_MAX} bytes"
            )));
        }
        let words = search_words(q);
        if words.is_empty() {
            return Err(ProtoError::bad_request("q has no word to search for"));
        }
        let limit = limit.unwrap_or(SEARCH_LIMIT_DEFAULT);
        if limit == 0 || limit > SEARCH_LIMIT_MAX {
            return Err(ProtoError::bad_request(format!(
                "limit must be 1 to {SEARCH_LIMIT_MAX}"
            )));
        }
        let before = match before {
            None => None,
            Some(b) => Some(
                SearchCursor::decode(b)
                    .ok_or_else(|| ProtoError::bad_request("before is not a search cursor"))?,
            ),
        };
        if let Some(conv) = conv {
            self.authorize(user, conv).await?;
        }
        let mut found = self
            .store
            .search(
                user,
                SearchQuery {
                    words,
                    conv: conv.map(str::to_string),
                    limit: limit + 1,
                    before,
                },
            )
            .await?;
        let more = found.len() > limit as usize;
        found.truncate(limit as usize);
        let next = if more {
            found.last().map(|r| {
                SearchCursor {
                    ts: r.ts,
                    conv: r.conv.clone(),
                    seq: r.seq,
                }
                .encode()
            })
        } else {
            None
        };
        Ok(SearchPage {
            results: found
                .into_iter()
                .map(|r| SearchHit {
                    conv: r.conv,
                    seq: r.seq,
                    msg_id: r.msg_id,
                    from: r.from,
                    ts: r.ts,
                    content: r.text,
                    highlight: r.highlight,
                })
                .collect(),
            next,
        })
    }
}

/// Longest search query, in bytes.
pub(crate) const SEARCH_QUERY_MAX: usize = 256;
/// Default and largest page of search results.
pub(crate) const SEARCH_LIMIT_DEFAULT: u32 = 20;
pub(crate) const SEARCH_LIMIT_MAX: u32 = 100;
/// Most words of one search (more are ignored).
const SEARCH_WORDS_MAX: usize = 16;

/// The words of a search query: runs of letters and digits, lower-cased.
pub(crate) fn search_words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(SEARCH_WORDS_MAX)
        .map(str::to_lowercase)
        .collect()
}
