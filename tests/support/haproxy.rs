//! Test support: run a private HAProxy 2.6 TCP load balancer on loopback.
//!
//! Every [`Haproxy`] gets its own temporary directory holding `haproxy.cfg` and
//! `haproxy.log` (the process's stdout and stderr; the config logs to stdout with
//! `option tcplog`, one line per finished connection, plus startup warnings and
//! alerts). /etc/haproxy and the system service are never used or touched; the
//! process runs in the foreground (`haproxy -db -f <dir>/haproxy.cfg`, no master
//! process, no pidfile, no stats socket, no chroot, no user switch) and only its
//! PID is signalled on drop.
//!
//! Each frontend binds `127.0.0.1:<port>` in `mode tcp` and balances round-robin
//! over its backends, with `send-proxy-v2` on every server line when asked (the
//! backend then receives the 12-byte signature `\r\n\r\n\0\r\nQUIT\n`, the
//! version/command, family and length bytes and the addresses before the client's
//! bytes). No health checks, so the backends see only real client connections.
//! Timeouts: connect 5 s, client and server 1 h (idle IMAP sessions survive).
//!
//! Requirements: `/usr/sbin/haproxy` (Debian `haproxy`; override with
//! `MAILGATE_TEST_HAPROXY`) and /proc (readiness is checked by finding the
//! listening sockets among haproxy's own file descriptors, so no probe connection
//! ever reaches a backend).
//!
//! Only std and `tempfile` are used; the helpers shared with the other harnesses are in
//! [`super::daemon`].

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::daemon::{
    START_ATTEMPTS, STOP_TIMEOUT, StartError, check_running, pick_ports, poll, read_log, retry_start, spawn_logged,
    tail, terminate, try_poll,
};

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// Default location of the HAProxy binary (Debian `haproxy`).
pub const DEFAULT_HAPROXY_BIN: &str = "/usr/sbin/haproxy";
/// How long [`Haproxy::start`] waits for the listeners. ([`Drop`] waits
/// [`STOP_TIMEOUT`], 5 s, after SIGTERM before sending SIGKILL.)
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One frontend: (listen port on 127.0.0.1, 0 = pick a free one; backends, balanced
/// round-robin; send a PROXY protocol v2 header to the backends).
pub type Frontend = (u16, Vec<SocketAddr>, bool);

/// A running HAProxy; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Haproxy {
    /// Listen port of each frontend, in the order given to [`Haproxy::start`].
    pub ports: Vec<u16>,
    /// Config and log live here; removed after the process has stopped.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
}

impl Haproxy {
    /// Start HAProxy with one frontend per entry and wait (max 20 s) until all of
    /// them listen. A port given as 0 is picked free (and picked again if it was
    /// taken before HAProxy bound it); a fixed port that is taken makes this panic.
    pub fn start(frontends: &[Frontend]) -> Haproxy {
        let bin = haproxy_bin();
        if !bin.is_file() {
            panic!("haproxy: {} not found (install haproxy, or set MAILGATE_TEST_HAPROXY)", bin.display());
        }
        if frontends.is_empty() {
            panic!("haproxy: no frontends given");
        }
        for (i, (_, backends, _)) in frontends.iter().enumerate() {
            if backends.is_empty() {
                panic!("haproxy: frontend {i} has no backends");
            }
        }
        // Only a picked port may have been taken by someone else: retry then.
        let picked = frontends.iter().any(|f| f.0 == 0);
        retry_start(|| {
            try_start(frontends).map_err(|e| match e {
                StartError::PortTaken(msg) if !picked => StartError::Fatal(msg),
                e => e,
            })
        })
        .unwrap_or_else(|last| panic!("haproxy: could not bind free ports after {START_ATTEMPTS} attempts\n{last}"))
    }

    /// PID of the haproxy process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Listen port of frontend `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.ports[i]
    }

    /// `127.0.0.1:<port>` of frontend `i`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[i]))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.cfg")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("haproxy.log")
    }

    /// Everything HAProxy wrote: warnings/alerts and one tcplog line per finished
    /// connection (`127.0.0.1:41234 [..] fe0 be0/s1 1/0/5003 42 -- 1/1/0/0/0 0/0`).
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Poll the log until it contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
    }

    /// Stop now (same as dropping, but keeps `dir` around for inspection).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM = hard stop: listeners closed, connections cut.
            terminate(&mut child, "TERM", STOP_TIMEOUT);
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn try_start(frontends: &[Frontend]) -> Result<Haproxy, StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("haproxy: {what}: {e}"));
    let dir =
        tempfile::Builder::new().prefix("mailgate-haproxy-").tempdir().map_err(|e| fatal("create temp dir", e))?;

    // Distinct free ports for the frontends given as 0.
    let mut free = pick_ports(frontends.iter().filter(|f| f.0 == 0).count())
        .map_err(|e| fatal("pick a free port", e))?
        .into_iter();
    let ports: Vec<u16> = frontends.iter().map(|f| if f.0 == 0 { free.next().unwrap_or(0) } else { f.0 }).collect();

    let conf_path = dir.path().join("haproxy.cfg");
    fs::write(&conf_path, render_config(frontends, &ports)).map_err(|e| fatal("write haproxy.cfg", e))?;
    let mut cmd = Command::new(haproxy_bin());
    cmd.arg("-db").arg("-f").arg(&conf_path).current_dir(dir.path());
    let child = spawn_logged(&mut cmd, &dir.path().join("haproxy.log"), "log").map_err(|(what, e)| fatal(&what, e))?;
    let pid = child.id();
    let mut h = Haproxy { ports, dir, child: Some(child), pid };

    match wait_ready(&mut h) {
        Ok(()) => Ok(h),
        Err(reason) => {
            h.stop();
            let log = h.log();
            let msg = format!(
                "haproxy failed to start ({reason})\n--- {} ---\n{}\n--- log ---\n{}",
                h.config_path().display(),
                fs::read_to_string(h.config_path()).unwrap_or_default().trim_end(),
                tail(&log, 40)
            );
            if log.contains("cannot bind socket") || log.contains("Address already in use") {
                Err(StartError::PortTaken(msg))
            } else {
                Err(StartError::Fatal(msg))
            }
        }
    }
}

/// Ready when every frontend port is a listening socket held by our process.
fn wait_ready(h: &mut Haproxy) -> Result<(), String> {
    let ready = try_poll(START_TIMEOUT, Duration::from_millis(25), || {
        check_running(h.child.as_mut(), "haproxy")?;
        let inodes = socket_inodes(h.pid);
        let listening = listening_inodes();
        Ok::<bool, String>(
            h.ports.iter().all(|p| listening.iter().any(|(port, ino)| port == p && inodes.contains(ino))),
        )
    })?;
    if ready { Ok(()) } else { Err(format!("ports {:?} not listening within {START_TIMEOUT:?}", h.ports)) }
}

/// Socket inodes among /proc/<pid>/fd.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let target = fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// (port, inode) of every socket listening on 127.0.0.1 (from /proc/net/tcp).
fn listening_inodes() -> Vec<(u16, u64)> {
    let Ok(text) = fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // f[1] = local "0100007F:1F90", f[3] = state (0A = LISTEN), f[9] = inode
            let (ip, port) = f.get(1)?.split_once(':')?;
            if ip != "0100007F" || *f.get(3)? != "0A" {
                return None;
            }
            Some((u16::from_str_radix(port, 16).ok()?, f.get(9)?.parse().ok()?))
        })
        .collect()
}

fn render_config(frontends: &[Frontend], ports: &[u16]) -> String {
    let mut c = String::from(
        "\
# Generated by tests/support/haproxy.rs -- test instance, not for production.
global
    log stdout format raw local0 info
    maxconn 4096

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1h
    timeout server 1h
",
    );
    for (i, ((_, backends, proxy_v2), port)) in frontends.iter().zip(ports).enumerate() {
        let _ = write!(c, "\nfrontend fe{i}\n    bind 127.0.0.1:{port}\n    default_backend be{i}\n");
        let _ = write!(c, "\nbackend be{i}\n    balance roundrobin\n");
        for (j, addr) in backends.iter().enumerate() {
            let target = match addr {
                SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
                SocketAddr::V6(a) => format!("ipv6@{}:{}", a.ip(), a.port()),
            };
            let _ = writeln!(c, "    server s{j} {target}{}", if *proxy_v2 { " send-proxy-v2" } else { "" });
        }
    }
    c
}

fn haproxy_bin() -> PathBuf {
    std::env::var_os("MAILGATE_TEST_HAPROXY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_HAPROXY_BIN))
}
