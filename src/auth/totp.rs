//! TOTP secrets (RFC 6238: SHA-1, 6 digits, 30 s) and their otpauth:// URIs.
//! Verification with replay protection belongs to the web step.

use crate::auth::crypto::SecretKey;
use crate::secret::Secret;
use totp_rs::{Builder, Secret as TotpSecret};

/// A secret ready to store, with the URI to show once.
pub struct Enrolment {
    /// Sealed secret for [`crate::store::TotpState::secret_enc`].
    pub sealed: String,
    /// `otpauth://totp/<issuer>:<account>?secret=…`
    pub uri: Secret<String>,
}

/// Makes (or imports, from base32) a TOTP secret for `account`, sealed with `key`.
pub fn enrol(key: &SecretKey, issuer: &str, account: &str, base32: Option<&str>) -> Result<Enrolment, String> {
    let secret = match base32 {
        Some(b32) => TotpSecret::try_from_base32(b32.trim().replace(' ', "").to_ascii_uppercase())
            .map_err(|_| "the secret is not valid base32".to_string())?,
        None => TotpSecret::generate(),
    };
    let raw = Secret::new(secret.as_ref().to_vec());
    let totp = Builder::new()
        .with_secret(secret)
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .map_err(|e| format!("cannot use this TOTP secret: {e}"))?;
    let uri = totp.to_url().map_err(|e| format!("cannot make the otpauth URI: {e}"))?;
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
