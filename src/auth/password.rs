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

/// Hashes a password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`), in this
/// thread's reused working memory (see [`BLOCKS`]).
pub fn hash(password: &[u8]) -> Result<String, String> {
    use base64::Engine as _;
    let argon2 = hasher();
    let params = argon2.params().clone();
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no random salt: {e}"))?;
    let mut out = [0u8; 32];
    let hashed = with_blocks(params.block_count(), |blocks| {
        argon2.hash_password_into_with_memory(password, &salt, &mut out, blocks)
    });
    match hashed {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(format!("password hashing failed: {e}")),
        None => {
            // Re-entered on this thread (cannot happen): fall back to a buffer of its own.
            return hasher()
                .hash_password(password)
                .map(|h| h.to_string())
                .map_err(|e| format!("password hashing failed: {e}"));
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
