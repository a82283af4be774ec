//! Tests of the one reading of `From:`/`Sender:` (issue 13, item 3): the committed corpus of
//! forms that readers split on, the texts the client sees, and fuzz-style properties.
//! The same corpus goes through the SMTP session (`smtp_tests.rs`) and through the real
//! binary to Postfix, Python and Dovecot (`tests/smtp.rs`).

use super::*;
use base64::Engine as _;
use proptest::prelude::*;

fn read(value: &str) -> Result<Mailbox, Ambiguity> {
    one_reading(value.as_bytes())
}

fn address(value: &str) -> String {
    match read(value) {
        Ok(m) => m.address,
        Err(e) => panic!("{value:?} refused: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------

#[test]
fn corpus_verdicts() {
    let entries = corpus();
    assert!(entries.len() >= 100, "corpus too small: {}", entries.len());
    let mut failures = Vec::new();
    for e in &entries {
        let got = one_reading(&e.value);
        let ok = match (&got, e.accept) {
            (Ok(m), true) => m.address == e.expect,
            (Err(a), false) => a.kind() == e.expect,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "line {}: {:?} want {} {}, got {got:?}",
                e.line,
                String::from_utf8_lossy(&e.value),
                if e.accept { "accept" } else { "refuse" },
                e.expect
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn corpus_covers_every_kind_of_refusal() {
    let kinds: std::collections::BTreeSet<String> =
        corpus().into_iter().filter(|e| !e.accept).map(|e| e.expect).collect();
    for kind in [
        "no-address",
        "group",
        "multiple",
        "comment",
        "route",
        "angle",
        "quote",
        "trailing",
        "address",
        "address-like",
        "encoded-special",
        "unsafe-char",
        "stray",
        "encoded-word",
    ] {
        assert!(kinds.contains(kind), "no corpus entry of kind {kind}");
    }
}

/// Every accepted entry is accepted however its blanks are folded, and the verdict of every
/// entry does not depend on a CRLF before the value.
#[test]
fn corpus_verdicts_survive_folding() {
    for e in corpus() {
        let folded = String::from_utf8_lossy(&e.value).replacen(' ', "\r\n ", 1).into_bytes();
        let plain = one_reading(&e.value).map(|m| m.address).map_err(|a| a.kind());
        let again = one_reading(&folded).map(|m| m.address).map_err(|a| a.kind());
        assert_eq!(plain, again, "line {}", e.line);
        let mut with_crlf = e.value.clone();
        with_crlf.extend_from_slice(b"\r\n");
        let ended = one_reading(&with_crlf).map(|m| m.address).map_err(|a| a.kind());
        assert_eq!(plain, ended, "line {} with its CRLF", e.line);
    }
}

// ---------------------------------------------------------------------------------------
// Issue 13: the four forms, and what the client is told
// ---------------------------------------------------------------------------------------

#[test]
fn issue_13_four_forms_have_no_one_reading() {
    for (value, kind) in [
        (" ceo@example.com <mallory@example.com>", "address-like"),
        (" =?utf-8?q?<ceo@example.com>?= <mallory@example.com>", "address-like"),
        (" ceo@example.com:mallory@example.com", "group"),
        (" <ceo@example.com>: mallory@example.com;", "group"),
    ] {
        let err = read(value).expect_err(value);
        assert_eq!(err.kind(), kind, "{value}: {err}");
    }
}

#[test]
fn refusal_texts_say_what_is_wrong() {
    for (value, text) in [
        (" ceo@example.com <alice@example.com>", "the display name contains \"@\" (address-like text)"),
        (" =?utf-8?q?<ceo@example.com>?= <alice@example.com>", "the display name contains \"<\" (address-like text)"),
        (" ceo@example.com:alice@example.com", "group syntax (':') is not accepted; send one address"),
        (" <ceo@example.com>: alice@example.com;", "group syntax (':') is not accepted; send one address"),
        (" alice@example.com, bob@example.com", "it has more than one address"),
        (" alice@example.com (Alice)", "comments in parentheses are not accepted"),
        (" <@evil.example:alice@example.com>", "source routes (\"@host:\") are not accepted"),
        (" ceo\u{FF20}example.com <alice@example.com>", "the display name contains U+FF20 (address-like text)"),
        (" =?utf-8?q?Last=3B?= <alice@example.com>", "an encoded-word in the display name decodes to \";\""),
        (" \"=?utf-8?q?x?=\" <alice@example.com>", "an encoded-word inside a quoted string"),
        (" =?utf-7?q?+AEA-?= <alice@example.com>", "an encoded-word in charset utf-7, which mailgate does not check"),
        (" \"alice\"@example.com", "the address is not a plain user@domain (a quoted local part)"),
        (" alice@example.com x", "there is text outside the address; write a name as Name <address>"),
        (" =?utf-8?q?A=E2=80=AE?= <alice@example.com>", "the display name contains U+202E"),
    ] {
        assert_eq!(read(value).expect_err(value).to_string(), text, "{value}");
    }
}

#[test]
fn display_names_are_decoded() {
    let name = |v: &str| read(v).map(|m| m.display_name).unwrap_or_else(|e| panic!("{v}: {e}"));
    assert_eq!(name(" alice@example.com"), None);
    assert_eq!(name(" <alice@example.com>"), None);
    assert_eq!(name(" \"\" <alice@example.com>"), None);
    assert_eq!(name(" Alice  A.\r\n Smith <alice@example.com>").as_deref(), Some("Alice A. Smith"));
    assert_eq!(name(" \"Last, First\" <alice@example.com>").as_deref(), Some("Last, First"));
    assert_eq!(name(" \"A \\\"B\\\" C\" <alice@example.com>").as_deref(), Some("A \"B\" C"));
    assert_eq!(name(" =?utf-8?q?Al=C3=AFce?= <alice@example.com>").as_deref(), Some("Alïce"));
    // Blanks between adjacent encoded-words vanish (RFC 2047 §6.2).
    assert_eq!(name(" =?utf-8?q?Alice?= =?utf-8?q?_Smith?= <alice@example.com>").as_deref(), Some("Alice Smith"));
    assert_eq!(name(" Jörg =?iso-8859-1?q?M=FCller?= <alice@example.com>").as_deref(), Some("Jörg Müller"));
}

#[test]
fn a_name_that_is_the_address_itself_is_allowed() {
    assert_eq!(address(" \"alice@example.com\" <alice@example.com>"), "alice@example.com");
    assert_eq!(address(" \"ALICE@example.com\" <alice@EXAMPLE.com>"), "alice@EXAMPLE.com");
    assert_eq!(address(" =?utf-8?q?alice=40example.com?= <alice@example.com>"), "alice@example.com");
    // ... but not another address, nor the address in angle brackets, nor unquoted.
    assert_eq!(read(" \"alias@example.org\" <alice@example.com>").map_err(|e| e.kind()), Err("address-like"));
    assert_eq!(read(" \"<alice@example.com>\" <alice@example.com>").map_err(|e| e.kind()), Err("address-like"));
    assert_eq!(read(" alice@example.com <alice@example.com>").map_err(|e| e.kind()), Err("address-like"));
}

#[test]
fn utf8_addresses_and_names() {
    assert_eq!(address(" Jörg <jörg@bücher.example>"), "jörg@bücher.example");
    assert_eq!(address(" 李四 <李四@例子.测试>"), "李四@例子.测试");
    assert_eq!(read(" \"J\u{00f6}rg\u{202e}\" <alice@example.com>").map_err(|e| e.kind()), Err("unsafe-char"));
}

#[test]
fn bytes_that_are_not_utf8_or_are_controls_are_refused() {
    assert_eq!(one_reading(b" J\xf6rg <alice@example.com>"), Err(Ambiguity::NotUtf8));
    assert_eq!(one_reading(b" Alice\0 <alice@example.com>"), Err(Ambiguity::Control));
    assert_eq!(one_reading(b" Alice\r <alice@example.com>"), Err(Ambiguity::Control));
    assert_eq!(one_reading(b" Alice\n <alice@example.com>"), Err(Ambiguity::Control));
    // A CRLF not followed by a blank is not a fold.
    assert_eq!(one_reading(b" Alice\r\nX <alice@example.com>"), Err(Ambiguity::Control));
    assert_eq!(one_reading(" Alice\u{85} <alice@example.com>".as_bytes()), Err(Ambiguity::Control));
}

#[test]
fn encoded_word_charsets() {
    for ok in ["utf-8", "UTF8", "us-ascii", "iso-8859-1", "ISO-8859-15", "windows-1252", "utf-8*en"] {
        assert!(read(&format!(" =?{ok}?q?Alice?= <alice@example.com>")).is_ok(), "{ok}");
    }
    for refused in ["utf-7", "shift_jis", "gb2312", "koi8-r", "iso-8859-12", "x-unknown", "iso-2022-jp"] {
        assert_eq!(
            read(&format!(" =?{refused}?q?Alice?= <alice@example.com>")),
            Err(Ambiguity::EncodedWord(EncodedWordProblem::Charset(refused.to_string()))),
            "{refused}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Properties (fuzz-style; docs/security.md, "Fuzzing")
// ---------------------------------------------------------------------------------------

/// What an accepted value must look like to a reader that knows only quotes: no comment,
/// group or list syntax outside quoted strings, exactly one `@` and at most one `<…>`
/// there, and the address found there.
fn check_accepted(raw: &[u8], m: &Mailbox) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(raw).replace("\r\n", "");
    let mut outside = String::new();
    let mut in_quote = false;
    let mut escaped = false;
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            _ if in_quote => {}
            _ => outside.push(c),
        }
    }
    prop_assert!(!in_quote, "accepted with an open quote: {text:?}");
    for c in ['(', ')', ',', ':', ';', '[', ']', '\\'] {
        prop_assert!(!outside.contains(c), "{c:?} outside quotes in accepted {text:?}");
    }
    prop_assert_eq!(outside.matches('@').count(), 1, "{:?}", text);
    prop_assert!(outside.matches('<').count() <= 1 && outside.matches('<').count() == outside.matches('>').count());
    prop_assert!(outside.contains(&m.address), "{} not in {:?}", m.address, text);
    if let Some(name) = &m.display_name
        && name.trim().to_lowercase() != m.address.to_lowercase()
    {
        prop_assert!(!name.contains(['@', '<', '>']), "address-like name {name:?} accepted");
    }
    prop_assert_eq!(mail_parser_reading(raw), Some(m.address.clone()));
    Ok(())
}

fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " ",
        " ",
        "\t",
        "\r\n ",
        "alice@example.com",
        "alice@example.com",
        "<alice@example.com>",
        "ceo@example.com",
        "alice",
        "ceo",
        "example.com",
        "Alice",
        "Smith",
        "@",
        "<",
        ">",
        ",",
        ":",
        ";",
        "(",
        ")",
        "\"",
        "\\",
        ".",
        "[",
        "]",
        "\"Last, First\"",
        "\"ceo@example.com\"",
        "\"a\\\"b\"",
        "=?utf-8?q?Al=C3=AFce?=",
        "=?utf-8?q?ceo=40example.com?=",
        "=?utf-8?q?<ceo@x>?=",
        "=?utf-8?b?QGI=?=",
        "=?utf-8?q?a=2Cb?=",
        "=?",
        "?=",
        "\u{FF20}",
        "\u{202E}",
        "Jörg",
        "\r\n",
    ])
}

/// Ordinary display names: letters, digits, blanks, and some punctuation.
fn plain_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9äöüßéÅ李][A-Za-z0-9äöüßéÅ李 .'-]{0,30}".prop_map(|s| s.trim_end().to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(2048), .. ProptestConfig::default() })]

    /// Never a panic, whatever the bytes.
    #[test]
    fn prop_arbitrary_bytes(raw in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(m) = one_reading(&raw) {
            prop_assert_eq!(mail_parser_reading(&raw), Some(m.address));
        }
    }

    /// Soups of the tokens readers split on: whatever is accepted has one reading.
    #[test]
    fn prop_token_soup(tokens in prop::collection::vec(token(), 0..12)) {
        let raw = format!(" {}", tokens.concat());
        if let Ok(m) = one_reading(raw.as_bytes()) {
            check_accepted(raw.as_bytes(), &m)?;
        }
    }

    /// The same, shaped like `name <address>` so that more of them are accepted: a name
    /// made of the tokens, the address, and (rarely) tokens after it.
    #[test]
    fn prop_name_soup(
        name in prop::collection::vec(token(), 0..6),
        addr in prop::sample::select(vec![" <alice@example.com>", "<alice@example.com>", " alice@example.com"]),
        after in prop::collection::vec(token(), 0..2),
    ) {
        let raw = format!(" {}{addr}{}", name.concat(), after.concat());
        if let Ok(m) = one_reading(raw.as_bytes()) {
            check_accepted(raw.as_bytes(), &m)?;
        }
    }

    /// Ordinary forms of an ordinary name are accepted, with the address as written.
    #[test]
    fn prop_ordinary_forms_are_accepted(
        name in plain_name(),
        addr in prop::sample::select(vec!["alice@example.com", "Alias@Example.org", "a.b-c+d@sub.example.co.uk"]),
        form in 0usize..5,
    ) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        let raw = match form {
            0 => format!(" {name} <{addr}>"),
            1 => format!(" \"{name}, x\" <{addr}>"),
            2 => format!(" =?utf-8?b?{b64}?= <{addr}>"),
            3 => format!(" \"{name}\"\r\n\t<{addr}>"),
            _ => format!(" {addr}"),
        };
        let m = one_reading(raw.as_bytes()).map_err(|e| TestCaseError::fail(format!("{raw:?}: {e}")))?;
        prop_assert_eq!(&m.address, addr);
        check_accepted(raw.as_bytes(), &m)?;
    }
}
