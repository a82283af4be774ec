//! The IMAP filter of a restricted logged-in session (read-only and/or folder-limited app
//! passwords, issue 20), sans-IO. Not yet wired into `net/relay.rs`: an unrestricted
//! session keeps the raw relay and never builds these.
//!
//! Two pieces, one per direction, tied together by the caller:
//!
//! * [`CommandFilter`] (client → upstream) frames the client's commands (lines and
//!   literals), parses each with imap-codec's command parser and either forwards its exact
//!   bytes upstream ([`ToUpstream`]), forwards it with `SELECT` rewritten to `EXAMINE`
//!   (read-only), or answers the client itself (`NO [NOPERM]`, `NO [NONEXISTENT]`,
//!   `NO [CANNOT]`, `BAD`) without upstream ever seeing it. With a folder set, a mailbox
//!   name in a synchronizing literal is read before upstream sees the command: the filter
//!   sends that `+` itself and forwards the name as a quoted string (the one exception to
//!   byte-exactness). Nothing is forwarded that was
//!   not parsed: a command is forwarded once its bytes so far are valid IMAP, and every
//!   later line of it is checked again before it goes (one that is not ends the command
//!   upstream with a bare CRLF), so upstream's framing of what it receives is always
//!   ours.
//! * [`ResponseFilter`] (upstream → client) passes upstream's responses byte-exact, except
//!   that it drops `* LIST`, `* LSUB` and `* STATUS` responses naming folders outside the
//!   set, strips capabilities the filter cannot follow ([`keep_capability`]) from
//!   `CAPABILITY` responses and `[CAPABILITY ...]` codes, and puts the command filter's own
//!   answers ([`ResponseFilter::inject`]) between responses, never inside one.
//!
//! The wiring: every [`Next::Write`] of the command filter goes to
//! [`ResponseFilter::inject`]; every [`Next::Event`] of the response filter goes back to
//! the command filter ([`Seen::Continuation`] → [`CommandFilter::upstream_continuation`],
//! [`Seen::Tagged`] → [`CommandFilter::upstream_tagged`]). The command filter needs them
//! because a synchronizing literal's data (and IDLE's `DONE`) may only follow upstream's
//! `+`: if upstream refuses the literal instead, what the client sends next is a new
//! command, to be filtered, not literal data to pass on.

use crate::proto::{Machine, Next};
use imap_codec::decode::{CommandDecodeError, Decoder, ResponseDecodeError};
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::imap_types::response::{Data, Response};
use imap_codec::{CommandCodec, ResponseCodec};
use std::collections::{HashSet, VecDeque};

/// Bounds on what the filter holds for a peer.
pub mod limits {
    /// A command line without its literal data: 64 KiB, Dovecot's default
    /// `imap_max_line_length`, so no command Dovecot takes is refused for its length.
    pub const MAX_LINE: usize = 64 * 1024;
    /// What is kept of one command to parse it: its lines (literal data forwarded at once
    /// is kept as one byte), twice a line.
    pub const MAX_COMMAND: usize = 2 * MAX_LINE;
    /// Literal data held back until a folder check can be made (a mailbox name sent as a
    /// non-synchronizing literal): 8 KiB, far over any real mailbox name.
    pub const MAX_HELD: usize = 8 * 1024;
    /// Bytes a client may send while the filter waits for upstream's `+`; a client that
    /// waits as RFC 9051 §7.5 says sends none, so this is only a bound on a broken one.
    pub const MAX_PENDING: usize = 256 * 1024;
    /// Commands forwarded and not yet completed by upstream (pipelining depth).
    pub const MAX_IN_FLIGHT: usize = 4096;
    /// A response collected whole to decide on it (LIST, LSUB, STATUS, CAPABILITY and status
    /// lines): 64 KiB.
    pub const MAX_RESPONSE: usize = 64 * 1024;
}
use limits::*;

// ---------------------------------------------------------------------------------------
// What a session may do
// ---------------------------------------------------------------------------------------

/// What an app password's IMAP session is limited to. With neither limit the filter is not
/// used at all ([`Restriction::is_restricted`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restriction {
    /// Nothing in the mailbox may change: SELECT becomes EXAMINE, writing commands are
    /// refused with `NO [NOPERM]`.
    pub read_only: bool,
    /// Only these folders exist for the session; `None`: every folder.
    pub folders: Option<FolderSet>,
}

impl Restriction {
    /// Whether the session needs the filter (otherwise it keeps the raw relay).
    pub fn is_restricted(&self) -> bool {
        self.read_only || self.folders.is_some()
    }

    fn allows(&self, mailbox: &Mailbox<'_>) -> bool {
        match &self.folders {
            None => true,
            Some(set) => set.allows(mailbox_bytes(mailbox)),
        }
    }
}

fn mailbox_bytes<'m>(mailbox: &'m Mailbox<'_>) -> &'m [u8] {
    match mailbox {
        Mailbox::Inbox => b"INBOX",
        Mailbox::Other(other) => other.as_ref(),
    }
}

/// The folders a folder-limited session may see, as IMAP LIST patterns (RFC 9051 §6.3.9):
/// `*` matches anything, `%` anything but the hierarchy delimiter. `INBOX` is matched
/// without regard to case (in names and patterns, also as the first level of a
/// hierarchy); every other name is case-sensitive, as upstream's are.
///
/// Fail-closed on odd names: a name with a control character, a leading, trailing or
/// doubled delimiter, or a `.`/`..` level is never in the set, whatever the patterns, so
/// no spelling upstream might resolve elsewhere passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderSet {
    patterns: Vec<Vec<u8>>,
    delimiter: u8,
}

/// Why a folder list was refused (the administrator's input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FolderSetError {
    /// No pattern was given.
    #[error("no folder pattern given")]
    Empty,
    /// A pattern is empty or has a control character or a non-ASCII byte (names are sent in
    /// modified UTF-7, RFC 9051 §5.1.3).
    #[error("folder pattern {0:?} is empty or not printable ASCII")]
    Invalid(String),
    /// The hierarchy delimiter is not one printable ASCII character other than `*` and `%`.
    #[error("the hierarchy delimiter must be a printable ASCII character other than * and %")]
    Delimiter,
}

impl FolderSet {
    /// The hierarchy delimiter when upstream's is not known (Dovecot's default with
    /// `mailbox_list_layout = fs`, and what `Shared/Tickets` assumes).
    pub const DEFAULT_DELIMITER: u8 = b'/';

    /// A set from patterns such as `INBOX`, `Shared/Tickets`, `Shared/%`, `*`.
    pub fn new<I, S>(patterns: I, delimiter: u8) -> Result<FolderSet, FolderSetError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if !delimiter.is_ascii_graphic() || delimiter == b'*' || delimiter == b'%' {
            return Err(FolderSetError::Delimiter);
        }
        let mut out = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(FolderSetError::Invalid(p.to_string()));
            }
            out.push(normalize_inbox(p.as_bytes(), delimiter));
        }
        if out.is_empty() {
            return Err(FolderSetError::Empty);
        }
        Ok(FolderSet { patterns: out, delimiter })
    }

    /// A set from a comma-separated list (`"INBOX,Shared/Tickets"`); blanks around the
    /// commas are ignored.
    pub fn parse(list: &str, delimiter: u8) -> Result<FolderSet, FolderSetError> {
        FolderSet::new(list.split(',').map(str::trim).filter(|p| !p.is_empty()), delimiter)
    }

    /// The hierarchy delimiter the patterns are read with.
    pub fn delimiter(&self) -> u8 {
        self.delimiter
    }

    /// Whether the mailbox `name` (as sent on the wire, without quoting) is in the set.
    pub fn allows(&self, name: &[u8]) -> bool {
        if !plain_name(name, self.delimiter) {
            return false;
        }
        let name = normalize_inbox(name, self.delimiter);
        self.patterns.iter().any(|p| wildcard_match(p, &name, self.delimiter))
    }
}

/// `INBOX` (any case) as the whole name or its first level, written `INBOX`.
fn normalize_inbox(name: &[u8], delimiter: u8) -> Vec<u8> {
    let first = name.iter().position(|b| *b == delimiter).unwrap_or(name.len());
    let mut out = name.to_vec();
    if let Some(head) = out.get_mut(..first)
        && head.eq_ignore_ascii_case(b"INBOX")
    {
        head.copy_from_slice(b"INBOX");
    }
    out
}

/// A name that means one folder only: printable, no empty, `.` or `..` level.
fn plain_name(name: &[u8], delimiter: u8) -> bool {
    !name.is_empty()
        && name.iter().all(|b| *b >= 0x20 && *b != 0x7f)
        && name.split(|b| *b == delimiter).all(|level| !level.is_empty() && level != b"." && level != b"..")
}

/// IMAP LIST wildcard matching: `*` any bytes, `%` any bytes but `delimiter`.
fn wildcard_match(pattern: &[u8], name: &[u8], delimiter: u8) -> bool {
    // can[j]: the pattern so far matches name[..j].
    let mut can = vec![false; name.len() + 1];
    can[0] = true;
    for &pc in pattern {
        let mut next = vec![false; name.len() + 1];
        let mut carry = false;
        for j in 0..=name.len() {
            next[j] = match pc {
                b'*' => {
                    carry = carry || can[j];
                    carry
                }
                b'%' => {
                    carry = can[j] || (carry && j > 0 && name[j - 1] != delimiter);
                    carry
                }
                c => j > 0 && can[j - 1] && name[j - 1] == c,
            };
        }
        can = next;
    }
    can[name.len()]
}

// ---------------------------------------------------------------------------------------
// Client → upstream
// ---------------------------------------------------------------------------------------

/// Bytes for upstream, exactly as they are to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToUpstream(pub Vec<u8>);

/// The client → upstream half (module docs). [`Machine::next`] gives [`Next::Write`]
/// (an answer for the client: hand it to [`ResponseFilter::inject`]), [`Next::Event`]
/// (bytes for upstream), [`Next::NeedInput`], or [`Next::Close`] (after a `* BYE` for a
/// client that sent far more than a client waiting for `+` can).
pub struct CommandFilter {
    rules: Restriction,
    /// Client bytes not yet consumed.
    buf: Vec<u8>,
    out: VecDeque<Out>,
    state: State,
    /// How far `buf` was searched for a CRLF without finding one: a line that arrives a
    /// byte at a time is scanned once, not once per byte.
    scanned: usize,
    /// Tags of the commands forwarded and not yet completed by upstream. A command whose
    /// tag is among them is refused: upstream's tagged reply must tell unambiguously which
    /// command it ends (it decides whether a literal's data follows).
    in_flight: HashSet<Vec<u8>>,
}

impl std::fmt::Debug for CommandFilter {
    /// Sizes and the state's name only: the buffer holds mail the client sends.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandFilter")
            .field("rules", &self.rules)
            .field("buffered", &self.buf.len())
            .field("state", &self.state.name())
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

enum Out {
    Client(Vec<u8>),
    Upstream(Vec<u8>),
    Close,
}

/// Where the client's byte stream is.
enum State {
    /// Reading a line: the next command's first (`None`) or a later line of `cmd`.
    Line(Option<Cmd>),
    /// Literal data of `cmd`, `left` bytes more (forwarded, held or dropped per its fate).
    Literal {
        cmd: Cmd,
        left: u64,
    },
    /// A synchronizing literal of a forwarded command: upstream's `+` or its tagged reply
    /// decides whether the client's next bytes are the literal or a new command.
    AwaitContinue {
        cmd: Cmd,
        len: u64,
    },
    /// IDLE was forwarded; waiting for upstream's `+` (or its refusal).
    AwaitIdle {
        tag: Vec<u8>,
    },
    /// Upstream is idling (for the IDLE tagged `tag`): the next line ends it.
    Idling {
        tag: Vec<u8>,
    },
    /// Dropping a line over [`MAX_LINE`]; `tail` keeps its last bytes (a literal
    /// announcement at its end).
    LongLine {
        tail: Vec<u8>,
    },
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Line(_) => "line",
            State::Literal { .. } => "literal",
            State::AwaitContinue { .. } => "await-continue",
            State::AwaitIdle { .. } => "await-idle",
            State::Idling { .. } => "idling",
            State::LongLine { .. } => "long-line",
            State::Closed => "closed",
        }
    }
}

/// One command as far as it has been read.
struct Cmd {
    tag: Vec<u8>,
    /// The command word, upper case (`UID` for the UID forms).
    word: Vec<u8>,
    /// The word after `UID`, upper case; empty otherwise.
    sub: Vec<u8>,
    /// What imap-codec parses: the command's bytes so far, literal data that was forwarded
    /// replaced by one byte (its validity, not its content, matters from then on).
    shadow: Vec<u8>,
    /// Bytes read and not yet forwarded (while undecided).
    held: Vec<u8>,
    /// Synchronizing literals in `held` that the filter answered with `+` itself (mailbox
    /// names it had to read before deciding): (announcement start, data start, data end).
    /// They go upstream as quoted strings.
    acked: Vec<(usize, usize, usize)>,
    fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not forwarded yet: waiting for bytes the decision needs.
    Undecided,
    /// Forwarding (the rest is checked line by line).
    Passed,
    /// Refused or cut: the rest is read and dropped.
    Dropped,
}

impl Cmd {
    /// The command a first line starts: a valid tag, a command word. `None`: not a command.
    fn start(line: &[u8]) -> Option<Cmd> {
        let mut words = line.split(|b| *b == b' ');
        let tag = words.next()?;
        if !valid_tag(tag) {
            return None;
        }
        let word = words.next()?.to_ascii_uppercase();
        if word.is_empty() {
            return None;
        }
        let sub = if word == b"UID" { words.next().unwrap_or_default().to_ascii_uppercase() } else { Vec::new() };
        Some(Cmd {
            tag: tag.to_vec(),
            word,
            sub,
            shadow: Vec::new(),
            held: Vec::new(),
            acked: Vec::new(),
            fate: Fate::Undecided,
        })
    }

    /// A stand-in for bytes that are being dropped.
    fn dropped() -> Cmd {
        Cmd {
            tag: Vec::new(),
            word: Vec::new(),
            sub: Vec::new(),
            shadow: Vec::new(),
            held: Vec::new(),
            acked: Vec::new(),
            fate: Fate::Dropped,
        }
    }

    fn is(&self, word: &[u8]) -> bool {
        self.word == word
    }

    /// Whether the command has a mailbox argument the folder set must allow.
    fn names_mailbox(&self) -> bool {
        MAILBOX_WORDS.contains(&self.word.as_slice())
            || (self.is(b"UID") && matches!(self.sub.as_slice(), b"COPY" | b"MOVE"))
    }
}

/// RFC 9051 `tag`: 1*<any ASTRING-CHAR except "+">.
fn valid_tag(tag: &[u8]) -> bool {
    !tag.is_empty() && tag.len() <= 64 && tag.iter().all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(b))
}

/// The literal announced at the end of a line (without CRLF): `{N}`, `{N+}`, and the
/// `~{N}` literal8 forms (RFC 3516).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lit {
    len: u64,
    sync: bool,
    /// Bytes of the announcement at the end of the line (`{5+}`: 4; `~{5}`: 4).
    spec_len: usize,
    literal8: bool,
}

fn trailing_literal(line: &[u8]) -> Option<Lit> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let spec = inner.get(open + 1..)?;
    let (digits, sync) = match spec.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (spec, true),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    let literal8 = open > 0 && inner.get(open - 1) == Some(&b'~');
    let spec_len = line.len() - open + usize::from(literal8);
    Some(Lit { len, sync, spec_len, literal8 })
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    memchr::memmem::find(buf, b"\r\n")
}

/// How the filter answers a command it does not forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// `NO [NOPERM]`: the app password does not allow this.
    NoPerm(&'static str),
    /// `NO [NONEXISTENT]`: the folder is outside the set (worded as upstream words a
    /// missing one, so the answer does not say the folder exists).
    Nonexistent,
    /// `NO [CANNOT]`: not available through the filter.
    Cannot(&'static str),
    /// `BAD`: not a valid command here.
    Bad(&'static str),
}

const READ_ONLY: &str = "Not allowed: this app password is read-only";

impl Reply {
    fn line(self, tag: &[u8]) -> Vec<u8> {
        let tag = if tag.is_empty() { b"*".as_slice() } else { tag };
        let text = match self {
            Reply::NoPerm(t) => format!("NO [NOPERM] {t}"),
            Reply::Nonexistent => "NO [NONEXISTENT] Mailbox doesn't exist".to_string(),
            Reply::Cannot(t) => format!("NO [CANNOT] {t}"),
            Reply::Bad(t) => format!("BAD {t}"),
        };
        let mut out = tag.to_vec();
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// What becomes of a whole command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Forward it; `examine`: with SELECT written EXAMINE.
    Pass {
        examine: bool,
    },
    Refuse(Reply),
}

/// Commands that change the mailbox store, refused on a read-only session (with `UID`
/// forms in [`READ_ONLY_UID`]). REPLACE (RFC 8508) is an APPEND and an EXPUNGE; imap-codec
/// does not parse SETACL, DELETEACL, SETMETADATA or REPLACE, so without this list they
/// would be `BAD` rather than `NO [NOPERM]`.
const READ_ONLY_WORDS: &[&[u8]] = &[
    b"STORE",
    b"COPY",
    b"MOVE",
    b"APPEND",
    b"EXPUNGE",
    b"CREATE",
    b"DELETE",
    b"RENAME",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"SETACL",
    b"DELETEACL",
    b"SETMETADATA",
    b"SETQUOTA",
    b"REPLACE",
];
const READ_ONLY_UID: &[&[u8]] = &[b"STORE", b"COPY", b"MOVE", b"EXPUNGE", b"REPLACE"];

/// Commands that name a mailbox the folder set must allow; with a folder set, a literal in
/// one of them is the mailbox name (none of them takes another literal, but APPEND: its
/// message), so it is held until the name is known.
const MAILBOX_WORDS: &[&[u8]] = &[
    b"SELECT",
    b"EXAMINE",
    b"STATUS",
    b"APPEND",
    b"COPY",
    b"MOVE",
    b"CREATE",
    b"DELETE",
    b"RENAME",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"GETQUOTAROOT",
    b"GETACL",
    b"MYRIGHTS",
    b"LISTRIGHTS",
    b"SETACL",
    b"DELETEACL",
    b"GETMETADATA",
    b"SETMETADATA",
];

impl CommandFilter {
    /// A filter for a session limited by `rules` (meant for [`Restriction::is_restricted`]
    /// ones; with neither limit it still parses every command).
    pub fn new(rules: Restriction) -> CommandFilter {
        CommandFilter {
            rules,
            buf: Vec::new(),
            out: VecDeque::new(),
            state: State::Line(None),
            scanned: 0,
            in_flight: HashSet::new(),
        }
    }

    /// Upstream sent a command continuation request (`+ ...`): the synchronizing literal
    /// or the IDLE the filter forwarded last was accepted.
    pub fn upstream_continuation(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitContinue { cmd, len } => State::Literal { cmd, left: len },
            State::AwaitIdle { tag } => State::Idling { tag },
            other => other,
        };
    }

    /// Upstream completed the command tagged `tag`. If that is the command waiting for a
    /// `+`, upstream refused its literal (or IDLE): the client will not send it, so what
    /// comes next is a new command.
    pub fn upstream_tagged(&mut self, tag: &[u8]) {
        self.in_flight.remove(tag);
        self.state = match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitContinue { cmd, .. } if cmd.tag == tag => State::Line(None),
            // Upstream ended IDLE itself (or refused it): no DONE is expected any more.
            State::AwaitIdle { tag: t } | State::Idling { tag: t } if t == tag => State::Line(None),
            other => other,
        };
    }

    fn send_client(&mut self, bytes: Vec<u8>) {
        if let Some(Out::Client(last)) = self.out.back_mut() {
            last.extend_from_slice(&bytes);
        } else {
            self.out.push_back(Out::Client(bytes));
        }
    }

    fn send_upstream(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(Out::Upstream(last)) = self.out.back_mut() {
            last.extend_from_slice(bytes);
        } else {
            self.out.push_back(Out::Upstream(bytes.to_vec()));
        }
    }

    /// Takes `n` bytes from the front of `buf`.
    fn take(&mut self, n: usize) -> Vec<u8> {
        self.scanned = 0;
        self.buf.drain(..n.min(self.buf.len())).collect()
    }

    /// The position of the first CRLF in `buf`, searching only what was not searched yet.
    fn find_line_end(&mut self) -> Option<usize> {
        let from = self.scanned.saturating_sub(1);
        let found = self.buf.get(from..).and_then(find_crlf).map(|p| p + from);
        if found.is_none() {
            self.scanned = self.buf.len();
        }
        found
    }

    fn reply(&mut self, tag: &[u8], reply: Reply) {
        self.send_client(reply.line(tag));
    }

    fn close(&mut self, bye: &str) {
        self.send_client(bye.as_bytes().to_vec());
        self.out.push_back(Out::Close);
        self.buf.clear();
        self.scanned = 0;
        self.state = State::Closed;
    }

    /// Consumes what it can of `buf`; `false` when nothing more can happen without input
    /// (or upstream).
    fn step(&mut self) -> bool {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Closed => false,
            s @ (State::AwaitContinue { .. } | State::AwaitIdle { .. }) => {
                self.state = s;
                if self.buf.len() > MAX_PENDING {
                    self.close("* BYE Too much data before the server's continuation\r\n");
                    return true;
                }
                false
            }
            State::Literal { mut cmd, left } => {
                if left == 0 {
                    self.state = State::Line(Some(cmd));
                    return true;
                }
                if self.buf.is_empty() {
                    self.state = State::Literal { cmd, left };
                    return false;
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
                let data = self.take(n);
                match cmd.fate {
                    Fate::Passed => self.send_upstream(&data),
                    Fate::Undecided => {
                        cmd.held.extend_from_slice(&data);
                        cmd.shadow.extend_from_slice(&data);
                    }
                    Fate::Dropped => {}
                }
                let left = left - n as u64;
                self.state = if left == 0 { State::Line(Some(cmd)) } else { State::Literal { cmd, left } };
                true
            }
            State::Line(cmd) => match self.find_line_end() {
                Some(pos) if pos <= MAX_LINE => {
                    let line = self.take(pos + 2);
                    self.on_line(cmd, line);
                    true
                }
                Some(_) => {
                    self.start_long_line(cmd);
                    true
                }
                None if self.buf.len() > MAX_LINE + 1 => {
                    self.start_long_line(cmd);
                    true
                }
                None => {
                    self.state = State::Line(cmd);
                    false
                }
            },
            State::LongLine { mut tail } => {
                let (upto, end) = match self.find_line_end() {
                    Some(pos) => (pos, Some(pos + 2)),
                    // Keep a last CR: it may start the CRLF.
                    None => (self.buf.len() - usize::from(self.buf.last() == Some(&b'\r')), None),
                };
                let chunk = self.buf.get(..upto).unwrap_or_default();
                let from = chunk.len().saturating_sub(32);
                tail.extend_from_slice(chunk.get(from..).unwrap_or_default());
                let excess = tail.len().saturating_sub(32);
                tail.drain(..excess);
                match end {
                    Some(end) => {
                        self.take(end);
                        self.state = match trailing_literal(&tail) {
                            Some(l) if !l.sync => State::Literal { cmd: Cmd::dropped(), left: l.len },
                            _ => State::Line(None),
                        };
                        true
                    }
                    None => {
                        self.take(upto);
                        self.state = State::LongLine { tail };
                        upto > 0
                    }
                }
            }
            State::Idling { tag } => match self.find_line_end() {
                Some(pos) => {
                    let line = self.take(pos + 2);
                    if line.get(..pos).is_some_and(|l| l.eq_ignore_ascii_case(b"DONE")) {
                        self.send_upstream(&line);
                        self.state = State::Line(None);
                    } else {
                        // Upstream ends IDLE on any line (Dovecot: `BAD Expected DONE`), but
                        // would read a literal announced on it differently from us: it gets
                        // a plain DONE, and the line is read as the command it looks like.
                        self.send_upstream(b"DONE\r\n");
                        self.on_line(None, line);
                    }
                    true
                }
                None if self.buf.len() > MAX_LINE + 1 => {
                    self.send_upstream(b"DONE\r\n");
                    self.start_long_line(None);
                    true
                }
                None => {
                    self.state = State::Idling { tag };
                    false
                }
            },
        }
    }

    /// The current line is over [`MAX_LINE`]: the command ends here (answered by us, or by
    /// upstream if it was already forwarded: it gets a CRLF), the line is dropped.
    fn start_long_line(&mut self, cmd: Option<Cmd>) {
        match cmd {
            None => self.reply(b"*", Reply::Bad("[TOOBIG] Command line too long")),
            Some(cmd) => match cmd.fate {
                Fate::Undecided => self.reply(&cmd.tag, Reply::Bad("[TOOBIG] Command line too long")),
                Fate::Passed => self.send_upstream(b"\r\n"),
                Fate::Dropped => {}
            },
        }
        self.state = State::LongLine { tail: Vec::new() };
    }

    /// A whole line (with its CRLF) of the current command or a new one.
    fn on_line(&mut self, cmd: Option<Cmd>, line: Vec<u8>) {
        let body = line.get(..line.len() - 2).unwrap_or_default();
        let lit = trailing_literal(body);
        let mut cmd = match cmd {
            Some(cmd) => cmd,
            // An empty line is no command (Dovecot ignores it too).
            None if body.is_empty() => {
                self.state = State::Line(None);
                return;
            }
            None => match Cmd::start(body) {
                Some(cmd) => cmd,
                None => {
                    self.reply(guess_tag(body), Reply::Bad("Invalid command"));
                    return self.after_line(Cmd::dropped(), lit);
                }
            },
        };
        if cmd.fate != Fate::Dropped && cmd.shadow.len() + line.len() > MAX_COMMAND {
            match cmd.fate {
                Fate::Passed => self.send_upstream(b"\r\n"),
                _ => self.reply(&cmd.tag, Reply::Bad("[TOOBIG] Command too long")),
            }
            cmd.fate = Fate::Dropped;
        }
        match cmd.fate {
            Fate::Dropped => self.after_line(cmd, lit),
            Fate::Passed => {
                cmd.shadow.extend_from_slice(&line);
                if valid_so_far(&cmd.shadow, lit.is_some()) {
                    self.send_upstream(&line);
                } else {
                    // The part already forwarded stands; upstream gets an end for it, the
                    // invalid line is never seen (its answer is upstream's).
                    self.send_upstream(b"\r\n");
                    cmd.fate = Fate::Dropped;
                }
                self.after_line(cmd, lit)
            }
            Fate::Undecided => {
                cmd.shadow.extend_from_slice(&line);
                cmd.held.extend_from_slice(&line);
                match lit {
                    None => self.decide_whole(cmd),
                    Some(lit) => self.decide_at_literal(cmd, lit),
                }
            }
        }
    }

    /// After a line of `cmd` ends: its literal (if any) or the next command.
    fn after_line(&mut self, mut cmd: Cmd, lit: Option<Lit>) {
        self.state = match (lit, cmd.fate) {
            (None, _) => State::Line(None),
            // The client got a tagged answer instead of `+`: it does not send the data.
            (Some(l), Fate::Dropped) if l.sync => State::Line(None),
            (Some(l), Fate::Dropped | Fate::Undecided) => State::Literal { cmd, left: l.len },
            (Some(l), Fate::Passed) => {
                placeholder(&mut cmd.shadow, l);
                if l.sync { State::AwaitContinue { cmd, len: l.len } } else { State::Literal { cmd, left: l.len } }
            }
        };
    }

    /// A command without literals pending is complete: parse it, decide, act.
    fn decide_whole(&mut self, cmd: Cmd) {
        let verdict = match refused_by_name(&cmd, &self.rules) {
            Some(reply) => Verdict::Refuse(reply),
            None => match CommandCodec::default().decode(&cmd.shadow) {
                Ok(([], command)) => decide(&command.body, &self.rules),
                _ => Verdict::Refuse(Reply::Bad("Invalid command")),
            },
        };
        let idle = cmd.is(b"IDLE");
        match verdict {
            Verdict::Refuse(reply) => self.reply(&cmd.tag, reply),
            Verdict::Pass { examine } => {
                if self.forward_first(&cmd, examine) && idle {
                    self.state = State::AwaitIdle { tag: cmd.tag };
                    return;
                }
            }
        }
        self.state = State::Line(None);
    }

    /// A line of an undecided command ends in a literal announcement.
    fn decide_at_literal(&mut self, mut cmd: Cmd, lit: Lit) {
        let verdict = if let Some(reply) = refused_by_name(&cmd, &self.rules) {
            Some(Verdict::Refuse(reply))
        } else if !matches!(CommandCodec::default().decode(&cmd.shadow), Err(CommandDecodeError::LiteralFound { .. })) {
            Some(Verdict::Refuse(Reply::Bad("Invalid command")))
        } else if self.rules.folders.is_none() || !cmd.names_mailbox() {
            Some(Verdict::Pass { examine: self.rules.read_only && cmd.is(b"SELECT") })
        } else if cmd.is(b"APPEND") {
            // The literal is the message if the mailbox came before it: then APPEND parses
            // with one byte in its place.
            let mut probe = cmd.shadow.clone();
            placeholder(&mut probe, Lit { sync: false, ..lit });
            probe.extend_from_slice(b"\r\n");
            match CommandCodec::default().decode(&probe) {
                Ok((_, command)) => Some(decide(&command.body, &self.rules)),
                Err(_) => None,
            }
        } else {
            None
        };
        match verdict {
            Some(Verdict::Refuse(reply)) => {
                self.reply(&cmd.tag, reply);
                cmd.fate = Fate::Dropped;
            }
            Some(Verdict::Pass { examine }) => {
                if self.forward_first(&cmd, examine) {
                    cmd.fate = Fate::Passed;
                    cmd.held = Vec::new();
                } else {
                    cmd.fate = Fate::Dropped;
                }
            }
            // The folder check needs this literal (a mailbox name): it is held until the
            // command can be decided.
            None if cmd.held.len() as u64 + lit.len > MAX_HELD as u64 => {
                self.reply(&cmd.tag, Reply::Bad("[TOOBIG] Mailbox name too long"));
                cmd.fate = Fate::Dropped;
            }
            None if lit.literal8 => {
                self.reply(&cmd.tag, Reply::Bad("Invalid command"));
                cmd.fate = Fate::Dropped;
            }
            // A synchronizing one is asked for by the filter itself (upstream is not to see
            // the command before it is decided); it goes upstream as a quoted string.
            None if lit.sync => {
                self.send_client(b"+ Ready for literal data\r\n".to_vec());
                let data_start = cmd.held.len();
                let spec_start = data_start.saturating_sub(2 + lit.spec_len);
                let data_end = data_start + usize::try_from(lit.len).unwrap_or(usize::MAX);
                cmd.acked.push((spec_start, data_start, data_end));
                // The client sends the data: read it as held data.
                self.state = State::Literal { cmd, left: lit.len };
                return;
            }
            None => {}
        }
        self.after_line(cmd, Some(lit));
    }

    /// Forwards what was held of a passing command (SELECT written EXAMINE if asked).
    /// `false` (and the client answered) if its tag is still in use upstream or too many
    /// commands are.
    fn forward_first(&mut self, cmd: &Cmd, examine: bool) -> bool {
        if self.in_flight.contains(&cmd.tag) {
            self.reply(&cmd.tag, Reply::Bad("Tag is in use by a command in progress"));
            return false;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.reply(&cmd.tag, Reply::Bad("Too many commands in progress"));
            return false;
        }
        let Some(held) = requote(&cmd.held, &cmd.acked) else {
            self.reply(&cmd.tag, Reply::Cannot("Mailbox name not valid as a quoted string"));
            return false;
        };
        self.in_flight.insert(cmd.tag.clone());
        if examine && cmd.is(b"SELECT") {
            // `tag SP SELECT ...`: only the word changes.
            let at = cmd.tag.len() + 1;
            let mut bytes = Vec::with_capacity(held.len() + 1);
            bytes.extend_from_slice(held.get(..at).unwrap_or_default());
            bytes.extend_from_slice(b"EXAMINE");
            bytes.extend_from_slice(held.get(at + cmd.word.len()..).unwrap_or_default());
            self.send_upstream(&bytes);
        } else {
            self.send_upstream(&held);
        }
        true
    }
}

/// `held` with each literal the filter acknowledged itself (`acked`) written as a quoted
/// string; `None` if one cannot be (CR, LF, NUL or 8-bit data).
fn requote(held: &[u8], acked: &[(usize, usize, usize)]) -> Option<Vec<u8>> {
    if acked.is_empty() {
        return Some(held.to_vec());
    }
    let mut out = Vec::with_capacity(held.len() + 8);
    let mut pos = 0;
    for &(spec_start, data_start, data_end) in acked {
        out.extend_from_slice(held.get(pos..spec_start)?);
        let data = held.get(data_start..data_end)?;
        if data.iter().any(|b| matches!(b, 0 | b'\r' | b'\n' | 0x80..)) {
            return None;
        }
        out.push(b'"');
        for b in data {
            if matches!(b, b'"' | b'\\') {
                out.push(b'\\');
            }
            out.push(*b);
        }
        out.push(b'"');
        pos = data_end;
    }
    out.extend_from_slice(held.get(pos..)?);
    Some(out)
}

/// Replaces the literal announced at the end of `shadow` (which ends with its CRLF) by a
/// one-byte literal with its data.
fn placeholder(shadow: &mut Vec<u8>, lit: Lit) {
    let keep = shadow.len().saturating_sub(2 + lit.spec_len);
    shadow.truncate(keep);
    if lit.literal8 {
        shadow.push(b'~');
    }
    shadow.extend_from_slice(if lit.sync { b"{1}\r\nX" } else { b"{1+}\r\nX" });
}

/// Whether `shadow` parses: up to a literal announcement at its end (`literal`), or as one
/// whole command.
fn valid_so_far(shadow: &[u8], literal: bool) -> bool {
    match CommandCodec::default().decode(shadow) {
        Err(CommandDecodeError::LiteralFound { .. }) => literal,
        Ok((rest, _)) => !literal && rest.is_empty(),
        Err(_) => false,
    }
}

/// Refusals decided by the command's name alone, before its arguments are read (so before
/// any literal: the client is answered instead of getting a `+`).
fn refused_by_name(cmd: &Cmd, rules: &Restriction) -> Option<Reply> {
    let word = cmd.word.as_slice();
    match word {
        // A SASL exchange would read as commands; there is nothing to log in to.
        b"AUTHENTICATE" | b"LOGIN" | b"STARTTLS" => return Some(Reply::Bad("Already logged in")),
        // Compressed bytes could not be filtered (RFC 4978).
        b"COMPRESS" => return Some(Reply::Cannot("COMPRESS is not available on this connection")),
        _ => {}
    }
    if rules.read_only
        && (READ_ONLY_WORDS.contains(&word) || (word == b"UID" && READ_ONLY_UID.contains(&cmd.sub.as_slice())))
    {
        return Some(Reply::NoPerm(READ_ONLY));
    }
    // Both report on mailboxes other than the selected one (RFC 5465, RFC 7377).
    if rules.folders.is_some() && matches!(word, b"NOTIFY" | b"ESEARCH") {
        return Some(Reply::NoPerm("Not available for this app password"));
    }
    None
}

/// The verdict on a parsed command.
fn decide(body: &CommandBody<'_>, rules: &Restriction) -> Verdict {
    let ro = rules.read_only;
    let pass = Verdict::Pass { examine: false };
    let check = |mailboxes: &[&Mailbox<'_>]| {
        if mailboxes.iter().all(|m| rules.allows(m)) { pass } else { Verdict::Refuse(Reply::Nonexistent) }
    };
    match body {
        CommandBody::Authenticate { .. } | CommandBody::Login { .. } | CommandBody::StartTLS => {
            Verdict::Refuse(Reply::Bad("Already logged in"))
        }
        CommandBody::Compress { .. } => Verdict::Refuse(Reply::Cannot("COMPRESS is not available on this connection")),
        CommandBody::Store { .. }
        | CommandBody::Expunge
        | CommandBody::ExpungeUid { .. }
        | CommandBody::SetQuota { .. }
        | CommandBody::Append { .. }
        | CommandBody::Copy { .. }
        | CommandBody::Move { .. }
        | CommandBody::Create { .. }
        | CommandBody::Delete { .. }
        | CommandBody::Rename { .. }
        | CommandBody::Subscribe { .. }
        | CommandBody::Unsubscribe { .. }
            if ro =>
        {
            Verdict::Refuse(Reply::NoPerm(READ_ONLY))
        }
        CommandBody::Select { mailbox, .. } => match check(&[mailbox]) {
            Verdict::Pass { .. } => Verdict::Pass { examine: ro },
            refused => refused,
        },
        CommandBody::Examine { mailbox, .. }
        | CommandBody::Status { mailbox, .. }
        | CommandBody::GetQuotaRoot { mailbox }
        | CommandBody::Append { mailbox, .. }
        | CommandBody::Copy { mailbox, .. }
        | CommandBody::Move { mailbox, .. }
        | CommandBody::Create { mailbox }
        | CommandBody::Delete { mailbox }
        | CommandBody::Subscribe { mailbox }
        | CommandBody::Unsubscribe { mailbox } => check(&[mailbox]),
        CommandBody::Rename { from, to } => check(&[from, to]),
        _ => pass,
    }
}

/// The tag of a line that is no command, if it has a valid one (`*` otherwise).
fn guess_tag(line: &[u8]) -> &[u8] {
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    match line.get(..end) {
        Some(tag) if valid_tag(tag) => tag,
        _ => b"*",
    }
}

impl Machine for CommandFilter {
    type Event = ToUpstream;

    /// Bytes read from the client.
    fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::Closed) {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn next(&mut self) -> Next<ToUpstream> {
        loop {
            match self.out.pop_front() {
                Some(Out::Client(b)) => return Next::Write(b),
                Some(Out::Upstream(b)) => return Next::Event(ToUpstream(b)),
                Some(Out::Close) => return Next::Close,
                None => {}
            }
            if matches!(self.state, State::Closed) {
                return Next::Close;
            }
            if !self.step() && self.out.is_empty() {
                return Next::NeedInput;
            }
        }
    }

    /// Never asked for: TLS is set up before login.
    fn tls_started(&mut self) {}
}

// ---------------------------------------------------------------------------------------
// Upstream → client
// ---------------------------------------------------------------------------------------

/// What the response filter saw that the command filter must know (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A command continuation request (`+ ...`): call
    /// [`CommandFilter::upstream_continuation`].
    Continuation,
    /// A tagged completion: call [`CommandFilter::upstream_tagged`] with the tag.
    Tagged(Vec<u8>),
}

/// The upstream → client half (module docs). [`Machine::next`] gives [`Next::Write`]
/// (bytes for the client), [`Next::Event`] ([`Seen`], for the command filter) or
/// [`Next::NeedInput`] (read upstream).
pub struct ResponseFilter {
    rules: Restriction,
    buf: Vec<u8>,
    state: RState,
    out: VecDeque<Next<Seen>>,
    /// The command filter's answers, written at the next response boundary.
    inject: Vec<u8>,
}

impl std::fmt::Debug for ResponseFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFilter")
            .field("rules", &self.rules)
            .field("buffered", &self.buf.len())
            .field("injected", &self.inject.len())
            .finish()
    }
}

/// Where upstream's byte stream is.
enum RState {
    /// Between responses.
    Start,
    /// Passing the rest of a line; `text`: a status or continuation line (no literal in
    /// it); `tail`: the line's last bytes.
    Pass { text: bool, tail: Vec<u8> },
    /// Passing literal data, then the rest of its line.
    PassLiteral { left: u64 },
    /// Collecting a whole response to decide on it; `literal_left`: data bytes to come.
    Collect { kind: Kind, bytes: Vec<u8>, literal_left: u64 },
    /// Dropping the rest of a response.
    Drop { tail: Vec<u8>, literal_left: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `* LIST`, `* LSUB`, `* STATUS`: dropped unless the folder is in the set.
    Folder,
    /// A `CAPABILITY` response or a status line (which may carry `[CAPABILITY ...]`).
    Caps,
}

/// How far into a response's first line the filter looks to classify it.
const HEAD: usize = 80;

impl ResponseFilter {
    /// A filter for a session limited by `rules`.
    pub fn new(rules: Restriction) -> ResponseFilter {
        ResponseFilter { rules, buf: Vec::new(), state: RState::Start, out: VecDeque::new(), inject: Vec::new() }
    }

    /// An answer of the command filter for the client ([`Next::Write`] of
    /// [`CommandFilter`]): written between two of upstream's responses.
    pub fn inject(&mut self, bytes: &[u8]) {
        self.inject.extend_from_slice(bytes);
    }

    /// How many of upstream's next bytes may go to the client as they are, without being
    /// fed: message data inside a literal the filter passes, with nothing buffered or
    /// waiting before it. The relay copies that many straight to the client and reports
    /// them with [`passed`](ResponseFilter::passed); a bulk FETCH then costs one copy per
    /// byte instead of four (issue 20's bench).
    pub fn passthrough(&self) -> u64 {
        match self.state {
            RState::PassLiteral { left } if self.buf.is_empty() && self.out.is_empty() => left,
            _ => 0,
        }
    }

    /// `n` bytes (at most [`passthrough`](ResponseFilter::passthrough)) went to the client
    /// directly.
    pub fn passed(&mut self, n: u64) {
        if let RState::PassLiteral { left } = &mut self.state {
            *left = left.saturating_sub(n);
        }
    }

    fn write(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if let Some(Next::Write(last)) = self.out.back_mut() {
            last.extend_from_slice(&bytes);
        } else {
            self.out.push_back(Next::Write(bytes));
        }
    }

    /// Classifies the response starting `buf`: `None` until enough of it is there.
    fn classify(&mut self) -> Option<RState> {
        let head = self.buf.get(..self.buf.len().min(HEAD)).unwrap_or_default();
        if head.first() == Some(&b'+') {
            self.out.push_back(Next::Event(Seen::Continuation));
            return Some(RState::Pass { text: true, tail: Vec::new() });
        }
        let line_end = head.iter().position(|b| *b == b'\r' || *b == b'\n');
        let words: Vec<&[u8]> = head.get(..line_end.unwrap_or(head.len()))?.splitn(3, |b| *b == b' ').collect();
        // The second word is complete once a space or the line end follows it.
        let complete = words.len() == 3 || line_end.is_some();
        if !complete && head.len() < HEAD {
            return None;
        }
        let data = RState::Pass { text: false, tail: Vec::new() };
        let (first, second) = match (words.first(), words.get(1)) {
            (Some(f), Some(s)) if complete => (*f, s.to_ascii_uppercase()),
            _ => return Some(data),
        };
        let collect = |kind| RState::Collect { kind, bytes: Vec::new(), literal_left: 0 };
        if first == b"*" {
            return Some(match second.as_slice() {
                b"LIST" | b"LSUB" | b"STATUS" if self.rules.folders.is_some() => collect(Kind::Folder),
                b"CAPABILITY" | b"OK" | b"NO" | b"BAD" | b"BYE" | b"PREAUTH" => collect(Kind::Caps),
                _ => data,
            });
        }
        if matches!(second.as_slice(), b"OK" | b"NO" | b"BAD") {
            self.out.push_back(Next::Event(Seen::Tagged(first.to_vec())));
            return Some(collect(Kind::Caps));
        }
        Some(data)
    }

    fn step(&mut self) -> bool {
        match std::mem::replace(&mut self.state, RState::Start) {
            RState::Start => {
                if !self.inject.is_empty() {
                    let bytes = std::mem::take(&mut self.inject);
                    self.write(bytes);
                    return true;
                }
                if self.buf.is_empty() {
                    return false;
                }
                match self.classify() {
                    Some(next) => {
                        self.state = next;
                        true
                    }
                    None => false,
                }
            }
            RState::Pass { text, mut tail } => {
                let (upto, end) = line_part(&self.buf);
                if upto == 0 && end.is_none() {
                    self.state = RState::Pass { text, tail };
                    return false;
                }
                keep_tail(&mut tail, self.buf.get(..upto).unwrap_or_default());
                let take = end.unwrap_or(upto);
                let bytes: Vec<u8> = self.buf.drain(..take).collect();
                self.write(bytes);
                self.state = match end {
                    None => RState::Pass { text, tail },
                    Some(_) => match trailing_literal(&tail) {
                        Some(l) if !text => RState::PassLiteral { left: l.len },
                        _ => RState::Start,
                    },
                };
                true
            }
            RState::PassLiteral { left } => {
                if left == 0 {
                    self.state = RState::Pass { text: false, tail: Vec::new() };
                    return true;
                }
                if self.buf.is_empty() {
                    self.state = RState::PassLiteral { left };
                    return false;
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
                let bytes: Vec<u8> = self.buf.drain(..n).collect();
                self.write(bytes);
                let left = left - n as u64;
                self.state = if left == 0 {
                    RState::Pass { text: false, tail: Vec::new() }
                } else {
                    RState::PassLiteral { left }
                };
                true
            }
            RState::Collect { kind, mut bytes, literal_left } => {
                if literal_left > 0 {
                    if self.buf.is_empty() {
                        self.state = RState::Collect { kind, bytes, literal_left };
                        return false;
                    }
                    let n = usize::try_from(literal_left).unwrap_or(usize::MAX).min(self.buf.len());
                    bytes.extend(self.buf.drain(..n));
                    self.state = RState::Collect { kind, bytes, literal_left: literal_left - n as u64 };
                    return true;
                }
                let Some(pos) = find_crlf(&self.buf) else {
                    if bytes.len() + self.buf.len() > MAX_RESPONSE {
                        self.collect_overflow(kind, bytes);
                        return true;
                    }
                    self.state = RState::Collect { kind, bytes, literal_left };
                    return false;
                };
                let line_start = bytes.len();
                bytes.extend(self.buf.drain(..pos + 2));
                let lit = match kind {
                    Kind::Folder => bytes.get(line_start..bytes.len() - 2).and_then(trailing_literal),
                    Kind::Caps => None,
                };
                if bytes.len() > MAX_RESPONSE || lit.is_some_and(|l| l.len > MAX_RESPONSE as u64) {
                    // The line is whole: what follows is its literal, or the next response.
                    match (kind, lit) {
                        (Kind::Folder, Some(l)) => self.state = RState::Drop { tail: Vec::new(), literal_left: l.len },
                        (Kind::Folder, None) => {}
                        (Kind::Caps, _) => self.write(bytes),
                    }
                    return true;
                }
                match lit {
                    Some(l) => self.state = RState::Collect { kind, bytes, literal_left: l.len },
                    None => {
                        let out = match kind {
                            Kind::Folder => self.folder_response(bytes),
                            Kind::Caps => rewrite_caps_line(&bytes, &self.rules),
                        };
                        self.write(out);
                    }
                }
                true
            }
            RState::Drop { mut tail, literal_left } => {
                if literal_left > 0 {
                    if self.buf.is_empty() {
                        self.state = RState::Drop { tail, literal_left };
                        return false;
                    }
                    let n = usize::try_from(literal_left).unwrap_or(usize::MAX).min(self.buf.len());
                    self.buf.drain(..n);
                    self.state = RState::Drop { tail: Vec::new(), literal_left: literal_left - n as u64 };
                    return true;
                }
                let (upto, end) = line_part(&self.buf);
                if upto == 0 && end.is_none() {
                    self.state = RState::Drop { tail, literal_left };
                    return false;
                }
                keep_tail(&mut tail, self.buf.get(..upto).unwrap_or_default());
                self.buf.drain(..end.unwrap_or(upto));
                self.state = match end {
                    None => RState::Drop { tail, literal_left: 0 },
                    Some(_) => match trailing_literal(&tail) {
                        Some(l) => RState::Drop { tail: Vec::new(), literal_left: l.len },
                        None => RState::Start,
                    },
                };
                true
            }
        }
    }

    /// A collected response outgrew [`MAX_RESPONSE`] in the middle of a line (which is
    /// still in `buf`): folder data is dropped (fail-closed), a status or capability line
    /// passes as it is (capabilities are advice; the command filter refuses what they would
    /// offer anyway).
    fn collect_overflow(&mut self, kind: Kind, bytes: Vec<u8>) {
        match kind {
            Kind::Folder => self.state = RState::Drop { tail: Vec::new(), literal_left: 0 },
            Kind::Caps => {
                self.write(bytes);
                self.state = RState::Pass { text: true, tail: Vec::new() };
            }
        }
    }

    /// A whole `* LIST`/`* LSUB`/`* STATUS` response: itself if it names a folder of the
    /// set (or none: `LIST "" ""` tells the delimiter), nothing otherwise, and nothing if
    /// it does not parse.
    fn folder_response(&self, bytes: Vec<u8>) -> Vec<u8> {
        let allowed = match ResponseCodec::default().decode(&bytes) {
            Ok(([], Response::Data(data))) => match data {
                Data::List { mailbox, .. } | Data::Lsub { mailbox, .. } => {
                    mailbox_bytes(&mailbox).is_empty() || self.rules.allows(&mailbox)
                }
                Data::Status { mailbox, .. } => self.rules.allows(&mailbox),
                _ => false,
            },
            Ok(_) | Err(ResponseDecodeError::Incomplete | ResponseDecodeError::LiteralFound { .. }) => false,
            Err(ResponseDecodeError::Failed) => false,
        };
        if allowed { bytes } else { Vec::new() }
    }
}

/// The bytes of `buf` that belong to the current line: `(upto, end)` where `upto` is the
/// line's bytes available without its CRLF and `end` is past the CRLF if it is there. A
/// last CR stays in the buffer (it may start the CRLF).
fn line_part(buf: &[u8]) -> (usize, Option<usize>) {
    match find_crlf(buf) {
        Some(pos) => (pos, Some(pos + 2)),
        None => (buf.len() - usize::from(buf.last() == Some(&b'\r')), None),
    }
}

/// Keeps the last 32 bytes of a line in `tail` (enough for any literal announcement).
fn keep_tail(tail: &mut Vec<u8>, more: &[u8]) {
    let from = more.len().saturating_sub(32);
    tail.extend_from_slice(more.get(from..).unwrap_or_default());
    let excess = tail.len().saturating_sub(32);
    tail.drain(..excess);
}

impl Machine for ResponseFilter {
    type Event = Seen;

    /// Bytes read from upstream.
    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn next(&mut self) -> Next<Seen> {
        loop {
            if let Some(n) = self.out.pop_front() {
                return n;
            }
            if !self.step() && self.out.is_empty() {
                return Next::NeedInput;
            }
        }
    }

    /// Never asked for.
    fn tls_started(&mut self) {}
}

// ---------------------------------------------------------------------------------------
// Capabilities
// ---------------------------------------------------------------------------------------

/// Whether a restricted session may see capability `cap`. An allow-list: a capability
/// passes only if the filter follows what it lets a client send, so an extension upstream
/// adds later is hidden until the filter knows it. Hidden, and why:
///
/// * `COMPRESS=*`: the stream would be deflated past the filter (and COMPRESS is refused).
/// * `NOTIFY`, `MULTISEARCH`: report on other mailboxes (refused with a folder set).
/// * `CONDSTORE`, `QRESYNC`, `LIST-EXTENDED`, `LIST-STATUS`, `NAMESPACE`, `ESEARCH`,
///   `SEARCHRES`, `WITHIN`, `CONTEXT=*`, `STATUS=SIZE`, `BINARY`, `SORT=DISPLAY`,
///   `UTF8=*`, `IMAP4rev2`, `ACL`, `RIGHTS=*`, `METADATA*`, `CREATE-SPECIAL-USE`,
///   `SNIPPET=*`, `PREVIEW*`, `SAVEDATE`, `OBJECTID`, `X-*`: syntax our imap-codec build
///   does not parse (its `ext_condstore_qresync`, `ext_list_extended`, `ext_namespace`,
///   `ext_metadata`, `ext_utf8`, ... features are off), so a client using them would only
///   get `BAD` (and `UTF8=ACCEPT` would also give mailbox names a second spelling).
/// * `URLAUTH`: hands out URLs that read mail outside this session.
/// * `ENABLE`: every extension it could turn on is hidden.
/// * `AUTH=*`, `SASL-IR`, `STARTTLS`, `LOGINDISABLED`, `*-REFERRALS`: not after login.
/// * Read-only, also the ones that only add writing: `UIDPLUS` (UID EXPUNGE), `MOVE`,
///   `MULTIAPPEND`, `CATENATE`, `REPLACE`, `QUOTASET`, `APPENDLIMIT=*`.
pub fn keep_capability(cap: &[u8], rules: &Restriction) -> bool {
    let cap = cap.to_ascii_uppercase();
    let always: &[&[u8]] = &[
        b"IMAP4REV1",
        b"LITERAL+",
        b"LITERAL-",
        b"IDLE",
        b"UNSELECT",
        b"ID",
        b"CHILDREN",
        b"SORT",
        b"SPECIAL-USE",
        b"QUOTA",
    ];
    let writing: &[&[u8]] = &[b"UIDPLUS", b"MOVE"];
    always.contains(&cap.as_slice())
        || cap.starts_with(b"THREAD=")
        || cap.starts_with(b"QUOTA=RES-")
        || (!rules.read_only && (writing.contains(&cap.as_slice()) || cap.starts_with(b"APPENDLIMIT")))
}

/// A capability list (space-separated, as in the login reply's `[CAPABILITY ...]`) with
/// what a restricted session may not see removed ([`keep_capability`]).
pub fn filter_capabilities(caps: &str, rules: &Restriction) -> String {
    caps.split(' ').filter(|c| !c.is_empty() && keep_capability(c.as_bytes(), rules)).collect::<Vec<_>>().join(" ")
}

fn filter_cap_bytes(caps: &[u8], rules: &Restriction) -> Vec<u8> {
    caps.split(|b| *b == b' ').filter(|c| !c.is_empty() && keep_capability(c, rules)).collect::<Vec<_>>().join(&b' ')
}

/// A `* CAPABILITY ...` line, or a status line with a `[CAPABILITY ...]` code, with its
/// capabilities filtered; any other line unchanged.
pub fn rewrite_caps_line(line: &[u8], rules: &Restriction) -> Vec<u8> {
    const DATA: &[u8] = b"* CAPABILITY ";
    const CODE: &[u8] = b"[CAPABILITY ";
    if line.len() >= DATA.len() && line.get(..DATA.len()).is_some_and(|h| h.eq_ignore_ascii_case(DATA)) {
        let rest = line.get(DATA.len()..).unwrap_or_default();
        let rest = rest.strip_suffix(b"\r\n").unwrap_or(rest);
        let mut out = line.get(..DATA.len()).unwrap_or_default().to_vec();
        out.extend(filter_cap_bytes(rest, rules));
        out.extend_from_slice(b"\r\n");
        return out;
    }
    let Some(at) = line.windows(CODE.len()).position(|w| w.eq_ignore_ascii_case(CODE)) else { return line.to_vec() };
    let start = at + CODE.len();
    let Some(close) = line.get(start..).and_then(|r| r.iter().position(|b| *b == b']')) else { return line.to_vec() };
    let mut out = line.get(..start).unwrap_or_default().to_vec();
    out.extend(filter_cap_bytes(line.get(start..start + close).unwrap_or_default(), rules));
    out.extend_from_slice(line.get(start + close..).unwrap_or_default());
    out
}

#[cfg(test)]
#[path = "imap_filter_tests.rs"]
mod tests;
