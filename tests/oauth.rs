//! Issue 16: mailgate as the OAuth 2.0 server of mail apps, end to end through the
//! binary: the real Thunderbird signs in through a stand-in browser (password and TOTP
//! code on the web step, consent), reads, sends, refreshes its token after a restart and
//! fails cleanly when the sign-in is denied; the grant is then a device in the list, and
//! revoking a grant ends its live IMAP session.

use crate::support::client::{Client, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::submission::{Submission, SubmissionOptions};
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const USER: &str = "alice@example.com";
const PASSWORD: &str = "alice-account-password-1";
const TOTP_SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

fn browser() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oauth_browser.py")
}

/// mailgate with OAuth on, its issuer and add-on host 127.0.0.1 (Thunderbird matches a
/// provider by a host name with a dot), in front of Dovecot IMAP and submission.
fn start() -> (Dovecot, Submission, Mailgate) {
    let dovecot = Dovecot::start(DovecotOptions::default());
    let sub = Submission::start(SubmissionOptions::default());
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        public_url: "https://{web}".into(),
        hostname: "127.0.0.1".into(),
        extra_sections: "[oauth]\nenabled = true\n".into(),
        ..Default::default()
    });
    mg.add_user(USER, PASSWORD);
    mg.ok(&["totp", "enable", USER, "--secret", TOTP_SECRET]);
    (dovecot, sub, mg)
}

fn b64(data: &[u8]) -> String {
    crate::support::daemon::base64(data)
}

/// Signs in through the stand-in browser with a redirect to a listener of the test's, and
/// exchanges the code at the token endpoint with curl: the token response (JSON).
fn sign_in(mg: &Mailgate) -> serde_json::Value {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect = format!("http://127.0.0.1:{}/", listener.local_addr().unwrap().port());
    let url = format!(
        "https://{}/oauth/authorize?response_type=code&client_id=thunderbird&redirect_uri={}&state=s1&code_challenge={CHALLENGE}&code_challenge_method=S256&scope=mail&login_hint={}",
        mg.web,
        urlencode(&redirect),
        urlencode(USER)
    );
    let child = Command::new("python3")
        .arg(browser())
        .arg(&url)
        .env("TB_OAUTH_USER", USER)
        .env("TB_OAUTH_PASSWORD", PASSWORD)
        .env("MG_TOTP_SECRET", TOTP_SECRET)
        .env("MG_CA", &mg.ca)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The browser either requests the redirect (the answer) or exits without it (its
    // output says why): never wait for ever.
    listener.set_nonblocking(true).unwrap();
    let mut child = child;
    let started = std::time::Instant::now();
    let mut conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        if child.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the browser did not come back to the app:\n{}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                mg.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    conn.set_nonblocking(false).unwrap();
    let mut req = [0u8; 8192];
    let n = conn.read(&mut req).unwrap();
    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").unwrap();
    drop(conn);
    let out = child.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&req[..n]).lines().next().unwrap_or_default().to_string();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mg.log()
    );
    let query = line.split_whitespace().nth(1).unwrap().split_once('?').map(|q| q.1).unwrap_or_default().to_string();
    let param =
        |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(&format!("{k}="))).map(urldecode).unwrap_or_default();
    assert_eq!(param("state"), "s1", "{line}");
    assert_eq!(param("iss"), format!("https://{}", mg.web), "RFC 9207 iss: {line}");
    let code = param("code");
    assert!(!code.is_empty(), "{line}");
    token(
        mg,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect),
            ("client_id", "thunderbird"),
            ("code_verifier", VERIFIER),
        ],
    )
}

/// A POST to the token endpoint with curl (a real HTTP client): the JSON answer.
fn token(mg: &Mailgate, form: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert"]).arg(&mg.ca).arg(format!("https://{}/oauth/token", mg.web));
    for (k, v) in form {
        cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = cmd.output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn urldecode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn imaps(mg: &Mailgate) -> Client {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(c.line().starts_with("* OK"));
    c
}

fn xoauth2(user: &str, token: &str) -> String {
    b64(format!("user={user}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

/// Point 2 and 3 through the binary with real clients: a token from the browser
/// sign-in (password + TOTP) logs in over IMAP (XOAUTH2 and OAUTHBEARER) and SMTP; the
/// grant is listed as a device; refresh rotates; revoking the grant from the CLI ends
/// the live IMAP session at once and the token stops working.
#[test]
fn a_browser_sign_in_gives_tokens_that_log_in_until_the_device_is_revoked() {
    let (_dovecot, _sub, mg) = start();
    let t = sign_in(&mg);
    let access = t["access_token"].as_str().unwrap_or_else(|| panic!("{t}")).to_string();
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 3600);

    let mut c = imaps(&mg);
    let caps = c.cmd("a", "CAPABILITY").join(" ");
    assert!(caps.contains("AUTH=XOAUTH2") && caps.contains("AUTH=OAUTHBEARER"), "{caps}");
    let r = c.cmd("b", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, &access)));
    assert!(r.last().unwrap().starts_with("b OK"), "{r:?}\n{}", mg.log());
    assert!(c.cmd("c", "SELECT INBOX").last().unwrap().starts_with("c OK"));

    let mut bearer = imaps(&mg);
    let gs2 = b64(format!("n,a={USER},\x01host=127.0.0.1\x01port=993\x01auth=Bearer {access}\x01\x01").as_bytes());
    let r = bearer.cmd("a", &format!("AUTHENTICATE OAUTHBEARER {gs2}"));
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");

    // SMTP with Python's smtplib (a real client; Debian's swaks has no XOAUTH2) and XOAUTH2.
    let script = r#"
import base64, smtplib, ssl, sys
host, port, ca, user, token = sys.argv[1:]
s = smtplib.SMTP_SSL(host, int(port), context=ssl.create_default_context(cafile=ca))
s.ehlo("client.example")
msg = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
code, text = s.docmd("AUTH", "XOAUTH2 " + msg)
print(code, text.decode())
if code != 235:
    sys.exit(1)
s.sendmail(user, ["bob@example.net"], f"From: {user}\r\nTo: bob@example.net\r\nSubject: oauth\r\n\r\nsent with a token\r\n")
s.quit()
"#;
    let out = Command::new("python3")
        .args(["-c", script, "127.0.0.1", &mg.smtps.port().to_string()])
        .arg(&mg.ca)
        .args([USER, &access])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.starts_with("235"), "{said}\n{}", String::from_utf8_lossy(&out.stderr));

    // The grant is a device: listed with its client, in text and JSON.
    let list = mg.ok(&["app-password", "list", USER]);
    assert!(list.contains("signed in through the browser: client thunderbird"), "{list}");
    let json: serde_json::Value = serde_json::from_str(&mg.ok(&["app-password", "list", USER, "--json"])).unwrap();
    let grant = json["app_passwords"].as_array().unwrap().iter().find(|g| g["kind"] == "oauth").unwrap().clone();
    let id = grant["id"].as_str().unwrap().to_string();
    assert_eq!(grant["last_used"]["ip"], "127.0.0.1");

    // Refresh: a new pair; the old refresh token replayed ends the grant (RFC 9700).
    let again =
        token(&mg, &[("grant_type", "refresh_token"), ("refresh_token", &refresh), ("client_id", "thunderbird")]);
    assert!(again["access_token"].is_string() && again["refresh_token"] != t["refresh_token"], "{again}");
    let mut c2 = imaps(&mg);
    let fresh = again["access_token"].as_str().unwrap();
    assert!(c2.cmd("a", &format!("AUTHENTICATE XOAUTH2 {}", xoauth2(USER, fresh))).last().unwrap().starts_with("a OK"));

    // Revoking the device from the CLI ends the live sessions at once.
    let out = mg.ok(&["app-password", "revoke", USER, &id]);
    assert!(!out.is_empty());
    for s in [&mut c, &mut bearer, &mut c2] {
        s.send(b"z NOOP\r\n");
        let mut saw_bye = false;
        while let Some(line) = s.line_within(Duration::from_secs(20)) {
            if line.starts_with("* BYE") {
                saw_bye = true;
            }
        }
        assert!(saw_bye || s.closed_within(Duration::from_secs(5)), "session lives on\n{}", mg.log());
    }
    // The revoked grant's token is refused the XOAUTH2 way: the JSON error as a
    // challenge, the client's empty answer, then NO (Thunderbird's expectation).
    let mut c3 = imaps(&mg);
    c3.send(format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, fresh)).as_bytes());
    let challenge = c3.line();
    assert!(challenge.starts_with("+ "), "{challenge}");
    assert!(String::from_utf8_lossy(&b64_decode(&challenge[2..])).contains("\"status\":\"401\""), "{challenge}");
    c3.send(b"\r\n");
    let no = c3.line();
    assert!(no.starts_with("a NO [AUTHENTICATIONFAILED]"), "{no}");
}

fn b64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap()
}

/// Issue 16's test with the real Thunderbird: the add-on `mailgate thunderbird-addon`
/// builds, a stand-in browser that signs in with the password and a TOTP code, every
/// step of the shared tool's oauth2 mode.
#[test]
fn thunderbird_signs_in_through_the_browser_with_a_second_factor() {
    assert!(crate::support::thunderbird::script().exists(), "thunderbird.py is missing");
    let (_dovecot, sub, mg) = start();
    let xpi = mg.dir().join("mailgate-oauth.xpi");
    mg.ok(&["thunderbird-addon", "--out", xpi.to_str().unwrap()]);
    let (imaps, submission, web) = (mg.imaps.port().to_string(), mg.submission.port().to_string(), mg.web.to_string());
    let browser = browser();
    let out = crate::support::thunderbird::run_env(
        &[
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
            USER,
            "--password",
            PASSWORD,
            "--to",
            "bob@example.net",
            "--auth",
            "oauth2",
            "--oauth-addon",
            xpi.to_str().unwrap(),
            "--oauth-browser",
            browser.to_str().unwrap(),
            "--extra-cert",
            &web,
            "--log",
        ],
        &[("MG_CA", mg.ca.to_str().unwrap()), ("MG_TOTP_SECRET", TOTP_SECRET)],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log());
    for step in ["account", "certificate", "imap-folders", "imap-inbox", "smtp-send", "oauth-refresh", "oauth-denied"] {
        assert!(stdout.contains(&format!("PASS {step}")), "{step}:\n{stdout}");
    }
    let got = sub.sink.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].mail_from, USER);
    // The grant is a device on the list (the denied sign-in made none), on the CLI and on
    // the web page the person sees.
    let list = mg.ok(&["app-password", "list", USER]);
    assert_eq!(list.matches("signed in through the browser").count(), 1, "{list}");
    // The browser's sign-ins used this 30 s step's TOTP code, and a code works once: the
    // person types the next one.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::thread::sleep(Duration::from_secs(30 - now % 30 + 1));
    let web = mg.web(USER, PASSWORD, &["signin", &format!("totp:{TOTP_SECRET}"), "account"]);
    let page = web["account_page"].as_str().unwrap_or_default();
    assert!(page.contains("Signed in through the browser") && page.contains("Thunderbird ("), "{web}");
}
