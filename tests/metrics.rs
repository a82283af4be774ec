//! Issue 19 point 4: `/metrics` on `[metrics] listen`, scraped after a scripted mix of
//! logins on the real mailgate in front of a real Dovecot (like tests/fail2ban.rs, which
//! checks the log lines of the same kind of mix).
//!
//! From four loopback addresses: good IMAP logins with an app password (one session
//! APPENDs and FETCHes a message), the right account password of a 2FA account (refused
//! with the words about app passwords), wrong passwords until the address's guess budget
//! is used up (then throttled), and one wrong password over SMTP. The scrape is parsed
//! with the Prometheus text parser of Python's `prometheus_client` (Debian package
//! `python3-prometheus-client`), and every counter must have the value the script caused.

use crate::imap_front::{connect_from, imaps_from, with_dovecot_opts};
use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::mailgate::{Options, free_port};
use base64::Engine as _;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const GOOD: &str = "127.0.0.40";
const GUESSER: &str = "127.0.0.41";
const TWO_FACTOR: &str = "127.0.0.42";
const SMTP_GUESSER: &str = "127.0.0.43";
/// Good IMAP logins.
const GOOD_LOGINS: usize = 3;
/// Account-password logins of the 2FA account.
const TWO_FACTOR_LOGINS: usize = 2;
/// Compared guesses an address gets (`auth::budget::PASSWORD_PER_ADDRESS`).
const GUESS_BUDGET: usize = 10;
/// Guesses after the budget is used up: refused unchecked.
const THROTTLED: usize = 2;

/// One sample: labels and value.
type Samples = Vec<(HashMap<String, String>, f64)>;

/// One sample as the parser script prints it: family, family type, sample name, labels,
/// value.
type Parsed = (String, String, String, HashMap<String, String>, f64);

/// Parses the text with `prometheus_client.parser` and prints every sample as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([family.name, family.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// A scrape: the families' types and the samples by sample name.
struct Scrape {
    text: String,
    types: HashMap<String, String>,
    samples: HashMap<String, Samples>,
}

impl Scrape {
    /// The value of the one sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self.matching(name, labels).collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}\n{}", self.text);
        found[0]
    }

    /// The sum over the samples `name` whose labels include `labels` (0 if none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    fn matching<'a>(&'a self, name: &str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(l, _)| labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, v)| *v)
    }
}

/// `GET /metrics` over plain HTTP; the body, parsed by the Python parser.
fn scrape(addr: SocketAddr) -> Scrape {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let mut python = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(PARSE)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (Debian package python3-prometheus-client: scripts/install-test-deps.sh)");
    python.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus text parser refused the scrape:\n{}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Parsed> = serde_json::from_slice(&out.stdout).unwrap();
    let mut scrape = Scrape { text: body.to_string(), types: HashMap::new(), samples: HashMap::new() };
    for (family, kind, name, labels, value) in parsed {
        scrape.types.insert(family, kind);
        scrape.samples.entry(name).or_default().push((labels, value));
    }
    scrape
}

/// A message of a known size.
fn message() -> String {
    let body: String =
        (0..200).map(|i| format!("line {i} of the metrics test message, padded to some length\r\n")).collect();
    format!("From: alice@example.com\r\nTo: alice@example.com\r\nSubject: metrics\r\n\r\n{body}")
}

#[test]
fn metrics_count_exactly_what_a_scripted_mix_of_logins_did() {
    let port = free_port();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (_dovecot, mg, app) = with_dovecot_opts(Options {
        limits: "auth_failure_delay_ms = 20\nip_penalty_max_ms = 40\n".into(),
        extra_sections: format!("[metrics]\nlisten = \"{metrics_addr}\"\n"),
        ..Options::default()
    });
    mg.add_user("bob@example.com", "bob-account-password");
    mg.ok(&["totp", "enable", "bob@example.com"]);
    let before = scrape(metrics_addr);
    assert_eq!(before.sum("mailgate_logins_total", &[]), 0.0, "{}", before.text);

    // Good logins; the first session appends a message and fetches it back, and is
    // scraped while it is open.
    let msg = message();
    for n in 0..GOOD_LOGINS {
        let mut c = imaps_from(&mg, GOOD);
        let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
        assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", mg.log());
        if n == 0 {
            let open = scrape(metrics_addr);
            assert_eq!(open.value("mailgate_sessions", &[("protocol", "imap")]), 1.0, "{}", open.text);
            c.send(format!("b APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes());
            assert!(c.line().starts_with('+'));
            c.send(msg.as_bytes());
            c.send(b"\r\n");
            let r = c.until("b ");
            assert!(r.last().unwrap().starts_with("b OK"), "{r:?}");
            assert!(c.cmd("c", "SELECT INBOX").last().unwrap().starts_with("c OK"));
            c.send(b"d FETCH 1 BODY.PEEK[]\r\n");
            let first = c.line();
            assert!(first.starts_with("* 1 FETCH") && first.ends_with(&format!("{{{}}}", msg.len())), "{first}");
            assert_eq!(c.bytes(msg.len()), msg.as_bytes());
            c.until("d ");
        }
        c.cmd("z", "LOGOUT");
    }
    // The 2FA account's right account password: refused with the words about app passwords.
    for _ in 0..TWO_FACTOR_LOGINS {
        let mut c = imaps_from(&mg, TWO_FACTOR);
        let r = c.cmd("a", "LOGIN bob@example.com bob-account-password");
        assert!(r.last().unwrap().starts_with("a NO [ALERT]"), "{r:?}");
    }
    // Wrong passwords until the address's budget is used up, then refused unchecked.
    for n in 0..GUESS_BUDGET + THROTTLED {
        let mut c = imaps_from(&mg, GUESSER);
        let r = c.cmd("a", &format!("LOGIN alice@example.com wrong-guess-{n}"));
        assert!(r.last().unwrap().starts_with("a NO"), "{r:?}");
    }
    // One wrong password over SMTP.
    let mut s = Client::tls_over(connect_from(SMTP_GUESSER, mg.smtps), tls_config(&mg.ca, &["smtp"])).unwrap();
    assert!(s.line().starts_with("220 "));
    s.send(b"EHLO guesser.example\r\n");
    s.until("250 ");
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0alice@example.com\0smtp-guess");
    s.send(format!("AUTH PLAIN {plain}\r\n").as_bytes());
    assert!(s.line().starts_with("535 "));
    drop(s);
    // Two web requests: a page, and a path that matches no route.
    for path in ["/login", "/alice@example.com/secret"] {
        let mut w = Client::tls(mg.web, tls_config(&mg.ca, &["http/1.1"])).unwrap();
        w.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes());
        assert!(w.line().starts_with("HTTP/1.1 "));
    }

    // The log agrees (its last line is written), and the sessions have ended.
    mg.wait_log(&format!("login result=wrong protocol=smtp client={SMTP_GUESSER} "), 1, PROMPTLY);
    let deadline = Instant::now() + PROMPTLY;
    let m = loop {
        let m = scrape(metrics_addr);
        if m.value("mailgate_sessions", &[("protocol", "imap")]) == 0.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = mg.log();
    let logins = |protocol: &str, method: &str, result: &str| {
        m.sum("mailgate_logins_total", &[("protocol", protocol), ("method", method), ("result", result)])
    };
    let lines = |result: &str, protocol: &str| {
        log.lines().filter(|l| l.contains(&format!("login result={result} protocol={protocol} "))).count()
    };

    // Every login counter, exactly.
    assert_eq!(logins("imap", "app-password", "ok"), GOOD_LOGINS as f64, "{}", m.text);
    assert_eq!(logins("imap", "account-password", "needs_app_password"), TWO_FACTOR_LOGINS as f64, "{}", m.text);
    assert_eq!(logins("imap", "account-password", "wrong"), GUESS_BUDGET as f64, "{}", m.text);
    assert_eq!(logins("imap", "account-password", "throttled"), THROTTLED as f64, "{}", m.text);
    assert_eq!(logins("smtp", "account-password", "wrong"), 1.0, "{}", m.text);
    let total = GOOD_LOGINS + TWO_FACTOR_LOGINS + GUESS_BUDGET + THROTTLED + 1;
    assert_eq!(m.sum("mailgate_logins_total", &[]), total as f64, "no other series:\n{}", m.text);
    // The log lines say the same (the throttled ones are aggregated: first line + more=N).
    assert_eq!(lines("ok", "imap"), GOOD_LOGINS, "{log}");
    assert_eq!(lines("wrong", "imap"), GUESS_BUDGET, "{log}");
    assert_eq!(lines("needs_app_password", "imap"), TWO_FACTOR_LOGINS, "{log}");
    // One latency observation per login.
    assert_eq!(m.sum("mailgate_login_duration_seconds_count", &[]), total as f64, "{}", m.text);
    assert_eq!(m.types.get("mailgate_login_duration_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(m.types.get("mailgate_logins").map(String::as_str), Some("counter"));

    // Sessions back to 0 after LOGOUT; bytes relayed beyond the message both ways.
    assert_eq!(m.value("mailgate_sessions", &[("protocol", "imap")]), 0.0, "{}", m.text);
    let bytes = |direction| m.value("mailgate_relayed_bytes_total", &[("protocol", "imap"), ("direction", direction)]);
    assert!(bytes("from_client") > msg.len() as f64, "{}", m.text);
    assert!(bytes("to_client") > msg.len() as f64, "{}", m.text);
    // SMTP: the wrong login opened no upstream session, so nothing was relayed.
    assert_eq!(m.sum("mailgate_relayed_bytes_total", &[("protocol", "smtp")]), 0.0, "{}", m.text);

    // Upstream: one master login per good login, none failed.
    assert_eq!(m.value("mailgate_upstream_logins_total", &[("protocol", "imap"), ("result", "ok")]), 3.0);
    assert_eq!(m.sum("mailgate_upstream_logins_total", &[("result", "failed")]), 0.0);
    assert_eq!(m.value("mailgate_upstream_login_duration_seconds_count", &[("protocol", "imap")]), 3.0);

    // Hashing: the compared guesses and 2FA passwords were hashed (plus the app
    // password's first check); nothing waits now.
    assert_eq!(m.value("mailgate_hashing_queue_jobs", &[]), 0.0);
    assert_eq!(m.value("mailgate_hashing_running_jobs", &[]), 0.0);
    let hashed = m.value("mailgate_hashing_wait_seconds_count", &[]);
    assert!(hashed >= (GUESS_BUDGET + TWO_FACTOR_LOGINS + 1) as f64, "{hashed}\n{}", m.text);

    // The store was used and did not fail.
    assert!(m.sum("mailgate_store_operation_duration_seconds_count", &[("operation", "get_account")]) > 0.0);
    assert_eq!(m.sum("mailgate_store_errors_total", &[]), 0.0, "{}", m.text);

    // Web requests by route template and status.
    assert_eq!(m.value("mailgate_web_requests_total", &[("route", "/login"), ("status", "200")]), 1.0);
    assert_eq!(m.value("mailgate_web_requests_total", &[("route", "unmatched"), ("status", "404")]), 1.0);

    // The certificate's end of validity, in the future.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    assert!(m.value("mailgate_tls_certificate_expiry_timestamp_seconds", &[]) > now, "{}", m.text);

    // No user name, address or app password in any label.
    for secret in ["alice", "bob", "example.com", "127.0.0.4", "secret", &app[..6]] {
        assert!(!m.text.contains(secret), "{secret} in the metrics:\n{}", m.text);
    }
}
