//! Issue 16 in process: the IMAP and SMTP fronts over `tokio::io::duplex` take a real
//! OAuth access token (made by the account service as the web step's endpoints would) in
//! SASL XOAUTH2 and OAUTHBEARER, and answer a refused token the way that makes Thunderbird
//! report an OAuth failure rather than ask for a password: the error challenge, then the
//! final failure after whatever the client answers (the real Thunderbird is driven
//! against the binary in `tests/oauth.rs`).

use crate::net::driver::Front as _;
use crate::net::testkit::*;
use crate::proto::sasl::{BearerMechanism, OAuthOffer};
use crate::store::Scope;
use tokio::io::AsyncWriteExt as _;

const OAUTH_ON: &str = "[oauth]\nenabled = true\n";

fn tls_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("localhost").unwrap()
}

use crate::proto::testing::xoauth2;

fn oauthbearer(user: &str, token: &str) -> String {
    crate::proto::testing::oauthbearer(user, "localhost", 993, token)
}

/// The error challenge the fronts send for a refused token of `kit`'s configuration.
fn challenge(kit: &Kit, mech: BearerMechanism) -> String {
    OAuthOffer { metadata_url: kit.config.oauth_metadata_url() }.error_challenge(mech)
}

/// Thunderbird's IMAP login with a token: `AUTHENTICATE XOAUTH2 <initial response>`, the
/// session relayed as the user; OAUTHBEARER with a continuation works the same. The login
/// line counts the method as `oauth`.
#[tokio::test]
async fn imap_takes_a_real_token_in_xoauth2_and_oauthbearer() {
    let up = FakeImap::start().await;
    let kit = Kit::new(up.addr, OAUTH_ON);
    let token = kit.oauth_access_token(&[Scope::Imap, Scope::Smtp]);
    for (i, with_ir) in [true, false].into_iter().enumerate() {
        let (server, c) = pipe();
        tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        let greeting = read_until(&mut tls, "\r\n").await;
        assert!(greeting.contains("AUTH=XOAUTH2 AUTH=OAUTHBEARER"), "{greeting}");
        if with_ir {
            tls.write_all(format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, &token)).as_bytes()).await.unwrap();
        } else {
            tls.write_all(b"a AUTHENTICATE OAUTHBEARER\r\n").await.unwrap();
            assert_eq!(read_until(&mut tls, "\r\n").await, "+ \r\n");
            tls.write_all(format!("{}\r\n", oauthbearer(USER, &token)).as_bytes()).await.unwrap();
        }
        let ok = read_until(&mut tls, "a OK").await;
        assert!(ok.contains("a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"), "{ok}");
        tls.write_all(b"b NOOP\r\n").await.unwrap();
        read_until(&mut tls, "b OK").await;
        let logins = kit.metrics.sample(r#"mailgate_logins_total{protocol="imap",method="oauth",result="ok""#);
        assert_eq!(logins, (i + 1) as f64);
    }
    assert_eq!(up.seen.lock().unwrap().as_slice(), ["b NOOP\r\n", "b NOOP\r\n"]);
}

/// A refused token (forged here; expired and revoked ones are refused alike): the error
/// challenge, then — after Thunderbird sends its whole command again as the answer — the
/// tagged `NO [AUTHENTICATIONFAILED]`; the connection stays usable and the right token
/// then logs in. A token of another user is refused the same way.
#[tokio::test]
async fn imap_answers_a_refused_token_with_the_challenge_then_no() {
    let up = FakeImap::start().await;
    let kit = Kit::new(up.addr, &format!("{OAUTH_ON}[limits]\nauth_failure_delay_ms = 0\n"));
    let token = kit.oauth_access_token(&[Scope::Imap]);
    let (server, c) = pipe();
    tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    read_until(&mut tls, "\r\n").await;
    let forged = format!("{token}x");
    let line = format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, &forged));
    tls.write_all(line.as_bytes()).await.unwrap();
    let got = read_until(&mut tls, "\r\n").await;
    assert_eq!(got, format!("+ {}\r\n", challenge(&kit, BearerMechanism::XOAuth2)));
    tls.write_all(line.as_bytes()).await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    // Another user's name with this token: refused the same way (OAUTHBEARER's JSON).
    tls.write_all(format!("b AUTHENTICATE OAUTHBEARER {}\r\n", oauthbearer("bob@example.com", &token)).as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut tls, "\r\n").await;
    assert_eq!(got, format!("+ {}\r\n", challenge(&kit, BearerMechanism::OAuthBearer)));
    tls.write_all(b"AQ==\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
    tls.write_all(format!("c AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, &token)).as_bytes()).await.unwrap();
    assert!(read_until(&mut tls, "c OK").await.contains("c OK [CAPABILITY"));
    let m = &kit.metrics;
    assert_eq!(m.sample(r#"mailgate_logins_total{protocol="imap",method="oauth",result="wrong""#), 2.0);
}

/// A token whose grant does not cover IMAP is refused; with OAuth off the mechanisms are
/// not offered and AUTHENTICATE XOAUTH2 is an unknown mechanism, as before.
#[tokio::test]
async fn imap_refuses_a_token_without_its_scope_and_offers_nothing_when_off() {
    let up = FakeImap::start().await;
    let kit = Kit::new(up.addr, &format!("{OAUTH_ON}[limits]\nauth_failure_delay_ms = 0\n"));
    let smtp_only = kit.oauth_access_token(&[Scope::Smtp]);
    let (server, c) = pipe();
    tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    read_until(&mut tls, "\r\n").await;
    tls.write_all(format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, &smtp_only)).as_bytes()).await.unwrap();
    assert!(read_until(&mut tls, "\r\n").await.starts_with("+ "));
    tls.write_all(b"\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");

    let off = Kit::new(up.addr, "");
    let (server, c) = pipe();
    tokio::spawn(off.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = off.tls_client().connect(tls_name(), c).await.unwrap();
    let greeting = read_until(&mut tls, "\r\n").await;
    assert!(!greeting.contains("XOAUTH2"), "{greeting}");
    tls.write_all(format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, "t")).as_bytes()).await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "a BAD Unsupported authentication mechanism\r\n");
}

/// SMTP: EHLO offers the mechanisms, `AUTH XOAUTH2 <token>` logs in and a message goes
/// upstream; a refused token gets `334 <error JSON>`, Thunderbird's empty answer, `535`.
#[tokio::test]
async fn smtp_takes_a_real_token_and_answers_a_refused_one() {
    let up = FakeSmtp::start().await;
    let kit = Kit::new(up.addr, &format!("{OAUTH_ON}[limits]\nauth_failure_delay_ms = 0\n"));
    let token = kit.oauth_access_token(&[Scope::Imap, Scope::Smtp]);
    let (server, c) = pipe();
    tokio::spawn(kit.smtp().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    assert!(read_until(&mut tls, "\r\n").await.starts_with("220 "));
    tls.write_all(b"EHLO client.example\r\n").await.unwrap();
    let ehlo = read_until(&mut tls, "250 ").await;
    let auth = ehlo.lines().find(|l| l.starts_with("250-AUTH ") || l.starts_with("250 AUTH ")).unwrap_or_default();
    assert!(auth.contains(" XOAUTH2") && auth.contains(" OAUTHBEARER"), "{ehlo}");
    tls.write_all(format!("AUTH XOAUTH2 {}\r\n", xoauth2(USER, "not-a-token")).as_bytes()).await.unwrap();
    let got = read_until(&mut tls, "\r\n").await;
    assert_eq!(got, format!("334 {}\r\n", challenge(&kit, BearerMechanism::XOAuth2)));
    tls.write_all(b"\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "535 5.7.8 Authentication credentials invalid\r\n");
    tls.write_all(format!("AUTH XOAUTH2 {}\r\n", xoauth2(USER, &token)).as_bytes()).await.unwrap();
    assert!(read_until(&mut tls, "\r\n").await.starts_with("235 "));
    let message = format!("From: {USER}\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello.\r\n.\r\n");
    tls.write_all(format!("MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n").as_bytes()).await.unwrap();
    read_until(&mut tls, "354").await;
    tls.write_all(message.as_bytes()).await.unwrap();
    assert!(read_until(&mut tls, "queued").await.contains("250 2.0.0 queued"));
    assert_eq!(up.messages.lock().unwrap().as_slice(), std::slice::from_ref(&message));
    let m = &kit.metrics;
    assert_eq!(m.sample(r#"mailgate_logins_total{protocol="smtp",method="oauth",result="ok""#), 1.0);
    assert_eq!(m.sample(r#"mailgate_logins_total{protocol="smtp",method="oauth",result="wrong""#), 1.0);
}

/// POP3 and ManageSieve take tokens the same way (within the grant's scopes), and answer
/// a refused one with the challenge, then their failure; upstream sees the user's
/// master login.
#[tokio::test]
async fn pop3_and_sieve_take_a_real_token_and_answer_a_refused_one() {
    let pop = FakePop3::start().await;
    let kit = Kit::new(pop.addr, &format!("{OAUTH_ON}[limits]\nauth_failure_delay_ms = 0\n"));
    let token = kit.oauth_access_token(&[Scope::Pop3, Scope::Sieve]);
    let (server, c) = pipe();
    tokio::spawn(kit.pop3().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    read_until(&mut tls, "\r\n").await;
    tls.write_all(b"CAPA\r\n").await.unwrap();
    assert!(read_until(&mut tls, ".\r\n").await.contains("SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"));
    tls.write_all(format!("AUTH XOAUTH2 {}\r\n", xoauth2(USER, "nope")).as_bytes()).await.unwrap();
    let got = read_until(&mut tls, "\r\n").await;
    assert_eq!(got, format!("+ {}\r\n", challenge(&kit, BearerMechanism::XOAuth2)));
    tls.write_all(b"AQ==\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "-ERR [AUTH] Authentication failed.\r\n");
    tls.write_all(format!("AUTH XOAUTH2 {}\r\nSTAT\r\n", xoauth2(USER, &token)).as_bytes()).await.unwrap();
    assert_eq!(read_until(&mut tls, "+OK done\r\n").await, "+OK Logged in.\r\n+OK done\r\n");
    assert!(pop.lines().iter().any(|l| l == "STAT"), "{:?}", pop.lines());

    let sieve = FakeSieve::start().await;
    let kit = Kit::new(sieve.addr, &format!("{OAUTH_ON}[limits]\nauth_failure_delay_ms = 0\n"));
    let token = kit.oauth_access_token(&[Scope::Sieve]);
    let (server, c) = pipe();
    tokio::spawn(kit.sieve().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    let listing = read_until(&mut tls, "ready.\"\r\n").await;
    assert!(listing.contains("\"SASL\" \"PLAIN LOGIN XOAUTH2 OAUTHBEARER\"\r\n"), "{listing}");
    let refused = format!("{token}x");
    tls.write_all(format!("AUTHENTICATE \"OAUTHBEARER\" \"{}\"\r\n", oauthbearer(USER, &refused)).as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut tls, "\r\n").await;
    assert_eq!(got, format!("\"{}\"\r\n", challenge(&kit, BearerMechanism::OAuthBearer)));
    tls.write_all(b"\"AQ==\"\r\n").await.unwrap();
    assert_eq!(read_until(&mut tls, "\r\n").await, "NO (AUTH) \"Authentication failed.\"\r\n");
    tls.write_all(format!("AUTHENTICATE \"XOAUTH2\" \"{}\"\r\nLISTSCRIPTS\r\n", xoauth2(USER, &token)).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_until(&mut tls, "OK \"done\"\r\n").await, "OK \"Logged in.\"\r\nOK \"done\"\r\n");
    // The token without the IMAP scope is refused on IMAP.
    let (server, c) = pipe();
    tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
    let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
    read_until(&mut tls, "\r\n").await;
    tls.write_all(format!("a AUTHENTICATE XOAUTH2 {}\r\n", xoauth2(USER, &token)).as_bytes()).await.unwrap();
    assert!(read_until(&mut tls, "\r\n").await.starts_with("+ "));
}
