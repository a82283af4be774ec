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
//! Only std and `tempfile` are used; the helpers shared with the other harnesses are in
//! [`super::daemon`].

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Part of this module's API since before the shared code moved to `daemon`.
#[allow(unused_imports)]
pub use super::daemon::DEFAULT_DOVECOT_BIN;
use super::daemon::{
    START_ATTEMPTS, StartError, check_dovecot_options, dovecot_bin, dovecot_instance_dir, dovecot_log, mail_ids,
    pick_ports, poll, retry_start, spawn_dovecot, start_failure, stop_child, tail, try_chown, try_set_mode,
    wait_dovecot_ready,
};

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long [`Dovecot::start`] waits for the greeting.
const START_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// Also serve POP3 (`dovecot-pop3d`) on a free loopback port ([`Dovecot::pop3_port`];
    /// STLS offered when TLS is configured). Off by default.
    pub pop3: bool,
    /// Also serve ManageSieve (`dovecot-managesieved`) on a free loopback port
    /// ([`Dovecot::sieve_port`]), with Pigeonhole filtering what [`Dovecot::deliver_lda`]
    /// delivers. Off by default.
    pub sieve: bool,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions {
            users: vec![("alice@example.com".to_owned(), "alice-password".to_owned())],
            master_user: "mailgate".to_owned(),
            master_password: "master-password".to_owned(),
            tls: None,
            extra_config: String::new(),
            pop3: false,
            sieve: false,
        }
    }
}

/// A running Dovecot; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Dovecot {
    /// Plain IMAP port on 127.0.0.1 (STARTTLS is offered when TLS is configured).
    pub port: u16,
    /// Implicit-TLS (imaps) port on 127.0.0.1, only when TLS is configured.
    pub tls_port: Option<u16>,
    /// Plain POP3 port on 127.0.0.1, only with [`DovecotOptions::pop3`]. Dovecot takes
    /// `XCLIENT` on it from loopback (`login_trusted_networks`).
    pub pop3_port: Option<u16>,
    /// Plain ManageSieve port on 127.0.0.1 (STARTTLS offered when TLS is configured),
    /// only with [`DovecotOptions::sieve`]; `XCLIENT` taken from loopback.
    pub sieve_port: Option<u16>,
    /// Everything lives here; removed after the server has stopped.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
}

impl Dovecot {
    /// Start Dovecot and wait (max 20 s) until the plain port greets with `* OK`.
    /// Panics with the log tail if it cannot start.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        preflight(&opts);
        retry_start(|| try_start(&opts))
            .unwrap_or_else(|last| panic!("dovecot: could not bind free ports after {START_ATTEMPTS} attempts\n{last}"))
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
        dovecot_log(self.dir.path())
    }

    /// Poll the log until it contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
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

    /// Delivers `message` to `user` through Dovecot's LDA (`dovecot-lda -d`), so that the
    /// user's active Sieve script (Pigeonhole) files it. Panics with the LDA's output if
    /// it fails.
    pub fn deliver_lda(&self, user: &str, message: &[u8]) {
        use std::io::Write as _;
        let mut child = std::process::Command::new("/usr/lib/dovecot/dovecot-lda")
            .arg("-c")
            .arg(self.config_path())
            .args(["-d", user, "-f", "sender@example.com"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("dovecot-lda: {e}"));
        child.stdin.take().unwrap().write_all(message).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "dovecot-lda: {}\n{}{}\n--- log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
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

fn preflight(opts: &DovecotOptions) {
    let bin = dovecot_bin();
    if !bin.exists() {
        panic!("dovecot: {} not found (install dovecot-imapd, or set MAILGATE_TEST_DOVECOT)", bin.display());
    }
    check_dovecot_options("dovecot", &opts.users, &opts.master_user, opts.tls.as_ref());
}

fn try_start(opts: &DovecotOptions) -> Result<Dovecot, StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("dovecot: {what}: {e}"));

    let (dir, tls) = dovecot_instance_dir(
        "dovecot",
        "mailgate-dovecot-",
        &opts.users,
        (&opts.master_user, &opts.master_password),
        opts.tls.as_ref(),
    )?;
    let root = dir.path().to_path_buf();
    let (uid, gid) = mail_ids();

    let ports = pick_ports(4).map_err(|e| fatal("pick free ports", e))?;
    let (port, tls_port) = (ports[0], tls.is_some().then_some(ports[1]));
    let pop3_port = opts.pop3.then_some(ports[2]);
    let sieve_port = opts.sieve.then_some(ports[3]);
    let mut conf =
        render_config(&root, port, tls_port, tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())), uid, gid);
    if let Some(pop3) = pop3_port {
        conf = conf.replace("protocols = imap", "protocols = imap pop3");
        let _ = write!(
            conf,
            "protocol pop3 {{\n  mail_max_userip_connections = 1000\n}}\n\
             service pop3-login {{\n  inet_listener pop3 {{\n    address = 127.0.0.1\n    port = {pop3}\n  }}\n\
             \x20 inet_listener pop3s {{\n    port = 0\n  }}\n}}\n"
        );
    }
    if let Some(sieve) = sieve_port {
        conf = conf.replace("protocols = imap", "protocols = imap sieve");
        let _ = write!(
            conf,
            "service managesieve-login {{\n  inet_listener sieve {{\n    address = 127.0.0.1\n    port = {sieve}\n  }}\n}}\n\
             protocol lda {{\n  mail_plugins = $mail_plugins sieve\n}}\n\
             plugin {{\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n}}\n"
        );
    }
    conf.push_str(&opts.extra_config);
    let conf_path = root.join("dovecot.conf");
    fs::write(&conf_path, conf).map_err(|e| fatal("write dovecot.conf", e))?;

    let child =
        spawn_dovecot(&conf_path, &root.join("dovecot.stderr"), "stderr file").map_err(|(what, e)| fatal(&what, e))?;
    let pid = child.id();
    let mut d = Dovecot { port, tls_port, pop3_port, sieve_port, dir, child: Some(child), pid };

    match wait_dovecot_ready(&mut d.child, &root, (port, tls_port), ("* OK", b"z LOGOUT\r\n"), START_TIMEOUT) {
        Ok(()) => match [pop3_port.map(|p| (p, "+OK")), sieve_port.map(|p| (p, "\"IMPLEMENTATION\""))]
            .into_iter()
            .flatten()
            .map(|(p, greeting)| wait_greets(p, greeting, START_TIMEOUT))
            .find(Result::is_err)
        {
            Some(Err(reason)) => {
                d.stop();
                Err(start_failure("dovecot", &reason, &d.config_path(), &d.log()))
            }
            _ => Ok(d),
        },
        Err(reason) => {
            d.stop();
            Err(start_failure("dovecot", &reason, &d.config_path(), &d.log()))
        }
    }
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

/// Waits until `port` greets with a line that starts with `greeting` (POP3's `+OK`,
/// ManageSieve's capability listing).
fn wait_greets(port: u16, greeting: &str, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut last = String::from("no answer");
    let ok = poll(timeout, || {
        let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).unwrap_or(0);
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        let _ = tcp.write_all(if greeting == "+OK" { b"QUIT\r\n" } else { b"LOGOUT\r\n" });
        last.starts_with(greeting)
    });
    if ok { Ok(()) } else { Err(format!("port {port} did not greet with {greeting}: {last}")) }
}

/// chmod, panicking with a `dovecot:` message.
fn set_mode(path: &Path, mode: u32) {
    try_set_mode(path, mode).unwrap_or_else(|e| panic!("dovecot: {e}"));
}

/// chown, panicking with a `dovecot:` message.
fn chown(path: &Path, uid: u32, gid: u32) {
    try_chown(path, uid, gid).unwrap_or_else(|e| panic!("dovecot: {e}"));
}
