// Desktop notifications and the unread total in the tab title. Permission is asked by a
// button in the sidebar ("Turn on notifications"; browsers refuse, or nag, when asked on
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
 * The button that asks for permission: shown while the browser has not been asked yet,
 * so that the request always comes from a click meant for it (never on load, and never
 * taking the user activation another control needs, such as a file picker).
 */
export function permissionButton(btn) {
  const show = () => { btn.hidden = !supported() || Notification.permission !== 'default'; };
  btn.addEventListener('click', async () => {
    try { await Notification.requestPermission(); } catch { /* dismissed */ }
    show();
  });
  show();
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
