//! Issue 18 point 1: the one-step device set-ups, as the devices read them. The web step's
//! buttons (through tests/support/webclient.py, real HTTPS) hand out an Apple
//! configuration profile and a Thunderbird for Android QR code; tests/support/device_setup.py
//! reads them as the device would (`plistlib`; `openssl cms -verify` for a signed profile;
//! `rsvg-convert` and `zbarimg` for the QR code) and logs in with the app password inside
//! over IMAP (`imaplib`) and SMTP (`smtplib`) through mailgate to the real Dovecot and its
//! submission service.

use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::submission::{Submission, SubmissionOptions};
use std::path::Path;
use std::process::Command;

fn tools() {
    for tool in ["zbarimg", "rsvg-convert", "openssl", "python3"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
        assert!(found.status.success(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
}

fn start(dovecot: &Dovecot, submission: &Submission, sign: bool) -> Mailgate {
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        master_password: "master-password".into(),
        smtp_upstream: format!("127.0.0.1:{}", submission.port),
        web_extra: format!("organisation = \"Example Mail\"\nsign_profiles = {sign}"),
        ..Options::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    mg
}

/// device_setup.py's findings about `file`.
fn check(mg: &Mailgate, kind: &str, file: &Path, extra: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/device_setup.py");
    let out = Command::new("python3").arg(script).arg(kind).arg(file).arg(&mg.ca).args(extra).output().unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "device_setup.py {kind}: {text}\nmailgate log:\n{}", mg.log());
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{text}"))
}

#[test]
fn apple_profile_installs_an_account_whose_password_logs_in() {
    tools();
    let dovecot = Dovecot::start(DovecotOptions::default());
    let submission = Submission::start(SubmissionOptions::default());
    let mg = start(&dovecot, &submission, false);
    let dir = mg.dir.path();
    let (first, second) = (dir.join("first.mobileconfig"), dir.join("second.mobileconfig"));
    let web = mg.web(
        "alice@example.com",
        "alice-account-pw",
        &["signin", &format!("apple:{}", first.display()), &format!("apple:{}", second.display())],
    );
    let headers = &web["apple"][0];
    assert_eq!(headers["Content-Type"], "application/x-apple-aspen-config", "{web}");
    assert_eq!(headers["Cache-Control"], "no-store", "{web}");
    assert_eq!(headers["Content-Disposition"], "attachment; filename=\"mail.example.test.mobileconfig\"", "{web}");

    let a = check(&mg, "apple", &first, &[]);
    assert_eq!(a["imap"], "OK OK", "{a}");
    assert_eq!(a["smtp"], 235, "{a}");
    assert_eq!(a["host"], "mail.example.test", "{a}");
    assert_eq!(a["imap_port"], mg.imaps.port(), "{a}");
    assert_eq!(a["smtp_port"], mg.smtps.port(), "{a}");
    assert_eq!(a["organisation"], "Example Mail", "{a}");
    // Downloaded again: another password, the same identifiers (a re-install replaces).
    let b = check(&mg, "apple", &second, &[]);
    assert_ne!(a["password"], b["password"]);
    for key in ["uuid", "identifier", "account_uuid"] {
        assert_eq!(a[key], b[key], "{key}: {a} {b}");
    }
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    assert!(list.contains("Apple device ") && list.contains(" (2)\""), "two labelled app passwords: {list}");
}

#[test]
fn signed_apple_profile_verifies_against_the_ca() {
    tools();
    let dovecot = Dovecot::start(DovecotOptions::default());
    let submission = Submission::start(SubmissionOptions::default());
    let mg = start(&dovecot, &submission, true);
    let file = mg.dir.path().join("signed.mobileconfig");
    mg.web("alice@example.com", "alice-account-pw", &["signin", &format!("apple:{}", file.display())]);
    let a = check(&mg, "apple", &file, &["--signed"]);
    assert!(a["openssl"].as_str().unwrap().contains("Verification successful"), "{a}");
    assert_eq!(a["imap"], "OK OK", "{a}");
    assert_eq!(a["smtp"], 235, "{a}");
}

#[test]
fn android_qr_code_reads_as_thunderbirds_format_and_its_password_logs_in() {
    tools();
    let dovecot = Dovecot::start(DovecotOptions::default());
    let submission = Submission::start(SubmissionOptions::default());
    let mg = start(&dovecot, &submission, false);
    let file = mg.dir.path().join("android.html");
    mg.web("alice@example.com", "alice-account-pw", &["signin", &format!("android:{}", file.display())]);
    let q = check(&mg, "android", &file, &[]);
    assert_eq!(q["host"], "mail.example.test", "{q}");
    assert_eq!(q["imap_port"], mg.imaps.port(), "{q}");
    assert_eq!(q["imap_security"], 3, "{q}");
    assert_eq!(q["smtp_port"], mg.smtps.port(), "{q}");
    assert_eq!(q["user"], "alice@example.com", "{q}");
    assert_eq!(q["email"], "alice@example.com", "{q}");
    assert_eq!(q["imap"], "OK OK", "{q}");
    assert_eq!(q["smtp"], 235, "{q}");
    // The text block for other apps has the same password (grouped in fours).
    let password = q["password"].as_str().unwrap();
    let grouped: Vec<String> = password.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    let text = q["settings_text"].as_str().unwrap();
    assert!(text.contains(&format!("Password: {}", grouped.join(" "))), "{text}");
    assert!(text.contains(&format!("Incoming mail (IMAP): mail.example.test, port {}, SSL/TLS", mg.imaps.port())));
}
