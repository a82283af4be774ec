//! Test support: run a private Postfix 3.7 instance on loopback, relaying everything
//! it accepts to a [`Sink`].
//!
//! Every [`Postfix`] gets its own temporary directory with config_directory
//! (`etc/`: main.cf, master.cf, recipient_access), queue_directory (`spool/`),
//! data_directory (`data/`), the mail log (`postfix.log`, via postlogd
//! `maillog_file`) and a Dovecot auth service (`sasl/`) as Postfix's SASL backend.
//! /etc/postfix and the system Postfix are never used or touched (only the shared
//! binaries and /etc/postfix/postfix-files, dynamicmaps.cf are read).
//! `postfix -c <etc> check` creates the queue directories, then the master daemon
//! runs in the foreground (`/usr/lib/postfix/sbin/master -c <etc> -s`); it and the
//! Dovecot are killed by PID on drop (the master passes SIGTERM on to its children).
//!
//! The smtpd listens on 127.0.0.1:`port`. To `smtpd_authorized_xclient_hosts`
//! (default 127.0.0.0/8) it offers XCLIENT: `XCLIENT LOGIN=alice@example.com
//! ADDR=127.0.0.9` answers with a new `220` greeting (send EHLO again) and makes
//! the session SASL-authenticated as alice (`sasl_method=XCLIENT`), which satisfies
//! `smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination`.
//! NB: permit_sasl_authenticated ignores the XCLIENT login unless
//! `smtpd_sasl_auth_enable = yes`, which needs a working SASL backend, hence the
//! Dovecot. It also makes `AUTH PLAIN`/`LOGIN` work (users, and the master user with
//! authzid, as in [`super::submission`]). Without XCLIENT LOGIN or AUTH every
//! recipient gets `554 5.7.1 <rcpt>: Relay access denied`.
//! The recipient [`REJECTED_RECIPIENT`] is refused (after relay permission) with
//! [`POSTFIX_REJECT_REPLY`]. Accepted mail goes to `relayhost = [127.0.0.1]:<sink>`
//! at once (typically within 0.3 s).
//!
//! Log lines (see [`Postfix::log`]) after XCLIENT:
//! `postfix-mailgate-test/smtpd[..]: 0B1C29A0037: client=unknown[127.0.0.9],
//! sasl_method=XCLIENT, sasl_username=alice@example.com` (with `NAME=x.example`:
//! `client=x.example[127.0.0.9]`; no reverse DNS is done: `smtpd_peername_lookup = no`).
//!
//! What the sink receives: the message as sent, with ONE header field prepended
//! (see [`Delivered::added_received`]); nothing else is added (no Message-ID, Date,
//! From, To), no MIME conversion, no line wrapping (2000-octet lines pass):
//! ```text
//! Received: from <EHLO name> (unknown [<client addr>])\r\n
//! \tby postfix.mailgate.test (Postfix) with ESMTPA id <queue id>\r\n
//! \tfor <rcpt>; Sat, 28 Nov 2026 08:22:14 +0000 (UTC)\r\n
//! ```
//! (`for <rcpt>` only with exactly one recipient; otherwise the second line ends in
//! `id <queue id>;` and the date is alone on the third; `(unknown [addr])` becomes
//! `(<NAME> [addr])` with XCLIENT NAME. No TLS is configured, so never `ESMTPSA`.)
//! Postfix stores lines, so a bare LF arrives as CRLF and a bare CR as a space.
//! The envelope is relayed as `MAIL FROM:<..> SIZE=<n>[ BODY=8BITMIME]`.
//!
//! Requirements: Debian `postfix` (`/usr/sbin/postfix`, `/usr/lib/postfix/sbin/master`),
//! the `postfix` user and `postdrop` group, Dovecot (`/usr/sbin/dovecot`, or
//! `MAILGATE_TEST_DOVECOT`), running as root. Only std and `tempfile`; the helpers
//! shared with the other harnesses are in [`super::daemon`].

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::daemon::{
    START_ATTEMPTS, StartError, check_running, dovecot_bin, effective_uid, lookup_id, mail_ids, pick_ports, poll,
    push_section, read_log, retry_start, set_mode, smtp_greeting_ok, spawn_dovecot, spawn_logged, start_failure,
    stop_child, tail, temp_dir, try_poll, write_passwd_files,
};
pub use super::sink::{Delivered, REJECTED_RECIPIENT, Sink};

use std::fs;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `postfix` command (Debian `postfix`).
const POSTFIX_BIN: &str = "/usr/sbin/postfix";
/// The master daemon (Debian's daemon_directory).
const MASTER_BIN: &str = "/usr/lib/postfix/sbin/master";
/// `myhostname` of the test instance: in the greeting, EHLO reply and Received header.
pub const POSTFIX_HOSTNAME: &str = "postfix.mailgate.test";
/// Exact reply to `RCPT TO:<reject@example.com>` (from an authenticated session).
pub const POSTFIX_REJECT_REPLY: &str =
    "550 5.7.1 <reject@example.com>: Recipient address rejected: refused by the test";
/// The recipient_access entry producing [`POSTFIX_REJECT_REPLY`].
const REJECT_ACTION: &str = "550 5.7.1 refused by the test";
/// How long [`Postfix::start`] waits for the greeting.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What to configure in the test Postfix.
#[derive(Clone, Debug)]
pub struct PostfixOptions {
    /// `smtpd_authorized_xclient_hosts` (default `127.0.0.0/8`; empty: no XCLIENT).
    pub xclient_hosts: String,
    /// (username, plaintext password) pairs for `AUTH` (Dovecot SASL passdb).
    pub users: Vec<(String, String)>,
    /// Master user for `AUTH PLAIN` with authzid (like [`SubmissionOptions`](super::submission::SubmissionOptions)).
    pub master_user: String,
    pub master_password: String,
    /// Extra main.cf lines (`name = value`), appended last (so they override).
    pub extra_main_cf: Vec<String>,
}

impl Default for PostfixOptions {
    fn default() -> Self {
        PostfixOptions {
            xclient_hosts: "127.0.0.0/8".to_owned(),
            users: vec![("alice@example.com".to_owned(), "alice-password".to_owned())],
            master_user: "mailgate".to_owned(),
            master_password: "master-password".to_owned(),
            extra_main_cf: Vec::new(),
        }
    }
}

/// A running private Postfix; stopped (SIGTERM, then SIGKILL) on drop.
///
/// Greeting: `220 postfix.mailgate.test ESMTP Postfix (mailgate test)`.
/// EHLO from 127.0.0.1 (an authorized XCLIENT host), before and after XCLIENT:
/// ```text
/// 250-postfix.mailgate.test
/// 250-PIPELINING
/// 250-SIZE 10240000
/// 250-VRFY
/// 250-ETRN
/// 250-AUTH PLAIN LOGIN
/// 250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT
/// 250-ENHANCEDSTATUSCODES
/// 250-8BITMIME
/// 250-DSN
/// 250-SMTPUTF8
/// 250 CHUNKING
/// ```
pub struct Postfix {
    /// smtpd port on 127.0.0.1.
    pub port: u16,
    /// Everything lives here; removed after the server has stopped.
    pub dir: tempfile::TempDir,
    /// The relayhost: every accepted message ends up here.
    pub sink: Sink,
    child: Option<Child>,
    pid: u32,
    /// The Dovecot (auth service only) answering Postfix's SASL requests.
    sasl: Option<Child>,
}

impl Postfix {
    /// Start the sink and Postfix, wait (max 30 s) until the smtpd greets with
    /// `220 `. Panics with the log tail if it cannot start.
    pub fn start(opts: PostfixOptions) -> Postfix {
        preflight();
        retry_start(|| try_start(&opts)).unwrap_or_else(|last| {
            panic!("postfix: could not bind a free port after {START_ATTEMPTS} attempts\n{last}")
        })
    }

    /// PID of the master daemon.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `127.0.0.1:<port>` of the smtpd.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The config_directory (main.cf, master.cf).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// `maillog_file`.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postfix.log")
    }

    /// The mail log (`postfix-mailgate-test/smtpd[..]: connect from localhost[127.0.0.1]`,
    /// `... client=unknown[127.0.0.9], sasl_username=alice@example.com` after
    /// XCLIENT, `NOQUEUE: reject: RCPT from ...`, `postfix-mailgate-test/smtp[..]: ...
    /// relay=127.0.0.1[127.0.0.1]:<sink>, ... status=sent (250 2.0.0 Ok: queued by
    /// the test sink)`), then the output of `postfix check` and the master's
    /// stdout/stderr if non-empty, then the sink's SMTP transcript. Written
    /// asynchronously: use [`Postfix::wait_for_log`].
    pub fn log(&self) -> String {
        let mut out = read_log(&self.log_path());
        for (name, file) in [
            ("postfix check", "check.out"),
            ("master stdout/stderr", "master.stderr"),
            ("dovecot SASL log", "sasl/dovecot.log"),
            ("dovecot SASL stdout/stderr", "sasl/dovecot.stderr"),
        ] {
            push_section(&mut out, name, &read_log(&self.dir.path().join(file)));
        }
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
    /// with the Postfix log tail and sink transcript after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        self.sink.try_wait_for_messages(n, timeout).unwrap_or_else(|| {
            panic!(
                "postfix: relay sink has {} message(s) after {timeout:?}, wanted {n}\n--- log tail ---\n{}",
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
        if let Some(mut child) = self.sasl.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

fn preflight() {
    for bin in [POSTFIX_BIN, MASTER_BIN, dovecot_bin().to_str().unwrap_or_default()] {
        if !Path::new(bin).exists() {
            panic!("postfix: {bin} not found (install the Debian packages postfix and dovecot-core)");
        }
    }
    if effective_uid() != Some(0) {
        panic!("postfix: the Postfix test harness must run as root; effective uid is {:?}", effective_uid());
    }
    if lookup_id("/etc/passwd", "postfix").is_none() || lookup_id("/etc/group", "postdrop").is_none() {
        panic!("postfix: the postfix user and postdrop group are missing (created by the Debian package)");
    }
}

fn try_start(opts: &PostfixOptions) -> Result<Postfix, StartError> {
    let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("postfix: {what}: {e}"));

    let dir = temp_dir("mailgate-postfix-").map_err(|e| fatal("create temp dir", e))?;
    let root = dir.path().to_path_buf();
    // Daemons running as `postfix` use absolute paths below it (data_directory,
    // the SASL socket).
    set_mode(&root, 0o755);
    for (sub, mode) in [("etc", 0o755), ("spool", 0o755), ("sasl", 0o755), ("sasl/run", 0o755), ("sasl/state", 0o700)] {
        let d = root.join(sub);
        fs::create_dir(&d).map_err(|e| fatal(&format!("mkdir {}", d.display()), e))?;
        set_mode(&d, mode);
    }
    let etc = root.join("etc");

    let sink = Sink::start();
    let port = pick_ports(1).map_err(|e| fatal("pick a free port", e))?[0];
    let mut p = Postfix { port, dir, sink, child: None, pid: 0, sasl: None };
    let fail = |p: &mut Postfix, reason: String| -> StartError {
        p.stop();
        start_failure("postfix", &reason, &p.config_dir().join("main.cf"), &p.log())
    };

    // 1. Dovecot, auth service only, for smtpd_sasl_type = dovecot.
    if let Err(reason) = start_sasl(&mut p, opts) {
        return Err(fail(&mut p, reason));
    }

    // 2. Postfix config.
    let write = |name: &str, content: &str| -> Result<(), StartError> {
        let f = etc.join(name);
        fs::write(&f, content).map_err(|e| fatal(&format!("write {}", f.display()), e))?;
        set_mode(&f, 0o644);
        Ok(())
    };
    write("main.cf", &render_main_cf(&root, p.sink.port, opts))?;
    write("master.cf", &render_master_cf(port))?;
    write(
        "recipient_access",
        &format!("# texthash: map, read as is (no postmap).\n{REJECTED_RECIPIENT} {REJECT_ACTION}\n"),
    )?;

    // 3. `postfix check` creates the queue directories (post-install create-missing)
    //    and checks the config. NB: it reports problems only via syslog.
    let out = fs::File::create(root.join("check.out")).map_err(|e| fatal("create check.out", e))?;
    let err = out.try_clone().map_err(|e| fatal("dup check.out", e))?;
    let status = Command::new(POSTFIX_BIN)
        .arg("-c")
        .arg(&etc)
        .arg("check")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| fatal("run postfix check", e))?;
    if !status.success() {
        let postconf = Command::new("postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-n")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        return Err(fail(
            &mut p,
            format!(
                "`postfix -c {} check` failed: {status}; it only reports to syslog (/dev/log). \
                 postconf warnings: {postconf:?}",
                etc.display()
            ),
        ));
    }

    // 4. The master daemon, in the foreground (without -w it does not fork; it
    //    only calls setsid()).
    let mut master = Command::new(MASTER_BIN);
    master.arg("-c").arg(&etc).arg("-s").env("MAIL_CONFIG", &etc);
    let child =
        spawn_logged(&mut master, &root.join("master.stderr"), "master.stderr").map_err(|(what, e)| fatal(&what, e))?;
    p.pid = child.id();
    p.child = Some(child);

    match wait_ready(&mut p) {
        Ok(()) => Ok(p),
        Err(reason) => Err(fail(&mut p, reason)),
    }
}

/// Start a Dovecot with only the auth service, listening on `<dir>/sasl/auth`
/// (mode 0666) for Postfix's smtpd, with the users and master user of `opts`.
fn start_sasl(p: &mut Postfix, opts: &PostfixOptions) -> Result<(), String> {
    let bin = dovecot_bin();
    if !bin.exists() {
        return Err(format!("{} not found (install dovecot-core, or set MAILGATE_TEST_DOVECOT)", bin.display()));
    }
    let d = p.dir.path().join("sasl");
    write_passwd_files(&d, &opts.users, (&opts.master_user, &opts.master_password))?;
    let (uid, gid) = mail_ids();
    let conf = render_sasl_config(&d, p.port, uid, gid);
    let conf_path = d.join("dovecot.conf");
    fs::write(&conf_path, conf).map_err(|e| format!("write {}: {e}", conf_path.display()))?;
    let child = spawn_dovecot(&conf_path, &d.join("dovecot.stderr"), "dovecot.stderr")
        .map_err(|(what, e)| format!("{what}: {e}"))?;
    p.sasl = Some(child);
    let socket = d.join("auth");
    let ready = try_poll(START_TIMEOUT, Duration::from_millis(50), || {
        if let Some(Ok(Some(status))) = p.sasl.as_mut().map(Child::try_wait) {
            return Err(format!("dovecot (SASL) exited early: {status}"));
        }
        Ok(socket.exists() && UnixStream::connect(&socket).is_ok())
    })?;
    if ready { Ok(()) } else { Err(format!("dovecot (SASL): no socket {} within {START_TIMEOUT:?}", socket.display())) }
}

fn render_sasl_config(d: &Path, port: u16, uid: u32, gid: u32) -> String {
    let d = d.display();
    format!(
        "\
# Generated by tests/support/postfix.rs -- SASL backend of the test Postfix.
base_dir = {d}/run
state_dir = {d}/state
instance_name = mailgate-postfix-sasl-{port}
protocols = none
listen = 127.0.0.1
ssl = no
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
debug_log_path = {d}/dovecot.log
auth_verbose = yes
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = {d}/master-users
}}
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home=/nonexistent allow_all_users=yes
}}
service auth {{
  unix_listener {d}/auth {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
"
    )
}

fn wait_ready(p: &mut Postfix) -> Result<(), String> {
    let ready = try_poll(START_TIMEOUT, Duration::from_millis(50), || {
        check_running(p.child.as_mut(), "master")?;
        // The master opens all listeners before logging "daemon started".
        Ok::<bool, String>(p.log().contains("daemon started") && smtp_greeting_ok(p.addr()))
    })?;
    if ready { Ok(()) } else { Err(format!("no \"220 \" greeting on 127.0.0.1:{} within {START_TIMEOUT:?}", p.port)) }
}

fn render_main_cf(root: &Path, sink_port: u16, opts: &PostfixOptions) -> String {
    let r = root.display();
    let mut c = format!(
        "\
# Generated by tests/support/postfix.rs -- test instance, not for production.
compatibility_level = 3.6
queue_directory = {r}/spool
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {r}/postfix.log
# maillog_file must start with one of these (default: /var, /dev/stdout).
maillog_file_prefixes = {r}
syslog_name = postfix-mailgate-test

myhostname = {POSTFIX_HOSTNAME}
mydomain = mailgate.test
myorigin = $myhostname
smtpd_banner = $myhostname ESMTP Postfix (mailgate test)
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32

# Nothing is delivered locally; everything goes to the sink.
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled in the test instance
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
smtp_connect_timeout = 5s

# XCLIENT from these hosts. XCLIENT LOGIN=... sets sasl_username (sasl_method=XCLIENT),
# but permit_sasl_authenticated only looks at it when smtpd_sasl_auth_enable = yes,
# which needs a working SASL backend: a Dovecot auth service (cyrus would need
# the libsasl2-modules plugins, a mere Recommends).
smtpd_authorized_xclient_hosts = {xclient}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {r}/sasl/auth
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access texthash:{r}/etc/recipient_access
# No reverse DNS for (XCLIENT) client addresses: shown as unknown[addr].
smtpd_peername_lookup = no
smtpd_helo_required = no

# Change messages as little as possible: no header rewriting or adding of
# Message-ID/Date/From/To (even for local clients), no MIME conversion, no
# line wrapping when relaying.
local_header_rewrite_clients =
always_add_missing_headers = no
undisclosed_recipients_header =
disable_mime_output_conversion = yes
smtp_line_length_limit = 0
append_dot_mydomain = no
biff = no
smtputf8_enable = yes

# Fast retries, should the sink ever be unreachable.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
",
        xclient = opts.xclient_hosts
    );
    for l in &opts.extra_main_cf {
        c.push_str(l);
        c.push('\n');
    }
    c
}

fn render_master_cf(port: u16) -> String {
    // Debian's master.cf without chroot (the queue dir has no etc/ copies) and
    // with the smtpd only on 127.0.0.1:port.
    format!(
        "\
# Generated by tests/support/postfix.rs -- test instance, not for production.
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
    )
}
