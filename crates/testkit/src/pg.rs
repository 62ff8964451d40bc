//! A PostgreSQL server in a temp dir.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;

use crate::port::free_port;
use crate::process::{
    self, alive, effective_uid, kill_9, launch_retrying, log_tail, poll_until, run, Failed,
};

/// How long `pg_ctl` may wait for the server to start or stop (its `-t`).
const PG_CTL_WAIT_SECS: u64 = 30;
/// A little more than that for the `pg_ctl` process itself.
const PG_CTL_LIMIT: Duration = Duration::from_secs(PG_CTL_WAIT_SECS + 15);
/// Starts that fail because another process took the port just before.
const PORT_ATTEMPTS: usize = 5;

/// A PostgreSQL server of its own: a fresh cluster in a temp dir, listening on a free
/// `127.0.0.1` port (its Unix socket in the temp dir), user `postgres` with trust
/// authentication. Dropping it stops it (fast shutdown) and removes the temp dir.
///
/// The temp dir is made in `HUBBUB_TESTKIT_TMPDIR` when that is set, else in `/dev/shm`
/// when that memory file system has 4 GiB free, else in the system temp dir.
///
/// The binaries are PostgreSQL 15's from Debian (`/usr/lib/postgresql/15/bin`), else the
/// newest `/usr/lib/postgresql/*/bin`; `HUBBUB_TESTKIT_PG_BIN` names another dir. As
/// root, the server runs as user `postgres` (through `runuser`), since PostgreSQL refuses
/// to run as root. The cluster is a copy of a template made by `initdb` once per machine
/// (cached in the system temp dir, per major version and owner), which is much faster
/// than running `initdb` for each server.
///
/// Settings: `max_connections = 300`, `synchronous_commit = on` (a commit returns once
/// its WAL is written, so a stopped or killed server keeps it), `fsync = off` (nothing
/// waits for the disk: what a server loses to an operating system crash does not matter
/// here, and a start after an immediate stop would otherwise fsync the whole data dir,
/// seconds on a slow disk), locale C, encoding UTF8. The server's log is `postgres.log`
/// in [`PgServer::dir`].
pub struct PgServer {
    bin: &'static Binaries,
    port: u16,
    running: bool,
    /// Started with TLS on (see [`PgServer::require_tls`]).
    tls: bool,
    next_db: AtomicU32,
    // Last, so that the server is stopped before the dir goes.
    dir: TempDir,
}

impl PgServer {
    /// Starts a fresh server; panics (with the tail of its log) when it does not start.
    pub fn start() -> PgServer {
        let mut server = PgServer::prepare();
        launch_retrying(
            "PostgreSQL did not start",
            PORT_ATTEMPTS,
            || {},
            || {
                server.port = free_port();
                server.write_config();
                server.launch()
            },
        );
        server
    }

    /// A stopped server: its temp dir with a copy of the template, no port yet.
    fn prepare() -> PgServer {
        let bin = Binaries::get();
        let dir = tempfile::Builder::new()
            .prefix("hubbub-testkit-pg-")
            .tempdir_in(cluster_parent())
            .expect("create a temp dir for PostgreSQL");
        bin.give(dir.path());
        let data = dir.path().join("data");
        match template(bin) {
            Some(template) => {
                let copy = run(
                    Command::new("cp")
                        .arg("-a")
                        .arg("--")
                        .arg(&template)
                        .arg(&data),
                    Duration::from_secs(60),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    copy.status.success(),
                    "copying the PostgreSQL template {}: {}",
                    template.display(),
                    copy.describe()
                );
            }
            None => initdb(bin, &data),
        }
        let sock = dir.path().join("sock");
        fs::create_dir(&sock).expect("create the socket dir");
        bin.give(&sock);

        PgServer {
            bin,
            port: 0,
            running: false,
            tls: false,
            next_db: AtomicU32::new(0),
            dir,
        }
    }

    /// The URL of database `db`: `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database with a name unique on this server and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("test_{}", self.next_db.fetch_add(1, Ordering::Relaxed) + 1);
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in database `db` with `psql` and returns what it printed: rows one a
    /// line, columns separated by `|`, no headers. Panics when a statement fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname={} connect_timeout=10",
            self.port,
            quote(db)
        );
        let mut cmd = Command::new(self.bin.dir.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&conninfo)
            .arg("-c")
            .arg(sql);
        clear_pg_env(&mut cmd);
        let out = run(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "psql on port {} ({sql}): {}",
            self.port,
            out.describe()
        );
        out.stdout
            .strip_suffix('\n')
            .unwrap_or(&out.stdout)
            .to_owned()
    }

    /// The port it listens on (the same after [`PgServer::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's PID, from `postmaster.pid`. Panics when the server is stopped.
    pub fn pid(&self) -> u32 {
        assert!(self.running, "the PostgreSQL server is stopped");
        self.pid_file()
            .unwrap_or_else(|| panic!("no PID in {}", self.pid_path().display()))
    }

    /// The temp dir: `data/` (the cluster), `sock/` (the Unix socket), `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server at once (`pg_ctl -m immediate`): no checkpoint, clients cut off,
    /// crash recovery on the next start; PostgreSQL's equivalent of `kill -9`.
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    /// Stops the server cleanly (`pg_ctl -m fast`: clients are disconnected).
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// Restarts the server with TLS required on its TCP port: a certificate for
    /// `127.0.0.1` signed by a fresh test CA (made with `openssl`), and `hostssl` as the
    /// only TCP entry of `pg_hba.conf`, so a connection without TLS is refused. Returns
    /// the CA certificate's path (PEM), for the client to verify the server with.
    pub fn require_tls(&mut self) -> PathBuf {
        let data = self.data();
        let ca_key = self.dir.path().join("ca.key");
        let ca = self.dir.path().join("ca.crt");
        let csr = self.dir.path().join("server.csr");
        let ext = self.dir.path().join("server.ext");
        let key = data.join("server.key");
        let crt = data.join("server.crt");
        fs::write(&ext, "subjectAltName = IP:127.0.0.1\n").expect("write server.ext");
        let openssl = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args);
            let out = run(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
            assert!(out.status.success(), "openssl {args:?}: {}", out.describe());
        };
        let p = |path: &Path| path.display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=hubbub-testkit CA",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&ca),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &p(&key),
            "-out",
            &p(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p(&ext),
            "-out",
            &p(&crt),
        ]);
        for f in [&key, &crt] {
            self.bin.give(f);
        }
        let mut perms = fs::metadata(&key).expect("server.key").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        fs::set_permissions(&key, perms).expect("chmod server.key");
        let hba = data.join("pg_hba.conf");
        fs::write(
            &hba,
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("write pg_hba.conf");
        self.bin.give(&hba);
        self.tls = true;
        if self.running {
            self.stop();
        }
        self.write_config();
        self.start_again();
        ca
    }

    /// Starts the stopped server again: same data dir, same port. Panics when it does
    /// not start, or when the port stays taken for a few seconds.
    pub fn start_again(&mut self) {
        assert!(!self.running, "the PostgreSQL server is already running");
        launch_retrying(
            "PostgreSQL did not start again",
            20,
            || std::thread::sleep(Duration::from_millis(250)),
            || self.launch(),
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn pid_path(&self) -> PathBuf {
        self.data().join("postmaster.pid")
    }

    fn pid_file(&self) -> Option<u32> {
        let text = fs::read_to_string(self.pid_path()).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// This server's settings, in `postgresql.auto.conf` (read after `postgresql.conf`).
    fn write_config(&self) {
        let sock = self.dir.path().join("sock");
        let config = format!(
            "# hubbub-testkit: this test server's settings\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             synchronous_commit = on\n\
             fsync = off\n\
             {}",
            self.port,
            sock.display().to_string().replace('\'', "''"),
            if self.tls {
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            } else {
                ""
            }
        );
        let path = self.data().join("postgresql.auto.conf");
        fs::write(&path, config).expect("write postgresql.auto.conf");
        self.bin.give(&path);
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    fn launch(&mut self) -> Result<(), Failed> {
        let log = self.log();
        let log_before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.bin.cmd("pg_ctl");
        cmd.arg("-D").arg(self.data()).arg("-l").arg(&log).args([
            "-w",
            "-t",
            &PG_CTL_WAIT_SECS.to_string(),
            "-s",
            "start",
        ]);
        let outcome = run(&mut cmd, PG_CTL_LIMIT);
        if let Ok(out) = &outcome {
            if out.status.success() {
                self.running = true;
                return Ok(());
            }
        }
        // pg_ctl gave up, but the postmaster may be running (or starting) still.
        self.kill_postmaster();
        let why = match outcome {
            Ok(out) => format!("pg_ctl start: {}", out.describe()),
            Err(e) => e,
        };
        let new_log = fs::read(&log)
            .map(|bytes| String::from_utf8_lossy(&bytes[log_before as usize..]).into_owned())
            .unwrap_or_default();
        let why = format!("{why}\n{}", log_tail(&log));
        if new_log.contains("Address already in use") {
            Err(Failed::PortInUse(why))
        } else {
            Err(Failed::Other(why))
        }
    }

    fn stop_mode(&mut self, mode: &str) {
        if let Err(why) = self.shutdown(mode) {
            self.kill_postmaster();
            self.running = false;
            panic!("PostgreSQL did not stop ({mode}): {why}");
        }
    }

    /// `pg_ctl -m MODE stop`, then waits for the postmaster to be gone.
    fn shutdown(&mut self, mode: &str) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        let pid = self.pid_file();
        let mut cmd = self.bin.cmd("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .args(["-s", "stop"]);
        let out = run(&mut cmd, PG_CTL_LIMIT)?;
        if !out.status.success() {
            return Err(format!("pg_ctl stop: {}", out.describe()));
        }
        self.running = false;
        if let Some(pid) = pid {
            if !poll_until(Duration::from_secs(10), || !alive(pid)) {
                return Err(format!("postmaster {pid} still there after pg_ctl stop"));
            }
        }
        Ok(())
    }

    /// SIGKILL to this server's postmaster, if there is one: the PID in its
    /// `postmaster.pid`, when that process runs `postgres` on this data dir.
    fn kill_postmaster(&mut self) {
        self.running = false;
        let Some(pid) = self.pid_file() else { return };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|arg| Path::new(arg) == self.data());
        if ours && alive(pid) {
            kill_9(pid);
            poll_until(Duration::from_secs(10), || !alive(pid));
        }
        // A killed postmaster leaves its lock files (postmaster.pid, and the socket's
        // next to the socket), which its PID keeps valid while it lingers as a zombie.
        let _ = fs::remove_file(self.pid_path());
        let sock = self.dir.path().join("sock");
        for entry in fs::read_dir(sock).into_iter().flatten().flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(why) = self.shutdown("fast") {
            eprintln!("hubbub-testkit: PostgreSQL did not stop, killing it: {why}");
            self.kill_postmaster();
        }
    }
}

/// Where the PostgreSQL binaries are, and who runs them.
struct Binaries {
    dir: PathBuf,
    /// The major version, e.g. "15".
    major: String,
    /// User `postgres`'s uid and gid when this process runs as root.
    postgres: Option<(u32, u32)>,
}

impl Binaries {
    fn get() -> &'static Binaries {
        static BIN: OnceLock<Binaries> = OnceLock::new();
        BIN.get_or_init(|| {
            let dir = bin_dir();
            let postgres = (effective_uid() == 0).then(|| {
                (
                    process::id(&["-u", "postgres"]),
                    process::id(&["-g", "postgres"]),
                )
            });
            let mut bin = Binaries {
                dir,
                major: String::new(),
                postgres,
            };
            let out = run(bin.cmd("postgres").arg("-V"), Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            // "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
            let version = out.stdout.split_whitespace().nth(2).unwrap_or_default();
            bin.major = version.split('.').next().unwrap_or_default().to_owned();
            assert!(
                out.status.success() && !bin.major.is_empty(),
                "postgres -V: {}",
                out.describe()
            );
            bin
        })
    }

    /// A command running binary `name`, as user `postgres` when this process is root.
    fn cmd(&self, name: &str) -> Command {
        let program = self.dir.join(name);
        let mut cmd = match self.postgres {
            Some(_) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", "postgres", "--"]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        // A dir that user postgres may enter.
        cmd.current_dir("/");
        clear_pg_env(&mut cmd);
        cmd
    }

    /// Gives `path` to user `postgres` when running as root.
    fn give(&self, path: &Path) {
        if let Some((uid, gid)) = self.postgres {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
        }
    }

    /// The uid that owns the clusters.
    fn owner(&self) -> u32 {
        self.postgres.map_or_else(effective_uid, |(uid, _)| uid)
    }
}

/// Where the servers' temp dirs go: `HUBBUB_TESTKIT_TMPDIR`, else `/dev/shm` when that
/// memory file system has room to spare (copying the template there takes a fraction of
/// the time it takes on a busy disk, and tests leave the disk alone), else the system
/// temp dir.
fn cluster_parent() -> PathBuf {
    static PARENT: OnceLock<PathBuf> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("HUBBUB_TESTKIT_TMPDIR") {
                return PathBuf::from(dir);
            }
            let shm = Path::new("/dev/shm");
            match process::free_bytes(shm) {
                Some(free) if free >= 4 << 30 => shm.to_owned(),
                _ => std::env::temp_dir(),
            }
        })
        .clone()
}

/// PostgreSQL 15's binaries, else the newest under /usr/lib/postgresql.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HUBBUB_TESTKIT_PG_BIN") {
        return PathBuf::from(dir);
    }
    let root = Path::new("/usr/lib/postgresql");
    let preferred = root.join("15/bin");
    if preferred.join("initdb").is_file() {
        return preferred;
    }
    let version = |name: &str| -> Option<Vec<u32>> {
        name.split('.').map(|part| part.parse().ok()).collect()
    };
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some((version(entry.file_name().to_str()?)?, entry.path())))
        .filter(|(_, path)| path.join("bin/initdb").is_file())
        .max()
        .map(|(_, path)| path.join("bin"))
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL binaries in /usr/lib/postgresql/*/bin: install the Debian \
                 package postgresql (./test.sh does), or set HUBBUB_TESTKIT_PG_BIN"
            )
        })
}

/// Variables that would point the binaries at another cluster or server.
fn clear_pg_env(cmd: &mut Command) {
    for var in [
        "PGDATA",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        "PGSERVICE",
        "PGSSLMODE",
    ] {
        cmd.env_remove(var);
    }
}

/// `initdb` into `data`.
fn initdb(bin: &Binaries, data: &Path) {
    let mut cmd = bin.cmd("initdb");
    cmd.arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
        .arg("--no-sync");
    let out = run(&mut cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "initdb: {}", out.describe());
}

/// The template cluster, made by `initdb` once per machine: built under a temp name and
/// renamed into place, so that parallel test processes never see half of one. None when
/// the cache's place is taken by something this process cannot use.
fn template(bin: &Binaries) -> Option<PathBuf> {
    static MAKING: Mutex<()> = Mutex::new(());
    let owner = bin.owner();
    let path = std::env::temp_dir().join(format!(
        "hubbub-testkit-pg{}-template-uid{owner}",
        bin.major
    ));
    let usable = |path: &Path| {
        fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == owner)
            && path.join("PG_VERSION").is_file()
            && path.join("global/pg_control").is_file()
    };
    if usable(&path) {
        return Some(path);
    }
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if usable(&path) {
        return Some(path);
    }
    let work = tempfile::Builder::new()
        .prefix(".hubbub-testkit-pg-template-")
        .tempdir()
        .expect("create a temp dir for the PostgreSQL template");
    bin.give(work.path());
    match fs::symlink_metadata(&path) {
        Err(_) => {}
        // A broken template of ours (say half removed by a temp cleaner) is moved aside,
        // to go with the work dir, unless another process has just put a good one there.
        Ok(meta) if meta.is_dir() && meta.uid() == owner => {
            if usable(&path) {
                return Some(path);
            }
            let _ = fs::rename(&path, work.path().join("broken"));
        }
        Ok(_) => return None,
    }
    let data = work.path().join("data");
    initdb(bin, &data);
    // Another process may have renamed its template into place first: either will do.
    match fs::rename(&data, &path) {
        Ok(()) => Some(path),
        Err(_) if usable(&path) => Some(path),
        Err(e) => panic!(
            "renaming the PostgreSQL template to {}: {e}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_taken_port_is_told_apart_from_other_failures() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut server = PgServer::prepare();
        server.port = taken.local_addr().expect("address").port();
        server.write_config();
        match server.launch() {
            Err(Failed::PortInUse(_)) => {}
            Err(Failed::Other(why)) => panic!("not seen as a taken port: {why}"),
            Ok(()) => panic!("started on a taken port"),
        }
        assert!(!server.running);
        assert!(!server.pid_path().exists(), "no postmaster left behind");

        server.port = free_port();
        server.write_config();
        assert!(server.launch().is_ok(), "starts on a free port");
        assert!(alive(server.pid()));
    }

    #[test]
    fn a_server_that_would_not_stop_is_killed_and_can_start_again() {
        let mut server = PgServer::start();
        let pid = server.pid();
        server.kill_postmaster();
        assert!(!alive(pid));
        server.start_again();
        assert_ne!(server.pid(), pid);
        assert_eq!(server.psql("postgres", "SELECT 1"), "1");
    }
}
