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

// ---------------------------------------------------------------------------------------
// Restricted IMAP sessions (issue 20)
// ---------------------------------------------------------------------------------------

/// Bytes read at once from either side of a filtered session.
const FILTER_READ: usize = 16 * 1024;
/// Bytes waiting for one side before the other is no longer read (backpressure).
const FILTER_PENDING: usize = 256 * 1024;
/// How long upstream may take to name its hierarchy delimiter.
const DELIMITER_WAIT: Duration = Duration::from_secs(30);
/// The tag of mailgate's own `LIST "" ""` (sent before any client command).
const DELIMITER_TAG: &[u8] = b"mg0";

/// A logged-in IMAP session limited by an app password's [`Restriction`] (read-only,
/// folder-limited): the raw relay's twin with both halves of `proto::imap_filter` in the
/// loop (ARCHITECTURE.md "Restricted IMAP sessions"). What upstream already sent goes
/// through the response filter, `pipelined` (what the client sent behind LOGIN) through
/// the command filter; with a folder set, upstream's hierarchy delimiter is asked first
/// (`LIST "" ""`). The same ends as [`relay_session`]: a side closes, the [`LiveGuard`]
/// fires, the client idles for `idle`, [`MAX_SESSION`]; and a client that floods before a
/// continuation gets the filter's `* BYE`.
///
/// Unlike the raw relay it keeps its two 16 KiB read buffers (and the filters' state) for
/// the session's life; only restricted sessions pay for that, and there are few.
///
/// [`Restriction`]: crate::proto::imap_filter::Restriction
pub async fn filtered_session<S: Transport, U: Relayed>(
    mut client: MaybeTls<S>,
    upstream: U,
    pipelined: Vec<u8>,
    mut live: LiveGuard,
    who: &Authenticated,
    idle: Duration,
    goodbye: impl Fn(Goodbye) -> &'static [u8] + Send,
) -> Result<(), DriveError> {
    use crate::proto::imap_filter::FolderSet;
    let (mut upstream, leftover) = upstream.into_relay_parts();
    let wants_folders = who.narrowing().is_some_and(|n| !n.folders.is_empty());
    let (delimiter, leftover) = if wants_folders {
        match tokio::time::timeout(DELIMITER_WAIT, ask_delimiter(&mut upstream, leftover)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                debug!(user = %who.username(), error = %e, "upstream did not name its delimiter");
                return end_filtered(client, upstream, Some(Goodbye::Shutdown), &goodbye).await;
            }
            Err(_) => return end_filtered(client, upstream, Some(Goodbye::Shutdown), &goodbye).await,
        }
    } else {
        (FolderSet::DEFAULT_DELIMITER, leftover)
    };
    let rules = match who.restriction(delimiter) {
        Ok(r) => r,
        Err(e) => {
            // Patterns that were checked at create but do not fit upstream's delimiter:
            // fail closed.
            info!(user = %who.username(), error = %e, "session refused: folder limits unusable with upstream's delimiter");
            return end_filtered(client, upstream, Some(Goodbye::Shutdown), &goodbye).await;
        }
    };
    let mut f = Filtered::new(rules, live.relay_meter());
    f.upstream_sent(&leftover);
    f.client_sent(&pipelined);
    drop((leftover, pipelined));
    let last = f.run(&mut client, &mut upstream, &mut live, who, idle).await;
    end_filtered(client, upstream, last, &goodbye).await
}

async fn end_filtered<S: Transport>(
    mut client: MaybeTls<S>,
    mut upstream: MaybeTls,
    last: Option<Goodbye>,
    goodbye: &(impl Fn(Goodbye) -> &'static [u8] + Send),
) -> Result<(), DriveError> {
    if let Some(why) = last {
        let _ = tokio::time::timeout(Duration::from_secs(2), client.write_all(goodbye(why))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), upstream.shutdown()).await;
    Ok(())
}

/// Sends `mg0 LIST "" ""` and reads up to its tagged reply: upstream's hierarchy
/// delimiter (`/` when it has none), and every other byte read (for the client, through
/// the response filter), `already` first.
async fn ask_delimiter(upstream: &mut MaybeTls, already: Vec<u8>) -> io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut cmd = DELIMITER_TAG.to_vec();
    cmd.extend_from_slice(b" LIST \"\" \"\"\r\n");
    upstream.write_all(&cmd).await?;
    upstream.flush().await?;
    let mut other = already;
    let mut buf: Vec<u8> = Vec::new();
    let mut delimiter = None;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..end + 2).collect();
            if let Some(rest) = line.strip_prefix(DELIMITER_TAG).and_then(|r| r.strip_prefix(b" ")) {
                let _ = rest;
                other.extend_from_slice(&buf);
                return Ok((delimiter.unwrap_or(crate::proto::imap_filter::FolderSet::DEFAULT_DELIMITER), other));
            }
            match list_delimiter(&line) {
                Some(d) if delimiter.is_none() => delimiter = d,
                _ => other.extend_from_slice(&line),
            }
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no reply to LIST \"\" \"\""));
        }
        let n = upstream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The delimiter of a `* LIST (...) "d" ""` line: `Some(Some(d))`, `Some(None)` for
/// `NIL` (a flat namespace), `None` for any other line.
fn list_delimiter(line: &[u8]) -> Option<Option<u8>> {
    let head = line.get(..8)?;
    if !head.eq_ignore_ascii_case(b"* LIST (") {
        return None;
    }
    let close = line.iter().position(|b| *b == b')')?;
    let rest = line.get(close + 1..)?.strip_prefix(b" ")?;
    if rest.get(..3).is_some_and(|n| n.eq_ignore_ascii_case(b"NIL")) {
        return Some(None);
    }
    match rest {
        [b'"', b'\\', d, b'"', ..] => Some(Some(*d)),
        [b'"', d, b'"', ..] => Some(Some(*d)),
        _ => None,
    }
}

/// One write of `pending` (`Some(bytes taken)`), or with nothing pending a flush
/// (`None`); either is one operation, so a `select!` may drop it.
async fn write_or_flush<W: AsyncWrite + Unpin>(w: &mut W, pending: &[u8]) -> io::Result<Option<usize>> {
    if pending.is_empty() {
        w.flush().await?;
        return Ok(None);
    }
    match w.write(pending).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(Some(n)),
    }
}

/// Both filter halves and the bytes waiting for each side.
struct Filtered {
    cmds: crate::proto::imap_filter::CommandFilter,
    resps: crate::proto::imap_filter::ResponseFilter,
    to_upstream: Vec<u8>,
    to_client: Vec<u8>,
    /// The command filter closed the session (its `* BYE` is in `to_client`).
    closing: bool,
    meter: Option<RelayMeter>,
}

impl Filtered {
    fn new(rules: crate::proto::imap_filter::Restriction, meter: Option<RelayMeter>) -> Filtered {
        Filtered {
            cmds: crate::proto::imap_filter::CommandFilter::new(rules.clone()),
            resps: crate::proto::imap_filter::ResponseFilter::new(rules),
            to_upstream: Vec::new(),
            to_client: Vec::new(),
            closing: false,
            meter,
        }
    }

    fn client_sent(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            crate::proto::Machine::feed(&mut self.cmds, bytes);
            self.pump();
        }
    }

    fn upstream_sent(&mut self, mut bytes: &[u8]) {
        // Message data the response filter would pass unchanged goes straight to the
        // client's queue (one copy, no feed, no allocation).
        let direct = usize::try_from(self.resps.passthrough()).unwrap_or(usize::MAX).min(bytes.len());
        if direct > 0 {
            let (now, rest) = bytes.split_at(direct);
            self.to_client.extend_from_slice(now);
            self.resps.passed(direct as u64);
            bytes = rest;
        }
        if !bytes.is_empty() {
            crate::proto::Machine::feed(&mut self.resps, bytes);
            self.pump();
        }
    }

    /// Runs both machines until neither has anything more (the loop of
    /// `imap_filter_tests::session`).
    fn pump(&mut self) {
        use crate::proto::imap_filter::{Seen, ToUpstream};
        use crate::proto::{Machine, Next};
        loop {
            let mut progress = false;
            loop {
                match self.cmds.next() {
                    Next::Write(b) => self.resps.inject(&b),
                    Next::Event(ToUpstream(b)) => self.to_upstream.extend_from_slice(&b),
                    Next::Close => {
                        self.closing = true;
                        break;
                    }
                    Next::NeedInput | Next::StartTls => break,
                }
                progress = true;
            }
            loop {
                match self.resps.next() {
                    Next::Write(b) => self.to_client.extend_from_slice(&b),
                    Next::Event(Seen::Continuation) => self.cmds.upstream_continuation(),
                    Next::Event(Seen::Tagged(t)) => self.cmds.upstream_tagged(&t),
                    Next::NeedInput | Next::Close | Next::StartTls => break,
                }
                progress = true;
            }
            if !progress || self.closing {
                break;
            }
        }
    }

    /// The loop: reads both sides while the other side's queue is short, writes what is
    /// queued, until a side ends, the client idles out, the session is ended by mailgate
    /// (the goodbye to send) or the filter closes it.
    async fn run<S: Transport>(
        &mut self,
        client: &mut MaybeTls<S>,
        upstream: &mut MaybeTls,
        live: &mut LiveGuard,
        who: &Authenticated,
        idle: Duration,
    ) -> Option<Goodbye> {
        use tokio::io::AsyncReadExt;
        let mut cbuf = vec![0u8; FILTER_READ];
        let mut ubuf = vec![0u8; FILTER_READ];
        let mut last_client = Instant::now();
        let (mut flush_client, mut flush_upstream) = (false, false);
        let (mut client_eof, mut upstream_eof) = (false, false);
        let until = Instant::now() + MAX_SESSION;
        // Halves, so that a read and a write of one side can wait at once.
        let (mut client_r, mut client) = tokio::io::split(&mut *client);
        let (mut upstream_r, mut upstream) = tokio::io::split(&mut *upstream);
        loop {
            if (self.closing || upstream_eof) && self.to_client.is_empty() {
                let _ = client.flush().await;
                return None;
            }
            if client_eof && self.to_upstream.is_empty() {
                let _ = upstream.flush().await;
                return None;
            }
            let read_client = !client_eof && !self.closing && self.to_upstream.len() < FILTER_PENDING;
            let read_upstream = !upstream_eof && self.to_client.len() < FILTER_PENDING;
            tokio::select! {
                r = client_r.read(&mut cbuf), if read_client => match r {
                    Ok(0) | Err(_) => client_eof = true,
                    Ok(n) => {
                        last_client = Instant::now();
                        if let Some(m) = &self.meter {
                            m.from_client.inc_by(n as u64);
                        }
                        self.client_sent(cbuf.get(..n).unwrap_or_default());
                    }
                },
                r = upstream_r.read(&mut ubuf), if read_upstream => match r {
                    Ok(0) | Err(_) => upstream_eof = true,
                    Ok(n) => {
                        if let Some(m) = &self.meter {
                            m.to_client.inc_by(n as u64);
                        }
                        self.upstream_sent(ubuf.get(..n).unwrap_or_default());
                    }
                },
                r = write_or_flush(&mut client, &self.to_client), if flush_client || !self.to_client.is_empty() => match r {
                    Ok(Some(n)) => {
                        self.to_client.drain(..n);
                        flush_client = true;
                    }
                    Ok(None) => flush_client = false,
                    Err(_) => return None,
                },
                r = write_or_flush(&mut upstream, &self.to_upstream), if flush_upstream || !self.to_upstream.is_empty() => match r {
                    Ok(Some(n)) => {
                        self.to_upstream.drain(..n);
                        flush_upstream = true;
                    }
                    Ok(None) => flush_upstream = false,
                    Err(_) => return None,
                },
                _ = tokio::time::sleep_until(last_client + idle) => {
                    info!(user = %who.username(), "session ended: idle too long");
                    return Some(Goodbye::Idle);
                },
                reason = live.ended() => return match reason {
                    crate::live::EndReason::Shutdown => Some(Goodbye::Shutdown),
                    crate::live::EndReason::Revoked => {
                        info!(user = %who.username(), "session ended: access revoked");
                        Some(Goodbye::Revoked)
                    }
                },
                _ = tokio::time::sleep_until(until) => return Some(Goodbye::TooLong),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Authenticated {
        Authenticated::for_tests("alice@example.com", None)
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[test]
    fn upstreams_delimiter_is_read_from_its_list_reply() {
        assert_eq!(list_delimiter(b"* LIST (\\Noselect) \".\" \"\"\r\n"), Some(Some(b'.')));
        assert_eq!(list_delimiter(b"* list () \"/\" \"\"\r\n"), Some(Some(b'/')));
        assert_eq!(list_delimiter(b"* LIST () \"\\\\\" \"\"\r\n"), Some(Some(b'\\')));
        assert_eq!(list_delimiter(b"* LIST () NIL \"\"\r\n"), Some(None));
        assert_eq!(list_delimiter(b"* OK still here\r\n"), None);
    }

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
