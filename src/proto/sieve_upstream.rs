//! Logging in to the upstream ManageSieve server (Pigeonhole's managesieve-login) as the
//! user, sans-IO. Run by `net::upstream::SieveUpstream` (also as a probe of the listing).
//!
//! Like `imap_upstream`: mailgate does not know the user's password upstream; it logs in
//! with master credentials — `AUTHENTICATE "PLAIN"` with authzid = user and authcid =
//! the master user, or the separator style `user*master` as authcid with an empty
//! authzid ([`LoginStyle`], shared with IMAP). Before that, optionally STARTTLS (the
//! capability listing is read again inside TLS, RFC 5804 §2.2) and Pigeonhole's
//! `XCLIENT ADDR=<ip> PORT=<port>` with the client's address, when upstream lists
//! `XCLIENT` and the caller asks for it.
//!
//! Upstream's capability listing is kept ([`UpstreamLogin::capabilities`]): after login
//! the client must see upstream's real capabilities (its SIEVE extensions), not mailgate's
//! pre-login ones. Lines and literals are bounded (SECURITY.md case 17).

pub use crate::proto::imap_upstream::LoginStyle;
use crate::proto::sieve::{FrameError, FrameLimits, Framer, Malformed, Token, quote, tokenize};
use crate::proto::{Machine, Next, sasl};
use crate::secret::SecretString;
use std::net::SocketAddr;

/// Longest line accepted from upstream while logging in (Dovecot's own limit is 64 KiB).
pub const MAX_LINE: usize = 64 * 1024;
/// Longest literal in a capability line or response (the SIEVE extension list is a few
/// hundred octets; this leaves room and bounds memory).
pub const MAX_LITERAL: usize = 64 * 1024;
/// Longest unit (a line with its literals) and most bytes buffered while logging in.
pub const MAX_UNIT: usize = 128 * 1024;
/// Most capability lines kept (Pigeonhole sends about eight).
pub const MAX_CAPABILITIES: usize = 64;

/// How the upstream login ended; the event of [`Machine::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Logged in as the user; [`UpstreamLogin::into_leftover`] has what followed the `OK`.
    LoggedIn,
    /// Upstream refused the login (`NO` or `BYE`): its response code and text, printable
    /// and bounded (for the log; the client gets mailgate's own words).
    Refused {
        /// The response code without parentheses (`AUTH`, `TRYLATER`, …), if any.
        code: Option<String>,
        /// The human-readable text, if any.
        text: String,
    },
    /// The exchange broke down (the client gets a temporary error).
    Failed(UpstreamError),
    /// A probe ([`UpstreamLogin::probe`]) read the whole listing; nothing was sent but
    /// STARTTLS. The caller ends the connection.
    Listed,
}

/// Why the upstream login failed before it was answered. No variant carries text from
/// upstream or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The greeting was `NO`/`BYE` or not ManageSieve.
    #[error("upstream greeting refused (NO, BYE or not ManageSieve)")]
    Greeting,
    /// STARTTLS was not offered or not accepted.
    #[error("upstream did not accept STARTTLS")]
    StartTls,
    /// Upstream offers no SASL PLAIN on this connection (it wants TLS first).
    #[error("upstream offers no SASL PLAIN here; set tls = \"starttls\" or \"implicit\"")]
    NoPlain,
    /// Upstream refused `XCLIENT` (mailgate is not in its trusted networks).
    #[error("upstream refused XCLIENT; add mailgate to login_trusted_networks")]
    XClient,
    /// A name or password cannot be sent (control characters, NUL).
    #[error("username or master credentials contain characters that cannot be sent upstream")]
    Unsendable,
    /// A line or literal over its limit, or a response that makes no sense here.
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
}

/// One line of upstream's capability listing (RFC 5804 §1.7): `"NAME" ["value"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The capability's name as upstream spelled it (`SIEVE`, `SASL`, …).
    pub name: String,
    /// Its value, if it has one.
    pub value: Option<String>,
}

impl Capability {
    /// The capability as a ManageSieve line (quoted strings, CRLF), to send to a client.
    pub fn line(&self) -> String {
        match &self.value {
            Some(v) => format!("{} {}\r\n", quote(&self.name), quote(v)),
            None => format!("{}\r\n", quote(&self.name)),
        }
    }

    fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// What [`Machine::next`] returns.
pub type Step = Next<Outcome>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the capability listing up to its `OK` (`tls`: inside TLS after STARTTLS).
    Greeting {
        after_tls: bool,
    },
    StartTls,
    AwaitTls,
    XClient,
    Login,
    Finished,
}

/// The upstream ManageSieve login exchange for one session. `Debug` shows the state and
/// sizes, never the pending output (it may hold the master login).
pub struct UpstreamLogin {
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    framer: Framer,
    starttls: bool,
    user: String,
    master_user: String,
    master_password: SecretString,
    style: LoginStyle,
    /// The client's address, passed with XCLIENT when upstream offers it.
    client: Option<SocketAddr>,
    caps: Vec<Capability>,
    /// Stop after the listing ([`UpstreamLogin::probe`]).
    probe: bool,
}

impl std::fmt::Debug for UpstreamLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLogin")
            .field("state", &self.state)
            .field("user", &self.user)
            .field("style", &self.style)
            .field("starttls", &self.starttls)
            .field("client", &self.client)
            .field("buffered", &self.buf.len())
            .field("pending_output", &self.out.len())
            .field("capabilities", &self.caps.len())
            .finish()
    }
}

impl Machine for UpstreamLogin {
    type Event = Outcome;

    /// Bytes read from upstream.
    fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::AwaitTls) {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next step.
    fn next(&mut self) -> Step {
        loop {
            if !self.out.is_empty() {
                return Next::Write(std::mem::take(&mut self.out));
            }
            match self.state {
                State::AwaitTls => return Next::NeedInput,
                State::Finished => return Next::Event(Outcome::Failed(UpstreamError::Protocol("poll after finish"))),
                _ => {}
            }
            let limits = FrameLimits { line: MAX_LINE, literal: MAX_LITERAL, total: MAX_UNIT };
            let end = match self.framer.scan(&self.buf, limits) {
                Ok(Some(end)) => end,
                Ok(None) if self.buf.len() > MAX_UNIT => return self.fail(UpstreamError::Protocol("too much input")),
                Ok(None) => return Next::NeedInput,
                Err(FrameError::LineTooLong) => return self.fail(UpstreamError::Protocol("line too long")),
                Err(FrameError::LiteralTooBig) => return self.fail(UpstreamError::Protocol("literal too big")),
                Err(FrameError::TooBig) => return self.fail(UpstreamError::Protocol("response too long")),
            };
            let unit: Vec<u8> = self.buf.drain(..end.min(self.buf.len())).collect();
            self.framer = Framer::default();
            let tokens = match tokenize(&unit) {
                Ok(t) => t,
                Err(Malformed) => return self.fail(UpstreamError::Protocol("malformed line")),
            };
            if let Some(step) = self.on_unit(&tokens) {
                return step;
            }
        }
    }

    /// The TLS handshake after STARTTLS completed; upstream sends its listing again.
    fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.buf.clear();
            self.framer = Framer::default();
            // Capabilities seen before TLS are forgotten (RFC 5804 §2.2).
            self.caps.clear();
            self.state = State::Greeting { after_tls: true };
        }
    }
}

/// A response line: `OK`/`NO`/`BYE`, its code and text.
struct Response {
    kind: Kind,
    code: Option<String>,
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    No,
    Bye,
}

impl UpstreamLogin {
    /// `client`: the mail client's address, passed upstream with `XCLIENT` when upstream
    /// offers it; `None`: never sent. `starttls`: upgrade the upstream connection first.
    pub fn new(
        user: &str,
        master_user: &str,
        master_password: SecretString,
        style: LoginStyle,
        starttls: bool,
        client: Option<SocketAddr>,
    ) -> UpstreamLogin {
        UpstreamLogin {
            state: State::Greeting { after_tls: false },
            buf: Vec::new(),
            out: Vec::new(),
            framer: Framer::default(),
            starttls,
            user: user.to_string(),
            master_user: master_user.to_string(),
            master_password,
            style,
            client,
            caps: Vec::new(),
            probe: false,
        }
    }

    /// Reads upstream's capability listing only (inside TLS when `starttls`), ending with
    /// [`Outcome::Listed`]: the `SIEVE` extensions a front must show before login
    /// (RFC 5804 §1.7: clients refuse a server without them), from
    /// [`UpstreamLogin::capabilities`]. No credentials are involved.
    pub fn probe(starttls: bool) -> UpstreamLogin {
        let none = SecretString::from(String::new());
        UpstreamLogin { probe: true, ..UpstreamLogin::new("", "", none, LoginStyle::MasterSasl, starttls, None) }
    }

    /// Upstream's capability listing (the one inside TLS after STARTTLS): what the client
    /// is shown after login, in upstream's order.
    pub fn capabilities(&self) -> &[Capability] {
        &self.caps
    }

    /// Bytes upstream sent after its final login reply (they belong to the client).
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf
    }

    fn fail(&mut self, e: UpstreamError) -> Step {
        self.state = State::Finished;
        Next::Event(Outcome::Failed(e))
    }

    fn finish(&mut self, outcome: Outcome) -> Step {
        self.state = State::Finished;
        Next::Event(outcome)
    }

    fn has_cap(&self, name: &str) -> bool {
        self.caps.iter().any(|c| c.is(name))
    }

    fn on_unit(&mut self, tokens: &[Token]) -> Option<Step> {
        let response = response(tokens);
        match self.state {
            State::Greeting { after_tls } => {
                if let Some(cap) = capability(tokens) {
                    if self.caps.len() >= MAX_CAPABILITIES {
                        return Some(self.fail(UpstreamError::Protocol("too many capabilities")));
                    }
                    self.caps.push(cap);
                    return None;
                }
                match response {
                    Some(Response { kind: Kind::Ok, .. }) if self.starttls && !after_tls => {
                        if !self.has_cap("STARTTLS") {
                            return Some(self.fail(UpstreamError::StartTls));
                        }
                        self.out.extend_from_slice(b"STARTTLS\r\n");
                        self.state = State::StartTls;
                        None
                    }
                    Some(Response { kind: Kind::Ok, .. }) => self.after_greeting(),
                    _ => Some(self.fail(UpstreamError::Greeting)),
                }
            }
            State::StartTls => match response {
                Some(Response { kind: Kind::Ok, .. }) => {
                    self.state = State::AwaitTls;
                    if !self.buf.is_empty() {
                        // Bytes after the OK, before the handshake: injected.
                        return Some(self.fail(UpstreamError::Protocol("data after STARTTLS OK")));
                    }
                    Some(Next::StartTls)
                }
                _ => Some(self.fail(UpstreamError::StartTls)),
            },
            // A capability line here (a server that lists again after XCLIENT) changes
            // nothing: the listing kept is the greeting's.
            State::XClient if capability(tokens).is_some() => None,
            State::XClient => match response {
                Some(Response { kind: Kind::Ok, .. }) => self.send_login(),
                Some(_) => Some(self.fail(UpstreamError::XClient)),
                None => Some(self.fail(UpstreamError::Protocol("unexpected line after XCLIENT"))),
            },
            State::Login => match response {
                Some(Response { kind: Kind::Ok, .. }) => Some(self.finish(Outcome::LoggedIn)),
                Some(Response { code, text, .. }) => Some(self.finish(Outcome::Refused { code, text })),
                // A SASL challenge: PLAIN with an initial response needs none.
                None => Some(self.fail(UpstreamError::Protocol("unexpected challenge"))),
            },
            State::AwaitTls | State::Finished => None,
        }
    }

    /// The listing is complete (inside TLS if asked for): XCLIENT if wanted, then login.
    fn after_greeting(&mut self) -> Option<Step> {
        if self.probe {
            return Some(self.finish(Outcome::Listed));
        }
        // Upstream lists its mechanisms; without PLAIN it would refuse the master
        // password on this channel (a plaintext one, usually): never send it.
        if let Some(sasl) = self.caps.iter().find(|c| c.is("SASL"))
            && !sasl.value.as_deref().unwrap_or("").split_ascii_whitespace().any(|m| m.eq_ignore_ascii_case("PLAIN"))
        {
            return Some(self.fail(UpstreamError::NoPlain));
        }
        match self.client {
            Some(addr) if self.has_cap("XCLIENT") => {
                self.out.extend_from_slice(format!("XCLIENT ADDR={} PORT={}\r\n", addr.ip(), addr.port()).as_bytes());
                self.state = State::XClient;
                None
            }
            _ => self.send_login(),
        }
    }

    /// `AUTHENTICATE "PLAIN" "<base64>"` with the style's identities.
    fn send_login(&mut self) -> Option<Step> {
        let sendable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
        let (authzid, authcid) = match &self.style {
            LoginStyle::MasterSasl => (self.user.clone(), self.master_user.clone()),
            LoginStyle::MasterSeparator(sep) => (String::new(), format!("{}{}{}", self.user, sep, self.master_user)),
            LoginStyle::User => (String::new(), self.user.clone()),
        };
        let master_ok = matches!(self.style, LoginStyle::User) || sendable(&self.master_user);
        if !sendable(&self.user) || !master_ok || !sendable(&authcid) || self.master_password.expose().contains('\0') {
            return Some(self.fail(UpstreamError::Unsendable));
        }
        let payload = sasl::encode_plain(&authzid, &authcid, &self.master_password);
        self.out.extend_from_slice(format!("AUTHENTICATE \"PLAIN\" \"{payload}\"\r\n").as_bytes());
        self.state = State::Login;
        None
    }
}

/// Text from upstream, printable and bounded, for the log.
fn clean(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(1024).collect()
}

/// A capability line: one or two strings.
fn capability(tokens: &[Token]) -> Option<Capability> {
    match tokens {
        [Token::Str(name)] => Some(Capability { name: clean(name.expose()), value: None }),
        [Token::Str(name), Token::Str(value)] => {
            Some(Capability { name: clean(name.expose()), value: Some(clean(value.expose())) })
        }
        _ => None,
    }
}

/// A response: `OK`/`NO`/`BYE` [`(code ...)`] [`"text"`].
fn response(tokens: &[Token]) -> Option<Response> {
    let (Token::Atom(word), rest) = tokens.split_first()? else { return None };
    let kind = match word.to_ascii_uppercase().as_str() {
        "OK" => Kind::Ok,
        "NO" => Kind::No,
        "BYE" => Kind::Bye,
        _ => return None,
    };
    let mut rest = rest;
    let mut code = None;
    if let Some((Token::Open, after)) = rest.split_first() {
        let mut depth = 1usize;
        let mut words = Vec::new();
        let mut i = 0;
        while depth > 0 {
            match after.get(i)? {
                Token::Open => depth += 1,
                Token::Close => depth -= 1,
                Token::Atom(a) => words.push(clean(a.as_bytes())),
                Token::Str(s) => words.push(quote(&clean(s.expose()))),
            }
            i += 1;
        }
        code = Some(words.join(" "));
        rest = after.get(i..)?;
    }
    let text = match rest {
        [] => String::new(),
        [Token::Str(s)] => clean(s.expose()),
        _ => return None,
    };
    Some(Response { kind, code, text })
}

#[cfg(test)]
#[path = "sieve_upstream_tests.rs"]
mod tests;
