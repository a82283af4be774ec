//! Reading a Dovecot passwd-file, for `mailgate user import FILE`.
//!
//! A line is `user:password[:uid:gid:gecos:home:shell:extra]`; the fields after the password
//! are ignored. Blank lines and lines starting with `#` are skipped; CRLF line ends and a
//! leading byte-order mark are accepted. The password is `{SCHEME}…` or, without a prefix,
//! a crypt string (Dovecot's default scheme for passwd-files); see
//! [`crate::auth::legacy_hash`] for the schemes. Users keep their passwords: hashes are kept
//! as they are (and replaced by argon2id at the user's next login), clear-text passwords
//! are hashed with argon2id here.
//!
//! Parsing is all-or-nothing: every line is checked first, and one bad line means no user
//! at all, with an error naming each bad line (the first [`MAX_REPORTED`]).

use crate::accounts::AccountError;
use crate::accounts::check_email;
use crate::auth::legacy_hash::{self, DovecotPassword};
use std::collections::HashMap;

/// Bad lines named in an error; more are counted.
pub const MAX_REPORTED: usize = 20;

/// One account read from a passwd-file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedUser {
    /// The account: an e-mail address, normalised like [`crate::accounts::check_email`].
    pub email: String,
    /// What mailgate stores as the account password (see [`legacy_hash`]).
    pub stored_hash: String,
    /// The file held this password in clear text (PLAIN, CLEARTEXT); `stored_hash` is its
    /// argon2id hash. Worth a warning: the file should be deleted.
    pub was_plaintext: bool,
    /// The line it came from (1-based).
    pub line: usize,
}

/// Parses a whole passwd-file. All-or-nothing: any bad line (unknown scheme, malformed,
/// duplicate user, not an e-mail address) → `Err` with "line N: reason" for every bad line
/// (up to [`MAX_REPORTED`], then a count), one per line of the message; nothing returned.
///
/// `default_domain` (`example.org` or `@example.org`) is appended to user names without `@`;
/// without it such names are errors. Clear-text passwords are hashed (argon2id) only once
/// the whole file has passed, so a bad file costs no hashing.
pub fn parse_passwd_file(text: &str, default_domain: Option<&str>) -> Result<Vec<ImportedUser>, ImportError> {
    let domain = default_domain.map(check_domain).transpose()?;
    let mut errors = Errors::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut parsed: Vec<(usize, String, DovecotPassword)> = Vec::new();

    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, line) in text.split('\n').enumerate() {
        let n = index + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let user = fields.next().unwrap_or_default();
        let Some(password) = fields.next() else {
            errors.add(n, "no password field (expected user:{SCHEME}hash)".into());
            continue;
        };
        if user.trim().is_empty() {
            errors.add(n, "empty user name".into());
            continue;
        }
        let email = match email_of(user, domain.as_deref()) {
            Ok(e) => e,
            Err(e) => {
                errors.add(n, e.to_string());
                continue;
            }
        };
        if let Some(first) = seen.get(&email) {
            errors.add(n, format!("duplicate user {email} (also on line {first})"));
            continue;
        }
        seen.insert(email.clone(), n);
        match legacy_hash::parse_dovecot(password) {
            Ok(p) => parsed.push((n, email, p)),
            Err(e) => errors.add(n, format!("user {email}: {e}")),
        }
    }
    errors.check()?;

    let mut users = Vec::with_capacity(parsed.len());
    for (line, email, password) in parsed {
        let was_plaintext = password.is_plaintext();
        match password.into_stored() {
            Ok(stored_hash) => users.push(ImportedUser { email, stored_hash, was_plaintext, line }),
            Err(e) => errors.add(line, format!("user {email}: {e}")),
        }
    }
    errors.check()?;
    Ok(users)
}

/// Checks a default domain; returns it lower-cased, without a leading `@`.
fn check_domain(raw: &str) -> Result<String, ImportError> {
    let d = raw.trim();
    let d = d.strip_prefix('@').unwrap_or(d);
    match check_email(&format!("x@{d}")) {
        Ok(e) if !d.is_empty() => Ok(e[2..].to_string()),
        _ => Err(ImportError::BadDomain(raw.to_string())),
    }
}

/// Why a user name is not an account.
#[derive(Debug, thiserror::Error)]
enum UserError {
    #[error(transparent)]
    Email(#[from] AccountError),
    #[error("user name `{0}` has no @domain (give a default domain to add one)")]
    NoDomain(String),
}

fn email_of(user: &str, domain: Option<&str>) -> Result<String, UserError> {
    if user.contains('@') {
        return Ok(check_email(user)?);
    }
    match domain {
        Some(d) => Ok(check_email(&format!("{}@{d}", user.trim()))?),
        None => Err(UserError::NoDomain(user.trim().to_string())),
    }
}

/// Why a passwd-file was not imported (nothing of it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// The default domain given is not one.
    #[error("`{0}` is not a domain name")]
    BadDomain(String),
    /// Bad lines: "line N: reason", one per line of the message, the first
    /// [`MAX_REPORTED`] named, then a count.
    #[error("{0}")]
    BadLines(String),
}

/// Bad lines, the first [`MAX_REPORTED`] kept.
#[derive(Default)]
struct Errors {
    shown: Vec<String>,
    count: usize,
}

impl Errors {
    fn add(&mut self, line: usize, reason: String) {
        self.count += 1;
        if self.shown.len() < MAX_REPORTED {
            self.shown.push(format!("line {line}: {reason}"));
        }
    }

    fn check(&self) -> Result<(), ImportError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut msg = self.shown.join("\n");
        if self.count > self.shown.len() {
            msg.push_str(&format!("\n… and {} more bad lines", self.count - self.shown.len()));
        }
        Err(ImportError::BadLines(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::legacy_hash::{Scheme, needs_rehash, scheme_of, verify};

    // Made with Dovecot 2.3's `doveadm pw -s SCHEME -p 'correct horse'`.
    const BLF: &str = "{BLF-CRYPT}$2y$05$A4jbxhY.Yl.XdOEOa9kt.uCY0/2iDXBb8L1F67HzXnf5k0CUqdiZO";
    const SHA512_CRYPT: &str = "{SHA512-CRYPT}$6$U92SNt11afC9MGpb$R6MY50ZhEoUAEeXKP.LpjkKfbWqyfP7qyHCdZr2z7OGE5EkKxS7fHRAunvScmgJZCklhnYyi7AHuMvo1LRieB1";
    const SSHA512: &str =
        "{SSHA512}AVCyRDOKXx9G2KaYTxFLqrq3TzPvxUd61rkJQwElc4v3fbtXWB+q1+yQhWsCg58fVRQjlV2ispZsucq7YnBTb2UXrp0=";
    const ARGON2ID: &str =
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$dprJajS+UVr8Mn5rBZtVDQ$iOzkNKVhYTPr+kcj2dVcR2DGjwhgxUbaLXrlnv+l9Fo";
    // `doveadm pw -s SHA256-CRYPT -p 'correct horse'`, without the prefix (Dovecot's CRYPT).
    const BARE_SHA256_CRYPT: &str = "$5$NMiAyWndtUG0X/ro$XYypZfQq2jAbTAxeBdjn6F0bPMta8Tpbrqp9Xxq9Qj/";

    fn mixed_file() -> String {
        format!(
            "# Dovecot users\n\
             \n\
             alice@Example.org:{BLF}:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G\n\
             bob@example.org:{SHA512_CRYPT}\n\
             \t# indented comment\n\
             carol@example.org:{SSHA512}:::::\n\
             dave@example.org:{ARGON2ID}:1003:1003:Dave:/home/dave:/bin/false:\n\
             erin@example.org:{{PLAIN}}correct horse\n\
             frank@example.org:{BARE_SHA256_CRYPT}\n   \n"
        )
    }

    #[test]
    fn mixed_file_imports_every_scheme() {
        let users = parse_passwd_file(&mixed_file(), None).unwrap();
        let emails: Vec<&str> = users.iter().map(|u| u.email.as_str()).collect();
        assert_eq!(
            emails,
            [
                "alice@example.org",
                "bob@example.org",
                "carol@example.org",
                "dave@example.org",
                "erin@example.org",
                "frank@example.org"
            ]
        );
        let lines: Vec<usize> = users.iter().map(|u| u.line).collect();
        assert_eq!(lines, [3, 4, 6, 7, 8, 9]);
        let schemes: Vec<Scheme> = users.iter().map(|u| scheme_of(&u.stored_hash).unwrap()).collect();
        assert_eq!(
            schemes,
            [Scheme::Bcrypt, Scheme::Sha512Crypt, Scheme::Ssha512, Scheme::Argon2, Scheme::Argon2, Scheme::Sha256Crypt]
        );
        for u in &users {
            assert!(verify(b"correct horse", &u.stored_hash), "{}", u.email);
            assert!(!verify(b"correct horse ", &u.stored_hash), "{}", u.email);
            assert_eq!(u.was_plaintext, u.email == "erin@example.org");
            assert!(!u.stored_hash.contains("correct"));
        }
        assert_eq!(users[0].stored_hash, BLF);
        assert_eq!(users[3].stored_hash, &ARGON2ID["{ARGON2ID}".len()..]);
        assert!(!needs_rehash(&users[4].stored_hash)); // hashed here, with mailgate's parameters
        assert!(needs_rehash(&users[0].stored_hash));
    }

    #[test]
    fn crlf_bom_and_no_trailing_newline() {
        let text = format!(
            "\u{feff}# c\r\nalice@example.org:{BLF}\r\n\r\nbob@example.org:{SSHA512}:1:1\r\ncarol@example.org:{BLF}"
        );
        let users = parse_passwd_file(&text, None).unwrap();
        assert_eq!(users.len(), 3);
        assert_eq!(users[1].stored_hash, SSHA512);
        assert!(verify(b"correct horse", &users[1].stored_hash));
        assert_eq!(users[2].line, 5);
        assert_eq!(parse_passwd_file("", None).unwrap(), []);
        assert_eq!(parse_passwd_file("# nothing\n\n", None).unwrap(), []);
    }

    #[test]
    fn default_domain_is_appended() {
        let text = format!("alice:{BLF}\nBob@other.example:{SSHA512}\n");
        let users = parse_passwd_file(&text, Some("Example.ORG")).unwrap();
        assert_eq!(users[0].email, "alice@example.org");
        assert_eq!(users[1].email, "bob@other.example");
        let users = parse_passwd_file(&text, Some("@example.org")).unwrap();
        assert_eq!(users[0].email, "alice@example.org");
        let e = parse_passwd_file(&text, None).unwrap_err().to_string();
        assert_eq!(e, "line 1: user name `alice` has no @domain (give a default domain to add one)");
        for bad in ["", "@", "a@b", "exa mple.org", "x:y"] {
            let e = parse_passwd_file(&text, Some(bad)).unwrap_err().to_string();
            assert!(e.contains("is not a domain name"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_bad_line_is_reported_and_nothing_is_returned() {
        let text = format!(
            "alice@example.org:{BLF}\n\
             bob@example.org:{{MD5-CRYPT}}$1$abcdefgh$abcdefghijklmnopqrstuv\n\
             no-domain:{BLF}\n\
             ALICE@example.org:{SSHA512}\n\
             carol@example.org:{{BLF-CRYPT}}$2y$05$short\n\
             :{BLF}\n\
             justaname\n\
             dave@example.org:\n\
             a b@example.org:{BLF}\n\
             erin@example.org:{{PLAIN}}secret-plaintext\n\
             frank@example.org:{{NOSUCH}}x\n"
        );
        let e = parse_passwd_file(&text, None).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 9, "{e}");
        assert_eq!(lines[0], "line 2: user bob@example.org: unsupported password scheme {MD5-CRYPT}");
        assert!(lines[1].starts_with("line 3: user name `no-domain` has no @domain"));
        assert_eq!(lines[2], "line 4: duplicate user alice@example.org (also on line 1)");
        assert!(lines[3].starts_with("line 5: user carol@example.org: malformed bcrypt hash"), "{}", lines[3]);
        assert_eq!(lines[4], "line 6: empty user name");
        assert_eq!(lines[5], "line 7: no password field (expected user:{SCHEME}hash)");
        assert_eq!(lines[6], "line 8: user dave@example.org: empty password field");
        assert_eq!(lines[7], "line 9: `a b@example.org` is not an e-mail address");
        assert_eq!(lines[8], "line 11: user frank@example.org: unsupported password scheme {NOSUCH}");
        // No password material in the message.
        assert!(!e.contains("secret-plaintext") && !e.contains("abcdefgh") && !e.contains("A4jb"), "{e}");
    }

    #[test]
    fn duplicate_after_a_bad_password_is_still_a_duplicate() {
        let text = format!("a@x.org:{{NOSUCH}}x\na@x.org:{BLF}\n");
        let e = parse_passwd_file(&text, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "line 1: user a@x.org: unsupported password scheme {NOSUCH}\nline 2: duplicate user a@x.org (also on line 1)"
        );
    }

    #[test]
    fn at_most_twenty_bad_lines_are_named() {
        let text: String = (0..25).map(|i| format!("user{i}@example.org:{{NOSUCH}}x\n")).collect();
        let e = parse_passwd_file(&text, None).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), MAX_REPORTED + 1);
        assert!(lines[19].starts_with("line 20: "));
        assert_eq!(lines[20], "… and 5 more bad lines");
    }

    #[test]
    fn a_single_bad_line_among_good_ones_fails_the_whole_file() {
        let mut text = mixed_file();
        text.push_str("zed@example.org:{SSHA}NuVG1g6CcyooT4kJGyqmk6CLQimsUklD\n");
        let e = parse_passwd_file(&text, None).unwrap_err().to_string();
        assert_eq!(e, "line 11: user zed@example.org: unsupported password scheme {SSHA}");
    }
}
