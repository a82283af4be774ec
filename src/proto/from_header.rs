//! One reading of a `From:` or `Sender:` field (issue 13, item 3), sans-IO.
//!
//! The sender policy compares the address in `From:` with the account's addresses. That is
//! only worth something if every program that later shows the message reads the *same*
//! address out of the field. They do not, for the full RFC 5322 grammar: given
//! `From: ceo@example.com <mallory@example.com>`, mail-parser reads mallory, while Dovecot's
//! IMAP `ENVELOPE` and Python's `email` read ceo. Groups, comments, source routes, several
//! mailboxes and encoded-words that decode to `<…@…>` split readers the same way.
//!
//! So a field is accepted only in a small grammar on whose meaning every common reader
//! agrees, and refused (with [`Ambiguity`] saying why) otherwise:
//!
//! ```text
//! field     = [blank] ( addr-spec / [phrase] [blank] "<" addr-spec ">" ) [blank]
//! phrase    = word *([blank] word)
//! word      = atom / quoted-string / encoded-word    ; atom may hold "." (obs-phrase) and UTF-8
//! addr-spec = dot-atom "@" dot-atom                  ; UTF-8 allowed (RFC 6532); no blanks
//! blank     = 1*(SP / HTAB / CRLF (SP / HTAB))       ; folding allowed between tokens
//! ```
//!
//! and the display name, *after* decoding quoted-pairs and encoded-words, must not hold text
//! that looks like an address or like address syntax:
//!
//! * `@`, `<`, `>` (and look-alikes such as U+FF20 `＠`) anywhere in the name. One exception:
//!   a name that is exactly the address itself (`"alice@example.com" <alice@example.com>`,
//!   as some clients write when no name is set) shows nobody else.
//! * `:`, `;`, `,`, `"`, `(`, `)`, `[`, `]`, `\` coming out of an encoded-word: a reader that
//!   decodes before it parses sees structure there. Inside a quoted string `,`, `:` and `;`
//!   are plain text (`"Last, First" <…>`).
//! * control characters, bidirectional controls and U+FFFD (a failed decoding).
//!
//! Encoded-words must be well-formed RFC 2047 words standing alone (between blanks, or
//! before `<`), in a charset whose decoding is exact here (UTF-8, US-ASCII, ISO-8859-*,
//! windows-125*); `=?` anywhere else — inside a quoted string, glued to other text, in the
//! address — is refused, because readers differ on whether to decode it.
//!
//! Not accepted at all: comments, groups, more than one mailbox, source routes, quoted local
//! parts, domain literals, blanks inside the address, anything after `>`.
//!
//! Finally the address read here is cross-checked with mail-parser's reading of the same
//! bytes; if they differ, the field is refused ([`Ambiguity::Disagreement`]).
//!
//! Depends on mail-parser (its RFC 2047 decoder and address parser) only.

use mail_parser::parsers::MessageStream;

/// The one mailbox of an accepted field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The decoded display name (words joined by one space), if there is one.
    pub display_name: Option<String>,
    /// The address as written (`local@domain`), case kept.
    pub address: String,
}

/// Why an encoded-word was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodedWordProblem {
    /// `=?` that does not start a well-formed `=?charset?Q|B?text?=` word.
    #[error("\"=?\" that is not a well-formed encoded-word")]
    Malformed,
    /// An encoded-word glued to other text (RFC 2047 §5 wants it alone).
    #[error("an encoded-word not separated from the text around it")]
    NotAlone,
    /// `=?…?=` inside a quoted string (some readers decode it, some do not).
    #[error("an encoded-word inside a quoted string")]
    InQuotedString,
    /// `=?` inside the address.
    #[error("\"=?\" inside the address")]
    InAddress,
    /// A charset whose decoding mailgate cannot check exactly.
    #[error("an encoded-word in charset {0}, which mailgate does not check")]
    Charset(String),
    /// The word did not decode.
    #[error("an encoded-word that does not decode")]
    Undecodable,
}

/// Why a `From:`/`Sender:` field does not have one reading. Each text completes the
/// sentence "The From: header is ambiguous: …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ambiguity {
    /// 8-bit bytes that are not UTF-8 (readers guess a charset).
    #[error("it is not valid UTF-8")]
    NotUtf8,
    /// A control character, or a CR or LF that is not folding.
    #[error("it contains a control character")]
    Control,
    /// No address at all (`From:`, `From: <>`, `From: Name`).
    #[error("it has no address")]
    NoAddress,
    /// Group syntax `name: … ;`, which readers split differently.
    #[error("group syntax ({0:?}) is not accepted; send one address")]
    Group(char),
    /// A `,`: more than one mailbox.
    #[error("it has more than one address")]
    MultipleAddresses,
    /// A comment in parentheses (some readers show it as the name).
    #[error("comments in parentheses are not accepted")]
    Comment,
    /// An obsolete source route `<@host,@host:user@domain>`.
    #[error("source routes (\"@host:\") are not accepted")]
    Route,
    /// Angle brackets that do not enclose exactly one address.
    #[error("the angle brackets do not enclose exactly one address")]
    Angle,
    /// A quoted string without its closing quote.
    #[error("a quoted string is not closed")]
    UnclosedQuote,
    /// Text before or after the address that is not a display name.
    #[error("there is text outside the address; write a name as Name <address>")]
    TrailingText,
    /// An address form that readers render differently (quoted local part, domain literal,
    /// blanks inside, bad dots).
    #[error("the address is not a plain user@domain ({0})")]
    UnsupportedAddress(&'static str),
    /// Address-like text in the display name after decoding.
    #[error("the display name contains {} (address-like text)", shown(*.0))]
    AddressLikeName(char),
    /// Address syntax that comes out of an encoded-word.
    #[error("an encoded-word in the display name decodes to {}", shown(*.0))]
    SpecialInEncodedWord(char),
    /// A character that is shown differently or hides text (bidi controls, U+FFFD, ...).
    #[error("the display name contains {}", shown(*.0))]
    UnsafeCharacter(char),
    /// A special character out of place in the display name (`[`, `]`, `\`).
    #[error("the display name contains a stray {}", shown(*.0))]
    StrayCharacter(char),
    /// An encoded-word problem.
    #[error("{0}")]
    EncodedWord(EncodedWordProblem),
    /// This reading and mail-parser's differ.
    #[error("readers disagree on the address ({ours} or {theirs})")]
    Disagreement {
        /// The address read here.
        ours: String,
        /// What mail-parser read.
        theirs: String,
    },
}

impl Ambiguity {
    /// A short stable name for the kind of problem (corpus files, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            Ambiguity::NotUtf8 => "not-utf8",
            Ambiguity::Control => "control",
            Ambiguity::NoAddress => "no-address",
            Ambiguity::Group(_) => "group",
            Ambiguity::MultipleAddresses => "multiple",
            Ambiguity::Comment => "comment",
            Ambiguity::Route => "route",
            Ambiguity::Angle => "angle",
            Ambiguity::UnclosedQuote => "quote",
            Ambiguity::TrailingText => "trailing",
            Ambiguity::UnsupportedAddress(_) => "address",
            Ambiguity::AddressLikeName(_) => "address-like",
            Ambiguity::SpecialInEncodedWord(_) => "encoded-special",
            Ambiguity::UnsafeCharacter(_) => "unsafe-char",
            Ambiguity::StrayCharacter(_) => "stray",
            Ambiguity::EncodedWord(_) => "encoded-word",
            Ambiguity::Disagreement { .. } => "disagree",
        }
    }
}

/// A character for an ASCII-only reply line: `"@"`, or `U+FF20`.
fn shown(c: char) -> String {
    if c.is_ascii_graphic() { format!("\"{c}\"") } else { format!("U+{:04X}", u32::from(c)) }
}

/// Reads the value of a `From:` or `Sender:` field (the bytes after the colon, folding
/// included, the final CRLF optional) and returns its one mailbox, or why it has none that
/// every reader agrees on.
pub fn one_reading(raw: &[u8]) -> Result<Mailbox, Ambiguity> {
    let mailbox = strict_reading(raw)?;
    let theirs = mail_parser_reading(raw);
    if theirs.as_deref() != Some(mailbox.address.as_str()) {
        return Err(Ambiguity::Disagreement {
            ours: mailbox.address,
            theirs: theirs.unwrap_or_else(|| "no single address".into()),
        });
    }
    Ok(mailbox)
}

/// mail-parser's reading: its address if it reads exactly one mailbox outside any group.
fn mail_parser_reading(raw: &[u8]) -> Option<String> {
    let mut field = b"From:".to_vec();
    field.extend_from_slice(trim_line_end(raw));
    field.extend_from_slice(b"\r\n\r\n");
    let msg = mail_parser::MessageParser::default().parse_headers(&field)?;
    match msg.from()? {
        mail_parser::Address::List(list) if list.len() == 1 => list.first()?.address().map(str::to_string),
        _ => None,
    }
}

fn trim_line_end(raw: &[u8]) -> &[u8] {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    raw.strip_suffix(b"\r").unwrap_or(raw)
}

/// Removes folding (CRLF before SP/HTAB); any other CR or LF is an error.
fn unfold(raw: &[u8]) -> Result<String, Ambiguity> {
    let raw = trim_line_end(raw);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'\r' && raw.get(i + 1) == Some(&b'\n') && matches!(raw.get(i + 2), Some(b' ' | b'\t')) {
            i += 2;
            continue;
        }
        out.push(b);
        i += 1;
    }
    let text = String::from_utf8(out).map_err(|_| Ambiguity::NotUtf8)?;
    if text.chars().any(|c| (c.is_ascii_control() && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c)) {
        return Err(Ambiguity::Control);
    }
    Ok(text)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'a> {
    /// SP / HTAB (after unfolding).
    Blank,
    /// atext, `.` and non-ASCII characters.
    Atom(&'a str),
    /// A well-formed encoded-word standing at a word start (raw text).
    Encoded(&'a str),
    /// A quoted string, quoted-pairs undone.
    Quoted(String),
    /// One of `( ) < > [ ] : ; @ \ ,`.
    Special(char),
}

const SPECIALS: &str = "()<>[]:;@\\,";

fn lex(s: &str) -> Result<Vec<Tok<'_>>, Ambiguity> {
    let mut toks = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if c == ' ' || c == '\t' {
            let n = rest.find(|c| c != ' ' && c != '\t').unwrap_or(rest.len());
            toks.push(Tok::Blank);
            rest = &rest[n..];
        } else if c == '"' {
            let mut text = String::new();
            let mut chars = rest.char_indices().skip(1);
            let end = loop {
                match chars.next() {
                    None => return Err(Ambiguity::UnclosedQuote),
                    Some((i, '"')) => break i + 1,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, q)) => text.push(q),
                        None => return Err(Ambiguity::UnclosedQuote),
                    },
                    Some((_, q)) => text.push(q),
                }
            };
            toks.push(Tok::Quoted(text));
            rest = &rest[end..];
        } else if SPECIALS.contains(c) {
            toks.push(Tok::Special(c));
            rest = &rest[c.len_utf8()..];
        } else if rest.starts_with("=?") && matches!(toks.last(), None | Some(Tok::Blank)) {
            let n = encoded_word_len(rest).ok_or(Ambiguity::EncodedWord(EncodedWordProblem::Malformed))?;
            let (word, after) = rest.split_at(n);
            // Alone: followed by a blank, "<" or the end.
            if !(after.is_empty() || after.starts_with([' ', '\t', '<'])) {
                return Err(Ambiguity::EncodedWord(EncodedWordProblem::NotAlone));
            }
            toks.push(Tok::Encoded(word));
            rest = after;
        } else {
            let n =
                rest.find(|c: char| c == ' ' || c == '\t' || c == '"' || SPECIALS.contains(c)).unwrap_or(rest.len());
            toks.push(Tok::Atom(&rest[..n]));
            rest = &rest[n..];
        }
    }
    Ok(toks)
}

/// Length of a well-formed RFC 2047 encoded-word at the start of `s`, as mail-parser
/// delimits one (up to the first `?=` after `=?charset?X?`), if it is also well-formed:
/// token charset (with an optional `*lang`), Q or B, encoded text of printable ASCII
/// without `?` or blanks.
fn encoded_word_len(s: &str) -> Option<usize> {
    let body = s.strip_prefix("=?")?;
    let charset_len = body.find('?')?;
    let charset = body.get(..charset_len)?;
    if charset.is_empty() || !charset.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\"/[]?.=\\".contains(&b)) {
        return None;
    }
    let after_charset = body.get(charset_len + 1..)?;
    let mut it = after_charset.chars();
    if !matches!(it.next(), Some('q' | 'Q' | 'b' | 'B')) || it.next() != Some('?') {
        return None;
    }
    let text = after_charset.get(2..)?;
    let text_len = text.find('?')?;
    if !text.get(text_len..)?.starts_with("?=") {
        return None;
    }
    let encoded = text.get(..text_len)?;
    let alphabet_ok = if matches!(after_charset.as_bytes().first(), Some(b'b' | b'B')) {
        encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    } else {
        encoded.bytes().all(|b| b.is_ascii_graphic())
    };
    if !alphabet_ok {
        return None;
    }
    Some(2 + charset_len + 1 + 2 + text_len + 2)
}

/// Charsets whose decoding by mail-parser (without `full_encoding`) is exact.
fn charset_checked(charset: &str) -> bool {
    let name = charset.split('*').next().unwrap_or("").to_ascii_lowercase();
    let numbered = |prefix: &str, range: std::ops::RangeInclusive<u32>| {
        name.strip_prefix(prefix).and_then(|n| n.parse::<u32>().ok()).is_some_and(|n| range.contains(&n))
    };
    matches!(name.as_str(), "utf-8" | "utf8" | "us-ascii")
        || (numbered("iso-8859-", 1..=16) && name != "iso-8859-12")
        || numbered("windows-", 1250..=1258)
}

/// Decodes one encoded-word (checked by [`encoded_word_len`]) with mail-parser.
fn decode_encoded_word(word: &str) -> Result<String, Ambiguity> {
    let charset = word.get(2..).and_then(|b| b.split('?').next()).unwrap_or("");
    if !charset_checked(charset) {
        return Err(Ambiguity::EncodedWord(EncodedWordProblem::Charset(charset.chars().take(40).collect())));
    }
    // mail-parser's decoder starts after the "=".
    let tail = word.get(1..).unwrap_or("");
    let mut stream = MessageStream::new(tail.as_bytes());
    let decoded = stream.decode_rfc2047().ok_or(Ambiguity::EncodedWord(EncodedWordProblem::Undecodable))?;
    if stream.offset() != tail.len() {
        return Err(Ambiguity::EncodedWord(EncodedWordProblem::Malformed));
    }
    if charset.to_ascii_lowercase().starts_with("us-ascii") && !decoded.is_ascii() {
        return Err(Ambiguity::EncodedWord(EncodedWordProblem::Undecodable));
    }
    Ok(decoded)
}

/// Look-alikes of `@`, `<` and `>`.
const LOOKALIKES: &[char] = &[
    '\u{FF20}', '\u{FE6B}', '\u{FF1C}', '\u{FF1E}', '\u{FE64}', '\u{FE65}', '\u{2039}', '\u{203A}', '\u{3008}',
    '\u{3009}', '\u{27E8}', '\u{27E9}', '\u{2329}', '\u{232A}', '\u{276C}', '\u{276D}', '\u{02C2}', '\u{02C3}',
    '\u{1438}', '\u{1433}', '\u{16B2}',
];

/// Characters that hide or reorder text, or show that decoding failed.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{FFFD}' | '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{FEFF}')
        || ('\u{202A}'..='\u{202E}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordKind {
    Atom,
    Quoted,
    Encoded,
}

/// The address as a strict reading sees it; no cross-check.
fn strict_reading(raw: &[u8]) -> Result<Mailbox, Ambiguity> {
    let text = unfold(raw)?;
    let toks = lex(&text)?;
    let specials: Vec<char> =
        toks.iter().filter_map(|t| if let Tok::Special(c) = t { Some(*c) } else { None }).collect();
    if specials.iter().any(|c| matches!(c, '(' | ')')) {
        return Err(Ambiguity::Comment);
    }
    let opens: Vec<usize> = toks.iter().enumerate().filter(|(_, t)| **t == Tok::Special('<')).map(|(i, _)| i).collect();
    for &open in &opens {
        let first = toks.get(open + 1..).and_then(|r| r.iter().find(|t| **t != Tok::Blank));
        if first == Some(&Tok::Special('@')) {
            return Err(Ambiguity::Route);
        }
    }
    if let Some(c) = specials.iter().find(|c| matches!(c, ':' | ';')) {
        return Err(Ambiguity::Group(*c));
    }
    if specials.contains(&',') {
        return Err(Ambiguity::MultipleAddresses);
    }
    let closes = specials.iter().filter(|c| **c == '>').count();
    let (phrase, address) = match opens.as_slice() {
        [] if closes > 0 => return Err(Ambiguity::Angle),
        [] => (&[][..], bare_address(&toks)?),
        [open] => {
            let (phrase, inner_and_rest) = toks.split_at(*open);
            let inner_and_rest = inner_and_rest.get(1..).unwrap_or(&[]);
            let Some(close) = inner_and_rest.iter().position(|t| *t == Tok::Special('>')) else {
                return Err(Ambiguity::Angle);
            };
            if closes != 1 || phrase.contains(&Tok::Special('>')) {
                return Err(Ambiguity::Angle);
            }
            let inner = inner_and_rest.get(..close).unwrap_or(&[]);
            if inner_and_rest.get(close + 1..).unwrap_or(&[]).iter().any(|t| *t != Tok::Blank) {
                return Err(Ambiguity::TrailingText);
            }
            (phrase, angle_address(inner)?)
        }
        _ => return Err(Ambiguity::Angle),
    };
    let display_name = display_name(phrase, &address)?;
    Ok(Mailbox { display_name, address })
}

/// The tokens between `<` and `>`: exactly `local @ domain`.
fn angle_address(inner: &[Tok<'_>]) -> Result<String, Ambiguity> {
    if inner.iter().all(|t| *t == Tok::Blank) {
        return Err(Ambiguity::NoAddress);
    }
    addr_spec(inner)
}

/// A field without `<`: the whole of it (blanks around aside) is one addr-spec.
fn bare_address(toks: &[Tok<'_>]) -> Result<String, Ambiguity> {
    let start = toks.iter().position(|t| *t != Tok::Blank).unwrap_or(toks.len());
    let end = toks.iter().rposition(|t| *t != Tok::Blank).map_or(start, |e| e + 1);
    let toks = toks.get(start..end).unwrap_or(&[]);
    let Some(at) = toks.iter().position(|t| *t == Tok::Special('@')) else {
        return Err(Ambiguity::NoAddress);
    };
    if matches!(at.checked_sub(1).and_then(|i| toks.get(i)), Some(Tok::Blank))
        || matches!(toks.get(at + 1), Some(Tok::Blank))
    {
        return Err(Ambiguity::UnsupportedAddress("blanks inside it"));
    }
    // `name user@domain` or `user@domain text`: a word outside the addr-spec.
    let before = toks.get(..at).unwrap_or(&[]);
    let after = toks.get(at + 1..).unwrap_or(&[]);
    let word_blank_word = |side: &[Tok<'_>]| {
        let mut seen_word = false;
        let mut seen_blank_after_word = false;
        for t in side {
            match t {
                Tok::Blank if seen_word => seen_blank_after_word = true,
                Tok::Blank => {}
                _ if seen_blank_after_word => return true,
                _ => seen_word = true,
            }
        }
        false
    };
    let reversed: Vec<Tok<'_>> = before.iter().rev().cloned().collect();
    if word_blank_word(&reversed) || word_blank_word(after) {
        return Err(Ambiguity::TrailingText);
    }
    addr_spec(toks)
}

/// `dot-atom "@" dot-atom`, nothing else.
fn addr_spec(toks: &[Tok<'_>]) -> Result<String, Ambiguity> {
    for t in toks {
        match t {
            Tok::Blank => return Err(Ambiguity::UnsupportedAddress("blanks inside it")),
            Tok::Quoted(_) => return Err(Ambiguity::UnsupportedAddress("a quoted local part")),
            Tok::Special('[' | ']') => return Err(Ambiguity::UnsupportedAddress("a domain literal")),
            Tok::Encoded(_) => return Err(Ambiguity::EncodedWord(EncodedWordProblem::InAddress)),
            Tok::Atom(a) if a.contains("=?") => return Err(Ambiguity::EncodedWord(EncodedWordProblem::InAddress)),
            _ => {}
        }
    }
    let [Tok::Atom(local), Tok::Special('@'), Tok::Atom(domain)] = toks else {
        return Err(Ambiguity::UnsupportedAddress("not one local part, one \"@\" and one domain"));
    };
    let dot_atom = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.ends_with('.') && !s.contains("..");
    if !dot_atom(local) || !dot_atom(domain) {
        return Err(Ambiguity::UnsupportedAddress("misplaced dots"));
    }
    Ok(format!("{local}@{domain}"))
}

/// Decodes and checks the display name.
fn display_name(phrase: &[Tok<'_>], address: &str) -> Result<Option<String>, Ambiguity> {
    let mut words: Vec<(WordKind, String, bool)> = Vec::new(); // (kind, text, blank before)
    let mut blank = false;
    for t in phrase {
        match t {
            Tok::Blank => {
                blank = true;
                continue;
            }
            Tok::Atom(a) if a.contains("=?") => {
                return Err(Ambiguity::EncodedWord(if a.starts_with("=?") {
                    EncodedWordProblem::NotAlone
                } else {
                    EncodedWordProblem::Malformed
                }));
            }
            Tok::Atom(a) => words.push((WordKind::Atom, (*a).to_string(), blank)),
            Tok::Quoted(q) if q.contains("=?") => {
                return Err(Ambiguity::EncodedWord(EncodedWordProblem::InQuotedString));
            }
            Tok::Quoted(q) => words.push((WordKind::Quoted, q.clone(), blank)),
            Tok::Encoded(e) => words.push((WordKind::Encoded, decode_encoded_word(e)?, blank)),
            Tok::Special('@') => return Err(Ambiguity::AddressLikeName('@')),
            Tok::Special(c) => return Err(Ambiguity::StrayCharacter(*c)),
        }
        blank = false;
    }
    let mut name = String::new();
    let mut previous: Option<WordKind> = None;
    for (kind, text, blank) in &words {
        let joined_encoded = previous == Some(WordKind::Encoded) && *kind == WordKind::Encoded;
        if previous.is_some() && *blank && !joined_encoded {
            name.push(' ');
        }
        name.push_str(text);
        previous = Some(*kind);
    }
    let is_the_address = name.trim().to_lowercase() == address.to_lowercase();
    for (kind, text, _) in &words {
        for c in text.chars() {
            if unsafe_char(c) {
                return Err(Ambiguity::UnsafeCharacter(c));
            }
            if (matches!(c, '@' | '<' | '>') || LOOKALIKES.contains(&c)) && !is_the_address {
                return Err(Ambiguity::AddressLikeName(c));
            }
            // A comma is allowed: Thunderbird encodes "Müller, Jörg" as one encoded-word,
            // and readers split a list before they decode its words.
            if *kind == WordKind::Encoded && ":;\"()[]\\".contains(c) {
                return Err(Ambiguity::SpecialInEncodedWord(c));
            }
        }
    }
    Ok((!name.is_empty()).then_some(name))
}

#[cfg(test)]
#[path = "from_header_tests.rs"]
mod tests;

/// One entry of the committed corpus (`from_header_corpus.txt`).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct CorpusEntry {
    /// Line number in the file.
    pub line: usize,
    /// The verdict.
    pub accept: bool,
    /// The address (accepted) or the [`Ambiguity::kind`] (refused).
    pub expect: String,
    /// The field value (after `From:`, starting with its space), folds and tabs in place.
    pub value: Vec<u8>,
}

/// The committed corpus of forms readers split on, with mailgate's verdicts.
#[cfg(test)]
pub(crate) fn corpus() -> Vec<CorpusEntry> {
    include_str!("from_header_corpus.txt")
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(n, l)| {
            let mut parts = l.splitn(3, '|');
            let verdict = parts.next().unwrap_or("").trim();
            let expect = parts.next().unwrap_or("").trim().to_string();
            let value = parts.next().unwrap_or_else(|| panic!("line {}: no value", n + 1));
            let value = value.strip_prefix(' ').unwrap_or(value);
            assert!(matches!(verdict, "accept" | "refuse"), "line {}: verdict {verdict:?}", n + 1);
            let value = format!(" {value}").replace("{CRLF}", "\r\n").replace("{TAB}", "\t");
            CorpusEntry { line: n + 1, accept: verdict == "accept", expect, value: value.into_bytes() }
        })
        .collect()
}
