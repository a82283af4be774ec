//! SASL PLAIN (RFC 4616) and LOGIN payload decoding, shared by IMAP and SMTP.
//!
//! Hand-written on purpose: PLAIN is "split on NUL" and LOGIN is two base64 strings;
//! a SASL framework (rsasl) would bring far more than it saves.

use crate::secret::SecretBytes;

/// Longest username or password accepted in a SASL exchange. RFC 4616 requires 255;
/// anything longer than this is refused before any password hashing.
pub const MAX_FIELD: usize = 1024;

/// How a client proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mechanism {
    /// A password: account password or app password (LOGIN, PLAIN, USER/PASS).
    #[default]
    Password,
    /// An OAuth 2.0 bearer token (SASL XOAUTH2 or OAUTHBEARER, RFC 7628); `password`
    /// holds the access token.
    Bearer,
}

/// Credentials as a client sent them.
#[derive(Debug)]
pub struct Credentials {
    /// The login name (authentication identity).
    pub username: String,
    /// The password, app password or (with [`Mechanism::Bearer`]) access token.
    pub password: SecretBytes,
    /// What `password` is.
    pub mechanism: Mechanism,
}

impl Credentials {
    /// A user name and a password (account password or app password).
    pub fn password(username: String, password: SecretBytes) -> Credentials {
        Credentials { username, password, mechanism: Mechanism::Password }
    }
}

/// Why a SASL payload was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not the PLAIN structure (exactly two NULs), an empty field, a field too long,
    /// or a username that is not UTF-8 / holds control characters.
    #[error("malformed SASL payload")]
    Malformed,
    /// The client asked to act as another user (authzid ≠ authcid).
    #[error("authorization identity not allowed")]
    AuthzidRefused,
}

/// Encodes a PLAIN message (RFC 4616) as base64: `authzid NUL authcid NUL passwd`.
/// An empty `authzid` logs in as `authcid` itself; a master login sets it to the user.
/// The clear message is wiped once encoded.
pub fn encode_plain(authzid: &str, authcid: &str, password: &crate::secret::SecretString) -> String {
    let mut msg = Vec::with_capacity(authzid.len() + authcid.len() + password.expose().len() + 2);
    msg.extend_from_slice(authzid.as_bytes());
    msg.push(0);
    msg.extend_from_slice(authcid.as_bytes());
    msg.push(0);
    msg.extend_from_slice(password.expose().as_bytes());
    let out = crate::proto::imap::base64(&msg);
    zeroize::Zeroize::zeroize(&mut msg);
    out
}

/// Decodes a PLAIN message `authzid NUL authcid NUL passwd`.
/// An authzid equal to the authcid is the same as an empty one; any other is refused.
pub fn decode_plain(msg: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = msg.splitn(4, |b| *b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let username = check_username(authcid)?;
    if password.is_empty() || password.len() > MAX_FIELD {
        return Err(SaslError::Malformed);
    }
    if !authzid.is_empty() && authzid != authcid {
        if authzid.len() > MAX_FIELD {
            return Err(SaslError::Malformed);
        }
        return Err(SaslError::AuthzidRefused);
    }
    Ok(Credentials::password(username, password.to_vec().into()))
}

/// Checks a username from LOGIN / AUTHENTICATE: UTF-8, no control characters, bounded.
pub fn check_username(raw: &[u8]) -> Result<String, SaslError> {
    if raw.is_empty() || raw.len() > MAX_FIELD {
        return Err(SaslError::Malformed);
    }
    let s = std::str::from_utf8(raw).map_err(|_| SaslError::Malformed)?;
    if s.chars().any(|c| c.is_control()) {
        return Err(SaslError::Malformed);
    }
    Ok(s.to_string())
}

/// Checks a password from LOGIN / AUTH LOGIN: non-empty, bounded, no NUL.
pub fn check_password(raw: &[u8]) -> Result<SecretBytes, SaslError> {
    if raw.is_empty() || raw.len() > MAX_FIELD || raw.contains(&0) {
        return Err(SaslError::Malformed);
    }
    Ok(raw.to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_table() {
        let ok = decode_plain(b"\0alice\0pw").unwrap();
        assert_eq!(ok.username, "alice");
        assert_eq!(ok.password.expose(), b"pw");
        assert_eq!(decode_plain(b"alice\0alice\0pw").unwrap().username, "alice");
        for bad in [&b"alice\0pw"[..], b"a\0b\0c\0d", b"\0\0pw", b"\0alice\0", b"", b"\0al\x01ice\0pw", b"\0\xff\0pw"] {
            assert_eq!(decode_plain(bad).unwrap_err(), SaslError::Malformed, "{bad:?}");
        }
        assert_eq!(decode_plain(b"victim\0attacker\0pw").unwrap_err(), SaslError::AuthzidRefused);
    }

    #[test]
    fn plain_field_limits() {
        let mut m = b"\0".to_vec();
        m.extend(vec![b'u'; 255]);
        m.push(0);
        m.extend(vec![b'p'; 255]);
        assert!(decode_plain(&m).is_ok());
        let mut m = b"\0u\0".to_vec();
        m.extend(vec![b'p'; MAX_FIELD + 1]);
        assert_eq!(decode_plain(&m).unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn debug_hides_password() {
        let c = decode_plain(b"\0alice\0sup3rsecret").unwrap();
        assert!(!format!("{c:?}").contains("sup3rsecret"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: crate::proto::fuzz_cases(2048),
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// SASL PLAIN decoding of arbitrary bytes: never panics; what it accepts has a
        /// clean username and exactly the bytes after the second NUL as password.
        #[test]
        fn prop_decode_plain_arbitrary(
            msg in proptest::collection::vec(
                proptest::prop_oneof![proptest::prelude::Just(0u8), proptest::prelude::any::<u8>(), b'a'..=b'z'],
                0..300,
            )
        ) {
            if let Ok(c) = decode_plain(&msg) {
                proptest::prop_assert!(!c.username.is_empty());
                proptest::prop_assert!(!c.username.chars().any(char::is_control), "{:?}", c.username);
                let pw = msg.rsplit(|b| *b == 0).next().unwrap_or_default();
                proptest::prop_assert_eq!(c.password.expose(), pw);
            }
        }
    }
}
