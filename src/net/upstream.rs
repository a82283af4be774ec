//! Connecting to an upstream server (TCP, TLS, the master password) and logging in to
//! it as the user: [`ImapUpstream`], [`Pop3Upstream`] and [`SieveUpstream`] each run
//! their protocol's sans-IO login machine on the driver through one [`Connector`]
//! ([`Connector::credentials`], [`Connector::log_in`]). The SMTP side uses the same
//! [`Connector`] with its own login machine (`net::smtp`).

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
    /// The ManageSieve login exchange failed.
    #[error("{0}")]
    Sieve(#[from] crate::proto::sieve_upstream::UpstreamError),
    /// The upstream ManageSieve server answered the login `NO`/`BYE`: its response code
    /// (`AUTH`, `TRYLATER`, …) and text (its own words, printable, no secret).
    #[error("upstream ManageSieve refused the login: {}{text}", code.as_deref().map(|c| format!("({c}) ")).unwrap_or_default())]
    SieveRefused {
        /// The response code, if any.
        code: Option<String>,
        /// The human-readable text.
        text: String,
    },
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
            || matches!(self, UpstreamFailure::SieveRefused { code, .. }
                if code.as_deref().is_none_or(|c| c.eq_ignore_ascii_case("AUTH")))
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

/// An open, logged-in upstream ManageSieve session.
pub struct UpstreamSieve {
    /// The connection.
    pub stream: MaybeTls,
    /// Bytes already read from upstream that belong to the client.
    pub leftover: Vec<u8>,
}

impl crate::net::relay::Relayed for UpstreamPop3 {
    fn into_relay_parts(self) -> (MaybeTls, Vec<u8>) {
        (self.stream, self.leftover)
    }
}

impl crate::net::relay::Relayed for UpstreamSieve {
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

    /// The password and login style for logging in as a user: the user's own password
    /// (`password_check = "upstream"`), or the master password in the configured style.
    /// `Ok(None)`: the user's own password is not UTF-8, so it cannot be sent and cannot
    /// be this user's password upstream.
    pub fn credentials(
        &self,
        own_password: Option<&SecretBytes>,
    ) -> Result<Option<(SecretString, LoginStyle)>, UpstreamFailure> {
        Ok(Some(match own_password {
            Some(pw) => match String::from_utf8(pw.expose().clone()) {
                Ok(pw) => (SecretString::from(pw), LoginStyle::User),
                Err(_) => return Ok(None),
            },
            None => {
                let style = match self.cfg.login {
                    LoginMode::MasterSeparator => LoginStyle::MasterSeparator(self.cfg.master_separator.clone()),
                    _ => LoginStyle::MasterSasl,
                };
                (self.master_password()?, style)
            }
        }))
    }

    /// Connects and runs `login` (a protocol's upstream login machine) to its end: what it
    /// ended with and the open connection, all within the login deadline.
    pub async fn log_in<M: crate::proto::Machine>(
        &self,
        login: &mut M,
    ) -> Result<(M::Event, MaybeTls), UpstreamFailure> {
        let mut conn = self.connect().await?;
        let event = match conn.next(login).await {
            Ok(event) => event,
            Err(DriveError::Timeout) => return Err(UpstreamFailure::Timeout),
            Err(e) => return Err(e.into()),
        };
        let (stream, _) = conn.into_parts().ok_or(UpstreamFailure::Conn(DriveError::PeerClosed))?;
        Ok((event, stream))
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

/// An upstream that logs in as the user (IMAP, POP3, ManageSieve): with the master
/// credentials, or the user's own password (`password_check = "upstream"`). Each is the
/// login gate's [`crate::net::gate::Upstream`] the same way.
pub trait UserLogin: Send + Sync {
    /// An open, logged-in session.
    type Connection: Send;
    /// Connects and logs in as `user`; with `own_password`, as the user with it (a
    /// refusal then means a wrong password, [`UpstreamFailure::is_refusal`]).
    fn login(
        &self,
        user: &str,
        own_password: Option<&SecretBytes>,
        origin: &Origin<'_>,
    ) -> impl std::future::Future<Output = Result<Self::Connection, UpstreamFailure>> + Send;
}

impl<T: UserLogin> crate::net::gate::Upstream for T {
    type Connection = T::Connection;

    async fn open(&self, who: &Authenticated, origin: &Origin<'_>) -> Result<T::Connection, UpstreamFailure> {
        self.login(who.username(), None, origin).await
    }

    async fn open_as_user(&self, check: &UpstreamCheck, origin: &Origin<'_>) -> Result<T::Connection, UpstreamFailure> {
        self.login(check.username(), Some(check.password()), origin).await
    }

    fn checks_passwords(&self) -> bool {
        true
    }
}

/// The upstream IMAP server: logs in as the user (master login, or the user's own
/// password with `password_check = "upstream"`).
#[derive(Clone)]
pub struct ImapUpstream(pub Arc<Connector>);

impl UserLogin for ImapUpstream {
    type Connection = UpstreamImap;

    /// Connects and logs in as `user`, telling upstream the client's address. With
    /// `own_password`, as the user with it (a refusal is `UpstreamError::LoginRefused`).
    async fn login(
        &self,
        user: &str,
        own_password: Option<&SecretBytes>,
        origin: &Origin<'_>,
    ) -> Result<UpstreamImap, UpstreamFailure> {
        let cfg = self.0.config();
        // IMAP credentials are UTF-8; anything else cannot be this user's password.
        let Some((password, style)) = self.0.credentials(own_password)? else {
            return Err(UpstreamError::LoginRefused.into());
        };
        let starttls = cfg.tls == UpstreamTls::Starttls;
        let (client, local) = (origin.client, origin.local);
        let mut login = UpstreamLogin::new(user, &cfg.master_user, password, style, starttls, client, local)
            .with_client_id(origin.id);
        let (capabilities, stream) = self.0.log_in(&mut login).await?;
        Ok(UpstreamImap { stream, capabilities: capabilities?, leftover: login.into_leftover() })
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

impl UserLogin for Pop3Upstream {
    type Connection = UpstreamPop3;

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
        let Some((password, style)) = self.0.credentials(own_password)? else {
            return Err(UpstreamFailure::Pop3Refused("[AUTH] password not sendable".into()));
        };
        let starttls = cfg.tls == UpstreamTls::Starttls;
        let mut login = Pop3Login::new(user, &cfg.master_user, password, style, starttls, origin.client, cfg.xclient);
        match self.0.log_in(&mut login).await? {
            (Outcome::LoggedIn, stream) => Ok(UpstreamPop3 { stream, leftover: login.into_leftover() }),
            (Outcome::Refused(text), _) => Err(UpstreamFailure::Pop3Refused(text)),
            (Outcome::Failed(e), _) => Err(e.into()),
        }
    }
}

/// The upstream ManageSieve server (Pigeonhole's managesieve-login): logs in as the user
/// with the master credentials (or the user's own password with `password_check =
/// "upstream"`), the client's address passed with `XCLIENT` when `[upstream.sieve]
/// xclient` is on and upstream offers it. The exchange is
/// [`crate::proto::sieve_upstream::UpstreamLogin`] on the driver.
///
/// It also knows what upstream lists before login ([`SieveUpstream::listing`]): a
/// ManageSieve client reads the `SIEVE` extensions from the greeting and gives up on a
/// server without them, so mailgate's greeting carries upstream's.
#[derive(Clone)]
pub struct SieveUpstream {
    connector: Arc<Connector>,
    listing: Arc<tokio::sync::Mutex<Listing>>,
}

/// Upstream's capability lines as last probed.
#[derive(Default)]
struct Listing {
    /// The lines a client is shown (CRLF-terminated), once a probe succeeded.
    lines: Option<Arc<str>>,
    /// When the last probe ended, successful or not.
    probed: Option<tokio::time::Instant>,
}

/// How long a probed listing is used before it is probed again (in the background).
const LISTING_FRESH: Duration = Duration::from_secs(600);
/// How long after a failed probe the next may run (each waiting client would otherwise
/// open an upstream connection while upstream is down).
const LISTING_RETRY: Duration = Duration::from_secs(5);

/// Upstream capabilities that mailgate words itself before login, or that only concern
/// mailgate's own connection to upstream.
const NOT_SHOWN: [&str; 7] = ["IMPLEMENTATION", "SASL", "STARTTLS", "VERSION", "XCLIENT", "OWNER", "UNAUTHENTICATE"];

impl SieveUpstream {
    /// The upstream ManageSieve server reached through `connector`.
    pub fn new(connector: Arc<Connector>) -> SieveUpstream {
        SieveUpstream { connector, listing: Arc::default() }
    }

    /// Upstream's capability lines for mailgate's greeting (`"SIEVE" "fileinto …"`,
    /// `"NOTIFY" …`, `"MAXREDIRECTS" …`: everything but [`NOT_SHOWN`]), CRLF-terminated;
    /// empty while upstream cannot be reached. The first call probes upstream (one probe
    /// at a time, the others wait for it); a listing older than ten minutes is served
    /// while a new probe runs in the background.
    pub async fn listing(&self) -> Arc<str> {
        let mut l = self.listing.lock().await;
        let now = tokio::time::Instant::now();
        let since = l.probed.map(|t| now.saturating_duration_since(t));
        match (&l.lines, since) {
            (Some(lines), Some(age)) if age < LISTING_FRESH => lines.clone(),
            (Some(lines), _) => {
                let lines = lines.clone();
                l.probed = Some(now);
                drop(l);
                let me = self.clone();
                tokio::spawn(async move {
                    let probed = me.probe().await;
                    let mut l = me.listing.lock().await;
                    if let Some(lines) = probed {
                        l.lines = Some(lines);
                    }
                    l.probed = Some(tokio::time::Instant::now());
                });
                lines
            }
            (None, Some(age)) if age < LISTING_RETRY => Arc::from(""),
            (None, _) => {
                let probed = self.probe().await;
                l.lines = probed.clone();
                l.probed = Some(tokio::time::Instant::now());
                probed.unwrap_or_else(|| Arc::from(""))
            }
        }
    }

    /// Connects, reads upstream's listing (after STARTTLS if configured) and leaves.
    async fn probe(&self) -> Option<Arc<str>> {
        use crate::proto::sieve_upstream::{Outcome, UpstreamLogin as SieveLogin};
        let mut probe = SieveLogin::probe(self.connector.config().tls == UpstreamTls::Starttls);
        match self.connector.log_in(&mut probe).await {
            Ok((Outcome::Listed, stream)) => {
                let mut conn = Conn::new(stream, Tls::None);
                conn.set_idle(Some(Duration::from_secs(2)));
                let _ = conn.send(b"LOGOUT\r\n").await;
                conn.close().await;
                let shown =
                    probe.capabilities().iter().filter(|c| !NOT_SHOWN.iter().any(|n| c.name.eq_ignore_ascii_case(n)));
                Some(shown.map(|c| c.line()).collect::<String>().into())
            }
            Ok((outcome, _)) => {
                tracing::warn!(?outcome, "could not read the upstream ManageSieve capabilities");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the upstream ManageSieve capabilities; the greeting lacks SIEVE until it can");
                None
            }
        }
    }
}

impl UserLogin for SieveUpstream {
    type Connection = UpstreamSieve;

    /// Connects and logs in as `user`. With `own_password`, as the user with it (a
    /// refusal is [`UpstreamFailure::SieveRefused`]).
    async fn login(
        &self,
        user: &str,
        own_password: Option<&SecretBytes>,
        origin: &Origin<'_>,
    ) -> Result<UpstreamSieve, UpstreamFailure> {
        use crate::proto::sieve_upstream::{Outcome, UpstreamLogin as SieveLogin};
        let cfg = self.connector.config();
        let Some((password, style)) = self.connector.credentials(own_password)? else {
            return Err(UpstreamFailure::SieveRefused {
                code: Some("AUTH".into()),
                text: "password not sendable".into(),
            });
        };
        let starttls = cfg.tls == UpstreamTls::Starttls;
        let client = cfg.xclient.then_some(origin.client);
        let mut login = SieveLogin::new(user, &cfg.master_user, password, style, starttls, client);
        match self.connector.log_in(&mut login).await? {
            (Outcome::LoggedIn, stream) => Ok(UpstreamSieve { stream, leftover: login.into_leftover() }),
            (Outcome::Refused { code, text }, _) => Err(UpstreamFailure::SieveRefused { code, text }),
            (Outcome::Failed(e), _) => Err(e.into()),
            (Outcome::Listed, _) => {
                Err(crate::proto::sieve_upstream::UpstreamError::Protocol("listed, not logged in").into())
            }
        }
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

    /// A ManageSieve `NO` to the user's own login is a wrong password when it has no
    /// response code or `(AUTH)`; `(TRYLATER)` and others are "unavailable".
    #[test]
    fn which_sieve_answers_are_a_wrong_password() {
        let refused = |code: Option<&str>| {
            UpstreamFailure::SieveRefused { code: code.map(str::to_string), text: "x".into() }.is_refusal()
        };
        assert!(refused(None) && refused(Some("AUTH")) && refused(Some("auth")));
        assert!(!refused(Some("TRYLATER")) && !refused(Some("SASL")));
        let shown = UpstreamFailure::SieveRefused { code: Some("AUTH".into()), text: "Authentication failed.".into() };
        assert_eq!(shown.to_string(), "upstream ManageSieve refused the login: (AUTH) Authentication failed.");
    }
}
