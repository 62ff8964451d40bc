//! The sessions of this node: who is connected here, and pushing frames into their
//! queues.
//!
//! The hub is one concurrent map (sharded, never locked across `.await`): user name ->
//! that user's live sessions (one per device). It knows nothing of conversations or of
//! the store: the [`crate::node::Node`] decides who gets a frame, the hub only pushes.
//!
//! Pushing a frame to a session never waits: it goes into the session's bounded queue,
//! and a session whose queue is full is closed as a slow consumer (it catches up with
//! `sync` after reconnecting; the store has everything).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use hubbub_protocol::ServerFrame;
use parking_lot::Mutex;

use crate::members::Hasher;
use crate::metrics::Metrics;

/// A frame to send, encoded at most once per codec however many sessions it goes to.
#[derive(Debug)]
pub struct OutFrame {
    frame: ServerFrame,
    json: OnceLock<Utf8Bytes>,
    pb: OnceLock<Bytes>,
}

impl OutFrame {
    pub fn new(frame: ServerFrame) -> Arc<OutFrame> {
        Arc::new(OutFrame {
            frame,
            json: OnceLock::new(),
            pb: OnceLock::new(),
        })
    }

    /// The frame as compact JSON (encoded on first use; text, so writers join and send
    /// it without checking its UTF-8 again).
    pub fn json(&self) -> &Utf8Bytes {
        self.json
            .get_or_init(|| Utf8Bytes::from(self.frame.to_json()))
    }

    /// The frame as protobuf (`hubbub.v1.pb`, encoded on first use).
    pub fn pb(&self) -> &Bytes {
        self.pb
            .get_or_init(|| Bytes::from(hubbub_protocol::pb::encode_server(&self.frame)))
    }

    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }
}

/// Why a session is being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
    /// Send what is already queued before the close frame.
    pub flush: bool,
}

impl CloseReason {
    pub const NORMAL: CloseReason = CloseReason {
        code: 1000,
        reason: "",
        flush: true,
    };
    pub const SHUTDOWN: CloseReason = CloseReason {
        code: 1001,
        reason: "server shutting down",
        flush: true,
    };
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer",
        flush: false,
    };
    pub const RATE_LIMITED: CloseReason = CloseReason {
        code: 1008,
        reason: "rate limited",
        flush: true,
    };
    pub const TOO_LARGE: CloseReason = CloseReason {
        code: 1009,
        reason: "frame too large",
        flush: true,
    };
    /// The peer broke the WebSocket protocol (RFC 6455 section 7.4.1).
    pub const PROTOCOL_ERROR: CloseReason = CloseReason {
        code: 1002,
        reason: "protocol error",
        flush: false,
    };
    /// A text frame or close reason that is not UTF-8.
    pub const INVALID_PAYLOAD: CloseReason = CloseReason {
        code: 1007,
        reason: "invalid UTF-8",
        flush: false,
    };
    pub const REPLACED: CloseReason = CloseReason {
        code: 4001,
        reason: "replaced",
        flush: true,
    };
    pub const TOKEN_EXPIRED: CloseReason = CloseReason {
        code: 4003,
        reason: "token expired",
        flush: true,
    };
    pub const DEAD: CloseReason = CloseReason {
        code: 1000,
        reason: "heartbeat timeout",
        flush: false,
    };
}

/// The hub's handle on one live session.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
    /// The outgoing queue: anyone pushes, the session's writer takes.
    outbox: Mutex<Outbox>,
    /// Set when the session is asked to close; `waker` then wakes its task.
    closing: AtomicBool,
    /// The session's own task: it alone waits, for a close, for frames to write or for
    /// room for a reply.
    waker: AtomicWaker,
    /// An answer to the session's own request is queued: write without lingering (the
    /// client is waiting for it).
    answer_queued: AtomicBool,
    /// A reply waits for room: the writer wakes the task when it takes frames.
    room_wanted: AtomicBool,
    /// Frames are measured in the encoding the session writes (protobuf or JSON).
    protobuf: bool,
    /// Bound of the queue in frames.
    queue_frames: usize,
    /// Bound of the queue in encoded bytes (see [`Session::push`] and
    /// [`Session::reply`]).
    queue_bytes: usize,
    close_reason: Mutex<Option<CloseReason>>,
    slow_consumer_closes: prometheus::IntCounter,
}

/// A session's queue and what its writer waits for. One lock for a push: the bounds,
/// the frame and whether to wake the writer are decided together.
#[derive(Debug, Default)]
struct Outbox {
    frames: VecDeque<Arc<OutFrame>>,
    /// Encoded bytes of `frames`.
    bytes: usize,
    /// What a push must bring for the writer to be woken.
    wanted: Wanted,
    /// The session ended: the queue takes nothing more.
    ended: bool,
}

/// What the writer of a session waits for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// It is busy, or wakes on its own (a timer).
    #[default]
    Nothing,
    /// It waits for the next frame.
    Any,
    /// It lingers: only a queue a quarter full (in frames or bytes) ends the linger.
    Quarter,
}

/// Slots an empty queue may keep after a burst (more are given back).
const IDLE_SLOTS: usize = 64;

/// Why a frame was not queued.
enum Refused {
    Full,
    Closed,
}

pub type SessionHandle = Arc<Session>;

impl Session {
    /// A JSON session whose queue holds at most `queue_frames` frames.
    pub fn new(
        id: u64,
        user: Arc<str>,
        device: Arc<str>,
        queue_frames: usize,
        metrics: &Metrics,
    ) -> SessionHandle {
        Session::with_queue(id, user, device, queue_frames, usize::MAX, false, metrics)
    }

    /// A session whose queue holds at most `queue_frames` frames and `queue_bytes`
    /// encoded bytes, in protobuf or JSON.
    pub fn with_queue(
        id: u64,
        user: Arc<str>,
        device: Arc<str>,
        queue_frames: usize,
        queue_bytes: usize,
        protobuf: bool,
        metrics: &Metrics,
    ) -> SessionHandle {
        Arc::new(Session {
            id,
            user,
            device,
            outbox: Mutex::new(Outbox::default()),
            closing: AtomicBool::new(false),
            answer_queued: AtomicBool::new(false),
            room_wanted: AtomicBool::new(false),
            protobuf,
            queue_frames: queue_frames.max(1),
            queue_bytes,
            waker: AtomicWaker::new(),
            close_reason: Mutex::new(None),
            slow_consumer_closes: metrics.slow_consumer_closes.clone(),
        })
    }

    /// The session id shown to clients.
    pub fn public_id(&self) -> String {
        format!("s-{:x}", self.id)
    }

    /// The size of `frame` as this session writes it (encoding it on first use).
    pub fn frame_len(&self, frame: &OutFrame) -> usize {
        if self.protobuf {
            frame.pb().len()
        } else {
            frame.json().len()
        }
    }

    /// Queues a pushed frame without waiting. A push that finds the queue full, in
    /// frames or in bytes, closes the session as a slow consumer. Returns whether the
    /// frame was queued (a closing session takes no more pushes).
    pub fn push(&self, frame: &Arc<OutFrame>) -> bool {
        self.offer(frame).is_some()
    }

    /// [`Session::push`], telling whether the queue is now half full or more (in frames
    /// or in bytes: its writer is behind, and whoever keeps pushing should let it run);
    /// `None` if the frame was not queued.
    pub fn offer(&self, frame: &Arc<OutFrame>) -> Option<bool> {
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        match self.queue(frame, false) {
            Ok(filling) => Some(filling),
            Err(Refused::Full) => {
                if self.close(CloseReason::SLOW_CONSUMER) {
                    self.slow_consumer_closes.inc();
                    tracing::info!(user = %self.user, session = self.id, "closing slow consumer");
                }
                None
            }
            Err(Refused::Closed) => None,
        }
    }

    /// Replaces the session: queues `kicked` if there is room (a full queue only loses
    /// the frame) and closes it with 4001.
    pub fn kick(&self, frame: &Arc<OutFrame>) {
        if !self.closing.load(Ordering::Acquire) {
            let _ = self.queue(frame, false);
        }
        self.close(CloseReason::REPLACED);
    }

    /// Puts `frame` into the queue if it fits: pushes may fill the queue to its bounds,
    /// replies only to half of them (in frames and in bytes), so that pushes always find
    /// room however much a client asked for. A frame larger than the share goes into an
    /// empty queue. Wakes the writer if it waits for what the queue now holds. Returns
    /// whether the queue is now half full or more.
    fn queue(&self, frame: &Arc<OutFrame>, reply: bool) -> Result<bool, Refused> {
        let len = self.frame_len(frame);
        let (frames, bytes) = if reply {
            ((self.queue_frames / 2).max(1), self.queue_bytes / 2)
        } else {
            (self.queue_frames, self.queue_bytes)
        };
        let mut q = self.outbox.lock();
        if q.ended {
            // The writer is gone: nobody reads the queue any more.
            return Err(Refused::Closed);
        }
        if q.frames.len() >= frames || (q.bytes > 0 && q.bytes.saturating_add(len) > bytes) {
            return Err(Refused::Full);
        }
        q.frames.push_back(frame.clone());
        q.bytes += len;
        let wake = match q.wanted {
            Wanted::Nothing => false,
            Wanted::Any => true,
            Wanted::Quarter => self.holds(&q, 4),
        };
        if wake {
            q.wanted = Wanted::Nothing;
        }
        let filling = self.holds(&q, 2);
        drop(q);
        if wake {
            self.waker.wake();
        }
        Ok(filling)
    }

    /// Called by the writer: whether it has something to write now. Not lingering, any
    /// queued frame will do; lingering, only a queue a quarter full. If not, the task is
    /// woken when a push brings it.
    pub fn poll_queue(&self, cx: &std::task::Context<'_>, lingering: bool) -> bool {
        let mut q = self.outbox.lock();
        let ready = if lingering {
            self.holds(&q, 4)
        } else {
            !q.frames.is_empty()
        };
        if ready {
            q.wanted = Wanted::Nothing;
        } else {
            if q.frames.is_empty() && q.frames.capacity() > IDLE_SLOTS {
                // A burst is over: an idle session keeps no slots.
                q.frames = VecDeque::new();
            }
            self.waker.register(cx.waker());
            q.wanted = if lingering {
                Wanted::Quarter
            } else {
                Wanted::Any
            };
        }
        ready
    }

    /// Whether `q` holds 1/`share` of the queue's bound or more, in frames or in bytes.
    fn holds(&self, q: &Outbox, share: usize) -> bool {
        q.frames.len() * share >= self.queue_frames || q.bytes * share >= self.queue_bytes
    }

    /// Takes queued frames for the writer under one lock, oldest first, handing each to
    /// `f` until it returns false or the queue is empty; then the writer calls
    /// [`Session::taken`] once it handed them to the socket. Returns whether frames are
    /// still queued.
    pub fn take_while(&self, mut f: impl FnMut(&Arc<OutFrame>) -> bool) -> bool {
        let mut q = self.outbox.lock();
        while let Some(frame) = q.frames.pop_front() {
            q.bytes -= self.frame_len(&frame);
            if !f(&frame) {
                break;
            }
        }
        !q.frames.is_empty()
    }

    /// Whether frames are queued.
    pub fn has_queued(&self) -> bool {
        !self.outbox.lock().frames.is_empty()
    }

    /// How many frames are queued.
    pub fn queued_frames(&self) -> usize {
        self.outbox.lock().frames.len()
    }

    /// Drops what is queued and takes nothing more: the session ended.
    pub fn end_queue(&self) {
        let mut q = self.outbox.lock();
        q.frames = VecDeque::new();
        q.bytes = 0;
        q.ended = true;
    }

    /// Queues an answer to this session's own request, waiting while the queue holds
    /// half its bound or more (see [`Session::queue`]): a client that does not read its
    /// answers stops being read. Must be awaited by the session's own task, whose writer
    /// makes the room. Returns false if the session closed first.
    pub async fn reply(&self, frame: ServerFrame) -> bool {
        self.reply_frame(OutFrame::new(frame)).await
    }

    /// [`Session::reply`] with an already wrapped frame.
    pub async fn reply_frame(&self, frame: Arc<OutFrame>) -> bool {
        std::future::poll_fn(|cx| {
            if self.poll_closing(cx) {
                return std::task::Poll::Ready(false);
            }
            match self.try_reply(frame.clone()) {
                Ok(()) => std::task::Poll::Ready(true),
                Err(_) => {
                    self.room_wanted.store(true, Ordering::Release);
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    /// Queues an answer if it fits (see [`Session::queue`]); gives it back if not.
    pub fn try_reply(&self, frame: Arc<OutFrame>) -> Result<(), Arc<OutFrame>> {
        match self.queue(&frame, true) {
            Ok(_) => {
                self.answer_queued.store(true, Ordering::Release);
                Ok(())
            }
            Err(Refused::Full) => Err(frame),
            // Closed: nobody reads the queue any more.
            Err(Refused::Closed) => Ok(()),
        }
    }

    /// Called by the writer after it handed frames it took to the socket. Returns
    /// whether a reply waits for the room this made.
    pub fn taken(&self) -> bool {
        self.room_wanted.swap(false, Ordering::AcqRel)
    }

    /// Encoded bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.lock().bytes
    }

    /// Whether an answer was queued since the writer last took what is queued.
    pub fn answer_queued(&self) -> bool {
        self.answer_queued.load(Ordering::Acquire)
    }

    /// Called by the writer before it takes what is queued.
    pub fn clear_answer_queued(&self) {
        self.answer_queued.store(false, Ordering::Release);
    }

    /// Asks the session to close; the first reason wins. Returns true for the first call.
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = {
            let mut r = self.close_reason.lock();
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        };
        self.closing.store(true, Ordering::Release);
        self.waker.wake();
        first
    }

    /// Whether the session was asked to close; if not, `cx` is woken when it is.
    pub fn poll_closing(&self, cx: &mut std::task::Context<'_>) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.closing.load(Ordering::Acquire)
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.lock().clone()
    }
}

/// Result of registering a session.
#[derive(Debug)]
pub struct Registered {
    /// This is the user's only session on this node now.
    pub first: bool,
}

/// The sessions of this node.
#[derive(Debug)]
pub struct Hub {
    users: DashMap<Arc<str>, Vec<SessionHandle>, Hasher>,
    next_session: AtomicU64,
    metrics: Metrics,
    /// A push found a queue half full since [`Hub::take_filling`] was last called.
    filling: AtomicBool,
    /// Changes at every register and unregister: lists of sessions built before a
    /// change are stale (see [`crate::members::Targets`]).
    generation: AtomicU64,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Hub {
        Hub {
            users: DashMap::default(),
            next_session: AtomicU64::new(1),
            metrics,
            filling: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes whenever a session registers or unregisters.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Appends the sessions of `user` to `out`.
    pub fn sessions_into(&self, user: &str, out: &mut Vec<SessionHandle>) {
        if let Some(sessions) = self.users.get(user) {
            out.extend(sessions.iter().cloned());
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        // Mix a random start so ids differ across restarts.
        static BASE: OnceLock<u64> = OnceLock::new();
        let base = *BASE.get_or_init(|| rand::random::<u32>() as u64) << 32;
        base | self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a session. Another live session of the same user and device is replaced: it
    /// gets `kicked` and is closed with 4001.
    pub fn register(&self, session: &SessionHandle) -> Registered {
        let mut entry = self.users.entry(session.user.clone()).or_default();
        let first = entry.is_empty();
        let replaced = entry
            .iter()
            .position(|s| s.device == session.device)
            .map(|i| entry.swap_remove(i));
        entry.push(session.clone());
        drop(entry);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.metrics.connections_open.inc();
        self.metrics.connections_total.inc();
        if let Some(old) = &replaced {
            old.kick(&OutFrame::new(ServerFrame::Kicked {
                reason: "replaced".into(),
            }));
        }
        Registered { first }
    }

    /// Removes a session (if it is still registered). Returns true when it was the
    /// user's last session (the user went offline).
    pub fn unregister(&self, session: &SessionHandle) -> bool {
        let mut last = false;
        let mut found = false;
        self.users.remove_if_mut(&session.user, |_, list| {
            if let Some(i) = list.iter().position(|s| s.id == session.id) {
                list.swap_remove(i);
                found = true;
            }
            last = found && list.is_empty();
            list.is_empty()
        });
        if found {
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.metrics.connections_open.dec();
        }
        last
    }

    /// Replaces the sessions of `user` on `device` (a login of that device on another
    /// node): each gets `kicked` and is closed with 4001, and leaves the hub as it closes.
    /// Returns how many there were.
    pub fn kick_device(&self, user: &str, device: &str) -> usize {
        let Some(sessions) = self.users.get(user) else {
            return 0;
        };
        let kicked: Vec<SessionHandle> = sessions
            .iter()
            .filter(|s| &*s.device == device)
            .cloned()
            .collect();
        drop(sessions);
        let frame = OutFrame::new(ServerFrame::Kicked {
            reason: "replaced".into(),
        });
        for s in &kicked {
            s.kick(&frame);
        }
        kicked.len()
    }

    /// The users with a session on this node.
    pub fn online_users(&self) -> Vec<Arc<str>> {
        self.users.iter().map(|e| e.key().clone()).collect()
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Pushes `frame` to every session of `user` except `except`. Returns how many got it.
    pub fn send_to_user(&self, user: &str, frame: &Arc<OutFrame>, except: Option<u64>) -> usize {
        let Some(sessions) = self.users.get(user) else {
            return 0;
        };
        self.push_to(sessions.iter(), frame, except)
    }

    /// Pushes `frame` to `sessions` except the session `except`; notes a queue found
    /// half full (see [`Hub::take_filling`]). Returns how many got it.
    pub fn push_to<'a>(
        &self,
        sessions: impl IntoIterator<Item = &'a SessionHandle>,
        frame: &Arc<OutFrame>,
        except: Option<u64>,
    ) -> usize {
        let mut n = 0;
        let mut filling = false;
        for s in sessions {
            if Some(s.id) != except {
                if let Some(f) = s.offer(frame) {
                    n += 1;
                    filling |= f;
                }
            }
        }
        if filling {
            self.filling.store(true, Ordering::Relaxed);
        }
        self.metrics.deliveries.inc_by(n as u64);
        n
    }

    /// Whether a push found a queue half full since the last call (and resets it). A
    /// fan-out that sees it yields, so the writers of those queues run before it pushes
    /// more: one commit can carry thousands of messages, and pushing them all at once into
    /// a healthy but momentarily busy session's queue would overflow it.
    pub fn take_filling(&self) -> bool {
        self.filling.swap(false, Ordering::Relaxed)
    }

    /// Pushes `frame` to every online session. Returns how many got it.
    pub fn broadcast(&self, frame: &Arc<OutFrame>) -> usize {
        let mut n = 0;
        for entry in self.users.iter() {
            for s in entry.value() {
                if s.push(frame) {
                    n += 1;
                }
            }
        }
        self.metrics.deliveries.inc_by(n as u64);
        n
    }

    /// Asks every session to close.
    pub fn close_all(&self, reason: CloseReason) {
        for entry in self.users.iter() {
            for s in entry.value() {
                s.close(reason.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, frames: usize, bytes: usize) -> SessionHandle {
        Session::with_queue(
            id,
            "ann".into(),
            "d".into(),
            frames,
            bytes,
            false,
            &Metrics::new(),
        )
    }

    /// A frame of about `n` bytes.
    fn text(n: usize) -> Arc<OutFrame> {
        OutFrame::new(ServerFrame::Kicked {
            reason: "x".repeat(n),
        })
    }

    #[test]
    fn a_push_beyond_the_byte_bound_closes_the_session_as_a_slow_consumer() {
        let s = session(1, 1000, 64 * 1024);
        let big = text(20_000);
        assert!(s.push(&big) && s.push(&big) && s.push(&big));
        assert_eq!(s.close_reason(), None);
        assert!(!s.push(&big));
        assert_eq!(s.close_reason(), Some(CloseReason::SLOW_CONSUMER));
        // The refused frame is not counted.
        assert_eq!(s.queued_bytes(), 3 * s.frame_len(&big));
    }

    #[test]
    fn replies_fill_half_the_queue_and_pushes_find_the_rest() {
        let s = session(1, 1000, 64 * 1024);
        let page = text(10_000);
        // Replies up to half the bytes...
        assert!(s.try_reply(page.clone()).is_ok());
        assert!(s.try_reply(page.clone()).is_ok());
        assert!(s.try_reply(page.clone()).is_ok());
        assert!(s.try_reply(page.clone()).is_err());
        // ...pushes up to all of them.
        assert!(s.push(&page) && s.push(&page) && s.push(&page));
        assert_eq!(s.close_reason(), None);
        // The writer takes frames: the room is the replies' again.
        assert!(!s.take_while(|_| true));
        s.taken();
        assert_eq!(s.queued_bytes(), 0);
        assert!(s.try_reply(page).is_ok());
        // In frames too: half for replies.
        let s = session(2, 4, 1024 * 1024);
        let small = text(10);
        assert!(s.try_reply(small.clone()).is_ok() && s.try_reply(small.clone()).is_ok());
        assert!(s.try_reply(small.clone()).is_err());
        assert!(s.push(&small) && s.push(&small));
        assert!(!s.push(&small));
    }

    #[test]
    fn an_empty_queue_gives_back_the_slots_of_a_burst_and_the_writer_wakes_on_a_push() {
        let s = session(1, 1000, 1024 * 1024);
        let waker = futures_util::task::noop_waker_ref();
        let cx = std::task::Context::from_waker(waker);
        for _ in 0..500 {
            assert!(s.push(&text(10)));
        }
        assert!(s.poll_queue(&cx, false));
        assert!(!s.take_while(|_| true));
        assert!(s.outbox.lock().frames.capacity() >= 500);
        // The writer finds nothing and waits: the slots go back.
        assert!(!s.poll_queue(&cx, false));
        assert!(s.outbox.lock().frames.capacity() <= IDLE_SLOTS);
        assert_eq!(s.outbox.lock().wanted, Wanted::Any);
        // A push wakes it (and it waits for nothing more until it asks again).
        assert!(s.push(&text(10)));
        assert_eq!(s.outbox.lock().wanted, Wanted::Nothing);
        // Lingering, a push wakes it only once a quarter of the queue is there.
        assert!(!s.poll_queue(&cx, true));
        for _ in 0..248 {
            assert!(s.push(&text(10)));
            assert_eq!(s.outbox.lock().wanted, Wanted::Quarter);
        }
        assert!(s.push(&text(10)));
        assert_eq!(s.outbox.lock().wanted, Wanted::Nothing);
        assert!(s.poll_queue(&cx, true));
    }

    #[test]
    fn take_while_takes_frames_under_one_lock_until_told_to_stop() {
        let s = session(1, 1000, 1024 * 1024);
        for _ in 0..5 {
            assert!(s.push(&text(10)));
        }
        let each = s.queued_bytes() / 5;
        let mut taken = 0;
        // The frame that makes it say stop is taken too; two remain.
        assert!(s.take_while(|_| {
            taken += 1;
            taken < 3
        }));
        assert_eq!(
            (taken, s.queued_frames(), s.queued_bytes()),
            (3, 2, 2 * each)
        );
        assert!(!s.take_while(|_| true));
        assert_eq!((s.queued_frames(), s.queued_bytes()), (0, 0));
    }

    #[test]
    fn a_reply_larger_than_the_share_goes_into_an_empty_queue() {
        let s = session(1, 1000, 64 * 1024);
        assert!(s.try_reply(text(50_000)).is_ok());
        assert!(s.try_reply(text(10)).is_err());
    }

    #[test]
    fn a_replaced_session_whose_queue_is_full_is_closed_with_4001() {
        let hub = Hub::new(Metrics::new());
        let old = session(1, 2, 1024 * 1024);
        hub.register(&old);
        assert!(old.push(&text(10)) && old.push(&text(10)));
        let new = session(2, 2, 1024 * 1024);
        hub.register(&new);
        assert_eq!(old.close_reason(), Some(CloseReason::REPLACED));
        assert_eq!(new.close_reason(), None);
    }
}
