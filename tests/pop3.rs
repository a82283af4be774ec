//! POP3 through mailgate to a real Dovecot (`dovecot-pop3d`) started by the test: Python
//! `poplib` with an app password over implicit TLS and over STLS, STAT/LIST/UIDL/RETR of
//! a message APPENDed over IMAP (byte for byte), DELE + QUIT that really deletes, the
//! 2FA refusal with the URL, the `pop3` scope, and the client's address in Dovecot's
//! log by XCLIENT; fetchmail and getmail6 pulling the inbox. Issue 17.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use std::path::Path;
use std::process::{Command, Output};

/// A 200 KB message: CRLF lines, long lines, 8-bit bytes, and lines that start with a
/// dot (POP3 dot-stuffs them; they must come back as they were).
fn message() -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.com>\r\nSubject: pop me\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        .to_vec();
    let mut n = 0u32;
    while m.len() < 200 * 1024 {
        if n.is_multiple_of(50) {
            m.extend_from_slice(b".a line that starts with a dot\r\n..and two\r\n");
        }
        m.extend_from_slice(format!("line {n:06} ").as_bytes());
        m.extend_from_slice("grüße — ".repeat((n % 7) as usize).as_bytes());
        m.extend_from_slice(&[b'x'; 60]);
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    m
}

/// Every connection goes to 127.0.0.1 from `src` (so Dovecot's log can show the client's
/// own address), TLS checked against the name "localhost".
const PY_PRELUDE: &str = r#"
import imaplib, poplib, socket, ssl, sys
_connect = socket.create_connection
def _from(src):
    def connect(address, timeout=None, source_address=None, **kw):
        return _connect(("127.0.0.1", address[1]), timeout, source_address=(src, 0))
    return connect
def pop(mode, port, ctx):
    if mode == "tls":
        return poplib.POP3_SSL("localhost", int(port), context=ctx, timeout=30)
    p = poplib.POP3("localhost", int(port), timeout=30)
    caps = p.capa()
    assert "STLS" in caps, caps
    p.stls(ctx)
    return p
"#;

/// APPEND over IMAP, then over POP3: STAT, LIST, UIDL, RETR (byte for byte), DELE, QUIT;
/// a second POP3 login finds the mailbox empty.
const PY_ROUND_TRIP: &str = r#"
mode, port, imap_port, user, pw, ca, src, path = sys.argv[1:9]
socket.create_connection = _from(src)
ctx = ssl.create_default_context(cafile=ca)
msg = open(path, "rb").read()
m = imaplib.IMAP4_SSL("localhost", int(imap_port), ssl_context=ctx, timeout=30)
typ, data = m.login(user, pw)
assert typ == "OK", data
typ, data = m.append("INBOX", None, None, msg)
assert typ == "OK", data
m.logout()
p = pop(mode, port, ctx)
assert p.user(user).startswith(b"+OK")
assert p.pass_(pw).startswith(b"+OK"), "login"
count, size = p.stat()
assert (count, size) == (1, len(msg)), (count, size, len(msg))
resp, lines, _ = p.list()
assert lines == [b"1 %d" % len(msg)], lines
resp, lines, _ = p.uidl()
assert len(lines) == 1 and lines[0].startswith(b"1 ") and len(lines[0]) > 2, lines
resp, lines, _ = p.retr(1)
body = b"\r\n".join(lines) + b"\r\n"
assert body == msg, (len(body), len(msg))
assert p.dele(1).startswith(b"+OK")
assert p.quit().startswith(b"+OK")
p = pop(mode, port, ctx)
p.user(user)
p.pass_(pw)
assert p.stat() == (0, 0), p.stat()
p.quit()
print("poplib ok", mode, len(body))
"#;

/// One login; prints the server's answer (`+OK …` or the `-ERR …` text).
const PY_LOGIN: &str = r#"
mode, port, user, pw, ca, src = sys.argv[1:7]
socket.create_connection = _from(src)
ctx = ssl.create_default_context(cafile=ca)
p = pop(mode, port, ctx)
p.user(user)
try:
    print(p.pass_(pw).decode())
    p.quit()
except poplib.error_proto as e:
    print(e.args[0].decode())
"#;

fn python(script: &str, args: &[&str]) -> Output {
    Command::new("python3").arg("-c").arg(format!("{PY_PRELUDE}{script}")).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Dovecot with POP3 and mailgate in front of both, POP3 upstream with XCLIENT; alice
/// has an app password for IMAP and POP3.
fn with_pop3_dovecot() -> (Dovecot, Mailgate, String) {
    let dovecot = Dovecot::start(DovecotOptions { pop3: true, ..DovecotOptions::default() });
    let pop3 = dovecot.pop3_port.unwrap();
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        master_password: "master-password".into(),
        pop3_upstream: Some(format!("127.0.0.1:{pop3}")),
        pop3_upstream_extra: "xclient = true\n".into(),
        ..Options::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "phone", "imap,pop3");
    (dovecot, mg, app)
}

#[test]
fn poplib_over_tls_and_stls_reads_and_deletes_through_mailgate() {
    let (dovecot, mg, app) = with_pop3_dovecot();
    let path = mg.dir.path().join("pop.eml");
    std::fs::write(&path, message()).unwrap();
    let (ca, file) = (mg.ca.display().to_string(), path.display().to_string());
    let imaps = mg.imaps.port().to_string();
    for (mode, port, src) in [("tls", mg.pop3s.unwrap(), "127.0.0.9"), ("stls", mg.pop3.unwrap(), "127.0.0.10")] {
        let port = port.port().to_string();
        let out = python(PY_ROUND_TRIP, &[mode, &port, &imaps, "alice@example.com", &app, &ca, src, &file]);
        assert!(out.status.success(), "poplib ({mode}) failed:\n{}\nmailgate log:\n{}", text(&out), mg.log());
        // The client's address reached Dovecot's POP3 login by XCLIENT.
        let line = format!("pop3-login: Info: Login: user=<alice@example.com>, method=PLAIN, rip={src}");
        assert!(dovecot.wait_for_log(&line, PROMPTLY), "{mode}: {line}\n{}", dovecot.log());
    }
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["app_passwords"][0]["last_used_by"]["pop3"]["protocol"], "pop3", "{list}");
}

#[test]
fn the_account_password_of_2fa_and_an_app_password_without_pop3_are_refused() {
    let (dovecot, mg, _app) = with_pop3_dovecot();
    let (ca, tls, stls) =
        (mg.ca.display().to_string(), mg.pop3s.unwrap().port().to_string(), mg.pop3.unwrap().port().to_string());
    // An IMAP-only app password: refused over POP3, and nothing reached Dovecot's POP3.
    let imap_only = mg.app_password("alice@example.com", "laptop", "imap");
    let out = python(PY_LOGIN, &["tls", &tls, "alice@example.com", &imap_only, &ca, "127.0.0.11"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("-ERR [AUTH] Authentication failed."), "{}", text(&out));
    // Without 2FA the account password works; with it, the refusal names the URL.
    let out = python(PY_LOGIN, &["stls", &stls, "alice@example.com", "alice-account-pw", &ca, "127.0.0.11"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("+OK"), "{}\n{}", text(&out), mg.log());
    mg.ok(&["totp", "enable", "alice@example.com"]);
    for (mode, port) in [("tls", &tls), ("stls", &stls)] {
        let out = python(PY_LOGIN, &[mode, port, "alice@example.com", "alice-account-pw", &ca, "127.0.0.11"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.starts_with("-ERR [AUTH] ") && said.contains("https://mail.example.test/app-passwords"),
            "{mode}: {}",
            text(&out)
        );
    }
    // The one POP3 login Dovecot saw is the account password's before 2FA.
    assert!(dovecot.wait_for_log("pop3-login: Info: Login: ", PROMPTLY), "{}", dovecot.log());
    assert_eq!(dovecot.log().matches("pop3-login: Info: Login: ").count(), 1, "{}", dovecot.log());
}

/// Start-up names the POP3 listeners and upstream; revoking the app password ends a live
/// POP3 session with `-ERR [AUTH] Access revoked.` and the close, and the password no
/// longer logs in.
#[test]
fn startup_lists_pop3_and_revocation_ends_a_live_pop3_session() {
    let (_dovecot, mg, app) = with_pop3_dovecot();
    let log = mg.log();
    for line in [
        format!("mailgate: POP3 (implicit TLS) on {}", mg.pop3s.unwrap()),
        format!("mailgate: POP3 (STLS) on {}", mg.pop3.unwrap()),
        "mailgate: upstream POP3 127.0.0.1:".to_string(),
    ] {
        assert!(log.contains(&line), "{line}\n{log}");
    }
    let login = |pw: &str| {
        let mut c = Client::tls(mg.pop3s.unwrap(), tls_config(&mg.ca, &["pop3"])).unwrap();
        assert!(c.line().starts_with("+OK"));
        c.send(format!("USER alice@example.com\r\nPASS {pw}\r\n").as_bytes());
        assert!(c.line().starts_with("+OK"));
        let r = c.line();
        (c, r)
    };
    let (mut c, r) = login(&app);
    assert_eq!(r, "+OK Logged in.", "{}", mg.log());
    c.send(b"STAT\r\n");
    assert!(c.line().starts_with("+OK 0 0"));
    let id = app.replace(' ', "")[..6].to_string();
    let out = mg.ok(&["app-password", "revoke", "alice@example.com", &id]);
    assert!(out.contains("1 live sessions ended"), "{out}");
    assert_eq!(c.line_within(PROMPTLY).as_deref(), Some("-ERR [AUTH] Access revoked."));
    assert!(c.closed_within(PROMPTLY));
    let (_c, r) = login(&app);
    assert_eq!(r, "-ERR [AUTH] Authentication failed.");
}

/// `password_check = "upstream"`: a user known only to Dovecot logs in over POP3 with the
/// Dovecot password, and that login is the session (no master user); a wrong password is
/// refused like any other.
#[test]
fn with_upstream_password_checks_the_users_own_pop3_login_is_the_session() {
    let users = vec![("bob@example.com".to_string(), "bob-dovecot-password".to_string())];
    let dovecot = Dovecot::start(DovecotOptions { users, pop3: true, ..DovecotOptions::default() });
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        master_password: "master-password".into(),
        pop3_upstream: Some(format!("127.0.0.1:{}", dovecot.pop3_port.unwrap())),
        pop3_upstream_extra: "xclient = true\n".into(),
        extra_sections: "[accounts]\npassword_check = \"upstream\"\n".into(),
        ..Options::default()
    });
    let (ca, stls) = (mg.ca.display().to_string(), mg.pop3.unwrap().port().to_string());
    let out = python(PY_LOGIN, &["stls", &stls, "bob@example.com", "bob-dovecot-password", &ca, "127.0.0.12"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("+OK"), "{}\n{}", text(&out), mg.log());
    let line = "pop3-login: Info: Login: user=<bob@example.com>, method=PLAIN, rip=127.0.0.12";
    assert!(dovecot.wait_for_log(line, PROMPTLY), "{}", dovecot.log());
    assert!(!dovecot.log().contains("Master user logging in as bob"), "{}", dovecot.log());
    assert!(mg.ok(&["user", "list"]).contains("bob@example.com"));
    let out = python(PY_LOGIN, &["stls", &stls, "bob@example.com", "not-bobs-password", &ca, "127.0.0.12"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("-ERR [AUTH] Authentication failed."), "{}\n{}", text(&out), mg.log());
}

/// The test message of the fetch tools, and whether `got` holds it (the headers may be
/// extended by the tool: fetchmail adds `Received:`, getmail `Delivered-To:`).
const FETCHED: &[u8] =
    b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: fetch me\r\n\r\nfetched through mailgate\r\n";

fn holds_fetched(got: &[u8]) -> bool {
    let got = String::from_utf8_lossy(got);
    got.contains("Subject: fetch me") && got.contains("fetched through mailgate")
}

/// Messages left in alice's INBOX at Dovecot.
fn left_in_inbox(dovecot: &Dovecot) -> usize {
    let maildir = dovecot.maildir("alice@example.com");
    ["new", "cur"].iter().map(|d| std::fs::read_dir(maildir.join(d)).map(|r| r.count()).unwrap_or(0)).sum()
}

/// Runs fetchmail once (in the foreground, so it writes to stderr) against `port`
/// (`tls`: its rc-file TLS words) as alice with `password`, delivering to `out`; `-v`
/// (the protocol exchange, as someone looking into a failure runs it) with `verbose`.
fn fetchmail(mg: &Mailgate, run: &str, port: u16, tls: &str, password: &str, out: &Path, verbose: bool) -> Output {
    let rc = mg.dir.path().join(format!("fetchmailrc-{run}"));
    std::fs::write(
        &rc,
        format!(
            "set no syslog\n\
             poll localhost port {port} proto pop3 timeout 60\n  user \"alice@example.com\" password \"{password}\"\n  \
             {tls} sslcertck sslcertfile \"{ca}\"\n  mda \"/bin/sh -c 'cat > {out}'\"\n",
            ca = mg.ca.display(),
            out = out.display(),
        ),
    )
    .unwrap();
    // fetchmail refuses a run control file others can read (it holds a password).
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    Command::new("fetchmail")
        .args(["--nodetach", "--fetchmailrc"])
        .arg(&rc)
        .args(verbose.then_some("-v"))
        .env("FETCHMAILHOME", mg.dir.path())
        .output()
        .unwrap()
}

/// fetchmail (Debian) pulls the inbox through mailgate with an app password, over
/// implicit TLS and over STLS, checking the certificate; the fetched message is handed to
/// its MDA whole and deleted upstream. With 2FA on, the account password is refused;
/// `fetchmail -v` shows mailgate's words with the URL.
#[test]
fn fetchmail_pulls_the_inbox_over_tls_and_stls() {
    let (dovecot, mg, app) = with_pop3_dovecot();
    let (tls, stls) = (mg.pop3s.unwrap().port(), mg.pop3.unwrap().port());
    for (run, port, how) in [("tls", tls, "ssl"), ("stls", stls, "sslproto tls1.2+")] {
        dovecot.deliver("alice@example.com", FETCHED);
        let out = mg.dir.path().join(format!("fetched-{run}.eml"));
        let status = fetchmail(&mg, run, port, how, &app, &out, false);
        assert!(status.status.success(), "fetchmail ({run}): {}\nmailgate log:\n{}", text(&status), mg.log());
        assert!(holds_fetched(&std::fs::read(&out).unwrap_or_default()), "{run}: {}", out.display());
        assert_eq!(left_in_inbox(&dovecot), 0, "{run}: fetchmail deletes what it fetched\n{}", text(&status));
    }
    mg.ok(&["totp", "enable", "alice@example.com"]);
    dovecot.deliver("alice@example.com", FETCHED);
    let out = mg.dir.path().join("fetched-2fa.eml");
    let status = fetchmail(&mg, "2fa", tls, "ssl", "alice-account-pw", &out, true);
    assert!(!status.status.success() && !out.exists(), "{}", text(&status));
    let shown = text(&status);
    assert!(shown.contains("https://mail.example.test/app-passwords"), "fetchmail shows mailgate's words:\n{shown}");
    assert_eq!(left_in_inbox(&dovecot), 1);
}

/// getmail6 (Debian) pulls the inbox through mailgate's implicit-TLS port with an app
/// password, checking the certificate, hands it to an external MDA (its mbox and Maildir
/// destinations refuse to run as root, which the tests are), and deletes it upstream.
/// (getmail6 has no STLS.) With 2FA on, getmail shows mailgate's words with the URL.
#[test]
fn getmail_pulls_the_inbox_over_tls() {
    let (dovecot, mg, app) = with_pop3_dovecot();
    dovecot.deliver("alice@example.com", FETCHED);
    let dir = mg.dir.path().join("getmail");
    std::fs::create_dir_all(&dir).unwrap();
    let mbox = dir.join("inbox.mbox");
    std::fs::write(&mbox, b"").unwrap();
    let getmail = |password: &str| {
        std::fs::write(
            dir.join("getmailrc"),
            format!(
                "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = localhost\nport = {port}\n\
                 username = alice@example.com\npassword = {password}\nca_certs = {ca}\n\
                 [destination]\ntype = MDA_external\npath = /bin/sh\narguments = (\"-c\", \"cat >> {mbox}\")\n\
                 allow_root_commands = true\n\
                 [options]\ndelete = true\nread_all = true\nverbose = 1\n",
                port = mg.pop3s.unwrap().port(),
                ca = mg.ca.display(),
                mbox = mbox.display(),
            ),
        )
        .unwrap();
        Command::new("getmail").arg("--getmaildir").arg(&dir).args(["--rcfile", "getmailrc"]).output().unwrap()
    };
    let run = getmail(&app);
    assert!(run.status.success(), "getmail: {}\nmailgate log:\n{}", text(&run), mg.log());
    assert!(holds_fetched(&std::fs::read(&mbox).unwrap()), "{}", text(&run));
    assert_eq!(left_in_inbox(&dovecot), 0, "getmail deletes what it fetched: {}", text(&run));
    // With 2FA on, the account password is refused, in words getmail shows.
    mg.ok(&["totp", "enable", "alice@example.com"]);
    dovecot.deliver("alice@example.com", FETCHED);
    let run = getmail("alice-account-pw");
    assert!(text(&run).contains("https://mail.example.test/app-passwords"), "{}", text(&run));
    assert_eq!(left_in_inbox(&dovecot), 1);
}
