//! Real Redis servers: start, PING, kill and start again, clean-up.

use std::io::{Read, Write};
use std::net::TcpStream;

use hubbub_testkit::RedisServer;

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !matches!(stat.rsplit_once(')'), Some((_, rest)) if rest.trim_start().starts_with('Z')))
}

/// One RESP command on a new connection; the first reply line.
fn command(redis: &RedisServer, args: &[&str]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", redis.port())).expect("connect");
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request += &format!("${}\r\n{arg}\r\n", arg.len());
    }
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).expect("reply");
        reply.push(byte[0]);
    }
    String::from_utf8(reply)
        .expect("text")
        .trim_end()
        .to_owned()
}

#[test]
fn a_server_answers_dies_by_sigkill_and_starts_again_empty_on_its_port() {
    let mut redis = RedisServer::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert!(redis.ping());
    assert_eq!(command(&redis, &["SET", "k", "v"]), "+OK");
    assert_eq!(command(&redis, &["EXISTS", "k"]), ":1");

    let (pid, port, dir) = (redis.pid(), redis.port(), redis.dir().to_owned());
    assert!(alive(pid));
    redis.kill();
    assert!(!alive(pid));
    assert!(!redis.ping());

    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), pid);
    assert!(redis.ping());
    assert_eq!(command(&redis, &["EXISTS", "k"]), ":0", "nothing persisted");

    let pid = redis.pid();
    drop(redis);
    assert!(!alive(pid), "dropping the server kills it");
    assert!(
        !dir.exists(),
        "dropping the server removes {}",
        dir.display()
    );
}

#[test]
fn parallel_servers_each_get_a_port() {
    let servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 4);
    assert!(servers.iter().all(RedisServer::ping));
}
