//! The shell the three front pre-authentication machines share (`imap`, `pop3`,
//! `sieve`): the buffers, the TLS flags and counters, the phases around STARTTLS/STLS and
//! the credential check, and the parts of [`Machine`](crate::proto::Machine) that do not
//! depend on the protocol. Each protocol keeps its own command and SASL states
//! (`Phase::Open`), replies and limits; written once here, the rules that guard a
//! connection before login (CVE-2011-0411, buffered passwords wiped, no echo of another
//! protocol's request) cannot drift apart between them.

use crate::proto::sasl::Credentials;
use crate::proto::{Next, foreign};

/// What only the driver can act on; each front names it `Action` with its own reply
/// type `R` (`imap::AuthReply`, …).
#[derive(Debug)]
pub enum Action<R> {
    /// Check these credentials, then call the machine's `auth_succeeded` or `auth_failed`.
    Authenticate(Credentials),
    /// The exchange failed before any password check (malformed SASL, foreign authzid,
    /// cancel). Apply the failure delay, then call the machine's `auth_failed` with this reply.
    Refuse(R),
}

/// Where a connection is. `S` is the protocol's own state while it reads commands or a
/// SASL exchange.
#[derive(Debug)]
pub(crate) enum Phase<S> {
    /// Reading commands (or a SASL exchange) in protocol state `S`.
    Open(S),
    /// Credentials (or a refusal) are with the driver.
    Authenticating,
    /// STARTTLS/STLS was answered; the handshake is asked for once that is written.
    TlsPending,
    /// Waiting for the driver's TLS handshake; nothing read meanwhile is kept.
    AwaitTls,
    /// Logged in: the driver relays.
    Done,
    /// The connection ends once the queued output is written.
    Closed,
}

/// What the three fronts share of one client connection before authentication. `Debug`
/// shows sizes and counters, never the buffered bytes (they may hold a password).
pub(crate) struct Shell<S> {
    pub(crate) phase: Phase<S>,
    /// Bytes read and not yet consumed; may hold a password, so wiped, never just dropped.
    pub(crate) buf: Vec<u8>,
    /// Bytes queued for the client.
    pub(crate) out: Vec<u8>,
    /// The channel is encrypted (implicit TLS, or after STARTTLS/STLS).
    pub(crate) tls: bool,
    /// This listener offers STARTTLS/STLS and it was not used yet.
    pub(crate) starttls_allowed: bool,
    /// Invalid commands so far.
    pub(crate) bad: u32,
    /// Commands so far.
    pub(crate) commands: u32,
    /// Failed authentications so far.
    pub(crate) failures: u32,
    /// The first line (of the connection, or after STARTTLS) was checked for another
    /// protocol's request ([`crate::proto::foreign`]).
    pub(crate) first_line_checked: bool,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Shell<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuth")
            .field("state", &self.phase)
            .field("tls", &self.tls)
            .field("buffered", &self.buf.len())
            .field("pending_output", &self.out.len())
            .field("bad", &self.bad)
            .field("commands", &self.commands)
            .field("failures", &self.failures)
            .finish()
    }
}

impl<S> Shell<S> {
    /// A new connection in protocol state `state`. `tls`: already encrypted (implicit
    /// TLS); `starttls_allowed`: the listener offers STARTTLS (never inside TLS).
    pub(crate) fn new(state: S, tls: bool, starttls_allowed: bool) -> Shell<S> {
        Shell {
            phase: Phase::Open(state),
            buf: Vec::new(),
            out: Vec::new(),
            tls,
            starttls_allowed: starttls_allowed && !tls,
            bad: 0,
            commands: 0,
            failures: 0,
            first_line_checked: false,
        }
    }

    /// [`Machine::feed`](crate::proto::Machine::feed): keeps `bytes` unless TLS is being
    /// set up or the exchange is over; more than `max` buffered bytes close the
    /// connection with `overflow`.
    pub(crate) fn feed(&mut self, bytes: &[u8], max: usize, overflow: &str) {
        match self.phase {
            // Plaintext that arrives while TLS is being set up is never executed (CVE-2011-0411).
            Phase::TlsPending | Phase::AwaitTls | Phase::Done | Phase::Closed => {}
            Phase::Open(_) | Phase::Authenticating => {
                self.buf.extend_from_slice(bytes);
                if self.buf.len() > max {
                    self.close_with(overflow);
                }
            }
        }
    }

    /// The part of [`Machine::next`](crate::proto::Machine::next) that needs no protocol:
    /// queued output first, then what the phase asks for. `None`: the protocol steps.
    fn poll<E>(&mut self) -> Option<Next<E>> {
        if !self.out.is_empty() {
            return Some(Next::Write(std::mem::take(&mut self.out)));
        }
        match self.phase {
            Phase::Closed => Some(Next::Close),
            Phase::Done | Phase::AwaitTls | Phase::Authenticating => Some(Next::NeedInput),
            Phase::TlsPending => {
                self.phase = Phase::AwaitTls;
                self.wipe_buf();
                Some(Next::StartTls)
            }
            Phase::Open(_) => None,
        }
    }

    /// [`Machine::tls_started`](crate::proto::Machine::tls_started): after a STARTTLS
    /// handshake the session starts over, encrypted, in protocol state `state`. Whether it
    /// did (`false`: no STARTTLS was pending, nothing changed).
    pub(crate) fn tls_restarted(&mut self, state: S) -> bool {
        if !matches!(self.phase, Phase::AwaitTls) {
            return false;
        }
        self.tls = true;
        self.starttls_allowed = false;
        self.wipe_buf();
        self.phase = Phase::Open(state);
        self.first_line_checked = false;
        true
    }

    /// Queues `reply` to STARTTLS/STLS; the handshake follows once it is written.
    pub(crate) fn start_tls(&mut self, reply: &str) {
        self.out.extend_from_slice(reply.as_bytes());
        // Anything pipelined after STARTTLS is dropped, never executed inside TLS.
        self.wipe_buf();
        self.phase = Phase::TlsPending;
    }

    /// Queues `line` (if any) and ends the connection; the buffered input is wiped.
    pub(crate) fn close_with(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.wipe_buf();
        self.phase = Phase::Closed;
    }

    /// Empties the buffer, zeroing it first (it may hold a password).
    pub(crate) fn wipe_buf(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf);
    }

    /// The checks before a command is read: `Some(NeedInput)` while the buffer is empty or
    /// the first line is undecided, `Some(Close)` (nothing echoed) for another protocol's
    /// request ([`foreign::gate`]); `None`: go on.
    pub(crate) fn gate<E>(&mut self) -> Option<Next<E>> {
        if self.buf.is_empty() {
            return Some(Next::NeedInput);
        }
        match foreign::gate(&mut self.first_line_checked, &self.buf) {
            foreign::Gate::Go => None,
            foreign::Gate::Wait => Some(Next::NeedInput),
            foreign::Gate::Close => {
                self.close_with("");
                Some(Next::Close)
            }
        }
    }

    /// Queues `reply` to an invalid command and counts it; the `max`th closes the
    /// connection with `bye`.
    pub(crate) fn bad_command(&mut self, reply: &str, max: u32, bye: &str) {
        self.out.extend_from_slice(reply.as_bytes());
        self.bad += 1;
        if self.bad >= max {
            self.close_with(bye);
        }
    }

    /// Whether the connection ended (or ends once the queued output is written).
    pub(crate) fn closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether credentials (or a refusal) are with the driver.
    pub(crate) fn authenticating(&self) -> bool {
        matches!(self.phase, Phase::Authenticating)
    }

    /// Sets protocol state `state` (reading commands or a SASL exchange) and returns the
    /// one it replaces, if the phase was [`Phase::Open`].
    pub(crate) fn replace(&mut self, state: S) -> Option<S> {
        match std::mem::replace(&mut self.phase, Phase::Open(state)) {
            Phase::Open(old) => Some(old),
            _ => None,
        }
    }

    /// Hands `creds` to the driver to check; the machine waits for its answer.
    pub(crate) fn authenticate<R>(&mut self, creds: Credentials) -> Next<Action<R>> {
        self.phase = Phase::Authenticating;
        Next::Event(Action::Authenticate(creds))
    }

    /// Hands a refusal before any password check to the driver (it applies the failure
    /// delay); the machine waits for its answer.
    pub(crate) fn refuse<R>(&mut self, reply: R) -> Next<Action<R>> {
        self.phase = Phase::Authenticating;
        Next::Event(Action::Refuse(reply))
    }

    /// The credentials were accepted: queues `line`, and returns the bytes the client
    /// pipelined after its login (they belong to the upstream session, untouched). Outside
    /// [`Phase::Authenticating`] nothing happens.
    pub(crate) fn succeeded(&mut self, line: &str) -> Vec<u8> {
        if !self.authenticating() {
            return Vec::new();
        }
        self.out.extend_from_slice(line.as_bytes());
        self.phase = Phase::Done;
        std::mem::take(&mut self.buf)
    }

    /// The credentials were refused: queues `line` and reads commands again in `state`;
    /// the `max`th failure closes the connection with `bye`. Call only while
    /// [`Shell::authenticating`].
    pub(crate) fn failed(&mut self, line: &str, state: S, max: u32, bye: &str) {
        self.phase = Phase::Open(state);
        self.out.extend_from_slice(line.as_bytes());
        self.failures += 1;
        if self.failures >= max {
            self.close_with(bye);
        }
    }
}

/// [`Machine::next`](crate::proto::Machine::next) of a front: the shared phases through
/// [`Shell`], and `step` (the protocol's, called in [`Phase::Open`]) until something needs
/// the driver. `step` returns `None` to be called again; a `NeedInput` while output is
/// queued writes that first.
pub(crate) fn next<M, S, E>(
    machine: &mut M,
    shell: fn(&mut M) -> &mut Shell<S>,
    step: fn(&mut M) -> Option<Next<E>>,
) -> Next<E> {
    loop {
        if let Some(next) = shell(machine).poll() {
            return next;
        }
        if let Some(next) = step(machine) {
            if matches!(next, Next::NeedInput) && !shell(machine).out.is_empty() {
                continue;
            }
            return next;
        }
    }
}
