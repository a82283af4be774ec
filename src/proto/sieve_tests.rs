//! Session tests for the ManageSieve pre-auth machine: bytes in, bytes and actions out,
//! no sockets. Case numbers refer to SECURITY.md.

use super::*;
use crate::proto::chunked;
use crate::proto::testing::{self, auth, expect_bearer, pump, send, split_at, text, xoauth2};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A non-`Write` action, in a form tests can compare.
type Ev = testing::Ev<AuthReply>;

const HOST: &str = "mx.example";

const LISTING_TLS: &str = "\"IMPLEMENTATION\" \"mailgate\"\r\n\"SASL\" \"PLAIN LOGIN\"\r\n\"VERSION\" \"1.0\"\r\n";
const LISTING_PLAIN: &str =
    "\"IMPLEMENTATION\" \"mailgate\"\r\n\"SASL\" \"\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\n";
const READY: &str = "OK \"mx.example ManageSieve ready.\"\r\n";
const FAILED: &str = "NO (AUTH) \"Authentication failed.\"\r\n";

/// A new session with its greeting read. `tls`: implicit TLS; otherwise a STARTTLS listener.
fn session(tls: bool) -> PreAuth {
    let mut p = PreAuth::new(HOST, tls, !tls);
    let (g, ev) = pump(&mut p);
    assert!(g.ends_with(READY), "{g}");
    assert!(ev.is_empty());
    p
}

fn session_after_starttls() -> PreAuth {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"STARTTLS\r\n"), ("OK \"Begin TLS negotiation now.\"\r\n".into(), vec![Ev::StartTls]));
    p.tls_started();
    let (w, ev) = pump(&mut p);
    assert_eq!(w, format!("{LISTING_TLS}OK \"TLS negotiation successful.\"\r\n"));
    assert!(ev.is_empty());
    p
}

fn b64(s: &str) -> String {
    crate::proto::imap::base64(s.as_bytes())
}

// ---------------------------------------------------------------------------------------
// Greeting, CAPABILITY, NOOP, LOGOUT, other commands
// ---------------------------------------------------------------------------------------

#[test]
fn greeting_on_tls_offers_plain_and_login() {
    let mut p = PreAuth::new(HOST, true, true);
    assert_eq!(pump(&mut p), (format!("{LISTING_TLS}{READY}"), vec![]));
}

#[test]
fn greeting_before_starttls_offers_no_mechanism() {
    let mut p = PreAuth::new(HOST, false, true);
    assert_eq!(pump(&mut p), (format!("{LISTING_PLAIN}{READY}"), vec![]));
}

#[test]
fn greeting_on_plain_port_without_starttls_still_offers_no_mechanism() {
    // No password in clear on any port (SECURITY.md case 11).
    let mut p = PreAuth::new(HOST, false, false);
    let (g, _) = pump(&mut p);
    assert_eq!(g, format!("\"IMPLEMENTATION\" \"mailgate\"\r\n\"SASL\" \"\"\r\n\"VERSION\" \"1.0\"\r\n{READY}"));
    let (w, ev) = send(&mut p, b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n");
    assert_eq!((w.as_str(), ev), ("NO \"TLS required.\"\r\n", vec![]));
}

#[test]
fn hostname_is_quoted_in_the_greeting() {
    let mut p = PreAuth::new("a\"b\\c\r\nOK", true, false);
    let (g, _) = pump(&mut p);
    assert!(g.ends_with("OK \"a\\\"b\\\\cOK ManageSieve ready.\"\r\n"), "{g}");
}

#[test]
fn capability_command_case_insensitive() {
    for cmd in [&b"CAPABILITY\r\n"[..], b"capability\r\n", b"CaPaBiLiTy\r\n"] {
        let mut p = session(true);
        assert_eq!(send(&mut p, cmd), (format!("{LISTING_TLS}OK \"Capability completed.\"\r\n"), vec![]));
        let mut p = session(false);
        assert_eq!(send(&mut p, cmd), (format!("{LISTING_PLAIN}OK \"Capability completed.\"\r\n"), vec![]));
    }
}

#[test]
fn noop_with_and_without_tag() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"NOOP\r\n").0, "OK \"Done\"\r\n");
    assert_eq!(send(&mut p, b"noop \"x\"\r\n").0, "OK (TAG \"x\") \"Done\"\r\n");
    assert_eq!(send(&mut p, b"NOOP \"a\\\"b\"\r\n").0, "OK (TAG \"a\\\"b\") \"Done\"\r\n");
    assert_eq!(send(&mut p, b"NOOP {3+}\r\nabc\r\n").0, "OK (TAG \"abc\") \"Done\"\r\n");
    // A tag that can't come back as a quoted string.
    assert_eq!(send(&mut p, b"NOOP {3+}\r\na\rc\r\n").0, "NO \"Invalid NOOP tag.\"\r\n");
    assert_eq!(send(&mut p, b"NOOP \"a\" \"b\"\r\n").0, "NO \"Syntax error in arguments.\"\r\n");
}

#[test]
fn logout_says_ok_and_closes() {
    let mut p = session(false);
    assert_eq!(send(&mut p, b"LOGOUT\r\nNOOP\r\n"), ("OK \"Logout completed.\"\r\n".into(), vec![Ev::Close]));
}

#[test]
fn other_commands_get_no() {
    for (cmd, reply) in [
        (&b"LISTSCRIPTS\r\n"[..], "NO \"LISTSCRIPTS is not allowed before authentication.\"\r\n"),
        (b"GETSCRIPT \"x\"\r\n", "NO \"GETSCRIPT is not allowed before authentication.\"\r\n"),
        (b"HAVESPACE \"x\" 100\r\n", "NO \"HAVESPACE is not allowed before authentication.\"\r\n"),
        (b"FOO\r\n", "NO \"Unknown command.\"\r\n"),
        (b"\"NOOP\"\r\n", "NO \"Syntax error.\"\r\n"),
        (b"NOOP  \"x\"\r\n", "NO \"Syntax error.\"\r\n"),
        (b"NOOP \"x\r\n", "NO \"Syntax error.\"\r\n"),
        (b"NOOP \"a\\nb\"\r\n", "NO \"Syntax error.\"\r\n"),
        (b"NOOP \"a\0b\"\r\n", "NO \"Syntax error.\"\r\n"),
        (b"CAPABILITY \"x\"\r\n", "NO \"Syntax error in arguments.\"\r\n"),
        (b"AUTHENTICATE\r\n", "NO \"Syntax error in arguments.\"\r\n"),
        (b"AUTHENTICATE PLAIN\r\n", "NO \"Syntax error in arguments.\"\r\n"),
        (b"STARTTLS\r\n", "NO \"TLS is already active.\"\r\n"),
    ] {
        let mut p = session(true);
        assert_eq!(send(&mut p, cmd), (reply.to_string(), vec![]), "{}", text(cmd));
    }
}

/// `PUTSCRIPT` is not HTTP's `PUT`: the foreign-protocol gate compares whole words, so a
/// script upload before login gets a plain NO, not a silent close.
#[test]
fn putscript_is_not_http_put() {
    for tls in [false, true] {
        let mut p = session(tls);
        let (w, ev) = send(&mut p, b"PUTSCRIPT \"s\" {4+}\r\nkeep\r\n");
        assert_eq!((w.as_str(), ev), ("NO \"PUTSCRIPT is not allowed before authentication.\"\r\n", vec![]));
        // Byte by byte too (the gate waits while the word could still be `PUT`).
        let mut p = session(tls);
        let mut w = String::new();
        for b in b"PUTSCRIPT \"s\" {4+}\r\nkeep\r\nNOOP\r\n" {
            let (w1, ev) = send(&mut p, &[*b]);
            assert!(ev.is_empty());
            w.push_str(&w1);
        }
        assert_eq!(w, "NO \"PUTSCRIPT is not allowed before authentication.\"\r\nOK \"Done\"\r\n");
    }
    // While HTTP's PUT is closed without a word.
    let mut p = session(false);
    assert_eq!(send(&mut p, b"PUT /x HTTP/1.1\r\n"), (String::new(), vec![Ev::Close]));
}

/// A browser's HTTP request (ALPACA) or a TLS ClientHello as the first line, on the plain
/// port or after STARTTLS, closes at once and echoes nothing.
#[test]
fn another_protocols_first_line_closes_without_an_echo() {
    for first in [
        &b"POST / HTTP/1.1\r\nHost: mail.example.com\r\n\r\nNOOP \"x\"\r\n"[..],
        b"GET /?<script> HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 4190\r\nNOOP\r\n",
        b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
    ] {
        for tls in [false, true] {
            let mut p = session(tls);
            assert_eq!(send(&mut p, first), (String::new(), vec![Ev::Close]), "{}", text(first));
        }
    }
    // After STARTTLS the first line is checked again.
    let mut p = session(false);
    let _ = send(&mut p, b"NOOP\r\n");
    let mut p2 = session_after_starttls();
    assert_eq!(send(&mut p2, b"POST / HTTP/1.1\r\n"), (String::new(), vec![Ev::Close]));
    // Only the first line.
    assert_eq!(send(&mut p, b"GET / HTTP/1.1\r\n").0, "NO \"Unknown command.\"\r\n");
}

#[test]
fn empty_lines_are_ignored() {
    let mut p = session(true);
    assert_eq!(send(&mut p, b"\r\n\r\nNOOP\r\n").0, "OK \"Done\"\r\n");
}

#[test]
fn goodbye_lines() {
    let p = session(true);
    assert_eq!(p.goodbye(Goodbye::Timeout), Some(&b"BYE \"Disconnected for inactivity.\"\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::Idle), Some(&b"BYE \"Disconnected for inactivity.\"\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::Shutdown), Some(&b"BYE (TRYLATER) \"Server shutting down.\"\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::Revoked), Some(&b"BYE \"Access revoked.\"\r\n"[..]));
    assert_eq!(p.goodbye(Goodbye::TooLong), Some(&b"BYE \"Session too long.\"\r\n"[..]));
}

// ---------------------------------------------------------------------------------------
// STARTTLS
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_then_listing_again_inside_tls() {
    let mut p = session_after_starttls();
    assert_eq!(send(&mut p, b"CAPABILITY\r\n").0, format!("{LISTING_TLS}OK \"Capability completed.\"\r\n"));
    assert_eq!(send(&mut p, b"STARTTLS\r\n").0, "NO \"TLS is already active.\"\r\n");
}

/// SECURITY.md cases 1 and 5 (CVE-2011-0411): commands pipelined behind STARTTLS are
/// dropped, however the reads fall; so are bytes that arrive before the handshake.
#[test]
fn starttls_pipelined_commands_are_discarded() {
    let input = format!("STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"{}\"\r\nNOOP \"inj\"\r\n", b64("\0alice\0right"));
    let input = input.as_bytes();
    for cut in 0..=input.len() {
        let mut p = session(false);
        let (mut w, mut ev) = send(&mut p, &input[..cut]);
        let (w2, ev2) = send(&mut p, &input[cut..]);
        w.push_str(&w2);
        ev.extend(ev2);
        assert_eq!((w.as_str(), ev), ("OK \"Begin TLS negotiation now.\"\r\n", vec![Ev::StartTls]), "cut {cut}");
        // Plaintext after the OK, before the handshake.
        assert_eq!(send(&mut p, b"NOOP \"late\"\r\n"), (String::new(), vec![]));
        p.tls_started();
        let (w, ev) = pump(&mut p);
        assert_eq!(w, format!("{LISTING_TLS}OK \"TLS negotiation successful.\"\r\n"));
        assert!(ev.is_empty());
        assert_eq!(send(&mut p, b"NOOP\r\n").0, "OK \"Done\"\r\n");
    }
}

#[test]
fn starttls_refused_where_not_offered_and_spurious_tls_started_ignored() {
    let mut p = PreAuth::new(HOST, false, false);
    let _ = pump(&mut p);
    assert_eq!(send(&mut p, b"STARTTLS\r\n").0, "NO \"STARTTLS is not offered here.\"\r\n");
    let mut p = session(false);
    p.tls_started();
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    let (w, ev) = send(&mut p, b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHB3\"\r\n");
    assert_eq!((w.as_str(), ev), ("NO \"TLS required: use STARTTLS first\"\r\n", vec![]));
}

/// SECURITY.md case 6: no AUTHENTICATE before STARTTLS, and it counts as an error.
#[test]
fn no_authenticate_before_starttls() {
    let mut p = session(false);
    for i in 1..=MAX_BAD {
        let (w, ev) = send(&mut p, b"AUTHENTICATE \"PLAIN\" \"AGFsaWNlAHJpZ2h0\"\r\n");
        assert!(!ev.iter().any(|e| matches!(e, Ev::Auth { .. })), "{ev:?}");
        if i < MAX_BAD {
            assert_eq!(w, "NO \"TLS required: use STARTTLS first\"\r\n");
        } else {
            assert_eq!(w, "NO \"TLS required: use STARTTLS first\"\r\nBYE \"Too many errors.\"\r\n");
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
    // Nor the SASL exchange.
    let mut p = session(false);
    assert_eq!(send(&mut p, b"AUTHENTICATE \"LOGIN\"\r\n\"YWxpY2U=\"\r\n").0.lines().count(), 2);
}

// ---------------------------------------------------------------------------------------
// AUTHENTICATE
// ---------------------------------------------------------------------------------------

/// Ways to send PLAIN `\0alice\0right` (and LOGIN alice / right); all give the same credentials.
fn login_forms() -> Vec<(Vec<u8>, String)> {
    let plain = b64("\0alice\0right");
    let user = b64("alice");
    let pass = b64("right");
    let q = |s: &str| format!("\"{s}\"");
    let lit = |s: &str| format!("{{{}+}}\r\n{s}", s.len());
    let sync = |s: &str| format!("{{{}}}\r\n{s}", s.len());
    let empty_challenge = "\"\"\r\n".to_string();
    let u = "\"VXNlcm5hbWU6\"\r\n";
    let pw = "\"UGFzc3dvcmQ6\"\r\n";
    vec![
        (format!("AUTHENTICATE \"PLAIN\" {}\r\n", q(&plain)).into_bytes(), String::new()),
        (format!("authenticate \"plain\" {}\r\n", lit(&plain)).into_bytes(), String::new()),
        (format!("AUTHENTICATE {} {}\r\n", lit("PLAIN"), sync(&plain)).into_bytes(), String::new()),
        (format!("AUTHENTICATE \"PLAIN\"\r\n{}\r\n", q(&plain)).into_bytes(), empty_challenge.clone()),
        (format!("AUTHENTICATE \"PLAIN\"\r\n{}\r\n", lit(&plain)).into_bytes(), empty_challenge),
        (format!("AUTHENTICATE \"LOGIN\" {}\r\n{}\r\n", q(&user), q(&pass)).into_bytes(), pw.to_string()),
        (format!("AUTHENTICATE \"LOGIN\" {}\r\n{}\r\n", lit(&user), lit(&pass)).into_bytes(), pw.to_string()),
        (format!("AUTHENTICATE \"LOGIN\"\r\n{}\r\n{}\r\n", q(&user), q(&pass)).into_bytes(), format!("{u}{pw}")),
        (format!("AUTHENTICATE \"LOGIN\" \"\"\r\n{}\r\n{}\r\n", lit(&user), q(&pass)).into_bytes(), format!("{u}{pw}")),
    ]
}

#[test]
fn plain_and_login_give_the_same_credentials_however_sent() {
    for (input, challenges) in login_forms() {
        for chunking in [1usize, 3, 7, input.len()] {
            let mut p = session_after_starttls();
            let mut w = String::new();
            let mut ev = Vec::new();
            for c in input.chunks(chunking) {
                let (w1, e1) = send(&mut p, c);
                w.push_str(&w1);
                ev.extend(e1);
            }
            assert_eq!((w.as_str(), ev), (challenges.as_str(), vec![auth("alice", "right")]), "{}", text(&input));
            assert_eq!(p.auth_succeeded(), b"");
            assert_eq!(pump(&mut p).0, "OK \"Logged in.\"\r\n");
        }
    }
}

#[test]
fn cancel_at_each_prompt() {
    for input in [&b"AUTHENTICATE \"PLAIN\"\r\n\"*\"\r\n"[..], b"AUTHENTICATE \"LOGIN\"\r\n\"*\"\r\n"] {
        let mut p = session(true);
        let (_, ev) = send(&mut p, input);
        assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled."))]);
        p.auth_failed(AuthReply::Aborted("Authentication cancelled."));
        assert_eq!(pump(&mut p).0, "NO \"Authentication cancelled.\"\r\n");
    }
    let mut p = session(true);
    let input = format!("AUTHENTICATE \"LOGIN\" \"{}\"\r\n{{1+}}\r\n*\r\n", b64("alice"));
    let (_, ev) = send(&mut p, input.as_bytes());
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled."))]);
}

#[test]
fn refusals_before_any_password_check() {
    let bad_b64 = AuthReply::Aborted("Invalid base64 in authentication exchange.");
    for (input, reply) in [
        (b"AUTHENTICATE \"PLAIN\" \"\"\r\n".to_vec(), AuthReply::Failed),
        (b"AUTHENTICATE \"PLAIN\" \"!!!\"\r\n".to_vec(), bad_b64.clone()),
        (b"AUTHENTICATE \"PLAIN\"\r\n\"!!!\"\r\n".to_vec(), bad_b64.clone()),
        (b"AUTHENTICATE \"PLAIN\"\r\nnotastring\r\n".to_vec(), bad_b64.clone()),
        (b"AUTHENTICATE \"PLAIN\"\r\n\"a\" \"b\"\r\n".to_vec(), bad_b64),
        (format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("alice\0pw")).into_bytes(), AuthReply::Failed),
        (format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("bob\0alice\0pw")).into_bytes(), AuthReply::AuthzFailed),
        (format!("AUTHENTICATE \"LOGIN\" \"{}\"\r\n", b64("al\x01ice")).into_bytes(), AuthReply::Failed),
        (format!("AUTHENTICATE \"LOGIN\" \"{}\"\r\n\"\"\r\n", b64("alice")).into_bytes(), AuthReply::Failed),
    ] {
        let mut p = session(true);
        let (_, ev) = send(&mut p, &input);
        assert_eq!(ev, vec![Ev::Refuse(reply)], "{}", text(&input));
    }
    let mut p = session(true);
    assert_eq!(send(&mut p, b"AUTHENTICATE \"CRAM-MD5\"\r\n").0, "NO \"Unsupported authentication mechanism.\"\r\n");
}

#[test]
fn auth_failed_replies_table() {
    for (reply, line) in [
        (AuthReply::Failed, FAILED.to_string()),
        (AuthReply::AuthzFailed, "NO (AUTH) \"Authorization failed.\"\r\n".into()),
        (AuthReply::Aborted("Authentication cancelled."), "NO \"Authentication cancelled.\"\r\n".into()),
        (
            AuthReply::NeedsAppPassword("Use an \"app\" password\r\nfrom C:\\web\0".into()),
            "NO (AUTH) \"Use an \\\"app\\\" passwordfrom C:\\\\web\"\r\n".into(),
        ),
        (AuthReply::Unavailable, "NO (TRYLATER) \"Service temporarily unavailable, try again later.\"\r\n".into()),
        (AuthReply::TooMany, "NO (TRYLATER) \"Too many sessions.\"\r\n".into()),
    ] {
        let mut p = session(true);
        let _ = send(&mut p, format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0pw")).as_bytes());
        p.auth_failed(reply.clone());
        assert_eq!(pump(&mut p), (line, vec![]), "{reply:?}");
    }
}

#[test]
fn app_password_text_every_time_then_too_many_failures_close() {
    let mut p = session(true);
    let line = format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0pw"));
    for i in 1..=MAX_AUTH_FAILURES {
        let (_, ev) = send(&mut p, line.as_bytes());
        assert_eq!(ev, vec![auth("alice", "pw")]);
        p.auth_failed(AuthReply::NeedsAppPassword("Use an app password.".into()));
        let (w, ev) = pump(&mut p);
        if i < MAX_AUTH_FAILURES {
            assert_eq!((w.as_str(), ev), ("NO (AUTH) \"Use an app password.\"\r\n", vec![]));
        } else {
            assert_eq!(w, "NO (AUTH) \"Use an app password.\"\r\nBYE \"Too many authentication failures.\"\r\n");
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
}

#[test]
fn auth_results_ignored_when_not_authenticating() {
    let mut p = session(true);
    assert_eq!(p.auth_succeeded(), b"");
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p), (String::new(), vec![]));
}

#[test]
fn pipelined_bytes_after_auth_go_upstream_untouched() {
    let mut p = session(true);
    let after = b"LISTSCRIPTS\r\nPUTSCRIPT \"s\" {4+}\r\nkeep\r\n";
    let mut input = format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0right")).into_bytes();
    input.extend(after);
    let (w, ev) = send(&mut p, &input);
    assert_eq!((w.as_str(), ev), ("", vec![auth("alice", "right")]));
    // More arrives during the check.
    p.feed(b"LOGOUT\r\n");
    let mut want = after.to_vec();
    want.extend(b"LOGOUT\r\n");
    assert_eq!(p.auth_succeeded(), want);
    assert_eq!(pump(&mut p), ("OK \"Logged in.\"\r\n".into(), vec![]));
    // Done: nothing more is read.
    p.feed(b"NOOP\r\n");
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    // After a LOGIN continuation too.
    let mut p = session(true);
    let input = format!("AUTHENTICATE \"LOGIN\"\r\n\"{}\"\r\n\"{}\"\r\nNOOP\r\n", b64("alice"), b64("right"));
    let (_, ev) = send(&mut p, input.as_bytes());
    assert_eq!(ev, vec![auth("alice", "right")]);
    assert_eq!(p.auth_succeeded(), b"NOOP\r\n");
}

#[test]
fn debug_never_shows_the_password() {
    let mut p = session(true);
    let input = format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\nNOOP \"sup3rsecret\"\r\n", b64("\0alice\0sup3rsecret"));
    p.feed(input.as_bytes());
    assert!(!format!("{p:?}").contains("sup3rsecret"));
    match p.next() {
        Next::Event(a) => {
            let d = format!("{a:?}");
            assert!(!d.contains("sup3rsecret") && !d.contains("115, 117, 112"), "{d}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{p:?}").contains("sup3rsecret"));
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[test]
fn line_of_8192_octets_is_accepted_longer_closes() {
    let mut ok = b"NOOP \"".to_vec();
    ok.resize(MAX_LINE - 1, b'a');
    ok.extend(b"\"\r\n");
    assert_eq!(ok.len(), MAX_LINE + 2);
    let mut p = session(true);
    let (w, ev) = send(&mut p, &ok);
    assert!(w.starts_with("NO \"Invalid NOOP tag.\"") || w.starts_with("OK (TAG"), "{w}");
    assert!(ev.is_empty());
    let mut long = b"NOOP \"".to_vec();
    long.resize(MAX_LINE, b'a');
    long.extend(b"\"\r\n");
    for chunk in [1usize, 100, long.len()] {
        let mut p = session(true);
        let mut w = String::new();
        let mut ev = Vec::new();
        for c in long.chunks(chunk) {
            let (w1, e1) = send(&mut p, c);
            w.push_str(&w1);
            let closed = e1.contains(&Ev::Close);
            ev.extend(e1);
            if closed {
                break;
            }
        }
        assert_eq!((w.as_str(), ev), ("BYE \"Line too long.\"\r\n", vec![Ev::Close]), "chunk {chunk}");
    }
}

#[test]
fn ten_megabytes_without_crlf_closes_with_bounded_buffer() {
    let mut p = session(true);
    let mut closed = false;
    for _ in 0..(10 * 1024) {
        p.feed(&[b'a'; 1024]);
        assert!(p.shell.buf.len() <= MAX_BUFFERED);
        let (_, ev) = pump(&mut p);
        if ev.contains(&Ev::Close) {
            closed = true;
            break;
        }
    }
    assert!(closed);
    // In one read too.
    let mut p = session(true);
    p.feed(&vec![b'a'; 10 * 1024 * 1024]);
    assert!(p.shell.buf.len() <= MAX_BUFFERED);
    assert_eq!(pump(&mut p), ("BYE \"Too much input.\"\r\n".into(), vec![Ev::Close]));
}

#[test]
fn large_literals_close() {
    for input in [&b"PUTSCRIPT \"s\" {8193+}\r\n"[..], b"PUTSCRIPT \"s\" {8193}\r\n", b"NOOP {4294967296+}\r\n"] {
        let mut p = session(true);
        assert_eq!(send(&mut p, input), ("BYE \"Literal too big.\"\r\n".into(), vec![Ev::Close]), "{}", text(input));
    }
    let mut p = session(true);
    let (w, ev) = send(&mut p, b"AUTHENTICATE \"PLAIN\"\r\n{9000+}\r\n");
    assert_eq!((w.as_str(), ev), ("\"\"\r\nBYE \"Literal too big.\"\r\n", vec![Ev::Close]));
    // Within the literal limit but over the command limit.
    let mut cmd = Vec::new();
    cmd.extend(b"PUTSCRIPT {8000+}\r\n");
    cmd.extend(vec![b'x'; 8000]);
    cmd.extend(b" {8000+}\r\n");
    cmd.extend(vec![b'x'; 8000]);
    cmd.extend(b" {8000+}\r\n");
    let mut p = session(true);
    assert_eq!(send(&mut p, &cmd), ("BYE \"Command too long.\"\r\n".into(), vec![Ev::Close]));
    // An absurd length is not a number: a syntax error, no allocation.
    let mut p = session(true);
    assert_eq!(send(&mut p, b"NOOP {99999999999999999999999+}\r\n").0, "NO \"Syntax error.\"\r\n");
}

#[test]
fn literal_data_is_never_a_command() {
    let mut p = session(false);
    let (w, ev) = send(&mut p, b"PUTSCRIPT \"s\" {10+}\r\nSTARTTLS\r\n\r\nNOOP\r\n");
    assert_eq!(w, "NO \"PUTSCRIPT is not allowed before authentication.\"\r\nOK \"Done\"\r\n");
    assert!(ev.is_empty());
    // A literal announced inside what framing saw as a quoted string closes.
    let mut p = session(true);
    let (w, ev) = send(&mut p, b"NOOP a\"b {8+}\r\nSTARTTLS\r\n");
    assert_eq!(w, "NO \"Syntax error.\"\r\nBYE \"Syntax error.\"\r\n");
    assert_eq!(ev, vec![Ev::Close]);
}

#[test]
fn sasl_line_limit() {
    let mut p = session(true);
    let mut line = b"AUTHENTICATE \"PLAIN\"\r\n\"".to_vec();
    line.extend(vec![b'A'; MAX_SASL_LINE + 4]);
    assert_eq!(send(&mut p, &line), ("\"\"\r\nBYE \"Line too long.\"\r\n".into(), vec![Ev::Close]));
}

#[test]
fn too_many_errors_close() {
    let mut p = session(true);
    for i in 1..=MAX_BAD {
        let (w, ev) = send(&mut p, b"XYZZY\r\n");
        if i < MAX_BAD {
            assert_eq!((w.as_str(), ev), ("NO \"Unknown command.\"\r\n", vec![]));
        } else {
            assert_eq!(w, "NO \"Unknown command.\"\r\nBYE \"Too many errors.\"\r\n");
            assert_eq!(ev, vec![Ev::Close]);
        }
    }
}

#[test]
fn too_many_commands_close() {
    let mut p = session(true);
    for _ in 1..MAX_COMMANDS {
        assert_eq!(send(&mut p, b"NOOP\r\n"), ("OK \"Done\"\r\n".into(), vec![]));
    }
    assert_eq!(send(&mut p, b"NOOP\r\n"), ("OK \"Done\"\r\nBYE \"Too many commands.\"\r\n".into(), vec![Ev::Close]));
}

#[test]
fn input_during_credential_check_is_bounded() {
    let mut p = session(true);
    let _ = send(&mut p, format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", b64("\0alice\0pw")).as_bytes());
    p.feed(&vec![b'x'; MAX_BUFFERED + 1]);
    assert!(p.shell.buf.len() <= MAX_BUFFERED);
    assert_eq!(p.auth_succeeded(), b"");
    assert_eq!(pump(&mut p), ("BYE \"Too much input.\"\r\n".into(), vec![Ev::Close]));
}

// ---------------------------------------------------------------------------------------
// Every split, properties, corpus
// ---------------------------------------------------------------------------------------

/// What a whole session produced: written bytes, actions, bytes relayed after login.
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    written: String,
    events: Vec<Ev>,
    relayed: Vec<u8>,
}

/// The password that the fake credential check accepts.
const GOOD: &[u8] = b"right";

/// Runs a session like a driver: each turn (what the client sends before it waits for
/// an answer) is fed in its chunks; a STARTTLS completes at the end of its turn (bytes
/// after it in the same turn arrive before the handshake). `GOOD` logs in (later bytes
/// are relayed), other credentials fail, Refuse is answered. Checks the invariants at
/// every step.
fn drive_turns(tls: bool, turns: &[Vec<Vec<u8>>]) -> Result<Transcript, TestCaseError> {
    drive_turns_with(tls, false, turns)
}

/// [`drive_turns`], offering OAuth if `oauth`.
fn drive_turns_with(tls: bool, oauth: bool, turns: &[Vec<Vec<u8>>]) -> Result<Transcript, TestCaseError> {
    let mut p = PreAuth::with_listing(HOST, tls, !tls, "", oauth.then(offer));
    let mut t = Transcript { written: String::new(), events: Vec::new(), relayed: Vec::new() };
    let mut encrypted = tls;
    let mut done = false;
    let mut closed = false;
    let mut await_tls = false;
    let mut w = Vec::new();
    let poll = |p: &mut PreAuth,
                t: &mut Transcript,
                w: &mut Vec<u8>,
                done: &mut bool,
                closed: &mut bool,
                await_tls: &mut bool,
                encrypted: bool|
     -> Result<(), TestCaseError> {
        for _ in 0..100_000 {
            let step = p.next();
            prop_assert!(p.shell.buf.len() <= MAX_BUFFERED);
            match step {
                Next::NeedInput => return Ok(()),
                Next::Write(b) => {
                    prop_assert!(!*closed, "write after close");
                    w.extend(b);
                }
                Next::StartTls => {
                    prop_assert!(!encrypted, "STARTTLS inside TLS");
                    t.events.push(Ev::StartTls);
                    *await_tls = true;
                }
                Next::Event(Action::Authenticate(c)) => {
                    prop_assert!(encrypted, "Authenticate before TLS");
                    t.events.push(Ev::Auth { user: c.username.clone(), pass: c.password.expose().clone() });
                    if c.password.expose() == GOOD {
                        t.relayed.extend(p.auth_succeeded());
                        *done = true;
                    } else {
                        p.auth_failed(AuthReply::Failed);
                    }
                }
                Next::Event(Action::Refuse(r)) => {
                    prop_assert!(encrypted, "SASL exchange before TLS");
                    t.events.push(Ev::Refuse(r.clone()));
                    p.auth_failed(r);
                }
                Next::Close => {
                    t.events.push(Ev::Close);
                    *closed = true;
                    return Ok(());
                }
            }
        }
        Err(TestCaseError::fail("next() did not settle"))
    };
    poll(&mut p, &mut t, &mut w, &mut done, &mut closed, &mut await_tls, encrypted)?;
    for turn in turns {
        for c in turn {
            if closed {
                break;
            }
            if done {
                t.relayed.extend(c);
                continue;
            }
            p.feed(c);
            prop_assert!(p.shell.buf.len() <= MAX_BUFFERED);
            poll(&mut p, &mut t, &mut w, &mut done, &mut closed, &mut await_tls, encrypted)?;
        }
        if await_tls && !closed {
            await_tls = false;
            p.tls_started();
            encrypted = true;
            poll(&mut p, &mut t, &mut w, &mut done, &mut closed, &mut await_tls, encrypted)?;
        }
    }
    // Every byte written is a CRLF-terminated line without bare CR or LF.
    prop_assert!(w.is_empty() || w.ends_with(b"\r\n"));
    for line in w.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        prop_assert!(!line.contains(&b'\r'));
    }
    t.written = text(&w);
    Ok(t)
}

/// [`drive_turns`] with each read a turn of its own (a client that waits after each).
fn drive(tls: bool, oauth: bool, chunks: &[Vec<u8>]) -> Result<Transcript, TestCaseError> {
    let turns: Vec<Vec<Vec<u8>>> = chunks.iter().map(|c| vec![c.clone()]).collect();
    drive_turns_with(tls, oauth, &turns)
}

/// A session that exercises most paths: capability, noop, literal, STARTTLS with an
/// injected command, a failed PLAIN, a cancelled LOGIN, a good LOGIN with pipelining.
fn reference_session() -> Vec<u8> {
    b"CAPABILITY\r\nNOOP {3+}\r\nabc\r\nPUTSCRIPT \"s\" {4}\r\nkeep\r\nSTARTTLS\r\nNOOP \"injected\"\r\n".to_vec()
}

fn reference_after_tls() -> Vec<u8> {
    format!(
        "AUTHENTICATE \"PLAIN\" \"{}\"\r\nAUTHENTICATE \"LOGIN\"\r\n\"*\"\r\nAUTHENTICATE \"LOGIN\" {{8+}}\r\n{}\r\n\"{}\"\r\nLISTSCRIPTS\r\n",
        b64("\0alice\0wrong"),
        b64("alice"),
        b64("right")
    )
    .into_bytes()
}

/// The reference transcript, spelled out once.
#[test]
fn reference_session_transcript() {
    let t = drive_turns(false, &[vec![reference_session()], vec![reference_after_tls()]]).unwrap();
    assert_eq!(
        t.events,
        vec![
            Ev::StartTls,
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled.")),
            auth("alice", "right")
        ]
    );
    assert_eq!(
        t.written,
        format!(
            "{LISTING_PLAIN}{READY}{LISTING_PLAIN}OK \"Capability completed.\"\r\nOK (TAG \"abc\") \"Done\"\r\n\
             NO \"PUTSCRIPT is not allowed before authentication.\"\r\nOK \"Begin TLS negotiation now.\"\r\n\
             {LISTING_TLS}OK \"TLS negotiation successful.\"\r\n{FAILED}\"VXNlcm5hbWU6\"\r\n\
             NO \"Authentication cancelled.\"\r\n\"UGFzc3dvcmQ6\"\r\nOK \"Logged in.\"\r\n"
        )
    );
    assert_eq!(t.relayed, b"LISTSCRIPTS\r\n");
}

/// The same session split at every byte (each turn at every position, and everything
/// byte by byte) gives the same transcript (SECURITY.md cases 5 and 27).
#[test]
fn every_split_gives_the_same_transcript() {
    let turns = [reference_session(), reference_after_tls()];
    let whole: Vec<Vec<Vec<u8>>> = turns.iter().map(|t| vec![t.clone()]).collect();
    let reference = drive_turns(false, &whole).unwrap();
    for (ti, turn) in turns.iter().enumerate() {
        for cut in 0..=turn.len() {
            let mut split = whole.clone();
            split[ti] = vec![turn[..cut].to_vec(), turn[cut..].to_vec()];
            assert_eq!(drive_turns(false, &split).unwrap(), reference, "turn {ti} cut {cut}");
        }
    }
    let bytewise: Vec<Vec<Vec<u8>>> = turns.iter().map(|t| t.iter().map(|b| vec![*b]).collect()).collect();
    assert_eq!(drive_turns(false, &bytewise).unwrap(), reference);
}

fn sieveish_byte() -> impl Strategy<Value = u8> {
    prop::sample::select(b"aAcCeEhHnNtTpPlLsSoOgGiI0123456789  \"\"{}+*\r\n\r\n\0\\()=".to_vec())
}

fn sieveish_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"AUTHENTICATE ".to_vec()),
        Just(b"\"PLAIN\"".to_vec()),
        Just(b"\"LOGIN\"".to_vec()),
        Just(b"\"XOAUTH2\"".to_vec()),
        Just(b"\"OAUTHBEARER\"".to_vec()),
        Just(b"\"dXNlcj1hbGljZQFhdXRoPUJlYXJlciByaWdodAEB\"".to_vec()),
        Just(b"\"dXNlcj1hbGljZQFhdXRoPUJlYXJlciB3cm9uZwEB\"".to_vec()),
        Just(b"\"AQ==\"".to_vec()),
        Just(b"STARTTLS".to_vec()),
        Just(b"CAPABILITY".to_vec()),
        Just(b"NOOP".to_vec()),
        Just(b"LOGOUT".to_vec()),
        Just(b"PUTSCRIPT".to_vec()),
        Just(b"\"*\"".to_vec()),
        Just(b"\"AGFsaWNlAHJpZ2h0\"".to_vec()),
        Just(b"\"YWxpY2U=\"".to_vec()),
        Just(b"\"cmlnaHQ=\"".to_vec()),
        Just(b"\"\"".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"{5+}\r\n".to_vec()),
        Just(b"{3}\r\n".to_vec()),
        Just(b"{9000+}\r\n".to_vec()),
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        prop::collection::vec(sieveish_byte(), 0..8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(512), .. ProptestConfig::default() })]

    /// Any bytes in any split: no panic, bounded buffer, no login before TLS.
    #[test]
    fn prop_random_bytes(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(any::<u8>(), 0..96))) {
        drive(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_sieveish_alphabet(tls in any::<bool>(), oauth in any::<bool>(), chunks in chunked(prop::collection::vec(sieveish_byte(), 0..96))) {
        drive(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_sieveish_tokens(
        tls in any::<bool>(),
        oauth in any::<bool>(),
        chunks in chunked(prop::collection::vec(sieveish_token(), 0..12).prop_map(|v| v.concat())),
    ) {
        drive(tls, oauth, &chunks)?;
    }

    #[test]
    fn prop_big_chunks(tls in any::<bool>(), oauth in any::<bool>(), chunks in prop::collection::vec(prop::collection::vec(sieveish_byte(), 0..20_000), 0..4)) {
        drive(tls, oauth, &chunks)?;
    }

    /// Token soup split at random places gives the same transcript as whole.
    #[test]
    fn prop_split_invariant(
        tls in any::<bool>(),
        oauth in any::<bool>(),
        tokens in prop::collection::vec(sieveish_token(), 0..16),
        cuts in prop::collection::vec(0usize..400, 0..8),
    ) {
        let all = tokens.concat();
        let reference = drive_turns_with(tls, oauth, &[vec![all.clone()]])?;
        let chunks = split_at(&all, cuts.iter().map(|c| c % (all.len() + 1)));
        prop_assert_eq!(drive_turns_with(tls, oauth, &[chunks])?, reference);
    }
}

/// The committed corpus (fuzz/corpus/sieve) replays under `cargo test`: whole, byte by
/// byte and in 7-byte reads, the invariants hold; as one turn, every cut gives the same
/// transcript.
#[test]
fn corpus_replays() {
    let cases = crate::proto::corpus_cuts("sieve");
    assert!(cases.len() >= 12, "corpus missing: {}", cases.len());
    for (tls, oauth) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut reference: Option<(String, Transcript)> = None;
        for (name, chunks) in &cases {
            drive(tls, oauth, chunks).unwrap_or_else(|e| panic!("{name} (tls {tls}, oauth {oauth}): {e}"));
            let t =
                drive_turns_with(tls, oauth, std::slice::from_ref(chunks)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let file = name.rsplit_once(' ').map(|(f, _)| f.to_string()).unwrap_or_default();
            match &reference {
                Some((f, r)) if *f == file => assert_eq!(&t, r, "{name} (tls {tls})"),
                _ => reference = Some((file, t)),
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
    let mut p = PreAuth::with_listing(HOST, tls, !tls, "", Some(offer()));
    let (g, ev) = pump(&mut p);
    assert!(g.ends_with(READY), "{g}");
    assert!(ev.is_empty());
    p
}

fn oauthbearer(user: &str, token: &str) -> String {
    testing::oauthbearer(user, "mx.example", 4190, token)
}

fn challenge(mech: BearerMechanism) -> String {
    format!("\"{}\"\r\n", offer().error_challenge(mech))
}

#[test]
fn the_listing_names_the_bearer_mechanisms_only_inside_tls_and_only_when_on() {
    let mut p = PreAuth::with_listing(HOST, true, false, "", Some(offer()));
    let (g, _) = pump(&mut p);
    assert!(g.contains("\"SASL\" \"PLAIN LOGIN XOAUTH2 OAUTHBEARER\"\r\n"), "{g}");
    let (w, _) = send(&mut p, b"CAPABILITY\r\n");
    assert!(w.contains("\"SASL\" \"PLAIN LOGIN XOAUTH2 OAUTHBEARER\"\r\n"), "{w}");
    let mut p = PreAuth::with_listing(HOST, false, true, "", Some(offer()));
    let (g, _) = pump(&mut p);
    assert_eq!(g, format!("{LISTING_PLAIN}{READY}"));
    let (w, _) = send(&mut p, format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", xoauth2("alice", "t")).as_bytes());
    assert_eq!(w, "NO \"TLS required: use STARTTLS first\"\r\n");
    let _ = send(&mut p, b"STARTTLS\r\n");
    p.tls_started();
    assert!(pump(&mut p).0.contains("\"SASL\" \"PLAIN LOGIN XOAUTH2 OAUTHBEARER\"\r\n"));
    // Off: as before.
    let mut p = session(true);
    let (w, _) = send(&mut p, b"AUTHENTICATE \"XOAUTH2\"\r\n");
    assert_eq!(w, "NO \"Unsupported authentication mechanism.\"\r\n");
}

#[test]
fn bearer_logins_with_and_without_initial_response() {
    let mut p = oauth_session(true);
    expect_bearer(
        &mut p,
        format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", xoauth2("alice", "t1")).as_bytes(),
        "alice",
        "t1",
    );
    let mut p = oauth_session(true);
    let ir = oauthbearer("alice", "t2");
    expect_bearer(
        &mut p,
        format!("AUTHENTICATE \"oauthbearer\" {{{}+}}\r\n{ir}\r\n", ir.len()).as_bytes(),
        "alice",
        "t2",
    );
    for (mech, msg) in [("XOAUTH2", xoauth2("bob", "t3")), ("OAUTHBEARER", oauthbearer("bob", "t3"))] {
        let mut p = oauth_session(true);
        assert_eq!(send(&mut p, format!("AUTHENTICATE \"{mech}\"\r\n").as_bytes()), ("\"\"\r\n".to_string(), vec![]));
        expect_bearer(&mut p, format!("\"{msg}\"\r\n").as_bytes(), "bob", "t3");
        assert_eq!(p.auth_succeeded(), b"");
        assert_eq!(pump(&mut p).0, "OK \"Logged in.\"\r\n");
    }
}

#[test]
fn a_refused_token_gets_the_error_challenge_then_no() {
    for answer in [&b"\"AQ==\"\r\n"[..], b"\"\"\r\n", b"\"*\"\r\n", b"{4+}\r\nAQ==\r\n", b"junk\r\n"] {
        for (mech, msg) in [
            (BearerMechanism::XOAuth2, xoauth2("alice", "old")),
            (BearerMechanism::OAuthBearer, oauthbearer("alice", "old")),
        ] {
            let mut p = oauth_session(true);
            expect_bearer(&mut p, format!("AUTHENTICATE \"{}\" \"{msg}\"\r\n", mech.name()).as_bytes(), "alice", "old");
            p.auth_failed(AuthReply::Failed);
            assert_eq!(pump(&mut p), (challenge(mech), vec![]));
            assert_eq!(send(&mut p, answer), (FAILED.to_string(), vec![]), "{answer:?}");
            assert_eq!(send(&mut p, b"NOOP\r\n").0, "OK \"Done\"\r\n");
        }
    }
    // A metadata URL long enough to need a literal.
    let long = OAuthOffer { metadata_url: format!("https://mail.example.com/{}", "x".repeat(1000)) };
    let mut p = PreAuth::with_listing(HOST, true, false, "", Some(long.clone()));
    let _ = pump(&mut p);
    expect_bearer(
        &mut p,
        format!("AUTHENTICATE \"OAUTHBEARER\" \"{}\"\r\n", oauthbearer("a", "t")).as_bytes(),
        "a",
        "t",
    );
    p.auth_failed(AuthReply::Failed);
    let c = long.error_challenge(BearerMechanism::OAuthBearer);
    assert_eq!(pump(&mut p).0, format!("{{{}}}\r\n{c}\r\n", c.len()));
    assert_eq!(send(&mut p, b"\"AQ==\"\r\n").0, FAILED);
    // Other refusals keep their replies; a malformed message is a plain failure.
    let mut p = oauth_session(true);
    expect_bearer(
        &mut p,
        format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", xoauth2("alice", "t")).as_bytes(),
        "alice",
        "t",
    );
    p.auth_failed(AuthReply::TooMany);
    assert_eq!(pump(&mut p).0, "NO (TRYLATER) \"Too many sessions.\"\r\n");
    let (_, ev) = send(&mut p, format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", b64("user=a\x01\x01")).as_bytes());
    assert_eq!(ev, vec![Ev::Refuse(AuthReply::Failed)]);
    p.auth_failed(AuthReply::Failed);
    assert_eq!(pump(&mut p).0, FAILED);
}

#[test]
fn cancel_and_failure_count_in_bearer_exchanges() {
    let mut p = oauth_session(true);
    let _ = send(&mut p, b"AUTHENTICATE \"XOAUTH2\"\r\n");
    assert_eq!(send(&mut p, b"\"*\"\r\n").1, vec![Ev::Refuse(AuthReply::Aborted("Authentication cancelled."))]);
    p.auth_failed(AuthReply::Aborted("Authentication cancelled."));
    let _ = pump(&mut p);
    for i in 0..2 {
        expect_bearer(
            &mut p,
            format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", xoauth2("alice", "x")).as_bytes(),
            "alice",
            "x",
        );
        p.auth_failed(AuthReply::Failed);
        let _ = pump(&mut p);
        let (w, ev) = send(&mut p, b"\"AQ==\"\r\n");
        if i == 1 {
            assert_eq!((w, ev), (format!("{FAILED}BYE \"Too many authentication failures.\"\r\n"), vec![Ev::Close]));
        } else {
            assert_eq!((w, ev), (FAILED.to_string(), vec![]));
        }
    }
}

#[test]
fn every_split_bearer_exchanges() {
    let turns: Vec<Vec<u8>> = [
        format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\n", xoauth2("alice", "wrong")),
        "\"AQ==\"\r\n".to_string(),
        "AUTHENTICATE \"OAUTHBEARER\"\r\n".to_string(),
        "\"*\"\r\n".to_string(),
        "AUTHENTICATE \"OAUTHBEARER\"\r\n".to_string(),
        format!("\"{}\"\r\nLISTSCRIPTS\r\n", oauthbearer("alice", "right")),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let whole: Vec<Vec<Vec<u8>>> = turns.iter().map(|t| vec![t.clone()]).collect();
    let reference = drive_turns_with(true, true, &whole).unwrap();
    assert_eq!(
        reference.events,
        vec![
            auth("alice", "wrong"),
            Ev::Refuse(AuthReply::Aborted("Authentication cancelled.")),
            auth("alice", "right")
        ]
    );
    assert!(reference.written.contains(&format!("{}{FAILED}\"\"\r\n", challenge(BearerMechanism::XOAuth2))));
    assert_eq!(reference.relayed, b"LISTSCRIPTS\r\n");
    for (ti, turn) in turns.iter().enumerate() {
        for cut in 0..=turn.len() {
            let mut split = whole.clone();
            split[ti] = vec![turn[..cut].to_vec(), turn[cut..].to_vec()];
            assert_eq!(drive_turns_with(true, true, &split).unwrap(), reference, "turn {ti} cut {cut}");
        }
    }
    let bytewise: Vec<Vec<Vec<u8>>> = turns.iter().map(|t| t.iter().map(|b| vec![*b]).collect()).collect();
    assert_eq!(drive_turns_with(true, true, &bytewise).unwrap(), reference);
}
