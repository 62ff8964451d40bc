//! nginx in a temp dir, configured by the repository's `deploy/nginx.conf`.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::port::free_port;
use crate::process::{alive, kill_9, launch_retrying, log_tail, terminate, wait_for, Failed};

/// The configuration operators deploy; every server here runs it.
const DEPLOY_CONF: &str = include_str!("../../../deploy/nginx.conf");
/// How long a started nginx may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long nginx may take to stop after SIGTERM (its workers close their connections).
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// Starts that fail because another process took the port just before.
const PORT_ATTEMPTS: usize = 5;

/// An nginx reverse proxy of its own (`/usr/sbin/nginx` from the Debian package `nginx`,
/// or `HUBBUB_TESTKIT_NGINX`), a child of this process listening on a free `127.0.0.1`
/// port in front of the given hubbub nodes.
///
/// Its configuration is `deploy/nginx.conf` with the directives it runs: the
/// `upstream` block's `server` lines become one per node given here (with the
/// parameters of the first, such as `max_fails`), the server's `listen` lines become one
/// on `127.0.0.1:PORT`, `worker_processes` is 1, and everything nginx writes (pid file,
/// error and access logs, temp files) goes into its temp dir; it runs in the foreground
/// (`daemon off`). Everything else (headers, timeouts, retries, keep-alive) is the
/// deployed file's. Dropping it stops it (SIGTERM, then SIGKILL to its PID and its
/// workers' after a few seconds) and removes the temp dir.
pub struct NginxServer {
    port: u16,
    nodes: Vec<SocketAddr>,
    child: Option<Child>,
    // Last, so that nginx is gone before the dir goes.
    dir: TempDir,
}

impl NginxServer {
    /// Starts nginx in front of `nodes` (loopback addresses) and waits until it accepts
    /// connections; panics (with the tail of its log) when it does not.
    pub fn start(nodes: &[SocketAddr]) -> NginxServer {
        assert!(!nodes.is_empty(), "nginx needs at least one node");
        assert!(
            nodes.iter().all(|n| n.ip().is_loopback()),
            "the test kit proxies to loopback addresses only: {nodes:?}"
        );
        let dir = tempfile::Builder::new()
            .prefix("hubbub-testkit-nginx-")
            .tempdir()
            .expect("create a temp dir for nginx");
        // As root, nginx's workers run as an unprivileged user: they must reach their
        // temp paths in here.
        let mut perms = fs::metadata(dir.path()).expect("temp dir").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(dir.path(), perms).expect("chmod the temp dir");
        let mut server = NginxServer {
            port: 0,
            nodes: nodes.to_vec(),
            child: None,
            dir,
        };
        launch_retrying(
            "nginx did not start",
            PORT_ATTEMPTS,
            || {},
            || {
                server.port = free_port();
                server.launch()
            },
        );
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `ws://127.0.0.1:PORT`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr())
    }

    /// The master process's PID. Panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("nginx is not running").id()
    }

    /// The temp dir: `nginx.conf`, `nginx.pid`, `error.log`, `access.log`, `stderr.log`,
    /// the temp paths.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> String {
        fs::read_to_string(self.conf_path()).unwrap_or_default()
    }

    /// What its error log says so far (for a failing test's message).
    pub fn error_log(&self) -> String {
        fs::read(self.dir.path().join("error.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Stops it: SIGTERM to the master (a fast shutdown: open connections are closed),
    /// SIGKILL to the master and its workers if it is still there after a few seconds.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            shut_down(child);
        }
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    /// Writes the configuration, spawns nginx and waits until it accepts connections.
    fn launch(&mut self) -> Result<(), Failed> {
        let dir = self.dir.path().to_owned();
        let conf = config_for(DEPLOY_CONF, &self.nodes, self.port, &dir);
        fs::write(self.conf_path(), conf).expect("write nginx.conf");
        let pid_file = dir.join("nginx.pid");
        let _ = fs::remove_file(&pid_file);
        let stderr_log = dir.join("stderr.log");
        let out = File::create(&stderr_log).expect("create stderr.log");
        let err = out.try_clone().expect("clone the stderr.log handle");
        let mut prefix = dir.as_os_str().to_owned();
        prefix.push("/");
        let mut child = Command::new(nginx_bin())
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(self.conf_path())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; install the Debian package nginx (./test.sh does), \
                     or set HUBBUB_TESTKIT_NGINX",
                    nginx_bin().display()
                )
            });
        let deadline = Instant::now() + READY_WITHIN;
        let mut pause = Duration::from_millis(1);
        let why = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("nginx exited: {status}");
            }
            // nginx writes its pid file once its listening socket is bound: a port taken
            // by another process cannot pass for this one.
            let ours = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
                == Some(child.id());
            if ours && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                shut_down(child);
                break format!("not accepting connections within {READY_WITHIN:?}");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        let logs = format!(
            "{}{}",
            fs::read_to_string(&stderr_log).unwrap_or_default(),
            self.error_log()
        );
        let why = format!(
            "{why}\n{}\n{}",
            log_tail(&stderr_log),
            log_tail(&dir.join("error.log"))
        );
        if logs.contains("Address already in use") {
            Err(Failed::PortInUse(why))
        } else {
            Err(Failed::Other(why))
        }
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The nginx binary: `HUBBUB_TESTKIT_NGINX`, else Debian's `/usr/sbin/nginx`.
fn nginx_bin() -> PathBuf {
    std::env::var_os("HUBBUB_TESTKIT_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// Stops the nginx master `child`: SIGTERM (a fast shutdown), then SIGKILL to it and
/// to its workers if it is still there after a few seconds.
fn shut_down(mut child: Child) {
    let master = child.id();
    let workers = children_of(master);
    terminate(master);
    if wait_for(&mut child, STOP_WITHIN).is_none() {
        eprintln!("hubbub-testkit: nginx {master} still running after SIGTERM; killing it");
        let _ = child.kill();
        let _ = wait_for(&mut child, Duration::from_secs(5));
    }
    // Workers outlive a killed master: make sure none is left.
    for pid in workers {
        if alive(pid) && is_nginx(pid) {
            kill_9(pid);
        }
    }
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // "PID (COMM) STATE PPID ...": the command may hold any character.
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Whether process `pid` is an nginx process (its command line says so).
fn is_nginx(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"nginx"))
}

/// `template` (an nginx.conf laid out one directive per line, as `deploy/nginx.conf`)
/// made to run here: the upstream's servers are `nodes`, the server listens on
/// `127.0.0.1:port` only, one worker, and every file nginx writes is in `dir`.
pub(crate) fn config_for(template: &str, nodes: &[SocketAddr], port: u16, dir: &Path) -> String {
    let path = |name: &str| format!("\"{}\"", dir.join(name).display());
    let mut out = format!(
        "# hubbub-testkit: deploy/nginx.conf with this test's nodes, port and paths\n\
         daemon off;\n\
         pid {};\n\
         error_log {} info;\n",
        path("nginx.pid"),
        path("error.log"),
    );
    let mut blocks: Vec<String> = Vec::new();
    let (mut servers_done, mut listen_done) = (false, false);
    for line in template.lines() {
        let code = line.trim();
        if code.is_empty() || code.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let directive = code
            .split(|c: char| c.is_whitespace() || c == ';' || c == '{')
            .next()
            .unwrap_or_default();
        if code.ends_with('{') {
            blocks.push(directive.to_owned());
            out.push_str(line);
            out.push('\n');
            if directive == "http" {
                for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    out.push_str(&format!(
                        "    {temp}_temp_path {};\n",
                        path(&format!("{temp}_temp"))
                    ));
                }
            }
            continue;
        }
        if code.starts_with('}') {
            blocks.pop();
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        let context = blocks.last().map(String::as_str);
        assert!(
            directive != "include",
            "the test kit cannot follow `include`: {line}"
        );
        match (context, directive) {
            (None, "user" | "pid" | "error_log" | "daemon" | "master_process") => {}
            (None, "worker_processes") => out.push_str("worker_processes 1;\n"),
            (_, "error_log") => {}
            (_, "access_log") => {
                out.push_str(&format!("{indent}access_log {};\n", path("access.log")))
            }
            (_, d) if d.ends_with("_temp_path") => {}
            (Some("upstream"), "server") => {
                if !servers_done {
                    // The parameters of the first server line (max_fails=...) for each.
                    let params: Vec<&str> = code
                        .trim_end_matches(';')
                        .split_whitespace()
                        .skip(2)
                        .collect();
                    for node in nodes {
                        out.push_str(&format!("{indent}server {node}"));
                        for p in &params {
                            out.push(' ');
                            out.push_str(p);
                        }
                        out.push_str(";\n");
                    }
                    servers_done = true;
                }
            }
            (Some("server"), "listen") => {
                if !listen_done {
                    out.push_str(&format!("{indent}listen 127.0.0.1:{port};\n"));
                    listen_done = true;
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert!(blocks.is_empty(), "unbalanced braces in the nginx template");
    assert!(
        servers_done,
        "no `server` line in an `upstream` block of the template"
    );
    assert!(
        listen_done,
        "no `listen` line in a `server` block of the template"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployed_config_is_run_with_these_nodes_port_and_paths_only() {
        let nodes: Vec<SocketAddr> = vec![
            "127.0.0.1:4001".parse().unwrap(),
            "127.0.0.1:4002".parse().unwrap(),
        ];
        let dir = Path::new("/nonexistent/testkit");
        let conf = config_for(DEPLOY_CONF, &nodes, 5555, dir);
        let code: Vec<&str> = conf
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let has = |wanted: &str| code.contains(&wanted);
        assert!(has("daemon off;"));
        assert!(has("worker_processes 1;"));
        assert!(has("pid \"/nonexistent/testkit/nginx.pid\";"));
        assert!(
            has("server 127.0.0.1:4001 max_fails=3 fail_timeout=10s;"),
            "{conf}"
        );
        assert!(
            has("server 127.0.0.1:4002 max_fails=3 fail_timeout=10s;"),
            "{conf}"
        );
        assert!(has("listen 127.0.0.1:5555;"));
        assert_eq!(code.iter().filter(|l| l.starts_with("listen")).count(), 1);
        assert_eq!(
            code.iter()
                .filter(|l| l.starts_with("server ") && !l.ends_with('{'))
                .count(),
            2,
            "the template's nodes are gone"
        );
        assert!(
            has("proxy_http_version 1.1;"),
            "the rest is the deployed file's"
        );
        assert!(has(
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
        ));
        for line in &code {
            for path in ["/var/", "/run/", "/etc/"] {
                assert!(!line.contains(path), "writes outside its dir: {line}");
            }
            assert!(!line.starts_with("user "), "{line}");
        }
        for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            assert!(
                conf.contains(&format!(
                    "{temp}_temp_path \"/nonexistent/testkit/{temp}_temp\";"
                )),
                "{temp}"
            );
        }
    }
}
