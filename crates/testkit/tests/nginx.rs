//! nginx with the deployed configuration: what it passes to a node, a node that is down,
//! clean-up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use hubbub_testkit::{free_port, NginxServer};

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !matches!(stat.rsplit_once(')'), Some((_, rest)) if rest.trim_start().starts_with('Z')))
}

/// A node that answers `requests` requests with the request head it received as the
/// body, one connection each (`Connection: close`).
fn echo_node(requests: usize) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let thread = thread::spawn(move || {
        for _ in 0..requests {
            let (stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut stream = reader.into_inner();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                head.len()
            );
        }
    });
    (addr, thread)
}

/// One request to nginx; the response (head and body, by its `content-length`).
fn request(nginx: &NginxServer, head: &str) -> String {
    let mut stream = TcpStream::connect(nginx.addr()).expect("connect to nginx");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(head.as_bytes()).expect("send");
    let mut reader = BufReader::new(stream);
    let mut response = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).expect("response head") == 0 {
            return response;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().expect("content-length");
            }
        }
        response.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("response body");
    response + &String::from_utf8_lossy(&body)
}

#[test]
fn nginx_passes_host_client_address_and_websocket_headers_to_the_node() {
    let (node, served) = echo_node(2);
    let nginx = NginxServer::start(&[node]);
    assert!(nginx.config().contains(&format!("server {node} ")));

    let plain = request(
        &nginx,
        "GET /api/rooms HTTP/1.1\r\nHost: chat.example.com:8443\r\nX-Forwarded-For: 192.0.2.1\r\n\
         Connection: close\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(plain.starts_with("http/1.1 200"), "{plain}");
    assert!(plain.contains("host: chat.example.com:8443\r\n"), "{plain}");
    assert!(
        plain.contains("x-forwarded-for: 192.0.2.1, 127.0.0.1\r\n"),
        "nginx appends the address it saw: {plain}"
    );
    assert!(plain.contains("x-real-ip: 127.0.0.1\r\n"), "{plain}");
    assert!(plain.contains("x-forwarded-proto: http\r\n"), "{plain}");
    assert!(
        plain.contains(" http/1.1\r\n"),
        "HTTP/1.1 to the node: {plain}"
    );
    assert!(
        !plain.contains("\r\nupgrade:") && !plain.contains("connection: upgrade"),
        "no upgrade asked for: {plain}"
    );

    let upgrade = request(
        &nginx,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(upgrade.contains("upgrade: websocket\r\n"), "{upgrade}");
    assert!(upgrade.contains("connection: upgrade\r\n"), "{upgrade}");
    served.join().expect("node thread");
}

#[test]
fn a_node_that_is_down_is_passed_over_and_nginx_stops_with_its_workers_on_drop() {
    let down: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (up, served) = echo_node(4);
    let nginx = NginxServer::start(&[down, up]);
    for i in 0..4 {
        let answer = request(
            &nginx,
            &format!("GET /healthz?{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    served.join().expect("node thread");

    let (pid, dir) = (nginx.pid(), nginx.dir().to_owned());
    let workers: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    == Some(pid.to_string().as_str())
            })
        })
        .collect();
    assert_eq!(workers.len(), 1, "one worker");
    assert!(alive(pid));
    drop(nginx);
    assert!(!alive(pid), "dropping it stops nginx");
    assert!(workers.iter().all(|w| !alive(*w)), "and its worker");
    assert!(!dir.exists(), "and removes {}", dir.display());
}
