//! Security notifications by mail (issue 18 point 4), through the real upstream: mailgate
//! in front of the test Dovecot submission (master SASL login as the account), which
//! relays every mail to a sink the test reads. Each event is mailed with its facts and no
//! secret; an upstream that is down does not fail the action and the notice arrives once
//! it is back; a flood is cut at `max_per_hour` with a `notification_suppressed` audit
//! event.

use crate::support::mailgate::{Mailgate, Options};
use crate::support::submission::{Delivered, Submission, SubmissionOptions};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ALICE: &str = "alice@example.com";
const PW: &str = "alice-account-pw";
const WAIT: Duration = Duration::from_secs(30);

/// mailgate in front of `smtp_upstream` with `[notify]` lines; alice with an account password.
fn start(smtp_upstream: String, notify: &str) -> Mailgate {
    let mg = Mailgate::start(Options {
        smtp_upstream,
        master_password: "master-password".into(),
        limits: "auth_failure_delay_ms = 1\nip_penalty_max_ms = 1\n".into(),
        notify: notify.into(),
        ..Default::default()
    });
    mg.add_user(ALICE, PW);
    mg
}

/// The sink's mails whose subject is `subject`.
fn with_subject(sub: &Submission, subject: &str) -> Vec<Delivered> {
    let line = format!("Subject: {subject}\r\n");
    sub.messages().into_iter().filter(|m| String::from_utf8_lossy(&m.data).contains(&line)).collect()
}

/// Waits for the mail with `subject` and returns its text.
fn mail(sub: &Submission, mg: &Mailgate, subject: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(m) = with_subject(sub, subject).pop() {
            assert_eq!(m.rcpt_to, vec![ALICE]);
            return String::from_utf8_lossy(&m.data).into_owned();
        }
        assert!(Instant::now() < deadline, "no mail \"{subject}\"\nsink: {:?}\nmailgate: {}", sub.messages(), mg.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `secrets` appear nowhere in `text`.
fn no_secret(text: &str, secrets: &[&str]) {
    for s in secrets.iter().filter(|s| s.len() >= 6) {
        assert!(!text.contains(s), "a secret in the mail: {s}\n{text}");
        let compact: String = s.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        assert!(!text.contains(&compact), "a secret in the mail: {s}\n{text}");
    }
}

/// An SMTP login through mailgate from `source` (127.0.0.N), with `password`; whether it
/// was accepted.
fn smtp_login(mg: &Mailgate, source: &str, password: &str) -> bool {
    smtp_login_at(mg.smtps.port(), &mg.ca, source, password)
}

fn smtp_login_at(port: u16, ca: &std::path::Path, source: &str, password: &str) -> bool {
    let py = r#"
import smtplib, ssl, sys
port, ca, src, user, pw = sys.argv[1:6]
s = smtplib.SMTP_SSL("localhost", int(port), context=ssl.create_default_context(cafile=ca), timeout=30, source_address=(src, 0))
try:
    s.login(user, pw)
    print("accepted")
except smtplib.SMTPException as e:
    print("refused", e)
s.close()
"#;
    let out = Command::new("python3")
        .args(["-c", py, &port.to_string()])
        .arg(ca)
        .args([source, ALICE, password])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    text.starts_with("accepted")
}

/// The backup codes (lines of four-character groups) and the otpauth URI that `totp
/// enable` / `totp backup-codes` printed.
fn printed_secrets(out: &str) -> Vec<String> {
    let code = |l: &str| {
        l.split(' ').count() >= 2 && l.split(' ').all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_alphanumeric()))
    };
    out.lines().map(str::trim).filter(|l| code(l) || l.starts_with("otpauth")).map(String::from).collect()
}

#[test]
fn each_event_is_mailed_with_its_facts_and_no_secret() {
    let sub = Submission::start(SubmissionOptions::default());
    let mg = start(format!("127.0.0.1:{}", sub.port), "");
    let devices = "/app-passwords";

    // An app password: its label, id and scopes; never the password.
    let app = mg.app_password(ALICE, "Phone", "imap,smtp");
    let m = mail(&sub, &mg, "A new app password was created");
    assert!(m.contains("Phone") && m.contains("IMAP, SMTP") && m.contains(devices), "{m}");
    assert!(m.contains("From: mailgate <mailgate@mail.example.test>") && m.contains("multipart/alternative"), "{m}");
    assert!(m.contains(" UTC"), "{m}");
    no_secret(&m, &[&app, PW]);

    // A new device: the first mail-port login from 127.0.0.9; a second one is quiet.
    assert!(smtp_login(&mg, "127.0.0.9", &app));
    let m = mail(&sub, &mg, "New sign-in from a new device");
    assert!(m.contains("127.0.0.9") && m.contains("SMTP"), "{m}");
    no_secret(&m, &[&app]);
    assert!(smtp_login(&mg, "127.0.0.9", &app));

    // The account password changed.
    let new_pw = "alice-new-account-pw";
    let out = mg.cli_stdin(&["user", "passwd", ALICE, "--password-stdin"], &format!("{new_pw}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = mail(&sub, &mg, "Your account password was changed");
    assert!(m.contains("by admin"), "{m}");
    no_secret(&m, &[PW, new_pw]);

    // Two-step verification on: nothing of the secret or the codes.
    let on = mg.ok(&["totp", "enable", ALICE]);
    let m = mail(&sub, &mg, "Two-step verification was turned on");
    let secrets = printed_secrets(&on);
    assert!(!secrets.is_empty(), "{on}");
    no_secret(&m, &secrets.iter().map(String::as_str).collect::<Vec<_>>());
    let secret = on.split("secret=").nth(1).and_then(|s| s.split('&').next()).unwrap_or_default().to_string();
    no_secret(&m, &[&secret]);

    // New backup codes, then one of them used on the web step.
    let codes = mg.ok(&["totp", "backup-codes", ALICE]);
    let m = mail(&sub, &mg, "New backup codes were created");
    let codes = printed_secrets(&codes);
    no_secret(&m, &codes.iter().map(String::as_str).collect::<Vec<_>>());
    let out = mg.web(ALICE, new_pw, &["signin", &format!("backup:{}", codes[0])]);
    assert_eq!(out["backup"][0], 303, "{out}");
    let m = mail(&sub, &mg, "A backup code was used to sign in");
    assert!(m.contains("Codes left") && m.contains("127.0.0.1"), "{m}");
    no_secret(&m, &codes.iter().map(String::as_str).collect::<Vec<_>>());

    // Two-step verification off.
    mg.ok(&["totp", "disable", ALICE]);
    let m = mail(&sub, &mg, "Two-step verification was turned off");
    assert!(m.contains("by admin"), "{m}");

    // Sign-ins paused: 30 wrong guesses from unfamiliar addresses use up the account's
    // budget; the next guess from a fourth address is refused uncompared, and the owner
    // hears about it once.
    // (Each guess differs: a repeated wrong password is not counted again. All at once:
    // each refusal waits out the account's failure delay.)
    let (port, ca) = (mg.smtps.port(), mg.ca.clone());
    std::thread::scope(|scope| {
        for n in 2..=4 {
            for i in 0..10 {
                let ca = ca.clone();
                scope.spawn(move || {
                    assert!(!smtp_login_at(port, &ca, &format!("127.0.0.{n}"), &format!("wrong-{n}-{i}")));
                });
            }
        }
    });
    assert!(!smtp_login(&mg, "127.0.0.5", "wrong-5"));
    assert!(!smtp_login(&mg, "127.0.0.6", "wrong-6"));
    let m = mail(&sub, &mg, "Sign-ins to your account were paused after failed attempts");
    assert!(m.contains("sign-ins with the account password") && m.contains("127.0.0.5"), "{m}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(with_subject(&sub, "Sign-ins to your account were paused after failed attempts").len(), 1);
    // Every mail went to alice only, from her own login upstream.
    assert!(sub.messages().iter().all(|m| m.rcpt_to == [ALICE] && m.mail_from == ALICE));
}

/// Forwards connections to `to` while `up` is set; closes them at once otherwise (an
/// upstream that is down).
fn switchable_upstream(to: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = Arc::new(AtomicBool::new(false));
    let on = up.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            if !on.load(Ordering::SeqCst) {
                continue; // dropped: closed
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else { continue };
            for (mut a, mut b) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || std::io::Write::write_all(&mut b, &buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, up)
}

#[test]
fn upstream_down_the_action_succeeds_and_the_notice_comes_later() {
    let sub = Submission::start(SubmissionOptions::default());
    let (port, up) = switchable_upstream(sub.port);
    let mg = start(format!("127.0.0.1:{port}"), "first_retry_secs = 1");
    let app = mg.app_password(ALICE, "Laptop", "imap");
    assert!(app.len() > 10, "the action itself succeeded");
    mg.wait_log("cannot send a security notification; will retry", 1, WAIT);
    assert!(sub.messages().is_empty());
    up.store(true, Ordering::SeqCst);
    let m = mail(&sub, &mg, "A new app password was created");
    assert!(m.contains("Laptop"), "{m}");
    no_secret(&m, &[&app]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(with_subject(&sub, "A new app password was created").len(), 1, "sent once");
}

#[test]
fn a_flood_is_cut_at_max_per_hour_with_an_audit_event() {
    let sub = Submission::start(SubmissionOptions::default());
    let mg = start(format!("127.0.0.1:{}", sub.port), "max_per_hour = 4");
    mg.ok(&["totp", "enable", ALICE]);
    for _ in 0..49 {
        mg.ok(&["totp", "backup-codes", ALICE]);
    }
    sub.wait_for_messages(4, WAIT);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sub.messages().len(), 4, "50 events, max_per_hour = 4");
    mg.wait_log("security notification dropped: too many for this account this hour", 1, WAIT);
    let dump = mg.dir.path().join("dump.json");
    mg.ok(&["store", "export", dump.to_str().unwrap()]);
    let dump: serde_json::Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let suppressed: Vec<&serde_json::Value> = dump["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "notification_suppressed" && e["username"] == ALICE)
        .collect();
    assert_eq!(suppressed.len(), 1, "once an hour: {suppressed:?}");
}

#[test]
fn enabled_false_sends_nothing() {
    let sub = Submission::start(SubmissionOptions::default());
    let mg = start(format!("127.0.0.1:{}", sub.port), "enabled = false");
    let app = mg.app_password(ALICE, "Phone", "imap,smtp");
    assert!(smtp_login(&mg, "127.0.0.9", &app));
    mg.ok(&["totp", "enable", ALICE]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(sub.messages().is_empty(), "{:?}", sub.messages());
}

#[test]
fn with_a_relay_the_mail_goes_to_the_mta_from_the_configured_sender() {
    let sub = Submission::start(SubmissionOptions::default());
    let relay = format!("relay = \"{}\"\nfrom = \"security@example.com\"", sub.sink.addr());
    let mg = start(format!("127.0.0.1:{}", sub.port), &relay);
    mg.ok(&["totp", "enable", ALICE]);
    let m = mail(&sub, &mg, "Two-step verification was turned on");
    assert!(m.contains("From: mailgate <security@example.com>"), "{m}");
    assert!(!m.contains("by submission.mailgate.test"), "straight to the relay, not through submission: {m}");
    assert!(sub.messages().iter().all(|d| d.mail_from == "security@example.com"));
}

#[test]
fn un_enrolled_accounts_in_grace_get_one_reminder_a_week() {
    let sub = Submission::start(SubmissionOptions::default());
    let mut mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        notify: String::new(),
        extra_sections: "[policy]\nrequire_second_factor = [\"example.com\"]\ngrace_until = \"2099-12-31\"\n".into(),
        ..Default::default()
    });
    mg.add_user(ALICE, PW);
    // The sender looks for accounts due a reminder when it starts, then hourly.
    mg.restart();
    let m = mail(&sub, &mg, "Please turn on two-step verification");
    assert!(m.contains("2099-12-31"), "{m}");
    mg.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(with_subject(&sub, "Please turn on two-step verification").len(), 1, "once in 7 days");
}

/// `password_check = "upstream"`: a Dovecot-only user's first IMAP login creates the
/// account and is a new device; the next login from the same address is not.
#[test]
fn a_new_device_with_the_upstream_password_check() {
    use crate::support::client::{Client, tls_config};
    use crate::support::dovecot::{Dovecot, DovecotOptions};
    let users = vec![(ALICE.to_string(), "alice-dovecot-password".to_string())];
    let dovecot = Dovecot::start(DovecotOptions { users: users.clone(), ..Default::default() });
    let sub = Submission::start(SubmissionOptions { users, ..Default::default() });
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        notify: String::new(),
        extra_sections: "[accounts]\npassword_check = \"upstream\"\nallowed_domains = [\"example.com\"]\n".into(),
        ..Default::default()
    });
    for _ in 0..2 {
        let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
        c.line();
        let r = c.cmd("a", &format!("LOGIN \"{ALICE}\" \"alice-dovecot-password\""));
        assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    }
    let m = mail(&sub, &mg, "New sign-in from a new device");
    assert!(m.contains("127.0.0.1") && m.contains("IMAP") && m.contains("account password"), "{m}");
    no_secret(&m, &["alice-dovecot-password"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(with_subject(&sub, "New sign-in from a new device").len(), 1);
}
