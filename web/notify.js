// Desktop notifications and the unread total in the tab title. Permission is asked after
// the first click or form submission in the page (browsers refuse, or nag, when asked on
// load), and a notification is shown only while the page is hidden.

const BASE_TITLE = 'hubbub';

export function setUnreadTitle(total) {
  const want = total > 0 ? `(${total > 99 ? '99+' : total}) ${BASE_TITLE}` : BASE_TITLE;
  if (document.title !== want) document.title = want;
}

function supported() {
  return typeof window.Notification === 'function';
}

/**
 * Asks for permission after the first click or form submission of the page. The request
 * waits until the gesture's own handlers ran, so that it never takes the user activation
 * another control needs (a file picker opens only with one).
 */
export function askOnGesture() {
  const events = ['click', 'submit'];
  const ask = (ev) => {
    if (ev.target instanceof Element && ev.target.closest('#attach-btn, input[type="file"]')) return;
    for (const e of events) window.removeEventListener(e, ask, true);
    setTimeout(() => {
      if (!supported() || Notification.permission !== 'default') return;
      try {
        const r = Notification.requestPermission();
        if (r && typeof r.catch === 'function') r.catch(() => {});
      } catch { /* old browsers: callback form only */ }
    }, 0);
  };
  for (const e of events) window.addEventListener(e, ask, true);
}

/**
 * Shows a notification when the page is hidden and permission was granted; `onClick`
 * runs when it is clicked (the page is focused first).
 */
export function notify(title, body, tag, onClick) {
  if (!document.hidden || !supported() || Notification.permission !== 'granted') return false;
  try {
    const n = new Notification(title, { body, tag });
    n.onclick = () => {
      window.focus();
      onClick();
      n.close();
    };
    return true;
  } catch {
    return false;
  }
}
