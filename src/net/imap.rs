//! One IMAP client connection: TLS, the pre-auth state machine, the credential check,
//! the upstream login, then the byte relay. The only I/O around [`PreAuth`].

use crate::auth::{self, Authenticated, Authenticator, Peer, Protocol, Verdict};
use crate::config::Config;
use crate::net::relay::{Relay, RelayEnd};
use crate::net::stream::MaybeTls;
use crate::net::upstream::{Connector, UpstreamFailure, UpstreamSession};
use crate::proto::imap::{Action, AuthReply, PreAuth};
use crate::proto::upstream::UpstreamError;
use crate::sessions::{SessionGuard, Sessions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// The longest a proxied session lives (nginx `proxy_timeout 24h`).
const MAX_SESSION: Duration = Duration::from_secs(24 * 3600);

/// What every IMAP connection needs.
pub struct ImapService {
    /// Configuration.
    pub config: Arc<Config>,
    /// TLS for clients (ALPN "imap").
    pub acceptor: TlsAcceptor,
    /// Credential checks.
    pub auth: Authenticator,
    /// Upstream logins.
    pub upstream: Arc<Connector>,
    /// Live sessions (for revocation).
    pub sessions: Sessions,
}

impl ImapService {
    /// Serves one accepted connection to its end. `implicit`: TLS from the first byte.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, implicit: bool) {
        // The login phase (TLS handshake, pre-auth machine, buffers, upstream login) is a
        // large future; boxed, it is freed when login ends, and a session in the relay
        // holds only the relay's state (PERFORMANCE.md M1).
        let Some(s) = Box::pin(self.login(tcp, peer, implicit)).await else { return };
        relay(s.client, s.upstream, s.pipelined, s.guard, &s.granted, self.config.limits.imap_idle_timeout).await;
    }

    /// Everything up to a logged-in upstream session; `None` when the connection ended.
    async fn login(&self, tcp: TcpStream, peer: SocketAddr, implicit: bool) -> Option<LoggedIn> {
        let _ = tcp.set_nodelay(true);
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(_) => return None,
        };
        let limits = &self.config.limits;
        let deadline = Instant::now() + limits.preauth_timeout;
        let mut stream = if implicit {
            match timeout(limits.tls_handshake_timeout, self.acceptor.accept(tcp)).await {
                Ok(Ok(s)) => MaybeTls::Server(Box::new(s)),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return None;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return None;
                }
            }
        } else {
            MaybeTls::Plain(tcp)
        };
        let mut machine = PreAuth::new(&self.config.hostname, implicit, !implicit);
        let mut buf = vec![0u8; 16 * 1024];
        let mut stop = self.sessions.stop_notice();
        let (granted, upstream, guard) = loop {
            match machine.poll() {
                Action::Write(bytes) => {
                    if !matches!(timeout_at(deadline, stream.write_all(&bytes)).await, Ok(Ok(()))) {
                        return None;
                    }
                }
                Action::NeedInput => match tokio::select! {
                    r = timeout_at(deadline, stream.read(&mut buf)) => r,
                    () = stop.wait() => {
                        goodbye(&mut stream, b"* BYE Server shutting down, please reconnect\r\n").await;
                        return None;
                    }
                } {
                    Ok(Ok(0)) | Ok(Err(_)) => return None,
                    Ok(Ok(n)) => machine.feed(&buf[..n]),
                    Err(_) => {
                        debug!(%peer, "pre-auth deadline reached");
                        goodbye(&mut stream, b"* BYE Autologout: authentication took too long\r\n").await;
                        return None;
                    }
                },
                Action::StartTls => {
                    let MaybeTls::Plain(tcp) = stream else { return None };
                    match timeout(limits.tls_handshake_timeout, self.acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            stream = MaybeTls::Server(Box::new(s));
                            machine.tls_started();
                        }
                        _ => {
                            debug!(%peer, "STARTTLS handshake failed or timed out");
                            return None;
                        }
                    }
                }
                Action::Refuse(reply) => {
                    tokio::time::sleep(self.auth.base_delay()).await;
                    machine.auth_failed(reply);
                }
                Action::Authenticate(creds) => {
                    let who = Peer { ip: peer.ip(), client_name: machine.client_name().map(str::to_string) };
                    let username = auth::normalize_username(&creds.username);
                    // A client that leaves while its check waits for a hashing thread gives up its
                    // turn: the job is dropped before it runs.
                    let mut verdict = tokio::select! {
                        v = self.auth.verify(&creds, Protocol::Imap, &who) => v,
                        () = stream.peer_gone() => {
                            debug!(%peer, "client left during its login check");
                            return None;
                        }
                    };
                    let mut session_as_user = None;
                    if let Verdict::CheckUpstream(check) = verdict {
                        // password_check = "upstream": the upstream server checks the password.
                        // Without a second factor, the check is the session's own login.
                        verdict = if check.second_factor() {
                            let result = self.auth.check_upstream(check.username(), check.password()).await;
                            self.auth.confirm_upstream(check, result).await
                        } else {
                            match self.upstream.open_as_user(check.username(), check.password(), peer, local).await {
                                Ok(up) => {
                                    session_as_user = Some(up);
                                    self.auth.confirm_upstream(check, auth::CheckResult::Valid).await
                                }
                                Err(UpstreamFailure::Protocol(UpstreamError::LoginRefused)) => {
                                    self.auth.confirm_upstream(check, auth::CheckResult::Invalid).await
                                }
                                Err(e) => {
                                    warn!(%peer, user = %username, error = %e, "upstream login failed");
                                    Verdict::Unavailable
                                }
                            }
                        };
                    }
                    match verdict {
                        Verdict::Granted(granted) => {
                            let Some(guard) = self.sessions.register_from(
                                granted.username(),
                                granted.app_password_id(),
                                peer.ip(),
                                limits.max_sessions_per_user_ip,
                            ) else {
                                info!(%peer, user = %granted.username(), "too many sessions from this address");
                                machine.auth_failed(AuthReply::TooMany);
                                continue;
                            };
                            let opened = match session_as_user.take() {
                                Some(up) => Ok(up),
                                None => self.upstream.open(granted.username(), peer, local).await,
                            };
                            match opened {
                                Ok(up) => {
                                    self.auth.succeeded(peer.ip(), granted.username());
                                    break (granted, up, guard);
                                }
                                Err(e) => {
                                    warn!(%peer, user = %username, error = %e, "upstream login failed");
                                    machine.auth_failed(AuthReply::Unavailable);
                                }
                            }
                        }
                        // Handled above; only reachable if the upstream check was not configured.
                        Verdict::CheckUpstream(_) => machine.auth_failed(AuthReply::Unavailable),
                        Verdict::Denied => {
                            self.auth.log_refusal(auth::refusals::Kind::LoginFailed, peer.ip(), &username);
                            let delay = self.auth.failure_delay(peer.ip(), &username, creds.password.expose());
                            tokio::time::sleep(delay).await;
                            machine.auth_failed(AuthReply::Failed);
                        }
                        Verdict::NeedsAppPassword => {
                            info!(%peer, user = %username, "account password of a 2FA account refused; app password needed");
                            tokio::time::sleep(self.auth.base_delay()).await;
                            machine.auth_failed(AuthReply::NeedsAppPassword(auth::app_password_hint(
                                &self.config.app_password_url(),
                            )));
                        }
                        Verdict::Unavailable => machine.auth_failed(AuthReply::Unavailable),
                    }
                }
                Action::Close => {
                    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
                    return None;
                }
            }
        };
        info!(%peer, user = %granted.username(), app_password = granted.app_password_id().unwrap_or("-"), "IMAP login");
        let pipelined = machine.auth_succeeded(&upstream.capabilities);
        // The tagged OK, then whatever upstream already sent, then the relay.
        while let Action::Write(bytes) = machine.poll() {
            if stream.write_all(&bytes).await.is_err() {
                return None;
            }
        }
        Some(LoggedIn { client: stream, granted, upstream, pipelined, guard })
    }
}

/// A client logged in, its upstream session open.
struct LoggedIn {
    client: MaybeTls,
    granted: Authenticated,
    upstream: UpstreamSession,
    pipelined: Vec<u8>,
    guard: SessionGuard,
}

/// Writes a last line to a client that has not logged in and closes, bounded to 1 s.
async fn goodbye(stream: &mut MaybeTls, line: &[u8]) {
    let _ = timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(line).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Copies bytes both ways until either side closes, the session is revoked, the client
/// is silent for the autologout time, or [`MAX_SESSION`] passes. Needs the proof of
/// authentication. Relay buffers exist only while data flows ([`crate::net::relay`]).
async fn relay(
    mut client: MaybeTls,
    up: UpstreamSession,
    pipelined: Vec<u8>,
    mut guard: SessionGuard,
    who: &Authenticated,
    idle: Duration,
) {
    let UpstreamSession { stream: mut upstream, leftover, capabilities } = up;
    drop(capabilities);
    if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
        return;
    }
    drop(leftover);
    if !pipelined.is_empty() && upstream.write_all(&pipelined).await.is_err() {
        return;
    }
    drop(pipelined);
    let mut relay = Relay::new(&mut client, &mut upstream, idle);
    let last: Option<&[u8]> = tokio::select! {
        r = &mut relay => match r {
            Ok(RelayEnd::Closed) => None,
            Ok(RelayEnd::Idle) => {
                info!(user = %who.username(), "session ended: idle too long");
                Some(b"* BYE Autologout; idle for too long\r\n")
            }
            Err(e) => {
                debug!(user = %who.username(), error = %e, "relay ended");
                None
            }
        },
        reason = &mut guard.killed => match reason {
            Ok(crate::sessions::EndReason::Shutdown) => Some(b"* BYE Server shutting down, please reconnect\r\n"),
            _ => {
                info!(user = %who.username(), "session ended: access revoked");
                Some(b"* BYE Access revoked\r\n")
            }
        },
        _ = tokio::time::sleep(MAX_SESSION) => Some(b"* BYE Session too long\r\n"),
    };
    drop(relay);
    if let Some(line) = last {
        let _ = timeout(Duration::from_secs(2), client.write_all(line)).await;
    }
    let _ = timeout(Duration::from_secs(2), client.shutdown()).await;
    let _ = timeout(Duration::from_secs(2), upstream.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logged-in session's task holds the relay's state only: the login phase (TLS
    /// handshake, pre-auth machine, upstream login) is boxed and freed when it ends.
    /// Thousands of idle sessions pay this size each (PERFORMANCE.md M1; it was 3.4 KB).
    #[tokio::test]
    async fn a_session_task_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        crate::tls::ensure_dev_cert(&cert, &key, &["localhost".into()]).unwrap();
        let config = Arc::new(Config::embedded_defaults());
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::sled_store::SledStore::open(dir.path()).unwrap());
        let svc = Arc::new(ImapService {
            config: config.clone(),
            acceptor: TlsAcceptor::from(crate::tls::server_config(&cert, &key, &["imap"]).unwrap()),
            auth: Authenticator::new(store, 1),
            upstream: Arc::new(Connector::new(&config.upstream_imap, Duration::from_secs(5)).unwrap()),
            sessions: Sessions::default(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let fut = svc.clone().serve(s, peer, true);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1536, "serve future: {size} bytes");
        drop(c);
    }

    /// The pre-auth deadline is a total, not an idle timer: a client that trickles a byte
    /// every 300 ms is still closed, with the autologout BYE, when the deadline passes.
    /// On tokio's paused clock, so the 2 s are measured exactly whatever the machine's
    /// load (SECURITY.md case 66; `tests/imap_front.rs` checks the same end to end).
    #[tokio::test(start_paused = true)]
    async fn a_trickle_does_not_extend_the_preauth_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        crate::tls::ensure_dev_cert(&cert, &key, &["localhost".into()]).unwrap();
        let config = Arc::new(Config::from_toml_str("[limits]\npreauth_timeout_secs = 2\n", "test").unwrap());
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::sled_store::SledStore::open(&dir.path().join("store")).unwrap());
        let svc = Arc::new(ImapService {
            config: config.clone(),
            acceptor: TlsAcceptor::from(crate::tls::server_config(&cert, &key, &["imap"]).unwrap()),
            auth: Authenticator::new(store, 1),
            upstream: Arc::new(Connector::new(&config.upstream_imap, Duration::from_secs(5)).unwrap()),
            sessions: Sessions::default(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        // Each byte goes out at once: with Nagle, a byte would wait for the last one's
        // (real-time, delayed) ACK while the paused clock runs on.
        c.set_nodelay(true).unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let start = tokio::time::Instant::now();
        let server = tokio::spawn(svc.serve(s, peer, false));
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
        server.await.unwrap();
    }
}
