//! Server-side web sessions: in memory on one node, in the store when nodes share it.

use crate::addr::client_key;
use crate::auth::crypto::SecretKey;
use crate::secret::SecretString;
use crate::store::{Store, WebSessionRow};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zeroize::{Zeroize, Zeroizing};

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
/// An OAuth authorization request waits this long for its sign-in and consent.
pub const AUTHORIZE_SECS: u64 = 10 * 60;
/// Sessions kept at once (bounds memory; expired ones are purged first).
pub const MAX_SESSIONS: usize = 100_000;
/// Sessions that have not signed in yet (a visit to the sign-in page makes one). Past
/// this the oldest of them is dropped: a flood of page visits can never keep people
/// from signing in (it can at most make a slow visitor load the page again).
pub const MAX_ANONYMOUS: usize = 20_000;
/// Sessions not signed in yet from one client (an IPv4 address or an IPv6 prefix, see
/// [`crate::addr`]). Past this, that client's own least recently seen one is dropped, so a
/// flood of page visits from one address only churns its own sessions and never pushes out
/// a visitor from another address still typing. 64 leaves room for many people behind one
/// NAT opening the page within the 30-minute idle time; one who is pushed out by them just
/// loads the page again.
pub const MAX_ANONYMOUS_PER_CLIENT: usize = 64;

/// Where a session is in the sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, PartialEq)]
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
    /// Codes of this pending sign-in that were compared and found wrong (unlike
    /// `wrong_codes`, which counts the slots taken): if the sign-in then succeeds, they
    /// were the person's own typos, and the security notice leaves them out.
    pub failed_codes: u32,
    /// A message for the next page.
    pub notice: Option<String>,
    /// The key of the client that opened the session ([`client_key`]), for the cap on
    /// anonymous sessions per client. `None` for a shared session stored before keys were.
    pub client: Option<IpAddr>,
    /// A checked OAuth authorization request waiting for the sign-in and the consent
    /// (kept here, on the server, so that nothing an attacker puts in a URL decides where
    /// the browser is sent after the sign-in).
    pub oauth: Option<PendingAuthorization>,
}

/// An OAuth authorization request (`GET /oauth/authorize`) whose client and redirect URI
/// were checked, waiting in the web session for the sign-in and the consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingAuthorization {
    /// Random; the consent form carries it, so a consent given on one page cannot approve
    /// a request that replaced it meanwhile (another tab, another app).
    pub id: String,
    /// `client_id` (a configured client).
    pub client_id: String,
    /// `redirect_uri`, allowed for that client.
    pub redirect_uri: String,
    /// `state`, echoed back.
    pub state: Option<String>,
    /// PKCE S256 `code_challenge`.
    pub code_challenge: String,
    /// The scopes asked for.
    pub scopes: Vec<crate::store::Scope>,
    /// `login_hint`: pre-fills the sign-in form.
    pub login_hint: Option<String>,
    /// When it arrived (unix seconds); it is dropped after [`AUTHORIZE_SECS`].
    pub at: u64,
}

impl WebSession {
    fn new(csrf: String, now: u64, client: IpAddr) -> WebSession {
        WebSession {
            csrf,
            created: now,
            last_seen: now,
            stage: Stage::Anonymous,
            pending_totp: None,
            shown_codes: None,
            wrong_codes: 0,
            failed_codes: 0,
            notice: None,
            client: Some(client),
            oauth: None,
        }
    }

    /// The account whose password was checked in this session, if any.
    fn username(&self) -> Option<&str> {
        match &self.stage {
            Stage::Anonymous => None,
            Stage::SecondFactor { username, .. } | Stage::SignedIn { username, .. } => Some(username),
        }
    }

    /// When the session ends at the latest, if no request comes.
    fn expires_at(&self) -> u64 {
        let mut at = self.last_seen.saturating_add(IDLE_SECS).min(self.created.saturating_add(ABSOLUTE_SECS));
        if let Stage::SecondFactor { since, .. } = self.stage {
            at = at.min(since.saturating_add(SECOND_FACTOR_SECS));
        }
        at
    }
}

/// A random token: 32 bytes, base64url.
pub fn token() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// A shared store writes a session again for a request that changes nothing only when
/// its last write is this old (the idle timeout is 30 minutes).
const TOUCH_SECS: u64 = 30;
/// Rounds of read-change-compare-and-set when requests of one browser change its
/// session at the same time.
const CAS_ROUNDS: usize = 16;
/// A shared store purges expired sessions and caps anonymous ones on one new session in
/// this many (the cap query scans the anonymous sessions), so between purges each node may
/// add this many more than [`MAX_ANONYMOUS`]. The cap per client
/// ([`MAX_ANONYMOUS_PER_CLIENT`]) is applied on every new session: it reads only that
/// client's sessions.
const PURGE_EVERY: u64 = 32;
/// Associated data of a sealed session.
const SEAL_CONTEXT: &str = "mailgate web session";

/// The web sessions: in memory on a single node (a restart signs everyone out), or in
/// the store when it is shared by several nodes ([`Store::web_sessions`]), so that any
/// node serves any request.
pub struct WebSessions {
    backend: Backend,
    /// IPv6 clients are one client per prefix of this length (`[limits] ipv6_prefix`).
    v6_prefix: u8,
}

enum Backend {
    Memory(Mutex<HashMap<String, WebSession>>),
    Shared { store: Arc<dyn Store>, key: Arc<SecretKey>, creates: AtomicU64 },
}

impl Default for WebSessions {
    fn default() -> Self {
        WebSessions { backend: Backend::Memory(Mutex::default()), v6_prefix: crate::addr::DEFAULT_IPV6_PREFIX }
    }
}

impl WebSessions {
    /// Sessions in `store` if it shares them with other nodes, else in memory. `key`
    /// seals what a shared store keeps.
    pub fn new(store: Arc<dyn Store>, key: Arc<SecretKey>) -> WebSessions {
        if store.web_sessions().is_some() {
            WebSessions {
                backend: Backend::Shared { store, key, creates: AtomicU64::new(0) },
                v6_prefix: crate::addr::DEFAULT_IPV6_PREFIX,
            }
        } else {
            WebSessions::default()
        }
    }

    /// Counts IPv6 clients per prefix of `bits` (`[limits] ipv6_prefix`; default 64).
    pub fn with_ipv6_prefix(mut self, bits: u8) -> WebSessions {
        self.v6_prefix = bits;
        self
    }

    /// Makes a session for a request from `client`; returns its id. `None` if no
    /// randomness, too many sessions or the shared store failed. Past
    /// [`MAX_ANONYMOUS_PER_CLIENT`] anonymous sessions of the client, its least recently
    /// seen one goes; past [`MAX_ANONYMOUS`] in all, the least recently seen of all.
    pub fn create(&self, now: u64, client: IpAddr) -> Option<String> {
        let id = token()?;
        let client = client_key(client, self.v6_prefix);
        let session = WebSession::new(token()?, now, client);
        match &self.backend {
            Backend::Memory(map) => {
                let mut m = map.lock().ok()?;
                if m.len() >= MAX_SESSIONS {
                    m.retain(|_, s| !expired(s, now));
                }
                // One pass: the anonymous sessions in all and of this client, and the least
                // recently seen of each.
                let (mut anonymous, mut oldest) = (0, None::<(&String, u64)>);
                let (mut of_client, mut oldest_of_client) = (0, None::<(&String, u64)>);
                for (k, s) in m.iter().filter(|(_, s)| s.stage == Stage::Anonymous) {
                    anonymous += 1;
                    if oldest.is_none_or(|(_, seen)| s.last_seen < seen) {
                        oldest = Some((k, s.last_seen));
                    }
                    if s.client == Some(client) {
                        of_client += 1;
                        if oldest_of_client.is_none_or(|(_, seen)| s.last_seen < seen) {
                            oldest_of_client = Some((k, s.last_seen));
                        }
                    }
                }
                // The client's own first: then the total shrinks too, and no other
                // client's session goes for this one.
                let evict = if of_client >= MAX_ANONYMOUS_PER_CLIENT {
                    Some(oldest_of_client)
                } else if m.len() >= MAX_SESSIONS || anonymous >= MAX_ANONYMOUS {
                    Some(oldest)
                } else {
                    None
                };
                if let Some(evict) = evict {
                    // Full of signed-in sessions: no room.
                    let k = evict?.0.clone();
                    m.remove(&k);
                }
                m.insert(id.clone(), session);
            }
            Backend::Shared { store, key, creates } => {
                let row = seal(key, &session)?;
                let shared = store.web_sessions()?;
                let purge = (creates.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == 0).then_some(MAX_ANONYMOUS);
                if let Err(e) = shared.insert_web_session(&row_key(&id), &row, now, MAX_ANONYMOUS_PER_CLIENT, purge) {
                    tracing::warn!(error = %e, "cannot store a web session");
                    return None;
                }
            }
        }
        Some(id)
    }

    /// Runs `f` on a live session (touching it); `None` if unknown or expired (then
    /// removed). With a shared store, `f` runs again on the newer state if another
    /// request changed the session meanwhile.
    pub fn with<T>(&self, id: &str, now: u64, mut f: impl FnMut(&mut WebSession) -> T) -> Option<T> {
        let (store, key) = match &self.backend {
            Backend::Memory(map) => {
                let mut m = map.lock().ok()?;
                let s = m.get_mut(id)?;
                if expired(s, now) {
                    m.remove(id);
                    return None;
                }
                s.last_seen = now;
                return Some(f(s));
            }
            Backend::Shared { store, key, .. } => (store, key),
        };
        let shared = store.web_sessions()?;
        let row_key = row_key(id);
        for _ in 0..CAS_ROUNDS {
            let (row, version) = shared.get_web_session(&row_key).ok()??;
            let Some(before) = open(key, &row) else {
                tracing::warn!("a stored web session does not open (another secret.key?); ended");
                let _ = shared.delete_web_session(&row_key);
                return None;
            };
            if expired(&before, now) {
                let _ = shared.delete_web_session(&row_key);
                return None;
            }
            let mut s = before.clone();
            let out = f(&mut s);
            let changed = s != before;
            if !changed && now.saturating_sub(before.last_seen) < TOUCH_SECS {
                return Some(out);
            }
            s.last_seen = now;
            match shared.replace_web_session(&row_key, version, &seal(key, &s)?) {
                // A touch lost to another request's write loses nothing.
                Ok(true) => return Some(out),
                Ok(false) if !changed => return Some(out),
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store a web session");
                    return None;
                }
            }
        }
        None
    }

    /// Gives the session a new id (after each sign-in step); the old id stops working.
    pub fn rotate(&self, id: &str) -> Option<String> {
        let new = token()?;
        match &self.backend {
            Backend::Memory(map) => {
                let mut m = map.lock().ok()?;
                let s = m.remove(id)?;
                m.insert(new.clone(), s);
            }
            Backend::Shared { store, .. } => {
                if !store.web_sessions()?.rename_web_session(&row_key(id), &row_key(&new)).ok()? {
                    return None;
                }
            }
        }
        Some(new)
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        match &self.backend {
            Backend::Memory(map) => {
                if let Ok(mut m) = map.lock() {
                    m.remove(id);
                }
            }
            Backend::Shared { store, .. } => {
                if let Some(shared) = store.web_sessions()
                    && let Err(e) = shared.delete_web_session(&row_key(id))
                {
                    tracing::warn!(error = %e, "cannot end a web session");
                }
            }
        }
    }

    /// Ends every web session of `username` except `keep` (password change, 2FA change).
    pub fn end_all_of(&self, username: &str, keep: Option<&str>) {
        match &self.backend {
            Backend::Memory(map) => {
                if let Ok(mut m) = map.lock() {
                    m.retain(|id, s| Some(id.as_str()) == keep || s.username() != Some(username));
                }
            }
            Backend::Shared { store, .. } => {
                let keep = keep.map(row_key);
                if let Some(shared) = store.web_sessions()
                    && let Err(e) = shared.delete_web_sessions_of(username, keep.as_deref())
                {
                    tracing::warn!(error = %e, "cannot end the web sessions of an account");
                }
            }
        }
    }
}

/// The row key of a session id: SHA-256, hex.
fn row_key(id: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A session as stored (only ever sealed; wiped when dropped).
#[derive(Serialize, Deserialize)]
struct Stored {
    csrf: String,
    created: u64,
    last_seen: u64,
    stage: Stage,
    pending_totp: Option<(String, u64)>,
    shown_codes: Option<Vec<String>>,
    wrong_codes: u32,
    /// Absent in sessions stored before it was.
    #[serde(default)]
    failed_codes: u32,
    notice: Option<String>,
    /// Absent in sessions stored before OAuth.
    #[serde(default)]
    oauth: Option<PendingAuthorization>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        self.csrf.zeroize();
        if let Some((t, _)) = &mut self.pending_totp {
            t.zeroize();
        }
        if let Some(codes) = &mut self.shown_codes {
            codes.iter_mut().for_each(Zeroize::zeroize);
        }
    }
}

fn seal(key: &SecretKey, s: &WebSession) -> Option<WebSessionRow> {
    let stored = Stored {
        csrf: s.csrf.clone(),
        created: s.created,
        last_seen: s.last_seen,
        stage: s.stage.clone(),
        pending_totp: s.pending_totp.as_ref().map(|(t, at)| (t.expose().clone(), *at)),
        shown_codes: s.shown_codes.as_ref().map(|c| c.iter().map(|c| c.expose().clone()).collect()),
        wrong_codes: s.wrong_codes,
        failed_codes: s.failed_codes,
        notice: s.notice.clone(),
        oauth: s.oauth.clone(),
    };
    let json = Zeroizing::new(serde_json::to_vec(&stored).ok()?);
    Some(WebSessionRow {
        sealed: key.seal(&json, SEAL_CONTEXT).ok()?,
        username: s.username().map(str::to_string),
        anonymous: s.stage == Stage::Anonymous,
        client_key: s.client,
        last_seen: s.last_seen,
        expires_at: s.expires_at(),
    })
}

fn open(key: &SecretKey, row: &WebSessionRow) -> Option<WebSession> {
    let json = key.open(&row.sealed, SEAL_CONTEXT).ok()?;
    let mut stored: Stored = serde_json::from_slice(json.expose()).ok()?;
    Some(WebSession {
        csrf: std::mem::take(&mut stored.csrf),
        created: stored.created,
        last_seen: stored.last_seen,
        stage: stored.stage.clone(),
        pending_totp: stored.pending_totp.take().map(|(t, at)| (SecretString::from(t), at)),
        shown_codes: stored.shown_codes.take().map(|c| c.into_iter().map(SecretString::from).collect()),
        wrong_codes: stored.wrong_codes,
        failed_codes: stored.failed_codes,
        notice: stored.notice.take(),
        oauth: stored.oauth.take(),
        // Not sealed: the row keeps it in the clear, for the cap query.
        client: row.client_key,
    })
}

fn expired(s: &WebSession, now: u64) -> bool {
    let pending_too_old =
        matches!(s.stage, Stage::SecondFactor { since, .. } if now.saturating_sub(since) > SECOND_FACTOR_SECS);
    now.saturating_sub(s.last_seen) > IDLE_SECS || now.saturating_sub(s.created) > ABSOLUTE_SECS || pending_too_old
}
