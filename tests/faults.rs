//! Upstream faults (SECURITY.md cases 56, 111; issue 6 point 5): an IMAP upstream that
//! stalls before its greeting, greets with BYE, sends a 10 MB line, refuses the master
//! login, or closes in the middle of a literal. Each client gets a clean answer within
//! the upstream timeout, memory stays bounded, nothing hangs. An SMTP upstream that
//! drops at each step (greeting, EHLO, AUTH, MAIL, RCPT, DATA, mid-body) gets the
//! client a prompt 454/451, never a 250 for a message that was not delivered.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::mailgate::{Mailgate, Options};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// How a scripted fake upstream behaves once a connection arrives.
type UpstreamScript = fn(std::net::TcpStream);

/// A scripted upstream: for each connection, `script` gets the stream.
fn fake_upstream(script: UpstreamScript) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || script(conn));
        }
    });
    port
}

fn read_some(s: &mut std::net::TcpStream) -> String {
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn start(port: u16) -> (Mailgate, String) {
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{port}"),
        limits: "auth_failure_delay_ms = 0\nupstream_timeout_secs = 2\n".into(),
        ..Default::default()
    });
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "phone", "imap");
    (mg, app)
}

fn login(mg: &Mailgate, app: &str) -> (Client, String, Duration) {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    let t = Instant::now();
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    (c, r.last().unwrap().clone(), t.elapsed())
}

const UNAVAILABLE: &str = "a NO [UNAVAILABLE] Service temporarily unavailable, try again later.";

#[test]
fn upstream_that_stalls_greets_bye_floods_or_refuses_gets_a_clean_answer() {
    let cases: [(&str, UpstreamScript); 4] = [
        ("stalls before its greeting", |s| {
            // Far longer than the bound below: only upstream_timeout_secs (2 s) can answer
            // the client before it.
            std::thread::sleep(Duration::from_secs(60));
            drop(s);
        }),
        ("greets with BYE", |mut s| {
            let _ = s.write_all(b"* BYE Too busy\r\n");
        }),
        ("sends a 10 MB line", |mut s| {
            let _ = s.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n");
            let _ = read_some(&mut s);
            let chunk = vec![b'x'; 1024 * 1024];
            for _ in 0..10 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_secs(3));
        }),
        ("refuses the master login", |mut s| {
            let _ = s.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n");
            let got = read_some(&mut s);
            let _ = s.write_all(b"M2 OK ID done\r\n");
            if got.contains("M3") || read_some(&mut s).contains("M3") {
                let _ = s.write_all(b"M3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
            }
            std::thread::sleep(Duration::from_secs(3));
        }),
    ];
    for (what, script) in cases {
        let (mg, app) = start(fake_upstream(script));
        let (_c, r, took) = login(&mg, &app);
        assert_eq!(r, UNAVAILABLE, "upstream that {what}");
        // The 2 s upstream deadline, not the upstream, ends the wait: well before the 60 s
        // stall, with room for a loaded machine.
        assert!(took < PROMPTLY, "upstream that {what}: answered after {took:?}");
        let peak = mg.peak_rss_kib().unwrap();
        assert!(peak < 100 * 1024, "upstream that {what}: peak RSS {peak} KiB");
        assert!(mg.log().contains("upstream login failed"), "{what}");
    }
}

#[test]
fn upstream_closing_in_the_middle_of_a_literal_closes_the_client_cleanly() {
    let port = fake_upstream(|mut s| {
        let _ = s.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n");
        let mut seen = String::new();
        while !seen.contains("M3") {
            let got = read_some(&mut s);
            if got.is_empty() {
                return;
            }
            seen.push_str(&got);
        }
        let _ = s.write_all(b"M2 OK ID\r\nM3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n");
        let _ = read_some(&mut s); // the client's FETCH
        let _ = s.write_all(b"* 1 FETCH (BODY[] {1000}\r\nonly part of it");
        // and the connection drops here
    });
    let (mg, app) = start(port);
    let (mut c, r, _) = login(&mg, &app);
    assert!(r.starts_with("a OK [CAPABILITY IMAP4rev1 IDLE]"), "{r}");
    c.send(b"f FETCH 1 BODY[]\r\n");
    assert!(c.closed_within(PROMPTLY), "the client was not closed");
    assert!(String::from_utf8_lossy(&c.transcript).contains("only part of it"));
}

/// A fake SMTP submission upstream that answers like Dovecot until it sees the
/// command `drop_at` (or, for `"body"`, the first line of the message), then closes
/// without a reply.
fn fake_smtp_upstream(drop_at: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                if drop_at == "greeting" {
                    return;
                }
                let _ = s.write_all(b"220 sub ESMTP\r\n");
                let mut pending = String::new();
                let mut in_data = false;
                loop {
                    let got = read_some(&mut s);
                    if got.is_empty() {
                        return;
                    }
                    pending.push_str(&got);
                    while let Some(i) = pending.find("\r\n") {
                        let line: String = pending.drain(..i + 2).collect();
                        let verb = line.split([' ', ':', '\r']).next().unwrap_or("").to_ascii_uppercase();
                        if in_data {
                            if drop_at == "body" {
                                return;
                            }
                            if line == ".\r\n" {
                                in_data = false;
                                let _ = s.write_all(b"250 2.0.0 queued\r\n");
                            }
                            continue;
                        }
                        if verb == drop_at {
                            return;
                        }
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" => b"250-sub\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n",
                            "AUTH" => b"235 2.7.0 Logged in\r\n",
                            "DATA" => {
                                in_data = true;
                                b"354 go ahead\r\n"
                            }
                            "QUIT" => b"221 bye\r\n",
                            _ => b"250 2.1.0 ok\r\n",
                        };
                        let _ = s.write_all(reply);
                    }
                }
            });
        }
    });
    port
}

/// Reads one SMTP reply (all its lines); `None` when the connection closed or stalled.
fn smtp_reply(c: &mut Client) -> Option<String> {
    let mut all = String::new();
    loop {
        let l = c.line_within(PROMPTLY)?;
        let last = l.len() < 4 || l.as_bytes()[3] != b'-';
        all.push_str(&l);
        if last {
            return Some(all);
        }
    }
}

#[test]
fn smtp_upstream_dropping_at_each_step_never_gets_a_false_250() {
    use base64::Engine;
    for drop_at in ["greeting", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "body"] {
        let mg = Mailgate::start(Options {
            smtp_upstream: format!("127.0.0.1:{}", fake_smtp_upstream(drop_at)),
            limits: "auth_failure_delay_ms = 0\nupstream_timeout_secs = 2\n".into(),
            ..Default::default()
        });
        mg.add_user("alice@example.com", "alice-account-pw");
        let app = mg.app_password("alice@example.com", "laptop", "smtp");
        let mut c = Client::tls(mg.smtps, tls_config(&mg.ca, &["smtp"])).unwrap();
        assert!(c.line().starts_with("220 "));
        c.send(b"EHLO client.example\r\n");
        smtp_reply(&mut c);
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0alice@example.com\0{app}"));
        c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes());
        let t = Instant::now();
        let auth = smtp_reply(&mut c).unwrap_or_default();
        if ["greeting", "EHLO", "AUTH"].contains(&drop_at) {
            assert!(auth.starts_with("454 4.7.0"), "drop at {drop_at}: AUTH got {auth:?}");
            assert!(t.elapsed() < PROMPTLY, "drop at {drop_at}: took {:?}", t.elapsed());
            continue;
        }
        assert!(auth.starts_with("235"), "drop at {drop_at}: {auth:?}");
        // From here on the client talks as smtplib does; the first non-2xx/3xx reply
        // (or a closed connection) ends the transaction, and it must come promptly.
        let steps: [&[u8]; 4] = [
            b"MAIL FROM:<alice@example.com>\r\n",
            b"RCPT TO:<bob@example.net>\r\n",
            b"DATA\r\n",
            b"From: <alice@example.com>\r\nSubject: t\r\n\r\nhello\r\n.\r\n",
        ];
        let mut outcome = None;
        for step in steps {
            c.send_lossy(step);
            let t = Instant::now();
            let r = smtp_reply(&mut c);
            assert!(t.elapsed() < PROMPTLY, "drop at {drop_at}: stalled {:?}", t.elapsed());
            match r {
                Some(r) if r.starts_with('2') || r.starts_with('3') => continue,
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        let outcome = outcome.unwrap_or_else(|| panic!("drop at {drop_at}: the message was accepted"));
        if let Some(r) = outcome {
            assert!(r.starts_with('4'), "drop at {drop_at}: expected a temporary failure, got {r:?}");
        }
    }
}
