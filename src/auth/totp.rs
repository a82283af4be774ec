//! TOTP secrets (RFC 6238: SHA-1, 6 digits, 30 s) and their otpauth:// URIs.
//! Verification with replay protection belongs to the web step.

use crate::auth::crypto::{SealError, SecretKey};
use crate::secret::Secret;
use totp_rs::{Builder, Secret as TotpSecret};

/// A secret ready to store, with the URI to show once.
pub struct Enrolment {
    /// Sealed secret for [`crate::store::TotpState::secret_enc`].
    pub sealed: String,
    /// `otpauth://totp/<issuer>:<account>?secret=…`
    pub uri: Secret<String>,
}

/// Why a TOTP secret could not be made, imported or sealed.
#[derive(Debug, thiserror::Error)]
pub enum TotpError {
    /// The secret given is not base32.
    #[error("the secret is not valid base32")]
    NotBase32,
    /// totp-rs refused the secret (e.g. too short).
    #[error("cannot use this TOTP secret: {0}")]
    Unusable(totp_rs::TotpError),
    /// totp-rs could not make a fresh secret into a TOTP.
    #[error("cannot make a TOTP secret: {0}")]
    Make(totp_rs::TotpError),
    /// The otpauth URI could not be written.
    #[error("cannot make the otpauth URI: {0}")]
    Uri(totp_rs::TotpError),
    /// Sealing the secret failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Makes (or imports, from base32) a TOTP secret for `account`, sealed with `key`.
pub fn enrol(key: &SecretKey, issuer: &str, account: &str, base32: Option<&str>) -> Result<Enrolment, TotpError> {
    let secret = match base32 {
        Some(b32) => TotpSecret::try_from_base32(b32.trim().replace(' ', "").to_ascii_uppercase())
            .map_err(|_| TotpError::NotBase32)?,
        None => TotpSecret::generate(),
    };
    let raw = Secret::new(secret.as_ref().to_vec());
    let totp = Builder::new()
        .with_secret(secret)
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .map_err(TotpError::Unusable)?;
    let uri = totp.to_url().map_err(TotpError::Uri)?;
    Ok(Enrolment { sealed: key.seal(raw.expose(), account)?, uri: Secret::new(uri) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrol_generates_and_imports() {
        let key = SecretKey::from_bytes(&[1u8; 32]).unwrap();
        let e = enrol(&key, "mail.example.com", "alice@example.com", None).unwrap();
        assert!(e.uri.expose().starts_with("otpauth://totp/mail.example.com:alice%40example.com?"));
        let e = enrol(&key, "x", "a@x", Some("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")).unwrap();
        assert!(e.uri.expose().contains("secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"));
        assert_eq!(key.open(&e.sealed, "a@x").unwrap().expose().len(), 20);
        assert!(enrol(&key, "x", "a@x", Some("not base32!")).is_err());
    }
}

/// A fresh 160-bit TOTP secret for enrolment, as base32 (shown to the person) and the
/// otpauth:// URI (shown as a QR code).
pub fn new_secret(issuer: &str, account: &str) -> Result<(Secret<String>, Secret<String>), TotpError> {
    let secret = TotpSecret::generate();
    let b32 = secret.to_base32();
    let totp = Builder::new()
        .with_secret(secret)
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .map_err(TotpError::Make)?;
    let uri = totp.to_url().map_err(TotpError::Uri)?;
    Ok((Secret::new(b32), Secret::new(uri)))
}

/// The time step a 6-digit `code` is valid for at `now` (RFC 6238: SHA-1, 30 s, ±1 step),
/// for the raw `secret`. `None`: not valid. Replay protection is the caller's (only a step
/// later than the last accepted one may be accepted).
pub fn matching_step(secret: &[u8], code: &str, now: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = Builder::new().with_secret(secret.to_vec()).build_noncompliant();
    totp.check(code, now)
}

/// Seals a base32 secret for storage.
pub fn seal_base32(key: &SecretKey, account: &str, base32: &str) -> Result<String, TotpError> {
    let secret = TotpSecret::try_from_base32(base32).map_err(|_| TotpError::NotBase32)?;
    Ok(key.seal(secret.as_ref(), account)?)
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn window_is_plus_minus_one_step() {
        let secret = b"12345678901234567890";
        let totp = Builder::new().with_secret(secret.to_vec()).build_noncompliant();
        let t = 2_000_000_010u64; // past 2038 fits: 64-bit steps
        let code = totp.generate(t).to_string();
        let step = t / 30;
        assert_eq!(matching_step(secret, &code, t), Some(step));
        assert_eq!(matching_step(secret, &code, t + 30), Some(step));
        assert_eq!(matching_step(secret, &code, t - 30), Some(step));
        assert_eq!(matching_step(secret, &code, t + 60), None);
        assert_eq!(matching_step(secret, &code, t - 60), None);
        assert_eq!(matching_step(secret, "12345", t), None);
        assert_eq!(matching_step(secret, "abcdef", t), None);
        // RFC 6238 test vector (SHA-1, T = 59 s): 94287082 → last 6 digits.
        assert_eq!(matching_step(secret, "287082", 59), Some(1));
    }
}
