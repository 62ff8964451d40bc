// Message search: the sidebar's search box asks GET /api/search and lists the results
// (conversation, sender, date, the matching text with its matches marked); "More
// results" follows `next`; a result opens its conversation at that message.
// The highlight is cut at `[` and `]` into text nodes and <mark> elements, never HTML.

import { highlighted } from './render.js';

const $ = (id) => document.getElementById(id);

/**
 * @param {object} ui api(path), el(tag, cls, text), timeText(ts), convTitle(id),
 *   current() (the open conversation's id or null), open(conv, seq), toast(text)
 */
export function initSearch(ui) {
  let query = null; // { q, conv }
  let next = null;
  let busy = false;

  async function run(more) {
    if (busy || !query) return;
    busy = true;
    const params = new URLSearchParams({ q: query.q, limit: '20' });
    if (query.conv) params.set('conv', query.conv);
    if (more && next) params.set('before', next);
    $('search-status').textContent = 'Searching…';
    try {
      const r = await ui.api(`/api/search?${params}`);
      if (!more) $('search-results').replaceChildren();
      for (const hit of r.results || []) $('search-results').append(item(hit));
      next = r.next || null;
      const n = $('search-results').children.length;
      $('search-status').textContent = n === 0 ? 'No messages found' : `${n}${next ? '+' : ''} ${n === 1 ? 'result' : 'results'}`;
      $('search-more').hidden = !next;
    } catch (e) {
      $('search-status').textContent = e.status === 429
        ? `Too many searches; try again in ${e.retryAfter || 1} s.`
        : `Search failed: ${e.message}`;
    } finally {
      busy = false;
    }
  }

  function item(hit) {
    const li = ui.el('li');
    const b = ui.el('button', 'search-hit');
    b.type = 'button';
    const head = ui.el('span', 'hit-head');
    head.append(
      ui.el('span', 'hit-conv', ui.convTitle(hit.conv)),
      ui.el('span', 'hit-from', hit.from),
      ui.el('time', 'hit-time', ui.timeText(hit.ts)),
    );
    const t = head.lastElementChild;
    t.dateTime = new Date(hit.ts).toISOString();
    t.title = new Date(hit.ts).toLocaleString([], { dateStyle: 'full', timeStyle: 'short' });
    const text = ui.el('span', 'hit-text');
    text.append(highlighted(typeof hit.highlight === 'string' ? hit.highlight : String(hit.content || '')));
    b.append(head, text);
    b.addEventListener('click', () => ui.open(hit.conv, hit.seq));
    li.append(b);
    return li;
  }

  $('search-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const q = $('search-input').value.trim();
    if (!q) return;
    const here = $('search-here').checked ? ui.current() : null;
    if ($('search-here').checked && !here) { ui.toast('Open a conversation to search in it.'); return; }
    query = { q, conv: here };
    next = null;
    $('search-panel').hidden = false;
    run(false);
  });
  $('search-more').addEventListener('click', () => run(true));
  $('search-close').addEventListener('click', () => {
    $('search-panel').hidden = true;
    $('search-results').replaceChildren();
    query = null;
  });
}
