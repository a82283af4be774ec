//! Test support: run a real Dovecot 2.3 IMAP server on loopback.
//!
//! Every [`Dovecot`] gets its own temporary directory holding the config,
//! base_dir (sockets), state_dir, log file, passwd files and the users' mail.
//! The system configuration in /etc/dovecot and the system Dovecot service
//! are never used or touched; only the master process started here is killed
//! when the value is dropped.
//!
//! Requirements: `/usr/sbin/dovecot` (override with `MAILGATE_TEST_DOVECOT`),
//! the Debian `dovecot`/`dovenull` system users (created by the package), and
//! running as root (Dovecot switches to `nobody` for mail access).
//!
//! Only std and `tempfile` are used.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default location of the Dovecot binary (Debian `dovecot-core`).
pub const DEFAULT_DOVECOT_BIN: &str = "/usr/sbin/dovecot";
/// How long [`Dovecot::start`] waits for the greeting.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Drop`] waits after SIGTERM before sending SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts when a picked port got stolen between picking and binding.
const START_ATTEMPTS: usize = 5;

/// What to configure in the test Dovecot.
#[derive(Clone, Debug)]
pub struct DovecotOptions {
    /// (username, plaintext password) pairs for the regular passdb.
    pub users: Vec<(String, String)>,
    /// Master user name (log in as anyone with `user*master` or SASL authzid).
    pub master_user: String,
    pub master_password: String,
    /// (certificate PEM chain, private key PEM). If set: `ssl = yes`,
    /// STARTTLS on the plain port and an implicit-TLS (imaps) listener.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Lines appended at the end of dovecot.conf (e.g. higher process and client limits
    /// for load tests). Empty by default.
    pub extra_config: String,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions {
            users: vec![("alice@example.com".to_owned(), "alice-password".to_owned())],
            master_user: "mailgate".to_owned(),
            master_password: "master-password".to_owned(),
            tls: None,
            extra_config: String::new(),
        }
    }
}

/// A running Dovecot; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Dovecot {
    /// Plain IMAP port on 127.0.0.1 (STARTTLS is offered when TLS is configured).
    pub port: u16,
    /// Implicit-TLS (imaps) port on 127.0.0.1, only when TLS is configured.
    pub tls_port: Option<u16>,
    /// Everything lives here; removed after the server has stopped.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
}

enum StartError {
    /// A listener could not bind (port taken after we picked it): retry.
    PortTaken(String),
    Fatal(String),
}

impl Dovecot {
    /// Start Dovecot and wait (max 20 s) until the plain port greets with `* OK`.
    /// Panics with the log tail if it cannot start.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        preflight(&opts);
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match try_start(&opts) {
                Ok(d) => return d,
                Err(StartError::PortTaken(msg)) => last = msg,
                Err(StartError::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("dovecot: could not bind free ports after {START_ATTEMPTS} attempts\n{last}");
    }

    /// PID of the Dovecot master process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `127.0.0.1:<port>` of the plain IMAP listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:<tls_port>` of the imaps listener, if TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("dovecot.conf")
    }

    /// The single file used for log_path, info_log_path and debug_log_path.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dovecot.log")
    }

    /// Whole log (errors, info incl. `imap-login: Login: user=<..>, method=..,
    /// rip=.., lip=..` lines, and debug), followed by anything the master
    /// printed on stdout/stderr (only early startup failures end up there).
    /// Lines are written asynchronously by Dovecot's log process: use
    /// [`Dovecot::wait_for_log`] when checking for a line right after an action.
    pub fn log(&self) -> String {
        let mut out = fs::read_to_string(self.log_path()).unwrap_or_default();
        let stderr = fs::read_to_string(self.dir.path().join("dovecot.stderr")).unwrap_or_default();
        if !stderr.trim().is_empty() {
            out.push_str("--- dovecot stdout/stderr ---\n");
            out.push_str(&stderr);
        }
        out
    }

    /// Poll the log until it contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(25));
        }
    }

    /// Where `user`'s mail lives (`<dir>/home/<user>/Maildir`). Dovecot
    /// lowercases usernames (auth_username_format = %Lu), so this does too.
    /// The directory only exists after the user's first login or [`Dovecot::deliver`].
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.dir.path().join("home").join(user.to_lowercase()).join("Maildir")
    }

    /// Drop a raw RFC 5322 message into `user`'s INBOX (Maildir `new/`),
    /// creating the Maildir if needed, owned by the mail uid/gid.
    /// Returns the path of the new file.
    pub fn deliver(&self, user: &str, message: &[u8]) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let (uid, gid) = mail_ids();
        let maildir = self.maildir(user);
        let home = maildir.parent().expect("maildir has a parent").to_path_buf();
        for d in [home.clone(), maildir.clone(), maildir.join("cur"), maildir.join("new"), maildir.join("tmp")] {
            if !d.exists() {
                fs::create_dir(&d).unwrap_or_else(|e| panic!("dovecot: mkdir {}: {e}", d.display()));
                set_mode(&d, 0o700);
                chown(&d, uid, gid);
            }
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let name = format!(
            "{}.M{}P{}Q{}.mailgate-test",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = maildir.join("tmp").join(&name);
        fs::write(&tmp, message).unwrap_or_else(|e| panic!("dovecot: write {}: {e}", tmp.display()));
        set_mode(&tmp, 0o600);
        chown(&tmp, uid, gid);
        let dest = maildir.join("new").join(&name);
        fs::rename(&tmp, &dest).unwrap_or_else(|e| panic!("dovecot: rename into {}: {e}", dest.display()));
        dest
    }

    /// Stop now (same as dropping, but keeps `dir` around for inspection).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // Fields (incl. the TempDir) are dropped after this, i.e. after the
        // server is gone.
        self.stop();
    }
}

fn stop_child(child: &mut Child) {
    // Only signal while the child is un-reaped: its PID cannot have been
    // reused by anything else until we wait() for it.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let master = child.id();
    // Dovecot's service processes that still serve a client (imap-login,
    // imap, and log/stats/config/auth they talk to) outlive the master's
    // SIGTERM until that client disconnects. Remember them (PID + start time,
    // so a reused PID is never signalled) and stop them too.
    let children = child_processes(master);
    let termed = signal(&[master], "TERM");
    if termed {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => sleep(Duration::from_millis(20)),
            }
        }
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill(); // SIGKILL
    }
    let _ = child.wait();

    let alive = |procs: &[(u32, u64)]| -> Vec<u32> {
        procs
            .iter()
            .filter(|(pid, start)| proc_stat(*pid).is_some_and(|(_, s)| s == *start))
            .map(|(pid, _)| *pid)
            .collect()
    };
    let left = alive(&children);
    if left.is_empty() {
        return;
    }
    signal(&left, "TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !alive(&children).is_empty() {
        sleep(Duration::from_millis(20));
    }
    let left = alive(&children);
    if !left.is_empty() {
        signal(&left, "KILL");
    }
}

/// `kill -<sig> <pids>`; true if the command succeeded.
fn signal(pids: &[u32], sig: &str) -> bool {
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
fn child_processes(parent: u32) -> Vec<(u32, u64)> {
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

/// (ppid, starttime) from /proc/<pid>/stat; None if the process is gone
/// (or is a zombie, which needs no signal).
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
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

fn dovecot_bin() -> PathBuf {
    std::env::var_os("MAILGATE_TEST_DOVECOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DOVECOT_BIN))
}

fn preflight(opts: &DovecotOptions) {
    let bin = dovecot_bin();
    if !bin.exists() {
        panic!("dovecot: {} not found (install dovecot-imapd, or set MAILGATE_TEST_DOVECOT)", bin.display());
    }
    if effective_uid() != Some(0) {
        panic!(
            "dovecot: the Dovecot test harness must run as root (Dovecot drops to \
             nobody/dovecot/dovenull users); effective uid is {:?}",
            effective_uid()
        );
    }
    let check_name = |what: &str, name: &str| {
        if name.is_empty() || name.chars().any(|c| c == ':' || c == '*' || c.is_whitespace() || c.is_control()) {
            panic!("dovecot: invalid {what} {name:?} (must be non-empty, without ':', '*', whitespace)");
        }
    };
    for (user, _) in &opts.users {
        check_name("username", user);
    }
    check_name("master user", &opts.master_user);
    if let Some((cert, key)) = &opts.tls {
        for p in [cert, key] {
            if !p.is_file() {
                panic!("dovecot: TLS file {} does not exist", p.display());
            }
        }
    }
}

fn try_start(opts: &DovecotOptions) -> Result<Dovecot, StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("dovecot: {what}: {e}"));

    let dir = tempfile::Builder::new()
        .prefix("mailgate-dovecot-")
        .tempdir_in(traversable_tmp())
        .map_err(|e| fatal("create temp dir", e))?;
    let root = dir.path().to_path_buf();
    // Unprivileged Dovecot processes (nobody, dovecot, dovenull) must be able
    // to traverse the directory; tempfile creates it 0700.
    set_mode(&root, 0o755);

    let (uid, gid) = mail_ids();
    let home = root.join("home");
    fs::create_dir(&home).map_err(|e| fatal("mkdir home", e))?;
    set_mode(&home, 0o755);
    chown(&home, uid, gid); // homes get auto-created by the imap process (as nobody)
    for sub in ["run", "state"] {
        fs::create_dir(root.join(sub)).map_err(|e| fatal("mkdir", e))?;
    }

    // passwd-files are read by the auth process, which runs as the `dovecot` user.
    let users: String = opts.users.iter().map(|(u, p)| format!("{u}:{}\n", plain_password(p))).collect();
    write_secret(&root.join("users"), &users)?;
    write_secret(
        &root.join("master-users"),
        &format!("{}:{}\n", opts.master_user, plain_password(&opts.master_password)),
    )?;

    let tls = match &opts.tls {
        None => None,
        Some((cert, key)) => {
            // Copy, so the caller may delete its originals; read by the config process (root).
            let tls_dir = root.join("tls");
            fs::create_dir(&tls_dir).map_err(|e| fatal("mkdir tls", e))?;
            set_mode(&tls_dir, 0o700);
            let (c, k) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
            fs::copy(cert, &c).map_err(|e| fatal("copy TLS cert", e))?;
            fs::copy(key, &k).map_err(|e| fatal("copy TLS key", e))?;
            set_mode(&k, 0o600);
            Some((c, k))
        }
    };

    let (port, tls_port) = pick_ports(tls.is_some()).map_err(|e| fatal("pick free ports", e))?;
    let mut conf =
        render_config(&root, port, tls_port, tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())), uid, gid);
    conf.push_str(&opts.extra_config);
    let conf_path = root.join("dovecot.conf");
    fs::write(&conf_path, conf).map_err(|e| fatal("write dovecot.conf", e))?;

    let out = fs::File::create(root.join("dovecot.stderr")).map_err(|e| fatal("create stderr file", e))?;
    let err = out.try_clone().map_err(|e| fatal("dup stderr file", e))?;
    let child = Command::new(dovecot_bin())
        .arg("-F")
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| fatal(&format!("spawn {}", dovecot_bin().display()), e))?;
    let pid = child.id();
    let mut d = Dovecot { port, tls_port, dir, child: Some(child), pid };

    match wait_ready(&mut d) {
        Ok(()) => Ok(d),
        Err(reason) => {
            d.stop();
            let log = d.log();
            let msg = format!(
                "dovecot failed to start ({reason})\n--- {} ---\n{}\n--- log tail ---\n{}",
                d.config_path().display(),
                fs::read_to_string(d.config_path()).unwrap_or_default().trim_end(),
                tail(&log, 40)
            );
            if log.contains("Address already in use") {
                Err(StartError::PortTaken(msg))
            } else {
                Err(StartError::Fatal(msg))
            }
        }
    }
}

fn wait_ready(d: &mut Dovecot) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(child) = d.child.as_mut() {
            match child.try_wait() {
                Ok(Some(status)) => return Err(format!("master exited early: {status}")),
                Ok(None) => {}
                Err(e) => return Err(format!("waitpid: {e}")),
            }
        }
        // The master binds all listeners before logging "starting up", so this
        // also guarantees the greeting below comes from *our* instance and not
        // from something that grabbed the port in between.
        if d.log().contains("starting up") && greeting_ok(d.addr()) {
            match d.tls_addr() {
                None => return Ok(()),
                Some(a) if TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok() => {
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no \"* OK\" greeting on 127.0.0.1:{} within {START_TIMEOUT:?}", d.port));
        }
        sleep(Duration::from_millis(50));
    }
}

fn greeting_ok(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let ok = reader.read_line(&mut line).is_ok() && line.starts_with("* OK");
    if ok {
        let mut w = &stream;
        let _ = w.write_all(b"z LOGOUT\r\n");
        let _ = reader.read_line(&mut line);
    }
    ok
}

fn render_config(
    root: &Path,
    port: u16,
    tls_port: Option<u16>,
    tls: Option<(&Path, &Path)>,
    uid: u32,
    gid: u32,
) -> String {
    let r = root.display();
    let mut c = String::new();
    let _ = write!(
        c,
        "\
# Generated by tests/support/dovecot.rs -- test instance, not for production.
base_dir = {r}/run
state_dir = {r}/state
instance_name = mailgate-test-{port}
listen = 127.0.0.1
protocols = imap

# One file for everything; log() returns it.
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
debug_log_path = {r}/dovecot.log
auth_verbose = yes
verbose_proctitle = yes

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
# Lets the proxy's ID (\"x-originating-ip\" ...) set rip= in the login line.
login_trusted_networks = 127.0.0.0/8
# Tests: answer failed logins after ~0.5 s instead of 2 s (+ growing penalty).
auth_failure_delay = 0

passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = {r}/master-users
}}
passdb {{
  driver = passwd-file
  args = {r}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/home/%u allow_all_users=yes
}}

mail_location = maildir:~/Maildir
# COMPRESS=DEFLATE after login, so the relay is tested with a compressed stream.
mail_plugins = $mail_plugins zlib
protocol imap {{
  mail_max_userip_connections = 1000
  mail_plugins = $mail_plugins imap_zlib
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
# The auth process disables IP-based auth penalties (exponential delays after
# failed logins) when it cannot find this socket under its usual name.
service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
",
        tls_port = tls_port.unwrap_or(0),
    );
    match tls {
        None => c.push_str("ssl = no\n"),
        Some((cert, key)) => {
            let _ = write!(c, "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n", cert.display(), key.display());
        }
    }
    c
}

/// `{PLAIN}pw`, or `{PLAIN.b64}...` when the password would break the passwd-file format.
fn plain_password(pw: &str) -> String {
    if pw.contains([':', '\n', '\r']) || pw.starts_with(char::is_whitespace) || pw.ends_with(char::is_whitespace) {
        format!("{{PLAIN.b64}}{}", base64(pw.as_bytes()))
    } else {
        format!("{{PLAIN}}{pw}")
    }
}

fn base64(data: &[u8]) -> String {
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

fn write_secret(path: &Path, content: &str) -> Result<(), StartError> {
    fs::write(path, content).map_err(|e| StartError::Fatal(format!("dovecot: write {}: {e}", path.display())))?;
    match lookup_id("/etc/group", "dovecot") {
        Some(dovecot_gid) => {
            chown(path, 0, dovecot_gid);
            set_mode(path, 0o640);
        }
        None => set_mode(path, 0o644),
    }
    Ok(())
}

/// Two distinct free loopback ports (the second only if wanted). Both
/// listeners are held at the same time so the ports differ, then released.
fn pick_ports(want_tls: bool) -> std::io::Result<(u16, Option<u16>)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = if want_tls { Some(TcpListener::bind("127.0.0.1:0")?) } else { None };
    let pa = a.local_addr()?.port();
    let pb = match &b {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    Ok((pa, pb))
}

/// uid of `nobody` and gid of `nogroup` (or `nobody`), the mail owner.
fn mail_ids() -> (u32, u32) {
    let uid = lookup_id("/etc/passwd", "nobody").unwrap_or(65534);
    let gid = lookup_id("/etc/group", "nogroup").or_else(|| lookup_id("/etc/group", "nobody")).unwrap_or(65534);
    (uid, gid)
}

/// Third field of the `name:` line of a passwd/group style file.
fn lookup_id(file: &str, name: &str) -> Option<u32> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        f.nth(1)?.parse().ok()
    })
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// TMPDIR if every ancestor is world-traversable (the mail processes run as
/// nobody), else /tmp.
fn traversable_tmp() -> PathBuf {
    let t = std::env::temp_dir();
    let ok = t.ancestors().all(|p| fs::metadata(p).map(|m| m.permissions().mode() & 0o001 != 0).unwrap_or(false));
    if ok { t } else { PathBuf::from("/tmp") }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("dovecot: chmod {mode:o} {}: {e}", path.display()));
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("dovecot: chown {uid}:{gid} {}: {e}", path.display()));
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
