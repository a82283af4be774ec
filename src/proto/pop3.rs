//! The POP3 pre-authentication server, sans-IO (RFC 1939, 2449 CAPA, 2595 STLS,
//! 5034 SASL, 3206 response codes).
//!
//! The driver feeds the bytes the client sent ([`Machine::feed`]) and asks what to do
//! next ([`Machine::next`]): write bytes, read more, start TLS, check credentials, close.
//! Before authentication only CAPA, STLS, USER/PASS, AUTH PLAIN/LOGIN (and
//! XOAUTH2/OAUTHBEARER when OAuth is offered, [`PreAuth::with_oauth`]) and QUIT are
//! served; every size, count and byte a peer controls is bounded ([`limits`]). No
//! credentials are accepted before TLS. Run by `net::pop3::Pop3Service`.
//!
//! States: `Command` (reading commands) → `Sasl*` (AUTH exchange) → `Authenticating`
//! (credentials handed to the driver) → `Done` (the driver relays), plus
//! `TlsPending`/`AwaitTls` around STLS and `Closed`. Those from
//! `Authenticating` on, with the buffers and counters, are the shell the three fronts
//! share ([`crate::proto::preauth`]).

use crate::proto::preauth::{self, Phase, Shell};
use crate::proto::sasl::{self, BearerMechanism, Credentials, OAuthOffer, SaslError};
use crate::proto::{Goodbye, Machine, Next};
use crate::secret::SecretBytes;
use base64::Engine as _;

/// Bounds on what a client may send before it is authenticated (SECURITY.md §P).
pub mod limits {
    /// A command line without its CRLF: 8 KiB. RFC 2449 §4 says 255 octets, but clients
    /// send longer `AUTH PLAIN` lines (long names and app passwords, base64-grown); 8 KiB
    /// is IMAP's pre-login limit (Dovecot `IMAP_LOGIN_MAX_LINE_LENGTH`).
    pub const MAX_LINE: usize = 8192;
    /// A SASL response line (AUTH continuation): 8 KiB (Dovecot `LOGIN_MAX_AUTH_BUF_SIZE`).
    pub const MAX_SASL_LINE: usize = 8192;
    /// Invalid commands before the connection is closed (nginx `max_errors 5`).
    pub const MAX_BAD: u32 = 5;
    /// Commands of any kind before authentication (freenginx `max_commands 1000`).
    pub const MAX_COMMANDS: u32 = 1000;
    /// Failed authentications on one connection.
    pub const MAX_AUTH_FAILURES: u32 = 3;
    /// What may be buffered before authentication: the longest command line and a SASL
    /// line pipelined behind it, with their CRLFs (more is closed, never kept).
    pub const MAX_BUFFERED: usize = MAX_LINE + 2 + MAX_SASL_LINE + 2;
}
use limits::*;

/// What only the driver can act on (see [`Machine`]); it answers with
/// [`PreAuth::auth_succeeded`] or [`PreAuth::auth_failed`].
pub type Action = preauth::Action<AuthReply>;

/// What [`Machine::next`] returns.
pub type Step = Next<Action>;

/// How a failed authentication is answered (RFC 3206 response codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// `-ERR [AUTH] Authentication failed.`: wrong or unknown credentials (one text for
    /// every cause).
    Failed,
    /// `-ERR [AUTH] Authorization failed.`: the client asked to act as another user.
    AuthzFailed,
    /// `-ERR <text>`: the client cancelled the exchange or sent something that is not base64.
    Aborted(&'static str),
    /// `-ERR [AUTH] <text>`: a 2FA account sent its account password; the text says where
    /// to make an app password. Sent every time: POP3 clients show the text of a failed
    /// login, there is no alert dialog that repeats (unlike IMAP's `[ALERT]`).
    NeedsAppPassword(String),
    /// `-ERR [SYS/TEMP]`: throttled or upstream unavailable; try again later.
    Unavailable,
    /// `-ERR [IN-USE]`: this account has too many sessions from this address.
    TooMany,
}

/// The last line of a POP3 connection that mailgate ends (RFC 3206 codes where one fits).
pub fn goodbye(why: Goodbye) -> &'static [u8] {
    match why {
        Goodbye::Timeout => b"-ERR Disconnected for inactivity.\r\n",
        Goodbye::Shutdown => b"-ERR [SYS/TEMP] Server shutting down.\r\n",
        Goodbye::Revoked => b"-ERR [AUTH] Access revoked.\r\n",
        Goodbye::Idle => b"-ERR Disconnected for inactivity.\r\n",
        Goodbye::TooLong => b"-ERR [SYS/TEMP] Session too long, please reconnect.\r\n",
    }
}

/// Where the client is while commands are read ([`Phase::Open`]).
#[derive(Debug)]
enum State {
    Command,
    /// `AUTH PLAIN` sent `+ `; the PLAIN message comes next.
    SaslPlain,
    /// `AUTH LOGIN` asked for the user name.
    SaslLoginUser,
    /// `AUTH LOGIN` asked for the password of `user`.
    SaslLoginPass {
        user: String,
    },
    /// `AUTH XOAUTH2`/`OAUTHBEARER` sent `+ `; the client's message comes next.
    SaslBearer(BearerMechanism),
    /// A refused token got its error challenge (`+ <base64 JSON>`); any answer line ends
    /// the exchange with `-ERR [AUTH]`.
    BearerError,
}

/// One line taken from the buffer.
enum Line {
    /// No complete line yet (and not over the limit).
    Incomplete,
    /// Over the limit, complete or not: the connection ends.
    TooLong,
    /// The line without its line end (CRLF or bare LF); secret, it may hold a password.
    Complete(SecretBytes),
}

/// One POP3 client connection before authentication. `Debug` shows sizes and counters,
/// never the buffered bytes (they may hold a password).
pub struct PreAuth {
    shell: Shell<State>,
    /// The user name of an accepted `USER`, waiting for `PASS`.
    user: Option<String>,
    /// XOAUTH2 and OAUTHBEARER are offered (inside TLS, as every mechanism).
    oauth: Option<OAuthOffer>,
    /// The credentials with the driver are a bearer token sent with this mechanism: a
    /// refusal gets the mechanism's error challenge first.
    bearer: Option<BearerMechanism>,
}

impl std::fmt::Debug for PreAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shell.fmt(f)
    }
}

impl Machine for PreAuth {
    type Event = Action;

    /// Bytes read from the client.
    fn feed(&mut self, bytes: &[u8]) {
        self.shell.feed(bytes, MAX_BUFFERED, "-ERR Input too long\r\n");
    }

    /// Next thing to do. Call again until it returns [`Next::NeedInput`] (or another
    /// action that needs the driver).
    fn next(&mut self) -> Step {
        preauth::next(self, |p| &mut p.shell, PreAuth::step)
    }

    /// The TLS handshake after STLS succeeded: the session starts over, encrypted (no new
    /// greeting, RFC 2595 §4).
    fn tls_started(&mut self) {
        if self.shell.tls_restarted(State::Command) {
            self.user = None;
        }
    }

    fn goodbye(&self, why: Goodbye) -> Option<&'static [u8]> {
        Some(goodbye(why))
    }
}

impl PreAuth {
    /// A new connection; the greeting is queued. `tls`: the channel is already encrypted
    /// (implicit TLS, port 995). `stls_allowed`: this listener offers STLS (port 110).
    pub fn new(hostname: &str, tls: bool, stls_allowed: bool) -> PreAuth {
        PreAuth::with_oauth(hostname, tls, stls_allowed, None)
    }

    /// [`PreAuth::new`]; with `oauth`, XOAUTH2 and OAUTHBEARER are offered and accepted
    /// too (inside TLS only, like PLAIN and LOGIN).
    pub fn with_oauth(hostname: &str, tls: bool, stls_allowed: bool, oauth: Option<OAuthOffer>) -> PreAuth {
        let mut p = PreAuth { shell: Shell::new(State::Command, tls, stls_allowed), user: None, oauth, bearer: None };
        // No APOP timestamp: APOP is not offered (MD5 of a clear password on the server).
        p.shell.out.extend_from_slice(format!("+OK {} ready.\r\n", sanitize_text(hostname)).as_bytes());
        p
    }

    /// The credentials were accepted and the upstream session is open. Queues
    /// `+OK Logged in.` and returns the bytes the client pipelined after its login
    /// command (they belong to the upstream session, untouched).
    pub fn auth_succeeded(&mut self) -> Vec<u8> {
        self.shell.succeeded("+OK Logged in.\r\n")
    }

    /// The credentials were refused (or the exchange failed); answer the client. After
    /// [`MAX_AUTH_FAILURES`] the connection ends.
    ///
    /// A bearer token refused by the gate ([`AuthReply::Failed`]) first gets the
    /// mechanism's error challenge (`+ <base64 JSON>`, RFC 7628 §3.2.3, Google's XOAUTH2);
    /// `-ERR [AUTH]` follows the client's answer, whatever it is.
    pub fn auth_failed(&mut self, reply: AuthReply) {
        if !self.shell.authenticating() {
            return;
        }
        let bearer = self.bearer.take();
        if let (AuthReply::Failed, Some(mech), Some(offer)) = (&reply, bearer, &self.oauth) {
            let challenge = offer.error_challenge(mech);
            self.shell.out.extend_from_slice(format!("+ {challenge}\r\n").as_bytes());
            self.shell.phase = Phase::Open(State::BearerError);
            return;
        }
        let line = match reply {
            AuthReply::Failed => "-ERR [AUTH] Authentication failed.\r\n".to_string(),
            AuthReply::AuthzFailed => "-ERR [AUTH] Authorization failed.\r\n".to_string(),
            AuthReply::Aborted(text) => format!("-ERR {}\r\n", sanitize_text(text)),
            AuthReply::NeedsAppPassword(text) => format!("-ERR [AUTH] {}\r\n", sanitize_text(&text)),
            AuthReply::Unavailable => {
                "-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n".to_string()
            }
            AuthReply::TooMany => "-ERR [IN-USE] Too many sessions.\r\n".to_string(),
        };
        // The failure reply was this command's answer; nothing more is read.
        self.shell.failed(&line, State::Command, MAX_AUTH_FAILURES, "");
    }

    fn capabilities(&self) -> String {
        let mut caps = String::from(
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n",
        );
        if self.shell.starttls_allowed && !self.shell.tls {
            caps.push_str("STLS\r\n");
        }
        match (self.shell.tls, &self.oauth) {
            (false, _) => {}
            (true, None) => caps.push_str("USER\r\nSASL PLAIN LOGIN\r\n"),
            (true, Some(_)) => caps.push_str("USER\r\nSASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"),
        }
        caps.push_str(".\r\n");
        caps
    }

    /// Answers an invalid command with `reply`; the [`MAX_BAD`]th gets
    /// `-ERR Too many errors` instead and ends the connection.
    fn bad_command(&mut self, reply: &str) {
        self.shell.bad += 1;
        if self.shell.bad >= MAX_BAD {
            self.shell.close_with("-ERR Too many errors\r\n");
        } else {
            self.shell.out.extend_from_slice(format!("-ERR {reply}\r\n").as_bytes());
        }
    }

    /// Takes the first line out of the buffer (CRLF or a bare LF ends it). The taken
    /// bytes are zeroed in the buffer.
    fn take_line(&mut self, limit: usize) -> Line {
        let Some(pos) = self.shell.buf.iter().position(|b| *b == b'\n') else {
            // One byte more than the limit may be the CR of the line end.
            return if self.shell.buf.len() > limit + 1 { Line::TooLong } else { Line::Incomplete };
        };
        let end = if pos > 0 && self.shell.buf.get(pos - 1) == Some(&b'\r') { pos - 1 } else { pos };
        if end > limit {
            return Line::TooLong;
        }
        let line = SecretBytes::from(self.shell.buf.get(..end).unwrap_or_default().to_vec());
        let taken = self.shell.buf.get_mut(..=pos).unwrap_or_default();
        zeroize::Zeroize::zeroize(taken);
        self.shell.buf.drain(..=pos);
        Line::Complete(line)
    }

    /// One step while reading: a command line, or a line of the SASL exchange.
    fn step(&mut self) -> Option<Step> {
        match self.shell.phase {
            Phase::Open(State::Command) => self.step_command(),
            _ => self.step_sasl(),
        }
    }

    fn step_command(&mut self) -> Option<Step> {
        if let Some(wait_or_close) = self.shell.gate() {
            return Some(wait_or_close);
        }
        let line = match self.take_line(MAX_LINE) {
            Line::Incomplete => return Some(Next::NeedInput),
            Line::TooLong => {
                self.shell.close_with("-ERR Line too long\r\n");
                return None;
            }
            Line::Complete(line) => line,
        };
        self.shell.commands += 1;
        if self.shell.commands > MAX_COMMANDS {
            self.shell.close_with("-ERR Too many commands\r\n");
            return None;
        }
        self.command(line.expose())
    }

    /// One command line (without its line end).
    fn command(&mut self, line: &[u8]) -> Option<Step> {
        let (word, arg) = match line.iter().position(|b| *b == b' ') {
            Some(sp) => (&line[..sp], Some(&line[sp + 1..])),
            None => (line, None),
        };
        let word = word.to_ascii_uppercase();
        match word.as_slice() {
            b"CAPA" => {
                let caps = self.capabilities();
                self.shell.out.extend_from_slice(caps.as_bytes());
            }
            b"QUIT" => self.shell.close_with("+OK Bye\r\n"),
            b"STLS" if self.shell.tls => self.bad_command("TLS is already active"),
            b"STLS" if !self.shell.starttls_allowed => self.bad_command("STLS is not offered here"),
            b"STLS" => self.shell.start_tls("+OK Begin TLS negotiation\r\n"),
            b"USER" | b"PASS" | b"AUTH" if !self.shell.tls => {
                // No credentials in clear, ever: not even a user name is taken.
                self.user = None;
                if self.shell.starttls_allowed {
                    self.bad_command("[AUTH] TLS required: use STLS first");
                } else {
                    self.bad_command("[AUTH] TLS required");
                }
            }
            b"USER" => match arg.map(sasl::check_username) {
                Some(Ok(user)) => {
                    self.user = Some(user);
                    self.shell.out.extend_from_slice(b"+OK Send your password\r\n");
                }
                _ => {
                    self.user = None;
                    self.bad_command("Invalid user name");
                }
            },
            b"PASS" => {
                let Some(user) = self.user.take() else {
                    self.bad_command("Send USER first");
                    return None;
                };
                return Some(match sasl::check_password(arg.unwrap_or_default()) {
                    Ok(password) => self.shell.authenticate(Credentials::password(user, password)),
                    Err(_) => self.shell.refuse(AuthReply::Failed),
                });
            }
            b"AUTH" => return self.auth(arg),
            b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL" | b"LAST" => {
                // RFC 1939: these belong to the TRANSACTION state, after login.
                self.bad_command("Not allowed before login");
            }
            _ => self.bad_command("Unknown command"),
        }
        None
    }

    /// `AUTH [mechanism [initial-response]]` (RFC 5034), inside TLS.
    fn auth(&mut self, arg: Option<&[u8]>) -> Option<Step> {
        self.user = None;
        let mut parts = arg.unwrap_or_default().split(|b| *b == b' ');
        let (mech, ir, extra) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
        if mech.is_empty() {
            if arg.is_some_and(|a| !a.is_empty()) {
                self.bad_command("Invalid AUTH command");
            } else {
                // No mechanism: the list (the pre-RFC 5034 convention clients still use).
                let list: &[u8] = if self.oauth.is_some() {
                    b"+OK\r\nPLAIN\r\nLOGIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n.\r\n"
                } else {
                    b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
                };
                self.shell.out.extend_from_slice(list);
            }
            return None;
        }
        if extra.is_some() {
            self.bad_command("Invalid AUTH command");
            return None;
        }
        // `AUTH PLAIN ` (a trailing space) has no initial response; `=` is an empty one.
        let ir = ir.filter(|ir| !ir.is_empty());
        if let Some(bearer) = BearerMechanism::from_name(mech).filter(|_| self.oauth.is_some()) {
            return Some(match ir {
                Some(ir) => self.sasl_response(State::SaslBearer(bearer), ir),
                None => {
                    self.shell.out.extend_from_slice(b"+ \r\n");
                    self.shell.phase = Phase::Open(State::SaslBearer(bearer));
                    Next::NeedInput
                }
            });
        }
        let mech = mech.to_ascii_uppercase();
        match (mech.as_slice(), ir) {
            (b"PLAIN", Some(ir)) => Some(self.sasl_response(State::SaslPlain, ir)),
            (b"PLAIN", None) => {
                self.shell.out.extend_from_slice(b"+ \r\n");
                self.shell.phase = Phase::Open(State::SaslPlain);
                None
            }
            (b"LOGIN", Some(ir)) => Some(self.sasl_response(State::SaslLoginUser, ir)),
            (b"LOGIN", None) => {
                self.shell.out.extend_from_slice(b"+ VXNlcm5hbWU6\r\n");
                self.shell.phase = Phase::Open(State::SaslLoginUser);
                None
            }
            _ => {
                self.bad_command("Unsupported authentication mechanism");
                None
            }
        }
    }

    fn step_sasl(&mut self) -> Option<Step> {
        let line = match self.take_line(MAX_SASL_LINE) {
            Line::Incomplete => return Some(Next::NeedInput),
            Line::TooLong => {
                self.shell.close_with("-ERR Authentication line too long\r\n");
                return None;
            }
            Line::Complete(line) => line,
        };
        let state = self.shell.replace(State::Command).unwrap_or(State::Command);
        if let State::BearerError = state {
            // The answer to the error challenge (RFC 7628: `^A`) ends the exchange,
            // whatever it says; `line` (a secret) is wiped when dropped.
            self.shell.failed("-ERR [AUTH] Authentication failed.\r\n", State::Command, MAX_AUTH_FAILURES, "");
            return None;
        }
        if line.expose().as_slice() == b"*" {
            return Some(self.shell.refuse(AuthReply::Aborted("Authentication cancelled")));
        }
        Some(self.sasl_response(state, line.expose()))
    }

    /// One base64 SASL response (initial or to a challenge) in exchange `state`.
    fn sasl_response(&mut self, state: State, b64: &[u8]) -> Step {
        // RFC 5034 §4: `=` is an empty response.
        let decoded = if b64 == b"=" { Ok(Vec::new()) } else { base64::engine::general_purpose::STANDARD.decode(b64) };
        let Ok(data) = decoded else {
            return self.shell.refuse(AuthReply::Aborted("Invalid base64 data"));
        };
        let data = SecretBytes::from(data);
        match state {
            State::SaslPlain => match sasl::decode_plain(data.expose()) {
                Ok(creds) => self.shell.authenticate(creds),
                Err(SaslError::AuthzidRefused) => self.shell.refuse(AuthReply::AuthzFailed),
                Err(SaslError::Malformed) => self.shell.refuse(AuthReply::Failed),
            },
            State::SaslLoginUser => match sasl::check_username(data.expose()) {
                Ok(user) => {
                    self.shell.out.extend_from_slice(b"+ UGFzc3dvcmQ6\r\n");
                    self.shell.phase = Phase::Open(State::SaslLoginPass { user });
                    Next::NeedInput
                }
                Err(_) => self.shell.refuse(AuthReply::Failed),
            },
            State::SaslLoginPass { user } => match sasl::check_password(data.expose()) {
                Ok(password) => self.shell.authenticate(Credentials::password(user, password)),
                Err(_) => self.shell.refuse(AuthReply::Failed),
            },
            // A malformed message is a plain failure: no token was checked.
            State::SaslBearer(mech) => match mech.decode(data.expose()) {
                Ok(creds) => {
                    self.bearer = Some(mech);
                    self.shell.authenticate(creds)
                }
                Err(_) => self.shell.refuse(AuthReply::Failed),
            },
            // Not an exchange state: nothing to decode for (not reached).
            _ => self.shell.refuse(AuthReply::Failed),
        }
    }
}

/// One printable ASCII line: no CR/LF or other control characters.
fn sanitize_text(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect::<String>().trim().to_string()
}

#[cfg(test)]
#[path = "pop3_tests.rs"]
mod tests;
