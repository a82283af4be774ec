//! Encryption at rest of TOTP secrets, with a key kept outside the store.
//!
//! The key is 32 random bytes in `data_dir/secret.key` (mode 0600), made by
//! `mailgate init` or at first start. Secrets are sealed with AES-256-GCM (aws-lc-rs,
//! the same crypto library as rustls) with a random 96-bit nonce: `base64(nonce || ct)`.

use crate::secret::Secret;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use std::path::Path;

/// The key that seals TOTP secrets.
pub struct SecretKey(LessSafeKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

impl SecretKey {
    /// Loads the key file, creating it (0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, String> {
        if !path.exists() {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| format!("no OS randomness: {e}"))?;
            crate::fsutil::write_private(path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        let bytes = Secret::new(std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?);
        Self::from_bytes(bytes.expose()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SecretKey, String> {
        if bytes.len() != 32 {
            return Err("secret key must be 32 bytes".into());
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "invalid secret key".to_string())?;
        Ok(SecretKey(LessSafeKey::new(key)))
    }

    /// Seals `plain`; `context` (the username) is bound as associated data, so a sealed
    /// value copied to another account does not open.
    pub fn seal(&self, plain: &[u8], context: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| format!("no OS randomness: {e}"))?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| "encryption failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Opens a value made by [`SecretKey::seal`].
    pub fn open(&self, sealed: &str, context: &str) -> Result<Secret<Vec<u8>>, String> {
        let raw = base64::engine::general_purpose::STANDARD.decode(sealed).map_err(|_| "corrupt sealed value")?;
        if raw.len() < NONCE_LEN {
            return Err("corrupt sealed value".into());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "corrupt sealed value")?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| "cannot decrypt (wrong key or corrupt value)".to_string())?
            .to_vec();
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(Secret::new(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open() {
        let k = SecretKey::from_bytes(&[7u8; 32]).unwrap();
        let s = k.seal(b"totp-seed", "alice").unwrap();
        assert!(!s.contains("totp"));
        assert_eq!(k.open(&s, "alice").unwrap().expose(), b"totp-seed");
        assert!(k.open(&s, "bob").is_err());
        assert!(SecretKey::from_bytes(&[8u8; 32]).unwrap().open(&s, "alice").is_err());
    }
}
