//! Logging in to the upstream IMAP server as the user, sans-IO.
//!
//! mailgate does not know the user's password upstream; it logs in with master
//! credentials (Dovecot master users): SASL PLAIN with authzid = user, or
//! `LOGIN "user*master" "password"`. Before that it sends `ID` with the client's real
//! address (`x-originating-ip`, honoured by Dovecot from `login_trusted_networks`).
//! Optional STARTTLS first. The result is upstream's post-login capability list.
//!
//! Responses are read line by line with a hard length cap; a literal in a response at
//! this stage is refused (SECURITY.md case 17). Hand-written on purpose: only the status
//! word of tagged lines and the CAPABILITY list are needed, and imap-codec's response
//! parser would reject harmless server quirks that the relay must let through.

use crate::proto::{Machine, Next, sasl};
use crate::secret::SecretString;
use std::net::SocketAddr;

/// Longest response line accepted while logging in (Dovecot's own limit is 64 KiB).
pub const MAX_LINE: usize = 64 * 1024;

/// Which master login to use (IMAP here; POP3's [`crate::proto::pop3_upstream`] uses the
/// same choice with `AUTH PLAIN` and `USER`/`PASS`).
#[derive(Debug, Clone)]
pub enum LoginStyle {
    /// `AUTHENTICATE PLAIN` with authzid = user, authcid = master user.
    MasterSasl,
    /// `LOGIN "<user><sep><master>" "<password>"` (POP3: `USER <user><sep><master>`,
    /// then `PASS <password>`).
    MasterSeparator(String),
    /// `AUTHENTICATE PLAIN` as the user with the user's own password (which is passed
    /// in the `master_password` slot; `master_user` is not used).
    User,
}

impl Machine for UpstreamLogin {
    type Event = Result<String, UpstreamError>;
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
                return Next::Event(Err(UpstreamError::Unsendable));
            }
            if !self.out.is_empty() {
                return Next::Write(std::mem::take(&mut self.out));
            }
            if self.state == State::AwaitTls {
                return Next::NeedInput;
            }
            if self.state == State::Finished {
                if self.probe
                    && let Some(caps) = self.caps.take()
                {
                    return Next::Event(Ok(caps));
                }
                return Next::Event(Err(UpstreamError::Protocol("poll after finish")));
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

    /// The TLS handshake after STARTTLS completed; continue inside TLS.
    fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.buf.clear();
            // Capabilities seen before TLS are forgotten (RFC 9051 §6.2.1).
            self.greeting_caps = None;
            self.caps = None;
            self.send_login();
        }
    }
}

/// Why the upstream login failed. No variant carries text from upstream or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The greeting was BYE, PREAUTH or not IMAP.
    #[error("upstream greeting refused (BYE, PREAUTH or not IMAP)")]
    Greeting,
    /// STARTTLS was not offered or not accepted.
    #[error("upstream did not accept STARTTLS")]
    StartTls,
    /// Upstream announced LOGINDISABLED on a plaintext connection (set `tls = "starttls"`).
    #[error("upstream refuses logins without TLS (LOGINDISABLED); set tls = \"starttls\" or \"implicit\"")]
    LoginDisabled,
    /// The master login was refused (wrong master credentials, unknown user, …).
    #[error("upstream refused the master login")]
    LoginRefused,
    /// A name or password cannot be sent (control or 8-bit characters).
    #[error("username or master credentials contain characters that cannot be sent upstream")]
    Unsendable,
    /// A line over [`MAX_LINE`], a literal, or another response that makes no sense here.
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
}

/// What [`Machine::next`] returns; the event ends the login: `Ok` — logged in,
/// with upstream's capabilities (printable ASCII, may be empty); `Err` — give up (the client
/// gets a temporary error).
pub type Step = Next<Result<String, UpstreamError>>;

#[derive(Debug, PartialEq, Eq)]
enum State {
    Greeting,
    StartTls,
    AwaitTls,
    /// ID and login sent (pipelined); waiting for both tagged replies.
    Login {
        sasl_continuation: bool,
    },
    Capability,
    Finished,
}

/// The upstream login exchange for one session.
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
    local: SocketAddr,
    greeting_caps: Option<String>,
    caps: Option<String>,
    unsendable: bool,
    client_id: Vec<(String, String)>,
    /// Stop before the login ([`UpstreamLogin::probe`]).
    probe: bool,
}

impl UpstreamLogin {
    /// `client`: the mail client's address; `local`: the mailgate address it connected to.
    pub fn new(
        user: &str,
        master_user: &str,
        master_password: SecretString,
        style: LoginStyle,
        starttls: bool,
        client: SocketAddr,
        local: SocketAddr,
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
            local,
            greeting_caps: None,
            caps: None,
            unsendable: false,
            client_id: Vec::new(),
            probe: false,
        }
    }

    /// No login: greet (and STARTTLS when `starttls`), then end with the capabilities of
    /// the greeting (none after STARTTLS: IMAP does not greet again inside TLS). What
    /// `mailgate check` uses to see that upstream answers with the configured TLS without
    /// a user to log in as; nothing secret is sent.
    pub fn probe(starttls: bool) -> UpstreamLogin {
        let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut login = UpstreamLogin::new(
            "",
            "",
            SecretString::from(String::new()),
            LoginStyle::MasterSasl,
            starttls,
            nowhere,
            nowhere,
        );
        login.probe = true;
        login
    }

    /// The client's own `ID` fields (name, version, os, …), sent upstream before the
    /// `x-originating-*` ones so that upstream's log shows the real client. A field that
    /// cannot be sent as a quoted string, and any `x-…` field, is left out.
    pub fn with_client_id(mut self, fields: &[(String, String)]) -> UpstreamLogin {
        self.client_id = fields
            .iter()
            .filter(|(k, _)| !k.to_ascii_lowercase().starts_with("x-"))
            .filter_map(|(k, v)| Some((quoted(k)?, quoted(v)?)))
            // With the four x- fields, within RFC 2971's 30 pairs.
            .take(26)
            .collect();
        self
    }

    fn fail(&mut self, e: UpstreamError) -> Step {
        self.state = State::Finished;
        Next::Event(Err(e))
    }

    fn next_line(&mut self) -> Result<Option<Vec<u8>>, UpstreamError> {
        match self.buf.windows(2).position(|w| w == b"\r\n") {
            Some(pos) => {
                if pos > MAX_LINE {
                    return Err(UpstreamError::Protocol("line too long"));
                }
                let line = self.buf[..pos].to_vec();
                self.buf.drain(..pos + 2);
                if line.ends_with(b"}") {
                    return Err(UpstreamError::Protocol("literal in a login response"));
                }
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE => Err(UpstreamError::Protocol("line too long")),
            None => Ok(None),
        }
    }

    fn on_line(&mut self, line: &[u8]) -> Option<Step> {
        let text = String::from_utf8_lossy(line);
        match self.state {
            State::Greeting => {
                let upper = text.to_ascii_uppercase();
                if !upper.starts_with("* OK") {
                    return Some(self.fail(UpstreamError::Greeting));
                }
                self.greeting_caps = capability_code(&text);
                if self.starttls {
                    if let Some(caps) = &self.greeting_caps
                        && !has_cap(caps, "STARTTLS")
                    {
                        return Some(self.fail(UpstreamError::StartTls));
                    }
                    self.out.extend_from_slice(b"M1 STARTTLS\r\n");
                    self.state = State::StartTls;
                } else {
                    if let Some(caps) = &self.greeting_caps
                        && has_cap(caps, "LOGINDISABLED")
                    {
                        // Upstream refuses logins on this channel: never send the master password.
                        return Some(self.fail(UpstreamError::LoginDisabled));
                    }
                    self.send_login();
                }
                None
            }
            State::StartTls => {
                if text.starts_with("* ") {
                    // Untagged data before TLS is ignored, never kept (SECURITY.md case 15).
                    return None;
                }
                if text.to_ascii_uppercase().starts_with("M1 OK") {
                    self.state = State::AwaitTls;
                    if !self.buf.is_empty() {
                        // Bytes after the OK, before the handshake: injected.
                        return Some(self.fail(UpstreamError::Protocol("data after STARTTLS OK")));
                    }
                    return Some(Next::StartTls);
                }
                Some(self.fail(UpstreamError::StartTls))
            }
            State::Login { sasl_continuation } => {
                if let Some(rest) = text.strip_prefix("* ") {
                    if rest.to_ascii_uppercase().starts_with("CAPABILITY ") {
                        self.caps = Some(clean_caps(&rest["CAPABILITY ".len()..]));
                    } else if rest.to_ascii_uppercase().starts_with("BYE") {
                        return Some(self.fail(UpstreamError::LoginRefused));
                    }
                    return None;
                }
                if text.starts_with('+') {
                    if sasl_continuation {
                        self.out.extend_from_slice(format!("{}\r\n", self.plain_payload()).as_bytes());
                        self.state = State::Login { sasl_continuation: false };
                        return None;
                    }
                    return Some(self.fail(UpstreamError::Protocol("unexpected continuation")));
                }
                let upper = text.to_ascii_uppercase();
                if upper.starts_with("M2 ") {
                    // The ID reply: informative either way.
                    return None;
                }
                if upper.starts_with("M3 OK") {
                    if let Some(caps) = capability_code(&text) {
                        self.caps = Some(caps);
                    }
                    if let Some(caps) = self.caps.clone() {
                        return Some(self.finish(caps));
                    }
                    self.out.extend_from_slice(b"M4 CAPABILITY\r\n");
                    self.state = State::Capability;
                    return None;
                }
                if upper.starts_with("M3 ") {
                    return Some(self.fail(UpstreamError::LoginRefused));
                }
                Some(self.fail(UpstreamError::Protocol("unexpected tagged response")))
            }
            State::Capability => {
                let upper = text.to_ascii_uppercase();
                if upper.starts_with("* CAPABILITY ") {
                    self.caps = Some(clean_caps(&text["* CAPABILITY ".len()..]));
                    return None;
                }
                if upper.starts_with("* BYE") {
                    return Some(self.fail(UpstreamError::Protocol("BYE after login")));
                }
                if upper.starts_with("M4 OK") {
                    let caps = self.caps.clone().unwrap_or_default();
                    return Some(self.finish(caps));
                }
                if upper.starts_with("M4 ") {
                    return Some(self.fail(UpstreamError::Protocol("CAPABILITY refused")));
                }
                None
            }
            State::AwaitTls | State::Finished => None,
        }
    }

    fn finish(&mut self, caps: String) -> Step {
        self.state = State::Finished;
        Next::Event(Ok(caps))
    }

    fn plain_payload(&self) -> String {
        match self.style {
            // authzid empty, authcid = the user.
            LoginStyle::User => sasl::encode_plain("", &self.user, &self.master_password),
            _ => sasl::encode_plain(&self.user, &self.master_user, &self.master_password),
        }
    }

    /// Sends ID (client address) and the login, pipelined (a probe ends here instead).
    fn send_login(&mut self) {
        if self.probe {
            let caps = self.greeting_caps.clone().unwrap_or_default();
            self.out.clear();
            self.state = State::Finished;
            self.caps = Some(caps);
            return;
        }
        let own: String = self.client_id.iter().map(|(k, v)| format!("{k} {v} ")).collect();
        let id = format!(
            "M2 ID ({own}\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\")\r\n",
            self.client.ip(),
            self.client.port(),
            self.local.ip(),
            self.local.port()
        );
        self.out.extend_from_slice(id.as_bytes());
        let printable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
        if !printable(&self.user) || !printable(&self.master_user) {
            self.out.clear();
            self.state = State::Finished;
            self.unsendable = true;
            return;
        }
        match &self.style {
            LoginStyle::MasterSasl | LoginStyle::User => {
                let sasl_ir = self.greeting_caps.as_deref().is_none_or(|c| has_cap(c, "SASL-IR"));
                if sasl_ir {
                    let line = format!("M3 AUTHENTICATE PLAIN {}\r\n", self.plain_payload());
                    self.out.extend_from_slice(line.as_bytes());
                    self.state = State::Login { sasl_continuation: false };
                } else {
                    self.out.extend_from_slice(b"M3 AUTHENTICATE PLAIN\r\n");
                    self.state = State::Login { sasl_continuation: true };
                }
            }
            LoginStyle::MasterSeparator(sep) => {
                let login = format!("{}{}{}", self.user, sep, self.master_user);
                match (quoted(&login), quoted(self.master_password.expose())) {
                    (Some(u), Some(p)) => {
                        self.out.extend_from_slice(format!("M3 LOGIN {u} {p}\r\n").as_bytes());
                        self.state = State::Login { sasl_continuation: false };
                    }
                    _ => {
                        self.out.clear();
                        self.state = State::Finished;
                        self.unsendable = true;
                    }
                }
            }
        }
    }
}

/// An IMAP quoted string, or `None` if the text has characters a quoted string can't carry.
fn quoted(s: &str) -> Option<String> {
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    Some(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// The list inside `[CAPABILITY …]`, if the line has one.
fn capability_code(line: &str) -> Option<String> {
    let start = line.to_ascii_uppercase().find("[CAPABILITY ")? + "[CAPABILITY ".len();
    let rest = line.get(start..)?;
    let end = rest.find(']')?;
    Some(clean_caps(&rest[..end]))
}

fn clean_caps(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .filter(|c| *c != ']' && *c != '[')
        .collect::<String>()
        .trim()
        .to_string()
}

fn has_cap(caps: &str, cap: &str) -> bool {
    caps.split_ascii_whitespace().any(|c| c.eq_ignore_ascii_case(cap))
}

impl UpstreamLogin {
    /// Bytes upstream sent after its last login reply (they belong to the client).
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf.clone()
    }
}

#[cfg(test)]
#[path = "imap_upstream_tests.rs"]
mod tests;
