// Rich text, built safely: a message's text is cut into tokens (code blocks, inline
// code, **bold**, *italic*, http(s) links, @mentions) and each token becomes DOM nodes
// made with createElement and text nodes. Nothing from a message is ever read as HTML,
// and a link is made only of an http: or https: URL.

const URL_RE = /https?:\/\/[^\s<>"'`]+/y;
const TRAILING = /[.,;:!?)\]}'"]+$/;
const NAME_CHARS = /[A-Za-z0-9_.-]/;

/** An http(s) URL as the browser will read it, or null. */
export function safeLink(text) {
  let url;
  try { url = new URL(text); } catch { return null; }
  return url.protocol === 'http:' || url.protocol === 'https:' ? url.href : null;
}

function link(text) {
  const href = safeLink(text);
  if (!href) return document.createTextNode(text);
  const a = document.createElement('a');
  a.href = href;
  a.target = '_blank';
  a.rel = 'noopener noreferrer';
  a.className = 'msg-link';
  a.textContent = text;
  return a;
}

/**
 * Inline tokens of `text` appended to `parent`. `opts.mentions`: names the server found
 * mentioned (shown as mentions); `opts.me`: the user, whose mentions stand out.
 */
function inline(parent, text, opts, depth = 0) {
  let plain = '';
  const flush = () => { if (plain) { parent.append(document.createTextNode(plain)); plain = ''; } };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    const prev = i > 0 ? text[i - 1] : '';
    if (ch === '`') {
      const end = text.indexOf('`', i + 1);
      if (end > i + 1) {
        flush();
        const code = document.createElement('code');
        code.textContent = text.slice(i + 1, end);
        parent.append(code);
        i = end + 1;
        continue;
      }
    }
    if (ch === '*' && depth < 4) {
      const strong = text.startsWith('**', i);
      const mark = strong ? '**' : '*';
      const from = i + mark.length;
      const end = text.indexOf(mark, from);
      if (end > from && !/\s/.test(text[from]) && !/\s/.test(text[end - 1])) {
        flush();
        const node = document.createElement(strong ? 'strong' : 'em');
        inline(node, text.slice(from, end), opts, depth + 1);
        parent.append(node);
        i = end + mark.length;
        continue;
      }
    }
    if ((ch === 'h' || ch === 'H') && !NAME_CHARS.test(prev)) {
      URL_RE.lastIndex = i;
      const m = URL_RE.exec(text);
      if (m) {
        let u = m[0];
        const trail = u.match(TRAILING);
        if (trail) u = u.slice(0, u.length - trail[0].length);
        if (u.length > 'https://'.length) {
          flush();
          parent.append(link(u));
          i += u.length;
          continue;
        }
      }
    }
    if (ch === '@' && !NAME_CHARS.test(prev) && opts.mentions && opts.mentions.length) {
      const word = /^[A-Za-z0-9_.-]+/.exec(text.slice(i + 1));
      let name = word ? word[0] : '';
      if (!opts.mentions.includes(name)) name = name.replace(/\.+$/, '');
      if (!opts.mentions.includes(name)) name = '';
      if (name) {
        flush();
        const span = document.createElement('span');
        span.className = name === opts.me ? 'mention to-me' : 'mention';
        span.textContent = '@' + name;
        parent.append(span);
        i += 1 + name.length;
        continue;
      }
    }
    plain += ch;
    i++;
  }
  flush();
}

/** The message text `text` as a fragment of safe nodes. */
export function richText(text, opts = {}) {
  const frag = document.createDocumentFragment();
  const parts = text.split('```');
  // Odd parts are code blocks, when the block is closed.
  parts.forEach((part, k) => {
    const closed = k % 2 === 1 && k < parts.length - 1;
    if (closed) {
      const pre = document.createElement('pre');
      const code = document.createElement('code');
      code.textContent = part.replace(/^[A-Za-z0-9_+-]*\n/, '').replace(/\n$/, '');
      pre.append(code);
      frag.append(pre);
    } else {
      inline(frag, k % 2 === 1 ? '```' + part : part, opts);
    }
  });
  return frag;
}

/**
 * A search highlight (`[`match`]` marks the matches) as text nodes and <mark> elements.
 */
export function highlighted(text) {
  const frag = document.createDocumentFragment();
  let buf = '';
  let inMark = false;
  const flush = () => {
    if (!buf) return;
    if (inMark) {
      const m = document.createElement('mark');
      m.textContent = buf;
      frag.append(m);
    } else {
      frag.append(document.createTextNode(buf));
    }
    buf = '';
  };
  for (const ch of text) {
    if (ch === '[' && !inMark) { flush(); inMark = true; } else if (ch === ']' && inMark) { flush(); inMark = false; } else buf += ch;
  }
  flush();
  return frag;
}
