//! The SMTP submission server, sans-IO: greeting, EHLO, STARTTLS, AUTH, and — once
//! authenticated — the mail transaction with the sender policy applied.
//!
//! The driver feeds client bytes ([`Machine::feed`]) and asks what to do
//! ([`Machine::next`]). Before authentication everything is answered here. After it,
//! MAIL, RCPT and RSET are checked here and forwarded upstream one at a time
//! ([`Action::Forward`]); upstream's reply goes back to the client unchanged, so a step
//! upstream refused is never reported as a success. DATA is answered `354` here; the
//! header section (bounded) is checked against the sender policy, and only then is
//! DATA sent upstream and the message streamed through byte for byte — a refused
//! message never reaches upstream.
//!
//! Lines end with CRLF. A bare LF or bare CR is refused the same way everywhere:
//! in a command line with `500 5.5.2`, in message data by refusing the message
//! (SMTP smuggling: one end-of-data rule on both sides of the proxy).

use crate::proto::from_header::{self, Ambiguity};
use crate::proto::imap::base64 as b64encode;
use crate::proto::sasl::{self, BearerMechanism, Credentials, OAuthOffer, SaslError};
use crate::proto::{Goodbye, Machine, Next};
use base64::Engine as _;
use smtp_proto::{EhloResponse, Request};

/// Bounds on what a client may send (SECURITY.md §F, §P).
pub mod limits {
    /// A command line including CRLF (RFC 5321 §4.5.3.1.4).
    pub const MAX_LINE: usize = 512;
    /// An AUTH command or SASL response line (RFC 4954 §4; Postfix `smtpd_sasl_response_limit`).
    pub const MAX_AUTH_LINE: usize = 12_288;
    /// The header section of a message, which is buffered for the sender check.
    pub const MAX_HEADER: usize = 64 * 1024;
    /// Errors before the connection is closed (Postfix `smtpd_hard_error_limit 20`).
    pub const MAX_ERRORS: u32 = 20;
    /// Failed authentications on one connection.
    pub const MAX_AUTH_FAILURES: u32 = 3;
    /// Commands of any kind before authentication (freenginx `max_commands 1000`).
    pub const MAX_COMMANDS_PREAUTH: u32 = 1000;
}
use limits::*;

/// What only the driver can act on (see [`Machine`]).
#[derive(Debug)]
pub enum Action {
    /// Check these credentials, then call [`Submission::auth_succeeded`] or [`Submission::auth_failed`].
    Authenticate(Credentials),
    /// The exchange failed before any password check; apply the failure delay, then call
    /// [`Submission::auth_failed`] with this reply.
    Refuse(AuthReply),
    /// Send this command line (CRLF included) upstream, read the whole reply and give it
    /// to [`Submission::upstream_reply`]. The upstream session may have to be (re)opened first.
    Forward(Vec<u8>),
    /// Send `DATA` upstream. On `354`, send `head`; then if `complete` read the final reply
    /// and call [`Submission::upstream_reply`], else call [`Submission::data_accepted`]. On any other
    /// reply call [`Submission::data_refused`] with it.
    StartData {
        /// The message so far (dot-stuffed, as the client sent it).
        head: Vec<u8>,
        /// `head` ends with the end-of-data line.
        complete: bool,
    },
    /// More message bytes: send them upstream as they are.
    DataChunk(Vec<u8>),
    /// The last message bytes, end-of-data line included: send them, read the final reply,
    /// call [`Submission::upstream_reply`].
    EndData(Vec<u8>),
    /// The message being streamed must not be delivered: close the upstream connection
    /// without sending end-of-data (upstream then discards it). Open a new one when needed.
    AbortUpstream,
}

/// What [`Machine::next`] returns. After [`Next::Close`], say QUIT upstream.
pub type Step = Next<Action>;

/// Protocol errors before authentication after which every reply waits (Postfix
/// `smtpd_soft_error_limit`; the wait is the driver's).
pub const SOFT_ERROR_LIMIT: u32 = 10;

/// The last reply of an SMTP connection that mailgate ends.
pub fn goodbye(why: Goodbye) -> &'static [u8] {
    match why {
        Goodbye::Timeout | Goodbye::Idle => b"421 4.4.2 Timeout, closing connection\r\n",
        Goodbye::Shutdown => b"421 4.3.2 Server shutting down, please reconnect\r\n",
        Goodbye::Revoked => b"421 4.7.0 Access revoked\r\n",
        Goodbye::TooLong => b"421 4.4.2 Session too long\r\n",
    }
}

impl Machine for Submission {
    type Event = Action;
    /// Bytes read from the client.
    fn feed(&mut self, bytes: &[u8]) {
        match self.state {
            // Plaintext that arrives while TLS is set up is never executed (CVE-2011-0411).
            State::TlsPending | State::AwaitTls | State::Closed => {}
            _ => self.buf.extend_from_slice(bytes),
        }
    }

    /// The next thing to do.
    fn next(&mut self) -> Step {
        loop {
            if !self.out.is_empty() {
                return Next::Write(std::mem::take(&mut self.out));
            }
            let step = match &self.state {
                State::Closed => return Next::Close,
                State::Authenticating
                | State::AwaitTls
                | State::Forwarded(_)
                | State::DataStarting { .. }
                | State::DataEnding => return Next::NeedInput,
                State::TlsPending => {
                    self.state = State::AwaitTls;
                    self.buf.clear();
                    return Next::StartTls;
                }
                State::Command { .. } => self.step_command(),
                State::Sasl(_) => self.step_sasl(),
                State::Header => self.step_header(),
                State::Streaming => self.step_stream(),
                State::Draining { .. } => self.step_drain(),
                State::SilentRset => {
                    self.rset_silent = true;
                    self.state = State::Forwarded(Pending::Rset);
                    return Next::Event(Action::Forward(b"RSET\r\n".to_vec()));
                }
            };
            if let Some(action) = step {
                if matches!(action, Next::NeedInput) && !self.out.is_empty() {
                    continue;
                }
                return action;
            }
        }
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over (RFC 3207 §4.2).
    fn tls_started(&mut self) {
        if matches!(self.state, State::AwaitTls) {
            self.tls = true;
            self.starttls_allowed = false;
            self.ehlo_done = false;
            self.buf.clear();
            self.state = State::Command { discarding: false };
            self.first_line_checked = false;
        }
    }

    fn slow_down(&self) -> bool {
        !self.authenticated && self.errors > SOFT_ERROR_LIMIT
    }

    fn goodbye(&self, why: Goodbye) -> Option<&'static [u8]> {
        Some(goodbye(why))
    }
}

/// What the upstream server honours, so that only that is offered to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extensions {
    /// `8BITMIME`.
    pub eight_bit_mime: bool,
    /// `SMTPUTF8`.
    pub smtputf8: bool,
    /// Upstream's `SIZE` limit, if it announced one (0: none).
    pub size: Option<usize>,
}

impl Extensions {
    /// Reads upstream's EHLO keywords (upper-case, parameters kept).
    pub fn from_ehlo(keywords: &[String]) -> Extensions {
        let has = |k: &str| keywords.iter().any(|c| c.split_ascii_whitespace().next() == Some(k));
        let size = keywords.iter().find_map(|c| {
            let mut it = c.split_ascii_whitespace();
            (it.next() == Some("SIZE")).then(|| it.next().and_then(|n| n.parse().ok())).flatten()
        });
        Extensions { eight_bit_mime: has("8BITMIME"), smtputf8: has("SMTPUTF8"), size }
    }

    /// Before upstream was ever asked: offer 8BITMIME (all current MTAs honour it), not SMTPUTF8.
    pub fn unknown() -> Extensions {
        Extensions { eight_bit_mime: true, smtputf8: false, size: None }
    }
}

/// How a failed authentication is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// `535 5.7.8`: wrong or unknown credentials (one answer for every cause).
    Failed,
    /// `535 5.7.8` too: the client asked to act as another user.
    AuthzFailed,
    /// `501`: cancelled or not base64.
    Aborted(&'static str),
    /// `534 5.7.9`: a 2FA account sent its account password; the text says where to make
    /// an app password (the Gmail convention).
    NeedsAppPassword(String),
    /// `454 4.7.0`: try again later.
    Unavailable,
    /// `421 4.7.0`-like refusal: too many sessions of this account from this address.
    TooMany,
}

#[derive(Debug, PartialEq, Eq)]
enum Mech {
    Plain,
    LoginUser,
    LoginPass(String),
    /// `AUTH XOAUTH2`/`OAUTHBEARER` without an initial response got `334 `.
    Bearer(BearerMechanism),
    /// A refused token got its error challenge (`334 <base64 JSON>`); any answer line
    /// ends the exchange with `535`.
    BearerError,
}

#[derive(Debug)]
enum State {
    /// Reading command lines. `discarding`: dropping the rest of an over-long line.
    Command {
        discarding: bool,
    },
    Sasl(Mech),
    Authenticating,
    TlsPending,
    AwaitTls,
    /// A command was forwarded; waiting for upstream's reply.
    Forwarded(Pending),
    /// Collecting the header section of a message (after our `354`).
    Header,
    /// DATA sent upstream; waiting for its reply.
    DataStarting {
        complete: bool,
    },
    /// Streaming the message upstream.
    Streaming,
    /// Reading the rest of a refused message; then answer with `reply`.
    Draining {
        reply: String,
    },
    /// Upstream may still hold a transaction the client no longer has: send it RSET and
    /// drop the reply.
    SilentRset,
    /// End-of-data sent; waiting for upstream's final reply.
    DataEnding,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Mail,
    Rcpt,
    Rset,
}

/// Byte-level scanner of message data: finds the end-of-data line (`CRLF . CRLF`), the
/// end of the header section, and any bare CR or LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    LineStart,
    InLine,
    Cr,
    Dot,
    DotCr,
    EmptyCr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanEvent {
    /// The header section ended at this offset (after its blank line).
    HeaderEnd(usize),
    /// End-of-data; the message (and its end line) ends at this offset.
    End(usize),
    /// A bare CR or LF at this offset.
    Bare,
}

/// The SMTP session of one client connection.
pub struct Submission {
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    hostname: String,
    tls: bool,
    starttls_allowed: bool,
    ehlo_done: bool,
    /// Addresses this account may send as (lower-case); empty until authenticated.
    senders: Vec<String>,
    /// An app password's `--send-to` rules (addresses, `@domain`; lower-case); empty:
    /// any recipient.
    send_to: Vec<String>,
    authenticated: bool,
    in_transaction: bool,
    recipients: usize,
    max_size: usize,
    errors: u32,
    commands: u32,
    /// The first line (of the connection, or after STARTTLS) was checked for another
    /// protocol's request ([`crate::proto::foreign`]).
    first_line_checked: bool,
    failures: u32,
    scan: Scan,
    /// Bytes of `buf` already scanned (Header state).
    scan_pos: usize,
    /// Octets of the current message seen so far.
    message_len: usize,
    /// Of those, octets that do not count toward the size (stuffing dots, the end line).
    excluded: usize,
    header_seen: bool,
    /// The pending RSET is ours, not the client's: its reply is not shown.
    rset_silent: bool,
    ext: Extensions,
    /// XOAUTH2 and OAUTHBEARER are offered (inside TLS, as every mechanism).
    oauth: Option<OAuthOffer>,
    /// The credentials with the driver are a bearer token sent with this mechanism: a
    /// refusal gets the mechanism's error challenge first.
    bearer: Option<BearerMechanism>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("state", &self.state)
            .field("tls", &self.tls)
            .field("authenticated", &self.authenticated)
            .field("buffered", &self.buf.len())
            .field("errors", &self.errors)
            .finish()
    }
}

const TOO_MANY_ERRORS: &str = "421 4.7.0 Too many errors, closing connection\r\n";

impl Submission {
    /// A new connection. `tls`: already encrypted (implicit TLS); `starttls_allowed`: this
    /// listener offers STARTTLS; `max_size`: the SIZE limit in octets.
    pub fn new(hostname: &str, tls: bool, starttls_allowed: bool, max_size: usize) -> Submission {
        let mut s = Submission {
            state: State::Command { discarding: false },
            buf: Vec::new(),
            out: Vec::new(),
            hostname: hostname.to_string(),
            tls,
            starttls_allowed: starttls_allowed && !tls,
            ehlo_done: false,
            senders: Vec::new(),
            send_to: Vec::new(),
            authenticated: false,
            in_transaction: false,
            recipients: 0,
            max_size,
            errors: 0,
            commands: 0,
            first_line_checked: false,
            failures: 0,
            scan: Scan::LineStart,
            scan_pos: 0,
            message_len: 0,
            excluded: 0,
            header_seen: false,
            rset_silent: false,
            ext: Extensions { eight_bit_mime: true, smtputf8: true, size: None },
            oauth: None,
            bearer: None,
        };
        s.reply(&format!("220 {hostname} ESMTP mailgate ready"));
        s
    }

    /// Offer only what upstream honours end to end (call before the first EHLO).
    pub fn set_upstream_extensions(&mut self, ext: Extensions) {
        if let Some(limit) = ext.size.filter(|n| *n > 0) {
            self.max_size = self.max_size.min(limit);
        }
        self.ext = ext;
    }

    /// Offer and accept XOAUTH2 and OAUTHBEARER (`[oauth] enabled`); call before the
    /// first EHLO. Inside TLS only, like PLAIN and LOGIN.
    pub fn set_oauth(&mut self, oauth: Option<OAuthOffer>) {
        self.oauth = oauth;
    }

    /// Protocol errors so far (the driver slows down past 10, like Postfix).
    pub fn errors(&self) -> u32 {
        self.errors
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn close_with(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.buf.clear();
        self.state = State::Closed;
    }

    /// Counts a protocol error; past [`MAX_ERRORS`] the connection closes.
    fn error(&mut self, line: &str) {
        self.reply(line);
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.close_with(TOO_MANY_ERRORS);
        }
    }

    /// The credentials were accepted and the upstream session is open. `senders`: the
    /// addresses the account may send as.
    pub fn auth_succeeded(&mut self, senders: Vec<String>) {
        if matches!(self.state, State::Authenticating) {
            self.senders = senders.into_iter().map(|s| s.to_lowercase()).collect();
            self.authenticated = true;
            self.reply("235 2.7.0 Authentication successful");
            self.state = State::Command { discarding: false };
        }
    }

    /// The credentials were refused (or the exchange failed).
    ///
    /// A bearer token refused by the gate ([`AuthReply::Failed`]) first gets the
    /// mechanism's error challenge (`334 <base64 JSON>`, RFC 7628 §3.2.3, Google's
    /// XOAUTH2); `535 5.7.8` follows the client's answer, whatever it is. Thunderbird
    /// (comm-central `SmtpClient.sys.mjs`, `_actionAUTH_XOAUTH2`) answers any non-2xx
    /// reply to `AUTH XOAUTH2 <token>` with an empty line and then reads the final reply;
    /// a bare `535` instead of the challenge would be taken as that answer's trigger and
    /// its empty line would meet a command prompt (`500`).
    pub fn auth_failed(&mut self, reply: AuthReply) {
        if !matches!(self.state, State::Authenticating) {
            return;
        }
        let bearer = self.bearer.take();
        if let (AuthReply::Failed, Some(mech), Some(offer)) = (&reply, bearer, &self.oauth) {
            let line = format!("334 {}", offer.error_challenge(mech));
            self.reply(&line);
            self.state = State::Sasl(Mech::BearerError);
            return;
        }
        self.state = State::Command { discarding: false };
        let line = match reply {
            AuthReply::Failed | AuthReply::AuthzFailed => "535 5.7.8 Authentication credentials invalid".to_string(),
            AuthReply::Aborted(text) => format!("501 {text}"),
            // Every time: SMTP clients show only the last reply (smtplib and many apps
            // fall back from PLAIN to LOGIN, and a bare 535 then hides the link). IMAP
            // keeps its one [ALERT] per connection: Thunderbird shows each as a dialog.
            AuthReply::NeedsAppPassword(text) => {
                format!("534 5.7.9 Application-specific password required. {}", one_line(&text))
            }
            AuthReply::Unavailable => "454 4.7.0 Temporary authentication failure, try again later".to_string(),
            AuthReply::TooMany => "454 4.7.0 Too many connections for this account from your address".to_string(),
        };
        self.reply(&line);
        self.count_auth_failure();
    }

    /// Counts a failed authentication; the [`MAX_AUTH_FAILURES`]th closes the connection.
    fn count_auth_failure(&mut self) {
        self.failures += 1;
        if self.failures >= MAX_AUTH_FAILURES {
            self.close_with("421 4.7.0 Too many authentication failures\r\n");
        }
    }

    /// Upstream's whole reply to a forwarded command or to the end of a message.
    /// `code` is its three-digit code; `raw` its lines (CRLF included).
    pub fn upstream_reply(&mut self, code: u16, raw: &[u8]) {
        let ok = (200..300).contains(&code);
        match std::mem::replace(&mut self.state, State::Command { discarding: false }) {
            State::Forwarded(Pending::Mail) => self.in_transaction = ok,
            State::Forwarded(Pending::Rcpt) => self.recipients += usize::from(ok),
            State::Forwarded(Pending::Rset) => {
                self.reset_transaction();
                if std::mem::take(&mut self.rset_silent) {
                    return;
                }
            }
            State::DataEnding | State::DataStarting { complete: true } => self.reset_transaction(),
            other => {
                self.state = other;
                return;
            }
        }
        self.out.extend_from_slice(raw);
    }

    /// Upstream answered `354` to DATA and has the head of the message: stream the rest.
    pub fn data_accepted(&mut self) {
        if matches!(self.state, State::DataStarting { complete: false }) {
            self.state = State::Streaming;
        }
    }

    /// Upstream refused DATA: read the rest of the message, then answer with its reply.
    pub fn data_refused(&mut self, raw: &[u8]) {
        if let State::DataStarting { complete } = self.state {
            let reply = String::from_utf8_lossy(raw).trim_end().to_string();
            let reply = if reply.is_empty() { "451 4.3.0 Upstream refused the message".into() } else { reply };
            if complete {
                self.reply(&reply);
                self.reset_transaction();
                self.state = State::SilentRset;
            } else {
                self.state = State::Draining { reply };
            }
        }
    }

    /// The upstream connection failed during a forwarded step: answer with a temporary
    /// error and forget the transaction (it must be started again).
    pub fn upstream_failed(&mut self) {
        if matches!(self.state, State::Forwarded(Pending::Rset)) && self.rset_silent {
            // Our own RSET: the client asked nothing, so it is told nothing.
            self.rset_silent = false;
            self.reset_transaction();
            self.state = State::Command { discarding: false };
            return;
        }
        match std::mem::replace(&mut self.state, State::Command { discarding: false }) {
            State::Forwarded(_) | State::DataEnding | State::DataStarting { complete: true } => {
                self.reset_transaction();
                self.reply("451 4.4.1 Upstream server unavailable, try again later");
            }
            State::DataStarting { complete: false } | State::Streaming => {
                self.reset_transaction();
                self.state = State::Draining { reply: "451 4.4.1 Upstream server unavailable, try again later".into() };
            }
            other => self.state = other,
        }
    }

    fn reset_transaction(&mut self) {
        self.in_transaction = false;
        self.recipients = 0;
    }

    fn ehlo_reply(&self) -> Vec<u8> {
        let mut e = EhloResponse::new(self.hostname.as_str());
        e.capabilities = smtp_proto::EXT_PIPELINING | smtp_proto::EXT_SIZE | smtp_proto::EXT_ENHANCED_STATUS_CODES;
        if self.ext.eight_bit_mime {
            e.capabilities |= smtp_proto::EXT_8BIT_MIME;
        }
        if self.ext.smtputf8 {
            e.capabilities |= smtp_proto::EXT_SMTP_UTF8;
        }
        e.size = self.max_size;
        if self.tls {
            e.capabilities |= smtp_proto::EXT_AUTH;
            e.auth_mechanisms = smtp_proto::AUTH_PLAIN | smtp_proto::AUTH_LOGIN;
            if self.oauth.is_some() {
                e.auth_mechanisms |= smtp_proto::AUTH_XOAUTH2 | smtp_proto::AUTH_OAUTHBEARER;
            }
        } else if self.starttls_allowed {
            e.capabilities |= smtp_proto::EXT_START_TLS;
        }
        let mut out = Vec::new();
        let _ = e.write(&mut out);
        // smtp-proto greets with a joke on the first line; say just the host name.
        if let Some(end) = out.windows(2).position(|w| w == b"\r\n") {
            let sep = out.get(3).copied().unwrap_or(b' ');
            let mut first = format!("250{}{}", sep as char, self.hostname).into_bytes();
            first.extend_from_slice(&out[end..]);
            out = first;
        }
        out
    }

    /// Takes the next complete line from `buf` (without CRLF). `Err(())`: a bare LF/CR.
    fn take_line(&mut self, limit: usize) -> LineResult {
        let Some(lf) = self.buf.iter().position(|b| *b == b'\n') else {
            if self.buf.len() > limit {
                return LineResult::TooLong;
            }
            return LineResult::Incomplete;
        };
        let line: Vec<u8> = self.buf.drain(..=lf).collect();
        if line.len() > limit {
            return LineResult::TooLongComplete;
        }
        let body = match line.strip_suffix(b"\r\n") {
            Some(b) => b,
            None => return LineResult::Bare,
        };
        if body.contains(&b'\r') {
            return LineResult::Bare;
        }
        LineResult::Line(body.to_vec())
    }

    fn step_command(&mut self) -> Option<Step> {
        if let State::Command { discarding: true } = self.state {
            let Some(lf) = self.buf.iter().position(|b| *b == b'\n') else {
                self.buf.clear();
                return Some(Next::NeedInput);
            };
            self.buf.drain(..=lf);
            self.state = State::Command { discarding: false };
        }
        if self.buf.is_empty() {
            return Some(Next::NeedInput);
        }
        match crate::proto::foreign::gate(&mut self.first_line_checked, &self.buf) {
            crate::proto::foreign::Gate::Go => {}
            crate::proto::foreign::Gate::Wait => return Some(Next::NeedInput),
            // Another protocol's request: closed at once, nothing of it echoed.
            crate::proto::foreign::Gate::Close => {
                self.buf.clear();
                self.state = State::Closed;
                return Some(Next::Close);
            }
        }
        // AUTH lines may be long (initial responses); others may not.
        let is_auth = self.buf.len() >= 5 && self.buf[..5].eq_ignore_ascii_case(b"AUTH ");
        let limit = if is_auth { MAX_AUTH_LINE } else { MAX_LINE };
        let line = match self.take_line(limit) {
            LineResult::Incomplete => return Some(Next::NeedInput),
            LineResult::TooLong => {
                self.buf.clear();
                self.state = State::Command { discarding: true };
                self.error(if is_auth {
                    "500 5.5.6 Authentication Exchange line is too long"
                } else {
                    "500 5.5.2 Line too long"
                });
                return None;
            }
            LineResult::TooLongComplete => {
                self.error(if is_auth {
                    "500 5.5.6 Authentication Exchange line is too long"
                } else {
                    "500 5.5.2 Line too long"
                });
                return None;
            }
            LineResult::Bare => {
                self.error("500 5.5.2 Bare CR or LF is not allowed; lines end with CRLF");
                return None;
            }
            LineResult::Line(l) => l,
        };
        self.commands += 1;
        if !self.authenticated && self.commands > MAX_COMMANDS_PREAUTH {
            self.close_with("421 4.7.0 Too many commands without authentication\r\n");
            return None;
        }
        self.command(line)
    }

    fn command(&mut self, line: Vec<u8>) -> Option<Step> {
        let mut with_crlf = line.clone();
        with_crlf.extend_from_slice(b"\r\n");
        let parsed = Request::parse(&mut with_crlf.iter());
        let req = match parsed {
            Ok(r) => r,
            Err(smtp_proto::Error::UnknownCommand) => {
                self.error("500 5.5.1 Unknown command");
                return None;
            }
            Err(smtp_proto::Error::SyntaxError { syntax }) => {
                self.error(&format!("501 5.5.4 Syntax: {syntax}"));
                return None;
            }
            Err(smtp_proto::Error::InvalidSenderAddress) => {
                self.error("501 5.1.7 Invalid sender address");
                return None;
            }
            Err(smtp_proto::Error::InvalidRecipientAddress) => {
                self.error("501 5.1.3 Invalid recipient address");
                return None;
            }
            Err(smtp_proto::Error::UnsupportedParameter { .. } | smtp_proto::Error::InvalidParameter { .. }) => {
                self.error("555 5.5.4 Unsupported parameter");
                return None;
            }
            Err(_) => {
                self.error("500 5.5.2 Syntax error");
                return None;
            }
        };
        match req {
            Request::Ehlo { .. } => {
                self.ehlo_done = true;
                let ehlo = self.ehlo_reply();
                self.out.extend_from_slice(&ehlo);
                return self.abandon_transaction();
            }
            Request::Helo { .. } => {
                self.ehlo_done = true;
                let h = self.hostname.clone();
                self.reply(&format!("250 {h}"));
                return self.abandon_transaction();
            }
            Request::Lhlo { .. } => self.error("500 5.5.1 LHLO is for LMTP"),
            Request::StartTls if self.tls => self.error("503 5.5.1 TLS is already active"),
            Request::StartTls if !self.starttls_allowed => self.error("502 5.5.1 STARTTLS is not offered here"),
            Request::StartTls => {
                self.reply("220 2.0.0 Ready to start TLS");
                // Anything pipelined after STARTTLS is dropped, never executed inside TLS.
                self.buf.clear();
                self.state = State::TlsPending;
            }
            Request::Auth { .. } if !self.tls => {
                self.error("530 5.7.0 Must issue a STARTTLS command first");
            }
            Request::Auth { .. } if self.authenticated => self.error("503 5.5.1 Already authenticated"),
            Request::Auth { .. } if self.in_transaction => self.error("503 5.5.1 Not during a mail transaction"),
            Request::Auth { mechanism, initial_response } => {
                let ir = initial_response.to_string();
                return self.auth_start(mechanism, &ir);
            }
            Request::Noop { .. } => self.reply("250 2.0.0 OK"),
            Request::Quit => {
                self.reply(&format!("221 2.0.0 {} closing connection", self.hostname));
                self.buf.clear();
                self.state = State::Closed;
            }
            Request::Rset if self.authenticated => {
                self.state = State::Forwarded(Pending::Rset);
                return Some(Next::Event(Action::Forward(with_crlf)));
            }
            Request::Rset => {
                self.reset_transaction();
                self.reply("250 2.0.0 OK");
            }
            Request::Help { .. } => self.reply("214 2.0.0 mailgate: see RFC 5321"),
            Request::Vrfy { .. } => self.reply("252 2.5.0 Cannot VRFY user"),
            Request::Mail { .. } | Request::Rcpt { .. } | Request::Data if !self.tls => {
                self.error("530 5.7.0 Must issue a STARTTLS command first");
            }
            Request::Mail { .. } | Request::Rcpt { .. } | Request::Data if !self.authenticated => {
                self.error("530 5.7.0 Authentication required");
            }
            Request::Mail { .. } if !self.ehlo_done => self.error("503 5.5.1 Send EHLO first"),
            Request::Mail { .. } if self.in_transaction => self.error("503 5.5.1 Nested MAIL command"),
            Request::Mail { from } => {
                if from.flags & smtp_proto::MAIL_SMTPUTF8 != 0 && !self.ext.smtputf8 {
                    self.reply("555 5.5.4 SMTPUTF8 is not offered");
                    return None;
                }
                if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 && !self.ext.eight_bit_mime {
                    self.reply("555 5.5.4 BODY=8BITMIME is not offered");
                    return None;
                }
                if from.size > self.max_size || size_param_overflows(&line) {
                    self.reply(&format!("552 5.3.4 Message size exceeds the limit of {} bytes", self.max_size));
                    return None;
                }
                let address = from.address.to_string();
                if !self.may_send_as(&address) {
                    let shown = if address.is_empty() { "<>".to_string() } else { address };
                    self.reply(&format!("553 5.7.1 Sender address {} is not one of your addresses", one_line(&shown)));
                    return None;
                }
                // AUTH=<someone> would make upstream record that someone as the
                // authenticated submitter (Postfix: sasl_sender). Upstream knows who logged
                // in; the parameter is dropped and the rest of the line goes as sent.
                let forward = if from.auth.is_some() {
                    match without_auth_param(&line) {
                        Ok(mut rewritten) => {
                            rewritten.extend_from_slice(b"\r\n");
                            rewritten
                        }
                        Err(_) => {
                            self.error("501 5.5.4 Syntax: MAIL FROM:<reverse-path> [parameters]");
                            return None;
                        }
                    }
                } else {
                    with_crlf
                };
                self.state = State::Forwarded(Pending::Mail);
                return Some(Next::Event(Action::Forward(forward)));
            }
            Request::Rcpt { .. } if !self.in_transaction => self.error("503 5.5.1 Need MAIL command first"),
            Request::Rcpt { to } if !self.may_send_to(to.address.as_ref()) => {
                let shown = one_line(to.address.as_ref());
                self.reply(&format!(
                    "550 5.7.1 Recipient <{shown}> refused: this app password may send only to {}",
                    self.send_to.join(", ")
                ));
            }
            Request::Rcpt { .. } => {
                self.state = State::Forwarded(Pending::Rcpt);
                return Some(Next::Event(Action::Forward(with_crlf)));
            }
            Request::Data if !self.in_transaction => self.error("503 5.5.1 Need MAIL command first"),
            Request::Data if self.recipients == 0 => self.reply("554 5.5.1 No valid recipients"),
            Request::Data => {
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                self.scan = Scan::LineStart;
                self.scan_pos = 0;
                self.message_len = 0;
                self.excluded = 0;
                self.header_seen = false;
                self.state = State::Header;
            }
            Request::Bdat { .. } => self.error("502 5.5.1 CHUNKING is not offered"),
            other => self.error(&format!("502 5.5.1 {} is not implemented", other.name())),
        }
        None
    }

    /// EHLO/HELO reset the transaction; upstream must forget it too.
    fn abandon_transaction(&mut self) -> Option<Step> {
        if self.authenticated && self.in_transaction {
            self.reset_transaction();
            // Reply already written; upstream's RSET reply is dropped by `upstream_reply`.
            self.state = State::Forwarded(Pending::Rset);
            self.rset_silent = true;
            return Some(Next::Event(Action::Forward(b"RSET\r\n".to_vec())));
        }
        self.reset_transaction();
        None
    }

    /// An app password's `--send-to` rules (addresses, or `@domain` for a whole domain):
    /// `RCPT TO` outside them is refused here with `550 5.7.1` naming the rule, never
    /// forwarded. Call after [`Submission::auth_succeeded`].
    pub fn limit_recipients(&mut self, rules: &[String]) {
        self.send_to = rules.iter().map(|r| r.trim().to_lowercase()).collect();
    }

    /// Whether the command waiting for upstream's reply is a `RCPT TO` (the driver takes a
    /// send quota before it forwards one).
    pub fn forwarding_recipient(&self) -> bool {
        matches!(self.state, State::Forwarded(Pending::Rcpt))
    }

    fn may_send_to(&self, address: &str) -> bool {
        if self.send_to.is_empty() {
            return true;
        }
        let a = address.trim().to_lowercase();
        let domain = a.rsplit_once('@').map(|(_, d)| d);
        self.send_to.iter().any(|rule| match rule.strip_prefix('@') {
            Some(d) => domain == Some(d),
            None => *rule == a,
        })
    }

    fn may_send_as(&self, address: &str) -> bool {
        let a = address.trim().to_lowercase();
        !a.is_empty() && self.senders.contains(&a)
    }

    fn auth_start(&mut self, mechanism: u64, ir: &str) -> Option<Step> {
        let ir = ir.trim();
        match mechanism {
            smtp_proto::AUTH_PLAIN if ir.is_empty() => {
                self.reply("334 ");
                self.state = State::Sasl(Mech::Plain);
                None
            }
            smtp_proto::AUTH_PLAIN => Some(self.sasl_data(Mech::Plain, ir.as_bytes())),
            smtp_proto::AUTH_LOGIN if ir.is_empty() => {
                self.reply(&format!("334 {}", b64encode(b"Username:")));
                self.state = State::Sasl(Mech::LoginUser);
                None
            }
            smtp_proto::AUTH_LOGIN => Some(self.sasl_data(Mech::LoginUser, ir.as_bytes())),
            smtp_proto::AUTH_XOAUTH2 | smtp_proto::AUTH_OAUTHBEARER if self.oauth.is_some() => {
                let mech = if mechanism == smtp_proto::AUTH_XOAUTH2 {
                    BearerMechanism::XOAuth2
                } else {
                    BearerMechanism::OAuthBearer
                };
                if ir.is_empty() {
                    self.reply("334 ");
                    self.state = State::Sasl(Mech::Bearer(mech));
                    return None;
                }
                Some(self.sasl_data(Mech::Bearer(mech), ir.as_bytes()))
            }
            _ => {
                self.error("504 5.5.4 Unrecognized authentication type");
                None
            }
        }
    }

    fn step_sasl(&mut self) -> Option<Step> {
        if matches!(self.state, State::Sasl(Mech::BearerError)) {
            return self.step_bearer_error();
        }
        let line = match self.take_line(MAX_AUTH_LINE) {
            LineResult::Incomplete => return Some(Next::NeedInput),
            LineResult::TooLong => {
                self.buf.clear();
                self.state = State::Command { discarding: true };
                self.error("500 5.5.6 Authentication Exchange line is too long");
                return None;
            }
            LineResult::TooLongComplete => {
                // The whole line was taken out: what follows is the next command.
                self.state = State::Command { discarding: false };
                self.error("500 5.5.6 Authentication Exchange line is too long");
                return None;
            }
            LineResult::Bare => {
                self.state = State::Authenticating;
                return Some(Next::Event(Action::Refuse(AuthReply::Aborted("5.5.2 Invalid authentication line"))));
            }
            LineResult::Line(l) => crate::secret::SecretBytes::from(l),
        };
        let State::Sasl(mech) = std::mem::replace(&mut self.state, State::Authenticating) else { return None };
        if line.expose().as_slice() == b"*" {
            return Some(Next::Event(Action::Refuse(AuthReply::Aborted("5.7.0 Authentication cancelled"))));
        }
        Some(self.sasl_data(mech, line.expose()))
    }

    /// The answer to a refused token's error challenge: whatever it is (RFC 7628: `^A`;
    /// Thunderbird: an empty line), the exchange ends with `535`. It may repeat the token,
    /// so it is wiped unread.
    fn step_bearer_error(&mut self) -> Option<Step> {
        match self.take_line(MAX_AUTH_LINE) {
            LineResult::Incomplete => return Some(Next::NeedInput),
            LineResult::TooLong => {
                self.buf.clear();
                self.state = State::Command { discarding: true };
            }
            LineResult::Line(l) => {
                drop(crate::secret::SecretBytes::from(l));
                self.state = State::Command { discarding: false };
            }
            LineResult::TooLongComplete | LineResult::Bare => self.state = State::Command { discarding: false },
        }
        self.reply("535 5.7.8 Authentication credentials invalid");
        self.count_auth_failure();
        None
    }

    /// One base64 SASL response for `mech`.
    fn sasl_data(&mut self, mech: Mech, b64: &[u8]) -> Step {
        self.state = State::Authenticating;
        self.bearer = None;
        let decoded = if b64 == b"=" { Ok(Vec::new()) } else { base64::engine::general_purpose::STANDARD.decode(b64) };
        let Ok(data) = decoded else {
            return Next::Event(Action::Refuse(AuthReply::Aborted("5.5.2 Invalid base64 data")));
        };
        let data = crate::secret::SecretBytes::from(data);
        match mech {
            Mech::Plain => match sasl::decode_plain(data.expose()) {
                Ok(c) => Next::Event(Action::Authenticate(c)),
                Err(SaslError::AuthzidRefused) => Next::Event(Action::Refuse(AuthReply::AuthzFailed)),
                Err(SaslError::Malformed) => Next::Event(Action::Refuse(AuthReply::Failed)),
            },
            Mech::LoginUser => match sasl::check_username(data.expose()) {
                Ok(user) => {
                    self.reply(&format!("334 {}", b64encode(b"Password:")));
                    self.state = State::Sasl(Mech::LoginPass(user));
                    Next::NeedInput
                }
                Err(_) => Next::Event(Action::Refuse(AuthReply::Failed)),
            },
            Mech::LoginPass(user) => match sasl::check_password(data.expose()) {
                Ok(password) => Next::Event(Action::Authenticate(Credentials::password(user, password))),
                Err(_) => Next::Event(Action::Refuse(AuthReply::Failed)),
            },
            // A malformed message is a plain failure: no token was checked.
            Mech::Bearer(m) => match m.decode(data.expose()) {
                Ok(creds) => {
                    self.bearer = Some(m);
                    Next::Event(Action::Authenticate(creds))
                }
                Err(_) => Next::Event(Action::Refuse(AuthReply::Failed)),
            },
            // Not an exchange that decodes (answered by `step_bearer_error`).
            Mech::BearerError => Next::Event(Action::Refuse(AuthReply::Failed)),
        }
    }

    /// Scans `buf[from..]` and returns the first event with the offset just past it
    /// (or the end of `buf`). Counts the scanned octets into `message_len`.
    fn scan_data(&mut self, from: usize) -> (Option<ScanEvent>, usize) {
        let mut i = from;
        while i < self.buf.len() {
            if self.scan == Scan::InLine {
                // Inside a line only CR or LF can change anything: skip to the next one.
                match memchr::memchr2(b'\r', b'\n', &self.buf[i..]) {
                    Some(n) => i += n,
                    None => {
                        i = self.buf.len();
                        break;
                    }
                }
            }
            let b = self.buf[i];
            i += 1;
            let (next, event) = match (self.scan, b) {
                (Scan::LineStart, b'.') => (Scan::Dot, None),
                (Scan::LineStart, b'\r') => (Scan::EmptyCr, None),
                (Scan::EmptyCr, b'\n') if !self.header_seen => {
                    self.header_seen = true;
                    (Scan::LineStart, Some(ScanEvent::HeaderEnd(i)))
                }
                (Scan::Cr | Scan::EmptyCr, b'\n') => (Scan::LineStart, None),
                (Scan::Dot, b'\r') => (Scan::DotCr, None),
                (Scan::DotCr, b'\n') => {
                    self.excluded += 3;
                    (Scan::LineStart, Some(ScanEvent::End(i)))
                }
                (Scan::Dot, b) if b != b'\n' => {
                    // A stuffing dot: it is not part of the message.
                    self.excluded += 1;
                    (if b == b'\r' { Scan::Cr } else { Scan::InLine }, None)
                }
                (Scan::Cr | Scan::EmptyCr | Scan::DotCr, _) | (_, b'\n') => (Scan::InLine, Some(ScanEvent::Bare)),
                (_, b'\r') => (Scan::Cr, None),
                _ => (Scan::InLine, None),
            };
            self.scan = next;
            if event.is_some() {
                self.message_len += i - from;
                return (event, i);
            }
        }
        self.message_len += i - from;
        (None, i)
    }

    fn too_big(&self) -> String {
        format!("552 5.3.4 Message size exceeds the limit of {} bytes", self.max_size)
    }

    /// The message size as RFC 1870 counts it: without stuffing dots and without the
    /// end-of-data line (nor the start of one still arriving).
    fn counted_size(&self) -> usize {
        let pending = match self.scan {
            Scan::Dot => 1,
            Scan::DotCr => 2,
            _ => 0,
        };
        self.message_len.saturating_sub(self.excluded + pending)
    }

    fn step_header(&mut self) -> Option<Step> {
        let (event, at) = self.scan_data(self.scan_pos);
        self.scan_pos = at;
        let refusal = if self.counted_size() > self.max_size {
            Some(self.too_big())
        } else {
            match event {
                Some(ScanEvent::HeaderEnd(pos)) if pos > MAX_HEADER => Some(HEADER_TOO_BIG.to_string()),
                None if self.buf.len() > MAX_HEADER => Some(HEADER_TOO_BIG.to_string()),
                Some(ScanEvent::Bare) => Some(BARE_IN_DATA.to_string()),
                Some(ScanEvent::HeaderEnd(pos)) => self.check_headers(&self.buf[..pos]).err().map(|e| e.to_string()),
                Some(ScanEvent::End(pos)) => {
                    self.check_headers(&self.buf[..pos.saturating_sub(3)]).err().map(|e| e.to_string())
                }
                None => return Some(Next::NeedInput),
            }
        };
        if let Some(reply) = refusal {
            if let Some(ScanEvent::End(pos)) = event {
                // The whole message is here: answer now (nothing was sent upstream).
                self.buf.drain(..pos);
                self.scan_pos = 0;
                self.reply(&reply);
                self.reset_transaction();
                self.state = State::SilentRset;
                return None;
            }
            return self.refuse_message(reply);
        }
        let (pos, complete) = match event {
            Some(ScanEvent::HeaderEnd(pos)) => (pos, false),
            Some(ScanEvent::End(pos)) => (pos, true),
            _ => return Some(Next::NeedInput),
        };
        let head: Vec<u8> = self.buf.drain(..pos).collect();
        self.scan_pos = 0;
        self.state = State::DataStarting { complete };
        Some(Next::Event(Action::StartData { head, complete }))
    }

    /// The message will not be delivered: drop what was buffered, read the rest, then answer.
    fn refuse_message(&mut self, reply: String) -> Option<Step> {
        let scanned = self.scan_pos.min(self.buf.len());
        self.buf.drain(..scanned);
        self.scan_pos = 0;
        self.state = State::Draining { reply };
        None
    }

    fn step_stream(&mut self) -> Option<Step> {
        if self.buf.is_empty() {
            return Some(Next::NeedInput);
        }
        let (event, at) = self.scan_data(0);
        if self.counted_size() > self.max_size || event == Some(ScanEvent::Bare) {
            let reply = if event == Some(ScanEvent::Bare) { BARE_IN_DATA.to_string() } else { self.too_big() };
            self.buf.drain(..at);
            if let Some(ScanEvent::End(_)) = event {
                // The end line came with it: answer now. The upstream connection is closed
                // without the end line, so upstream discards what it got.
                self.reply(&reply);
                self.reset_transaction();
                self.state = State::SilentRset;
            } else {
                self.state = State::Draining { reply };
            }
            return Some(Next::Event(Action::AbortUpstream));
        }
        match event {
            Some(ScanEvent::End(pos)) => {
                let chunk: Vec<u8> = self.buf.drain(..pos).collect();
                self.state = State::DataEnding;
                Some(Next::Event(Action::EndData(chunk)))
            }
            _ => Some(Next::Event(Action::DataChunk(std::mem::take(&mut self.buf)))),
        }
    }

    fn step_drain(&mut self) -> Option<Step> {
        loop {
            let (event, at) = self.scan_data(0);
            match event {
                Some(ScanEvent::End(pos)) => {
                    self.buf.drain(..pos);
                    let State::Draining { reply } = std::mem::replace(&mut self.state, State::SilentRset) else {
                        return None;
                    };
                    self.reply(&reply);
                    self.reset_transaction();
                    return None;
                }
                // Nothing else matters any more: keep looking for the end line.
                Some(_) => {
                    self.buf.drain(..at);
                }
                None => {
                    self.buf.clear();
                    return Some(Next::NeedInput);
                }
            }
        }
    }

    /// The sender policy on the header section: exactly one `From:` and at most one
    /// `Sender:`, each with one reading ([`from_header::one_reading`]: one mailbox that every
    /// common reader agrees on) whose address is the account's.
    fn check_headers(&self, head: &[u8]) -> Result<(), HeaderRefusal> {
        let unstuffed = unstuff(head);
        // Only header fields and their continuation lines; no NUL or other control
        // characters but TAB: readers differ on such lines (a hidden second From:).
        for (n, line) in unstuffed.split(|b| *b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            if line.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
                return Err(HeaderRefusal::ControlCharacters);
            }
            let continuation = matches!(line.first(), Some(b' ' | b'\t')) && n > 0;
            // A field name, then (obsolete syntax) optional blanks, then the colon.
            let field = line.iter().position(|b| *b == b':').is_some_and(|colon| {
                let name = line[..colon].trim_ascii_end();
                !name.is_empty() && name.iter().all(|b| (33..=126).contains(b))
            });
            if !continuation && !field {
                return Err(HeaderRefusal::MalformedLine);
            }
        }
        let Some(msg) = mail_parser::MessageParser::default().parse_headers(&unstuffed) else {
            return Err(HeaderRefusal::Unparsable);
        };
        for (name, header, required) in
            [("From", mail_parser::HeaderName::From, true), ("Sender", mail_parser::HeaderName::Sender, false)]
        {
            // The raw value of each such field, as mail-parser delimited it.
            let values: Vec<&[u8]> = msg
                .headers()
                .iter()
                .filter(|h| h.name == header)
                .map(|h| unstuffed.get(h.offset_start as usize..h.offset_end as usize).unwrap_or_default())
                .collect();
            let raw = match values.as_slice() {
                [] if required => return Err(HeaderRefusal::Missing(name)),
                [] => continue,
                [raw] => *raw,
                _ => return Err(HeaderRefusal::Repeated(name)),
            };
            let mailbox = match from_header::one_reading(raw) {
                Ok(mailbox) => mailbox,
                Err(Ambiguity::NoAddress) => return Err(HeaderRefusal::NoAddress(name)),
                Err(reason) => return Err(HeaderRefusal::Ambiguous { field: name, reason }),
            };
            if !self.may_send_as(&mailbox.address) {
                return Err(HeaderRefusal::NotYours { field: name, address: mailbox.address });
            }
        }
        Ok(())
    }
}

/// Why the sender policy on the header section refused a message: the text is the
/// SMTP reply, one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderRefusal {
    /// A header line holds a control character other than TAB.
    #[error("550 5.6.0 The message headers contain control characters")]
    ControlCharacters,
    /// A line that is neither a header field nor a continuation line.
    #[error("550 5.6.0 The message has a malformed header line")]
    MalformedLine,
    /// mail-parser could not read the header section.
    #[error("550 5.6.0 The message headers cannot be parsed")]
    Unparsable,
    /// No such field (`From`).
    #[error("550 5.7.1 The message has no {0}: header")]
    Missing(&'static str),
    /// The field more than once (`From`, `Sender`).
    #[error("550 5.7.1 The message has more than one {0}: header")]
    Repeated(&'static str),
    /// The field names no address.
    #[error("550 5.7.1 The {0}: header has no address")]
    NoAddress(&'static str),
    /// Readers differ on the field's mailbox.
    #[error("{}", one_line(&format!("550 5.7.1 The {}: header is ambiguous: {}", .field, .reason)))]
    Ambiguous {
        /// `From` or `Sender`.
        field: &'static str,
        /// How readers differ.
        reason: Ambiguity,
    },
    /// The field's address is not the account's.
    #[error("550 5.7.1 {field}: address {} is not one of your addresses", one_line(.address))]
    NotYours {
        /// `From` or `Sender`.
        field: &'static str,
        /// The address, as read.
        address: String,
    },
}

const HEADER_TOO_BIG: &str = "552 5.3.4 Header section too big to check the sender";
const BARE_IN_DATA: &str = "554 5.6.11 Bare CR or LF in message data is not allowed; lines end with CRLF";

/// Undoes dot-stuffing of message lines (for parsing only; the bytes forwarded stay as sent).
fn unstuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            at_line_start = false;
            continue;
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

enum LineResult {
    Incomplete,
    TooLong,
    TooLongComplete,
    Bare,
    Line(Vec<u8>),
}

/// Why a `MAIL` line could not be rewritten without its `AUTH=` parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailParamError {
    /// No `<reverse-path>` closed by `>` was found.
    #[error("no <reverse-path> in the MAIL command")]
    NoPath,
    /// The rewritten line does not parse as the same command minus `AUTH=`.
    #[error("the MAIL command reads differently without AUTH=")]
    Changed,
}

/// `line` (a `MAIL FROM:<…> params` command without CRLF) with every `AUTH=` parameter
/// removed, with the blanks that separated it; every other byte stays as sent. The result
/// is parsed again and must be the same command without `AUTH=`.
pub fn without_auth_param(line: &[u8]) -> Result<Vec<u8>, MailParamError> {
    let open = line.iter().position(|b| *b == b'<').ok_or(MailParamError::NoPath)?;
    // The path ends at the first ">" outside a quoted local part.
    let mut in_quote = false;
    let mut escaped = false;
    let mut close = None;
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'>' if !in_quote => {
                close = Some(i);
                break;
            }
            _ => {}
        }
    }
    let close = close.ok_or(MailParamError::NoPath)?;
    let (path, params) = line.split_at(close + 1);
    let mut out = path.to_vec();
    // The parameters as (blanks before, word); a parameter after a dropped AUTH= keeps the
    // blanks that were before the AUTH= (where they were valid), trailing blanks stay.
    let mut carried: Option<&[u8]> = None;
    let mut rest = params;
    while !rest.is_empty() {
        let blank_end = rest.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(rest.len());
        let word_end = rest[blank_end..].iter().position(u8::is_ascii_whitespace).map_or(rest.len(), |n| blank_end + n);
        let (blank, word) = (&rest[..blank_end], &rest[blank_end..word_end]);
        rest = &rest[word_end..];
        if word.len() >= 5 && word[..5].eq_ignore_ascii_case(b"AUTH=") {
            carried = carried.or(Some(blank));
        } else if word.is_empty() {
            out.extend_from_slice(blank);
        } else {
            out.extend_from_slice(carried.take().unwrap_or(blank));
            out.extend_from_slice(word);
        }
    }
    // The same command, minus AUTH=, or nothing.
    let mut check_before = line.to_vec();
    check_before.extend_from_slice(b"\r\n");
    let mut check_after = out.clone();
    check_after.extend_from_slice(b"\r\n");
    match (Request::parse(&mut check_before.iter()), Request::parse(&mut check_after.iter())) {
        (Ok(Request::Mail { from: before }), Ok(Request::Mail { from: after }))
            if after.auth.is_none()
                && after.address == before.address
                && after.flags == before.flags
                && after.size == before.size
                && after.env_id == before.env_id =>
        {
            Ok(out)
        }
        _ => Err(MailParamError::Changed),
    }
}

/// A `SIZE=` parameter too long to be a real size (smtp-proto wraps such values).
fn size_param_overflows(line: &[u8]) -> bool {
    let upper = line.to_ascii_uppercase();
    upper
        .windows(6)
        .position(|w| w == b" SIZE=")
        .is_some_and(|p| upper[p + 6..].iter().take_while(|b| b.is_ascii_digit()).count() > 18)
}

/// Printable ASCII on one line.
fn one_line(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(400).collect()
}

#[cfg(test)]
#[path = "smtp_tests.rs"]
mod tests;
