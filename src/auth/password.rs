//! Password hashing: argon2id with the OWASP parameters (m = 19 MiB, t = 2, p = 1).

use argon2::password_hash::{PasswordHasher, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::sync::OnceLock;

fn hasher() -> Argon2<'static> {
    // OWASP Password Storage Cheat Sheet, first choice. These constants are valid
    // parameters; `Params::DEFAULT` is the same set and the fallback.
    let params = Params::new(19_456, 2, 1, None).unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Why a password could not be hashed (no randomness for the salt, or argon2 refused).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The OS gave no random bytes for the salt.
    #[error("no random salt: {0}")]
    NoSalt(getrandom::Error),
    /// argon2 failed (in this thread's reused working memory).
    #[error("password hashing failed: {0}")]
    Argon2(argon2::Error),
    /// argon2 failed (in its own working memory).
    #[error("password hashing failed: {0}")]
    Phc(argon2::password_hash::Error),
}

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`), in this
/// thread's reused working memory (see [`BLOCKS`]).
pub fn hash(password: &[u8]) -> Result<String, HashError> {
    use base64::Engine as _;
    let argon2 = hasher();
    let params = argon2.params().clone();
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(HashError::NoSalt)?;
    let mut out = [0u8; 32];
    let hashed = with_blocks(params.block_count(), |blocks| {
        argon2.hash_password_into_with_memory(password, &salt, &mut out, blocks)
    });
    match hashed {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(HashError::Argon2(e)),
        None => {
            // Re-entered on this thread (cannot happen): fall back to a buffer of its own.
            return hasher().hash_password(password).map(|h| h.to_string()).map_err(HashError::Phc);
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let phc = format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        b64.encode(salt),
        b64.encode(out)
    );
    zeroize::Zeroize::zeroize(&mut out);
    Ok(phc)
}

/// Allocates this thread's argon2 working memory now (a hashing thread at start), so the
/// process's memory is flat from the start instead of growing by 19 MiB on the first
/// logins, and the first logins do not pay the page faults (about 3 ms each).
pub fn reserve_working_memory() {
    let _ = with_blocks(hasher().params().block_count(), |_| ());
}

/// Runs `f` with this thread's reused argon2 working memory of `blocks` blocks;
/// `None` if it is already in use on this thread or too large to keep.
fn with_blocks<R>(blocks: usize, f: impl FnOnce(&mut [Block]) -> R) -> Option<R> {
    if blocks > MAX_REUSED_BLOCKS {
        return None;
    }
    BLOCKS.with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        if buf.len() < blocks {
            buf.resize(blocks, Block::default());
        }
        Some(f(&mut buf[..blocks]))
    })
}

/// Largest argon2 memory (in 1 KiB blocks) kept in a thread's reusable buffer (64 MiB);
/// hashes with more memory still verify, with a buffer of their own.
const MAX_REUSED_BLOCKS: usize = 64 * 1024;

thread_local! {
    /// argon2's working memory, reused by every check on this thread. Allocating 19 MiB per
    /// login and freeing it lets glibc keep a copy per thread arena (RSS grew ~19 MiB per
    /// login up to ~0.5 GB); a reused buffer keeps memory at one block set per hashing thread.
    static BLOCKS: std::cell::RefCell<Vec<Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Password hashes evaluated on this thread (tests count the work of one check).
    static EVALUATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// argon2 evaluations made so far by the calling thread.
pub fn evaluations_on_this_thread() -> u64 {
    EVALUATIONS.with(|c| c.get())
}

/// Checks a password against a PHC string in constant time. A malformed hash never matches.
pub fn verify(password: &[u8], phc: &str) -> bool {
    EVALUATIONS.with(|c| c.set(c.get() + 1));
    let Ok(parsed) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else { return false };
    let Ok(params) = Params::try_from(&parsed) else { return false };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else { return false };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.as_bytes().len()];
    let hashed = match with_blocks(blocks, |buf| {
        argon2.hash_password_into_with_memory(password, salt.as_ref(), &mut out, buf).is_ok()
    }) {
        Some(ok) => ok,
        None => argon2.hash_password_into(password, salt.as_ref(), &mut out).is_ok(),
    };
    let ok = hashed && crate::secret::ct_eq(&out, expected.as_bytes());
    zeroize::Zeroize::zeroize(&mut out);
    ok
}

/// Does the same work as a real check, for unknown users (equal timing).
pub fn dummy_verify(password: &[u8]) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = DUMMY.get_or_init(|| hash(b"mailgate-dummy-password").unwrap_or_default());
    let _ = verify(password, phc);
}

/// The fewest characters (Unicode scalar values) an account password may have. Without a
/// second factor the account password opens IMAP and SMTP on its own, and NIST SP
/// 800-63B-4 §3.1.1.2 asks for at least 15 characters for such a password. One rule for
/// the CLI and the web page, whether or not the account has 2FA today.
pub const MIN_CHARS: usize = 15;

/// The most bytes an account password may have: what one SASL field carries
/// (`proto::sasl::MAX_FIELD`), so that every password that can be set can be sent.
pub const MAX_BYTES: usize = 1024;

/// Why a new account password was refused by [`policy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Fewer than [`MIN_CHARS`] characters.
    #[error("the password must have at least {min} characters")]
    TooShort {
        /// The minimum ([`MIN_CHARS`]).
        min: usize,
    },
    /// More than [`MAX_BYTES`] bytes.
    #[error("the password is too long (at most {max} bytes)")]
    TooLong {
        /// The maximum ([`MAX_BYTES`]).
        max: usize,
    },
    /// On the list of common passwords, or a repetition, a run or a keyboard walk.
    #[error(
        "the password is too easy to guess (a common password, a repetition or a keyboard sequence); choose another"
    )]
    Common,
}

impl PolicyError {
    /// The refusal as one sentence for a person on the web page.
    pub fn sentence(&self) -> &'static str {
        match self {
            PolicyError::TooShort { .. } => "Choose a password of at least 15 characters.",
            PolicyError::TooLong { .. } => "That password is too long.",
            PolicyError::Common => {
                "That password is too easy to guess (a common password, a repetition or a keyboard sequence). Choose another."
            }
        }
    }
}

/// The one rule for a new account password, used by the CLI (`user add --password`,
/// `user passwd`) and the web page's password change: at least [`MIN_CHARS`] characters,
/// at most [`MAX_BYTES`] bytes, and not a common password (NIST SP 800-63B-4 §3.1.1.2: a
/// blocklist of commonly used values, repetitive or sequential characters, and the
/// service's name). No composition rules. Imported hashes are not checked (they are
/// passwords people already have, and mailgate cannot read them).
pub fn policy(password: &str) -> Result<(), PolicyError> {
    if password.len() > MAX_BYTES {
        return Err(PolicyError::TooLong { max: MAX_BYTES });
    }
    if password.chars().count() < MIN_CHARS {
        return Err(PolicyError::TooShort { min: MIN_CHARS });
    }
    if is_common(password) { Err(PolicyError::Common) } else { Ok(()) }
}

/// The common-password check. The normal form is the password in lower case, `@` read as
/// `a` and `$` as `s`, letters and digits only; its core is that without digits at either
/// end. Common: the core is empty or on the embedded list (`common_passwords.txt`), also
/// with digits read as letters (`passw0rd`); the normal form has fewer than 4 different
/// characters; or the normal form or the core repeats a shorter part or is a piece of an
/// alphabetic, numeric or keyboard sequence.
fn is_common(password: &str) -> bool {
    let normal: String = password
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| match c {
            '@' => 'a',
            '$' => 's',
            c => c,
        })
        .filter(|c| c.is_alphanumeric())
        .collect();
    let core = normal.trim_matches(|c: char| c.is_ascii_digit());
    let letters: String = core
        .chars()
        .map(|c| match c {
            '0' => 'o',
            '1' => 'i',
            '3' => 'e',
            '4' => 'a',
            '5' => 's',
            '7' => 't',
            c => c,
        })
        .collect();
    if core.is_empty() || common_list().any(|w| w == core || w == letters) {
        return true;
    }
    let distinct: std::collections::BTreeSet<char> = normal.chars().collect();
    distinct.len() < 4 || [normal.as_str(), core].iter().any(|s| repeats(s) || in_sequence(s))
}

/// The embedded list, in normal form, without comments.
fn common_list() -> impl Iterator<Item = &'static str> {
    include_str!("common_passwords.txt").lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// `s` is a shorter part written again and again ("abcabcabc", "passwordpassword"); a
/// last partial copy counts too ("abcabcab").
fn repeats(s: &str) -> bool {
    let c: Vec<char> = s.chars().collect();
    (1..=c.len() / 2).any(|unit| c.iter().enumerate().all(|(i, ch)| c.get(i % unit) == Some(ch)))
}

/// Sequences people type as passwords: the alphabet and the digits (forwards, backwards,
/// wrapping round), the keyboard's rows and columns (QWERTY, AZERTY, QWERTZ).
const SEQUENCES: &[&str] = &[
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz",
    "12345678901234567890123456789012345678901234567890",
    "qwertyuiopasdfghjklzxcvbnmqwertyuiopasdfghjklzxcvbnm",
    "azertyuiopqsdfghjklmwxcvbnazertyuiopqsdfghjklmwxcvbn",
    "qwertzuiopasdfghjklyxcvbnmqwertzuiopasdfghjklyxcvbnm",
    "1234567890qwertyuiopasdfghjklzxcvbnm",
    "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p1qaz2wsx3edc4rfv",
    "qazwsxedcrfvtgbyhnujmikolpqazwsxedcrfvtgbyhnujmikolp",
    "zaq12wsxcde34rfvbgt56yhnmju78iklo90pzaq12wsxcde34rfv",
    "1q2w3e4r5t6y7u8i9o0p1q2w3e4r5t6y7u8i9o0p",
    "q1w2e3r4t5y6u7i8o9p0q1w2e3r4t5y6u7i8o9p0",
    "a1b2c3d4e5f6g7h8i9j0a1b2c3d4e5f6g7h8i9j0",
];

/// `s` is a piece of one of [`SEQUENCES`], forwards or backwards.
fn in_sequence(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let back: String = s.chars().rev().collect();
    SEQUENCES.iter().any(|q| q.contains(s) || q.contains(back.as_str()))
}

#[cfg(test)]
mod tests {
    use super::{MAX_BYTES, MIN_CHARS, PolicyError, policy};

    /// The one password rule (CLI and web): 15 characters, 1024 bytes, no common ones.
    #[test]
    fn the_policy_refuses_short_long_and_common_passwords() {
        assert_eq!(MAX_BYTES, crate::proto::sasl::MAX_FIELD, "a password that can be set can be sent");
        assert_eq!(MIN_CHARS, 15);
        for ok in [
            "alice-account-pw",
            "correct horse battery staple on a boat",
            "Tr0ub4dor&3-with-more",
            "ünïcödé-pässwörd",
            "8 glasses of water, at 7",
            "carol-local-pass-9",
        ] {
            assert_eq!(policy(ok), Ok(()), "{ok}");
        }
        assert_eq!(policy("fourteen-chars"), Err(PolicyError::TooShort { min: 15 }));
        // Characters, not bytes: 14 two-byte characters are still too few.
        assert_eq!(policy(&"é".repeat(14)), Err(PolicyError::TooShort { min: 15 }));
        assert_eq!(policy(&"x".repeat(1025)), Err(PolicyError::TooLong { max: 1024 }));
        for common in [
            "passwordpassword",
            "Password1234567!",
            "P@ssw0rd-123456789",
            "123456789012345",
            "0987654321098765",
            "abcdefghijklmnop",
            "ponmlkjihgfedcba",
            "qwertyuiopasdfgh",
            "1qaz2wsx3edc4rfv",
            "1q2w3e4r5t6y7u8i",
            "aaaaaaaaaaaaaaaa",
            "ababababababababab",
            "abcabcabcabcabca",
            "iloveyou-iloveyou",
            "correcthorsebatterystaple",
            "Correct Horse Battery Staple",
            "The quick brown fox",
            "mailgate-123456789",
            "L3tMe1n-123456789",
            "!!!!!!!!!!!!!!!!",
            "111111111111111111",
        ] {
            assert_eq!(policy(common), Err(PolicyError::Common), "{common}");
        }
        // The messages: for the CLI and for the web page.
        assert_eq!(PolicyError::TooShort { min: 15 }.to_string(), "the password must have at least 15 characters");
        assert_eq!(PolicyError::TooShort { min: 15 }.sentence(), "Choose a password of at least 15 characters.");
        assert!(PolicyError::Common.sentence().contains("too easy to guess"));
    }

    use argon2::password_hash::PasswordHasher;
    use argon2::{Algorithm, Argon2, Params, Version};

    #[test]
    fn round_trip() {
        let h = super::hash(b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(super::verify(b"correct horse", &h));
        assert!(!super::verify(b"wrong", &h));
        assert!(!super::verify(b"x", "not a phc string"));
        // Hashes made with other parameters (and by other tools) still verify.
        let other = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(8192, 3, 1, None).unwrap())
            .hash_password(b"pw")
            .unwrap()
            .to_string();
        assert!(super::verify(b"pw", &other));
        assert!(!super::verify(b"pw2", &other));
        let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, Params::new(4096, 2, 1, None).unwrap())
            .hash_password(b"pw")
            .unwrap()
            .to_string();
        assert!(super::verify(b"pw", &argon2i));
    }
}
