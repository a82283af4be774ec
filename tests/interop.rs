//! Interop against a real Dovecot started by the tests: real clients (Python imaplib,
//! curl) through mailgate with app passwords, byte-exact APPEND/FETCH, IDLE, the
//! client's address in Dovecot's log, both master-login styles, upstream TLS, and
//! revocation ending live sessions. Issue 2 points 8 and 9.

use crate::imap_front::{with_dovecot, with_dovecot_opts};
use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use std::process::Command;
use std::time::Duration;

/// A 200 KB message with CRLF lines, long lines and 8-bit bytes.
fn big_message() -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.com>\r\nSubject: big one\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
    let mut n = 0u32;
    while m.len() < 200 * 1024 {
        m.extend_from_slice(format!("line {n:06} ").as_bytes());
        m.extend_from_slice("grüße — ".repeat((n % 7) as usize).as_bytes());
        m.extend_from_slice(&[b'x'; 60]);
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    m
}

const PY_IMAPLIB: &str = r#"
import imaplib, socket, ssl, sys
host, port, user, pw, ca, src, path = sys.argv[1:8]
class C(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(src, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname="localhost")
ctx = ssl.create_default_context(cafile=ca)
m = C(host, int(port), ssl_context=ctx, timeout=30)
typ, data = m.login(user, pw)
assert typ == "OK", data
typ, caps = m.capability()
assert typ == "OK" and b"IDLE" in caps[0], caps
typ, data = m.select("INBOX")
assert typ == "OK", data
msg = open(path, "rb").read()
typ, data = m.append("INBOX", None, None, msg)
assert typ == "OK", data
typ, data = m.search(None, "ALL")
last = data[0].split()[-1]
typ, data = m.fetch(last, "(BODY.PEEK[])")
assert typ == "OK", data
body = data[0][1]
assert body == msg, (len(body), len(msg))
typ, data = m.list()
assert typ == "OK" and any(b"INBOX" in l for l in data), data
m.logout()
print("imaplib ok", len(body))
"#;

#[test]
fn imaplib_and_curl_through_mailgate_to_dovecot() {
    let (dovecot, mg, app) = with_dovecot();
    let msg = big_message();
    let path = mg.dir.path().join("big.eml");
    std::fs::write(&path, &msg).unwrap();
    let out = Command::new("python3")
        .args(["-c", PY_IMAPLIB, "127.0.0.1", &mg.imaps.port().to_string(), "alice@example.com", &app])
        .arg(&mg.ca)
        .arg("127.0.0.5")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imaplib failed:\n{}\n{}\nmailgate log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mg.log()
    );
    // Dovecot saw the client's address (from ID x-originating-ip), not mailgate's.
    assert!(
        dovecot.wait_for_log("user=<alice@example.com>, method=PLAIN, rip=127.0.0.5", Duration::from_secs(10)),
        "{}",
        dovecot.log()
    );
    // curl, with the app password typed without spaces, fetches the message back.
    let compact = app.replace(' ', "");
    let url = format!("imaps://localhost:{}/INBOX;UID=1", mg.imaps.port());
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--interface", "127.0.0.6"])
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", mg.imaps.port())])
        .arg("--cacert")
        .arg(&mg.ca)
        .args(["-u", &format!("alice@example.com:{compact}"), &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, msg, "curl got different bytes");
    assert!(dovecot.wait_for_log("rip=127.0.0.6", PROMPTLY));
    // Last use is recorded: time, address, and the list shows it.
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let used = &v["app_passwords"][0]["last_used"];
    assert!(used["ip"] == "127.0.0.6" || used["ip"] == "127.0.0.5", "{list}");
    assert_eq!(used["protocol"], "imap", "{list}");
    assert_eq!(v["app_passwords"][0]["last_used_by"]["imap"], *used, "{list}");
}

#[test]
fn idle_pipelining_and_upstream_capabilities() {
    let (dovecot, mg, app) = with_dovecot();
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    c.send(b"z ID (\"name\" \"TestClient\" \"version\" \"1.0\")\r\n");
    c.until("z OK");
    // LOGIN and SELECT pipelined in one write: SELECT belongs to the upstream session.
    c.send(format!("a LOGIN alice@example.com \"{app}\"\r\nb SELECT INBOX\r\n").as_bytes());
    let ok = c.line();
    assert!(ok.starts_with("a OK [CAPABILITY IMAP4rev1"), "{ok}");
    assert!(ok.contains("IDLE") && !ok.contains("AUTH="), "not upstream's post-login capabilities: {ok}");
    let sel = c.until("b ");
    assert!(sel.last().unwrap().starts_with("b OK"), "{sel:?}");
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with("+ "));
    dovecot.deliver("alice@example.com", b"From: x@example.com\r\nSubject: new\r\n\r\nhello\r\n");
    let exists = c.line();
    assert!(exists.ends_with("EXISTS"), "{exists}");
    c.send(b"DONE\r\n");
    assert!(c.until("i ").last().unwrap().starts_with("i OK"));
    // A second LOGIN goes to upstream, which refuses it: no re-authentication as someone else.
    let r = c.cmd("j", "LOGIN bob@example.com whatever");
    assert!(!r.last().unwrap().starts_with("j OK"), "{r:?}");
    assert!(c.cmd("k", "LOGOUT").iter().any(|l| l.starts_with("* BYE")));
    let list = mg.ok(&["app-password", "list", "alice@example.com"]);
    assert!(list.contains("(TestClient 1.0)"), "{list}");
}

#[test]
fn revoking_an_app_password_ends_its_live_session() {
    let (_dovecot, mg, app) = with_dovecot();
    let other = mg.app_password("alice@example.com", "tablet", "imap");
    let login = |pw: &str| {
        let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
        c.line();
        let r = c.cmd("a", &format!("LOGIN alice@example.com \"{pw}\""));
        (c, r.last().unwrap().clone())
    };
    let (mut c, r) = login(&app);
    assert!(r.starts_with("a OK"), "{r}");
    c.cmd("b", "SELECT INBOX");
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with("+ "));
    let (mut c2, r2) = login(&other);
    assert!(r2.starts_with("a OK"));
    let id = app.replace(' ', "")[..6].to_string();
    let out = mg.ok(&["app-password", "revoke", "alice@example.com", &id]);
    assert!(out.contains("1 live sessions ended"), "{out}");
    assert_eq!(c.line_within(PROMPTLY).as_deref(), Some("* BYE Access revoked"));
    assert!(c.closed_within(PROMPTLY));
    let (_c, r) = login(&app);
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    // The other device is untouched until the account is removed.
    assert!(c2.cmd("n", "NOOP").last().unwrap().starts_with("n OK"));
    mg.ok(&["user", "remove", "alice@example.com"]);
    assert!(c2.closed_within(PROMPTLY));
    let (_c, r) = login(&other);
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
}

#[test]
fn master_separator_login_style() {
    let (dovecot, mg, app) = with_dovecot_opts(Options {
        upstream_extra: "login = \"master-separator\"\nmaster_separator = \"*\"\n".into(),
        ..Default::default()
    });
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    let r = c.cmd(
        "a",
        &format!("AUTHENTICATE PLAIN {}", {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(format!("\0alice@example.com\0{app}"))
        }),
    );
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", mg.log());
    assert!(c.cmd("b", "SELECT INBOX").last().unwrap().starts_with("b OK"));
    assert!(dovecot.wait_for_log("user=<alice@example.com>", PROMPTLY));
}

fn dovecot_with_tls() -> (Dovecot, crate::support::pki::Pki, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::support::pki::make(dir.path(), "dovecot", &["localhost", "127.0.0.1"]);
    let dovecot =
        Dovecot::start(DovecotOptions { tls: Some((pki.cert.clone(), pki.key.clone())), ..Default::default() });
    (dovecot, pki, dir)
}

fn login_works(mg: &Mailgate, app: &str) -> String {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    c.cmd("a", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().clone()
}

fn start_against(dovecot_addr: String, extra: String) -> (Mailgate, String) {
    let mg = Mailgate::start(Options {
        upstream: dovecot_addr,
        upstream_extra: extra,
        master_password: "master-password".into(),
        ..Default::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "laptop", "imap,smtp");
    (mg, app)
}

#[test]
fn upstream_starttls_and_implicit_tls_verify_the_certificate() {
    let (dovecot, pki, _dir) = dovecot_with_tls();
    let ca = pki.ca.display().to_string();
    let (mg, app) = start_against(
        format!("127.0.0.1:{}", dovecot.port),
        format!("tls = \"starttls\"\nca_file = \"{ca}\"\nserver_name = \"localhost\"\n"),
    );
    assert!(login_works(&mg, &app).starts_with("a OK"), "{}", mg.log());
    let (mg, app) = start_against(
        format!("127.0.0.1:{}", dovecot.tls_port.unwrap()),
        format!("tls = \"implicit\"\nca_file = \"{ca}\"\nserver_name = \"localhost\"\n"),
    );
    assert!(login_works(&mg, &app).starts_with("a OK"), "{}", mg.log());
    // Not trusted (system roots only) or the wrong name: refused, never a false OK.
    let (mg, app) = start_against(format!("127.0.0.1:{}", dovecot.tls_port.unwrap()), "tls = \"implicit\"\n".into());
    assert!(login_works(&mg, &app).starts_with("a NO [UNAVAILABLE]"));
    let (mg, app) = start_against(
        format!("127.0.0.1:{}", dovecot.port),
        format!("tls = \"starttls\"\nca_file = \"{ca}\"\nserver_name = \"imap.elsewhere.test\"\n"),
    );
    assert!(login_works(&mg, &app).starts_with("a NO [UNAVAILABLE]"));
    assert!(mg.log().contains("upstream login failed"));
}

const PY_COMPRESS: &str = r#"
import socket, ssl, sys, zlib
host, port, user, pw, ca = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((host, int(port)), 30), server_hostname="localhost")
buf = b""
def until(tag, dec=None):
    global buf
    while True:
        i = buf.find(b"\r\n" + tag) if not buf.startswith(tag) else 0
        if i >= 0:
            j = buf.find(b"\r\n", i + 2 if i else 0)
            if j >= 0:
                out, buf = buf[:j + 2], buf[j + 2:]
                return out
        data = s.recv(65536)
        if not data:
            raise SystemExit("closed: %r" % buf)
        buf += dec.decompress(data) if dec else data
until(b"* OK")
s.sendall(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), pw.encode()))
r = until(b"a ")
assert b"a OK" in r and b"COMPRESS=DEFLATE" in r, r
s.sendall(b"c COMPRESS DEFLATE\r\n")
r = until(b"c ")
assert b"c OK" in r, r
assert buf == b"", buf
comp, dec = zlib.compressobj(wbits=-15), zlib.decompressobj(wbits=-15)
def send(data):
    s.sendall(comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH))
send(b"d SELECT INBOX\r\n")
r = until(b"d ", dec)
assert b"d OK" in r, r
send(b"e LOGOUT\r\n")
r = until(b"e ", dec)
assert b"* BYE" in r and b"e OK" in r, r
print("compress ok")
"#;

#[test]
fn compress_deflate_passes_through() {
    let (_dovecot, mg, app) = with_dovecot();
    let out = Command::new("python3")
        .args(["-c", PY_COMPRESS, "127.0.0.1", &mg.imaps.port().to_string(), "alice@example.com", &app])
        .arg(&mg.ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mg.log()
    );
}

#[test]
fn mbsync_pulls_the_inbox_through_mailgate() {
    let (dovecot, mg, app) = with_dovecot();
    dovecot.deliver("alice@example.com", b"From: bob@example.com\r\nSubject: for mbsync\r\n\r\nsynced body\r\n");
    let dir = mg.dir.path();
    let cfg = dir.join("mbsyncrc");
    std::fs::create_dir_all(dir.join("mail")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "IMAPAccount mg\nHost localhost\nPort {port}\nUser alice@example.com\nPass \"{app}\"\nSSLType IMAPS\nCertificateFile {ca}\n\n\
             IMAPStore remote\nAccount mg\n\n\
             MaildirStore local\nPath {dir}/mail/\nInbox {dir}/mail/INBOX\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n",
            port = mg.imaps.port(),
            ca = mg.ca.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    let out = Command::new("mbsync").arg("-c").arg(&cfg).arg("-a").output().unwrap();
    assert!(
        out.status.success(),
        "mbsync: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mg.log()
    );
    let mut found = false;
    for sub in ["new", "cur"] {
        for entry in std::fs::read_dir(dir.join("mail/INBOX").join(sub)).unwrap() {
            let body = std::fs::read(entry.unwrap().path()).unwrap();
            found |= String::from_utf8_lossy(&body).contains("Subject: for mbsync");
        }
    }
    assert!(found, "the message did not arrive in the local Maildir");
}

#[test]
fn changing_the_account_password_ends_sessions_opened_with_the_old_one() {
    let (_dovecot, mg, app) = with_dovecot();
    let login = |pw: &str| {
        let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
        c.line();
        let r = c.cmd("a", &format!("LOGIN alice@example.com \"{pw}\""));
        assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
        c
    };
    let mut with_password = login("alice-account-pw");
    let mut with_app = login(&app);
    let out = mg.cli_stdin(&["user", "passwd", "alice@example.com", "--password-stdin"], "a-new-account-password\n");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 sessions opened with the old password ended"));
    assert!(with_password.closed_within(PROMPTLY));
    assert!(with_app.cmd("n", "NOOP").last().unwrap().starts_with("n OK"));
}

#[test]
fn sigterm_says_goodbye_to_live_sessions_and_keeps_the_data() {
    // SECURITY.md case 112: live sessions and connections still logging in get a goodbye.
    let (_dovecot, mut mg, app) = with_dovecot();
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    assert!(c.cmd("a", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().starts_with("a OK"));
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with("+ "));
    // Connections still logging in are told too.
    let mut greeted = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(greeted.line().starts_with("* OK"));
    let mut smtp = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(smtp.line().starts_with("220 "));
    // It ends by itself, cleanly: the IDLE session (idle timeout 30 min) does not hold it.
    let status = mg.terminate();
    assert!(status.is_some_and(|s| s.success()), "SIGTERM did not end serve cleanly: {status:?}");
    let rest = String::from_utf8_lossy(&c.transcript).to_string();
    let _ = c.closed_within(Duration::from_secs(2));
    let all = rest + &String::from_utf8_lossy(&c.transcript);
    assert!(all.contains("* BYE Server shutting down"), "{all}");
    assert!(mg.log().contains("ending live sessions"), "{}", mg.log());
    assert_eq!(
        greeted.line_within(Duration::from_secs(2)).as_deref(),
        Some("* BYE Server shutting down, please reconnect")
    );
    assert_eq!(
        smtp.line_within(Duration::from_secs(2)).as_deref(),
        Some("421 4.3.2 Server shutting down, please reconnect")
    );
    // A restart serves at once with everything that was there.
    mg.restart();
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    assert!(c.cmd("b", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().starts_with("b OK"));
}
