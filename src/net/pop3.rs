//! One POP3 client connection: the pre-auth machine on the driver, the login gate, then
//! the byte relay. The only I/O around [`PreAuth`]; the same shape as `net::imap`.

use crate::auth::Protocol;
use crate::net::front::{MailFront, MailService};
use crate::net::upstream::{Pop3Upstream, UpstreamPop3};
use crate::proto::Goodbye;
use crate::proto::pop3::PreAuth;
use crate::proto::sasl::OAuthOffer;

/// Every POP3 connection: [`MailService`] with POP3's machine.
pub type Pop3Service = MailService<PreAuth>;

crate::net::gate::login_machine!(pop3 {});

impl MailFront for PreAuth {
    type Upstream = Pop3Upstream;
    const PROTOCOL: Protocol = Protocol::Pop3;
    async fn start(hostname: &str, implicit: bool, _upstream: &Pop3Upstream, oauth: Option<OAuthOffer>) -> Self {
        PreAuth::with_oauth(hostname, implicit, !implicit, oauth)
    }
    fn logged_in(&mut self, _upstream: &UpstreamPop3, _who: &crate::auth::Authenticated) -> Vec<u8> {
        self.auth_succeeded()
    }
    fn last_line(why: Goodbye) -> &'static [u8] {
        crate::proto::pop3::goodbye(why)
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

    /// A login over STLS reaches upstream as the user: the fake sees XCLIENT with the
    /// client's address, then the master login (authzid = the user), then the client's
    /// own commands through the relay.
    #[tokio::test]
    async fn a_login_over_stls_reaches_upstream_as_the_user() {
        let up = FakePop3::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, mut c) = pipe();
        let task = tokio::spawn(kit.pop3().serve(server, addr(CLIENT), addr(LOCAL), false));
        assert!(read_until(&mut c, "\r\n").await.starts_with("+OK "));
        c.write_all(b"USER alice\r\n").await.unwrap();
        let before = read_until(&mut c, "\r\n").await;
        assert!(before.starts_with("-ERR"), "no login before STLS: {before}");
        c.write_all(b"STLS\r\n").await.unwrap();
        assert!(read_until(&mut c, "\r\n").await.starts_with("+OK"));
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        tls.write_all(format!("USER {USER}\r\n").as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "\r\n").await.starts_with("+OK"));
        tls.write_all(format!("PASS {PASSWORD}\r\nSTAT\r\n").as_bytes()).await.unwrap();
        let got = read_until(&mut tls, "+OK done\r\n").await;
        assert_eq!(got, "+OK Logged in.\r\n+OK done\r\n");
        tls.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(read_to_end(&mut tls).await, "+OK Logging out.\r\n");
        drop(tls);
        assert!(task.await.unwrap().is_ok());
        let lines = up.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], "XCLIENT ADDR=192.0.2.7 PORT=50000");
        let plain = lines[1].strip_prefix("AUTH PLAIN ").unwrap();
        let plain = base64::engine::general_purpose::STANDARD.decode(plain).unwrap();
        assert_eq!(plain, format!("{USER}\0mailgate\0master-pw").as_bytes());
        assert_eq!(lines[2..], ["STAT", "QUIT"]);
    }

    /// A 2FA account's account password: `-ERR [AUTH]` with the place to make an app
    /// password (RFC 3206), and nothing reaches upstream.
    #[tokio::test]
    async fn a_2fa_account_password_gets_the_app_password_url() {
        let up = FakePop3::start().await;
        let kit = Kit::new(up.addr, "[limits]\nauth_failure_delay_ms = 0\n");
        let bob = "bob@example.com";
        let hash = crate::auth::password::hash(PASSWORD.as_bytes()).unwrap();
        let account = Account { password_hash: Some(hash), second_factor_required: true, ..Account::new(bob, 0) };
        kit.store.create_account(&account).unwrap();
        let (server, c) = pipe();
        tokio::spawn(kit.pop3().serve(server, addr(CLIENT), addr(LOCAL), true));
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{bob}\0{PASSWORD}"));
        tls.write_all(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await.unwrap();
        let refusal = read_until(&mut tls, "\r\n").await;
        assert!(refusal.starts_with("-ERR [AUTH] "), "{refusal}");
        assert!(refusal.contains("https://localhost:8443/app-passwords"), "{refusal}");
        assert!(up.lines().is_empty(), "{:?}", up.lines());
    }

    /// Revocation ends a live session with the POP3 goodbye and closes it.
    #[tokio::test]
    async fn a_revoked_session_is_told_and_closed() {
        let up = FakePop3::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, c) = pipe();
        let task = tokio::spawn(kit.pop3().serve(server, addr(CLIENT), addr(LOCAL), true));
        let mut tls = kit.tls_client().connect(tls_name(), c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        tls.write_all(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "Logged in.\r\n").await.ends_with("+OK Logged in.\r\n"));
        assert_eq!(kit.live.kill(USER, None), 1);
        assert_eq!(read_to_end(&mut tls).await, "-ERR [AUTH] Access revoked.\r\n");
        assert!(task.await.unwrap().is_ok());
    }

    /// Shutdown: a client that has not logged in and one in the relay both get the
    /// POP3 goodbye and the close.
    #[tokio::test]
    async fn shutdown_says_goodbye_before_and_after_login() {
        let up = FakePop3::start().await;
        let kit = Kit::new(up.addr, "");
        let svc = kit.pop3();
        let (s1, mut waiting) = pipe();
        let t1 = tokio::spawn(svc.clone().serve(s1, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut waiting, "\r\n").await;
        let (s2, c2) = pipe();
        let t2 = tokio::spawn(svc.clone().serve(s2, addr(CLIENT), addr(LOCAL), true));
        let mut live = kit.tls_client().connect(tls_name(), c2).await.unwrap();
        read_until(&mut live, "\r\n").await;
        live.write_all(format!("USER {USER}\r\nPASS {PASSWORD}\r\n").as_bytes()).await.unwrap();
        read_until(&mut live, "Logged in.\r\n").await;
        assert_eq!(kit.live.end_all(), 2);
        let bye = read_to_end(&mut waiting).await;
        assert!(bye.ends_with("-ERR [SYS/TEMP] Server shutting down.\r\n"), "{bye}");
        let bye = read_to_end(&mut live).await;
        assert_eq!(bye, "-ERR [SYS/TEMP] Server shutting down.\r\n");
        assert!(matches!(t1.await.unwrap(), Err(DriveError::Ended(crate::live::EndReason::Shutdown))));
        assert!(t2.await.unwrap().is_ok());
    }
}
