//! Real PostgreSQL servers: start, databases, immediate stop and start again, clean-up.

use std::path::Path;
use std::thread;
use std::time::Instant;

use hubbub_testkit::PgServer;

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !matches!(stat.rsplit_once(')'), Some((_, rest)) if rest.trim_start().starts_with('Z')))
}

#[test]
fn a_server_keeps_committed_rows_across_an_immediate_stop_and_removes_its_dir() {
    let began = Instant::now();
    let mut pg = PgServer::start();
    eprintln!("PgServer::start took {:?}", began.elapsed());

    let url = pg.create_database();
    let prefix = format!("postgres://postgres@127.0.0.1:{}/", pg.port());
    let db = url
        .strip_prefix(&prefix)
        .expect("the database URL")
        .to_owned();
    assert_ne!(pg.create_database(), url, "each database has its own name");
    assert_eq!(pg.url(&db), url);
    assert_eq!(pg.psql(&db, "SHOW listen_addresses"), "127.0.0.1");
    assert_eq!(pg.psql(&db, "SHOW max_connections"), "300");
    assert_eq!(pg.psql(&db, "SHOW synchronous_commit"), "on");
    pg.psql(&db, "CREATE TABLE t (v int); INSERT INTO t VALUES (42)");

    let (pid, port, dir) = (pg.pid(), pg.port(), pg.dir().to_owned());
    assert!(alive(pid));
    pg.stop_immediate();
    assert!(
        !alive(pid),
        "the postmaster is gone after an immediate stop"
    );

    let began = Instant::now();
    pg.start_again();
    eprintln!(
        "start_again after an immediate stop took {:?}",
        began.elapsed()
    );
    assert_eq!(pg.port(), port);
    assert_ne!(pg.pid(), pid);
    assert_eq!(pg.psql(&db, "SELECT v FROM t"), "42");

    pg.stop();
    pg.start_again();
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "1");

    let pid = pg.pid();
    drop(pg);
    assert!(!alive(pid), "dropping the server stops it");
    assert!(
        !dir.exists(),
        "dropping the server removes {}",
        dir.display()
    );
}

#[test]
fn parallel_servers_each_get_a_port_and_a_dir() {
    let servers: Vec<PgServer> = (0..3)
        .map(|_| thread::spawn(PgServer::start))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("a server starts"))
        .collect();
    let mut ports: Vec<u16> = servers.iter().map(PgServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for pg in &servers {
        assert_eq!(pg.psql("postgres", "SELECT 1"), "1");
        let url = pg.create_database();
        assert!(url.ends_with("/test_1"), "{url}");
    }
    let dirs: Vec<_> = servers.iter().map(|pg| pg.dir().to_owned()).collect();
    drop(servers);
    assert!(dirs.iter().all(|dir| !Path::new(dir).exists()));
}
