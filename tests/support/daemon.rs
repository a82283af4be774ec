//! Test support: what the private-daemon harnesses share.
//!
//! dovecot.rs, submission.rs, postfix.rs, postgres.rs and haproxy.rs each run a real
//! server on loopback from a private temporary directory; sink.rs runs an in-process
//! SMTP server. The common pieces live here:
//! - starting: free loopback ports ([`free_port`], [`pick_ports`]), retrying a start
//!   whose picked port got taken before the server bound it ([`retry_start`],
//!   [`StartError`]), spawning with stdout/stderr into a file ([`spawn_logged`]);
//! - waiting: polling for a condition or a log line ([`poll`], [`try_poll`]), checking
//!   that the server did not exit meanwhile ([`check_running`]), protocol greetings
//!   ([`greeting_ok`], [`smtp_greeting_ok`]);
//! - logs: reading a log file ([`read_log`]), appending labelled sections
//!   ([`push_section`]), the last lines for panic messages ([`tail`]);
//! - stopping by PID: a signal, then SIGKILL after a timeout ([`signal_and_wait`],
//!   [`terminate`]), also for the former children of a master process ([`stop_child`]);
//!   processes are only signalled while un-reaped or, for grandchildren, identified by
//!   PID and start time, so a reused PID is never hit;
//! - files and users: world-traversable temp dirs ([`traversable_tmp`], [`temp_dir`]),
//!   modes and owners, passwd/group lookups, the effective uid;
//! - Dovecot, used by dovecot.rs, submission.rs and the SASL backend of postfix.rs: the
//!   binary, passwd-files with `{PLAIN}` passwords, option checks, the instance
//!   directory, the log and the readiness check.
//!
//! Only std and `tempfile`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Starting

/// Attempts when a picked port got taken between picking and binding.
pub const START_ATTEMPTS: usize = 5;

/// Why one attempt to start a server failed.
pub enum StartError {
    /// A listener could not bind (port taken after we picked it): retry.
    PortTaken(String),
    Fatal(String),
}

impl StartError {
    /// [`StartError::PortTaken`] if `log` says `Address already in use`, else
    /// [`StartError::Fatal`].
    pub fn from_log(log: &str, msg: String) -> StartError {
        if log.contains("Address already in use") { StartError::PortTaken(msg) } else { StartError::Fatal(msg) }
    }
}

/// Call `attempt` up to [`START_ATTEMPTS`] times while it fails with
/// [`StartError::PortTaken`]; panic with the message of a [`StartError::Fatal`].
/// `Err(last message)` when every attempt lost its port.
pub fn retry_start<T>(mut attempt: impl FnMut() -> Result<T, StartError>) -> Result<T, String> {
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS {
        match attempt() {
            Ok(t) => return Ok(t),
            Err(StartError::PortTaken(msg)) => last = msg,
            Err(StartError::Fatal(msg)) => panic!("{msg}"),
        }
    }
    Err(last)
}

/// The [`StartError`] for a server that did not come up: `<what> failed to start
/// (<reason>)`, the config file and the last 40 log lines; [`StartError::PortTaken`]
/// if the log says `Address already in use`.
pub fn start_failure(what: &str, reason: &str, config: &Path, log: &str) -> StartError {
    let msg = format!(
        "{what} failed to start ({reason})\n--- {} ---\n{}\n--- log tail ---\n{}",
        config.display(),
        fs::read_to_string(config).unwrap_or_default().trim_end(),
        tail(log, 40)
    );
    StartError::from_log(log, msg)
}

/// A free loopback port for a server to listen on, see [`pick_ports`].
pub fn free_port() -> std::io::Result<u16> {
    Ok(pick_ports(1)?[0])
}

/// `n` distinct free loopback ports for servers to listen on (all checked by binding
/// at once, then released; the server binds its port soon after, and a start that
/// loses the race is retried with other ports).
///
/// They come from below the kernel's ephemeral range (`ip_local_port_range`), not from
/// binding port 0: a port from that range can be taken as the *source* port of any
/// outgoing connection the moment it is released, and a loaded run of the suite makes
/// thousands of those (this lost ports both before a first start and during a restart
/// on the same config). Below the range only another picker can take a port, and the
/// pick is random over some 20 000 ports. Falls back to port 0 if the range starts too
/// low to leave room.
pub fn pick_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use std::hash::{BuildHasher, Hasher};
    const LOW: u32 = 10_000;
    let high = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse::<u32>().ok()))
        .unwrap_or(32_768);
    let mut held: Vec<TcpListener> = Vec::with_capacity(n);
    if high > LOW + 1_000 {
        let random = std::collections::hash_map::RandomState::new();
        let mut tries = 0u64;
        while held.len() < n && tries < 1_000 {
            tries += 1;
            let mut h = random.build_hasher();
            h.write_u64(tries);
            let port = LOW + (h.finish() % u64::from(high - LOW)) as u32;
            // Port numbers here are below 65536 by construction.
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
                held.push(l);
            }
        }
    }
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Spawn `cmd` with stdin from /dev/null and stdout and stderr into a new file
/// `out` (called `name` in errors). Errors: (`create <name>` | `dup <name>` |
/// `spawn <program>`, the I/O error).
pub fn spawn_logged(cmd: &mut Command, out: &Path, name: &str) -> Result<Child, (String, std::io::Error)> {
    let stdout = fs::File::create(out).map_err(|e| (format!("create {name}"), e))?;
    let stderr = stdout.try_clone().map_err(|e| (format!("dup {name}"), e))?;
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| (format!("spawn {}", Path::new(cmd.get_program()).display()), e))
}

// ---------------------------------------------------------------------------
// Waiting

/// Poll `f` every 25 ms until it is true (true) or `timeout` passes (false).
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    try_poll(timeout, Duration::from_millis(25), || Ok::<bool, ()>(f())).unwrap_or(false)
}

/// Call `step` every `interval` until it returns `Ok(true)` (`Ok(true)`) or an error
/// (that error), or `timeout` passes (`Ok(false)`). `step` always runs at least once,
/// and once more at the deadline.
pub fn try_poll<E>(
    timeout: Duration,
    interval: Duration,
    mut step: impl FnMut() -> Result<bool, E>,
) -> Result<bool, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if step()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        sleep(interval);
    }
}

/// `Err("<what> exited early: <status>")` if `child` has exited, `Err("waitpid: ..")`
/// if that cannot be told; `Ok` while it runs (or if there is none).
pub fn check_running(child: Option<&mut Child>, what: &str) -> Result<(), String> {
    match child.map(Child::try_wait) {
        Some(Ok(Some(status))) => Err(format!("{what} exited early: {status}")),
        Some(Err(e)) => Err(format!("waitpid: {e}")),
        Some(Ok(None)) | None => Ok(()),
    }
}

/// Connect (1 s timeout) and check that the first line starts with `prefix`; then
/// send `bye` and read the answer (2 s read/write timeouts).
pub fn greeting_ok(addr: SocketAddr, prefix: &str, bye: &[u8]) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let ok = reader.read_line(&mut line).is_ok() && line.starts_with(prefix);
    if ok {
        let mut w = &stream;
        let _ = w.write_all(bye);
        let _ = reader.read_line(&mut line);
    }
    ok
}

/// Connect and check that the first reply line starts with `220 `, then QUIT.
pub fn smtp_greeting_ok(addr: SocketAddr) -> bool {
    greeting_ok(addr, "220 ", b"QUIT\r\n")
}

/// True if something accepts TCP connections on `addr` (1 s timeout).
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

// ---------------------------------------------------------------------------
// Logs

/// The whole file, or "" if it cannot be read (e.g. not created yet).
pub fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Append `--- <title> ---\n<text>` to `out` unless `text` is blank.
pub fn push_section(out: &mut String, title: &str, text: &str) {
    if !text.trim().is_empty() {
        out.push_str("--- ");
        out.push_str(title);
        out.push_str(" ---\n");
        out.push_str(text);
    }
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Stopping by PID

/// How long [`stop_child`] waits after SIGTERM before sending SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Send `sig` to `child` and wait up to `timeout` for it to exit. True if it is
/// still running afterwards (also when the signal could not be sent). Call only
/// while `child` is un-reaped: its PID cannot have been reused until then.
pub fn signal_and_wait(child: &mut Child, sig: &str, timeout: Duration) -> bool {
    if signal(&[child.id()], sig) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => sleep(Duration::from_millis(20)),
            }
        }
    }
    matches!(child.try_wait(), Ok(None))
}

/// Stop `child`: if it is still running, `sig`, then SIGKILL if it has not exited
/// within `timeout`; reap it.
pub fn terminate(child: &mut Child, sig: &str, timeout: Duration) {
    if matches!(child.try_wait(), Ok(None)) && signal_and_wait(child, sig, timeout) {
        let _ = child.kill(); // SIGKILL
    }
    let _ = child.wait();
}

/// SIGTERM the un-reaped `child` (SIGKILL after [`STOP_TIMEOUT`]), reap it, then
/// stop its former direct children that are still alive: SIGTERM, SIGKILL after
/// 2 s. (Dovecot's service processes that still serve a client outlive the master's
/// SIGTERM until that client disconnects.) The children are listed before the
/// master is signalled and remembered by PID and start time, so a reused PID is
/// never signalled.
pub fn stop_child(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let children = child_processes(child.id());
    terminate(child, "TERM", STOP_TIMEOUT);
    let left = still_alive(&children);
    if left.is_empty() {
        return;
    }
    signal(&left, "TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !still_alive(&children).is_empty() {
        sleep(Duration::from_millis(20));
    }
    let left = still_alive(&children);
    if !left.is_empty() {
        signal(&left, "KILL");
    }
}

/// `kill -<sig> <pids>`; true if the command succeeded.
pub fn signal(pids: &[u32], sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// (pid, start time) of the direct children of `parent`.
pub fn child_processes(parent: u32) -> Vec<(u32, u64)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (ppid, start) = proc_stat(pid)?;
            (ppid == parent).then_some((pid, start))
        })
        .collect()
}

/// The PIDs of `procs` (from [`child_processes`]) that are still the same,
/// not yet exited processes.
pub fn still_alive(procs: &[(u32, u64)]) -> Vec<u32> {
    procs.iter().filter(|(pid, start)| proc_stat(*pid).is_some_and(|(_, s)| s == *start)).map(|(pid, _)| *pid).collect()
}

/// (ppid, starttime) from /proc/<pid>/stat; None if the process is gone or a zombie
/// (which needs no signal).
pub fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..." -- comm may contain spaces/parens.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    // f[0] = state (field 3), f[1] = ppid (4), f[19] = starttime (22)
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// State letter (R, S, T, Z, ...) from /proc/<pid>/stat; None if the process is gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

// ---------------------------------------------------------------------------
// Files and users

/// TMPDIR if every ancestor is world-traversable (the servers drop privileges),
/// else /tmp.
pub fn traversable_tmp() -> PathBuf {
    let t = std::env::temp_dir();
    let ok = t.ancestors().all(|p| fs::metadata(p).map(|m| m.permissions().mode() & 0o001 != 0).unwrap_or(false));
    if ok { t } else { PathBuf::from("/tmp") }
}

/// A new `<prefix>XXXXXX` directory (mode 0700) under [`traversable_tmp`].
pub fn temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir_in(traversable_tmp())
}

/// chmod; `Err("chmod <mode> <path>: <error>")`.
pub fn try_set_mode(path: &Path, mode: u32) -> Result<(), String> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", path.display()))
}

/// chown; `Err("chown <uid>:<gid> <path>: <error>")`.
pub fn try_chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {uid}:{gid} {}: {e}", path.display()))
}

/// [`try_set_mode`], panicking on failure.
pub fn set_mode(path: &Path, mode: u32) {
    try_set_mode(path, mode).unwrap_or_else(|e| panic!("{e}"));
}

/// [`try_chown`], panicking on failure.
pub fn chown(path: &Path, uid: u32, gid: u32) {
    try_chown(path, uid, gid).unwrap_or_else(|e| panic!("{e}"));
}

/// Third field of the `name:` line of a passwd/group style file.
pub fn lookup_id(file: &str, name: &str) -> Option<u32> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        f.nth(1)?.parse().ok()
    })
}

pub fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Dovecot (dovecot.rs, submission.rs, the SASL backend of postfix.rs)

/// Default location of the Dovecot binary (Debian `dovecot-core`).
pub const DEFAULT_DOVECOT_BIN: &str = "/usr/sbin/dovecot";

/// The Dovecot binary (`MAILGATE_TEST_DOVECOT` or [`DEFAULT_DOVECOT_BIN`]).
pub fn dovecot_bin() -> PathBuf {
    std::env::var_os("MAILGATE_TEST_DOVECOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DOVECOT_BIN))
}

/// uid of `nobody` and gid of `nogroup` (or `nobody`), the mail owner.
pub fn mail_ids() -> (u32, u32) {
    let uid = lookup_id("/etc/passwd", "nobody").unwrap_or(65534);
    let gid = lookup_id("/etc/group", "nogroup").or_else(|| lookup_id("/etc/group", "nobody")).unwrap_or(65534);
    (uid, gid)
}

/// `{PLAIN}pw`, or `{PLAIN.b64}...` when the password would break the passwd-file format.
pub fn plain_password(pw: &str) -> String {
    if pw.contains([':', '\n', '\r']) || pw.starts_with(char::is_whitespace) || pw.ends_with(char::is_whitespace) {
        format!("{{PLAIN.b64}}{}", base64(pw.as_bytes()))
    } else {
        format!("{{PLAIN}}{pw}")
    }
}

/// Standard base64 with padding (e.g. for `AUTH PLAIN`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Write a passwd-file readable by Dovecot's auth process, which runs as the
/// `dovecot` user (root:dovecot 0640; 0644 without a `dovecot` group).
pub fn write_secret(path: &Path, content: &str) -> Result<(), String> {
    fs::write(path, content).map_err(|e| format!("write {}: {e}", path.display()))?;
    match lookup_id("/etc/group", "dovecot") {
        Some(dovecot_gid) => {
            chown(path, 0, dovecot_gid);
            set_mode(path, 0o640);
        }
        None => set_mode(path, 0o644),
    }
    Ok(())
}

/// Write `<dir>/users` (the `users` with `{PLAIN}` passwords) and
/// `<dir>/master-users` (the master user) with [`write_secret`].
pub fn write_passwd_files(dir: &Path, users: &[(String, String)], master: (&str, &str)) -> Result<(), String> {
    let lines: String = users.iter().map(|(u, p)| format!("{u}:{}\n", plain_password(p))).collect();
    write_secret(&dir.join("users"), &lines)?;
    write_secret(&dir.join("master-users"), &format!("{}:{}\n", master.0, plain_password(master.1)))
}

/// Panic (`<who>: ...`) unless running as root and the user names and TLS files of
/// a dovecot.rs/submission.rs instance are usable.
pub fn check_dovecot_options(
    who: &str,
    users: &[(String, String)],
    master_user: &str,
    tls: Option<&(PathBuf, PathBuf)>,
) {
    if effective_uid() != Some(0) {
        panic!(
            "{who}: the Dovecot test harness must run as root (Dovecot drops to \
             nobody/dovecot/dovenull users); effective uid is {:?}",
            effective_uid()
        );
    }
    let check_name = |what: &str, name: &str| {
        if name.is_empty() || name.chars().any(|c| c == ':' || c == '*' || c.is_whitespace() || c.is_control()) {
            panic!("{who}: invalid {what} {name:?} (must be non-empty, without ':', '*', whitespace)");
        }
    };
    for (user, _) in users {
        check_name("username", user);
    }
    check_name("master user", master_user);
    if let Some((cert, key)) = tls {
        for p in [cert, key] {
            if !p.is_file() {
                panic!("{who}: TLS file {} does not exist", p.display());
            }
        }
    }
}

/// A new instance directory `<prefix>XXXXXX` (under [`traversable_tmp`], mode 0755 so
/// that the unprivileged Dovecot processes can traverse it) for dovecot.rs and
/// submission.rs: `home/` (0755, owned by the mail uid/gid: homes get auto-created by
/// the mail processes, running as nobody), `run/`, `state/`, the passwd-files
/// `users` and `master-users`, and, if `tls` is given, copies of the certificate and
/// key in `tls/` (0700; key 0600; read by the config process as root, and the caller
/// may delete its originals). Returns the directory and the paths of the copies.
/// Errors are `<who>: ...`.
pub fn dovecot_instance_dir(
    who: &str,
    prefix: &str,
    users: &[(String, String)],
    master: (&str, &str),
    tls: Option<&(PathBuf, PathBuf)>,
) -> Result<(tempfile::TempDir, Option<(PathBuf, PathBuf)>), StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("{who}: {what}: {e}"));
    let failed = |e: String| StartError::Fatal(format!("{who}: {e}"));

    let dir = temp_dir(prefix).map_err(|e| fatal("create temp dir", e))?;
    let root = dir.path();
    try_set_mode(root, 0o755).map_err(failed)?;

    let (uid, gid) = mail_ids();
    let home = root.join("home");
    fs::create_dir(&home).map_err(|e| fatal("mkdir home", e))?;
    try_set_mode(&home, 0o755).map_err(failed)?;
    try_chown(&home, uid, gid).map_err(failed)?;
    for sub in ["run", "state"] {
        fs::create_dir(root.join(sub)).map_err(|e| fatal("mkdir", e))?;
    }

    write_passwd_files(root, users, master).map_err(failed)?;

    let tls = match tls {
        None => None,
        Some((cert, key)) => {
            let tls_dir = root.join("tls");
            fs::create_dir(&tls_dir).map_err(|e| fatal("mkdir tls", e))?;
            try_set_mode(&tls_dir, 0o700).map_err(failed)?;
            let (c, k) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
            fs::copy(cert, &c).map_err(|e| fatal("copy TLS cert", e))?;
            fs::copy(key, &k).map_err(|e| fatal("copy TLS key", e))?;
            try_set_mode(&k, 0o600).map_err(failed)?;
            Some((c, k))
        }
    };
    Ok((dir, tls))
}

/// `dovecot -F -c <config>` (foreground, so the child is the master), stdout and
/// stderr into `stderr`. Errors as [`spawn_logged`].
pub fn spawn_dovecot(config: &Path, stderr: &Path, name: &str) -> Result<Child, (String, std::io::Error)> {
    spawn_logged(Command::new(dovecot_bin()).arg("-F").arg("-c").arg(config), stderr, name)
}

/// The Dovecot log of an instance directory (`dovecot.log`, the one file for
/// log_path, info_log_path and debug_log_path), followed by anything the master
/// printed on stdout/stderr (`dovecot.stderr`; only early startup failures end up
/// there).
pub fn dovecot_log(dir: &Path) -> String {
    let mut out = read_log(&dir.join("dovecot.log"));
    push_section(&mut out, "dovecot stdout/stderr", &read_log(&dir.join("dovecot.stderr")));
    out
}

/// Wait (every 50 ms, up to `timeout`) until the Dovecot master `child` of the
/// instance in `dir` has logged "starting up", its plain port greets with a line
/// starting with `greeting` (answered with `bye`) and its TLS port, if any, accepts
/// connections. The master binds all listeners before logging "starting up", so
/// this also guarantees the greeting comes from *this* instance and not from
/// something that grabbed the port in between.
pub fn wait_dovecot_ready(
    child: &mut Option<Child>,
    dir: &Path,
    (port, tls_port): (u16, Option<u16>),
    (greeting, bye): (&str, &[u8]),
    timeout: Duration,
) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tls_addr = tls_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let ready = try_poll(timeout, Duration::from_millis(50), || {
        check_running(child.as_mut(), "master")?;
        Ok::<bool, String>(
            dovecot_log(dir).contains("starting up")
                && greeting_ok(addr, greeting, bye)
                && tls_addr.is_none_or(accepts),
        )
    })?;
    if ready { Ok(()) } else { Err(format!("no {greeting:?} greeting on 127.0.0.1:{port} within {timeout:?}")) }
}
