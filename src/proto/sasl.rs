//! SASL PLAIN (RFC 4616) and LOGIN payload decoding, shared by IMAP and SMTP, and the
//! two bearer-token mechanisms of OAuth 2.0 mail logins: XOAUTH2 (Google's) and
//! OAUTHBEARER (RFC 7628), with the error challenge a refused token gets.
//!
//! Hand-written on purpose: PLAIN is "split on NUL", LOGIN is two base64 strings and the
//! bearer mechanisms are a few `key=value` fields between `\x01`s; a SASL framework
//! (rsasl) would bring far more than it saves.

use crate::secret::SecretBytes;

/// Longest username or password accepted in a SASL exchange. RFC 4616 requires 255;
/// anything longer than this is refused before any password hashing.
pub const MAX_FIELD: usize = 1024;

/// Longest access token accepted in XOAUTH2 / OAUTHBEARER: mailgate's own tokens are far
/// shorter, and 4 KiB leaves room for the longest tokens seen in the wild (Microsoft's
/// run to about 2.5 KB) while keeping the whole SASL line under every front's limit.
pub const MAX_TOKEN: usize = 4096;

/// Longest bearer message (XOAUTH2 or OAUTHBEARER, decoded): the user name, the token and
/// the few other fields OAUTHBEARER carries (`host`, `port`).
pub const MAX_BEARER_MESSAGE: usize = MAX_FIELD + MAX_TOKEN + 1024;

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

    /// A user name (empty: OAUTHBEARER without an authzid, the token names the account)
    /// and an OAuth 2.0 access token.
    pub fn bearer(username: String, token: SecretBytes) -> Credentials {
        Credentials { username, password: token, mechanism: Mechanism::Bearer }
    }
}

/// Which bearer-token mechanism a client used; they differ in their message and in the
/// error challenge a refused token gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerMechanism {
    /// Google's `XOAUTH2`: `user=USER ^A auth=Bearer TOKEN ^A ^A`. What Thunderbird sends.
    XOAuth2,
    /// RFC 7628 `OAUTHBEARER`: a GS2 header, then `^A`-separated `key=value` pairs.
    OAuthBearer,
}

impl BearerMechanism {
    /// The mechanism's name, as the capability lists spell it.
    pub fn name(self) -> &'static str {
        match self {
            BearerMechanism::XOAuth2 => "XOAUTH2",
            BearerMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The mechanism named `name` (any case), if it is one of the two.
    pub fn from_name(name: &[u8]) -> Option<BearerMechanism> {
        if name.eq_ignore_ascii_case(b"XOAUTH2") {
            Some(BearerMechanism::XOAuth2)
        } else if name.eq_ignore_ascii_case(b"OAUTHBEARER") {
            Some(BearerMechanism::OAuthBearer)
        } else {
            None
        }
    }

    /// Decodes this mechanism's client message.
    pub fn decode(self, msg: &[u8]) -> Result<Credentials, SaslError> {
        match self {
            BearerMechanism::XOAuth2 => decode_xoauth2(msg),
            BearerMechanism::OAuthBearer => decode_oauthbearer(msg),
        }
    }
}

/// The mail ports take OAuth 2.0 access tokens (`[oauth] enabled`): what a front needs to
/// offer the bearer mechanisms and to word a refused token's error challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthOffer {
    /// The RFC 8414 authorization server metadata URL, named in OAUTHBEARER's error
    /// (`"openid-configuration"`, RFC 7628 §3.2.2) so a client can find where to get a
    /// new token.
    pub metadata_url: String,
}

impl OAuthOffer {
    /// The error challenge for a token refused in `mechanism`, base64 as it goes on the
    /// wire (RFC 7628 §3.2.2 for OAUTHBEARER, Google's form for XOAUTH2).
    pub fn error_challenge(&self, mechanism: BearerMechanism) -> String {
        crate::proto::imap::base64(bearer_error_json(mechanism, &self.metadata_url).as_bytes())
    }
}

/// The JSON error a refused token gets before the final failure. OAUTHBEARER:
/// `{"status":"invalid_token","scope":"mail","openid-configuration":URL}` (RFC 7628
/// §3.2.2); XOAUTH2: Google's `{"status":"401","schemes":"Bearer","scope":"mail"}`.
pub fn bearer_error_json(mechanism: BearerMechanism, metadata_url: &str) -> String {
    match mechanism {
        BearerMechanism::XOAuth2 => r#"{"status":"401","schemes":"Bearer","scope":"mail"}"#.to_string(),
        BearerMechanism::OAuthBearer => format!(
            r#"{{"status":"invalid_token","scope":"mail","openid-configuration":"{}"}}"#,
            json_escape(metadata_url)
        ),
    }
}

/// `s` as the inside of a JSON string: `"` and `\` escaped, control characters as `\uXXXX`.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
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

/// Decodes an XOAUTH2 message: `user=USER ^A auth=Bearer TOKEN ^A ^A` (Google's
/// format, what Thunderbird sends). Strict: exactly those two fields in that order, a
/// clean user name ([`check_username`]) and a token of printable ASCII no longer than
/// [`MAX_TOKEN`]. The token goes in `password`, marked [`Mechanism::Bearer`].
pub fn decode_xoauth2(msg: &[u8]) -> Result<Credentials, SaslError> {
    if msg.len() > MAX_BEARER_MESSAGE {
        return Err(SaslError::Malformed);
    }
    let body = msg.strip_suffix(b"\x01\x01").ok_or(SaslError::Malformed)?;
    let mut fields = body.split(|b| *b == 0x01);
    let (Some(user), Some(auth), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(SaslError::Malformed);
    };
    let username = check_username(user.strip_prefix(b"user=").ok_or(SaslError::Malformed)?)?;
    let token = bearer_token(auth.strip_prefix(b"auth=").ok_or(SaslError::Malformed)?)?;
    Ok(Credentials::bearer(username, token))
}

/// Decodes an OAUTHBEARER message (RFC 7628 §3.1): the GS2 header `n,a=USER,` (or `y,`;
/// channel binding `p=` is not supported), then `^A`, `key=value ^A` pairs of which
/// `auth=Bearer TOKEN` is required (`host`, `port` and others are read and ignored), and
/// a final `^A`. The authzid's `=2C` and `=3D` stand for `,` and `=`. Without an authzid
/// the user name is empty: the token alone names the account (RFC 7628 §3.1), and
/// `Authenticator::verify` takes it from there.
pub fn decode_oauthbearer(msg: &[u8]) -> Result<Credentials, SaslError> {
    if msg.len() > MAX_BEARER_MESSAGE {
        return Err(SaslError::Malformed);
    }
    let mut header = msg.splitn(3, |b| *b == b',');
    let (Some(flag), Some(authzid), Some(rest)) = (header.next(), header.next(), header.next()) else {
        return Err(SaslError::Malformed);
    };
    if flag != b"n" && flag != b"y" {
        return Err(SaslError::Malformed);
    }
    let username = match authzid {
        b"" => String::new(),
        a => check_username(&saslname(a.strip_prefix(b"a=").ok_or(SaslError::Malformed)?)?)?,
    };
    let pairs = rest.strip_prefix(b"\x01").and_then(|r| r.strip_suffix(b"\x01\x01")).ok_or(SaslError::Malformed)?;
    let mut token = None;
    for pair in pairs.split(|b| *b == 0x01) {
        let eq = pair.iter().position(|b| *b == b'=').ok_or(SaslError::Malformed)?;
        let (key, value) = (&pair[..eq], &pair[eq + 1..]);
        let value_ok = value.iter().all(|b| b.is_ascii_graphic() || matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) || !value_ok {
            return Err(SaslError::Malformed);
        }
        if key == b"auth" {
            if token.is_some() {
                return Err(SaslError::Malformed);
            }
            token = Some(bearer_token(value)?);
        }
    }
    Ok(Credentials::bearer(username, token.ok_or(SaslError::Malformed)?))
}

/// An RFC 5801 saslname: `=2C` is `,`, `=3D` is `=`; any other `=` is malformed.
fn saslname(raw: &[u8]) -> Result<Vec<u8>, SaslError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'=' {
            match raw.get(i + 1..i + 3) {
                Some(b"2C" | b"2c") => out.push(b','),
                Some(b"3D" | b"3d") => out.push(b'='),
                _ => return Err(SaslError::Malformed),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// The token of an `auth=` value `Bearer TOKEN` (the scheme in any case, RFC 7235 §2.1):
/// non-empty, printable ASCII without spaces, at most [`MAX_TOKEN`] octets.
fn bearer_token(value: &[u8]) -> Result<SecretBytes, SaslError> {
    let (scheme, token) = match value.iter().position(|b| *b == b' ') {
        Some(sp) => (&value[..sp], &value[sp + 1..]),
        None => return Err(SaslError::Malformed),
    };
    if !scheme.eq_ignore_ascii_case(b"Bearer")
        || token.is_empty()
        || token.len() > MAX_TOKEN
        || !token.iter().all(u8::is_ascii_graphic)
    {
        return Err(SaslError::Malformed);
    }
    Ok(token.to_vec().into())
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

    fn token_of(c: &Credentials) -> &[u8] {
        assert_eq!(c.mechanism, Mechanism::Bearer);
        c.password.expose()
    }

    #[test]
    fn xoauth2_table() {
        let c = decode_xoauth2(b"user=alice@example.com\x01auth=Bearer tok.en-_~+/=\x01\x01").unwrap();
        assert_eq!(c.username, "alice@example.com");
        assert_eq!(token_of(&c), b"tok.en-_~+/=");
        // The scheme in any case.
        assert_eq!(token_of(&decode_xoauth2(b"user=a\x01auth=bearer t\x01\x01").unwrap()), b"t");
        for bad in [
            &b""[..],
            b"\x01\x01",
            b"user=a\x01auth=Bearer t\x01",             // one ^A at the end
            b"user=a\x01auth=Bearer t",                 // none
            b"auth=Bearer t\x01user=a\x01\x01",         // fields swapped
            b"user=\x01auth=Bearer t\x01\x01",          // empty user
            b"user=a\x01auth=Bearer \x01\x01",          // empty token
            b"user=a\x01auth=Bearer\x01\x01",           // no token
            b"user=a\x01auth=Basic dDp0\x01\x01",       // another scheme
            b"user=a\x01auth=Bearer t t\x01\x01",       // a space in the token
            b"user=a\x01auth=Bearer t\x7f\x01\x01",     // not printable
            b"user=a\x01auth=Bearer t\x01x=y\x01\x01",  // a third field
            b"user=a\x01auth=Bearer t\x01\x01\x01",     // trailing ^A
            b"user=al\x00ice\x01auth=Bearer t\x01\x01", // a control in the user
            b"user=\xff\x01auth=Bearer t\x01\x01",      // not UTF-8
            b"usr=a\x01auth=Bearer t\x01\x01",
        ] {
            assert_eq!(decode_xoauth2(bad).unwrap_err(), SaslError::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn oauthbearer_table() {
        let c = decode_oauthbearer(
            b"n,a=alice@example.com,\x01host=mail.example.com\x01port=993\x01auth=Bearer tok\x01\x01",
        )
        .unwrap();
        assert_eq!((c.username.as_str(), token_of(&c)), ("alice@example.com", &b"tok"[..]));
        // Only auth; `y` flag; escapes in the authzid.
        let c = decode_oauthbearer(b"y,a=we=2Cird=3Dname,\x01auth=Bearer tok\x01\x01").unwrap();
        assert_eq!(c.username, "we,ird=name");
        // No authzid: the token names the account.
        let c = decode_oauthbearer(b"n,,\x01auth=Bearer tok\x01\x01").unwrap();
        assert_eq!((c.username.as_str(), token_of(&c)), ("", &b"tok"[..]));
        for bad in [
            &b""[..],
            b"n,a=alice,",
            b"n,a=alice,\x01\x01",                               // no auth
            b"n,a=alice,\x01auth=Bearer tok\x01",                // no final ^A
            b"n,a=alice,auth=Bearer tok\x01\x01",                // no ^A after the header
            b"p=tls-unique,a=alice,\x01auth=Bearer tok\x01\x01", // channel binding
            b"x,a=alice,\x01auth=Bearer tok\x01\x01",
            b"n,alice,\x01auth=Bearer tok\x01\x01",                     // no a=
            b"n,a=,\x01auth=Bearer tok\x01\x01",                        // empty authzid
            b"n,a=al=2Xice,\x01auth=Bearer tok\x01\x01",                // a bad escape
            b"n,a=alice=,\x01auth=Bearer tok\x01\x01",                  // a cut escape
            b"n,a=alice,\x01auth=Bearer tok\x01auth=Bearer t2\x01\x01", // auth twice
            b"n,a=alice,\x01auth=Bearer \x01\x01",                      // empty token
            b"n,a=alice,\x01auth=Basic tok\x01\x01",
            b"n,a=alice,\x01host\x01auth=Bearer tok\x01\x01", // a pair without =
            b"n,a=alice,\x01h0st=x\x01auth=Bearer tok\x01\x01", // a key that is not alphabetic
            b"n,a=alice,\x01=x\x01auth=Bearer tok\x01\x01",   // an empty key
            b"n,a=alice,\x01host=\x00\x01auth=Bearer tok\x01\x01", // a control in a value
        ] {
            assert_eq!(decode_oauthbearer(bad).unwrap_err(), SaslError::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn bearer_limits() {
        let msg = |n: usize| [&b"user=a\x01auth=Bearer "[..], &vec![b't'; n], b"\x01\x01"].concat();
        assert_eq!(token_of(&decode_xoauth2(&msg(MAX_TOKEN)).unwrap()).len(), MAX_TOKEN);
        assert_eq!(decode_xoauth2(&msg(MAX_TOKEN + 1)).unwrap_err(), SaslError::Malformed);
        let long_user = [&b"user="[..], &vec![b'u'; MAX_FIELD + 1], b"\x01auth=Bearer t\x01\x01"].concat();
        assert_eq!(decode_xoauth2(&long_user).unwrap_err(), SaslError::Malformed);
        let ob = |n: usize| [&b"n,a=a,\x01host="[..], &vec![b'h'; n], b"\x01auth=Bearer t\x01\x01"].concat();
        assert!(decode_oauthbearer(&ob(100)).is_ok());
        assert_eq!(decode_oauthbearer(&ob(MAX_BEARER_MESSAGE)).unwrap_err(), SaslError::Malformed);
    }

    #[test]
    fn bearer_debug_hides_the_token() {
        let c = decode_xoauth2(b"user=alice\x01auth=Bearer s3cr3t-t0ken\x01\x01").unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let c = decode_oauthbearer(b"n,a=alice,\x01auth=Bearer s3cr3t-t0ken\x01\x01").unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn error_challenges() {
        let offer =
            OAuthOffer { metadata_url: "https://mail.example.com/.well-known/oauth-authorization-server".into() };
        let decode = |s: String| {
            String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, s).unwrap()).unwrap()
        };
        assert_eq!(
            decode(offer.error_challenge(BearerMechanism::OAuthBearer)),
            r#"{"status":"invalid_token","scope":"mail","openid-configuration":"https://mail.example.com/.well-known/oauth-authorization-server"}"#
        );
        assert_eq!(
            decode(offer.error_challenge(BearerMechanism::XOAuth2)),
            r#"{"status":"401","schemes":"Bearer","scope":"mail"}"#
        );
        // A URL with a quote or a backslash stays one JSON string.
        assert_eq!(
            bearer_error_json(BearerMechanism::OAuthBearer, "https://x/\"\\\n"),
            r#"{"status":"invalid_token","scope":"mail","openid-configuration":"https://x/\"\\\u000a"}"#
        );
        assert_eq!(BearerMechanism::from_name(b"xoauth2"), Some(BearerMechanism::XOAuth2));
        assert_eq!(BearerMechanism::from_name(b"OAuthBearer"), Some(BearerMechanism::OAuthBearer));
        assert_eq!(BearerMechanism::from_name(b"PLAIN"), None);
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

        /// XOAUTH2 and OAUTHBEARER decoding of arbitrary bytes (biased to their
        /// alphabet): never panics; what they accept is a bearer credential with a clean
        /// user name and a bounded, printable token.
        #[test]
        fn prop_decode_bearer_arbitrary(
            msg in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(1u8), proptest::prelude::Just(b'='), proptest::prelude::Just(b','),
                    proptest::prelude::Just(b' '), proptest::prelude::any::<u8>(), b'a'..=b'z'
                ],
                0..300,
            ),
            prefix in proptest::prelude::prop::sample::select(vec![
                &b""[..], b"user=a\x01auth=Bearer ", b"n,a=a,\x01auth=Bearer ", b"n,,\x01", b"y,a=x=2C,\x01host="
            ]),
        ) {
            let msg = [prefix, msg.as_slice()].concat();
            for c in [decode_xoauth2(&msg), decode_oauthbearer(&msg)].into_iter().flatten() {
                proptest::prop_assert_eq!(c.mechanism, Mechanism::Bearer);
                proptest::prop_assert!(!c.username.chars().any(char::is_control), "{:?}", c.username);
                let t = c.password.expose();
                proptest::prop_assert!(!t.is_empty() && t.len() <= MAX_TOKEN);
                proptest::prop_assert!(t.iter().all(u8::is_ascii_graphic));
            }
        }
    }
}
