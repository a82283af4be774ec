//! Encryption at rest of TOTP secrets, with a key kept outside the store.
//!
//! The key is 32 random bytes in `data_dir/secret.key` (mode 0600), made by
//! `mailgate init` or at first start. Secrets are sealed with AES-256-GCM (aws-lc-rs,
//! the same crypto library as rustls) with a random 96-bit nonce: `base64(nonce || ct)`.

use crate::secret::Secret;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use std::path::{Path, PathBuf};

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

/// Why the secret key could not be loaded or made. The texts name the file, never the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The OS gave no random bytes for a new key.
    #[error("no OS randomness: {0}")]
    NoRandomness(getrandom::Error),
    /// A new key file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The key file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The key file holds no usable key.
    #[error("{}: {error}", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its bytes.
        error: BadKey,
    },
}

/// Bytes that are not a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadKey {
    /// Not 32 bytes.
    #[error("secret key must be 32 bytes")]
    Length,
    /// aws-lc-rs refused them.
    #[error("invalid secret key")]
    Refused,
}

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The OS gave no random bytes for the nonce.
    #[error("no OS randomness: {0}")]
    NoRandomness(getrandom::Error),
    /// AES-GCM refused to seal (cannot happen with a valid key and a short value).
    #[error("encryption failed")]
    Encrypt,
    /// Not base64, or shorter than a nonce.
    #[error("corrupt sealed value")]
    Corrupt,
    /// The tag does not match: another key, another context, or a changed value.
    #[error("cannot decrypt (wrong key or corrupt value)")]
    Decrypt,
}

impl SecretKey {
    /// Loads the key file, creating it (0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, KeyError> {
        if !path.exists() {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(KeyError::NoRandomness)?;
            crate::fsutil::write_private(path, &bytes)
                .map_err(|error| KeyError::Write { path: path.to_path_buf(), error })?;
        }
        let bytes =
            Secret::new(std::fs::read(path).map_err(|error| KeyError::Read { path: path.to_path_buf(), error })?);
        Self::from_bytes(bytes.expose()).map_err(|error| KeyError::Invalid { path: path.to_path_buf(), error })
    }

    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SecretKey, BadKey> {
        if bytes.len() != 32 {
            return Err(BadKey::Length);
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| BadKey::Refused)?;
        let derive = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes);
        let tag_key = aws_lc_rs::hmac::sign(&derive, b"mailgate: tags of failed secrets");
        Ok(SecretKey {
            aead: LessSafeKey::new(key),
            tags: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, tag_key.as_ref()),
        })
    }

    /// Seals `plain`; `context` (the username) is bound as associated data, so a sealed
    /// value copied to another account does not open.
    pub fn seal(&self, plain: &[u8], context: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(SealError::NoRandomness)?;
        let mut buf = plain.to_vec();
        self.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| SealError::Encrypt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Opens a value made by [`SecretKey::seal`].
    pub fn open(&self, sealed: &str, context: &str) -> Result<Secret<Vec<u8>>, SealError> {
        let raw = base64::engine::general_purpose::STANDARD.decode(sealed).map_err(|_| SealError::Corrupt)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Corrupt)?;
        let mut buf = ct.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| SealError::Decrypt)?
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
