//! SMTP submission through mailgate: the front door (EHLO, STARTTLS, AUTH, limits) and
//! interop with real upstream servers started by the tests: Dovecot submission (master
//! SASL login) and Postfix (XCLIENT), each relaying to a sink the test reads. Real
//! clients: Python smtplib and swaks. Issue 3; SECURITY.md A, F, G, H.

use crate::support::client::{Client, tls_config};
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
fn with_submission(extra: &str) -> (Submission, Mailgate, String) {
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

fn smtps(mg: &Mailgate) -> Client {
    let mut c = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(c.line().starts_with("220 "));
    c
}

/// Sends a command and returns every line of the reply.
fn cmd(c: &mut Client, line: &str) -> Vec<String> {
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

fn login(c: &mut Client, app: &str) {
    cmd(c, "EHLO client.example");
    let r = cmd(c, &format!("AUTH PLAIN {}", b64(format!("\0alice@example.com\0{app}").as_bytes())));
    assert_eq!(r, vec!["235 2.7.0 Authentication successful"]);
}

fn message(from: &str, subject: &str) -> Vec<u8> {
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
    assert!(c.closed_within(Duration::from_secs(5)));
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
    assert!(auth(&mut c, &app)[0].starts_with("235"));
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

fn smtplib(mg: &Mailgate, mode: &str, app: &str, from: &str, msg: &[u8]) -> std::process::Output {
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
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", mg.submission.port()), "--tls"])
        .args(["--auth", "LOGIN", "--auth-user", "alice@example.com", "--auth-password", &app.replace(' ', "")])
        .args(["--from", "alias@example.org", "--to", "bob@example.net", "--data"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "swaks: {}\n{}", String::from_utf8_lossy(&out.stdout), mg.log());
    let got = sub.sink.wait_for_messages(2, Duration::from_secs(20));
    // swaks ends the data with its own CRLF before the dot; everything else is as sent.
    let mut expected = msg2.clone();
    expected.extend_from_slice(b"\r\n");
    assert!(got[1].original_message() == expected, "swaks' message changed on the way");
    // Dovecot submission saw the client's address (XCLIENT ADDR from mailgate), not mailgate's.
    assert!(sub.wait_for_log("rip=127.0.0.7", Duration::from_secs(5)), "{}", sub.log());
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
    assert_eq!(c.line_within(Duration::from_secs(5)).as_deref(), Some("421 4.7.0 Access revoked"));
    assert!(c.closed_within(Duration::from_secs(5)));
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
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/thunderbird.py");
    assert!(script.exists(), "{} is missing", script.display());
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
    let out = Command::new("python3")
        .arg(&script)
        .args(["--imap-host", "127.0.0.1", "--imap-port", &mg.imaps.port().to_string(), "--imap-security", "ssl"])
        .args(["--smtp-host", "127.0.0.1", "--smtp-port", &mg.submission.port().to_string()])
        .args(["--smtp-security", "starttls", "--user", "alice@example.com", "--password", &app])
        .args(["--to", "bob@example.net", "--bad-password", "alice-account-pw", "--expect-alert", "app password"])
        .output()
        .unwrap();
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
