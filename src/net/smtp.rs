//! One SMTP submission connection: TLS, the [`Session`] state machine, the credential
//! check, the upstream login as the user, and the relay of each transaction step.

use crate::auth::{self, Authenticated, Authenticator, Peer, Protocol, Verdict};
use crate::config::{Config, UpstreamLogin as LoginMode, UpstreamTls};
use crate::net::stream::MaybeTls;
use crate::net::upstream::{Connector, UpstreamFailure};
use crate::proto::smtp::{Action, AuthReply, Extensions, Session};
use crate::proto::smtp_upstream::{ReplyError, SmtpLogin, SmtpUpstreamError, Step, Style, parse_reply};
use crate::secret::{SecretBytes, SecretString};
use crate::sessions::{EndReason, SessionGuard, Sessions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// Idle time allowed between client commands after authentication (RFC 5321 §4.5.3.2.7).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Upstream's final reply to a message may take a while (RFC 5321 §4.5.3.2.6: 10 min).
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);
/// Errors before auth after which every reply waits (Postfix `smtpd_soft_error_limit`).
const SOFT_ERROR_LIMIT: u32 = 10;
/// The wait (Postfix `smtpd_error_sleep_time`).
const ERROR_SLEEP: Duration = Duration::from_secs(1);

/// What every SMTP connection needs.
pub struct SmtpService {
    /// Configuration.
    pub config: Arc<Config>,
    /// TLS for clients (ALPN "smtp").
    pub acceptor: TlsAcceptor,
    /// Credential checks (shared with IMAP).
    pub auth: Authenticator,
    /// The upstream SMTP server.
    pub upstream: Arc<Connector>,
    /// Live sessions (for revocation).
    pub sessions: Sessions,
    /// What upstream honours, from its latest EHLO (probed at start, refreshed at each login).
    pub upstream_extensions: std::sync::RwLock<Option<Extensions>>,
}

/// A logged-in upstream SMTP connection with its read buffer.
struct Upstream {
    stream: MaybeTls,
    buf: Vec<u8>,
}

impl Upstream {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads one whole reply: (code, raw lines).
    async fn reply(&mut self, wait: Duration) -> std::io::Result<(u16, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut tmp = [0u8; 4096];
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((code, len))) => return Ok((code, self.buf.drain(..len).collect())),
                Ok(None) => {}
                Err(ReplyError::TooLong | ReplyError::Malformed) => {
                    return Err(std::io::Error::other("malformed upstream reply"));
                }
            }
            let n = match timeout_at(deadline, self.stream.read(&mut tmp)).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            };
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            if self.send(b"QUIT\r\n").await.is_ok() {
                let _ = self.reply(Duration::from_secs(2)).await;
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

impl SmtpService {
    /// Asks upstream what it honours (greeting, STARTTLS if configured, EHLO; no login),
    /// so the first clients are offered the right extensions.
    pub async fn probe_upstream(&self) {
        let client: SocketAddr = ([127, 0, 0, 1], 0).into();
        let result = async {
            let stream = self.upstream.open_stream().await?;
            self.exchange(stream, Style::Probe, "", SecretString::from(String::new()), client).await
        };
        match timeout(self.upstream.timeout(), result).await {
            Ok(Ok(up)) => up.quit().await,
            Ok(Err(e)) => {
                warn!(error = %e, "could not ask the upstream SMTP server what it offers; offering 8BITMIME only until a login succeeds")
            }
            Err(_) => {
                warn!("the upstream SMTP server did not answer in time; offering 8BITMIME only until a login succeeds")
            }
        }
    }

    fn extensions(&self) -> Extensions {
        self.upstream_extensions.read().ok().and_then(|e| *e).unwrap_or_else(Extensions::unknown)
    }

    /// Logs in upstream as `user` (connect, EHLO, STARTTLS, XCLIENT, AUTH as configured).
    async fn open_upstream(&self, user: &str, client: SocketAddr) -> Result<Upstream, UpstreamFailure> {
        let fut = async {
            if self.upstream.config().login == LoginMode::Xclient {
                // XCLIENT sends no password: the master password file is not needed.
                let stream = self.upstream.open_stream().await?;
                return self.exchange(stream, Style::Xclient, user, SecretString::from(String::new()), client).await;
            }
            let (stream, password) = self.upstream.connect().await?;
            self.exchange(stream, Style::MasterSasl, user, password, client).await
        };
        match timeout(self.upstream.timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }

    /// Logs in upstream as `user` with the user's own password (AUTH PLAIN, no master).
    async fn open_upstream_as_user(
        &self,
        user: &str,
        password: &SecretBytes,
        client: SocketAddr,
    ) -> Result<Upstream, UpstreamFailure> {
        let Ok(pw) = String::from_utf8(password.expose().clone()) else {
            return Err(SmtpUpstreamError::LoginRefused(535).into());
        };
        let fut = async {
            let stream = self.upstream.open_stream().await?;
            self.exchange(stream, Style::User, user, SecretString::from(pw), client).await
        };
        match timeout(self.upstream.timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Timeout),
        }
    }

    /// Drives the upstream greeting/EHLO/STARTTLS/XCLIENT/AUTH exchange on `stream`.
    async fn exchange(
        &self,
        mut stream: MaybeTls,
        style: Style,
        user: &str,
        password: SecretString,
        client: SocketAddr,
    ) -> Result<Upstream, UpstreamFailure> {
        let connector = &self.upstream;
        {
            let cfg = connector.config();
            let mut login = SmtpLogin::new(
                &self.config.hostname,
                user,
                &cfg.master_user,
                password,
                style,
                cfg.tls == UpstreamTls::Starttls,
                client,
            );
            let mut tmp = vec![0u8; 8192];
            loop {
                match login.poll() {
                    Step::Write(b) => {
                        stream.write_all(&b).await?;
                        stream.flush().await?;
                    }
                    Step::NeedInput => {
                        let n = stream.read(&mut tmp).await?;
                        if n == 0 {
                            return Err(UpstreamFailure::Io(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                        login.feed(&tmp[..n]);
                    }
                    Step::StartTls => {
                        stream = connector.upgrade(stream).await?;
                        login.tls_started();
                    }
                    Step::Done(caps) => {
                        if let Ok(mut ext) = self.upstream_extensions.write() {
                            *ext = Some(Extensions::from_ehlo(&caps));
                        }
                        return Ok(Upstream { stream, buf: login.into_leftover() });
                    }
                    Step::Fail(e) => return Err(e.into()),
                }
            }
        }
    }

    /// Serves one accepted connection to its end. `implicit`: TLS from the first byte.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, implicit: bool) {
        let _ = tcp.set_nodelay(true);
        let limits = &self.config.limits;
        let preauth_deadline = Instant::now() + limits.preauth_timeout;
        let mut client = if implicit {
            match timeout(limits.tls_handshake_timeout, self.acceptor.accept(tcp)).await {
                Ok(Ok(s)) => MaybeTls::Server(Box::new(s)),
                _ => {
                    debug!(%peer, "SMTP TLS handshake failed or timed out");
                    return;
                }
            }
        } else {
            MaybeTls::Plain(tcp)
        };
        let mut session = Session::new(&self.config.hostname, implicit, !implicit, self.config.smtp_max_message_size);
        session.set_upstream_extensions(self.extensions());
        let mut buf = vec![0u8; 16 * 1024];
        let mut upstream: Option<Upstream> = None;
        let mut granted: Option<Authenticated> = None;
        // password_check = "upstream" without a second factor: the session is the user's
        // own upstream login, and so is any reconnect.
        let mut user_password: Option<SecretBytes> = None;
        let mut guard: Option<SessionGuard> = None;
        let mut stop = self.sessions.stop_notice();
        loop {
            let deadline = if granted.is_some() { Instant::now() + COMMAND_TIMEOUT } else { preauth_deadline };
            match session.poll() {
                Action::Write(bytes) => {
                    if granted.is_none() && session.errors() >= SOFT_ERROR_LIMIT {
                        tokio::time::sleep(ERROR_SLEEP).await;
                    }
                    if !matches!(timeout_at(deadline, client.write_all(&bytes)).await, Ok(Ok(()))) {
                        break;
                    }
                }
                Action::NeedInput => {
                    let read = async {
                        match guard.as_mut() {
                            Some(g) => tokio::select! {
                                r = timeout_at(deadline, client.read(&mut buf)) => Ok(r),
                                reason = &mut g.killed => Err(reason.unwrap_or(EndReason::Revoked)),
                            },
                            None => tokio::select! {
                                r = timeout_at(deadline, client.read(&mut buf)) => Ok(r),
                                () = stop.wait() => Err(EndReason::Shutdown),
                            },
                        }
                    };
                    match read.await {
                        Err(reason) => {
                            let line: &[u8] = if reason == EndReason::Shutdown {
                                b"421 4.3.2 Server shutting down, please reconnect\r\n"
                            } else {
                                info!(%peer, "SMTP session ended: access revoked");
                                b"421 4.7.0 Access revoked\r\n"
                            };
                            let _ = timeout(Duration::from_secs(2), client.write_all(line)).await;
                            break;
                        }
                        Ok(Ok(Ok(0))) | Ok(Ok(Err(_))) => break,
                        Ok(Ok(Ok(n))) => session.feed(&buf[..n]),
                        Ok(Err(_)) => {
                            let _ = timeout(
                                Duration::from_secs(1),
                                client.write_all(b"421 4.4.2 Timeout, closing connection\r\n"),
                            )
                            .await;
                            break;
                        }
                    }
                }
                Action::StartTls => {
                    let MaybeTls::Plain(tcp) = client else { break };
                    match timeout(limits.tls_handshake_timeout, self.acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            client = MaybeTls::Server(Box::new(s));
                            session.tls_started();
                        }
                        _ => {
                            debug!(%peer, "SMTP STARTTLS handshake failed or timed out");
                            return;
                        }
                    }
                }
                Action::Refuse(reply) => {
                    tokio::time::sleep(self.auth.base_delay()).await;
                    session.auth_failed(reply);
                }
                Action::Authenticate(creds) => {
                    let who = Peer { ip: peer.ip(), client_name: None };
                    let username = auth::normalize_username(&creds.username);
                    // A client that leaves while its check waits for a hashing thread gives up its
                    // turn: the job is dropped before it runs.
                    let mut verdict = tokio::select! {
                        v = self.auth.verify(&creds, Protocol::Smtp, &who) => v,
                        () = client.peer_gone() => {
                            debug!(%peer, "client left during its login check");
                            return;
                        }
                    };
                    let mut session_as_user = None;
                    if let Verdict::CheckUpstream(check) = verdict {
                        // password_check = "upstream". With master-sasl upstream, an account
                        // without a second factor logs in to the SMTP server with its own
                        // password (that is the check); otherwise the IMAP server checks it.
                        let own_login = !check.second_factor() && self.upstream.config().login == LoginMode::MasterSasl;
                        verdict = if own_login {
                            match self.open_upstream_as_user(check.username(), check.password(), peer).await {
                                Ok(up) => {
                                    session_as_user = Some(up);
                                    user_password = Some(SecretBytes::from(check.password().expose().clone()));
                                    self.auth.confirm_upstream(check, auth::CheckResult::Valid).await
                                }
                                Err(UpstreamFailure::Smtp(SmtpUpstreamError::LoginRefused(_))) => {
                                    self.auth.confirm_upstream(check, auth::CheckResult::Invalid).await
                                }
                                Err(e) => {
                                    warn!(%peer, user = %username, error = %e, "upstream SMTP login failed");
                                    Verdict::Unavailable
                                }
                            }
                        } else {
                            let result = self.auth.check_upstream(check.username(), check.password()).await;
                            self.auth.confirm_upstream(check, result).await
                        };
                    }
                    match verdict {
                        Verdict::CheckUpstream(_) => session.auth_failed(AuthReply::Unavailable),
                        Verdict::Granted(g) => match match session_as_user.take() {
                            Some(up) => Ok(up),
                            None => self.open_upstream(g.username(), peer).await,
                        } {
                            Ok(up) => match self.sessions.register_from(
                                g.username(),
                                g.app_password_id(),
                                peer.ip(),
                                limits.max_sessions_per_user_ip,
                            ) {
                                Some(slot) => {
                                    info!(%peer, user = %g.username(), app_password = g.app_password_id().unwrap_or("-"), "SMTP login");
                                    self.auth.succeeded(peer.ip(), g.username());
                                    upstream = Some(up);
                                    guard = Some(slot);
                                    session.auth_succeeded(g.senders().to_vec());
                                    granted = Some(g);
                                }
                                None => {
                                    info!(%peer, user = %g.username(), "too many sessions from this address");
                                    up.quit().await;
                                    session.auth_failed(AuthReply::TooMany);
                                }
                            },
                            Err(e) => {
                                warn!(%peer, user = %username, error = %e, "upstream SMTP login failed");
                                session.auth_failed(AuthReply::Unavailable);
                            }
                        },
                        Verdict::Denied => {
                            self.auth.log_refusal(auth::refusals::Kind::LoginFailed, peer.ip(), &username);
                            let delay = self.auth.failure_delay(peer.ip(), &username, creds.password.expose());
                            tokio::time::sleep(delay).await;
                            session.auth_failed(AuthReply::Failed);
                        }
                        Verdict::NeedsAppPassword => {
                            info!(%peer, user = %username, "account password of a 2FA account refused; app password needed");
                            tokio::time::sleep(self.auth.base_delay()).await;
                            session.auth_failed(AuthReply::NeedsAppPassword(auth::app_password_hint(
                                &self.config.app_password_url(),
                            )));
                        }
                        Verdict::Unavailable => session.auth_failed(AuthReply::Unavailable),
                    }
                }
                Action::Forward(line) => {
                    let is_rset = line.eq_ignore_ascii_case(b"RSET\r\n");
                    if upstream.is_none() && is_rset {
                        // No upstream connection, so no upstream transaction to reset.
                        session.upstream_reply(250, b"250 2.0.0 OK\r\n");
                        continue;
                    }
                    let Some(up) =
                        self.ensure_upstream(&mut upstream, granted.as_ref(), user_password.as_ref(), peer).await
                    else {
                        session.upstream_failed();
                        continue;
                    };
                    let wait = self.upstream.timeout();
                    match async {
                        up.send(&line).await?;
                        up.reply(wait).await
                    }
                    .await
                    {
                        Ok((code, raw)) => session.upstream_reply(code, &raw),
                        Err(e) => {
                            warn!(%peer, error = %e, "upstream SMTP failed");
                            upstream = None;
                            session.upstream_failed();
                        }
                    }
                }
                Action::StartData { head, complete } => {
                    let Some(up) =
                        self.ensure_upstream(&mut upstream, granted.as_ref(), user_password.as_ref(), peer).await
                    else {
                        session.upstream_failed();
                        continue;
                    };
                    let wait = self.upstream.timeout();
                    let result = async {
                        up.send(b"DATA\r\n").await?;
                        let (code, raw) = up.reply(wait).await?;
                        if code != 354 {
                            return Ok(Some(Err(raw)));
                        }
                        up.send(&head).await?;
                        if complete {
                            let (code, raw) = up.reply(DATA_END_TIMEOUT).await?;
                            return Ok(Some(Ok((code, raw))));
                        }
                        Ok::<_, std::io::Error>(None)
                    }
                    .await;
                    match result {
                        Ok(None) => session.data_accepted(),
                        Ok(Some(Ok((code, raw)))) => session.upstream_reply(code, &raw),
                        Ok(Some(Err(raw))) => session.data_refused(&raw),
                        Err(e) => {
                            warn!(%peer, error = %e, "upstream SMTP failed during DATA");
                            upstream = None;
                            session.upstream_failed();
                        }
                    }
                }
                Action::DataChunk(bytes) => {
                    let ok = match upstream.as_mut() {
                        Some(up) => up.send(&bytes).await.is_ok(),
                        None => false,
                    };
                    if !ok {
                        upstream = None;
                        session.upstream_failed();
                    }
                }
                Action::EndData(bytes) => {
                    let result = match upstream.as_mut() {
                        Some(up) => async {
                            up.send(&bytes).await?;
                            up.reply(DATA_END_TIMEOUT).await
                        }
                        .await
                        .ok(),
                        None => None,
                    };
                    match result {
                        Some((code, raw)) => {
                            if (200..300).contains(&code) {
                                info!(%peer, user = %granted.as_ref().map(|g| g.username()).unwrap_or("-"), "message relayed");
                            }
                            session.upstream_reply(code, &raw);
                        }
                        None => {
                            upstream = None;
                            session.upstream_failed();
                        }
                    }
                }
                Action::AbortUpstream => {
                    // Closing without the end-of-data line: upstream discards the message.
                    if let Some(mut up) = upstream.take() {
                        let _ = timeout(Duration::from_secs(2), up.stream.shutdown()).await;
                    }
                }
                Action::Close => break,
            }
        }
        if let Some(up) = upstream.take() {
            up.quit().await;
        }
        let _ = timeout(Duration::from_secs(2), client.shutdown()).await;
    }

    /// The upstream connection, opened again (as the same user) if an earlier message
    /// had to be abandoned. `None` if there is no authenticated user or it fails.
    async fn ensure_upstream<'a>(
        &self,
        upstream: &'a mut Option<Upstream>,
        granted: Option<&Authenticated>,
        user_password: Option<&SecretBytes>,
        peer: SocketAddr,
    ) -> Option<&'a mut Upstream> {
        if upstream.is_none() {
            let g = granted?;
            let opened = match user_password {
                Some(pw) => self.open_upstream_as_user(g.username(), pw, peer).await,
                None => self.open_upstream(g.username(), peer).await,
            };
            match opened {
                Ok(up) => *upstream = Some(up),
                Err(e) => {
                    warn!(%peer, user = %g.username(), error = %e, "upstream SMTP login failed");
                    return None;
                }
            }
        }
        upstream.as_mut()
    }
}
