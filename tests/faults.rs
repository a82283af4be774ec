//! Upstream faults (SECURITY.md cases 56, 111; issue 6 point 5): an IMAP upstream that
//! stalls before its greeting, greets with BYE, sends a 10 MB line, refuses the master
//! login, or closes in the middle of a literal. Each client gets a clean answer within
//! the upstream timeout, memory stays bounded, nothing hangs.

use crate::support::client::{Client, tls_config};
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
            std::thread::sleep(Duration::from_secs(10));
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
        assert!(took < Duration::from_secs(5), "upstream that {what}: answered after {took:?}");
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
    assert!(c.closed_within(Duration::from_secs(5)), "the client was not closed");
    assert!(String::from_utf8_lossy(&c.transcript).contains("only part of it"));
}
