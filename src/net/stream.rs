//! A connection that starts in plaintext and may switch to TLS (STARTTLS), over any
//! transport: TCP in production, `tokio::io::duplex` in the in-process tests.

use std::future::Future;
use std::mem::MaybeUninit;
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

/// Reads ahead from a client's transport, so that TLS (rustls asks for 4 KiB at a time)
/// costs one read system call per 32 KiB that has arrived instead of one per 4 KiB.
///
/// The read lands in an uninitialised buffer on the thread's stack (nothing to zero, nothing
/// allocated when the socket has nothing); only what the caller could not take yet is kept,
/// in a heap buffer of exactly that size that is freed once drained. An idle connection
/// holds no buffer.
pub struct ReadAhead<S> {
    inner: S,
    kept: Option<Box<[u8]>>,
    pos: usize,
}

/// How much one read of a [`ReadAhead`] takes from the socket at most.
const READ_AHEAD: usize = 32 * 1024;

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead { inner, kept: None, pos: 0 }
    }

    /// Copies what is kept into `out`; frees the buffer once it is drained.
    fn drain_into(&mut self, out: &mut ReadBuf<'_>) {
        if let Some(kept) = &self.kept {
            let n = out.remaining().min(kept.len() - self.pos);
            out.put_slice(&kept[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == kept.len() {
                self.kept = None;
                self.pos = 0;
            }
        }
    }
}

impl<S: Transport> Transport for ReadAhead<S> {
    async fn peer_gone(&self) {
        if self.kept.is_some() {
            // Bytes the client sent are still waiting: it may still be there.
            return std::future::pending::<()>().await;
        }
        self.inner.peer_gone().await
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.kept.is_some() {
            this.drain_into(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut rb = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let got = rb.filled();
                let n = got.len().min(out.remaining());
                out.put_slice(&got[..n]);
                if n < got.len() {
                    this.kept = Some(got[n..].into());
                    this.pos = 0;
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads get every byte in order; the buffer is gone once drained, so an idle
    /// connection holds none.
    #[tokio::test]
    async fn read_ahead_keeps_order_and_frees_its_buffer() {
        let (mut far, near) = tokio::io::duplex(128 * 1024);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut r = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            if got.is_empty() {
                let kept = r.kept.as_ref().map_or(0, |k| k.len());
                assert_eq!(n + kept, READ_AHEAD, "one read took 32 KiB and kept what the caller did not take");
            }
            got.extend_from_slice(&small[..n]);
            if r.kept.is_none() {
                assert_eq!(r.pos, 0, "a drained buffer is freed");
            }
        }
        assert_eq!(got, data);
        assert!(r.kept.is_none(), "nothing held after the end");
    }
}
