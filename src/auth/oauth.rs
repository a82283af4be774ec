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

/// The scope string of a grant's scopes, as token responses state it.
pub fn oauth_scope_string(scopes: &[Scope]) -> String {
    scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
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
