//! The mail fronts that log a client in and then relay bytes (IMAP, POP3, ManageSieve):
//! one [`MailService`] runs each protocol's pre-auth machine on the driver, passes the
//! login through the gate ([`crate::net::gate::Gate::front_login`]), answers the client
//! and hands both connections to the relay. What differs is the protocol's
//! [`MailFront`] implementation (in `net::imap`, `net::pop3`, `net::sieve`). SMTP keeps
//! its own front (`net::smtp`): it reads the message itself.

use crate::auth::{Authenticated, Protocol};
use crate::config::Config;
use crate::net::driver::{Conn, DriveError, Front};
use crate::net::gate::{Admitted, Gate, LoginMachine, Upstream};
use crate::net::relay::{Relayed, filtered_session, relay_session};
use crate::net::stream::{MaybeTls, ReadAhead, Transport};
use crate::proto::sasl::OAuthOffer;
use crate::proto::{Goodbye, Next};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// A protocol's pre-auth machine as [`MailService`] runs it.
pub trait MailFront: LoginMachine<Event: Send, Reply: Send> + Send + Sync + Sized + 'static {
    /// The upstream logins of this protocol.
    type Upstream: Upstream<Connection: Relayed> + 'static;
    /// The protocol (scopes, the log of logins).
    const PROTOCOL: Protocol;
    /// A new connection's machine: `implicit` TLS, or STARTTLS offered; `upstream` for
    /// what the greeting needs to know of it; `oauth`: XOAUTH2 and OAUTHBEARER are offered
    /// ([`oauth_offer`]).
    fn start(
        hostname: &str,
        implicit: bool,
        upstream: &Self::Upstream,
        oauth: Option<OAuthOffer>,
    ) -> impl Future<Output = Self> + Send;
    /// The login passed and upstream is open: queue the success reply; returns the bytes
    /// the client pipelined behind its login (they belong to the upstream session).
    /// `who` is the login (an app password's limits narrow what the reply offers).
    fn logged_in(&mut self, upstream: &<Self::Upstream as Upstream>::Connection, who: &Authenticated) -> Vec<u8>;
    /// The protocol's last line when mailgate ends a relayed session.
    fn last_line(why: Goodbye) -> &'static [u8];
}

/// What the mail machines need to offer OAuth 2.0 bearer logins (XOAUTH2, OAUTHBEARER):
/// `None` unless `[oauth] enabled`; else the metadata URL their error challenge names.
pub fn oauth_offer(config: &Config) -> Option<OAuthOffer> {
    config.oauth.enabled.then(|| OAuthOffer { metadata_url: config.oauth_metadata_url() })
}

/// What every connection of one protocol needs.
pub struct MailService<M: MailFront> {
    /// Configuration.
    pub config: Arc<Config>,
    /// TLS for clients (with the protocol's ALPN name).
    pub acceptor: TlsAcceptor,
    /// The login gate (credential checks, live sessions).
    pub gate: Gate,
    /// Upstream logins.
    pub upstream: M::Upstream,
}

/// A client logged in, its upstream session open.
struct LoggedIn<S: Transport, C> {
    client: MaybeTls<ReadAhead<S>>,
    admitted: Admitted<C>,
    pipelined: Vec<u8>,
}

impl<M: MailFront> MailService<M> {
    /// Everything up to a logged-in upstream session; `None` when the client left.
    async fn login<S: Transport>(
        &self,
        transport: S,
        peer: SocketAddr,
        local: SocketAddr,
        implicit: bool,
    ) -> Result<Option<LoggedIn<S, <M::Upstream as Upstream>::Connection>>, DriveError> {
        let stop = self.gate.live().stop_notice();
        let mut conn = Conn::client(transport, implicit, &self.acceptor, &self.config.limits, stop).await?;
        let oauth = oauth_offer(&self.config);
        let mut machine = M::start(&self.config.hostname, implicit, &self.upstream, oauth).await;
        let origin = (peer, local);
        let Some(admitted) =
            self.gate.front_login(&mut conn, &mut machine, &self.upstream, M::PROTOCOL, origin).await?
        else {
            return Ok(None);
        };
        let pipelined = machine.logged_in(&admitted.upstream, &admitted.who);
        // The success reply; then whatever upstream already sent, in the relay.
        while let Next::Write(bytes) = machine.next() {
            conn.send(&bytes).await?;
        }
        let Some((client, _)) = conn.into_parts() else { return Ok(None) };
        Ok(Some(LoggedIn { client, admitted, pipelined }))
    }
}

impl<M: MailFront> Front for MailService<M> {
    async fn serve<S: Transport>(
        self: Arc<Self>,
        transport: S,
        peer: SocketAddr,
        local: SocketAddr,
        implicit: bool,
    ) -> Result<(), DriveError> {
        // The login phase (TLS handshake, pre-auth machine, buffers, upstream login) is a
        // large future; boxed, it is freed when login ends, and a session in the relay
        // holds only the relay's state (PERFORMANCE.md M1).
        let Some(s) = Box::pin(self.login(transport, peer, local, implicit)).await? else { return Ok(()) };
        let Admitted { who, upstream, live, own_password } = s.admitted;
        drop(own_password);
        // IMAP's autologout (≥ 30 minutes) for every protocol: a POP3 client reading a
        // large RETR without sending, a person typing a Sieve script (Pigeonhole's own
        // limit is 30 minutes too).
        let idle = self.config.limits.imap_idle_timeout;
        if who.narrowing().is_some_and(|n| n.limits_imap()) {
            if M::PROTOCOL != Protocol::Imap {
                // Refused at login already (`auth`); never relayed unfiltered.
                return Ok(());
            }
            // A read-only or folder-limited app password: both filter halves in the loop
            // (boxed: only restricted sessions pay for its state).
            return Box::pin(filtered_session(s.client, upstream, s.pipelined, live, &who, idle, M::last_line)).await;
        }
        relay_session(s.client, upstream, s.pipelined, live, &who, idle, M::last_line).await
    }
}

#[cfg(test)]
mod tests {
    use crate::net::driver::Front as _;
    use crate::net::testkit::*;
    use tokio::io::AsyncWriteExt as _;

    /// What one IMAP session counts: its login, its upstream login, the live session
    /// while it lasts, the bytes it relays; a wrong password and an upstream that is down
    /// count as what they are.
    #[tokio::test]
    async fn a_session_is_counted_from_login_to_logout() {
        let up = FakeImap::start().await;
        let kit = Kit::new(up.addr, "");
        let m = kit.metrics.clone();
        let svc = kit.imap();
        let (server, c) = pipe();
        let task = tokio::spawn(svc.clone().serve(server, addr(CLIENT), addr(LOCAL), true));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name.clone(), c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        tls.write_all(format!("a LOGIN {USER} wrong\r\n").as_bytes()).await.unwrap();
        read_until(&mut tls, "a NO").await;
        tls.write_all(format!("b LOGIN {USER} \"{PASSWORD}\"\r\n").as_bytes()).await.unwrap();
        read_until(&mut tls, "b OK").await;
        let logins = |result: &str| {
            m.sample(&format!(r#"mailgate_logins_total{{protocol="imap",method="account-password",result="{result}""#))
        };
        assert_eq!((logins("wrong"), logins("ok")), (1.0, 1.0));
        assert_eq!(m.sample("mailgate_login_duration_seconds_count"), 2.0);
        assert_eq!(m.sample(r#"mailgate_upstream_logins_total{protocol="imap",result="ok""#), 1.0);
        assert_eq!(m.sample(r#"mailgate_sessions{protocol="imap""#), 1.0);
        tls.write_all(b"c NOOP\r\n").await.unwrap();
        read_until(&mut tls, "c OK").await;
        let bytes = |direction: &str| {
            m.sample(&format!(r#"mailgate_relayed_bytes_total{{protocol="imap",direction="{direction}""#))
        };
        assert_eq!(bytes("from_client"), "c NOOP\r\n".len() as f64);
        assert_eq!(bytes("to_client"), "c OK done\r\n".len() as f64);
        tls.write_all(b"z LOGOUT\r\n").await.unwrap();
        read_until(&mut tls, "z OK").await;
        drop(tls);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await.unwrap();
        assert_eq!(m.sample(r#"mailgate_sessions{protocol="imap""#), 0.0, "the session ended");

        // Upstream down: the login is "unavailable", the upstream login "failed", and
        // no session is counted.
        let down = Kit::new(addr("127.0.0.1:9"), "");
        let (server, c) = pipe();
        tokio::spawn(down.imap().serve(server, addr(CLIENT), addr(LOCAL), true));
        let mut tls = down.tls_client().connect(name, c).await.unwrap();
        read_until(&mut tls, "\r\n").await;
        tls.write_all(format!("a LOGIN {USER} \"{PASSWORD}\"\r\n").as_bytes()).await.unwrap();
        read_until(&mut tls, "a NO").await;
        let d = &down.metrics;
        assert_eq!(
            d.sample(r#"mailgate_logins_total{protocol="imap",method="account-password",result="unavailable""#),
            1.0
        );
        assert_eq!(d.sample(r#"mailgate_upstream_logins_total{protocol="imap",result="failed""#), 1.0);
        assert_eq!(d.sample("mailgate_sessions"), 0.0);
    }

    /// A logged-in session's task holds the relay's state only: the login phase (TLS
    /// handshake, pre-auth machine, upstream login) is boxed and freed when it ends.
    /// Thousands of idle sessions pay this size each (PERFORMANCE.md M1; it was 3.4 KB),
    /// whatever the protocol.
    #[tokio::test]
    async fn every_session_task_stays_small() {
        let kit = Kit::new(addr("127.0.0.1:9"), "");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        for protocol in ["imap", "pop3", "sieve"] {
            let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, peer) = l.accept().await.unwrap();
            let size = match protocol {
                "imap" => std::mem::size_of_val(&crate::net::driver::serve_tcp(kit.imap(), s, peer, true)),
                "pop3" => std::mem::size_of_val(&crate::net::driver::serve_tcp(kit.pop3(), s, peer, true)),
                _ => std::mem::size_of_val(&crate::net::driver::serve_tcp(kit.sieve(), s, peer, false)),
            };
            assert!(size <= 1536, "{protocol} serve future: {size} bytes");
            drop(c);
        }
    }
}
