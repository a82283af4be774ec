//! Session tests for the POP3 pre-auth machine: bytes in, bytes and actions out, no sockets.

use super::*;
use crate::proto::chunked;
use crate::proto::imap::base64;
use crate::proto::testing::{self, auth, expect_bearer, pump, send, split_at, text, xoauth2};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A non-`Write` action, in a form tests can compare.
type Ev = testing::Ev<AuthReply>;

const HOST: &str = "pop.example";
const GREETING: &str = "+OK pop.example ready.\r\n";
const FAILED: &str = "-ERR [AUTH] Authentication failed.\r\n";
const TLS_REQUIRED: &str = "-ERR [AUTH] TLS required: use STLS first\r\n";

/// A new session with its greeting read. `tls`: implicit TLS; otherwise an STLS listener.
fn session(tls: bool) -> PreAuth {
    let mut p = PreAuth::new(HOST, tls, !tls);
    assert_eq!(pump(&mut p), (GREETING.to_string(), vec![]));
    p
}

/// A session on the STLS listener that has completed STLS.
fn session_after_stls() -> PreAuth {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"STLS\r\n"), ("+OK Begin TLS negotiation\r\n".into(), vec![Ev::StartTls]));
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    p
}

fn plain_ir(user: &str, pass: &str) -> String {
    base64(format!("\0{user}\0{pass}").as_bytes())
}

// ---------------------------------------------------------------------------------------
// Greeting, CAPA, QUIT, unknown commands
// ---------------------------------------------------------------------------------------

#[test]
fn greeting_has_no_apop_timestamp() {
    for (tls, stls) in [(false, true), (true, false), (false, false)] {
        let mut p = PreAuth::new(HOST, tls, stls);
        let (g, ev) = pump(&mut p);
        assert_eq!(g, GREETING);
        assert!(!g.contains('<'));
        assert!(ev.is_empty());
    }
    // A hostname cannot inject a line.
    let mut p = PreAuth::new("evil\r\n+OK x", true, false);
    let (g, _) = pump(&mut p);
    assert_eq!(g.matches("\r\n").count(), 1, "{g:?}");
}

#[test]
fn capa_on_the_plain_port_offers_stls_and_no_login() {
    let mut p = session(false);
    assert_eq!(
        send(&mut p, b"CAPA\r\n").0,
        "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n"
    );
}

#[test]
fn capa_inside_tls_offers_user_and_sasl() {
    let want = "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n\
                USER\r\nSASL PLAIN LOGIN\r\n.\r\n";
    let mut p = session(true);
    assert_eq!(send(&mut p, b"CAPA\r\n").0, want);
    let mut p = session_after_stls();
    assert_eq!(send(&mut p, b"capa\r\n").0, want, "case-insensitive, no STLS after STLS");
}

#[test]
fn capa_on_a_plain_port_without_stls_offers_neither() {
    let mut p = PreAuth::new(HOST, false, false);
    let _ = pump(&mut p);
    assert_eq!(
        send(&mut p, b"CAPA\r\n").0,
        "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n.\r\n"
    );
    assert_eq!(send(&mut p, b"STLS\r\n").0, "-ERR STLS is not offered here\r\n");
    assert_eq!(send(&mut p, b"USER alice\r\n").0, "-ERR [AUTH] TLS required\r\n");
}

#[test]
fn quit_says_bye_and_closes() {
    for tls in [false, true] {
        let mut p = session(tls);
        assert_eq!(send(&mut p, b"QUIT\r\nCAPA\r\n"), ("+OK Bye\r\n".into(), vec![Ev::Close]));
        // Nothing after the close.
        assert!(matches!(p.next(), Next::Close));
    }
}

#[test]
fn transaction_commands_and_unknown_ones_are_refused() {
    let mut p = session(true);
    for cmd in ["NOOP", "STAT", "LIST 1", "RETR 1", "DELE 1", "RSET"] {
        assert_eq!(send(&mut p, format!("{cmd}\r\n").as_bytes()).0, "-ERR Not allowed before login\r\n", "{cmd}");
        p = session(true);
    }
    // Unknown commands are not echoed.
    assert_eq!(send(&mut p, b"XYZZY <script>\r\n").0, "-ERR Unknown command\r\n");
    assert_eq!(send(&mut p, b"APOP alice 0123\r\n").0, "-ERR Unknown command\r\n");
    assert_eq!(send(&mut p, b"\r\n").0, "-ERR Unknown command\r\n");
}

#[test]
fn bare_lf_ends_a_line_like_crlf() {
    let mut p = session(true);
    let (w, ev) = send(&mut p, b"CAPA\nUSER alice\nPASS secret\n");
    assert!(w.ends_with(".\r\n+OK Send your password\r\n"), "{w:?}");
    assert_eq!(ev, vec![auth("alice", "secret")]);
}

#[test]
fn goodbye_lines() {
    let p = session(true);
    assert_eq!(p.goodbye(Goodbye::Timeout), Some(&b"-ERR Disconnected for inactivity.\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::Shutdown), Some(&b"-ERR [SYS/TEMP] Server shutting down.\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::Revoked), Some(&b"-ERR [AUTH] Access revoked.\r\n"[..]));
    for why in [Goodbye::Idle, Goodbye::TooLong] {
        let line = p.goodbye(why).unwrap();
        assert!(line.starts_with(b"-ERR ") && line.ends_with(b"\r\n"));
    }
}

// ---------------------------------------------------------------------------------------
// STLS
// ---------------------------------------------------------------------------------------

#[test]
fn stls_discards_pipelined_commands() {
    // CVE-2011-0411: what was sent with STLS must not be executed inside TLS.
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"STLS\r\nUSER alice\r\nPASS pw\r\n");
    assert_eq!((w.as_str(), ev), ("+OK Begin TLS negotiation\r\n", vec![Ev::StartTls]));
    // Bytes arriving before the handshake are dropped too.
    assert_eq!(send(&mut p, b"PASS pw\r\n"), (String::new(), vec![]));
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    // No USER survived: PASS needs a new USER.
    assert_eq!(send(&mut p, b"PASS pw\r\n").0, "-ERR Send USER first\r\n");
    assert_eq!(
        send(&mut p, b"USER alice\r\nPASS pw\r\n"),
        ("+OK Send your password\r\n".into(), vec![auth("alice", "pw")])
    );
}

#[test]
fn stls_inside_tls_is_refused() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"STLS\r\n"), ("-ERR TLS is already active\r\n".into(), vec![]));
    let mut p = session_after_stls();
    assert_eq!(send(&mut p, b"STLS\r\n"), ("-ERR TLS is already active\r\n".into(), vec![]));
}

#[test]
fn no_login_before_stls_on_the_plain_port() {
    let inputs = [
        "USER alice\r\n".to_string(),
        "PASS pw\r\n".to_string(),
        "AUTH\r\n".to_string(),
        format!("AUTH PLAIN {}\r\n", plain_ir("alice", "pw")),
        "AUTH LOGIN\r\n".to_string(),
    ];
    for input in inputs {
        let mut p = session(false);
        assert_eq!(send(&mut p, input.as_bytes()), (TLS_REQUIRED.into(), vec![]), "{input}");
    }
    // USER then PASS in clear: neither is taken.
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"USER alice\r\nPASS pw\r\n");
    assert_eq!(w, format!("{TLS_REQUIRED}{TLS_REQUIRED}"));
    assert!(ev.is_empty());
}

#[test]
fn tls_started_without_stls_changes_nothing() {
    let mut p = session(false);
    p.tls_started();
    assert_eq!(send(&mut p, b"USER alice\r\n").0, TLS_REQUIRED);
}

// ---------------------------------------------------------------------------------------
// USER/PASS, AUTH PLAIN, AUTH LOGIN
// ---------------------------------------------------------------------------------------

#[test]
fn user_pass_plain_and_login_yield_the_same_credentials() {
    let want = vec![auth("alice@example.com", "app pass 1")];
    let plain = plain_ir("alice@example.com", "app pass 1");
    let user_b64 = base64(b"alice@example.com");
    let pass_b64 = base64(b"app pass 1");
    let sessions: Vec<(Vec<String>, &str)> = vec![
        (vec!["USER alice@example.com\r\nPASS app pass 1\r\n".into()], "+OK Send your password\r\n"),
        (vec![format!("AUTH PLAIN {plain}\r\n")], ""),
        (vec!["AUTH PLAIN\r\n".into(), format!("{plain}\r\n")], "+ \r\n"),
        (vec![format!("auth plain {plain}\r\n")], ""),
        (
            vec!["AUTH LOGIN\r\n".into(), format!("{user_b64}\r\n"), format!("{pass_b64}\r\n")],
            "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
        ),
        (vec![format!("AUTH LOGIN {user_b64}\r\n"), format!("{pass_b64}\r\n")], "+ UGFzc3dvcmQ6\r\n"),
        (vec![format!("AUTH LOGIN {user_b64}\r\n{pass_b64}\r\n")], "+ UGFzc3dvcmQ6\r\n"),
    ];
    for (turns, written) in sessions {
        for tls_kind in [true, false] {
            let mut p = if tls_kind { session(true) } else { session_after_stls() };
            let mut w = String::new();
            let mut ev = Vec::new();
            for t in &turns {
                let (w1, e1) = send(&mut p, t.as_bytes());
                w.push_str(&w1);
                ev.extend(e1);
            }
            assert_eq!((w.as_str(), &ev), (written, &want), "{turns:?}");
        }
    }
}

#[test]
fn auth_without_mechanism_lists_them() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH\r\n"), ("+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n".into(), vec![]));
}

#[test]
fn other_mechanisms_and_bad_auth_lines_are_refused() {
    for line in [&b"AUTH CRAM-MD5\r\n"[..], b"AUTH XOAUTH2 abc\r\n", b"AUTH GSSAPI\r\n"] {
        let mut p = session(true);
        assert_eq!(send(&mut p, line), ("-ERR Unsupported authentication mechanism\r\n".into(), vec![]));
    }
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH PLAIN a b\r\n"), ("-ERR Invalid AUTH command\r\n".into(), vec![]));
    assert_eq!(send(&mut p, b"AUTH  \r\n"), ("-ERR Invalid AUTH command\r\n".into(), vec![]));
}

#[test]
fn equals_sign_is_an_empty_initial_response() {
    // RFC 5034 §4: `=` is an empty response; an empty PLAIN message is malformed.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH PLAIN =\r\n"), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH LOGIN =\r\n"), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
    // A trailing space is no initial response at all: the challenge comes.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH PLAIN \r\n"), ("+ \r\n".into(), vec![]));
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH LOGIN \r\n"), ("+ VXNlcm5hbWU6\r\n".into(), vec![]));
    // `=` answering the PLAIN challenge is empty as well.
    let mut p = session(true);
    let _ = send(&mut p, b"AUTH PLAIN\r\n");
    assert_eq!(send(&mut p, b"=\r\n"), (String::new(), vec![Ev::Refuse(AuthReply::Failed)]));
}

#[test]
fn star_cancels_the_exchange() {
    for (start, answers) in
        [("AUTH PLAIN\r\n", vec![]), ("AUTH LOGIN\r\n", vec![]), ("AUTH LOGIN\r\n", vec!["YWxpY2U=\r\n"])]
    {
        let mut p = session(true);
        let _ = send(&mut p, start.as_bytes());
        for a in answers {
            let _ = send(&mut p, a.as_bytes());
        }
        let (_, ev) = send(&mut p, b"*\r\n");
        assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled"))]);
        p.auth_failed(AuthReply::Aborted("Authentication cancelled"));
        assert_eq!(pump(&mut p), ("-ERR Authentication cancelled\r\n".into(), vec![]));
        // The session goes on.
        assert!(send(&mut p, b"CAPA\r\n").0.starts_with("+OK"));
    }
}

#[test]
fn invalid_base64_and_foreign_authzid_are_refused() {
    let mut p = session(true);
    assert_eq!(
        send(&mut p, b"AUTH PLAIN !!!\r\n"),
        (String::new(), vec![Ev::Refuse(AuthReply::Aborted("Invalid base64 data"))])
    );
    let mut p = session(true);
    let ir = base64(b"victim\0alice\0pw");
    assert_eq!(
        send(&mut p, format!("AUTH PLAIN {ir}\r\n").as_bytes()),
        (String::new(), vec![Ev::Refuse(AuthReply::AuthzFailed)])
    );
    p.auth_failed(AuthReply::AuthzFailed);
    assert_eq!(pump(&mut p).0, "-ERR [AUTH] Authorization failed.\r\n");
}

#[test]
fn user_pass_edge_cases() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"PASS pw\r\n").0, "-ERR Send USER first\r\n");
    assert_eq!(send(&mut p, b"USER\r\n").0, "-ERR Invalid user name\r\n");
    assert_eq!(send(&mut p, b"USER al\x01ice\r\n").0, "-ERR Invalid user name\r\n");
    // An empty password goes no further than a refusal.
    assert_eq!(
        send(&mut p, b"USER alice\r\nPASS\r\n"),
        ("+OK Send your password\r\n".into(), vec![Ev::Refuse(AuthReply::Failed)])
    );
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, FAILED);
    // After a failure, USER must come again (RFC 1939).
    assert_eq!(send(&mut p, b"PASS pw\r\n").0, "-ERR Send USER first\r\n");
}

#[test]
fn every_auth_reply_has_its_text() {
    let cases = [
        (AuthReply::Failed, FAILED.to_string()),
        (AuthReply::AuthzFailed, "-ERR [AUTH] Authorization failed.\r\n".into()),
        (AuthReply::Unavailable, "-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n".into()),
        (AuthReply::TooMany, "-ERR [IN-USE] Too many sessions.\r\n".into()),
        (AuthReply::Aborted("Authentication cancelled"), "-ERR Authentication cancelled\r\n".into()),
        (
            AuthReply::NeedsAppPassword("Use an app password:\r\nhttps://mail.example/app\u{7}".into()),
            "-ERR [AUTH] Use an app password:https://mail.example/app\r\n".into(),
        ),
    ];
    for (reply, want) in cases {
        let mut p = session(true);
        let _ = send(&mut p, b"USER alice\r\nPASS pw\r\n");
        p.auth_failed(reply);
        assert_eq!(pump(&mut p), (want, vec![]));
    }
}

#[test]
fn app_password_text_is_sent_every_time() {
    let mut p = session(true);
    for _ in 0..2 {
        let _ = send(&mut p, b"USER alice\r\nPASS pw\r\n");
        p.auth_failed(AuthReply::NeedsAppPassword("Use an app password".into()));
        assert_eq!(pump(&mut p).0, "-ERR [AUTH] Use an app password\r\n");
    }
}

#[test]
fn auth_succeeded_returns_bytes_pipelined_after_pass() {
    let mut p = session(true);
    let (_, ev) = send(&mut p, b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\nRE");
    assert_eq!(ev, vec![auth("alice", "pw")]);
    // More arrives while the check runs.
    assert_eq!(send(&mut p, b"TR 1\r\n"), (String::new(), vec![]));
    assert_eq!(p.auth_succeeded(), b"STAT\r\nLIST\r\nRETR 1\r\n");
    assert_eq!(pump(&mut p), ("+OK Logged in.\r\n".into(), vec![]));
    // The machine is done: nothing more is read or answered.
    assert_eq!(send(&mut p, b"QUIT\r\n"), (String::new(), vec![]));
    assert!(p.auth_succeeded().is_empty());
}

#[test]
fn auth_results_outside_authenticating_are_ignored() {
    let mut p = session(true);
    assert!(p.auth_succeeded().is_empty());
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

#[test]
fn failure_then_success_on_one_connection() {
    let mut p = session(true);
    let _ = send(&mut p, b"USER alice\r\nPASS wrong\r\n");
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, FAILED);
    let (_, ev) = send(&mut p, format!("AUTH PLAIN {}\r\n", plain_ir("alice", "right")).as_bytes());
    assert_eq!(ev, vec![auth("alice", "right")]);
    assert!(p.auth_succeeded().is_empty());
    assert_eq!(pump(&mut p).0, "+OK Logged in.\r\n");
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[test]
fn a_line_at_the_limit_is_served_and_a_longer_one_closes() {
    let mut at = b"USER ".to_vec();
    at.resize(MAX_LINE, b'a');
    at.extend(b"\r\n");
    let mut p = session(true);
    // (The user name is over sasl::MAX_FIELD: refused, but as a command.)
    assert_eq!(send(&mut p, &at), ("-ERR Invalid user name\r\n".into(), vec![]));

    let mut over = b"USER ".to_vec();
    over.resize(MAX_LINE + 1, b'a');
    over.extend(b"\r\n");
    let mut p = session(true);
    assert_eq!(send(&mut p, &over), ("-ERR Line too long\r\n".into(), vec![Ev::Close]));
    // Without a line end, the same as soon as the limit is passed.
    let mut p = session(true);
    assert_eq!(send(&mut p, &over[..MAX_LINE + 1]), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"a"), ("-ERR Line too long\r\n".into(), vec![Ev::Close]));
}

#[test]
fn endless_input_is_never_buffered_beyond_the_bound() {
    let mut p = session(true);
    for _ in 0..1000 {
        p.feed(&[b'x'; 1000]);
        assert!(p.shell.buf.len() <= MAX_BUFFERED);
        if matches!(p.next(), Next::Close) {
            break;
        }
    }
    assert!(p.shell.buf.is_empty());
    assert!(matches!(p.next(), Next::Close));
    // While a login is checked, pipelined input is bounded too.
    let mut p = session(true);
    let _ = send(&mut p, b"USER alice\r\nPASS pw\r\n");
    p.feed(&vec![b'x'; MAX_BUFFERED + 1]);
    assert!(p.shell.buf.is_empty());
    assert_eq!(pump(&mut p), ("-ERR Input too long\r\n".into(), vec![Ev::Close]));
    assert!(p.auth_succeeded().is_empty());
}

#[test]
fn a_long_sasl_line_closes() {
    let mut p = session(true);
    let _ = send(&mut p, b"AUTH PLAIN\r\n");
    let line = vec![b'A'; MAX_SASL_LINE + 1];
    assert_eq!(send(&mut p, &line), (String::new(), vec![]));
    assert_eq!(send(&mut p, b"A\r\n"), ("-ERR Authentication line too long\r\n".into(), vec![Ev::Close]));
}

#[test]
fn too_many_errors_close() {
    let mut p = session(true);
    for _ in 1..MAX_BAD {
        assert_eq!(send(&mut p, b"BOGUS\r\n"), ("-ERR Unknown command\r\n".into(), vec![]));
    }
    assert_eq!(send(&mut p, b"BOGUS\r\nCAPA\r\n"), ("-ERR Too many errors\r\n".into(), vec![Ev::Close]));
    // Logins in clear count as errors too.
    let mut p = session(false);
    let many = "USER a\r\n".repeat(MAX_BAD as usize);
    let (w, ev) = send(&mut p, many.as_bytes());
    assert_eq!(w, format!("{}-ERR Too many errors\r\n", TLS_REQUIRED.repeat(MAX_BAD as usize - 1)));
    assert_eq!(ev, vec![Ev::Close]);
}

#[test]
fn too_many_auth_failures_close() {
    let mut p = session(true);
    for n in 1..=MAX_AUTH_FAILURES {
        let (_, ev) = send(&mut p, b"USER alice\r\nPASS wrong\r\n");
        assert_eq!(ev, vec![auth("alice", "wrong")]);
        p.auth_failed(AuthReply::Failed);
        let (w, ev) = pump(&mut p);
        assert_eq!(w, FAILED);
        assert_eq!(ev.contains(&Ev::Close), n == MAX_AUTH_FAILURES, "failure {n}");
    }
}

#[test]
fn too_many_commands_close() {
    let mut p = session(true);
    let many = "CAPA\r\n".repeat(MAX_COMMANDS as usize);
    let (w, ev) = send(&mut p, many.as_bytes());
    assert_eq!(w.matches("+OK Capability list follows").count(), MAX_COMMANDS as usize);
    assert!(ev.is_empty());
    assert_eq!(send(&mut p, b"CAPA\r\n"), ("-ERR Too many commands\r\n".into(), vec![Ev::Close]));
}

// ---------------------------------------------------------------------------------------
// Foreign first line, secrets
// ---------------------------------------------------------------------------------------

#[test]
fn another_protocols_first_line_closes_without_an_echo() {
    for first in [
        &b"POST / HTTP/1.1\r\nHost: mail.example.com\r\n\r\nUSER alice\r\n"[..],
        b"GET /?<script> HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 110\r\nCAPA\r\n",
        b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
    ] {
        for tls in [false, true] {
            let mut p = session(tls);
            assert_eq!(send(&mut p, first), (String::new(), vec![Ev::Close]), "{}", text(first));
        }
    }
    // After STLS the first line is checked again.
    let mut p = session(false);
    let _ = send(&mut p, b"CAPA\r\n");
    let mut p2 = session_after_stls();
    assert_eq!(send(&mut p2, b"GET / HTTP/1.1\r\n"), (String::new(), vec![Ev::Close]));
    // Only the first line: later it is an unknown command.
    assert_eq!(send(&mut p, b"GET / HTTP/1.1\r\n"), ("-ERR Unknown command\r\n".into(), vec![]));
}

const SECRET: &str = "Sup3r-S3cret-pw";

#[test]
fn debug_output_never_shows_the_password() {
    let inputs = [
        format!("USER alice\r\nPASS {SECRET}\r\n"),
        format!("AUTH PLAIN {}\r\n", plain_ir("alice", SECRET)),
        format!("AUTH LOGIN YWxpY2U=\r\n{}\r\n", base64(SECRET.as_bytes())),
    ];
    for input in inputs {
        for cut in 0..=input.len() {
            let mut p = session(true);
            p.feed(&input.as_bytes()[..cut]);
            loop {
                let step = p.next();
                let dbg = format!("{step:?} {p:?}");
                assert!(!dbg.contains(SECRET), "{dbg}");
                if !matches!(step, Next::Write(_)) {
                    break;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Property tests: random input never panics, memory stays bounded, no login before TLS
// ---------------------------------------------------------------------------------------

/// What a run over some reads produced.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    written: String,
    events: Vec<Ev>,
    relayed: Vec<u8>,
}

/// Drives a session over `chunks` like a driver would (failing every login but the one
/// with password "right"), checking invariants at every step.
fn drive(tls: bool, chunks: &[Vec<u8>]) -> Result<Run, TestCaseError> {
    drive_with(tls, false, chunks)
}

/// [`drive`], offering OAuth if `oauth`.
fn drive_with(tls: bool, oauth: bool, chunks: &[Vec<u8>]) -> Result<Run, TestCaseError> {
    let mut p = PreAuth::with_oauth(HOST, tls, !tls, oauth.then(offer));
    let mut encrypted = tls;
    let mut closed = false;
    let mut await_tls = false;
    let mut done = false;
    let mut written = Vec::new();
    let mut events = Vec::new();
    let mut relayed = Vec::new();
    let mut chunks = chunks.iter();
    loop {
        for _ in 0..100_000 {
            let a = p.next();
            prop_assert!(p.shell.buf.len() <= MAX_BUFFERED);
            match a {
                Next::NeedInput => break,
                Next::Write(b) => {
                    prop_assert!(!closed, "write after Close");
                    written.extend(b);
                }
                Next::StartTls => {
                    prop_assert!(!encrypted, "StartTls inside TLS");
                    events.push(Ev::StartTls);
                    await_tls = true;
                }
                Next::Event(Action::Authenticate(c)) => {
                    prop_assert!(encrypted, "Authenticate before TLS");
                    let right = c.password.expose().as_slice() == b"right";
                    events.push(Ev::Auth { user: c.username.clone(), pass: c.password.expose().clone() });
                    if right {
                        relayed.extend(p.auth_succeeded());
                        done = true;
                    } else {
                        p.auth_failed(AuthReply::Failed);
                    }
                }
                Next::Event(Action::Refuse(r)) => {
                    prop_assert!(encrypted, "Refuse (SASL exchange) before TLS");
                    events.push(Ev::Refuse(r.clone()));
                    p.auth_failed(r);
                }
                Next::Close => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            break;
        }
        let Some(c) = chunks.next() else { break };
        if await_tls {
            // The handshake comes before the next read (bytes that were in the same read
            // as STLS were dropped: see stls_discards_pipelined_commands).
            prop_assert!(p.shell.buf.is_empty());
            prop_assert!(matches!(p.next(), Next::NeedInput));
            p.tls_started();
            encrypted = true;
            await_tls = false;
        }
        p.feed(c);
        if done {
            relayed.extend(c);
        }
        prop_assert!(p.shell.buf.len() <= MAX_BUFFERED);
    }
    if !written.is_empty() {
        prop_assert!(written.ends_with(b"\r\n"));
        for line in written.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            prop_assert!(!line.contains(&b'\r'));
        }
    }
    Ok(Run { written: text(&written), events, relayed })
}

fn pop3ish_line() -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<&'static [u8]> = vec![
        b"CAPA\r\n",
        b"STLS\r\n",
        b"USER alice\r\n",
        b"PASS pw\r\n",
        b"PASS right\r\n",
        b"AUTH\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN AGFsaWNlAHB3\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH LOGIN YWxpY2U=\r\n",
        b"AUTH XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciByaWdodAEB\r\n",
        b"AUTH XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciB3cm9uZwEB\r\n",
        b"AUTH OAUTHBEARER\r\n",
        b"bixhPWFsaWNlLAFhdXRoPUJlYXJlciB3cm9uZwEB\r\n",
        b"AQ==\r\n",
        b"AGFsaWNlAHB3\r\n",
        b"YWxpY2U=\r\n",
        b"cmlnaHQ=\r\n",
        b"*\r\n",
        b"=\r\n",
        b"NOOP\r\n",
        b"STAT\r\n",
        b"QUIT\r\n",
        b"GET / HTTP/1.1\r\n",
        b"!!!\r\n",
        b"\r\n",
        b"\n",
        b"USER bob\n",
    ];
    prop::sample::select(lines).prop_map(|l| l.to_vec())
}

fn pop3ish_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"uUsSeErRpPaAtThHlLcC=*+ \r\n\r\n\0".to_vec())
}

/// A stream of lines, cut into reads at random places.
fn pop3ish_session() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (prop::collection::vec(pop3ish_line(), 0..24), prop::collection::vec(any::<prop::sample::Index>(), 0..12)).prop_map(
        |(parts, cuts)| {
            let bytes = parts.concat();
            split_at(&bytes, cuts.iter().map(|c| c.index(bytes.len() + 1)))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(512), .. ProptestConfig::default() })]

    #[test]
    fn prop_random_bytes(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(any::<u8>(), 0..96))) {
        drive_with(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_pop3ish_alphabet(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(pop3ish_byte(), 0..96))) {
        drive_with(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_pop3ish_sessions(tls in any::<bool>(), oauth in any::<bool>(), chunks in pop3ish_session()) {
        drive_with(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_big_chunks(tls in any::<bool>(), oauth in any::<bool>(), chunks in prop::collection::vec(prop::collection::vec(pop3ish_byte(), 0..20_000), 0..4)) {
        drive_with(tls, oauth, &chunks)?;
    }

    /// A session without STLS gives the same result however it is cut into reads.
    #[test]
    fn prop_any_split_same_output(parts in prop::collection::vec(pop3ish_line(), 0..16), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let parts: Vec<Vec<u8>> = parts.into_iter().filter(|l| l.as_slice() != b"STLS\r\n").collect();
        let bytes = parts.concat();
        let oauth = parts.len() % 2 == 1;
        let whole = drive_with(true, oauth, std::slice::from_ref(&bytes))?;
        let split = drive_with(true, oauth, &split_at(&bytes, cuts.iter().map(|c| c.index(bytes.len() + 1))))?;
        prop_assert_eq!(split, whole);
    }
}

/// A session (with STLS, a failed and a good login) split at every byte gives the same
/// output as the whole.
#[test]
fn every_split_gives_the_same_output() {
    let before = b"CAPA\r\nSTLS\r\n".to_vec();
    let after = format!(
        "CAPA\r\nUSER alice\r\nPASS wrong\r\nAUTH LOGIN\r\nYWxpY2U=\r\n*\r\nAUTH PLAIN {}\r\nSTAT\r\nRETR 1\r\n",
        plain_ir("alice", "right")
    )
    .into_bytes();
    // The handshake falls between the two reads: STLS's line ends the first.
    let reference = drive(false, &[before.clone(), after.clone()]).unwrap();
    assert_eq!(
        reference.events,
        vec![
            Ev::StartTls,
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled")),
            auth("alice", "right")
        ]
    );
    assert!(reference.written.ends_with("+OK Logged in.\r\n"), "{}", reference.written);
    assert_eq!(reference.relayed, b"STAT\r\nRETR 1\r\n");
    for cut in 0..=after.len() {
        let chunks = [before.clone(), after[..cut].to_vec(), after[cut..].to_vec()];
        assert_eq!(drive(false, &chunks).unwrap(), reference, "cut at {cut}");
    }
    for cut in 0..=before.len() {
        // Cut inside the first read: STLS's line still ends a read.
        let chunks = [before[..cut].to_vec(), before[cut..].to_vec(), after.clone()];
        assert_eq!(drive(false, &chunks).unwrap(), reference, "cut at {cut}");
    }
}

/// The committed corpus (fuzz/corpus/pop3) replays under `cargo test`.
#[test]
fn corpus_replays() {
    let cases = crate::proto::corpus_cuts("pop3");
    assert!(cases.len() >= 12, "corpus missing: {}", cases.len());
    for (name, chunks) in cases {
        for (tls, oauth) in [(false, false), (true, false), (false, true), (true, true)] {
            if let Err(e) = drive_with(tls, oauth, &chunks) {
                panic!("{name} (tls {tls}, oauth {oauth}): {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// OAuth 2.0 bearer tokens: XOAUTH2 and OAUTHBEARER (issue 16)
// ---------------------------------------------------------------------------------------

const METADATA: &str = "https://mail.example.com/.well-known/oauth-authorization-server";

fn offer() -> OAuthOffer {
    OAuthOffer { metadata_url: METADATA.to_string() }
}

fn oauth_session(tls: bool) -> PreAuth {
    let mut p = PreAuth::with_oauth(HOST, tls, !tls, Some(offer()));
    assert_eq!(pump(&mut p), (GREETING.to_string(), vec![]));
    p
}

fn oauthbearer(user: &str, token: &str) -> String {
    testing::oauthbearer(user, "pop.example", 995, token)
}

fn challenge(mech: BearerMechanism) -> String {
    format!("+ {}\r\n", offer().error_challenge(mech))
}

#[test]
fn capa_lists_the_bearer_mechanisms_only_inside_tls_and_only_when_on() {
    let sasl_line = |p: &mut PreAuth| {
        let (w, _) = send(p, b"CAPA\r\n");
        w.lines().find(|l| l.starts_with("SASL")).map(str::to_string)
    };
    assert_eq!(sasl_line(&mut session(true)).as_deref(), Some("SASL PLAIN LOGIN"));
    assert_eq!(sasl_line(&mut oauth_session(true)).as_deref(), Some("SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER"));
    let mut p = oauth_session(false);
    assert_eq!(sasl_line(&mut p), None);
    let (w, _) = send(&mut p, format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes());
    assert_eq!(w, TLS_REQUIRED);
    let _ = send(&mut p, b"STLS\r\n");
    p.tls_started();
    assert_eq!(sasl_line(&mut p).as_deref(), Some("SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER"));
    assert_eq!(send(&mut p, b"AUTH\r\n").0, "+OK\r\nPLAIN\r\nLOGIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n");
    // Off: unknown mechanisms, as before.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTH XOAUTH2\r\n").0, "-ERR Unsupported authentication mechanism\r\n");
}

#[test]
fn bearer_logins_with_and_without_initial_response() {
    let mut p = oauth_session(true);
    expect_bearer(&mut p, format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "t1")).as_bytes(), "alice", "t1");
    let mut p = oauth_session(true);
    expect_bearer(&mut p, format!("auth oauthbearer {}\r\n", oauthbearer("alice", "t2")).as_bytes(), "alice", "t2");
    for (mech, msg) in [("XOAUTH2", xoauth2("bob", "t3")), ("OAUTHBEARER", oauthbearer("bob", "t3"))] {
        let mut p = oauth_session(true);
        assert_eq!(send(&mut p, format!("AUTH {mech}\r\n").as_bytes()), ("+ \r\n".to_string(), vec![]));
        expect_bearer(&mut p, format!("{msg}\r\n").as_bytes(), "bob", "t3");
        assert_eq!(p.auth_succeeded(), b"");
        assert_eq!(pump(&mut p).0, "+OK Logged in.\r\n");
    }
}

#[test]
fn a_refused_token_gets_the_error_challenge_then_the_failure() {
    for answer in [&b"AQ==\r\n"[..], b"\r\n", b"*\r\n", b"whatever\n"] {
        for (mech, msg) in [
            (BearerMechanism::XOAuth2, xoauth2("alice", "old")),
            (BearerMechanism::OAuthBearer, oauthbearer("alice", "old")),
        ] {
            let mut p = oauth_session(true);
            expect_bearer(&mut p, format!("AUTH {} {msg}\r\n", mech.name()).as_bytes(), "alice", "old");
            p.auth_failed(AuthReply::Failed);
            assert_eq!(pump(&mut p), (challenge(mech), vec![]));
            assert_eq!(send(&mut p, answer), (FAILED.to_string(), vec![]), "{answer:?}");
            assert!(send(&mut p, b"CAPA\r\n").0.starts_with("+OK Capability list follows"));
        }
    }
    // Other refusals keep their replies; a malformed message is a plain failure.
    let mut p = oauth_session(true);
    expect_bearer(&mut p, format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "t")).as_bytes(), "alice", "t");
    p.auth_failed(AuthReply::Unavailable);
    assert_eq!(pump(&mut p).0, "-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n");
    let (_, ev) = send(&mut p, b"AUTH XOAUTH2 =\r\n");
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Failed)]);
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, FAILED);
}

#[test]
fn cancel_and_failure_count_in_bearer_exchanges() {
    let mut p = oauth_session(true);
    let _ = send(&mut p, b"AUTH XOAUTH2\r\n");
    assert_eq!(send(&mut p, b"*\r\n").1, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled"))]);
    p.auth_failed(AuthReply::Aborted("Authentication cancelled"));
    assert_eq!(pump(&mut p).0, "-ERR Authentication cancelled\r\n");
    // Two more refused tokens make three failures: the connection ends.
    for i in 0..2 {
        expect_bearer(&mut p, format!("AUTH XOAUTH2 {}\r\n", xoauth2("alice", "x")).as_bytes(), "alice", "x");
        p.auth_failed(AuthReply::Failed);
        let _ = pump(&mut p);
        let (w, ev) = send(&mut p, b"AQ==\r\n");
        assert_eq!(w, FAILED);
        assert_eq!(ev, if i == 1 { vec![Ev::Close] } else { vec![] });
    }
}

#[test]
fn every_split_bearer_exchanges() {
    let after = format!(
        "AUTH XOAUTH2 {}\r\nAQ==\r\nAUTH OAUTHBEARER\r\n*\r\nAUTH OAUTHBEARER\r\n{}\r\nSTAT\r\n",
        xoauth2("alice", "wrong"),
        oauthbearer("alice", "right")
    )
    .into_bytes();
    let reference = drive_with(true, true, std::slice::from_ref(&after)).unwrap();
    assert_eq!(
        reference.events,
        vec![
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled")),
            auth("alice", "right")
        ]
    );
    assert!(reference.written.contains(&format!("{}{FAILED}+ \r\n", challenge(BearerMechanism::XOAuth2))));
    assert_eq!(reference.relayed, b"STAT\r\n");
    for cut in 0..=after.len() {
        let chunks = [after[..cut].to_vec(), after[cut..].to_vec()];
        assert_eq!(drive_with(true, true, &chunks).unwrap(), reference, "cut at {cut}");
    }
    let bytewise: Vec<Vec<u8>> = after.iter().map(|b| vec![*b]).collect();
    assert_eq!(drive_with(true, true, &bytewise).unwrap(), reference);
}
