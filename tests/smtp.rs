//! SMTP submission through mailgate: the front door (EHLO, STARTTLS, AUTH, limits) and
//! interop with real upstream servers started by the tests: Dovecot submission (master
//! SASL login) and Postfix (XCLIENT), each relaying to a sink the test reads. Real
//! clients: Python smtplib and swaks. Issue 3; SECURITY.md A, F, G, H.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::postfix::{Postfix, PostfixOptions};
use crate::support::submission::{Submission, SubmissionOptions};
use base64::Engine as _;
use std::process::Command;
use std::time::Duration;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// mailgate in front of Dovecot submission (master SASL), alice with an smtp app password.
pub(crate) fn with_submission(extra: &str) -> (Submission, Mailgate, String) {
    let sub = Submission::start(SubmissionOptions::default());
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        smtp_extra: extra.into(),
        ..Default::default()
    });
    let out = mg.cli_stdin(
        &["user", "add", "alice@example.com", "--address", "Alias@Example.org", "--password-stdin"],
        "alice-account-pw\n",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let app = mg.app_password("alice@example.com", "laptop", "imap,smtp");
    (sub, mg, app)
}

pub(crate) fn smtps(mg: &Mailgate) -> Client {
    let mut c = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(c.line().starts_with("220 "));
    c
}

/// Sends a command and returns every line of the reply.
pub(crate) fn cmd(c: &mut Client, line: &str) -> Vec<String> {
    c.send(format!("{line}\r\n").as_bytes());
    reply(c)
}

fn reply(c: &mut Client) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let l = c.line();
        let last = l.len() < 4 || l.as_bytes()[3] != b'-';
        lines.push(l);
        if last {
            return lines;
        }
    }
}

pub(crate) fn login(c: &mut Client, app: &str) {
    cmd(c, "EHLO client.example");
    let r = cmd(c, &format!("AUTH PLAIN {}", b64(format!("\0alice@example.com\0{app}").as_bytes())));
    assert_eq!(r, vec!["235 2.7.0 Authentication successful"]);
}

pub(crate) fn message(from: &str, subject: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Alice <{from}>\r\nTo: bob@example.net\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice("Grüße aus dem Test.\r\n.a line that starts with a dot\r\n".as_bytes());
    m.extend_from_slice(&[b'L'; 2000]);
    m.extend_from_slice(b"\r\nlast line\r\n");
    m
}

#[test]
fn ehlo_starttls_and_auth_rules() {
    // SECURITY.md cases 2, 6, 7, 44, 47.
    let mg = Mailgate::start(Options::default());
    let mut c = Client::plain(mg.submission);
    assert!(c.line().starts_with("220 mail.example.test ESMTP"));
    let ehlo = cmd(&mut c, "EHLO client.example").join("\n");
    assert!(ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    assert!(cmd(&mut c, "AUTH PLAIN AGFsaWNlAHB3")[0].starts_with("530 5.7.0"));
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("530"));
    c.send(b"STARTTLS\r\nEHLO injected\r\n");
    assert_eq!(c.line(), "220 2.0.0 Ready to start TLS");
    let leftover = c.starttls(tls_config(&mg.ca, &["smtp"]));
    assert!(leftover.is_empty());
    assert_eq!(c.line_within(Duration::from_secs(2)), None, "the injected EHLO was answered");
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("530"));
    let ehlo = cmd(&mut c, "EHLO client.example").join("\n");
    for cap in ["AUTH PLAIN LOGIN", "SIZE 52428800", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"] {
        assert!(ehlo.contains(cap), "{cap} missing: {ehlo}");
    }
    // Nothing answers upstream here, so SMTPUTF8 is not promised.
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("SMTPUTF8"), "{ehlo}");
    assert!(cmd(&mut c, "STARTTLS")[0].starts_with("503"));
    assert!(cmd(&mut c, "FAKE x")[0].starts_with("500"));
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("530 5.7.0"));
    // Cancel at each prompt.
    assert_eq!(cmd(&mut c, "AUTH PLAIN"), vec!["334 "]);
    assert!(cmd(&mut c, "*")[0].starts_with("501"));
    assert_eq!(cmd(&mut c, "AUTH LOGIN"), vec!["334 VXNlcm5hbWU6"]);
    assert_eq!(cmd(&mut c, &b64(b"alice@example.com")), vec!["334 UGFzc3dvcmQ6"]);
    assert!(cmd(&mut c, "*")[0].starts_with("501"));
    // Implicit TLS on the other port; the wrong ALPN is refused.
    let mut t = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(t.line().starts_with("220 "));
    assert!(cmd(&mut t, "EHLO x").join("\n").contains("AUTH PLAIN LOGIN"));
    assert!(Client::tls(mg.smtps, tls_config(&mg.ca, &["imap"])).is_err());
}

#[test]
fn line_limits_and_error_budget() {
    // SECURITY.md cases 46, 49, 50.
    let mg = Mailgate::start(Options::default());
    let mut c = smtps(&mg);
    let long = format!("NOOP {}", "x".repeat(600));
    assert!(cmd(&mut c, &long)[0].starts_with("500 5.5.2"));
    assert!(cmd(&mut c, "NOOP")[0].starts_with("250"));
    // An AUTH line of 12,288 octets is read (and refused as credentials, not as too long).
    let ir = "A".repeat(12_288 - "AUTH PLAIN \r\n".len());
    let r = cmd(&mut c, &format!("AUTH PLAIN {ir}"));
    assert!(r[0].starts_with("535") || r[0].starts_with("501"), "{r:?}");
    let ir = "A".repeat(13_000);
    assert!(cmd(&mut c, &format!("AUTH PLAIN {ir}"))[0].starts_with("500 5.5.6"));
    c.send(b"NOOP\n");
    assert!(reply(&mut c)[0].starts_with("500 5.5.2"), "bare LF must be refused");
    let mut c = smtps(&mg);
    for _ in 0..19 {
        cmd(&mut c, "FAKE");
    }
    c.send(b"FAKE\r\n");
    let all = String::from_utf8_lossy(&c.transcript).to_string();
    assert!(c.closed_within(PROMPTLY));
    let all = all + &String::from_utf8_lossy(&c.transcript);
    assert!(all.contains("421 4.7.0"), "{all}");
}

#[test]
fn refusals_2fa_scope_and_unavailable() {
    let (_sub, mg, app) = with_submission("");
    let imap_only = mg.app_password("alice@example.com", "imap only", "imap");
    let mut c = smtps(&mg);
    cmd(&mut c, "EHLO x");
    let auth = |c: &mut Client, pw: &str| {
        cmd(c, &format!("AUTH PLAIN {}", b64(format!("\0alice@example.com\0{pw}").as_bytes())))
    };
    assert_eq!(auth(&mut c, &imap_only), vec!["535 5.7.8 Authentication credentials invalid"]);
    assert_eq!(auth(&mut c, "wrong-password"), vec!["535 5.7.8 Authentication credentials invalid"]);
    mg.ok(&["totp", "enable", "alice@example.com"]);
    let mut c = smtps(&mg);
    cmd(&mut c, "EHLO x");
    let r = auth(&mut c, "alice-account-pw");
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("534 5.7.9 ") && r[0].contains("https://mail.example.test/app-passwords"), "{r:?}");
    // Every such refusal carries the link, not only the first (issue 14).
    let r = auth(&mut c, "alice-account-pw");
    assert!(r[0].starts_with("534 5.7.9 ") && r[0].contains("https://mail.example.test/app-passwords"), "{r:?}");
    assert!(auth(&mut c, &app)[0].starts_with("235"));
    // smtplib falls back from PLAIN to LOGIN and shows only the last reply: the person
    // sees the link (it saw a bare 535 before).
    let out = smtplib(&mg, "ssl", "alice-account-pw", "alice@example.com", &message("alice@example.com", "2fa"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("534") && err.contains("app-passwords"), "{err}");
    assert!(auth(&mut c, &app)[0].starts_with("503"), "second AUTH");
    // Upstream down: a temporary failure, never a success.
    let mg2 = Mailgate::start(Options::default());
    mg2.add_user("alice@example.com", "alice-account-pw");
    let app2 = mg2.app_password("alice@example.com", "x", "smtp");
    let mut c = smtps(&mg2);
    cmd(&mut c, "EHLO x");
    assert!(auth(&mut c, &app2)[0].starts_with("454 4.7.0"));
}

const PY_SMTPLIB: &str = r#"
import smtplib, ssl, sys
host, port, mode, user, pw, ca, mail_from, path = sys.argv[1:9]
ctx = ssl.create_default_context(cafile=ca)
if mode == "ssl":
    s = smtplib.SMTP_SSL(host, int(port), context=ctx, timeout=30, source_address=("127.0.0.7", 0))
else:
    s = smtplib.SMTP(host, int(port), timeout=30, source_address=("127.0.0.7", 0))
    s.starttls(context=ctx)
s.login(user, pw)
msg = open(path, "rb").read()
refused = s.sendmail(mail_from, ["bob@example.net"], msg, mail_options=["BODY=8BITMIME"])
assert refused == {}, refused
s.quit()
print("sent")
"#;

pub(crate) fn smtplib(mg: &Mailgate, mode: &str, app: &str, from: &str, msg: &[u8]) -> std::process::Output {
    let path = mg.dir.path().join(format!("msg-{}.eml", msg.len()));
    std::fs::write(&path, msg).unwrap();
    let port = if mode == "ssl" { mg.smtps.port() } else { mg.submission.port() };
    Command::new("python3")
        .args(["-c", PY_SMTPLIB, "localhost", &port.to_string(), mode, "alice@example.com", app])
        .arg(&mg.ca)
        .arg(from)
        .arg(&path)
        .output()
        .unwrap()
}

/// swaks over 587 with STARTTLS as alice, the app password without spaces, the message
/// in `data`; its output shows every reply (`<~ 250 …`, `<~* 550 …` for a refusal).
pub(crate) fn swaks(mg: &Mailgate, app: &str, from: &str, to: &str, data: &std::path::Path) -> std::process::Output {
    Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", mg.submission.port()), "--tls"])
        .args(["--auth", "LOGIN", "--auth-user", "alice@example.com", "--auth-password", &app.replace(' ', "")])
        .args(["--from", from, "--to", to, "--data"])
        .arg(data)
        .output()
        .unwrap()
}

#[test]
fn smtplib_and_swaks_through_dovecot_submission_arrive_intact() {
    let (sub, mg, app) = with_submission("");
    let msg = message("alice@example.com", "via smtplib");
    let out = smtplib(&mg, "ssl", &app, "alice@example.com", &msg);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log());
    let got = sub.sink.wait_for_messages(1, Duration::from_secs(20));
    assert!(got[0].original_message() == msg, "not byte for byte");
    assert_eq!(got[0].mail_from, "alice@example.com");
    assert_eq!(got[0].rcpt_to, vec!["bob@example.net"]);
    // swaks over 587 with STARTTLS, the app password without spaces, From: an alias.
    let path = mg.dir.path().join("swaks.eml");
    let msg2 = message("alias@example.org", "via swaks");
    std::fs::write(&path, &msg2).unwrap();
    let out = swaks(&mg, &app, "alias@example.org", "bob@example.net", &path);
    assert!(out.status.success(), "swaks: {}\n{}", String::from_utf8_lossy(&out.stdout), mg.log());
    let got = sub.sink.wait_for_messages(2, Duration::from_secs(20));
    // swaks ends the data with its own CRLF before the dot; everything else is as sent.
    let mut expected = msg2.clone();
    expected.extend_from_slice(b"\r\n");
    assert!(got[1].original_message() == expected, "swaks' message changed on the way");
    // Dovecot submission saw the client's address (XCLIENT ADDR from mailgate), not mailgate's.
    assert!(sub.wait_for_log("rip=127.0.0.7", PROMPTLY), "{}", sub.log());
}

#[test]
fn forged_senders_are_refused_and_never_arrive() {
    let (sub, mg, app) = with_submission("");
    let mut c = smtps(&mg);
    login(&mut c, &app);
    let r = cmd(&mut c, "MAIL FROM:<ceo@example.com>");
    assert_eq!(r, vec!["553 5.7.1 Sender address ceo@example.com is not one of your addresses"]);
    assert!(cmd(&mut c, "MAIL FROM:<>")[0].starts_with("553 5.7.1"));
    // Envelope fine, header forged: refused after DATA, nothing reaches upstream.
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(&message("ceo@example.com", "forged"));
    let r = cmd(&mut c, ".");
    assert_eq!(r, vec!["550 5.7.1 From: address ceo@example.com is not one of your addresses"]);
    // Sender: forged too.
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"), "session must go on");
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(b"From: alice@example.com\r\nSender: boss@example.com\r\nSubject: x\r\n\r\nbody\r\n");
    assert!(cmd(&mut c, ".")[0].starts_with("550 5.7.1 Sender: address boss@example.com"));
    // Then a good one in the same session, with RSET before it.
    assert!(cmd(&mut c, "RSET")[0].starts_with("250"));
    assert!(cmd(&mut c, "MAIL FROM:<Alice@EXAMPLE.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(&message("alice@example.com", "good"));
    assert!(cmd(&mut c, ".")[0].starts_with("250"));
    assert!(cmd(&mut c, "QUIT")[0].starts_with("221"));
    let got = sub.sink.wait_for_messages(1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let all = sub.sink.messages();
    assert_eq!(all.len(), 1, "a refused message arrived: {all:?}");
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: good"));
}

#[test]
fn pipelining_size_and_bare_lf() {
    let (sub, mg, app) = with_submission("max_message_size = 100000\n");
    let mut c = smtps(&mg);
    login(&mut c, &app);
    // Pipelined envelope (RFC 2920), two messages in one session.
    for n in 0..2 {
        c.send(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n",
        );
        assert!(reply(&mut c)[0].starts_with("250"));
        assert!(reply(&mut c)[0].starts_with("250"));
        assert!(reply(&mut c)[0].starts_with("250"));
        assert!(reply(&mut c)[0].starts_with("354"));
        c.send(&message("alice@example.com", &format!("pipelined {n}")));
        assert!(cmd(&mut c, ".")[0].starts_with("250"));
    }
    // Too big: 552, nothing arrives.
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com> SIZE=200000")[0].starts_with("552"));
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    let mut big = message("alice@example.com", "too big");
    for _ in 0..2000 {
        big.extend_from_slice(&[b'z'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    c.send(&big);
    assert!(cmd(&mut c, ".")[0].starts_with("552 5.3.4"));
    // Bare LF in the body: refused, nothing arrives, the session goes on.
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(b"From: alice@example.com\r\nSubject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<x@evil>\r\n");
    assert!(cmd(&mut c, ".")[0].starts_with("554 5.6.11"));
    assert!(cmd(&mut c, "NOOP")[0].starts_with("250"));
    // Dovecot submission does not offer SMTPUTF8, so neither does mailgate in front of it.
    let ehlo = cmd(&mut c, "EHLO again").join("\n");
    assert!(ehlo.contains("8BITMIME") && !ehlo.contains("SMTPUTF8"), "{ehlo}");
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com> SMTPUTF8")[0].starts_with("555"));
    let got = sub.sink.wait_for_messages(2, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sub.sink.messages().len(), 2, "{got:?}");
    assert_eq!(got[0].rcpt_to, vec!["bob@example.net", "carol@example.net"]);
}

#[test]
fn revoking_the_app_password_ends_the_smtp_session() {
    let (_sub, mg, app) = with_submission("");
    let mut c = smtps(&mg);
    login(&mut c, &app);
    let id = app.replace(' ', "")[..6].to_string();
    let out = mg.ok(&["app-password", "revoke", "alice@example.com", &id]);
    assert!(out.contains("1 live sessions ended"), "{out}");
    assert_eq!(c.line_within(PROMPTLY).as_deref(), Some("421 4.7.0 Access revoked"));
    assert!(c.closed_within(PROMPTLY));
}

#[test]
fn a_40_mb_message_streams_without_40_mb_of_memory() {
    let (sub, mg, app) = with_submission("");
    let mut c = smtps(&mg);
    login(&mut c, &app);
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(b"From: alice@example.com\r\nSubject: big\r\n\r\n");
    let line = [b'y'; 998];
    let mut chunk = Vec::new();
    for _ in 0..1000 {
        chunk.extend_from_slice(&line);
        chunk.extend_from_slice(b"\r\n");
    }
    for _ in 0..40 {
        c.send(&chunk);
    }
    assert!(cmd(&mut c, ".")[0].starts_with("250"));
    let got = sub.sink.wait_for_messages(1, Duration::from_secs(60));
    assert!(got[0].data.len() > 40_000_000);
    let peak = mg.peak_rss_kib().unwrap();
    // Two argon2 threads hold 19 MiB each; the message must not add its own size.
    assert!(peak < 80 * 1024, "peak RSS {peak} KiB");
    eprintln!("mailgate peak RSS with a 40 MB message: {} MiB", peak / 1024);
}

#[test]
fn postfix_xclient_login_and_upstream_refusals() {
    let pf = Postfix::start(PostfixOptions::default());
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", pf.port),
        smtp_upstream_extra: "login = \"xclient\"\n".into(),
        ..Default::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "phone", "smtp");
    // XCLIENT sends no password: no master password file is needed.
    std::fs::remove_file(mg.dir.path().join("config/master.secret")).unwrap();
    let msg = message("alice@example.com", "via postfix");
    let out = smtplib(&mg, "starttls", &app, "alice@example.com", &msg);
    assert!(out.status.success(), "{}\n{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log(), pf.log());
    let got = pf.sink.wait_for_messages(1, Duration::from_secs(30));
    assert!(got[0].original_message() == msg, "not byte for byte through Postfix");
    assert!(pf.log().contains("sasl_username=alice@example.com"), "{}", pf.log());
    assert!(pf.log().contains("[127.0.0.7]"), "Postfix did not see the client's address: {}", pf.log());
    // A recipient upstream refuses: its 5xx reaches the client, never a false 250.
    let mut c = smtps(&mg);
    // Postfix offers SMTPUTF8 and SIZE 10240000: so does mailgate in front of it.
    let ehlo = cmd(&mut c, "EHLO x").join("\n");
    assert!(ehlo.contains("SMTPUTF8") && ehlo.contains("SIZE 10240000"), "{ehlo}");
    login(&mut c, &app);
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
    let r = cmd(&mut c, &format!("RCPT TO:<{}>", crate::support::postfix::REJECTED_RECIPIENT));
    assert!(r[0].starts_with('5'), "{r:?}");
    assert!(cmd(&mut c, "DATA")[0].starts_with("554 5.5.1"));
}

/// The real Thunderbird (Debian's package, driven by ../shared/tools/thunderbird.py) reads
/// and sends through mailgate with an app password, over 993 TLS and 587 STARTTLS, and
/// shows the 2FA alert when given the account password.
#[test]
fn thunderbird_reads_and_sends_through_mailgate() {
    assert!(crate::support::thunderbird::script().exists(), "thunderbird.py is missing");
    let dovecot = crate::support::dovecot::Dovecot::start(crate::support::dovecot::DovecotOptions::default());
    let sub = Submission::start(SubmissionOptions::default());
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        ..Default::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "Thunderbird", "imap,smtp");
    mg.ok(&["totp", "enable", "alice@example.com"]);
    let (imaps, submission) = (mg.imaps.port().to_string(), mg.submission.port().to_string());
    let out = crate::support::thunderbird::run(&[
        "--imap-host",
        "127.0.0.1",
        "--imap-port",
        &imaps,
        "--imap-security",
        "ssl",
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        &submission,
        "--smtp-security",
        "starttls",
        "--user",
        "alice@example.com",
        "--password",
        &app,
        "--to",
        "bob@example.net",
        "--bad-password",
        "alice-account-pw",
        "--expect-alert",
        "app password",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log());
    assert!(stdout.contains("PASS smtp-send") && stdout.contains("PASS bad-password"), "{stdout}");
    let got = sub.sink.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].mail_from, "alice@example.com");
}

#[test]
fn upstream_smtp_over_starttls_and_implicit_tls_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::support::pki::make(dir.path(), "submission", &["localhost", "127.0.0.1"]);
    let sub =
        Submission::start(SubmissionOptions { tls: Some((pki.cert.clone(), pki.key.clone())), ..Default::default() });
    let ca = pki.ca.display().to_string();
    for (port, extra, works) in [
        (sub.port, format!("tls = \"starttls\"\nca_file = \"{ca}\"\nserver_name = \"localhost\"\n"), true),
        (sub.tls_port.unwrap(), format!("tls = \"implicit\"\nca_file = \"{ca}\"\nserver_name = \"localhost\"\n"), true),
        (sub.tls_port.unwrap(), "tls = \"implicit\"\n".to_string(), false),
        (sub.port, format!("tls = \"starttls\"\nca_file = \"{ca}\"\nserver_name = \"other.example\"\n"), false),
    ] {
        let mg = Mailgate::start(Options {
            smtp_upstream: format!("127.0.0.1:{port}"),
            smtp_upstream_extra: extra.clone(),
            master_password: "master-password".into(),
            ..Default::default()
        });
        mg.add_user("alice@example.com", "alice-account-pw");
        let app = mg.app_password("alice@example.com", "x", "smtp");
        let mut c = smtps(&mg);
        cmd(&mut c, "EHLO x");
        let r = cmd(&mut c, &format!("AUTH PLAIN {}", b64(format!("\0alice@example.com\0{app}").as_bytes())));
        if works {
            assert_eq!(r, vec!["235 2.7.0 Authentication successful"], "{extra}\n{}", mg.log());
            assert!(cmd(&mut c, "MAIL FROM:<alice@example.com>")[0].starts_with("250"));
            assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
            assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
            c.send(&message("alice@example.com", "over tls"));
            assert!(cmd(&mut c, ".")[0].starts_with("250"));
        } else {
            assert!(r[0].starts_with("454 4.7.0"), "{extra}: {r:?}");
        }
    }
    assert_eq!(sub.sink.wait_for_messages(2, Duration::from_secs(20)).len(), 2);
}

// ---------------------------------------------------------------------------------------
// Issue 13, items 3 and 7: one reading of From:, and no AUTH= from the client
// ---------------------------------------------------------------------------------------

/// The corpus shared with the unit tests: (line, accept, address or kind, From: value).
fn from_corpus() -> Vec<(usize, bool, String, Vec<u8>)> {
    include_str!("../src/proto/from_header_corpus.txt")
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(n, l)| {
            let mut parts = l.splitn(3, '|');
            let accept = parts.next().unwrap().trim() == "accept";
            let expect = parts.next().unwrap().trim().to_string();
            let value = parts.next().unwrap();
            let value = value.strip_prefix(' ').unwrap_or(value);
            let value = format!(" {value}").replace("{CRLF}", "\r\n").replace("{TAB}", "\t");
            (n + 1, accept, expect, value.into_bytes())
        })
        .collect()
}

/// Python's reading: `email.message_from_bytes(..., policy=email.policy.default)['From']`,
/// for each file: its addresses and the names of any groups.
const PY_FROM: &str = r#"
import email, email.policy, json, os, sys
fix = lambda s: s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
out = {}
for path in sys.argv[1:]:
    m = email.message_from_bytes(open(path, "rb").read(), policy=email.policy.default)
    h = m["From"]
    out[os.path.basename(path)] = {
        "addresses": [fix(a.addr_spec) for a in h.addresses],
        "groups": [fix(g.display_name) for g in h.groups if g.display_name is not None],
    }
print(json.dumps(out))
"#;

/// An IMAP value: NIL, a string (quoted or literal), an atom, or a list.
#[derive(Debug, Clone, PartialEq)]
enum Sx {
    Nil,
    Str(String),
    List(Vec<Sx>),
}

fn parse_sx(b: &[u8], i: &mut usize) -> Sx {
    while b[*i] == b' ' {
        *i += 1;
    }
    match b[*i] {
        b'(' => {
            *i += 1;
            let mut items = Vec::new();
            loop {
                while b[*i] == b' ' {
                    *i += 1;
                }
                if b[*i] == b')' {
                    *i += 1;
                    return Sx::List(items);
                }
                items.push(parse_sx(b, i));
            }
        }
        b'"' => {
            *i += 1;
            let mut s = Vec::new();
            while b[*i] != b'"' {
                if b[*i] == b'\\' {
                    *i += 1;
                }
                s.push(b[*i]);
                *i += 1;
            }
            *i += 1;
            Sx::Str(String::from_utf8_lossy(&s).into_owned())
        }
        b'{' => {
            let close = *i + b[*i..].iter().position(|c| *c == b'}').unwrap();
            let n: usize = std::str::from_utf8(&b[*i + 1..close]).unwrap().trim_end_matches('+').parse().unwrap();
            let start = close + 3; // "}\r\n"
            *i = start + n;
            Sx::Str(String::from_utf8_lossy(&b[start..start + n]).into_owned())
        }
        _ => {
            let end = *i + b[*i..].iter().position(|c| matches!(c, b' ' | b')' | b'(')).unwrap();
            let atom = String::from_utf8_lossy(&b[*i..end]).into_owned();
            *i = end;
            if atom.eq_ignore_ascii_case("NIL") { Sx::Nil } else { Sx::Str(atom) }
        }
    }
}

/// Dovecot's IMAP `FETCH n (ENVELOPE)`: (subject, the from addresses as mailbox@host, and
/// whether the from list had group markers).
fn envelope(c: &mut Client, n: usize) -> (String, Vec<String>, bool) {
    let lines = c.cmd(&format!("f{n}"), &format!("FETCH {n} (ENVELOPE)"));
    assert!(lines.last().unwrap().starts_with(&format!("f{n} OK")), "{lines:?}");
    let all = lines[..lines.len() - 1].join("\r\n").into_bytes();
    let at = all.windows(9).position(|w| w == b"ENVELOPE ").unwrap() + 9;
    let Sx::List(fields) = parse_sx(&all, &mut at.clone()) else { panic!("{}", String::from_utf8_lossy(&all)) };
    let subject = match &fields[1] {
        Sx::Str(s) => s.clone(),
        other => panic!("subject {other:?}"),
    };
    let mut addresses = Vec::new();
    let mut group = false;
    if let Sx::List(from) = &fields[2] {
        for a in from {
            let Sx::List(parts) = a else { panic!("{a:?}") };
            match (&parts[2], &parts[3]) {
                (Sx::Str(mailbox), Sx::Str(host)) => addresses.push(format!("{mailbox}@{host}")),
                _ => group = true,
            }
        }
    }
    (subject, addresses, group)
}

/// Issue 13, items 3 and 7, through the real binary: every entry of the committed corpus
/// (src/proto/from_header_corpus.txt) is sent through mailgate to Postfix. The refused ones
/// (the four forms of the issue among them) get `550 5.7.1` at the end of DATA and never
/// arrive. For every accepted one, the copy Postfix delivered is read by Python's `email`
/// and by Dovecot's IMAP `FETCH ENVELOPE` (the copy dropped into a real Dovecot's INBOX),
/// and both read exactly the one address mailgate accepted. Then `AUTH=<ceo@…>` on MAIL
/// does not reach Postfix (no `sasl_sender=` in its log), and the message still arrives.
#[test]
fn from_header_has_one_reading_through_postfix_python_and_dovecot() {
    let pf = Postfix::start(PostfixOptions::default());
    let dovecot = crate::support::dovecot::Dovecot::start(crate::support::dovecot::DovecotOptions::default());
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", pf.port),
        smtp_upstream_extra: "login = \"xclient\"\n".into(),
        ..Default::default()
    });
    let out = mg.cli_stdin(
        &["user", "add", "alice@example.com", "--address", "alias@example.org", "--password-stdin"],
        "alice-account-pw\n",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let app = mg.app_password("alice@example.com", "corpus", "smtp");
    let mut c = smtps(&mg);
    let ehlo = cmd(&mut c, "EHLO client.example").join("\n");
    assert!(ehlo.contains("SMTPUTF8"), "{ehlo}");
    login(&mut c, &app);

    let corpus = from_corpus();
    let mut accepted = Vec::new();
    for (line, accept, expect, value) in &corpus {
        // Pipelined envelope (RFC 2920), then the message and its end line in one write.
        c.send(b"MAIL FROM:<alice@example.com> SMTPUTF8\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
        for code in ["250", "250", "354"] {
            assert!(reply(&mut c)[0].starts_with(code), "line {line}");
        }
        let mut m = b"From:".to_vec();
        m.extend_from_slice(value);
        m.extend_from_slice(
            format!("\r\nTo: bob@example.net\r\nSubject: corpus L{line}\r\n\r\nbody\r\n.\r\n").as_bytes(),
        );
        c.send(&m);
        let r = reply(&mut c);
        let shown = String::from_utf8_lossy(value).to_string();
        if *accept {
            assert!(r[0].starts_with("250"), "line {line} {shown:?} should be accepted: {r:?}\n{}", mg.log());
            accepted.push((*line, expect.clone()));
        } else {
            assert!(
                r[0].starts_with("550 5.7.1 The From: header is ambiguous: ")
                    || r[0] == "550 5.7.1 The From: header has no address",
                "line {line} {shown:?} ({expect}) should be refused: {r:?}"
            );
        }
    }

    // Item 7: AUTH= on MAIL does not become Postfix's sasl_sender.
    assert!(cmd(&mut c, "MAIL FROM:<alice@example.com> AUTH=<ceo@example.com>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: auth param\r\n\r\nbody\r\n");
    assert!(cmd(&mut c, ".")[0].starts_with("250"));
    assert!(cmd(&mut c, "QUIT")[0].starts_with("221"));

    let delivered = pf.wait_for_messages(accepted.len() + 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pf.messages().len(), accepted.len() + 1, "a refused message arrived");
    assert!(pf.wait_for_log("sasl_username=alice@example.com", PROMPTLY), "{}", pf.log());
    assert!(
        !pf.wait_for_log("sasl_sender=", Duration::from_secs(2)),
        "the client's AUTH= reached Postfix: {}",
        pf.log().lines().filter(|l| l.contains("sasl_sender=")).collect::<Vec<_>>().join("\n")
    );

    // The delivered copies: Python's reading.
    let dir = tempfile::tempdir().unwrap();
    let mut by_subject = std::collections::HashMap::new();
    let mut files = Vec::new();
    for d in &delivered {
        let text = String::from_utf8_lossy(&d.data).to_string();
        let Some(subject) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) else { continue };
        let Some(line) = subject.strip_prefix("corpus L") else { continue };
        let path = dir.path().join(format!("{line}.eml"));
        std::fs::write(&path, d.data_with_final_crlf()).unwrap();
        files.push(path);
        by_subject.insert(subject.to_string(), d.data_with_final_crlf());
    }
    assert_eq!(files.len(), accepted.len());
    let out = Command::new("python3").arg("-c").arg(PY_FROM).args(&files).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let python: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // Dovecot's reading: each copy into a real Dovecot's INBOX, then FETCH ENVELOPE.
    for (line, _) in &accepted {
        dovecot.deliver("alice@example.com", &by_subject[&format!("corpus L{line}")]);
    }
    let mut imap = Client::plain(dovecot.addr());
    assert!(imap.line().starts_with("* OK"));
    assert!(imap.cmd("a", "LOGIN alice@example.com alice-password").last().unwrap().starts_with("a OK"));
    assert!(imap.cmd("b", "SELECT INBOX").last().unwrap().starts_with("b OK"));
    let mut dovecot_reading = std::collections::HashMap::new();
    for n in 1..=accepted.len() {
        let (subject, addresses, group) = envelope(&mut imap, n);
        assert!(!group, "{subject}: Dovecot sees a group");
        dovecot_reading.insert(subject, addresses);
    }

    let mut disagreements = Vec::new();
    for (line, want) in &accepted {
        let py: Vec<String> = python[format!("{line}.eml")]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let py_groups = python[format!("{line}.eml")]["groups"].as_array().unwrap().len();
        let dv = &dovecot_reading[&format!("corpus L{line}")];
        if py != std::slice::from_ref(want) || py_groups != 0 || dv != std::slice::from_ref(want) {
            disagreements
                .push(format!("line {line}: mailgate {want}, Python {py:?} (groups {py_groups}), Dovecot {dv:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    eprintln!("{} accepted forms read alike by mailgate, Python and Dovecot", accepted.len());
}
