//! Scripted upstream (Pigeonhole-like) exchanges for the ManageSieve master login.
//! No sockets. Case numbers refer to SECURITY.md §B.

use super::*;
use crate::proto::imap::base64;
use crate::proto::testing;
use proptest::prelude::*;

const USER: &str = "alice@example.com";
const MASTER: &str = "mailgate";
const MASTER_PW: &str = "m4st3r-s3cret";

fn client() -> SocketAddr {
    "203.0.113.7:51234".parse().unwrap()
}

fn new_login(style: LoginStyle, starttls: bool, pass_client: bool) -> UpstreamLogin {
    UpstreamLogin::new(
        USER,
        MASTER,
        SecretString::from(MASTER_PW.to_string()),
        style,
        starttls,
        pass_client.then(client),
    )
}

fn sep() -> LoginStyle {
    LoginStyle::MasterSeparator("*".to_string())
}

/// A non-`Write` step, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum St {
    StartTls,
    Done(Outcome),
}

/// Polls until upstream input is needed, or a final step.
fn pump(u: &mut UpstreamLogin) -> (String, Vec<St>) {
    testing::pump_upstream(u, St::StartTls, St::Done)
}

fn send(u: &mut UpstreamLogin, bytes: &[u8]) -> (String, Vec<St>) {
    u.feed(bytes);
    pump(u)
}

const GREETING: &[u8] = b"\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\
\"SIEVE\" \"fileinto reject envelope encoded-character vacation subaddress comparator-i;ascii-numeric relational regex imap4flags copy include variables body enotify environment mailbox date index ihave duplicate mime foreverypart extracttext\"\r\n\
\"NOTIFY\" \"mailto\"\r\n\"SASL\" \"PLAIN LOGIN\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Dovecot ready.\"\r\n";

const GREETING_XCLIENT: &[u8] = b"\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\"SIEVE\" \"fileinto\"\r\n\
\"SASL\" \"PLAIN\"\r\n\"XCLIENT\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Dovecot ready.\"\r\n";

const GREETING_STARTTLS: &[u8] = b"\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\"SIEVE\" \"fileinto\"\r\n\
\"SASL\" \"\"\r\n\"STARTTLS\"\r\n\"VERSION\" \"1.0\"\r\nOK \"Dovecot ready.\"\r\n";

fn auth_line(authzid: &str, authcid: &str) -> String {
    format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", base64(format!("{authzid}\0{authcid}\0{MASTER_PW}").as_bytes()))
}

fn logged_in() -> St {
    St::Done(Outcome::LoggedIn)
}

#[test]
fn nothing_is_sent_before_the_greeting() {
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    assert_eq!(pump(&mut u), (String::new(), vec![]));
    assert_eq!(send(&mut u, b"\"IMPLEMENTATION\" \"Dovecot\"\r\n\"SASL\" \"PLA"), (String::new(), vec![]));
}

#[test]
fn master_sasl_login() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    assert_eq!(send(&mut u, GREETING), (auth_line(USER, MASTER), vec![]));
    assert_eq!(send(&mut u, b"OK \"Logged in.\"\r\n"), (String::new(), vec![logged_in()]));
    let names: Vec<_> = u.capabilities().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["IMPLEMENTATION", "SIEVE", "NOTIFY", "SASL", "VERSION"]);
    assert!(u.capabilities()[1].value.as_deref().unwrap().starts_with("fileinto reject"));
}

#[test]
fn master_separator_login() {
    let mut u = new_login(sep(), false, false);
    assert_eq!(send(&mut u, GREETING).0, auth_line("", &format!("{USER}*{MASTER}")));
    assert_eq!(send(&mut u, b"OK\r\n").1, vec![logged_in()]);
}

#[test]
fn user_style_logs_in_as_the_user() {
    let mut u = new_login(LoginStyle::User, false, false);
    assert_eq!(send(&mut u, GREETING).0, auth_line("", USER));
}

#[test]
fn xclient_on_off_and_not_offered() {
    // Offered and asked for: XCLIENT first, then the login.
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    assert_eq!(send(&mut u, GREETING_XCLIENT), ("XCLIENT ADDR=203.0.113.7 PORT=51234\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"OK \"Updated\"\r\n"), (auth_line(USER, MASTER), vec![]));
    assert_eq!(send(&mut u, b"OK \"Logged in.\"\r\n").1, vec![logged_in()]);
    // A listing sent again after XCLIENT is read past.
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    let _ = send(&mut u, GREETING_XCLIENT);
    assert_eq!(send(&mut u, b"\"SASL\" \"PLAIN\"\r\nOK\r\n").0, auth_line(USER, MASTER));
    // Offered, not asked for.
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    assert_eq!(send(&mut u, GREETING_XCLIENT).0, auth_line(USER, MASTER));
    // Asked for, not offered.
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    assert_eq!(send(&mut u, GREETING).0, auth_line(USER, MASTER));
    // Refused: no login follows.
    let mut u = new_login(LoginStyle::MasterSasl, false, true);
    let _ = send(&mut u, GREETING_XCLIENT);
    assert_eq!(
        send(&mut u, b"NO \"Not trusted\"\r\n"),
        (String::new(), vec![St::Done(Outcome::Failed(UpstreamError::XClient))])
    );
}

#[test]
fn xclient_ipv6() {
    let mut u = UpstreamLogin::new(
        USER,
        MASTER,
        SecretString::from(MASTER_PW.to_string()),
        LoginStyle::MasterSasl,
        false,
        Some("[2001:db8::7]:4190".parse().unwrap()),
    );
    assert_eq!(send(&mut u, GREETING_XCLIENT).0, "XCLIENT ADDR=2001:db8::7 PORT=4190\r\n");
}

#[test]
fn starttls_upstream_reads_the_listing_again() {
    let mut u = new_login(LoginStyle::MasterSasl, true, true);
    assert_eq!(send(&mut u, GREETING_STARTTLS), ("STARTTLS\r\n".into(), vec![]));
    assert_eq!(send(&mut u, b"OK \"Begin TLS negotiation now.\"\r\n"), (String::new(), vec![St::StartTls]));
    // Nothing happens before the handshake; bytes that arrive then are dropped.
    assert_eq!(send(&mut u, b"OK \"injected\"\r\n"), (String::new(), vec![]));
    u.tls_started();
    assert_eq!(pump(&mut u), (String::new(), vec![]));
    assert!(u.capabilities().is_empty(), "the listing before TLS is forgotten");
    assert_eq!(send(&mut u, GREETING_XCLIENT).0, "XCLIENT ADDR=203.0.113.7 PORT=51234\r\n");
    assert_eq!(send(&mut u, b"OK\r\n").0, auth_line(USER, MASTER));
    assert_eq!(send(&mut u, b"OK \"Logged in.\"\r\n").1, vec![logged_in()]);
    assert!(u.capabilities().iter().any(|c| c.name == "XCLIENT"));
    assert!(!u.capabilities().iter().any(|c| c.name == "STARTTLS"));
}

#[test]
fn starttls_stripping_and_refusal() {
    // Not offered.
    let mut u = new_login(LoginStyle::MasterSasl, true, false);
    assert_eq!(send(&mut u, GREETING), (String::new(), vec![St::Done(Outcome::Failed(UpstreamError::StartTls))]));
    // Refused.
    for reply in [&b"NO \"no\"\r\n"[..], b"BYE\r\n", b"\"\"\r\n"] {
        let mut u = new_login(LoginStyle::MasterSasl, true, false);
        let _ = send(&mut u, GREETING_STARTTLS);
        assert_eq!(send(&mut u, reply).1, vec![St::Done(Outcome::Failed(UpstreamError::StartTls))]);
    }
    // Bytes after the OK in the same read: injected.
    let mut u = new_login(LoginStyle::MasterSasl, true, false);
    let _ = send(&mut u, GREETING_STARTTLS);
    assert_eq!(
        send(&mut u, b"OK\r\nOK \"x\"\r\n").1,
        vec![St::Done(Outcome::Failed(UpstreamError::Protocol("data after STARTTLS OK")))]
    );
}

/// SECURITY.md case 12: the master password never goes over a channel on which upstream
/// offers no PLAIN.
#[test]
fn no_plain_never_sends_the_master_password() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let (w, st) = send(&mut u, GREETING_STARTTLS);
    assert_eq!((w.as_str(), st), ("", vec![St::Done(Outcome::Failed(UpstreamError::NoPlain))]));
}

#[test]
fn refused_login_keeps_upstream_text() {
    for (reply, code, text) in [
        (&b"NO (AUTH) \"Authentication failed.\"\r\n"[..], Some("AUTH"), "Authentication failed."),
        (b"NO \"Master user unknown\"\r\n", None, "Master user unknown"),
        (b"BYE (TRYLATER) \"Shutting down\"\r\n", Some("TRYLATER"), "Shutting down"),
        (b"NO (REFERRAL \"sieve://other\") \"Go\"\r\n", Some("REFERRAL \"sieve://other\""), "Go"),
        (b"no {4}\r\nab\r\n\r\n", None, "ab"),
        (b"NO\r\n", None, ""),
    ] {
        let mut u = new_login(LoginStyle::MasterSasl, false, false);
        let _ = send(&mut u, GREETING);
        let want = Outcome::Refused { code: code.map(str::to_string), text: text.to_string() };
        assert_eq!(send(&mut u, reply), (String::new(), vec![St::Done(want)]), "{}", String::from_utf8_lossy(reply));
    }
}

#[test]
fn bad_greetings() {
    for greeting in [
        &b"NO \"go away\"\r\n"[..],
        b"BYE \"busy\"\r\n",
        b"* OK IMAP4rev1 ready\r\n",
        b"220 smtp ready\r\n",
        b"\"SASL\" \"PLAIN\" \"extra\"\r\n",
    ] {
        let mut u = new_login(LoginStyle::MasterSasl, false, false);
        let (w, st) = send(&mut u, greeting);
        assert_eq!(w, "");
        assert!(
            matches!(st.as_slice(), [St::Done(Outcome::Failed(_))]),
            "{}: {st:?}",
            String::from_utf8_lossy(greeting)
        );
    }
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    assert_eq!(send(&mut u, b"NO \"x\"\r\n").1, vec![St::Done(Outcome::Failed(UpstreamError::Greeting))]);
}

#[test]
fn literals_in_the_listing_are_read_and_bounded() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let (w, st) = send(&mut u, b"\"SIEVE\" {8}\r\nfileinto\r\n{4}\r\nSASL {5}\r\nPLAIN\r\nOK {5}\r\nready\r\n");
    assert_eq!((w, st), (auth_line(USER, MASTER), vec![]));
    assert_eq!(u.capabilities()[0], Capability { name: "SIEVE".into(), value: Some("fileinto".into()) });
    assert_eq!(u.capabilities()[1].line(), "\"SASL\" \"PLAIN\"\r\n");
    // Too big.
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let (_, st) = send(&mut u, b"\"SIEVE\" {4294967295}\r\n");
    assert_eq!(st, vec![St::Done(Outcome::Failed(UpstreamError::Protocol("literal too big")))]);
}

#[test]
fn lines_are_bounded() {
    // At the limit: fine.
    let mut line = b"\"X\" \"".to_vec();
    line.resize(MAX_LINE - 1, b'a');
    line.extend(b"\"\r\n");
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    assert_eq!(send(&mut u, &line), (String::new(), vec![]));
    // Over it, with or without its CRLF.
    for tail in [&b""[..], b"\r\n"] {
        let mut u = new_login(LoginStyle::MasterSasl, false, false);
        let mut long = vec![b'a'; MAX_LINE + 2];
        long.extend(tail);
        let (_, st) = send(&mut u, &long);
        assert_eq!(st, vec![St::Done(Outcome::Failed(UpstreamError::Protocol("line too long")))]);
    }
    // Many capability lines.
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let (_, st) = send(&mut u, &b"\"X\"\r\n".repeat(MAX_CAPABILITIES + 1));
    assert_eq!(st, vec![St::Done(Outcome::Failed(UpstreamError::Protocol("too many capabilities")))]);
}

#[test]
fn unexpected_challenge_is_a_protocol_error() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(
        send(&mut u, b"\"\"\r\n").1,
        vec![St::Done(Outcome::Failed(UpstreamError::Protocol("unexpected challenge")))]
    );
}

#[test]
fn leftover_after_the_final_ok() {
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let _ = send(&mut u, GREETING);
    assert_eq!(send(&mut u, b"OK \"Logged in.\"\r\n\"IMPLEMENTATION\"").1, vec![logged_in()]);
    assert_eq!(u.into_leftover(), b"\"IMPLEMENTATION\"");
}

#[test]
fn unsendable_names() {
    for (user, master, pw) in
        [("al\rice", MASTER, MASTER_PW), ("", MASTER, MASTER_PW), (USER, "ma\0ster", MASTER_PW), (USER, MASTER, "p\0w")]
    {
        let mut u =
            UpstreamLogin::new(user, master, SecretString::from(pw.to_string()), LoginStyle::MasterSasl, false, None);
        let (w, st) = send(&mut u, GREETING);
        assert_eq!((w.as_str(), st), ("", vec![St::Done(Outcome::Failed(UpstreamError::Unsendable))]), "{user:?}");
    }
}

#[test]
fn debug_never_shows_the_master_password() {
    let b64 = base64(format!("{USER}\0{MASTER}\0{MASTER_PW}").as_bytes());
    let mut u = new_login(LoginStyle::MasterSasl, false, false);
    let check = |u: &UpstreamLogin| {
        let d = format!("{u:?}");
        assert!(!d.contains(MASTER_PW) && !d.contains(&b64), "{d}");
    };
    check(&u);
    u.feed(GREETING);
    check(&u);
    // The login is queued while the listing is read, then handed out.
    let _ = u.on_unit(&[Token::Atom("OK".into())]);
    assert!(!u.out.is_empty());
    check(&u);
    let _ = pump(&mut u);
    check(&u);
}

/// The exchange split at every byte gives the same result.
#[test]
fn every_split_gives_the_same_outcome() {
    let turns: [&[u8]; 4] = [GREETING_STARTTLS, b"OK\r\n", GREETING_XCLIENT, b"OK\r\nOK \"Logged in.\"\r\n"];
    let run = |cut_turn: usize, cut: usize| {
        let mut u = new_login(sep(), true, true);
        let mut w = String::new();
        let mut st = Vec::new();
        for (i, t) in turns.iter().enumerate() {
            let parts = if i == cut_turn { vec![&t[..cut], &t[cut..]] } else { vec![*t] };
            for p in parts {
                if st.iter().any(|s| matches!(s, St::Done(_))) {
                    break;
                }
                let (w1, s1) = send(&mut u, p);
                w.push_str(&w1);
                st.extend(s1);
            }
            if st.last() == Some(&St::StartTls) {
                u.tls_started();
            }
        }
        (w, st)
    };
    let reference = run(usize::MAX, 0);
    assert_eq!(reference.1, vec![St::StartTls, logged_in()]);
    for (i, t) in turns.iter().enumerate() {
        for cut in 0..=t.len() {
            assert_eq!(run(i, cut), reference, "turn {i} cut {cut}");
        }
    }
}

fn upstreamish_token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"OK".to_vec()),
        Just(b"NO".to_vec()),
        Just(b"BYE".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\"SASL\" \"PLAIN\"\r\n".to_vec()),
        Just(b"\"STARTTLS\"\r\n".to_vec()),
        Just(b"\"XCLIENT\"\r\n".to_vec()),
        Just(b"(AUTH)".to_vec()),
        Just(b"{3}\r\n".to_vec()),
        Just(b"{99999999}\r\n".to_vec()),
        Just(b"\"text\"".to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(512), .. ProptestConfig::default() })]

    /// Arbitrary upstream replies in arbitrary reads: no panic, bounded buffer, at most
    /// one outcome, and the master password only after a listing with PLAIN.
    #[test]
    fn prop_upstream_login_arbitrary_replies(
        starttls in any::<bool>(),
        chunks in crate::proto::chunked(prop::collection::vec(upstreamish_token(), 0..10).prop_map(|v| v.concat())),
    ) {
        let mut u = new_login(LoginStyle::MasterSasl, starttls, true);
        let mut outcomes = 0;
        let mut written = Vec::new();
        'outer: for c in &chunks {
            u.feed(c);
            for _ in 0..10_000 {
                match u.next() {
                    Next::NeedInput => break,
                    Next::Write(b) => written.extend(b),
                    Next::StartTls => u.tls_started(),
                    Next::Event(_) => {
                        outcomes += 1;
                        break 'outer;
                    }
                    Next::Close => prop_assert!(false, "Close"),
                }
                prop_assert!(u.buf.len() <= MAX_UNIT + c.len());
            }
        }
        prop_assert!(outcomes <= 1);
        let w = String::from_utf8_lossy(&written);
        prop_assert!(!w.contains(MASTER_PW));
    }
}

/// A probe reads the listing and ends with `Listed` having sent nothing (no credentials
/// exist in it); with STARTTLS it ends on the listing read inside TLS, which replaces the
/// one before.
#[test]
fn a_probe_reads_the_listing_and_sends_nothing() {
    let mut p = UpstreamLogin::probe(false);
    assert_eq!(pump(&mut p), (String::new(), vec![]));
    assert_eq!(send(&mut p, GREETING), (String::new(), vec![St::Done(Outcome::Listed)]));
    let names: Vec<&str> = p.capabilities().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["IMPLEMENTATION", "SIEVE", "NOTIFY", "SASL", "VERSION"]);
    assert_eq!(p.capabilities()[2].line(), "\"NOTIFY\" \"mailto\"\r\n");

    let mut p = UpstreamLogin::probe(true);
    assert_eq!(send(&mut p, GREETING_STARTTLS), ("STARTTLS\r\n".to_string(), vec![]));
    assert_eq!(send(&mut p, b"OK \"Begin TLS negotiation now.\"\r\n"), (String::new(), vec![St::StartTls]));
    p.tls_started();
    assert_eq!(send(&mut p, GREETING), (String::new(), vec![St::Done(Outcome::Listed)]));
    assert_eq!(p.capabilities().len(), 5, "the listing inside TLS, not both");
}
