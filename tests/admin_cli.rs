//! The admin CLI, as an admin uses it: while `serve` runs (through the admin socket) and
//! without a server (on the store directly). Issue 2 points 3, 4 and 5.

use crate::support::mailgate::{Mailgate, Options, cli_in};
use std::os::unix::fs::PermissionsExt;

#[test]
fn commands_work_while_serving_and_errors_are_named() {
    let mg = Mailgate::start(Options::default());
    let socket = mg.dir.path().join("data/admin.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(mg.dir.path().join("data")).unwrap().permissions().mode() & 0o777, 0o700);
    mg.add_user("Alice@Example.com", "alice-account-pw");
    let out = mg.cli_stdin(&["user", "add", "alice@example.com", "--password-stdin"], "another-account-password\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = mg.cli(&["app-password", "create", "nobody@example.com", "--label", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown user nobody@example.com"));
    let pw = mg.app_password("alice@example.com", "Phone", "imap");
    assert_eq!(pw.len(), 39, "{pw}");
    assert!(pw.split(' ').all(|g| g.len() == 4 && g.bytes().all(|b| b"abcdefghjkmnpqrstuvwxyz23456789".contains(&b))));
    let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", "phone"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an app password labelled"));
    let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", "x", "--scope", "ftp"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown scope"));
    let out = mg.cli(&["app-password", "revoke", "alice@example.com", "zzzzzz"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no app password with id zzzzzz"));
    let json = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let v = &v["app_passwords"];
    assert_eq!(v[0]["label"], "Phone");
    assert_eq!(v[0]["scopes"], serde_json::json!(["imap"]));
    assert!(v[0]["last_used"].is_null());
    assert!(!json.contains(&pw.replace(' ', "")) && !json.contains("argon2"), "list leaks the secret or hash");
    let users = mg.ok(&["user", "list"]);
    assert!(users.contains("alice@example.com") && users.contains("app-passwords=1"), "{users}");
    // The password never reaches the server's log.
    assert!(!mg.log().contains(&pw) && !mg.log().contains(&pw.replace(' ', "")));
    assert!(!mg.log().contains("alice-account-pw"));
    let out = mg.cli(&["totp", "enable", "alice@example.com", "--secret", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .contains("secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    );
    assert!(mg.ok(&["user", "list"]).contains("2fa=on"));
    // Issue 14: enabling makes backup codes, as the web's enrolment does; new ones on demand.
    let is_code = |l: &&str| l.len() == 19 && l.split(' ').all(|g| g.len() == 4);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(is_code).count(), 10);
    let codes = mg.ok(&["totp", "backup-codes", "alice@example.com"]);
    assert!(codes.starts_with("new backup codes for alice@example.com"), "{codes}");
    assert_eq!(codes.lines().filter(is_code).count(), 10, "{codes}");
    mg.ok(&["totp", "disable", "alice@example.com"]);
    assert!(mg.ok(&["user", "list"]).contains("2fa=off"));
    let out = mg.cli(&["totp", "backup-codes", "alice@example.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("two-factor authentication is off for alice@example.com"));
    let out = mg.ok(&["user", "unlock", "alice@example.com"]);
    assert!(out.contains("unlocked alice@example.com: its password and code guess budgets are full again"), "{out}");
    assert!(!mg.cli(&["user", "unlock", "nobody@example.com"]).status.success());
}

/// Issue 13 item 12: `--label $'\u202egnp.exe'` ("exe.png" on screen) and labels with other
/// invisible or control characters are refused with a message naming the character, and
/// nothing is created: through a running server and on the store directly.
#[test]
fn labels_with_bidi_invisible_or_control_characters_are_refused() {
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    for serving in [true, false] {
        if !serving {
            mg.stop();
        }
        for (label, why) in [
            ("\u{202e}gnp.exe", "the label contains U+202E, a bidirectional text control"),
            ("Lap\u{200b}top", "the label contains U+200B, an invisible formatting character"),
            ("Lap\u{1b}[8mtop", "the label contains U+001B, a control character"),
        ] {
            let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", label]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "serving={serving} {label:?} was accepted: {stderr}");
            assert!(stderr.contains(why), "serving={serving} {label:?}: {stderr}");
            assert!(!stderr.contains('\u{202e}'), "the message reorders itself: {stderr:?}");
            assert!(!String::from_utf8_lossy(&out.stdout).contains("created app password"));
        }
        let list = mg.ok(&["app-password", "list", "alice@example.com"]);
        assert!(list.contains("has no app passwords"), "serving={serving}: {list}");
    }
}

#[test]
fn commands_work_without_a_server_and_survive_a_restart() {
    let mut mg = Mailgate::start(Options::default());
    mg.stop();
    mg.add_user("bob@example.com", "bob-account-password");
    let pw = mg.app_password("bob@example.com", "Laptop", "imap,smtp");
    assert_eq!(pw.len(), 39);
    mg.restart();
    let list = mg.ok(&["app-password", "list", "bob@example.com"]);
    assert!(list.contains("Laptop") && list.contains("imap,smtp"), "{list}");
    let id = pw.replace(' ', "")[..6].to_string();
    mg.ok(&["app-password", "revoke", "bob@example.com", &id]);
    mg.stop();
    assert!(mg.ok(&["app-password", "list", "bob@example.com"]).contains("has no app passwords"));
    mg.ok(&["user", "remove", "bob@example.com"]);
    let out = cli_in(mg.dir.path(), &mg.config, &["user", "remove", "bob@example.com"], "");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown user"));
}

/// The harness itself: a port taken while the server was stopped (by another test of a
/// parallel run) moves the listeners to new ports instead of failing the test.
#[test]
fn a_restart_whose_port_was_taken_moves_to_new_ports() {
    let mut mg = Mailgate::start(Options::default());
    mg.stop();
    let (old_web, old_imaps) = (mg.web, mg.imaps);
    let squatter = std::net::TcpListener::bind(old_web).unwrap();
    mg.restart();
    assert_ne!(mg.web, old_web);
    assert_ne!(mg.imaps, old_imaps);
    assert!(std::net::TcpStream::connect(mg.web).is_ok());
    drop(squatter);
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let mg = Mailgate::start(Options::default());
    // Move the first one's socket away so the CLI cannot reach it; the store lock still holds.
    let out = std::process::Command::new(crate::support::mailgate::bin())
        .current_dir(mg.dir.path())
        .args(["--config", mg.config.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another mailgate process") || err.contains("lock"), "{err}");
}

#[test]
fn embedded_defaults_serve_with_no_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    // In a network namespace of its own (loopback only), so that the fixed default ports
    // cannot clash with anything else running on this machine.
    let mut child = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" serve"])
        .arg(crate::support::mailgate::bin())
        .current_dir(dir.path())
        .env_remove("MAILGATE_CONFIG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("mailgate serving") {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with {status}:\n{text}");
        }
        assert!(std::time::Instant::now() < deadline, "not serving after 20 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(dir.path().join("certs/cert.pem").exists() && dir.path().join("data/secret.key").exists());
    assert!(
        text.contains("embedded defaults") && text.contains("127.0.0.1:9993") && text.contains("127.0.0.1:9143"),
        "{text}"
    );
    // Issue 15 point 3: the summary in plain words; no colour codes into a file; no
    // open-file warning for the default max_connections.
    assert!(
        text.contains("mailgate: upstream IMAP 127.0.0.1:143, plain, master user \"mailgate\" (SASL PLAIN)\n"),
        "{text}"
    );
    assert!(text.contains("mailgate: upstream SMTP 127.0.0.1:587, plain, master user \"mailgate\" (SASL PLAIN)\n"));
    assert!(!text.contains("MasterSasl") && !text.contains("tls None"), "{text}");
    assert!(!text.contains('\x1b'), "ANSI escape codes in a log file: {text:?}");
    assert!(!text.lines().any(|l| l.contains("WARN") && l.contains("open-file")), "{text}");
    let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM should end serve cleanly: {status}");
}

#[test]
fn init_never_replaces_half_a_certificate_pair() {
    let mg = Mailgate::start(Options::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::copy(mg.dir.path().join("certs/mailgate-cert.pem"), dir.path().join("certs/cert.pem")).unwrap();
    let cfg = dir.path().join("mailgate.toml");
    std::fs::write(&cfg, "[imap]\nlisten_tls = []\nlisten_starttls = []\n").unwrap();
    let before = std::fs::read(dir.path().join("certs/cert.pem")).unwrap();
    let out = cli_in(dir.path(), &cfg, &["init"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key.pem: missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("certs/cert.pem")).unwrap(), before);
}

#[test]
fn a_lost_totp_key_is_reported_not_replaced() {
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    mg.ok(&["totp", "enable", "alice@example.com"]);
    mg.stop();
    std::fs::remove_file(mg.dir.path().join("data/secret.key")).unwrap();
    let out = mg.cli(&["user", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret.key is missing") && err.contains("1 accounts have TOTP secrets"), "{err}");
    assert!(!mg.dir.path().join("data/secret.key").exists());
}

#[test]
fn store_export_and_import_round_trip() {
    // SECURITY.md cases 100 and 101: owner-only file, secrets still sealed, all valid after.
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "Phone", "imap");
    let out = mg.ok(&["totp", "enable", "alice@example.com", "--secret", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]);
    assert!(out.contains("otpauth://"));
    let file = mg.dir.path().join("export.json");
    let out = mg.ok(&["store", "export", file.to_str().unwrap()]);
    assert!(out.contains("1 accounts, 1 app passwords"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("JBSWY3DPEHPK3PXP"), "the TOTP secret is in the clear");
    assert!(!text.contains(&app.replace(' ', "")), "an app password is in the clear");
    // Into a new data directory, with the old secret.key copied beside it.
    mg.stop();
    let data = mg.dir.path().join("data");
    std::fs::rename(&data, mg.dir.path().join("data-old")).unwrap();
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(mg.dir.path().join("data-old/secret.key"), data.join("secret.key")).unwrap();
    let out = mg.ok(&["store", "import", file.to_str().unwrap()]);
    assert!(out.contains("imported 1 accounts, 1 app passwords"), "{out}");
    let out = mg.cli(&["store", "import", file.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not empty"));
    let users = mg.ok(&["user", "list"]);
    assert!(
        users.contains("alice@example.com") && users.contains("2fa=on") && users.contains("app-passwords=1"),
        "{users}"
    );
    // The imported account keeps its TOTP state (commands run: the key is there).
    let out = mg.ok(&["totp", "enable", "alice@example.com"]);
    assert!(out.contains("re-enrolled"), "{out}");
    // And the imported app password logs in (no upstream here: the refusal is only
    // the upstream being down, after the password was accepted).
    mg.restart();
    let mut c =
        crate::support::client::Client::tls(mg.imaps, crate::support::client::tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{r:?}");
    assert!(mg.log().contains("upstream login failed"), "the app password was not accepted");
}

/// A scratch directory with a config file (no listeners) for commands without a server.
fn scratch() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mailgate.toml");
    std::fs::write(&cfg, "[imap]\nlisten_tls = []\nlisten_starttls = []\n").unwrap();
    (dir, cfg)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn init_says_what_it_made_and_what_it_kept() {
    // Issue 15 point 3: one line each for the data directory, the secret key, the
    // certificate and the upstream master password file.
    let (dir, cfg) = scratch();
    let out = cli_in(dir.path(), &cfg, &["init"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let made = text(&out.stdout);
    let lines: Vec<&str> = made.lines().collect();
    assert_eq!(lines.len(), 4, "{made}");
    assert!(lines[0].starts_with("made data directory: data (mode 0700"), "{made}");
    assert!(lines[1].starts_with("made secret key: data/secret.key"), "{made}");
    assert!(
        lines[2].starts_with(
            "made certificate: certs/cert.pem / certs/key.pem (self-signed, for localhost, 127.0.0.1, ::1"
        ),
        "{made}"
    );
    assert!(lines[3].starts_with("made upstream master password: config/upstream-master.secret"), "{made}");
    let key = std::fs::read(dir.path().join("data/secret.key")).unwrap();
    let out = cli_in(dir.path(), &cfg, &["init"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kept = text(&out.stdout);
    let lines: Vec<&str> = kept.lines().collect();
    assert_eq!(
        lines,
        [
            "kept data directory: data (mode 0700; store, admin socket)",
            "kept secret key: data/secret.key (mode 0600; back it up)",
            "kept certificate: certs/cert.pem / certs/key.pem",
            "kept upstream master password: config/upstream-master.secret",
        ],
        "{kept}"
    );
    assert_eq!(std::fs::read(dir.path().join("data/secret.key")).unwrap(), key, "the key was replaced");
}

#[test]
fn account_passwords_follow_the_one_policy() {
    // Issue 15 point 3: the CLI refuses what the web page refuses (15 characters, no
    // common passwords), and a refused password changes nothing. --password-stdin reads
    // one line without a prompt.
    let (dir, cfg) = scratch();
    let cli = |args: &[&str], stdin: &str| cli_in(dir.path(), &cfg, args, stdin);
    for (pw, why) in [
        ("fourteen-chars", "at least 15 characters"),
        ("passwordpassword", "too easy to guess"),
        ("Password1234567!", "too easy to guess"),
        ("123456789012345", "too easy to guess"),
    ] {
        let out = cli(&["user", "add", "alice@example.com", "--password-stdin"], &format!("{pw}\n"));
        assert!(!out.status.success(), "{pw} accepted");
        assert!(text(&out.stderr).contains(why), "{pw}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty() && !text(&out.stderr).contains("password:"), "a prompt for --password-stdin");
    }
    let out = cli(&["user", "list"], "");
    assert!(!text(&out.stdout).contains("alice@example.com"), "a refused password still made the account");
    let out = cli(&["user", "add", "alice@example.com", "--password-stdin"], "alice-account-pw\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["user", "passwd", "alice@example.com", "--password-stdin"], "short\n");
    assert!(!out.status.success() && text(&out.stderr).contains("at least 15 characters"));
    // Without a terminal and without --password-stdin, the first line of standard input
    // still serves (as before), under the same policy.
    let out = cli(&["user", "passwd", "alice@example.com"], "qwertyuiopasdfgh\n");
    assert!(!out.status.success() && text(&out.stderr).contains("too easy to guess"), "{}", text(&out.stderr));
    let out = cli(&["user", "passwd", "alice@example.com"], "another-account-password\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["user", "add", "bob@example.com", "--password", "--password-stdin"], "bob-account-password\n");
    assert!(!out.status.success(), "--password and --password-stdin together");
}

/// `mailgate ARGS` on a pseudo-terminal (util-linux `script`), driven like a person at
/// the keyboard.
struct Terminal {
    child: std::process::Child,
    keys: std::process::ChildStdin,
    screen: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

/// Generous: these waits end as soon as the terminal shows what they wait for.
const TERMINAL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Terminal {
    fn run(dir: &std::path::Path, cfg: &std::path::Path, args: &[&str]) -> Terminal {
        use std::process::{Command, Stdio};
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut cmd =
            format!("exec {} --config {}", quote(crate::support::mailgate::bin()), quote(cfg.to_str().unwrap()));
        for a in args {
            cmd.push(' ');
            cmd.push_str(&quote(a));
        }
        let mut child = Command::new("script")
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .current_dir(dir)
            .env("SHELL", "/bin/sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("util-linux script (scripts/install-test-deps.sh installs it)");
        let keys = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, screen) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Terminal { child, keys, screen, seen: Vec::new() }
    }

    /// Waits until the screen shows `what` (after what was waited for before).
    fn wait_for(&mut self, what: &str) {
        let deadline = std::time::Instant::now() + TERMINAL_WAIT;
        loop {
            if let Some(at) = text(&self.seen).find(what) {
                self.seen.drain(..at + what.len());
                return;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.screen.recv_timeout(left) {
                Ok(bytes) => self.seen.extend(bytes),
                Err(_) => panic!("the terminal never showed {what:?}; it shows {:?}", text(&self.seen)),
            }
        }
    }

    /// The pseudo-terminal mailgate reads (its standard input).
    fn tty(&self) -> std::path::PathBuf {
        let deadline = std::time::Instant::now() + TERMINAL_WAIT;
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id())).unwrap_or_default();
            for pid in children.split_whitespace() {
                if std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() == "mailgate"
                    && let Ok(tty) = std::fs::read_link(format!("/proc/{pid}/fd/0"))
                {
                    return tty;
                }
            }
            assert!(std::time::Instant::now() < deadline, "mailgate did not start on the terminal");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits until the terminal no longer echoes what is typed (`stty -a` shows `-echo`).
    fn wait_for_no_echo(&self) {
        let tty = self.tty();
        let deadline = std::time::Instant::now() + TERMINAL_WAIT;
        loop {
            let out = std::process::Command::new("stty").arg("-a").arg("-F").arg(&tty).output().unwrap();
            if text(&out.stdout).split_whitespace().any(|w| w == "-echo") {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "echo never turned off: {}", text(&out.stdout));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.keys.write_all(format!("{line}\r").as_bytes()).unwrap();
        self.keys.flush().unwrap();
    }

    /// Exit status and everything shown after the last wait.
    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        while let Ok(bytes) = self.screen.recv_timeout(std::time::Duration::from_secs(5)) {
            self.seen.extend(bytes);
        }
        (status, text(&self.seen))
    }
}

#[test]
fn passwords_on_a_terminal_are_asked_twice_and_not_shown() {
    // Issue 15 point 3: `user add --password` and `user passwd` on a terminal ask twice
    // with echo off; a mismatch is a clear error and changes nothing.
    let (dir, cfg) = scratch();
    let pw = "typed-on-a-terminal-1";
    let mut t = Terminal::run(dir.path(), &cfg, &["user", "add", "alice@example.com", "--password"]);
    t.wait_for("New password: ");
    t.wait_for_no_echo();
    t.type_line(pw);
    t.wait_for("The same password again: ");
    t.wait_for_no_echo();
    t.type_line(pw);
    let (status, shown) = t.finish();
    assert!(status.success(), "{shown}");
    assert!(shown.contains("alice@example.com"), "{shown}");
    assert!(!shown.contains(pw), "the password was shown: {shown:?}");
    let users = text(&cli_in(dir.path(), &cfg, &["user", "list"], "").stdout);
    assert!(users.contains("alice@example.com") && users.contains("password=set"), "{users}");
    let accounts = || {
        let file = dir.path().join("export.json");
        let out = cli_in(dir.path(), &cfg, &["store", "export", file.to_str().unwrap()], "");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        v["accounts"].clone()
    };
    let before = accounts();

    // A mismatch: refused, the old password stays.
    let mut t = Terminal::run(dir.path(), &cfg, &["user", "passwd", "alice@example.com"]);
    t.wait_for("New password: ");
    t.wait_for_no_echo();
    t.type_line("a-new-password-here");
    t.wait_for("The same password again: ");
    t.wait_for_no_echo();
    t.type_line("a-new-password-hare");
    let (status, shown) = t.finish();
    assert!(!status.success(), "{shown}");
    assert!(shown.contains("the two passwords are not the same; nothing was changed"), "{shown}");
    assert!(!shown.contains("a-new-password-h"), "the password was shown: {shown:?}");
    // A password the policy refuses is refused at once, before the second question.
    let mut t = Terminal::run(dir.path(), &cfg, &["user", "passwd", "alice@example.com"]);
    t.wait_for("New password: ");
    t.wait_for_no_echo();
    t.type_line("too-short");
    let (status, shown) = t.finish();
    assert!(!status.success() && shown.contains("at least 15 characters"), "{shown}");
    assert!(!shown.contains("again"), "{shown}");
    assert_eq!(accounts(), before, "a refused password changed the account");
}

/// `mailgate thunderbird-addon --out FILE` writes the add-on the web step offers: a zip
/// whose stored manifest.json registers the server as Thunderbird's OAuth provider.
#[test]
fn thunderbird_addon_writes_the_xpi() {
    let mg = Mailgate::start(Options { extra_sections: "[oauth]\nenabled = true\n".into(), ..Options::default() });
    let out = mg.dir.path().join("addon.xpi");
    let said = mg.ok(&["thunderbird-addon", "--out", out.to_str().unwrap()]);
    assert!(said.contains("oauth@mail.example.test"), "{said}");
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.starts_with(b"PK\x03\x04"), "a zip");
    let text = String::from_utf8_lossy(&bytes);
    for part in [
        "manifest.json",
        "\"clientId\": \"thunderbird\"",
        "\"tokenEndpoint\": \"https://mail.example.test/oauth/token\"",
        "\"issuerIdentifier\": \"https://mail.example.test\"",
    ] {
        assert!(text.contains(part), "{part} not in the add-on");
    }
    let out = mg.cli(&["thunderbird-addon", "--out", "/nonexistent/dir/addon.xpi"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot write"));
}
