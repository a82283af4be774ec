//! Issue 19 point 5: the login lines an admin reads, and the fail2ban filter and jail
//! shipped in fail2ban/, run with the real fail2ban (Debian package `fail2ban`) on the
//! real mailgate's log.
//!
//! From three loopback addresses (Linux routes all of 127/8 to lo): good logins from
//! 127.0.0.30, wrong passwords on IMAP and SMTP from 127.0.0.31 (one with a user name that
//! tries to put another address into the line), and the right account password of a 2FA
//! account from 127.0.0.32 — a mail app that needs an app password, not a guess. Then
//! `fail2ban-regex` must count exactly the wrong ones, and a private `fail2ban-server`
//! (its own directory, socket, pid and database files; a ban action that only writes the
//! address to a file, no firewall) must ban 127.0.0.31 and not 127.0.0.32.

use crate::imap_front::{connect_from, imaps_from, with_dovecot_opts};
use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::daemon::poll;
use crate::support::mailgate::{Mailgate, Options};
use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const GOOD: &str = "127.0.0.30";
const GUESSER: &str = "127.0.0.31";
const TWO_FACTOR: &str = "127.0.0.32";
/// Wrong passwords from [`GUESSER`] over IMAP (one more comes over SMTP).
const IMAP_GUESSES: usize = 6;
/// Account-password logins of the 2FA account from [`TWO_FACTOR`]: more than the jail's
/// `maxretry`, so counting them would ban.
const TWO_FACTOR_LOGINS: usize = 4;
/// The test jail's `maxretry`.
const MAX_RETRY: usize = 3;

fn filter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fail2ban/filter.d/mailgate.conf")
}

fn jail() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fail2ban/jail.d/mailgate.conf")
}

/// The mailgate traffic; returns the app password's public id.
fn logins(mg: &Mailgate, app: &str) -> String {
    mg.add_user("bob@example.com", "bob-account-password");
    mg.ok(&["totp", "enable", "bob@example.com"]);
    // Good logins, one with the client's ID.
    for n in 0..3 {
        let mut c = imaps_from(mg, GOOD);
        if n == 0 {
            let r = c.cmd("i", r#"ID ("name" "Thunderbird" "version" "128.3")"#);
            assert!(r.last().unwrap().starts_with("i OK"), "{r:?}");
        }
        let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
        assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", mg.log());
    }
    // The 2FA account's right account password: refused with the words about app passwords.
    for _ in 0..TWO_FACTOR_LOGINS {
        let mut c = imaps_from(mg, TWO_FACTOR);
        let r = c.cmd("a", "LOGIN bob@example.com bob-account-password");
        assert!(r.last().unwrap().starts_with("a NO [ALERT]"), "{r:?}");
    }
    // Guesses: wrong passwords over IMAP (the last with a user name made to look like
    // another client's field), and one over SMTP.
    for n in 0..IMAP_GUESSES {
        let mut c = imaps_from(mg, GUESSER);
        let user = if n + 1 == IMAP_GUESSES { "\"x client=127.0.0.99 result=wrong\"" } else { "alice@example.com" };
        let r = c.cmd("a", &format!("LOGIN {user} wrong-guess-{n}"));
        assert!(r.last().unwrap().starts_with("a NO [AUTHENTICATIONFAILED]"), "{r:?}");
    }
    let mut s = Client::tls_over(connect_from(GUESSER, mg.smtps), tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(s.line().starts_with("220 "));
    s.send(b"EHLO guesser.example\r\n");
    s.until("250 ");
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0alice@example.com\0smtp-guess");
    s.send(format!("AUTH PLAIN {plain}\r\n").as_bytes());
    let r = s.line();
    assert!(r.starts_with("535 "), "{r}");
    app.chars().filter(|c| !c.is_whitespace()).take(6).collect()
}

/// `fail2ban-regex` on the log: `(lines, matched, failregex total, matched lines)`.
fn fail2ban_regex(log: &Path) -> (usize, usize, usize, Vec<String>) {
    let out = Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(log)
        .arg(filter())
        .output()
        .expect("fail2ban-regex (Debian package fail2ban: scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fail2ban-regex failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let number_before = |line: &str, word: &str| -> usize {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| w.trim_end_matches(',') == word).unwrap();
        words[at - 1].parse().unwrap()
    };
    // "Lines: 57 lines, 0 ignored, 7 matched, 50 missed"
    let lines_line = text.lines().find(|l| l.starts_with("Lines: ")).unwrap_or_else(|| panic!("{text}"));
    // "Failregex: 7 total"
    let fail_line = text.lines().find(|l| l.starts_with("Failregex: ")).unwrap_or_else(|| panic!("{text}"));
    let matched: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("|- Matched line(s):"))
        .skip(1)
        .take_while(|l| l.starts_with("|  "))
        .map(str::to_string)
        .collect();
    (
        number_before(lines_line, "lines"),
        number_before(lines_line, "matched"),
        number_before(fail_line, "total"),
        matched,
    )
}

#[test]
fn the_log_has_one_line_per_login_and_fail2ban_bans_guesses_not_2fa_refusals() {
    let (_dovecot, mg, app) = with_dovecot_opts(Options {
        limits: "auth_failure_delay_ms = 100\nip_penalty_max_ms = 200\n".into(),
        ..Options::default()
    });
    let id = logins(&mg, &app);
    let guesses = IMAP_GUESSES + 1;
    mg.wait_log(&format!("login result=wrong protocol=smtp client={GUESSER} "), 1, PROMPTLY);
    let log = mg.log();

    // The lines themselves.
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    let ok = format!(
        "INFO mailgate::login: login result=ok protocol=imap client={GOOD} user=alice@example.com method=app-password app_password={id} "
    );
    assert_eq!(count(&ok), 3, "{ok}\n{log}");
    assert_eq!(count(&format!("{ok}client_id=\"Thunderbird 128.3\" duration_ms=")), 1, "{log}");
    assert_eq!(
        count(&format!(
            "INFO mailgate::login: login result=needs_app_password protocol=imap client={TWO_FACTOR} user=bob@example.com method=account-password duration_ms="
        )),
        TWO_FACTOR_LOGINS,
        "{log}"
    );
    assert_eq!(
        count(&format!("login result=wrong protocol=imap client={GUESSER} user=alice@example.com ")),
        IMAP_GUESSES - 1
    );
    assert_eq!(
        count(&format!(
            "login result=wrong protocol=imap client={GUESSER} user=\"x client=127.0.0.99 result=wrong\" method=account-password "
        )),
        1,
        "the hostile user name is one quoted value\n{log}"
    );
    assert_eq!(count("login result=wrong protocol=smtp client=127.0.0.31 user=alice@example.com "), 1);
    assert_eq!(count("INFO mailgate::login: login "), 3 + TWO_FACTOR_LOGINS + guesses, "one line per attempt\n{log}");
    // No secret in the log: not the app password's secret part, not a guess.
    let compact: String = app.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(!log.contains(&compact[6..]) && !log.contains("wrong-guess-") && !log.contains("bob-account-password"));

    // (a) fail2ban-regex counts exactly the guesses, all from the guesser.
    let (lines, matched, total, matched_lines) = fail2ban_regex(&mg.dir.path().join("mailgate.log"));
    // (The server may have logged more since, e.g. sessions ending: never a login.)
    assert!(lines >= log.lines().count(), "fail2ban-regex read {lines} lines of {}", log.lines().count());
    assert_eq!((matched, total), (guesses, guesses), "{matched_lines:#?}");
    assert_eq!(matched_lines.len(), guesses, "{matched_lines:#?}");
    for l in &matched_lines {
        assert!(l.contains(" login result=wrong protocol=") && l.contains(&format!(" client={GUESSER} ")), "{l}");
    }

    // (b) The shipped jail, run for real.
    let f2b = Fail2ban::start(&mg.dir.path().join("mailgate.log"));
    assert!(
        poll(PROMPTLY, || f2b.banned().contains(&GUESSER.to_string())),
        "{GUESSER} was not banned\n{}",
        f2b.diagnostics()
    );
    // fail2ban reads the log in order and the guesses came last, so by now it has read
    // the 2FA refusals too: they counted for nothing.
    let status = f2b.status();
    assert!(status.contains(&format!("Total failed:\t{guesses}")), "{status}");
    assert!(status.contains("Currently banned:\t1"), "{status}");
    assert_eq!(f2b.banned(), vec![GUESSER.to_string()], "{}", f2b.diagnostics());
}

/// A private fail2ban-server in the foreground, stopped by PID on drop.
struct Fail2ban {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Fail2ban {
    /// The shipped filter and jail, in a configuration directory of their own; the jail
    /// enabled on `log` by a `.local` file, as an admin would.
    fn start(log: &Path) -> Fail2ban {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let conf = d.join("conf");
        for sub in ["filter.d", "jail.d", "action.d"] {
            std::fs::create_dir_all(conf.join(sub)).unwrap();
        }
        std::fs::copy(filter(), conf.join("filter.d/mailgate.conf")).unwrap();
        std::fs::copy(jail(), conf.join("jail.d/mailgate.conf")).unwrap();
        std::fs::write(
            conf.join("fail2ban.conf"),
            format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {log}\nsocket = {sock}\npidfile = {pid}\n\
                 dbfile = {db}\ndbpurgeage = 1d\n",
                log = d.join("fail2ban.log").display(),
                sock = d.join("fail2ban.sock").display(),
                pid = d.join("fail2ban.pid").display(),
                db = d.join("fail2ban.sqlite3").display(),
            ),
        )
        .unwrap();
        // fail2ban's own defaults would ignore this host's addresses.
        std::fs::write(conf.join("jail.conf"), "[DEFAULT]\nignoreself = false\nignoreip =\nusedns = no\n").unwrap();
        // The ban action: the address into a file. No firewall is touched.
        std::fs::write(
            conf.join("action.d/test-banfile.conf"),
            "[Definition]\nactionstart =\nactionstop =\nactioncheck =\n\
             actionban = printf '%%s\\n' '<ip>' >> <banfile>\nactionunban =\n[Init]\nbanfile =\n",
        )
        .unwrap();
        std::fs::write(
            conf.join("jail.d/mailgate.local"),
            format!(
                "[mailgate]\nenabled = true\nlogpath = {log}\nmaxretry = {MAX_RETRY}\nfindtime = 1h\nbantime = 1h\n\
                 action = test-banfile[banfile=\"{banned}\"]\n",
                log = log.display(),
                banned = d.join("banned").display(),
            ),
        )
        .unwrap();
        let out = std::fs::File::create(d.join("fail2ban-server.out")).unwrap();
        let child = Command::new("fail2ban-server")
            .arg("-f")
            .arg("-x")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(d.join("fail2ban.sock"))
            .arg("-p")
            .arg(d.join("fail2ban.pid"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("fail2ban-server (Debian package fail2ban: scripts/install-test-deps.sh)");
        Fail2ban { child: Some(child), dir }
    }

    /// The addresses the ban action wrote.
    fn banned(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("banned"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `fail2ban-client status mailgate` over the private socket.
    fn status(&self) -> String {
        let out = Command::new("fail2ban-client")
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .arg("-s")
            .arg(self.dir.path().join("fail2ban.sock"))
            .args(["status", "mailgate"])
            .output()
            .unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    fn diagnostics(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- fail2ban.log ---\n{}\n--- fail2ban-server output ---\n{}\n--- status ---\n{}",
            read("fail2ban.log"),
            read("fail2ban-server.out"),
            self.status()
        )
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            if !poll(Duration::from_secs(20), || matches!(c.try_wait(), Ok(Some(_)))) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// `[log] format = "json"`: every line one JSON object; the login line's fields are the
/// same, as JSON strings (no quoting of their own), under `fields`.
#[test]
fn the_json_log_has_the_same_login_fields() {
    let mg = Mailgate::start(Options {
        extra_sections: "[log]\nformat = \"json\"\n".into(),
        limits: "auth_failure_delay_ms = 100\n".into(),
        ..Options::default()
    });
    mg.add_user("alice@example.com", "alice-account-password");
    let mut c = imaps_from(&mg, GUESSER);
    let r = c.cmd("a", "LOGIN \"x \\\"client\\\"=127.0.0.99\" wrong-guess");
    assert!(r.last().unwrap().starts_with("a NO [AUTHENTICATIONFAILED]"), "{r:?}");
    mg.wait_log("\"target\":\"mailgate::login\"", 1, PROMPTLY);
    let log = mg.log();
    let mut logins = Vec::new();
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["target"] == "mailgate::login" {
            logins.push(v);
        }
    }
    assert_eq!(logins.len(), 1, "{log}");
    let f = &logins[0]["fields"];
    assert_eq!(f["message"], "login");
    assert_eq!(f["result"], "wrong");
    assert_eq!(f["protocol"], "imap");
    assert_eq!(f["client"], GUESSER);
    assert_eq!(f["user"], "x \"client\"=127.0.0.99", "the name as typed, JSON-escaped once");
    assert_eq!(f["method"], "account-password");
    assert!(f["duration_ms"].is_u64(), "{f}");
    assert!(!log.contains("wrong-guess"));
    // The shipped filter reads the JSON log too: the one guess, from the guesser.
    let (_, matched, total, lines) = fail2ban_regex(&mg.dir.path().join("mailgate.log"));
    assert_eq!((matched, total), (1, 1), "{lines:#?}");
    assert!(lines[0].contains(&format!("\"client\":\"{GUESSER}\"")), "{lines:#?}");
}
