//! The ManageSieve (RFC 5804) pre-authentication server, sans-IO.
//!
//! The driver feeds the bytes the client sent ([`Machine::feed`]) and asks what to do
//! next ([`Machine::next`]): write bytes, read more, start TLS, check credentials, close.
//! Before authentication only CAPABILITY, NOOP, LOGOUT, STARTTLS and
//! AUTHENTICATE PLAIN/LOGIN (and XOAUTH2/OAUTHBEARER when OAuth is offered,
//! [`PreAuth::with_listing`]) are served; every size, count and byte a peer controls is
//! bounded ([`limits`]). Run by `net::sieve` (through `net::front::MailService`).
//!
//! ManageSieve is a line protocol with IMAP-like strings: quoted (`"..."`, with `\"` and
//! `\\` escapes, no CR, LF or NUL) and literals (`{N+}` CRLF and N octets; `{N}` is
//! accepted too, and since ManageSieve has no continuation request its data follows at
//! once as well). Responses are `OK`, `NO` or `BYE`, an optional response code in
//! parentheses and a quoted human-readable text. There are no tags.
//!
//! States: `Command` (reading commands) → `Sasl*` (AUTHENTICATE exchange) →
//! `Authenticating` (credentials handed to the driver) → `Done` (the driver relays),
//! plus `TlsPending`/`AwaitTls` around STARTTLS and `Closed`. Those from
//! `Authenticating` on, with the buffers and counters, are the shell the three fronts
//! share ([`crate::proto::preauth`]).

use crate::proto::preauth::{self, Phase, Shell};
use crate::proto::sasl::{self, BearerMechanism, Credentials, OAuthOffer, SaslError};
use crate::proto::{Goodbye, Machine, Next};
use crate::secret::SecretBytes;
use base64::Engine as _;

/// Bounds on what a client may send before it is authenticated (SECURITY.md §P).
pub mod limits {
    /// A command line (without literal data): 8 KiB, as IMAP's (RFC 7162 §4; Dovecot's
    /// login processes use the same).
    pub const MAX_LINE: usize = 8192;
    /// A literal before auth: 8 KiB (nothing before login needs more; nginx: one page).
    /// Its data follows without waiting, so a bigger one ends the connection.
    pub const MAX_LITERAL: usize = 8192;
    /// A whole command, lines and literals together.
    pub const MAX_COMMAND: usize = 16 * 1024;
    /// A SASL response line (AUTHENTICATE continuation): 8 KiB (Dovecot `LOGIN_MAX_AUTH_BUF_SIZE`).
    pub const MAX_SASL_LINE: usize = 8192;
    /// Invalid commands before the connection is closed (nginx `max_errors 5`).
    pub const MAX_BAD: u32 = 5;
    /// Failed authentications on one connection.
    pub const MAX_AUTH_FAILURES: u32 = 3;
    /// Commands of any kind before authentication (freenginx `max_commands 1000`).
    pub const MAX_COMMANDS: u32 = 1000;
    /// What may be buffered before authentication: the longest command and a SASL line.
    pub const MAX_BUFFERED: usize = MAX_COMMAND + MAX_SASL_LINE;
    /// Longest text mailgate puts in one quoted string of a response (RFC 5804 §4 limits
    /// quoted strings to 1024 octets).
    pub const MAX_QUOTED: usize = 1024;
}
use limits::*;

/// What only the driver can act on (see [`Machine`]); it answers with
/// [`PreAuth::auth_succeeded`] or [`PreAuth::auth_failed`].
pub type Action = preauth::Action<AuthReply>;

/// What [`Machine::next`] returns.
pub type Step = Next<Action>;

/// How a failed authentication is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// `NO (AUTH)`: wrong or unknown credentials (one text for every cause).
    Failed,
    /// `NO (AUTH) "Authorization failed."`: the client asked to act as another user.
    AuthzFailed,
    /// `NO "text"`: the client cancelled the exchange or sent something that is not base64.
    Aborted(&'static str),
    /// `NO (AUTH) "text"`: a 2FA account sent its account password. ManageSieve clients
    /// show the text of each refusal, so it is sent every time.
    NeedsAppPassword(String),
    /// `NO (TRYLATER)`: throttled or upstream unavailable; try again later.
    Unavailable,
    /// `NO (TRYLATER) "Too many sessions."`: this account has too many sessions from this address.
    TooMany,
}

/// The last line of a ManageSieve connection that mailgate ends (RFC 5804 §1.3 BYE).
pub fn goodbye(why: Goodbye) -> &'static [u8] {
    match why {
        Goodbye::Timeout | Goodbye::Idle => b"BYE \"Disconnected for inactivity.\"\r\n",
        Goodbye::Shutdown => b"BYE (TRYLATER) \"Server shutting down.\"\r\n",
        Goodbye::Revoked => b"BYE \"Access revoked.\"\r\n",
        Goodbye::TooLong => b"BYE \"Session too long.\"\r\n",
    }
}

/// Where the client is while commands are read ([`Phase::Open`]).
#[derive(Debug)]
enum State {
    Command,
    SaslPlain,
    SaslLoginUser,
    SaslLoginPass {
        user: String,
    },
    /// `AUTHENTICATE "XOAUTH2"`/`"OAUTHBEARER"` sent `""`; the client's message comes next.
    SaslBearer(BearerMechanism),
    /// A refused token got its error challenge (a string holding the base64 JSON); any
    /// answer (RFC 7628: `"AQ=="`, `^A`) ends the exchange with `NO (AUTH)`.
    BearerError,
}

/// One client connection before authentication. `Debug` shows sizes and counters, never
/// the buffered bytes (they may hold a password).
pub struct PreAuth {
    shell: Shell<State>,
    framer: Framer,
    /// Upstream's capability lines shown in mailgate's listing
    /// ([`PreAuth::with_upstream_capabilities`]).
    upstream_caps: String,
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
        self.shell.feed(bytes, MAX_BUFFERED, "BYE \"Too much input.\"\r\n");
    }

    /// Next thing to do. Call again until it returns [`Next::NeedInput`] (or another
    /// action that needs the driver).
    fn next(&mut self) -> Step {
        preauth::next(self, |p| &mut p.shell, PreAuth::step)
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over, encrypted,
    /// and the capability listing is sent again (RFC 5804 §2.2).
    fn tls_started(&mut self) {
        if self.shell.tls_restarted(State::Command) {
            self.framer = Framer::default();
            let listing = self.capabilities();
            self.shell.out.extend_from_slice(listing.as_bytes());
            self.shell.out.extend_from_slice(b"OK \"TLS negotiation successful.\"\r\n");
        }
    }

    fn goodbye(&self, why: Goodbye) -> Option<&'static [u8]> {
        Some(goodbye(why))
    }
}

impl PreAuth {
    /// A new connection. `tls`: the channel is already encrypted (implicit TLS).
    /// `starttls_allowed`: this listener offers STARTTLS.
    ///
    /// The greeting is mailgate's own capability listing: `IMPLEMENTATION`, `SASL`
    /// (`PLAIN LOGIN` on TLS, empty before it so that no client sends a password in
    /// clear), `STARTTLS` where offered, `VERSION`. The `SIEVE` and `NOTIFY` extension
    /// lists are upstream's: see [`PreAuth::with_upstream_capabilities`].
    pub fn new(hostname: &str, tls: bool, starttls_allowed: bool) -> PreAuth {
        PreAuth::with_upstream_capabilities(hostname, tls, starttls_allowed, "")
    }

    /// [`PreAuth::new`], the listing also carrying `upstream`: upstream's own capability
    /// lines (`"SIEVE" "fileinto …"`, `"NOTIFY" …`; CRLF-terminated, quoted as upstream
    /// sent them, see `net::upstream::SieveUpstream::listing`). Clients read the Sieve
    /// extensions before login and refuse a server that lists none (RFC 5804 §1.7: `SIEVE`
    /// is always listed).
    pub fn with_upstream_capabilities(hostname: &str, tls: bool, starttls_allowed: bool, upstream: &str) -> PreAuth {
        PreAuth::with_listing(hostname, tls, starttls_allowed, upstream, None)
    }

    /// [`PreAuth::with_upstream_capabilities`]; with `oauth`, XOAUTH2 and OAUTHBEARER are
    /// listed in `SASL` and accepted too (inside TLS only, like PLAIN and LOGIN).
    pub fn with_listing(
        hostname: &str,
        tls: bool,
        starttls_allowed: bool,
        upstream: &str,
        oauth: Option<OAuthOffer>,
    ) -> PreAuth {
        let mut p = PreAuth {
            shell: Shell::new(State::Command, tls, starttls_allowed),
            framer: Framer::default(),
            upstream_caps: upstream.to_string(),
            oauth,
            bearer: None,
        };
        let listing = p.capabilities();
        p.shell.out.extend_from_slice(listing.as_bytes());
        let ready = quote(&format!("{hostname} ManageSieve ready."));
        p.shell.out.extend_from_slice(format!("OK {ready}\r\n").as_bytes());
        p
    }

    /// The capability listing (RFC 5804 §1.7), one CRLF-terminated line per capability.
    fn capabilities(&self) -> String {
        let sasl = match (self.shell.tls, &self.oauth) {
            (false, _) => "",
            (true, None) => "PLAIN LOGIN",
            (true, Some(_)) => "PLAIN LOGIN XOAUTH2 OAUTHBEARER",
        };
        let mut s = format!("\"IMPLEMENTATION\" \"mailgate\"\r\n\"SASL\" \"{sasl}\"\r\n");
        if self.shell.starttls_allowed {
            s.push_str("\"STARTTLS\"\r\n");
        }
        s.push_str(&self.upstream_caps);
        s.push_str("\"VERSION\" \"1.0\"\r\n");
        s
    }

    /// The credentials were accepted and the upstream session is open. Queues the `OK`
    /// and returns the bytes the client pipelined after its AUTHENTICATE exchange (they
    /// belong to the upstream session, untouched).
    pub fn auth_succeeded(&mut self) -> Vec<u8> {
        self.shell.succeeded("OK \"Logged in.\"\r\n")
    }

    /// The credentials were refused (or the exchange failed); answer the client.
    ///
    /// A bearer token refused by the gate ([`AuthReply::Failed`]) first gets the
    /// mechanism's error challenge, a string on its own line (RFC 5804 §2.1 server
    /// challenge; RFC 7628 §3.2.3); `NO (AUTH)` follows the client's answer, whatever it is.
    pub fn auth_failed(&mut self, reply: AuthReply) {
        if !self.shell.authenticating() {
            return;
        }
        let bearer = self.bearer.take();
        if let (AuthReply::Failed, Some(mech), Some(offer)) = (&reply, bearer, &self.oauth) {
            let challenge = offer.error_challenge(mech);
            // Base64 needs no escape; a challenge longer than a quoted string may be (a
            // long metadata URL) goes as a literal.
            let line = if challenge.len() <= MAX_QUOTED {
                format!("\"{challenge}\"\r\n")
            } else {
                format!("{{{}}}\r\n{challenge}\r\n", challenge.len())
            };
            self.shell.out.extend_from_slice(line.as_bytes());
            self.shell.phase = Phase::Open(State::BearerError);
            return;
        }
        let line = match reply {
            AuthReply::Failed => "NO (AUTH) \"Authentication failed.\"\r\n".to_string(),
            AuthReply::AuthzFailed => "NO (AUTH) \"Authorization failed.\"\r\n".to_string(),
            AuthReply::Aborted(text) => format!("NO {}\r\n", quote(text)),
            AuthReply::NeedsAppPassword(text) => format!("NO (AUTH) {}\r\n", quote(&text)),
            AuthReply::Unavailable => {
                "NO (TRYLATER) \"Service temporarily unavailable, try again later.\"\r\n".to_string()
            }
            AuthReply::TooMany => "NO (TRYLATER) \"Too many sessions.\"\r\n".to_string(),
        };
        self.shell.failed(&line, State::Command, MAX_AUTH_FAILURES, "BYE \"Too many authentication failures.\"\r\n");
    }

    fn bad_command(&mut self, text: &str) {
        self.shell.bad_command(&format!("NO {}\r\n", quote(text)), MAX_BAD, "BYE \"Too many errors.\"\r\n");
    }

    /// Frames the next command (or SASL response) in the buffer and acts on it.
    fn step(&mut self) -> Option<Step> {
        if let Some(wait_or_close) = self.shell.gate() {
            return Some(wait_or_close);
        }
        let sasl = !matches!(self.shell.phase, Phase::Open(State::Command));
        let limits =
            FrameLimits { line: if sasl { MAX_SASL_LINE } else { MAX_LINE }, literal: MAX_LITERAL, total: MAX_COMMAND };
        let end = match self.framer.scan(&self.shell.buf, limits) {
            Ok(Some(end)) => end,
            Ok(None) => return Some(Next::NeedInput),
            // The rest can't be told apart from commands any more: the connection ends.
            Err(FrameError::LineTooLong) => {
                self.shell.close_with("BYE \"Line too long.\"\r\n");
                return None;
            }
            Err(FrameError::LiteralTooBig) => {
                self.shell.close_with("BYE \"Literal too big.\"\r\n");
                return None;
            }
            Err(FrameError::TooBig) => {
                self.shell.close_with("BYE \"Command too long.\"\r\n");
                return None;
            }
        };
        // The unit may hold a password: copy it into a secret, wipe it from the buffer.
        let unit = SecretBytes::from(self.shell.buf.get(..end).map(<[u8]>::to_vec).unwrap_or_default());
        if let Some(b) = self.shell.buf.get_mut(..end) {
            zeroize::Zeroize::zeroize(b);
        }
        self.shell.buf.drain(..end.min(self.shell.buf.len()));
        self.framer = Framer::default();
        if sasl { self.sasl_response(unit.expose()) } else { self.command(unit.expose()) }
    }

    fn command(&mut self, unit: &[u8]) -> Option<Step> {
        self.shell.commands += 1;
        let step = match tokenize(unit) {
            // An empty line: ignored (counted against MAX_COMMANDS).
            Ok(tokens) if tokens.is_empty() => None,
            Ok(tokens) => match tokens.split_first() {
                Some((Token::Atom(name), args)) => self.handle(name, args),
                _ => {
                    self.bad_command("Syntax error.");
                    None
                }
            },
            Err(Malformed) => {
                self.bad_command("Syntax error.");
                // A literal announced at its end that framing did not see (inside what
                // looked like a quoted string): its data may be on its way and would be
                // read as commands.
                let body = unit.strip_suffix(b"\r\n").unwrap_or(unit);
                if trailing_literal(body).is_some() && !self.shell.closed() {
                    self.shell.close_with("BYE \"Syntax error.\"\r\n");
                }
                None
            }
        };
        if step.is_none()
            && self.shell.commands >= MAX_COMMANDS
            && matches!(self.shell.phase, Phase::Open(State::Command))
        {
            self.shell.close_with("BYE \"Too many commands.\"\r\n");
        }
        step
    }

    fn handle(&mut self, name: &str, args: &[Token]) -> Option<Step> {
        let name = name.to_ascii_uppercase();
        match (name.as_str(), args) {
            ("CAPABILITY", []) => {
                let listing = self.capabilities();
                self.shell.out.extend_from_slice(listing.as_bytes());
                self.shell.out.extend_from_slice(b"OK \"Capability completed.\"\r\n");
            }
            ("NOOP", []) => self.shell.out.extend_from_slice(b"OK \"Done\"\r\n"),
            // RFC 5804 §2.14: the tag comes back in a TAG response code.
            ("NOOP", [Token::Str(tag)]) => match quote_exact(tag.expose()) {
                Some(tag) => self.shell.out.extend_from_slice(format!("OK (TAG {tag}) \"Done\"\r\n").as_bytes()),
                None => self.bad_command("Invalid NOOP tag."),
            },
            ("LOGOUT", []) => self.shell.close_with("OK \"Logout completed.\"\r\n"),
            ("STARTTLS", []) if self.shell.tls => self.bad_command("TLS is already active."),
            ("STARTTLS", []) if !self.shell.starttls_allowed => self.bad_command("STARTTLS is not offered here."),
            ("STARTTLS", []) => self.shell.start_tls("OK \"Begin TLS negotiation now.\"\r\n"),
            ("AUTHENTICATE", [Token::Str(_)] | [Token::Str(_), Token::Str(_)]) if !self.shell.tls => {
                // No password in clear, whether or not this port offers STARTTLS.
                if self.shell.starttls_allowed {
                    self.bad_command("TLS required: use STARTTLS first");
                } else {
                    self.bad_command("TLS required.");
                }
            }
            ("AUTHENTICATE", [Token::Str(mech)]) => return self.authenticate(mech.expose(), None),
            ("AUTHENTICATE", [Token::Str(mech), Token::Str(ir)]) => {
                return self.authenticate(mech.expose(), Some(ir.expose()));
            }
            ("CAPABILITY" | "NOOP" | "LOGOUT" | "STARTTLS" | "AUTHENTICATE", _) => {
                self.bad_command("Syntax error in arguments.");
            }
            (other, _) => match POST_LOGIN.iter().find(|c| **c == other) {
                Some(c) => self.bad_command(&format!("{c} is not allowed before authentication.")),
                None => self.bad_command("Unknown command."),
            },
        }
        None
    }

    /// `AUTHENTICATE "<mech>" ["<initial response>"]` on TLS.
    fn authenticate(&mut self, mech: &[u8], ir: Option<&[u8]>) -> Option<Step> {
        let ir = match ir.map(decode_base64) {
            None => None,
            Some(Ok(data)) => Some(data),
            Some(Err(())) => {
                return Some(self.shell.refuse(AuthReply::Aborted("Invalid base64 in authentication exchange.")));
            }
        };
        if mech.eq_ignore_ascii_case(b"PLAIN") {
            match ir {
                // An empty initial response is a response (RFC 4959 reading): an empty
                // PLAIN message, which is malformed.
                Some(msg) => return Some(self.plain(msg.expose())),
                None => {
                    self.shell.out.extend_from_slice(b"\"\"\r\n");
                    self.shell.phase = Phase::Open(State::SaslPlain);
                }
            }
        } else if mech.eq_ignore_ascii_case(b"LOGIN") {
            match ir {
                // LOGIN is server-first: an empty initial response carries nothing yet,
                // so the user name is asked for (as the IMAP front does).
                Some(user) if !user.expose().is_empty() => return Some(self.login_user(user.expose())),
                _ => {
                    self.shell.out.extend_from_slice(b"\"VXNlcm5hbWU6\"\r\n");
                    self.shell.phase = Phase::Open(State::SaslLoginUser);
                }
            }
        } else if let Some(bearer) = BearerMechanism::from_name(mech).filter(|_| self.oauth.is_some()) {
            match ir {
                Some(msg) => return Some(self.bearer(bearer, msg.expose())),
                None => {
                    self.shell.out.extend_from_slice(b"\"\"\r\n");
                    self.shell.phase = Phase::Open(State::SaslBearer(bearer));
                }
            }
        } else {
            self.bad_command("Unsupported authentication mechanism.");
        }
        None
    }

    /// A bearer message (XOAUTH2 or OAUTHBEARER): the token goes to the driver; a
    /// malformed message is a plain failure (no token was checked, so no error challenge).
    fn bearer(&mut self, mech: BearerMechanism, msg: &[u8]) -> Step {
        match mech.decode(msg) {
            Ok(creds) => {
                self.bearer = Some(mech);
                self.shell.authenticate(creds)
            }
            Err(_) => self.shell.refuse(AuthReply::Failed),
        }
    }

    /// A client response in the SASL exchange: one string on its line, or `"*"` to cancel.
    fn sasl_response(&mut self, unit: &[u8]) -> Option<Step> {
        let state = self.shell.replace(State::Command).unwrap_or(State::Command);
        if let State::BearerError = state {
            // The answer to the error challenge ends the exchange, whatever it is (the
            // unit is a secret the caller wipes).
            self.shell.failed(
                "NO (AUTH) \"Authentication failed.\"\r\n",
                State::Command,
                MAX_AUTH_FAILURES,
                "BYE \"Too many authentication failures.\"\r\n",
            );
            return None;
        }
        let data = match tokenize(unit) {
            Ok(tokens) => match tokens.as_slice() {
                [Token::Str(s)] if s.expose().as_slice() == b"*" => {
                    return Some(self.shell.refuse(AuthReply::Aborted("Authentication cancelled.")));
                }
                [Token::Str(s)] => decode_base64(s.expose()),
                _ => Err(()),
            },
            Err(Malformed) => Err(()),
        };
        let Ok(data) = data else {
            return Some(self.shell.refuse(AuthReply::Aborted("Invalid base64 in authentication exchange.")));
        };
        match state {
            State::SaslPlain => Some(self.plain(data.expose())),
            State::SaslLoginUser => Some(self.login_user(data.expose())),
            State::SaslLoginPass { user } => match sasl::check_password(data.expose()) {
                Ok(password) => Some(self.shell.authenticate(Credentials::password(user, password))),
                Err(_) => Some(self.shell.refuse(AuthReply::Failed)),
            },
            State::SaslBearer(mech) => Some(self.bearer(mech, data.expose())),
            _ => None,
        }
    }

    fn login_user(&mut self, raw: &[u8]) -> Step {
        match sasl::check_username(raw) {
            Ok(user) => {
                self.shell.out.extend_from_slice(b"\"UGFzc3dvcmQ6\"\r\n");
                self.shell.phase = Phase::Open(State::SaslLoginPass { user });
                Next::NeedInput
            }
            Err(_) => self.shell.refuse(AuthReply::Failed),
        }
    }

    fn plain(&mut self, msg: &[u8]) -> Step {
        match sasl::decode_plain(msg) {
            Ok(creds) => self.shell.authenticate(creds),
            Err(SaslError::AuthzidRefused) => self.shell.refuse(AuthReply::AuthzFailed),
            Err(SaslError::Malformed) => self.shell.refuse(AuthReply::Failed),
        }
    }
}

/// ManageSieve commands that need a login (RFC 5804 §2), named in the refusal.
const POST_LOGIN: &[&str] = &[
    "HAVESPACE",
    "PUTSCRIPT",
    "LISTSCRIPTS",
    "SETACTIVE",
    "GETSCRIPT",
    "DELETESCRIPT",
    "RENAMESCRIPT",
    "CHECKSCRIPT",
    "UNAUTHENTICATE",
];

/// Base64 (standard alphabet, padded) of a SASL exchange; the result is a secret.
fn decode_base64(s: &[u8]) -> Result<SecretBytes, ()> {
    base64::engine::general_purpose::STANDARD.decode(s).map(SecretBytes::from).map_err(|_| ())
}

/// `text` as a ManageSieve quoted string for a response: control characters (CR, LF,
/// NUL, …) dropped, `\` and `"` escaped, at most [`MAX_QUOTED`] octets.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    let mut len = 0;
    for c in text.chars().filter(|c| !c.is_control()) {
        let esc = matches!(c, '\\' | '"');
        let n = c.len_utf8() + usize::from(esc);
        if len + n > MAX_QUOTED {
            break;
        }
        if esc {
            out.push('\\');
        }
        out.push(c);
        len += n;
    }
    out.push('"');
    out
}

/// `bytes` as a quoted string exactly, or `None` if they can't be one (not UTF-8, a
/// control character, longer than [`MAX_QUOTED`]).
fn quote_exact(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    if s.chars().any(char::is_control) || bytes.len() > MAX_QUOTED {
        return None;
    }
    let q = quote(s);
    (q.len() == 2 + s.len() + s.bytes().filter(|b| matches!(b, b'\\' | b'"')).count()).then_some(q)
}

// ---------------------------------------------------------------------------------------
// Framing and tokens (shared with `sieve_upstream`)
// ---------------------------------------------------------------------------------------

/// The bounds of one framed unit (a command, a response, a capability line).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameLimits {
    /// One line, without literal data and CRLF.
    pub line: usize,
    /// One literal's data.
    pub literal: usize,
    /// The whole unit, lines and literal data together.
    pub total: usize,
}

/// Why framing refused the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A line (outside literal data) over its limit.
    LineTooLong,
    /// A literal over its limit (its data is on its way without waiting).
    LiteralTooBig,
    /// The unit as a whole over its limit.
    TooBig,
}

/// Finds where the first unit in a buffer ends, incrementally (each byte is looked at
/// once, so a unit split anywhere across reads frames the same): CRLF ends a line, a line
/// that ends with `{N+}` or `{N}` outside a quoted string is followed by N octets of
/// literal data and another line.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// Bytes of the buffer scanned so far.
    pos: usize,
    /// Where the current line starts.
    line_begin: usize,
    /// Literal bytes still expected before the next line starts.
    literal_left: usize,
    /// Inside a quoted string (ended by `"` or, as an error, by the line's end).
    in_quote: bool,
    /// After a `\` inside a quoted string.
    escaped: bool,
}

impl Framer {
    /// Scans the new bytes of `buf`; `Ok(Some(end))`: the first unit is `buf[..end]`.
    pub(crate) fn scan(&mut self, buf: &[u8], limits: FrameLimits) -> Result<Option<usize>, FrameError> {
        while let Some(&b) = buf.get(self.pos) {
            if self.literal_left > 0 {
                let take = self.literal_left.min(buf.len() - self.pos);
                self.pos += take;
                self.literal_left -= take;
                if self.literal_left == 0 {
                    self.line_begin = self.pos;
                }
                continue;
            }
            self.pos += 1;
            if self.pos > limits.total {
                return Err(FrameError::TooBig);
            }
            let after_cr = self.pos >= self.line_begin + 2 && buf.get(self.pos - 2) == Some(&b'\r');
            if b == b'\n' && after_cr {
                let line = buf.get(self.line_begin..self.pos - 2).unwrap_or_default();
                if line.len() > limits.line {
                    return Err(FrameError::LineTooLong);
                }
                let literal = if self.in_quote { None } else { trailing_literal(line) };
                self.in_quote = false;
                self.escaped = false;
                match literal {
                    Some(n) if n > limits.literal => return Err(FrameError::LiteralTooBig),
                    Some(n) if self.pos.saturating_add(n) > limits.total => return Err(FrameError::TooBig),
                    Some(n) => {
                        self.literal_left = n;
                        self.line_begin = self.pos;
                    }
                    None => return Ok(Some(self.pos)),
                }
                continue;
            }
            if self.in_quote {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_quote = false;
                }
            } else if b == b'"' {
                self.in_quote = true;
            }
            if self.pos - self.line_begin > limits.line + 1 {
                return Err(FrameError::LineTooLong);
            }
        }
        Ok(None)
    }
}

/// The literal announced at the end of a line (`{N}` or `{N+}`): N.
fn trailing_literal(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = inner.get(open + 1..)?;
    let digits = spec.strip_suffix(b"+").unwrap_or(spec);
    parse_number(digits)
}

/// A decimal length of at most 10 digits (no overflow on any platform that matters).
fn parse_number(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse::<usize>().ok()
}

/// One token of a framed unit.
#[derive(Debug)]
pub(crate) enum Token {
    /// A bare word: a command or response name, a number, a response-code atom.
    Atom(String),
    /// A quoted string or literal, unescaped. Secret: it may be a SASL response.
    Str(SecretBytes),
    /// `(`
    Open,
    /// `)`
    Close,
}

/// The unit does not follow the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Splits a framed unit (ending with CRLF) into tokens separated by single spaces (none
/// needed inside parentheses). Quoted strings take `\"` and `\\` escapes and no CR, LF or
/// NUL; a literal `{N+}`/`{N}` CRLF is followed by exactly N octets.
pub(crate) fn tokenize(unit: &[u8]) -> Result<Vec<Token>, Malformed> {
    let body = unit.strip_suffix(b"\r\n").ok_or(Malformed)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let after_open = matches!(out.last(), None | Some(Token::Open));
        if !after_open && body.get(i) != Some(&b')') {
            if body.get(i) != Some(&b' ') {
                return Err(Malformed);
            }
            i += 1;
        }
        let Some(&b) = body.get(i) else { return Err(Malformed) };
        match b {
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b')' => {
                out.push(Token::Close);
                i += 1;
            }
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match body.get(i) {
                        None | Some(b'\r' | b'\n' | 0) => {
                            zeroize::Zeroize::zeroize(&mut s);
                            return Err(Malformed);
                        }
                        Some(b'"') => break,
                        Some(b'\\') => match body.get(i + 1) {
                            Some(&c @ (b'"' | b'\\')) => {
                                s.push(c);
                                i += 1;
                            }
                            _ => {
                                zeroize::Zeroize::zeroize(&mut s);
                                return Err(Malformed);
                            }
                        },
                        Some(&c) => s.push(c),
                    }
                    i += 1;
                }
                i += 1;
                out.push(Token::Str(SecretBytes::from(s)));
            }
            b'{' => {
                let close = body.get(i..).and_then(|r| r.iter().position(|c| *c == b'}')).ok_or(Malformed)?;
                let spec = body.get(i + 1..i + close).ok_or(Malformed)?;
                let n = parse_number(spec.strip_suffix(b"+").unwrap_or(spec)).ok_or(Malformed)?;
                let data_start = i + close + 3;
                if body.get(i + close + 1..data_start) != Some(b"\r\n") {
                    return Err(Malformed);
                }
                let data = body.get(data_start..data_start.checked_add(n).ok_or(Malformed)?).ok_or(Malformed)?;
                out.push(Token::Str(SecretBytes::from(data.to_vec())));
                i = data_start + n;
            }
            _ => {
                let len = body.get(i..).unwrap_or_default().iter().take_while(|c| is_atom_char(**c)).count();
                if len == 0 {
                    return Err(Malformed);
                }
                let atom = body.get(i..i + len).ok_or(Malformed)?;
                out.push(Token::Atom(String::from_utf8_lossy(atom).into_owned()));
                i += len;
            }
        }
    }
    Ok(out)
}

fn is_atom_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'"' | b'(' | b')' | b'{' | b'}' | b'\\')
}

#[cfg(test)]
#[path = "sieve_tests.rs"]
mod tests;
