//! Server-side web sessions.

use crate::secret::SecretString;
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::Mutex;

/// The session cookie (`__Host-`: Secure, Path=/, no Domain).
pub const COOKIE: &str = "__Host-mailgate";
/// Idle timeout (ASVS 4 / NIST rev 3: 30 min).
pub const IDLE_SECS: u64 = 30 * 60;
/// Absolute timeout (12 h).
pub const ABSOLUTE_SECS: u64 = 12 * 3600;
/// A password-checked, second-factor-pending sign-in expires after 5 minutes.
pub const SECOND_FACTOR_SECS: u64 = 5 * 60;
/// Changing factors or making app passwords needs a sign-in this recent.
pub const STEP_UP_SECS: u64 = 10 * 60;
/// Wrong codes in one pending sign-in before it is dropped.
pub const MAX_WRONG_CODES: u32 = 5;
/// A pending TOTP enrolment expires after 10 minutes.
pub const ENROL_SECS: u64 = 10 * 60;
/// Sessions kept at once (bounds memory; expired ones are purged first).
pub const MAX_SESSIONS: usize = 100_000;
/// Sessions that have not signed in yet (a visit to the sign-in page makes one). Past
/// this the oldest of them is dropped: a flood of page visits can never keep people
/// from signing in (it can at most make a slow visitor load the page again).
pub const MAX_ANONYMOUS: usize = 20_000;

/// Where a session is in the sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Nothing proven.
    Anonymous,
    /// The account password was right; a TOTP or backup code is needed.
    SecondFactor {
        /// The account.
        username: String,
        /// When the password was checked.
        since: u64,
    },
    /// Signed in.
    SignedIn {
        /// The account.
        username: String,
        /// When the last full sign-in happened (for step-up).
        auth_at: u64,
    },
}

/// One web session.
pub struct WebSession {
    /// Synchronizer token for forms.
    pub csrf: String,
    /// Created (unix seconds).
    pub created: u64,
    /// Last request.
    pub last_seen: u64,
    /// Sign-in stage.
    pub stage: Stage,
    /// TOTP secret being enrolled (base32) and when it was made.
    pub pending_totp: Option<(SecretString, u64)>,
    /// Backup codes just made, for the download link (cleared on sign-out or a new set).
    pub shown_codes: Option<Vec<SecretString>>,
    /// Wrong second-factor codes in this sign-in.
    pub wrong_codes: u32,
    /// A message for the next page.
    pub notice: Option<String>,
}

/// A random token: 32 bytes, base64url.
pub fn token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// All web sessions, in memory (a restart signs everyone out).
#[derive(Default)]
pub struct WebSessions {
    map: Mutex<HashMap<String, WebSession>>,
}

impl WebSessions {
    /// Makes a session; returns its id. `None` if no randomness or too many sessions.
    pub fn create(&self, now: u64) -> Option<String> {
        let id = token()?;
        let csrf = token()?;
        let mut m = self.map.lock().ok()?;
        if m.len() >= MAX_SESSIONS {
            m.retain(|_, s| !expired(s, now));
        }
        let anonymous = || m.values().filter(|s| s.stage == Stage::Anonymous).count();
        if m.len() >= MAX_SESSIONS || anonymous() >= MAX_ANONYMOUS {
            let oldest = m
                .iter()
                .filter(|(_, s)| s.stage == Stage::Anonymous)
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    m.remove(&k);
                }
                None => return None,
            }
        }
        m.insert(
            id.clone(),
            WebSession {
                csrf,
                created: now,
                last_seen: now,
                stage: Stage::Anonymous,
                pending_totp: None,
                shown_codes: None,
                wrong_codes: 0,
                notice: None,
            },
        );
        Some(id)
    }

    /// Runs `f` on a live session (touching it); `None` if unknown or expired (then removed).
    pub fn with<T>(&self, id: &str, now: u64, f: impl FnOnce(&mut WebSession) -> T) -> Option<T> {
        let mut m = self.map.lock().ok()?;
        let s = m.get_mut(id)?;
        if expired(s, now) {
            m.remove(id);
            return None;
        }
        s.last_seen = now;
        Some(f(s))
    }

    /// Gives the session a new id (after each sign-in step); the old id stops working.
    pub fn rotate(&self, id: &str) -> Option<String> {
        let new = token()?;
        let mut m = self.map.lock().ok()?;
        let s = m.remove(id)?;
        m.insert(new.clone(), s);
        Some(new)
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(id);
        }
    }

    /// Ends every web session of `username` except `keep` (password change, 2FA change).
    pub fn end_all_of(&self, username: &str, keep: Option<&str>) {
        if let Ok(mut m) = self.map.lock() {
            m.retain(|id, s| {
                Some(id.as_str()) == keep
                    || !matches!(&s.stage, Stage::SignedIn { username: u, .. } | Stage::SecondFactor { username: u, .. } if u == username)
            });
        }
    }
}

fn expired(s: &WebSession, now: u64) -> bool {
    let pending_too_old =
        matches!(s.stage, Stage::SecondFactor { since, .. } if now.saturating_sub(since) > SECOND_FACTOR_SECS);
    now.saturating_sub(s.last_seen) > IDLE_SECS || now.saturating_sub(s.created) > ABSOLUTE_SECS || pending_too_old
}
