//! One IMAP client connection: the pre-auth machine on the driver, the login gate,
//! then the byte relay. The only I/O around [`PreAuth`].

use crate::auth::{Authenticated, Protocol};
use crate::net::front::{MailFront, MailService};
use crate::net::upstream::{ImapUpstream, UpstreamImap};
use crate::proto::Goodbye;
use crate::proto::imap::PreAuth;
use crate::proto::imap_filter;
use crate::proto::sasl::OAuthOffer;

/// Every IMAP connection: [`MailService`] with IMAP's machine.
pub type ImapService = MailService<PreAuth>;

crate::net::gate::login_machine!(imap {
    fn client_id(&self) -> &[(String, String)] {
        PreAuth::client_id(self)
    }
    fn client_name(&self) -> Option<&str> {
        PreAuth::client_name(self)
    }
});

/// The restriction the login reply's capabilities are filtered with; `None`: full rights.
/// Capabilities do not depend on the hierarchy delimiter; if the folder patterns do not
/// read, the strictest list (read-only) is shown, and the session is refused later.
fn restriction_for_caps(who: &Authenticated) -> Option<imap_filter::Restriction> {
    if !who.narrowing().is_some_and(|n| n.limits_imap()) {
        return None;
    }
    Some(
        who.restriction(imap_filter::FolderSet::DEFAULT_DELIMITER)
            .unwrap_or(imap_filter::Restriction { read_only: true, folders: None }),
    )
}

impl MailFront for PreAuth {
    type Upstream = ImapUpstream;
    const PROTOCOL: Protocol = Protocol::Imap;
    async fn start(hostname: &str, implicit: bool, _upstream: &ImapUpstream, oauth: Option<OAuthOffer>) -> Self {
        PreAuth::with_oauth(hostname, implicit, !implicit, oauth)
    }
    /// The tagged OK carries upstream's capabilities (the client's view after login),
    /// for a restricted app password only those its filter follows
    /// ([`imap_filter::filter_capabilities`]: no COMPRESS, no write-only extensions when
    /// read-only).
    fn logged_in(&mut self, upstream: &UpstreamImap, who: &Authenticated) -> Vec<u8> {
        match restriction_for_caps(who) {
            Some(rules) => self.auth_succeeded(&imap_filter::filter_capabilities(&upstream.capabilities, &rules)),
            None => self.auth_succeeded(&upstream.capabilities),
        }
    }
    fn last_line(why: Goodbye) -> &'static [u8] {
        crate::proto::imap::goodbye(why)
    }
}

#[cfg(test)]
mod tests {
    use crate::net::driver::{DriveError, Front};
    use crate::net::testkit::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// The pre-auth deadline is a total, not an idle timer: a client that trickles a byte
    /// every 300 ms is still closed, with the autologout BYE, when the deadline passes.
    /// On tokio's paused clock, so the 2 s are measured exactly whatever the machine's
    /// load (SECURITY.md case 66; `tests/imap_front.rs` checks the same end to end).
    #[tokio::test(start_paused = true)]
    async fn a_trickle_does_not_extend_the_preauth_deadline() {
        use tokio::io::AsyncReadExt;
        let kit = Kit::new(addr("127.0.0.1:9"), "[limits]\npreauth_timeout_secs = 2\n");
        let (server, mut c) = pipe();
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), false));
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let _ = c.write_all(b"a").await;
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            assert!(start.elapsed() < Duration::from_secs(60), "still open after 60 s of trickle");
        }
        let closed_at = start.elapsed();
        let seen = String::from_utf8_lossy(&seen);
        assert!(seen.starts_with("* OK"), "{seen}");
        assert!(seen.contains("* BYE Autologout: authentication took too long"), "{seen}");
        assert!(
            closed_at >= Duration::from_secs(2) && closed_at < Duration::from_millis(2_500),
            "closed at {closed_at:?}"
        );
        assert!(matches!(task.await.unwrap(), Err(DriveError::Timeout)));
    }

    /// STARTTLS through the driver: the same connection goes TLS, the capabilities after
    /// the handshake offer AUTH (before it, LOGINDISABLED), and a login works over it.
    #[tokio::test]
    async fn starttls_then_login_over_a_pipe() {
        let up = FakeImap::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, mut c) = pipe();
        tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), false));
        let greeting = read_until(&mut c, "\r\n").await;
        assert!(greeting.contains("LOGINDISABLED") && greeting.contains("STARTTLS"), "{greeting}");
        c.write_all(b"a STARTTLS\r\n").await.unwrap();
        assert!(read_until(&mut c, "a OK").await.contains("a OK"));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name, c).await.unwrap();
        tls.write_all(b"b CAPABILITY\r\n").await.unwrap();
        let caps = read_until(&mut tls, "b OK").await;
        assert!(caps.contains("AUTH=PLAIN") && !caps.contains("LOGINDISABLED"), "{caps}");
        tls.write_all(format!("c LOGIN {USER} \"{PASSWORD}\"\r\n").as_bytes()).await.unwrap();
        let ok = read_until(&mut tls, "c OK").await;
        assert!(ok.contains("c OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"), "{ok}");
    }

    /// What a client pipelines behind its LOGIN goes to the upstream session untouched,
    /// whatever its size (here a 9.5 KB line, over the pre-login line limit).
    #[tokio::test]
    async fn what_is_pipelined_behind_login_reaches_upstream() {
        let up = FakeImap::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, c) = pipe();
        tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name, c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        let long = format!("f UID FETCH {} (FLAGS)\r\n", vec!["1"; 4750].join(","));
        let both = format!("l LOGIN {USER} \"{PASSWORD}\"\r\n{long}");
        tls.write_all(both.as_bytes()).await.unwrap();
        let got = read_until(&mut tls, "f OK").await;
        assert!(got.contains("l OK [CAPABILITY") && got.contains("f OK done"), "{got}");
        assert_eq!(up.seen.lock().unwrap().first(), Some(&long));
    }

    /// Issue 20: a read-only, folder-limited app password gets the filtered relay: the
    /// login reply hides MOVE, SELECT goes upstream as EXAMINE, writes and other folders
    /// never reach upstream, and shutdown still ends the session with its BYE.
    #[tokio::test]
    async fn a_narrow_app_password_gets_the_filtered_relay() {
        let up = FakeImap::start().await;
        let kit = Kit::new(up.addr, "");
        let p = crate::auth::app_password::generate().unwrap();
        kit.store
            .create_app_password(&crate::store::AppPasswordRecord {
                id: p.id.clone(),
                username: USER.into(),
                label: "backup".into(),
                scopes: vec![crate::store::Scope::Imap],
                hash: crate::auth::password::hash(p.password.expose().as_bytes()).unwrap(),
                created_at: 0,
                created_by: "admin".into(),
                last_used: None,
                last_used_by: Default::default(),
                oauth: None,
                expires_at: None,
                allow: vec![],
                narrow: Some(crate::store::Narrowing {
                    read_only: true,
                    folders: vec!["INBOX".into()],
                    ..Default::default()
                }),
            })
            .unwrap();
        let (server, c) = pipe();
        let task = tokio::spawn(kit.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name, c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        let login = format!("a LOGIN {USER} \"{}\"\r\nb SELECT INBOX\r\n", p.password.expose());
        tls.write_all(login.as_bytes()).await.unwrap();
        let got = read_until(&mut tls, "b OK").await;
        assert!(got.contains("a OK [CAPABILITY IMAP4rev1 IDLE] Logged in"), "{got}");
        tls.write_all(b"c STORE 1 +FLAGS (\\Deleted)\r\nd SELECT Secret\r\ne NOOP\r\n").await.unwrap();
        let got = read_until(&mut tls, "e OK").await;
        assert!(got.contains("c NO [NOPERM]") && got.contains("d NO [NONEXISTENT]"), "{got}");
        let seen = up.seen.lock().unwrap().clone();
        assert_eq!(seen, ["mg0 LIST \"\" \"\"\r\n", "b EXAMINE INBOX\r\n", "e NOOP\r\n"]);
        assert_eq!(kit.live.end_all(), 1);
        let bye = read_to_end(&mut tls).await;
        assert!(bye.ends_with("* BYE Server shutting down, please reconnect\r\n"), "{bye}");
        assert!(task.await.unwrap().is_ok());
    }

    /// Shutdown: a client that has not logged in gets the goodbye and the close; one in
    /// the relay gets its BYE too.
    #[tokio::test]
    async fn shutdown_says_goodbye_before_and_after_login() {
        let up = FakeImap::start().await;
        let kit = Kit::new(up.addr, "");
        let svc = kit.imap();
        let (s1, mut waiting) = pipe();
        let t1 = tokio::spawn(svc.clone().serve(s1, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut waiting, "\r\n").await;
        let (s2, mut c2) = pipe();
        let t2 = tokio::spawn(svc.clone().serve(s2, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut c2, "\r\n").await;
        c2.write_all(b"a STARTTLS\r\n").await.unwrap();
        read_until(&mut c2, "a OK").await;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut live = kit.tls_client().connect(name, c2).await.unwrap();
        live.write_all(format!("b LOGIN {USER} \"{PASSWORD}\"\r\n").as_bytes()).await.unwrap();
        read_until(&mut live, "b OK").await;
        // One live session and one waiting to log in.
        assert_eq!(kit.live.end_all(), 2);
        let bye = read_to_end(&mut waiting).await;
        assert!(bye.ends_with("* BYE Server shutting down, please reconnect\r\n"), "{bye}");
        let bye = read_to_end(&mut live).await;
        assert!(bye.ends_with("* BYE Server shutting down, please reconnect\r\n"), "{bye}");
        assert!(matches!(t1.await.unwrap(), Err(DriveError::Ended(crate::live::EndReason::Shutdown))));
        assert!(t2.await.unwrap().is_ok());
    }
}
