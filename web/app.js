// hubbub web UI: sign-in, conversations, messages, presence, typing, receipts,
// attachments, replies, reactions, mentions, members and calls, over the wire protocol
// in docs/PROTOCOL.md only. Every piece of user-provided text is put in the page with
// textContent (rich text: render.js builds nodes), never as HTML.

import { Connection } from './conn.js';
import { Calls } from './call.js';
import { richText } from './render.js';
import { notify, permissionButton, setUnreadTitle } from './notify.js';
import { initSearch } from './search.js';

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
/** user -> online (true/false; null while disconnected); users never asked are absent */
const online = new Map();
let lastTypingSent = 0;
let editing = null; // { conv, seq }
let replying = null; // { conv, seq, from, excerpt }
const REACTIONS = ['👍', '❤️', '😂', '🎉', '😮', '😢'];
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

/** The local calendar day of a time: `YYYY-M-D`. */
function dayKey(ts) {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth() + 1}-${d.getDate()}`;
}

/** Whole local days between the day of `ts` and today (0 today, 1 yesterday). */
function daysAgo(ts) {
  const a = new Date(ts);
  const b = new Date();
  const da = Date.UTC(a.getFullYear(), a.getMonth(), a.getDate());
  const db = Date.UTC(b.getFullYear(), b.getMonth(), b.getDate());
  return Math.round((db - da) / 86400000);
}

/** "Today", "Yesterday", or the date: "Mon, 23 Nov 2026". */
function dayLabel(ts) {
  const ago = daysAgo(ts);
  if (ago === 0) return 'Today';
  if (ago === 1) return 'Yesterday';
  return new Date(ts).toLocaleDateString([], { weekday: 'short', day: 'numeric', month: 'short', year: 'numeric' });
}

/** The time of a message; messages of earlier days carry a short date too. */
function timeText(ts) {
  const d = new Date(ts);
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (daysAgo(ts) === 0) return time;
  const sameYear = d.getFullYear() === new Date().getFullYear();
  const date = d.toLocaleDateString([], sameYear ? { day: 'numeric', month: 'short' } : { day: 'numeric', month: 'short', year: 'numeric' });
  return `${date}, ${time}`;
}

/** "1 member", "2 members". */
function plural(n, one, many = one + 's') {
  return `${n} ${n === 1 ? one : many}`;
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
      mentions: 0, // unread messages that mention me
      dividerSeq: null, // the first unread message when the conversation was opened
      members: null, // [{user, role, online}] from the members endpoint
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

// The sign-in is kept in localStorage: every tab of this browser shares it, and signing
// out (or an expired session) clears it in all of them (the `storage` event below).
const AUTH_KEY = 'hubbub.auth';

function saveAuth() {
  localStorage.setItem(AUTH_KEY, JSON.stringify(auth));
}

function forgetAuth() {
  localStorage.removeItem(AUTH_KEY);
}

function loadAuth() {
  try {
    return JSON.parse(localStorage.getItem(AUTH_KEY) || 'null');
  } catch {
    return null;
  }
}

window.addEventListener('storage', (ev) => {
  if (ev.storageArea !== localStorage || (ev.key !== AUTH_KEY && ev.key !== null)) return;
  const now = loadAuth();
  if (auth && (!now || now.user !== auth.user)) {
    // Signed out (or in as someone else) in another tab.
    if (calls.active) calls.hangup();
    if (conn) conn.stop();
    location.reload();
  } else if (!auth && now && now.user && (now.token || GUEST)) {
    // Signed in in another tab.
    location.reload();
  }
});

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
    // Registering answers with a token (servers before that answered `{"user"}` only:
    // then log in).
    let r = register ? await api('/api/register', { method: 'POST', headers: json, body }) : null;
    if (!r || !r.token) r = await api('/api/login', { method: 'POST', headers: json, body });
    auth = { user: (r && r.user) || username, token: r.token, expires_at: r.expires_at };
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
  $('signin-error').textContent = '';
  if ($('account-form').reportValidity()) login(true);
});
// An error is about what was sent: editing the form (or sending it again) clears it, so
// it never stands next to the browser's own validation message.
for (const form of [$('account-form'), $('guest-form')]) {
  form.addEventListener('input', () => { $('signin-error').textContent = ''; });
  form.addEventListener('invalid', () => { $('signin-error').textContent = ''; }, true);
  form.querySelector('[type="submit"]').addEventListener('click', () => { $('signin-error').textContent = ''; });
}

$('signout').addEventListener('click', async () => {
  if (calls.active) calls.hangup();
  if (conn) conn.stop();
  forgetAuth();
  sessionStorage.removeItem('hubbub.current');
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
  if (state !== 'online' && [...online.values()].some((v) => v !== null)) {
    // Nobody's presence is known while we are away: grey, until asked again on reconnect.
    for (const u of online.keys()) online.set(u, null);
    renderPresence();
  }
}

/** `on`, `off`, or `unknown` (while disconnected, or not asked yet). */
function presenceOf(user) {
  const v = online.get(user);
  return v === true ? 'on' : v === false ? 'off' : 'unknown';
}

function startChat() {
  if (auth.expires_at && auth.expires_at < Date.now()) {
    forgetAuth();
    showSignin('Your session expired. Please log in again.');
    return;
  }
  me = auth.user;
  permissionButton($('notify-btn'));
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
        forgetAuth();
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
      else focusStart();
    }).catch((e) => {
      if (e.status === 401) {
        forgetAuth();
        showSignin('Please sign in again.');
      }
    });
    refreshRooms();
  });
}

/**
 * Where the keyboard starts after sign-in when nothing has focus yet: the message input
 * of the open conversation, else the first conversation of the list, else the room box.
 */
function focusStart() {
  const active = document.activeElement;
  if (active && active !== document.body && !$('signin').contains(active)) return;
  if (current && !$('composer').hidden) { $('message-input').focus(); return; }
  const first = document.querySelector('#room-list .conv-item, #dm-list .conv-item');
  (first || $('room-input')).focus();
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
  // STUN/TURN servers for calls (absent from older servers: none, host candidates only).
  calls.iceServers = Array.isArray(welcome.ice_servers) ? welcome.ice_servers : [];
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
    if (c !== current) {
      c.unread = info.unread;
      c.mentions = info.mentions || 0;
    }
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
    txt.append(el('span', 'conv-name', room.name), el('span', 'conv-sub', `${plural(room.members, 'member')} · ${room.online} online`));
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
    case 'reaction': {
      const c = convs.get(f.conv);
      if (c) setReaction(c, f.seq, f.user, f.emoji, f.on !== false);
      break;
    }
    case 'reactions': {
      const c = convs.get(f.conv);
      const m = c && c.msgs.get(f.seq);
      if (m && !m.recalled) { m.reactions = f.reactions || {}; rerender(c, m); }
      break;
    }
    case 'member': {
      if (f.event === 'removed') { onRemoved(f); break; }
      if (f.event === 'left' && f.user === me) {
        // Left from another tab or device: this one drops the room too.
        const mine = convs.get(f.conv);
        if (mine) dropConv(mine);
        break;
      }
      const c = convOf(f.conv);
      if (typeof f.online === 'number') c.online = f.online;
      if (f.event === 'joined') {
        notePerson(c, f.user);
        online.set(f.user, true);
      } else if (f.event === 'left') {
        c.people.delete(f.user);
        if (c === current && c.loaded) logEvent(c, `${f.user} left`);
      }
      c.members = null;
      if (c === current && !$('members').hidden) loadMembers(c);
      renderPresence();
      break;
    }
    case 'presence':
      online.set(f.user, !!f.online);
      if (!f.online) calls.peerOffline(f.user);
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
      if (c) rerenderReplies(c, f.seq);
      break;
    }
    case 'edited': {
      const c = convs.get(f.conv);
      const m = c && c.msgs.get(f.seq);
      if (m) {
        m.content = f.content;
        m.edited_at = f.edited_at;
        if ('mentions' in f || Array.isArray(m.mentions)) m.mentions = f.mentions || [];
        rerender(c, m);
      }
      break;
    }
    case 'signal': calls.onSignal(f); break;
    case 'notice': toast(`${f.from ? f.from + ': ' : ''}${f.text}`); break;
    case 'error':
      if (typeof f.id === 'string' && signalPeers.has(f.id)) {
        const peer = signalPeers.get(f.id);
        signalPeers.delete(f.id);
        if (calls.active) calls.end(f.code === 'not_found' ? `${peer} is offline` : `Call failed: ${f.message}`, true);
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
  const mentionsMe = m.from !== me && Array.isArray(m.mentions) && m.mentions.includes(me);
  if (isNew && m.from !== me && (c.kind === 'dm' || mentionsMe)) {
    const text = m.content_type === 'text' && typeof m.content === 'string' ? m.content : `[${m.content_type}]`;
    notify(c.kind === 'dm' ? m.from : `${m.from} in #${title(c)}`, text.slice(0, 200), c.id, () => openAt(c.id, m.seq));
  }
  if (!c.loaded) {
    if (isNew && m.from !== me) c.unread++;
    if (isNew && mentionsMe) c.mentions++;
    renderConvItem(c);
    return;
  }
  if (m.seq > c.maxSeen + 1 && !c.msgs.has(m.seq - 1)) {
    // A jump past a missing seq: fetch the gap, then keep this one too.
    fillGap(c);
  }
  const added = addMessage(c, m);
  if (added && m.from !== me && !(c === current && atBottom() && !document.hidden)) {
    c.unread++;
    if (mentionsMe) c.mentions++;
  }
  if (c === current) markRead(c);
  renderConvItem(c);
}

/** `member` with `removed`: the removed user loses the room; the others are told. */
function onRemoved(f) {
  const c = convs.get(f.conv);
  const room = f.conv.slice(5);
  if (f.user === me) {
    toast(`You were removed from #${room}${f.by ? ` by ${f.by}` : ''}.`);
    if (c) dropConv(c);
    return;
  }
  if (!c) return;
  if (typeof f.online === 'number') c.online = f.online;
  c.people.delete(f.user);
  c.members = null;
  if (c === current) {
    logEvent(c, `${f.user} was removed by ${f.by || 'an admin'}`);
    if (!$('members').hidden) loadMembers(c);
  }
  renderPresence();
}

/** A line in the open conversation's log about its members (not a message). */
function logEvent(c, text) {
  const note = el('li', 'event', text);
  note.dataset.seq = String(c.maxSeen);
  note.setAttribute('role', 'status');
  $('log').append(note);
  if (atBottom(200)) scrollToBottom();
}

/** Forgets a room this user is no longer in (left or removed): off the list, closed if open. */
function dropConv(c) {
  if (replying && replying.conv === c.id) stopReply();
  convs.delete(c.id);
  if (current === c) {
    current = null;
    sessionStorage.removeItem('hubbub.current');
    closeMembers();
    $('log').hidden = true;
    $('composer').hidden = true;
    $('empty').hidden = false;
    $('people').hidden = true;
    $('conv-title').textContent = 'Welcome';
    $('conv-sub').textContent = '';
    $('members-btn').hidden = true;
    $('leave-btn').hidden = true;
    $('typing').textContent = '';
    $('app').classList.remove('show-main');
  }
  renderConvList();
  refreshRoomsSoon();
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

async function loadOlder(c, limit = PAGE) {
  if (c.loadingOlder || !c.hasMore || !c.loaded) return;
  const min = Math.min(...c.msgs.keys());
  if (!Number.isFinite(min) || min <= 1) { c.hasMore = false; renderTop(c); return; }
  c.loadingOlder = true;
  renderTop(c);
  try {
    const page = await fetchPage(c, { before_seq: min, limit });
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
    removeMsgLi(p.li);
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
  settle(li);
}

/** The next message element after `li` (skipping day separators), or null. */
function nextMsg(li) {
  let n = li.nextElementSibling;
  while (n && !n.classList.contains('msg')) n = n.nextElementSibling;
  return n;
}

/**
 * Puts the day separator before `li` right (one where the previous message is of
 * another local day, or there is none) and its grouping, then the next message's.
 */
function settle(li) {
  fixDay(li);
  regroup(li);
  const next = nextMsg(li);
  if (next) { fixDay(next); regroup(next); }
}

function fixDay(li) {
  if (!li.classList.contains('msg')) return;
  let n = li.previousElementSibling;
  while (n && n.classList.contains('day-sep')) { const p = n.previousElementSibling; n.remove(); n = p; }
  while (n && n.classList.contains('event')) n = n.previousElementSibling;
  const ts = Number(li.dataset.ts);
  if (n && n.classList.contains('msg') && dayKey(Number(n.dataset.ts)) === dayKey(ts)) return;
  const sep = el('li', 'day-sep');
  sep.setAttribute('role', 'separator');
  sep.dataset.ts = String(ts);
  sep.append(el('span', null, dayLabel(ts)));
  li.before(sep);
}

/** Takes a message element out of the log, keeping separators and groups right. */
function removeMsgLi(li) {
  if (!li.isConnected) return;
  const next = nextMsg(li);
  const prev = li.previousElementSibling;
  if (prev && prev.classList.contains('day-sep')) prev.remove();
  li.remove();
  if (next) { fixDay(next); regroup(next); }
}

/** Relabels day separators once the day changes ("Today" becomes "Yesterday"). */
let labelledDay = dayKey(Date.now());
setInterval(() => {
  const today = dayKey(Date.now());
  if (today === labelledDay) return;
  labelledDay = today;
  for (const sep of document.querySelectorAll('#log .day-sep')) {
    sep.firstElementChild.textContent = dayLabel(Number(sep.dataset.ts));
  }
}, 60000);

/** A message continues its sender's group: same sender, same day, within GROUP_MS. */
function regroup(li) {
  if (!li.classList.contains('msg')) return;
  const prev = li.previousElementSibling;
  const cont = prev && prev.classList.contains('msg')
    && prev.dataset.from === li.dataset.from
    && dayKey(Number(prev.dataset.ts)) === dayKey(Number(li.dataset.ts))
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
  const next = nextMsg(li);
  if (next) regroup(next);
  renderReceipts(c);
}

function renderMessage(c, m, pending = false) {
  const mine = m.from === me;
  const li = el('li', 'msg' + (mine ? ' mine' : '') + (m.recalled ? ' recalled' : '') + (pending ? ' pending' : ''));
  if (!pending) li.dataset.seq = String(m.seq);
  li.dataset.from = m.from;
  li.dataset.ts = String(m.ts || Date.now());
  if (!pending && c.dividerSeq === m.seq) {
    li.classList.add('unread-start');
    const d = el('div', 'new-divider');
    d.setAttribute('role', 'separator');
    d.append(el('span', null, 'New messages'));
    li.append(d);
  }
  li.append(avatar(m.from));
  const wrap = el('div', 'wrap');
  const meta = el('div', 'meta');
  meta.append(el('span', 'sender', m.from));
  const t = el('time', 'time', m.ts ? timeText(m.ts) : '');
  if (m.ts) {
    t.dateTime = new Date(m.ts).toISOString();
    t.title = new Date(m.ts).toLocaleString([], { dateStyle: 'full', timeStyle: 'short' });
  }
  meta.append(t);
  if (m.edited_at && !m.recalled) meta.append(el('span', 'edited', '(edited)'));
  wrap.append(meta);
  if (m.reply_to && !m.recalled) wrap.append(renderQuote(c, m.reply_to));
  const bubble = el('div', m.content_type === 'image' && !m.recalled ? 'bubble media' : 'bubble');
  if (!pending && !m.recalled) bubble.tabIndex = 0; // a tap shows the actions on touch screens
  if (m.recalled) {
    bubble.append(el('span', 'recalled-text', 'Message recalled'));
  } else {
    bubble.append(renderContent(m));
  }
  if (!m.recalled && Array.isArray(m.mentions) && m.mentions.includes(me) && !mine) li.classList.add('mentions-me');
  wrap.append(bubble);
  if (!pending && !m.recalled && m.reactions && Object.keys(m.reactions).length) wrap.append(renderReactions(c, m));
  if (pending) {
    wrap.append(el('div', 'state', 'Sending…'));
  } else if (!m.recalled) {
    const actions = el('div', 'actions');
    const action = (label, aria, fn) => {
      const b = el('button', 'link', label);
      b.type = 'button';
      b.setAttribute('aria-label', aria);
      b.addEventListener('click', fn);
      actions.append(b);
      return b;
    };
    action('Reply', 'Reply to message', () => startReply(c, m));
    const react = action('React', 'Add reaction', () => togglePicker(c, m, react));
    react.setAttribute('aria-expanded', 'false');
    if (mine && m.content_type === 'text') action('Edit', 'Edit message', () => startEdit(c, m));
    if (mine) action('Recall', 'Recall message', () => recall(c, m));
    wrap.append(actions);
  }
  li.append(wrap);
  return li;
}

/** Shows the replies to message `seq` again (their quote follows a recall). */
function rerenderReplies(c, seq) {
  for (const r of c.msgs.values()) if (r.reply_to && r.reply_to.seq === seq) rerender(c, r);
}

/** The quote of a reply: who wrote the answered message and how it starts. */
function renderQuote(c, r) {
  const q = el('button', 'quote');
  q.type = 'button';
  q.setAttribute('aria-label', `Replying to ${r.from}: show the message`);
  q.append(el('span', 'quote-from', r.from));
  const held = c.msgs.get(r.seq);
  const gone = held ? held.recalled : typeof r.excerpt !== 'string';
  const text = held && held.recalled ? 'Message recalled'
    : typeof r.excerpt === 'string' ? r.excerpt
      : held && held.content_type !== 'text' ? `[${held.content_type}]` : 'Message recalled';
  q.append(el('span', gone ? 'quote-text gone' : 'quote-text', text));
  q.addEventListener('click', () => jumpTo(c, r.seq));
  return q;
}

/** Counts per emoji under a message; the title says who; a click toggles one's own. */
function renderReactions(c, m) {
  const box = el('div', 'reactions');
  for (const [emoji, users] of Object.entries(m.reactions)) {
    if (!Array.isArray(users) || users.length === 0) continue;
    const mineToo = users.includes(me);
    const b = el('button', mineToo ? 'reaction mine' : 'reaction');
    b.type = 'button';
    b.append(el('span', 'emoji', emoji), el('span', 'count', String(users.length)));
    b.title = users.join(', ');
    b.setAttribute('aria-pressed', String(mineToo));
    b.setAttribute('aria-label', `${emoji} ${users.length}: ${users.join(', ')}`);
    b.addEventListener('click', () => react(c, m, emoji, !mineToo));
    box.append(b);
  }
  return box;
}

function togglePicker(c, m, anchor) {
  const open = document.querySelector('.picker');
  if (open) {
    const same = open.dataset.seq === String(m.seq);
    closePicker();
    if (same) return;
  }
  const p = el('div', 'picker');
  p.dataset.seq = String(m.seq);
  p.setAttribute('role', 'group');
  p.setAttribute('aria-label', 'Reactions');
  for (const emoji of REACTIONS) {
    const b = el('button', 'pick', emoji);
    b.type = 'button';
    b.setAttribute('aria-label', `React with ${emoji}`);
    b.addEventListener('click', () => {
      closePicker();
      const users = (m.reactions && m.reactions[emoji]) || [];
      react(c, m, emoji, !users.includes(me));
    });
    p.append(b);
  }
  anchor.setAttribute('aria-expanded', 'true');
  anchor.closest('.wrap').append(p);
  p.firstElementChild.focus();
}

function closePicker() {
  for (const p of document.querySelectorAll('.picker')) {
    const b = p.parentElement && p.parentElement.querySelector('[aria-label="Add reaction"]');
    if (b) b.setAttribute('aria-expanded', 'false');
    p.remove();
  }
}

document.addEventListener('click', (ev) => {
  if (!ev.target.closest('.picker') && !ev.target.closest('[aria-label="Add reaction"]')) closePicker();
});
document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') closePicker(); });

/** Applies a reaction change to a held message. */
function setReaction(c, seq, user, emoji, on) {
  const m = c.msgs.get(seq);
  if (!m || m.recalled) return;
  const r = { ...(m.reactions || {}) };
  const users = new Set(r[emoji] || []);
  if (on) users.add(user); else users.delete(user);
  if (users.size) r[emoji] = [...users].sort(); else delete r[emoji];
  m.reactions = r;
  rerender(c, m);
}

async function react(c, m, emoji, on) {
  try {
    await conn.request({ type: 'react', conv: c.id, seq: m.seq, emoji, on });
    setReaction(c, m.seq, me, emoji, on);
  } catch (e) {
    toast(`Could not react: ${e.message}`);
  }
}

/** Scrolls to message `seq` (loading older pages until it is held) and flashes it. */
async function jumpTo(c, seq) {
  for (let i = 0; i < 50 && c === current && !c.els.has(seq) && c.hasMore; i++) {
    if (c.loadingOlder) { await new Promise((r) => setTimeout(r, 100)); continue; }
    const min = Math.min(...c.msgs.keys());
    if (!Number.isFinite(min) || min <= seq) break;
    await loadOlder(c, Math.min(200, min - seq + 10));
  }
  const li = c.els.get(seq);
  if (!li || c !== current) { if (c === current) toast('That message is not available.'); return; }
  li.scrollIntoView({ block: 'center' });
  li.classList.remove('flash');
  void li.offsetWidth;
  li.classList.add('flash');
  setTimeout(() => li.classList.remove('flash'), 2000);
}

function renderContent(m) {
  const ct = m.content_type;
  if (ct === 'text' || ct === 'system' || typeof m.content === 'string') {
    const d = el('div', ct === 'system' ? 'text system' : 'text');
    if (ct === 'text' && typeof m.content === 'string') d.append(richText(m.content, { me, mentions: m.mentions }));
    else d.textContent = typeof m.content === 'string' ? m.content : JSON.stringify(m.content);
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
  let reply = null;
  if (replying && replying.conv === c.id) {
    frame.reply_to = replying.seq;
    reply = { seq: replying.seq, from: replying.from };
    if (typeof replying.excerpt === 'string') reply.excerpt = replying.excerpt;
    stopReply();
  }
  const p = { frame, li: null, inflight: false, reply };
  p.li = renderMessage(c, { from: me, content_type: contentType, content, ts: Date.now(), reply_to: reply }, true);
  c.pending.set(cmid, p);
  if (c === current) {
    $('log').append(p.li);
    settle(p.li);
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
    removeMsgLi(p.li);
    addMessage(c, {
      conv: c.id, seq: ok.seq, msg_id: ok.msg_id, from: me, client_msg_id: p.frame.client_msg_id,
      content_type: p.frame.content_type, content: p.frame.content, ts: ok.ts,
      ...(p.reply ? { reply_to: p.reply } : {}),
      ...(Array.isArray(ok.mentions) ? { mentions: ok.mentions } : {}),
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

/** The start of a message's text as a reply shows it (at most 140 characters). */
function excerptOf(m) {
  if (m.recalled || m.content_type !== 'text' || typeof m.content !== 'string') return undefined;
  return [...m.content].slice(0, 140).join('');
}

function startReply(c, m) {
  if (editing) stopEdit();
  replying = { conv: c.id, seq: m.seq, from: m.from, excerpt: excerptOf(m) };
  const t = $('reply-text');
  t.replaceChildren(el('span', null, 'Replying to '), el('strong', null, m.from));
  const ex = replying.excerpt !== undefined ? replying.excerpt : m.content_type !== 'text' ? `[${m.content_type}]` : '';
  if (ex) t.append(el('span', 'reply-excerpt', ex));
  $('reply-bar').hidden = false;
  $('message-input').focus();
}

function stopReply() {
  replying = null;
  $('reply-bar').hidden = true;
}

$('reply-cancel').addEventListener('click', () => { stopReply(); $('message-input').focus(); });

async function startEdit(c, m) {
  if (replying) stopReply();
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

/**
 * Asks in the page (never `window.confirm`): resolves true when `okLabel` is chosen,
 * false on Cancel or Escape. Focus starts on Cancel and stays in the box.
 */
function confirmInPage(text, okLabel) {
  return new Promise((resolve) => {
    const box = $('confirm');
    const ok = $('confirm-ok');
    const cancel = $('confirm-cancel');
    const back = document.activeElement;
    $('confirm-text').textContent = text;
    ok.textContent = okLabel;
    box.hidden = false;
    cancel.focus();
    const done = (yes) => {
      box.hidden = true;
      ok.onclick = null;
      cancel.onclick = null;
      box.onkeydown = null;
      if (back && back.isConnected && typeof back.focus === 'function') back.focus();
      resolve(yes);
    };
    ok.onclick = () => done(true);
    cancel.onclick = () => done(false);
    box.onkeydown = (ev) => {
      if (ev.key === 'Escape') {
        ev.preventDefault();
        done(false);
      } else if (ev.key === 'Tab') {
        ev.preventDefault();
        (document.activeElement === ok ? cancel : ok).focus();
      }
    };
  });
}

async function recall(c, m) {
  if (!(await confirmInPage('Recall this message? Everyone in the conversation will see that it was recalled.', 'Recall'))) return;
  try {
    await conn.request({ type: 'recall', conv: c.id, seq: m.seq });
    m.recalled = true;
    m.content = null;
    rerender(c, m);
    rerenderReplies(c, m.seq);
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
  if (mentionKey(ev)) return;
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $('composer').requestSubmit();
  } else if (ev.key === 'Escape' && editing) {
    stopEdit();
  } else if (ev.key === 'Escape' && replying) {
    stopReply();
  }
});

function autoGrow() {
  const input = $('message-input');
  input.style.height = 'auto';
  input.style.height = Math.min(input.scrollHeight, 160) + 'px';
}

$('message-input').addEventListener('input', () => {
  autoGrow();
  updateMentions();
  const c = current;
  if (!c || editing || !$('message-input').value) return;
  const now = Date.now();
  if (now - lastTypingSent > TYPING_EVERY_MS && conn && conn.open) {
    lastTypingSent = now;
    conn.send({ type: 'typing', conv: c.id });
  }
});

// A real button (reachable with Tab, Enter and Space) opens the file picker.
$('attach-btn').addEventListener('click', () => $('file-input').click());

$('file-input').addEventListener('change', () => {
  const input = $('file-input');
  const file = input.files && input.files[0];
  input.value = '';
  if (file && current) uploadFile(current, file);
});

/** Uploads `file` and sends it to `c` as an image, audio, video or file message. */
async function uploadFile(c, file) {
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
}

/** The files a paste or drop carries (none for plain text). */
function filesOf(data) {
  if (!data) return [];
  if (data.files && data.files.length) return [...data.files];
  return [...(data.items || [])].filter((it) => it.kind === 'file').map((it) => it.getAsFile()).filter(Boolean);
}

// Pasting an image (or any file) into the message box sends it like the attach button.
$('message-input').addEventListener('paste', (ev) => {
  const files = filesOf(ev.clipboardData);
  if (!files.length || !current || editing) return;
  ev.preventDefault();
  const c = current;
  for (const f of files) uploadFile(c, f);
});

// Files dropped onto the conversation are sent too; a drop target shows while dragging.
let dragDepth = 0;
function dragHasFiles(ev) {
  const dt = ev.dataTransfer;
  return !!dt && [...(dt.types || [])].includes('Files');
}
function showDropTarget(on) {
  $('drop-target').hidden = !on;
  if (on && current) $('drop-text').textContent = `Drop to send to ${current.kind === 'room' ? '#' + title(current) : title(current)}`;
}
const mainPane = document.querySelector('.main');
mainPane.addEventListener('dragenter', (ev) => {
  if (!dragHasFiles(ev) || !current || $('composer').hidden) return;
  ev.preventDefault();
  dragDepth++;
  showDropTarget(true);
});
mainPane.addEventListener('dragover', (ev) => {
  if (!dragHasFiles(ev) || !current || $('composer').hidden) return;
  ev.preventDefault();
  ev.dataTransfer.dropEffect = 'copy';
  showDropTarget(true);
});
mainPane.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) showDropTarget(false);
});
// A file dropped anywhere else does nothing (the browser would open it in place of the app).
window.addEventListener('dragover', (ev) => { if (dragHasFiles(ev)) ev.preventDefault(); });
window.addEventListener('drop', (ev) => { if (dragHasFiles(ev)) { ev.preventDefault(); dragDepth = 0; showDropTarget(false); } });
mainPane.addEventListener('drop', (ev) => {
  dragDepth = 0;
  showDropTarget(false);
  const files = filesOf(ev.dataTransfer);
  if (!files.length) return;
  ev.preventDefault();
  ev.stopPropagation();
  if (!current || $('composer').hidden) return;
  const c = current;
  for (const f of files) uploadFile(c, f);
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
  c.mentions = 0;
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

// The message list takes focus (tabindex=0) and scrolls with the keyboard.
$('log').addEventListener('keydown', (ev) => {
  if (ev.target !== $('log') || ev.altKey || ev.ctrlKey || ev.metaKey) return;
  const log = $('log');
  const page = Math.max(40, log.clientHeight * 0.9);
  let to = null;
  if (ev.key === 'PageUp') to = log.scrollTop - page;
  else if (ev.key === 'PageDown') to = log.scrollTop + page;
  else if (ev.key === 'Home') to = 0;
  else if (ev.key === 'End') to = log.scrollHeight;
  if (to === null) return;
  ev.preventDefault();
  log.scrollTop = to;
});

document.addEventListener('visibilitychange', () => { if (current) markRead(current); });

// ---------------------------------------------------------------- navigation

async function openConv(id) {
  const c = convOf(id);
  if (editing) stopEdit();
  if (replying && replying.conv !== id) stopReply();
  closeMentions();
  if (current !== c) closeMembers();
  const unreadAtOpen = c.unread;
  c.dividerSeq = null;
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
    fixDay(li);
    regroup(li);
  }
  for (const p of c.pending.values()) { log.append(p.li); fixDay(p.li); regroup(p.li); }
  renderReceipts(c);
  renderHeader();
  renderPeople();
  renderTyping();
  renderConvList();
  scrollToBottom();
  if (window.matchMedia('(min-width: 721px)').matches || document.activeElement === document.body) $('message-input').focus();
  try {
    await loadLatest(c);
  } catch (e) {
    toast(`Could not open ${title(c)}: ${e.message}`);
    return;
  }
  if (c !== current) return;
  placeDivider(c, unreadAtOpen);
  renderReceipts(c);
  markRead(c);
  // Fill the screen so that scrolling up is possible.
  if (c.hasMore && log.scrollHeight <= log.clientHeight) loadOlder(c);
}

/** Marks the first of the `unread` newest messages of others with "New messages". */
function placeDivider(c, unread) {
  if (unread <= 0) return;
  const seqs = [...c.msgs.keys()].sort((a, b) => b - a);
  let left = unread;
  let first = null;
  for (const s of seqs) {
    if (c.msgs.get(s).from === me) continue;
    first = s;
    if (--left === 0) break;
  }
  if (first == null) return;
  c.dividerSeq = first;
  rerender(c, c.msgs.get(first));
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
  $('members-btn').hidden = c.kind !== 'room';
  $('leave-btn').hidden = c.kind !== 'room';
  $('call-btn').hidden = c.kind !== 'dm' || calls.active;
  $('audio-call-btn').hidden = $('call-btn').hidden;
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
    const dot = el('span', 'dot ' + presenceOf(u));
    dot.setAttribute('aria-hidden', 'true');
    b.append(dot, el('span', null, u));
    b.addEventListener('click', () => openDm(u, true));
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
    const state = presenceOf(p);
    const dot = el('span', 'dot presence ' + state);
    dot.title = state === 'on' ? 'online' : state === 'off' ? 'offline' : 'presence unknown';
    av.append(dot);
    b.append(av);
  }
  const txt = el('span', 'conv-text');
  txt.append(el('span', 'conv-name', title(c)));
  if (c.kind === 'room' && typeof c.online === 'number') txt.append(el('span', 'conv-sub', `${c.online} online`));
  else if (c.kind === 'dm') {
    const state = presenceOf(peerOf(c));
    txt.append(el('span', 'conv-sub', state === 'on' ? 'online' : state === 'off' ? 'offline' : 'presence unknown'));
  }
  b.append(txt);
  if (c.mentions > 0 && c !== current) {
    const at = el('span', 'mention-badge', `@${c.mentions > 99 ? '99+' : c.mentions}`);
    at.setAttribute('aria-label', `${c.mentions} ${c.mentions === 1 ? 'mention' : 'mentions'}`);
    b.append(at);
  }
  if (c.unread > 0 && c !== current) {
    const badge = el('span', 'badge', c.unread > 99 ? '99+' : String(c.unread));
    badge.setAttribute('aria-label', `${c.unread} unread`);
    b.append(badge);
  }
  let total = 0;
  for (const x of convs.values()) total += x.unread;
  setUnreadTitle(total);
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

/**
 * Opens the DM with `user`. A new one is opened only for someone who exists: with
 * accounts the server says `not_found` for an unknown name; with guests allowed any name
 * may be written to, so it takes an earlier conversation or the person being online.
 * `known`: the name comes from a room's member list (no check needed). True when opened.
 */
async function openDm(user, known = false) {
  if (!NAME_RE.test(user)) { toast('That is not a valid user name.'); return false; }
  if (user === me) { toast('That is you.'); return false; }
  const id = dmId(me, user);
  if (!known && !convs.has(id)) {
    if (!conn || !conn.open) { toast('Not connected yet; try again in a moment.'); return false; }
    let exists;
    try {
      exists = await dmPeerExists(user, id);
    } catch (e) {
      toast(`Could not start a conversation with ${user}: ${e.message}`);
      return false;
    }
    if (!exists) {
      toast(GUEST ? `${user} is not online, and you have no conversation with them yet.` : `There is no user named ${user}.`);
      return false;
    }
  }
  queryPresence([user], true);
  openConv(id);
  return true;
}

async function dmPeerExists(user, id) {
  let page;
  try {
    page = await conn.request({ type: 'history', conv: id, limit: 1 });
  } catch (e) {
    if (e.code === 'not_found') return false;
    throw e;
  }
  if (page.messages && page.messages.length) return true;
  if (!GUEST) return true;
  const ok = await conn.request({ type: 'presence', users: [user] });
  const on = !!(ok.online && ok.online[user]);
  online.set(user, on);
  return on;
}

$('join-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = $('room-input').value.trim().replace(/^#/, '');
  $('room-input').value = '';
  joinRoom(name);
});

$('dm-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = $('dm-input').value.trim().replace(/^@/, '');
  if (await openDm(name)) $('dm-input').value = '';
});

$('back').addEventListener('click', () => {
  $('app').classList.remove('show-main');
});

// ---------------------------------------------------------------- members

async function fetchMembers(c) {
  if (c.kind === 'dm') return [{ user: peerOf(c), role: 'member', online: online.get(peerOf(c)) === true }];
  if (c.members && Date.now() - c.membersAt < 30000) return c.members;
  const r = await api(`/api/rooms/${encodeURIComponent(title(c))}/members`);
  c.members = r.members || [];
  c.membersAt = Date.now();
  for (const mb of c.members) {
    if (mb.user !== me) { online.set(mb.user, !!mb.online); notePerson(c, mb.user); }
  }
  return c.members;
}

function closeMembers() {
  $('members').hidden = true;
  $('members-btn').setAttribute('aria-expanded', 'false');
}

$('members-btn').addEventListener('click', () => {
  const c = current;
  if (!c || c.kind !== 'room') return;
  if (!$('members').hidden) { closeMembers(); return; }
  $('members').hidden = false;
  $('members-btn').setAttribute('aria-expanded', 'true');
  c.members = null;
  loadMembers(c);
});
$('members-close').addEventListener('click', closeMembers);

async function loadMembers(c) {
  let list;
  try { list = await fetchMembers(c); } catch (e) { toast(`Could not list the members: ${e.message}`); return; }
  if (c !== current || $('members').hidden) return;
  const amAdmin = list.some((mb) => mb.user === me && mb.role === 'admin');
  const ul = $('member-list');
  ul.replaceChildren();
  const sorted = [...list].sort((a, b) => (b.role === 'admin') - (a.role === 'admin') || a.user.localeCompare(b.user));
  for (const mb of sorted) {
    const li = el('li', 'member');
    li.dataset.user = mb.user;
    const on = mb.user === me ? conn && conn.open : mb.online;
    const dot = el('span', 'dot ' + (on ? 'on' : 'off'));
    dot.title = on ? 'online' : 'offline';
    li.append(dot, el('span', 'member-name', mb.user === me ? `${mb.user} (you)` : mb.user));
    if (mb.role === 'admin') li.append(el('span', 'role', 'admin'));
    if (amAdmin && mb.user !== me) {
      const b = el('button', 'btn ghost small danger-text', 'Remove');
      b.type = 'button';
      b.setAttribute('aria-label', `Remove ${mb.user}`);
      b.addEventListener('click', () => removeMember(c, mb.user));
      li.append(b);
    }
    ul.append(li);
  }
}

$('leave-btn').addEventListener('click', () => { if (current && current.kind === 'room') leaveRoom(current); });

async function leaveRoom(c) {
  const room = title(c);
  if (!(await confirmInPage(`Leave #${room}? You will no longer get its messages; you can join it again later.`, 'Leave'))) return;
  if (!conn || !conn.open) { toast('Not connected yet; try again in a moment.'); return; }
  try {
    await conn.request({ type: 'leave', room });
  } catch (e) {
    toast(`Could not leave #${room}: ${e.message}`);
    return;
  }
  if (convs.get(c.id) === c) dropConv(c);
}

async function removeMember(c, user) {
  if (!(await confirmInPage(`Remove ${user} from #${title(c)}?`, 'Remove'))) return;
  try {
    await conn.request({ type: 'remove', room: title(c), user });
    c.members = null;
    if (c === current) loadMembers(c);
  } catch (e) {
    toast(`Could not remove ${user}: ${e.message}`);
  }
}

// ---------------------------------------------------------------- mention autocomplete

let mention = null; // { start, options: [names], active }

/** The `@word` being typed before the caret: its start and the word, or null. */
function mentionAtCaret() {
  const input = $('message-input');
  const before = input.value.slice(0, input.selectionStart);
  const m = /(^|[^A-Za-z0-9_.-])@([A-Za-z0-9_.-]{0,32})$/.exec(before);
  return m ? { start: before.length - m[2].length - 1, word: m[2] } : null;
}

async function updateMentions() {
  const c = current;
  const at = c && !editing ? mentionAtCaret() : null;
  if (!at) { closeMentions(); return; }
  let names;
  try { names = (await fetchMembers(c)).map((mb) => mb.user); } catch { closeMentions(); return; }
  const again = mentionAtCaret();
  if (c !== current || !again || again.start !== at.start) return;
  const word = again.word.toLowerCase();
  const options = names.filter((n) => n !== me && n.toLowerCase().startsWith(word)).sort().slice(0, 8);
  if (!options.length) { closeMentions(); return; }
  const keep = mention && options.includes(mention.options[mention.active]) ? options.indexOf(mention.options[mention.active]) : 0;
  mention = { start: again.start, options, active: keep };
  renderMentions();
}

function renderMentions() {
  const ul = $('mention-list');
  ul.replaceChildren();
  mention.options.forEach((name, i) => {
    const li = el('li', 'mention-option', null);
    li.id = `mention-${i}`;
    li.setAttribute('role', 'option');
    li.setAttribute('aria-selected', String(i === mention.active));
    li.textContent = name;
    li.addEventListener('mousedown', (ev) => { ev.preventDefault(); pickMention(i); });
    ul.append(li);
  });
  ul.hidden = false;
  $('message-input').setAttribute('aria-activedescendant', `mention-${mention.active}`);
}

function closeMentions() {
  mention = null;
  $('mention-list').hidden = true;
  $('message-input').removeAttribute('aria-activedescendant');
}

function pickMention(i) {
  const name = mention.options[i];
  const input = $('message-input');
  const caret = input.selectionStart;
  const text = input.value;
  const insert = `@${name} `;
  input.value = text.slice(0, mention.start) + insert + text.slice(caret);
  const pos = mention.start + insert.length;
  input.setSelectionRange(pos, pos);
  closeMentions();
  input.focus();
}

/** Keys of the autocomplete while it is open; true when the key was used. */
function mentionKey(ev) {
  if (!mention || $('mention-list').hidden) return false;
  const n = mention.options.length;
  if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp') {
    mention.active = (mention.active + (ev.key === 'ArrowDown' ? 1 : n - 1)) % n;
    renderMentions();
  } else if (ev.key === 'Tab' || (ev.key === 'Enter' && !ev.isComposing)) {
    pickMention(mention.active);
  } else if (ev.key === 'Escape') {
    closeMentions();
  } else {
    return false;
  }
  ev.preventDefault();
  ev.stopPropagation();
  return true;
}

$('message-input').addEventListener('blur', () => setTimeout(() => {
  if (document.activeElement !== $('message-input')) closeMentions();
}, 150));

// ---------------------------------------------------------------- search and jumps

/** Opens conversation `id` at message `seq`. */
async function openAt(id, seq) {
  if (!current || current.id !== id) await openConv(id);
  const c = convs.get(id);
  if (c && c === current) {
    await loadLatest(c).catch(() => {});
    await jumpTo(c, seq);
  }
}

initSearch({
  api,
  el,
  // Results always carry their day: "Today, 10:37", "Yesterday, 10:37", "3 Nov, 10:37".
  timeText: (ts) => (daysAgo(ts) <= 1 ? `${dayLabel(ts)}, ${timeText(ts)}` : timeText(ts)),
  convTitle: (id) => {
    const c = convs.get(id) || { id, kind: id.startsWith('room:') ? 'room' : 'dm' };
    return c.kind === 'room' ? `#${id.slice(5)}` : peerOf(c);
  },
  current: () => current && current.id,
  open: openAt,
  toast,
});

// ---------------------------------------------------------------- calls

const calls = new Calls({
  send(frame) {
    const id = `sig-${++sigId}`;
    signalPeers.set(id, frame.to);
    setTimeout(() => signalPeers.delete(id), 10000);
    if (!conn || !conn.send({ ...frame, id })) throw new Error('not connected');
  },
  setState(text, phase, info = {}) {
    const over = phase === 'ended' || phase === 'failed';
    $('call').hidden = false;
    $('call').dataset.phase = phase;
    $('call').dataset.audio = String(info.video === false);
    $('call-state').textContent = text;
    $('call-accept').hidden = phase !== 'incoming';
    $('call-decline').hidden = phase !== 'incoming';
    $('call-hangup').hidden = phase === 'incoming' || over;
    // A call that is still ringing is cancelled, not hung up.
    $('call-hangup').textContent = phase === 'calling' ? 'Cancel' : 'Hang up';
    $('call-mute').hidden = over || !info.hasAudio;
    $('call-camera').hidden = over || !info.hasVideo;
    setToggle($('call-mute'), !!info.muted, 'Unmute', 'Mute');
    setToggle($('call-camera'), !!info.cameraOff, 'Camera on', 'Camera off');
    $('call-btn').hidden = true;
    $('audio-call-btn').hidden = true;
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

function setToggle(b, pressed, onText, offText) {
  b.setAttribute('aria-pressed', String(pressed));
  b.textContent = pressed ? onText : offText;
}

$('call-btn').addEventListener('click', () => {
  const c = current;
  if (c && c.kind === 'dm') calls.start(peerOf(c), true);
});
$('audio-call-btn').addEventListener('click', () => {
  const c = current;
  if (c && c.kind === 'dm') calls.start(peerOf(c), false);
});
$('call-mute').addEventListener('click', () => calls.toggleMute());
$('call-camera').addEventListener('click', () => calls.toggleCamera());
$('call-accept').addEventListener('click', () => calls.accept());
$('call-decline').addEventListener('click', () => calls.decline());
$('call-hangup').addEventListener('click', () => calls.hangup());

// ---------------------------------------------------------------- boot

auth = loadAuth();
if (auth && auth.user && (auth.token || GUEST)) startChat();
else showSignin();
