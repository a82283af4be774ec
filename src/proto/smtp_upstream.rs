//! Logging in to the upstream SMTP submission server as the user, sans-IO, and reading
//! SMTP replies.
//!
//! Two styles: SASL PLAIN with authzid = user and the master credentials (Dovecot
//! submission; Postfix with Dovecot SASL), or Postfix `XCLIENT LOGIN=<user>` from an
//! address listed in `smtpd_authorized_xclient_hosts`. The client's address goes upstream
//! with `XCLIENT ADDR=`/`PORT=` wherever the server offers XCLIENT (values xtext-encoded,
//! never raw client strings). Optional STARTTLS first; capabilities seen before TLS are
//! forgotten. Replies are read with a hard size bound.

use crate::proto::{Machine, Next, sasl};
use crate::secret::SecretString;
use std::net::{IpAddr, SocketAddr};

/// Longest reply line accepted.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply (an EHLO reply has a dozen).
pub const MAX_REPLY_LINES: usize = 100;

/// A reply that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// A line is longer than [`MAX_REPLY_LINE`] or there are more than [`MAX_REPLY_LINES`].
    #[error("upstream reply too long")]
    TooLong,
    /// Not `DDD`, `DDD-text` or `DDD text`, or the code changes inside a reply.
    #[error("malformed upstream reply")]
    Malformed,
}

/// Finds one complete reply at the start of `buf`: `Ok(Some((code, length)))`, `Ok(None)`
/// if more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(u16, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    for _ in 0..MAX_REPLY_LINES {
        let rest = &buf[pos..];
        let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
            return if rest.len() > MAX_REPLY_LINE { Err(ReplyError::TooLong) } else { Ok(None) };
        };
        if lf > MAX_REPLY_LINE {
            return Err(ReplyError::TooLong);
        }
        let line = rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]);
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::Malformed);
        }
        let this: u16 = line[..3].iter().fold(0, |n, d| n * 10 + u16::from(d - b'0'));
        if !(200..600).contains(&this) || code.is_some_and(|c| c != this) {
            return Err(ReplyError::Malformed);
        }
        code = Some(this);
        pos += lf + 1;
        match line.get(3) {
            None | Some(b' ') => return Ok(Some((this, pos))),
            Some(b'-') => {}
            Some(_) => return Err(ReplyError::Malformed),
        }
    }
    Err(ReplyError::TooLong)
}

/// The text lines of a reply (without code and separator).
fn reply_lines(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == b'\n')
        .filter(|l| l.len() >= 3)
        .map(|l| String::from_utf8_lossy(l.get(4..).unwrap_or_default()).trim_end().to_string())
        .collect()
}

/// RFC 3461 xtext: printable ASCII except `+` and `=` as is, everything else `+HH`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Login style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// AUTH PLAIN with authzid = user.
    MasterSasl,
    /// XCLIENT LOGIN=user.
    Xclient,
    /// No login: greet (and STARTTLS), report the EHLO keywords, stop.
    Probe,
    /// AUTH PLAIN as the user with the user's own password (passed as the master password;
    /// the master user is not used).
    User,
}

/// Why the upstream login failed. No variant carries upstream text or a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmtpUpstreamError {
    /// The greeting was not 220.
    #[error("upstream greeting refused (code {0})")]
    Greeting(u16),
    /// STARTTLS not offered or refused.
    #[error("upstream did not accept STARTTLS")]
    StartTls,
    /// AUTH PLAIN (or XCLIENT with LOGIN) is not offered.
    #[error("upstream does not offer {0}")]
    NotOffered(&'static str),
    /// The login was refused.
    #[error("upstream refused the login (code {0})")]
    LoginRefused(u16),
    /// XCLIENT refused (mailgate's address is not in smtpd_authorized_xclient_hosts?).
    #[error("upstream refused XCLIENT (code {0}); is mailgate's address in smtpd_authorized_xclient_hosts?")]
    XclientRefused(u16),
    /// EHLO refused.
    #[error("upstream refused EHLO (code {0})")]
    Ehlo(u16),
    /// A name cannot be sent (control characters).
    #[error("the username cannot be sent upstream")]
    Unsendable,
    /// A malformed or over-long reply.
    #[error("upstream protocol error: {0}")]
    Protocol(#[from] ReplyError),
}

/// What [`Machine::next`] returns; the event ends the login: `Ok` — logged in,
/// with upstream's capabilities (EHLO keywords, upper-case, parameters kept); `Err` — give up (the client
/// gets a temporary error).
pub type Step = Next<Result<Vec<String>, SmtpUpstreamError>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    StartTls,
    AwaitTls,
    Xclient,
    Auth,
    Finished,
}

/// The upstream login exchange.
pub struct SmtpLogin {
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    starttls: bool,
    tls_done: bool,
    xclient_done: bool,
    helo: String,
    user: String,
    master_user: String,
    master_password: SecretString,
    style: Style,
    client: SocketAddr,
    caps: Vec<String>,
}

impl std::fmt::Debug for SmtpLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpLogin").field("state", &self.state).field("user", &self.user).finish()
    }
}

impl SmtpLogin {
    /// `helo`: the name mailgate greets with; `client`: the mail client's address.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        helo: &str,
        user: &str,
        master_user: &str,
        master_password: SecretString,
        style: Style,
        starttls: bool,
        client: SocketAddr,
    ) -> SmtpLogin {
        SmtpLogin {
            state: State::Greeting,
            buf: Vec::new(),
            out: Vec::new(),
            starttls,
            tls_done: false,
            xclient_done: false,
            helo: helo.to_string(),
            user: user.to_string(),
            master_user: master_user.to_string(),
            master_password,
            style,
            client,
            caps: Vec::new(),
        }
    }

    /// Bytes upstream sent after its last reply.
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf.clone()
    }

    fn ehlo(&mut self) {
        self.out.extend_from_slice(format!("EHLO {}\r\n", self.helo).as_bytes());
        self.state = State::Ehlo;
    }

    fn fail(&mut self, e: SmtpUpstreamError) -> Step {
        self.state = State::Finished;
        Next::Event(Err(e))
    }

    fn has(&self, keyword: &str) -> Option<&str> {
        self.caps.iter().find_map(|c| {
            let mut parts = c.splitn(2, [' ', '=']);
            let k = parts.next()?;
            k.eq_ignore_ascii_case(keyword).then(|| parts.next().unwrap_or(""))
        })
    }

    fn on_reply(&mut self, code: u16, raw: &[u8]) -> Option<Step> {
        match self.state {
            State::Greeting if code == 220 => {
                self.ehlo();
                None
            }
            State::Greeting => Some(self.fail(SmtpUpstreamError::Greeting(code))),
            State::Ehlo if code != 250 => Some(self.fail(SmtpUpstreamError::Ehlo(code))),
            State::Ehlo => {
                self.caps = reply_lines(raw).into_iter().skip(1).map(|l| l.to_ascii_uppercase()).collect();
                self.after_ehlo()
            }
            State::StartTls if code == 220 => {
                self.state = State::AwaitTls;
                if !self.buf.is_empty() {
                    return Some(self.fail(ReplyError::Malformed.into()));
                }
                Some(Next::StartTls)
            }
            State::StartTls => Some(self.fail(SmtpUpstreamError::StartTls)),
            State::Xclient if code == 220 => {
                // XCLIENT starts a new session: greet again.
                self.xclient_done = true;
                self.ehlo();
                None
            }
            State::Xclient => Some(self.fail(SmtpUpstreamError::XclientRefused(code))),
            State::Auth if code == 235 => {
                self.state = State::Finished;
                Some(Next::Event(Ok(self.caps.clone())))
            }
            State::Auth => Some(self.fail(SmtpUpstreamError::LoginRefused(code))),
            State::AwaitTls | State::Finished => None,
        }
    }

    fn after_ehlo(&mut self) -> Option<Step> {
        if self.starttls && !self.tls_done {
            if self.has("STARTTLS").is_none() {
                return Some(self.fail(SmtpUpstreamError::StartTls));
            }
            self.out.extend_from_slice(b"STARTTLS\r\n");
            self.state = State::StartTls;
            return None;
        }
        if self.style == Style::Probe {
            self.state = State::Finished;
            return Some(Next::Event(Ok(self.caps.clone())));
        }
        if self.user.chars().any(char::is_control) || self.user.is_empty() {
            return Some(self.fail(SmtpUpstreamError::Unsendable));
        }
        if !self.xclient_done {
            let offered: Vec<String> = self
                .has("XCLIENT")
                .map(|a| a.split_ascii_whitespace().map(str::to_ascii_uppercase).collect())
                .unwrap_or_default();
            if self.style == Style::Xclient && !offered.iter().any(|a| a == "LOGIN") {
                return Some(self.fail(SmtpUpstreamError::NotOffered("XCLIENT LOGIN")));
            }
            if !offered.is_empty() {
                let mut line = String::from("XCLIENT");
                if self.style == Style::Xclient {
                    line.push_str(&format!(" LOGIN={}", xtext(&self.user)));
                }
                if offered.iter().any(|a| a == "ADDR") {
                    let addr = match self.client.ip() {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => format!("IPV6:{v6}"),
                    };
                    line.push_str(&format!(" ADDR={}", xtext(&addr)));
                }
                if offered.iter().any(|a| a == "PORT") {
                    line.push_str(&format!(" PORT={}", self.client.port()));
                }
                if line != "XCLIENT" {
                    line.push_str("\r\n");
                    self.out.extend_from_slice(line.as_bytes());
                    self.state = State::Xclient;
                    return None;
                }
            }
        }
        match self.style {
            Style::Xclient | Style::Probe => {
                self.state = State::Finished;
                Some(Next::Event(Ok(self.caps.clone())))
            }
            Style::MasterSasl | Style::User => {
                let plain = self.has("AUTH").is_some_and(|m| m.split_ascii_whitespace().any(|x| x == "PLAIN"));
                if !plain {
                    return Some(self.fail(SmtpUpstreamError::NotOffered("AUTH PLAIN")));
                }
                let payload = if self.style == Style::User {
                    sasl::encode_plain("", &self.user, &self.master_password)
                } else {
                    sasl::encode_plain(&self.user, &self.master_user, &self.master_password)
                };
                let line = format!("AUTH PLAIN {payload}\r\n");
                self.out.extend_from_slice(line.as_bytes());
                self.state = State::Auth;
                None
            }
        }
    }
}

impl Machine for SmtpLogin {
    type Event = Result<Vec<String>, SmtpUpstreamError>;
    /// Bytes read from upstream.
    fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::AwaitTls | State::Finished) {
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
                State::Finished => return Next::Event(Err(SmtpUpstreamError::Protocol(ReplyError::Malformed))),
                _ => {}
            }
            let (code, len) = match parse_reply(&self.buf) {
                Ok(Some(r)) => r,
                Ok(None) => return Next::NeedInput,
                Err(e) => return self.fail(e.into()),
            };
            let raw: Vec<u8> = self.buf.drain(..len).collect();
            if let Some(step) = self.on_reply(code, &raw) {
                return step;
            }
        }
    }

    /// The TLS handshake completed.
    fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.tls_done = true;
            self.caps.clear();
            self.buf.clear();
            self.ehlo();
        }
    }
}

/// Reads upstream's replies once logged in: one whole reply per event, `(code, the raw
/// lines)`; a malformed or over-long reply is an `Err` and ends the connection.
#[derive(Debug, Default)]
pub struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// Starts with what the login read past its last reply.
    pub fn new(leftover: Vec<u8>) -> Replies {
        Replies { buf: leftover }
    }
}

impl Machine for Replies {
    type Event = Result<(u16, Vec<u8>), ReplyError>;
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn next(&mut self) -> Next<Self::Event> {
        match parse_reply(&self.buf) {
            Ok(Some((code, len))) => Next::Event(Ok((code, self.buf.drain(..len).collect()))),
            Ok(None) => Next::NeedInput,
            Err(e) => {
                self.buf.clear();
                Next::Event(Err(e))
            }
        }
    }

    fn tls_started(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::imap::base64;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"250 ok\r\n"), Ok(Some((250, 8))));
        assert_eq!(parse_reply(b"250-a\r\n250 b\r\nX"), Ok(Some((250, 14))));
        assert_eq!(parse_reply(b"250-a\r\n"), Ok(None));
        assert_eq!(parse_reply(b"250"), Ok(None));
        assert_eq!(parse_reply(b"250\r\n"), Ok(Some((250, 5))));
        assert_eq!(parse_reply(b"250-a\r\n251 b\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(b"hello\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_reply(&vec![b'2'; 10_000]), Err(ReplyError::TooLong));
        for cut in 0..14 {
            let r = parse_reply(&b"250-a\r\n250 b\r\n"[..cut]);
            assert_eq!(r, Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("alice@example.com"), "alice@example.com");
        assert_eq!(xtext("a+b=c d\r\n"), "a+2Bb+3Dc+20d+0D+0A");
        assert_eq!(xtext("ü"), "+C3+BC");
    }

    fn run(login: &mut SmtpLogin, input: &[u8]) -> (String, Vec<String>) {
        login.feed(input);
        let mut w = Vec::new();
        let mut steps = Vec::new();
        loop {
            match login.next() {
                Next::Write(b) => w.extend(b),
                Next::NeedInput => break,
                other => {
                    steps.push(format!("{other:?}"));
                    break;
                }
            }
        }
        (String::from_utf8_lossy(&w).into_owned(), steps)
    }

    fn new(style: Style, starttls: bool) -> SmtpLogin {
        SmtpLogin::new(
            "mail.example.com",
            "alice@example.com",
            "mailgate",
            "master-pw".to_string().into(),
            style,
            starttls,
            "192.0.2.7:4567".parse().unwrap(),
        )
    }

    #[test]
    fn master_sasl_with_xclient_addr() {
        let mut l = new(Style::MasterSasl, false);
        assert_eq!(run(&mut l, b"220 sub ESMTP\r\n").0, "EHLO mail.example.com\r\n");
        let (w, _) = run(&mut l, b"250-sub\r\n250-XCLIENT ADDR PORT TTL\r\n250 AUTH PLAIN\r\n");
        assert_eq!(w, "XCLIENT ADDR=192.0.2.7 PORT=4567\r\n");
        assert_eq!(run(&mut l, b"220 again\r\n").0, "EHLO mail.example.com\r\n");
        let (w, _) = run(&mut l, b"250-sub\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n");
        assert_eq!(w, format!("AUTH PLAIN {}\r\n", base64(b"alice@example.com\0mailgate\0master-pw")));
        let (_, steps) = run(&mut l, b"235 2.7.0 ok\r\n");
        assert!(steps[0].starts_with("Event(Ok([\"8BITMIME\""), "{steps:?}");
    }

    #[test]
    fn xclient_login() {
        let mut l = new(Style::Xclient, false);
        run(&mut l, b"220 postfix\r\n");
        let (w, _) = run(&mut l, b"250-postfix\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n");
        assert_eq!(w, "XCLIENT LOGIN=alice@example.com ADDR=192.0.2.7 PORT=4567\r\n");
        assert_eq!(run(&mut l, b"220 postfix\r\n").0, "EHLO mail.example.com\r\n");
        let (_, steps) = run(&mut l, b"250-postfix\r\n250 8BITMIME\r\n");
        assert!(steps[0].starts_with("Event(Ok("), "{steps:?}");
        let mut l = new(Style::Xclient, false);
        run(&mut l, b"220 postfix\r\n");
        run(&mut l, b"250-postfix\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN\r\n250 8BITMIME\r\n");
        let (_, steps) = run(&mut l, b"550 5.7.0 Error: insufficient authorization\r\n");
        assert!(steps[0].contains("XclientRefused(550)"), "{steps:?}");
        let mut l = new(Style::Xclient, false);
        run(&mut l, b"220 postfix\r\n");
        let (_, steps) = run(&mut l, b"250-postfix\r\n250 8BITMIME\r\n");
        assert!(steps[0].contains("NotOffered"), "{steps:?}");
    }

    #[test]
    fn starttls_and_refusals() {
        let mut l = new(Style::MasterSasl, true);
        run(&mut l, b"220 x\r\n");
        let (_, steps) = run(&mut l, b"250-x\r\n250 AUTH PLAIN\r\n");
        assert!(steps[0].contains("StartTls"), "stripping must fail: {steps:?}");
        let mut l = new(Style::MasterSasl, true);
        run(&mut l, b"220 x\r\n");
        assert_eq!(run(&mut l, b"250-x\r\n250 STARTTLS\r\n").0, "STARTTLS\r\n");
        let (w, steps) = run(&mut l, b"220 go\r\n");
        assert_eq!((w.as_str(), steps[0].as_str()), ("", "StartTls"));
        l.tls_started();
        assert_eq!(run(&mut l, b"").0, "EHLO mail.example.com\r\n");
        assert!(run(&mut l, b"250-x\r\n250 AUTH PLAIN\r\n").0.starts_with("AUTH PLAIN "));
        let (_, steps) = run(&mut l, b"535 5.7.8 no\r\n");
        assert!(steps[0].contains("LoginRefused(535)"));
        let mut l = new(Style::MasterSasl, false);
        let (_, steps) = run(&mut l, b"554 go away\r\n");
        assert!(steps[0].contains("Greeting(554)"));
        let mut l = new(Style::MasterSasl, false);
        run(&mut l, b"220 x\r\n");
        let (_, steps) = run(&mut l, b"250 x\r\n");
        assert!(steps[0].contains("NotOffered"), "{steps:?}");
    }

    #[test]
    fn debug_hides_the_master_password() {
        let l = new(Style::MasterSasl, false);
        assert!(!format!("{l:?}").contains("master-pw"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: crate::proto::fuzz_cases(2048),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The SMTP reply parser on arbitrary bytes: never panics; a complete reply it
        /// reports has a 3-digit code and ends inside the buffer on a line end.
        #[test]
        fn prop_parse_reply_arbitrary(
            buf in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(b'\n'),
                    proptest::prelude::Just(b'\r'),
                    proptest::prelude::Just(b'-'),
                    proptest::prelude::Just(b' '),
                    b'0'..=b'9',
                    proptest::prelude::any::<u8>(),
                ],
                0..400,
            )
        ) {
            if let Ok(Some((code, used))) = parse_reply(&buf) {
                proptest::prop_assert!((100..=599).contains(&code), "code {}", code);
                proptest::prop_assert!(used <= buf.len());
                proptest::prop_assert_eq!(buf[used - 1], b'\n');
            }
        }
    }
}
