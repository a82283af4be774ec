//! Sans-IO protocol code: bytes in, events and bytes out.
//!
//! Nothing here awaits, reads a clock, opens a socket or touches the store; the one
//! driver in `net` does the I/O. Depends on `secret` and protocol crates only
//! (a CI check keeps tokio, rustls and sled out of this folder).

pub mod foreign;
pub mod from_header;
pub mod imap;
pub mod imap_filter;
pub mod imap_upstream;
pub mod pop3;
pub mod pop3_upstream;
pub mod preauth;
pub mod proxy;
pub mod sasl;
pub mod sieve;
pub mod sieve_upstream;
pub mod smtp;
pub mod smtp_upstream;
#[cfg(test)]
pub(crate) mod testing;

/// What a sans-IO machine asks of the one driver (`net::driver`) next. Every protocol
/// machine (the IMAP, SMTP, POP3 and ManageSieve fronts, their upstream logins, the
/// upstream SMTP reply reader) answers [`Machine::next`] with one of these.
#[derive(Debug)]
pub enum Next<E> {
    /// Read more bytes from the peer and [`Machine::feed`] them.
    NeedInput,
    /// Write these bytes to the peer.
    Write(Vec<u8>),
    /// Everything before has been written; do the TLS handshake now, then call
    /// [`Machine::tls_started`]. Bytes the peer sent before it were discarded.
    StartTls,
    /// Close the connection (after writing what was returned before).
    Close,
    /// Something only the caller can act on (a login to check, a line for upstream, the
    /// end of an upstream login); the caller reports back through the machine's methods.
    Event(E),
}

/// Why the driver ends a connection from outside the protocol exchange; each protocol
/// words its own last line for it ([`Machine::goodbye`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    /// The deadline for logging in (or between commands) passed.
    Timeout,
    /// mailgate is shutting down.
    Shutdown,
    /// The session's access was revoked (app password, account, password change).
    Revoked,
    /// A logged-in session was silent for too long.
    Idle,
    /// A session reached the longest time one may last.
    TooLong,
}

/// A sans-IO protocol machine: bytes in, [`Next`] out. The driver in `net` runs any of
/// them over any stream; the machine never reads a clock or touches a socket.
pub trait Machine {
    /// What the caller must act on.
    type Event;
    /// Bytes read from the peer.
    fn feed(&mut self, bytes: &[u8]);
    /// The next thing to do; call again after acting on it.
    fn next(&mut self) -> Next<Self::Event>;
    /// The TLS handshake asked for by [`Next::StartTls`] completed.
    fn tls_started(&mut self);
    /// Whether the driver should pause before the next write (a client that keeps
    /// sending errors is slowed down, Postfix's `smtpd_soft_error_limit`).
    fn slow_down(&self) -> bool {
        false
    }
    /// The line the driver sends when it ends the connection for `why`; `None`: close
    /// without a word (an upstream connection).
    fn goodbye(&self, why: Goodbye) -> Option<&'static [u8]> {
        let _ = why;
        None
    }
}

/// Proptest case count for the fuzz-style property tests: `default` in a normal
/// `cargo test`, or `MAILGATE_FUZZ_CASES` for a long run (docs/security.md, "Fuzzing").
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("MAILGATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A session as arbitrary reads: up to 24 chunks drawn from `bytes` (fuzz targets).
#[cfg(test)]
pub(crate) fn chunked(
    bytes: impl proptest::strategy::Strategy<Value = Vec<u8>>,
) -> impl proptest::strategy::Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(bytes, 0..24)
}

/// The committed fuzz corpus for `kind` (`fuzz/corpus/<kind>/*`), each input cut into
/// reads in several ways: whole, byte by byte, and at every 7th byte.
#[cfg(test)]
pub(crate) fn corpus_cuts(kind: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(kind);
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let name = path.display().to_string();
        out.push((format!("{name} whole"), vec![bytes.clone()]));
        out.push((format!("{name} bytewise"), bytes.iter().map(|b| vec![*b]).collect()));
        out.push((format!("{name} by 7"), bytes.chunks(7).map(<[u8]>::to_vec).collect()));
    }
    out
}
