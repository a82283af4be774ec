//! One SMTP submission connection: the [`Submission`] machine on the driver, the login
//! gate, and each transaction step relayed to the upstream server, logged in as the user.

use crate::auth::{Authenticated, Protocol, UpstreamCheck};
use crate::config::{Config, UpstreamLogin as LoginMode, UpstreamTls};
use crate::net::driver::{Conn, DriveError, Front, Watch};
use crate::net::gate::{Attempt, Gate, Origin, Refusal};
use crate::net::stream::Transport;
use crate::net::upstream::{Connector, UpstreamFailure};
use crate::proto::smtp::{Action, AuthReply, Extensions, Submission};
use crate::proto::smtp_upstream::{Replies, SmtpLogin, SmtpUpstreamError, Style};
use crate::secret::{SecretBytes, SecretString};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// Idle time allowed between client commands after authentication (RFC 5321 §4.5.3.2.7).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Upstream's final reply to a message may take a while (RFC 5321 §4.5.3.2.6: 10 min).
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);

/// What every SMTP connection needs.
pub struct SmtpService {
    /// Configuration.
    pub config: Arc<Config>,
    /// TLS for clients (ALPN "smtp").
    pub acceptor: TlsAcceptor,
    /// The login gate (shared with IMAP).
    pub gate: Gate,
    /// The upstream SMTP server.
    pub upstream: Arc<Connector>,
    /// What upstream honours, from its latest EHLO (probed at start, refreshed at each login).
    pub upstream_extensions: std::sync::RwLock<Option<Extensions>>,
}

/// A logged-in upstream SMTP connection and its reply reader.
pub struct Upstream {
    conn: Conn,
    replies: Replies,
    /// `mailgate_relayed_bytes_total{protocol="smtp"}`: commands and messages sent
    /// upstream (`from_client`), upstream's replies (`to_client`).
    meter: crate::metrics::RelayMeter,
}

impl Upstream {
    /// Sends `bytes` (nothing read).
    async fn send(&mut self, bytes: &[u8], wait: Duration) -> Result<(), UpstreamFailure> {
        self.conn.set_deadline(Some(Instant::now() + wait));
        self.conn.send(bytes).await?;
        self.meter.from_client.inc_by(bytes.len() as u64);
        Ok(())
    }

    /// Reads one whole reply: (code, raw lines).
    async fn reply(&mut self, wait: Duration) -> Result<(u16, Vec<u8>), UpstreamFailure> {
        self.conn.set_deadline(Some(Instant::now() + wait));
        match self.conn.next(&mut self.replies).await? {
            Ok(reply) => {
                self.meter.to_client.inc_by(reply.1.len() as u64);
                Ok(reply)
            }
            Err(e) => Err(SmtpUpstreamError::Protocol(e).into()),
        }
    }

    /// Sends `bytes` and reads the reply (also `notify`'s transaction).
    pub async fn command(&mut self, bytes: &[u8], wait: Duration) -> Result<(u16, Vec<u8>), UpstreamFailure> {
        self.send(bytes, wait).await?;
        self.reply(wait).await
    }

    /// Says QUIT (waiting at most 2 s for the reply) and closes.
    pub async fn quit(mut self) {
        let wait = Duration::from_secs(2);
        let _ = self.command(b"QUIT\r\n", wait).await;
        self.conn.close().await;
    }
}

/// Connects to the upstream SMTP server and runs its login machine (greeting, EHLO as
/// `hostname`, STARTTLS as configured, then XCLIENT and/or AUTH as `style` says): the
/// logged-in connection and upstream's EHLO keywords. The SMTP front's one way to log in
/// upstream; `mailgate check` runs it too, so its word is the front's.
pub async fn log_in(
    upstream: &Connector,
    hostname: &str,
    style: Style,
    user: &str,
    password: SecretString,
    client: SocketAddr,
) -> Result<(Upstream, Vec<String>), UpstreamFailure> {
    let cfg = upstream.config();
    let starttls = cfg.tls == UpstreamTls::Starttls;
    let mut login = SmtpLogin::new(hostname, user, &cfg.master_user, password, style, starttls, client);
    let mut conn = upstream.connect().await?;
    let caps = match conn.next(&mut login).await {
        Ok(done) => done?,
        Err(DriveError::Timeout) => return Err(UpstreamFailure::Timeout),
        Err(e) => return Err(e.into()),
    };
    // Counted only where a session relays (the service sets its meter; `check` has none).
    let meter = crate::metrics::RelayMeter::default();
    Ok((Upstream { conn, replies: Replies::new(login.into_leftover()), meter }, caps))
}

/// What one client connection has, besides its machine.
#[derive(Default)]
struct Client {
    upstream: Option<Upstream>,
    granted: Option<Authenticated>,
    /// `password_check = "upstream"` without a second factor: the session is the
    /// user's own upstream login, and so is any reconnect.
    own_password: Option<SecretBytes>,
    /// A send quota refused this session once already (audited once per session).
    quota_audited: bool,
}

/// An app password's send quotas (issue 20): per hour, as leaky buckets in the store
/// (`Store::take_attempt`), so every node sharing a PostgreSQL store counts the same
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quota {
    /// Messages (taken when DATA starts).
    Messages,
    /// Recipients (taken before a RCPT TO is forwarded).
    Recipients,
}

impl Quota {
    /// The bucket of `id` for `per_hour`: all of it at once, one back every
    /// 3600/`per_hour` seconds.
    fn budget(self, id: &str, per_hour: u32) -> crate::store::Budget {
        let key = match self {
            Quota::Messages => format!("send-msgs:{id}"),
            Quota::Recipients => format!("send-rcpts:{id}"),
        };
        crate::store::Budget { key, burst: per_hour, refill_secs: (3600 / u64::from(per_hour.max(1))).max(1) }
    }

    fn words(self) -> &'static str {
        match self {
            Quota::Messages => "messages",
            Quota::Recipients => "recipients",
        }
    }
}

/// How a refusal is answered in SMTP.
fn reply_for(refusal: Refusal) -> AuthReply {
    match refusal {
        Refusal::Failed | Refusal::Gone => AuthReply::Failed,
        Refusal::NeedsAppPassword(text) => AuthReply::NeedsAppPassword(text),
        Refusal::Unavailable => AuthReply::Unavailable,
        Refusal::TooMany => AuthReply::TooMany,
    }
}

impl SmtpService {
    /// Asks upstream what it honours (greeting, STARTTLS if configured, EHLO; no login),
    /// so the first clients are offered the right extensions.
    pub async fn probe_upstream(&self) {
        let client: SocketAddr = ([127, 0, 0, 1], 0).into();
        match self.exchange(Style::Probe, "", SecretString::from(String::new()), client).await {
            Ok(up) => up.quit().await,
            Err(UpstreamFailure::Timeout) => {
                warn!("the upstream SMTP server did not answer in time; offering 8BITMIME only until a login succeeds")
            }
            Err(e) => {
                warn!(error = %e, "could not ask the upstream SMTP server what it offers; offering 8BITMIME only until a login succeeds")
            }
        }
    }

    fn extensions(&self) -> Extensions {
        self.upstream_extensions.read().ok().and_then(|e| *e).unwrap_or_else(Extensions::unknown)
    }

    /// Logs in upstream as `user` (EHLO, STARTTLS, XCLIENT, AUTH as configured).
    async fn open_upstream(&self, user: &str, client: SocketAddr) -> Result<Upstream, UpstreamFailure> {
        if self.upstream.config().login == LoginMode::Xclient {
            // XCLIENT sends no password: the master password file is not needed.
            return self.exchange(Style::Xclient, user, SecretString::from(String::new()), client).await;
        }
        let password = self.upstream.master_password()?;
        self.exchange(Style::MasterSasl, user, password, client).await
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
        self.exchange(Style::User, user, SecretString::from(pw), client).await
    }

    /// Connects and runs the upstream login machine on the driver.
    async fn exchange(
        &self,
        style: Style,
        user: &str,
        password: SecretString,
        client: SocketAddr,
    ) -> Result<Upstream, UpstreamFailure> {
        let (up, caps) = log_in(&self.upstream, &self.config.hostname, style, user, password, client).await?;
        if let Ok(mut ext) = self.upstream_extensions.write() {
            *ext = Some(Extensions::from_ehlo(&caps));
        }
        Ok(Upstream { meter: self.gate.auth().metrics().relay("smtp"), ..up })
    }

    /// Acts on one event of the client's session.
    async fn act<S: Transport>(
        &self,
        action: Action,
        conn: &mut Conn<S>,
        session: &mut Submission,
        state: &mut Client,
        peer: SocketAddr,
        local: SocketAddr,
    ) {
        match action {
            Action::Refuse(reply) => {
                self.gate.refused_early().await;
                session.auth_failed(reply);
            }
            Action::Authenticate(creds) => {
                let origin = Origin { client: peer, local, id: &[] };
                let attempt = Attempt { creds: &creds, protocol: Protocol::Smtp, origin, client_name: None };
                match self.gate.login(self, attempt, conn.peer_gone()).await {
                    Ok(admitted) => {
                        conn.set_deadline(None);
                        conn.set_idle(Some(COMMAND_TIMEOUT));
                        conn.watch(Watch::Live(admitted.live));
                        session.auth_succeeded(admitted.who.senders().to_vec());
                        if let Some(n) = admitted.who.narrowing().filter(|n| !n.send_to.is_empty()) {
                            session.limit_recipients(&n.send_to);
                        }
                        state.upstream = Some(admitted.upstream);
                        state.own_password = admitted.own_password;
                        state.granted = Some(admitted.who);
                    }
                    // Nothing to answer; the next read sees the close.
                    Err(Refusal::Gone) => session.auth_failed(AuthReply::Failed),
                    Err(refusal) => session.auth_failed(reply_for(refusal)),
                }
            }
            Action::Forward(line) => self.forward(line, session, state, peer).await,
            Action::StartData { head, complete } => self.start_data(head, complete, session, state, peer).await,
            Action::DataChunk(bytes) => {
                let wait = self.upstream.timeout();
                let sent = match state.upstream.as_mut() {
                    Some(up) => up.send(&bytes, wait).await.is_ok(),
                    None => false,
                };
                if !sent {
                    state.upstream = None;
                    session.upstream_failed();
                }
            }
            Action::EndData(bytes) => self.end_data(bytes, session, state, peer).await,
            Action::AbortUpstream => {
                // Closing without the end-of-data line: upstream discards the message.
                if let Some(mut up) = state.upstream.take() {
                    up.conn.close().await;
                }
            }
        }
    }

    /// A command line for upstream; its reply goes back to the session.
    async fn forward(&self, line: Vec<u8>, session: &mut Submission, state: &mut Client, peer: SocketAddr) {
        if state.upstream.is_none() && line.eq_ignore_ascii_case(b"RSET\r\n") {
            // No upstream connection, so no upstream transaction to reset.
            session.upstream_reply(250, b"250 2.0.0 OK\r\n");
            return;
        }
        if session.forwarding_recipient()
            && let Some(refusal) = self.take_quota(Quota::Recipients, state).await
        {
            session.upstream_reply(451, refusal.as_bytes());
            return;
        }
        let Some(up) = self.ensure_upstream(state, peer).await else {
            session.upstream_failed();
            return;
        };
        match up.command(&line, self.upstream.timeout()).await {
            Ok((code, raw)) => session.upstream_reply(code, &raw),
            Err(e) => {
                warn!(%peer, error = %e, "upstream SMTP failed");
                state.upstream = None;
                session.upstream_failed();
            }
        }
    }

    /// `DATA` upstream, then the message so far.
    async fn start_data(
        &self,
        head: Vec<u8>,
        complete: bool,
        session: &mut Submission,
        state: &mut Client,
        peer: SocketAddr,
    ) {
        if let Some(refusal) = self.take_quota(Quota::Messages, state).await {
            session.data_refused(refusal.as_bytes());
            return;
        }
        let Some(up) = self.ensure_upstream(state, peer).await else {
            session.upstream_failed();
            return;
        };
        let wait = self.upstream.timeout();
        let result = async {
            let (code, raw) = up.command(b"DATA\r\n", wait).await?;
            if code != 354 {
                return Ok(Some(Err(raw)));
            }
            if complete {
                return Ok(Some(Ok(up.command(&head, DATA_END_TIMEOUT).await?)));
            }
            up.send(&head, wait).await?;
            Ok::<_, UpstreamFailure>(None)
        }
        .await;
        match result {
            Ok(None) => session.data_accepted(),
            Ok(Some(Ok((code, raw)))) => self.final_reply(code, &raw, session, state, peer),
            Ok(Some(Err(raw))) => session.data_refused(&raw),
            Err(e) => {
                warn!(%peer, error = %e, "upstream SMTP failed during DATA");
                state.upstream = None;
                session.upstream_failed();
            }
        }
    }

    /// Takes one from the login's `quota` if its app password has one; the `451 4.7.1`
    /// reply (CRLF included) when it is used up, saying when one comes back. The first
    /// refusal of a session is audited (`send_quota_reached`). A store that does not
    /// answer refuses too (`451 4.3.0`): a quota is not skipped.
    async fn take_quota(&self, quota: Quota, state: &mut Client) -> Option<String> {
        let who = state.granted.as_ref()?;
        let id = who.app_password_id()?;
        // The app password's own quota, else `[limits]`' default for every app password.
        let limits = &self.config.limits;
        let per_hour = match quota {
            Quota::Messages => {
                who.narrowing().and_then(|n| n.max_messages).or(limits.app_password_max_messages_per_hour)?
            }
            Quota::Recipients => {
                who.narrowing().and_then(|n| n.max_recipients).or(limits.app_password_max_recipients_per_hour)?
            }
        };
        let budget = quota.budget(id, per_hour);
        let refill = budget.refill_secs;
        let store = self.gate.auth().store().clone();
        let now = crate::fsutil::now_unix();
        let taken = tokio::task::spawn_blocking(move || store.take_attempt(&[budget], now)).await;
        match taken {
            Ok(Ok(None)) => None,
            Ok(Ok(Some(_))) => {
                let at = crate::accounts::fmt_time(now + refill);
                if !std::mem::replace(&mut state.quota_audited, true) {
                    let detail = format!("app password {id}: {per_hour} {} per hour used up", quota.words());
                    let ev = crate::store::AuditEvent {
                        at: now,
                        username: who.username().to_string(),
                        kind: "send_quota_reached".into(),
                        detail,
                    };
                    let store = self.gate.auth().store().clone();
                    let _ = tokio::task::spawn_blocking(move || store.append_audit(&ev)).await;
                    info!(user = %who.username(), app_password = id, quota = quota.words(), "send quota reached");
                    // The owner hears of it (issue 20 point 3): a device that suddenly
                    // sends this much may have been taken over.
                    if let Some(n) = self.gate.auth().notifier() {
                        let limit = format!("{per_hour} {} per hour", quota.words());
                        n.notify(
                            who.username(),
                            crate::notify::Kind::SendQuotaReached,
                            &[("id", id), ("quota", &limit), ("frees", &at)],
                        );
                    }
                }
                Some(format!(
                    "451 4.7.1 Send quota of this app password reached ({per_hour} {} per hour); the next one frees up by {at}\r\n",
                    quota.words()
                ))
            }
            Ok(Err(e)) => {
                warn!(error = %e, "send quota not checked: store error");
                Some("451 4.3.0 Send quota could not be checked, try again later\r\n".into())
            }
            Err(_) => Some("451 4.3.0 Send quota could not be checked, try again later\r\n".into()),
        }
    }

    /// The last message bytes and upstream's final reply.
    async fn end_data(&self, bytes: Vec<u8>, session: &mut Submission, state: &mut Client, peer: SocketAddr) {
        let result = match state.upstream.as_mut() {
            Some(up) => up.command(&bytes, DATA_END_TIMEOUT).await.ok(),
            None => None,
        };
        match result {
            Some((code, raw)) => self.final_reply(code, &raw, session, state, peer),
            None => {
                state.upstream = None;
                session.upstream_failed();
            }
        }
    }

    fn final_reply(&self, code: u16, raw: &[u8], session: &mut Submission, state: &Client, peer: SocketAddr) {
        if (200..300).contains(&code) {
            info!(%peer, user = %state.granted.as_ref().map(|g| g.username()).unwrap_or("-"), "message relayed");
        }
        session.upstream_reply(code, raw);
    }

    /// The upstream connection, opened again (as the same user) if an earlier message
    /// had to be abandoned. `None` if there is no authenticated user or it fails.
    async fn ensure_upstream<'a>(&self, state: &'a mut Client, peer: SocketAddr) -> Option<&'a mut Upstream> {
        if state.upstream.is_none() {
            let g = state.granted.as_ref()?;
            let opened = match &state.own_password {
                Some(pw) => self.open_upstream_as_user(g.username(), pw, peer).await,
                None => self.open_upstream(g.username(), peer).await,
            };
            match opened {
                Ok(up) => state.upstream = Some(up),
                Err(e) => {
                    warn!(%peer, user = %g.username(), error = %e, "upstream login failed");
                    return None;
                }
            }
        }
        state.upstream.as_mut()
    }
}

/// The upstream submission server, for the login gate.
impl crate::net::gate::Upstream for SmtpService {
    type Connection = Upstream;

    async fn open(&self, who: &Authenticated, origin: &Origin<'_>) -> Result<Upstream, UpstreamFailure> {
        self.open_upstream(who.username(), origin.client).await
    }

    async fn open_as_user(&self, check: &UpstreamCheck, origin: &Origin<'_>) -> Result<Upstream, UpstreamFailure> {
        self.open_upstream_as_user(check.username(), check.password(), origin.client).await
    }

    /// With master-sasl upstream, an account without a second factor logs in to the SMTP
    /// server with its own password (that is the check); otherwise the IMAP server checks it.
    fn checks_passwords(&self) -> bool {
        self.upstream.config().login == LoginMode::MasterSasl
    }
}

impl Front for SmtpService {
    async fn serve<S: Transport>(
        self: Arc<Self>,
        transport: S,
        peer: SocketAddr,
        local: SocketAddr,
        implicit: bool,
    ) -> Result<(), DriveError> {
        let stop = self.gate.live().stop_notice();
        let mut conn = Conn::client(transport, implicit, &self.acceptor, &self.config.limits, stop).await?;
        let mut session =
            Submission::new(&self.config.hostname, implicit, !implicit, self.config.smtp_max_message_size);
        session.set_upstream_extensions(self.extensions());
        session.set_oauth(crate::net::front::oauth_offer(&self.config));
        let mut state = Client::default();
        let ended = loop {
            let action = match conn.next(&mut session).await {
                Ok(action) => action,
                Err(e) => break e,
            };
            self.act(action, &mut conn, &mut session, &mut state, peer, local).await;
        };
        if let Some(up) = state.upstream.take() {
            up.quit().await;
        }
        conn.close().await;
        Err(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testkit::*;
    use tokio::io::AsyncWriteExt;

    fn plain() -> String {
        crate::proto::sasl::encode_plain("", USER, &SecretString::from(PASSWORD.to_string()))
    }

    /// A whole submission over a pipe through the driver: EHLO, AUTH, one message
    /// (reaching upstream byte for byte), QUIT.
    #[tokio::test]
    async fn a_message_is_submitted_over_a_pipe() {
        let up = FakeSmtp::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, c) = pipe();
        let task = tokio::spawn(kit.smtp().serve(server, addr(CLIENT), addr(LOCAL), true));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name, c).await.unwrap();
        assert!(read_until(&mut tls, "\r\n").await.starts_with("220 "));
        tls.write_all(b"EHLO client.example\r\n").await.unwrap();
        assert!(read_until(&mut tls, "250 ").await.contains("AUTH PLAIN"));
        tls.write_all(format!("AUTH PLAIN {}\r\n", plain()).as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "\r\n").await.starts_with("235 "));
        assert_eq!(kit.metrics.sample(r#"mailgate_sessions{protocol="smtp""#), 1.0);
        let message = format!("From: {USER}\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello.\r\n.\r\n");
        let commands = format!("MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n");
        tls.write_all(commands.as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "354").await.contains("354"));
        tls.write_all(message.as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "queued").await.contains("250 2.0.0 queued"));
        tls.write_all(b"QUIT\r\n").await.unwrap();
        assert!(read_to_end(&mut tls).await.starts_with("221"));
        assert!(matches!(task.await.unwrap(), Err(DriveError::Finished)));
        assert_eq!(up.messages.lock().unwrap().as_slice(), std::slice::from_ref(&message));
        // Metrics: the login, the session (ended), the commands and the message sent
        // upstream, and upstream's replies.
        let m = &kit.metrics;
        assert_eq!(m.sample(r#"mailgate_logins_total{protocol="smtp",method="account-password",result="ok""#), 1.0);
        assert_eq!(m.sample(r#"mailgate_sessions{protocol="smtp""#), 0.0);
        let sent = m.sample(r#"mailgate_relayed_bytes_total{protocol="smtp",direction="from_client""#);
        assert!(sent >= (commands.len() + message.len()) as f64, "{sent}");
        assert!(m.sample(r#"mailgate_relayed_bytes_total{protocol="smtp",direction="to_client""#) > 0.0);
    }

    /// A revoked session hears `421 4.7.0 Access revoked` at once, while it waits for
    /// its client's next command.
    #[tokio::test]
    async fn a_revoked_session_is_told_and_closed() {
        let up = FakeSmtp::start().await;
        let kit = Kit::new(up.addr, "");
        let (server, mut c) = pipe();
        let task = tokio::spawn(kit.smtp().serve(server, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut c, "\r\n").await;
        c.write_all(b"EHLO client.example\r\nSTARTTLS\r\n").await.unwrap();
        read_until(&mut c, "220 2.0.0").await;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = kit.tls_client().connect(name, c).await.unwrap();
        tls.write_all(format!("EHLO again\r\nAUTH PLAIN {}\r\n", plain()).as_bytes()).await.unwrap();
        assert!(read_until(&mut tls, "235 ").await.contains("235 "));
        assert_eq!(kit.live.kill(USER, None), 1);
        assert_eq!(read_to_end(&mut tls).await, "421 4.7.0 Access revoked\r\n");
        assert!(matches!(task.await.unwrap(), Err(DriveError::Ended(crate::live::EndReason::Revoked))));
    }

    /// Before login the deadline is a total; the client hears the SMTP goodbye.
    #[tokio::test(start_paused = true)]
    async fn the_preauth_deadline_ends_with_421() {
        let kit = Kit::new(addr("127.0.0.1:9"), "[limits]\npreauth_timeout_secs = 2\n");
        let (server, mut c) = pipe();
        let task = tokio::spawn(kit.smtp().serve(server, addr(CLIENT), addr(LOCAL), false));
        c.write_all(b"EHLO client.example\r\n").await.unwrap();
        let all = read_to_end(&mut c).await;
        assert!(all.starts_with("220 ") && all.ends_with("421 4.4.2 Timeout, closing connection\r\n"), "{all}");
        assert!(matches!(task.await.unwrap(), Err(DriveError::Timeout)));
    }

    /// Past ten errors before login every reply waits a second (Postfix's
    /// `smtpd_soft_error_limit`, SECURITY.md case 50); before that, none does. Paused clock.
    #[tokio::test(start_paused = true)]
    async fn replies_slow_down_after_ten_errors() {
        let kit = Kit::new(addr("127.0.0.1:9"), "");
        let (server, mut c) = pipe();
        tokio::spawn(kit.smtp().serve(server, addr(CLIENT), addr(LOCAL), false));
        read_until(&mut c, "\r\n").await;
        let start = tokio::time::Instant::now();
        for n in 1..=12u64 {
            c.write_all(b"FOO\r\n").await.unwrap();
            let reply = read_until(&mut c, "\r\n").await;
            assert!(reply.starts_with("5"), "{reply}");
            let waited = start.elapsed();
            let slowed = n.saturating_sub(10);
            assert_eq!(waited.as_secs(), slowed, "after error {n}: {waited:?}");
        }
    }
}
