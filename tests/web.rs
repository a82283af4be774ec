//! End to end in a real browser: Debian's headless Chromium, driven through chromedriver by
//! tests/support/browser.py (W3C WebDriver, Python standard library only), goes through the
//! web step as a person would; then the app password it made logs in over IMAPS through
//! mailgate to the real Dovecot; then, with that connection open, the browser revokes the
//! app password, makes new backup codes and turns two-step verification off.
//!
//! A second test turns POP3 and ManageSieve on and checks the new-app-password form and
//! page for all four scopes. Another restarts mailgate under libfaketime, 91 days on, for
//! the devices list's stale mark.
//!
//! Every page it checks is shot at 390 px (a phone) and 1280 px (a desktop) and must not be
//! wider than the window. `MAILGATE_SCREENSHOTS=DIR` keeps the screenshots
//! (signin-390.png, signin-1280.png, enrol-390.png, …) in DIR, e.g. to refresh
//! docs/screenshots/; otherwise they go to the test's temporary directory.

use crate::imap_front::with_dovecot_opts;
use crate::support::client::{Client, tls_config};
use crate::support::mailgate::{Mailgate, Options, free_port};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The driver's own deadline is shorter; this only catches a driver that hangs anyway.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(300);
/// `[web] organisation`: the browser checks it heads the pages and ends their titles.
const ORGANISATION: &str = "Example Mail";
/// The screenshots of the first run (each at 390 and 1280 px).
const SHOTS: [&str; 11] = [
    "signin",
    "enrol",
    "backup-codes",
    "signed-out",
    "second-factor",
    "sign-in-cancelled",
    "second-factor-backup",
    "security-notice",
    "app-password-no-scope",
    "app-password-created",
    "account",
];
/// The screenshots of the last run.
const SHOTS_AFTER: [&str; 4] = ["revoked", "confirm-backup-codes", "confirm-turn-off", "account-2fa-off"];
/// The screenshots of the one-step device set-ups.
const SHOTS_DEVICES: [&str; 2] = ["device-setup", "android-setup"];
/// The screenshots with POP3 and ManageSieve on.
const SHOTS_SCOPES: [&str; 2] = ["app-password-scopes", "app-password-created-all-scopes"];

fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/browser.py")
}

/// What one run of the driver did.
struct Run {
    ok: bool,
    /// What it wrote to its JSON file.
    json: serde_json::Value,
    /// Why it failed, in a line.
    failure: String,
}

/// Runs the driver against `mg` with `extra` arguments. Its output goes to files (no pipe
/// can fill up); past [`DRIVER_TIMEOUT`] it is stopped, and whatever chromedriver process
/// group it left (the PID it wrote down) is killed.
fn run_driver(mg: &Mailgate, shots: &Path, name: &str, extra: &[&str]) -> Run {
    let dir = mg.dir.path();
    let out = dir.join(format!("{name}.json"));
    let log = dir.join(format!("{name}.log"));
    let pids = dir.join(format!("{name}.pids"));
    let url = format!("https://localhost:{}", mg.web.port());
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("python3")
        .arg(driver())
        .arg(&url)
        .args(["alice@example.com", "alice-account-pw"])
        .arg(shots)
        .arg(&out)
        .arg("--cert")
        .arg(dir.join("certs/mailgate-cert.pem"))
        .args(["--organisation", ORGANISATION])
        .args(extra)
        .env("MAILGATE_BROWSER_PIDS", &pids)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DRIVER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The driver removes this file after ending chromedriver and Chromium itself.
    if let Ok(text) = std::fs::read_to_string(&pids)
        && let Ok(pgid) = text.trim().parse::<u32>()
    {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    }
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let json = std::fs::read_to_string(&out)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    println!("--- browser.py {name} ---\n{output}");
    let failure = match (status, &json["failure"]) {
        (None, _) => format!("browser.py did not finish within {DRIVER_TIMEOUT:?} and was stopped"),
        (Some(_), serde_json::Value::String(f)) => f.clone(),
        (Some(s), _) => format!("browser.py exited with {s} (see its output above)"),
    };
    Run { ok: status.is_some_and(|s| s.success()) && json["ok"] == true, json, failure }
}

fn imaps(mg: &Mailgate) -> Client {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(c.line().starts_with("* OK"));
    c
}

#[test]
fn browser_enrols_totp_and_makes_an_app_password_that_works_over_imap() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
    let started = Instant::now();
    let opts = Options { web_extra: format!("organisation = \"{ORGANISATION}\""), ..Options::default() };
    let (_dovecot, mg, _cli_app) = with_dovecot_opts(opts);
    let shots = match std::env::var_os("MAILGATE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => mg.dir.path().join("screenshots"),
    };
    let setup = started.elapsed();

    // The person's way through the pages, in the browser.
    let t = Instant::now();
    let run = run_driver(&mg, &shots, "full", &[]);
    assert!(run.ok, "the browser run failed: {}\nmailgate log:\n{}", run.failure, mg.log());
    let browser = t.elapsed();
    let app = run.json["app_password"].as_str().unwrap().to_string();
    let used = run.json["used_backup_code"].as_str().unwrap().to_string();
    let codes = run.json["backup_codes"].as_array().unwrap();
    assert_eq!(codes.len(), 10);
    println!("downloads: {}", run.json["download"]);
    assert_shots(&shots, &SHOTS);
    let notice = run.json["security_notice"].as_array().unwrap();
    assert!(notice.len() == 1 && notice[0].as_str().unwrap().contains("127.0.0.1"), "{notice:?}");

    // The app password made in the browser reads mail through mailgate from Dovecot.
    let t = Instant::now();
    let mut c = imaps(&mg);
    // Named as Thunderbird names itself (IMAP ID), so that the devices list can show it.
    let r = c.cmd("i", "ID (\"name\" \"Thunderbird\" \"version\" \"153.0\")");
    assert!(r.last().unwrap().starts_with("i OK"), "{r:?}");
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", mg.log());
    let r = c.cmd("b", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("b OK"), "{r:?}");
    assert!(c.cmd("c", "LOGOUT").iter().any(|l| l.starts_with("c OK")));
    // Closed from this side too, so that its session is over before the revocation below
    // counts the connections that use the app password.
    drop(c);
    // Two-step verification is on: the account password alone gets the alert.
    let mut c = imaps(&mg);
    let r = c.cmd("j", "ID (\"name\" \"K-9 Mail\" \"version\" \"6.800\")");
    assert!(r.last().unwrap().starts_with("j OK"), "{r:?}");
    let r = c.cmd("d", "LOGIN alice@example.com alice-account-pw");
    assert!(r[0].starts_with("d NO [ALERT] "), "{r:?}");
    let imap = t.elapsed();
    // The store agrees with what the pages said.
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    assert!(list.contains("Browser test"), "{list}");

    // The backup code used to sign in does not work a second time.
    let t = Instant::now();
    let again = run_driver(&mg, &shots, "reuse", &["--mode", "reuse", "--backup-code", &used]);
    assert!(again.ok, "the used backup code was not refused: {}\nmailgate log:\n{}", again.failure, mg.log());
    let reuse = t.elapsed();

    // With a connection open on the app password: the browser revokes it (one connection
    // ends: said in the singular), makes new backup codes and turns 2FA off, each after
    // its question; the refused account-password login above is listed until then.
    let t = Instant::now();
    let mut open = imaps(&mg);
    let r = open.cmd("i", "ID (\"name\" \"Thunderbird\" \"version\" \"153.0\")");
    assert!(r.last().unwrap().starts_with("i OK"), "{r:?}");
    let r = open.cmd("e", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("e OK"), "{r:?}");
    let unused = codes[4].as_str().unwrap();
    let last = run_driver(&mg, &shots, "after", &["--mode", "after", "--backup-code", unused]);
    assert!(last.ok, "the browser run after the IMAP checks failed: {}\nmailgate log:\n{}", last.failure, mg.log());
    assert_shots(&shots, &SHOTS_AFTER);
    assert!(open.closed_within(Duration::from_secs(10)), "the revoked app password's connection is still open");
    // 2FA is off: the account password opens IMAP again.
    let mut c = imaps(&mg);
    let r = c.cmd("f", "LOGIN alice@example.com alice-account-pw");
    assert!(r.last().unwrap().starts_with("f OK"), "{r:?}");
    let after = t.elapsed();
    println!(
        "timings: setup {setup:.1?}, browser {browser:.1?} ({}), imap {imap:.1?}, reuse {reuse:.1?} ({}), after {after:.1?} ({}), total {:.1?}",
        run.json["timings"],
        again.json["timings"],
        last.json["timings"],
        started.elapsed()
    );
}

/// With POP3 and ManageSieve on, the browser ticks their boxes (offered, not ticked by
/// default) and makes an app password for all four scopes; the page lists each
/// protocol's server settings, on the ports mailgate listens on (issue 17, point 3).
/// No mail server is needed: the page is the check (tests/pop3.rs and tests/sieve.rs log
/// in with such app passwords).
#[test]
fn browser_makes_an_app_password_for_pop3_and_managesieve() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
    let opts = Options {
        web_extra: format!("organisation = \"{ORGANISATION}\""),
        pop3_upstream: Some(format!("127.0.0.1:{}", free_port())),
        sieve_upstream: Some(format!("127.0.0.1:{}", free_port())),
        ..Options::default()
    };
    let mg = Mailgate::start(opts);
    mg.add_user("alice@example.com", "alice-account-pw");
    let shots = match std::env::var_os("MAILGATE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => mg.dir.path().join("screenshots"),
    };
    let run = run_driver(&mg, &shots, "scopes", &["--mode", "scopes", "--label", "Laptop"]);
    assert!(run.ok, "the browser run failed: {}\nmailgate log:\n{}", run.failure, mg.log());
    assert_shots(&shots, &SHOTS_SCOPES);
    let settings = run.json["settings"].as_str().unwrap();
    let (pop3s, pop3, sieve) = (mg.pop3s.unwrap().port(), mg.pop3.unwrap().port(), mg.sieve.unwrap().port());
    for line in [
        format!("mail.example.test, port {}, SSL/TLS", mg.imaps.port()),
        format!("mail.example.test, port {pop3s}, SSL/TLS; or port {pop3}, STARTTLS"),
        format!("mail.example.test, port {}, SSL/TLS", mg.smtps.port()),
        format!("mail.example.test, port {sieve}, STARTTLS"),
    ] {
        assert!(settings.contains(&line), "{line:?} is not in the settings:\n{settings}");
    }
    // The store agrees with what the page said.
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["app_passwords"][0]["scopes"], serde_json::json!(["imap", "smtp", "pop3", "sieve"]), "{list}");
}

/// With `[oauth]` on, the browser does what Thunderbird's external sign-in has the system
/// browser do (tests/support/browser.py `--mode oauth`, a loopback listener standing in
/// for Thunderbird): sign-in with the address pre-filled, the consent page (shot at both
/// widths: oauth-consent-390.png, oauth-consent-1280.png), Deny back to the app with
/// `access_denied`, `state` and `iss`; then Allow (the consent page's CSP lets the form's
/// redirect reach the loopback address), the code redeemed once with PKCE, the refresh
/// token rotated (its replay refused), and the grant in the device list.
#[test]
fn browser_signs_a_mail_app_in_with_oauth() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
    let opts = Options {
        web_extra: format!("organisation = \"{ORGANISATION}\""),
        extra_sections: "[oauth]\nenabled = true\n".into(),
        ..Options::default()
    };
    let mg = Mailgate::start(opts);
    mg.add_user("alice@example.com", "alice-account-pw");
    let shots = match std::env::var_os("MAILGATE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => mg.dir.path().join("screenshots"),
    };
    let run = run_driver(&mg, &shots, "oauth", &["--mode", "oauth", "--issuer", "https://mail.example.test"]);
    assert!(run.ok, "the browser run failed: {}\nmailgate log:\n{}", run.failure, mg.log());
    assert_shots(&shots, &["oauth-consent"]);
    assert_eq!(run.json["denied"]["error"], "access_denied", "{}", run.json);
    assert_eq!(run.json["tokens"]["scope"], "mail", "{}", run.json);
    assert_eq!(run.json["replay"], serde_json::json!([400, "invalid_grant"]), "a code works once: {}", run.json);
    assert_eq!(run.json["refresh_replay"][1], "invalid_grant", "a rotated refresh token is dead: {}", run.json);
    let rows = run.json["device_rows"].as_str().unwrap();
    assert!(rows.contains("browser.py Thunderbird-test"), "the token request's user agent is listed: {rows}");
    // Neither the code nor a token is ever logged.
    let log = mg.log();
    assert!(!log.contains("mgat1.") && !log.contains("mgrt1."), "a token in the log:\n{log}");
}

/// The one-step set-ups (issue 18 point 1) in the browser: the account page's buttons
/// (device-setup), the Apple profile downloaded, the Thunderbird for Android page with its
/// QR code (android-setup), and the Copy buttons that /copy.js adds after the password,
/// here and on the form's created page; the password is selectable as a whole. What the
/// profile and QR code hold is checked in tests/devices.rs.
#[test]
fn browser_sets_up_devices_in_one_step_with_copy_buttons() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
    let opts = Options { web_extra: format!("organisation = \"{ORGANISATION}\""), ..Options::default() };
    let mg = Mailgate::start(opts);
    mg.add_user("alice@example.com", "alice-account-pw");
    let shots = match std::env::var_os("MAILGATE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => mg.dir.path().join("screenshots"),
    };
    let run = run_driver(&mg, &shots, "devices", &["--mode", "devices", "--label", "Laptop"]);
    assert!(run.ok, "the browser run failed: {}\nmailgate log:\n{}", run.failure, mg.log());
    assert_shots(&shots, &SHOTS_DEVICES);
    assert_eq!(run.json["selected"], run.json["android_password"], "{}", run.json);
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    for label in ["Apple device ", "Android device ", "Laptop"] {
        assert!(list.contains(label), "{label} is not listed: {list}");
    }
}

/// The stale mark in the browser (issue 18's tests: "stale mark with a fake clock"): an
/// app password used once over IMAP has no mark on the real clock; mailgate restarted on
/// the same data under libfaketime, 91 days on (`FAKETIME=+91d`; the monotonic clock of
/// tokio's timers left alone), lists it "Not used for over 90 days" (devices-stale-390.png,
/// devices-stale-1280.png), and `mailgate devices --json` agrees both times. No wall-clock
/// bound: the clock moves by an offset, so a slow machine sees the same days.
#[test]
fn browser_marks_an_app_password_stale_after_91_fake_days() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: run scripts/install-test-deps.sh");
    }
    let faketime = libfaketime().expect("libfaketime is missing (faketime): run scripts/install-test-deps.sh");
    let opts = Options { web_extra: format!("organisation = \"{ORGANISATION}\""), ..Options::default() };
    let (_dovecot, mut mg, _cli_app) = with_dovecot_opts(opts);
    let shots = match std::env::var_os("MAILGATE_SCREENSHOTS") {
        Some(d) => PathBuf::from(d),
        None => mg.dir.path().join("screenshots"),
    };
    let app = mg.app_password("alice@example.com", "Old laptop", "imap");
    // Used once, so that the list shows a last use (the mark counts from it).
    let mut c = imaps(&mg);
    let r = c.cmd("i", "ID (\"name\" \"Thunderbird\" \"version\" \"153.0\")");
    assert!(r.last().unwrap().starts_with("i OK"), "{r:?}");
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", mg.log());
    assert!(c.cmd("b", "LOGOUT").iter().any(|l| l.starts_with("b OK")));
    drop(c);
    let old_laptop = |mg: &Mailgate| {
        let out = mg.ok(&["devices", "alice@example.com", "--json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        let row = json["signed_in"].as_array().unwrap().iter().find(|d| d["label"] == "Old laptop").cloned();
        row.unwrap_or_else(|| panic!("Old laptop is not listed: {out}"))
    };
    let before = old_laptop(&mg);
    assert!(before["last_used"]["at"].is_u64(), "the IMAP login is not recorded as a use: {before}");
    assert_eq!(before["stale"], false, "{before}");

    // The control, on the real clock: no mark.
    let run = run_driver(&mg, &shots, "fresh", &["--mode", "stale", "--label", "Old laptop", "--fresh"]);
    assert!(run.ok, "the browser run on the real clock failed: {}\nmailgate log:\n{}", run.failure, mg.log());

    // The same data, 91 days later for mailgate only.
    let env = [
        ("LD_PRELOAD", faketime.to_str().unwrap()),
        ("FAKETIME", "+91d"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_DONT_RESET", "1"),
    ];
    mg.restart_with_env(env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let after = old_laptop(&mg);
    assert_eq!(after["last_used"], before["last_used"], "{after}");
    assert_eq!(after["stale"], true, "mailgate's clock did not move 91 days on: {after}");
    let run = run_driver(&mg, &shots, "stale", &["--mode", "stale", "--label", "Old laptop"]);
    assert!(run.ok, "the browser run 91 days on failed: {}\nmailgate log:\n{}", run.failure, mg.log());
    assert_shots(&shots, &["devices-stale"]);
    let row = run.json["stale_row"].as_str().unwrap();
    assert!(row.contains("Not used for over 90 days: revoke it if the device is gone."), "{row}");
}

/// Debian's libfaketime (package faketime), for whatever architecture this is.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
}

/// Each of `names` was shot at both widths.
fn assert_shots(dir: &Path, names: &[&str]) {
    for name in names {
        for width in [390, 1280] {
            let file = format!("{name}-{width}.png");
            let png = std::fs::read(dir.join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000, "{file}: {} bytes", png.len());
            // The IHDR width: the shot is as wide as asked.
            let w = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
            assert_eq!(w, width, "{file}");
        }
    }
}
