//! OAuth 2.0 tokens: mailgate as the authorization server of mail apps (`[oauth]`).
//!
//! A *grant* (one mail app signed in through the browser) is an app-password record
//! with [`crate::store::AppPasswordRecord::oauth`] set, so it is listed, revoked, counted
//! and ends its live sessions exactly like an app password. Formats (all ASCII, safe in
//! URLs, SASL and JSON):
//!
//! * authorization code: sealed with `secret.key` (client, redirect URI, PKCE challenge,
//!   user, scopes, expiry, nonce); single use through the store's atomic attempt budget
//!   keyed by its nonce, so two nodes cannot both redeem it;
//! * access token `mgat1.<grant id>.<expiry>.<tag>`: HMAC under `secret.key`, checked
//!   without a hash and then against the grant record (a revoked grant's tokens stop at
//!   once);
//! * refresh token `mgrt1.<grant id>.<generation>.<secret>`: only its SHA-256 is stored;
//!   each use rotates it (generation + 1); a retired one presented again revokes the
//!   grant (RFC 9700 §4.14.2).

use crate::secret::SecretString;
use crate::store::Scope;

/// Prefix of access tokens.
pub const ACCESS_PREFIX: &str = "mgat1.";
/// Prefix of refresh tokens.
pub const REFRESH_PREFIX: &str = "mgrt1.";

/// What a token response carries (RFC 6749 §5.1).
pub struct Tokens {
    /// The access token (a bearer credential for the mail ports).
    pub access_token: SecretString,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// The new refresh token (rotated on every use).
    pub refresh_token: SecretString,
    /// The granted scope, space-separated (RFC 6749 §3.3).
    pub scope: String,
    /// The grant's public id (its row in the device list).
    pub grant_id: String,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("grant_id", &self.grant_id).field("scope", &self.scope).finish_non_exhaustive()
    }
}

/// A scope string (RFC 6749 §3.3) mailgate does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope `{0}` (expected mail, imap, smtp, pop3 or sieve)")]
pub struct InvalidScope(pub String);

/// The mail scopes a requested OAuth scope string names: `mail` is IMAP and SMTP;
/// `imap`, `smtp`, `pop3`, `sieve` name one each; empty means `mail`.
pub fn scopes_from_oauth(scope: &str) -> Result<Vec<Scope>, InvalidScope> {
    let mut out = Vec::new();
    for word in scope.split(' ').filter(|w| !w.is_empty()) {
        match word {
            "mail" => out.extend([Scope::Imap, Scope::Smtp]),
            w => out.push(w.parse::<Scope>().map_err(|_| InvalidScope(w.chars().take(64).collect()))?),
        }
    }
    if out.is_empty() {
        out.extend([Scope::Imap, Scope::Smtp]);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The scope string of a grant's scopes, as token responses state it: IMAP and SMTP
/// together are `mail`, the scope mail apps ask for (the add-on's and autoconfig's), so a
/// grant of what was asked is answered in the words it was asked in. Thunderbird files
/// its refresh token under the scope of the response and looks it up under the one it
/// asked for: answering `imap smtp` to `mail` made it lose the token after every sign-in.
pub fn oauth_scope_string(scopes: &[Scope]) -> String {
    let mail = scopes.contains(&Scope::Imap) && scopes.contains(&Scope::Smtp);
    let mut words: Vec<&str> = if mail { vec!["mail"] } else { vec![] };
    words.extend(scopes.iter().filter(|s| !mail || !matches!(s, Scope::Imap | Scope::Smtp)).map(|s| s.as_str()));
    words.join(" ")
}

/// An authorization request the web step has checked (client known, redirect allowed,
/// PKCE S256 challenge present) and the person has approved.
#[derive(Debug, Clone)]
pub struct Approved {
    /// `client_id`.
    pub client_id: String,
    /// `redirect_uri` exactly as sent (bound into the code).
    pub redirect_uri: String,
    /// PKCE `code_challenge` (S256, base64url without padding).
    pub code_challenge: String,
    /// The scopes granted.
    pub scopes: Vec<Scope>,
}

/// Where a token request comes from, for the device list.
#[derive(Debug, Clone)]
pub struct Requester {
    /// Client address.
    pub ip: std::net::IpAddr,
    /// `User-Agent`, if sent (shortened).
    pub user_agent: Option<String>,
}

/// Why a token request or a token was refused. Token endpoint answers: `invalid_grant`
/// for [`OAuthError::InvalidGrant`], `invalid_client` for [`OAuthError::InvalidClient`],
/// a 503 for [`OAuthError::Unavailable`].
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// Unknown, expired, used or mismatched code / refresh token, or a PKCE mismatch.
    #[error("invalid grant")]
    InvalidGrant,
    /// The client is not the one the code or token was issued to.
    #[error("invalid client")]
    InvalidClient,
    /// The store could not answer; try again.
    #[error("temporarily unavailable")]
    Unavailable,
}

// ----------------------------------------------------------------------------------
// Token formats

use crate::auth::crypto::SecretKey;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Longest token or code accepted anywhere (they are far shorter; bounds the work).
pub const MAX_TOKEN: usize = 4096;
/// Refresh tokens retired by rotation that are still recognised (a replay of one
/// revokes the grant).
pub const RETIRED_KEPT: usize = 8;

/// Hex SHA-256 of a token (what a grant stores of its refresh token).
pub fn token_hash(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new refresh token for grant `id`, generation `generation`.
pub fn new_refresh_token(id: &str, generation: u32) -> Result<SecretString, getrandom::Error> {
    let secret = crate::auth::app_password::random_chars(32)?;
    Ok(format!("{REFRESH_PREFIX}{id}.{generation}.{secret}").into())
}

/// The grant id and generation a refresh token names, if it has the shape of one.
pub fn parse_refresh_token(token: &str) -> Option<(String, u32)> {
    if token.len() > MAX_TOKEN {
        return None;
    }
    let mut parts = token.strip_prefix(REFRESH_PREFIX)?.split('.');
    let (Some(id), Some(generation), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let ok_id = id.len() == crate::auth::app_password::ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok_id || secret.len() != 32 || generation.len() > 10 {
        return None;
    }
    Some((id.to_string(), generation.parse().ok()?))
}

fn access_tag(key: &SecretKey, id: &str, username: &str, expires: u64) -> String {
    let tag = key.tag(&[b"oauth access token", id.as_bytes(), username.as_bytes(), &expires.to_be_bytes()]);
    URL_SAFE_NO_PAD.encode(&tag[..24])
}

/// An access token for grant `id` of `username`, good until `expires` (unix seconds).
pub fn new_access_token(key: &SecretKey, id: &str, username: &str, expires: u64) -> SecretString {
    format!("{ACCESS_PREFIX}{id}.{expires}.{}", access_tag(key, id, username, expires)).into()
}

/// Why an access token was not accepted (all are answered alike on the mail ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRefused {
    /// Not the shape of a mailgate access token.
    Malformed,
    /// Not made by this server for this user.
    Forged,
    /// Past its expiry.
    Expired,
}

/// The grant id of a valid, unexpired access token of `username`, or why not. Checks
/// only the token itself; the caller checks the grant still exists.
pub fn check_access_token(key: &SecretKey, token: &[u8], username: &str, now: u64) -> Result<String, AccessRefused> {
    if token.len() > MAX_TOKEN {
        return Err(AccessRefused::Malformed);
    }
    let token = std::str::from_utf8(token).map_err(|_| AccessRefused::Malformed)?;
    let mut parts = token.strip_prefix(ACCESS_PREFIX).ok_or(AccessRefused::Malformed)?.split('.');
    let (Some(id), Some(expires), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AccessRefused::Malformed);
    };
    if id.len() != crate::auth::app_password::ID_LEN || expires.len() > 20 {
        return Err(AccessRefused::Malformed);
    }
    let expires: u64 = expires.parse().map_err(|_| AccessRefused::Malformed)?;
    let expected = access_tag(key, id, username, expires);
    if !crate::secret::ct_eq(expected.as_bytes(), tag.as_bytes()) {
        return Err(AccessRefused::Forged);
    }
    if expires <= now {
        return Err(AccessRefused::Expired);
    }
    Ok(id.to_string())
}

/// The grant id an access token names, if it has the shape of one (not checked).
pub fn grant_id_of(token: &[u8]) -> Option<String> {
    let token = std::str::from_utf8(token).ok()?.strip_prefix(ACCESS_PREFIX)?;
    let id = token.split('.').next()?;
    (id.len() == crate::auth::app_password::ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_string())
}

/// What an authorization code carries (sealed with `secret.key`, so it cannot be read
/// or made by anyone else).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CodeClaims {
    /// The account.
    pub user: String,
    /// `client_id`.
    pub client: String,
    /// `redirect_uri`.
    pub redirect: String,
    /// PKCE S256 challenge.
    pub challenge: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Expiry (unix seconds).
    pub expires: u64,
    /// Random: the key of its single use.
    pub nonce: String,
}

const CODE_CONTEXT: &str = "oauth authorization code";

/// Seals claims into a code (base64url, safe in a query string).
pub fn seal_code(key: &SecretKey, claims: &CodeClaims) -> Result<SecretString, crate::auth::crypto::SealError> {
    let json = serde_json::to_vec(claims).map_err(|_| crate::auth::crypto::SealError::Encrypt)?;
    let sealed = key.seal(&json, CODE_CONTEXT)?;
    Ok(sealed.replace('+', "-").replace('/', "_").trim_end_matches('=').to_string().into())
}

/// Opens a code made by [`seal_code`]; `None` for anything else.
pub fn open_code(key: &SecretKey, code: &str) -> Option<CodeClaims> {
    if code.len() > MAX_TOKEN || !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return None;
    }
    let mut std = code.replace('-', "+").replace('_', "/");
    while !std.len().is_multiple_of(4) {
        std.push('=');
    }
    let plain = key.open(&std, CODE_CONTEXT).ok()?;
    serde_json::from_slice(plain.expose()).ok()
}

/// Whether a PKCE `code_verifier` (RFC 7636 §4.1: 43–128 unreserved characters) matches
/// an S256 `code_challenge`.
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let shape = (43..=128).contains(&verifier.len())
        && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if !shape {
        return false;
    }
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    crate::secret::ct_eq(URL_SAFE_NO_PAD.encode(d.as_ref()).as_bytes(), challenge.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn access_tokens_check_out_only_for_their_user_and_until_expiry() {
        let k = key();
        let t = new_access_token(&k, "abcdef", "a@example.com", 1000);
        assert_eq!(check_access_token(&k, t.expose().as_bytes(), "a@example.com", 999), Ok("abcdef".into()));
        assert_eq!(check_access_token(&k, t.expose().as_bytes(), "a@example.com", 1000), Err(AccessRefused::Expired));
        assert_eq!(check_access_token(&k, t.expose().as_bytes(), "b@example.com", 10), Err(AccessRefused::Forged));
        let other = SecretKey::from_bytes(&[8u8; 32]).unwrap();
        assert_eq!(check_access_token(&other, t.expose().as_bytes(), "a@example.com", 10), Err(AccessRefused::Forged));
        // A later expiry written into the token breaks the tag.
        let stretched = t.expose().replace(".1000.", ".9999.");
        assert_eq!(check_access_token(&k, stretched.as_bytes(), "a@example.com", 10), Err(AccessRefused::Forged));
        for bad in ["", "mgat1.", "mgat1.abcdef.1000", "mgat1.abcdef.x.y", "Bearer x", "mgat1.a.b.c.d"] {
            assert_eq!(check_access_token(&k, bad.as_bytes(), "a@example.com", 10), Err(AccessRefused::Malformed));
        }
    }

    #[test]
    fn refresh_tokens_name_their_grant_and_generation() {
        let t = new_refresh_token("abcdef", 3).unwrap();
        assert_eq!(parse_refresh_token(t.expose()), Some(("abcdef".into(), 3)));
        assert_ne!(token_hash(t.expose()), token_hash(new_refresh_token("abcdef", 3).unwrap().expose()));
        for bad in ["", "mgrt1.abcdef.3", "mgrt1.abc.3.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "mgat1.abcdef.1.x"] {
            assert_eq!(parse_refresh_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn codes_open_only_with_the_key_and_untouched() {
        let k = key();
        let claims = CodeClaims {
            user: "a@example.com".into(),
            client: "thunderbird".into(),
            redirect: "http://localhost:1234".into(),
            challenge: "c".into(),
            scopes: vec![Scope::Imap],
            expires: 5,
            nonce: "n".into(),
        };
        let code = seal_code(&k, &claims).unwrap();
        assert!(code.expose().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = open_code(&k, code.expose()).unwrap();
        assert_eq!((back.user.as_str(), back.redirect.as_str()), ("a@example.com", "http://localhost:1234"));
        assert!(open_code(&SecretKey::from_bytes(&[8u8; 32]).unwrap(), code.expose()).is_none());
        let mut flipped = code.expose().clone().into_bytes();
        flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
        assert!(open_code(&k, std::str::from_utf8(&flipped).unwrap()).is_none());
    }

    #[test]
    fn scopes_are_stated_in_the_words_mail_apps_ask_in() {
        for asked in ["mail", "", "imap smtp", "smtp mail"] {
            assert_eq!(oauth_scope_string(&scopes_from_oauth(asked).unwrap()), "mail", "{asked}");
        }
        assert_eq!(oauth_scope_string(&scopes_from_oauth("mail pop3").unwrap()), "mail pop3");
        assert_eq!(oauth_scope_string(&scopes_from_oauth("imap").unwrap()), "imap");
        assert_eq!(oauth_scope_string(&scopes_from_oauth("sieve imap").unwrap()), "imap sieve");
        assert!(scopes_from_oauth("mail admin").is_err());
    }

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(pkce_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"));
        assert!(!pkce_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"));
        assert!(!pkce_matches("short", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"));
        // `plain` (the challenge is the verifier) is not S256.
        assert!(!pkce_matches(verifier, verifier));
    }
}
