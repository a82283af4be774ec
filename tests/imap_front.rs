//! The IMAP front door: TLS, STARTTLS, ALPN, pre-auth answers, uniform refusals, limits.
//! SECURITY.md sections A, C, D, E.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use base64::Engine as _;
use std::time::{Duration, Instant};

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// mailgate in front of a real Dovecot with alice, and an app password for her.
pub fn with_dovecot() -> (Dovecot, Mailgate, String) {
    with_dovecot_opts(Options::default())
}

pub fn with_dovecot_opts(mut opts: Options) -> (Dovecot, Mailgate, String) {
    let dovecot = Dovecot::start(DovecotOptions::default());
    opts.upstream = format!("127.0.0.1:{}", dovecot.port);
    opts.master_password = "master-password".into();
    let mg = Mailgate::start(opts);
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "test device", "imap");
    (dovecot, mg, app)
}

fn tls(mg: &Mailgate) -> Client {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(c.line().starts_with("* OK"));
    c
}

#[test]
fn greeting_and_capabilities_before_and_after_starttls() {
    let mg = Mailgate::start(Options::default());
    let mut c = Client::plain(mg.imap);
    let greeting = c.line();
    assert!(greeting.starts_with("* OK [CAPABILITY "), "{greeting}");
    assert!(greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED") && !greeting.contains("AUTH="));
    let caps = c.cmd("a", "CAPABILITY");
    assert!(caps[0].contains("STARTTLS") && caps[0].contains("LOGINDISABLED") && !caps[0].contains("AUTH="));
    // Credentials before TLS are refused without being checked.
    let r = c.cmd("b", "LOGIN alice@example.com secret");
    assert!(r[0].starts_with("b NO [PRIVACYREQUIRED]"), "{r:?}");
    let r = c.cmd("b2", &format!("AUTHENTICATE PLAIN {}", b64(b"\0alice@example.com\0secret")));
    assert!(r[0].starts_with("b2 NO [PRIVACYREQUIRED]"), "{r:?}");
    assert_eq!(c.cmd("c", "STARTTLS"), vec!["c OK Begin TLS negotiation now"]);
    c.starttls(tls_config(&mg.ca, &["imap"]));
    let caps = c.cmd("d", "CAPABILITY");
    assert!(caps[0].contains("AUTH=PLAIN") && caps[0].contains("AUTH=LOGIN") && caps[0].contains("SASL-IR"));
    assert!(!caps[0].contains("STARTTLS") && !caps[0].contains("LOGINDISABLED"), "{caps:?}");
    assert!(c.cmd("e", "STARTTLS")[0].starts_with("e BAD"));
    // Implicit TLS: the same post-TLS capabilities, and STARTTLS is refused.
    let mut t = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    let g = t.line();
    assert!(g.contains("AUTH=PLAIN") && !g.contains("STARTTLS") && !g.contains("PREAUTH"), "{g}");
    assert!(t.cmd("f", "STARTTLS")[0].starts_with("f BAD"));
}

#[test]
fn starttls_command_injection_is_discarded() {
    // SECURITY.md case 1: the injected command is never executed inside TLS.
    let mg = Mailgate::start(Options::default());
    let mut c = Client::plain(mg.imap);
    c.line();
    c.send(b"A STARTTLS\r\nXYZAB NOOP\r\n");
    assert_eq!(c.line(), "A OK Begin TLS negotiation now");
    let leftover = c.starttls(tls_config(&mg.ca, &["imap"]));
    assert!(leftover.is_empty(), "plaintext after the STARTTLS OK: {leftover:?}");
    assert_eq!(c.line_within(Duration::from_secs(2)), None, "injected command was answered");
    assert_eq!(c.cmd("C", "NOOP"), vec!["C OK NOOP completed"]);
}

#[test]
fn starttls_injection_without_handshake_gets_silence() {
    // SECURITY.md case 3: after the OK, plaintext is not a command.
    let mg = Mailgate::start(Options { limits: "tls_handshake_timeout_secs = 2\n".into(), ..Default::default() });
    let mut c = Client::plain(mg.imap);
    c.line();
    c.send(b"A STARTTLS\r\nB NOOP\r\n");
    assert_eq!(c.line(), "A OK Begin TLS negotiation now");
    assert_eq!(c.line_within(Duration::from_millis(1500)), None);
    assert!(c.closed_within(PROMPTLY), "not closed after the handshake timeout");
    assert!(!String::from_utf8_lossy(&c.transcript).contains("B OK"));
}

#[test]
fn implicit_tls_port_takes_no_plaintext() {
    // SECURITY.md case 10.
    let mg = Mailgate::start(Options::default());
    let mut c = Client::plain(mg.imaps);
    c.send(b"a CAPABILITY\r\n");
    assert!(c.closed_within(PROMPTLY));
    assert!(!String::from_utf8_lossy(&c.transcript).contains("CAPABILITY"), "answered in plaintext");
}

#[test]
fn alpn_other_protocols_are_refused() {
    // SECURITY.md case 18 (ALPACA): http/1.1 refused; imap and no ALPN accepted.
    let mg = Mailgate::start(Options::default());
    assert!(Client::tls(mg.imaps, tls_config(&mg.ca, &["http/1.1"])).is_err());
    assert!(Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).is_ok());
    assert!(Client::tls(mg.imaps, tls_config(&mg.ca, &[])).is_ok());
}

#[test]
fn strict_sni() {
    // SECURITY.md case 19: a name the certificate is not for aborts the handshake;
    // no SNI (connecting by address) and the certificate's names are served.
    let mg = Mailgate::start(Options::default());
    let cfg = || tls_config(&mg.ca, &["imap"]);
    assert!(Client::tls_named(mg.imaps, cfg(), "localhost").is_ok());
    assert!(Client::tls_named(mg.imaps, cfg(), "127.0.0.1").is_ok());
    let err = Client::tls_named(mg.imaps, cfg(), "attacker.example").err().expect("handshake must fail");
    assert!(!err.to_string().contains("certificate"), "failed for the wrong reason: {err}");
    // A client that sends an IP address as the server name (OpenSSL's clients, imaptest)
    // is served and leaves no WARN line per connection (issue 14: half of an imaptest
    // run's log was rustls' note about it).
    for _ in 0..3 {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &mg.imaps.to_string(), "-servername", "127.0.0.1", "-CAfile"])
            .arg(&mg.ca)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Verify return code: 0 (ok)"), "no handshake with an IP as server name: {text}");
    }
    let log = mg.log();
    assert!(!log.contains("Illegal SNI"), "{log}");
}

#[test]
fn refusals_are_uniform_and_delayed() {
    // SECURITY.md case 41: unknown user, wrong password, revoked app password: one answer.
    let (_d, mg, app) =
        with_dovecot_opts(Options { limits: "auth_failure_delay_ms = 500\n".into(), ..Default::default() });
    let revoked = mg.app_password("alice@example.com", "old phone", "imap");
    let id = revoked.replace(' ', "")[..6].to_string();
    mg.ok(&["app-password", "revoke", "alice@example.com", &id]);
    // Issue 18 point 3: the right app password from outside the networks it is limited
    // to gets the same answer and delay, and its owner sees why.
    let out = mg.ok(&[
        "app-password",
        "create",
        "alice@example.com",
        "--label",
        "office scanner",
        "--scope",
        "imap",
        "--allow",
        "10.0.0.0/8,192.0.2.7",
        "--expires",
        "30d",
    ]);
    assert!(out.contains("only from 10.0.0.0/8, 192.0.2.7/32") && out.contains("expires "), "{out}");
    let elsewhere = out.lines().last().unwrap().trim().to_string();
    let mut answers = Vec::new();
    for (user, pw) in [
        ("nobody@example.com", "whatever-password"),
        ("alice@example.com", "wrong-password"),
        ("alice@example.com", revoked.as_str()),
        ("nobody@example.com", app.as_str()),
        ("alice@example.com", elsewhere.as_str()),
    ] {
        let mut c = tls(&mg);
        let start = Instant::now();
        let r = c.cmd("a", &format!("LOGIN \"{user}\" \"{pw}\""));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(450), "refusal came after {took:?}");
        answers.push(r.join("\n"));
    }
    for a in &answers {
        assert_eq!(a, "a NO [AUTHENTICATIONFAILED] Authentication failed.");
    }
    let list = mg.ok(&["app-password", "list", "alice@example.com"]);
    assert!(list.contains("only from 10.0.0.0/8,192.0.2.7/32"), "{list}");
    let bad = mg.cli(&["app-password", "create", "alice@example.com", "--label", "x", "--expires", "tomorrow"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("is not an expiry"));
    let bad = mg.cli(&["app-password", "create", "alice@example.com", "--label", "x", "--allow", "10.0.0.0/40"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("is not an IP address or network"));
    let bad = mg.cli(&["app-password", "create", "alice@example.com", "--label", "x", "--expires", "2020-01-01"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("has passed already"));
}

#[test]
fn three_failures_close_the_connection() {
    // SECURITY.md case 43.
    let (_d, mg, _app) = with_dovecot();
    let mut c = tls(&mg);
    for t in ["a", "b"] {
        assert!(c.cmd(t, "LOGIN alice@example.com nope-nope")[0].starts_with(&format!("{t} NO")));
    }
    let last = c.cmd("c", "LOGIN alice@example.com nope-nope");
    assert!(last[0].starts_with("c NO"));
    assert!(c.line().starts_with("* BYE"));
    assert!(c.closed_within(PROMPTLY));
}

#[test]
fn upstream_down_gives_unavailable_never_ok() {
    // SECURITY.md case 56: nothing listens on the upstream port.
    let mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "phone", "imap");
    let mut c = tls(&mg);
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert_eq!(r, vec!["a NO [UNAVAILABLE] Service temporarily unavailable, try again later."]);
    assert!(mg.log().contains("upstream login failed"));
}

#[test]
fn wrong_master_password_gives_unavailable() {
    let (_d, mg, app) = with_dovecot();
    std::fs::write(mg.dir.path().join("config/master.secret"), "not-the-master-password\n").unwrap();
    let mut c = tls(&mg);
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r[0].starts_with("a NO [UNAVAILABLE]"), "{r:?}");
}

#[test]
fn account_password_of_2fa_account_gets_one_alert() {
    // Issue 2 point 6; CLIENTS.md: the alert once per connection.
    let (_d, mg, app) = with_dovecot();
    // Without 2FA the account password works.
    let mut c = tls(&mg);
    assert!(c.cmd("a", "LOGIN alice@example.com alice-account-pw").last().unwrap().starts_with("a OK"));
    let out = mg.ok(&["totp", "enable", "alice@example.com"]);
    assert!(out.lines().last().unwrap().starts_with("otpauth://totp/"));
    let mut c = tls(&mg);
    let r = c.cmd("b", "LOGIN alice@example.com alice-account-pw");
    assert_eq!(r.len(), 1);
    assert!(r[0].starts_with("b NO [ALERT] "), "{r:?}");
    assert!(r[0].contains("https://mail.example.test/app-passwords"), "{r:?}");
    let r = c.cmd("c", &format!("AUTHENTICATE PLAIN {}", b64(b"\0alice@example.com\0alice-account-pw")));
    assert_eq!(r, vec!["c NO [AUTHENTICATIONFAILED] Authentication failed."]);
    // The app password still works, and the refused device is recorded for the owner.
    let mut c = tls(&mg);
    assert!(c.cmd("d", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().starts_with("d OK"));
    let list = mg.ok(&["app-password", "list", "alice@example.com"]);
    assert!(list.contains("refused account password (needs an app password): 127.0.0.1 via IMAP"), "{list}");
    // Issue 18 point 2: `mailgate devices` shows the same, grouped, beside the app password.
    let devices = mg.ok(&["devices", "alice@example.com"]);
    assert!(
        devices.contains("127.0.0.1\tvia IMAP") && devices.contains("REFUSED: give it an app password"),
        "{devices}"
    );
    assert!(devices.contains("test device\tapp password\timap"), "{devices}");
    let json: serde_json::Value = serde_json::from_str(&mg.ok(&["devices", "alice@example.com", "--json"])).unwrap();
    assert_eq!(json["account_password"][0]["refused"], true);
    assert_eq!(json["signed_in"][0]["stale"], false);
    mg.ok(&["totp", "disable", "alice@example.com"]);
    let mut c = tls(&mg);
    assert!(c.cmd("e", "LOGIN alice@example.com alice-account-pw").last().unwrap().starts_with("e OK"));
}

#[test]
fn preauth_deadline_closes_slow_clients() {
    // SECURITY.md case 66: a trickle of bytes does not keep a connection alive.
    let mg = Mailgate::start(Options { limits: "preauth_timeout_secs = 2\n".into(), ..Default::default() });
    let mut c = Client::plain(mg.imap);
    c.line();
    // A byte every 300 ms for up to 30 s: were the deadline an idle timer that each byte
    // resets, the connection would outlive the trickle (the pre-auth deadline is 2 s, the
    // handshake timeout does not apply to plain IMAP). The in-process test with paused
    // time (net::imap) pins the deadline itself; here no wall-clock bound is needed.
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(30) {
        c.send_lossy(b"a");
        if c.closed_within(Duration::from_millis(300)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after a 30 s trickle with a 2 s pre-auth deadline");
    assert!(String::from_utf8_lossy(&c.transcript).contains("* BYE Autologout: authentication took too long"));
}

#[test]
fn huge_literals_and_lines_are_refused() {
    // SECURITY.md cases 24-28.
    let mg = Mailgate::start(Options::default());
    let mut c = tls(&mg);
    c.send(b"a LOGIN {4294967296}\r\n");
    let l = c.line();
    assert!(l.starts_with("a BAD") || l.starts_with("* BAD"), "{l}");
    assert!(!String::from_utf8_lossy(&c.transcript).contains("+ "));
    c.send(b"b LOGIN {99999999999999999999999}\r\n");
    let l = c.line();
    assert!(l.contains("BAD"), "{l}");
    let mut c = tls(&mg);
    c.send(b"c LOGIN {5000+}\r\n");
    assert!(c.line().starts_with("c BAD [TOOBIG]"));
    assert!(c.closed_within(PROMPTLY));
    let mut c = tls(&mg);
    let line = vec![b'x'; 1024 * 1024];
    c.send_lossy(&line);
    assert!(c.closed_within(PROMPTLY), "a 1 MiB line did not close the connection");
}

#[test]
fn config_errors_stop_before_any_port_opens() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::mailgate::free_port();
    let cfg = dir.path().join("bad.toml");
    for (text, key) in [
        (format!("[imap]\nlisten_tls = [\"127.0.0.1:{port}\"]\nlisten_tsl = []\n"), "listen_tsl"),
        (format!("[imap]\nlisten_tls = [\"127.0.0.1:{port}\"]\n[upstream.imap]\ntls = \"sometimes\"\n"), "tls"),
        (
            format!("[imap]\nlisten_tls = [\"127.0.0.1:{port}\"]\n[upstream.imap]\nlogin = \"xclient\"\n"),
            "upstream.imap.login",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(crate::support::mailgate::bin())
            .current_dir(dir.path())
            .args(["--config", cfg.to_str().unwrap(), "serve"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(!dir.path().join("data").exists(), "data dir made despite a bad config");
    }
    let out = std::process::Command::new(crate::support::mailgate::bin())
        .args(["--config", "/nonexistent/mailgate.toml", "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn sessions_per_account_and_address_are_capped() {
    // SECURITY.md case 65 (Dovecot mail_max_userip_connections).
    let (_d, mg, app) = with_dovecot_opts(Options {
        limits: "auth_failure_delay_ms = 200\nmax_sessions_per_user_ip = 2\n".into(),
        ..Default::default()
    });
    let login = || {
        let mut c = tls(&mg);
        let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
        (c, r.last().unwrap().clone())
    };
    let (c1, r1) = login();
    let (_c2, r2) = login();
    assert!(r1.starts_with("a OK") && r2.starts_with("a OK"));
    let (_c3, r3) = login();
    assert_eq!(r3, "a NO [LIMIT] Too many connections for this account from your address.");
    drop(c1);
    // The slot is freed when mailgate sees the close, which a loaded machine may delay:
    // retry (each refusal is the same [LIMIT] answer) rather than sleep a fixed time.
    let deadline = Instant::now() + PROMPTLY;
    let r4 = loop {
        let (c4, r4) = login();
        if r4.starts_with("a OK") || Instant::now() > deadline {
            break (c4, r4);
        }
        assert_eq!(r4, "a NO [LIMIT] Too many connections for this account from your address.");
        drop(c4);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(r4.1.starts_with("a OK"), "a freed slot is usable again: {}", r4.1);
}

#[test]
fn a_login_storm_keeps_hashing_memory_bounded_and_real_logins_answered() {
    // SECURITY.md case 63: 200 concurrent LOGINs with random passwords. At most
    // max_concurrent_hashes argon2 evaluations (19 MiB each) run at once, so memory stays
    // near base + 2 × 19 MiB; every client gets an answer; real logins during the storm
    // from another address get in, each after at most one job of every storming address.
    // Failure delays are off here to put the whole storm on the hashing queue.
    let (_d, mg, _app) = with_dovecot_opts(Options {
        limits: "auth_failure_delay_ms = 0\nmax_connections_per_ip = 1000\nmax_concurrent_hashes = 2\n".into(),
        ..Options::default()
    });
    let before = mg.peak_rss_kib().unwrap();
    let cfg = tls_config(&mg.ca, &["imap"]);
    let addr = mg.imaps;
    let storm: Vec<_> = (0..200)
        .map(|i| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                // From 20 addresses: each may have 10 guesses compared (its budget), so
                // the whole storm reaches the hashing queue, in turns per address.
                let tcp = connect_from(&format!("127.0.0.{}", 10 + i % 20), addr);
                let mut c = Client::tls_patient_over(tcp, cfg, Duration::from_secs(30)).unwrap();
                let greeting = c.line_within(Duration::from_secs(30)).unwrap_or_default();
                assert!(greeting.starts_with("* OK"), "greeting after {:?}: {greeting:?}", t0.elapsed());
                // Names that do not exist cost the same dummy hash (within the address's
                // guess budget; the rest are refused uncompared).
                c.send(format!("a LOGIN user{i}@example.com random-{i}-{}\r\n", i * 7919).as_bytes());
                loop {
                    match c.line_within(Duration::from_secs(60)) {
                        Some(l) if l.starts_with("a ") => return l,
                        Some(_) => {}
                        None => return format!("no answer after {:?}", t0.elapsed()),
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut real = Vec::new();
    for t in 0..3 {
        let begun = Instant::now();
        let mut c = Client::tls_over(connect_from("127.0.0.2", mg.imaps), tls_config(&mg.ca, &["imap"])).unwrap();
        assert!(c.line().starts_with("* OK"));
        let r = c.cmd("r", "LOGIN alice@example.com alice-account-pw");
        assert!(r.last().unwrap().starts_with("r OK"), "real login {t} during the storm: {r:?}");
        real.push(begun.elapsed());
    }
    let mut answers = std::collections::BTreeMap::new();
    for t in storm {
        let last = t.join().unwrap();
        assert!(last.starts_with("a NO [AUTHENTICATIONFAILED]") || last.starts_with("a NO [UNAVAILABLE]"), "{last}");
        *answers.entry(last).or_insert(0) += 1;
    }
    let peak = mg.peak_rss_kib().unwrap();
    eprintln!(
        "login storm: {answers:?} in {:?}; real logins took {real:?}; peak RSS {before} → {peak} KiB",
        started.elapsed()
    );
    assert!(peak < before + 2 * 19 * 1024 + 80 * 1024, "peak RSS {peak} KiB (before {before} KiB)");
    // The storm leaves a trace (issue 13 item 10, issue 19 point 5): a login line for each
    // guess that was compared (each cost a hash), and for those refused unchecked one line
    // a minute per result and address, not one per refusal.
    let log = mg.log();
    let storm: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("INFO mailgate::login: login result="))
        .filter(|l| (10..30).any(|n| l.contains(&format!(" client=127.0.0.{n} "))))
        .collect();
    let wrong = storm.iter().filter(|l| l.contains(" result=wrong ")).count();
    let failed: i32 =
        answers.iter().filter(|(a, _)| a.starts_with("a NO [AUTHENTICATIONFAILED]")).map(|(_, n)| n).sum();
    assert_eq!(wrong as i32, failed, "one line per compared guess");
    let minutes = started.elapsed().as_secs() as usize / 60 + 1;
    let unchecked = storm.len() - wrong;
    assert!(
        unchecked <= 20 * 2 * minutes,
        "{unchecked} lines for the storm's unchecked refusals from 20 addresses in {minutes} min"
    );
}

#[test]
fn a_low_open_file_limit_is_raised_for_max_connections() {
    // systemd starts services with a soft limit of 1024 open files, which would hold
    // about 500 relayed sessions whatever limits.max_connections says.
    let mut mg = Mailgate::start(Options {
        limits: "auth_failure_delay_ms = 200\nmax_connections = 3000\n".into(),
        ..Options::default()
    });
    mg.stop();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 1024 && exec {} --config {} serve",
            crate::support::mailgate::bin(),
            mg.config.display()
        ))
        .current_dir(mg.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let soft = loop {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
        let soft: u64 = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap_or_default();
        if comm.trim() == "mailgate" && soft != 1024 && soft != 0 || Instant::now() > deadline {
            break soft;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
    // 2 × 3000 + 256, or the hard limit if that is lower.
    let hard: u64 = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert_eq!(soft, hard.min(6256), "soft open-file limit after start");
}

/// A TCP connection to `dst` from the loopback address `src` (127.0.0.0/8).
pub fn connect_from(src: &str, dst: std::net::SocketAddr) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tcp = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        s.connect(dst).await.unwrap().into_std().unwrap()
    });
    tcp.set_nonblocking(false).unwrap();
    tcp
}

/// An IMAPS client of `mg` from the loopback address `src`, its greeting read.
pub fn imaps_from(mg: &Mailgate, src: &str) -> Client {
    let mut c = Client::tls_over(connect_from(src, mg.imaps), tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(c.line().starts_with("* OK"));
    c
}

#[test]
fn proxy_protocol_from_the_load_balancer_only_and_limits_by_the_real_client() {
    // Issue 8 point 4: a listener behind haproxy takes PROXY v1/v2 headers from the
    // trusted load balancer only; throttling, last-used addresses and the address passed
    // upstream are the client's.
    use std::io::Write as _;
    let (dovecot, mg, app) = with_dovecot_opts(Options {
        limits: "auth_failure_delay_ms = 200\nmax_connections_per_ip = 2\n".into(),
        extra_sections: "[proxy_protocol]\nimap = true\ntrusted = [\"127.0.0.2\"]\n".into(),
        ..Options::default()
    });
    let cfg = tls_config(&mg.ca, &["imap"]);
    let via_lb = |client: &str, v2: bool| {
        let mut tcp = connect_from("127.0.0.2", mg.imaps);
        let header = if v2 {
            // v2, TCP over IPv4: client:40000 → 127.0.0.1:993.
            let ip: std::net::Ipv4Addr = client.parse().unwrap();
            let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
            h.extend_from_slice(&ip.octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&40000u16.to_be_bytes());
            h.extend_from_slice(&993u16.to_be_bytes());
            h
        } else {
            format!("PROXY TCP4 {client} 127.0.0.1 40000 993\r\n").into_bytes()
        };
        tcp.write_all(&header).unwrap();
        Client::tls_over(tcp, cfg.clone())
    };
    // Not the load balancer: refused before TLS.
    let direct = Client::tls(mg.imaps, cfg.clone()).map(|mut c| c.line_within(Duration::from_secs(2)));
    assert!(!matches!(direct, Ok(Some(_))), "a direct connection was served: {direct:?}");
    // The load balancer without a header: refused.
    let bare = Client::tls_over(connect_from("127.0.0.2", mg.imaps), cfg.clone())
        .map(|mut c| c.line_within(Duration::from_secs(7)));
    assert!(!matches!(bare, Ok(Some(_))), "a connection without a header was served: {bare:?}");
    // v1 and v2 headers: the client's address reaches Dovecot and the app-password list.
    let mut a = via_lb("198.51.100.7", false).unwrap();
    assert!(a.line().starts_with("* OK"));
    assert!(a.cmd("a", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().starts_with("a OK"));
    assert!(dovecot.wait_for_log("rip=198.51.100.7", Duration::from_secs(10)), "{}\n{}", dovecot.log(), mg.log());
    let list = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    assert!(list.contains("198.51.100.7"), "{list}");
    let mut b = via_lb("198.51.100.7", true).unwrap();
    assert!(b.line().starts_with("* OK"));
    // The per-address cap counts the client, not the load balancer: a third connection
    // for 198.51.100.7 is refused, one for 198.51.100.8 is not.
    let third = via_lb("198.51.100.7", true).map(|mut c| c.line_within(Duration::from_secs(2)));
    assert!(!matches!(third, Ok(Some(_))), "cap not applied to the client: {third:?}");
    let mut other = via_lb("198.51.100.8", false).unwrap();
    assert!(other.line().starts_with("* OK"));
    assert!(mg.log().contains("PROXY"), "refusals are logged");
}

#[test]
fn creating_app_passwords_on_a_running_server_keeps_hashing_memory_bounded() {
    // PERFORMANCE.md M2: hashing memory ≤ hashing threads × 19 MiB. Admin requests used
    // to hash on tokio's blocking pool with a fresh 19 MiB block each; glibc kept them
    // (RSS grew by 12–14 MB per app password created, to ~280 MB after 20).
    let mg = Mailgate::start(Options {
        limits: "auth_failure_delay_ms = 200\nmax_concurrent_hashes = 2\n".into(),
        ..Options::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    for i in 0..20 {
        mg.app_password("alice@example.com", &format!("device {i}"), "imap");
    }
    let peak = mg.peak_rss_kib().unwrap();
    eprintln!("peak RSS after 20 app passwords: {peak} KiB");
    assert!(peak < 2 * 19 * 1024 + 50 * 1024, "peak RSS {peak} KiB");
}

/// Cross-protocol requests (issue 14): an HTTP request a web page made a browser send, or
/// a TLS ClientHello on the plaintext port, as the first line on IMAP and SMTP ports: the
/// connection is closed at once and nothing of what the client sent comes back.
#[test]
fn another_protocols_request_is_closed_without_an_echo() {
    let mg = Mailgate::start(Options::default());
    let http = b"POST /submit HTTP/1.1\r\nHost: mail.example.test\r\nContent-Length: 40\r\n\r\na LOGIN alice pw\r\nb LIST \"\" *\r\n";
    let mut c = tls(&mg);
    c.send(http);
    assert!(c.closed_within(Duration::from_secs(20)), "IMAPS left it open");
    assert!(c.pending().is_empty(), "IMAPS echoed {:?}", String::from_utf8_lossy(c.pending()));
    let mut p = Client::plain(mg.imap);
    assert!(p.line().starts_with("* OK"));
    p.send(b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03");
    assert!(p.closed_within(Duration::from_secs(20)), "IMAP left a ClientHello open");
    assert!(p.pending().is_empty(), "IMAP answered {:?}", String::from_utf8_lossy(p.pending()));
    let mut s = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(s.line().starts_with("220 "));
    s.send(http);
    assert!(s.closed_within(Duration::from_secs(20)), "SMTPS left it open");
    assert!(s.pending().is_empty(), "SMTPS echoed {:?}", String::from_utf8_lossy(s.pending()));
}

/// Issue 18 point 5: `[policy] require_second_factor` with a grace date. Before it, an
/// un-enrolled account still reads mail with its account password and the admin sees who
/// has not enrolled; after it, its mail apps get the [ALERT] with the URL (IMAP) and
/// `534` (SMTP); enrolling takes it off the list.
#[test]
fn required_second_factor_bars_the_account_password_after_the_grace_date() {
    use crate::support::submission::{Submission, SubmissionOptions};
    for (grace, barred) in [("2999-12-31", false), ("2020-01-01", true)] {
        let sub = Submission::start(SubmissionOptions::default());
        let (_d, mg, app) = with_dovecot_opts(Options {
            smtp_upstream: format!("127.0.0.1:{}", sub.port),
            extra_sections: format!("[policy]\nrequire_second_factor = [\"example.com\"]\ngrace_until = \"{grace}\"\n"),
            ..Default::default()
        });
        mg.add_user("carol@example.org", "carol-account-password");
        let needs = mg.ok(&["user", "list", "--needs-2fa"]);
        assert!(needs.contains("alice@example.com") && !needs.contains("carol@example.org"), "{needs}");
        assert!(
            needs.contains(if barred { "grace period is over" } else { "until 2999-12-31" })
                || needs.contains("until 3000-01-01"),
            "{needs}"
        );
        let mut c = tls(&mg);
        let r = c.cmd("a", "LOGIN alice@example.com alice-account-pw");
        if barred {
            assert!(r[0].starts_with("a NO [ALERT] ") && r[0].contains("requires two-step verification"), "{r:?}");
            assert!(r[0].contains("https://mail.example.test/app-passwords"), "{r:?}");
        } else {
            assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
        }
        // App passwords are not touched.
        let mut c = tls(&mg);
        assert!(c.cmd("c", &format!("LOGIN alice@example.com \"{app}\"")).last().unwrap().starts_with("c OK"));
        // SMTP says the same in its words.
        let mut s = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
        assert!(s.line().starts_with("220"));
        s.send(b"EHLO x\r\n");
        s.until("250 ");
        s.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice@example.com\0alice-account-pw")).as_bytes());
        let reply = s.line();
        assert_eq!(reply.starts_with("534"), barred, "{reply}");
        mg.ok(&["totp", "enable", "alice@example.com"]);
        let needs = mg.ok(&["user", "list", "--needs-2fa"]);
        assert!(!needs.contains("alice@example.com") && needs.contains("0 account(s)"), "{needs}");
    }
}
