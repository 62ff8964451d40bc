// hubbub web UI: sign-in, conversations, messages, presence, typing, receipts,
// attachments and calls, over the wire protocol in docs/PROTOCOL.md only.
// Every piece of user-provided text is put in the page with textContent, never as HTML.

import { Connection } from './conn.js';
import { Calls } from './call.js';

const $ = (id) => document.getElementById(id);
const GUEST = document.querySelector('meta[name="hubbub-guest"]')?.content === 'on';
const NAME_RE = /^[A-Za-z0-9_.-]{1,32}$/;
const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const PAGE = 50;
const TYPING_EVERY_MS = 3000;
const TYPING_SHOWN_MS = 5000;
const GROUP_MS = 5 * 60 * 1000;

/** @type {{user: string, token?: string, expires_at?: number, guest?: boolean} | null} */
let auth = null;
let me = '';
/** @type {Connection | null} */
let conn = null;
/** conv id -> conversation state */
const convs = new Map();
let current = null;
/** user -> online (true/false); unknown users are absent */
const online = new Map();
let lastTypingSent = 0;
let editing = null; // { conv, seq }
let sigId = 0;
const signalPeers = new Map(); // signal request id -> peer

// ---------------------------------------------------------------- small helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  return e;
}

function uid(prefix) {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return prefix + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function credQuery() {
  return auth.token ? 'token=' + encodeURIComponent(auth.token) : 'user=' + encodeURIComponent(auth.user);
}

/**
 * A URL safe to load, or null. Resolved the way the browser will resolve it (`/\\host`
 * means `//host` to a browser): one of our uploads (same origin, under /files/) is used
 * as its path, and the file pass cookie authorizes it; an https URL elsewhere is used as
 * it is. No credential is ever put in a URL.
 */
function safeUrl(u) {
  if (typeof u !== 'string' || u.length === 0) return null;
  let url;
  try { url = new URL(u, location.href); } catch { return null; }
  if (url.origin === location.origin) {
    return url.pathname.startsWith('/files/') && !url.search && !url.hash ? url.pathname : null;
  }
  return url.protocol === 'https:' ? url.href : null;
}

// ---------------------------------------------------------------- file pass

/** When the current file pass expires (ms), and the timer that renews it. */
let filePassExpires = 0;
let filePassTimer = null;

/**
 * Gets a file pass: an HttpOnly cookie scoped to /files/ that lets this browser download
 * the attachments it may read. Renewed at half its lifetime, and after a failed load.
 */
async function refreshFilePass() {
  clearTimeout(filePassTimer);
  try {
    const r = await api('/api/files/pass', { method: 'POST' });
    filePassExpires = r.expires_at;
    const left = Math.max(5000, (r.expires_at - Date.now()) / 2);
    filePassTimer = setTimeout(refreshFilePass, left);
  } catch {
    filePassTimer = setTimeout(refreshFilePass, 15000);
  }
}

/** Retries a failed attachment load once with a fresh pass (it may have expired). */
function retryWithFreshPass(media) {
  if (media.dataset.retried || !(media.getAttribute('src') || '').startsWith('/files/')) return;
  media.dataset.retried = '1';
  const src = media.getAttribute('src');
  refreshFilePass().then(() => { media.src = src; });
}

async function api(path, opts = {}) {
  const headers = { ...(opts.headers || {}) };
  let url = path;
  if (auth && auth.token) headers.Authorization = 'Bearer ' + auth.token;
  else if (auth) url += (url.includes('?') ? '&' : '?') + credQuery();
  const res = await fetch(url, { ...opts, headers });
  let body = null;
  try { body = await res.json(); } catch { /* empty */ }
  if (!res.ok) {
    const err = new Error((body && body.message) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    err.code = body && body.code;
    err.retryAfter = Number(res.headers.get('Retry-After')) || 0;
    throw err;
  }
  return body;
}

let toastTimer = null;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

function timeText(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function sizeText(n) {
  if (typeof n !== 'number') return '';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(name, cls = 'avatar') {
  const a = el('span', cls, (name[0] || '?').toUpperCase());
  a.style.setProperty('--h', String(hue(name)));
  a.setAttribute('aria-hidden', 'true');
  return a;
}

function dmId(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function peerOf(c) {
  if (c.kind !== 'dm') return null;
  const [, a, b] = c.id.split(':');
  return a === me ? b : a;
}

function title(c) {
  return c.kind === 'room' ? c.id.slice(5) : peerOf(c);
}

// ---------------------------------------------------------------- conversation state

function convOf(id) {
  let c = convs.get(id);
  if (!c) {
    c = {
      id,
      kind: id.startsWith('room:') ? 'room' : 'dm',
      lastSeq: 0, // newest seq the server told us of
      maxSeen: 0, // newest seq held in `msgs` (loaded conversations)
      unread: 0,
      msgs: new Map(), // seq -> message
      els: new Map(), // seq -> <li>
      pending: new Map(), // client_msg_id -> { frame, li }
      loaded: false,
      loading: null,
      hasMore: true,
      loadingOlder: false,
      filling: false,
      online: null,
      people: new Set(),
      receipts: new Map(),
      typing: new Map(),
      readSent: 0,
      item: null,
    };
    convs.set(id, c);
    if (c.kind === 'dm') {
      const p = peerOf(c);
      if (p && !online.has(p)) queryPresence([p]);
    }
    renderConvList();
  }
  return c;
}

function notePerson(c, user) {
  if (!user || user === me || c.kind !== 'room' || c.people.has(user)) return;
  c.people.add(user);
  if (!online.has(user)) queryPresence([user]);
  if (c === current) renderPeople();
}

// ---------------------------------------------------------------- sign-in

function showSignin(error) {
  $('app').hidden = true;
  $('signin').hidden = false;
  $('guest-form').hidden = !GUEST;
  $('or').hidden = !GUEST;
  $('signin-error').textContent = error || '';
  (GUEST ? $('guest-name') : $('acct-user')).focus();
}

function saveAuth() {
  sessionStorage.setItem('hubbub.auth', JSON.stringify(auth));
}

$('guest-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('guest-name').value.trim();
  if (!NAME_RE.test(name)) {
    $('signin-error').textContent = 'Names use letters, digits, dot, dash and underscore (up to 32).';
    return;
  }
  auth = { user: name, guest: true };
  // Ask the server first: a name that belongs to an account (or looks like one) is
  // refused, and the socket would not say why.
  api('/api/conversations').then(() => {
    saveAuth();
    startChat();
  }, (e) => {
    auth = null;
    $('signin-error').textContent = e.status === 401 ? e.message : `Cannot join: ${e.message}`;
  });
});

async function login(register) {
  const username = $('acct-user').value.trim();
  const password = $('acct-pass').value;
  $('signin-error').textContent = '';
  if (!username || !password) {
    $('signin-error').textContent = 'Enter a username and a password.';
    return;
  }
  const json = { 'Content-Type': 'application/json' };
  const body = JSON.stringify({ username, password });
  try {
    if (register) await api('/api/register', { method: 'POST', headers: json, body });
    const r = await api('/api/login', { method: 'POST', headers: json, body });
    auth = { user: username, token: r.token, expires_at: r.expires_at };
    saveAuth();
    startChat();
  } catch (e) {
    const wait = e.retryAfter ? ` Try again in ${e.retryAfter} s.` : '';
    const msg = e.status === 409 ? `That username is not available: ${e.message}`
      : e.status === 401 ? 'Wrong username or password.'
        : e.status === 429 ? `Too many attempts.${wait}`
          : e.status === 503 ? `The server is busy.${wait}`
            : e.message;
    $('signin-error').textContent = msg;
  }
}

$('account-form').addEventListener('submit', (ev) => { ev.preventDefault(); login(false); });
$('register-btn').addEventListener('click', () => {
  if ($('account-form').reportValidity()) login(true);
});

$('signout').addEventListener('click', async () => {
  if (calls.active) calls.hangup();
  if (conn) conn.stop();
  sessionStorage.clear();
  try { await fetch('/api/files/pass', { method: 'DELETE' }); } catch { /* offline */ }
  location.reload();
});

// ---------------------------------------------------------------- connection

function wsUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  let device = sessionStorage.getItem('hubbub.device');
  if (!device) {
    device = uid('web-').slice(0, 20);
    sessionStorage.setItem('hubbub.device', device);
  }
  return `${proto}//${location.host}/ws?${credQuery()}&device=${encodeURIComponent(device)}`;
}

function setConnState(state, delay) {
  const s = $('conn-status');
  const dot = $('conn-dot');
  dot.className = 'dot ' + (state === 'online' ? 'on' : state === 'offline' ? 'off' : 'wait');
  s.dataset.state = state;
  if (state === 'online') s.textContent = 'Connected';
  else if (state === 'offline') s.textContent = `Disconnected, reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`;
  else if (state === 'reconnecting') s.textContent = 'Reconnecting…';
  else s.textContent = 'Connecting…';
  document.body.classList.toggle('offline', state !== 'online');
}

function startChat() {
  if (auth.expires_at && auth.expires_at < Date.now()) {
    sessionStorage.removeItem('hubbub.auth');
    showSignin('Your session expired. Please log in again.');
    return;
  }
  me = auth.user;
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me-name').textContent = me;
  $('me-name').parentElement.prepend(avatar(me, 'avatar sm'));
  conn = new Connection(wsUrl, {
    onFrame,
    onOpen,
    onState: setConnState,
    onFatal: (code, why) => {
      if (code === 4003) {
        sessionStorage.removeItem('hubbub.auth');
        location.reload();
        return;
      }
      setConnState('offline', 0);
      $('conn-status').textContent = why;
    },
  });
  // Attachments load with the file pass: get it before anything is shown.
  refreshFilePass().finally(() => {
    conn.start();
    refreshConversations().then(() => {
      const saved = sessionStorage.getItem('hubbub.current');
      if (saved && !current) openConv(saved);
    }).catch((e) => {
      if (e.status === 401) {
        sessionStorage.removeItem('hubbub.auth');
        showSignin('Please sign in again.');
      }
    });
    refreshRooms();
  });
}

window.addEventListener('online', () => conn && conn.kick());

/**
 * server_time of the welcome of the last connection whose catch-up completed: recalls
 * and edits made after it are replayed by the next catch-up. It moves only when a
 * catch-up finished (every page, `caught_up`) on the connection it started on, so a
 * sync that fails or is cut short loses nothing: the next one starts from the same time.
 */
let syncedAt = null;

async function onOpen(welcome, reconnect) {
  // After a sleep the renewal timer may be late: renew a pass that is (nearly) over.
  if (Date.now() > filePassExpires - 60000) refreshFilePass();
  const opened = conn.opens;
  // The first connection has nothing cached from before it.
  if (syncedAt == null) syncedAt = welcome.server_time;
  // Unsent messages go out first (same client_msg_id: a retry never stores twice); the
  // sync replay may then bring them back too, which the seq map deduplicates.
  for (const c of convs.values()) {
    for (const p of c.pending.values()) if (!p.inflight) trySend(c, p);
  }
  if (reconnect) {
    try {
      if (await resync(syncedAt, opened)) syncedAt = welcome.server_time;
    } catch (e) {
      console.warn('sync failed', e);
    }
  }
  try { await refreshConversations(); } catch { /* shown elsewhere */ }
  if (current && current.loaded && current.lastSeq > current.maxSeen) fillGap(current);
  if (current) markRead(current);
  const known = [...online.keys()];
  if (known.length) queryPresence(known, true);
  refreshRooms();
}

/**
 * Catch up every conversation from its cursor after a reconnect; with `since`, the
 * server also replays recalls and edits of messages already on screen. True only when
 * every page arrived (`caught_up`) on the connection `opened` (a newer connection
 * runs its own catch-up).
 */
async function resync(since, opened) {
  let cursors = {};
  for (const c of convs.values()) cursors[c.id] = c.loaded ? c.maxSeen : c.lastSeq;
  let complete = false;
  for (let round = 0; round < 50 && conn.opens === opened; round++) {
    const req = { type: 'sync', cursors };
    if (round === 0 && since != null) req.since = since;
    const ok = await conn.request(req, 30000);
    for (const info of ok.conversations || []) {
      const c = convOf(info.conv);
      c.lastSeq = Math.max(c.lastSeq, info.last_seq || 0);
    }
    if (ok.caught_up) { complete = true; break; }
    cursors = {};
    for (const id of ok.more || []) cursors[id] = ok.cursors[id];
  }
  renderConvList();
  return complete && conn.opens === opened;
}

async function refreshConversations() {
  const r = await api('/api/conversations');
  for (const info of r.conversations) {
    const c = convOf(info.conv);
    c.lastSeq = Math.max(c.lastSeq, info.last_seq);
    if (c !== current) c.unread = info.unread;
  }
  renderConvList();
}

let roomsTimer = null;
function refreshRoomsSoon() {
  clearTimeout(roomsTimer);
  roomsTimer = setTimeout(refreshRooms, 800);
}

async function refreshRooms() {
  let r;
  try { r = await api('/api/rooms'); } catch { return; }
  const pub = $('public-list');
  pub.replaceChildren();
  let shown = 0;
  for (const room of r.rooms) {
    const c = convs.get(room.conv);
    if (c) {
      c.online = room.online;
      continue;
    }
    if (shown >= 12) continue;
    shown++;
    const li = el('li');
    const b = el('button', 'conv-item');
    b.type = 'button';
    b.append(el('span', 'hash', '#'));
    const txt = el('span', 'conv-text');
    txt.append(el('span', 'conv-name', room.name), el('span', 'conv-sub', `${room.members} members · ${room.online} online`));
    b.append(txt);
    b.addEventListener('click', () => joinRoom(room.name));
    li.append(b);
    pub.append(li);
  }
  $('public-head').hidden = shown === 0;
  renderConvList();
  if (current) renderHeader();
}

const presenceQueue = new Set();
let presenceTimer = null;
function queryPresence(users, now = false) {
  for (const u of users) if (u && u !== me) presenceQueue.add(u);
  clearTimeout(presenceTimer);
  presenceTimer = setTimeout(async () => {
    if (!conn || !conn.open || presenceQueue.size === 0) return;
    const list = [...presenceQueue].slice(0, 256);
    for (const u of list) presenceQueue.delete(u);
    try {
      const ok = await conn.request({ type: 'presence', users: list });
      for (const [u, on] of Object.entries(ok.online || {})) online.set(u, !!on);
      renderPresence();
    } catch { /* retried on reconnect */ }
  }, now ? 0 : 150);
}

// ---------------------------------------------------------------- incoming frames

function onFrame(f) {
  switch (f.type) {
    case 'message': onMessage(f); break;
    case 'member': {
      const c = convOf(f.conv);
      if (typeof f.online === 'number') c.online = f.online;
      if (f.event === 'joined') {
        notePerson(c, f.user);
        online.set(f.user, true);
      } else if (f.event === 'left') {
        c.people.delete(f.user);
      }
      renderPresence();
      break;
    }
    case 'presence':
      online.set(f.user, !!f.online);
      renderPresence();
      refreshRoomsSoon();
      break;
    case 'typing': onTyping(f); break;
    case 'receipt': {
      if (f.user === me) break;
      const c = convOf(f.conv);
      const prev = c.receipts.get(f.user) || 0;
      if (f.seq > prev) c.receipts.set(f.user, f.seq);
      notePerson(c, f.user);
      if (c === current) renderReceipts(c);
      break;
    }
    case 'recalled': {
      const c = convs.get(f.conv);
      const m = c && c.msgs.get(f.seq);
      if (m) { m.recalled = true; m.content = null; rerender(c, m); }
      break;
    }
    case 'edited': {
      const c = convs.get(f.conv);
      const m = c && c.msgs.get(f.seq);
      if (m) { m.content = f.content; m.edited_at = f.edited_at; rerender(c, m); }
      break;
    }
    case 'signal': calls.onSignal(f); break;
    case 'notice': toast(`${f.from ? f.from + ': ' : ''}${f.text}`); break;
    case 'error':
      if (typeof f.id === 'string' && signalPeers.has(f.id)) {
        const peer = signalPeers.get(f.id);
        signalPeers.delete(f.id);
        if (calls.active) calls.end(f.code === 'not_found' ? `${peer} is not online` : `Call failed: ${f.message}`, true);
      } else if (f.message) {
        toast(f.message);
      }
      break;
    default: break;
  }
}

function onMessage(m) {
  const c = convOf(m.conv);
  notePerson(c, m.from);
  clearTyping(c, m.from);
  const isNew = m.seq > c.lastSeq;
  c.lastSeq = Math.max(c.lastSeq, m.seq);
  if (!c.loaded) {
    if (isNew && m.from !== me) c.unread++;
    renderConvItem(c);
    return;
  }
  if (m.seq > c.maxSeen + 1 && !c.msgs.has(m.seq - 1)) {
    // A jump past a missing seq: fetch the gap, then keep this one too.
    fillGap(c);
  }
  const added = addMessage(c, m);
  if (added && m.from !== me && !(c === current && atBottom() && !document.hidden)) c.unread++;
  if (c === current) markRead(c);
  renderConvItem(c);
}

function onTyping(f) {
  if (f.user === me) return;
  const c = convOf(f.conv);
  notePerson(c, f.user);
  clearTimeout(c.typing.get(f.user));
  c.typing.set(f.user, setTimeout(() => clearTyping(c, f.user), TYPING_SHOWN_MS));
  if (c === current) renderTyping();
}

function clearTyping(c, user) {
  if (!c.typing.has(user)) return;
  clearTimeout(c.typing.get(user));
  c.typing.delete(user);
  if (c === current) renderTyping();
}

// ---------------------------------------------------------------- history

async function fetchPage(c, params) {
  const q = new URLSearchParams({ limit: String(params.limit || PAGE) });
  if (params.before_seq) q.set('before_seq', String(params.before_seq));
  if (params.after_seq != null) q.set('after_seq', String(params.after_seq));
  return api(`/api/conversations/${encodeURIComponent(c.id)}/messages?${q}`);
}

function loadLatest(c) {
  if (c.loaded) return Promise.resolve();
  if (c.loading) return c.loading;
  c.loading = (async () => {
    let page;
    try {
      page = await fetchPage(c, {});
    } catch (e) {
      if (c.kind === 'dm' && (e.status === 404 || e.code === 'not_found')) page = { messages: [], has_more: false };
      else { c.loading = null; throw e; }
    }
    c.loaded = true;
    c.hasMore = page.has_more;
    for (const m of page.messages) addMessage(c, m);
    c.loading = null;
    if (c.lastSeq > c.maxSeen) await fillGap(c);
    if (c === current) {
      renderTop(c);
      scrollToBottom();
      markRead(c);
    }
  })();
  return c.loading;
}

async function loadOlder(c) {
  if (c.loadingOlder || !c.hasMore || !c.loaded) return;
  const min = Math.min(...c.msgs.keys());
  if (!Number.isFinite(min) || min <= 1) { c.hasMore = false; renderTop(c); return; }
  c.loadingOlder = true;
  renderTop(c);
  try {
    const page = await fetchPage(c, { before_seq: min });
    const log = $('log');
    const before = log.scrollHeight - log.scrollTop;
    for (const m of page.messages) addMessage(c, m);
    c.hasMore = page.has_more;
    if (c === current) log.scrollTop = log.scrollHeight - before;
  } catch (e) {
    toast(`Could not load earlier messages: ${e.message}`);
  } finally {
    c.loadingOlder = false;
    if (c === current) renderTop(c);
  }
}

/** Fetches everything after the newest held seq (a gap, or missed while away). */
async function fillGap(c) {
  if (c.filling) { c.fillAgain = true; return; }
  c.filling = true;
  try {
    do {
      c.fillAgain = false;
      for (let i = 0; i < 20; i++) {
        const page = await fetchPage(c, { after_seq: c.maxSeen, limit: 200 });
        for (const m of page.messages) addMessage(c, m);
        if (!page.has_more || page.messages.length === 0) break;
      }
    } while (c.fillAgain);
  } catch (e) {
    console.warn('gap fill failed', e);
  } finally {
    c.filling = false;
  }
  if (c === current) markRead(c);
}

// ---------------------------------------------------------------- messages

/** Stores a message (deduplicated by seq) and shows it when its conversation is open. */
function addMessage(c, m) {
  const old = c.msgs.get(m.seq);
  if (old) {
    if ((m.recalled && !old.recalled) || (m.edited_at && m.edited_at !== old.edited_at)) {
      Object.assign(old, m);
      rerender(c, old);
    }
    return false;
  }
  c.msgs.set(m.seq, m);
  c.maxSeen = Math.max(c.maxSeen, m.seq);
  c.lastSeq = Math.max(c.lastSeq, m.seq);
  notePerson(c, m.from);
  if (m.from === me && m.client_msg_id && c.pending.has(m.client_msg_id)) {
    const p = c.pending.get(m.client_msg_id);
    c.pending.delete(m.client_msg_id);
    p.li.remove();
  }
  if (c === current) {
    const stick = atBottom();
    place(c, m);
    if (stick) scrollToBottom();
  }
  return true;
}

function place(c, m) {
  const li = renderMessage(c, m);
  c.els.set(m.seq, li);
  const log = $('log');
  let node = log.lastElementChild;
  while (node && (node.dataset.seq === undefined || Number(node.dataset.seq) > m.seq)) node = node.previousElementSibling;
  log.insertBefore(li, node ? node.nextElementSibling : log.firstElementChild);
  regroup(li);
  if (li.nextElementSibling) regroup(li.nextElementSibling);
}

function regroup(li) {
  if (!li.classList.contains('msg')) return;
  const prev = li.previousElementSibling;
  const cont = prev && prev.classList.contains('msg') && !prev.classList.contains('recalled')
    && !li.classList.contains('recalled')
    && prev.dataset.from === li.dataset.from
    && Math.abs(Number(li.dataset.ts) - Number(prev.dataset.ts)) < GROUP_MS;
  li.classList.toggle('cont', !!cont);
}

function rerender(c, m) {
  if (c !== current) return;
  const old = c.els.get(m.seq);
  if (!old) return;
  const li = renderMessage(c, m);
  old.replaceWith(li);
  c.els.set(m.seq, li);
  regroup(li);
  if (li.nextElementSibling) regroup(li.nextElementSibling);
  renderReceipts(c);
}

function renderMessage(c, m, pending = false) {
  const mine = m.from === me;
  const li = el('li', 'msg' + (mine ? ' mine' : '') + (m.recalled ? ' recalled' : '') + (pending ? ' pending' : ''));
  if (!pending) li.dataset.seq = String(m.seq);
  li.dataset.from = m.from;
  li.dataset.ts = String(m.ts || Date.now());
  li.append(avatar(m.from));
  const wrap = el('div', 'wrap');
  const meta = el('div', 'meta');
  meta.append(el('span', 'sender', m.from));
  const t = el('time', 'time', m.ts ? timeText(m.ts) : '');
  if (m.ts) {
    t.dateTime = new Date(m.ts).toISOString();
    t.title = new Date(m.ts).toLocaleString();
  }
  meta.append(t);
  if (m.edited_at && !m.recalled) meta.append(el('span', 'edited', '(edited)'));
  wrap.append(meta);
  const bubble = el('div', m.content_type === 'image' && !m.recalled ? 'bubble media' : 'bubble');
  if (mine && !pending && !m.recalled) bubble.tabIndex = 0; // a tap shows the actions on touch screens
  if (m.recalled) {
    bubble.append(el('span', 'recalled-text', 'Message recalled'));
  } else {
    bubble.append(renderContent(m));
  }
  wrap.append(bubble);
  if (pending) {
    wrap.append(el('div', 'state', 'Sending…'));
  } else if (mine && !m.recalled) {
    const actions = el('div', 'actions');
    if (m.content_type === 'text') {
      const e = el('button', 'link', 'Edit');
      e.type = 'button';
      e.setAttribute('aria-label', 'Edit message');
      e.addEventListener('click', () => startEdit(c, m));
      actions.append(e);
    }
    const r = el('button', 'link', 'Recall');
    r.type = 'button';
    r.setAttribute('aria-label', 'Recall message');
    r.addEventListener('click', () => recall(c, m));
    actions.append(r);
    wrap.append(actions);
  }
  li.append(wrap);
  return li;
}

function renderContent(m) {
  const ct = m.content_type;
  if (ct === 'text' || ct === 'system' || typeof m.content === 'string') {
    const d = el('div', ct === 'system' ? 'text system' : 'text');
    d.textContent = typeof m.content === 'string' ? m.content : JSON.stringify(m.content);
    return d;
  }
  const c = m.content || {};
  const name = typeof c.name === 'string' && c.name ? c.name : 'attachment';
  const url = safeUrl(c.url);
  if (!url) return el('div', 'text', `[${ct}: ${name}]`);
  if (ct === 'image') {
    const a = el('a', 'image-link');
    a.href = url;
    a.target = '_blank';
    a.rel = 'noopener noreferrer';
    const img = el('img', 'preview');
    img.alt = name;
    img.src = url;
    img.decoding = 'async';
    img.addEventListener('error', () => retryWithFreshPass(img));
    img.addEventListener('load', () => { if (atBottom(200)) scrollToBottom(); });
    a.append(img);
    return a;
  }
  const box = el('div', 'attachment');
  if (ct === 'audio' || ct === 'video') {
    const media = el(ct);
    media.controls = true;
    media.preload = 'metadata';
    media.src = url;
    media.addEventListener('error', () => retryWithFreshPass(media));
    box.append(media);
  }
  const a = el('a', 'file-link');
  a.href = url;
  a.download = name;
  a.rel = 'noopener noreferrer';
  const icon = el('span', 'file-icon', '⬇');
  icon.setAttribute('aria-hidden', 'true');
  const label = el('span', 'file-name', name);
  a.append(icon, label);
  box.append(a);
  if (typeof c.size === 'number') box.append(el('span', 'file-size', sizeText(c.size)));
  return box;
}

function renderTop(c) {
  const log = $('log');
  let top = log.querySelector('li.log-top');
  if (!top) {
    top = el('li', 'log-top');
    top.dataset.seq = '0';
    log.prepend(top);
  }
  top.textContent = c.loadingOlder ? 'Loading earlier messages…'
    : c.hasMore ? 'Scroll up for earlier messages'
      : c.kind === 'room' ? `This is the beginning of #${title(c)}` : `This is the beginning of your conversation with ${title(c)}`;
}

function renderReceipts(c) {
  const log = $('log');
  for (const s of log.querySelectorAll('.seen')) s.remove();
  const bySeq = new Map();
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  for (const [user, seq] of c.receipts) {
    // The newest message the reader has seen that is not their own.
    let target = 0;
    for (const s of seqs) {
      if (s > seq) break;
      if (c.msgs.get(s).from !== user) target = s;
    }
    if (!target) continue;
    if (!bySeq.has(target)) bySeq.set(target, []);
    bySeq.get(target).push(user);
  }
  const stick = atBottom();
  for (const [seq, users] of bySeq) {
    const li = c.els.get(seq);
    if (!li) continue;
    users.sort();
    const shown = users.length > 3 ? `${users.slice(0, 3).join(', ')} and ${users.length - 3} more` : users.join(', ');
    li.querySelector('.wrap').append(el('div', 'seen', `Seen by ${shown}`));
  }
  if (stick) scrollToBottom();
}

function renderTyping() {
  const c = current;
  const users = c ? [...c.typing.keys()] : [];
  const t = $('typing');
  if (users.length === 0) t.textContent = '';
  else if (users.length === 1) t.textContent = `${users[0]} is typing…`;
  else if (users.length === 2) t.textContent = `${users[0]} and ${users[1]} are typing…`;
  else t.textContent = 'Several people are typing…';
}

// ---------------------------------------------------------------- sending

async function sendMessage(c, contentType, content) {
  const cmid = uid('w-');
  const frame = { type: 'send', conv: c.id, client_msg_id: cmid, content_type: contentType, content };
  const p = { frame, li: null, inflight: false };
  p.li = renderMessage(c, { from: me, content_type: contentType, content, ts: Date.now() }, true);
  c.pending.set(cmid, p);
  if (c === current) {
    $('log').append(p.li);
    regroup(p.li);
    scrollToBottom();
  }
  trySend(c, p);
}

async function trySend(c, p) {
  if (!conn || !conn.open) { setPendingState(p, 'Waiting for connection…'); return; }
  p.inflight = true;
  setPendingState(p, 'Sending…');
  try {
    const ok = await conn.request(p.frame);
    p.inflight = false;
    c.pending.delete(p.frame.client_msg_id);
    p.li.remove();
    addMessage(c, {
      conv: c.id, seq: ok.seq, msg_id: ok.msg_id, from: me, client_msg_id: p.frame.client_msg_id,
      content_type: p.frame.content_type, content: p.frame.content, ts: ok.ts,
    });
    if (c === current) { scrollToBottom(); markRead(c); }
    renderConvItem(c);
  } catch (e) {
    p.inflight = false;
    if (!c.pending.has(p.frame.client_msg_id)) return; // delivered by a sync meanwhile
    if (e.code === 'offline') {
      setPendingState(p, 'Waiting for connection…');
    } else if (e.code === 'timeout' || e.code === 'unavailable' || e.code === 'rate_limited') {
      setPendingState(p, 'Retrying…');
      setTimeout(() => { if (c.pending.has(p.frame.client_msg_id) && !p.inflight) trySend(c, p); }, 2000);
    } else {
      c.pending.delete(p.frame.client_msg_id);
      p.li.classList.add('failed');
      setPendingState(p, `Not sent: ${e.message}`);
    }
  }
}

function setPendingState(p, text) {
  const s = p.li.querySelector('.state');
  if (s) s.textContent = text;
}

async function startEdit(c, m) {
  editing = { conv: c.id, seq: m.seq };
  $('edit-bar').hidden = false;
  $('send-btn').textContent = 'Save';
  const input = $('message-input');
  input.value = m.content;
  autoGrow();
  input.focus();
}

function stopEdit() {
  editing = null;
  $('edit-bar').hidden = true;
  $('send-btn').textContent = 'Send';
  $('message-input').value = '';
  autoGrow();
}

async function recall(c, m) {
  try {
    await conn.request({ type: 'recall', conv: c.id, seq: m.seq });
    m.recalled = true;
    m.content = null;
    rerender(c, m);
  } catch (e) {
    toast(`Could not recall: ${e.message}`);
  }
}

$('edit-cancel').addEventListener('click', stopEdit);

$('composer').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const c = current;
  if (!c) return;
  const input = $('message-input');
  const text = input.value;
  if (!text.trim()) return;
  if (editing) {
    const target = editing;
    const m = convOf(target.conv).msgs.get(target.seq);
    try {
      const ok = await conn.request({ type: 'edit', conv: target.conv, seq: target.seq, content: text });
      if (m) { m.content = text; m.edited_at = ok.edited_at || Date.now(); rerender(convOf(target.conv), m); }
      stopEdit();
    } catch (e) {
      toast(`Could not edit: ${e.message}`);
    }
    return;
  }
  input.value = '';
  autoGrow();
  sendMessage(c, 'text', text);
});

$('message-input').addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $('composer').requestSubmit();
  } else if (ev.key === 'Escape' && editing) {
    stopEdit();
  }
});

function autoGrow() {
  const input = $('message-input');
  input.style.height = 'auto';
  input.style.height = Math.min(input.scrollHeight, 160) + 'px';
}

$('message-input').addEventListener('input', () => {
  autoGrow();
  const c = current;
  if (!c || editing || !$('message-input').value) return;
  const now = Date.now();
  if (now - lastTypingSent > TYPING_EVERY_MS && conn && conn.open) {
    lastTypingSent = now;
    conn.send({ type: 'typing', conv: c.id });
  }
});

$('file-input').addEventListener('change', async () => {
  const input = $('file-input');
  const file = input.files && input.files[0];
  input.value = '';
  const c = current;
  if (!file || !c) return;
  const form = new FormData();
  form.append('file', file, file.name);
  try {
    const up = await api('/api/files', { method: 'POST', body: form });
    const mime = up.mime || file.type || 'application/octet-stream';
    const kind = mime.startsWith('image/') ? 'image' : mime.startsWith('audio/') ? 'audio' : mime.startsWith('video/') ? 'video' : 'file';
    sendMessage(c, kind, { url: up.url, name: up.name, size: up.size, mime });
  } catch (e) {
    toast(e.status === 413 ? 'That file is too large.' : `Upload failed: ${e.message}`);
  }
});

// ---------------------------------------------------------------- reading

function atBottom(slack = 80) {
  const log = $('log');
  return log.scrollHeight - log.scrollTop - log.clientHeight < slack;
}

function scrollToBottom() {
  const log = $('log');
  log.scrollTop = log.scrollHeight;
}

/** Tells the server we read up to the newest seq on screen. */
function markRead(c) {
  if (c !== current || !c.loaded || document.hidden) return;
  if (!atBottom(120)) return;
  const seq = c.maxSeen;
  c.unread = 0;
  renderConvItem(c);
  if (seq > c.readSent && conn && conn.open) {
    c.readSent = seq;
    conn.send({ type: 'read', conv: c.id, seq });
  }
}

$('log').addEventListener('scroll', () => {
  const c = current;
  if (!c) return;
  if ($('log').scrollTop < 120) loadOlder(c);
  if (atBottom()) markRead(c);
});

document.addEventListener('visibilitychange', () => { if (current) markRead(current); });

// ---------------------------------------------------------------- navigation

async function openConv(id) {
  const c = convOf(id);
  if (editing) stopEdit();
  current = c;
  sessionStorage.setItem('hubbub.current', id);
  $('app').classList.add('show-main');
  $('empty').hidden = true;
  $('log').hidden = false;
  $('composer').hidden = false;
  const log = $('log');
  log.replaceChildren();
  renderTop(c);
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  c.els.clear();
  for (const s of seqs) {
    const li = renderMessage(c, c.msgs.get(s));
    li.dataset.seq = String(s);
    c.els.set(s, li);
    log.append(li);
    regroup(li);
  }
  for (const p of c.pending.values()) { log.append(p.li); regroup(p.li); }
  renderReceipts(c);
  renderHeader();
  renderPeople();
  renderTyping();
  renderConvList();
  scrollToBottom();
  if (window.matchMedia('(min-width: 721px)').matches) $('message-input').focus();
  try {
    await loadLatest(c);
  } catch (e) {
    toast(`Could not open ${title(c)}: ${e.message}`);
    return;
  }
  if (c !== current) return;
  renderReceipts(c);
  markRead(c);
  // Fill the screen so that scrolling up is possible.
  if (c.hasMore && log.scrollHeight <= log.clientHeight) loadOlder(c);
}

function renderHeader() {
  const c = current;
  if (!c) return;
  $('conv-title').textContent = c.kind === 'room' ? `# ${title(c)}` : title(c);
  const sub = $('conv-sub');
  if (c.kind === 'room') {
    sub.textContent = typeof c.online === 'number' ? `${c.online} online` : '';
  } else {
    const on = online.get(peerOf(c));
    sub.textContent = on === true ? 'Online' : on === false ? 'Offline' : '';
  }
  $('call-btn').hidden = c.kind !== 'dm' || calls.active;
}

function renderPeople() {
  const box = $('people');
  box.replaceChildren();
  const c = current;
  if (!c || c.kind !== 'room' || c.people.size === 0) { box.hidden = true; return; }
  box.hidden = false;
  const users = [...c.people].sort((a, b) => (online.get(b) === true) - (online.get(a) === true) || a.localeCompare(b));
  box.append(el('span', 'people-label', 'People'));
  for (const u of users.slice(0, 20)) {
    const b = el('button', 'chip');
    b.type = 'button';
    b.title = `Direct message ${u}`;
    const dot = el('span', 'dot ' + (online.get(u) ? 'on' : 'off'));
    dot.setAttribute('aria-hidden', 'true');
    b.append(dot, el('span', null, u));
    b.addEventListener('click', () => openDm(u));
    box.append(b);
  }
}

function renderPresence() {
  renderConvList();
  if (current) { renderHeader(); renderPeople(); }
}

function renderConvList() {
  const rooms = [];
  const dms = [];
  for (const c of convs.values()) (c.kind === 'room' ? rooms : dms).push(c);
  rooms.sort((a, b) => a.id.localeCompare(b.id));
  dms.sort((a, b) => a.id.localeCompare(b.id));
  syncList($('room-list'), rooms);
  syncList($('dm-list'), dms);
}

function syncList(ul, list) {
  const want = list.map((c) => { renderConvItem(c); return c.item; });
  const have = [...ul.children];
  if (want.length !== have.length || want.some((li, i) => li !== have[i])) ul.replaceChildren(...want);
}

function renderConvItem(c) {
  if (!c.item) {
    const li = el('li');
    const b = el('button', 'conv-item');
    b.type = 'button';
    b.addEventListener('click', () => openConv(c.id));
    li.append(b);
    c.item = li;
  }
  const b = c.item.firstElementChild;
  b.replaceChildren();
  if (c.kind === 'room') {
    b.append(el('span', 'hash', '#'));
  } else {
    const p = peerOf(c);
    const av = avatar(p, 'avatar sm');
    const dot = el('span', 'dot presence ' + (online.get(p) ? 'on' : 'off'));
    dot.title = online.get(p) ? 'online' : 'offline';
    av.append(dot);
    b.append(av);
  }
  const txt = el('span', 'conv-text');
  txt.append(el('span', 'conv-name', title(c)));
  if (c.kind === 'room' && typeof c.online === 'number') txt.append(el('span', 'conv-sub', `${c.online} online`));
  else if (c.kind === 'dm') txt.append(el('span', 'conv-sub', online.get(peerOf(c)) ? 'online' : 'offline'));
  b.append(txt);
  if (c.unread > 0 && c !== current) {
    const badge = el('span', 'badge', c.unread > 99 ? '99+' : String(c.unread));
    badge.setAttribute('aria-label', `${c.unread} unread`);
    b.append(badge);
  }
  if (c === current) b.setAttribute('aria-current', 'true');
  else b.removeAttribute('aria-current');
}

async function joinRoom(name) {
  if (!ROOM_RE.test(name)) { toast('Room names use letters, digits, dot, dash and underscore.'); return; }
  if (!conn || !conn.open) { toast('Not connected yet; try again in a moment.'); return; }
  try {
    const ok = await conn.request({ type: 'join', room: name });
    const c = convOf(ok.conv);
    c.online = ok.online;
    c.lastSeq = Math.max(c.lastSeq, ok.last_seq || 0);
    await openConv(ok.conv);
    refreshRooms();
  } catch (e) {
    toast(`Could not join ${name}: ${e.message}`);
  }
}

function openDm(user) {
  if (!NAME_RE.test(user)) { toast('That is not a valid user name.'); return; }
  if (user === me) { toast('That is you.'); return; }
  queryPresence([user], true);
  openConv(dmId(me, user));
}

$('join-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('room-input').value.trim().replace(/^#/, '');
  $('room-input').value = '';
  joinRoom(name);
});

$('dm-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('dm-input').value.trim().replace(/^@/, '');
  $('dm-input').value = '';
  openDm(name);
});

$('back').addEventListener('click', () => {
  $('app').classList.remove('show-main');
});

// ---------------------------------------------------------------- calls

const calls = new Calls({
  send(frame) {
    const id = `sig-${++sigId}`;
    signalPeers.set(id, frame.to);
    setTimeout(() => signalPeers.delete(id), 10000);
    if (!conn || !conn.send({ ...frame, id })) throw new Error('not connected');
  },
  setState(text, phase) {
    $('call').hidden = false;
    $('call').dataset.phase = phase;
    $('call-state').textContent = text;
    $('call-accept').hidden = phase !== 'incoming';
    $('call-decline').hidden = phase !== 'incoming';
    $('call-hangup').hidden = phase === 'incoming' || phase === 'ended' || phase === 'failed';
    $('call-btn').hidden = true;
    $('app').classList.add('show-main');
  },
  showVideo(local, remote) {
    const lv = $('local-video');
    const rv = $('remote-video');
    if (local && lv.srcObject !== local) lv.srcObject = local;
    if (remote && rv.srcObject !== remote) {
      rv.srcObject = remote;
      rv.play().catch(() => {});
    }
  },
  onEnd() {
    $('local-video').srcObject = null;
    $('remote-video').srcObject = null;
    setTimeout(() => {
      if (!calls.active) {
        $('call').hidden = true;
        renderHeader();
      }
    }, 2500);
  },
});

$('call-btn').addEventListener('click', () => {
  const c = current;
  if (c && c.kind === 'dm') calls.start(peerOf(c), true);
});
$('call-accept').addEventListener('click', () => calls.accept());
$('call-decline').addEventListener('click', () => calls.decline());
$('call-hangup').addEventListener('click', () => calls.hangup());

// ---------------------------------------------------------------- boot

try {
  auth = JSON.parse(sessionStorage.getItem('hubbub.auth') || 'null');
} catch {
  auth = null;
}
if (auth && auth.user && (auth.token || GUEST)) startChat();
else showSignin();
