//! Scripted upstream (Dovecot-like) exchanges for the master login client. No sockets.
//! Case numbers refer to SECURITY.md §B.

use super::*;
use crate::proto::imap::base64;
use crate::proto::testing;

const USER: &str = "alice@example.com";
const MASTER: &str = "mailgate";
const MASTER_PW: &str = "m4st3r-s3cret";

fn client() -> SocketAddr {
    "203.0.113.7:51234".parse().unwrap()
}

fn local() -> SocketAddr {
    "192.0.2.1:993".parse().unwrap()
}

fn new_login(style: LoginStyle, starttls: bool) -> UpstreamLogin {
    new_login_as(USER, MASTER_PW, style, starttls)
}

fn new_login_as(user: &str, master_pw: &str, style: LoginStyle, starttls: bool) -> UpstreamLogin {
    UpstreamLogin::new(user, MASTER, SecretString::from(master_pw.to_string()), style, starttls, client(), local())
}

fn sep() -> LoginStyle {
    LoginStyle::MasterSeparator("*".to_string())
}

/// A non-`Write` step, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    StartTls,
    Done(String),
    Fail(UpstreamError),
}

/// Polls until upstream input is needed, or a final step. Returns what was written and the
/// other steps.
fn pump(u: &mut UpstreamLogin) -> (String, Vec<St>) {
    testing::pump_upstream(u, St::StartTls, |e| match e {
        Ok(c) => St::Done(c),
        Err(e) => St::Fail(e),
    })
}

fn send(u: &mut UpstreamLogin, bytes: &[u8]) -> (String, Vec<St>) {
    u.feed(bytes);
    pump(u)
}

fn plain_b64() -> String {
    base64(format!("{USER}\0{MASTER}\0{MASTER_PW}").as_bytes())
}

fn id_line() -> String {
    "M2 ID (\"x-originating-ip\" \"203.0.113.7\" \"x-originating-port\" \"51234\" \"x-connected-ip\" \"192.0.2.1\" \
     \"x-connected-port\" \"993\")\r\n"
        .to_string()
}

const GREETING_SASL_IR: &[u8] =
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";
const GREETING_NO_SASL_IR: &[u8] = b"* OK [CAPABILITY IMAP4rev1 ID IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";
const GREETING_STARTTLS: &[u8] =
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS LOGINDISABLED AUTH=PLAIN] Dovecot ready.\r\n";
const POST_LOGIN_CAPS: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFS MOVE LITERAL+";

fn logged_in() -> String {
    format!("M3 OK [CAPABILITY {POST_LOGIN_CAPS}] Logged in\r\n")
}

// ---------------------------------------------------------------------------------------
// Master SASL
// ---------------------------------------------------------------------------------------

#[test]
fn nothing_is_sent_before_the_greeting() {
    for starttls in [false, true] {
        let mut u = new_login(LoginStyle::MasterSasl, starttls);
        assert_eq!(pump(&mut u), (String::new(), vec![]));
        // A partial greeting is not enough.
        assert_eq!(send(&mut u, b"* OK [CAPABILITY IMAP4rev1"), (String::new(), vec![]));
    }
}

#[test]
fn master_sasl_with_sasl_ir() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let (w, st) = send(&mut u, GREETING_SASL_IR);
    assert_eq!(w, format!("{}M3 AUTHENTICATE PLAIN {}\r\n", id_line(), plain_b64()));
    assert!(st.is_empty());
    assert_eq!(send(&mut u, b"* ID (\"name\" \"Dovecot\")\r\nM2 OK ID completed.\r\n"), (String::new(), vec![]));
    let (w, st) = send(&mut u, logged_in().as_bytes());
    assert_eq!(w, "");
    assert_eq!(st, vec![St::Done(POST_LOGIN_CAPS.to_string())]);
    assert!(u.into_leftover().is_empty());
}

#[test]
fn master_sasl_payload_is_user_master_password() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let (w, _) = send(&mut u, GREETING_SASL_IR);
    let b64 = w.lines().nth(1).unwrap().strip_prefix("M3 AUTHENTICATE PLAIN ").unwrap();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(raw, format!("{USER}\0{MASTER}\0{MASTER_PW}").into_bytes());
}

#[test]
fn master_sasl_all_replies_in_one_read() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let reply = format!("* ID NIL\r\nM2 OK ID completed.\r\n{}* 3 EXISTS\r\nM9 partial", logged_in());
    assert_eq!(send(&mut u, reply.as_bytes()), (String::new(), vec![St::Done(POST_LOGIN_CAPS.into())]));
    // What came after the login reply belongs to the client.
    assert_eq!(u.into_leftover(), b"* 3 EXISTS\r\nM9 partial");
}

#[test]
fn master_sasl_without_sasl_ir_uses_continuation() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let (w, st) = send(&mut u, GREETING_NO_SASL_IR);
    assert_eq!(w, format!("{}M3 AUTHENTICATE PLAIN\r\n", id_line()));
    assert!(st.is_empty());
    assert_eq!(send(&mut u, b"M2 OK ID completed.\r\n"), (String::new(), vec![]));
    assert_eq!(send(&mut u, b"+ \r\n"), (format!("{}\r\n", plain_b64()), vec![]));
    assert_eq!(send(&mut u, logged_in().as_bytes()), (String::new(), vec![St::Done(POST_LOGIN_CAPS.into())]));
}

#[test]
fn master_sasl_second_continuation_is_a_protocol_error() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_NO_SASL_IR);
    let _ = send(&mut u, b"+ \r\n");
    assert_eq!(
        send(&mut u, b"+ \r\n"),
        (String::new(), vec![St::Fail(UpstreamError::Protocol("unexpected continuation"))])
    );
    // With SASL-IR no continuation is expected at all.
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    assert_eq!(
        send(&mut u, b"+ \r\n"),
        (String::new(), vec![St::Fail(UpstreamError::Protocol("unexpected continuation"))])
    );
}

#[test]
fn greeting_without_capabilities_assumes_sasl_ir() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let (w, _) = send(&mut u, b"* OK Dovecot ready.\r\n");
    assert_eq!(w, format!("{}M3 AUTHENTICATE PLAIN {}\r\n", id_line(), plain_b64()));
}

#[test]
fn id_line_carries_ipv6_addresses() {
    let mut u = UpstreamLogin::new(
        USER,
        MASTER,
        SecretString::from(MASTER_PW.to_string()),
        LoginStyle::MasterSasl,
        false,
        "[2001:db8::7]:40000".parse().unwrap(),
        "[2001:db8::1]:143".parse().unwrap(),
    );
    let (w, _) = send(&mut u, GREETING_SASL_IR);
    assert!(
        w.starts_with(
            "M2 ID (\"x-originating-ip\" \"2001:db8::7\" \"x-originating-port\" \"40000\" \"x-connected-ip\" \
             \"2001:db8::1\" \"x-connected-port\" \"143\")\r\n"
        ),
        "{w}"
    );
}

// ---------------------------------------------------------------------------------------
// Master separator (LOGIN "user*master" "password")
// ---------------------------------------------------------------------------------------

#[test]
fn master_separator_login() {
    let mut u = new_login(sep(), false);
    let (w, st) = send(&mut u, GREETING_SASL_IR);
    assert_eq!(w, format!("{}M3 LOGIN \"{USER}*{MASTER}\" \"{MASTER_PW}\"\r\n", id_line()));
    assert!(st.is_empty());
    let (w, st) = send(&mut u, format!("M2 OK ID completed.\r\n{}", logged_in()).as_bytes());
    assert_eq!((w.as_str(), st), ("", vec![St::Done(POST_LOGIN_CAPS.into())]));
}

#[test]
fn master_separator_quoting() {
    let cases = [
        ("al\"ice", "p\"w", "M3 LOGIN \"al\\\"ice*mailgate\" \"p\\\"w\"\r\n"),
        ("al\\ice", "p\\w", "M3 LOGIN \"al\\\\ice*mailgate\" \"p\\\\w\"\r\n"),
        ("a b", "\\\"", "M3 LOGIN \"a b*mailgate\" \"\\\\\\\"\"\r\n"),
        ("{5}", "x}", "M3 LOGIN \"{5}*mailgate\" \"x}\"\r\n"),
    ];
    for (user, pw, want) in cases {
        let mut u = new_login_as(user, pw, sep(), false);
        let (w, st) = send(&mut u, GREETING_SASL_IR);
        assert!(st.is_empty());
        assert_eq!(w, format!("{}{want}", id_line()), "{user:?} {pw:?}");
    }
    // A different separator.
    let mut u = new_login_as(USER, MASTER_PW, LoginStyle::MasterSeparator("%".into()), false);
    let (w, _) = send(&mut u, GREETING_SASL_IR);
    assert!(w.ends_with(&format!("M3 LOGIN \"{USER}%{MASTER}\" \"{MASTER_PW}\"\r\n")), "{w}");
}

#[test]
fn master_separator_unsendable() {
    // CR, LF, NUL, other controls and 8-bit characters can't go in a quoted string:
    // nothing is sent at all (not even ID).
    for (user, pw) in [
        ("alice", "p\r\nw"),
        ("alice", "p\0w"),
        ("al\nice", "pw"),
        ("al\u{e9}ce", "pw"),
        ("alice", "p\u{7f}"),
        ("a\tb", "pw"),
    ] {
        let mut u = new_login_as(user, pw, sep(), false);
        assert_eq!(
            send(&mut u, GREETING_SASL_IR),
            (String::new(), vec![St::Fail(UpstreamError::Unsendable)]),
            "{user:?}"
        );
        // And it stays failed.
        assert!(matches!(u.next(), Next::Event(Err(UpstreamError::Unsendable))));
    }
}

// ---------------------------------------------------------------------------------------
// Capabilities after login (case 53)
// ---------------------------------------------------------------------------------------

#[test]
fn tagged_ok_without_capability_asks_for_it() {
    for style in [LoginStyle::MasterSasl, sep()] {
        let mut u = new_login(style, false);
        let _ = send(&mut u, GREETING_SASL_IR);
        assert_eq!(send(&mut u, b"M2 OK ID completed.\r\nM3 OK Logged in\r\n"), ("M4 CAPABILITY\r\n".into(), vec![]));
        assert_eq!(send(&mut u, b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\n"), (String::new(), vec![]));
        assert_eq!(
            send(&mut u, b"M4 OK Capability completed.\r\n"),
            (String::new(), vec![St::Done("IMAP4rev1 IDLE MOVE".into())])
        );
    }
}

#[test]
fn capability_reply_table() {
    let cases: &[(&[u8], St)] = &[
        (b"* capability IMAP4rev1 X\r\nm4 ok\r\n", St::Done("IMAP4rev1 X".into())),
        (b"M4 OK\r\n", St::Done(String::new())),
        (b"* 1 EXISTS\r\n* CAPABILITY A B\r\nM4 OK\r\n", St::Done("A B".into())),
        (b"* CAPABILITY A ]\x01[ B\r\nM4 OK\r\n", St::Done("A  B".into())),
        (b"M4 NO\r\n", St::Fail(UpstreamError::Protocol("CAPABILITY refused"))),
        (b"M4 BAD\r\n", St::Fail(UpstreamError::Protocol("CAPABILITY refused"))),
        (b"* CAPABILITY {5}\r\n", St::Fail(UpstreamError::Protocol("literal in a login response"))),
    ];
    for (reply, want) in cases {
        let mut u = new_login(LoginStyle::MasterSasl, false);
        let _ = send(&mut u, GREETING_SASL_IR);
        let _ = send(&mut u, b"M3 OK Logged in\r\n");
        assert_eq!(send(&mut u, reply), (String::new(), vec![want.clone()]), "{}", String::from_utf8_lossy(reply));
    }
}

#[test]
fn untagged_capability_during_login_is_used() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let (w, st) = send(&mut u, b"M2 OK\r\n* CAPABILITY IMAP4rev1 IDLE\r\nM3 OK Logged in\r\n");
    assert_eq!((w.as_str(), st), ("", vec![St::Done("IMAP4rev1 IDLE".into())]));
    // The tagged code wins over an earlier untagged list.
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let (_, st) = send(&mut u, b"* CAPABILITY OLD\r\nM3 OK [CAPABILITY NEW ONE] Logged in\r\n");
    assert_eq!(st, vec![St::Done("NEW ONE".into())]);
}

#[test]
fn greeting_capabilities_are_not_the_post_login_list() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    assert_eq!(send(&mut u, b"M3 OK Logged in\r\n").0, "M4 CAPABILITY\r\n");
}

#[test]
fn capabilities_are_sanitised() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let (_, st) = send(&mut u, b"M3 OK [CAPABILITY IMAP4rev1 \x1b[31mX\xff IDLE ] Logged in\r\n");
    // Control, 8-bit and bracket characters are dropped.
    assert_eq!(st, vec![St::Done("IMAP4rev1 31mX IDLE".into())]);
}

// ---------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------

#[test]
fn greeting_table() {
    let cases: &[&[u8]] = &[
        b"* BYE Server shutting down\r\n",
        b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as alice\r\n",
        b"* NO go away\r\n",
        b"* BAD\r\n",
        b"M1 OK\r\n",
        b"+ \r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"220 smtp.example ESMTP\r\n",
        b"\r\n",
        b"*OK\r\n",
    ];
    for greeting in cases {
        for starttls in [false, true] {
            for style in [LoginStyle::MasterSasl, sep()] {
                let mut u = new_login(style, starttls);
                assert_eq!(
                    send(&mut u, greeting),
                    (String::new(), vec![St::Fail(UpstreamError::Greeting)]),
                    "{}",
                    String::from_utf8_lossy(greeting)
                );
                // Finished: polling again does not revive it.
                assert!(matches!(u.next(), Next::Event(Err(_))));
            }
        }
    }
    // Case-insensitive OK is a greeting.
    let mut u = new_login(LoginStyle::MasterSasl, false);
    assert!(send(&mut u, b"* ok hi\r\n").0.starts_with("M2 ID"));
}

#[test]
fn login_refused_table() {
    let cases: &[(&[u8], St)] = &[
        (b"M3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", St::Fail(UpstreamError::LoginRefused)),
        (b"M3 BAD Error in IMAP command\r\n", St::Fail(UpstreamError::LoginRefused)),
        (b"M2 OK\r\nM3 NO [AUTHORIZATIONFAILED]\r\n", St::Fail(UpstreamError::LoginRefused)),
        (b"* BYE Disconnected for inactivity.\r\n", St::Fail(UpstreamError::LoginRefused)),
        (b"M5 OK\r\n", St::Fail(UpstreamError::Protocol("unexpected tagged response"))),
        (b"M1 OK\r\n", St::Fail(UpstreamError::Protocol("unexpected tagged response"))),
        (b"garbage\r\n", St::Fail(UpstreamError::Protocol("unexpected tagged response"))),
        (b"* OK [ALERT] hello\r\nM2 NO\r\nM3 NO\r\n", St::Fail(UpstreamError::LoginRefused)),
    ];
    for style in [LoginStyle::MasterSasl, sep()] {
        for (reply, want) in cases {
            let mut u = new_login(style.clone(), false);
            let _ = send(&mut u, GREETING_SASL_IR);
            assert_eq!(send(&mut u, reply), (String::new(), vec![want.clone()]), "{}", String::from_utf8_lossy(reply));
            assert!(matches!(u.next(), Next::Event(Err(_))));
        }
    }
}

#[test]
fn literals_are_refused() {
    // Case 17: a literal in any response at this stage.
    let scripts: &[&[&[u8]]] = &[
        &[b"* OK {5}\r\n"],
        &[b"* OK [CAPABILITY IMAP4rev1] {4294967295}\r\n"],
        &[GREETING_SASL_IR, b"* CAPABILITY {5}\r\n"],
        &[GREETING_SASL_IR, b"M2 OK {99999999999999999999}\r\n"],
        &[GREETING_SASL_IR, b"* ID ({5}\r\n"],
        &[GREETING_SASL_IR, b"M3 OK [CAPABILITY IMAP4rev1] {5}\r\n"],
    ];
    for script in scripts {
        let mut u = new_login(LoginStyle::MasterSasl, false);
        let mut st = Vec::new();
        for part in script.iter() {
            st = send(&mut u, part).1;
        }
        assert_eq!(st, vec![St::Fail(UpstreamError::Protocol("literal in a login response"))], "{script:?}");
    }
    // STARTTLS phase too.
    let mut u = new_login(LoginStyle::MasterSasl, true);
    let _ = send(&mut u, GREETING_STARTTLS);
    assert_eq!(
        send(&mut u, b"* 1 FETCH (BODY[] {5}\r\n").1,
        vec![St::Fail(UpstreamError::Protocol("literal in a login response"))]
    );
}

#[test]
fn long_line_without_crlf_fails_with_bounded_buffer() {
    for phase in 0..3 {
        let mut u = new_login(LoginStyle::MasterSasl, phase == 2);
        if phase >= 1 {
            let _ = send(&mut u, if phase == 2 { GREETING_STARTTLS } else { GREETING_SASL_IR });
        }
        let chunk = vec![b'x'; 4096];
        let mut failed = None;
        for i in 0..(100 * 1024 / chunk.len()) {
            let (_, st) = send(&mut u, &chunk);
            assert!(u.buf.len() <= MAX_LINE + chunk.len(), "phase {phase}: {}", u.buf.len());
            if !st.is_empty() {
                assert_eq!(st, vec![St::Fail(UpstreamError::Protocol("line too long"))]);
                failed = Some(i);
                break;
            }
        }
        // Fails as soon as the limit is passed.
        assert_eq!(failed, Some(MAX_LINE / chunk.len()), "phase {phase}");
    }
    // A complete over-long line in one read.
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let mut line = b"* OK ".to_vec();
    line.extend(vec![b'x'; MAX_LINE]);
    line.extend(b"\r\n");
    assert_eq!(send(&mut u, &line).1, vec![St::Fail(UpstreamError::Protocol("line too long"))]);
}

#[test]
fn line_at_the_limit_is_accepted() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let mut line = b"* CAPABILITY IMAP4rev1 ".to_vec();
    line.resize(MAX_LINE, b'X');
    line.extend(b"\r\nM3 OK\r\n");
    let (w, st) = send(&mut u, &line);
    assert_eq!(w, "");
    let [St::Done(caps)] = st.as_slice() else { panic!("{st:?}") };
    assert!(caps.starts_with("IMAP4rev1 XXX"));
}

// ---------------------------------------------------------------------------------------
// STARTTLS to upstream (cases 12, 14, 15)
// ---------------------------------------------------------------------------------------

#[test]
fn starttls_exchange() {
    let mut u = new_login(LoginStyle::MasterSasl, true);
    assert_eq!(send(&mut u, GREETING_STARTTLS), ("M1 STARTTLS\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"M1 OK Begin TLS negotiation now.\r\n"), (String::new(), vec![St::StartTls]));
    // Nothing is written until the handshake is done.
    assert!(matches!(u.next(), Next::NeedInput));
    u.tls_started();
    assert_eq!(pump(&mut u), (format!("{}M3 AUTHENTICATE PLAIN {}\r\n", id_line(), plain_b64()), vec![]));
    assert_eq!(send(&mut u, format!("M2 OK\r\n{}", logged_in()).as_bytes()).1, vec![St::Done(POST_LOGIN_CAPS.into())]);
}

#[test]
fn starttls_with_master_separator() {
    let mut u = new_login(sep(), true);
    assert_eq!(send(&mut u, GREETING_STARTTLS).0, "M1 STARTTLS\r\n");
    assert_eq!(send(&mut u, b"M1 OK\r\n").1, vec![St::StartTls]);
    u.tls_started();
    assert_eq!(pump(&mut u).0, format!("{}M3 LOGIN \"{USER}*{MASTER}\" \"{MASTER_PW}\"\r\n", id_line()));
}

#[test]
fn starttls_when_greeting_has_no_capabilities() {
    let mut u = new_login(LoginStyle::MasterSasl, true);
    assert_eq!(send(&mut u, b"* OK ready\r\n"), ("M1 STARTTLS\r\n".into(), vec![]));
}

#[test]
fn starttls_stripping_table() {
    // Case 12: STARTTLS not offered, or not accepted → abort; no credentials ever written.
    let not_offered: &[&[u8]] = &[
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n",
        b"* OK [CAPABILITY IMAP4rev1 XSTARTTLS STARTTLSX] ready\r\n",
    ];
    for g in not_offered {
        let mut u = new_login(LoginStyle::MasterSasl, true);
        assert_eq!(send(&mut u, g), (String::new(), vec![St::Fail(UpstreamError::StartTls)]));
    }
    let replies: &[&[u8]] = &[
        b"M1 NO STARTTLS not available\r\n",
        b"M1 BAD Unknown command\r\n",
        b"+ go ahead\r\n",
        b"M2 OK\r\n",
        b"454 4.7.0 TLS not available\r\n",
        b"\r\n",
    ];
    for reply in replies {
        for style in [LoginStyle::MasterSasl, sep()] {
            let mut u = new_login(style, true);
            let (mut all, _) = send(&mut u, GREETING_STARTTLS);
            let (w, st) = send(&mut u, reply);
            all.push_str(&w);
            assert_eq!(all, "M1 STARTTLS\r\n", "{}", String::from_utf8_lossy(reply));
            assert_eq!(st, vec![St::Fail(UpstreamError::StartTls)], "{}", String::from_utf8_lossy(reply));
        }
    }
}

#[test]
fn starttls_lowercase_capability_and_ok() {
    let mut u = new_login(LoginStyle::MasterSasl, true);
    assert_eq!(send(&mut u, b"* OK [capability imap4rev1 starttls] hi\r\n").0, "M1 STARTTLS\r\n");
    assert_eq!(send(&mut u, b"m1 ok\r\n").1, vec![St::StartTls]);
}

#[test]
fn preauth_greeting_with_starttls_aborts() {
    // Case 14.
    let mut u = new_login(LoginStyle::MasterSasl, true);
    assert_eq!(
        send(&mut u, b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] IMAP4rev1 server logged in as alice\r\n"),
        (String::new(), vec![St::Fail(UpstreamError::Greeting)])
    );
}

#[test]
fn untagged_data_before_starttls_ok_is_ignored_and_forgotten() {
    // Case 15: tampering before the TLS switch.
    let mut u = new_login(LoginStyle::MasterSasl, true);
    // Pre-TLS greeting without SASL-IR: after TLS the (forgotten) list must not matter.
    let _ = send(&mut u, b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n");
    let injected =
        b"* CAPABILITY IMAP4rev1 IDLE EVIL\r\n* 54321 EXISTS\r\n* OK [REFERRAL imap://evil/] x\r\n* LIST () \"/\" INBOX\r\n\
          * BYE fake\r\n* OK [CAPABILITY FAKE] x\r\n";
    assert_eq!(send(&mut u, injected), (String::new(), vec![]));
    assert_eq!(u.caps, None);
    assert_eq!(send(&mut u, b"M1 OK\r\n").1, vec![St::StartTls]);
    u.tls_started();
    assert_eq!(u.greeting_caps, None);
    assert_eq!(u.caps, None);
    // SASL-IR is assumed again (the pre-TLS list is gone) ...
    assert_eq!(pump(&mut u).0, format!("{}M3 AUTHENTICATE PLAIN {}\r\n", id_line(), plain_b64()));
    // ... and the post-login list is asked for, not taken from before TLS.
    assert_eq!(send(&mut u, b"M2 OK\r\nM3 OK Logged in\r\n").0, "M4 CAPABILITY\r\n");
    assert_eq!(send(&mut u, b"* CAPABILITY IMAP4rev1 IDLE\r\nM4 OK\r\n").1, vec![St::Done("IMAP4rev1 IDLE".into())]);
}

#[test]
fn bytes_after_starttls_ok_in_same_read_fail() {
    for extra in [&b"* CAPABILITY EVIL\r\n"[..], b"M2 OK\r\n", b"x", b"\r\n"] {
        let mut u = new_login(LoginStyle::MasterSasl, true);
        let _ = send(&mut u, GREETING_STARTTLS);
        let mut reply = b"M1 OK Begin TLS\r\n".to_vec();
        reply.extend(extra);
        assert_eq!(
            send(&mut u, &reply),
            (String::new(), vec![St::Fail(UpstreamError::Protocol("data after STARTTLS OK"))]),
            "{}",
            String::from_utf8_lossy(extra)
        );
        // No handshake, no credentials.
        assert!(matches!(u.next(), Next::Event(Err(_))));
    }
}

#[test]
fn bytes_after_starttls_ok_in_a_later_read_are_dropped() {
    let mut u = new_login(LoginStyle::MasterSasl, true);
    let _ = send(&mut u, GREETING_STARTTLS);
    assert_eq!(send(&mut u, b"M1 OK\r\n").1, vec![St::StartTls]);
    assert_eq!(send(&mut u, b"M3 OK [CAPABILITY FAKE] Logged in\r\n"), (String::new(), vec![]));
    assert!(u.buf.is_empty());
    u.tls_started();
    let (w, st) = pump(&mut u);
    assert!(w.starts_with("M2 ID"));
    assert!(st.is_empty(), "{st:?}");
}

#[test]
fn tls_started_without_starttls_does_nothing() {
    let mut u = new_login(LoginStyle::MasterSasl, true);
    u.tls_started();
    assert_eq!(pump(&mut u), (String::new(), vec![]));
    let _ = send(&mut u, GREETING_STARTTLS);
    // STARTTLS sent, OK not yet received: a premature tls_started must not send the login.
    u.tls_started();
    assert_eq!(pump(&mut u), (String::new(), vec![]));
    assert_eq!(send(&mut u, b"M1 OK\r\n").1, vec![St::StartTls]);
}

#[test]
fn credentials_never_written_before_tls() {
    // Whatever upstream answers to the plaintext part, no write carries the login.
    let replies: &[&[u8]] = &[
        b"M1 NO\r\n",
        b"M1 BAD\r\n",
        b"+ \r\n",
        b"* OK\r\nM1 OK\r\nX",
        b"M3 OK\r\n",
        b"M2 OK\r\n+ \r\n",
        b"* BYE\r\n",
        b"M1 OK\r\n",
    ];
    for reply in replies {
        for style in [LoginStyle::MasterSasl, sep()] {
            let mut u = new_login(style, true);
            let (mut w, _) = send(&mut u, GREETING_STARTTLS);
            w.push_str(&send(&mut u, reply).0);
            // More polls, more data: still nothing.
            w.push_str(&send(&mut u, b"+ \r\nM3 OK\r\n").0);
            assert_eq!(w, "M1 STARTTLS\r\n", "{}", String::from_utf8_lossy(reply));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Every split
// ---------------------------------------------------------------------------------------

/// Splits the turn with the given index into reads.
type Chunker<'a> = &'a dyn Fn(usize, &[u8]) -> Vec<Vec<u8>>;
/// Everything written, the steps, and the leftover.
type Outcome = (String, Vec<St>, Vec<u8>);

/// Runs upstream's turns (each turn is what upstream sends before waiting for the proxy),
/// completing a StartTls after its turn. Returns everything written, the steps, and the
/// leftover.
fn run_turns(style: &LoginStyle, starttls: bool, turns: &[&[u8]], chunk: Chunker<'_>) -> Outcome {
    let mut u = new_login(style.clone(), starttls);
    let mut w = String::new();
    let mut steps = Vec::new();
    let mut finished = false;
    let mut relayed = Vec::new();
    for (i, turn) in turns.iter().enumerate() {
        for c in chunk(i, turn) {
            if finished {
                // After Done the driver relays: what follows goes to the client after the leftover.
                relayed.extend(c);
                continue;
            }
            let (w1, st) = send(&mut u, &c);
            w.push_str(&w1);
            finished = st.iter().any(|s| matches!(s, St::Done(_) | St::Fail(_)));
            steps.extend(st);
        }
        if steps.last() == Some(&St::StartTls) && !finished {
            u.tls_started();
            let (w1, st) = pump(&mut u);
            w.push_str(&w1);
            steps.extend(st);
        }
    }
    let mut leftover = u.into_leftover();
    if matches!(steps.last(), Some(St::Done(_))) {
        leftover.extend(relayed);
    } else {
        leftover.clear();
    }
    (w, steps, leftover)
}

fn assert_every_split(style: &LoginStyle, starttls: bool, turns: &[&[u8]]) -> Outcome {
    let whole = |_: usize, b: &[u8]| vec![b.to_vec()];
    let reference = run_turns(style, starttls, turns, &whole);
    let bytewise = |_: usize, b: &[u8]| b.iter().map(|x| vec![*x]).collect::<Vec<_>>();
    assert_eq!(run_turns(style, starttls, turns, &bytewise), reference, "byte by byte");
    for (ti, turn) in turns.iter().enumerate() {
        for a in 0..=turn.len() {
            let split = |i: usize, b: &[u8]| {
                if i == ti { vec![b[..a].to_vec(), b[a..].to_vec()] } else { vec![b.to_vec()] }
            };
            assert_eq!(run_turns(style, starttls, turns, &split), reference, "turn {ti} cut at {a}");
            if turn.len() <= 80 {
                for b in a..=turn.len() {
                    let split = |i: usize, x: &[u8]| {
                        if i == ti {
                            vec![x[..a].to_vec(), x[a..b].to_vec(), x[b..].to_vec()]
                        } else {
                            vec![x.to_vec()]
                        }
                    };
                    assert_eq!(run_turns(style, starttls, turns, &split), reference, "turn {ti} cut at {a},{b}");
                }
            }
        }
    }
    reference
}

#[test]
fn every_split_master_sasl_with_starttls() {
    let tail = format!("* ID NIL\r\nM2 OK ID completed.\r\n{}* 2 EXISTS\r\n", logged_in());
    let turns: [&[u8]; 3] =
        [GREETING_STARTTLS, b"* CAPABILITY X\r\nM1 OK Begin TLS negotiation now.\r\n", tail.as_bytes()];
    let (w, st, leftover) = assert_every_split(&LoginStyle::MasterSasl, true, &turns);
    assert_eq!(w, format!("M1 STARTTLS\r\n{}M3 AUTHENTICATE PLAIN {}\r\n", id_line(), plain_b64()));
    assert_eq!(st, vec![St::StartTls, St::Done(POST_LOGIN_CAPS.into())]);
    assert_eq!(leftover, b"* 2 EXISTS\r\n");
}

#[test]
fn every_split_continuation_and_capability_round() {
    let turns: [&[u8]; 4] = [
        GREETING_NO_SASL_IR,
        b"* ID NIL\r\nM2 OK ID completed.\r\n+ \r\n",
        b"* CAPABILITY IMAP4rev1 MOVE\r\nM3 OK Logged in\r\n",
        b"M4 OK\r\n",
    ];
    let (w, st, _) = assert_every_split(&LoginStyle::MasterSasl, false, &turns);
    assert_eq!(w, format!("{}M3 AUTHENTICATE PLAIN\r\n{}\r\n", id_line(), plain_b64()));
    assert_eq!(st, vec![St::Done("IMAP4rev1 MOVE".into())]);
    let turns: [&[u8]; 3] = [GREETING_SASL_IR, b"M2 OK\r\nM3 OK Logged in\r\n", b"* CAPABILITY A B\r\nM4 OK\r\n"];
    let (w, st, _) = assert_every_split(&sep(), false, &turns);
    assert!(w.ends_with("M4 CAPABILITY\r\n"), "{w}");
    assert_eq!(st, vec![St::Done("A B".into())]);
}

#[test]
fn every_split_failures() {
    // (Bytes after `M1 OK` fail only when they arrive in the same read; in a later read they
    // are dropped, see bytes_after_starttls_ok_in_a_later_read_are_dropped.)
    let (_, st, _) = assert_every_split(&LoginStyle::MasterSasl, true, &[GREETING_STARTTLS, b"M1 NO\r\n"]);
    assert_eq!(st, vec![St::Fail(UpstreamError::StartTls)]);
    let (_, st, _) = assert_every_split(&sep(), false, &[b"* OK hi\r\n", b"* BYE shutting down\r\n"]);
    assert_eq!(st, vec![St::Fail(UpstreamError::LoginRefused)]);
    let (_, st, _) = assert_every_split(&LoginStyle::MasterSasl, false, &[GREETING_SASL_IR, b"M2 OK\r\nM3 NO\r\n"]);
    assert_eq!(st, vec![St::Fail(UpstreamError::LoginRefused)]);
}

// ---------------------------------------------------------------------------------------
// Secrets (STYLE habit 3)
// ---------------------------------------------------------------------------------------

fn as_debug_bytes(s: &[u8]) -> String {
    s.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
}

#[test]
fn id_line_never_carries_the_password() {
    for style in [LoginStyle::MasterSasl, sep()] {
        let mut u = new_login(style, false);
        let (w, _) = send(&mut u, GREETING_SASL_IR);
        let id = w.lines().next().unwrap();
        assert!(id.starts_with("M2 ID "));
        assert!(!id.contains(MASTER_PW));
        assert!(!id.contains(&plain_b64()));
        assert!(!id.contains(MASTER));
    }
}

#[test]
fn debug_never_shows_the_master_password() {
    for style in [LoginStyle::MasterSasl, sep()] {
        for starttls in [false, true] {
            let mut u = new_login(style.clone(), starttls);
            let check = |u: &UpstreamLogin| {
                let dbg = format!("{u:?} {u:#?}");
                for needle in [MASTER_PW.to_string(), plain_b64(), as_debug_bytes(MASTER_PW.as_bytes())] {
                    assert!(!dbg.contains(&needle), "{dbg}");
                }
                assert!(!dbg.contains(&as_debug_bytes(plain_b64().as_bytes())), "{dbg}");
            };
            check(&u);
            u.feed(if starttls { GREETING_STARTTLS } else { GREETING_SASL_IR });
            check(&u);
            loop {
                let s = u.next();
                check(&u);
                let s_dbg = format!("{s:?}");
                assert!(!s_dbg.contains(MASTER_PW));
                match s {
                    Next::Write(_) => continue,
                    Next::StartTls => {
                        u.tls_started();
                        check(&u);
                    }
                    _ => break,
                }
            }
            u.feed(b"M2 OK\r\n+ \r\n");
            let _ = u.next();
            check(&u);
        }
    }
}

#[test]
fn errors_carry_no_upstream_text() {
    let mut u = new_login(LoginStyle::MasterSasl, false);
    let _ = send(&mut u, GREETING_SASL_IR);
    let (_, st) = send(&mut u, b"M3 NO [AUTHENTICATIONFAILED] secret-detail-from-upstream\r\n");
    let [St::Fail(e)] = st.as_slice() else { panic!("{st:?}") };
    assert!(!e.to_string().contains("secret-detail"));
    assert!(!format!("{e:?}").contains("secret-detail"));
}

#[test]
fn logindisabled_on_plaintext_never_sends_the_master_password() {
    for style in [LoginStyle::MasterSasl, sep()] {
        let mut u = new_login(style, false);
        let (w, st) = send(&mut u, b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n");
        assert_eq!(w, "", "wrote {w:?}");
        assert_eq!(st, vec![St::Fail(UpstreamError::LoginDisabled)]);
    }
}

fn upstreamish_token() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        Just(b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS ID] hi\r\n".to_vec()),
        Just(b"* OK hi\r\n".to_vec()),
        Just(b"* BYE go away\r\n".to_vec()),
        Just(b"* CAPABILITY IMAP4rev1 IDLE\r\n".to_vec()),
        Just(b"* ID NIL\r\n".to_vec()),
        Just(b"M1 OK go\r\n".to_vec()),
        Just(b"M2 OK ID\r\n".to_vec()),
        Just(b"M3 OK [CAPABILITY IMAP4rev1] in\r\n".to_vec()),
        Just(b"M3 NO [AUTHENTICATIONFAILED] no\r\n".to_vec()),
        Just(b"M4 OK done\r\n".to_vec()),
        Just(b"+ \r\n".to_vec()),
        Just(b"* 1 FETCH (BODY[] {5}\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

use proptest::strategy::Strategy as _;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: crate::proto::fuzz_cases(1024),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// The upstream-response parser on arbitrary upstream bytes in arbitrary chunks:
    /// never panics, never buffers more than a line over [`MAX_LINE`] plus one read,
    /// never sends the master password before TLS when STARTTLS is required, and ends
    /// (Done or Fail) or waits for input — no busy loop.
    #[test]
    fn prop_upstream_login_arbitrary_replies(
        starttls in proptest::prelude::any::<bool>(),
        style in 0u8..3,
        chunks in proptest::collection::vec(
            proptest::collection::vec(upstreamish_token(), 0..6).prop_map(|v: Vec<Vec<u8>>| v.concat()),
            0..8,
        ),
    ) {
        use proptest::prelude::*;
        let style = match style { 0 => LoginStyle::MasterSasl, 1 => sep(), _ => LoginStyle::User };
        let mut u = new_login(style, starttls);
        let mut chunks = chunks.into_iter();
        let mut written = Vec::new();
        let mut tls = false;
        let mut steps = 0;
        loop {
            steps += 1;
            prop_assert!(steps < 10_000, "busy loop");
            match u.next() {
                Next::Write(w) => {
                    if starttls && !tls {
                        prop_assert!(!String::from_utf8_lossy(&w).contains("AUTHENTICATE"), "login before TLS");
                        prop_assert!(!String::from_utf8_lossy(&w).contains(" LOGIN "), "login before TLS");
                    }
                    written.extend_from_slice(&w);
                }
                Next::StartTls => {
                    prop_assert!(starttls);
                    tls = true;
                    u.tls_started();
                }
                Next::Event(Ok(_)) | Next::Event(Err(_)) | Next::Close => break,
                Next::NeedInput => match chunks.next() {
                    Some(c) => {
                        u.feed(&c);
                        prop_assert!(u.buf.len() <= MAX_LINE + 2 + c.len() + 64 * 1024);
                    }
                    None => break,
                },
            }
            prop_assert!(u.buf.len() <= 2 * MAX_LINE + 64 * 1024, "buffer {}", u.buf.len());
        }
        let _ = written;
    }
}

/// The client's ID fields go upstream first, then mailgate's own `x-originating-*`;
/// an `x-` field or one that cannot be quoted never does.
#[test]
fn the_clients_id_fields_go_upstream_before_the_originating_address() {
    let fields: Vec<(String, String)> =
        [("name", "Thunderbird"), ("version", "128.0"), ("x-originating-ip", "10.0.0.1"), ("os", "Li\"nux")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
    let mut u = new_login(LoginStyle::MasterSasl, false).with_client_id(&fields);
    let (w, _) = send(&mut u, GREETING_SASL_IR);
    let want =
        id_line().replace("M2 ID (", "M2 ID (\"name\" \"Thunderbird\" \"version\" \"128.0\" \"os\" \"Li\\\"nux\" ");
    assert!(w.starts_with(&want), "{w}");
    assert_eq!(w.matches("x-originating-ip").count(), 1, "{w}");
}

// ---------------------------------------------------------------------------------------
// Probe (`mailgate check` without a user)
// ---------------------------------------------------------------------------------------

/// A probe reads the greeting (and does STARTTLS when asked) and ends with the
/// greeting's capabilities, sending neither ID nor any login.
#[test]
fn a_probe_ends_before_the_login_and_sends_nothing_secret() {
    let mut u = UpstreamLogin::probe(false);
    let (out, steps) = send(&mut u, GREETING_SASL_IR);
    assert_eq!(out, "");
    assert_eq!(steps, vec![St::Done("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN".into())]);

    let mut u = UpstreamLogin::probe(true);
    let (out, steps) = send(&mut u, GREETING_STARTTLS);
    assert_eq!(out, "M1 STARTTLS\r\n");
    assert!(steps.is_empty(), "{steps:?}");
    let (_, steps) = send(&mut u, b"M1 OK Begin TLS negotiation now.\r\n");
    assert_eq!(steps, vec![St::StartTls]);
    u.tls_started();
    // IMAP greets once: inside TLS the probe is done at once (the capabilities seen
    // before TLS are forgotten), and nothing is written.
    let (out, steps) = pump(&mut u);
    assert_eq!(out, "", "nothing after TLS either");
    assert_eq!(steps, vec![St::Done(String::new())]);
}

/// The two failures `mailgate check` names: no STARTTLS offered (upstream without TLS),
/// and LOGINDISABLED on a plaintext connection.
#[test]
fn a_probe_reports_missing_starttls_and_logindisabled() {
    let mut u = UpstreamLogin::probe(true);
    let (_, steps) = send(&mut u, GREETING_SASL_IR);
    assert_eq!(steps, vec![St::Fail(UpstreamError::StartTls)]);
    let mut u = UpstreamLogin::probe(false);
    let (_, steps) = send(&mut u, GREETING_STARTTLS);
    assert_eq!(steps, vec![St::Fail(UpstreamError::LoginDisabled)]);
}
