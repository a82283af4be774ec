//! ManageSieve through mailgate to a real Dovecot (`dovecot-managesieved`, Pigeonhole)
//! started by the test: `sieve-connect` and Python's `sievelib` (Debian
//! `python3-sievelib`) with an app password over STARTTLS — upload (PUTSCRIPT with a
//! literal), list, activate, download byte for byte, delete — and the uploaded script
//! really filing a message that Dovecot's LDA delivers. Also the 2FA refusal, the `sieve`
//! scope, revocation of a live session, and the client's address in Dovecot's log by
//! XCLIENT. Issue 17.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use std::io::Write as _;
use std::process::{Command, Output, Stdio};

/// A script that files mail by subject into a folder it creates: proves Pigeonhole ran
/// what was uploaded through mailgate. Non-ASCII in a comment, CRLF line ends.
const SCRIPT: &str = "require [\"fileinto\", \"mailbox\"];\r\n\
# Grüße: filed by mailgate's test\r\n\
if header :contains \"subject\" \"filter me\" {\r\n  fileinto :create \"Filtered\";\r\n}\r\n";

/// Dovecot with ManageSieve and mailgate in front, ManageSieve upstream with XCLIENT;
/// alice has an app password for IMAP and ManageSieve.
fn with_sieve_dovecot() -> (Dovecot, Mailgate, String) {
    let dovecot = Dovecot::start(DovecotOptions { sieve: true, ..DovecotOptions::default() });
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        master_password: "master-password".into(),
        sieve_upstream: Some(format!("127.0.0.1:{}", dovecot.sieve_port.unwrap())),
        sieve_upstream_extra: "xclient = true\n".into(),
        ..Options::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "filters", "imap,sieve");
    (dovecot, mg, app)
}

/// Runs sieve-connect against mailgate's ManageSieve port with `args`, the password on
/// fd 0, checking the server certificate against the test CA.
fn sieve_connect(mg: &Mailgate, password: &str, args: &[&str]) -> Output {
    let mut child = Command::new("sieve-connect")
        .args(["--server", "localhost", "--port", &mg.sieve.unwrap().port().to_string()])
        .args(["--user", "alice@example.com", "--passwordfd", "0", "--authmech", "PLAIN"])
        .arg("--tlscafile")
        .arg(&mg.ca)
        .args(["--noclearauth"])
        .args(args)
        .current_dir(mg.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// sievelib from the source address `src` (so Dovecot's log shows the client's own
/// address): logs in after STARTTLS and runs `body` (Python, with `c` the client).
fn sievelib(mg: &Mailgate, password: &str, src: &str, body: &str) -> Output {
    let script = format!(
        r#"
import socket, ssl, sys
_connect = socket.create_connection
def _from(address, timeout=None, source_address=None, **kw):
    return _connect(("127.0.0.1", address[1]), timeout, source_address=("{src}", 0))
socket.create_connection = _from
# sievelib wraps with ssl.wrap_socket and checks nothing; check the certificate here.
ctx = ssl.create_default_context(cafile=sys.argv[3])
ssl.wrap_socket = lambda sock, keyfile=None, certfile=None: ctx.wrap_socket(sock, server_hostname="localhost")
from sievelib.managesieve import Client
c = Client("localhost", int(sys.argv[1]))
ok = c.connect("alice@example.com", sys.argv[2], starttls=True, authmech="PLAIN")
print("login", ok)
if ok:
{body}
"#
    );
    let port = mg.sieve.unwrap().port().to_string();
    let ca = mg.ca.display().to_string();
    // Debian's python3 has python3-sievelib; a pyenv python3 earlier in PATH does not.
    Command::new("/usr/bin/python3").arg("-c").arg(script).args([&port, password, &ca]).output().unwrap()
}

#[test]
fn sieve_connect_and_sievelib_manage_scripts_that_pigeonhole_runs() {
    let (dovecot, mg, app) = with_sieve_dovecot();
    let local = mg.dir.path().join("filter.sieve");
    std::fs::write(&local, SCRIPT).unwrap();
    let local = local.display().to_string();

    // sieve-connect: upload, activate, list, download.
    let up = ["--localsieve", &local, "--remotesieve", "mailgate-test", "--upload"];
    let out = sieve_connect(&mg, &app, &up);
    assert!(out.status.success(), "upload:\n{}\nmailgate log:\n{}", text(&out), mg.log());
    let out = sieve_connect(&mg, &app, &["--remotesieve", "mailgate-test", "--activate"]);
    assert!(out.status.success(), "activate:\n{}", text(&out));
    let out = sieve_connect(&mg, &app, &["--list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listed.contains("mailgate-test"), "list:\n{}", text(&out));
    let back = mg.dir.path().join("back.sieve").display().to_string();
    let down = ["--remotesieve", "mailgate-test", "--localsieve", &back, "--download"];
    let out = sieve_connect(&mg, &app, &down);
    assert!(out.status.success(), "download:\n{}", text(&out));
    assert_eq!(std::fs::read(&back).unwrap(), SCRIPT.as_bytes(), "the script came back changed");

    // Pigeonhole runs it: a message with the subject is filed into "Filtered".
    dovecot.deliver_lda(
        "alice@example.com",
        b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: please filter me\r\n\r\nhello\r\n",
    );
    let filtered = dovecot.maildir("alice@example.com").join(".Filtered").join("new");
    let files = std::fs::read_dir(&filtered).map(|d| d.count()).unwrap_or(0);
    assert_eq!(files, 1, "nothing filed in {}\n{}", filtered.display(), dovecot.log());

    // sievelib: the SIEVE extensions are known before login, the script reads back byte
    // for byte, and deactivating + deleting leaves no script.
    let body = r#"
    exts = c.get_sieve_capabilities()
    print("fileinto" in exts, "mailbox" in exts)
    active, others = c.listscripts()
    print("active", active, others)
    print(repr(c.getscript("mailgate-test")))
    print(c.setactive(""), c.deletescript("mailgate-test"))
    print("after", c.listscripts())
    c.logout()
"#;
    let out = sievelib(&mg, &app, "127.0.0.21", body);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let expect = format!(
        "login True\nTrue True\nactive mailgate-test []\n{:?}\nTrue True\nafter (None, [])\n",
        SCRIPT.replace("\r\n", "\n")
    );
    // Python's repr quotes with ' and escapes differently from Rust's {:?}: compare lines.
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 6, "sievelib:\n{}\nmailgate log:\n{}", text(&out), mg.log());
    assert_eq!(lines[..3], expect.lines().take(3).collect::<Vec<_>>()[..], "{}", text(&out));
    assert!(lines[3].contains("Grüße") || lines[3].contains("Gr\\xfc"), "{}", text(&out));
    assert_eq!(lines[4..], ["True True", "after (None, [])"], "{}", text(&out));
    // The client's own address reached Dovecot's ManageSieve login by XCLIENT.
    let line = "managesieve-login: Info: Login: user=<alice@example.com>, method=PLAIN, rip=127.0.0.21";
    assert!(dovecot.wait_for_log(line, PROMPTLY), "{line}\n{}", dovecot.log());
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["app_passwords"][0]["last_used_by"]["sieve"]["protocol"], "sieve", "{list}");
}

#[test]
fn the_account_password_of_2fa_and_an_app_password_without_sieve_are_refused() {
    let (dovecot, mg, _app) = with_sieve_dovecot();
    let imap_only = mg.app_password("alice@example.com", "laptop", "imap");
    let out = sievelib(&mg, &imap_only, "127.0.0.22", "    pass");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "login False\n", "{}", text(&out));
    // Without 2FA the account password works; with it, the refusal names the URL in the
    // words sieve-connect shows the person.
    let out = sieve_connect(&mg, "alice-account-pw", &["--list"]);
    assert!(out.status.success(), "{}\n{}", text(&out), mg.log());
    mg.ok(&["totp", "enable", "alice@example.com"]);
    let out = sieve_connect(&mg, "alice-account-pw", &["--list"]);
    let said = text(&out);
    assert!(!out.status.success() && said.contains("https://mail.example.test/app-passwords"), "{said}");
    // The one ManageSieve login Dovecot saw is the account password's before 2FA.
    assert!(dovecot.wait_for_log("managesieve-login: Info: Login: ", PROMPTLY), "{}", dovecot.log());
    assert_eq!(dovecot.log().matches("managesieve-login: Info: Login: ").count(), 1, "{}", dovecot.log());
}

/// Start-up names the ManageSieve listener and upstream; revoking the app password ends a
/// live session with `BYE "Access revoked."` and the close.
#[test]
fn startup_lists_sieve_and_revocation_ends_a_live_sieve_session() {
    let (_dovecot, mg, app) = with_sieve_dovecot();
    let log = mg.log();
    for line in [
        format!("mailgate: ManageSieve (STARTTLS) on {}", mg.sieve.unwrap()),
        "mailgate: upstream ManageSieve 127.0.0.1:".to_string(),
    ] {
        assert!(log.contains(&line), "{line}\n{log}");
    }
    let mut c = Client::plain(mg.sieve.unwrap());
    let mut greeting = Vec::new();
    while !greeting.last().is_some_and(|l: &String| l.starts_with("OK")) {
        greeting.push(c.line());
    }
    assert!(greeting.contains(&"\"STARTTLS\"".to_string()), "{greeting:?}");
    c.send(b"STARTTLS\r\n");
    assert!(c.line().starts_with("OK"));
    assert!(c.starttls(tls_config(&mg.ca, &["managesieve"])).is_empty());
    while !c.line().starts_with("OK") {}
    let plain = base64(format!("\0alice@example.com\0{app}").as_bytes());
    c.send(format!("AUTHENTICATE \"PLAIN\" \"{plain}\"\r\n").as_bytes());
    assert_eq!(c.line(), "OK \"Logged in.\"", "{}", mg.log());
    c.send(b"LISTSCRIPTS\r\n");
    assert!(c.line().starts_with("OK"));
    let id = app.replace(' ', "")[..6].to_string();
    let started = std::time::Instant::now();
    let out = mg.ok(&["app-password", "revoke", "alice@example.com", &id]);
    assert!(out.contains("1 live sessions ended"), "{out}");
    assert_eq!(c.line_within(PROMPTLY).as_deref(), Some("BYE \"Access revoked.\""));
    assert!(c.closed_within(PROMPTLY));
    eprintln!("revocation ended the ManageSieve session after {:?}", started.elapsed());
}

fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}
