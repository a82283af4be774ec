//! Session tests for the SMTP submission machine: bytes in, actions out, no sockets.
//!
//! A scripted driver plays `net::smtp`: it completes STARTTLS, checks credentials (the
//! password "right" is accepted), answers forwarded commands like an upstream server and
//! records every byte that the client and the upstream server receive. Case numbers
//! refer to SECURITY.md.

use super::*;
use crate::proto::chunked;
use crate::proto::testing::split_at;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

const HOST: &str = "mail.example.com";
/// The SIZE limit of most sessions here.
const MAX: usize = 100_000;
/// The addresses the fake account may send as.
const SENDERS: [&str; 2] = ["alice@example.com", "alias@example.org"];
/// `\0alice\0right`: good credentials.
const GOOD_PLAIN: &str = "AGFsaWNlAHJpZ2h0";
/// `\0alice\0wrong`.
const BAD_PLAIN: &str = "AGFsaWNlAHdyb25n";

const GREETING: &str = "220 mail.example.com ESMTP mailgate ready\r\n";
const R250: &str = "250 2.0.0 OK\r\n";
const R235: &str = "235 2.7.0 Authentication successful\r\n";
const R354: &str = "354 End data with <CR><LF>.<CR><LF>\r\n";
const R535: &str = "535 5.7.8 Authentication credentials invalid\r\n";
const R530_TLS: &str = "530 5.7.0 Must issue a STARTTLS command first\r\n";
const R530_AUTH: &str = "530 5.7.0 Authentication required\r\n";
const R220_TLS: &str = "220 2.0.0 Ready to start TLS\r\n";
const R_UNKNOWN: &str = "500 5.5.1 Unknown command\r\n";
const R_BARE_CMD: &str = "500 5.5.2 Bare CR or LF is not allowed; lines end with CRLF\r\n";
const R_TOO_LONG: &str = "500 5.5.2 Line too long\r\n";
const R_AUTH_TOO_LONG: &str = "500 5.5.6 Authentication Exchange line is too long\r\n";
const R_CANCELLED: &str = "501 5.7.0 Authentication cancelled\r\n";
const R_BAD_B64: &str = "501 5.5.2 Invalid base64 data\r\n";
const R_BARE_DATA: &str = "554 5.6.11 Bare CR or LF in message data is not allowed; lines end with CRLF\r\n";
const R451: &str = "451 4.4.1 Upstream server unavailable, try again later\r\n";
const QUEUED: &str = "250 2.0.0 queued\r\n";
const NO_SUCH_USER: &str = "550 5.1.1 no such user\r\n";
const MAIL_ALICE: &[u8] = b"MAIL FROM:<alice@example.com>\r\n";
const RCPT_BOB: &[u8] = b"RCPT TO:<bob@example.net>\r\n";

/// A non-`Write` action, in a form tests can compare. `DataChunk` is not recorded here
/// (its boundaries depend on how the input was cut); its bytes are in `Driver::up`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    StartTls,
    Auth { user: String, pass: Vec<u8> },
    Refuse(AuthReply),
    Forward(String),
    StartData { complete: bool },
    EndData,
    Abort,
    Close,
}

fn auth_ev(user: &str, pass: &str) -> Ev {
    Ev::Auth { user: user.to_string(), pass: pass.as_bytes().to_vec() }
}

fn fwd(line: &str) -> Ev {
    Ev::Forward(line.to_string())
}

/// Where the fake upstream fails (once): the driver then calls `upstream_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Forward,
    StartData,
    Chunk,
    EndData,
}

/// Plays `net::smtp` against a [`Submission`] and records everything.
struct Driver {
    s: Submission,
    /// Every byte written to the client.
    client: Vec<u8>,
    client_seen: usize,
    events: Vec<Ev>,
    events_seen: usize,
    /// Every byte sent to the upstream server (forwarded lines, DATA, head, chunks, end).
    up: Vec<u8>,
    up_seen: usize,
    /// `up` with each aborted message replaced by `[aborted]` (how much of it was sent
    /// before the abort depends on how the input was cut; upstream discards it anyway).
    kept: Vec<u8>,
    data_start: usize,
    /// Messages upstream accepted: the bytes after `DATA\r\n`, end line included.
    messages: Vec<Vec<u8>>,
    current: Vec<u8>,
    /// The upstream connection is open (like `upstream: Option<Upstream>` in the driver).
    conn: bool,
    tls: bool,
    tls_pending: bool,
    authed: bool,
    closed: bool,
    /// If set, every Authenticate is answered with this failure.
    verdict: Option<AuthReply>,
    /// The next upstream step of this kind fails.
    fail: Option<Fail>,
    /// Upstream's answer to DATA if it is not 354.
    data_reply: Option<String>,
    /// Upstream's final reply to a message.
    end_reply: (u16, String),
    largest_chunk: usize,
}

/// The scripted upstream: RCPT to `bad@…` is refused, `multi@…` gets a multi-line reply,
/// everything else is `250 2.0.0 OK`.
fn upstream_answer(line: &[u8]) -> (u16, String) {
    let l = line.to_ascii_uppercase();
    if l.starts_with(b"RCPT TO:<BAD@") {
        (550, NO_SUCH_USER.to_string())
    } else if l.starts_with(b"RCPT TO:<MULTI@") {
        (250, "250-first line\r\n250 2.1.5 second line\r\n".to_string())
    } else {
        (250, R250.to_string())
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Driver {
    /// A session whose greeting is not read yet.
    fn raw(tls: bool, starttls: bool, max: usize) -> Driver {
        Driver {
            s: Submission::new(HOST, tls, starttls, max),
            client: Vec::new(),
            client_seen: 0,
            events: Vec::new(),
            events_seen: 0,
            up: Vec::new(),
            up_seen: 0,
            kept: Vec::new(),
            data_start: 0,
            messages: Vec::new(),
            current: Vec::new(),
            conn: false,
            tls,
            tls_pending: false,
            authed: false,
            closed: false,
            verdict: None,
            fail: None,
            data_reply: None,
            end_reply: (250, QUEUED.to_string()),
            largest_chunk: 0,
        }
    }

    /// A session with its greeting read: implicit TLS if `tls`, else a STARTTLS listener.
    fn new(tls: bool) -> Driver {
        Driver::with_max(tls, MAX)
    }

    fn with_max(tls: bool, max: usize) -> Driver {
        let mut d = Driver::raw(tls, !tls, max);
        d.pump();
        assert_eq!(d.out(), GREETING);
        assert!(d.new_events().is_empty());
        d
    }

    fn send_upstream(&mut self, bytes: &[u8]) {
        self.up.extend_from_slice(bytes);
        self.kept.extend_from_slice(bytes);
    }

    fn take_fail(&mut self, at: Fail) -> bool {
        if self.fail == Some(at) {
            self.fail = None;
            self.conn = false;
            self.s.upstream_failed();
            true
        } else {
            false
        }
    }

    /// Polls until the session needs input or closes, answering every action like the
    /// real driver does, and checks the invariants that hold in every test.
    fn pump(&mut self) {
        if self.closed {
            assert!(matches!(self.s.next(), Next::Close), "a closed session came back to life");
            return;
        }
        for _ in 0..1_000_000 {
            match self.s.next() {
                Next::Write(b) => {
                    assert!(!b.is_empty(), "empty Write");
                    assert!(!self.tls_pending, "written between StartTls and the handshake: {:?}", text(&b));
                    self.client.extend(b);
                }
                Next::NeedInput => return,
                Next::StartTls => {
                    assert!(!self.tls, "StartTls inside TLS");
                    self.events.push(Ev::StartTls);
                    self.tls_pending = true;
                }
                Next::Event(Action::Authenticate(c)) => {
                    assert!(self.tls, "Authenticate before TLS");
                    assert!(!self.authed, "Authenticate after success");
                    let good = c.password.expose().as_slice() == b"right";
                    self.events.push(Ev::Auth { user: c.username.clone(), pass: c.password.expose().clone() });
                    if let Some(v) = self.verdict.clone() {
                        self.s.auth_failed(v);
                    } else if good {
                        self.authed = true;
                        self.conn = true;
                        self.s.auth_succeeded(SENDERS.iter().map(|s| s.to_string()).collect());
                    } else {
                        self.s.auth_failed(AuthReply::Failed);
                    }
                }
                Next::Event(Action::Refuse(r)) => {
                    assert!(self.tls, "a SASL exchange before TLS");
                    self.events.push(Ev::Refuse(r.clone()));
                    self.s.auth_failed(r);
                }
                Next::Event(Action::Forward(line)) => {
                    assert!(self.authed, "Forward before authentication: {:?}", text(&line));
                    assert!(line.ends_with(b"\r\n"), "{line:?}");
                    self.events.push(Ev::Forward(text(&line)));
                    if !self.conn && line.eq_ignore_ascii_case(b"RSET\r\n") {
                        // As net::smtp: no upstream connection, no upstream transaction.
                        self.s.upstream_reply(250, R250.as_bytes());
                        continue;
                    }
                    self.conn = true;
                    self.send_upstream(&line);
                    if self.take_fail(Fail::Forward) {
                        continue;
                    }
                    let (code, raw) = upstream_answer(&line);
                    self.s.upstream_reply(code, raw.as_bytes());
                }
                Next::Event(Action::StartData { head, complete }) => {
                    assert!(self.authed, "StartData before authentication");
                    self.events.push(Ev::StartData { complete });
                    self.conn = true;
                    self.data_start = self.kept.len();
                    self.send_upstream(b"DATA\r\n");
                    if self.take_fail(Fail::StartData) {
                        continue;
                    }
                    if let Some(r) = self.data_reply.clone() {
                        self.s.data_refused(r.as_bytes());
                        continue;
                    }
                    self.send_upstream(&head);
                    self.current = head;
                    if complete {
                        self.messages.push(std::mem::take(&mut self.current));
                        let (code, raw) = self.end_reply.clone();
                        self.s.upstream_reply(code, raw.as_bytes());
                    } else {
                        self.s.data_accepted();
                    }
                }
                Next::Event(Action::DataChunk(b)) => {
                    assert!(self.authed && self.conn, "DataChunk without an upstream message");
                    assert!(!b.is_empty(), "empty DataChunk");
                    self.largest_chunk = self.largest_chunk.max(b.len());
                    self.send_upstream(&b);
                    self.current.extend_from_slice(&b);
                    self.take_fail(Fail::Chunk);
                }
                Next::Event(Action::EndData(b)) => {
                    assert!(self.authed && self.conn, "EndData without an upstream message");
                    self.events.push(Ev::EndData);
                    self.send_upstream(&b);
                    self.current.extend_from_slice(&b);
                    assert!(self.current.ends_with(b"\r\n.\r\n"), "{:?}", text(&self.current));
                    if self.take_fail(Fail::EndData) {
                        self.current.clear();
                        continue;
                    }
                    self.messages.push(std::mem::take(&mut self.current));
                    let (code, raw) = self.end_reply.clone();
                    self.s.upstream_reply(code, raw.as_bytes());
                }
                Next::Event(Action::AbortUpstream) => {
                    self.events.push(Ev::Abort);
                    self.kept.truncate(self.data_start);
                    self.kept.extend_from_slice(b"[aborted]");
                    self.conn = false;
                    self.current.clear();
                }
                Next::Close => {
                    self.events.push(Ev::Close);
                    self.closed = true;
                    for _ in 0..3 {
                        assert!(matches!(self.s.next(), Next::Close), "poll after Close");
                    }
                    return;
                }
            }
        }
        panic!("poll() did not settle");
    }

    /// One read from the client, then poll until input is needed.
    fn feed(&mut self, bytes: &[u8]) {
        self.s.feed(bytes);
        self.pump();
    }

    /// The client waits for an answer: a STARTTLS handshake still pending is done now.
    fn finish_turn(&mut self) {
        if self.tls_pending && !self.closed {
            self.tls_pending = false;
            self.tls = true;
            self.s.tls_started();
            self.pump();
        }
    }

    /// One client turn in one read; returns what the client got since the last look.
    fn send(&mut self, bytes: &[u8]) -> String {
        self.feed(bytes);
        self.finish_turn();
        self.out()
    }

    /// What the client got since the last look.
    fn out(&mut self) -> String {
        let t = text(&self.client[self.client_seen..]);
        self.client_seen = self.client.len();
        t
    }

    fn new_events(&mut self) -> Vec<Ev> {
        let e = self.events[self.events_seen..].to_vec();
        self.events_seen = self.events.len();
        e
    }

    fn new_upstream(&mut self) -> String {
        let t = text(&self.up[self.up_seen..]);
        self.up_seen = self.up.len();
        t
    }

    fn new_upstream_bytes(&mut self) -> Vec<u8> {
        let t = self.up[self.up_seen..].to_vec();
        self.up_seen = self.up.len();
        t
    }

    /// Forgets what was recorded so far.
    fn clear(&mut self) {
        self.out();
        self.new_events();
        self.new_upstream();
    }

    /// MAIL (alice), RCPT (bob), DATA → 354. Clears the record.
    fn begin(&mut self) {
        assert_eq!(self.send(MAIL_ALICE), R250);
        assert_eq!(self.send(RCPT_BOB), R250);
        assert_eq!(self.send(b"DATA\r\n"), R354);
        self.clear();
    }

    /// A whole accepted transaction of `msg`; asserts upstream got exactly it.
    fn deliver(&mut self, msg: &[u8]) {
        self.begin();
        assert_eq!(self.send(msg), QUEUED);
        let mut want = b"DATA\r\n".to_vec();
        want.extend_from_slice(msg);
        assert_eq!(self.new_upstream_bytes(), want);
        assert_eq!(self.messages.last().map(Vec::as_slice), Some(msg));
        self.clear();
    }
}

/// An implicit-TLS session after EHLO and a successful AUTH, with the record cleared.
fn authed_max(max: usize) -> Driver {
    let mut d = Driver::with_max(true, max);
    assert!(d.send(b"EHLO client.example\r\n").starts_with("250-"));
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R235);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
    d.clear();
    d
}

fn authed() -> Driver {
    authed_max(MAX)
}

/// A STARTTLS session after EHLO, STARTTLS and the handshake.
fn after_starttls() -> Driver {
    let mut d = Driver::new(false);
    assert!(d.send(b"EHLO client.example\r\n").contains("STARTTLS"));
    assert_eq!(d.send(b"STARTTLS\r\n"), R220_TLS);
    assert_eq!(d.new_events(), vec![Ev::StartTls]);
    d
}

/// A message: a header section with `from`, then `body` (CRLF-terminated lines), then
/// the end line.
fn msg(from: &str, body: &str) -> Vec<u8> {
    format!("From: {from}\r\nTo: bob@example.net\r\nSubject: test\r\n\r\n{body}.\r\n").into_bytes()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn ehlo_lines(reply: &str) -> Vec<String> {
    reply
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| {
            assert!(l.starts_with("250-") || l.starts_with("250 "), "{l:?}");
            l[4..].to_string()
        })
        .collect()
}

/// Splits turn `i` into reads.
type Chunker<'a> = &'a dyn Fn(usize, &[u8]) -> Vec<Vec<u8>>;

/// Everything a whole session produced, independent of how the input was cut.
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    client: String,
    events: Vec<Ev>,
    upstream: String,
    messages: Vec<Vec<u8>>,
}

/// Runs client turns (what the client sends before it waits for an answer) through the
/// driver, each cut into reads by `chunk`.
fn run(tls: bool, max: usize, turns: &[&[u8]], chunk: Chunker<'_>) -> Transcript {
    run_driver(Driver::raw(tls, !tls, max), turns, chunk)
}

/// [`run`] on the driver `d` (greeting not read yet).
fn run_driver(mut d: Driver, turns: &[&[u8]], chunk: Chunker<'_>) -> Transcript {
    d.pump();
    for (i, turn) in turns.iter().enumerate() {
        for c in chunk(i, turn) {
            if d.closed {
                break;
            }
            d.feed(&c);
        }
        d.finish_turn();
    }
    Transcript { client: text(&d.client), events: d.events, upstream: text(&d.kept), messages: d.messages }
}

fn whole(_: usize, b: &[u8]) -> Vec<Vec<u8>> {
    vec![b.to_vec()]
}

fn bytewise(_: usize, b: &[u8]) -> Vec<Vec<u8>> {
    b.iter().map(|x| vec![*x]).collect()
}

/// Asserts that every way of cutting the turns into reads gives the transcript of whole
/// turns: each turn cut at every position, short turns at every two positions, and
/// everything byte by byte.
fn assert_split_invariant(tls: bool, max: usize, turns: &[&[u8]]) -> Transcript {
    assert_split_invariant_with(&|| Driver::raw(tls, !tls, max), turns)
}

/// [`assert_split_invariant`] on drivers made by `new`.
fn assert_split_invariant_with(new: &dyn Fn() -> Driver, turns: &[&[u8]]) -> Transcript {
    let run = |_: bool, _: usize, turns: &[&[u8]], chunk: Chunker<'_>| run_driver(new(), turns, chunk);
    let (tls, max) = (true, MAX);
    let reference = run(tls, max, turns, &whole);
    assert_eq!(run(tls, max, turns, &bytewise), reference, "byte by byte");
    for (ti, turn) in turns.iter().enumerate() {
        for cut in 0..=turn.len() {
            let split = |i: usize, b: &[u8]| {
                if i == ti { vec![b[..cut].to_vec(), b[cut..].to_vec()] } else { vec![b.to_vec()] }
            };
            assert_eq!(run(tls, max, turns, &split), reference, "turn {ti} cut at {cut}");
        }
        if turn.len() <= 64 {
            for a in 0..=turn.len() {
                for b in a..=turn.len() {
                    let split = |i: usize, x: &[u8]| {
                        if i == ti {
                            vec![x[..a].to_vec(), x[a..b].to_vec(), x[b..].to_vec()]
                        } else {
                            vec![x.to_vec()]
                        }
                    };
                    assert_eq!(run(tls, max, turns, &split), reference, "turn {ti} cut at {a},{b}");
                }
            }
        }
    }
    reference
}

// ---------------------------------------------------------------------------------------
// Greeting, EHLO, HELO (case 7)
// ---------------------------------------------------------------------------------------

#[test]
fn greeting() {
    let mut s = Submission::new("mail.example.com", false, true, 1_000_000);
    assert!(matches!(s.next(), Next::Write(w) if w.starts_with(b"220 mail.example.com ESMTP")));
    assert!(matches!(s.next(), Next::NeedInput));
}

#[test]
fn greeting_is_the_same_on_every_listener() {
    for (tls, starttls) in [(false, true), (false, false), (true, false), (true, true)] {
        let mut d = Driver::raw(tls, starttls, MAX);
        d.pump();
        assert_eq!(d.out(), GREETING);
        assert!(d.new_events().is_empty());
    }
}

#[test]
fn ehlo_before_tls_offers_starttls_and_no_auth() {
    let mut d = Driver::new(false);
    let reply = d.send(b"EHLO client.example\r\n");
    assert!(reply.starts_with("250-mail.example.com"), "{reply}");
    assert!(reply.ends_with("\r\n"));
    let lines = ehlo_lines(&reply);
    assert!(lines.iter().any(|l| l == "STARTTLS"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.to_ascii_uppercase().starts_with("AUTH")), "AUTH before TLS: {lines:?}");
    // Only the last line has "250 ".
    assert_eq!(reply.matches("250 ").count(), 1, "{reply}");
    assert!(d.new_events().is_empty());
}

#[test]
fn ehlo_after_starttls_offers_auth_and_no_starttls() {
    let mut d = after_starttls();
    let reply = d.send(b"EHLO client.example\r\n");
    let lines = ehlo_lines(&reply);
    for want in ["AUTH PLAIN LOGIN", "SIZE 100000", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        assert!(lines.iter().any(|l| l == want), "{want} missing in {lines:?}");
    }
    assert!(!lines.iter().any(|l| l == "STARTTLS"), "STARTTLS after TLS: {lines:?}");
    assert!(!lines.iter().any(|l| l == "CHUNKING"), "{lines:?}");
}

#[test]
fn ehlo_on_implicit_tls() {
    let mut d = Driver::new(true);
    let reply = d.send(b"EHLO client.example\r\n");
    let lines = ehlo_lines(&reply);
    assert!(lines.first().is_some_and(|l| l.starts_with("mail.example.com")), "{lines:?}");
    for want in ["AUTH PLAIN LOGIN", "SIZE 100000", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        assert!(lines.iter().any(|l| l == want), "{want} missing in {lines:?}");
    }
    assert!(!lines.iter().any(|l| l == "STARTTLS"), "{lines:?}");
    // An implicit-TLS session with starttls_allowed still never offers it.
    let mut d = Driver::raw(true, true, MAX);
    d.pump();
    d.out();
    assert!(!d.send(b"EHLO x\r\n").contains("STARTTLS"));
}

#[test]
fn ehlo_on_plain_listener_without_starttls_offers_neither() {
    let mut d = Driver::raw(false, false, MAX);
    d.pump();
    d.out();
    let lines = ehlo_lines(&d.send(b"EHLO x\r\n"));
    assert!(!lines.iter().any(|l| l == "STARTTLS" || l.starts_with("AUTH")), "{lines:?}");
    assert!(lines.iter().any(|l| l == "SIZE 100000"), "{lines:?}");
}

#[test]
fn ehlo_size_reflects_max_size() {
    let mut d = Driver::with_max(true, 12_345);
    assert!(ehlo_lines(&d.send(b"EHLO x\r\n")).iter().any(|l| l == "SIZE 12345"));
}

#[test]
fn helo_works() {
    let mut d = Driver::new(false);
    assert_eq!(d.send(b"HELO client.example\r\n"), "250 mail.example.com\r\n");
    let mut d = authed();
    assert_eq!(d.send(b"HELO client.example\r\n"), "250 mail.example.com\r\n");
    assert!(d.new_events().is_empty(), "no transaction, nothing to reset");
    d.deliver(&msg("alice@example.com", "hi\r\n"));
}

#[test]
fn ehlo_without_domain_is_a_syntax_error() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"EHLO\r\n"), "501 5.5.4 Syntax: EHLO domain\r\n");
    assert_eq!(d.send(b"HELO\r\n"), "501 5.5.4 Syntax: HELO domain\r\n");
}

// ---------------------------------------------------------------------------------------
// STARTTLS (cases 2-8)
// ---------------------------------------------------------------------------------------

/// `EHLO t`, then `STARTTLS` and `injected` in one turn, then `FAKE x` inside TLS.
fn starttls_injection_turns(injected: &[u8]) -> Vec<u8> {
    let mut t = b"STARTTLS\r\n".to_vec();
    t.extend_from_slice(injected);
    t
}

fn check_starttls_injection(injected: &[u8]) {
    let mut d = Driver::new(false);
    let ehlo = d.send(b"EHLO t\r\n");
    assert!(ehlo.contains("STARTTLS"));
    d.feed(&starttls_injection_turns(injected));
    assert_eq!(d.out(), R220_TLS, "only the 220 in plaintext");
    assert_eq!(d.new_events(), vec![Ev::StartTls]);
    assert!(d.s.buf.is_empty(), "pipelined plaintext still buffered");
    d.finish_turn();
    assert_eq!(d.out(), "", "the injected command was answered inside TLS");
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(b"FAKE x\r\n"), R_UNKNOWN, "exactly one 5xx");
    // The session really is in TLS and fresh: AUTH is offered now.
    assert!(d.send(b"EHLO t\r\n").contains("AUTH PLAIN LOGIN"));
}

#[test]
fn starttls_injection_ehlo() {
    check_starttls_injection(b"EHLO injected\r\n");
}

#[test]
fn starttls_injection_rset_wietse() {
    check_starttls_injection(b"RSET\r\n");
}

#[test]
fn starttls_injection_of_auth_and_mail() {
    check_starttls_injection(format!("AUTH PLAIN {GOOD_PLAIN}\r\nMAIL FROM:<alice@example.com>\r\n").as_bytes());
    check_starttls_injection(b"AUTH PLAIN\r\n");
    check_starttls_injection(b"QUIT\r\n");
}

#[test]
fn starttls_injection_every_split() {
    for injected in [&b"EHLO injected\r\n"[..], b"RSET\r\n", b"NOOP\r\nQUIT\r\n"] {
        let second = starttls_injection_turns(injected);
        let turns: [&[u8]; 3] = [b"EHLO t\r\n", &second, b"FAKE x\r\n"];
        let t = assert_split_invariant(false, MAX, &turns);
        let ehlo = {
            let mut d = Driver::new(false);
            d.send(b"EHLO t\r\n")
        };
        assert_eq!(t.client, format!("{GREETING}{ehlo}{R220_TLS}{R_UNKNOWN}"));
        assert_eq!(t.events, vec![Ev::StartTls]);
    }
}

#[test]
fn bytes_between_starttls_and_handshake_are_dropped() {
    let mut d = Driver::new(false);
    d.send(b"EHLO t\r\n");
    d.feed(b"STARTTLS\r\n");
    assert_eq!(d.out(), R220_TLS);
    assert_eq!(d.new_events(), vec![Ev::StartTls]);
    // More plaintext before the handshake: never executed, never buffered.
    d.feed(b"NOOP\r\nAUTH PLAIN AGFsaWNlAHJpZ2h0\r\n");
    d.feed(b"HELP\r\n");
    assert!(d.s.buf.is_empty());
    assert_eq!(d.out(), "");
    d.finish_turn();
    assert_eq!(d.out(), "");
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

#[test]
fn injection_without_handshake_gets_silence() {
    // Case 3: STARTTLS + NOOP, and the client never starts TLS.
    let mut d = Driver::new(false);
    d.feed(b"STARTTLS\r\nNOOP\r\n");
    assert_eq!(d.out(), R220_TLS);
    for _ in 0..3 {
        d.feed(b"NOOP\r\n");
        assert!(matches!(d.s.next(), Next::NeedInput));
    }
    assert_eq!(d.out(), "");
    assert_eq!(d.new_events(), vec![Ev::StartTls]);
}

#[test]
fn after_starttls_the_session_starts_over() {
    // Case 6(d): no EHLO after the handshake → MAIL is refused with 503, even once
    // authenticated.
    let mut d = after_starttls();
    assert_eq!(d.send(MAIL_ALICE), R530_AUTH);
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R235);
    assert_eq!(d.send(MAIL_ALICE), "503 5.5.1 Send EHLO first\r\n");
    assert!(!d.new_events().iter().any(|e| matches!(e, Ev::Forward(_))));
    assert!(d.send(b"EHLO again\r\n").starts_with("250-"));
    assert_eq!(d.send(MAIL_ALICE), R250);
}

#[test]
fn starttls_inside_tls_is_refused() {
    let mut d = after_starttls();
    assert_eq!(d.send(b"STARTTLS\r\n"), "503 5.5.1 TLS is already active\r\n");
    d.send(b"EHLO x\r\n");
    assert_eq!(d.send(b"STARTTLS\r\n"), "503 5.5.1 TLS is already active\r\n");
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"STARTTLS\r\n"), "503 5.5.1 TLS is already active\r\n");
    let mut d = authed();
    assert_eq!(d.send(b"STARTTLS\r\n"), "503 5.5.1 TLS is already active\r\n");
    assert!(d.new_events().is_empty());
}

#[test]
fn starttls_on_a_listener_without_it_is_refused() {
    let mut d = Driver::raw(false, false, MAX);
    d.pump();
    d.out();
    assert_eq!(d.send(b"STARTTLS\r\n"), "502 5.5.1 STARTTLS is not offered here\r\n");
    assert!(d.new_events().is_empty());
}

#[test]
fn spurious_tls_started_changes_nothing() {
    let mut d = Driver::new(false);
    d.s.tls_started();
    d.pump();
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R530_TLS);
    assert!(d.send(b"EHLO x\r\n").contains("STARTTLS"));
}

#[test]
fn spurious_auth_succeeded_changes_nothing() {
    let mut d = Driver::new(true);
    d.s.auth_succeeded(vec!["alice@example.com".into()]);
    d.pump();
    assert_eq!(d.out(), "");
    d.send(b"EHLO x\r\n");
    assert_eq!(d.send(MAIL_ALICE), R530_AUTH);
    d.s.upstream_reply(250, b"250 fake\r\n");
    d.s.data_accepted();
    d.s.data_refused(b"554 fake\r\n");
    d.s.upstream_failed();
    d.s.auth_failed(AuthReply::Failed);
    d.pump();
    assert_eq!(d.out(), "", "results that nobody asked for are ignored");
}

// ---------------------------------------------------------------------------------------
// AUTH (cases 44-47)
// ---------------------------------------------------------------------------------------

#[test]
fn auth_before_tls_is_refused() {
    let mut d = Driver::new(false);
    assert!(!d.send(b"EHLO x\r\n").contains("AUTH"));
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R530_TLS);
    assert_eq!(d.send(b"AUTH LOGIN\r\n"), R530_TLS);
    assert_eq!(d.send(b"AUTH PLAIN\r\n"), R530_TLS);
    // No SASL exchange was entered: a base64 line is an unknown command.
    assert_eq!(d.send(format!("{GOOD_PLAIN}\r\n").as_bytes()), R_UNKNOWN);
    assert!(d.new_events().is_empty());
    let mut d = Driver::raw(false, false, MAX);
    d.pump();
    d.out();
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R530_TLS);
    assert!(d.new_events().is_empty());
}

#[test]
fn transaction_commands_before_auth_are_refused() {
    let mut d = Driver::new(false);
    d.send(b"EHLO x\r\n");
    for cmd in [MAIL_ALICE, RCPT_BOB, b"DATA\r\n"] {
        assert_eq!(d.send(cmd), R530_TLS);
    }
    let mut d = Driver::new(true);
    d.send(b"EHLO x\r\n");
    for cmd in [MAIL_ALICE, RCPT_BOB, b"DATA\r\n"] {
        assert_eq!(d.send(cmd), R530_AUTH);
    }
    // After a failed AUTH too.
    assert_eq!(d.send(format!("AUTH PLAIN {BAD_PLAIN}\r\n").as_bytes()), R535);
    assert_eq!(d.send(MAIL_ALICE), R530_AUTH);
    // DATA refused means no message mode: the following lines are commands.
    assert_eq!(d.send(b"From: alice@example.com\r\n"), R_UNKNOWN);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "wrong")]);
}

#[test]
fn auth_plain_with_initial_response() {
    let mut d = Driver::new(true);
    d.send(b"EHLO x\r\n");
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R235);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
    // Lower-case mechanism names work too.
    let mut d = Driver::new(true);
    assert_eq!(d.send(format!("auth plain {GOOD_PLAIN}\r\n").as_bytes()), R235);
}

#[test]
fn auth_plain_with_prompt() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH PLAIN\r\n"), "334 \r\n");
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(format!("{GOOD_PLAIN}\r\n").as_bytes()), R235);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
}

#[test]
fn auth_plain_wrong_password() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(format!("AUTH PLAIN {BAD_PLAIN}\r\n").as_bytes()), R535);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "wrong")]);
    // The session goes on.
    assert_eq!(d.send(b"NOOP\r\n"), R250);
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), R235);
}

#[test]
fn auth_plain_equals_is_an_empty_response() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH PLAIN =\r\n"), R535);
    assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Failed)]);
    assert_eq!(d.send(b"AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(d.send(b"=\r\n"), R535);
    assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Failed)]);
}

#[test]
fn auth_login_without_initial_response() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(d.send(b"YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(b"cmlnaHQ=\r\n"), R235);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
}

#[test]
fn auth_login_with_initial_response() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(d.send(b"cmlnaHQ=\r\n"), R235);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(d.send(b"d3Jvbmc=\r\n"), R535);
    assert_eq!(d.new_events(), vec![auth_ev("alice", "wrong")]);
}

#[test]
fn auth_login_bad_fields_are_refused_before_any_check() {
    // A username with a control character, an empty password, a password with NUL.
    let user_ctl = b64(b"ali\x01ce");
    for (turns, reply) in [
        (vec![format!("AUTH LOGIN {user_ctl}\r\n")], R535),
        (vec!["AUTH LOGIN\r\n".into(), format!("{user_ctl}\r\n")], R535),
        (vec!["AUTH LOGIN YWxpY2U=\r\n".into(), "=\r\n".into()], R535),
        (vec!["AUTH LOGIN YWxpY2U=\r\n".into(), format!("{}\r\n", b64(b"ri\0ght"))], R535),
        (vec!["AUTH LOGIN =\r\n".into()], R535),
    ] {
        let mut d = Driver::new(true);
        let mut got = String::new();
        for t in &turns {
            got = d.send(t.as_bytes());
        }
        assert_eq!(got, reply, "{turns:?}");
        assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Failed)], "{turns:?}");
    }
}

#[test]
fn cancel_at_every_prompt() {
    for turns in [
        &[&b"AUTH PLAIN\r\n"[..], b"*\r\n"][..],
        &[b"AUTH LOGIN\r\n", b"*\r\n"],
        &[b"AUTH LOGIN\r\n", b"YWxpY2U=\r\n", b"*\r\n"],
        &[b"AUTH LOGIN YWxpY2U=\r\n", b"*\r\n"],
    ] {
        let mut d = Driver::new(true);
        let mut got = String::new();
        for t in turns {
            got = d.send(t);
        }
        assert_eq!(got, R_CANCELLED, "{turns:?}");
        assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Aborted("5.7.0 Authentication cancelled"))]);
        // Back to commands.
        assert_eq!(d.send(b"NOOP\r\n"), R250);
    }
}

#[test]
fn invalid_base64_is_refused() {
    for turns in [
        &[&b"AUTH PLAIN !!!!\r\n"[..]][..],
        &[b"AUTH PLAIN AGFsaWNlAHJpZ2h0=\r\n"],
        &[b"AUTH PLAIN\r\n", b"!!!\r\n"],
        &[b"AUTH PLAIN\r\n", b"AGFs aWNl\r\n"],
        &[b"AUTH LOGIN\r\n", b"YWxpY2U\r\n"],
        &[b"AUTH LOGIN YWxpY2U=\r\n", b"cmln-aHQ=\r\n"],
    ] {
        let mut d = Driver::new(true);
        let mut got = String::new();
        for t in turns {
            got = d.send(t);
        }
        assert_eq!(got, R_BAD_B64, "{turns:?}");
        assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Aborted("5.5.2 Invalid base64 data"))]);
    }
}

#[test]
fn bare_line_end_in_sasl_exchange_is_refused() {
    for line in [&b"AGFsaWNlAHJpZ2h0\n"[..], b"AGFsaWNlAHJpZ2h0\r\r\n", b"AGFsaWNl\rAHJpZ2h0\r\n"] {
        let mut d = Driver::new(true);
        assert_eq!(d.send(b"AUTH PLAIN\r\n"), "334 \r\n");
        assert_eq!(d.send(line), "501 5.5.2 Invalid authentication line\r\n");
        assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Aborted("5.5.2 Invalid authentication line"))]);
    }
    // As an AUTH command line it is a bare line end in a command.
    let mut d = Driver::new(true);
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\n").as_bytes()), R_BARE_CMD);
    assert!(d.new_events().is_empty());
}

#[test]
fn authzid_other_than_authcid_is_refused() {
    let mut d = Driver::new(true);
    let ir = b64(b"victim\0alice\0right");
    assert_eq!(d.send(format!("AUTH PLAIN {ir}\r\n").as_bytes()), R535);
    assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::AuthzFailed)]);
    // The same identity twice is fine.
    let ir = b64(b"alice\0alice\0right");
    assert_eq!(d.send(format!("AUTH PLAIN {ir}\r\n").as_bytes()), R235);
}

#[test]
fn second_auth_after_success_is_refused() {
    let mut d = authed();
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), "503 5.5.1 Already authenticated\r\n");
    assert_eq!(d.send(b"AUTH LOGIN\r\n"), "503 5.5.1 Already authenticated\r\n");
    // No SASL prompt was entered.
    assert_eq!(d.send(b"YWxpY2U=\r\n"), R_UNKNOWN);
    assert!(d.new_events().is_empty());
}

#[test]
fn auth_during_transaction_is_refused() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    let reply = d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes());
    assert!(reply.starts_with("503 5.5.1 "), "{reply}");
    assert_eq!(d.new_events(), vec![fwd("MAIL FROM:<alice@example.com>\r\n")]);
    // The transaction is intact.
    assert_eq!(d.send(RCPT_BOB), R250);
}

#[test]
fn unknown_mechanisms_are_refused() {
    let mut d = Driver::new(true);
    for line in [&b"AUTH CRAM-MD5\r\n"[..], b"AUTH XOAUTH2 dXNlcj0=\r\n", b"AUTH FOO\r\n", b"AUTH SCRAM-SHA-256\r\n"] {
        assert_eq!(d.send(line), "504 5.5.4 Unrecognized authentication type\r\n", "{line:?}");
    }
    assert!(d.new_events().is_empty());
    // Not a SASL exchange afterwards.
    assert_eq!(d.send(b"*\r\n"), R_UNKNOWN);
}

#[test]
fn three_auth_failures_close() {
    let mut d = Driver::new(true);
    let bad = format!("AUTH PLAIN {BAD_PLAIN}\r\n");
    assert_eq!(d.send(bad.as_bytes()), R535);
    assert_eq!(d.send(bad.as_bytes()), R535);
    assert_eq!(d.send(bad.as_bytes()), format!("{R535}421 4.7.0 Too many authentication failures\r\n"));
    assert!(d.closed);
    assert_eq!(d.new_events().last(), Some(&Ev::Close));
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), "");
    // Cancels and refusals count too.
    let mut d = Driver::new(true);
    d.send(b"AUTH PLAIN\r\n");
    d.send(b"*\r\n");
    d.send(b"AUTH PLAIN !!!!\r\n");
    assert_eq!(d.send(b"AUTH PLAIN =\r\n"), format!("{R535}421 4.7.0 Too many authentication failures\r\n"));
    assert!(d.closed);
}

#[test]
fn pipelined_failures_after_close_are_ignored() {
    let mut d = Driver::new(true);
    let bad = format!("AUTH PLAIN {BAD_PLAIN}\r\n");
    let all = format!("{bad}{bad}{bad}AUTH PLAIN {GOOD_PLAIN}\r\nNOOP\r\n");
    let out = d.send(all.as_bytes());
    assert_eq!(out, format!("{R535}{R535}{R535}421 4.7.0 Too many authentication failures\r\n"));
    assert_eq!(
        d.new_events(),
        vec![auth_ev("alice", "wrong"), auth_ev("alice", "wrong"), auth_ev("alice", "wrong"), Ev::Close]
    );
}

/// Every refusal of a 2FA account's password answers 534 with the link: a client that
/// falls back from PLAIN to LOGIN (smtplib, many apps) shows only its last reply, which
/// was a bare 535 (issue 14).
#[test]
fn app_password_hint_on_every_refusal() {
    let mut d = Driver::new(true);
    d.verdict = Some(AuthReply::NeedsAppPassword("Create one at https://mail.example.com/app-passwords".into()));
    let hint =
        "534 5.7.9 Application-specific password required. Create one at https://mail.example.com/app-passwords\r\n";
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), hint);
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()), hint);
}

#[test]
fn app_password_hint_stays_on_one_line() {
    let mut d = Driver::new(true);
    d.verdict = Some(AuthReply::NeedsAppPassword("see\r\n235 2.7.0 fake\r\nx\u{7}".into()));
    let out = d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes());
    assert_eq!(out.matches("\r\n").count(), 1, "{out:?}");
    assert!(out.starts_with("534 5.7.9 "), "{out:?}");
    assert!(!out.contains('\u{7}'));
}

#[test]
fn unavailable_is_temporary() {
    let mut d = Driver::new(true);
    d.verdict = Some(AuthReply::Unavailable);
    assert_eq!(
        d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r\n").as_bytes()),
        "454 4.7.0 Temporary authentication failure, try again later\r\n"
    );
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

#[test]
fn auth_every_split() {
    let ir = format!("AUTH PLAIN {GOOD_PLAIN}\r\n");
    for turns in [
        vec![&b"EHLO x\r\n"[..], b"AUTH PLAIN\r\n", b"*\r\n", ir.as_bytes(), b"NOOP\r\n"],
        vec![b"AUTH LOGIN\r\n", b"YWxpY2U=\r\n", b"d3Jvbmc=\r\n", b"AUTH LOGIN YWxpY2U=\r\n", b"cmlnaHQ=\r\n"],
        vec![b"AUTH PLAIN !!!!\r\nAUTH FOO\r\n", ir.as_bytes()],
    ] {
        let t = assert_split_invariant(true, MAX, &turns);
        assert!(t.client.ends_with(R235) || t.client.ends_with(R250), "{}", t.client);
    }
}

// ---------------------------------------------------------------------------------------
// Line limits (case 46)
// ---------------------------------------------------------------------------------------

/// `NOOP x…x` of `len` octets, CRLF included.
fn noop_line(len: usize) -> Vec<u8> {
    let mut l = b"NOOP ".to_vec();
    l.resize(len - 2, b'x');
    l.extend_from_slice(b"\r\n");
    assert_eq!(l.len(), len);
    l
}

#[test]
fn command_line_of_512_octets_is_accepted() {
    let mut d = Driver::new(true);
    assert_eq!(d.send(&noop_line(MAX_LINE)), R250);
    let mut d = Driver::new(true);
    d.feed(&noop_line(MAX_LINE)[..MAX_LINE - 1]);
    assert_eq!(d.send(b"\n"), R250);
}

#[test]
fn command_line_of_513_octets_is_refused_however_it_arrives() {
    let long = noop_line(MAX_LINE + 1);
    let mut both = long.clone();
    both.extend_from_slice(b"NOOP\r\n");
    let t = assert_split_invariant(true, MAX, &[&both]);
    assert_eq!(t.client, format!("{GREETING}{R_TOO_LONG}{R250}"));
    // A long QUIT is not executed.
    let mut quit = b"QUIT ".to_vec();
    quit.resize(600, b' ');
    quit.extend_from_slice(b"\r\nNOOP\r\n");
    let t = assert_split_invariant(true, MAX, &[&quit]);
    assert_eq!(t.client, format!("{GREETING}{R_TOO_LONG}{R250}"));
    assert!(t.events.is_empty());
}

#[test]
fn over_long_line_is_discarded_until_crlf() {
    let mut d = Driver::new(true);
    let mut start = b"QUIT ".to_vec();
    start.resize(700, b'a');
    assert_eq!(d.send(&start), R_TOO_LONG);
    // The rest of that line, even if it looks like commands, is not executed.
    assert_eq!(d.send(b"bbbb\rNOOP\r"), "");
    assert_eq!(d.send(b"cccc\r\nNOOP\r\n"), R250);
    assert!(!d.closed);
}

#[test]
fn one_megabyte_without_crlf_is_bounded() {
    let mut d = Driver::new(true);
    let chunk = vec![b'z'; 4096];
    for _ in 0..256 {
        d.s.feed(&chunk);
        assert!(d.s.buf.len() <= MAX_LINE + chunk.len());
        d.pump();
        assert!(d.s.buf.len() <= MAX_LINE, "{}", d.s.buf.len());
    }
    assert_eq!(d.out(), R_TOO_LONG, "one error for one line");
    assert_eq!(d.send(b"\r\nNOOP\r\n"), R250);
    assert!(!d.closed);
}

#[test]
fn one_megabyte_auth_line_is_bounded() {
    let mut d = Driver::new(true);
    d.feed(b"AUTH PLAIN ");
    let chunk = vec![b'A'; 4096];
    for _ in 0..256 {
        d.s.feed(&chunk);
        d.pump();
        assert!(d.s.buf.len() <= MAX_AUTH_LINE, "{}", d.s.buf.len());
    }
    assert_eq!(d.out(), R_AUTH_TOO_LONG);
    assert_eq!(d.send(b"\r\nNOOP\r\n"), R250);
    assert!(d.new_events().is_empty());
    // The same at a SASL prompt.
    let mut d = Driver::new(true);
    assert_eq!(d.send(b"AUTH PLAIN\r\n"), "334 \r\n");
    for _ in 0..256 {
        d.s.feed(&chunk);
        d.pump();
        assert!(d.s.buf.len() <= MAX_AUTH_LINE, "{}", d.s.buf.len());
    }
    assert_eq!(d.out(), R_AUTH_TOO_LONG);
    assert_eq!(d.send(b"\r\nNOOP\r\n"), R250);
    assert!(d.new_events().is_empty());
}

/// `AUTH PLAIN` + spaces + the base64 of a PLAIN message, `len` octets with CRLF.
/// The message's password is far too long, so it is refused as credentials.
fn auth_line(len: usize) -> Vec<u8> {
    let payload_len = (len - 13) / 4 * 3;
    let mut plain = b"\0alice\0".to_vec();
    plain.resize(payload_len, b'p');
    let enc = b64(&plain);
    let spaces = len - 2 - "AUTH PLAIN".len() - enc.len();
    let l = format!("AUTH PLAIN{}{enc}\r\n", " ".repeat(spaces)).into_bytes();
    assert_eq!(l.len(), len);
    l
}

#[test]
fn auth_line_of_12288_octets_is_accepted() {
    let line = auth_line(MAX_AUTH_LINE);
    let mut d = Driver::new(true);
    assert_eq!(d.send(&line), R535, "refused as credentials, not as a long line");
    assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Failed)]);
    // Arriving in pieces.
    let mut d = Driver::new(true);
    for c in line.chunks(1000) {
        d.feed(c);
    }
    assert_eq!(d.out(), R535);
}

#[test]
fn auth_line_over_12288_octets_is_refused() {
    for len in [MAX_AUTH_LINE + 1, MAX_AUTH_LINE + 4, 20_000] {
        let mut line = auth_line(len);
        line.extend_from_slice(b"NOOP\r\n");
        let t = assert_split_invariant_single_cuts(true, &[&line], 997);
        assert_eq!(t.client, format!("{GREETING}{R_AUTH_TOO_LONG}{R250}"), "{len}");
        assert!(t.events.is_empty(), "{len}");
    }
}

#[test]
fn over_long_auth_line_does_not_execute_its_tail() {
    let mut line = b"AUTH PLAIN ".to_vec();
    line.resize(MAX_AUTH_LINE + 10, b'A');
    line.extend_from_slice(b"\r\nQUIT\r\n");
    // In one read the whole line is dropped; a tail after CRLF is the next command.
    let mut d = Driver::new(true);
    assert_eq!(d.send(&line), format!("{R_AUTH_TOO_LONG}221 2.0.0 mail.example.com closing connection\r\n"));
    // Its own tail ("QUIT" inside the line) is never a command.
    let mut line = b"AUTH PLAIN ".to_vec();
    line.resize(MAX_AUTH_LINE + 10, b'A');
    line.extend_from_slice(b" QUIT\r\nNOOP\r\n");
    let mut d = Driver::new(true);
    assert_eq!(d.send(&line), format!("{R_AUTH_TOO_LONG}{R250}"));
    assert!(!d.closed);
}

/// Like [`assert_split_invariant`] for long turns: every `step`-th single cut.
fn assert_split_invariant_single_cuts(tls: bool, turns: &[&[u8]], step: usize) -> Transcript {
    let reference = run(tls, MAX, turns, &whole);
    for (ti, turn) in turns.iter().enumerate() {
        let mut cuts: Vec<usize> = (0..=turn.len()).step_by(step).collect();
        // And every cut around the line ends.
        for (i, b) in turn.iter().enumerate() {
            if *b == b'\n' {
                cuts.extend(i.saturating_sub(2)..=(i + 2).min(turn.len()));
            }
        }
        for cut in cuts {
            let split = |i: usize, b: &[u8]| {
                if i == ti { vec![b[..cut].to_vec(), b[cut..].to_vec()] } else { vec![b.to_vec()] }
            };
            assert_eq!(run(tls, MAX, turns, &split), reference, "turn {ti} cut at {cut}");
        }
    }
    reference
}

#[test]
fn sasl_response_line_limit() {
    // 12,286 base64 characters + CRLF: not too long, but not valid base64 either.
    let mut d = Driver::new(true);
    d.send(b"AUTH PLAIN\r\n");
    let mut l = vec![b'A'; MAX_AUTH_LINE - 2];
    l.extend_from_slice(b"\r\n");
    assert_eq!(d.send(&l), R_BAD_B64);
    // 12,284 valid base64 characters: a PLAIN message refused as credentials.
    let mut d = Driver::new(true);
    d.send(b"AUTH PLAIN\r\n");
    let mut plain = b"\0alice\0".to_vec();
    plain.resize((MAX_AUTH_LINE - 4) / 4 * 3, b'p');
    let l = format!("{}\r\n", b64(&plain));
    assert_eq!(l.len(), MAX_AUTH_LINE - 2);
    assert_eq!(d.send(l.as_bytes()), R535);
}

#[test]
fn sasl_response_over_limit_in_pieces_resyncs() {
    let mut d = Driver::new(true);
    d.send(b"AUTH PLAIN\r\n");
    d.feed(&vec![b'A'; MAX_AUTH_LINE + 1]);
    assert_eq!(d.out(), R_AUTH_TOO_LONG);
    assert_eq!(d.send(b"AAAA QUIT\r\nNOOP\r\n"), R250);
    assert!(d.new_events().is_empty());
    assert!(!d.closed);
}

#[test]
fn sasl_response_over_limit_in_one_read_resyncs() {
    let mut d = Driver::new(true);
    d.send(b"AUTH PLAIN\r\n");
    let mut l = vec![b'A'; MAX_AUTH_LINE + 1];
    l.extend_from_slice(b"\r\n");
    assert_eq!(d.send(&l), R_AUTH_TOO_LONG);
    // The client got its error and goes on; the next command must be answered.
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

// ---------------------------------------------------------------------------------------
// Bare CR / LF in commands (case 49), error budget (case 50)
// ---------------------------------------------------------------------------------------

#[test]
fn bare_lf_or_cr_in_command_is_refused_and_not_executed() {
    for line in [
        &b"QUIT\n"[..],
        b"QU\rIT\r\n",
        b"QUIT\r\r\n",
        b"QUIT\rNOOP\r\n",
        b"\n",
        b"\r\r\n",
        b"STARTTLS\n",
        b"EHLO x\n",
        b"HELP\n",
    ] {
        for tls in [false, true] {
            let mut d = Driver::new(tls);
            assert_eq!(d.send(line), R_BARE_CMD, "{line:?}");
            assert!(d.new_events().is_empty(), "{line:?}");
            assert!(!d.closed);
            assert_eq!(d.send(b"NOOP\r\n"), R250, "{line:?}");
        }
    }
    let mut d = Driver::new(true);
    assert_eq!(d.send(format!("AUTH PLAIN {GOOD_PLAIN}\r").as_bytes()), "");
    assert_eq!(d.send(b"\rNOOP\r\n"), R_BARE_CMD);
    assert!(d.new_events().is_empty());
}

#[test]
fn bare_lf_after_auth_is_refused_and_not_forwarded() {
    let mut d = authed();
    assert_eq!(d.send(b"MAIL FROM:<alice@example.com>\n"), R_BARE_CMD);
    assert_eq!(d.send(b"RSET\n"), R_BARE_CMD);
    assert!(d.new_events().is_empty());
    assert_eq!(d.new_upstream(), "");
}

#[test]
fn bare_line_ends_every_split() {
    let t = assert_split_invariant(false, MAX, &[b"EHLO x\nSTARTTLS\n", b"STARTTLS\r\rNOOP\r\n", b"NOOP\r\n"]);
    assert_eq!(t.client, format!("{GREETING}{R_BARE_CMD}{R_BARE_CMD}{R_BARE_CMD}{R250}"));
    assert!(t.events.is_empty());
}

#[test]
fn twenty_errors_close() {
    let mut d = Driver::new(true);
    for _ in 0..MAX_ERRORS - 1 {
        assert_eq!(d.send(b"XFOO\r\n"), R_UNKNOWN);
    }
    assert_eq!(d.send(b"XFOO\r\n"), format!("{R_UNKNOWN}{TOO_MANY_ERRORS}"));
    assert!(d.closed);
    assert_eq!(d.send(b"NOOP\r\n"), "");
}

#[test]
fn errors_of_all_kinds_count_and_pipelined_rest_is_ignored() {
    let mut d = Driver::new(false);
    let mut all = Vec::new();
    for i in 0..30 {
        all.extend_from_slice(match i % 5 {
            0 => &b"XFOO\r\n"[..],
            1 => b"NOOP\n",
            2 => b"AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n",
            3 => b"MAIL FROM:<alice@example.com>\r\n",
            _ => b"BDAT 1 LAST\r\n",
        });
    }
    let out = d.send(&all);
    assert!(out.ends_with(TOO_MANY_ERRORS), "{out}");
    assert_eq!(out.matches("\r\n").count(), MAX_ERRORS as usize + 1, "{out}");
    assert!(d.closed);
}

#[test]
fn valid_commands_do_not_count_as_errors() {
    let mut d = authed();
    for _ in 0..30 {
        assert_eq!(d.send(b"NOOP\r\n"), R250);
        // Upstream refusals are relayed, not counted.
        assert_eq!(d.send(MAIL_ALICE), R250);
        assert_eq!(d.send(b"RCPT TO:<bad@example.net>\r\n"), NO_SUCH_USER);
        assert_eq!(d.send(b"RSET\r\n"), R250);
    }
    assert!(!d.closed);
}

#[test]
fn commands_before_auth_are_capped() {
    let mut d = Driver::new(true);
    for _ in 0..MAX_COMMANDS_PREAUTH {
        assert_eq!(d.send(b"NOOP\r\n"), R250);
    }
    assert_eq!(d.send(b"NOOP\r\n"), "421 4.7.0 Too many commands without authentication\r\n");
    assert!(d.closed);
    // After authentication there is no such cap.
    let mut d = authed();
    for _ in 0..MAX_COMMANDS_PREAUTH + 10 {
        assert_eq!(d.send(b"NOOP\r\n"), R250);
    }
}

// ---------------------------------------------------------------------------------------
// The mail transaction (case 47, §G)
// ---------------------------------------------------------------------------------------

#[test]
fn mail_from_own_address_is_forwarded_verbatim() {
    for line in [
        &b"MAIL FROM:<alice@example.com>\r\n"[..],
        b"MAIL FROM:<alias@example.org>\r\n",
        b"MAIL FROM:<ALICE@Example.COM>\r\n",
        b"mail from:<Alias@EXAMPLE.org>\r\n",
        b"MAIL FROM: <alice@example.com>\r\n",
        b"MAIL FROM:<alice@example.com> SIZE=1000 BODY=8BITMIME\r\n",
        b"MAIL FROM:<alice@example.com> BODY=8BITMIME SMTPUTF8\r\n",
        b"MAIL FROM:<alice@example.com> SIZE=100000\r\n",
    ] {
        let mut d = authed();
        assert_eq!(d.send(line), R250, "{line:?}");
        assert_eq!(d.new_upstream_bytes(), line);
        assert_eq!(d.new_events(), vec![Ev::Forward(text(line))]);
    }
}

#[test]
fn mail_from_other_sender_is_refused_naming_it() {
    for (line, shown) in [
        (&b"MAIL FROM:<evil@example.net>\r\n"[..], "evil@example.net"),
        (&b"MAIL FROM:<>\r\n"[..], "<>"),
        (&b"MAIL FROM:<alice@example.com.evil.net>\r\n"[..], "alice@example.com.evil.net"),
        (&b"MAIL FROM:<xalice@example.com>\r\n"[..], "xalice@example.com"),
        (&b"MAIL FROM:<\"alice@example.com\"@evil.net>\r\n"[..], "alice@example.com@evil.net"),
    ] {
        let mut d = authed();
        assert_eq!(
            d.send(line),
            format!("553 5.7.1 Sender address {shown} is not one of your addresses\r\n"),
            "{line:?}"
        );
        assert!(d.new_events().is_empty());
        assert_eq!(d.new_upstream(), "");
        // No transaction: RCPT needs MAIL.
        assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    }
}

/// Issue 13, item 7: `AUTH=<someone>` would become Postfix's `sasl_sender`. The parameter
/// is dropped; every other byte of the line goes upstream as the client sent it.
#[test]
fn mail_auth_parameter_is_dropped_and_the_rest_forwarded_as_sent() {
    for (line, forwarded) in [
        ("MAIL FROM:<alice@example.com> AUTH=<ceo@example.com>\r\n", "MAIL FROM:<alice@example.com>\r\n"),
        ("MAIL FROM:<alice@example.com> AUTH=ceo@example.com\r\n", "MAIL FROM:<alice@example.com>\r\n"),
        ("MAIL FROM:<alice@example.com> AUTH=alice@example.com\r\n", "MAIL FROM:<alice@example.com>\r\n"),
        (
            "MAIL FROM:<alice@example.com> SIZE=1000 AUTH=ceo+40example.com BODY=8BITMIME\r\n",
            "MAIL FROM:<alice@example.com> SIZE=1000 BODY=8BITMIME\r\n",
        ),
        ("mail from: <Alice@Example.com>  auth=<>  SIZE=10 \r\n", "mail from: <Alice@Example.com>  SIZE=10 \r\n"),
        ("MAIL FROM:<alias@example.org> AUTH=<> SMTPUTF8\r\n", "MAIL FROM:<alias@example.org> SMTPUTF8\r\n"),
    ] {
        let mut d = authed();
        assert_eq!(d.send(line.as_bytes()), R250, "{line:?}");
        assert_eq!(d.new_upstream(), forwarded, "{line:?}");
        assert_eq!(d.new_events(), vec![fwd(forwarded)]);
        // The transaction goes on as usual.
        assert_eq!(d.send(RCPT_BOB), R250);
    }
    // A line whose parameters read differently once AUTH= is gone is refused, not forwarded.
    let mut d = authed();
    assert_eq!(
        d.send(b"MAIL FROM:<alice@example.com> AUTH=<ceo@example.com>\tSIZE=5\r\n"),
        "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"
    );
    assert!(d.new_events().is_empty());
    assert_eq!(d.new_upstream(), "");
}

#[test]
fn without_auth_param_keeps_everything_else() {
    for (line, want) in [
        (&b"MAIL FROM:<a@b.example> AUTH=<x@y.example>"[..], &b"MAIL FROM:<a@b.example>"[..]),
        (b"MAIL FROM:<a@b.example> BODY=8BITMIME AUTH=<> SIZE=5", b"MAIL FROM:<a@b.example> BODY=8BITMIME SIZE=5"),
        // A quoted local part may hold " AUTH=" and ">": only the parameter goes.
        (
            b"MAIL FROM:<\"x> AUTH=<y>\"@b.example> AUTH=<ceo@example.com> SIZE=5",
            b"MAIL FROM:<\"x> AUTH=<y>\"@b.example> SIZE=5",
        ),
        (b"MAIL FROM:<a@b.example>", b"MAIL FROM:<a@b.example>"),
    ] {
        assert_eq!(without_auth_param(line).as_deref(), Ok(want), "{}", text(line));
    }
    assert_eq!(without_auth_param(b"MAIL FROM:a@b.example AUTH=x"), Err(MailParamError::NoPath));
    assert_eq!(without_auth_param(b"MAIL FROM:<a@b.example AUTH=x"), Err(MailParamError::NoPath));
    // Whatever does not parse as the same command minus AUTH= is not forwarded.
    assert_eq!(without_auth_param(b"MAIL FROM:a@b.example AUTH=<>"), Err(MailParamError::Changed));
    assert_eq!(without_auth_param(b"MAIL FROM:<a@b.example AUTH=<>"), Err(MailParamError::Changed));
    // smtp-proto reads "<x>\tSIZE=5" as the AUTH= value, a server splitting at the tab reads
    // SIZE=5: such a line is refused, not forwarded with either meaning.
    assert_eq!(without_auth_param(b"MAIL FROM:<a@b.example> AUTH=<x>\tSIZE=5"), Err(MailParamError::Changed));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(512), .. ProptestConfig::default() })]

    /// Any mix of parameters and spaces: every AUTH= goes, everything else stays byte for
    /// byte. (Tabs: see `without_auth_param_keeps_everything_else`.)
    #[test]
    fn prop_without_auth_param_removes_only_auth(
        params in prop::collection::vec(
            (
                prop::sample::select(vec![" ", "  ", " ", "   "]),
                prop::sample::select(vec![
                    "SIZE=100", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=abc",
                    "AUTH=<ceo@example.com>", "auth=<>", "AUTH=ceo+40example.com",
                ]),
            ),
            0..6,
        ),
        trailing in prop::sample::select(vec!["", " "]),
    ) {
        let mut line = b"MAIL FROM:<alice@example.com>".to_vec();
        let mut want = line.clone();
        // Blanks before a run of AUTH= parameters go to the parameter after the run.
        let mut before_auth: Option<&str> = None;
        for (blank, p) in &params {
            line.extend_from_slice(format!("{blank}{p}").as_bytes());
            if p.to_ascii_uppercase().starts_with("AUTH=") {
                before_auth = before_auth.or(Some(blank));
            } else {
                want.extend_from_slice(format!("{}{p}", before_auth.take().unwrap_or(blank)).as_bytes());
            }
        }
        line.extend_from_slice(trailing.as_bytes());
        want.extend_from_slice(trailing.as_bytes());
        // Lines smtp-proto refuses never get here; for the rest the answer is exact.
        let mut parsed = line.clone();
        parsed.extend_from_slice(b"\r\n");
        if let Ok(Request::Mail { .. }) = Request::parse(&mut parsed.iter()) {
            match without_auth_param(&line) {
                Ok(out) => prop_assert_eq!(text(&out), text(&want)),
                Err(e) => prop_assert!(false, "{}: {e}", text(&line)),
            }
        }
    }
}

#[test]
fn mail_from_size_over_limit_is_refused() {
    let mut d = authed();
    assert_eq!(
        d.send(b"MAIL FROM:<alice@example.com> SIZE=100001\r\n"),
        "552 5.3.4 Message size exceeds the limit of 100000 bytes\r\n"
    );
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
}

#[test]
fn mail_from_huge_size_is_refused() {
    let mut d = authed();
    assert_eq!(
        d.send(b"MAIL FROM:<alice@example.com> SIZE=99999999999999999999999\r\n"),
        "552 5.3.4 Message size exceeds the limit of 100000 bytes\r\n"
    );
    assert!(d.new_events().is_empty());
}

#[test]
fn mail_from_huge_size_still_meets_the_data_limit() {
    // Whatever SIZE= claims, the octets themselves are counted.
    let mut d = authed_max(1000);
    assert_eq!(d.send(b"MAIL FROM:<alice@example.com> SIZE=10\r\n"), R250);
    assert_eq!(d.send(RCPT_BOB), R250);
    assert_eq!(d.send(b"DATA\r\n"), R354);
    d.clear();
    d.feed(b"From: alice@example.com\r\n\r\n");
    d.feed(format!("{}\r\n", "b".repeat(2000)).as_bytes());
    assert_eq!(d.send(b".\r\n"), too_big(1000));
    assert!(d.messages.is_empty());
}

#[test]
fn mail_syntax_errors_are_local() {
    let mut d = authed();
    assert_eq!(
        d.send(b"MAIL FROM:alice@example.com\r\n"),
        "501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]\r\n"
    );
    assert_eq!(d.send(b"MAIL FROM:<alice@example.com> FOO=bar\r\n"), "555 5.5.4 Unsupported parameter\r\n");
    assert_eq!(d.send(b"MAIL FROM:<ali\\ce@example.com>\r\n"), "501 5.1.7 Invalid sender address\r\n");
    assert!(d.new_events().is_empty());
}

#[test]
fn nested_mail_is_refused() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(MAIL_ALICE), "503 5.5.1 Nested MAIL command\r\n");
    assert_eq!(d.new_events(), vec![fwd("MAIL FROM:<alice@example.com>\r\n")]);
}

#[test]
fn rcpt_before_mail_is_refused() {
    let mut d = authed();
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    assert_eq!(d.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    assert!(d.new_events().is_empty());
}

#[test]
fn rcpt_is_forwarded_and_upstream_reply_relayed_verbatim() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(b"RCPT TO:<bad@example.net>\r\n"), NO_SUCH_USER);
    assert_eq!(d.send(b"RCPT TO:<multi@example.net> NOTIFY=NEVER\r\n"), "250-first line\r\n250 2.1.5 second line\r\n");
    assert_eq!(d.send(b"RCPT TO:<\"\">\r\n"), R250);
    assert_eq!(
        d.new_upstream(),
        "MAIL FROM:<alice@example.com>\r\nRCPT TO:<bad@example.net>\r\nRCPT TO:<multi@example.net> NOTIFY=NEVER\r\nRCPT TO:<\"\">\r\n"
    );
}

#[test]
fn data_without_accepted_recipient_is_refused() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(b"DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
    assert_eq!(d.send(b"RCPT TO:<bad@example.net>\r\n"), NO_SUCH_USER);
    assert_eq!(d.send(b"DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
    // Not in message mode: this line is a command.
    assert_eq!(d.send(b"From: alice@example.com\r\n"), R_UNKNOWN);
    assert!(!d.new_events().iter().any(|e| matches!(e, Ev::StartData { .. })));
    assert!(!d.new_upstream().contains("DATA"));
}

#[test]
fn data_is_answered_here_and_nothing_goes_upstream_before_the_header_is_checked() {
    let mut d = authed();
    d.begin();
    d.feed(b"From: alice@example.com\r\nTo: bob@example.net\r\n");
    d.feed(b"Subject: hello\r\n");
    assert_eq!(d.out(), "");
    assert!(d.new_events().is_empty());
    assert_eq!(d.new_upstream(), "");
    d.feed(b"\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }]);
    assert_eq!(d.new_upstream(), "DATA\r\nFrom: alice@example.com\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\n");
    d.feed(b"body\r\n");
    assert_eq!(d.new_upstream(), "body\r\n");
    assert_eq!(d.send(b".\r\n"), QUEUED);
    assert_eq!(d.new_upstream(), ".\r\n");
    assert_eq!(d.new_events(), vec![Ev::EndData]);
}

// ---------------------------------------------------------------------------------------
// Sender policy on the header section
// ---------------------------------------------------------------------------------------

/// A refused message: the reply names the problem, nothing of the message reaches
/// upstream, a silent RSET is forwarded, and the session goes on.
fn assert_refused(header: &str, reply: &str) {
    let mut d = authed();
    d.begin();
    let message = format!("{header}\r\n\r\nbody line\r\n.\r\n");
    assert_eq!(d.send(message.as_bytes()), format!("{reply}\r\n"), "{header:?}");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")], "{header:?}");
    assert_eq!(d.new_upstream(), "RSET\r\n", "{header:?}");
    assert!(d.messages.is_empty());
    // The transaction is gone here too.
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    d.deliver(&msg("alice@example.com", "second try\r\n"));
    // Same, as a message without a body.
    let mut d = authed();
    d.begin();
    assert_eq!(d.send(format!("{header}\r\n.\r\n").as_bytes()), format!("{reply}\r\n"), "{header:?} (no body)");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert_eq!(d.new_upstream(), "RSET\r\n");
    d.deliver(&msg("alice@example.com", ""));
}

fn assert_accepted(header: &str) {
    let mut d = authed();
    let m = format!("{header}\r\n\r\nbody\r\n.\r\n");
    d.deliver(m.as_bytes());
}

const ADDRESS_LIKE_AT: &str = "the display name contains \"@\" (address-like text)";
const MULTIPLE: &str = "it has more than one address";
const GROUP: &str = "group syntax (':') is not accepted; send one address";

fn ambiguous(name: &str, why: &str) -> String {
    format!("550 5.7.1 The {name}: header is ambiguous: {why}")
}

#[test]
fn header_policy_refusals() {
    let forged = |name: &str, a: &str| format!("550 5.7.1 {name}: address {a} is not one of your addresses");
    let cases: Vec<(&str, String)> = vec![
        ("To: bob@example.net\r\nSubject: x", "550 5.7.1 The message has no From: header".into()),
        (
            "From: alice@example.com\r\nFrom: alice@example.com",
            "550 5.7.1 The message has more than one From: header".into(),
        ),
        ("From: evil@example.net", forged("From", "evil@example.net")),
        ("From: Alice <evil@example.net>", forged("From", "evil@example.net")),
        ("From: \"alice@example.com\" <evil@example.net>", ambiguous("From", ADDRESS_LIKE_AT)),
        ("From: alice@example.com <evil@example.net>", ambiguous("From", ADDRESS_LIKE_AT)),
        ("From: =?utf-8?q?alice=40example=2Ecom?= <evil@example.net>", ambiguous("From", ADDRESS_LIKE_AT)),
        ("From: =?utf-8?b?QWxpY2U=?= <evil@example.net>", forged("From", "evil@example.net")),
        ("From: alice@example.com, evil@example.net", ambiguous("From", MULTIPLE)),
        ("From: alice@example.com,\r\n evil@example.net", ambiguous("From", MULTIPLE)),
        ("From: team: alice@example.com, evil@example.net;", ambiguous("From", GROUP)),
        ("From: undisclosed-recipients:;", ambiguous("From", GROUP)),
        // One mailbox only, even if every one is the account's (issue 13, item 3).
        ("From: alice@example.com, Alias <alias@example.org>", ambiguous("From", MULTIPLE)),
        ("From: team: alice@example.com, alias@example.org;", ambiguous("From", GROUP)),
        ("From: alice@example.com (a comment)", ambiguous("From", "comments in parentheses are not accepted")),
        ("From: Alice", "550 5.7.1 The From: header has no address".into()),
        ("From: <>", "550 5.7.1 The From: header has no address".into()),
        ("From:", "550 5.7.1 The From: header has no address".into()),
        ("from: evil@example.net", forged("From", "evil@example.net")),
        ("FROM : evil@example.net", forged("From", "evil@example.net")),
        ("From: alice@example.com\r\nSender: evil@example.net", forged("Sender", "evil@example.net")),
        (
            "From: alice@example.com\r\nSender: alice@example.com\r\nSender: alias@example.org",
            "550 5.7.1 The message has more than one Sender: header".into(),
        ),
        ("Sender: alice@example.com", "550 5.7.1 The message has no From: header".into()),
        // Dot-stuffed header lines are what upstream sees after un-stuffing.
        (".From: evil@example.net", forged("From", "evil@example.net")),
        (
            "From: alice@example.com\r\n.From: evil@example.net",
            "550 5.7.1 The message has more than one From: header".into(),
        ),
        ("From: alice@example.com\r\n.Sender: evil@example.net", forged("Sender", "evil@example.net")),
        // A line that is neither a field nor a continuation is refused outright (readers
        // differ on where such a line ends the header section), as are control characters.
        (
            "From: alice@example.com\r\nnot a header\r\nFrom: evil@example.net",
            "550 5.6.0 The message has a malformed header line".into(),
        ),
        (
            "From: alice@example.com\r\n\0From: evil@example.net",
            "550 5.6.0 The message headers contain control characters".into(),
        ),
        (
            "From: alice@example.com\r\n\x0c\r\nFrom: evil@example.net",
            "550 5.6.0 The message headers contain control characters".into(),
        ),
        ("Subject: x\r\n\tcontinued\r\nFrom: evil@example.net", forged("From", "evil@example.net")),
        // The name shown is printable and on one line.
        ("From: <evil\u{1}@example.net>", "550 5.6.0 The message headers contain control characters".into()),
    ];
    for (header, reply) in &cases {
        assert_refused(header, reply);
    }
}

#[test]
fn header_policy_accepts_own_addresses() {
    for header in [
        "From: alice@example.com",
        "From: Alice <ALICE@Example.COM>",
        "From: alias@example.org",
        "From: \"Alice A.\" <alias@example.org>",
        "From: =?utf-8?q?Al=C3=AFce?= <alice@example.com>",
        "From: alice@example.com\r\nSender: alias@example.org",
        "From: alice@example.com\r\nSender: \"Last, First\" <alias@example.org>",
        "from: alice@example.com",
        "Subject: x\r\nFrom:\r\n alice@example.com\r\nTo: bob@example.net",
        "From: <alice@example.com>",
        "From: \"Last, First\" <alice@example.com>",
        "From: \"alice@example.com\" <alice@example.com>",
        "From: Alice A. Smith\r\n <alice@example.com>",
        "From: J\u{f6}rg M\u{fc}ller <alice@example.com>",
        "Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: alice@example.com",
    ] {
        assert_accepted(header);
    }
}

/// Issue 13, item 3: logged in as alice, these From: fields read as alice to mail-parser
/// (the old check) but as ceo to Dovecot's ENVELOPE and (three of them) to Python. Each is
/// refused at the end of DATA, saying why, and nothing reaches upstream.
#[test]
fn issue_13_from_fields_that_readers_split_on_are_refused_at_the_end_of_data() {
    for (header, why) in [
        ("From: ceo@example.com <alice@example.com>", ADDRESS_LIKE_AT),
        (
            "From: =?utf-8?q?<ceo@example.com>?= <alice@example.com>",
            "the display name contains \"<\" (address-like text)",
        ),
        ("From: ceo@example.com:alice@example.com", GROUP),
        ("From: <ceo@example.com>: alice@example.com;", GROUP),
    ] {
        assert_refused(header, &ambiguous("From", why));
        // The same in Sender:, with a good From:.
        let sender = header.replacen("From:", "Sender:", 1);
        assert_refused(&format!("From: alice@example.com\r\n{sender}"), &ambiguous("Sender", why));
    }
}

/// Every entry of the committed corpus (src/proto/from_header_corpus.txt) through the
/// session: accepted ones reach upstream byte for byte, refused ones get a 550 5.7.1 that
/// names the From: header, and nothing of them reaches upstream.
#[test]
fn from_corpus_through_the_session() {
    let mut d = authed();
    for e in crate::proto::from_header::corpus() {
        let mut m = b"From:".to_vec();
        m.extend_from_slice(&e.value);
        m.extend_from_slice(b"\r\nTo: bob@example.net\r\nSubject: corpus\r\n\r\nbody\r\n.\r\n");
        if e.accept {
            d.deliver(&m);
        } else {
            d.begin();
            let reply = d.send(&m);
            assert!(
                reply.starts_with("550 5.7.1 The From: header is ambiguous: ")
                    || reply == "550 5.7.1 The From: header has no address\r\n",
                "line {}: {reply:?}",
                e.line
            );
            assert_eq!(d.new_upstream(), "RSET\r\n", "line {}", e.line);
            d.clear();
        }
    }
}

#[test]
fn header_section_too_big_is_refused_without_data() {
    let mut d = authed_max(10_000_000);
    d.begin();
    let mut big = b"From: alice@example.com\r\n".to_vec();
    while big.len() <= MAX_HEADER + 100 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    for c in big.chunks(4096) {
        d.s.feed(c);
        d.pump();
        assert!(d.s.buf.len() <= MAX_HEADER, "{}", d.s.buf.len());
    }
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(b"\r\nbody\r\n.\r\n"), "552 5.3.4 Header section too big to check the sender\r\n");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert_eq!(d.new_upstream(), "RSET\r\n");
    d.deliver(&msg("alice@example.com", "x\r\n"));
}

#[test]
fn header_section_too_big_in_one_read_is_refused() {
    let mut big = b"From: alice@example.com\r\n".to_vec();
    while big.len() <= MAX_HEADER + 100 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.extend_from_slice(b"\r\nbody\r\n.\r\n");
    let mut d = authed_max(10_000_000);
    d.begin();
    assert_eq!(d.send(&big), "552 5.3.4 Header section too big to check the sender\r\n");
    assert!(!d.new_events().iter().any(|e| matches!(e, Ev::StartData { .. })));
}

// ---------------------------------------------------------------------------------------
// Accepted messages: transparency and streaming
// ---------------------------------------------------------------------------------------

fn rich_message() -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\
                  Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        .to_vec();
    m.extend_from_slice(b"Hello\r\n..x\r\n...\r\n..\r\n.\tdot\r\ncaf\xc3\xa9 \xff\xfe\x80\r\n\r\n");
    m.extend(std::iter::repeat_n(b'y', 5000));
    m.extend_from_slice(b"\r\n\0nul\r\nlast line\r\n.\r\n");
    m
}

#[test]
fn accepted_message_reaches_upstream_byte_for_byte() {
    let mut d = authed();
    let m = rich_message();
    d.begin();
    assert_eq!(d.send(&m), QUEUED);
    let mut want = b"DATA\r\n".to_vec();
    want.extend_from_slice(&m);
    assert_eq!(d.new_upstream_bytes(), want);
    assert_eq!(d.messages, vec![m]);
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::EndData]);
}

#[test]
fn message_without_body_is_sent_complete() {
    let mut d = authed();
    d.begin();
    let m = b"From: alice@example.com\r\nSubject: no body\r\n.\r\n";
    assert_eq!(d.send(m), QUEUED);
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: true }]);
    let mut want = b"DATA\r\n".to_vec();
    want.extend_from_slice(m);
    assert_eq!(d.new_upstream_bytes(), want);
    // Empty body after the blank line: head, then the end line as EndData.
    let mut d = authed();
    d.begin();
    assert_eq!(d.send(b"From: alice@example.com\r\n\r\n.\r\n"), QUEUED);
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::EndData]);
}

#[test]
fn final_reply_of_upstream_goes_back_to_the_client() {
    let mut d = authed();
    d.end_reply = (554, "554-5.7.1 rejected\r\n554 5.7.1 as spam\r\n".into());
    d.begin();
    assert_eq!(d.send(&msg("alice@example.com", "x\r\n")), "554-5.7.1 rejected\r\n554 5.7.1 as spam\r\n");
    // The transaction is over either way.
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    d.end_reply = (451, "451 4.3.0 later\r\n".into());
    d.begin();
    assert_eq!(d.send(b"From: alice@example.com\r\n.\r\n"), "451 4.3.0 later\r\n");
    assert_eq!(d.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
}

#[test]
fn upstream_refusing_data_is_relayed_after_the_message() {
    let mut d = authed();
    d.data_reply = Some("554 5.5.1 Error: no valid recipients\r\n".into());
    d.begin();
    d.feed(b"From: alice@example.com\r\n\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }]);
    assert_eq!(d.new_upstream(), "DATA\r\n", "no head after a refused DATA");
    assert_eq!(d.out(), "");
    assert_eq!(d.send(b"body\r\n.\r\n"), "554 5.5.1 Error: no valid recipients\r\n");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    // Complete message.
    d.begin();
    assert_eq!(d.send(b"From: alice@example.com\r\n.\r\n"), "554 5.5.1 Error: no valid recipients\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: true }, fwd("RSET\r\n")]);
    d.data_reply = None;
    d.deliver(&msg("alice@example.com", "ok\r\n"));
}

fn session_turns(m: &[u8]) -> Vec<Vec<u8>> {
    vec![
        b"EHLO client\r\n".to_vec(),
        format!("AUTH PLAIN {GOOD_PLAIN}\r\n").into_bytes(),
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec(),
        m.to_vec(),
        b"QUIT\r\n".to_vec(),
    ]
}

#[test]
fn message_every_split_gives_the_same_upstream_bytes() {
    let m = msg("alice@example.com", "Hello\r\n..x\r\ncafé\r\n\r\n..\r\n...\r\nend\r\n");
    let turns = session_turns(&m);
    let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
    let t = assert_split_invariant(true, MAX, &refs);
    assert_eq!(t.messages, vec![m.clone()]);
    assert!(t.client.ends_with(&format!("{R354}{QUEUED}221 2.0.0 mail.example.com closing connection\r\n")));
    // Headers only.
    let m = b"From: alice@example.com\r\nSubject: x\r\n.\r\n".to_vec();
    let turns = session_turns(&m);
    let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
    let t = assert_split_invariant(true, MAX, &refs);
    assert_eq!(t.messages, vec![m]);
}

#[test]
fn refused_message_every_split() {
    let m = msg("evil@example.net", "Hello\r\n.x\r\n");
    let turns = session_turns(&m);
    let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
    let t = assert_split_invariant(true, MAX, &refs);
    assert!(t.messages.is_empty());
    assert!(!t.upstream.contains("DATA"));
    assert!(t.client.contains("550 5.7.1 From: address evil@example.net"));
}

#[test]
fn streaming_five_megabytes_buffers_no_more_than_one_read() {
    let mut d = authed_max(10 * 1024 * 1024);
    d.begin();
    let mut m = b"From: alice@example.com\r\nSubject: big\r\n\r\n".to_vec();
    let mut line = 0u32;
    while m.len() < 5 * 1024 * 1024 {
        m.extend_from_slice(format!("{line:08} ").as_bytes());
        m.extend(std::iter::repeat_n(b'z', 990));
        m.extend_from_slice(b"\r\n");
        line += 1;
    }
    m.extend_from_slice(b".\r\n");
    const READ: usize = 16 * 1024;
    for c in m.chunks(READ) {
        d.s.feed(c);
        assert!(d.s.buf.len() <= READ, "{}", d.s.buf.len());
        d.pump();
        assert!(d.s.buf.len() <= READ, "{}", d.s.buf.len());
    }
    assert_eq!(d.out(), QUEUED);
    assert!(d.largest_chunk <= READ, "{}", d.largest_chunk);
    assert_eq!(d.messages, vec![m]);
}

// ---------------------------------------------------------------------------------------
// Size
// ---------------------------------------------------------------------------------------

fn too_big(max: usize) -> String {
    format!("552 5.3.4 Message size exceeds the limit of {max} bytes\r\n")
}

#[test]
fn message_over_size_while_streaming_is_aborted() {
    let mut d = authed_max(1000);
    d.begin();
    d.feed(b"From: alice@example.com\r\n\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }]);
    let body = format!("{}\r\n", "b".repeat(2000));
    d.feed(body.as_bytes());
    assert_eq!(d.new_events(), vec![Ev::Abort]);
    assert_eq!(d.out(), "");
    d.feed(b"more\r\n");
    assert_eq!(d.send(b".\r\n"), too_big(1000));
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert!(d.messages.is_empty());
    // The session continues (a new upstream connection is opened).
    d.deliver(&msg("alice@example.com", "small\r\n"));
}

#[test]
fn message_over_size_in_the_header_sends_no_data() {
    let mut d = authed_max(200);
    d.begin();
    let m = msg("alice@example.com", "");
    let header = format!("From: alice@example.com\r\nX-Long: {}\r\n\r\nbody\r\n", "h".repeat(300));
    d.feed(header.as_bytes());
    assert!(d.new_events().is_empty());
    assert_eq!(d.send(b".\r\n"), too_big(200));
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert_eq!(d.new_upstream(), "RSET\r\n");
    d.deliver(&m);
}

#[test]
fn message_over_size_in_one_read_with_its_header() {
    // Header, over-long body and end line in one read: the header ends first.
    let mut d = authed_max(1000);
    d.begin();
    d.feed(format!("From: alice@example.com\r\n\r\n{}\r\n", "b".repeat(2000)).as_bytes());
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::Abort]);
    assert_eq!(d.send(b".\r\n"), too_big(1000));
}

#[test]
fn message_over_size_with_end_line_in_the_same_read() {
    let mut d = authed_max(1000);
    d.begin();
    d.feed(b"From: alice@example.com\r\n\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }]);
    let rest = format!("{}\r\n.\r\n", "b".repeat(2000));
    assert_eq!(d.send(rest.as_bytes()), too_big(1000));
    assert_eq!(d.new_events(), vec![Ev::Abort, fwd("RSET\r\n")]);
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

#[test]
fn header_only_message_over_size_in_one_read() {
    let mut d = authed_max(200);
    d.begin();
    let m = format!("From: alice@example.com\r\nX-Long: {}\r\n.\r\n", "h".repeat(300));
    assert_eq!(d.send(m.as_bytes()), too_big(200));
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

#[test]
fn message_of_exactly_max_size_is_accepted() {
    let max = 1000;
    let mut d = authed_max(max);
    let mut m = b"From: alice@example.com\r\n\r\n".to_vec();
    while m.len() < max - 2 {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n");
    assert_eq!(m.len(), max);
    // The client announced exactly this size and it was accepted.
    assert_eq!(d.send(format!("MAIL FROM:<alice@example.com> SIZE={max}\r\n").as_bytes()), R250);
    assert_eq!(d.send(RCPT_BOB), R250);
    assert_eq!(d.send(b"DATA\r\n"), R354);
    d.clear();
    d.feed(&m);
    d.feed(b".\r\n");
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::EndData], "aborted as too big");
    assert_eq!(d.out(), QUEUED);
}

#[test]
fn message_just_under_the_size_limit_is_accepted() {
    // Content + the 3-octet end line fit.
    let max = 1000;
    let mut d = authed_max(max);
    let mut m = b"From: alice@example.com\r\n\r\n".to_vec();
    while m.len() < max - 5 {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n.\r\n");
    assert_eq!(m.len(), max);
    d.deliver(&m);
}

// ---------------------------------------------------------------------------------------
// Bare CR / LF in message data (SMTP smuggling)
// ---------------------------------------------------------------------------------------

#[test]
fn bare_line_end_in_header_refuses_the_message_without_data() {
    for header in [
        &b"From: alice@example.com\nSubject: x\r\n\r\n"[..],
        b"From: alice@example.com\r\nSubject: x\ry\r\n\r\n",
        b"From: alice@example.com\r\n\n",
        b"From: alice@example.com\r\n\r\r\n",
        b"\n",
    ] {
        let mut d = authed();
        d.begin();
        d.feed(header);
        assert!(d.new_events().is_empty(), "{header:?}");
        assert_eq!(d.out(), "");
        assert_eq!(d.send(b"body\r\n.\r\n"), R_BARE_DATA, "{header:?}");
        assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
        assert_eq!(d.new_upstream(), "RSET\r\n");
        d.deliver(&msg("alice@example.com", "x\r\n"));
    }
}

#[test]
fn bare_line_end_in_body_aborts_upstream() {
    for body in [&b"line\nmore\r\n"[..], b"line\rmore\r\n", b"\n", b"x\r\r\n", b"\r\n\rx"] {
        let mut d = authed();
        d.begin();
        d.feed(b"From: alice@example.com\r\n\r\nfirst line\r\n");
        assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }]);
        d.feed(body);
        assert_eq!(d.new_events(), vec![Ev::Abort], "{body:?}");
        assert_eq!(d.out(), "");
        assert_eq!(d.send(b"x\r\n.\r\n"), R_BARE_DATA, "{body:?}");
        assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
        assert!(d.messages.is_empty());
        d.deliver(&msg("alice@example.com", "x\r\n"));
    }
}

#[test]
fn lf_dot_lf_and_crlf_dot_lf_never_end_data() {
    for fake_end in [&b"\n.\n"[..], b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\rX"] {
        let mut d = authed();
        d.begin();
        d.feed(b"From: alice@example.com\r\n\r\nhello");
        d.feed(fake_end);
        // What follows is still message data, not commands.
        assert_eq!(d.send(b"QUIT\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.net>\r\n"), "");
        assert!(!d.closed, "{fake_end:?}");
        assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::Abort], "{fake_end:?}");
        assert_eq!(d.send(b".\r\n"), R_BARE_DATA, "{fake_end:?}");
        assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
        assert_eq!(d.send(b"NOOP\r\n"), R250);
    }
}

#[test]
fn smuggled_message_never_reaches_upstream() {
    let mut d = authed();
    d.begin();
    let m =
        b"From: alice@example.com\r\n\r\nhello\n.\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@example.net>\r\n\
              DATA\r\nFrom: alice@example.com\r\n\r\nsmuggled\r\n.\r\n";
    assert_eq!(d.send(m), R_BARE_DATA);
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, Ev::Abort, fwd("RSET\r\n")]);
    assert!(!text(&d.up).contains("victim"));
    assert!(!text(&d.up).contains("smuggled"));
    assert!(d.messages.is_empty());
}

#[test]
fn bare_line_end_in_data_every_split() {
    let m = b"From: alice@example.com\r\n\r\nhello\n.\r\nQUIT\r\n.\r\n".to_vec();
    let turns = session_turns(&m);
    let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
    let t = assert_split_invariant(true, MAX, &refs);
    assert!(t.client.ends_with(&format!("{R354}{R_BARE_DATA}221 2.0.0 mail.example.com closing connection\r\n")));
    assert!(t.messages.is_empty());
}

// ---------------------------------------------------------------------------------------
// Several messages, pipelining, RSET, EHLO in a transaction
// ---------------------------------------------------------------------------------------

#[test]
fn two_messages_with_rset_between() {
    let mut d = authed();
    d.deliver(&msg("alice@example.com", "one\r\n"));
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(b"RSET\r\n"), R250);
    assert_eq!(d.new_events(), vec![fwd("MAIL FROM:<alice@example.com>\r\n"), fwd("RSET\r\n")]);
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    d.deliver(&msg("alias@example.org", "two\r\n"));
    assert_eq!(d.messages.len(), 2);
}

#[test]
fn pipelined_transaction() {
    let mut d = authed();
    let out = d.send(
        b"MAIL FROM:<alice@example.com> BODY=8BITMIME\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<bad@example.net>\r\nDATA\r\n",
    );
    assert_eq!(out, format!("{R250}{R250}{NO_SUCH_USER}{R354}"));
    assert_eq!(
        d.new_upstream(),
        "MAIL FROM:<alice@example.com> BODY=8BITMIME\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<bad@example.net>\r\n"
    );
    let m = msg("alice@example.com", "x\r\n");
    assert_eq!(d.send(&m), QUEUED);
    // A second one, with the message pipelined behind DATA as well.
    let mut all = b"MAIL FROM:<alias@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec();
    all.extend_from_slice(&msg("alias@example.org", "y\r\n"));
    all.extend_from_slice(b"NOOP\r\n");
    assert_eq!(d.send(&all), format!("{R250}{R250}{R354}{QUEUED}{R250}"));
    assert_eq!(d.messages.len(), 2);
}

#[test]
fn pipelined_replies_keep_their_order() {
    let mut d = authed();
    let out = d.send(b"HELP\r\nMAIL FROM:<alice@example.com>\r\nHELP\r\nRCPT TO:<bad@example.net>\r\nVRFY x\r\nRCPT TO:<multi@example.net>\r\nRSET\r\nHELP\r\n");
    let help = "214 2.0.0 mailgate: see RFC 5321\r\n";
    assert_eq!(
        out,
        format!(
            "{help}{R250}{help}{NO_SUCH_USER}252 2.5.0 Cannot VRFY user\r\n250-first line\r\n250 2.1.5 second line\r\n{R250}{help}"
        )
    );
}

#[test]
fn pipelined_transaction_with_refused_sender() {
    let mut d = authed();
    let out = d.send(b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nFrom: x\r\n");
    assert_eq!(
        out,
        "553 5.7.1 Sender address evil@example.net is not one of your addresses\r\n\
         503 5.5.1 Need MAIL command first\r\n503 5.5.1 Need MAIL command first\r\n500 5.5.1 Unknown command\r\n"
    );
    assert!(d.new_events().is_empty());
    assert_eq!(d.new_upstream(), "");
}

#[test]
fn ehlo_in_a_transaction_resets_it_silently_upstream() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(RCPT_BOB), R250);
    d.clear();
    let reply = d.send(b"EHLO again\r\n");
    assert!(reply.starts_with("250-mail.example.com"), "{reply}");
    assert!(reply.contains("AUTH PLAIN LOGIN"));
    assert_eq!(reply.matches("250 ").count(), 1, "one EHLO reply, no RSET reply: {reply}");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    assert_eq!(d.new_upstream(), "RSET\r\n");
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    assert_eq!(d.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    // Still authenticated.
    d.deliver(&msg("alice@example.com", "x\r\n"));
    // HELO does the same.
    assert_eq!(d.send(MAIL_ALICE), R250);
    d.clear();
    assert_eq!(d.send(b"HELO again\r\n"), "250 mail.example.com\r\n");
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
}

#[test]
fn client_rset_reply_is_shown() {
    let mut d = authed();
    assert_eq!(d.send(b"RSET\r\n"), R250);
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    // After a refused message (silent RSET), the client's own RSET is answered.
    d.begin();
    assert_eq!(
        d.send(&msg("evil@example.net", "")),
        "550 5.7.1 From: address evil@example.net is not one of your addresses\r\n"
    );
    assert_eq!(d.send(b"RSET\r\n"), R250);
}

// ---------------------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------------------

#[test]
fn upstream_failure_on_a_forwarded_command() {
    let mut d = authed();
    d.fail = Some(Fail::Forward);
    assert_eq!(d.send(MAIL_ALICE), R451);
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    assert_eq!(d.send(MAIL_ALICE), R250);
    d.fail = Some(Fail::Forward);
    assert_eq!(d.send(RCPT_BOB), R451);
    assert_eq!(d.send(b"DATA\r\n"), "503 5.5.1 Need MAIL command first\r\n");
    d.deliver(&msg("alice@example.com", "x\r\n"));
}

#[test]
fn upstream_failure_while_streaming_drains_then_451() {
    let mut d = authed();
    d.begin();
    d.feed(b"From: alice@example.com\r\n\r\n");
    d.fail = Some(Fail::Chunk);
    d.feed(b"body line\r\n");
    assert_eq!(d.out(), "");
    d.feed(b"QUIT\r\nmore\r\n");
    assert!(!d.closed, "message data is not a command");
    assert_eq!(d.send(b".\r\n"), R451);
    assert_eq!(d.new_events(), vec![Ev::StartData { complete: false }, fwd("RSET\r\n")]);
    assert!(d.messages.is_empty());
    d.deliver(&msg("alice@example.com", "x\r\n"));
}

#[test]
fn upstream_failure_on_data_and_on_end() {
    let mut d = authed();
    d.begin();
    d.fail = Some(Fail::StartData);
    d.feed(b"From: alice@example.com\r\n\r\nbody\r\n");
    assert_eq!(d.out(), "");
    assert_eq!(d.send(b".\r\n"), R451);
    d.begin();
    d.fail = Some(Fail::StartData);
    assert_eq!(d.send(b"From: alice@example.com\r\n.\r\n"), R451);
    d.begin();
    d.fail = Some(Fail::EndData);
    assert_eq!(d.send(&msg("alice@example.com", "x\r\n")), R451);
    assert_eq!(d.send(RCPT_BOB), "503 5.5.1 Need MAIL command first\r\n");
    assert!(d.messages.is_empty());
    d.deliver(&msg("alice@example.com", "x\r\n"));
}

#[test]
fn upstream_failure_on_silent_rset_is_silent() {
    let mut d = authed();
    d.begin();
    d.fail = Some(Fail::Forward);
    // Refused by the sender policy; the silent RSET then meets a dead upstream. The
    // client asked one thing and must get one reply.
    assert_eq!(
        d.send(&msg("evil@example.net", "x\r\n")),
        "550 5.7.1 From: address evil@example.net is not one of your addresses\r\n"
    );
}

#[test]
fn client_rset_after_failed_silent_rset_is_answered() {
    let mut d = authed();
    d.begin();
    d.fail = Some(Fail::Forward);
    d.send(&msg("evil@example.net", "x\r\n"));
    assert_eq!(d.new_events(), vec![fwd("RSET\r\n")]);
    // The client's own RSET (upstream is gone, so the driver answers it like net::smtp).
    assert_eq!(d.send(b"RSET\r\n"), R250);
}

#[test]
fn upstream_failure_on_ehlo_reset_is_silent() {
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    d.fail = Some(Fail::Forward);
    let reply = d.send(b"EHLO again\r\n");
    assert!(!reply.contains("451"), "{reply}");
    assert_eq!(d.send(b"NOOP\r\n"), R250);
}

// ---------------------------------------------------------------------------------------
// Other commands
// ---------------------------------------------------------------------------------------

#[test]
fn quit_closes() {
    for tls in [false, true] {
        let mut d = Driver::new(tls);
        assert_eq!(d.send(b"QUIT\r\nNOOP\r\n"), "221 2.0.0 mail.example.com closing connection\r\n");
        assert!(d.closed);
        assert_eq!(d.new_events(), vec![Ev::Close]);
        assert!(d.s.buf.is_empty());
        assert_eq!(d.send(b"NOOP\r\n"), "");
        assert!(d.s.buf.is_empty());
    }
    let mut d = authed();
    assert_eq!(d.send(MAIL_ALICE), R250);
    assert_eq!(d.send(b"QUIT\r\n"), "221 2.0.0 mail.example.com closing connection\r\n");
    assert_eq!(d.new_events(), vec![fwd("MAIL FROM:<alice@example.com>\r\n"), Ev::Close]);
}

#[test]
fn local_commands() {
    for tls in [false, true] {
        let mut d = Driver::new(tls);
        assert_eq!(d.send(b"NOOP\r\n"), R250);
        assert_eq!(d.send(b"NOOP some thing\r\n"), R250);
        assert_eq!(d.send(b"RSET\r\n"), R250);
        assert_eq!(d.send(b"HELP\r\n"), "214 2.0.0 mailgate: see RFC 5321\r\n");
        assert_eq!(d.send(b"HELP MAIL\r\n"), "214 2.0.0 mailgate: see RFC 5321\r\n");
        assert_eq!(d.send(b"VRFY alice\r\n"), "252 2.5.0 Cannot VRFY user\r\n");
        assert_eq!(d.send(b"BDAT 10 LAST\r\n"), "502 5.5.1 CHUNKING is not offered\r\n");
        assert_eq!(d.send(b"XFOO bar\r\n"), R_UNKNOWN);
        assert_eq!(d.send(b"\r\n"), R_UNKNOWN);
        assert_eq!(d.send(b"LHLO x\r\n"), "500 5.5.1 LHLO is for LMTP\r\n");
        assert!(d.send(b"EXPN list\r\n").starts_with("502 5.5.1 "));
        assert!(d.send(b"ETRN x\r\n").starts_with("502 5.5.1 "));
        assert!(d.new_events().is_empty());
    }
    // After authentication NOOP, HELP and VRFY stay local; RSET is forwarded.
    let mut d = authed();
    assert_eq!(d.send(b"NOOP\r\n"), R250);
    assert_eq!(d.send(b"HELP\r\n"), "214 2.0.0 mailgate: see RFC 5321\r\n");
    assert_eq!(d.send(b"VRFY alice\r\n"), "252 2.5.0 Cannot VRFY user\r\n");
    assert_eq!(d.send(b"BDAT 10 LAST\r\n"), "502 5.5.1 CHUNKING is not offered\r\n");
    assert!(d.new_events().is_empty());
    assert_eq!(d.new_upstream(), "");
}

#[test]
fn many_empty_lines_and_malformed_noop_do_not_hurt() {
    // Case 51 (Dovecot crash inputs).
    let mut d = authed();
    let out = d.send(&b"\r\n".repeat(15));
    assert_eq!(out, R_UNKNOWN.repeat(15));
    assert_eq!(d.send(b"NOOP \0\x01\xff\r\n"), R250);
    assert!(!d.closed);
    d.deliver(&msg("alice@example.com", "x\r\n"));
}

// ---------------------------------------------------------------------------------------
// Secrets (habit 3)
// ---------------------------------------------------------------------------------------

#[test]
fn debug_never_shows_the_password() {
    let secret = "sup3rsecret";
    let plain = b64(format!("\0alice\0{secret}").as_bytes());
    let login = b64(secret.as_bytes());
    let check = |what: &str| {
        assert!(!what.contains(secret), "{what}");
        assert!(!what.contains(&plain), "{what}");
        assert!(!what.contains(&login), "{what}");
    };
    // PLAIN with initial response, fed but not yet polled, then as an action.
    let mut s = Submission::new(HOST, true, false, MAX);
    s.next();
    s.feed(format!("AUTH PLAIN {plain}\r\n").as_bytes());
    check(&format!("{s:?}"));
    let a = s.next();
    assert!(matches!(a, Next::Event(Action::Authenticate(_))));
    check(&format!("{a:?}"));
    check(&format!("{a:#?}"));
    check(&format!("{s:?}"));
    // LOGIN: the password line in the buffer and at the prompt.
    let mut s = Submission::new(HOST, true, false, MAX);
    s.next();
    s.feed(b"AUTH LOGIN YWxpY2U=\r\n");
    while !matches!(s.next(), Next::NeedInput) {}
    s.feed(format!("{login}\r\n").as_bytes());
    check(&format!("{s:?}"));
    let a = s.next();
    check(&format!("{a:?}"));
    assert!(matches!(a, Next::Event(Action::Authenticate(c)) if c.password.expose().as_slice() == secret.as_bytes()));
    // A refused exchange.
    let mut s = Submission::new(HOST, true, false, MAX);
    s.next();
    s.feed(format!("AUTH PLAIN {}\r\n", b64(format!("bob\0alice\0{secret}").as_bytes())).as_bytes());
    let a = s.next();
    check(&format!("{a:?} {s:?}"));
}

#[test]
fn auth_line_is_not_left_in_the_buffer() {
    let mut s = Submission::new(HOST, true, false, MAX);
    s.next();
    s.feed(format!("AUTH PLAIN {GOOD_PLAIN}\r\nNOOP\r\n").as_bytes());
    assert!(matches!(s.next(), Next::Event(Action::Authenticate(_))));
    assert_eq!(s.buf, b"NOOP\r\n");
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

/// The buffer bound that must hold after `poll` returned NeedInput.
fn buf_bound(s: &Submission) -> usize {
    match s.state {
        State::Command { .. } => {
            let auth = s.buf.len() >= 5 && s.buf[..5].eq_ignore_ascii_case(b"AUTH ");
            if auth { MAX_AUTH_LINE } else { MAX_LINE }
        }
        State::Sasl(_) => MAX_AUTH_LINE,
        State::Header => MAX_HEADER,
        _ => 0,
    }
}

/// Feeds client turns (each cut into reads) through the scripted driver. The driver
/// checks its invariants (no Authenticate before TLS, no Forward/StartData before
/// success, nothing after Close, nothing written during the STARTTLS switch); this checks
/// the buffer bounds after every read. `fail_every`: make every n-th read's upstream step
/// fail.
/// [`drive_turns_with`]; OAuth is offered on half the inputs (an odd number of turns),
/// so the fuzz-style properties reach the bearer exchanges too.
fn drive_turns(tls: bool, max: usize, fail_every: Option<u8>, turns: &[Vec<Vec<u8>>]) -> Result<Driver, TestCaseError> {
    drive_turns_with(tls, turns.len() % 2 == 1, max, fail_every, turns)
}

fn drive_turns_with(
    tls: bool,
    oauth: bool,
    max: usize,
    fail_every: Option<u8>,
    turns: &[Vec<Vec<u8>>],
) -> Result<Driver, TestCaseError> {
    let mut d = Driver::raw(tls, !tls, max);
    d.s.set_oauth(oauth.then(offer));
    d.pump();
    let mut i = 0usize;
    for turn in turns {
        for r in turn {
            i += 1;
            if let Some(n) = fail_every
                && n > 0
                && i.is_multiple_of(usize::from(n))
            {
                d.fail = Some([Fail::Forward, Fail::StartData, Fail::Chunk, Fail::EndData][i % 4]);
            }
            d.s.feed(r);
            prop_assert!(d.s.buf.len() <= MAX_HEADER + r.len(), "buffer {} after a read of {}", d.s.buf.len(), r.len());
            d.pump();
            prop_assert!(
                d.s.buf.len() <= buf_bound(&d.s),
                "buffer {} in state {:?} (bound {})",
                d.s.buf.len(),
                d.s.state,
                buf_bound(&d.s)
            );
            if d.closed {
                prop_assert!(d.s.buf.is_empty());
            }
        }
        d.finish_turn();
    }
    Ok(d)
}

/// Each read is a turn of its own.
fn drive_invariants(tls: bool, max: usize, fail_every: Option<u8>, reads: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let turns: Vec<Vec<Vec<u8>>> = reads.iter().map(|r| vec![r.clone()]).collect();
    drive_turns(tls, max, fail_every, &turns).map(|_| ())
}

fn smtpish_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"AaEeHhLlOoMmIiFfRrTtSsPpNnDdQqUu<>@:.=* \r\n\r\n\r\n\0\xff0123456789".to_vec())
}

fn smtpish_line() -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<&'static [u8]> = vec![
        b"EHLO x\r\n",
        b"HELO x\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n",
        b"AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n",
        b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n",
        b"AUTH PLAIN\r\n",
        b"AGFsaWNlAHJpZ2h0\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH LOGIN YWxpY2U=\r\n",
        b"AUTH XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciByaWdodAEB\r\n",
        b"AUTH XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciB3cm9uZwEB\r\n",
        b"AUTH OAUTHBEARER\r\n",
        b"bixhPWFsaWNlLAFhdXRoPUJlYXJlciB3cm9uZwEB\r\n",
        b"AQ==\r\n",
        b"YWxpY2U=\r\n",
        b"cmlnaHQ=\r\n",
        b"*\r\n",
        b"=\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        b"MAIL FROM:<alias@example.org> BODY=8BITMIME\r\n",
        b"MAIL FROM:<evil@example.net>\r\n",
        b"MAIL FROM:<alice@example.com> SIZE=99999999\r\n",
        b"RCPT TO:<bob@example.net>\r\n",
        b"RCPT TO:<bob@example.net>\r\n",
        b"RCPT TO:<bad@example.net>\r\n",
        b"DATA\r\n",
        b"DATA\r\n",
        b"From: alice@example.com\r\n",
        b"From: alice@example.com\r\n",
        b"From: evil@example.net\r\n",
        b"Sender: alias@example.org\r\n",
        b"Subject: x\r\n",
        b"\r\n",
        b"\r\n",
        b".\r\n",
        b".\r\n",
        b"..x\r\n",
        b"body line\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"BDAT 3 LAST\r\n",
        b"XFOO\r\n",
        b"\n",
        b"\r",
        b".\n",
        b"\n.\n",
    ];
    prop::sample::select(lines).prop_map(|l| l.to_vec())
}

fn smtpish_token() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static [u8]> = vec![
        b"AUTH ",
        b"PLAIN",
        b"LOGIN",
        b" ",
        b"MAIL FROM:<",
        b"RCPT TO:<",
        b"alice@example.com",
        b">",
        b"\r",
        b"\n",
        b"\r\n",
        b".",
        b"QUIT",
        b"DATA",
        b"From: ",
        b"AGFsaWNlAHJpZ2h0",
        b"\xff",
        b"\0",
    ];
    prop::sample::select(tokens).prop_map(|t| t.to_vec())
}

/// A stream of lines (rarely QUIT) and tokens, cut into reads at random places; sometimes
/// an over-long run of one byte.
fn smtpish_session() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        prop::collection::vec(
            prop_oneof![
                40 => smtpish_line(),
                6 => smtpish_token(),
                1 => Just(b"QUIT\r\n".to_vec()),
                1 => (prop::sample::select(b"Ax\r\n.".to_vec()), 500usize..14_000).prop_map(|(b, n)| vec![b; n]),
            ],
            0..48,
        ),
        prop::collection::vec(any::<prop::sample::Index>(), 0..16),
    )
        .prop_map(|(parts, cuts)| {
            let bytes = parts.concat();
            split_at(&bytes, cuts.iter().map(|c| c.index(bytes.len() + 1)))
        })
}

/// A message after DATA: header lines (own, forged, dot-stuffed, bare line ends), maybe
/// the blank line, body lines, usually the end line.
fn smtpish_message() -> impl Strategy<Value = Vec<u8>> {
    let from: Vec<&'static [u8]> = vec![
        b"From: alice@example.com\r\n",
        b"From: Alias <ALIAS@example.org>\r\n",
        b"from: =?utf-8?q?Al=C3=AFce?= <alice@example.com>\r\n",
    ];
    let good: Vec<&'static [u8]> = vec![
        b"Sender: alias@example.org\r\n",
        b"To: bob@example.net\r\n",
        b"Subject: x\r\n",
        b" folded\r\n",
        b"..Dotted: x\r\n",
    ];
    let bad: Vec<&'static [u8]> = vec![
        b"From: alice@example.com\r\n",
        b"From: evil@example.net\r\n",
        // Issue 13: fields that some readers read as evil.
        b"From: evil@example.net <alice@example.com>\r\n",
        b"From: =?utf-8?q?<evil@example.net>?= <alice@example.com>\r\n",
        b"From: evil@example.net:alice@example.com\r\n",
        b"From: <evil@example.net>: alice@example.com;\r\n",
        b"Sender: evil@example.net <alias@example.org>\r\n",
        b"Sender: evil@example.net\r\n",
        b".From: evil@example.net\r\n",
        b"From: alice@example.com\n",
        b"X-Y: z\r",
    ];
    let body: Vec<&'static [u8]> = vec![
        b"text\r\n",
        b"..x\r\n",
        b"\r\n",
        b"\xff\xfe 8-bit\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        b"x\n",
        b"y\r",
        b".\n",
    ];
    let header_line = prop_oneof![6 => prop::sample::select(good), 1 => prop::sample::select(bad)];
    (
        prop::option::weighted(0.9, prop::sample::select(from)),
        prop::collection::vec(header_line, 0..4),
        prop::bool::weighted(0.8),
        prop::collection::vec(
            prop_oneof![10 => prop::sample::select(body[..5].to_vec()), 1 => prop::sample::select(body)],
            0..6,
        ),
        0usize..3000,
        prop::bool::weighted(0.9),
    )
        .prop_map(|(from, h, blank, b, long, end)| {
            let mut m = from.map(<[u8]>::to_vec).unwrap_or_default();
            m.extend(h.concat());
            if blank {
                m.extend_from_slice(b"\r\n");
            }
            m.extend(b.concat());
            if long > 2000 {
                m.extend(std::iter::repeat_n(b'L', long));
                m.extend_from_slice(b"\r\n");
            }
            if end {
                m.extend_from_slice(b".\r\n");
            }
            m
        })
}

/// Whole turns of a plausible session: often a login first, then commands, pipelined
/// transactions and messages; each turn cut into reads at random places.
fn smtpish_turns() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    let login = prop_oneof![
        1 => Just(vec![]),
        2 => Just(vec![b"EHLO x\r\n".to_vec(), b"STARTTLS\r\n".to_vec(), b"EHLO x\r\n".to_vec(), b"AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n".to_vec()]),
        2 => Just(vec![b"EHLO x\r\n".to_vec(), b"AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n".to_vec()]),
        1 => Just(vec![b"EHLO x\r\n".to_vec(), b"AUTH LOGIN\r\n".to_vec(), b"YWxpY2U=\r\n".to_vec(), b"cmlnaHQ=\r\n".to_vec()]),
    ];
    let transaction = prop_oneof![
        Just(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec()),
        Just(b"MAIL FROM:<alias@example.org> BODY=8BITMIME\r\nRCPT TO:<bad@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec()),
        Just(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bad@example.net>\r\nDATA\r\n".to_vec()),
        Just(b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec()),
    ];
    // A block is one or more turns.
    let block = prop_oneof![
        8 => (transaction, smtpish_message()).prop_map(|(t, m)| vec![t, m]),
        2 => smtpish_message().prop_map(|m| vec![m]),
        6 => smtpish_line().prop_map(|l| vec![l]),
        1 => Just(vec![b"QUIT\r\n".to_vec()]),
    ];
    (login, prop::collection::vec(block, 0..8), prop::collection::vec(any::<prop::sample::Index>(), 0..24)).prop_map(
        |(login, blocks, cuts)| {
            let mut cuts = cuts.into_iter();
            login
                .into_iter()
                .chain(blocks.into_iter().flatten())
                .map(|t| split_at(&t, cuts.by_ref().take(2).map(|c| c.index(t.len() + 1))))
                .collect()
        },
    )
}

fn some_max() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![60usize, 300, MAX])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(1024), .. ProptestConfig::default() })]

    #[test]
    fn prop_random_bytes(tls in any::<bool>(), chunks in chunked(prop::collection::vec(any::<u8>(), 0..96))) {
        drive_invariants(tls, MAX, None, &chunks)?;
    }

    #[test]
    fn prop_smtpish_alphabet(tls in any::<bool>(), chunks in chunked(prop::collection::vec(smtpish_byte(), 0..96))) {
        drive_invariants(tls, MAX, None, &chunks)?;
    }

    #[test]
    fn prop_smtpish_tokens(
        tls in any::<bool>(),
        chunks in chunked(prop::collection::vec(smtpish_token(), 0..16).prop_map(|v| v.concat())),
    ) {
        drive_invariants(tls, MAX, None, &chunks)?;
    }

    #[test]
    fn prop_smtpish_sessions(
        tls in any::<bool>(),
        max in some_max(),
        fail_every in prop::option::of(0u8..6),
        chunks in smtpish_session(),
    ) {
        drive_invariants(tls, max, fail_every, &chunks)?;
    }

    #[test]
    fn prop_smtpish_turns(
        tls in any::<bool>(),
        max in some_max(),
        fail_every in prop::option::of(0u8..8),
        turns in smtpish_turns(),
    ) {
        drive_turns(tls, max, fail_every, &turns)?;
    }

    /// Without upstream failures and with a large limit, every message upstream accepted
    /// is one the client sent in full with an allowed From, and nothing else reached it.
    #[test]
    fn prop_only_checked_messages_are_delivered(tls in any::<bool>(), turns in smtpish_turns()) {
        let d = drive_turns(tls, MAX, None, &turns)?;
        for m in &d.messages {
            prop_assert!(m.ends_with(b"\r\n.\r\n") || m.as_slice() == b".\r\n");
            let head_end = m.windows(4).position(|w| w == b"\r\n\r\n").map_or(m.len(), |p| p + 4);
            for line in unstuff(&m[..head_end]).split(|b| *b == b'\n') {
                let l = text(line).to_ascii_lowercase();
                if l.starts_with("from:") || l.starts_with("sender:") || l.starts_with(' ') {
                    prop_assert!(!l.contains("evil"), "forged header delivered: {:?}", text(m));
                }
            }
            prop_assert!(!m.contains(&b'\n') || m.windows(2).filter(|w| w[1] == b'\n').all(|w| w[0] == b'\r'));
        }
    }

    #[test]
    fn prop_big_chunks(tls in any::<bool>(), chunks in prop::collection::vec(prop::collection::vec(smtpish_byte(), 0..20_000), 0..4)) {
        drive_invariants(tls, MAX, None, &chunks)?;
    }

    /// A valid session gives the same client output and upstream bytes however its turns
    /// are cut into reads.
    #[test]
    fn prop_random_chunking_of_valid_session(cuts in prop::collection::vec(0usize..400, 0..10)) {
        let m = rich_message();
        let mut turns = session_turns(&m);
        turns.insert(0, b"EHLO t\r\n".to_vec());
        turns.insert(1, b"STARTTLS\r\nNOOP\r\n".to_vec());
        turns.insert(3, b"AUTH LOGIN\r\n".to_vec());
        turns.insert(4, b"*\r\n".to_vec());
        let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
        let reference = run(false, MAX, &refs, &whole);
        let split = |_: usize, b: &[u8]| split_at(b, cuts.iter().map(|c| c * 37 % (b.len() + 1)));
        prop_assert_eq!(run(false, MAX, &refs, &split), reference);
    }
}

#[test]
fn valid_session_reference() {
    // The reference of prop_random_chunking_of_valid_session, spelled out once.
    let m = rich_message();
    let mut turns = session_turns(&m);
    turns.insert(0, b"EHLO t\r\n".to_vec());
    turns.insert(1, b"STARTTLS\r\nNOOP\r\n".to_vec());
    turns.insert(3, b"AUTH LOGIN\r\n".to_vec());
    turns.insert(4, b"*\r\n".to_vec());
    let refs: Vec<&[u8]> = turns.iter().map(Vec::as_slice).collect();
    let t = run(false, MAX, &refs, &whole);
    assert_eq!(
        t.events,
        vec![
            Ev::StartTls,
            Ev::Refuse(AuthReply::Aborted("5.7.0 Authentication cancelled")),
            auth_ev("alice", "right"),
            fwd("MAIL FROM:<alice@example.com>\r\n"),
            fwd("RCPT TO:<bob@example.net>\r\n"),
            Ev::StartData { complete: false },
            Ev::EndData,
            Ev::Close,
        ]
    );
    let mut up = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".to_vec();
    up.extend_from_slice(&m);
    assert_eq!(t.upstream, text(&up));
    assert_eq!(t.messages, vec![m]);
    assert!(t.client.contains(R220_TLS));
    assert!(t.client.ends_with(&format!(
        "334 VXNlcm5hbWU6\r\n{R_CANCELLED}{R235}{R250}{R250}{R354}{QUEUED}221 2.0.0 mail.example.com closing connection\r\n"
    )));
}

/// The committed corpus (fuzz/corpus/smtp) replays under `cargo test`.
#[test]
fn corpus_replays() {
    let cases = crate::proto::corpus_cuts("smtp");
    assert!(cases.len() >= 9, "corpus missing: {}", cases.len());
    for (name, chunks) in cases {
        for (tls, oauth) in [(false, false), (true, false), (false, true), (true, true)] {
            let turns: Vec<Vec<Vec<u8>>> = chunks.iter().map(|r| vec![r.clone()]).collect();
            if let Err(e) = drive_turns_with(tls, oauth, MAX, None, &turns) {
                panic!("{name} (tls {tls}, oauth {oauth}): {e}");
            }
        }
    }
}

/// A browser's HTTP request (ALPACA) or a TLS ClientHello as the first line closes the
/// connection at once and echoes nothing of it (issue 14); later lines are SMTP's.
#[test]
fn another_protocols_first_line_closes_without_an_echo() {
    for first in [
        &b"POST /x HTTP/1.1\r\nHost: mail.example.com\r\n\r\nEHLO x\r\nMAIL FROM:<a@b>\r\n"[..],
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 587\r\nEHLO x\r\n",
        b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
    ] {
        for tls in [false, true] {
            let mut d = Driver::new(tls);
            assert_eq!(d.send(first), "", "{}", String::from_utf8_lossy(first));
            assert_eq!(d.new_events(), vec![Ev::Close], "{}", String::from_utf8_lossy(first));
        }
    }
    let mut d = Driver::new(true);
    assert!(d.send(b"EHLO x\r\n").starts_with("250"));
    let later = d.send(b"GET / HTTP/1.1\r\n");
    assert!(later.starts_with("5") && !later.contains("GET"), "{later:?}");
    assert!(d.new_events().is_empty(), "only the first line closes");
}

// ---------------------------------------------------------------------------------------
// OAuth 2.0 bearer tokens: XOAUTH2 and OAUTHBEARER (issue 16)
// ---------------------------------------------------------------------------------------

const METADATA: &str = "https://mail.example.com/.well-known/oauth-authorization-server";

fn offer() -> OAuthOffer {
    OAuthOffer { metadata_url: METADATA.to_string() }
}

use crate::proto::testing::xoauth2;

fn oauthbearer(user: &str, token: &str) -> String {
    crate::proto::testing::oauthbearer(user, "mail.example.com", 465, token)
}

/// A driver offering OAuth (greeting not read yet).
fn oauth_raw(tls: bool) -> Driver {
    let mut d = Driver::raw(tls, !tls, MAX);
    d.s.set_oauth(Some(offer()));
    d
}

/// An implicit-TLS session offering OAuth, after EHLO.
fn oauth_session() -> Driver {
    let mut d = oauth_raw(true);
    d.pump();
    d.clear();
    assert!(d.send(b"EHLO client.example\r\n").starts_with("250-"));
    d.clear();
    d
}

fn challenge(mech: BearerMechanism) -> String {
    format!("334 {}\r\n", offer().error_challenge(mech))
}

#[test]
fn ehlo_offers_the_bearer_mechanisms_only_inside_tls_and_only_when_on() {
    let auth_line = |d: &mut Driver| {
        let reply = d.send(b"EHLO client.example\r\n");
        ehlo_lines(&reply).into_iter().find(|l| l.starts_with("AUTH"))
    };
    let mut off = Driver::new(true);
    assert_eq!(auth_line(&mut off).as_deref(), Some("AUTH PLAIN LOGIN"));
    let mut on = oauth_raw(true);
    on.pump();
    on.clear();
    let line = auth_line(&mut on).unwrap();
    let mut mechs: Vec<&str> = line.split(' ').skip(1).collect();
    mechs.sort_unstable();
    assert_eq!(mechs, ["LOGIN", "OAUTHBEARER", "PLAIN", "XOAUTH2"], "{line}");
    // Plaintext before STARTTLS: no AUTH at all; after it, the bearer mechanisms too.
    let mut plain = oauth_raw(false);
    plain.pump();
    plain.clear();
    assert_eq!(auth_line(&mut plain), None);
    assert_eq!(plain.send(b"STARTTLS\r\n"), R220_TLS);
    plain.finish_turn();
    assert!(auth_line(&mut plain).unwrap().contains("XOAUTH2 "), "after STARTTLS");
    // Before TLS the mechanisms are refused like every AUTH.
    let mut plain = oauth_raw(false);
    plain.pump();
    plain.send(b"EHLO x\r\n");
    assert_eq!(plain.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes()), R530_TLS);
}

#[test]
fn bearer_logins_with_and_without_initial_response() {
    for (mech, msg) in [("XOAUTH2", xoauth2("alice", "right")), ("OAUTHBEARER", oauthbearer("alice", "right"))] {
        // With an initial response (Thunderbird's `AUTH XOAUTH2 <token>`).
        let mut d = oauth_session();
        assert_eq!(d.send(format!("AUTH {mech} {msg}\r\n").as_bytes()), R235);
        assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
        // Without: `334 `, then the message.
        let mut d = oauth_session();
        assert_eq!(d.send(format!("AUTH {mech}\r\n").as_bytes()), "334 \r\n");
        assert_eq!(d.send(format!("{msg}\r\n").as_bytes()), R235);
        assert_eq!(d.new_events(), vec![auth_ev("alice", "right")]);
    }
    // The credentials are a bearer token.
    let mut s = Submission::new(HOST, true, false, MAX);
    s.set_oauth(Some(offer()));
    s.feed(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "tok")).as_bytes());
    loop {
        match s.next() {
            Next::Write(_) => {}
            Next::Event(Action::Authenticate(c)) => {
                assert_eq!(c.mechanism, sasl::Mechanism::Bearer);
                assert_eq!(c.password.expose().as_slice(), b"tok");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A refused token: `334 <error JSON>`, then — whatever the client answers (Thunderbird:
/// an empty line) — `535 5.7.8`, and the session reads commands again.
#[test]
fn a_refused_token_gets_the_error_challenge_then_535() {
    for answer in [&b"\r\n"[..], b"AQ==\r\n", b"*\r\n", b"anything at all\r\n", b"bare\n"] {
        for (mech, msg) in [
            (BearerMechanism::XOAuth2, xoauth2("alice", "old")),
            (BearerMechanism::OAuthBearer, oauthbearer("alice", "old")),
        ] {
            let mut d = oauth_session();
            assert_eq!(d.send(format!("AUTH {} {msg}\r\n", mech.name()).as_bytes()), challenge(mech));
            assert_eq!(d.new_events(), vec![auth_ev("alice", "old")]);
            assert_eq!(d.send(answer), R535, "{answer:?}");
            assert_eq!(d.send(b"NOOP\r\n"), R250);
        }
    }
}

/// Only a refused token gets the challenge: a malformed message, an unavailable check and
/// a password login keep their replies; OAuth off keeps `504`.
#[test]
fn other_bearer_refusals_keep_their_replies() {
    let mut d = oauth_session();
    assert_eq!(d.send(format!("AUTH XOAUTH2 {}\r\n", b64(b"user=alice\x01auth=Bearer \x01\x01")).as_bytes()), R535);
    assert_eq!(d.new_events(), vec![Ev::Refuse(AuthReply::Failed)]);
    assert_eq!(d.send(b"AUTH OAUTHBEARER =\r\n"), R535);
    let mut d = oauth_session();
    d.verdict = Some(AuthReply::Unavailable);
    assert_eq!(
        d.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes()),
        "454 4.7.0 Temporary authentication failure, try again later\r\n"
    );
    d.verdict = None;
    assert_eq!(d.send(format!("AUTH PLAIN {BAD_PLAIN}\r\n").as_bytes()), R535);
    let mut d = Driver::new(true);
    d.send(b"EHLO x\r\n");
    for mech in ["XOAUTH2", "OAUTHBEARER"] {
        assert_eq!(d.send(format!("AUTH {mech}\r\n").as_bytes()), "504 5.5.4 Unrecognized authentication type\r\n");
    }
}

#[test]
fn cancel_and_bad_base64_in_a_bearer_exchange() {
    let mut d = oauth_session();
    assert_eq!(d.send(b"AUTH XOAUTH2\r\n"), "334 \r\n");
    assert_eq!(d.send(b"*\r\n"), R_CANCELLED);
    assert_eq!(d.send(b"AUTH OAUTHBEARER\r\n"), "334 \r\n");
    assert_eq!(d.send(b"!!!\r\n"), R_BAD_B64);
}

#[test]
fn refused_tokens_count_as_failures() {
    let mut d = oauth_session();
    let line = format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "x"));
    for _ in 0..2 {
        assert_eq!(d.send(line.as_bytes()), challenge(BearerMechanism::XOAuth2));
        assert_eq!(d.send(b"\r\n"), R535);
    }
    assert_eq!(d.send(line.as_bytes()), challenge(BearerMechanism::XOAuth2));
    assert_eq!(d.send(b"\r\n"), format!("{R535}421 4.7.0 Too many authentication failures\r\n"));
    assert!(d.closed);
}

#[test]
fn the_answer_to_the_error_challenge_is_bounded() {
    let mut d = oauth_session();
    d.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "x")).as_bytes());
    let mut long = vec![b'A'; MAX_AUTH_LINE + 10];
    long.extend(b"\r\nNOOP\r\n");
    // The over-long answer still ends the exchange with 535; what follows it is read again.
    assert_eq!(d.send(&long), format!("{R535}{R250}"));
    // The longest token fits in an AUTH line.
    let mut d = oauth_session();
    let token = "t".repeat(sasl::MAX_TOKEN);
    d.send(format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", &token)).as_bytes());
    assert_eq!(d.new_events(), vec![auth_ev("alice", &token)]);
}

#[test]
fn bearer_every_split() {
    let new = || {
        let mut d = oauth_raw(true);
        d.s.set_oauth(Some(offer()));
        d
    };
    let turns = [
        "EHLO client.example\r\n".to_string(),
        format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "wrong")),
        "\r\n".to_string(),
        "AUTH OAUTHBEARER\r\n".to_string(),
        "*\r\n".to_string(),
        "AUTH OAUTHBEARER\r\n".to_string(),
        format!("{}\r\nNOOP\r\n", oauthbearer("alice", "right")),
    ];
    let turns: Vec<&[u8]> = turns.iter().map(|s| s.as_bytes()).collect();
    let t = assert_split_invariant_with(&new, &turns);
    assert_eq!(
        t.events,
        vec![
            auth_ev("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("5.7.0 Authentication cancelled")),
            auth_ev("alice", "right")
        ]
    );
    assert!(
        t.client.contains(&format!(
            "{}{R535}334 \r\n{R_CANCELLED}334 \r\n{R235}{R250}",
            challenge(BearerMechanism::XOAuth2)
        )),
        "{}",
        t.client
    );
}

/// Issue 20: an app password's `--send-to` rules refuse other recipients here (`550
/// 5.7.1` naming the rule), never upstream; allowed ones (address, `@domain`, any case)
/// are forwarded.
#[test]
fn send_to_rules_refuse_other_recipients_before_upstream() {
    let mut d = authed();
    d.s.limit_recipients(&["reports@example.net".into(), "@ops.example".into()]);
    d.send(b"MAIL FROM:<alice@example.com>\r\n");
    d.clear();
    let r = d.send(b"RCPT TO:<someone@else.example>\r\n");
    assert!(r.starts_with("550 5.7.1 Recipient <someone@else.example> refused"), "{r}");
    assert!(r.contains("reports@example.net, @ops.example"), "{r}");
    assert!(d.new_events().is_empty(), "a refused recipient reached upstream");
    for ok in ["Reports@Example.net", "pager@OPS.example"] {
        let r = d.send(format!("RCPT TO:<{ok}>\r\n").as_bytes());
        assert!(r.starts_with("250"), "{ok}: {r}");
    }
}
