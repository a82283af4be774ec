//! Connecting to an upstream server (TCP, TLS, the master password) and logging in to
//! the upstream IMAP server as the user (drives [`crate::proto::upstream::UpstreamLogin`]).
//! The SMTP side uses the same [`Connector`] with its own login exchange.

use crate::config::{Upstream, UpstreamLogin as LoginMode, UpstreamTls};
use crate::net::stream::MaybeTls;
use crate::proto::upstream::{LoginStyle, Step, UpstreamError, UpstreamLogin};
use crate::secret::{SecretBytes, SecretString};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why an upstream session could not be opened. Logged; the client only gets `NO [UNAVAILABLE]`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    /// TCP connect or I/O failed.
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The IMAP login exchange failed.
    #[error("{0}")]
    Protocol(#[from] UpstreamError),
    /// The SMTP login exchange failed.
    #[error("{0}")]
    Smtp(#[from] crate::proto::smtp_upstream::SmtpUpstreamError),
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

/// An open, logged-in upstream session.
pub struct UpstreamSession {
    /// The connection.
    pub stream: MaybeTls,
    /// Upstream's capabilities after login.
    pub capabilities: String,
    /// Bytes already read from upstream that belong to the client.
    pub leftover: Vec<u8>,
}

/// Opens upstream sessions for one upstream server.
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

    /// Connects and logs in as `user`, telling upstream the client's address.
    pub async fn open(
        &self,
        user: &str,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<UpstreamSession, UpstreamFailure> {
        match tokio::time::timeout(self.timeout, self.open_inner(user, None, client, local)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }

    /// Connects and logs in as `user` with the user's own `password` (no master user).
    /// A refusal is `UpstreamFailure::Protocol(UpstreamError::LoginRefused)`.
    pub async fn open_as_user(
        &self,
        user: &str,
        password: &SecretBytes,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<UpstreamSession, UpstreamFailure> {
        let Ok(pw) = String::from_utf8(password.expose().clone()) else {
            // IMAP credentials are UTF-8; anything else cannot be this user's password.
            return Err(UpstreamError::LoginRefused.into());
        };
        let pw = SecretString::from(pw);
        match tokio::time::timeout(self.timeout, self.open_inner(user, Some(pw), client, local)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }

    /// The upstream's settings.
    pub fn config(&self) -> &Upstream {
        &self.cfg
    }

    /// The connect/login deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reads the master password and opens the connection.
    pub async fn connect(&self) -> Result<(MaybeTls, SecretString), UpstreamFailure> {
        let password =
            crate::secret::read_secret_line(&self.cfg.master_password_file).map_err(UpstreamFailure::MasterPassword)?;
        Ok((self.open_stream().await?, password))
    }

    /// Opens the TCP connection (TLS at once for `implicit`).
    pub async fn open_stream(&self) -> Result<MaybeTls, UpstreamFailure> {
        let tcp = TcpStream::connect(&self.cfg.address).await?;
        tcp.set_nodelay(true)?;
        match self.cfg.tls {
            UpstreamTls::Implicit => self.tls_wrap(tcp).await,
            _ => Ok(MaybeTls::Plain(tcp)),
        }
    }

    /// TLS on a plain connection after STARTTLS, with the certificate checks.
    pub async fn upgrade(&self, stream: MaybeTls) -> Result<MaybeTls, UpstreamFailure> {
        let MaybeTls::Plain(tcp) = stream else {
            return Err(UpstreamFailure::Io(std::io::Error::other("STARTTLS on a TLS connection")));
        };
        self.tls_wrap(tcp).await
    }

    async fn tls_wrap(&self, tcp: TcpStream) -> Result<MaybeTls, UpstreamFailure> {
        let Some(tls) = &self.tls else { return Ok(MaybeTls::Plain(tcp)) };
        let name = ServerName::try_from(self.cfg.server_name.clone()).map_err(UpstreamFailure::Name)?;
        Ok(MaybeTls::Client(Box::new(tls.connect(name, tcp).await?)))
    }

    async fn open_inner(
        &self,
        user: &str,
        user_password: Option<SecretString>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<UpstreamSession, UpstreamFailure> {
        let (mut stream, password, style) = match user_password {
            Some(pw) => (self.open_stream().await?, pw, LoginStyle::User),
            None => {
                let (stream, password) = self.connect().await?;
                let style = match self.cfg.login {
                    LoginMode::MasterSeparator => LoginStyle::MasterSeparator(self.cfg.master_separator.clone()),
                    _ => LoginStyle::MasterSasl,
                };
                (stream, password, style)
            }
        };
        let mut login = UpstreamLogin::new(
            user,
            &self.cfg.master_user,
            password,
            style,
            self.cfg.tls == UpstreamTls::Starttls,
            client,
            local,
        );
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match login.poll() {
                Step::Write(bytes) => {
                    stream.write_all(&bytes).await?;
                    stream.flush().await?;
                }
                Step::NeedInput => {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Err(UpstreamFailure::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    login.feed(&buf[..n]);
                }
                Step::StartTls => {
                    stream = self.upgrade(stream).await?;
                    login.tls_started();
                }
                Step::Done(capabilities) => {
                    return Ok(UpstreamSession { stream, capabilities, leftover: login.into_leftover() });
                }
                Step::Fail(e) => return Err(e.into()),
            }
        }
    }
}

/// Shared handle.
pub type SharedConnector = Arc<Connector>;

/// The upstream IMAP server checks account passwords (`password_check = "upstream"`):
/// log in as the user, then LOGOUT.
impl crate::auth::PasswordChecker for Connector {
    fn check(
        &self,
        username: String,
        password: SecretBytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::auth::CheckResult> + Send + '_>> {
        Box::pin(async move {
            let nowhere: SocketAddr = ([127, 0, 0, 1], 0).into();
            match self.open_as_user(&username, &password, nowhere, nowhere).await {
                Ok(mut up) => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        let _ = up.stream.write_all(b"L1 LOGOUT\r\n").await;
                        let _ = up.stream.shutdown().await;
                    })
                    .await;
                    crate::auth::CheckResult::Valid
                }
                Err(UpstreamFailure::Protocol(UpstreamError::LoginRefused)) => crate::auth::CheckResult::Invalid,
                Err(e) => {
                    tracing::warn!(user = %username, error = %e, "upstream password check failed");
                    crate::auth::CheckResult::Unavailable
                }
            }
        })
    }
}
