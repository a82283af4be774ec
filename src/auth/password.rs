//! Password hashing: argon2id with the OWASP parameters (m = 19 MiB, t = 2, p = 1).

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};
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

/// Checks a password against a PHC string in constant time. A malformed hash never matches.
pub fn verify(password: &[u8], phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => hasher().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Does the same work as a real check, for unknown users (equal timing).
pub fn dummy_verify(password: &[u8]) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let phc = DUMMY.get_or_init(|| hash(b"mailgate-dummy-password").unwrap_or_default());
    let _ = verify(password, phc);
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let h = super::hash(b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(super::verify(b"correct horse", &h));
        assert!(!super::verify(b"wrong", &h));
        assert!(!super::verify(b"x", "not a phc string"));
    }
}
