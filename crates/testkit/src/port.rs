//! Free loopback ports.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// A `127.0.0.1` port that nothing listened on a moment ago: the kernel picks it for a
/// listener bound to port 0, which is then closed. A port is handed out at most once per
/// process, so parallel tests in one process never get the same one; another process
/// can still take it before the server binds it, so the servers here retry on another
/// port when theirs turns out to be in use.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        drop(listener);
        if given.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("no free 127.0.0.1 port that this process has not handed out already");
}
