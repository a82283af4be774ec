//! One ManageSieve client connection: the pre-auth machine on the driver, the login
//! gate, then the byte relay. The only I/O around [`PreAuth`]; the same shape as
//! `net::imap` and `net::pop3`.

use crate::auth::Protocol;
use crate::net::front::{MailFront, MailService};
use crate::net::upstream::{SieveUpstream, UpstreamSieve};
use crate::proto::Goodbye;
use crate::proto::sasl::OAuthOffer;
use crate::proto::sieve::PreAuth;

/// Every ManageSieve connection: [`MailService`] with ManageSieve's machine.
pub type SieveService = MailService<PreAuth>;

crate::net::gate::login_machine!(sieve {});

impl MailFront for PreAuth {
    type Upstream = SieveUpstream;
    const PROTOCOL: Protocol = Protocol::Sieve;
    /// The greeting lists upstream's Sieve extensions (probed once, then kept).
    async fn start(hostname: &str, implicit: bool, upstream: &SieveUpstream, oauth: Option<OAuthOffer>) -> Self {
        PreAuth::with_listing(hostname, implicit, !implicit, &upstream.listing().await, oauth)
    }
    fn logged_in(&mut self, _upstream: &UpstreamSieve, _who: &crate::auth::Authenticated) -> Vec<u8> {
        self.auth_succeeded()
    }
    fn last_line(why: Goodbye) -> &'static [u8] {
        crate::proto::sieve::goodbye(why)
    }
}

#[cfg(test)]
mod tests {
    use crate::net::driver::{DriveError, Front};
    use crate::net::testkit::*;
    use crate::store::Account;
    use base64::Engine as _;
    use tokio::io::AsyncWriteExt;

    fn tls_name() -> rustls::pki_types::ServerName<'static> {
        rustls::pki_types::ServerName::try_from("localhost").unwrap()
    }

    fn plain(user: &str, password: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
    }

    /// The greeting carries upstream's Sieve extensions (a probe read them: the fake's
    /// first line is the probe's LOGOUT), never upstream's own IMPLEMENTATION or XCLIENT.
    /// A login after STARTTLS reaches upstream as the user: the fake sees XCLIENT with the
    /// client's address, then the master login (authzid = the user), then the client's
    /// own commands through the relay. No password before STARTTLS.
    #[tokio::test]
    async fn a_login_after_starttls_reaches_upstream_as_the_user() {
        let up = FakeSieve::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, mut c) = pipe();
        let task = tokio::spawn(kit.sieve().serve(server, addr(CLIENT), addr(LOCAL), false));
        let greeting = read_until(&mut c, "ready.\"\r\n").await;
        assert!(greeting.contains("\"STARTTLS\"\r\n") && greeting.contains("\"SASL\" \"\"\r\n"), "{greeting}");
        assert!(greeting.contains("\"SIEVE\" \"fileinto vacation\"\r\n"), "{greeting}");
        assert!(greeting.contains("\"IMPLEMENTATION\" \"mailgate\"\r\n"), "{greeting}");
        assert!(!greeting.contains("fake") && !greeting.contains("XCLIENT"), "{greeting}");
        c.write_all(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", plain(USER, PASSWORD)).as_bytes()).await.unwrap();
        let before = read_until(&mut c, "\r\n").await;
        assert!(before.starts_with("NO"), "no login before STARTTLS: {before}");
        c.write_all(b"STARTTLS\r\n").await.unwrap();
        assert!(read_until(&mut c, "\r\n").await.starts_with("OK"));
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        let listing = read_until(&mut tls, "OK \"TLS negotiation successful.\"\r\n").await;
        assert!(listing.contains("\"SASL\" \"PLAIN LOGIN\"\r\n"), "{listing}");
        let auth = format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\nLISTSCRIPTS\r\n", plain(USER, PASSWORD));
        tls.write_all(auth.as_bytes()).await.unwrap();
        let got = read_until(&mut tls, "OK \"done\"\r\n").await;
        assert_eq!(got, "OK \"Logged in.\"\r\nOK \"done\"\r\n");
        tls.write_all(b"LOGOUT\r\n").await.unwrap();
        assert_eq!(read_to_end(&mut tls).await, "OK \"Logout completed.\"\r\n");
        drop(tls);
        assert!(task.await.unwrap().is_ok());
        let lines = up.lines();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[..2], ["LOGOUT", "XCLIENT ADDR=192.0.2.7 PORT=50000"]);
        let sent = lines[2].strip_prefix("AUTHENTICATE \"PLAIN\" \"").unwrap().trim_end_matches('"');
        let sent = base64::engine::general_purpose::STANDARD.decode(sent).unwrap();
        assert_eq!(sent, format!("{USER}\0mailgate\0master-pw").as_bytes());
        assert_eq!(lines[3..], ["LISTSCRIPTS", "LOGOUT"]);
    }

    /// A 2FA account's account password: `NO (AUTH)` with the place to make an app
    /// password in the text the person sees, and nothing reaches upstream.
    #[tokio::test]
    async fn a_2fa_account_password_gets_the_app_password_url() {
        let up = FakeSieve::start().await;
        let kit = Kit::new(up.addr, "[limits]\nauth_failure_delay_ms = 0\n");
        let bob = "bob@example.com";
        let hash = crate::auth::password::hash(PASSWORD.as_bytes()).unwrap();
        let account = Account { password_hash: Some(hash), second_factor_required: true, ..Account::new(bob, 0) };
        kit.store.create_account(&account).unwrap();
        let (server, mut c) = pipe();
        tokio::spawn(kit.sieve().serve(server, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut c, "ready.\"\r\n").await;
        c.write_all(b"STARTTLS\r\n").await.unwrap();
        read_until(&mut c, "\r\n").await;
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        read_until(&mut tls, "successful.\"\r\n").await;
        tls.write_all(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", plain(bob, PASSWORD)).as_bytes()).await.unwrap();
        let refusal = read_until(&mut tls, "\r\n").await;
        assert!(refusal.starts_with("NO (AUTH) \""), "{refusal}");
        assert!(refusal.contains("https://localhost:8443/app-passwords"), "{refusal}");
        assert_eq!(up.lines(), ["LOGOUT"], "only the greeting's probe reached upstream");
    }

    /// Revocation ends a live session with the ManageSieve `BYE` and closes it; shutdown
    /// says its own `BYE` to a client that has not logged in.
    #[tokio::test]
    async fn revocation_and_shutdown_say_bye() {
        let up = FakeSieve::start().await;
        let kit = Kit::new(up.addr, "");
        let svc = kit.sieve();
        let (s1, mut waiting) = pipe();
        let t1 = tokio::spawn(svc.clone().serve(s1, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut waiting, "ready.\"\r\n").await;
        let (s2, mut c) = pipe();
        let t2 = tokio::spawn(svc.serve(s2, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut c, "ready.\"\r\n").await;
        c.write_all(b"STARTTLS\r\n").await.unwrap();
        read_until(&mut c, "\r\n").await;
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        read_until(&mut tls, "successful.\"\r\n").await;
        tls.write_all(format!("AUTHENTICATE \"PLAIN\" \"{}\"\r\n", plain(USER, PASSWORD)).as_bytes()).await.unwrap();
        assert_eq!(read_until(&mut tls, "\r\n").await, "OK \"Logged in.\"\r\n");
        assert_eq!(kit.live.kill(USER, None), 1);
        assert_eq!(read_to_end(&mut tls).await, "BYE \"Access revoked.\"\r\n");
        assert!(t2.await.unwrap().is_ok());
        assert_eq!(kit.live.end_all(), 1);
        let bye = read_to_end(&mut waiting).await;
        assert!(bye.ends_with("BYE (TRYLATER) \"Server shutting down.\"\r\n"), "{bye}");
        assert!(matches!(t1.await.unwrap(), Err(DriveError::Ended(crate::live::EndReason::Shutdown))));
    }
}
