// The WebSocket connection: request/answer by id, newline-split frames, heartbeats and
// reconnection with exponential backoff. Knows nothing about the UI.

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;

export class Connection {
  /**
   * @param {() => string} url builds the WebSocket URL (credential included)
   * @param {object} handlers onFrame(frame), onOpen(welcome, isReconnect), onState(state, detail), onFatal(code, reason)
   */
  constructor(url, handlers) {
    this.url = url;
    this.h = handlers;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map();
    this.attempt = 0;
    this.everOpened = false;
    this.stopped = false;
    this.timer = null;
    this.pingTimer = null;
    this.lastHeard = 0;
    this.open = false;
    /** How many connections have opened (a `welcome` each). */
    this.opens = 0;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close(1000, 'bye');
    }
    this.failPending('signed out');
  }

  connect() {
    clearTimeout(this.timer);
    this.h.onState(this.everOpened ? 'reconnecting' : 'connecting');
    let ws;
    try {
      ws = new WebSocket(this.url(), 'hubbub.v1.json');
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      this.lastHeard = Date.now();
      if (typeof ev.data !== 'string') return;
      for (const line of ev.data.split('\n')) {
        if (!line) continue;
        let frame;
        try { frame = JSON.parse(line); } catch { continue; }
        this.dispatch(frame);
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.open = false;
      clearInterval(this.pingTimer);
      this.failPending('connection closed');
      if (this.stopped) return;
      if (ev.code === 4001 && this.kickedReason === 'replaced') {
        this.h.onFatal(ev.code, 'This session was opened somewhere else.');
        return;
      }
      if (ev.code === 4003) {
        this.h.onFatal(ev.code, 'Your session expired. Please log in again.');
        return;
      }
      this.scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  scheduleReconnect() {
    if (this.stopped) return;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    const delay = Math.round(base / 2 + Math.random() * base / 2);
    this.attempt += 1;
    this.h.onState('offline', delay);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /** Reconnect now (e.g. when the browser comes back online). */
  kick() {
    if (!this.ws && !this.stopped) {
      clearTimeout(this.timer);
      this.connect();
    }
  }

  dispatch(frame) {
    if (frame.type === 'welcome') {
      const reconnect = this.everOpened;
      this.everOpened = true;
      this.open = true;
      this.opens += 1;
      this.attempt = 0;
      this.kickedReason = null;
      this.startHeartbeat(frame.heartbeat_ms || 25000);
      this.h.onState('online');
      this.h.onOpen(frame, reconnect);
      return;
    }
    if (frame.type === 'kicked') {
      this.kickedReason = frame.reason;
    }
    if ((frame.type === 'ok' || frame.type === 'error' || frame.type === 'pong') && frame.id != null) {
      const p = this.pending.get(String(frame.id));
      if (p) {
        this.pending.delete(String(frame.id));
        clearTimeout(p.timer);
        if (frame.type === 'error') {
          const err = new Error(frame.message || frame.code);
          err.code = frame.code;
          p.reject(err);
        } else {
          p.resolve(frame);
        }
        return;
      }
    }
    this.h.onFrame(frame);
  }

  startHeartbeat(ms) {
    clearInterval(this.pingTimer);
    this.lastHeard = Date.now();
    const every = Math.max(5000, Math.min(ms, 25000));
    this.pingTimer = setInterval(() => {
      if (!this.open) return;
      if (Date.now() - this.lastHeard > every * 2.5) {
        // Nothing heard for too long: the connection is dead even if the browser
        // has not noticed yet.
        try { this.ws.close(4000, 'heartbeat timeout'); } catch { /* closed */ }
        const ws = this.ws;
        if (ws && ws.onclose) ws.onclose({ code: 1006 });
        return;
      }
      this.request({ type: 'ping' }).catch(() => {});
    }, every);
  }

  /** Sends a frame without waiting for an answer. */
  send(frame) {
    if (!this.open || !this.ws) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a frame with a fresh id and resolves with its `ok` (rejects on `error`). */
  request(frame, timeoutMs = 15000) {
    return new Promise((resolve, reject) => {
      if (!this.open || !this.ws) {
        const err = new Error('not connected');
        err.code = 'offline';
        reject(err);
        return;
      }
      const id = String(this.nextId++);
      const timer = setTimeout(() => {
        this.pending.delete(id);
        const err = new Error('no answer');
        err.code = 'timeout';
        reject(err);
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  failPending(why) {
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      const err = new Error(why);
      err.code = 'offline';
      p.reject(err);
    }
    this.pending.clear();
  }
}
