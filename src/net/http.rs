//! One HTTP/1.1 request on a connection the caller opened (plain TCP or TLS): hyper's
//! client drives it. Used by ACME (the CA's directory and orders) and by `mailgate check`
//! (the web step's autoconfig and `/healthz`); the callers keep their own connecting,
//! TLS, time limits and error words.

use hyper::body::{Body, Incoming};
use tokio::io::{AsyncRead, AsyncWrite};

/// Sends `request` (its URI the path; `Host` set by the caller) on `stream` and returns
/// the answer head with its body still to read. The connection lives until that body is
/// read or dropped.
pub async fn request<S, B>(stream: S, request: http::Request<B>) -> Result<http::Response<Incoming>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await
}
