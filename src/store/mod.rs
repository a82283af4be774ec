//! The store: accounts, app passwords, TOTP state and audit events.
//!
//! [`Store`] is the interface the rest of mailgate uses; [`sled_store::SledStore`] is the
//! embedded implementation and the only code that imports sled (a shared backend can
//! implement the same trait later). Values are JSON. Every change that is acknowledged
//! to a person (account, password, app password, TOTP changes) is flushed to disk before
//! the call returns; last-use updates and audit events are not (sled writes them within
//! 500 ms), so a login never waits for an fsync.

pub mod conformance;
pub mod pg_store;
pub mod sled_store;

use serde::{Deserialize, Serialize};

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// App passwords one account may hold (bounds the list and the cost of a login).
pub const MAX_APP_PASSWORDS: usize = 50;
/// Consecutive failed logins after which an account is locked (NIST SP 800-63B §5.2.2).
pub const MAX_FAILED_LOGINS: u32 = 100;
/// Consecutive wrong second-factor codes after which the account's web sign-in is locked.
pub const MAX_SECOND_FACTOR_FAILURES: u32 = 100;
/// Audit events kept per account (older ones are dropped).
pub const MAX_AUDIT_PER_ACCOUNT: usize = 1000;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database itself failed (disk, lock, corruption).
    #[error("store: {0}")]
    Backend(String),
    /// A record could not be decoded.
    #[error("store record {0} is corrupt")]
    Corrupt(String),
    /// The database was written by a different schema version.
    #[error("store schema version {found} is not supported by this mailgate (expects {SCHEMA_VERSION})")]
    Schema {
        /// Version found on disk.
        found: u32,
    },
    /// No such account / app password.
    #[error("{0}")]
    NotFound(String),
    /// Duplicate account / label.
    #[error("{0}")]
    Conflict(String),
    /// A limit was reached.
    #[error("{0}")]
    Limit(String),
}

/// What an app password may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// IMAP logins.
    Imap,
    /// SMTP submission.
    Smtp,
}

impl Scope {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Imap => "imap",
            Scope::Smtp => "smtp",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "imap" => Ok(Scope::Imap),
            "smtp" => Ok(Scope::Smtp),
            other => Err(format!("unknown scope `{other}` (expected imap or smtp)")),
        }
    }
}

/// TOTP state of an account.
#[derive(Clone, Serialize, Deserialize)]
pub struct TotpState {
    /// The secret, encrypted with the key outside the store (see `auth::crypto`).
    pub secret_enc: String,
    /// When 2FA was turned on (unix seconds).
    pub enabled_at: u64,
    /// Last accepted time step; only later steps are accepted (replay protection).
    pub last_step: u64,
}

/// An account (a mailbox user).
#[derive(Clone, Serialize, Deserialize)]
pub struct Account {
    /// Login name, lower-case e-mail address.
    pub username: String,
    /// Other addresses the account may send as.
    pub addresses: Vec<String>,
    /// argon2id PHC string of the account password, if it has one.
    pub password_hash: Option<String>,
    /// TOTP, if enabled.
    pub totp: Option<TotpState>,
    /// Set while TOTP is on; if the TOTP record were ever lost, the account still refuses
    /// its account password over IMAP/SMTP (fail closed).
    #[serde(default)]
    pub second_factor_required: bool,
    /// Single-use backup codes (argon2id hashes; an empty string is a used code).
    #[serde(default)]
    pub backup_codes: Option<BackupCodes>,
    /// Wrong second-factor codes in a row, across sign-ins (reset by a right one, or by
    /// an admin turning TOTP off or on again). At [`MAX_SECOND_FACTOR_FAILURES`] the
    /// second factor is locked (NIST SP 800-63B §5.2.2).
    #[serde(default)]
    pub second_factor_failures: u32,
    /// Failed IMAP/SMTP/web logins in a row (wrong password or app password), across
    /// addresses and restarts. At [`MAX_FAILED_LOGINS`] the account refuses every
    /// password and app password until its owner signs in on the web step (password and
    /// second factor) or an admin runs `mailgate user unlock`.
    #[serde(default)]
    pub failed_logins: u32,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
}

impl Account {
    /// A new account: no password, no second factor, no failures.
    pub fn new(username: &str, now: u64) -> Account {
        Account {
            username: username.to_string(),
            addresses: vec![],
            password_hash: None,
            totp: None,
            second_factor_required: false,
            backup_codes: None,
            second_factor_failures: 0,
            failed_logins: 0,
            created_at: now,
            updated_at: now,
        }
    }
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("username", &self.username)
            .field("addresses", &self.addresses)
            .field("has_password", &self.password_hash.is_some())
            .field("totp", &self.totp.is_some())
            .finish()
    }
}

impl Account {
    /// Whether the account has two-factor authentication (and so never accepts its
    /// account password over IMAP/SMTP).
    pub fn has_second_factor(&self) -> bool {
        self.totp.is_some() || self.second_factor_required
    }
}

/// A set of backup codes.
#[derive(Clone, Serialize, Deserialize, Default)]
pub struct BackupCodes {
    /// When the set was made (unix seconds).
    pub generated_at: u64,
    /// One argon2id hash per code; a used code's hash is replaced by an empty string.
    pub hashes: Vec<String>,
}

impl BackupCodes {
    /// Codes not used yet.
    pub fn remaining(&self) -> usize {
        self.hashes.iter().filter(|h| !h.is_empty()).count()
    }
}

/// The last successful use of an app password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastUse {
    /// Unix seconds.
    pub at: u64,
    /// Client address.
    pub ip: String,
    /// Client name from IMAP `ID`, if sent.
    pub client: Option<String>,
}

/// An app password record. The secret itself is never stored, only its hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct AppPasswordRecord {
    /// Public id: the first characters of the app password, selecting this record.
    pub id: String,
    /// Owner.
    pub username: String,
    /// Label given by its creator ("Thunderbird laptop").
    pub label: String,
    /// What it may be used for.
    pub scopes: Vec<Scope>,
    /// argon2id PHC string of the whole app password.
    pub hash: String,
    /// Unix seconds.
    pub created_at: u64,
    /// "admin" or "web".
    pub created_by: String,
    /// Last successful use.
    pub last_used: Option<LastUse>,
}

impl std::fmt::Debug for AppPasswordRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppPasswordRecord")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("label", &self.label)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Something that happened to an account (shown to admins and to the owner).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix seconds.
    pub at: u64,
    /// Account.
    pub username: String,
    /// Kind, e.g. `login_ok`, `account_password_refused_2fa`, `app_password_revoked`.
    pub kind: String,
    /// Detail without secrets: ip, client name, label.
    pub detail: String,
}

/// Everything in a store, for `mailgate store export` / `import` (sled's format will change
/// before its 1.0; this is the way across). Secrets stay as stored: password and app
/// password hashes, TOTP secrets sealed with `secret.key` (not in the dump).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dump {
    /// [`SCHEMA_VERSION`] of the store that wrote it.
    pub schema_version: u32,
    /// All accounts.
    pub accounts: Vec<Account>,
    /// All app passwords.
    pub app_passwords: Vec<AppPasswordRecord>,
    /// All audit events, oldest first per account.
    pub audit: Vec<AuditEvent>,
}

/// The storage interface.
pub trait Store: Send + Sync {
    /// One account.
    fn get_account(&self, username: &str) -> Result<Option<Account>, StoreError>;
    /// Creates an account; `Conflict` if it exists. Durable on return.
    fn create_account(&self, account: &Account) -> Result<(), StoreError>;
    /// Creates several accounts, all or none: `Conflict` naming the existing ones if any
    /// exists already. Durable on return.
    fn create_accounts(&self, accounts: &[Account]) -> Result<(), StoreError>;
    /// Replaces an existing account record; `NotFound` if it does not exist. Durable on return.
    fn put_account(&self, account: &Account) -> Result<(), StoreError>;
    /// Changes an account atomically: `change` sees the current record and may refuse
    /// (its error is returned, nothing is written). Concurrent changes are serialised, so
    /// a check-and-set inside `change` (a TOTP step, a backup code) happens once.
    /// Durable on return.
    fn update_account(
        &self,
        username: &str,
        change: &mut dyn FnMut(&mut Account) -> Result<(), StoreError>,
    ) -> Result<Account, StoreError>;
    /// Removes an account and its app passwords. Durable on return.
    fn remove_account(&self, username: &str) -> Result<(), StoreError>;
    /// All accounts, by name.
    fn list_accounts(&self) -> Result<Vec<Account>, StoreError>;
    /// Adds an app password; `Conflict` on a duplicate label, `Limit` past
    /// [`MAX_APP_PASSWORDS`]. Durable on return.
    fn create_app_password(&self, record: &AppPasswordRecord) -> Result<(), StoreError>;
    /// One app password by public id.
    fn get_app_password(&self, id: &str) -> Result<Option<AppPasswordRecord>, StoreError>;
    /// The account's app passwords, oldest first.
    fn list_app_passwords(&self, username: &str) -> Result<Vec<AppPasswordRecord>, StoreError>;
    /// Deletes an app password of that account. Durable on return.
    fn revoke_app_password(&self, username: &str, id: &str) -> Result<AppPasswordRecord, StoreError>;
    /// Records a successful use. Not flushed (written within sled's 500 ms background flush).
    fn record_app_password_use(&self, id: &str, used: &LastUse) -> Result<(), StoreError>;
    /// Appends an audit event. Not flushed.
    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// The account's most recent events, newest first.
    fn recent_audit(&self, username: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Everything in the store.
    fn export(&self) -> Result<Dump, StoreError>;
    /// Loads a dump into an empty store (`Conflict` if it holds any account). Durable on return.
    fn import(&self, dump: &Dump) -> Result<(), StoreError>;
    /// Tells the other nodes sharing this store to end sessions. The embedded store has
    /// no other nodes.
    fn publish(&self, _event: &SessionEvent) {}
    /// Session events published by nodes sharing this store (revocations, removals,
    /// password changes made there). `None` for the embedded store.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<SessionEvent>> {
        None
    }
    /// Web sessions kept in the store for every node sharing it. `None` for the embedded
    /// store: its one node keeps them in memory.
    fn web_sessions(&self) -> Option<&dyn SharedWebSessions> {
        None
    }
    /// Failure counts (per-address penalties, per-account delays) kept in the store for
    /// every node sharing it. `None` for the embedded store: its one node counts in memory.
    fn failure_counts(&self) -> Option<&dyn SharedFailureCounts> {
        None
    }
}

/// Failure counts in a store shared by several nodes, so that guesses spread over the
/// nodes meet the same penalty as guesses sent to one (SECURITY.md §H).
pub trait SharedFailureCounts: Send + Sync {
    /// Counts one failure under each key (an address, an account) and returns the counts,
    /// in order. A failure with the same `tag` as the key's last one (a mail app retrying
    /// the same wrong password) does not raise its count; a count whose last failure is
    /// `forget_after` seconds old starts again. Counts that old are purged.
    fn count_failures(&self, keys: &[String], tag: &[u8], now: u64, forget_after: u64) -> Result<Vec<u32>, StoreError>;
    /// Clears counts (a success, an admin unlock). May return before the change is
    /// written.
    fn clear_failures(&self, keys: Vec<String>);
}

/// A web session as a shared store keeps it (see `web::WebSessions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSessionRow {
    /// The session's state, sealed with `secret.key` (its form token, a TOTP secret being
    /// enrolled, backup codes just shown).
    pub sealed: String,
    /// The account, once its password was checked (to end all of its sessions).
    pub username: Option<String>,
    /// Not signed in: these are capped, the least recently seen go first.
    pub anonymous: bool,
    /// The client that opened it (an IPv4 address or an IPv6 prefix, `addr::client_key`):
    /// anonymous sessions are also capped per client. `None` in rows stored before keys were.
    pub client_key: Option<std::net::IpAddr>,
    /// Last request (unix seconds).
    pub last_seen: u64,
    /// When it ends at the latest (unix seconds); purged after that.
    pub expires_at: u64,
}

/// Web sessions in a store shared by several nodes, so that any node serves any request
/// of a browser (no sticky load balancing needed). Rows are keyed by a hash of the
/// session id: reading the database does not give anyone a usable cookie.
pub trait SharedWebSessions: Send + Sync {
    /// Adds a session. If it is anonymous, the least recently seen anonymous sessions of
    /// its `client_key` beyond `max_per_client` (the new one counted, and kept) are deleted:
    /// a flood of sign-in page visits from one client only pushes out that client's own
    /// sessions. With `purge` (callers ask every so often, it costs a scan), sessions
    /// expired at `now` are deleted first, and the least recently seen anonymous ones beyond
    /// `max_anonymous` (a flood of sign-in page visits can never crowd out signed-in people).
    fn insert_web_session(
        &self,
        key: &str,
        row: &WebSessionRow,
        now: u64,
        max_per_client: usize,
        purge: Option<usize>,
    ) -> Result<(), StoreError>;
    /// A session and its version (which counts its changes).
    fn get_web_session(&self, key: &str) -> Result<Option<(WebSessionRow, i64)>, StoreError>;
    /// Replaces a session if it is still at `version`: `false` if it changed meanwhile
    /// (another request of the same browser) or is gone.
    fn replace_web_session(&self, key: &str, version: i64, row: &WebSessionRow) -> Result<bool, StoreError>;
    /// Moves a session to a new key (a new id after a sign-in step); `false` if it is gone.
    fn rename_web_session(&self, old: &str, new: &str) -> Result<bool, StoreError>;
    /// Ends a session.
    fn delete_web_session(&self, key: &str) -> Result<(), StoreError>;
    /// Ends every session of `username` but the one at `keep`.
    fn delete_web_sessions_of(&self, username: &str, keep: Option<&str>) -> Result<(), StoreError>;
}

/// A change that ends live sessions on every node sharing the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum SessionEvent {
    /// End the sessions of `username`; with an app password id, only those opened with it.
    End {
        /// The account.
        username: String,
        /// Only the sessions of this app password.
        app_password_id: Option<String>,
    },
    /// End the sessions of `username` opened with the account password.
    EndAccountPassword {
        /// The account.
        username: String,
    },
}
