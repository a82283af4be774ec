//! The store: accounts, app passwords, TOTP state and audit events.
//!
//! [`Store`] is the interface the rest of mailgate uses. It has two implementations,
//! chosen by `[store] backend`: [`sled_store::SledStore`], embedded in `data_dir` (the
//! only code that imports sled), and [`pg_store::PgStore`], a PostgreSQL database shared
//! by several nodes (the only code that imports tokio-postgres; it also carries the
//! session-ending events between nodes, see [`Store::subscribe`]). Records are JSON in
//! both. Every change that is acknowledged to a person (account, password, app password,
//! TOTP changes) is durable before the call returns; on sled, last-use updates and audit
//! events are not flushed at once (sled writes them within 500 ms), so a login never
//! waits for an fsync. Both backends pass one test suite, `conformance`, which is test
//! code: it is compiled for the unit tests and with the `test-support` feature (the
//! PostgreSQL integration tests), never into a release build.

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod pg_store;
pub mod sled_store;

use serde::{Deserialize, Serialize};

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// App passwords one account may hold (bounds the list and the cost of a login).
pub const MAX_APP_PASSWORDS: usize = 50;
/// An address an account signed in from counts as familiar this long after the last
/// sign-in from it.
pub const FAMILIAR_KEEP_SECS: u64 = 90 * 86_400;
/// Audit events kept per account (older ones are dropped).
pub const MAX_AUDIT_PER_ACCOUNT: usize = 1000;

/// A budget of attempts (guesses of an account password, a TOTP code, a backup code),
/// shared by every node of the store: at most `burst` at once, and one more every
/// `refill_secs` (a leaky bucket). Taken *before* the guess is compared, so requests sent
/// at the same time cannot all be compared (SECURITY.md §H).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// What it limits, e.g. `pw-ip:192.0.2.1` or `2fa-user:a@example.com`.
    pub key: String,
    /// Attempts that may be used at once.
    pub burst: u32,
    /// One used attempt comes back every this many seconds.
    pub refill_secs: u64,
}

/// A budget as stored: attempts in use, and the time from which they refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetUse {
    /// Attempts in use.
    pub used: u32,
    /// When `used` was last brought up to date (unix seconds).
    pub at: u64,
}

impl BudgetUse {
    /// The use at `now`: one attempt back for every `refill_secs` since `at`.
    pub fn refilled(self, now: u64, refill_secs: u64) -> BudgetUse {
        if self.used == 0 {
            return BudgetUse { used: 0, at: now };
        }
        if refill_secs == 0 {
            return BudgetUse { used: 0, at: now };
        }
        let back = now.saturating_sub(self.at) / refill_secs;
        if back >= u64::from(self.used) {
            BudgetUse { used: 0, at: now }
        } else {
            // Whole refills only: the part of a refill already waited for is kept.
            BudgetUse { used: self.used - back as u32, at: self.at + back * refill_secs }
        }
    }

    /// When every attempt is back (the entry can be forgotten then).
    pub fn empty_at(self, refill_secs: u64) -> u64 {
        self.at.saturating_add(u64::from(self.used).saturating_mul(refill_secs))
    }

    /// Takes one attempt of `budget` at `now`, if one is left.
    pub fn take(self, budget: &Budget, now: u64) -> Option<BudgetUse> {
        let cur = self.refilled(now, budget.refill_secs);
        (cur.used < budget.burst).then_some(BudgetUse { used: cur.used + 1, at: cur.at })
    }

    /// Gives one attempt back at `now`.
    pub fn give_back(self, budget: &Budget, now: u64) -> BudgetUse {
        let cur = self.refilled(now, budget.refill_secs);
        BudgetUse { used: cur.used.saturating_sub(1), at: if cur.used <= 1 { now } else { cur.at } }
    }
}

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
    /// POP3.
    Pop3,
    /// ManageSieve (editing mail filters).
    Sieve,
}

impl Scope {
    /// Every scope, in the order they are shown.
    pub const ALL: [Scope; 4] = [Scope::Imap, Scope::Smtp, Scope::Pop3, Scope::Sieve];

    /// Lower-case name, as in `--scope` and `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Imap => "imap",
            Scope::Smtp => "smtp",
            Scope::Pop3 => "pop3",
            Scope::Sieve => "sieve",
        }
    }

    /// The protocol's name as people read it ("IMAP", "ManageSieve").
    pub fn label(self) -> &'static str {
        match self {
            Scope::Imap => "IMAP",
            Scope::Smtp => "SMTP",
            Scope::Pop3 => "POP3",
            Scope::Sieve => "ManageSieve",
        }
    }
}

/// A scope name that is not one of [`Scope::ALL`] (as given, trimmed and lower-cased).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope `{0}` (expected imap, smtp, pop3 or sieve)")]
pub struct UnknownScope(pub String);

impl std::str::FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Scope, UnknownScope> {
        match s.trim().to_ascii_lowercase().as_str() {
            "imap" => Ok(Scope::Imap),
            "smtp" => Ok(Scope::Smtp),
            "pop3" => Ok(Scope::Pop3),
            "sieve" | "managesieve" => Ok(Scope::Sieve),
            other => Err(UnknownScope(other.to_string())),
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
    /// Single-use backup codes (keyed hashes; an empty string is a used code).
    #[serde(default)]
    pub backup_codes: Option<BackupCodes>,
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
    /// The protocol it was used over (older records have none).
    #[serde(default)]
    pub protocol: Option<Scope>,
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
    /// Last successful use over each protocol (empty in older records).
    #[serde(default)]
    pub last_used_by: std::collections::BTreeMap<Scope, LastUse>,
    /// Set when this is an OAuth grant (a mail app signed in through the browser) rather
    /// than a typed app password; `hash` is then empty and never matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthGrant>,
    /// When it stops working (unix seconds); `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The networks it may be used from; empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<ipnet::IpNet>,
    /// What it may do inside its scopes (issue 20); `None` (every older record): all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub narrow: Option<Narrowing>,
}

/// An app password that can do less than its scopes allow: read-only or folder-limited
/// IMAP, send-limited SMTP, send quotas. Each part is off when empty / `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Narrowing {
    /// IMAP: nothing in the mailbox may change (`--scope imap:read`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// IMAP: only these folders exist (LIST patterns, `/` between levels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folders: Vec<String>,
    /// SMTP: the only sender addresses (a subset of the account's own, lower-case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_as: Vec<String>,
    /// SMTP: the only recipients: addresses, or `@domain` for a whole domain (lower-case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_to: Vec<String>,
    /// SMTP: messages per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u32>,
    /// SMTP: recipients per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recipients: Option<u32>,
}

impl Narrowing {
    /// Whether nothing is narrowed.
    pub fn is_empty(&self) -> bool {
        *self == Narrowing::default()
    }

    /// Whether the IMAP session needs the filter.
    pub fn limits_imap(&self) -> bool {
        self.read_only || !self.folders.is_empty()
    }

    /// Whether `address` (lower-case) is a recipient `send_to` allows (any, when empty).
    pub fn may_send_to(&self, address: &str) -> bool {
        if self.send_to.is_empty() {
            return true;
        }
        let a = address.trim().to_ascii_lowercase();
        let domain = a.rsplit_once('@').map(|(_, d)| d);
        self.send_to.iter().any(|rule| match rule.strip_prefix('@') {
            Some(d) => domain == Some(d),
            None => *rule == a,
        })
    }

    /// The limits in words, for `create`, `list` and the audit log (`""` without any):
    /// `, read-only, folders INBOX|Shared/Tickets, send as a@x, ...`.
    pub fn words(&self) -> String {
        let mut out = String::new();
        if self.read_only {
            out.push_str(", read-only");
        }
        if !self.folders.is_empty() {
            out.push_str(&format!(", folders {}", self.folders.join("|")));
        }
        if !self.send_as.is_empty() {
            out.push_str(&format!(", send as {}", self.send_as.join("|")));
        }
        if !self.send_to.is_empty() {
            out.push_str(&format!(", send to {}", self.send_to.join("|")));
        }
        if let Some(n) = self.max_messages {
            out.push_str(&format!(", at most {n} messages/hour"));
        }
        if let Some(n) = self.max_recipients {
            out.push_str(&format!(", at most {n} recipients/hour"));
        }
        out
    }
}

/// The OAuth side of a grant (see `auth::oauth`). No token is stored, only the SHA-256
/// of the current refresh token and of a few retired ones.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthGrant {
    /// `client_id` the grant was issued to.
    pub client_id: String,
    /// The client's name as configured ("Thunderbird").
    pub client_name: String,
    /// Generation of the current refresh token (raised by each rotation).
    pub refresh_generation: u32,
    /// Hex SHA-256 of the current refresh token.
    pub refresh_hash: String,
    /// Hex SHA-256 of recently retired refresh tokens (a replay of one revokes the grant).
    #[serde(default)]
    pub retired: Vec<String>,
    /// When the refresh token was last issued (unix seconds); it expires
    /// `[oauth] refresh_token_days` later.
    pub refreshed_at: u64,
    /// `User-Agent` of the token request, shortened, if sent.
    #[serde(default)]
    pub user_agent: Option<String>,
}

impl std::fmt::Debug for OAuthGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthGrant")
            .field("client_id", &self.client_id)
            .field("refresh_generation", &self.refresh_generation)
            .finish_non_exhaustive()
    }
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

/// A security notification waiting to be mailed (see `notify`): what happened, never a
/// secret (labels, ids, addresses and client names only). Kept until it is sent, or
/// dropped a day after it was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notice {
    /// Unique id (random), by which it is rescheduled or deleted.
    pub id: String,
    /// The account it goes to.
    pub username: String,
    /// What happened, e.g. `app_password_created` (`notify::Kind`).
    pub kind: String,
    /// The facts shown in the mail, in order: (name, value), e.g. ("label", "Phone").
    pub facts: Vec<(String, String)>,
    /// When it happened (unix seconds).
    pub created_at: u64,
    /// When it may be sent (next) (unix seconds); a claim moves it forward by its lease.
    pub due_at: u64,
    /// Sending attempts that failed so far.
    pub attempts: u32,
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
    /// Changes an app password atomically (an OAuth grant's refresh-token rotation):
    /// `change` sees the current record and may refuse (its error is returned, nothing is
    /// written); it may run more than once if a concurrent write intervened. Only the
    /// record's own fields are written (not its last use). `NotFound` if it is gone.
    /// Durable on return.
    fn update_app_password(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut AppPasswordRecord) -> Result<(), StoreError>,
    ) -> Result<AppPasswordRecord, StoreError>;
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
    fn publish(&self, _event: &LiveEvent) {}
    /// Session events published by nodes sharing this store (revocations, removals,
    /// password changes made there). `None` for the embedded store.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<LiveEvent>> {
        None
    }
    /// Web sessions kept in the store for every node sharing it. `None` for the embedded
    /// store: its one node keeps them in memory.
    fn web_sessions(&self) -> Option<&dyn SharedWebSessions> {
        None
    }
    /// Takes one attempt from each of `budgets`, all or none, atomically with every other
    /// taker (other requests, other nodes). `Ok(None)`: taken. `Ok(Some(i))`: `budgets[i]`
    /// has none left; nothing was taken.
    fn take_attempt(&self, budgets: &[Budget], now: u64) -> Result<Option<usize>, StoreError>;
    /// Gives one attempt back to each of `budgets` (the attempt was not a wrong guess).
    fn give_back_attempt(&self, budgets: &[Budget], now: u64) -> Result<(), StoreError>;
    /// Gives every attempt of these budgets back (a success from that address, an admin
    /// unlock).
    fn clear_attempts(&self, keys: &[String]) -> Result<(), StoreError>;
    /// Remembers that `key` (an account and an address it signed in from) was seen at `now`.
    fn remember_familiar(&self, key: &str, now: u64) -> Result<(), StoreError>;
    /// When `key` was last remembered, if it was.
    fn familiar_since(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Queues a notice (one write; not flushed on sled). `Conflict` on a duplicate id.
    fn enqueue_notice(&self, notice: &Notice) -> Result<(), StoreError>;
    /// Claims up to `limit` notices due at `now`, oldest due first, and moves each one's
    /// `due_at` to `now + lease_secs`, so that no other claim (another node's included)
    /// gets it before the lease runs out. The claimer sends each, then deletes or
    /// reschedules it; a claimer that dies leaves it to be claimed again after the lease.
    fn claim_notices(&self, now: u64, lease_secs: u64, limit: usize) -> Result<Vec<Notice>, StoreError>;
    /// Sets a claimed notice's next time and its count of failed attempts (a send
    /// failed). Nothing happens if it is gone.
    fn reschedule_notice(&self, id: &str, due_at: u64, attempts: u32) -> Result<(), StoreError>;
    /// Deletes a notice (sent, or given up); nothing happens if it is gone.
    fn delete_notice(&self, id: &str) -> Result<(), StoreError>;
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
pub enum LiveEvent {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as a mailgate from before POP3 and ManageSieve wrote it (no protocol in its
    /// last use, no last use per protocol) reads with exactly its scopes: an `imap,smtp` app
    /// password does not gain `pop3` or `sieve`, and its one last use is kept.
    #[test]
    fn an_app_password_from_before_pop3_and_sieve_keeps_its_scopes() {
        let old = br#"{"id":"jnqs4c","username":"alice@example.com","label":"phone","scopes":["imap","smtp"],
            "hash":"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g","created_at":1764000000,
            "created_by":"admin","last_used":{"at":1764000100,"ip":"192.0.2.7","client":"Thunderbird"}}"#;
        let rec: AppPasswordRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(rec.scopes, vec![Scope::Imap, Scope::Smtp]);
        assert!(!rec.scopes.contains(&Scope::Pop3) && !rec.scopes.contains(&Scope::Sieve));
        let last = rec.last_used.as_ref().unwrap();
        assert_eq!((last.at, last.protocol), (1_764_000_100, None));
        assert!(rec.last_used_by.is_empty());
        // Written back, it still holds just those two.
        let again: AppPasswordRecord = serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
        assert_eq!(again.scopes, vec![Scope::Imap, Scope::Smtp]);
    }
}
