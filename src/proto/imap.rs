//! The IMAP pre-authentication server, sans-IO.
//!
//! The driver feeds the bytes the client sent ([`Machine::feed`]) and asks what to do
//! next ([`Machine::next`]): write bytes, read more, start TLS, check credentials, close.
//! Commands are parsed with imap-codec. Before authentication only CAPABILITY, NOOP,
//! LOGOUT, ID, STARTTLS, LOGIN and AUTHENTICATE PLAIN/LOGIN (and XOAUTH2/OAUTHBEARER
//! when OAuth is offered, [`PreAuth::with_oauth`]) are served; every size, count and
//! byte a peer controls is bounded ([`limits`]).
//!
//! States: `Command` (reading commands) → `Sasl*` (AUTHENTICATE exchange) →
//! `Authenticating` (credentials handed to the driver) → `Done` (the driver relays),
//! plus `TlsPending`/`AwaitTls` around STARTTLS and `Closed`. Those from
//! `Authenticating` on, with the buffers and counters, are the shell the three fronts
//! share ([`crate::proto::preauth`]).

use crate::proto::preauth::{self, Phase, Shell};
use crate::proto::sasl::{self, BearerMechanism, Credentials, OAuthOffer, SaslError};
use crate::proto::{Goodbye, Machine, Next};
use base64::Engine as _;
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{
    AuthenticateDataCodec, CommandCodec,
    decode::{AuthenticateDataDecodeError, CommandDecodeError, Decoder},
};

/// Bounds on what a client may send before it is authenticated (SECURITY.md §P).
pub mod limits {
    /// A command line (without literal data): 8 KiB (RFC 7162 §4; Dovecot `IMAP_LOGIN_MAX_LINE_LENGTH`).
    pub const MAX_LINE: usize = 8192;
    /// A synchronizing literal before auth: 8 KiB (nginx: one buffer page).
    pub const MAX_LITERAL: usize = 8192;
    /// A non-synchronizing literal: 4096 octets (RFC 7888 LITERAL-).
    pub const MAX_NONSYNC_LITERAL: usize = 4096;
    /// A whole command, lines and literals together.
    pub const MAX_COMMAND: usize = 16 * 1024;
    /// A SASL line (AUTHENTICATE continuation): 8 KiB (Dovecot `LOGIN_MAX_AUTH_BUF_SIZE`).
    pub const MAX_SASL_LINE: usize = 8192;
    /// Tags longer than this are refused (nginx allows 32).
    pub const MAX_TAG: usize = 64;
    /// Invalid commands before the connection is closed (nginx `max_errors 5`).
    pub const MAX_BAD: u32 = 5;
    /// Commands of any kind before authentication (freenginx `max_commands 1000`).
    pub const MAX_COMMANDS: u32 = 1000;
    /// Failed authentications on one connection.
    pub const MAX_AUTH_FAILURES: u32 = 3;
    /// ID parameters (RFC 2971: at most 30 pairs).
    pub const MAX_ID_PARAMS: usize = 30;
    /// An `ID` command line: RFC 2971 allows 30 field/value pairs of up to 1024 octets
    /// each (about 32 KB); every other command keeps [`MAX_LINE`].
    pub const MAX_ID_LINE: usize = 40 * 1024;
    /// What may be buffered before authentication: the longest command line and a SASL line.
    pub const MAX_BUFFERED: usize = MAX_ID_LINE + MAX_SASL_LINE;
}
use limits::*;

/// What only the driver can act on (see [`Machine`]); it answers with
/// [`PreAuth::auth_succeeded`] or [`PreAuth::auth_failed`].
pub type Action = preauth::Action<AuthReply>;

/// What [`Machine::next`] returns.
pub type Step = Next<Action>;

/// `ID` fields: (lower-case key, value).
pub type IdFields = Vec<(String, String)>;

/// The last line of an IMAP connection that mailgate ends (RFC 9051 §7.1.5 BYE).
pub fn goodbye(why: Goodbye) -> &'static [u8] {
    match why {
        Goodbye::Timeout => b"* BYE Autologout: authentication took too long\r\n",
        Goodbye::Shutdown => b"* BYE Server shutting down, please reconnect\r\n",
        Goodbye::Revoked => b"* BYE Access revoked\r\n",
        Goodbye::Idle => b"* BYE Autologout; idle for too long\r\n",
        Goodbye::TooLong => b"* BYE Session too long\r\n",
    }
}

impl Machine for PreAuth {
    type Event = Action;
    /// Bytes read from the client.
    fn feed(&mut self, bytes: &[u8]) {
        self.shell.feed(bytes, MAX_BUFFERED, "* BYE Input too long\r\n");
    }

    /// Next thing to do. Call again until it returns [`Next::NeedInput`] (or another
    /// action that needs the driver).
    fn next(&mut self) -> Step {
        preauth::next(self, |p| &mut p.shell, PreAuth::step)
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over, encrypted.
    fn tls_started(&mut self) {
        if self.shell.tls_restarted(State::Command) {
            self.reset_literals();
        }
    }

    fn goodbye(&self, why: Goodbye) -> Option<&'static [u8]> {
        Some(goodbye(why))
    }
}

/// How a failed authentication is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// `NO [AUTHENTICATIONFAILED]`: wrong or unknown credentials (one text for every cause).
    Failed,
    /// `NO [AUTHORIZATIONFAILED]`: the client asked to act as another user.
    AuthzFailed,
    /// `BAD`: the client cancelled the exchange or sent something that is not base64.
    Aborted(&'static str),
    /// `NO [ALERT] text`: a 2FA account sent its account password. The alert is shown once
    /// per connection; later refusals on the same connection are plain failures, because
    /// Thunderbird shows each alert it gets (CLIENTS.md).
    NeedsAppPassword(String),
    /// `NO [UNAVAILABLE]`: throttled or upstream unavailable; try again later.
    Unavailable,
    /// `NO [LIMIT]`: this account has too many sessions from this address.
    TooMany,
}

/// Where the client is while commands are read ([`Phase::Open`]).
#[derive(Debug)]
enum State {
    Command,
    /// Dropping the rest of a malformed line: `tail` holds its last two bytes (a `{N+}`
    /// announcement there ends the connection), `dropped` counts it against [`MAX_LINE`].
    DiscardLine {
        tail: [u8; 2],
        dropped: usize,
    },
    SaslPlain {
        tag: String,
    },
    SaslLoginUser {
        tag: String,
    },
    SaslLoginPass {
        tag: String,
        user: String,
    },
    /// `AUTHENTICATE XOAUTH2`/`OAUTHBEARER` without an initial response sent `+ `; the
    /// client's message comes next.
    SaslBearer {
        tag: String,
        mech: BearerMechanism,
    },
    /// A refused token got its error challenge (`+ <base64 JSON>`); any line the client
    /// answers with (RFC 7628 §3.2.3: `^A`; Thunderbird sends its whole command again)
    /// ends the exchange with the tagged failure.
    BearerError {
        tag: String,
    },
}

/// Follows line boundaries outside literal data, independently of the decoder, so that a
/// line's length is bounded however the bytes arrive (whole, split, with literal data).
#[derive(Debug, Default)]
struct Framer {
    /// Bytes of `buf` scanned so far.
    pos: usize,
    /// Where the current line starts in `buf`.
    line_begin: usize,
    /// Literal bytes still expected before the next line starts.
    literal_left: usize,
    /// The first command in `buf` is complete: what follows it is not scanned (it is the
    /// next command's, scanned when that one is up, or the mailbox session's after a
    /// login, which no pre-login limit applies to).
    complete: bool,
}

impl Framer {
    /// Scans the new bytes of the first command in `buf`; `Err` when a line (without its
    /// CRLF) exceeds its limit ([`MAX_LINE`], or [`MAX_ID_LINE`] for an `ID` command).
    fn scan(&mut self, buf: &[u8]) -> Result<(), FrameError> {
        while self.pos < buf.len() && !self.complete {
            if self.literal_left > 0 {
                let take = self.literal_left.min(buf.len() - self.pos);
                self.pos += take;
                self.literal_left -= take;
                if self.literal_left == 0 {
                    self.line_begin = self.pos;
                }
                continue;
            }
            let b = buf[self.pos];
            self.pos += 1;
            if b == b'\n' && self.pos >= self.line_begin + 2 && buf[self.pos - 2] == b'\r' {
                let line = &buf[self.line_begin..self.pos - 2];
                if line.len() > self.line_limit(buf) {
                    return Err(FrameError::LineTooLong);
                }
                let literal = trailing_literal(line);
                match literal {
                    // Its bytes follow without waiting: refuse now, however the reads fell.
                    Some((n, true)) if n > MAX_NONSYNC_LITERAL => return Err(FrameError::LiteralTooBig),
                    // Data sent before our `+` for a literal we will refuse: the client does
                    // not wait, so its bytes cannot be told from commands either.
                    Some((n, false)) if n > MAX_LITERAL && self.pos < buf.len() => {
                        return Err(FrameError::LiteralTooBig);
                    }
                    _ => {}
                }
                self.literal_left = literal.map(|(n, _)| n).unwrap_or(0);
                self.line_begin = self.pos;
                // A line without a literal ends the command.
                self.complete = literal.is_none();
            } else if self.pos - self.line_begin > self.line_limit(buf) + 1 {
                return Err(FrameError::LineTooLong);
            }
        }
        Ok(())
    }

    /// The limit of the current line: an `ID` command's first line may be longer.
    fn line_limit(&self, buf: &[u8]) -> usize {
        if self.line_begin == 0 && is_id_command(buf) { MAX_ID_LINE } else { MAX_LINE }
    }
}

/// Whether `buf` starts with `<tag> ID ` (any case).
fn is_id_command(buf: &[u8]) -> bool {
    let Some(sp) = buf.iter().take(MAX_TAG + 1).position(|b| *b == b' ') else { return false };
    buf.get(sp + 1..sp + 4).is_some_and(|w| w.eq_ignore_ascii_case(b"ID "))
}

/// Why framing refused the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameError {
    /// A line (outside literal data) over [`MAX_LINE`].
    LineTooLong,
    /// A literal over the limit whose data is already arriving.
    LiteralTooBig,
}

/// The literal announced at the end of a line (`{N}` or `{N+}`): (N, non-synchronizing).
fn trailing_literal(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = &inner[open + 1..];
    let (digits, nonsync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, true),
        None => (spec, false),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse::<usize>().ok()?;
    Some((n, nonsync))
}

/// Where the first command in `buf` ends (after its last line's CRLF), and whether literal
/// data belongs to it. A synchronizing literal that was never answered with `+` (its
/// announcement ends after `acked_upto`) carries no data: the command ends there.
/// `None`: the command does not end within `buf`.
fn first_command_end(buf: &[u8], acked_upto: usize) -> (Option<usize>, bool) {
    let mut pos = 0;
    let mut had_literal = false;
    loop {
        let Some(rel) = buf.get(pos..).and_then(find_crlf) else { return (None, had_literal) };
        let line_end = pos + rel + 2;
        match trailing_literal(&buf[pos..pos + rel]) {
            Some((n, nonsync)) if nonsync || line_end <= acked_upto => {
                had_literal = true;
                pos = line_end.saturating_add(n);
                if pos > buf.len() {
                    return (None, true);
                }
            }
            _ => return (Some(line_end), had_literal),
        }
    }
}

/// One client connection before authentication. `Debug` shows sizes and counters, never
/// the buffered bytes (they may hold a password).
pub struct PreAuth {
    shell: Shell<State>,
    /// The tag of the command whose credentials are with the driver (answered by
    /// [`PreAuth::auth_succeeded`] or [`PreAuth::auth_failed`]).
    auth_tag: String,
    alert_shown: bool,
    /// `buf.len()` when the last literal announcement was answered (or accepted silently).
    literal_seen_at: usize,
    framer: Framer,
    client_name: Option<String>,
    /// The client's `ID` fields that are passed on to upstream ([`PreAuth::client_id`]).
    client_id: IdFields,
    /// XOAUTH2 and OAUTHBEARER are offered (over TLS, as every mechanism).
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

const CAPS_TLS: &str = "IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN";
const CAPS_TLS_OAUTH: &str = "IMAP4rev1 SASL-IR LITERAL- ID AUTH=PLAIN AUTH=LOGIN AUTH=XOAUTH2 AUTH=OAUTHBEARER";
const CAPS_PLAIN: &str = "IMAP4rev1 LITERAL- ID STARTTLS LOGINDISABLED";

impl PreAuth {
    /// A new connection. `tls`: the channel is already encrypted (implicit TLS).
    /// `starttls_allowed`: this listener offers STARTTLS.
    pub fn new(hostname: &str, tls: bool, starttls_allowed: bool) -> PreAuth {
        PreAuth::with_oauth(hostname, tls, starttls_allowed, None)
    }

    /// [`PreAuth::new`]; with `oauth`, XOAUTH2 and OAUTHBEARER are offered and accepted
    /// too (inside TLS only, like PLAIN and LOGIN).
    pub fn with_oauth(hostname: &str, tls: bool, starttls_allowed: bool, oauth: Option<OAuthOffer>) -> PreAuth {
        let mut p = PreAuth {
            shell: Shell::new(State::Command, tls, starttls_allowed),
            auth_tag: String::new(),
            alert_shown: false,
            literal_seen_at: 0,
            framer: Framer::default(),
            client_name: None,
            client_id: Vec::new(),
            oauth,
            bearer: None,
        };
        let caps = p.capabilities();
        p.shell.out.extend_from_slice(format!("* OK [CAPABILITY {caps}] {hostname} mailgate ready\r\n").as_bytes());
        p
    }

    /// The client's name from its `ID` command (e.g. "Thunderbird 128.0"), if it sent one.
    pub fn client_name(&self) -> Option<&str> {
        self.client_name.as_deref()
    }

    /// The fields of the client's `ID` (name, version, os, …) to pass on to upstream, so
    /// its log shows the real client. Lower-case keys; fields that are not printable
    /// ASCII, and every `x-…` field (upstream trusts mailgate's `x-originating-ip`, so a
    /// client must not set those), are left out.
    pub fn client_id(&self) -> &[(String, String)] {
        &self.client_id
    }

    fn capabilities(&self) -> &'static str {
        match (self.shell.tls, &self.oauth) {
            (false, _) => CAPS_PLAIN,
            (true, None) => CAPS_TLS,
            (true, Some(_)) => CAPS_TLS_OAUTH,
        }
    }

    /// The credentials were accepted and the upstream session is open. Queues the tagged
    /// OK carrying upstream's capabilities and returns the bytes the client pipelined
    /// after its login command (they belong to the upstream session).
    pub fn auth_succeeded(&mut self, upstream_caps: &str) -> Vec<u8> {
        let tag = &self.auth_tag;
        let line = if upstream_caps.is_empty() {
            format!("{tag} OK Logged in\r\n")
        } else {
            format!("{tag} OK [CAPABILITY {upstream_caps}] Logged in\r\n")
        };
        self.shell.succeeded(&line)
    }

    /// The credentials were refused (or the exchange failed); answer the client.
    ///
    /// A bearer token refused by the gate ([`AuthReply::Failed`]) first gets the
    /// mechanism's error challenge as a continuation (`+ <base64 JSON>`, RFC 7628 §3.2.3,
    /// Google's XOAUTH2); the tagged `NO [AUTHENTICATIONFAILED]` follows the client's
    /// answer to it, whatever that is. Thunderbird (comm-central `nsImapProtocol.cpp`,
    /// `AuthLogin` with `SendDataParseIMAPandCheckForNewMail`) answers a continuation to
    /// its `AUTHENTICATE XOAUTH2 <initial response>` by sending that whole command line
    /// again, so the answer is not parsed; on the tagged NO it marks XOAUTH2 failed and,
    /// OAuth2 being its only method, says "OAuth2 failed. Entering password does not help"
    /// (the `imapOAuth2Error` alert) instead of asking for a password. Never BAD or BYE
    /// here: those would read as a protocol error, not a refused token.
    pub fn auth_failed(&mut self, reply: AuthReply) {
        if !self.shell.authenticating() {
            return;
        }
        let bearer = self.bearer.take();
        if let (AuthReply::Failed, Some(mech), Some(offer)) = (&reply, bearer, &self.oauth) {
            let challenge = offer.error_challenge(mech);
            self.shell.out.extend_from_slice(format!("+ {challenge}\r\n").as_bytes());
            self.shell.phase = Phase::Open(State::BearerError { tag: self.auth_tag.clone() });
            return;
        }
        let tag = &self.auth_tag;
        let line = match reply {
            AuthReply::Failed => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            AuthReply::AuthzFailed => format!("{tag} NO [AUTHORIZATIONFAILED] Authorization failed.\r\n"),
            AuthReply::Aborted(text) => format!("{tag} BAD {text}\r\n"),
            AuthReply::NeedsAppPassword(text) if !self.alert_shown => {
                self.alert_shown = true;
                format!("{tag} NO [ALERT] {}\r\n", sanitize_text(&text))
            }
            AuthReply::NeedsAppPassword(_) => format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            AuthReply::Unavailable => {
                format!("{tag} NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n")
            }
            AuthReply::TooMany => {
                format!("{tag} NO [LIMIT] Too many connections for this account from your address.\r\n")
            }
        };
        self.shell.failed(&line, State::Command, MAX_AUTH_FAILURES, "* BYE Too many authentication failures\r\n");
    }

    /// The buffer now starts at a command boundary (or was emptied).
    fn reset_literals(&mut self) {
        self.literal_seen_at = 0;
        self.framer = Framer::default();
    }

    fn bad_command(&mut self, tag: &str, text: &str) {
        self.shell.bad_command(&format!("{tag} BAD {text}\r\n"), MAX_BAD, "* BYE Too many invalid commands\r\n");
    }

    /// One step while reading: a command, the rest of a malformed line, or a line of the
    /// AUTHENTICATE exchange.
    fn step(&mut self) -> Option<Step> {
        match self.shell.phase {
            Phase::Open(State::Command) => self.step_command(),
            Phase::Open(State::DiscardLine { .. }) => self.step_discard(),
            _ => self.step_sasl(),
        }
    }

    fn step_command(&mut self) -> Option<Step> {
        if let Some(wait_or_close) = self.shell.gate() {
            return Some(wait_or_close);
        }
        match self.framer.scan(&self.shell.buf) {
            Ok(()) => {}
            Err(FrameError::LineTooLong) => {
                self.shell.close_with("* BYE Command line too long\r\n");
                return None;
            }
            Err(FrameError::LiteralTooBig) => {
                let tag = guess_tag(&self.shell.buf);
                self.shell.out.extend_from_slice(format!("{tag} BAD [TOOBIG] Literal too big\r\n").as_bytes());
                self.shell.close_with("* BYE Literal too big\r\n");
                return None;
            }
        }
        let decoded = CommandCodec::default().decode(&self.shell.buf);
        match decoded {
            Ok((rest, cmd)) => {
                let consumed = self.shell.buf.len() - rest.len();
                let tag = cmd.tag.as_ref().to_string();
                let parsed = Parsed::from(cmd.body);
                self.shell.buf.drain(..consumed);
                self.reset_literals();
                self.shell.commands += 1;
                let action = if tag.len() > MAX_TAG {
                    self.bad_command("*", "Tag too long");
                    None
                } else {
                    self.handle(tag, parsed)
                };
                if action.is_none() && self.shell.commands >= MAX_COMMANDS && !self.shell.closed() {
                    self.shell.close_with("* BYE Too many commands without authentication\r\n");
                }
                action
            }
            Err(CommandDecodeError::Incomplete) => Some(Next::NeedInput),
            Err(CommandDecodeError::LiteralFound { tag, length, mode }) => {
                if self.literal_seen_at == self.shell.buf.len() {
                    return Some(Next::NeedInput);
                }
                let tag = tag.as_ref().to_string();
                let length = length as usize;
                let total = self.shell.buf.len().saturating_add(length);
                match mode {
                    LiteralMode::NonSync if length > MAX_NONSYNC_LITERAL || total > MAX_COMMAND => {
                        // The literal's bytes are already on their way: they can't be told apart
                        // from commands any more, so the connection ends (RFC 7888).
                        self.shell.out.extend_from_slice(format!("{tag} BAD [TOOBIG] Literal too big\r\n").as_bytes());
                        self.shell.close_with("* BYE Literal too big\r\n");
                        None
                    }
                    LiteralMode::Sync if length > MAX_LITERAL || total > MAX_COMMAND => {
                        self.shell.buf.clear();
                        self.reset_literals();
                        self.bad_command(&tag, "[TOOBIG] Literal too big");
                        None
                    }
                    _ => {
                        if mode == LiteralMode::Sync {
                            self.shell.out.extend_from_slice(b"+ Ready for literal data\r\n");
                        }
                        self.literal_seen_at = self.shell.buf.len();
                        Some(Next::NeedInput)
                    }
                }
            }
            Err(CommandDecodeError::Failed) => {
                let tag = guess_tag(&self.shell.buf);
                self.bad_command(&tag, "Invalid command");
                if self.shell.closed() {
                    return None;
                }
                self.start_discard();
                None
            }
        }
    }

    /// Drops the malformed command at the start of the buffer. If it ends within the
    /// buffer, exactly its bytes go; if not, the rest of its line is discarded as it
    /// arrives — unless it announced literals, whose data could not be told from commands:
    /// then the connection ends.
    fn start_discard(&mut self) {
        match first_command_end(&self.shell.buf, self.literal_seen_at) {
            (Some(end), _) => {
                self.shell.buf.drain(..end);
                self.reset_literals();
            }
            (None, true) => self.shell.close_with("* BYE Invalid command\r\n"),
            (None, false) => {
                self.reset_literals();
                self.shell.phase = Phase::Open(State::DiscardLine { tail: [0, 0], dropped: 0 });
            }
        }
    }

    fn step_discard(&mut self) -> Option<Step> {
        let Phase::Open(State::DiscardLine { tail, dropped }) = &mut self.shell.phase else { return None };
        match find_crlf(&self.shell.buf) {
            Some(pos) => {
                if *dropped + pos > MAX_LINE {
                    self.shell.close_with("* BYE Command line too long\r\n");
                    return None;
                }
                let mut last = *tail;
                for b in &self.shell.buf[..pos] {
                    last = [last[1], *b];
                }
                self.shell.buf.drain(..pos + 2);
                self.shell.phase = Phase::Open(State::Command);
                if last == *b"+}" {
                    // A non-synchronizing literal announced on a discarded line: its data is on
                    // its way and would be read as commands. (A synchronizing one is harmless:
                    // the client waits for a `+` that never comes.)
                    self.shell.close_with("* BYE Invalid command\r\n");
                }
                None
            }
            None => {
                // Keep a trailing CR (it may start the CRLF); remember the last bytes before it.
                let keep_cr = self.shell.buf.last() == Some(&b'\r');
                let upto = self.shell.buf.len() - usize::from(keep_cr);
                for b in &self.shell.buf[..upto] {
                    *tail = [tail[1], *b];
                }
                *dropped += upto;
                if *dropped > MAX_LINE {
                    self.shell.close_with("* BYE Command line too long\r\n");
                    return None;
                }
                self.shell.buf.clear();
                if keep_cr {
                    self.shell.buf.push(b'\r');
                }
                Some(Next::NeedInput)
            }
        }
    }

    fn step_sasl(&mut self) -> Option<Step> {
        let Some(pos) = find_crlf(&self.shell.buf) else {
            if self.shell.buf.len() > MAX_SASL_LINE + 2 {
                self.shell.close_with("* BYE Authentication line too long\r\n");
                return None;
            }
            return Some(Next::NeedInput);
        };
        let line_len = pos + 2;
        if line_len > MAX_SASL_LINE + 2 {
            self.shell.close_with("* BYE Authentication line too long\r\n");
            return None;
        }
        if let Phase::Open(State::BearerError { .. }) = self.shell.phase {
            // The answer to the error challenge ends the exchange, whatever it says; it
            // may repeat the token, so it is wiped unread.
            zeroize::Zeroize::zeroize(&mut self.shell.buf[..line_len]);
            self.shell.buf.drain(..line_len);
            if let Some(State::BearerError { tag }) = self.shell.replace(State::Command) {
                self.shell.failed(
                    &format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
                    State::Command,
                    MAX_AUTH_FAILURES,
                    "* BYE Too many authentication failures\r\n",
                );
            }
            return None;
        }
        let decoded = match AuthenticateDataCodec::default().decode(&self.shell.buf[..line_len]) {
            Ok((_, AuthenticateData::Continue(data))) => Ok(data.declassify().to_vec()),
            Ok((_, AuthenticateData::Cancel)) => Err("Authentication cancelled"),
            Err(AuthenticateDataDecodeError::Incomplete | AuthenticateDataDecodeError::Failed) => {
                Err("Invalid base64 in authentication exchange")
            }
        };
        // The line may hold a password: wipe it from the buffer before going on.
        zeroize::Zeroize::zeroize(&mut self.shell.buf[..line_len]);
        self.shell.buf.drain(..line_len);
        let state = self.shell.replace(State::Command).unwrap_or(State::Command);
        let (tag, data) = match (&state, decoded) {
            (
                State::SaslPlain { tag }
                | State::SaslLoginUser { tag }
                | State::SaslLoginPass { tag, .. }
                | State::SaslBearer { tag, .. },
                d,
            ) => (tag.clone(), d),
            _ => return None,
        };
        let data = match data {
            Ok(d) => crate::secret::SecretBytes::from(d),
            Err(text) => return Some(self.refuse(tag, AuthReply::Aborted(text))),
        };
        match state {
            State::SaslPlain { .. } => Some(self.plain(tag, data.expose())),
            State::SaslLoginUser { .. } => match sasl::check_username(data.expose()) {
                Ok(user) => {
                    self.shell.out.extend_from_slice(b"+ UGFzc3dvcmQ6\r\n");
                    self.shell.phase = Phase::Open(State::SaslLoginPass { tag, user });
                    None
                }
                Err(_) => Some(self.refuse(tag, AuthReply::Failed)),
            },
            State::SaslLoginPass { user, .. } => match sasl::check_password(data.expose()) {
                Ok(password) => Some(self.authenticate(tag, Credentials::password(user, password))),
                Err(_) => Some(self.refuse(tag, AuthReply::Failed)),
            },
            State::SaslBearer { mech, .. } => Some(self.bearer(tag, mech, data.expose())),
            _ => None,
        }
    }

    fn refuse(&mut self, tag: String, reply: AuthReply) -> Step {
        self.auth_tag = tag;
        self.bearer = None;
        self.shell.refuse(reply)
    }

    fn authenticate(&mut self, tag: String, creds: Credentials) -> Step {
        self.auth_tag = tag;
        self.bearer = None;
        self.shell.authenticate(creds)
    }

    /// A bearer message (XOAUTH2 or OAUTHBEARER): the token goes to the driver; a
    /// malformed message is a plain failure (no token was checked, so no error challenge).
    fn bearer(&mut self, tag: String, mech: BearerMechanism, msg: &[u8]) -> Step {
        match mech.decode(msg) {
            Ok(creds) => {
                let step = self.authenticate(tag, creds);
                self.bearer = Some(mech);
                step
            }
            Err(_) => self.refuse(tag, AuthReply::Failed),
        }
    }

    fn plain(&mut self, tag: String, msg: &[u8]) -> Step {
        match sasl::decode_plain(msg) {
            Ok(creds) => self.authenticate(tag, creds),
            Err(SaslError::AuthzidRefused) => self.refuse(tag, AuthReply::AuthzFailed),
            Err(SaslError::Malformed) => self.refuse(tag, AuthReply::Failed),
        }
    }

    fn handle(&mut self, tag: String, cmd: Parsed) -> Option<Step> {
        match cmd {
            Parsed::Capability => {
                let caps = self.capabilities();
                self.shell
                    .out
                    .extend_from_slice(format!("* CAPABILITY {caps}\r\n{tag} OK CAPABILITY completed\r\n").as_bytes());
            }
            Parsed::Noop => self.shell.out.extend_from_slice(format!("{tag} OK NOOP completed\r\n").as_bytes()),
            Parsed::Logout => self.shell.close_with(&format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n")),
            Parsed::Id(None) => self.bad_command(&tag, "Too many ID parameters"),
            Parsed::Id(Some((name, fields))) => {
                if name.is_some() {
                    self.client_name = name;
                }
                self.client_id = fields;
                self.shell
                    .out
                    .extend_from_slice(format!("* ID (\"name\" \"mailgate\")\r\n{tag} OK ID completed\r\n").as_bytes());
            }
            Parsed::StartTls if self.shell.tls => self.bad_command(&tag, "TLS is already active"),
            Parsed::StartTls if !self.shell.starttls_allowed => self.bad_command(&tag, "STARTTLS is not offered here"),
            Parsed::StartTls => self.shell.start_tls(&format!("{tag} OK Begin TLS negotiation now\r\n")),
            Parsed::Login(..) | Parsed::Authenticate(..) if !self.shell.tls => self.shell.bad_command(
                &format!("{tag} NO [PRIVACYREQUIRED] Use STARTTLS before logging in.\r\n"),
                MAX_BAD,
                "* BYE Too many invalid commands\r\n",
            ),
            Parsed::Login(user, pass) => {
                let pass = crate::secret::SecretBytes::from(pass);
                return Some(match (sasl::check_username(&user), sasl::check_password(pass.expose())) {
                    (Ok(username), Ok(password)) => self.authenticate(tag, Credentials::password(username, password)),
                    _ => self.refuse(tag, AuthReply::Failed),
                });
            }
            // RFC 4959: `=` is an empty initial response (not "none"): the client has
            // sent its PLAIN message, and an empty one is malformed.
            Parsed::Authenticate(Mech::Plain, Some(ir)) => {
                return Some(self.plain(tag, ir.expose()));
            }
            Parsed::Authenticate(Mech::Plain, _) => {
                self.shell.out.extend_from_slice(b"+ \r\n");
                self.shell.phase = Phase::Open(State::SaslPlain { tag });
            }
            // LOGIN (not a standard mechanism) asks for the user name on `=`, as before.
            Parsed::Authenticate(Mech::Login, Some(ir)) if !ir.expose().is_empty() => {
                match sasl::check_username(ir.expose()) {
                    Ok(user) => {
                        self.shell.out.extend_from_slice(b"+ UGFzc3dvcmQ6\r\n");
                        self.shell.phase = Phase::Open(State::SaslLoginPass { tag, user });
                    }
                    Err(_) => return Some(self.refuse(tag, AuthReply::Failed)),
                }
            }
            Parsed::Authenticate(Mech::Login, _) => {
                self.shell.out.extend_from_slice(b"+ VXNlcm5hbWU6\r\n");
                self.shell.phase = Phase::Open(State::SaslLoginUser { tag });
            }
            Parsed::Authenticate(Mech::Bearer(_), _) if self.oauth.is_none() => {
                self.bad_command(&tag, "Unsupported authentication mechanism")
            }
            // SASL-IR (what Thunderbird sends); `=` is an empty message, malformed.
            Parsed::Authenticate(Mech::Bearer(mech), Some(ir)) => return Some(self.bearer(tag, mech, ir.expose())),
            Parsed::Authenticate(Mech::Bearer(mech), None) => {
                self.shell.out.extend_from_slice(b"+ \r\n");
                self.shell.phase = Phase::Open(State::SaslBearer { tag, mech });
            }
            Parsed::Authenticate(Mech::Other, _) => self.bad_command(&tag, "Unsupported authentication mechanism"),
            Parsed::Other(name) => self.bad_command(&tag, &format!("{name} is not allowed before authentication")),
        }
        None
    }
}

enum Mech {
    Plain,
    Login,
    Bearer(BearerMechanism),
    Other,
}

enum Parsed {
    Capability,
    Noop,
    Logout,
    /// `None`: too many parameters; `Some(name)`: the client's name, if given.
    /// `None`: too many parameters; else the client's name and the fields to pass on.
    Id(Option<(Option<String>, IdFields)>),
    StartTls,
    Login(Vec<u8>, Vec<u8>),
    Authenticate(Mech, Option<crate::secret::SecretBytes>),
    Other(&'static str),
}

impl From<CommandBody<'_>> for Parsed {
    fn from(body: CommandBody<'_>) -> Parsed {
        match body {
            CommandBody::Capability => Parsed::Capability,
            CommandBody::Noop => Parsed::Noop,
            CommandBody::Logout => Parsed::Logout,
            CommandBody::StartTLS => Parsed::StartTls,
            CommandBody::Id { parameters } => {
                let params = parameters.unwrap_or_default();
                if params.len() > MAX_ID_PARAMS {
                    return Parsed::Id(None);
                }
                let get = |key: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(key.as_bytes()))
                        .and_then(|(_, v)| v.0.as_ref().map(|s| sanitize_text(&String::from_utf8_lossy(s.as_ref()))))
                };
                let name = match (get("name"), get("version")) {
                    (Some(n), Some(v)) => Some(format!("{n} {v}")),
                    (n, _) => n,
                };
                let fields = params
                    .iter()
                    .filter_map(|(k, v)| {
                        let key = std::str::from_utf8(k.as_ref()).ok()?.to_ascii_lowercase();
                        let value = std::str::from_utf8(v.0.as_ref()?.as_ref()).ok()?;
                        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
                        (!key.starts_with("x-") && printable(&key) && printable(value))
                            .then(|| (key, value.to_string()))
                    })
                    .collect();
                Parsed::Id(Some((name.map(|n| n.chars().take(64).collect()), fields)))
            }
            CommandBody::Login { username, password } => {
                Parsed::Login(username.as_ref().to_vec(), password.declassify().as_ref().to_vec())
            }
            CommandBody::Authenticate { mechanism, initial_response } => {
                let mech = match mechanism {
                    AuthMechanism::Plain => Mech::Plain,
                    AuthMechanism::Login => Mech::Login,
                    AuthMechanism::XOAuth2 => Mech::Bearer(BearerMechanism::XOAuth2),
                    AuthMechanism::OAuthBearer => Mech::Bearer(BearerMechanism::OAuthBearer),
                    _ => Mech::Other,
                };
                Parsed::Authenticate(mech, initial_response.map(|ir| ir.declassify().to_vec().into()))
            }
            other => Parsed::Other(other.name()),
        }
    }
}

/// Printable ASCII only: no CR/LF, no `]` (it would end a response code).
fn sanitize_text(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').filter(|c| *c != ']' && *c != '[').collect()
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The tag of a line that failed to parse, if it is a valid tag; `*` otherwise.
fn guess_tag(buf: &[u8]) -> String {
    let end = buf.iter().position(|b| *b == b' ' || *b == b'\r' || *b == b'\n').unwrap_or(buf.len());
    let cand = &buf[..end];
    let valid = !cand.is_empty()
        && cand.len() <= MAX_TAG
        && cand.iter().all(|b| b.is_ascii_alphanumeric() || b"-._!#$&',/:;<=>?@^`|~".contains(b));
    match std::str::from_utf8(cand) {
        Ok(t) if valid => t.to_string(),
        _ => "*".to_string(),
    }
}

/// Encodes SASL-IR data for an upstream `AUTHENTICATE PLAIN` (base64, standard alphabet).
pub fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
#[path = "imap_tests.rs"]
mod tests;
