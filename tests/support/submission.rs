//! Test support: run a real Dovecot 2.3 **submission** server (SMTP, RFC 6409) on
//! loopback, relaying everything it accepts to a [`Sink`].
//!
//! Every [`Submission`] gets its own temporary directory holding the config,
//! base_dir, state_dir, log file, passwd files and (empty) homes, and its own
//! [`Sink`] (the `submission_relay_host`, plain SMTP, no AUTH). The system
//! configuration in /etc/dovecot and the system Dovecot service are never used or
//! touched; only the master process started here (and its children) are killed when
//! the value is dropped.
//!
//! Logging in: `AUTH PLAIN base64(authzid \0 authcid \0 password)` with
//! authzid = the user and authcid/password = the master user, e.g.
//! [`master_plain`]`("alice@example.com", "mailgate", "master-password")`; or the
//! user's own password (empty authzid). `AUTH LOGIN` with `user*master` works too
//! (auth_master_user_separator = *). Plaintext auth is allowed without TLS.
//!
//! XCLIENT: clients from 127.0.0.0/8 (login_trusted_networks) are offered
//! `XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT FORWARD` before
//! authentication. `XCLIENT ADDR=192.0.2.7 PORT=4242` is answered with a fresh
//! `220` greeting (send EHLO again) and sets the client address: log line
//! `submission-login: Login: user=<alice@example.com>, method=PLAIN, rip=192.0.2.7,
//! lip=127.0.0.1, ...` and `Received: from <ehlo> ([192.0.2.7])`. XCLIENT LOGIN=
//! does NOT authenticate (MAIL then gets `530 5.7.0 Authentication required.`).
//! After AUTH, EHLO no longer offers XCLIENT.
//!
//! What the relay host receives: the message exactly as sent (8-bit, 2000-octet
//! lines and leading dots pass unchanged), with ONE header field prepended (see
//! [`Delivered::added_received`]):
//! ```text
//! Received: from <EHLO name> ([<client ip>])\r\n
//! \tby submission.mailgate.test with ESMTPA\r\n
//! \tid <base64 id>\r\n
//! \t(envelope-from <alice@example.com>)\r\n
//! \tfor <bob@example.org>; Sat, 28 Nov 2026 08:20:23 +0000\r\n
//! ```
//! (`ESMTPSA` over TLS; with more than one recipient the `for <..>` part is left
//! out: `(envelope-from <..>); <date>`.) Bare LF in the message arrives as CRLF.
//! The envelope is relayed as sent (`MAIL FROM:<..> BODY=8BITMIME` stays), after an
//! `EHLO submission.mailgate.test` and an `RSET`. A relay-host refusal is passed
//! on with the recipient inserted: the sink's `550 5.1.1 Recipient refused by the
//! test sink` reaches the client as `550 5.1.1 <reject@example.com> Recipient
//! refused by the test sink`.
//!
//! Requirements: `/usr/sbin/dovecot` (override with `MAILGATE_TEST_DOVECOT`) with the
//! submission service (Debian `dovecot-submissiond`), the Debian `dovecot`/`dovenull`
//! users, running as root. Only std and `tempfile`; the helpers shared with the other
//! harnesses are in [`super::daemon`].

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Part of this module's API (postfix.rs used them from here) since before the shared
// code moved to `daemon`.
#[allow(unused_imports)]
pub use super::daemon::{DEFAULT_DOVECOT_BIN, base64, dovecot_bin, mail_ids, plain_password, write_secret};
use super::daemon::{
    START_ATTEMPTS, StartError, check_dovecot_options, dovecot_instance_dir, dovecot_log, pick_ports, poll,
    push_section, retry_start, spawn_dovecot, start_failure, stop_child, tail, wait_dovecot_ready,
};
pub use super::sink::{Delivered, Sink};

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

/// The submission service binary from Debian `dovecot-submissiond`.
const SUBMISSION_BIN: &str = "/usr/lib/dovecot/submission";
/// `hostname` of the test server: in the greeting, EHLO reply and Received header.
pub const SUBMISSION_HOSTNAME: &str = "submission.mailgate.test";
/// What the client gets for `RCPT TO:<reject@example.com>`: the sink's
/// [`REJECTED_REPLY`](super::sink::REJECTED_REPLY), passed on by Dovecot with the
/// recipient inserted.
pub const SUBMISSION_REJECT_REPLY: &str = "550 5.1.1 <reject@example.com> Recipient refused by the test sink";
/// How long [`Submission::start`] waits for the greeting.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What to configure in the test submission server.
#[derive(Clone, Debug)]
pub struct SubmissionOptions {
    /// (username, plaintext password) pairs for the regular passdb.
    pub users: Vec<(String, String)>,
    /// Master user name (log in as anyone with SASL PLAIN authzid or `user*master`).
    pub master_user: String,
    pub master_password: String,
    /// (certificate PEM chain, private key PEM). If set: `ssl = yes`, STARTTLS on
    /// the plain port and an implicit-TLS (submissions) listener on `tls_port`.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for SubmissionOptions {
    fn default() -> Self {
        SubmissionOptions {
            users: vec![("alice@example.com".to_owned(), "alice-password".to_owned())],
            master_user: "mailgate".to_owned(),
            master_password: "master-password".to_owned(),
            tls: None,
        }
    }
}

/// A running Dovecot submission server; stopped (SIGTERM, then SIGKILL) on drop.
///
/// Greeting: `220 submission.mailgate.test Dovecot (Debian) ready.`
/// EHLO from 127.0.0.1 before login:
/// ```text
/// 250-submission.mailgate.test
/// 250-8BITMIME
/// 250-AUTH PLAIN LOGIN
/// 250-BURL imap
/// 250-CHUNKING
/// 250-ENHANCEDSTATUSCODES
/// 250-SIZE
/// 250-PIPELINING
/// 250 XCLIENT ADDR PORT PROTO HELO LOGIN SESSION TTL TIMEOUT FORWARD
/// ```
/// (`250-STARTTLS` before `250-PIPELINING` when TLS is configured and not yet
/// active.) After AUTH: `250-submission.mailgate.test`, `250-8BITMIME`, `250-AUTH`,
/// `250-BURL imap imap://submission.mailgate.test`, `250-CHUNKING`,
/// `250-ENHANCEDSTATUSCODES`, `250-PIPELINING`, `250 SIZE 41943040`.
pub struct Submission {
    /// Plain submission port on 127.0.0.1 (STARTTLS offered when TLS is configured).
    pub port: u16,
    /// Implicit-TLS (submissions) port on 127.0.0.1, only when TLS is configured.
    pub tls_port: Option<u16>,
    /// Everything lives here; removed after the server has stopped.
    pub dir: tempfile::TempDir,
    /// The relay host: every accepted message ends up here.
    pub sink: Sink,
    child: Option<Child>,
    pid: u32,
}

impl Submission {
    /// Start the sink and Dovecot, wait (max 20 s) until the plain port greets
    /// with `220 `. Panics with the log tail if it cannot start.
    pub fn start(opts: SubmissionOptions) -> Submission {
        preflight(&opts);
        retry_start(|| try_start(&opts)).unwrap_or_else(|last| {
            panic!("submission: could not bind free ports after {START_ATTEMPTS} attempts\n{last}")
        })
    }

    /// PID of the Dovecot master process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `127.0.0.1:<port>` of the plain submission listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:<tls_port>` of the submissions listener, if TLS is configured.
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

    /// Whole Dovecot log (`submission-login: Login: user=<alice@example.com>,
    /// method=PLAIN, rip=.., lip=..` lines, relay errors, `submission(alice..):
    /// Disconnected: ...`), then anything the master printed on stdout/stderr, then
    /// the sink's SMTP transcript. Written asynchronously: use
    /// [`Submission::wait_for_log`] right after an action.
    pub fn log(&self) -> String {
        let mut out = dovecot_log(self.dir.path());
        push_section(&mut out, "relay sink transcript", &self.sink.transcript());
        out
    }

    /// Poll the log until it contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
    }

    /// Messages the relay sink accepted so far.
    pub fn messages(&self) -> Vec<Delivered> {
        self.sink.messages()
    }

    /// Wait until the sink has at least `n` messages and return them all; panics
    /// with the Dovecot log tail and sink transcript after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        self.sink.try_wait_for_messages(n, timeout).unwrap_or_else(|| {
            panic!(
                "submission: relay sink has {} message(s) after {timeout:?}, wanted {n}\n--- log tail ---\n{}",
                self.messages().len(),
                tail(&self.log(), 60)
            )
        })
    }

    /// Stop now (same as dropping, but keeps `dir` around for inspection).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for Submission {
    fn drop(&mut self) {
        self.stop();
    }
}

fn preflight(opts: &SubmissionOptions) {
    let bin = dovecot_bin();
    if !bin.exists() {
        panic!("submission: {} not found (install dovecot-core, or set MAILGATE_TEST_DOVECOT)", bin.display());
    }
    if !Path::new(SUBMISSION_BIN).exists() {
        panic!("submission: {SUBMISSION_BIN} not found (install dovecot-submissiond)");
    }
    check_dovecot_options("submission", &opts.users, &opts.master_user, opts.tls.as_ref());
}

fn try_start(opts: &SubmissionOptions) -> Result<Submission, StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("submission: {what}: {e}"));

    let (dir, tls) = dovecot_instance_dir(
        "submission",
        "mailgate-submission-",
        &opts.users,
        (&opts.master_user, &opts.master_password),
        opts.tls.as_ref(),
    )?;
    let root = dir.path().to_path_buf();
    let (uid, gid) = mail_ids();

    let sink = Sink::start();
    let ports = pick_ports(if tls.is_some() { 2 } else { 1 }).map_err(|e| fatal("pick free ports", e))?;
    let (port, tls_port) = (ports[0], ports.get(1).copied());
    let conf = render_config(
        &root,
        port,
        tls_port,
        tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        sink.port,
        uid,
        gid,
    );
    let conf_path = root.join("dovecot.conf");
    fs::write(&conf_path, conf).map_err(|e| fatal("write dovecot.conf", e))?;

    let child =
        spawn_dovecot(&conf_path, &root.join("dovecot.stderr"), "stderr file").map_err(|(what, e)| fatal(&what, e))?;
    let pid = child.id();
    let mut s = Submission { port, tls_port, dir, sink, child: Some(child), pid };

    match wait_dovecot_ready(&mut s.child, &root, (port, tls_port), ("220 ", b"QUIT\r\n"), START_TIMEOUT) {
        Ok(()) => Ok(s),
        Err(reason) => {
            s.stop();
            Err(start_failure("dovecot submission", &reason, &s.config_path(), &s.log()))
        }
    }
}

fn render_config(
    root: &Path,
    port: u16,
    tls_port: Option<u16>,
    tls: Option<(&Path, &Path)>,
    relay_port: u16,
    uid: u32,
    gid: u32,
) -> String {
    let r = root.display();
    let mut c = String::new();
    let _ = write!(
        c,
        "\
# Generated by tests/support/submission.rs -- test instance, not for production.
base_dir = {r}/run
state_dir = {r}/state
instance_name = mailgate-submission-{port}
listen = 127.0.0.1
protocols = submission
hostname = {SUBMISSION_HOSTNAME}

# One file for everything; log() returns it.
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
debug_log_path = {r}/dovecot.log
auth_verbose = yes
verbose_proctitle = yes

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
# XCLIENT (and, for IMAP, ID x-originating-ip) from these set rip=/rport=.
login_trusted_networks = 127.0.0.0/8
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

# The submission process opens the user's storage (for BURL) and fails without it.
mail_location = maildir:~/Maildir

# Everything accepted is relayed, unauthenticated and in plain text, to the sink.
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}
submission_relay_ssl = no
submission_relay_trusted = no

service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {port}
  }}
"
    );
    if let Some(tp) = tls_port {
        let _ = write!(
            c,
            "  inet_listener submissions {{
    address = 127.0.0.1
    port = {tp}
    ssl = yes
  }}
"
        );
    }
    c.push_str(
        "}
# The auth process disables IP-based auth penalties when it cannot find this socket
# under its usual name.
service anvil {
  unix_listener anvil-auth-penalty {
    path = anvil-auth-penalty-disabled
  }
}
",
    );
    match tls {
        None => c.push_str("ssl = no\n"),
        Some((cert, key)) => {
            let _ = write!(c, "ssl = yes\nssl_cert = <{}\nssl_key = <{}\n", cert.display(), key.display());
        }
    }
    c
}

/// `AUTH PLAIN` initial response for logging in as `user` with the master user's
/// credentials: `base64(user \0 master \0 password)`.
pub fn master_plain(user: &str, master: &str, password: &str) -> String {
    base64(format!("{user}\0{master}\0{password}").as_bytes())
}
