// Browser tests of the hubbub web UI: real chromium (Debian's, via playwright-core)
// against a real server. Started by crates/server/tests/browser.rs, which passes:
//   HUBBUB_URL        the server's base URL (http://127.0.0.1:PORT)
//   HUBBUB_CHROMIUM   the chromium executable
//   HUBBUB_ARTIFACTS  where screenshots go
// Control channel: this script prints `@@RESTART` on stdout when it wants the server
// restarted (same data dir, same port) and waits for a line `RESTARTED` on stdin.
// Exit code 0 only when every test passed.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import zlib from 'node:zlib';

const BASE = process.env.HUBBUB_URL;
const CHROMIUM = process.env.HUBBUB_CHROMIUM || '/usr/bin/chromium';
const OUT = process.env.HUBBUB_ARTIFACTS || path.resolve('artifacts');
if (!BASE) {
  console.error('HUBBUB_URL is not set: run this through `cargo test -p hubbub-server --test browser`');
  process.exit(2);
}
fs.mkdirSync(OUT, { recursive: true });

// ------------------------------------------------------------------ control channel

const stdinLines = [];
let lineWaiter = null;
readline.createInterface({ input: process.stdin }).on('line', (l) => {
  if (lineWaiter) { const w = lineWaiter; lineWaiter = null; w(l); } else stdinLines.push(l);
});
function control(cmd, timeoutMs = 30000) {
  process.stdout.write(`@@${cmd}\n`);
  return new Promise((resolve, reject) => {
    if (stdinLines.length) { resolve(stdinLines.shift()); return; }
    const t = setTimeout(() => reject(new Error(`no answer to ${cmd}`)), timeoutMs);
    lineWaiter = (l) => { clearTimeout(t); resolve(l); };
  });
}

// ------------------------------------------------------------------ tiny test kit

function log(...a) { console.log(...a); }

async function until(fn, what, ms = 8000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) { last = e; }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last instanceof Error ? ` (${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function assert(cond, what) { if (!cond) throw new Error(`assertion failed: ${what}`); }

const pages = {};
async function shot(page, name) {
  const file = path.join(OUT, `${name}.png`);
  await page.screenshot({ path: file });
  log(`  screenshot ${file}`);
}

const dialogs = [];
const pageErrors = [];
async function newUser(browser, name, viewport = { width: 1280, height: 800 }, extra = {}) {
  const context = await browser.newContext({ viewport, ...extra });
  const page = await context.newPage();
  page.on('dialog', (d) => { dialogs.push(`${name}: ${d.message()}`); d.dismiss().catch(() => {}); });
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    log(`  [${name} console] ${m.text()}`);
    if (/Content Security Policy/i.test(m.text())) pageErrors.push(`${name}: ${m.text()}`);
  });
  pages[name] = page;
  return { context, page };
}

async function signInGuest(page, name) {
  await page.goto(BASE + '/');
  await page.getByRole('textbox', { name: 'Name', exact: true }).fill(name);
  await page.getByRole('button', { name: 'Connect', exact: true }).click();
  await connected(page);
}

async function connected(page, ms) {
  await until(async () => (await page.locator('#conn-status').textContent()) === 'Connected', 'Connected status', ms);
}

async function joinRoom(page, room) {
  await page.getByRole('textbox', { name: 'Room', exact: true }).fill(room);
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await until(async () => (await page.locator('#conv-title').textContent()) === `# ${room}`, `room ${room} open`);
}

function composer(page) { return page.getByRole('textbox', { name: 'Message', exact: true }); }

async function say(page, text) {
  await composer(page).fill(text);
  await composer(page).press('Enter');
}

/** The messages on screen: [{seq, from, text, time}] in DOM order. */
async function messages(page) {
  return page.getByRole('log').locator('li.msg').evaluateAll((lis) => lis.map((li) => ({
    seq: li.dataset.seq ? Number(li.dataset.seq) : null,
    from: li.querySelector('.sender')?.textContent,
    text: li.querySelector('.bubble')?.textContent,
    time: li.querySelector('time')?.textContent,
    pending: li.classList.contains('pending'),
  })));
}

async function seeMessage(page, text, ms) {
  return until(async () => (await messages(page)).find((m) => m.text === text && m.seq), `"${text}" on screen`, ms);
}

function countOf(list, text) { return list.filter((m) => m.text === text).length; }

function assertNoDuplicates(list, who) {
  const seqs = list.filter((m) => m.seq).map((m) => m.seq);
  assert(new Set(seqs).size === seqs.length, `${who}: no seq shown twice (${seqs.join(',')})`);
  for (let i = 1; i < seqs.length; i++) assert(seqs[i] === seqs[i - 1] + 1, `${who}: seqs ascending without gaps (${seqs[i - 1]} then ${seqs[i]})`);
}

/** The log's items in order: day separators as {sep}, messages as {text, cont}. */
async function logItems(page) {
  return page.getByRole('log').locator(':scope > li.day-sep, :scope > li.msg').evaluateAll((lis) => lis.map((li) => (
    li.classList.contains('day-sep') ? { sep: li.textContent }
      : { text: li.querySelector('.bubble')?.textContent, cont: li.classList.contains('cont'), time: li.querySelector('time')?.textContent, title: li.querySelector('time')?.title })));
}

/** Records what a page asks getUserMedia for, and the streams it gets. */
async function recordMedia(context) {
  await context.addInitScript(() => {
    window.__gum = [];
    window.__streams = [];
    const md = navigator.mediaDevices;
    const orig = md.getUserMedia.bind(md);
    md.getUserMedia = async (c) => {
      window.__gum.push(c);
      const stream = await orig(c);
      window.__streams.push(stream);
      return stream;
    };
    // What the call bar said, in order (a failing step shows it).
    window.__callTexts = [];
    document.addEventListener('DOMContentLoaded', () => {
      const state = document.getElementById('call-state');
      new MutationObserver(() => window.__callTexts.push(state.textContent)).observe(state, { childList: true, characterData: true, subtree: true });
    });
  });
}

async function callTexts(page) {
  return (await page.evaluate(() => window.__callTexts.slice(-6))).join(' | ');
}

/** Whether every camera and microphone track a page got has stopped. */
async function mediaStopped(page) {
  return page.evaluate(() => window.__streams.length > 0 && window.__streams.every((s) => s.getTracks().every((t) => t.readyState === 'ended')));
}

// ------------------------------------------------------------------ the tests

/** A small gradient PNG (w x h), encoded here so that no fixture file is needed. */
function makePng(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) {
    raw[y * (w * 3 + 1)] = 0;
    for (let x = 0; x < w; x++) {
      const o = y * (w * 3 + 1) + 1 + x * 3;
      raw[o] = 80 + Math.round(150 * x / w);
      raw[o + 1] = 70 + Math.round(120 * y / h);
      raw[o + 2] = 230 - Math.round(60 * x / w);
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; ihdr[9] = 2; ihdr[10] = 0; ihdr[11] = 0; ihdr[12] = 0;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0)),
  ]);
}

async function main() {
  const t0 = Date.now();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--use-fake-device-for-media-stream',
      '--use-fake-ui-for-media-stream',
      '--autoplay-policy=no-user-gesture-required',
      '--disable-dev-shm-usage',
    ],
  });
  log(`chromium ${browser.version()}`);
  const results = [];
  let failed = false;
  async function test(name, fn) {
    if (failed) { results.push([name, 'skipped']); log(`skip - ${name}`); return; }
    const start = Date.now();
    try {
      await fn();
      results.push([name, 'ok']);
      log(`ok - ${name} (${Date.now() - start} ms)`);
    } catch (e) {
      failed = true;
      results.push([name, 'failed']);
      log(`not ok - ${name}: ${e.stack || e}`);
      for (const [who, page] of Object.entries(pages)) {
        try { await shot(page, `failed-${who}`); } catch { /* closed */ }
      }
    }
  }

  let alice; let bob;
  let total = 0; // messages stored in room:lobby

  await test('sign-in page renders', async () => {
    const { page } = await newUser(browser, 'signin');
    await page.goto(BASE + '/');
    await page.getByRole('button', { name: 'Log in', exact: true }).waitFor();
    await page.getByRole('textbox', { name: 'Username', exact: true }).waitFor();
    await page.getByLabel('Password', { exact: true }).waitFor();
    await shot(page, 'desktop-signin');
    // Served from the binary with a strict policy, never cached stale.
    for (const [file, type] of [['/', 'text/html'], ['/app.js', 'text/javascript'], ['/style.css', 'text/css']]) {
      const res = await page.request.get(BASE + file);
      const h = res.headers();
      assert(res.status() === 200, `${file} served`);
      assert(h['content-type'].startsWith(type), `${file} is ${type} (${h['content-type']})`);
      assert(h['cache-control'] === 'no-cache', `${file} no-cache`);
      const csp = h['content-security-policy'] || '';
      assert(csp.includes("script-src 'self'") && csp.includes("connect-src 'self' ws: wss:") && !csp.includes('unsafe-inline'), `${file} CSP (${csp})`);
    }
    // Accounts: register, then log in, over the UI.
    await page.getByRole('textbox', { name: 'Username', exact: true }).fill('dora');
    await page.getByLabel('Password', { exact: true }).fill('correct horse');
    await page.getByRole('button', { name: 'Register', exact: true }).click();
    // Registering hashes the password twice (register, log in): slow in debug builds.
    await connected(page, 30000);
    assert((await page.locator('#me-name').textContent()) === 'dora', 'signed in as dora');
    await page.context().close();
    delete pages.signin;
    // A guest can't take an account's name (nor a look-alike), and is told why.
    const { page: impostor } = await newUser(browser, 'impostor');
    await impostor.goto(BASE + '/');
    await impostor.getByRole('textbox', { name: 'Name', exact: true }).fill('D0RA');
    await impostor.getByRole('button', { name: 'Connect', exact: true }).click();
    await until(async () => /account/.test(await impostor.locator('#signin-error').textContent()), 'the guest name refused');
    assert(await impostor.locator('#app').isHidden(), 'still signing in');
    await impostor.context().close();
    delete pages.impostor;
  });

  await test('registering right after failed logins signs in; an old error never stays on screen', async () => {
    const { page } = await newUser(browser, 'lena');
    await page.goto(BASE + '/');
    await page.getByRole('textbox', { name: 'Username', exact: true }).fill('dora');
    const pass = page.getByLabel('Password', { exact: true });
    // Five wrong passwords from this address: logins from it are slowed down now.
    for (let i = 0; i < 5; i++) {
      await pass.fill(`wrong password ${i}`);
      const answered = page.waitForResponse((r) => r.url().endsWith('/api/login'));
      await page.getByRole('button', { name: 'Log in', exact: true }).click();
      assert((await answered).status() === 401, 'a wrong password is refused');
      await until(async () => (await page.locator('#signin-error').textContent()) === 'Wrong username or password.', 'the error shown');
    }
    // Editing the form clears the error; a too-short password is the browser's to say.
    await pass.fill('short');
    await page.getByRole('button', { name: 'Register', exact: true }).click();
    assert((await page.locator('#signin-error').textContent()) === '', 'no old error next to the validation bubble');
    assert(await pass.evaluate((i) => !i.validity.valid), 'the browser refuses the short password');
    // Registering from the same address signs the new account in.
    await page.getByRole('textbox', { name: 'Username', exact: true }).fill('lena');
    await pass.fill('correct horse');
    await page.getByRole('button', { name: 'Register', exact: true }).click();
    await connected(page, 30000);
    assert((await page.locator('#me-name').textContent()) === 'lena', 'signed in as lena');
    await page.context().close();
    delete pages.lena;
  });

  await test('a sign-in is kept by every tab and signing out ends it in all of them', async () => {
    const kate = await newUser(browser, 'kate');
    await signInGuest(kate.page, 'kate');
    // After sign-in the keyboard starts in the page, not on its body.
    await until(async () => (await kate.page.evaluate(() => document.activeElement && document.activeElement.id)) === 'room-input', 'focus on the room box after sign-in');
    // attic has one member: "1 member", never "1 members".
    const attic = kate.page.locator('#public-list').getByRole('button', { name: /attic/ });
    await until(async () => (await attic.count()) === 1, 'attic listed');
    const sub = await attic.locator('.conv-sub').textContent();
    assert(/^1 member ·/.test(sub), `singular member count (${sub})`);
    // A second tab is signed in already.
    const tab = await kate.context.newPage();
    pages.kateTab = tab;
    await tab.goto(BASE + '/');
    await connected(tab);
    assert((await tab.locator('#me-name').textContent()) === 'kate', 'the second tab is kate');
    assert(await tab.locator('#signin').isHidden(), 'no sign-in asked');
    // Signing out in one tab signs out the other.
    await tab.getByRole('button', { name: 'Sign out', exact: true }).click();
    await until(async () => kate.page.locator('#signin').isVisible(), 'the first tab back at sign-in');
    await until(async () => tab.locator('#signin').isVisible(), 'the second tab at sign-in');
    assert(await kate.page.evaluate(() => localStorage.getItem('hubbub.auth')) === null, 'the sign-in is forgotten');
    await kate.context.close();
    delete pages.kate;
    delete pages.kateTab;
  });

  await test('two users chat in a room', async () => {
    alice = await newUser(browser, 'alice');
    bob = await newUser(browser, 'bob');
    await signInGuest(alice.page, 'alice');
    await signInGuest(bob.page, 'bob');
    await joinRoom(alice.page, 'lobby');
    await joinRoom(bob.page, 'lobby');

    await say(alice.page, 'Hello bob!');
    total++;
    const m = await seeMessage(bob.page, 'Hello bob!');
    assert(m.from === 'alice', 'sender shown');
    assert(/\d/.test(m.time || ''), 'time shown');

    // Typing indicator, then the Send button.
    await composer(bob.page).pressSequentially('hi al', { delay: 20 });
    await until(async () => (await alice.page.locator('#typing').textContent()) === 'bob is typing…', 'typing indicator');
    await composer(bob.page).pressSequentially('ice, how are you?');
    await bob.page.getByRole('button', { name: 'Send', exact: true }).click();
    total++;
    const r = await seeMessage(alice.page, 'hi alice, how are you?');
    assert(r.from === 'bob', 'reply from bob');
    await until(async () => (await alice.page.locator('#typing').textContent()) === '', 'typing indicator cleared');

    // Presence and receipts.
    await until(async () => (await alice.page.locator('#conv-sub').textContent()) === '2 online', 'room online count');
    await until(async () => (await alice.page.getByRole('log').textContent()).includes('Seen by bob'), 'seen by bob');
    await until(async () => (await alice.page.locator('#people .chip').filter({ hasText: 'bob' }).locator('.dot.on').count()) === 1, 'bob shown online');

    // A DM from bob shows up unread for alice, then opens.
    await bob.page.getByRole('textbox', { name: 'DM user', exact: true }).fill('alice');
    await bob.page.getByRole('button', { name: 'Start DM', exact: true }).click();
    await until(async () => (await bob.page.locator('#conv-title').textContent()) === 'alice', 'DM open');
    await say(bob.page, 'psst, alice');
    const dmItem = alice.page.locator('#dm-list').getByRole('button', { name: /bob/ });
    await until(async () => (await dmItem.locator('.badge').textContent()) === '1', 'unread badge on the DM');
    await dmItem.click();
    await seeMessage(alice.page, 'psst, alice');
    await until(async () => (await dmItem.locator('.badge').count()) === 0, 'badge cleared');
    await alice.page.locator('#room-list').getByRole('button', { name: /lobby/ }).click();
    await bob.page.locator('#room-list').getByRole('button', { name: /lobby/ }).click();
    await seeMessage(bob.page, 'Hello bob!');

    // Edit, then recall, one's own message.
    await say(alice.page, 'tpyo here');
    total++;
    await seeMessage(bob.page, 'tpyo here');
    const mine = alice.page.getByRole('log').locator('li.msg', { hasText: 'tpyo here' });
    await mine.hover();
    await mine.getByRole('button', { name: 'Edit message' }).click();
    await composer(alice.page).fill('typo fixed');
    await composer(alice.page).press('Enter');
    await seeMessage(bob.page, 'typo fixed');
    await until(async () => (await bob.page.getByRole('log').locator('li.msg', { hasText: 'typo fixed' }).locator('.edited').count()) === 1, 'edited mark');
    const fixed = alice.page.getByRole('log').locator('li.msg', { hasText: 'typo fixed' });
    await fixed.hover();
    await fixed.getByRole('button', { name: 'Recall message' }).click();
    await alice.page.getByRole('alertdialog').getByRole('button', { name: 'Recall', exact: true }).click();
    await until(async () => (await bob.page.getByRole('log').textContent()).includes('Message recalled'), 'recalled on the other side');
    assert(!(await bob.page.getByRole('log').textContent()).includes('typo fixed'), 'recalled text gone');

    // Image upload with an inline preview, file upload with a download link.
    await alice.page.getByLabel('Attach file').setInputFiles({ name: 'sunset.png', mimeType: 'image/png', buffer: makePng(240, 150) });
    total++;
    const img = bob.page.getByRole('log').locator('img.preview');
    await until(async () => (await img.count()) === 1 && await img.evaluate((i) => i.complete && i.naturalWidth === 240), 'image preview loaded');
    await alice.page.getByLabel('Attach file').setInputFiles({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('meeting notes\n') });
    total++;
    const link = bob.page.getByRole('log').getByRole('link', { name: /notes\.txt/ });
    await until(async () => (await link.count()) === 1, 'file link');
    const href = await link.getAttribute('href');
    assert(href.startsWith('/files/') && !/[?&](user|token)=/.test(href), `download link without a credential: ${href}`);
    const body = await bob.page.evaluate(async (u) => (await fetch(u)).text(), href);
    assert(body === 'meeting notes\n', 'download works');

    await say(bob.page, 'Nice picture!');
    total++;
    await seeMessage(alice.page, 'Nice picture!');
    await shot(alice.page, 'desktop-chat');
  });

  await test('reload shows the history, scrolling up loads older pages', async () => {
    // Enough messages for more than one history page.
    for (let i = 1; i <= 60; i++) { await say(alice.page, `filler ${i}`); total++; }
    await seeMessage(bob.page, 'filler 60');
    await bob.page.reload();
    await connected(bob.page);
    await until(async () => (await bob.page.locator('#conv-title').textContent()) === '# lobby', 'lobby reopened');
    await seeMessage(bob.page, 'filler 60');
    const first = await messages(bob.page);
    assert(first.length < total, `only the newest page at first (${first.length} of ${total})`);
    for (let i = 0; i < 10 && !(await messages(bob.page)).find((m) => m.text === 'Hello bob!'); i++) {
      await bob.page.getByRole('log').evaluate((l) => { l.scrollTop = 0; l.dispatchEvent(new Event('scroll')); });
      await bob.page.waitForTimeout(200);
    }
    await seeMessage(bob.page, 'Hello bob!');
    const all = await messages(bob.page);
    assert(all.length === total, `every message once after paging (${all.length} vs ${total})`);
    assertNoDuplicates(all, 'bob');
    await until(async () => (await bob.page.getByRole('log').textContent()).includes('This is the beginning of #lobby'), 'beginning marker');
  });

  await test('the keyboard reaches the attach button and scrolls the message list', async () => {
    const page = bob.page;
    const log = page.getByRole('log');
    assert((await log.getAttribute('tabindex')) === '0', 'the message list is focusable');
    await log.focus();
    assert(await page.evaluate(() => document.activeElement.id === 'log'), 'the message list has focus');
    const top = () => log.evaluate((l) => l.scrollTop);
    await page.keyboard.press('End');
    await until(async () => log.evaluate((l) => l.scrollHeight - l.scrollTop - l.clientHeight < 2), 'End goes to the bottom');
    const bottom = await top();
    await page.keyboard.press('PageUp');
    await until(async () => (await top()) < bottom - 100, 'PageUp scrolls up');
    const up = await top();
    await page.keyboard.press('PageDown');
    await until(async () => (await top()) > up + 100, 'PageDown scrolls down');
    await page.keyboard.press('Home');
    await until(async () => (await top()) === 0, 'Home goes to the top');
    await page.keyboard.press('End');
    // Shift+Tab from the message box reaches the attach button; Enter opens the picker.
    await composer(page).focus();
    await page.keyboard.press('Shift+Tab');
    assert(await page.evaluate(() => document.activeElement.id === 'attach-btn'), 'the attach button takes focus');
    // The picker opens by a click on the file input: count those clicks (and keep the
    // dialog shut). Waiting for playwright's filechooser event races with its interception
    // being switched on when the machine is busy.
    await page.evaluate(() => {
      window.pickerOpened = 0;
      document.querySelector('input[type=file]').addEventListener('click', (e) => { window.pickerOpened += 1; e.preventDefault(); });
    });
    await page.keyboard.press('Enter');
    await until(() => page.evaluate(() => window.pickerOpened > 0), 'Enter opens the file picker');
  });

  await test('message text is rendered as text, never HTML', async () => {
    const evil = '<img src=x onerror=alert(1)>';
    await say(alice.page, evil);
    total++;
    await seeMessage(bob.page, evil);
    await seeMessage(alice.page, evil);
    await bob.page.waitForTimeout(300);
    for (const p of [alice.page, bob.page]) {
      assert(await p.locator('img[src="x"]').count() === 0, 'no injected img element');
    }
    assert(dialogs.length === 0, `no dialog fired (${dialogs.join('; ')})`);
  });

  await test('rich text: links, bold, italic and code are built as nodes; HTML and other link schemes stay text', async () => {
    const rich = 'see https://example.com/a?b=1, then **bold** and *it* and `x < y`';
    await say(alice.page, rich);
    total++;
    const bubble = bob.page.getByRole('log').locator('li.msg', { hasText: 'then bold and it' }).locator('.bubble');
    await until(async () => (await bubble.count()) === 1, 'the rich message shown');
    const link = bubble.locator('a');
    assert(await link.getAttribute('href') === 'https://example.com/a?b=1', 'the link without the trailing comma');
    assert(await link.getAttribute('rel') === 'noopener noreferrer' && await link.getAttribute('target') === '_blank', 'the link opens apart');
    assert(await bubble.locator('strong').textContent() === 'bold' && await bubble.locator('em').textContent() === 'it', 'bold and italic');
    assert(await bubble.locator('code').textContent() === 'x < y', 'inline code');
    const block = 'look:\n```\nfn main() {\n  **not bold**\n}\n```';
    await say(alice.page, block);
    total++;
    const pre = bob.page.getByRole('log').locator('li.msg pre code').last();
    await until(async () => (await pre.count()) === 1 && (await pre.textContent()).includes('**not bold**'), 'a code block kept as it is');
    // Neither a javascript: link nor HTML inside markup is ever made into an element.
    const js = '[x](javascript:alert(1)) and javascript:alert(2)';
    await say(alice.page, js);
    total++;
    await seeMessage(bob.page, js);
    await say(alice.page, '**<b>x</b>**');
    total++;
    const strong = bob.page.getByRole('log').locator('li.msg strong', { hasText: '<b>x</b>' });
    await until(async () => (await strong.count()) === 1, 'the markup shown as text inside bold');
    for (const p of [alice.page, bob.page]) {
      assert(await p.getByRole('log').locator('a[href^="javascript"], .bubble .text b, .bubble .text img').count() === 0, 'no script link, no injected element');
      const hrefs = await p.getByRole('log').locator('.bubble a.msg-link').evaluateAll((as) => as.map((a) => a.href));
      assert(hrefs.every((h) => /^https?:/.test(h)), `only http(s) links (${hrefs.join(' ')})`);
    }
    assert(dialogs.length === 0, `no dialog fired (${dialogs.join('; ')})`);
  });

  // pat creates room:crew (its admin); quinn and rita join. quinn's socket runs through a
  // route the tests can cut.
  let pat; let quinn; let rita;
  const quinnLink = { away: false, live: null };
  const hide = (page, hidden) => page.evaluate((h) => {
    if (h) {
      Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => 'hidden' });
    } else {
      delete document.hidden;
      delete document.visibilityState;
    }
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
  const msgLi = (page, text) => page.getByRole('log').locator('li.msg').filter({ has: page.locator('.bubble', { hasText: text }) });

  await test('replies quote what they answer and lead back to it', async () => {
    pat = await newUser(browser, 'pat');
    quinn = await newUser(browser, 'quinn');
    rita = await newUser(browser, 'rita');
    await quinn.context.routeWebSocket((url) => url.pathname === '/ws', (ws) => {
      if (quinnLink.away) { ws.close({ code: 1012, reason: 'away' }); return; }
      const server = ws.connectToServer();
      quinnLink.live = { ws, server };
    });
    // Notifications: recorded, with the permission asked for on a gesture only.
    await quinn.context.addInitScript(() => {
      window.__notes = [];
      window.__asked = 0;
      // The answer is kept across reloads, as a browser keeps it.
      const kept = () => { try { return localStorage.getItem('test.permission') || 'default'; } catch { return 'default'; } };
      class FakeNotification {
        constructor(title, opts) { window.__notes.push({ title, body: opts && opts.body }); }
        static get permission() { return kept(); }
        static requestPermission() {
          window.__asked++;
          localStorage.setItem('test.permission', 'granted');
          return Promise.resolve('granted');
        }
        close() {}
      }
      window.Notification = FakeNotification;
    });
    for (const [u, n] of [[pat, 'pat'], [quinn, 'quinn'], [rita, 'rita']]) await signInGuest(u.page, n);
    for (const u of [pat, quinn, rita]) await joinRoom(u.page, 'crew');
    assert(await quinn.page.evaluate(() => window.__asked) === 0, 'no notification permission asked on load or by other clicks');
    await quinn.page.getByRole('button', { name: 'Turn on notifications', exact: true }).click();
    await until(async () => (await quinn.page.evaluate(() => window.__asked)) === 1, 'permission asked by the button');
    await until(async () => quinn.page.getByRole('button', { name: 'Turn on notifications', exact: true }).isHidden(), 'the button gone once allowed');
    await say(pat.page, 'the plan is ready');
    await seeMessage(quinn.page, 'the plan is ready');
    // Reply, then cancel with Escape: nothing is quoted.
    await msgLi(quinn.page, 'the plan is ready').hover();
    await msgLi(quinn.page, 'the plan is ready').getByRole('button', { name: 'Reply to message' }).click();
    await until(async () => (await quinn.page.locator('#reply-bar').textContent()).includes('pat'), 'the reply bar names pat');
    assert((await quinn.page.locator('#reply-bar').textContent()).includes('the plan is ready'), 'the reply bar shows the excerpt');
    await composer(quinn.page).press('Escape');
    assert(await quinn.page.locator('#reply-bar').isHidden(), 'Escape cancels the reply');
    // 55 more messages: the answered one is then out of the first history page.
    for (let i = 1; i <= 55; i++) await say(pat.page, `crew filler ${i}`);
    await seeMessage(quinn.page, 'crew filler 55');
    await msgLi(quinn.page, 'the plan is ready').hover();
    await msgLi(quinn.page, 'the plan is ready').getByRole('button', { name: 'Reply to message' }).click();
    await quinn.page.locator('#reply-bar').waitFor();
    await say(quinn.page, 'sounds good');
    await seeMessage(pat.page, 'sounds good');
    const quote = msgLi(pat.page, 'sounds good').locator('.quote');
    await until(async () => (await quote.textContent()) === 'patthe plan is ready', 'the quote shows sender and excerpt');
    assert(await quinn.page.locator('#reply-bar').isHidden(), 'the reply bar closes once sent');
    // After a reload only the newest page is held: the quote fetches the rest and shows it.
    await pat.page.reload();
    await connected(pat.page);
    await seeMessage(pat.page, 'sounds good');
    assert(countOf(await messages(pat.page), 'the plan is ready') === 0, 'the answered message is not loaded yet');
    await msgLi(pat.page, 'sounds good').locator('.quote').click();
    const target = msgLi(pat.page, 'the plan is ready');
    await until(async () => (await target.count()) === 1 && (await target.getAttribute('class')).includes('flash'), 'the answered message highlighted');
    assert(await target.isVisible() && await target.evaluate((li) => {
      const r = li.getBoundingClientRect(); const l = li.parentElement.getBoundingClientRect();
      return r.top >= l.top && r.bottom <= l.bottom;
    }), 'the answered message scrolled into view');
    assertNoDuplicates(await messages(pat.page), 'pat');
    // A reply to a message recalled later says so.
    await say(pat.page, 'soon gone');
    await seeMessage(quinn.page, 'soon gone');
    await msgLi(quinn.page, 'soon gone').hover();
    await msgLi(quinn.page, 'soon gone').getByRole('button', { name: 'Reply to message' }).click();
    await say(quinn.page, 'what was that?');
    await seeMessage(pat.page, 'what was that?');
    await msgLi(pat.page, 'soon gone').hover();
    await msgLi(pat.page, 'soon gone').getByRole('button', { name: 'Recall message' }).click();
    await pat.page.getByRole('alertdialog').getByRole('button', { name: 'Recall', exact: true }).click();
    await quinn.page.reload();
    await connected(quinn.page);
    const gone = msgLi(quinn.page, 'what was that?').locator('.quote');
    await until(async () => (await gone.textContent()) === 'patMessage recalled', 'the quote of a recalled message');
  });

  await test('reactions: picked, counted with who reacted, removed by a click, live and after a reconnect', async () => {
    const on = (page, text) => msgLi(page, text).locator('.reaction');
    await msgLi(pat.page, 'sounds good').hover();
    await msgLi(pat.page, 'sounds good').getByRole('button', { name: 'Add reaction' }).click();
    await pat.page.getByRole('button', { name: 'React with 👍' }).click();
    await until(async () => (await on(quinn.page, 'sounds good').textContent()) === '👍1', 'quinn sees 👍 1');
    assert(await on(quinn.page, 'sounds good').getAttribute('title') === 'pat', 'who reacted in the title');
    await on(quinn.page, 'sounds good').click();
    await until(async () => (await on(pat.page, 'sounds good').textContent()) === '👍2', 'pat sees 👍 2');
    assert(await on(pat.page, 'sounds good').getAttribute('title') === 'pat, quinn', 'both named');
    await on(pat.page, 'sounds good').click();
    await until(async () => (await on(quinn.page, 'sounds good').textContent()) === '👍1'
      && (await on(quinn.page, 'sounds good').getAttribute('title')) === 'quinn', 'pat\'s own reaction removed');
    // quinn is away while pat reacts: the catch-up brings it.
    quinnLink.away = true;
    quinnLink.live.server.close();
    quinnLink.live.ws.close({ code: 1006, reason: 'gone' });
    await until(async () => (await quinn.page.locator('#conn-status').textContent()) !== 'Connected', 'quinn sees the disconnect');
    await msgLi(pat.page, 'sounds good').hover();
    await msgLi(pat.page, 'sounds good').getByRole('button', { name: 'Add reaction' }).click();
    await pat.page.getByRole('button', { name: 'React with 🎉' }).click();
    await until(async () => (await on(pat.page, 'sounds good').count()) === 2, 'pat sees two emoji');
    quinnLink.away = false;
    await connected(quinn.page, 20000);
    await until(async () => (await on(quinn.page, 'sounds good').allTextContents()).sort().join(' ') === ['👍1', '🎉1'].sort().join(' '), 'the reaction made while away', 15000);
    await shot(quinn.page, 'desktop-replies-reactions');
  });

  await test('mentions: autocomplete from the members, highlighted, counted apart; notifications and the title while hidden; a New messages divider', async () => {
    const input = composer(quinn.page);
    await input.fill('');
    await input.pressSequentially('hi @');
    const list = quinn.page.getByRole('listbox', { name: 'Mention someone' });
    await until(async () => (await list.getByRole('option').allTextContents()).join() === 'pat,rita', 'pat and rita offered');
    await input.press('ArrowDown');
    assert(await list.getByRole('option', { selected: true }).textContent() === 'rita', 'the arrow moves');
    await input.press('Tab');
    assert(await input.inputValue() === 'hi @rita ', `Tab picks (${await input.inputValue()})`);
    assert(await list.isHidden(), 'the list closes');
    await input.pressSequentially('and @p');
    await until(async () => list.isVisible(), 'the list again');
    await input.press('Escape');
    assert(await list.isHidden() && await input.inputValue() === 'hi @rita and @p', 'Escape closes the list only');
    await input.pressSequentially('a');
    await until(async () => (await list.getByRole('option').allTextContents()).join() === 'pat', 'pat offered');
    await shot(quinn.page, 'desktop-mention');
    await input.press('Enter');
    assert(await input.inputValue() === 'hi @rita and @pat ', 'Enter picks');
    await input.press('Enter');
    const sent = msgLi(pat.page, 'hi @rita and @pat');
    await until(async () => (await sent.locator('.mention.to-me').textContent()) === '@pat', 'pat sees the mention of pat highlighted');
    assert(await sent.locator('.mention').count() === 2, 'both mentions shown');

    // quinn looks at another room; the mentions of crew are counted apart.
    await pat.page.locator('#room-list').getByRole('button', { name: /crew/ }).waitFor();
    await joinRoom(quinn.page, 'side');
    await hide(quinn.page, true);
    await say(pat.page, 'plain news');
    await say(pat.page, 'over to you @quinn.');
    const crewItem = quinn.page.locator('#room-list').getByRole('button', { name: /crew/ });
    await until(async () => (await crewItem.locator('.mention-badge').textContent()) === '@1', 'a mention badge');
    await until(async () => (await crewItem.locator('.badge').textContent()) === '2', 'the unread count apart');
    await until(async () => (await quinn.page.title()) === '(2) hubbub', 'the unread total in the title');
    await until(async () => (await quinn.page.evaluate(() => window.__notes)).some((n) => n.title === 'pat in #crew' && n.body === 'over to you @quinn.'), 'a notification for the mention');
    assert(!(await quinn.page.evaluate(() => window.__notes)).some((n) => n.body === 'plain news'), 'no notification for a plain room message');
    // A DM while hidden notifies too.
    await pat.page.getByRole('textbox', { name: 'DM user', exact: true }).fill('quinn');
    await pat.page.getByRole('button', { name: 'Start DM', exact: true }).click();
    await until(async () => (await pat.page.locator('#conv-title').textContent()) === 'quinn', 'DM open');
    await say(pat.page, 'a word in private');
    await until(async () => (await quinn.page.evaluate(() => window.__notes)).some((n) => n.title === 'pat' && n.body === 'a word in private'), 'a notification for the DM');
    await until(async () => (await quinn.page.title()) === '(3) hubbub', 'the title counts the DM');
    await hide(quinn.page, false);
    // After a reload the counts come from the server; opening crew reads them.
    await quinn.page.reload();
    await connected(quinn.page);
    await until(async () => (await crewItem.locator('.mention-badge').textContent()) === '@1', 'the mention badge after a reload');
    await crewItem.click();
    await seeMessage(quinn.page, 'over to you @quinn.');
    const divider = quinn.page.getByRole('log').locator('li.msg.unread-start');
    await until(async () => (await divider.count()) === 1, 'a New messages divider');
    assert((await divider.locator('.bubble').textContent()) === 'plain news', 'at the first unread message');
    assert((await divider.locator('.new-divider').textContent()) === 'New messages', 'the divider says so');
    assert(await msgLi(quinn.page, 'over to you @quinn.').locator('.mention.to-me').count() === 1, 'the mention of quinn highlighted');
    await until(async () => (await crewItem.locator('.mention-badge').count()) === 0, 'the mention badge gone once read');
    await until(async () => (await quinn.page.title()) === '(1) hubbub', 'the title counts what is left unread');
  });

  await test('search lists highlighted results safely, pages on, narrows to a conversation and opens a result at its message', async () => {
    await pat.page.locator('#room-list').getByRole('button', { name: /crew/ }).click();
    await say(pat.page, '<b>deploy</b> tonight');
    await joinRoom(pat.page, 'side');
    await say(pat.page, 'crew filler in side');
    await seeMessage(quinn.page, '<b>deploy</b> tonight');
    const page = quinn.page;
    await page.getByRole('searchbox', { name: 'Search messages' }).fill('deplo');
    await page.getByRole('button', { name: 'Search', exact: true }).click();
    const hits = page.locator('#search-results .search-hit');
    await until(async () => (await hits.count()) === 1, 'one result');
    assert(await hits.locator('mark').textContent() === 'deploy', 'the match marked');
    assert(await hits.locator('.hit-text').textContent() === '<b>deploy</b> tonight', 'the text shown as text');
    assert(await page.locator('#search-results b').count() === 0, 'no element from the message');
    assert((await hits.locator('.hit-conv').textContent()) === '#crew' && (await hits.locator('.hit-from').textContent()) === 'pat', 'conversation and sender');
    assert(/^Today, .*\d/.test(await hits.locator('.hit-time').textContent()), `a date (${await hits.locator('.hit-time').textContent()})`);
    // More than a page, then only this conversation.
    await page.getByRole('searchbox', { name: 'Search messages' }).fill('crew filler');
    await page.getByRole('button', { name: 'Search', exact: true }).click();
    await until(async () => (await hits.count()) === 20, 'a first page of 20');
    assert((await hits.first().locator('.hit-conv').textContent()) === '#side', 'newest first, every conversation');
    await page.getByRole('button', { name: 'More results' }).click();
    await until(async () => (await hits.count()) === 40, 'the next page');
    await shot(page, 'desktop-search');
    await page.locator('#room-list').getByRole('button', { name: /crew/ }).click();
    await page.getByLabel('This conversation only').check();
    await page.getByRole('button', { name: 'Search', exact: true }).click();
    await until(async () => (await hits.count()) === 20 && !(await hits.locator('.hit-conv').allTextContents()).includes('#side'), 'only #crew');
    // A result whose message is not loaded: opened there, loaded, highlighted.
    await page.reload();
    await connected(page);
    await page.getByRole('searchbox', { name: 'Search messages' }).fill('plan ready');
    await page.getByRole('button', { name: 'Search', exact: true }).click();
    await until(async () => (await hits.count()) === 1, 'the old message found');
    await hits.click();
    const target = msgLi(page, 'the plan is ready');
    await until(async () => (await target.count()) === 1 && (await target.getAttribute('class')).includes('flash'), 'opened at the result, highlighted');
    assertNoDuplicates(await messages(page), 'quinn');
  });

  await test('room members: a panel with roles and presence; an admin removes a member, who loses the room', async () => {
    await quinn.page.getByRole('button', { name: 'Members', exact: true }).click();
    const qList = quinn.page.locator('#member-list .member');
    await until(async () => (await qList.count()) === 3, 'three members');
    assert((await quinn.page.locator('#member-list .member', { hasText: 'pat' }).locator('.role').textContent()) === 'admin', 'pat is the admin');
    await until(async () => (await quinn.page.locator('#member-list .member', { hasText: 'rita' }).locator('.dot.on').count()) === 1, 'rita online');
    assert(await quinn.page.getByRole('button', { name: /^Remove / }).count() === 0, 'no Remove for a member');
    await pat.page.locator('#room-list').getByRole('button', { name: /crew/ }).click();
    await pat.page.getByRole('button', { name: 'Members', exact: true }).click();
    await shot(pat.page, 'desktop-members');
    await pat.page.getByRole('button', { name: 'Remove rita' }).click();
    await pat.page.getByRole('alertdialog').getByRole('button', { name: 'Remove', exact: true }).click();
    await until(async () => /removed from #crew by pat/.test(await rita.page.locator('#toast').textContent()), 'rita is told');
    await until(async () => (await rita.page.locator('#room-list').getByRole('button', { name: /crew/ }).count()) === 0, 'crew gone from rita\'s list');
    assert(await rita.page.getByRole('log').isHidden(), 'the room closed for rita');
    await until(async () => (await quinn.page.getByRole('log').locator('li.event').textContent()) === 'rita was removed by pat', 'quinn sees who removed rita');
    await until(async () => (await qList.count()) === 2, 'the panel updated');
    assert(dialogs.length === 0, `no browser dialog (${dialogs.join('; ')})`);
    for (const [u, n] of [[pat, 'pat'], [quinn, 'quinn'], [rita, 'rita']]) { await u.context.close(); delete pages[n]; }
  });

  await test('leaving a room: asked in the page, gone from the list, the others see who left', async () => {
    const nora = await newUser(browser, 'nora');
    const otto = await newUser(browser, 'otto');
    await signInGuest(nora.page, 'nora');
    await signInGuest(otto.page, 'otto');
    await joinRoom(nora.page, 'porch');
    await joinRoom(otto.page, 'porch');
    await say(otto.page, 'hello porch');
    await seeMessage(nora.page, 'hello porch');
    const porch = (u) => u.page.locator('#room-list').getByRole('button', { name: /porch/ });
    const leave = otto.page.getByRole('button', { name: 'Leave room', exact: true });
    // Cancel keeps the room.
    await leave.click();
    await otto.page.getByRole('alertdialog').getByRole('button', { name: 'Cancel', exact: true }).click();
    assert(await otto.page.getByRole('alertdialog').isHidden() && await porch(otto).count() === 1, 'cancel keeps the room');
    await leave.click();
    assert(/Leave #porch\?/.test(await otto.page.locator('#confirm-text').textContent()), 'the question names the room');
    await otto.page.getByRole('alertdialog').getByRole('button', { name: 'Leave', exact: true }).click();
    await until(async () => (await porch(otto).count()) === 0, 'porch gone from otto\'s list');
    assert(await otto.page.getByRole('log').isHidden(), 'the room closed for otto');
    assert(await leave.isHidden(), 'no Leave room without a room open');
    await until(async () => (await nora.page.getByRole('log').locator('li.event').textContent()) === 'otto left', 'nora sees that otto left');
    // The server agrees: otto is no longer a member.
    const members = await nora.page.evaluate(async () => (await (await fetch('/api/rooms/porch/members?user=nora')).json()).members.map((m) => m.user));
    assert(members.includes('nora') && !members.includes('otto'), `otto not a member any more (${members.join(',')})`);
    assert(dialogs.length === 0, `no browser dialog (${dialogs.join('; ')})`);
    for (const [u, n] of [[nora, 'nora'], [otto, 'otto']]) { await u.context.close(); delete pages[n]; }
  });

  await test('a pasted image and a dropped file are sent like attachments; a drop target shows while dragging', async () => {
    const nora = await newUser(browser, 'nora');
    const otto = await newUser(browser, 'otto');
    await signInGuest(nora.page, 'nora');
    await signInGuest(otto.page, 'otto');
    await joinRoom(nora.page, 'yard');
    await joinRoom(otto.page, 'yard');
    await say(nora.page, 'files coming');
    await seeMessage(otto.page, 'files coming');
    await composer(nora.page).click();
    await nora.page.evaluate((bytes) => {
      const dt = new DataTransfer();
      dt.items.add(new File([new Uint8Array(bytes)], 'x.png', { type: 'image/png' }));
      document.getElementById('message-input').dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
    }, [...makePng(48, 36)]);
    const img = otto.page.getByRole('log').locator('img.preview');
    await until(async () => (await img.count()) === 1 && await img.evaluate((i) => i.complete && i.naturalWidth === 48 && i.alt === 'x.png'), 'the pasted image seen by otto');
    assert((await composer(nora.page).inputValue()) === '', 'nothing pasted as text');
    // Dragging a file over the conversation shows the drop target; dropping sends it.
    const dragOver = (type) => nora.page.evaluate((t) => {
      const dt = new DataTransfer();
      dt.items.add(new File(['dropped notes\n'], 'dropped.txt', { type: 'text/plain' }));
      window.__dt = dt;
      document.getElementById('log').dispatchEvent(new DragEvent(t, { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, type);
    await dragOver('dragenter');
    await dragOver('dragover');
    assert(await nora.page.locator('#drop-target').isVisible(), 'a drop target while dragging');
    assert(/Drop to send to #yard/.test(await nora.page.locator('#drop-target').textContent()), 'the drop target names the room');
    await shot(nora.page, 'desktop-drop');
    await nora.page.evaluate(() => document.getElementById('log').dispatchEvent(new DragEvent('drop', { dataTransfer: window.__dt, bubbles: true, cancelable: true })));
    assert(await nora.page.locator('#drop-target').isHidden(), 'the drop target gone after the drop');
    const link = otto.page.getByRole('log').getByRole('link', { name: /dropped\.txt/ });
    await until(async () => (await link.count()) === 1, 'the dropped file seen by otto');
    const body = await otto.page.evaluate(async (u) => (await fetch(u)).text(), await link.getAttribute('href'));
    assert(body === 'dropped notes\n', 'the dropped file downloads');
    // A drag that leaves again hides the target and sends nothing.
    await dragOver('dragenter');
    await nora.page.evaluate(() => document.getElementById('log').dispatchEvent(new DragEvent('dragleave', { dataTransfer: window.__dt, bubbles: true })));
    assert(await nora.page.locator('#drop-target').isHidden(), 'the drop target gone when the drag leaves');
    for (const [u, n] of [[nora, 'nora'], [otto, 'otto']]) { await u.context.close(); delete pages[n]; }
  });

  await test('dark mode follows the system setting', async () => {
    const nora = await newUser(browser, 'nora');
    await signInGuest(nora.page, 'nora');
    await joinRoom(nora.page, 'porch');
    await seeMessage(nora.page, 'hello porch');
    // The luminance (0..1) of what shows behind an element, and of its text.
    const looks = () => nora.page.evaluate(() => {
      const rgb = (s) => (s.match(/[\d.]+/g) || []).map(Number);
      const lum = ([r, g, b]) => {
        const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
      };
      const bg = (e) => {
        for (; e; e = e.parentElement) {
          const c = rgb(getComputedStyle(e).backgroundColor);
          if (c.length === 3 || c[3] > 0) return lum(c);
        }
        return 1;
      };
      const out = {};
      for (const [k, sel] of Object.entries({ body: 'body', log: '#log', sidebar: '.sidebar', composer: '#message-input', bubble: '#log li.msg:not(.mine) .bubble' })) {
        const e = document.querySelector(sel);
        out[k] = { bg: bg(e), text: lum(rgb(getComputedStyle(e).color)) };
      }
      return out;
    });
    const light = await looks();
    for (const [k, v] of Object.entries(light)) assert(v.bg > 0.6 && v.text < 0.2, `${k} light by default (${JSON.stringify(v)})`);
    await nora.page.emulateMedia({ colorScheme: 'dark' });
    const dark = await looks();
    for (const [k, v] of Object.entries(dark)) assert(v.bg < 0.05 && v.text > 0.6, `${k} dark with a dark system setting (${JSON.stringify(v)})`);
    await shot(nora.page, 'desktop-dark');
    await nora.page.emulateMedia({ colorScheme: 'light' });
    const back = await looks();
    assert(back.log.bg > 0.6, 'light again');
    await nora.context.close();
    delete pages.nora;
  });

  await test('day separators and dates, grouping kept by them and by a confirmed recall', async () => {
    await joinRoom(alice.page, 'days');
    const texts = ['old 1', 'old 2', 'yesterday 1', 'yesterday 2', 'today 1', 'today 2', 'today 3'];
    for (const t of texts) { await say(alice.page, t); await seeMessage(alice.page, t); }
    // bob's history says the first two were written nine days ago and the next two
    // yesterday (the server stamps messages itself: the test changes the page it reads).
    const at = await bob.page.evaluate(() => {
      const day = (ago) => { const d = new Date(); d.setDate(d.getDate() - ago); d.setHours(10, 37, 0, 0); return d.getTime(); };
      return { old: day(9), yesterday: day(1) };
    });
    const stamps = { 1: at.old, 2: at.old + 60000, 3: at.yesterday, 4: at.yesterday + 60000 };
    await bob.page.route((u) => u.pathname.includes('room%3Adays'), async (route) => {
      const res = await route.fetch();
      const body = await res.json();
      for (const m of body.messages || []) if (stamps[m.seq]) m.ts = stamps[m.seq];
      await route.fulfill({ response: res, json: body });
    });
    await joinRoom(bob.page, 'days');
    await seeMessage(bob.page, 'today 3');
    const items = await logItems(bob.page);
    const shape = items.map((i) => (i.sep !== undefined ? `[${i.sep}]` : `${i.text}${i.cont ? '+' : ''}`));
    assert(shape.length === 10 && /^\[(?!Today|Yesterday).*\d{4}\]$/.test(shape[0]), `a dated separator first (${shape.join(' ')})`);
    assert(shape.slice(1).join(' ') === 'old 1 old 2+ [Yesterday] yesterday 1 yesterday 2+ [Today] today 1 today 2+ today 3+', `separators between days, groups within them (${shape.join(' ')})`);
    const old = items[1];
    const year = String(new Date(at.old).getFullYear());
    assert(old.title.includes(year), `the date in the time's tooltip (${old.title})`);
    const today = items[8];
    assert(!today.time.includes(',') && old.time.length > today.time.length, `a date next to older times (${old.time} / ${today.time})`);
    await bob.page.unroute((u) => u.pathname.includes('room%3Adays'));

    // Recall asks first, in the page; Cancel keeps the message.
    const middle = alice.page.getByRole('log').locator('li.msg', { hasText: 'today 2' });
    await middle.hover();
    await middle.getByRole('button', { name: 'Recall message' }).click();
    const ask = alice.page.getByRole('alertdialog');
    await ask.waitFor({ timeout: 3000 });
    await ask.getByRole('button', { name: 'Cancel', exact: true }).click();
    await alice.page.waitForTimeout(300);
    assert(!(await alice.page.getByRole('log').textContent()).includes('Message recalled'), 'Cancel recalls nothing');
    await middle.hover();
    await middle.getByRole('button', { name: 'Recall message' }).click();
    await ask.getByRole('button', { name: 'Recall', exact: true }).click();
    // For alice every message is of today; for bob the last three follow "Today".
    for (const [p, want] of [[alice.page, 'true,true,true'], [bob.page, 'false,true,true']]) {
      await until(async () => (await p.getByRole('log').textContent()).includes('Message recalled'), 'recalled');
      const after = (await logItems(p)).filter((i) => i.sep === undefined).slice(-3);
      assert(after.map((i) => i.cont).join() === want, `the group stays whole after a recall (${JSON.stringify(after)})`);
    }
    assert(dialogs.length === 0, `no browser dialog (${dialogs.join('; ')})`);
    for (const p of [alice.page, bob.page]) {
      await p.locator('#room-list').getByRole('button', { name: /lobby/ }).click();
      await until(async () => (await p.locator('#conv-title').textContent()) === '# lobby', 'back in the lobby');
      await seeMessage(p, '<img src=x onerror=alert(1)>');
    }
  });

  await test('a DM with someone who does not exist is refused, not listed', async () => {
    const page = alice.page;
    await page.getByRole('textbox', { name: 'DM user', exact: true }).fill('nobody-here');
    await page.getByRole('button', { name: 'Start DM', exact: true }).click();
    await until(async () => /nobody-here/.test(await page.locator('#toast').textContent()), 'an error shown');
    await page.waitForTimeout(300);
    assert((await page.locator('#dm-list').getByRole('button', { name: /nobody-here/ }).count()) === 0, 'no DM entry for nobody-here');
  });

  await test('attachment URLs carry no credential and a foreign URL is never ours', async () => {
    const erin = await newUser(browser, 'erin');
    const requested = [];
    erin.page.on('request', (r) => requested.push(r.url()));
    await erin.page.goto(BASE + '/');
    await erin.page.getByRole('textbox', { name: 'Username', exact: true }).fill('erin');
    await erin.page.getByLabel('Password', { exact: true }).fill('correct horse');
    await erin.page.getByRole('button', { name: 'Register', exact: true }).click();
    await connected(erin.page, 30000);
    // room:attic holds a message stored with the URL `/\evil.example/x`, which a browser
    // reads as //evil.example/x: it must not be shown as a link of ours.
    await joinRoom(erin.page, 'attic');
    const log = erin.page.getByRole('log');
    await until(async () => (await log.textContent()).includes('report.pdf'), 'the stored attachment shown');
    const links = async () => log.locator('[href], [src]').evaluateAll((els) => els.map((e) => e.getAttribute('href') || e.getAttribute('src')));
    for (const u of await links()) {
      assert(!u.includes('evil.example'), `no link to another host: ${u}`);
    }
    // An upload of erin's own shows and loads with the file pass cookie alone.
    await erin.page.getByLabel('Attach file').setInputFiles({ name: 'dot.png', mimeType: 'image/png', buffer: makePng(32, 20) });
    const img = log.locator('img.preview');
    await until(async () => (await img.count()) === 1 && await img.evaluate((i) => i.complete && i.naturalWidth === 32), 'own image loaded');
    for (const u of await links()) {
      assert(!/[?&](token|user)=/.test(u), `no credential in ${u}`);
      const abs = new URL(u, BASE);
      assert(abs.origin === new URL(BASE).origin || abs.protocol === 'https:', `ours or https: ${u}`);
    }
    const leaked = requested.filter((u) => /[?&]token=/.test(u));
    assert(leaked.length === 0, `no HTTP request carries the token: ${leaked.join(' ')}`);
    const pass = (await erin.context.cookies()).find((c) => c.name === 'hubbub_files');
    assert(pass && pass.httpOnly && pass.sameSite === 'Strict' && pass.path === '/files/', `file pass cookie: ${JSON.stringify(pass)}`);
    await erin.context.close();
    delete pages.erin;
  });

  await test('reconnect after a server restart shows missed messages exactly once', async () => {
    // Alice goes offline (so she cannot reconnect early), then the server restarts.
    await alice.context.setOffline(true);
    const answer = await control('RESTART');
    assert(answer === 'RESTARTED', `server restarted (${answer})`);
    await until(async () => (await alice.page.locator('#conn-status').textContent()) !== 'Connected', 'alice sees the disconnect');
    await connected(bob.page);
    await bob.page.waitForTimeout(300);
    assert((await alice.page.locator('#conn-status').textContent()) !== 'Connected', 'alice is still offline');
    // Sent while alice is away: three from bob, one typed by alice herself.
    for (const t of ['while you were away 1', 'while you were away 2', 'while you were away 3']) {
      await say(bob.page, t);
      total++;
      await seeMessage(bob.page, t);
    }
    await say(alice.page, 'typed while offline');
    total++;
    await until(async () => (await messages(alice.page)).find((m) => m.text === 'typed while offline' && m.pending), 'pending message');
    await shot(alice.page, 'desktop-offline');
    await alice.context.setOffline(false);
    await connected(alice.page);
    for (const t of ['while you were away 1', 'while you were away 2', 'while you were away 3', 'typed while offline']) {
      await seeMessage(alice.page, t);
      await seeMessage(bob.page, t);
    }
    await alice.page.waitForTimeout(500);
    const a = await messages(alice.page);
    const b = await messages(bob.page);
    for (const list of [a, b]) {
      for (const t of ['while you were away 1', 'while you were away 2', 'while you were away 3', 'typed while offline', 'Hello bob!']) {
        assert(countOf(list, t) === 1, `"${t}" shown exactly once`);
      }
    }
    assertNoDuplicates(a, 'alice');
    assertNoDuplicates(b, 'bob');
    assert(a.length === total && b.length === total, `every message on both screens (${a.length}, ${b.length}, ${total})`);
    assert(a.every((m) => !m.pending), 'nothing left pending');
    // Live traffic works again both ways.
    await say(alice.page, 'back online');
    total++;
    await seeMessage(bob.page, 'back online');
  });

  await test('presence is unknown while disconnected and asked again after reconnecting', async () => {
    const bobDot = alice.page.locator('#dm-list').getByRole('button', { name: /bob/ }).locator('.dot.presence');
    await until(async () => (await bobDot.getAttribute('class')).includes(' on'), 'bob online at first');
    await alice.context.setOffline(true);
    const answer = await control('RESTART');
    assert(answer === 'RESTARTED', `server restarted (${answer})`);
    await until(async () => (await alice.page.locator('#conn-status').textContent()) !== 'Connected', 'alice sees the disconnect');
    await until(async () => (await bobDot.getAttribute('class')).includes('unknown'), 'bob grey while alice is away');
    assert((await alice.page.locator('#people .chip .dot.on').count()) === 0, 'nobody green in the room while away');
    await alice.context.setOffline(false);
    await connected(alice.page, 20000);
    await connected(bob.page, 20000);
    await until(async () => (await bobDot.getAttribute('class')).includes(' on'), 'bob online again after the reconnect', 15000);
  });

  await test('an edit made while away is shown after a catch-up that was first cut short', async () => {
    // gwen's socket runs through a route this test controls: it cuts the socket, keeps
    // gwen away for a while, then cuts the first `sync` of her next connection.
    const gwen = await newUser(browser, 'gwen');
    const frank = await newUser(browser, 'frank');
    let away = false;
    let cutNextSync = false;
    let syncsCut = 0;
    let live = null;
    await gwen.context.routeWebSocket((url) => url.pathname === '/ws', (ws) => {
      if (away) { ws.close({ code: 1012, reason: 'away' }); return; }
      const server = ws.connectToServer();
      live = { ws, server };
      ws.onMessage((msg) => {
        if (cutNextSync && typeof msg === 'string' && msg.includes('"type":"sync"')) {
          cutNextSync = false;
          syncsCut++;
          server.close();
          ws.close({ code: 1011, reason: 'cut' });
          return;
        }
        server.send(msg);
      });
    });
    await signInGuest(frank.page, 'frank');
    await joinRoom(frank.page, 'quiet');
    await say(frank.page, 'draft one');
    await signInGuest(gwen.page, 'gwen');
    await joinRoom(gwen.page, 'quiet');
    await seeMessage(gwen.page, 'draft one');

    away = true;
    live.server.close();
    live.ws.close({ code: 1006, reason: 'gone' });
    await until(async () => (await gwen.page.locator('#conn-status').textContent()) !== 'Connected', 'gwen sees the disconnect');
    // While gwen is away, frank edits his message.
    const draft = frank.page.getByRole('log').locator('li.msg', { hasText: 'draft one' });
    await draft.hover();
    await draft.getByRole('button', { name: 'Edit message' }).click();
    await composer(frank.page).fill('final one');
    await composer(frank.page).press('Enter');
    await until(async () => (await frank.page.getByRole('log').locator('li.msg', { hasText: 'final one' }).locator('.edited').count()) === 1, 'the edit stored');
    assert((await gwen.page.locator('#conn-status').textContent()) !== 'Connected', 'gwen is still away');

    // gwen comes back; her first catch-up is cut short, the next one must still replay
    // the edit made before either of them.
    cutNextSync = true;
    away = false;
    await until(async () => syncsCut === 1, 'the first sync cut', 15000);
    await connected(gwen.page);
    await seeMessage(gwen.page, 'final one', 15000);
    const shown = await messages(gwen.page);
    assert(countOf(shown, 'draft one') === 0 && countOf(shown, 'final one') === 1, 'only the edited text is shown');
    await frank.context.close();
    await gwen.context.close();
    delete pages.gwen;
    delete pages.frank;
  });

  await test('video call between two pages connects', async () => {
    await alice.page.locator('#dm-list').getByRole('button', { name: /bob/ }).click();
    await until(async () => (await alice.page.locator('#conv-title').textContent()) === 'bob', 'DM with bob open');
    await alice.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await bob.page.getByText('Incoming call from alice').waitFor({ timeout: 8000 });
    await bob.page.getByRole('button', { name: 'Accept', exact: true }).click();
    for (const p of [alice.page, bob.page]) {
      await p.getByText(/Call connected/).waitFor({ timeout: 15000 });
      await until(() => p.evaluate(() => document.getElementById('remote-video').videoWidth > 0), 'remote video frames', 10000);
    }
    await shot(alice.page, 'desktop-call');
    await alice.page.getByRole('button', { name: 'Hang up', exact: true }).click();
    await bob.page.getByText('Call ended').waitFor({ timeout: 8000 });
  });

  let ivan; let judy;
  await test('an audio call never asks for the camera; mute and camera off', async () => {
    ivan = await newUser(browser, 'ivan');
    judy = await newUser(browser, 'judy');
    await recordMedia(ivan.context);
    await recordMedia(judy.context);
    await signInGuest(ivan.page, 'ivan');
    await signInGuest(judy.page, 'judy');
    await ivan.page.getByRole('textbox', { name: 'DM user', exact: true }).fill('judy');
    await ivan.page.getByRole('button', { name: 'Start DM', exact: true }).click();
    await until(async () => (await ivan.page.locator('#conv-title').textContent()) === 'judy', 'DM open');
    await say(ivan.page, 'call you?');
    await judy.page.locator('#dm-list').getByRole('button', { name: /ivan/ }).click();
    await seeMessage(judy.page, 'call you?');

    await ivan.page.getByRole('button', { name: 'Audio call', exact: true }).click();
    await judy.page.getByText('Incoming audio call from ivan').waitFor({ timeout: 8000 });
    await judy.page.getByRole('button', { name: 'Accept', exact: true }).click();
    for (const p of [ivan.page, judy.page]) await p.getByText(/Call connected/).waitFor({ timeout: 15000 });
    for (const p of [ivan.page, judy.page]) {
      const asked = await p.evaluate(() => window.__gum);
      assert(asked.length === 1 && asked.every((c) => c.audio && !c.video), `audio only asked for (${JSON.stringify(asked)})`);
    }
    assert(await ivan.page.locator('#call-camera').isHidden(), 'no camera button in an audio call');
    await ivan.page.getByRole('button', { name: 'Mute', exact: true }).click();
    await ivan.page.getByRole('button', { name: 'Unmute', exact: true }).waitFor();
    assert(await ivan.page.evaluate(() => window.__streams[0].getAudioTracks().every((t) => !t.enabled)), 'the microphone is muted');
    await ivan.page.getByRole('button', { name: 'Hang up', exact: true }).click();
    await judy.page.getByText('Call ended').waitFor({ timeout: 8000 });

    // A video call: the camera can be turned off and the microphone muted.
    await until(async () => ivan.page.getByRole('button', { name: 'Video call', exact: true }).isVisible(), 'call button back');
    await ivan.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await judy.page.getByText('Incoming call from ivan').waitFor({ timeout: 8000 });
    await judy.page.getByRole('button', { name: 'Accept', exact: true }).click();
    for (const p of [ivan.page, judy.page]) await p.getByText(/Call connected/).waitFor({ timeout: 15000 });
    await ivan.page.getByRole('button', { name: 'Camera off', exact: true }).click();
    await ivan.page.getByRole('button', { name: 'Camera on', exact: true }).waitFor();
    await ivan.page.getByRole('button', { name: 'Mute', exact: true }).click();
    const tracks = await ivan.page.evaluate(() => window.__streams.at(-1).getTracks().map((t) => `${t.kind}:${t.enabled}`).sort().join());
    assert(tracks === 'audio:false,video:false', `camera and microphone off (${tracks})`);
    await ivan.page.getByRole('button', { name: 'Camera on', exact: true }).click();
    assert(await ivan.page.evaluate(() => window.__streams.at(-1).getVideoTracks().every((t) => t.enabled)), 'camera on again');
    await judy.page.getByRole('button', { name: 'Hang up', exact: true }).click();
    await ivan.page.getByText('Call ended').waitFor({ timeout: 8000 });
    await until(() => mediaStopped(ivan.page), 'ivan\'s camera and microphone stopped');
  });

  await test('a ringing call is cancelled by the caller or declined by the callee', async () => {
    await until(async () => ivan.page.getByRole('button', { name: 'Video call', exact: true }).isVisible(), 'call button back');
    await ivan.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await judy.page.getByText('Incoming call from ivan').waitFor({ timeout: 8000 });
    await ivan.page.getByRole('button', { name: 'Cancel', exact: true }).click();
    await judy.page.getByText('ivan cancelled the call').waitFor({ timeout: 8000 });
    assert(await judy.page.getByRole('button', { name: 'Accept', exact: true }).isHidden(), 'the ringing is over for judy');
    await until(() => mediaStopped(ivan.page), 'the caller\'s camera stopped');

    await until(async () => ivan.page.getByRole('button', { name: 'Video call', exact: true }).isVisible(), 'call button back');
    await ivan.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await judy.page.getByText('Incoming call from ivan').waitFor({ timeout: 8000 });
    await judy.page.getByRole('button', { name: 'Decline', exact: true }).click();
    await ivan.page.getByText('judy declined').waitFor({ timeout: 8000 });
    await until(() => mediaStopped(ivan.page), 'the caller\'s camera stopped');
  });

  await test('an unanswered call stops ringing after the ring time', async () => {
    // The ring time is 40 s; the test shortens it for this page only.
    await ivan.page.evaluate(() => { window.HUBBUB_RING_MS = 1500; });
    await until(async () => ivan.page.getByRole('button', { name: 'Video call', exact: true }).isVisible(), 'call button back');
    await ivan.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await judy.page.getByText('Incoming call from ivan').waitFor({ timeout: 8000 });
    await until(async () => (await callTexts(ivan.page)).endsWith('No answer'), 'No answer', 8000)
      .catch(async (e) => { throw new Error(`${e.message}: ivan saw ${await callTexts(ivan.page)}`); });
    await until(() => mediaStopped(ivan.page), 'the camera and microphone stopped');
    assert(await ivan.page.evaluate(() => document.getElementById('local-video').srcObject === null), 'no local picture');
    await until(async () => judy.page.getByRole('button', { name: 'Accept', exact: true }).isHidden(), 'the callee stops ringing');
    await ivan.page.evaluate(() => { delete window.HUBBUB_RING_MS; });
  });

  await test('a ringing call ends at once when the callee goes offline', async () => {
    await until(async () => ivan.page.getByRole('button', { name: 'Video call', exact: true }).isVisible(), 'call button back');
    await ivan.page.getByRole('button', { name: 'Video call', exact: true }).click();
    await judy.page.getByText('Incoming call from ivan').waitFor({ timeout: 8000 });
    await judy.context.close();
    delete pages.judy;
    // The call bar says it for a moment only: read what it said.
    await until(async () => (await callTexts(ivan.page)).endsWith('judy is offline'), 'judy is offline', 8000)
      .catch(async (e) => { throw new Error(`${e.message}: ivan saw ${await callTexts(ivan.page)}`); });
    await until(() => mediaStopped(ivan.page), 'the camera and microphone stopped');
    await ivan.context.close();
    delete pages.ivan;
  });

  await test('phone layout', async () => {
    const carol = await newUser(browser, 'carol', { width: 390, height: 844 }, { isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    const page = carol.page;
    await page.goto(BASE + '/');
    await page.getByRole('textbox', { name: 'Name', exact: true }).waitFor();
    await shot(page, 'phone-signin');
    await page.getByRole('textbox', { name: 'Name', exact: true }).fill('carol');
    await page.getByRole('button', { name: 'Connect', exact: true }).click();
    await connected(page);
    await joinRoom(page, 'lobby');
    await seeMessage(page, 'back online');
    assert(!(await page.locator('.sidebar').isVisible()), 'sidebar hidden while a conversation is open');
    const box = await page.getByRole('log').boundingBox();
    assert(box && box.width > 350, `log uses the full width (${box && box.width})`);
    await say(page, 'Hi from my phone — ça va ?');
    await seeMessage(bob.page, 'Hi from my phone — ça va ?');
    await shot(page, 'phone-chat');
    await page.getByRole('button', { name: 'Back to conversations' }).click();
    await page.locator('.sidebar').waitFor();
    assert(!(await page.getByRole('log').isVisible()), 'conversation hidden on the list view');
    await shot(page, 'phone-list');
  });

  if (pageErrors.length) {
    log(`page errors: ${pageErrors.join('; ')}`);
  }
  await browser.close();
  const passed = results.filter((r) => r[1] === 'ok').length;
  const bad = results.length - passed;
  log(`browser tests: ${passed} passed, ${bad} failed (${Date.now() - t0} ms)`);
  process.exit(bad === 0 && pageErrors.length === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
