//! Connecting to an upstream server (TCP, TLS, the master password) and logging in to
//! the upstream IMAP server as the user ([`ImapUpstream`], which runs
//! [`crate::proto::imap_upstream::UpstreamLogin`] on the driver). The SMTP side uses the
//! same [`Connector`] with its own login machine (`net::smtp`).

use crate::auth::{Authenticated, UpstreamCheck};
use crate::config::{Upstream, UpstreamLogin as LoginMode, UpstreamTls};
use crate::net::driver::{Conn, DriveError, Tls};
use crate::net::gate::Origin;
use crate::net::stream::MaybeTls;
use crate::proto::imap_upstream::{LoginStyle, UpstreamError, UpstreamLogin};
use crate::secret::{SecretBytes, SecretString};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why an upstream session could not be opened. Logged; the client only gets a
/// temporary error.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    /// TCP connect or I/O failed.
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The connection failed during the exchange.
    #[error("upstream connection: {0}")]
    Conn(#[from] DriveError),
    /// The IMAP login exchange failed.
    #[error("{0}")]
    Protocol(#[from] UpstreamError),
    /// The SMTP login exchange failed.
    #[error("{0}")]
    Smtp(#[from] crate::proto::smtp_upstream::SmtpUpstreamError),
    /// The POP3 login exchange failed.
    #[error("{0}")]
    Pop3(#[from] crate::proto::pop3_upstream::UpstreamError),
    /// The upstream POP3 server answered the login `-ERR`, with this text (its own words,
    /// one printable line, no secret).
    #[error("upstream POP3 refused the login: {0}")]
    Pop3Refused(String),
    /// Connect + login took longer than `limits.upstream_timeout_secs`.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The master password file could not be read.
    #[error("master password: {0}")]
    MasterPassword(crate::secret::SecretFileError),
    /// The TLS server name is unusable.
    #[error("upstream TLS name: {0}")]
    Name(rustls::pki_types::InvalidDnsNameError),
}

impl UpstreamFailure {
    /// Upstream refused the user's own login: the password is wrong.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            UpstreamFailure::Protocol(UpstreamError::LoginRefused)
                | UpstreamFailure::Smtp(crate::proto::smtp_upstream::SmtpUpstreamError::LoginRefused(_))
        ) || matches!(self, UpstreamFailure::Pop3Refused(text) if !text.starts_with("[SYS/") && !text.starts_with("[IN-USE]"))
    }
}

/// An open, logged-in upstream IMAP session.
pub struct UpstreamImap {
    /// The connection.
    pub stream: MaybeTls,
    /// Upstream's capabilities after login.
    pub capabilities: String,
    /// Bytes already read from upstream that belong to the client.
    pub leftover: Vec<u8>,
}

/// An open, logged-in upstream POP3 session.
pub struct UpstreamPop3 {
    /// The connection.
    pub stream: MaybeTls,
    /// Bytes already read from upstream that belong to the client.
    pub leftover: Vec<u8>,
}

impl crate::net::relay::Relayed for UpstreamImap {
    /// The capabilities are dropped: the client got them with its login reply.
    fn into_relay_parts(self) -> (MaybeTls, Vec<u8>) {
        (self.stream, self.leftover)
    }
}

impl crate::net::relay::Relayed for UpstreamPop3 {
    fn into_relay_parts(self) -> (MaybeTls, Vec<u8>) {
        (self.stream, self.leftover)
    }
}

/// Connections to one upstream server.
pub struct Connector {
    cfg: Upstream,
    tls: Option<TlsConnector>,
    timeout: Duration,
}

impl Connector {
    /// Builds the connector (TLS client configuration included).
    pub fn new(cfg: &Upstream, timeout: Duration) -> Result<Connector, crate::tls::TlsError> {
        let tls = match cfg.tls {
            UpstreamTls::None => None,
            _ => Some(TlsConnector::from(crate::tls::client_config(cfg.ca_file.as_deref())?)),
        };
        Ok(Connector { cfg: cfg.clone(), tls, timeout })
    }

    /// The upstream's settings.
    pub fn config(&self) -> &Upstream {
        &self.cfg
    }

    /// The connect/login deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The master password (first line of its file).
    pub fn master_password(&self) -> Result<SecretString, UpstreamFailure> {
        crate::secret::read_secret_line(&self.cfg.master_password_file).map_err(UpstreamFailure::MasterPassword)
    }

    /// Opens the connection, TLS at once for `implicit`, ready for STARTTLS otherwise.
    /// Every read and write must be done within the login deadline.
    pub async fn connect(&self) -> Result<Conn, UpstreamFailure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(&self.cfg.address)).await {
            Ok(r) => r?,
            Err(_) => return Err(UpstreamFailure::Timeout),
        };
        tcp.set_nodelay(true)?;
        let tls = match &self.tls {
            Some(connector) => Tls::Client {
                connector: connector.clone(),
                name: ServerName::try_from(self.cfg.server_name.clone()).map_err(UpstreamFailure::Name)?,
            },
            None => Tls::None,
        };
        let mut conn = Conn::new(MaybeTls::Plain(tcp), tls);
        conn.set_deadline(Some(deadline));
        if self.cfg.tls == UpstreamTls::Implicit {
            conn.start_tls().await?;
        }
        Ok(conn)
    }
}

/// The upstream IMAP server: logs in as the user (master login, or the user's own
/// password with `password_check = "upstream"`).
#[derive(Clone)]
pub struct ImapUpstream(pub Arc<Connector>);

impl ImapUpstream {
    /// Connects and logs in as `user`, telling upstream the client's address. With
    /// `own_password`, as the user with it (a refusal is `UpstreamError::LoginRefused`).
    async fn login(
        &self,
        user: &str,
        own_password: Option<&SecretBytes>,
        origin: &Origin<'_>,
    ) -> Result<UpstreamImap, UpstreamFailure> {
        let cfg = self.0.config();
        let (password, style) = match own_password {
            Some(pw) => match String::from_utf8(pw.expose().clone()) {
                Ok(pw) => (SecretString::from(pw), LoginStyle::User),
                // IMAP credentials are UTF-8; anything else cannot be this user's password.
                Err(_) => return Err(UpstreamError::LoginRefused.into()),
            },
            None => {
                let style = match cfg.login {
                    LoginMode::MasterSeparator => LoginStyle::MasterSeparator(cfg.master_separator.clone()),
                    _ => LoginStyle::MasterSasl,
                };
                (self.0.master_password()?, style)
            }
        };
        let starttls = cfg.tls == UpstreamTls::Starttls;
        let (client, local) = (origin.client, origin.local);
        let mut login = UpstreamLogin::new(user, &cfg.master_user, password, style, starttls, client, local)
            .with_client_id(origin.id);
        let mut conn = self.0.connect().await?;
        let capabilities = match conn.next(&mut login).await {
            Ok(done) => done?,
            Err(DriveError::Timeout) => return Err(UpstreamFailure::Timeout),
            Err(e) => return Err(e.into()),
        };
        let (stream, _) = conn.into_parts().ok_or(UpstreamFailure::Conn(DriveError::PeerClosed))?;
        Ok(UpstreamImap { stream, capabilities, leftover: login.into_leftover() })
    }
}

impl crate::net::gate::Upstream for ImapUpstream {
    type Connection = UpstreamImap;

    async fn open(&self, who: &Authenticated, origin: &Origin<'_>) -> Result<UpstreamImap, UpstreamFailure> {
        self.login(who.username(), None, origin).await
    }

    async fn open_as_user(&self, check: &UpstreamCheck, origin: &Origin<'_>) -> Result<UpstreamImap, UpstreamFailure> {
        self.login(check.username(), Some(check.password()), origin).await
    }

    fn checks_passwords(&self) -> bool {
        true
    }
}

/// The upstream IMAP server checks account passwords (`password_check = "upstream"`):
/// log in as the user, then LOGOUT.
impl crate::auth::PasswordChecker for ImapUpstream {
    fn check(
        &self,
        username: String,
        password: SecretBytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::auth::CheckResult> + Send + '_>> {
        Box::pin(async move {
            let nowhere: SocketAddr = ([127, 0, 0, 1], 0).into();
            let origin = Origin { client: nowhere, local: nowhere, id: &[] };
            match self.login(&username, Some(&password), &origin).await {
                Ok(up) => {
                    let mut conn = Conn::new(up.stream, Tls::None);
                    conn.set_idle(Some(Duration::from_secs(2)));
                    let _ = conn.send(b"L1 LOGOUT\r\n").await;
                    conn.close().await;
                    crate::auth::CheckResult::Valid
                }
                Err(e) if e.is_refusal() => crate::auth::CheckResult::Invalid,
                Err(e) => {
                    tracing::warn!(user = %username, error = %e, "upstream password check failed");
                    crate::auth::CheckResult::Unavailable
                }
            }
        })
    }
}

/// The upstream POP3 server: logs in as the user with the master credentials (or the
/// user's own password with `password_check = "upstream"`), the client's address passed
/// with `XCLIENT` when `[upstream.pop3] xclient` is on. TCP and TLS are [`Connector`]'s;
/// the exchange is [`crate::proto::pop3_upstream::UpstreamLogin`] on the driver.
#[derive(Clone)]
pub struct Pop3Upstream(pub Arc<Connector>);

impl Pop3Upstream {
    /// Connects and logs in as `user`. With `own_password`, as the user with it (a
    /// refusal is [`UpstreamFailure::Pop3Refused`]).
    async fn login(
        &self,
        user: &str,
        own_password: Option<&SecretBytes>,
        origin: &Origin<'_>,
    ) -> Result<UpstreamPop3, UpstreamFailure> {
        use crate::proto::pop3_upstream::{Outcome, UpstreamLogin as Pop3Login};
        let cfg = self.0.config();
        let (password, style) = match own_password {
            Some(pw) => match String::from_utf8(pw.expose().clone()) {
                Ok(pw) => (SecretString::from(pw), LoginStyle::User),
                // Not UTF-8: cannot be sent as this user's password.
                Err(_) => return Err(UpstreamFailure::Pop3Refused("[AUTH] password not sendable".into())),
            },
            None => {
                let style = match cfg.login {
                    LoginMode::MasterSeparator => LoginStyle::MasterSeparator(cfg.master_separator.clone()),
                    _ => LoginStyle::MasterSasl,
                };
                (self.0.master_password()?, style)
            }
        };
        let starttls = cfg.tls == UpstreamTls::Starttls;
        let mut login = Pop3Login::new(user, &cfg.master_user, password, style, starttls, origin.client, cfg.xclient);
        let mut conn = self.0.connect().await?;
        match conn.next(&mut login).await {
            Ok(Outcome::LoggedIn) => {}
            Ok(Outcome::Refused(text)) => return Err(UpstreamFailure::Pop3Refused(text)),
            Ok(Outcome::Failed(e)) => return Err(e.into()),
            Err(DriveError::Timeout) => return Err(UpstreamFailure::Timeout),
            Err(e) => return Err(e.into()),
        }
        let (stream, _) = conn.into_parts().ok_or(UpstreamFailure::Conn(DriveError::PeerClosed))?;
        Ok(UpstreamPop3 { stream, leftover: login.into_leftover() })
    }
}

impl crate::net::gate::Upstream for Pop3Upstream {
    type Connection = UpstreamPop3;

    async fn open(&self, who: &Authenticated, origin: &Origin<'_>) -> Result<UpstreamPop3, UpstreamFailure> {
        self.login(who.username(), None, origin).await
    }

    async fn open_as_user(&self, check: &UpstreamCheck, origin: &Origin<'_>) -> Result<UpstreamPop3, UpstreamFailure> {
        self.login(check.username(), Some(check.password()), origin).await
    }

    fn checks_passwords(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::UpstreamFailure;
    use crate::proto::pop3_upstream::UpstreamError;

    /// A POP3 `-ERR` to the user's own login means a wrong password unless its response
    /// code says the server is busy (RFC 3206 `[SYS/…]`, `[IN-USE]`): those are
    /// "unavailable", never a wrong password counted against the account.
    #[test]
    fn which_pop3_answers_are_a_wrong_password() {
        let refused = |text: &str| UpstreamFailure::Pop3Refused(text.to_string()).is_refusal();
        assert!(refused("[AUTH] Authentication failed."));
        assert!(refused("Authentication failed."));
        assert!(!refused("[SYS/TEMP] Try again later."));
        assert!(!refused("[SYS/PERM] Broken."));
        assert!(!refused("[IN-USE] Mailbox locked."));
        assert!(!UpstreamFailure::Pop3(UpstreamError::XClient).is_refusal());
        assert!(!UpstreamFailure::Timeout.is_refusal());
    }
}
