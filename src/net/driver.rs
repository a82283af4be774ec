//! The one driver: runs any sans-IO [`Machine`] over any [`Transport`], plain or TLS.
//!
//! Modelled on imap-next's `Stream::next`: [`Conn::next`] writes what the machine has to
//! say, reads and feeds it, does the STARTTLS handshake when asked, and returns at the
//! first event only the caller can act on (a login to check, a line for upstream, the
//! end of an upstream login). Deadlines (a total one, and one per read), the read
//! buffer, the pause for a client that keeps making errors, the goodbye line on a
//! timeout, shutdown or revocation, and the close are handled here and nowhere else.
//! Every protocol front and every upstream login in `net` runs on it.

use crate::live::{EndReason, LiveGuard, StopNotice};
use crate::net::stream::{MaybeTls, ReadAhead, Transport};
use crate::proto::{Goodbye, Machine, Next};
use rustls::pki_types::ServerName;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes read at once.
const READ_CHUNK: usize = 16 * 1024;
/// The pause before each reply to a client past its error limit (Postfix
/// `smtpd_error_sleep_time`).
const SLOW_DOWN: Duration = Duration::from_secs(1);
/// How long a goodbye line and the close may take.
const GOODBYE_TIME: Duration = Duration::from_secs(2);

/// How the connection goes TLS when the machine asks for it.
pub enum Tls {
    /// It cannot (a machine that asks is refused: the connection ends).
    None,
    /// As the server, towards a client.
    Server {
        /// The certificate and ALPN of the listener.
        acceptor: TlsAcceptor,
        /// How long the handshake may take.
        handshake: Duration,
    },
    /// As the client, towards upstream (certificate checked against `name`).
    Client {
        /// The upstream TLS settings.
        connector: TlsConnector,
        /// The name the certificate must carry.
        name: ServerName<'static>,
    },
}

/// What ends a connection from outside its protocol exchange.
pub enum Watch {
    /// Nothing (upstream connections: their client's connection watches).
    Nothing,
    /// mailgate shutting down (a client that has not logged in yet).
    Shutdown(StopNotice),
    /// The live session's end: revocation or shutdown.
    Live(LiveGuard),
}

impl Watch {
    async fn ended(&mut self) -> EndReason {
        match self {
            Watch::Nothing => std::future::pending().await,
            Watch::Shutdown(stop) => {
                stop.wait().await;
                EndReason::Shutdown
            }
            Watch::Live(guard) => guard.ended().await,
        }
    }
}

/// A protocol front (IMAP, SMTP): serves one client connection over any transport.
pub trait Front: Send + Sync + 'static {
    /// Serves one connection to its end; `local` is the mailgate address it reached,
    /// `implicit` means TLS from the first byte.
    fn serve<S: Transport>(
        self: std::sync::Arc<Self>,
        transport: S,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
        implicit: bool,
    ) -> impl std::future::Future<Output = Result<(), DriveError>> + Send;
}

/// Serves one accepted TCP connection with `front` (what the accept loops run).
pub async fn serve_tcp<F: Front>(
    front: std::sync::Arc<F>,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    implicit: bool,
) -> Result<(), DriveError> {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr()?;
    front.serve(tcp, peer, local, implicit).await
}

impl<S: Transport> Conn<ReadAhead<S>> {
    /// A client's connection as every front starts it: TLS at once when `implicit`
    /// (else on STARTTLS), the pre-auth deadline from now, and shutdown watched. Reads
    /// go through [`ReadAhead`], so TLS costs one read call per 32 KiB, not per 4 KiB.
    pub async fn client(
        transport: S,
        implicit: bool,
        acceptor: &TlsAcceptor,
        limits: &crate::config::Limits,
        stop: StopNotice,
    ) -> Result<Conn<ReadAhead<S>>, DriveError> {
        let deadline = Instant::now() + limits.preauth_timeout;
        let tls = Tls::Server { acceptor: acceptor.clone(), handshake: limits.tls_handshake_timeout };
        let mut conn = Conn::new(MaybeTls::Plain(ReadAhead::new(transport)), tls);
        if implicit {
            conn.start_tls().await?;
        }
        conn.set_deadline(Some(deadline));
        conn.watch(Watch::Shutdown(stop));
        Ok(conn)
    }
}

/// Why [`Conn::next`] returned no event.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The peer closed the connection.
    #[error("closed by the peer")]
    PeerClosed,
    /// The protocol ended the connection (it was closed after the last words).
    #[error("closed by the protocol")]
    Finished,
    /// A read or write failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A deadline passed (the goodbye line was sent).
    #[error("deadline passed")]
    Timeout,
    /// The TLS handshake failed or took too long.
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// Ended from outside: revoked or shutting down (the goodbye line was sent).
    #[error("ended: {0:?}")]
    Ended(EndReason),
}

impl DriveError {
    /// A normal end, not worth more than a debug line.
    pub fn is_normal(&self) -> bool {
        matches!(self, DriveError::PeerClosed | DriveError::Finished | DriveError::Ended(_))
    }
}

/// One connection driven by [`Conn::next`].
pub struct Conn<S: Transport = tokio::net::TcpStream> {
    /// `None` only after a failed handshake (the connection is over).
    stream: Option<MaybeTls<S>>,
    tls: Tls,
    buf: Vec<u8>,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    watch: Watch,
}

impl<S: Transport> Conn<S> {
    /// A connection on `stream`, going TLS as `tls` says when asked.
    pub fn new(stream: MaybeTls<S>, tls: Tls) -> Conn<S> {
        Conn { stream: Some(stream), tls, buf: Vec::new(), deadline: None, idle: None, watch: Watch::Nothing }
    }

    /// Every read and write must be done by `at` (a login's total time). `None`: no
    /// total deadline.
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
    }

    /// Each read and write must be done within `idle` of its start.
    pub fn set_idle(&mut self, idle: Option<Duration>) {
        self.idle = idle;
    }

    /// What ends the connection from outside (see [`Watch`]); the old watch is dropped.
    pub fn watch(&mut self, watch: Watch) {
        self.watch = watch;
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(MaybeTls::is_tls)
    }

    /// Resolves when the peer has gone (see [`Transport::peer_gone`]).
    pub async fn peer_gone(&self) {
        if let Some(s) = &self.stream {
            s.peer_gone().await
        }
    }

    /// The stream and the watch, for the byte relay after login.
    pub fn into_parts(self) -> Option<(MaybeTls<S>, Watch)> {
        Some((self.stream?, self.watch))
    }

    fn stream(&mut self) -> Result<&mut MaybeTls<S>, DriveError> {
        self.stream.as_mut().ok_or(DriveError::PeerClosed)
    }

    /// When the next read or write must be done.
    fn due(&self) -> Option<Instant> {
        let idle = self.idle.map(|d| Instant::now() + d);
        match (self.deadline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs `machine` until it has an event for the caller. Writes are flushed; a
    /// timeout, shutdown or revocation sends the machine's goodbye line and closes.
    pub async fn next<M: Machine>(&mut self, machine: &mut M) -> Result<M::Event, DriveError> {
        loop {
            match machine.next() {
                Next::Event(event) => return Ok(event),
                Next::Write(bytes) => {
                    if machine.slow_down() {
                        tokio::time::sleep(SLOW_DOWN).await;
                    }
                    self.send(&bytes).await?;
                }
                Next::NeedInput => {
                    let bytes = self.read(machine).await?;
                    machine.feed(bytes);
                }
                Next::StartTls => {
                    self.start_tls().await?;
                    machine.tls_started();
                }
                Next::Close => {
                    self.close().await;
                    return Err(DriveError::Finished);
                }
            }
        }
    }

    /// Writes and flushes `bytes` within the deadline.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), DriveError> {
        let due = self.due();
        let stream = self.stream()?;
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match due {
            Some(at) => match tokio::time::timeout_at(at, write).await {
                Ok(r) => Ok(r?),
                Err(_) => Err(DriveError::Timeout),
            },
            None => Ok(write.await?),
        }
    }

    /// One read, raced against the deadline and the watch.
    async fn read<M: Machine>(&mut self, machine: &M) -> Result<&[u8], DriveError> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_CHUNK];
        }
        let due = self.due();
        let Conn { stream, buf, watch, .. } = self;
        let Some(stream) = stream.as_mut() else { return Err(DriveError::PeerClosed) };
        let read = async {
            match due {
                Some(at) => tokio::time::timeout_at(at, stream.read(buf)).await.ok(),
                None => Some(stream.read(buf).await),
            }
        };
        let outcome = tokio::select! {
            r = read => Ok(r),
            reason = watch.ended() => Err(reason),
        };
        match outcome {
            Ok(Some(Ok(0))) => Err(DriveError::PeerClosed),
            Ok(Some(Ok(n))) => Ok(&self.buf[..n]),
            Ok(Some(Err(e))) => Err(DriveError::Io(e)),
            Ok(None) => {
                self.goodbye(machine.goodbye(Goodbye::Timeout)).await;
                Err(DriveError::Timeout)
            }
            Err(reason) => {
                let why = if reason == EndReason::Shutdown { Goodbye::Shutdown } else { Goodbye::Revoked };
                self.goodbye(machine.goodbye(why)).await;
                Err(DriveError::Ended(reason))
            }
        }
    }

    /// The TLS handshake now, as the server or the client (implicit TLS; STARTTLS goes
    /// through [`Conn::next`]).
    pub async fn start_tls(&mut self) -> Result<(), DriveError> {
        let Some(MaybeTls::Plain(transport)) = self.stream.take() else {
            return Err(DriveError::Handshake(std::io::Error::other("TLS asked for on a TLS connection")));
        };
        let upgraded = match &self.tls {
            Tls::None => return Err(DriveError::Handshake(std::io::Error::other("TLS is not available here"))),
            Tls::Server { acceptor, handshake } => {
                match tokio::time::timeout(*handshake, acceptor.accept(transport)).await {
                    Ok(Ok(s)) => MaybeTls::Server(Box::new(s)),
                    Ok(Err(e)) => return Err(DriveError::Handshake(e)),
                    Err(_) => return Err(DriveError::Handshake(std::io::ErrorKind::TimedOut.into())),
                }
            }
            Tls::Client { connector, name } => {
                let handshake = connector.connect(name.clone(), transport);
                let s = match self.due() {
                    Some(at) => match tokio::time::timeout_at(at, handshake).await {
                        Ok(r) => r,
                        Err(_) => return Err(DriveError::Timeout),
                    },
                    None => handshake.await,
                };
                MaybeTls::Client(Box::new(s.map_err(DriveError::Handshake)?))
            }
        };
        self.stream = Some(upgraded);
        Ok(())
    }

    /// Writes a last line (if any) and closes, bounded in time.
    pub async fn goodbye(&mut self, line: Option<&[u8]>) {
        if let Some(stream) = self.stream.as_mut() {
            let _ = tokio::time::timeout(GOODBYE_TIME, async {
                if let Some(line) = line {
                    let _ = stream.write_all(line).await;
                }
                let _ = stream.shutdown().await;
            })
            .await;
        }
    }

    /// Closes the connection, bounded in time.
    pub async fn close(&mut self) {
        self.goodbye(None).await;
    }
}
