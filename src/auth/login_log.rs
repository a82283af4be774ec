//! The one log line per login attempt, for admins and fail2ban (issue 19, point 5).
//!
//! Every mail login (IMAP, SMTP, POP3, ManageSieve: written by the login gate,
//! `net::gate`) and every web-step sign-in writes one line of one shape, target
//! `mailgate::login`, message `login`, then `key=value` fields in a fixed order:
//!
//! ```text
//! INFO mailgate::login: login result=ok protocol=imap client=192.0.2.7 user=alice@example.com method=app-password app_password=jnqs4c client_id="Thunderbird 128.3" duration_ms=12
//! INFO mailgate::login: login result=wrong protocol=smtp client=203.0.113.9 user=alice@example.com method=account-password duration_ms=96
//! INFO mailgate::login: login result=throttled protocol=imap client=203.0.113.9 user=alice@example.com method=account-password duration_ms=1 more=41
//! ```
//!
//! `client` comes before `user`, the first field the client chooses, so a pattern anchored
//! on `result=… protocol=… client=` (fail2ban's) can never read an address out of a user
//! name. Values a client chooses are bounded ([`MAX_CHARS`]) and written bare only when
//! they have no space, `"`, `\`, `=`, control or invisible format character; otherwise
//! they are quoted with those escaped ([`Value`]), so one attempt is always one line and
//! no value can fake another field.
//!
//! **Floods** (SECURITY.md §H): a line per attempt is written for the results that cost a
//! check — `ok`, `wrong`, `wrong_code`, `needs_app_password` — whose number per address is
//! bounded by the guess budgets and the hashing threads, so the log grows no faster than
//! the checking work. The results a client gets *without* a check — `throttled` (a guess
//! budget is used up), `unavailable` (the check could not run), `too_many` (sessions) and
//! `gone` (it left while waiting) — are the cheap ones an attacker can send by the
//! thousand: for them the first line of a minute per result and address is written and
//! the rest are counted into the next one's `more=N` (like [`super::refusals`]).
//!
//! Never written: passwords, codes or any other secret. `app_password` is the public id
//! (the first 6 characters, what `app-password list` shows), and only for an app password
//! of the account, so a mistyped account password never lands in the log.

use super::refusals::Limiter;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The log target of the login lines (`RUST_LOG` must keep it at `info`).
pub const TARGET: &str = "mailgate::login";

/// Characters of a client-chosen value kept in the line (a longer one is cut and marked
/// with `...`): a 10 KB user name does not make a 10 KB line.
pub const MAX_CHARS: usize = 128;

/// What came of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Logged in (web: signed in).
    Ok,
    /// Wrong credentials, unknown user, wrong scope: a failed guess.
    Wrong,
    /// Web step: the password was right, the second-factor code was not.
    WrongCode,
    /// The right account password of an account with two-step verification: the mail
    /// app needs an app password. Not a guess.
    NeedsAppPassword,
    /// Not checked: a guess budget is used up.
    Throttled,
    /// Not checked: the store, the hashing threads or upstream could not be used.
    Unavailable,
    /// The account has too many sessions from this address.
    TooMany,
    /// The client left while its check waited.
    Gone,
}

impl Outcome {
    /// The value of `result=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Wrong => "wrong",
            Outcome::WrongCode => "wrong_code",
            Outcome::NeedsAppPassword => "needs_app_password",
            Outcome::Throttled => "throttled",
            Outcome::Unavailable => "unavailable",
            Outcome::TooMany => "too_many",
            Outcome::Gone => "gone",
        }
    }

    /// Whether a client gets this result without a check (so it could send thousands):
    /// one line a minute per address, with the count of the others.
    pub fn aggregated(self) -> bool {
        matches!(self, Outcome::Throttled | Outcome::Unavailable | Outcome::TooMany | Outcome::Gone)
    }
}

/// Which secret the client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// An app password (or something of its shape).
    AppPassword,
    /// The account password (anything not of an app password's shape).
    AccountPassword,
    /// Web step: a TOTP code.
    Totp,
    /// Web step: a backup code.
    BackupCode,
    /// An OAuth access token (SASL XOAUTH2 or OAUTHBEARER).
    OAuth,
}

impl Method {
    /// The value of `method=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::AppPassword => "app-password",
            Method::AccountPassword => "account-password",
            Method::Totp => "totp",
            Method::BackupCode => "backup-code",
            Method::OAuth => "oauth",
        }
    }

    /// The method of credentials as sent: a bearer token, or what a typed password
    /// claims by its shape.
    pub fn of_credentials(creds: &crate::proto::sasl::Credentials) -> Method {
        match creds.mechanism {
            crate::proto::sasl::Mechanism::Bearer => Method::OAuth,
            crate::proto::sasl::Mechanism::Password => Method::of_password(creds.password.expose()),
        }
    }

    /// The method a typed password claims by its shape.
    pub fn of_password(password: &[u8]) -> Method {
        if super::app_password::parse(password).is_some() { Method::AppPassword } else { Method::AccountPassword }
    }
}

/// One login line.
#[derive(Debug, Clone)]
pub struct Line<'a> {
    /// What came of it.
    pub result: Outcome,
    /// `imap`, `smtp`, `pop3`, `sieve` or `web`.
    pub protocol: &'a str,
    /// The client's address (after PROXY).
    pub client: IpAddr,
    /// The user name as the client typed it.
    pub user: &'a str,
    /// The secret used.
    pub method: Method,
    /// The public id of the app password (never the secret part).
    pub app_password: Option<&'a str>,
    /// The client's own name (IMAP `ID` name and version).
    pub client_id: Option<&'a str>,
    /// How long the check took (the failure delay after a refusal not included).
    pub duration: Duration,
}

/// Writes the lines, aggregating the results a flood can produce.
#[derive(Default)]
pub struct LoginLog {
    limiter: Limiter<Outcome>,
}

impl LoginLog {
    /// Writes `line` (or counts it, for an aggregated result already written this minute
    /// for its address). Returns whether a line was written.
    pub fn write(&self, line: &Line<'_>) -> bool {
        let more = if line.result.aggregated() {
            match self.limiter.admit(line.result, line.client) {
                Some(more) => Some(more),
                None => return false,
            }
        } else {
            None
        };
        let duration_ms = u64::try_from(line.duration.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            target: TARGET,
            result = %line.result.as_str(),
            protocol = %line.protocol,
            client = %line.client.to_canonical(),
            user = %Value(line.user),
            method = %line.method.as_str(),
            app_password = line.app_password.map(|id| tracing::field::display(Value(id))),
            client_id = line.client_id.map(|id| tracing::field::display(Value(id))),
            duration_ms,
            more,
            "login"
        );
        true
    }
}

/// Set once at start-up when the log is JSON (`[log] format = "json"`): values are then
/// written unquoted (bounded still), since JSON quotes and escapes them itself.
static JSON: AtomicBool = AtomicBool::new(false);

/// Values go into JSON from now on (called once, before the first line).
pub fn set_json() {
    JSON.store(true, Ordering::Relaxed);
}

/// A client-chosen value as it goes into a line: bounded, and quoted and escaped when it
/// is not a plain word (see the module docs).
pub struct Value<'a>(pub &'a str);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.char_indices().nth(MAX_CHARS).map(|(i, _)| i);
        let kept = cut.map_or(self.0, |i| &self.0[..i]);
        if JSON.load(Ordering::Relaxed) {
            f.write_str(kept)?;
            return if cut.is_some() { f.write_str("...") } else { Ok(()) };
        }
        if cut.is_none() && !kept.is_empty() && kept.chars().all(is_bare) {
            return f.write_str(kept);
        }
        f.write_str("\"")?;
        for c in kept.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                ' ' => f.write_str(" ")?,
                c if is_invisible(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        if cut.is_some() {
            f.write_str("...")?;
        }
        f.write_str("\"")
    }
}

/// A character that may stand in a bare value.
fn is_bare(c: char) -> bool {
    !matches!(c, '"' | '\\' | '=') && !c.is_whitespace() && !is_invisible(c)
}

/// Control, format (bidirectional overrides, zero-width), separator and other whitespace
/// characters: escaped, so a line reads as what it is.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    c != ' '
        && (c.is_control()
            || c.is_whitespace()
            || matches!(
                c.general_category(),
                GeneralCategory::Format | GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> String {
        Value(s).to_string()
    }

    #[test]
    fn plain_words_are_bare() {
        assert_eq!(v("alice@example.com"), "alice@example.com");
        assert_eq!(v("jnqs4c"), "jnqs4c");
        assert_eq!(v("Jörg@bücher.example"), "Jörg@bücher.example", "UTF-8 names stay readable");
    }

    #[test]
    fn spaces_quotes_and_controls_are_quoted_and_escaped() {
        assert_eq!(v("Thunderbird 128"), "\"Thunderbird 128\"");
        assert_eq!(v(""), "\"\"");
        assert_eq!(v("a\"b"), "\"a\\\"b\"");
        assert_eq!(v("a\\b"), "\"a\\\\b\"");
        assert_eq!(v("a=b"), "\"a=b\"");
        assert_eq!(v("a\r\nb\tc\0"), "\"a\\r\\nb\\tc\\u{0}\"");
        // Bidirectional override, zero-width space, line separator, no-break space.
        assert_eq!(v("a\u{202e}b\u{200b}c\u{2028}d\u{a0}"), "\"a\\u{202e}b\\u{200b}c\\u{2028}d\\u{a0}\"");
    }

    /// A user name cannot fake a field or a second line: whatever it holds, the value is
    /// one token (bare, or quoted with every inner quote escaped) on one line.
    #[test]
    fn a_user_name_cannot_fake_fields_or_lines() {
        let evil = "x client=192.0.2.99 result=wrong\nINFO mailgate::login: login result=wrong protocol=imap client=192.0.2.99";
        let out = v(evil);
        assert!(!out.contains('\n') && !out.contains('\r'), "{out}");
        assert!(out.starts_with('"') && out.ends_with('"'), "{out}");
        let inner = &out[1..out.len() - 1];
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => assert!(chars.next().is_some()),
                '"' => panic!("an unescaped quote in {out}"),
                _ => {}
            }
        }
    }

    #[test]
    fn long_values_are_cut() {
        let long = "a".repeat(10_000);
        let out = v(&long);
        assert_eq!(out, format!("\"{}...\"", "a".repeat(MAX_CHARS)));
        let wide = "ü".repeat(10_000);
        assert_eq!(v(&wide).chars().count(), MAX_CHARS + 5, "cut on a character boundary");
        assert_eq!(v(&"a".repeat(MAX_CHARS)), "a".repeat(MAX_CHARS), "at the bound: whole");
    }

    #[test]
    fn methods_by_shape() {
        let app = crate::auth::app_password::generate().unwrap();
        assert_eq!(Method::of_password(app.grouped().expose().as_bytes()), Method::AppPassword);
        assert_eq!(Method::of_password(b"correct horse"), Method::AccountPassword);
    }

    /// What the text log shows: the shape fail2ban's filter (fail2ban/filter.d) reads.
    #[test]
    fn the_text_line() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || out.clone()).with_ansi(false).without_time().finish();
        tracing::subscriber::with_default(subscriber, || {
            let log = LoginLog::default();
            log.write(&Line {
                result: Outcome::Ok,
                protocol: "imap",
                client: "::ffff:192.0.2.7".parse().unwrap(),
                user: "alice@example.com",
                method: Method::AppPassword,
                app_password: Some("jnqs4c"),
                client_id: Some("Thunderbird 128.3"),
                duration: Duration::from_millis(12),
            });
            for _ in 0..3 {
                log.write(&Line {
                    result: Outcome::Throttled,
                    protocol: "smtp",
                    client: "2001:db8::1".parse().unwrap(),
                    user: "bob \"the\" builder",
                    method: Method::AccountPassword,
                    app_password: None,
                    client_id: None,
                    duration: Duration::from_micros(1500),
                });
            }
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            " INFO mailgate::login: login result=ok protocol=imap client=192.0.2.7 user=alice@example.com \
             method=app-password app_password=jnqs4c client_id=\"Thunderbird 128.3\" duration_ms=12\n \
             INFO mailgate::login: login result=throttled protocol=smtp client=2001:db8::1 \
             user=\"bob \\\"the\\\" builder\" method=account-password duration_ms=1 more=0\n"
        );
    }

    #[test]
    fn floods_are_aggregated_checks_are_not() {
        let log = LoginLog::default();
        let line = |result| Line {
            result,
            protocol: "imap",
            client: "192.0.2.7".parse().unwrap(),
            user: "a@x",
            method: Method::AccountPassword,
            app_password: None,
            client_id: None,
            duration: Duration::from_millis(3),
        };
        for _ in 0..5 {
            assert!(log.write(&line(Outcome::Wrong)));
            assert!(log.write(&line(Outcome::NeedsAppPassword)));
            assert!(log.write(&line(Outcome::Ok)));
        }
        for result in [Outcome::Throttled, Outcome::Unavailable, Outcome::TooMany, Outcome::Gone] {
            assert!(log.write(&line(result)), "{result:?}: the first of the minute");
            for _ in 0..100 {
                assert!(!log.write(&line(result)), "{result:?}: counted, not written");
            }
        }
    }
}
