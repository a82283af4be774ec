//! `[accounts] password_check = "upstream"`: users who exist only in Dovecot's
//! passwd-file log in over IMAP, SMTP and the web with their Dovecot password, get a
//! mailgate account on first use, and after enrolling TOTP on the web need app
//! passwords. Issue 5.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::submission::{Submission, SubmissionOptions};
use std::process::Command;
use std::time::Duration;

fn users() -> Vec<(String, String)> {
    vec![
        ("bob@example.com".into(), "bob-dovecot-password".into()),
        ("carol@example.com".into(), "carol-dovecot-password".into()),
        ("mallory@other.example".into(), "mallory-dovecot-password".into()),
    ]
}

fn setup() -> (Dovecot, Submission, Mailgate) {
    let dovecot = Dovecot::start(DovecotOptions { users: users(), ..Default::default() });
    let sub = Submission::start(SubmissionOptions { users: users(), ..Default::default() });
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        extra_sections: "[accounts]\npassword_check = \"upstream\"\nallowed_domains = [\"example.com\"]\n".into(),
        ..Default::default()
    });
    (dovecot, sub, mg)
}

fn imap_login(mg: &Mailgate, user: &str, pw: &str) -> (Client, String) {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    let r = c.cmd("a", &format!("LOGIN \"{user}\" \"{pw}\""));
    (c, r.last().unwrap().clone())
}

/// Changes a user's password in Dovecot's passwd-file. Dovecot rereads it when its
/// modification time (in seconds) changes, so let a second pass first.
fn set_dovecot_password(d: &Dovecot, user: &str, pw: Option<&str>) {
    std::thread::sleep(Duration::from_millis(1100));
    let path = d.dir.path().join("users");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| match l.split_once(':') {
            Some((u, rest)) if u == user => {
                pw.map(|p| format!("{u}:{{PLAIN}}{p}:{}", rest.split_once(':').map(|x| x.1).unwrap_or("")))
            }
            _ => Some(l.to_string()),
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn a_dovecot_only_user_logs_in_everywhere_and_2fa_then_needs_app_passwords() {
    let (dovecot, sub, mg) = setup();
    assert!(!mg.ok(&["user", "list"]).contains("bob@example.com"));
    // IMAP with the Dovecot password: the session is bob's own login (no master user).
    let (mut c, r) = imap_login(&mg, "bob@example.com", "bob-dovecot-password");
    assert!(r.starts_with("a OK"), "{r}\n{}", mg.log());
    assert!(c.cmd("b", "SELECT INBOX").last().unwrap().starts_with("b OK"));
    assert!(dovecot.wait_for_log("user=<bob@example.com>, method=PLAIN", PROMPTLY));
    assert!(!dovecot.log().contains("master_user=<mailgate>"), "bob's session used the master user");
    let list = mg.ok(&["user", "list"]);
    assert!(list.contains("bob@example.com") && list.contains("password=none"), "{list}");
    // Wrong password: refused, nothing created for unknown users.
    let (_c, r) = imap_login(&mg, "bob@example.com", "wrong");
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    // SMTP with the Dovecot password.
    let out = Command::new("python3")
        .args(["-c", "import smtplib,ssl,sys; c=ssl.create_default_context(cafile=sys.argv[2]); s=smtplib.SMTP_SSL('localhost',int(sys.argv[1]),context=c,timeout=30); s.login('bob@example.com','bob-dovecot-password'); s.sendmail('bob@example.com',['x@example.net'],b'From: bob@example.com\\r\\nSubject: hi\\r\\n\\r\\nbody\\r\\n'); s.quit()"])
        .arg(mg.smtps.port().to_string())
        .arg(&mg.ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log());
    assert_eq!(sub.sink.wait_for_messages(1, Duration::from_secs(20))[0].mail_from, "bob@example.com");
    // The web step with the Dovecot password: enrol TOTP, make an app password.
    let got = mg.web("bob@example.com", "bob-dovecot-password", &["signin", "enrol", "app-password:laptop", "account"]);
    assert_eq!(got["signin"][1], "/app-passwords");
    assert!(
        !got["account_page"].as_str().unwrap().contains("href=\"/password\""),
        "no password change in upstream mode"
    );
    let app = got["app_password"].as_str().unwrap().to_string();
    // Now the account password is refused over IMAP with the alert, the app password works.
    let (_c, r) = imap_login(&mg, "bob@example.com", "bob-dovecot-password");
    assert!(r.starts_with("a NO [ALERT]"), "{r}");
    let (_c, r) = imap_login(&mg, "bob@example.com", &app);
    assert!(r.starts_with("a OK"), "{r}");
    // And the web sign-in now asks for the second factor.
    let got = mg.web("bob@example.com", "bob-dovecot-password", &["signin"]);
    assert_eq!(got["signin"][1], "/login/totp");
}

#[test]
fn upstream_password_changes_and_deletions_take_effect_at_once() {
    let (dovecot, _sub, mg) = setup();
    let (_c, r) = imap_login(&mg, "carol@example.com", "carol-dovecot-password");
    assert!(r.starts_with("a OK"), "{r}");
    set_dovecot_password(&dovecot, "carol@example.com", Some("carol-new-password"));
    let (_c, r) = imap_login(&mg, "carol@example.com", "carol-dovecot-password");
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "old password still works: {r}");
    let (_c, r) = imap_login(&mg, "carol@example.com", "carol-new-password");
    assert!(r.starts_with("a OK"), "{r}");
    set_dovecot_password(&dovecot, "carol@example.com", None);
    let (_c, r) = imap_login(&mg, "carol@example.com", "carol-new-password");
    assert!(r.starts_with("a NO"), "deleted user still logs in: {r}");
}

#[test]
fn only_allowed_domains_get_accounts() {
    let (_dovecot, _sub, mg) = setup();
    // mailgate keeps no passwords in this mode: the CLI says so instead of storing one.
    let out = mg.cli_stdin(&["user", "passwd", "carol@example.com", "--password-stdin"], "carol-local-pass-9\n");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("password_check = \"upstream\""));
    let out = mg.cli_stdin(&["user", "add", "frank@example.com", "--password-stdin"], "frank-local-pass\n");
    assert!(!out.status.success());
    let (_c, r) = imap_login(&mg, "mallory@other.example", "mallory-dovecot-password");
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    assert!(!mg.ok(&["user", "list"]).contains("mallory"));
    // Unknown to Dovecot: refused, nothing created.
    let (_c, r) = imap_login(&mg, "nobody@example.com", "whatever-password");
    assert!(r.starts_with("a NO [AUTHENTICATIONFAILED]"), "{r}");
    assert!(!mg.ok(&["user", "list"]).contains("nobody"));
}

#[test]
fn repeated_checks_are_cached_and_a_failure_drops_the_cache() {
    let (dovecot, _sub, mg) = setup();
    let logins = || dovecot.log().matches("Login: user=<carol@example.com>").count();
    mg.web("carol@example.com", "carol-dovecot-password", &["signin"]);
    assert!(dovecot.wait_for_log("Login: user=<carol@example.com>", PROMPTLY));
    let after_first = logins();
    for _ in 0..3 {
        let got = mg.web("carol@example.com", "carol-dovecot-password", &["signin"]);
        assert_eq!(got["signin"][1], "/app-passwords");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(logins(), after_first, "each web sign-in logged in upstream again");
    // A wrong password is checked upstream (never answered from the cache) and drops it.
    let got = mg.web("carol@example.com", "wrong-password", &["signin"]);
    assert_eq!(got["signin"][0], 401);
    mg.web("carol@example.com", "carol-dovecot-password", &["signin"]);
    assert!(
        crate::support::sink::poll(Duration::from_secs(5), || logins() > after_first),
        "the cache survived a failed check"
    );
}
