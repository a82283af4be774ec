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

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash(password: &[u8]) -> Result<String, String> {
    hasher().hash_password(password).map(|h| h.to_string()).map_err(|e| format!("password hashing failed: {e}"))
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
    let hashed = if blocks <= MAX_REUSED_BLOCKS {
        BLOCKS.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else { return false };
            if buf.len() < blocks {
                buf.resize(blocks, Block::default());
            }
            argon2.hash_password_into_with_memory(password, salt.as_ref(), &mut out, &mut buf[..blocks]).is_ok()
        })
    } else {
        argon2.hash_password_into(password, salt.as_ref(), &mut out).is_ok()
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

#[cfg(test)]
mod tests {
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
