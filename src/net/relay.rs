//! The post-login byte relay between a client and its upstream session.
//!
//! Large buffers make bulk transfer fast (64 KiB per read: fewer TLS records, fewer
//! syscalls), but most mail sessions sit in IDLE for hours; a relay that keeps two 64 KiB
//! buffers per session (as `tokio::io::copy_bidirectional_with_sizes` does) holds 128 KiB
//! for every idle phone. Here a direction borrows a buffer from a shared pool only while
//! data flows: it is taken when a read starts and given back as soon as the source has
//! nothing more to give and everything read has been written. An idle session holds no
//! relay buffer at all (PERFORMANCE.md M1, B1).
//!
//! Written by hand because tokio's `copy_bidirectional*` keep their buffers for the life
//! of the session. The logic follows tokio's `CopyBuffer` (read, write everything, flush
//! when the source would block, shut the writer down at end of stream).
//!
//! It also keeps the time of the client's last byte, for the IMAP autologout timer
//! (RFC 9051 §5.4, SECURITY.md case 59).

use crate::auth::Authenticated;
use crate::live::LiveGuard;
use crate::metrics::RelayMeter;
use crate::net::driver::DriveError;
use crate::net::stream::{MaybeTls, Transport};
use crate::proto::Goodbye;
use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, info};

/// Size of one relay buffer: a full TLS record is 16 KiB; 64 KiB reads let rustls and the
/// kernel work in large batches.
pub const BUF_SIZE: usize = 64 * 1024;
/// Free buffers kept for reuse (4 MiB); more than this many at once are freed when given back.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buf() -> Box<[u8]> {
    if let Ok(mut pool) = POOL.lock()
        && let Some(b) = pool.pop()
    {
        return b;
    }
    vec![0u8; BUF_SIZE].into_boxed_slice()
}

fn give_buf(b: Box<[u8]>) {
    if let Ok(mut pool) = POOL.lock()
        && pool.len() < POOL_MAX
    {
        pool.push(b);
    }
}

/// One direction of the relay.
#[derive(Default)]
struct Half {
    /// Present only while bytes read are waiting to be written (or a read is in progress).
    buf: Option<Box<[u8]>>,
    pos: usize,
    len: usize,
    /// The source reached end of stream.
    eof: bool,
    /// Bytes were written since the last flush.
    need_flush: bool,
    /// The writer was shut down after end of stream.
    done: bool,
    /// Bytes carried.
    total: u64,
}

impl Half {
    /// Moves bytes from `r` to `w` until `r` would block (Pending) or ends (Ready).
    /// `seen` is called whenever bytes were read; `meter` (`mailgate_relayed_bytes_total`)
    /// gets each read's length: a shared atomic, one relaxed add per read, no lock and
    /// no allocation.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        seen: &mut dyn FnMut(),
        meter: Option<&Counter>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Write out what is buffered.
            while self.pos < self.len {
                let Some(buf) = self.buf.as_deref() else { break };
                let n = ready!(w.as_mut().poll_write(cx, &buf[self.pos..self.len]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Read more, into a buffer borrowed for as long as data keeps coming.
            let mut buf = self.buf.take().unwrap_or_else(take_buf);
            let mut rb = ReadBuf::new(&mut buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.pos = 0;
                    self.len = n;
                    if n == 0 {
                        self.eof = true;
                        give_buf(buf);
                    } else {
                        self.total += n as u64;
                        if let Some(m) = meter {
                            m.inc_by(n as u64);
                        }
                        seen();
                        self.buf = Some(buf);
                    }
                }
                Poll::Ready(Err(e)) => {
                    give_buf(buf);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    // Nothing to read: the buffer goes back, and what was written is
                    // pushed out (TLS keeps records until flushed).
                    give_buf(buf);
                    self.pos = 0;
                    self.len = 0;
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Half {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
    }
}

/// Why a relay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides finished (each end of stream was passed on).
    Closed,
    /// The client sent nothing for the idle limit.
    Idle,
}

/// Bytes carried, client → upstream and upstream → client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub up: u64,
    pub down: u64,
}

/// Copies bytes both ways between `client` and `upstream` until both directions have
/// ended, an I/O error occurs, or the client has sent nothing for `idle`.
pub struct Relay<'a, C: ?Sized, U: ?Sized> {
    client: &'a mut C,
    upstream: &'a mut U,
    up: Half,
    down: Half,
    idle: Duration,
    last_client_byte: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The protocol's byte counters (`None`: not counted).
    meter: Option<RelayMeter>,
}

impl<'a, C, U> Relay<'a, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// A relay for the verified login `who`; `idle` is the client inactivity limit.
    ///
    /// Only a login that passed the gate is relayed: the proof cannot be made outside
    /// `auth`, and a name will not do.
    ///
    /// ```compile_fail
    /// # async fn f(mut client: tokio::io::DuplexStream, mut upstream: tokio::io::DuplexStream) {
    /// use mailgate::net::relay::Relay;
    /// let idle = std::time::Duration::from_secs(60);
    /// let relay = Relay::new(&mut client, &mut upstream, idle, "alice@example.com");
    /// # }
    /// ```
    ///
    /// ```compile_fail
    /// # async fn f(mut client: tokio::io::DuplexStream, mut upstream: tokio::io::DuplexStream) {
    /// use mailgate::{auth::Authenticated, net::relay::Relay};
    /// let who = Authenticated { username: "alice@example.com".into(), app_password_id: None, senders: vec![] };
    /// let relay = Relay::new(&mut client, &mut upstream, std::time::Duration::from_secs(60), &who);
    /// # }
    /// ```
    pub fn new(client: &'a mut C, upstream: &'a mut U, idle: Duration, who: &Authenticated) -> Self {
        let _ = who;
        let now = Instant::now();
        Relay {
            client,
            upstream,
            up: Half::default(),
            down: Half::default(),
            idle,
            last_client_byte: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            meter: None,
        }
    }

    /// Adds the bytes carried to `meter`'s counters.
    pub fn metered(mut self, meter: Option<RelayMeter>) -> Self {
        self.meter = meter;
        self
    }

    /// Bytes carried so far.
    pub fn carried(&self) -> Carried {
        Carried { up: self.up.total, down: self.down.total }
    }
}

impl<C, U> Future for Relay<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<RelayEnd>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut seen_client = false;
        let (from_client, to_client) = match this.meter.as_deref() {
            Some(m) => (Some(&m.from_client), Some(&m.to_client)),
            None => (None, None),
        };
        let up = this.up.poll_copy(
            cx,
            Pin::new(&mut *this.client),
            Pin::new(&mut *this.upstream),
            &mut || seen_client = true,
            from_client,
        );
        if seen_client {
            this.last_client_byte = Instant::now();
        }
        let down =
            this.down.poll_copy(cx, Pin::new(&mut *this.upstream), Pin::new(&mut *this.client), &mut || {}, to_client);
        match (up, down) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => return Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(RelayEnd::Closed)),
            _ => {}
        }
        // The autologout timer is moved forward lazily: only when it fires is it checked
        // against the time of the client's last byte.
        while this.timer.as_mut().poll(cx).is_ready() {
            let due = this.last_client_byte + this.idle;
            if Instant::now() >= due {
                return Poll::Ready(Ok(RelayEnd::Idle));
            }
            this.timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

/// The longest a proxied session lives (nginx `proxy_timeout 24h`).
pub const MAX_SESSION: Duration = Duration::from_secs(24 * 3600);

/// An upstream session logged in as the user, ready for the relay.
pub trait Relayed: Send {
    /// The connection, and the bytes already read from it that belong to the client.
    fn into_relay_parts(self) -> (MaybeTls, Vec<u8>);
}

/// A logged-in session to its end, for every protocol that relays after login (IMAP,
/// POP3): what upstream already sent goes to the client, `pipelined` (what
/// the client sent behind its login) upstream, then the bytes are copied both ways until
/// a side closes, the [`LiveGuard`] fires (revocation, shutdown), the client idles for
/// `idle`, or [`MAX_SESSION`] passes. When mailgate ends it, the client gets
/// `goodbye(why)`, the protocol's last line. Needs the proof of authentication. The
/// bytes carried are counted in the byte counters the [`LiveGuard`] carries.
pub async fn relay_session<S: Transport, U: Relayed>(
    mut client: MaybeTls<S>,
    upstream: U,
    pipelined: Vec<u8>,
    mut live: LiveGuard,
    who: &Authenticated,
    idle: Duration,
    goodbye: impl Fn(Goodbye) -> &'static [u8] + Send,
) -> Result<(), DriveError> {
    let (mut upstream, leftover) = upstream.into_relay_parts();
    if let Some(m) = live.relay_meter() {
        m.to_client.inc_by(leftover.len() as u64);
        m.from_client.inc_by(pipelined.len() as u64);
    }
    if !leftover.is_empty() {
        client.write_all(&leftover).await?;
    }
    drop(leftover);
    if !pipelined.is_empty() {
        upstream.write_all(&pipelined).await?;
    }
    drop(pipelined);
    let last = carry(&mut client, &mut upstream, &mut live, who, idle).await;
    if let Some(why) = last {
        let _ = tokio::time::timeout(Duration::from_secs(2), client.write_all(goodbye(why))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), upstream.shutdown()).await;
    Ok(())
}

/// The relay itself, raced against revocation and the session's longest life; the
/// goodbye to send, if the session is ended by mailgate.
async fn carry<S: Transport>(
    client: &mut MaybeTls<S>,
    upstream: &mut MaybeTls,
    live: &mut LiveGuard,
    who: &Authenticated,
    idle: Duration,
) -> Option<Goodbye> {
    let mut relay = Relay::new(client, upstream, idle, who).metered(live.relay_meter());
    tokio::select! {
        r = &mut relay => match r {
            Ok(RelayEnd::Closed) => None,
            Ok(RelayEnd::Idle) => {
                info!(user = %who.username(), "session ended: idle too long");
                Some(Goodbye::Idle)
            }
            Err(e) => {
                debug!(user = %who.username(), error = %e, "relay ended");
                None
            }
        },
        reason = live.ended() => match reason {
            crate::live::EndReason::Shutdown => Some(Goodbye::Shutdown),
            crate::live::EndReason::Revoked => {
                info!(user = %who.username(), "session ended: access revoked");
                Some(Goodbye::Revoked)
            }
        },
        _ = tokio::time::sleep(MAX_SESSION) => Some(Goodbye::TooLong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Authenticated {
        Authenticated::for_tests("alice@example.com", None)
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn carries_both_ways_and_passes_end_of_stream_on() {
        let (mut client, mut client_far) = duplex(1024);
        let (mut upstream, mut upstream_far) = duplex(1024);
        let meter = RelayMeter::default();
        let counted = meter.clone();
        let task = tokio::spawn(async move {
            let mut relay =
                Relay::new(&mut client_far, &mut upstream_far, Duration::from_secs(60), &who()).metered(Some(meter));
            let end = (&mut relay).await;
            (end.map_err(|e| e.to_string()), relay.carried())
        });
        // More than a buffer, through pipes smaller than one, both ways at once.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < big.len() {
            let n = upstream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "upstream saw end of stream early");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, big);
        assert_eq!(upstream.read(&mut chunk).await.unwrap(), 0, "client end of stream passed on");
        upstream.write_all(b"* BYE bye\r\n").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"* BYE bye\r\n");
        let (end, carried) = task.await.unwrap();
        assert_eq!(end, Ok(RelayEnd::Closed));
        assert_eq!(carried, Carried { up: 300_000, down: 11 });
        // The metric's counters saw every byte, per direction.
        assert_eq!((counted.from_client.get(), counted.to_client.get()), (300_000, 11));
    }

    #[tokio::test]
    async fn an_idle_session_holds_no_buffer() {
        let (mut client, mut client_far) = duplex(1 << 20);
        let (mut upstream, mut upstream_far) = duplex(1 << 20);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, bool)>(4);
        let task = tokio::spawn(async move {
            let mut relay = Relay::new(&mut client_far, &mut upstream_far, Duration::from_secs(60), &who());
            loop {
                tokio::select! {
                    r = &mut relay => return r.map_err(|e| e.to_string()),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        let _ = tx.send((relay.up.buf.is_some(), relay.down.buf.is_some())).await;
                    }
                }
            }
        });
        client.write_all(&vec![7u8; 200_000]).await.unwrap();
        let mut got = vec![0u8; 200_000];
        upstream.read_exact(&mut got).await.unwrap();
        upstream.write_all(&vec![9u8; 100_000]).await.unwrap();
        let mut back = vec![0u8; 100_000];
        client.read_exact(&mut back).await.unwrap();
        // Both directions have nothing to do now: soon neither holds a buffer, and from then
        // on none comes back while the session is idle (sampled by the relay's own task, so
        // no other test's use of the shared pool can make this pass).
        let mut idle = 0;
        for _ in 0..100 {
            match rx.recv().await.unwrap() {
                (false, false) => idle += 1,
                held => assert_eq!(idle, 0, "a buffer {held:?} came back while idle"),
            }
            if idle == 5 {
                break;
            }
        }
        assert_eq!(idle, 5, "buffers kept while idle");
        drop(client);
        drop(upstream);
        assert_eq!(task.await.unwrap(), Ok(RelayEnd::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn client_silence_ends_the_session_but_upstream_chatter_does_not_keep_it() {
        let (mut client, mut client_far) = duplex(1024);
        let (mut upstream, mut upstream_far) = duplex(1024);
        let idle = Duration::from_secs(30 * 60);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut relay = Relay::new(&mut client_far, &mut upstream_far, idle, &who());
            (&mut relay).await.map_err(|e| e.to_string())
        });
        // The client speaks at 20 min; upstream says "still here" every 2 min throughout.
        let chatter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(120)).await;
                if upstream.write_all(b"* OK Still here\r\n").await.is_err() {
                    return;
                }
                let mut b = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_millis(1), upstream.read(&mut b)).await;
            }
        });
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20 * 60)).await;
            client.write_all(b"DONE\r\n").await.unwrap();
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
            client
        });
        assert_eq!(task.await.unwrap(), Ok(RelayEnd::Idle));
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(50 * 60) && took < Duration::from_secs(51 * 60), "{took:?}");
        chatter.abort();
        reader.abort();
    }
}
