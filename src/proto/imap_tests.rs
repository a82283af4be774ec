//! Session tests for the IMAP pre-auth machine: bytes in, bytes and actions out, no sockets.
//! Case numbers refer to SECURITY.md.

use super::*;
use crate::proto::chunked;
use crate::proto::testing::{self, auth, expect_bearer, pump, send, split_at, text, xoauth2};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A non-`Write` action, in a form tests can compare.
type Ev = testing::Ev<AuthReply>;

/// Feeds `bytes` one at a time, polling after each; returns the concatenated results.
fn send_bytewise(p: &mut PreAuth, bytes: &[u8]) -> (String, Vec<Ev>) {
    let mut w = String::new();
    let mut ev = Vec::new();
    for b in bytes {
        let (w1, e1) = send(p, std::slice::from_ref(b));
        w.push_str(&w1);
        let closed = e1.contains(&Ev::Close);
        ev.extend(e1);
        if closed {
            break;
        }
    }
    (w, ev)
}

const HOST: &str = "mx.example";

/// A new session with its greeting already read. `tls`: implicit TLS; otherwise a
/// STARTTLS listener.
fn session(tls: bool) -> PreAuth {
    let mut p = PreAuth::new(HOST, tls, !tls);
    let (g, ev) = pump(&mut p);
    assert!(g.starts_with("* OK "), "{g}");
    assert!(ev.is_empty());
    p
}

/// A session on the STARTTLS listener that has completed STARTTLS.
fn session_after_starttls() -> PreAuth {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"S STARTTLS\r\n"), ("S OK Begin TLS negotiation now\r\n".into(), vec![Ev::StartTls]));
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    p
}

fn greeting(tls: bool, starttls: bool) -> String {
    let mut p = PreAuth::new(HOST, tls, starttls);
    let (g, ev) = pump(&mut p);
    assert!(ev.is_empty());
    g
}

/// The capability list of a `* OK [CAPABILITY ...]` or `* CAPABILITY ...` line.
fn caps_of(line: &str) -> Vec<String> {
    let list = if let Some(rest) = line.strip_prefix("* OK [CAPABILITY ") {
        rest.split(']').next().unwrap_or("")
    } else if let Some(rest) = line.strip_prefix("* CAPABILITY ") {
        rest.split("\r\n").next().unwrap_or("")
    } else {
        panic!("no capability list in {line:?}")
    };
    list.split(' ').map(str::to_string).collect()
}

fn assert_plain_caps(caps: &[String]) {
    for want in ["IMAP4rev1", "STARTTLS", "LOGINDISABLED"] {
        assert!(caps.iter().any(|c| c == want), "{want} missing in {caps:?}");
    }
    assert!(!caps.iter().any(|c| c.to_ascii_uppercase().starts_with("AUTH=")), "AUTH= before TLS: {caps:?}");
    assert!(!caps.iter().any(|c| c == "SASL-IR"), "{caps:?}");
}

fn assert_tls_caps(caps: &[String]) {
    for want in ["IMAP4rev1", "AUTH=PLAIN", "AUTH=LOGIN", "SASL-IR"] {
        assert!(caps.iter().any(|c| c == want), "{want} missing in {caps:?}");
    }
    for bad in ["STARTTLS", "LOGINDISABLED"] {
        assert!(!caps.iter().any(|c| c == bad), "{bad} after TLS: {caps:?}");
    }
    // Only PLAIN and LOGIN (case 35), and the bearer mechanisms when OAuth is offered.
    let mechs: Vec<_> = caps.iter().filter(|c| c.starts_with("AUTH=") && !c.contains("OAUTH")).collect();
    assert_eq!(mechs.len(), 2, "{caps:?}");
}

const FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.\r\n";

/// Splits the turn with the given index into reads.
type Chunker<'a> = &'a dyn Fn(usize, &[u8]) -> Vec<Vec<u8>>;

/// What a whole transcript produced: bytes written to the client, actions, and the bytes
/// that went to upstream after a successful login.
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    written: String,
    events: Vec<Ev>,
    relayed: Vec<u8>,
}

/// The password that the fake credential check accepts.
const GOOD: &[u8] = b"right";

/// Runs client turns through a driver that behaves like `net::imap`: a turn is what the
/// client sends before it waits for an answer (a sync literal ends a turn). `chunk` splits
/// each turn into reads. After each turn a pending StartTls is completed. Authenticate with
/// [`GOOD`] succeeds (the bytes after that go to upstream), other credentials fail, and
/// Refuse is answered with its reply.
fn run_turns(tls: bool, turns: &[&[u8]], chunk: Chunker<'_>) -> Transcript {
    run_turns_with(PreAuth::new(HOST, tls, !tls), turns, chunk)
}

/// [`run_turns`] on the session `p` (greeting not yet read).
fn run_turns_with(mut p: PreAuth, turns: &[&[u8]], chunk: Chunker<'_>) -> Transcript {
    let mut t = Transcript { written: String::new(), events: Vec::new(), relayed: Vec::new() };
    let mut done = false;
    let mut closed = false;
    let mut tls_pending = false;
    fn step(p: &mut PreAuth, t: &mut Transcript, done: &mut bool, closed: &mut bool, tls_pending: &mut bool) {
        if *done || *closed {
            return;
        }
        loop {
            let (w, ev) = pump(p);
            t.written.push_str(&w);
            let mut again = false;
            for e in ev {
                t.events.push(e.clone());
                match e {
                    Ev::StartTls => *tls_pending = true,
                    Ev::Auth { pass, .. } if pass == GOOD => {
                        t.relayed.extend(p.auth_succeeded("IMAP4rev1 IDLE"));
                        let (w, ev) = pump(p);
                        t.written.push_str(&w);
                        assert!(ev.is_empty());
                        *done = true;
                        return;
                    }
                    Ev::Auth { .. } => {
                        p.auth_failed(AuthReply::Failed);
                        again = true;
                    }
                    Ev::Refuse(r) => {
                        p.auth_failed(r);
                        again = true;
                    }
                    Ev::Close => {
                        *closed = true;
                        return;
                    }
                }
            }
            if !again {
                return;
            }
        }
    }
    for (i, turn) in turns.iter().enumerate() {
        for c in chunk(i, turn) {
            if closed {
                break;
            }
            if done {
                t.relayed.extend(&c);
                continue;
            }
            p.feed(&c);
            step(&mut p, &mut t, &mut done, &mut closed, &mut tls_pending);
        }
        if tls_pending && !closed {
            tls_pending = false;
            p.tls_started();
            step(&mut p, &mut t, &mut done, &mut closed, &mut tls_pending);
        }
    }
    t
}

fn whole(_: usize, b: &[u8]) -> Vec<Vec<u8>> {
    vec![b.to_vec()]
}

fn bytewise(_: usize, b: &[u8]) -> Vec<Vec<u8>> {
    b.iter().map(|x| vec![*x]).collect()
}

/// Asserts that every way of splitting the turns into reads gives the same transcript as
/// whole turns: each turn split at every position (others whole), every turn split at
/// two positions, and everything byte by byte.
fn assert_split_invariant(tls: bool, turns: &[&[u8]]) -> Transcript {
    assert_split_invariant_with(&|| PreAuth::new(HOST, tls, !tls), turns)
}

/// [`assert_split_invariant`] on sessions made by `new`.
fn assert_split_invariant_with(new: &dyn Fn() -> PreAuth, turns: &[&[u8]]) -> Transcript {
    let run_turns = |_: bool, turns: &[&[u8]], chunk: Chunker<'_>| run_turns_with(new(), turns, chunk);
    let tls = true;
    let reference = run_turns(tls, turns, &whole);
    assert_eq!(run_turns(tls, turns, &bytewise), reference, "byte by byte: {turns:?}");
    for (ti, turn) in turns.iter().enumerate() {
        for cut in 0..=turn.len() {
            let split = |i: usize, b: &[u8]| {
                if i == ti { vec![b[..cut].to_vec(), b[cut..].to_vec()] } else { vec![b.to_vec()] }
            };
            assert_eq!(run_turns(tls, turns, &split), reference, "turn {ti} cut at {cut}: {turns:?}");
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
                    assert_eq!(run_turns(tls, turns, &split), reference, "turn {ti} cut at {a},{b}");
                }
            }
        }
    }
    reference
}

#[test]
fn harness_collects_writes_and_actions() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN u p\r\n"), (String::new(), vec![auth("u", "p")]));
    // While the credentials are checked, nothing happens.
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

// ---------------------------------------------------------------------------------------
// Greeting and capabilities (cases 7, 9, 35)
// ---------------------------------------------------------------------------------------

#[test]
fn greeting_before_tls_offers_starttls_and_no_auth() {
    let g = greeting(false, true);
    assert_eq!(g, format!("* OK [CAPABILITY {CAPS_PLAIN}] {HOST} mailgate ready\r\n"));
    assert_plain_caps(&caps_of(&g));
}

#[test]
fn greeting_on_implicit_tls_offers_auth_and_no_starttls() {
    for starttls in [false, true] {
        let g = greeting(true, starttls);
        assert_eq!(g, format!("* OK [CAPABILITY {CAPS_TLS}] {HOST} mailgate ready\r\n"));
        assert_tls_caps(&caps_of(&g));
    }
}

#[test]
fn never_preauth() {
    for (tls, starttls) in [(false, true), (true, false), (true, true), (false, false)] {
        let g = greeting(tls, starttls);
        assert!(g.starts_with("* OK "), "{g}");
        assert!(!g.to_ascii_uppercase().contains("PREAUTH"), "{g}");
        assert_eq!(g.matches("\r\n").count(), 1, "one greeting line: {g}");
    }
}

#[test]
fn capability_before_tls() {
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"a CAPABILITY\r\n");
    assert!(ev.is_empty());
    assert_eq!(w, format!("* CAPABILITY {CAPS_PLAIN}\r\na OK CAPABILITY completed\r\n"));
    assert_plain_caps(&caps_of(&w));
}

#[test]
fn capability_after_starttls_and_on_implicit_tls() {
    for mut p in [session_after_starttls(), session(true)] {
        let (w, ev) = send(&mut p, b"b CAPABILITY\r\n");
        assert!(ev.is_empty());
        assert_eq!(w, format!("* CAPABILITY {CAPS_TLS}\r\nb OK CAPABILITY completed\r\n"));
        assert_tls_caps(&caps_of(&w));
    }
}

#[test]
fn no_greeting_repeated_after_starttls() {
    // RFC 9051 §6.2.1: after the handshake the client issues CAPABILITY; the server sends nothing.
    let mut p = session_after_starttls();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

// ---------------------------------------------------------------------------------------
// STARTTLS (cases 1, 3, 4, 5, 6, 8, 10)
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_injection_one_segment() {
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"A STARTTLS\r\nXYZAB NOOP\r\n");
    assert_eq!(w, "A OK Begin TLS negotiation now\r\n");
    assert_eq!(ev, vec![Ev::StartTls]);
    assert!(p.shell.buf.is_empty(), "pipelined plaintext kept: {:?}", p.shell.buf);
    p.tls_started();
    // Nothing is answered for XYZAB.
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"C NOOP\r\n"), ("C OK NOOP completed\r\n".into(), vec![]));
}

#[test]
fn starttls_injected_login_never_authenticates() {
    // Case 4: `A STARTTLS\r\nB LOGIN u p\r\n` in one read.
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"A STARTTLS\r\nB LOGIN u p\r\n");
    assert_eq!((w.as_str(), ev), ("A OK Begin TLS negotiation now\r\n", vec![Ev::StartTls]));
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"C NOOP\r\n"), ("C OK NOOP completed\r\n".into(), vec![]));
}

#[test]
fn bytes_between_starttls_and_handshake_are_dropped() {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"A STARTTLS\r\n"), ("A OK Begin TLS negotiation now\r\n".into(), vec![Ev::StartTls]));
    // The client (or a MITM) keeps sending plaintext before the handshake.
    for injected in [&b"XYZAB NOOP\r\n"[..], b"B LOGIN u p\r\n", b"C CAPABILITY\r\n", b"partial {5}"] {
        assert_eq!(send(&mut p, injected), (String::new(), vec![]), "{injected:?}");
        assert!(p.shell.buf.is_empty());
    }
    p.tls_started();
    assert!(p.shell.buf.is_empty());
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"D NOOP\r\n"), ("D OK NOOP completed\r\n".into(), vec![]));
}

#[test]
fn nothing_written_between_starttls_ok_and_handshake() {
    // Case 8: the STARTTLS OK is the last plaintext line, even if polled repeatedly.
    let mut p = session(false);
    let _ = send(&mut p, b"A STARTTLS\r\nB NOOP\r\n");
    for _ in 0..5 {
        assert!(matches!(p.next(), Next::NeedInput));
    }
    p.feed(b"C NOOP\r\n");
    assert!(matches!(p.next(), Next::NeedInput));
}

/// All plaintext bytes are fed (split as given) before the handshake; then `C NOOP`.
fn starttls_injection_run(chunks: &[&[u8]]) -> (String, Vec<Ev>, String, Vec<Ev>) {
    let mut p = session(false);
    let mut w = String::new();
    let mut ev = Vec::new();
    for c in chunks {
        let (w1, e1) = send(&mut p, c);
        w.push_str(&w1);
        ev.extend(e1);
    }
    if ev.contains(&Ev::StartTls) {
        p.tls_started();
    }
    let (w2, e2) = pump(&mut p);
    let (w3, e3) = send(&mut p, b"C NOOP\r\n");
    let mut ev2 = e2;
    ev2.extend(e3);
    (w, ev, w2 + &w3, ev2)
}

#[test]
fn starttls_injection_every_split() {
    let inputs: [&[u8]; 4] = [
        b"A STARTTLS\r\nXYZAB NOOP\r\n",
        b"A STARTTLS\r\nB LOGIN u p\r\n",
        b"A STARTTLS\r\nB CAPABILITY\r\nD LOGOUT\r\n",
        b"A STARTTLS\r\nB LOGIN {3}\r\nabc",
    ];
    for input in inputs {
        let expected = (
            "A OK Begin TLS negotiation now\r\n".to_string(),
            vec![Ev::StartTls],
            "C OK NOOP completed\r\n".to_string(),
            vec![],
        );
        assert_eq!(starttls_injection_run(&[input]), expected);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(starttls_injection_run(&bytes), expected, "byte by byte");
        for a in 0..=input.len() {
            assert_eq!(starttls_injection_run(&[&input[..a], &input[a..]]), expected, "cut at {a}");
            for b in a..=input.len() {
                assert_eq!(
                    starttls_injection_run(&[&input[..a], &input[a..b], &input[b..]]),
                    expected,
                    "cut at {a},{b}"
                );
            }
        }
    }
}

#[test]
fn starttls_after_pipelined_commands() {
    // Commands before STARTTLS in the same read are answered; those after it are not.
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"A NOOP\r\nB STARTTLS\r\nC NOOP\r\n");
    assert_eq!(w, "A OK NOOP completed\r\nB OK Begin TLS negotiation now\r\n");
    assert_eq!(ev, vec![Ev::StartTls]);
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

#[test]
fn starttls_refused_where_not_allowed() {
    // Implicit TLS (case 10).
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a STARTTLS\r\n"), ("a BAD TLS is already active\r\n".into(), vec![]));
    assert_eq!(send(&mut p, b"b NOOP\r\n"), ("b OK NOOP completed\r\n".into(), vec![]));
    // A second STARTTLS inside TLS (case 6e).
    let mut p = session_after_starttls();
    assert_eq!(send(&mut p, b"a STARTTLS\r\n"), ("a BAD TLS is already active\r\n".into(), vec![]));
    // A listener that does not offer STARTTLS.
    let mut p = PreAuth::new(HOST, false, false);
    let _ = pump(&mut p);
    assert_eq!(send(&mut p, b"a STARTTLS\r\n"), ("a BAD STARTTLS is not offered here\r\n".into(), vec![]));
    assert_eq!(send(&mut p, b"b LOGIN u p\r\n").1, vec![]);
}

#[test]
fn spurious_tls_started_does_not_enable_login() {
    // tls_started() without a STARTTLS in progress must not mark the channel as encrypted.
    let mut p = session(false);
    p.tls_started();
    let (w, ev) = send(&mut p, b"a LOGIN u p\r\n");
    assert!(w.starts_with("a NO [PRIVACYREQUIRED]"), "{w}");
    assert!(ev.is_empty());
    // Nor while the OK is still queued (before poll returned StartTls).
    let mut p = session(false);
    p.feed(b"A STARTTLS\r\n");
    p.tls_started();
    assert_eq!(pump(&mut p), ("A OK Begin TLS negotiation now\r\n".into(), vec![Ev::StartTls]));
    p.feed(b"B LOGIN u p\r\n");
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

// ---------------------------------------------------------------------------------------
// Login before TLS (cases 6a, 11)
// ---------------------------------------------------------------------------------------

#[test]
fn login_and_authenticate_before_tls_need_privacy() {
    let ir = base64(b"\0alice\0pw");
    let cmds = [
        "a LOGIN alice pw\r\n".to_string(),
        "a LOGIN \"alice\" \"pw\"\r\n".to_string(),
        format!("a AUTHENTICATE PLAIN {ir}\r\n"),
        "a AUTHENTICATE PLAIN\r\n".to_string(),
        "a AUTHENTICATE PLAIN =\r\n".to_string(),
        "a AUTHENTICATE LOGIN\r\n".to_string(),
        "a authenticate plain\r\n".to_string(),
        "a AUTHENTICATE CRAM-MD5\r\n".to_string(),
    ];
    for cmd in cmds {
        let mut p = session(false);
        let (w, ev) = send(&mut p, cmd.as_bytes());
        assert_eq!(w, "a NO [PRIVACYREQUIRED] Use STARTTLS before logging in.\r\n", "{cmd}");
        assert!(ev.is_empty(), "{cmd}: {ev:?}");
        // No SASL exchange was started: the next line is a command.
        assert_eq!(send(&mut p, b"b NOOP\r\n"), ("b OK NOOP completed\r\n".into(), vec![]), "{cmd}");
    }
}

#[test]
fn login_before_tls_with_literals_never_authenticates() {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"a LOGIN {5}\r\n").0, "+ Ready for literal data\r\n");
    assert_eq!(
        send(&mut p, b"alice {2+}\r\npw\r\n"),
        ("a NO [PRIVACYREQUIRED] Use STARTTLS before logging in.\r\n".into(), vec![])
    );
}

#[test]
fn privacy_refusals_count_as_bad_commands() {
    let mut p = session(false);
    for i in 0..MAX_BAD - 1 {
        let (w, ev) = send(&mut p, format!("a{i} LOGIN u p\r\n").as_bytes());
        assert!(w.starts_with(&format!("a{i} NO [PRIVACYREQUIRED]")), "{w}");
        assert!(ev.is_empty());
    }
    let (w, ev) = send(&mut p, b"z LOGIN u p\r\n");
    assert_eq!(w, "z NO [PRIVACYREQUIRED] Use STARTTLS before logging in.\r\n* BYE Too many invalid commands\r\n");
    assert_eq!(ev, vec![Ev::Close]);
}

// ---------------------------------------------------------------------------------------
// LOGIN forms and literals (cases 24-27)
// ---------------------------------------------------------------------------------------

#[test]
fn login_forms_table() {
    let cases: &[(&[u8], &str, &[u8])] = &[
        (b"a LOGIN alice pw\r\n", "alice", b"pw"),
        (b"a login alice pw\r\n", "alice", b"pw"),
        (b"a LOGIN \"alice@example.com\" \"p w\"\r\n", "alice@example.com", b"p w"),
        (b"a LOGIN \"al\\\"ice\" \"p\\\\w\"\r\n", "al\"ice", b"p\\w"),
        (b"a LOGIN alice@example.com {3+}\r\np\"w\r\n", "alice@example.com", b"p\"w"),
        (b"a LOGIN {5+}\r\nalice {3+}\r\npw1\r\n", "alice", b"pw1"),
        (b"a LOGIN {5+}\r\n\xc3\xa9l\xc3\xa8 {4+}\r\np\r\nw\r\n", "\u{e9}l\u{e8}", b"p\r\nw"),
        (b"a LOGIN alice {2+}\r\n\xff\xfe\r\n", "alice", b"\xff\xfe"),
    ];
    for (input, user, pass) in cases {
        let mut p = session(true);
        let (w, ev) = send(&mut p, input);
        assert_eq!(w, "", "{input:?}");
        assert_eq!(ev, vec![Ev::Auth { user: user.to_string(), pass: pass.to_vec() }], "{}", text(input));
    }
}

#[test]
fn login_refused_before_password_check() {
    // Parsed, but the fields are not acceptable: refused without an Authenticate.
    let long = "p".repeat(sasl::MAX_FIELD + 1);
    let cases = [
        // Truncated / invalid UTF-8 username (case 30).
        b"a LOGIN {1+}\r\n\xc3 pw\r\n".to_vec(),
        b"a LOGIN \"\xc3\" pw\r\n".to_vec(),
        b"a LOGIN \"\xc3\xa9\" pw\r\n".to_vec(),
        b"a LOGIN alice \"\xff\xfe\"\r\n".to_vec(),
        // Control character in the username.
        b"a LOGIN {3+}\r\na\tb pw\r\n".to_vec(),
        // Empty fields.
        b"a LOGIN \"\" pw\r\n".to_vec(),
        b"a LOGIN alice \"\"\r\n".to_vec(),
        // Too long.
        format!("a LOGIN alice \"{long}\"\r\n").into_bytes(),
        format!("a LOGIN \"{long}\" pw\r\n").into_bytes(),
    ];
    for input in cases {
        let mut p = session(true);
        let (w, ev) = send(&mut p, &input);
        assert!(!ev.iter().any(|e| matches!(e, Ev::Auth { .. })), "{}: {ev:?}", text(&input));
        // Either BAD (parser) or a refusal that is answered like a wrong password.
        if ev.is_empty() {
            assert!(w.starts_with("a BAD"), "{}: {w}", text(&input));
        } else {
            assert_eq!(ev, vec![Ev::Refuse(AuthReply::Failed)], "{}", text(&input));
            p.auth_failed(AuthReply::Failed);
            assert_eq!(pump(&mut p).0, format!("a {FAILED}"));
        }
    }
}

#[test]
fn login_with_sync_literals() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN {5}\r\n"), ("+ Ready for literal data\r\n".into(), vec![]));
    // Polling again does not repeat the continuation.
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    // Partial literal data: no second continuation.
    assert_eq!(send(&mut p, b"ali"), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"ce {3}\r\n"), ("+ Ready for literal data\r\n".into(), vec![]));
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"pw1\r\n"), (String::new(), vec![auth("alice", "pw1")]));
}

#[test]
fn login_with_sync_literals_bytewise() {
    let mut p = session(true);
    assert_eq!(send_bytewise(&mut p, b"a LOGIN {5}\r\n"), ("+ Ready for literal data\r\n".into(), vec![]));
    assert_eq!(send_bytewise(&mut p, b"alice {3}\r\n"), ("+ Ready for literal data\r\n".into(), vec![]));
    assert_eq!(send_bytewise(&mut p, b"pw1\r\n"), (String::new(), vec![auth("alice", "pw1")]));
}

#[test]
fn literal_data_that_looks_like_commands_is_data() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN alice {9}\r\n").0, "+ Ready for literal data\r\n");
    assert_eq!(send(&mut p, b"b NOOP\r\nx\r\n"), (String::new(), vec![auth("alice", "b NOOP\r\nx")]));
}

#[test]
fn nonsync_literal_gets_no_continuation() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN {5+}\r\n"), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"alice {3+}\r\n"), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"pw1\r\n"), (String::new(), vec![auth("alice", "pw1")]));
    // At the limit.
    let mut p = session(true);
    assert_eq!(
        send(&mut p, format!("a LOGIN alice {{{MAX_NONSYNC_LITERAL}+}}\r\n").as_bytes()),
        (String::new(), vec![])
    );
    let (_, ev) = send(&mut p, &[b'p'; MAX_NONSYNC_LITERAL]);
    assert!(ev.is_empty());
    // 4096-octet password: parsed, refused by the field cap without a password check.
    assert_eq!(send(&mut p, b"\r\n"), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
}

#[test]
fn sync_literal_limits() {
    let cases: &[(&[u8], &str)] = &[
        (b"a LOGIN {8193}\r\n", "a BAD [TOOBIG] Literal too big\r\n"),
        (b"a LOGIN alice {100000}\r\n", "a BAD [TOOBIG] Literal too big\r\n"),
        (b"a LOGIN {4294967295}\r\n", "a BAD [TOOBIG] Literal too big\r\n"),
    ];
    for (input, want) in cases {
        for bytewise in [false, true] {
            let mut p = session(true);
            let (w, ev) = if bytewise { send_bytewise(&mut p, input) } else { send(&mut p, input) };
            assert_eq!(w, *want, "{}", text(input));
            assert!(!w.contains('+'), "continuation sent for {}", text(input));
            assert!(ev.is_empty());
            assert!(p.shell.buf.is_empty());
            // The connection survives and resynchronises.
            assert_eq!(send(&mut p, b"b NOOP\r\n"), ("b OK NOOP completed\r\n".into(), vec![]));
        }
    }
    // At the limit a continuation is sent.
    let mut p = session(true);
    assert_eq!(send(&mut p, format!("a LOGIN {{{MAX_LITERAL}}}\r\n").as_bytes()).0, "+ Ready for literal data\r\n");
}

#[test]
fn sync_literals_bounded_per_command() {
    // Each literal is under the cap, but the command as a whole is over MAX_COMMAND.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN {8192}\r\n").0, "+ Ready for literal data\r\n");
    let (w, ev) = send(&mut p, &[b'u'; 8192]);
    assert_eq!((w.as_str(), ev.len()), ("", 0));
    let (w, ev) = send(&mut p, b" {8192}\r\n");
    assert_eq!(w, "a BAD [TOOBIG] Literal too big\r\n");
    assert!(ev.is_empty());
    assert!(p.shell.buf.is_empty());
}

#[test]
fn nonsync_literal_too_big_closes() {
    // Case 26: the literal is already on its way, so the connection must end and its bytes
    // must never run as commands.
    for size in [MAX_NONSYNC_LITERAL + 1, 5000] {
        let mut input = format!("a LOGIN {{{size}+}}\r\n").into_bytes();
        let mut data = b"b NOOP\r\n".repeat(size / 8 + 1);
        data.truncate(size);
        input.extend(&data);
        input.extend(b" pw\r\nc NOOP\r\n");
        for bytewise in [false, true] {
            let mut p = session(true);
            // Whole: the announcement is seen only after the data; so send the announcement
            // line first (as a client would), then the rest.
            let (line, rest) = input.split_at(input.iter().position(|b| *b == b'\n').unwrap() + 1);
            let (mut w, mut ev) = if bytewise { send_bytewise(&mut p, line) } else { send(&mut p, line) };
            let (w2, ev2) = send(&mut p, rest);
            w.push_str(&w2);
            ev.extend(ev2);
            assert_eq!(w, "a BAD [TOOBIG] Literal too big\r\n* BYE Literal too big\r\n", "{size}");
            assert_eq!(ev.first(), Some(&Ev::Close));
            assert!(ev.iter().all(|e| *e == Ev::Close));
            assert!(p.shell.buf.is_empty());
        }
    }
}

#[test]
fn nonsync_literals_bounded_per_command() {
    // Four literals of 4096 (the cap), each under the cap, but 16 KiB together. Each announcement
    // ends a read (as when the client sends it in its own segment).
    let mut p = session(true);
    for (i, key) in ["a ID (\"a\" ", " \"b\" ", " \"c\" "].iter().enumerate() {
        let (w, ev) = send(&mut p, format!("{key}{{4096+}}\r\n").as_bytes());
        assert_eq!((w.as_str(), ev.len()), ("", 0), "literal {i}");
        let (w, ev) = send(&mut p, &[b'x'; 4096]);
        assert_eq!((w.as_str(), ev.len()), ("", 0), "literal {i}");
    }
    let (w, ev) = send(&mut p, b" \"d\" {4096+}\r\n");
    assert_eq!(w, "a BAD [TOOBIG] Literal too big\r\n* BYE Literal too big\r\n");
    assert_eq!(ev, vec![Ev::Close]);
}

#[test]
fn line_limit_does_not_count_literal_data() {
    // Two 4000-octet literals and a 1000-octet one: 9 KiB of data, lines well under 8 KiB,
    // command under MAX_COMMAND. Sent as one read (without the final `)\r\n`), then the rest.
    let lit = |n: usize| format!("{{{n}+}}\r\n{}", "x".repeat(n));
    let head = format!("a ID (\"a\" {} \"b\" {} \"c\" {}", lit(4000), lit(4000), lit(1000));
    let mut p = session(true);
    let (mut w, ev) = send(&mut p, head.as_bytes());
    assert!(ev.is_empty(), "closed after the first read: {w}");
    w.push_str(&send(&mut p, b")\r\n").0);
    assert_eq!(w, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n");
}

#[test]
fn literal_data_in_one_read_with_its_command_is_accepted() {
    // The passing half of the case above: the same command complete in one read.
    let lit = |n: usize| format!("{{{n}+}}\r\n{}", "x".repeat(n));
    let cmd = format!("a ID (\"a\" {} \"b\" {} \"c\" {})\r\n", lit(4000), lit(4000), lit(1000));
    let mut p = session(true);
    assert_eq!(send(&mut p, cmd.as_bytes()).0, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n");
}

#[test]
fn absurd_literal_lengths_do_not_panic_or_continue() {
    // Cases 24, 25.
    let inputs: &[&[u8]] = &[
        b"a LOGIN {4294967296}\r\n",
        b"a LOGIN {99999999999999999999999}\r\n",
        b"a LOGIN {99999999999999999999999+}\r\n",
        b"a LOGIN alice {18446744073709551616}\r\n",
        b"a LOGIN {-1}\r\n",
        b"a LOGIN {}\r\n",
        b"a LOGIN {+}\r\n",
    ];
    for input in inputs {
        for bytewise in [false, true] {
            let mut p = session(true);
            let (w, ev) = if bytewise { send_bytewise(&mut p, input) } else { send(&mut p, input) };
            assert!(w.starts_with("a BAD "), "{}: {w}", text(input));
            assert!(!w.contains("+ "), "continuation for {}", text(input));
            assert!(!ev.iter().any(|e| matches!(e, Ev::Auth { .. } | Ev::Refuse(_))));
            // Either the connection ends, or it resynchronises.
            if !ev.contains(&Ev::Close) {
                assert_eq!(send(&mut p, b"b NOOP\r\n").0, "b OK NOOP completed\r\n");
            }
        }
    }
}

#[test]
fn literal_followed_by_garbage_is_bad() {
    // Case 27: a literal followed by anything other than SP or CRLF.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN {3}\r\n").0, "+ Ready for literal data\r\n");
    let (w, ev) = send(&mut p, b"abcX pw\r\n");
    assert_eq!(w, "a BAD Invalid command\r\n");
    assert!(ev.is_empty());
    assert_eq!(send(&mut p, b"b NOOP\r\n").0, "b OK NOOP completed\r\n");
}

#[test]
fn literal_with_nul_is_bad() {
    let mut p = session(true);
    let (w, ev) = send(&mut p, b"a LOGIN alice {3+}\r\np\0w\r\n");
    assert!(w.starts_with("a BAD") || w.starts_with("* BAD"), "{w}");
    assert!(!ev.iter().any(|e| matches!(e, Ev::Auth { .. })));
}

#[test]
fn literal_announced_on_a_discarded_line_closes() {
    // nginx 501520905: a non-synchronizing literal's data is already on its way and must
    // not run as commands.
    let input = b"a XFOO {10+}\r\nXYZ NOOP\r\n";
    let mut p = session(true);
    let (w, ev) = send(&mut p, input);
    assert_eq!(w, "a BAD Invalid command\r\n* BYE Invalid command\r\n");
    assert_eq!(ev, vec![Ev::Close]);
    // Split anywhere except between the CR and LF that end the announcement (the test
    // below covers that split).
    let lf = input.iter().position(|b| *b == b'\n').unwrap();
    for cut in (0..=input.len()).filter(|c| *c != lf) {
        let mut p = session(true);
        let (mut w, mut ev) = send(&mut p, &input[..cut]);
        let (w2, ev2) = send(&mut p, &input[cut..]);
        w.push_str(&w2);
        ev.extend(ev2);
        assert_eq!(w, "a BAD Invalid command\r\n* BYE Invalid command\r\n", "cut at {cut}");
        assert_eq!(ev.first(), Some(&Ev::Close));
    }
}

#[test]
fn sync_literal_on_a_discarded_line_gets_no_continuation() {
    // A compliant client waits for a `+` that never comes; the session goes on.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a XFOO {10}\r\n"), ("a BAD Invalid command\r\n".into(), vec![]));
    assert_eq!(send(&mut p, b"b NOOP\r\n"), ("b OK NOOP completed\r\n".into(), vec![]));
}

#[test]
fn literal_announced_on_a_discarded_line_closes_when_split_inside_crlf() {
    // Read 1: `a XFOO {10+}\r` (the line fails, the discard keeps the CR);
    // read 2: `\nXYZ NOOP\r\n`: the literal's data must not run as a command.
    for input in [&b"a XFOO {10+}\r\nXYZ NOOP\r\n"[..], b"a LOGIN alice \"x {10+}\r\nXYZ NOOP\r\n"] {
        let lf = input.iter().position(|b| *b == b'\n').unwrap();
        let mut p = session(true);
        let (mut w, mut ev) = send(&mut p, &input[..lf]);
        let (w2, ev2) = send(&mut p, &input[lf..]);
        w.push_str(&w2);
        ev.extend(ev2);
        assert_eq!(w, "a BAD Invalid command\r\n* BYE Invalid command\r\n", "{}", text(input));
        assert_eq!(ev.first(), Some(&Ev::Close));
        // Byte by byte hits the same split.
        let mut p = session(true);
        let (w, _) = send_bytewise(&mut p, input);
        assert_eq!(w, "a BAD Invalid command\r\n* BYE Invalid command\r\n", "{}", text(input));
    }
}

// ---------------------------------------------------------------------------------------
// Every-prefix / every-split property (cases 5, 27)
// ---------------------------------------------------------------------------------------

#[test]
fn every_split_plain_commands() {
    let t = assert_split_invariant(
        true,
        &[b"a CAPABILITY\r\nb NOOP\r\n", b"c ID (\"name\" \"Thunderbird\" \"version\" \"128.0\")\r\n", b"d LOGOUT\r\n"],
    );
    assert_eq!(
        t.written,
        format!(
            "* OK [CAPABILITY {CAPS_TLS}] {HOST} mailgate ready\r\n* CAPABILITY {CAPS_TLS}\r\na OK CAPABILITY completed\r\n\
             b OK NOOP completed\r\n* ID (\"name\" \"mailgate\")\r\nc OK ID completed\r\n* BYE Logging out\r\nd OK LOGOUT completed\r\n"
        )
    );
    assert_eq!(t.events, vec![Ev::Close]);
}

#[test]
fn every_split_starttls_then_login() {
    let t = assert_split_invariant(
        false,
        &[
            b"a CAPABILITY\r\nb LOGIN alice right\r\nc STARTTLS\r\n",
            b"d CAPABILITY\r\ne LOGIN alice wrong\r\n",
            b"f LOGIN alice right\r\ng SELECT INBOX\r\n",
            b"h FETCH 1 BODY[]\r\n",
        ],
    );
    assert_eq!(t.events, vec![Ev::StartTls, auth("alice", "wrong"), auth("alice", "right")]);
    assert!(t.written.contains("b NO [PRIVACYREQUIRED]"));
    assert!(t.written.contains(&format!("e {FAILED}")));
    assert!(t.written.ends_with("f OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"), "{}", t.written);
    assert_eq!(t.relayed, b"g SELECT INBOX\r\nh FETCH 1 BODY[]\r\n");
}

#[test]
fn every_split_literals() {
    let t = assert_split_invariant(
        true,
        &[
            b"a LOGIN {5}\r\n",
            b"alice {5}\r\n",
            b"wrong\r\n",
            b"b LOGIN {5+}\r\nalice {5+}\r\nwrong\r\nc NOOP\r\n",
            b"d LOGIN \"alice\" {5}\r\n",
            b"right\r\n",
        ],
    );
    assert_eq!(t.events, vec![auth("alice", "wrong"), auth("alice", "wrong"), auth("alice", "right")]);
    assert_eq!(t.written.matches("+ Ready for literal data\r\n").count(), 3, "{}", t.written);
    assert!(t.written.contains("c OK NOOP completed\r\n"));
}

#[test]
fn every_split_sasl() {
    let ok = base64(b"\0alice\0right");
    let bad = base64(b"\0alice\0wrong");
    let user = base64(b"alice");
    let pass = base64(b"right");
    let turns = [
        format!("a AUTHENTICATE PLAIN {bad}\r\n"),
        "b AUTHENTICATE PLAIN\r\n".to_string(),
        "*\r\n".to_string(),
        "c AUTHENTICATE LOGIN\r\n".to_string(),
        format!("{user}\r\n"),
        format!("{pass}\r\nd NOOP\r\n"),
    ];
    let turns: Vec<&[u8]> = turns.iter().map(|s| s.as_bytes()).collect();
    let t = assert_split_invariant(true, &turns);
    assert_eq!(
        t.events,
        vec![
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled")),
            auth("alice", "right")
        ]
    );
    assert_eq!(t.relayed, b"d NOOP\r\n");
    // `=` is an empty initial response (RFC 4959): refused at once, never a continuation.
    let t =
        assert_split_invariant(true, &[format!("a AUTHENTICATE PLAIN =\r\nb AUTHENTICATE PLAIN {ok}\r\n").as_bytes()]);
    assert_eq!(t.events, vec![Ev::Refuse(AuthReply::Failed), auth("alice", "right")]);
}

#[test]
fn every_split_errors_and_refusals() {
    let t = assert_split_invariant(
        true,
        &[
            b"a SELECT INBOX\r\nb NOOP\r\n",
            b"x FOO bar\r\ny NOOP\r\n",
            b"c AUTHENTICATE CRAM-MD5\r\n",
            b"d LOGIN \"\" pw\r\n",
            b"e NOOP\r\n",
        ],
    );
    assert_eq!(t.events, vec![Ev::Refuse(AuthReply::Failed)]);
    assert_eq!(
        t.written.split_once("ready\r\n").unwrap().1,
        format!(
            "a BAD SELECT is not allowed before authentication\r\nb OK NOOP completed\r\nx BAD Invalid command\r\n\
             y OK NOOP completed\r\nc BAD Unsupported authentication mechanism\r\nd {FAILED}e OK NOOP completed\r\n"
        )
    );
}

// ---------------------------------------------------------------------------------------
// Line length and memory (case 28)
// ---------------------------------------------------------------------------------------

/// An ID command whose line (without CRLF) is `len` octets.
fn id_line(len: usize) -> Vec<u8> {
    let head = b"a ID (\"name\" \"";
    let tail = b"\")";
    let mut v = head.to_vec();
    v.extend(vec![b'x'; len - head.len() - tail.len()]);
    v.extend(tail);
    assert_eq!(v.len(), len);
    v.extend(b"\r\n");
    v
}

#[test]
fn line_of_8192_octets_is_accepted() {
    let line = id_line(MAX_LINE);
    for bytewise in [false, true] {
        let mut p = session(true);
        let (w, ev) = if bytewise { send_bytewise(&mut p, &line) } else { send(&mut p, &line) };
        assert_eq!(w, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n");
        assert!(ev.is_empty());
        // The stored name is bounded.
        assert_eq!(p.client_name().map(str::len), Some(64));
    }
}

/// A LOGIN line of `len` octets (without its CRLF), then CRLF: not an `ID`, so the 8 KiB
/// line limit applies.
fn login_line(len: usize) -> Vec<u8> {
    let head = b"a LOGIN \"";
    let tail = b"\" pw";
    let mut v = head.to_vec();
    v.extend(vec![b'x'; len - head.len() - tail.len()]);
    v.extend(tail);
    assert_eq!(v.len(), len);
    v.extend(b"\r\n");
    v
}

#[test]
fn long_line_without_crlf_closes() {
    for (len, line) in [
        (MAX_LINE + 3, login_line(MAX_LINE + 3)),
        (9000, login_line(9000)),
        (65536, login_line(65536)),
        (MAX_ID_LINE + 3, id_line(MAX_ID_LINE + 3)),
        (65536, id_line(65536)),
    ] {
        let mut line = line;
        line.truncate(len);
        let mut p = session(true);
        let (w, ev) = send_bytewise(&mut p, &line);
        assert_eq!(w, "* BYE Command line too long\r\n", "{len}");
        assert_eq!(ev, vec![Ev::Close]);
        assert!(p.shell.buf.is_empty());
        // Closed: more input is ignored.
        assert_eq!(send(&mut p, b"\r\nb NOOP\r\n"), (String::new(), vec![Ev::Close]));
    }
}

#[test]
fn line_over_8192_octets_is_refused_however_it_arrives() {
    for len in [MAX_LINE + 1, 9000, 16000] {
        let line = login_line(len);
        for bytewise in [false, true] {
            let mut p = session(true);
            let (w, ev) = if bytewise { send_bytewise(&mut p, &line) } else { send(&mut p, &line) };
            assert_eq!((w.as_str(), ev), ("* BYE Command line too long\r\n", vec![Ev::Close]), "{len} {bytewise}");
        }
    }
    // An ID longer than RFC 2971 allows, too.
    let mut p = session(true);
    let (w, _) = send(&mut p, &id_line(MAX_ID_LINE + 1));
    assert_eq!(w, "* BYE Command line too long\r\n");
}

/// RFC 2971 allows 30 field/value pairs of up to 1024 octets (about 32 KB); such an ID
/// was refused by the 8 KiB line limit (imaptest's `id` test). Other commands keep it.
#[test]
fn an_rfc_sized_id_is_accepted() {
    let mut line = b"a ID (".to_vec();
    for n in 0..MAX_ID_PARAMS {
        if n > 0 {
            line.push(b' ');
        }
        line.extend(format!("\"field-{n:02}\" \"").as_bytes());
        line.extend(vec![if n == 0 { b'T' } else { b'v' }; 1024]);
        line.push(b'"');
    }
    line.extend(b")\r\n");
    assert!(line.len() > 31_000 && line.len() < MAX_ID_LINE, "{}", line.len());
    for bytewise in [false, true] {
        let mut p = session(true);
        let (w, ev) = if bytewise { send_bytewise(&mut p, &line) } else { send(&mut p, &line) };
        assert!(w.ends_with("a OK ID completed\r\n"), "{w}");
        assert!(ev.is_empty());
    }
}

/// What a client pipelines behind LOGIN belongs to the mailbox session (issue 14): a
/// 9.5 KB `UID FETCH` line or an `APPEND` with a 6 KB non-synchronizing literal after the
/// LOGIN in the same write got `* BYE Command line too long` or `BAD [TOOBIG]` with the
/// LOGIN's tag. Now LOGIN is answered and the rest goes upstream byte for byte.
#[test]
fn what_is_pipelined_behind_login_goes_upstream_untouched() {
    let mut fetch = b"b UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (".to_vec();
    while fetch.len() < 9500 {
        fetch.extend(b"X-SOME-HEADER ");
    }
    fetch.extend(b")])\r\n");
    let mut append = b"b APPEND INBOX {6049+}\r\n".to_vec();
    append.extend(vec![b'm'; 6049]);
    append.extend(b"\r\nc NOOP\r\n");
    for rest in [fetch, append] {
        let mut bytes = b"a LOGIN u pw\r\n".to_vec();
        bytes.extend(&rest);
        let mut p = session(true);
        assert_eq!(send(&mut p, &bytes), (String::new(), vec![auth("u", "pw")]));
        assert_eq!(p.auth_succeeded("IMAP4rev1"), rest);
        assert_eq!(pump(&mut p).0, "a OK [CAPABILITY IMAP4rev1] Logged in\r\n");
    }
}

#[test]
fn ten_megabytes_without_crlf_closes_early_with_bounded_buffer() {
    let chunk = vec![b'x'; 16 * 1024];
    let bound = MAX_BUFFERED;
    for prefix in [&b""[..], b"a LOGIN ", b"a ID (\"name\" \""] {
        let mut p = session(true);
        p.feed(prefix);
        let mut closed_after = None;
        for i in 0..(10 * 1024 * 1024 / chunk.len()) {
            p.feed(&chunk);
            assert!(p.shell.buf.len() <= bound, "after feed {i}: {}", p.shell.buf.len());
            let (_, ev) = pump(&mut p);
            assert!(p.shell.buf.len() <= bound);
            if ev.contains(&Ev::Close) && closed_after.is_none() {
                closed_after = Some(i);
            }
        }
        // An ID line may reach MAX_ID_LINE (40 KiB): three 16 KiB reads.
        let within = if prefix.starts_with(b"a ID") { 2 } else { 0 };
        assert_eq!(closed_after, Some(within), "{}", text(prefix));
        assert!(p.shell.buf.is_empty());
    }
}

#[test]
fn ten_megabytes_in_sasl_exchange_closes() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a AUTHENTICATE PLAIN\r\n").0, "+ \r\n");
    let chunk = vec![b'A'; 16 * 1024];
    let (w, ev) = send(&mut p, &chunk);
    assert_eq!(w, "* BYE Authentication line too long\r\n");
    assert_eq!(ev, vec![Ev::Close]);
    for _ in 0..640 {
        p.feed(&chunk);
        assert!(p.shell.buf.is_empty());
    }
}

#[test]
fn input_during_credential_check_is_bounded() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a LOGIN u p\r\n").1, vec![auth("u", "p")]);
    let chunk = vec![b'x'; 16 * 1024];
    let mut closed = false;
    for _ in 0..64 {
        p.feed(&chunk);
        assert!(p.shell.buf.len() <= MAX_BUFFERED);
        if p.shell.closed() {
            closed = true;
        }
    }
    assert!(closed);
}

#[test]
fn ten_megabytes_after_a_bad_command_closes() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a XFOO ").0, "a BAD Invalid command\r\n");
    let chunk = vec![b'x'; 16 * 1024];
    let mut closed = false;
    for _ in 0..640 {
        let (_, ev) = send(&mut p, &chunk);
        assert!(p.shell.buf.len() <= MAX_BUFFERED);
        closed |= ev.contains(&Ev::Close);
    }
    assert!(closed, "10 MB on one discarded line and still open");
}

#[test]
fn discarded_line_memory_is_bounded() {
    // The discard state keeps at most a CR, and a discarded line up to the limit is survived.
    let mut p = session(true);
    let _ = send(&mut p, b"a XFOO ");
    for _ in 0..8 {
        let _ = send(&mut p, &[b'x'; 1000]);
        assert!(p.shell.buf.len() <= 1);
    }
    let _ = send(&mut p, b"\r");
    assert_eq!(send(&mut p, b"\nb NOOP\r\n").0, "b OK NOOP completed\r\n");
}

// ---------------------------------------------------------------------------------------
// AUTHENTICATE (cases 36-40)
// ---------------------------------------------------------------------------------------

/// PLAIN payloads and what they must lead to.
fn plain_table() -> Vec<(Vec<u8>, Ev)> {
    let u255 = "u".repeat(255);
    let p255 = "p".repeat(255);
    let mut long = b"\0alice\0".to_vec();
    long.extend(vec![b'p'; sasl::MAX_FIELD + 1]);
    let mut long_user = b"\0".to_vec();
    long_user.extend(vec![b'u'; sasl::MAX_FIELD + 1]);
    long_user.extend(b"\0pw");
    vec![
        (b"\0alice\0pw".to_vec(), auth("alice", "pw")),
        (b"alice\0alice\0pw".to_vec(), auth("alice", "pw")),
        (format!("\0{u255}\0{p255}").into_bytes(), auth(&u255, &p255)),
        (b"victim\0attacker\0pw".to_vec(), Ev::Refuse(AuthReply::AuthzFailed)),
        (b"alice\0pw".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"a\0b\0c\0d".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0\0pw".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0alice\0".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0\0".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0\0\0".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"alicepw".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0al\x01ice\0pw".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (b"\0\xc3\0pw".to_vec(), Ev::Refuse(AuthReply::Failed)),
        (long, Ev::Refuse(AuthReply::Failed)),
        (long_user, Ev::Refuse(AuthReply::Failed)),
    ]
}

fn reply_line(tag: &str, ev: &Ev) -> String {
    match ev {
        Ev::Auth { .. } | Ev::Refuse(AuthReply::Failed) => format!("{tag} {FAILED}"),
        Ev::Refuse(AuthReply::AuthzFailed) => format!("{tag} NO [AUTHORIZATIONFAILED] Authorization failed.\r\n"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn authenticate_plain_with_initial_response() {
    for (msg, want) in plain_table() {
        let mut p = session(true);
        let (w, ev) = send(&mut p, format!("a AUTHENTICATE PLAIN {}\r\n", base64(&msg)).as_bytes());
        assert_eq!(w, "", "{msg:?}");
        assert_eq!(ev, vec![want.clone()], "{msg:?}");
        let reply = match &want {
            Ev::Refuse(r) => r.clone(),
            _ => AuthReply::Failed,
        };
        p.auth_failed(reply);
        assert_eq!(pump(&mut p).0, reply_line("a", &want), "{msg:?}");
    }
}

#[test]
fn authenticate_plain_with_continuation() {
    for (msg, want) in plain_table() {
        for cmd in [&b"a AUTHENTICATE PLAIN\r\n"[..], b"a authenticate plain\r\n"] {
            let mut p = session(true);
            assert_eq!(send(&mut p, cmd), ("+ \r\n".into(), vec![]), "{}", text(cmd));
            let (w, ev) = send(&mut p, format!("{}\r\n", base64(&msg)).as_bytes());
            assert_eq!(w, "");
            assert_eq!(ev, vec![want.clone()], "{msg:?}");
        }
    }
}

/// RFC 4959: `AUTHENTICATE PLAIN =` carries an empty initial response, which is a
/// malformed PLAIN message: refused, with no continuation (it used to be taken as "no
/// initial response" and answered `+ `).
#[test]
fn an_empty_initial_response_is_a_response() {
    for cmd in [&b"a AUTHENTICATE PLAIN =\r\n"[..], b"a authenticate plain =\r\n"] {
        let mut p = session(true);
        let (w, ev) = send(&mut p, cmd);
        assert!(!w.starts_with('+'), "{}: {w:?}", text(cmd));
        assert_eq!(ev, vec![Ev::Refuse(AuthReply::Failed)], "{}", text(cmd));
    }
}

#[test]
fn authenticate_plain_empty_response_fails() {
    let mut p = session(true);
    let _ = send(&mut p, b"a AUTHENTICATE PLAIN\r\n");
    assert_eq!(send(&mut p, b"\r\n"), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
}

#[test]
fn authenticate_cancel() {
    // Case 36: `*` → tagged BAD (MUST), counted as a failure.
    for cmd in [&b"a AUTHENTICATE PLAIN\r\n"[..], b"a AUTHENTICATE LOGIN\r\n"] {
        let mut p = session(true);
        let (w, _) = send(&mut p, cmd);
        assert!(w.starts_with("+ "));
        let (w, ev) = send(&mut p, b"*\r\n");
        assert_eq!(w, "");
        assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled"))]);
        p.auth_failed(AuthReply::Aborted("Authentication cancelled"));
        assert_eq!(pump(&mut p), ("a BAD Authentication cancelled\r\n".into(), vec![]));
        assert_eq!(p.shell.failures, 1);
        assert_eq!(send(&mut p, b"b NOOP\r\n").0, "b OK NOOP completed\r\n");
    }
    // At the password prompt of LOGIN.
    let mut p = session(true);
    let _ = send(&mut p, format!("a AUTHENTICATE LOGIN {}\r\n", base64(b"alice")).as_bytes());
    assert_eq!(send(&mut p, b"*\r\n").1, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled"))]);
}

#[test]
fn three_cancels_close() {
    let mut p = session(true);
    for (i, tag) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(send(&mut p, format!("{tag} AUTHENTICATE PLAIN\r\n").as_bytes()).0, "+ \r\n");
        let (_, ev) = send(&mut p, b"*\r\n");
        let Some(Ev::Refuse(r)) = ev.first().cloned() else { panic!("{ev:?}") };
        p.auth_failed(r);
        let (w, ev) = pump(&mut p);
        if i < 2 {
            assert_eq!(w, format!("{tag} BAD Authentication cancelled\r\n"));
            assert!(ev.is_empty());
        } else {
            assert_eq!(w, "c BAD Authentication cancelled\r\n* BYE Too many authentication failures\r\n");
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
}

#[test]
fn authenticate_invalid_base64() {
    // Case 37.
    for line in
        [&b"!!!notbase64\r\n"[..], b"AG=Fsa\r\n", b"A\r\n", b"AGFsaWNl AHB3\r\n", b"=\r\n", b"* \r\n", b"**\r\n"]
    {
        for cmd in [&b"a AUTHENTICATE PLAIN\r\n"[..], b"a AUTHENTICATE LOGIN\r\n"] {
            let mut p = session(true);
            let _ = send(&mut p, cmd);
            let (w, ev) = send(&mut p, line);
            assert_eq!(w, "", "{}", text(line));
            assert_eq!(
                ev,
                vec![Ev::Refuse(AuthReply::Aborted("Invalid base64 in authentication exchange"))],
                "{}",
                text(line)
            );
            p.auth_failed(AuthReply::Aborted("Invalid base64 in authentication exchange"));
            assert_eq!(pump(&mut p).0, "a BAD Invalid base64 in authentication exchange\r\n");
        }
    }
}

#[test]
fn authenticate_invalid_initial_response_is_bad() {
    for ir in ["!!!", "AG=Fsa", "A"] {
        let mut p = session(true);
        let (w, ev) = send(&mut p, format!("a AUTHENTICATE PLAIN {ir}\r\n").as_bytes());
        assert_eq!(w, "a BAD Invalid command\r\n", "{ir}");
        assert!(ev.is_empty());
    }
}

#[test]
fn authenticate_authzid_refused() {
    // Case 39.
    let mut p = session(true);
    let (_, ev) = send(&mut p, format!("a AUTHENTICATE PLAIN {}\r\n", base64(b"victim\0attacker\0pw")).as_bytes());
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::AuthzFailed)]);
    p.auth_failed(AuthReply::AuthzFailed);
    assert_eq!(pump(&mut p).0, "a NO [AUTHORIZATIONFAILED] Authorization failed.\r\n");
}

#[test]
fn authenticate_login_mechanism() {
    let user = base64(b"alice@example.com");
    let pass = base64(b"pw");
    // Without initial response.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a AUTHENTICATE LOGIN\r\n"), ("+ VXNlcm5hbWU6\r\n".into(), vec![]));
    assert_eq!(send(&mut p, format!("{user}\r\n").as_bytes()), ("+ UGFzc3dvcmQ6\r\n".into(), vec![]));
    assert_eq!(send(&mut p, format!("{pass}\r\n").as_bytes()), (String::new(), vec![auth("alice@example.com", "pw")]));
    // With initial response (the username).
    let mut p = session(true);
    assert_eq!(
        send(&mut p, format!("a AUTHENTICATE LOGIN {user}\r\n").as_bytes()),
        ("+ UGFzc3dvcmQ6\r\n".into(), vec![])
    );
    assert_eq!(send(&mut p, format!("{pass}\r\n").as_bytes()), (String::new(), vec![auth("alice@example.com", "pw")]));
    // Empty initial response `=`: asks for the username.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"a AUTHENTICATE LOGIN =\r\n"), ("+ VXNlcm5hbWU6\r\n".into(), vec![]));
}

#[test]
fn authenticate_login_bad_fields() {
    let bad_users: [&[u8]; 4] = [b"", b"\xc3", b"al\0ice", b"a\x7fb"];
    for user in bad_users {
        let mut p = session(true);
        let _ = send(&mut p, b"a AUTHENTICATE LOGIN\r\n");
        assert_eq!(
            send(&mut p, format!("{}\r\n", base64(user)).as_bytes()),
            (String::new(), vec![Ev::Refuse(AuthReply::Failed)])
        );
        if !user.is_empty() {
            let mut p = session(true);
            assert_eq!(
                send(&mut p, format!("a AUTHENTICATE LOGIN {}\r\n", base64(user)).as_bytes()),
                (String::new(), vec![Ev::Refuse(AuthReply::Failed)])
            );
        }
    }
    let long = vec![b'p'; sasl::MAX_FIELD + 1];
    for pass in [&b""[..], b"p\0w", &long] {
        let mut p = session(true);
        let _ = send(&mut p, format!("a AUTHENTICATE LOGIN {}\r\n", base64(b"alice")).as_bytes());
        assert_eq!(
            send(&mut p, format!("{}\r\n", base64(pass)).as_bytes()),
            (String::new(), vec![Ev::Refuse(AuthReply::Failed)])
        );
    }
}

#[test]
fn unknown_mechanisms_are_bad() {
    let mut p = session(true);
    for (i, mech) in ["CRAM-MD5", "XOAUTH2", "NTLM", "GSSAPI"].iter().enumerate() {
        let (w, ev) = send(&mut p, format!("m{i} AUTHENTICATE {mech}\r\n").as_bytes());
        assert_eq!(w, format!("m{i} BAD Unsupported authentication mechanism\r\n"));
        assert!(ev.is_empty());
    }
    let mut p = session(true);
    let (w, ev) =
        send(&mut p, format!("a AUTHENTICATE XOAUTH2 {}\r\n", base64(b"user=a\x01auth=Bearer x\x01\x01")).as_bytes());
    assert_eq!(w, "a BAD Unsupported authentication mechanism\r\n");
    assert!(ev.is_empty());
}

#[test]
fn sasl_line_limit() {
    // Exactly 8192 octets of base64: accepted as a line (and refused as PLAIN: no NULs).
    let mut p = session(true);
    let _ = send(&mut p, b"a AUTHENTICATE PLAIN\r\n");
    let mut line = vec![b'A'; MAX_SASL_LINE];
    line.extend(b"\r\n");
    assert_eq!(send(&mut p, &line), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
    // Longer: the connection ends, whether the line is complete or not.
    for complete in [true, false] {
        for bytewise in [false, true] {
            let mut p = session(true);
            let _ = send(&mut p, b"a AUTHENTICATE PLAIN\r\n");
            let mut line = vec![b'A'; MAX_SASL_LINE + 4];
            if complete {
                line.extend(b"\r\n");
            }
            let (w, ev) = if bytewise { send_bytewise(&mut p, &line) } else { send(&mut p, &line) };
            assert_eq!(w, "* BYE Authentication line too long\r\n", "complete {complete} bytewise {bytewise}");
            assert_eq!(ev, vec![Ev::Close]);
            assert!(p.shell.buf.is_empty());
        }
    }
}

#[test]
fn sasl_line_is_wiped_from_buffer() {
    let mut p = session(true);
    let _ = send(&mut p, b"a AUTHENTICATE PLAIN\r\n");
    let _ = send(&mut p, format!("{}\r\nb NOOP\r\n", base64(b"\0alice\0hunter2")).as_bytes());
    assert_eq!(p.shell.buf, b"b NOOP\r\n");
}

// ---------------------------------------------------------------------------------------
// Failure replies and the attempt budget (cases 41, 43)
// ---------------------------------------------------------------------------------------

fn login_and_fail(p: &mut PreAuth, tag: &str, reply: AuthReply) -> (String, Vec<Ev>) {
    let (_, ev) = send(p, format!("{tag} LOGIN alice pw\r\n").as_bytes());
    assert_eq!(ev, vec![auth("alice", "pw")]);
    p.auth_failed(reply);
    pump(p)
}

#[test]
fn auth_failed_replies_table() {
    let cases = [
        (AuthReply::Failed, format!("a {FAILED}")),
        (AuthReply::AuthzFailed, "a NO [AUTHORIZATIONFAILED] Authorization failed.\r\n".into()),
        (AuthReply::Aborted("Authentication cancelled"), "a BAD Authentication cancelled\r\n".into()),
        (AuthReply::Unavailable, "a NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n".into()),
        (
            AuthReply::NeedsAppPassword("Use an app password: https://mail.example/app".into()),
            "a NO [ALERT] Use an app password: https://mail.example/app\r\n".into(),
        ),
        // The alert text cannot break out of its line or response code.
        (AuthReply::NeedsAppPassword("x]\r\n* BYE [y\0".into()), "a NO [ALERT] x* BYE y\r\n".into()),
    ];
    for (reply, want) in cases {
        let mut p = session(true);
        assert_eq!(login_and_fail(&mut p, "a", reply.clone()), (want, vec![]), "{reply:?}");
        // Back to reading commands.
        assert_eq!(send(&mut p, b"b NOOP\r\n").0, "b OK NOOP completed\r\n");
    }
}

#[test]
fn app_password_alert_only_once() {
    let mut p = session(true);
    let hint = || AuthReply::NeedsAppPassword("Use an app password".into());
    assert_eq!(login_and_fail(&mut p, "a", hint()).0, "a NO [ALERT] Use an app password\r\n");
    assert_eq!(login_and_fail(&mut p, "b", hint()).0, format!("b {FAILED}"));
}

#[test]
fn three_failures_close() {
    let mut p = session(true);
    assert_eq!(login_and_fail(&mut p, "a", AuthReply::Failed), (format!("a {FAILED}"), vec![]));
    assert_eq!(login_and_fail(&mut p, "b", AuthReply::Unavailable).1, vec![]);
    let (w, ev) = login_and_fail(&mut p, "c", AuthReply::Failed);
    assert_eq!(w, format!("c {FAILED}* BYE Too many authentication failures\r\n"));
    assert_eq!(ev, vec![Ev::Close]);
    assert_eq!(send(&mut p, b"d LOGIN alice pw\r\n"), (String::new(), vec![Ev::Close]));
}

#[test]
fn auth_results_ignored_when_not_authenticating() {
    let mut p = session(true);
    p.auth_failed(AuthReply::Failed);
    assert_eq!(p.auth_succeeded("IMAP4rev1"), Vec::<u8>::new());
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(p.shell.failures, 0);
    assert_eq!(send(&mut p, b"a NOOP\r\n").0, "a OK NOOP completed\r\n");
}

// ---------------------------------------------------------------------------------------
// Success (cases 42, 53)
// ---------------------------------------------------------------------------------------

#[test]
fn auth_succeeded_returns_pipelined_bytes() {
    let mut p = session(true);
    let (w, ev) = send(&mut p, b"a LOGIN u pw\r\nb SELECT INBOX\r\n");
    assert_eq!((w.as_str(), ev), ("", vec![auth("u", "pw")]));
    // The SELECT is not answered while the credentials are checked.
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    // More arrives during the check (including a second login: upstream's business, case 42).
    p.feed(b"c LOGIN other pw2\r\n");
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(p.auth_succeeded("IMAP4rev1 IDLE MOVE"), b"b SELECT INBOX\r\nc LOGIN other pw2\r\n");
    assert_eq!(pump(&mut p), ("a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n".into(), vec![]));
    // Relaying now: the machine takes no more input and answers nothing.
    assert_eq!(send(&mut p, b"d NOOP\r\n"), (String::new(), vec![]));
    assert!(p.shell.buf.is_empty());
    assert_eq!(p.auth_succeeded("X"), Vec::<u8>::new());
}

#[test]
fn auth_succeeded_without_caps_and_after_sasl() {
    let mut p = session(true);
    let (_, ev) = send(&mut p, format!("t1 AUTHENTICATE PLAIN {}\r\n", base64(b"\0u\0pw")).as_bytes());
    assert_eq!(ev, vec![auth("u", "pw")]);
    assert_eq!(p.auth_succeeded(""), Vec::<u8>::new());
    assert_eq!(pump(&mut p), ("t1 OK Logged in\r\n".into(), vec![]));
}

#[test]
fn auth_succeeded_after_failure() {
    let mut p = session(true);
    let _ = login_and_fail(&mut p, "a", AuthReply::Failed);
    let (_, ev) = send(&mut p, b"b LOGIN u right\r\n");
    assert_eq!(ev, vec![auth("u", "right")]);
    assert!(p.auth_succeeded("IMAP4rev1").is_empty());
    assert_eq!(pump(&mut p).0, "b OK [CAPABILITY IMAP4rev1] Logged in\r\n");
}

// ---------------------------------------------------------------------------------------
// Budgets, tags, invalid bytes (cases 30-35)
// ---------------------------------------------------------------------------------------

#[test]
fn disallowed_commands_table() {
    let cases: &[(&[u8], &str)] = &[
        (b"a SELECT INBOX\r\n", "a BAD SELECT is not allowed before authentication\r\n"),
        (b"a EXAMINE INBOX\r\n", "a BAD EXAMINE is not allowed before authentication\r\n"),
        (b"a LIST \"\" *\r\n", "a BAD LIST is not allowed before authentication\r\n"),
        (b"a COMPRESS DEFLATE\r\n", "a BAD COMPRESS is not allowed before authentication\r\n"),
        (b"a ENABLE CONDSTORE\r\n", "a BAD ENABLE is not allowed before authentication\r\n"),
        (b"a IDLE\r\n", "a BAD IDLE is not allowed before authentication\r\n"),
        (b"a APPEND INBOX {3+}\r\nabc\r\n", "a BAD APPEND is not allowed before authentication\r\n"),
        (b"a XFOO\r\n", "a BAD Invalid command\r\n"),
        (b"a NOOP extra\r\n", "a BAD Invalid command\r\n"),
        (b"a\r\n", "a BAD Invalid command\r\n"),
        (b"\r\n", "* BAD Invalid command\r\n"),
        (b" \r\n", "* BAD Invalid command\r\n"),
    ];
    for tls in [true, false] {
        for (input, want) in cases {
            let mut p = session(tls);
            assert_eq!(send(&mut p, input), (want.to_string(), vec![]), "{}", text(input));
            assert_eq!(send(&mut p, b"z NOOP\r\n").0, "z OK NOOP completed\r\n", "{}", text(input));
        }
    }
}

#[test]
fn bad_command_budget() {
    let cmds: [&[u8]; 5] =
        [b"a SELECT INBOX\r\n", b"b COMPRESS DEFLATE\r\n", b"c ENABLE X\r\n", b"d IDLE\r\n", b"e XFOO\r\n"];
    let mut p = session(true);
    for (i, cmd) in cmds.iter().enumerate() {
        let (w, ev) = send(&mut p, cmd);
        assert!(w.starts_with(&format!("{} BAD", (b'a' + i as u8) as char)), "{w}");
        if i + 1 < cmds.len() {
            assert!(ev.is_empty());
        } else {
            assert!(w.ends_with("* BYE Too many invalid commands\r\n"), "{w}");
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
    // All in one read: the same, and nothing after the BYE.
    let mut p = session(true);
    let mut all = cmds.concat();
    all.extend(b"f NOOP\r\n");
    let (w, ev) = send(&mut p, &all);
    assert!(w.ends_with("e BAD Invalid command\r\n* BYE Too many invalid commands\r\n"), "{w}");
    assert!(!w.contains("f OK"));
    assert_eq!(ev, vec![Ev::Close]);
}

#[test]
fn command_budget() {
    let mut p = session(true);
    let noops: Vec<u8> = (0..MAX_COMMANDS - 1).flat_map(|i| format!("n{i} NOOP\r\n").into_bytes()).collect();
    let mut w = String::new();
    for c in noops.chunks(4096) {
        let (w1, ev) = send(&mut p, c);
        assert!(ev.is_empty());
        w.push_str(&w1);
    }
    assert_eq!(w.matches(" OK NOOP completed\r\n").count(), MAX_COMMANDS as usize - 1);
    let (w, ev) = send(&mut p, b"last CAPABILITY\r\nafter NOOP\r\n");
    assert_eq!(
        w,
        format!(
            "* CAPABILITY {CAPS_TLS}\r\nlast OK CAPABILITY completed\r\n* BYE Too many commands without authentication\r\n"
        )
    );
    assert_eq!(ev, vec![Ev::Close]);
}

#[test]
fn tags_table() {
    let t64 = "t".repeat(MAX_TAG);
    let t65 = "t".repeat(MAX_TAG + 1);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (format!("{t64} NOOP\r\n").into_bytes(), format!("{t64} OK NOOP completed\r\n")),
        (format!("{t65} NOOP\r\n").into_bytes(), "* BAD Tag too long\r\n".into()),
        (format!("{t65} LOGIN u p\r\n").into_bytes(), "* BAD Tag too long\r\n".into()),
        (format!("{t65} XFOO\r\n").into_bytes(), "* BAD Invalid command\r\n".into()),
        (b"a+b NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"+ NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a*b NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"* NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a\x01 NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a\x7f NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"\xc3\xa9 NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a% NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a\"b NOOP\r\n".to_vec(), "* BAD Invalid command\r\n".into()),
        (b"a.b-c_d NOOP\r\n".to_vec(), "a.b-c_d OK NOOP completed\r\n".into()),
    ];
    for (input, want) in cases {
        let mut p = session(true);
        assert_eq!(send(&mut p, &input), (want, vec![]), "{}", text(&input));
    }
}

#[test]
fn long_tag_login_is_not_executed() {
    let t65 = "t".repeat(MAX_TAG + 1);
    let mut p = session(true);
    let (w, ev) = send(&mut p, format!("{t65} LOGIN u p\r\n{t65} STARTTLS\r\n").as_bytes());
    assert_eq!(w, "* BAD Tag too long\r\n* BAD Tag too long\r\n");
    assert!(ev.is_empty());
    let mut p = session(false);
    let (_, ev) = send(&mut p, format!("{t65} STARTTLS\r\n").as_bytes());
    assert!(ev.is_empty());
}

#[test]
fn invalid_bytes_table() {
    // Case 30: NUL in a quoted string, bare CR, bare LF → BAD, never a login.
    // A line without CRLF is not over until the next CRLF: the resync then takes one more line.
    let cases: &[(&[u8], &str)] = &[
        (b"a LOGIN \"us\0er\" \"p\"\r\n", "a BAD Invalid command\r\n"),
        (b"a LOGIN alice \"p\0w\"\r\n", "a BAD Invalid command\r\n"),
        (b"a LOGIN \"u\nx\" p\r\n", "a BAD Invalid command\r\n"),
        (b"a LOGIN \"u\rx\" p\r\n", "a BAD Invalid command\r\n"),
        (b"a LOGIN alice pw\n", "a BAD Invalid command\r\n"),
        (b"a LOGIN alice pw\r\r\n", "a BAD Invalid command\r\n"),
        (b"a NOOP\rb NOOP\r\n", "a BAD Invalid command\r\n"),
        (b"a NOOP\nb NOOP\r\n", "a BAD Invalid command\r\n"),
        (b"\0\r\n", "* BAD Invalid command\r\n"),
        (b"a LOGIN alice \"unterminated\r\n", "a BAD Invalid command\r\n"),
    ];
    for (input, want) in cases {
        for bytewise in [false, true] {
            let mut p = session(true);
            let (w, ev) = if bytewise { send_bytewise(&mut p, input) } else { send(&mut p, input) };
            assert_eq!(w, *want, "{} bytewise {bytewise}", text(input));
            assert!(ev.is_empty(), "{}: {ev:?}", text(input));
            // Resynchronised at the CRLF.
            if !input.windows(2).any(|w| w == b"\r\n") {
                assert_eq!(send(&mut p, b"y NOOP\r\n"), (String::new(), vec![]), "{}", text(input));
            }
            assert_eq!(send(&mut p, b"z NOOP\r\n").0, "z OK NOOP completed\r\n", "{}", text(input));
        }
    }
}

// ---------------------------------------------------------------------------------------
// ID, LOGOUT
// ---------------------------------------------------------------------------------------

#[test]
fn id_command() {
    let mut p = session(false);
    assert_eq!(p.client_name(), None);
    let (w, ev) = send(&mut p, b"a ID (\"name\" \"Thunderbird\" \"version\" \"128.0\")\r\n");
    assert_eq!(w, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n");
    assert!(ev.is_empty());
    assert_eq!(p.client_name(), Some("Thunderbird 128.0"));
    // NIL keeps the name already known.
    assert_eq!(send(&mut p, b"b ID NIL\r\n").0, "* ID (\"name\" \"mailgate\")\r\nb OK ID completed\r\n");
    assert_eq!(p.client_name(), Some("Thunderbird 128.0"));
}

#[test]
fn id_name_table() {
    let long = "n".repeat(200);
    let cases: Vec<(String, Option<String>)> = vec![
        ("a ID NIL\r\n".into(), None),
        ("a ID ()\r\n".into(), None),
        ("a ID (\"NAME\" \"K-9\")\r\n".into(), Some("K-9".into())),
        ("a ID (\"version\" \"1\")\r\n".into(), None),
        ("a ID (\"name\" NIL \"version\" \"1\")\r\n".into(), None),
        ("a ID (\"name\" \"x]\" \"version\" \"[1\")\r\n".into(), Some("x 1".into())),
        // A NUL in a literal: BAD, and the connection ends (the literal can't be skipped safely).
        ("a ID (\"name\" {6+}\r\nA\r\nB\0C)\r\n".into(), None),
        ("a ID (\"name\" {6+}\r\nA\r\nB\tC)\r\n".into(), Some("ABC".into())),
        (format!("a ID (\"name\" \"{long}\")\r\n"), Some("n".repeat(64))),
    ];
    for (input, want) in cases {
        let mut p = session(true);
        let (w, ev) = send(&mut p, input.as_bytes());
        if w.starts_with("* ID") {
            assert!(ev.is_empty());
            assert_eq!(w, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n", "{input}");
        } else {
            assert!(w.starts_with("a BAD"), "{input}: {w}");
        }
        assert_eq!(p.client_name(), want.as_deref(), "{input}");
    }
}

#[test]
fn id_parameter_limit() {
    let params = |n: usize| (0..n).map(|i| format!("\"k{i}\" \"v\"")).collect::<Vec<_>>().join(" ");
    let mut p = session(true);
    let (w, _) = send(&mut p, format!("a ID ({})\r\n", params(MAX_ID_PARAMS)).as_bytes());
    assert_eq!(w, "* ID (\"name\" \"mailgate\")\r\na OK ID completed\r\n");
    let (w, ev) = send(&mut p, format!("b ID ({})\r\n", params(MAX_ID_PARAMS + 1)).as_bytes());
    assert_eq!(w, "b BAD Too many ID parameters\r\n");
    assert!(ev.is_empty());
    assert_eq!(p.shell.bad, 1);
}

#[test]
fn logout() {
    for tls in [false, true] {
        let mut p = session(tls);
        let (w, ev) = send(&mut p, b"a LOGOUT\r\nb NOOP\r\n");
        assert_eq!(w, "* BYE Logging out\r\na OK LOGOUT completed\r\n");
        assert_eq!(ev, vec![Ev::Close]);
        assert!(p.shell.buf.is_empty());
        assert_eq!(send(&mut p, b"c NOOP\r\n"), (String::new(), vec![Ev::Close]));
    }
}

// ---------------------------------------------------------------------------------------
// Secrets in Debug output (STYLE habit 3)
// ---------------------------------------------------------------------------------------

const SECRET: &str = "hunter2";

/// `[104, 117, ...]`-style rendering of the secret, as `Debug` prints a `Vec<u8>`.
fn secret_as_debug_bytes(s: &[u8]) -> String {
    s.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
}

#[test]
fn debug_of_authenticate_action_hides_password() {
    let mut p = session(true);
    p.feed(format!("a LOGIN alice {SECRET}\r\n").as_bytes());
    let action = p.next();
    assert!(matches!(action, Next::Event(Action::Authenticate(_))));
    let dbg = format!("{action:?} {action:#?}");
    assert!(dbg.contains("alice"));
    assert!(!dbg.contains(SECRET), "{dbg}");
    assert!(!dbg.contains(&secret_as_debug_bytes(SECRET.as_bytes())), "{dbg}");
    let dbg = format!("{p:?}");
    assert!(!dbg.contains(SECRET), "{dbg}");
    assert!(!dbg.contains(&secret_as_debug_bytes(SECRET.as_bytes())), "{dbg}");
}

#[test]
fn debug_of_preauth_never_contains_password_text() {
    let inputs = [
        format!("a LOGIN alice {SECRET}\r\n"),
        format!("a LOGIN alice \"{SECRET}\"\r\n"),
        format!("a LOGIN alice {{7+}}\r\n{SECRET}\r\n"),
        format!("a AUTHENTICATE PLAIN {}\r\n", base64(format!("\0alice\0{SECRET}").as_bytes())),
    ];
    for input in inputs {
        for cut in 0..=input.len() {
            let mut p = session(true);
            let _ = send(&mut p, &input.as_bytes()[..cut]);
            let dbg = format!("{p:?}");
            assert!(!dbg.contains(SECRET), "{dbg}");
        }
    }
}

#[test]
fn debug_of_preauth_does_not_leak_buffered_password_bytes() {
    let mut p = session(true);
    let _ = send(&mut p, format!("a LOGIN alice \"{SECRET}").as_bytes());
    let dbg = format!("{p:?}");
    assert!(!dbg.contains(&secret_as_debug_bytes(SECRET.as_bytes())), "{dbg}");
}

// ---------------------------------------------------------------------------------------
// Property tests: random input never panics, memory stays bounded, no login before TLS
// ---------------------------------------------------------------------------------------

/// Drives a session over `chunks` like a driver would, checking invariants at every step.
fn drive_invariants(tls: bool, oauth: bool, chunks: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let bound = MAX_BUFFERED;
    let mut p = PreAuth::with_oauth(HOST, tls, !tls, oauth.then(offer));
    let mut encrypted = tls;
    let mut closed = false;
    let mut await_tls = false;
    let mut written = Vec::new();
    for c in chunks {
        p.feed(c);
        prop_assert!(p.shell.buf.len() <= bound);
        if await_tls {
            // Plaintext after STARTTLS, before the handshake: nothing happens.
            prop_assert!(matches!(p.next(), Next::NeedInput));
            prop_assert!(p.shell.buf.is_empty());
            p.tls_started();
            encrypted = true;
            await_tls = false;
            continue;
        }
        for _ in 0..10_000 {
            let a = p.next();
            prop_assert!(p.shell.buf.len() <= bound);
            match a {
                Next::NeedInput => break,
                Next::Write(b) => {
                    prop_assert!(!closed, "write after Close");
                    written.extend(b);
                }
                Next::StartTls => {
                    prop_assert!(!encrypted, "StartTls inside TLS");
                    await_tls = true;
                }
                Next::Event(Action::Authenticate(_)) => {
                    prop_assert!(encrypted, "Authenticate before TLS");
                    p.auth_failed(AuthReply::Failed);
                }
                Next::Event(Action::Refuse(r)) => {
                    prop_assert!(encrypted, "Refuse (SASL exchange) before TLS");
                    p.auth_failed(r);
                }
                Next::Close => {
                    closed = true;
                    break;
                }
            }
        }
    }
    // Every byte written is part of a CRLF-terminated line without bare CR/LF; never PREAUTH.
    if !written.is_empty() {
        prop_assert!(written.ends_with(b"\r\n"));
        for line in written.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            prop_assert!(!line.contains(&b'\r'));
        }
    }
    prop_assert!(!text(&written).contains("PREAUTH"));
    Ok(())
}

fn imapish_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"aAbBlLoOgGiInNsStTrRpP0123456789  \"\"{}+*\r\n\r\n\0\\()=".to_vec())
}

/// Fragments that reach deeper states than random bytes would.
fn imapish_token() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static [u8]> = vec![
        b"a ",
        b"LOGIN ",
        b"AUTHENTICATE ",
        b"PLAIN",
        b"LOGIN",
        b"XOAUTH2",
        b"OAUTHBEARER",
        b"dXNlcj1hAWF1dGg9QmVhcmVyIHQBAQ==",
        b"bixhPWEsAWF1dGg9QmVhcmVyIHQBAQ==",
        b"AQ==",
        b"STARTTLS",
        b"NOOP",
        b"CAPABILITY",
        b"ID ",
        b"LOGOUT",
        b"SELECT ",
        b"\r\n",
        b"\r",
        b"\n",
        b" ",
        b"\"",
        b"{3}\r\n",
        b"{3+}\r\n",
        b"{0}\r\n",
        b"{4097+}\r\n",
        b"{9000}\r\n",
        b"*",
        b"=",
        b"AGFsaWNlAHB3",
        b"YWxpY2U=",
        b"alice",
        b"pw",
        b"\0",
        b"}",
        b"(",
        b")",
        b"NIL",
        b"\"name\" \"x\"",
        b"XFOO ",
        b"+",
        b"\\",
    ];
    prop::sample::select(tokens).prop_map(|t| t.to_vec())
}

/// Whole (mostly valid) command lines and SASL lines, so that random sessions get past
/// the parser into STARTTLS, literals and the SASL states.
fn imapish_line() -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<&'static [u8]> = vec![
        b"a STARTTLS\r\n",
        b"a CAPABILITY\r\n",
        b"a NOOP\r\n",
        b"a LOGIN alice pw\r\n",
        b"a LOGIN \"alice\" \"pw\"\r\n",
        b"a LOGIN {5}\r\n",
        b"a LOGIN {5+}\r\nalice {2+}\r\npw\r\n",
        b"alice {2}\r\n",
        b"pw\r\n",
        b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n",
        b"a AUTHENTICATE PLAIN\r\n",
        b"a AUTHENTICATE PLAIN =\r\n",
        b"a AUTHENTICATE LOGIN\r\n",
        b"a AUTHENTICATE LOGIN YWxpY2U=\r\n",
        b"AGFsaWNlAHB3\r\n",
        b"dmljdGltAGFsaWNlAHB3\r\n",
        b"YWxpY2U=\r\n",
        b"*\r\n",
        b"!!!\r\n",
        b"a ID (\"name\" \"x\")\r\n",
        b"a SELECT INBOX\r\n",
        b"a XFOO {3+}\r\n",
        b"a LOGIN {4097+}\r\n",
        b"a LOGIN {9000}\r\n",
        b"\r\n",
    ];
    prop::sample::select(lines).prop_map(|l| l.to_vec())
}

/// A stream of lines and tokens, cut into reads at random places.
fn imapish_session() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        prop::collection::vec(prop_oneof![4 => imapish_line(), 1 => imapish_token()], 0..24),
        prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    )
        .prop_map(|(parts, cuts)| {
            let bytes = parts.concat();
            split_at(&bytes, cuts.iter().map(|c| c.index(bytes.len() + 1)))
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(512), .. ProptestConfig::default() })]

    #[test]
    fn prop_random_bytes(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(any::<u8>(), 0..96))) {
        drive_invariants(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_imapish_alphabet(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(imapish_byte(), 0..96))) {
        drive_invariants(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_imapish_tokens(
        tls in any::<bool>(),
        oauth in any::<bool>(),
        chunks in chunked(prop::collection::vec(imapish_token(), 0..12).prop_map(|v| v.concat())),
    ) {
        drive_invariants(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_imapish_sessions(tls in any::<bool>(), oauth in any::<bool>(), chunks in imapish_session()) {
        drive_invariants(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_big_chunks(tls in any::<bool>(), oauth in any::<bool>(), chunks in prop::collection::vec(prop::collection::vec(imapish_byte(), 0..20_000), 0..4)) {
        drive_invariants(tls, oauth, &chunks)?;
    }

    /// A valid session transcript gives the same result however its turns are cut into reads.
    #[test]
    fn prop_random_chunking_of_valid_transcript(cuts in prop::collection::vec(0usize..200, 0..8)) {
        let turns: [&[u8]; 6] = [
            b"a CAPABILITY\r\nb ID (\"name\" \"x\")\r\nc STARTTLS\r\n",
            b"d LOGIN {5}\r\n",
            b"alice {5+}\r\nwrong\r\ne NOOP\r\n",
            b"f AUTHENTICATE PLAIN\r\n",
            b"*\r\n",
            b"g AUTHENTICATE PLAIN AGFsaWNlAHJpZ2h0\r\nh SELECT INBOX\r\n",
        ];
        let reference = run_turns(false, &turns, &whole);
        let split = |_: usize, b: &[u8]| split_at(b, cuts.iter().map(|c| c % (b.len() + 1)));
        prop_assert_eq!(run_turns(false, &turns, &split), reference);
    }
}

#[test]
fn valid_transcript_reference() {
    // The reference of prop_random_chunking_of_valid_transcript, spelled out once.
    let turns: [&[u8]; 6] = [
        b"a CAPABILITY\r\nb ID (\"name\" \"x\")\r\nc STARTTLS\r\n",
        b"d LOGIN {5}\r\n",
        b"alice {5+}\r\nwrong\r\ne NOOP\r\n",
        b"f AUTHENTICATE PLAIN\r\n",
        b"*\r\n",
        b"g AUTHENTICATE PLAIN AGFsaWNlAHJpZ2h0\r\nh SELECT INBOX\r\n",
    ];
    let t = run_turns(false, &turns, &whole);
    assert_eq!(
        t.events,
        vec![
            Ev::StartTls,
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled")),
            auth("alice", "right")
        ]
    );
    let after_greeting = t.written.split_once("ready\r\n").unwrap().1;
    assert_eq!(
        after_greeting,
        format!(
            "* CAPABILITY {CAPS_PLAIN}\r\na OK CAPABILITY completed\r\n* ID (\"name\" \"mailgate\")\r\nb OK ID completed\r\n\
             c OK Begin TLS negotiation now\r\n+ Ready for literal data\r\nd {FAILED}e OK NOOP completed\r\n+ \r\n\
             f BAD Authentication cancelled\r\ng OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
        )
    );
    assert_eq!(t.relayed, b"h SELECT INBOX\r\n");
}

#[test]
fn oversized_literals_are_refused_however_the_reads_fall() {
    // Found by a review: with the data in the same read as `{N+}\r\n`, the limit was missed.
    for input in [&b"a LOGIN {4097+}\r\nxxxxxxxxxx"[..], b"a LOGIN {5000+}\r\n"] {
        let mut p = session(true);
        let (w, ev) = send(&mut p, input);
        assert!(w.starts_with("a BAD [TOOBIG]"), "{input:?}: {w:?}");
        assert!(ev.contains(&Ev::Close), "{input:?}");
    }
    let mut big = b"a LOGIN {5000+}\r\n".to_vec();
    big.extend(vec![b'x'; 5000]);
    big.extend(b" password\r\n");
    let mut p = session(true);
    let (w, ev) = send(&mut p, &big);
    assert!(w.starts_with("a BAD [TOOBIG]") && ev.contains(&Ev::Close), "{w:?}");
    // A synchronizing literal over the limit whose data comes without waiting for `+`.
    let mut sync = b"b LOGIN {9000}\r\n".to_vec();
    sync.extend(vec![b'y'; 100]);
    let mut p = session(true);
    let (w, _) = send(&mut p, &sync);
    assert!(w.starts_with("b BAD [TOOBIG]"), "{w:?}");
    // Within the limits, however split, nothing changes.
    let mut ok = b"c LOGIN {5+}\r\nalice {4+}\r\npass\r\n".to_vec();
    let mut p = session(true);
    let (_, ev) = send(&mut p, &ok);
    assert!(matches!(ev.first(), Some(Ev::Auth { .. })), "{ev:?}");
    ok.clear();
}

/// The committed corpus (fuzz/corpus/imap) replays under `cargo test`.
#[test]
fn corpus_replays() {
    let cases = crate::proto::corpus_cuts("imap");
    assert!(cases.len() >= 12, "corpus missing: {}", cases.len());
    for (name, chunks) in cases {
        for (tls, oauth) in [(false, false), (true, false), (false, true), (true, true)] {
            if let Err(e) = drive_invariants(tls, oauth, &chunks) {
                panic!("{name} (tls {tls}, oauth {oauth}): {e}");
            }
        }
    }
}

/// A browser's HTTP request (ALPACA) or a TLS ClientHello as the first line, on the plain
/// port or after STARTTLS, closes the connection at once and echoes nothing of it: no tag,
/// no word (issue 14). An IMAP tag that happens to be `GET` is still IMAP.
#[test]
fn another_protocols_first_line_closes_without_an_echo() {
    for first in [
        &b"POST / HTTP/1.1\r\nHost: mail.example.com\r\nContent-Length: 30\r\n\r\na LOGIN alice pw\r\n"[..],
        b"GET /?<script> HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143\r\na NOOP\r\n",
        b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
    ] {
        for tls in [false, true] {
            let mut p = session(tls);
            let (w, ev) = send(&mut p, first);
            assert_eq!((w.as_str(), ev), ("", vec![Ev::Close]), "{}", text(first));
        }
    }
    // After STARTTLS the first line is checked again.
    let mut p = session(false);
    let _ = send(&mut p, b"a NOOP\r\n");
    let _ = send(&mut p, b"s STARTTLS\r\n");
    p.tls_started();
    let (w, ev) = send(&mut p, b"POST / HTTP/1.1\r\n");
    assert_eq!((w.as_str(), ev), ("", vec![Ev::Close]));
    // Only the first line: later lines are IMAP's business (a BAD, no close).
    let mut p = session(true);
    let _ = send(&mut p, b"a NOOP\r\n");
    let (w, _) = send(&mut p, b"GET / HTTP/1.1\r\n");
    assert!(w.starts_with("GET BAD"), "{w:?}");
    let mut p = session(true);
    let (w, _) = send(&mut p, b"GET NOOP\r\n");
    assert_eq!(w, "GET OK NOOP completed\r\n");
}

/// The client's own ID fields are kept to be passed on to upstream (issue 14), without
/// the `x-` ones a client could use to pose as another address (upstream trusts them
/// from mailgate), and without fields that have no value.
#[test]
fn id_fields_are_kept_for_upstream_without_x_fields() {
    let mut p = session(false);
    send(
        &mut p,
        b"a ID (\"name\" \"Thunderbird\" \"Version\" \"128.0\" \"os\" \"Linux\" \"x-originating-ip\" \"10.0.0.1\" \"X-Session-Id\" \"s\" \"vendor\" NIL)\r\n",
    );
    let want: Vec<(String, String)> =
        [("name", "Thunderbird"), ("version", "128.0"), ("os", "Linux")].map(|(k, v)| (k.into(), v.into())).into();
    assert_eq!(p.client_id(), want.as_slice());
}

// ---------------------------------------------------------------------------------------
// OAuth 2.0 bearer tokens: XOAUTH2 and OAUTHBEARER (issue 16)
// ---------------------------------------------------------------------------------------

const METADATA: &str = "https://mail.example.com/.well-known/oauth-authorization-server";

fn offer() -> OAuthOffer {
    OAuthOffer { metadata_url: METADATA.to_string() }
}

/// A session offering OAuth, its greeting read.
fn oauth_session(tls: bool) -> PreAuth {
    let mut p = PreAuth::with_oauth(HOST, tls, !tls, Some(offer()));
    let (g, ev) = pump(&mut p);
    assert!(g.starts_with("* OK "), "{g}");
    assert!(ev.is_empty());
    p
}

fn oauthbearer(user: &str, token: &str) -> String {
    testing::oauthbearer(user, "mx.example", 993, token)
}

/// The error challenge line of a refused token.
fn challenge(mech: BearerMechanism) -> String {
    format!("+ {}\r\n", offer().error_challenge(mech))
}

#[test]
fn oauth_capabilities_only_inside_tls_and_only_when_offered() {
    let bearer = |caps: &[String]| caps.iter().filter(|c| c.contains("OAUTH")).cloned().collect::<Vec<_>>();
    for (oauth, want) in [(false, vec![]), (true, vec!["AUTH=XOAUTH2".to_string(), "AUTH=OAUTHBEARER".to_string()])] {
        // Implicit TLS: greeting and CAPABILITY.
        let mut p = PreAuth::with_oauth(HOST, true, false, oauth.then(offer));
        let (g, _) = pump(&mut p);
        assert_tls_caps(&caps_of(&g));
        assert_eq!(bearer(&caps_of(&g)), want, "{g}");
        let (w, _) = send(&mut p, b"c CAPABILITY\r\n");
        assert_eq!(bearer(&caps_of(&w)), want, "{w}");
        // Plaintext before STARTTLS: no mechanism at all; after it, the same as TLS.
        let mut p = PreAuth::with_oauth(HOST, false, true, oauth.then(offer));
        let (g, _) = pump(&mut p);
        assert_plain_caps(&caps_of(&g));
        let (w, _) = send(&mut p, b"c CAPABILITY\r\n");
        assert_plain_caps(&caps_of(&w));
        let _ = send(&mut p, b"s STARTTLS\r\n");
        p.tls_started();
        let (w, _) = send(&mut p, b"c CAPABILITY\r\n");
        assert_eq!(bearer(&caps_of(&w)), want, "{w}");
    }
}

#[test]
fn bearer_before_tls_is_refused_like_every_login() {
    let mut p = oauth_session(false);
    let (w, ev) = send(&mut p, format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "tok")).as_bytes());
    assert_eq!(w, "a NO [PRIVACYREQUIRED] Use STARTTLS before logging in.\r\n");
    assert!(ev.is_empty());
}

#[test]
fn xoauth2_and_oauthbearer_with_and_without_initial_response() {
    // SASL-IR, as Thunderbird sends it.
    let mut p = oauth_session(true);
    expect_bearer(
        &mut p,
        format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "tok-1")).as_bytes(),
        "alice",
        "tok-1",
    );
    let mut p = oauth_session(true);
    let ir = oauthbearer("alice", "tok-2");
    expect_bearer(&mut p, format!("a AUTHENTICATE OAUTHBEARER {ir}\r\n").as_bytes(), "alice", "tok-2");
    // Without: an empty continuation, then the message.
    for (mech, msg) in [("XOAUTH2", xoauth2("bob", "tok-3")), ("oauthbearer", oauthbearer("bob", "tok-3"))] {
        let mut p = oauth_session(true);
        let (w, ev) = send(&mut p, format!("b AUTHENTICATE {mech}\r\n").as_bytes());
        assert_eq!((w.as_str(), ev), ("+ \r\n", vec![]));
        expect_bearer(&mut p, format!("{msg}\r\n").as_bytes(), "bob", "tok-3");
        p.auth_succeeded("IMAP4rev1");
        assert_eq!(pump(&mut p).0, "b OK [CAPABILITY IMAP4rev1] Logged in\r\n");
    }
}

/// A token the gate refuses: the mechanism's error challenge, then — whatever the client
/// answers — the tagged failure, and the session reads commands again.
#[test]
fn a_refused_token_gets_the_error_challenge_then_the_failure() {
    let xo = xoauth2("alice", "expired");
    let answers: [&[u8]; 5] = [
        b"AQ==\r\n",                                                  // RFC 7628: %x01
        b"\r\n",                                                      // empty (Google's XOAUTH2)
        b"*\r\n",                                                     // a cancel
        format!("a AUTHENTICATE XOAUTH2 {xo}\r\n").leak().as_bytes(), // Thunderbird: the command again
        b"not base64 at all!\r\n",
    ];
    for answer in answers {
        for (mech, ir) in
            [(BearerMechanism::XOAuth2, xo.clone()), (BearerMechanism::OAuthBearer, oauthbearer("alice", "expired"))]
        {
            let mut p = oauth_session(true);
            expect_bearer(&mut p, format!("a AUTHENTICATE {} {ir}\r\n", mech.name()).as_bytes(), "alice", "expired");
            p.auth_failed(AuthReply::Failed);
            assert_eq!(pump(&mut p), (challenge(mech), vec![]));
            let (w, ev) = send(&mut p, answer);
            assert_eq!(
                (w.as_str(), ev),
                ("a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", vec![]),
                "{answer:?}"
            );
            assert_eq!(send(&mut p, b"n NOOP\r\n").0, "n OK NOOP completed\r\n");
        }
    }
    // The challenge JSON itself.
    let json = |m| {
        String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, offer().error_challenge(m)).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(json(BearerMechanism::XOAuth2), r#"{"status":"401","schemes":"Bearer","scope":"mail"}"#);
    assert!(json(BearerMechanism::OAuthBearer).contains(&format!(r#""openid-configuration":"{METADATA}""#)));
}

/// Only the gate's "wrong credentials" gets the challenge: a malformed message (nothing
/// was checked), an unavailable check or too many sessions keep their plain replies, and
/// so does a password login after a bearer one.
#[test]
fn other_refusals_of_a_bearer_login_keep_their_replies() {
    let mut p = oauth_session(true);
    let (w, ev) = send(
        &mut p,
        format!("a AUTHENTICATE XOAUTH2 {}\r\n", base64(b"user=alice\x01auth=Bearer \x01\x01")).as_bytes(),
    );
    assert_eq!((w.as_str(), ev.clone()), ("", vec![Ev::Refuse(AuthReply::Failed)]));
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    // `=`: an empty initial response, malformed.
    let (_, ev) = send(&mut p, b"b AUTHENTICATE OAUTHBEARER =\r\n");
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Failed)]);
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, "b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    let mut p = oauth_session(true);
    for (reply, line) in [
        (AuthReply::Unavailable, "c NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n"),
        (AuthReply::TooMany, "c NO [LIMIT] Too many connections for this account from your address.\r\n"),
    ] {
        expect_bearer(&mut p, format!("c AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes(), "alice", "t");
        p.auth_failed(reply);
        assert_eq!(pump(&mut p).0, line);
    }
    let mut p = oauth_session(true);
    expect_bearer(&mut p, format!("c AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes(), "alice", "t");
    p.auth_failed(AuthReply::Unavailable);
    let _ = pump(&mut p);
    let (_, ev) = send(&mut p, b"d LOGIN alice pw\r\n");
    assert_eq!(ev, vec![auth("alice", "pw")]);
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, "d NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
}

#[test]
fn cancel_and_bad_base64_in_a_bearer_exchange() {
    let mut p = oauth_session(true);
    let _ = send(&mut p, b"a AUTHENTICATE XOAUTH2\r\n");
    let (_, ev) = send(&mut p, b"*\r\n");
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled"))]);
    p.auth_failed(AuthReply::Aborted("Authentication cancelled"));
    assert_eq!(pump(&mut p).0, "a BAD Authentication cancelled\r\n");
    let _ = send(&mut p, b"b AUTHENTICATE OAUTHBEARER\r\n");
    let (_, ev) = send(&mut p, b"!!!\r\n");
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Invalid base64 in authentication exchange"))]);
}

/// Three refused tokens end the connection, after the third failure line.
#[test]
fn refused_tokens_count_as_failures() {
    let mut p = oauth_session(true);
    for i in 0..MAX_AUTH_FAILURES {
        expect_bearer(
            &mut p,
            format!("t{i} AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "x")).as_bytes(),
            "alice",
            "x",
        );
        p.auth_failed(AuthReply::Failed);
        assert_eq!(pump(&mut p).0, challenge(BearerMechanism::XOAuth2));
        let (w, ev) = send(&mut p, b"\r\n");
        if i + 1 < MAX_AUTH_FAILURES {
            assert_eq!(w, format!("t{i} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"));
        } else {
            assert_eq!(
                w,
                format!(
                    "t{i} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n* BYE Too many authentication failures\r\n"
                )
            );
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
}

/// The answer to the error challenge is bounded like every SASL line, and wiped.
#[test]
fn the_answer_to_the_error_challenge_is_bounded() {
    let mut p = oauth_session(true);
    expect_bearer(&mut p, format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", "x")).as_bytes(), "alice", "x");
    p.auth_failed(AuthReply::Failed);
    let _ = pump(&mut p);
    let (w, ev) = send(&mut p, &vec![b'A'; MAX_SASL_LINE + 3]);
    assert_eq!((w.as_str(), ev), ("* BYE Authentication line too long\r\n", vec![Ev::Close]));
    // A long token (as big as a token may be) fits, and its line is wiped from the buffer.
    let mut p = oauth_session(true);
    let token = "t".repeat(sasl::MAX_TOKEN);
    let line = format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2("alice", &token));
    expect_bearer(&mut p, line.as_bytes(), "alice", &token);
    p.auth_failed(AuthReply::Failed);
    let _ = pump(&mut p);
    let (w, _) = send(&mut p, line.as_bytes());
    assert_eq!(w, "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    assert!(p.shell.buf.is_empty());
}

#[test]
fn every_split_bearer_exchanges() {
    let new = || PreAuth::with_oauth(HOST, true, false, Some(offer()));
    let wrong = xoauth2("alice", "wrong");
    let turns = [
        format!("a AUTHENTICATE XOAUTH2 {wrong}\r\n"),
        format!("a AUTHENTICATE XOAUTH2 {wrong}\r\n"),
        "b AUTHENTICATE OAUTHBEARER\r\n".to_string(),
        "*\r\n".to_string(),
        "c AUTHENTICATE OAUTHBEARER\r\n".to_string(),
        format!("{}\r\nd NOOP\r\n", oauthbearer("alice", "right")),
    ];
    let turns: Vec<&[u8]> = turns.iter().map(|s| s.as_bytes()).collect();
    let t = assert_split_invariant_with(&new, &turns);
    assert_eq!(
        t.events,
        vec![
            Ev::Auth { user: "alice".into(), pass: b"wrong".to_vec() },
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled")),
            Ev::Auth { user: "alice".into(), pass: b"right".to_vec() },
        ]
    );
    assert!(t.written.contains(&format!(
        "{}a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n+ \r\nb BAD Authentication cancelled\r\n+ \r\nc OK",
        challenge(BearerMechanism::XOAuth2)
    )), "{}", t.written);
    assert_eq!(t.relayed, b"d NOOP\r\n");
}
