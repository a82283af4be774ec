//! TOTP secrets (RFC 6238: SHA-1, 6 digits, 30 s) and their otpauth:// URIs.
//! Replay protection (a step later than the last accepted one) is the account service's.

use crate::secret::SecretString;
use totp_rs::Builder;

/// The otpauth:// URI of a TOTP secret (`otpauth://totp/<issuer>:<account>?secret=…`), as
/// authenticator apps read it from a QR code: the one builder for the CLI and the web step.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> Result<SecretString, totp_rs::TotpError> {
    let totp =
        Builder::new().with_secret(secret.to_vec()).with_issuer(Some(issuer)).with_account_name(account).build()?;
    Ok(SecretString::from(totp.to_url()?))
}

#[cfg(test)]
mod uri_tests {
    use super::*;

    #[test]
    fn the_uri_names_issuer_account_and_secret() {
        let secret = totp_rs::Secret::try_from_base32("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP").unwrap();
        let uri = otpauth_uri("mail.example.com", "alice@example.com", secret.as_bytes()).unwrap();
        assert!(uri.expose().starts_with("otpauth://totp/mail.example.com:alice%40example.com?"));
        assert!(uri.expose().contains("secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"));
        assert!(otpauth_uri("x", "a@x", &[1; 10]).is_err(), "80 bits are too few");
    }
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
