//! Encryption at rest of TOTP secrets, with a key kept outside the store.
//!
//! The key is 32 random bytes in `data_dir/secret.key` (mode 0600), made by
//! `mailgate init` or at first start. Secrets are sealed with AES-256-GCM (aws-lc-rs,
//! the same crypto library as rustls) with a random 96-bit nonce: `base64(nonce || ct)`.

use crate::secret::Secret;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use std::path::Path;

/// The key that seals TOTP secrets (and, with a store shared by several nodes, web
/// sessions), and a key derived from it for tags the nodes must agree on.
pub struct SecretKey {
    aead: LessSafeKey,
    tags: aws_lc_rs::hmac::Key,
}

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
        let derive = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes);
        let tag_key = aws_lc_rs::hmac::sign(&derive, b"mailgate: tags of failed secrets");
        Ok(SecretKey {
            aead: LessSafeKey::new(key),
            tags: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, tag_key.as_ref()),
        })
    }

    /// Seals `plain`; `context` (the username) is bound as associated data, so a sealed
    /// value copied to another account does not open.
    pub fn seal(&self, plain: &[u8], context: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| format!("no OS randomness: {e}"))?;
        let mut buf = plain.to_vec();
        self.aead
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
            .aead
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| "cannot decrypt (wrong key or corrupt value)".to_string())?
            .to_vec();
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(Secret::new(plain))
    }
}

impl SecretKey {
    /// HMAC-SHA256 of `parts` (each length-prefixed) under a key derived from this one:
    /// the same on every node with the same `secret.key`, and nothing an attacker who
    /// reads the database can test password guesses against.
    pub fn tag(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.tags);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign().as_ref().to_vec()
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
