//! Logging in to the upstream POP3 server as the user, sans-IO.
//!
//! mailgate does not know the user's password upstream; it logs in with master
//! credentials (Dovecot master users): `AUTH PLAIN` with authzid = user
//! ([`LoginStyle::MasterSasl`]), or `USER user*master` + `PASS password`
//! ([`LoginStyle::MasterSeparator`]). Optional `STLS` first (RFC 2595), and optionally
//! Dovecot's `XCLIENT ADDR=… PORT=…` with the client's real address (Dovecot honours it
//! from `login_trusted_networks`; whether to send it is configuration, a constructor flag
//! here). Run by `net::upstream::Pop3Upstream`.
//!
//! Replies are read line by line with a hard length cap ([`MAX_LINE`]); every reply at
//! this stage is a single `+OK`/`-ERR` line (or a `+ ` continuation, which is refused).

use crate::proto::imap_upstream::LoginStyle;
use crate::proto::{Machine, Next, sasl};
use crate::secret::SecretString;
use std::net::SocketAddr;

/// Longest reply line accepted while logging in (Dovecot's own limit is 64 KiB).
pub const MAX_LINE: usize = 64 * 1024;

/// Longest text of a refusal kept for the caller (it goes to the log, maybe the client).
pub const MAX_REFUSAL_TEXT: usize = 512;

/// How the upstream login ended: the event of [`UpstreamLogin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Logged in as the user; what upstream sent after its `+OK` is in
    /// [`UpstreamLogin::into_leftover`].
    LoggedIn,
    /// Upstream refused the login with `-ERR`; its text (one printable line, response
    /// code kept, e.g. `[AUTH] Authentication failed.`).
    Refused(String),
    /// Give up: the exchange went wrong (the client gets a temporary error).
    Failed(UpstreamError),
}

/// Why the upstream login failed, other than a refused login. No variant carries text
/// from upstream or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The greeting was not `+OK`.
    #[error("upstream greeting refused (not +OK)")]
    Greeting,
    /// STLS was not accepted.
    #[error("upstream did not accept STLS")]
    StartTls,
    /// XCLIENT was refused (mailgate is not in upstream's `login_trusted_networks`).
    #[error("upstream refused XCLIENT; add mailgate to Dovecot's login_trusted_networks or turn XCLIENT off")]
    XClient,
    /// A name or password cannot be sent (control characters, or empty).
    #[error("username or master credentials contain characters that cannot be sent upstream")]
    Unsendable,
    /// A line over [`MAX_LINE`], or a reply that makes no sense here.
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
}

/// What [`Machine::next`] returns.
pub type Step = Next<Outcome>;

#[derive(Debug, PartialEq, Eq)]
enum State {
    Greeting,
    /// `STLS` sent.
    Stls,
    AwaitTls,
    /// `XCLIENT` sent.
    XClient,
    /// `AUTH PLAIN <ir>` sent.
    Auth,
    /// `USER` sent (separator style).
    User,
    /// `PASS` sent (separator style).
    Pass,
    Finished,
}

/// The upstream POP3 login exchange for one session. `Debug` never shows the master
/// password (a [`SecretString`]).
#[derive(Debug)]
pub struct UpstreamLogin {
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    starttls: bool,
    user: String,
    master_user: String,
    master_password: SecretString,
    style: LoginStyle,
    client: SocketAddr,
    xclient: bool,
    /// A name or password can't be sent: the next poll ends the login with
    /// [`UpstreamError::Unsendable`].
    unsendable: bool,
}

impl Machine for UpstreamLogin {
    type Event = Outcome;

    /// Bytes read from upstream.
    fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::AwaitTls | State::Finished) {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next step.
    fn next(&mut self) -> Step {
        loop {
            if self.unsendable {
                self.unsendable = false;
                return self.fail(UpstreamError::Unsendable);
            }
            if !self.out.is_empty() {
                return Next::Write(std::mem::take(&mut self.out));
            }
            match self.state {
                State::AwaitTls => return Next::NeedInput,
                State::Finished => return Next::Event(Outcome::Failed(UpstreamError::Protocol("poll after finish"))),
                _ => {}
            }
            let line = match self.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return Next::NeedInput,
                Err(e) => return self.fail(e),
            };
            if let Some(step) = self.on_line(&line) {
                return step;
            }
        }
    }

    /// The TLS handshake after STLS completed; continue inside TLS (POP3 sends no new
    /// greeting, RFC 2595 §4).
    fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.buf.clear();
            self.after_greeting();
        }
    }
}

impl UpstreamLogin {
    /// `user`: the mailbox to log in to; `master_user`/`master_password`: the master
    /// credentials (with [`LoginStyle::User`], the user's own password). `starttls`:
    /// send `STLS` first. `client`: the mail client's address, sent with `XCLIENT` when
    /// `xclient` is set.
    pub fn new(
        user: &str,
        master_user: &str,
        master_password: SecretString,
        style: LoginStyle,
        starttls: bool,
        client: SocketAddr,
        xclient: bool,
    ) -> UpstreamLogin {
        UpstreamLogin {
            state: State::Greeting,
            buf: Vec::new(),
            out: Vec::new(),
            starttls,
            user: user.to_string(),
            master_user: master_user.to_string(),
            master_password,
            style,
            client,
            xclient,
            unsendable: false,
        }
    }

    /// Bytes upstream sent after its last login reply (they belong to the client).
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf
    }

    fn fail(&mut self, e: UpstreamError) -> Step {
        self.finish(Outcome::Failed(e))
    }

    fn finish(&mut self, outcome: Outcome) -> Step {
        self.state = State::Finished;
        Next::Event(outcome)
    }

    /// The first line in the buffer, without its line end (CRLF, or a bare LF).
    fn next_line(&mut self) -> Result<Option<Vec<u8>>, UpstreamError> {
        match self.buf.iter().position(|b| *b == b'\n') {
            Some(pos) => {
                let end = if pos > 0 && self.buf.get(pos - 1) == Some(&b'\r') { pos - 1 } else { pos };
                if end > MAX_LINE {
                    return Err(UpstreamError::Protocol("line too long"));
                }
                let line = self.buf.get(..end).unwrap_or_default().to_vec();
                self.buf.drain(..=pos);
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE + 1 => Err(UpstreamError::Protocol("line too long")),
            None => Ok(None),
        }
    }

    fn on_line(&mut self, line: &[u8]) -> Option<Step> {
        let reply = Reply::of(line);
        match self.state {
            State::Greeting => {
                if reply != Reply::Ok {
                    return Some(self.fail(UpstreamError::Greeting));
                }
                if self.starttls {
                    self.out.extend_from_slice(b"STLS\r\n");
                    self.state = State::Stls;
                    return None;
                }
                self.after_greeting();
                None
            }
            State::Stls => match reply {
                Reply::Ok => {
                    self.state = State::AwaitTls;
                    if !self.buf.is_empty() {
                        // Bytes after the +OK, before the handshake: injected (CVE-2011-0411).
                        return Some(self.fail(UpstreamError::Protocol("data after STLS +OK")));
                    }
                    Some(Next::StartTls)
                }
                _ => Some(self.fail(UpstreamError::StartTls)),
            },
            State::XClient => match reply {
                // Dovecot 2.3 answers a client outside `login_trusted_networks` with
                // `+OK You are not from trusted IP - ignoring`: the address was not taken,
                // so it is the refusal it means (later versions say `-ERR`).
                Reply::Ok if ignored(line) => Some(self.fail(UpstreamError::XClient)),
                Reply::Ok => {
                    self.send_login();
                    None
                }
                Reply::Err(_) => Some(self.fail(UpstreamError::XClient)),
                Reply::Other => Some(self.fail(UpstreamError::Protocol("unexpected reply to XCLIENT"))),
            },
            State::Auth | State::Pass => match reply {
                Reply::Ok => Some(self.finish(Outcome::LoggedIn)),
                Reply::Err(text) => Some(self.finish(Outcome::Refused(text))),
                Reply::Other => Some(self.fail(UpstreamError::Protocol("unexpected reply to the login"))),
            },
            State::User => match reply {
                Reply::Ok => {
                    self.out.extend_from_slice(b"PASS ");
                    self.out.extend_from_slice(self.master_password.expose().as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                    self.state = State::Pass;
                    None
                }
                Reply::Err(text) => Some(self.finish(Outcome::Refused(text))),
                Reply::Other => Some(self.fail(UpstreamError::Protocol("unexpected reply to USER"))),
            },
            State::AwaitTls | State::Finished => None,
        }
    }

    /// After the greeting (and TLS): XCLIENT if configured, else the login.
    fn after_greeting(&mut self) {
        if self.xclient {
            let line = format!("XCLIENT ADDR={} PORT={}\r\n", self.client.ip(), self.client.port());
            self.out.extend_from_slice(line.as_bytes());
            self.state = State::XClient;
        } else {
            self.send_login();
        }
    }

    /// Sends the login command of the configured style, or ends with
    /// [`UpstreamError::Unsendable`] when a name or password can't go on a line.
    fn send_login(&mut self) {
        let sendable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
        match &self.style {
            LoginStyle::MasterSasl | LoginStyle::User => {
                let master_ok = matches!(self.style, LoginStyle::User) || sendable(&self.master_user);
                if !sendable(&self.user) || !master_ok {
                    return self.unsendable();
                }
                let payload = match self.style {
                    // authzid empty, authcid = the user, with the user's own password.
                    LoginStyle::User => sasl::encode_plain("", &self.user, &self.master_password),
                    _ => sasl::encode_plain(&self.user, &self.master_user, &self.master_password),
                };
                self.out.extend_from_slice(format!("AUTH PLAIN {payload}\r\n").as_bytes());
                self.state = State::Auth;
            }
            LoginStyle::MasterSeparator(sep) => {
                let login = format!("{}{}{}", self.user, sep, self.master_user);
                if !sendable(&self.user) || !sendable(&self.master_user) || !sendable(&login) {
                    return self.unsendable();
                }
                if !sendable(self.master_password.expose()) {
                    return self.unsendable();
                }
                self.out.extend_from_slice(format!("USER {login}\r\n").as_bytes());
                self.state = State::User;
            }
        }
    }

    /// Nothing is sent; the next poll reports [`UpstreamError::Unsendable`].
    fn unsendable(&mut self) {
        self.out.clear();
        self.unsendable = true;
    }
}

/// An `+OK` to XCLIENT that says it was ignored (Dovecot 2.3's words to an untrusted
/// client).
fn ignored(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_lowercase();
    text.contains("not from trusted") || text.contains("ignoring")
}

/// A POP3 status line.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// `+OK …`
    Ok,
    /// `-ERR …`, with its text (one printable line, bounded).
    Err(String),
    /// Anything else (a `+ ` continuation, garbage).
    Other,
}

impl Reply {
    fn of(line: &[u8]) -> Reply {
        let word_end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
        let (word, rest) = line.split_at(word_end);
        if word.eq_ignore_ascii_case(b"+OK") {
            Reply::Ok
        } else if word.eq_ignore_ascii_case(b"-ERR") {
            let text: String = String::from_utf8_lossy(rest)
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(MAX_REFUSAL_TEXT)
                .collect();
            Reply::Err(text.trim().to_string())
        } else {
            Reply::Other
        }
    }
}

#[cfg(test)]
#[path = "pop3_upstream_tests.rs"]
mod tests;
