//! Scripted upstream (Dovecot-like) POP3 exchanges for the master login client. No sockets.

use super::*;
use crate::proto::imap::base64;
use crate::proto::testing;
use proptest::prelude::*;

const USER: &str = "alice@example.com";
const MASTER: &str = "mailgate";
const MASTER_PW: &str = "m4st3r-s3cret";
const GREETING: &[u8] = b"+OK Dovecot ready.\r\n";

fn client() -> SocketAddr {
    "203.0.113.7:51234".parse().unwrap()
}

fn new_login(style: LoginStyle, starttls: bool, xclient: bool) -> UpstreamLogin {
    UpstreamLogin::new(USER, MASTER, SecretString::from(MASTER_PW.to_string()), style, starttls, client(), xclient)
}

fn sep() -> LoginStyle {
    LoginStyle::MasterSeparator("*".to_string())
}

/// A non-`Write` step, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    StartTls,
    Out(Outcome),
}

/// Polls until upstream input is needed, or a final step. Returns what was written and
/// the other steps.
fn pump(u: &mut UpstreamLogin) -> (String, Vec<St>) {
    testing::pump_upstream(u, St::StartTls, St::Out)
}

fn send(u: &mut UpstreamLogin, bytes: &[u8]) -> (String, Vec<St>) {
    u.feed(bytes);
    pump(u)
}

fn plain_line() -> String {
    format!("AUTH PLAIN {}\r\n", base64(format!("{USER}\0{MASTER}\0{MASTER_PW}").as_bytes()))
}

fn done() -> (String, Vec<St>) {
    (String::new(), vec![St::Out(Outcome::LoggedIn)])
}

fn failed(e: UpstreamError) -> (String, Vec<St>) {
    (String::new(), vec![St::Out(Outcome::Failed(e))])
}

#[test]
fn nothing_is_sent_before_the_greeting() {
    for starttls in [false, true] {
        let mut u = new_login(LoginStyle::MasterSasl, starttls, true);
        assert_eq!(pump(&mut u), (String::new(), vec![]));
        assert_eq!(send(&mut u, b"+OK Dove"), (String::new(), vec![]));
    }
}

#[test]
fn master_sasl_login() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    assert_eq!(send(&mut u, GREETING), (plain_line(), vec![]));
    assert_eq!(send(&mut u, b"+OK Logged in.\r\n"), done());
    assert!(u.into_leftover().is_empty());
}

#[test]
fn master_sasl_payload_is_user_master_password() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let (w, _) = send(&mut u, GREETING);
    let b64 = w.trim_end().strip_prefix("AUTH PLAIN ").unwrap();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(raw, format!("{USER}\0{MASTER}\0{MASTER_PW}").into_bytes());
}

#[test]
fn user_style_logs_in_as_the_user() {
    let mut u = new_login(LoginStyle::User, false, false);
    let (w, _) = send(&mut u, GREETING);
    assert_eq!(w, format!("AUTH PLAIN {}\r\n", base64(format!("\0{USER}\0{MASTER_PW}").as_bytes())));
    assert_eq!(send(&mut u, b"+OK\r\n"), done());
}

#[test]
fn separator_login() {
    let mut u = new_login(sep(), false, false);
    assert_eq!(send(&mut u, GREETING), (format!("USER {USER}*{MASTER}\r\n"), vec![]));
    assert_eq!(send(&mut u, b"+OK\r\n"), (format!("PASS {MASTER_PW}\r\n"), vec![]));
    assert_eq!(send(&mut u, b"+OK Logged in.\r\n"), done());
}

#[test]
fn leftover_after_the_final_ok_is_kept() {
    let mut u = new_login(sep(), false, false);
    let _ = send(&mut u, GREETING);
    let _ = send(&mut u, b"+OK\r\n");
    assert_eq!(send(&mut u, b"+OK Logged in.\r\n+OK 2 messages\r\n+OK"), done());
    assert_eq!(u.into_leftover(), b"+OK 2 messages\r\n+OK");
}

#[test]
fn everything_in_one_read() {
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    let (w, st) = send(&mut u, b"+OK Dovecot ready.\r\n+OK\r\n+OK Logged in.\r\n+OK 1 0\r\n");
    // Replies are matched in order: XCLIENT's, then the login's.
    assert_eq!(w, format!("XCLIENT ADDR=203.0.113.7 PORT=51234\r\n{}", plain_line()));
    assert_eq!(st, vec![St::Out(Outcome::LoggedIn)]);
    assert_eq!(u.into_leftover(), b"+OK 1 0\r\n");
}

#[test]
fn xclient_on_and_off() {
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    assert_eq!(send(&mut u, GREETING), ("XCLIENT ADDR=203.0.113.7 PORT=51234\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"+OK\r\n"), (plain_line(), vec![]));
    assert_eq!(send(&mut u, b"+OK Logged in.\r\n"), done());

    let mut u = new_login(sep(), false, false);
    let (w, _) = send(&mut u, GREETING);
    assert!(!w.contains("XCLIENT"), "{w}");
}

#[test]
fn xclient_carries_ipv6_addresses() {
    let mut u = UpstreamLogin::new(
        USER,
        MASTER,
        SecretString::from(MASTER_PW.to_string()),
        LoginStyle::MasterSasl,
        false,
        "[2001:db8::7]:40000".parse().unwrap(),
        true,
    );
    assert_eq!(send(&mut u, GREETING).0, "XCLIENT ADDR=2001:db8::7 PORT=40000\r\n");
}

#[test]
fn xclient_refused_is_an_error_and_no_password_is_sent() {
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"-ERR You are not from trusted IP\r\n"), failed(UpstreamError::XClient));
}

/// Dovecot 2.3 answers XCLIENT from outside `login_trusted_networks` with `+OK … -
/// ignoring`: the address was not taken, so it is refused like `-ERR`, before any
/// password is sent (found by `mailgate check`, issue 19 point 6).
#[test]
fn xclient_ignored_by_dovecot_2_3_is_a_refusal() {
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"+OK You are not from trusted IP - ignoring\r\n"), failed(UpstreamError::XClient));
}

#[test]
fn stls_upstream() {
    let mut u = new_login(LoginStyle::MasterSasl, true, true);
    assert_eq!(send(&mut u, GREETING), ("STLS\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"+OK Begin TLS negotiation now.\r\n"), (String::new(), vec![St::StartTls]));
    // Nothing read before the handshake is kept.
    u.feed(b"+OK injected\r\n");
    u.tls_started();
    assert_eq!(pump(&mut u), ("XCLIENT ADDR=203.0.113.7 PORT=51234\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"+OK\r\n"), (plain_line(), vec![]));
    assert_eq!(send(&mut u, b"+OK Logged in.\r\n"), done());
}

#[test]
fn stls_refused_or_injected() {
    let mut u = new_login(sep(), true, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"-ERR TLS not available\r\n"), failed(UpstreamError::StartTls));
    // Bytes after the +OK in the same read: a man in the middle's, refused.
    let mut u = new_login(sep(), true, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(
        send(&mut u, b"+OK Begin TLS\r\n+OK Logged in.\r\n"),
        failed(UpstreamError::Protocol("data after STLS +OK"))
    );
}

#[test]
fn refused_logins_keep_upstreams_text() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(
        send(&mut u, b"-ERR [AUTH] Authentication failed.\r\n"),
        (String::new(), vec![St::Out(Outcome::Refused("[AUTH] Authentication failed.".into()))])
    );
    // Separator style: refused at PASS, or already at USER; control bytes are dropped.
    let mut u = new_login(sep(), false, false);
    let _ = send(&mut u, GREETING);
    let _ = send(&mut u, b"+OK\r\n");
    assert_eq!(
        send(&mut u, b"-ERR [SYS/TEMP] Try\x07 later\r\n"),
        (String::new(), vec![St::Out(Outcome::Refused("[SYS/TEMP] Try later".into()))])
    );
    let mut u = new_login(sep(), false, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"-ERR\r\n"), (String::new(), vec![St::Out(Outcome::Refused(String::new()))]));
}

#[test]
fn greeting_not_ok_is_an_error() {
    for g in [&b"-ERR go away\r\n"[..], b"* OK IMAP4rev1 ready\r\n", b"220 smtp ready\r\n", b"+OKAY\r\n"] {
        let mut u = new_login(LoginStyle::MasterSasl, false, false);
        assert_eq!(send(&mut u, g), failed(UpstreamError::Greeting), "{}", String::from_utf8_lossy(g));
    }
}

#[test]
fn unexpected_replies_are_protocol_errors() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"+ \r\n"), failed(UpstreamError::Protocol("unexpected reply to the login")));
    // And the machine stays finished.
    assert!(matches!(u.next(), Next::Event(Outcome::Failed(UpstreamError::Protocol("poll after finish")))));
}

#[test]
fn lines_are_bounded() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let mut long = b"+OK ".to_vec();
    long.resize(MAX_LINE + 2, b'x');
    assert_eq!(send(&mut u, &long), failed(UpstreamError::Protocol("line too long")));
    // A complete line over the limit, too.
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    long.truncate(MAX_LINE + 1);
    long.extend(b"\r\n");
    assert_eq!(send(&mut u, &long), failed(UpstreamError::Protocol("line too long")));
    // At the limit it is a line.
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    long.truncate(MAX_LINE);
    long.extend(b"\r\n");
    assert_eq!(send(&mut u, &long), (plain_line(), vec![]));
}

#[test]
fn unsendable_names_and_passwords_send_nothing() {
    for (user, style, pw) in [
        ("ali\r\nce", LoginStyle::MasterSasl, MASTER_PW),
        ("", LoginStyle::MasterSasl, MASTER_PW),
        ("alice", sep(), "pw\r\nDELE 1"),
        ("ali\0ce", sep(), MASTER_PW),
    ] {
        let mut u = UpstreamLogin::new(user, MASTER, SecretString::from(pw.to_string()), style, false, client(), false);
        assert_eq!(send(&mut u, GREETING), failed(UpstreamError::Unsendable), "{user:?}");
    }
}

#[test]
fn debug_never_shows_the_master_password() {
    let mut u = new_login(sep(), false, false);
    let _ = send(&mut u, GREETING);
    let _ = send(&mut u, b"+OK\r\n");
    let dbg = format!("{u:?}");
    assert!(!dbg.contains(MASTER_PW), "{dbg}");
}

fn upstream_line() -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<&'static [u8]> = vec![
        b"+OK\r\n",
        b"+OK Dovecot ready.\r\n",
        b"-ERR [AUTH] no\r\n",
        b"+ \r\n",
        b"\r\n",
        b"+OK x\n",
        b"garbage\r\n",
    ];
    prop::sample::select(lines).prop_map(|l| l.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(256), .. ProptestConfig::default() })]

    /// Any upstream input in any split: no panic, one outcome at most, the buffer bounded
    /// by what was fed in one read plus a line.
    #[test]
    fn prop_upstream_never_panics(
        starttls in any::<bool>(),
        xclient in any::<bool>(),
        sasl in any::<bool>(),
        chunks in crate::proto::chunked(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(upstream_line(), 0..6).prop_map(|v| v.concat()),
        ]),
    ) {
        let style = if sasl { LoginStyle::MasterSasl } else { sep() };
        let mut u = new_login(style, starttls, xclient);
        let mut outcomes = 0;
        for c in &chunks {
            u.feed(c);
            for _ in 0..1000 {
                match u.next() {
                    Next::NeedInput => break,
                    Next::Write(_) => {}
                    Next::StartTls => u.tls_started(),
                    Next::Event(_) => { outcomes += 1; break; }
                    Next::Close => prop_assert!(false, "close"),
                }
            }
            prop_assert!(u.buf.len() <= MAX_LINE + 1 + c.len());
            if outcomes > 0 { break; }
        }
        prop_assert!(outcomes <= 1);
    }
}
