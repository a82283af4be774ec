//! A connection that starts in plaintext and may switch to TLS (STARTTLS), over any
//! transport: TCP in production, `tokio::io::duplex` in the in-process tests.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream the driver can run a protocol over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// Resolves when the peer has closed the connection (end of stream or reset), seen
    /// without reading anything the peer sent. Pending data (a pipelined command, a TLS
    /// close_notify) means the peer may still be there: then this never resolves. A
    /// transport that cannot tell never resolves.
    fn peer_gone(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::pending()
    }
}

impl Transport for TcpStream {
    async fn peer_gone(&self) {
        let mut byte = [0u8; 1];
        match self.peek(&mut byte).await {
            Ok(0) | Err(_) => {}
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}

impl Transport for tokio::io::DuplexStream {}

/// Plain or TLS, server side (client connections) or client side (upstream).
pub enum MaybeTls<S = TcpStream> {
    /// Plaintext.
    Plain(S),
    /// TLS, accepted from a client.
    Server(Box<tokio_rustls::server::TlsStream<S>>),
    /// TLS, connected to upstream.
    Client(Box<tokio_rustls::client::TlsStream<S>>),
}

impl<S: Transport> MaybeTls<S> {
    /// The transport under TLS, if any.
    pub fn transport(&self) -> &S {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Server(s) => s.get_ref().0,
            MaybeTls::Client(s) => s.get_ref().0,
        }
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        !matches!(self, MaybeTls::Plain(_))
    }

    /// See [`Transport::peer_gone`]: a login waiting for a hashing thread is given up
    /// when its client leaves, so its job is dropped before it runs (SECURITY.md §H).
    pub async fn peer_gone(&self) {
        self.transport().peer_gone().await
    }
}

impl<S: Transport> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: Transport> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
